//! Failover of groups (a VM: its volumes, virtual IP and hooks) between two nodes.
//!
//! - [`group`]: the per-group state machine (Stopped, Waiting, Alone, Primary, Secondary,
//!   Suspended) as pure logic: facts in, a decision out.
//!
//! Invariant to keep: a node promotes only with quorum (the peer's consent, a witness vote or
//! a successful fence), and never stale data.

pub mod group;
pub mod heartbeat;
pub mod witness;
