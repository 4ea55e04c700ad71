//! Heartbeats between the two nodes on one or more links (UDP), authenticated with the shared
//! secret.
//!
//! Every `interval`, each link sends one datagram to the peer: magic, version, link index,
//! sender node, incarnation (random per start), sequence number, the sender's wall clock,
//! an opaque payload chosen by the caller (<= [`MAX_PAYLOAD`] bytes) and a keyed BLAKE3 MAC
//! of all of it. The peer is alive while any link delivered a valid heartbeat within
//! `timeout`.
//!
//! The module has two halves:
//! - a pure codec ([`encode`], [`decode`]) and replay filter ([`ReplayGuard`]), tested
//!   alone (unit and property tests);
//! - the socket tasks behind [`Heartbeats`]: one task per link (it sends and receives on its
//!   own socket) and one that notices silence. They run on their own tokio tasks and never
//!   share a socket or a queue with the data path, so a saturated replication link cannot
//!   delay a heartbeat.
//!
//! Ordering: one sequence counter numbers the datagrams of all links, taken with the payload
//! it carries, so a higher number always carries the same or a newer payload. A datagram
//! delayed on a slow link still proves the peer alive, but its payload replaces the view's only
//! if it is newer than the payload taken from any link (an older "secondary, ready" must not
//! overwrite a "primary" that came first on the faster link).
//!
//! Replays: within one incarnation a datagram must carry a higher sequence number than the
//! last one accepted on that link. Every datagram echoes the receiver's incarnation as the
//! sender last heard it, and a new incarnation of the peer is accepted only from a datagram
//! that echoes this run's (random) incarnation: a recording made before this node started
//! cannot, so a restarted node is never fooled by an old heartbeat, whatever it remembers.
//! Until then the node echoes what it heard, so two nodes starting together confirm each
//! other within a round trip (an unconfirmed datagram is answered at once). A new incarnation
//! must also have a wall clock later than the last datagram of the current one (both readings
//! come from the peer's own clock), unless the current one has been silent for `timeout`; the
//! incarnations it replaces are remembered and refused from then on. The link index is MAC'd,
//! so a datagram recorded on one link cannot be played back on another.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// Largest payload a heartbeat carries (keeps a datagram under any sane MTU).
pub const MAX_PAYLOAD: usize = 1200;
/// Longest node name (the config allows 63 characters).
pub const MAX_NODE_NAME: usize = 63;
/// Default time between two heartbeats on a link.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(500);
/// Default silence on every link after which the peer is declared dead.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);

const MAGIC: [u8; 4] = *b"NBMH";
/// 2: the echo of the receiver's incarnation.
const VERSION: u8 = 2;
const MAC_LEN: usize = 32;
/// magic, version, link, name length, incarnation, seq, sent_ms, echo, payload length.
const FIXED_LEN: usize = 4 + 1 + 1 + 1 + 8 + 8 + 8 + 8 + 2;
/// Largest valid datagram.
pub const MAX_DATAGRAM: usize = FIXED_LEN + MAX_NODE_NAME + MAX_PAYLOAD + MAC_LEN;
/// Domain separation for the key derived from the configured secret.
const KEY_CONTEXT: &str = "nbdmirror 2026-11 heartbeat datagram v1";
/// How many replaced incarnations a receiver remembers (and refuses).
const RETIRED_INCARNATIONS: usize = 32;

/// The heartbeat key derived from the nodes' shared `secret`.
pub fn heartbeat_key(secret: &str) -> [u8; 32] {
    blake3::derive_key(KEY_CONTEXT, secret.as_bytes())
}

/// Why a datagram or a heartbeat set-up was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("datagram of {0} bytes is too short")]
    TooShort(usize),
    #[error("not a heartbeat (bad magic)")]
    BadMagic,
    #[error("heartbeat version {0} is not supported (this build speaks {VERSION})")]
    BadVersion(u8),
    #[error("heartbeat MAC does not match (different secret, or tampered)")]
    BadMac,
    #[error("malformed heartbeat: {0}")]
    Malformed(&'static str),
    #[error("node name must be 1-{MAX_NODE_NAME} bytes, got {0}")]
    NodeName(usize),
    #[error("heartbeat payload of {0} bytes exceeds {MAX_PAYLOAD}")]
    PayloadTooLarge(usize),
}

/// Errors of the heartbeat service.
#[derive(Debug, thiserror::Error)]
pub enum HeartbeatError {
    #[error("cannot bind heartbeat link {addr}: it is not an address of this host")]
    NotLocal { addr: SocketAddr },
    #[error("cannot bind heartbeat link {addr}: {reason}")]
    Bind { addr: SocketAddr, reason: String },
    #[error("heartbeat configuration: {0}")]
    Config(String),
    #[error("heartbeats need a running tokio runtime")]
    NoRuntime,
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// One heartbeat, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    /// The link it was sent on (index into the sender's links; both sides list links in the
    /// same order).
    pub link: u8,
    pub node: String,
    pub incarnation: u64,
    pub seq: u64,
    /// The sender's wall clock, milliseconds since the Unix epoch.
    pub sent_ms: u64,
    /// The receiver's incarnation as the sender last heard it (0: not heard yet).
    pub echo: u64,
    pub payload: Vec<u8>,
}

