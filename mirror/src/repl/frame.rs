//! The replication protocol's frames: a pure codec (bytes in, [`Message`] out and back), so
//! it is property-tested and fuzzed without sockets.
//!
//! Every frame is a fixed 24-byte header followed by a body:
//!
//! ```text
//! 0   u32  magic "NBMR"
//! 4   u8   kind          (which Message)
//! 5   u8   reserved, 0
//! 6   u16  reserved, 0
//! 8   u64  sequence      requests: the sender's number; responses: the request's number
//! 16  u32  body length   at most MAX_BODY
//! 20  u32  CRC32 of the body
//! ```
//!
//! All integers are big-endian (network order, as in NBD). The CRC covers the body so a
//! corrupted frame is refused rather than written to a disk (TCP's 16-bit checksum misses
//! some corruptions; resync data crosses the link compressed, where a flipped bit would
//! otherwise decompress into silently wrong data).

use crate::metadata::Generations;

/// "NBMR".
pub const MAGIC: u32 = 0x4e42_4d52;
/// The newest protocol version this build speaks.
///
/// The dialer offers the range it speaks (`MIN_VERSION..=VERSION`) in `Hello`; the acceptor
/// picks the newest version both speak and names it in `HelloReply`, so two nodes one release
/// apart keep replicating during a rolling upgrade. For that to work across versions, `Hello`
/// and `HelloReply` keep their fields in every version and may only grow at their end (the
/// decoder ignores what follows the fields it knows). A pair with no common version is
/// refused with both ranges named.
pub const VERSION: u16 = 1;
/// The oldest protocol version this build still speaks.
pub const MIN_VERSION: u16 = 1;

/// The protocol version two nodes use: the newest both speak, or `None` when their ranges do
/// not meet (or a range is empty).
pub fn negotiate_version(offered: (u16, u16), ours: (u16, u16)) -> Option<u16> {
    let (offered_min, offered_max) = offered;
    let (our_min, our_max) = ours;
    let newest = offered_max.min(our_max);
    (offered_min <= offered_max && our_min <= our_max && newest >= offered_min.max(our_min))
        .then_some(newest)
}
pub const HEADER_LEN: usize = 24;
/// Largest mirrored write (NBD's 32 MiB request maximum) plus room for the fixed fields.
pub const MAX_BODY: u32 = (32 << 20) + 4096;
/// Longest node or volume name or error text carried in a frame.
pub const MAX_TEXT: usize = 1024;
/// Largest compressed dirty map carried in a `State` (a 16 TiB volume's map is 32 MiB
/// uncompressed, far smaller compressed).
pub const MAX_MAP: usize = MAX_BODY as usize - 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("not an nbdmirror replication frame (magic {0:#010x})")]
    BadMagic(u32),
    #[error("frame body of {0} bytes exceeds the maximum")]
    TooLong(u32),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("reserved header bits set")]
    Reserved,
    #[error("frame body checksum mismatch (corrupted on the wire)")]
    Checksum,
    #[error("frame body of kind {kind} is malformed: {what}")]
    Malformed { kind: u8, what: &'static str },
}

/// A node's role for a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Secondary,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Secondary => "secondary",
        }
    }
}

/// What a node tells its peer about its copy of a volume; both sides decide the resync
/// direction from the two states (see [`crate::decide`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeState {
    pub size: u64,
    pub role: Role,
    pub consistent: bool,
    /// The image holds data (SEEK_DATA finds some); only consulted before the first
    /// generation exists, to protect an existing image from an empty one.
    pub has_data: bool,
    /// The current generation holds only unacknowledged writes made alone (see
    /// `Flags::UNCONFIRMED`): in a split brain this side may be discarded automatically.
    pub unconfirmed: bool,
    /// Writes this side had not flushed were lost in a power loss (see
    /// `Flags::LOST_CACHE`): at the same generation, the peer is the source.
    pub lost_cache: bool,
    pub generations: Generations,
    pub granularity: u32,
    /// The dirty map, zstd-compressed little-endian words (regions the peer may lack).
    pub dirty_map: Vec<u8>,
}

