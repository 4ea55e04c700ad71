//! `nbdmirror bitmap inspect` on files made by the library: text, JSON, PNG, and errors.

use std::path::Path;
use std::process::{Command, Output};

use mirror::metadata::{MetadataFile, MetadataOptions};

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

fn inspect(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nbdmirror"))
        .args(["bitmap", "inspect"])
        .args(args)
        .output()
        .expect("run nbdmirror")
}

/// A 256 MiB volume: 1 MiB dirty at 0, 64 KiB at 100 MiB, the last granule; extent 10 hot
/// (a crash with a write in flight there is simulated by dropping without clean shutdown).
fn make(path: &Path) {
    let m = MetadataFile::create(path, 256 * MIB, "node-a", MetadataOptions::default()).unwrap();
    m.update_header(|h| h.peer_name = "node-b".into()).unwrap();
    m.start_new_generation().unwrap();
    assert!(m.mark_dirty(0, MIB).unwrap());
    assert!(m.mark_dirty(100 * MIB + 10, 100).unwrap());
    assert!(m.mark_dirty(256 * MIB - 1, 1).unwrap());
    // Never ended: the daemon "crashed" with this write in flight.
    let _in_flight = m.begin_write(40 * MIB, 4096).unwrap();
}

#[test]
fn text_json_and_png() {
    let dir = tempfile::tempdir().unwrap();
    let meta = dir.path().join("disk0.meta");
    make(&meta);
    let metas = meta.to_str().unwrap();

    let out = inspect(&[metas]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    for want in [
        "node-a (peer: node-b)",
        "256 MiB (268435456 bytes)",
        "64 KiB per dirty bit (4096 bits)",
        "18 of 4096 bits, 0.44%, 1.1 MiB (1179648 bytes)",
        "hot extents     1: 10",
        "dirty ranges    3",
        "open or crashed",
        "one column = 4 MiB",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    let map_line = text.lines().find(|l| l.starts_with("map")).unwrap();
    assert!(map_line.contains("░"), "{map_line}");

    let png = dir.path().join("map.png");
    let out = inspect(&[
        metas,
        "--json",
        "--png",
        png.to_str().unwrap(),
        "--max-ranges",
        "2",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["volume_size"], 256 * MIB);
    assert_eq!(j["dirty_granularity"], 64 * KIB);
    assert_eq!(j["activity_extent_size"], 4 * MIB);
    assert_eq!(j["dirty_bits"], 18);
    assert_eq!(j["total_bits"], 4096);
    assert_eq!(j["dirty_bytes"], MIB + 128 * KIB);
    assert!((j["dirty_percent"].as_f64().unwrap() - 0.439453125).abs() < 1e-9);
    assert_eq!(j["dirty_ranges_total"], 3);
    assert_eq!(
        j["dirty_ranges"],
        serde_json::json!([
            {"offset": 0, "length": MIB},
            {"offset": 100 * MIB, "length": 64 * KIB},
        ])
    );
    assert_eq!(j["hot_extents"], serde_json::json!([10]));
    assert_eq!(j["flags"]["consistent"], true);
    assert_eq!(j["flags"]["clean_shutdown"], false);
    assert_eq!(j["node_name"], "node-a");
    assert_eq!(j["peer_name"], "node-b");
    let current = j["generations"]["current"].as_str().unwrap();
    assert!(current.starts_with("0x") && current.len() == 18 && current != "0x0000000000000000");
    assert_eq!(j["generations"]["history"][0], "0x0000000000000000");
    assert_eq!(j["strip"]["columns"], 64);
    assert_eq!(j["strip"]["column_bytes"], 4 * MIB);
    assert_eq!(j["png"], png.to_str().unwrap());
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");

    // Inspecting changed nothing.
    let again = inspect(&[metas, "--json"]);
    let j2: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(j2["header_sequence"], j["header_sequence"]);
}

#[test]
fn corrupt_and_truncated_files_fail_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let meta = dir.path().join("disk0.meta");
    make(&meta);
    let bytes = std::fs::read(&meta).unwrap();

    let check = |contents: &[u8], want: &str| {
        let p = dir.path().join("bad.meta");
        std::fs::write(&p, contents).unwrap();
        let out = inspect(&[p.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with("error: metadata file "), "{err}");
        assert!(err.contains("bad.meta") && err.contains(want), "{err}");
        assert!(out.stdout.is_empty());
    };
    check(&bytes[..bytes.len() / 2], "truncated");
    check(&bytes[..100], "truncated");
    check(b"", "truncated");
    check(&vec![0xab; bytes.len()], "not an nbdmirror metadata file");
    let mut both = bytes.clone();
    both[500] ^= 1;
    both[4096 + 500] ^= 1;
    check(&both, "checksum");

    // Huge files (sparse: a wrong path to a disk image, a file grown by mistake) are refused
    // from their header, without reading them into memory (1 TiB would abort the tool).
    let huge = |head: &[u8]| {
        let p = dir.path().join("bad.meta");
        std::fs::write(&p, head).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(1 << 40)
            .unwrap();
        p
    };
    let out = inspect(&[huge(&bytes[..8192]).to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("the header says"), "{err}");
    let out = inspect(&[huge(b"").to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not an nbdmirror metadata file"), "{err}");
    std::fs::remove_file(dir.path().join("bad.meta")).unwrap();

    let out = inspect(&[dir.path().join("missing.meta").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("No such file"));
}
