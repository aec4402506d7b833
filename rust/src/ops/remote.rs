//! Remote operations, as dask's handlers: a task serves operations that its peers (or any gRPC
//! client) call by name with keyword arguments, and calls its peers' operations.
//!
//! Arguments and results are [`proto::Value`]s, a safe encoding that runs no code to decode; a
//! large array among them arrives into a buffer it can stay in ([`Arrived`]). The core knows no
//! handler language: a handler is anything implementing [`Handler`]; the Python binding installs
//! Python functions as handlers.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::watch;
use tonic::metadata::MetadataMap;

use crate::base::cluster::TaskId;
use crate::base::config::ServerConfig;
use crate::base::errors::{Error, Result};
use crate::proto;
use crate::tensor::buf::Arrived;
use crate::transport::{Peers, Shm, route, unary};
use crate::wire::values::{self, CALL_PATH};

/// One call of an operation, as its handler receives it.
pub struct Call {
    pub op: String,
    pub kwargs: Vec<proto::DictEntry>,
    /// The calling task, when the caller said (a stock gRPC client need not).
    pub caller: Option<TaskId>,
    /// The request's metadata, for handlers that look at the call's context.
    pub metadata: MetadataMap,
    /// The buffer the arguments arrived in, where their large arrays may stay.
    pub arrived: Option<Arrived>,
}

/// A call's result, and the buffer it arrived in, where its large arrays may stay.
#[derive(Debug)]
pub struct Returned {
    pub value: proto::Value,
    pub arrived: Option<Arrived>,
}

/// Runs an operation. A handler that blocks must do so off the runtime's threads, so that other
/// calls go on.
pub trait Handler: Send + Sync {
    fn call(&self, call: Call) -> BoxFuture<'static, Result<proto::Value>>;
}

impl<F, Fut> Handler for F
where
    F: Fn(Call) -> Fut + Send + Sync,
    Fut: Future<Output = Result<proto::Value>> + Send + 'static,
{
    fn call(&self, call: Call) -> BoxFuture<'static, Result<proto::Value>> {
        Box::pin(self(call))
    }
}

/// A task's operations: the handlers it serves, the ones it refuses, and its calls to peers.
pub struct Operations {
    me: TaskId,
    /// Calls to tasks of this host go through the same-host link, when there is one.
    shm: Arc<Shm>,
    max_message_bytes: usize,
    handlers: RwLock<HashMap<String, Arc<dyn Handler>>>,
    blocked: RwLock<HashSet<String>>,
    /// Set when the server stops, which ends the calls it is making.
    closed: watch::Sender<bool>,
}

impl Operations {
    pub fn new(me: TaskId, config: &ServerConfig, shm: Arc<Shm>) -> Self {
        Self {
            me,
            shm,
            max_message_bytes: config.max_message_bytes,
            handlers: RwLock::default(),
            blocked: RwLock::default(),
            closed: watch::Sender::new(false),
        }
    }

    /// Cancels the calls in flight and every later one.
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Serves `op` with `handler`, replacing any handler it had.
    pub fn add(&self, op: impl Into<String>, handler: Arc<dyn Handler>) {
        write(&self.handlers).insert(op.into(), handler);
    }

    /// Stops serving `op`; whether it was served.
    pub fn remove(&self, op: &str) -> bool {
        write(&self.handlers).remove(op).is_some()
    }

    /// Refuses calls of `ops` with PERMISSION_DENIED, whether or not they have handlers.
    pub fn block(&self, ops: impl IntoIterator<Item = String>) {
        write(&self.blocked).extend(ops);
    }

    /// Runs a call a peer made. Errors say that this task is where they happened.
    pub async fn serve(
        &self,
        request: proto::CallRequest,
        metadata: MetadataMap,
        arrived: Option<Arrived>,
    ) -> Result<proto::Value> {
        let served = async {
            let handler = self.handler(&request.op)?;
            let caller = request
                .caller
                .as_ref()
                .map(TaskId::from_proto)
                .transpose()?;
            let call = Call {
                op: request.op,
                kwargs: request
                    .kwargs
                    .map(|kwargs| kwargs.entries)
                    .unwrap_or_default(),
                caller,
                metadata,
                arrived,
            };
            handler.call(call).await
        };
        served.await.map_err(|error| Error {
            task: Some(self.me.to_string()),
            ..error
        })
    }

    fn handler(&self, op: &str) -> Result<Arc<dyn Handler>> {
        if read(&self.blocked).contains(op) {
            return Err(Error::permission_denied(format!(
                "operation {op:?} is blocked on this task"
            )));
        }
        read(&self.handlers)
            .get(op)
            .cloned()
            .ok_or_else(|| Error::unimplemented(format!("no operation {op:?} on this task")))
    }

    /// Calls operation `op` of task `to` (this task included) with `kwargs`, over the connection
    /// to that task in `peers`, shared by every call made through them: `peers` must belong to
    /// the runtime that polls the call. With a `timeout`, the whole call, connecting included,
    /// fails with DEADLINE_EXCEEDED past it, and the peer is told to give up too.
    pub async fn call(
        &self,
        peers: &Peers,
        to: TaskId,
        op: String,
        kwargs: Vec<proto::DictEntry>,
        timeout: Option<Duration>,
    ) -> Result<Returned> {
        let called = async {
            peers.cluster().require(&to)?;
            let request = proto::CallRequest {
                op: op.clone(),
                kwargs: Some(proto::DictValue { entries: kwargs }),
                caller: Some(self.me.to_proto()),
                ..Default::default()
            };
            if let Some(link) = route::link(&self.shm, peers, &to).await {
                let value = link.call(&request, timeout).await?;
                return Ok(Returned {
                    value,
                    arrived: None,
                });
            }
            let frames = values::frame_call(&request, self.max_message_bytes)?;
            let answer = unary::post(
                peers,
                &to,
                CALL_PATH,
                frames,
                timeout,
                self.max_message_bytes,
            );
            let arrived = answer.await?;
            let response: proto::CallResponse = values::decode_checked(arrived.bytes())?;
            let value = response
                .result
                .ok_or_else(|| Error::invalid_argument("the response carries no result"))?;
            Ok(Returned {
                value,
                arrived: Some(arrived),
            })
        };
        let timed = async {
            let Some(limit) = timeout else {
                return called.await;
            };
            let deadline = tokio::time::Instant::now() + limit;
            match tokio::time::timeout_at(deadline, called).await {
                Ok(Ok(returned)) => Ok(returned),
                Ok(Err(error)) if tokio::time::Instant::now() < deadline => Err(error),
                // Past the deadline, whether the peer gave up first (tonic's server answers
                // CANCELLED) or this side did.
                _ => Err(Error::deadline_exceeded(format!(
                    "operation {op:?} of task {to} did not finish within {:.3}s",
                    limit.as_secs_f64()
                ))),
            }
        };
        let mut closed = self.closed.subscribe();
        tokio::select! {
            result = timed => result,
            _ = closed.wait_for(|closed| *closed) => Err(Error::cancelled(format!(
                "operation {op:?} of task {to} was cancelled: this server stopped"
            ))),
        }
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // Every update is a single insert or removal, so a poisoned lock still holds a valid table.
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}
