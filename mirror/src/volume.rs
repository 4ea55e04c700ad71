//! A replicated volume: the [`BlockBackend`] the NBD server uses on the primary, and the
//! receiving end of mirrored writes and resync data on the secondary.
//!
//! The write path (primary, peer attached): range lock → activity map → local write and peer
//! write at the same time → reply when both completed. Peer gone: the write's granules are
//! marked in the persistent dirty map (durably) before the reply, and the first such write
//! starts a new generation. See ARCHITECTURE.md for the whole picture.

// Errors of this module's operator actions are on the control path, never per request.
#![allow(clippy::result_large_err)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use nbd_server::backend::{BackendError, BackendResult, ZeroMode};
use nbd_server::reply::Extent;
use nbd_server::BlockBackend;
use serde::Serialize;
use tracing::{debug, error, info, warn};

use crate::decide::{self, Plan, PromoteRefusal, Side, Who};
use crate::metadata::header::MAX_MAP_BYTES;
use crate::metadata::{
    bitmap, ActiveWrite, Flags, Generations, MetadataError, MetadataFile, MetadataOptions,
    OwnedBits,
};
use crate::rangelock::RangeLocks;
use crate::repl::frame::{self, encode_resync_data, Message, Role, VolumeState};
use crate::repl::link::{Link, LinkError, OutFrame};
use crate::unflushed::{SentTicket, Unflushed};
use crate::window::ResyncWindow;
use crate::{create_image, EngineKind, ImageError, ImageFile};

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("volume {volume}: {source}")]
    Image {
        volume: String,
        #[source]
        source: ImageError,
    },
    #[error("volume {volume}: {source}")]
    Metadata {
        volume: String,
        #[source]
        source: MetadataError,
    },
    #[error("volume {volume}: image {} is {actual} bytes but the config says {expected}; fix the config or the image", path.display())]
    SizeMismatch {
        volume: String,
        path: PathBuf,
        actual: u64,
        expected: u64,
    },
    #[error("volume {volume}: metadata file {} exists but the image {} is missing; restore the image, or remove the metadata file to start this node's copy afresh", meta.display(), image.display())]
    ImageMissing {
        volume: String,
        meta: PathBuf,
        image: PathBuf,
    },
    #[error("volume {volume}: promotion refused: {reason}")]
    PromoteRefused {
        volume: String,
        reason: PromoteRefusal,
    },
    #[error("volume {volume}: {what}")]
    Refused { volume: String, what: String },
    #[error("volume {volume}: the peer: {source}")]
    Link {
        volume: String,
        #[source]
        source: LinkError,
    },
    #[error("volume {volume}: I/O error: {source}")]
    Io {
        volume: String,
        #[source]
        source: BackendError,
    },
}

pub struct VolumeSpec {
    pub name: String,
    pub node: String,
    pub image: PathBuf,
    pub metadata: PathBuf,
    pub size: u64,
    pub engine: EngineKind,
}

/// How resync runs.
#[derive(Debug, Clone, Copy)]
pub struct ResyncOptions {
    /// Bytes per second, 0 for no limit.
    pub rate: u64,
    /// Compare hashes before sending a chunk (saves bandwidth when most chunks match).
    pub checksum: bool,
}

/// Resync chunk: big enough for zstd and the link to run at full speed, small enough that an
/// application write to the same range waits little.
pub const CHUNK: u64 = 1 << 20;

/// A resync source flushes its target after this many acknowledged bytes: what a target
/// that loses power in the middle of a resync copies again (its unflushed chunks) stays
/// below it. A flush after O_DIRECT chunks costs the target little more than the device
/// flush itself.
const RESYNC_FLUSH_EVERY: u64 = 256 << 20;

/// The most one hash request of the peer may cover per block. Our own requests hash a chunk
/// at a time; the bound keeps a confused peer from making this node read (and hold) much
/// more per request.
pub const HASH_BLOCK_MAX: u64 = CHUNK * 8;

/// Where a flush's fdatasync may run: on the calling thread when it serves the request alone
/// (`ImageFile::flush` decides), or never there (the maintenance runs on the volume's home
/// thread, which must keep serving the replication link).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Thread {
    Caller,
    Other,
}

/// How often `background_maintenance` looks for work (a resync to retry, a peer flush due).
const MAINTENANCE_TICK: Duration = Duration::from_secs(2);

/// How long a stopping node waits for its peer's flush before it marks what the peer has
/// not flushed as dirty (a resync after the next start, instead of a wait on a dead peer).
const SHUTDOWN_PEER_FLUSH: Duration = Duration::from_secs(10);

/// How long a promotion waits for requests of the old primary still on this disk
/// (`Volume::wait_for_gone_links`) before it is refused.
const PROMOTE_DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// The default of the `peer_flush_interval` key.
pub const DEFAULT_PEER_FLUSH_INTERVAL: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Progress {
    total: u64,
    done: u64,
    started: Option<Instant>,
}

struct Shared {
    role: Role,
    /// The connected, authenticated peer link (mirroring may or may not be on).
    link: Option<Arc<Link>>,
    /// `link` announced our state: no request of an older link was in service any more
    /// (see `link_up`). Until then nothing is announced on it.
    link_ready: bool,
    /// Older links (closed) whose requests may still be in service here, until a newer
    /// link's `link_up` finds them drained.
    retired: Vec<Arc<Link>>,
    peer: Option<PeerView>,
    plan: Option<Plan>,
    resync_source_running: bool,
    /// When the last resync to the peer failed (automatic retries wait a little).
    last_resync_failure: Option<Instant>,
    /// Receiving a resync now.
    target_progress: Option<Progress>,
    source_progress: Option<Progress>,
    reason: String,
    /// Why the last links with the peer failed, when it was a configuration problem (another
    /// secret, another size): kept over "connection closed" until a link works, so the status
    /// shows the cause, not only the log.
    link_problem: Option<String>,
}

#[derive(Clone)]
struct PeerView {
    side: Side,
    dirty_map: Arc<OwnedBits>,
    dirty_bytes: u64,
}

pub struct Volume {
    pub name: String,
    pub node: String,
    image: ImageFile,
    meta: MetadataFile,
    size: u64,
    locks: RangeLocks,
    shared: Mutex<Shared>,
    /// The link writes are mirrored to (set while primary with a peer that may receive).
    mirror: RwLock<Option<Arc<Link>>>,
    /// Granules the peer acknowledged but has not yet flushed (lost if it lost power).
    unflushed: Unflushed,
    peer_flush_lock: tokio::sync::Mutex<()>,
    /// When the peer last confirmed a flush (a client's FLUSH or the periodic one).
    last_peer_flush: Mutex<Instant>,
    /// When the maintenance last flushed both copies to clear the activity bits of extents
    /// gone cold (see `background_maintenance`).
    last_cold_flush: Mutex<Instant>,
    solo_lock: Mutex<()>,
    /// Held while a decision is made and applied (see `redecide`).
    decide_lock: Mutex<()>,
    /// A `ResyncDone` went to the peer and its answer did not come back: the peer may have
    /// adopted this node's generation as its own, in sync. A write made alone from then on
    /// must start a new generation even though this node's current one differs from its
    /// sync one, or the peer's copy would look as current as this one without those writes
    /// (and could be promoted, or chosen as a resync source, over them). In memory: a
    /// restart comes back secondary, and a promotion alone always starts a new generation.
    handover_unanswered: AtomicBool,
    /// A local failure could not be recorded as this copy being inconsistent (the header
    /// write failed too): such failures are not answered, the link is closed instead.
    inconsistency_unrecorded: AtomicBool,
    app_inflight: AtomicUsize,
    resync_sent: AtomicU64,
    resync_received: AtomicU64,
    has_data_cache: AtomicBool,
    resync: ResyncOptions,
    metadata_path: PathBuf,
    /// Which generation may be written alone and acknowledged: [`ALONE_ALWAYS`] without a
    /// witness; with one, the generation the witness has confirmed (0: none). See
    /// [`Volume::set_alone_allowed`].
    alone_gate: tokio::sync::watch::Sender<u64>,
    /// With a witness: writing alone is allowed only before this instant (the lease's end).
    alone_deadline: Mutex<Option<Instant>>,
    /// The link dropped while the pair was in sync (this copy had every acknowledged write).
    in_sync_at_loss: AtomicBool,
    /// See [`Volume::settle_unrecorded_unflushed`].
    unflushed_unrecorded: AtomicBool,
    links_established: AtomicU64,
    /// The gate stands open because the peer was fenced (see
    /// [`Volume::allow_alone_until_next_link`]): the next link closes it.
    alone_until_next_link: AtomicBool,
    /// Secondary: a write of the primary failed here since the last resync started, so a
    /// `ResyncDone` must not make this copy consistent.
    failed_since_resync_start: AtomicBool,
    /// A demotion is under way: writes waiting for permission to go alone give up at once.
    demoting: AtomicBool,
    /// This volume was primary since it was opened (see `check_primary`).
    was_primary: AtomicBool,
    shutting_down: AtomicBool,
    /// Consecutive resync chunks that zstd could not shrink: past a few, most chunks are sent
    /// raw without trying (random or encrypted data would only cost CPU).
    incompressible_streak: AtomicU64,
}

/// [`Volume::set_alone_allowed`] value: writing alone needs nobody's permission.
pub const ALONE_ALWAYS: u64 = u64::MAX;

