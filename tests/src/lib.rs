//! Harness for the end-to-end tests: every test gets a private network namespace and a
//! scratch directory, starts real `nbdmirror` processes inside the namespace, and drives
//! them with real NBD clients (qemu-img, qemu-io, nbdinfo, nbdcopy, nbdsh, fio) or with the
//! raw-socket client in [`raw`].
//!
//! Rules the harness enforces:
//! - Nothing listens on a host port: the server and every client run through
//!   `nsenter --net=/proc/PID/ns/net` into a namespace held by a `sleep` process.
//! - Every external command runs under `timeout`, every wait loop is bounded.
//! - Processes started by a test are killed when their guard is dropped, even on panic.

pub mod data;
pub mod lab;
pub mod pair;
pub mod raw;
pub mod vm;

use std::fs;
use std::io::Read;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;

/// Default deadline for one client command (qemu-img, nbdinfo...).
pub const CMD_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a server may take to start listening.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// The TCP address every server listens on inside its private namespace.
pub const TCP_ADDR: &str = "127.0.0.1:10809";

/// The `nbdmirror` binary under test: `$NBDMIRROR_BIN`, or the one next to the test binary
/// (`target/<profile>/deps/X` -> `target/<profile>/nbdmirror`), or the other profile's.
/// Panics with instructions when there is none.
pub fn bin_path() -> PathBuf {
    find_bin().unwrap_or_else(|e| panic!("{e}"))
}

fn find_bin() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("NBDMIRROR_BIN") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            return Err(format!(
                "NBDMIRROR_BIN={} does not name an existing file",
                p.display()
            ));
        }
        return Ok(p);
    }
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find the test executable: {e}"))?;
    let mut candidates = Vec::new();
    // target/<profile>/deps/<test> -> target/<profile>
    if let Some(profile_dir) = exe.parent().and_then(Path::parent) {
        candidates.push(profile_dir.join("nbdmirror"));
        if let Some(target_dir) = profile_dir.parent() {
            for profile in ["release", "debug"] {
                candidates.push(target_dir.join(profile).join("nbdmirror"));
            }
        }
    }
    candidates
        .iter()
        .find(|c| c.is_file())
        .cloned()
        .ok_or_else(|| {
            format!(
            "the nbdmirror binary was not found (looked at {candidates:?}); build it first with \
             `cargo build --release -p nbdmirror`, or set NBDMIRROR_BIN=/path/to/nbdmirror"
        )
        })
}

