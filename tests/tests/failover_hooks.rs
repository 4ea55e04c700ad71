//! Issue 4, the VM hooks and failback, with stand-in hooks (shell scripts that record what
//! they are asked to do; the real QEMU hook has its own test, failover_vm.rs):
//! - a VM that dies on a healthy primary is restarted there (bounded retries), then the group
//!   fails over to the peer;
//! - `auto_failback = true` moves the group back to the preferred node once it is in sync.

use std::time::{Duration, Instant};

use nbdmirror_tests::lab::{group_field, Host, Lab, Link, GROUP};

/// A hook that keeps a marker per node: start creates it, stop removes it, monitor fails when
/// it is missing or when `broken-NODE` exists. Every call is appended to hooks.log.
fn hook_lab(extra: &str) -> Lab {
    let lab = Lab::new();
    let dir = lab.path().to_path_buf();
    let script = dir.join("hook.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nd={d}\necho \"$NBDMIRROR_NODE $NBDMIRROR_ACTION\" >> $d/hooks.log\n\
             case \"$NBDMIRROR_ACTION\" in\n\
             start) touch $d/vm-$NBDMIRROR_NODE ;;\n\
             stop) rm -f $d/vm-$NBDMIRROR_NODE ;;\n\
             monitor) test -f $d/vm-$NBDMIRROR_NODE && test ! -f $d/broken-$NBDMIRROR_NODE ;;\n\
             esac\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let hooks = format!(
        "hooks = {{ start = \"sh {s}\", stop = \"sh {s}\", monitor = \"sh {s}\", \
         monitor_interval = \"1s\", restart_attempts = 1, timeout = \"10s\" }}\n{extra}",
        s = script.display()
    );
    lab.add_to_group(None, &hooks);
    lab
}

/// A lab whose group has one hook script (`hooks`: the TOML inside `hooks = { }`, `{}` the
/// script's path) that logs each call and its end to hooks.log, and sleeps `secs` when asked
/// for `action` on `node`.
fn slow_hook_lab(action: &str, node: &str, secs: u32, hooks: &str) -> Lab {
    let lab = Lab::new();
    let dir = lab.path().to_path_buf();
    let script = dir.join(format!("slow-{action}.sh"));
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$NBDMIRROR_NODE $NBDMIRROR_ACTION\" >> {d}/hooks.log\n\
             if [ \"$NBDMIRROR_ACTION\" = {action} ] && [ \"$NBDMIRROR_NODE\" = {node} ]; then sleep {secs}; fi\n\
             echo \"$NBDMIRROR_NODE $NBDMIRROR_ACTION done\" >> {d}/hooks.log\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let hooks = hooks.replace("{}", &script.display().to_string());
    lab.add_to_group(None, &format!("hooks = {{ {hooks} }}\n"));
    lab
}

fn hooks_log(lab: &Lab) -> String {
    std::fs::read_to_string(lab.path().join("hooks.log")).unwrap_or_default()
}

fn primary_node(lab: &Lab, host: Host) -> String {
    lab.try_status(host)
        .map(|s| group_field(&s, "primary_node"))
        .unwrap_or_default()
}

#[test]
fn a_failing_vm_is_restarted_then_the_group_fails_over() {
    let mut lab = hook_lab("");
    lab.start_all();
    lab.wait_handshake(Instant::now(), Duration::from_secs(20));
    lab.wait_for("the VM started on node-a", Duration::from_secs(10), |lab| {
        hooks_log(lab).contains("node-a start").then_some(())
    });
    // The VM on node-a breaks for good.
    std::fs::write(lab.path().join("broken-node-a"), b"").unwrap();
    lab.wait_for("the group on node-b", Duration::from_secs(40), |lab| {
        (primary_node(lab, Host::B) == "node-b" && hooks_log(lab).contains("node-b start"))
            .then_some(())
    });
    let log = hooks_log(&lab);
    // Restarted once on node-a (stop + start after the first failed monitor), then moved.
    let a_starts = log.matches("node-a start").count();
    assert!(
        a_starts >= 2,
        "node-a's VM was not restarted before the failover:\n{log}"
    );
    assert!(log.contains("node-a stop"), "{log}");
    let a = lab.status(Host::A);
    assert_ne!(group_field(&a, "state"), "primary", "{a}");
}

