//! Which peers are alive, and as which incarnation.
//!
//! Every peer that something waits on gets one heartbeat, run on the server's runtime however
//! many calls wait on it: GetStatus every [`heartbeat`], each bounded by `peer_timeout`. A peer
//! that answered is `Up` as the incarnation it named; it is `Lost` once it has been silent for
//! `peer_timeout` (a frozen process, a cut link: no answer, no reset) or at once when nothing
//! listens at its address any more (its process is gone). A wait on a peer fails with
//! `Unavailable` when the peer it saw up is lost, and with `Aborted` when the peer comes back as a
//! new incarnation, whose tensors and state are not the old one's. A peer that is not up when the
//! wait begins (not started yet, or restarting) is waited for, like a connect, for up to
//! `connect_timeout`. A peer's answers also name the operations it gave up lately
//! ([`Liveness::abandoned`]), for waits on it that are part of one of them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;

use super::peers::Peers;
use super::status::get_status;
use crate::base::cluster::TaskId;
use crate::base::config::ServerConfig;
use crate::base::errors::{Code, Error, Result};

/// What the heartbeat last found of a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Presence {
    /// No heartbeat has told yet.
    Unknown,
    /// It answered as this incarnation.
    Up(u64),
    /// It stopped answering; `incarnation` is the one last seen up, if any.
    Lost {
        incarnation: Option<u64>,
        why: String,
    },
}

/// A change of a peer's presence, as [`Liveness::events`] tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerEvent {
    pub task: TaskId,
    pub presence: Presence,
    /// The incarnation seen up before this one, for an `Up` that follows another incarnation.
    pub previous: Option<u64>,
}

/// Events kept for a slow reader of [`Liveness::events`] before it misses some.
const EVENTS_KEPT: usize = 1024;

/// How often a watched peer is asked: several times within `peer_timeout`, so that one late
/// answer is not silence, and at most twice a second.
pub fn heartbeat(peer_timeout: Duration) -> Duration {
    (peer_timeout / 8).clamp(Duration::from_millis(25), Duration::from_millis(500))
}

pub struct Liveness {
    /// The server runtime's connections, which the heartbeats use.
    peers: Arc<Peers>,
    /// Every set of connections to the peers (`peers` among them): those to a peer found lost
    /// or restarted are dropped.
    connections: Arc<Vec<Arc<Peers>>>,
    peer_timeout: Duration,
    connect_timeout: Duration,
    /// Where heartbeats run and whom they tell, from the server's start to its stop.
    running: Mutex<Option<Running>>,
    watched: Mutex<HashMap<TaskId, Watched>>,
}

/// What the heartbeat of one peer tells.
#[derive(Clone)]
struct Watched {
    presence: watch::Receiver<Presence>,
    /// The ids of the operations it last said it gave up.
    abandoned: watch::Receiver<Vec<u64>>,
}

struct Running {
    /// The server's runtime. Let go at close: a handle keeps the runtime's descriptors open.
    runtime: Handle,
    /// Dropped at close too, so that readers of events end once the heartbeats end with
    /// their runtime.
    events: broadcast::Sender<PeerEvent>,
}

impl Liveness {
    /// Heartbeats over `peers`; `others` are the other connections this task makes to peers.
    pub fn new(peers: Arc<Peers>, others: &[Arc<Peers>], config: &ServerConfig) -> Self {
        let mut connections = vec![Arc::clone(&peers)];
        connections.extend(others.iter().cloned());
        Self {
            peers,
            connections: Arc::new(connections),
            peer_timeout: config.peer_timeout,
            connect_timeout: config.connect_timeout,
            running: Mutex::new(None),
            watched: Mutex::new(HashMap::new()),
        }
    }

    /// Heartbeats run on `runtime` from now on (the server's, once started).
    pub fn run_on(&self, runtime: Handle) {
        *self.running() = Some(Running {
            runtime,
            events: broadcast::channel(EVENTS_KEPT).0,
        });
    }

    fn running(&self) -> std::sync::MutexGuard<'_, Option<Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `task`'s presence as its heartbeat finds it, starting the heartbeat if `task` had none.
    pub fn watch(&self, task: &TaskId) -> watch::Receiver<Presence> {
        self.watched(task).presence
    }

