//! Pure bit math over a slice of atomic 64-bit words (the layout of rust-vmm's
//! `AtomicBitmap`): concurrent writers set bits with `fetch_or`, without a lock.
//!
//! On disk, bit `i` is bit `i % 64` of little-endian word `i / 64`. Words are kept in memory
//! in their on-disk byte order (`to_le`/`from_le` around every access, free on little-endian
//! hosts), so the same code works over a memory-mapped file and over an owned copy.
//!
//! Also here: the mapping of byte ranges of the volume to bit ranges.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

/// A view of `nbits` bits stored in `words` (bits past `nbits` are ignored).
#[derive(Clone, Copy)]
pub struct Bits<'a> {
    words: &'a [AtomicU64],
    nbits: u64,
}

/// An owned bitmap (tests, read-only snapshots).
pub struct OwnedBits {
    words: Vec<AtomicU64>,
    nbits: u64,
}

impl OwnedBits {
    /// `nbits` clear bits.
    pub fn new(nbits: u64) -> OwnedBits {
        let n = usize::try_from(nbits.div_ceil(64)).unwrap_or(usize::MAX);
        OwnedBits {
            words: (0..n).map(|_| AtomicU64::new(0)).collect(),
            nbits,
        }
    }

    /// A bitmap read from its on-disk bytes (whole little-endian words; a trailing partial
    /// word is ignored). Bits past `nbits` are ignored.
    pub fn from_le_bytes(bytes: &[u8], nbits: u64) -> OwnedBits {
        let words: Vec<AtomicU64> = bytes
            .chunks_exact(8)
            .map(|c| {
                let mut w = [0u8; 8];
                w.copy_from_slice(c);
                AtomicU64::new(u64::from_ne_bytes(w))
            })
            .collect();
        let nbits = nbits.min(words.len() as u64 * 64);
        OwnedBits { words, nbits }
    }

    /// The view.
    pub fn bits(&self) -> Bits<'_> {
        Bits {
            words: &self.words,
            nbits: self.nbits,
        }
    }
}

impl<'a> Bits<'a> {
    /// A view of `nbits` bits over `words`; `nbits` is cut to what the words hold.
    pub fn new(words: &'a [AtomicU64], nbits: u64) -> Bits<'a> {
        Bits {
            words,
            nbits: nbits.min(words.len() as u64 * 64),
        }
    }

    /// The on-disk bytes of the words (little-endian), e.g. to send the map to the peer.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        let n = self.nbits.div_ceil(64) as usize;
        self.words[..n]
            .iter()
            .flat_map(|w| w.load(Ordering::Relaxed).to_ne_bytes())
            .collect()
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.nbits
    }

    /// Whether there are no bits at all.
    pub fn is_empty(&self) -> bool {
        self.nbits == 0
    }

    fn word(&self, i: usize) -> u64 {
        u64::from_le(self.words[i].load(Ordering::Acquire))
    }

    /// Calls `f(word_index, mask)` for each word the range `r` (clipped to the bitmap) touches.
    fn for_each_mask(&self, r: Range<u64>, mut f: impl FnMut(usize, u64)) {
        let end = r.end.min(self.nbits);
        let mut start = r.start;
        while start < end {
            let w = start / 64;
            let lo = start % 64;
            let word_end = ((w + 1) * 64).min(end);
            let hi = word_end - w * 64; // 1..=64
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            f(w as usize, mask);
            start = word_end;
        }
    }

    /// Sets the bits of `r`; returns whether any of them was clear before.
    pub fn set_range(&self, r: Range<u64>) -> bool {
        let mut changed = false;
        self.for_each_mask(r, |w, mask| {
            let old = u64::from_le(self.words[w].fetch_or(mask.to_le(), Ordering::AcqRel));
            changed |= old & mask != mask;
        });
        changed
    }

    /// Clears the bits of `r`; returns how many were set before.
    pub fn clear_range(&self, r: Range<u64>) -> u64 {
        let mut cleared = 0;
        self.for_each_mask(r, |w, mask| {
            let old = u64::from_le(self.words[w].fetch_and(!mask.to_le(), Ordering::AcqRel));
            cleared += u64::from((old & mask).count_ones());
        });
        cleared
    }

    /// Whether every bit of `r` is set (true for an empty range).
    pub fn all_set(&self, r: Range<u64>) -> bool {
        let mut all = true;
        self.for_each_mask(r, |w, mask| all &= self.word(w) & mask == mask);
        all
    }

    /// Whether any bit of `r` is set.
    pub fn any_set(&self, r: Range<u64>) -> bool {
        let mut any = false;
        self.for_each_mask(r, |w, mask| any |= self.word(w) & mask != 0);
        any
    }

    /// Whether bit `i` is set.
    pub fn test(&self, i: u64) -> bool {
        i < self.nbits && self.word((i / 64) as usize) & (1 << (i % 64)) != 0
    }

