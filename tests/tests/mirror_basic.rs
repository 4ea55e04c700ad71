//! The mirror's basics with two real daemons: a fresh pair is in sync without a copy, writes
//! through the primary land on both images byte for byte, only the primary exports, the
//! status JSON has every key of the contract, and role changes refuse what they must.

use std::path::Path;
use std::time::Duration;

use nbdmirror_tests::data::{assert_files_equal, read_file_range};
use nbdmirror_tests::pair::{
    assert_fio_ok, fio, num, volume_of, Node, Pair, PairOptions, A, B, MIB, STATE_TIMEOUT,
    STATUS_VOLUME_KEYS, VOLUME,
};
use nbdmirror_tests::{assert_qemu_io_ok, qemu_io, CmdOutput};
use serde_json::Value;

/// Every key of the contract is there, with the type and the values it allows.
#[track_caller]
fn assert_status_shape(pair: &Pair, node: Node, st: &Value) {
    assert_eq!(st["node"], node.name(), "status `node`: {st}");
    let v = volume_of(st, VOLUME).unwrap_or_else(|| panic!("no {VOLUME} in {st}"));
    for key in STATUS_VOLUME_KEYS {
        assert!(
            v.get(key).is_some(),
            "status of {} lacks `{key}`: {v}",
            node.name()
        );
    }
    let one_of = |key: &str, allowed: &[&str]| {
        let s = v[key]
            .as_str()
            .unwrap_or_else(|| panic!("`{key}` is not a string: {v}"));
        assert!(
            allowed.contains(&s),
            "`{key}` = {s:?} is not one of {allowed:?}: {v}"
        );
    };
    one_of("role", &["primary", "secondary"]);
    one_of("peer", &["connected", "disconnected"]);
    one_of(
        "sync",
        &["in-sync", "syncing", "out-of-sync", "split-brain"],
    );
    for key in [
        "dirty_bytes",
        "resync_bytes_sent",
        "resync_bytes_received",
        "resync_bytes_left",
    ] {
        num(&v, key);
    }
    assert!(
        v["resync_eta_seconds"].is_null() || v["resync_eta_seconds"].is_u64(),
        "`resync_eta_seconds` must be an integer or null: {v}"
    );
    let generation = v["generation"].as_str().expect("generation is a string");
    assert!(
        generation.len() == 16 && generation.chars().all(|c| c.is_ascii_hexdigit()),
        "`generation` must be 16 hex digits, got {generation:?}"
    );
    let meta = v["metadata"].as_str().expect("metadata is a string");
    assert!(
        Path::new(meta).is_absolute(),
        "metadata path not absolute: {meta}"
    );
    assert_eq!(
        Path::new(meta)
            .canonicalize()
            .expect("metadata file exists"),
        pair.metadata(node).canonicalize().unwrap(),
        "`metadata` should be <data_dir>/{VOLUME}.meta"
    );
    assert!(v["consistent"].is_boolean(), "`consistent` not a bool: {v}");
    assert!(v["reason"].is_string(), "`reason` not a string: {v}");
}

/// Exit code 1 and one line on stderr starting with "error: ".
#[track_caller]
fn assert_cli_error(out: &CmdOutput) {
    // `verify` exits 2 when it cannot compare (1 means "the copies differ"), like cmp(1).
    let expected = if out.cmdline.contains(" verify ") {
        2
    } else {
        1
    };
    assert_eq!(
        out.code,
        Some(expected),
        "expected exit code {expected}: {out}"
    );
    let lines: Vec<&str> = out.stderr.trim_end().lines().collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr: {out}");
    assert!(
        lines[0].starts_with("error: "),
        "expected `error: ...`: {out}"
    );
}

