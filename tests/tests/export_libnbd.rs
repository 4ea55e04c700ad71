//! libnbd clients (nbdinfo, nbdcopy, nbdsh) against `nbdmirror export`.

use nbdmirror_tests::data::{assert_files_equal, write_pattern_file};
use nbdmirror_tests::{assert_qemu_io_ok, nbdsh, qemu_io, TestEnv};

const MIB: u64 = 1 << 20;

#[test]
fn nbdinfo_size_and_capabilities() {
    let env = TestEnv::new();
    let server = env.start_export("48M", &[]);
    let uri = server.uri();
    let out = env.run(&["nbdinfo", "--size", &uri]);
    out.ok();
    assert_eq!(out.stdout.trim(), (48 * MIB).to_string(), "{out}");
    // nbdinfo --can/--is: exit 0 = true, 2 = false, anything else = error.
    for cap in [
        "fua",
        "flush",
        "trim",
        "zero",
        "multi-conn",
        "cache",
        "fast-zero",
        "df",
    ] {
        let out = env.run(&["nbdinfo", "--can", cap, &uri]);
        assert_eq!(out.code, Some(0), "export should support {cap}: {out}");
    }
    let out = env.run(&["nbdinfo", "--is", "read-only", &uri]);
    assert_eq!(out.code, Some(2), "export should be writable: {out}");
    let out = env.run(&["nbdinfo", "--json", &uri]);
    out.ok();
    assert!(out.stdout.contains("\"base:allocation\""), "{out}");
    assert!(
        out.stdout.contains("\"block_size_maximum\": 33554432"),
        "{out}"
    );
}

#[test]
fn nbdinfo_read_only_export_capabilities() {
    let env = TestEnv::new();
    let img = env.path("ro.img");
    write_pattern_file(&img, 16 * MIB, 3, &[]);
    let img_s = img.to_str().unwrap();
    let server = env.start_server(&["--image", img_s, "--read-only"]);
    let uri = server.uri();
    let out = env.run(&["nbdinfo", "--is", "read-only", &uri]);
    assert_eq!(out.code, Some(0), "export should be read-only: {out}");
    for cap in ["trim", "zero", "fast-zero"] {
        let out = env.run(&["nbdinfo", "--can", cap, &uri]);
        assert_eq!(
            out.code,
            Some(2),
            "read-only export must not offer {cap}: {out}"
        );
    }
    for cap in ["flush", "multi-conn"] {
        let out = env.run(&["nbdinfo", "--can", cap, &uri]);
        assert_eq!(
            out.code,
            Some(0),
            "read-only export may still offer {cap}: {out}"
        );
    }
    // Reads work, writes are refused.
    let out = env.run(&["qemu-io", "-r", "-f", "raw", "-c", "read 0 1M", &uri]);
    assert_qemu_io_ok(&out);
    let out = nbdsh(&env, &[], &uri, "h.pwrite(b'x' * 512, 0)");
    assert!(
        !out.success(),
        "a write on a read-only export must fail: {out}"
    );
    assert!(
        out.stderr.contains("EPERM") || out.stderr.contains("Operation not permitted"),
        "expected EPERM: {out}"
    );
}

#[test]
fn nbdinfo_list_shows_export_name_and_description() {
    let env = TestEnv::new();
    let img = env.path("vm-disk-7.img");
    let img_s = img.to_str().unwrap();
    let server = env.start_server(&["--image", img_s, "--create", "8M"]);
    let out = env.run(&["nbdinfo", "--list", &server.uri()]);
    out.ok();
    assert!(
        out.stdout.contains("export=\"vm-disk-7\""),
        "the export name (image stem) should be listed: {out}"
    );
    assert!(out.stdout.contains("export-size: 8388608"), "{out}");
    let server2_env = TestEnv::new();
    let img2 = server2_env.path("x.img");
    let s2 = server2_env.start_server(&[
        "--image",
        img2.to_str().unwrap(),
        "--create",
        "8M",
        "--name",
        "named-export",
    ]);
    let out = server2_env.run(&["nbdinfo", "--list", &s2.uri_unix("")]);
    out.ok();
    assert!(out.stdout.contains("export=\"named-export\""), "{out}");
}

/// Parses `nbdinfo --map` output into (offset, length, type) rows.
fn map(env: &TestEnv, uri: &str) -> Vec<(u64, u64, u32)> {
    let out = env.run(&["nbdinfo", "--map", uri]);
    out.ok();
    out.stdout
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert!(f.len() >= 3, "odd map line {l:?}: {out}");
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect()
}

#[test]
fn nbdinfo_map_reports_holes_then_data_then_holes_again() {
    let env = TestEnv::new();
    let server = env.start_export("64M", &[]);
    let uri = server.uri();
    assert_eq!(
        map(&env, &uri),
        vec![(0, 64 * MIB, 3)],
        "fresh sparse image"
    );
    let out = env.run(&["nbdinfo", "--map", &uri]);
    assert!(out.stdout.contains("hole,zero"), "{out}");

    assert_qemu_io_ok(&qemu_io(&env, &uri, &["write -P 0xa5 1M 64k"]));
    assert_eq!(
        map(&env, &uri),
        vec![
            (0, MIB, 3),
            (MIB, 64 << 10, 0),
            (MIB + (64 << 10), 64 * MIB - MIB - (64 << 10), 3)
        ],
        "after a 64 KiB write at 1 MiB"
    );
    let out = env.run(&["nbdinfo", "--map", &uri]);
    assert!(out.stdout.contains("   0  data"), "{out}");

    // Discard punches the hole again; nbdinfo --map --totals agrees.
    assert_qemu_io_ok(&qemu_io(&env, &uri, &["discard 1M 64k"]));
    assert_eq!(map(&env, &uri), vec![(0, 64 * MIB, 3)], "after discard");
}

