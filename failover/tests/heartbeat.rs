//! Two heartbeat services on 127.0.0.1 (ephemeral ports): liveness, payload, death and
//! return, forged and replayed datagrams, and a dead link beside a live one.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use failover::heartbeat::{
    encode, heartbeat_key, Datagram, HeartbeatError, HeartbeatSpec, Heartbeats, PeerView,
};
use tokio::sync::watch;

const INTERVAL: Duration = Duration::from_millis(100);
const TIMEOUT: Duration = Duration::from_millis(600);
/// Scheduling slack on a loaded 2-core machine.
const SLACK: Duration = Duration::from_millis(400);

fn key() -> [u8; 32] {
    heartbeat_key("a heartbeat test secret")
}

/// A 127.0.0.1 port that was free a moment ago.
fn free_addr() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    s.local_addr().expect("local_addr")
}

fn spec(node: &str, links: Vec<(SocketAddr, SocketAddr)>) -> HeartbeatSpec {
    let mut s = HeartbeatSpec::new(node, links, key());
    s.interval = INTERVAL;
    s.timeout = TIMEOUT;
    s
}

/// Starts, retrying briefly if a just-freed port is still held by a closing socket.
async fn start(spec: HeartbeatSpec) -> Heartbeats {
    for _ in 0..50 {
        match Heartbeats::start(spec.clone()) {
            Ok(h) => return h,
            Err(HeartbeatError::Bind { .. }) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => panic!("start: {e}"),
        }
    }
    panic!("cannot bind {:?}", spec.links);
}

