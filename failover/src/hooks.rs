//! Group hooks: the operator's commands that start, stop, monitor a group's VM and fence the
//! peer.
//!
//! A hook is a shell command line, run as `/bin/sh -c COMMAND` in a process group of its own,
//! with stdin from `/dev/null` and this environment (on top of the daemon's):
//!
//! | variable | value |
//! |---|---|
//! | `NBDMIRROR_GROUP` | the group's name |
//! | `NBDMIRROR_NODE` | this node's name |
//! | `NBDMIRROR_ACTION` | `start`, `stop`, `monitor` or `fence` |
//! | `NBDMIRROR_VOLUMES` | space-separated `name=nbd-uri` pairs of the local exports |
//! | `NBDMIRROR_PEER` | the peer's name (set for `fence`, removed otherwise) |
//!
//! A hook that runs longer than its timeout (default 60 s) is killed with its whole process
//! group (SIGTERM, then SIGKILL after [`KILL_GRACE`]), so a stuck `virsh` or `sleep` it
//! started goes too. Processes a hook leaves running in another session (a daemonized QEMU)
//! are not touched. The outcome carries the exit code and the last lines of stdout and stderr,
//! bounded in count and length, for the logs and `nbdmirror status`.

use std::fmt;
use std::io;
use std::process::Stdio;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tracing::{info, warn};

/// Default time a hook may run before it is killed.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// After SIGTERM to a timed-out hook's process group, how long before SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(2);
/// Lines of stdout and of stderr kept (the last ones).
pub const TAIL_LINES: usize = 20;
/// Bytes kept of one line; the rest of a longer line is dropped.
pub const LINE_BYTES: usize = 512;
/// After the hook exits, how long its output is still read (a background process it started
/// may hold the pipes open forever).
const DRAIN_GRACE: Duration = Duration::from_millis(500);

/// One hook: a command line for `/bin/sh -c` and its timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookSpec {
    pub command: String,
    pub timeout: Duration,
}

impl HookSpec {
    /// A hook with the default timeout.
    pub fn new(command: impl Into<String>) -> HookSpec {
        HookSpec {
            command: command.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// Why a hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HookAction {
    Start,
    Stop,
    Monitor,
    Fence,
}

impl HookAction {
    pub fn as_str(self) -> &'static str {
        match self {
            HookAction::Start => "start",
            HookAction::Stop => "stop",
            HookAction::Monitor => "monitor",
            HookAction::Fence => "fence",
        }
    }
}

impl fmt::Display for HookAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for HookAction {
    type Err = HookError;
    fn from_str(s: &str) -> Result<HookAction, HookError> {
        match s {
            "start" => Ok(HookAction::Start),
            "stop" => Ok(HookAction::Stop),
            "monitor" => Ok(HookAction::Monitor),
            "fence" => Ok(HookAction::Fence),
            other => Err(HookError::Action(other.to_string())),
        }
    }
}

/// What the hook is told about the group.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HookEnv {
    pub group: String,
    pub node: String,
    /// (volume name, NBD URI of its local export), e.g. ("disk0", "nbd://10.99.0.100:10809/disk0").
    pub volumes: Vec<(String, String)>,
    /// The peer's name; the daemon sets it for `fence`.
    pub peer: Option<String>,
}

impl HookEnv {
    /// The value of `NBDMIRROR_VOLUMES`: `name=uri name=uri`. Names and URIs must not contain
    /// white space (and names no `=`), or the list could not be split again.
    pub fn volumes_var(&self) -> Result<String, HookError> {
        let mut parts = Vec::with_capacity(self.volumes.len());
        for (name, uri) in &self.volumes {
            let bad = name.is_empty()
                || name.contains('=')
                || name.chars().any(char::is_whitespace)
                || uri.is_empty()
                || uri.chars().any(char::is_whitespace);
            if bad {
                return Err(HookError::Volume {
                    name: name.clone(),
                    uri: uri.clone(),
                });
            }
            parts.push(format!("{name}={uri}"));
        }
        Ok(parts.join(" "))
    }
}

/// How the hook ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookExit {
    /// It exited with this code.
    Code(i32),
    /// A signal it did not send itself ended it (e.g. the OOM killer).
    Signal(i32),
    /// It ran past its timeout and was killed with its process group.
    TimedOut,
}

impl fmt::Display for HookExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HookExit::Code(c) => write!(f, "exit code {c}"),
            HookExit::Signal(s) => write!(f, "killed by signal {s}"),
            HookExit::TimedOut => f.write_str("timed out (killed)"),
        }
    }
}

/// A finished hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookOutcome {
    pub action: HookAction,
    pub exit: HookExit,
    pub duration: Duration,
    /// The last [`TAIL_LINES`] lines of stdout, each cut at [`LINE_BYTES`].
    pub stdout_tail: Vec<String>,
    /// The same for stderr.
    pub stderr_tail: Vec<String>,
}

impl HookOutcome {
    /// Exit code 0.
    pub fn success(&self) -> bool {
        self.exit == HookExit::Code(0)
    }
}

