//! The tensor-exchange loop: tasks hand each other tensors by name.
//!
//! Rendezvous semantics: every tensor sent is received exactly once, in order per (source, name),
//! and a receive may come before or after its send. Sends push: the sender streams the tensor to
//! the receiving task's server, which answers only once it holds the whole tensor in its inbox, so
//! an acknowledged tensor is never lost. The inbox holds at most `max_pending_bytes` of tensors
//! nobody has received yet; a send beyond that is refused rather than buffered without bound.
//!
//! Every send and receive watches its peer (see [`crate::transport::liveness`]): one that is
//! lost or restarted ends the wait on it, so nothing waits forever on a silent peer.

mod order;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::Either;

use crate::base::cluster::TaskId;
use crate::base::config::ServerConfig;
use crate::base::errors::{Code, Error, Result, within};
use crate::inbox::Inbox;
use crate::tensor::{Tensor, TensorBuf, TensorKey, TensorMeta, check_name, shown_name};
use crate::transport::{Liveness, Peers, Shm, push, route};
use crate::wire;
use order::SendOrder;

pub struct Exchange {
    me: TaskId,
    /// The server runtime's connections, which also know the cluster.
    peers: Arc<Peers>,
    liveness: Arc<Liveness>,
    chunk_bytes: usize,
    inbox: Arc<Inbox>,
    order: Arc<SendOrder>,
    shm: Arc<Shm>,
}

impl Exchange {
    /// The exchange of task `me`: it receives into `inbox`, sends through `shm` to the peers on
    /// this host, and learns from `liveness` which peers are gone.
    pub fn new(
        me: TaskId,
        peers: Arc<Peers>,
        liveness: Arc<Liveness>,
        inbox: Arc<Inbox>,
        shm: Arc<Shm>,
        config: &ServerConfig,
    ) -> Self {
        Self {
            me,
            peers,
            liveness,
            chunk_bytes: config.chunk_bytes,
            inbox,
            order: Arc::default(),
            shm,
        }
    }

    /// Starts sending `payload` (row-major bytes of a `meta` tensor) to `to` under `name`, over
    /// the server runtime's connections.
    ///
    /// The send's place in the order of sends to the same (task, name) is taken now, so the
    /// returned future may run on any thread and still deliver in call order. It resolves once the
    /// receiving server holds the whole tensor. A send to this task itself copies into the inbox
    /// at once.
    pub fn send(
        &self,
        to: TaskId,
        name: String,
        meta: TensorMeta,
        payload: Bytes,
    ) -> Result<impl Future<Output = Result<()>> + Send + use<>> {
        self.send_via(&self.peers, to, name, meta, payload)
    }

    /// Like [`Exchange::send`], over `connections`: those of the runtime that will drive the
    /// future (a blocking send drives its own, on the caller runtime).
    pub fn send_via(
        &self,
        connections: &Arc<Peers>,
        to: TaskId,
        name: String,
        meta: TensorMeta,
        payload: Bytes,
    ) -> Result<impl Future<Output = Result<()>> + Send + use<>> {
        self.peers.cluster().require(&to)?;
        check_name(&name)?;
        if meta.byte_len() != Some(payload.len() as u64) {
            return Err(Error::invalid_argument(format!(
                "{} bytes given for a {meta} tensor",
                payload.len(),
            )));
        }
        let key = TensorKey {
            source: self.me.clone(),
            name,
        };
        if to == self.me {
            let reservation = self.inbox.reserve(&key, payload.len() as u64)?;
            let tensor = Tensor {
                meta,
                data: TensorBuf::from_slice(&payload),
            };
            self.inbox.deliver(key, tensor, reservation)?;
            return Ok(Either::Left(std::future::ready(Ok(()))));
        }
        let turn = self.order.take_turn(&to, &key.name);
        let connections = Arc::clone(connections);
        let liveness = Arc::clone(&self.liveness);
        let shm = Arc::clone(&self.shm);
        let chunk = self.chunk_bytes;
        Ok(Either::Right(async move {
            let sending = async {
                let _turn = turn.wait().await;
                let total = payload.len() as u64;
                let header = wire::header(&key, &meta);
                match route::for_tensor(&shm, &connections, &to).await {
                    Some(link) => link.send(&header, &payload).await,
                    None => {
                        let frames = wire::tensor_frames(&header, payload, chunk);
                        push::push(&connections, &to, frames, total).await
                    }
                }
            };
            let sent = liveness.guard(&to, sending).await;
            sent.map_err(|e| e.context(format!("send of {} to {to}", shown_name(&key.name))))
        }))
    }

    /// Receives the next tensor `name` from `source`, waiting up to `timeout` (`None`: no limit)
    /// for it to arrive, unless the source is lost or restarted first (see [`Liveness::lost`]).
    pub async fn recv(
        &self,
        source: TaskId,
        name: String,
        timeout: Option<Duration>,
    ) -> Result<Tensor> {
        self.peers.cluster().require(&source)?;
        check_name(&name)?;
        let key = TensorKey { source, name };
        let take = self.inbox.take(key.clone());
        let timed = within(timeout, format!("no {key}"), take);
        if key.source == self.me {
            return timed.await;
        }
        let received = self.liveness.guard(&key.source, timed).await;
        received.map_err(|e| match e.code {
            Code::Unavailable | Code::Aborted => e.context(format!("recv of {key}")),
            _ => e,
        })
    }

    /// Receives the next tensor `name` from whichever of `sources` sends one first, waiting up
    /// to `timeout`. A source lost or restarted meanwhile is waited on no more; the receive
    /// fails with that error only once no source is left. Nothing is lost to the sources not
    /// taken: a tensor one of them was handed goes back first in line.
    pub async fn recv_any(
        &self,
        sources: Vec<TaskId>,
        name: String,
        timeout: Option<Duration>,
    ) -> Result<(TaskId, Tensor)> {
        check_name(&name)?;
        if sources.is_empty() {
            return Err(Error::invalid_argument("a receive from any of no sources"));
        }
        for source in &sources {
            self.peers.cluster().require(source)?;
        }
        let shown = format!(
            "no {} from any of {} sources",
            shown_name(&name),
            sources.len()
        );
        let mut receives: Vec<_> = sources
            .into_iter()
            .map(|source| {
                let name = name.clone();
                Box::pin(async move {
                    let received = self.recv(source.clone(), name, None).await;
                    (source, received)
                })
            })
            .collect();
        let first = async {
            loop {
                let ((source, received), _, others) = futures::future::select_all(receives).await;
                match received {
                    Ok(tensor) => return Ok((source, tensor)),
                    Err(e) if others.is_empty() => return Err(e),
                    Err(e) if matches!(e.code, Code::Unavailable | Code::Aborted) => {
                        receives = others;
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        within(timeout, shown, first).await
    }

    /// Drops the tensors under names that start with `prefix`, those here and those to come:
    /// the pieces of a collective that failed.
    pub fn abandon(&self, prefix: &str) {
        self.inbox.abandon(prefix);
    }

    /// Which peers are up (see [`Liveness`]).
    pub fn liveness(&self) -> &Arc<Liveness> {
        &self.liveness
    }

    pub fn me(&self) -> &TaskId {
        &self.me
    }

    pub fn peers(&self) -> &Arc<Peers> {
        &self.peers
    }
}
