//! Two `nbdmirror serve` daemons, node-a and node-b, in one private network namespace: the
//! harness of the mirror tests (`tests/tests/mirror_*.rs`).
//!
//! The layout follows `examples/local-pair`: node-a replicates on 127.0.0.1:7801 and exports
//! its volume on 127.0.0.1:10809 while primary, node-b on 7802 and 10810. Each node has its
//! own config file and data directory in the test's scratch directory. Every daemon's stderr
//! goes to a log file of its own (one per start), and all of them are printed when the test
//! fails, with both nodes' last `status --json`.
//!
//! The daemons are driven only through the command line of the contract
//! (`serve`, `status --json`, `promote`, `demote`, `resolve`, `verify`) and real NBD clients;
//! every wait is bounded in time and in number of tries.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use crate::{wait_with_deadline, CmdOutput, TestEnv};

/// The shared secret of the pair (the contract wants at least 16 characters).
pub const SECRET: &str = "pair-test-secret-0123456789abcdef";
/// The volume every pair has.
pub const VOLUME: &str = "disk0";
pub const MIB: u64 = 1 << 20;
/// How long a daemon may take until its control socket answers `status`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a clean shutdown (SIGTERM) may take.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Default bound of a wait for a state (connection, in-sync...).
pub const STATE_TIMEOUT: Duration = Duration::from_secs(60);
/// Deadline of one `nbdmirror` CLI command.
const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// Interval between two `status` polls.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Every key the contract puts in each element of `status --json`'s `volumes`.
pub const STATUS_VOLUME_KEYS: &[&str] = &[
    "name",
    "role",
    "peer",
    "sync",
    "dirty_bytes",
    "resync_bytes_sent",
    "resync_bytes_received",
    "resync_bytes_left",
    "resync_eta_seconds",
    "generation",
    "metadata",
    "consistent",
    "reason",
];

/// One of the two nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Node {
    A,
    B,
}

pub use Node::{A, B};

impl Node {
    pub fn name(self) -> &'static str {
        match self {
            A => "node-a",
            B => "node-b",
        }
    }

    pub fn other(self) -> Node {
        match self {
            A => B,
            B => A,
        }
    }

    /// `replication_listen` of this node.
    pub fn replication_addr(self) -> &'static str {
        match self {
            A => "127.0.0.1:7801",
            B => "127.0.0.1:7802",
        }
    }

    /// The NBD listen address of this node's volume (open only while primary).
    pub fn export_addr(self) -> &'static str {
        match self {
            A => "127.0.0.1:10809",
            B => "127.0.0.1:10810",
        }
    }

    fn idx(self) -> usize {
        match self {
            A => 0,
            B => 1,
        }
    }
}

/// How to build a pair.
#[derive(Clone, Debug)]
pub struct PairOptions {
    /// Volume size as the config takes it ("64M").
    pub size: String,
    /// Extra top-level TOML lines for both configs (e.g. `resync_rate = "2M"`).
    pub extra: String,
    /// `--log-level` of the daemons.
    pub log_level: String,
    /// Route the replication link through a [`LinkProxy`] of the test (node-a's `peer`
    /// becomes the proxy's address), so the link can be cut with both daemons running.
    pub proxy: bool,
    /// A second volume [`VOLUME2`] of the same size, exported on node-a at
    /// 127.0.0.1:10819 and on node-b at 127.0.0.1:10820.
    pub second_volume: bool,
    /// `replication_listen = "0.0.0.0:PORT"` instead of 127.0.0.1 (the peer addresses stay
    /// 127.0.0.1), as a real node listening on all its interfaces would be configured.
    pub listen_any: bool,
    /// Extra arguments of `nbdmirror serve` (e.g. `--threads 2`).
    pub serve_args: Vec<String>,
}

impl Default for PairOptions {
    fn default() -> Self {
        PairOptions {
            size: "64M".into(),
            extra: String::new(),
            log_level: "info".into(),
            proxy: false,
            second_volume: false,
            listen_any: false,
            serve_args: Vec::new(),
        }
    }
}

