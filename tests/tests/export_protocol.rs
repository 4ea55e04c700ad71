//! The NBD protocol on raw sockets: extended headers, simple replies (the Linux kernel's
//! client), the option haggling, and pipelined requests with out-of-order replies. Replies are
//! decoded by hand in `nbdmirror_tests::raw`.

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use nbd_server::proto::*;
use nbdmirror_tests::data::{assert_bytes_eq, pattern};
use nbdmirror_tests::raw::{Mode, Reply};
use nbdmirror_tests::TestEnv;

const MIB: u64 = 1 << 20;

/// The encoder of the crate under test lays headers out as the spec says (so the tests that
/// use it send what they mean to send).
#[test]
fn request_encoder_matches_the_spec_layout() {
    let h = nbd_server::request::RequestHeader {
        flags: 0x0102,
        kind: 0x0304,
        cookie: 0x0506_0708_090a_0b0c,
        offset: 0x1112_1314_1516_1718,
        length: 0x2122_2324_2526_2728,
    };
    let mut compact = Vec::new();
    nbd_server::request::encode_header(&h, false, &mut compact);
    let mut want = vec![0x25, 0x60, 0x95, 0x13, 1, 2, 3, 4];
    want.extend_from_slice(&[5, 6, 7, 8, 9, 10, 11, 12]);
    want.extend_from_slice(&[0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18]);
    want.extend_from_slice(&[0x25, 0x26, 0x27, 0x28]);
    assert_eq!(compact, want);
    let mut ext = Vec::new();
    nbd_server::request::encode_header(&h, true, &mut ext);
    let mut want = vec![0x21, 0xe4, 0x1c, 0x71, 1, 2, 3, 4];
    want.extend_from_slice(&[5, 6, 7, 8, 9, 10, 11, 12]);
    want.extend_from_slice(&[0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18]);
    want.extend_from_slice(&[0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28]);
    assert_eq!(ext, want);
}

#[track_caller]
fn assert_extended(r: &Reply, offset: u64) {
    assert!(
        r.magics.iter().all(|&m| m == 0x6e8a_278c),
        "every reply must be extended once negotiated: {r:?}"
    );
    assert!(
        r.echoed_offsets.iter().all(|&o| o == offset),
        "extended replies echo the request offset {offset}: {:?}",
        r.echoed_offsets
    );
}

#[test]
fn extended_headers_write_read_and_block_status_ext_over_tcp() {
    let env = TestEnv::new();
    let server = env.start_export("64M", &[]);
    let _ = &server;
    let mut c = env.raw_tcp();
    let ctx = c.negotiate(Mode::Extended, true, "").expect("context id");
    assert_eq!(c.size, 64 * MIB);
    assert_ne!(c.tflags & TF_HAS_FLAGS, 0);

    // WRITE with PAYLOAD_LEN, read back.
    let data = pattern(1, 5000, 100_000);
    let r = c.request(
        CMD_FLAG_PAYLOAD_LEN,
        CMD_WRITE,
        5000,
        data.len() as u64,
        &data,
    );
    assert_eq!(r.error, 0, "{r:?}");
    assert_extended(&r, 5000);
    assert_eq!(
        r.chunk_types,
        vec![REPLY_TYPE_NONE],
        "a write's reply is one NONE chunk"
    );
    let r = c.request(0, CMD_READ, 5000, data.len() as u64, &[]);
    assert_eq!(r.error, 0, "{r:?}");
    assert_extended(&r, 5000);
    assert_eq!(r.data_covered, data.len() as u64);
    assert_bytes_eq(&r.data, &data, "extended read");

    // A WRITE without PAYLOAD_LEN still carries its payload (lenient, like qemu-nbd).
    let data2 = pattern(2, 3 * MIB, 4096);
    let r = c.request(0, CMD_WRITE, 3 * MIB, 4096, &data2);
    assert_eq!(r.error, 0, "{r:?}");
    assert_extended(&r, 3 * MIB);
    assert_bytes_eq(
        &c.read(3 * MIB, 4096).unwrap(),
        &data2,
        "write without PAYLOAD_LEN",
    );

    // Block status over the whole export, with a 64-bit effect length. The image is sparse
    // and the file system allocates 4 KiB blocks, so the data extents are rounded to them.
    let r = c.request(0, CMD_BLOCK_STATUS, 0, 64 * MIB, &[]);
    assert_eq!(r.error, 0, "{r:?}");
    assert_extended(&r, 0);
    assert_eq!(r.chunk_types, vec![REPLY_TYPE_BLOCK_STATUS_EXT], "{r:?}");
    assert_eq!(r.extents.len(), 1);
    assert_eq!(r.extents[0].0, ctx, "context id");
    let want = vec![
        (4096, 3),
        (102_400, 0),
        (3 * MIB - 106_496, 3),
        (4096, 0),
        (64 * MIB - 3 * MIB - 4096, 3),
    ];
    assert_eq!(r.extents[0].1, want, "extents after two writes");

    // REQ_ONE: exactly one extent, not beyond the request.
    let r = c.request(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 8192, 1000, &[]);
    assert_eq!(r.error, 0, "{r:?}");
    assert_eq!(r.extents[0].1, vec![(1000, 0)], "{r:?}");

    // Errors are extended too.
    let r = c.request(0, CMD_READ, 64 * MIB - 10, 4096, &[]);
    assert_eq!(r.error, 22, "read past the end: {r:?}");
    assert_extended(&r, 64 * MIB - 10);
    assert!(r.chunk_types.contains(&REPLY_TYPE_ERROR), "{r:?}");
    // WRITE_ZEROES with an effect length over 32 MiB (no payload).
    let r = c.request(0, CMD_WRITE_ZEROES, 0, 40 * MIB, &[]);
    assert_eq!(r.error, 0, "{r:?}");
    assert_extended(&r, 0);
    assert_eq!(c.read(5000, 100).unwrap(), vec![0u8; 100]);
    let r = c.request(0, CMD_FLUSH, 0, 0, &[]);
    assert_eq!(r.error, 0);
    assert_extended(&r, 0);
    c.disconnect();
}