fn mac(key: &[u8; 32], bytes: &[u8]) -> [u8; 32] {
    *blake3::keyed_hash(key, bytes).as_bytes()
}

/// Encodes and MACs a heartbeat.
pub fn encode(key: &[u8; 32], d: &Datagram) -> Result<Vec<u8>, CodecError> {
    let name = d.node.as_bytes();
    if name.is_empty() || name.len() > MAX_NODE_NAME {
        return Err(CodecError::NodeName(name.len()));
    }
    if d.payload.len() > MAX_PAYLOAD {
        return Err(CodecError::PayloadTooLarge(d.payload.len()));
    }
    let mut out = Vec::with_capacity(FIXED_LEN + name.len() + d.payload.len() + MAC_LEN);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(d.link);
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.extend_from_slice(&d.incarnation.to_be_bytes());
    out.extend_from_slice(&d.seq.to_be_bytes());
    out.extend_from_slice(&d.sent_ms.to_be_bytes());
    out.extend_from_slice(&d.echo.to_be_bytes());
    out.extend_from_slice(&(d.payload.len() as u16).to_be_bytes());
    out.extend_from_slice(&d.payload);
    let tag = mac(key, &out);
    out.extend_from_slice(&tag);
    Ok(out)
}

/// A cursor over untrusted bytes: every read is bounds-checked.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        if self.buf.len() < n {
            return Err(CodecError::Malformed("truncated"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, CodecError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u64(&mut self) -> Result<u64, CodecError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }
}

/// Checks the MAC (in constant time) and decodes a heartbeat. Anything unauthenticated is
/// refused before a single field is trusted.
pub fn decode(key: &[u8; 32], bytes: &[u8]) -> Result<Datagram, CodecError> {
    if bytes.len() < FIXED_LEN + 1 + MAC_LEN {
        return Err(CodecError::TooShort(bytes.len()));
    }
    if bytes[..4] != MAGIC {
        return Err(CodecError::BadMagic);
    }
    if bytes[4] != VERSION {
        return Err(CodecError::BadVersion(bytes[4]));
    }
    let (body, tag) = bytes.split_at(bytes.len() - MAC_LEN);
    let mut received = [0u8; 32];
    received.copy_from_slice(tag);
    if blake3::Hash::from(mac(key, body)) != blake3::Hash::from(received) {
        return Err(CodecError::BadMac);
    }
    let mut r = Reader { buf: &body[5..] };
    let link = r.u8()?;
    let name_len = usize::from(r.u8()?);
    if name_len == 0 || name_len > MAX_NODE_NAME {
        return Err(CodecError::NodeName(name_len));
    }
    let node = std::str::from_utf8(r.take(name_len)?)
        .map_err(|_| CodecError::Malformed("node name is not UTF-8"))?
        .to_string();
    let incarnation = r.u64()?;
    let seq = r.u64()?;
    let sent_ms = r.u64()?;
    let echo = r.u64()?;
    let payload_len = usize::from(r.u16()?);
    if payload_len > MAX_PAYLOAD {
        return Err(CodecError::PayloadTooLarge(payload_len));
    }
    let payload = r.take(payload_len)?.to_vec();
    if !r.buf.is_empty() {
        return Err(CodecError::Malformed("trailing bytes"));
    }
    Ok(Datagram {
        link,
        node,
        incarnation,
        seq,
        sent_ms,
        echo,
        payload,
    })
}

/// What the replay filter says about an authenticated message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// The next message of the current incarnation.
    Next,
    /// The first message of a new incarnation (the sender restarted); the old one is retired.
    NewIncarnation,
    /// Sequence number not newer than the last accepted one of this incarnation.
    Replayed,
    /// An incarnation this receiver already saw replaced.
    Retired,
    /// A new incarnation whose clock is not later than the current one's, while the current
    /// one is still speaking: a recording of an older run.
    ClockBehind,
    /// A new incarnation that does not echo this receiver's: it may be a recording from
    /// before this run started. Accepted once it echoes (the sender heard us).
    Unconfirmed,
}

