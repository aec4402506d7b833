//! A task's server: binds its address at construction, serves gRPC on its own runtime once
//! started, and stops gracefully within a bounded time.
//!
//! Lifecycle: created -> running -> closing -> closed, or failed when serving could not start.

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use tokio::runtime::Runtime;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use super::service;
use super::task::Task;
use crate::base::budget::{Peer, Shares};
use crate::base::cluster::{Cluster, ServerDef, TaskId, format_address, parse_address};
use crate::base::config::ServerConfig;
use crate::base::errors::{Error, Result};
use crate::base::files::raise_open_file_limit;
use crate::base::security::Security;
use crate::transport::inbound::Inbound;

pub const PROTOCOL: &str = "grpc";

/// After the last call's answer is handed to HTTP/2, how long a stop lets it flush before
/// closing connections.
const FLUSH_AFTER_DRAIN: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Closing,
    Closed,
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Closing => "closing",
            Status::Closed => "closed",
            Status::Failed => "failed",
        }
    }

    fn is_final(self) -> bool {
        matches!(self, Status::Closed | Status::Failed)
    }
}

/// What exists only while serving; dropping it in `stop` ends every thread it started.
struct Serving {
    runtime: Runtime,
    /// See [`Server::caller_runtime`]; threads in the middle of a call hold it a moment longer.
    caller_runtime: Arc<Runtime>,
    shutdown: oneshot::Sender<()>,
    serve: JoinHandle<()>,
    health: HealthReporter,
}

struct State {
    status: Status,
    /// Bound at construction so a port in use is reported at once; taken by `start`.
    listener: Option<TcpListener>,
    serving: Option<Serving>,
    failure: Option<Error>,
}

struct Lifecycle {
    state: Mutex<State>,
    changed: Condvar,
}

impl Lifecycle {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the state consistent (every update is one
        // assignment), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, state: &mut State, status: Status) {
        state.status = status;
        self.changed.notify_all();
    }
}

pub struct Server {
    task: Arc<Task>,
    local_addr: SocketAddr,
    lifecycle: Arc<Lifecycle>,
}

