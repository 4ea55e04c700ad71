//! Per-volume metadata: the persistent dirty map, the activity map and the generations.
//!
//! One file per volume (e.g. `<data_dir>/<volume>.meta`), memory-mapped while a daemon runs:
//!
//! ```text
//! 0      4 KiB  header slot 0  ┐ two copies, written alternately; each has a sequence number
//! 4 KiB  4 KiB  header slot 1  ┘ and a CRC; the valid one with the higher sequence wins
//! 8 KiB         dirty map      one bit per granule (64 KiB), 4 KiB aligned
//! ...           activity map   one bit per extent (4 MiB), 4 KiB aligned
//! ```
//!
//! Field by field, the header is documented in [`header`]. Bitmaps are little-endian 64-bit
//! words, bit `i` in word `i / 64` at position `i % 64`.
//!
//! # Choices, and why
//!
//! - **Two header slots** instead of one: the header holds the generations that decide the
//!   resync direction. A crash in the middle of writing a single 4 KiB header could leave a
//!   torn page, and with it no trustworthy generations, forcing a full resync and a manual
//!   decision. Writing alternately to two slots (as LMDB's meta pages do) means one valid copy
//!   survives any torn write; the CRC tells which. Fallback happens only when a slot's magic
//!   or CRC is bad (a torn write); a slot that checksums but is invalid (unknown version,
//!   impossible sizes) is an error, never silently replaced by an older copy.
//! - **The activity map is folded into the dirty map on open after a crash.** Set activity
//!   bits mean "writes may have been in flight here: the two copies may differ". Turning them
//!   into dirty bits (durably, before clearing them) keeps one rule for resync: the dirty map
//!   is everything the peer may not have. A clean shutdown can then clear the whole activity
//!   map without losing anything.
//! - **Cold extents are cleared after an image flush, not at eviction.** An evicted extent has
//!   no write in flight, but its completed writes may still sit in the page cache: if the node
//!   lost power, the local copy could lack a write the peer has. So eviction only queues the
//!   extent; [`MetadataFile::take_cold`] before an image flush and
//!   [`MetadataFile::clear_cold`] after it clear the bits (lazily: no metadata sync, since a
//!   clear that is lost only costs an extra resync).
//! - **No lock on the dirty path.** Bits live in `AtomicU64` words of the mapping (as in
//!   rust-vmm's `AtomicBitmap`), so concurrent writers set them with `fetch_or`. A writer that
//!   changed a bit msyncs the pages it changed. A writer that changed nothing normally syncs
//!   nothing, except while another writer is between setting its bits and finishing its
//!   msync: its bits might be that other writer's, not yet durable, so it syncs its own pages
//!   too (msync waits for pages already under writeback). A counter of writers in that window
//!   tells which case holds.
//! - **A failed msync poisons the file.** After an msync error the kernel may have dropped the
//!   dirty pages (the lesson of PostgreSQL's "fsyncgate"); bits set in memory may never reach
//!   the disk, and a later writer that finds its bits set would skip the sync. So every later
//!   call fails with [`MetadataError::Poisoned`] until the daemon reopens the file.
//! - **The file is fully allocated at creation** (zeros written, not a sparse file): a store
//!   into a mapped hole on a full filesystem would be a SIGBUS, not an error.
//! - **Hot-set capacity defaults to 1024 extents (4 GiB)**, four times the design's 1 GiB
//!   random working set so that it does not thrash, while a primary crash costs at most 4 GiB
//!   of resync (DRBD's 1237 extents is a similar figure). It is clamped to the volume's extent
//!   count.
//! - **Generations are random 64-bit values** (seeded by the OS through std's `RandomState`),
//!   not counters: two nodes promoted alone from the same state must get different
//!   generations, or a split brain would go unnoticed. 0 means "none".
//! - **No `bitvec`**: the bit math needed here (atomic `fetch_or` on words in on-disk byte
//!   order, run iteration that skips clear words) is a hundred lines in [`bitmap`], easier to
//!   audit than `bitvec`'s type-level API over atomics.
//! - **CRC32 (crc32fast)** guards the 4 KiB header; the maps are not checksummed (lock-free
//!   bit updates cannot maintain a checksum), and a torn map page can only hold bits that
//!   were being set or cleared, both safe directions for a bitmap that over-approximates.
//!
//! # Reading without the daemon
//!
//! [`Snapshot::read`] reads a file with read(2) (no mapping, no lock, no writes) and
//! [`parse`] validates it from bytes; `nbdmirror bitmap inspect` and the fuzz target use them.

pub mod activity;
pub mod bitmap;
mod file;
pub mod header;
#[allow(unsafe_code)]
mod mapping;

use std::path::{Path, PathBuf};

