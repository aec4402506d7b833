//! Client connections to the other tasks of the cluster, made on first use and shared by every
//! call to that peer: a tonic channel for the generated RPCs, a bare HTTP/2 connection for
//! tensor pushes, and a same-host link where the peer shares this host. A push's request goes
//! from the calling task straight into HTTP/2, headers and payload together, instead of through
//! the channel's buffer task and a body task: each of those hand-offs is a thread wake-up and a
//! socket write of its own, much of a small tensor's time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, OnceCell};
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use super::auth::{Credentials, PeerChannel};
use super::shm::Links;
use super::tls::Tls;
use crate::base::cluster::{Cluster, TaskId, parse_address};
use crate::base::config::ServerConfig;
use crate::base::errors::{Error, Result};
use crate::base::retry::{Backoff, with_backoff};
use crate::base::security::Security;

/// HTTP/2 flow-control windows: h2's 64 KiB default stalls a fast link every few frames.
pub const STREAM_WINDOW_BYTES: u32 = 16 << 20;
pub const CONNECTION_WINDOW_BYTES: u32 = 64 << 20;
/// Largest HTTP/2 frame a server accepts (and so a client sends); bigger frames mean fewer per-frame costs for tensor payloads.
pub const MAX_FRAME_BYTES: u32 = 1 << 20;

/// Bytes a push over TLS gathers before it encrypts: a small tensor and its frames in one record.
const TLS_WRITE_BUFFER: usize = 64 << 10;
/// Encrypted bytes a push over TLS may hold before it must write them: rustls's default of
/// 64 KiB makes a write (and a wake-up of the receiver) per four records; 1 MiB moved 64 MiB
/// tensors 15-20% faster on loopback.
const TLS_SEND_BUFFER: usize = 1 << 20;
/// Pauses between tries at connecting to a peer that is not up yet.
const CONNECT_BACKOFF: Backoff = Backoff {
    first: Duration::from_millis(10),
    longest: Duration::from_millis(500),
};

/// The one way a channel to a server at `address` ("host:port") is configured: over `tls`
/// where given.
pub fn endpoint(address: &str, connect_timeout: Duration, tls: Option<&Tls>) -> Result<Endpoint> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))
        .map_err(|e| Error::invalid_argument(format!("bad address {address:?}: {e}")))?;
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls.client())
            .map_err(|e| Error::invalid_argument(format!("unusable TLS settings: {e}")))?;
    }
    Ok(endpoint
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES))
}

/// An HTTP/2 connection over `io` (TCP, or TLS over TCP), driven by a task of its own, which
/// pings the peer every `peer_timeout` and closes the connection if an answer takes longer, or
/// when told to ([`PushConnection::close`]).
async fn http2<IO>(io: IO, peer_timeout: Duration) -> std::io::Result<PushConnection>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (requests, mut driver) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .handshake(io)
        .await
        .map_err(std::io::Error::other)?;
    let closed = Arc::new(AtomicBool::new(false));
    let ended = Arc::clone(&closed);
    let closing = Arc::new(Notify::new());
    let told_to_close = Arc::clone(&closing);
    let mut pings = driver.ping_pong();
    tokio::spawn(async move {
        let keepalive = async {
            let Some(pings) = pings.as_mut() else {
                return std::future::pending().await;
            };
            loop {
                tokio::time::sleep(peer_timeout).await;
                let answered = tokio::time::timeout(peer_timeout, pings.ping(h2::Ping::opaque()));
                if !matches!(answered.await, Ok(Ok(_))) {
                    return;
                }
            }
        };
        tokio::select! {
            _ = &mut driver => {}
            () = keepalive => {}
            () = told_to_close.notified() => {}
        }
        ended.store(true, Ordering::Release);
    });
    Ok(PushConnection {
        requests,
        closed,
        closing,
    })
}

/// A bare HTTP/2 connection to a peer's server.
#[derive(Clone)]
pub struct PushConnection {
    pub requests: h2::client::SendRequest<bytes::Bytes>,
    /// Set once the connection has ended, so the next push connects again.
    closed: Arc<AtomicBool>,
    /// Wakes the connection's task to end it.
    closing: Arc<Notify>,
}

impl PushConnection {
    /// Ends the connection, failing the pushes on it and dropping what they still queue (bytes
    /// lent by a caller wait for that). Its task ends it the next time its runtime runs it.
    fn close(&self) {
        self.closing.notify_one();
    }
}

pub struct Peers {
    cluster: Cluster,
    connect_timeout: Duration,
    /// What every call to a peer presents.
    credentials: Credentials,
    /// The same, as a header of a push by hand.
    security: Security,
    /// Every connection is TLS with this, where given.
    tls: Option<Tls>,
    /// One cell per task, so calls that find no connection yet wait for one connect instead of
    /// each making its own.
    channels: Mutex<HashMap<TaskId, Arc<OnceCell<Channel>>>>,
    pushes: Mutex<HashMap<TaskId, PushConnection>>,
    /// Same-host links to the peers that share this host (see `shm`).
    links: Links,
    /// A connection silent this long (no answer to an HTTP/2 ping) is closed, failing its calls.
    peer_timeout: Duration,
}

