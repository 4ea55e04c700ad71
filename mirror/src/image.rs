//! A raw image file served as a block device: the [`BlockBackend`] of `nbdmirror export`,
//! and the local half of a mirrored volume later.
//!
//! Durability: writes go through the page cache; FLUSH is fdatasync and FUA is RWF_DSYNC
//! (the same contract as the fastest peers). Discard punches holes, so trimmed ranges read
//! back as zeroes on every node.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use nbd_server::{BackendError, BackendResult, BlockBackend, Extent, ZeroMode};
use nix::errno::Errno;
use nix::unistd::Whence;

use crate::engine::{Engine, EngineKind, Via};

const ZERO_CHUNK: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image {path} does not exist (to make a new one, add --create SIZE)")]
    NotFound { path: PathBuf },
    #[error("refusing to create {path}: it already exists (drop --create to serve it as it is)")]
    AlreadyExists { path: PathBuf },
    #[error("cannot open image {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("image {path} is not a regular file or block device")]
    NotAFile { path: PathBuf },
    #[error("cannot create image {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the {engine} I/O engine for {path}: {source}")]
    Engine {
        engine: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The most an NBD_CMD_CACHE advises at once (what one read may carry).
const CACHE_AHEAD_MAX: u64 = 32 << 20;
/// Creates a new sparse image of `size` bytes; never touches an existing file.
pub fn create_image(path: &Path, size: u64) -> Result<(), ImageError> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|source| match source.kind() {
            io::ErrorKind::AlreadyExists => ImageError::AlreadyExists {
                path: path.to_owned(),
            },
            _ => ImageError::Create {
                path: path.to_owned(),
                source,
            },
        })?;
    file.set_len(size)
        .and_then(|_| file.sync_all())
        .map_err(|source| ImageError::Create {
            path: path.to_owned(),
            source,
        })
}

/// Buffered writes up to 4 MiB are done inline with pwrite(2) on the calling thread. Through
/// the page cache a pwrite is a copy (a few microseconds for 4 KiB, ~0.3 ms for 1 MiB), while
/// io_uring cannot issue a buffered write on ext4 without blocking and hands each one to an
/// io-wq worker thread, which serialises the writes of one file anyway (io-wq hashes them by
/// inode): two thread switches for nothing. Measured against nbdkit's file plugin (pwrite in
/// its worker threads): QD1 4 KiB writes 1.5-3x faster inline than through io-wq, 1 MiB
/// sequential writes from 0.68x to 1.12x of nbdkit. Larger writes (a copy long enough to
/// delay the thread's other connections), FUA writes (RWF_DSYNC) and everything else stay on
/// io_uring. The cost: a write that hits dirty-page throttling holds this data-plane thread
/// for a while.
const INLINE_WRITE_MAX: usize = 4 * 1024 * 1024;

/// A FLUSH alone on its thread runs fdatasync inline only when at most this many page-cache
/// writes came since the previous one. The thread also carries the volume's replication link
/// (its pings, its acknowledgements): blocked for longer than the peer's timeout, it drops the
/// link and the pair resyncs. A FLUSH after each write or few (a guest's journal, the QD1
/// write+FLUSH load the inline path is for) costs a device flush and a few pages; one after
/// thousands of buffered writes (the periodic flush of a secondary, a guest that syncs
/// rarely) can take seconds on a disk with seeks (reproduced: a 0.5 s fdatasync of a
/// secondary after 6 s of random writes dropped a link with a 200 ms timeout).
const INLINE_FLUSH_MAX_WRITES: u64 = 64;

/// Smallest write [`ImageFile::write_through`] sends around the page cache: below it the
/// device's latency would show in a secondary's acknowledgement for little saved copying.
const DIRECT_WRITE_MIN: usize = 256 * 1024;