#[test]
fn fresh_pair_promotes_without_copy_and_status_has_every_key() {
    let mut pair = Pair::new();
    pair.start(A);
    pair.start(B);
    pair.wait_connected(A);
    pair.wait_connected(B);
    for node in [A, B] {
        let st = pair.status(node);
        assert_status_shape(&pair, node, &st);
        let v = volume_of(&st, VOLUME).unwrap();
        assert_eq!(v["role"], "secondary", "every volume starts secondary: {v}");
        assert!(
            !pair.export_answers(node),
            "{}'s export must be closed while secondary",
            node.name()
        );
    }
    // Images and metadata were created by the daemons, at the config size.
    for node in [A, B] {
        assert_eq!(
            std::fs::metadata(pair.image(node)).unwrap().len(),
            pair.size
        );
        assert!(pair.metadata(node).is_file());
    }

    pair.promote(A, false).ok();
    let a = pair.wait_for(A, VOLUME, "primary and in-sync", STATE_TIMEOUT, |v| {
        v["role"] == "primary" && v["sync"] == "in-sync"
    });
    let b = pair.wait_in_sync(B);
    assert_eq!(b["role"], "secondary");
    // Both images are new: no initial copy.
    assert_eq!(num(&a, "resync_bytes_sent"), 0, "no initial copy: {a}");
    assert_eq!(num(&b, "resync_bytes_received"), 0, "no initial copy: {b}");
    assert_eq!(num(&a, "dirty_bytes"), 0, "{a}");
    assert_eq!(num(&a, "resync_bytes_left"), 0, "{a}");
    assert_eq!(a["consistent"], true, "{a}");
    assert_eq!(b["consistent"], true, "{b}");
    for node in [A, B] {
        assert_status_shape(&pair, node, &pair.status(node));
    }

    // Only the primary exports.
    pair.wait_export(A);
    assert!(!pair.export_answers(B), "the secondary must not export");
    let info = pair
        .env
        .run(&["qemu-img", "info", "--output=json", &pair.uri(A)]);
    info.ok();
    assert!(
        info.stdout
            .contains(&format!("\"virtual-size\": {}", pair.size)),
        "{info}"
    );
    // The export answers to its volume name only (an unknown name is refused).
    let bad = pair
        .env
        .run(&["nbdinfo", "nbd://127.0.0.1:10809/no-such-export"]);
    assert!(!bad.success(), "unknown export name should fail: {bad}");

    // The text status works too and names the volume.
    let text = pair.cli(A, &["status"]);
    text.ok();
    assert!(text.stdout.contains(VOLUME), "{text}");
}

