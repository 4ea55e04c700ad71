//! Property tests of the metadata's pure parts: the bit math against a `BTreeSet` model, the
//! hot set's invariants, the header codec's round trip, and the file parser on arbitrary bytes
//! (the same function the `cargo fuzz` target drives, so CI covers it without nightly).

use std::collections::BTreeSet;

use mirror::metadata::bitmap::{bits_to_bytes, covered_bits, covering_bits};
use mirror::metadata::header::{Counters, Flags, Generations, Header, SLOT_SIZE};
use mirror::metadata::{fuzz_parse, parse, ActivityLog, FormatError, HeaderError, OwnedBits};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum BitOp {
    Set(u64, u64),
    Clear(u64, u64),
}

fn bit_op(n: u64) -> impl Strategy<Value = BitOp> {
    let range = (0..n + 10, 0..n + 10).prop_map(|(a, b)| (a.min(b), a.max(b)));
    prop_oneof![
        range.clone().prop_map(|(a, b)| BitOp::Set(a, b)),
        range.prop_map(|(a, b)| BitOp::Clear(a, b)),
    ]
}

fn model_runs(model: &BTreeSet<u64>) -> Vec<std::ops::Range<u64>> {
    let mut runs: Vec<std::ops::Range<u64>> = Vec::new();
    for &i in model {
        match runs.last_mut() {
            Some(r) if r.end == i => r.end += 1,
            _ => runs.push(i..i + 1),
        }
    }
    runs
}

proptest! {
    #[test]
    fn bitmap_matches_model(n in 1u64..300, ops in proptest::collection::vec(bit_op(300), 0..40)) {
        let owned = OwnedBits::new(n);
        let bits = owned.bits();
        let mut model = BTreeSet::new();
        for op in ops {
            match op {
                BitOp::Set(a, b) => {
                    let before = model.len();
                    model.extend(a.min(n)..b.min(n));
                    prop_assert_eq!(bits.set_range(a..b), model.len() != before);
                }
                BitOp::Clear(a, b) => {
                    let gone = (a.min(n)..b.min(n)).filter(|i| model.remove(i)).count() as u64;
                    prop_assert_eq!(bits.clear_range(a..b), gone);
                }
            }
            prop_assert_eq!(bits.count(), model.len() as u64);
        }
        prop_assert_eq!(bits.runs().collect::<Vec<_>>(), model_runs(&model));
        for i in 0..n {
            prop_assert_eq!(bits.test(i), model.contains(&i));
        }
        let (a, b) = (n / 3, n - n / 4);
        prop_assert_eq!(bits.any_set(a..b), model.range(a..b).next().is_some());
        prop_assert_eq!(bits.all_set(a..b), (a..b).all(|i| model.contains(&i)));
        prop_assert_eq!(bits.count_range(a..b), model.range(a..b).count() as u64);
    }

    #[test]
    fn byte_ranges_cover_and_are_covered(
        g_shift in 12u32..17, granules in 1u64..50, tail in 0u64..4096,
        offset in 0u64..(60 << 16), len in 0u64..(20 << 16),
    ) {
        let g = 1u64 << g_shift;
        let vol = granules * g + tail;
        let covering = covering_bits(offset, len, g, vol);
        let covered = covered_bits(offset, len, g, vol);
        let end = (offset + len).min(vol);
        if offset < end {
            // Every byte written lies in a covering granule.
            let bytes = bits_to_bytes(covering.clone(), g, vol);
            prop_assert!(bytes.start <= offset && bytes.end >= end);
            // Covered granules lie entirely inside the range.
            if !covered.is_empty() {
                let bytes = bits_to_bytes(covered.clone(), g, vol);
                prop_assert!(bytes.start >= offset && bytes.end <= end);
                prop_assert!(covered.start >= covering.start && covered.end <= covering.end);
            }
        } else {
            prop_assert!(covering.is_empty() && covered.is_empty());
        }
    }

    #[test]
    fn hot_set_respects_capacity_and_busy_extents(
        cap in 1usize..6,
        ops in proptest::collection::vec((any::<bool>(), 0u64..12, 0u64..3), 0..80),
    ) {
        let mut log = ActivityLog::new(cap);
        let mut busy: Vec<std::ops::RangeInclusive<u64>> = Vec::new();
        for (begin, first, span) in ops {
            let evicted = if begin || busy.is_empty() {
                let r = first..=first + span;
                let b = log.begin(r.clone());
                for e in &b.became_hot {
                    prop_assert!(r.contains(e));
                }
                busy.push(r);
                b.evicted
            } else {
                let r = busy.remove((first as usize) % busy.len());
                log.end(r)
            };
            for e in evicted {
                prop_assert!(!busy.iter().any(|r| r.contains(&e)), "busy extent {} evicted", e);
                prop_assert!(!log.is_hot(e));
            }
            for r in &busy {
                for e in r.clone() {
                    prop_assert!(log.is_hot(e));
                }
            }
            let busy_extents: BTreeSet<u64> = busy.iter().flat_map(|r| r.clone()).collect();
            prop_assert!(log.len() <= cap.max(busy_extents.len()));
        }
    }

    #[test]
    fn header_round_trips(
        seq in any::<u64>(), size in 1u64..(1 << 44), g_shift in 12u32..21, e_extra in 0u32..6,
        cap in 1u32..5000, flags in 0u32..32, gens in any::<[u64; 6]>(),
        counters in any::<[u64; 3]>(), node in "[a-z0-9-]{1,63}", peer in "[a-z0-9-]{0,63}",
        boot_id in any::<[u8; 16]>(),
    ) {
        let h = Header {
            sequence: seq,
            volume_size: size,
            dirty_granularity: 1 << g_shift,
            activity_extent_size: 1 << (g_shift + e_extra),
            activity_capacity: cap,
            flags: Flags::from_bits(flags).unwrap(),
            generations: Generations {
                current: gens[0],
                sync: gens[1],
                history: [gens[2], gens[3], gens[4], gens[5]],
            },
            counters: Counters { created_unix: counters[0], opens: counters[1], unclean_opens: counters[2] },
            node_name: node,
            peer_name: peer,
            boot_id,
        };
        let bytes = h.encode().unwrap();
        prop_assert_eq!(Header::decode(&bytes).unwrap(), h);
    }

    #[test]
    fn any_bit_flip_in_a_slot_is_detected(at in 0usize..SLOT_SIZE, bit in 0u32..8) {
        let bytes = sample_file();
        let mut one = bytes[..SLOT_SIZE].to_vec();
        one[at] ^= 1 << bit;
        let e = Header::decode(&one).unwrap_err();
        let bad_magic_or_crc = matches!(e, HeaderError::BadMagic { .. } | HeaderError::BadChecksum { .. });
        prop_assert!(bad_magic_or_crc, "{e}");
        // In the file, the other copy takes over.
        let mut file = bytes.clone();
        file[at] ^= 1 << bit;
        let snap = parse(&file).unwrap();
        prop_assert_eq!(snap.active_slot, 1);
        prop_assert!(snap.standby_error.is_some());
    }

    #[test]
    fn parse_never_panics_on_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..20000)) {
        let _ = fuzz_parse(&data);
        let mut over_template = vec![3u8];
        over_template.extend(data.iter().take(300));
        let _ = fuzz_parse(&over_template);
    }

    #[test]
    fn parse_never_panics_on_mutated_files(
        edits in proptest::collection::vec((0usize..16384, any::<u8>()), 1..20),
        cut in proptest::option::of(0usize..16384),
    ) {
        let mut file = sample_file();
        for (at, v) in edits {
            file[at] = v;
        }
        if let Some(cut) = cut {
            file.truncate(cut);
        }
        // Mode byte 1: checksums fixed up, so the edits reach field validation.
        let mut input = vec![1u8];
        input.extend_from_slice(&file);
        let _ = fuzz_parse(&input);
        input[0] = 0;
        let _ = fuzz_parse(&input);
    }
}

