//! One peer's share of a task's budgets: however many calls, connections or pending bytes a
//! task allows in all, one peer may hold at most `peer_share` of them, so a peer that floods or
//! stalls runs out of its own share while the others are still served.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use super::cluster::TaskId;

/// Who a budget is counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Peer {
    /// A task, as its certificate or the same-host link proves it.
    Task(TaskId),
    /// Everything from one address, where nothing proves a task: a task's own certificate is
    /// the only identity a peer cannot forge or multiply by naming other tasks.
    Address(IpAddr),
    /// A connection whose address is not known (not TCP).
    Unknown,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Task(task) => write!(f, "{task}"),
            Peer::Address(address) => write!(f, "the peer at {address}"),
            Peer::Unknown => f.write_str("a peer of unknown address"),
        }
    }
}

/// The most of `total` one peer may hold: `share` of it (a fraction in `(0, 1]`), at least one.
pub fn share_of(total: u64, share: f64) -> u64 {
    ((total as f64 * share).ceil() as u64).clamp(1, total.max(1))
}

/// What each peer holds of one budget, none of them more than `cap`.
pub struct Shares<K> {
    cap: u64,
    held: Mutex<HashMap<K, u64>>,
}

/// `amount` of a budget held by one peer, given back when dropped.
pub struct Share<K: Eq + Hash> {
    shares: Arc<Shares<K>>,
    key: K,
    amount: u64,
}

impl<K: Eq + Hash + Clone> Shares<K> {
    pub fn new(cap: u64) -> Arc<Self> {
        Arc::new(Self {
            cap,
            held: Mutex::new(HashMap::new()),
        })
    }

    pub fn cap(&self) -> u64 {
        self.cap
    }

    /// `amount` more for `key`, or what `key` already holds if that would pass the cap.
    pub fn take(self: &Arc<Self>, key: &K, amount: u64) -> Result<Share<K>, u64> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let now = held.get(key).copied().unwrap_or(0);
        match now.checked_add(amount).filter(|total| *total <= self.cap) {
            Some(total) => {
                held.insert(key.clone(), total);
                Ok(Share {
                    shares: Arc::clone(self),
                    key: key.clone(),
                    amount,
                })
            }
            None => Err(now),
        }
    }

    /// What `key` holds now.
    pub fn held_by(&self, key: &K) -> u64 {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.get(key).copied().unwrap_or(0)
    }
}

impl<K: Eq + Hash> Drop for Share<K> {
    fn drop(&mut self) {
        let mut held = self.shares.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(now) = held.get_mut(&self.key) {
            *now -= self.amount;
            // Peers that hold nothing take no room: the map stays as small as what is held.
            if *now == 0 {
                held.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_holds_at_most_its_cap_and_gets_it_back_when_dropped() {
        let shares = Shares::new(3);
        let a = Peer::Task(TaskId::new("worker", 0));
        let b = Peer::Address("127.0.0.1".parse().unwrap());
        let first = shares.take(&a, 2).unwrap();
        assert_eq!(shares.take(&a, 2).err(), Some(2));
        let other = shares.take(&b, 3).unwrap();
        let second = shares.take(&a, 1).unwrap();
        assert_eq!(shares.held_by(&a), 3);
        drop(first);
        assert_eq!(shares.held_by(&a), 1);
        drop((second, other));
        assert_eq!(shares.held_by(&a), 0);
        assert!(shares.held.lock().unwrap().is_empty());
        assert_eq!(shares.take(&a, u64::MAX).err(), Some(0));
    }

    #[test]
    fn a_share_is_a_fraction_of_the_total_and_never_none() {
        assert_eq!(share_of(512, 0.5), 256);
        assert_eq!(share_of(3, 0.5), 2);
        assert_eq!(share_of(1, 0.01), 1);
        assert_eq!(share_of(100, 1.0), 100);
        assert_eq!(share_of(u64::MAX, 1.0), u64::MAX);
    }
}
