//! Issue 3: a pair that cannot link for a reason the operator must fix says why in `status`
//! on both nodes, not only in a log line: another shared secret on one node, another volume
//! size. ("peer disconnected: connection closed" told neither.) A node given the other's
//! metadata file refuses to start.

use std::time::Duration;

use nbdmirror_tests::pair::{Pair, A, B, SECRET, VOLUME};
use nbdmirror_tests::wait_with_deadline;

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

/// node-b's metadata file copied over node-a's (a mixed-up restore): node-a would take
/// node-b's history for its own image and call two different copies in sync. It refuses to
/// start, saying whose file it is, and leaves the file untouched.
#[test]
fn a_metadata_file_of_the_other_node_is_refused() {
    let mut pair = Pair::new();
    pair.start_with_a_primary();
    pair.stop(B);
    pair.stop(A);
    std::fs::copy(pair.metadata(B), pair.metadata(A)).expect("copy node-b's metadata");
    let before = std::fs::read(pair.metadata(A)).unwrap();
    let log = pair.env.path("foreign-meta.log");
    let mut child = pair.spawn_serve(&pair.config(A), &log);
    let status = wait_with_deadline(&mut child, Duration::from_secs(30)).unwrap_or_else(|| {
        panic!(
            "serve did not exit: {}",
            std::fs::read_to_string(&log).unwrap()
        )
    });
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{text}");
    assert!(
        text.contains("belongs to node \"node-b\"") && text.contains("not to this node \"node-a\""),
        "{text}"
    );
    assert_eq!(
        std::fs::read(pair.metadata(A)).unwrap(),
        before,
        "the file was changed"
    );
}
