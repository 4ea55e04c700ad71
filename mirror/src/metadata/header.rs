//! The metadata header: a pure codec (bytes in, bytes out, no I/O).
//!
//! One header slot is 4 KiB. The file holds two slots (see the module doc of
//! [`crate::metadata`] for why); each slot is complete on its own and carries its own CRC32.
//!
//! Slot layout, version 1 (all integers little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `NBDMMETA` |
//! | 8 | 4 | format version (1) |
//! | 12 | 4 | slot size (4096) |
//! | 16 | 8 | sequence: incremented by every header write; the higher valid slot wins |
//! | 24 | 8 | volume size in bytes |
//! | 32 | 4 | dirty granularity in bytes (power of two) |
//! | 36 | 4 | activity extent size in bytes (power of two, multiple of the granularity) |
//! | 40 | 4 | activity hot-set capacity in extents |
//! | 44 | 4 | flags (see [`Flags`]) |
//! | 48 | 8+8 | dirty map offset and length in the file |
//! | 64 | 8+8 | activity map offset and length in the file |
//! | 80 | 8 | file length |
//! | 88 | 8 | current generation |
//! | 96 | 8 | sync generation: the generation both nodes shared when last in sync (0: never) |
//! | 104 | 4×8 | generation history, newest first (0: empty) |
//! | 136 | 8 | created, seconds since the Unix epoch |
//! | 144 | 8 | opens for writing |
//! | 152 | 8 | opens that found the previous shutdown unclean |
//! | 160 | 1+63 | node name (length byte, UTF-8, zero padded) |
//! | 224 | 1+63 | peer node name (length byte, UTF-8, zero padded; may be empty) |
//! | 288 | 16 | boot id of the machine when a daemon last opened the file (0: unknown) |
//! | 304 | 3788 | reserved, must be zero |
//! | 4092 | 4 | CRC32 (IEEE) of bytes 0..4092 |
//!
//! Rules that hold for every future version, so an old reader fails cleanly: magic at 0,
//! version at 8, sequence at 16, CRC of the first 4092 bytes in the last 4.

use std::fmt;

/// The eight bytes every metadata file starts with.
pub const MAGIC: [u8; 8] = *b"NBDMMETA";
/// The format version this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Size of one header slot.
pub const SLOT_SIZE: usize = 4096;
/// Number of header slots at the start of the file.
pub const SLOTS: usize = 2;
/// Bytes before the dirty map: both header slots.
pub const HEADER_AREA: u64 = (SLOT_SIZE * SLOTS) as u64;
/// Regions of the file (the maps) start and end on this alignment.
pub const REGION_ALIGN: u64 = 4096;
/// How many earlier generations a header remembers.
pub const GENERATION_HISTORY: usize = 4;
/// Longest node name, in bytes of UTF-8.
pub const NODE_NAME_MAX: usize = 63;
/// Smallest and largest dirty granularity.
pub const MIN_GRANULARITY: u32 = 4096;
/// Largest granularity and activity extent (1 GiB).
pub const MAX_GRANULE: u32 = 1 << 30;
/// Largest volume the format accepts (1 EiB); keeps every size computation far from overflow.
pub const MAX_VOLUME_SIZE: u64 = 1 << 60;
/// Largest dirty or activity map in bytes (1 GiB), so a forged header cannot ask for more.
pub const MAX_MAP_BYTES: u64 = 1 << 30;
/// Largest activity hot-set capacity.
pub const MAX_ACTIVITY_CAPACITY: u32 = 1 << 20;

const CRC_OFFSET: usize = SLOT_SIZE - 4;
const BOOT_ID_OFFSET: usize = 288;
const RESERVED_START: usize = BOOT_ID_OFFSET + 16;

/// Header flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Flags(u32);

impl Flags {
    /// The data on this node is consistent: cleared while it is the target of a resync that
    /// has not finished, so it must not be promoted without `--force`.
    pub const CONSISTENT: Flags = Flags(1);
    /// Set by a clean shutdown, cleared when a daemon opens the file for writing: when an open
    /// finds it clear, the previous run crashed and its hot activity extents need a resync.
    pub const CLEAN_SHUTDOWN: Flags = Flags(1 << 1);
    /// This node was primary when the header was last written.
    pub const PRIMARY: Flags = Flags(1 << 2);
    /// The current generation was started by writing alone and the witness never confirmed
    /// it, so none of its writes was acknowledged: its changes may be discarded without
    /// losing anything a client was told is written.
    pub const UNCONFIRMED: Flags = Flags(1 << 3);
    /// The previous run ended without a clean shutdown in an earlier boot of the machine (a
    /// power loss, a kernel crash): writes it had not flushed may be missing from this image,
    /// in its hot extents, while the peer has them. Cleared when this copy starts a
    /// generation, is promoted, or is resynced from the peer.
    pub const LOST_CACHE: Flags = Flags(1 << 4);
    const KNOWN: u32 = 0b1_1111;

