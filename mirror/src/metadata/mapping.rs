//! The shared memory map of a metadata file, seen as atomic 64-bit words.
//!
//! This is the only module of the metadata code allowed `unsafe`: one cast of the mapping to
//! `&[AtomicU64]`. Everything else (header slots, dirty map, activity map) is safe code over
//! that slice.

use std::fs::File;
use std::io;
use std::sync::atomic::AtomicU64;

use memmap2::{MmapOptions, MmapRaw};

/// A read-write shared mapping of a whole metadata file.
pub(super) struct Mapping {
    raw: MmapRaw,
}

impl Mapping {
    /// Maps the first `len` bytes of `file` (the caller checked the file is that long and
    /// holds an exclusive lock on it). `len` must be a non-zero multiple of 8.
    pub(super) fn new(file: &File, len: u64) -> io::Result<Mapping> {
        let len = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "mapping too large"))?;
        if len == 0 || len & 7 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "mapping length is not a non-zero multiple of 8",
            ));
        }
        let raw = MmapOptions::new().len(len).map_raw(file)?;
        if (raw.as_ptr() as usize) & (std::mem::align_of::<AtomicU64>() - 1) != 0
            || raw.len() != len
        {
            return Err(io::Error::other("mapping is not 8-byte aligned"));
        }
        Ok(Mapping { raw })
    }

    /// The whole file as words.
    pub(super) fn words(&self) -> &[AtomicU64] {
        // SAFETY: `new` checked the pointer is aligned for AtomicU64 and the length is a
        // multiple of 8, so the slice covers exactly the mapped bytes, which stay mapped for
        // as long as `self` (and so the returned borrow) lives. AtomicU64 has the size and
        // alignment of u64 and every bit pattern is a valid value. In this process the bytes
        // are only ever accessed through this slice (atomically); the file is locked
        // exclusively by its `MetadataFile`, and readers such as `bitmap inspect` use read(2),
        // never a mapping. A process that ignores the lock and truncates the file would make
        // accesses fault (SIGBUS), the contract of every mmap-based store, not a data race.
        unsafe {
            std::slice::from_raw_parts(self.raw.as_ptr().cast::<AtomicU64>(), self.raw.len() / 8)
        }
    }

    /// Makes the bytes `offset..offset + len` of the file durable (msync MS_SYNC of the pages
    /// that hold them).
    pub(super) fn sync(&self, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(offset), Ok(len)) = (usize::try_from(offset), usize::try_from(len)) else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "sync range"));
        };
        if len == 0 {
            return Ok(());
        }
        self.raw.flush_range(offset, len)
    }
}
