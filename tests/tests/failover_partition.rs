//! Issue 4: only the replication link is cut; both daemons stay up and keep exchanging
//! heartbeats over the public link, the witness stays reachable. At every moment at most one
//! node reports the group as `primary` or `alone`; after healing there is no split brain and
//! both copies end in sync with every acknowledged write.

use std::time::{Duration, Instant};

use nbdmirror_tests::assert_qemu_io_ok;
use nbdmirror_tests::lab::{group_state, is_active, volume_field, Host, Lab, Link};

#[test]
fn replication_link_cut_never_two_primaries_and_no_split_brain() {
    let mut lab = Lab::new();
    lab.start_all();
    lab.wait_handshake(Instant::now(), Duration::from_secs(20));
    assert_qemu_io_ok(&lab.qemu_io(&["write -P 0x11 0 2M", "flush"]));

    lab.cut(Link::Repl, Host::A, true);
    // A write during the partition: the primary must either keep it waiting or acknowledge
    // it once it knows it may continue alone; it runs while the states are sampled.
    let mut writer = lab.spawn_qemu_io(
        Host::C,
        nbdmirror_tests::lab::VIP_URI,
        &["write -P 0x22 8M 1M", "flush"],
    );
    let mut samples = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        let t = start.elapsed();
        let a = lab.group_state(Host::A).unwrap_or_else(|| "?".into());
        let b = lab.group_state(Host::B).unwrap_or_else(|| "?".into());
        assert!(
            !(is_active(&a) && is_active(&b)),
            "two primaries {t:?} after cutting the replication link: node-a {a}, node-b {b}\nsamples: {samples:?}\n{}",
            lab.all_logs()
        );
        samples.push((t.as_millis(), a, b));
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("samples during the partition (ms, node-a, node-b): {samples:?}");
    assert!(lab.is_running(Host::A) && lab.is_running(Host::B));
    let running = writer.is_running();
    eprintln!("the write issued during the partition still runs after 10 s: {running}");

    lab.cut(Link::Repl, Host::A, false);
    // Keep sampling while the pair reconnects.
    let heal = Instant::now();
    let mut synced = false;
    while heal.elapsed() < Duration::from_secs(60) {
        let sa = lab.try_status(Host::A).ok();
        let sb = lab.try_status(Host::B).ok();
        let (a, b) = (
            sa.as_ref().map(group_state).unwrap_or_default(),
            sb.as_ref().map(group_state).unwrap_or_default(),
        );
        assert!(
            !(is_active(&a) && is_active(&b)),
            "two primaries {:?} after healing: node-a {a}, node-b {b}\n{}",
            heal.elapsed(),
            lab.all_logs()
        );
        for (n, s) in [("node-a", &sa), ("node-b", &sb)] {
            if let Some(s) = s {
                assert_ne!(
                    volume_field(s, "sync"),
                    "split-brain",
                    "{n} reports a split brain after healing: {s}\n{}",
                    lab.all_logs()
                );
            }
        }
        if let (Some(sa), Some(sb)) = (&sa, &sb) {
            if volume_field(sa, "sync") == "in-sync"
                && volume_field(sb, "sync") == "in-sync"
                && (is_active(&a) ^ is_active(&b))
            {
                synced = true;
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        synced,
        "the pair did not get back in sync within 60 s of healing\n{}",
        lab.all_logs()
    );
    let (st, out) = writer.wait_or_kill(Duration::from_secs(30));
    assert!(
        st.is_some_and(|s| s.success()),
        "the write issued during the partition never completed ({st:?}): {out}\n{}",
        lab.all_logs()
    );
    // Every acknowledged write reads back through the VIP.
    lab.wait_handshake(Instant::now(), Duration::from_secs(10));
    assert_qemu_io_ok(&lab.qemu_io(&["read -P 0x11 0 2M", "read -P 0x22 8M 1M"]));
}
