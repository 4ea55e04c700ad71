//! Degraded mode and resync: the secondary dies under write load, the primary keeps serving
//! and records what changed; when the secondary returns, only about that is copied.

use std::time::{Duration, Instant};

use nbdmirror_tests::data::{assert_files_equal, read_file_range};
use nbdmirror_tests::pair::{
    assert_fio_ok, fio, fio_args, num, Pair, PairOptions, A, B, MIB, VOLUME,
};
use nbdmirror_tests::{assert_qemu_io_ok, qemu_io};

/// Dirty-map granule and activity extent of the metadata format (64 KiB, 4 MiB): the slack
/// allowed around the regions a test wrote.
const EXTENT: u64 = 4 * MIB;

#[test]
fn secondary_killed_under_load_then_resync_copies_about_the_dirty_bytes() {
    let mut pair = Pair::with_size("256M");
    pair.start_with_a_primary();
    let uri = pair.uri(A);

    // Write load on 64M..80M for 10 s, through the primary.
    let load = fio_args(
        &uri,
        &[
            "--name=load",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            "--offset=64m",
            "--size=16m",
            "--time_based=1",
            "--runtime=10",
        ],
    );
    let load: Vec<&str> = load.iter().map(String::as_str).collect();
    let bg = pair.env.spawn(&load);
    std::thread::sleep(Duration::from_millis(1500));
    pair.kill9(B);
    pair.wait_disconnected(A);

    // The primary keeps serving, also on a new connection, while the load goes on.
    let started = Instant::now();
    assert_qemu_io_ok(&qemu_io(
        &pair.env,
        &uri,
        &["write -P 0x5c 100M 4M", "flush", "read -P 0x5c 100M 4M"],
    ));
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "a degraded write took {:?}",
        started.elapsed()
    );
    let out = bg.wait(Duration::from_secs(90));
    assert_fio_ok(&out);

    let a = pair.vol(A, VOLUME);
    assert_eq!(a["role"], "primary", "{a}");
    assert_eq!(a["peer"], "disconnected", "{a}");
    assert_eq!(a["sync"], "out-of-sync", "{a}");
    let dirty = num(&a, "dirty_bytes");
    assert!(dirty >= 4 * MIB, "the 4 MiB written alone are dirty: {a}");
    // Only what was written while alone: 16 MiB of load + 4 MiB, plus rounding.
    assert!(
        dirty <= 20 * MIB + 2 * EXTENT,
        "dirty_bytes {dirty} exceeds what was written alone: {a}"
    );
    // The dirty map on disk (read without the daemon's help) covers the 4 MiB written alone.
    let m = pair.inspect(A);
    let ranges = m["dirty_ranges"].as_array().expect("dirty_ranges");
    let covered = ranges.iter().any(|r| {
        let off = r["offset"].as_u64().unwrap();
        let len = r["length"].as_u64().unwrap();
        off <= 100 * MIB && off + len >= 104 * MIB
    });
    assert!(
        covered,
        "the dirty map on disk should cover 100M..104M: {m}"
    );

    // The secondary returns, secondary, and is resynced.
    pair.start(B);
    let b = pair.vol(B, VOLUME);
    assert_eq!(b["role"], "secondary", "{b}");
    let a = pair.wait_in_sync(A);
    let b = pair.wait_in_sync(B);
    let sent = num(&a, "resync_bytes_sent");
    let received = num(&b, "resync_bytes_received");
    eprintln!("dirty before restart {dirty}, resync sent {sent}, received {received}");
    assert!(
        sent <= dirty + 2 * EXTENT,
        "resync sent {sent} bytes for {dirty} dirty bytes: {a}"
    );
    assert!(
        sent >= dirty / 2,
        "resync sent {sent} bytes, far less than the {dirty} dirty bytes: {a}"
    );
    assert!(sent < pair.size / 4, "not a full copy: {sent}");
    assert!(
        received > 0 && received <= sent + MIB,
        "received {received}, sent {sent}"
    );
    assert_eq!(
        num(&a, "dirty_bytes"),
        0,
        "in sync means nothing dirty: {a}"
    );
    assert_eq!(num(&a, "resync_bytes_left"), 0, "{a}");
    assert_eq!(b["consistent"], true, "{b}");

    pair.demote(A).ok();
    pair.wait_in_sync(A);
    pair.wait_in_sync(B);
    assert_files_equal(&pair.image(A), &pair.image(B));
    assert!(read_file_range(&pair.image(B), 100 * MIB, 4 * MIB as usize)
        .iter()
        .all(|&x| x == 0x5c));
}