/// Parses "64M"-style sizes of [`PairOptions::size`] (binary suffixes).
pub fn parse_size(s: &str) -> u64 {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        Some('T') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>().expect("bad size") * mult
}

/// Two daemons in one namespace. Dropping it kills the daemons (and prints their logs if
/// the test is failing), then removes the namespace and the scratch directory.
pub struct Pair {
    daemons: [Option<Child>; 2],
    /// Every log file, in start order.
    logs: Vec<(Node, PathBuf)>,
    starts: [u32; 2],
    opts: PairOptions,
    /// tmpfs mounted by [`Pair::mount_tmpfs`], unmounted on drop.
    mounts: Vec<PathBuf>,
    /// The link proxy, with [`PairOptions::proxy`].
    pub proxy: Option<LinkProxy>,
    /// Volume size in bytes.
    pub size: u64,
    // Last: dropped after the daemons are gone.
    pub env: TestEnv,
}

impl Pair {
    /// A pair with default options (64 MiB volume); no daemon started yet.
    pub fn new() -> Pair {
        Pair::with_options(PairOptions::default())
    }

    pub fn with_size(size: &str) -> Pair {
        Pair::with_options(PairOptions {
            size: size.into(),
            ..PairOptions::default()
        })
    }

    pub fn with_options(opts: PairOptions) -> Pair {
        let env = TestEnv::new();
        let proxy = opts
            .proxy
            .then(|| LinkProxy::start(&env, PROXY_ADDR, B.replication_addr()));
        let pair = Pair {
            daemons: [None, None],
            logs: Vec::new(),
            starts: [0, 0],
            mounts: Vec::new(),
            proxy,
            size: parse_size(&opts.size),
            opts,
            env,
        };
        for node in [A, B] {
            pair.write_config(node, SECRET, node.name());
        }
        pair
    }

    fn write_config(&self, node: Node, secret: &str, file_stem: &str) -> PathBuf {
        let mut text = config_text(
            node,
            secret,
            &format!("data-{}", file_stem),
            &self.opts.size,
            &self.opts.extra,
        );
        if self.opts.second_volume {
            text.push_str(&format!(
                "\n[[volume]]\n\
                 name = \"{VOLUME2}\"\n\
                 image = \"data-{stem}/{VOLUME2}.img\"\n\
                 size = \"{size}\"\n\
                 listen = \"{listen}\"\n",
                stem = file_stem,
                size = self.opts.size,
                listen = export_addr2(node),
            ));
        }
        if self.opts.listen_any {
            text = text.replace(
                &format!("replication_listen = \"{}\"", node.replication_addr()),
                &format!(
                    "replication_listen = \"{}\"",
                    node.replication_addr().replace("127.0.0.1", "0.0.0.0")
                ),
            );
        }
        if self.opts.proxy && node == A {
            text = text.replace(
                &format!("peer = \"{}\"", B.replication_addr()),
                &format!("peer = \"{PROXY_ADDR}\""),
            );
        }
        let path = self.env.path(&format!("{file_stem}.toml"));
        fs::write(&path, text).expect("cannot write a node config");
        path
    }

    /// Writes another config file `<stem>.toml` with its own data directory `data-<stem>`,
    /// e.g. an impostor with a wrong secret. Returns its path.
    pub fn write_custom_config(&self, stem: &str, text: &str) -> PathBuf {
        let path = self.env.path(&format!("{stem}.toml"));
        fs::write(&path, text).expect("cannot write a config");
        path
    }

    pub fn config(&self, node: Node) -> PathBuf {
        self.env.path(&format!("{}.toml", node.name()))
    }

    pub fn data_dir(&self, node: Node) -> PathBuf {
        self.env.path(&format!("data-{}", node.name()))
    }

    /// The node's image file.
    pub fn image(&self, node: Node) -> PathBuf {
        self.data_dir(node).join(format!("{VOLUME}.img"))
    }

    /// The node's metadata file (`<data_dir>/<volume>.meta`).
    pub fn metadata(&self, node: Node) -> PathBuf {
        self.data_dir(node).join(format!("{VOLUME}.meta"))
    }

