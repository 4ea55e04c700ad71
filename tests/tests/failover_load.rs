//! Issue 4: a full fio write load through the virtual IP for a minute causes no false
//! failover: node-a stays primary, node-b secondary, and the election round never moves.

use std::time::{Duration, Instant};

use nbdmirror_tests::lab::{group_state, Host, Lab, VIP_URI};

fn round(s: &nbdmirror_tests::lab::Json) -> u64 {
    s.get("groups").at(0).get("round").as_u64().unwrap_or(0)
}

#[test]
fn a_minute_of_fio_write_load_causes_no_failover() {
    let mut lab = Lab::new();
    lab.start_all();
    lab.wait_handshake(Instant::now(), Duration::from_secs(20));
    let r0 = round(&lab.status(Host::A));
    assert!(r0 > 0, "node-a is primary in round 0?");

    let (log_a, log_b) = (lab.log(Host::A).len(), lab.log(Host::B).len());
    let uri = format!("--uri={VIP_URI}");
    let mut fio = lab.spawn(
        Host::C,
        &[
            "fio",
            "--thread",
            "--ioengine=nbd",
            &uri,
            "--output-format=normal",
            "--verify_state_save=0",
            "--name=load",
            "--rw=randwrite",
            "--bs=64k",
            "--iodepth=32",
            "--size=200m",
            "--time_based",
            "--runtime=60",
        ],
    );
    let start = Instant::now();
    let mut samples = 0;
    let mut unanswered = Vec::new();
    while start.elapsed() < Duration::from_secs(62) && fio.is_running() {
        let t = start.elapsed();
        for h in [Host::A, Host::B] {
            match lab.try_status(h) {
                Ok(s) => {
                    let want = if h == Host::A { "primary" } else { "secondary" };
                    assert_eq!(
                        group_state(&s),
                        want,
                        "{} is not {want} {t:?} into the fio load: {s}\n{}",
                        h.node(),
                        lab.all_logs()
                    );
                    assert_eq!(
                        round(&s),
                        r0,
                        "the election round moved {t:?} into the load: {s}\n{}",
                        lab.all_logs()
                    );
                    samples += 1;
                }
                Err(e) => unanswered.push(format!("{} at {t:?}: {e}", h.node())),
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let ran = start.elapsed();
    let (st, out) = fio.wait_or_kill(Duration::from_secs(30));
    assert!(
        st.is_some_and(|s| s.success()) && out.contains("err= 0"),
        "fio failed after {ran:?} ({st:?}): {out}\n{}",
        lab.all_logs()
    );
    assert!(
        ran >= Duration::from_secs(55),
        "fio ended after {ran:?}: {out}"
    );
    let write_line = out
        .lines()
        .find(|l| l.trim_start().starts_with("WRITE:"))
        .unwrap_or("");
    eprintln!("{samples} status samples; fio: {}", write_line.trim());
    assert!(
        unanswered.len() <= 2,
        "status did not answer during the load: {unanswered:?}"
    );
    // No state change was even logged during the load.
    for (h, from) in [(Host::A, log_a), (Host::B, log_b)] {
        let log = lab.log(h);
        let during = &log[from.min(log.len())..];
        assert!(
            !during.contains("group state"),
            "{} changed its group state during the load:\n{during}",
            h.node()
        );
    }
}