/// The writes of `export_qemu.rs` (odd offsets, FUA, discard, write-zeroes with and without
/// unmap) plus fio with verification, through the primary; then both images are identical,
/// after a demote and again after both daemons stopped cleanly.
#[test]
fn writes_through_primary_make_both_images_identical() {
    let mut pair = Pair::new();
    pair.start_with_a_primary();
    let uri = pair.uri(A);
    let last = pair.size - 1;
    let cmds: Vec<String> = vec![
        "write -P 0x11 4097 3000".into(),
        format!("write -P 0x22 {last} 1"),
        "write -P 0x33 16M 16M".into(),
        "write -f -P 0x99 1088k 64k".into(),
        "discard 1088k 64k".into(),
        "write -f -P 0x44 1M 64k".into(),
        "write -P 0x55 2M 128k".into(),
        "write -z 2052k 8k".into(),
        "write -P 0x66 3M 64k".into(),
        "write -z -u 3M 64k".into(),
        "write -P 0x77 4M 70004".into(),
        "write -z 4224305 333".into(),
        "flush".into(),
        "read -P 0 0 4097".into(),
        "read -P 0x11 4097 3000".into(),
        format!("read -P 0x22 {last} 1"),
        "read -P 0x33 16M 16M".into(),
        "read -P 0x44 1M 64k".into(),
        "read -P 0 1088k 64k".into(),
        "read -P 0x55 2M 4096".into(),
        "read -P 0 2052k 8k".into(),
        "read -P 0 3M 64k".into(),
        "read -P 0 4224305 333".into(),
    ];
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    assert_qemu_io_ok(&qemu_io(&pair.env, &uri, &cmds));

    // fio: many requests in flight, unaligned sizes, verified on a second pass.
    let job = [
        "--name=mirror",
        "--rw=randwrite",
        "--bsrange=512-64k",
        "--bs_unaligned=1",
        "--iodepth=16",
        "--offset=40m",
        "--size=16m",
        "--verify=crc32c",
        "--do_verify=1",
    ];
    assert_fio_ok(&fio(&pair.env, &uri, &job));
    let mut again = job.to_vec();
    again.push("--verify_only");
    assert_fio_ok(&fio(&pair.env, &uri, &again));

    // The online verify finds no difference.
    let verify = pair.verify(A);
    assert!(
        verify.success(),
        "verify should find the copies equal: {verify}"
    );

    pair.demote(A).ok();
    pair.wait_for(A, VOLUME, "secondary", STATE_TIMEOUT, |v| {
        v["role"] == "secondary"
    });
    pair.wait_export_closed(A);
    pair.wait_in_sync(A);
    pair.wait_in_sync(B);
    assert_files_equal(&pair.image(A), &pair.image(B));
    // The bytes are where they were written (not only equal).
    assert_eq!(read_file_range(&pair.image(B), last, 1), vec![0x22]);
    assert!(read_file_range(&pair.image(B), 16 * MIB, 16 * MIB as usize)
        .iter()
        .all(|&b| b == 0x33));

    // A clean stop of both: exit 0, metadata clean, images still identical.
    pair.stop(B);
    pair.stop(A);
    assert_files_equal(&pair.image(A), &pair.image(B));
    for node in [A, B] {
        let m = pair.inspect(node);
        assert_eq!(m["flags"]["clean_shutdown"], true, "{}: {m}", node.name());
        assert_eq!(m["flags"]["consistent"], true, "{}: {m}", node.name());
        assert_eq!(m["dirty_bytes"], 0, "{}: {m}", node.name());
        assert_eq!(m["hot_extent_count"], 0, "{}: {m}", node.name());
        assert_eq!(m["peer_name"], node.other().name(), "{}: {m}", node.name());
    }
}

#[test]
fn cli_errors_are_one_line_and_secondary_export_stays_closed() {
    let mut pair = Pair::new();
    pair.start_with_a_primary();
    assert!(!pair.export_answers(B));
    for args in [
        vec!["promote", "no-such-volume"],
        vec!["demote", "no-such-volume"],
        vec!["verify", "no-such-volume"],
        vec!["resolve", "no-such-volume", "--discard-on", "node-b"],
    ] {
        assert_cli_error(&pair.cli(A, &args));
        assert_cli_error(&pair.cli(B, &args));
    }
    // Resolving for a node that does not exist is refused too.
    assert_cli_error(&pair.cli(A, &["resolve", VOLUME, "--discard-on", "node-z"]));
    // There is no split brain to resolve.
    assert_cli_error(&pair.cli(A, &["resolve", VOLUME, "--discard-on", "node-b"]));
    // Nothing of that changed the roles.
    assert_eq!(pair.vol(A, VOLUME)["role"], "primary");
    assert_eq!(pair.vol(B, VOLUME)["role"], "secondary");
    assert!(pair.export_answers(A));
    assert!(!pair.export_answers(B));

    // A CLI without a daemon behind its control socket fails the same way.
    pair.stop(B);
    // verify cannot compare without the peer: it must not report the copies equal.
    pair.wait_disconnected(A);
    let v = pair.verify(A);
    assert_ne!(
        v.code,
        Some(0),
        "verify without the peer must not succeed: {v}"
    );
    assert_cli_error(&pair.cli(B, &["status", "--json"]));
    assert_cli_error(&pair.cli(B, &["promote", VOLUME]));
}

/// A clean restart of the primary brings it back secondary, export closed.
#[test]
fn restarted_primary_comes_back_secondary() {
    let mut pair = Pair::new();
    pair.start_with_a_primary();
    assert_qemu_io_ok(&qemu_io(&pair.env, &pair.uri(A), &["write -P 0x5a 0 1M"]));
    pair.restart(A);
    let a = pair.vol(A, VOLUME);
    assert_eq!(
        a["role"], "secondary",
        "a restarted node comes back secondary: {a}"
    );
    assert!(!pair.export_answers(A));
    pair.wait_in_sync(A);
    pair.wait_in_sync(B);
    assert!(!pair.export_answers(A));
    assert!(!pair.export_answers(B));
    assert_files_equal(&pair.image(A), &pair.image(B));
}

