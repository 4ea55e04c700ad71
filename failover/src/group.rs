//! The per-group state machine, as pure logic: facts in, a decision out. The daemon gathers
//! the facts (its volumes, the peer's heartbeats, the witness) a few times a second, calls
//! [`decide`], and carries out the decision (promote, demote, VIP, hooks). Both nodes run the
//! same function on mirrored facts, so when they can talk they agree without a vote; when they
//! cannot, a node promotes only with quorum: the witness's vote or a successful fence.
//!
//! Invariants (property-tested below):
//! - a node never decides to become primary while the peer is alive and primary;
//! - a node never becomes primary with stale, inconsistent or split-brain data;
//! - without a witness or a fence hook, a node never becomes primary while the peer is dead;
//! - with both alive, at most one of the two mirrored decisions wants to be primary.

use std::fmt;
use std::time::Duration;

/// A group's state on one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupState {
    /// Not started yet (first evaluation pending).
    Stopped,
    /// Must not start here: stale data, no quorum, peer state unknown, split brain.
    Waiting,
    /// Primary without its peer: serving, changes tracked for the resync.
    Alone,
    /// Primary with the peer connected (in sync or syncing).
    Primary,
    /// The peer is primary; this node receives its writes.
    Secondary,
    /// Primary that lost both the peer and the witness: I/O waits, nothing acknowledged alone.
    Suspended,
}

impl GroupState {
    pub fn as_str(self) -> &'static str {
        match self {
            GroupState::Stopped => "stopped",
            GroupState::Waiting => "waiting",
            GroupState::Alone => "alone",
            GroupState::Primary => "primary",
            GroupState::Secondary => "secondary",
            GroupState::Suspended => "suspended",
        }
    }

    pub fn parse(s: &str) -> Option<GroupState> {
        Some(match s {
            "stopped" => GroupState::Stopped,
            "waiting" => GroupState::Waiting,
            "alone" => GroupState::Alone,
            "primary" => GroupState::Primary,
            "secondary" => GroupState::Secondary,
            "suspended" => GroupState::Suspended,
            _ => return None,
        })
    }

    pub fn is_primary(self) -> bool {
        matches!(
            self,
            GroupState::Alone | GroupState::Primary | GroupState::Suspended
        )
    }
}

impl fmt::Display for GroupState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What this node's copy of the group's data is worth, from its volumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataState {
    /// Replication connected and in sync (or this node is the resync source).
    UpToDate,
    /// Was in sync when the peer was lost: promotable with quorum.
    InSyncWhenLost,
    /// Older than the peer, an unfinished resync target, or unknown after a restart.
    Stale,
    /// Both sides wrote alone: an operator must resolve it.
    SplitBrain,
}