pub use activity::ActivityLog;
pub use bitmap::{Bits, OwnedBits};
pub use file::{
    ActiveWrite, ColdBatch, MetadataFile, MetadataOptions, OpenReport, DEFAULT_ACTIVITY_CAPACITY,
    DEFAULT_ACTIVITY_EXTENT, DEFAULT_GRANULARITY,
};
pub use header::{Counters, Flags, Generations, Header, HeaderError, Layout};

/// Why the bytes of a metadata file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// The (chosen) header is invalid.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// Both header copies are unusable.
    #[error("both header copies are unusable (copy 0: {first}; copy 1: {second})")]
    BothSlots {
        /// Why slot 0 is unusable.
        first: HeaderError,
        /// Why slot 1 is unusable.
        second: HeaderError,
    },
    /// The file is shorter than its header says.
    #[error("file truncated: {actual} bytes, the header says {expected}")]
    Truncated {
        /// Length from the header.
        expected: u64,
        /// Actual length.
        actual: u64,
    },
    /// The file is longer than its header says.
    #[error(
        "file is {actual} bytes, the header says {expected}: not written by nbdmirror or corrupt"
    )]
    TooLong {
        /// Length from the header.
        expected: u64,
        /// Actual length.
        actual: u64,
    },
}

/// Errors of the metadata file, each naming the file.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// An I/O call failed.
    #[error("metadata file {}: {op}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file's contents are invalid.
    #[error("metadata file {}: {source}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: FormatError,
    },
    /// `create` found a file already there.
    #[error("metadata file {} already exists; refusing to overwrite it", path.display())]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// Another process holds the file.
    #[error("metadata file {} is in use by another process (it holds the lock)", path.display())]
    Locked {
        /// The file.
        path: PathBuf,
    },
    /// A byte range outside the volume.
    #[error("metadata file {}: range {offset}+{len} is outside the volume ({volume_size} bytes)", path.display())]
    OutOfRange {
        /// The file.
        path: PathBuf,
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// Size of the volume.
        volume_size: u64,
    },
    /// A sync failed earlier: nothing set since can be trusted to be durable.
    #[error("metadata file {}: an earlier sync failed, the file must be reopened", path.display())]
    Poisoned {
        /// The file.
        path: PathBuf,
    },
    /// `clean_shutdown` was called with writes still in flight, or the file was shut down.
    #[error("metadata file {}: {what}", path.display())]
    State {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: &'static str,
    },
}

/// A validated metadata file read into memory.
pub struct Snapshot {
    /// The current header.
    pub header: Header,
    /// Which slot holds it (0 or 1).
    pub active_slot: usize,
    /// Why the other slot is unusable, if it is (a crash during a header write; harmless).
    pub standby_error: Option<HeaderError>,
    /// Where the maps lie.
    pub layout: Layout,
    /// The dirty map.
    pub dirty: OwnedBits,
    /// The activity map.
    pub activity: OwnedBits,
}

impl Snapshot {
    /// Reads and validates a metadata file with plain reads: no mapping, no lock, no writes.
    /// The header comes first, and the rest is read only when the file's length is the one
    /// the header implies: a wrong path (a disk image, a huge corrupt file) costs 8 KiB of
    /// memory and a clear error, not the file's size.
    pub fn read(path: &Path) -> Result<Snapshot, MetadataError> {
        use std::io::Read;
        let io = |op| {
            let path = path.to_owned();
            move |source| MetadataError::Io { path, op, source }
        };
        let format = |source| MetadataError::Format {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io("open"))?;
        let actual = file.metadata().map_err(io("stat"))?.len();
        let mut head = Vec::new();
        (&file)
            .take(header::HEADER_AREA)
            .read_to_end(&mut head)
            .map_err(io("read"))?;
        let (header, _, _) = choose_header(&head).map_err(format)?;
        let expected = header.layout().map_err(|e| format(e.into()))?.file_len;
        if actual != expected {
            return Err(format(if actual < expected {
                FormatError::Truncated { expected, actual }
            } else {
                FormatError::TooLong { expected, actual }
            }));
        }
        let mut bytes = head;
        bytes.reserve_exact((expected as usize).saturating_sub(bytes.len()));
        (&file)
            .take(expected - bytes.len() as u64)
            .read_to_end(&mut bytes)
            .map_err(io("read"))?;
        parse(&bytes).map_err(format)
    }

    /// Byte ranges `(offset, length)` of the volume marked dirty, merged.
    pub fn dirty_ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let g = u64::from(self.header.dirty_granularity);
        let size = self.header.volume_size;
        self.dirty.bits().runs().map(move |r| {
            let b = bitmap::bits_to_bytes(r, g, size);
            (b.start, b.end - b.start)
        })
    }

    /// Dirty bytes (the last granule counts only up to the end of the volume).
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_ranges().map(|(_, l)| l).sum()
    }
}

