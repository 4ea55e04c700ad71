//! Role changes with data in flight: demoting a primary under load keeps every
//! acknowledged write on both nodes; clean swaps back and forth copy nothing.

use std::time::Duration;

use nbdmirror_tests::data::{assert_files_equal, read_file_range};
use nbdmirror_tests::pair::{
    missing_acked_blocks, num, read_ack_log, spawn_ack_writer, Pair, A, B, MIB, STATE_TIMEOUT,
    VOLUME,
};
use nbdmirror_tests::{assert_qemu_io_ok, poll, qemu_io};

#[test]
fn demote_under_load_keeps_every_acknowledged_write() {
    let mut pair = Pair::with_size("128M");
    pair.start_with_a_primary();
    let log = pair.env.path("acked.log");
    let writer = spawn_ack_writer(&pair.env, &pair.uri(A), &log, 30000);
    poll("300 acknowledged writes", Duration::from_secs(60), || {
        (read_ack_log(&log).len() >= 300).then_some(())
    });
    let out = pair.demote(A);
    let (w, _) = writer.wait_or_kill(Duration::from_secs(30));
    out.ok();
    let acked = read_ack_log(&log);
    eprintln!(
        "{} acknowledged before the demote; writer: {w}",
        acked.len()
    );
    assert!(!pair.export_answers(A), "a secondary does not export");
    pair.wait_in_sync(A);
    pair.wait_in_sync(B);
    for node in [A, B] {
        let missing = missing_acked_blocks(&pair.image(node), &acked);
        assert!(
            missing.is_empty(),
            "{} acknowledged writes missing on {}: {:?}",
            missing.len(),
            node.name(),
            &missing[..missing.len().min(20)]
        );
    }
    assert_files_equal(&pair.image(A), &pair.image(B));
    pair.promote(B, false).ok();
    pair.wait_export(B);
    let copy = pair.env.path("b.img");
    pair.env
        .run(&["nbdcopy", &pair.uri(B), copy.to_str().unwrap()])
        .ok();
    assert!(missing_acked_blocks(&copy, &acked).is_empty());
}

#[test]
fn clean_role_swaps_copy_nothing_and_keep_images_identical() {
    let mut pair = Pair::new();
    pair.start_with_a_primary();
    let mut node = A;
    for round in 0..6u64 {
        if round > 0 {
            pair.promote(node, false).ok();
            pair.wait_for(node, VOLUME, "primary in sync", STATE_TIMEOUT, |v| {
                v["role"] == "primary" && v["sync"] == "in-sync"
            });
            pair.wait_export(node);
        }
        let cmd = format!("write -P {} {}M 1M", 0x20 + round, round * 2);
        assert_qemu_io_ok(&qemu_io(&pair.env, &pair.uri(node), &[&cmd]));
        pair.demote(node).ok();
        pair.wait_export_closed(node);
        pair.wait_in_sync(A);
        pair.wait_in_sync(B);
        node = node.other();
    }
    for n in [A, B] {
        let v = pair.vol(n, VOLUME);
        assert_eq!(
            num(&v, "resync_bytes_sent"),
            0,
            "clean swaps need no resync: {v}"
        );
        assert_eq!(num(&v, "resync_bytes_received"), 0, "{v}");
    }
    assert_files_equal(&pair.image(A), &pair.image(B));
    for round in 0..6u64 {
        let got = read_file_range(&pair.image(B), round * 2 * MIB, MIB as usize);
        assert!(
            got.iter().all(|&x| x == (0x20 + round) as u8),
            "round {round}"
        );
    }
    // Both nodes restart cleanly; they come back secondary and in sync, no copy.
    pair.restart(A);
    pair.restart(B);
    for n in [A, B] {
        let v = pair.wait_in_sync(n);
        assert_eq!(v["role"], "secondary", "{v}");
        assert_eq!(num(&v, "resync_bytes_sent"), 0, "{v}");
    }
    assert_files_equal(&pair.image(A), &pair.image(B));
}
