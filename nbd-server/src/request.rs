//! Transmission-phase requests: header decoding and validation into a typed [`Command`].
//! Pure: the I/O layer reads the bytes, this module decides what they mean and which error
//! the spec names for each misuse.

use crate::handshake::Session;
use crate::proto::*;

pub const COMPACT_HEADER_LEN: usize = 28;
pub const EXTENDED_HEADER_LEN: usize = 32;

/// Compact-mode WRITE payloads up to this size are read and discarded when refused, so the
/// stream stays in sync; larger ones are treated as a broken client and the connection closes.
pub const MAX_DISCARDED_PAYLOAD: u64 = u32::MAX as u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("bad request magic {0:#010x}")]
    BadMagic(u32),
    #[error("payload of {0} bytes exceeds the maximum of {MAX_PAYLOAD}")]
    PayloadTooLarge(u64),
}

pub fn header_len(extended: bool) -> usize {
    if extended {
        EXTENDED_HEADER_LEN
    } else {
        COMPACT_HEADER_LEN
    }
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Decodes a request header. `bytes` must hold exactly [`header_len`] bytes.
pub fn decode_header(bytes: &[u8], extended: bool) -> Result<RequestHeader, RequestError> {
    debug_assert_eq!(bytes.len(), header_len(extended));
    let magic = be_u32(&bytes[0..4]);
    let expected = if extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    if magic != expected {
        return Err(RequestError::BadMagic(magic));
    }
    let length = if extended {
        be_u64(&bytes[24..32])
    } else {
        be_u32(&bytes[24..28]) as u64
    };
    Ok(RequestHeader {
        flags: be_u16(&bytes[4..6]),
        kind: be_u16(&bytes[6..8]),
        cookie: be_u64(&bytes[8..16]),
        offset: be_u64(&bytes[16..24]),
        length,
    })
}

/// Encodes a request header (used by tests, fuzzing and benchmarks).
pub fn encode_header(h: &RequestHeader, extended: bool, out: &mut Vec<u8>) {
    let magic = if extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    out.extend_from_slice(&magic.to_be_bytes());
    out.extend_from_slice(&h.flags.to_be_bytes());
    out.extend_from_slice(&h.kind.to_be_bytes());
    out.extend_from_slice(&h.cookie.to_be_bytes());
    out.extend_from_slice(&h.offset.to_be_bytes());
    if extended {
        out.extend_from_slice(&h.length.to_be_bytes());
    } else {
        out.extend_from_slice(&(h.length as u32).to_be_bytes());
    }
}

/// How many payload bytes follow this header on the wire.
pub fn payload_len(h: &RequestHeader, extended: bool) -> Result<u64, RequestError> {
    let len = if extended {
        // A WRITE without PAYLOAD_LEN still carries its data: be lenient like QEMU's server.
        if h.flags & CMD_FLAG_PAYLOAD_LEN != 0 || h.kind == CMD_WRITE {
            h.length
        } else {
            0
        }
    } else if h.kind == CMD_WRITE {
        h.length
    } else {
        0
    };
    let limit = if extended {
        // The spec asks for a hard disconnect on oversized extended payloads.
        MAX_PAYLOAD as u64
    } else {
        MAX_DISCARDED_PAYLOAD
    };
    if len > limit {
        return Err(RequestError::PayloadTooLarge(len));
    }
    Ok(len)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        length: u64,
    },
    Write {
        offset: u64,
        length: u64,
        fua: bool,
    },
    Disconnect,
    Flush,
    Trim {
        offset: u64,
        length: u64,
        fua: bool,
    },
    Cache {
        offset: u64,
        length: u64,
    },
    WriteZeroes {
        offset: u64,
        length: u64,
        fua: bool,
        /// The client allows a hole (no NO_HOLE flag).
        may_trim: bool,
        /// FAST_ZERO: fail with ENOTSUP rather than write zeroes slowly.
        fast_only: bool,
    },
    BlockStatus {
        offset: u64,
        length: u64,
        req_one: bool,
    },
}

/// A refused request: the error for the reply and a message for the client and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub errno: NbdErrno,
    pub message: &'static str,
}

fn reject(errno: NbdErrno, message: &'static str) -> Rejection {
    Rejection { errno, message }
}