impl Freshness {
    pub fn accepted(self) -> bool {
        matches!(self, Freshness::Next | Freshness::NewIncarnation)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stream {
    incarnation: u64,
    last_seq: u64,
    last_sent_ms: u64,
}

/// Replay filter for one sender on one link (pure: no clock of its own).
#[derive(Debug, Clone, Default)]
pub struct ReplayGuard {
    current: Option<Stream>,
    retired: VecDeque<u64>,
}

impl ReplayGuard {
    pub fn new() -> ReplayGuard {
        ReplayGuard::default()
    }

    /// The incarnation currently accepted, if any.
    pub fn incarnation(&self) -> Option<u64> {
        self.current.map(|s| s.incarnation)
    }

    /// Judges an authenticated message and, when it is accepted, remembers it.
    /// `current_silent`: the current incarnation has been silent for the failure timeout
    /// (then a new incarnation is accepted even if the sender's clock went back).
    /// `echoes_us`: the message echoes this receiver's incarnation (required of a new one).
    pub fn check(
        &mut self,
        incarnation: u64,
        seq: u64,
        sent_ms: u64,
        current_silent: bool,
        echoes_us: bool,
    ) -> Freshness {
        match self.current {
            Some(ref mut cur) if cur.incarnation == incarnation => {
                if seq <= cur.last_seq {
                    return Freshness::Replayed;
                }
                cur.last_seq = seq;
                cur.last_sent_ms = cur.last_sent_ms.max(sent_ms);
                Freshness::Next
            }
            _ if self.retired.contains(&incarnation) => Freshness::Retired,
            _ if !echoes_us => Freshness::Unconfirmed,
            Some(cur) => {
                if sent_ms <= cur.last_sent_ms && !current_silent {
                    return Freshness::ClockBehind;
                }
                if self.retired.len() == RETIRED_INCARNATIONS {
                    self.retired.pop_front();
                }
                self.retired.push_back(cur.incarnation);
                self.current = Some(Stream {
                    incarnation,
                    last_seq: seq,
                    last_sent_ms: sent_ms,
                });
                Freshness::NewIncarnation
            }
            None => {
                self.current = Some(Stream {
                    incarnation,
                    last_seq: seq,
                    last_sent_ms: sent_ms,
                });
                Freshness::NewIncarnation
            }
        }
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Random bytes from the OS; if /dev/urandom cannot be read, a hash of the time, the process
/// id and a counter (unique within the process, which is all incarnations and nonces need:
/// the MAC key is the real secret).
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    use std::io::Read;
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut out = [0u8; N];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut out))
        .is_ok();
    if !ok {
        let mut h = blake3::Hasher::new();
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        h.update(&nanos.to_le_bytes());
        h.update(&std::process::id().to_le_bytes());
        h.update(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
        h.finalize_xof().fill(&mut out);
    }
    out
}

/// What the heartbeat service needs to know.
#[derive(Clone)]
pub struct HeartbeatSpec {
    /// This node's name (sent in every heartbeat).
    pub node: String,
    /// The peer's name, if known: heartbeats from any other name are dropped. `None` accepts
    /// any name except this node's own (which would be a reflection).
    pub peer: Option<String>,
    /// Links, in the same order on both nodes: (local address to bind, peer's address).
    pub links: Vec<(SocketAddr, SocketAddr)>,
    pub interval: Duration,
    pub timeout: Duration,
    /// From [`heartbeat_key`].
    pub key: [u8; 32],
}

impl HeartbeatSpec {
    /// A spec with the default interval (500 ms) and timeout (3 s), accepting any peer name.
    pub fn new(
        node: impl Into<String>,
        links: Vec<(SocketAddr, SocketAddr)>,
        key: [u8; 32],
    ) -> HeartbeatSpec {
        HeartbeatSpec {
            node: node.into(),
            peer: None,
            links,
            interval: DEFAULT_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
            key,
        }
    }
}

impl std::fmt::Debug for HeartbeatSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeartbeatSpec")
            .field("node", &self.node)
            .field("peer", &self.peer)
            .field("links", &self.links)
            .field("interval", &self.interval)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// What this node knows about its peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerView {
    /// Some link delivered a valid heartbeat within the timeout.
    pub alive: bool,
    /// The payload of the latest valid heartbeat (kept after the peer dies).
    pub last_payload: Option<Vec<u8>>,
    /// The peer's incarnation (changes when its daemon restarts).
    pub incarnation: Option<u64>,
    /// Per link: a valid heartbeat arrived on it within the timeout.
    pub links_up: Vec<bool>,
    /// When `alive` last changed (or the service started).
    pub since: Instant,
    /// The peer's node name, as it signs its heartbeats.
    pub node: Option<String>,
}

struct Shared {
    spec_node: String,
    /// This run's incarnation, which the peer must echo before a new run of it is accepted.
    own_incarnation: u64,
    /// The peer incarnation to echo on every link (one link may carry only one direction):
    /// the accepted one, or while the peer is not alive the one heard with the latest clock.
    heard: u64,
    /// The latest clock reading of `heard`, and when it was last heard: a recording (an
    /// older run, an earlier clock) cannot displace the live run, unless that run has been
    /// silent for the failure timeout (a peer whose clock went back across a restart).
    heard_ms: u64,
    heard_at: Option<Instant>,
    /// Per link, the highest sequence number of `heard` so far: only a newer one refreshes
    /// `heard_at`, so replaying a recorded run does not keep it from falling silent.
    heard_seq: Vec<u64>,
    /// (incarnation, sequence number) of the datagram whose payload the view holds: an
    /// older one, delivered late on another link, does not replace it.
    payload_from: Option<(u64, u64)>,
    /// The last sequence number this node sent, on any link (one counter for all links, so
    /// the peer can order payloads that took different links).
    sent_seq: u64,
    peer: Option<String>,
    timeout: Duration,
    guards: Vec<ReplayGuard>,
    last_seen: Vec<Option<Instant>>,
    view: watch::Sender<PeerView>,
}

impl Shared {
    fn link_up(&self, i: usize, now: Instant) -> bool {
        self.last_seen[i].is_some_and(|t| now.saturating_duration_since(t) < self.timeout)
    }