/// Waits for a child with a deadline; kills it when the deadline passes.
/// Returns `None` on timeout (after the kill).
pub fn wait_with_deadline(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(e) => panic!("waiting for pid {}: {e}", child.id()),
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `f` every 20 ms until it returns `Some`, for at most `timeout` (and 100 000 tries).
pub fn poll<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    for _ in 0..100_000 {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// The result of a finished external command.
#[derive(Debug)]
pub struct CmdOutput {
    pub cmdline: String,
    /// Exit code; `None` if killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// stdout and stderr together (qemu-io prints errors on either).
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    /// Panics with the full output unless the command exited 0.
    #[track_caller]
    pub fn ok(&self) -> &Self {
        assert!(self.success(), "command failed: {self}");
        self
    }
}

impl std::fmt::Display for CmdOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` exited with {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmdline, self.code, self.stdout, self.stderr
        )
    }
}

/// A private network namespace, held open by a `sleep` process that dies with the guard.
pub struct NetNs {
    holder: Child,
}

impl NetNs {
    pub fn new() -> NetNs {
        let holder = Command::new("unshare")
            .args(["--net", "--", "sleep", "3600"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot run `unshare --net` (are we root?)");
        let ns = NetNs { holder };
        // unshare(2) happens after the fork: wait until the holder is in its own namespace.
        let own = fs::read_link("/proc/self/ns/net").expect("cannot read /proc/self/ns/net");
        let path = ns.ns_path();
        poll(
            "the namespace holder to unshare",
            Duration::from_secs(10),
            || match fs::read_link(&path) {
                Ok(l) if l != own => Some(()),
                _ => None,
            },
        );
        let out = run_command(
            &[
                "nsenter",
                &format!("--net={}", path.display()),
                "--",
                "ip",
                "link",
                "set",
                "lo",
                "up",
            ],
            Duration::from_secs(30),
        );
        out.ok();
        ns
    }

    pub fn pid(&self) -> u32 {
        self.holder.id()
    }

    /// `/proc/PID/ns/net` of the holder.
    pub fn ns_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.pid()))
    }

    /// A command line prefix that runs a program inside the namespace.
    pub fn prefix(&self) -> Vec<String> {
        vec![
            "nsenter".into(),
            format!("--net={}", self.ns_path().display()),
            "--".into(),
        ]
    }

    /// Runs `f` in a fresh thread that has joined the namespace (for sockets made in Rust).
    pub fn in_ns<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.ns_path();
        std::thread::spawn(move || {
            let file = fs::File::open(&path).expect("cannot open the namespace file");
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("setns into the test namespace failed");
            f()
        })
        .join()
        .expect("thread in the namespace panicked")
    }

    /// A TCP connection made from inside the namespace (the socket stays in it).
    pub fn connect_tcp(&self, addr: &str) -> std::io::Result<TcpStream> {
        let addr = addr.to_string();
        self.in_ns(move || TcpStream::connect(addr))
    }
}

impl Default for NetNs {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

fn shell_words(args: &[&str]) -> String {
    args.iter()
        .map(|a| {
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || "'\"$;&|".contains(c)) {
                format!("'{}'", a.replace('\'', "'\\''"))
            } else {
                a.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs a command under `timeout`, capturing its output.
pub fn run_command(args: &[&str], timeout: Duration) -> CmdOutput {
    let secs = timeout.as_secs().max(1).to_string();
    let mut full: Vec<&str> = vec!["timeout", "-k", "5", &secs];
    full.extend_from_slice(args);
    let out = Command::new(full[0])
        .args(&full[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", shell_words(args)));
    let result = CmdOutput {
        cmdline: shell_words(args),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert_ne!(
        result.code,
        Some(124),
        "command timed out after {timeout:?}: {result}"
    );
    result
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// One test's world: a scratch directory and a private network namespace.
pub struct TestEnv {
    pub dir: TempDir,
    pub ns: NetNs,
    bin: std::sync::OnceLock<PathBuf>,
}

/// Gives the test its own name for the binary: a hard link (or a copy) in its scratch
/// directory. `cargo build` replaces `target/release/nbdmirror` by unlinking and relinking
/// it, so a concurrent rebuild could otherwise make a spawn fail (file briefly absent) or
/// mix two builds within one test.
fn private_binary(dir: &Path) -> PathBuf {
    let dest = dir.join("nbdmirror");
    let mut last_err = None;
    for _ in 0..100 {
        if let Ok(src) = find_bin() {
            let _ = fs::remove_file(&dest);
            match fs::hard_link(&src, &dest).or_else(|_| fs::copy(&src, &dest).map(|_| ())) {
                Ok(()) => return dest,
                Err(e) => last_err = Some(e),
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Not there for 10 s: report it the usual way.
    let src = bin_path();
    panic!(
        "cannot link {} into {}: {last_err:?}",
        src.display(),
        dest.display()
    );
}

impl TestEnv {
    pub fn new() -> TestEnv {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let dir = tempfile::Builder::new()
            .prefix(&format!("nbdmirror-e2e-{}-{id}-", std::process::id()))
            .tempdir()
            .expect("cannot create a scratch directory");
        TestEnv {
            dir,
            ns: NetNs::new(),
            bin: std::sync::OnceLock::new(),
        }
    }

    /// This test's private name for the `nbdmirror` binary (see [`bin_path`]).
    pub fn bin(&self) -> PathBuf {
        self.bin
            .get_or_init(|| private_binary(self.dir.path()))
            .clone()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs a client command inside the namespace with the default deadline.
    pub fn run(&self, args: &[&str]) -> CmdOutput {
        self.run_with_timeout(args, CMD_TIMEOUT)
    }

    pub fn run_with_timeout(&self, args: &[&str], timeout: Duration) -> CmdOutput {
        let prefix = self.ns.prefix();
        let mut full: Vec<&str> = prefix.iter().map(String::as_str).collect();
        full.extend_from_slice(args);
        let mut out = run_command(&full, timeout);
        out.cmdline = shell_words(args);
        out
    }

    /// Starts a client command inside the namespace in the background (killed on drop).
    pub fn spawn(&self, args: &[&str]) -> Background {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.ns.ns_path().display()))
            .arg("--")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", shell_words(args)));
        Background {
            child: Some(child),
            cmdline: shell_words(args),
        }
    }

    /// Starts `nbdmirror ARGS` in the namespace in the background, without waiting for
    /// readiness (for commands expected to fail).
    pub fn spawn_nbdmirror(&self, args: &[&str]) -> Background {
        let bin = self.bin();
        let mut full = vec![bin.to_str().expect("binary path is not UTF-8")];
        full.extend_from_slice(args);
        self.spawn(&full)
    }

    /// Runs `nbdmirror ARGS` in the namespace to completion (for commands expected to fail).
    pub fn run_nbdmirror(&self, args: &[&str]) -> CmdOutput {
        let bin = self.bin();
        let bin = bin.to_str().expect("binary path is not UTF-8");
        let mut full = vec![bin];
        full.extend_from_slice(args);
        self.run_with_timeout(&full, Duration::from_secs(30))
    }

    /// Starts `nbdmirror export` on a fresh sparse image `disk.img` of `size` (e.g. "64M"),
    /// listening on TCP and on a unix socket in the scratch directory.
    pub fn start_export(&self, size: &str, extra: &[&str]) -> Server {
        let image = self.path("disk.img");
        let image_s = image.to_str().unwrap().to_string();
        let mut args: Vec<&str> = vec!["--image", &image_s, "--create", size];
        args.extend_from_slice(extra);
        self.start_server(&args)
    }

    /// Starts `nbdmirror export ARGS`; adds the standard listen addresses unless ARGS has
    /// `--listen`. Waits until the server logs that it serves.
    pub fn start_server(&self, args: &[&str]) -> Server {
        let sock = self.path(&format!(
            "nbd-{}.sock",
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        ));
        let sock_arg = format!("unix:{}", sock.display());
        let mut full: Vec<&str> = vec!["export"];
        full.extend_from_slice(args);
        let (tcp, unix) = if args.contains(&"--listen") {
            (None, None)
        } else {
            full.extend_from_slice(&["--listen", TCP_ADDR, "--listen", &sock_arg]);
            (Some(TCP_ADDR.to_string()), Some(sock.clone()))
        };
        self.start_server_raw(&full, tcp, unix)
    }

    /// Starts `nbdmirror ARGS` (ARGS include the subcommand) and waits for readiness.
    pub fn start_server_raw(
        &self,
        args: &[&str],
        tcp: Option<String>,
        unix: Option<PathBuf>,
    ) -> Server {
        let log_path = self.path(&format!(
            "server-{}.log",
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        ));
        let log = fs::File::create(&log_path).expect("cannot create the server log");
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.ns.ns_path().display()))
            .arg("--")
            .arg(self.bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("cannot start nbdmirror");
        let mut server = Server {
            child: Some(child),
            log_path,
            tcp,
            unix,
            cmdline: shell_words(args),
        };
        server.wait_ready();
        server
    }
}

impl Default for TestEnv {
    fn default() -> Self {
        Self::new()
    }
}

/// A running `nbdmirror` process (killed on drop).
pub struct Server {
    child: Option<Child>,
    log_path: PathBuf,
    /// TCP address inside the namespace, if it listens on the standard one.
    pub tcp: Option<String>,
    /// Unix socket path, if it listens on the standard one.
    pub unix: Option<PathBuf>,
    cmdline: String,
}

impl Server {
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let log = self.log();
            if log.contains("INFO serving") {
                break;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().expect("try_wait") {
                panic!(
                    "nbdmirror {} exited with {status} before serving; log:\n{log}",
                    self.cmdline
                );
            }
            assert!(
                Instant::now() < deadline,
                "nbdmirror {} did not log `serving` within {READY_TIMEOUT:?}; log:\n{log}",
                self.cmdline
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The unix socket must accept connections too.
        if let Some(path) = &self.unix {
            poll("the unix socket to accept", Duration::from_secs(10), || {
                UnixStream::connect(path).ok().map(|_| ())
            });
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("server already stopped").id() as i32)
    }

    /// The server's stderr so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(&self.log_path) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// `nbd://127.0.0.1:10809/NAME` (an empty name is the default export).
    pub fn uri_tcp(&self, name: &str) -> String {
        let addr = self
            .tcp
            .as_deref()
            .expect("server has no standard TCP listener");
        format!("nbd://{addr}/{name}")
    }

    /// `nbd+unix:///NAME?socket=PATH`.
    pub fn uri_unix(&self, name: &str) -> String {
        let p = self
            .unix
            .as_ref()
            .expect("server has no standard unix listener");
        format!("nbd+unix:///{name}?socket={}", p.display())
    }

    /// Default URI for client tools (TCP).
    pub fn uri(&self) -> String {
        self.uri_tcp("")
    }

    pub fn unix_path(&self) -> &Path {
        self.unix
            .as_deref()
            .expect("server has no standard unix listener")
    }

    /// Is the process still running?
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    /// Sends a signal and waits up to `timeout` for the exit. Returns the exit status and how
    /// long it took, or `None` if it did not exit in time (it is then killed).
    pub fn stop(&mut self, signal: Signal, timeout: Duration) -> Option<(ExitStatus, Duration)> {
        let start = Instant::now();
        kill(self.pid(), signal).expect("cannot signal the server");
        let mut child = self.child.take().unwrap();
        let status = wait_with_deadline(&mut child, timeout);
        status.map(|s| (s, start.elapsed()))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- nbdmirror {} log ---\n{}", self.cmdline, self.log());
        }
    }
}

