//! The metadata file on disk: create/open, durability bookkeeping, crash folding, cold
//! clearing, header slots, corruption, concurrency.

use std::sync::Arc;

use mirror::metadata::header::SLOT_SIZE;
use mirror::metadata::{
    parse, Flags, FormatError, MetadataError, MetadataFile, MetadataOptions, Snapshot,
};

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

fn opts(capacity: u32) -> MetadataOptions {
    MetadataOptions {
        activity_capacity: capacity,
        ..MetadataOptions::default()
    }
}

#[test]
fn create_refuses_existing_and_open_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk0.meta");
    let m = MetadataFile::create(&path, 256 * MIB, "node-a", opts(8)).unwrap();
    assert_eq!(m.volume_size(), 256 * MIB);
    assert_eq!(m.granularity() as u64, 64 * KIB);
    assert!(m.flags().contains(Flags::CONSISTENT));
    assert!(
        !m.flags().contains(Flags::CLEAN_SHUTDOWN),
        "open clears clean-shutdown"
    );
    assert!(m.open_report().previous_shutdown_clean);
    // The lock keeps a second daemon out.
    assert!(matches!(
        MetadataFile::open(&path),
        Err(MetadataError::Locked { .. })
    ));
    m.clean_shutdown().unwrap();
    drop(m);
    let e = MetadataFile::create(&path, MIB, "node-a", opts(8))
        .err()
        .unwrap();
    assert!(matches!(e, MetadataError::Exists { .. }), "{e}");
    assert!(e.to_string().contains("disk0.meta"), "{e}");

    let m = MetadataFile::open(&path).unwrap();
    assert!(m.open_report().previous_shutdown_clean);
    let h = m.header();
    assert_eq!(h.counters.opens, 2);
    assert_eq!(h.counters.unclean_opens, 0);
    assert_eq!(h.node_name, "node-a");
    assert_eq!(h.activity_capacity, 8);
}

#[test]
fn invalid_options_are_refused_without_leaving_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.meta");
    let bad = MetadataOptions {
        dirty_granularity: 1000,
        ..MetadataOptions::default()
    };
    let e = MetadataFile::create(&path, MIB, "a", bad).err().unwrap();
    assert!(e.to_string().contains("granularity"), "{e}");
    assert!(!path.exists());
    let e = MetadataFile::create(&path, MIB, "", opts(8)).err().unwrap();
    assert!(e.to_string().contains("node name"), "{e}");
    assert!(!path.exists());
}

/// A new file appears at its path only whole: a crash part-way through `create` must not
/// leave a file the next start refuses as truncated. What a crash leaves instead (the
/// side file) is taken over by the next create.
#[test]
fn create_never_shows_a_partial_file_and_takes_over_a_crashed_attempt() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.meta");
    let staging = dir.path().join(".big.meta.creating");
    std::fs::write(&staging, b"left by a crash part-way through a create").unwrap();

    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (path, done) = (path.clone(), done.clone());
        std::thread::spawn(move || {
            let mut sizes = Vec::new();
            // Bounded: create ends in well under a minute.
            for _ in 0..600_000 {
                if done.load(Ordering::Acquire) {
                    break;
                }
                if let Ok(m) = std::fs::metadata(&path) {
                    sizes.push(m.len());
                }
                std::thread::sleep(std::time::Duration::from_micros(50));
            }
            sizes
        })
    };
    // 1 TiB at 4 KiB granules: a 32 MiB dirty map, written in 1 MiB steps.
    let fine = MetadataOptions {
        dirty_granularity: 4096,
        ..MetadataOptions::default()
    };
    let m = MetadataFile::create(&path, 1 << 40, "a", fine).unwrap();
    done.store(true, Ordering::Release);
    let sizes = watcher.join().unwrap();
    let full = std::fs::metadata(&path).unwrap().len();
    assert!(full > 32 * MIB);
    assert!(
        sizes.iter().all(|&s| s == full),
        "a partial file was visible at the path: sizes {:?}",
        sizes
            .iter()
            .filter(|&&s| s != full)
            .take(5)
            .collect::<Vec<_>>()
    );
    assert!(!staging.exists(), "the side file is gone");
    m.clean_shutdown().unwrap();
    drop(m);
    MetadataFile::open(&path).unwrap();
}

