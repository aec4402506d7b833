//! The devices of the whole cluster: every task is asked GetStatus concurrently, so one slow task
//! holds up no other, and a task can be waited for until it answers. A task may also be a stock
//! TensorFlow server, asked at TensorFlow's path, so a mixed cluster can be inspected.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::future::join_all;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::cluster::{TaskId, parse_address};
use crate::errors::{Code, Error, Result};
use crate::proto::worker_client::WorkerClient;
use crate::proto::{self, DeviceAttributes};
use crate::service::Task;
use crate::tfcompat;

/// The longest pause between two tries at reaching a task.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// What a task says about itself.
#[derive(Debug, Clone)]
pub struct TaskStatus {
    /// The task as it names itself (a TensorFlow server: in its devices' names).
    pub task: Option<TaskId>,
    /// New at every start of the task: distsrv's, or a TensorFlow server's first device's.
    pub incarnation: u64,
    /// distsrv's version; `None` for a TensorFlow server.
    pub version: Option<String>,
    pub devices: Vec<DeviceAttributes>,
}

impl TaskStatus {
    fn of(task: &Task) -> Self {
        Self {
            task: Some(task.def.task.clone()),
            incarnation: task.incarnation,
            version: Some(env!("CARGO_PKG_VERSION").to_owned()),
            devices: task.devices.clone(),
        }
    }
}

/// Asks the server behind `channel` for its status: through distsrv's Worker, or, where that
/// service is missing (a stock TensorFlow server), through TensorFlow's WorkerService.
pub async fn status(channel: Channel) -> Result<TaskStatus> {
    let reply = WorkerClient::new(channel.clone())
        .get_status(proto::GetStatusRequest {})
        .await;
    match reply {
        Ok(reply) => {
            let reply = reply.into_inner();
            Ok(TaskStatus {
                task: reply.task.as_ref().map(TaskId::from_proto).transpose()?,
                incarnation: reply.incarnation,
                version: Some(reply.version),
                devices: reply.device_attributes,
            })
        }
        Err(status) if status.code() == Code::Unimplemented => {
            let devices = tfcompat::worker_status(channel).await?.device_attributes;
            Ok(TaskStatus {
                task: devices.first().and_then(|d| task_of_device(&d.name)),
                incarnation: devices.first().map_or(0, |d| d.incarnation),
                version: None,
                devices,
            })
        }
        Err(status) => Err(status.into()),
    }
}

/// The task of a device name: `/job:ps/task:0` of `/job:ps/replica:0/task:0/device:CPU:0`.
pub fn task_of_device(name: &str) -> Option<TaskId> {
    let (prefix, _) = name.split_once("/device:")?;
    TaskId::parse(prefix).ok()
}

/// Every task's status in cluster order, all asked at once, each for up to `timeout`; this task
/// answers for itself. Fails with UNAVAILABLE naming every task that did not answer.
pub async fn statuses(task: &Task, timeout: Duration) -> Result<Vec<(TaskId, TaskStatus)>> {
    let tasks: Vec<TaskId> = task.def.cluster.tasks().collect();
    let answers = join_all(tasks.iter().map(|other| ask(task, other, timeout))).await;
    let total = tasks.len();
    let mut found = Vec::with_capacity(total);
    let mut missing = Vec::new();
    for (other, answer) in tasks.into_iter().zip(answers) {
        match answer {
            Ok(status) => found.push((other, status)),
            Err(error) => missing.push(format!("{other} ({error})")),
        }
    }
    if missing.is_empty() {
        return Ok(found);
    }
    Err(Error::unavailable(format!(
        "{} of {total} tasks did not answer GetStatus: {}",
        missing.len(),
        missing.join("; ")
    )))
}

