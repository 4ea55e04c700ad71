//! Initial sync: a pair where one image already holds a VM's data. Promoting that side
//! copies it to the empty peer; promoting the empty side (which would overwrite the data
//! with zeroes) is refused unless --force.

use nbdmirror_tests::data::{assert_files_equal, write_pattern_file};
use nbdmirror_tests::pair::{num, Pair, A, B, MIB, STATE_TIMEOUT, VOLUME};
use nbdmirror_tests::{assert_qemu_io_ok, qemu_io};

/// node-a's image exists with data (holes in between) before the first start.
fn pair_with_existing_image_on_a() -> Pair {
    let mut pair = Pair::new();
    std::fs::create_dir_all(pair.data_dir(A)).unwrap();
    write_pattern_file(
        &pair.image(A),
        pair.size,
        21,
        &[(8 * MIB, 16 * MIB), (40 * MIB, 8 * MIB)],
    );
    pair.start(A);
    pair.start(B);
    pair.wait_connected(A);
    pair.wait_connected(B);
    pair
}

#[test]
fn promoting_the_side_with_data_copies_it_to_the_empty_peer() {
    let pair = pair_with_existing_image_on_a();
    pair.promote(A, false).ok();
    let a = pair.wait_for(
        A,
        VOLUME,
        "in-sync after the initial copy",
        STATE_TIMEOUT,
        |v| v["sync"] == "in-sync" && v["role"] == "primary",
    );
    let b = pair.wait_in_sync(B);
    let sent = num(&a, "resync_bytes_sent");
    eprintln!(
        "initial copy: sent {sent}, received {}",
        num(&b, "resync_bytes_received")
    );
    // The initial sync counts in the resync counters (the holes may be sent as zero runs).
    assert!(sent > 0, "the initial copy is counted: {a}");
    assert!(sent <= pair.size, "{a}");
    assert!(num(&b, "resync_bytes_received") > 0, "{b}");
    assert_eq!(b["consistent"], true, "{b}");
    assert_files_equal(&pair.image(A), &pair.image(B));
    // And mirroring works afterwards.
    assert_qemu_io_ok(&qemu_io(&pair.env, &pair.uri(A), &["write -P 0x3c 10M 1M"]));
    pair.demote(A).ok();
    pair.wait_in_sync(A);
    pair.wait_in_sync(B);
    assert_files_equal(&pair.image(A), &pair.image(B));
}

#[test]
fn promoting_the_empty_side_over_data_is_refused_without_force() {
    let pair = pair_with_existing_image_on_a();
    let data_digest = nbdmirror_tests::pair::file_digest(&pair.image(A));
    let out = pair.promote(B, false);
    assert_eq!(
        out.code,
        Some(1),
        "promoting the empty node-b over node-a's data must be refused: {out}"
    );
    assert!(out.stderr.starts_with("error: "), "{out}");
    assert_eq!(pair.vol(B, VOLUME)["role"], "secondary");
    assert!(!pair.export_answers(B));
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(
        nbdmirror_tests::pair::file_digest(&pair.image(A)),
        data_digest,
        "node-a's data must be untouched"
    );
    // With --force it is the operator's choice: node-b's (empty) image wins.
    pair.promote(B, true).ok();
    pair.wait_for(B, VOLUME, "in-sync", STATE_TIMEOUT, |v| {
        v["sync"] == "in-sync" && v["role"] == "primary"
    });
    pair.wait_in_sync(A);
    pair.demote(B).ok();
    pair.wait_in_sync(A);
    pair.wait_in_sync(B);
    assert_files_equal(&pair.image(A), &pair.image(B));
    assert!(
        std::fs::read(pair.image(A))
            .unwrap()
            .iter()
            .all(|&x| x == 0),
        "the forced promotion of the empty side overwrote node-a with zeroes"
    );
}
