//! Image I/O engines. [`Engine::Uring`] drives io_uring directly (no tokio-uring: it is
//! unmaintained); [`Engine::Sync`] uses pread/pwrite on tokio's blocking pool and is both
//! the fallback for hosts where io_uring is disabled and the oracle of the differential test.

use std::fs::File;
use std::io;
use std::sync::Arc;

mod sync;
#[allow(unsafe_code)]
mod uring;

#[cfg(test)]
pub(crate) use uring::fail_ring_setup_on_this_thread;

pub use sync::SyncEngine;
pub use uring::UringEngine;

/// Which engine the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineKind {
    /// io_uring when the kernel allows it, else sync.
    #[default]
    Auto,
    Uring,
    Sync,
}

impl std::str::FromStr for EngineKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(EngineKind::Auto),
            "uring" | "io_uring" => Ok(EngineKind::Uring),
            "sync" => Ok(EngineKind::Sync),
            _ => Err(format!(
                "unknown I/O engine '{s}' (expected auto, uring or sync)"
            )),
        }
    }
}

/// Which descriptor of the image an operation goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The ordinary one: through the page cache.
    PageCache,
    /// The O_DIRECT one: the disk reads from or writes into the caller's buffer, and the page
    /// cache is neither filled nor copied (the kernel writes back, and for a write drops,
    /// cached pages of the range first, so both views stay current). The buffer's address
    /// and length and the offset must be multiples of the device's block size. Fails with
    /// `Unsupported` when the filesystem gave no O_DIRECT descriptor (tmpfs).
    Direct,
}

pub enum Engine {
    Sync(SyncEngine),
    /// io_uring, with the sync engine for threads that cannot get a ring.
    Uring(UringEngine, SyncEngine),
}

impl Engine {
    /// Builds the engine for `file`; `uncached` is the same file opened with O_DIRECT, when
    /// the filesystem allows it (see [`Via::Direct`]). Must run inside a tokio
    /// runtime (the io_uring engine polls its completions from there).
    pub fn new(
        kind: EngineKind,
        file: Arc<File>,
        uncached: Option<Arc<File>>,
    ) -> io::Result<Engine> {
        match kind {
            EngineKind::Sync => Ok(Engine::Sync(SyncEngine::new(file, uncached))),
            EngineKind::Uring => Ok(Engine::Uring(
                UringEngine::new(file.clone(), uncached.clone())?,
                SyncEngine::new(file, uncached),
            )),
            EngineKind::Auto => match UringEngine::new(file.clone(), uncached.clone()) {
                Ok(e) => Ok(Engine::Uring(e, SyncEngine::new(file, uncached))),
                Err(e) => {
                    tracing::warn!(error = %e, "io_uring unavailable, falling back to the sync engine");
                    Ok(Engine::Sync(SyncEngine::new(file, uncached)))
                }
            },
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Engine::Sync(_) => "sync",
            Engine::Uring(..) => "uring",
        }
    }

    /// Reads into `buf[at..]` from `offset` through `via`; returns the buffer and the bytes
    /// read.
    pub async fn read_at(
        &self,
        via: Via,
        buf: Vec<u8>,
        at: usize,
        offset: u64,
    ) -> (Vec<u8>, io::Result<usize>) {
        match self {
            Engine::Sync(e) => e.read_at(via, buf, at, offset).await,
            Engine::Uring(e, _) if e.ring_here() => e.read_at(via, buf, at, offset).await,
            Engine::Uring(_, fallback) => fallback.read_at(via, buf, at, offset).await,
        }
    }

    /// Writes `buf[at..]` at `offset` through `via`; `dsync` makes this write durable before
    /// it completes.
    pub async fn write_at(
        &self,
        via: Via,
        buf: Vec<u8>,
        at: usize,
        offset: u64,
        dsync: bool,
    ) -> (Vec<u8>, io::Result<usize>) {
        match self {
            Engine::Sync(e) => e.write_at(via, buf, at, offset, dsync).await,
            Engine::Uring(e, _) if e.ring_here() => e.write_at(via, buf, at, offset, dsync).await,
            Engine::Uring(_, fallback) => fallback.write_at(via, buf, at, offset, dsync).await,
        }
    }

    pub async fn datasync(&self) -> io::Result<()> {
        match self {
            Engine::Sync(e) => e.datasync().await,
            Engine::Uring(e, _) if e.ring_here() => e.datasync().await,
            Engine::Uring(_, fallback) => fallback.datasync().await,
        }
    }

    /// fallocate(2) with `mode` (FALLOC_FL_* bits).
    pub async fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        match self {
            Engine::Sync(e) => e.fallocate(mode, offset, len).await,
            Engine::Uring(e, _) if e.ring_here() => e.fallocate(mode, offset, len).await,
            Engine::Uring(_, fallback) => fallback.fallocate(mode, offset, len).await,
        }
    }
}