    /// No flag set.
    pub const fn empty() -> Flags {
        Flags(0)
    }
    /// The raw bits.
    pub const fn bits(self) -> u32 {
        self.0
    }
    /// Flags from raw bits; `None` if an unknown bit is set.
    pub const fn from_bits(bits: u32) -> Option<Flags> {
        if bits & !Self::KNOWN == 0 {
            Some(Flags(bits))
        } else {
            None
        }
    }
    /// Whether every flag of `other` is set.
    pub const fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }
    /// Sets or clears the flags of `other`.
    pub fn set(&mut self, other: Flags, on: bool) {
        if on {
            self.0 |= other.0;
        } else {
            self.0 &= !other.0;
        }
    }
}

/// Generation identifiers, used by the mirror to decide the resync direction and to detect a
/// split brain (both nodes wrote alone). Values are random 64-bit identifiers; 0 means none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Generations {
    /// The generation of the data on this node now.
    pub current: u64,
    /// The generation both nodes had when they were last in sync (the base of the dirty map).
    pub sync: u64,
    /// Earlier generations of this node, newest first.
    pub history: [u64; GENERATION_HISTORY],
}

impl Generations {
    /// Starts generation `next`: the current one moves to the front of the history.
    pub fn advance(&mut self, next: u64) {
        self.history.rotate_right(1);
        self.history[0] = self.current;
        self.current = next;
    }
}

/// Counters kept for operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    /// When the file was created (seconds since the Unix epoch).
    pub created_unix: u64,
    /// How many times a daemon opened the file for writing.
    pub opens: u64,
    /// How many of those opens found the previous run had not shut down cleanly.
    pub unclean_opens: u64,
}

/// Where the maps lie in the file; derived from the sizes, stored for validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Bits in the dirty map (granules of the volume).
    pub dirty_bits: u64,
    /// Byte offset of the dirty map.
    pub dirty_offset: u64,
    /// Byte length of the dirty map (page aligned).
    pub dirty_len: u64,
    /// Bits in the activity map (extents of the volume).
    pub activity_bits: u64,
    /// Byte offset of the activity map.
    pub activity_offset: u64,
    /// Byte length of the activity map (page aligned).
    pub activity_len: u64,
    /// Total file length.
    pub file_len: u64,
}

impl Layout {
    /// The layout for these sizes, or why they are invalid.
    pub fn compute(
        volume_size: u64,
        granularity: u32,
        extent_size: u32,
    ) -> Result<Layout, HeaderError> {
        if volume_size == 0 || volume_size > MAX_VOLUME_SIZE {
            return Err(invalid(
                "volume size",
                format!("{volume_size} is not in 1..=2^60"),
            ));
        }
        if !granularity.is_power_of_two() || !(MIN_GRANULARITY..=MAX_GRANULE).contains(&granularity)
        {
            return Err(invalid(
                "dirty granularity",
                format!("{granularity} is not a power of two in 4 KiB..=1 GiB"),
            ));
        }
        if !extent_size.is_power_of_two() || extent_size < granularity || extent_size > MAX_GRANULE
        {
            return Err(invalid(
                "activity extent size",
                format!(
                    "{extent_size} is not a power of two between the granularity ({granularity}) and 1 GiB"
                ),
            ));
        }
        let dirty_bits = volume_size.div_ceil(u64::from(granularity));
        let activity_bits = volume_size.div_ceil(u64::from(extent_size));
        let dirty_len = map_bytes(dirty_bits);
        let activity_len = map_bytes(activity_bits);
        if dirty_len > MAX_MAP_BYTES {
            return Err(invalid(
                "dirty granularity",
                format!("{granularity} makes a dirty map of {dirty_len} bytes (limit 1 GiB)"),
            ));
        }
        let dirty_offset = HEADER_AREA;
        let activity_offset = dirty_offset + dirty_len;
        Ok(Layout {
            dirty_bits,
            dirty_offset,
            dirty_len,
            activity_bits,
            activity_offset,
            activity_len,
            file_len: activity_offset + activity_len,
        })
    }
}

/// Bytes of a map of `bits` bits: whole 64-bit words, rounded up to the region alignment.
fn map_bytes(bits: u64) -> u64 {
    (bits.div_ceil(64) * 8).div_ceil(REGION_ALIGN) * REGION_ALIGN
}

