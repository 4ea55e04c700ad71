//! Bad input on the replication ports (127.0.0.1:7801 of node-a, 127.0.0.1:7802 of node-b):
//! garbage, an impostor daemon with the wrong secret, truncated and corrupted copies of a
//! real hello, connections that send nothing. After each, both daemons still run, the link
//! of the pair is still up, and a write through the primary still reaches the secondary.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use nbdmirror_tests::data::{assert_files_equal, pattern, read_file_range};
use nbdmirror_tests::pair::{config_text, Node, Pair, A, B, MIB, SECRET, VOLUME};
use nbdmirror_tests::{assert_qemu_io_ok, poll, qemu_io};

/// How long a daemon may take to drop a connection it refuses.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(20);

struct Scene {
    pair: Pair,
    round: u64,
}

impl Scene {
    fn new() -> Scene {
        let mut pair = Pair::new();
        pair.start_with_a_primary();
        Scene { pair, round: 0 }
    }

    fn connect(&self, node: Node) -> TcpStream {
        let s = self
            .pair
            .env
            .ns
            .connect_tcp(node.replication_addr())
            .unwrap_or_else(|e| panic!("connect to {}: {e}", node.replication_addr()));
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    /// Both daemons run, the link is up and in sync, and a new write through the primary
    /// lands in the secondary's image.
    #[track_caller]
    fn assert_healthy(&mut self, after: &str) {
        self.round += 1;
        for node in [A, B] {
            assert!(
                self.pair.is_running(node),
                "{} died after {after}; log:\n{}",
                node.name(),
                self.pair.log(node)
            );
        }
        let a = self.pair.wait_in_sync(A);
        assert_eq!(a["role"], "primary", "after {after}: {a}");
        self.pair.wait_in_sync(B);
        let off = self.round * MIB;
        let cmd = format!("write -P {} {off} 64k", 0x10 + self.round);
        assert_qemu_io_ok(&qemu_io(
            &self.pair.env,
            &self.pair.uri(A),
            &[&cmd, "flush"],
        ));
        let img = self.pair.image(B);
        let want = vec![(0x10 + self.round) as u8; 65536];
        poll(
            &format!("the write after {after} to reach node-b"),
            Duration::from_secs(10),
            || (read_file_range(&img, off, 65536) == want).then_some(()),
        );
        let a = self.pair.vol(A, VOLUME);
        assert_eq!(a["peer"], "connected", "after {after}: {a}");
        assert_eq!(a["sync"], "in-sync", "after {after}: {a}");
    }

    fn finish(mut self) {
        self.assert_healthy("everything");
        self.pair.demote(A).ok();
        self.pair.wait_in_sync(A);
        self.pair.wait_in_sync(B);
        assert_files_equal(&self.pair.image(A), &self.pair.image(B));
    }
}

/// Sends `bytes` (ignoring a reset midway) and reports whether the daemon closed the
/// connection within `timeout`.
fn send_and_wait_close(mut s: TcpStream, bytes: &[u8], timeout: Duration) -> bool {
    for chunk in bytes.chunks(4096) {
        if s.write_all(chunk).is_err() {
            return true; // reset by the daemon: refused
        }
    }
    closed_within(&mut s, timeout)
}

fn closed_within(s: &mut TcpStream, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {} // a greeting or an error frame: keep reading
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return true,
        }
    }
    false
}

