//! The primary crashes (`kill -9`) under load.
//! (a) No acknowledged write is lost: a writer logs every acknowledged block, node-b is
//!     promoted by hand, and every logged block is on its export.
//! (b) The crashed primary restarts while its peer stays secondary: it comes back
//!     secondary, is promoted again, and the resync covers only its hot extents.
//! (c) After a power loss (its unflushed writes gone) it is resynced from its peer instead.

use std::fs;
use std::time::Duration;

use nbdmirror_tests::data::{assert_files_equal, read_file_range, write_file_range};
use nbdmirror_tests::pair::{
    ack_block, fio_args, missing_acked_blocks, num, read_ack_log, spawn_ack_writer, Pair, A, B,
    MIB, STATE_TIMEOUT, VOLUME,
};
use nbdmirror_tests::{assert_qemu_io_ok, poll, qemu_io};

#[test]
fn primary_killed_under_load_loses_no_acknowledged_write() {
    let mut pair = Pair::with_size("256M");
    pair.start_with_a_primary();
    let log = pair.env.path("acked.log");
    // The logged writer covers 0..128M; fio keeps many other requests in flight on
    // 160M..224M, so the crash hits a busy primary.
    let max_blocks = 128 * MIB / 4096;
    let load = fio_args(
        &pair.uri(A),
        &[
            "--name=busy",
            "--rw=randwrite",
            "--bsrange=4k-256k",
            "--iodepth=32",
            "--offset=160m",
            "--size=64m",
            "--time_based=1",
            "--runtime=60",
        ],
    );
    let load: Vec<&str> = load.iter().map(String::as_str).collect();
    let busy = pair.env.spawn(&load);
    let writer = spawn_ack_writer(&pair.env, &pair.uri(A), &log, max_blocks);
    // Let it acknowledge a few hundred writes, then crash the primary.
    poll(
        "the writer to log 300 acknowledged writes",
        Duration::from_secs(60),
        || {
            let n = fs::read_to_string(&log).unwrap_or_default().lines().count();
            (n >= 300).then_some(())
        },
    );
    pair.kill9(A);
    let (out, _) = writer.wait_or_kill(Duration::from_secs(30));
    let _ = busy.wait_or_kill(Duration::from_secs(30));
    eprintln!("writer: {out}");
    let acked = read_ack_log(&log);
    assert!(acked.len() >= 300, "{} acked", acked.len());
    assert!(
        (acked.len() as u64) < max_blocks,
        "the writer finished before the crash; nothing was in flight"
    );

    // Manual failover: node-b was in sync when it lost its peer, so no --force.
    let b = pair.wait_disconnected(B);
    assert_eq!(b["role"], "secondary", "{b}");
    pair.promote(B, false).ok();
    pair.wait_for(B, VOLUME, "primary", STATE_TIMEOUT, |v| {
        v["role"] == "primary"
    });
    pair.wait_export(B);

    // Read the whole export of node-b, then check every acknowledged block.
    let copy = pair.env.path("b-export.img");
    pair.env
        .run(&["nbdcopy", &pair.uri(B), copy.to_str().unwrap()])
        .ok();
    let check = |path: &std::path::Path, what: &str| {
        let data = fs::read(path).unwrap();
        let missing: Vec<u64> = acked
            .iter()
            .copied()
            .filter(|&i| {
                let off = (i * 4096) as usize;
                data[off..off + 4096] != ack_block(i)[..]
            })
            .collect();
        assert!(
            missing.is_empty(),
            "{} of {} acknowledged writes are missing on {what}, first ones: {:?}",
            missing.len(),
            acked.len(),
            &missing[..missing.len().min(20)]
        );
    };
    check(&copy, "node-b's export");
    check(&pair.image(B), "node-b's image file");

    // node-b keeps serving writes alone.
    let last = *acked.last().unwrap();
    let w = pair.env.run(&[
        "qemu-io",
        "-f",
        "raw",
        "-c",
        "write -P 0x7e 200M 1M",
        &pair.uri(B),
    ]);
    nbdmirror_tests::assert_qemu_io_ok(&w);

    // The old primary returns secondary and is resynced from node-b.
    pair.start(A);
    let a = pair.vol(A, VOLUME);
    assert_eq!(
        a["role"], "secondary",
        "a restarted node comes back secondary: {a}"
    );
    assert!(!pair.export_answers(A));
    pair.wait_in_sync(A);
    pair.wait_in_sync(B);
    pair.demote(B).ok();
    pair.wait_in_sync(A);
    pair.wait_in_sync(B);
    assert_files_equal(&pair.image(A), &pair.image(B));
    assert_eq!(
        read_file_range(&pair.image(A), last * 4096, 4096),
        ack_block(last)
    );
}