/// Negotiates with NBD_OPT_EXPORT_NAME, as nbd-client does for the Linux kernel, with or
/// without the 124 zero bytes, and uses simple replies only.
#[test]
fn export_name_handshake_and_simple_replies() {
    let env = TestEnv::new();
    let server = env.start_export("16M", &[]);
    for (no_zeroes, tcp) in [(false, true), (true, true), (false, false), (true, false)] {
        let mut c = if tcp {
            env.raw_tcp()
        } else {
            server.raw_unix()
        };
        let hflags = c.read_greeting().unwrap();
        assert_ne!(hflags & FLAG_FIXED_NEWSTYLE, 0);
        assert_ne!(hflags & FLAG_NO_ZEROES, 0);
        let cflags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
        c.send_client_flags(cflags).unwrap();
        c.send_option(OPT_EXPORT_NAME, b"").unwrap();
        let reply = c.recv(10).unwrap();
        assert_eq!(
            u64::from_be_bytes(reply[0..8].try_into().unwrap()),
            16 * MIB
        );
        let tflags = u16::from_be_bytes([reply[8], reply[9]]);
        assert_ne!(tflags & TF_HAS_FLAGS, 0);
        assert_ne!(tflags & TF_SEND_FLUSH, 0);
        assert_eq!(tflags & TF_SEND_DF, 0, "DF needs structured replies");
        if !no_zeroes {
            assert_eq!(c.recv(124).unwrap(), vec![0u8; 124], "124 zero bytes");
        }
        // Transmission with simple replies: the first reply must start right here (no
        // stray zero bytes, none missing).
        let data = pattern(no_zeroes as u64, 4097, 3000);
        let r = c.request(0, CMD_WRITE, 4097, 3000, &data);
        assert_eq!((r.error, r.magics.clone()), (0, vec![SIMPLE_REPLY_MAGIC]));
        let r = c.request(0, CMD_READ, 4097, 3000, &[]);
        assert_eq!(r.magics, vec![SIMPLE_REPLY_MAGIC]);
        assert_eq!(r.error, 0);
        assert_bytes_eq(&r.data, &data, "simple read");
        let r = c.request(CMD_FLAG_FUA, CMD_WRITE, 16 * MIB - 1, 1, &[0xee]);
        assert_eq!(r.error, 0);
        assert_eq!(c.read(16 * MIB - 1, 1).unwrap(), vec![0xee]);
        let r = c.request(0, CMD_FLUSH, 0, 0, &[]);
        assert_eq!((r.error, r.magics.clone()), (0, vec![SIMPLE_REPLY_MAGIC]));
        // A failed read: simple reply with the error and no data; the stream stays in sync.
        let r = c.request(0, CMD_READ, 16 * MIB, 512, &[]);
        assert_eq!((r.error, r.magics.clone()), (22, vec![SIMPLE_REPLY_MAGIC]));
        assert_bytes_eq(&c.read(4097, 3000).unwrap(), &data, "read after an error");
        let r = c.request(0, CMD_WRITE_ZEROES, 4097, 1000, &[]);
        assert_eq!(r.error, 0);
        let r = c.request(0, CMD_TRIM, 1 << 20, 1 << 20, &[]);
        assert_eq!(r.error, 0);
        assert_eq!(c.read(4097, 1000).unwrap(), vec![0u8; 1000]);
        c.disconnect();
    }
    // A client that asks for an unknown name with EXPORT_NAME is hung up on.
    let mut c = server.raw_unix();
    c.start();
    c.send_option(OPT_EXPORT_NAME, b"no-such-export").unwrap();
    assert!(c.server_closed_within(Duration::from_secs(10)));
    // The export's own name works too.
    let mut c = server.raw_unix();
    c.start();
    c.send_option(OPT_EXPORT_NAME, b"disk").unwrap();
    assert_eq!(c.recv(10).unwrap()[..8], (16 * MIB).to_be_bytes());
}

