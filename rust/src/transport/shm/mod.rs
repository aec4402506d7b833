//! The same-host fast path: tensors between tasks of one machine through shared memory.
//!
//! A sender asks a peer over gRPC (`ShmHandshake`, under the cluster's credentials like every
//! call) for the name of its abstract unix socket and a one-time ticket for the sender's process.
//! The sender connects and presents the ticket. Only a process on the same host (and network
//! namespace) can reach an abstract socket, and each side reads the other's credentials from the
//! socket itself (SO_PEERCRED): the peer admits only the process the ticket was for, of its own
//! user, and the sender only the process that answered, of its own user. Nothing a caller names
//! is ever opened. What the link trusts, then: a peer of the same user on the same host that
//! holds the cluster's token (a process of the same user could read this one's memory anyway).
//! From then on tensors to that peer take the [`link`]:
//! small ones inline on the socket, large ones written once into a segment of the receiver's
//! shared memory ([`segment`]) that becomes the received array. gRPC keeps carrying the rest.
//! Which peers take the link is [`super::route`]'s choice.

#[cfg(fuzzing)]
pub mod fuzzing;
mod link;
mod serve;
mod socket;

use std::collections::HashMap;
use std::os::linux::net::SocketAddrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::auth::PeerChannel;
use crate::base::cluster::TaskId;
use crate::base::errors::{Code, Error, Result};
use crate::inbox::Inbox;
use crate::proto;
use crate::proto::worker_client::WorkerClient;
use crate::tensor::segment::SegmentPool;

pub use link::Link;
pub use serve::CallServer;
use serve::Serving;
pub use socket::INLINE_BYTES;
use socket::Socket;

/// How long an accepted connection has to present its ticket.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Tickets handed out and not yet presented, at most (a misbehaving peer cannot grow the table).
const MAX_TICKETS: usize = 1024;

/// How tensors reach one peer.
#[derive(Clone)]
enum Route {
    Shm(Arc<Link>),
    Grpc,
}

/// The routes of one set of connections, that is of one runtime: per peer, its link or gRPC.
#[derive(Default)]
pub struct Links {
    routes: Mutex<HashMap<TaskId, Route>>,
    /// One handshake at a time, so concurrent first sends to a peer make one link.
    dialing: tokio::sync::Mutex<()>,
}

impl Links {
    /// The settled route to `to`, if any: `Some(None)` means gRPC.
    pub fn known(&self, to: &TaskId) -> Option<Option<Arc<Link>>> {
        match self.lock().get(to)? {
            Route::Grpc => Some(None),
            Route::Shm(link) if !link.is_broken() => Some(Some(Arc::clone(link))),
            Route::Shm(_) => None,
        }
    }

    /// Held while a link is dialled.
    pub async fn dialing(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.dialing.lock().await
    }

    /// Settles the route to `to`: over `link`, or gRPC from now on (`None`).
    pub fn settle(&self, to: &TaskId, link: Option<Arc<Link>>) {
        let route = link.map_or(Route::Grpc, Route::Shm);
        self.lock().insert(to.clone(), route);
    }

