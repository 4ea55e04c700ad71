//! Test data: position-dependent byte patterns (a misplaced or stale block never matches)
//! and helpers to write and compare image files.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

/// The byte at absolute position `pos` of pattern `seed`.
pub fn pattern_byte(seed: u64, pos: u64) -> u8 {
    let x = (pos ^ seed.rotate_left(29)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let x = x ^ (x >> 29);
    (x.wrapping_mul(0xBF58_476D_1CE4_E5B9) >> 56) as u8
}

/// `len` bytes of pattern `seed` as they would sit at `offset`.
pub fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| pattern_byte(seed, offset + i))
        .collect()
}

/// Writes a file of `size` bytes of pattern `seed`, except the ranges in `holes`, which are
/// left as holes (zeroes).
pub fn write_pattern_file(path: &Path, size: u64, seed: u64, holes: &[(u64, u64)]) {
    let mut f = File::create(path).expect("create pattern file");
    f.set_len(size).expect("set_len");
    const CHUNK: u64 = 1 << 20;
    let mut pos = 0;
    while pos < size {
        let n = CHUNK.min(size - pos);
        let in_hole = holes
            .iter()
            .any(|&(off, len)| pos >= off && pos + n <= off + len);
        if !in_hole {
            let mut buf = pattern(seed, pos, n as usize);
            for &(off, len) in holes {
                // Partially overlapping holes are written as zeroes.
                let s = off.max(pos);
                let e = (off + len).min(pos + n);
                if s < e {
                    buf[(s - pos) as usize..(e - pos) as usize].fill(0);
                }
            }
            f.seek(SeekFrom::Start(pos)).unwrap();
            f.write_all(&buf).unwrap();
        }
        pos += n;
    }
    f.sync_all().unwrap();
}

/// Reads `len` bytes at `offset` of a file.
pub fn read_file_range(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

/// Overwrites `data` at `offset` of an existing file.
pub fn write_file_range(path: &Path, offset: u64, data: &[u8]) {
    let mut f = OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

/// Panics with the first differing offset unless the two files are identical.
#[track_caller]
pub fn assert_files_equal(a: &Path, b: &Path) {
    let la = std::fs::metadata(a).unwrap().len();
    let lb = std::fs::metadata(b).unwrap().len();
    assert_eq!(la, lb, "{} and {} differ in size", a.display(), b.display());
    let mut fa = File::open(a).unwrap();
    let mut fb = File::open(b).unwrap();
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < la {
        let n = (la - pos).min(1 << 20) as usize;
        fa.read_exact(&mut ba[..n]).unwrap();
        fb.read_exact(&mut bb[..n]).unwrap();
        if ba[..n] != bb[..n] {
            let i = (0..n).find(|&i| ba[i] != bb[i]).unwrap();
            panic!(
                "{} and {} differ at offset {}: {:#04x} vs {:#04x}",
                a.display(),
                b.display(),
                pos + i as u64,
                ba[i],
                bb[i]
            );
        }
        pos += n as u64;
    }
}

/// Index of the first byte where `got` differs from `want`, for assertion messages.
pub fn first_difference(got: &[u8], want: &[u8]) -> Option<usize> {
    if got.len() != want.len() {
        return Some(got.len().min(want.len()));
    }
    (0..got.len()).find(|&i| got[i] != want[i])
}

/// Asserts two buffers are equal without dumping megabytes on failure.
#[track_caller]
pub fn assert_bytes_eq(got: &[u8], want: &[u8], what: &str) {
    if let Some(i) = first_difference(got, want) {
        panic!(
            "{what}: data differs at byte {i} (got {} bytes, want {}; got {:?} want {:?})",
            got.len(),
            want.len(),
            got.get(i),
            want.get(i)
        );
    }
}