    /// The node's image file of `volume`.
    pub fn image_of(&self, node: Node, volume: &str) -> PathBuf {
        self.data_dir(node).join(format!("{volume}.img"))
    }

    /// The NBD URI of `volume` on the node (with [`PairOptions::second_volume`]).
    pub fn uri_of(&self, node: Node, volume: &str) -> String {
        if volume == VOLUME {
            self.uri(node)
        } else {
            format!("nbd://{}/{volume}", export_addr2(node))
        }
    }

    /// `nbd://127.0.0.1:1080x/disk0`: the node's export while it is primary.
    pub fn uri(&self, node: Node) -> String {
        format!("nbd://{}/{VOLUME}", node.export_addr())
    }

    /// Mounts a tmpfs of `size` (e.g. "16M") on the node's data directory, so that its image
    /// file can fill the filesystem. Call before the node's first start. Unmounted (lazily)
    /// when the pair is dropped.
    pub fn mount_tmpfs(&mut self, node: Node, size: &str) {
        let dir = self.data_dir(node);
        fs::create_dir_all(&dir).expect("create the data directory");
        let out = crate::run_command(
            &[
                "mount",
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                dir.to_str().unwrap(),
            ],
            Duration::from_secs(30),
        );
        out.ok();
        self.mounts.push(dir);
    }

    /// Changes the size of a tmpfs made by [`Pair::mount_tmpfs`] (frees or takes space).
    pub fn resize_tmpfs(&self, node: Node, size: &str) {
        let dir = self.data_dir(node);
        crate::run_command(
            &[
                "mount",
                "-o",
                &format!("remount,size={size}"),
                dir.to_str().unwrap(),
            ],
            Duration::from_secs(30),
        )
        .ok();
    }

    /// Starts the node's daemon and waits until its control socket answers `status`.
    pub fn start(&mut self, node: Node) {
        self.start_no_wait(node);
        self.wait_ready(node);
    }

    /// Starts the node's daemon without waiting.
    pub fn start_no_wait(&mut self, node: Node) {
        self.start_with_env(node, &[]);
    }

    /// Starts the node's daemon, with `env` added to its environment, without waiting.
    pub fn start_with_env(&mut self, node: Node, env: &[(&str, &str)]) {
        assert!(
            self.daemons[node.idx()].is_none(),
            "{} is already running",
            node.name()
        );
        self.starts[node.idx()] += 1;
        let log_path = self
            .env
            .path(&format!("{}-{}.log", node.name(), self.starts[node.idx()]));
        let child = self.spawn_serve_with_env(&self.config(node), &log_path, env);
        self.logs.push((node, log_path));
        self.daemons[node.idx()] = Some(child);
    }

    /// Spawns `nbdmirror serve --config CONFIG` in the namespace, stderr and stdout into
    /// `log_path`. For extra daemons (impostors) the caller owns the child.
    pub fn spawn_serve(&self, config: &Path, log_path: &Path) -> Child {
        self.spawn_serve_with_env(config, log_path, &[])
    }