/// The messages of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Dialer → acceptor: who I am, which volume, the protocol versions I speak, a fresh
    /// challenge.
    Hello {
        min_version: u16,
        max_version: u16,
        node: String,
        volume: String,
        nonce: [u8; 32],
    },
    /// Acceptor → dialer: the version chosen, who I am, my challenge, proof that I know the
    /// secret.
    HelloReply {
        version: u16,
        node: String,
        nonce: [u8; 32],
        proof: [u8; 32],
    },
    /// Dialer → acceptor: proof that I know the secret. No other frame is accepted before it.
    HelloProof {
        proof: [u8; 32],
    },
    /// My state; sent after authentication and whenever role, generation or consistency change.
    State(VolumeState),
    /// A mirrored write.
    Write {
        offset: u64,
        fua: bool,
        data: Vec<u8>,
    },
    Trim {
        offset: u64,
        length: u64,
        fua: bool,
    },
    Zeroes {
        offset: u64,
        length: u64,
        may_trim: bool,
        fua: bool,
    },
    Flush,
    /// Response to any request: 0 on success, else an errno value.
    Ack {
        errno: u32,
    },
    Ping,
    Pong,
    /// Resync source → target: a resync begins; mark yourself inconsistent.
    ResyncStart {
        bytes: u64,
    },
    /// A resync chunk: `raw_len` bytes at `offset`, zstd-compressed if `compressed`, and the
    /// CRC32 of the raw bytes (checked after decompression).
    ResyncData {
        offset: u64,
        raw_len: u32,
        compressed: bool,
        raw_crc: u32,
        payload: Vec<u8>,
    },
    /// A resync chunk that is all zeroes (a hole on the source).
    ResyncZero {
        offset: u64,
        length: u64,
    },
    /// Checksum pass: does your copy of this range hash to this? Answered by `HashMatch`.
    ResyncHash {
        offset: u64,
        length: u64,
        hash: [u8; 32],
    },
    HashMatch {
        equal: bool,
    },
    /// The resync finished: you now hold these generations and are consistent.
    ResyncDone {
        generations: Generations,
    },
    /// Verify: hash your copy in `block`-sized pieces of `offset..offset+length`.
    HashRequest {
        offset: u64,
        length: u64,
        block: u32,
    },
    HashReply {
        hashes: Vec<[u8; 32]>,
    },
    /// Operator's split-brain resolution: the receiver's writes are to be discarded.
    Discard,
    /// A refusal or fatal error, sent before closing.
    Error {
        message: String,
    },
}

mod kind {
    pub const HELLO: u8 = 1;
    pub const HELLO_REPLY: u8 = 2;
    pub const HELLO_PROOF: u8 = 3;
    pub const STATE: u8 = 5;
    pub const WRITE: u8 = 10;
    pub const TRIM: u8 = 11;
    pub const ZEROES: u8 = 12;
    pub const FLUSH: u8 = 13;
    pub const ACK: u8 = 14;
    pub const PING: u8 = 15;
    pub const PONG: u8 = 16;
    pub const RESYNC_START: u8 = 20;
    pub const RESYNC_DATA: u8 = 21;
    pub const RESYNC_ZERO: u8 = 22;
    pub const RESYNC_HASH: u8 = 23;
    pub const HASH_MATCH: u8 = 24;
    pub const RESYNC_DONE: u8 = 25;
    pub const HASH_REQUEST: u8 = 27;
    pub const HASH_REPLY: u8 = 28;
    pub const DISCARD: u8 = 29;
    pub const ERROR: u8 = 30;
}

impl Message {
    fn kind(&self) -> u8 {
        use kind::*;
        match self {
            Message::Hello { .. } => HELLO,
            Message::HelloReply { .. } => HELLO_REPLY,
            Message::HelloProof { .. } => HELLO_PROOF,
            Message::State(_) => STATE,
            Message::Write { .. } => WRITE,
            Message::Trim { .. } => TRIM,
            Message::Zeroes { .. } => ZEROES,
            Message::Flush => FLUSH,
            Message::Ack { .. } => ACK,
            Message::Ping => PING,
            Message::Pong => PONG,
            Message::ResyncStart { .. } => RESYNC_START,
            Message::ResyncData { .. } => RESYNC_DATA,
            Message::ResyncZero { .. } => RESYNC_ZERO,
            Message::ResyncHash { .. } => RESYNC_HASH,
            Message::HashMatch { .. } => HASH_MATCH,
            Message::ResyncDone { .. } => RESYNC_DONE,
            Message::HashRequest { .. } => HASH_REQUEST,
            Message::HashReply { .. } => HASH_REPLY,
            Message::Discard => DISCARD,
            Message::Error { .. } => ERROR,
        }
    }

