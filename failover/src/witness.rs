//! The witness: a small third-node process that votes for at most one primary per group and
//! election round, and remembers its votes across restarts; and the client the nodes use.
//!
//! Per group the witness stores `{ round, holder, generation }`. Requests (UDP, one datagram
//! each way):
//! - `Vote { group, round, candidate, generation }` is granted iff `round > stored.round`, or
//!   `round == stored.round` and `candidate == stored.holder` (asking again is harmless). A
//!   grant stores `(round, candidate, generation)`; a denial carries the stored record.
//! - `Lease { group, node, round }`: "I am alive as holder of round R". The answer says
//!   whether `node` holds the latest round; the witness remembers (in memory) when the holder
//!   last said so. A granted vote counts as a lease too: a new holder may write alone at
//!   once, so its round is protected from the grant on, not from its first lease.
//! - `Release { group, node, round }`: "I held round R and have given the group up" (sent
//!   after a demotion, e.g. a swap). The holder's lease counts as lapsed at once, so the new
//!   primary is voted in without waiting out a lease its predecessor no longer uses.
//! - `Query { group }`: the stored record, and how long ago its holder last leased.
//!
//! Every change is durable (temp file, fsync, rename, fsync of the folder) before the answer
//! leaves, so a vote once granted survives a crash of the witness.
//!
//! The module has three parts: the pure rules ([`decide`]) and the state file's format; the
//! wire codec (keyed BLAKE3 MAC over every byte, a request/reply direction byte, and the
//! client's random nonce echoed in the reply so a recorded reply cannot answer a new
//! question); and the socket code ([`WitnessServer`], [`WitnessClient`]).
//!
//! Replays of requests: each request carries the client process's incarnation, a sequence
//! number and its wall clock; the server accepts each sequence number of an incarnation at
//! most once, out of order within a window ([`ReplayWindow`]: the process's concurrent tasks
//! share one counter but not one socket), refuses one older than the window or sent long
//! before the newest it accepted, and refuses an unknown incarnation whose clock is not later
//! than runs it has already forgotten ([`ReplayFilter`]). The filter lives in memory: just
//! after a witness restart a recorded request could be played back once (with the ones sent
//! just before it, within the window), which at worst refreshes a lease time (votes are
//! idempotent under the rules above: an old vote is denied, a repeated one changes nothing).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::heartbeat::{random_bytes, unix_ms};

/// Default deadline of one client request (retransmitted within it).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest group or node name on the wire.
pub const MAX_NAME: usize = 255;
/// Largest datagram either side sends (names are short; the refusal reason is capped).
pub const MAX_DATAGRAM: usize = 1400;
const MAX_REASON: usize = 512;
const MAGIC: [u8; 4] = *b"NBMW";
const VERSION: u8 = 1;
const KIND_REQUEST: u8 = 1;
const KIND_REPLY: u8 = 2;
const MAC_LEN: usize = 32;
const NONCE_LEN: usize = 16;
const KEY_CONTEXT: &str = "nbdmirror 2026-11 witness request/reply v1";
const STATE_VERSION: u32 = 1;
/// Client runs (incarnations) the server tracks per node before forgetting the oldest.
const TRACKED_INCARNATIONS: usize = 16;
/// Sequence numbers by which a run's requests may arrive out of order (one bit each of the
/// window's bitmap). A node process sends from several tasks at once (every group's tick,
/// every lease watch), each on its own socket, so a request can be overtaken by later ones.
pub const REPLAY_WINDOW: u64 = u128::BITS as u64;
/// How much earlier, on the sender's own clock, than the newest request of its run an
/// overtaken request may have been sent and still be accepted. Overtaking among concurrent
/// tasks takes milliseconds, and a client gives a request up (and retransmits it with a new
/// sequence number) within its timeout; older stragglers are held-back datagrams, which the
/// strictly increasing check this window replaced refused once anything later arrived.
pub const REORDER_MS: u64 = DEFAULT_TIMEOUT.as_millis() as u64;

/// The witness key derived from the shared `secret` (the same secret as the nodes').
pub fn witness_key(secret: &str) -> [u8; 32] {
    blake3::derive_key(KEY_CONTEXT, secret.as_bytes())
}

/// What the witness stores per group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    /// Election round; grows with every promotion. Rounds start at 1.
    pub round: u64,
    /// The node the witness voted for in `round`.
    pub holder: String,
    /// The data generation the holder reported when it asked for the vote.
    pub generation: u64,
}

/// A question to the witness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Vote {
        group: String,
        round: u64,
        candidate: String,
        generation: u64,
    },
    Lease {
        group: String,
        node: String,
        round: u64,
    },
    Query {
        group: String,
    },
    Release {
        group: String,
        node: String,
        round: u64,
    },
}

impl Request {
    pub fn group(&self) -> &str {
        match self {
            Request::Vote { group, .. }
            | Request::Lease { group, .. }
            | Request::Release { group, .. }
            | Request::Query { group } => group,
        }
    }
}

/// The witness's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `record`: the new record on a grant, the stored one (if any) on a denial.
    Vote {
        granted: bool,
        record: Option<GroupRecord>,
    },
    /// `holder`: the asking node holds the latest round.
    Lease {
        holder: bool,
        record: Option<GroupRecord>,
    },
    Query {
        record: Option<GroupRecord>,
        /// Milliseconds since the current holder's last lease, if it leased since the witness
        /// started.
        since_lease_ms: Option<u64>,
    },
    /// `released`: the asking node held the latest round and its lease now counts as lapsed.
    Release {
        released: bool,
        record: Option<GroupRecord>,
    },
    /// The request was understood but not served (a node asking on another's behalf, or
    /// the witness cannot write its state file).
    Refused { reason: String },
}

/// How long after the holder's last lease another node may be voted in. The holder treats
/// its lease as valid for less than this, counted from when it sent the request, so it stops
/// acknowledging writes alone before the witness would vote for anyone else.
pub const LEASE_TIMEOUT_MS: u64 = 3000;
/// How long a lease stays valid on the holder's side, from the moment it sent the request.
pub const LEASE_VALIDITY: Duration = Duration::from_millis(2500);

/// What the rules say about one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub reply: Reply,
    /// The group's new record, to persist before replying.
    pub store: Option<GroupRecord>,
    /// Remember now as the holder's last lease.
    pub lease: bool,
    /// The holder gave its round up: its lease counts as lapsed.
    pub release: bool,
}

/// The witness's rules: the stored record of the request's group, the authenticated sender
/// and the request in; the answer and the change to persist out. `since_lease_ms` is filled
/// into a `Query` answer.
pub fn decide(
    stored: Option<&GroupRecord>,
    sender: &str,
    req: &Request,
    since_lease_ms: Option<u64>,
) -> Decision {
    let answer = |reply| Decision {
        reply,
        store: None,
        lease: false,
        release: false,
    };
    match req {
        Request::Vote {
            round,
            candidate,
            generation,
            ..
        } => {
            if candidate != sender {
                return answer(Reply::Refused {
                    reason: format!(
                        "{sender} asked a vote for {candidate}: a node votes only for itself"
                    ),
                });
            }
            let grant = match stored {
                None => *round > 0,
                Some(s) if *candidate == s.holder => *round >= s.round,
                Some(s) => {
                    // Another node may take over only when the holder has stopped renewing
                    // its lease (it suspends its own I/O before the witness lets its lease
                    // lapse), and only with the data the holder last reported: a holder
                    // that wrote alone registered its new generation here first, so a
                    // stale candidate is refused and no acknowledged write is lost.
                    let lease_lapsed = since_lease_ms.is_none_or(|ms| ms >= LEASE_TIMEOUT_MS);
                    let data_current = s.generation == 0 || *generation == s.generation;
                    *round > s.round && lease_lapsed && data_current
                }
            };
            if !grant {
                return answer(Reply::Vote {
                    granted: false,
                    record: stored.cloned(),
                });
            }
            let new = match stored {
                // The holder again, same round: it reports a new generation (it started
                // writing alone); stored before the reply, so its writes wait for this.
                Some(s) if s.round == *round => GroupRecord {
                    generation: *generation,
                    ..s.clone()
                },
                _ => GroupRecord {
                    round: *round,
                    holder: candidate.clone(),
                    generation: *generation,
                },
            };
            Decision {
                reply: Reply::Vote {
                    granted: true,
                    record: Some(new.clone()),
                },
                store: (stored != Some(&new)).then_some(new),
                // A grant is the holder's first lease: it may write alone from now on, so
                // nobody else may be voted in before a full lease timeout without it.
                lease: true,
                release: false,
            }
        }
        Request::Lease { node, round, .. } => {
            if node != sender {
                return answer(Reply::Refused {
                    reason: format!("{sender} sent a lease for {node}"),
                });
            }
            let holder = stored.is_some_and(|s| s.round == *round && s.holder == *node);
            Decision {
                reply: Reply::Lease {
                    holder,
                    record: stored.cloned(),
                },
                store: None,
                lease: holder,
                release: false,
            }
        }
        Request::Release { node, round, .. } => {
            if node != sender {
                return answer(Reply::Refused {
                    reason: format!("{sender} sent a release for {node}"),
                });
            }
            // Only the holder of the latest round can give it up; anything else (an old
            // round, a replay after a later election) changes nothing.
            let released = stored.is_some_and(|s| s.round == *round && s.holder == *node);
            Decision {
                reply: Reply::Release {
                    released,
                    record: stored.cloned(),
                },
                store: None,
                lease: false,
                release: released,
            }
        }
        Request::Query { .. } => answer(Reply::Query {
            record: stored.cloned(),
            since_lease_ms: stored.and(since_lease_ms),
        }),
    }
}

