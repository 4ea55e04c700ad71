//! The witness server and its client on 127.0.0.1 (ephemeral ports): votes, leases,
//! queries, restarts, a wrong secret, garbage, replays, and a state file it cannot write.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use failover::witness::{
    encode_request, witness_key, Envelope, GroupRecord, Request, VoteOutcome, WitnessClient,
    WitnessError, WitnessServer, WitnessServerSpec, WitnessState, LEASE_TIMEOUT_MS,
};

const SECRET: &str = "witness test secret 0123";

fn rec(round: u64, holder: &str, generation: u64) -> GroupRecord {
    GroupRecord {
        round,
        holder: holder.into(),
        generation,
    }
}

async fn start(state_file: &Path, listen: SocketAddr) -> WitnessServer {
    let spec = WitnessServerSpec {
        listen,
        key: witness_key(SECRET),
        state_file: state_file.to_owned(),
    };
    // The port of a just-stopped server can take a moment to be free.
    for _ in 0..50 {
        match WitnessServer::start(spec.clone()).await {
            Ok(s) => return s,
            Err(WitnessError::Bind { .. }) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => panic!("witness start: {e}"),
        }
    }
    panic!("cannot bind {listen}");
}

fn client(addr: SocketAddr, node: &str) -> WitnessClient {
    WitnessClient::new(addr, node, witness_key(SECRET))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn votes_leases_and_queries_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("witness.json");
    let server = start(&state, "127.0.0.1:0".parse().unwrap()).await;
    let addr = server.local_addr();
    let (a, b) = (client(addr, "node-a"), client(addr, "node-b"));

    assert_eq!(
        a.vote("vm1", 1, 10).await.expect("vote"),
        VoteOutcome::Granted(rec(1, "node-a", 10))
    );
    // Durable before the answer: the file holds the vote now.
    assert_eq!(
        WitnessState::load(&state).expect("load").groups["vm1"],
        rec(1, "node-a", 10)
    );
    assert_eq!(
        b.vote("vm1", 1, 12).await.expect("vote"),
        VoteOutcome::Denied(Some(rec(1, "node-a", 10)))
    );
    // Asking again in the same round is harmless.
    assert_eq!(
        a.vote("vm1", 1, 10).await.expect("vote"),
        VoteOutcome::Granted(rec(1, "node-a", 10))
    );
    assert_eq!(
        a.vote("vm1", 0, 10).await.expect("vote"),
        VoteOutcome::Denied(Some(rec(1, "node-a", 10)))
    );

    let l = a.lease("vm1", 1).await.expect("lease");
    assert!(l.holder);
    assert!(!b.lease("vm1", 1).await.expect("lease").holder);
    let q = b.query("vm1").await.expect("query");
    assert_eq!(q.record, Some(rec(1, "node-a", 10)));
    assert!(
        q.since_lease.is_some_and(|d| d < Duration::from_secs(5)),
        "{q:?}"
    );
    assert_eq!(b.query("vm2").await.expect("query").record, None);

    // node-b cannot take round 2 while node-a renews its lease.
    assert!(matches!(
        b.vote("vm1", 2, 10).await.expect("vote"),
        VoteOutcome::Denied(_)
    ));
    tokio::time::sleep(Duration::from_millis(LEASE_TIMEOUT_MS + 200)).await;
    // Nor, once the lease lapsed, with other data than node-a last reported.
    assert!(matches!(
        b.vote("vm1", 2, 12).await.expect("vote"),
        VoteOutcome::Denied(_)
    ));
    // node-b is elected in round 2: node-a learns from its lease that it was superseded.
    assert_eq!(
        b.vote("vm1", 2, 10).await.expect("vote"),
        VoteOutcome::Granted(rec(2, "node-b", 10))
    );
    let l = a.lease("vm1", 1).await.expect("lease");
    assert!(!l.holder);
    assert_eq!(l.record, Some(rec(2, "node-b", 10)));
    // The grant was node-b's first lease: node-a, which still has node-b's data, cannot take
    // round 3 straight away (node-b may already be writing alone under its grant).
    assert!(b
        .query("vm1")
        .await
        .expect("query")
        .since_lease
        .is_some_and(|d| d < Duration::from_millis(LEASE_TIMEOUT_MS)));
    assert_eq!(
        a.vote("vm1", 3, 10).await.expect("vote"),
        VoteOutcome::Denied(Some(rec(2, "node-b", 10)))
    );

    // Restart: the votes are back, and the rules still hold.
    server.stop().await;
    assert!(matches!(
        a.clone()
            .with_timeout(Duration::from_millis(200))
            .query("vm1")
            .await,
        Err(WitnessError::Unreachable { .. })
    ));
    let server = start(&state, addr).await;
    assert_eq!(
        a.query("vm1").await.expect("query").record,
        Some(rec(2, "node-b", 10))
    );
    assert_eq!(
        a.vote("vm1", 2, 99).await.expect("vote"),
        VoteOutcome::Denied(Some(rec(2, "node-b", 10)))
    );
    // The holder moves on to round 3 with new data (its lease is not needed for itself).
    assert_eq!(
        b.vote("vm1", 3, 13).await.expect("vote"),
        VoteOutcome::Granted(rec(3, "node-b", 13))
    );
    server.stop().await;
}

