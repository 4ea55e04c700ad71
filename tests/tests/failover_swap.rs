//! Issue 4: `nbdmirror swap vm1` on a healthy pair with a witness moves the group to the
//! other node and it stays there, with no data lost.

use std::time::{Duration, Instant};

use nbdmirror_tests::assert_qemu_io_ok;
use nbdmirror_tests::data::assert_files_equal;
use nbdmirror_tests::lab::{group_field, Host, Lab, GROUP};

#[test]
fn swap_on_a_healthy_pair_moves_the_group_once() {
    let mut lab = Lab::new();
    lab.start_all();
    lab.wait_handshake(Instant::now(), Duration::from_secs(20));
    assert_qemu_io_ok(&lab.qemu_io(&["write -P 0x5a 0 4M", "flush"]));
    let cfg_a = lab.config(Host::A);
    let out = lab.nbdmirror(
        Host::A,
        &["swap", GROUP, "--config", cfg_a.to_str().unwrap()],
    );
    assert!(out.success(), "swap failed: {out}\n{}", lab.all_logs());
    let sb = lab.wait_group_state(Host::B, &["primary"], Duration::from_secs(30));
    assert_eq!(group_field(&sb, "primary_node"), "node-b", "{sb}");
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        let a = lab.group_state(Host::A).unwrap_or_default();
        let b = lab.group_state(Host::B).unwrap_or_default();
        assert!(
            a == "secondary" && b == "primary",
            "{:?} after the swap node-a is {a}, node-b {b}\n{}",
            start.elapsed(),
            lab.all_logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_qemu_io_ok(&lab.qemu_io(&["read -P 0x5a 0 4M", "write -P 0x33 50M 1M", "flush"]));
    lab.wait_in_sync(Duration::from_secs(30));
    for h in [Host::A, Host::B] {
        let st = lab.stop(h, Duration::from_secs(30));
        assert!(
            st.success(),
            "{} exited with {st}\n{}",
            h.node(),
            lab.log(h)
        );
    }
    assert_files_equal(&lab.image(Host::A), &lab.image(Host::B));
}