/// GO without structured replies: simple replies, like EXPORT_NAME.
#[test]
fn go_without_structured_replies_uses_simple_replies() {
    let env = TestEnv::new();
    let server = env.start_export("8M", &[]);
    let mut c = server.raw_unix();
    c.negotiate(Mode::Simple, false, "disk");
    assert_eq!(c.size, 8 * MIB);
    let data = pattern(9, 0, 65536);
    assert_eq!(c.write(0, &data, 0), 0);
    let r = c.request(0, CMD_READ, 0, 65536, &[]);
    assert_eq!(r.magics, vec![SIMPLE_REPLY_MAGIC]);
    assert_bytes_eq(&r.data, &data, "read");
    // DF without structured replies is invalid.
    let r = c.request(CMD_FLAG_DF, CMD_READ, 0, 512, &[]);
    assert_eq!(r.error, 22, "{r:?}");
    assert_eq!(c.flush(), 0);
}

#[test]
fn structured_replies_read_errors_are_structured() {
    let env = TestEnv::new();
    let server = env.start_export("8M", &[]);
    let mut c = server.raw_unix();
    let ctx = c.negotiate(Mode::Structured, true, "").unwrap();
    let data = pattern(5, 12345, 70000);
    assert_eq!(c.write(12345, &data, 0), 0);
    let r = c.request(0, CMD_READ, 12345, 70000, &[]);
    assert_eq!(r.error, 0);
    assert!(
        r.magics.iter().all(|&m| m == STRUCTURED_REPLY_MAGIC),
        "{r:?}"
    );
    assert_bytes_eq(&r.data, &data, "structured read");
    // DF read: one content chunk.
    let r = c.request(CMD_FLAG_DF, CMD_READ, 12345, 65536, &[]);
    assert_eq!(r.error, 0);
    let content = r
        .chunk_types
        .iter()
        .filter(|&&t| t == REPLY_TYPE_OFFSET_DATA || t == REPLY_TYPE_OFFSET_HOLE)
        .count();
    assert_eq!(content, 1, "DF: at most one content chunk: {r:?}");
    // A refused READ must not get a simple reply once structured replies are on.
    let r = c.request(0, CMD_READ, 8 * MIB - 1, 2, &[]);
    assert_eq!(r.error, 22);
    assert_eq!(r.magics, vec![STRUCTURED_REPLY_MAGIC], "{r:?}");
    let r = c.request(1 << 13, CMD_READ, 0, 512, &[]);
    assert_eq!(r.error, 22, "unknown flag on a read: {r:?}");
    assert_eq!(r.magics, vec![STRUCTURED_REPLY_MAGIC], "{r:?}");
    // Compact block status: type 5, lengths sum to the request (or more, for the last).
    let r = c.request(0, CMD_BLOCK_STATUS, 0, 8 * MIB, &[]);
    assert_eq!(r.error, 0);
    assert_eq!(r.chunk_types, vec![REPLY_TYPE_BLOCK_STATUS]);
    assert_eq!(r.extents[0].0, ctx);
    assert_eq!(
        r.extents[0].1,
        vec![(12288, 3), (73728, 0), (8 * MIB - 86016, 3)],
        "{r:?}"
    );
}

