//! Role changes with data in flight: demoting a primary under load keeps every
//! acknowledged write on both nodes; clean swaps back and forth copy nothing.

use std::time::Duration;

use nbdmirror_tests::data::{assert_files_equal, read_file_range};
use nbdmirror_tests::pair::{
    missing_acked_blocks, num, read_ack_log, spawn_ack_writer, Pair, PairOptions, A, B, MIB,
    STATE_TIMEOUT, VOLUME, VOLUME2,
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

/// Two volumes, primary on different nodes (node-a for disk0, node-b for disk1): each is
/// mirrored its own way; when node-b dies, node-a keeps disk0 and takes over disk1.
#[test]
fn two_volumes_primary_on_different_nodes() {
    let mut pair = Pair::with_options(PairOptions {
        second_volume: true,
        ..PairOptions::default()
    });
    pair.start_with_a_primary();
    pair.wait_for(B, VOLUME2, "peer connected", STATE_TIMEOUT, |v| {
        v["peer"] == "connected"
    });
    pair.promote_volume(B, VOLUME2, false).ok();
    pair.wait_for(B, VOLUME2, "primary in sync", STATE_TIMEOUT, |v| {
        v["role"] == "primary" && v["sync"] == "in-sync"
    });
    let v2_b = pair.uri_of(B, VOLUME2);
    wait_accepting(&pair, "127.0.0.1:10820");
    assert!(
        pair.env.ns.connect_tcp("127.0.0.1:10819").is_err(),
        "node-a is secondary for disk1: no export"
    );
    assert_qemu_io_ok(&qemu_io(&pair.env, &pair.uri(A), &["write -P 0xd0 0 2M"]));
    assert_qemu_io_ok(&qemu_io(&pair.env, &v2_b, &["write -P 0xd1 0 2M"]));
    let a_st = pair.status(A);
    assert_eq!(a_st["volumes"].as_array().unwrap().len(), 2, "{a_st}");

    pair.kill9(B);
    pair.wait_for(A, VOLUME2, "peer gone", STATE_TIMEOUT, |v| {
        v["peer"] == "disconnected"
    });
    pair.promote_volume(A, VOLUME2, false).ok();
    wait_accepting(&pair, "127.0.0.1:10819");
    assert_qemu_io_ok(&qemu_io(
        &pair.env,
        &pair.uri_of(A, VOLUME2),
        &["read -P 0xd1 0 2M", "write -P 0xd2 4M 1M"],
    ));
    assert_qemu_io_ok(&qemu_io(&pair.env, &pair.uri(A), &["write -P 0xd3 4M 1M"]));
    pair.start(B);
    for vol in [VOLUME, VOLUME2] {
        for node in [A, B] {
            pair.wait_for(node, vol, "in-sync", STATE_TIMEOUT, |v| {
                v["sync"] == "in-sync" && v["peer"] == "connected"
            });
        }
        pair.demote_volume(A, vol).ok();
    }
    for vol in [VOLUME, VOLUME2] {
        for node in [A, B] {
            pair.wait_for(node, vol, "in-sync", STATE_TIMEOUT, |v| {
                v["sync"] == "in-sync" && v["peer"] == "connected"
            });
        }
        assert_files_equal(&pair.image_of(A, vol), &pair.image_of(B, vol));
    }
    assert!(
        read_file_range(&pair.image_of(B, VOLUME2), 4 * MIB, MIB as usize)
            .iter()
            .all(|&x| x == 0xd2)
    );
}

fn wait_accepting(pair: &Pair, addr: &'static str) {
    poll(
        &format!("{addr} to accept"),
        Duration::from_secs(20),
        || pair.env.ns.connect_tcp(addr).ok().map(|_| ()),
    );
}

/// Nodes that listen on all interfaces (`replication_listen = "0.0.0.0:PORT"`, the usual
/// set-up) must still build one stable link: exactly one side dials.
#[test]
fn replication_listen_on_all_interfaces_gives_one_stable_link() {
    let mut pair = Pair::with_options(PairOptions {
        listen_any: true,
        ..PairOptions::default()
    });
    pair.start_with_a_primary();
    let before = [A, B].map(|n| pair.log(n).matches("peer connected").count());
    let out = nbdmirror_tests::pair::fio(
        &pair.env,
        &pair.uri(A),
        &[
            "--name=steady",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            "--size=16m",
            "--time_based=1",
            "--runtime=5",
        ],
    );
    nbdmirror_tests::pair::assert_fio_ok(&out);
    let after = [A, B].map(|n| pair.log(n).matches("peer connected").count());
    for (i, node) in [A, B].into_iter().enumerate() {
        assert_eq!(
            after[i],
            before[i],
            "{}: the link was rebuilt {} times in 5 s (both nodes dial when they listen on \
             0.0.0.0); log:\n{}",
            node.name(),
            after[i] - before[i],
            pair.log(node)
        );
    }
    let a = pair.vol(A, VOLUME);
    assert_eq!(num(&a, "resync_bytes_sent"), 0, "{a}");
    pair.demote(A).ok();
    pair.wait_in_sync(A);
    pair.wait_in_sync(B);
    assert_files_equal(&pair.image(A), &pair.image(B));
}
