//! Drives a whole client byte stream through the pure codec, as the server loop would,
//! without sockets. Shared by the `cargo fuzz` targets and the property tests, so both
//! exercise the same path.

use crate::handshake::{self, ExportInfo, Negotiation, Next, MAX_OPTION_LEN};
use crate::proto::*;
use crate::request;

/// A small export list to negotiate against.
pub fn sample_exports() -> Vec<ExportInfo> {
    vec![
        ExportInfo {
            name: "disk0".into(),
            description: "fuzz".into(),
            size: 1 << 20,
            base_flags: crate::server::transmission_flags(false),
        },
        ExportInfo {
            name: "ro".into(),
            description: String::new(),
            size: 4096,
            base_flags: crate::server::transmission_flags(true),
        },
    ]
}

/// Feeds `input` as a client would send it: flags, options, then requests. Returns how
/// many requests were validated. Must never panic, whatever the input.
pub fn drive_connection(exports: &[ExportInfo], input: &[u8]) -> usize {
    let mut rest = input;
    let mut take = |n: usize| -> Option<Vec<u8>> {
        if rest.len() < n {
            return None;
        }
        let (a, b) = rest.split_at(n);
        rest = b;
        Some(a.to_vec())
    };
    let Some(flags) = take(4) else { return 0 };
    let flags = u32::from_be_bytes([flags[0], flags[1], flags[2], flags[3]]);
    let Ok(mut negotiation) = Negotiation::new(exports, flags) else {
        return 0;
    };
    let session = loop {
        let Some(h) = take(16) else { return 0 };
        let mut header = [0u8; 16];
        header.copy_from_slice(&h);
        let Ok((option, len)) = handshake::parse_option_header(&header) else {
            return 0;
        };
        let outcome = if len > MAX_OPTION_LEN {
            negotiation.handle_oversized(option)
        } else {
            let Some(data) = take(len as usize) else {
                return 0;
            };
            negotiation.handle_option(option, &data)
        };
        assert_reply_well_formed(&outcome.reply);
        match outcome.next {
            Next::Continue => {}
            Next::Close => return 0,
            Next::Transmit(s) => break s,
        }
    };
    let size = exports[session.export].size;
    let mut validated = 0;
    loop {
        let Some(h) = take(request::header_len(session.extended_headers)) else {
            return validated;
        };
        let Ok(header) = request::decode_header(&h, session.extended_headers) else {
            return validated;
        };
        let Ok(payload) = request::payload_len(&header, session.extended_headers) else {
            return validated;
        };
        if let Ok(cmd) = request::validate(&header, &session, size) {
            assert_in_range(&cmd, size);
        }
        validated += 1;
        if take(payload.min(1 << 20) as usize).is_none() {
            return validated;
        }
    }
}

fn assert_in_range(cmd: &request::Command, size: u64) {
    use request::Command::*;
    let (offset, length) = match *cmd {
        Read { offset, length }
        | Write { offset, length, .. }
        | Trim { offset, length, .. }
        | Cache { offset, length }
        | WriteZeroes { offset, length, .. }
        | BlockStatus { offset, length, .. } => (offset, length),
        Disconnect | Flush => return,
    };
    assert!(offset.checked_add(length).is_some_and(|e| e <= size));
}

/// Every option reply the negotiation emits is a sequence of well-framed messages (or the
/// EXPORT_NAME answer, which has its own shape).
fn assert_reply_well_formed(mut reply: &[u8]) {
    if reply.len() == 10 || reply.len() == 134 {
        return; // EXPORT_NAME: size, flags, optional zero padding.
    }
    while !reply.is_empty() {
        assert!(reply.len() >= 20, "truncated option reply");
        let magic = u64::from_be_bytes(reply[0..8].try_into().unwrap_or([0; 8]));
        assert_eq!(magic, OPTION_REPLY_MAGIC);
        let len = u32::from_be_bytes(reply[16..20].try_into().unwrap_or([0; 4])) as usize;
        assert!(
            reply.len() >= 20 + len,
            "option reply shorter than its length field"
        );
        reply = &reply[20 + len..];
    }
}