#[test]
fn garbage_on_both_replication_ports_is_refused_without_harm() {
    let mut sc = Scene::new();
    for node in [A, B] {
        // Random bytes.
        let junk = pattern(node as u64 + 1, 0, 256 << 10);
        let s = sc.connect(node);
        assert!(
            send_and_wait_close(s, &junk, REFUSE_TIMEOUT),
            "{} kept a connection that sent 256 KiB of garbage",
            node.name()
        );
        sc.assert_healthy("random garbage");
        // Something else's protocol.
        let s = sc.connect(node);
        assert!(
            send_and_wait_close(s, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", REFUSE_TIMEOUT),
            "{} kept an HTTP client",
            node.name()
        );
        // All ones: every length field at its maximum; must not allocate it.
        let s = sc.connect(node);
        assert!(
            send_and_wait_close(s, &[0xff; 4096], REFUSE_TIMEOUT),
            "{} kept a connection of 0xff bytes",
            node.name()
        );
        // All zeros.
        let s = sc.connect(node);
        let _ = send_and_wait_close(s, &[0; 4096], REFUSE_TIMEOUT);
        sc.assert_healthy("0xff and zero bytes");
        // Many at once.
        let many: Vec<TcpStream> = (0..64).map(|_| sc.connect(node)).collect();
        for mut s in many {
            let _ = s.write_all(&pattern(7, 0, 1000));
        }
        sc.assert_healthy("64 garbage connections");
    }
    sc.finish();
}

/// Connections that send nothing, or close at once, or half-close: the pair works while
/// they sit there.
#[test]
fn silent_and_vanishing_connections_do_not_block_the_pair() {
    let mut sc = Scene::new();
    let mut silent = Vec::new();
    for node in [A, B] {
        silent.push(sc.connect(node));
        drop(sc.connect(node));
        let half = sc.connect(node);
        half.shutdown(std::net::Shutdown::Write).unwrap();
        silent.push(half);
    }
    sc.assert_healthy("silent connections");
    // A restart of the secondary while they are open: the link comes back.
    sc.pair.restart(B);
    sc.assert_healthy("silent connections and a restart of node-b");
    for (i, mut s) in silent.into_iter().enumerate() {
        let closed = closed_within(&mut s, Duration::from_millis(100));
        eprintln!("silent connection {i}: closed by the daemon = {closed}");
    }
    sc.finish();
}

/// A real daemon with the wrong secret dials node-b as if it were node-a: refused and
/// logged, the real link stays, and no data reaches the impostor.
#[test]
fn impostor_with_wrong_secret_is_refused_and_logged() {
    let mut sc = Scene::new();
    let pair = &sc.pair;
    // node-a's name (it dials), the wrong secret, its own ports and data.
    let text = config_text(
        A,
        "this-is-the-wrong-secret-0123456789",
        "data-impostor",
        "64M",
        "",
    )
    .replace("127.0.0.1:7801", "127.0.0.1:7803")
    .replace("127.0.0.1:10809", "127.0.0.1:10811");
    assert_ne!(SECRET, "this-is-the-wrong-secret-0123456789");
    let cfg = pair.write_custom_config("impostor", &text);
    let log_b_before = pair.log(B).len();
    let log_path = pair.env.path("impostor.log");
    let mut impostor = pair.spawn_serve(&cfg, &log_path);
    // It retries every second: let it try a few times.
    std::thread::sleep(Duration::from_secs(4));
    let log_b = pair.log(B);
    let new_lines = &log_b[log_b_before..];
    let lower = new_lines.to_lowercase();
    assert!(
        ["auth", "secret", "refus", "reject", "denied"]
            .iter()
            .any(|w| lower.contains(w)),
        "node-b should log the refused peer; its new log lines:\n{new_lines}"
    );
    let impostor_log = std::fs::read_to_string(&log_path).unwrap_or_default();
    sc.assert_healthy("an impostor with the wrong secret");
    // The impostor never became in sync with anyone, and received no data.
    let _ = impostor.kill();
    let _ = impostor.wait();
    let img = sc.pair.env.path("data-impostor/disk0.img");
    if img.exists() {
        let data = std::fs::read(&img).unwrap();
        assert!(
            data.iter().all(|&b| b == 0),
            "data reached the impostor; its log:\n{impostor_log}"
        );
    }
    sc.finish();
}

/// The first bytes a real daemon sends when it dials (its hello, with the right secret),
/// captured by a listener of the test; then sent to node-b truncated at several points,
/// and corrupted, and replayed whole.
#[test]
fn truncated_corrupted_and_replayed_hellos_are_refused_without_harm() {
    let mut sc = Scene::new();
    let pair = &sc.pair;
    // A capturing listener in the namespace on 7899; a spare daemon named node-a (so it
    // dials) with the right secret points its peer at it.
    let listener = pair
        .env
        .ns
        .in_ns(|| TcpListener::bind("127.0.0.1:7899").expect("bind 7899"));
    listener.set_nonblocking(true).unwrap();
    let text = config_text(A, SECRET, "data-spare", "64M", "")
        .replace("127.0.0.1:7802", "127.0.0.1:7899")
        .replace("127.0.0.1:7801", "127.0.0.1:7804")
        .replace("127.0.0.1:10809", "127.0.0.1:10812");
    let cfg = pair.write_custom_config("spare", &text);
    let mut spare = pair.spawn_serve(&cfg, &pair.env.path("spare.log"));
    let mut conn = poll(
        "the spare daemon to dial the capturing listener",
        Duration::from_secs(20),
        || listener.accept().ok().map(|(s, _)| s),
    );
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut hello = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut buf = [0u8; 65536];
    while Instant::now() < deadline {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hello.extend_from_slice(&buf[..n]),
            Err(_) if !hello.is_empty() => break,
            Err(_) => {}
        }
    }
    drop(conn);
    let _ = spare.kill();
    let _ = spare.wait();
    eprintln!(
        "captured {} bytes of hello: {:02x?}",
        hello.len(),
        &hello[..hello.len().min(64)]
    );

    if hello.is_empty() {
        // The accepting side speaks first: take node-b's greeting instead, and send it back
        // truncated (a frame of the protocol, cut short).
        let mut s = sc.connect(B);
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let n = s.read(&mut buf).unwrap_or(0);
        assert!(n > 0, "neither the dialer nor the acceptor speaks first");
        hello = buf[..n].to_vec();
    }

    let len = hello.len();
    let mut cuts: Vec<usize> = vec![1, 2, 4, 7, 8, 12, 16, len / 2, len - 1];
    cuts.retain(|&c| c > 0 && c < len);
    cuts.dedup();
    for cut in cuts {
        let mut s = sc.connect(B);
        let _ = s.write_all(&hello[..cut]);
        // Close right after the truncated frame.
        let _ = s.shutdown(std::net::Shutdown::Write);
        let closed = closed_within(&mut s, REFUSE_TIMEOUT);
        assert!(
            closed,
            "node-b kept a connection after a truncated hello of {cut} bytes"
        );
        sc.assert_healthy(&format!("a hello truncated to {cut} of {len} bytes"));
    }
    // Truncated and held open (no close): the pair must not wait for it.
    let held = sc.connect(B);
    let _ = (&held).write_all(&hello[..len / 2]);
    sc.assert_healthy("a held half hello");
    drop(held);
    // Corrupted: one byte flipped at several places.
    for pos in [0, len / 4, len / 2, len - 1] {
        let mut bad = hello.clone();
        bad[pos] ^= 0x5a;
        let s = sc.connect(B);
        let _ = send_and_wait_close(s, &bad, Duration::from_secs(5));
        sc.assert_healthy(&format!("a hello with byte {pos} corrupted"));
    }
    // Replayed whole (a recorded hello must not authenticate a second time).
    let s = sc.connect(B);
    let _ = send_and_wait_close(s, &hello, Duration::from_secs(5));
    sc.assert_healthy("a replayed hello");
    // The replayed hello followed by garbage.
    let mut tail = hello.clone();
    tail.extend_from_slice(&pattern(3, 0, 100_000));
    let s = sc.connect(B);
    let _ = send_and_wait_close(s, &tail, Duration::from_secs(5));
    sc.assert_healthy("a replayed hello and garbage");
    sc.finish();
}