impl Server {
    /// Binds this task's address from the cluster (port 0 picks a free port). Nothing runs until
    /// [`Server::start`].
    pub fn bind(def: ServerDef, config: ServerConfig, security: Security) -> Result<Self> {
        config.validate()?;
        if def.protocol != PROTOCOL {
            return Err(Error::invalid_argument(format!(
                "unknown protocol {:?}: distsrv speaks \"grpc\"",
                def.protocol
            )));
        }
        raise_open_file_limit();
        let address = def.cluster.require(&def.task)?.to_owned();
        let (host, spec_port) = parse_address(&address)?;
        let port = if def.port != 0 { def.port } else { spec_port };
        let listener = bind_listener(&host, port)?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| Error::internal(format!("cannot read the bound address: {e}")))?;
        let bound = format_address(&host, local_addr.port());
        let def = ServerDef {
            cluster: def.cluster.with_address(&def.task, bound),
            port: local_addr.port(),
            ..def
        };
        Ok(Self {
            task: Arc::new(Task::new(def, config, security)?),
            local_addr,
            lifecycle: Arc::new(Lifecycle {
                state: Mutex::new(State {
                    status: Status::Created,
                    listener: Some(listener),
                    serving: None,
                    failure: None,
                }),
                changed: Condvar::new(),
            }),
        })
    }

    pub fn task(&self) -> &Arc<Task> {
        &self.task
    }

    /// The definition with the real bound port in both the cluster and `port`.
    pub fn server_def(&self) -> &ServerDef {
        &self.task.def
    }

    pub fn task_id(&self) -> &TaskId {
        &self.task.def.task
    }

    pub fn cluster(&self) -> &Cluster {
        &self.task.def.cluster
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn status(&self) -> Status {
        self.lifecycle.lock().status
    }

    /// Starts serving. Idempotent while running; a closed or failed server cannot restart.
    pub fn start(&self) -> Result<()> {
        let mut state = self.lifecycle.lock();
        match state.status {
            Status::Running => return Ok(()),
            Status::Closing | Status::Closed => {
                return Err(Error::failed_precondition(format!(
                    "server {} is closed; create a new one",
                    self.task_id()
                )));
            }
            Status::Failed => return Err(state.failure.clone().expect("failed has a failure")),
            Status::Created => {}
        }
        let listener = state
            .listener
            .take()
            .expect("a created server holds its listener");
        match self.serve(listener) {
            Ok(serving) => {
                state.serving = Some(serving);
                self.lifecycle.set(&mut state, Status::Running);
                // Logged with no lock held: a record may wait for Python's GIL, which a thread
                // waiting for this lock may hold.
                drop(state);
                let address = self.server_def().cluster.address(self.task_id());
                log::info!("{} serving at {}", self.task_id(), address.unwrap_or("?"));
                Ok(())
            }
            Err(error) => {
                state.failure = Some(error.clone());
                self.lifecycle.set(&mut state, Status::Failed);
                Err(error)
            }
        }
    }

    fn serve(&self, listener: TcpListener) -> Result<Serving> {
        let config = &self.task.config;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.worker_threads)
            .thread_name(format!("distsrv{}", self.task_id()))
            .enable_all()
            .build()
            .map_err(|e| Error::internal(format!("cannot start the server's runtime: {e}")))?;
        let caller_runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::internal(format!("cannot start the callers' runtime: {e}")))?;
        let (shutdown, shutdown_signal) = oneshot::channel::<()>();
        let (health, serve) = {
            let _entered = runtime.enter();
            let listener = tokio::net::TcpListener::from_std(listener)
                .map_err(|e| Error::internal(format!("cannot serve the listener: {e}")))?;
            let greet_within = config.peer_timeout;
            let connections = Shares::new(config.max_connections_per_address as u64);
            let incoming = TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .try_filter_map(move |stream| {
                    let peer = stream
                        .peer_addr()
                        .map_or(Peer::Unknown, |address| Peer::Address(address.ip()));
                    // Past its address's limit, the connection is dropped (closed) unserved.
                    let admitted = connections
                        .take(&peer, 1)
                        .ok()
                        .map(|share| Inbound::new(stream, share, greet_within));
                    std::future::ready(Ok(admitted))
                });
            let (health, router) = service::router(&self.task)?;
            self.task.serve_same_host();
            self.task.liveness.run_on(runtime.handle().clone());
            let lifecycle = Arc::clone(&self.lifecycle);
            let serve = runtime.spawn(async move {
                let served = router
                    .serve_with_incoming_shutdown(incoming, async {
                        let _ = shutdown_signal.await;
                    })
                    .await;
                if let Err(error) = served {
                    let mut state = lifecycle.lock();
                    state.failure = Some(Error::internal(format!("serving failed: {error}")));
                    lifecycle.set(&mut state, Status::Failed);
                }
            });
            (health, serve)
        };
        runtime.block_on(set_health(&health, ServingStatus::Serving));
        Ok(Serving {
            runtime,
            caller_runtime: Arc::new(caller_runtime),
            shutdown,
            serve,
            health,
        })
    }

    /// Stops gracefully: reports NOT_SERVING, stops accepting, lets in-flight calls finish for
    /// up to `grace` (the config's `shutdown_grace` when `None`), then cuts off the rest. Returns
    /// once the port is free. Safe to call more than once and from several threads.
    pub fn stop(&self, grace: Option<Duration>) {
        let serving = {
            let mut state = self.lifecycle.lock();
            match state.status {
                Status::Created => {
                    state.listener = None;
                    self.lifecycle.set(&mut state, Status::Closed);
                    return;
                }
                Status::Running => {
                    // Sends on same-host links fail now rather than at the runtime's end.
                    self.task.close();
                    self.lifecycle.set(&mut state, Status::Closing);
                    state.serving.take()
                }
                // A server whose serving failed still owns a runtime to shut down.
                Status::Failed => state.serving.take(),
                Status::Closing | Status::Closed => None,
            }
        };
        let Some(serving) = serving else {
            self.wait(None);
            return;
        };
        let grace = grace.unwrap_or(self.task.config.shutdown_grace);
        let Serving {
            runtime,
            caller_runtime,
            shutdown,
            mut serve,
            health,
        } = serving;
        drop(caller_runtime);
        let task = Arc::clone(&self.task);
        runtime.block_on(async {
            set_health(&health, ServingStatus::NotServing).await;
            let _ = shutdown.send(());
            // Wait for the calls in flight, not for idle connections: one that never even
            // finished its HTTP/2 handshake would otherwise hold the whole grace. Once the last
            // answer is handed over, a moment lets it reach the socket.
            let drained = async {
                task.calls_drained().await;
                tokio::time::sleep(FLUSH_AFTER_DRAIN).await;
            };
            tokio::select! {
                _ = &mut serve => {}
                _ = drained => {}
                _ = tokio::time::sleep(grace) => {}
            }
            serve.abort();
        });
        runtime.shutdown_timeout(Duration::from_secs(1));
        // Again, for connections made while calls drained.
        self.task.peers.disconnect();
        self.task.caller_peers.disconnect();
        let mut state = self.lifecycle.lock();
        if state.status == Status::Closing {
            self.lifecycle.set(&mut state, Status::Closed);
            drop(state); // as at start, logged with no lock held
            log::info!("{} stopped", self.task_id());
        }
    }

    /// Waits until the server is closed or failed; `None` waits without limit. Returns whether it
    /// has stopped.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut state = self.lifecycle.lock();
        while !state.status.is_final() {
            state = match deadline {
                None => self
                    .lifecycle
                    .changed
                    .wait(state)
                    .unwrap_or_else(|e| e.into_inner()),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return false;
                    }
                    self.lifecycle
                        .changed
                        .wait_timeout(state, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
        true
    }

    /// A runtime handle while running, for callers that drive client calls on it.
    pub fn runtime(&self) -> Result<tokio::runtime::Handle> {
        let state = self.lifecycle.lock();
        match &state.serving {
            Some(serving) => Ok(serving.runtime.handle().clone()),
            None => Err(Error::failed_precondition(format!(
                "server {} is {}, not running",
                self.task_id(),
                state.status.as_str()
            ))),
        }
    }
}