/// One decoded header slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Header write counter; of two valid slots, the higher sequence is current.
    pub sequence: u64,
    /// Size of the volume in bytes.
    pub volume_size: u64,
    /// Bytes covered by one dirty bit.
    pub dirty_granularity: u32,
    /// Bytes covered by one activity bit.
    pub activity_extent_size: u32,
    /// How many extents the in-memory hot set holds before it evicts.
    pub activity_capacity: u32,
    /// Flags.
    pub flags: Flags,
    /// Generations.
    pub generations: Generations,
    /// Counters.
    pub counters: Counters,
    /// This node's name.
    pub node_name: String,
    /// The peer's name, once known (empty before).
    pub peer_name: String,
    /// The machine's boot id when a daemon last opened the file (zero: unknown).
    pub boot_id: [u8; 16],
}

impl Header {
    /// The layout this header implies (its sizes were validated when it was built or decoded).
    pub fn layout(&self) -> Result<Layout, HeaderError> {
        Layout::compute(
            self.volume_size,
            self.dirty_granularity,
            self.activity_extent_size,
        )
    }

    /// Encodes the header into one slot. Fails only if the header is invalid (sizes, names).
    pub fn encode(&self) -> Result<[u8; SLOT_SIZE], HeaderError> {
        self.validate()?;
        let layout = self.layout()?;
        let mut b = [0u8; SLOT_SIZE];
        b[0..8].copy_from_slice(&MAGIC);
        put32(&mut b, 8, FORMAT_VERSION);
        put32(&mut b, 12, SLOT_SIZE as u32);
        put64(&mut b, 16, self.sequence);
        put64(&mut b, 24, self.volume_size);
        put32(&mut b, 32, self.dirty_granularity);
        put32(&mut b, 36, self.activity_extent_size);
        put32(&mut b, 40, self.activity_capacity);
        put32(&mut b, 44, self.flags.bits());
        put64(&mut b, 48, layout.dirty_offset);
        put64(&mut b, 56, layout.dirty_len);
        put64(&mut b, 64, layout.activity_offset);
        put64(&mut b, 72, layout.activity_len);
        put64(&mut b, 80, layout.file_len);
        put64(&mut b, 88, self.generations.current);
        put64(&mut b, 96, self.generations.sync);
        for (i, g) in self.generations.history.iter().enumerate() {
            put64(&mut b, 104 + 8 * i, *g);
        }
        put64(&mut b, 136, self.counters.created_unix);
        put64(&mut b, 144, self.counters.opens);
        put64(&mut b, 152, self.counters.unclean_opens);
        put_name(&mut b, 160, &self.node_name);
        put_name(&mut b, 224, &self.peer_name);
        b[BOOT_ID_OFFSET..RESERVED_START].copy_from_slice(&self.boot_id);
        let crc = crc32fast::hash(&b[..CRC_OFFSET]);
        put32(&mut b, CRC_OFFSET, crc);
        Ok(b)
    }

    /// Checks the fields a caller can get wrong (sizes, capacity, names).
    pub fn validate(&self) -> Result<(), HeaderError> {
        self.layout()?;
        if self.activity_capacity == 0 || self.activity_capacity > MAX_ACTIVITY_CAPACITY {
            return Err(invalid(
                "activity capacity",
                format!("{} is not in 1..=2^20", self.activity_capacity),
            ));
        }
        check_name("node name", &self.node_name, false)?;
        check_name("peer name", &self.peer_name, true)?;
        Ok(())
    }