#[test]
fn mark_dirty_syncs_once_and_persists() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.meta");
    // A volume whose size is not a multiple of the granularity.
    let size = 100 * MIB + 5000;
    let m = MetadataFile::create(&path, size, "a", opts(8)).unwrap();
    assert!(m.mark_dirty(0, 4096).unwrap());
    assert!(!m.mark_dirty(100, 10).unwrap(), "already dirty: no change");
    assert!(
        m.mark_dirty(64 * KIB - 1, 2).unwrap(),
        "straddles into granule 1"
    );
    assert!(m.mark_dirty(size - 1, 1).unwrap());
    assert!(m.is_dirty(70 * KIB, 1));
    assert!(!m.is_dirty(128 * KIB, 64 * KIB));
    assert_eq!(m.dirty_count(), 3);
    assert_eq!(m.dirty_ranges(), vec![(0, 128 * KIB), (100 * MIB, 5000)]);
    assert_eq!(m.dirty_bytes(), 128 * KIB + 5000);
    assert!(matches!(
        m.mark_dirty(size, 1),
        Err(MetadataError::OutOfRange { .. })
    ));
    assert!(matches!(
        m.mark_dirty(u64::MAX, 2),
        Err(MetadataError::OutOfRange { .. })
    ));

    // Clearing only counts whole granules (and the volume's partial last one).
    assert_eq!(m.clear_dirty(0, 100).unwrap(), 0);
    assert_eq!(m.clear_dirty(0, 64 * KIB).unwrap(), 1);
    assert_eq!(m.clear_dirty(100 * MIB, 5000).unwrap(), 1);
    assert_eq!(m.dirty_ranges(), vec![(64 * KIB, 64 * KIB)]);
    m.clean_shutdown().unwrap();
    assert!(m.mark_dirty(0, 1).is_err(), "shut down");
    drop(m);

    let snap = Snapshot::read(&path).unwrap();
    assert_eq!(
        snap.dirty_ranges().collect::<Vec<_>>(),
        vec![(64 * KIB, 64 * KIB)]
    );
    assert!(snap.header.flags.contains(Flags::CLEAN_SHUTDOWN));
    let m = MetadataFile::open(&path).unwrap();
    assert_eq!(m.dirty_count(), 1);
}

#[test]
fn crash_folds_hot_extents_into_the_dirty_map() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.meta");
    let m = MetadataFile::create(&path, 64 * MIB, "a", opts(2)).unwrap();
    let w1 = m.begin_write(0, 4096).unwrap();
    assert_eq!(w1.became_hot, 1);
    let w2 = m.begin_write(4 * MIB - 10, 20).unwrap(); // extents 0 and 1
    assert_eq!(w2.became_hot, 1);
    let w3 = m.begin_write(100, 100).unwrap();
    assert_eq!(w3.became_hot, 0, "extent 0 already hot");
    m.end_write(w1);
    m.end_write(w2);
    m.end_write(w3);
    assert_eq!(m.hot_extents(), vec![0, 1]);
    let w = m.begin_write(40 * MIB, 1).unwrap(); // extent 10: evicts 1 (w3 touched 0 last)
    m.end_write(w);
    assert_eq!(m.hot_extents(), vec![0, 10]);
    assert_eq!(m.pending_cold(), 1);
    assert_eq!(
        m.activity_bits().runs().collect::<Vec<_>>(),
        vec![0..2, 10..11]
    );
    let m_dirty_before = m.dirty_count();
    assert_eq!(m_dirty_before, 0);
    // Crash: no clean shutdown.
    drop(m);

    let snap = Snapshot::read(&path).unwrap();
    assert!(!snap.header.flags.contains(Flags::CLEAN_SHUTDOWN));
    assert_eq!(snap.activity.bits().count(), 3);

    let m = MetadataFile::open(&path).unwrap();
    let r = m.open_report();
    assert!(!r.previous_shutdown_clean);
    assert_eq!(r.folded_extents, 3);
    assert_eq!(r.folded_dirty_bits, 3 * 64);
    assert_eq!(m.activity_bits().count(), 0);
    assert_eq!(m.dirty_ranges(), vec![(0, 8 * MIB), (40 * MIB, 4 * MIB)]);
    assert_eq!(m.header().counters.unclean_opens, 1);
}