/// A valid 256 MiB-volume file: both slots, a few dirty bits, one hot extent.
fn sample_file() -> Vec<u8> {
    let mut h = Header {
        sequence: 0,
        volume_size: 256 << 20,
        dirty_granularity: 64 << 10,
        activity_extent_size: 4 << 20,
        activity_capacity: 64,
        flags: Flags::CONSISTENT,
        generations: Generations::default(),
        counters: Counters::default(),
        node_name: "a".into(),
        peer_name: String::new(),
        boot_id: [0; 16],
    };
    let layout = h.layout().unwrap();
    let mut file = vec![0u8; layout.file_len as usize];
    file[..SLOT_SIZE].copy_from_slice(&h.encode().unwrap());
    h.sequence = 1;
    file[SLOT_SIZE..2 * SLOT_SIZE].copy_from_slice(&h.encode().unwrap());
    file[layout.dirty_offset as usize] = 0b0110;
    file[layout.activity_offset as usize] = 1;
    file
}

#[test]
fn fuzz_parse_reaches_the_maps() {
    let mut input = vec![1u8];
    input.extend_from_slice(&sample_file());
    assert_eq!(fuzz_parse(&input), Some(1));
    // Corrupt a field with the checksum fixed up: rejected by validation, not by the CRC.
    input[1 + SLOT_SIZE + 33] = 0x03; // the newest slot's granularity: not a power of two
    assert_eq!(fuzz_parse(&input), None);
    // Mode 2: edits over the built-in valid file.
    assert_eq!(fuzz_parse(&[2]), Some(1));
    assert_eq!(
        fuzz_parse(&[2, 0xff]),
        Some(1),
        "slot 0 torn: slot 1 takes over"
    );
}

#[test]
fn sample_file_parses_and_errors_are_typed() {
    let file = sample_file();
    let snap = parse(&file).unwrap();
    assert_eq!(snap.active_slot, 1);
    assert_eq!(snap.header.sequence, 1);
    assert_eq!(
        snap.dirty_ranges().collect::<Vec<_>>(),
        vec![(64 << 10, 128 << 10)]
    );
    assert_eq!(snap.activity.bits().count(), 1);

    let e = parse(&file[..10000]).err().unwrap();
    assert_eq!(
        e,
        FormatError::Truncated {
            expected: 16384,
            actual: 10000
        }
    );
    assert!(e.to_string().contains("truncated"), "{e}");
    let mut long = file.clone();
    long.push(0);
    assert!(matches!(parse(&long), Err(FormatError::TooLong { .. })));
    let e = parse(b"hello world").err().unwrap();
    assert!(e.to_string().contains("header truncated"), "{e}");
    let e = parse(&vec![7u8; 16384]).err().unwrap();
    assert!(
        e.to_string().contains("not an nbdmirror metadata file"),
        "{e}"
    );
    let mut both = file.clone();
    both[100] ^= 1;
    both[SLOT_SIZE + 100] ^= 1;
    let e = parse(&both).err().unwrap();
    assert!(matches!(e, FormatError::BothSlots { .. }), "{e}");
    assert!(e.to_string().contains("checksum"), "{e}");
}
