//! Both nodes promoted alone and written: on reconnection both report split brain, no byte
//! is copied either way, and `resolve --discard-on node-b` then resyncs node-a -> node-b.

use std::time::Duration;

use nbdmirror_tests::data::{assert_files_equal, read_file_range};
use nbdmirror_tests::pair::{
    file_digest, num, Pair, PairOptions, A, B, MIB, STATE_TIMEOUT, VOLUME,
};
use nbdmirror_tests::{assert_qemu_io_ok, qemu_io};

#[test]
fn both_primary_alone_is_split_brain_until_resolved() {
    let mut pair = Pair::new();
    pair.start_with_a_primary();
    assert_qemu_io_ok(&qemu_io(&pair.env, &pair.uri(A), &["write -P 0x11 0 8M"]));

    // node-b goes away; node-a writes alone; node-a goes away.
    pair.stop(B);
    pair.wait_disconnected(A);
    assert_qemu_io_ok(&qemu_io(
        &pair.env,
        &pair.uri(A),
        &["write -P 0xaa 8M 4M", "flush"],
    ));
    pair.stop(A);

    // node-b comes back alone, is promoted and writes alone.
    pair.start(B);
    let b = pair.vol(B, VOLUME);
    assert_eq!(b["role"], "secondary", "{b}");
    let promoted = pair.promote(B, false);
    if !promoted.success() {
        // Allowed by the contract only if node-b considers itself stale; note it.
        eprintln!("promote without --force was refused on node-b alone: {promoted}");
        pair.promote(B, true).ok();
    }
    pair.wait_export(B);
    assert_qemu_io_ok(&qemu_io(
        &pair.env,
        &pair.uri(B),
        &["write -P 0xbb 20M 2M", "write -P 0xcc 8M 1M", "flush"],
    ));
    let digest_a = file_digest(&pair.image(A));
    let digest_b = file_digest(&pair.image(B));

    // node-a returns: both must see the split brain, and nothing is copied.
    pair.start(A);
    let a = pair.wait_for(A, VOLUME, "split-brain", STATE_TIMEOUT, |v| {
        v["sync"] == "split-brain"
    });
    let b = pair.wait_for(B, VOLUME, "split-brain", STATE_TIMEOUT, |v| {
        v["sync"] == "split-brain"
    });
    assert_eq!(a["role"], "secondary", "{a}");
    assert_eq!(b["role"], "primary", "{b}");
    // Give a wrong resync time to happen, then check that none did.
    std::thread::sleep(Duration::from_secs(3));
    for node in [A, B] {
        let v = pair.vol(node, VOLUME);
        assert_eq!(v["sync"], "split-brain", "{}: {v}", node.name());
        assert_eq!(num(&v, "resync_bytes_sent"), 0, "{}: {v}", node.name());
        assert_eq!(num(&v, "resync_bytes_received"), 0, "{}: {v}", node.name());
    }
    assert_images_unchanged(&pair, &digest_a, &digest_b);
    // verify does not count (or promise to repair) what the split brain keeps apart.
    let v = pair.verify(A);
    assert_eq!(v.code, Some(2), "{v}");
    assert!(v.all().contains("split brain"), "{v}");
    for node in [A, B] {
        assert!(
            pair.log(node).to_lowercase().contains("split"),
            "{} should log the split brain",
            node.name()
        );
    }

    // Promoting node-a now (it would be a second primary) is refused.
    let second = pair.promote(A, false);
    assert_eq!(second.code, Some(1), "{second}");

    // Resolve: node-b gives up its writes. It must be secondary first.
    let refused = pair.resolve(A, B, false);
    assert_eq!(
        refused.code,
        Some(1),
        "resolve while node-b is primary must be refused: {refused}"
    );
    pair.demote(B).ok();
    pair.wait_for(B, VOLUME, "secondary", STATE_TIMEOUT, |v| {
        v["role"] == "secondary"
    });
    pair.wait_export_closed(B);

    let dry = pair.cli(
        A,
        &["resolve", VOLUME, "--discard-on", "node-b", "--dry-run"],
    );
    dry.ok();
    assert!(
        dry.stdout.chars().any(|c| c.is_ascii_digit()),
        "the dry run prints the bytes that would be discarded: {dry}"
    );
    let dry_json = pair.cli(
        A,
        &[
            "resolve",
            VOLUME,
            "--discard-on",
            "node-b",
            "--dry-run",
            "--json",
        ],
    );
    dry_json.ok();
    let parsed: serde_json::Value = serde_json::from_str(&dry_json.stdout)
        .unwrap_or_else(|e| panic!("resolve --dry-run --json is not JSON ({e}): {dry_json}"));
    eprintln!("resolve --dry-run --json: {parsed}");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        pair.vol(A, VOLUME)["sync"],
        "split-brain",
        "a dry run changes nothing"
    );
    assert_eq!(file_digest(&pair.image(A)), digest_a);
    assert_eq!(file_digest(&pair.image(B)), digest_b);

    let res = pair.resolve(A, B, false);
    res.ok();
    assert!(
        res.stdout.chars().any(|c| c.is_ascii_digit()),
        "resolve prints the bytes discarded: {res}"
    );
    let a = pair.wait_in_sync(A);
    let b = pair.wait_in_sync(B);
    let sent = num(&a, "resync_bytes_sent");
    assert!(sent > 0, "node-a -> node-b resync: {a}");
    assert!(
        sent <= 16 * MIB,
        "only both sides' changed regions (7 MiB) are copied, not {sent}: {a}"
    );
    assert!(num(&b, "resync_bytes_received") > 0, "{b}");
    assert_eq!(
        num(&b, "resync_bytes_sent"),
        0,
        "nothing goes node-b -> node-a: {b}"
    );
    assert_eq!(
        file_digest(&pair.image(A)),
        digest_a,
        "node-a's data is kept"
    );
    assert_files_equal(&pair.image(A), &pair.image(B));
    let img = pair.image(B);
    assert!(read_file_range(&img, 0, 8 * MIB as usize)
        .iter()
        .all(|&x| x == 0x11));
    assert!(read_file_range(&img, 8 * MIB, 4 * MIB as usize)
        .iter()
        .all(|&x| x == 0xaa));
    assert!(read_file_range(&img, 20 * MIB, 2 * MIB as usize)
        .iter()
        .all(|&x| x == 0));

    // And the pair works again: node-a primary, writes mirrored.
    pair.promote(A, false).ok();
    pair.wait_export(A);
    assert_qemu_io_ok(&qemu_io(&pair.env, &pair.uri(A), &["write -P 0x5d 30M 1M"]));
    pair.demote(A).ok();
    pair.wait_in_sync(A);
    pair.wait_in_sync(B);
    assert_files_equal(&pair.image(A), &pair.image(B));
}

