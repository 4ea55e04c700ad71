//! The `nbdmirror export` command line: creating images, errors, listen addresses, export
//! names, I/O engines and shutdown on signals.

use std::time::Duration;

use nbd_server::proto::*;
use nbdmirror_tests::data::{pattern, read_file_range, write_pattern_file};
use nbdmirror_tests::raw::{Mode, RawClient};
use nbdmirror_tests::{assert_qemu_io_ok, qemu_io, CmdOutput, TestEnv, TCP_ADDR};
use nix::sys::signal::Signal;

const MIB: u64 = 1 << 20;
/// How long a server may take to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The error contract: exit 1 and exactly one `error: ...` line.
#[track_caller]
fn assert_one_error_line(out: &CmdOutput, must_mention: &str) -> String {
    assert_eq!(out.code, Some(1), "expected exit 1: {out}");
    let errors: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "expected one `error:` line: {out}");
    assert!(
        errors[0].contains(must_mention),
        "the error should mention {must_mention:?}: {out}"
    );
    errors[0].to_string()
}

#[test]
fn create_refuses_an_existing_file_and_leaves_it_untouched() {
    let env = TestEnv::new();
    let img = env.path("vm.img");
    write_pattern_file(&img, 3 * MIB + 17, 5, &[]);
    let before = std::fs::metadata(&img).unwrap();
    let sock = format!("unix:{}", env.path("s.sock").display());
    let out = env.run_nbdmirror(&[
        "export",
        "--image",
        img.to_str().unwrap(),
        "--create",
        "1M",
        "--listen",
        &sock,
    ]);
    assert_one_error_line(&out, "exists");
    let after = std::fs::metadata(&img).unwrap();
    assert_eq!(after.len(), 3 * MIB + 17, "size unchanged");
    assert_eq!(
        after.modified().unwrap(),
        before.modified().unwrap(),
        "mtime unchanged"
    );
    assert_eq!(read_file_range(&img, 0, 4096), pattern(5, 0, 4096));
    assert!(!env.path("s.sock").exists(), "no socket left behind");
}

#[test]
fn create_with_a_bad_size_is_a_clear_error() {
    let env = TestEnv::new();
    for bad in ["12Q", "1.5G", "0", "-5M"] {
        let img = env.path(&format!("bad-{}.img", bad.replace('.', "_")));
        let arg = format!("--create={bad}");
        let out = env.run_nbdmirror(&["export", "--image", img.to_str().unwrap(), &arg]);
        assert!(
            out.code == Some(1) || out.code == Some(2),
            "--create {bad} must fail: {out}"
        );
        let first = out.stderr.lines().next().unwrap_or("");
        assert!(
            first.starts_with("error:"),
            "first line is the error: {out}"
        );
        assert!(
            out.stderr.contains("size") && (bad == "0" || out.stderr.contains(bad)),
            "the error should say which size is wrong: {out}"
        );
        assert!(!img.exists(), "no image may be created for --create {bad}");
    }
}

#[test]
fn missing_image_error_mentions_create() {
    let env = TestEnv::new();
    let img = env.path("absent.img");
    let out = env.run_nbdmirror(&["export", "--image", img.to_str().unwrap()]);
    let line = assert_one_error_line(&out, "--create");
    assert!(line.contains("absent.img"), "name the image: {out}");
    assert!(!img.exists());
}

#[test]
fn read_only_with_create_is_refused() {
    let env = TestEnv::new();
    let img = env.path("ro.img");
    let out = env.run_nbdmirror(&[
        "export",
        "--image",
        img.to_str().unwrap(),
        "--create",
        "1M",
        "--read-only",
    ]);
    assert_one_error_line(&out, "--read-only");
    assert!(!img.exists());
}

#[test]
fn port_already_in_use_is_reported() {
    let env = TestEnv::new();
    // Something else listens on the port inside the namespace.
    let listener = env
        .ns
        .in_ns(|| std::net::TcpListener::bind(TCP_ADDR))
        .expect("bind in namespace");
    let img = env.path("d.img");
    let out = env.run_nbdmirror(&[
        "export",
        "--image",
        img.to_str().unwrap(),
        "--create",
        "1M",
        "--listen",
        TCP_ADDR,
    ]);
    assert_one_error_line(&out, "already in use");
    drop(listener);

    // A unix socket another nbdmirror serves on is not stolen.
    let first = env.start_export("4M", &[]);
    let img2 = env.path("e.img");
    let sock = format!("unix:{}", first.unix_path().display());
    let out = env.run_nbdmirror(&[
        "export",
        "--image",
        img2.to_str().unwrap(),
        "--create",
        "1M",
        "--listen",
        &sock,
    ]);
    assert_one_error_line(&out, "already in use");
    // The first server still answers on its socket.
    let out = env.run(&["nbdinfo", "--size", &first.uri_unix("")]);
    out.ok();
    assert_eq!(out.stdout.trim(), (4 * MIB).to_string());
}

