//! Issue 4, quorum by fencing: no witness, a `fence` hook on each node that powers off the
//! other (here: `lab.sh kill`, SIGKILL to every process of the host and its links down).
//! - The primary dies: the survivor gives a live primary one more failure timeout to fence
//!   first, then fences the dead one (harmless), once, and takes over.
//! - The primary is cut off but alive: it fences the secondary first and serves alone (never
//!   two primaries); writes it makes alone wait until the fence succeeded.

use std::time::{Duration, Instant};

use nbdmirror_tests::assert_qemu_io_ok;
use nbdmirror_tests::lab::{group_field, group_state, Host, Lab, Link};

/// Both configs: no witness; node-a's fence kills node-b and node-b's kills node-a.
fn fence_lab() -> Lab {
    let lab = Lab::new();
    let script = lab.path().join("fence.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n# NBDMIRROR_PEER names the node to power off.\n\
             case \"$NBDMIRROR_PEER\" in node-a) h=a ;; node-b) h=b ;; *) exit 1 ;; esac\n\
             echo \"fencing $NBDMIRROR_PEER\" >> {log}\n\
             exec bash {lab_sh} kill $h\n",
            log = lab.path().join("fence.log").display(),
            lab_sh = nbdmirror_tests::lab::example_dir().join("lab.sh").display(),
        ),
    )
    .unwrap();
    for f in ["node-a.toml", "node-b.toml"] {
        lab.patch(f, "witness = \"10.99.0.10:7790\"\n", "");
    }
    lab.add_to_group(
        None,
        &format!(
            "hooks = {{ fence = \"sh {}\", timeout = \"20s\" }}\n",
            script.display()
        ),
    );
    lab
}

fn fence_log(lab: &Lab) -> String {
    std::fs::read_to_string(lab.path().join("fence.log")).unwrap_or_default()
}

#[test]
fn a_dead_primary_is_fenced_and_the_survivor_takes_over() {
    let mut lab = fence_lab();
    lab.start_all();
    lab.wait_handshake(Instant::now(), Duration::from_secs(20));
    assert_qemu_io_ok(&lab.qemu_io(&["write -P 0x5a 0 4M", "flush"]));
    let t0 = Instant::now();
    lab.kill(Host::A);
    // Heartbeat timeout (3 s) + the primary's grace (3 s) + fence + promotion.
    let took = lab.wait_handshake(t0, Duration::from_secs(30));
    eprintln!("dead primary fenced, survivor answers after {took:?}");
    assert!(
        took >= Duration::from_secs(5),
        "node-b must leave a live primary time to fence first: {took:?}"
    );
    assert!(
        fence_log(&lab).contains("fencing node-a"),
        "{}",
        fence_log(&lab)
    );
    let b = lab.status(Host::B);
    assert_eq!(group_field(&b, "primary_node"), "node-b", "{b}");
    assert_qemu_io_ok(&lab.qemu_io(&["read -P 0x5a 0 4M"]));
    // Serving alone after a fence needs no second one: a few heartbeat intervals later the
    // hook has still run once.
    std::thread::sleep(Duration::from_secs(2));
    let fenced = fence_log(&lab).matches("fencing node-a").count();
    assert_eq!(
        fenced,
        1,
        "node-a fenced {fenced} times:\n{}",
        fence_log(&lab)
    );
}

#[test]
fn an_isolated_live_primary_fences_its_peer_first() {
    let mut lab = fence_lab();
    lab.start_all();
    lab.wait_handshake(Instant::now(), Duration::from_secs(20));
    lab.cut(Link::All, Host::A, true);
    let t0 = Instant::now();
    // node-a loses node-b after the heartbeat timeout and fences it at once; node-b would
    // only fence after a second timeout, by which time it is gone.
    lab.wait_for("node-a fences node-b", Duration::from_secs(20), |lab| {
        fence_log(lab).contains("fencing node-b").then_some(())
    });
    eprintln!("node-a fenced node-b after {:?}", t0.elapsed());
    let a = lab.wait_group_state(Host::A, &["alone"], Duration::from_secs(20));
    assert_eq!(group_state(&a), "alone", "{a}");
    assert!(
        !fence_log(&lab).contains("fencing node-a"),
        "both nodes fenced: {}",
        fence_log(&lab)
    );
}