#[derive(Debug, Error)]
pub enum HookError {
    #[error("cannot start the {action} hook `{command}` with /bin/sh: {source}")]
    Spawn {
        action: HookAction,
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot wait for the {action} hook `{command}`: {source}")]
    Wait {
        action: HookAction,
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("volume {name:?} with URI {uri:?} cannot be passed in NBDMIRROR_VOLUMES (names and URIs must be non-empty, without white space; names without '=')")]
    Volume { name: String, uri: String },
    #[error("unknown hook action {0:?} (expected start, stop, monitor or fence)")]
    Action(String),
}

/// Runs `hook` for `action` and waits for it (at most its timeout plus [`KILL_GRACE`]).
///
/// Errors are only for a hook that could not be run at all; a hook that fails or times out is
/// an `Ok` outcome saying so. Dropping the future kills the hook's process group.
pub async fn run(
    hook: &HookSpec,
    action: HookAction,
    env: &HookEnv,
) -> Result<HookOutcome, HookError> {
    let volumes = env.volumes_var()?;
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(&hook.command)
        .env("NBDMIRROR_GROUP", &env.group)
        .env("NBDMIRROR_NODE", &env.node)
        .env("NBDMIRROR_ACTION", action.as_str())
        .env("NBDMIRROR_VOLUMES", volumes)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    match &env.peer {
        Some(peer) => cmd.env("NBDMIRROR_PEER", peer),
        None => cmd.env_remove("NBDMIRROR_PEER"),
    };
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|source| HookError::Spawn {
        action,
        command: hook.command.clone(),
        source,
    })?;
    // The child is the leader of its own process group: its pid is the group id.
    let group = ProcessGroup(child.id().and_then(|id| i32::try_from(id).ok()));
    info!(group = %env.group, %action, command = %hook.command, pid = ?group.0, "hook started");

    let (stdout, stdout_buf) = spawn_tail(child.stdout.take());
    let (stderr, stderr_buf) = spawn_tail(child.stderr.take());

    let exit = match tokio::time::timeout(hook.timeout, child.wait()).await {
        Ok(Ok(status)) => status_exit(status),
        Ok(Err(source)) => {
            return Err(HookError::Wait {
                action,
                command: hook.command.clone(),
                source,
            })
        }
        Err(_) => {
            warn!(group = %env.group, %action, timeout = ?hook.timeout, "hook timed out; killing its process group");
            group.signal(Signal::SIGTERM);
            if tokio::time::timeout(KILL_GRACE, child.wait())
                .await
                .is_err()
            {
                group.signal(Signal::SIGKILL);
                // Bounded: a process in uninterruptible sleep (a umount or sync on hung
                // storage) outlives SIGKILL, and the group's logic must go on. Tokio reaps
                // it whenever it does end.
                if tokio::time::timeout(KILL_GRACE, child.wait())
                    .await
                    .is_err()
                {
                    warn!(group = %env.group, %action, pid = ?group.0, "the hook survives SIGKILL (stuck in the kernel, on hung storage?); going on without it");
                }
            } else {
                // The leader is gone; anything of its group still running is killed now.
                group.signal(Signal::SIGKILL);
            }
            HookExit::TimedOut
        }
    };
    let duration = started.elapsed();
    let (stdout_tail, stderr_tail) =
        tokio::join!(drain(stdout, stdout_buf), drain(stderr, stderr_buf));
    group.finish();

    let outcome = HookOutcome {
        action,
        exit,
        duration,
        stdout_tail,
        stderr_tail,
    };
    if outcome.success() || action == HookAction::Monitor && matches!(exit, HookExit::Code(_)) {
        info!(group = %env.group, %action, %exit, ?duration, "hook finished");
    } else {
        warn!(group = %env.group, %action, %exit, ?duration,
              stderr = %outcome.stderr_tail.join("\n"), "hook failed");
    }
    Ok(outcome)
}

/// Kills the hook's process group when dropped before `finish` (the caller gave up on it).
struct ProcessGroup(Option<i32>);

impl ProcessGroup {
    fn signal(&self, signal: Signal) {
        if let Some(pgid) = self.0 {
            // ESRCH: the group is already empty.
            let _ = killpg(Pid::from_raw(pgid), signal);
        }
    }

    fn finish(mut self) {
        self.0 = None;
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if self.0.is_some() {
            self.signal(Signal::SIGKILL);
        }
    }
}

fn status_exit(status: std::process::ExitStatus) -> HookExit {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => HookExit::Code(code),
        (None, Some(sig)) => HookExit::Signal(sig),
        (None, None) => HookExit::Code(-1),
    }
}

/// Output of one pipe, read by a task of its own; shared so what was read survives an abort.
type SharedTail = Arc<Mutex<Tail>>;

