//! Tensors that arrived at this task and the receives waiting for them, by (source, name).
//!
//! A transport delivers into the inbox: it reserves an arriving tensor's bytes against
//! `max_pending_bytes` and against its source's share of them (refusing a task outside the
//! cluster, or a tensor past either limit) before it
//! takes the payload in, and delivers the whole tensor once it has arrived intact. A receive takes
//! the oldest tensor under its key, or waits for the next. Nothing delivered is lost: a tensor
//! handed to a receive that gave up meanwhile goes to the next receive, or back first in line.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

use crate::base::budget::{Share, Shares, share_of};
use crate::base::cluster::{Cluster, TaskId};
use crate::base::errors::{Error, Result};
use crate::tensor::{Tensor, TensorKey};

/// Bytes counted against the inbox's limit, and its source's share of it, until dropped.
pub struct Reservation {
    inbox: Arc<Inbox>,
    bytes: u64,
    _share: Share<TaskId>,
}

/// What a held tensor costs the inbox beyond its payload and name (its slot, its place in line,
/// its description), so that tensors of no bytes count against the limit too.
pub const TENSOR_OVERHEAD_BYTES: u64 = 256;

impl Reservation {
    fn new(inbox: &Arc<Inbox>, source: &TaskId, bytes: u64) -> Result<Self> {
        let share = inbox.by_source.take(source, bytes).map_err(|held| {
            Error::resource_exhausted(format!(
                "the receiver holds {held} bytes of unreceived tensors from {source}; {bytes} \
                 more would pass the {} one peer may hold (peer_share of max_pending_bytes)",
                inbox.by_source.cap()
            ))
        })?;
        let limit = inbox.max_pending_bytes;
        inbox
            .pending_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |pending| {
                pending.checked_add(bytes).filter(|total| *total <= limit)
            })
            .map_err(|pending| {
                Error::resource_exhausted(format!(
                    "the receiver holds {pending} bytes of unreceived tensors (with their names \
                     and {TENSOR_OVERHEAD_BYTES} bytes each for bookkeeping); {bytes} more would \
                     pass its limit of {limit} (max_pending_bytes)"
                ))
            })?;
        Ok(Self {
            inbox: Arc::clone(inbox),
            bytes,
            _share: share,
        })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.inbox
            .pending_bytes
            .fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// A tensor that has arrived but not been received; its bytes count as pending until then.
struct Arrived {
    tensor: Tensor,
    _reservation: Reservation,
}

#[derive(Default)]
struct Slot {
    arrived: VecDeque<Arrived>,
    waiting: VecDeque<oneshot::Sender<Arrived>>,
}

struct InboxState {
    slots: HashMap<TensorKey, Slot>,
    /// Name prefixes whose tensors are dropped on arrival (see [`Inbox::abandon`]), the newest
    /// [`ABANDONED_KEPT`].
    abandoned: VecDeque<String>,
    closed: Option<Error>,
}

impl InboxState {
    /// Drops `key`'s slot once nothing is left in it, so that names used once (each step of a
    /// collective has its own, and receives may wait or time out under new ones) do not pile up.
    fn forget_if_empty(&mut self, key: &TensorKey) {
        if self
            .slots
            .get(key)
            .is_some_and(|slot| slot.arrived.is_empty() && slot.waiting.is_empty())
        {
            self.slots.remove(key);
        }
    }
}

/// Abandoned prefixes remembered: a late piece of an older one stays until the server stops.
const ABANDONED_KEPT: usize = 64;

/// Tensors that arrived at this task, by (source, name), and the receives waiting for them.
pub struct Inbox {
    /// The tasks whose tensors are admitted.
    cluster: Cluster,
    state: Mutex<InboxState>,
    /// Outside the lock, so a reservation can be dropped while it is held.
    pending_bytes: AtomicU64,
    max_pending_bytes: u64,
    /// What each source holds of `max_pending_bytes`, at most `peer_share` of it.
    by_source: Arc<Shares<TaskId>>,
}

impl Inbox {
    pub fn new(cluster: Cluster, max_pending_bytes: u64, peer_share: f64) -> Self {
        Self {
            cluster,
            state: Mutex::new(InboxState {
                slots: HashMap::new(),
                abandoned: VecDeque::new(),
                closed: None,
            }),
            pending_bytes: AtomicU64::new(0),
            max_pending_bytes,
            by_source: Shares::new(share_of(max_pending_bytes, peer_share)),
        }
    }

