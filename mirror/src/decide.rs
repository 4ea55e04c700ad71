//! Pure decisions of the mirror: which way a resync goes when two nodes meet, and whether a
//! promotion is allowed. No I/O, so every case is unit- and property-tested.
//!
//! Generations (see [`crate::metadata::Generations`]): a node starts a new random generation
//! when it starts writing without its peer (a promotion while alone, or the first write after
//! losing the peer). The resync target adopts the source's generations when the resync ends.
//! So when the two meet:
//! - equal current generations: nobody wrote alone; at most the dirty maps differ (a crashed
//!   primary's hot extents, writes the peer failed), and the primary is the source;
//! - one side's current generation is in the other's history: the other is newer, and the
//!   source;
//! - neither: both wrote alone: split brain, never resolved silently. An operator's `resolve`
//!   marks the losing side inconsistent, which makes it the target.

use crate::metadata::Generations;
use crate::repl::frame::Role;

/// One side's view, as exchanged in `State` frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Side {
    pub role: Role,
    pub generations: Generations,
    pub consistent: bool,
    pub has_data: bool,
    /// Whether the dirty map has any bit set.
    pub dirty: bool,
    /// Its current generation holds only unacknowledged writes made alone.
    pub unconfirmed: bool,
    /// Writes it had not flushed were lost in a power loss (`Flags::LOST_CACHE`).
    pub lost_cache: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    Local,
    Peer,
}

