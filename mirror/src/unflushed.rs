//! Granules the peer acknowledged but has not flushed yet.
//!
//! A peer acknowledges a mirrored write once it is in its page cache; if the peer then loses
//! power, the write is gone there while the primary has it. When the link drops, the primary
//! cannot tell a crashed process (page cache intact) from a power loss, so it marks these
//! granules dirty. A peer flush (client FLUSH, or the primary's periodic background flush)
//! empties the set, keeping that extra resync small.
//!
//! Two bitmaps alternate: writes mark the active one; a flush switches to the other and, on
//! success, clears the one it covered. Flushes are serialised by the caller.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::metadata::bitmap::{bits_to_bytes, covered_bits, covering_bits, Bits};

pub struct Unflushed {
    sets: [Vec<AtomicU64>; 2],
    active: AtomicUsize,
    nbits: u64,
    granularity: u64,
    size: u64,
}

/// The set a flush covers.
pub struct FlushBatch(usize);

impl Unflushed {
    pub fn new(size: u64, granularity: u64) -> Unflushed {
        let nbits = size.div_ceil(granularity.max(1));
        let words = || (0..nbits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Unflushed {
            sets: [words(), words()],
            active: AtomicUsize::new(0),
            nbits,
            granularity: granularity.max(1),
            size,
        }
    }

    fn bits(&self, i: usize) -> Bits<'_> {
        Bits::new(&self.sets[i], self.nbits)
    }

    /// The granules of a non-empty range inside the volume, by `pick` (covering or covered).
    fn granules(
        &self,
        offset: u64,
        len: u64,
        pick: fn(u64, u64, u64, u64) -> Range<u64>,
    ) -> Option<Range<u64>> {
        let inside = len > 0 && offset.checked_add(len).is_some_and(|e| e <= self.size);
        inside.then(|| pick(offset, len, self.granularity, self.size))
    }

    pub fn mark(&self, offset: u64, len: u64) {
        if let Some(bits) = self.granules(offset, len, covering_bits) {
            self.bits(self.active.load(Ordering::Acquire))
                .set_range(bits);
        }
    }

    /// Marks only the granules the range covers entirely (a resync chunk: a granule it
    /// covers in part was not carried whole).
    pub fn mark_covered(&self, offset: u64, len: u64) {
        if let Some(bits) = self.granules(offset, len, covered_bits) {
            self.bits(self.active.load(Ordering::Acquire))
                .set_range(bits);
        }
    }

    /// Forgets the granules the range touches, in both sets.
    pub fn unmark(&self, offset: u64, len: u64) {
        if let Some(bits) = self.granules(offset, len, covering_bits) {
            for i in 0..2 {
                self.bits(i).clear_range(bits.clone());
            }
        }
    }

    /// Granules in either set.
    pub fn count(&self) -> u64 {
        self.bits(0).count() + self.bits(1).count()
    }

    pub fn is_empty(&self) -> bool {
        self.bits(0).count() == 0 && self.bits(1).count() == 0
    }

    pub fn begin_flush(&self) -> FlushBatch {
        let old = self.active.load(Ordering::Acquire);
        self.active.store(1 - old, Ordering::Release);
        FlushBatch(old)
    }

    pub fn end_flush(&self, b: FlushBatch) {
        self.bits(b.0).clear_all();
    }

    /// The flush failed: keep what it covered.
    pub fn abort_flush(&self, b: FlushBatch) {
        let (from, to) = (&self.sets[b.0], &self.sets[1 - b.0]);
        for (f, t) in from.iter().zip(to) {
            let v = f.swap(0, Ordering::AcqRel);
            if v != 0 {
                t.fetch_or(v, Ordering::AcqRel);
            }
        }
    }

    /// The flush failed on a peer that is still connected: its page cache may have dropped
    /// what the batch covered (a failed fdatasync loses the dirty pages it could not write),
    /// so the caller records these byte ranges as dirty; the batch's set is emptied.
    pub fn fail_flush(&self, b: FlushBatch) -> Vec<(u64, u64)> {
        self.take_ranges(b.0)
    }

