//! QEMU's NBD client (qemu-img, qemu-io) against `nbdmirror export`.

use nbdmirror_tests::data::{assert_files_equal, read_file_range, write_pattern_file};
use nbdmirror_tests::{assert_qemu_io_ok, qemu_io, TestEnv};

const MIB: u64 = 1 << 20;

#[test]
fn qemu_img_info_shows_virtual_size_over_tcp_and_unix() {
    let env = TestEnv::new();
    let server = env.start_export("96M", &[]);
    for uri in [server.uri(), server.uri_unix(""), server.uri_tcp("disk")] {
        let out = env.run(&["qemu-img", "info", "--output=json", &uri]);
        out.ok();
        assert!(
            out.stdout.contains("\"virtual-size\": 100663296"),
            "qemu-img info {uri} should report 96 MiB: {out}"
        );
    }
}

#[test]
fn qemu_img_convert_into_export_compare_both_ways_and_convert_back() {
    let env = TestEnv::new();
    let size = 64 * MIB;
    let src = env.path("src.img");
    // A hole in the middle: convert must zero it on the target even though the target
    // holds other data there (-n: qemu-img may not assume a zeroed target).
    write_pattern_file(&src, size, 7, &[(8 * MIB, 4 * MIB)]);
    let server = env.start_export("64M", &[]);
    let uri = server.uri();
    assert_qemu_io_ok(&qemu_io(&env, &uri, &["write -P 0x5a 7M 6M"]));

    env.run(&[
        "qemu-img",
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        src.to_str().unwrap(),
        &uri,
    ])
    .ok();
    let src_s = src.to_str().unwrap();
    env.run(&["qemu-img", "compare", "-f", "raw", "-F", "raw", src_s, &uri])
        .ok();
    env.run(&["qemu-img", "compare", "-f", "raw", "-F", "raw", &uri, src_s])
        .ok();
    // Strict mode also compares allocation-independent content of the whole disk.
    env.run(&[
        "qemu-img", "compare", "-s", "-f", "raw", "-F", "raw", src_s, &uri,
    ])
    .ok();

    let out = env.path("out.img");
    env.run(&[
        "qemu-img",
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &uri,
        out.to_str().unwrap(),
    ])
    .ok();
    assert_files_equal(&src, &out);
    // The served image file itself holds the same bytes.
    assert_files_equal(&src, &env.path("disk.img"));

    // compare must notice a one-byte change (otherwise the checks above prove nothing).
    let byte = read_file_range(&src, 40 * MIB + 7, 1)[0];
    let cmd = format!("write -P {} {} 1", byte ^ 0xff, 40 * MIB + 7);
    assert_qemu_io_ok(&qemu_io(&env, &uri, &[&cmd]));
    let cmp = env.run(&["qemu-img", "compare", "-f", "raw", "-F", "raw", src_s, &uri]);
    assert_eq!(cmp.code, Some(1), "compare should report a mismatch: {cmp}");
    // qemu-img reports the start of the differing sector.
    assert!(
        cmp.stdout.contains("Content mismatch at offset 41943040"),
        "{cmp}"
    );
}