/// Waits until every task of the cluster answers GetStatus, asking all of them at once and each
/// again with backoff until it does (peers start in any order, and their names may not resolve
/// yet), for up to `timeout` (`None`: without limit). Returns each task's incarnation, which
/// tells a restarted task from the one seen before; fails with DEADLINE_EXCEEDED naming every
/// task that never answered.
pub async fn wait_for_cluster(
    task: &Task,
    timeout: Option<Duration>,
) -> Result<BTreeMap<TaskId, u64>> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let tasks: Vec<TaskId> = task.def.cluster.tasks().collect();
    let answers = join_all(
        tasks
            .iter()
            .map(|other| until_answers(task, other, deadline)),
    )
    .await;
    let total = tasks.len();
    let mut incarnations = BTreeMap::new();
    let mut missing = Vec::new();
    for (other, answer) in tasks.into_iter().zip(answers) {
        match answer {
            Ok(incarnation) => {
                incarnations.insert(other, incarnation);
            }
            Err(error) => missing.push(format!("{other} ({error})")),
        }
    }
    if missing.is_empty() {
        return Ok(incarnations);
    }
    Err(Error::deadline_exceeded(format!(
        "{} of {total} tasks did not answer GetStatus within {:.1?}: {}",
        missing.len(),
        timeout.unwrap_or_default(),
        missing.join("; ")
    )))
}

async fn until_answers(task: &Task, other: &TaskId, deadline: Option<Instant>) -> Result<u64> {
    let left = || deadline.map(|d| d.saturating_duration_since(Instant::now()));
    let mut backoff = Duration::from_millis(20);
    loop {
        // Each try is bounded, so a peer that accepts but never answers is asked again.
        let limit = left().map_or(task.config.connect_timeout, |left| {
            left.min(task.config.connect_timeout)
        });
        let error = match ask(task, other, limit).await {
            Ok(status) => return Ok(status.incarnation),
            Err(error) => error,
        };
        let pause = match left() {
            Some(left) if left.is_zero() => return Err(error),
            Some(left) => left.min(backoff),
            None => backoff,
        };
        tokio::time::sleep(pause).await;
        // No time left for another try: this error says why the task did not answer.
        if left().is_some_and(|left| left.is_zero()) {
            return Err(error);
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// `other`'s status, or why it gave none within `limit`.
async fn ask(task: &Task, other: &TaskId, limit: Duration) -> Result<TaskStatus> {
    if *other == task.def.task {
        return Ok(TaskStatus::of(task));
    }
    let attempt = async { status(task.peers.channel(other).await?).await };
    let status = tokio::time::timeout(limit, attempt)
        .await
        .unwrap_or_else(|_| Err(Error::unavailable(format!("no answer within {limit:.1?}"))))?;
    match &status.task {
        Some(named) if named != other => Err(Error::failed_precondition(format!(
            "the server at its address is {named}, of another cluster"
        ))),
        _ => Ok(status),
    }
}

/// The status of the server at `address` (`host:port` or `grpc://host:port`), which need not be
/// in any cluster this process knows, and its gRPC health: `None` where it has no health
/// service (a TensorFlow server). Everything within `timeout`.
pub async fn query(address: &str, timeout: Duration) -> Result<(Option<String>, TaskStatus)> {
    let address = address.strip_prefix("grpc://").unwrap_or(address);
    parse_address(address)?;
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| Error::invalid_argument(format!("bad address {address:?}: {e}")))?
        .connect_timeout(timeout)
        .tcp_nodelay(true);
    let asked = async {
        let channel = endpoint.connect().await.map_err(|error| {
            Error::unavailable(format!("cannot reach {address}: {}", causes(&error)))
        })?;
        let (health, status) = tokio::join!(health(channel.clone()), status(channel));
        Ok((health, status?))
    };
    tokio::time::timeout(timeout, asked)
        .await
        .unwrap_or_else(|_| {
            Err(Error::unavailable(format!(
                "{address} did not answer within {timeout:.1?}"
            )))
        })
}

async fn health(channel: Channel) -> Option<String> {
    let request = HealthCheckRequest {
        service: String::new(),
    };
    let reply = HealthClient::new(channel).check(request).await.ok()?;
    let status = ServingStatus::try_from(reply.into_inner().status).ok()?;
    Some(status.as_str_name().to_owned())
}

/// An error with its causes, which say more than tonic's "transport error" alone (a cause that
/// repeats its parent's words is left out).
fn causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut last = text.clone();
    let mut cause = error.source();
    while let Some(error) = cause {
        let said = error.to_string();
        if said != last {
            text.push_str(": ");
            text.push_str(&said);
        }
        last = said;
        cause = error.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_name_names_its_task() {
        let name = "/job:worker/replica:0/task:2/device:GPU:1";
        assert_eq!(task_of_device(name), Some(TaskId::new("worker", 2)));
        assert_eq!(task_of_device("/device:CPU:0"), None);
        assert_eq!(task_of_device("nonsense"), None);
    }
}
