//! Misbehaving clients: garbage, protocol violations, huge lengths, idle and vanishing
//! clients. After each, the server must still serve a new client correctly, and a client
//! that connected before the bad one must be undisturbed.

use std::time::{Duration, Instant};

use nbd_server::proto::*;
use nbdmirror_tests::data::{assert_bytes_eq, pattern};
use nbdmirror_tests::raw::{Mode, RawClient};
use nbdmirror_tests::{assert_qemu_io_ok, qemu_io, Server, TestEnv};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// A server plus a well-behaved client connected before anything bad happens.
struct Scene {
    // Dropped in declaration order: the client, then the server, then the namespace.
    bystander: RawClient,
    server: Server,
    env: TestEnv,
    round: u64,
}

impl Scene {
    fn new() -> Scene {
        Scene::with_args(&[])
    }

    fn with_args(extra: &[&str]) -> Scene {
        let env = TestEnv::new();
        let server = env.start_export("16M", extra);
        let mut bystander = server.raw_unix();
        bystander.negotiate(Mode::Structured, false, "");
        if !extra.contains(&"--read-only") {
            assert_eq!(bystander.write(0, &pattern(1, 0, 65536), 0), 0);
        }
        Scene {
            env,
            server,
            bystander,
            round: 0,
        }
    }

    /// The bystander, a fresh unix client and a fresh TCP client all do correct I/O.
    #[track_caller]
    fn assert_healthy(&mut self) {
        assert!(
            self.server.is_running(),
            "server died:\n{}",
            self.server.log()
        );
        self.round += 1;
        let off = MIB + self.round * 131072;
        let d = pattern(self.round + 10, off, 100_000);
        let b = &mut self.bystander;
        assert_eq!(b.write(off, &d, 0), 0, "bystander write");
        assert_bytes_eq(&b.read(off, 100_000).unwrap(), &d, "bystander read");
        assert_bytes_eq(
            &b.read(0, 65536).unwrap(),
            &pattern(1, 0, 65536),
            "bystander's first write",
        );
        for tcp in [false, true] {
            let mut c = if tcp {
                self.env.raw_tcp()
            } else {
                self.server.raw_unix()
            };
            c.negotiate(Mode::Structured, false, "");
            assert_bytes_eq(&c.read(off, 100_000).unwrap(), &d, "fresh client read");
            let off2 = off + 110_000 + tcp as u64 * 8192;
            let d2 = pattern(self.round + 99, off2, 4096);
            assert_eq!(c.write(off2, &d2, CMD_FLAG_FUA), 0);
            assert_bytes_eq(&c.read(off2, 4096).unwrap(), &d2, "fresh client write");
            c.disconnect();
        }
    }

    /// A fresh client that negotiated `mode`.
    fn client(&self, mode: Mode) -> RawClient {
        let mut c = self.server.raw_unix();
        c.negotiate(mode, false, "");
        c
    }
}