    /// Recomputes liveness and publishes the view if anything changed.
    fn refresh(&self, now: Instant, received: Option<&Datagram>) {
        let links_up: Vec<bool> = (0..self.last_seen.len())
            .map(|i| self.link_up(i, now))
            .collect();
        let alive = links_up.iter().any(|&u| u);
        self.view.send_if_modified(|v| {
            let mut changed = false;
            if v.alive != alive {
                v.alive = alive;
                v.since = now;
                changed = true;
                if alive {
                    info!(peer = ?received.map(|d| &d.node), "peer is alive (heartbeats arrive)");
                } else {
                    warn!(peer = ?v.node, timeout = ?self.timeout, "peer is dead: no heartbeat on any link");
                }
            }
            if v.links_up != links_up {
                for (i, (&old, &new)) in v.links_up.iter().zip(&links_up).enumerate() {
                    if old != new {
                        info!(link = i, up = new, "heartbeat link changed");
                    }
                }
                v.links_up = links_up;
                changed = true;
            }
            if let Some(d) = received {
                if v.last_payload.as_deref() != Some(&d.payload[..]) {
                    v.last_payload = Some(d.payload.clone());
                    changed = true;
                }
                if v.incarnation != Some(d.incarnation) {
                    v.incarnation = Some(d.incarnation);
                    changed = true;
                }
                if v.node.as_deref() != Some(&d.node) {
                    v.node = Some(d.node.clone());
                    changed = true;
                }
            }
            changed
        });
    }

    fn hear(&mut self, link: usize, d: &Datagram, now: Instant) {
        if d.incarnation == self.heard {
            if d.seq > self.heard_seq[link] {
                self.heard_seq[link] = d.seq;
                self.heard_ms = self.heard_ms.max(d.sent_ms);
                self.heard_at = Some(now);
            }
        } else {
            self.heard = d.incarnation;
            self.heard_seq.iter_mut().for_each(|s| *s = 0);
            self.heard_seq[link] = d.seq;
            self.heard_ms = d.sent_ms;
            self.heard_at = Some(now);
        }
    }

    /// Takes an authenticated datagram received on link `i`. Returns true when it is a new
    /// incarnation waiting for our echo: answering at once saves it an interval.
    fn accept(&mut self, i: usize, d: Datagram, from: SocketAddr, now: Instant) -> bool {
        if usize::from(d.link) != i {
            debug!(link = i, claimed = d.link, %from, "heartbeat for another link: dropped");
            return false;
        }
        if d.node == self.spec_node {
            debug!(link = i, %from, "heartbeat signed with our own name (reflection): dropped");
            return false;
        }
        if let Some(p) = &self.peer {
            if *p != d.node {
                debug!(link = i, node = %d.node, %from, "heartbeat from an unexpected node: dropped");
                return false;
            }
        }
        let silent = !self.link_up(i, now);
        let echoes_us = d.echo == self.own_incarnation;
        let verdict = self.guards[i].check(d.incarnation, d.seq, d.sent_ms, silent, echoes_us);
        let peer_alive = (0..self.last_seen.len()).any(|j| self.link_up(j, now));
        if verdict == Freshness::Unconfirmed && !peer_alive {
            // Echo it: if it is the peer's live run, its next datagram will echo ours.
            let displaces = d.incarnation == self.heard
                || d.sent_ms > self.heard_ms
                || self
                    .heard_at
                    .is_none_or(|t| now.saturating_duration_since(t) >= self.timeout);
            if !displaces {
                debug!(link = i, incarnation = d.incarnation, %from, "heartbeat of an older unconfirmed run: dropped");
                return false;
            }
            debug!(link = i, incarnation = d.incarnation, %from, "heartbeat of an unconfirmed run: echoing it");
            let prompt = self.heard != d.incarnation;
            self.hear(i, &d, now);
            return prompt;
        }
        if !verdict.accepted() {
            debug!(link = i, ?verdict, seq = d.seq, %from, "stale heartbeat: dropped");
            return false;
        }
        self.hear(i, &d, now);
        if verdict == Freshness::NewIncarnation {
            info!(link = i, node = %d.node, incarnation = d.incarnation, "peer incarnation on link");
        }
        self.last_seen[i] = Some(now);
        let newest = match self.payload_from {
            Some((inc, seq)) if inc == d.incarnation => d.seq > seq,
            // A link still on a run another link saw replaced: sent before the restart.
            Some(_) => verdict == Freshness::NewIncarnation,
            None => true,
        };
        if newest {
            self.payload_from = Some((d.incarnation, d.seq));
            self.refresh(now, Some(&d));
        } else {
            debug!(
                link = i,
                seq = d.seq,
                "heartbeat older than the payload held: alive, payload ignored"
            );
            self.refresh(now, None);
        }
        false
    }

