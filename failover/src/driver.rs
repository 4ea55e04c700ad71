//! The failover driver: the I/O around [`crate::group::decide`]. One task per group gathers
//! the facts (its volumes, the peer's heartbeats, the witness) every heartbeat interval, asks
//! the pure decision function what to do, and does it: promote or demote the volumes, move
//! the virtual IP, run the hooks, hold writes made alone until the witness agreed.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mirror::node::Node;
use mirror::volume::{PlanSummary, ALONE_ALWAYS};
use serde::Serialize;
use tracing::{debug, error, info, warn};

use crate::group::{self, DataState, Decision, Facts, GroupState, PeerFacts, Quorum, Witness};
use crate::heartbeat::{HeartbeatError, Heartbeats, PeerView, MAX_PAYLOAD};
use crate::hooks::{self, HookAction, HookEnv, HookSpec};
use crate::vip::{self, Vip};
use crate::witness::{GroupRecord, VoteOutcome, WitnessClient, LEASE_VALIDITY};

#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    #[error(transparent)]
    Heartbeat(#[from] HeartbeatError),
    #[error("no group named {0:?} on this node")]
    UnknownGroup(String),
    #[error("group {group}: {what}")]
    Refused { group: String, what: String },
    #[error(
        "group {group}: the groups' states no longer fit in a heartbeat ({bytes} bytes with this \
         group, at most {MAX_PAYLOAD}): use fewer groups or shorter group names"
    )]
    Payload { group: String, bytes: usize },
}

/// One group as configured.
#[derive(Debug, Clone)]
pub struct GroupSpec {
    pub name: String,
    pub volumes: Vec<String>,
    /// (volume, NBD URI of its export on this node) for the hooks.
    pub exports: Vec<(String, String)>,
    pub preferred_node: String,
    pub vip: Option<(Vip, String)>,
    pub auto_failback: bool,
    pub start: Option<HookSpec>,
    pub stop: Option<HookSpec>,
    pub monitor: Option<HookSpec>,
    pub fence: Option<HookSpec>,
    pub monitor_interval: Duration,
    pub restart_attempts: u32,
    /// Extra wait before fencing a peer that may still be alive and fencing this node (see
    /// [`group::fence_grace`]).
    pub fence_delay: Duration,
}

pub struct FailoverSpec {
    pub node: String,
    pub groups: Vec<GroupSpec>,
    pub interval: Duration,
    /// The heartbeat failure timeout.
    pub timeout: Duration,
    pub witness: Option<SocketAddr>,
    pub witness_key: [u8; 32],
    /// Where a group's "VM started here" marker lives (the node's data_dir), so a daemon
    /// killed with its VM running stops that VM when it starts again. None: no marker.
    pub state_dir: Option<std::path::PathBuf>,
}

/// A state change, kept for `status`.
#[derive(Debug, Clone, Serialize)]
pub struct Transition {
    pub at_unix: u64,
    pub from: &'static str,
    pub to: &'static str,
    pub reason: String,
}

/// The last hook of a group that failed or could not run.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct HookFailure {
    pub at_unix: u64,
    pub action: &'static str,
    /// What went wrong: the exit status and the end of the hook's error output, or why it
    /// could not run, and what the daemon did about it.
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct GroupStatus {
    pub name: String,
    pub state: &'static str,
    pub primary_node: Option<String>,
    pub reason: String,
    pub round: u64,
    pub preferred_node: String,
    pub volumes: Vec<String>,
    pub vip: Option<String>,
    pub peer_alive: bool,
    pub witness: &'static str,
    pub transitions: Vec<Transition>,
    pub last_hook_failure: Option<HookFailure>,
    /// Why the virtual IP could not be added or removed, while that lasts.
    pub vip_problem: Option<String>,
}

/// What a node tells its peer about a group in every heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Announce {
    pub state: u8,
    pub round: u64,
    pub handing_over: bool,
    /// In sync and able to take the group (swap and failback wait for it).
    pub ready: bool,
    /// An operator asked this (secondary) node to take the group.
    pub wants_group: bool,
    /// This (primary) node is handing the group over (stopping the VM, demoting): a swap can
    /// no longer be withdrawn.
    pub leaving: bool,
}

/// What `swap --cancel` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwapCancel {
    /// The request made on this node was withdrawn.
    Withdrawn,
    /// A handover has begun (here or on the peer): the group moves anyway.
    TooLate(&'static str),
    /// Nothing to withdraw on this node.
    NothingPending(&'static str),
}

impl SwapCancel {
    pub fn message(self) -> &'static str {
        match self {
            SwapCancel::Withdrawn => "swap request withdrawn",
            SwapCancel::TooLate(m) | SwapCancel::NothingPending(m) => m,
        }
    }
}

fn state_code(s: GroupState) -> u8 {
    match s {
        GroupState::Stopped => 0,
        GroupState::Waiting => 1,
        GroupState::Alone => 2,
        GroupState::Primary => 3,
        GroupState::Secondary => 4,
        GroupState::Suspended => 5,
    }
}

fn code_state(c: u8) -> GroupState {
    match c {
        2 => GroupState::Alone,
        3 => GroupState::Primary,
        4 => GroupState::Secondary,
        5 => GroupState::Suspended,
        1 => GroupState::Waiting,
        _ => GroupState::Stopped,
    }
}

/// The format of the group announcements in a heartbeat's payload (its first byte). A node
/// reads only its own format: a peer running another one is alive, but its groups' states
/// are unknown, and a group whose peer state is unknown takes no role (see `tick`).
pub const PAYLOAD_FORMAT: u8 = 1;

/// Encodes every group's announcement: per group a length-prefixed name, the state, the
/// round and flags. Pure, so its round trip is unit-tested.
pub fn encode_payload(entries: &[(String, Announce)]) -> Vec<u8> {
    let mut out = vec![PAYLOAD_FORMAT];
    for (name, a) in entries {
        let n = &name.as_bytes()[..name.len().min(255)];
        out.push(n.len() as u8);
        out.extend_from_slice(n);
        out.push(a.state);
        out.extend_from_slice(&a.round.to_be_bytes());
        out.push(
            u8::from(a.handing_over)
                | (u8::from(a.ready) << 1)
                | (u8::from(a.wants_group) << 2)
                | (u8::from(a.leaving) << 3),
        );
    }
    out
}

/// Checks that every group's announcement fits in one heartbeat: the encoding has a fixed
/// size per group, so a set that fits at start always fits, and one that does not would fail
/// every publish and leave the peer seeing each group stopped. Returns the payload's size.
pub fn check_payload_size<'a>(
    names: impl IntoIterator<Item = &'a str>,
) -> Result<usize, FailoverError> {
    let mut entries = Vec::new();
    for name in names {
        entries.push((name.to_string(), Announce::default()));
        let bytes = encode_payload(&entries).len();
        if bytes > MAX_PAYLOAD {
            return Err(FailoverError::Payload {
                group: name.to_string(),
                bytes,
            });
        }
    }
    Ok(encode_payload(&entries).len())
}

pub fn decode_payload(b: &[u8]) -> HashMap<String, Announce> {
    let mut out = HashMap::new();
    if b.first() != Some(&PAYLOAD_FORMAT) {
        return out;
    }
    let mut i = 1;
    while i < b.len() {
        let n = usize::from(b[i]);
        let Some(rest) = b.get(i + 1..i + 1 + n + 10) else {
            break;
        };
        let name = String::from_utf8_lossy(&rest[..n]).into_owned();
        let mut r = [0u8; 8];
        r.copy_from_slice(&rest[n + 1..n + 9]);
        let flags = rest[n + 9];
        out.insert(
            name,
            Announce {
                state: rest[n],
                round: u64::from_be_bytes(r),
                handing_over: flags & 1 != 0,
                ready: flags & 2 != 0,
                wants_group: flags & 4 != 0,
                leaving: flags & 8 != 0,
            },
        );
        i += 1 + n + 10;
    }
    out
}

struct Runtime {
    state: GroupState,
    reason: String,
    round: u64,
    handing_over: bool,
    /// When an operator asked this (primary) node to hand the group over; pending until the
    /// peer is ready, withdrawn, or lapsed (like `wants_group`).
    swap_requested: Option<Instant>,
    /// When an operator asked this (secondary) node to take the group; announced until it
    /// does, or until the request lapses.
    wants_group: Option<Instant>,
    /// The peer's latest heartbeat asks this (primary) node to hand the group over.
    peer_wants_group: bool,
    /// When an operator asked this node to take the group over from a peer they say is down
    /// (`nbdmirror takeover`); lapses like a swap request.
    operator_takeover: Option<Instant>,
    /// A demotion that hands the group over is under way (stop hook, VIP, volumes).
    leaving: bool,
    vm_failed: bool,
    vip_up: bool,
    /// When a failed VIP removal was last logged as an error (retries say it once a minute).
    vip_error_at: Option<Instant>,
    restarts: u32,
    last_monitor: Option<Instant>,
    /// Witness: last lease result and until when this node may write alone.
    lease_until: Option<Instant>,
    lease_holder: Option<bool>,
    witness_seen: Option<Instant>,
    /// When the witness last answered the watch's probe (a node that is not primary, with a
    /// live peer, has no other reason to ask it): for the status only, never for a decision.
    witness_probed: Option<Instant>,
    witness_holder_is_me: bool,
    /// The group generation the witness last confirmed for this node.
    registered_generation: u64,
    /// The volumes' generations behind `registered_generation`, in the group's order: the
    /// only ones a gate may open for (a volume's current generation may be newer).
    registered_volumes: Vec<u64>,
    /// The latest round the witness named another node for, taken into `round` on demotion.
    witness_round: u64,
    /// The group generation this node held, up to date, when it took the group with its
    /// peer's consent (read before its volumes promoted), until the witness registered this
    /// node (see [`Failover::vote_registration`]).
    consent_base: Option<u64>,
    transitions: VecDeque<Transition>,
    ready: bool,
    /// This node fenced the peer since it last lost it (fence-only quorum).
    peer_fenced: bool,
    /// Shown in `status` until the daemon restarts.
    last_hook_failure: Option<HookFailure>,
    /// The virtual IP could not be added or removed (cleared when it next works).
    vip_problem: Option<String>,
    /// The VM was stopped when the group was suspended (see `Decision::Suspend`).
    stopped_while_suspended: bool,
    /// A handover's stop hook failed: no handover before this instant.
    handover_held_until: Option<Instant>,
    /// The last tick decided to serve: the monitor hook may run (see
    /// `Failover::start_monitor_if_due`).
    monitor_wanted: bool,
    /// The volumes' link count when the fence hook started: a link since voids the fence.
    fenced_at_links: u64,
    /// The same count per volume (in the group's order): each volume's gate opens only while
    /// its own count is still this one, and its next link closes it at once.
    fenced_links_per_volume: Vec<u64>,
}