/// Chooses the current header of a file's first 8 KiB. Returns it, its slot and why the
/// other slot is unusable (if it is).
pub fn choose_header(bytes: &[u8]) -> Result<(Header, usize, Option<HeaderError>), FormatError> {
    let slot = |i: usize| bytes.get(i * header::SLOT_SIZE..).unwrap_or(&[]);
    let seq0 = header::slot_sequence(slot(0));
    let seq1 = header::slot_sequence(slot(1));
    let (active, standby_error) = match (seq0, seq1) {
        (Ok(a), Ok(b)) => (usize::from(b > a), None),
        (Ok(_), Err(e)) => (0, Some(e)),
        (Err(e), Ok(_)) => (1, Some(e)),
        (Err(first), Err(second)) => {
            let foreign = |e: &HeaderError| {
                matches!(
                    e,
                    HeaderError::BadMagic { .. } | HeaderError::Truncated { .. }
                )
            };
            // One clear message for a file that is not ours at all (or far too short).
            return Err(if foreign(&first) && foreign(&second) {
                FormatError::Header(first)
            } else {
                FormatError::BothSlots { first, second }
            });
        }
    };
    let header = Header::decode(slot(active))?;
    Ok((header, active, standby_error))
}

/// Parses and validates a whole metadata file from its bytes. Never panics; the fuzz target
/// and a property test drive it with arbitrary input.
pub fn parse(bytes: &[u8]) -> Result<Snapshot, FormatError> {
    let (header, active_slot, standby_error) = choose_header(bytes)?;
    let layout = header.layout()?;
    let actual = bytes.len() as u64;
    if actual < layout.file_len {
        return Err(FormatError::Truncated {
            expected: layout.file_len,
            actual,
        });
    }
    if actual > layout.file_len {
        return Err(FormatError::TooLong {
            expected: layout.file_len,
            actual,
        });
    }
    let region = |off: u64, len: u64| &bytes[off as usize..(off + len) as usize];
    let dirty = OwnedBits::from_le_bytes(
        region(layout.dirty_offset, layout.dirty_len),
        layout.dirty_bits,
    );
    let activity = OwnedBits::from_le_bytes(
        region(layout.activity_offset, layout.activity_len),
        layout.activity_bits,
    );
    Ok(Snapshot {
        header,
        active_slot,
        standby_error,
        layout,
        dirty,
        activity,
    })
}

/// Exercises everything a reader does with a parsed file; the fuzz target and the property
/// test call this with arbitrary bytes. The first byte selects a mode: when its low bit is
/// set, the CRC of each header slot present is recomputed first, so the fuzzer gets past the
/// checksum and explores field validation and the maps; when bit 1 is set, the rest of the
/// input is XORed over a valid 16 KiB file instead of standing alone, so the fuzzer starts
/// from the magic and a consistent length. Returns the number of dirty runs, or None if the
/// file is invalid.
pub fn fuzz_parse(data: &[u8]) -> Option<usize> {
    let (&mode, rest) = data.split_first()?;
    let mut bytes = if mode & 2 == 2 {
        let mut file = template_file();
        let len = file.len();
        for (i, b) in rest.iter().enumerate() {
            file[i % len] ^= b;
        }
        file
    } else {
        rest.to_vec()
    };
    if mode & 1 == 1 {
        for slot in bytes
            .chunks_exact_mut(header::SLOT_SIZE)
            .take(header::SLOTS)
        {
            let crc = crc32fast::hash(&slot[..header::SLOT_SIZE - 4]);
            slot[header::SLOT_SIZE - 4..].copy_from_slice(&crc.to_le_bytes());
        }
    }
    let snap = parse(&bytes).ok()?;
    let runs = snap.dirty_ranges().count();
    let _ = snap.dirty_bytes();
    let _ = snap.activity.bits().count();
    let _ = snap.header.encode();
    Some(runs)
}

/// A valid file for a 256 MiB volume with both header slots, one dirty run, one hot extent.
fn template_file() -> Vec<u8> {
    let mut h = Header {
        sequence: 0,
        volume_size: 256 << 20,
        dirty_granularity: 64 << 10,
        activity_extent_size: 4 << 20,
        activity_capacity: 64,
        flags: Flags::CONSISTENT,
        generations: Generations::default(),
        counters: Counters::default(),
        node_name: "fuzz".into(),
        peer_name: String::new(),
        boot_id: [0; 16],
    };
    let Ok(layout) = h.layout() else {
        return Vec::new();
    };
    let mut file = vec![0u8; layout.file_len as usize];
    for slot in 0..header::SLOTS {
        h.sequence = slot as u64;
        if let Ok(b) = h.encode() {
            file[slot * header::SLOT_SIZE..(slot + 1) * header::SLOT_SIZE].copy_from_slice(&b);
        }
    }
    file[layout.dirty_offset as usize] = 0b0110;
    file[layout.activity_offset as usize] = 1;
    file
}