    /// Decodes one slot: checks length, magic, checksum, version, then every field.
    pub fn decode(bytes: &[u8]) -> Result<Header, HeaderError> {
        let slot = check_slot(bytes)?;
        let version = get32(slot, 8);
        if version != FORMAT_VERSION {
            return Err(HeaderError::UnsupportedVersion { version });
        }
        let slot_size = get32(slot, 12);
        if slot_size as usize != SLOT_SIZE {
            return Err(invalid("slot size", format!("{slot_size}, expected 4096")));
        }
        if slot[RESERVED_START..CRC_OFFSET].iter().any(|&x| x != 0) {
            return Err(invalid("reserved bytes", "not zero".into()));
        }
        let flags_raw = get32(slot, 44);
        let flags = Flags::from_bits(flags_raw)
            .ok_or_else(|| invalid("flags", format!("unknown bits in {flags_raw:#x}")))?;
        let mut history = [0u64; GENERATION_HISTORY];
        for (i, g) in history.iter_mut().enumerate() {
            *g = get64(slot, 104 + 8 * i);
        }
        let header = Header {
            sequence: get64(slot, 16),
            volume_size: get64(slot, 24),
            dirty_granularity: get32(slot, 32),
            activity_extent_size: get32(slot, 36),
            activity_capacity: get32(slot, 40),
            flags,
            generations: Generations {
                current: get64(slot, 88),
                sync: get64(slot, 96),
                history,
            },
            counters: Counters {
                created_unix: get64(slot, 136),
                opens: get64(slot, 144),
                unclean_opens: get64(slot, 152),
            },
            node_name: get_name(slot, 160, "node name")?,
            peer_name: get_name(slot, 224, "peer name")?,
            boot_id: slot[BOOT_ID_OFFSET..RESERVED_START]
                .try_into()
                .unwrap_or([0; 16]),
        };
        header.validate()?;
        let layout = header.layout()?;
        let stored = [
            ("dirty map offset", get64(slot, 48), layout.dirty_offset),
            ("dirty map length", get64(slot, 56), layout.dirty_len),
            (
                "activity map offset",
                get64(slot, 64),
                layout.activity_offset,
            ),
            ("activity map length", get64(slot, 72), layout.activity_len),
            ("file length", get64(slot, 80), layout.file_len),
        ];
        for (field, found, expected) in stored {
            if found != expected {
                return Err(invalid(
                    field,
                    format!("{found} does not match the sizes (expected {expected})"),
                ));
            }
        }
        Ok(header)
    }
}

/// Checks the parts of a slot that every version shares: length, magic, checksum.
/// Returns the slot's bytes.
fn check_slot(bytes: &[u8]) -> Result<&[u8], HeaderError> {
    if bytes.len() < SLOT_SIZE {
        return Err(HeaderError::Truncated { len: bytes.len() });
    }
    let slot = &bytes[..SLOT_SIZE];
    if slot[0..8] != MAGIC {
        let mut found = [0u8; 8];
        found.copy_from_slice(&slot[0..8]);
        return Err(HeaderError::BadMagic { found });
    }
    let stored = get32(slot, CRC_OFFSET);
    let computed = crc32fast::hash(&slot[..CRC_OFFSET]);
    if stored != computed {
        return Err(HeaderError::BadChecksum { stored, computed });
    }
    Ok(slot)
}

/// The sequence number of a slot whose magic and checksum are good (any version).
pub fn slot_sequence(bytes: &[u8]) -> Result<u64, HeaderError> {
    check_slot(bytes).map(|slot| get64(slot, 16))
}

/// Why a header slot cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Fewer bytes than one slot.
    #[error("header truncated: {len} bytes, a header slot is 4096")]
    Truncated {
        /// Bytes available.
        len: usize,
    },
    /// The magic is not `NBDMMETA`.
    #[error(
        "not an nbdmirror metadata file (magic {}, expected \"NBDMMETA\")",
        Magic(found)
    )]
    BadMagic {
        /// The first eight bytes.
        found: [u8; 8],
    },
    /// The CRC does not match: a torn or corrupted write.
    #[error("header checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the header is corrupt")]
    BadChecksum {
        /// CRC in the slot.
        stored: u32,
        /// CRC of the slot's bytes.
        computed: u32,
    },
    /// Written by a newer (or unknown) format version.
    #[error("unsupported metadata format version {version} (this nbdmirror reads version 1)")]
    UnsupportedVersion {
        /// The version found.
        version: u32,
    },
    /// A field holds an impossible value.
    #[error("invalid header field {field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

fn invalid(field: &'static str, reason: String) -> HeaderError {
    HeaderError::Invalid { field, reason }
}

struct Magic<'a>(&'a [u8; 8]);

impl fmt::Display for Magic<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"")?;
        for &b in self.0 {
            if b.is_ascii_graphic() || b == b' ' {
                write!(f, "{}", b as char)?;
            } else {
                write!(f, "\\x{b:02x}")?;
            }
        }
        f.write_str("\"")
    }
}