#[test]
fn garbage_instead_of_client_flags_closes_that_connection_only() {
    let mut s = Scene::new();
    let mut c = s.server.raw_unix();
    c.read_greeting().unwrap();
    c.send(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n").unwrap();
    assert!(
        c.server_closed_within(CLOSE_WAIT),
        "server should hang up on garbage"
    );
    s.assert_healthy();
    // Garbage before even reading the greeting, over TCP, then a plain close.
    let mut c = s.env.raw_tcp();
    c.send(&[0xff; 4096]).unwrap();
    drop(c);
    s.assert_healthy();
}

#[test]
fn unknown_client_flags_close_the_connection() {
    let mut s = Scene::new();
    for flags in [1u32 << 2, 1 << 31, 0xffff_ffff] {
        let mut c = s.server.raw_unix();
        c.read_greeting().unwrap();
        c.send_client_flags(flags).unwrap();
        assert!(
            c.server_closed_within(CLOSE_WAIT),
            "unknown client flags {flags:#x} must end the connection"
        );
    }
    s.assert_healthy();
}

#[test]
fn bad_option_magic_closes_the_connection() {
    let mut s = Scene::new();
    let mut c = s.server.raw_unix();
    c.start();
    let mut h = Vec::new();
    h.extend_from_slice(&0x4948_4156_454f_5055u64.to_be_bytes()); // IHAVEOPU
    h.extend_from_slice(&OPT_GO.to_be_bytes());
    h.extend_from_slice(&0u32.to_be_bytes());
    c.send(&h).unwrap();
    assert!(c.server_closed_within(CLOSE_WAIT), "bad option magic");
    s.assert_healthy();
}

#[test]
fn oversized_options_get_err_too_big_and_negotiation_continues() {
    let mut s = Scene::new();
    let mut c = s.server.raw_unix();
    c.start();
    for option in [OPT_GO, 0x4242] {
        c.send_option(option, &vec![0x61; 100 * 1024]).unwrap();
        let r = c.read_opt_reply().unwrap();
        assert_eq!(r.option, option);
        assert_eq!(r.kind, REP_ERR_TOO_BIG, "100 KiB option {option}: {r:?}");
    }
    c.go("");
    c.mode = Mode::Simple;
    assert_eq!(c.read(0, 65536).unwrap(), pattern(1, 0, 65536));
    // A header announcing ~4 GiB of option data, then the client gives up.
    let mut c = s.server.raw_unix();
    c.start();
    let mut h = Vec::new();
    h.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
    h.extend_from_slice(&OPT_GO.to_be_bytes());
    h.extend_from_slice(&0xFFFF_FFF0u32.to_be_bytes());
    h.extend_from_slice(&[0u8; 200_000]);
    c.send(&h).unwrap();
    drop(c);
    s.assert_healthy();
}

#[test]
fn unknown_option_starttls_and_unknown_export_are_refused_and_negotiation_continues() {
    let mut s = Scene::new();
    let mut c = s.server.raw_unix();
    c.start();
    let r = c.option_simple(0x77);
    assert_eq!(r.kind, REP_ERR_UNSUP, "unknown option: {r:?}");
    let r = c.option_simple(OPT_STARTTLS);
    assert!(
        r.kind == REP_ERR_UNSUP || r.kind == REP_ERR_POLICY,
        "STARTTLS on a plaintext server: {r:?}"
    );
    let r = c.info_or_go(OPT_GO, "no-such-export", &[]).unwrap_err();
    assert_eq!(r.kind, REP_ERR_UNKNOWN, "{r:?}");
    let r = c.info_or_go(OPT_INFO, "no-such-export", &[]).unwrap_err();
    assert_eq!(r.kind, REP_ERR_UNKNOWN, "{r:?}");
    // Malformed GO data (name length beyond the option).
    c.send_option(OPT_GO, &[0, 0, 1, 0, b'x']).unwrap();
    let r = c.read_opt_reply().unwrap();
    assert_eq!(r.kind, REP_ERR_INVALID, "{r:?}");
    c.go("disk");
    c.mode = Mode::Simple;
    assert_eq!(c.read(0, 65536).unwrap(), pattern(1, 0, 65536));
    s.assert_healthy();
}

#[test]
fn truncated_handshakes_then_close() {
    let mut s = Scene::new();
    // Close right after connecting, after the greeting, mid flags, mid option header, and
    // mid option data.
    let cuts: [&[u8]; 4] = [
        &[],
        &[0, 0],
        &[0, 0, 0, 3, 0x49, 0x48, 0x41],
        &[
            0, 0, 0, 3, 0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54, 0, 0, 0, 7, 0, 0, 0, 100,
            0, 0, 0,
        ],
    ];
    for (i, cut) in cuts.iter().enumerate() {
        let mut c = s.server.raw_unix();
        if i > 0 {
            c.read_greeting().unwrap();
        }
        c.send(cut).unwrap();
        drop(c);
    }
    let c = s.server.raw_unix();
    drop(c);
    s.assert_healthy();
}

#[test]
fn idle_handshake_clients_do_not_block_others() {
    let mut s = Scene::new();
    let mut idle = Vec::new();
    for i in 0..24 {
        let mut c = if i % 2 == 0 {
            s.server.raw_unix()
        } else {
            s.env.raw_tcp()
        };
        match i % 4 {
            0 => {} // connected, reads nothing, sends nothing
            1 => {
                c.read_greeting().unwrap();
            }
            2 => {
                c.start();
            }
            _ => {
                c.start();
                c.send(&0x4948_4156_454f_5054u64.to_be_bytes()).unwrap();
            }
        }
        idle.push(c);
    }
    // An idle client in transmission too.
    idle.push(s.client(Mode::Structured));
    let start = Instant::now();
    let out = qemu_io(
        &s.env,
        &s.server.uri(),
        &["write -P 0x3c 2M 8M", "read -P 0x3c 2M 8M", "flush"],
    );
    assert_qemu_io_ok(&out);
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "I/O took {:?} with idle clients around",
        start.elapsed()
    );
    s.assert_healthy();
    drop(idle);
    s.assert_healthy();
}