#[test]
fn auto_failback_returns_the_group_to_the_preferred_node() {
    let mut lab = hook_lab("auto_failback = true\n");
    lab.start_all();
    lab.wait_handshake(Instant::now(), Duration::from_secs(20));
    lab.kill(Host::A);
    lab.wait_for("the group on node-b", Duration::from_secs(20), |lab| {
        (primary_node(lab, Host::B) == "node-b").then_some(())
    });
    // node-a returns: it resyncs, then the group comes back to it by itself.
    lab.cut(nbdmirror_tests::lab::Link::All, Host::A, false);
    lab.start_node(Host::A);
    lab.wait_for("the group back on node-a", Duration::from_secs(60), |lab| {
        (primary_node(lab, Host::A) == "node-a" && primary_node(lab, Host::B) == "node-a")
            .then_some(())
    });
    let log = hooks_log(&lab);
    assert!(
        log.contains("node-b stop"),
        "node-b's VM was not stopped: {log}"
    );
}

/// node-b's start hook takes 6 s after it took the group over from a dead node-a, longer than
/// the witness lease (2.5 s) the tick would renew. The lease is renewed meanwhile, so writes
/// made alone go through at once and the VIP stays where the VM is starting.
#[test]
fn a_slow_start_hook_neither_stalls_writes_alone_nor_drops_the_vip() {
    let mut lab = slow_hook_lab("start", "node-b", 6, "start = \"sh {}\", timeout = \"20s\"");
    lab.start_all();
    lab.wait_handshake(Instant::now(), Duration::from_secs(20));
    lab.kill(Host::A);
    lab.wait_for("node-b's start hook", Duration::from_secs(30), |lab| {
        hooks_log(lab).contains("node-b start").then_some(())
    });
    let hook_started = Instant::now();
    // Past the lease the takeover registered, with the hook still running.
    std::thread::sleep(Duration::from_millis(3500));
    assert!(
        !hooks_log(&lab).contains("node-b start done"),
        "the hook ended early"
    );
    assert!(
        lab.holds_vip(Host::B),
        "node-b dropped the VIP during its start hook"
    );
    let t = Instant::now();
    nbdmirror_tests::assert_qemu_io_ok(&lab.qemu_io(&["write -P 0x77 0 64k", "flush"]));
    let took = t.elapsed();
    eprintln!(
        "write alone during the hook ({:?} into it) took {took:?}",
        hook_started.elapsed()
    );
    assert!(
        !hooks_log(&lab).contains("node-b start done"),
        "the write completed only after the hook ended ({took:?})\n{}",
        lab.all_logs()
    );
}

/// A long monitor hook runs inside the group's tick. A write made alone in the meantime (the
/// replication link just dropped) starts a generation the witness must register before the
/// write is acknowledged: that registration must not wait for the hook to end.
#[test]
fn a_slow_monitor_hook_does_not_stall_the_first_write_made_alone() {
    let mut lab = slow_hook_lab(
        "monitor",
        "node-a",
        15,
        "monitor = \"sh {}\", monitor_interval = \"1s\", timeout = \"30s\"",
    );
    lab.start_all();
    lab.wait_handshake(Instant::now(), Duration::from_secs(20));
    nbdmirror_tests::assert_qemu_io_ok(&lab.qemu_io(&["write -P 0x11 0 64k", "flush"]));
    lab.wait_for("node-a's monitor hook", Duration::from_secs(30), |lab| {
        hooks_log(lab).contains("node-a monitor").then_some(())
    });
    let hook_started = Instant::now();
    lab.cut(Link::Repl, Host::A, true);
    let t = Instant::now();
    nbdmirror_tests::assert_qemu_io_ok(&lab.qemu_io(&["write -P 0x77 0 64k", "flush"]));
    let took = t.elapsed();
    eprintln!(
        "write alone during the monitor hook ({:?} into it) took {took:?}",
        hook_started.elapsed()
    );
    assert!(
        !hooks_log(&lab).contains("node-a monitor done"),
        "the write made alone completed only after the monitor hook ended ({took:?})\n{}",
        lab.all_logs()
    );
    lab.cut(Link::Repl, Host::A, false);
}