/// When each group's holder last leased, on the witness's own clock (milliseconds since it
/// started). In memory only (pure: the caller passes the clock).
#[derive(Debug, Clone, Default)]
pub struct LeaseTable {
    /// Per group: (round, holder, when it last leased; `None` once it released the round).
    leases: HashMap<String, (u64, String, Option<u64>)>,
    /// Per group: the run (incarnation) and sequence number of the release that ended the
    /// holder's lease, while it stays released.
    released_by: HashMap<String, (u64, u64)>,
}

/// Which request of which run of its sender: (incarnation, sequence number).
pub type Origin = (u64, u64);

impl LeaseTable {
    /// How long ago the stored holder last leased, for [`decide`]. Without a lease since the
    /// witness started (just restarted, or the holder never leased here), the age counts
    /// from the start, so a live holder keeps its round for a full lease timeout.
    pub fn since_lease_ms(
        &self,
        group: &str,
        stored: Option<&GroupRecord>,
        now_ms: u64,
    ) -> Option<u64> {
        let s = stored?;
        match self.leases.get(group) {
            Some((round, holder, at)) if s.round == *round && s.holder == *holder => {
                Some(at.map_or(u64::MAX, |t| now_ms.saturating_sub(t)))
            }
            _ => Some(now_ms),
        }
    }

    /// Whether `req` is a lease the holder sent before the release that ended its lease,
    /// overtaken by that release on the way (leases may arrive out of order). It must not
    /// renew: the holder gave the round up after it, and the node taking over would wait a
    /// full lease timeout for nothing.
    pub fn overtaken_by_release(&self, group: &str, req: &Request, origin: Origin) -> bool {
        let Request::Lease { node, round, .. } = req else {
            return false;
        };
        let released = matches!(
            self.leases.get(group),
            Some((r, h, None)) if r == round && h == node
        );
        released
            && self
                .released_by
                .get(group)
                .is_some_and(|&(incarnation, seq)| incarnation == origin.0 && origin.1 < seq)
    }

    /// Records what a decision says about the holder's lease: renewed (a lease, or a grant,
    /// which is the new holder's first) or released (by the request `origin` names).
    pub fn apply(&mut self, group: &str, req: &Request, d: &Decision, now_ms: u64, origin: Origin) {
        if d.lease {
            self.released_by.remove(group);
            let holder = match (req, &d.reply) {
                (Request::Lease { node, round, .. }, _) => Some((*round, node.clone())),
                (
                    _,
                    Reply::Vote {
                        record: Some(r), ..
                    },
                ) => Some((r.round, r.holder.clone())),
                _ => None,
            };
            if let Some((round, node)) = holder {
                self.leases
                    .insert(group.to_string(), (round, node, Some(now_ms)));
            }
        } else if d.release {
            if let Request::Release { node, round, .. } = req {
                self.leases
                    .insert(group.to_string(), (*round, node.clone(), None));
                self.released_by.insert(group.to_string(), origin);
            }
        }
    }
}

/// The state file's contents.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WitnessState {
    pub version: u32,
    pub groups: BTreeMap<String, GroupRecord>,
}

impl WitnessState {
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }

    pub fn from_json(text: &str) -> Result<WitnessState, String> {
        let state: WitnessState = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if state.version != STATE_VERSION {
            return Err(format!(
                "state version {} is not supported (this build writes {STATE_VERSION})",
                state.version
            ));
        }
        Ok(state)
    }

    /// Reads the state file; a missing file is an empty state (first start).
    pub fn load(path: &Path) -> Result<WitnessState, WitnessError> {
        let state_err = |reason: String| WitnessError::State {
            path: path.to_owned(),
            reason,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => WitnessState::from_json(&text).map_err(|e| {
                state_err(format!(
                    "{e}; refusing to start, since the votes it holds would be forgotten \
                     (move it away only if no group's primary was elected through this witness)"
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(WitnessState {
                version: STATE_VERSION,
                groups: BTreeMap::new(),
            }),
            Err(e) => Err(state_err(e.to_string())),
        }
    }

    /// Writes the state durably: temp file, fsync, rename over the old one, fsync the folder.
    pub fn save(&self, path: &Path) -> Result<(), WitnessError> {
        use std::io::Write;
        let state_err = |what: &str, e: std::io::Error| WitnessError::State {
            path: path.to_owned(),
            reason: format!("{what}: {e}"),
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
        tmp_name.push(".tmp");
        let tmp = dir.join(tmp_name);
        let mut f = std::fs::File::create(&tmp).map_err(|e| state_err("create temp file", e))?;
        f.write_all(self.to_json().as_bytes())
            .map_err(|e| state_err("write temp file", e))?;
        f.sync_all().map_err(|e| state_err("fsync temp file", e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| state_err("rename temp file", e))?;
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| state_err("fsync folder", e))?;
        Ok(())
    }
}

/// Errors of the witness and its client.
#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    #[error("cannot bind the witness address {addr}: it is not an address of this host")]
    NotLocal { addr: SocketAddr },
    #[error("cannot bind {addr}: {reason}")]
    Bind { addr: SocketAddr, reason: String },
    #[error("witness state file {path}: {reason}")]
    State { path: PathBuf, reason: String },
    #[error("witness {addr} did not answer within {timeout:?} (down, unreachable, or a different secret)")]
    Unreachable { addr: SocketAddr, timeout: Duration },
    #[error("witness refused: {0}")]
    Refused(String),
    #[error("witness protocol: {0}")]
    Protocol(String),
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// Why a datagram was refused by the codec.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("datagram of {0} bytes is too short")]
    TooShort(usize),
    #[error("not a witness datagram (bad magic)")]
    BadMagic,
    #[error("witness protocol version {0} is not supported (this build speaks {VERSION})")]
    BadVersion(u8),
    #[error("wrong direction (a request where a reply was expected, or the reverse)")]
    WrongKind,
    #[error("MAC does not match (different secret, or tampered)")]
    BadMac,
    #[error("reply to another request (nonce differs)")]
    WrongNonce,
    #[error("malformed: {0}")]
    Malformed(&'static str),
    #[error("name of {0} bytes (1-{MAX_NAME} allowed)")]
    Name(usize),
    #[error("datagram would exceed {MAX_DATAGRAM} bytes")]
    TooLarge,
}

/// A request with what authenticates it and makes it fresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub nonce: [u8; NONCE_LEN],
    pub sender: String,
    pub incarnation: u64,
    pub seq: u64,
    pub sent_ms: u64,
    pub request: Request,
}

struct Writer(Vec<u8>);

impl Writer {
    fn header(kind: u8, nonce: &[u8; NONCE_LEN]) -> Writer {
        let mut v = Vec::with_capacity(128);
        v.extend_from_slice(&MAGIC);
        v.push(VERSION);
        v.push(kind);
        v.extend_from_slice(nonce);
        Writer(v)
    }
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn name(&mut self, s: &str) -> Result<(), WireError> {
        if s.is_empty() || s.len() > MAX_NAME {
            return Err(WireError::Name(s.len()));
        }
        self.0.push(s.len() as u8);
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
    fn record(&mut self, r: &Option<GroupRecord>) -> Result<(), WireError> {
        match r {
            None => self.u8(0),
            Some(r) => {
                self.u8(1);
                self.u64(r.round);
                self.name(&r.holder)?;
                self.u64(r.generation);
            }
        }
        Ok(())
    }
    fn finish(mut self, key: &[u8; 32]) -> Result<Vec<u8>, WireError> {
        let tag = blake3::keyed_hash(key, &self.0);
        self.0.extend_from_slice(tag.as_bytes());
        if self.0.len() > MAX_DATAGRAM {
            return Err(WireError::TooLarge);
        }
        Ok(self.0)
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Malformed("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }
    fn name(&mut self) -> Result<String, WireError> {
        let n = usize::from(self.u8()?);
        if n == 0 {
            return Err(WireError::Name(0));
        }
        std::str::from_utf8(self.take(n)?)
            .map(str::to_string)
            .map_err(|_| WireError::Malformed("name is not UTF-8"))
    }
    fn record(&mut self) -> Result<Option<GroupRecord>, WireError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(GroupRecord {
                round: self.u64()?,
                holder: self.name()?,
                generation: self.u64()?,
            })),
            _ => Err(WireError::Malformed("bad record flag")),
        }
    }
    fn bool(&mut self) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(WireError::Malformed("bad boolean")),
        }
    }
    fn end(&self) -> Result<(), WireError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(WireError::Malformed("trailing bytes"))
        }
    }
}