    /// Whether this message answers a request (its sequence number is the request's).
    pub fn is_response(&self) -> bool {
        matches!(
            self,
            Message::Ack { .. }
                | Message::Pong
                | Message::HashMatch { .. }
                | Message::HashReply { .. }
        )
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: u8,
    pub seq: u64,
    pub length: u32,
    pub crc: u32,
}

pub fn decode_header(b: &[u8; HEADER_LEN]) -> Result<FrameHeader, FrameError> {
    let magic = be32(&b[0..4]);
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    if b[5] != 0 || b[6] != 0 || b[7] != 0 {
        return Err(FrameError::Reserved);
    }
    let length = be32(&b[16..20]);
    if length > MAX_BODY {
        return Err(FrameError::TooLong(length));
    }
    let kind = b[4];
    if !known_kind(kind) {
        return Err(FrameError::UnknownKind(kind));
    }
    Ok(FrameHeader {
        kind,
        seq: be64(&b[8..16]),
        length,
        crc: be32(&b[20..24]),
    })
}

fn known_kind(k: u8) -> bool {
    matches!(k, 1..=3 | 5 | 10..=16 | 20..=25 | 27..=30)
}

/// Appends the frame for `msg` with sequence number `seq` to `out`.
pub fn encode(seq: u64, msg: &Message, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    encode_body(msg, out);
    let body_len = (out.len() - start - HEADER_LEN) as u32;
    let crc = crc32fast::hash(&out[start + HEADER_LEN..]);
    put_header(
        &mut out[start..start + HEADER_LEN],
        msg.kind(),
        seq,
        body_len,
        crc,
    );
}

fn put_header(h: &mut [u8], kind: u8, seq: u64, body_len: u32, crc: u32) {
    h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
    h[4] = kind;
    h[8..16].copy_from_slice(&seq.to_be_bytes());
    h[16..20].copy_from_slice(&body_len.to_be_bytes());
    h[20..24].copy_from_slice(&crc.to_be_bytes());
}

/// Appends a `Write` frame without first copying the data into a [`Message`].
pub fn encode_write(seq: u64, offset: u64, fua: bool, data: &[u8], out: &mut Vec<u8>) {
    let mut prefix = [0u8; 9];
    prefix[..8].copy_from_slice(&offset.to_be_bytes());
    prefix[8] = u8::from(fua);
    encode_bulk(seq, kind::WRITE, &prefix, data, out);
}

/// The header and fixed fields of a `Write` frame whose data follows separately on the wire
/// (sent from the caller's buffer): `encode_write_head(..) ++ data` is exactly what
/// [`encode_write`] makes, without copying `data`.
pub fn encode_write_head(seq: u64, offset: u64, fua: bool, data: &[u8]) -> Vec<u8> {
    let mut prefix = [0u8; 9];
    prefix[..8].copy_from_slice(&offset.to_be_bytes());
    prefix[8] = u8::from(fua);
    let mut out = Vec::with_capacity(HEADER_LEN + prefix.len());
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    out.extend_from_slice(&prefix);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&prefix);
    crc.update(data);
    let body_len = (prefix.len() + data.len()) as u32;
    put_header(
        &mut out[..HEADER_LEN],
        kind::WRITE,
        seq,
        body_len,
        crc.finalize(),
    );
    out
}

/// Appends a `ResyncData` frame whose payload is borrowed (a chunk read into a buffer of
/// the reader's, not moved into a [`Message`]).
pub fn encode_resync_data(
    seq: u64,
    offset: u64,
    raw_len: u32,
    compressed: bool,
    raw_crc: u32,
    payload: &[u8],
    out: &mut Vec<u8>,
) {
    let mut prefix = [0u8; 17];
    prefix[..8].copy_from_slice(&offset.to_be_bytes());
    prefix[8..12].copy_from_slice(&raw_len.to_be_bytes());
    prefix[12] = u8::from(compressed);
    prefix[13..].copy_from_slice(&raw_crc.to_be_bytes());
    encode_bulk(seq, kind::RESYNC_DATA, &prefix, payload, out);
}

/// A frame of fixed fields and bulk data, in one buffer sized once.
fn encode_bulk(seq: u64, kind: u8, prefix: &[u8], data: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.reserve(HEADER_LEN + prefix.len() + data.len());
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    out.extend_from_slice(prefix);
    out.extend_from_slice(data);
    let body_len = (out.len() - start - HEADER_LEN) as u32;
    let crc = crc32fast::hash(&out[start + HEADER_LEN..]);
    put_header(
        &mut out[start..start + HEADER_LEN],
        kind,
        seq,
        body_len,
        crc,
    );
}

