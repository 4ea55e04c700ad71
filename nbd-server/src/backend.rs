//! The storage seen by the server: a small async trait, so the protocol knows nothing of
//! files, io_uring or mirroring. `mirror` implements it for local images and replicated
//! volumes.

use std::future::Future;

use crate::proto::NbdErrno;
use crate::reply::Extent;

/// How WRITE_ZEROES may be carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroMode {
    /// The client allows the range to become a hole (no NO_HOLE flag).
    pub may_trim: bool,
    /// FAST_ZERO: fail with [`BackendError::FastZeroUnsupported`] instead of writing zeroes.
    pub fast_only: bool,
    pub fua: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{op} of {length} bytes at offset {offset} failed: {source}")]
    Io {
        op: &'static str,
        offset: u64,
        length: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("zeroing cannot be done faster than writing zeroes here")]
    FastZeroUnsupported,
    #[error("the volume is shutting down")]
    ShuttingDown,
}

impl BackendError {
    pub fn io(op: &'static str, offset: u64, length: u64, source: std::io::Error) -> Self {
        BackendError::Io {
            op,
            offset,
            length,
            source,
        }
    }

    /// The error value sent to the client.
    pub fn errno(&self) -> NbdErrno {
        match self {
            BackendError::Io { source, .. } => source
                .raw_os_error()
                .map(NbdErrno::from_os_error)
                .unwrap_or(NbdErrno::Io),
            BackendError::FastZeroUnsupported => NbdErrno::NotSup,
            BackendError::ShuttingDown => NbdErrno::Shutdown,
        }
    }
}

pub type BackendResult<T> = Result<T, BackendError>;

/// A block device as the NBD server uses it. Ranges are validated by the server before any
/// call (`offset + length <= size`). Buffers are passed by value so an engine such as
/// io_uring can own them while the kernel uses them.
pub trait BlockBackend: Send + Sync + 'static {
    fn size(&self) -> u64;
    fn read_only(&self) -> bool;

    fn read(
        &self,
        offset: u64,
        length: usize,
    ) -> impl Future<Output = BackendResult<Vec<u8>>> + Send;
    fn write(
        &self,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> impl Future<Output = BackendResult<()>> + Send;
    /// Makes every completed write durable (on every connection: CAN_MULTI_CONN relies on it).
    fn flush(&self) -> impl Future<Output = BackendResult<()>> + Send;
    /// Advisory discard; the range reads back as zeroes afterwards in our implementations.
    fn trim(
        &self,
        offset: u64,
        length: u64,
        fua: bool,
    ) -> impl Future<Output = BackendResult<()>> + Send;
    fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        mode: ZeroMode,
    ) -> impl Future<Output = BackendResult<()>> + Send;
    /// Prefetch hint.
    fn cache(&self, offset: u64, length: u64) -> impl Future<Output = BackendResult<()>> + Send;
    /// `base:allocation` extents covering at most `length` bytes from `offset`, at most
    /// `max_extents` of them, at least one.
    fn block_status(
        &self,
        offset: u64,
        length: u64,
        max_extents: usize,
    ) -> impl Future<Output = BackendResult<Vec<Extent>>> + Send;
}