pub struct GroupRuntime {
    spec: GroupSpec,
    rt: Mutex<Runtime>,
    /// Held across each exchange with the witness that registers or releases (a vote, with
    /// its retransmissions, and the bookkeeping of its answer): the tick and the lease watch
    /// both register, and two votes interleaved could leave the witness holding the older
    /// generation while the gates let the newer one through.
    registering: tokio::sync::Mutex<()>,
    /// Held by the lease watch from deciding to renew until the answer: a demotion takes it
    /// before it releases the round, so no renewal of its (retransmitted under a new
    /// sequence number) reaches the witness after the release and re-leases the round.
    renewing: tokio::sync::Mutex<()>,
    /// Held across each tick: the daemon's stop takes it, so it never demotes a group under
    /// a tick that is promoting it.
    ticking: tokio::sync::Mutex<()>,
    /// The monitor hook (and the restart after a failed one) runs here, off the tick: a hook
    /// that takes a minute must not hold the reaction to a dead peer, a newer round or a
    /// stop of the daemon. Cancelled (its hook's process group killed) before the tick
    /// demotes, fences, suspends or promotes, and at shutdown.
    monitor_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

pub struct Failover {
    node_name: String,
    node: Arc<Node>,
    groups: Vec<Arc<GroupRuntime>>,
    heartbeats: Heartbeats,
    witness: Option<WitnessClient>,
    interval: Duration,
    /// The peer's death can only be declared a heartbeat timeout after start: before that,
    /// "no heartbeat yet" says nothing (two nodes started together once both took the group).
    started: Instant,
    peer_timeout: Duration,
    /// The daemon is stopping: no tick decides anything any more.
    stopping: std::sync::atomic::AtomicBool,
    state_dir: Option<std::path::PathBuf>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// After a handover's stop hook failed, how long the group stays before it tries again.
const HANDOVER_RETRY_AFTER_FAILED_STOP: Duration = Duration::from_secs(60);

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Failover {
    /// Removes any VIP a previous run left behind, then starts one task per group. The
    /// heartbeats must already be running (their sockets are bound before the daemon
    /// contacts anyone).
    pub async fn start(
        spec: FailoverSpec,
        node: Arc<Node>,
        heartbeats: Heartbeats,
    ) -> Result<Arc<Failover>, FailoverError> {
        check_payload_size(spec.groups.iter().map(|g| g.name.as_str()))?;
        for g in &spec.groups {
            if let Some((v, ifname)) = &g.vip {
                match vip::remove_if_present(*v, ifname).await {
                    Ok(true) => {
                        warn!(group = %g.name, vip = %v, ifname, "removed a virtual IP left by a previous run")
                    }
                    Ok(false) => {}
                    Err(e) => {
                        error!(group = %g.name, vip = %v, ifname, error = %e, "cannot check the virtual IP at start")
                    }
                }
            }
        }
        let witness = spec
            .witness
            .map(|addr| WitnessClient::new(addr, spec.node.clone(), spec.witness_key));
        let groups = spec
            .groups
            .into_iter()
            .map(|g| {
                Arc::new(GroupRuntime {
                    spec: g,
                    registering: tokio::sync::Mutex::new(()),
                    renewing: tokio::sync::Mutex::new(()),
                    ticking: tokio::sync::Mutex::new(()),
                    monitor_task: Mutex::new(None),
                    rt: Mutex::new(Runtime {
                        state: GroupState::Stopped,
                        reason: "starting".into(),
                        round: 0,
                        handing_over: false,
                        swap_requested: None,
                        wants_group: None,
                        peer_wants_group: false,
                        operator_takeover: None,
                        leaving: false,
                        vm_failed: false,
                        vip_up: false,
                        vip_error_at: None,
                        restarts: 0,
                        last_monitor: None,
                        lease_until: None,
                        lease_holder: None,
                        witness_seen: None,
                        witness_probed: None,
                        witness_holder_is_me: false,
                        registered_generation: 0,
                        registered_volumes: Vec::new(),
                        witness_round: 0,
                        consent_base: None,
                        transitions: VecDeque::new(),
                        ready: false,
                        peer_fenced: false,
                        fenced_at_links: 0,
                        fenced_links_per_volume: Vec::new(),
                        last_hook_failure: None,
                        vip_problem: None,
                        stopped_while_suspended: false,
                        monitor_wanted: false,
                        handover_held_until: None,
                    }),
                })
            })
            .collect();
        let f = Arc::new(Failover {
            node_name: spec.node,
            node,
            groups,
            heartbeats,
            witness,
            interval: spec.interval,
            started: Instant::now(),
            peer_timeout: spec.timeout,
            stopping: std::sync::atomic::AtomicBool::new(false),
            state_dir: spec.state_dir,
        });
        for g in &f.groups {
            // A previous run killed with its VM running (kill -9, a crash) left it here: the
            // peer has taken the group and runs the VM too. Stopped before anything else.
            if f.vm_marker(g).is_some_and(|m| m.exists()) && g.spec.stop.is_some() {
                warn!(group = %g.spec.name, "a VM started by a previous run of this daemon may still run here: running the stop hook");
                if !f.run_stop(g).await {
                    error!(group = %g.spec.name, "the stop hook failed: a VM left by a previous run may still run here; stop it by hand");
                }
            }
        }
        for g in &f.groups {
            // Writes alone wait for the witness from the start (a group volume is never
            // acknowledged alone without quorum).
            if f.witness.is_some() {
                for v in &g.spec.volumes {
                    if let Ok(vol) = f.node.volume(v) {
                        vol.set_alone_allowed(0);
                    }
                }
            }
            tokio::spawn(f.clone().run_group(g.clone()));
            if f.witness.is_some() {
                tokio::spawn(f.clone().watch_lease(g.clone()));
            }
        }
        Ok(f)
    }

    /// The group a volume belongs to, if any.
    pub fn group_of(&self, volume: &str) -> Option<&str> {
        self.groups
            .iter()
            .find(|g| g.spec.volumes.iter().any(|v| v == volume))
            .map(|g| g.spec.name.as_str())
    }

    fn group(&self, name: &str) -> Result<&Arc<GroupRuntime>, FailoverError> {
        self.groups
            .iter()
            .find(|g| g.spec.name == name)
            .ok_or_else(|| FailoverError::UnknownGroup(name.to_string()))
    }

    /// Asks to move the group to the other node (run on either node).
    pub fn request_swap(&self, name: &str) -> Result<&'static str, FailoverError> {
        let g = self.group(name)?;
        let peer = self.heartbeats.subscribe().borrow().clone();
        if !peer.alive {
            return Err(FailoverError::Refused {
                group: name.into(),
                what: "the peer is not reachable: nothing to swap to".into(),
            });
        }
        let action = {
            let mut rt = lock(&g.rt);
            if rt.state.is_primary() {
                rt.swap_requested = Some(Instant::now());
                // The operator asks again (the stop hook fixed, say): no waiting.
                rt.handover_held_until = None;
                "handing the group to the peer"
            } else {
                rt.wants_group = Some(Instant::now());
                "asking the peer to hand the group over"
            }
        };
        // The peer learns of the request now, not at this group's next tick.
        self.publish();
        Ok(action)
    }

    /// The daemon is stopping (SIGTERM, `systemctl stop`): every group this node serves is
    /// given up as a demotion does it (stop hook, virtual IP removed, volumes demoted, witness
    /// round released), and handed over when the peer is alive and ready, so the VM restarts
    /// there at once instead of after a heartbeat timeout. Otherwise a stopped primary left
    /// its virtual IP up (two hosts answering for it once the peer took over) and its VM
    /// running on a disk that no longer took writes. Waits (bounded) for the peer to take a
    /// handed-over group, so it sees this node's heartbeats meanwhile.
    pub async fn shutdown(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Release);
        for g in &self.groups {
            // After any tick in progress; no tick starts after this.
            let _ticking = g.ticking.lock().await;
            self.cancel_monitor(g).await;
            let (primary, round) = {
                let rt = lock(&g.rt);
                (rt.state.is_primary(), rt.round)
            };
            if !primary {
                continue;
            }
            let peer_ready = live_announcement(&self.heartbeats.subscribe().borrow(), &g.spec.name)
                .is_some_and(|a| a.ready);
            let peer_ready = peer_ready && self.peer_answers(g).await;
            let plain = |rt: &mut Runtime| {
                rt.swap_requested = None;
                rt.peer_wants_group = false;
                rt.vm_failed = false;
            };
            {
                let mut rt = lock(&g.rt);
                if peer_ready {
                    // A handover, as for a swap: the peer takes the group with this consent.
                    rt.swap_requested = Some(Instant::now());
                } else {
                    plain(&mut rt);
                }
            }
            let reason = if peer_ready {
                "the daemon is stopping: handing the group to the peer"
            } else {
                "the daemon is stopping"
            };
            self.demote(g, reason).await;
            if lock(&g.rt).state.is_primary() {
                // The handover found the peer gone after all: give the group up anyway.
                plain(&mut lock(&g.rt));
                self.demote(g, "the daemon is stopping").await;
            }
            self.publish();
            if !peer_ready {
                continue;
            }
            let deadline = Instant::now() + self.peer_timeout * 3;
            let mut hb = self.heartbeats.subscribe();
            loop {
                let taken = live_announcement(&hb.borrow_and_update(), &g.spec.name)
                    .is_some_and(|a| code_state(a.state).is_primary() && a.round > round);
                if taken {
                    info!(group = %g.spec.name, "the peer took the group over");
                    break;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    warn!(group = %g.spec.name, "the peer did not take the group before this node stopped; it takes over after the heartbeat timeout");
                    break;
                }
                let _ = tokio::time::timeout(left.min(self.interval), hb.changed()).await;
            }
        }
    }