/// A clean stop of the secondary: the same, without a crash; the resync runs slowly (rate
/// limit) while fio writes and verifies over the very regions being resynced.
#[test]
fn resync_under_concurrent_writes_keeps_order_and_ends_identical() {
    let mut pair = Pair::with_options(PairOptions {
        size: "128M".into(),
        extra: "resync_rate = \"4M\"".into(),
        ..PairOptions::default()
    });
    pair.start_with_a_primary();
    let uri = pair.uri(A);
    pair.stop(B);
    pair.wait_disconnected(A);
    assert_qemu_io_ok(&qemu_io(&pair.env, &uri, &["write -P 0x3e 0 32M", "flush"]));
    let dirty = num(&pair.vol(A, VOLUME), "dirty_bytes");
    assert!(dirty >= 32 * MIB, "{dirty}");

    pair.start(B);
    pair.wait_for(A, VOLUME, "syncing", Duration::from_secs(30), |v| {
        v["sync"] == "syncing"
    });
    // The VM keeps running during the resync: writes over the resynced range, verified.
    let job = [
        "--name=during",
        "--rw=randwrite",
        "--bsrange=4k-128k",
        "--iodepth=8",
        "--offset=0",
        "--size=32m",
        "--io_size=16m",
        "--verify=crc32c",
        "--do_verify=1",
    ];
    assert_fio_ok(&fio(&pair.env, &uri, &job));
    let mid = pair.vol(A, VOLUME);
    eprintln!("after fio during resync: {mid}");

    let a = pair.wait_for(A, VOLUME, "in-sync", Duration::from_secs(120), |v| {
        v["sync"] == "in-sync" && v["peer"] == "connected"
    });
    pair.wait_in_sync(B);
    let sent = num(&a, "resync_bytes_sent");
    assert!(
        sent <= dirty + 2 * EXTENT,
        "resync sent {sent} for {dirty} dirty: {a}"
    );
    let mut again = job.to_vec();
    again.push("--verify_only");
    assert_fio_ok(&fio(&pair.env, &uri, &again));
    pair.demote(A).ok();
    pair.wait_in_sync(A);
    pair.wait_in_sync(B);
    assert_files_equal(&pair.image(A), &pair.image(B));
}

/// A frozen secondary (SIGSTOP: no reset, just silence): the primary declares it dead after
/// peer_timeout and keeps serving; thawed, it reconnects and is resynced.
#[test]
fn frozen_secondary_is_declared_dead_after_peer_timeout() {
    let mut pair = Pair::with_options(PairOptions {
        extra: "peer_timeout = \"2s\"".into(),
        ..PairOptions::default()
    });
    pair.start_with_a_primary();
    let uri = pair.uri(A);
    pair.signal(B, nix::sys::signal::Signal::SIGSTOP);
    let started = Instant::now();
    let out = qemu_io(&pair.env, &uri, &["write -P 0x71 4M 1M", "flush"]);
    let took = started.elapsed();
    // Read while node-b is still frozen: thawed, it reconnects and a 1 MiB resync can end
    // before a status taken after SIGCONT (dirty_bytes 0 again).
    let a = pair.vol(A, VOLUME);
    pair.signal(B, nix::sys::signal::Signal::SIGCONT);
    assert_qemu_io_ok(&out);
    eprintln!("a write with a frozen peer took {took:?}");
    assert!(
        took < Duration::from_secs(15),
        "a write waited {took:?} with peer_timeout 2s"
    );
    assert!(num(&a, "dirty_bytes") >= MIB, "{a}");
    // Thawed: the link comes back and the pair converges.
    pair.wait_in_sync(A);
    pair.wait_in_sync(B);
    pair.demote(A).ok();
    pair.wait_in_sync(A);
    pair.wait_in_sync(B);
    assert_files_equal(&pair.image(A), &pair.image(B));
}

/// A 128 MiB pair resyncing at 4 MiB/s, node-b away and 40 MiB written through node-a
/// with `pattern`: a resync that lasts ten seconds, time to interrupt it.
fn slow_resync_with_40_mib_dirty(pattern: u8) -> Pair {
    let mut pair = Pair::with_options(PairOptions {
        size: "128M".into(),
        extra: "resync_rate = \"4M\"".into(),
        ..PairOptions::default()
    });
    pair.start_with_a_primary();
    pair.stop(B);
    pair.wait_disconnected(A);
    assert_qemu_io_ok(&qemu_io(
        &pair.env,
        &pair.uri(A),
        &[&format!("write -P {pattern:#x} 0 40M"), "flush"],
    ));
    pair
}

