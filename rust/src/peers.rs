//! Client connections to the other tasks of the cluster: one HTTP/2 connection per peer, made on
//! first use and shared by every call to that peer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;
use tonic::transport::{Channel, Endpoint};

use crate::cluster::{Cluster, TaskId};
use crate::config::ServerConfig;
use crate::errors::{Error, Result};
use crate::proto;
use crate::proto::worker_client::WorkerClient;

/// HTTP/2 flow-control windows: h2's 64 KiB default stalls a fast link every few frames.
pub const STREAM_WINDOW_BYTES: u32 = 16 << 20;
pub const CONNECTION_WINDOW_BYTES: u32 = 64 << 20;
/// Largest HTTP/2 frame a server accepts (and so a client sends); bigger frames mean fewer per-frame costs for tensor payloads.
pub const MAX_FRAME_BYTES: u32 = 1 << 20;

pub struct Peers {
    cluster: Cluster,
    connect_timeout: Duration,
    /// One cell per task, so calls that find no connection yet wait for one connect instead of
    /// each making its own.
    channels: Mutex<HashMap<TaskId, Arc<OnceCell<Channel>>>>,
}

impl Peers {
    pub fn new(cluster: Cluster, config: &ServerConfig) -> Self {
        Self {
            cluster,
            connect_timeout: config.connect_timeout,
            channels: Mutex::new(HashMap::new()),
        }
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// The connection to `task`, establishing it if needed. Peers start in any order, so a refused
    /// or unresolvable address is retried with backoff until the connect timeout has passed.
    pub async fn channel(&self, task: &TaskId) -> Result<Channel> {
        let address = self.cluster.require(task)?;
        let cell = Arc::clone(self.lock().entry(task.clone()).or_default());
        cell.get_or_try_init(|| self.connect(task, address))
            .await
            .cloned()
    }

    async fn connect(&self, task: &TaskId, address: &str) -> Result<Channel> {
        let endpoint = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| Error::invalid_argument(format!("bad address {address:?}: {e}")))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .initial_stream_window_size(STREAM_WINDOW_BYTES)
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES);
        let deadline = Instant::now() + self.connect_timeout;
        let mut backoff = Duration::from_millis(10);
        let channel = loop {
            match endpoint.connect().await {
                Ok(channel) => break channel,
                Err(_) if Instant::now() + backoff < deadline => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                Err(error) => {
                    return Err(Error::unavailable(format!(
                        "task {task} at {address} is unreachable after {:.1?}: {error}",
                        self.connect_timeout
                    )));
                }
            }
        };
        Ok(channel)
    }

    /// Asks `task` who it is; the answer says it is up, and which incarnation is running.
    pub async fn status(&self, task: &TaskId) -> Result<proto::GetStatusResponse> {
        let channel = self.channel(task).await?;
        let response = WorkerClient::new(channel)
            .get_status(proto::GetStatusRequest {})
            .await
            .map_err(|status| Error::from(status).context(format!("GetStatus of {task}")))?;
        Ok(response.into_inner())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TaskId, Arc<OnceCell<Channel>>>> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }
}
