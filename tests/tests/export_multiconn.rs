//! Several connections to one export: with CAN_MULTI_CONN, a FLUSH on any connection covers
//! the writes completed on every connection.

use nbd_server::proto::*;
use nbdmirror_tests::data::{assert_bytes_eq, pattern, read_file_range};
use nbdmirror_tests::raw::{Mode, RawClient};
use nbdmirror_tests::TestEnv;
use nix::sys::signal::Signal;

const MIB: u64 = 1 << 20;

#[test]
fn flush_on_one_connection_covers_writes_completed_on_others() {
    let env = TestEnv::new();
    let mut server = env.start_export("32M", &[]);
    let mut conns: Vec<RawClient> = (0..4)
        .map(|i| {
            let mut c = if i % 2 == 0 {
                server.raw_unix()
            } else {
                env.raw_tcp()
            };
            c.negotiate(Mode::Structured, false, "");
            assert_ne!(c.tflags & TF_CAN_MULTI_CONN, 0, "CAN_MULTI_CONN");
            assert_ne!(c.tflags & TF_SEND_FLUSH, 0, "SEND_FLUSH");
            c
        })
        .collect();
    // Connections 0..3 write (no FUA, no flush), each its own range at odd offsets.
    let ranges: Vec<(u64, Vec<u8>)> = (0..3u64)
        .map(|i| {
            let off = 3 * MIB + 5 + i * 5 * MIB;
            (off, pattern(40 + i, off, 2 * MIB as usize + 333))
        })
        .collect();
    for (i, (off, d)) in ranges.iter().enumerate() {
        assert_eq!(conns[i].write(*off, d, 0), 0);
    }
    // Connection 3 flushes; it sees everything.
    assert_eq!(conns[3].flush(), 0);
    for (off, d) in &ranges {
        let got = conns[3].read(*off, d.len() as u64).unwrap();
        assert_bytes_eq(&got, d, "read on the flushing connection");
    }
    // Every connection sees every other's writes.
    for c in conns.iter_mut() {
        for (off, d) in &ranges {
            assert_bytes_eq(&c.read(*off, d.len() as u64).unwrap(), d, "cross read");
        }
    }
    // A FUA write on one connection, without any flush, is visible on another.
    let fua = pattern(77, 20 * MIB, 70_000);
    assert_eq!(conns[1].write(20 * MIB, &fua, CMD_FLAG_FUA), 0);
    assert_bytes_eq(
        &conns[2].read(20 * MIB, 70_000).unwrap(),
        &fua,
        "FUA cross read",
    );

    // Kill the server without letting it flush at exit: whatever was flushed (or FUA) on any
    // connection must already be in the image file, not in a server-side buffer.
    let (status, _) = server
        .stop(Signal::SIGKILL, std::time::Duration::from_secs(10))
        .expect("SIGKILL");
    assert_eq!(status.code(), None, "killed by the signal");
    let img = env.path("disk.img");
    for (off, d) in &ranges {
        assert_bytes_eq(
            &read_file_range(&img, *off, d.len()),
            d,
            "image file after flush",
        );
    }
    assert_bytes_eq(
        &read_file_range(&img, 20 * MIB, 70_000),
        &fua,
        "image after FUA",
    );
}
