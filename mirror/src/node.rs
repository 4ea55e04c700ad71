//! A node of the pair: its volumes, the replication listener, the dialers that keep a
//! connection to the peer per volume, and the NBD exports of the volumes it is primary for.
//!
//! Each volume lives on a thread of its own (a single-threaded runtime, its "home"): its
//! replication link (reader, writer, the peer's requests), its background maintenance and, by
//! default, its NBD connections. A mirrored write then goes from the client's socket to the
//! peer's and back without waking another thread: the acknowledgement is read by the thread
//! whose request waits for it. Handshakes, the control socket and failover stay on the node's
//! main runtime.

// Errors here are on the control path (start, promote), never per request: their size
// does not matter, and boxing them would only obscure the types.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nbd_server::{Export, ExportInfo, ListenAddr};
use serde::Serialize;
use tokio::io::BufReader;
use tokio::net::{lookup_host, TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::repl::auth::AuthKey;
use crate::repl::frame::Role;
use crate::repl::link::{self, Link};
use crate::volume::{ResyncOptions, Volume, VolumeError, VolumeSpec, VolumeStatus};
use crate::EngineKind;

#[derive(Debug, thiserror::Error)]
#[allow(clippy::result_large_err)]
pub enum NodeError {
    #[error("cannot listen for the peer on {addr}: {source}")]
    ReplicationBind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// The name asked for, and the volumes this node has (comma-separated).
    #[error("no volume named {0:?} on this node (volumes here: {1})")]
    UnknownVolume(String, String),
    #[error("volume {volume}: cannot export: {reason}")]
    Export { volume: String, reason: String },
    #[error("volume {volume}: cannot start its thread: {source}")]
    Thread {
        volume: String,
        #[source]
        source: std::io::Error,
    },
}

pub struct NodeSpec {
    pub node: String,
    pub secret: String,
    pub replication_listen: String,
    pub peer: String,
    /// Silence on the link longer than this declares the peer gone.
    pub peer_timeout: Duration,
    /// Longest a write the peer acknowledged may wait for a peer flush when no FLUSH from a
    /// client came first (see `Volume::background_maintenance`).
    pub peer_flush_interval: Duration,
    pub resync: ResyncOptions,
    pub engine: EngineKind,
    /// NBD data-plane threads per export besides the volume's home thread; 0 serves the
    /// connections on the home thread, next to the replication link.
    pub threads: usize,
    pub volumes: Vec<(VolumeSpec, Vec<ListenAddr>)>,
}

struct RunningExport {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

pub struct Node {
    pub name: String,
    peer_addr: String,
    key: AuthKey,
    /// When a refused replication connection was last logged as a warning.
    refusal_said: std::sync::Mutex<Option<Instant>>,
    peer_timeout: Duration,
    threads: usize,
    volumes: Vec<Hosted>,
    exports: tokio::sync::Mutex<HashMap<String, RunningExport>>,
}

struct Hosted {
    vol: Arc<Volume>,
    listen: Vec<ListenAddr>,
    home: Home,
}

/// How a dial to the peer failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dial {
    /// No connection (the peer is down or the network is): a normal state.
    Unreachable,
    /// The peer address is a name that does not resolve.
    Unresolvable,
    /// The peer answered and refused the handshake.
    Refused,
}

/// What a refused handshake means to the operator of the dialing node.
fn describe_refusal(e: &link::HandshakeError) -> String {
    match e {
        link::HandshakeError::BadProof => {
            "authentication failed: the peer does not know this node's shared secret \
             (is `secret` the same on both nodes?)"
                .to_string()
        }
        link::HandshakeError::Refused(why) if why.contains("authentication") => {
            format!("the peer refused: {why} (is `secret` the same on both nodes?)")
        }
        other => other.to_string(),
    }
}

/// A volume's home thread. Dropping it ends the thread's runtime (and the tasks on it).
struct Home {
    handle: tokio::runtime::Handle,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Home {
    fn start(volume: &str) -> Result<Home, NodeError> {
        let failed = |source: std::io::Error| NodeError::Thread {
            volume: volume.to_string(),
            source,
        };
        let runtime = nbd_server::spin::install(&mut tokio::runtime::Builder::new_current_thread())
            .enable_all()
            .build()
            .map_err(failed)?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("vol-{volume}"))
            .spawn(move || {
                let _ = runtime.block_on(stopped);
            })
            .map_err(failed)?;
        Ok(Home {
            handle,
            _stop: stop,
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    pub node: String,
    pub peer_address: String,
    pub volumes: Vec<VolumeStatus>,
}

/// Memory the peer's requests being handled may hold at once, in KiB (their data, what a
/// compressed chunk expands to, what a hash request reads). Our own primary stays far below
/// (a client's queue, the resync window); a confused one is slowed down, not let to exhaust
/// this node's memory.
const PEER_REQUEST_BUDGET_KIB: u32 = 256 << 10;

/// A request's share of [`PEER_REQUEST_BUDGET_KIB`].
fn request_cost_kib(m: &crate::repl::frame::Message) -> u32 {
    use crate::repl::frame::Message;
    let bytes: u64 = match m {
        Message::Write { data, .. } => data.len() as u64,
        Message::ResyncData { raw_len, .. } => u64::from(*raw_len),
        Message::ResyncHash { length, .. } | Message::HashRequest { length, .. } => {
            (*length).min(crate::volume::HASH_BLOCK_MAX)
        }
        _ => 0,
    };
    (bytes / 1024 + 1).min(u64::from(PEER_REQUEST_BUDGET_KIB)) as u32
}

/// Handles one request of the peer as its own task, holding its share of the budget. The
/// task is counted on its link until it ends, so a newer link of the volume is served only
/// after it (`Volume::link_up`); a request read from a link already closed is dropped
/// unapplied (the peer got no answer: it counts the request as lost).
fn spawn_peer_request(
    vol: &Arc<Volume>,
    link: &Arc<Link>,
    seq: u64,
    m: crate::repl::frame::Message,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let Some(answering) = link.answering() else {
        debug!(volume = %vol.name, peer = %link.peer_node, seq, "a request read from a closed link; dropped");
        return;
    };
    // Counted from its arrival, so a flush knows whether it is alone, and so the answers to
    // a burst of requests read from one buffer queue up and leave in one write, not a send()
    // each: the secondary spent a third of its CPU at queue depth 32 sending acks one by one.
    // A secondary's thread polls longer for the next mirrored write (see
    // `spin::DEFAULT_REPLICA_SPIN_US`). A resync or verify is bulk traffic that waits for the
    // disk, where a long poll would only take CPU from the source: the short poll. (Pings
    // and state frames are handled by the reader and never come here.)
    use crate::repl::frame::Message;
    let serving = match m {
        Message::Write { .. } | Message::Trim { .. } | Message::Zeroes { .. } | Message::Flush => {
            nbd_server::spin::serving_replica()
        }
        Message::ResyncStart { .. }
        | Message::ResyncData { .. }
        | Message::ResyncZero { .. }
        | Message::ResyncHash { .. }
        | Message::ResyncDone { .. }
        | Message::HashRequest { .. } => nbd_server::spin::serving_client(),
        _ => nbd_server::spin::serving(),
    };
    let request = vol.clone().handle_request(link.clone(), seq, m);
    tokio::spawn(async move {
        request.await;
        drop(answering);
        drop(serving);
        drop(permit);
    });
}

/// Waits for `cost` of a link's request budget. Past `limit` (the request timeout) it closes
/// the link and returns `None`: the wait only lasts while requests that arrived before it
/// hold the budget, unanswered (the reader starts none meanwhile), so one of them has then
/// been in service longer than the peer waits for an answer (both nodes derive it from
/// `peer_timeout`), and the peer has closed the link on its side. The reader, which reads
/// nothing while it waits, would not see that end: without this, a node that dials would not
/// dial again while its disk is stuck. Closing early is safe anyway: the peer records what
/// it got no answer for as dirty, and the next link waits for the tasks still in service.
async fn wait_for_budget(
    volume: &str,
    link: &Arc<Link>,
    budget: Arc<tokio::sync::Semaphore>,
    cost: u32,
    limit: Duration,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    match tokio::time::timeout(limit, budget.acquire_many_owned(cost)).await {
        Ok(permit) => permit.ok(),
        Err(_) => {
            warn!(volume, peer = %link.peer_node, waited = ?limit, in_service = link.requests_in_service(),
                  "the peer's requests have held this node's request budget longer than the peer waits for an answer (a slow or hung disk?); link closed");
            link.close();
            None
        }
    }
}

/// Most replication connections waiting for their handshake at once. Each holds a task, a
/// socket and up to `HANDSHAKE_MAX_BODY` bytes until the handshake timeout; past the cap the
/// oldest connection from the address with the most waiting is dropped to make room, never
/// one from the configured peer's address while others wait. Idle connections cannot pile
/// up, and a flood (from one host or many) cannot push out the real peer's, which besides
/// completes its handshake within a round trip.
const PENDING_HANDSHAKES_MAX: usize = 64;

/// The handshakes in progress, oldest first, each with its source and the signal that drops
/// it.
#[derive(Default)]
struct PendingHandshakes {
    next_ticket: u64,
    queue: std::collections::VecDeque<(u64, std::net::IpAddr, tokio::sync::oneshot::Sender<()>)>,
}

impl PendingHandshakes {
    /// Registers a new handshake from `source`, first dropping, while `max` are waiting, the
    /// oldest one from the source with the most waiting (the new one counted), other than
    /// `protected` (the configured peer's address) unless only it is waiting. Returns its
    /// ticket, the receiver that fires when it is dropped in turn, and whether one was
    /// dropped.
    fn admit(
        &mut self,
        max: usize,
        source: std::net::IpAddr,
        protected: Option<std::net::IpAddr>,
    ) -> (u64, tokio::sync::oneshot::Receiver<()>, bool) {
        let mut dropped = false;
        while self.queue.len() >= max.max(1) {
            let mut counts: HashMap<std::net::IpAddr, usize> = HashMap::new();
            *counts.entry(source).or_default() += 1;
            for (_, ip, _) in &self.queue {
                *counts.entry(*ip).or_default() += 1;
            }
            let busiest = counts
                .iter()
                .filter(|(ip, _)| Some(**ip) != protected)
                .map(|(_, n)| *n)
                .max();
            // The oldest entry among the busiest sources' (the new one is not queued yet;
            // when it alone is the busiest, or only the peer's wait, the oldest of all goes).
            let at = self
                .queue
                .iter()
                .position(|(_, ip, _)| Some(*ip) != protected && counts.get(ip).copied() == busiest)
                .unwrap_or(0);
            match self.queue.remove(at) {
                Some((_, _, evict)) => {
                    let _ = evict.send(());
                    dropped = true;
                }
                None => break,
            }
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let (evict, evicted) = tokio::sync::oneshot::channel();
        self.queue.push_back((ticket, source, evict));
        (ticket, evicted, dropped)
    }

    /// The handshake ended (either way): it no longer counts.
    fn done(&mut self, ticket: u64) {
        self.queue.retain(|(t, _, _)| *t != ticket);
    }
}

/// A link that lasted less than this ended as if the peer had refused the handshake.
const STABLE_LINK: Duration = Duration::from_secs(2);

/// The pause before the first new attempt to reach the peer.
const DIAL_RETRY_FIRST: Duration = Duration::from_millis(50);

/// The pause before the next attempt to reach the peer, after one that failed: doubling from
/// [`DIAL_RETRY_FIRST`]. While the connect itself fails (the peer's daemon is not up yet) at
/// most 250 ms: the resync a restarted peer needs cannot start before it is reached, and a
/// one-second cap kept it waiting half a second on average; a refused connect costs nothing,
/// and one to a host that is down waits out its timeout anyway. A peer that was reached but
/// refused the handshake (wrong secret, unknown volume) will not change its mind in
/// milliseconds: at most a second, so its log is not flooded.
fn next_dial_pause(previous: Duration, reached: bool) -> Duration {
    let cap = if reached {
        Duration::from_secs(1)
    } else {
        Duration::from_millis(250)
    };
    (previous * 2).min(cap)
}

/// Whether this node dials its peer (the other accepts), so the two never race to build two
/// links. Both decide from the same pair of addresses: the lower one dials. A wildcard listen
/// address (0.0.0.0) stands for the local address that routes to the peer, found with an
/// unconnected-UDP lookup that sends nothing.
pub fn should_dial(listen: &str, peer: &str) -> bool {
    use std::net::{SocketAddr, UdpSocket};
    let (Ok(mut mine), Ok(theirs)) = (listen.parse::<SocketAddr>(), peer.parse::<SocketAddr>())
    else {
        return listen < peer;
    };
    if mine.ip().is_unspecified() {
        let local = UdpSocket::bind(SocketAddr::new(mine.ip(), 0))
            .and_then(|u| u.connect(theirs).map(|_| u))
            .and_then(|u| u.local_addr());
        if let Ok(l) = local {
            mine.set_ip(l.ip());
        }
    }
    (mine.ip(), mine.port()) < (theirs.ip(), theirs.port())
}

impl Node {
    /// Binds the replication port, opens every volume (secondary), and starts talking to the
    /// peer. Binding comes first so a wrong address fails before anything else happens.
    pub async fn start(spec: NodeSpec) -> Result<Arc<Node>, NodeError> {
        let listener = TcpListener::bind(&spec.replication_listen)
            .await
            .map_err(|source| NodeError::ReplicationBind {
                addr: spec.replication_listen.clone(),
                source,
            })?;
        let mut volumes = Vec::new();
        for (vs, listen) in spec.volumes {
            let home = Home::start(&vs.name)?;
            volumes.push(Hosted {
                vol: Volume::open(vs, spec.resync)?,
                listen,
                home,
            });
        }
        let node = Arc::new(Node {
            name: spec.node.clone(),
            peer_addr: spec.peer.clone(),
            key: AuthKey::from_secret(&spec.secret),
            refusal_said: std::sync::Mutex::new(None),
            peer_timeout: spec.peer_timeout,
            threads: spec.threads,
            volumes,
            exports: tokio::sync::Mutex::new(HashMap::new()),
        });
        info!(node = %node.name, replication = %spec.replication_listen, peer = %spec.peer, "replication listening");
        tokio::spawn(node.clone().accept_loop(listener));
        // One side dials, the other accepts, so the two never race to build two links. Both
        // compute the same answer from the two addresses in their configs.
        let dial = should_dial(&spec.replication_listen, &spec.peer);
        for h in &node.volumes {
            if dial {
                tokio::spawn(node.clone().dial_loop(h.vol.clone()));
            }
            h.home.handle.spawn(
                h.vol
                    .clone()
                    .background_maintenance(spec.peer_flush_interval),
            );
        }
        Ok(node)
    }

    fn hosted(&self, name: &str) -> Result<&Hosted, NodeError> {
        self.volumes
            .iter()
            .find(|h| h.vol.name == name)
            .ok_or_else(|| {
                let here: Vec<&str> = self.volumes.iter().map(|h| h.vol.name.as_str()).collect();
                NodeError::UnknownVolume(name.to_string(), here.join(", "))
            })
    }

    pub fn volume(&self, name: &str) -> Result<&Arc<Volume>, NodeError> {
        self.hosted(name).map(|h| &h.vol)
    }

    pub fn status(&self) -> NodeStatus {
        NodeStatus {
            node: self.name.clone(),
            peer_address: self.peer_addr.clone(),
            volumes: self.volumes.iter().map(|h| h.vol.status()).collect(),
        }
    }

    /// Promotes a volume and starts its NBD export.
    pub async fn promote(&self, name: &str, force: bool) -> Result<Option<String>, NodeError> {
        let vol = self.volume(name)?.clone();
        let mut exports = self.exports.lock().await;
        let warning = vol.promote(force).await?;
        if !exports.contains_key(name) {
            match self.start_export(&vol).await {
                Ok(e) => {
                    exports.insert(name.to_string(), e);
                }
                Err(e) => {
                    // Without an export the primary role is useless and blocks the peer.
                    let _ = vol.demote().await;
                    return Err(e);
                }
            }
        }
        Ok(warning)
    }

    /// Binds the volume's NBD addresses and serves them, both on the volume's home thread (a
    /// socket belongs to the reactor of the runtime that made it).
    async fn start_export(&self, vol: &Arc<Volume>) -> Result<RunningExport, NodeError> {
        let hosted = self.hosted(&vol.name)?;
        let listen = hosted.listen.clone();
        let info = ExportInfo {
            name: vol.name.clone(),
            description: format!("nbdmirror volume {} (primary on {})", vol.name, self.name),
            size: nbd_server::BlockBackend::size(vol.as_ref()),
            base_flags: nbd_server::transmission_flags(false),
        };
        let (stop, stop_rx) = watch::channel(false);
        let exports = vec![Export {
            info,
            backend: vol.clone(),
        }];
        let threads = self.threads;
        let started = hosted.home.handle.spawn(async move {
            let listeners = nbd_server::bind_all(&listen).await?;
            let infos: Vec<ExportInfo> = exports.iter().map(|e| e.info.clone()).collect();
            nbd_server::server::log_listening(&listeners, &infos);
            Ok::<_, nbd_server::ServerError>(tokio::spawn(nbd_server::serve(
                listeners, exports, stop_rx, threads,
            )))
        });
        let failed = |reason: String| NodeError::Export {
            volume: vol.name.clone(),
            reason,
        };
        let task = started
            .await
            .map_err(|e| failed(format!("its thread is gone ({e})")))?
            .map_err(|e| failed(e.to_string()))?;
        Ok(RunningExport { stop, task })
    }

    /// Stops the export (clients are disconnected after their requests finish), then demotes.
    pub async fn demote(&self, name: &str) -> Result<(), NodeError> {
        let vol = self.volume(name)?.clone();
        vol.begin_demote();
        let mut exports = self.exports.lock().await;
        if let Some(e) = exports.remove(name) {
            let _ = e.stop.send(true);
            let _ = e.task.await;
            info!(volume = %name, "export stopped");
        }
        vol.demote().await?;
        Ok(())
    }

    pub async fn shutdown(&self) {
        // As a demotion does: writes held waiting for the witness's permission to be
        // acknowledged alone fail now (never acknowledged) instead of holding their
        // connections, which run their requests to the end before they close; and no
        // promotion (the failover logic still runs) undoes that.
        for h in &self.volumes {
            h.vol.begin_shutdown();
        }
        let mut exports = self.exports.lock().await;
        for (name, e) in exports.drain() {
            let _ = e.stop.send(true);
            let _ = e.task.await;
            info!(volume = %name, "export stopped");
        }
        // Together: each may wait for its peer's final flush.
        futures::future::join_all(self.volumes.iter().map(|h| h.vol.shutdown())).await;
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        let pending = Arc::new(std::sync::Mutex::new(PendingHandshakes::default()));
        // A name (not an address) is not protected: resolving it here would be a guess.
        // Canonical: a dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d.
        let peer_ip = self
            .peer_addr
            .parse::<std::net::SocketAddr>()
            .ok()
            .map(|a| a.ip().to_canonical());
        let mut last_flood_warning: Option<Instant> = None;
        loop {
            let (stream, addr) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "accept on the replication port failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (ticket, mut evicted) = {
                let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
                let (ticket, evicted, dropped_one) =
                    p.admit(PENDING_HANDSHAKES_MAX, addr.ip().to_canonical(), peer_ip);
                if dropped_one
                    && last_flood_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
                {
                    last_flood_warning = Some(Instant::now());
                    warn!(%addr, max = PENDING_HANDSHAKES_MAX, "too many replication connections waiting for their handshake: dropping the oldest (a flood on the replication port?); said once a minute");
                }
                (ticket, evicted)
            };
            let node = self.clone();
            let pending = pending.clone();
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                let mut stream = stream;
                let names: Vec<String> = node.volumes.iter().map(|h| h.vol.name.clone()).collect();
                let handshake = tokio::select! {
                    r = link::accept_handshake(&mut stream, &node.key, &node.name, |v| {
                        names.iter().any(|n| n == v)
                    }) => Some(r),
                    _ = &mut evicted => None,
                };
                pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .done(ticket);
                let Some(handshake) = handshake else {
                    debug!(%addr, "unauthenticated replication connection dropped to make room");
                    return;
                };
                match handshake {
                    Ok(acc) => {
                        let Ok(vol) = node.volume(&acc.volume).cloned() else {
                            return;
                        };
                        info!(volume = %acc.volume, peer = %acc.peer.peer_node, %addr, protocol = acc.peer.version, "peer authenticated");
                        node.run_connection(vol, stream, acc.peer.peer_node).await;
                    }
                    Err(e) => {
                        let from_peer = peer_ip.is_some_and(|ip| ip == addr.ip().to_canonical());
                        let problem = match &e {
                            link::HandshakeError::BadProof => Some(
                                "a connection from the peer failed authentication: \
                                 is `secret` the same on both nodes?"
                                    .to_string(),
                            ),
                            link::HandshakeError::NoCommonVersion { .. } => Some(e.to_string()),
                            // The dialer checks this node's proof first: a peer that hangs
                            // up then holds another secret.
                            link::HandshakeError::Io(io)
                                if from_peer && io.kind() == std::io::ErrorKind::UnexpectedEof =>
                            {
                                Some(
                                    "the peer hung up during authentication: \
                                     is `secret` the same on both nodes?"
                                        .to_string(),
                                )
                            }
                            _ => None,
                        };
                        if let Some(problem) = &problem {
                            for h in &node.volumes {
                                h.vol.note_link_problem(problem);
                            }
                        }
                        let mut said = node.refusal_said.lock().unwrap_or_else(|e| e.into_inner());
                        if said.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                            *said = Some(Instant::now());
                            warn!(%addr, error = %e, hint = problem.as_deref().unwrap_or(""), "replication connection refused; said once a minute");
                        } else {
                            debug!(%addr, error = %e, "replication connection refused");
                        }
                    }
                }
            });
        }
    }

    async fn dial_loop(self: Arc<Self>, vol: Arc<Volume>) {
        let mut last_said: Option<Instant> = None;
        let mut pause = DIAL_RETRY_FIRST;
        loop {
            let attempt = async {
                // Resolved apart, so a name that does not resolve (a typo) is told from a
                // peer that is down.
                let addrs: Vec<std::net::SocketAddr> =
                    tokio::time::timeout(Duration::from_secs(5), lookup_host(&self.peer_addr))
                        .await
                        .map_err(|_| (Dial::Unresolvable, "name lookup timed out".to_string()))?
                        .map_err(|e| {
                            (
                                Dial::Unresolvable,
                                format!("cannot resolve the peer address: {e}"),
                            )
                        })?
                        .collect();
                let mut s =
                    tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&addrs[..]))
                        .await
                        .map_err(|_| (Dial::Unreachable, "connect timed out".to_string()))?
                        .map_err(|e| (Dial::Unreachable, e.to_string()))?;
                let _ = s.set_nodelay(true);
                let peer = link::dial_handshake(&mut s, &self.key, &self.name, &vol.name)
                    .await
                    .map_err(|e| (Dial::Refused, describe_refusal(&e)))?;
                Ok::<_, (Dial, String)>((s, peer))
            };
            match attempt.await {
                Ok((s, peer)) => {
                    last_said = None;
                    info!(volume = %vol.name, peer = %peer.peer_node, addr = %self.peer_addr, protocol = peer.version, "connected to the peer");
                    let since = Instant::now();
                    self.run_connection(vol.clone(), s, peer.peer_node).await;
                    // A link that ends right after the handshake (the peer refuses our volume's
                    // size, a bad frame) would otherwise be rebuilt 20 times a second, with a
                    // state exchange and log lines on both nodes each time: back off as after
                    // a refused handshake.
                    pause = if since.elapsed() < STABLE_LINK {
                        next_dial_pause(pause, true)
                    } else {
                        DIAL_RETRY_FIRST
                    };
                }
                Err((failure, e)) => {
                    // A peer that answered but refused (another secret, another version), or
                    // a name that does not resolve, is a configuration to fix: a warning, and
                    // the status says it. A peer that is down is a normal state. Either is
                    // said once, then once a minute.
                    let reached = failure == Dial::Refused;
                    let to_fix = failure != Dial::Unreachable;
                    if to_fix {
                        vol.note_link_problem(&e);
                    }
                    if last_said.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                        if to_fix {
                            warn!(volume = %vol.name, addr = %self.peer_addr, error = %e, "the replication link to the peer cannot be set up; retrying (said once a minute)");
                        } else {
                            info!(volume = %vol.name, addr = %self.peer_addr, error = %e, "cannot reach the peer; retrying");
                        }
                        last_said = Some(Instant::now());
                    } else {
                        debug!(volume = %vol.name, error = %e, "peer still unreachable");
                    }
                    pause = next_dial_pause(pause, reached);
                }
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// Runs an authenticated link on the volume's home thread until it ends.
    async fn run_connection(
        self: &Arc<Self>,
        vol: Arc<Volume>,
        stream: TcpStream,
        peer_node: String,
    ) {
        let home = match self.hosted(&vol.name) {
            Ok(h) => h.home.handle.clone(),
            Err(_) => return,
        };
        // The socket leaves this runtime's reactor and joins the home thread's.
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                warn!(volume = %vol.name, error = %e, "cannot hand the replication socket to the volume's thread");
                return;
            }
        };
        let node = self.clone();
        let session = home.spawn(async move {
            match TcpStream::from_std(stream) {
                Ok(s) => node.link_session(vol, s, peer_node).await,
                Err(e) => {
                    warn!(volume = %vol.name, error = %e, "cannot adopt the replication socket");
                }
            }
        });
        let _ = session.await;
    }

    async fn link_session(&self, vol: Arc<Volume>, stream: TcpStream, peer_node: String) {
        // A second descriptor of the same (non-blocking) socket, for senders that write
        // their frames themselves; without it, every frame goes through the writer task.
        let direct = match stream.as_fd().try_clone_to_owned() {
            Ok(fd) => Some(std::net::TcpStream::from(fd)),
            Err(e) => {
                debug!(volume = %vol.name, error = %e, "no direct socket handle; frames go through the writer task");
                None
            }
        };
        // Peer answers are polled for a moment before this thread sleeps (nbd_server::spin);
        // the guard holds a duplicate descriptor and drops with this session.
        let _watch = nbd_server::spin::watch(&stream)
            .map_err(|e| debug!(volume = %vol.name, error = %e, "replication socket not polled before sleeping"));
        let (rd, wr) = stream.into_split();
        // A request unanswered for this long means a wedged peer (its disk hangs): give up on
        // it and go on alone rather than stall the VM.
        let request_timeout = (self.peer_timeout * 6).max(Duration::from_secs(10));
        let link = Link::new(peer_node, request_timeout, direct);
        tokio::spawn(link::writer_task(link.clone(), wr));
        tokio::spawn(link::pinger(
            link.clone(),
            (self.peer_timeout / 4).max(Duration::from_millis(100)),
        ));
        // Returns once no request of an older link of this volume is in service here any
        // more (or this link closed meanwhile); only then are this link's frames read.
        vol.link_up(link.clone()).await;
        let (v, l) = (vol.clone(), link.clone());
        let budget = Arc::new(tokio::sync::Semaphore::new(
            PEER_REQUEST_BUDGET_KIB as usize,
        ));
        let end = link::reader_loop(
            &link,
            BufReader::with_capacity(256 * 1024, rd),
            self.peer_timeout,
            |seq, m| {
                let blocked = match m {
                    // State changes are applied in order, inline.
                    crate::repl::frame::Message::State(s) => {
                        v.peer_state(&l, s);
                        None
                    }
                    m => {
                        let cost = request_cost_kib(&m);
                        match budget.clone().try_acquire_many_owned(cost) {
                            Ok(permit) => {
                                spawn_peer_request(&v, &l, seq, m, permit);
                                None
                            }
                            Err(_) => Some((v.clone(), l.clone(), budget.clone(), m, cost)),
                        }
                    }
                };
                async move {
                    // Over budget: the reader waits here, so the peer's frames wait in the
                    // socket (and TCP slows the peer) instead of in this node's memory. It
                    // then reads nothing, not even the end of the connection: it stops when
                    // the link closes (`reader_loop` watches that): a newer link replacing
                    // it, the writer failing on a socket the peer closed, or the wait
                    // outlasting the request timeout (`wait_for_budget`). The request it
                    // holds is then dropped (a closed link takes none), and the tasks
                    // already started stay counted on the link until they end.
                    if let Some((v, l, budget, m, cost)) = blocked {
                        if let Some(permit) =
                            wait_for_budget(&v.name, &l, budget, cost, request_timeout).await
                        {
                            spawn_peer_request(&v, &l, seq, m, permit);
                        }
                    }
                }
            },
        )
        .await;
        if let link::ReadEnd::Error(e) = &end {
            warn!(volume = %vol.name, peer = %link.peer_node, error = %e, "bad frame from the peer; link closed");
        }
        vol.link_down(&link, &end.to_string()).await;
        if vol.role() == Role::Primary && !vol.is_shutting_down() {
            info!(volume = %vol.name, "the primary keeps serving alone; changes are tracked in the dirty map");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{
        next_dial_pause, request_cost_kib, should_dial, PendingHandshakes, DIAL_RETRY_FIRST,
        PEER_REQUEST_BUDGET_KIB,
    };
    use crate::repl::frame::Message;
    use std::time::Duration;
    use tokio::sync::oneshot::error::TryRecvError;

    /// A node with no volume of its own, for driving `link_session` directly.
    fn session_node() -> std::sync::Arc<super::Node> {
        std::sync::Arc::new(super::Node {
            name: "b".into(),
            peer_addr: "127.0.0.1:9".into(),
            key: crate::repl::auth::AuthKey::from_secret("a secret of the pair, long enough"),
            refusal_said: std::sync::Mutex::new(None),
            peer_timeout: Duration::from_secs(10),
            threads: 0,
            volumes: Vec::new(),
            exports: tokio::sync::Mutex::new(std::collections::HashMap::new()),
        })
    }

    /// A loopback connection: (this node's end, the test's end playing the primary).
    async fn loopback() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("address");
        let (theirs, ours) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        (ours.expect("accept").0, theirs.expect("connect"))
    }

    /// The next frame other than a ping or pong before `deadline`, if any.
    async fn next_frame<R: tokio::io::AsyncRead + Unpin>(
        rd: &mut R,
        deadline: tokio::time::Instant,
    ) -> Option<(u64, Message)> {
        loop {
            match tokio::time::timeout_at(deadline, crate::repl::link::read_frame(rd)).await {
                Err(_) => return None,
                Ok(Ok(Some((_, Message::Ping | Message::Pong)))) => {}
                Ok(Ok(Some((h, m)))) => return Some((h.seq, m)),
                Ok(other) => panic!("the link ended: {:?}", other.err()),
            }
        }
    }

    /// The secondary's side of the reviewer's interleaving: the primary's write W1 on link 1
    /// stalls on this node's disk; the primary gives up on link 1 and writes W2 to the same
    /// range over link 2 (as its resync chunk would). W2 must not reach the image before W1
    /// ended, or W1 lands over it and the copies differ with no dirty bit on either side.
    /// Twice: link 1 ended here first (its reader saw the end of the connection), and link 1
    /// still open here (a reader blocked on the request budget never sees that end), where
    /// link 2's arrival must close it.
    #[test]
    fn a_new_links_write_waits_for_the_old_links_stalled_write() {
        for old_link_ended_first in [true, false] {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(stale_write_case(old_link_ended_first));
        }
    }

    async fn stale_write_case(old_link_ended_first: bool) {
        use crate::repl::link::write_message;
        use tokio::time::Instant;
        const AT: u64 = 1 << 20;
        const LEN: usize = 64 << 10;
        let dir = tempfile::tempdir().expect("temporary folder");
        let vol = crate::volume::Volume::open_for_tests(dir.path(), "b");
        let node = session_node();
        let session = |stream| {
            let (node, vol) = (node.clone(), vol.clone());
            tokio::spawn(async move { node.link_session(vol, stream, "a".into()).await })
        };

        // Link 1: this node announces its state; W1 reaches its disk and stalls there.
        let (ours1, theirs1) = loopback().await;
        let mut session1 = session(ours1);
        let (rd1, mut wr1) = theirs1.into_split();
        let mut rd1 = tokio::io::BufReader::new(rd1);
        let soon = || Instant::now() + Duration::from_secs(5);
        assert!(matches!(
            next_frame(&mut rd1, soon()).await,
            Some((_, Message::State(_)))
        ));
        let (release_w1, w1_started) = vol.image_for_tests().stall_next_write_at(AT);
        let w1 = Message::Write {
            offset: AT,
            fua: false,
            data: vec![1; LEN],
        };
        write_message(&mut wr1, 1, &w1).await.expect("send W1");
        tokio::time::timeout(Duration::from_secs(5), w1_started)
            .await
            .expect("W1 reaches the disk")
            .expect("stall hook");

        // The primary's request timed out: it closed link 1 (and released the range).
        if old_link_ended_first {
            drop((rd1, wr1));
            tokio::time::timeout(Duration::from_secs(5), &mut session1)
                .await
                .expect("link 1 ends here when the primary closes it")
                .expect("session task");
        }

        // Link 2: W2 to the same range at once.
        let (ours2, theirs2) = loopback().await;
        let session2 = session(ours2);
        let (rd2, mut wr2) = theirs2.into_split();
        let mut rd2 = tokio::io::BufReader::new(rd2);
        let w2 = Message::Write {
            offset: AT,
            fua: false,
            data: vec![2; LEN],
        };
        write_message(&mut wr2, 7, &w2).await.expect("send W2");
        let w2_acked = |f: &(u64, Message)| matches!(f, (7, Message::Ack { .. }));
        // What link 2 gets while W1 is still in service (the old code answered W2 at once).
        let mut while_stalled = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(1);
        while let Some(f) = next_frame(&mut rd2, deadline).await {
            let done = w2_acked(&f);
            while_stalled.push(f);
            if done {
                break;
            }
        }

        // W1's disk comes back.
        let _ = release_w1.send(());
        let mut after = Vec::new();
        if !while_stalled.iter().any(w2_acked) {
            let deadline = soon();
            while let Some(f) = next_frame(&mut rd2, deadline).await {
                let done = w2_acked(&f);
                after.push(f);
                if done {
                    break;
                }
            }
        }
        // A late W1 (the old code) lands within moments of its release.
        tokio::time::sleep(Duration::from_millis(200)).await;

        let image = std::fs::read(vol.image_path()).expect("read the image");
        let at = AT as usize;
        assert!(
            image[at..at + LEN].iter().all(|&b| b == 2),
            "the old link's stalled write landed over the new link's (first byte {}; old link ended first: {old_link_ended_first})",
            image[at]
        );
        assert!(
            while_stalled.is_empty(),
            "link 2 was answered while link 1's write was in service: {while_stalled:?}"
        );
        assert!(
            matches!(after.first(), Some((_, Message::State(_)))),
            "the state is announced first, once link 1 drained: {after:?}"
        );
        assert!(
            matches!(after.last(), Some((7, Message::Ack { errno: 0 }))),
            "then W2 is applied: {after:?}"
        );
        if !old_link_ended_first {
            // Link 2's arrival closed link 1, whose reader never saw the primary go.
            let _ = tokio::time::timeout(Duration::from_secs(5), session1)
                .await
                .expect("link 1 is closed by link 2's arrival");
        }
        drop((rd2, wr2));
        let _ = tokio::time::timeout(Duration::from_secs(5), session2)
            .await
            .expect("link 2 ends with its connection");
    }

    /// The old primary's write W1 stalls on this node's disk, its link then gone
    /// (`link_gone`) or still up; a promotion started meanwhile must wait for W1 to end, or
    /// W1 could land over this node's own writes.
    async fn promotion_waits_for_a_stalled_write(link_gone: bool) {
        use crate::repl::link::write_message;
        use tokio::time::Instant;
        const AT: u64 = 1 << 20;
        let dir = tempfile::tempdir().expect("temporary folder");
        let vol = crate::volume::Volume::open_for_tests(dir.path(), "b");
        let node = session_node();
        let (ours, theirs) = loopback().await;
        let session = {
            let (node, vol) = (node.clone(), vol.clone());
            tokio::spawn(async move { node.link_session(vol, ours, "a".into()).await })
        };
        let (rd, mut wr) = theirs.into_split();
        let mut rd = tokio::io::BufReader::new(rd);
        let soon = Instant::now() + Duration::from_secs(5);
        assert!(matches!(
            next_frame(&mut rd, soon).await,
            Some((_, Message::State(_)))
        ));
        let (release, started) = vol.image_for_tests().stall_next_write_at(AT);
        let w1 = Message::Write {
            offset: AT,
            fua: false,
            data: vec![1; 64 << 10],
        };
        write_message(&mut wr, 1, &w1).await.expect("send W1");
        tokio::time::timeout(Duration::from_secs(5), started)
            .await
            .expect("W1 reaches the disk")
            .expect("stall hook");
        let mut peer = Some((rd, wr));
        if link_gone {
            // The primary is gone: its link ends here, W1 still in service.
            peer = None;
            tokio::time::timeout(Duration::from_secs(5), session)
                .await
                .expect("the link ends")
                .expect("session task");
        }
        let promotion = {
            let vol = vol.clone();
            tokio::spawn(async move { vol.promote(true).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !promotion.is_finished(),
            "promoted while the old primary's write was still in service"
        );
        if link_gone {
            assert_eq!(vol.role(), super::Role::Secondary);
        }
        let _ = release.send(());
        let promoted = tokio::time::timeout(Duration::from_secs(5), promotion)
            .await
            .expect("promoted once W1 ended")
            .expect("promotion task");
        drop(peer);
        promoted.expect("promotion");
        assert_eq!(vol.role(), super::Role::Primary);
    }

    /// A promotion waits for the old primary's write still on this disk (its link already
    /// gone): promoted at once, this node's own writes could be overwritten by it.
    #[tokio::test]
    async fn a_promotion_waits_for_a_gone_links_stalled_write() {
        promotion_waits_for_a_stalled_write(true).await;
    }

    /// The same with the link still up (a swap whose demotion gave up waiting for a write
    /// on this node's slow disk): the promotion waits for it too.
    #[tokio::test]
    async fn a_promotion_waits_for_a_live_links_stalled_write() {
        promotion_waits_for_a_stalled_write(false).await;
    }

    /// A reader blocked on the request budget for longer than the request timeout closes its
    /// link (the peer has given up on it, and the reader would never see it go); the tasks
    /// that hold the budget stay counted on the closed link until they end.
    #[test]
    fn a_reader_blocked_on_the_budget_past_the_request_timeout_closes_its_link() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let link = crate::repl::link::Link::new("a".into(), Duration::from_secs(10), None);
            let budget = std::sync::Arc::new(tokio::sync::Semaphore::new(8));
            let held = budget.clone().acquire_many_owned(8).await.expect("budget");
            let in_service = link.answering().expect("open link");
            let start = tokio::time::Instant::now();
            let got =
                super::wait_for_budget("v", &link, budget.clone(), 4, Duration::from_millis(200))
                    .await;
            assert!(got.is_none());
            assert!(start.elapsed() >= Duration::from_millis(200));
            assert!(link.is_closed(), "closed after the request timeout");
            assert!(!link.is_drained(), "its request in service still counts");
            drop((held, in_service));
            assert!(link.is_drained());
            // With room in the budget it returns at once and the link stays open.
            let open = crate::repl::link::Link::new("a".into(), Duration::from_secs(10), None);
            let permit =
                super::wait_for_budget("v", &open, budget, 4, Duration::from_millis(200)).await;
            assert!(permit.is_some() && !open.is_closed());
        });
    }

    #[test]
    fn a_peer_request_costs_the_memory_it_makes_this_node_hold() {
        let write = Message::Write {
            offset: 0,
            fua: false,
            data: vec![0; 1 << 20],
        };
        assert_eq!(request_cost_kib(&write), 1025);
        let chunk = Message::ResyncData {
            offset: 0,
            raw_len: 32 << 20,
            compressed: true,
            raw_crc: 0,
            payload: vec![0; 100],
        };
        assert_eq!(
            request_cost_kib(&chunk),
            (32 << 10) + 1,
            "what it expands to"
        );
        let hash = Message::HashRequest {
            offset: 0,
            length: u64::MAX,
            block: 1 << 20,
        };
        assert_eq!(request_cost_kib(&hash), (8 << 10) + 1);
        assert_eq!(request_cost_kib(&Message::Flush), 1);
        assert!(request_cost_kib(&chunk) < PEER_REQUEST_BUDGET_KIB);
    }

    #[test]
    fn past_the_cap_the_oldest_pending_handshake_is_dropped() {
        let ip: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        let mut p = PendingHandshakes::default();
        let mut tickets = Vec::new();
        for i in 0..3 {
            let (t, rx, dropped) = p.admit(3, ip, None);
            assert!(!dropped, "admission {i} fits");
            tickets.push((t, rx));
        }
        // One finished: its place is free, nobody is dropped.
        let (t1, _) = tickets.remove(1);
        p.done(t1);
        let (t3, rx3, dropped) = p.admit(3, ip, None);
        assert!(!dropped);
        // Full again: the next admission drops the oldest (ticket 0), and only it.
        let (_, rx4, dropped) = p.admit(3, ip, None);
        assert!(dropped);
        let (_, mut rx0) = tickets.remove(0);
        assert_eq!(rx0.try_recv(), Ok(()));
        let (_, mut rx2) = tickets.remove(0);
        assert!(rx2.try_recv().is_err_and(|e| e == TryRecvError::Empty));
        assert_eq!(p.queue.len(), 3);
        p.done(t3);
        drop((rx3, rx4));
        assert_eq!(p.queue.len(), 2);
    }

    #[test]
    fn a_flood_from_one_host_does_not_push_out_another_hosts_handshake() {
        let peer: std::net::IpAddr = "10.0.0.2".parse().unwrap();
        let flood: std::net::IpAddr = "10.0.0.66".parse().unwrap();
        let mut p = PendingHandshakes::default();
        let (_, mut peer_rx, _) = p.admit(4, peer, None);
        let mut flood_rx = Vec::new();
        for _ in 0..20 {
            let (_, rx, _) = p.admit(4, flood, None);
            flood_rx.push(rx);
        }
        assert!(
            peer_rx.try_recv().is_err_and(|e| e == TryRecvError::Empty),
            "the peer's handshake was dropped for the flood's"
        );
        assert_eq!(p.queue.len(), 4);
        // The flood's own oldest went, its newest three wait.
        let dropped = flood_rx
            .iter_mut()
            .map(|rx| rx.try_recv())
            .filter(Result::is_ok)
            .count();
        assert_eq!(dropped, 17);
        // A second peer connection while the flood holds three places: the flood still loses.
        let (_, _rx, dropped) = p.admit(4, peer, None);
        assert!(dropped);
        assert!(peer_rx.try_recv().is_err_and(|e| e == TryRecvError::Empty));
        assert_eq!(p.queue.iter().filter(|(_, ip, _)| *ip == peer).count(), 2);
    }

    #[test]
    fn a_flood_from_many_hosts_does_not_push_out_the_peers_handshake() {
        let peer: std::net::IpAddr = "10.0.0.2".parse().unwrap();
        let mut p = PendingHandshakes::default();
        let (_, mut peer_rx, _) = p.admit(4, peer, Some(peer));
        for i in 0..50u8 {
            let flood = std::net::IpAddr::from([10, 1, 0, i]);
            p.admit(4, flood, Some(peer));
        }
        assert!(peer_rx.try_recv().is_err_and(|e| e == TryRecvError::Empty));
        assert_eq!(p.queue.len(), 4);
        // Only the peer's waiting: the oldest of them goes after all.
        let mut q = PendingHandshakes::default();
        let (_, mut first, _) = q.admit(2, peer, Some(peer));
        q.admit(2, peer, Some(peer));
        let (_, _, dropped) = q.admit(2, peer, Some(peer));
        assert!(dropped);
        assert_eq!(first.try_recv(), Ok(()));
    }

    #[test]
    fn dial_pauses_double_up_to_a_cap_that_depends_on_how_far_the_attempt_got() {
        let mut unreachable = vec![DIAL_RETRY_FIRST];
        let mut refused = vec![DIAL_RETRY_FIRST];
        for _ in 0..8 {
            unreachable.push(next_dial_pause(*unreachable.last().unwrap(), false));
            refused.push(next_dial_pause(*refused.last().unwrap(), true));
        }
        let ms = |v: &[Duration]| v.iter().map(|d| d.as_millis()).collect::<Vec<_>>();
        assert_eq!(
            ms(&unreachable),
            [50, 100, 200, 250, 250, 250, 250, 250, 250]
        );
        assert_eq!(
            ms(&refused),
            [50, 100, 200, 400, 800, 1000, 1000, 1000, 1000]
        );
        // After fast retries against a daemon that was not up, a refusal slows down too.
        assert_eq!(
            next_dial_pause(Duration::from_millis(250), true).as_millis(),
            500
        );
    }

    #[test]
    fn exactly_one_side_dials() {
        for (a, b) in [
            ("127.0.0.1:7801", "127.0.0.1:7802"),
            ("0.0.0.0:7801", "127.0.0.1:7802"),
            ("10.0.0.9:7800", "10.0.0.10:7800"),
        ] {
            // The peer listens on `b` and dials (or not) towards `a`'s concrete address.
            let a_seen = a.replace("0.0.0.0", "127.0.0.1");
            assert_ne!(should_dial(a, b), should_dial(b, &a_seen), "{a} {b}");
        }
        // Numeric, not textual: 10.0.0.9 < 10.0.0.10.
        assert!(should_dial("10.0.0.9:7800", "10.0.0.10:7800"));
        // A wildcard listen address resolves to the local address towards the peer.
        assert!(should_dial("0.0.0.0:7801", "127.0.0.1:7802"));
        assert!(!should_dial("0.0.0.0:7802", "127.0.0.1:7801"));
    }

    /// Links volume `a` (of node "a") and volume `b` (of node "b") over a loopback
    /// connection, as each node runs a link once its handshake is done. The sessions end
    /// when the link closes.
    async fn link_pair(
        a: &std::sync::Arc<crate::volume::Volume>,
        b: &std::sync::Arc<crate::volume::Volume>,
    ) -> [tokio::task::JoinHandle<()>; 2] {
        let (a_end, b_end) = loopback().await;
        let node = session_node();
        [(a, a_end, "b"), (b, b_end, "a")].map(|(vol, stream, peer)| {
            let (node, vol) = (node.clone(), vol.clone());
            tokio::spawn(async move { node.link_session(vol, stream, peer.into()).await })
        })
    }

    /// Waits (5 s at most, or `limit`) until `cond` holds; panics naming `what` otherwise.
    async fn wait_until(what: &str, limit: Option<Duration>, cond: impl Fn() -> bool) {
        let limit = limit.unwrap_or(Duration::from_secs(5));
        tokio::time::timeout(limit, async {
            while !cond() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("not within {limit:?}: {what}"));
    }

    /// Two primaries at once, as it can still happen while connected: both promoted at the
    /// same moment (each still seeing the other as secondary; a promotion past a primary
    /// peer is refused, even forced). A write of one that the other refuses (EROFS, before
    /// the first heard of the second's promotion) counts as written alone: a generation of its own and a dirty bit. So once
    /// that node is demoted, the pair still shows a split brain and the other primary does
    /// not resync over its acknowledged write. (Recorded only as dirty at the generation
    /// they shared, the demoted node would look as current as the other, or older, and be
    /// overwritten.)
    #[tokio::test]
    async fn a_write_refused_by_a_second_primary_counts_as_written_alone() {
        use super::Role;
        use crate::volume::PlanSummary;
        use nbd_server::BlockBackend;
        const AT: u64 = 4 << 20;
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = crate::volume::Volume::open_for_tests(dir_a.path(), "a");
        let b = crate::volume::Volume::open_for_tests(dir_b.path(), "b");
        // Two secondaries in sync: a's generation copied to b.
        a.promote(true).await.expect("promote a alone");
        a.demote().await.expect("demote a");
        let _sessions = link_pair(&a, &b).await;
        wait_until("a and b in sync", None, || {
            a.status().sync == "in-sync" && b.status().sync == "in-sync"
        })
        .await;
        let shared = a.failover_view().generation;
        assert_eq!(b.failover_view().generation, shared);

        // This runtime runs one task at a time, and neither promotion waits on anything:
        // each completes before the other's new state is read.
        let (pa, pb) = tokio::join!(a.promote(false), b.promote(false));
        pa.expect("promote a");
        pb.expect("promote b");
        assert_eq!((a.role(), b.role()), (Role::Primary, Role::Primary));

        // a has not read b's new state yet: this write is sent to b, which refuses it.
        a.write(AT, vec![0xa1; 64 << 10], false)
            .await
            .expect("a's write, acknowledged alone");
        assert_ne!(
            a.failover_view().generation,
            shared,
            "the write b refused started a generation of a's own"
        );
        assert!(a.status().dirty_bytes >= 64 << 10, "and is marked dirty");
        wait_until("both see the split brain", None, || {
            a.status().sync == "split-brain" && b.status().sync == "split-brain"
        })
        .await;

        // a steps down; b stays primary and hears of it.
        a.begin_demote();
        a.demote().await.expect("demote a");
        wait_until("b re-decides on a's new state", None, || {
            !b.status().reason.contains("both nodes are primary")
        })
        .await;
        for (node, vol) in [("a", &a), ("b", &b)] {
            assert_eq!(
                vol.failover_view().plan,
                Some(PlanSummary::SplitBrain),
                "{node}: {}",
                vol.status().reason
            );
        }
        let image = std::fs::read(a.image_path()).expect("read a's image");
        let at = AT as usize;
        assert!(
            image[at..at + (64 << 10)].iter().all(|&x| x == 0xa1),
            "a's acknowledged write was overwritten"
        );
    }

    /// A resync pass that fails at its very end (the target's flush when it is told the
    /// resync is done) leaves nothing dirty on the source but the target inconsistent: the
    /// source tries again while the resync to the peer is still the plan, and the pair ends
    /// in sync. Without the retry it stayed out of sync until the link flapped. A source of
    /// either role: a secondary with the newer generation (both nodes restarted after one
    /// wrote alone) is one too.
    #[tokio::test]
    async fn a_failed_resync_pass_is_retried_with_nothing_dirty_on_the_source() {
        // Together: each waits about 10 s for its retry.
        tokio::join!(failed_pass_case(true), failed_pass_case(false));
    }

    /// The test's end of a link to `vol` (playing its peer, `peer`), after `vol` sent its
    /// state and got `state` back.
    async fn fake_peer(
        vol: &std::sync::Arc<crate::volume::Volume>,
        peer: &str,
        state: crate::repl::frame::VolumeState,
    ) -> (
        tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>,
        tokio::net::tcp::OwnedWriteHalf,
    ) {
        let (ours, theirs) = loopback().await;
        let (vol, node, peer) = (vol.clone(), session_node(), peer.to_string());
        tokio::spawn(async move { node.link_session(vol, ours, peer).await });
        let (rd, mut wr) = theirs.into_split();
        let mut rd = tokio::io::BufReader::new(rd);
        let first = next_frame(&mut rd, soon()).await;
        assert!(matches!(first, Some((_, Message::State(_)))), "{first:?}");
        crate::repl::link::write_message(&mut wr, 0, &Message::State(state))
            .await
            .expect("send the state");
        (rd, wr)
    }

    fn soon() -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_secs(5)
    }

    fn peer_state(
        role: crate::repl::frame::Role,
        current: u64,
        has_data: bool,
    ) -> crate::repl::frame::VolumeState {
        crate::repl::frame::VolumeState {
            size: 16 << 20,
            role,
            consistent: true,
            has_data,
            unconfirmed: false,
            lost_cache: false,
            generations: crate::metadata::Generations {
                current,
                ..Default::default()
            },
            granularity: 64 << 10,
            dirty_map: zstd::bulk::compress(&[0u8; 32], 1).expect("compress"),
        }
    }

    async fn answer(w: &mut tokio::net::tcp::OwnedWriteHalf, seq: u64, errno: i32) {
        crate::repl::link::write_message(
            w,
            seq,
            &Message::Ack {
                errno: errno as u32,
            },
        )
        .await
        .expect("answer");
    }

    /// A resync pass fails at one chunk while another chunk of it is still unanswered: that
    /// chunk's range stays locked until its answer. A client write to the range used to take
    /// the lock at once (the pass's tasks were aborted) and travel the link beside the chunk,
    /// which the peer could apply last, over the acknowledged write.
    #[tokio::test]
    async fn a_failed_pass_keeps_its_unanswered_chunks_ranges_locked() {
        use crate::repl::frame::Role;
        use nbd_server::BlockBackend;
        const MIB: u64 = 1 << 20;
        let dir = tempfile::tempdir().unwrap();
        let vol = crate::volume::Volume::open_for_tests(dir.path(), "a");
        vol.promote(true).await.expect("promote");
        vol.write(0, vec![0x11; 4 << 20], false)
            .await
            .expect("write alone");
        let (mut rd, mut wr) = fake_peer(&vol, "b", peer_state(Role::Secondary, 0, false)).await;
        let (mut first, mut held) = (None, None);
        while first.is_none() || held.is_none() {
            let (seq, m) = next_frame(&mut rd, soon())
                .await
                .expect("the pass's frames");
            match m {
                Message::ResyncData { offset: 0, .. } | Message::ResyncZero { offset: 0, .. } => {
                    first = Some(seq)
                }
                Message::ResyncData { offset: MIB, .. }
                | Message::ResyncZero { offset: MIB, .. } => held = Some(seq),
                _ => answer(&mut wr, seq, 0).await,
            }
        }
        answer(&mut wr, first.expect("chunk 0"), libc::EIO).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let v = vol.clone();
        let writer =
            tokio::spawn(async move { v.write(MIB + 4096, vec![0x22; 4096], false).await });
        let quiet = tokio::time::Instant::now() + Duration::from_millis(500);
        while let Some((seq, m)) = next_frame(&mut rd, quiet).await {
            assert!(
                !matches!(m, Message::Write { .. }),
                "a client write overtook the unanswered chunk of its range"
            );
            answer(&mut wr, seq, 0).await;
        }
        answer(&mut wr, held.expect("chunk 1"), 0).await;
        loop {
            let (seq, m) = next_frame(&mut rd, soon())
                .await
                .expect("the client's write");
            let is_write = matches!(m, Message::Write { offset, .. } if offset == MIB + 4096);
            answer(&mut wr, seq, 0).await;
            if is_write {
                break;
            }
        }
        tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("the write ends")
            .expect("task")
            .expect("the write succeeds");
    }

    /// A resync target whose flush failed during the resync stays inconsistent when the
    /// source then says the resync is done (its final flush may succeed: the kernel reports
    /// a writeback error once). It used to call itself consistent without the data.
    #[tokio::test]
    async fn a_target_whose_flush_failed_stays_inconsistent_at_the_resync_end() {
        use crate::repl::frame::Role;
        use crate::repl::link::write_message;
        let dir = tempfile::tempdir().unwrap();
        let vol = crate::volume::Volume::open_for_tests(dir.path(), "b");
        let source = peer_state(Role::Primary, 0x1234, true);
        let gens = source.generations;
        let (mut rd, mut wr) = fake_peer(&vol, "a", source).await;
        // One at a time, each answered before the next (the flush fails after the write).
        let requests = [
            Message::ResyncStart { bytes: 16 << 20 },
            Message::Write {
                offset: 0,
                fua: false,
                data: vec![7; 65536],
            },
            Message::Flush,
            Message::ResyncDone { generations: gens },
        ];
        let mut answers = Vec::new();
        for (seq, m) in (1u64..).zip(requests) {
            if matches!(m, Message::Flush) {
                let _failed = vol.image_for_tests().fail_flush_after(0);
            }
            write_message(&mut wr, seq, &m).await.expect("request");
            loop {
                // Its state, announced when it changes, comes in between.
                let (answered, reply) = next_frame(&mut rd, soon()).await.expect("an answer");
                if !matches!(reply, Message::State(_)) {
                    assert_eq!(answered, seq);
                    answers.push(reply);
                    break;
                }
            }
        }
        assert!(
            matches!(answers[2], Message::Ack { errno } if errno != 0),
            "{answers:?}"
        );
        assert!(
            matches!(answers[3], Message::Ack { errno } if errno != 0),
            "{answers:?}"
        );
        assert!(
            !vol.status().consistent,
            "consistent without the failed flush's data"
        );
    }

    /// A client FLUSH queued behind a resync pass's final peer flush fails on the peer: what
    /// it covered goes dirty here. The pass must not then tell the peer it is done (it did:
    /// the peer called itself consistent without those writes); another pass first.
    #[tokio::test]
    async fn a_resync_is_not_declared_done_with_regions_gone_dirty_meanwhile() {
        use crate::repl::frame::Role;
        use nbd_server::BlockBackend;
        let dir = tempfile::tempdir().unwrap();
        let vol = crate::volume::Volume::open_for_tests(dir.path(), "a");
        vol.promote(true).await.expect("promote");
        vol.write(0, vec![0x11; 1 << 20], false)
            .await
            .expect("write alone");
        let (mut rd, mut wr) = fake_peer(&vol, "b", peer_state(Role::Secondary, 0, false)).await;
        let mut flushes = 0;
        let mut client_flush = None;
        loop {
            let (seq, m) = next_frame(&mut rd, soon())
                .await
                .expect("the resync's frames");
            match m {
                Message::Flush => {
                    flushes += 1;
                    if flushes == 1 {
                        // The pass's final flush: held until a client FLUSH (after a mirrored
                        // write) queued behind it.
                        let v = vol.clone();
                        client_flush = Some(tokio::spawn(async move {
                            v.write(8 << 20, vec![0x33; 65536], false).await?;
                            v.flush().await
                        }));
                        let (s, m) = next_frame(&mut rd, soon()).await.expect("the write");
                        assert!(matches!(m, Message::Write { .. }), "{m:?}");
                        answer(&mut wr, s, 0).await;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        answer(&mut wr, seq, 0).await;
                    } else if flushes == 2 {
                        // The client's FLUSH: the peer's fdatasync fails.
                        answer(&mut wr, seq, libc::EIO).await;
                    } else {
                        answer(&mut wr, seq, 0).await;
                    }
                }
                Message::ResyncDone { .. } => {
                    assert_eq!(
                        vol.status().dirty_bytes,
                        0,
                        "the resync declared done with regions dirty"
                    );
                    answer(&mut wr, seq, 0).await;
                    break;
                }
                _ => answer(&mut wr, seq, 0).await,
            }
        }
        tokio::time::timeout(Duration::from_secs(5), client_flush.expect("client FLUSH"))
            .await
            .expect("the client's FLUSH ends")
            .expect("task")
            .expect("acknowledged: the peer's failure is recorded");
    }

    /// The primary's disk fails a flush ("fsyncgate": the kernel may drop the pages it could
    /// not write, and report success for the next flush). Every later flush fails; the peer
    /// holds the acknowledged writes, so the demotion goes through, and what this copy may
    /// lack is resynced from the peer. It used to be forgotten: the next flush succeeded and
    /// cleared the extents, and both copies said in sync with different data.
    #[tokio::test]
    async fn a_primary_whose_flush_failed_is_resynced_from_its_peer() {
        use nbd_server::BlockBackend;
        use std::os::unix::fs::FileExt;
        const AT: u64 = 2 << 20;
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = crate::volume::Volume::open_for_tests(dir_a.path(), "a");
        let b = crate::volume::Volume::open_for_tests(dir_b.path(), "b");
        a.promote(true).await.expect("promote a alone");
        let _sessions = link_pair(&a, &b).await;
        wait_until("a and b in sync", None, || {
            a.status().sync == "in-sync" && b.status().sync == "in-sync"
        })
        .await;
        a.write(AT, vec![0xa3; 64 << 10], false)
            .await
            .expect("a mirrored write");
        let failed = a.image_for_tests().fail_flush_after(0);
        assert!(a.flush().await.is_err(), "the client's FLUSH fails");
        failed.await.expect("flush hook");
        // The pages the failed flush could not write are gone from a's image.
        std::fs::OpenOptions::new()
            .write(true)
            .open(a.image_path())
            .expect("a's image")
            .write_at(&[0u8; 64 << 10], AT)
            .expect("drop the write");
        assert!(
            a.flush().await.is_err(),
            "the next flush fails too (the kernel would report success)"
        );
        a.begin_demote();
        a.demote().await.expect("demote a");
        // Once b heard of the demotion.
        let mut promoted = b.promote(false).await;
        for _ in 0..500 {
            if promoted.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            promoted = b.promote(false).await;
        }
        promoted.expect("promote b");
        wait_until("a resynced from b", None, || {
            a.status().sync == "in-sync" && b.status().sync == "in-sync"
        })
        .await;
        let image = std::fs::read(a.image_path()).expect("read a's image");
        let at = AT as usize;
        assert!(
            image[at..at + (64 << 10)].iter().all(|&x| x == 0xa3),
            "the acknowledged write is back on a"
        );
    }

    async fn failed_pass_case(source_primary: bool) {
        use nbd_server::BlockBackend;
        const AT: u64 = 1 << 20;
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = crate::volume::Volume::open_for_tests(dir_a.path(), "a");
        let b = crate::volume::Volume::open_for_tests(dir_b.path(), "b");
        a.promote(true).await.expect("promote a alone");
        a.write(AT, vec![0xa2; 64 << 10], false)
            .await
            .expect("a's write alone");
        if !source_primary {
            a.demote().await.expect("demote a");
        }
        // No periodic peer flush: b's only flushes are the resync's.
        let maintenance = tokio::spawn(a.clone().background_maintenance(Duration::from_secs(3600)));
        // b flushes at the end of the pass (that one settles the chunks on a), then when told
        // the resync is done: that one fails.
        let failed = b.image_for_tests().fail_flush_after(1);
        let _sessions = link_pair(&a, &b).await;
        tokio::time::timeout(Duration::from_secs(5), failed)
            .await
            .expect("the resync reaches its end")
            .expect("flush hook");
        wait_until("the pass has failed", None, || {
            a.status().sync == "out-of-sync"
        })
        .await;
        let case = format!("source primary: {source_primary}");
        assert_eq!(
            a.status().dirty_bytes,
            0,
            "nothing dirty on the source ({case})"
        );
        assert!(
            !b.status().consistent,
            "the target is inconsistent ({case})"
        );
        assert_eq!(
            b.status().sync,
            "out-of-sync",
            "and no longer syncing ({case})"
        );

        // Retried 10 s after the failure, on a maintenance tick (every 2 s).
        wait_until(
            &format!("the retried resync completes ({case})"),
            Some(Duration::from_secs(30)),
            || a.status().sync == "in-sync" && b.status().sync == "in-sync",
        )
        .await;
        assert!(b.status().consistent);
        assert_eq!(b.failover_view().generation, a.failover_view().generation);
        let image = std::fs::read(b.image_path()).expect("read b's image");
        let at = AT as usize;
        assert!(
            image[at..at + (64 << 10)].iter().all(|&x| x == 0xa2),
            "{case}"
        );
        maintenance.abort();
    }
}