#[test]
fn option_info_list_meta_contexts_and_abort() {
    let env = TestEnv::new();
    let img = env.path("vol0.img");
    let server = env.start_server(&["--image", img.to_str().unwrap(), "--create", "24M"]);
    let mut c = server.raw_unix();
    c.start();
    // LIST
    c.send_option(OPT_LIST, &[]).unwrap();
    let r = c.read_opt_reply().unwrap();
    assert_eq!(r.kind, REP_SERVER, "{r:?}");
    let n = u32::from_be_bytes(r.data[0..4].try_into().unwrap()) as usize;
    assert_eq!(&r.data[4..4 + n], b"vol0");
    assert_eq!(c.read_opt_reply().unwrap().kind, REP_ACK);
    // INFO with name, description and block size requests.
    let (size, flags, infos) = c
        .info_or_go(
            OPT_INFO,
            "vol0",
            &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE],
        )
        .expect("INFO");
    assert_eq!(size, 24 * MIB);
    assert_ne!(flags & TF_HAS_FLAGS, 0);
    let find = |t: u16| {
        infos
            .iter()
            .find(|i| u16::from_be_bytes([i[0], i[1]]) == t)
            .cloned()
    };
    let bs = find(INFO_BLOCK_SIZE).expect("NBD_INFO_BLOCK_SIZE");
    assert_eq!(bs.len(), 14);
    let min = u32::from_be_bytes(bs[2..6].try_into().unwrap());
    let pref = u32::from_be_bytes(bs[6..10].try_into().unwrap());
    let max = u32::from_be_bytes(bs[10..14].try_into().unwrap());
    assert!(min.is_power_of_two() && min <= 65536, "min {min}");
    assert!(
        pref.is_power_of_two() && pref >= 512 && pref >= min,
        "pref {pref}"
    );
    assert!(max >= 32 << 20, "max {max}");
    assert_eq!(&find(INFO_NAME).expect("NBD_INFO_NAME")[2..], b"vol0");
    // Meta contexts need structured replies first.
    let r = c.meta_context(OPT_LIST_META_CONTEXT, "", &[]);
    assert!(
        r.is_err(),
        "LIST_META_CONTEXT before structured replies: {r:?}"
    );
    assert_eq!(c.option_simple(OPT_STRUCTURED_REPLY).kind, REP_ACK);
    let list = c.meta_context(OPT_LIST_META_CONTEXT, "", &[]).unwrap();
    assert!(list.iter().any(|(_, n)| n == "base:allocation"), "{list:?}");
    let none = c
        .meta_context(OPT_SET_META_CONTEXT, "", &["qemu:dirty-bitmap:x"])
        .unwrap();
    assert!(
        none.is_empty(),
        "unknown contexts are not selected: {none:?}"
    );
    let r = c.meta_context(OPT_SET_META_CONTEXT, "nope", &["base:allocation"]);
    assert_eq!(r.unwrap_err().kind, REP_ERR_UNKNOWN);
    // INFO then GO agree.
    let (size2, flags2, _) = c.info_or_go(OPT_INFO, "", &[]).unwrap();
    c.go("");
    assert_eq!((c.size, c.tflags), (size2, flags2));
    c.mode = Mode::Structured;
    assert_eq!(c.read(0, 4096).unwrap(), vec![0u8; 4096]);
    c.disconnect();

    // ABORT: ACK, then the server closes.
    let mut c = server.raw_unix();
    c.start();
    let r = c.option_simple(OPT_ABORT);
    assert_eq!(r.kind, REP_ACK);
    assert!(c.server_closed_within(Duration::from_secs(10)));
}