    /// An operator vouches that the peer is down and asks this node to take the group, in a
    /// group that never fails over by itself (no witness, no fence hook). The group's rules
    /// still apply: this node's copy must be current (in sync when the peer was lost), and
    /// the peer silent; the request lapses after [`TAKEOVER_LAPSE`].
    pub fn request_takeover(&self, name: &str) -> Result<&'static str, FailoverError> {
        let g = self.group(name)?;
        let refused = |what: &str| FailoverError::Refused {
            group: name.into(),
            what: what.into(),
        };
        if self.witness.is_some() || g.spec.fence.is_some() {
            return Err(refused(
                "this group fails over by itself when its witness answers or its fence hook \
                 works: a takeover by hand would bypass what protects it. If the witness (or \
                 the fence) is gone for good and you are sure the peer is down, `nbdmirror \
                 promote VOLUME --force` serves each volume here (without the VIP and hooks)",
            ));
        }
        if self.heartbeats.subscribe().borrow().alive {
            return Err(refused(
                "the peer is alive: use `nbdmirror swap` to move the group",
            ));
        }
        let mut rt = lock(&g.rt);
        if rt.state.is_primary() {
            return Ok("this node already holds the group");
        }
        rt.operator_takeover = Some(Instant::now());
        Ok("taking the group over")
    }

    /// Withdraws a swap asked on this node that has not happened yet (`swap --cancel`, or
    /// the CLI giving up waiting): a group must not move long after the operator gave up.
    /// Too late once the primary began handing the group over (it says so in its heartbeat).
    pub fn cancel_swap(&self, name: &str) -> Result<SwapCancel, FailoverError> {
        let g = self.group(name)?;
        let peer_leaving = live_announcement(&self.heartbeats.subscribe().borrow(), name)
            .is_some_and(|a| a.leaving || a.handing_over);
        let outcome = {
            let mut rt = lock(&g.rt);
            if rt.leaving || rt.handing_over {
                return Ok(SwapCancel::TooLate(
                    "too late: this node is handing the group over",
                ));
            }
            if peer_leaving && rt.wants_group.is_some() {
                return Ok(SwapCancel::TooLate(
                    "too late: the peer is handing the group over",
                ));
            }
            let asked = rt.swap_requested.is_some() || rt.wants_group.is_some();
            rt.swap_requested = None;
            rt.wants_group = None;
            if asked {
                SwapCancel::Withdrawn
            } else if rt.peer_wants_group {
                SwapCancel::NothingPending(
                    "no swap was asked on this node; the peer asks for the group: cancel it there",
                )
            } else {
                SwapCancel::NothingPending("no swap was pending on this node")
            }
        };
        // The peer stops seeing the request now, not at this group's next tick.
        self.publish();
        Ok(outcome)
    }

    pub fn status(&self) -> Vec<GroupStatus> {
        let peer = self.heartbeats.subscribe().borrow().clone();
        let peer_entries = peer
            .last_payload
            .as_deref()
            .map(decode_payload)
            .unwrap_or_default();
        self.groups
            .iter()
            .map(|g| {
                let rt = lock(&g.rt);
                let peer_primary = peer.alive
                    && peer_entries
                        .get(&g.spec.name)
                        .is_some_and(|a| code_state(a.state).is_primary());
                let primary_node = if rt.state.is_primary() {
                    Some(self.node_name.clone())
                } else if peer_primary {
                    peer.node.clone()
                } else {
                    None
                };
                GroupStatus {
                    name: g.spec.name.clone(),
                    state: rt.state.as_str(),
                    primary_node,
                    reason: rt.reason.clone(),
                    round: rt.round,
                    preferred_node: g.spec.preferred_node.clone(),
                    volumes: g.spec.volumes.clone(),
                    vip: g.spec.vip.as_ref().map(|(v, i)| format!("{v} on {i}")),
                    peer_alive: peer.alive,
                    witness: match (&self.witness, rt.witness_seen.max(rt.witness_probed)) {
                        (None, _) => "none",
                        (Some(_), Some(t)) if t.elapsed() < self.interval * 6 => "reachable",
                        (Some(_), _) => "unreachable",
                    },
                    transitions: rt.transitions.iter().cloned().collect(),
                    last_hook_failure: rt.last_hook_failure.clone(),
                    vip_problem: rt.vip_problem.clone(),
                }
            })
            .collect()
    }

    fn publish(&self) {
        let entries: Vec<(String, Announce)> = self
            .groups
            .iter()
            .map(|g| {
                let rt = lock(&g.rt);
                (
                    g.spec.name.clone(),
                    Announce {
                        state: state_code(rt.state),
                        round: rt.round,
                        handing_over: rt.handing_over,
                        ready: rt.ready,
                        wants_group: rt.wants_group.is_some(),
                        leaving: rt.leaving,
                    },
                )
            })
            .collect();
        let bytes = encode_payload(&entries);
        if let Err(e) = self.heartbeats.set_payload(bytes) {
            error!(error = %e, "cannot publish group states in the heartbeat");
        }
    }

    /// A stable digest of the group's volume generations: equal on both nodes exactly when
    /// every volume has the same generation.
    /// The group's volumes' current generations, in the group's order.
    fn volume_generations(&self, g: &GroupRuntime) -> Vec<u64> {
        g.spec
            .volumes
            .iter()
            .map(|v| {
                self.node
                    .volume(v)
                    .map(|x| x.failover_view().generation)
                    .unwrap_or(0)
            })
            .collect()
    }

    fn group_generation(&self, g: &GroupRuntime) -> u64 {
        hash_generations(&self.volume_generations(g))
    }

    /// What a serving primary's alone gates let through, for [`Failover::set_gates`]:
    /// - fence-only quorum: nothing before the peer is fenced;
    /// - no witness (and no fence hook): everything (nobody else takes over);
    /// - witness: only what the witness registered, and only within a lease; decided before
    ///   any gate changes (see set_gates).
    fn alone_allowed(&self, g: &GroupRuntime) -> Option<u64> {
        let rt = lock(&g.rt);
        if self.witness.is_none() {
            let fence_only = g.spec.fence.is_some();
            (!fence_only || rt.peer_fenced).then_some(ALONE_ALWAYS)
        } else {
            (rt.registered_generation != 0 && rt.lease_until.is_some())
                .then_some(rt.registered_generation)
        }
    }

    /// Opens or closes the volumes' gates for writes made alone: `None` closes them,
    /// `Some(ALONE_ALWAYS)` opens them for good (no witness), any other value opens each
    /// volume for the generation the witness registered for it, never for its current one
    /// (a write that went alone into a newer generation waits until that one is registered;
    /// writes waiting at a gate run on the volumes' own threads and pass the moment it
    /// opens, so a gate must never open, even briefly, for a generation not registered).
    fn set_gates(&self, g: &GroupRuntime, allowed: Option<u64>) {
        let (deadline, registered, fenced_links) = {
            let rt = lock(&g.rt);
            let fenced = (self.witness.is_none() && g.spec.fence.is_some() && rt.peer_fenced)
                .then(|| rt.fenced_links_per_volume.clone());
            (rt.lease_until, rt.registered_volumes.clone(), fenced)
        };
        for (i, v) in g.spec.volumes.iter().enumerate() {
            if let Ok(vol) = self.node.volume(v) {
                if let (Some(ALONE_ALWAYS), Some(links)) = (allowed, &fenced_links) {
                    // Open only while the fence holds: the volume closes its gate itself
                    // when a link comes up (the fenced peer returned).
                    let seen = links.get(i).copied().unwrap_or(u64::MAX);
                    vol.set_alone_deadline(None);
                    if !vol.allow_alone_until_next_link(seen) {
                        info!(group = %g.spec.name, volume = %v, "a link came up since the fence: writing alone waits for a new one");
                    }
                    continue;
                }
                let gen = match allowed {
                    None => 0,
                    Some(ALONE_ALWAYS) => ALONE_ALWAYS,
                    Some(_) => registered.get(i).copied().unwrap_or(0),
                };
                vol.set_alone_deadline(if allowed == Some(ALONE_ALWAYS) {
                    None
                } else {
                    deadline
                });
                vol.set_alone_allowed(gen);
            }
        }
    }

    fn transition(&self, g: &GroupRuntime, to: GroupState, reason: &str) {
        let mut rt = lock(&g.rt);
        if rt.state != to {
            info!(group = %g.spec.name, from = rt.state.as_str(), to = to.as_str(), reason, "group state");
            let t = Transition {
                at_unix: unix_now(),
                from: rt.state.as_str(),
                to: to.as_str(),
                reason: reason.to_string(),
            };
            rt.transitions.push_back(t);
            while rt.transitions.len() > 10 {
                rt.transitions.pop_front();
            }
            rt.state = to;
        }
        rt.reason = reason.to_string();
    }

    async fn run_group(self: Arc<Self>, g: Arc<GroupRuntime>) {
        let mut hb = self.heartbeats.subscribe();
        loop {
            {
                let _ticking = g.ticking.lock().await;
                if self.stopping.load(std::sync::atomic::Ordering::Acquire) {
                    return;
                }
                self.tick(&g).await;
                // Under the tick's lock: a stop of the daemon (which takes it, then cancels
                // the monitor) never has one started behind it.
                self.start_monitor_if_due(&g);
            }
            let stale_vip = {
                let rt = lock(&g.rt);
                rt.vip_up && !rt.state.is_primary() && g.spec.vip.is_some()
            };
            if stale_vip {
                // A removal that failed on demotion: the address must not stay here.
                self.vip_down(&g).await;
            }
            self.publish();
            // Next evaluation: at the interval, or at once when the peer's view changes.
            let _ = tokio::time::timeout(self.interval, hb.changed()).await;
        }
    }

    /// With a witness, the survivor may raise the virtual IP as soon as this node's lease
    /// lapsed on the witness. The tick renews the lease and removes the VIP when it decides
    /// to suspend, but a tick can spend a second waiting on an unreachable witness, or a
    /// minute in a start or monitor hook. This watch renews a lease the tick left to run low
    /// (so a slow hook neither stalls writes made alone nor drops the VIP of a healthy
    /// primary), and removes the VIP the moment the lease ends while the peer is silent (the
    /// tick would suspend then anyway; serving again raises it again).
    async fn watch_lease(self: Arc<Self>, g: Arc<GroupRuntime>) {
        let peer = self.heartbeats.subscribe();
        let Some(witness) = self.witness.clone() else {
            return;
        };
        let mut last_probe: Option<Instant> = None;
        let watch_started = Instant::now();
        let mut said_silent = false;
        loop {
            tokio::time::sleep(LEASE_WATCH_PERIOD).await;
            // Say it once when the witness stops answering, and once when it is back: the
            // status alone ("unreachable") was easy to miss, and meanwhile this group cannot
            // fail over by itself.
            let answered = {
                let rt = lock(&g.rt);
                rt.witness_seen.max(rt.witness_probed)
            };
            let silent = answered.unwrap_or(watch_started).elapsed() >= WITNESS_SILENT_WARNING;
            if silent && !said_silent {
                warn!(group = %g.spec.name, witness = %witness.addr(), after = ?WITNESS_SILENT_WARNING, "the witness does not answer (down, unreachable, or another secret): this group cannot fail over by itself until it does, and a primary that loses its peer meanwhile suspends its I/O");
                said_silent = true;
            } else if !silent && said_silent {
                info!(group = %g.spec.name, witness = %witness.addr(), "the witness answers again");
                said_silent = false;
            }
            // First the VIP, so a slow renewal below never delays its removal.
            let lapsed = {
                let rt = lock(&g.rt);
                rt.vip_up
                    && g.spec.vip.is_some()
                    && rt.state.is_primary()
                    && rt.lease_until.is_none_or(|t| Instant::now() >= t)
            };
            if lapsed && !peer.borrow().alive {
                warn!(group = %g.spec.name, "lease lapsed with the peer silent: removing the virtual IP");
                self.vip_down(&g).await;
            }
            self.register_new_generation(&g, &witness).await;
            self.probe_witness(&g, &witness, &peer, &mut last_probe)
                .await;
            let renewing = g.renewing.lock().await;
            let low = {
                let rt = lock(&g.rt);
                let left = rt
                    .lease_until
                    .map(|t| t.saturating_duration_since(Instant::now()));
                (rt.state.is_primary()
                    && rt.registered_generation != 0
                    && left.is_some_and(|l| l < LEASE_VALIDITY / 2 && !l.is_zero()))
                .then_some((rt.round, rt.registered_generation, left.unwrap_or_default()))
            };
            let Some((round, registered, left)) = low else {
                continue;
            };
            // No longer than the lease has left, nor than three watch periods.
            let client = witness
                .clone()
                .with_timeout(left.min(LEASE_WATCH_PERIOD * 3));
            let sent = Instant::now();
            if let Ok(l) = client.lease(&g.spec.name, round).await {
                let mut rt = lock(&g.rt);
                // Only the registration the tick made: a changed one is the tick's to
                // register (its gates stay closed until then).
                let renewed =
                    l.holder && rt.round == round && rt.registered_generation == registered;
                if renewed {
                    let until = sent + LEASE_VALIDITY;
                    let until = rt.lease_until.map_or(until, |t| t.max(until));
                    rt.lease_until = Some(until);
                    rt.witness_seen = Some(Instant::now());
                    drop(rt);
                    // Only the deadline: which generation a gate lets through (if any)
                    // stays the tick's decision.
                    for v in &g.spec.volumes {
                        if let Ok(vol) = self.node.volume(v) {
                            vol.set_alone_deadline(Some(until));
                        }
                    }
                }
            }
            drop(renewing);
        }
    }

    /// Asks the witness, about once a second, whether it answers, while this node is not
    /// primary and its peer is alive: nothing else makes such a node talk to the witness, so
    /// its status said "unreachable" on a healthy pair, and a broken path to the witness
    /// showed only when a failover needed it. The answer feeds the status only.
    async fn probe_witness(
        &self,
        g: &GroupRuntime,
        witness: &WitnessClient,
        peer: &tokio::sync::watch::Receiver<PeerView>,
        last_probe: &mut Option<Instant>,
    ) {
        let due = last_probe.is_none_or(|t| t.elapsed() >= self.interval * 2);
        if !due || lock(&g.rt).state.is_primary() || !peer.borrow().alive {
            return;
        }
        *last_probe = Some(Instant::now());
        let client = witness.clone().with_timeout(WITNESS_PROBE_TIMEOUT);
        if client.query(&g.spec.name).await.is_ok() {
            lock(&g.rt).witness_probed = Some(Instant::now());
        }
    }

    /// Registers a generation started while the tick is busy (a write made alone during a
    /// long monitor or start hook, or a FLUSH the peer did not answer), so that write waits
    /// for the witness, not for the hook. Only while this node serves under a fresh lease
    /// (the tick registered it and nothing suspended it since); a grant is the witness's
    /// word that no other node holds a newer round, so the gates may open for it at once.
    async fn register_new_generation(&self, g: &Arc<GroupRuntime>, witness: &WitnessClient) {
        let _registering = g.registering.lock().await;
        let serving = {
            let rt = lock(&g.rt);
            (serving_state(rt.state)
                && rt.registered_generation != 0
                && rt.lease_until.is_some_and(|t| Instant::now() < t))
            .then_some((rt.round, rt.registered_generation))
        };
        let Some((round, registered)) = serving else {
            return;
        };
        let gens = self.volume_generations(g);
        let gen = hash_generations(&gens);
        if gen == registered {
            return;
        }
        let client = witness.clone().with_timeout(LEASE_WATCH_PERIOD * 3);
        let sent = Instant::now();
        match client.vote(&g.spec.name, round, gen).await {
            Ok(VoteOutcome::Granted(_)) => {
                {
                    let mut rt = lock(&g.rt);
                    if rt.round != round
                        || !serving_state(rt.state)
                        || rt.registered_generation != registered
                    {
                        // The tick moved on meanwhile (it registered, demoted or suspended).
                        return;
                    }
                    rt.registered_generation = gen;
                    rt.registered_volumes = gens;
                    rt.lease_until = Some(sent + LEASE_VALIDITY);
                    rt.witness_seen = Some(Instant::now());
                }
                info!(group = %g.spec.name, round, "a new generation registered with the witness while the group's tick was busy");
                self.set_gates(g, self.alone_allowed(g));
            }
            Ok(VoteOutcome::Denied(_)) => {
                debug!(group = %g.spec.name, round, "the witness did not register the new generation; the tick decides")
            }
            Err(e) => debug!(group = %g.spec.name, error = %e, "new generation not registered"),
        }
    }

    /// Asks the witness to register this node as the group's holder in `round` with group
    /// generation `gen`. A node that took the group with its peer's consent (a swap, a
    /// failback, a start with both nodes up) while the witness was away is not registered
    /// yet: the witness still names the old holder with the generation it last registered,
    /// and votes another node in only with that generation. Once this node wrote alone (a
    /// new generation) it could never be registered, and its writes would wait for good. So
    /// it first registers the generation it took the group at: consent needs this node's
    /// data up to date, so it held all of that data; the writes of its newer generation, not
    /// yet acknowledged, stay behind the second vote. (If the old holder registered a later
    /// generation the pair never had, both votes are refused, as before.) The caller holds
    /// `g.registering`.
    ///
    /// Such a node may also be in an older round than the witness's (rounds live in memory:
    /// both nodes restarted, and the pair agreed from round 1). Told that the peer holds a
    /// later round, it asks for the round after that one at once, instead of being deposed
    /// and taking the group again in that round: a stop and start of the VM for nothing. The
    /// witness still applies its rules (the peer's lease lapsed, the same data). Returns the
    /// answer and the round it is about; on a grant in a later round that round is this
    /// node's.
    /// `consenting_peer`: the round the live peer announces while it is not primary in this
    /// group (`None`: the peer is silent, primary or unknown; no later round is asked then).
    async fn vote_registration(
        &self,
        g: &GroupRuntime,
        w: &WitnessClient,
        round: u64,
        gen: u64,
        consenting_peer: Option<u64>,
    ) -> Result<(VoteOutcome, u64), crate::witness::WitnessError> {
        let outcome = self.vote_from_base(g, w, round, gen).await?;
        let later = match (&outcome, consenting_peer) {
            (VoteOutcome::Denied(Some(r)), Some(peer_round))
                if r.holder != self.node_name
                    && r.round >= round
                    && peer_round < r.round
                    && lock(&g.rt).consent_base.is_some() =>
            {
                r.round + 1
            }
            _ => return Ok((outcome, round)),
        };
        match self.vote_from_base(g, w, later, gen).await? {
            granted @ VoteOutcome::Granted(_) => {
                info!(group = %g.spec.name, from = round, to = later, "the witness knew a later round: took the group in the round after it");
                lock(&g.rt).round = later;
                Ok((granted, later))
            }
            VoteOutcome::Denied(_) => Ok((outcome, round)),
        }
    }

    /// [`Failover::vote_registration`] in `round`, from the take-over generation first.
    async fn vote_from_base(
        &self,
        g: &GroupRuntime,
        w: &WitnessClient,
        round: u64,
        gen: u64,
    ) -> Result<VoteOutcome, crate::witness::WitnessError> {
        let base = {
            let rt = lock(&g.rt);
            rt.consent_base
                .filter(|&base| base != gen && rt.registered_generation == 0)
        };
        if let Some(base) = base {
            match w.vote(&g.spec.name, round, base).await? {
                VoteOutcome::Granted(_) => {
                    // This node is the holder now: the witness takes any generation from it.
                    lock(&g.rt).consent_base = None;
                    info!(group = %g.spec.name, round, "registered with the witness at the generation this node took the group at");
                }
                denied => return Ok(denied),
            }
        }
        let outcome = w.vote(&g.spec.name, round, gen).await?;
        if matches!(outcome, VoteOutcome::Granted(_)) {
            lock(&g.rt).consent_base = None;
        }
        Ok(outcome)
    }

    fn data_facts(
        &self,
        g: &GroupRuntime,
        peer_alive: bool,
        primary: bool,
    ) -> (DataState, bool, bool) {
        let views: Vec<_> = g
            .spec
            .volumes
            .iter()
            .filter_map(|v| self.node.volume(v).ok().map(|x| x.failover_view()))
            .collect();
        if views
            .iter()
            .any(|v| v.plan == Some(PlanSummary::SplitBrain))
        {
            return (DataState::SplitBrain, false, false);
        }
        let all_linked = views.iter().all(|v| v.link_up && v.plan.is_some());
        if all_linked {
            let equal = views.iter().all(|v| match v.plan {
                Some(PlanSummary::InSync) => true,
                Some(PlanSummary::Wait) => v.consistent,
                _ => false,
            });
            let peer_newer = views.iter().any(|v| v.plan == Some(PlanSummary::PeerNewer));
            let stale = peer_newer || views.iter().any(|v| !v.consistent);
            let data = if stale {
                DataState::Stale
            } else {
                DataState::UpToDate
            };
            return (data, peer_newer, equal);
        }
        let data = if primary {
            // Serving without the replication link: "alone", not in sync.
            DataState::InSyncWhenLost
        } else if peer_alive {
            // The peer is up but the replication links are not: compare first.
            DataState::Stale
        } else if views.iter().all(|v| v.in_sync_at_loss && v.consistent) {
            DataState::InSyncWhenLost
        } else {
            DataState::Stale
        };
        (data, false, false)
    }

    async fn tick(&self, g: &Arc<GroupRuntime>) {
        let peer: PeerView = self.heartbeats.subscribe().borrow().clone();
        let listening = self.peer_timeout + self.interval;
        if still_listening(
            lock(&g.rt).state,
            peer.alive,
            self.started.elapsed(),
            listening,
        ) {
            self.transition(
                g,
                GroupState::Waiting,
                "just started: listening for the peer's heartbeats before deciding anything",
            );
            return;
        }
        let last_entry = peer
            .last_payload
            .as_deref()
            .map(decode_payload)
            .and_then(|m| m.get(&g.spec.name).copied());
        let entry = last_entry.filter(|_| peer.alive);
        // The payload outlives the peer: what it was when it went silent.
        let peer_was_primary = last_entry.is_some_and(|a| code_state(a.state).is_primary());
        let state = lock(&g.rt).state;
        if peer.alive && entry.is_none() && !state.is_primary() {
            // A live peer whose state for this group is unknown may be its primary: taking
            // a role on a guess could start the VM twice. A primary keeps serving.
            let why = unknown_peer_state(peer.last_payload.as_deref(), &g.spec.name);
            if lock(&g.rt).reason != why {
                // A peer just started publishes its groups within a tick: not worth a warning.
                if peer.last_payload.as_deref().is_some_and(|b| !b.is_empty()) {
                    warn!(group = %g.spec.name, peer = ?peer.node, "{why}");
                } else {
                    debug!(group = %g.spec.name, peer = ?peer.node, "{why}");
                }
            }
            self.transition(g, GroupState::Waiting, &why);
            return;
        }
        let (data, peer_newer, equal) = self.data_facts(g, peer.alive, state.is_primary());
        let links = self.links_established(g);
        // Ready to take the group: every volume linked and in sync.
        lock(&g.rt).ready = data == DataState::UpToDate && equal;
        let witness = self
            .witness_facts(g, state.is_primary(), peer.alive, entry)
            .await;
        let peer_facts = peer.alive.then(|| {
            let a = entry.unwrap_or_default();
            PeerFacts {
                state: code_state(a.state),
                round: a.round,
                data_newer: peer_newer,
                data_equal: equal,
                handing_over: a.handing_over,
                ready: a.ready,
            }
        });
        let facts = {
            let mut rt = lock(&g.rt);
            if !group::fence_holds(rt.fenced_at_links, links, data) {
                rt.peer_fenced = false;
            }
            // The peer is primary whenever this node asks for the group, so the request stays
            // up until this node takes the group (promote clears it), but not forever: a
            // request that could not be met (the copy never got in sync) must not move the
            // group long after the operator gave up on it. The same for a swap asked on the
            // primary, pending until the peer is ready.
            let lapsed = |t: &Option<Instant>| t.is_some_and(|t| t.elapsed() >= WANTS_GROUP_LAPSE);
            if lapsed(&rt.wants_group) || lapsed(&rt.swap_requested) {
                warn!(group = %g.spec.name, after = ?WANTS_GROUP_LAPSE, "the swap request lapsed");
                rt.wants_group = None;
                rt.swap_requested = None;
            }
            // An operator's takeover is for now, not for whenever the peer goes silent later.
            if rt
                .operator_takeover
                .is_some_and(|t| t.elapsed() >= TAKEOVER_LAPSE)
            {
                warn!(group = %g.spec.name, "the takeover request lapsed: it could not be carried out");
                rt.operator_takeover = None;
            }
            rt.peer_wants_group = entry.is_some_and(|a| a.wants_group);
            if let Some(p) = &peer_facts {
                if p.state.is_primary() {
                    rt.handing_over = false;
                }
                rt.round = group::round_after_peer(rt.round, rt.state, p.round);
            }
            Facts {
                state: rt.state,
                round: rt.round,
                is_preferred: g.spec.preferred_node == self.node_name,
                auto_failback: g.spec.auto_failback,
                data,
                peer: peer_facts,
                witness,
                fence_configured: g.spec.fence.is_some(),
                peer_silent_long: !peer.alive
                    && peer.since.elapsed()
                        >= group::fence_grace(
                            self.peer_timeout,
                            g.spec.fence_delay,
                            g.spec.preferred_node == self.node_name,
                            peer_was_primary,
                        ),
                peer_fenced: rt.peer_fenced,
                vm_failed: rt.vm_failed,
                swap_requested: rt.swap_requested.is_some()
                    || (rt.peer_wants_group && rt.state.is_primary()),
                handing_over: rt.handing_over,
                operator_takeover: rt.operator_takeover.is_some(),
            }
        };
        let decision = group::decide(&facts);
        self.execute(g, decision, peer.node.clone()).await;
    }

    /// Links to the peer the group's volumes have had since start (only grows).
    fn links_established(&self, g: &GroupRuntime) -> u64 {
        self.links_per_volume(g)
            .into_iter()
            .filter(|&n| n != u64::MAX)
            .fold(0, u64::saturating_add)
    }

    /// Each volume's link count, in the group's order (a volume that is gone counts as one
    /// whose count always moved).
    fn links_per_volume(&self, g: &GroupRuntime) -> Vec<u64> {
        g.spec
            .volumes
            .iter()
            .map(|v| {
                self.node
                    .volume(v)
                    .map_or(u64::MAX, |v| v.failover_view().links_established)
            })
            .collect()
    }

    /// The fence hook confirmed the peer is off; `links`: the link count before it ran (in
    /// all, and per volume).
    fn mark_fenced(&self, g: &GroupRuntime, links: u64, per_volume: Vec<u64>) {
        let mut rt = lock(&g.rt);
        rt.peer_fenced = true;
        rt.fenced_at_links = links;
        rt.fenced_links_per_volume = per_volume;
    }

    /// `peer`: the live peer's announcement for this group, if any.
    async fn witness_facts(
        &self,
        g: &GroupRuntime,
        primary: bool,
        peer_alive: bool,
        peer: Option<Announce>,
    ) -> Witness {
        let Some(w) = &self.witness else {
            return Witness::None;
        };
        let mut round = lock(&g.rt).round;
        if primary {
            // Renew the lease; register a new generation (writing alone) before any write
            // made alone is acknowledged.
            let registering = g.registering.lock().await;
            let sent = Instant::now();
            let gens = self.volume_generations(g);
            let gen = hash_generations(&gens);
            let registered = lock(&g.rt).registered_generation;
            if gen != registered {
                let consenting = peer
                    .filter(|a| !code_state(a.state).is_primary())
                    .map(|a| a.round);
                match self.vote_registration(g, w, round, gen, consenting).await {
                    Ok((VoteOutcome::Granted(_), granted_round)) => {
                        round = granted_round;
                        let mut rt = lock(&g.rt);
                        rt.registered_generation = gen;
                        rt.registered_volumes = gens;
                    }
                    Ok((VoteOutcome::Denied(rec), _)) => {
                        // During a handover the old holder's lease has to lapse first; the
                        // lease answer below says whether this node was really deposed.
                        debug!(group = %g.spec.name, record = ?rec, "the witness has not registered this node's generation yet");
                        let mut rt = lock(&g.rt);
                        rt.witness_seen = Some(Instant::now());
                        if let Some(r) = &rec {
                            learn_round(&mut rt, r, &self.node_name);
                        }
                    }
                    // Said once by the lease watch when it lasts.
                    Err(e) => debug!(group = %g.spec.name, error = %e, "witness unreachable"),
                }
            }
            drop(registering);
            match w.lease(&g.spec.name, round).await {
                Ok(l) => {
                    let mut rt = lock(&g.rt);
                    rt.witness_seen = Some(Instant::now());
                    // Deposed only by a newer round (or another holder of ours). A round
                    // older than ours is a handover whose registration waits for the old
                    // holder's lease to lapse: not a reason to give the group back.
                    let mut deposed = l
                        .record
                        .as_ref()
                        .is_some_and(|r| r.holder != self.node_name && r.round >= round);
                    if let Some(r) = &l.record {
                        learn_round(&mut rt, r, &self.node_name);
                        if deposed
                            && peer_alive
                            && rt.consent_base.is_some()
                            && consenting_peer_behind(peer, r)
                        {
                            // Taken with the live peer's consent, in a round older than the
                            // witness's (both nodes restarted): the peer, not primary and
                            // itself behind the witness's round, agreed, so this is no
                            // deposition. Each tick's registration asks for the round after
                            // the witness's (`vote_registration`), granted once the old
                            // holder's lease lapsed; until then writes alone wait.
                            deposed = false;
                        }
                    }
                    rt.lease_holder = Some(!deposed);
                    if l.holder && rt.registered_generation == gen {
                        rt.lease_until = Some(sent + LEASE_VALIDITY);
                    }
                }
                Err(e) => {
                    debug!(group = %g.spec.name, error = %e, "lease not renewed");
                }
            }
            let rt = lock(&g.rt);
            let fresh = rt.lease_until.is_some_and(|t| Instant::now() < t);
            let reachable = rt
                .witness_seen
                .is_some_and(|t| t.elapsed() < LEASE_VALIDITY);
            if reachable || fresh {
                Witness::Reachable {
                    holder_is_me: rt.lease_holder.unwrap_or(true),
                    lease_fresh: fresh,
                }
            } else {
                Witness::Unreachable
            }
        } else if !peer_alive {
            match w.query(&g.spec.name).await {
                Ok(q) => {
                    let gen = self.group_generation(g);
                    let me = q.record.as_ref().is_some_and(|r| {
                        r.holder == self.node_name && (r.generation == gen || r.generation == 0)
                    });
                    let mut rt = lock(&g.rt);
                    rt.witness_seen = Some(Instant::now());
                    rt.witness_holder_is_me = me;
                    if let Some(r) = q.record {
                        rt.round = rt.round.max(r.round);
                    }
                    Witness::Reachable {
                        holder_is_me: me,
                        lease_fresh: false,
                    }
                }
                Err(_) => Witness::Unreachable,
            }
        } else {
            Witness::Reachable {
                holder_is_me: false,
                lease_fresh: false,
            }
        }
    }

    fn hook_env(&self, g: &GroupRuntime, peer: Option<String>) -> HookEnv {
        HookEnv {
            group: g.spec.name.clone(),
            node: self.node_name.clone(),
            volumes: g.spec.exports.clone(),
            peer,
        }
    }

    async fn run_hook(
        &self,
        g: &GroupRuntime,
        hook: &Option<HookSpec>,
        action: HookAction,
        peer: Option<String>,
    ) -> bool {
        let Some(h) = hook else { return true };
        match hooks::run(h, action, &self.hook_env(g, peer)).await {
            Ok(o) if o.success() => {
                info!(group = %g.spec.name, action = action.as_str(), took = ?o.duration, "hook succeeded");
                true
            }
            Ok(o) => {
                warn!(group = %g.spec.name, action = action.as_str(), exit = %o.exit, stderr = ?o.stderr_tail, "hook failed");
                let tail = o.stderr_tail.join(" | ");
                self.hook_failed(g, action, format!("{}; stderr: {tail}", o.exit));
                false
            }
            Err(e) => {
                error!(group = %g.spec.name, action = action.as_str(), error = %e, "hook could not run");
                self.hook_failed(g, action, format!("could not run: {e}"));
                false
            }
        }
    }

    /// The marker of a group's VM started on this node (see `FailoverSpec::state_dir`).
    fn vm_marker(&self, g: &GroupRuntime) -> Option<std::path::PathBuf> {
        let dir = self.state_dir.as_ref()?;
        Some(dir.join(format!("group-{}.vm-started", g.spec.name)))
    }

    /// Before a start hook runs: a daemon killed from now on leaves the marker behind.
    fn vm_starting(&self, g: &GroupRuntime) {
        if let Some(m) = self.vm_marker(g).filter(|_| g.spec.start.is_some()) {
            if let Err(e) = std::fs::write(&m, b"") {
                warn!(group = %g.spec.name, marker = %m.display(), error = %e, "cannot record that the VM starts here (a kill -9 of this daemon would leave it unstopped)");
            }
        }
    }

    /// After a stop hook succeeded.
    fn vm_stopped(&self, g: &GroupRuntime) {
        if let Some(m) = self.vm_marker(g) {
            match std::fs::remove_file(&m) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    warn!(group = %g.spec.name, marker = %m.display(), error = %e, "cannot remove the VM marker")
                }
            }
        }
    }

    /// Runs the start hook, marked first.
    async fn run_start(&self, g: &GroupRuntime) -> bool {
        self.vm_starting(g);
        self.run_hook(g, &g.spec.start, HookAction::Start, None)
            .await
    }

    /// Runs the stop hook; the marker goes once it succeeded.
    async fn run_stop(&self, g: &GroupRuntime) -> bool {
        let stopped = self.run_hook(g, &g.spec.stop, HookAction::Stop, None).await;
        if stopped {
            self.vm_stopped(g);
        }
        stopped
    }

    fn hook_failed(&self, g: &GroupRuntime, action: HookAction, detail: String) {
        lock(&g.rt).last_hook_failure = Some(HookFailure {
            at_unix: unix_now(),
            action: action.as_str(),
            detail,
        });
    }

    async fn execute(&self, g: &Arc<GroupRuntime>, d: Decision, peer_name: Option<String>) {
        if !matches!(d, Decision::Serve { .. } | Decision::Stay { .. }) {
            // A monitor hook, or a restart of the VM, must not run on under a change of role
            // (or the fence): its hooks would race the ones run here.
            self.cancel_monitor(g).await;
        }
        match d {
            Decision::Stay { state, reason } => self.transition(g, state, &reason),
            Decision::Promote {
                round,
                quorum,
                reason,
            } => self.promote(g, round, quorum, &reason, peer_name).await,
            Decision::Serve { state, reason } => {
                self.set_gates(g, self.alone_allowed(g));
                if !lock(&g.rt).vip_up {
                    self.vip_up(g).await;
                }
                self.transition(g, state, &reason);
                let restart = std::mem::take(&mut lock(&g.rt).stopped_while_suspended);
                if restart {
                    info!(group = %g.spec.name, "serving again: starting the VM stopped while suspended");
                    if !self.run_start(g).await {
                        lock(&g.rt).restarts += 1;
                    }
                    lock(&g.rt).last_monitor = Some(Instant::now());
                }
                lock(&g.rt).monitor_wanted = true;
            }
            Decision::FencePeer { reason } => {
                // Writes alone wait (never failed, never acknowledged) until the peer is off.
                self.set_gates(g, None);
                self.transition(g, GroupState::Suspended, &reason);
                let links = self.links_established(g);
                let per_volume = self.links_per_volume(g);
                if self
                    .run_hook(g, &g.spec.fence, HookAction::Fence, peer_name)
                    .await
                {
                    warn!(group = %g.spec.name, "the peer is fenced: serving alone");
                    self.mark_fenced(g, links, per_volume);
                    self.set_gates(g, Some(ALONE_ALWAYS));
                    self.transition(g, GroupState::Alone, "the peer is fenced: serving alone");
                }
            }
            Decision::Suspend { reason } => {
                self.set_gates(g, None);
                if lock(&g.rt).state != GroupState::Suspended {
                    error!(group = %g.spec.name, "{reason}");
                }
                // Without quorum the survivor may take the group (and raise the VIP) once
                // this node's lease lapsed: a suspended node keeping the address would leave
                // it on two hosts, and clients on the frozen one. Serving again (quorum back,
                // nobody took over) raises it again.
                if lock(&g.rt).vip_up {
                    warn!(group = %g.spec.name, "suspended: removing the virtual IP");
                    self.vip_down(g).await;
                }
                // And the VM: a survivor that takes the group starts it there, and a copy
                // frozen here (its disk suspended, its guest network still up) must not run
                // beside it. Serving again (quorum back, nobody took over) starts it again.
                // Once, on entering the state (a stop that failed is not retried every tick;
                // `status` shows it).
                let entering = lock(&g.rt).state != GroupState::Suspended;
                if entering && g.spec.stop.is_some() {
                    warn!(group = %g.spec.name, "suspended: stopping the VM (the peer may take the group)");
                    self.transition(g, GroupState::Suspended, &reason);
                    if self.run_stop(g).await {
                        // Started again only if it was stopped: a failed stop may have left
                        // it running.
                        lock(&g.rt).stopped_while_suspended = true;
                    }
                }
                self.transition(g, GroupState::Suspended, &reason);
            }
            Decision::Demote { reason } => self.demote(g, &reason).await,
        }
    }

    async fn vip_up(&self, g: &GroupRuntime) {
        if let Some((v, ifname)) = &g.spec.vip {
            match vip::add(*v, ifname).await {
                Ok(_) => {
                    info!(group = %g.spec.name, vip = %v, ifname, "virtual IP added (gratuitous ARP sent)");
                    let mut rt = lock(&g.rt);
                    rt.vip_up = true;
                    rt.vip_problem = None;
                }
                Err(e) => self.vip_failed(
                    g,
                    format!("cannot add {v} on {ifname}: {e}"),
                    "clients cannot reach the group through it",
                ),
            }
        } else {
            lock(&g.rt).vip_up = true;
        }
    }

    /// A virtual IP that could not be added or removed: retried at every tick, so shown in
    /// `status` and logged as an error once a minute.
    fn vip_failed(&self, g: &GroupRuntime, problem: String, consequence: &str) {
        let mut rt = lock(&g.rt);
        if rt
            .vip_error_at
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
        {
            rt.vip_error_at = Some(Instant::now());
            error!(group = %g.spec.name, problem, "virtual IP: {consequence} (retrying; said once a minute)");
        } else {
            debug!(group = %g.spec.name, problem, "virtual IP");
        }
        rt.vip_problem = Some(problem);
    }

    async fn vip_down(&self, g: &GroupRuntime) {
        if let Some((v, ifname)) = &g.spec.vip {
            if let Err(e) = vip::remove(*v, ifname).await {
                // Still up as far as we know: tried again at the next tick (or lease watch).
                self.vip_failed(
                    g,
                    format!("cannot remove {v} from {ifname}: {e}"),
                    "it may answer here and on the peer",
                );
                return;
            }
        }
        let mut rt = lock(&g.rt);
        rt.vip_up = false;
        rt.vip_problem = None;
    }

    async fn promote(
        &self,
        g: &Arc<GroupRuntime>,
        round: u64,
        quorum: Quorum,
        reason: &str,
        peer: Option<String>,
    ) {
        match quorum {
            Quorum::PeerConsent => {}
            Quorum::Operator => {
                warn!(group = %g.spec.name, "taking the group over on an operator's word that the peer is down");
            }
            Quorum::WitnessVote => {
                let Some(w) = &self.witness else { return };
                let gen = self.group_generation(g);
                match w.vote(&g.spec.name, round, gen).await {
                    Ok(VoteOutcome::Granted(_)) => {
                        info!(group = %g.spec.name, round, "the witness voted for this node");
                    }
                    Ok(VoteOutcome::Denied(rec)) => {
                        if let Some(r) = &rec {
                            let mut rt = lock(&g.rt);
                            rt.round = rt.round.max(r.round);
                        }
                        let why = match rec {
                            Some(r) => format!(
                                "the witness refused (round {} is {}'s, data generation {:016x}); waiting",
                                r.round, r.holder, r.generation
                            ),
                            None => "the witness refused".into(),
                        };
                        self.transition(g, GroupState::Waiting, &why);
                        return;
                    }
                    Err(e) => {
                        self.transition(
                            g,
                            GroupState::Waiting,
                            &format!("the witness did not answer: {e}"),
                        );
                        return;
                    }
                }
            }
            Quorum::Fence => {
                info!(group = %g.spec.name, peer = ?peer, "fencing the peer before taking over");
                let links = self.links_established(g);
                let per_volume = self.links_per_volume(g);
                if !self
                    .run_hook(g, &g.spec.fence, HookAction::Fence, peer)
                    .await
                {
                    self.transition(
                        g,
                        GroupState::Waiting,
                        "the fence hook did not confirm the peer is off",
                    );
                    return;
                }
                // As primary without the link, the rules would otherwise fence it again.
                self.mark_fenced(g, links, per_volume);
            }
        }
        if quorum != Quorum::PeerConsent {
            // The heartbeats say the peer is gone; its replication links may not have timed
            // out yet (a peer that lost power closes nothing): do not wait for them.
            for v in &g.spec.volumes {
                if let Ok(vol) = self.node.volume(v) {
                    vol.disconnect_peer("the heartbeats declared the peer dead")
                        .await;
                }
            }
        }
        info!(group = %g.spec.name, round, quorum = ?quorum, reason, "taking the group");
        if self.witness.is_some() {
            self.set_gates(g, None);
        }
        // Read before the volumes promote: one whose link dropped meanwhile starts a new
        // generation as it does, which the witness never saw.
        let consent_base = (quorum == Quorum::PeerConsent).then(|| self.group_generation(g));
        let mut promoted = Vec::new();
        for v in &g.spec.volumes {
            match self.node.promote(v, false).await {
                Ok(_) => promoted.push(v.clone()),
                Err(e) => {
                    error!(group = %g.spec.name, volume = %v, error = %e, "promotion failed; giving the group back");
                    for p in &promoted {
                        let _ = self.node.demote(p).await;
                    }
                    self.transition(
                        g,
                        GroupState::Waiting,
                        &format!("promotion of {v} failed: {e}"),
                    );
                    return;
                }
            }
        }
        {
            let mut rt = lock(&g.rt);
            rt.round = round;
            rt.handing_over = false;
            rt.wants_group = None;
            rt.operator_takeover = None;
            rt.restarts = 0;
            rt.vm_failed = false;
            rt.registered_generation = 0;
            rt.registered_volumes.clear();
            rt.lease_until = None;
        }
        if let Some(w) = &self.witness {
            // Register the (possibly new) generation before any write alone is acknowledged.
            let gens = self.volume_generations(g);
            let gen = hash_generations(&gens);
            lock(&g.rt).consent_base = consent_base;
            // The witness starts the lease when it grants, after the request left: counting
            // from the send keeps this side's lease inside the witness's.
            let sent = Instant::now();
            let _registering = g.registering.lock().await;
            // The peer that consented is not primary, and behind this node's round.
            let consenting = (quorum == Quorum::PeerConsent).then_some(round.saturating_sub(1));
            if let Ok((VoteOutcome::Granted(_), _)) =
                self.vote_registration(g, w, round, gen, consenting).await
            {
                let mut rt = lock(&g.rt);
                rt.registered_generation = gen;
                rt.registered_volumes = gens;
                rt.lease_until = Some(sent + LEASE_VALIDITY);
                rt.lease_holder = Some(true);
                rt.witness_seen = Some(Instant::now());
            }
        }
        // The serving rule, now rather than at the first tick after the start hook (which
        // can take a minute): with a witness, registered writes alone pass at once; in
        // fence-only mode after a promotion by the peer's consent (swap, failback) nothing
        // passes before a fence, or a partition during the hook would let this node write
        // alone while the peer, which never saw it primary, fences it and takes over without
        // those writes.
        self.set_gates(g, self.alone_allowed(g));
        self.vip_up(g).await;
        self.transition(g, GroupState::Primary, reason);
        // The peer learns the new primary now, not after the start hook.
        self.publish();
        if !self.run_start(g).await {
            lock(&g.rt).restarts += 1;
        }
        lock(&g.rt).last_monitor = Some(Instant::now());
    }

    async fn demote(&self, g: &Arc<GroupRuntime>, reason: &str) {
        let (handing_over, held_back) = {
            let rt = lock(&g.rt);
            (
                rt.swap_requested.is_some()
                    || rt.peer_wants_group
                    || rt.vm_failed
                    || reason.contains("failback"),
                rt.handover_held_until.is_some_and(|t| Instant::now() < t),
            )
        };
        if handing_over && held_back {
            // The last handover's stop hook failed: a request the peer keeps announcing (its
            // `swap`, auto-failback) is not retried every tick, each with the hook's timeout.
            debug!(group = %g.spec.name, reason, "not handing over yet: the last stop hook failed");
            return;
        }
        if handing_over && !self.peer_answers(g).await {
            // Its readiness came in a heartbeat that may be seconds old: a peer cut off just
            // now would not take the group, and this node would take it back only after its
            // own timeouts (the VM stopped for nothing). The request stays; the next tick
            // decides again.
            warn!(group = %g.spec.name, reason, "the peer does not answer on the replication link: not handing the group over now");
            return;
        }
        info!(group = %g.spec.name, reason, "giving up the group");
        let registered_before = lock(&g.rt).registered_generation;
        let handover = {
            let mut rt = lock(&g.rt);
            // The lease watch stops renewing: a lease after the release below would make the
            // peer wait out a lease nobody uses.
            rt.registered_generation = 0;
            // A swap the peer asked for is a handover too: without the flag the peer does
            // not take the group, and when this node is the preferred one it takes it back.
            let handover = rt.swap_requested.is_some()
                || rt.peer_wants_group
                || rt.vm_failed
                || reason.contains("failback");
            // From here a swap can no longer be withdrawn (`cancel_swap`).
            rt.leaving = handover;
            handover
        };
        // The peer's `swap --cancel` learns it now.
        self.publish();
        if !handover {
            // Not a handover: the peer holds the group already, or may (a newer round, the
            // witness names another holder), with the address up there. Down here first, not
            // after a stop hook that may take a minute.
            self.vip_down(g).await;
        }
        let stopped = self.run_stop(g).await;
        if !stopped && handover {
            // The VM may still run here: starting it on the peer would run it twice. The
            // group stays, serving as before; the operator retries once the VM is stopped.
            error!(group = %g.spec.name, reason, "the stop hook failed: the VM may still run here, so the group stays on this node; stop the VM (or fix the hook) and retry");
            {
                let mut rt = lock(&g.rt);
                rt.leaving = false;
                rt.swap_requested = None;
                rt.vm_failed = false;
                rt.registered_generation = registered_before;
                rt.handover_held_until = Some(Instant::now() + HANDOVER_RETRY_AFTER_FAILED_STOP);
                if let Some(f) = rt.last_hook_failure.as_mut() {
                    f.detail
                        .push_str(" (during a handover: the group stayed on this node)");
                }
            }
            self.publish();
            return;
        }
        if handover {
            self.vip_down(g).await;
        }
        let mut all_demoted = true;
        for v in &g.spec.volumes {
            if let Err(e) = self.node.demote(v).await {
                error!(group = %g.spec.name, volume = %v, error = %e, "demotion failed");
                all_demoted = false;
            }
        }
        if let (Some(w), true) = (&self.witness, all_demoted) {
            // Nothing is written here any more: the peer need not wait out this node's
            // lease to register as primary (a swap completes at once). Best effort: without
            // an answer the lease lapses by itself.
            let round = lock(&g.rt).round;
            let _registering = g.registering.lock().await;
            // A renewal still on its way would reach the witness after the release.
            let _renewing = g.renewing.lock().await;
            match w.release(&g.spec.name, round).await {
                Ok(released) => {
                    debug!(group = %g.spec.name, round, released, "witness round released")
                }
                Err(e) => {
                    debug!(group = %g.spec.name, round, error = %e, "witness round not released")
                }
            }
        }
        {
            let mut rt = lock(&g.rt);
            rt.swap_requested = None;
            rt.vm_failed = false;
            rt.stopped_while_suspended = false;
            rt.handing_over = handover;
            rt.leaving = false;
            rt.round = rt.round.max(rt.witness_round);
            rt.lease_until = None;
            rt.registered_generation = 0;
            rt.registered_volumes.clear();
            rt.consent_base = None;
        }
        self.transition(g, GroupState::Waiting, reason);
    }

    /// Every volume of the group gets an answer from the peer on its replication link.
    async fn peer_answers(&self, g: &GroupRuntime) -> bool {
        for v in &g.spec.volumes {
            let Ok(vol) = self.node.volume(v) else {
                return false;
            };
            if !vol.peer_answers(PEER_PING_TIMEOUT).await {
                return false;
            }
        }
        true
    }

    /// After a tick that decided to serve: starts the monitor hook on its own task when it
    /// is due and none is running.
    fn start_monitor_if_due(self: &Arc<Self>, g: &Arc<GroupRuntime>) {
        if g.spec.monitor.is_none() || self.stopping.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        {
            let mut rt = lock(&g.rt);
            let wanted = std::mem::take(&mut rt.monitor_wanted);
            let due = rt
                .last_monitor
                .is_none_or(|t| t.elapsed() >= g.spec.monitor_interval);
            if !wanted || !due || !rt.state.is_primary() {
                return;
            }
        }
        let mut task = lock(&g.monitor_task);
        if task.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        lock(&g.rt).last_monitor = Some(Instant::now());
        let (f, group) = (self.clone(), g.clone());
        *task = Some(tokio::spawn(async move { f.monitor(&group).await }));
    }

    /// Stops a monitor cycle in progress: its hook's process group is killed.
    async fn cancel_monitor(&self, g: &GroupRuntime) {
        let task = lock(&g.monitor_task).take();
        if let Some(task) = task {
            if !task.is_finished() {
                info!(group = %g.spec.name, "stopping the monitor hook in progress");
            }
            task.abort();
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }

    async fn monitor(&self, g: &Arc<GroupRuntime>) {
        let Some(m) = &g.spec.monitor else { return };
        if self
            .run_hook(g, &Some(m.clone()), HookAction::Monitor, None)
            .await
        {
            return;
        }
        let restarts = lock(&g.rt).restarts;
        if restarts < g.spec.restart_attempts {
            warn!(group = %g.spec.name, attempt = restarts + 1, "the VM failed its monitor: restarting it here");
            lock(&g.rt).restarts += 1;
            self.run_stop(g).await;
            self.run_start(g).await;
        } else {
            error!(group = %g.spec.name, restarts, "the VM keeps failing here: failing the group over");
            lock(&g.rt).vm_failed = true;
        }
    }

    /// Whether a volume's role may be changed by hand. The refusal names the group's own
    /// commands and when each applies: `swap` while both nodes run, `takeover` when the peer
    /// is down in a group that never fails over by itself (it is refused in the others).
    pub fn manual_role_change_allowed(
        &self,
        volume: &str,
        force: bool,
    ) -> Result<(), FailoverError> {
        let Some(group) = self.group_of(volume) else {
            return Ok(());
        };
        if force {
            return Ok(());
        }
        let g = self.group(group)?;
        let peer_down = if self.witness.is_some() || g.spec.fence.is_some() {
            format!(
                "if the peer is down, this group fails over by itself (it has a witness or a \
                 fence hook), so `nbdmirror takeover {group}` does not apply to it"
            )
        } else {
            format!(
                "if the peer is down (its daemon or host dead), `nbdmirror takeover {group}` \
                 starts the group on this node (this group has no witness or fence hook, so it \
                 never fails over by itself)"
            )
        };
        Err(FailoverError::Refused {
            group: group.to_string(),
            what: format!(
                "volume {volume} belongs to group {group}, whose volumes, virtual IP and hooks \
                 change role together: while both nodes run, `nbdmirror swap {group}` moves the \
                 group to the other node; {peer_down}. --force changes this volume alone, \
                 without the group's virtual IP and hooks"
            ),
        })
    }
}

