//! Issue 4: the primary (node-a) is isolated from both its peer and the witness but keeps
//! running. Within the heartbeat timeout (+1 s) it suspends the group: a write issued in
//! host a against its own export waits, neither failed nor acknowledged. node-b takes over
//! with the witness's vote; node-a has removed the virtual IP by then, so the address is on
//! one host only. After healing node-a does not stay primary, and no acknowledged write is
//! lost.

use std::time::{Duration, Instant};

use nbdmirror_tests::assert_qemu_io_ok;
use nbdmirror_tests::lab::{
    group_field, group_state, is_active, volume_field, Host, Json, Lab, Link,
};

const HB_TIMEOUT: Duration = Duration::from_secs(3);

/// Isolates node-a (it keeps running), checks that it suspends and node-b takes over, heals,
/// and checks that node-a gave the group up and every acknowledged write is on node-b.
fn isolate_and_heal(lab: &mut Lab) {
    lab.start_all();
    lab.wait_handshake(Instant::now(), Duration::from_secs(20));
    assert_qemu_io_ok(&lab.qemu_io(&["write -P 0x11 0 2M", "flush"]));

    let t0 = Instant::now();
    lab.cut(Link::All, Host::A, true);
    lab.wait_group_state(Host::A, &["suspended"], HB_TIMEOUT + Duration::from_secs(1));
    eprintln!("cut -> node-a suspended: {:?}", t0.elapsed());

    // A write inside host a, against node-a's own export: it must not complete.
    let mut writer = lab.spawn(
        Host::A,
        &[
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 0xee 16M 64k",
            "-c",
            "flush",
            "nbd://127.0.0.1:10809/disk0",
        ],
    );
    // node-b takes over through the witness.
    let sb = lab.wait_group_state(Host::B, &["primary", "alone"], Duration::from_secs(20));
    eprintln!("cut -> node-b {}: {:?}", group_state(&sb), t0.elapsed());
    assert_eq!(group_field(&sb, "primary_node"), "node-b", "{sb}");
    // The suspended node gave the address up when its lease ended, before the witness let
    // node-b in (half a second of margin by design): never on both hosts.
    assert!(lab.holds_vip(Host::B), "node-b took over without the VIP");
    assert!(
        !lab.holds_vip(Host::A),
        "the suspended node-a still holds the VIP node-b raised\n{}",
        lab.all_logs()
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        writer.is_running(),
        "the write in host a completed while node-a was isolated (suspended): {}\n{}",
        writer.output(),
        lab.all_logs()
    );
    let sa = lab.status(Host::A);
    assert_eq!(
        group_state(&sa),
        "suspended",
        "node-a left `suspended` while still isolated: {sa}"
    );
    // Clients reach node-b through the VIP; the old data is there.
    lab.wait_handshake(Instant::now(), Duration::from_secs(10));
    assert_qemu_io_ok(&lab.qemu_io(&["read -P 0x11 0 2M"]));

    // Heal: node-a must give the group up.
    let healed = Instant::now();
    lab.cut(Link::All, Host::A, false);
    let sa = lab.wait_for(
        "node-a to give up the group after healing",
        Duration::from_secs(30),
        |lab| {
            let s = lab.try_status(Host::A).ok()?;
            let st = group_state(&s);
            (!is_active(&st) && st != "suspended").then_some(s)
        },
    );
    eprintln!(
        "heal -> node-a {}: {:?}",
        group_state(&sa),
        healed.elapsed()
    );
    let sb = lab.status(Host::B);
    assert!(is_active(&group_state(&sb)), "node-b lost the group: {sb}");
    let (st, out) = writer.wait_or_kill(Duration::from_secs(20));
    eprintln!("the suspended write ended with {st:?}: {out}");
    let acknowledged = out.contains("wrote ") && !out.contains("failed");
    lab.wait_handshake(Instant::now(), Duration::from_secs(10));
    assert_qemu_io_ok(&lab.qemu_io(&["read -P 0x11 0 2M"]));
    if acknowledged {
        // node-a acknowledged it: then it must be on node-b, the primary.
        assert_qemu_io_ok(&lab.qemu_io(&["read -P 0xee 16M 64k"]));
    }
}

/// Waits until node-a is secondary and both copies in sync; returns whether a split brain
/// was reported on the way (then `on_split_brain` ran).
fn wait_rejoined(lab: &Lab, mut on_split_brain: impl FnMut(&Lab, &Json)) -> bool {
    let mut split = false;
    lab.wait_for(
        "node-a to be secondary and both copies in sync",
        Duration::from_secs(60),
        |lab| {
            let a = lab.try_status(Host::A).ok()?;
            let b = lab.try_status(Host::B).ok()?;
            if !split && volume_field(&a, "sync") == "split-brain" {
                split = true;
                on_split_brain(lab, &a);
                return None;
            }
            (group_state(&a) == "secondary"
                && volume_field(&a, "sync") == "in-sync"
                && volume_field(&b, "sync") == "in-sync")
                .then_some(())
        },
    );
    split
}

#[test]
fn isolated_primary_suspends_and_the_peer_takes_over() {
    let mut lab = Lab::new();
    isolate_and_heal(&mut lab);
    // The isolated node acknowledged nothing alone, so it rejoins without a split brain (the
    // test below insists); should one appear anyway, the operator's way out keeps node-b's
    // data, and this test still checks that nothing acknowledged was lost.
    let split = wait_rejoined(&lab, |lab, s| {
        eprintln!("split brain after healing, resolving: {s}");
        let cfg = lab.config(Host::B);
        let out = lab.nbdmirror(
            Host::B,
            &[
                "resolve",
                "disk0",
                "--discard-on",
                "node-a",
                "--config",
                cfg.to_str().unwrap(),
            ],
        );
        assert!(out.success(), "resolve failed: {out}\n{}", lab.all_logs());
        eprintln!("{}", out.stdout.trim());
    });
    eprintln!("split brain after healing: {split}");
    assert_qemu_io_ok(&lab.qemu_io(&["read -P 0x11 0 2M"]));
}

#[test]
fn isolated_primary_rejoins_without_split_brain() {
    let mut lab = Lab::new();
    isolate_and_heal(&mut lab);
    wait_rejoined(&lab, |lab, s| {
        panic!(
            "split brain after healing the isolated primary: {s}\n{}",
            lab.all_logs()
        )
    });
    // Not even for the moment the isolated node takes to step down: an operator paged on
    // that ERROR would resolve a split brain that never was.
    let logs = lab.all_logs();
    assert!(
        !logs.contains("SPLIT BRAIN"),
        "a split brain was reported while the isolated primary stepped down:\n{logs}"
    );
    assert_qemu_io_ok(&lab.qemu_io(&["read -P 0x11 0 2M"]));
}
