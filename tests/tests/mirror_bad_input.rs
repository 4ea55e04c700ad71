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

/// A flood of idle connections, more than a daemon keeps waiting for their handshake (64):
/// the oldest are dropped at once instead of each holding its place for the handshake
/// timeout, and the real peer still gets in (node-a restarts and dials node-b meanwhile).
#[test]
fn a_flood_of_idle_connections_drops_the_oldest_and_lets_the_peer_in() {
    const FLOOD: usize = 80;
    let mut sc = Scene::new();
    let mut flood: Vec<(Node, TcpStream)> = Vec::new();
    for node in [A, B] {
        for _ in 0..FLOOD {
            flood.push((node, sc.connect(node)));
        }
    }
    // The first FLOOD - 64 of each node's were dropped when the later ones arrived: well
    // before the 10 s handshake timeout.
    let dropped = Instant::now();
    for (i, (node, s)) in flood.iter_mut().enumerate() {
        if i % FLOOD < FLOOD - 64 {
            assert!(
                closed_within(
                    s,
                    Duration::from_secs(3)
                        .saturating_sub(dropped.elapsed())
                        .max(Duration::from_millis(300))
                ),
                "idle connection {i} to {} still open after {:?}: the oldest must make room",
                node.name(),
                dropped.elapsed()
            );
        }
    }
    sc.assert_healthy("a flood of idle connections");
    // node-a dials, node-b accepts: node-a restarts (secondary, as every restarted node)
    // and must get through node-b's full queue; then it takes the primary role back.
    sc.pair.restart(A);
    sc.pair.wait_in_sync(A);
    let promoted = sc.pair.promote(A, false);
    assert!(promoted.success(), "promote after the restart: {promoted}");
    sc.assert_healthy("a flood of idle connections and a restart of node-a");
    let log = sc.pair.log(B);
    assert!(
        log.contains("too many replication connections waiting"),
        "node-b did not say why it dropped connections:\n{log}"
    );
    drop(flood);
    sc.finish();
}

/// A real daemon with the wrong secret dials node-b as if it were node-a: refused and
/// logged, the real link stays, and no data reaches the impostor.
#[test]
fn impostor_with_wrong_secret_is_refused_and_logged() {
    let mut sc = Scene::new();
    let pair = &sc.pair;
    // node-a's name, the wrong secret, its own ports and data. It dials: its name sorts
    // first, and so does its replication address (7800 < 7802: the daemon decides by the
    // addresses).
    let text = config_text(
        A,
        "this-is-the-wrong-secret-0123456789",
        "data-impostor",
        "64M",
        "",
    )
    .replace("127.0.0.1:7801", "127.0.0.1:7800")
    .replace("127.0.0.1:10809", "127.0.0.1:10811");
    assert_ne!(SECRET, "this-is-the-wrong-secret-0123456789");
    let cfg = pair.write_custom_config("impostor", &text);
    let log_b_before = pair.log(B).len();
    let log_path = pair.env.path("impostor.log");
    let mut impostor = pair.spawn_serve(&cfg, &log_path);
    // A refused dialer retries at most every second: let it try a few times.
    std::thread::sleep(Duration::from_secs(4));
    let log_b = pair.log(B);
    let new_lines = &log_b[log_b_before..];
    let lower = new_lines.to_lowercase();
    let impostor_log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        ["auth", "secret", "refus", "reject", "denied"]
            .iter()
            .any(|w| lower.contains(w)),
        "node-b should log the refused peer; its new log lines:\n{new_lines}\n\
         the impostor's log:\n{impostor_log}"
    );
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

// ---- Forged frames. The layout below is the one of mirror/src/repl/frame.rs (a 24-byte
// big-endian header: magic "NBMR", kind, 3 reserved bytes, sequence u64, body length u32,
// CRC32 of the body u32), encoded here by hand so the test does not trust the codec.

const MAGIC: &[u8; 4] = b"NBMR";
const HELLO: u8 = 1;
const HELLO_REPLY: u8 = 2;
const HELLO_PROOF: u8 = 3;
const WRITE: u8 = 10;
const FLUSH: u8 = 13;
const ERROR: u8 = 30;
/// Where forged writes aim (the healthy checks write at 1 MiB steps below it).
const FORGED_OFFSET: u64 = 62 * MIB;