fn put_text(out: &mut Vec<u8>, s: &str) {
    let b = &s.as_bytes()[..s.len().min(MAX_TEXT)];
    out.extend_from_slice(&(b.len() as u16).to_be_bytes());
    out.extend_from_slice(b);
}

fn put_generations(out: &mut Vec<u8>, g: &Generations) {
    out.extend_from_slice(&g.current.to_be_bytes());
    out.extend_from_slice(&g.sync.to_be_bytes());
    for h in g.history {
        out.extend_from_slice(&h.to_be_bytes());
    }
}

fn encode_body(msg: &Message, out: &mut Vec<u8>) {
    match msg {
        Message::Hello {
            min_version,
            max_version,
            node,
            volume,
            nonce,
        } => {
            out.extend_from_slice(&max_version.to_be_bytes());
            out.extend_from_slice(&min_version.to_be_bytes());
            put_text(out, node);
            put_text(out, volume);
            out.extend_from_slice(nonce);
        }
        Message::HelloReply {
            version,
            node,
            nonce,
            proof,
        } => {
            out.extend_from_slice(&version.to_be_bytes());
            put_text(out, node);
            out.extend_from_slice(nonce);
            out.extend_from_slice(proof);
        }
        Message::HelloProof { proof } => out.extend_from_slice(proof),
        Message::State(s) => {
            out.extend_from_slice(&s.size.to_be_bytes());
            out.push(match s.role {
                Role::Primary => 1,
                Role::Secondary => 0,
            });
            out.push(
                u8::from(s.consistent)
                    | (u8::from(s.has_data) << 1)
                    | (u8::from(s.unconfirmed) << 2)
                    | (u8::from(s.lost_cache) << 3),
            );
            put_generations(out, &s.generations);
            out.extend_from_slice(&s.granularity.to_be_bytes());
            out.extend_from_slice(&(s.dirty_map.len() as u32).to_be_bytes());
            out.extend_from_slice(&s.dirty_map);
        }
        Message::Write { offset, fua, data } => {
            out.extend_from_slice(&offset.to_be_bytes());
            out.push(u8::from(*fua));
            out.extend_from_slice(data);
        }
        Message::Trim {
            offset,
            length,
            fua,
        } => {
            out.extend_from_slice(&offset.to_be_bytes());
            out.extend_from_slice(&length.to_be_bytes());
            out.push(u8::from(*fua));
        }
        Message::Zeroes {
            offset,
            length,
            may_trim,
            fua,
        } => {
            out.extend_from_slice(&offset.to_be_bytes());
            out.extend_from_slice(&length.to_be_bytes());
            out.push(u8::from(*fua) | (u8::from(*may_trim) << 1));
        }
        Message::Flush | Message::Ping | Message::Pong | Message::Discard => {}
        Message::Ack { errno } => out.extend_from_slice(&errno.to_be_bytes()),
        Message::ResyncStart { bytes } => out.extend_from_slice(&bytes.to_be_bytes()),
        Message::ResyncData {
            offset,
            raw_len,
            compressed,
            raw_crc,
            payload,
        } => {
            out.extend_from_slice(&offset.to_be_bytes());
            out.extend_from_slice(&raw_len.to_be_bytes());
            out.push(u8::from(*compressed));
            out.extend_from_slice(&raw_crc.to_be_bytes());
            out.extend_from_slice(payload);
        }
        Message::ResyncZero { offset, length } => {
            out.extend_from_slice(&offset.to_be_bytes());
            out.extend_from_slice(&length.to_be_bytes());
        }
        Message::ResyncHash {
            offset,
            length,
            hash,
        } => {
            out.extend_from_slice(&offset.to_be_bytes());
            out.extend_from_slice(&length.to_be_bytes());
            out.extend_from_slice(hash);
        }
        Message::HashMatch { equal } => out.push(u8::from(*equal)),
        Message::ResyncDone { generations } => put_generations(out, generations),
        Message::HashRequest {
            offset,
            length,
            block,
        } => {
            out.extend_from_slice(&offset.to_be_bytes());
            out.extend_from_slice(&length.to_be_bytes());
            out.extend_from_slice(&block.to_be_bytes());
        }
        Message::HashReply { hashes } => {
            out.extend_from_slice(&(hashes.len() as u32).to_be_bytes());
            for h in hashes {
                out.extend_from_slice(h);
            }
        }
        Message::Error { message } => put_text(out, message),
    }
}

fn be32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// A cursor over a body that reports truncation instead of panicking.
struct Reader<'a> {
    b: &'a [u8],
    kind: u8,
}