/// A client command running in the background (killed on drop unless waited for).
pub struct Background {
    child: Option<Child>,
    cmdline: String,
}

impl Background {
    /// The process id (of the command itself: `nsenter` execs it).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Waits up to `timeout`; panics on timeout.
    pub fn wait(self, timeout: Duration) -> CmdOutput {
        let cmdline = self.cmdline.clone();
        let (out, finished) = self.wait_or_kill(timeout);
        assert!(
            finished,
            "`{cmdline}` did not finish within {timeout:?}\n{out}"
        );
        out
    }

    /// Waits up to `timeout`, then kills. Returns the output and whether it exited by
    /// itself.
    pub fn wait_or_kill(mut self, timeout: Duration) -> (CmdOutput, bool) {
        let mut child = self.child.take().unwrap();
        // Drain the pipes in threads so a chatty child cannot block on a full pipe.
        let mut so = child.stdout.take().unwrap();
        let mut se = child.stderr.take().unwrap();
        let t1 = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = so.read_to_end(&mut s);
            s
        });
        let t2 = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = se.read_to_end(&mut s);
            s
        });
        let status = wait_with_deadline(&mut child, timeout);
        let stdout = String::from_utf8_lossy(&t1.join().unwrap()).into_owned();
        let stderr = String::from_utf8_lossy(&t2.join().unwrap()).into_owned();
        let out = CmdOutput {
            cmdline: self.cmdline.clone(),
            code: status.and_then(|s| s.code()),
            stdout,
            stderr,
        };
        (out, status.is_some())
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Asserts that a qemu-io run succeeded: exit code 0, no failed pattern check, no failed
/// command.
#[track_caller]
pub fn assert_qemu_io_ok(out: &CmdOutput) {
    let all = out.all();
    assert!(out.success(), "qemu-io failed: {out}");
    assert!(
        !all.contains("Pattern verification failed"),
        "qemu-io pattern verification failed: {out}"
    );
    assert!(!all.contains(" failed:"), "a qemu-io command failed: {out}");
}