/// A node that missed writes (its peer wrote alone, then it came back) may not be promoted
/// while it is older than its peer or its resync has not finished, unless `--force`.
/// The resync is rate-limited so that the window is seconds long.
#[test]
fn promoting_stale_or_resyncing_data_is_refused_without_force() {
    let mut pair = Pair::with_options(PairOptions {
        extra: "resync_rate = \"2M\"".into(),
        ..PairOptions::default()
    });
    pair.start_with_a_primary();
    pair.stop(B);
    pair.wait_disconnected(A);
    // 24 MiB written alone: about 12 s of resync at 2 MiB/s.
    assert_qemu_io_ok(&qemu_io(
        &pair.env,
        &pair.uri(A),
        &["write -P 0x6b 8M 24M", "flush"],
    ));
    let a = pair.vol(A, VOLUME);
    assert!(num(&a, "dirty_bytes") >= 24 * MIB, "{a}");
    assert_eq!(a["sync"], "out-of-sync", "{a}");
    pair.demote(A).ok();
    pair.wait_for(A, VOLUME, "secondary", STATE_TIMEOUT, |v| {
        v["role"] == "secondary"
    });

    pair.start(B);
    let b = pair.vol(B, VOLUME);
    assert_eq!(b["role"], "secondary");
    pair.wait_connected(B);
    // Older than the connected peer, or resyncing: refused.
    let out = pair.promote(B, false);
    let b_now = pair.vol(B, VOLUME);
    assert_eq!(
        out.code,
        Some(1),
        "promoting node-b (stale or resync target) must be refused without --force; status now {b_now}: {out}"
    );
    assert!(out.stderr.starts_with("error: "), "{out}");
    assert_eq!(b_now["role"], "secondary", "{b_now}");
    assert!(!pair.export_answers(B));

    // While the resync runs, the status shows progress and node-b is inconsistent.
    let syncing = pair.wait_for(B, VOLUME, "syncing", Duration::from_secs(20), |v| {
        v["sync"] == "syncing"
    });
    assert_eq!(
        syncing["consistent"], false,
        "a resync target is inconsistent: {syncing}"
    );
    assert!(num(&syncing, "resync_bytes_left") > 0, "{syncing}");
    let out = pair.promote(B, false);
    assert_eq!(out.code, Some(1), "promoting a resync target: {out}");

    // Once in sync, the promotion is allowed without --force.
    pair.wait_for(B, VOLUME, "in-sync", Duration::from_secs(90), |v| {
        v["sync"] == "in-sync" && v["peer"] == "connected"
    });
    pair.wait_in_sync(A);
    pair.promote(B, false).ok();
    pair.wait_export(B);
    assert_qemu_io_ok(&qemu_io(&pair.env, &pair.uri(B), &["read -P 0x6b 8M 24M"]));
    pair.demote(B).ok();
    pair.wait_in_sync(A);
    pair.wait_in_sync(B);
    assert_files_equal(&pair.image(A), &pair.image(B));
}