    fn watched(&self, task: &TaskId) -> Watched {
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(found) = watched.get(task) {
            return found.clone();
        }
        let (tell, presence) = watch::channel(Presence::Unknown);
        let (tell_abandoned, abandoned) = watch::channel(Vec::new());
        let found = Watched {
            presence,
            abandoned,
        };
        // Before the server starts there is nowhere to beat, and after it stops no need: the
        // watch stays unknown.
        if let Some(running) = self.running().as_ref() {
            running.runtime.spawn(beat(
                Arc::clone(&self.connections),
                task.clone(),
                self.peer_timeout,
                Tell {
                    presence: tell,
                    abandoned: tell_abandoned,
                    events: running.events.clone(),
                },
            ));
            watched.insert(task.clone(), found.clone());
        }
        found
    }

    /// Resolves, with `Aborted`, `peer_timeout` after `task` says it gave up operation `id` (a
    /// collective, see `ops::collectives`); never while it does not. The wait lets this task
    /// find for itself first what made `task` give up, where that was a lost peer, which says
    /// more: every heartbeat finds a loss within `peer_timeout`.
    pub async fn abandoned(&self, task: &TaskId, id: u64) -> Error {
        let mut abandoned = self.watched(task).abandoned;
        if abandoned.wait_for(|ids| ids.contains(&id)).await.is_err() {
            return stopped(task);
        }
        tokio::time::sleep(self.peer_timeout).await;
        Error::new(
            Code::Aborted,
            format!("task {task} gave it up: it failed there"),
        )
    }

    /// Every peer's changes of presence from now on ([`Liveness::watch_all`] starts them); none
    /// once closed.
    pub fn events(&self) -> Option<broadcast::Receiver<PeerEvent>> {
        self.running()
            .as_ref()
            .map(|running| running.events.subscribe())
    }

    /// No heartbeat starts from now on, and the events end with those running (the server is
    /// stopping).
    pub fn close(&self) {
        self.running().take();
    }

    /// Watches every task of the cluster but `me`; their presence now.
    pub fn watch_all(&self, me: &TaskId) -> Vec<(TaskId, Presence)> {
        let others: Vec<TaskId> = self.peers.cluster().tasks().filter(|t| t != me).collect();
        others
            .into_iter()
            .map(|task| {
                let presence = self.watch(&task).borrow().clone();
                (task, presence)
            })
            .collect()
    }

    /// `task`'s incarnation once it is up, waiting for it for up to the connect timeout.
    pub async fn incarnation(&self, task: &TaskId) -> Result<u64> {
        self.until_up(task, &mut self.watch(task)).await
    }

    /// The incarnation `presence` shows once `task` is up, within the connect timeout.
    async fn until_up(
        &self,
        task: &TaskId,
        presence: &mut watch::Receiver<Presence>,
    ) -> Result<u64> {
        let deadline = Instant::now() + self.connect_timeout;
        loop {
            if let Presence::Up(incarnation) = *presence.borrow_and_update() {
                return Ok(incarnation);
            }
            tokio::select! {
                changed = presence.changed() => if changed.is_err() {
                    return Err(stopped(task));
                },
                () = tokio::time::sleep_until(deadline) => return Err(self.not_up(task)),
            }
        }
    }

    /// `work`, unless `task` is lost or restarted first (see [`Liveness::lost`]).
    pub async fn guard<T>(
        &self,
        task: &TaskId,
        work: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        tokio::select! {
            // The work first: what it finished stands, even if the peer is gone since.
            biased;
            done = work => done,
            lost = self.lost(task) => Err(lost),
        }
    }

    /// Resolves only when a wait on `task` must end: the incarnation this wait saw up is lost
    /// (`Unavailable`) or replaced (`Aborted`), or `task` is not up within the connect timeout
    /// (`Unavailable`). Never resolves for a peer that stays up.
    pub async fn lost(&self, task: &TaskId) -> Error {
        let mut presence = self.watch(task);
        let seen = match self.until_up(task, &mut presence).await {
            Ok(incarnation) => incarnation,
            Err(error) => return error,
        };
        loop {
            if presence.changed().await.is_err() {
                return stopped(task);
            }
            match &*presence.borrow_and_update() {
                Presence::Up(incarnation) if *incarnation != seen => {
                    return Error::new(
                        Code::Aborted,
                        format!(
                            "task {task} restarted (incarnation {seen:#x} is now \
                             {incarnation:#x}); what the old one had in hand is gone"
                        ),
                    );
                }
                Presence::Lost { why, .. } => {
                    return Error::unavailable(format!("task {task} {why}"));
                }
                Presence::Up(_) | Presence::Unknown => {}
            }
        }
    }

