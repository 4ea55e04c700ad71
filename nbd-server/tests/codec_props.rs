//! Property tests of the pure codec: no input panics it, what it accepts is in range,
//! and what it encodes decodes back.

use nbd_server::fuzzing::{drive_connection, sample_exports};
use nbd_server::handshake::{self, Negotiation, Next, Session};
use nbd_server::proto::*;
use nbd_server::reply::{self, Extent, ReplyMode, ReplyTo};
use nbd_server::request::{self, Command, RequestHeader};
use proptest::prelude::*;

fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn go_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

fn session(structured: bool, extended: bool, read_only: bool) -> Session {
    Session {
        export: 0,
        structured_replies: structured || extended,
        extended_headers: extended,
        base_allocation: structured || extended,
        transmission_flags: nbd_server::transmission_flags(read_only) | TF_HAS_FLAGS,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        drive_connection(&sample_exports(), &bytes);
    }

    #[test]
    fn well_formed_prefix_then_arbitrary_requests_never_panic(
        extended in any::<bool>(),
        tail in proptest::collection::vec(any::<u8>(), 0..1024),
    ) {
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(option(if extended { OPT_EXTENDED_HEADERS } else { OPT_STRUCTURED_REPLY }, &[]));
        input.extend(option(OPT_GO, &go_data("disk0")));
        input.extend(tail);
        drive_connection(&sample_exports(), &input);
    }

    #[test]
    fn arbitrary_option_sequences_never_panic(
        opts in proptest::collection::vec((0u32..14, proptest::collection::vec(any::<u8>(), 0..64)), 0..8)
    ) {
        let exports = sample_exports();
        let mut n = Negotiation::new(&exports, 3).unwrap();
        for (opt, data) in opts {
            let out = n.handle_option(opt, &data);
            if out.next != Next::Continue { break; }
        }
    }

    #[test]
    fn request_header_round_trips(
        flags in any::<u16>(), kind in any::<u16>(), cookie in any::<u64>(),
        offset in any::<u64>(), length in any::<u64>(), extended in any::<bool>(),
    ) {
        let length = if extended { length } else { length & 0xffff_ffff };
        let h = RequestHeader { flags, kind, cookie, offset, length };
        let mut bytes = Vec::new();
        request::encode_header(&h, extended, &mut bytes);
        prop_assert_eq!(bytes.len(), request::header_len(extended));
        prop_assert_eq!(request::decode_header(&bytes, extended), Ok(h));
    }

    #[test]
    fn accepted_ranges_are_inside_the_export(
        flags in any::<u16>(), kind in 0u16..10, offset in any::<u64>(), length in any::<u64>(),
        size in 0u64..(1 << 40), structured in any::<bool>(), extended in any::<bool>(),
        read_only in any::<bool>(),
    ) {
        let h = RequestHeader { flags, kind, cookie: 1, offset, length };
        let s = session(structured, extended, read_only);
        if let Ok(cmd) = request::validate(&h, &s, size) {
            let range = match cmd {
                Command::Read { offset, length } | Command::Cache { offset, length } => Some((offset, length)),
                Command::Write { offset, length, .. } | Command::Trim { offset, length, .. } => Some((offset, length)),
                Command::WriteZeroes { offset, length, .. } => Some((offset, length)),
                Command::BlockStatus { offset, length, .. } => Some((offset, length)),
                Command::Flush | Command::Disconnect => None,
            };
            if let Some((o, l)) = range {
                prop_assert!(o.checked_add(l).is_some_and(|e| e <= size));
            }
            if read_only {
                let writes = matches!(cmd, Command::Write { .. } | Command::Trim { .. } | Command::WriteZeroes { .. });
                prop_assert!(!writes);
            }
            if let Command::Read { length, .. } | Command::Write { length, .. } = cmd {
                prop_assert!(length <= MAX_PAYLOAD as u64);
            }
        }
    }

    #[test]
    fn structured_chunks_frame_their_payload(
        extended in any::<bool>(), len in 0u64..100_000, cookie in any::<u64>(), offset in any::<u64>(),
        n_extents in 1usize..50, msg in ".{0,100}",
    ) {
        let mode = ReplyMode::for_session(true, extended);
        let to = ReplyTo { cookie, offset };
        let hdr = if extended { 32 } else { 20 };
        let payload_len = |b: &[u8]| if extended {
            u64::from_be_bytes(b[24..32].try_into().unwrap())
        } else {
            u32::from_be_bytes(b[16..20].try_into().unwrap()) as u64
        };

        let mut out = Vec::new();
        reply::read_data_header(&mut out, mode, to, len);
        let expect = if len == 0 { 0 } else { 8 + len };
        prop_assert_eq!(payload_len(&out), expect);
        prop_assert_eq!(out.len() as u64, hdr + expect.min(8));

        let mut out = Vec::new();
        let extents: Vec<Extent> = (0..n_extents).map(|i| Extent { length: i as u64 + 1, flags: 3 }).collect();
        reply::block_status(&mut out, mode, to, 1, &extents);
        prop_assert_eq!(out.len() as u64, hdr + payload_len(&out));

        let mut out = Vec::new();
        reply::error(&mut out, mode, to, NbdErrno::Inval, &msg);
        prop_assert_eq!(out.len() as u64, hdr + payload_len(&out));
        if extended {
            prop_assert_eq!(u64::from_be_bytes(out[16..24].try_into().unwrap()), offset);
        }
    }
}