/// `--listen unix:PATH` where PATH is a regular file (a typo, or the image itself) must not
/// delete that file: the server must refuse to start.
#[test]
fn unix_listen_path_that_is_a_regular_file_is_not_deleted() {
    let env = TestEnv::new();
    let precious = env.path("notes.txt");
    std::fs::write(&precious, b"precious data\n").unwrap();
    let img = env.path("d.img");
    let listen = format!("unix:{}", precious.display());
    let run = env.spawn_nbdmirror(&[
        "export",
        "--image",
        img.to_str().unwrap(),
        "--create",
        "1M",
        "--listen",
        &listen,
    ]);
    let (out, exited) = run.wait_or_kill(Duration::from_secs(3));
    let after = std::fs::read(&precious);
    assert!(
        matches!(&after, Ok(b) if b == b"precious data\n"),
        "nbdmirror deleted or changed the regular file {} given as a unix socket path \
         (now: {after:?}); exited by itself: {exited}; {out}",
        precious.display(),
    );
    assert!(exited, "nbdmirror should refuse to start: {out}");
    assert_one_error_line(&out, "notes.txt");
}

#[test]
fn unix_listen_path_equal_to_the_image_does_not_delete_the_image() {
    let env = TestEnv::new();
    let img = env.path("vm.img");
    write_pattern_file(&img, MIB, 8, &[]);
    let listen = format!("unix:{}", img.display());
    let run = env.spawn_nbdmirror(&[
        "export",
        "--image",
        img.to_str().unwrap(),
        "--listen",
        &listen,
    ]);
    let (out, exited) = run.wait_or_kill(Duration::from_secs(3));
    let intact = std::fs::read(&img)
        .map(|b| b == pattern(8, 0, MIB as usize))
        .unwrap_or(false);
    assert!(
        intact,
        "the image {} was deleted or replaced by a socket; exited by itself: {exited}; {out}",
        img.display()
    );
    assert!(exited, "nbdmirror should refuse to start: {out}");
    assert_eq!(out.code, Some(1), "{out}");
}

#[test]
fn bad_listen_address_is_an_error() {
    let env = TestEnv::new();
    let img = env.path("d.img");
    for bad in ["127.0.0.1", "127.0.0.1:99999", "unix:"] {
        let arg = format!("--listen={bad}");
        let out = env.run_nbdmirror(&[
            "export",
            "--image",
            img.to_str().unwrap(),
            "--create",
            "1M",
            &arg,
        ]);
        assert!(!out.success(), "--listen {bad} must fail: {out}");
        assert!(out.stderr.starts_with("error:"), "{out}");
    }
}

#[test]
fn sigterm_while_a_client_is_writing_exits_zero_and_keeps_acknowledged_data() {
    let env = TestEnv::new();
    let mut server = env.start_export("64M", &[]);
    // Acknowledged writes before the signal.
    let mut c = server.raw_unix();
    c.negotiate(Mode::Structured, false, "");
    let d = pattern(3, 5 * MIB, 1_000_000);
    assert_eq!(c.write(5 * MIB, &d, 0), 0);
    // A busy writer.
    let fio = env.spawn(&[
        "fio",
        "--thread",
        "--name=busy",
        "--ioengine=nbd",
        &format!("--uri={}", server.uri()),
        "--rw=randwrite",
        "--bs=64k",
        "--iodepth=16",
        "--size=32m",
        "--offset=16m",
        "--time_based",
        "--runtime=60",
    ]);
    std::thread::sleep(Duration::from_millis(1500));
    let (status, took) = server
        .stop(Signal::SIGTERM, STOP_TIMEOUT)
        .unwrap_or_else(|| panic!("server did not exit within {STOP_TIMEOUT:?} of SIGTERM"));
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
    assert!(took < Duration::from_secs(5), "took {took:?} to stop");
    let log = server.log();
    assert!(log.contains("stopped; image flushed"), "{log}");
    drop(fio);
    assert_eq!(read_file_range(&env.path("disk.img"), 5 * MIB, d.len()), d);
    // The idle raw client sees the connection closed.
    assert!(c.server_closed_within(Duration::from_secs(5)));
}

