//! fio's nbd engine (libnbd, many requests in flight) with data verification.

use nbdmirror_tests::{CmdOutput, TestEnv};

/// Panics unless fio exited 0 and reported no verification or I/O error.
#[track_caller]
fn assert_fio_ok(out: &CmdOutput) {
    assert!(out.success(), "fio failed: {out}");
    let all = out.all();
    for line in all.lines() {
        assert!(
            !line.contains("verify:"),
            "fio verification error `{line}`: {out}"
        );
        if let Some(rest) = line.split("err=").nth(1) {
            assert!(
                rest.trim_start().starts_with("0"),
                "fio reported an error `{line}`: {out}"
            );
        }
    }
    assert!(all.contains("err= 0"), "no fio job summary: {out}");
}

fn fio(env: &TestEnv, uri: &str, args: &[&str]) -> CmdOutput {
    let uri_arg = format!("--uri={uri}");
    // --thread: jobs are threads of one process, so a timeout or kill leaves no orphan.
    let mut full = vec![
        "fio",
        "--thread",
        "--ioengine=nbd",
        &uri_arg,
        "--output-format=normal",
        // No verify-state file in the working directory (the source tree under cargo test).
        "--verify_state_save=0",
    ];
    full.extend_from_slice(args);
    env.run(&full)
}

#[test]
fn fio_random_writes_iodepth_32_verify() {
    for engine in ["auto", "sync"] {
        random_writes_verify(engine);
    }
}

fn random_writes_verify(engine: &str) {
    let env = TestEnv::new();
    let server = env.start_export("64M", &["--io-engine", engine]);
    let job = [
        "--name=v",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        "--size=32m",
        "--verify=crc32c",
        "--do_verify=1",
    ];
    let out = fio(&env, &server.uri(), &job);
    assert_fio_ok(&out);
    assert!(
        out.stdout.contains("READ:"),
        "the verify phase should read: {out}"
    );
    // A fresh connection verifies the same data again (same random sequence).
    let mut again = job.to_vec();
    again.push("--verify_only");
    assert_fio_ok(&fio(&env, &server.uri(), &again));
}

/// Four jobs = four connections writing disjoint 32 MiB regions concurrently, then verified
/// by four new connections.
#[test]
fn fio_four_connections_disjoint_regions_verify() {
    let env = TestEnv::new();
    let server = env.start_export("128M", &[]);
    let uri = server.uri_unix("");
    let job = [
        "--name=m",
        "--rw=randwrite",
        "--bsrange=512-64k",
        "--bs_unaligned=1",
        "--iodepth=16",
        "--numjobs=4",
        "--size=32m",
        "--offset_increment=32m",
        "--verify=crc32c",
        "--do_verify=1",
    ];
    let out = fio(&env, &uri, &job);
    assert_fio_ok(&out);
    let mut again = job.to_vec();
    again.push("--verify_only");
    assert_fio_ok(&fio(&env, &uri, &again));
    // Every region was written: no hole is left.
    let map = env.run(&["nbdinfo", "--map", &server.uri()]);
    map.ok();
    assert_eq!(
        map.stdout.split_whitespace().take(4).collect::<Vec<_>>(),
        vec!["0", "134217728", "0", "data"],
        "the four jobs should have covered the whole export: {map}"
    );
}