/// `swap` gives up waiting while node-a's stop hook (6 s) is still stopping the VM: the
/// handover has begun and cannot be withdrawn, so the command waits for it and reports the
/// move instead of failing (and claiming it withdrew a swap that then happened). Run on
/// either node.
#[test]
fn a_swap_that_times_out_during_the_handover_waits_for_it() {
    let mut lab = slow_hook_lab("stop", "node-a", 6, "stop = \"sh {}\", timeout = \"20s\"");
    lab.start_all();
    lab.wait_handshake(Instant::now(), Duration::from_secs(20));
    let cfg_b = lab.config(Host::B);
    let t0 = Instant::now();
    let out = lab.nbdmirror(
        Host::B,
        &[
            "swap",
            GROUP,
            "--timeout",
            "2",
            "--json",
            "--config",
            cfg_b.to_str().unwrap(),
        ],
    );
    assert!(
        out.success() && out.stdout.contains("\"moved\": true"),
        "swap during a slow handover ({:?}): {out}\n{}",
        t0.elapsed(),
        lab.all_logs()
    );
    assert_eq!(primary_node(&lab, Host::B), "node-b");
    assert!(
        hooks_log(&lab).contains("node-a stop done"),
        "the stop hook should have run to its end:\n{}",
        hooks_log(&lab)
    );
}

/// A swap whose stop hook fails leaves the group where it is: the VM may still run there,
/// and starting it on the peer would run it twice. `status` names the failed hook.
#[test]
fn a_swap_whose_stop_hook_fails_keeps_the_group_and_says_why() {
    let mut lab = Lab::new();
    std::fs::write(
        lab.path().join("stop-fails.sh"),
        "#!/bin/sh\necho \"$NBDMIRROR_NODE $NBDMIRROR_ACTION\" >> \"$(dirname \"$0\")/hooks.log\"\n\
         if [ \"$NBDMIRROR_ACTION\" = stop ]; then echo 'virsh: domain is busy' >&2; exit 3; fi\n",
    )
    .unwrap();
    let script = lab.path().join("stop-fails.sh");
    lab.add_to_group(
        None,
        &format!(
            "hooks = {{ stop = \"sh {}\", timeout = \"10s\" }}\n",
            script.display()
        ),
    );
    lab.start_all();
    lab.wait_handshake(Instant::now(), Duration::from_secs(20));
    let cfg_b = lab.config(Host::B);
    let out = lab.nbdmirror(
        Host::B,
        &[
            "swap",
            GROUP,
            "--timeout",
            "5",
            "--json",
            "--config",
            cfg_b.to_str().unwrap(),
        ],
    );
    assert!(
        !out.stdout.contains("\"moved\": true"),
        "the group moved although its stop hook failed: {out}\n{}",
        lab.all_logs()
    );
    assert!(
        hooks_log(&lab).contains("node-a stop"),
        "{}",
        hooks_log(&lab)
    );
    assert!(
        !hooks_log(&lab).contains("node-b start"),
        "the VM was started on node-b:\n{}",
        hooks_log(&lab)
    );
    let a = lab.status(Host::A);
    assert_eq!(group_field(&a, "primary_node"), "node-a", "{a}");
    let failure = a.get("groups").at(0).get("last_hook_failure");
    assert_eq!(failure.get("action").as_str(), Some("stop"), "{a}");
    assert!(
        failure
            .get("detail")
            .as_str()
            .is_some_and(|d| d.contains("exit code 3") && d.contains("domain is busy")),
        "{a}"
    );
    // Still serving: a client writes through node-a.
    lab.wait_handshake(Instant::now(), Duration::from_secs(10));
}