impl<'a> Reader<'a> {
    fn err(&self, what: &'static str) -> FrameError {
        FrameError::Malformed {
            kind: self.kind,
            what,
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.b.len() < n {
            return Err(self.err("truncated"));
        }
        let (a, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(be32(self.take(4)?))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(be64(self.take(8)?))
    }
    fn bytes32(&mut self) -> Result<[u8; 32], FrameError> {
        let mut a = [0u8; 32];
        a.copy_from_slice(self.take(32)?);
        Ok(a)
    }
    fn text(&mut self) -> Result<String, FrameError> {
        let n = usize::from(self.u16()?);
        if n > MAX_TEXT {
            return Err(self.err("text too long"));
        }
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err("text is not UTF-8"))
    }
    fn flag(&mut self) -> Result<bool, FrameError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(self.err("bad boolean")),
        }
    }
    fn generations(&mut self) -> Result<Generations, FrameError> {
        let mut g = Generations {
            current: self.u64()?,
            sync: self.u64()?,
            ..Generations::default()
        };
        for h in g.history.iter_mut() {
            *h = self.u64()?;
        }
        Ok(g)
    }
    fn end(&self) -> Result<(), FrameError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(self.err("trailing bytes"))
        }
    }
}

/// For the kinds that carry bulk data (a write's, a resync chunk's), the length of the fixed
/// fields before it. A reader takes the data into a buffer of its own (see [`decode_split`]):
/// cutting a prefix off a 1 MiB body would move the whole megabyte.
pub fn payload_prefix(kind: u8) -> Option<usize> {
    match kind {
        kind::WRITE => Some(9),
        kind::RESYNC_DATA => Some(17),
        _ => None,
    }
}

