//! The devices of the whole cluster: every task is asked GetStatus concurrently, so one slow task
//! holds up no other, and a task can be waited for until it answers. A task may also be a stock
//! TensorFlow server, asked at TensorFlow's path, so a mixed cluster can be inspected.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use futures::future::join_all;
use tokio::sync::broadcast;
use tokio::time::Instant;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::task::Task;
use crate::base::cluster::{TaskId, parse_address};
use crate::base::errors::{Error, Result};
use crate::base::retry::{Backoff, with_backoff};
use crate::base::security::Security;
use crate::transport::auth::{Credentials, PeerChannel};
use crate::transport::liveness::{PeerEvent, Presence};
use crate::transport::peers::endpoint;
use crate::transport::status::{TaskStatus, get_status};
use crate::transport::tls::Tls;

/// Every task's status, in cluster order.
pub type Statuses = Vec<(TaskId, TaskStatus)>;
/// A server's gRPC health (`None` where it has no health service) and its status.
pub type HealthAndStatus = (Option<String>, TaskStatus);

/// Pauses between tries at reaching a task that does not answer yet.
const BACKOFF: Backoff = Backoff {
    first: Duration::from_millis(20),
    longest: Duration::from_secs(1),
};

/// What this task says about itself.
fn own_status(task: &Task) -> TaskStatus {
    TaskStatus {
        task: Some(task.def.task.clone()),
        incarnation: task.incarnation,
        version: Some(env!("CARGO_PKG_VERSION").to_owned()),
        devices: task.devices.clone(),
        abandoned_collectives: task.collectives.abandoned(),
    }
}

/// Every task's status in cluster order, all asked at once, each for up to `timeout`; this task
/// answers for itself. Fails with UNAVAILABLE naming every task that did not answer.
pub async fn statuses(task: &Task, timeout: Duration) -> Result<Statuses> {
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
    let connect_timeout = task.config.connect_timeout;
    let answered = with_backoff(deadline, BACKOFF, || async {
        // Each try is bounded, so a peer that accepts but never answers is asked again.
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let limit = left.map_or(connect_timeout, |left| left.min(connect_timeout));
        ask(task, other, limit).await
    });
    Ok(answered.await?.incarnation)
}

/// `other`'s status, or why it gave none within `limit`.
async fn ask(task: &Task, other: &TaskId, limit: Duration) -> Result<TaskStatus> {
    if *other == task.def.task {
        return Ok(own_status(task));
    }
    let attempt = async { get_status(task.peers.channel(other).await?).await };
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

/// The other tasks' comings and goings, as the heartbeats find them, starting with how each
/// is now (see [`crate::transport::liveness`]).
pub struct PeerWatch {
    now: VecDeque<PeerEvent>,
    events: Option<broadcast::Receiver<PeerEvent>>,
    /// The last presence told of each task. A heartbeat's change that lands between subscribing
    /// and reading the presences now is in both; events only ever report a change, so one that
    /// repeats what was last told of its task is that one, told already.
    told: HashMap<TaskId, Presence>,
}

impl PeerWatch {
    /// Starts watching every other task of `task`'s cluster.
    pub fn new(task: &Task) -> Self {
        let events = task.liveness.events();
        let now: VecDeque<PeerEvent> = task
            .liveness
            .watch_all(&task.def.task)
            .into_iter()
            .filter(|(_, presence)| *presence != Presence::Unknown)
            .map(|(task, presence)| PeerEvent {
                task,
                presence,
                previous: None,
            })
            .collect();
        let told = now
            .iter()
            .map(|event| (event.task.clone(), event.presence.clone()))
            .collect();
        Self { now, events, told }
    }

    /// The next change; `None` once the server has stopped. Events a slow reader missed are
    /// skipped.
    pub async fn next(&mut self) -> Option<PeerEvent> {
        if let Some(event) = self.now.pop_front() {
            return Some(event);
        }
        let events = self.events.as_mut()?;
        loop {
            match events.recv().await {
                Ok(event) => {
                    if self.told.get(&event.task) == Some(&event.presence) {
                        continue;
                    }
                    self.told.insert(event.task.clone(), event.presence.clone());
                    return Some(event);
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

/// The status of the server at `address` (`host:port` or `grpc://host:port`), which need not be
/// in any cluster this process knows, and its gRPC health: `None` where it has no health
/// service (a TensorFlow server). Everything within `timeout`.
pub async fn query(
    address: &str,
    timeout: Duration,
    security: &Security,
) -> Result<HealthAndStatus> {
    let address = address.strip_prefix("grpc://").unwrap_or(address);
    parse_address(address)?;
    let tls = security.tls.clone().map(Tls::new).transpose()?;
    let endpoint = endpoint(address, timeout, tls.as_ref())?;
    let asked = async {
        let channel = endpoint.connect().await.map_err(|error| {
            Error::unavailable(format!("cannot reach {address}: {}", causes(&error)))
        })?;
        let channel = Credentials::new(security).on(channel);
        let (health, status) = tokio::join!(health(channel.clone()), get_status(channel));
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

async fn health(channel: PeerChannel) -> Option<String> {
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