/// CRC-32 (IEEE, reflected), as crc32fast computes it.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn frame(kind: u8, seq: u64, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(24 + body.len());
    f.extend_from_slice(MAGIC);
    f.extend_from_slice(&[kind, 0, 0, 0]);
    f.extend_from_slice(&seq.to_be_bytes());
    f.extend_from_slice(&(body.len() as u32).to_be_bytes());
    f.extend_from_slice(&crc32(body).to_be_bytes());
    f.extend_from_slice(body);
    f
}

fn text(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A `Hello` offering protocol versions `versions.0..=versions.1`.
fn hello(versions: (u16, u16), node: &str, volume: &str) -> Vec<u8> {
    let mut b = versions.1.to_be_bytes().to_vec();
    b.extend_from_slice(&versions.0.to_be_bytes());
    text(&mut b, node);
    text(&mut b, volume);
    b.extend_from_slice(&pattern(99, 0, 32));
    frame(HELLO, 0, &b)
}

fn write_frame(seq: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut b = offset.to_be_bytes().to_vec();
    b.push(1); // FUA
    b.extend_from_slice(data);
    frame(WRITE, seq, &b)
}

/// Reads one frame (header and body) within `timeout`; `None` on close or timeout.
fn read_frame(s: &mut TcpStream, timeout: Duration) -> Option<(u8, Vec<u8>)> {
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut h = [0u8; 24];
    s.read_exact(&mut h).ok()?;
    assert_eq!(
        &h[0..4],
        MAGIC,
        "the daemon answered with a non-frame: {h:02x?}"
    );
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
    assert!(len <= 1 << 20, "a handshake answer of {len} bytes");
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    Some((h[4], body))
}

/// Hello as node-a for disk0 to node-b; returns the connection after node-b's HelloReply.
fn hello_to_b(sc: &Scene) -> (TcpStream, Vec<u8>) {
    let mut s = sc.connect(B);
    s.write_all(&hello((1, 1), "node-a", VOLUME)).unwrap();
    let (kind, body) =
        read_frame(&mut s, Duration::from_secs(10)).expect("node-b answers a well-formed hello");
    assert_eq!(kind, HELLO_REPLY, "node-b's answer to a hello: {body:02x?}");
    (s, body)
}

#[track_caller]
fn assert_unchanged_at_forged_offset(sc: &Scene, what: &str) {
    for node in [A, B] {
        let got = read_file_range(&sc.pair.image(node), FORGED_OFFSET, 65536);
        assert!(
            got.iter().all(|&b| b == 0),
            "{what}: a forged write reached {}'s image",
            node.name()
        );
    }
}

#[test]
fn forged_frames_without_the_secret_are_refused_and_write_nothing() {
    let mut sc = Scene::new();
    let forged = vec![0xee; 65536];

    // A well-formed hello, then a wrong proof: refused with an error frame, then closed.
    let (mut s, _) = hello_to_b(&sc);
    s.write_all(&frame(HELLO_PROOF, 0, &pattern(5, 0, 32)))
        .unwrap();
    match read_frame(&mut s, Duration::from_secs(10)) {
        Some((ERROR, body)) => eprintln!(
            "refusal of a wrong proof: {}",
            String::from_utf8_lossy(&body)
        ),
        other => panic!("a wrong proof should get an error frame, got {other:?}"),
    }
    assert!(
        closed_within(&mut s, REFUSE_TIMEOUT),
        "closed after a wrong proof"
    );
    sc.assert_healthy("a wrong proof");

    // The acceptor's own proof reflected back as the dialer's: refused.
    let (mut s, reply) = hello_to_b(&sc);
    let proof = &reply[reply.len() - 32..];
    s.write_all(&frame(HELLO_PROOF, 0, proof)).unwrap();
    assert!(
        matches!(
            read_frame(&mut s, Duration::from_secs(10)),
            Some((ERROR, _)) | None
        ),
        "a reflected proof must be refused"
    );
    assert!(closed_within(&mut s, REFUSE_TIMEOUT));
    sc.assert_healthy("a reflected proof");

    // A hello, then a write instead of the proof: nothing is written.
    let (mut s, _) = hello_to_b(&sc);
    let _ = s.write_all(&write_frame(1, FORGED_OFFSET, &forged));
    let _ = s.write_all(&frame(FLUSH, 2, &[]));
    assert!(closed_within(&mut s, REFUSE_TIMEOUT));
    sc.assert_healthy("a write before the proof");
    assert_unchanged_at_forged_offset(&sc, "a write before the proof");

    // A write with no handshake at all, to both nodes.
    for node in [A, B] {
        let mut s = sc.connect(node);
        let _ = s.write_all(&write_frame(1, FORGED_OFFSET, &forged));
        assert!(closed_within(&mut s, REFUSE_TIMEOUT));
        sc.assert_healthy("a write without a handshake");
        assert_unchanged_at_forged_offset(&sc, "a write without a handshake");
    }

    // Hellos that are wrong in one field: each refused.
    let mut bad_crc = hello((1, 1), "node-a", VOLUME);
    let n = bad_crc.len();
    bad_crc[n - 1] ^= 1;
    let mut reserved = hello((1, 1), "node-a", VOLUME);
    reserved[6] = 1;
    let mut too_long = hello((1, 1), "node-a", VOLUME);
    too_long[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
    let mut bad_text = hello((1, 1), "node-a", VOLUME);
    bad_text[28..30].copy_from_slice(&u16::MAX.to_be_bytes());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("a hello with a bad CRC", bad_crc),
        ("a hello with reserved bits", reserved),
        ("a frame of 4 GiB", too_long),
        ("a name longer than the frame", bad_text),
        ("protocol versions 99-99", hello((99, 99), "node-a", VOLUME)),
        ("an empty version range", hello((2, 1), "node-a", VOLUME)),
        (
            "an unknown volume",
            hello((1, 1), "node-a", "no-such-volume"),
        ),
        ("the acceptor's own name", hello((1, 1), "node-b", VOLUME)),
        ("an unknown frame kind", frame(200, 0, b"x")),
        ("a proof without hello", frame(HELLO_PROOF, 0, &[0; 32])),
    ];
    for (what, bytes) in cases {
        let mut s = sc.connect(B);
        let _ = s.write_all(&bytes);
        let mut answer = None;
        if let Some((kind, body)) = read_frame(&mut s, Duration::from_secs(5)) {
            answer = Some((kind, String::from_utf8_lossy(&body).into_owned()));
            assert_ne!(kind, HELLO_REPLY, "{what}: answered as if valid");
        }
        eprintln!("{what}: answer {answer:?}");
        if what.starts_with("protocol versions") {
            let said = answer.as_ref().map(|(_, text)| text.as_str()).unwrap_or("");
            assert!(
                said.contains("speaks versions 99-99") && said.contains("upgrade the older node"),
                "{what}: the refusal names no versions: {said:?}"
            );
        }
        assert!(closed_within(&mut s, REFUSE_TIMEOUT), "{what}: not closed");
        sc.assert_healthy(what);
    }

    // Truncated frames: a header that announces 1 MiB, 100 bytes of it, then close; and the
    // same held open while the pair works.
    let mut big = write_frame(1, FORGED_OFFSET, &vec![0xee; 1 << 20]);
    big.truncate(24 + 100);
    let mut s = sc.connect(B);
    let _ = s.write_all(&big);
    let _ = s.shutdown(std::net::Shutdown::Write);
    assert!(closed_within(&mut s, REFUSE_TIMEOUT));
    sc.assert_healthy("a truncated write frame");
    let (mut held, _) = hello_to_b(&sc);
    let _ = held.write_all(&frame(HELLO_PROOF, 0, &[0; 32])[..30]);
    sc.assert_healthy("a truncated proof held open");
    // The handshake has a deadline: the held connection is closed eventually.
    let closed = closed_within(&mut held, Duration::from_secs(60));
    assert!(
        closed,
        "a half-sent proof kept the connection open for a minute"
    );
    assert_unchanged_at_forged_offset(&sc, "the end");
    sc.finish();
}
