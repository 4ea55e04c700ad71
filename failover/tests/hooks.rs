//! Group hooks run as real `/bin/sh -c` processes: environment, exit codes, timeouts that kill
//! the whole process group, bounded output capture.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use failover::hooks::{self, HookAction, HookEnv, HookExit, HookSpec, LINE_BYTES, TAIL_LINES};

fn env() -> HookEnv {
    HookEnv {
        group: "vm1".into(),
        node: "node-a".into(),
        volumes: vec![
            ("disk0".into(), "nbd://10.99.0.100:10809/disk0".into()),
            ("disk1".into(), "nbd://10.99.0.100:10809/disk1".into()),
        ],
        peer: None,
    }
}

fn spec(command: &str, timeout: Duration) -> HookSpec {
    HookSpec {
        command: command.to_string(),
        timeout,
    }
}

/// Whether a process is gone (or a zombie waiting for its new parent to reap it).
fn dead(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // "PID (comm) STATE ...": comm may hold spaces, the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
    }
}

fn read_pids(path: &Path) -> Vec<i32> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn wait_dead(pids: &[i32]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !pids.iter().all(|&p| dead(p)) {
        assert!(Instant::now() < deadline, "still alive: {pids:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn passes_the_environment() {
    let cmd = r#"echo "group=$NBDMIRROR_GROUP"; echo "node=$NBDMIRROR_NODE";
                 echo "action=$NBDMIRROR_ACTION"; echo "volumes=$NBDMIRROR_VOLUMES";
                 echo "peer=${NBDMIRROR_PEER-unset}""#;
    let out = hooks::run(
        &spec(cmd, Duration::from_secs(10)),
        HookAction::Start,
        &env(),
    )
    .await
    .expect("run");
    assert!(out.success(), "{out:?}");
    assert_eq!(out.action, HookAction::Start);
    assert_eq!(
        out.stdout_tail,
        vec![
            "group=vm1",
            "node=node-a",
            "action=start",
            "volumes=disk0=nbd://10.99.0.100:10809/disk0 disk1=nbd://10.99.0.100:10809/disk1",
            "peer=unset",
        ]
    );

    let mut fence_env = env();
    fence_env.peer = Some("node-b".into());
    let out = hooks::run(
        &spec(
            r#"echo "$NBDMIRROR_ACTION $NBDMIRROR_PEER""#,
            Duration::from_secs(10),
        ),
        HookAction::Fence,
        &fence_env,
    )
    .await
    .expect("run");
    assert_eq!(out.stdout_tail, vec!["fence node-b"]);
}

#[tokio::test]
async fn reports_exit_codes_signals_and_stderr() {
    let out = hooks::run(
        &spec("echo bad >&2; exit 3", Duration::from_secs(10)),
        HookAction::Monitor,
        &env(),
    )
    .await
    .expect("run");
    assert_eq!(out.exit, HookExit::Code(3));
    assert!(!out.success());
    assert_eq!(out.stderr_tail, vec!["bad"]);
    assert!(out.stdout_tail.is_empty());

    let out = hooks::run(
        &spec("kill -KILL $$", Duration::from_secs(10)),
        HookAction::Stop,
        &env(),
    )
    .await
    .expect("run");
    assert_eq!(out.exit, HookExit::Signal(9));

    let out = hooks::run(
        &spec("/nonexistent/hook", Duration::from_secs(10)),
        HookAction::Start,
        &env(),
    )
    .await
    .expect("sh runs, the command is missing");
    assert_eq!(out.exit, HookExit::Code(127));
    assert!(out.stderr_tail.join(" ").contains("/nonexistent/hook"));
}

#[tokio::test]
async fn timeout_kills_the_whole_process_group() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pids = dir.path().join("pids");
    // A child and a grandchild (a subshell's sleep), then the hook itself waits forever.
    let cmd = format!(
        "sleep 100 & echo $! >> {p}; (sleep 100 & echo $! >> {p}; wait) & echo $! >> {p}; echo started; sleep 100",
        p = pids.display()
    );
    let started = Instant::now();
    let out = hooks::run(
        &spec(&cmd, Duration::from_millis(500)),
        HookAction::Start,
        &env(),
    )
    .await
    .expect("run");
    assert_eq!(out.exit, HookExit::TimedOut);
    assert!(started.elapsed() < Duration::from_secs(5), "{out:?}");
    assert_eq!(out.stdout_tail, vec!["started"]);
    let pids = read_pids(&pids);
    assert_eq!(pids.len(), 3, "{pids:?}");
    wait_dead(&pids);
}

#[tokio::test]
async fn a_hook_that_ignores_sigterm_is_killed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pids = dir.path().join("pids");
    // Ignored signals are inherited: the sleep ignores SIGTERM too.
    let cmd = format!(
        "trap '' TERM; sleep 100 & echo $! > {p}; wait",
        p = pids.display()
    );
    let started = Instant::now();
    let out = hooks::run(
        &spec(&cmd, Duration::from_millis(300)),
        HookAction::Stop,
        &env(),
    )
    .await
    .expect("run");
    assert_eq!(out.exit, HookExit::TimedOut);
    let took = started.elapsed();
    assert!(
        took >= hooks::KILL_GRACE && took < hooks::KILL_GRACE + Duration::from_secs(3),
        "{took:?}"
    );
    wait_dead(&read_pids(&pids));
}