/// The resync completes, both nodes say in-sync (node-a also after giving up the primary
/// role), and the images are byte-identical.
fn resync_ends_identical(pair: &mut Pair) {
    pair.wait_for(A, VOLUME, "in-sync", Duration::from_secs(90), |v| {
        v["sync"] == "in-sync" && v["peer"] == "connected"
    });
    pair.wait_in_sync(B);
    pair.demote(A).ok();
    pair.wait_in_sync(A);
    pair.wait_in_sync(B);
    assert_files_equal(&pair.image(A), &pair.image(B));
}

/// The resync target is killed in the middle of its resync: after a restart it is still
/// inconsistent (not promotable without --force), and the resync resumes and completes.
#[test]
fn resync_target_killed_midway_stays_inconsistent_and_resumes() {
    let mut pair = slow_resync_with_40_mib_dirty(0x19);
    pair.start(B);
    let b = pair.wait_for(
        B,
        VOLUME,
        "syncing with some data received",
        Duration::from_secs(30),
        |v| v["sync"] == "syncing" && num(v, "resync_bytes_received") > 0,
    );
    assert_eq!(b["consistent"], false, "{b}");
    pair.kill9(B);
    let m = pair.inspect(B);
    assert_eq!(
        m["flags"]["consistent"], false,
        "the resync target is marked inconsistent on disk: {m}"
    );
    pair.start(B);
    let b = pair.vol(B, VOLUME);
    assert_eq!(b["role"], "secondary");
    assert_eq!(
        b["consistent"], false,
        "still inconsistent after the restart: {b}"
    );
    let out = pair.promote(B, false);
    assert_eq!(out.code, Some(1), "an unfinished resync target: {out}");
    resync_ends_identical(&mut pair);
}

/// The resync target crashes in the middle of its resync. The chunks it had acknowledged
/// were in its page cache, not flushed: a power loss would have dropped them, and the primary
/// cannot tell a power loss from a killed process. So when the link drops, they go back into
/// the primary's dirty map: it covers every byte the resync had to copy, not only the bytes
/// not sent yet.
#[test]
fn resync_target_crash_marks_its_unflushed_chunks_dirty_again() {
    let mut pair = slow_resync_with_40_mib_dirty(0x2b);
    let a = pair.vol(A, VOLUME);
    assert_eq!(num(&a, "dirty_bytes"), 40 * MIB, "{a}");
    let sent_before = num(&a, "resync_bytes_sent");
    pair.start(B);
    let a = pair.wait_for(
        A,
        VOLUME,
        "8 MiB of the resync sent",
        Duration::from_secs(30),
        |v| num(v, "resync_bytes_sent") >= sent_before + 8 * MIB,
    );
    assert_eq!(a["sync"], "syncing", "{a}");
    pair.kill9(B);
    pair.wait_disconnected(A);
    let a = pair.vol(A, VOLUME);
    assert_eq!(
        num(&a, "dirty_bytes"),
        40 * MIB,
        "the chunks the target acknowledged but never flushed are dirty again: {a}"
    );
    pair.start(B);
    resync_ends_identical(&mut pair);
}

/// The primary writes alone, then crashes: its dirty map (durable before each write was
/// acknowledged) survives, and when both come back the changes reach the peer.
#[test]
fn dirty_map_survives_a_crash_of_the_degraded_primary() {
    let mut pair = Pair::new();
    pair.start_with_a_primary();
    pair.stop(B);
    pair.wait_disconnected(A);
    assert_qemu_io_ok(&qemu_io(
        &pair.env,
        &pair.uri(A),
        &["write -P 0x5e 20M 3M", "write -P 0x5f 50M 64k"],
    ));
    pair.kill9(A);
    let m = pair.inspect(A);
    assert!(
        m["dirty_bytes"].as_u64().unwrap() >= 3 * MIB + 65536,
        "the dirty map on disk covers what was written alone: {m}"
    );
    pair.start(A);
    pair.start(B);
    let a = pair.vol(A, VOLUME);
    assert_eq!(a["role"], "secondary", "{a}");
    // node-a holds the newer generation: it resyncs node-b by itself, both secondary.
    let a = pair.wait_in_sync(A);
    let b = pair.wait_in_sync(B);
    let sent = num(&a, "resync_bytes_sent");
    assert!(
        (3 * MIB..=12 * MIB).contains(&sent),
        "resync of the dirty map (and hot extents) only: {a}"
    );
    assert_eq!(num(&b, "resync_bytes_received"), sent, "{b}");
    pair.demote(A).ok();
    pair.wait_in_sync(A);
    pair.wait_in_sync(B);
    assert_files_equal(&pair.image(A), &pair.image(B));
    assert!(read_file_range(&pair.image(B), 20 * MIB, 3 * MIB as usize)
        .iter()
        .all(|&x| x == 0x5e));
}