#[test]
fn primary_killed_and_restarted_resyncs_only_hot_extents() {
    let mut pair = Pair::with_size("256M");
    pair.start_with_a_primary();
    let uri = pair.uri(A);
    let load = fio_args(
        &uri,
        &[
            "--name=hot",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            "--offset=128m",
            "--size=8m",
            "--time_based=1",
            "--runtime=20",
        ],
    );
    let load: Vec<&str> = load.iter().map(String::as_str).collect();
    let bg = pair.env.spawn(&load);
    std::thread::sleep(Duration::from_secs(2));
    pair.kill9(A);
    let _ = bg.wait_or_kill(Duration::from_secs(30));

    // The peer stays secondary.
    let b = pair.wait_disconnected(B);
    assert_eq!(b["role"], "secondary", "{b}");

    // What the crashed primary's metadata says may differ: its hot extents (and dirty map).
    let m = pair.inspect(A);
    eprintln!("metadata of the crashed primary: {m}");
    let extent = m["activity_extent_size"].as_u64().unwrap();
    let hot = m["hot_extent_count"].as_u64().unwrap();
    let dirty = m["dirty_bytes"].as_u64().unwrap();
    assert!(hot >= 1, "writes were in flight: some extent is hot: {m}");
    assert_eq!(m["flags"]["clean_shutdown"], false, "{m}");
    let bound = hot * extent + dirty;
    assert!(
        bound <= 16 * MIB,
        "the load touched 8 MiB (2-3 extents) only: {bound} bytes hot or dirty"
    );

    // It comes back secondary, with no export.
    pair.start(A);
    let a = pair.vol(A, VOLUME);
    assert_eq!(
        a["role"], "secondary",
        "a restarted node comes back secondary: {a}"
    );
    assert!(!pair.export_answers(A));
    pair.wait_connected(A);
    assert!(!pair.export_answers(A));

    // Promoted again (it is not stale: no --force), the resync covers only hot extents.
    pair.promote(A, false).ok();
    let a = pair.wait_for(
        A,
        VOLUME,
        "primary, in-sync",
        Duration::from_secs(60),
        |v| v["role"] == "primary" && v["sync"] == "in-sync" && v["peer"] == "connected",
    );
    let b = pair.wait_in_sync(B);
    let total = num(&a, "resync_bytes_sent") + num(&b, "resync_bytes_sent");
    eprintln!("hot-extent bound {bound}, resync bytes sent (both sides) {total}");
    assert!(
        total <= bound + MIB,
        "resync copied {total} bytes, more than the {bound} bytes of hot extents: a={a} b={b}"
    );
    assert!(
        total > 0,
        "the hot extents must be resynchronised: a={a} b={b}"
    );
    assert!(total < pair.size / 8, "not a full resync: {total}");

    pair.demote(A).ok();
    pair.wait_in_sync(A);
    pair.wait_in_sync(B);
    assert_files_equal(&pair.image(A), &pair.image(B));
}

/// Both daemons killed at once under load: both come back secondary (nobody takes the
/// primary role by itself), the operator promotes node-a, the hot extents are resynced,
/// and every acknowledged write is on both.
#[test]
fn both_nodes_killed_under_load_come_back_secondary() {
    let mut pair = Pair::with_size("128M");
    pair.start_with_a_primary();
    let log = pair.env.path("acked.log");
    let writer = spawn_ack_writer(&pair.env, &pair.uri(A), &log, 16384);
    poll("300 acknowledged writes", Duration::from_secs(60), || {
        (read_ack_log(&log).len() >= 300).then_some(())
    });
    pair.kill9(B);
    pair.kill9(A);
    let _ = writer.wait_or_kill(Duration::from_secs(30));
    let acked = read_ack_log(&log);
    pair.start(A);
    pair.start(B);
    pair.wait_connected(A);
    pair.wait_connected(B);
    std::thread::sleep(Duration::from_secs(1));
    for node in [A, B] {
        let v = pair.vol(node, VOLUME);
        assert_eq!(v["role"], "secondary", "{}: {v}", node.name());
        assert!(!pair.export_answers(node));
    }
    pair.promote(A, false).ok();
    pair.wait_for(
        A,
        VOLUME,
        "primary, in-sync",
        Duration::from_secs(60),
        |v| v["role"] == "primary" && v["sync"] == "in-sync",
    );
    let b = pair.wait_in_sync(B);
    assert!(
        num(&b, "resync_bytes_received") < pair.size / 4,
        "only hot extents are resynced: {b}"
    );
    pair.demote(A).ok();
    pair.wait_in_sync(A);
    pair.wait_in_sync(B);
    assert_files_equal(&pair.image(A), &pair.image(B));
    let missing = missing_acked_blocks(&pair.image(B), &acked);
    assert!(
        missing.is_empty(),
        "{} acknowledged writes missing",
        missing.len()
    );
}

/// The primary loses power (simulated: `kill -9`, the data it had written but not flushed
/// taken out of its image, as the page cache would be, and another boot id at its restart).
/// Its peer holds those acknowledged writes. Back, at the generation they share, the crashed
/// node is resynced from its peer by itself: it used to wait for an operator (or the group)
/// to pick a source, and picking it copied its stale hot extents over the peer's good ones.
#[test]
fn a_primary_back_from_a_power_loss_is_resynced_from_its_peer() {
    let mut pair = Pair::with_size("32M");
    pair.start_with_a_primary();
    assert_qemu_io_ok(&qemu_io(&pair.env, &pair.uri(A), &["write -P 0x5a 8M 1M"]));
    pair.kill9(A);
    pair.wait_disconnected(B);
    write_file_range(&pair.image(A), 8 * MIB, &vec![0u8; MIB as usize]);

    pair.start_with_env(A, &[("NBDMIRROR_BOOT_ID", "after the power came back")]);
    pair.wait_ready(A);
    assert!(
        pair.log(A).contains("power loss"),
        "node-a should say it lost its unflushed writes:\n{}",
        pair.log(A)
    );
    let a = pair.wait_in_sync(A);
    assert_eq!(a["role"], "secondary", "{a}");
    pair.wait_in_sync(B);
    for node in [A, B] {
        assert!(
            read_file_range(&pair.image(node), 8 * MIB, MIB as usize)
                .iter()
                .all(|&x| x == 0x5a),
            "the acknowledged write is missing on {}",
            node.name()
        );
    }
    assert_files_equal(&pair.image(A), &pair.image(B));
    let promoted = pair.promote(A, false);
    assert_eq!(promoted.code, Some(0), "{promoted}");
}
