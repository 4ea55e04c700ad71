//! The activity log's hot set: pure logic, no I/O.
//!
//! An extent is *hot* from the first write that begins in it until it is evicted. Each hot
//! extent counts the writes in flight in it; only an idle extent (no write in flight) can be
//! evicted, least recently used first, once the set holds more than its capacity. A write
//! spanning more extents than the capacity, or a burst that keeps more than the capacity busy,
//! grows the set past its capacity for as long as those writes are in flight: blocking new
//! writes would risk a deadlock for no safety gain.
//!
//! The file layer ([`super::MetadataFile`]) turns this into durable bits: an extent that
//! becomes hot gets its bit set and synced before its write is issued; an evicted extent has
//! its bit cleared lazily, after the next flush of the image.

use std::collections::{BTreeSet, HashMap};
use std::ops::RangeInclusive;

#[derive(Debug, Clone, Copy)]
struct Slot {
    in_flight: u32,
    last_use: u64,
}

/// The hot set.
#[derive(Debug, Clone)]
pub struct ActivityLog {
    capacity: usize,
    tick: u64,
    hot: HashMap<u64, Slot>,
    /// Idle hot extents by last use: eviction candidates, oldest first.
    idle: BTreeSet<(u64, u64)>,
}

/// What [`ActivityLog::begin`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Begin {
    /// Extents that were cold and are now hot (their bits must be durable before the write).
    pub became_hot: Vec<u64>,
    /// Idle extents evicted to make room (their bits may be cleared after the next flush).
    pub evicted: Vec<u64>,
}

impl ActivityLog {
    /// An empty hot set holding up to `capacity` idle extents (at least 1).
    pub fn new(capacity: usize) -> ActivityLog {
        ActivityLog {
            capacity: capacity.max(1),
            tick: 0,
            hot: HashMap::new(),
            idle: BTreeSet::new(),
        }
    }

    /// The capacity.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// A write begins in `extents`.
    pub fn begin(&mut self, extents: RangeInclusive<u64>) -> Begin {
        let mut out = Begin::default();
        for e in extents {
            self.tick += 1;
            match self.hot.get_mut(&e) {
                Some(slot) => {
                    if slot.in_flight == 0 {
                        self.idle.remove(&(slot.last_use, e));
                    }
                    slot.in_flight += 1;
                    slot.last_use = self.tick;
                }
                None => {
                    self.hot.insert(
                        e,
                        Slot {
                            in_flight: 1,
                            last_use: self.tick,
                        },
                    );
                    out.became_hot.push(e);
                }
            }
        }
        self.evict(&mut out.evicted);
        out
    }

    /// A write that began in `extents` has completed. Returns the extents evicted now.
    /// Ending a write that did not begin is ignored.
    pub fn end(&mut self, extents: RangeInclusive<u64>) -> Vec<u64> {
        for e in extents {
            if let Some(slot) = self.hot.get_mut(&e) {
                if slot.in_flight > 0 {
                    slot.in_flight -= 1;
                    if slot.in_flight == 0 {
                        self.idle.insert((slot.last_use, e));
                    }
                }
            }
        }
        let mut evicted = Vec::new();
        self.evict(&mut evicted);
        evicted
    }

    fn evict(&mut self, out: &mut Vec<u64>) {
        while self.hot.len() > self.capacity {
            let Some((_, e)) = self.idle.pop_first() else {
                break;
            };
            self.hot.remove(&e);
            out.push(e);
        }
    }

    /// Whether extent `e` is hot.
    pub fn is_hot(&self, e: u64) -> bool {
        self.hot.contains_key(&e)
    }

    /// Writes in flight in extent `e`.
    pub fn in_flight(&self, e: u64) -> u32 {
        self.hot.get(&e).map_or(0, |s| s.in_flight)
    }

    /// Number of hot extents.
    pub fn len(&self) -> usize {
        self.hot.len()
    }

    /// Whether no extent is hot.
    pub fn is_empty(&self) -> bool {
        self.hot.is_empty()
    }

    /// The hot extents, sorted.
    pub fn hot_extents(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.hot.keys().copied().collect();
        v.sort_unstable();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_evicts_oldest_idle() {
        let mut log = ActivityLog::new(2);
        assert_eq!(log.begin(0..=0).became_hot, vec![0]);
        log.end(0..=0);
        log.begin(1..=1);
        log.end(1..=1);
        // touch 0 again: 1 is now the oldest
        assert!(log.begin(0..=0).became_hot.is_empty());
        log.end(0..=0);
        let b = log.begin(2..=2);
        assert_eq!(b.became_hot, vec![2]);
        assert_eq!(b.evicted, vec![1]);
        assert_eq!(log.hot_extents(), vec![0, 2]);
    }

    #[test]
    fn busy_extents_are_never_evicted() {
        let mut log = ActivityLog::new(1);
        log.begin(0..=0);
        let b = log.begin(1..=2);
        assert!(b.evicted.is_empty());
        assert_eq!(log.len(), 3);
        assert_eq!(log.end(1..=1), vec![1]);
        assert_eq!(log.end(0..=0), vec![0]);
        assert_eq!(log.hot_extents(), vec![2]);
        assert_eq!(log.end(2..=2), Vec::<u64>::new());
        assert_eq!(log.in_flight(2), 0);
    }
}
