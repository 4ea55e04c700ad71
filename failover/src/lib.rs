//! Failover of groups (a VM: its volumes, virtual IP and hooks) between two nodes.
//!
//! - [`group`]: the per-group state machine (Stopped, Waiting, Alone, Primary, Secondary,
//!   Suspended) as pure logic: facts in, a decision out.
//! - [`vip`]: the group's virtual IP on an interface (netlink), announced by gratuitous ARP.
//! - [`hooks`]: the group's start/stop/monitor/fence commands, with timeouts.
//! - [`heartbeat`]: authenticated UDP heartbeats on one or more links, apart from the data path.
//! - [`witness`]: the third node that votes for at most one primary per group and round.
//! - [`driver`]: the I/O around the state machine: gathers facts, promotes and demotes, moves
//!   the VIP, runs the hooks.
//!
//! Invariant to keep: a node promotes only with quorum (the peer's consent, a witness vote or
//! a successful fence), and never stale data.

pub mod driver;
pub mod group;
pub mod heartbeat;
pub mod hooks;
pub mod vip;
pub mod witness;