/// `verify` notices a difference made behind the daemons' backs and exits 1.
#[test]
fn verify_reports_a_difference_and_exits_1() {
    let mut pair = Pair::new();
    pair.start_with_a_primary();
    assert_qemu_io_ok(&qemu_io(&pair.env, &pair.uri(A), &["write -P 0x42 0 4M"]));
    let ok = pair.verify(A);
    assert!(ok.success(), "{ok}");
    // On the secondary, mirrored writes in flight would count as differences.
    let on_b = pair.verify(B);
    assert_eq!(on_b.code, Some(2), "{on_b}");
    assert!(
        on_b.all().contains("run verify on the primary, node-a"),
        "{on_b}"
    );
    // Flip one byte in node-b's image directly (the page cache is shared, so the daemon
    // reads the changed byte).
    let img = pair.image(B);
    let byte = read_file_range(&img, 3 * MIB + 17, 1)[0];
    nbdmirror_tests::data::write_file_range(&img, 3 * MIB + 17, &[byte ^ 0xff]);
    let bad = pair.verify(A);
    assert_eq!(
        bad.code,
        Some(1),
        "verify must exit 1 on a difference: {bad}"
    );
    pair.assert_running(A);
    pair.assert_running(B);
    // The difference is marked, and the primary's copy wins: the pair converges.
    pair.wait_in_sync(A);
    pair.wait_in_sync(B);
    let again = pair.verify(A);
    assert!(
        again.success(),
        "after the resync verify finds nothing: {again}"
    );
    pair.demote(A).ok();
    pair.wait_in_sync(A);
    pair.wait_in_sync(B);
    assert_files_equal(&pair.image(A), &pair.image(B));
}

/// Overlapping writes and trims in flight from several connections at once, on a 1 MiB
/// region: both nodes must apply them in the same order, so the images end identical.
#[test]
fn overlapping_writes_in_flight_end_identical_on_both_nodes() {
    overlapping_writes_end_identical(Pair::new());
}

/// The same with the primary's NBD connections on data-plane threads of their own (not on
/// the volume's thread): a write's acknowledgement then crosses threads.
#[test]
fn overlapping_writes_end_identical_with_separate_data_plane_threads() {
    overlapping_writes_end_identical(Pair::with_options(PairOptions {
        serve_args: vec!["--threads".into(), "2".into()],
        ..PairOptions::default()
    }));
}

fn overlapping_writes_end_identical(mut pair: Pair) {
    pair.start_with_a_primary();
    let uri = pair.uri(A);
    let out = fio(
        &pair.env,
        &uri,
        &[
            "--offset=8m",
            "--size=1m",
            "--time_based=1",
            "--runtime=5",
            "--norandommap=1",
            // New random data in every write, so a reordering shows.
            "--refill_buffers=1",
            "--name=w",
            "--rw=randwrite",
            "--bsrange=512-128k",
            "--bs_unaligned=1",
            "--iodepth=32",
            "--numjobs=3",
            "--name=t",
            "--rw=randtrim",
            "--bsrange=4k-64k",
            "--iodepth=8",
        ],
    );
    assert_fio_ok(&out);
    pair.demote(A).ok();
    pair.wait_in_sync(A);
    pair.wait_in_sync(B);
    let a = pair.vol(A, VOLUME);
    assert_eq!(num(&a, "resync_bytes_sent"), 0, "no resync was needed: {a}");
    assert_files_equal(&pair.image(A), &pair.image(B));
    // Something was written there (the comparison is not of two empty regions).
    assert!(read_file_range(&pair.image(A), 8 * MIB, MIB as usize)
        .iter()
        .any(|&x| x != 0));
}

/// Every command that prints takes --json and then prints one JSON object.
#[test]
fn every_printing_command_takes_json() {
    let mut pair = Pair::new();
    pair.start(A);
    pair.start(B);
    pair.wait_connected(A);
    pair.wait_connected(B);
    let json = |out: CmdOutput| -> Value {
        out.ok();
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("not one JSON object ({e}): {out}"))
    };
    let p = json(pair.cli(A, &["promote", VOLUME, "--json"]));
    assert!(p.is_object(), "{p}");
    pair.wait_in_sync(A);
    pair.wait_in_sync(B);
    let v = json(pair.cli(A, &["verify", VOLUME, "--json"]));
    assert!(v.is_object(), "{v}");
    let d = json(pair.cli(A, &["demote", VOLUME, "--json"]));
    assert!(d.is_object(), "{d}");
    let s = json(pair.cli(B, &["status", "--json"]));
    assert_eq!(s["node"], "node-b");
    // Errors stay on stderr, one line, also with --json.
    let e = pair.cli(A, &["promote", "nope", "--json"]);
    assert_cli_error(&e);
}
