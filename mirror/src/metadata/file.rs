//! The metadata file of a running daemon: memory-mapped, locked, durable where it must be.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::ops::{Range, RangeInclusive};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};

use super::activity::ActivityLog;
use super::bitmap::{bits_to_bytes, covered_bits, covering_bits, Bits};
use super::header::{Counters, Flags, Generations, Header, Layout, HEADER_AREA, SLOTS, SLOT_SIZE};
use super::mapping::Mapping;
use super::{choose_header, FormatError, MetadataError};
use crate::unflushed::{FlushBatch, SentTicket, Unflushed};

/// Default bytes per dirty bit.
pub const DEFAULT_GRANULARITY: u32 = 64 << 10;
/// Default bytes per activity extent.
pub const DEFAULT_ACTIVITY_EXTENT: u32 = 4 << 20;
/// Default hot-set capacity in extents (4 GiB of 4 MiB extents; see the module doc).
pub const DEFAULT_ACTIVITY_CAPACITY: u32 = 1024;

/// Sizes chosen when a metadata file is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetadataOptions {
    /// Bytes per dirty bit (power of two, 4 KiB..=1 GiB).
    pub dirty_granularity: u32,
    /// Bytes per activity extent (power of two, at least the granularity).
    pub activity_extent_size: u32,
    /// Hot-set capacity in extents; clamped to the volume's extent count.
    pub activity_capacity: u32,
}

impl Default for MetadataOptions {
    fn default() -> Self {
        MetadataOptions {
            dirty_granularity: DEFAULT_GRANULARITY,
            activity_extent_size: DEFAULT_ACTIVITY_EXTENT,
            activity_capacity: DEFAULT_ACTIVITY_CAPACITY,
        }
    }
}

/// What `open` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenReport {
    /// Whether the previous run shut down cleanly.
    pub previous_shutdown_clean: bool,
    /// Activity extents left hot by a crash, now folded into the dirty map.
    pub folded_extents: u64,
    /// Dirty bits newly set by that folding.
    pub folded_dirty_bits: u64,
    /// The previous run ended uncleanly in an earlier boot: see `Flags::LOST_CACHE`.
    pub lost_cache: bool,
    /// The header slot not in use failed its checks (a crash during a header write, or a
    /// damaged disk); the next header update rewrites it.
    pub standby_slot_damaged: bool,
}

/// A write registered in the activity map; hand it back to [`MetadataFile::end_write`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "pass it to end_write when the write completes"]
pub struct ActiveWrite {
    extents: RangeInclusive<u64>,
    /// How many extents became hot for this write (each cost one metadata sync, together).
    pub became_hot: usize,
}

/// Extents evicted before an image flush began; see [`MetadataFile::take_cold`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "pass it to clear_cold once the image flush completed"]
pub struct ColdBatch {
    epoch: u64,
}

struct ActivityState {
    log: ActivityLog,
    /// Evicted extents whose bit is still set, with the flush epoch of their eviction.
    pending: HashMap<u64, u64>,
    epoch: u64,
    /// Extents that became hot and whose bit a writer is still making durable, with how
    /// many writers do so. Another writer into such an extent finds it hot already, but must
    /// not issue its write before the bit is on disk either (see `begin_write`).
    syncing: HashMap<u64, u32>,
}

/// One durable bitmap region of the mapping.
struct Region {
    /// Index of the region's first word in the mapping.
    first_word: usize,
    nbits: u64,
    /// Writers between setting bits and finishing their sync.
    setters: AtomicUsize,
}

/// The metadata file of one volume, open for writing by this process (exclusively locked).
pub struct MetadataFile {
    path: PathBuf,
    _lock: Flock<File>,
    map: Mapping,
    layout: Layout,
    header: Mutex<Header>,
    activity: Mutex<ActivityState>,
    dirty_region: Region,
    activity_region: Region,
    poisoned: AtomicBool,
    /// Activity bits are never cleared again in this run (see [`MetadataFile::hold_activity`]).
    activity_held: AtomicBool,
    shut_down: AtomicBool,
    report: OpenReport,
    /// Granules a resync carried whose target has not flushed them yet: they stay dirty,
    /// on disk too, until a peer flush covers them ([`MetadataFile::settle_resync`]), so a
    /// target that loses power while this node crashes gets them again.
    resync_pending: Unflushed,
    /// Set when a resync starts, cleared when its link is gone: meanwhile every mark of the
    /// dirty map takes `pending_lock` and forgets what it marks from `resync_pending`, so a
    /// settle can never clear a mark made after the chunk it settles.
    resync_started: AtomicBool,
    pending_lock: Mutex<()>,
}

