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
    let b = pair.vol(B, VOLUME);
    assert_eq!(b["consistent"], false, "node-b lacks writes: {b}");
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