/// Checks magic, version, direction and MAC; returns the nonce and the body after it.
fn open<'a>(
    key: &[u8; 32],
    kind: u8,
    bytes: &'a [u8],
) -> Result<([u8; NONCE_LEN], Reader<'a>), WireError> {
    let head = 4 + 1 + 1 + NONCE_LEN;
    if bytes.len() < head + 1 + MAC_LEN {
        return Err(WireError::TooShort(bytes.len()));
    }
    if bytes[..4] != MAGIC {
        return Err(WireError::BadMagic);
    }
    if bytes[4] != VERSION {
        return Err(WireError::BadVersion(bytes[4]));
    }
    if bytes[5] != kind {
        return Err(WireError::WrongKind);
    }
    let (body, tag) = bytes.split_at(bytes.len() - MAC_LEN);
    let mut received = [0u8; 32];
    received.copy_from_slice(tag);
    if blake3::keyed_hash(key, body) != blake3::Hash::from(received) {
        return Err(WireError::BadMac);
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&body[6..head]);
    Ok((nonce, Reader(&body[head..])))
}

pub fn encode_request(key: &[u8; 32], e: &Envelope) -> Result<Vec<u8>, WireError> {
    let mut w = Writer::header(KIND_REQUEST, &e.nonce);
    w.u64(e.incarnation);
    w.u64(e.seq);
    w.u64(e.sent_ms);
    w.name(&e.sender)?;
    match &e.request {
        Request::Vote {
            group,
            round,
            candidate,
            generation,
        } => {
            w.u8(1);
            w.name(group)?;
            w.u64(*round);
            w.name(candidate)?;
            w.u64(*generation);
        }
        Request::Lease { group, node, round } => {
            w.u8(2);
            w.name(group)?;
            w.name(node)?;
            w.u64(*round);
        }
        Request::Query { group } => {
            w.u8(3);
            w.name(group)?;
        }
        Request::Release { group, node, round } => {
            w.u8(4);
            w.name(group)?;
            w.name(node)?;
            w.u64(*round);
        }
    }
    w.finish(key)
}

pub fn decode_request(key: &[u8; 32], bytes: &[u8]) -> Result<Envelope, WireError> {
    let (nonce, mut r) = open(key, KIND_REQUEST, bytes)?;
    let incarnation = r.u64()?;
    let seq = r.u64()?;
    let sent_ms = r.u64()?;
    let sender = r.name()?;
    let request = match r.u8()? {
        1 => Request::Vote {
            group: r.name()?,
            round: r.u64()?,
            candidate: r.name()?,
            generation: r.u64()?,
        },
        2 => Request::Lease {
            group: r.name()?,
            node: r.name()?,
            round: r.u64()?,
        },
        3 => Request::Query { group: r.name()? },
        4 => Request::Release {
            group: r.name()?,
            node: r.name()?,
            round: r.u64()?,
        },
        _ => return Err(WireError::Malformed("unknown request")),
    };
    r.end()?;
    Ok(Envelope {
        nonce,
        sender,
        incarnation,
        seq,
        sent_ms,
        request,
    })
}

pub fn encode_reply(
    key: &[u8; 32],
    nonce: &[u8; NONCE_LEN],
    reply: &Reply,
) -> Result<Vec<u8>, WireError> {
    let mut w = Writer::header(KIND_REPLY, nonce);
    match reply {
        Reply::Vote { granted, record } => {
            w.u8(1);
            w.u8(u8::from(*granted));
            w.record(record)?;
        }
        Reply::Lease { holder, record } => {
            w.u8(2);
            w.u8(u8::from(*holder));
            w.record(record)?;
        }
        Reply::Query {
            record,
            since_lease_ms,
        } => {
            w.u8(3);
            w.record(record)?;
            match since_lease_ms {
                None => w.u8(0),
                Some(ms) => {
                    w.u8(1);
                    w.u64(*ms);
                }
            }
        }
        Reply::Release { released, record } => {
            w.u8(5);
            w.u8(u8::from(*released));
            w.record(record)?;
        }
        Reply::Refused { reason } => {
            w.u8(4);
            let mut end = reason.len().min(MAX_REASON);
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            let r = &reason.as_bytes()[..end];
            w.0.extend_from_slice(&(r.len() as u16).to_be_bytes());
            w.0.extend_from_slice(r);
        }
    }
    w.finish(key)
}

/// Decodes a reply and checks that it answers the request that carried `nonce`.
pub fn decode_reply(
    key: &[u8; 32],
    nonce: &[u8; NONCE_LEN],
    bytes: &[u8],
) -> Result<Reply, WireError> {
    let (got, mut r) = open(key, KIND_REPLY, bytes)?;
    if blake3::Hash::from_bytes(pad(&got)) != blake3::Hash::from_bytes(pad(nonce)) {
        return Err(WireError::WrongNonce);
    }
    let reply = match r.u8()? {
        1 => Reply::Vote {
            granted: r.bool()?,
            record: r.record()?,
        },
        2 => Reply::Lease {
            holder: r.bool()?,
            record: r.record()?,
        },
        3 => Reply::Query {
            record: r.record()?,
            since_lease_ms: if r.bool()? { Some(r.u64()?) } else { None },
        },
        5 => Reply::Release {
            released: r.bool()?,
            record: r.record()?,
        },
        4 => {
            let b = r.take(2)?;
            let n = usize::from(u16::from_be_bytes([b[0], b[1]]));
            let reason = String::from_utf8_lossy(r.take(n)?).into_owned();
            Reply::Refused { reason }
        }
        _ => return Err(WireError::Malformed("unknown reply")),
    };
    r.end()?;
    Ok(reply)
}

/// Nonces compared in constant time (blake3's `Hash` equality is constant-time).
fn pad(n: &[u8; NONCE_LEN]) -> [u8; 32] {
    let mut a = [0u8; 32];
    a[..NONCE_LEN].copy_from_slice(n);
    a
}

/// The sequence numbers of one run (incarnation) of a sender that the server accepted, as
/// IPsec's anti-replay window keeps them (pure): the highest, and which of the
/// [`REPLAY_WINDOW`] numbers up to it. A number is accepted at most once; one at or below
/// `highest - REPLAY_WINDOW` may have been accepted and forgotten, so it is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayWindow {
    highest: u64,
    /// Bit `i`: `highest - i` was accepted.
    seen: u128,
    /// The latest clock reading among the accepted requests.
    newest_ms: u64,
    /// An overtaken request must have been sent after this: a run the server forgot and
    /// learned again may have had any number accepted before, each sent at the latest then.
    floor_ms: u64,
}

impl ReplayWindow {
    /// The window of a run first heard of through request `seq`, sent at `sent_ms`. The
    /// numbers below it within the window count as unseen (they may still be on their way)
    /// if they were sent after `floor_ms`, the latest clock reading of the runs the server
    /// forgot (0 if none): this run may be one of them, learned again.
    pub fn new(seq: u64, sent_ms: u64, floor_ms: u64) -> ReplayWindow {
        ReplayWindow {
            highest: seq,
            seen: 1,
            newest_ms: sent_ms,
            floor_ms,
        }
    }