#[tokio::test]
async fn dropping_the_run_kills_the_hook() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pids = dir.path().join("pids");
    let cmd = format!("sleep 100 & echo $! > {p}; wait", p = pids.display());
    let hook = spec(&cmd, Duration::from_secs(60));
    let env = env();
    let run = hooks::run(&hook, HookAction::Start, &env);
    assert!(tokio::time::timeout(Duration::from_millis(300), run)
        .await
        .is_err());
    wait_dead(&read_pids(&pids));
}

#[tokio::test]
async fn output_capture_is_bounded() {
    let cmd = "seq 1 100000; head -c 1000000 /dev/zero | tr '\\0' x; echo; seq 1 5 >&2";
    let out = hooks::run(
        &spec(cmd, Duration::from_secs(20)),
        HookAction::Monitor,
        &env(),
    )
    .await
    .expect("run");
    assert!(out.success(), "{:?}", out.exit);
    assert_eq!(out.stdout_tail.len(), TAIL_LINES);
    assert_eq!(out.stdout_tail[TAIL_LINES - 2], "100000");
    let long = &out.stdout_tail[TAIL_LINES - 1];
    assert!(
        long.starts_with("xxxx") && long.ends_with("[...]"),
        "{long}"
    );
    assert!(long.len() < LINE_BYTES + 16, "{}", long.len());
    assert_eq!(out.stderr_tail, vec!["1", "2", "3", "4", "5"]);
}

#[tokio::test]
async fn a_background_process_holding_the_output_does_not_block() {
    // Like a hook that starts a daemon without redirecting its output.
    let started = Instant::now();
    let out = hooks::run(
        &spec("sleep 3 & echo launched", Duration::from_secs(10)),
        HookAction::Start,
        &env(),
    )
    .await
    .expect("run");
    assert!(out.success());
    assert_eq!(
        out.stdout_tail.first().map(String::as_str),
        Some("launched")
    );
    assert!(
        out.stdout_tail
            .last()
            .is_some_and(|l| l.contains("still open")),
        "{out:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2), "{out:?}");
}

#[tokio::test]
async fn invalid_volume_names_are_refused_before_running() {
    let mut bad = env();
    bad.volumes.push(("my disk".into(), "nbd://x/y".into()));
    let err = hooks::run(
        &spec("echo never", Duration::from_secs(10)),
        HookAction::Start,
        &bad,
    )
    .await
    .expect_err("invalid volume");
    assert!(err.to_string().contains("my disk"), "{err}");
}