/// The machine's boot id (16 bytes; zero when it cannot be read). `NBDMIRROR_BOOT_ID`
/// replaces the kernel's, so tests can simulate a reboot without one.
pub fn boot_id() -> [u8; 16] {
    let text = std::env::var("NBDMIRROR_BOOT_ID")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok());
    let Some(text) = text else { return [0; 16] };
    let text = text.trim();
    if text.is_empty() {
        return [0; 16];
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(&blake3::hash(text.as_bytes()).as_bytes()[..16]);
    id
}

/// A peer flush's share of [`MetadataFile`]'s pending resync granules.
pub struct ResyncSettle(FlushBatch);

impl MetadataFile {
    /// Creates a metadata file for a volume of `volume_size` bytes on node `node_name`, then
    /// opens it. Refuses a path that exists. The new file has no dirty bit, no hot extent,
    /// generation 0 (none yet), and the flags consistent and clean-shutdown.
    pub fn create(
        path: &Path,
        volume_size: u64,
        node_name: &str,
        options: MetadataOptions,
    ) -> Result<MetadataFile, MetadataError> {
        let fmt_err = |source: FormatError| MetadataError::Format {
            path: path.to_owned(),
            source,
        };
        let layout = Layout::compute(
            volume_size,
            options.dirty_granularity,
            options.activity_extent_size,
        )
        .map_err(|e| fmt_err(e.into()))?;
        let capacity = u64::from(options.activity_capacity)
            .min(layout.activity_bits)
            .max(1) as u32;
        let mut flags = Flags::CONSISTENT;
        flags.set(Flags::CLEAN_SHUTDOWN, true);
        let mut header = Header {
            sequence: 0,
            volume_size,
            dirty_granularity: options.dirty_granularity,
            activity_extent_size: options.activity_extent_size,
            activity_capacity: capacity,
            flags,
            generations: Generations::default(),
            counters: Counters {
                created_unix: now_unix(),
                opens: 0,
                unclean_opens: 0,
            },
            node_name: node_name.to_owned(),
            peer_name: String::new(),
            boot_id: [0; 16],
        };
        let slot0 = header.encode().map_err(|e| fmt_err(e.into()))?;
        header.sequence = 1;
        let slot1 = header.encode().map_err(|e| fmt_err(e.into()))?;

        let io = |op| {
            let path = path.to_owned();
            move |source| MetadataError::Io { path, op, source }
        };
        let exists = || MetadataError::Exists {
            path: path.to_owned(),
        };
        if path.symlink_metadata().is_ok() {
            return Err(exists());
        }
        // Written in full under a side name, then linked into place: a crash part-way leaves
        // no file at `path` (which the next start would refuse as truncated), only the side
        // file, which the next create takes over (its lock tells a crash from a creator
        // still running).
        let staging = staging_path(path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&staging)
            .map_err(io("create"))?;
        let mut file = lock(&staging, file)?;
        let result = (|| {
            file.set_len(0).map_err(io("truncate"))?;
            file.write_all(&slot0).map_err(io("write header"))?;
            file.write_all(&slot1).map_err(io("write header"))?;
            // Zeros for the maps, written out so no block of the mapping is a hole.
            let zeros = vec![0u8; 1 << 20];
            let mut left = layout.file_len - HEADER_AREA;
            while left > 0 {
                let n = left.min(zeros.len() as u64) as usize;
                file.write_all(&zeros[..n]).map_err(io("write maps"))?;
                left -= n as u64;
            }
            file.sync_all().map_err(io("fsync"))?;
            // A hard link never replaces: of two creators, one gets `Exists`.
            match std::fs::hard_link(&staging, path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(exists()),
                Err(e) => return Err(io("link into place")(e)),
            }
            Ok(())
        })();
        // Gone in every case: on success `path` names the file, on failure nothing should.
        let _ = std::fs::remove_file(&staging);
        result?;
        sync_parent(path).map_err(io("fsync the parent folder"))?;
        Self::from_locked(path, file, header, boot_id())
    }

    /// Opens and validates an existing metadata file for writing, locking it exclusively.
    /// If the previous run did not shut down cleanly, its hot activity extents are folded
    /// into the dirty map first (see [`MetadataFile::open_report`]).
    pub fn open(path: &Path) -> Result<MetadataFile, MetadataError> {
        Self::open_at_boot(path, boot_id())
    }