/// A crash in an earlier boot (a power loss) flags the copy as having lost its unflushed
/// writes, until it starts a generation; a crash of the daemon alone, or a clean shutdown
/// before a reboot, does not.
#[test]
fn a_crash_in_an_earlier_boot_flags_the_lost_cache() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.meta");
    let m = MetadataFile::create(&path, 64 * MIB, "a", opts(4)).unwrap();
    let w = m.begin_write(0, 4096).unwrap();
    m.end_write(w);
    drop(m); // a crash
    let rebooted = [7u8; 16];
    let m = MetadataFile::open_at_boot(&path, rebooted).unwrap();
    assert!(m.open_report().lost_cache);
    assert!(m.flags().contains(Flags::LOST_CACHE));
    assert_eq!(m.header().boot_id, rebooted);
    assert_eq!(m.dirty_ranges(), vec![(0, 4 * MIB)], "its hot extent");
    drop(m); // the daemon crashes again, same boot: still flagged, nothing new lost
    let m = MetadataFile::open_at_boot(&path, rebooted).unwrap();
    assert!(!m.open_report().lost_cache);
    assert!(m.flags().contains(Flags::LOST_CACHE), "cleared too early");
    m.start_new_generation().unwrap();
    assert!(!m.flags().contains(Flags::LOST_CACHE));
    m.clean_shutdown().unwrap();
    drop(m);
    let m = MetadataFile::open_at_boot(&path, [9u8; 16]).unwrap();
    assert!(
        !m.open_report().lost_cache,
        "a clean shutdown loses nothing"
    );
    assert!(!m.flags().contains(Flags::LOST_CACHE));
}

#[test]
fn cold_extents_clear_only_after_the_next_flush() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.meta");
    let m = MetadataFile::create(&path, 64 * MIB, "a", opts(1)).unwrap();
    let w = m.begin_write(0, 1).unwrap();
    m.end_write(w);
    let w = m.begin_write(4 * MIB, 1).unwrap(); // evicts 0
    m.end_write(w);
    let batch = m.take_cold();
    // Extent 1 is evicted after the flush began: its writes are not covered by that flush.
    let w = m.begin_write(8 * MIB, 1).unwrap();
    m.end_write(w);
    // Extent 0 re-heated and re-evicted after take_cold: must not be cleared either.
    let w = m.begin_write(0, 1).unwrap();
    assert_eq!(w.became_hot, 1);
    m.end_write(w);
    assert_eq!(m.clear_cold(batch), 0);
    assert_eq!(m.activity_bits().runs().collect::<Vec<_>>(), vec![0..3]);
    let batch = m.take_cold();
    assert_eq!(m.clear_cold(batch), 2); // extents 1 and 2, not the hot 0
    assert_eq!(m.activity_bits().runs().collect::<Vec<_>>(), vec![0..1]);
    m.flush().unwrap();
    // A clean shutdown refuses writes in flight, then clears everything.
    let w = m.begin_write(0, 1).unwrap();
    assert!(matches!(
        m.clean_shutdown(),
        Err(MetadataError::State { .. })
    ));
    m.end_write(w);
    m.clean_shutdown().unwrap();
    drop(m);
    let snap = Snapshot::read(&path).unwrap();
    assert_eq!(snap.activity.bits().count(), 0);
}