    /// Accepts (and remembers) `seq` if it is new; refuses a replay, a number older than the
    /// window, and an overtaken request sent more than [`REORDER_MS`] before the newest or
    /// not after the floor. `in_order`: only a number above every one accepted (votes and
    /// releases: an overtaken one could undo a later registration, see [`ReplayFilter`]).
    pub fn accept(&mut self, seq: u64, sent_ms: u64, in_order: bool) -> bool {
        if seq > self.highest {
            let shift = seq - self.highest;
            self.seen = if shift >= REPLAY_WINDOW {
                0
            } else {
                self.seen << shift
            } | 1;
            self.highest = seq;
            self.newest_ms = self.newest_ms.max(sent_ms);
            return true;
        }
        let age = self.highest - seq;
        if in_order
            || age >= REPLAY_WINDOW
            || sent_ms.saturating_add(REORDER_MS) < self.newest_ms
            || sent_ms <= self.floor_ms
        {
            return false;
        }
        let bit = 1u128 << age;
        if self.seen & bit != 0 {
            return false;
        }
        self.seen |= bit;
        self.newest_ms = self.newest_ms.max(sent_ms);
        true
    }

    /// The latest clock reading among the accepted requests.
    pub fn newest_ms(&self) -> u64 {
        self.newest_ms
    }
}

#[derive(Debug, Clone, Copy)]
struct Run {
    window: ReplayWindow,
    last_used: u64,
}

#[derive(Debug, Clone, Default)]
struct SenderRuns {
    runs: HashMap<u64, Run>,
    /// Latest clock reading of any forgotten run: older unknown runs are recordings.
    forgotten_ms: u64,
}

/// The server's replay filter (pure): per sender, the [`ReplayWindow`] of each of its recent
/// runs (incarnations).
#[derive(Debug, Clone, Default)]
pub struct ReplayFilter {
    senders: HashMap<String, SenderRuns>,
    tick: u64,
}

impl ReplayFilter {
    pub fn new() -> ReplayFilter {
        ReplayFilter::default()
    }

    /// Accepts (and remembers) a fresh request; refuses a replay. `in_order` (votes and
    /// releases): refuses one overtaken by any later request of its run, as the filter did
    /// for every request before the window: a vote held back (on the network, or a
    /// retransmission) and accepted after a later vote would roll the registered generation
    /// back under writes the later one let through. Leases and queries, which only ever
    /// extend or read, may arrive out of order.
    pub fn accept(
        &mut self,
        sender: &str,
        incarnation: u64,
        seq: u64,
        sent_ms: u64,
        in_order: bool,
    ) -> bool {
        self.tick += 1;
        let tick = self.tick;
        let s = self.senders.entry(sender.to_string()).or_default();
        if let Some(run) = s.runs.get_mut(&incarnation) {
            if !run.window.accept(seq, sent_ms, in_order) {
                return false;
            }
            run.last_used = tick;
            return true;
        }
        if sent_ms <= s.forgotten_ms {
            return false;
        }
        if s.runs.len() >= TRACKED_INCARNATIONS {
            if let Some((&oldest, run)) = s.runs.iter().min_by_key(|(_, r)| r.last_used) {
                s.forgotten_ms = s.forgotten_ms.max(run.window.newest_ms());
                s.runs.remove(&oldest);
            }
            if sent_ms <= s.forgotten_ms {
                return false;
            }
        }
        s.runs.insert(
            incarnation,
            Run {
                window: ReplayWindow::new(seq, sent_ms, s.forgotten_ms),
                last_used: tick,
            },
        );
        true
    }
}

/// Where and how the witness serves.
#[derive(Clone)]
pub struct WitnessServerSpec {
    pub listen: SocketAddr,
    /// From [`witness_key`].
    pub key: [u8; 32],
    pub state_file: PathBuf,
}

/// A running witness. Dropping it stops it.
pub struct WitnessServer {
    local_addr: SocketAddr,
    task: Option<JoinHandle<()>>,
}

fn bind_error(addr: SocketAddr, e: &std::io::Error) -> WitnessError {
    if e.kind() == std::io::ErrorKind::AddrNotAvailable {
        WitnessError::NotLocal { addr }
    } else {
        WitnessError::Bind {
            addr,
            reason: e.to_string(),
        }
    }
}