/// The link is cut while both daemons run; node-b is promoted (the operator believes node-a
/// is down, but it is not) and both write. When the link returns, both report split brain,
/// neither copy is touched, and the resolution keeps node-a's data.
#[test]
fn link_cut_with_both_running_then_both_primary_is_split_brain() {
    let mut pair = Pair::with_options(PairOptions {
        proxy: true,
        extra: "peer_timeout = \"2s\"".into(),
        ..PairOptions::default()
    });
    pair.start_with_a_primary();
    assert_qemu_io_ok(&qemu_io(&pair.env, &pair.uri(A), &["write -P 0x11 0 4M"]));
    pair.proxy.as_ref().unwrap().cut();
    pair.wait_disconnected(A);
    pair.wait_disconnected(B);
    // node-a goes on alone.
    assert_qemu_io_ok(&qemu_io(
        &pair.env,
        &pair.uri(A),
        &["write -P 0xaa 4M 2M", "flush"],
    ));
    // node-b was in sync when it lost its peer: promotion is allowed, with a warning.
    let out = pair.promote(B, false);
    out.ok();
    assert!(
        !out.stderr.trim().is_empty(),
        "promoting alone should warn that the old primary must be down: {out}"
    );
    pair.wait_export(B);
    assert_qemu_io_ok(&qemu_io(
        &pair.env,
        &pair.uri(B),
        &["write -P 0xbb 10M 1M", "write -P 0xcc 4M 64k", "flush"],
    ));
    let digest_a = file_digest(&pair.image(A));
    let digest_b = file_digest(&pair.image(B));

    pair.proxy.as_ref().unwrap().restore();
    for node in [A, B] {
        let v = pair.wait_for(node, VOLUME, "split-brain", STATE_TIMEOUT, |v| {
            v["sync"] == "split-brain"
        });
        assert_eq!(v["role"], "primary", "{}: {v}", node.name());
    }
    std::thread::sleep(Duration::from_secs(3));
    for node in [A, B] {
        let v = pair.vol(node, VOLUME);
        assert_eq!(v["sync"], "split-brain", "{}: {v}", node.name());
        assert_eq!(num(&v, "resync_bytes_sent"), 0, "{}: {v}", node.name());
        assert_eq!(num(&v, "resync_bytes_received"), 0, "{}: {v}", node.name());
    }
    assert_images_unchanged(&pair, &digest_a, &digest_b);
    // Writes on either primary during the split brain must not reach the other.
    assert_qemu_io_ok(&qemu_io(
        &pair.env,
        &pair.uri(A),
        &["write -P 0xa1 20M 64k"],
    ));
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        read_file_range(&pair.image(B), 20 * MIB, 65536)
            .iter()
            .all(|&x| x == 0),
        "a write on node-a reached node-b during the split brain"
    );

    pair.demote(B).ok();
    pair.wait_export_closed(B);
    pair.resolve(B, B, false).ok();
    pair.wait_in_sync(A);
    pair.wait_in_sync(B);
    pair.demote(A).ok();
    pair.wait_in_sync(A);
    pair.wait_in_sync(B);
    assert_files_equal(&pair.image(A), &pair.image(B));
    let img = pair.image(B);
    assert!(read_file_range(&img, 4 * MIB, 2 * MIB as usize)
        .iter()
        .all(|&x| x == 0xaa));
    assert!(read_file_range(&img, 10 * MIB, MIB as usize)
        .iter()
        .all(|&x| x == 0));
    assert!(read_file_range(&img, 20 * MIB, 65536)
        .iter()
        .all(|&x| x == 0xa1));
}

