//! Issue 3: a pair that cannot link for a reason the operator must fix says why in `status`
//! on both nodes, not only in a log line: another shared secret on one node, another volume
//! size. ("peer disconnected: connection closed" told neither.)

use std::time::Duration;

use nbdmirror_tests::pair::{Pair, A, B, SECRET, VOLUME};

fn reason(v: &serde_json::Value) -> String {
    v.get("reason")
        .and_then(|r| r.as_str())
        .unwrap_or_default()
        .to_string()
}

/// Both nodes' volume reasons satisfy `pred` (within 15 s), and the pair never linked.
fn assert_both_say(pair: &Pair, what: &str, pred: impl Fn(&str) -> bool) {
    for node in [A, B] {
        pair.wait_for(node, VOLUME, what, Duration::from_secs(15), |v| {
            pred(&reason(v))
        });
        let v = pair.vol(node, VOLUME);
        assert_eq!(
            v.get("peer").and_then(|p| p.as_str()),
            Some("disconnected"),
            "{}: {v}",
            node.name()
        );
    }
}

#[test]
fn another_secret_on_one_node_shows_in_both_statuses() {
    let mut pair = Pair::new();
    let cfg_b = pair.config(B);
    let text = std::fs::read_to_string(&cfg_b).unwrap();
    assert!(text.contains(SECRET));
    std::fs::write(
        &cfg_b,
        text.replace(SECRET, "another-secret-for-node-b-0123456789"),
    )
    .unwrap();
    pair.start(A);
    pair.start(B);
    assert_both_say(&pair, "a reason naming the shared secret", |r| {
        r.contains("`secret`")
    });
}

#[test]
fn another_volume_size_on_one_node_shows_in_both_statuses() {
    let mut pair = Pair::new();
    let cfg_b = pair.config(B);
    let text = std::fs::read_to_string(&cfg_b).unwrap();
    assert!(text.contains("size = \"64M\""), "{text}");
    std::fs::write(&cfg_b, text.replace("size = \"64M\"", "size = \"32M\"")).unwrap();
    pair.start(A);
    pair.start(B);
    assert_both_say(&pair, "a reason naming both sizes", |r| {
        r.contains("67108864") && r.contains("33554432") && r.contains("fix the config")
    });
}

/// A peer address whose name does not resolve (a typo) is a configuration to fix, not a
/// peer that is down: the status says so.
#[test]
fn a_peer_name_that_does_not_resolve_shows_in_status() {
    let mut pair = Pair::new();
    let cfg_a = pair.config(A);
    let text = std::fs::read_to_string(&cfg_a).unwrap();
    assert!(text.contains("peer = \"127.0.0.1:7802\""), "{text}");
    std::fs::write(
        &cfg_a,
        text.replace(
            "peer = \"127.0.0.1:7802\"",
            "peer = \"no-such-peer.invalid:7802\"",
        ),
    )
    .unwrap();
    pair.start(A);
    pair.wait_for(
        A,
        VOLUME,
        "a reason about the name",
        Duration::from_secs(20),
        |v| reason(v).contains("cannot resolve"),
    );
}
