//! What a sysadmin reads: the text `status` shows the failover groups (and the takeover hint
//! of a group that never fails over by itself, with the group's name), a refused `promote` or
//! `demote` of a grouped volume names both `swap` and `takeover` and says which applies, a
//! resized volume is refused at start with what the metadata file records and how to get
//! back, and `demote` says its export's clients were disconnected.

use std::time::{Duration, Instant};

use nbdmirror_tests::lab::{group_field, group_state, Host, Lab};
use nbdmirror_tests::pair::{volume_of, Pair, A, MIB, VOLUME};
use nbdmirror_tests::wait_with_deadline;

/// The first line of `text` that starts with `word` (a table row), split into its columns.
fn row<'a>(text: &'a str, word: &str) -> Vec<&'a str> {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(word))
        .unwrap_or_else(|| panic!("no line starting with {word:?} in:\n{text}"))
        .split_whitespace()
        .collect()
}

/// A pair without witness (nor fence hook): the text status shows the group on both nodes;
/// `promote disk0` on the secondary is refused naming `swap vm1` for a live peer and
/// `takeover vm1` for a dead one; once node-a is dead, node-b's text status says to run
/// `nbdmirror takeover vm1`, and doing so works.
#[test]
fn without_witness_status_text_and_refusals_point_to_swap_and_takeover() {
    let mut lab = Lab::new();
    for f in ["node-a.toml", "node-b.toml"] {
        lab.patch(f, "witness = \"10.99.0.10:7790\"\n", "");
    }
    lab.start_all();
    let cfg_a = lab.config(Host::A);
    let cfg_a = cfg_a.to_str().unwrap();
    let cfg_b = lab.config(Host::B);
    let cfg_b = cfg_b.to_str().unwrap();

    let text = lab.nbdmirror(Host::A, &["status", "--config", cfg_a]);
    assert!(text.success(), "{text}");
    let volumes = row(&text.stdout, "VOLUME");
    assert_eq!(volumes[..2], ["VOLUME", "ROLE"], "{text}");
    assert_eq!(
        row(&text.stdout, "disk0")[..2],
        ["disk0", "primary"],
        "{text}"
    );
    assert_eq!(
        row(&text.stdout, "GROUP"),
        ["GROUP", "STATE", "PRIMARY", "PEER", "WITNESS"],
        "{text}"
    );
    assert_eq!(
        row(&text.stdout, "vm1"),
        ["vm1", "primary", "node-a", "(here)", "alive", "none"],
        "{text}"
    );
    let text = lab.nbdmirror(Host::B, &["status", "--config", cfg_b]);
    assert_eq!(
        row(&text.stdout, "vm1"),
        ["vm1", "secondary", "node-a", "alive", "none"],
        "{text}"
    );

    for cmd in ["promote", "demote"] {
        let refused = lab.nbdmirror(Host::B, &[cmd, "disk0", "--config", cfg_b]);
        let msg = refused.all();
        assert!(!refused.success(), "{refused}");
        for part in [
            "`nbdmirror swap vm1`",
            "while both nodes run",
            "`nbdmirror takeover vm1`",
            "if the peer is down",
            "no witness or fence hook",
            "--force",
        ] {
            assert!(msg.contains(part), "{cmd}: no {part:?} in {msg}");
        }
        eprintln!("{cmd} refused: {msg}");
    }

    lab.kill(Host::A);
    let s = lab.wait_for(
        "node-b to wait for an operator",
        Duration::from_secs(20),
        |lab| {
            let s = lab.try_status(Host::B).ok()?;
            let waiting = group_state(&s) == "waiting"
                && group_field(&s, "reason").contains("nbdmirror takeover");
            waiting.then_some(s)
        },
    );
    let reason = group_field(&s, "reason");
    let text = lab.nbdmirror(Host::B, &["status", "--config", cfg_b]);
    assert!(text.success(), "{text}");
    eprintln!("node-b's status, node-a dead:\n{}", text.stdout);
    assert_eq!(
        row(&text.stdout, "vm1"),
        ["vm1", "waiting", "none", "dead", "none"],
        "{text}"
    );
    // The daemon's own reason, the same as in --json, with the group's name filled in.
    assert!(
        text.stdout
            .contains(&reason.replace("takeover GROUP`", "takeover vm1`")),
        "the JSON reason {reason:?} is not in the text status:\n{text}"
    );
    assert!(text.stdout.contains("`nbdmirror takeover vm1`"), "{text}");

    // The hint works as written.
    let out = lab.nbdmirror(Host::B, &["takeover", "vm1", "--config", cfg_b]);
    assert!(out.success(), "takeover failed: {out}\n{}", lab.all_logs());
    let text = lab.nbdmirror(Host::B, &["status", "--config", cfg_b]);
    let vm1 = row(&text.stdout, "vm1");
    assert!(
        matches!(vm1[1], "primary" | "alone") && vm1[2..4] == ["node-b", "(here)"],
        "{text}"
    );
}