    /// [`MetadataFile::open`] as if the machine's boot id were `boot` (tests simulate a
    /// reboot with it).
    pub fn open_at_boot(path: &Path, boot: [u8; 16]) -> Result<MetadataFile, MetadataError> {
        let io = |op| {
            let path = path.to_owned();
            move |source| MetadataError::Io { path, op, source }
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io("open"))?;
        let file = lock(path, file)?;
        let mut head = vec![0u8; HEADER_AREA as usize];
        let mut got = 0;
        while got < head.len() {
            match file.read_at(&mut head[got..], got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io("read header")(e)),
            }
        }
        head.truncate(got);
        let fmt_err = |source: FormatError| MetadataError::Format {
            path: path.to_owned(),
            source,
        };
        let (header, _, standby_error) = choose_header(&head).map_err(fmt_err)?;
        let layout = header.layout().map_err(|e| fmt_err(e.into()))?;
        let actual = file.metadata().map_err(io("stat"))?.len();
        if actual < layout.file_len {
            return Err(fmt_err(FormatError::Truncated {
                expected: layout.file_len,
                actual,
            }));
        }
        if actual > layout.file_len {
            return Err(fmt_err(FormatError::TooLong {
                expected: layout.file_len,
                actual,
            }));
        }
        let mut meta = Self::from_locked(path, file, header, boot)?;
        meta.report.standby_slot_damaged = standby_error.is_some();
        Ok(meta)
    }

    /// Maps a locked, validated file and records this open (and the boot id) in its header.
    fn from_locked(
        path: &Path,
        file: Flock<File>,
        header: Header,
        boot: [u8; 16],
    ) -> Result<MetadataFile, MetadataError> {
        let layout = header.layout().map_err(|e| MetadataError::Format {
            path: path.to_owned(),
            source: e.into(),
        })?;
        let map = Mapping::new(&file, layout.file_len).map_err(|source| MetadataError::Io {
            path: path.to_owned(),
            op: "mmap",
            source,
        })?;
        let region = |offset: u64, nbits: u64| Region {
            first_word: (offset / 8) as usize,
            nbits,
            setters: AtomicUsize::new(0),
        };
        let capacity = header.activity_capacity as usize;
        let mut meta = MetadataFile {
            path: path.to_owned(),
            _lock: file,
            map,
            dirty_region: region(layout.dirty_offset, layout.dirty_bits),
            activity_region: region(layout.activity_offset, layout.activity_bits),
            layout,
            header: Mutex::new(header.clone()),
            activity: Mutex::new(ActivityState {
                log: ActivityLog::new(capacity),
                pending: HashMap::new(),
                epoch: 0,
                syncing: HashMap::new(),
            }),
            poisoned: AtomicBool::new(false),
            activity_held: AtomicBool::new(false),
            shut_down: AtomicBool::new(false),
            report: OpenReport {
                previous_shutdown_clean: header.flags.contains(Flags::CLEAN_SHUTDOWN),
                folded_extents: 0,
                folded_dirty_bits: 0,
                lost_cache: false,
                standby_slot_damaged: false,
            },
            resync_pending: Unflushed::new(header.volume_size, u64::from(header.dirty_granularity)),
            resync_started: AtomicBool::new(false),
            pending_lock: Mutex::new(()),
        };
        if !meta.report.previous_shutdown_clean {
            meta.fold_activity()?;
        }
        let clean = meta.report.previous_shutdown_clean;
        // A crash in an earlier boot took the page cache with it: writes that run had not
        // flushed (in its hot extents, folded above) may be missing here. A crash of the
        // daemon alone (same boot) loses nothing: the kernel still writes its pages back.
        meta.report.lost_cache =
            !clean && header.boot_id != [0; 16] && boot != [0; 16] && header.boot_id != boot;
        let lost_cache = meta.report.lost_cache;
        meta.update_header(|h| {
            h.flags.set(Flags::CLEAN_SHUTDOWN, false);
            if lost_cache {
                h.flags.set(Flags::LOST_CACHE, true);
            }
            if boot != [0; 16] {
                h.boot_id = boot;
            }
            // Counters read from the file: a corrupt one must not overflow.
            h.counters.opens = h.counters.opens.saturating_add(1);
            if !clean {
                h.counters.unclean_opens = h.counters.unclean_opens.saturating_add(1);
            }
        })?;
        Ok(meta)
    }

    /// After a crash: every set activity bit becomes dirty bits (durably), then is cleared.
    fn fold_activity(&mut self) -> Result<(), MetadataError> {
        let extent = u64::from(self.extent_size());
        let g = u64::from(self.granularity());
        let size = self.volume_size();
        let runs: Vec<Range<u64>> = self.activity_bits().runs().collect();
        let mut folded = 0;
        for r in &runs {
            folded += r.end - r.start;
            let bytes = bits_to_bytes(r.clone(), extent, size);
            let bits = covering_bits(bytes.start, bytes.end - bytes.start, g, size);
            let before = self.dirty_bits().count_range(bits.clone());
            self.dirty_bits().set_range(bits.clone());
            self.report.folded_dirty_bits += (bits.end - bits.start) - before;
        }
        if folded > 0 {
            self.sync_file_range(self.layout.dirty_offset, self.layout.dirty_len)?;
            self.activity_bits().clear_all();
            self.sync_file_range(self.layout.activity_offset, self.layout.activity_len)?;
        }
        self.report.folded_extents = folded;
        Ok(())
    }

    // ----- accessors -----

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Where the maps lie.
    pub fn layout(&self) -> Layout {
        self.layout
    }
    /// What `open` found.
    pub fn open_report(&self) -> OpenReport {
        self.report
    }
    /// A copy of the current header.
    pub fn header(&self) -> Header {
        self.lock_header().clone()
    }
    /// The volume size in bytes.
    pub fn volume_size(&self) -> u64 {
        self.lock_header().volume_size
    }
    /// Bytes per dirty bit.
    pub fn granularity(&self) -> u32 {
        self.lock_header().dirty_granularity
    }
    /// Bytes per activity extent.
    pub fn extent_size(&self) -> u32 {
        self.lock_header().activity_extent_size
    }
    /// The generations.
    pub fn generations(&self) -> Generations {
        self.lock_header().generations
    }
    /// The flags.
    pub fn flags(&self) -> Flags {
        self.lock_header().flags
    }

    fn lock_header(&self) -> MutexGuard<'_, Header> {
        self.header.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn lock_activity(&self) -> MutexGuard<'_, ActivityState> {
        self.activity.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn words(&self, region: &Region) -> &[AtomicU64] {
        let words = self.map.words();
        let n = region.nbits.div_ceil(64) as usize;
        &words[region.first_word..region.first_word + n]
    }
    /// The dirty map (bit `i` covers bytes `i * granularity ..`).
    pub fn dirty_bits(&self) -> Bits<'_> {
        Bits::new(self.words(&self.dirty_region), self.dirty_region.nbits)
    }
    /// The activity map as stored (bit `i` covers extent `i`).
    pub fn activity_bits(&self) -> Bits<'_> {
        Bits::new(
            self.words(&self.activity_region),
            self.activity_region.nbits,
        )
    }

    // ----- header -----

    /// Changes the header durably: `f` edits a copy, which is written to the slot not
    /// holding the current header and synced. On error the in-memory header is unchanged.
    pub fn update_header(&self, f: impl FnOnce(&mut Header)) -> Result<(), MetadataError> {
        self.check_usable()?;
        let mut current = self.lock_header();
        let mut next = current.clone();
        f(&mut next);
        next.sequence = current.sequence.wrapping_add(1);
        // Sizes are fixed for the life of the file.
        next.volume_size = current.volume_size;
        next.dirty_granularity = current.dirty_granularity;
        next.activity_extent_size = current.activity_extent_size;
        let bytes = next.encode().map_err(|e| MetadataError::Format {
            path: self.path.clone(),
            source: e.into(),
        })?;
        let slot = (next.sequence % SLOTS as u64) as usize;
        let words = &self.map.words()[slot * SLOT_SIZE / 8..(slot + 1) * SLOT_SIZE / 8];
        for (w, chunk) in words.iter().zip(bytes.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            w.store(u64::from_ne_bytes(b), Ordering::Relaxed);
        }
        self.sync_file_range((slot * SLOT_SIZE) as u64, SLOT_SIZE as u64)?;
        *current = next;
        Ok(())
    }

    /// Starts a new, random generation (the current one moves into the history) and returns
    /// it. Called when this node starts writing without its peer (promotion while alone).
    pub fn start_new_generation(&self) -> Result<u64, MetadataError> {
        self.advance_generation(|_| {})
    }

    /// [`MetadataFile::start_new_generation`], and sets `Flags::UNCONFIRMED` in the same
    /// header write: in two writes, a crash between them left the new generation with the
    /// old flag, and a partition that should heal by itself asked for a manual resolve.
    pub fn start_new_generation_unconfirmed(
        &self,
        unconfirmed: bool,
    ) -> Result<u64, MetadataError> {
        self.advance_generation(|h| h.flags.set(Flags::UNCONFIRMED, unconfirmed))
    }

    fn advance_generation(&self, also: impl FnOnce(&mut Header)) -> Result<u64, MetadataError> {
        let mut new = 0;
        self.update_header(|h| {
            let g = h.generations;
            new = fresh_generation(&h.node_name, |v| {
                v != 0 && v != g.current && v != g.sync && !g.history.contains(&v)
            });
            h.generations.advance(new);
            // Whatever this copy lacked is history: its new writes start from it.
            h.flags.set(Flags::LOST_CACHE, false);
            also(h);
        })?;
        Ok(new)
    }

    /// Clears `Flags::UNCONFIRMED` if `generation` is still the current one (checked in the
    /// same header update, so a new generation started meanwhile keeps its flag).
    /// Returns whether it cleared it.
    pub fn confirm_generation(&self, generation: Option<u64>) -> Result<bool, MetadataError> {
        let mut cleared = false;
        self.update_header(|h| {
            if generation.is_none_or(|g| g == h.generations.current) {
                cleared = h.flags.contains(Flags::UNCONFIRMED);
                h.flags.set(Flags::UNCONFIRMED, false);
            }
        })?;
        Ok(cleared)
    }

    // ----- dirty map -----

    fn check_range(&self, offset: u64, len: u64) -> Result<(), MetadataError> {
        let size = self.volume_size();
        if !matches!(offset.checked_add(len), Some(end) if end <= size) {
            return Err(MetadataError::OutOfRange {
                path: self.path.clone(),
                offset,
                len,
                volume_size: size,
            });
        }
        Ok(())
    }

    /// Marks the granules of `offset..offset+len` dirty. When this returns `Ok`, the bits are
    /// durable and the write they cover may be acknowledged. Returns whether any bit changed
    /// (only then did it cost a sync, except in the rare race described in the module doc).
    pub fn mark_dirty(&self, offset: u64, len: u64) -> Result<bool, MetadataError> {
        self.check_range(offset, len)?;
        let bits = covering_bits(
            offset,
            len,
            u64::from(self.granularity()),
            self.volume_size(),
        );
        let pending = self.pending_guard();
        let changed = self.set_durable(&self.dirty_region, bits)?;
        if pending.is_some() {
            self.resync_pending.unmark(offset, len);
        }
        Ok(changed)
    }

    /// Marks the whole volume dirty, durably (e.g. when the peer's copy is unknown).
    pub fn mark_all_dirty(&self) -> Result<bool, MetadataError> {
        let pending = self.pending_guard();
        let changed = self.set_durable(&self.dirty_region, 0..self.dirty_region.nbits)?;
        if pending.is_some() {
            self.resync_pending.unmark(0, self.volume_size());
        }
        Ok(changed)
    }

    /// Held around a mark of the dirty map while a resync may have granules pending (from
    /// its start until its link is gone). Otherwise nothing is pending, and marks (a degraded
    /// primary's writes) stay lock-free, as they were.
    fn pending_guard(&self) -> Option<MutexGuard<'_, ()>> {
        self.resync_started
            .load(Ordering::SeqCst)
            .then(|| self.pending_lock.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// A resync is about to carry dirty granules to the peer.
    pub fn resync_starting(&self) {
        self.resync_started.store(true, Ordering::SeqCst);
    }

    /// Take before sending a resync chunk (see [`Self::resync_carried`]).
    pub fn resync_ticket(&self) -> SentTicket {
        self.resync_pending.ticket()
    }

    /// The peer acknowledged a resync chunk: the granules it covers whole stay dirty until a
    /// peer flush settles them; and for good, if a peer flush failed since `sent` (it may
    /// have lost the chunk).
    pub fn resync_carried(&self, offset: u64, len: u64, sent: SentTicket) {
        self.resync_pending.mark_covered_acked(offset, len, sent);
    }

    /// What a peer flush about to be sent covers of the pending granules.
    pub fn begin_resync_settle(&self) -> ResyncSettle {
        ResyncSettle(self.resync_pending.begin_flush())
    }

    /// The peer flush succeeded: its pending granules are clean now (those marked dirty
    /// again since were dropped from the set by that mark).
    pub fn settle_resync(&self, settle: ResyncSettle) {
        let _pending = self.pending_lock.lock().unwrap_or_else(|p| p.into_inner());
        for (off, len) in self.resync_pending.take_flushed(settle.0) {
            let _ = self.clear_dirty(off, len);
        }
    }

    /// The peer flush failed or never arrived: its pending granules stay dirty.
    pub fn abandon_resync_settle(&self, settle: ResyncSettle) {
        let _ = self.resync_pending.fail_flush(settle.0);
    }

    /// The link that carried the pending granules is gone: they stay dirty, and no flush on
    /// a later link may settle them.
    pub fn forget_resync_pending(&self, offset_len: Option<(u64, u64)>) {
        let _pending = self.pending_lock.lock().unwrap_or_else(|p| p.into_inner());
        match offset_len {
            Some((off, len)) => self.resync_pending.unmark(off, len),
            None => {
                drop(self.resync_pending.drain_ranges());
                // No resync runs without a link; the next one sets it again.
                self.resync_started.store(false, Ordering::SeqCst);
            }
        }
    }

    /// Bytes of dirty granules a resync carried that wait for a peer flush.
    pub fn resync_pending_bytes(&self) -> u64 {
        (self.resync_pending.count() * u64::from(self.granularity())).min(self.volume_size())
    }

    /// Clears the granules that `offset..offset+len` covers entirely (call after the peer
    /// has the data durably: resync). Lazy: no sync, since a lost clear only costs an extra
    /// resync. Returns how many bits were set before.
    pub fn clear_dirty(&self, offset: u64, len: u64) -> Result<u64, MetadataError> {
        self.check_range(offset, len)?;
        self.check_usable()?;
        let bits = covered_bits(
            offset,
            len,
            u64::from(self.granularity()),
            self.volume_size(),
        );
        Ok(self.dirty_bits().clear_range(bits))
    }

    /// Whether any granule of the range is dirty.
    pub fn is_dirty(&self, offset: u64, len: u64) -> bool {
        let bits = covering_bits(
            offset,
            len,
            u64::from(self.granularity()),
            self.volume_size(),
        );
        self.dirty_bits().any_set(bits)
    }

    /// Number of dirty granules.
    pub fn dirty_count(&self) -> u64 {
        self.dirty_bits().count()
    }

    /// Dirty bytes of the volume (the last granule only up to the volume's end).
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_ranges().iter().map(|&(_, l)| l).sum()
    }

    /// The dirty byte ranges `(offset, length)`, merged, in order.
    pub fn dirty_ranges(&self) -> Vec<(u64, u64)> {
        let g = u64::from(self.granularity());
        let size = self.volume_size();
        self.dirty_bits()
            .runs()
            .map(|r| {
                let b = bits_to_bytes(r, g, size);
                (b.start, b.end - b.start)
            })
            .collect()
    }

    // ----- activity map -----

    /// Registers a write of `offset..offset+len` (`len` > 0) before it is issued. When this
    /// returns `Ok`, every extent of the range is durably marked active, so a crash from now
    /// on resyncs it. Costs one sync only when an extent became hot whose bit was clear.
    pub fn begin_write(&self, offset: u64, len: u64) -> Result<ActiveWrite, MetadataError> {
        self.check_range(offset, len.max(1))?;
        self.check_usable()?;
        let extent = u64::from(self.extent_size());
        let extents = offset / extent..=(offset + len.max(1) - 1) / extent;
        let (became_hot, to_set, racing) = {
            let mut st = self.lock_activity();
            let b = st.log.begin(extents.clone());
            let epoch = st.epoch;
            for e in &b.became_hot {
                st.pending.remove(e);
                *st.syncing.entry(*e).or_insert(0) += 1;
            }
            for e in b.evicted {
                st.pending.insert(e, epoch);
            }
            // Hot already, but another writer (another data-plane thread) is still syncing
            // its bit: this write syncs it too (`set_durable` then waits for that page) rather
            // than going to the disks with its extent not yet durably hot.
            let racing: Vec<u64> = extents
                .clone()
                .filter(|e| !b.became_hot.contains(e) && st.syncing.contains_key(e))
                .collect();
            (b.became_hot.len(), b.became_hot, racing)
        };
        if to_set.is_empty() && racing.is_empty() {
            // The common case: every extent was hot and durable already.
            return Ok(ActiveWrite {
                extents,
                became_hot,
            });
        }
        let synced = self
            .sync_extents(&to_set)
            .and_then(|()| self.sync_extents(&racing));
        {
            let mut st = self.lock_activity();
            for e in &to_set {
                if let Some(n) = st.syncing.get_mut(e) {
                    *n -= 1;
                    if *n == 0 {
                        st.syncing.remove(e);
                    }
                }
            }
            if let Err(e) = synced {
                // The write will not be issued: give its extents back.
                let _ = st.log.end(extents);
                return Err(e);
            }
        }
        Ok(ActiveWrite {
            extents,
            became_hot,
        })
    }

    /// Makes the activity bits of `extents` (sorted) durable; contiguous ones together.
    fn sync_extents(&self, extents: &[u64]) -> Result<(), MetadataError> {
        let mut i = 0;
        while i < extents.len() {
            let start = extents[i];
            let mut end = start + 1;
            while i + 1 < extents.len() && extents[i + 1] == end {
                end += 1;
                i += 1;
            }
            i += 1;
            self.set_durable(&self.activity_region, start..end)?;
        }
        Ok(())
    }

    /// The write registered by `begin_write` completed (on both nodes, or recorded dirty).
    pub fn end_write(&self, write: ActiveWrite) {
        let mut st = self.lock_activity();
        let evicted = st.log.end(write.extents);
        let epoch = st.epoch;
        for e in evicted {
            st.pending.insert(e, epoch);
        }
    }

    /// Call just before flushing the image (fdatasync). Every extent evicted so far has no
    /// write in flight and its writes completed before this call, so once that flush
    /// completes, [`MetadataFile::clear_cold`] may clear their bits.
    pub fn take_cold(&self) -> ColdBatch {
        let mut st = self.lock_activity();
        let epoch = st.epoch;
        st.epoch += 1;
        ColdBatch { epoch }
    }

    /// Call after the image flush that followed `take_cold` completed: clears (lazily) the
    /// bits of extents evicted before it and still cold. Returns how many were cleared.
    pub fn clear_cold(&self, batch: ColdBatch) -> usize {
        // A poisoned file may not hold the dirty bits these extents' writes were counted on;
        // a failed local flush may have dropped their data: either way they stay marked.
        if self.poisoned.load(Ordering::SeqCst) || self.activity_held.load(Ordering::SeqCst) {
            return 0;
        }
        let mut st = self.lock_activity();
        let ready: Vec<u64> = st
            .pending
            .iter()
            .filter(|&(e, &ep)| ep <= batch.epoch && !st.log.is_hot(*e))
            .map(|(&e, _)| e)
            .collect();
        let bits = self.activity_bits();
        for e in &ready {
            st.pending.remove(e);
            bits.clear_range(*e..*e + 1);
        }
        ready.len()
    }

    /// Keeps every activity bit set from now on in this run: a local flush failed, so the
    /// page cache may have dropped writes the kernel never wrote ("fsyncgate": the next flush
    /// would succeed and clear their extents). After a restart they are folded into the dirty
    /// map like a crash's.
    pub fn hold_activity(&self) {
        self.activity_held.store(true, Ordering::SeqCst);
    }

    /// Whether [`MetadataFile::hold_activity`] was called in this run.
    pub fn activity_held(&self) -> bool {
        self.activity_held.load(Ordering::SeqCst)
    }

    /// Marks every extent of the activity map dirty, durably, keeping the activity bits (a
    /// crash's fold, without the crash). Returns the bytes covered.
    pub fn mark_activity_dirty(&self) -> Result<u64, MetadataError> {
        let extent = u64::from(self.extent_size());
        let size = self.volume_size();
        let runs: Vec<Range<u64>> = self.activity_bits().runs().collect();
        let mut covered = 0;
        for r in runs {
            let bytes = bits_to_bytes(r, extent, size);
            self.mark_dirty(bytes.start, bytes.end - bytes.start)?;
            covered += bytes.end - bytes.start;
        }
        Ok(covered)
    }

    /// Extents hot in memory now, sorted.
    pub fn hot_extents(&self) -> Vec<u64> {
        self.lock_activity().log.hot_extents()
    }

    /// Extents waiting for an image flush before their bit is cleared.
    pub fn pending_cold(&self) -> usize {
        self.lock_activity().pending.len()
    }

    // ----- whole file -----

    /// Makes everything durable, including lazy clears.
    pub fn flush(&self) -> Result<(), MetadataError> {
        self.check_usable()?;
        self.sync_file_range(0, self.layout.file_len)
    }

    /// Clean shutdown: requires no write in flight and the image flushed by the caller.
    /// Clears the activity map, sets the clean-shutdown flag, and makes all durable. Later
    /// calls that change the file fail.
    pub fn clean_shutdown(&self) -> Result<(), MetadataError> {
        self.check_usable()?;
        {
            let mut st = self.lock_activity();
            if st
                .log
                .hot_extents()
                .iter()
                .any(|&e| st.log.in_flight(e) > 0)
            {
                return Err(MetadataError::State {
                    path: self.path.clone(),
                    what: "clean shutdown with writes still in flight",
                });
            }
            st.log = ActivityLog::new(st.log.capacity());
            st.pending.clear();
            self.activity_bits().clear_all();
        }
        self.sync_file_range(HEADER_AREA, self.layout.file_len - HEADER_AREA)?;
        self.update_header(|h| h.flags.set(Flags::CLEAN_SHUTDOWN, true))?;
        self.shut_down.store(true, Ordering::SeqCst);
        Ok(())
    }

    // ----- durability -----

    fn check_usable(&self) -> Result<(), MetadataError> {
        if self.poisoned.load(Ordering::SeqCst) {
            return Err(MetadataError::Poisoned {
                path: self.path.clone(),
            });
        }
        if self.shut_down.load(Ordering::SeqCst) {
            return Err(MetadataError::State {
                path: self.path.clone(),
                what: "the file was shut down",
            });
        }
        Ok(())
    }

    fn sync_file_range(&self, offset: u64, len: u64) -> Result<(), MetadataError> {
        self.map.sync(offset, len).map_err(|source| {
            self.poisoned.store(true, Ordering::SeqCst);
            MetadataError::Io {
                path: self.path.clone(),
                op: "msync",
                source,
            }
        })
    }

    /// Sets `bits` of `region` and returns once they are durable; returns whether any changed.
    fn set_durable(&self, region: &Region, bits: Range<u64>) -> Result<bool, MetadataError> {
        self.check_usable()?;
        if bits.is_empty() {
            return Ok(false);
        }
        region.setters.fetch_add(1, Ordering::SeqCst);
        let map = Bits::new(self.words(region), region.nbits);
        let changed = map.set_range(bits.clone());
        // Unchanged bits may have been set by a writer still syncing: then sync too.
        let result = if changed || region.setters.load(Ordering::SeqCst) > 1 {
            let first_byte = region.first_word as u64 * 8 + bits.start / 64 * 8;
            let last_byte = region.first_word as u64 * 8 + (bits.end - 1) / 64 * 8 + 8;
            self.sync_file_range(first_byte, last_byte - first_byte)
        } else {
            Ok(())
        };
        region.setters.fetch_sub(1, Ordering::SeqCst);
        result.map(|()| changed)
    }
}

