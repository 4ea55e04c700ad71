//! Issue 4: `nbdmirror swap vm1` on a healthy pair with a witness moves the group to the
//! other node and it stays there, with no data lost, whichever node it is run on.

use std::time::{Duration, Instant};

use nbdmirror_tests::assert_qemu_io_ok;
use nbdmirror_tests::data::assert_files_equal;
use nbdmirror_tests::lab::{group_field, group_state, volume_field, Host, Lab, Link, GROUP};

/// For `how_long`: `primary` holds the group and the other node is secondary throughout
/// (`after`: what just happened, for the failure message).
fn assert_stays_primary(lab: &Lab, primary: Host, how_long: Duration, after: &str) {
    let secondary = if primary == Host::A { Host::B } else { Host::A };
    let start = Instant::now();
    while start.elapsed() < how_long {
        let p = lab.group_state(primary).unwrap_or_default();
        let s = lab.group_state(secondary).unwrap_or_default();
        assert!(
            p == "primary" && s == "secondary",
            "{:?} {after}: {} is {p}, {} is {s}\n{}",
            start.elapsed(),
            primary.node(),
            secondary.node(),
            lab.all_logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn swap_on_a_healthy_pair_moves_the_group_once() {
    let mut lab = Lab::new();
    lab.start_all();
    lab.wait_handshake(Instant::now(), Duration::from_secs(20));
    // Both nodes know the witness answers, the secondary too (it would need it to take over).
    for h in [Host::A, Host::B] {
        lab.wait_for(
            "the witness reachable in status",
            Duration::from_secs(10),
            |lab| {
                let s = lab.try_status(h).ok()?;
                (group_field(&s, "witness") == "reachable").then_some(())
            },
        );
    }
    assert_qemu_io_ok(&lab.qemu_io(&["write -P 0x5a 0 4M", "flush"]));
    let cfg_a = lab.config(Host::A);
    let out = lab.nbdmirror(
        Host::A,
        &["swap", GROUP, "--config", cfg_a.to_str().unwrap()],
    );
    assert!(out.success(), "swap failed: {out}\n{}", lab.all_logs());
    let sb = lab.wait_group_state(Host::B, &["primary"], Duration::from_secs(30));
    assert_eq!(group_field(&sb, "primary_node"), "node-b", "{sb}");
    assert_stays_primary(&lab, Host::B, Duration::from_secs(5), "after the swap");
    assert_qemu_io_ok(&lab.qemu_io(&["read -P 0x5a 0 4M", "write -P 0x33 50M 1M", "flush"]));
    lab.wait_in_sync(Duration::from_secs(30));
    lab.stop_nodes_cleanly();
    assert_files_equal(&lab.image(Host::A), &lab.image(Host::B));
}

/// `swap` works from either node: run on the secondary, it asks the primary (through its
/// heartbeats) to hand the group over. The primary here is the preferred node, so a
/// handover it does not announce would let it take the group straight back.
#[test]
fn swap_run_on_the_secondary_moves_the_group_once() {
    let mut lab = Lab::new();
    lab.start_all();
    lab.wait_handshake(Instant::now(), Duration::from_secs(20));
    assert_qemu_io_ok(&lab.qemu_io(&["write -P 0x6b 0 4M", "flush"]));
    let cfg_b = lab.config(Host::B);
    let out = lab.nbdmirror(
        Host::B,
        &[
            "swap",
            GROUP,
            "--timeout",
            "20",
            "--config",
            cfg_b.to_str().unwrap(),
        ],
    );
    assert!(out.success(), "swap failed: {out}\n{}", lab.all_logs());
    let sb = lab.wait_group_state(Host::B, &["primary"], Duration::from_secs(30));
    assert_eq!(group_field(&sb, "primary_node"), "node-b", "{sb}");
    assert_stays_primary(&lab, Host::B, Duration::from_secs(8), "after the swap");
    let takes = lab.log(Host::A).matches("taking the group").count();
    assert_eq!(
        takes,
        1,
        "node-a took the group back after handing it over:\n{}",
        lab.all_logs()
    );
    assert_qemu_io_ok(&lab.qemu_io(&["read -P 0x6b 0 4M", "write -P 0x44 60M 1M", "flush"]));
    lab.wait_in_sync(Duration::from_secs(30));
    lab.stop_nodes_cleanly();
    assert_files_equal(&lab.image(Host::A), &lab.image(Host::B));
}

/// Rounds live in memory, the witness's on disk. After swaps the witness holds a later round
/// than a restarted pair starts from: the pair must take the round after it with its first
/// promotion, not be deposed and promote again (each a VM stop and start), let alone climb
/// one cycle at a time.
#[test]
fn a_restarted_pair_takes_the_witness_round_in_one_step() {
    let mut lab = Lab::new();
    lab.start_all();
    lab.wait_handshake(Instant::now(), Duration::from_secs(20));
    for (from, to) in [(Host::A, Host::B), (Host::B, Host::A), (Host::A, Host::B)] {
        lab.wait_in_sync(Duration::from_secs(30));
        let cfg = lab.config(from);
        let out = lab.nbdmirror(from, &["swap", GROUP, "--config", cfg.to_str().unwrap()]);
        assert!(out.success(), "swap failed: {out}\n{}", lab.all_logs());
        let s = lab.wait_group_state(to, &["primary"], Duration::from_secs(30));
        assert_eq!(group_field(&s, "primary_node"), to.node(), "{s}");
    }
    let round = |s: &nbdmirror_tests::lab::Json| s.get("groups").at(0).get("round").as_u64();
    let before = round(&lab.status(Host::B)).unwrap_or(0);
    assert!(
        before >= 4,
        "three swaps should reach round 4, not {before}"
    );
    eprintln!("round before the restart: {before}");
    lab.wait_in_sync(Duration::from_secs(30));
    lab.stop_nodes_cleanly();
    lab.start_node(Host::A);
    lab.start_node(Host::B);
    lab.wait_handshake(Instant::now(), Duration::from_secs(30));
    // Watch a while: one promotion (the witness's newer round is taken over, not a
    // reason to give the group up), then the group stays where it is.
    std::thread::sleep(Duration::from_secs(6));
    let takes: usize = [Host::A, Host::B]
        .iter()
        .map(|&h| lab.log(h).matches("taking the group").count())
        .sum();
    assert!(
        takes == 1,
        "{takes} promotions after the restart (witness round {before}):\n{}",
        lab.all_logs()
    );
    // And the group did start, in a round above the witness's.
    let (sa, sb) = (lab.status(Host::A), lab.status(Host::B));
    let primary = [&sa, &sb]
        .into_iter()
        .find(|s| group_state(s) == "primary")
        .unwrap_or_else(|| panic!("no primary after the restart: {sa}\n{sb}"));
    let after = round(primary).unwrap_or(0);
    eprintln!("after the restart: {takes} promotion(s), round {after}");
    assert!(
        after > before,
        "round {after} after the restart, {before} before"
    );
}

/// A swap while the witness is away leaves the witness naming the old holder, with the
/// pair's generation of then. When that old holder then dies and the new primary writes
/// alone (a new generation), the new primary must still get registered once the witness is
/// back: it took the group in sync, so it first registers the generation it took it at.
/// Before, the witness refused the new generation from a non-holder for good and the write
/// waited forever.
#[test]
fn a_swap_the_witness_missed_still_lets_the_new_primary_write_alone() {
    let mut lab = Lab::new();
    lab.start_all();
    lab.wait_handshake(Instant::now(), Duration::from_secs(20));
    assert_qemu_io_ok(&lab.qemu_io(&["write -P 0x21 0 4M", "flush"]));
    lab.wait_in_sync(Duration::from_secs(30));
    // The witness goes down (its state stays on disk) and misses the swap.
    lab.stop(Host::C, Duration::from_secs(10));
    let cfg_a = lab.config(Host::A);
    let out = lab.nbdmirror(
        Host::A,
        &["swap", GROUP, "--config", cfg_a.to_str().unwrap()],
    );
    assert!(out.success(), "swap failed: {out}\n{}", lab.all_logs());
    let sb = lab.wait_group_state(Host::B, &["primary"], Duration::from_secs(30));
    assert_eq!(group_field(&sb, "primary_node"), "node-b", "{sb}");
    let gen_before = volume_field(&lab.status(Host::B), "generation");
    // node-a dies; a write reaches node-b (on its own address: the VIP leaves it when its
    // lease, which it never had, cannot cover writes alone) and starts a new generation.
    lab.kill(Host::A);
    let writer = lab.spawn_qemu_io(
        Host::B,
        "nbd://127.0.0.1:10809/disk0",
        &["write -P 0x22 8M 1M", "flush"],
    );
    lab.wait_for(
        "a new generation on node-b",
        Duration::from_secs(30),
        |lab| {
            let s = lab.try_status(Host::B).ok()?;
            (volume_field(&s, "generation") != gen_before).then_some(())
        },
    );
    lab.start_witness();
    let (status, out) = writer.wait_or_kill(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()) && !out.contains("error"),
        "the write alone never completed after the witness came back: {status:?} {out}\n{}",
        lab.all_logs()
    );
    let check = lab.qemu_io_in(
        Host::B,
        "nbd://127.0.0.1:10809/disk0",
        &["read -P 0x21 0 4M", "read -P 0x22 8M 1M"],
        Duration::from_secs(30),
    );
    assert_qemu_io_ok(&check);
}

/// A swap that cannot happen in time (the peer is out of sync) is withdrawn when `swap`
/// gives up, whichever node it ran on: the group must not move minutes later, when the peer
/// catches up, after the operator saw the command fail. `--cancel` withdraws one made with
/// `--no-wait`.
#[test]
fn a_swap_that_could_not_happen_in_time_is_withdrawn() {
    let mut lab = Lab::new();
    lab.start_all();
    lab.wait_handshake(Instant::now(), Duration::from_secs(20));
    for (i, from) in [Host::B, Host::A, Host::B].into_iter().enumerate() {
        // node-b falls behind: its replication link is down, node-a writes alone.
        lab.cut(Link::Repl, Host::B, true);
        let pattern = format!("write -P 0x{:x} {}M 8M", 0x41 + i, 16 * i);
        assert_qemu_io_ok(&lab.qemu_io(&[pattern.as_str(), "flush"]));
        let cfg = lab.config(from);
        let cfg = cfg.to_str().unwrap();
        let withdrawn = if i < 2 {
            let out = lab.nbdmirror(from, &["swap", GROUP, "--timeout", "3", "--config", cfg]);
            assert!(
                !out.success() && out.stderr.contains("withdrawn"),
                "swap on {} should fail and withdraw its request: {out}",
                from.node()
            );
            "a swap that timed out"
        } else {
            let out = lab.nbdmirror(from, &["swap", GROUP, "--no-wait", "--config", cfg]);
            assert!(out.success(), "swap --no-wait: {out}");
            let out = lab.nbdmirror(from, &["swap", GROUP, "--cancel", "--config", cfg]);
            assert!(
                out.success() && out.stdout.contains("withdrawn"),
                "swap --cancel: {out}"
            );
            "a cancelled swap"
        };
        lab.cut(Link::Repl, Host::B, false);
        lab.wait_in_sync(Duration::from_secs(60));
        lab.wait_group_state(Host::A, &["primary"], Duration::from_secs(10));
        assert_stays_primary(
            &lab,
            Host::A,
            Duration::from_secs(5),
            &format!("{withdrawn} on {}", from.node()),
        );
    }
}

/// `systemctl stop` (SIGTERM) of the primary's daemon hands the group over like a swap: its
/// virtual IP goes (it stayed up before, so two hosts answered for it once node-b took
/// over), and node-b takes the group at once, not after a heartbeat timeout, with the data.
#[test]
fn a_primary_stopped_cleanly_hands_the_group_over_and_drops_the_vip() {
    let mut lab = Lab::new();
    lab.start_all();
    lab.wait_handshake(Instant::now(), Duration::from_secs(20));
    assert_qemu_io_ok(&lab.qemu_io(&["write -P 0x77 0 4M", "flush"]));
    lab.wait_in_sync(Duration::from_secs(30));
    assert!(lab.holds_vip(Host::A));
    let t0 = Instant::now();
    let st = lab.stop(Host::A, Duration::from_secs(30));
    assert!(st.success(), "node-a exited with {st}\n{}", lab.all_logs());
    assert!(
        !lab.holds_vip(Host::A),
        "node-a stopped with the virtual IP still on its interface\n{}",
        lab.all_logs()
    );
    let sb = lab.wait_group_state(Host::B, &["primary", "alone"], Duration::from_secs(30));
    assert_eq!(group_field(&sb, "primary_node"), "node-b", "{sb}");
    assert!(
        lab.log(Host::B).contains("the peer handed the group over"),
        "node-b should take the group with node-a's consent ({:?}):\n{}",
        t0.elapsed(),
        lab.all_logs()
    );
    assert!(lab.holds_vip(Host::B));
    assert_qemu_io_ok(&lab.qemu_io(&["read -P 0x77 0 4M"]));
}

/// The witness going away is said once on each node (a warning: no automatic failover until
/// it is back), and its return too; before, nothing was logged at all.
#[test]
fn a_silent_witness_is_warned_about_once_and_its_return_said() {
    let mut lab = Lab::new();
    lab.start_all();
    lab.wait_handshake(Instant::now(), Duration::from_secs(20));
    lab.stop(Host::C, Duration::from_secs(10));
    for h in [Host::A, Host::B] {
        lab.wait_for(
            "the warning about the silent witness",
            Duration::from_secs(15),
            |lab| {
                lab.log(h)
                    .contains("the witness does not answer")
                    .then_some(())
            },
        );
    }
    // Once, not every tick.
    std::thread::sleep(Duration::from_secs(2));
    for h in [Host::A, Host::B] {
        let n = lab.log(h).matches("the witness does not answer").count();
        assert_eq!(n, 1, "{} warned {n} times:\n{}", h.node(), lab.log(h));
    }
    lab.start_witness();
    for h in [Host::A, Host::B] {
        lab.wait_for(
            "the witness's return in the log",
            Duration::from_secs(15),
            |lab| {
                lab.log(h)
                    .contains("the witness answers again")
                    .then_some(())
            },
        );
    }
    assert_eq!(lab.group_state(Host::A).as_deref(), Some("primary"));
}

/// A swap asked right after the peer was cut off, before the heartbeats noticed: the peer's
/// last heartbeat still says it is ready, but it would never take the group. The primary
/// checks that the peer answers on the replication link before it stops anything, so the
/// VM and the VIP stay (before, it demoted and took the group back seconds later).
#[test]
fn a_swap_to_a_peer_cut_off_just_now_stops_nothing() {
    let mut lab = Lab::new();
    lab.start_all();
    lab.wait_handshake(Instant::now(), Duration::from_secs(20));
    lab.wait_in_sync(Duration::from_secs(30));
    lab.cut(Link::All, Host::B, true);
    let cfg_a = lab.config(Host::A);
    let out = lab.nbdmirror(
        Host::A,
        &[
            "swap",
            GROUP,
            "--timeout",
            "3",
            "--config",
            cfg_a.to_str().unwrap(),
        ],
    );
    assert!(!out.success(), "the swap cannot succeed: {out}");
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(5) {
        let a = lab.group_state(Host::A).unwrap_or_default();
        assert!(
            a == "primary" || a == "alone",
            "node-a is {a} after a swap to a peer that is gone\n{}",
            lab.all_logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        lab.holds_vip(Host::A),
        "node-a dropped its VIP\n{}",
        lab.all_logs()
    );
    assert!(
        !lab.log(Host::A).contains("giving up the group"),
        "node-a gave the group up for a peer that was gone\n{}",
        lab.all_logs()
    );
}