/// The secondary flaps (killed and restarted three times) while fio writes and verifies
/// through the primary: fio never sees an error, the images end identical.
#[test]
fn flapping_secondary_under_verified_load() {
    let mut pair = Pair::with_size("128M");
    pair.start_with_a_primary();
    let uri = pair.uri(A);
    let load = fio_args(
        &uri,
        &[
            "--name=flap",
            "--rw=randwrite",
            "--bsrange=4k-64k",
            "--iodepth=16",
            "--size=96m",
            "--io_size=400m",
            "--verify=crc32c",
            "--do_verify=1",
        ],
    );
    let load: Vec<&str> = load.iter().map(String::as_str).collect();
    let bg = pair.env.spawn(&load);
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(1500));
        pair.kill9(B);
        std::thread::sleep(Duration::from_millis(700));
        pair.start(B);
    }
    let out = bg.wait(Duration::from_secs(240));
    assert_fio_ok(&out);
    pair.wait_for(A, VOLUME, "in-sync", Duration::from_secs(120), |v| {
        v["sync"] == "in-sync" && v["peer"] == "connected"
    });
    pair.wait_in_sync(B);
    pair.demote(A).ok();
    pair.wait_in_sync(A);
    pair.wait_in_sync(B);
    assert_files_equal(&pair.image(A), &pair.image(B));
}

/// The resync source (node-a, newer, both secondary) is killed midway: node-b stays
/// inconsistent and may not be promoted without --force; node-a restarts and the resync
/// finishes from where its dirty map stands.
#[test]
fn resync_source_killed_midway_then_resumes() {
    let mut pair = Pair::with_options(PairOptions {
        size: "128M".into(),
        extra: "resync_rate = \"4M\"".into(),
        ..PairOptions::default()
    });
    pair.start_with_a_primary();
    pair.stop(B);
    pair.wait_disconnected(A);
    assert_qemu_io_ok(&qemu_io(
        &pair.env,
        &pair.uri(A),
        &["write -P 0x2a 0 40M", "flush"],
    ));
    pair.start(B);
    pair.wait_for(
        B,
        VOLUME,
        "syncing with some data received",
        Duration::from_secs(30),
        |v| v["sync"] == "syncing" && num(v, "resync_bytes_received") > 0,
    );
    pair.kill9(A);
    let b = pair.wait_disconnected(B);
    assert_eq!(b["consistent"], false, "{b}");
    let out = pair.promote(B, false);
    assert_eq!(out.code, Some(1), "an unfinished resync target: {out}");
    let left = pair.inspect(A)["dirty_bytes"].as_u64().unwrap();
    eprintln!("node-a's dirty map after its crash: {left} bytes");
    // node-b flushed none of it yet (the source flushes its target every 256 MiB and at the
    // end): had node-b lost power too, it would lack every chunk it acknowledged, so node-a's
    // dirty map must still hold all 40 MiB.
    assert!((40 * MIB..48 * MIB).contains(&left), "{left}");
    pair.start(A);
    let a = pair.vol(A, VOLUME);
    assert_eq!(a["role"], "secondary", "{a}");
    let a = pair.wait_for(A, VOLUME, "in-sync", Duration::from_secs(90), |v| {
        v["sync"] == "in-sync" && v["peer"] == "connected"
    });
    let b = pair.wait_in_sync(B);
    assert_eq!(b["consistent"], true, "{b}");
    let sent = num(&a, "resync_bytes_sent");
    assert!(
        sent <= left + 8 * MIB,
        "after the restart, resync sent {sent} for {left} left: {a}"
    );
    assert_files_equal(&pair.image(A), &pair.image(B));
}