    /// Counts a tensor of `bytes` arriving under `key` against the limit, with its name and
    /// [`TENSOR_OVERHEAD_BYTES`]; refuses it past the limit, past its source's share, or from a
    /// task outside the cluster.
    pub fn reserve(self: &Arc<Self>, key: &TensorKey, bytes: u64) -> Result<Reservation> {
        self.cluster.require(&key.source)?;
        let cost = bytes
            .saturating_add(key.name.len() as u64)
            .saturating_add(TENSOR_OVERHEAD_BYTES);
        Reservation::new(self, &key.source, cost)
    }

    fn lock(&self) -> MutexGuard<'_, InboxState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands a whole arrived tensor to the longest-waiting receive, or keeps it in arrival order.
    /// A waiting receive gets it, and wakes, when the [`Handoff`] is dropped: keep that until the
    /// sender has been answered, so the wake-up is not on the answer's way.
    pub fn deliver(
        self: &Arc<Self>,
        key: TensorKey,
        tensor: Tensor,
        reservation: Reservation,
    ) -> Result<Handoff> {
        let mut state = self.lock();
        if let Some(error) = &state.closed {
            return Err(error.clone());
        }
        let arrived = Arrived {
            tensor,
            _reservation: reservation,
        };
        if state
            .abandoned
            .iter()
            .any(|p| key.name.starts_with(p.as_str()))
        {
            return Ok(Handoff {
                inbox: Arc::clone(self),
                pending: None,
            });
        }
        if let Some(slot) = state.slots.get_mut(&key) {
            // Receives that gave up (timeout, Ctrl-C) are skipped.
            while let Some(waiter) = slot.waiting.pop_front() {
                if !waiter.is_closed() {
                    state.forget_if_empty(&key);
                    return Ok(Handoff {
                        inbox: Arc::clone(self),
                        pending: Some((key, waiter, arrived)),
                    });
                }
            }
        }
        state
            .slots
            .entry(key)
            .or_default()
            .arrived
            .push_back(arrived);
        Ok(Handoff {
            inbox: Arc::clone(self),
            pending: None,
        })
    }

    /// Gives a tensor whose receive gave up before taking it to the next receive waiting, or
    /// else puts it first in line: it came before any tensor now kept.
    fn hand_on(&self, key: TensorKey, mut arrived: Arrived) {
        let mut state = self.lock();
        if state.closed.is_some() {
            return;
        }
        let slot = state.slots.entry(key.clone()).or_default();
        while let Some(waiter) = slot.waiting.pop_front() {
            match waiter.send(arrived) {
                Ok(()) => {
                    state.forget_if_empty(&key);
                    return;
                }
                Err(back) => arrived = back,
            }
        }
        slot.arrived.push_front(arrived);
    }

    /// The next tensor under `key`, as soon as there is one.
    pub async fn take(self: &Arc<Self>, key: TensorKey) -> Result<Tensor> {
        let receiver = {
            let mut state = self.lock();
            if let Some(error) = &state.closed {
                return Err(error.clone());
            }
            let slot = state.slots.entry(key.clone()).or_default();
            if let Some(arrived) = slot.arrived.pop_front() {
                state.forget_if_empty(&key);
                return Ok(arrived.tensor);
            }
            let (sender, receiver) = oneshot::channel();
            slot.waiting.push_back(sender);
            receiver
        };
        let mut waiting = WaitingReceive {
            inbox: Arc::clone(self),
            key,
            receiver: Some(receiver),
        };
        let receiver = waiting.receiver.as_mut().expect("set above");
        match receiver.await {
            Ok(arrived) => {
                waiting.receiver = None;
                Ok(arrived.tensor)
            }
            Err(_) => Err(self
                .lock()
                .closed
                .clone()
                .unwrap_or_else(|| Error::cancelled("the receive was abandoned"))),
        }
    }