/// nbdcopy with 4 connections into the export and back out; a hole in the source must
/// overwrite data already on the export with zeroes.
#[test]
fn nbdcopy_four_connections_in_and_out() {
    let env = TestEnv::new();
    let size = 128 * MIB;
    let a = env.path("a.img");
    let b = env.path("b.img");
    write_pattern_file(
        &a,
        size,
        11,
        &[(40 * MIB, 24 * MIB), (100 * MIB + 4096, 8192)],
    );
    write_pattern_file(&b, size, 12, &[]);
    let server = env.start_export("128M", &[]);
    let uri = server.uri();
    for src in [&b, &a] {
        env.run(&[
            "nbdcopy",
            "--connections=4",
            "--requests=16",
            "--flush",
            src.to_str().unwrap(),
            &uri,
        ])
        .ok();
    }
    let out = env.path("out.img");
    env.run(&[
        "nbdcopy",
        "--connections=4",
        &server.uri_unix(""),
        out.to_str().unwrap(),
    ])
    .ok();
    assert_files_equal(&a, &out);
    assert_files_equal(&a, &env.path("disk.img"));
}

/// Every command through libnbd's synchronous and asynchronous API in Debian's nbdsh.
#[test]
fn nbdsh_commands_and_many_requests_in_flight() {
    let env = TestEnv::new();
    let server = env.start_export("32M", &[]);
    let script = r#"
import os
assert h.get_size() == 32 * 1024 * 1024
buf = bytes((i * 7 + 3) % 251 for i in range(1 << 20))
h.pwrite(buf, 12345)
assert h.pread(len(buf), 12345) == buf
h.pwrite(b'F' * 4096, 0, nbd.CMD_FLAG_FUA)
assert h.pread(4096, 0) == b'F' * 4096
h.flush()
h.zero(1000, 12345 + 10)
assert h.pread(1000, 12345 + 10) == bytes(1000)
h.zero(65536, 2 * 1024 * 1024, nbd.CMD_FLAG_NO_HOLE)
h.trim(4096, 0)
assert h.pread(4096, 0) == bytes(4096)
h.cache(1 << 20, 0)
# DF read: exactly one data chunk.
chunks = []
def chunk(sub, off, status, err):
    chunks.append((off, len(sub), status))
    return 0
assert h.pread_structured(65536, 12345 + 131072, chunk, nbd.CMD_FLAG_DF) == buf[131072:196608]
assert chunks == [(12345 + 131072, 65536, nbd.READ_DATA)], chunks
# Fast zero: succeeds (hole punching) or fails with ENOTSUP, never with another error.
try:
    h.zero(65536, 8 * 1024 * 1024, nbd.CMD_FLAG_FAST_ZERO)
except nbd.Error as e:
    assert e.errnum == errno.ENOTSUP, e
# Block status with REQ_ONE gives exactly one extent within the request.
seen = []
def f(meta, off, ents, err):
    seen.append((meta, off, list(ents)))
h.block_status(4096, 20 * 1024 * 1024, f, nbd.CMD_FLAG_REQ_ONE)
assert len(seen) == 1 and seen[0][0] == "base:allocation" and seen[0][1] == 20 * 1024 * 1024, seen
assert len(seen[0][2]) == 2 and 0 < seen[0][2][0] <= 4096 and seen[0][2][1] == 3, seen
# 128 asynchronous requests in flight, completed in any order.
N = 128
bufs = []
for i in range(N):
    b = nbd.Buffer.from_bytearray(bytearray([i]) * 4096)
    bufs.append(b)
    h.aio_pwrite(b, 16 * 1024 * 1024 + i * 4096)
while h.aio_in_flight() > 0:
    h.poll(-1)
rbufs = []
for i in range(N):
    b = nbd.Buffer(4096)
    rbufs.append(b)
    h.aio_pread(b, 16 * 1024 * 1024 + i * 4096)
while h.aio_in_flight() > 0:
    h.poll(-1)
for i in range(N):
    assert rbufs[i].to_bytearray() == bytearray([i]) * 4096, i
# Out-of-range requests are refused and the connection stays usable.
try:
    h.pread(4096, 32 * 1024 * 1024 - 100)
    raise Exception('read past the end succeeded')
except nbd.Error as e:
    assert e.errnum == errno.EINVAL, e
assert h.pread(4096, 0) == bytes(4096)
h.shutdown()
print('nbdsh-ok')
"#;
    let script = format!("import errno\n{script}");
    let out = nbdsh(&env, &["--base-allocation"], &server.uri(), &script);
    out.ok();
    assert!(out.stdout.contains("nbdsh-ok"), "{out}");
}