#[test]
fn sigint_stops_the_server_too() {
    let env = TestEnv::new();
    let mut server = env.start_export("4M", &[]);
    let (status, _) = server
        .stop(Signal::SIGINT, STOP_TIMEOUT)
        .expect("exit after SIGINT");
    assert_eq!(status.code(), Some(0));
}

/// A client that stalls in the middle of a WRITE payload must not keep the server from
/// stopping.
#[test]
fn sigterm_with_a_client_stalled_mid_write_payload_exits_promptly() {
    let env = TestEnv::new();
    let mut server = env.start_export("16M", &[]);
    let mut c = server.raw_unix();
    c.negotiate(Mode::Structured, false, "");
    let cookie = c.next_cookie();
    c.send_request(0, CMD_WRITE, cookie, 0, MIB, &vec![0x5a; 512 * 1024])
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let stopped = server.stop(Signal::SIGTERM, STOP_TIMEOUT);
    let log = server.log();
    let (status, _) = stopped.unwrap_or_else(|| {
        panic!(
            "server still running {STOP_TIMEOUT:?} after SIGTERM while a client stalled \
             mid-WRITE-payload (killed); log:\n{log}"
        )
    });
    assert_eq!(status.code(), Some(0), "{log}");
    drop(c);
}

/// A client that sends requests but never reads the replies must not keep the server
/// from stopping.
#[test]
fn sigterm_with_a_client_not_reading_replies_exits_promptly() {
    let env = TestEnv::new();
    let mut server = env.start_export("64M", &[]);
    let mut c = server.raw_unix();
    c.negotiate(Mode::Simple, false, "");
    let mut batch = Vec::new();
    for i in 0..40 {
        let cookie = c.next_cookie();
        c.encode_request(&mut batch, 0, CMD_READ, cookie, (i % 60) * MIB, MIB, &[]);
    }
    c.send(&batch).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let stopped = server.stop(Signal::SIGTERM, STOP_TIMEOUT);
    let log = server.log();
    let (status, _) = stopped.unwrap_or_else(|| {
        panic!(
            "server still running {STOP_TIMEOUT:?} after SIGTERM while a client did not \
             read its replies (killed); log:\n{log}"
        )
    });
    assert_eq!(status.code(), Some(0), "{log}");
    drop(c);
}

/// Polling before sleeping is an optimisation only: off, default, and a long budget serve
/// the same data, with FLUSH both alone (inline fdatasync) and behind other requests (a
/// queue-depth-8 writer: io_uring fsync); a budget out of range is a clear error.
#[test]
fn spin_budgets_serve_the_same_data() {
    for spin in ["0", "50", "2000"] {
        let env = TestEnv::new();
        let server = env.start_export("16M", &["--spin-us", spin]);
        let cmds = [
            "write -P 0x71 0 1M",
            "flush",
            "aio_write -P 0x72 1M 64k",
            "aio_write -P 0x73 2M 64k",
            "aio_flush",
            "flush",
            "read -P 0x71 0 1M",
            "read -P 0x72 1M 64k",
            "read -P 0x73 2M 64k",
        ];
        assert_qemu_io_ok(&qemu_io(&env, &server.uri(), &cmds));
        assert_qemu_io_ok(&qemu_io(&env, &server.uri_unix(""), &cmds[6..]));
    }
    let env = TestEnv::new();
    let img = env.path("x.img");
    let out = env.run_nbdmirror(&[
        "export",
        "--image",
        img.to_str().unwrap(),
        "--create",
        "1M",
        "--spin-us",
        "999999",
    ]);
    assert_eq!(
        out.code,
        Some(2),
        "clap rejects it before anything happens: {out}"
    );
    assert!(out.stderr.contains("--spin-us"), "{out}");
    assert!(!img.exists(), "nothing created");
}

#[test]
fn io_engines_sync_and_uring_round_trip() {
    for engine in ["sync", "uring"] {
        let env = TestEnv::new();
        let server = env.start_export("40M", &["--io-engine", engine]);
        let log = server.log();
        assert!(
            log.contains(&format!("engine=\"{engine}\"")),
            "--io-engine {engine} should be the engine in use: {log}"
        );
        let cmds = [
            "write -P 0x61 4097 3000",
            "write -P 0x62 1M 32M",
            "write -f -P 0x63 41943039 1",
            "write -z 2M 1M",
            "discard 4M 64k",
            "flush",
            "read -P 0x61 4097 3000",
            "read -P 0x62 1M 1M",
            "read -P 0 2M 1M",
            "read -P 0x62 3M 1M",
            "read -P 0 4M 64k",
            "read -P 0x62 4160k 28608k",
            "read -P 0x63 41943039 1",
        ];
        assert_qemu_io_ok(&qemu_io(&env, &server.uri(), &cmds));
        // And again on a fresh connection.
        assert_qemu_io_ok(&qemu_io(&env, &server.uri_unix(""), &cmds[6..]));
    }
}

