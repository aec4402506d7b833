//! What a calling thread asks of its task, and where that work runs.
//!
//! A blocking call (`send`, a collective, a remote operation) is driven by the calling thread
//! itself on the server's caller runtime, over that runtime's connections: a lone caller writes
//! its request and reads the answer with no hand-off to another thread either way. A wait for
//! something that arrives on its own (`recv`, a variable's answer, the cluster's status) is
//! polled by the calling thread while the server's runtime does the I/O. Work started in the
//! background (`isend`, `irecv`, `icall`, `icollective`) runs on the server's runtime. The binding only waits.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::runtime::{Handle, Runtime};
use tokio::task::JoinHandle;

use super::server::Server;
use super::status;
use super::status::{HealthAndStatus, Statuses};
use super::task::Task;
use crate::base::cluster::TaskId;
use crate::base::errors::{Error, Result, within};
use crate::base::security::Security;
use crate::ops::collectives::{Collective, Group};
use crate::ops::remote::Returned;
use crate::ops::variables::{Reply, Step, parse_op};
use crate::proto;
use crate::tensor::{Tensor, TensorMeta};

/// How a blocked thread gets its work done.
pub enum Driver {
    /// The thread drives the work itself on this current-thread runtime.
    Caller(Arc<Runtime>),
    /// The thread polls the work while this runtime's threads do its I/O.
    Runtime(Handle),
    /// Like `Runtime`, on a runtime made for this one wait (a caller with no server).
    Own(Runtime),
}

/// Work for a blocked thread, and how to get it done.
pub struct Blocking<W> {
    pub driver: Driver,
    pub work: W,
}

impl<W> Blocking<W> {
    pub fn map<V>(self, then: impl FnOnce(W) -> V) -> Blocking<V> {
        Blocking {
            driver: self.driver,
            work: then(self.work),
        }
    }
}

/// Work to run in the background on the server's runtime.
pub struct Background<F> {
    runtime: Handle,
    work: F,
}

impl<F> Background<F> {
    pub fn map<G>(self, then: impl FnOnce(F) -> G) -> Background<G> {
        Background {
            runtime: self.runtime,
            work: then(self.work),
        }
    }
}

impl<F> Background<F>
where
    F: Future + Send + 'static,
    F::Output: Send,
{
    /// Starts the work; `until_end` is held until it ends, however it ends.
    pub fn spawn(self, until_end: impl Send + 'static) -> (Handle, JoinHandle<F::Output>) {
        let work = self.work;
        let task = self.runtime.spawn(async move {
            let _held = until_end;
            work.await
        });
        (self.runtime, task)
    }
}

/// The status of the server at `address`, asked with `security`'s credentials, for a caller
/// that may have no server: on a runtime of its own. See [`status::query`].
pub fn query_status(
    address: String,
    timeout: Duration,
    security: Security,
) -> Result<Blocking<impl Future<Output = Result<HealthAndStatus>> + Send>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("distsrv-query")
        .enable_all()
        .build()
        .map_err(|e| Error::internal(format!("cannot start a runtime: {e}")))?;
    Ok(Blocking {
        driver: Driver::Own(runtime),
        work: async move { status::query(&address, timeout, &security).await },
    })
}

/// `work` on `peer`, ended early if `peer` is lost or restarted (a call on this task itself
/// runs as it is).
async fn watched<T>(
    task: &Task,
    peer: &TaskId,
    work: impl Future<Output = Result<T>>,
) -> Result<T> {
    if *peer == task.def.task {
        return work.await;
    }
    task.liveness.guard(peer, work).await
}

impl Server {
    fn on_caller(&self) -> Result<Driver> {
        Ok(Driver::Caller(self.caller_runtime()?))
    }

    fn on_runtime(&self) -> Result<Driver> {
        Ok(Driver::Runtime(self.runtime()?))
    }

    fn background<F>(&self, work: F) -> Result<Background<F>> {
        Ok(Background {
            runtime: self.runtime()?,
            work,
        })
    }

    /// Sends `payload` to `to` under `name`; done once the receiving server holds all of it,
    /// or DEADLINE_EXCEEDED past `timeout` (`None`: while `to` is up).
    pub fn send(
        &self,
        to: TaskId,
        name: String,
        meta: TensorMeta,
        payload: Bytes,
        timeout: Option<Duration>,
    ) -> Result<Blocking<impl Future<Output = Result<()>> + Send + use<>>> {
        let driver = self.on_caller()?;
        let task = self.task();
        let what = format!("send of {name:?} to {to} not done");
        let sending = task
            .exchange
            .send_via(&task.caller_peers, to, name, meta, payload)?;
        let work = within(timeout, what, sending);
        Ok(Blocking { driver, work })
    }

    /// Like [`Server::send`], in the background.
    pub fn isend(
        &self,
        to: TaskId,
        name: String,
        meta: TensorMeta,
        payload: Bytes,
    ) -> Result<Background<impl Future<Output = Result<()>> + Send + use<>>> {
        let runtime = self.runtime()?;
        let work = self.task().exchange.send(to, name, meta, payload)?;
        Ok(Background { runtime, work })
    }

