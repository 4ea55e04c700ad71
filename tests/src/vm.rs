//! Helpers for the real-VM failover test (`tests/tests/failover_vm.rs`, which runs in the
//! [`crate::lab`] harness): the test guest built by `scripts/make-vm-image.sh` and the markers
//! it prints on its serial console.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::lab::repo_root;
use crate::run_command;

/// The cargo target directory this test binary was built into
/// (`target/<profile>/deps/<test>` -> `target`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| repo_root().join("target"))
}

/// The test guest: an uncompressed kernel, a busybox initramfs whose /init mounts /dev/vda,
/// counts boots and appends an fsync'd tick every second (see `scripts/make-vm-image.sh`).
pub struct Guest {
    pub vmlinux: PathBuf,
    pub initrd: PathBuf,
    mkdisk: PathBuf,
}

impl Guest {
    /// Builds the guest into `target/vm/` (a few milliseconds when cached; the first build
    /// downloads Debian's kernel package, which `scripts/install-deps.sh` does in CI).
    pub fn build() -> Guest {
        let dir = target_dir().join("vm");
        let script = repo_root().join("scripts/make-vm-image.sh");
        let out = run_command(
            &[
                "bash",
                script.to_str().unwrap(),
                dir.to_str().expect("target dir is not UTF-8"),
            ],
            Duration::from_secs(900),
        );
        assert!(
            out.success(),
            "building the test guest failed (run scripts/install-deps.sh as root first): {out}"
        );
        Guest {
            vmlinux: dir.join("vmlinux"),
            initrd: dir.join("initrd.cpio.gz"),
            mkdisk: dir.join("mkdisk.sh"),
        }
    }

    /// A fresh guest disk (empty ext4) of `size` (e.g. "256M") at `path`.
    pub fn make_disk(&self, path: &Path, size: &str) {
        run_command(
            &[self.mkdisk.to_str().unwrap(), path.to_str().unwrap(), size],
            Duration::from_secs(60),
        )
        .ok();
    }
}

/// Panics with instructions unless the programs this test needs are installed.
pub fn require_tools(tools: &[&str]) {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {t} >/dev/null")])
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    assert!(
        missing.is_empty(),
        "missing programs {missing:?}: run scripts/install-deps.sh as root"
    );
}

/// The guest's `LAB-TICK boot=N tick=T` lines in a serial log: (boot, tick) in order. Each
/// one was printed after the tick was fsync'd, i.e. acknowledged by the disk.
pub fn ticks(console: &str) -> Vec<(u64, u64)> {
    console
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find("LAB-TICK ")? + 9..];
            Some((field(rest, "boot")?, field(rest, "tick")?))
        })
        .collect()
}

/// The guest's first `LAB-MARKER boot=N last_tick=T` in a serial log: (boot, last tick read
/// back from the disk at boot).
pub fn marker(console: &str) -> Option<(u64, u64)> {
    console.lines().find_map(|l| {
        let rest = &l[l.find("LAB-MARKER ")? + 11..];
        Some((field(rest, "boot")?, field(rest, "last_tick")?))
    })
}

fn field(s: &str, key: &str) -> Option<u64> {
    s.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.trim_end_matches('\r').parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_parsing() {
        let log = "x\nLAB-MARKER boot=2 last_tick=17 ticks=17 uptime=4.1\r\nLAB-TICK boot=2 tick=18\r\n[ 1.0] LAB-TICK boot=2 tick=19\nLAB-TICK boot=2 tick=";
        assert_eq!(marker(log), Some((2, 17)));
        assert_eq!(ticks(log), vec![(2, 18), (2, 19)]);
    }
}
