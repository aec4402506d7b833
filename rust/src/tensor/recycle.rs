//! The bounded "keep the newest, evict the oldest" store behind every pool of tensor memory:
//! freed heap buffers, idle shared segments, and a sender's mappings of a peer's segments.

use std::collections::VecDeque;

/// Items oldest first, at most `max_items` of them and `max_bytes` in all: keeping one past
/// either bound evicts the oldest. The newest are the likeliest to be wanted again.
pub struct Recycler<T> {
    items: VecDeque<T>,
    bytes: usize,
    max_items: usize,
    max_bytes: usize,
    size_of: fn(&T) -> usize,
}

impl<T> Recycler<T> {
    pub const fn new(max_items: usize, max_bytes: usize, size_of: fn(&T) -> usize) -> Self {
        Self {
            items: VecDeque::new(),
            bytes: 0,
            max_items,
            max_bytes,
            size_of,
        }
    }

    /// Keeps `item` as the newest; returns what that evicted (or `item` itself, if it alone is
    /// over the byte bound), for the caller to drop outside its lock.
    pub fn keep(&mut self, item: T) -> Vec<T> {
        if (self.size_of)(&item) > self.max_bytes {
            return vec![item];
        }
        self.bytes += (self.size_of)(&item);
        self.items.push_back(item);
        let mut evicted = Vec::new();
        while self.items.len() > self.max_items || self.bytes > self.max_bytes {
            let oldest = self.items.pop_front().expect("over a bound, so not empty");
            self.bytes -= (self.size_of)(&oldest);
            evicted.push(oldest);
        }
        evicted
    }

    /// Takes out the newest item that `fits`.
    pub fn take(&mut self, fits: impl Fn(&T) -> bool) -> Option<T> {
        let index = self.items.iter().rposition(fits)?;
        let item = self.items.remove(index).expect("a found index");
        self.bytes -= (self.size_of)(&item);
        Some(item)
    }

    /// The newest item that `matches`, left in place.
    pub fn find(&self, matches: impl Fn(&T) -> bool) -> Option<&T> {
        self.items.iter().rev().find(|item| matches(item))
    }

    /// Takes out everything.
    pub fn drain(&mut self) -> VecDeque<T> {
        self.bytes = 0;
        std::mem::take(&mut self.items)
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_go_first_past_either_bound() {
        let mut kept = Recycler::new(3, 10, |n: &usize| *n);
        assert!(kept.keep(4).is_empty());
        assert!(kept.keep(4).is_empty());
        assert_eq!(kept.keep(3), [4], "past 10 bytes");
        assert!(kept.keep(0).is_empty());
        assert_eq!(kept.keep(1), [4], "past 3 items");
        assert_eq!(kept.keep(11), [11], "larger than the whole bound");
        assert_eq!(kept.take(|n| *n < 3), Some(1), "the newest that fits");
        assert_eq!(kept.find(|n| *n == 3), Some(&3));
        assert_eq!(kept.drain(), [3, 0]);
        assert!(kept.is_empty());
    }
}