/// What the failover logic needs to know about a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailoverView {
    pub role: Role,
    pub link_up: bool,
    pub plan: Option<PlanSummary>,
    pub in_sync_at_loss: bool,
    pub consistent: bool,
    pub generation: u64,
    /// How many links to the peer this volume has had since the daemon started: a fence is
    /// void once the count moved (the fenced peer came back, even if only briefly).
    pub links_established: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanSummary {
    InSync,
    LocalNewer,
    PeerNewer,
    SplitBrain,
    Wait,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn meta_io(e: MetadataError) -> BackendError {
    // A metadata failure means we cannot record what the peer lacks: the write must fail.
    error!(error = %e, "metadata update failed; failing the request");
    BackendError::io("metadata", 0, 0, std::io::Error::other(e.to_string()))
}

fn errno_of(e: &BackendError) -> u32 {
    e.errno() as u32
}

impl Volume {
    /// Opens (creating when missing) the image and the metadata file. The volume starts
    /// secondary: a node never takes the primary role by itself.
    pub fn open(spec: VolumeSpec, resync: ResyncOptions) -> Result<Arc<Volume>, VolumeError> {
        let vname = spec.name.clone();
        let img_err = |source| VolumeError::Image {
            volume: vname.clone(),
            source,
        };
        let meta_err = |source| VolumeError::Metadata {
            volume: vname.clone(),
            source,
        };
        let image_exists = spec.image.exists();
        let meta_exists = spec.metadata.exists();
        if meta_exists && !image_exists {
            return Err(VolumeError::ImageMissing {
                volume: spec.name,
                meta: spec.metadata,
                image: spec.image,
            });
        }
        if !image_exists {
            create_image(&spec.image, spec.size).map_err(img_err)?;
            info!(volume = %spec.name, image = %spec.image.display(), size = spec.size, "created sparse image");
        }
        let image = ImageFile::open(&spec.image, false, spec.engine).map_err(img_err)?;
        if image.size() != spec.size {
            return Err(VolumeError::SizeMismatch {
                volume: spec.name,
                path: spec.image,
                actual: image.size(),
                expected: spec.size,
            });
        }
        let meta = if meta_exists {
            // Checked before the open writes to it: a file of another node (copied from the
            // peer, a mixed-up restore) would give this image the peer's history and dirty
            // map, and the pair would call two different copies in sync.
            if let Ok(snap) = crate::metadata::Snapshot::read(&spec.metadata) {
                if snap.header.node_name != spec.node {
                    return Err(VolumeError::Refused {
                        volume: spec.name,
                        what: format!(
                            "the metadata file {} belongs to node {:?} (its header says so), not \
                             to this node {:?}: a copy of the peer's file would give this image \
                             the peer's history. Put this node's own file back. If this node was \
                             renamed, move the file away: the node then starts with new metadata \
                             and, its image holding data, the pair waits for `nbdmirror resolve`",
                            spec.metadata.display(),
                            snap.header.node_name,
                            spec.node
                        ),
                    });
                }
            }
            MetadataFile::open(&spec.metadata).map_err(meta_err)?
        } else {
            MetadataFile::create(
                &spec.metadata,
                spec.size,
                &spec.node,
                MetadataOptions::default(),
            )
            .map_err(meta_err)?
        };
        if meta.volume_size() != spec.size {
            // The image already has the config's size (checked above): both were changed, a
            // resize, which the metadata (its maps are sized for the volume) cannot follow.
            let (recorded, configured) = (meta.volume_size(), spec.size);
            let lost_end = if configured < recorded {
                format!(
                    "; what the image held past {configured} bytes is gone on this node: if \
                     the peer's copy still has it, `nbdmirror verify {}` with the peer primary \
                     copies it back",
                    spec.name
                )
            } else {
                String::new()
            };
            return Err(VolumeError::Refused {
                volume: spec.name,
                what: format!(
                    "the metadata file {} records a volume of {recorded} bytes but the config \
                     says size = {configured}: growing or shrinking a volume is not supported \
                     yet. To start again with the old size, on each node you changed: set \
                     `size = {recorded}` in the config again and give the image that size again \
                     (`truncate -s {recorded} {}`, or a block device's old size){lost_end}",
                    spec.metadata.display(),
                    spec.image.display(),
                ),
            });
        }
        let report = meta.open_report();
        if !report.previous_shutdown_clean && report.folded_extents > 0 {
            warn!(volume = %spec.name, hot_extents = report.folded_extents,
                  "the previous run did not shut down cleanly: its hot extents are marked for resync");
        }
        if report.standby_slot_damaged {
            warn!(volume = %spec.name, metadata = %spec.metadata.display(),
                  "one of the metadata file's two header copies is damaged (a crash during a header write, or a failing disk): the other one is in use, and the next header update rewrites it");
        }
        if report.lost_cache {
            warn!(volume = %spec.name, hot_extents = report.folded_extents,
                  "the previous run ended with the machine (a power loss or kernel crash): writes it had not flushed may be missing from this image; at the same generation the peer's copy of those extents is taken");
        }
        // Restarting never keeps the primary role.
        meta.update_header(|h| h.flags.set(Flags::PRIMARY, false))
            .map_err(meta_err)?;
        let has_data = image
            .extents_sync(0, spec.size, 2)
            .map(|e| {
                e.iter()
                    .any(|x| x.flags & nbd_server::proto::STATE_HOLE == 0)
            })
            .unwrap_or(true);
        if image_exists && !meta_exists && has_data {
            warn!(volume = %spec.name, image = %spec.image.display(), metadata = %spec.metadata.display(),
                  "the image holds data but has no metadata file (new metadata created): if this node \
                   was mirrored before, its metadata was lost and the pair waits for an operator's \
                   `nbdmirror resolve` rather than overwrite either copy; an image imported for a new \
                   pair needs nothing");
        }
        let g = meta.granularity();
        let metadata_path = std::fs::canonicalize(&spec.metadata).unwrap_or(spec.metadata.clone());
        info!(volume = %spec.name, engine = image.engine_name(), generation = %format_gen(meta.generations().current),
              dirty_bytes = meta.dirty_bytes(), consistent = meta.flags().contains(Flags::CONSISTENT),
              "volume opened (secondary)");
        Ok(Arc::new(Volume {
            name: spec.name,
            node: spec.node,
            size: spec.size,
            unflushed: Unflushed::new(spec.size, u64::from(g)),
            image,
            meta,
            locks: RangeLocks::default(),
            shared: Mutex::new(Shared {
                role: Role::Secondary,
                link: None,
                link_ready: false,
                retired: Vec::new(),
                peer: None,
                plan: None,
                resync_source_running: false,
                last_resync_failure: None,
                target_progress: None,
                source_progress: None,
                reason: "waiting for the peer".into(),
                link_problem: None,
            }),
            mirror: RwLock::new(None),
            peer_flush_lock: tokio::sync::Mutex::new(()),
            last_peer_flush: Mutex::new(Instant::now()),
            last_cold_flush: Mutex::new(Instant::now()),
            solo_lock: Mutex::new(()),
            decide_lock: Mutex::new(()),
            handover_unanswered: AtomicBool::new(false),
            inconsistency_unrecorded: AtomicBool::new(false),
            app_inflight: AtomicUsize::new(0),
            resync_sent: AtomicU64::new(0),
            resync_received: AtomicU64::new(0),
            has_data_cache: AtomicBool::new(has_data),
            resync,
            metadata_path,
            alone_gate: tokio::sync::watch::channel(ALONE_ALWAYS).0,
            alone_deadline: Mutex::new(None),
            in_sync_at_loss: AtomicBool::new(false),
            unflushed_unrecorded: AtomicBool::new(false),
            links_established: AtomicU64::new(0),
            alone_until_next_link: AtomicBool::new(false),
            failed_since_resync_start: AtomicBool::new(false),
            demoting: AtomicBool::new(false),
            was_primary: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            incompressible_streak: AtomicU64::new(0),
        }))
    }

    pub fn role(&self) -> Role {
        lock(&self.shared).role
    }

    pub fn image_path(&self) -> &Path {
        self.image.path()
    }

    /// Test-only: a 16 MiB volume `v` of node `node` in `dir`, on the sync engine.
    #[cfg(test)]
    pub(crate) fn open_for_tests(dir: &std::path::Path, node: &str) -> Arc<Volume> {
        Volume::open(
            VolumeSpec {
                name: "v".into(),
                node: node.into(),
                image: dir.join("v.img"),
                metadata: dir.join("v.meta"),
                size: 16 << 20,
                engine: crate::engine::EngineKind::Sync,
            },
            ResyncOptions {
                rate: 0,
                checksum: false,
            },
        )
        .expect("open a test volume")
    }

    /// Test-only: the image, to stall its writes (`ImageFile::stall_next_write_at`).
    #[cfg(test)]
    pub(crate) fn image_for_tests(&self) -> &ImageFile {
        &self.image
    }

    fn mirror_link(&self) -> Option<Arc<Link>> {
        self.mirror
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .filter(|l| !l.is_closed())
    }

    fn set_mirror(&self, l: Option<Arc<Link>>) {
        *self.mirror.write().unwrap_or_else(|e| e.into_inner()) = l;
    }

    fn local_side(&self) -> Side {
        let role = lock(&self.shared).role;
        Side {
            role,
            generations: self.meta.generations(),
            consistent: self.meta.flags().contains(Flags::CONSISTENT),
            has_data: self.has_data_cache.load(Ordering::Relaxed),
            dirty: self.meta.dirty_count() > 0,
            unconfirmed: self.meta.flags().contains(Flags::UNCONFIRMED),
            lost_cache: self.meta.flags().contains(Flags::LOST_CACHE),
        }
    }

    fn state_message(&self) -> Message {
        let side = self.local_side();
        let raw = self.meta.dirty_bits().to_le_bytes();
        // Compression fails only when memory runs out; the peer refuses the empty map that
        // is sent then (it must never read it as clean).
        let dirty_map = zstd::bulk::compress(&raw, 1).unwrap_or_else(|e| {
            error!(volume = %self.name, error = %e, "cannot compress the dirty map for the peer");
            Vec::new()
        });
        Message::State(VolumeState {
            size: self.size,
            role: side.role,
            consistent: side.consistent,
            has_data: side.has_data,
            unconfirmed: side.unconfirmed,
            lost_cache: side.lost_cache,
            generations: side.generations,
            granularity: self.meta.granularity(),
            dirty_map,
        })
    }

    /// Sends our state to the peer (after any change of role, generation or consistency).
    fn announce(&self) {
        // Not before `link_up` announced it: a state sent while an older link's request is
        // still in service (it may yet fail and mark its range dirty) could be decided on
        // and acted upon without that range.
        let link = {
            let sh = lock(&self.shared);
            sh.link.clone().filter(|_| sh.link_ready)
        };
        if let Some(l) = link {
            l.send(0, &self.state_message());
        }
    }

    // ----- link lifecycle -----

    /// A new authenticated connection: replaces any older one, waits until no request of an
    /// older link is in service here any more, then announces our state. The caller reads
    /// the new link's frames only after this returns. Returns without announcing anything
    /// when `link` closes first (a newer link replaced it, or the peer was disconnected).
    ///
    /// Why wait: the primary never has two overlapping requests in flight on one link, but
    /// nothing orders requests of two links. A write of a link the primary gave up on (its
    /// request timed out, the link closed, the range lock released) may still be in service
    /// on our disk; the primary records that range alone and resyncs it over the new link.
    /// If the old write landed after the resync chunk, both sides would call themselves in
    /// sync with different data there, silently.
    pub async fn link_up(self: &Arc<Self>, link: Arc<Link>) {
        let old = {
            let mut sh = lock(&self.shared);
            sh.peer = None;
            sh.plan = None;
            sh.link_ready = false;
            sh.reason = "connected; exchanging state".into();
            self.links_established.fetch_add(1, Ordering::AcqRel);
            if self.alone_until_next_link.swap(false, Ordering::AcqRel) {
                // The fenced peer is back (if only briefly): its fence is void, and writes
                // alone wait for a new one, closed here and not at the failover logic's next
                // tick, which a hook can delay by minutes.
                self.alone_gate.send_replace(0);
                info!(volume = %self.name, "the fenced peer connected: writing alone needs a new fence");
            }
            let old = sh.link.replace(link.clone());
            if let Some(old) = &old {
                // Closed before anyone can see it retired: its reader starts no request after
                // this (`Link::answering`), so a drained retired link stays drained.
                old.close();
                sh.retired.push(old.clone());
            }
            old
        };
        if old.is_some() {
            // The peer came back before the old link timed out (it may have power-cycled):
            // link_down of the old link will find it replaced and do nothing, so what that
            // link left unflushed is recorded here, after the close (a write acknowledged on
            // it from now on sees it closed and records itself).
            self.record_unflushed_as_dirty();
        }
        info!(volume = %self.name, peer = %link.peer_node, "peer connected");
        // For `bitmap inspect`: whose changes the dirty map tracks.
        if self.meta.header().peer_name != link.peer_node {
            let peer = link.peer_node.clone();
            if let Err(e) = self.meta.update_header(|h| h.peer_name = peer) {
                warn!(volume = %self.name, error = %e, "cannot record the peer's name in the metadata");
            }
        }
        if !self.wait_for_older_links(&link).await {
            return;
        }
        {
            let mut sh = lock(&self.shared);
            match &sh.link {
                Some(l) if Arc::ptr_eq(l, &link) => {
                    sh.link_ready = true;
                    sh.reason = "connected; exchanging state".into();
                }
                _ => return,
            }
        }
        link.send(0, &self.state_message());
    }

    /// Waits until every retired link of this volume is drained (closed, none of its
    /// requests in service here). `false`: `link`, the new one, closed first.
    ///
    /// It never gives up, however long an old request takes (a disk that hangs): ordering
    /// matters more than liveness here. Serving the new link anyway could let the old write
    /// land over newer data without a dirty bit on either side, a divergence nothing would
    /// ever detect; waiting only delays the state exchange, while the primary serves alone
    /// and tracks its writes in its dirty map, as with no link at all. A disk that never
    /// answers needs an operator either way: the warning below says where to look.
    async fn wait_for_older_links(&self, link: &Arc<Link>) -> bool {
        const WARN_EVERY: Duration = Duration::from_secs(10);
        let started = Instant::now();
        let mut warn_at = tokio::time::Instant::now() + WARN_EVERY;
        loop {
            let older = {
                let mut sh = lock(&self.shared);
                sh.retired.retain(|l| !l.is_drained());
                let older = sh.retired.iter().find(|l| !Arc::ptr_eq(l, link)).cloned();
                if older.is_some() && sh.link.as_ref().is_some_and(|l| Arc::ptr_eq(l, link)) {
                    sh.reason = "connected; waiting for requests of the previous link still in service here".into();
                }
                older
            };
            let Some(older) = older else {
                return true;
            };
            // Retired links are closed already; a drained wait on an open one would never
            // end, so make sure.
            older.close();
            tokio::select! {
                () = older.drained() => {}
                () = link.closed() => return false,
                () = tokio::time::sleep_until(warn_at) => {
                    warn!(volume = %self.name, peer = %link.peer_node, waited = ?started.elapsed(),
                          requests = older.requests_in_service(),
                          "requests of the previous replication link are still in service here (a slow or hung disk?); the new link waits for them before exchanging state");
                    warn_at += WARN_EVERY;
                }
            }
        }
    }

    /// The connection ended. The primary keeps serving alone.
    pub async fn link_down(self: &Arc<Self>, link: &Arc<Link>, why: &str) {
        // Closed before it is retired (see link_up): its reader starts no request after this.
        link.close();
        {
            let mut sh = lock(&self.shared);
            match &sh.link {
                Some(l) if Arc::ptr_eq(l, link) => {}
                _ => return, // already replaced by a newer connection
            }
            // Its requests may still be in service: the next link waits for them.
            sh.retired.retain(|l| !l.is_drained());
            sh.retired.push(link.clone());
            let in_sync = matches!(sh.plan, Some(Plan::InSync))
                && self.meta.flags().contains(Flags::CONSISTENT);
            self.in_sync_at_loss.store(in_sync, Ordering::Release);
            sh.link = None;
            sh.peer = None;
            sh.plan = None;
            sh.target_progress = None;
            sh.reason = format!(
                "peer disconnected: {}",
                sh.link_problem.as_deref().unwrap_or(why)
            );
        }
        self.set_mirror(None);
        warn!(volume = %self.name, peer = %link.peer_node, reason = why, "peer lost");
        self.record_unflushed_as_dirty();
        if self.role() == Role::Secondary {
            // Keep what the primary sent. If that fails, pages it acknowledged may be gone:
            // this copy must not be promoted as if it had them. Off this thread: it may
            // carry the next link, and everything the primary sent can take long to write.
            if let Err(e) = self.image.flush_off_thread().await {
                error!(volume = %self.name, error = %e, "flush after losing the primary failed");
                self.become_inconsistent("the flush after losing the primary failed");
            }
        }
    }

    /// What the peer acknowledged but had not flushed (mirrored writes on a primary, resync
    /// chunks on a resync source of either role) may be lost if the peer lost power: once the
    /// link that carried it is gone, it goes into the dirty map.
    fn drain_unflushed_into_dirty(&self) -> Result<(), MetadataError> {
        let mut failed = None;
        for (off, len) in self.unflushed.drain_ranges() {
            if let Err(e) = self.meta.mark_dirty(off, len) {
                failed = Some(e);
            }
        }
        match failed {
            Some(e) => {
                self.unflushed_unrecorded.store(true, Ordering::Release);
                Err(e)
            }
            None => Ok(()),
        }
    }

    fn record_unflushed_as_dirty(&self) {
        // Resync chunks waiting for a flush are still dirty; no later link may settle them.
        self.meta.forget_resync_pending(None);
        if let Err(e) = self.drain_unflushed_into_dirty() {
            error!(volume = %self.name, error = %e, "cannot record unflushed peer writes in the dirty map; the next FLUSH marks the whole volume (or fails)");
        }
    }

    /// Writes the peer acknowledged but may not have flushed were drained from the unflushed
    /// set and could not be marked dirty (a metadata write failed): no later FLUSH may count
    /// them as on both disks. Marks the whole volume instead (a full resync to the peer), or
    /// fails the FLUSH while that fails too.
    fn settle_unrecorded_unflushed(&self) -> Result<(), MetadataError> {
        if !self.unflushed_unrecorded.load(Ordering::Acquire) {
            return Ok(());
        }
        self.meta.mark_all_dirty()?;
        self.unflushed_unrecorded.store(false, Ordering::Release);
        warn!(volume = %self.name, "peer writes that could not be recorded earlier: the whole volume is marked for resync");
        Ok(())
    }

    /// The peer's state as this node reasons about it. A dirty map that does not decode is an
    /// error, never an empty map: read as clean, it would let the pair call itself in sync
    /// while the peer holds writes this node lacks (or lacks some it holds).
    fn peer_view(state: &VolumeState) -> Result<PeerView, String> {
        let granularity = u64::from(state.granularity.max(1));
        let nbits = state.size.div_ceil(granularity);
        let map_bytes = nbits.div_ceil(64) * 8;
        if map_bytes > MAX_MAP_BYTES {
            return Err(format!(
                "its dirty map would take {map_bytes} bytes, more than the {MAX_MAP_BYTES} the metadata allows"
            ));
        }
        let raw = zstd::bulk::decompress(&state.dirty_map, map_bytes as usize)
            .map_err(|e| format!("its dirty map does not decompress: {e}"))?;
        if (raw.len() as u64) < map_bytes {
            return Err(format!(
                "its dirty map holds {} bytes, {map_bytes} expected",
                raw.len()
            ));
        }
        let bits = OwnedBits::from_le_bytes(&raw, nbits);
        let dirty_count = bits.bits().count();
        Ok(PeerView {
            side: Side {
                role: state.role,
                generations: state.generations,
                consistent: state.consistent,
                has_data: state.has_data,
                dirty: dirty_count > 0,
                unconfirmed: state.unconfirmed,
                lost_cache: state.lost_cache,
            },
            dirty_map: Arc::new(bits),
            dirty_bytes: (dirty_count * granularity).min(state.size),
        })
    }

    /// The peer told us its state: decide what the pair does.
    pub fn peer_state(self: &Arc<Self>, link: &Arc<Link>, state: VolumeState) {
        if state.size != self.size || state.granularity != self.meta.granularity() {
            error!(volume = %self.name, peer = %link.peer_node, peer_size = state.size, size = self.size,
                   "the peer's volume has another size or granularity; not mirroring");
            lock(&self.shared).link_problem = Some(format!(
                "the peer's volume is {} bytes (granularity {}), ours {} ({}): fix the config",
                state.size,
                state.granularity,
                self.size,
                self.meta.granularity()
            ));
            link.close();
            return;
        }
        let view = match Self::peer_view(&state) {
            Ok(view) => view,
            Err(what) => {
                error!(volume = %self.name, peer = %link.peer_node, problem = %what,
                       "the peer's state is unreadable; not mirroring");
                lock(&self.shared).link_problem = Some(format!(
                    "the peer's state is unreadable ({what}); check both nodes run the same build"
                ));
                link.close();
                return;
            }
        };
        {
            let mut sh = lock(&self.shared);
            match &sh.link {
                Some(l) if Arc::ptr_eq(l, link) => {}
                _ => return,
            }
            sh.peer = Some(view);
            sh.link_problem = None;
        }
        self.redecide();
    }

    /// A link with the peer could not be set up for a reason an operator must fix (another
    /// shared secret, say): the status says so while no link works. Ignored while one does
    /// (a stray connection then says nothing about the pair).
    pub fn note_link_problem(&self, problem: &str) {
        let mut sh = lock(&self.shared);
        if sh.link.is_none() {
            sh.link_problem = Some(problem.to_string());
            sh.reason = format!("peer not connected: {problem}");
        }
    }

    /// Decides the pair's plan from both sides' states and applies it (the mirror link, the
    /// in-sync mark, a resync pass). Serialised: promote, demote, verify and resolve call it
    /// from the main runtime while the link's thread calls it for the peer's states, and a
    /// decision applied after a newer one (from a local state read before a promotion, say)
    /// would unset the mirror of a connected primary while both sides report in sync.
    fn redecide(self: &Arc<Self>) {
        let _one_at_a_time = lock(&self.decide_lock);
        // Bounded: a retry happens only when a write alone started a generation meanwhile.
        for _ in 0..3 {
            if self.redecide_once() {
                return;
            }
        }
        warn!(volume = %self.name, "the pair's state kept changing while it was decided; deciding again on the next state");
    }

    /// One decision; false when it found both copies equal but this node's generation moved
    /// since it was read (a write went alone meanwhile): decide again.
    fn redecide_once(self: &Arc<Self>) -> bool {
        let local = self.local_side();
        let (plan, link, start_source) = {
            let mut sh = lock(&self.shared);
            let (Some(peer), Some(link)) = (sh.peer.clone(), sh.link.clone()) else {
                return true;
            };
            let plan = decide::decide(&local, &peer.side);
            let changed = sh.plan.as_ref() != Some(&plan);
            sh.plan = Some(plan.clone());
            sh.reason = match &plan {
                Plan::InSync => "in sync with the peer".into(),
                Plan::Resync { source: Who::Local, full } => format!(
                    "resync to the peer ({})",
                    if *full { "full copy" } else { "changed regions" }
                ),
                Plan::Resync { source: Who::Peer, .. } => "resync from the peer".into(),
                Plan::SplitBrain { why } => format!(
                    "split brain: {why}; nothing is copied until an operator runs `nbdmirror resolve`"
                ),
                Plan::Wait { why } => (*why).to_string(),
            };
            if changed {
                match &plan {
                    Plan::SplitBrain { why } => {
                        error!(volume = %self.name, peer = %link.peer_node, why, "SPLIT BRAIN detected: both copies are kept; resolve with `nbdmirror resolve`")
                    }
                    p => {
                        info!(volume = %self.name, peer = %link.peer_node, plan = ?p, "pair state decided")
                    }
                }
            }
            let start = matches!(
                plan,
                Plan::Resync {
                    source: Who::Local,
                    ..
                }
            ) && !sh.resync_source_running;
            if start {
                sh.resync_source_running = true;
            }
            (plan, link, start)
        };
        let mirror = local.role == Role::Primary
            && matches!(
                plan,
                Plan::InSync
                    | Plan::Resync {
                        source: Who::Local,
                        ..
                    }
            );
        self.set_mirror(mirror.then(|| link.clone()));
        if matches!(plan, Plan::InSync) && !self.mark_in_sync(local.generations.current) {
            return false;
        }
        if start_source {
            let full = matches!(plan, Plan::Resync { full: true, .. });
            let vol = self.clone();
            tokio::spawn(async move {
                let r = vol.run_resync_source(&link, full).await;
                let mut sh = lock(&vol.shared);
                sh.resync_source_running = false;
                sh.source_progress = None;
                // The peer came back on a new link while this pass still ran on the old one
                // (it restarted mid-resync): the new link's plan could not start its own pass
                // while this one ran. Its failure is the old link's: start over at once
                // rather than 10 s later.
                let replaced = sh
                    .link
                    .as_ref()
                    .is_some_and(|current| !Arc::ptr_eq(current, &link));
                match r {
                    Ok(()) => sh.last_resync_failure = None,
                    Err(e) if replaced => {
                        drop(sh);
                        info!(volume = %vol.name, error = %e, "the resync pass on the previous link stopped; starting over on the new one");
                        vol.redecide();
                    }
                    Err(e) => {
                        sh.last_resync_failure = Some(Instant::now());
                        warn!(volume = %vol.name, error = %e, "resync to the peer stopped; retried in 10 s, or when the peer reconnects");
                    }
                }
            });
        }
        true
    }

    /// Both copies are equal at this node's generation `compared`: the solo period (if any)
    /// is over. False, and nothing changed, when a write alone started a newer generation
    /// since (its writes are on this node only: not in sync, and not confirmed).
    fn mark_in_sync(&self, compared: u64) -> bool {
        let _no_new_generation = lock(&self.solo_lock);
        let g = self.meta.generations();
        if g.current != compared {
            return false;
        }
        if self.meta.flags().contains(Flags::UNCONFIRMED) {
            // Both copies hold the same data now: nothing left to discard.
            if let Err(e) = self
                .meta
                .update_header(|h| h.flags.set(Flags::UNCONFIRMED, false))
            {
                error!(volume = %self.name, error = %e, "cannot clear the unconfirmed flag");
            }
        }
        if g.sync != g.current {
            if let Err(e) = self
                .meta
                .update_header(|h| h.generations.sync = h.generations.current)
            {
                error!(volume = %self.name, error = %e, "cannot record the in-sync generation");
            }
        }
        let after = self.meta.generations();
        if after.sync == after.current {
            // The peer answered the handover: a write alone starts a new generation anyway.
            self.handover_unanswered.store(false, Ordering::Release);
        }
        true
    }

    // ----- writing alone -----

    /// The first write without the peer starts a new generation, so that the peer's copy is
    /// known to be older when it returns (and a promotion there is a visible split brain).
    fn ensure_solo_generation(&self) -> Result<(), MetadataError> {
        let _g = lock(&self.solo_lock);
        let g = self.meta.generations();
        let shared_maybe = self.handover_unanswered.load(Ordering::Acquire);
        if g.current == g.sync || g.current == 0 || shared_maybe {
            // With a witness, nothing of this generation is acknowledged until it confirms
            // it: until then its writes may be discarded safely (see decide()).
            let gated = *self.alone_gate.borrow() != ALONE_ALWAYS;
            let new = self.meta.start_new_generation_unconfirmed(gated)?;
            self.handover_unanswered.store(false, Ordering::Release);
            info!(volume = %self.name, generation = %format_gen(new), unconfirmed = gated, "writing without the peer: new generation");
        }
        Ok(())
    }

    fn record_alone(&self, offset: u64, len: u64) -> BackendResult<()> {
        if self.role() != Role::Primary {
            // Demoted while this write was in flight (a demotion waits 30 s at most): it is
            // never acknowledged, and a generation started here, on a secondary, would make
            // the new primary's copy look diverged from this one (a false split brain).
            if len > 0 {
                self.meta.mark_dirty(offset, len).map_err(meta_io)?;
            }
            return Err(BackendError::ShuttingDown);
        }
        self.ensure_solo_generation().map_err(meta_io)?;
        if len > 0 {
            self.meta.mark_dirty(offset, len).map_err(meta_io)?;
        }
        Ok(())
    }

    /// Sets which generation this node may write alone and acknowledge: [`ALONE_ALWAYS`]
    /// (no witness: the peer is never promoted by itself), the generation a witness confirmed,
    /// or 0 to suspend: writes without the peer then wait, neither failed nor acknowledged.
    pub fn set_alone_allowed(&self, generation: u64) {
        if generation != 0 && self.meta.flags().contains(Flags::UNCONFIRMED) {
            // The witness confirmed this generation: this node is its legitimate writer. The
            // comparison with the current generation is made inside the header update, so a
            // generation started meanwhile (a write alone) keeps its flag.
            let which = (generation != ALONE_ALWAYS).then_some(generation);
            if let Err(e) = self.meta.confirm_generation(which) {
                error!(volume = %self.name, error = %e, "cannot record the confirmed generation");
                return;
            }
        }
        self.alone_until_next_link.store(false, Ordering::Release);
        self.alone_gate.send_replace(generation);
    }

    /// Opens the gate for writes alone because the peer was fenced (powered off) while this
    /// volume had had `links_seen` links: only until a link comes up again (the peer's fence
    /// no longer holds then), and not at all if one came up since `links_seen` was read.
    /// Returns whether the gate opened.
    pub fn allow_alone_until_next_link(&self, links_seen: u64) -> bool {
        let sh = lock(&self.shared);
        if self.links_established.load(Ordering::Acquire) != links_seen {
            self.alone_until_next_link.store(false, Ordering::Release);
            self.alone_gate.send_replace(0);
            return false;
        }
        self.set_alone_allowed(ALONE_ALWAYS);
        self.alone_until_next_link.store(true, Ordering::Release);
        drop(sh);
        true
    }

    /// With a witness, permission to write alone also ends at the lease's end, whether or
    /// not the failover logic gets to run again before then.
    pub fn set_alone_deadline(&self, until: Option<Instant>) {
        *lock(&self.alone_deadline) = until;
        self.alone_gate.send_modify(|_| {});
    }

    /// Waits until a write made alone may be acknowledged.
    async fn wait_alone_allowed(&self) -> BackendResult<()> {
        let mut rx = self.alone_gate.subscribe();
        loop {
            let allowed = *rx.borrow_and_update();
            let before_deadline = lock(&self.alone_deadline).is_none_or(|d| Instant::now() < d);
            let g = self.meta.generations();
            if g.current == g.sync && g.current != 0 {
                // In sync with the peer again (a FLUSH held here while a resync carried
                // what it covers): nothing rests on this node alone any more. A write
                // waiting here holds its range, so no resync completes under it.
                return Ok(());
            }
            if allowed == ALONE_ALWAYS || (allowed == g.current && before_deadline) {
                if self.meta.flags().contains(Flags::UNCONFIRMED) {
                    // Durable before the first acknowledgement of this generation.
                    self.meta
                        .update_header(|h| h.flags.set(Flags::UNCONFIRMED, false))
                        .map_err(meta_io)?;
                }
                return Ok(());
            }
            if self.role() != Role::Primary || self.demoting.load(Ordering::Acquire) {
                // Never acknowledged: the client sees an error, nothing is lost.
                return Err(BackendError::ShuttingDown);
            }
            // Re-check the role now and then: a demotion does not touch the gate.
            let _ = tokio::time::timeout(Duration::from_millis(500), rx.changed()).await;
        }
    }

    /// First step of a demotion (before the export drains): writes held back waiting for the
    /// witness fail now instead of holding the export's shutdown.
    pub fn begin_demote(&self) {
        self.demoting.store(true, Ordering::Release);
        self.alone_gate.send_modify(|_| {});
    }

    /// Whether the peer answers a ping on the replication link within `within`: a check made
    /// right before handing the group over, since the heartbeats and the link's own timeout
    /// notice a peer cut off only seconds later.
    pub async fn peer_answers(&self, within: Duration) -> bool {
        let link = lock(&self.shared).link.clone();
        let Some(link) = link.filter(|l| !l.is_closed()) else {
            return false;
        };
        matches!(
            tokio::time::timeout(within, link.request(&Message::Ping)).await,
            Ok(Ok(Message::Pong))
        )
    }

    /// Drops the replication link now (the heartbeats say the peer is gone), instead of
    /// waiting for the link's own timeout; a promotion can then proceed alone.
    pub async fn disconnect_peer(self: &Arc<Self>, why: &str) {
        let link = lock(&self.shared).link.clone();
        if let Some(l) = link {
            self.link_down(&l, why).await;
        }
    }

    pub fn failover_view(&self) -> FailoverView {
        let sh = lock(&self.shared);
        let plan = sh.plan.as_ref().map(|p| match p {
            Plan::InSync => PlanSummary::InSync,
            Plan::Resync {
                source: Who::Local, ..
            } => PlanSummary::LocalNewer,
            Plan::Resync {
                source: Who::Peer, ..
            } => PlanSummary::PeerNewer,
            Plan::SplitBrain { .. } => PlanSummary::SplitBrain,
            Plan::Wait { .. } => PlanSummary::Wait,
        });
        FailoverView {
            role: sh.role,
            link_up: sh.link.is_some(),
            plan,
            in_sync_at_loss: self.in_sync_at_loss.load(Ordering::Acquire),
            consistent: self.meta.flags().contains(Flags::CONSISTENT),
            generation: self.meta.generations().current,
            links_established: self.links_established.load(Ordering::Acquire),
        }
    }

    fn check_primary(&self) -> BackendResult<()> {
        if self.role() != Role::Primary {
            // NBD clients reach a volume only through the export `node.rs` starts on a
            // promotion and drains before a demotion, so a former primary that meets a
            // write here was demoted under that client's connection: ESHUTDOWN says this
            // server stopped serving, where EPERM (from EROFS) would say the disk is
            // read-only, which it never was to this client. (Either is an I/O error to a
            // QEMU guest: QEMU reconnects on a broken connection, not on an error reply.
            // Rare anyway: a demotion drains the export first.) A volume never primary since it opened has no such client; its
            // writes stay refused as on a read-only disk.
            if self.was_primary.load(Ordering::Acquire) {
                return Err(BackendError::ShuttingDown);
            }
            return Err(BackendError::io(
                "write",
                0,
                0,
                std::io::Error::from_raw_os_error(libc::EROFS),
            ));
        }
        Ok(())
    }

    /// The common shape of every modifying request on the primary. `payload` is the write's
    /// data (nothing for trim and zeroes); `frame` encodes the peer's request from it (only
    /// when the peer is attached), then `local` takes it for the disk.
    async fn replicated<P, L, LF>(
        &self,
        offset: u64,
        len: u64,
        payload: P,
        frame: impl FnOnce(&P) -> OutFrame,
        local: L,
    ) -> BackendResult<()>
    where
        L: FnOnce(P) -> LF,
        LF: std::future::Future<Output = BackendResult<()>>,
    {
        self.check_primary()?;
        let _busy = InflightGuard::new(&self.app_inflight);
        let _range = self.locks.lock(offset, len).await;
        let mut active = if len > 0 {
            let write = self.meta.begin_write(offset, len).map_err(meta_io)?;
            Some(ActiveGuard::new(&self.meta, write, offset, len))
        } else {
            None
        };
        let mut went_alone = false;
        let result = match self.mirror_link() {
            Some(link) => {
                let sent = self.unflushed.ticket();
                let peer = link.request_frame(frame(&payload));
                // The peer first: its frame is queued before a small local write runs inline.
                let (p, l) = futures::join!(peer, local(payload));
                // A peer that is primary too (forced, or both promoted at once) refuses
                // the write: this node writes alone from here, as if the link were gone, so
                // its writes get a generation of their own and the pair sees a split brain
                // (marked dirty at the shared generation, they would be overwritten by the
                // other primary once this one is demoted).
                let peer_primary =
                    matches!(p, Ok(Message::Ack { errno }) if errno == libc::EROFS as u32);
                let peer_ok = match p {
                    Ok(Message::Ack { errno: 0 }) => true,
                    Ok(other) => {
                        warn!(volume = %self.name, offset, len, reply = ?other, "the peer failed a mirrored write; recording it for resync");
                        false
                    }
                    Err(e) => {
                        debug!(volume = %self.name, offset, error = %e, "mirrored write lost with the link");
                        false
                    }
                };
                if peer_ok {
                    if len > 0 && l.is_ok() {
                        let fresh = self.unflushed.mark_acked(offset, len, sent);
                        // A peer flush that failed meanwhile may have lost it; or the link
                        // dropped after the peer acknowledged but possibly before link_down
                        // collected the unflushed set: record it here too.
                        if !fresh || link.is_closed() {
                            self.meta.mark_dirty(offset, len).map_err(meta_io)?;
                        }
                    }
                } else {
                    // Durable before the reply: the peer lacks this write.
                    let link_down = link.is_closed();
                    if link_down || peer_primary {
                        self.record_alone(offset, len)?;
                        went_alone = true;
                    } else if len > 0 {
                        self.meta.mark_dirty(offset, len).map_err(meta_io)?;
                    }
                }
                if l.is_err() && len > 0 {
                    // The peer may have the write and we do not: the copies differ until a
                    // resync copies our version over. The client gets the error.
                    self.meta.mark_dirty(offset, len).map_err(meta_io)?;
                }
                l
            }
            None => {
                self.record_alone(offset, len)?;
                went_alone = true;
                local(payload).await
            }
        };
        if let Some(a) = active.as_mut() {
            // Both sides have it, or what differs is recorded: nothing left to mark.
            a.settled();
        }
        if went_alone && result.is_ok() {
            // Acknowledged only once this node knows it may continue without its peer.
            self.wait_alone_allowed().await?;
        }
        drop(active);
        if let Err(e) = &result {
            warn!(volume = %self.name, offset, len, error = %e, "local I/O error (reported to the client)");
            // A FUA write's EIO (or the flush of a FUA trim) can be write-back failing: the
            // same as a failed FLUSH for what this image may have lost.
            if self.image.has_failed_flush()
                && !(self.meta.activity_held() && self.meta.flags().contains(Flags::LOST_CACHE))
            {
                self.local_flush_failed(e);
            }
        }
        result
    }

    /// Flushes the peer. `Ok(true)`: every write the peer acknowledged before this call is
    /// on its disk. Otherwise what it covered is recorded as dirty, and the outcome says
    /// whether the peer answered. `Err`: that record could not be made.
    async fn flush_peer(&self, link: &Arc<Link>) -> Result<PeerFlush, MetadataError> {
        let reply = self
            .request_peer_flush(link, &Message::Flush, "a flush")
            .await?;
        Ok(match reply {
            Ok(Message::Ack { errno: 0 }) => PeerFlush::Done,
            // A primary too: it applies nothing of ours (see `replicated`).
            Ok(Message::Ack { errno }) if errno == libc::EROFS as u32 => PeerFlush::Absent,
            // It answered: a peer whose flush fails marks its copy inconsistent, durably,
            // before it answers, so that copy is never promoted nor used as a source.
            Ok(_) => PeerFlush::Failed,
            Err(_) => PeerFlush::Absent,
        })
    }

    /// Sends `request`, which makes the peer flush (`Flush`, or `ResyncDone`, which flushes
    /// the resync target), and settles the unflushed set with its answer. On any failure,
    /// every write acknowledged and not yet flushed (what the flush covered, and what was
    /// marked while it ran; writes still in flight see the failure in their ticket) is marked
    /// dirty at once: a peer whose fdatasync failed may have
    /// dropped those pages, and one that went away may have lost power; kept in the unflushed
    /// set instead, they would be forgotten by the next flush that succeeds (or by a
    /// link_down that drained the set before this ran). `Err`: that record could not be made.
    async fn request_peer_flush(
        &self,
        link: &Arc<Link>,
        request: &Message,
        what: &str,
    ) -> Result<Result<Message, LinkError>, MetadataError> {
        let sent = self
            .request_peer_flush_if(link, request, what, || true)
            .await?;
        Ok(sent.unwrap_or(Err(LinkError::Down)))
    }

    /// [`Volume::request_peer_flush`], sent only if `still_wanted` holds once this flush's
    /// turn came (`None` otherwise): what an earlier flush in the queue changed is seen.
    async fn request_peer_flush_if(
        &self,
        link: &Arc<Link>,
        request: &Message,
        what: &str,
        still_wanted: impl FnOnce() -> bool,
    ) -> Result<Option<Result<Message, LinkError>>, MetadataError> {
        let _serial = self.peer_flush_lock.lock().await;
        if !still_wanted() {
            return Ok(None);
        }
        let batch = self.unflushed.begin_flush();
        let settle = self.meta.begin_resync_settle();
        let reply = link.request(request).await;
        if let Ok(Message::Ack { errno: 0 }) = reply {
            self.unflushed.end_flush(batch);
            self.meta.settle_resync(settle);
            *lock(&self.last_peer_flush) = Instant::now();
            return Ok(Some(reply));
        }
        self.meta.abandon_resync_settle(settle);
        let ranges = self.unflushed.fail_flush(batch);
        let bytes: u64 = ranges.iter().map(|r| r.1).sum();
        warn!(volume = %self.name, reply = ?reply.as_ref().ok(), bytes, "the peer did not complete {what}; what it covered is marked for resync");
        for (off, len) in ranges {
            self.meta.mark_dirty(off, len)?;
        }
        Ok(Some(reply))
    }

    /// Every two seconds: starts a resync when regions went dirty while connected (a write the
    /// peer or the local disk failed, a difference found by verify), or again 10 s after a
    /// pass of this node (a source of either role) failed; and flushes the peer when
    /// no flush reached it for `peer_flush_interval`, so that what a peer power loss could
    /// cost stays bounded (the unflushed set is what the primary must resync if the link
    /// drops).
    ///
    /// Why not every tick: each peer flush writes back what the peer's page cache holds, so a
    /// short interval rewrites hot blocks again and again and makes the secondary's cache
    /// nearly write-through. Measured with 4 KiB random writes at queue depth 32 on two
    /// shared vCPUs: 46-55k IOPS with a flush every 2 s, 62-72k every 30 s (BENCHMARKS.md).
    /// The default, 30 s, is how long Linux lets a page stay dirty before writing it back on
    /// its own (`vm.dirty_expire_centisecs`), so the peer's flush mostly finds that work done.
    /// A VM's filesystem sends FLUSHes far more often, and each of those flushes the peer too.
    pub async fn background_maintenance(self: Arc<Self>, peer_flush_interval: Duration) {
        let mut tick = tokio::time::interval(MAINTENANCE_TICK.min(peer_flush_interval));
        loop {
            tick.tick().await;
            let mirror = self.mirror_link();
            // Activity bits are cleared only after a flush of both copies, which only a
            // client's FLUSH did: a client that seldom flushes (QEMU with cache=unsafe) left
            // every extent it ever wrote marked, and a primary crash then cost a resync of
            // all of them. So the maintenance flushes too when extents wait to be cleared.
            let cold_due = self.role() == Role::Primary
                && self.meta.pending_cold() > 0
                && lock(&self.last_cold_flush).elapsed() >= peer_flush_interval;
            if cold_due {
                *lock(&self.last_cold_flush) = Instant::now();
                if let Err(e) = self.flush_all(Thread::Other).await {
                    error!(volume = %self.name, error = %e, "the periodic flush that clears cold extents failed");
                }
            } else if let Some(link) = &mirror {
                let flush_due = lock(&self.last_peer_flush).elapsed() >= peer_flush_interval;
                if flush_due && !self.unflushed.is_empty() {
                    if let Err(e) = self.flush_peer(link).await {
                        error!(volume = %self.name, error = %e, "cannot record what a failed peer flush covered in the dirty map");
                    }
                }
            }
            let (retry_due, failed_before) = {
                let sh = lock(&self.shared);
                let due = !sh.resync_source_running
                    && sh
                        .last_resync_failure
                        .is_none_or(|t| t.elapsed() > Duration::from_secs(10));
                let resync_planned = matches!(
                    sh.plan,
                    Some(Plan::Resync {
                        source: Who::Local,
                        ..
                    })
                );
                (due, resync_planned && sh.last_resync_failure.is_some())
            };
            // A pass that failed with nothing dirty here (the peer's final flush failed,
            // say) still left the peer inconsistent: only a pass that completes ends that.
            // So for a source of either role: a secondary with the newer generation (both
            // nodes restarted after one wrote alone) mirrors nothing, yet is the source.
            // Regions gone dirty while in sync are a mirroring primary's.
            let dirty_while_mirroring = mirror.is_some() && self.meta.dirty_count() > 0;
            if retry_due && (failed_before || dirty_while_mirroring) {
                self.announce();
                self.redecide();
            }
        }
    }

    // ----- secondary side -----

    /// Handles one request from the peer and sends the answer. Runs as its own task so
    /// writes are applied concurrently (the primary never has two overlapping in flight).
    /// The caller counts it with [`Link::answering`] from its arrival (see
    /// `Node::link_session`).
    pub async fn handle_request(self: Arc<Self>, link: Arc<Link>, seq: u64, m: Message) {
        let reply = match m {
            Message::State(s) => {
                self.peer_state(&link, s);
                return;
            }
            Message::Error { message } => {
                warn!(volume = %self.name, peer = %link.peer_node, message, "the peer reported an error");
                return;
            }
            Message::Write { .. }
            | Message::Trim { .. }
            | Message::Zeroes { .. }
            | Message::ResyncData { .. }
            | Message::ResyncZero { .. }
            | Message::ResyncStart { .. }
            | Message::ResyncDone { .. }
                if self.role() == Role::Primary =>
            {
                warn!(volume = %self.name, peer = %link.peer_node, "the peer sent data to a primary; refused");
                Message::Ack {
                    errno: libc::EROFS as u32,
                }
            }
            Message::Write { offset, fua, data } => {
                let len = data.len() as u64;
                self.apply(offset, len, self.image.write_through(offset, data, fua))
                    .await
            }
            Message::Trim {
                offset,
                length,
                fua,
            } => {
                self.apply(offset, length, self.image.trim(offset, length, fua))
                    .await
            }
            Message::Zeroes {
                offset,
                length,
                may_trim,
                fua,
            } => {
                let mode = ZeroMode {
                    may_trim,
                    fast_only: false,
                    fua,
                };
                self.apply(
                    offset,
                    length,
                    self.image.write_zeroes(offset, length, mode),
                )
                .await
            }
            Message::Flush => match self.image.flush().await {
                Ok(()) => Message::Ack { errno: 0 },
                Err(e) => {
                    // During a resync too: its end must not make this copy consistent (the
                    // primary marks what the flush covered, for a pass to come).
                    self.failed_since_resync_start
                        .store(true, Ordering::Release);
                    self.become_inconsistent("a flush failed");
                    Message::Ack {
                        errno: errno_of(&e),
                    }
                }
            },
            Message::ResyncStart { bytes } => self.resync_target_start(bytes),
            Message::ResyncData {
                offset,
                raw_len,
                compressed,
                raw_crc,
                payload,
            } => {
                self.resync_target_data(offset, raw_len, compressed, raw_crc, payload)
                    .await
            }
            Message::ResyncZero { offset, length } => {
                let mode = ZeroMode {
                    may_trim: true,
                    fast_only: false,
                    fua: false,
                };
                let r = self
                    .apply(
                        offset,
                        length,
                        self.image.write_zeroes(offset, length, mode),
                    )
                    .await;
                self.count_received(length);
                r
            }
            Message::ResyncHash {
                offset,
                length,
                hash,
            } => match self.hash_range(offset, length).await {
                Ok(h) => Message::HashMatch { equal: h == hash },
                Err(_) => Message::HashMatch { equal: false },
            },
            Message::ResyncDone { generations } => self.resync_target_done(generations).await,
            Message::HashRequest {
                offset,
                length,
                block,
            } => self.hash_blocks(offset, length, block).await,
            Message::Discard => self.discard_self(),
            other => {
                warn!(volume = %self.name, peer = %link.peer_node, message = ?other, "unexpected request from the peer; closing the link");
                link.close();
                return;
            }
        };
        // The primary reads a failure answer as "the peer marked its copy inconsistent" and
        // keeps no record of its own. When this copy could not mark itself, an answer would
        // leave it claiming to be consistent without the data: no answer (a closed link)
        // makes the primary record the range and start a generation of its own instead.
        if matches!(reply, Message::Ack { errno } if errno != 0)
            && self.inconsistency_unrecorded.load(Ordering::Acquire)
        {
            error!(volume = %self.name, peer = %link.peer_node,
                   "a local failure could not be recorded in the metadata: closing the link instead of answering, so the primary keeps the record");
            link.close();
            return;
        }
        link.send(seq, &reply);
    }

    fn in_range(&self, offset: u64, len: u64) -> bool {
        offset.checked_add(len).is_some_and(|e| e <= self.size)
    }

    async fn apply(
        &self,
        offset: u64,
        len: u64,
        op: impl std::future::Future<Output = BackendResult<()>>,
    ) -> Message {
        if !self.in_range(offset, len) {
            return Message::Ack {
                errno: libc::EINVAL as u32,
            };
        }
        match op.await {
            Ok(()) => {
                if len > 0 {
                    self.has_data_cache.store(true, Ordering::Relaxed);
                }
                Message::Ack { errno: 0 }
            }
            Err(e) => {
                error!(volume = %self.name, offset, len, error = %e, "local I/O error applying the primary's write; this copy is now inconsistent");
                self.failed_since_resync_start
                    .store(true, Ordering::Release);
                // Our own dirty map lists the range before the peer hears we are
                // inconsistent: its resync copies the union of both maps, so the range is
                // copied even if the primary has not yet recorded the failed write itself.
                if len > 0 {
                    if let Err(me) = self.meta.mark_dirty(offset, len) {
                        error!(volume = %self.name, error = %me, "cannot record the failed range");
                    }
                }
                lock(&self.shared).target_progress = None;
                self.become_inconsistent("a mirrored write failed");
                self.announce();
                Message::Ack {
                    errno: errno_of(&e),
                }
            }
        }
    }

    /// This copy lacks a write the primary has: it must not be promoted until resynced.
    fn become_inconsistent(&self, why: &str) {
        // What a failed flush may have dropped here is the resync's now (the primary records
        // what this copy lacks): later flushes count again.
        self.image.forgive_failed_flush();
        if self.meta.flags().contains(Flags::CONSISTENT) {
            if let Err(e) = self
                .meta
                .update_header(|h| h.flags.set(Flags::CONSISTENT, false))
            {
                error!(volume = %self.name, error = %e, "cannot mark the copy inconsistent");
                self.inconsistency_unrecorded.store(true, Ordering::Release);
            }
            warn!(volume = %self.name, why, "copy marked inconsistent until a resync completes");
            self.announce();
        }
    }

    fn count_received(&self, n: u64) {
        self.resync_received.fetch_add(n, Ordering::Relaxed);
        if let Some(p) = lock(&self.shared).target_progress.as_mut() {
            p.done = p.done.saturating_add(n);
        }
    }

    fn resync_target_start(&self, bytes: u64) -> Message {
        self.failed_since_resync_start
            .store(false, Ordering::Release);
        if let Err(e) = self
            .meta
            .update_header(|h| h.flags.set(Flags::CONSISTENT, false))
        {
            error!(volume = %self.name, error = %e, "cannot mark the copy inconsistent before a resync");
            return Message::Ack {
                errno: libc::EIO as u32,
            };
        }
        info!(volume = %self.name, bytes, "resync from the peer started; this copy is inconsistent until it ends");
        lock(&self.shared).target_progress = Some(Progress {
            total: bytes,
            done: 0,
            started: Some(Instant::now()),
        });
        Message::Ack { errno: 0 }
    }

    async fn resync_target_data(
        &self,
        offset: u64,
        raw_len: u32,
        compressed: bool,
        raw_crc: u32,
        payload: Vec<u8>,
    ) -> Message {
        if !self.in_range(offset, u64::from(raw_len)) {
            // Before decompressing: a chunk outside the volume would be refused anyway.
            return Message::Ack {
                errno: libc::EINVAL as u32,
            };
        }
        let data = if compressed {
            match zstd::bulk::decompress(&payload, raw_len as usize) {
                Ok(d) if d.len() == raw_len as usize => d,
                _ => {
                    warn!(volume = %self.name, offset, "resync chunk does not decompress; refused");
                    return Message::Ack {
                        errno: libc::EBADMSG as u32,
                    };
                }
            }
        } else {
            payload
        };
        if crc32fast::hash(&data) != raw_crc {
            warn!(volume = %self.name, offset, "resync chunk checksum mismatch; refused");
            return Message::Ack {
                errno: libc::EBADMSG as u32,
            };
        }
        let len = data.len() as u64;
        let r = self
            .apply(offset, len, self.image.write_through(offset, data, false))
            .await;
        self.count_received(len);
        r
    }

    async fn resync_target_done(&self, generations: Generations) -> Message {
        // Off the link's thread: the resync's page-cache writes can take long to write back.
        if let Err(e) = self.image.flush_off_thread().await {
            self.become_inconsistent("the flush at the end of the resync failed");
            // This resync is over (status: no longer "syncing"); the source starts another.
            lock(&self.shared).target_progress = None;
            return Message::Ack {
                errno: errno_of(&e),
            };
        }
        // Checked after the flush, not before: a mirrored write may also have failed while it
        // ran (its error path marks the range and clears CONSISTENT). From here on nothing
        // awaits, so no other request of this volume's thread runs before the header says
        // consistent.
        if self.failed_since_resync_start.load(Ordering::Acquire) {
            warn!(volume = %self.name, "a write failed here during the resync: staying inconsistent until the next one");
            lock(&self.shared).target_progress = None;
            self.announce();
            return Message::Ack {
                errno: libc::EIO as u32,
            };
        }
        // Everything our own dirty map listed was part of the union the source sent.
        let _ = self.meta.clear_dirty(0, self.size);
        let r = self.meta.flush().and_then(|_| {
            self.meta.update_header(|h| {
                h.generations = generations;
                h.generations.sync = generations.current;
                h.flags.set(Flags::CONSISTENT, true);
                h.flags.set(Flags::UNCONFIRMED, false);
                h.flags.set(Flags::LOST_CACHE, false);
            })
        });
        if let Err(e) = r {
            error!(volume = %self.name, error = %e, "cannot record the end of the resync");
            return Message::Ack {
                errno: libc::EIO as u32,
            };
        }
        lock(&self.shared).target_progress = None;
        info!(volume = %self.name, generation = %format_gen(generations.current), "resync from the peer complete; this copy is consistent");
        self.announce();
        Message::Ack { errno: 0 }
    }

    fn discard_self(&self) -> Message {
        if self.role() == Role::Primary {
            // An Ack, not an Error: only responses reach the waiting request (an Error frame
            // is read as the peer's own report and left the operator's resolve hanging).
            warn!(volume = %self.name, "the peer asked this node to discard its data, but it is primary; refused");
            return Message::Ack {
                errno: libc::EBUSY as u32,
            };
        }
        self.become_inconsistent("an operator chose to discard this node's data");
        // become_inconsistent announces only on a change; make sure the peer re-decides.
        self.announce();
        Message::Ack { errno: 0 }
    }

    async fn hash_range(&self, offset: u64, len: u64) -> BackendResult<[u8; 32]> {
        if !self.in_range(offset, len) || len > HASH_BLOCK_MAX {
            return Err(BackendError::io(
                "hash",
                offset,
                len,
                std::io::Error::from_raw_os_error(libc::EINVAL),
            ));
        }
        // What the disk holds, not the page cache: after a failed write-back the cache can
        // keep data the disk never got (clean pages, the error already reported), and a
        // resync's checksum pass would then skip a chunk the target lacks, or verify call two
        // differing disks equal. An O_DIRECT read writes dirty pages back first.
        let data = self.image.read_uncached(offset, len as usize).await?;
        Ok(*blake3::hash(data.bytes()).as_bytes())
    }

    async fn hash_blocks(&self, offset: u64, length: u64, block: u32) -> Message {
        let block = u64::from(block.max(4096));
        if !self.in_range(offset, length) || length.div_ceil(block) > 64 {
            return Message::Ack {
                errno: libc::EINVAL as u32,
            };
        }
        let mut hashes = Vec::new();
        let mut off = offset;
        while off < offset + length {
            let n = block.min(offset + length - off);
            match self.hash_range(off, n).await {
                Ok(h) => hashes.push(h),
                Err(e) => {
                    return Message::Ack {
                        errno: errno_of(&e),
                    }
                }
            }
            off += n;
        }
        Message::HashReply { hashes }
    }

    // ----- resync source -----

    fn union_peer_dirty_map(&self) -> Result<(), VolumeError> {
        let merr = |source| VolumeError::Metadata {
            volume: self.name.clone(),
            source,
        };
        let peer_map = lock(&self.shared)
            .peer
            .as_ref()
            .map(|p| p.dirty_map.clone());
        if let Some(map) = peer_map {
            let g = u64::from(self.meta.granularity());
            for r in map.bits().runs() {
                let b = bitmap::bits_to_bytes(r, g, self.size);
                self.meta
                    .mark_dirty(b.start, b.end - b.start)
                    .map_err(merr)?;
            }
        }
        Ok(())
    }

    async fn run_resync_source(
        self: &Arc<Self>,
        link: &Arc<Link>,
        full: bool,
    ) -> Result<(), VolumeError> {
        let verr = |source| VolumeError::Link {
            volume: self.name.clone(),
            source,
        };
        let merr = |source| VolumeError::Metadata {
            volume: self.name.clone(),
            source,
        };
        self.meta.resync_starting();
        if full {
            self.meta.mark_all_dirty().map_err(merr)?;
        }
        let handed_over = loop {
            // Once before (so the target's progress counts it), once after the acknowledgement.
            self.union_peer_dirty_map()?;
            let total = self.meta.dirty_bytes();
            match link
                .request(&Message::ResyncStart { bytes: total })
                .await
                .map_err(verr)?
            {
                Message::Ack { errno: 0 } => {}
                other => {
                    return Err(VolumeError::Refused {
                        volume: self.name.clone(),
                        what: format!("the peer refused the resync: {other:?}"),
                    })
                }
            }
            // The union of both dirty maps, read after the peer acknowledged ResyncStart: a
            // write that failed on the peer before that is in the state it announced first
            // (frames arrive in order); one that fails later keeps it inconsistent.
            self.union_peer_dirty_map()?;
            let total = self.meta.dirty_bytes();
            info!(volume = %self.name, peer = %link.peer_node, bytes = total, full, "resync to the peer started");
            lock(&self.shared).source_progress = Some(Progress {
                total,
                done: 0,
                started: Some(Instant::now()),
            });
            let limiter = RateLimiter::new(self.resync.rate);
            // Tasks, not a FuturesUnordered: chunks must make progress while this loop
            // waits for the rate limiter or for a slot (futures in a set that is not being
            // polled stall, and did: a rate-limited resync sent nothing until its end).
            let mut inflight = tokio::task::JoinSet::new();
            let sent = self.send_pass(link, &limiter, &mut inflight).await;
            if sent.is_err() {
                // Chunks still in flight run to their end, never aborted: an aborted chunk
                // releases its range lock while its frame may still be on its way, and a
                // client write to that range would then travel the same link beside it and
                // could be applied first on the peer, then overwritten.
                while inflight.join_next().await.is_some() {}
            }
            sent?;
            if link.is_closed() {
                return Err(verr(LinkError::Down));
            }
            // The pass's chunks stay dirty until the target flushed them: settle them, then
            // see whether anything is left.
            if self.flush_peer(link).await.map_err(merr)? != PeerFlush::Done {
                if link.is_closed() {
                    return Err(verr(LinkError::Down));
                }
                return Err(VolumeError::Refused {
                    volume: self.name.clone(),
                    what: "the peer failed to flush the resync data".into(),
                });
            }
            if self.meta.dirty_count() != 0 {
                // Writes the peer failed during the pass: go again.
                continue;
            }
            let gens = self.meta.generations();
            // The target flushes before it calls itself consistent: that flush covers the
            // chunks (and mirrored writes) it acknowledged before, as a peer flush does. Sent
            // only if nothing went dirty meanwhile (a client FLUSH the peer failed while this
            // pass waited for the flush lock): otherwise another pass first.
            let sent = self
                .request_peer_flush_if(
                    link,
                    &Message::ResyncDone { generations: gens },
                    "the end of the resync",
                    || {
                        let clean = self.meta.dirty_count() == 0;
                        if clean {
                            // Cleared by `mark_in_sync` on a clean answer, or by the next new
                            // generation.
                            self.handover_unanswered.store(true, Ordering::Release);
                        }
                        clean
                    },
                )
                .await
                .map_err(merr)?;
            let Some(reply) = sent else { continue };
            match reply.map_err(verr)? {
                Message::Ack { errno: 0 } => break gens.current,
                other => {
                    return Err(VolumeError::Refused {
                        volume: self.name.clone(),
                        what: format!("the peer failed to finish the resync: {other:?}"),
                    })
                }
            }
        };
        let took = lock(&self.shared)
            .source_progress
            .take()
            .and_then(|p| p.started)
            .map(|s| s.elapsed());
        if !self.mark_in_sync(handed_over) {
            // A write alone started a newer generation after the handover (the link dropped
            // meanwhile, or the peer refused it): what it wrote still has to go over.
            self.announce();
            return Err(VolumeError::Refused {
                volume: self.name.clone(),
                what: "this node wrote alone while the resync ended; another pass follows".into(),
            });
        }
        info!(volume = %self.name, peer = %link.peer_node, took = ?took, sent_total = self.resync_sent.load(Ordering::Relaxed), "resync to the peer complete: in sync");
        self.announce();
        Ok(())
    }

    /// One pass's chunks, each a task in `inflight`, in the window and at the rate allowed;
    /// returns when all were acknowledged, or at the first failure (the caller waits for the
    /// others then).
    async fn send_pass(
        self: &Arc<Self>,
        link: &Arc<Link>,
        limiter: &RateLimiter,
        inflight: &mut tokio::task::JoinSet<Result<u64, VolumeError>>,
    ) -> Result<(), VolumeError> {
        let verr = |source| VolumeError::Link {
            volume: self.name.clone(),
            source,
        };
        let merr = |source| VolumeError::Metadata {
            volume: self.name.clone(),
            source,
        };
        let mut window = ResyncWindow::default();
        let mut acked_since_flush = 0u64;
        for (off, len) in self.meta.dirty_ranges() {
            let mut c = off;
            while c < off + len {
                if acked_since_flush >= RESYNC_FLUSH_EVERY {
                    // Bounds what a target that loses power copies again (what it
                    // acknowledged since its last flush; see chunk_done).
                    if self.flush_peer(link).await.map_err(merr)? != PeerFlush::Done
                        && link.is_closed()
                    {
                        return Err(verr(LinkError::Down));
                    }
                    acked_since_flush = 0;
                }
                let n = (CHUNK - c % CHUNK).min(off + len - c);
                // Bounded: each round takes one chunk out of the window, and the window
                // admits any chunk once it is empty.
                while !window.admits(n, self.app_inflight.load(Ordering::Relaxed) > 0) {
                    match inflight.join_next().await {
                        Some(r) => {
                            let done = self.chunk_task_result(r)?;
                            acked_since_flush += done;
                            window.finish(done);
                        }
                        None => break,
                    }
                }
                limiter.take(n).await;
                window.start(n);
                let (me, link) = (self.clone(), link.clone());
                inflight.spawn(async move { me.send_chunk(&link, c, n).await.map(|()| n) });
                c += n;
            }
        }
        while let Some(r) = inflight.join_next().await {
            window.finish(self.chunk_task_result(r)?);
        }
        Ok(())
    }

    async fn send_chunk(
        self: &Arc<Self>,
        link: &Arc<Link>,
        offset: u64,
        len: u64,
    ) -> Result<(), VolumeError> {
        let verr = |source| VolumeError::Link {
            volume: self.name.clone(),
            source,
        };
        let ioerr = |source| VolumeError::Io {
            volume: self.name.clone(),
            source,
        };
        let _range = self.locks.lock(offset, len).await;
        let sent = self.meta.resync_ticket();
        let extents = self
            .image
            .block_status(offset, len, 4)
            .await
            .map_err(ioerr)?;
        let hole = extents.len() == 1
            && extents[0].length >= len
            && extents[0].flags & nbd_server::proto::STATE_ZERO != 0;
        let reply = if hole {
            link.request(&Message::ResyncZero {
                offset,
                length: len,
            })
            .await
            .map_err(verr)?
        } else {
            let chunk = self
                .image
                .read_uncached(offset, len as usize)
                .await
                .map_err(ioerr)?;
            let data = chunk.bytes();
            if self.resync.checksum {
                let hash = *blake3::hash(data).as_bytes();
                if let Message::HashMatch { equal: true } = link
                    .request(&Message::ResyncHash {
                        offset,
                        length: len,
                        hash,
                    })
                    .await
                    .map_err(verr)?
                {
                    // Equal on both sides: progress, but no data carried.
                    self.chunk_done(link, offset, len, sent, false);
                    return Ok(());
                }
            }
            let raw_crc = crc32fast::hash(data);
            let raw_len = data.len() as u32;
            // After a run of incompressible chunks, try only one chunk in 16 (to notice when
            // the data changes): compressing random data costs CPU for nothing.
            let streak = self.incompressible_streak.load(Ordering::Relaxed);
            let try_zstd = streak < 4 || (offset / CHUNK).is_multiple_of(16);
            let zstd = if try_zstd {
                let (packed, data) = blocking(&self.name, move || {
                    let packed = compress(chunk.bytes());
                    (packed, chunk)
                })
                .await?;
                match packed {
                    Some(p) => {
                        self.incompressible_streak.store(0, Ordering::Relaxed);
                        Ok(p)
                    }
                    None => {
                        self.incompressible_streak.fetch_add(1, Ordering::Relaxed);
                        Err(data)
                    }
                }
            } else {
                Err(chunk)
            };
            // Framed straight from the buffer the chunk was read (or compressed) into.
            let mut frame = Vec::new();
            match &zstd {
                Ok(packed) => {
                    encode_resync_data(0, offset, raw_len, true, raw_crc, packed, &mut frame)
                }
                Err(raw) => {
                    encode_resync_data(0, offset, raw_len, false, raw_crc, raw.bytes(), &mut frame)
                }
            }
            drop(zstd);
            link.request_bulk_frame(frame).await.map_err(verr)?
        };
        match reply {
            Message::Ack { errno: 0 } => {
                self.chunk_done(link, offset, len, sent, true);
                Ok(())
            }
            other => Err(VolumeError::Refused {
                volume: self.name.clone(),
                what: format!("the peer failed a resync chunk at offset {offset}: {other:?}"),
            }),
        }
    }

    /// The bytes of a finished chunk task, or its error.
    fn chunk_task_result(
        &self,
        r: Result<Result<u64, VolumeError>, tokio::task::JoinError>,
    ) -> Result<u64, VolumeError> {
        r.map_err(|e| VolumeError::Refused {
            volume: self.name.clone(),
            what: format!("a resync task failed: {e}"),
        })?
    }

    /// The target acknowledged a chunk: it is in the target's page cache (or on its way to
    /// the disk), not yet durable there. Its dirty bits stay set, on disk too, until a peer
    /// flush covers it (`MetadataFile::settle_resync`): cleared at once, they were lost
    /// with this process if it crashed while the target lost power, and the next resync
    /// skipped what the target never wrote. If the link closed meanwhile (link_down may
    /// have forgotten the pending set already), or a peer flush failed since it was sent
    /// (that flush may have lost it), no later flush may settle the chunk.
    fn chunk_done(&self, link: &Link, offset: u64, len: u64, sent: SentTicket, carried: bool) {
        self.meta.resync_carried(offset, len, sent);
        if link.is_closed() {
            self.meta.forget_resync_pending(Some((offset, len)));
        }
        if carried {
            self.resync_sent.fetch_add(len, Ordering::Relaxed);
        }
        if let Some(p) = lock(&self.shared).source_progress.as_mut() {
            p.done += len;
        }
    }

    // ----- operator actions -----

    /// Promotes this node for the volume; returns a warning to show the operator, if any.
    pub async fn promote(self: &Arc<Self>, force: bool) -> Result<Option<String>, VolumeError> {
        if self.role() == Role::Primary {
            return Ok(Some("already primary".into()));
        }
        if self.is_shutting_down() {
            return Err(VolumeError::Refused {
                volume: self.name.clone(),
                what: "the daemon is stopping".into(),
            });
        }
        self.demoting.store(false, Ordering::Release);
        let local = self.local_side();
        let (peer, link) = {
            let sh = lock(&self.shared);
            (sh.peer.as_ref().map(|p| p.side), sh.link.clone())
        };
        let effect = decide::check_promote(&local, peer.as_ref(), force).map_err(|reason| {
            VolumeError::PromoteRefused {
                volume: self.name.clone(),
                reason,
            }
        })?;
        self.wait_for_gone_links(PROMOTE_DRAIN_LIMIT).await?;
        let merr = |source| VolumeError::Metadata {
            volume: self.name.clone(),
            source,
        };
        if effect.new_generation {
            let gated = *self.alone_gate.borrow() != ALONE_ALWAYS;
            let g = self
                .meta
                .start_new_generation_unconfirmed(gated)
                .map_err(merr)?;
            info!(volume = %self.name, generation = %format_gen(g), "new generation");
        }
        if effect.all_dirty {
            self.meta.mark_all_dirty().map_err(merr)?;
        }
        if force && !local.consistent {
            self.meta
                .update_header(|h| h.flags.set(Flags::CONSISTENT, true))
                .map_err(merr)?;
            warn!(volume = %self.name, "forced promotion of an inconsistent copy");
        }
        if effect.peer_adopts {
            if let Some(link) = &link {
                let gens = self.meta.generations();
                self.handover_unanswered.store(true, Ordering::Release);
                match link
                    .request(&Message::ResyncDone { generations: gens })
                    .await
                {
                    Ok(Message::Ack { errno: 0 }) => {
                        self.mark_in_sync(gens.current);
                        info!(volume = %self.name, "both images are new: no initial copy");
                    }
                    other => {
                        // The peer will get a full copy instead.
                        warn!(volume = %self.name, reply = ?other.ok(), "the peer did not adopt the first generation; it will receive a full copy");
                        self.meta.mark_all_dirty().map_err(merr)?;
                    }
                }
            }
        }
        // Promoted, this copy is the reference whatever it lost (alone, or by the
        // operator's choice when both lost theirs).
        self.meta
            .update_header(|h| {
                h.flags.set(Flags::PRIMARY, true);
                h.flags.set(Flags::LOST_CACHE, false);
            })
            .map_err(merr)?;
        lock(&self.shared).role = Role::Primary;
        self.was_primary.store(true, Ordering::Release);
        info!(volume = %self.name, "promoted to primary");
        self.announce();
        self.redecide();
        Ok(effect.warn_alone.then(|| {
            "promoted without the peer: make sure the other node is down or demoted; if it is still primary, the split brain is detected when they reconnect and neither copy is overwritten".to_string()
        }))
    }

    /// Before this node takes writes of its own, the requests of the old primary still on
    /// this disk must have ended, on links already gone and on the live one alike (a swap
    /// whose demotion stopped waiting for a slow write after 30 s): one landing after a write
    /// of the new primary would overwrite it, with no dirty bit anywhere (the same reason as
    /// `link_up` waits). Bounded: a disk that does not finish them gets the promotion
    /// refused, with the reason, rather than hung (the failover logic tries again).
    async fn wait_for_gone_links(&self, limit: Duration) -> Result<(), VolumeError> {
        let deadline = Instant::now() + limit;
        loop {
            let in_service: usize = {
                let mut sh = lock(&self.shared);
                sh.retired.retain(|l| !l.is_drained());
                sh.retired
                    .iter()
                    .chain(sh.link.as_ref())
                    .map(|l| l.requests_in_service())
                    .sum()
            };
            if in_service == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(VolumeError::Refused {
                    volume: self.name.clone(),
                    what: format!(
                        "{in_service} request(s) of the previous primary are still in service on this node's disk after {limit:?} (a slow or hung disk?); promoting now could let them land over the new primary's writes. Try again once they finished"
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Demotes this node; the caller has stopped the NBD export first.
    pub async fn demote(self: &Arc<Self>) -> Result<(), VolumeError> {
        if self.role() == Role::Secondary {
            return Ok(());
        }
        // Writes still in flight hold range locks; wait for them.
        for _ in 0..3000 {
            if self.app_inflight.load(Ordering::Acquire) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Off this thread: a demotion runs on the main runtime, where the heartbeats and the
        // witness lease are served, and an fdatasync of gigabytes of dirty cache could
        // outlast the peer timeout.
        if let Err(source) = self.flush_all(Thread::Other).await {
            // A disk that fails its flushes must not keep the volume here: once the peer
            // flushed everything (it holds every acknowledged write), demoting is what the
            // operator needs. Otherwise the error stands.
            let peer_has_all = self.meta.activity_held()
                && match self.mirror_link() {
                    Some(link) => matches!(self.flush_peer(&link).await, Ok(PeerFlush::Done)),
                    None => false,
                };
            if !peer_has_all {
                return Err(VolumeError::Io {
                    volume: self.name.clone(),
                    source,
                });
            }
            warn!(volume = %self.name, error = %source, "this node's flush failed, the peer's succeeded: demoting");
        }
        lock(&self.shared).role = Role::Secondary;
        self.set_mirror(None);
        if self.meta.activity_held() {
            // What a failed flush may have dropped here lies in the marked extents: dirty,
            // with this copy flagged as having lost its cache, they are resynced from the
            // peer (primary next, or the source at the generation both share).
            match self.meta.mark_activity_dirty() {
                Ok(bytes) => {
                    warn!(volume = %self.name, bytes, "after a failed local flush, the extents written since are resynced from the peer");
                    // Handled: what it may have dropped is the resync's now, so this copy's
                    // flushes (the resync's own) count again.
                    self.image.forgive_failed_flush();
                }
                Err(e) => {
                    error!(volume = %self.name, error = %e, "cannot mark the extents written since a failed flush")
                }
            }
        }
        self.meta
            .update_header(|h| h.flags.set(Flags::PRIMARY, false))
            .map_err(|source| VolumeError::Metadata {
                volume: self.name.clone(),
                source,
            })?;
        self.demoting.store(false, Ordering::Release);
        info!(volume = %self.name, "demoted to secondary");
        self.announce();
        self.redecide();
        Ok(())
    }

    /// Flushes the local image and the peer; says how the peer's part went (unless it
    /// flushed, what it may lack is marked dirty).
    async fn flush_all(&self, thread: Thread) -> BackendResult<PeerFlush> {
        self.settle_unrecorded_unflushed().map_err(meta_io)?;
        let cold = self.meta.take_cold();
        let link = self.mirror_link();
        let local = async {
            match thread {
                Thread::Caller => self.image.flush().await,
                Thread::Other => self.image.flush_off_thread().await,
            }
        };
        let peer_ok = async {
            match &link {
                Some(l) => self.flush_peer(l).await,
                None => {
                    // The link closed and `link_down` has not drained what the peer
                    // acknowledged but never flushed (or a thread saw the mirror go before
                    // it did): recorded dirty now, so this FLUSH counts it (a new
                    // generation, see `client_flush`) and the cold extents cleared below
                    // stay covered.
                    self.drain_unflushed_into_dirty()?;
                    Ok(PeerFlush::Absent)
                }
            }
        };
        // The peer's flush is sent first: the local one may block this thread (an inline
        // fdatasync when the flush is alone), and the two should overlap.
        let (p, l) = futures::join!(peer_ok, local);
        if let Err(e) = l {
            self.local_flush_failed(&e);
            return Err(e);
        }
        // A peer that failed the flush is fine once what it may lack is marked dirty (the
        // resync brings it over); not being able to mark it is not.
        let peer = p.map_err(meta_io)?;
        self.meta.clear_cold(cold);
        Ok(peer)
    }

    /// This node's disk failed a flush: writes it acknowledged may be gone from its page
    /// cache without reaching the disk, while the peer holds them. Their extents stay marked
    /// (the next flush, which may succeed, must not clear them), and the copy is flagged as
    /// having lost its cache, so that after a restart at the generation both share the peer's
    /// copy of them is taken.
    fn local_flush_failed(&self, e: &BackendError) {
        self.meta.hold_activity();
        let first = !self.meta.flags().contains(Flags::LOST_CACHE);
        if let Err(me) = self
            .meta
            .update_header(|h| h.flags.set(Flags::LOST_CACHE, true))
        {
            error!(volume = %self.name, error = %me, "cannot record the failed flush in the metadata");
        }
        if first {
            error!(volume = %self.name, error = %e,
                   "this node's disk failed a flush: writes acknowledged here may be missing from this image (the peer holds them); check the disk, and move the volume to the peer (swap, or demote here and promote there)");
        }
    }

    /// A client's FLUSH. When the peer gave no answer (no link, or it went silent) and this
    /// node holds data the peer may lack (dirty granules: writes the peer acknowledged but
    /// may have lost with its page cache), acknowledging the FLUSH makes that data durable
    /// here alone: a write made alone in all but name, so it gets what such a write gets. A
    /// new generation, or the peer's copy would look as current as this one (a peer that
    /// lost power with those writes would come back at the same generation and could be
    /// promoted, or chosen as the resync source, over them); and with a witness, that
    /// generation registered before the acknowledgement. A peer that answered with an error
    /// needs none of this: it marked its copy inconsistent first.
    async fn client_flush(&self) -> BackendResult<()> {
        let peer = self.flush_all(Thread::Caller).await?;
        if self.role() != Role::Primary {
            // Demoted meanwhile: like a write racing the demotion, refused unless both
            // nodes flushed.
            return match peer {
                PeerFlush::Done => Ok(()),
                _ => Err(BackendError::ShuttingDown),
            };
        }
        if peer != PeerFlush::Absent {
            return Ok(());
        }
        let g = self.meta.generations();
        let solo = g.current != g.sync && g.current != 0;
        if !solo && self.meta.dirty_count() == 0 {
            // The peer has everything this node has: nothing rests on this node alone.
            return Ok(());
        }
        self.ensure_solo_generation().map_err(meta_io)?;
        if self.meta.flags().contains(Flags::UNCONFIRMED) {
            self.wait_alone_allowed().await?;
        }
        Ok(())
    }

    /// Split-brain resolution: returns the bytes of `discard_on`'s writes that are thrown
    /// away (its dirty bytes); unless `dry_run`, that side becomes the resync target.
    pub async fn resolve(
        self: &Arc<Self>,
        discard_on: &str,
        dry_run: bool,
    ) -> Result<u64, VolumeError> {
        let refused = |what: String| VolumeError::Refused {
            volume: self.name.clone(),
            what,
        };
        let (plan, peer, link) = {
            let sh = lock(&self.shared);
            (sh.plan.clone(), sh.peer.clone(), sh.link.clone())
        };
        let (Some(peer), Some(link)) = (peer, link) else {
            return Err(refused(
                "the peer is not connected; resolve needs both nodes up".into(),
            ));
        };
        // The node name first: a typo is the likelier mistake, whatever the state.
        if discard_on != self.node && discard_on != link.peer_node {
            return Err(refused(format!(
                "unknown node {discard_on:?}: --discard-on takes {:?} (this node) or {:?} (its peer)",
                self.node, link.peer_node
            )));
        }
        if !matches!(plan, Some(Plan::SplitBrain { .. })) {
            return Err(refused(format!(
                "there is no split brain to resolve ({})",
                plan.as_ref().map_or_else(
                    || "the pair has not compared its copies yet".to_string(),
                    Plan::describe
                )
            )));
        }
        // A copy without mirror history (its metadata was lost) that is kept needs a
        // generation of its own to be a resync source; only its own node can start one.
        let no_history = |gens: &Generations| gens.current == 0;
        if discard_on == self.node {
            if self.role() == Role::Primary {
                return Err(refused(format!(
                    "{} is primary; demote it first",
                    self.node
                )));
            }
            if no_history(&peer.side.generations) {
                return Err(refused(format!(
                    "{} keeps its copy but has no mirror history yet: run `nbdmirror resolve {} \
                     --discard-on {}` on {} instead",
                    link.peer_node, self.name, self.node, link.peer_node
                )));
            }
            let bytes = self.meta.dirty_bytes();
            if !dry_run {
                warn!(volume = %self.name, bytes, "discarding this node's writes made during the split brain");
                self.become_inconsistent("split brain resolved against this node");
                self.announce();
            }
            Ok(bytes)
        } else {
            // The peer (checked above).
            if peer.side.role == Role::Primary {
                return Err(refused(format!(
                    "{} is primary; demote it first",
                    link.peer_node
                )));
            }
            if !dry_run && no_history(&self.meta.generations()) {
                let merr = |source| VolumeError::Metadata {
                    volume: self.name.clone(),
                    source,
                };
                let g = self.meta.start_new_generation().map_err(merr)?;
                self.meta.mark_all_dirty().map_err(merr)?;
                info!(volume = %self.name, generation = %format_gen(g),
                      "this copy, kept without mirror history, starts a generation: the peer receives all of it");
                self.announce();
            }
            if !dry_run {
                match link.request(&Message::Discard).await {
                    Ok(Message::Ack { errno: 0 }) => {}
                    Ok(Message::Ack { errno }) if errno == libc::EBUSY as u32 => {
                        return Err(refused(format!(
                            "{} became primary meanwhile; demote it before discarding its data",
                            link.peer_node
                        )))
                    }
                    Ok(Message::Error { message }) => return Err(refused(message)),
                    Ok(other) => return Err(refused(format!("the peer refused: {other:?}"))),
                    Err(source) => {
                        return Err(VolumeError::Link {
                            volume: self.name.clone(),
                            source,
                        })
                    }
                }
            }
            Ok(peer.dirty_bytes)
        }
    }

    /// Compares both copies block by block; differing blocks are marked dirty (and resynced
    /// from the primary). Returns (bytes compared, differing bytes).
    pub async fn verify(self: &Arc<Self>) -> Result<(u64, u64), VolumeError> {
        let link = lock(&self.shared)
            .link
            .clone()
            .ok_or_else(|| VolumeError::Refused {
                volume: self.name.clone(),
                what: "the peer is not connected; verify compares both copies".into(),
            })?;
        // Copies a resync or a split brain keeps apart differ by design: counting them would
        // alarm a monitoring job for nothing, and marking them would promise a repair that
        // the plan (or `resolve`) decides.
        let (plan, peer_primary) = {
            let sh = lock(&self.shared);
            let peer_primary = sh
                .peer
                .as_ref()
                .is_some_and(|p| p.side.role == Role::Primary);
            (sh.plan.clone(), peer_primary)
        };
        let not_now = |why: String| VolumeError::Refused {
            volume: self.name.clone(),
            what: why,
        };
        match plan {
            Some(Plan::InSync) => {}
            Some(Plan::SplitBrain { .. }) => {
                return Err(not_now(
                    "the pair is in split brain: its copies differ until `nbdmirror resolve` \
                     picks one; verify after that"
                        .into(),
                ))
            }
            Some(p) => {
                return Err(not_now(format!(
                    "the pair is not in sync ({}); verify compares copies that should be \
                     equal: run it once `status` says in-sync",
                    p.describe()
                )))
            }
            None => {
                return Err(not_now(
                    "the nodes have not compared their states yet; try again in a moment".into(),
                ))
            }
        }
        // Only the primary's range locks order its hashes against the writes it mirrors: run
        // here, a write in flight would hash differently on the two nodes and count as a
        // difference.
        if self.role() == Role::Secondary && peer_primary {
            return Err(not_now(format!(
                "run verify on the primary, {}: here mirrored writes cannot be held back \
                 while the copies are compared",
                link.peer_node
            )));
        }
        let verr = |source| VolumeError::Link {
            volume: self.name.clone(),
            source,
        };
        const SPAN: u64 = 8 * CHUNK;
        let mut off = 0;
        let mut differing = 0;
        while off < self.size {
            let len = SPAN.min(self.size - off);
            let _range = self.locks.lock(off, len).await;
            let reply = link
                .request(&Message::HashRequest {
                    offset: off,
                    length: len,
                    block: CHUNK as u32,
                })
                .await
                .map_err(verr)?;
            let Message::HashReply { hashes } = reply else {
                return Err(VolumeError::Refused {
                    volume: self.name.clone(),
                    what: format!("the peer could not hash {off}+{len}: {reply:?}"),
                });
            };
            if hashes.len() as u64 != len.div_ceil(CHUNK) {
                // Fewer would leave blocks unchecked yet counted as compared.
                return Err(VolumeError::Refused {
                    volume: self.name.clone(),
                    what: format!(
                        "the peer sent {} hashes for {off}+{len}, expected {}",
                        hashes.len(),
                        len.div_ceil(CHUNK)
                    ),
                });
            }
            let mut b = off;
            for theirs in hashes {
                let n = CHUNK.min(off + len - b);
                let ours = self
                    .hash_range(b, n)
                    .await
                    .map_err(|source| VolumeError::Io {
                        volume: self.name.clone(),
                        source,
                    })?;
                if ours != theirs {
                    differing += n;
                    warn!(volume = %self.name, offset = b, len = n, "verify: the copies differ; marked for resync");
                    let _ = self.meta.mark_dirty(b, n);
                }
                b += n;
            }
            off += len;
        }
        if differing > 0 {
            self.announce();
            self.redecide();
        }
        Ok((self.size, differing))
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Clean shutdown: flush the image, leave the metadata clean.
    /// First step of a stop: no promotion from now on, and writes held waiting for the
    /// witness's permission fail (as in a demotion) instead of holding their connections.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
        self.begin_demote();
    }

    pub async fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
        let link = lock(&self.shared).link.take();
        if let Some(l) = link {
            // The next start trusts a clean metadata file, so what the peer acknowledged
            // without flushing must reach its disk now, or go into the dirty map below: a
            // peer whose host died a moment ago (its link not yet timed out) lost it.
            if !self.unflushed.is_empty() && !l.is_closed() {
                match tokio::time::timeout(SHUTDOWN_PEER_FLUSH, self.flush_peer(&l)).await {
                    // A flush that failed marked what it covered dirty itself.
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        error!(volume = %self.name, error = %e, "cannot record what the peer failed to flush")
                    }
                    Err(_) => {
                        warn!(volume = %self.name, peer = %l.peer_node, timeout = ?SHUTDOWN_PEER_FLUSH,
                                    "the peer did not answer the final flush; what it had not flushed is marked for resync")
                    }
                }
            }
            l.close();
        }
        self.record_unflushed_as_dirty();
        self.set_mirror(None);
        if let Err(e) = self.image.flush_off_thread().await {
            error!(volume = %self.name, error = %e, "final flush failed; the next start resyncs hot extents");
            return;
        }
        if let Err(e) = self.meta.clean_shutdown() {
            error!(volume = %self.name, error = %e, "clean shutdown of the metadata failed; the next start resyncs hot extents");
        }
    }

    pub fn status(&self) -> VolumeStatus {
        let sh = lock(&self.shared);
        let g = self.meta.generations();
        let dirty = self.meta.dirty_bytes();
        let consistent = self.meta.flags().contains(Flags::CONSISTENT);
        let (progress_left, eta) = {
            let p = sh.source_progress.as_ref().or(sh.target_progress.as_ref());
            match p {
                Some(p) => {
                    let left = if sh.source_progress.is_some() {
                        // Carried, waiting only for the target's next flush.
                        dirty.saturating_sub(self.meta.resync_pending_bytes())
                    } else {
                        p.total.saturating_sub(p.done)
                    };
                    let secs = p.started.map(|s| s.elapsed().as_secs_f64()).unwrap_or(0.0);
                    let rate = if secs > 0.0 {
                        p.done as f64 / secs
                    } else {
                        0.0
                    };
                    let eta = (rate > 0.0).then(|| (left as f64 / rate).ceil() as u64);
                    (left, eta)
                }
                None => (0, None),
            }
        };
        let syncing = sh.source_progress.is_some() || sh.target_progress.is_some();
        let sync = match (&sh.plan, syncing) {
            (Some(Plan::SplitBrain { .. }), _) => "split-brain",
            (_, true) => "syncing",
            (Some(Plan::InSync), false) if dirty == 0 && consistent => "in-sync",
            _ => "out-of-sync",
        };
        VolumeStatus {
            name: self.name.clone(),
            role: sh.role.as_str(),
            peer: if sh.link.is_some() {
                "connected"
            } else {
                "disconnected"
            },
            peer_node: sh.link.as_ref().map(|l| l.peer_node.clone()),
            sync,
            dirty_bytes: dirty,
            resync_bytes_sent: self.resync_sent.load(Ordering::Relaxed),
            resync_bytes_received: self.resync_received.load(Ordering::Relaxed),
            resync_bytes_left: progress_left,
            resync_eta_seconds: eta,
            generation: format_gen(g.current),
            metadata: self.metadata_path.display().to_string(),
            consistent,
            size: self.size,
            hot_extents: self.meta.hot_extents().len() as u64,
            reason: sh.reason.clone(),
        }
    }
}

/// A chunk compressed with zstd, if that saves at least a quarter of its bytes. Less is not
/// worth the CPU: zstd level 1 runs at ~400 MB/s a core here on data that shrinks by 1/8 (fio's
/// buffers), so sending such a 64 KiB chunk smaller saves ~70 us on a gigabit link and costs
/// ~150 us of CPU shared with the VM, and on a faster link the saving shrinks to nothing. A 1 %
/// resync of fio's data spent most of its 30 ms compressing. Text, binaries and file-system
/// metadata shrink by half or more and are still sent compressed.
fn compress(data: &[u8]) -> Option<Vec<u8>> {
    match zstd::bulk::compress(data, 1) {
        Ok(c) if c.len() <= data.len() - data.len() / 4 => Some(c),
        _ => None,
    }
}

/// Runs `work` on tokio's blocking pool. The calling thread does not poll meanwhile: that
/// would only take the pool thread's CPU.
async fn blocking<T: Send + 'static>(
    volume: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, VolumeError> {
    let _worker = nbd_server::spin::pause();
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| VolumeError::Refused {
            volume: volume.to_owned(),
            what: format!("a resync worker task failed: {e}"),
        })
}

fn encoded(m: &Message) -> Vec<u8> {
    let mut f = Vec::new();
    frame::encode(0, m, &mut f);
    f
}

pub fn format_gen(g: u64) -> String {
    format!("{g:016x}")
}

#[derive(Debug, Clone, Serialize)]
pub struct VolumeStatus {
    pub name: String,
    pub role: &'static str,
    pub peer: &'static str,
    pub peer_node: Option<String>,
    pub sync: &'static str,
    pub dirty_bytes: u64,
    pub resync_bytes_sent: u64,
    pub resync_bytes_received: u64,
    pub resync_bytes_left: u64,
    pub resync_eta_seconds: Option<u64>,
    pub generation: String,
    pub metadata: String,
    pub consistent: bool,
    pub size: u64,
    pub hot_extents: u64,
    pub reason: String,
}

/// A mirrored write registered in the activity map. However the write ends, its
/// registration is handed back (a leaked one kept its extent hot for good, and made every
/// later shutdown unclean); and if it ends before its outcome was settled (an early error,
/// or its future dropped because the client went away, with the local or the peer's write
/// possibly done and the other not), its range is marked dirty, so the copies are made equal
/// again instead of differing unrecorded.
struct ActiveGuard<'a> {
    meta: &'a MetadataFile,
    write: Option<ActiveWrite>,
    offset: u64,
    len: u64,
    settled: bool,
}

impl<'a> ActiveGuard<'a> {
    fn new(meta: &'a MetadataFile, write: ActiveWrite, offset: u64, len: u64) -> Self {
        ActiveGuard {
            meta,
            write: Some(write),
            offset,
            len,
            settled: false,
        }
    }

    fn settled(&mut self) {
        self.settled = true;
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        if !self.settled {
            if let Err(e) = self.meta.mark_dirty(self.offset, self.len) {
                error!(offset = self.offset, len = self.len, error = %e, "cannot record an interrupted write in the dirty map");
            }
        }
        if let Some(w) = self.write.take() {
            self.meta.end_write(w);
        }
    }
}

/// How the peer's part of a flush went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeerFlush {
    /// It flushed: everything it acknowledged before is on its disk.
    Done,
    /// It answered with an error (and marked its copy inconsistent first).
    Failed,
    /// No answer: no link, a link that closed or timed out, or a peer that is primary too.
    Absent,
}

struct InflightGuard<'a>(&'a AtomicUsize);

impl<'a> InflightGuard<'a> {
    fn new(c: &'a AtomicUsize) -> Self {
        c.fetch_add(1, Ordering::AcqRel);
        InflightGuard(c)
    }
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A token bucket over bytes; rate 0 means no limit.
struct RateLimiter {
    rate: u64,
    start: Instant,
    sent: AtomicU64,
}

impl RateLimiter {
    fn new(rate: u64) -> Self {
        RateLimiter {
            rate,
            start: Instant::now(),
            sent: AtomicU64::new(0),
        }
    }

    async fn take(&self, n: u64) {
        if self.rate == 0 {
            return;
        }
        let sent = self.sent.fetch_add(n, Ordering::Relaxed) + n;
        let due = Duration::from_secs_f64(sent as f64 / self.rate as f64);
        let elapsed = self.start.elapsed();
        if due > elapsed {
            tokio::time::sleep(due - elapsed).await;
        }
    }
}

impl BlockBackend for Volume {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        false
    }

    async fn read(&self, offset: u64, length: usize) -> BackendResult<Vec<u8>> {
        self.image.read(offset, length).await
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> BackendResult<()> {
        let len = data.len() as u64;
        // One buffer for the peer's frame and the local disk: the frame's data is sent from
        // it, not copied into the frame.
        self.replicated(
            offset,
            len,
            Arc::new(data),
            |d| OutFrame::split(frame::encode_write_head(0, offset, fua, d), d.clone()),
            |d| self.image.write_shared(offset, d, fua),
        )
        .await
    }

    async fn flush(&self) -> BackendResult<()> {
        self.client_flush().await
    }

    async fn trim(&self, offset: u64, length: u64, fua: bool) -> BackendResult<()> {
        self.replicated(
            offset,
            length,
            (),
            |_| {
                encoded(&Message::Trim {
                    offset,
                    length,
                    fua,
                })
                .into()
            },
            |_| self.image.trim(offset, length, fua),
        )
        .await
    }

    async fn write_zeroes(&self, offset: u64, length: u64, mode: ZeroMode) -> BackendResult<()> {
        if mode.fast_only {
            // Whether the peer can zero fast is unknown here; the client falls back to writes.
            return Err(BackendError::FastZeroUnsupported);
        }
        self.replicated(
            offset,
            length,
            (),
            |_| {
                encoded(&Message::Zeroes {
                    offset,
                    length,
                    may_trim: mode.may_trim,
                    fua: mode.fua,
                })
                .into()
            },
            |_| self.image.write_zeroes(offset, length, mode),
        )
        .await
    }

    async fn cache(&self, offset: u64, length: u64) -> BackendResult<()> {
        self.image.cache(offset, length).await
    }

    async fn block_status(
        &self,
        offset: u64,
        length: u64,
        max_extents: usize,
    ) -> BackendResult<Vec<Extent>> {
        self.image.block_status(offset, length, max_extents).await
    }
}

#[cfg(test)]
mod tests {
    use super::{
        compress, ActiveGuard, Generations, Link, MetadataFile, MetadataOptions, Role, Volume,
        VolumeState,
    };
    use std::time::Duration;

    fn peer_state_with_map(size: u64, granularity: u32, dirty_map: Vec<u8>) -> VolumeState {
        VolumeState {
            size,
            role: Role::Secondary,
            consistent: true,
            has_data: true,
            unconfirmed: false,
            lost_cache: false,
            generations: Generations::default(),
            granularity,
            dirty_map,
        }
    }

    #[test]
    fn a_large_volumes_peer_map_is_read_whole() {
        // 48 TiB at 64 KiB granules: a 96 MiB map, past the 64 MiB that decoding was once
        // capped at (every such map then read as clean).
        let (size, granularity) = (48u64 << 40, 64u32 << 10);
        let nbits = size / u64::from(granularity);
        let mut raw = vec![0u8; (nbits / 8) as usize];
        raw[0] = 1 << 7;
        let last = raw.len() - 1;
        raw[last] = 1 << 7;
        let packed = zstd::bulk::compress(&raw, 1).expect("compress");
        let view = Volume::peer_view(&peer_state_with_map(size, granularity, packed))
            .expect("a valid map");
        assert!(view.side.dirty);
        assert!(view.dirty_map.bits().test(7));
        assert!(view.dirty_map.bits().test(nbits - 1));
        assert_eq!(view.dirty_bytes, 2 * u64::from(granularity));
    }

    #[test]
    fn a_peer_map_that_does_not_decode_is_an_error_not_a_clean_map() {
        let (size, granularity) = (1u64 << 30, 64u32 << 10);
        let garbage = peer_state_with_map(size, granularity, vec![0x55; 100]);
        assert!(Volume::peer_view(&garbage).is_err());
        let short = zstd::bulk::compress(&[0xff; 8], 1).expect("compress");
        let err = Volume::peer_view(&peer_state_with_map(size, granularity, short))
            .err()
            .expect("a map shorter than the volume's is refused");
        assert!(err.contains("expected"), "{err}");
        let empty = peer_state_with_map(size, granularity, Vec::new());
        assert!(Volume::peer_view(&empty).is_err());
    }

    /// A write whose future is dropped mid-way (its client went away) hands its activity
    /// registration back, so a clean shutdown stays possible, and leaves its range dirty;
    /// a settled one leaves nothing dirty.
    #[test]
    fn an_interrupted_write_is_recorded_dirty_and_released() {
        let dir = tempfile::tempdir().expect("temporary folder");
        let meta = MetadataFile::create(
            &dir.path().join("g.meta"),
            64 << 20,
            "a",
            MetadataOptions::default(),
        )
        .expect("create");
        let w = meta.begin_write(1 << 20, 4096).expect("begin");
        let mut settled = ActiveGuard::new(&meta, w, 1 << 20, 4096);
        settled.settled();
        drop(settled);
        assert_eq!(meta.dirty_count(), 0);
        let w = meta.begin_write(8 << 20, 4096).expect("begin");
        drop(ActiveGuard::new(&meta, w, 8 << 20, 4096));
        assert_eq!(meta.dirty_count(), 1, "the interrupted write's granule");
        meta.clean_shutdown()
            .expect("no write left registered in the activity map");
    }

    /// Peer writes drained from the unflushed set but not recorded (a metadata write failed)
    /// make the next FLUSH mark the whole volume before it answers: it must not count them as
    /// on both disks.
    #[tokio::test]
    async fn unrecorded_peer_writes_mark_the_whole_volume_at_the_next_flush() {
        use nbd_server::BlockBackend;
        let dir = tempfile::tempdir().expect("temporary folder");
        let vol = Volume::open_for_tests(dir.path(), "a");
        vol.promote(true).await.expect("promote alone");
        vol.meta.clear_dirty(0, 16 << 20).expect("clear");
        vol.unflushed_unrecorded
            .store(true, std::sync::atomic::Ordering::Release);
        vol.flush().await.expect("flush");
        assert_eq!(vol.meta.dirty_bytes(), 16 << 20, "the whole volume");
        assert!(!vol
            .unflushed_unrecorded
            .load(std::sync::atomic::Ordering::Acquire));
    }

    /// A decision that found both copies equal does not mark the pair in sync once a write
    /// alone started a newer generation after the states were read: those writes are on this
    /// node only (and with a witness, not yet confirmed).
    #[tokio::test]
    async fn in_sync_is_marked_only_at_the_generation_compared() {
        let dir = tempfile::tempdir().expect("temporary folder");
        let vol = Volume::open_for_tests(dir.path(), "a");
        vol.promote(true).await.expect("promote alone");
        let compared = vol.meta.generations().current;
        assert!(vol.mark_in_sync(compared));
        vol.record_alone(1 << 20, 4096).expect("a write alone");
        let after = vol.meta.generations();
        assert_ne!(after.current, compared, "a new generation");
        assert!(!vol.mark_in_sync(compared), "decided before that write");
        assert_eq!(vol.meta.generations(), after, "nothing changed");
        assert!(vol.mark_in_sync(after.current));
    }

    /// A FUA request whose flush fails (write-back failing) marks the copy as having lost
    /// its cache and keeps its hot extents, as a failed FLUSH does: a crash before the next
    /// FLUSH must not leave this copy looking as good as its peer's.
    #[tokio::test]
    async fn a_failed_fua_request_counts_as_a_failed_flush() {
        use nbd_server::BlockBackend;
        let dir = tempfile::tempdir().expect("temporary folder");
        let vol = Volume::open_for_tests(dir.path(), "a");
        vol.promote(true).await.expect("promote alone");
        let failed = vol.image_for_tests().fail_flush_after(0);
        assert!(vol.trim(1 << 20, 64 << 10, true).await.is_err());
        failed.await.expect("flush hook");
        assert!(vol.meta.flags().contains(super::Flags::LOST_CACHE));
        assert!(vol.meta.activity_held());
    }

    /// A gate a fence opened closes the moment the fenced peer connects again, not at the
    /// failover logic's next tick (which a slow hook can hold for minutes): a write alone
    /// after that link waits for a new fence. A fence read before a link opens nothing.
    #[tokio::test]
    async fn a_link_closes_the_gate_a_fence_opened() {
        let dir = tempfile::tempdir().expect("temporary folder");
        let vol = Volume::open_for_tests(dir.path(), "a");
        vol.promote(true).await.expect("promote alone");
        vol.set_alone_allowed(0);
        let links = vol.failover_view().links_established;
        assert!(vol.allow_alone_until_next_link(links));
        vol.record_alone(1 << 20, 4096).expect("write alone");
        tokio::time::timeout(Duration::from_secs(5), vol.wait_alone_allowed())
            .await
            .expect("the fence lets it through")
            .expect("allowed");

        let link = Link::new("b".into(), Duration::from_secs(5), None);
        tokio::time::timeout(Duration::from_secs(5), vol.link_up(link.clone()))
            .await
            .expect("link up");
        link.close();
        vol.record_alone(2 << 20, 4096).expect("write alone");
        let waited =
            tokio::time::timeout(Duration::from_millis(300), vol.wait_alone_allowed()).await;
        assert!(
            waited.is_err(),
            "a write alone after the link waits: {waited:?}"
        );
        assert!(
            !vol.allow_alone_until_next_link(links),
            "a fence from before the link opens nothing"
        );
        let waited =
            tokio::time::timeout(Duration::from_millis(300), vol.wait_alone_allowed()).await;
        assert!(waited.is_err(), "still waiting: {waited:?}");
        let now = vol.failover_view().links_established;
        assert!(vol.allow_alone_until_next_link(now), "a new fence opens it");
        tokio::time::timeout(Duration::from_secs(5), vol.wait_alone_allowed())
            .await
            .expect("passes after the new fence")
            .expect("allowed");
    }

    /// A write that finds the link gone after its volume was demoted (a demotion waits for
    /// writes in flight 30 s at most) is marked dirty and refused; it starts no generation on
    /// what is now a secondary (the new primary's copy would look diverged from it).
    #[tokio::test]
    async fn a_write_alone_after_a_demotion_starts_no_generation() {
        let dir = tempfile::tempdir().expect("temporary folder");
        let vol = Volume::open_for_tests(dir.path(), "a");
        vol.promote(true).await.expect("promote alone");
        vol.begin_demote();
        vol.demote().await.expect("demote");
        let before = vol.meta.generations();
        let r = vol.record_alone(1 << 20, 4096);
        assert!(matches!(r, Err(super::BackendError::ShuttingDown)), "{r:?}");
        assert_eq!(
            vol.meta.generations(),
            before,
            "no generation on a secondary"
        );
        assert!(vol.meta.is_dirty(1 << 20, 4096), "what it wrote is marked");
    }

    /// A `ResyncDone` whose answer never came (the peer may have adopted this generation, in
    /// sync, and then gone): the next write alone starts a new generation although this
    /// node's current one already differs from its sync one; otherwise the peer's copy would
    /// look as current as this one without that write.
    #[tokio::test]
    async fn a_write_alone_after_an_unanswered_handover_starts_a_generation() {
        let dir = tempfile::tempdir().expect("temporary folder");
        let vol = Volume::open_for_tests(dir.path(), "a");
        vol.promote(true).await.expect("promote alone");
        vol.record_alone(0, 4096).expect("a write alone");
        let alone = vol.meta.generations();
        assert_ne!(alone.current, alone.sync, "writing alone");
        vol.record_alone(4096, 4096).expect("another write alone");
        assert_eq!(vol.meta.generations(), alone, "the same generation goes on");
        vol.handover_unanswered
            .store(true, std::sync::atomic::Ordering::Release);
        vol.record_alone(1 << 20, 4096)
            .expect("a write alone after the handover");
        let after = vol.meta.generations();
        assert_ne!(after.current, alone.current, "a new generation");
        vol.record_alone(2 << 20, 4096).expect("and another");
        assert_eq!(vol.meta.generations(), after, "only one");
    }

    /// The link closed but `link_down` has not drained the writes the peer acknowledged and
    /// never flushed: a client FLUSH then must count them as written alone (dirty, and a new
    /// generation), not answer as if the peer had everything.
    #[tokio::test]
    async fn a_flush_after_the_link_closed_counts_the_peers_unflushed_writes() {
        let dir = tempfile::tempdir().expect("temporary folder");
        let vol = Volume::open_for_tests(dir.path(), "a");
        vol.promote(true).await.expect("promote");
        // As after a completed initial copy: in sync, nothing dirty.
        vol.meta.clear_dirty(0, 16 << 20).expect("clear");
        assert!(vol.mark_in_sync(vol.meta.generations().current));
        let before = vol.meta.generations();
        assert_eq!(before.current, before.sync);
        assert_eq!(vol.meta.dirty_count(), 0);
        let sent = vol.unflushed.ticket();
        vol.unflushed.mark_acked(1 << 20, 4096, sent);
        vol.client_flush().await.expect("the flush");
        assert!(vol.meta.is_dirty(1 << 20, 4096), "the peer may lack it");
        assert_ne!(
            vol.meta.generations().current,
            before.current,
            "a new generation"
        );
    }

    /// A client that never sends FLUSH: extents gone cold still get their activity bits
    /// cleared by the maintenance's periodic flush of both copies, so a primary crash later
    /// does not resync every extent ever written.
    #[tokio::test]
    async fn the_maintenance_clears_cold_extents_without_a_client_flush() {
        use nbd_server::BlockBackend;
        let dir = tempfile::tempdir().expect("temporary folder");
        // Small extents and a hot set of two, so writes to four extents evict two.
        MetadataFile::create(
            &dir.path().join("v.meta"),
            16 << 20,
            "a",
            MetadataOptions {
                dirty_granularity: 64 << 10,
                activity_extent_size: 1 << 20,
                activity_capacity: 2,
            },
        )
        .expect("create");
        std::fs::File::create(dir.path().join("v.img"))
            .and_then(|f| f.set_len(16 << 20))
            .expect("image");
        let vol = Volume::open_for_tests(dir.path(), "a");
        vol.promote(true).await.expect("promote");
        for i in 0..4u64 {
            vol.write(i * (2 << 20), vec![7; 4096], false)
                .await
                .expect("write");
        }
        assert!(
            vol.meta.pending_cold() > 0,
            "evicted extents wait for a flush"
        );
        let maintenance = tokio::spawn(
            vol.clone()
                .background_maintenance(std::time::Duration::from_millis(50)),
        );
        let cleared = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while vol.meta.pending_cold() > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await;
        maintenance.abort();
        assert!(
            cleared.is_ok(),
            "cold extents never cleared without a client flush"
        );
    }

    /// A write that meets a volume demoted under its connection is told ESHUTDOWN (the
    /// server stopped serving it), not EPERM,
    /// which says the export is read-only; a volume that never was primary still refuses
    /// writes as read-only.
    #[tokio::test]
    async fn a_write_after_a_demotion_is_eshutdown() {
        use nbd_server::proto::NbdErrno;
        use nbd_server::BlockBackend;
        let dir = tempfile::tempdir().expect("temporary folder");
        let vol = Volume::open_for_tests(dir.path(), "a");
        let errno = |r: nbd_server::BackendResult<()>| r.err().map(|e| e.errno());
        assert_eq!(
            errno(vol.write(0, vec![1; 4096], false).await),
            Some(NbdErrno::Perm)
        );
        vol.promote(true).await.expect("promote alone");
        assert_eq!(errno(vol.write(0, vec![2; 4096], false).await), None);
        vol.begin_demote();
        vol.demote().await.expect("demote");
        assert_eq!(
            errno(vol.write(0, vec![3; 4096], false).await),
            Some(NbdErrno::Shutdown)
        );
        assert_eq!(
            errno(vol.trim(0, 4096, false).await),
            Some(NbdErrno::Shutdown)
        );
    }

    /// Bytes drawn from an alphabet of `symbols` values: log2(symbols) bits of entropy each.
    fn entropy_bytes(symbols: u32, len: usize) -> Vec<u8> {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 32) % u64::from(symbols)) as u8
            })
            .collect()
    }

    #[test]
    fn compresses_only_what_shrinks_by_a_quarter() {
        let len = 64 << 10;
        assert!(compress(&vec![0u8; len]).is_some(), "zeroes");
        assert!(
            compress(&entropy_bytes(16, len)).is_some(),
            "4 bits a byte: about half"
        );
        assert!(
            compress(&entropy_bytes(128, len)).is_none(),
            "7 bits a byte: 1/8 saved"
        );
        assert!(compress(&entropy_bytes(256, len)).is_none(), "random");
        let text = "a text of words, the kind of data a file system holds. ".repeat(len / 50);
        let packed = compress(text.as_bytes()).expect("text");
        assert_eq!(
            zstd::bulk::decompress(&packed, text.len()).expect("round trip"),
            text.as_bytes()
        );
    }
}