/// Serving writes (not suspended): where the lease watch may register a new generation.
fn serving_state(s: GroupState) -> bool {
    matches!(s, GroupState::Primary | GroupState::Alone)
}

/// How long a secondary asks its peer for the group (`swap` run on the secondary) before the
/// request lapses: ample for the copy to finish a resync the swap waits for.
const WANTS_GROUP_LAPSE: Duration = Duration::from_secs(600);

/// How long an operator's takeover request waits to be carried out.
const TAKEOVER_LAPSE: Duration = Duration::from_secs(60);

/// How long a peer may take to answer the ping made before a handover.
const PEER_PING_TIMEOUT: Duration = Duration::from_secs(1);

/// How long the witness may stay silent before the group warns about it.
const WITNESS_SILENT_WARNING: Duration = Duration::from_secs(5);

/// How long the status probe of a node that is not primary waits for the witness.
const WITNESS_PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// How often [`Failover::watch_lease`] looks at a group's lease.
const LEASE_WATCH_PERIOD: Duration = Duration::from_millis(100);

/// Takes the witness's round into a primary's view. Rounds live in memory: after both nodes
/// restarted, the pair starts at a low round while the witness holds a later one. If this
/// node holds that round, it adopts it (the next registration is then granted). If another
/// node does, this node is deposed: the round is kept aside and taken when it demotes, so
/// its next promotion starts above it instead of climbing one round per promote-and-demote
/// cycle (each restarting the VM). Not before: a deposed primary announcing the winner's
/// round would tie with it, and the tie-break could make the winner yield.
fn learn_round(rt: &mut Runtime, record: &GroupRecord, me: &str) {
    if record.holder == me && record.round > rt.round {
        info!(
            round = record.round,
            "the witness says this node holds a later round: adopting it"
        );
        rt.round = record.round;
    } else {
        rt.witness_round = rt.witness_round.max(record.round);
    }
}