impl Server {
    /// A runtime for blocking calls of remote operations, driven by the threads that make them
    /// (with `Runtime::block_on`, which lets one calling thread at a time run its I/O): a lone
    /// caller writes its request and reads the answer itself, with no hand-off to another thread
    /// either way. Its connections are [`Task::caller_peers`]; a stop cancels its calls.
    pub fn caller_runtime(&self) -> Result<Arc<Runtime>> {
        let state = self.lifecycle.lock();
        match &state.serving {
            Some(serving) => Ok(Arc::clone(&serving.caller_runtime)),
            None => Err(Error::failed_precondition(format!(
                "server {} is {}, not running",
                self.task_id(),
                state.status.as_str()
            ))),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop(Some(Duration::ZERO));
    }
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health
        .set_service_status(service::WORKER_SERVICE_NAME, status)
        .await;
}

/// Binds `host:port`; the host must resolve to an address of this machine. Only the given host
/// is bound (all interfaces only for `0.0.0.0` / `::`).
fn bind_listener(host: &str, port: u16) -> Result<TcpListener> {
    let candidates: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| Error::unavailable(format!("cannot resolve {host:?}: {e}")))?
        .collect();
    let mut last_error = None;
    for candidate in &candidates {
        match TcpListener::bind(candidate) {
            Ok(listener) => {
                listener.set_nonblocking(true).map_err(|e| {
                    Error::internal(format!("cannot make the listener non-blocking: {e}"))
                })?;
                return Ok(listener);
            }
            Err(error) => last_error = Some(error),
        }
    }
    let why = last_error.map_or_else(|| "no address to bind".to_owned(), |e| e.to_string());
    Err(Error::unavailable(format!(
        "cannot listen on {}: {why}",
        format_address(host, port)
    )))
}