/// Many requests pipelined before any reply is read, in each reply mode: every cookie gets
/// exactly one reply, and each reply carries its own request's data.
#[test]
fn pipelined_requests_get_one_reply_each_matched_by_cookie() {
    let env = TestEnv::new();
    let server = env.start_export("64M", &[]);
    for mode in [Mode::Simple, Mode::Structured, Mode::Extended] {
        let mut c = if mode == Mode::Structured {
            env.raw_tcp()
        } else {
            server.raw_unix()
        };
        let with_meta = mode != Mode::Simple;
        c.negotiate(mode, with_meta, "");
        let seed = mode as u64 * 10 + 100;
        // Fill [0, 8 MiB) first.
        for i in 0..8u64 {
            assert_eq!(
                c.write(i * MIB, &pattern(seed, i * MIB, MIB as usize), 0),
                0
            );
        }
        let mut batch = Vec::new();
        // cookie -> what the reply must contain
        let mut expect: HashMap<u64, (u16, Vec<u8>)> = HashMap::new();
        let mut order = Vec::new();
        for i in 0..300u64 {
            let cookie = c.next_cookie();
            order.push(cookie);
            match i % 6 {
                0..=2 => {
                    let off = (i * 7919 * 13) % (8 * MIB - 300_000);
                    let len = 1 + (i * 104_729) % 262_144;
                    c.encode_request(&mut batch, 0, CMD_READ, cookie, off, len, &[]);
                    expect.insert(cookie, (CMD_READ, pattern(seed, off, len as usize)));
                }
                3 | 4 => {
                    let off = 16 * MIB + i * 65536;
                    let data = pattern(seed + 1, off, 65536 - (i as usize % 7) * 1000);
                    let flags = if mode == Mode::Extended {
                        CMD_FLAG_PAYLOAD_LEN
                    } else {
                        0
                    };
                    c.encode_request(
                        &mut batch,
                        flags,
                        CMD_WRITE,
                        cookie,
                        off,
                        data.len() as u64,
                        &data,
                    );
                    expect.insert(cookie, (CMD_WRITE, Vec::new()));
                }
                _ => {
                    if with_meta && i % 12 == 5 {
                        c.encode_request(&mut batch, 0, CMD_BLOCK_STATUS, cookie, 0, 64 * MIB, &[]);
                        expect.insert(cookie, (CMD_BLOCK_STATUS, Vec::new()));
                    } else {
                        c.encode_request(&mut batch, 0, CMD_FLUSH, cookie, 0, 0, &[]);
                        expect.insert(cookie, (CMD_FLUSH, Vec::new()));
                    }
                }
            }
        }
        // Send everything from another thread while this one reads replies.
        let mut ws = c.s.try_clone();
        let writer = std::thread::spawn(move || ws.write_all(&batch));
        let mut replies = Vec::new();
        while c.in_flight() > 0 {
            replies.push(c.read_reply().expect("reply"));
        }
        writer.join().unwrap().expect("sending the batch");
        assert_eq!(replies.len(), 300);
        let mut seen = std::collections::HashSet::new();
        for r in &replies {
            assert!(
                seen.insert(r.cookie),
                "two replies for cookie {:#x}",
                r.cookie
            );
            let (kind, want) = &expect[&r.cookie];
            assert_eq!(r.error, 0, "{mode:?} request {kind} failed: {r:?}");
            match *kind {
                CMD_READ => {
                    assert_eq!(r.data_covered, want.len() as u64);
                    assert_bytes_eq(&r.data, want, &format!("{mode:?} pipelined read"));
                }
                CMD_BLOCK_STATUS => {
                    assert_eq!(r.extents.len(), 1, "{r:?}");
                    let first = r.extents[0].1[0];
                    assert_eq!(first, (8 * MIB, 0), "data at the start: {r:?}");
                }
                _ => {}
            }
            if mode == Mode::Extended {
                assert!(r.magics.iter().all(|&m| m == EXTENDED_REPLY_MAGIC));
            }
        }
        let got: Vec<u64> = replies.iter().map(|r| r.cookie).collect();
        if got != order {
            eprintln!("{mode:?}: replies came out of order (allowed)");
        }
        // The pipelined writes landed where they belong.
        for i in (0..300u64).filter(|i| matches!(i % 6, 3 | 4)) {
            let off = 16 * MIB + i * 65536;
            let len = 65536 - (i as usize % 7) * 1000;
            let got = c.read(off, len as u64).unwrap();
            assert_bytes_eq(&got, &pattern(seed + 1, off, len), "pipelined write");
        }
        c.disconnect();
    }
}

