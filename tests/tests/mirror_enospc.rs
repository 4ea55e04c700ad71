//! A full filesystem under a sparse image (ENOSPC), on the secondary and on the primary:
//! no acknowledged write is lost, the daemons keep running, the failure is reported, and
//! once there is space again the pair converges to identical images.
//!
//! Each node's data directory can be a tmpfs of its own (mounted by the harness), so the
//! image fills it long before the volume is full.

use std::time::Duration;

use nbdmirror_tests::data::assert_files_equal;
use nbdmirror_tests::pair::{
    missing_acked_blocks, num, read_ack_log, spawn_ack_writer, Pair, A, B, VOLUME,
};
use nbdmirror_tests::{assert_qemu_io_ok, qemu_io};

/// The secondary's filesystem fills up: the primary still acknowledges (it has the data and
/// records what the peer lacks), the secondary reports the error and marks itself
/// inconsistent; with space again and a reconnection, the resync makes both identical.
#[test]
fn secondary_filesystem_full_is_recorded_and_resynced() {
    let mut pair = Pair::new();
    pair.mount_tmpfs(B, "16M");
    pair.start_with_a_primary();
    let uri = pair.uri(A);
    let out = qemu_io(&pair.env, &uri, &["write -P 0x4d 0 32M", "flush"]);
    assert_qemu_io_ok(&out);
    assert_qemu_io_ok(&qemu_io(&pair.env, &uri, &["read -P 0x4d 0 32M"]));
    pair.assert_running(A);
    pair.assert_running(B);

    let a = pair.wait_for(
        A,
        VOLUME,
        "the failed mirrored writes recorded",
        Duration::from_secs(20),
        |v| num(v, "dirty_bytes") > 0,
    );
    assert_ne!(a["sync"], "in-sync", "{a}");
    // node-b lacks acknowledged writes (its filesystem is full): for as long as that lasts
    // it must not call itself consistent or in sync.
    assert_b_never_claims_the_data(&pair, Duration::from_secs(3));
    let log = pair.log(B).to_lowercase();
    assert!(
        log.contains("no space") || log.contains("enospc"),
        "node-b should report the full filesystem"
    );
    // It may not be promoted without --force.
    assert_eq!(pair.promote(B, false).code, Some(1));

    // Space again; node-b restarts (clean stop), the pair resyncs.
    pair.resize_tmpfs(B, "128M");
    pair.restart(B);
    pair.wait_in_sync(A);
    let b = pair.wait_in_sync(B);
    assert_eq!(b["consistent"], true, "{b}");
    pair.demote(A).ok();
    pair.wait_in_sync(A);
    pair.wait_in_sync(B);
    assert_files_equal(&pair.image(A), &pair.image(B));
}

/// Samples node-b's status for `window`: it must never be consistent or in sync while its
/// image lacks the 32 MiB of 0x4d the primary acknowledged.
#[track_caller]
fn assert_b_never_claims_the_data(pair: &Pair, window: Duration) {
    let end = std::time::Instant::now() + window;
    while std::time::Instant::now() < end {
        let b = pair.vol(B, VOLUME);
        let a = pair.vol(A, VOLUME);
        assert!(
            b["consistent"] == false && b["sync"] != "in-sync",
            "node-b lacks acknowledged writes (ENOSPC) but reports itself consistent/in sync: \
             node-b {b}\nnode-a {a}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The same full secondary, then the primary crashes, as early as node-b claims to be
/// consistent (if it ever does while lacking the data): node-b must not be promotable
/// without --force, or if it is, it must hold every acknowledged write.
#[test]
fn secondary_that_missed_writes_is_not_promoted_silently_after_a_primary_crash() {
    let mut pair = Pair::new();
    pair.mount_tmpfs(B, "16M");
    pair.start_with_a_primary();
    let out = qemu_io(&pair.env, &pair.uri(A), &["write -P 0x4d 0 32M", "flush"]);
    assert_qemu_io_ok(&out);
    // Watch node-b for 2 s; crash the primary the moment node-b says it is consistent.
    let end = std::time::Instant::now() + Duration::from_secs(2);
    let mut claimed = None;
    while std::time::Instant::now() < end {
        let b = pair.vol(B, VOLUME);
        if b["consistent"] == true {
            claimed = Some(b);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    pair.kill9(A);
    eprintln!("node-b before the crash of node-a: {claimed:?}");
    pair.resize_tmpfs(B, "128M");
    pair.wait_disconnected(B);
    let promoted = pair.promote(B, false);
    eprintln!("promote node-b without --force: {promoted}");
    if promoted.success() {
        pair.wait_export(B);
        let check = qemu_io(&pair.env, &pair.uri(B), &["read -P 0x4d 0 32M"]);
        assert!(
            check.success() && !check.all().contains("Pattern verification failed"),
            "node-b was promoted without --force but lacks acknowledged writes \
             (it reported {claimed:?} while its filesystem was full): {check}"
        );
    } else {
        assert_eq!(promoted.code, Some(1), "{promoted}");
        let b = pair.vol(B, VOLUME);
        assert_eq!(b["consistent"], false, "{b}");
    }
}

/// The primary's filesystem fills up: writes fail with ENOSPC (never acknowledged), every
/// acknowledged write is on both nodes, the primary keeps serving, and with space again
/// writes succeed and the pair converges.
#[test]
fn primary_filesystem_full_fails_writes_but_loses_no_acknowledged_one() {
    let mut pair = Pair::new();
    pair.mount_tmpfs(A, "16M");
    pair.start_with_a_primary();
    let uri = pair.uri(A);
    let log = pair.env.path("acked.log");
    // 32 MiB of 4 KiB blocks into 16 MiB of space.
    let writer = spawn_ack_writer(&pair.env, &uri, &log, 8192);
    let out = writer.wait(Duration::from_secs(120));
    let acked = read_ack_log(&log);
    eprintln!("{} writes acknowledged; writer: {out}", acked.len());
    assert_eq!(out.code, Some(3), "a write should have failed: {out}");
    assert!(
        out.stderr.contains("ENOSPC") || out.stderr.to_lowercase().contains("no space"),
        "the failed write should report ENOSPC: {out}"
    );
    assert!(acked.len() > 1000, "{} acked", acked.len());
    pair.assert_running(A);
    pair.assert_running(B);
    for (node, what) in [(A, "node-a's image"), (B, "node-b's image")] {
        let missing = missing_acked_blocks(&pair.image(node), &acked);
        assert!(
            missing.is_empty(),
            "{} of {} acknowledged writes missing on {what}: first {:?}",
            missing.len(),
            acked.len(),
            &missing[..missing.len().min(20)]
        );
    }
    // Still serving reads.
    assert_qemu_io_ok(&qemu_io(&pair.env, &uri, &["read 0 1M"]));

    // Space again: writes succeed; after a reconnection the pair is identical.
    pair.resize_tmpfs(A, "128M");
    assert_qemu_io_ok(&qemu_io(
        &pair.env,
        &uri,
        &["write -P 0x2f 40M 1M", "flush"],
    ));
    pair.restart(B);
    pair.wait_in_sync(A);
    pair.wait_in_sync(B);
    pair.demote(A).ok();
    pair.wait_in_sync(A);
    pair.wait_in_sync(B);
    assert_files_equal(&pair.image(A), &pair.image(B));
}
