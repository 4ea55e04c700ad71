//! Failover of groups (a VM: its volumes, virtual IP and hooks) between two nodes.
//!
//! Empty until issue 4. It will hold the per-group state machine (Stopped, Waiting, Alone,
//! Primary, Secondary, Suspended) as pure logic, heartbeats on links of their own, quorum
//! through the peer, a witness or a fence hook, the virtual IP (netlink, gratuitous ARP),
//! and the VM hooks. Invariant to keep: a node promotes only with quorum, and never stale data.