/// The monitor hook runs off the group's tick: one that takes long (here 40 s, past its
/// 20 s timeout) must not hold the fence, and with it every write made alone, when the
/// peer dies meanwhile.
#[test]
fn a_slow_monitor_hook_does_not_hold_the_fence_of_a_dead_peer() {
    let lab = fence_lab();
    let monitor = lab.path().join("slow-monitor.sh");
    std::fs::write(
        &monitor,
        format!(
            "#!/bin/sh\necho \"$NBDMIRROR_NODE $NBDMIRROR_ACTION\" >> {d}/hooks.log\n\
             if [ \"$NBDMIRROR_NODE\" = node-a ]; then sleep 40; fi\n",
            d = lab.path().display()
        ),
    )
    .unwrap();
    for f in ["node-a.toml", "node-b.toml"] {
        lab.patch(
            f,
            "hooks = { fence =",
            &format!(
                "hooks = {{ monitor = \"sh {}\", monitor_interval = \"1s\", fence =",
                monitor.display()
            ),
        );
    }
    let mut lab = lab;
    lab.start_all();
    lab.wait_handshake(Instant::now(), Duration::from_secs(20));
    lab.wait_for("node-a's monitor hook", Duration::from_secs(20), |lab| {
        std::fs::read_to_string(lab.path().join("hooks.log"))
            .unwrap_or_default()
            .contains("node-a monitor")
            .then_some(())
    });
    let out = lab.lab_sh(&["kill", "b"]);
    assert!(out.success(), "{out}");
    let t0 = Instant::now();
    lab.wait_for("node-a fences node-b", Duration::from_secs(15), |lab| {
        fence_log(lab).contains("fencing node-b").then_some(())
    });
    eprintln!("node-a fenced the dead node-b after {:?}", t0.elapsed());
    let a = lab.wait_group_state(Host::A, &["alone"], Duration::from_secs(10));
    assert_eq!(group_state(&a), "alone", "{a}");
}

/// A fence agent slower than the heartbeat timeout (a BMC login): without a delay the
/// secondary starts its own fence before the primary's has acted, and both nodes go down.
/// `hooks.fence_delay` holds the secondary back until the primary's fence has landed.
#[test]
fn a_slow_fence_agent_with_a_fence_delay_fences_only_once() {
    let lab = fence_lab();
    lab.patch("fence.sh", "exec bash", "sleep 5\nexec bash");
    for f in ["node-a.toml", "node-b.toml"] {
        lab.patch(
            f,
            "timeout = \"20s\" }",
            "timeout = \"20s\", fence_delay = \"12s\" }",
        );
    }
    let mut lab = lab;
    lab.start_all();
    lab.wait_handshake(Instant::now(), Duration::from_secs(20));
    lab.cut(Link::All, Host::A, true);
    let a = lab.wait_group_state(Host::A, &["alone"], Duration::from_secs(40));
    assert_eq!(group_state(&a), "alone", "{a}");
    // Past the time node-b would have fenced without the delay (two timeouts) and well
    // into the delay: node-a's fence has landed, node-b never started one.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        fence_log(&lab).contains("fencing node-b") && !fence_log(&lab).contains("fencing node-a"),
        "both nodes fenced, or the wrong one: {}\n{}",
        fence_log(&lab),
        lab.all_logs()
    );
}

/// Fence-only quorum and a swap: node-b takes the group with node-a's consent, and its start
/// hook takes 15 s. The network splits during the hook. node-b has fenced nobody, so a write
/// made alone there must wait: node-a (which saw node-b primary) fences node-b and takes the
/// group back from its own copy, and a write node-b acknowledged alone would be lost.
#[test]
fn after_a_swap_nothing_is_acknowledged_alone_before_a_fence() {
    let lab = fence_lab();
    let slow = lab.path().join("slow-start.sh");
    std::fs::write(
        &slow,
        format!(
            "#!/bin/sh\necho \"$NBDMIRROR_NODE $NBDMIRROR_ACTION\" >> {d}/hooks.log\n\
             if [ \"$NBDMIRROR_ACTION\" = start ] && [ \"$NBDMIRROR_NODE\" = node-b ]; then sleep 15; fi\n",
            d = lab.path().display()
        ),
    )
    .unwrap();
    for f in ["node-a.toml", "node-b.toml"] {
        lab.patch(
            f,
            "hooks = { fence =",
            &format!("hooks = {{ start = \"sh {}\", fence =", slow.display()),
        );
    }
    let mut lab = lab;
    lab.start_all();
    lab.wait_handshake(Instant::now(), Duration::from_secs(20));
    let cfg_a = lab.config(Host::A);
    let out = lab.nbdmirror(
        Host::A,
        &[
            "swap",
            nbdmirror_tests::lab::GROUP,
            "--config",
            cfg_a.to_str().unwrap(),
        ],
    );
    assert!(out.success(), "swap failed: {out}\n{}", lab.all_logs());
    lab.wait_for("node-b's start hook", Duration::from_secs(30), |lab| {
        std::fs::read_to_string(lab.path().join("hooks.log"))
            .unwrap_or_default()
            .contains("node-b start")
            .then_some(())
    });
    lab.cut(Link::All, Host::B, true);
    let writer = lab.spawn_qemu_io(
        Host::B,
        "nbd://127.0.0.1:10809/disk0",
        &["write -P 0xee 16M 64k"],
    );
    // node-a fences node-b (its grace after losing a primary: one failure timeout).
    lab.wait_for("node-a fences node-b", Duration::from_secs(30), |lab| {
        fence_log(lab).contains("fencing node-b").then_some(())
    });
    let (_, out) = writer.wait_or_kill(Duration::from_secs(10));
    eprintln!("the write on node-b during the split: {out}");
    assert!(
        !out.contains("wrote "),
        "node-b acknowledged a write alone without fencing node-a first: {out}\n{}",
        lab.all_logs()
    );
}