#[test]
fn header_updates_alternate_slots_and_survive_a_torn_slot() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h.meta");
    let m = MetadataFile::create(&path, 16 * MIB, "node-a", opts(4)).unwrap();
    let g1 = m.start_new_generation().unwrap();
    let g2 = m.start_new_generation().unwrap();
    assert!(g1 != 0 && g2 != 0 && g1 != g2);
    m.update_header(|h| {
        h.generations.sync = g1;
        h.peer_name = "node-b".into();
        h.flags.set(Flags::PRIMARY, true);
    })
    .unwrap();
    let gens = m.generations();
    assert_eq!(gens.current, g2);
    assert_eq!(gens.history[0], g1);
    assert_eq!(gens.history[1], 0);
    let seq = m.header().sequence;
    m.clean_shutdown().unwrap();
    drop(m);

    let mut bytes = std::fs::read(&path).unwrap();
    let snap = parse(&bytes).unwrap();
    assert_eq!(snap.header.sequence, seq + 1);
    assert_eq!(snap.header.peer_name, "node-b");
    // Tear the newest slot: the previous header takes over (it lacks only the clean flag).
    let newest = snap.active_slot;
    bytes[newest * SLOT_SIZE + 200] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let snap = Snapshot::read(&path).unwrap();
    assert_eq!(snap.active_slot, 1 - newest);
    assert!(snap.standby_error.is_some());
    assert_eq!(snap.header.generations.current, g2);
    assert!(!snap.header.flags.contains(Flags::CLEAN_SHUTDOWN));
    let m = MetadataFile::open(&path).unwrap();
    assert!(!m.open_report().previous_shutdown_clean);
    assert!(
        m.open_report().standby_slot_damaged,
        "the damage is reported"
    );
    assert_eq!(m.generations().current, g2);
}

#[test]
fn corrupt_and_truncated_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.meta");
    let m = MetadataFile::create(&path, 16 * MIB, "a", opts(4)).unwrap();
    m.clean_shutdown().unwrap();
    drop(m);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 4096]).unwrap();
    let e = MetadataFile::open(&path).err().unwrap();
    assert!(
        matches!(
            e,
            MetadataError::Format {
                source: FormatError::Truncated { .. },
                ..
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string().contains("t.meta") && e.to_string().contains("truncated"),
        "{e}"
    );
    std::fs::write(&path, b"").unwrap();
    assert!(MetadataFile::open(&path).is_err());
    std::fs::write(&path, vec![0u8; 16384]).unwrap();
    let e = Snapshot::read(&path).err().unwrap();
    assert!(
        e.to_string().contains("not an nbdmirror metadata file"),
        "{e}"
    );
    let e = MetadataFile::open(&dir.path().join("missing.meta"))
        .err()
        .unwrap();
    assert!(matches!(e, MetadataError::Io { .. }), "{e}");
}

#[test]
fn concurrent_writers_set_every_bit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.meta");
    let m = Arc::new(MetadataFile::create(&path, 256 * MIB, "a", opts(16)).unwrap());
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let m = Arc::clone(&m);
            std::thread::spawn(move || {
                let mut changed = 0;
                for i in 0..200u64 {
                    let off = ((i * 7 + t * 13) % 1024) * 64 * KIB;
                    let w = m.begin_write(off, 4096).unwrap();
                    if m.mark_dirty(off, 4096).unwrap() {
                        changed += 1;
                    }
                    m.end_write(w);
                }
                changed
            })
        })
        .collect();
    let changed: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    let mut expect = std::collections::BTreeSet::new();
    for t in 0..4u64 {
        for i in 0..200u64 {
            expect.insert((i * 7 + t * 13) % 1024);
        }
    }
    assert_eq!(m.dirty_count(), expect.len() as u64);
    assert_eq!(
        changed,
        expect.len() as u64,
        "each granule changed exactly once"
    );
    assert!(m.hot_extents().len() <= 16);
}

