//! The README's main job: `examples/local-pair/run.sh` brings up the two-node pair on one
//! machine with node-a primary and its export answering; data written there is on node-b;
//! a daemon killed with -9 is restarted by the script and resyncs while the other keeps
//! serving; SIGTERM stops both daemons cleanly.

use std::path::Path;
use std::time::Duration;

use nbdmirror_tests::data::assert_files_equal;
use nbdmirror_tests::{assert_qemu_io_ok, poll, qemu_io, TestEnv};

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

#[test]
fn the_local_pair_script_brings_up_a_mirrored_export() {
    let env = TestEnv::new();
    // A private copy of the example folder: the script keeps its state next to the configs.
    let dir = env.path("local-pair");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["run.sh", "node-a.toml", "node-b.toml"] {
        std::fs::copy(repo_root().join("examples/local-pair").join(f), dir.join(f)).unwrap();
    }
    let out = env.path("run.out");
    let script = format!(
        "NBDMIRROR={} exec bash {} > {} 2>&1",
        env.bin().display(),
        dir.join("run.sh").display(),
        out.display()
    );
    let mut pair = env.spawn(&["bash", "-c", &script]);
    let log = || std::fs::read_to_string(&out).unwrap_or_default();
    poll("the pair to be ready", Duration::from_secs(60), || {
        assert!(pair.is_running(), "run.sh exited early:\n{}", log());
        log()
            .contains("ready: nbd://127.0.0.1:10809/disk0")
            .then_some(())
    });
    let uri = "nbd://127.0.0.1:10809/disk0";
    assert_qemu_io_ok(&qemu_io(
        &env,
        uri,
        &["write -P 0x5a 1M 3M", "write -P 0xa5 200M 64k", "flush"],
    ));
    assert_qemu_io_ok(&qemu_io(&env, uri, &["read -P 0x5a 1M 3M"]));
    // node-b is secondary: its export address is closed.
    let b = env.run(&["qemu-img", "info", "nbd://127.0.0.1:10810/disk0"]);
    assert!(!b.success(), "node-b must not export while secondary: {b}");

    // kill -9 node-b: node-a keeps serving, the script restarts node-b, which resyncs.
    let pid_b: i32 = std::fs::read_to_string(dir.join("state/node-b.pid"))
        .expect("run.sh writes state/node-b.pid")
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid_b),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert_qemu_io_ok(&qemu_io(&env, uri, &["write -P 0x3c 100M 2M", "flush"]));
    let cfg_a = dir.join("node-a.toml");
    poll(
        "node-b restarted and in sync again",
        Duration::from_secs(60),
        || {
            assert!(
                pair.is_running(),
                "run.sh exited after a daemon died:
{}",
                log()
            );
            let out = env.run_nbdmirror(&["status", "--json", "--config", cfg_a.to_str().unwrap()]);
            let st: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
            let v = &st["volumes"][0];
            (v["sync"] == "in-sync"
                && v["peer"] == "connected"
                && v["resync_bytes_sent"].as_u64()? > 0)
                .then_some(())
        },
    );
    assert!(log().contains("Restarting node-b"), "{}", log());

    // SIGTERM to the script stops both daemons cleanly (then the images can be compared).
    let pid = nix::unistd::Pid::from_raw(pair.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let (res, finished) = pair.wait_or_kill(Duration::from_secs(30));
    assert!(
        finished,
        "run.sh did not stop on SIGTERM:\n{}\n{res}",
        log()
    );
    for node in ["node-a", "node-b"] {
        let l = std::fs::read_to_string(dir.join(format!("state/{node}.log"))).unwrap();
        assert!(
            l.contains("stopped cleanly"),
            "{node} did not stop cleanly:\n{l}"
        );
    }
    assert_files_equal(
        &dir.join("state/node-a/disk0.img"),
        &dir.join("state/node-b/disk0.img"),
    );
}
