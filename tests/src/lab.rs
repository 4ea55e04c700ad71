//! The failover lab: `examples/netns-pair/lab.sh` with real daemons in it.
//!
//! A [`Lab`] brings up the example's three hosts (network namespaces `<prefix>-a`, `-b`, `-c`
//! and the switch `-sw`) under a prefix of its own, so tests run side by side; the 10.99
//! subnets are the same in every lab, which is fine because each lab's namespaces are
//! isolated from each other and from the root namespace. It copies the example configs into
//! the test's scratch directory (the daemons keep their state next to them), optionally
//! patched, starts the witness in host c and the daemons in hosts a and b, and drives them:
//! `nbdmirror status --json` inside a host, link cuts, kills, restarts, and NBD clients in
//! host c against the virtual IP. Dropping the lab always runs `lab.sh down`, also on panic,
//! and prints the daemons' logs when the test failed.
//!
//! Every command runs under a deadline and every wait is bounded.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;

use crate::{bin_path, wait_with_deadline, CmdOutput};

/// The group of the example configs.
pub const GROUP: &str = "vm1";
/// The volume of the example configs.
pub const VOLUME: &str = "disk0";
/// The group's virtual IP and the export behind it.
pub const VIP: &str = "10.99.0.100";
pub const VIP_URI: &str = "nbd://10.99.0.100:10809/disk0";
/// The example's volume size (256M).
pub const VOLUME_SIZE: u64 = 256 << 20;

static NEXT_LAB: AtomicU64 = AtomicU64::new(0);

/// The folder of the example (`examples/netns-pair`).
pub fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .join("examples/netns-pair")
}

/// The repository's root (hooks are referred to relative to it).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A host of the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    A,
    B,
    C,
}

impl Host {
    pub fn letter(self) -> &'static str {
        match self {
            Host::A => "a",
            Host::B => "b",
            Host::C => "c",
        }
    }

    fn index(self) -> usize {
        match self {
            Host::A => 0,
            Host::B => 1,
            Host::C => 2,
        }
    }

    /// The config file of the process that runs on this host.
    pub fn config_name(self) -> &'static str {
        match self {
            Host::A => "node-a.toml",
            Host::B => "node-b.toml",
            Host::C => "witness.toml",
        }
    }

    /// The node name (a and b only).
    pub fn node(self) -> &'static str {
        match self {
            Host::A => "node-a",
            Host::B => "node-b",
            Host::C => panic!("host c runs no node"),
        }
    }
}

/// Which links `cut` takes down (see lab.sh).
#[derive(Debug, Clone, Copy)]
pub enum Link {
    Repl,
    Pub,
    All,
}

impl Link {
    fn as_str(self) -> &'static str {
        match self {
            Link::Repl => "repl",
            Link::Pub => "pub",
            Link::All => "all",
        }
    }
}

/// A daemon (node or witness) started by the lab.
struct Proc {
    child: Child,
    log: PathBuf,
}

/// A client command running in the background in one of the hosts.
pub struct BgCommand {
    child: Option<Child>,
    out: PathBuf,
    pub cmdline: String,
}

impl BgCommand {
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    /// Waits up to `timeout`, then kills. Returns the exit status (None: killed or still
    /// running at the deadline) and the output so far.
    pub fn wait_or_kill(mut self, timeout: Duration) -> (Option<ExitStatus>, String) {
        let mut child = self.child.take().expect("already waited");
        let st = wait_with_deadline(&mut child, timeout);
        (st, fs::read_to_string(&self.out).unwrap_or_default())
    }

    /// The output so far.
    pub fn output(&self) -> String {
        fs::read_to_string(&self.out).unwrap_or_default()
    }
}