/// Two primaries with the link up (node-b promoted while the link was cut, then the link
/// returns): split brain at once; writes on either primary never reach the other's image.
/// A second primary cannot be made while connected: `--force` does not override a
/// connected primary peer.
#[test]
fn two_connected_primaries_overwrite_nothing() {
    let mut pair = Pair::with_options(PairOptions {
        proxy: true,
        extra: "peer_timeout = \"2s\"".into(),
        ..PairOptions::default()
    });
    pair.start_with_a_primary();
    assert_qemu_io_ok(&qemu_io(&pair.env, &pair.uri(A), &["write -P 0x11 0 1M"]));
    for force in [false, true] {
        let refused = pair.promote(B, force);
        assert_eq!(refused.code, Some(1), "the peer is primary: {refused}");
        assert!(refused.all().contains("demote it first"), "{refused}");
    }
    two_primaries(&mut pair);
    for node in [A, B] {
        pair.wait_for(node, VOLUME, "split-brain", STATE_TIMEOUT, |v| {
            v["sync"] == "split-brain"
        });
    }
    pair.wait_export(B);
    assert_qemu_io_ok(&qemu_io(
        &pair.env,
        &pair.uri(A),
        &["write -P 0xa2 8M 1M", "flush"],
    ));
    assert_qemu_io_ok(&qemu_io(
        &pair.env,
        &pair.uri(B),
        &["write -P 0xb2 16M 1M", "flush"],
    ));
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        read_file_range(&pair.image(B), 8 * MIB, MIB as usize)
            .iter()
            .all(|&x| x == 0),
        "node-a's write reached node-b's image during the split brain"
    );
    assert!(
        read_file_range(&pair.image(A), 16 * MIB, MIB as usize)
            .iter()
            .all(|&x| x == 0),
        "node-b's write reached node-a's image during the split brain"
    );
    pair.demote(B).ok();
    pair.resolve(A, B, false).ok();
    pair.wait_in_sync(A);
    pair.wait_in_sync(B);
    pair.demote(A).ok();
    pair.wait_in_sync(A);
    pair.wait_in_sync(B);
    assert_files_equal(&pair.image(A), &pair.image(B));
    assert!(read_file_range(&pair.image(B), 8 * MIB, MIB as usize)
        .iter()
        .all(|&x| x == 0xa2));
}