/// Waits (bounded) until the view satisfies `pred`; returns how long it took.
async fn wait_until(
    rx: &mut watch::Receiver<PeerView>,
    limit: Duration,
    what: &str,
    pred: impl FnMut(&PeerView) -> bool,
) -> Duration {
    let t = Instant::now();
    let r = tokio::time::timeout(limit, rx.wait_for(pred))
        .await
        .map(|r| r.is_ok());
    match r {
        Ok(true) => t.elapsed(),
        Ok(false) => panic!("heartbeat service ended while waiting for {what}"),
        Err(_) => panic!("{what}: not within {limit:?}; view: {:?}", *rx.borrow()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alive_payload_death_and_return() {
    let (a_addr, b_addr) = (free_addr(), free_addr());
    let a = start(spec("node-a", vec![(a_addr, b_addr)])).await;
    let b = start(spec("node-b", vec![(b_addr, a_addr)])).await;
    a.set_payload(b"primary gen=7".to_vec()).expect("payload");
    let mut view_b = b.subscribe();
    let mut view_a = a.subscribe();

    let took = wait_until(
        &mut view_b,
        2 * INTERVAL + SLACK,
        "node-a alive at node-b",
        |v| v.alive && v.last_payload.as_deref() == Some(&b"primary gen=7"[..]),
    )
    .await;
    eprintln!("alive and payload after {took:?}");
    wait_until(
        &mut view_a,
        2 * INTERVAL + SLACK,
        "node-b alive at node-a",
        |v| v.alive,
    )
    .await;
    {
        let v = view_b.borrow();
        assert_eq!(v.node.as_deref(), Some("node-a"));
        assert_eq!(v.incarnation, Some(a.incarnation()));
        assert_eq!(v.links_up, vec![true]);
    }

    // A payload change travels at once, not at the next tick.
    a.set_payload(b"secondary".to_vec()).expect("payload");
    wait_until(&mut view_b, INTERVAL + SLACK, "new payload", |v| {
        v.last_payload.as_deref() == Some(&b"secondary"[..])
    })
    .await;
    assert!(a.set_payload(vec![0; 1201]).is_err());

    // node-a stops: node-b declares it dead within timeout + interval.
    let first_incarnation = a.incarnation();
    a.stop().await;
    let took = wait_until(
        &mut view_b,
        TIMEOUT + INTERVAL + SLACK,
        "node-a dead",
        |v| !v.alive,
    )
    .await;
    eprintln!("dead after {took:?}");
    assert!(
        took >= TIMEOUT - 2 * INTERVAL,
        "declared dead too early: {took:?}"
    );
    assert_eq!(
        view_b.borrow().last_payload.as_deref(),
        Some(&b"secondary"[..]),
        "the last payload is kept"
    );

    // node-a returns (a new incarnation): alive again.
    let a2 = start(spec("node-a", vec![(a_addr, b_addr)])).await;
    assert_ne!(a2.incarnation(), first_incarnation);
    wait_until(
        &mut view_b,
        2 * INTERVAL + SLACK,
        "node-a alive again",
        |v| v.alive && v.incarnation == Some(a2.incarnation()),
    )
    .await;
    a2.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_replayed_datagrams_are_ignored() {
    let attacker = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let attacker_addr = attacker.local_addr().expect("addr");
    let b = start(spec(
        "node-b",
        vec![("127.0.0.1:0".parse().unwrap(), attacker_addr)],
    ))
    .await;
    let b_addr = b.local_addrs()[0];
    let mut view = b.subscribe();

    let b_incarnation = b.incarnation();
    let datagram_echoing = |seq: u64, payload: &[u8], key: &[u8; 32], echo: u64| {
        let d = Datagram {
            link: 0,
            node: "node-a".into(),
            incarnation: 99,
            seq,
            sent_ms: 1_000 + seq,
            echo,
            payload: payload.to_vec(),
        };
        encode(key, &d).expect("encode")
    };
    let datagram = |seq: u64, payload: &[u8], key: &[u8; 32]| {
        datagram_echoing(seq, payload, key, b_incarnation)
    };

    // Garbage, a wrong secret, our own name (reflection), another link's index: all dropped.
    let wrong = heartbeat_key("another secret, not ours");
    let mut own = Datagram {
        link: 0,
        node: "node-b".into(),
        incarnation: 5,
        seq: 1,
        sent_ms: 1,
        echo: b.incarnation(),
        payload: vec![],
    };
    let reflected = encode(&key(), &own).expect("encode");
    own.node = "node-a".into();
    own.link = 1;
    let other_link = encode(&key(), &own).expect("encode");
    for _ in 0..5 {
        for bytes in [
            b"garbage".to_vec(),
            vec![0u8; 1500],
            datagram(1, b"forged", &wrong),
            reflected.clone(),
            other_link.clone(),
        ] {
            attacker.send_to(&bytes, b_addr).await.expect("send");
        }
        tokio::time::sleep(INTERVAL).await;
    }
    assert!(
        !view.borrow().alive,
        "unauthenticated datagrams made the peer alive"
    );

    // Authentic heartbeats recorded before node-b started (they echo the incarnation of an
    // earlier run of node-b) do not make the peer alive; node-b echoes them back, so a live
    // sender would confirm within a round trip.
    for seq in 1..=5 {
        attacker
            .send_to(&datagram_echoing(seq, b"recorded", &key(), 12345), b_addr)
            .await
            .expect("send");
        tokio::time::sleep(INTERVAL / 2).await;
    }
    assert!(
        !view.borrow().alive,
        "a recording from before node-b's start made the peer alive"
    );
    let mut buf = vec![0u8; 2048];
    let echoed = tokio::time::timeout(2 * INTERVAL + SLACK, async {
        loop {
            let (n, _) = attacker.recv_from(&mut buf).await.expect("recv");
            if let Ok(d) = failover::heartbeat::decode(&key(), &buf[..n]) {
                if d.echo == 99 {
                    return d;
                }
            }
        }
    })
    .await
    .expect("node-b never echoed the run it heard");
    assert_eq!(echoed.incarnation, b_incarnation);
    // A recording of a still older run (an earlier clock) does not displace the run node-b
    // echoes: a stream of recordings cannot keep the live run from being confirmed.
    let older = Datagram {
        link: 0,
        node: "node-a".into(),
        incarnation: 98,
        seq: 1,
        sent_ms: 500,
        echo: 12345,
        payload: b"older".to_vec(),
    };
    let older = encode(&key(), &older).expect("encode");
    let until = Instant::now() + 3 * INTERVAL;
    let mut echoes = 0;
    let mut live_seq = 100;
    while Instant::now() < until {
        // The live run keeps speaking (still unconfirmed), the older recording alongside.
        live_seq += 1;
        attacker
            .send_to(&datagram_echoing(live_seq, b"live", &key(), 12345), b_addr)
            .await
            .expect("send");
        attacker.send_to(&older, b_addr).await.expect("send");
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(INTERVAL / 4, attacker.recv_from(&mut buf)).await
        {
            if let Ok(d) = failover::heartbeat::decode(&key(), &buf[..n]) {
                assert_eq!(d.echo, 99, "an older recording displaced the echoed run");
                echoes += 1;
            }
        }
    }
    assert!(
        echoes >= 2,
        "node-b sent {echoes} heartbeats in {:?}",
        3 * INTERVAL
    );

    // Genuine heartbeats (we hold the key, and echo node-b's run) are accepted; a replay of
    // seq 3 is not.
    let recorded: Vec<Vec<u8>> = (6..=8).map(|s| datagram(s, b"real", &key())).collect();
    for bytes in &recorded {
        attacker.send_to(bytes, b_addr).await.expect("send");
    }
    wait_until(&mut view, SLACK, "genuine heartbeat accepted", |v| {
        v.alive && v.last_payload.as_deref() == Some(&b"real"[..])
    })
    .await;
    attacker
        .send_to(&datagram(8, b"replayed seq", &key()), b_addr)
        .await
        .expect("send");
    tokio::time::sleep(INTERVAL).await;
    assert_eq!(view.borrow().last_payload.as_deref(), Some(&b"real"[..]));

    // The sender goes silent: dead. Replaying the recorded datagrams does not revive it.
    wait_until(&mut view, TIMEOUT + INTERVAL + SLACK, "peer dead", |v| {
        !v.alive
    })
    .await;
    for _ in 0..10 {
        for bytes in &recorded {
            attacker.send_to(bytes, b_addr).await.expect("send");
        }
        tokio::time::sleep(INTERVAL / 2).await;
        assert!(!view.borrow().alive, "a replay made the dead peer alive");
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_dead_link_keeps_the_peer_alive() {
    let (a1, a2, b1, b2, dead) = (
        free_addr(),
        free_addr(),
        free_addr(),
        free_addr(),
        free_addr(),
    );
    // node-a's second link sends to a port where nobody listens: node-b never hears it.
    let a = start(spec("node-a", vec![(a1, b1), (a2, dead)])).await;
    let b = start(spec("node-b", vec![(b1, a1), (b2, a2)])).await;
    let mut view_b = b.subscribe();
    let mut view_a = a.subscribe();
    wait_until(
        &mut view_b,
        2 * INTERVAL + SLACK,
        "node-a alive at node-b",
        |v| v.alive,
    )
    .await;
    wait_until(
        &mut view_a,
        2 * INTERVAL + SLACK,
        "both links up at node-a",
        |v| v.links_up == [true, true],
    )
    .await;
    // Over several timeouts node-b never loses node-a, and sees link 1 down.
    let end = Instant::now() + 3 * TIMEOUT;
    while Instant::now() < end {
        {
            let v = view_b.borrow_and_update();
            assert!(v.alive, "peer lost although link 0 works: {v:?}");
            assert_eq!(v.links_up, vec![true, false]);
        }
        tokio::time::sleep(INTERVAL / 2).await;
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn an_address_not_on_this_host_is_a_clear_error() {
    // 192.0.2.0/24 is reserved for documentation: never an address of this host.
    let local: SocketAddr = "192.0.2.1:7790".parse().unwrap();
    let err = Heartbeats::start(spec(
        "node-a",
        vec![(local, "192.0.2.2:7790".parse().unwrap())],
    ))
    .err()
    .expect("binding 192.0.2.1 must fail");
    let msg = err.to_string();
    assert!(
        msg.contains("192.0.2.1:7790") && msg.contains("not an address of this host"),
        "{msg}"
    );
    let err = Heartbeats::start(spec("node-a", vec![]))
        .err()
        .expect("no links");
    assert!(err.to_string().contains("links"), "{err}");
}

/// The peer orders payloads that took different links by their sequence numbers: a sender
/// numbers all its links' datagrams with one counter, never the same number twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_share_one_sequence_counter() {
    let sinks = [
        tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind"),
        tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind"),
    ];
    let links = sinks
        .iter()
        .map(|s| {
            (
                "127.0.0.1:0".parse().unwrap(),
                s.local_addr().expect("addr"),
            )
        })
        .collect();
    let a = start(spec("node-a", links)).await;
    let mut seen: Vec<(usize, u64, Vec<u8>)> = Vec::new();
    let mut buf = vec![0u8; 2048];
    let until = Instant::now() + 4 * INTERVAL;
    let mut version = 0u8;
    while Instant::now() < until {
        version += 1;
        a.set_payload(vec![version]).expect("payload");
        for (i, sock) in sinks.iter().enumerate() {
            while let Ok(Ok((n, _))) =
                tokio::time::timeout(Duration::from_millis(5), sock.recv_from(&mut buf)).await
            {
                let d = failover::heartbeat::decode(&key(), &buf[..n]).expect("decode");
                assert_eq!(usize::from(d.link), i);
                seen.push((i, d.seq, d.payload));
            }
        }
        tokio::time::sleep(INTERVAL / 4).await;
    }
    a.stop().await;
    assert!(
        seen.iter().any(|s| s.0 == 0) && seen.iter().any(|s| s.0 == 1),
        "{seen:?}"
    );
    seen.sort_by_key(|s| s.1);
    for w in seen.windows(2) {
        assert!(
            w[1].1 > w[0].1,
            "sequence number {} sent twice: {seen:?}",
            w[0].1
        );
        assert!(
            w[1].2 >= w[0].2,
            "seq {} carries an older payload than seq {}: {seen:?}",
            w[1].1,
            w[0].1
        );
    }
}