impl Peers {
    pub fn new(
        cluster: Cluster,
        config: &ServerConfig,
        security: &Security,
        tls: Option<Tls>,
    ) -> Self {
        Self {
            tls,
            cluster,
            connect_timeout: config.connect_timeout,
            credentials: Credentials::new(security),
            security: security.clone(),
            channels: Mutex::new(HashMap::new()),
            pushes: Mutex::new(HashMap::new()),
            links: Links::default(),
            peer_timeout: config.peer_timeout,
        }
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// The connection to `task`, establishing it if needed. Peers start in any order, so a refused
    /// or unresolvable address is retried with backoff until the connect timeout has passed.
    pub async fn channel(&self, task: &TaskId) -> Result<PeerChannel> {
        self.channel_within(task, self.connect_timeout).await
    }

    /// Like [`Peers::channel`], trying to connect for `limit` at most (a heartbeat's ask).
    pub async fn channel_within(&self, task: &TaskId, limit: Duration) -> Result<PeerChannel> {
        let address = self.cluster.require(task)?;
        let cell = Arc::clone(self.lock().entry(task.clone()).or_default());
        let channel = cell
            .get_or_try_init(|| async {
                let endpoint = endpoint(address, self.connect_timeout, self.tls.as_ref())?
                    .http2_keep_alive_interval(self.peer_timeout)
                    .keep_alive_timeout(self.peer_timeout)
                    .tcp_keepalive(Some(self.peer_timeout));
                self.retrying(task, address, limit, || endpoint.connect())
                    .await
            })
            .await?;
        Ok(self.credentials.on(channel.clone()))
    }

    /// What a request by hand presents (see [`super::unary`]).
    pub fn security(&self) -> &Security {
        &self.security
    }

    /// The push connection to `task` and the URI of `path` on it, connecting (again, if the last
    /// connection broke) with the same retries as [`Peers::channel`].
    pub async fn push_connection(
        &self,
        task: &TaskId,
        path: &str,
    ) -> Result<(PushConnection, http::Uri)> {
        let address = self.cluster.require(task)?;
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let uri = format!("{scheme}://{address}{path}")
            .parse()
            .map_err(|e| Error::invalid_argument(format!("bad address {address:?}: {e}")))?;
        let cached = self
            .pushes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(task)
            .cloned();
        if let Some(connection) = cached.filter(|c| !c.closed.load(Ordering::Acquire)) {
            return Ok((connection, uri));
        }
        let connect = || async {
            let stream = tokio::net::TcpStream::connect(address).await?;
            stream.set_nodelay(true)?;
            match &self.tls {
                Some(tls) => {
                    let (host, _) = parse_address(address).map_err(std::io::Error::other)?;
                    // TLS writes are not vectored: without a buffer, each slice h2 hands over
                    // (frame heads, a small tensor's payload) would be a record and a write.
                    let mut tls_stream = tls.connect(&host, stream).await?;
                    tls_stream
                        .get_mut()
                        .1
                        .set_buffer_limit(Some(TLS_SEND_BUFFER));
                    let buffered =
                        tokio::io::BufWriter::with_capacity(TLS_WRITE_BUFFER, tls_stream);
                    http2(buffered, self.peer_timeout).await
                }
                None => http2(stream, self.peer_timeout).await,
            }
        };
        let connection = tokio::time::timeout(
            self.connect_timeout,
            self.retrying(task, address, self.connect_timeout, connect),
        )
        .await
        .unwrap_or_else(|_| {
            Err(Error::unavailable(format!(
                "task {task} at {address} is unreachable after {:.1?}",
                self.connect_timeout
            )))
        })?;
        let mut pushes = self.pushes.lock().unwrap_or_else(|e| e.into_inner());
        pushes.insert(task.clone(), connection.clone());
        Ok((connection, uri))
    }

    /// Tries `connect` until it succeeds or `limit` has passed.
    async fn retrying<T, E, F>(
        &self,
        task: &TaskId,
        address: &str,
        limit: Duration,
        connect: impl Fn() -> F,
    ) -> Result<T>
    where
        E: std::fmt::Display,
        F: Future<Output = std::result::Result<T, E>>,
    {
        let deadline = Instant::now() + limit;
        with_backoff(Some(deadline), CONNECT_BACKOFF, connect)
            .await
            .map_err(|error| {
                Error::unavailable(format!(
                    "task {task} at {address} is unreachable after {limit:.1?}: {error}"
                ))
            })
    }

    /// Drops the connections to `task`, so the next call connects anew: those to a peer found
    /// lost or restarted may be dead without knowing it yet.
    pub fn forget(&self, task: &TaskId) {
        self.lock().remove(task);
        let push = self
            .pushes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(task);
        if let Some(push) = push {
            push.close();
        }
    }

    /// The same-host links of these connections (see [`super::route`]).
    pub fn links(&self) -> &Links {
        &self.links
    }

    /// Closes every connection: sends on a same-host link fail at once, and the sockets close
    /// once nothing in flight holds them.
    pub fn disconnect(&self) {
        self.links.close();
        self.lock().clear();
        let pushes = std::mem::take(&mut *self.pushes.lock().unwrap_or_else(|e| e.into_inner()));
        for push in pushes.values() {
            push.close();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TaskId, Arc<OnceCell<Channel>>>> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }
}
