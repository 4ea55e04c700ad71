//! Issue 4: without a witness or a fence hook a pair never fails over by itself. node-a
//! (primary) is killed; node-b waits and says why, and never promotes on its own; an
//! operator's `nbdmirror promote disk0 --force` still works.

use std::time::{Duration, Instant};

use nbdmirror_tests::assert_qemu_io_ok;
use nbdmirror_tests::lab::{group_field, group_state, volume_field, Host, Lab};

#[test]
fn without_witness_the_survivor_waits_and_manual_promote_works() {
    let mut lab = Lab::new();
    for f in ["node-a.toml", "node-b.toml"] {
        lab.patch(f, "witness = \"10.99.0.10:7790\"\n", "");
    }
    lab.start_all();
    let s = lab.status(Host::A);
    assert_eq!(
        s.get("groups").at(0).get("witness").as_str(),
        Some("none"),
        "{s}"
    );
    lab.wait_handshake(Instant::now(), Duration::from_secs(20));
    assert_qemu_io_ok(&lab.qemu_io(&["write -P 0x5a 0 4M", "flush"]));

    lab.kill(Host::A);
    let t0 = Instant::now();
    // Let the heartbeat timeout pass, then watch node-b for 8 s: it waits and says why.
    std::thread::sleep(Duration::from_secs(4));
    let mut reasons = Vec::new();
    while t0.elapsed() < Duration::from_secs(12) {
        let s = lab.status(Host::B);
        let st = group_state(&s);
        assert_eq!(
            st,
            "waiting",
            "node-b must wait without a witness or fence hook ({:?} after the kill): {s}\n{}",
            t0.elapsed(),
            lab.all_logs()
        );
        assert_eq!(volume_field(&s, "role"), "secondary", "{s}");
        let reason = group_field(&s, "reason");
        assert!(
            reason.contains("witness") && reason.contains("fence"),
            "node-b's reason does not say why it waits: {reason:?}"
        );
        if !reasons.contains(&reason) {
            reasons.push(reason);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!("node-b waits: {reasons:?}");
    // Nobody answers on the VIP.
    assert!(lab.try_handshake(Duration::from_millis(500)).is_err());

    // The operator decides: node-a is down, promote node-b by hand.
    let cfg_b = lab.config(Host::B);
    let cfg_b = cfg_b.to_str().unwrap();
    let refused = lab.nbdmirror(Host::B, &["promote", "disk0", "--config", cfg_b]);
    assert!(
        !refused.success() && refused.all().contains("--force"),
        "promote without --force of a group volume must be refused and name --force: {refused}"
    );
    let out = lab.nbdmirror(Host::B, &["promote", "disk0", "--force", "--config", cfg_b]);
    assert!(
        out.success(),
        "manual promote failed: {out}\n{}",
        lab.all_logs()
    );
    let s = lab.status(Host::B);
    assert_eq!(volume_field(&s, "role"), "primary", "{s}");
    eprintln!(
        "after the manual promote node-b's group is {}",
        group_state(&s)
    );
    // node-b's own export answers with the data written before the kill.
    let b_uri = "nbd://10.99.0.2:10809/disk0";
    assert_qemu_io_ok(&lab.qemu_io_in(
        Host::C,
        b_uri,
        &["read -P 0x5a 0 4M", "write -P 0x66 8M 1M", "flush"],
        Duration::from_secs(60),
    ));
}

/// `nbdmirror takeover vm1`: the operator vouches that the dead peer is down and the group
/// (not only its volume) starts on the survivor: volumes promoted, the virtual IP raised,
/// the data served through it. Refused while the peer is alive.
#[test]
fn takeover_starts_the_group_on_the_survivor_with_its_vip() {
    let mut lab = Lab::new();
    for f in ["node-a.toml", "node-b.toml"] {
        lab.patch(f, "witness = \"10.99.0.10:7790\"\n", "");
    }
    lab.start_all();
    lab.wait_handshake(Instant::now(), Duration::from_secs(20));
    assert_qemu_io_ok(&lab.qemu_io(&["write -P 0x5b 0 4M", "flush"]));
    lab.wait_in_sync(Duration::from_secs(30));
    let cfg_b = lab.config(Host::B);
    let cfg_b = cfg_b.to_str().unwrap();
    let refused = lab.nbdmirror(Host::B, &["takeover", "vm1", "--config", cfg_b]);
    assert!(
        !refused.success() && refused.all().contains("swap"),
        "takeover with a live peer must be refused and point to swap: {refused}"
    );
    lab.kill(Host::A);
    std::thread::sleep(Duration::from_secs(4));
    let out = lab.nbdmirror(Host::B, &["takeover", "vm1", "--config", cfg_b]);
    assert!(out.success(), "takeover failed: {out}\n{}", lab.all_logs());
    let s = lab.status(Host::B);
    assert_eq!(group_field(&s, "primary_node"), "node-b", "{s}");
    assert!(
        lab.holds_vip(Host::B),
        "no VIP on node-b\n{}",
        lab.all_logs()
    );
    assert_qemu_io_ok(&lab.qemu_io(&["read -P 0x5b 0 4M", "write -P 0x67 8M 1M", "flush"]));
}