fn lock(path: &Path, file: File) -> Result<Flock<File>, MetadataError> {
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        if errno == nix::errno::Errno::EWOULDBLOCK {
            MetadataError::Locked {
                path: path.to_owned(),
            }
        } else {
            MetadataError::Io {
                path: path.to_owned(),
                op: "lock",
                source: errno.into(),
            }
        }
    })
}

/// `dir/.name.creating`: where `create` writes a new file before linking it to `dir/name`.
fn staging_path(path: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(".creating");
    path.with_file_name(name)
}

fn sync_parent(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A random 64-bit generation accepted by `ok`.
fn fresh_generation(node: &str, ok: impl Fn(u64) -> bool) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut salt = 0u64;
    loop {
        // RandomState is seeded from the OS's random source.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write(node.as_bytes());
        h.write_u32(std::process::id());
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        h.write_u128(nanos);
        h.write_u64(salt);
        let v = h.finish();
        if ok(v) {
            return v;
        }
        salt += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writer A made an extent hot and is between the activity lock and the sync of its bit
    /// (another data-plane thread). Writer B into the same extent finds it hot already; it
    /// must still not return before the bit is durable.
    #[test]
    fn a_write_into_an_extent_still_being_synced_waits_for_its_bit() {
        let dir = tempfile::tempdir().expect("temporary folder");
        let m = MetadataFile::create(
            &dir.path().join("race.meta"),
            64 << 20,
            "a",
            MetadataOptions::default(),
        )
        .expect("create");
        {
            let mut st = m.lock_activity();
            let a = st.log.begin(2..=2);
            assert_eq!(a.became_hot, vec![2]);
            st.syncing.insert(2, 1);
        }
        assert!(!m.activity_bits().test(2));
        let extent = u64::from(m.extent_size());
        let b = m.begin_write(2 * extent + 4096, 4096).expect("begin");
        assert_eq!(b.became_hot, 0, "hot already, through writer A");
        assert!(
            m.activity_bits().test(2),
            "writer B set and synced the bit itself"
        );
        m.end_write(b);
    }
}