/// A primary cut off from its peer and the witness suspends, and stops its VM: the peer
/// takes the group and starts the VM there, and a frozen copy must not run beside it.
#[test]
fn an_isolated_primary_stops_its_vm_before_the_peer_runs_it() {
    let mut lab = hook_lab("");
    lab.start_all();
    lab.wait_handshake(Instant::now(), Duration::from_secs(20));
    lab.wait_for("the VM started on node-a", Duration::from_secs(10), |lab| {
        hooks_log(lab).contains("node-a start").then_some(())
    });
    lab.cut(Link::All, Host::A, true);
    lab.wait_for("node-b to start the VM", Duration::from_secs(30), |lab| {
        hooks_log(lab).contains("node-b start").then_some(())
    });
    lab.wait_for(
        "node-a to stop its VM while isolated",
        Duration::from_secs(10),
        |lab| hooks_log(lab).contains("node-a stop").then_some(()),
    );
    assert!(
        !lab.path().join("vm-node-a").exists(),
        "the VM still runs on node-a:\n{}",
        hooks_log(&lab)
    );
    let sa = lab.status(Host::A);
    assert_eq!(group_field(&sa, "state"), "suspended", "{sa}");
    // Healed, node-a gives the group up and does not start the VM again.
    lab.cut(Link::All, Host::A, false);
    lab.wait_for(
        "node-a to give the group up",
        Duration::from_secs(30),
        |lab| {
            let s = lab.try_status(Host::A).ok()?;
            let st = group_field(&s, "state");
            (st != "suspended" && st != "primary" && st != "alone").then_some(())
        },
    );
    assert_eq!(
        hooks_log(&lab).matches("node-a start").count(),
        1,
        "{}",
        hooks_log(&lab)
    );
}

/// A virtual IP that cannot be added (the configured interface does not exist on this node)
/// is shown in `status`, not only logged: the group serves, but clients cannot reach it
/// through the address.
#[test]
fn a_virtual_ip_that_cannot_be_added_shows_in_status() {
    let mut lab = Lab::new();
    lab.patch(
        Host::A.config_name(),
        "vip_interface = \"pub0\"",
        "vip_interface = \"pub9\"",
    );
    lab.start_all();
    let a = lab.wait_for(
        "node-a to report its VIP problem",
        Duration::from_secs(30),
        |lab| {
            let s = lab.try_status(Host::A).ok()?;
            let p = s
                .get("groups")
                .at(0)
                .get("vip_problem")
                .as_str()?
                .to_string();
            Some((s, p))
        },
    );
    assert!(a.1.contains("pub9"), "{}", a.0);
    let cfg = lab.config(Host::A);
    let text = lab.nbdmirror(Host::A, &["status", "--config", cfg.to_str().unwrap()]);
    assert!(
        text.stdout.contains("virtual IP: cannot add") && text.stdout.contains("pub9"),
        "{text}"
    );
}

/// A daemon killed while its VM runs (kill -9 of the daemon alone, the host up) cannot stop
/// it; the peer takes the group and starts its own. When the daemon starts again it stops
/// the VM it left, before anything else.
#[test]
fn a_daemon_killed_with_its_vm_running_stops_it_when_it_starts_again() {
    let mut lab = hook_lab("");
    lab.start_all();
    lab.wait_handshake(Instant::now(), Duration::from_secs(20));
    lab.wait_for("the VM started on node-a", Duration::from_secs(10), |lab| {
        hooks_log(lab).contains("node-a start").then_some(())
    });
    lab.kill_daemon(Host::A);
    lab.wait_for("node-b to start the VM", Duration::from_secs(30), |lab| {
        hooks_log(lab).contains("node-b start").then_some(())
    });
    assert!(
        lab.path().join("vm-node-a").exists(),
        "nobody could stop node-a's VM yet:\n{}",
        hooks_log(&lab)
    );
    lab.start_node(Host::A);
    lab.wait_for(
        "node-a to stop the VM its previous run left",
        Duration::from_secs(20),
        |lab| (!lab.path().join("vm-node-a").exists()).then_some(()),
    );
    assert!(
        hooks_log(&lab).contains("node-a stop"),
        "{}",
        hooks_log(&lab)
    );
    // It comes back secondary and leaves the group (and the VM) on node-b.
    let b = lab.status(Host::B);
    assert_eq!(group_field(&b, "primary_node"), "node-b", "{b}");
}