/// Decodes a frame of a kind with a [`payload_prefix`] whose body arrived as that prefix and
/// the payload after it; the same checks as [`decode_body`], and the payload is not copied.
pub fn decode_split(
    h: &FrameHeader,
    prefix: &[u8],
    payload: Vec<u8>,
) -> Result<Message, FrameError> {
    let malformed = |what| FrameError::Malformed { kind: h.kind, what };
    if prefix.len() + payload.len() != h.length as usize {
        return Err(malformed("body length differs from the header"));
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(prefix);
    crc.update(&payload);
    if crc.finalize() != h.crc {
        return Err(FrameError::Checksum);
    }
    if payload_prefix(h.kind) != Some(prefix.len()) {
        // A body too short for its fixed fields.
        return Err(malformed("truncated"));
    }
    let mut r = Reader {
        b: prefix,
        kind: h.kind,
    };
    match h.kind {
        kind::WRITE => {
            let offset = r.u64()?;
            let fua = r.flag()?;
            Ok(Message::Write {
                offset,
                fua,
                data: payload,
            })
        }
        kind::RESYNC_DATA => {
            let offset = r.u64()?;
            let raw_len = r.u32()?;
            let compressed = r.flag()?;
            let raw_crc = r.u32()?;
            if raw_len > MAX_BODY {
                return Err(r.err("chunk too large"));
            }
            if !compressed && payload.len() != raw_len as usize {
                return Err(malformed("uncompressed chunk length differs"));
            }
            Ok(Message::ResyncData {
                offset,
                raw_len,
                compressed,
                raw_crc,
                payload,
            })
        }
        _ => Err(malformed("no bulk payload in this kind")),
    }
}

/// Decodes a body whose header was accepted by [`decode_header`]. Takes the body by value so
/// most payloads are moved, not copied.
pub fn decode_body(h: &FrameHeader, body: Vec<u8>) -> Result<Message, FrameError> {
    if body.len() != h.length as usize {
        return Err(FrameError::Malformed {
            kind: h.kind,
            what: "body length differs from the header",
        });
    }
    if crc32fast::hash(&body) != h.crc {
        return Err(FrameError::Checksum);
    }
    let mut r = Reader {
        b: &body,
        kind: h.kind,
    };
    use kind::*;
    let msg = match h.kind {
        // A later version may append fields to these two (see `VERSION`): ignored here.
        HELLO => {
            let max_version = r.u16()?;
            let hello = Message::Hello {
                min_version: r.u16()?,
                max_version,
                node: r.text()?,
                volume: r.text()?,
                nonce: r.bytes32()?,
            };
            return Ok(hello);
        }
        HELLO_REPLY => {
            return Ok(Message::HelloReply {
                version: r.u16()?,
                node: r.text()?,
                nonce: r.bytes32()?,
                proof: r.bytes32()?,
            })
        }
        HELLO_PROOF => Message::HelloProof {
            proof: r.bytes32()?,
        },
        STATE => {
            let size = r.u64()?;
            let role = match r.u8()? {
                0 => Role::Secondary,
                1 => Role::Primary,
                _ => return Err(r.err("bad role")),
            };
            let bits = r.u8()?;
            if bits & !0xf != 0 {
                return Err(r.err("unknown state flags"));
            }
            let generations = r.generations()?;
            let granularity = r.u32()?;
            let n = r.u32()? as usize;
            if n > MAX_MAP {
                return Err(r.err("dirty map too large"));
            }
            let dirty_map = r.take(n)?.to_vec();
            Message::State(VolumeState {
                size,
                role,
                consistent: bits & 1 != 0,
                has_data: bits & 2 != 0,
                unconfirmed: bits & 4 != 0,
                lost_cache: bits & 8 != 0,
                generations,
                granularity,
                dirty_map,
            })
        }
        WRITE | RESYNC_DATA => {
            // Checked against payload_prefix's length, so the split is in range.
            let p = payload_prefix(h.kind).map_or(0, |p| p.min(body.len()));
            return decode_split(h, &body[..p], body[p..].to_vec());
        }
        TRIM => Message::Trim {
            offset: r.u64()?,
            length: r.u64()?,
            fua: r.flag()?,
        },
        ZEROES => {
            let offset = r.u64()?;
            let length = r.u64()?;
            let f = r.u8()?;
            if f & !3 != 0 {
                return Err(r.err("unknown zeroes flags"));
            }
            Message::Zeroes {
                offset,
                length,
                fua: f & 1 != 0,
                may_trim: f & 2 != 0,
            }
        }
        FLUSH => Message::Flush,
        ACK => Message::Ack { errno: r.u32()? },
        PING => Message::Ping,
        PONG => Message::Pong,
        DISCARD => Message::Discard,
        RESYNC_START => Message::ResyncStart { bytes: r.u64()? },
        RESYNC_ZERO => Message::ResyncZero {
            offset: r.u64()?,
            length: r.u64()?,
        },
        RESYNC_HASH => Message::ResyncHash {
            offset: r.u64()?,
            length: r.u64()?,
            hash: r.bytes32()?,
        },
        HASH_MATCH => Message::HashMatch { equal: r.flag()? },
        RESYNC_DONE => Message::ResyncDone {
            generations: r.generations()?,
        },
        HASH_REQUEST => Message::HashRequest {
            offset: r.u64()?,
            length: r.u64()?,
            block: r.u32()?,
        },
        HASH_REPLY => {
            let n = r.u32()? as usize;
            if n.saturating_mul(32) != r.b.len() {
                return Err(r.err("hash count differs from the body"));
            }
            let mut hashes = Vec::with_capacity(n);
            for _ in 0..n {
                hashes.push(r.bytes32()?);
            }
            Message::HashReply { hashes }
        }
        ERROR => Message::Error { message: r.text()? },
        other => return Err(FrameError::UnknownKind(other)),
    };
    r.end()?;
    Ok(msg)
}

/// Feeds arbitrary bytes through the decoder as a stream of frames (the fuzz target and a
/// property test use it). Returns how many frames decoded. Never panics.
pub fn fuzz_stream(mut data: &[u8]) -> usize {
    let mut n = 0;
    while data.len() >= HEADER_LEN {
        let mut hb = [0u8; HEADER_LEN];
        hb.copy_from_slice(&data[..HEADER_LEN]);
        data = &data[HEADER_LEN..];
        let Ok(h) = decode_header(&hb) else {
            // Try again with a valid-looking header: recompute magic and CRC so the
            // fuzzer reaches the body decoders.
            let len = (be32(&hb[16..20]) as usize).min(data.len());
            let body = data[..len].to_vec();
            data = &data[len..];
            let h = FrameHeader {
                kind: hb[4],
                seq: 0,
                length: len as u32,
                crc: crc32fast::hash(&body),
            };
            if known_kind(h.kind) && decode_body(&h, body).is_ok() {
                n += 1;
            }
            continue;
        };
        let len = (h.length as usize).min(data.len());
        let body = data[..len].to_vec();
        data = &data[len..];
        if let Ok(m) = decode_body(&h, body) {
            let mut out = Vec::new();
            encode(h.seq, &m, &mut out);
            n += 1;
        }
    }
    n
}