/// Trims and write-zeroes made while the peer is away reach it through the resync: data
/// it holds in those regions becomes zero.
#[test]
fn trims_and_zeroes_while_degraded_are_resynced() {
    let mut pair = Pair::new();
    pair.start_with_a_primary();
    let uri = pair.uri(A);
    assert_qemu_io_ok(&qemu_io(&pair.env, &uri, &["write -P 0x77 0 16M", "flush"]));
    pair.stop(B);
    pair.wait_disconnected(A);
    assert_qemu_io_ok(&qemu_io(
        &pair.env,
        &uri,
        &[
            "discard 1M 2M",
            "write -z 5M 1M",
            "write -z -u 9M 3M",
            "write -z 13M 4097",
            "flush",
        ],
    ));
    pair.start(B);
    pair.wait_in_sync(A);
    pair.wait_in_sync(B);
    pair.demote(A).ok();
    pair.wait_in_sync(A);
    pair.wait_in_sync(B);
    assert_files_equal(&pair.image(A), &pair.image(B));
    let img = pair.image(B);
    for (off, len) in [
        (MIB, 2 * MIB),
        (5 * MIB, MIB),
        (9 * MIB, 3 * MIB),
        (13 * MIB, 4097),
    ] {
        assert!(
            read_file_range(&img, off, len as usize)
                .iter()
                .all(|&x| x == 0),
            "{off}+{len} should be zero on node-b"
        );
    }
    assert!(read_file_range(&img, 4 * MIB, MIB as usize)
        .iter()
        .all(|&x| x == 0x77));
}

/// With resync_checksum, regions marked dirty whose data the peer already holds are not
/// carried again.
#[test]
fn checksum_pass_skips_regions_the_peer_already_has() {
    let mut pair = Pair::with_options(PairOptions {
        extra: "resync_checksum = true".into(),
        ..PairOptions::default()
    });
    pair.start_with_a_primary();
    let uri = pair.uri(A);
    assert_qemu_io_ok(&qemu_io(&pair.env, &uri, &["write -P 0x66 0 16M", "flush"]));
    pair.stop(B);
    pair.wait_disconnected(A);
    // The same bytes again (dirty, but equal on both), and 1 MiB that really changes.
    assert_qemu_io_ok(&qemu_io(
        &pair.env,
        &uri,
        &["write -P 0x66 0 16M", "write -P 0x67 20M 1M", "flush"],
    ));
    let dirty = num(&pair.vol(A, VOLUME), "dirty_bytes");
    assert!(dirty >= 17 * MIB, "{dirty}");
    pair.start(B);
    let a = pair.wait_in_sync(A);
    let b = pair.wait_in_sync(B);
    let sent = num(&a, "resync_bytes_sent");
    let received = num(&b, "resync_bytes_received");
    eprintln!("checksum pass: {dirty} dirty, {sent} sent, {received} received");
    assert!(
        received <= 4 * MIB,
        "the 16 MiB the peer already had should be skipped: node-b received {received}: {b}"
    );
    // Both counters are "image bytes carried by resync": equal blocks are not carried.
    assert!(
        sent <= 4 * MIB,
        "resync_bytes_sent counts blocks the checksum pass skipped: sent {sent}, \
         received {received}, dirty {dirty}: {a}"
    );
    pair.demote(A).ok();
    pair.wait_in_sync(A);
    pair.wait_in_sync(B);
    assert_files_equal(&pair.image(A), &pair.image(B));
}

/// A clean stop of a degraded primary keeps its dirty map (only in-flight state is
/// cleared): after both restart, the changes reach the peer.
#[test]
fn clean_stop_of_a_degraded_primary_keeps_its_dirty_map() {
    let mut pair = Pair::new();
    pair.start_with_a_primary();
    pair.stop(B);
    pair.wait_disconnected(A);
    assert_qemu_io_ok(&qemu_io(&pair.env, &pair.uri(A), &["write -P 0x3a 30M 2M"]));
    pair.stop(A);
    let m = pair.inspect(A);
    assert_eq!(m["flags"]["clean_shutdown"], true, "{m}");
    assert_eq!(m["hot_extent_count"], 0, "{m}");
    assert!(
        m["dirty_bytes"].as_u64().unwrap() >= 2 * MIB,
        "the dirty map survives a clean stop: {m}"
    );
    pair.start(B);
    pair.start(A);
    let a = pair.wait_in_sync(A);
    pair.wait_in_sync(B);
    assert!(num(&a, "resync_bytes_sent") >= 2 * MIB, "{a}");
    assert_files_equal(&pair.image(A), &pair.image(B));
}