/// Refused requests get the spec's error and leave the connection usable, in every reply
/// mode.
#[test]
fn invalid_requests_get_errors_and_the_connection_continues() {
    let mut s = Scene::new();
    for mode in [Mode::Simple, Mode::Structured, Mode::Extended] {
        let mut c = s.client(mode);
        let check = |c: &mut RawClient, what: &str| {
            assert_bytes_eq(
                &c.read(0, 65536)
                    .unwrap_or_else(|e| panic!("{mode:?} after {what}: error {e}")),
                &pattern(1, 0, 65536),
                &format!("{mode:?}: read after {what}"),
            );
        };
        let r = c.request(0, 0x55, 0, 512, &[]);
        assert_eq!(r.error, 22, "{mode:?} unknown command: {r:?}");
        check(&mut c, "unknown command");
        let r = c.request(1 << 12, CMD_FLUSH, 0, 0, &[]);
        assert_eq!(r.error, 22, "{mode:?} unknown flag: {r:?}");
        let r = c.request(1 << 15, CMD_READ, 0, 512, &[]);
        assert_eq!(r.error, 22, "{mode:?} unknown flag on READ: {r:?}");
        check(&mut c, "unknown flags");
        let r = c.request(0, CMD_READ, SIZE - 100, 4096, &[]);
        assert_eq!(r.error, 22, "{mode:?} read past the end: {r:?}");
        let r = c.request(0, CMD_READ, SIZE, 1, &[]);
        assert_eq!(r.error, 22, "{mode:?} read at the end: {r:?}");
        check(&mut c, "read past the end");
        // WRITE past the end: ENOSPC, and the payload is consumed.
        let pl = if mode == Mode::Extended {
            CMD_FLAG_PAYLOAD_LEN
        } else {
            0
        };
        let junk = vec![0x4d; 65536];
        let r = c.request(pl, CMD_WRITE, SIZE - 1000, 65536, &junk);
        assert_eq!(r.error, 28, "{mode:?} write past the end: {r:?}");
        let r = c.request(pl, CMD_WRITE, SIZE + MIB, 65536, &junk);
        assert_eq!(r.error, 28, "{mode:?} write beyond the end: {r:?}");
        check(&mut c, "write past the end");
        assert_eq!(
            c.read(SIZE - 1000, 1000).unwrap(),
            vec![0u8; 1000],
            "nothing written"
        );
        // A 64 MiB read (over the 32 MiB maximum).
        let r = c.request(0, CMD_READ, 0, 64 * MIB, &[]);
        assert!(
            r.error == 22 || r.error == 75,
            "{mode:?} 64 MiB read: want EINVAL or EOVERFLOW: {r:?}"
        );
        check(&mut c, "64 MiB read");
        // offset + length overflows u64.
        let r = c.request(0, CMD_READ, u64::MAX - 100, 4096, &[]);
        assert_eq!(r.error, 22, "{mode:?} overflowing read: {r:?}");
        let r = c.request(pl, CMD_WRITE, u64::MAX - 100, 4096, &junk[..4096]);
        assert!(
            r.error == 22 || r.error == 28,
            "{mode:?} overflowing write: {r:?}"
        );
        let r = c.request(0, CMD_TRIM, u64::MAX - 100, 4096, &[]);
        assert_eq!(r.error, 22, "{mode:?} overflowing trim: {r:?}");
        let r = c.request(0, CMD_WRITE_ZEROES, u64::MAX - 100, 4096, &[]);
        assert!(
            r.error == 22 || r.error == 28,
            "{mode:?} overflowing write-zeroes: {r:?}"
        );
        let r = c.request(0, CMD_CACHE, u64::MAX - 100, 4096, &[]);
        assert_eq!(r.error, 22, "{mode:?} overflowing cache: {r:?}");
        check(&mut c, "overflowing requests");
        // BLOCK_STATUS without a negotiated meta context.
        let r = c.request(0, CMD_BLOCK_STATUS, 0, 4096, &[]);
        assert_eq!(r.error, 22, "{mode:?} block status without context: {r:?}");
        check(&mut c, "block status");
        c.disconnect();
    }
    // Compact mode: a 33 MiB WRITE (over the maximum) is refused and its payload consumed.
    let mut c = s.client(Mode::Structured);
    let big = vec![0x77u8; 33 * MIB as usize];
    let r = c.request(0, CMD_WRITE, 0, big.len() as u64, &big);
    assert!(r.error == 22 || r.error == 75, "33 MiB write: {r:?}");
    assert_eq!(
        c.read(0, 65536).unwrap(),
        pattern(1, 0, 65536),
        "not written"
    );
    // Extended mode: a READ with an unexpected payload is refused, the payload consumed.
    let mut c = s.client(Mode::Extended);
    let r = c.request(
        CMD_FLAG_PAYLOAD_LEN,
        CMD_READ,
        0,
        8,
        &[1, 2, 3, 4, 5, 6, 7, 8],
    );
    assert_eq!(r.error, 22, "READ with a payload: {r:?}");
    assert_eq!(c.read(0, 65536).unwrap(), pattern(1, 0, 65536));
    s.assert_healthy();
}