fn check_name(field: &'static str, name: &str, may_be_empty: bool) -> Result<(), HeaderError> {
    if name.len() > NODE_NAME_MAX {
        return Err(invalid(
            field,
            format!("{} bytes, at most {NODE_NAME_MAX}", name.len()),
        ));
    }
    if name.is_empty() && !may_be_empty {
        return Err(invalid(field, "empty".into()));
    }
    if name.chars().any(char::is_control) {
        return Err(invalid(field, "contains control characters".into()));
    }
    Ok(())
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
fn get32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}
fn get64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}
fn put_name(b: &mut [u8], at: usize, name: &str) {
    // validate() bounded the length to NODE_NAME_MAX, so it fits in the length byte.
    b[at] = name.len() as u8;
    b[at + 1..at + 1 + name.len()].copy_from_slice(name.as_bytes());
}
fn get_name(b: &[u8], at: usize, field: &'static str) -> Result<String, HeaderError> {
    let len = usize::from(b[at]);
    if len > NODE_NAME_MAX {
        return Err(invalid(
            field,
            format!("length {len}, at most {NODE_NAME_MAX}"),
        ));
    }
    let area = &b[at + 1..at + 1 + NODE_NAME_MAX];
    if area[len..].iter().any(|&x| x != 0) {
        return Err(invalid(field, "bytes after the name are not zero".into()));
    }
    String::from_utf8(area[..len].to_vec()).map_err(|_| invalid(field, "not valid UTF-8".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Header {
        Header {
            sequence: 7,
            volume_size: 256 << 20,
            dirty_granularity: 64 << 10,
            activity_extent_size: 4 << 20,
            activity_capacity: 64,
            flags: Flags::CONSISTENT,
            generations: Generations {
                current: 0xdead_beef,
                sync: 0x1234,
                history: [0x1234, 5, 0, 0],
            },
            counters: Counters {
                created_unix: 1_700_000_000,
                opens: 3,
                unclean_opens: 1,
            },
            node_name: "node-a".into(),
            peer_name: "node-b".into(),
            boot_id: [3; 16],
        }
    }

    #[test]
    fn round_trip() {
        let h = sample();
        let bytes = h.encode().unwrap();
        assert_eq!(Header::decode(&bytes).unwrap(), h);
        assert_eq!(slot_sequence(&bytes).unwrap(), 7);
    }

    #[test]
    fn layout_of_256_mib() {
        let l = sample().layout().unwrap();
        assert_eq!(l.dirty_bits, 4096);
        assert_eq!(l.dirty_offset, 8192);
        assert_eq!(l.dirty_len, 4096);
        assert_eq!(l.activity_bits, 64);
        assert_eq!(l.activity_offset, 12288);
        assert_eq!(l.activity_len, 4096);
        assert_eq!(l.file_len, 16384);
    }

    #[test]
    fn corruption_is_typed() {
        let good = sample().encode().unwrap();
        assert!(matches!(
            Header::decode(&good[..100]),
            Err(HeaderError::Truncated { len: 100 })
        ));
        let mut b = good;
        b[0] = b'X';
        let e = Header::decode(&b).unwrap_err();
        assert!(matches!(e, HeaderError::BadMagic { .. }));
        assert!(e.to_string().contains("XBDMMETA"), "{e}");
        let mut b = good;
        b[30] ^= 1;
        assert!(matches!(
            Header::decode(&b),
            Err(HeaderError::BadChecksum { .. })
        ));
        let mut b = good;
        put32(&mut b, 8, 2);
        let crc = crc32fast::hash(&b[..CRC_OFFSET]);
        put32(&mut b, CRC_OFFSET, crc);
        assert_eq!(
            Header::decode(&b),
            Err(HeaderError::UnsupportedVersion { version: 2 })
        );
        let mut b = good;
        put64(&mut b, 80, 1 << 40);
        let crc = crc32fast::hash(&b[..CRC_OFFSET]);
        put32(&mut b, CRC_OFFSET, crc);
        let e = Header::decode(&b).unwrap_err();
        assert!(e.to_string().contains("file length"), "{e}");
    }

    #[test]
    fn invalid_fields_refuse_to_encode() {
        let mut h = sample();
        h.dirty_granularity = 3000;
        assert!(h.encode().is_err());
        let mut h = sample();
        h.activity_extent_size = 32 << 10;
        assert!(h.encode().is_err());
        let mut h = sample();
        h.node_name = "x".repeat(64);
        assert!(h.encode().is_err());
        let mut h = sample();
        h.node_name.clear();
        assert!(h.encode().is_err());
        let mut h = sample();
        h.activity_capacity = 0;
        assert!(h.encode().is_err());
        let mut h = sample();
        h.volume_size = 0;
        assert!(h.encode().is_err());
    }

    #[test]
    fn generations_advance() {
        let mut g = Generations {
            current: 9,
            sync: 9,
            history: [8, 7, 6, 5],
        };
        g.advance(10);
        assert_eq!(g.current, 10);
        assert_eq!(g.history, [9, 8, 7, 6]);
        assert_eq!(g.sync, 9);
    }
}