impl Drop for BgCommand {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One lab: three hosts, the witness and two daemons.
pub struct Lab {
    pub prefix: String,
    dir: Option<TempDir>,
    path: PathBuf,
    bin: PathBuf,
    script: PathBuf,
    procs: [Option<Proc>; 3],
    /// Each start of a host's daemon gets a new log file; all are printed on failure.
    logs: Vec<PathBuf>,
}

/// Runs a command under `timeout -k 2`, capturing its output; never panics on a timeout
/// (exit code 124 then).
pub fn run_bounded(args: &[&str], timeout: Duration) -> CmdOutput {
    let secs = format!("{:.1}", timeout.as_secs_f64().max(0.1));
    let out = Command::new("timeout")
        .args(["-k", "2", &secs])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    CmdOutput {
        cmdline: args.join(" "),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

impl Lab {
    /// Brings up a lab with the example configs copied unchanged into a scratch directory.
    /// Patch them with [`Lab::patch`] before starting the daemons.
    pub fn new() -> Lab {
        let n = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("t{}x{n}", std::process::id());
        let dir = tempfile::Builder::new()
            .prefix(&format!("nbdmirror-lab-{prefix}-"))
            .tempdir()
            .expect("cannot create a scratch directory");
        let path = dir.path().to_path_buf();
        // A private name for the binary (a concurrent `cargo build` relinks the original).
        let bin = path.join("nbdmirror");
        let src = bin_path();
        fs::hard_link(&src, &bin)
            .or_else(|_| fs::copy(&src, &bin).map(|_| ()))
            .unwrap_or_else(|e| {
                panic!("cannot link {} into {}: {e}", src.display(), path.display())
            });
        for f in ["node-a.toml", "node-b.toml", "witness.toml"] {
            fs::copy(example_dir().join(f), path.join(f))
                .unwrap_or_else(|e| panic!("cannot copy {f}: {e}"));
        }
        let lab = Lab {
            prefix,
            dir: Some(dir),
            path,
            bin,
            script: example_dir().join("lab.sh"),
            procs: [None, None, None],
            logs: Vec::new(),
        };
        // The guard exists before `up`, so a half-made lab is torn down too.
        lab.lab_sh(&["up"]).ok();
        lab
    }

    /// The scratch directory (configs, state, logs).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `nbdmirror` binary the lab runs.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// The config file of a host's process.
    pub fn config(&self, host: Host) -> PathBuf {
        self.path.join(host.config_name())
    }

    /// A node's image.
    pub fn image(&self, host: Host) -> PathBuf {
        self.path
            .join(format!("state/{}/{VOLUME}.img", host.node()))
    }

    /// Replaces `from` by `to` in a config file (which must contain `from`).
    pub fn patch(&self, file: &str, from: &str, to: &str) {
        let p = self.path.join(file);
        let text = fs::read_to_string(&p).unwrap();
        assert!(text.contains(from), "{file} does not contain {from:?}");
        fs::write(&p, text.replace(from, to)).unwrap();
    }

    /// Adds TOML lines (e.g. `hooks = { ... }`) to the `[[group]]` of one node's config, or of
    /// both with `None`.
    pub fn add_to_group(&self, host: Option<Host>, lines: &str) {
        let files = match host {
            Some(h) => vec![h.config_name()],
            None => vec![Host::A.config_name(), Host::B.config_name()],
        };
        let anchor = "vip_interface = \"pub0\"\n";
        for f in files {
            self.patch(f, anchor, &format!("{anchor}{lines}"));
        }
    }

    /// Runs `lab.sh ARGS` with this lab's prefix (30 s deadline).
    pub fn lab_sh(&self, args: &[&str]) -> CmdOutput {
        self.lab_sh_timeout(args, Duration::from_secs(30))
    }

    fn lab_sh_timeout(&self, args: &[&str], timeout: Duration) -> CmdOutput {
        let prefix = format!("LAB_PREFIX={}", self.prefix);
        let script = self.script.to_str().unwrap();
        let mut full = vec!["env", &prefix, "bash", script];
        full.extend_from_slice(args);
        run_bounded(&full, timeout)
    }

    /// Runs a command inside a host (`lab.sh exec HOST ARGS`) with a deadline; never panics.
    pub fn exec(&self, host: Host, args: &[&str], timeout: Duration) -> CmdOutput {
        let mut full = vec!["exec", host.letter()];
        full.extend_from_slice(args);
        let mut out = self.lab_sh_timeout(&full, timeout);
        out.cmdline = format!("[host {}] {}", host.letter(), args.join(" "));
        out
    }

    /// Whether the host has the group's virtual IP on one of its interfaces.
    pub fn holds_vip(&self, host: Host) -> bool {
        let out = self.exec(
            host,
            &["ip", "-4", "-o", "addr", "show"],
            Duration::from_secs(10),
        );
        out.stdout
            .split_whitespace()
            .any(|w| w.split('/').next() == Some(VIP))
    }

    /// Runs `nbdmirror ARGS` inside a host (30 s deadline).
    pub fn nbdmirror(&self, host: Host, args: &[&str]) -> CmdOutput {
        let bin = self.bin.to_str().unwrap();
        let mut full = vec![bin];
        full.extend_from_slice(args);
        self.exec(host, &full, Duration::from_secs(30))
    }

    /// Starts a command in a host in the background, its output in a file of the scratch
    /// directory.
    pub fn spawn(&self, host: Host, args: &[&str]) -> BgCommand {
        let n = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        let out = self.path.join(format!("bg-{n}.out"));
        let f = fs::File::create(&out).unwrap();
        let child = Command::new("bash")
            .arg(&self.script)
            .args(["exec", host.letter()])
            .args(args)
            .env("LAB_PREFIX", &self.prefix)
            .current_dir(&self.path)
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("cannot run lab.sh");
        BgCommand {
            child: Some(child),
            out,
            cmdline: format!("[host {}] {}", host.letter(), args.join(" ")),
        }
    }

    fn start_proc(&mut self, host: Host, args: &[&str], ready: &str) {
        assert!(
            self.procs[host.index()].is_none(),
            "host {} already runs a daemon",
            host.letter()
        );
        let n = self.logs.len();
        let log = self.path.join(format!(
            "{}-{n}.log",
            host.config_name().trim_end_matches(".toml")
        ));
        let f = fs::File::create(&log).unwrap();
        // `ip netns exec` execs the command: the child is the daemon itself.
        let child = Command::new("bash")
            .arg(&self.script)
            .args(["exec", host.letter()])
            .arg(&self.bin)
            .args(args)
            .env("LAB_PREFIX", &self.prefix)
            .current_dir(repo_root())
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("cannot run lab.sh exec");
        self.logs.push(log.clone());
        self.procs[host.index()] = Some(Proc { child, log });
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = self.log(host);
            if text.contains(ready) {
                return;
            }
            let p = self.procs[host.index()].as_mut().unwrap();
            if let Some(st) = p.child.try_wait().unwrap() {
                panic!(
                    "the daemon on host {} exited with {st} before `{ready}`:\n{text}",
                    host.letter()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the daemon on host {} did not log `{ready}` in 20 s:\n{text}",
                host.letter()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the witness in host c (`nbdmirror witness --config witness.toml`).
    pub fn start_witness(&mut self) {
        // The witness does not create the folder of its state file (the README's walkthrough
        // makes it with `mkdir -p`, as here).
        fs::create_dir_all(self.path.join("state")).unwrap();
        let cfg = self.config(Host::C);
        let cfg = cfg.to_str().unwrap().to_string();
        self.start_proc(Host::C, &["witness", "--config", &cfg], "serving witness");
    }

    /// Starts the daemon of node a or b (`nbdmirror serve --config node-X.toml`) and waits
    /// until its control socket answers.
    pub fn start_node(&mut self, host: Host) {
        let cfg = self.config(host);
        let cfg = cfg.to_str().unwrap().to_string();
        self.start_proc(host, &["serve", "--config", &cfg], "daemon ready");
    }

    /// The whole log of a host's current (or last) daemon.
    pub fn log(&self, host: Host) -> String {
        let path = match &self.procs[host.index()] {
            Some(p) => p.log.clone(),
            None => match self.logs.iter().rev().find(|l| {
                l.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(host.config_name().trim_end_matches(".toml")))
            }) {
                Some(l) => l.clone(),
                None => return String::new(),
            },
        };
        fs::read_to_string(path).unwrap_or_default()
    }

    /// Every log of the lab so far, for failure messages.
    pub fn all_logs(&self) -> String {
        let mut s = String::new();
        for l in &self.logs {
            s.push_str(&format!(
                "--- {} ---\n{}\n",
                l.file_name().unwrap().to_string_lossy(),
                fs::read_to_string(l).unwrap_or_default()
            ));
        }
        s
    }

    /// SIGTERM to a host's daemon; waits for it to exit (panics after `timeout`).
    pub fn stop(&mut self, host: Host, timeout: Duration) -> ExitStatus {
        let mut p = self.procs[host.index()]
            .take()
            .unwrap_or_else(|| panic!("host {} runs no daemon", host.letter()));
        kill(Pid::from_raw(p.child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
        match wait_with_deadline(&mut p.child, timeout) {
            Some(st) => st,
            None => panic!(
                "the daemon on host {} did not stop within {timeout:?} of SIGTERM:\n{}",
                host.letter(),
                fs::read_to_string(&p.log).unwrap_or_default()
            ),
        }
    }

    /// Stops node-a then node-b with SIGTERM and insists both exit cleanly.
    pub fn stop_nodes_cleanly(&mut self) {
        for h in [Host::A, Host::B] {
            let st = self.stop(h, Duration::from_secs(30));
            assert!(
                st.success(),
                "{} exited with {st}\n{}",
                h.node(),
                self.log(h)
            );
        }
    }

    /// `lab.sh kill HOST`: SIGKILL every process of the host and cut its links.
    pub fn kill(&mut self, host: Host) {
        self.lab_sh(&["kill", host.letter()]).ok();
        if let Some(mut p) = self.procs[host.index()].take() {
            assert!(
                wait_with_deadline(&mut p.child, Duration::from_secs(10)).is_some(),
                "the daemon on host {} survived lab.sh kill",
                host.letter()
            );
        }
    }

    /// SIGKILL the host's daemon alone (the host, its links and its other processes stay).
    pub fn kill_daemon(&mut self, host: Host) {
        let mut p = self.procs[host.index()]
            .take()
            .unwrap_or_else(|| panic!("host {} runs no daemon", host.letter()));
        kill(Pid::from_raw(p.child.id() as i32), Signal::SIGKILL).expect("SIGKILL");
        assert!(
            wait_with_deadline(&mut p.child, Duration::from_secs(10)).is_some(),
            "the daemon on host {} survived SIGKILL",
            host.letter()
        );
    }

    /// Whether a host's daemon is still running.
    pub fn is_running(&mut self, host: Host) -> bool {
        match self.procs[host.index()].as_mut() {
            Some(p) => p.child.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// `lab.sh cut LINK HOST on|off`.
    pub fn cut(&self, link: Link, host: Host, on: bool) {
        self.lab_sh(&[
            "cut",
            link.as_str(),
            host.letter(),
            if on { "on" } else { "off" },
        ])
        .ok();
    }

    /// `nbdmirror status --json` inside the node's host; Err when the daemon does not answer.
    pub fn try_status(&self, host: Host) -> Result<Json, String> {
        let cfg = self.config(host);
        let cfg = cfg.to_str().unwrap();
        let bin = self.bin.to_str().unwrap();
        let out = self.exec(
            host,
            &[bin, "status", "--json", "--config", cfg],
            Duration::from_secs(10),
        );
        if !out.success() {
            return Err(out.to_string());
        }
        Json::parse(&out.stdout).map_err(|e| format!("bad JSON ({e}): {}", out.stdout))
    }

    /// `status --json` of a node; panics (with the logs) if it does not answer.
    pub fn status(&self, host: Host) -> Json {
        self.try_status(host)
            .unwrap_or_else(|e| panic!("status of {}: {e}\n{}", host.node(), self.all_logs()))
    }

    /// `groups[0].state` of a node, or None if the daemon does not answer.
    pub fn group_state(&self, host: Host) -> Option<String> {
        self.try_status(host).ok().map(|j| group_state(&j))
    }

    /// Polls `f` every 100 ms until it returns Some, for at most `timeout`; panics with
    /// both nodes' status and every log otherwise.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&Lab) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            if Instant::now() >= deadline {
                let sa = self.try_status(Host::A).map(|j| j.to_string());
                let sb = self.try_status(Host::B).map(|j| j.to_string());
                panic!(
                    "timed out after {timeout:?} waiting for {what}\nstatus node-a: {sa:?}\nstatus node-b: {sb:?}\n{}",
                    self.all_logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until a node reports `groups[0].state` in `states`; returns its status.
    pub fn wait_group_state(&self, host: Host, states: &[&str], timeout: Duration) -> Json {
        self.wait_for(
            &format!("{} to report group {GROUP} in {states:?}", host.node()),
            timeout,
            |lab| {
                let j = lab.try_status(host).ok()?;
                states.contains(&group_state(&j).as_str()).then_some(j)
            },
        )
    }

    /// Waits until both nodes report the volume `in-sync`.
    pub fn wait_in_sync(&self, timeout: Duration) {
        self.wait_for("both nodes to report disk0 in-sync", timeout, |lab| {
            let a = lab.try_status(Host::A).ok()?;
            let b = lab.try_status(Host::B).ok()?;
            (volume_field(&a, "sync") == "in-sync" && volume_field(&b, "sync") == "in-sync")
                .then_some(())
        })
    }

    /// Starts witness, node-a and node-b, and waits until node-a is primary (the preferred
    /// node), node-b secondary and the volume in sync.
    pub fn start_all(&mut self) {
        if fs::read_to_string(self.config(Host::A))
            .unwrap()
            .lines()
            .any(|l| l.trim_start().starts_with("witness ="))
        {
            self.start_witness();
        }
        self.start_node(Host::A);
        self.start_node(Host::B);
        self.wait_group_state(Host::A, &["primary"], Duration::from_secs(30));
        self.wait_group_state(Host::B, &["secondary"], Duration::from_secs(30));
        self.wait_in_sync(Duration::from_secs(60));
    }

    /// One NBD handshake (NBD_OPT_GO for disk0) from host c to the virtual IP, each step
    /// bounded by `step`. Ok(export size).
    pub fn try_handshake(&self, step: Duration) -> Result<u64, String> {
        let ns = PathBuf::from(format!("/run/netns/{}-c", self.prefix));
        std::thread::spawn(move || -> Result<u64, String> {
            let f = fs::File::open(&ns).map_err(|e| format!("open {}: {e}", ns.display()))?;
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("setns: {e}"))?;
            nbd_go(&format!("{VIP}:10809").parse().unwrap(), VOLUME, step)
                .map_err(|e| e.to_string())
        })
        .join()
        .expect("handshake thread panicked")
    }

    /// Tries handshakes from host c until one succeeds; returns the time from `since`.
    /// Panics after `timeout` with the last error and the logs.
    pub fn wait_handshake(&self, since: Instant, timeout: Duration) -> Duration {
        let deadline = since + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            match self.try_handshake(Duration::from_millis(200)) {
                Ok(_) => return since.elapsed(),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "no NBD handshake through the VIP within {timeout:?} (last error: {last})\n{}",
            self.all_logs()
        );
    }

    /// `qemu-io -f raw -c CMD... nbd://10.99.0.100:10809/disk0` in host c (60 s deadline).
    pub fn qemu_io(&self, cmds: &[&str]) -> CmdOutput {
        self.qemu_io_in(Host::C, VIP_URI, cmds, Duration::from_secs(60))
    }

    /// `qemu-io -f raw -c CMD... URI` in a host.
    pub fn qemu_io_in(&self, host: Host, uri: &str, cmds: &[&str], timeout: Duration) -> CmdOutput {
        self.exec(host, &qemu_io_args(uri, cmds), timeout)
    }

    /// [`Lab::qemu_io_in`] in the background (a client whose writes wait, say).
    pub fn spawn_qemu_io(&self, host: Host, uri: &str, cmds: &[&str]) -> BgCommand {
        self.spawn(host, &qemu_io_args(uri, cmds))
    }
}

fn qemu_io_args<'a>(uri: &'a str, cmds: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["qemu-io", "-f", "raw"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(uri);
    args
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        for p in self.procs.iter_mut().flatten() {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        let down = self.lab_sh(&["down"]);
        if !down.success() {
            eprintln!("lab.sh down failed: {down}");
        }
        if failed {
            eprintln!("=== lab {} logs ===\n{}", self.prefix, self.all_logs());
            if std::env::var_os("NBDMIRROR_KEEP_LAB").is_some() {
                if let Some(d) = self.dir.take() {
                    eprintln!("scratch directory kept: {}", d.keep().display());
                }
            }
        }
    }
}

/// `groups[0].state` of a status document ("" if absent).
pub fn group_state(status: &Json) -> String {
    status
        .get("groups")
        .at(0)
        .get("state")
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// `groups[0].KEY` as a string ("" if absent or null).
pub fn group_field(status: &Json, key: &str) -> String {
    status
        .get("groups")
        .at(0)
        .get(key)
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// `volumes[0].KEY` as a string ("" if absent or not a string).
pub fn volume_field(status: &Json, key: &str) -> String {
    status
        .get("volumes")
        .at(0)
        .get(key)
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// `volumes[0].KEY` as a number (0 if absent).
pub fn volume_u64(status: &Json, key: &str) -> u64 {
    status.get("volumes").at(0).get(key).as_u64().unwrap_or(0)
}

/// Whether a group state holds the group (serves its writes).
pub fn is_active(state: &str) -> bool {
    matches!(state, "primary" | "alone")
}

// ---- a minimal NBD handshake (bounded, never panics) ----

fn nbd_go(addr: &SocketAddr, name: &str, step: Duration) -> std::io::Result<u64> {
    use std::io::{Error, ErrorKind};
    let bad = |what: &str| Error::new(ErrorKind::InvalidData, what.to_string());
    let mut s = TcpStream::connect_timeout(addr, step)?;
    s.set_read_timeout(Some(step))?;
    s.set_write_timeout(Some(step))?;
    let mut g = [0u8; 18];
    s.read_exact(&mut g)?;
    if &g[0..8] != b"NBDMAGIC" || &g[8..16] != b"IHAVEOPT" {
        return Err(bad("not an NBD newstyle greeting"));
    }
    s.write_all(&3u32.to_be_bytes())?; // FIXED_NEWSTYLE | NO_ZEROES
    let mut opt = Vec::new();
    opt.extend_from_slice(b"IHAVEOPT");
    opt.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
    opt.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
    opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
    opt.extend_from_slice(name.as_bytes());
    opt.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&opt)?;
    let mut size = None;
    for _ in 0..16 {
        let mut h = [0u8; 20];
        s.read_exact(&mut h)?;
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        if len > 1 << 16 {
            return Err(bad("option reply too long"));
        }
        let mut d = vec![0u8; len];
        s.read_exact(&mut d)?;
        match kind {
            1 => {
                // NBD_REP_ACK: in transmission now; leave politely.
                let mut req = Vec::new();
                req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
                req.extend_from_slice(&0u16.to_be_bytes());
                req.extend_from_slice(&2u16.to_be_bytes()); // NBD_CMD_DISC
                req.extend_from_slice(&[0u8; 20]);
                let _ = s.write_all(&req);
                return size.ok_or_else(|| bad("ACK without NBD_INFO_EXPORT"));
            }
            3 if d.len() >= 12 && d[0..2] == [0, 0] => {
                size = Some(u64::from_be_bytes(d[2..10].try_into().unwrap()));
            }
            3 => {}
            k if k & (1 << 31) != 0 => {
                return Err(bad(&format!(
                    "GO refused: {k:#x} {}",
                    String::from_utf8_lossy(&d)
                )))
            }
            _ => return Err(bad("unexpected option reply")),
        }
    }
    Err(bad("too many option replies"))
}

// ---- a minimal JSON reader for `status --json` (the tests crate has no serde) ----

/// A parsed JSON value.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

static NULL: Json = Json::Null;

impl Json {
    pub fn parse(s: &str) -> Result<Json, String> {
        let b = s.as_bytes();
        let mut i = 0;
        let v = parse_value(b, &mut i)?;
        skip_ws(b, &mut i);
        if i != b.len() {
            return Err(format!("trailing data at {i}"));
        }
        Ok(v)
    }

    /// A key of an object (Null if absent or not an object).
    pub fn get(&self, key: &str) -> &Json {
        match self {
            Json::Obj(m) => m
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v)
                .unwrap_or(&NULL),
            _ => &NULL,
        }
    }

    /// An element of an array (Null if absent or not an array).
    pub fn at(&self, i: usize) -> &Json {
        match self {
            Json::Arr(a) => a.get(i).unwrap_or(&NULL),
            _ => &NULL,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Json::Num(n) if *n >= 0.0 => Some(*n as u64),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Json::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> &[Json] {
        match self {
            Json::Arr(a) => a,
            _ => &[],
        }
    }
}

impl std::fmt::Display for Json {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Json::Null => f.write_str("null"),
            Json::Bool(b) => write!(f, "{b}"),
            Json::Num(n) => write!(f, "{n}"),
            Json::Str(s) => write!(f, "{s:?}"),
            Json::Arr(a) => {
                f.write_str("[")?;
                for (i, v) in a.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{v}")?;
                }
                f.write_str("]")
            }
            Json::Obj(m) => {
                f.write_str("{")?;
                for (i, (k, v)) in m.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{k:?}:{v}")?;
                }
                f.write_str("}")
            }
        }
    }
}

fn skip_ws(b: &[u8], i: &mut usize) {
    while *i < b.len() && b[*i].is_ascii_whitespace() {
        *i += 1;
    }
}

fn parse_value(b: &[u8], i: &mut usize) -> Result<Json, String> {
    skip_ws(b, i);
    let c = *b.get(*i).ok_or("unexpected end")?;
    match c {
        b'{' => {
            *i += 1;
            let mut m = Vec::new();
            skip_ws(b, i);
            if b.get(*i) == Some(&b'}') {
                *i += 1;
                return Ok(Json::Obj(m));
            }
            loop {
                skip_ws(b, i);
                let k = match parse_value(b, i)? {
                    Json::Str(s) => s,
                    _ => return Err(format!("object key expected at {i}")),
                };
                skip_ws(b, i);
                if b.get(*i) != Some(&b':') {
                    return Err(format!("':' expected at {i}"));
                }
                *i += 1;
                let v = parse_value(b, i)?;
                m.push((k, v));
                skip_ws(b, i);
                match b.get(*i) {
                    Some(b',') => *i += 1,
                    Some(b'}') => {
                        *i += 1;
                        return Ok(Json::Obj(m));
                    }
                    _ => return Err(format!("',' or '}}' expected at {i}")),
                }
            }
        }
        b'[' => {
            *i += 1;
            let mut a = Vec::new();
            skip_ws(b, i);
            if b.get(*i) == Some(&b']') {
                *i += 1;
                return Ok(Json::Arr(a));
            }
            loop {
                a.push(parse_value(b, i)?);
                skip_ws(b, i);
                match b.get(*i) {
                    Some(b',') => *i += 1,
                    Some(b']') => {
                        *i += 1;
                        return Ok(Json::Arr(a));
                    }
                    _ => return Err(format!("',' or ']' expected at {i}")),
                }
            }
        }
        b'"' => {
            *i += 1;
            let mut s = String::new();
            loop {
                let c = *b.get(*i).ok_or("unterminated string")?;
                *i += 1;
                match c {
                    b'"' => return Ok(Json::Str(s)),
                    b'\\' => {
                        let e = *b.get(*i).ok_or("unterminated escape")?;
                        *i += 1;
                        match e {
                            b'n' => s.push('\n'),
                            b't' => s.push('\t'),
                            b'r' => s.push('\r'),
                            b'b' => s.push('\u{8}'),
                            b'f' => s.push('\u{c}'),
                            b'u' => {
                                let h = b.get(*i..*i + 4).ok_or("short \\u escape")?;
                                let h = std::str::from_utf8(h).map_err(|e| e.to_string())?;
                                let cp = u32::from_str_radix(h, 16).map_err(|e| e.to_string())?;
                                *i += 4;
                                s.push(char::from_u32(cp).unwrap_or('\u{fffd}'));
                            }
                            other => s.push(other as char),
                        }
                    }
                    _ => {
                        // Copy a whole UTF-8 sequence.
                        let start = *i - 1;
                        let mut end = *i;
                        while end < b.len() && (b[end] & 0xC0) == 0x80 {
                            end += 1;
                        }
                        s.push_str(&String::from_utf8_lossy(&b[start..end]));
                        *i = end;
                    }
                }
            }
        }
        b't' if b[*i..].starts_with(b"true") => {
            *i += 4;
            Ok(Json::Bool(true))
        }
        b'f' if b[*i..].starts_with(b"false") => {
            *i += 5;
            Ok(Json::Bool(false))
        }
        b'n' if b[*i..].starts_with(b"null") => {
            *i += 4;
            Ok(Json::Null)
        }
        _ => {
            let start = *i;
            while *i < b.len() && matches!(b[*i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') {
                *i += 1;
            }
            let t = std::str::from_utf8(&b[start..*i]).map_err(|e| e.to_string())?;
            t.parse::<f64>()
                .map(Json::Num)
                .map_err(|_| format!("bad value at {start}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_reads_a_status_document() {
        let j = Json::parse(
            r#"{"node":"node-a","volumes":[{"name":"disk0","sync":"in-sync","dirty_bytes":0,"x":null,"ok":true}],
               "groups":[{"state":"primary","primary_node":"node-a","reason":"a \"q\" \u00e9 é"}]}"#,
        )
        .unwrap();
        assert_eq!(group_state(&j), "primary");
        assert_eq!(group_field(&j, "primary_node"), "node-a");
        assert_eq!(group_field(&j, "reason"), "a \"q\" é é");
        assert_eq!(volume_field(&j, "sync"), "in-sync");
        assert_eq!(volume_u64(&j, "dirty_bytes"), 0);
        assert_eq!(j.get("volumes").at(0).get("ok").as_bool(), Some(true));
        assert_eq!(j.get("nope").at(3).get("x"), &Json::Null);
        assert!(Json::parse("{").is_err());
        assert!(Json::parse("[1,]").is_err());
        assert!(Json::parse("{} x").is_err());
    }
}