#[test]
fn extended_write_over_the_maximum_payload_disconnects() {
    let mut s = Scene::new();
    let mut c = s.client(Mode::Extended);
    let cookie = c.next_cookie();
    c.send_request(CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, cookie, 0, 1 << 40, &[])
        .unwrap();
    // The server may already have hung up: the send may fail.
    let _ = c.send(&[0u8; 4096]);
    assert!(
        c.server_closed_within(CLOSE_WAIT),
        "a 1 TiB payload announcement must end the connection"
    );
    s.assert_healthy();
}

#[test]
fn writes_on_a_read_only_export_get_eperm() {
    let env = TestEnv::new();
    let img = env.path("ro.img");
    nbdmirror_tests::data::write_pattern_file(&img, SIZE, 4, &[]);
    let server = env.start_server(&["--image", img.to_str().unwrap(), "--read-only"]);
    for mode in [Mode::Simple, Mode::Structured, Mode::Extended] {
        let mut c = server.raw_unix();
        c.negotiate(mode, false, "");
        assert_ne!(c.tflags & TF_READ_ONLY, 0, "READ_ONLY flag");
        let pl = if mode == Mode::Extended {
            CMD_FLAG_PAYLOAD_LEN
        } else {
            0
        };
        let r = c.request(pl, CMD_WRITE, 0, 4096, &[0xaa; 4096]);
        assert_eq!(r.error, 1, "{mode:?} write on a read-only export: {r:?}");
        let r = c.request(0, CMD_TRIM, 0, 4096, &[]);
        assert_eq!(r.error, 1, "{mode:?} trim on a read-only export: {r:?}");
        let r = c.request(0, CMD_WRITE_ZEROES, 0, 4096, &[]);
        assert_eq!(
            r.error, 1,
            "{mode:?} write-zeroes on a read-only export: {r:?}"
        );
        assert_bytes_eq(&c.read(0, 8192).unwrap(), &pattern(4, 0, 8192), "unchanged");
        assert_eq!(c.flush(), 0, "flush is allowed");
        c.disconnect();
    }
    assert_eq!(
        nbdmirror_tests::data::read_file_range(&img, 0, 4096),
        pattern(4, 0, 4096)
    );
}

#[test]
fn client_vanishing_mid_write_leaves_the_server_serving() {
    let mut s = Scene::new();
    for tcp in [false, true] {
        let mut c = if tcp {
            s.env.raw_tcp()
        } else {
            s.server.raw_unix()
        };
        c.negotiate(Mode::Structured, false, "");
        let cookie = c.next_cookie();
        let full = vec![0xabu8; MIB as usize];
        // Header for 1 MiB, then only 300 KiB of it.
        c.send_request(0, CMD_WRITE, cookie, 8 * MIB, MIB, &full[..300 * 1024])
            .unwrap();
        drop(c);
    }
    s.assert_healthy();
    // A half-received write must not have been applied.
    let mut c = s.client(Mode::Structured);
    assert_eq!(c.read(8 * MIB, MIB).unwrap(), vec![0u8; MIB as usize]);
}

#[test]
fn client_reset_with_many_reads_in_flight_leaves_the_server_serving() {
    let mut s = Scene::new();
    for round in 0..3 {
        let mut c = s.env.raw_tcp();
        c.negotiate(Mode::Structured, false, "");
        let mut batch = Vec::new();
        for i in 0..50u64 {
            let cookie = c.next_cookie();
            c.encode_request(&mut batch, 0, CMD_READ, cookie, (i % 15) * MIB, MIB, &[]);
        }
        c.send(&batch).unwrap();
        if round > 0 {
            // Let some replies arrive (and others back up) before the reset.
            std::thread::sleep(Duration::from_millis(50 * round));
        }
        c.set_reset_on_close();
        drop(c);
    }
    // The same on a unix socket: close with replies pending.
    let mut c = s.server.raw_unix();
    c.negotiate(Mode::Simple, false, "");
    let mut batch = Vec::new();
    for i in 0..50u64 {
        let cookie = c.next_cookie();
        c.encode_request(&mut batch, 0, CMD_READ, cookie, (i % 15) * MIB, MIB, &[]);
    }
    c.send(&batch).unwrap();
    drop(c);
    s.assert_healthy();
}