    /// The flush succeeded: the byte ranges it covered, taken out of the set (for a caller
    /// that acts on them, where `end_flush` just forgets them).
    pub fn take_flushed(&self, b: FlushBatch) -> Vec<(u64, u64)> {
        self.take_ranges(b.0)
    }

    /// Empties set `i` word by word, each in one atomic step: a writer that read the active
    /// index before a flush switched it may still be setting bits here, and a bit set
    /// between a scan and a separate clear would be wiped without ever being reported.
    fn take_ranges(&self, i: usize) -> Vec<(u64, u64)> {
        let taken: Vec<AtomicU64> = self.sets[i]
            .iter()
            .map(|w| AtomicU64::new(w.swap(0, Ordering::AcqRel)))
            .collect();
        Bits::new(&taken, self.nbits)
            .runs()
            .map(|r| {
                let b = bits_to_bytes(r, self.granularity, self.size);
                (b.start, b.end - b.start)
            })
            .collect()
    }

    /// Byte ranges of every unflushed granule; empties the sets.
    pub fn drain_ranges(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for i in 0..2 {
            out.extend(self.take_ranges(i));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flush_clears_only_what_it_covered() {
        let u = Unflushed::new(1 << 20, 64 << 10);
        u.mark(0, 1);
        let b = u.begin_flush();
        u.mark(128 << 10, 10);
        u.end_flush(b);
        assert_eq!(u.drain_ranges(), vec![(128 << 10, 64 << 10)]);
        assert!(u.is_empty());
    }

    #[test]
    fn a_flush_the_peer_failed_hands_back_only_what_it_covered() {
        let u = Unflushed::new(1 << 20, 64 << 10);
        u.mark(0, 1);
        u.mark(200 << 10, 100 << 10);
        let b = u.begin_flush();
        u.mark(1 << 19, 1);
        assert_eq!(u.fail_flush(b), vec![(0, 64 << 10), (192 << 10, 128 << 10)]);
        assert_eq!(u.drain_ranges(), vec![(1 << 19, 64 << 10)]);
    }

    /// A writer marking while flushes fail: every granule marked (each once) is handed back
    /// by some failed flush or by the final drain, never wiped unreported.
    #[test]
    fn no_mark_is_lost_by_failed_flushes_racing_a_writer() {
        use std::sync::atomic::AtomicBool;
        use std::sync::Arc;
        let granule = 4096u64;
        let nbits = 1u64 << 20;
        let u = Arc::new(Unflushed::new(nbits * granule, granule));
        let done = Arc::new(AtomicBool::new(false));
        let writer = {
            let (u, done) = (u.clone(), done.clone());
            std::thread::spawn(move || {
                for g in 0..nbits {
                    u.mark(g * granule, 1);
                }
                done.store(true, Ordering::Release);
            })
        };
        let mut reported = vec![false; nbits as usize];
        let mut note = |ranges: Vec<(u64, u64)>| {
            for (off, len) in ranges {
                for b in off / granule..(off + len).div_ceil(granule) {
                    reported[b as usize] = true;
                }
            }
        };
        // Bounded: the writer ends after nbits marks.
        for _ in 0..10_000_000 {
            if done.load(Ordering::Acquire) {
                break;
            }
            let b = u.begin_flush();
            note(u.fail_flush(b));
        }
        writer.join().expect("writer");
        note(u.drain_ranges());
        let lost = reported.iter().filter(|r| !**r).count();
        assert_eq!(lost, 0, "{lost} marked granules were never reported");
    }

    #[test]
    fn failed_flush_keeps_everything() {
        let u = Unflushed::new(1 << 20, 64 << 10);
        u.mark(0, 1);
        let b = u.begin_flush();
        u.mark(1 << 19, 1);
        u.abort_flush(b);
        let mut r = u.drain_ranges();
        r.sort();
        assert_eq!(r, vec![(0, 64 << 10), (1 << 19, 64 << 10)]);
    }
}