/// A holder that gave the group up (a swap) releases its round: the other node is voted in
/// at once instead of after the lease timeout. Only the holder's own latest round counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_round_is_handed_over_without_waiting_for_the_lease() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(
        &dir.path().join("witness.json"),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await;
    let addr = server.local_addr();
    let (a, b) = (client(addr, "node-a"), client(addr, "node-b"));
    assert!(matches!(
        a.vote("vm1", 1, 10).await.expect("vote"),
        VoteOutcome::Granted(_)
    ));
    assert!(a.lease("vm1", 1).await.expect("lease").holder);
    assert!(matches!(
        b.vote("vm1", 2, 10).await.expect("vote"),
        VoteOutcome::Denied(_)
    ));
    // Releases that are not the holder's latest round change nothing.
    assert!(!b.release("vm1", 1).await.expect("release"));
    assert!(!a.release("vm1", 0).await.expect("release"));
    assert!(matches!(
        b.vote("vm1", 2, 10).await.expect("vote"),
        VoteOutcome::Denied(_)
    ));
    assert!(a.release("vm1", 1).await.expect("release"));
    // Still only with the data node-a last reported.
    assert!(matches!(
        b.vote("vm1", 2, 11).await.expect("vote"),
        VoteOutcome::Denied(_)
    ));
    assert_eq!(
        b.vote("vm1", 2, 10).await.expect("vote"),
        VoteOutcome::Granted(rec(2, "node-b", 10))
    );
    // node-b's grant is its lease: node-a cannot take the group straight back.
    assert!(matches!(
        a.vote("vm1", 3, 10).await.expect("vote"),
        VoteOutcome::Denied(_)
    ));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_garbage_and_replays_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("witness.json");
    let server = start(&state, "127.0.0.1:0".parse().unwrap()).await;
    let addr = server.local_addr();

    // A wrong secret gets no answer at all, and no vote.
    let intruder = WitnessClient::new(addr, "node-b", witness_key("not the secret at all"))
        .with_timeout(Duration::from_millis(300));
    match intruder.vote("vm1", 5, 1).await {
        Err(WitnessError::Unreachable { .. }) => {}
        other => panic!("a wrong secret must get no answer, got {other:?}"),
    }

    // Garbage of every shape; the server stays up and unchanged.
    let raw = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let key = witness_key(SECRET);
    let env = |seq: u64, round: u64| Envelope {
        nonce: [seq as u8; 16],
        sender: "node-b".into(),
        incarnation: 77,
        seq,
        sent_ms: 1_000,
        request: Request::Vote {
            group: "vm1".into(),
            round,
            candidate: "node-b".into(),
            generation: 1,
        },
    };
    let good = encode_request(&key, &env(1, 1)).expect("encode");
    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    let mut as_reply = good.clone();
    as_reply[5] = 2;
    for bytes in [
        Vec::new(),
        b"NBMW".to_vec(),
        vec![0xff; 1500],
        vec![0; 65_000],
        flipped,
        as_reply,
        good[..good.len() - 1].to_vec(),
    ] {
        raw.send_to(&bytes, addr).await.expect("send");
    }
    let mut buf = [0u8; 2048];
    let answer = tokio::time::timeout(Duration::from_millis(300), raw.recv_from(&mut buf)).await;
    assert!(answer.is_err(), "garbage got an answer");
    assert_eq!(
        client(addr, "node-a")
            .query("vm1")
            .await
            .expect("query")
            .record,
        None
    );

    // A genuine request is answered once; its replay is not, and changes nothing.
    raw.send_to(&good, addr).await.expect("send");
    tokio::time::timeout(Duration::from_secs(2), raw.recv_from(&mut buf))
        .await
        .expect("genuine request answered")
        .expect("recv");
    assert_eq!(
        client(addr, "node-b")
            .vote("vm1", 2, 1)
            .await
            .expect("vote"),
        VoteOutcome::Granted(rec(2, "node-b", 1))
    );
    raw.send_to(&good, addr).await.expect("send");
    let answer = tokio::time::timeout(Duration::from_millis(300), raw.recv_from(&mut buf)).await;
    assert!(answer.is_err(), "a replayed request was answered");
    assert_eq!(
        client(addr, "node-a")
            .query("vm1")
            .await
            .expect("query")
            .record,
        Some(rec(2, "node-b", 1))
    );
    server.stop().await;
}

#[tokio::test]
async fn a_vote_it_cannot_store_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("no-such-folder").join("witness.json");
    let server = start(&state, "127.0.0.1:0".parse().unwrap()).await;
    let a = client(server.local_addr(), "node-a");
    match a.vote("vm1", 1, 1).await {
        Err(WitnessError::Refused(reason)) => assert!(reason.contains("cannot store"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(
        a.query("vm1").await.expect("query").record,
        None,
        "nothing granted in memory either"
    );
    server.stop().await;
}

#[tokio::test]
async fn an_address_not_on_this_host_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = WitnessServerSpec {
        listen: "192.0.2.10:7790".parse().unwrap(),
        key: witness_key(SECRET),
        state_file: dir.path().join("w.json"),
    };
    let e = WitnessServer::start(spec).await.err().expect("must fail");
    let msg = e.to_string();
    assert!(
        msg.contains("192.0.2.10:7790") && msg.contains("not an address of this host"),
        "{msg}"
    );
}