/// NBD_CMD_DISC after pipelined requests: the server finishes and answers all of them, then
/// closes.
#[test]
fn disconnect_finishes_requests_in_flight_first() {
    let env = TestEnv::new();
    let server = env.start_export("32M", &[]);
    for mode in [Mode::Simple, Mode::Extended] {
        let mut c = server.raw_unix();
        c.negotiate(mode, false, "");
        let pl = if mode == Mode::Extended {
            CMD_FLAG_PAYLOAD_LEN
        } else {
            0
        };
        let mut batch = Vec::new();
        let seed = 300 + mode as u64;
        for i in 0..30u64 {
            let cookie = c.next_cookie();
            let d = pattern(seed, i * MIB, 200_000);
            c.encode_request(
                &mut batch,
                pl,
                CMD_WRITE,
                cookie,
                i * MIB,
                d.len() as u64,
                &d,
            );
        }
        let cookie = c.next_cookie();
        let h = nbd_server::request::RequestHeader {
            flags: 0,
            kind: CMD_DISC,
            cookie,
            offset: 0,
            length: 0,
        };
        nbd_server::request::encode_header(&h, mode == Mode::Extended, &mut batch);
        c.send(&batch).unwrap();
        for _ in 0..30 {
            let r = c
                .read_reply()
                .expect("every request before DISC gets its reply");
            assert_eq!(r.error, 0, "{r:?}");
        }
        assert!(
            c.server_closed_within(Duration::from_secs(10)),
            "server closes after DISC"
        );
        let mut v = server.raw_unix();
        v.negotiate(Mode::Structured, false, "");
        for i in 0..30u64 {
            let got = v.read(i * MIB, 200_000).unwrap();
            assert_bytes_eq(&got, &pattern(seed, i * MIB, 200_000), "write before DISC");
        }
    }
}

/// 64-bit offsets and extent lengths on a sparse 6 GiB export (only a few blocks are
/// allocated on disk).
#[test]
fn offsets_beyond_4_gib_on_a_sparse_export() {
    const GIB: u64 = 1 << 30;
    let env = TestEnv::new();
    let server = env.start_export("6G", &[]);
    let out = env.run(&["nbdinfo", "--size", &server.uri()]);
    assert_eq!(out.stdout.trim(), (6 * GIB).to_string(), "{out}");
    let near = 5 * GIB + 4097;
    let w1 = format!("write -P 0x5e {near} 3000");
    let r1 = format!("read -P 0x5e {near} 3000");
    let w2 = format!("write -P 0x6f {} 1", 6 * GIB - 1);
    nbdmirror_tests::assert_qemu_io_ok(&nbdmirror_tests::qemu_io(
        &env,
        &server.uri(),
        &[&w1, &r1, &w2],
    ));

    // Compact headers: 64-bit offsets, 32-bit lengths.
    let mut c = server.raw_unix();
    let ctx = c.negotiate(Mode::Structured, true, "").unwrap();
    assert_eq!(c.read(near, 3000).unwrap(), vec![0x5e; 3000]);
    assert_eq!(c.read(6 * GIB - 1, 1).unwrap(), vec![0x6f]);
    let d = pattern(8, 4 * GIB + 17, 5000);
    assert_eq!(c.write(4 * GIB + 17, &d, 0), 0);
    assert_bytes_eq(
        &c.read(4 * GIB + 17, 5000).unwrap(),
        &d,
        "write above 4 GiB",
    );
    // It did not wrap around to a low offset.
    assert_eq!(
        c.read(17, 5000).unwrap(),
        vec![0u8; 5000],
        "no 32-bit wrap-around"
    );
    let r = c.request(0, CMD_BLOCK_STATUS, 0, 0xFFFF_F000, &[]);
    assert_eq!(r.error, 0, "{r:?}");
    assert_eq!(
        r.extents[0],
        (ctx, vec![(0xFFFF_F000, 3)]),
        "low 4 GiB are a hole"
    );
    let r = c.request(0, CMD_BLOCK_STATUS, 5 * GIB, GIB, &[]);
    assert_eq!(r.error, 0, "{r:?}");
    assert_eq!(
        r.extents[0].1,
        vec![(4096, 3), (4096, 0), (GIB - 12288, 3), (4096, 0)],
        "{r:?}"
    );
    let r = c.request(0, CMD_READ, 6 * GIB, 1, &[]);
    assert_eq!(r.error, 22);

    // Extended headers: an extent longer than 4 GiB in one descriptor.
    let mut e = env.raw_tcp();
    let ctx = e.negotiate(Mode::Extended, true, "").unwrap();
    let r = e.request(0, CMD_BLOCK_STATUS, 0, 6 * GIB, &[]);
    assert_eq!(r.error, 0, "{r:?}");
    assert_eq!(r.chunk_types, vec![REPLY_TYPE_BLOCK_STATUS_EXT]);
    assert_eq!(
        r.extents[0],
        (
            ctx,
            vec![
                (4 * GIB, 3),
                (8192, 0),
                (GIB + 4096 - 8192, 3),
                (4096, 0),
                (GIB - 12288, 3),
                (4096, 0)
            ]
        ),
        "{r:?}"
    );
    e.disconnect();
}