#[test]
fn go_on_unknown_export_is_refused_and_negotiation_continues() {
    let exports = sample_exports();
    let mut n = Negotiation::new(&exports, 3).unwrap();
    let out = n.handle_option(OPT_GO, &go_data("nope"));
    assert_eq!(out.next, Next::Continue);
    assert_eq!(
        u32::from_be_bytes(out.reply[12..16].try_into().unwrap()),
        REP_ERR_UNKNOWN
    );
    let out = n.handle_option(OPT_GO, &go_data(""));
    assert!(matches!(out.next, Next::Transmit(s) if s.export == 0));
}

#[test]
fn unknown_client_flags_close_the_connection() {
    let exports = sample_exports();
    assert!(Negotiation::new(&exports, 1 << 7).is_err());
}

#[test]
fn export_name_pads_with_zeroes_unless_no_zeroes() {
    let exports = sample_exports();
    let mut n = Negotiation::new(&exports, FLAG_C_FIXED_NEWSTYLE).unwrap();
    let out = n.handle_option(OPT_EXPORT_NAME, b"disk0");
    assert_eq!(out.reply.len(), 8 + 2 + 124);
    let mut n = Negotiation::new(&exports, 3).unwrap();
    let out = n.handle_option(OPT_EXPORT_NAME, b"disk0");
    assert_eq!(out.reply.len(), 10);
    let mut n = Negotiation::new(&exports, 3).unwrap();
    assert_eq!(n.handle_option(OPT_EXPORT_NAME, b"nope").next, Next::Close);
}