pub struct ImageFile {
    file: Arc<File>,
    engine: Engine,
    size: u64,
    read_only: bool,
    path: PathBuf,
    /// A flush (or a FUA write's sync) of this image failed. The kernel reports a writeback
    /// error once: the next fdatasync succeeds although the pages it could not write may be
    /// gone ("fsyncgate"), so from then on every flush and FUA write fails, as QEMU and
    /// PostgreSQL do, until the failure is handled (see [`ImageFile::forgive_failed_flush`])
    /// or the daemon restarts.
    flush_failed: AtomicBool,
    /// Page-cache writes since the last flush started (see [`INLINE_FLUSH_MAX_WRITES`]).
    writes_since_flush: AtomicU64,
    /// Test-only: flushes made inline on the caller's thread.
    #[cfg(test)]
    inline_flushes: AtomicU64,
    /// Test-only: writes held back as if the disk stalled (see [`ImageFile::stall_next_write_at`]).
    #[cfg(test)]
    stalls: std::sync::Mutex<Vec<Stall>>,
    /// Test-only: a flush to fail (see [`ImageFile::fail_flush_after`]).
    #[cfg(test)]
    failing_flush: std::sync::Mutex<Option<FailingFlush>>,
}

/// Test-only: a flush to fail (see [`ImageFile::fail_flush_after`]).
#[cfg(test)]
struct FailingFlush {
    successes_left: u32,
    failed: tokio::sync::oneshot::Sender<()>,
}

/// Test-only: one write to hold back (see [`ImageFile::stall_next_write_at`]).
#[cfg(test)]
struct Stall {
    offset: u64,
    started: tokio::sync::oneshot::Sender<()>,
    release: tokio::sync::oneshot::Receiver<()>,
}

