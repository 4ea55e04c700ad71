//! The fixed-newstyle handshake as a pure state machine: bytes of one option in, encoded
//! replies and the next step out. No sockets here, so every branch is unit- and
//! property-tested and fuzzed (see `fuzz/`).

use crate::proto::*;
use crate::wire::{put_u16, put_u32, put_u64, Reader};

/// Options larger than this are refused with `NBD_REP_ERR_TOO_BIG` (their data is discarded
/// by the I/O layer). Real options are a few hundred bytes at most.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Export names longer than the spec's recommended limit are refused.
pub const MAX_NAME_LEN: usize = 4096;

/// What the handshake needs to know about one export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    pub size: u64,
    /// Transmission flags this export supports, without the ones that depend on what the
    /// client negotiated (`SEND_DF` needs structured replies).
    pub base_flags: u16,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("client sent unknown handshake flags {0:#x}")]
    UnknownClientFlags(u32),
    #[error("bad option magic {0:#018x} (not an NBD fixed-newstyle client?)")]
    BadOptionMagic(u64),
}

/// What the client and server agreed on; the transmission phase runs with this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    /// Index into the export list.
    pub export: usize,
    pub structured_replies: bool,
    pub extended_headers: bool,
    /// `base:allocation` was selected for this export.
    pub base_allocation: bool,
    pub transmission_flags: u16,
}

/// What the I/O layer must do after writing the option's reply bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Read the next option.
    Continue,
    /// Enter the transmission phase.
    Transmit(Session),
    /// Close the connection (after sending the bytes, if any).
    Close,
}

#[derive(Debug, PartialEq, Eq)]
pub struct OptionOutcome {
    pub reply: Vec<u8>,
    pub next: Next,
}

/// The server's opening bytes.
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// Parses an option header: (option, data length).
pub fn parse_option_header(b: &[u8; 16]) -> Result<(u32, u32), HandshakeError> {
    let mut r = Reader::new(b);
    let magic = r.u64().unwrap_or(0);
    let option = r.u32().unwrap_or(0);
    let len = r.u32().unwrap_or(0);
    if magic != IHAVEOPT {
        return Err(HandshakeError::BadOptionMagic(magic));
    }
    Ok((option, len))
}

/// Negotiation state of one connection.
#[derive(Debug)]
pub struct Negotiation<'a> {
    exports: &'a [ExportInfo],
    fixed_newstyle: bool,
    no_zeroes: bool,
    structured_replies: bool,
    extended_headers: bool,
    /// Export (index) for which `base:allocation` was last selected.
    meta_context_export: Option<usize>,
}

impl<'a> Negotiation<'a> {
    /// Starts negotiation from the client's 32-bit flags. Unknown flags close the connection,
    /// as the spec requires.
    pub fn new(exports: &'a [ExportInfo], client_flags: u32) -> Result<Self, HandshakeError> {
        let known = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
        if client_flags & !known != 0 {
            return Err(HandshakeError::UnknownClientFlags(client_flags));
        }
        Ok(Negotiation {
            exports,
            fixed_newstyle: client_flags & FLAG_C_FIXED_NEWSTYLE != 0,
            no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
            structured_replies: false,
            extended_headers: false,
            meta_context_export: None,
        })
    }

    fn find_export(&self, name: &str) -> Option<usize> {
        if name.is_empty() {
            // The empty name is the default export: the first one.
            return if self.exports.is_empty() {
                None
            } else {
                Some(0)
            };
        }
        self.exports.iter().position(|e| e.name == name)
    }

    fn flags_for(&self, export: usize) -> u16 {
        let mut flags = self.exports[export].base_flags | TF_HAS_FLAGS;
        if self.structured_replies || self.extended_headers {
            flags |= TF_SEND_DF;
        }
        flags
    }

    fn session(&self, export: usize) -> Session {
        Session {
            export,
            structured_replies: self.structured_replies || self.extended_headers,
            extended_headers: self.extended_headers,
            base_allocation: self.meta_context_export == Some(export),
            transmission_flags: self.flags_for(export),
        }
    }

    /// The answer to any option once the server is shutting down: the spec says to error
    /// further options (other than ABORT) with `NBD_REP_ERR_SHUTDOWN`, after which the client
    /// disconnects. EXPORT_NAME cannot carry an error, so it closes, as does any option
    /// from a client without fixed newstyle.
    pub fn handle_option_shutting_down(&self, option: u32) -> OptionOutcome {
        if option == OPT_EXPORT_NAME || !self.fixed_newstyle {
            return close();
        }
        if option == OPT_ABORT {
            return OptionOutcome {
                reply: option_reply(option, REP_ACK, &[]),
                next: Next::Close,
            };
        }
        error_reply(option, REP_ERR_SHUTDOWN, "the server is shutting down")
    }

