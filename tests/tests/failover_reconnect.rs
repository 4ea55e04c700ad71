//! Issue 4, topology 2: the VM runs on a separate hypervisor and reaches its disk through
//! the virtual IP. With QEMU's NBD `reconnect-delay`, a running client rides through a storage
//! failover: a write issued while node-a is dead waits, then completes on node-b, and nothing
//! is lost. Without it (the default 0), QEMU fails the request at once. The client here is
//! qemu-io (QEMU's block layer, the same NBD driver a VM uses), on host c.

use std::time::{Duration, Instant};

use nbdmirror_tests::lab::{Host, Lab};

/// The drive options a hypervisor uses (documented in examples/hooks/qemu-vm.sh and the
/// README): the NBD driver with a reconnect delay, through the VIP.
fn image_opts(reconnect_delay: u32) -> String {
    format!(
        "driver=raw,file.driver=nbd,file.server.type=inet,file.server.host=10.99.0.100,\
         file.server.port=10809,file.export=disk0,file.reconnect-delay={reconnect_delay}"
    )
}

#[test]
fn qemu_with_reconnect_delay_rides_through_a_failover() {
    let mut lab = Lab::new();
    lab.start_all();
    lab.wait_handshake(Instant::now(), Duration::from_secs(20));
    let opts = image_opts(20);
    // One qemu-io process, one NBD connection for the whole sequence: write, pause (node-a
    // is killed meanwhile), write again (this one meets the dead server and must wait for
    // the reconnection to node-b), then read both back.
    let client = lab.spawn(
        Host::C,
        &[
            "qemu-io",
            "--image-opts",
            &opts,
            "-c",
            "write -P 0x31 0 1M",
            "-c",
            "flush",
            "-c",
            "sleep 2000",
            "-c",
            "write -P 0x32 1M 1M",
            "-c",
            "flush",
            "-c",
            "read -P 0x31 0 1M",
            "-c",
            "read -P 0x32 1M 1M",
        ],
    );
    std::thread::sleep(Duration::from_millis(800));
    lab.kill(Host::A);
    let (status, out) = client.wait_or_kill(Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| s.success()),
        "qemu-io did not ride through the failover ({status:?}):\n{out}\n{}",
        lab.all_logs()
    );
    assert!(
        !out.contains("failed") && out.matches("read 1048576/1048576").count() == 2,
        "{out}"
    );
    let b = lab.status(Host::B);
    assert_eq!(
        nbdmirror_tests::lab::group_field(&b, "primary_node"),
        "node-b",
        "{b:?}"
    );
}

#[test]
fn without_reconnect_delay_qemu_fails_the_request_at_once() {
    // The control experiment: the setting is what makes the difference.
    let mut lab = Lab::new();
    lab.start_all();
    lab.wait_handshake(Instant::now(), Duration::from_secs(20));
    let opts = image_opts(0);
    let client = lab.spawn(
        Host::C,
        &[
            "qemu-io",
            "--image-opts",
            &opts,
            "-c",
            "write -P 0x31 0 1M",
            "-c",
            "sleep 2000",
            "-c",
            "write -P 0x32 1M 1M",
        ],
    );
    std::thread::sleep(Duration::from_millis(800));
    lab.kill(Host::A);
    let (_status, out) = client.wait_or_kill(Duration::from_secs(60));
    assert!(
        out.contains("write failed") || out.contains("Input/output error"),
        "without reconnect-delay the second write should fail: {out}"
    );
}
