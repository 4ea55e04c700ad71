//! How many resync chunks may be in flight at once: pure bookkeeping, no I/O.
//!
//! A count of chunks alone fits neither end of the range. Eight 1 MiB chunks kept a full sync
//! waiting on the disk between reads; eight 64 KiB chunks (a dirty map of scattered small
//! writes) left the disk and the link idle most of the time: a 1 % resync ran at a third of a
//! full sync's speed. So the window is bounded by chunks and by bytes, and many small chunks may
//! be in flight where few large ones are. While the application has requests in flight the
//! window closes to one chunk: its I/O keeps priority.

/// Chunks in flight while the application is idle, at most.
pub const MAX_CHUNKS: usize = 64;
/// Bytes in flight while the application is idle, at most (the source's read buffers and the
/// frames waiting for the link; the target holds one chunk at a time).
pub const MAX_BYTES: u64 = 32 << 20;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ResyncWindow {
    chunks: usize,
    bytes: u64,
}

impl ResyncWindow {
    /// Whether a chunk of `len` bytes may start now. The first chunk always may, whatever its
    /// size, so the resync always makes progress.
    pub fn admits(&self, len: u64, app_busy: bool) -> bool {
        if self.chunks == 0 {
            return true;
        }
        if app_busy {
            return false;
        }
        self.chunks < MAX_CHUNKS && self.bytes.saturating_add(len) <= MAX_BYTES
    }

    pub fn start(&mut self, len: u64) {
        self.chunks += 1;
        self.bytes = self.bytes.saturating_add(len);
    }

    pub fn finish(&mut self, len: u64) {
        self.chunks = self.chunks.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(len);
    }

    pub fn chunks(&self) -> usize {
        self.chunks
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn small_chunks_fill_by_count_large_ones_by_bytes() {
        let mut w = ResyncWindow::default();
        let mut n = 0;
        while w.admits(64 << 10, false) && n < 1000 {
            w.start(64 << 10);
            n += 1;
        }
        assert_eq!(n, MAX_CHUNKS);

        let mut w = ResyncWindow::default();
        let mut n = 0;
        while w.admits(1 << 20, false) && n < 1000 {
            w.start(1 << 20);
            n += 1;
        }
        assert_eq!(n as u64, MAX_BYTES >> 20);
    }

    #[test]
    fn a_busy_application_leaves_one_chunk() {
        let mut w = ResyncWindow::default();
        assert!(w.admits(1 << 20, true));
        w.start(1 << 20);
        assert!(!w.admits(4096, true));
        assert!(w.admits(4096, false));
        w.finish(1 << 20);
        assert!(w.admits(1 << 20, true));
    }

    #[test]
    fn an_oversized_chunk_still_starts_alone() {
        let w = ResyncWindow::default();
        assert!(w.admits(MAX_BYTES * 4, false));
    }

    proptest! {
        /// Whatever the order of starts and finishes, the window never holds more than its
        /// bounds (beyond the one chunk that may always start) and returns to empty.
        #[test]
        fn bounds_hold(ops in proptest::collection::vec((1u64..(4 << 20), any::<bool>(), any::<bool>()), 1..400)) {
            let mut w = ResyncWindow::default();
            let mut open: Vec<u64> = Vec::new();
            for (len, busy, finish_one) in ops {
                if finish_one && !open.is_empty() {
                    let l = open.remove(0);
                    w.finish(l);
                } else if w.admits(len, busy) {
                    w.start(len);
                    open.push(len);
                }
                let bytes: u64 = open.iter().sum();
                prop_assert_eq!(w.chunks(), open.len());
                prop_assert!(open.len() <= MAX_CHUNKS);
                prop_assert!(open.len() <= 1 || bytes <= MAX_BYTES);
            }
            for l in open.drain(..) {
                w.finish(l);
            }
            prop_assert_eq!(w, ResyncWindow::default());
        }
    }
}