    /// An option whose data was too large to read; the I/O layer discarded it.
    pub fn handle_oversized(&mut self, option: u32) -> OptionOutcome {
        if option == OPT_EXPORT_NAME || !self.fixed_newstyle {
            return close();
        }
        error_reply(option, REP_ERR_TOO_BIG, "option data too large")
    }

    /// Handles one option with its complete data.
    pub fn handle_option(&mut self, option: u32, data: &[u8]) -> OptionOutcome {
        if option == OPT_EXPORT_NAME {
            return self.export_name(data);
        }
        if !self.fixed_newstyle {
            // Without fixed newstyle, the only safe answer to an unknown option is to hang up.
            return close();
        }
        match option {
            OPT_ABORT => OptionOutcome {
                reply: option_reply(option, REP_ACK, &[]),
                next: Next::Close,
            },
            OPT_LIST => {
                if !data.is_empty() {
                    return error_reply(option, REP_ERR_INVALID, "LIST takes no data");
                }
                let mut reply = Vec::new();
                for e in self.exports {
                    let mut body = Vec::with_capacity(4 + e.name.len() + e.description.len());
                    put_u32(&mut body, e.name.len() as u32);
                    body.extend_from_slice(e.name.as_bytes());
                    body.extend_from_slice(e.description.as_bytes());
                    reply.extend(option_reply(option, REP_SERVER, &body));
                }
                reply.extend(option_reply(option, REP_ACK, &[]));
                continue_with(reply)
            }
            OPT_STARTTLS => {
                if !data.is_empty() {
                    return error_reply(option, REP_ERR_INVALID, "STARTTLS takes no data");
                }
                error_reply(option, REP_ERR_UNSUP, "TLS is not supported by this server")
            }
            OPT_INFO | OPT_GO => self.info_or_go(option, data),
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    return error_reply(option, REP_ERR_INVALID, "STRUCTURED_REPLY takes no data");
                }
                if self.extended_headers {
                    return error_reply(
                        option,
                        REP_ERR_EXT_HEADER_REQD,
                        "extended headers already negotiated",
                    );
                }
                self.structured_replies = true;
                continue_with(option_reply(option, REP_ACK, &[]))
            }
            OPT_EXTENDED_HEADERS => {
                if !data.is_empty() {
                    return error_reply(option, REP_ERR_INVALID, "EXTENDED_HEADERS takes no data");
                }
                self.extended_headers = true;
                continue_with(option_reply(option, REP_ACK, &[]))
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(option, data),
            _ => error_reply(option, REP_ERR_UNSUP, "unsupported option"),
        }
    }

    fn export_name(&mut self, data: &[u8]) -> OptionOutcome {
        // The spec forbids EXPORT_NAME once extended headers were negotiated, and this option
        // has no error reply: hang up, as qemu-nbd does.
        if data.len() > MAX_NAME_LEN || self.extended_headers {
            return close();
        }
        // This option cannot report errors: an unknown name means hanging up.
        let Some(name) = std::str::from_utf8(data).ok() else {
            return close();
        };
        let Some(export) = self.find_export(name) else {
            return close();
        };
        let session = self.session(export);
        let mut reply = Vec::with_capacity(10 + 124);
        put_u64(&mut reply, self.exports[export].size);
        put_u16(&mut reply, session.transmission_flags);
        if !self.no_zeroes {
            reply.extend_from_slice(&[0u8; 124]);
        }
        OptionOutcome {
            reply,
            next: Next::Transmit(session),
        }
    }

    fn info_or_go(&mut self, option: u32, data: &[u8]) -> OptionOutcome {
        let mut r = Reader::new(data);
        let Some(name) = r.string() else {
            return error_reply(option, REP_ERR_INVALID, "malformed export name");
        };
        let Some(count) = r.u16() else {
            return error_reply(option, REP_ERR_INVALID, "missing information request count");
        };
        if r.remaining() != count as usize * 2 {
            return error_reply(
                option,
                REP_ERR_INVALID,
                "information request list length mismatch",
            );
        }
        let mut requests = Vec::with_capacity(count as usize);
        for _ in 0..count {
            requests.push(r.u16().unwrap_or(u16::MAX));
        }
        let Some(export) = self.find_export(&name) else {
            return error_reply(option, REP_ERR_UNKNOWN, "no such export");
        };
        let info = &self.exports[export];
        let session = self.session(export);
        let mut reply = Vec::new();

        let mut body = Vec::with_capacity(12);
        put_u16(&mut body, INFO_EXPORT);
        put_u64(&mut body, info.size);
        put_u16(&mut body, session.transmission_flags);
        reply.extend(option_reply(option, REP_INFO, &body));

        // Block sizes are always sent: they are the defaults any client assumes, stated.
        let mut body = Vec::with_capacity(14);
        put_u16(&mut body, INFO_BLOCK_SIZE);
        put_u32(&mut body, 1);
        put_u32(&mut body, PREFERRED_BLOCK);
        put_u32(&mut body, MAX_PAYLOAD);
        reply.extend(option_reply(option, REP_INFO, &body));

        if requests.contains(&INFO_NAME) {
            let mut body = Vec::with_capacity(2 + info.name.len());
            put_u16(&mut body, INFO_NAME);
            body.extend_from_slice(info.name.as_bytes());
            reply.extend(option_reply(option, REP_INFO, &body));
        }
        if requests.contains(&INFO_DESCRIPTION) && !info.description.is_empty() {
            let mut body = Vec::with_capacity(2 + info.description.len());
            put_u16(&mut body, INFO_DESCRIPTION);
            body.extend_from_slice(info.description.as_bytes());
            reply.extend(option_reply(option, REP_INFO, &body));
        }
        reply.extend(option_reply(option, REP_ACK, &[]));
        OptionOutcome {
            reply,
            next: if option == OPT_GO {
                Next::Transmit(session)
            } else {
                Next::Continue
            },
        }
    }

    fn meta_context(&mut self, option: u32, data: &[u8]) -> OptionOutcome {
        let setting = option == OPT_SET_META_CONTEXT;
        if setting {
            // SET replaces the previous selection even when it fails.
            self.meta_context_export = None;
        }
        if !self.structured_replies && !self.extended_headers {
            return error_reply(
                option,
                REP_ERR_INVALID,
                "negotiate structured replies before meta contexts",
            );
        }
        let mut r = Reader::new(data);
        let Some(name) = r.string() else {
            return error_reply(option, REP_ERR_INVALID, "malformed export name");
        };
        let Some(count) = r.u32() else {
            return error_reply(option, REP_ERR_INVALID, "missing query count");
        };
        let mut queries = Vec::new();
        for _ in 0..count {
            match r.string() {
                Some(q) => queries.push(q),
                None => return error_reply(option, REP_ERR_INVALID, "malformed query"),
            }
        }
        if r.remaining() != 0 {
            return error_reply(option, REP_ERR_INVALID, "trailing bytes after queries");
        }
        let Some(export) = self.find_export(&name) else {
            return error_reply(option, REP_ERR_UNKNOWN, "no such export");
        };
        let matches = if setting {
            queries.iter().any(|q| q == BASE_ALLOCATION)
        } else {
            queries.is_empty() || queries.iter().any(|q| q == "base:" || q == BASE_ALLOCATION)
        };
        let mut reply = Vec::new();
        if matches {
            let id = if setting { BASE_ALLOCATION_ID } else { 0 };
            let mut body = Vec::with_capacity(4 + BASE_ALLOCATION.len());
            put_u32(&mut body, id);
            body.extend_from_slice(BASE_ALLOCATION.as_bytes());
            reply.extend(option_reply(option, REP_META_CONTEXT, &body));
            if setting {
                self.meta_context_export = Some(export);
            }
        }
        reply.extend(option_reply(option, REP_ACK, &[]));
        continue_with(reply)
    }
}

fn continue_with(reply: Vec<u8>) -> OptionOutcome {
    OptionOutcome {
        reply,
        next: Next::Continue,
    }
}

fn close() -> OptionOutcome {
    OptionOutcome {
        reply: Vec::new(),
        next: Next::Close,
    }
}

fn error_reply(option: u32, reply_type: u32, message: &str) -> OptionOutcome {
    continue_with(option_reply(option, reply_type, message.as_bytes()))
}

/// Encodes one option reply.
pub fn option_reply(option: u32, reply_type: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + body.len());
    put_u64(&mut out, OPTION_REPLY_MAGIC);
    put_u32(&mut out, option);
    put_u32(&mut out, reply_type);
    put_u32(&mut out, body.len() as u32);
    out.extend_from_slice(body);
    out
}
