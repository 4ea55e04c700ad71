//! pread/pwrite on tokio's blocking pool: slower (a thread hop per request) but it works
//! wherever a file does, and it is the oracle the io_uring engine is tested against.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::Via;

pub struct SyncEngine {
    file: Arc<File>,
    uncached: Option<Arc<File>>,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
    // A pool thread does the work; a spinning thread would only take its CPU, and its poll
    // (sockets, rings) would not see the pool's completion anyway.
    let _worker = nbd_server::spin::pause();
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io::Error::other(format!("I/O thread failed: {e}")))
}

impl SyncEngine {
    pub fn new(file: Arc<File>, uncached: Option<Arc<File>>) -> Self {
        SyncEngine { file, uncached }
    }

    fn descriptor(&self, via: Via) -> io::Result<Arc<File>> {
        match via {
            Via::PageCache => Ok(self.file.clone()),
            Via::Direct => self
                .uncached
                .clone()
                .ok_or_else(|| io::ErrorKind::Unsupported.into()),
        }
    }

    pub async fn read_at(
        &self,
        via: Via,
        buf: Vec<u8>,
        at: usize,
        offset: u64,
    ) -> (Vec<u8>, io::Result<usize>) {
        match self.descriptor(via) {
            Ok(f) => pread(f, buf, at, offset).await,
            Err(e) => (buf, Err(e)),
        }
    }

    pub async fn write_at(
        &self,
        via: Via,
        buf: Vec<u8>,
        at: usize,
        offset: u64,
        dsync: bool,
    ) -> (Vec<u8>, io::Result<usize>) {
        match self.descriptor(via) {
            Ok(f) => pwrite(f, buf, at, offset, dsync).await,
            Err(e) => (buf, Err(e)),
        }
    }

    pub async fn datasync(&self) -> io::Result<()> {
        let file = self.file.clone();
        blocking(move || file.sync_data()).await?
    }

    pub async fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        let file = self.file.clone();
        blocking(move || {
            let flags = nix::fcntl::FallocateFlags::from_bits_truncate(mode);
            nix::fcntl::fallocate(file.as_raw_fd(), flags, offset as i64, len as i64)
                .map_err(io::Error::from)
        })
        .await?
    }
}

async fn pwrite(
    file: Arc<File>,
    buf: Vec<u8>,
    at: usize,
    offset: u64,
    dsync: bool,
) -> (Vec<u8>, io::Result<usize>) {
    match blocking(move || {
        let r = file.write_at(&buf[at..], offset);
        let r = match r {
            Ok(n) if dsync => file.sync_data().map(|_| n),
            other => other,
        };
        (buf, r)
    })
    .await
    {
        Ok(pair) => pair,
        Err(e) => (Vec::new(), Err(e)),
    }
}

async fn pread(
    file: Arc<File>,
    mut buf: Vec<u8>,
    at: usize,
    offset: u64,
) -> (Vec<u8>, io::Result<usize>) {
    let len = buf.len();
    match blocking(move || {
        let r = file.read_at(&mut buf[at..], offset);
        (buf, r)
    })
    .await
    {
        Ok(pair) => pair,
        Err(e) => (vec![0; len], Err(e)),
    }
}