/// `qemu-io -f raw -c CMD... URI` inside the namespace.
pub fn qemu_io(env: &TestEnv, uri: &str, cmds: &[&str]) -> CmdOutput {
    let mut args = vec!["qemu-io", "-f", "raw"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(uri);
    env.run(&args)
}

/// Debian's nbdsh (libnbd's Python shell) running `script` against `uri`. nbdsh runs
/// `python3 -m nbd`, and the `python3` first on PATH here may lack the libnbd bindings, so
/// PATH is pinned to the system directories.
/// `opts` go before `-u` (e.g. `--base-allocation`).
pub fn nbdsh(env: &TestEnv, opts: &[&str], uri: &str, script: &str) -> CmdOutput {
    let mut args = vec![
        "env",
        "PATH=/usr/bin:/bin:/usr/sbin:/sbin",
        "/usr/bin/nbdsh",
    ];
    args.extend_from_slice(opts);
    args.extend_from_slice(&["-u", uri, "-c", script]);
    env.run(&args)
}

impl TestEnv {
    /// A raw client connected over TCP from inside the namespace (handshake not started).
    pub fn raw_tcp(&self) -> raw::RawClient {
        let s = self
            .ns
            .connect_tcp(TCP_ADDR)
            .unwrap_or_else(|e| panic!("TCP connect to {TCP_ADDR} in the namespace: {e}"));
        raw::RawClient::from_tcp(s)
    }
}

impl Server {
    /// A raw client connected to the unix socket (handshake not started).
    pub fn raw_unix(&self) -> raw::RawClient {
        raw::RawClient::connect_unix(self.unix_path())
    }
}