/// Demoting one of two primaries does not end their split brain: what each wrote while the
/// other was primary too stays on its side until an operator resolves, rather than being
/// resynced over by the primary that remains.
#[test]
fn demoting_one_of_two_primaries_keeps_its_writes() {
    let mut pair = Pair::with_options(PairOptions {
        proxy: true,
        extra: "peer_timeout = \"2s\"".into(),
        ..PairOptions::default()
    });
    pair.start_with_a_primary();
    two_primaries(&mut pair);
    assert_qemu_io_ok(&qemu_io(
        &pair.env,
        &pair.uri(A),
        &["write -P 0xa3 8M 1M", "flush"],
    ));
    let demoted = pair.demote(A);
    assert_eq!(demoted.code, Some(0), "{demoted}");
    assert_eq!(pair.vol(A, VOLUME)["role"], "secondary");
    // Long enough for a resync of 1 MiB to have run, had one started.
    std::thread::sleep(Duration::from_secs(3));
    let a = pair.vol(A, VOLUME);
    assert_eq!(a["sync"], "split-brain", "{a}");
    assert!(
        read_file_range(&pair.image(A), 8 * MIB, MIB as usize)
            .iter()
            .all(|&x| x == 0xa3),
        "node-a's acknowledged write was overwritten without a resolve"
    );
}

/// The primary's metadata file is lost (deleted by mistake, a bad restore) after it wrote
/// alone: its image holds the only copy of those acknowledged writes. On restart the pair
/// overwrites neither image (it used to resync the stale peer's copy over it); the operator
/// keeps that copy with one `resolve`, run on its node, and the peer receives all of it.
#[test]
fn a_copy_whose_metadata_was_lost_is_not_overwritten() {
    let mut pair = Pair::with_size("32M");
    pair.start_with_a_primary();
    assert_qemu_io_ok(&qemu_io(&pair.env, &pair.uri(A), &["write -P 0x11 0 4M"]));
    pair.wait_in_sync(A);
    pair.stop(B);
    pair.wait_disconnected(A);
    assert_qemu_io_ok(&qemu_io(
        &pair.env,
        &pair.uri(A),
        &["write -P 0x5a 8M 4M", "flush"],
    ));
    pair.stop(A);
    std::fs::remove_file(pair.metadata(A)).expect("remove node-a's metadata");
    let digest_a = file_digest(&pair.image(A));
    let digest_b = file_digest(&pair.image(B));

    pair.start(A);
    pair.start(B);
    for node in [A, B] {
        let v = pair.wait_for(node, VOLUME, "split-brain", STATE_TIMEOUT, |v| {
            v["sync"] == "split-brain"
        });
        assert_eq!(v["role"], "secondary", "{}: {v}", node.name());
    }
    assert!(
        pair.log(A).contains("has no metadata file"),
        "node-a should warn about its missing metadata:\n{}",
        pair.log(A)
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_images_unchanged(&pair, &digest_a, &digest_b);

    // Discarding node-a's copy is one command on either node; keeping it needs its node.
    let elsewhere = pair.resolve(B, B, true);
    assert_ne!(elsewhere.code, Some(0), "{elsewhere}");
    assert!(elsewhere.all().contains("on node-a instead"), "{elsewhere}");
    let kept = pair.resolve(A, B, false);
    assert_eq!(kept.code, Some(0), "{kept}");
    pair.wait_in_sync(A);
    pair.wait_in_sync(B);
    assert_files_equal(&pair.image(A), &pair.image(B));
    assert!(
        read_file_range(&pair.image(B), 8 * MIB, 4 * MIB as usize)
            .iter()
            .all(|&x| x == 0x5a),
        "node-a's acknowledged writes did not reach node-b"
    );
}

/// node-b promoted while the link is cut (allowed: it was in sync), then the link restored:
/// two primaries, connected, both reporting the split brain.
fn two_primaries(pair: &mut Pair) {
    let proxy = pair.proxy.as_ref().expect("a pair with the link proxy");
    proxy.cut();
    pair.wait_disconnected(A);
    pair.wait_disconnected(B);
    pair.promote(B, false).ok();
    pair.proxy.as_ref().expect("proxy").restore();
    for node in [A, B] {
        let v = pair.wait_for(node, VOLUME, "split-brain", STATE_TIMEOUT, |v| {
            v["sync"] == "split-brain" && v["peer"] == "connected"
        });
        assert_eq!(v["role"], "primary", "{}: {v}", node.name());
    }
}

/// Neither node's image changed since the digests were taken.
fn assert_images_unchanged(pair: &Pair, digest_a: &u64, digest_b: &u64) {
    assert_eq!(
        file_digest(&pair.image(A)),
        *digest_a,
        "node-a's image changed"
    );
    assert_eq!(
        file_digest(&pair.image(B)),
        *digest_b,
        "node-b's image changed"
    );
}