    /// Puts back a tensor handed to a receive that gave up before taking it, first in line.
    fn put_back(&self, key: TensorKey, arrived: Arrived) {
        let mut state = self.lock();
        if state.closed.is_none() {
            state
                .slots
                .entry(key)
                .or_default()
                .arrived
                .push_front(arrived);
        }
    }

    /// Drops the receives under `key` that gave up, and the slot once nothing is left in it:
    /// receives that time out again and again under new names must not grow the inbox.
    fn forget_gave_up(&self, key: &TensorKey) {
        let mut state = self.lock();
        if let Some(slot) = state.slots.get_mut(key) {
            slot.waiting.retain(|waiter| !waiter.is_closed());
            state.forget_if_empty(key);
        }
    }

    /// Drops every tensor whose name starts with `prefix`, and those that arrive later (of the
    /// last [`ABANDONED_KEPT`] prefixes): what is left of an operation that failed. Receives
    /// waiting under the prefix keep waiting.
    pub fn abandon(&self, prefix: &str) {
        let mut state = self.lock();
        let mut dropped = Vec::new();
        state.slots.retain(|key, slot| {
            if !key.name.starts_with(prefix) {
                return true;
            }
            dropped.extend(slot.arrived.drain(..));
            !slot.waiting.is_empty()
        });
        if state.abandoned.len() == ABANDONED_KEPT {
            state.abandoned.pop_front();
        }
        state.abandoned.push_back(prefix.to_owned());
        drop(state);
        drop(dropped);
    }