#[test]
fn bad_request_magic_closes_the_connection() {
    let mut s = Scene::new();
    for mode in [Mode::Simple, Mode::Extended] {
        let mut c = s.client(mode);
        let mut junk = vec![0xde, 0xad, 0xbe, 0xef];
        junk.extend_from_slice(&[0u8; 28]);
        c.send(&junk).unwrap();
        assert!(
            c.server_closed_within(CLOSE_WAIT),
            "{mode:?}: a request with a bad magic must end the connection"
        );
    }
    // Compact magic on an extended connection is a bad magic too.
    let mut c = s.client(Mode::Extended);
    c.mode = Mode::Simple;
    let cookie = c.next_cookie();
    c.send_request(0, CMD_FLUSH, cookie, 0, 0, &[]).unwrap();
    c.send(&[0u8; 4]).unwrap();
    assert!(
        c.server_closed_within(CLOSE_WAIT),
        "compact request on extended"
    );
    s.assert_healthy();
}

/// Zero-length requests have unspecified results, but the server must answer them and must
/// not disconnect. Flags misused on a command (FAST_ZERO, NO_HOLE and DF on WRITE, REQ_ONE on
/// READ) are refused.
#[test]
fn zero_length_requests_and_misused_flags_are_answered() {
    let mut s = Scene::new();
    for mode in [Mode::Simple, Mode::Structured, Mode::Extended] {
        let mut c = s.client(mode);
        let pl = if mode == Mode::Extended {
            CMD_FLAG_PAYLOAD_LEN
        } else {
            0
        };
        for (flags, kind) in [
            (0, CMD_READ),
            (pl, CMD_WRITE),
            (0, CMD_TRIM),
            (0, CMD_WRITE_ZEROES),
            (0, CMD_CACHE),
            (0, CMD_FLUSH),
        ] {
            let r = c.request(flags, kind, 4096, 0, &[]);
            if kind == CMD_READ && r.error == 0 {
                assert!(r.data.is_empty(), "{mode:?} zero-length read data: {r:?}");
            }
        }
        let r = c.request(pl | CMD_FLAG_FAST_ZERO, CMD_WRITE, 0, 512, &[0u8; 512]);
        assert_eq!(r.error, 22, "{mode:?} FAST_ZERO on WRITE: {r:?}");
        // Flags documented only for other commands: refused, a WRITE's payload still
        // consumed (the checks below read the data back through the same connection).
        let r = c.request(pl | CMD_FLAG_NO_HOLE, CMD_WRITE, 0, 512, &[0u8; 512]);
        assert_eq!(r.error, 22, "{mode:?} NO_HOLE on WRITE: {r:?}");
        let r = c.request(pl | CMD_FLAG_DF, CMD_WRITE, 0, 512, &[0u8; 512]);
        assert_eq!(r.error, 22, "{mode:?} DF on WRITE: {r:?}");
        let r = c.request(CMD_FLAG_REQ_ONE, CMD_READ, 0, 512, &[]);
        assert_eq!(r.error, 22, "{mode:?} REQ_ONE on READ: {r:?}");
        let r = c.request(CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 2 * MIB, MIB, &[]);
        assert!(
            r.error == 0 || r.error == 95,
            "{mode:?} FAST_ZERO write-zeroes: success or ENOTSUP: {r:?}"
        );
        if r.error == 0 {
            assert_eq!(c.read(2 * MIB, MIB).unwrap(), vec![0u8; MIB as usize]);
        }
        let r = c.request(0, CMD_TRIM, SIZE - 10, 4096, &[]);
        assert_eq!(r.error, 22, "{mode:?} trim past the end: {r:?}");
        let r = c.request(0, CMD_WRITE_ZEROES, SIZE - 10, 4096, &[]);
        assert!(
            r.error == 22 || r.error == 28,
            "{mode:?} zeroes past the end: {r:?}"
        );
        assert_eq!(c.read(0, 65536).unwrap(), pattern(1, 0, 65536));
        c.disconnect();
    }
    s.assert_healthy();
}
