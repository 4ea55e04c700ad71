//! Issue 4, first test: a real QEMU VM (TCG, the tiny guest of `scripts/make-vm-image.sh`)
//! runs on the primary node from the mirrored disk, through the group's hooks
//! (`examples/hooks/qemu-vm.sh`), in the examples/netns-pair lab with its witness
//! ([`nbdmirror_tests::lab`]).
//!
//! 1. node-a is primary; the VM boots there (boot 1) and appends an fsync'd tick every second.
//! 2. `lab.sh kill a` (every process of node-a, QEMU included, then its links): within the
//!    heartbeat timeout + 2 s an NBD handshake through the virtual IP succeeds from the
//!    client host; the start hook boots the VM on node-b (boot 2), which reads back every tick
//!    the first VM printed (a printed tick was acknowledged by the disk).
//! 3. node-a returns: only what changed is resynchronised; `nbdmirror swap vm1` moves the VM
//!    back (boot 3), no tick lost.
//! 4. Clean stop: both images are byte-identical, the file system is clean after its journal
//!    replay, and its tick log never goes backwards.
//!
//! ~30-40 s, most of it three VM boots under TCG.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nbdmirror_tests::data::assert_files_equal;
use nbdmirror_tests::lab::{
    group_field, group_state, repo_root, volume_u64, Host, Lab, Link, GROUP, VOLUME_SIZE,
};
use nbdmirror_tests::run_command;
use nbdmirror_tests::vm::{self, Guest};

/// The example's heartbeat timeout (also the default).
const HB_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound for a VM boot under TCG on a loaded 2-core machine (4-7 s seen).
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// A node's VM: its hook wrapper, run directory and serial console.
struct VmNode {
    host: Host,
    dir: PathBuf,
}

impl VmNode {
    /// Writes the node's hook (examples/hooks/qemu-vm.sh with the test guest, through a
    /// wrapper that timestamps each action and keeps the consoles of earlier VMs) and adds
    /// it to the node's config.
    fn new(lab: &Lab, host: Host, guest: &Guest) -> VmNode {
        let dir = lab.path().join(format!("vm-{}", host.node()));
        fs::create_dir_all(dir.join("run")).unwrap();
        let hook = dir.join("hook.sh");
        fs::write(
            &hook,
            format!(
                r#"#!/bin/sh
export VM_RUN_DIR={d}/run VM_KERNEL={k} VM_INITRD={i} VM_ACCEL=tcg VM_MEM=256 VM_STOP_TIMEOUT=2
export VM_APPEND='console=ttyS0 panic=-1 quiet labmode=loop'
echo "$(date +%s.%N) ${{NBDMIRROR_ACTION:-?}} ${{NBDMIRROR_VOLUMES:-}}" >>{d}/hook-events.log
if [ "${{NBDMIRROR_ACTION:-}}" = start ] && [ -f {d}/run/console.log ] && ! bash {h} monitor 2>/dev/null; then
  mv {d}/run/console.log {d}/run/console.$(date +%s%N).log
fi
exec bash {h} "$@"
"#,
                d = dir.display(),
                k = guest.vmlinux.display(),
                i = guest.initrd.display(),
                h = repo_root().join("examples/hooks/qemu-vm.sh").display(),
            ),
        )
        .unwrap();
        fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();
        let h = hook.display();
        lab.add_to_group(
            Some(host),
            &format!(
                "hooks = {{ start = \"{h}\", stop = \"{h}\", monitor = \"{h}\", timeout = \"60s\" }}\n"
            ),
        );
        VmNode { host, dir }
    }

    fn console(&self) -> String {
        fs::read_to_string(self.dir.join("run/console.log")).unwrap_or_default()
    }

    fn hook_events(&self) -> String {
        fs::read_to_string(self.dir.join("hook-events.log")).unwrap_or_default()
    }

    /// Unix time of the first run of the hook `action` at or after `after`.
    fn hook_time(&self, action: &str, after: f64) -> Option<f64> {
        self.hook_events().lines().find_map(|l| {
            let mut w = l.split_whitespace();
            let t: f64 = w.next()?.parse().ok()?;
            (w.next()? == action && t >= after).then_some(t)
        })
    }

    fn last_tick(&self) -> u64 {
        vm::ticks(&self.console()).last().map(|t| t.1).unwrap_or(0)
    }

