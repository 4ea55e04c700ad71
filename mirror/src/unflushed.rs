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
//!
//! A write is marked only once its acknowledgement is back, which may be after a flush began
//! although the peer applied it before that flush: it lands in the set the flush does not
//! cover. Harmless when the flush succeeds (the next one covers it too), but a failed
//! fdatasync may have dropped its pages. So a failed flush hands back both sets, and a write
//! whose [`SentTicket`] predates a failure is reported stale by [`Unflushed::mark_acked`]: the
//! caller records it as dirty rather than trusting a later flush with it.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::metadata::bitmap::{bits_to_bytes, covered_bits, covering_bits, Bits};

pub struct Unflushed {
    sets: [Vec<AtomicU64>; 2],
    active: AtomicUsize,
    /// Peer flushes that failed so far (bumped before a failed flush takes the sets).
    failures: AtomicU64,
    nbits: u64,
    granularity: u64,
    size: u64,
}

/// The set a flush covers.
pub struct FlushBatch(usize);

/// Taken before a write is sent to the peer: which flush failures it has seen.
#[derive(Clone, Copy)]
pub struct SentTicket(u64);

impl Unflushed {
    pub fn new(size: u64, granularity: u64) -> Unflushed {
        let nbits = size.div_ceil(granularity.max(1));
        let words = || (0..nbits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Unflushed {
            sets: [words(), words()],
            active: AtomicUsize::new(0),
            failures: AtomicU64::new(0),
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

    fn mark(&self, offset: u64, len: u64) {
        if let Some(bits) = self.granules(offset, len, covering_bits) {
            self.bits(self.active.load(Ordering::Acquire))
                .set_range(bits);
        }
    }

    /// Marks only the granules the range covers entirely (a resync chunk: a granule it
    /// covers in part was not carried whole).
    fn mark_covered(&self, offset: u64, len: u64) {
        if let Some(bits) = self.granules(offset, len, covered_bits) {
            self.bits(self.active.load(Ordering::Acquire))
                .set_range(bits);
        }
    }

    /// Take before sending a write whose acknowledgement will be marked here.
    pub fn ticket(&self) -> SentTicket {
        SentTicket(self.failures.load(Ordering::SeqCst))
    }

    /// Marks a write the peer acknowledged. `false`: a peer flush failed since the write was
    /// sent, which may have covered it and lost it; the caller must record it as dirty (the
    /// mark made here is then harmless). Marks before it checks: a failure that the check
    /// misses took the sets after this mark, so it handed the mark back.
    pub fn mark_acked(&self, offset: u64, len: u64, sent: SentTicket) -> bool {
        self.mark(offset, len);
        self.failures.load(Ordering::SeqCst) == sent.0
    }

    /// [`Self::mark_covered`] for an acknowledged resync chunk; `false` (a peer flush failed
    /// since it was sent): the mark is withdrawn, so no later flush settles the chunk.
    pub fn mark_covered_acked(&self, offset: u64, len: u64, sent: SentTicket) -> bool {
        self.mark_covered(offset, len);
        let fresh = self.failures.load(Ordering::SeqCst) == sent.0;
        if !fresh {
            self.unmark(offset, len);
        }
        fresh
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

    /// The flush failed: the peer's page cache may have dropped what it covered (a failed
    /// fdatasync loses the dirty pages it could not write), and that may include writes
    /// marked in the other set after the flush began (see the module doc). Both sets are
    /// emptied and their byte ranges returned, for the caller to record as dirty; writes
    /// still on their way are caught by their ticket.
    pub fn fail_flush(&self, b: FlushBatch) -> Vec<(u64, u64)> {
        self.failures.fetch_add(1, Ordering::SeqCst);
        let mut out = self.take_ranges(b.0);
        out.extend(self.take_ranges(1 - b.0));
        out
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

    /// A write the peer applied before a flush can be marked after the flush began, in the
    /// set that flush does not cover: a failed flush hands it back all the same.
    #[test]
    fn a_failed_flush_hands_back_writes_marked_while_it_ran() {
        let u = Unflushed::new(1 << 20, 64 << 10);
        u.mark(0, 1);
        u.mark(200 << 10, 100 << 10);
        let b = u.begin_flush();
        u.mark(1 << 19, 1);
        assert_eq!(
            u.fail_flush(b),
            vec![(0, 64 << 10), (192 << 10, 128 << 10), (1 << 19, 64 << 10)]
        );
        assert!(u.is_empty());
    }

    /// A write sent before a flush failed but acknowledged (marked) after the failure: the
    /// failure may have lost it, so it is reported stale; one sent after is not.
    #[test]
    fn a_write_in_flight_across_a_failed_flush_is_stale() {
        let u = Unflushed::new(1 << 20, 64 << 10);
        let before = u.ticket();
        let b = u.begin_flush();
        assert!(u.fail_flush(b).is_empty());
        assert!(!u.mark_acked(0, 1, before));
        let after = u.ticket();
        assert!(u.mark_acked(1 << 19, 1, after));

        // A resync chunk in the same position is withdrawn, so no later flush settles it.
        let chunk_sent = u.ticket();
        let b = u.begin_flush();
        drop(u.fail_flush(b));
        assert!(!u.mark_covered_acked(128 << 10, 128 << 10, chunk_sent));
        let b = u.begin_flush();
        assert!(u.take_flushed(b).is_empty());
    }

    /// A writer sends (takes a ticket) and marks while flushes fail and succeed in turn.
    /// A write is at risk from a failed flush when it was sent before that failure was known
    /// and no success that began after its acknowledgement ended before the failure began (then the failed
    /// fdatasync may have dropped it). Every write at risk must be handed back by a failed
    /// flush or reported stale by its mark, never left for a later success to clear.
    #[test]
    fn no_write_escapes_a_failed_flush() {
        use std::sync::atomic::AtomicBool;
        use std::sync::Arc;
        let granule = 4096u64;
        let nwrites = 1usize << 16;
        let u = Arc::new(Unflushed::new(nwrites as u64 * granule, granule));
        let clock = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let writer = {
            let (u, done, clock) = (u.clone(), done.clone(), clock.clone());
            std::thread::spawn(move || {
                // (sent stamp, acknowledged stamp, stale) per write.
                let mut log = Vec::with_capacity(nwrites);
                for g in 0..nwrites {
                    // The frame leaves after its ticket is taken.
                    let t = u.ticket();
                    let sent = clock.fetch_add(1, Ordering::SeqCst);
                    if g % 8 == 0 {
                        // Widen the window between send and acknowledgement.
                        for _ in 0..2_000 {
                            std::hint::spin_loop();
                        }
                    }
                    let acked = clock.fetch_add(1, Ordering::SeqCst);
                    let fresh = u.mark_acked(g as u64 * granule, 1, t);
                    log.push((sent, acked, !fresh));
                }
                done.store(true, Ordering::Release);
                log
            })
        };
        let mut reported = vec![false; nwrites];
        // Successes: (began, ended); failures: (began, failure known), in order.
        let (mut successes, mut failures) = (Vec::new(), Vec::new());
        // Bounded: the writer ends after nwrites marks.
        for i in 0..10_000_000u64 {
            if done.load(Ordering::Acquire) {
                break;
            }
            // The flush request leaves after the switch.
            let b = u.begin_flush();
            let began = clock.fetch_add(1, Ordering::SeqCst);
            if i % 2 == 0 {
                failures.push((began, clock.fetch_add(1, Ordering::SeqCst)));
                for (off, len) in u.fail_flush(b) {
                    for g in off / granule..(off + len).div_ceil(granule) {
                        reported[g as usize] = true;
                    }
                }
            } else {
                u.end_flush(b);
                successes.push((began, clock.fetch_add(1, Ordering::SeqCst)));
            }
        }
        let log = writer.join().expect("writer");
        let mut at_risk = 0;
        for (g, &(sent, acked, stale)) in log.iter().enumerate() {
            // The first failure known after the write was sent.
            let Some(&(fail_began, _)) = failures.iter().find(|f| f.1 > sent) else {
                continue;
            };
            let flushed_before = successes.iter().any(|&(b, e)| b > acked && e < fail_began);
            if !flushed_before {
                at_risk += 1;
                assert!(
                    reported[g] || stale,
                    "write {g} (sent at {sent}, acknowledged at {acked}) escaped a failed flush"
                );
            }
        }
        assert!(at_risk > 0, "no failure raced the writer");
    }

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
}
