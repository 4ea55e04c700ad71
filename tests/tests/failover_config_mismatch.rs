//! Issue 4, a configuration an operator can get wrong: a group that only one node announces
//! (a typo, a change made on one node only) takes no role on either node. Neither can tell
//! whether its live peer runs the VM, so starting it could run it twice; both say why.

use std::time::{Duration, Instant};

use nbdmirror_tests::lab::{group_field, group_state, Host, Lab};

#[test]
fn a_group_the_live_peer_does_not_announce_takes_no_role() {
    let mut lab = Lab::new();
    lab.patch("node-b.toml", "name = \"vm1\"", "name = \"vm2\"");
    lab.start_witness();
    lab.start_node(Host::A);
    lab.start_node(Host::B);
    // Past the start-up listening window (a heartbeat timeout) and a few ticks more.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(9) {
        for h in [Host::A, Host::B] {
            let s = lab.status(h);
            assert!(
                !matches!(group_state(&s).as_str(), "primary" | "alone" | "secondary"),
                "{} took a role in a group its peer does not announce ({:?} after start): {s}\n{}",
                h.node(),
                t0.elapsed(),
                lab.all_logs()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    for (h, group) in [(Host::A, "vm1"), (Host::B, "vm2")] {
        let s = lab.status(h);
        let reason = group_field(&s, "reason");
        assert!(
            reason.contains(&format!("does not announce group {group}")),
            "{}'s reason should name the missing group: {s}",
            h.node()
        );
    }
}