    /// Waits for the VM's boot marker and `more` ticks after it; returns (boot, the last tick
    /// it read back from the disk at boot).
    /// `after_boot`: the boot count of an earlier VM of this node whose console may still be
    /// there until the new QEMU truncates it (a marker at or below it is that VM's).
    fn wait_vm(&self, lab: &Lab, what: &str, more: u64, after_boot: u64) -> (u64, u64) {
        let (boot, read_back) = lab.wait_for(
            &format!("the VM's boot marker on {} ({what})", self.host.node()),
            BOOT_TIMEOUT,
            |_| vm::marker(&self.console()).filter(|(boot, _)| *boot > after_boot),
        );
        lab.wait_for(
            &format!("{more} ticks of the VM on {} ({what})", self.host.node()),
            Duration::from_secs(30),
            |_| (self.last_tick() >= read_back + more).then_some(()),
        );
        (boot, read_back)
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Both VMs' consoles and hook runs, and every daemon log, for a failure message.
fn report(msg: &str, lab: &Lab, a: &VmNode, b: &VmNode) -> String {
    format!(
        "{msg}\n--- node-a console ---\n{}\n--- node-b console ---\n{}\n--- hooks on node-a ---\n{}--- hooks on node-b ---\n{}{}",
        tail(&a.console(), 30),
        tail(&b.console(), 30),
        a.hook_events(),
        b.hook_events(),
        lab.all_logs()
    )
}

#[test]
fn vm_fails_over_to_node_b_and_swaps_back() {
    vm::require_tools(&["qemu-system-x86_64", "e2fsck", "debugfs", "arping"]);
    let t_test = Instant::now();
    let guest = Guest::build();
    let mut lab = Lab::new();
    let a = VmNode::new(&lab, Host::A, &guest);
    let b = VmNode::new(&lab, Host::B, &guest);
    macro_rules! ctx {
        ($($arg:tt)*) => {
            report(&format!($($arg)*), &lab, &a, &b)
        };
    }
    // node-a's copy holds the guest's file system; node-b's daemon creates its own empty and
    // receives a full copy at the first promotion.
    let img_a = lab.image(Host::A);
    fs::create_dir_all(img_a.parent().unwrap()).unwrap();
    guest.make_disk(&img_a, &format!("{}M", VOLUME_SIZE >> 20));

    // 1. The group starts on the preferred node; the VM boots there and ticks.
    lab.start_all();
    let (boot1, _) = a.wait_vm(&lab, "first boot", 3, 0);
    assert_eq!(boot1, 1, "{}", ctx!("the first VM must count boot 1"));
    lab.wait_handshake(Instant::now(), Duration::from_secs(10));

    // 2. node-a dies.
    let t_kill = Instant::now();
    let t_kill_unix = unix_now();
    lab.kill(Host::A);
    // Every tick in the console was printed after its fsync returned: acknowledged.
    let acked1 = a.last_tick();
    let to_handshake = lab.wait_handshake(t_kill, Duration::from_secs(30));
    let (boot2, read_back2) = b.wait_vm(&lab, "after the failover", 2, 0);
    let to_marker = t_kill.elapsed();
    let to_start_hook = b.hook_time("start", t_kill_unix).map(|t| t - t_kill_unix);
    eprintln!(
        "failover: crash -> NBD handshake through the VIP {to_handshake:?}, -> start hook on node-b {to_start_hook:?} s, -> VM marker on node-b {to_marker:?}; last acknowledged tick {acked1}, read back {read_back2}"
    );
    assert_eq!(boot2, 2, "{}", ctx!("the VM on node-b must count boot 2"));
    assert!(
        read_back2 >= acked1,
        "{}",
        ctx!("acknowledged ticks lost: the first VM printed tick {acked1}, node-b's VM read back {read_back2}")
    );
    let sb = lab.status(Host::B);
    assert_eq!(group_field(&sb, "primary_node"), "node-b", "{sb}");

    // 3. node-a returns as secondary; only the changed regions are copied.
    let dirty_on_b = volume_u64(&sb, "dirty_bytes");
    lab.cut(Link::All, Host::A, false);
    lab.start_node(Host::A);
    lab.wait_group_state(Host::A, &["secondary"], Duration::from_secs(30));
    lab.wait_in_sync(Duration::from_secs(60));
    let resynced = volume_u64(&lab.status(Host::A), "resync_bytes_received");
    eprintln!(
        "rejoin: node-b had {dirty_on_b} dirty bytes, node-a received {resynced} of {VOLUME_SIZE} bytes"
    );
    assert!(
        resynced > 0 && resynced <= VOLUME_SIZE / 8,
        "{}",
        ctx!("the rejoin resync copied {resynced} bytes of {VOLUME_SIZE}: not only what changed")
    );

    // The group goes back to node-a: node-b's VM stops (stop hook), node-a's boots.
    let t_swap = unix_now();
    let cfg_b = lab.config(Host::B);
    let out = lab.exec(
        Host::B,
        &[
            lab.bin().to_str().unwrap(),
            "swap",
            GROUP,
            "--timeout",
            "90",
            "--config",
            cfg_b.to_str().unwrap(),
        ],
        Duration::from_secs(100),
    );
    assert!(out.success(), "{}", ctx!("swap failed: {out}"));
    let (boot3, read_back3) = a.wait_vm(&lab, "after the swap", 2, boot1);
    assert!(
        b.hook_time("stop", t_swap).is_some(),
        "{}",
        ctx!("the stop hook did not run on node-b during the swap")
    );
    // node-b's VM stopped before node-a's started: its console is final.
    let acked2 = b.last_tick();
    assert_eq!(
        boot3,
        3,
        "{}",
        ctx!("the VM back on node-a must count boot 3")
    );
    assert!(
        read_back3 >= acked2,
        "{}",
        ctx!("ticks lost in the swap: node-b's VM printed tick {acked2}, node-a's VM read back {read_back3}")
    );
    assert_eq!(group_state(&lab.status(Host::A)), "primary");
    assert_eq!(group_state(&lab.status(Host::B)), "secondary");

    // 4. Clean stop: the witness first (so node-b cannot take over), the primary, the
    // secondary; then the VM, whose disk is gone.
    lab.stop(Host::C, Duration::from_secs(10));
    for h in [Host::A, Host::B] {
        let st = lab.stop(h, Duration::from_secs(30));
        assert!(st.success(), "{}", ctx!("{} exited with {st}", h.node()));
    }
    lab.lab_sh(&["kill", "a"]).ok();
    let acked3 = a.last_tick();
    assert_files_equal(&lab.image(Host::A), &lab.image(Host::B));

    // The guest's file system: clean after its journal replay; the tick log never goes
    // backwards or skips, and holds every acknowledged tick.
    let copy = lab.path().join("final.img");
    fs::copy(lab.image(Host::A), &copy).unwrap();
    let c = copy.to_str().unwrap();
    let fix = run_command(&["e2fsck", "-fy", c], Duration::from_secs(60));
    assert!(
        matches!(fix.code, Some(0) | Some(1)),
        "e2fsck could not repair the final image: {fix}"
    );
    run_command(&["e2fsck", "-fn", c], Duration::from_secs(60)).ok();
    let log = run_command(
        &["debugfs", "-R", "cat /ticks.log", c],
        Duration::from_secs(60),
    );
    let lines: Vec<(u64, u64)> = log
        .stdout
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let boot = it.next()?.strip_prefix("boot=")?.parse().ok()?;
            let tick = it.next()?.strip_prefix("tick=")?.parse().ok()?;
            Some((boot, tick))
        })
        .collect();
    assert!(!lines.is_empty(), "no ticks in the final image: {log}");
    for w in lines.windows(2) {
        assert!(
            w[1].1 == w[0].1 + 1 && w[1].0 >= w[0].0,
            "the tick log goes backwards or skips: {:?} then {:?}",
            w[0],
            w[1]
        );
    }
    let last = *lines.last().unwrap();
    assert!(
        last.1 >= acked3 && last.0 == 3,
        "the final image's last tick {last:?} is older than the last acknowledged one (boot 3, tick {acked3})"
    );
    let counter = run_command(
        &["debugfs", "-R", "cat /counter", c],
        Duration::from_secs(60),
    );
    assert_eq!(counter.stdout.trim(), "3", "boot counter: {counter}");
    eprintln!(
        "final: {} ticks over boots 1-3; the test took {:?}",
        lines.len(),
        t_test.elapsed()
    );

    // Checked last, so that a slow failover still lets the test check everything else.
    assert!(
        to_handshake <= HB_TIMEOUT + Duration::from_secs(2),
        "{}",
        ctx!("everything else passed, but the NBD handshake through the VIP took {to_handshake:?} after the crash (limit: heartbeat timeout 3 s + 2 s)")
    );
}