/// The VM never stops writing: the resync must still make progress (application I/O has
/// priority, but may not starve the resync forever).
#[test]
fn resync_progresses_under_continuous_application_writes() {
    let mut pair = Pair::with_size("128M");
    pair.start_with_a_primary();
    let uri = pair.uri(A);
    pair.stop(B);
    pair.wait_disconnected(A);
    assert_qemu_io_ok(&qemu_io(&pair.env, &uri, &["write -P 0x4b 0 16M", "flush"]));
    // Continuous writes elsewhere, 25 s.
    let load = fio_args(
        &uri,
        &[
            "--name=steady",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=4",
            "--offset=64m",
            "--size=32m",
            "--time_based=1",
            "--runtime=25",
        ],
    );
    let load: Vec<&str> = load.iter().map(String::as_str).collect();
    let bg = pair.env.spawn(&load);
    std::thread::sleep(Duration::from_secs(1));
    pair.start(B);
    let started = Instant::now();
    let a = pair.wait_for(
        A,
        VOLUME,
        "in-sync while the load runs",
        Duration::from_secs(20),
        |v| v["sync"] == "in-sync" && v["peer"] == "connected",
    );
    eprintln!(
        "in sync {:?} after the peer returned, under load: {a}",
        started.elapsed()
    );
    let out = bg.wait(Duration::from_secs(90));
    assert_fio_ok(&out);
    pair.demote(A).ok();
    pair.wait_in_sync(A);
    pair.wait_in_sync(B);
    assert_files_equal(&pair.image(A), &pair.image(B));
}

/// resync_rate bounds the copy's speed, and status shows bytes left and an ETA meanwhile.
#[test]
fn resync_rate_limits_the_copy_and_status_shows_progress() {
    let mut pair = Pair::with_options(PairOptions {
        extra: "resync_rate = \"8M\"".into(),
        ..PairOptions::default()
    });
    pair.start_with_a_primary();
    pair.stop(B);
    pair.wait_disconnected(A);
    assert_qemu_io_ok(&qemu_io(
        &pair.env,
        &pair.uri(A),
        &["write -P 0x1d 0 32M", "flush"],
    ));
    pair.start(B);
    let started = Instant::now();
    let mid = pair.wait_for(
        A,
        VOLUME,
        "syncing with progress",
        Duration::from_secs(20),
        |v| v["sync"] == "syncing" && num(v, "resync_bytes_sent") > 0,
    );
    let mid_b = pair.vol(B, VOLUME);
    eprintln!("mid-resync: node-a {mid}\nnode-b {mid_b}");
    assert!(num(&mid, "resync_bytes_left") > 0, "{mid}");
    assert!(
        mid["resync_eta_seconds"].is_u64(),
        "an ETA while syncing with progress: {mid}"
    );
    assert_eq!(mid_b["sync"], "syncing", "{mid_b}");
    pair.wait_for(A, VOLUME, "in-sync", Duration::from_secs(60), |v| {
        v["sync"] == "in-sync" && v["peer"] == "connected"
    });
    let took = started.elapsed();
    eprintln!("32 MiB at 8 MiB/s took {took:?}");
    assert!(
        took >= Duration::from_millis(2500),
        "32 MiB at resync_rate 8M took only {took:?}"
    );
    pair.wait_in_sync(B);
    assert_files_equal(&pair.image(A), &pair.image(B));
}

/// Full write load for 10 s with a short peer_timeout: the link must not be declared dead
/// (no false "peer lost", nothing dirty, no resync).
#[test]
fn heavy_load_does_not_trip_the_peer_timeout() {
    let mut pair = Pair::with_options(PairOptions {
        size: "256M".into(),
        extra: "peer_timeout = \"2s\"".into(),
        ..PairOptions::default()
    });
    pair.start_with_a_primary();
    let out = fio(
        &pair.env,
        &pair.uri(A),
        &[
            "--name=heavy",
            "--rw=write",
            "--bs=4m",
            "--iodepth=32",
            "--size=256m",
            "--time_based=1",
            "--runtime=10",
            "--numjobs=2",
            "--name=small",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=64",
            "--size=64m",
        ],
    );
    assert_fio_ok(&out);
    for node in [A, B] {
        let log = pair.log(node);
        assert!(
            !log.contains("peer lost"),
            "{} lost its peer under load:\n{log}",
            node.name()
        );
    }
    let a = pair.vol(A, VOLUME);
    assert_eq!(a["sync"], "in-sync", "{a}");
    assert_eq!(num(&a, "resync_bytes_sent"), 0, "{a}");
}