    /// Number of set bits in `r`.
    pub fn count_range(&self, r: Range<u64>) -> u64 {
        let mut n = 0;
        self.for_each_mask(r, |w, mask| {
            n += u64::from((self.word(w) & mask).count_ones())
        });
        n
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.count_range(0..self.nbits)
    }

    /// Clears every bit.
    pub fn clear_all(&self) {
        for w in self.words {
            w.store(0, Ordering::Release);
        }
    }

    /// Maximal runs of set bits, in order, as bit ranges. Clear words are skipped whole.
    pub fn runs(&self) -> Runs<'a> {
        Runs {
            bits: *self,
            pos: 0,
        }
    }

    /// The index of the first bit at or after `from` whose value is `value`, if any.
    fn find(&self, from: u64, value: bool) -> Option<u64> {
        let mut i = from;
        while i < self.nbits {
            let w = (i / 64) as usize;
            let mut word = self.word(w);
            if !value {
                word = !word;
            }
            word &= u64::MAX << (i % 64);
            if word != 0 {
                let found = w as u64 * 64 + u64::from(word.trailing_zeros());
                return (found < self.nbits).then_some(found);
            }
            i = (w as u64 + 1) * 64;
        }
        None
    }
}

/// Iterator over the runs of set bits (see [`Bits::runs`]).
pub struct Runs<'a> {
    bits: Bits<'a>,
    pos: u64,
}

impl Iterator for Runs<'_> {
    type Item = Range<u64>;
    fn next(&mut self) -> Option<Range<u64>> {
        let start = self.bits.find(self.pos, true)?;
        let end = self.bits.find(start, false).unwrap_or(self.bits.nbits);
        self.pos = end;
        Some(start..end)
    }
}

/// The bits whose granules a byte range touches (for setting: any overlap counts).
/// `granularity` is a power of two; the result is clipped to `volume_size`.
pub fn covering_bits(offset: u64, len: u64, granularity: u64, volume_size: u64) -> Range<u64> {
    let end = offset.saturating_add(len).min(volume_size);
    if offset >= end {
        return 0..0;
    }
    offset / granularity..end.div_ceil(granularity)
}

/// The bits whose granules a byte range covers entirely (for clearing). The last granule of
/// a volume whose size is not a multiple of the granularity counts as covered when the range
/// reaches the end of the volume.
pub fn covered_bits(offset: u64, len: u64, granularity: u64, volume_size: u64) -> Range<u64> {
    let end = offset.saturating_add(len).min(volume_size);
    if offset >= end {
        return 0..0;
    }
    let first = offset.div_ceil(granularity);
    let last = if end == volume_size {
        end.div_ceil(granularity)
    } else {
        end / granularity
    };
    if first >= last {
        0..0
    } else {
        first..last
    }
}

/// A bit range as a byte range of the volume (clipped to its size).
pub fn bits_to_bytes(bits: Range<u64>, granularity: u64, volume_size: u64) -> Range<u64> {
    let start = bits.start.saturating_mul(granularity).min(volume_size);
    let end = bits.end.saturating_mul(granularity).min(volume_size);
    start..end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_across_words() {
        let b = OwnedBits::new(200);
        let v = b.bits();
        assert!(v.set_range(60..130));
        assert!(!v.set_range(64..128));
        assert!(v.set_range(199..500));
        assert_eq!(v.runs().collect::<Vec<_>>(), vec![60..130, 199..200]);
        assert_eq!(v.count(), 71);
        assert_eq!(v.clear_range(0..61), 1);
        assert!(v.all_set(61..130));
        assert!(!v.any_set(130..199));
    }

    #[test]
    fn byte_ranges() {
        let g = 65536;
        let vol = 10 * g + 100;
        assert_eq!(covering_bits(0, 1, g, vol), 0..1);
        assert_eq!(covering_bits(g - 1, 2, g, vol), 0..2);
        assert_eq!(covering_bits(5, 0, g, vol), 0..0);
        assert_eq!(covering_bits(10 * g, 1 << 40, g, vol), 10..11);
        assert_eq!(covered_bits(1, g, g, vol), 0..0);
        assert_eq!(covered_bits(0, 2 * g + 5, g, vol), 0..2);
        assert_eq!(covered_bits(9 * g, g + 100, g, vol), 9..11);
        assert_eq!(bits_to_bytes(9..11, g, vol), 9 * g..vol);
    }

    #[test]
    fn from_bytes_is_little_endian() {
        let mut bytes = vec![0u8; 16];
        bytes[0] = 0b101;
        bytes[9] = 1;
        let b = OwnedBits::from_le_bytes(&bytes, 128);
        assert_eq!(
            b.bits().runs().collect::<Vec<_>>(),
            vec![0..1, 2..3, 72..73]
        );
    }
}