impl WitnessServer {
    /// Binds the listen address (first: an address not on this host is an error before
    /// anything else happens), loads the state file, and serves on the current runtime.
    pub async fn start(spec: WitnessServerSpec) -> Result<WitnessServer, WitnessError> {
        let sock = UdpSocket::bind(spec.listen)
            .await
            .map_err(|e| bind_error(spec.listen, &e))?;
        let local_addr = sock.local_addr().unwrap_or(spec.listen);
        let path = spec.state_file.clone();
        let state = tokio::task::spawn_blocking(move || WitnessState::load(&path))
            .await
            .map_err(|e| WitnessError::State {
                path: spec.state_file.clone(),
                reason: e.to_string(),
            })??;
        info!(
            listen = %local_addr,
            state_file = %spec.state_file.display(),
            groups = state.groups.len(),
            "witness state loaded"
        );
        let server = Server {
            sock,
            key: spec.key,
            state_file: spec.state_file,
            state,
            leases: LeaseTable::default(),
            started: Instant::now(),
            replay: ReplayFilter::new(),
            last_warning: None,
        };
        Ok(WitnessServer {
            local_addr,
            task: Some(tokio::spawn(server.run())),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops serving and waits until the socket is closed (a vote is only ever answered
    /// once it is durable).
    pub async fn stop(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for WitnessServer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

struct Server {
    sock: UdpSocket,
    key: [u8; 32],
    state_file: PathBuf,
    state: WitnessState,
    /// Per group: (round, holder, when it last leased; `None` once it released the round).
    leases: LeaseTable,
    /// The clock of `leases`.
    started: Instant,
    replay: ReplayFilter,
    last_warning: Option<Instant>,
}

impl Server {
    async fn run(mut self) {
        let mut buf = vec![0u8; MAX_DATAGRAM + 1];
        loop {
            let (n, from) = match self.sock.recv_from(&mut buf).await {
                Ok(r) => r,
                Err(e) => {
                    debug!(error = %e, "witness receive error");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let env = match decode_request(&self.key, &buf[..n]) {
                Ok(env) => env,
                Err(e) => {
                    self.warn_bad(from, &e);
                    continue;
                }
            };
            let in_order = matches!(env.request, Request::Vote { .. } | Request::Release { .. });
            if !self
                .replay
                .accept(&env.sender, env.incarnation, env.seq, env.sent_ms, in_order)
            {
                debug!(%from, sender = %env.sender, seq = env.seq, "replayed request: dropped");
                continue;
            }
            let reply = self.handle(&env).await;
            match encode_reply(&self.key, &env.nonce, &reply) {
                Ok(bytes) => {
                    if let Err(e) = self.sock.send_to(&bytes, from).await {
                        debug!(%from, error = %e, "cannot send witness reply");
                    }
                }
                Err(e) => warn!(%from, error = %e, "cannot encode witness reply"),
            }
        }
    }

    /// Rate-limited warning about datagrams that fail authentication or decoding.
    fn warn_bad(&mut self, from: SocketAddr, e: &WireError) {
        let now = Instant::now();
        if self
            .last_warning
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(10))
        {
            debug!(%from, error = %e, "invalid witness request: dropped");
            return;
        }
        self.last_warning = Some(now);
        warn!(%from, error = %e, "invalid witness request dropped (wrong secret?); further ones for 10 s are logged at debug level");
    }

    async fn handle(&mut self, env: &Envelope) -> Reply {
        let group = env.request.group().to_string();
        let stored = self.state.groups.get(&group).cloned();
        let now_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let since_lease_ms = self.leases.since_lease_ms(&group, stored.as_ref(), now_ms);
        let mut d = decide(stored.as_ref(), &env.sender, &env.request, since_lease_ms);
        let origin = (env.incarnation, env.seq);
        if self
            .leases
            .overtaken_by_release(&group, &env.request, origin)
        {
            debug!(group = %group, sender = %env.sender, seq = env.seq, "a lease sent before the holder's release: not renewed");
            d.lease = false;
            d.reply = Reply::Lease {
                holder: false,
                record: stored.clone(),
            };
        }
        if let Some(new) = d.store.clone() {
            let mut next = self.state.clone();
            next.groups.insert(group.clone(), new.clone());
            let path = self.state_file.clone();
            let saved = tokio::task::spawn_blocking(move || next.save(&path).map(|()| next)).await;
            match saved {
                Ok(Ok(next)) => {
                    info!(
                        group = %group,
                        round = new.round,
                        holder = %new.holder,
                        generation = new.generation,
                        "vote granted and stored"
                    );
                    self.state = next;
                }
                Ok(Err(e)) => {
                    warn!(error = %e, "cannot persist the vote: refused");
                    return Reply::Refused {
                        reason: format!("the witness cannot store its vote: {e}"),
                    };
                }
                Err(e) => {
                    return Reply::Refused {
                        reason: format!("the witness cannot store its vote: {e}"),
                    }
                }
            }
        } else if let Reply::Vote { granted: false, .. } = d.reply {
            info!(group = %group, sender = %env.sender, request = ?env.request, "vote denied");
        }
        if let (true, Request::Release { node, round, .. }) = (d.release, &env.request) {
            info!(group = %group, holder = %node, round, "the holder released its round");
        }
        self.leases.apply(&group, &env.request, &d, now_ms, origin);
        d.reply
    }
}

/// Outcome of a vote request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VoteOutcome {
    /// This node holds the round; the record as stored.
    Granted(GroupRecord),
    /// Someone holds this round or a later one (the stored record), or round 0 was asked.
    Denied(Option<GroupRecord>),
}

/// Outcome of a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseOutcome {
    /// This node holds the latest round.
    pub holder: bool,
    pub record: Option<GroupRecord>,
}

/// Outcome of a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryOutcome {
    pub record: Option<GroupRecord>,
    /// Time since the holder's last lease (if it leased since the witness started).
    pub since_lease: Option<Duration>,
}

/// One process's request stream: a random incarnation and a counter shared by every client
/// in the process, so clients made per request never look like replays of each other.
fn process_stream() -> (u64, u64) {
    static INCARNATION: OnceLock<u64> = OnceLock::new();
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let inc = *INCARNATION.get_or_init(|| u64::from_be_bytes(random_bytes::<8>()));
    (inc, SEQ.fetch_add(1, Ordering::Relaxed) + 1)
}

/// A node's client of the witness.
#[derive(Clone)]
pub struct WitnessClient {
    addr: SocketAddr,
    node: String,
    key: [u8; 32],
    timeout: Duration,
    bind: Option<SocketAddr>,
}

impl std::fmt::Debug for WitnessClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WitnessClient")
            .field("addr", &self.addr)
            .field("node", &self.node)
            .field("timeout", &self.timeout)
            .field("bind", &self.bind)
            .finish_non_exhaustive()
    }
}

impl WitnessClient {
    /// `key` from [`witness_key`]; default timeout 1 s.
    pub fn new(addr: SocketAddr, node: impl Into<String>, key: [u8; 32]) -> WitnessClient {
        WitnessClient {
            addr,
            node: node.into(),
            key,
            timeout: DEFAULT_TIMEOUT,
            bind: None,
        }
    }

    /// Deadline of each request (it is retransmitted within it).
    pub fn with_timeout(mut self, timeout: Duration) -> WitnessClient {
        self.timeout = timeout;
        self
    }

    /// Sends from this local address (port 0 for any) instead of the unspecified one.
    pub fn with_bind(mut self, local: SocketAddr) -> WitnessClient {
        self.bind = Some(local);
        self
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Asks the witness to vote for this node in `round`.
    pub async fn vote(
        &self,
        group: &str,
        round: u64,
        generation: u64,
    ) -> Result<VoteOutcome, WitnessError> {
        let req = Request::Vote {
            group: group.into(),
            round,
            candidate: self.node.clone(),
            generation,
        };
        match self.request(req).await? {
            Reply::Vote {
                granted: true,
                record: Some(r),
            } => Ok(VoteOutcome::Granted(r)),
            Reply::Vote {
                granted: false,
                record,
            } => Ok(VoteOutcome::Denied(record)),
            other => Err(unexpected(&other)),
        }
    }

    /// Tells the witness this node is alive as holder of `round`; learns whether it still is.
    pub async fn lease(&self, group: &str, round: u64) -> Result<LeaseOutcome, WitnessError> {
        let req = Request::Lease {
            group: group.into(),
            node: self.node.clone(),
            round,
        };
        match self.request(req).await? {
            Reply::Lease { holder, record } => Ok(LeaseOutcome { holder, record }),
            other => Err(unexpected(&other)),
        }
    }

    /// Tells the witness this node gave up `round` (it demoted): another node may be voted
    /// in without waiting for this node's lease to lapse. Returns whether it took effect.
    pub async fn release(&self, group: &str, round: u64) -> Result<bool, WitnessError> {
        let req = Request::Release {
            group: group.into(),
            node: self.node.clone(),
            round,
        };
        match self.request(req).await? {
            Reply::Release { released, .. } => Ok(released),
            other => Err(unexpected(&other)),
        }
    }

    /// The witness's record of `group`.
    pub async fn query(&self, group: &str) -> Result<QueryOutcome, WitnessError> {
        match self
            .request(Request::Query {
                group: group.into(),
            })
            .await?
        {
            Reply::Query {
                record,
                since_lease_ms,
            } => Ok(QueryOutcome {
                record,
                since_lease: since_lease_ms.map(Duration::from_millis),
            }),
            other => Err(unexpected(&other)),
        }
    }

    /// Sends `req` (again every quarter of the timeout, each time as a fresh request with
    /// the same nonce) until an authenticated reply with that nonce arrives.
    async fn request(&self, req: Request) -> Result<Reply, WitnessError> {
        let local = self.bind.unwrap_or_else(|| {
            let ip = match self.addr.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            };
            SocketAddr::new(ip, 0)
        });
        let sock = UdpSocket::bind(local)
            .await
            .map_err(|e| bind_error(local, &e))?;
        let unreachable = WitnessError::Unreachable {
            addr: self.addr,
            timeout: self.timeout,
        };
        if let Err(e) = sock.connect(self.addr).await {
            debug!(witness = %self.addr, error = %e, "cannot reach the witness");
            return Err(unreachable);
        }
        let nonce = random_bytes::<NONCE_LEN>();
        let deadline = tokio::time::Instant::now() + self.timeout;
        let retry = (self.timeout / 4).max(Duration::from_millis(50));
        let mut buf = vec![0u8; MAX_DATAGRAM + 1];
        while tokio::time::Instant::now() < deadline {
            let (incarnation, seq) = process_stream();
            let env = Envelope {
                nonce,
                sender: self.node.clone(),
                incarnation,
                seq,
                sent_ms: unix_ms(),
                request: req.clone(),
            };
            let bytes = encode_request(&self.key, &env)?;
            if let Err(e) = sock.send(&bytes).await {
                debug!(witness = %self.addr, error = %e, "witness request not sent");
            }
            let next = (tokio::time::Instant::now() + retry).min(deadline);
            loop {
                match tokio::time::timeout_at(next, sock.recv(&mut buf)).await {
                    Err(_) => break,
                    Ok(Ok(n)) => match decode_reply(&self.key, &nonce, &buf[..n]) {
                        Ok(Reply::Refused { reason }) => return Err(WitnessError::Refused(reason)),
                        Ok(reply) => return Ok(reply),
                        Err(e) => {
                            debug!(witness = %self.addr, error = %e, "invalid reply: dropped")
                        }
                    },
                    Ok(Err(e)) => {
                        // e.g. ECONNREFUSED from an earlier ICMP: wait for the next try.
                        debug!(witness = %self.addr, error = %e, "witness receive error");
                        tokio::time::sleep_until(next).await;
                        break;
                    }
                }
            }
        }
        Err(unreachable)
    }
}

fn unexpected(reply: &Reply) -> WitnessError {
    WitnessError::Protocol(format!("unexpected reply {reply:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: [u8; 32] = [3; 32];

    fn vote(group: &str, round: u64, candidate: &str, generation: u64) -> Request {
        Request::Vote {
            group: group.into(),
            round,
            candidate: candidate.into(),
            generation,
        }
    }

    fn rec(round: u64, holder: &str, generation: u64) -> GroupRecord {
        GroupRecord {
            round,
            holder: holder.into(),
            generation,
        }
    }

    #[test]
    fn vote_rules() {
        let d = decide(None, "a", &vote("g", 0, "a", 1), None);
        assert_eq!(
            d.reply,
            Reply::Vote {
                granted: false,
                record: None
            }
        );
        let d = decide(None, "a", &vote("g", 1, "a", 5), None);
        assert_eq!(d.store, Some(rec(1, "a", 5)));
        assert!(d.lease, "a grant starts the holder's lease");
        let s = rec(1, "a", 5);
        // Same round, same holder: granted again, nothing to store unless the generation changed.
        let d = decide(Some(&s), "a", &vote("g", 1, "a", 5), None);
        assert_eq!(
            (d.store, d.reply),
            (
                None,
                Reply::Vote {
                    granted: true,
                    record: Some(s.clone())
                }
            )
        );
        assert_eq!(
            decide(Some(&s), "a", &vote("g", 1, "a", 9), None).store,
            Some(rec(1, "a", 9))
        );
        // Generations are random ids, not counters: the latest reported one is stored.
        assert_eq!(
            decide(Some(&s), "a", &vote("g", 1, "a", 2), None).store,
            Some(rec(1, "a", 2))
        );
        // Same round, other node: denied with the stored record.
        let d = decide(Some(&s), "b", &vote("g", 1, "b", 9), None);
        assert_eq!(
            (d.store, d.reply),
            (
                None,
                Reply::Vote {
                    granted: false,
                    record: Some(s.clone())
                }
            )
        );
        // Later round, other node: granted only once the holder's lease lapsed, and only with
        // the generation the holder last reported.
        assert_eq!(
            decide(
                Some(&s),
                "b",
                &vote("g", 2, "b", 5),
                Some(LEASE_TIMEOUT_MS - 1)
            )
            .store,
            None,
            "a live holder keeps its round"
        );
        assert_eq!(
            decide(Some(&s), "b", &vote("g", 2, "b", 9), Some(LEASE_TIMEOUT_MS)).store,
            None,
            "stale data is never voted in"
        );
        assert_eq!(
            decide(Some(&s), "b", &vote("g", 2, "b", 5), Some(LEASE_TIMEOUT_MS)).store,
            Some(rec(2, "b", 5))
        );
        let fresh_pair = rec(1, "a", 0);
        assert_eq!(
            decide(Some(&fresh_pair), "b", &vote("g", 2, "b", 9), None).store,
            Some(rec(2, "b", 9))
        );
        // Voting on another's behalf is refused.
        assert!(matches!(
            decide(Some(&s), "b", &vote("g", 3, "a", 9), None).reply,
            Reply::Refused { .. }
        ));
    }

    #[test]
    fn lease_and_query_rules() {
        let s = rec(4, "a", 1);
        let lease = |node: &str, round| Request::Lease {
            group: "g".into(),
            node: node.into(),
            round,
        };
        let d = decide(Some(&s), "a", &lease("a", 4), None);
        assert_eq!(
            (d.lease, d.reply),
            (
                true,
                Reply::Lease {
                    holder: true,
                    record: Some(s.clone())
                }
            )
        );
        // Deposed (older round) or never elected: not holder, nothing recorded.
        assert!(!decide(Some(&s), "a", &lease("a", 3), None).lease);
        assert!(!decide(Some(&s), "b", &lease("b", 4), None).lease);
        assert!(!decide(None, "b", &lease("b", 1), None).lease);
        assert!(matches!(
            decide(Some(&s), "b", &lease("a", 4), None).reply,
            Reply::Refused { .. }
        ));
        // Release: only the holder of the latest round gives it up.
        let release = |node: &str, round| Request::Release {
            group: "g".into(),
            node: node.into(),
            round,
        };
        let d = decide(Some(&s), "a", &release("a", 4), None);
        assert_eq!(
            (d.release, d.lease, d.store, d.reply),
            (
                true,
                false,
                None,
                Reply::Release {
                    released: true,
                    record: Some(s.clone())
                }
            )
        );
        assert!(!decide(Some(&s), "a", &release("a", 3), None).release);
        assert!(!decide(Some(&s), "b", &release("b", 4), None).release);
        assert!(!decide(None, "a", &release("a", 4), None).release);
        assert!(matches!(
            decide(Some(&s), "b", &release("a", 4), None).reply,
            Reply::Refused { .. }
        ));
        let q = Request::Query { group: "g".into() };
        assert_eq!(
            decide(Some(&s), "b", &q, Some(70)).reply,
            Reply::Query {
                record: Some(s.clone()),
                since_lease_ms: Some(70)
            }
        );
        assert_eq!(
            decide(None, "b", &q, Some(70)).reply,
            Reply::Query {
                record: None,
                since_lease_ms: None
            }
        );
    }

    #[test]
    fn state_file_roundtrip_and_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("witness.json");
        let empty = WitnessState::load(&path).expect("missing file = empty");
        assert!(empty.groups.is_empty());
        let mut st = empty.clone();
        st.groups.insert("vm1".into(), rec(3, "node-a", 17));
        st.save(&path).expect("save");
        assert_eq!(WitnessState::load(&path).expect("load"), st);
        assert!(!dir.path().join("witness.json.tmp").exists());
        std::fs::write(&path, "{ not json").expect("write");
        let e = WitnessState::load(&path).expect_err("corrupt");
        assert!(e.to_string().contains("refusing to start"), "{e}");
    }

    /// Concurrent tasks of one process draw sequence numbers from one counter but send on
    /// separate sockets, so a request can be overtaken by a later one: it is still fresh.
    #[test]
    fn replay_filter_accepts_overtaken_requests_once() {
        let w = REPLAY_WINDOW;
        let mut f = ReplayFilter::new();
        assert!(f.accept("node-a", 7, 1000, 50, false));
        assert!(
            f.accept("node-a", 7, 999, 49, false),
            "overtaken request refused"
        );
        assert!(!f.accept("node-a", 7, 999, 49, false), "duplicate accepted");
        assert!(
            !f.accept("node-a", 7, 1000, 50, false),
            "duplicate accepted"
        );
        // The oldest number the window still covers, once; anything older is refused.
        assert!(f.accept("node-a", 7, 1000 - (w - 1), 40, false));
        assert!(!f.accept("node-a", 7, 1000 - (w - 1), 40, false));
        assert!(
            !f.accept("node-a", 7, 1000 - w, 40, false),
            "too old accepted"
        );
        assert!(!f.accept("node-a", 7, 0, 1, false), "too old accepted");
        // The window slides: numbers it leaves behind are refused from then on, the gaps
        // it still covers are accepted once.
        assert!(f.accept("node-a", 7, 1000 + w, 60, false));
        assert!(
            !f.accept("node-a", 7, 1000, 50, false),
            "slid out, then accepted"
        );
        assert!(f.accept("node-a", 7, 1001, 51, false));
        assert!(!f.accept("node-a", 7, 1001, 51, false));
        // A jump of more than the window forgets everything before it.
        assert!(f.accept("node-a", 7, u64::MAX, 70, false));
        assert!(!f.accept("node-a", 7, 1000 + w, 60, false));
        assert!(!f.accept("node-a", 7, u64::MAX, 70, false));
        assert!(f.accept("node-a", 7, u64::MAX - 1, 70, false));
        // Runs and senders have their own windows.
        assert!(f.accept("node-a", 8, 999, 80, false));
        assert!(f.accept("node-b", 7, 999, 80, false));
        // A run the server hears of first through a later request: the earlier ones within
        // the window are still accepted (each once), as after a witness restart.
        assert!(f.accept("node-c", 1, 10, 90, false));
        assert!(f.accept("node-c", 1, 9, 89, false));
        assert!(f.accept("node-c", 1, 0, 80, false));
        assert!(!f.accept("node-c", 1, 9, 89, false));
        // A straggler sent long before the newest request of its run is a held-back
        // datagram, not an overtaken one.
        assert!(f.accept("node-d", 1, 10, 5_000, false));
        assert!(f.accept("node-d", 1, 9, 5_000 - REORDER_MS, false));
        assert!(!f.accept("node-d", 1, 8, 5_000 - REORDER_MS - 1, false));
    }

    /// Votes and releases are taken in order only: an overtaken vote (held back, or a
    /// retransmission of an older registration) must not undo a later one.
    #[test]
    fn votes_and_releases_are_refused_once_overtaken() {
        let mut f = ReplayFilter::new();
        assert!(f.accept("node-a", 7, 10, 100, true), "a first vote");
        assert!(f.accept("node-a", 7, 12, 102, false), "a lease");
        assert!(
            !f.accept("node-a", 7, 11, 101, true),
            "a vote overtaken by a lease accepted"
        );
        assert!(f.accept("node-a", 7, 11, 101, false), "an overtaken lease");
        assert!(f.accept("node-a", 7, 13, 103, true), "a later vote");
    }

    #[test]
    fn replay_filter_forgets_old_runs_but_refuses_their_recordings() {
        let mut f = ReplayFilter::new();
        for inc in 0..TRACKED_INCARNATIONS as u64 {
            assert!(f.accept("node-a", inc, 5, 100 + inc, false));
        }
        // A new run evicts run 0 (the least recently used), whose clock reached 100.
        assert!(f.accept("node-a", 1000, 1, 500, false));
        // Run 0's recordings, even within its window, are now refused by their clock.
        assert!(!f.accept("node-a", 0, 4, 99, false));
        assert!(!f.accept("node-a", 0, 6, 100, false));
        // A later new run is fine.
        assert!(f.accept("node-a", 1001, 1, 501, false));
        // Run 0 learned again through a later request: what it had accepted before it was
        // forgotten (sent at 100 at the latest) is refused, though the new window covers it;
        // its requests overtaken since are accepted.
        assert!(f.accept("node-a", 0, 9, 600, false));
        assert!(
            !f.accept("node-a", 0, 5, 100, false),
            "accepted twice across a forget"
        );
        assert!(!f.accept("node-a", 0, 8, 100, false));
        assert!(f.accept("node-a", 0, 8, 599, false));
        assert!(f.accept("node-a", 0, 10, 601, false));
    }

    /// A witness on a loopback port with its state in a fresh folder (kept alive by the
    /// returned guard).
    async fn loopback_server() -> (tempfile::TempDir, WitnessServer) {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = WitnessServer::start(WitnessServerSpec {
            listen: "127.0.0.1:0".parse().expect("address"),
            key: KEY,
            state_file: dir.path().join("witness.json"),
        })
        .await
        .expect("start");
        (dir, server)
    }

    /// The server end to end: a request overtaken on the wire by a later one of the same run
    /// is answered, and a replay of either is not.
    #[tokio::test]
    async fn server_answers_an_overtaken_request() {
        let (_dir, server) = loopback_server().await;
        let raw = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let query = |seq: u64| Envelope {
            nonce: [seq as u8; NONCE_LEN],
            sender: "node-a".into(),
            incarnation: 42,
            seq,
            sent_ms: 1_000 + seq,
            request: Request::Query {
                group: "vm1".into(),
            },
        };
        let mut buf = [0u8; MAX_DATAGRAM + 1];
        for seq in [6, 5, 6, 5] {
            let bytes = encode_request(&KEY, &query(seq)).expect("encode");
            raw.send_to(&bytes, server.local_addr())
                .await
                .expect("send");
        }
        for seq in [6, 5] {
            let (n, _) = tokio::time::timeout(Duration::from_secs(2), raw.recv_from(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("request {seq} not answered"))
                .expect("recv");
            let reply = decode_reply(&KEY, &[seq as u8; NONCE_LEN], &buf[..n]);
            assert!(matches!(reply, Ok(Reply::Query { .. })), "{reply:?}");
        }
        let more = tokio::time::timeout(Duration::from_millis(300), raw.recv_from(&mut buf)).await;
        assert!(more.is_err(), "a replayed request was answered");
        server.stop().await;
    }

    /// A lease renewal overtaken on the wire by the holder's release of the same round must
    /// not renew it: the node taking over would wait out a lease nobody uses.
    #[tokio::test]
    async fn a_lease_overtaken_by_the_release_does_not_renew() {
        let (_dir, server) = loopback_server().await;
        let raw = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = server.local_addr();
        let ask = |sender: &'static str, incarnation: u64, seq: u64, request: Request| {
            let raw = &raw;
            async move {
                let env = Envelope {
                    nonce: [seq as u8 + 16 * (incarnation as u8); NONCE_LEN],
                    sender: sender.into(),
                    incarnation,
                    seq,
                    sent_ms: 1_000 + seq,
                    request,
                };
                let bytes = encode_request(&KEY, &env).expect("encode");
                raw.send_to(&bytes, addr).await.expect("send");
                let mut buf = [0u8; MAX_DATAGRAM + 1];
                let (n, _) = tokio::time::timeout(Duration::from_secs(2), raw.recv_from(&mut buf))
                    .await
                    .unwrap_or_else(|_| panic!("request {seq} of {sender} not answered"))
                    .expect("recv");
                decode_reply(&KEY, &env.nonce, &buf[..n]).expect("reply")
            }
        };
        let lease = Request::Lease {
            group: "vm1".into(),
            node: "node-a".into(),
            round: 1,
        };
        let release = Request::Release {
            group: "vm1".into(),
            node: "node-a".into(),
            round: 1,
        };
        let granted = ask("node-a", 7, 1, vote("vm1", 1, "node-a", 5)).await;
        assert!(
            matches!(granted, Reply::Vote { granted: true, .. }),
            "{granted:?}"
        );
        // node-a sent lease 2, then release 3; the release arrives first.
        let released = ask("node-a", 7, 3, release).await;
        assert!(
            matches!(released, Reply::Release { released: true, .. }),
            "{released:?}"
        );
        let late = ask("node-a", 7, 2, lease).await;
        assert!(
            matches!(late, Reply::Lease { holder: false, .. }),
            "{late:?}"
        );
        // So node-b is voted in at once, as after any release.
        let taken = ask("node-b", 9, 1, vote("vm1", 2, "node-b", 5)).await;
        assert!(
            matches!(taken, Reply::Vote { granted: true, .. }),
            "{taken:?}"
        );
        server.stop().await;
    }

    #[test]
    fn reply_is_bound_to_its_nonce_and_direction() {
        let nonce = [1u8; NONCE_LEN];
        let reply = Reply::Vote {
            granted: true,
            record: Some(rec(1, "a", 2)),
        };
        let bytes = encode_reply(&KEY, &nonce, &reply).expect("encode");
        assert_eq!(decode_reply(&KEY, &nonce, &bytes), Ok(reply));
        assert_eq!(
            decode_reply(&KEY, &[2u8; NONCE_LEN], &bytes),
            Err(WireError::WrongNonce)
        );
        assert_eq!(
            decode_reply(&[4; 32], &nonce, &bytes),
            Err(WireError::BadMac)
        );
        assert_eq!(decode_request(&KEY, &bytes), Err(WireError::WrongKind));
    }

    fn arb_name() -> impl Strategy<Value = String> {
        "[a-z0-9-]{1,20}"
    }

    fn arb_record() -> impl Strategy<Value = Option<GroupRecord>> {
        proptest::option::of((any::<u64>(), arb_name(), any::<u64>()).prop_map(
            |(round, holder, generation)| GroupRecord {
                round,
                holder,
                generation,
            },
        ))
    }

    fn arb_request() -> impl Strategy<Value = Request> {
        prop_oneof![
            (arb_name(), any::<u64>(), arb_name(), any::<u64>()).prop_map(
                |(group, round, candidate, generation)| Request::Vote {
                    group,
                    round,
                    candidate,
                    generation
                }
            ),
            (arb_name(), arb_name(), any::<u64>())
                .prop_map(|(group, node, round)| Request::Lease { group, node, round }),
            arb_name().prop_map(|group| Request::Query { group }),
            (arb_name(), arb_name(), any::<u64>())
                .prop_map(|(group, node, round)| Request::Release { group, node, round }),
        ]
    }

    fn arb_reply() -> impl Strategy<Value = Reply> {
        prop_oneof![
            (any::<bool>(), arb_record())
                .prop_map(|(granted, record)| Reply::Vote { granted, record }),
            (any::<bool>(), arb_record())
                .prop_map(|(holder, record)| Reply::Lease { holder, record }),
            (any::<bool>(), arb_record())
                .prop_map(|(released, record)| Reply::Release { released, record }),
            (arb_record(), proptest::option::of(any::<u64>())).prop_map(
                |(record, since_lease_ms)| Reply::Query {
                    record,
                    since_lease_ms
                }
            ),
            "[ -~]{0,100}".prop_map(|reason| Reply::Refused { reason }),
        ]
    }

    /// One step of a simulated history: who asks what, or a witness restart.
    #[derive(Debug, Clone)]
    enum Step {
        Ask { sender: usize, req: Request },
        Restart,
    }

    const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];
    const GROUPS: [&str; 2] = ["vm1", "vm2"];

    fn arb_step() -> impl Strategy<Value = Step> {
        let ask = (
            0usize..3,
            0usize..2,
            0u64..6,
            0u64..4,
            0usize..4,
            any::<u8>(),
        )
            .prop_map(|(sender, g, round, generation, kind, other)| {
                let group = GROUPS[g].to_string();
                let node = NODES[sender].to_string();
                // Mostly honest requests, sometimes on another node's behalf.
                let named = if other < 20 {
                    NODES[(sender + 1) % 3].to_string()
                } else {
                    node
                };
                let req = match kind {
                    0 => Request::Vote {
                        group,
                        round,
                        candidate: named,
                        generation,
                    },
                    1 => Request::Lease {
                        group,
                        node: named,
                        round,
                    },
                    2 => Request::Release {
                        group,
                        node: named,
                        round,
                    },
                    _ => Request::Query { group },
                };
                Step::Ask { sender, req }
            });
        prop_oneof![10 => ask, 1 => Just(Step::Restart)]
    }

    proptest! {
        #[test]
        fn prop_request_roundtrip(nonce: [u8; NONCE_LEN], sender in arb_name(), incarnation: u64, seq: u64, sent_ms: u64, request in arb_request()) {
            let e = Envelope { nonce, sender, incarnation, seq, sent_ms, request };
            let bytes = encode_request(&KEY, &e).expect("encode");
            prop_assert_eq!(decode_request(&KEY, &bytes), Ok(e));
        }

        #[test]
        fn prop_reply_roundtrip(nonce: [u8; NONCE_LEN], reply in arb_reply()) {
            let bytes = encode_reply(&KEY, &nonce, &reply).expect("encode");
            prop_assert_eq!(decode_reply(&KEY, &nonce, &bytes), Ok(reply));
        }

        #[test]
        fn prop_tampering_is_refused(request in arb_request(), bit in 0usize..100_000) {
            let e = Envelope { nonce: [9; NONCE_LEN], sender: "node-a".into(), incarnation: 1, seq: 2, sent_ms: 3, request };
            let mut bytes = encode_request(&KEY, &e).expect("encode");
            let bit = bit % (bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(decode_request(&KEY, &bytes).is_err());
        }

        #[test]
        fn prop_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1500)) {
            prop_assert!(decode_request(&KEY, &bytes).is_err());
            prop_assert!(decode_reply(&KEY, &[0; NONCE_LEN], &bytes).is_err());
        }

        /// No (sender, incarnation, seq) is ever accepted twice, whatever the order. A sender's
        /// clock reading is part of the MAC'd bytes, so a replay carries the original's: here
        /// each run has a start time and its clock grows with its sequence numbers.
        #[test]
        fn prop_replay_filter(
            starts in proptest::collection::vec(0u64..1000, 40),
            msgs in proptest::collection::vec((0usize..2, 0usize..40, 0u64..8), 0..400),
        ) {
            let mut f = ReplayFilter::new();
            let mut seen = std::collections::HashSet::new();
            for (sender, inc, seq) in msgs {
                let ms = starts[inc] + seq;
                if f.accept(NODES[sender], inc as u64, seq, ms, false) {
                    prop_assert!(seen.insert((sender, inc, seq)), "accepted {sender}/{inc}/{seq} twice");
                }
            }
        }

        /// The window against a model (every accepted number kept): a number is accepted iff
        /// it is new, and it is the highest yet, or within the window, sent at most
        /// REORDER_MS before the newest accepted request and after the floor. Offsets from a start near u64::MAX
        /// run the arithmetic at the top of the range too.
        #[test]
        fn prop_replay_window(
            high in any::<bool>(),
            first in (0u64..400, 0u64..4000),
            floor in 0u64..2000,
            offers in proptest::collection::vec((0u64..400, 0u64..4000), 0..400),
        ) {
            let base = if high { u64::MAX - 400 } else { 0 };
            let mut w = ReplayWindow::new(base + first.0, first.1, floor);
            let mut accepted = std::collections::HashSet::from([first.0]);
            let (mut highest, mut newest) = first;
            for (seq, ms) in offers {
                let fresh = !accepted.contains(&seq)
                    && (seq > highest
                        || (highest - seq < REPLAY_WINDOW
                            && ms + REORDER_MS >= newest
                            && ms > floor));
                prop_assert_eq!(w.accept(base + seq, ms, false), fresh, "seq {} ms {}", seq, ms);
                if fresh {
                    accepted.insert(seq);
                    highest = highest.max(seq);
                    newest = newest.max(ms);
                }
                prop_assert_eq!(w.newest_ms(), newest);
            }
        }

        /// The lease rule over any history of requests, clock steps and witness restarts, with
        /// the real lease bookkeeping: once a node was granted a round or leased it, no other
        /// node is voted in within LEASE_TIMEOUT_MS of that, unless the holder released that
        /// very round since.
        #[test]
        fn prop_no_takeover_within_a_live_lease(
            steps in proptest::collection::vec((arb_step(), 0u64..2000), 0..300)
        ) {
            let mut state = WitnessState { version: STATE_VERSION, groups: BTreeMap::new() };
            let mut table = LeaseTable::default();
            let mut now = 0u64;
            let mut started = 0u64;
            // Per group: (round, holder, protected until) from the holder's last grant or lease.
            let mut protected: HashMap<String, (u64, String, u64)> = HashMap::new();
            for (step, dt) in steps {
                now += dt;
                match step {
                    Step::Restart => {
                        table = LeaseTable::default();
                        started = now;
                    }
                    Step::Ask { sender, req } => {
                        let group = req.group().to_string();
                        let stored = state.groups.get(&group).cloned();
                        let since = table.since_lease_ms(&group, stored.as_ref(), now - started);
                        let d = decide(stored.as_ref(), NODES[sender], &req, since);
                        if let Reply::Vote { granted: true, record: Some(r) } = &d.reply {
                            if let Some((round, holder, until)) = protected.get(&group) {
                                if *holder != r.holder {
                                    prop_assert!(
                                        now >= *until,
                                        "{} voted in at {now} while {holder} (round {round}) was protected until {until}",
                                        r.holder
                                    );
                                }
                            }
                        }
                        table.apply(&group, &req, &d, now - started, (0, 0));
                        // The model, from the answers alone: a grant or a holder's lease
                        // protects; the holder's own release of its latest round ends it.
                        match (&req, &d.reply) {
                            (_, Reply::Vote { granted: true, record: Some(r) })
                            | (_, Reply::Lease { holder: true, record: Some(r) }) => {
                                protected.insert(group.clone(), (r.round, r.holder.clone(), now + LEASE_TIMEOUT_MS));
                            }
                            (Request::Release { node, round, .. }, _)
                                if *node == NODES[sender]
                                    && stored.as_ref().is_some_and(|s| s.round == *round && s.holder == *node) =>
                            {
                                protected.remove(&group);
                            }
                            _ => {}
                        }
                        if let Some(new) = d.store {
                            state.groups.insert(group, new);
                        }
                    }
                }
            }
        }

        /// Over any history of requests and restarts (a restart reloads the state as saved):
        /// never two holders for one group and round, rounds never go backwards, a grant is
        /// never forgotten, and a node never holds a round it did not ask for.
        #[test]
        fn prop_one_holder_per_round_across_restarts(steps in proptest::collection::vec(arb_step(), 0..300)) {
            let mut state = WitnessState { version: STATE_VERSION, groups: BTreeMap::new() };
            let mut granted: HashMap<(String, u64), String> = HashMap::new();
            for step in steps {
                match step {
                    Step::Restart => {
                        let reloaded = WitnessState::from_json(&state.to_json()).expect("reload");
                        prop_assert_eq!(&reloaded, &state);
                        state = reloaded;
                    }
                    Step::Ask { sender, req } => {
                        let group = req.group().to_string();
                        let before = state.groups.get(&group).cloned();
                        let d = decide(before.as_ref(), NODES[sender], &req, None);
                        if let Reply::Vote { granted: true, record: Some(r) } = &d.reply {
                            prop_assert_eq!(&r.holder, NODES[sender]);
                            if let Some(prev) = granted.insert((group.clone(), r.round), r.holder.clone()) {
                                prop_assert_eq!(&prev, &r.holder, "two holders for {} round {}", group, r.round);
                            }
                        }
                        if let Some(new) = d.store {
                            if let Some(b) = &before {
                                prop_assert!(new.round >= b.round, "round went back");
                                if new.round == b.round {
                                    prop_assert_eq!(&new.holder, &b.holder);
                                }
                            }
                            state.groups.insert(group, new);
                        }
                    }
                }
            }
            // Every grant is consistent with what is stored: the latest round's holder.
            for ((group, round), holder) in &granted {
                let stored = state.groups.get(group).expect("a granted group is stored");
                prop_assert!(stored.round >= *round);
                if stored.round == *round {
                    prop_assert_eq!(&stored.holder, holder);
                }
            }
        }
    }
}
