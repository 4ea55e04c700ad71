//! Issue 4: after a full-cluster outage the group starts by itself where the newest data is,
//! and a single returning node starts only if the witness confirms it holds the newest data.
//! Also: a daemon that restarts never leaves the virtual IP behind.

use std::time::{Duration, Instant};

use nbdmirror_tests::assert_qemu_io_ok;
use nbdmirror_tests::lab::{group_field, group_state, Host, Lab, Link, VIP};

/// node-b dies, node-a writes alone (its data becomes the newest), then node-a dies too.
fn outage_with_newest_on_a(lab: &mut Lab) {
    lab.start_all();
    lab.wait_handshake(Instant::now(), Duration::from_secs(20));
    lab.kill(Host::B);
    std::thread::sleep(Duration::from_secs(4));
    assert_qemu_io_ok(&lab.qemu_io(&["write -P 0x6b 8M 2M", "flush"]));
    lab.kill(Host::A);
}

fn vip_on(lab: &Lab, host: Host) -> bool {
    let out = lab.exec(
        host,
        &["ip", "-br", "addr", "show", "pub0"],
        Duration::from_secs(10),
    );
    out.stdout.contains(VIP)
}

#[test]
fn the_stale_node_waits_and_the_group_starts_on_the_newest_data() {
    let mut lab = Lab::new();
    outage_with_newest_on_a(&mut lab);
    // node-a still has the VIP configured on its (cut) interface: its daemon is dead.
    assert!(
        vip_on(&lab, Host::A),
        "the VIP should still be on node-a's interface"
    );
    // node-b comes back alone: stale, and the witness says node-a held the group last.
    lab.cut(Link::All, Host::B, false);
    lab.start_node(Host::B);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(7) {
        let s = lab.status(Host::B);
        assert_ne!(
            group_field(&s, "primary_node"),
            "node-b",
            "a stale node started the group alone: {s}\n{}",
            lab.all_logs()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // node-a returns: its daemon removes the VIP left behind, then both compare their data
    // and the group starts on node-a, which has the newest.
    lab.cut(Link::All, Host::A, false);
    lab.start_node(Host::A);
    lab.wait_for("the group on node-a", Duration::from_secs(30), |lab| {
        let a = lab.try_status(Host::A).ok()?;
        let b = lab.try_status(Host::B).ok()?;
        (group_field(&a, "primary_node") == "node-a" && group_state(&b) == "secondary")
            .then_some(())
    });
    assert!(
        lab.log(Host::A)
            .contains("removed a virtual IP left by a previous run"),
        "{}",
        lab.log(Host::A)
    );
    lab.wait_in_sync(Duration::from_secs(30));
    assert_qemu_io_ok(&lab.qemu_io(&["read -P 0x6b 8M 2M"]));
}

#[test]
fn a_single_returning_node_starts_when_the_witness_confirms_its_data() {
    let mut lab = Lab::new();
    outage_with_newest_on_a(&mut lab);
    // Only node-a returns: it held the group last with this data, the witness confirms it.
    lab.cut(Link::All, Host::A, false);
    lab.start_node(Host::A);
    lab.wait_for(
        "the group on node-a alone",
        Duration::from_secs(30),
        |lab| {
            let a = lab.try_status(Host::A).ok()?;
            (group_field(&a, "primary_node") == "node-a").then_some(())
        },
    );
    assert_qemu_io_ok(&lab.qemu_io(&["read -P 0x6b 8M 2M"]));
}