/// With a witness, the text status shows it, and the refusal says the group fails over by
/// itself, so takeover is not the way when the peer dies.
#[test]
fn with_a_witness_the_refusal_says_the_group_fails_over_by_itself() {
    let mut lab = Lab::new();
    lab.start_all();
    let cfg_b = lab.config(Host::B);
    let cfg_b = cfg_b.to_str().unwrap();
    let text = lab.wait_for(
        "node-b's text status to show the witness reachable",
        Duration::from_secs(10),
        |lab| {
            let t = lab.nbdmirror(Host::B, &["status", "--config", cfg_b]);
            (t.success() && t.stdout.contains("reachable")).then_some(t)
        },
    );
    assert_eq!(
        row(&text.stdout, "vm1"),
        ["vm1", "secondary", "node-a", "alive", "reachable"],
        "{text}"
    );
    let refused = lab.nbdmirror(Host::B, &["promote", "disk0", "--config", cfg_b]);
    let msg = refused.all();
    assert!(!refused.success(), "{refused}");
    for part in [
        "`nbdmirror swap vm1`",
        "fails over by itself",
        "`nbdmirror takeover vm1` does not apply",
    ] {
        assert!(msg.contains(part), "no {part:?} in {msg}");
    }
}

/// Both images grown and `size` raised: the start is refused with what the metadata file
/// records, that resizing is not supported yet and how to get back; doing that works. A
/// shrink is refused the same way.
#[test]
fn a_resized_volume_is_refused_with_the_way_back() {
    let mut pair = Pair::new();
    pair.start(A);
    pair.stop(A);
    let cfg = pair.config(A);
    let original = std::fs::read_to_string(&cfg).unwrap();
    assert!(original.contains("size = \"64M\""), "{original}");
    let image = pair.image(A);
    let meta = pair.metadata(A);
    let set_len = |len: u64| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap()
            .set_len(len)
            .unwrap();
    };

    for (size, bytes) in [("128M", 128 * MIB), ("32M", 32 * MIB)] {
        set_len(bytes);
        std::fs::write(
            &cfg,
            original.replace("size = \"64M\"", &format!("size = \"{size}\"")),
        )
        .unwrap();
        let log = pair.env.path(&format!("resized-{size}.log"));
        let mut child = pair.spawn_serve(&cfg, &log);
        let status = wait_with_deadline(&mut child, Duration::from_secs(30)).unwrap_or_else(|| {
            panic!(
                "serve with a resized volume did not exit:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(!status.success(), "{text}");
        eprintln!("size {size}: {text}");
        for part in [
            format!("metadata file {}", meta.display()),
            format!("records a volume of {} bytes", 64 * MIB),
            format!("the config says size = {bytes}"),
            "growing or shrinking a volume is not supported yet".into(),
            format!("`size = {}`", 64 * MIB),
            format!("`truncate -s {} {}`", 64 * MIB, image.display()),
        ] {
            assert!(text.contains(&part), "no {part:?} in:\n{text}");
        }
        assert!(
            !text.contains("fix the config or the image"),
            "the metadata file is not an image:\n{text}"
        );
        assert_eq!(
            text.contains("nbdmirror verify disk0"),
            bytes < 64 * MIB,
            "only a shrink loses the image's end:\n{text}"
        );
    }

    // The way back, as the message says: the old size in the config and the image.
    std::fs::write(&cfg, &original).unwrap();
    set_len(64 * MIB);
    let t0 = Instant::now();
    pair.start(A);
    let st = pair.status(A);
    let vol = volume_of(&st, VOLUME).unwrap();
    assert_eq!(vol["size"], 64 * MIB, "{st}");
    eprintln!("restarted with the old size in {:?}", t0.elapsed());
}

/// A successful demotion of a primary says that its export stopped and that its clients
/// were disconnected.
#[test]
fn demote_says_the_export_clients_were_disconnected() {
    let mut pair = Pair::new();
    pair.start_with_a_primary();
    let out = pair.demote(A);
    assert!(out.success(), "{out}");
    assert!(
        out.stdout.contains("export stopped") && out.stdout.contains("were disconnected"),
        "{out}"
    );
    let again = pair.demote(A);
    assert!(
        again.stdout.contains("already secondary") && !again.stdout.contains("disconnected"),
        "{again}"
    );
}