/// Waits a little for a reader to reach the end, then stops it (its pipe may be held open by
/// a background process the hook left behind) and returns what it read.
async fn drain(task: tokio::task::JoinHandle<()>, tail: SharedTail) -> Vec<String> {
    let abort = task.abort_handle();
    let finished = tokio::time::timeout(DRAIN_GRACE, task).await.is_ok();
    abort.abort();
    let mut tail = match tail.lock() {
        Ok(mut guard) => std::mem::replace(&mut *guard, Tail::new(0, 0)),
        Err(poisoned) => std::mem::replace(&mut *poisoned.into_inner(), Tail::new(0, 0)),
    };
    if !finished {
        tail.push_line("[output still open after the hook exited; not read further]");
    }
    tail.finish()
}

fn spawn_tail<R: AsyncRead + Unpin + Send + 'static>(
    reader: Option<R>,
) -> (tokio::task::JoinHandle<()>, SharedTail) {
    let tail = Arc::new(Mutex::new(Tail::new(TAIL_LINES, LINE_BYTES)));
    let shared = tail.clone();
    let task = tokio::spawn(async move {
        let Some(mut reader) = reader else { return };
        let mut buf = vec![0u8; 8192];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => match shared.lock() {
                    Ok(mut t) => t.push(&buf[..n]),
                    Err(_) => break,
                },
            }
        }
    });
    (task, tail)
}

/// The last `max_lines` lines of a byte stream, each cut at `max_bytes`: memory stays bounded
/// whatever the hook prints.
#[derive(Debug)]
pub struct Tail {
    lines: std::collections::VecDeque<String>,
    current: Vec<u8>,
    current_cut: bool,
    max_lines: usize,
    max_bytes: usize,
}

impl Tail {
    pub fn new(max_lines: usize, max_bytes: usize) -> Tail {
        Tail {
            lines: std::collections::VecDeque::with_capacity(max_lines.min(64)),
            current: Vec::new(),
            current_cut: false,
            max_lines,
            max_bytes,
        }
    }

    pub fn push(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let (part, rest, end) = match data.iter().position(|&b| b == b'\n') {
                Some(i) => (&data[..i], &data[i + 1..], true),
                None => (data, &data[data.len()..], false),
            };
            let room = self.max_bytes.saturating_sub(self.current.len());
            if part.len() > room {
                self.current.extend_from_slice(&part[..room]);
                self.current_cut = true;
            } else {
                self.current.extend_from_slice(part);
            }
            if end {
                self.end_line();
            }
            data = rest;
        }
    }

    /// Ends a partial line, then adds `line` (a note of ours, not the hook's output).
    fn push_line(&mut self, line: &str) {
        if !self.current.is_empty() || self.current_cut {
            self.end_line();
        }
        self.current.extend_from_slice(line.as_bytes());
        self.end_line();
    }

    fn end_line(&mut self) {
        let mut line = String::from_utf8_lossy(&self.current).into_owned();
        if self.current_cut {
            line.push_str(" [...]");
        }
        self.current.clear();
        self.current_cut = false;
        if self.max_lines == 0 {
            return;
        }
        if self.lines.len() == self.max_lines {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }

    /// The lines kept, oldest first (an unfinished last line included).
    pub fn finish(mut self) -> Vec<String> {
        if !self.current.is_empty() || self.current_cut {
            self.end_line();
        }
        self.lines.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_last_lines() {
        let mut t = Tail::new(3, 100);
        t.push(b"one\ntwo\nthr");
        t.push(b"ee\nfour\nfive");
        assert_eq!(t.finish(), vec!["three", "four", "five"]);
    }

    #[test]
    fn tail_cuts_long_lines() {
        let mut t = Tail::new(2, 4);
        t.push(b"abcdefgh");
        t.push(b"ijk\nxy\n");
        assert_eq!(t.finish(), vec!["abcd [...]", "xy"]);
    }

    #[test]
    fn tail_handles_invalid_utf8_and_empty_input() {
        let mut t = Tail::new(2, 10);
        t.push(b"\xff\xfeok\n");
        assert_eq!(t.finish(), vec!["\u{fffd}\u{fffd}ok"]);
        assert!(Tail::new(2, 10).finish().is_empty());
    }

    #[test]
    fn volumes_var_format_and_validation() {
        let mut env = HookEnv {
            group: "vm1".into(),
            node: "node-a".into(),
            volumes: vec![
                ("disk0".into(), "nbd://10.99.0.100:10809/disk0".into()),
                ("disk1".into(), "nbd://10.99.0.100:10809/disk1".into()),
            ],
            peer: None,
        };
        assert_eq!(
            env.volumes_var().expect("valid"),
            "disk0=nbd://10.99.0.100:10809/disk0 disk1=nbd://10.99.0.100:10809/disk1"
        );
        env.volumes.push(("a b".into(), "nbd://x/y".into()));
        assert!(matches!(env.volumes_var(), Err(HookError::Volume { .. })));
        env.volumes.pop();
        env.volumes.push(("a=b".into(), "nbd://x/y".into()));
        assert!(env.volumes_var().is_err());
    }

    #[test]
    fn actions_round_trip() {
        for a in [
            HookAction::Start,
            HookAction::Stop,
            HookAction::Monitor,
            HookAction::Fence,
        ] {
            assert_eq!(a.as_str().parse::<HookAction>().expect("valid"), a);
        }
        assert!("reboot".parse::<HookAction>().is_err());
    }
}
