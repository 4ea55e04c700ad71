//! The periodic peer flush. Writes the secondary acknowledged but has not flushed may sit only
//! in its page cache, so when the link drops the primary marks them dirty and resyncs them.
//! `peer_flush_interval` bounds how long a write stays in that state when no client FLUSH
//! comes: these tests write without FLUSH, kill the secondary, and read what the primary marked.

use std::time::Duration;

use nbdmirror_tests::pair::{
    assert_fio_ok, file_digest, fio, num, Pair, PairOptions, A, B, MIB, VOLUME,
};
use nbdmirror_tests::{assert_qemu_io_ok, qemu_io};

/// 4 MiB written at 8 MiB in 64 KiB writes through node-a, no FLUSH (fio's nbd engine sends
/// none unless asked).
fn write_unflushed(pair: &Pair) {
    let job = [
        "--name=unflushed",
        "--rw=write",
        "--bs=64k",
        "--offset=8m",
        "--size=4m",
    ];
    assert_fio_ok(&fio(&pair.env, &pair.uri(A), &job));
}

/// `write_unflushed`, then `pause`, then kill -9 of the secondary. Returns the primary's
/// status.
fn kill_secondary_after_unflushed_writes(
    peer_flush_interval: &str,
    pause: Duration,
) -> serde_json::Value {
    let mut pair = Pair::with_options(PairOptions {
        extra: format!("peer_flush_interval = \"{peer_flush_interval}\""),
        ..PairOptions::default()
    });
    pair.start_with_a_primary();
    write_unflushed(&pair);
    std::thread::sleep(pause);
    pair.kill9(B);
    pair.wait_disconnected(A);
    // The primary marks the unflushed set just after it sees the link closed.
    std::thread::sleep(Duration::from_secs(1));
    pair.vol(A, VOLUME)
}

#[test]
fn writes_the_peer_never_flushed_are_marked_dirty_when_it_dies() {
    // An interval far longer than the test: no periodic flush happens.
    let a = kill_secondary_after_unflushed_writes("3600s", Duration::from_secs(3));
    let dirty = num(&a, "dirty_bytes");
    assert!(
        (4 * MIB..=4 * MIB + 128 * 1024).contains(&dirty),
        "the 4 MiB the peer held unflushed should be dirty, and nothing else: {a}"
    );
}

#[test]
fn the_periodic_peer_flush_clears_them_within_the_interval() {
    // Flushed by the timer within about a second of the writes: nothing to resync.
    let a = kill_secondary_after_unflushed_writes("1s", Duration::from_secs(4));
    assert_eq!(num(&a, "dirty_bytes"), 0, "nothing to resync: {a}");
}

/// A pair whose primary wrote 4 MiB at 8 MiB without FLUSH, no periodic peer flush.
fn pair_with_unflushed_writes() -> Pair {
    let mut pair = Pair::with_options(PairOptions {
        extra: "peer_flush_interval = \"60m\"".into(),
        ..PairOptions::default()
    });
    pair.start_with_a_primary();
    write_unflushed(&pair);
    pair
}

/// A clean stop ends with a metadata file the next start trusts, so the primary must not
/// forget what its peer acknowledged without flushing. Here the peer is frozen (SIGSTOP: a
/// host that just died, its link not yet timed out): the final flush gets no answer, and
/// the writes go into the dirty map before the metadata is called clean.
#[test]
fn a_clean_stop_marks_dirty_what_a_silent_peer_never_flushed() {
    let mut pair = pair_with_unflushed_writes();
    pair.signal(B, nix::sys::signal::Signal::SIGSTOP);
    let (status, took) = pair.signal_and_wait(A, nix::sys::signal::Signal::SIGTERM);
    pair.signal(B, nix::sys::signal::Signal::SIGCONT);
    assert!(status.success(), "node-a's clean stop failed: {status}");
    assert!(took < Duration::from_secs(25), "the stop took {took:?}");
    let m = pair.inspect(A);
    assert_eq!(m["flags"]["clean_shutdown"], true, "{m}");
    let dirty = m["dirty_bytes"].as_u64().unwrap_or(0);
    assert!(
        dirty >= 4 * MIB,
        "4 MiB the frozen peer never flushed must be dirty after a clean stop: {m}"
    );
}

/// With the peer answering, a clean stop flushes it instead: nothing is left to resync.
#[test]
fn a_clean_stop_flushes_a_live_peer_and_leaves_nothing_dirty() {
    let mut pair = pair_with_unflushed_writes();
    pair.stop(A);
    let m = pair.inspect(A);
    assert_eq!(m["flags"]["clean_shutdown"], true, "{m}");
    assert_eq!(m["dirty_bytes"].as_u64(), Some(0), "{m}");
}

/// A FLUSH the peer never confirms (it is frozen: a host that lost power, its link not yet
/// timed out) makes the writes before it durable on the primary alone. The primary starts a
/// new generation before it acknowledges the FLUSH: otherwise the peer, which may have lost
/// those writes with its page cache, would come back at the same generation, as current as
/// the primary, and could be promoted (or chosen as the resync source) over them.
#[test]
fn a_flush_the_peer_never_confirms_starts_a_new_generation() {
    let mut pair = Pair::with_options(PairOptions {
        extra: "peer_flush_interval = \"60m\"\npeer_timeout = \"1s\"".into(),
        ..PairOptions::default()
    });
    pair.start_with_a_primary();
    write_unflushed(&pair);
    let before = pair.vol(A, VOLUME);
    pair.signal(B, nix::sys::signal::Signal::SIGSTOP);
    assert_qemu_io_ok(&qemu_io(&pair.env, &pair.uri(A), &["flush"]));
    let after = pair.vol(A, VOLUME);
    pair.signal(B, nix::sys::signal::Signal::SIGCONT);
    assert_ne!(
        after["generation"], before["generation"],
        "the FLUSH rests on node-a alone: a new generation first. before {before}, after {after}"
    );
    assert!(num(&after, "dirty_bytes") >= 4 * MIB, "{after}");
    // The peer returns older, and gets the writes from the primary.
    pair.wait_in_sync(A);
    pair.stop(A);
    pair.stop(B);
    assert_eq!(file_digest(&pair.image(A)), file_digest(&pair.image(B)));
}
