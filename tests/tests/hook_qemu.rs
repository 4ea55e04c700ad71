//! `examples/hooks/qemu-vm.sh` with a fake `qemu-system-x86_64` on PATH: a script that records
//! its arguments and, for `-daemonize`, leaves a background copy of itself running under the
//! pidfile, like QEMU. Checks start -> monitor 0 -> start again (no second VM) -> stop ->
//! monitor non-zero, the drive arguments and the accelerator choice. Booting a real VM is
//! another test's job.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const FAKE_QEMU: &str = r#"#!/bin/bash
# Fake qemu-system-x86_64 for the hook test.
if [ -n "${FAKE_QEMU_CHILD:-}" ]; then
  echo $$ > "$FAKE_QEMU_PIDFILE"
  while :; do sleep 0.2; done
fi
daemonize= pidfile=
prev=
for a in "$@"; do
  [ "$a" = -daemonize ] && daemonize=1
  [ "$prev" = -pidfile ] && pidfile=$a
  prev=$a
done
if [ -z "$daemonize" ]; then
  echo "probe $*" >> "$FAKE_QEMU_LOG"
  exit 1          # the KVM probe fails, as on a machine without working KVM
fi
printf '%s\n' "$@" > "$FAKE_QEMU_ARGS"
FAKE_QEMU_CHILD=1 FAKE_QEMU_PIDFILE=$pidfile setsid "$0" "$@" </dev/null >/dev/null 2>&1 &
for i in $(seq 100); do [ -s "$pidfile" ] && exit 0; sleep 0.05; done
exit 1
"#;

struct Lab {
    dir: tempfile::TempDir,
}

impl Lab {
    fn new() -> Lab {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("bin");
        fs::create_dir(&bin).expect("mkdir bin");
        let qemu = bin.join("qemu-system-x86_64");
        fs::write(&qemu, FAKE_QEMU).expect("write fake qemu");
        fs::set_permissions(&qemu, fs::Permissions::from_mode(0o755)).expect("chmod");
        Lab { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn hook(&self, action: &str, extra_env: &[(&str, &str)]) -> Output {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hooks/qemu-vm.sh");
        let path = format!(
            "{}:{}",
            self.path("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut cmd = Command::new("bash");
        cmd.arg(script)
            .env("PATH", path)
            .env("NBDMIRROR_ACTION", action)
            .env("NBDMIRROR_GROUP", "vm1")
            .env("NBDMIRROR_NODE", "node-a")
            .env(
                "NBDMIRROR_VOLUMES",
                "disk0=nbd://127.0.0.1:10809/disk0 disk1=nbd://127.0.0.1:10809/disk1",
            )
            .env("VM_RUN_DIR", self.path("run"))
            .env("VM_KERNEL", "/nonexistent/vmlinux")
            .env("VM_STOP_TIMEOUT", "2")
            .env("FAKE_QEMU_ARGS", self.path("qemu-args"))
            .env("FAKE_QEMU_LOG", self.path("qemu-probes"))
            .env_remove("VM_ACCEL")
            .env_remove("VM_NBD_RECONNECT_DELAY")
            .stdin(Stdio::null());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        cmd.output().expect("run qemu-vm.sh")
    }

    fn qemu_args(&self) -> Vec<String> {
        fs::read_to_string(self.path("qemu-args"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn pid(&self) -> Option<i32> {
        fs::read_to_string(self.path("run/qemu.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Never leave a fake VM behind, whatever failed.
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

fn code(out: &Output) -> Option<i32> {
    out.status.code()
}

fn show(out: &Output) -> String {
    format!(
        "{:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| !r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

#[test]
fn start_monitor_stop_cycle() {
    let lab = Lab::new();
    let out = lab.hook("monitor", &[]);
    assert_eq!(code(&out), Some(1), "monitor before start: {}", show(&out));

    let out = lab.hook("start", &[]);
    assert_eq!(code(&out), Some(0), "start: {}", show(&out));
    let pid = lab.pid().expect("pidfile after start");
    assert!(alive(pid));

    let args = lab.qemu_args();
    for want in [
        "file=nbd://127.0.0.1:10809/disk0,format=raw,if=virtio,cache=none",
        "file=nbd://127.0.0.1:10809/disk1,format=raw,if=virtio,cache=none",
        "-daemonize",
        "/nonexistent/vmlinux",
    ] {
        assert!(args.iter().any(|a| a == want), "missing {want} in {args:?}");
    }
    // The KVM probe failed (or /dev/kvm is absent): TCG, never -enable-kvm.
    let accel = args
        .iter()
        .position(|a| a == "-accel")
        .and_then(|i| args.get(i + 1));
    assert_eq!(accel.map(String::as_str), Some("tcg"), "{args:?}");
    assert!(!args.iter().any(|a| a.contains("kvm")), "{args:?}");
    // Disks in the order of NBDMIRROR_VOLUMES (vda = disk0).
    let d0 = args.iter().position(|a| a.contains("/disk0,"));
    let d1 = args.iter().position(|a| a.contains("/disk1,"));
    assert!(d0 < d1, "{args:?}");

    let out = lab.hook("monitor", &[]);
    assert_eq!(code(&out), Some(0), "monitor while running: {}", show(&out));

    // Starting again must not start a second VM on the same disks.
    let out = lab.hook("start", &[]);
    assert_eq!(code(&out), Some(0), "second start: {}", show(&out));
    assert_eq!(lab.pid(), Some(pid));

    let started = Instant::now();
    let out = lab.hook("stop", &[]);
    assert_eq!(code(&out), Some(0), "stop: {}", show(&out));
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(!alive(pid), "fake QEMU {pid} survived stop");

    let out = lab.hook("monitor", &[]);
    assert_ne!(code(&out), Some(0), "monitor after stop: {}", show(&out));
    let out = lab.hook("stop", &[]);
    assert_eq!(code(&out), Some(0), "second stop: {}", show(&out));
}

#[test]
fn reconnect_delay_uses_explicit_nbd_options() {
    let lab = Lab::new();
    let out = lab.hook(
        "start",
        &[("VM_NBD_RECONNECT_DELAY", "15"), ("VM_ACCEL", "tcg")],
    );
    assert_eq!(code(&out), Some(0), "start: {}", show(&out));
    let args = lab.qemu_args();
    let want = "driver=raw,file.driver=nbd,file.server.type=inet,file.server.host=127.0.0.1,\
                file.server.port=10809,file.export=disk0,file.reconnect-delay=15,if=virtio,cache=none";
    assert!(args.iter().any(|a| a == want), "{args:?}");
    // VM_ACCEL=tcg: no KVM probe at all.
    assert!(!lab.path("qemu-probes").exists());
    let out = lab.hook("stop", &[]);
    assert_eq!(code(&out), Some(0), "stop: {}", show(&out));
}

#[test]
fn refuses_what_it_cannot_do() {
    let lab = Lab::new();
    let out = lab.hook("start", &[("NBDMIRROR_VOLUMES", "")]);
    assert_eq!(code(&out), Some(1), "no volumes: {}", show(&out));
    assert!(lab.pid().is_none());
    assert_eq!(code(&lab.hook("fence", &[])), Some(2));
    assert_eq!(code(&lab.hook("reboot", &[])), Some(2));
    let out = lab.hook("start", &[("VM_ACCEL", "xen")]);
    assert_eq!(code(&out), Some(2), "bad accel: {}", show(&out));
}