    /// The next tensor `name` from `source`, waiting up to `timeout` (`None`: no limit).
    pub fn recv(
        &self,
        source: TaskId,
        name: String,
        timeout: Option<Duration>,
    ) -> Result<Blocking<impl Future<Output = Result<Tensor>> + Send + '_>> {
        let driver = self.on_runtime()?;
        let work = self.task().exchange.recv(source, name, timeout);
        Ok(Blocking { driver, work })
    }

    /// Like [`Server::recv`], in the background.
    pub fn irecv(
        &self,
        source: TaskId,
        name: String,
        timeout: Option<Duration>,
    ) -> Result<Background<impl Future<Output = Result<Tensor>> + Send + use<>>> {
        let task = Arc::clone(self.task());
        self.background(async move { task.exchange.recv(source, name, timeout).await })
    }

    /// The next tensor `name` from whichever of `sources` sends one first (see
    /// [`crate::exchange::Exchange::recv_any`]).
    pub fn recv_any(
        &self,
        sources: Vec<TaskId>,
        name: String,
        timeout: Option<Duration>,
    ) -> Result<Blocking<impl Future<Output = Result<(TaskId, Tensor)>> + Send + '_>> {
        let driver = self.on_runtime()?;
        let work = self.task().exchange.recv_any(sources, name, timeout);
        Ok(Blocking { driver, work })
    }

    /// The group of `members` (every task when `None`), which must include this task.
    pub fn group(&self, members: Option<Vec<TaskId>>) -> Result<Group> {
        Group::new(&self.task().exchange, members)
    }

    /// This task's part in the next collective of `group`, failing after `timeout` (the
    /// config's `collective_timeout` when `None`).
    ///
    /// Takes the collective's sequence number: check whatever the call can refuse on its own
    /// before, since a call that took a number and then sent nothing leaves this task out of step
    /// with the rest of the group.
    pub fn collective(
        &self,
        group: Group,
        timeout: Option<Duration>,
    ) -> Result<Blocking<Collective>> {
        let driver = self.on_caller()?;
        let task = self.task();
        let timeout = timeout.unwrap_or(task.config.collective_timeout);
        let work = task
            .collectives
            .begin(&task.exchange, &task.caller_peers, group, Some(timeout));
        Ok(Blocking { driver, work })
    }

    /// Like [`Server::collective`], in the background.
    pub fn icollective(
        &self,
        group: Group,
        timeout: Option<Duration>,
    ) -> Result<Background<Collective>> {
        let task = self.task();
        let timeout = timeout.unwrap_or(task.config.collective_timeout);
        let work = task
            .collectives
            .begin(&task.exchange, &task.peers, group, Some(timeout));
        self.background(work)
    }

    /// Applies `op` (see [`parse_op`]) to variable `name` hosted on `host`, with `value` and
    /// the `step`'s hyperparameters where it takes them. Fails with DEADLINE_EXCEEDED past
    /// `timeout` (`None`: while `host` is up).
    pub fn variable(
        &self,
        host: TaskId,
        name: String,
        op: &str,
        value: Option<(TensorMeta, Bytes)>,
        step: Step,
        timeout: Option<Duration>,
    ) -> Result<Blocking<impl Future<Output = Result<Reply>> + Send + '_>> {
        let op = parse_op(op)?;
        let driver = self.on_runtime()?;
        let task = self.task();
        let what = format!("{op:?} of variable {name:?} on {host} not done");
        let work = async move {
            let applied = task
                .variables
                .call(&task.peers, &host, name, op, value, step);
            within(timeout, what, watched(task, &host, applied)).await
        };
        Ok(Blocking { driver, work })
    }

    /// Every task's status in cluster order, each asked for up to `timeout`.
    pub fn statuses(
        &self,
        timeout: Duration,
    ) -> Result<Blocking<impl Future<Output = Result<Statuses>> + Send + '_>> {
        let driver = self.on_runtime()?;
        let work = status::statuses(self.task(), timeout);
        Ok(Blocking { driver, work })
    }

    /// Waits until every task answers GetStatus; each task's incarnation.
    pub fn wait_for_cluster(
        &self,
        timeout: Option<Duration>,
    ) -> Result<Blocking<impl Future<Output = Result<BTreeMap<TaskId, u64>>> + Send + '_>> {
        let driver = self.on_runtime()?;
        let work = status::wait_for_cluster(self.task(), timeout);
        Ok(Blocking { driver, work })
    }

    /// The other tasks' comings and goings from now on, and the runtime to wait for them on.
    pub fn watch_peers(&self) -> Result<(Handle, status::PeerWatch)> {
        Ok((self.runtime()?, status::PeerWatch::new(self.task())))
    }

    /// Runs operation `op` on task `to` with `kwargs`; its result.
    pub fn call(
        &self,
        to: TaskId,
        op: String,
        kwargs: Vec<proto::DictEntry>,
        timeout: Option<Duration>,
    ) -> Result<Blocking<impl Future<Output = Result<Returned>> + Send + '_>> {
        let driver = self.on_caller()?;
        let task = self.task();
        let work = async move {
            let called = task
                .operations
                .call(&task.caller_peers, to.clone(), op, kwargs, timeout);
            watched(task, &to, called).await
        };
        Ok(Blocking { driver, work })
    }

    /// Like [`Server::call`], in the background.
    pub fn icall(
        &self,
        to: TaskId,
        op: String,
        kwargs: Vec<proto::DictEntry>,
        timeout: Option<Duration>,
    ) -> Result<Background<impl Future<Output = Result<Returned>> + Send + use<>>> {
        let task = Arc::clone(self.task());
        self.background(async move {
            let called = task
                .operations
                .call(&task.peers, to.clone(), op, kwargs, timeout);
            watched(&task, &to, called).await
        })
    }
}
