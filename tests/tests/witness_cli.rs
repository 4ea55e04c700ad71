//! `nbdmirror witness --config FILE`, the real binary in a private network namespace: it
//! answers votes, keeps them across a restart, ignores a wrong secret, and refuses a listen
//! address that is not on the host with a clear error.

use std::fs;
use std::time::Duration;

use nbdmirror_tests::{CmdOutput, TestEnv};
use nix::sys::signal::Signal;

const SECRET: &str = "witness e2e secret 0123456789";

fn write_config(env: &TestEnv, name: &str, listen: &str, secret: &str) -> String {
    let path = env.path(name);
    fs::write(
        &path,
        format!(
            "listen = \"{listen}\"\nsecret = \"{secret}\"\nstate_file = \"state/witness.json\"\n"
        ),
    )
    .expect("write config");
    path.to_str().expect("UTF-8 path").to_string()
}

/// Asks the witness one question through the hidden `client` tool, inside the namespace.
fn ask(env: &TestEnv, config: &str, node: &str, op: &[&str]) -> CmdOutput {
    let mut args = vec!["witness", "--config", config, "client", "--node", node];
    args.extend_from_slice(op);
    env.run_nbdmirror(&args)
}

#[test]
fn witness_votes_survive_a_restart() {
    let env = TestEnv::new();
    fs::create_dir(env.path("state")).expect("mkdir state");
    let config = write_config(&env, "witness.toml", "127.0.0.1:7790", SECRET);
    let start = || env.start_server_raw(&["witness", "--config", &config], None, None);
    let mut server = start();

    let out = ask(&env, &config, "node-a", &["vote", "vm1", "1", "7"]);
    out.ok();
    assert!(
        out.stdout.contains(r#""granted":true"#) && out.stdout.contains(r#""holder":"node-a""#),
        "{out}"
    );
    let out = ask(&env, &config, "node-b", &["vote", "vm1", "1", "9"]);
    out.ok();
    assert!(
        out.stdout.contains(r#""granted":false"#) && out.stdout.contains(r#""holder":"node-a""#),
        "the round is node-a's: {out}"
    );
    let out = ask(&env, &config, "node-a", &["lease", "vm1", "1"]);
    assert!(out.ok().stdout.contains(r#""holder":true"#), "{out}");

    // A wrong secret gets no answer.
    let wrong = write_config(
        &env,
        "wrong.toml",
        "127.0.0.1:7790",
        "a different secret 0123",
    );
    let out = ask(
        &env,
        &wrong,
        "node-b",
        &["--timeout-ms", "300", "vote", "vm1", "2", "9"],
    );
    assert!(!out.success(), "{out}");
    assert!(out.stderr.contains("did not answer"), "{out}");

    // Restart (SIGTERM, clean exit): the vote is on disk and still binds.
    let (status, _) = server
        .stop(Signal::SIGTERM, Duration::from_secs(10))
        .expect("the witness exits on SIGTERM");
    assert!(status.success(), "exit status {status}");
    let state = fs::read_to_string(env.path("state/witness.json")).expect("state file");
    assert!(state.contains("node-a"), "{state}");
    let _server = start();
    let out = ask(&env, &config, "node-b", &["vote", "vm1", "1", "9"]);
    assert!(
        out.ok().stdout.contains(r#""granted":false"#),
        "vote forgotten: {out}"
    );
    let out = ask(&env, &config, "node-b", &["query", "vm1"]);
    assert!(
        out.ok().stdout.contains(r#""round":1"#) && out.stdout.contains(r#""holder":"node-a""#),
        "{out}"
    );
    // Round 2 goes to node-b only with node-a's data (generation 7) and once node-a's lease
    // lapsed (the restarted witness counts from its start).
    let out = ask(&env, &config, "node-b", &["vote", "vm1", "2", "9"]);
    assert!(
        out.ok().stdout.contains(r#""granted":false"#),
        "stale data: {out}"
    );
    std::thread::sleep(Duration::from_millis(3300));
    let out = ask(&env, &config, "node-b", &["vote", "vm1", "2", "7"]);
    assert!(out.ok().stdout.contains(r#""granted":true"#), "{out}");
}

#[test]
fn listen_address_not_on_this_host_is_refused() {
    let env = TestEnv::new();
    // Only lo exists in the test's namespace: 10.99.0.10 is not an address of this host.
    let config = write_config(&env, "witness.toml", "10.99.0.10:7790", SECRET);
    let out = env.run_nbdmirror(&["witness", "--config", &config]);
    assert!(!out.success(), "{out}");
    let err = out.stderr.trim_end();
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error:")
            && last.contains("10.99.0.10:7790")
            && last.contains("not an address of this host"),
        "{out}"
    );

    // A config mistake is one clear line too.
    let bad = env.path("bad.toml");
    fs::write(
        &bad,
        "listen = \"10.99.0.10\"\nsecret = \"short\"\nstate_file = \"s.json\"\n",
    )
    .expect("write");
    let out = env.run_nbdmirror(&["witness", "--config", bad.to_str().expect("UTF-8")]);
    assert!(!out.success(), "{out}");
    assert!(out.stderr.contains("expected IP:PORT"), "{out}");
}