/// The peer as its heartbeats describe it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerFacts {
    pub state: GroupState,
    /// Its election round for the group.
    pub round: u64,
    /// The peer's data is newer than ours (from the volumes' generations), or equal.
    pub data_newer: bool,
    pub data_equal: bool,
    /// The peer hands the group over to us (swap, failing VM, auto-failback).
    pub handing_over: bool,
    /// The peer is in sync and ready to take over (for swap and failback).
    pub ready: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Witness {
    /// No witness configured.
    None,
    /// Configured but not answering.
    Unreachable,
    /// Answering; `holder_is_me`: the latest round's holder is this node; `lease_fresh`: this
    /// node renewed its lease recently enough to keep acknowledging writes alone.
    Reachable {
        holder_is_me: bool,
        lease_fresh: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    /// Current state on this node.
    pub state: GroupState,
    pub round: u64,
    pub is_preferred: bool,
    pub auto_failback: bool,
    pub data: DataState,
    /// `None`: no heartbeat from the peer within the failure timeout.
    pub peer: Option<PeerFacts>,
    pub witness: Witness,
    pub fence_configured: bool,
    /// The peer has been silent for its [`fence_grace`] after the failure timeout: the time
    /// a live primary (or the preferred node) gets to fence first, so two nodes never fence
    /// each other at once.
    pub peer_silent_long: bool,
    /// This node (primary) fenced the peer since it lost it.
    pub peer_fenced: bool,
    /// The VM failed its monitor and used up its local restarts.
    pub vm_failed: bool,
    /// An operator asked to move the group to the other node.
    pub swap_requested: bool,
    /// This node just handed the group over and waits for the peer to take it.
    pub handing_over: bool,
    /// An operator asserted that the peer is down and asked this node to take the group
    /// (`nbdmirror takeover`; groups without witness or fence hook only).
    pub operator_takeover: bool,
}

/// What the node should do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Keep (or enter) a non-primary state.
    Stay { state: GroupState, reason: String },
    /// Become primary in round `round`; `quorum` says how that is justified.
    Promote {
        round: u64,
        quorum: Quorum,
        reason: String,
    },
    /// Stay primary; `alone`: the peer is away.
    Serve { state: GroupState, reason: String },
    /// Stop serving: stop the VM, remove the VIP, demote the volumes.
    Demote { reason: String },
    /// Primary without quorum: keep the role but let no write be acknowledged alone.
    Suspend { reason: String },
    /// Primary that lost its peer, with a fence hook and no witness: fence the peer before
    /// acknowledging any write alone (the peer fences only after a grace period, so the
    /// primary wins the race when it is alive; writes wait meanwhile).
    FencePeer { reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quorum {
    /// The peer is alive and agrees (it computes the mirror decision).
    PeerConsent,
    /// Ask the witness for round `round` first; promote only if granted.
    WitnessVote,
    /// Run the fence hook first; promote only if it exits 0.
    Fence,
    /// An operator's `takeover`: they vouch that the peer is down.
    Operator,
}

fn stay(state: GroupState, reason: impl Into<String>) -> Decision {
    Decision::Stay {
        state,
        reason: reason.into(),
    }
}

/// How long a node without a witness lets its peer stay silent (counted from when the
/// heartbeats declared it dead) before fencing it and taking over.
///
/// A live primary fences the moment its replication link drops, so a peer last seen as
/// primary gets one failure timeout to do so first. When no primary was seen (both nodes
/// starting with the network down, or both waiting), the two would reach the same deadline
/// at the same moment and power each other off: the preferred node goes first, the other
/// waits one more timeout, by which time it has been fenced if its peer is alive.
///
/// `fence_delay` (`hooks.fence_delay`) is added for the node that goes second: a fence agent
/// slower than one timeout (a BMC login, retries) would otherwise let both nodes fence each
/// other, each one's hook started before the other's had acted.
pub fn fence_grace(
    timeout: Duration,
    fence_delay: Duration,
    is_preferred: bool,
    peer_was_primary: bool,
) -> Duration {
    if peer_was_primary {
        timeout.saturating_add(fence_delay)
    } else if is_preferred {
        timeout
    } else {
        timeout.saturating_mul(2).saturating_add(fence_delay)
    }
}

/// This node's round after hearing the peer's. A node that is not primary takes the peer's
/// (at most a million ahead: the value comes from the network), so its next promotion is
/// above it. A primary keeps its own: announcing the peer's round would hide that the peer
/// won a newer one, the two-primaries rule would see a tie, and on a tie the preferred node
/// stays even when it is the deposed one.
pub fn round_after_peer(own: u64, state: GroupState, peer_round: u64) -> u64 {
    if state.is_primary() {
        own
    } else {
        own.max(peer_round.min(own.saturating_add(1_000_000)))
    }
}

/// Whether a fence this node ran still covers the peer: not once the pair replicates again,
/// nor once any replication link came up after the hook started (the peer was back, however
/// briefly; if the link drops again, a write alone needs a new fence). `fenced_at_links` and
/// `links_now` count the links the group's volumes have had since start.
pub fn fence_holds(fenced_at_links: u64, links_now: u64, data: DataState) -> bool {
    data != DataState::UpToDate && links_now == fenced_at_links
}

/// The decision for this node. Pure; see the module doc for the invariants.
pub fn decide(f: &Facts) -> Decision {
    // Saturating: a round comes from the peer (authenticated, but not to be trusted with
    // arithmetic); at u64::MAX rounds stop advancing rather than wrap to 0.
    let next_round = f
        .round
        .max(f.peer.map(|p| p.round).unwrap_or(0))
        .saturating_add(1);
    if f.state.is_primary() {
        return decide_as_primary(f);
    }
    if f.data == DataState::SplitBrain {
        return stay(
            GroupState::Waiting,
            "split brain: resolve it (nbdmirror resolve) before the group can start",
        );
    }
    match f.peer {
        Some(p) if p.state.is_primary() => {
            if p.handing_over && f.data == DataState::UpToDate {
                return Decision::Promote {
                    round: next_round,
                    quorum: Quorum::PeerConsent,
                    reason: "the peer hands the group over".into(),
                };
            }
            stay(GroupState::Secondary, "the peer is primary")
        }
        Some(p) if p.handing_over => {
            if f.data == DataState::UpToDate {
                Decision::Promote {
                    round: next_round,
                    quorum: Quorum::PeerConsent,
                    reason: "the peer handed the group over".into(),
                }
            } else {
                stay(
                    GroupState::Waiting,
                    "the peer hands the group over but this copy is not in sync yet",
                )
            }
        }
        Some(_) if f.handing_over => stay(
            GroupState::Waiting,
            "handed the group over; waiting for the peer to take it",
        ),
        Some(p) => {
            // Both alive, neither primary: the group starts where the newest data is.
            if f.data == DataState::Stale || p.data_newer {
                return stay(
                    GroupState::Waiting,
                    "the peer holds the newest data; it starts the group",
                );
            }
            if f.data == DataState::InSyncWhenLost && !p.data_equal {
                return stay(GroupState::Waiting, "comparing data with the peer");
            }
            let mine = !p.data_equal || f.is_preferred;
            if mine {
                Decision::Promote {
                    round: next_round,
                    quorum: Quorum::PeerConsent,
                    reason: if p.data_equal {
                        "both nodes up with equal data: starting on the preferred node".into()
                    } else {
                        "both nodes up: starting on the node with the newest data".into()
                    },
                }
            } else {
                stay(GroupState::Waiting, "the preferred node starts the group")
            }
        }
        None => {
            let fresh = match f.data {
                DataState::InSyncWhenLost | DataState::UpToDate => true,
                // A node that restarted alone knows its data is newest only if the witness
                // says it held the group last.
                DataState::Stale => matches!(
                    f.witness,
                    Witness::Reachable {
                        holder_is_me: true,
                        ..
                    }
                ),
                DataState::SplitBrain => false,
            };
            if !fresh {
                return stay(
                    GroupState::Waiting,
                    "the peer is unreachable and this copy may be stale: waiting for the peer",
                );
            }
            match (f.witness, f.fence_configured) {
                (Witness::Reachable { .. }, _) => Decision::Promote {
                    round: next_round,
                    quorum: Quorum::WitnessVote,
                    reason: "the peer is gone: asking the witness".into(),
                },
                (_, true) if f.peer_silent_long => Decision::Promote {
                    round: next_round,
                    quorum: Quorum::Fence,
                    reason: "the peer is gone: fencing it".into(),
                },
                (_, true) => stay(
                    GroupState::Waiting,
                    "the peer is gone: giving a live primary the time to fence first",
                ),
                (Witness::Unreachable, false) => stay(
                    GroupState::Waiting,
                    "the peer and the witness are unreachable: no quorum to take over",
                ),
                (Witness::None, false) if f.operator_takeover => Decision::Promote {
                    round: next_round,
                    quorum: Quorum::Operator,
                    reason: "the peer is gone and an operator asked this node to take over".into(),
                },
                (Witness::None, false) => stay(
                    GroupState::Waiting,
                    "the peer is unreachable; without a witness or fence hook this node never takes over by itself (if the peer is down: `nbdmirror takeover GROUP`)",
                ),
            }
        }
    }
}

fn decide_as_primary(f: &Facts) -> Decision {
    if let Some(p) = f.peer {
        if p.state.is_primary() && (p.round > f.round || (p.round == f.round && !f.is_preferred)) {
            // Two primaries: the older round (or, on a tie, the non-preferred node) yields.
            return Decision::Demote {
                reason: "the peer is primary in a newer round".into(),
            };
        }
        if (f.swap_requested || f.vm_failed || (f.auto_failback && !f.is_preferred))
            && p.ready
            && f.data == DataState::UpToDate
        {
            return Decision::Demote {
                reason: if f.swap_requested {
                    "swap: handing the group to the peer".into()
                } else if f.vm_failed {
                    "the VM keeps failing here: handing the group to the peer".into()
                } else {
                    "auto-failback: the preferred node is back in sync".into()
                },
            };
        }
    }
    if let Witness::Reachable {
        holder_is_me: false,
        ..
    } = f.witness
    {
        return Decision::Demote {
            reason: "the witness says another node holds a newer round".into(),
        };
    }
    if f.witness == Witness::None
        && f.fence_configured
        && !f.peer_fenced
        && f.data == DataState::InSyncWhenLost
    {
        // Fence-only quorum and the replication link is down (whatever the heartbeats say;
        // for a primary that is what InSyncWhenLost means): like DRBD's
        // resource-and-stonith, writes wait until the peer is fenced. A linked peer (even in
        // split brain) is not fenced: it would reboot, link again and be fenced again.
        return Decision::FencePeer {
            reason: "the replication link is down: fencing the peer before writing alone".into(),
        };
    }
    // With a witness, writes made alone pass only under a fresh lease (the volumes' gates):
    // say so, rather than "serving", while they wait for it.
    let alone_waits = matches!(
        f.witness,
        Witness::Unreachable
            | Witness::Reachable {
                lease_fresh: false,
                ..
            }
    );
    match (f.peer, f.witness) {
        (Some(_), _) => Decision::Serve {
            state: if f.data == DataState::UpToDate {
                GroupState::Primary
            } else {
                GroupState::Alone
            },
            reason: if f.data == DataState::UpToDate {
                "serving; the peer is alive and in sync".into()
            } else if alone_waits {
                "the replication link to the peer is down and the witness has not renewed this node's lease: writes wait until it does (or the link returns)".into()
            } else {
                "serving; the replication link to the peer is down: changes are tracked".into()
            },
        },
        (None, Witness::None) if f.fence_configured && !f.peer_fenced => Decision::FencePeer {
            reason: "the peer is away: fencing it before writing alone".into(),
        },
        (None, Witness::None) if f.fence_configured => Decision::Serve {
            state: GroupState::Alone,
            reason: "the peer is away and fenced: serving alone".into(),
        },
        (None, Witness::None) => Decision::Serve {
            state: GroupState::Alone,
            reason: "the peer is away; without a witness nobody can take over, so this node keeps serving".into(),
        },
        (
            None,
            Witness::Reachable {
                lease_fresh: true, ..
            },
        ) => Decision::Serve {
            state: GroupState::Alone,
            reason: "the peer is away; the witness confirms this node may continue alone".into(),
        },
        (None, Witness::Reachable { .. }) => Decision::Suspend {
            reason: "the peer is away and the witness answers but has not renewed this node's lease: I/O waits until it does (see the witness's log for why)".into(),
        },
        (None, _) => Decision::Suspend {
            reason: "lost both the peer and the witness: I/O waits until quorum returns".into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Linked by heartbeats but not by the replication link, without a fresh lease: the
    /// primary keeps the group, and its reason says that writes wait for the witness.
    #[test]
    fn a_primary_whose_writes_wait_for_the_witness_says_so() {
        let f = Facts {
            state: GroupState::Alone,
            data: DataState::InSyncWhenLost,
            peer: Some(peer(GroupState::Secondary)),
            witness: Witness::Reachable {
                holder_is_me: true,
                lease_fresh: false,
            },
            ..base()
        };
        match decide(&f) {
            Decision::Serve { reason, .. } => assert!(reason.contains("writes wait"), "{reason}"),
            other => panic!("{other:?}"),
        }
        // The peer away too: suspended, and not for "losing" a witness that answers.
        match decide(&Facts { peer: None, ..f }) {
            Decision::Suspend { reason } => {
                assert!(reason.contains("witness answers"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        let fresh = Facts {
            witness: Witness::Reachable {
                holder_is_me: true,
                lease_fresh: true,
            },
            ..f
        };
        match decide(&fresh) {
            Decision::Serve { reason, .. } => {
                assert!(reason.contains("changes are tracked"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    fn base() -> Facts {
        Facts {
            state: GroupState::Secondary,
            round: 3,
            is_preferred: false,
            auto_failback: false,
            data: DataState::UpToDate,
            peer: None,
            witness: Witness::None,
            fence_configured: false,
            peer_silent_long: false,
            peer_fenced: false,
            vm_failed: false,
            swap_requested: false,
            handing_over: false,
            operator_takeover: false,
        }
    }

    fn peer(state: GroupState) -> PeerFacts {
        PeerFacts {
            state,
            round: 3,
            data_newer: false,
            data_equal: true,
            handing_over: false,
            ready: true,
        }
    }

    #[test]
    fn no_quorum_no_takeover() {
        let f = Facts {
            data: DataState::InSyncWhenLost,
            ..base()
        };
        assert!(matches!(
            decide(&f),
            Decision::Stay {
                state: GroupState::Waiting,
                ..
            }
        ));
    }

    #[test]
    fn witness_or_fence_allows_takeover_of_fresh_data_only() {
        let f = Facts {
            data: DataState::InSyncWhenLost,
            witness: Witness::Reachable {
                holder_is_me: false,
                lease_fresh: false,
            },
            ..base()
        };
        assert!(matches!(
            decide(&f),
            Decision::Promote {
                quorum: Quorum::WitnessVote,
                round: 4,
                ..
            }
        ));
        let stale = Facts {
            data: DataState::Stale,
            ..f
        };
        assert!(matches!(decide(&stale), Decision::Stay { .. }));
        let fence = Facts {
            data: DataState::InSyncWhenLost,
            fence_configured: true,
            ..base()
        };
        // The secondary leaves a live primary the time to fence first.
        assert!(matches!(decide(&fence), Decision::Stay { .. }));
        let fence = Facts {
            peer_silent_long: true,
            ..fence
        };
        assert!(matches!(
            decide(&fence),
            Decision::Promote {
                quorum: Quorum::Fence,
                ..
            }
        ));
    }

    #[test]
    fn a_deposed_primary_keeps_its_round_and_yields_to_the_newer_one() {
        assert_eq!(round_after_peer(4, GroupState::Secondary, 5), 5);
        assert_eq!(
            round_after_peer(4, GroupState::Waiting, u64::MAX),
            1_000_004
        );
        assert_eq!(round_after_peer(4, GroupState::Suspended, 5), 4);
        assert_eq!(round_after_peer(4, GroupState::Alone, 5), 4);
        // The preferred node, primary in round 4, hears the peer primary in round 5: with its
        // own round kept, it yields.
        let f = Facts {
            state: GroupState::Suspended,
            round: round_after_peer(4, GroupState::Suspended, 5),
            is_preferred: true,
            data: DataState::InSyncWhenLost,
            peer: Some(PeerFacts {
                state: GroupState::Alone,
                round: 5,
                data_newer: true,
                data_equal: false,
                handing_over: false,
                ready: false,
            }),
            witness: Witness::Unreachable,
            ..base()
        };
        assert!(matches!(decide(&f), Decision::Demote { .. }));
        let tied = Facts { round: 5, ..f };
        assert!(
            !matches!(decide(&tied), Decision::Demote { .. }),
            "the tie the old rule made"
        );
    }

    #[test]
    fn a_fence_is_void_once_a_link_came_up_after_it() {
        assert!(fence_holds(4, 4, DataState::InSyncWhenLost));
        // The fenced peer came back and the link dropped again before any tick saw it in
        // sync: the old fence no longer covers it.
        assert!(!fence_holds(4, 5, DataState::InSyncWhenLost));
        assert!(!fence_holds(4, 4, DataState::UpToDate));
    }

    #[test]
    fn only_one_node_reaches_its_fence_deadline_first() {
        let t = Duration::from_secs(3);
        // A peer last seen primary fences at once: one timeout of grace, whoever we are.
        let z = Duration::ZERO;
        assert_eq!(fence_grace(t, z, false, true), t);
        assert_eq!(fence_grace(t, z, true, true), t);
        // No primary seen: the preferred node fences a whole timeout before the other.
        assert_eq!(fence_grace(t, z, true, false), t);
        assert_eq!(fence_grace(t, z, false, false), 2 * t);
        assert_eq!(fence_grace(Duration::MAX, z, false, false), Duration::MAX);
        // The delay is for whoever fences second: never the preferred node with no
        // primary seen (it goes first).
        let d = Duration::from_secs(10);
        assert_eq!(fence_grace(t, d, false, true), t + d);
        assert_eq!(fence_grace(t, d, true, true), t + d);
        assert_eq!(fence_grace(t, d, true, false), t);
        assert_eq!(fence_grace(t, d, false, false), 2 * t + d);
        assert_eq!(fence_grace(Duration::MAX, d, false, true), Duration::MAX);
    }

    #[test]
    fn primary_alone_without_witness_keeps_serving_and_suspends_without_quorum() {
        let f = Facts {
            state: GroupState::Primary,
            ..base()
        };
        assert!(matches!(
            decide(&f),
            Decision::Serve {
                state: GroupState::Alone,
                ..
            }
        ));
        let w = Facts {
            witness: Witness::Unreachable,
            ..f
        };
        assert!(matches!(decide(&w), Decision::Suspend { .. }));
        let fresh = Facts {
            witness: Witness::Reachable {
                holder_is_me: true,
                lease_fresh: true,
            },
            ..f
        };
        assert!(matches!(decide(&fresh), Decision::Serve { .. }));
        let deposed = Facts {
            witness: Witness::Reachable {
                holder_is_me: false,
                lease_fresh: false,
            },
            ..f
        };
        assert!(matches!(decide(&deposed), Decision::Demote { .. }));
    }

    #[test]
    fn a_primary_with_a_fence_hook_fences_before_writing_alone() {
        let f = Facts {
            state: GroupState::Primary,
            fence_configured: true,
            ..base()
        };
        assert!(matches!(decide(&f), Decision::FencePeer { .. }));
        let fenced = Facts {
            peer_fenced: true,
            ..f
        };
        assert!(matches!(
            decide(&fenced),
            Decision::Serve {
                state: GroupState::Alone,
                ..
            }
        ));
        // The link down, the heartbeats alive: fence first.
        let link_down = Facts {
            data: DataState::InSyncWhenLost,
            peer: Some(PeerFacts {
                state: GroupState::Secondary,
                round: 3,
                data_newer: false,
                data_equal: false,
                handing_over: false,
                ready: false,
            }),
            ..f
        };
        assert!(matches!(decide(&link_down), Decision::FencePeer { .. }));
        // Linked but not in sync (split brain, or stale): fencing would not end it, and a
        // rebooted peer links again, voiding the fence: never fence a linked peer.
        for data in [DataState::SplitBrain, DataState::Stale] {
            let linked = Facts { data, ..link_down };
            assert!(
                !matches!(decide(&linked), Decision::FencePeer { .. }),
                "{data:?}"
            );
        }
    }

    #[test]
    fn both_up_start_on_preferred_or_newest() {
        let mut f = Facts {
            state: GroupState::Waiting,
            is_preferred: true,
            peer: Some(peer(GroupState::Waiting)),
            ..base()
        };
        assert!(matches!(
            decide(&f),
            Decision::Promote {
                quorum: Quorum::PeerConsent,
                ..
            }
        ));
        f.is_preferred = false;
        assert!(matches!(decide(&f), Decision::Stay { .. }));
        let mut p = peer(GroupState::Waiting);
        p.data_newer = true;
        p.data_equal = false;
        f.is_preferred = true;
        f.peer = Some(p);
        assert!(matches!(decide(&f), Decision::Stay { .. }));
    }

    #[test]
    fn swap_hands_over_and_the_peer_takes_it() {
        let f = Facts {
            state: GroupState::Primary,
            swap_requested: true,
            peer: Some(peer(GroupState::Secondary)),
            ..base()
        };
        assert!(matches!(decide(&f), Decision::Demote { .. }));
        // After demoting, the old primary waits; the peer sees the handover and promotes.
        let old = Facts {
            state: GroupState::Waiting,
            handing_over: true,
            operator_takeover: false,
            is_preferred: true,
            peer: Some(peer(GroupState::Secondary)),
            ..base()
        };
        assert!(matches!(decide(&old), Decision::Stay { .. }));
        let mut p = peer(GroupState::Waiting);
        p.handing_over = true;
        let g = Facts {
            peer: Some(p),
            ..base()
        };
        assert!(matches!(
            decide(&g),
            Decision::Promote {
                quorum: Quorum::PeerConsent,
                ..
            }
        ));
    }

    fn arb_state() -> impl Strategy<Value = GroupState> {
        prop_oneof![
            Just(GroupState::Stopped),
            Just(GroupState::Waiting),
            Just(GroupState::Alone),
            Just(GroupState::Primary),
            Just(GroupState::Secondary),
            Just(GroupState::Suspended),
        ]
    }

    fn arb_data() -> impl Strategy<Value = DataState> {
        prop_oneof![
            Just(DataState::UpToDate),
            Just(DataState::InSyncWhenLost),
            Just(DataState::Stale),
            Just(DataState::SplitBrain),
        ]
    }

    fn arb_witness() -> impl Strategy<Value = Witness> {
        prop_oneof![
            Just(Witness::None),
            Just(Witness::Unreachable),
            (any::<bool>(), any::<bool>()).prop_map(|(h, l)| Witness::Reachable {
                holder_is_me: h,
                lease_fresh: l
            }),
        ]
    }

    prop_compose! {
        fn arb_facts()(state in arb_state(), round in 0u64..5, pref in any::<bool>(), afb in any::<bool>(),
                       data in arb_data(), witness in arb_witness(), fence in any::<bool>(),
                       vm_failed in any::<bool>(), swap in any::<bool>(), handing in any::<bool>(),
                       long in any::<bool>(), fenced in any::<bool>(), takeover in any::<bool>(),
                       peer in proptest::option::of((arb_state(), 0u64..5, any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>())))
                       -> Facts {
            Facts { state, round, is_preferred: pref, auto_failback: afb, data, witness,
                    fence_configured: fence, peer_silent_long: long, peer_fenced: fenced,
                    vm_failed, swap_requested: swap, handing_over: handing, operator_takeover: takeover,
                    peer: peer.map(|(state, round, newer, equal, handing_over, ready)| PeerFacts {
                        state, round, data_newer: newer && !equal, data_equal: equal && !newer, handing_over, ready }) }
        }
    }

    proptest! {
        #[test]
        fn never_promote_over_a_live_primary_unless_it_hands_over(f in arb_facts()) {
            if let (Decision::Promote { .. }, Some(p)) = (decide(&f), f.peer) {
                prop_assert!(!p.state.is_primary() || p.handing_over);
            }
        }

        #[test]
        fn never_promote_bad_data_or_without_quorum(f in arb_facts()) {
            if let Decision::Promote { quorum, .. } = decide(&f) {
                prop_assert!(f.data != DataState::SplitBrain);
                match quorum {
                    Quorum::PeerConsent => prop_assert!(f.peer.is_some()),
                    Quorum::WitnessVote => { let ok = matches!(f.witness, Witness::Reachable { .. }); prop_assert!(ok) }
                    Quorum::Fence => prop_assert!(f.fence_configured),
                    Quorum::Operator => {
                        let ok = f.operator_takeover && f.peer.is_none()
                            && matches!(f.witness, Witness::None) && !f.fence_configured;
                        prop_assert!(ok)
                    }
                }
                if f.data == DataState::Stale {
                    let ok = f.peer.is_none() && matches!(f.witness, Witness::Reachable { holder_is_me: true, .. }); prop_assert!(ok);
                }
            }
        }

        /// With both alive and neither primary, the two mirrored decisions never both promote.
        #[test]
        fn both_alive_at_most_one_starts(a_pref in any::<bool>(), a_newer in any::<bool>(), equal in any::<bool>(),
                                          ad in arb_data(), bd in arb_data()) {
            let (a_newer, b_newer) = if equal { (false, false) } else { (a_newer, !a_newer) };
            let a = Facts { state: GroupState::Waiting, is_preferred: a_pref, data: ad,
                peer: Some(PeerFacts { state: GroupState::Waiting, round: 3, data_newer: b_newer, data_equal: equal, handing_over: false, ready: true }), ..base() };
            let b = Facts { state: GroupState::Waiting, is_preferred: !a_pref, data: bd,
                peer: Some(PeerFacts { state: GroupState::Waiting, round: 3, data_newer: a_newer, data_equal: equal, handing_over: false, ready: true }), ..base() };
            let pa = matches!(decide(&a), Decision::Promote { .. });
            let pb = matches!(decide(&b), Decision::Promote { .. });
            prop_assert!(!(pa && pb));
        }
    }
}
