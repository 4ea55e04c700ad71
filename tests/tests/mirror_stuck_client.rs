//! A client that stops in the middle of its own traffic (a payload half sent, replies it no
//! longer reads) must not hold up anyone else. A mirrored write keeps its range locked until
//! its request finishes; if the connection's loop stopped driving its finished requests
//! while it waited on that client, their locks stayed taken, and every overlapping write from
//! another client (a VM restarted after its old connection died without a reset, nbdcopy's
//! other connections, a resync chunk) waited for as long as the stuck client stayed stuck.

use std::time::{Duration, Instant};

use nbd_server::proto::*;
use nbdmirror_tests::assert_qemu_io_ok;
use nbdmirror_tests::pair::{Pair, A, MIB, VOLUME};
use nbdmirror_tests::raw::{Mode, RawClient};

/// Far longer than a mirrored 4 KiB write takes, far shorter than any stuck client.
const OTHER_WRITER_TIMEOUT: Duration = Duration::from_secs(15);

fn stuck_client(pair: &Pair, mode: Mode) -> RawClient {
    let tcp = pair
        .env
        .ns
        .connect_tcp(A.export_addr())
        .expect("connect to node-a's export");
    let mut c = RawClient::from_tcp(tcp);
    c.negotiate(mode, false, VOLUME);
    c
}

/// Another client writes the range the stuck client wrote; it must finish, and soon.
fn assert_other_client_writes_block_zero(pair: &Pair) {
    let started = Instant::now();
    let out = pair.env.run_with_timeout(
        &[
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 4k",
            &pair.uri(A),
        ],
        OTHER_WRITER_TIMEOUT,
    );
    let took = started.elapsed();
    assert_qemu_io_ok(&out);
    assert!(
        took < OTHER_WRITER_TIMEOUT,
        "a write overlapping the stuck client's finished write took {took:?}"
    );
}

#[test]
fn a_client_stalled_mid_payload_does_not_hold_its_finished_writes_locks() {
    let mut pair = Pair::new();
    pair.start_with_a_primary();
    let mut stuck = stuck_client(&pair, Mode::Structured);
    // One whole write, then a second one whose payload stops halfway: the server reads the
    // first, sends it to the peer, and then waits for the rest of the second's payload.
    let whole = vec![0x11u8; 4096];
    let c1 = stuck.next_cookie();
    stuck
        .send_request(0, CMD_WRITE, c1, 0, 4096, &whole)
        .expect("send the whole write");
    let c2 = stuck.next_cookie();
    let mut half = Vec::new();
    stuck.encode_request(&mut half, 0, CMD_WRITE, c2, MIB, 65536, &[0x22u8; 32768]);
    stuck.send(&half).expect("send half a write");
    std::thread::sleep(Duration::from_millis(500));

    assert_other_client_writes_block_zero(&pair);
    // The stuck client sends the rest of its payload: both its writes are answered, and the
    // other client's later write of block 0 is what stays there.
    stuck
        .send(&[0x22u8; 32768])
        .expect("send the rest of the payload");
    stuck.set_timeout(Duration::from_secs(10));
    let mut answered = Vec::new();
    for _ in 0..2 {
        let r = stuck.read_reply().expect("a write's reply");
        assert_eq!(r.error, 0, "a write of the stuck client failed: {r:?}");
        answered.push(r.cookie);
    }
    answered.sort_unstable();
    let mut want = vec![c1, c2];
    want.sort_unstable();
    assert_eq!(answered, want);
    drop(stuck);
    let out = pair.env.run(&[
        "qemu-io",
        "-f",
        "raw",
        "-c",
        "read -P 0x5a 0 4k",
        &pair.uri(A),
    ]);
    assert_qemu_io_ok(&out);
}

#[test]
fn a_client_that_stops_reading_replies_does_not_hold_its_finished_writes_locks() {
    let mut pair = Pair::with_size("256M");
    pair.start_with_a_primary();
    // Simple replies: a read of a hole still carries all its bytes.
    let mut stuck = stuck_client(&pair, Mode::Simple);
    // A write, then reads far larger than the socket buffers, never read back: the server
    // finishes a read and blocks sending it while the write's peer answer arrives.
    let c1 = stuck.next_cookie();
    let mut burst = Vec::new();
    stuck.encode_request(&mut burst, 0, CMD_WRITE, c1, 0, 4096, &[0x33u8; 4096]);
    let mut reads = Vec::new();
    for i in 0..4u64 {
        let c = stuck.next_cookie();
        stuck.encode_request(
            &mut burst,
            0,
            CMD_READ,
            c,
            32 * MIB * (i + 1),
            32 * MIB,
            &[],
        );
        reads.push(c);
    }
    stuck.send(&burst).expect("send the burst");
    std::thread::sleep(Duration::from_millis(500));

    assert_other_client_writes_block_zero(&pair);
    // Everything the stuck client asked for is still answered, in full, once it reads.
    stuck.set_timeout(Duration::from_secs(30));
    let mut write_done = false;
    let mut reads_done = 0;
    for _ in 0..5 {
        let r = stuck.read_reply().expect("a reply of the burst");
        assert_eq!(r.error, 0, "a request of the burst failed: {r:?}");
        if r.cookie == c1 {
            write_done = true;
        } else {
            assert!(reads.contains(&r.cookie), "unknown cookie: {r:?}");
            assert_eq!(r.data_covered, 32 * MIB, "a short read reply");
            reads_done += 1;
        }
    }
    assert!(write_done && reads_done == 4);
}
