//! Issue 4, "How it must be tested": node-a (the primary) dies; node-b takes the group over
//! through the witness within the heartbeat timeout + 2 s; the data survives; node-a comes
//! back as secondary, only the changed regions are copied, `swap` moves the group back, and
//! both images end byte-identical. Real daemons in the examples/netns-pair lab.
//!
//! The tests of this file take a lock, so they never run at the same time (their timings
//! would suffer on a small machine).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use nbdmirror_tests::assert_qemu_io_ok;
use nbdmirror_tests::data::assert_files_equal;
use nbdmirror_tests::lab::{
    group_field, group_state, is_active, volume_u64, Host, Lab, Link, GROUP, VOLUME_SIZE,
};

/// The example's heartbeat timeout.
const HB_TIMEOUT: Duration = Duration::from_secs(3);

static SERIAL: Mutex<()> = Mutex::new(());

/// Pair + witness up, a pattern written through the VIP, then node-a dies: `kill` is
/// `lab.sh kill a` (SIGKILL, then links down); `power_loss` takes the links down first, so
/// node-a's sockets send nothing (no FIN, no RST), as when a server loses power. Returns the
/// time from the first step to a successful NBD handshake through the VIP.
fn fail_node_a(lab: &mut Lab, power_loss: bool) -> Duration {
    lab.start_all();
    lab.wait_handshake(Instant::now(), Duration::from_secs(20));
    assert_qemu_io_ok(&lab.qemu_io(&["write -P 0x5a 0 4M", "write -P 0xa5 100M 1M", "flush"]));
    let t0 = Instant::now();
    if power_loss {
        lab.cut(Link::All, Host::A, true);
    }
    lab.kill(Host::A);
    let took = lab.wait_handshake(t0, Duration::from_secs(30));
    eprintln!(
        "{} -> NBD handshake through the VIP on node-b: {took:?}",
        if power_loss {
            "links cut + kill"
        } else {
            "kill"
        }
    );
    let sb = lab.status(Host::B);
    assert!(
        is_active(&group_state(&sb)),
        "node-b serves the VIP but its group is not primary/alone: {sb}"
    );
    assert_eq!(group_field(&sb, "primary_node"), "node-b", "{sb}");
    // Everything acknowledged before the kill is there.
    assert_qemu_io_ok(&lab.qemu_io(&["read -P 0x5a 0 4M", "read -P 0xa5 100M 1M"]));
    took
}

/// After [`fail_node_a`]: node-b writes a little, node-a comes back (links up, daemon
/// restarted) as secondary and is resynchronised with the changed regions only.
fn rejoin_node_a(lab: &mut Lab) {
    assert_qemu_io_ok(&lab.qemu_io(&["write -P 0x77 200M 2M", "flush"]));
    lab.cut(Link::All, Host::A, false);
    lab.start_node(Host::A);
    lab.wait_group_state(Host::A, &["secondary"], Duration::from_secs(30));
    lab.wait_in_sync(Duration::from_secs(60));
    let sb = lab.status(Host::B);
    assert!(
        is_active(&group_state(&sb)),
        "node-b gave up the group: {sb}"
    );
    assert_eq!(group_field(&sb, "primary_node"), "node-b", "{sb}");
    let sent = volume_u64(&sb, "resync_bytes_sent");
    eprintln!("resync after node-a's return: node-b sent {sent} bytes");
    assert!(
        sent > 0 && sent <= 32 << 20,
        "the resync should copy only the changed regions (a few MiB of {VOLUME_SIZE}), node-b sent {sent} bytes: {sb}"
    );
    assert_qemu_io_ok(&lab.qemu_io(&[
        "read -P 0x5a 0 4M",
        "read -P 0xa5 100M 1M",
        "read -P 0x77 200M 2M",
    ]));
}

/// Stops both daemons cleanly and compares the images.
fn stop_and_compare(lab: &mut Lab) {
    lab.stop_nodes_cleanly();
    assert_files_equal(&lab.image(Host::A), &lab.image(Host::B));
}

#[test]
fn kill_primary_survivor_takes_over_and_the_old_primary_rejoins() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = Lab::new();
    let took = fail_node_a(&mut lab, false);
    assert!(
        took <= HB_TIMEOUT + Duration::from_secs(2),
        "the handshake through the VIP took {took:?} after the kill (limit: heartbeat timeout 3 s + 2 s)\n{}",
        lab.all_logs()
    );
    rejoin_node_a(&mut lab);
    stop_and_compare(&mut lab);
}

#[test]
fn swap_moves_the_group_back_after_failback() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = Lab::new();
    fail_node_a(&mut lab, false);
    rejoin_node_a(&mut lab);
    let cfg_b = lab.config(Host::B);
    let out = lab.nbdmirror(
        Host::B,
        &["swap", GROUP, "--config", cfg_b.to_str().unwrap()],
    );
    assert!(out.success(), "swap failed: {out}\n{}", lab.all_logs());
    let sa = lab.wait_group_state(Host::A, &["primary"], Duration::from_secs(30));
    assert_eq!(group_field(&sa, "primary_node"), "node-a", "{sa}");
    lab.wait_group_state(Host::B, &["secondary"], Duration::from_secs(30));
    // The group stays on node-a: no flapping after the swap.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        let a = lab.group_state(Host::A).unwrap_or_default();
        let b = lab.group_state(Host::B).unwrap_or_default();
        assert!(
            a == "primary" && b == "secondary",
            "{:?} after the swap node-a is {a}, node-b {b}\n{}",
            start.elapsed(),
            lab.all_logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    lab.wait_handshake(Instant::now(), Duration::from_secs(10));
    assert_qemu_io_ok(&lab.qemu_io(&[
        "read -P 0x5a 0 4M",
        "read -P 0xa5 100M 1M",
        "read -P 0x77 200M 2M",
        "write -P 0x33 50M 1M",
        "flush",
    ]));
    lab.wait_in_sync(Duration::from_secs(30));
    stop_and_compare(&mut lab);
}

#[test]
fn power_loss_survivor_answers_within_heartbeat_timeout_plus_2s() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = Lab::new();
    let took = fail_node_a(&mut lab, true);
    assert!(
        took <= HB_TIMEOUT + Duration::from_secs(2),
        "the handshake through the VIP took {took:?} after the power loss (limit: heartbeat timeout 3 s + 2 s)\n{}",
        lab.all_logs()
    );
    rejoin_node_a(&mut lab);
    stop_and_compare(&mut lab);
}