/// Pipelined 32 MiB requests adding up to more than the server's per-connection memory
/// budget: the server must apply back-pressure, not deadlock or drop requests.
#[test]
fn large_pipelined_requests_beyond_the_connection_budget() {
    let env = TestEnv::new();
    let server = env.start_export("128M", &[]);
    const CHUNK: u64 = 32 * MIB;
    for mode in [Mode::Simple, Mode::Extended] {
        let mut c = server.raw_unix();
        c.negotiate(mode, false, "");
        let seed = 500 + mode as u64;
        let pl = if mode == Mode::Extended {
            CMD_FLAG_PAYLOAD_LEN
        } else {
            0
        };
        let mut batch = Vec::new();
        for i in 0..4u64 {
            let cookie = c.next_cookie();
            let d = pattern(seed, i * CHUNK, CHUNK as usize);
            c.encode_request(&mut batch, pl, CMD_WRITE, cookie, i * CHUNK, CHUNK, &d);
        }
        let mut ws = c.s.try_clone();
        let writer = std::thread::spawn(move || ws.write_all(&batch));
        for _ in 0..4 {
            let r = c.read_reply().expect("write reply");
            assert_eq!(r.error, 0, "{mode:?} 32 MiB write: {r:?}");
        }
        writer.join().unwrap().expect("send writes");
        let mut batch = Vec::new();
        let mut want = HashMap::new();
        for i in 0..12u64 {
            let cookie = c.next_cookie();
            let off = (i % 4) * CHUNK;
            c.encode_request(&mut batch, 0, CMD_READ, cookie, off, CHUNK, &[]);
            want.insert(cookie, off);
        }
        let mut ws = c.s.try_clone();
        let writer = std::thread::spawn(move || ws.write_all(&batch));
        for _ in 0..12 {
            let r = c.read_reply().expect("read reply");
            assert_eq!(r.error, 0, "{mode:?} 32 MiB read: {r:?}");
            let off = want.remove(&r.cookie).expect("known cookie");
            assert_bytes_eq(
                &r.data,
                &pattern(seed, off, CHUNK as usize),
                &format!("{mode:?} 32 MiB read at {off}"),
            );
        }
        writer.join().unwrap().expect("send reads");
        c.disconnect();
    }
}

/// A client without FIXED_NEWSTYLE may only use EXPORT_NAME; anything else ends the
/// connection (the server cannot send an error it would understand).
#[test]
fn non_fixed_newstyle_client() {
    let env = TestEnv::new();
    let server = env.start_export("4M", &[]);
    let mut c = server.raw_unix();
    c.read_greeting().unwrap();
    c.send_client_flags(0).unwrap();
    c.send_option(OPT_EXPORT_NAME, b"").unwrap();
    let r = c.recv(10 + 124).unwrap();
    assert_eq!(r[..8], (4 * MIB).to_be_bytes());
    assert_eq!(r[10..], [0u8; 124]);
    assert_eq!(c.write(0, b"abc", 0), 0);
    assert_eq!(c.read(0, 3).unwrap(), b"abc");
    let mut c = server.raw_unix();
    c.read_greeting().unwrap();
    c.send_client_flags(0).unwrap();
    c.send_option(0x99, b"").unwrap();
    assert!(c.server_closed_within(Duration::from_secs(10)));
}