#[test]
fn export_name_after_extended_headers_closes() {
    let exports = sample_exports();
    let mut n = Negotiation::new(&exports, 3).unwrap();
    n.handle_option(OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(n.handle_option(OPT_EXPORT_NAME, b"disk0").next, Next::Close);
}

#[test]
fn df_is_advertised_only_with_structured_replies() {
    let exports = sample_exports();
    let mut n = Negotiation::new(&exports, 3).unwrap();
    let Next::Transmit(s) = n.handle_option(OPT_GO, &go_data("disk0")).next else {
        panic!()
    };
    assert_eq!(s.transmission_flags & TF_SEND_DF, 0);
    let mut n = Negotiation::new(&exports, 3).unwrap();
    n.handle_option(OPT_STRUCTURED_REPLY, &[]);
    let Next::Transmit(s) = n.handle_option(OPT_GO, &go_data("disk0")).next else {
        panic!()
    };
    assert_ne!(s.transmission_flags & TF_SEND_DF, 0);
}

#[test]
fn meta_context_needs_structured_replies_and_selects_base_allocation() {
    let exports = sample_exports();
    let mut q = (5u32).to_be_bytes().to_vec();
    q.extend_from_slice(b"disk0");
    q.extend_from_slice(&1u32.to_be_bytes());
    q.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
    q.extend_from_slice(BASE_ALLOCATION.as_bytes());
    let mut n = Negotiation::new(&exports, 3).unwrap();
    let out = n.handle_option(OPT_SET_META_CONTEXT, &q);
    assert_eq!(
        u32::from_be_bytes(out.reply[12..16].try_into().unwrap()),
        REP_ERR_INVALID
    );
    n.handle_option(OPT_STRUCTURED_REPLY, &[]);
    let out = n.handle_option(OPT_SET_META_CONTEXT, &q);
    assert_eq!(
        u32::from_be_bytes(out.reply[12..16].try_into().unwrap()),
        REP_META_CONTEXT
    );
    let Next::Transmit(s) = n.handle_option(OPT_GO, &go_data("disk0")).next else {
        panic!()
    };
    assert!(s.base_allocation);
    // Selected for disk0, so a GO to another export has no context.
    let mut n = Negotiation::new(&exports, 3).unwrap();
    n.handle_option(OPT_STRUCTURED_REPLY, &[]);
    n.handle_option(OPT_SET_META_CONTEXT, &q);
    let Next::Transmit(s) = n.handle_option(OPT_GO, &go_data("ro")).next else {
        panic!()
    };
    assert!(!s.base_allocation);
}

#[test]
fn structured_reply_after_extended_headers_is_refused() {
    let exports = sample_exports();
    let mut n = Negotiation::new(&exports, 3).unwrap();
    n.handle_option(OPT_EXTENDED_HEADERS, &[]);
    let out = n.handle_option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(
        u32::from_be_bytes(out.reply[12..16].try_into().unwrap()),
        REP_ERR_EXT_HEADER_REQD
    );
}

/// NBD_CMD_DISC has no reply, whatever flags it carries: refusing one would answer it and
/// keep reading.
#[test]
fn disconnect_is_never_refused() {
    let s = session(true, false, false);
    for flags in [
        0,
        CMD_FLAG_FAST_ZERO,
        CMD_FLAG_DF,
        CMD_FLAG_PAYLOAD_LEN,
        0x8000,
    ] {
        let h = RequestHeader {
            flags,
            kind: CMD_DISC,
            cookie: 1,
            offset: u64::MAX,
            length: 7,
        };
        assert_eq!(request::validate(&h, &s, 4096), Ok(Command::Disconnect));
    }
}

/// The spec: the server SHOULD refuse with EINVAL a flag not documented for the command (or
/// not negotiated). What QEMU, libnbd and the kernel really send must still pass: FUA on
/// anything (SEND_FUA is always advertised), NO_HOLE and FAST_ZERO on WRITE_ZEROES, DF on
/// READ with structured replies, REQ_ONE on BLOCK_STATUS, PAYLOAD_LEN on an extended WRITE.
#[test]
fn flags_are_accepted_only_on_the_commands_they_apply_to() {
    let simple = session(false, false, false);
    let structured = session(true, false, false);
    let extended = session(true, true, false);
    let read_only = session(true, false, true);
    let h = |kind, flags| RequestHeader {
        flags,
        kind,
        cookie: 1,
        offset: 0,
        length: 512,
    };
    let refused = [
        (&structured, CMD_WRITE, CMD_FLAG_NO_HOLE),
        (&structured, CMD_TRIM, CMD_FLAG_NO_HOLE),
        (&structured, CMD_READ, CMD_FLAG_NO_HOLE),
        (&structured, CMD_READ, CMD_FLAG_REQ_ONE),
        (&structured, CMD_WRITE_ZEROES, CMD_FLAG_REQ_ONE),
        (&structured, CMD_WRITE, CMD_FLAG_DF),
        (&structured, CMD_BLOCK_STATUS, CMD_FLAG_DF),
        (&structured, CMD_FLUSH, CMD_FLAG_DF),
        (&structured, CMD_CACHE, CMD_FLAG_DF),
        (&simple, CMD_READ, CMD_FLAG_DF),
        (&structured, CMD_WRITE, CMD_FLAG_FAST_ZERO),
        (&structured, CMD_TRIM, CMD_FLAG_FAST_ZERO),
        // A read-only export does not advertise SEND_FAST_ZERO.
        (&read_only, CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO),
        (&structured, CMD_WRITE, CMD_FLAG_PAYLOAD_LEN),
        (&extended, CMD_READ, CMD_FLAG_PAYLOAD_LEN),
        (&extended, CMD_BLOCK_STATUS, CMD_FLAG_PAYLOAD_LEN),
        (&structured, CMD_READ, 1 << 6),
        (&structured, CMD_WRITE, CMD_FLAG_FUA | 0x8000),
    ];
    for (s, kind, flags) in refused {
        assert_eq!(
            request::validate(&h(kind, flags), s, 4096).map_err(|r| r.errno),
            Err(NbdErrno::Inval),
            "command {kind} with flags {flags:#x} (structured {}, extended {})",
            s.structured_replies,
            s.extended_headers
        );
    }
    let accepted = [
        (&simple, CMD_READ, CMD_FLAG_FUA),
        (&simple, CMD_WRITE, CMD_FLAG_FUA),
        (&simple, CMD_FLUSH, CMD_FLAG_FUA),
        (&simple, CMD_TRIM, CMD_FLAG_FUA),
        (&simple, CMD_CACHE, CMD_FLAG_FUA),
        (
            &simple,
            CMD_WRITE_ZEROES,
            CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        ),
        (&structured, CMD_READ, CMD_FLAG_DF | CMD_FLAG_FUA),
        (&extended, CMD_READ, CMD_FLAG_DF),
        (
            &structured,
            CMD_BLOCK_STATUS,
            CMD_FLAG_REQ_ONE | CMD_FLAG_FUA,
        ),
        (&extended, CMD_WRITE, CMD_FLAG_PAYLOAD_LEN | CMD_FLAG_FUA),
        (&extended, CMD_WRITE, 0),
        (&read_only, CMD_READ, CMD_FLAG_FUA),
    ];
    for (s, kind, flags) in accepted {
        assert!(
            request::validate(&h(kind, flags), s, 4096).is_ok(),
            "command {kind} with flags {flags:#x} (structured {}, extended {})",
            s.structured_replies,
            s.extended_headers
        );
    }
}

#[test]
fn errors_the_spec_names() {
    let s = session(true, false, false);
    let ro = session(true, false, true);
    let h = |kind, offset, length, flags| RequestHeader {
        flags,
        kind,
        cookie: 1,
        offset,
        length,
    };
    let e = |r: Result<Command, request::Rejection>| r.unwrap_err().errno;
    assert_eq!(
        e(request::validate(&h(CMD_READ, 4000, 200, 0), &s, 4096)),
        NbdErrno::Inval
    );
    assert_eq!(
        e(request::validate(&h(CMD_WRITE, 4000, 200, 0), &s, 4096)),
        NbdErrno::NoSpc
    );
    assert_eq!(
        e(request::validate(
            &h(CMD_WRITE_ZEROES, 4000, 200, 0),
            &s,
            4096
        )),
        NbdErrno::NoSpc
    );
    assert_eq!(
        e(request::validate(&h(CMD_TRIM, 4000, 200, 0), &s, 4096)),
        NbdErrno::Inval
    );
    assert_eq!(
        e(request::validate(&h(CMD_WRITE, 0, 1, 0), &ro, 4096)),
        NbdErrno::Perm
    );
    assert_eq!(
        e(request::validate(&h(99, 0, 1, 0), &s, 4096)),
        NbdErrno::Inval
    );
    assert_eq!(
        e(request::validate(&h(CMD_READ, 0, 1, 1 << 9), &s, 4096)),
        NbdErrno::Inval
    );
    assert_eq!(
        e(request::validate(&h(CMD_READ, u64::MAX, 2, 0), &s, 4096)),
        NbdErrno::Inval
    );
    assert_eq!(
        e(request::validate(&h(CMD_READ, 0, 64 << 20, 0), &s, 1 << 30)),
        NbdErrno::Overflow
    );
    assert_eq!(
        e(request::validate(&h(CMD_BLOCK_STATUS, 0, 0, 0), &s, 4096)),
        NbdErrno::Inval
    );
    let mut no_ctx = s;
    no_ctx.base_allocation = false;
    assert_eq!(
        e(request::validate(
            &h(CMD_BLOCK_STATUS, 0, 1, 0),
            &no_ctx,
            4096
        )),
        NbdErrno::Inval
    );
    assert!(request::validate(&h(CMD_FLUSH, 0, 0, CMD_FLAG_FUA), &s, 4096).is_ok());
}

/// While the server shuts down, options are refused with ERR_SHUTDOWN (the client then
/// disconnects), ABORT is still acknowledged, and EXPORT_NAME, which has no error reply,
/// closes.
#[test]
fn options_while_shutting_down() {
    let exports = sample_exports();
    let n = Negotiation::new(&exports, 3).unwrap();
    let reply_type = |out: &handshake::OptionOutcome| {
        u32::from_be_bytes([out.reply[12], out.reply[13], out.reply[14], out.reply[15]])
    };
    for opt in [OPT_GO, OPT_INFO, OPT_LIST, OPT_STRUCTURED_REPLY, 99] {
        let out = n.handle_option_shutting_down(opt);
        assert_eq!(out.next, Next::Continue, "option {opt}");
        assert_eq!(reply_type(&out), REP_ERR_SHUTDOWN, "option {opt}");
    }
    let out = n.handle_option_shutting_down(OPT_ABORT);
    assert_eq!((reply_type(&out), out.next), (REP_ACK, Next::Close));
    let out = n.handle_option_shutting_down(OPT_EXPORT_NAME);
    assert_eq!(
        out,
        handshake::OptionOutcome {
            reply: Vec::new(),
            next: Next::Close
        }
    );
}

#[test]
fn greeting_is_fixed_newstyle() {
    let g = handshake::greeting();
    assert_eq!(&g[0..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT");
    assert_eq!(
        u16::from_be_bytes([g[16], g[17]]),
        FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
    );
}