/// Resync chunks the target acknowledged stay dirty until a peer flush settles them; a
/// granule marked dirty again in between (a write the peer failed, a failed flush) is not
/// cleared by that settle, a failed flush clears nothing, and a chunk in flight across a
/// failed flush is never settled.
#[test]
fn resync_chunks_stay_dirty_until_a_flush_settles_them() {
    let dir = tempfile::tempdir().unwrap();
    let size = 8 * MIB + 5000;
    let m = MetadataFile::create(&dir.path().join("r.meta"), size, "a", opts(8)).unwrap();
    m.mark_all_dirty().unwrap();
    m.resync_starting();
    let all = m.dirty_bytes();
    m.resync_carried(0, MIB, m.resync_ticket());
    m.resync_carried(MIB, MIB, m.resync_ticket());
    m.resync_carried(8 * MIB, 5000, m.resync_ticket());
    assert_eq!(m.dirty_bytes(), all, "carried, not flushed: still dirty");
    assert_eq!(m.resync_pending_bytes(), 2 * MIB + 64 * KIB);

    let failed = m.begin_resync_settle();
    m.abandon_resync_settle(failed);
    assert_eq!(m.dirty_bytes(), all, "a failed flush settles nothing");

    m.resync_carried(0, MIB, m.resync_ticket());
    m.resync_carried(MIB, MIB, m.resync_ticket());
    let settle = m.begin_resync_settle();
    m.mark_dirty(MIB + 4096, 1).unwrap(); // marked again before the flush answered
    m.resync_carried(2 * MIB, MIB, m.resync_ticket()); // after the flush was sent: not covered by it
    m.settle_resync(settle);
    assert!(!m.is_dirty(0, MIB), "settled");
    assert!(m.is_dirty(MIB, 64 * KIB), "marked again: stays dirty");
    assert!(
        !m.is_dirty(MIB + 64 * KIB, MIB - 64 * KIB),
        "the rest settled"
    );
    assert!(m.is_dirty(2 * MIB, MIB), "carried after the flush began");

    m.forget_resync_pending(None);
    let next = m.begin_resync_settle();
    m.settle_resync(next);
    assert!(
        m.is_dirty(2 * MIB, MIB),
        "forgotten with its link: never settled"
    );

    // A chunk sent before a flush failed, acknowledged after it: that flush may have lost
    // it, so no later flush settles it.
    let sent = m.resync_ticket();
    let failed = m.begin_resync_settle();
    m.abandon_resync_settle(failed);
    m.resync_carried(6 * MIB, MIB, sent);
    let next = m.begin_resync_settle();
    m.settle_resync(next);
    assert!(m.is_dirty(6 * MIB, MIB), "in flight across a failed flush");

    // A chunk covering a granule in part settles none of it.
    m.resync_carried(4 * MIB + 4096, 64 * KIB, m.resync_ticket());
    let s = m.begin_resync_settle();
    m.settle_resync(s);
    assert!(m.is_dirty(4 * MIB, 128 * KIB));
}

/// A new generation and its UNCONFIRMED flag are one header write (a crash cannot land
/// between them), and a confirmation of an older generation leaves a newer one's flag set.
#[test]
fn an_unconfirmed_generation_is_one_header_write_and_only_its_own_confirmation_clears_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("u.meta");
    let m = MetadataFile::create(&path, 8 * MIB, "a", opts(8)).unwrap();
    let before = m.header().sequence;
    let g1 = m.start_new_generation_unconfirmed(true).unwrap();
    assert_eq!(m.header().sequence, before + 1, "one durable header write");
    assert!(m.flags().contains(Flags::UNCONFIRMED));
    assert_eq!(m.generations().current, g1);

    let g2 = m.start_new_generation_unconfirmed(true).unwrap();
    assert!(
        !m.confirm_generation(Some(g1)).unwrap(),
        "an older generation's confirmation"
    );
    assert!(
        m.flags().contains(Flags::UNCONFIRMED),
        "g2 was never confirmed"
    );
    assert!(m.confirm_generation(Some(g2)).unwrap());
    assert!(!m.flags().contains(Flags::UNCONFIRMED));

    m.start_new_generation_unconfirmed(false).unwrap();
    assert!(!m.flags().contains(Flags::UNCONFIRMED));
    drop(m);
    let m = MetadataFile::open(&path).unwrap();
    assert!(!m.flags().contains(Flags::UNCONFIRMED));
}