    /// Ends every waiting receive and refuses new tensors; unreceived tensors are dropped.
    pub fn close(&self) {
        let mut state = self.lock();
        state.closed = Some(Error::cancelled("the server is stopping"));
        // Dropping the waiters' senders wakes every waiting receive.
        let slots = std::mem::take(&mut state.slots);
        drop(state);
        drop(slots);
    }
}

/// A tensor delivered to a waiting receive, handed over (waking the receive) when dropped.
pub struct Handoff {
    inbox: Arc<Inbox>,
    pending: Option<(TensorKey, oneshot::Sender<Arrived>, Arrived)>,
}

impl Drop for Handoff {
    fn drop(&mut self) {
        if let Some((key, waiter, arrived)) = self.pending.take()
            && let Err(arrived) = waiter.send(arrived)
        {
            self.inbox.hand_on(key, arrived);
        }
    }
}

/// A receive in progress; if it is dropped (timeout, Ctrl-C) after a tensor was handed to it,
/// the tensor goes back to the inbox instead of being lost.
struct WaitingReceive {
    inbox: Arc<Inbox>,
    key: TensorKey,
    receiver: Option<oneshot::Receiver<Arrived>>,
}

impl Drop for WaitingReceive {
    fn drop(&mut self) {
        if let Some(mut receiver) = self.receiver.take() {
            receiver.close();
            match receiver.try_recv() {
                Ok(arrived) => self.inbox.put_back(self.key.clone(), arrived),
                Err(_) => self.inbox.forget_gave_up(&self.key),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::cluster::TaskId;
    use crate::proto::DataType;
    use crate::tensor::{TensorBuf, TensorMeta};

    fn tensor(byte: u8) -> Tensor {
        Tensor {
            meta: TensorMeta {
                dtype: DataType::DtUint8,
                shape: vec![1],
            },
            data: TensorBuf::from_slice(&[byte]),
        }
    }

    fn inbox_and_key() -> (Arc<Inbox>, TensorKey) {
        let key = TensorKey {
            source: TaskId::new("worker", 0),
            name: "t".to_owned(),
        };
        let cluster = Cluster::new([("worker".into(), [(0, "127.0.0.1:1".into())].into())].into());
        (Arc::new(Inbox::new(cluster.unwrap(), 1 << 20, 1.0)), key)
    }

    fn arrive(inbox: &Arc<Inbox>, key: &TensorKey, byte: u8) -> Handoff {
        let reservation = inbox.reserve(key, 1).unwrap();
        inbox
            .deliver(key.clone(), tensor(byte), reservation)
            .unwrap()
    }

    #[tokio::test]
    async fn an_abandoned_prefix_frees_its_tensors_and_drops_late_ones() {
        let (inbox, key) = inbox_and_key();
        let piece = TensorKey {
            name: "/collective/7/step".to_owned(),
            ..key.clone()
        };
        let cost = |key: &TensorKey| 1 + key.name.len() as u64 + TENSOR_OVERHEAD_BYTES;
        drop(arrive(&inbox, &piece, 1));
        drop(arrive(&inbox, &key, 2));
        let pending = || inbox.pending_bytes.load(Ordering::Acquire);
        assert_eq!(pending(), cost(&piece) + cost(&key));
        inbox.abandon("/collective/7/");
        assert_eq!(pending(), cost(&key));
        drop(arrive(&inbox, &piece, 3));
        assert_eq!(pending(), cost(&key));
        assert_eq!(inbox.take(key).await.unwrap().data.as_slice(), &[2]);
        let late = tokio::time::timeout(std::time::Duration::from_millis(50), inbox.take(piece));
        assert!(late.await.is_err(), "an abandoned piece is not kept");
    }

    #[tokio::test]
    async fn a_receive_that_gives_up_leaves_no_slot_behind() {
        let (inbox, key) = inbox_and_key();
        for serial in 0..100 {
            let key = TensorKey {
                name: format!("never-{serial}"),
                ..key.clone()
            };
            let mut gave_up = Box::pin(inbox.take(key));
            assert!(futures::poll!(&mut gave_up).is_pending());
        }
        assert!(inbox.lock().slots.is_empty());
    }

    #[test]
    fn tensors_of_no_bytes_count_against_the_limit() {
        let (inbox, key) = inbox_and_key();
        let each = key.name.len() as u64 + TENSOR_OVERHEAD_BYTES;
        let mut held = Vec::new();
        while let Ok(reservation) = inbox.reserve(&key, 0) {
            held.push(reservation);
        }
        assert_eq!(held.len() as u64, (1 << 20) / each);
    }

    #[test]
    fn one_source_holds_at_most_its_share_and_the_others_still_arrive() {
        let tasks = [(0, "127.0.0.1:1".into()), (1, "127.0.0.1:2".into())];
        let cluster = Cluster::new([("worker".into(), tasks.into())].into()).unwrap();
        let inbox = Arc::new(Inbox::new(cluster, 1 << 20, 0.5));
        let key = |index| TensorKey {
            source: TaskId::new("worker", index),
            name: "t".to_owned(),
        };
        let half = inbox.reserve(&key(0), 400 << 10).unwrap();
        let Err(refused) = inbox.reserve(&key(0), 200 << 10) else {
            panic!("a source past its share is refused");
        };
        assert_eq!(refused.code, crate::base::errors::Code::ResourceExhausted);
        assert!(
            refused.message.contains("peer_share"),
            "{}",
            refused.message
        );
        let other = inbox.reserve(&key(1), 400 << 10).unwrap();
        drop(half);
        let again = inbox.reserve(&key(0), 200 << 10).unwrap();
        drop((other, again));
        assert_eq!(inbox.pending_bytes.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn a_waiting_receive_gets_its_tensor_when_the_handoff_ends() {
        let (inbox, key) = inbox_and_key();
        let mut waiting = Box::pin(inbox.take(key.clone()));
        assert!(futures::poll!(&mut waiting).is_pending());
        let handoff = arrive(&inbox, &key, 1);
        assert!(futures::poll!(&mut waiting).is_pending());
        drop(handoff);
        assert_eq!(waiting.await.unwrap().data.as_slice(), [1]);
        assert!(
            inbox.lock().slots.is_empty(),
            "a name received leaves no slot"
        );
    }

    #[tokio::test]
    async fn a_tensor_whose_receive_gave_up_meanwhile_goes_to_the_next_in_order() {
        let (inbox, key) = inbox_and_key();
        let mut gave_up = Box::pin(inbox.take(key.clone()));
        assert!(futures::poll!(&mut gave_up).is_pending());
        let first = arrive(&inbox, &key, 1);
        drop(gave_up);
        drop(arrive(&inbox, &key, 2));
        drop(first);
        assert_eq!(inbox.take(key.clone()).await.unwrap().data.as_slice(), [1]);
        assert_eq!(inbox.take(key).await.unwrap().data.as_slice(), [2]);
    }
}