    /// The next sequence number and the payload it carries, taken together under the lock so
    /// that numbers and payloads grow together across links.
    fn next_send(&mut self, payload: &mut watch::Receiver<Vec<u8>>) -> (u64, u64, Vec<u8>) {
        self.sent_seq += 1;
        (
            self.sent_seq,
            self.heard,
            payload.borrow_and_update().clone(),
        )
    }
}

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The running heartbeat service. Dropping it stops its tasks.
pub struct Heartbeats {
    payload: watch::Sender<Vec<u8>>,
    view: watch::Receiver<PeerView>,
    local_addrs: Vec<SocketAddr>,
    incarnation: u64,
    tasks: Vec<JoinHandle<()>>,
}

impl Heartbeats {
    /// Binds every link's socket (all or nothing), then starts sending and listening on the
    /// current tokio runtime.
    pub fn start(spec: HeartbeatSpec) -> Result<Heartbeats, HeartbeatError> {
        let handle =
            tokio::runtime::Handle::try_current().map_err(|_| HeartbeatError::NoRuntime)?;
        if spec.node.is_empty() || spec.node.len() > MAX_NODE_NAME {
            return Err(CodecError::NodeName(spec.node.len()).into());
        }
        if spec.links.is_empty() || spec.links.len() > usize::from(u8::MAX) + 1 {
            return Err(HeartbeatError::Config(format!(
                "need 1 to 256 links, got {}",
                spec.links.len()
            )));
        }
        if spec.interval.is_zero() || spec.timeout <= spec.interval {
            return Err(HeartbeatError::Config(format!(
                "timeout ({:?}) must be longer than a non-zero interval ({:?})",
                spec.timeout, spec.interval
            )));
        }
        let mut sockets = Vec::with_capacity(spec.links.len());
        for &(local, _) in &spec.links {
            let sock = std::net::UdpSocket::bind(local).map_err(|e| bind_error(local, &e))?;
            sock.set_nonblocking(true)
                .map_err(|e| bind_error(local, &e))?;
            sockets.push(sock);
        }
        let incarnation = u64::from_be_bytes(random_bytes::<8>());
        let now = Instant::now();
        let (view_tx, view_rx) = watch::channel(PeerView {
            alive: false,
            last_payload: None,
            incarnation: None,
            links_up: vec![false; spec.links.len()],
            since: now,
            node: None,
        });
        let (payload_tx, payload_rx) = watch::channel(Vec::new());
        let shared = Arc::new(Mutex::new(Shared {
            spec_node: spec.node.clone(),
            own_incarnation: incarnation,
            heard: 0,
            heard_ms: 0,
            heard_at: None,
            heard_seq: vec![0; spec.links.len()],
            payload_from: None,
            sent_seq: 0,
            peer: spec.peer.clone(),
            timeout: spec.timeout,
            guards: vec![ReplayGuard::new(); spec.links.len()],
            last_seen: vec![None; spec.links.len()],
            view: view_tx,
        }));
        let _enter = handle.enter();
        let mut local_addrs = Vec::new();
        let mut tasks = Vec::new();
        for (i, (sock, &(local, peer))) in sockets.into_iter().zip(&spec.links).enumerate() {
            let sock = UdpSocket::from_std(sock).map_err(|e| bind_error(local, &e))?;
            local_addrs.push(sock.local_addr().unwrap_or(local));
            let link = Link {
                index: i,
                sock,
                peer,
                node: spec.node.clone(),
                key: spec.key,
                incarnation,
                interval: spec.interval,
                payload: payload_rx.clone(),
                shared: shared.clone(),
            };
            tasks.push(tokio::spawn(link.run()));
        }
        tasks.push(tokio::spawn(watch_silence(shared, spec.interval)));
        info!(node = %spec.node, links = ?local_addrs, incarnation, "heartbeats started");
        Ok(Heartbeats {
            payload: payload_tx,
            view: view_rx,
            local_addrs,
            incarnation,
            tasks,
        })
    }