    fn spawn_serve_with_env(&self, config: &Path, log_path: &Path, env: &[(&str, &str)]) -> Child {
        let log = fs::File::create(log_path).expect("cannot create a daemon log");
        Command::new("nsenter")
            .arg(format!("--net={}", self.env.ns.ns_path().display()))
            .arg("--")
            .arg(self.env.bin())
            .arg("serve")
            .arg("--config")
            .arg(config)
            .arg("--log-level")
            .arg(&self.opts.log_level)
            .args(&self.opts.serve_args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("cannot start nbdmirror serve")
    }

    /// Waits until `status` answers on the node (and the daemon has not exited).
    pub fn wait_ready(&mut self, node: Node) {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last;
        for _ in 0..10_000 {
            if let Some(st) = self.daemons[node.idx()]
                .as_mut()
                .expect("daemon not started")
                .try_wait()
                .expect("try_wait")
            {
                panic!(
                    "{} exited with {st} before its control socket answered; log:\n{}",
                    node.name(),
                    self.log(node)
                );
            }
            let out = self.cli_quiet(node, &["status", "--json"], Duration::from_secs(10));
            match out {
                Some(o) if o.success() && serde_json::from_str::<Value>(&o.stdout).is_ok() => {
                    return
                }
                Some(o) => last = o.to_string(),
                None => last = "status timed out".into(),
            }
            assert!(
                Instant::now() < deadline,
                "{} did not answer `status --json` within {READY_TIMEOUT:?}; last try: {last}\nlog:\n{}",
                node.name(),
                self.log(node)
            );
            std::thread::sleep(POLL_INTERVAL);
        }
        panic!("{} never became ready", node.name());
    }

    pub fn is_running(&mut self, node: Node) -> bool {
        match self.daemons[node.idx()].as_mut() {
            Some(c) => c.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    /// Asserts the node's daemon is still running (did not crash).
    #[track_caller]
    pub fn assert_running(&mut self, node: Node) {
        assert!(
            self.is_running(node),
            "{} is not running; log:\n{}",
            node.name(),
            self.log(node)
        );
    }

    fn pid(&self, node: Node) -> Pid {
        Pid::from_raw(
            self.daemons[node.idx()]
                .as_ref()
                .unwrap_or_else(|| panic!("{} is not running", node.name()))
                .id() as i32,
        )
    }

    /// Sends `signal` and waits for the exit (the daemon is then not running).
    pub fn signal_and_wait(&mut self, node: Node, signal: Signal) -> (ExitStatus, Duration) {
        let start = Instant::now();
        kill(self.pid(node), signal).expect("cannot signal the daemon");
        let mut child = self.daemons[node.idx()].take().unwrap();
        match wait_with_deadline(&mut child, STOP_TIMEOUT) {
            Some(s) => (s, start.elapsed()),
            None => panic!(
                "{} did not exit within {STOP_TIMEOUT:?} of {signal:?} (killed now); log:\n{}",
                node.name(),
                self.log(node)
            ),
        }
    }

    /// Sends `signal` without waiting (e.g. SIGSTOP/SIGCONT to freeze a node).
    pub fn signal(&self, node: Node, signal: Signal) {
        kill(self.pid(node), signal).expect("cannot signal the daemon");
    }

    /// Clean shutdown: SIGTERM, and the daemon must exit 0.
    pub fn stop(&mut self, node: Node) {
        let (status, _) = self.signal_and_wait(node, Signal::SIGTERM);
        assert!(
            status.success(),
            "{} exited with {status} after SIGTERM; log:\n{}",
            node.name(),
            self.log(node)
        );
    }

    /// A crash: SIGKILL.
    pub fn kill9(&mut self, node: Node) {
        self.signal_and_wait(node, Signal::SIGKILL);
    }

    /// Clean stop, then start again.
    pub fn restart(&mut self, node: Node) {
        self.stop(node);
        self.start(node);
    }

    /// The node's current log (of its latest start).
    pub fn log(&self, node: Node) -> String {
        self.logs
            .iter()
            .rev()
            .find(|(n, _)| *n == node)
            .map(|(_, p)| read_to_string_lossy(p))
            .unwrap_or_default()
    }

    /// All the logs of the node, every start, concatenated.
    pub fn all_logs(&self, node: Node) -> String {
        self.logs
            .iter()
            .filter(|(n, _)| *n == node)
            .map(|(_, p)| read_to_string_lossy(p))
            .collect::<Vec<_>>()
            .join("\n--- restart ---\n")
    }

    /// `nbdmirror ARGS --config <node's config>` in the namespace.
    pub fn cli(&self, node: Node, args: &[&str]) -> CmdOutput {
        let bin = self.env.bin();
        let cfg = self.config(node);
        let mut full: Vec<&str> = vec![bin.to_str().unwrap()];
        full.extend_from_slice(args);
        full.extend_from_slice(&["--config", cfg.to_str().unwrap()]);
        self.env.run_with_timeout(&full, CLI_TIMEOUT)
    }

    /// Like [`Pair::cli`] but returns `None` on timeout instead of panicking (for polls and
    /// for the failure report).
    fn cli_quiet(&self, node: Node, args: &[&str], timeout: Duration) -> Option<CmdOutput> {
        let bin = self.env.bin();
        let cfg = self.config(node);
        let secs = timeout.as_secs().max(1).to_string();
        let ns = format!("--net={}", self.env.ns.ns_path().display());
        let out = Command::new("timeout")
            .args(["-k", "2", &secs, "nsenter", &ns, "--"])
            .arg(&bin)
            .args(args)
            .arg("--config")
            .arg(&cfg)
            .stdin(Stdio::null())
            .output()
            .ok()?;
        if out.status.code() == Some(124) {
            return None;
        }
        Some(CmdOutput {
            cmdline: format!("nbdmirror {} --config {}", args.join(" "), cfg.display()),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// `status --json` of the node, parsed. Panics if it fails.
    #[track_caller]
    pub fn status(&self, node: Node) -> Value {
        let out = self.cli(node, &["status", "--json"]);
        assert!(out.success(), "status on {} failed: {out}", node.name());
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("status --json on {} is not JSON ({e}): {out}", node.name()))
    }

    /// The `volumes[]` element of `volume` in the node's status. Panics if absent.
    #[track_caller]
    pub fn vol(&self, node: Node, volume: &str) -> Value {
        let st = self.status(node);
        volume_of(&st, volume)
            .unwrap_or_else(|| panic!("no volume {volume} in the status of {}: {st}", node.name()))
    }

    /// Polls the node's status until `pred` holds for `volume`'s element; returns that
    /// element. Bounded by `timeout` and by a number of tries. `what` names the state for the
    /// failure message.
    #[track_caller]
    pub fn wait_for(
        &self,
        node: Node,
        volume: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        let max_tries = (timeout.as_millis() / POLL_INTERVAL.as_millis()) as usize + 20;
        let mut last = String::from("(no answer yet)");
        for _ in 0..max_tries {
            if let Some(out) = self.cli_quiet(node, &["status", "--json"], Duration::from_secs(10))
            {
                if out.success() {
                    if let Ok(st) = serde_json::from_str::<Value>(&out.stdout) {
                        if let Some(v) = volume_of(&st, volume) {
                            if pred(&v) {
                                return v;
                            }
                        }
                        last = st.to_string();
                    } else {
                        last = out.to_string();
                    }
                } else {
                    last = out.to_string();
                }
            }
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        panic!(
            "timed out after {timeout:?} waiting for {} {volume}: {what}; last status: {last}",
            node.name()
        );
    }

    /// Waits until the node sees its peer connected and the volume in sync.
    #[track_caller]
    pub fn wait_in_sync(&self, node: Node) -> Value {
        self.wait_for(
            node,
            VOLUME,
            "peer connected and in-sync",
            STATE_TIMEOUT,
            |v| v["peer"] == "connected" && v["sync"] == "in-sync",
        )
    }

    /// Waits until the node sees its peer connected.
    #[track_caller]
    pub fn wait_connected(&self, node: Node) -> Value {
        self.wait_for(node, VOLUME, "peer connected", STATE_TIMEOUT, |v| {
            v["peer"] == "connected"
        })
    }

    /// Waits until the node sees its peer gone.
    #[track_caller]
    pub fn wait_disconnected(&self, node: Node) -> Value {
        self.wait_for(node, VOLUME, "peer disconnected", STATE_TIMEOUT, |v| {
            v["peer"] == "disconnected"
        })
    }

    /// `promote disk0` on the node (`--force` if asked).
    pub fn promote(&self, node: Node, force: bool) -> CmdOutput {
        self.promote_volume(node, VOLUME, force)
    }

    pub fn promote_volume(&self, node: Node, volume: &str, force: bool) -> CmdOutput {
        let mut args = vec!["promote", volume];
        if force {
            args.push("--force");
        }
        self.cli(node, &args)
    }

    pub fn demote(&self, node: Node) -> CmdOutput {
        self.demote_volume(node, VOLUME)
    }

    pub fn demote_volume(&self, node: Node, volume: &str) -> CmdOutput {
        self.cli(node, &["demote", volume])
    }

    /// `resolve disk0 --discard-on DISCARD` run on `node`.
    pub fn resolve(&self, node: Node, discard_on: Node, dry_run: bool) -> CmdOutput {
        let mut args = vec!["resolve", VOLUME, "--discard-on", discard_on.name()];
        if dry_run {
            args.push("--dry-run");
        }
        self.cli(node, &args)
    }

    /// `verify disk0 --json` on the node.
    pub fn verify(&self, node: Node) -> CmdOutput {
        self.cli(node, &["verify", VOLUME, "--json"])
    }

    /// Starts both daemons, waits for the link, promotes node-a and waits until both are
    /// in sync and node-a's export answers. The usual start of a test.
    pub fn start_with_a_primary(&mut self) {
        self.start(A);
        self.start(B);
        self.wait_connected(A);
        self.wait_connected(B);
        self.promote(A, false).ok();
        self.wait_for(A, VOLUME, "primary, in-sync", STATE_TIMEOUT, |v| {
            v["role"] == "primary" && v["sync"] == "in-sync" && v["peer"] == "connected"
        });
        self.wait_in_sync(B);
        self.wait_export(A);
    }

    /// Does something accept TCP connections on the node's export address?
    pub fn export_answers(&self, node: Node) -> bool {
        self.env.ns.connect_tcp(node.export_addr()).is_ok()
    }

    /// Waits (bounded) until the node's export accepts connections.
    #[track_caller]
    pub fn wait_export(&self, node: Node) {
        crate::poll(
            &format!("{}'s export {} to accept", node.name(), node.export_addr()),
            Duration::from_secs(20),
            || self.export_answers(node).then_some(()),
        );
    }

    /// Waits (bounded) until the node's export refuses connections.
    #[track_caller]
    pub fn wait_export_closed(&self, node: Node) {
        crate::poll(
            &format!("{}'s export {} to close", node.name(), node.export_addr()),
            Duration::from_secs(20),
            || (!self.export_answers(node)).then_some(()),
        );
    }

    /// `nbdmirror bitmap inspect <node's metadata> --json` (works without the daemon).
    #[track_caller]
    pub fn inspect(&self, node: Node) -> Value {
        let bin = self.env.bin();
        let meta = self.metadata(node);
        let out = self.env.run_with_timeout(
            &[
                bin.to_str().unwrap(),
                "bitmap",
                "inspect",
                meta.to_str().unwrap(),
                "--json",
            ],
            CLI_TIMEOUT,
        );
        out.ok();
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("bitmap inspect --json is not JSON ({e}): {out}"))
    }

    fn failure_report(&mut self) -> String {
        let mut s = String::new();
        for node in [A, B] {
            let running = self.is_running(node);
            s.push_str(&format!(
                "=== {} ({}) ===\n",
                node.name(),
                if running { "running" } else { "not running" }
            ));
            if running {
                match self.cli_quiet(node, &["status", "--json"], Duration::from_secs(5)) {
                    Some(o) => s.push_str(&format!("last status: {}\n", o.stdout.trim())),
                    None => s.push_str("last status: timed out\n"),
                }
            }
        }
        for (node, path) in &self.logs {
            let text = read_to_string_lossy(path);
            let tail = tail_chars(&text, 200_000);
            s.push_str(&format!(
                "--- {} log {} ---\n{tail}\n",
                node.name(),
                path.file_name().unwrap().to_string_lossy()
            ));
        }
        s
    }
}

impl Default for Pair {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let report = self.failure_report();
            eprintln!("{report}");
        }
        for d in self.daemons.iter_mut() {
            if let Some(mut c) = d.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if let Some(p) = &self.proxy {
            p.stop();
        }
        for m in self.mounts.drain(..).rev() {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
    }
}

/// The second volume of [`PairOptions::second_volume`].
pub const VOLUME2: &str = "disk1";

/// The NBD listen address of [`VOLUME2`] on the node.
pub fn export_addr2(node: Node) -> &'static str {
    match node {
        A => "127.0.0.1:10819",
        B => "127.0.0.1:10820",
    }
}

/// The text of a node config in the layout of `examples/local-pair`.
pub fn config_text(node: Node, secret: &str, data_dir: &str, size: &str, extra: &str) -> String {
    format!(
        "# written by the test harness (tests/src/pair.rs)\n\
         node = \"{name}\"\n\
         data_dir = \"{data_dir}\"\n\
         secret = \"{secret}\"\n\
         replication_listen = \"{repl}\"\n\
         peer = \"{peer}\"\n\
         {extra}\n\
         \n\
         [[volume]]\n\
         name = \"{VOLUME}\"\n\
         image = \"{data_dir}/{VOLUME}.img\"\n\
         size = \"{size}\"\n\
         listen = \"{listen}\"\n",
        name = node.name(),
        repl = node.replication_addr(),
        peer = node.other().replication_addr(),
        listen = node.export_addr(),
    )
}

/// The `volumes[]` element named `volume` of a status object.
pub fn volume_of(status: &Value, volume: &str) -> Option<Value> {
    status["volumes"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == volume)
        .cloned()
}

/// A numeric field of a status volume element; panics with the element if absent.
#[track_caller]
pub fn num(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("`{key}` is not a non-negative integer in {v}"))
}

fn read_to_string_lossy(p: &Path) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = fs::File::open(p) {
        let _ = f.read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

fn tail_chars(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut i = s.len() - max;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// A 64-bit digest of a whole file (FNV-1a over 8-byte words; for "did it change", not
/// security).
pub fn file_digest(path: &Path) -> u64 {
    let mut f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; 1 << 20];
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        for chunk in buf[..n].chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            h ^= u64::from_le_bytes(w);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        total += n as u64;
    }
    h ^ total
}

/// Panics unless fio exited 0 and reported no verification or I/O error.
#[track_caller]
pub fn assert_fio_ok(out: &CmdOutput) {
    assert!(out.success(), "fio failed: {out}");
    let all = out.all();
    for line in all.lines() {
        assert!(
            !line.contains("verify:"),
            "fio verification error `{line}`: {out}"
        );
        if let Some(rest) = line.split("err=").nth(1) {
            assert!(
                rest.trim_start().starts_with('0'),
                "fio reported an error `{line}`: {out}"
            );
        }
    }
    assert!(all.contains("err= 0"), "no fio job summary: {out}");
}

/// The fio command line (nbd engine, threads, no verify-state file) with `args` appended.
pub fn fio_args(uri: &str, args: &[&str]) -> Vec<String> {
    let mut full: Vec<String> = vec![
        "fio".into(),
        "--thread".into(),
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        "--output-format=normal".into(),
        // No verify-state file in the working directory.
        "--verify_state_save=0".into(),
    ];
    full.extend(args.iter().map(|s| s.to_string()));
    full
}

/// Runs fio in the namespace to completion.
pub fn fio(env: &TestEnv, uri: &str, args: &[&str]) -> CmdOutput {
    let full = fio_args(uri, args);
    let refs: Vec<&str> = full.iter().map(String::as_str).collect();
    env.run(&refs)
}

/// A Python (libnbd) writer for "no acknowledged write is lost" checks: one synchronous 4 KiB write at a time; after each acknowledgement the block number is
/// appended to the log and flushed, so the log never claims a write that was not acked.
pub const ACK_WRITER: &str = r#"
import os, sys, nbd
uri, log_path, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
h = nbd.NBD()
h.connect_uri(uri)
log = open(log_path, "a")
for i in range(count):
    buf = (b"ack-%010d-\n" % i) * 256
    assert len(buf) == 4096
    try:
        h.pwrite(buf, i * 4096)
    except nbd.Error as e:
        print("write %d failed: %s" % (i, e), file=sys.stderr)
        sys.exit(3)
    log.write("%d\n" % i)
    log.flush()
print("wrote all %d blocks" % count)
"#;

pub fn ack_block(i: u64) -> Vec<u8> {
    format!("ack-{i:010}-\n").repeat(256).into_bytes()
}

/// Starts [`ACK_WRITER`] in the namespace (under /usr/bin/python3, which has libnbd): it
/// writes blocks 0..count at block * 4096 of `uri`, one at a time, and appends each
/// acknowledged block number to `log`; it exits 3 at the first failed write.
pub fn spawn_ack_writer(env: &TestEnv, uri: &str, log: &Path, count: u64) -> crate::Background {
    let script = env.path("ack-writer.py");
    fs::write(&script, ACK_WRITER).expect("write the writer script");
    env.spawn(&[
        "env",
        "PATH=/usr/bin:/bin:/usr/sbin:/sbin",
        "/usr/bin/python3",
        script.to_str().unwrap(),
        uri,
        log.to_str().unwrap(),
        &count.to_string(),
    ])
}

/// The block numbers [`ACK_WRITER`] logged as acknowledged.
pub fn read_ack_log(log: &Path) -> Vec<u64> {
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| l.trim().parse().expect("a block number per line"))
        .collect()
}

/// Block numbers of `acked` whose 4 KiB at block * 4096 of `image` do not hold their
/// pattern.
pub fn missing_acked_blocks(image: &Path, acked: &[u64]) -> Vec<u64> {
    let data = fs::read(image).unwrap_or_else(|e| panic!("read {}: {e}", image.display()));
    acked
        .iter()
        .copied()
        .filter(|&i| {
            let off = (i * 4096) as usize;
            data.get(off..off + 4096) != Some(&ack_block(i)[..])
        })
        .collect()
}

/// Where node-a dials node-b through the [`LinkProxy`] (it sorts after 7801, so node-a
/// still dials).
pub const PROXY_ADDR: &str = "127.0.0.1:7810";

/// A TCP relay in the test's namespace between node-a's dialer and node-b's replication
/// port. `cut()` drops every relayed connection and refuses new ones (both daemons see a
/// dead link while they keep running); `restore()` lets connections through again.
pub struct LinkProxy {
    state: std::sync::Arc<ProxyState>,
}

struct ProxyState {
    cut: std::sync::atomic::AtomicBool,
    stop: std::sync::atomic::AtomicBool,
    conns: std::sync::Mutex<Vec<std::net::TcpStream>>,
}

impl LinkProxy {
    pub fn start(env: &TestEnv, listen: &str, target: &str) -> LinkProxy {
        use std::sync::atomic::Ordering;
        use std::sync::Arc;
        let state = Arc::new(ProxyState {
            cut: false.into(),
            stop: false.into(),
            conns: std::sync::Mutex::new(Vec::new()),
        });
        let listen = listen.to_string();
        let target = target.to_string();
        let ns_path = env.ns.ns_path();
        let st = state.clone();
        // The relay's threads join the namespace once; sockets they make stay in it.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let file = fs::File::open(&ns_path).expect("open the namespace");
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let l = std::net::TcpListener::bind(&listen).expect("bind the link proxy");
            l.set_nonblocking(true).unwrap();
            tx.send(()).unwrap();
            while !st.stop.load(Ordering::Relaxed) {
                let (client, _) = match l.accept() {
                    Ok(c) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                if st.cut.load(Ordering::Relaxed) {
                    drop(client);
                    continue;
                }
                client.set_nonblocking(false).unwrap();
                let Ok(server) = std::net::TcpStream::connect(&target) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut conns = st.conns.lock().unwrap();
                    conns.push(client.try_clone().unwrap());
                    conns.push(server.try_clone().unwrap());
                }
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the link proxy did not start");
        LinkProxy { state }
    }

    /// Drops every relayed connection and refuses new ones.
    pub fn cut(&self) {
        self.state
            .cut
            .store(true, std::sync::atomic::Ordering::Relaxed);
        for c in self.state.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Lets new connections through again.
    pub fn restore(&self) {
        self.state
            .cut
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }

    fn stop(&self) {
        self.cut();
        self.state
            .stop
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