    fn not_up(&self, task: &TaskId) -> Error {
        let address = self.peers.cluster().address(task).unwrap_or("?");
        Error::unavailable(format!(
            "task {task} at {address} is unreachable after {:.1?}",
            self.connect_timeout
        ))
    }
}

/// Whom a heartbeat tells what it finds.
struct Tell {
    presence: watch::Sender<Presence>,
    abandoned: watch::Sender<Vec<u64>>,
    events: broadcast::Sender<PeerEvent>,
}

/// `task`'s heartbeat: runs as long as its runtime.
async fn beat(connections: Arc<Vec<Arc<Peers>>>, task: TaskId, peer_timeout: Duration, tell: Tell) {
    let peers = &connections[0];
    let every = heartbeat(peer_timeout);
    let mut last_up: Option<u64> = None;
    // When the answers stopped: the start of the first failed ask since the last answer.
    let mut silent_since: Option<Instant> = None;
    let mut next = Instant::now();
    loop {
        let asked_at = Instant::now();
        let answer = tokio::time::timeout(peer_timeout, async {
            get_status(peers.channel_within(&task, every).await?).await
        })
        .await;
        let found = match answer {
            Ok(Ok(status)) => {
                silent_since = None;
                tell.abandoned.send_if_modified(|ids| {
                    let news = *ids != status.abandoned_collectives;
                    if news {
                        *ids = status.abandoned_collectives;
                    }
                    news
                });
                Some(Presence::Up(status.incarnation))
            }
            // It answered, if only to refuse: alive, as whichever incarnation it was.
            Ok(Err(error)) if error.code != Code::Unavailable => {
                silent_since = None;
                None
            }
            Ok(Err(error)) => {
                let since = *silent_since.get_or_insert(asked_at);
                if nobody_listens(peers, &task).await {
                    Some(lost(last_up, "is gone: nothing listens at its address"))
                } else if since.elapsed() >= peer_timeout {
                    Some(lost(
                        last_up,
                        &format!("has been unreachable for {peer_timeout:.1?}: {error}"),
                    ))
                } else {
                    None
                }
            }
            Err(_) => Some(lost(
                last_up,
                &format!("did not answer a heartbeat within {peer_timeout:.1?}"),
            )),
        };
        if let Some(found) = found {
            let changed = tell.presence.send_if_modified(|presence| {
                // A lost peer found lost again, for another reason, is no news.
                let still_lost = matches!(
                    (&*presence, &found),
                    (Presence::Lost { .. }, Presence::Lost { .. })
                );
                let differs = *presence != found && !still_lost;
                if differs {
                    *presence = found.clone();
                }
                differs
            });
            if changed {
                let gone = match &found {
                    Presence::Lost { .. } => true,
                    Presence::Up(now) => last_up.is_some_and(|known| known != *now),
                    Presence::Unknown => false,
                };
                if gone {
                    for peers in connections.iter() {
                        peers.forget(&task);
                    }
                }
                let previous = match &found {
                    Presence::Up(incarnation) => last_up.filter(|known| known != incarnation),
                    _ => None,
                };
                match (&found, previous) {
                    (Presence::Up(now), Some(before)) => {
                        log::info!("{task} restarted: incarnation {before:x}, now {now:x}");
                    }
                    (Presence::Up(now), None) => log::info!("{task} is up (incarnation {now:x})"),
                    (Presence::Lost { why, .. }, _) => log::info!("{task} {why}"),
                    (Presence::Unknown, _) => {}
                }
                let _ = tell.events.send(PeerEvent {
                    task: task.clone(),
                    presence: found.clone(),
                    previous,
                });
            }
            if let Presence::Up(incarnation) = found {
                last_up = Some(incarnation);
            }
        }
        next += every;
        let now = Instant::now();
        if next < now {
            next = now;
        }
        tokio::time::sleep_until(next).await;
    }
}

/// The heartbeat ended with its runtime.
fn stopped(task: &TaskId) -> Error {
    Error::cancelled(format!("the wait on {task} ended: the server stopped"))
}

fn lost(incarnation: Option<u64>, why: &str) -> Presence {
    Presence::Lost {
        incarnation,
        why: why.to_owned(),
    }
}

/// Whether `task`'s address refuses connections: proof that its process is gone, where silence
/// proves nothing until `peer_timeout`.
async fn nobody_listens(peers: &Peers, task: &TaskId) -> bool {
    let Ok(address) = peers.cluster().require(task) else {
        return false;
    };
    let tried = tokio::time::timeout(
        Duration::from_secs(1),
        tokio::net::TcpStream::connect(address),
    )
    .await;
    matches!(tried, Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}