/// What the pair does now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Identical copies; writes are mirrored.
    InSync,
    /// Copy from `source` to the other: the union of both dirty maps, or everything.
    Resync { source: Who, full: bool },
    /// Both wrote alone (or two primaries): report, copy nothing, mirror nothing.
    SplitBrain { why: &'static str },
    /// Nothing to do until an operator acts (e.g. promotes one side).
    Wait { why: &'static str },
}

impl Plan {
    /// The plan in an operator's words, as seen from this node (for messages).
    pub fn describe(&self) -> String {
        match self {
            Plan::InSync => "the copies are in sync".into(),
            Plan::Resync {
                source: Who::Local, ..
            } => "a resync to the peer is under way".into(),
            Plan::Resync {
                source: Who::Peer, ..
            } => "a resync from the peer is under way".into(),
            Plan::SplitBrain { why } => format!("split brain: {why}"),
            Plan::Wait { why } => format!("waiting: {why}"),
        }
    }
}

fn knows(g: &Generations, id: u64) -> bool {
    id != 0 && (g.sync == id || g.history.contains(&id))
}

fn source_is(s: Who) -> Plan {
    Plan::Resync {
        source: s,
        full: false,
    }
}

/// An isolated primary whose writes alone were never acknowledged (its generation was never
/// confirmed by the witness) still holds the primary role when the partition heals, for the
/// moment its failover layer takes to see it was deposed: nothing is lost on it, so this is
/// no split brain to resolve (it was reported as one, at ERROR, on every such heal). The pair
/// waits; once it steps down, it is resynced from the other node.
fn stepping_down(isolated: &Side, other: &Side) -> bool {
    isolated.role == Role::Primary
        && isolated.unconfirmed
        && isolated.consistent
        && !other.unconfirmed
        && other.consistent
}

const STEP_DOWN: Plan = Plan::Wait {
    why: "a primary whose writes alone were never acknowledged meets the node that took over: \
          waiting for it to step down, then it is resynced",
};

/// A node whose image holds data but which has no mirror history (its metadata is new),
/// meeting one that was in sync with a peer before: its metadata was lost or recreated (or
/// its image restored from elsewhere), and its image may hold acknowledged writes the other
/// lacks. Copying over it silently would lose them, so the operator decides. A new pair's
/// nodes never look like this: the first promoted one has never been in sync (its `sync`
/// generation is 0) when its peer joins, whatever that peer's image holds.
fn stray_data(no_history: &Side, mirrored: &Side) -> bool {
    no_history.generations.current == 0
        && no_history.has_data
        && no_history.consistent
        && mirrored.generations.sync != 0
}

const STRAY_DATA: Plan = Plan::SplitBrain {
    why: "one node's image holds data but it has no mirror history (its metadata was lost or \
          recreated?) while the other was in sync with a peer before: either may hold writes \
          the other lacks. `nbdmirror resolve --discard-on NODE` picks the copy to overwrite",
};

/// The plan for two nodes that just exchanged their states. Symmetric: the peer computes the
/// mirror image, so both agree without another round trip.
pub fn decide(local: &Side, peer: &Side) -> Plan {
    let plan = decide_unguarded(local, peer);
    if let Plan::Resync { source, .. } = plan {
        let (src, dst) = match source {
            Who::Local => (local, peer),
            Who::Peer => (peer, local),
        };
        // The two rules no path may break, whatever the generations say.
        if dst.role == Role::Primary {
            return Plan::SplitBrain {
                why: "the primary's copy would be overwritten",
            };
        }
        if !src.consistent {
            return Plan::Wait {
                why: "the only possible source is inconsistent",
            };
        }
    }
    plan
}

fn decide_unguarded(local: &Side, peer: &Side) -> Plan {
    use Role::*;
    if local.role == Primary && peer.role == Primary {
        if stepping_down(local, peer) || stepping_down(peer, local) {
            return STEP_DOWN;
        }
        return Plan::SplitBrain {
            why: "both nodes are primary",
        };
    }
    let (lg, pg) = (local.generations.current, peer.generations.current);
    if lg == 0 && pg == 0 {
        return Plan::Wait {
            why: "no data generation yet: promote one node to start the mirror",
        };
    }
    if lg == 0 || pg == 0 {
        // A node that never joined the mirror: it receives everything, unless the only
        // node with a generation is an unfinished resync target itself.
        let (src, src_side) = if lg != 0 {
            (Who::Local, local)
        } else {
            (Who::Peer, peer)
        };
        if !src_side.consistent {
            return Plan::Wait {
                why: "the only node with data is an unfinished resync target",
            };
        }
        let dst_side = if lg != 0 { peer } else { local };
        if dst_side.role == Primary {
            return Plan::SplitBrain {
                why: "a primary that never joined the mirror meets one that holds data",
            };
        }
        if stray_data(dst_side, src_side) {
            return STRAY_DATA;
        }
        return Plan::Resync {
            source: src,
            full: true,
        };
    }
    if lg == pg {
        return match (local.consistent, peer.consistent) {
            (false, false) => Plan::Wait {
                why: "both copies are inconsistent: promote one with --force",
            },
            (true, false) => source_is(Who::Local),
            (false, true) => source_is(Who::Peer),
            (true, true) if !local.dirty && !peer.dirty => Plan::InSync,
            (true, true) => match (local.role, peer.role) {
                (Primary, _) => source_is(Who::Local),
                (_, Primary) => source_is(Who::Peer),
                // A copy that lost its unflushed writes in a power loss lacks what its peer
                // acknowledged to it: the peer's copy of its hot extents is the right one.
                _ if local.lost_cache && !peer.lost_cache => source_is(Who::Peer),
                _ if peer.lost_cache && !local.lost_cache => source_is(Who::Local),
                _ => Plan::Wait {
                    why: "the copies may differ in the dirty regions: promote one node to resync",
                },
            },
        };
    }
    let local_newer = knows(&local.generations, pg);
    let peer_newer = knows(&peer.generations, lg);
    let (newer, newer_side, older_side) = match (local_newer, peer_newer) {
        (true, false) => (Who::Local, local, peer),
        (false, true) => (Who::Peer, peer, local),
        _ => {
            // Diverged. An operator's resolve (or an interrupted resync) marked exactly one
            // side inconsistent: that side is the target. So is a side whose writes alone
            // were never acknowledged (an isolated primary held them): discarding them loses
            // nothing a client was told is written.
            let expendable = |s: &Side| !s.consistent || s.unconfirmed;
            return match (expendable(local), expendable(peer)) {
                (false, true) if peer.role == Secondary => source_is(Who::Local),
                (true, false) if local.role == Secondary => source_is(Who::Peer),
                _ if stepping_down(local, peer) || stepping_down(peer, local) => STEP_DOWN,
                _ => Plan::SplitBrain {
                    why: "both nodes wrote without the other",
                },
            };
        }
    };
    if older_side.role == Primary {
        // Never overwrite a primary's data under its running VM.
        return Plan::SplitBrain {
            why: "the primary holds older data than its peer",
        };
    }
    if !newer_side.consistent {
        return Plan::Wait {
            why: "the newer copy is an unfinished resync target",
        };
    }
    source_is(newer)
}

/// Why a promotion is refused without `--force`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PromoteRefusal {
    #[error("this node's copy is inconsistent (an unfinished resync target); use --force only if the peer's copy is lost")]
    Inconsistent,
    #[error("the peer holds newer data (this copy is stale); promote the peer instead, or use --force to discard its newer writes")]
    Stale,
    #[error("the peer is primary and connected; demote it first (two primaries would be a split brain, which --force does not override)")]
    PeerPrimary,
    #[error("the pair is in split brain; resolve it first (nbdmirror resolve), or use --force")]
    SplitBrain,
    #[error("this node's image is empty but the peer's holds data; promoting here would overwrite it (use --force if that is intended)")]
    WouldOverwriteData,
    #[error("a resync from the peer is running; wait for it to finish")]
    ResyncTarget,
    #[error("this node lost writes it had not flushed (a power loss or kernel crash) that its peer holds; the resync from the peer restores them and starts by itself: promote after it, or promote the peer")]
    LostCache,
    #[error("this node's image is empty and has never been mirrored, and the peer is not connected: if the peer holds the data, start it first (promoting here would serve an empty disk); use --force to start a new pair on an empty disk")]
    BlankAlone,
}