/// Refuses, with EINVAL as the spec asks ("a flag not explicitly documented as applicable to
/// the given request"), a flag the command does not take or the session did not negotiate.
/// The same rule as QEMU's and nbdkit's servers, so no client that works with them is
/// refused here: FUA is documented for every command (clients are known to set it on
/// others than writes, and SEND_FUA is always advertised); QEMU sends NO_HOLE and FAST_ZERO
/// only on WRITE_ZEROES and REQ_ONE only on BLOCK_STATUS; libnbd in strict mode (its
/// default) checks the same table before sending.
fn check_flags(kind: u16, flags: u16, session: &Session) -> Result<(), Rejection> {
    use NbdErrno::Inval;
    if flags & !CMD_FLAGS_KNOWN != 0 {
        return Err(reject(Inval, "unknown command flags"));
    }
    let advertised = |tf: u16| session.transmission_flags & tf != 0;
    let refuse = |flag: u16, allowed: bool, message: &'static str| {
        if flags & flag != 0 && !allowed {
            Err(reject(Inval, message))
        } else {
            Ok(())
        }
    };
    refuse(
        CMD_FLAG_FUA,
        advertised(TF_SEND_FUA),
        "FUA flag, but SEND_FUA was not advertised",
    )?;
    refuse(
        CMD_FLAG_NO_HOLE,
        kind == CMD_WRITE_ZEROES,
        "NO_HOLE flag on a command other than WRITE_ZEROES",
    )?;
    refuse(
        CMD_FLAG_DF,
        kind == CMD_READ,
        "DF flag on a command other than READ",
    )?;
    // SEND_DF is advertised exactly when structured replies were negotiated.
    refuse(
        CMD_FLAG_DF,
        session.structured_replies,
        "DF flag without structured replies",
    )?;
    refuse(
        CMD_FLAG_REQ_ONE,
        kind == CMD_BLOCK_STATUS,
        "REQ_ONE flag on a command other than BLOCK_STATUS",
    )?;
    refuse(
        CMD_FLAG_FAST_ZERO,
        kind == CMD_WRITE_ZEROES,
        "FAST_ZERO flag on a command other than WRITE_ZEROES",
    )?;
    refuse(
        CMD_FLAG_FAST_ZERO,
        advertised(TF_SEND_FAST_ZERO),
        "FAST_ZERO flag, but SEND_FAST_ZERO was not advertised",
    )?;
    // No command but WRITE takes a payload here (BLOCK_STATUS_PAYLOAD is not advertised);
    // its bytes are still consumed (see `payload_len`), so the stream stays in step.
    refuse(
        CMD_FLAG_PAYLOAD_LEN,
        session.extended_headers && kind == CMD_WRITE,
        "unexpected payload",
    )
}

/// Validates a request against the session and the export size.
pub fn validate(h: &RequestHeader, session: &Session, size: u64) -> Result<Command, Rejection> {
    use NbdErrno::*;
    // The spec gives DISC no reply: whatever its flags, the client is leaving, and an error
    // reply would keep the connection open past it.
    if h.kind == CMD_DISC {
        return Ok(Command::Disconnect);
    }
    let flags = h.flags;
    check_flags(h.kind, flags, session)?;
    let read_only = session.transmission_flags & TF_READ_ONLY != 0;
    let fua = flags & CMD_FLAG_FUA != 0;
    let (offset, length) = (h.offset, h.length);
    let end = offset.checked_add(length);
    let in_range = matches!(end, Some(e) if e <= size);
    match h.kind {
        CMD_READ => {
            if length > MAX_PAYLOAD as u64 {
                let errno = if session.structured_replies {
                    Overflow
                } else {
                    Inval
                };
                return Err(reject(errno, "read larger than the 32 MiB maximum"));
            }
            if !in_range {
                return Err(reject(Inval, "read beyond the end of the export"));
            }
            Ok(Command::Read { offset, length })
        }
        CMD_WRITE => {
            if read_only {
                return Err(reject(Perm, "export is read-only"));
            }
            if length > MAX_PAYLOAD as u64 {
                return Err(reject(Inval, "write larger than the 32 MiB maximum"));
            }
            if !in_range {
                return Err(reject(NoSpc, "write beyond the end of the export"));
            }
            Ok(Command::Write {
                offset,
                length,
                fua,
            })
        }
        CMD_FLUSH => Ok(Command::Flush),
        CMD_TRIM => {
            if read_only {
                return Err(reject(Perm, "export is read-only"));
            }
            if !in_range {
                return Err(reject(Inval, "trim beyond the end of the export"));
            }
            Ok(Command::Trim {
                offset,
                length,
                fua,
            })
        }
        CMD_CACHE => {
            if !in_range {
                return Err(reject(Inval, "cache beyond the end of the export"));
            }
            Ok(Command::Cache { offset, length })
        }
        CMD_WRITE_ZEROES => {
            if read_only {
                return Err(reject(Perm, "export is read-only"));
            }
            if !in_range {
                return Err(reject(NoSpc, "write-zeroes beyond the end of the export"));
            }
            Ok(Command::WriteZeroes {
                offset,
                length,
                fua,
                may_trim: flags & CMD_FLAG_NO_HOLE == 0,
                fast_only: flags & CMD_FLAG_FAST_ZERO != 0,
            })
        }
        CMD_BLOCK_STATUS => {
            if !session.base_allocation {
                return Err(reject(Inval, "no metadata context was negotiated"));
            }
            if length == 0 {
                return Err(reject(Inval, "block status of zero length"));
            }
            if !in_range {
                return Err(reject(Inval, "block status beyond the end of the export"));
            }
            Ok(Command::BlockStatus {
                offset,
                length,
                req_one: flags & CMD_FLAG_REQ_ONE != 0,
            })
        }
        _ => Err(reject(Inval, "unknown command")),
    }
}
