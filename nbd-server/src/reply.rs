//! Transmission-phase replies: simple, structured and extended. Pure encoders into a
//! caller-owned buffer, so the connection loop batches many replies into one socket write.

use crate::proto::*;
use crate::wire::{put_u16, put_u32, put_u64};

/// Which reply format the session negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyMode {
    Simple,
    Structured,
    Extended,
}

impl ReplyMode {
    pub fn for_session(structured: bool, extended: bool) -> Self {
        if extended {
            ReplyMode::Extended
        } else if structured {
            ReplyMode::Structured
        } else {
            ReplyMode::Simple
        }
    }
}

/// One extent of a block-status answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    pub flags: u32,
}

/// Identifies the request a reply answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTo {
    pub cookie: u64,
    /// The request's offset (echoed by extended replies).
    pub offset: u64,
}

fn simple(out: &mut Vec<u8>, cookie: u64, error: u32) {
    put_u32(out, SIMPLE_REPLY_MAGIC);
    put_u32(out, error);
    put_u64(out, cookie);
}

/// A structured or extended chunk header; `len` is the payload length that follows.
fn chunk(out: &mut Vec<u8>, mode: ReplyMode, flags: u16, kind: u16, to: ReplyTo, len: u64) {
    match mode {
        ReplyMode::Extended => {
            put_u32(out, EXTENDED_REPLY_MAGIC);
            put_u16(out, flags);
            put_u16(out, kind);
            put_u64(out, to.cookie);
            put_u64(out, to.offset);
            put_u64(out, len);
        }
        _ => {
            put_u32(out, STRUCTURED_REPLY_MAGIC);
            put_u16(out, flags);
            put_u16(out, kind);
            put_u64(out, to.cookie);
            put_u32(out, len as u32);
        }
    }
}

/// Success with no data (every command but READ and BLOCK_STATUS).
pub fn ok(out: &mut Vec<u8>, mode: ReplyMode, to: ReplyTo) {
    match mode {
        // A simple reply is allowed for data-less replies under structured replies, and is
        // what every client expects first.
        ReplyMode::Simple | ReplyMode::Structured => simple(out, to.cookie, 0),
        ReplyMode::Extended => chunk(out, mode, REPLY_FLAG_DONE, REPLY_TYPE_NONE, to, 0),
    }
}

/// A failed request, with a message for a human where the format can carry one.
pub fn error(out: &mut Vec<u8>, mode: ReplyMode, to: ReplyTo, errno: NbdErrno, message: &str) {
    match mode {
        ReplyMode::Simple => simple(out, to.cookie, errno as u32),
        _ => {
            let msg = &message.as_bytes()[..message.len().min(4096)];
            chunk(
                out,
                mode,
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                to,
                6 + msg.len() as u64,
            );
            put_u32(out, errno as u32);
            put_u16(out, msg.len() as u16);
            out.extend_from_slice(msg);
        }
    }
}

/// The header that precedes a successful READ's data of `len` bytes; the caller sends the
/// data right after it. The data is one chunk, which also satisfies the DF flag.
pub fn read_data_header(out: &mut Vec<u8>, mode: ReplyMode, to: ReplyTo, len: u64) {
    match mode {
        ReplyMode::Simple => simple(out, to.cookie, 0),
        _ if len == 0 => chunk(out, mode, REPLY_FLAG_DONE, REPLY_TYPE_NONE, to, 0),
        _ => {
            chunk(
                out,
                mode,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                to,
                8 + len,
            );
            put_u64(out, to.offset);
        }
    }
}

/// A block-status reply for one context. `extents` must not be empty; in compact modes each
/// length must fit in 32 bits (the request length does, and we never exceed it).
pub fn block_status(
    out: &mut Vec<u8>,
    mode: ReplyMode,
    to: ReplyTo,
    context: u32,
    extents: &[Extent],
) {
    match mode {
        ReplyMode::Extended => {
            let len = 8 + 16 * extents.len() as u64;
            chunk(
                out,
                mode,
                REPLY_FLAG_DONE,
                REPLY_TYPE_BLOCK_STATUS_EXT,
                to,
                len,
            );
            put_u32(out, context);
            put_u32(out, extents.len() as u32);
            for e in extents {
                put_u64(out, e.length);
                put_u64(out, e.flags as u64);
            }
        }
        _ => {
            let len = 4 + 8 * extents.len() as u64;
            chunk(out, mode, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, to, len);
            put_u32(out, context);
            for e in extents {
                put_u32(out, e.length.min(u32::MAX as u64) as u32);
                put_u32(out, e.flags);
            }
        }
    }
}