#[test]
fn unix_socket_only_listener_works_and_is_removed_at_exit() {
    let env = TestEnv::new();
    let sock = env.path("only.sock");
    let img = env.path("u.img");
    let listen = format!("unix:{}", sock.display());
    let mut server = env.start_server(&[
        "--image",
        img.to_str().unwrap(),
        "--create",
        "8M",
        "--listen",
        &listen,
    ]);
    assert!(sock.exists());
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    assert_qemu_io_ok(&qemu_io(
        &env,
        &uri,
        &["write -P 0x42 0 1M", "read -P 0x42 0 1M"],
    ));
    let out = env.run(&["nbdinfo", "--size", &uri]);
    assert_eq!(out.stdout.trim(), (8 * MIB).to_string(), "{out}");
    // Not on TCP.
    let tcp = env.ns.connect_tcp(TCP_ADDR);
    assert!(tcp.is_err(), "nothing should listen on TCP");
    let (status, _) = server.stop(Signal::SIGTERM, STOP_TIMEOUT).expect("exit");
    assert_eq!(status.code(), Some(0));
    assert!(!sock.exists(), "the socket file should be removed at exit");
    assert_eq!(read_file_range(&img, 0, 4), vec![0x42; 4]);
}

#[test]
fn export_name_selects_the_export() {
    let env = TestEnv::new();
    let img = env.path("image-stem.img");
    let server = env.start_server(&[
        "--image",
        img.to_str().unwrap(),
        "--create",
        "12M",
        "--name",
        "foo",
    ]);
    for uri in [
        server.uri_tcp("foo"),
        server.uri_tcp(""),
        server.uri_unix("foo"),
    ] {
        let out = env.run(&["qemu-img", "info", "--output=json", &uri]);
        out.ok();
        assert!(out.stdout.contains("\"virtual-size\": 12582912"), "{out}");
    }
    for uri in [
        server.uri_tcp("bar"),
        server.uri_tcp("image-stem"),
        server.uri_unix("bar"),
    ] {
        let out = env.run(&["qemu-img", "info", &uri]);
        assert!(!out.success(), "{uri} must not open: {out}");
        let out = env.run(&["nbdinfo", "--size", &uri]);
        assert!(!out.success(), "{uri} must not open: {out}");
    }
    let mut c = server.raw_unix();
    c.start();
    let (size, _, _) = c.info_or_go(OPT_INFO, "foo", &[]).unwrap();
    assert_eq!(size, 12 * MIB);
    assert_eq!(
        c.info_or_go(OPT_GO, "bar", &[]).unwrap_err().kind,
        REP_ERR_UNKNOWN
    );
    let _ = RawClient::open_unix(server.unix_path(), Mode::Simple);
}

/// SIGTERM while a batch of writes is in flight: every write the server acknowledged is in
/// the image after the exit (finished, flushed), and no reply is an error other than
/// ESHUTDOWN.
#[test]
fn sigterm_with_requests_in_flight_keeps_every_acknowledged_write() {
    let env = TestEnv::new();
    let mut server = env.start_export("64M", &[]);
    let mut c = server.raw_unix();
    c.negotiate(Mode::Extended, false, "");
    let mut batch = Vec::new();
    let mut offsets = std::collections::HashMap::new();
    for i in 0..100u64 {
        let cookie = c.next_cookie();
        let off = i * 600 * 1024 + 123;
        let d = pattern(21, off, 512 * 1024);
        c.encode_request(
            &mut batch,
            CMD_FLAG_PAYLOAD_LEN,
            CMD_WRITE,
            cookie,
            off,
            d.len() as u64,
            &d,
        );
        offsets.insert(cookie, off);
    }
    let mut ws = c.s.try_clone();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        let _ = ws.write_all(&batch);
    });
    std::thread::sleep(Duration::from_millis(20));
    nix::sys::signal::kill(server.pid(), Signal::SIGTERM).unwrap();
    let mut acked = Vec::new();
    loop {
        match c.read_reply() {
            Ok(r) => {
                assert!(
                    r.error == 0 || r.error == 108,
                    "a write in flight at shutdown failed: {r:?}"
                );
                if r.error == 0 {
                    acked.push(offsets[&r.cookie]);
                }
            }
            Err(e) => {
                assert!(nbdmirror_tests::raw::is_disconnect(&e), "{e}");
                break;
            }
        }
        assert!(acked.len() <= 100);
    }
    writer.join().unwrap();
    let (status, _) = server
        .stop(Signal::SIGTERM, STOP_TIMEOUT)
        .expect("server exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", server.log());
    let img = env.path("disk.img");
    for off in &acked {
        assert_eq!(
            read_file_range(&img, *off, 512 * 1024),
            pattern(21, *off, 512 * 1024),
            "acknowledged write at {off} is missing after shutdown"
        );
    }
    eprintln!(
        "{} of 100 writes were acknowledged before the shutdown",
        acked.len()
    );
}