/// Whether a group should still wait for its peer's first heartbeats before deciding: only
/// right after start-up, and only while it has taken no role yet. A group that is already
/// primary and loses its peer in that window must go through the rules (suspend without the
/// witness), not fall back to `Waiting` with its volumes still serving.
fn still_listening(
    state: GroupState,
    peer_alive: bool,
    since_start: Duration,
    window: Duration,
) -> bool {
    !peer_alive
        && since_start < window
        && matches!(state, GroupState::Stopped | GroupState::Waiting)
}

/// Whether the live peer's announcement shows a node that consented to this one taking the
/// group and never learned the witness's `record` round (it restarted since): not primary,
/// and in an older round. A peer announcing primary, or the record's round (it was voted in
/// while this node was cut off), really deposed this node.
fn consenting_peer_behind(peer: Option<Announce>, record: &GroupRecord) -> bool {
    peer.is_some_and(|a| !code_state(a.state).is_primary() && a.round < record.round)
}

/// What the peer announces for `group`, if it is alive and announces it.
fn live_announcement(view: &PeerView, group: &str) -> Option<Announce> {
    if !view.alive {
        return None;
    }
    decode_payload(view.last_payload.as_deref()?)
        .get(group)
        .copied()
}

/// Why a live peer's heartbeat says nothing about `group`, for the operator.
fn unknown_peer_state(payload: Option<&[u8]>, group: &str) -> String {
    match payload.and_then(|b| b.first()) {
        None => "the peer's heartbeats carry no group states yet".to_string(),
        Some(&f) if f != PAYLOAD_FORMAT => format!(
            "the peer announces its groups in heartbeat format {f}, this node reads format \
             {PAYLOAD_FORMAT}: run the same nbdmirror version on both nodes; this group takes \
             no role meanwhile"
        ),
        Some(_) => format!(
            "the peer does not announce group {group}: is it in the peer's configuration, \
             under the same name? This group takes no role meanwhile"
        ),
    }
}