/// What a promotion does to this node's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromoteEffect {
    /// Start a new generation (promotion while alone, or the first promotion of a pair).
    pub new_generation: bool,
    /// Mark the whole volume dirty: the peer's copy is unknown (first promotion alone) or
    /// must be overwritten (first promotion with an existing image).
    pub all_dirty: bool,
    /// Tell the connected peer to adopt the new generation without a copy (two new images).
    pub peer_adopts: bool,
    /// The operator must be sure the peer is down (promotion while alone).
    pub warn_alone: bool,
}

/// Whether this node may become primary, given its state and the peer's (if connected).
pub fn check_promote(
    local: &Side,
    peer: Option<&Side>,
    force: bool,
) -> Result<PromoteEffect, PromoteRefusal> {
    let refuse = |r: PromoteRefusal| if force { Ok(()) } else { Err(r) };
    let first = local.generations.current == 0;
    let Some(peer) = peer else {
        if !local.consistent {
            refuse(PromoteRefusal::Inconsistent)?;
        }
        if first && !local.has_data {
            refuse(PromoteRefusal::BlankAlone)?;
        }
        return Ok(PromoteEffect {
            new_generation: true,
            all_dirty: first,
            peer_adopts: false,
            warn_alone: true,
        });
    };
    // A connected primary peer is alive and serving: a second primary is a split brain made
    // on purpose, which `--force` (meant for stale or inconsistent data) does not make.
    if peer.role == Role::Primary {
        return Err(PromoteRefusal::PeerPrimary);
    }
    let mut diverges = false;
    if first && peer.generations.current == 0 {
        if !local.has_data && peer.has_data {
            refuse(PromoteRefusal::WouldOverwriteData)?;
        }
        let copy = local.has_data || peer.has_data;
        return Ok(PromoteEffect {
            new_generation: true,
            all_dirty: copy,
            peer_adopts: !copy,
            warn_alone: false,
        });
    }
    // The plan as things stand (this node still secondary).
    let plan = decide(local, peer);
    match plan {
        Plan::InSync
        | Plan::Resync {
            source: Who::Local, ..
        } => {}
        Plan::Resync {
            source: Who::Peer, ..
        } => {
            diverges = true;
            if !local.consistent {
                refuse(PromoteRefusal::ResyncTarget)?;
            } else if local.lost_cache && local.generations.current == peer.generations.current {
                refuse(PromoteRefusal::LostCache)?;
            } else {
                refuse(PromoteRefusal::Stale)?;
            }
        }
        // Nobody is primary and the copies may differ: promoting picks this one as the source.
        Plan::Wait { .. } if local.consistent => {}
        Plan::Wait { .. } => {
            diverges = true;
            refuse(PromoteRefusal::Inconsistent)?;
        }
        Plan::SplitBrain { .. } => {
            diverges = true;
            refuse(PromoteRefusal::SplitBrain)?;
        }
    }
    Ok(PromoteEffect {
        // Forcing over the peer's objection makes this node's history diverge on purpose:
        // the peer will see a split brain instead of being overwritten silently.
        new_generation: diverges || first,
        // A copy without history (the peer has one: both new is handled above) has no dirty
        // map relative to the peer: a resync from it must copy everything.
        all_dirty: first,
        peer_adopts: false,
        warn_alone: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn plans_are_described_in_words() {
        assert_eq!(Plan::InSync.describe(), "the copies are in sync");
        let r = Plan::Resync {
            source: Who::Peer,
            full: false,
        };
        assert!(r.describe().contains("from the peer"), "{}", r.describe());
        for p in [
            Plan::InSync,
            r,
            Plan::Wait { why: "x" },
            Plan::SplitBrain { why: "x" },
        ] {
            let d = p.describe();
            assert!(!d.contains('{') && !d.contains("Some("), "{d}");
        }
    }

    fn g(current: u64, history: &[u64]) -> Generations {
        let mut out = Generations {
            current,
            ..Default::default()
        };
        for (i, h) in history.iter().enumerate() {
            out.history[i] = *h;
        }
        out
    }

    fn side(role: Role, gens: Generations) -> Side {
        Side {
            role,
            generations: gens,
            consistent: true,
            has_data: true,
            dirty: false,
            unconfirmed: false,
            lost_cache: false,
        }
    }

    use Role::*;

    #[test]
    fn equal_generations_without_dirty_bits_are_in_sync() {
        let a = side(Primary, g(7, &[]));
        let b = side(Secondary, g(7, &[]));
        assert_eq!(decide(&a, &b), Plan::InSync);
    }

    #[test]
    fn crashed_primary_hot_extents_resync_from_the_new_primary() {
        let mut a = side(Secondary, g(7, &[]));
        a.dirty = true;
        let b = side(Secondary, g(7, &[]));
        assert!(matches!(decide(&a, &b), Plan::Wait { .. }));
        let b = side(Primary, g(7, &[]));
        assert_eq!(decide(&a, &b), source_is(Who::Peer));
    }

    /// A primary lost power with writes it had not flushed (both nodes had acknowledged
    /// them): back, at the generation it shares with its peer, it is the target, not the
    /// source, of the dirty regions, whichever node the operator or the group prefers.
    #[test]
    fn a_copy_that_lost_its_cache_is_resynced_from_its_peer() {
        let mut crashed = side(Secondary, g(7, &[]));
        crashed.dirty = true;
        crashed.lost_cache = true;
        let peer = side(Secondary, g(7, &[]));
        assert_eq!(decide(&crashed, &peer), source_is(Who::Peer));
        assert_eq!(decide(&peer, &crashed), source_is(Who::Local));
        assert_eq!(
            check_promote(&crashed, Some(&peer), false),
            Err(PromoteRefusal::LostCache)
        );
        assert!(check_promote(&peer, Some(&crashed), false).is_ok());
        // Both lost theirs (a site-wide outage): the operator picks, as before.
        let mut both = peer;
        both.lost_cache = true;
        assert!(matches!(decide(&crashed, &both), Plan::Wait { .. }));
        // Alone, it is the best copy there is: promotion allowed.
        assert!(check_promote(&crashed, None, false).is_ok());
    }

    #[test]
    fn newer_side_is_the_source() {
        let a = side(Primary, g(9, &[7]));
        let b = side(Secondary, g(7, &[]));
        assert_eq!(decide(&a, &b), source_is(Who::Local));
        assert_eq!(decide(&b, &a), source_is(Who::Peer));
    }

    /// A healed partition: the isolated primary, whose writes alone the witness never
    /// confirmed, still holds its role for a moment. The pair waits for it to step down (no
    /// split brain reported), then resyncs it from the node that took over.
    #[test]
    fn an_isolated_unconfirmed_primary_is_waited_for_not_a_split_brain() {
        let mut isolated = side(Primary, g(9, &[7]));
        isolated.unconfirmed = true;
        let took_over = side(Primary, g(8, &[7]));
        for (a, b) in [(&isolated, &took_over), (&took_over, &isolated)] {
            assert_eq!(decide(a, b), STEP_DOWN);
        }
        // Once it stepped down: resynced from the other node.
        let mut stepped = isolated;
        stepped.role = Secondary;
        assert_eq!(decide(&stepped, &took_over), source_is(Who::Peer));
        // Two primaries whose writes alone both count (or neither) stay a split brain.
        let mut both = took_over;
        both.generations = g(9, &[7]);
        assert!(matches!(decide(&both, &took_over), Plan::SplitBrain { .. }));
        let mut other_unconfirmed = took_over;
        other_unconfirmed.unconfirmed = true;
        assert!(matches!(
            decide(&isolated, &other_unconfirmed),
            Plan::SplitBrain { .. }
        ));
    }

    #[test]
    fn both_wrote_alone_is_split_brain_and_resolve_picks_the_target() {
        let a = side(Primary, g(9, &[7]));
        let mut b = side(Secondary, g(8, &[7]));
        assert!(matches!(decide(&a, &b), Plan::SplitBrain { .. }));
        b.consistent = false;
        assert_eq!(decide(&a, &b), source_is(Who::Local));
        // A side that never had a write alone acknowledged gives way by itself.
        let mut c = side(Secondary, g(8, &[7]));
        c.unconfirmed = true;
        assert_eq!(decide(&a, &c), source_is(Who::Local));
        assert_eq!(decide(&c, &a), source_is(Who::Peer));
    }

    #[test]
    fn a_primary_is_never_a_target() {
        let a = side(Primary, g(7, &[]));
        let b = side(Secondary, g(9, &[7]));
        assert!(matches!(decide(&a, &b), Plan::SplitBrain { .. }));
    }

    #[test]
    fn new_node_gets_a_full_copy() {
        let a = side(Primary, g(9, &[]));
        let b = side(Secondary, g(0, &[]));
        assert_eq!(
            decide(&a, &b),
            Plan::Resync {
                source: Who::Local,
                full: true
            }
        );
    }

    /// A node whose metadata was lost (new, generation 0) but whose image holds data meets
    /// its peer, which was in sync before: neither is overwritten until the operator picks.
    #[test]
    fn an_image_with_data_but_no_history_is_not_overwritten_silently() {
        let mut mirrored = side(Secondary, g(9, &[7]));
        mirrored.generations.sync = 7;
        let lost_metadata = side(Secondary, g(0, &[]));
        for (a, b) in [(&mirrored, &lost_metadata), (&lost_metadata, &mirrored)] {
            assert_eq!(decide(a, b), STRAY_DATA);
        }
        let mut primary = mirrored;
        primary.role = Primary;
        assert_eq!(decide(&primary, &lost_metadata), STRAY_DATA);
        // Its image empty (a replaced disk): a full copy, as for any new node.
        let blank = Side {
            has_data: false,
            ..lost_metadata
        };
        let full_from_peer = Plan::Resync {
            source: Who::Peer,
            full: true,
        };
        assert_eq!(decide(&blank, &mirrored), full_from_peer);
        // A new pair: the first promoted node was never in sync, so its peer's image is
        // copied over as the operator chose at that promotion.
        let first = side(Primary, g(9, &[]));
        assert_eq!(decide(&lost_metadata, &first), full_from_peer);
        // `resolve --discard-on` the copy without history: it is the target.
        let discarded = Side {
            consistent: false,
            ..lost_metadata
        };
        assert_eq!(decide(&discarded, &mirrored), full_from_peer);
        // Keeping it instead: promoted by force, it starts a generation and copies
        // everything once the other is discarded.
        assert_eq!(
            check_promote(&lost_metadata, Some(&mirrored), false),
            Err(PromoteRefusal::SplitBrain)
        );
        let forced = check_promote(&lost_metadata, Some(&mirrored), true).expect("forced");
        assert!(forced.new_generation && forced.all_dirty, "{forced:?}");
    }

    #[test]
    fn promotion_rules() {
        let fresh = |has_data| Side {
            has_data,
            ..side(Secondary, g(0, &[]))
        };
        // Two new images: no copy.
        let e = check_promote(&fresh(false), Some(&fresh(false)), false).unwrap();
        assert!(e.new_generation && e.peer_adopts && !e.all_dirty);
        // An empty image must not overwrite one with data.
        assert_eq!(
            check_promote(&fresh(false), Some(&fresh(true)), false),
            Err(PromoteRefusal::WouldOverwriteData)
        );
        assert!(
            check_promote(&fresh(false), Some(&fresh(true)), true)
                .unwrap()
                .all_dirty
        );
        // Stale data is refused.
        let old = side(Secondary, g(7, &[]));
        let new = side(Secondary, g(9, &[7]));
        assert_eq!(
            check_promote(&old, Some(&new), false),
            Err(PromoteRefusal::Stale)
        );
        assert!(check_promote(&new, Some(&old), false).is_ok());
        // Alone: allowed with a warning and a new generation, unless inconsistent.
        let e = check_promote(&old, None, false).unwrap();
        assert!(e.warn_alone && e.new_generation);
        // A new image with data (a VM image imported for a new pair) too; an empty one
        // never mirrored only by force (the peer may hold the data).
        let e = check_promote(&fresh(true), None, false).unwrap();
        assert!(e.warn_alone && e.new_generation && e.all_dirty);
        assert_eq!(
            check_promote(&fresh(false), None, false),
            Err(PromoteRefusal::BlankAlone)
        );
        assert!(check_promote(&fresh(false), None, true).is_ok());
        let broken = Side {
            consistent: false,
            ..old
        };
        assert_eq!(
            check_promote(&broken, None, false),
            Err(PromoteRefusal::Inconsistent)
        );
        assert_eq!(
            check_promote(&broken, Some(&new), false),
            Err(PromoteRefusal::ResyncTarget)
        );
        // Peer primary.
        let p = side(Primary, g(7, &[]));
        assert_eq!(
            check_promote(&old, Some(&p), false),
            Err(PromoteRefusal::PeerPrimary)
        );
        // Not even by force: the peer is alive and serving.
        let same = side(Secondary, g(7, &[]));
        assert_eq!(
            check_promote(&same, Some(&p), true),
            Err(PromoteRefusal::PeerPrimary)
        );
    }

    fn arb_side() -> impl Strategy<Value = Side> {
        (
            any::<bool>(),
            0u64..4,
            proptest::collection::vec(0u64..4, 0..3),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            0u64..3,
        )
            .prop_map(
                |(p, cur, hist, consistent, has_data, dirty, unconfirmed, lost_cache, sync)| {
                    let mut generations = g(cur, &hist);
                    generations.sync = sync;
                    Side {
                        role: if p { Primary } else { Secondary },
                        generations,
                        consistent,
                        has_data,
                        dirty,
                        unconfirmed,
                        lost_cache,
                    }
                },
            )
    }

    fn mirror(p: Plan) -> Plan {
        match p {
            Plan::Resync { source, full } => Plan::Resync {
                source: match source {
                    Who::Local => Who::Peer,
                    Who::Peer => Who::Local,
                },
                full,
            },
            other => other,
        }
    }

    proptest! {
        /// Both nodes compute the same plan from their two states.
        #[test]
        fn decide_is_symmetric(a in arb_side(), b in arb_side()) {
            let ab = decide(&a, &b);
            let ba = decide(&b, &a);
            match (&ab, &ba) {
                (Plan::SplitBrain { .. }, Plan::SplitBrain { .. }) | (Plan::Wait { .. }, Plan::Wait { .. }) => {}
                _ => prop_assert_eq!(mirror(ab), ba),
            }
        }

        /// A primary is never overwritten, and an inconsistent copy is never a source.
        #[test]
        fn never_overwrite_a_primary_or_copy_from_inconsistent(a in arb_side(), b in arb_side()) {
            if let Plan::Resync { source, .. } = decide(&a, &b) {
                let (src, dst) = match source { Who::Local => (&a, &b), Who::Peer => (&b, &a) };
                prop_assert!(dst.role != Primary);
                prop_assert!(src.consistent);
            }
        }
    }
}