/// Idle clients (in the handshake, and in transmission) do not delay the shutdown.
#[test]
fn sigterm_with_idle_clients_exits_promptly() {
    let env = TestEnv::new();
    let mut server = env.start_export("8M", &[]);
    let mut idle = Vec::new();
    for i in 0..3 {
        let mut c = server.raw_unix();
        if i > 0 {
            c.read_greeting().unwrap();
        }
        if i > 1 {
            c.send_client_flags(FLAG_C_FIXED_NEWSTYLE).unwrap();
        }
        idle.push(c);
    }
    let mut t1 = server.raw_unix();
    t1.negotiate(Mode::Simple, false, "");
    let mut t2 = env.raw_tcp();
    t2.negotiate(Mode::Extended, false, "");
    assert_eq!(t2.write(0, &[1, 2, 3], 0), 0);
    let (status, took) = server
        .stop(Signal::SIGTERM, STOP_TIMEOUT)
        .expect("server exits after SIGTERM with idle clients");
    assert_eq!(status.code(), Some(0));
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(t1.server_closed_within(Duration::from_secs(5)));
    assert!(t2.server_closed_within(Duration::from_secs(5)));
}

/// Several listeners at once, IPv6 included.
#[test]
fn several_listen_addresses_including_ipv6() {
    let env = TestEnv::new();
    let img = env.path("multi.img");
    let sock = env.path("m.sock");
    let unix = format!("unix:{}", sock.display());
    let server = env.start_server(&[
        "--image",
        img.to_str().unwrap(),
        "--create",
        "8M",
        "--listen",
        "127.0.0.1:10809",
        "--listen",
        "[::1]:10810",
        "--listen",
        &unix,
    ]);
    let unix_uri = format!("nbd+unix:///?socket={}", sock.display());
    let uris = [
        "nbd://127.0.0.1:10809/".to_string(),
        "nbd://[::1]:10810/".to_string(),
        unix_uri,
    ];
    for (i, uri) in uris.iter().enumerate() {
        let w = format!("write -P {} {} 4096", 0x10 + i, i as u64 * MIB);
        assert_qemu_io_ok(&qemu_io(&env, uri, &[&w]));
    }
    for uri in &uris {
        let cmds: Vec<String> = (0..3)
            .map(|i| format!("read -P {} {} 4096", 0x10 + i, i as u64 * MIB))
            .collect();
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        assert_qemu_io_ok(&qemu_io(&env, uri, &cmds));
    }
    drop(server);
}

/// An existing image whose size is not a multiple of 512 is served at its exact size.
#[test]
fn existing_image_with_an_odd_size_is_served_exactly() {
    let env = TestEnv::new();
    let img = env.path("odd.img");
    let size = 3 * MIB + 17;
    write_pattern_file(&img, size, 6, &[]);
    let server = env.start_server(&["--image", img.to_str().unwrap()]);
    let out = env.run(&["nbdinfo", "--size", &server.uri()]);
    assert_eq!(out.stdout.trim(), size.to_string(), "{out}");
    let mut c = server.raw_unix();
    c.negotiate(Mode::Structured, false, "");
    assert_eq!(c.size, size);
    assert_eq!(c.read(size - 17, 17).unwrap(), pattern(6, size - 17, 17));
    assert_eq!(c.request(0, CMD_READ, size - 16, 17, &[]).error, 22);
    assert_eq!(c.write(size - 1, &[0xfe], 0), 0);
    assert_eq!(c.request(0, CMD_WRITE, size, 1, &[0xfe]).error, 28);
    c.disconnect();
    assert_eq!(
        std::fs::metadata(&img).unwrap().len(),
        size,
        "the image did not grow"
    );
    assert_eq!(read_file_range(&img, size - 1, 1), vec![0xfe]);
}