/// The group generation: one id for the volumes' generations together.
fn hash_generations(gens: &[u64]) -> u64 {
    let mut h = blake3::Hasher::new();
    for gen in gens {
        h.update(&gen.to_be_bytes());
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.finalize().as_bytes()[..8]);
    u64::from_be_bytes(b).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_group_without_a_role_listens_after_start() {
        let w = Duration::from_secs(4);
        let early = Duration::from_secs(1);
        assert!(still_listening(GroupState::Stopped, false, early, w));
        assert!(still_listening(GroupState::Waiting, false, early, w));
        assert!(!still_listening(GroupState::Waiting, true, early, w));
        assert!(!still_listening(GroupState::Waiting, false, w, w));
        for active in [
            GroupState::Primary,
            GroupState::Alone,
            GroupState::Secondary,
            GroupState::Suspended,
        ] {
            assert!(
                !still_listening(active, false, early, w),
                "{active:?} lost its peer early and must not fall back to waiting"
            );
        }
    }

    #[test]
    fn groups_that_do_not_fit_in_a_heartbeat_are_refused() {
        // Names of the longest valid length (63): 1 + 16 * (1 + 63 + 10) = 1185 bytes fit.
        let names: Vec<String> = (0..17)
            .map(|i| format!("{:g<63}", format!("g{i}-")))
            .collect();
        let fits = check_payload_size(names[..16].iter().map(String::as_str)).expect("16 fit");
        assert!(fits <= MAX_PAYLOAD);
        match check_payload_size(names.iter().map(String::as_str)) {
            Err(FailoverError::Payload { group, bytes }) => {
                assert_eq!(group, names[16]);
                assert_eq!(bytes, fits + 74);
                assert!(bytes > MAX_PAYLOAD);
            }
            other => panic!("17 groups of 63 characters: {other:?}"),
        }
        // Short names leave room for many more groups.
        let short: Vec<String> = (0..60).map(|i| format!("vm{i}")).collect();
        assert!(check_payload_size(short.iter().map(String::as_str)).is_ok());
        assert_eq!(check_payload_size(std::iter::empty()).ok(), Some(1));
    }

    /// A consent primary behind the witness's round is deposed only by a peer that is
    /// primary, or that announces the record's round (it was voted in meanwhile).
    #[test]
    fn only_a_restarted_consenting_peer_leaves_a_behind_primary_in_place() {
        let record = GroupRecord {
            round: 5,
            holder: "node-b".into(),
            generation: 9,
        };
        let peer = |state: GroupState, round| {
            Some(Announce {
                state: state_code(state),
                round,
                ..Announce::default()
            })
        };
        assert!(consenting_peer_behind(
            peer(GroupState::Secondary, 1),
            &record
        ));
        assert!(consenting_peer_behind(
            peer(GroupState::Waiting, 4),
            &record
        ));
        assert!(!consenting_peer_behind(
            peer(GroupState::Secondary, 5),
            &record
        ));
        assert!(!consenting_peer_behind(
            peer(GroupState::Primary, 1),
            &record
        ));
        assert!(!consenting_peer_behind(peer(GroupState::Alone, 6), &record));
        assert!(!consenting_peer_behind(None, &record));
    }

    #[test]
    fn payload_roundtrip() {
        let e = vec![
            (
                "vm1".to_string(),
                Announce {
                    state: 3,
                    round: 7,
                    handing_over: true,
                    ready: false,
                    wants_group: true,
                    leaving: true,
                },
            ),
            ("db".to_string(), Announce::default()),
        ];
        let m = decode_payload(&encode_payload(&e));
        assert_eq!(m.len(), 2);
        assert_eq!(m["vm1"], e[0].1);
        assert_eq!(m["db"], e[1].1);
        assert!(decode_payload(&[9, 1, 2]).is_empty());
        assert!(unknown_peer_state(Some(&[9, 1, 2]), "vm1").contains("format 9"));
        assert!(unknown_peer_state(Some(&encode_payload(&e)), "vm9").contains("group vm9"));
        assert!(unknown_peer_state(None, "vm1").contains("no group states"));
        // Truncated input never panics.
        let full = encode_payload(&e);
        for n in 0..full.len() {
            let _ = decode_payload(&full[..n]);
        }
    }
}