    /// Sets the payload of the next heartbeats (sent at once on every link).
    pub fn set_payload(&self, payload: Vec<u8>) -> Result<(), HeartbeatError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(CodecError::PayloadTooLarge(payload.len()).into());
        }
        self.payload.send_replace(payload);
        Ok(())
    }

    /// The peer's state, updated as heartbeats arrive or stop.
    pub fn subscribe(&self) -> watch::Receiver<PeerView> {
        self.view.clone()
    }

    /// The bound local addresses, per link (useful with port 0).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// This start's incarnation, as the peer sees it.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Stops sending and listening, and waits until the sockets are closed.
    pub async fn stop(mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

impl Drop for Heartbeats {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn bind_error(addr: SocketAddr, e: &std::io::Error) -> HeartbeatError {
    if e.kind() == std::io::ErrorKind::AddrNotAvailable {
        HeartbeatError::NotLocal { addr }
    } else {
        HeartbeatError::Bind {
            addr,
            reason: e.to_string(),
        }
    }
}

struct Link {
    index: usize,
    sock: UdpSocket,
    peer: SocketAddr,
    node: String,
    key: [u8; 32],
    incarnation: u64,
    interval: Duration,
    payload: watch::Receiver<Vec<u8>>,
    shared: Arc<Mutex<Shared>>,
}

impl Link {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut buf = vec![0u8; MAX_DATAGRAM + 1];
        let mut send_failing = false;
        let mut payload_open = true;
        let mut last_prompt: Option<Instant> = None;
        loop {
            let send_now = tokio::select! {
                _ = tick.tick() => true,
                r = self.payload.changed(), if payload_open => {
                    payload_open = r.is_ok();
                    payload_open
                }
                r = self.sock.recv_from(&mut buf) => {
                    match r {
                        // An echo wanted: answer now, at most four times an interval (a
                        // stream of recordings must not turn into a stream of sends).
                        Ok((n, from)) => self.received(&buf[..n], from)
                            && last_prompt.is_none_or(|t| t.elapsed() >= self.interval / 4)
                            && {
                                last_prompt = Some(Instant::now());
                                true
                            },
                        Err(e) => {
                            debug!(link = self.index, error = %e, "heartbeat receive error");
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            false
                        }
                    }
                }
            };
            if !send_now {
                continue;
            }
            let (seq, echo, payload) = lock(&self.shared).next_send(&mut self.payload);
            let d = Datagram {
                link: self.index as u8,
                node: self.node.clone(),
                incarnation: self.incarnation,
                seq,
                sent_ms: unix_ms(),
                echo,
                payload,
            };
            let bytes = match encode(&self.key, &d) {
                Ok(b) => b,
                Err(e) => {
                    warn!(link = self.index, error = %e, "cannot encode heartbeat");
                    continue;
                }
            };
            match self.sock.send_to(&bytes, self.peer).await {
                Ok(_) if send_failing => {
                    send_failing = false;
                    info!(link = self.index, peer = %self.peer, "heartbeats leave again");
                }
                Ok(_) => {}
                Err(e) if !send_failing => {
                    send_failing = true;
                    warn!(link = self.index, peer = %self.peer, error = %e, "cannot send heartbeat");
                }
                Err(_) => {}
            }
        }
    }

    /// Returns whether the sender waits for our echo.
    fn received(&self, bytes: &[u8], from: SocketAddr) -> bool {
        match decode(&self.key, bytes) {
            Ok(d) => lock(&self.shared).accept(self.index, d, from, Instant::now()),
            Err(e) => {
                debug!(link = self.index, %from, error = %e, "invalid heartbeat: dropped");
                false
            }
        }
    }
}

/// Declares links and the peer dead when heartbeats stop (checked twice per interval).
async fn watch_silence(shared: Arc<Mutex<Shared>>, interval: Duration) {
    let mut tick = tokio::time::interval((interval / 2).max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        lock(&shared).refresh(Instant::now(), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: [u8; 32] = [7; 32];

    fn sample() -> Datagram {
        Datagram {
            link: 1,
            node: "node-a".into(),
            incarnation: 42,
            seq: 9,
            sent_ms: 1_700_000_000_000,
            echo: 77,
            payload: b"role=primary gen=3".to_vec(),
        }
    }

    #[test]
    fn roundtrip_and_wrong_key() {
        let bytes = encode(&KEY, &sample()).expect("encode");
        assert_eq!(decode(&KEY, &bytes), Ok(sample()));
        assert_eq!(decode(&[8; 32], &bytes), Err(CodecError::BadMac));
        assert_eq!(
            decode(&heartbeat_key("0123456789abcdef"), &bytes),
            Err(CodecError::BadMac)
        );
    }

    #[test]
    fn refuses_bad_inputs() {
        let mut d = sample();
        d.payload = vec![0; MAX_PAYLOAD + 1];
        assert_eq!(
            encode(&KEY, &d),
            Err(CodecError::PayloadTooLarge(MAX_PAYLOAD + 1))
        );
        d.payload = vec![0; MAX_PAYLOAD];
        assert!(encode(&KEY, &d).is_ok());
        d.node = String::new();
        assert_eq!(encode(&KEY, &d), Err(CodecError::NodeName(0)));
        assert_eq!(decode(&KEY, b"short"), Err(CodecError::TooShort(5)));
        let mut bytes = encode(&KEY, &sample()).expect("encode");
        bytes[0] = b'X';
        assert_eq!(decode(&KEY, &bytes), Err(CodecError::BadMagic));
        let mut bytes = encode(&KEY, &sample()).expect("encode");
        bytes[4] = 1;
        assert_eq!(decode(&KEY, &bytes), Err(CodecError::BadVersion(1)));
    }

    #[test]
    fn replay_guard_rules() {
        let mut g = ReplayGuard::new();
        // A fresh receiver (just started) takes no run that has not echoed it: a recording
        // from before its start cannot.
        assert_eq!(g.check(1, 5, 100, true, false), Freshness::Unconfirmed);
        assert_eq!(g.incarnation(), None);
        assert_eq!(g.check(1, 5, 100, false, true), Freshness::NewIncarnation);
        assert_eq!(g.check(1, 5, 100, false, true), Freshness::Replayed);
        assert_eq!(g.check(1, 4, 100, false, true), Freshness::Replayed);
        // Within an accepted run, the echo no longer matters.
        assert_eq!(g.check(1, 6, 101, false, false), Freshness::Next);
        // A recording of an older run while the current one speaks.
        assert_eq!(g.check(2, 100, 50, false, true), Freshness::ClockBehind);
        // The peer restarted (later clock), and must echo us too.
        assert_eq!(g.check(3, 1, 200, true, false), Freshness::Unconfirmed);
        assert_eq!(g.check(3, 1, 200, false, true), Freshness::NewIncarnation);
        assert_eq!(g.incarnation(), Some(3));
        // The old run is refused from now on, even with a later clock or after silence.
        assert_eq!(g.check(1, 7, 300, true, true), Freshness::Retired);
        // Clock stepped back across a restart: accepted once the current run is silent.
        assert_eq!(g.check(4, 1, 10, false, true), Freshness::ClockBehind);
        assert_eq!(g.check(4, 1, 10, true, true), Freshness::NewIncarnation);
    }

    /// The receiving half of a service with `links` links, as node-a (incarnation 111).
    fn receiver(links: usize) -> (Shared, watch::Receiver<PeerView>) {
        let (view, rx) = watch::channel(PeerView {
            alive: false,
            last_payload: None,
            incarnation: None,
            links_up: vec![false; links],
            since: Instant::now(),
            node: None,
        });
        let shared = Shared {
            spec_node: "node-a".into(),
            own_incarnation: 111,
            heard: 0,
            heard_ms: 0,
            heard_at: None,
            heard_seq: vec![0; links],
            payload_from: None,
            sent_seq: 0,
            peer: None,
            timeout: DEFAULT_TIMEOUT,
            guards: vec![ReplayGuard::new(); links],
            last_seen: vec![None; links],
            view,
        };
        (shared, rx)
    }

    fn from_b(link: u8, incarnation: u64, seq: u64, payload: &[u8]) -> Datagram {
        Datagram {
            link,
            node: "node-b".into(),
            incarnation,
            seq,
            sent_ms: 1_000 * incarnation + seq,
            echo: 111,
            payload: payload.to_vec(),
        }
    }

    /// The peer hands a group over and becomes primary; its earlier "secondary, ready"
    /// heartbeat, delayed on the slower link, arrives after the "primary" one. Taking it
    /// would show two secondaries with equal data, and the preferred node would promote.
    #[test]
    fn a_late_heartbeat_on_another_link_does_not_roll_the_payload_back() {
        let (mut s, view) = receiver(2);
        let from: SocketAddr = "127.0.0.1:7791".parse().expect("addr");
        let t = Instant::now();
        let payload = |v: &watch::Receiver<PeerView>| v.borrow().last_payload.clone();
        s.accept(0, from_b(0, 5, 1, b"secondary ready"), from, t);
        assert_eq!(payload(&view).as_deref(), Some(&b"secondary ready"[..]));
        // Seq 2 (link 1, same payload) is delayed; seq 3 on link 0 says primary.
        s.accept(0, from_b(0, 5, 3, b"primary"), from, t);
        assert_eq!(payload(&view).as_deref(), Some(&b"primary"[..]));
        s.accept(1, from_b(1, 5, 2, b"secondary ready"), from, t);
        assert_eq!(
            payload(&view).as_deref(),
            Some(&b"primary"[..]),
            "an older payload from the slower link replaced a newer one"
        );
        // It still proves the link alive.
        assert_eq!(view.borrow().links_up, vec![true, true]);
        assert!(view.borrow().alive);
        // A newer datagram on either link moves the payload on.
        s.accept(1, from_b(1, 5, 4, b"primary, round 2"), from, t);
        assert_eq!(payload(&view).as_deref(), Some(&b"primary, round 2"[..]));
        s.accept(0, from_b(0, 5, 5, b"primary, round 3"), from, t);
        assert_eq!(payload(&view).as_deref(), Some(&b"primary, round 3"[..]));

        // The peer restarts (incarnation 6, seen on link 0 first); a datagram of the old run
        // still on its way on link 1 is not taken either, whatever its number.
        s.accept(0, from_b(0, 6, 1, b"restarted"), from, t);
        assert_eq!(payload(&view).as_deref(), Some(&b"restarted"[..]));
        assert_eq!(view.borrow().incarnation, Some(6));
        s.accept(1, from_b(1, 5, 9, b"old run"), from, t);
        assert_eq!(payload(&view).as_deref(), Some(&b"restarted"[..]));
        assert_eq!(view.borrow().incarnation, Some(6));
        s.accept(1, from_b(1, 6, 2, b"new run on link 1"), from, t);
        assert_eq!(payload(&view).as_deref(), Some(&b"new run on link 1"[..]));
    }

    /// The sender numbers all links' datagrams with one counter, each number taken with the
    /// payload it carries: a higher number never carries an older payload.
    #[test]
    fn one_counter_numbers_every_link() {
        let (mut s, _view) = receiver(2);
        let (tx, mut rx0) = watch::channel(b"v0".to_vec());
        let mut rx1 = tx.subscribe();
        let mut sent = Vec::new();
        for round in 1..=3u8 {
            sent.push(s.next_send(&mut rx0));
            tx.send_replace(vec![b'v', b'0' + round]);
            sent.push(s.next_send(&mut rx1));
        }
        for pair in sent.windows(2) {
            assert!(pair[1].0 > pair[0].0, "{sent:?}");
            assert!(pair[1].2 >= pair[0].2, "{sent:?}");
        }
    }

    proptest! {
        #[test]
        fn prop_roundtrip(link: u8, node in "[a-z0-9._-]{1,63}", incarnation: u64, seq: u64,
                          sent_ms: u64, echo: u64, payload in proptest::collection::vec(any::<u8>(), 0..=MAX_PAYLOAD)) {
            let d = Datagram { link, node, incarnation, seq, sent_ms, echo, payload };
            let bytes = encode(&KEY, &d).expect("encode");
            prop_assert!(bytes.len() <= MAX_DATAGRAM);
            prop_assert_eq!(decode(&KEY, &bytes), Ok(d));
        }

        #[test]
        fn prop_any_bit_flip_is_refused(bit in 0usize..10_000, payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut d = sample();
            d.payload = payload;
            let mut bytes = encode(&KEY, &d).expect("encode");
            let bit = bit % (bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(decode(&KEY, &bytes).is_err());
        }

        #[test]
        fn prop_truncation_or_extension_is_refused(cut in 1usize..200, extra in proptest::collection::vec(any::<u8>(), 1..8)) {
            let bytes = encode(&KEY, &sample()).expect("encode");
            let cut = cut.min(bytes.len());
            prop_assert!(decode(&KEY, &bytes[..bytes.len() - cut]).is_err());
            let mut longer = bytes.clone();
            longer.extend_from_slice(&extra);
            prop_assert!(decode(&KEY, &longer).is_err());
        }

        #[test]
        fn prop_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1400)) {
            prop_assert!(decode(&KEY, &bytes).is_err());
        }

        /// Whatever arrives, in whatever order: no (incarnation, seq) is accepted twice, and
        /// within an incarnation accepted sequence numbers strictly grow.
        #[test]
        fn prop_guard_never_accepts_a_replay(
            msgs in proptest::collection::vec((0u64..4, 0u64..20, 0u64..50, any::<bool>(), any::<bool>()), 0..200)
        ) {
            let mut g = ReplayGuard::new();
            let mut seen = std::collections::HashSet::new();
            let mut last: std::collections::HashMap<u64, u64> = Default::default();
            for (inc, seq, ms, silent, echoes) in msgs {
                let before = g.incarnation();
                if g.check(inc, seq, ms, silent, echoes).accepted() {
                    prop_assert!(echoes || before == Some(inc), "a new run ({inc}) accepted without our echo");
                    prop_assert!(seen.insert((inc, seq)), "accepted ({inc}, {seq}) twice");
                    if let Some(&prev) = last.get(&inc) {
                        prop_assert!(seq > prev);
                    }
                    last.insert(inc, seq);
                    prop_assert_eq!(g.incarnation(), Some(inc));
                }
            }
        }
    }
}