/// Patterned I/O at odd offsets and sizes, FUA, discard, write-zeroes (with and without
/// unmap), flush; then everything is read back on a fresh connection and from the file.
#[test]
fn qemu_io_odd_offsets_fua_discard_zeroes_and_fresh_connection() {
    let env = TestEnv::new();
    let server = env.start_export("64M", &[]);
    let uri = server.uri();
    let last = 64 * MIB - 1;
    let last_w = format!("write -P 0x22 {last} 1");
    let last_r = format!("read -P 0x22 {last} 1");
    let verify: Vec<String> = vec![
        "read -P 0 0 4097".into(),
        "read -P 0x11 4097 3000".into(),
        "read -P 0 7097 1000".into(),
        last_r.clone(),
        format!("read -P 0 {} 4096", last - 4096),
        "read -P 0x33 16M 32M".into(),
        "read -P 0x44 1M 64k".into(),
        "read -P 0 1088k 64k".into(),
        "read -P 0x55 2M 4096".into(),
        "read -P 0 2052k 8k".into(),
        "read -P 0x55 2060k 116k".into(),
        "read -P 0 3M 64k".into(),
        "read -P 0x77 4M 30001".into(),
        "read -P 0 4224305 333".into(),
        "read -P 0x77 4224638 39670".into(),
    ];
    let mut first: Vec<String> = vec![
        "write -P 0x11 4097 3000".into(),
        "read -P 0x11 4097 3000".into(),
        last_w,
        last_r,
        "write -P 0x33 16M 32M".into(),
        "read -P 0x33 16M 32M".into(),
        // FUA write, then discard it and check it reads back as zeroes.
        "write -f -P 0x99 1088k 64k".into(),
        "read -P 0x99 1088k 64k".into(),
        "discard 1088k 64k".into(),
        "write -f -P 0x44 1M 64k".into(),
        // Zeroes in the middle of data (no unmap: NO_HOLE).
        "write -P 0x55 2M 128k".into(),
        "write -z 2052k 8k".into(),
        // Zeroes with unmap over a whole written range.
        "write -P 0x66 3M 64k".into(),
        "write -z -u 3M 64k".into(),
        // Unaligned zeroes inside data.
        "write -P 0x77 4M 70004".into(),
        "write -z 4224305 333".into(),
        "flush".into(),
    ];
    first.extend(verify.iter().cloned());
    let first: Vec<&str> = first.iter().map(String::as_str).collect();
    assert_qemu_io_ok(&qemu_io(&env, &uri, &first));

    // A fresh connection (and a writeback-cache client, so nothing is FUA) sees it all.
    let verify_refs: Vec<&str> = verify.iter().map(String::as_str).collect();
    assert_qemu_io_ok(&qemu_io(&env, &uri, &verify_refs));
    let mut args = vec!["qemu-io", "-t", "writeback", "-f", "raw"];
    for c in &verify_refs {
        args.extend(["-c", c]);
    }
    args.push(&uri);
    assert_qemu_io_ok(&env.run(&args));

    // The bytes are at the right places of the image file itself.
    let img = env.path("disk.img");
    assert_eq!(read_file_range(&img, 4096, 3002), {
        let mut v = vec![0u8; 3002];
        v[1..3001].fill(0x11);
        v
    });
    assert_eq!(read_file_range(&img, last, 1), vec![0x22]);
    assert!(read_file_range(&img, 16 * MIB, 32 * MIB as usize)
        .iter()
        .all(|&b| b == 0x33));
    assert!(read_file_range(&img, 3 * MIB, 64 << 10)
        .iter()
        .all(|&b| b == 0));

    // The checker itself works: a wrong pattern is reported.
    let bad = qemu_io(&env, &uri, &["read -P 0x12 4097 3000"]);
    assert!(
        bad.all().contains("Pattern verification failed"),
        "qemu-io should detect a wrong pattern: {bad}"
    );
}

/// qemu 10 negotiates extended headers and base:allocation with this server, so the qemu
/// tests above exercise the extended-header paths; `qemu-img map` reads block status.
#[test]
fn qemu_uses_extended_headers_and_maps_allocation() {
    let env = TestEnv::new();
    let server = env.start_export("32M", &[]);
    let uri = server.uri();
    let out = env.run(&[
        "qemu-io",
        "-f",
        "raw",
        "--trace",
        "nbd_receive_option_reply",
        "--trace",
        "nbd_opt_meta_reply",
        "-c",
        "write -P 0x31 8M 1M",
        &uri,
    ]);
    assert_qemu_io_ok(&out);
    assert!(
        out.all()
            .contains("option reply 11 (extended headers), type 1 (ack)"),
        "qemu should negotiate extended headers: {out}"
    );
    assert!(out.all().contains("base:allocation"), "{out}");
    let map = env.run(&["qemu-img", "map", "--output=json", "-f", "raw", &uri]);
    map.ok();
    let lines: Vec<String> = map
        .stdout
        .lines()
        .filter(|l| l.contains("\"start\""))
        .map(|l| {
            let f = |k: &str| {
                let i = l.find(k).unwrap() + k.len();
                l[i..].split([',', '}']).next().unwrap().trim().to_string()
            };
            format!(
                "{}+{} data={} zero={}",
                f("\"start\":"),
                f("\"length\":"),
                f("\"data\":"),
                f("\"zero\":")
            )
        })
        .collect();
    assert_eq!(
        lines,
        vec![
            "0+8388608 data=false zero=true",
            "8388608+1048576 data=true zero=false",
            "9437184+24117248 data=false zero=true",
        ],
        "{map}"
    );
}