    /// Closes every link: sends on them fail, and their peers free what they lent.
    pub fn close(&self) {
        let routes = std::mem::take(&mut *self.lock());
        for route in routes.into_values() {
            if let Route::Shm(link) = route {
                link.close();
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<TaskId, Route>> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Tensors sent and received over each transport, for tests and diagnostics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub shm_sent: u64,
    pub grpc_sent: u64,
    pub shm_received: u64,
    /// Remote operations served through links.
    pub shm_calls_served: u64,
}

/// One task's side of the fast path, as sender and as receiver.
pub struct Shm {
    enabled: bool,
    me: TaskId,
    /// This task's abstract socket, bound when the task is made and served once it runs.
    socket_name: String,
    listener: Mutex<Option<std::os::unix::net::UnixListener>>,
    tickets: Mutex<HashMap<Vec<u8>, (TaskId, u32)>>,
    pool: Arc<SegmentPool>,
    shm_sent: AtomicU64,
    grpc_sent: AtomicU64,
    shm_received: Arc<AtomicU64>,
    shm_calls_served: Arc<AtomicU64>,
    /// Bound on a call's request and result over a link, as over gRPC.
    max_message_bytes: usize,
}

impl Shm {
    /// The fast path of task `me`; `enabled: false` keeps every tensor on gRPC, both ways.
    pub fn new(me: TaskId, enabled: bool, max_message_bytes: usize) -> Self {
        let socket_name = format!(
            "distsrv-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        );
        let listener = enabled
            .then(|| {
                std::os::unix::net::SocketAddr::from_abstract_name(socket_name.as_bytes())
                    .and_then(|address| std::os::unix::net::UnixListener::bind_addr(&address))
                    .ok()
            })
            .flatten();
        Self {
            enabled: listener.is_some(),
            me,
            socket_name,
            listener: Mutex::new(listener),
            tickets: Mutex::new(HashMap::new()),
            pool: Arc::default(),
            shm_sent: AtomicU64::new(0),
            grpc_sent: AtomicU64::new(0),
            shm_received: Arc::default(),
            shm_calls_served: Arc::default(),
            max_message_bytes,
        }
    }

    pub fn counts(&self) -> Counts {
        Counts {
            shm_sent: self.shm_sent.load(Ordering::Relaxed),
            grpc_sent: self.grpc_sent.load(Ordering::Relaxed),
            shm_received: self.shm_received.load(Ordering::Relaxed),
            shm_calls_served: self.shm_calls_served.load(Ordering::Relaxed),
        }
    }

    /// Counts a tensor sent over a link (`true`) or over gRPC.
    pub fn count_sent(&self, over_link: bool) {
        let counter = if over_link {
            &self.shm_sent
        } else {
            &self.grpc_sent
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether this task takes the same-host path at all.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The handshake over `channel`, a connection to `to`: the peer names its socket and a
    /// ticket, then we connect to the socket, which only works on the same host.
    pub async fn dial(&self, channel: PeerChannel, to: &TaskId) -> Result<Arc<Link>> {
        let request = proto::ShmHandshakeRequest {
            source: Some(self.me.to_proto()),
            pid: std::process::id(),
        };
        let answer = WorkerClient::new(channel)
            .shm_handshake(request)
            .await
            .map_err(Error::from)?
            .into_inner();
        let address = std::os::unix::net::SocketAddr::from_abstract_name(answer.socket.as_bytes())
            .map_err(|e| Error::failed_precondition(e.to_string()))?;
        let stream = std::os::unix::net::UnixStream::connect_addr(&address)
            .and_then(|stream| {
                stream.set_nonblocking(true)?;
                tokio::net::UnixStream::from_std(stream)
            })
            .map_err(|e| Error::failed_precondition(format!("cannot reach {to}'s socket: {e}")))?;
        let credentials = stream
            .peer_cred()
            .map_err(|e| Error::failed_precondition(e.to_string()))?;
        // SAFETY: getuid cannot fail.
        let uid = unsafe { libc::getuid() };
        if credentials.uid() != uid || credentials.pid() != Some(answer.pid as i32) {
            return Err(Error::failed_precondition(format!(
                "{to}'s socket belongs to another process"
            )));
        }
        let stream = stream
            .into_std()
            .map_err(|e| Error::failed_precondition(format!("cannot take {to}'s socket: {e}")))?;
        Link::open(
            stream,
            to.clone(),
            answer.pid,
            answer.ticket,
            self.max_message_bytes,
        )
        .await
    }

    /// Serves a peer's handshake: hands out a ticket to this task's socket for the process the
    /// peer names. Opens nothing and waits for nothing: the socket's credentials prove the rest.
    pub fn handshake(
        &self,
        request: proto::ShmHandshakeRequest,
    ) -> Result<proto::ShmHandshakeResponse> {
        if !self.enabled {
            return Err(Error::failed_precondition(format!(
                "{} has shared memory off",
                self.me
            )));
        }
        let source = request
            .source
            .as_ref()
            .ok_or_else(|| Error::invalid_argument("the handshake names no source task"))
            .and_then(TaskId::from_proto)?;
        let ticket = rand::random::<[u8; 16]>().to_vec();
        let mut tickets = self.lock_tickets();
        if tickets.len() >= MAX_TICKETS {
            tickets.clear();
        }
        tickets.insert(ticket.clone(), (source, request.pid));
        Ok(proto::ShmHandshakeResponse {
            socket: self.socket_name.clone(),
            ticket,
            pid: std::process::id(),
        })
    }

    /// Accepts links on this task's socket until the runtime stops, serving the remote
    /// operations that come on them with `calls`. Spawned once, at start.
    pub fn serve(self: &Arc<Self>, inbox: Arc<Inbox>, calls: CallServer) {
        let shm = Arc::clone(self);
        let Some(listener) = shm
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        let listener = match listener
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixListener::from_std(listener))
        {
            Ok(listener) => listener,
            Err(_) => return,
        };
        let serving = Arc::new(Serving {
            inbox,
            pool: Arc::clone(&shm.pool),
            received: Arc::clone(&shm.shm_received),
            calls_served: Arc::clone(&shm.shm_calls_served),
            calls,
            max_message_bytes: shm.max_message_bytes,
        });
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let serving = Arc::clone(&serving);
                let shm = Arc::clone(&shm);
                tokio::spawn(async move {
                    let _ = accept(&shm, stream, serving).await;
                });
            }
        });
    }

    /// Stops serving: idle segments freed, the socket no longer served. (The links this task
    /// dialled belong to its [`Peers`], which close them.)
    pub fn close(&self) {
        self.pool.close();
        self.listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }

    fn lock_tickets(&self) -> MutexGuard<'_, HashMap<Vec<u8>, (TaskId, u32)>> {
        self.tickets.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Admits a connection that presents a ticket from a handshake, made by the process that proved
/// itself there, and serves it.
async fn accept(shm: &Shm, stream: tokio::net::UnixStream, serving: Arc<Serving>) -> Result<()> {
    let credentials = stream
        .peer_cred()
        .map_err(|e| Error::unavailable(e.to_string()))?;
    let socket = stream
        .into_std()
        .and_then(Socket::new)
        .map_err(|e| Error::unavailable(e.to_string()))?;
    let mut reader = socket.reader();
    let hello = tokio::time::timeout(HELLO_TIMEOUT, socket::read_hello(&mut reader))
        .await
        .map_err(|_| Error::deadline_exceeded("no hello on the link"))??;
    let (source, pid) = shm
        .lock_tickets()
        .remove(&hello)
        .ok_or_else(|| Error::new(Code::PermissionDenied, "an unknown ticket"))?;
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    if credentials.uid() != uid || credentials.pid() != Some(pid as i32) {
        return Err(Error::new(
            Code::PermissionDenied,
            "the link's process is not the one that shook hands",
        ));
    }
    serve::serve(socket, reader, source, Arc::clone(&serving)).await
}