impl ImageFile {
    /// Opens an image. Must run inside a tokio runtime.
    pub fn open(path: &Path, read_only: bool, kind: EngineKind) -> Result<Self, ImageError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| match source.kind() {
                io::ErrorKind::NotFound => ImageError::NotFound {
                    path: path.to_owned(),
                },
                _ => ImageError::Open {
                    path: path.to_owned(),
                    source,
                },
            })?;
        let meta = file.metadata().map_err(|source| ImageError::Open {
            path: path.to_owned(),
            source,
        })?;
        use std::os::unix::fs::FileTypeExt;
        let ft = meta.file_type();
        if !(ft.is_file() || ft.is_block_device()) {
            return Err(ImageError::NotAFile {
                path: path.to_owned(),
            });
        }
        let size = if ft.is_block_device() {
            nix::unistd::lseek(file.as_raw_fd(), 0, Whence::SeekEnd).map_err(|e| {
                ImageError::Open {
                    path: path.to_owned(),
                    source: e.into(),
                }
            })? as u64
        } else {
            meta.len()
        };
        let file = Arc::new(file);
        // Bulk reads (a resync source's) bypass the page cache where the filesystem allows it
        // (not tmpfs): see read_uncached.
        let uncached = {
            use std::os::unix::fs::OpenOptionsExt;
            OpenOptions::new()
                .read(true)
                .write(!read_only)
                .custom_flags(libc::O_DIRECT)
                .open(path)
                .map(Arc::new)
                .map_err(|e| tracing::debug!(image = %path.display(), error = %e, "no O_DIRECT reads; bulk reads go through the page cache"))
                .ok()
        };
        let engine =
            Engine::new(kind, file.clone(), uncached).map_err(|source| ImageError::Engine {
                engine: match kind {
                    EngineKind::Sync => "sync",
                    _ => "io_uring",
                },
                path: path.to_owned(),
                source,
            })?;
        Ok(ImageFile {
            file,
            engine,
            size,
            read_only,
            path: path.to_owned(),
            flush_failed: AtomicBool::new(false),
            writes_since_flush: AtomicU64::new(0),
            #[cfg(test)]
            inline_flushes: AtomicU64::new(0),
            #[cfg(test)]
            stalls: std::sync::Mutex::new(Vec::new()),
            #[cfg(test)]
            failing_flush: std::sync::Mutex::new(None),
        })
    }

    /// Test-only: a disk that stalls. The next [`ImageFile::write_through`] at `offset` waits
    /// before it writes anything until the returned sender fires or drops; the returned
    /// receiver fires when that write has started (is in service and waiting).
    #[cfg(test)]
    pub(crate) fn stall_next_write_at(
        &self,
        offset: u64,
    ) -> (
        tokio::sync::oneshot::Sender<()>,
        tokio::sync::oneshot::Receiver<()>,
    ) {
        let (release_tx, release) = tokio::sync::oneshot::channel();
        let (started, started_rx) = tokio::sync::oneshot::channel();
        self.stalls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Stall {
                offset,
                started,
                release,
            });
        (release_tx, started_rx)
    }

    #[cfg(test)]
    async fn stall_if_asked(&self, offset: u64) {
        let stall = {
            let mut stalls = self.stalls.lock().unwrap_or_else(|e| e.into_inner());
            let at = stalls.iter().position(|s| s.offset == offset);
            at.map(|i| stalls.remove(i))
        };
        if let Some(s) = stall {
            let _ = s.started.send(());
            let _ = s.release.await;
        }
    }

    /// Test-only: a disk whose flush fails once. The next `successes` flushes succeed, the
    /// one after fails with EIO before it syncs anything (as an fdatasync that lost pages);
    /// the returned receiver fires when it has failed.
    #[cfg(test)]
    pub(crate) fn fail_flush_after(&self, successes: u32) -> tokio::sync::oneshot::Receiver<()> {
        let (failed, failed_rx) = tokio::sync::oneshot::channel();
        *self.failing_flush.lock().unwrap_or_else(|e| e.into_inner()) = Some(FailingFlush {
            successes_left: successes,
            failed,
        });
        failed_rx
    }

    /// Test-only: whether this flush is the one [`ImageFile::fail_flush_after`] asked to fail.
    #[cfg(test)]
    fn flush_fails_if_asked(&self) -> bool {
        let mut slot = self.failing_flush.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = slot.as_mut().filter(|f| f.successes_left > 0) {
            f.successes_left -= 1;
            return false;
        }
        match slot.take() {
            Some(f) => {
                let _ = f.failed.send(());
                true
            }
            None => false,
        }
    }

    pub fn engine_name(&self) -> &'static str {
        self.engine.name()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes data that nobody reads back soon: a secondary's copy of a mirrored write, a
    /// resync target's chunk. Large aligned writes go through the O_DIRECT descriptor, so
    /// they neither fill the page cache nor cost the copy into it (and no write-back later);
    /// everything else, and any uncached failure, is an ordinary [`BlockBackend::write`].
    /// A secondary serves no reads, so its page cache only ever held data on its way to
    /// the disk: measured with mirrored 1 MiB writes on a cold cache, 935 -> 1,240 MiB/s
    /// (BENCHMARKS.md). The primary keeps the page cache: its reads, and its writes to a
    /// device shared with the peer, were faster that way.
    pub async fn write_through(&self, offset: u64, data: Vec<u8>, fua: bool) -> BackendResult<()> {
        #[cfg(test)]
        self.stall_if_asked(offset).await;
        let len = data.len();
        let data = if len >= DIRECT_WRITE_MIN
            && offset.is_multiple_of(DIRECT_ALIGN as u64)
            && len.is_multiple_of(DIRECT_ALIGN)
            && (data.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
        {
            let (buf, r) = self
                .engine
                .write_at(Via::Direct, data, 0, offset, fua)
                .await;
            match r {
                Ok(n) if n == len => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Unsupported => {}
                other => {
                    tracing::debug!(offset, len, result = ?other, "uncached write failed or stopped short; writing through the page cache");
                }
            }
            buf
        } else {
            data
        };
        self.write_all(data, offset, fua).await
    }

    /// A write whose buffer is shared (with the replication frame that carries it to the
    /// peer): written from the shared buffer when the write goes inline, else from a copy
    /// unless nobody else holds it any more.
    pub async fn write_shared(
        &self,
        offset: u64,
        data: Arc<Vec<u8>>,
        fua: bool,
    ) -> BackendResult<()> {
        if !fua && data.len() <= INLINE_WRITE_MAX {
            return self.write_inline(&data, offset);
        }
        let owned = Arc::try_unwrap(data).unwrap_or_else(|shared| shared.as_ref().clone());
        self.write_all(owned, offset, fua).await
    }

    /// A secondary that marked its copy inconsistent after a failed flush has the failure
    /// handled (the primary records what it may lack; a resync rewrites it): its later
    /// flushes count again.
    pub fn forgive_failed_flush(&self) {
        self.flush_failed.store(false, Ordering::SeqCst);
    }

    /// Whether a flush failed and was not forgiven.
    pub fn has_failed_flush(&self) -> bool {
        self.flush_failed.load(Ordering::SeqCst)
    }

    /// EIO while an earlier flush failure stands.
    fn refuse_after_failed_flush(&self, op: &'static str) -> BackendResult<()> {
        if self.has_failed_flush() {
            return Err(BackendError::io(
                op,
                0,
                0,
                io::Error::other(
                    "an earlier flush of this image failed: writes may have been lost since; \
                     every flush fails until the daemon restarts (check the disk)",
                ),
            ));
        }
        Ok(())
    }

    /// Records a failed flush (see `flush_failed`).
    fn flush_result(&self, r: io::Result<()>) -> BackendResult<()> {
        r.map_err(|e| {
            self.flush_failed.store(true, Ordering::SeqCst);
            BackendError::io("flush", 0, 0, e)
        })
    }

    fn write_inline(&self, data: &[u8], offset: u64) -> BackendResult<()> {
        use std::os::unix::fs::FileExt;
        self.writes_since_flush.fetch_add(1, Ordering::Relaxed);
        self.file
            .write_all_at(data, offset)
            .map_err(|e| BackendError::io("write", offset, data.len() as u64, e))
    }

    async fn write_all(&self, mut data: Vec<u8>, offset: u64, dsync: bool) -> BackendResult<()> {
        let len = data.len();
        if !dsync && len <= INLINE_WRITE_MAX {
            return self.write_inline(&data, offset);
        }
        if dsync {
            self.refuse_after_failed_flush("write")?;
        } else {
            self.writes_since_flush.fetch_add(1, Ordering::Relaxed);
        }
        let mut done = 0;
        let mut retries = 0;
        while done < len {
            let (buf, r) = self
                .engine
                .write_at(Via::PageCache, data, done, offset + done as u64, dsync)
                .await;
            data = buf;
            match r {
                Ok(0) => {
                    let e = io::Error::new(io::ErrorKind::WriteZero, "short write");
                    return Err(BackendError::io("write", offset, len as u64, e));
                }
                Ok(n) => done += n,
                Err(e) if transient(&e) && retries < TRANSIENT_RETRIES => retries += 1,
                Err(e) => {
                    // A synced write's EIO may be an earlier write's writeback error.
                    if dsync && e.raw_os_error() == Some(libc::EIO) {
                        self.flush_failed.store(true, Ordering::SeqCst);
                    }
                    return Err(BackendError::io("write", offset, len as u64, e));
                }
            }
        }
        if dsync {
            nbd_server::spin::device_flushed();
        }
        Ok(())
    }

    async fn zero_by_writing(&self, offset: u64, length: u64, fua: bool) -> BackendResult<()> {
        let mut pos = offset;
        let end = offset + length;
        while pos < end {
            let n = ((end - pos) as usize).min(ZERO_CHUNK);
            self.write_all(vec![0u8; n], pos, false).await?;
            pos += n as u64;
        }
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    pub fn extents_sync(&self, offset: u64, length: u64, max: usize) -> io::Result<Vec<Extent>> {
        let fd = self.file.as_raw_fd();
        let end = offset + length;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        let hole = nbd_server::proto::STATE_HOLE | nbd_server::proto::STATE_ZERO;
        while pos < end && out.len() < max {
            let data_at = match nix::unistd::lseek(fd, pos as i64, Whence::SeekData) {
                Ok(d) => d as u64,
                // No data after pos: the rest is a hole.
                Err(Errno::ENXIO) => end,
                // No SEEK_DATA support (or a block device): say "all data", never "zero".
                Err(Errno::EINVAL) | Err(Errno::EOPNOTSUPP) => {
                    push_extent(&mut out, end - pos, 0);
                    break;
                }
                Err(e) => return Err(e.into()),
            };
            let (next, flags) = if data_at > pos {
                (data_at.min(end), hole)
            } else {
                let hole_at = match nix::unistd::lseek(fd, pos as i64, Whence::SeekHole) {
                    Ok(h) => h as u64,
                    Err(Errno::ENXIO) => end,
                    Err(e) => return Err(e.into()),
                };
                (hole_at.clamp(pos + 1, end), 0)
            };
            push_extent(&mut out, next - pos, flags);
            pos = next;
        }
        Ok(out)
    }
}

fn push_extent(out: &mut Vec<Extent>, length: u64, flags: u32) {
    match out.last_mut() {
        Some(last) if last.flags == flags => last.length += length,
        _ => out.push(Extent { length, flags }),
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

/// Bytes read by [`ImageFile::read_uncached`]: a window of an over-allocated buffer, aligned
/// for O_DIRECT.
pub struct ChunkBuf {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl ChunkBuf {
    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
}

/// O_DIRECT's alignment of buffer address, offset and length (the largest logical block size
/// of common devices).
const DIRECT_ALIGN: usize = 4096;

impl ImageFile {
    /// Reads a range the way a bulk copy wants it: the disk writes straight into our buffer
    /// (O_DIRECT), so a cold range is neither added to the page cache nor copied out of it.
    /// On this VM the cold buffered read of 1 GiB cost 0.75 s of CPU against 0.06 s uncached,
    /// and that copy was a resync source's main cost. Dirty cached pages of the range are
    /// written back by the kernel first, so the data is current. Falls back to a buffered
    /// read for unaligned ranges, filesystems without O_DIRECT and any uncached failure.
    pub async fn read_uncached(&self, offset: u64, length: usize) -> BackendResult<ChunkBuf> {
        let aligned = offset.is_multiple_of(DIRECT_ALIGN as u64)
            && length.is_multiple_of(DIRECT_ALIGN)
            && offset + length as u64 <= self.size;
        if aligned && length > 0 {
            let mut buf: Vec<u8> = Vec::with_capacity(length + DIRECT_ALIGN);
            let start = buf.as_ptr().align_offset(DIRECT_ALIGN);
            if start < DIRECT_ALIGN {
                // Within the capacity: the storage (and so the alignment) stays put.
                buf.resize(start + length, 0);
                let (buf, r) = self.engine.read_at(Via::Direct, buf, start, offset).await;
                match r {
                    Ok(n) if n == length => {
                        return Ok(ChunkBuf {
                            buf,
                            start,
                            len: length,
                        })
                    }
                    Ok(n) => {
                        tracing::debug!(
                            offset,
                            length,
                            read = n,
                            "short uncached read; reading through the page cache"
                        )
                    }
                    Err(e) if e.kind() == io::ErrorKind::Unsupported => {}
                    Err(e) => {
                        tracing::debug!(offset, length, error = %e, "uncached read failed; reading through the page cache")
                    }
                }
            }
        }
        let buf = BlockBackend::read(self, offset, length).await?;
        Ok(ChunkBuf {
            len: buf.len(),
            buf,
            start: 0,
        })
    }
}

impl ImageFile {
    /// fdatasync on an io-wq worker, never on the calling thread (a background task on a
    /// thread that serves other work).
    pub async fn flush_off_thread(&self) -> BackendResult<()> {
        self.refuse_after_failed_flush("flush")?;
        #[cfg(test)]
        if self.flush_fails_if_asked() {
            return self.flush_result(Err(io::Error::from_raw_os_error(libc::EIO)));
        }
        self.writes_since_flush.store(0, Ordering::Release);
        let r = self.engine.datasync().await;
        self.flush_result(r)
    }
}

impl BlockBackend for ImageFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    async fn read(&self, offset: u64, length: usize) -> BackendResult<Vec<u8>> {
        let mut buf = vec![0u8; length];
        let mut done = 0;
        let mut retries = 0;
        while done < length {
            let (b, r) = self
                .engine
                .read_at(Via::PageCache, buf, done, offset + done as u64)
                .await;
            buf = b;
            match r {
                // A file shorter than its advertised size reads as zeroes past its end.
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if transient(&e) && retries < TRANSIENT_RETRIES => retries += 1,
                Err(e) => return Err(BackendError::io("read", offset, length as u64, e)),
            }
        }
        Ok(buf)
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> BackendResult<()> {
        self.write_all(data, offset, fua).await
    }

    async fn flush(&self) -> BackendResult<()> {
        self.refuse_after_failed_flush("flush")?;
        #[cfg(test)]
        if self.flush_fails_if_asked() {
            return self.flush_result(Err(io::Error::from_raw_os_error(libc::EIO)));
        }
        let written = self.writes_since_flush.swap(0, Ordering::AcqRel);
        if nbd_server::spin::requests_here() <= 1 && written <= INLINE_FLUSH_MAX_WRITES {
            // Alone on this thread, with little to write back: fdatasync right here, as a
            // page-cache server's worker thread does. Through io_uring the flush is handed to
            // an io-wq worker and its completion wakes this thread again: two thread switches
            // that made a QD1 write+FLUSH 10-20 % slower than nbdkit's. With other requests
            // in flight, or much to write back, it stays on io_uring, so they (and the
            // replication link) are not held up for the device.
            #[cfg(test)]
            self.inline_flushes.fetch_add(1, Ordering::Relaxed);
            let r = self.file.sync_data();
            nbd_server::spin::device_flushed();
            return self.flush_result(r);
        }
        let r = self.engine.datasync().await;
        nbd_server::spin::device_flushed();
        self.flush_result(r)
    }

    async fn trim(&self, offset: u64, length: u64, fua: bool) -> BackendResult<()> {
        if length == 0 {
            return Ok(());
        }
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match self.engine.fallocate(mode, offset, length).await {
            Ok(()) => {}
            // Discard is advisory: a filesystem that cannot punch holes keeps the data.
            Err(e) if unsupported(&e) => return Ok(()),
            Err(e) => return Err(BackendError::io("trim", offset, length, e)),
        }
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, length: u64, mode: ZeroMode) -> BackendResult<()> {
        if length == 0 {
            return Ok(());
        }
        let attempts: &[i32] = if mode.may_trim {
            &[
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            ]
        } else {
            &[libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE]
        };
        for &falloc in attempts {
            match self.engine.fallocate(falloc, offset, length).await {
                Ok(()) => {
                    if mode.fua {
                        self.flush().await?;
                    }
                    return Ok(());
                }
                Err(e) if unsupported(&e) => continue,
                Err(e) => return Err(BackendError::io("write-zeroes", offset, length, e)),
            }
        }
        if mode.fast_only {
            return Err(BackendError::FastZeroUnsupported);
        }
        self.zero_by_writing(offset, length, mode.fua).await
    }

    async fn cache(&self, offset: u64, length: u64) -> BackendResult<()> {
        use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
        // Advisory, and run on this data-plane thread: a length of 0 would mean "to the end
        // of the file" to fadvise, and a huge one would hold the thread while the kernel
        // queues its readahead, so only the first CACHE_AHEAD_MAX bytes are advised.
        let length = length.min(CACHE_AHEAD_MAX);
        if length == 0 {
            return Ok(());
        }
        let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(length)) else {
            return Ok(());
        };
        posix_fadvise(
            self.file.as_raw_fd(),
            off,
            len,
            PosixFadviseAdvice::POSIX_FADV_WILLNEED,
        )
        .map_err(|e| BackendError::io("cache", offset, length, e.into()))
    }

    async fn block_status(
        &self,
        offset: u64,
        length: u64,
        max_extents: usize,
    ) -> BackendResult<Vec<Extent>> {
        // lseek(SEEK_DATA/SEEK_HOLE) only reads extent metadata: cheap enough inline.
        self.extents_sync(offset, length, max_extents.max(1))
            .map_err(|e| BackendError::io("block-status", offset, length, e))
    }
}

/// How often one request retries an interrupted or would-block read or write (images on
/// NFS or FUSE can return EINTR or EAGAIN) before the error goes to the client.
const TRANSIENT_RETRIES: u32 = 100;

fn transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 1 MiB image in a fresh folder (kept while the returned guard lives).
    fn temp_image() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("i.img");
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(1 << 20))
            .expect("image");
        (dir, path)
    }

    /// After a failed flush the kernel may report success for the next one although pages
    /// were lost: every later flush and FUA write fails until the failure is forgiven (a
    /// secondary that marked its copy for resync). A plain write still goes to the cache.
    #[tokio::test]
    async fn a_failed_flush_fails_every_later_one_until_forgiven() {
        let (_dir, path) = temp_image();
        for kind in [EngineKind::Auto, EngineKind::Sync] {
            let image = ImageFile::open(&path, false, kind).expect("open");
            image.flush().await.expect("a first flush");
            let failed = image.fail_flush_after(0);
            assert!(image.flush().await.is_err());
            failed.await.expect("flush hook");
            assert!(image.flush().await.is_err(), "{kind:?}: the next flush");
            assert!(image.flush_off_thread().await.is_err(), "{kind:?}");
            assert!(
                image.write(0, vec![1; 64 << 10], true).await.is_err(),
                "{kind:?}: a FUA write"
            );
            image
                .write(0, vec![1; 64 << 10], false)
                .await
                .expect("a plain write");
            image.forgive_failed_flush();
            image.flush().await.expect("forgiven");
        }
    }

    /// A FLUSH after a few writes syncs inline; one after many buffered writes (seconds of
    /// write-back on a disk with seeks) leaves the thread free for its replication link.
    #[tokio::test]
    async fn a_flush_with_much_to_write_back_leaves_the_thread() {
        let (_dir, path) = temp_image();
        for kind in [EngineKind::Auto, EngineKind::Sync] {
            let image = ImageFile::open(&path, false, kind).expect("open");
            let inline = || image.inline_flushes.load(Ordering::Relaxed);
            image.write(0, vec![1; 4096], false).await.expect("write");
            image.flush().await.expect("flush");
            assert_eq!(inline(), 1, "{kind:?}: one write to sync, inline");
            for i in 0..=INLINE_FLUSH_MAX_WRITES {
                image
                    .write(i * 4096, vec![2; 4096], false)
                    .await
                    .expect("write");
            }
            image.flush().await.expect("flush");
            assert_eq!(inline(), 1, "{kind:?}: many writes to sync, off the thread");
            image.write(0, vec![3; 4096], false).await.expect("write");
            image.flush().await.expect("flush");
            assert_eq!(inline(), 2, "{kind:?}: counted from the last flush");
        }
    }

    /// A data-plane thread that cannot set up its own io_uring ring (the check at open ran on
    /// another thread) serves its requests through the sync engine instead of failing each.
    #[tokio::test]
    async fn a_thread_without_a_ring_falls_back_to_the_sync_engine() {
        let (_dir, path) = temp_image();
        let image = Arc::new(ImageFile::open(&path, false, EngineKind::Uring).expect("open"));
        assert_eq!(image.engine_name(), "uring");
        let other = image.clone();
        std::thread::spawn(move || {
            crate::engine::fail_ring_setup_on_this_thread();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                // Past the inline size, so the write goes through the engine.
                other
                    .write(0, vec![0x5a; 1 << 19], true)
                    .await
                    .expect("a FUA write without a ring");
                other.flush().await.expect("a flush without a ring");
                let back = other.read(0, 1 << 19).await.expect("a read without a ring");
                assert!(back.iter().all(|&b| b == 0x5a));
            });
        })
        .join()
        .expect("the thread's requests succeed");
    }
}
