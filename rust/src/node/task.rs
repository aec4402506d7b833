//! One task's state, shared by its gRPC services and by the calls its user makes.

use std::sync::Arc;
use std::time::Duration;

use tonic::Status;
use tonic::body::Body;
use tonic::metadata::MetadataMap;

use super::devices;
use crate::base::budget::{Peer, Share, Shares, share_of};
use crate::base::cluster::{ServerDef, TaskId};
use crate::base::config::ServerConfig;
use crate::base::errors::{Error, Result, within};
use crate::base::security::Security;
use crate::exchange::Exchange;
use crate::inbox::Inbox;
use crate::ops::collectives::Collectives;
use crate::ops::remote::Operations;
use crate::ops::variables::Variables;
use crate::proto;
use crate::transport::shm::CallServer;
use crate::transport::tls::Tls;
use crate::transport::{Liveness, Peers, Shm};

/// One task's state, shared by its services and by the calls its user makes.
pub struct Task {
    pub def: ServerDef,
    pub config: ServerConfig,
    /// Whom this task admits, and what it presents to its peers.
    pub security: Security,
    /// `security`'s TLS, ready for use.
    pub tls: Option<Tls>,
    /// New at every start, so peers can tell a restarted task from the one they knew.
    pub incarnation: u64,
    /// This task's devices, found once when the server is made.
    pub devices: Vec<proto::DeviceAttributes>,
    pub peers: Arc<Peers>,
    /// Which peers are up, found by heartbeats over `peers`.
    pub liveness: Arc<Liveness>,
    /// The same peers, connected on the server's caller runtime (`Server::caller_runtime`).
    pub caller_peers: Arc<Peers>,
    /// Where tensors sent to this task arrive, by any transport.
    pub inbox: Arc<Inbox>,
    /// The same-host fast path, as sender and as receiver.
    pub shm: Arc<Shm>,
    pub exchange: Arc<Exchange>,
    pub collectives: Arc<Collectives>,
    /// The parameter-server variables this task hosts.
    pub variables: Variables,
    pub operations: Operations,
    /// One permit per call in flight (Worker's and TensorFlow's), `connection_limit` in all.
    pub calls: Arc<tokio::sync::Semaphore>,
    /// What each peer holds of those permits, at most `peer_share` of them.
    callers: Arc<Shares<Peer>>,
}

/// A call's place under the in-flight limits, the task's and its peer's, until dropped.
pub struct CallPermit {
    _task: tokio::sync::OwnedSemaphorePermit,
    _peer: Share<Peer>,
}

impl Task {
    /// The task `def` names; fails only on unusable TLS material.
    pub fn new(def: ServerDef, config: ServerConfig, security: Security) -> Result<Self> {
        let tls = security.tls.clone().map(Tls::new).transpose()?;
        let me = &def.task;
        let incarnation = rand::random::<u64>() | 1;
        let peers = Arc::new(Peers::new(
            def.cluster.clone(),
            &config,
            &security,
            tls.clone(),
        ));
        let inbox = Arc::new(Inbox::new(
            def.cluster.clone(),
            config.max_pending_bytes,
            config.peer_share,
        ));
        let shm = Arc::new(Shm::new(
            me.clone(),
            config.shared_memory,
            config.max_message_bytes,
        ));
        let caller_peers = Arc::new(Peers::new(
            def.cluster.clone(),
            &config,
            &security,
            tls.clone(),
        ));
        let liveness = Arc::new(Liveness::new(
            Arc::clone(&peers),
            std::slice::from_ref(&caller_peers),
            &config,
        ));
        let exchange = Arc::new(Exchange::new(
            me.clone(),
            Arc::clone(&peers),
            Arc::clone(&liveness),
            Arc::clone(&inbox),
            Arc::clone(&shm),
            &config,
        ));
        Ok(Self {
            caller_peers,
            incarnation,
            devices: devices::discover(me),
            calls: Arc::new(tokio::sync::Semaphore::new(config.connection_limit)),
            callers: Shares::new(share_of(config.connection_limit as u64, config.peer_share)),
            operations: Operations::new(me.clone(), &config, Arc::clone(&shm)),
            variables: Variables::new(me.clone(), &config),
            collectives: Arc::new(Collectives::new(incarnation)),
            peers,
            liveness,
            inbox,
            shm,
            exchange,
            def,
            config,
            security,
            tls,
        })
    }

    /// Serves the same-host links of peers on this host: their tensors into the inbox, their
    /// remote operations as calls of this task. Called on the server's runtime, once, at start.
    pub fn serve_same_host(self: &Arc<Self>) {
        let task = Arc::clone(self);
        let calls: CallServer = Arc::new(move |caller, request, timeout| {
            Box::pin(Arc::clone(&task).serve_linked_call(caller, request, timeout))
        });
        self.shm.serve(Arc::clone(&self.inbox), calls);
    }

    /// Ends the task's traffic: every waiting receive and call, sends on same-host links, and
    /// serving of the links; unreceived tensors are dropped and idle shared memory freed.
    pub fn close(&self) {
        self.liveness.close();
        self.inbox.close();
        self.shm.close();
        self.peers.disconnect();
        self.caller_peers.disconnect();
        self.operations.close();
    }

    /// A place for one more call of `peer`, or RESOURCE_EXHAUSTED past the in-flight call limit
    /// or past the peer's share of it (instead of queueing).
    pub fn admit(&self, peer: &Peer) -> Result<CallPermit, Status> {
        let share = self.callers.take(peer, 1).map_err(|held| {
            Status::resource_exhausted(format!(
                "{peer} has {held} calls in flight at task {}, the most one peer may \
                 (peer_share of connection_limit)",
                self.def.task
            ))
        })?;
        let permit = Arc::clone(&self.calls).try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "task {} is serving its limit of {} calls (connection_limit)",
                self.def.task, self.config.connection_limit
            ))
        })?;
        Ok(CallPermit {
            _task: permit,
            _peer: share,
        })
    }

    /// Serves a remote operation that `caller` made through a same-host link: under the same
    /// limit as calls over gRPC, and held to the caller's `timeout`.
    pub async fn serve_linked_call(
        self: Arc<Self>,
        caller: TaskId,
        mut request: proto::CallRequest,
        timeout: Option<Duration>,
    ) -> Result<proto::Value, Error> {
        let _in_flight = self.admit(&Peer::Task(caller.clone()))?;
        // The link proved who calls, whatever the request says.
        request.caller = Some(caller.to_proto());
        let served = self.operations.serve(request, MetadataMap::new(), None);
        within(timeout, "the call did not finish", served).await
    }

    /// Keeps `permit` (the call's place under the limit) until the response body has been handed
    /// to HTTP/2 in full: a call is in flight until its answer is out, so a stop that waits for
    /// calls to drain does not cut off an acknowledgement.
    pub fn until_sent(response: http::Response<Body>, permit: CallPermit) -> http::Response<Body> {
        use http_body_util::BodyExt;
        response.map(|body| {
            Body::new(body.map_frame(move |frame| {
                let _in_flight = &permit;
                frame
            }))
        })
    }

    /// Resolves once no call is in flight.
    pub async fn calls_drained(&self) {
        let all = u32::try_from(self.config.connection_limit).unwrap_or(u32::MAX);
        let _ = self.calls.acquire_many(all).await;
    }
}
