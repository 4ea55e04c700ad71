//! io_uring without a runtime of its own (the tokio-epoll-uring shape): any tokio task
//! submits on a shared ring and reaps what completed inline; completions that arrive later
//! make the ring's descriptor readable; a small tokio task watches it and wakes their futures.
//!
//! Buffer ownership is the safety argument of this module: every operation owns its buffer
//! until the kernel posted the completion. If the future is dropped first, the buffer moves
//! into the slot table ([`Slot::Orphaned`]) and is freed only when its completion arrives;
//! dropping the ring waits for every operation still in flight.

use std::any::Any;
use std::cell::RefCell;
use std::fs::File;
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};

use io_uring::{opcode, squeue, types, IoUring};
use tokio::io::unix::AsyncFd;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::Via;

const SQ_ENTRIES: u32 = 256;
const CQ_ENTRIES: u32 = 1024;
/// The image is registered as fixed file 0: the kernel skips the fd lookup per operation.
const IMAGE: types::Fixed = types::Fixed(0);
/// Its O_DIRECT descriptor, when there is one, is fixed file 1.
const IMAGE_UNCACHED: types::Fixed = types::Fixed(1);

enum Slot {
    Free,
    Waiting(Option<Waker>),
    Done(i32),
    /// The future went away; keep its buffer alive until the kernel is done with it.
    Orphaned(#[allow(dead_code)] Box<dyn Any + Send>),
}

struct Ring {
    ring: IoUring,
    slots: Vec<Slot>,
    free: Vec<usize>,
    in_flight: usize,
}

impl Ring {
    fn alloc_slot(&mut self, waker: Waker) -> usize {
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot::Free);
                self.slots.len() - 1
            }
        };
        self.slots[idx] = Slot::Waiting(Some(waker));
        idx
    }

    fn release(&mut self, idx: usize) {
        self.slots[idx] = Slot::Free;
        self.free.push(idx);
    }

    /// Submits queued entries; transient errors leave them queued for the next attempt.
    fn submit(&mut self) -> io::Result<()> {
        for _ in 0..3 {
            let queued = self.ring.submission().len();
            match self.ring.submit() {
                Ok(n) => {
                    if n < queued {
                        tracing::debug!(queued, submitted = n, "io_uring partial submit");
                    }
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // CQ overflow or kernel memory pressure: completions will drain it and the
                // reaper submits again.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EAGAIN)) => {
                    tracing::debug!(error = %e, queued, "io_uring submit deferred");
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Moves completions into their slots; returns the wakers to call after unlocking.
    fn reap(&mut self, wake: &mut Vec<Waker>) {
        let mut done = Vec::new();
        for cqe in self.ring.completion() {
            done.push((cqe.user_data() as usize, cqe.result()));
        }
        for (idx, result) in done {
            let Some(slot) = self.slots.get_mut(idx) else {
                continue;
            };
            match std::mem::replace(slot, Slot::Done(result)) {
                Slot::Waiting(w) => {
                    self.in_flight -= 1;
                    if let Some(w) = w {
                        wake.push(w);
                    }
                }
                Slot::Orphaned(_) => {
                    self.in_flight -= 1;
                    self.release(idx);
                }
                // Completions are posted once per user_data; anything else is a bug we
                // tolerate rather than crash on.
                other => *slot = other,
            }
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Closing the ring with operations in flight would let the kernel write into freed
        // buffers: wait for them (bounded; this only happens at shutdown).
        let mut wake = Vec::new();
        for _ in 0..10_000 {
            if self.in_flight == 0 {
                break;
            }
            let _ = self.ring.submit_and_wait(1);
            self.reap(&mut wake);
        }
        if self.in_flight > 0 {
            // A hung device (a hard NFS mount): closing the ring does not wait for the
            // kernel to let go of their buffers, so they are leaked, never freed under it.
            tracing::error!(
                in_flight = self.in_flight,
                "io_uring operations still in flight when their ring closes: their buffers are leaked rather than freed"
            );
            std::mem::forget(std::mem::take(&mut self.slots));
        }
    }
}

struct Shared {
    ring: Mutex<Ring>,
    limit: Arc<Semaphore>,
    _files: (Arc<File>, Option<Arc<File>>),
    /// The ring's descriptor on its thread's poll-before-sleep list: a completion ends the
    /// thread's spin at once (nbd_server::spin).
    _spin: Option<nbd_server::spin::Watch>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ring> {
        // A panic while holding the lock cannot leave the ring inconsistent in a way that
        // matters more than losing the daemon: keep serving.
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One ring per (image, data-plane thread): a connection's operations are submitted,
/// completed and woken on the thread that runs it, with no cross-thread wake-up.
pub struct UringEngine {
    id: u64,
    file: Arc<File>,
    uncached: Option<Arc<File>>,
    rings: Mutex<Vec<(Arc<Shared>, tokio::task::JoinHandle<()>)>>,
}

static NEXT_ENGINE: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's rings, by engine id. Weak: the engine owns them.
    static LOCAL_RINGS: RefCell<Vec<(u64, Weak<Shared>)>> = const { RefCell::new(Vec::new()) };
    /// Engines whose ring could not be set up on this thread (see [`UringEngine::ring_here`]).
    static NO_RING: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
    /// Test-only: ring setup fails on this thread.
    #[cfg(test)]
    static FAIL_RING_SETUP: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Test-only: every ring set up on this thread from now on fails (as with an exhausted
/// RLIMIT_MEMLOCK or descriptor limit).
#[cfg(test)]
pub(crate) fn fail_ring_setup_on_this_thread() {
    FAIL_RING_SETUP.with(|f| f.set(true));
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        let rings = self.rings.get_mut().unwrap_or_else(|p| p.into_inner());
        for (_, reaper) in rings.drain(..) {
            reaper.abort();
        }
    }
}

impl UringEngine {
    /// Checks that io_uring works here (the first ring is made now, on this thread).
    pub fn new(file: Arc<File>, uncached: Option<Arc<File>>) -> io::Result<Self> {
        let engine = UringEngine {
            id: NEXT_ENGINE.fetch_add(1, Ordering::Relaxed),
            file,
            uncached,
            rings: Mutex::new(Vec::new()),
        };
        engine.local_ring()?;
        Ok(engine)
    }

    /// Whether this thread has a ring for this engine, setting one up if needed. Rings are
    /// made per thread, lazily: the check at open ran on one thread only, and a data-plane
    /// thread can still fail to get one (RLIMIT_MEMLOCK on older kernels, the descriptor
    /// limit). Such a thread is told once, then uses the sync engine for this image (the
    /// caller's fallback) rather than failing every request.
    pub fn ring_here(&self) -> bool {
        if NO_RING.with(|n| n.borrow().contains(&self.id)) {
            return false;
        }
        match self.local_ring() {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %e, thread = std::thread::current().name().unwrap_or("?"),
                    "io_uring: no ring on this thread (RLIMIT_MEMLOCK or the open-files limit?): its requests to this image use the sync engine");
                NO_RING.with(|n| n.borrow_mut().push(self.id));
                false
            }
        }
    }

    fn local_ring(&self) -> io::Result<Arc<Shared>> {
        let found = LOCAL_RINGS.with(|rings| {
            let mut rings = rings.borrow_mut();
            rings.retain(|(_, weak)| weak.strong_count() > 0);
            rings
                .iter()
                .find(|(id, _)| *id == self.id)
                .and_then(|(_, weak)| weak.upgrade())
        });
        if let Some(shared) = found {
            return Ok(shared);
        }
        let (shared, reaper) = new_ring(self.file.clone(), self.uncached.clone())?;
        LOCAL_RINGS.with(|rings| rings.borrow_mut().push((self.id, Arc::downgrade(&shared))));
        self.rings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((shared.clone(), reaper));
        Ok(shared)
    }

    async fn run(
        &self,
        entry: squeue::Entry,
        keep: Option<Vec<u8>>,
    ) -> (Option<Vec<u8>>, io::Result<u32>) {
        let shared = match self.local_ring() {
            Ok(s) => s,
            Err(e) => return (keep, Err(e)),
        };
        let permit = match shared.limit.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => return (keep, Err(io::Error::other("io_uring engine closed"))),
        };
        let op = Op {
            shared,
            entry: Some(entry),
            slot: None,
            keep: Some((keep, permit)),
        };
        let (keep, result) = op.await;
        let result = if result < 0 {
            Err(io::Error::from_raw_os_error(-result))
        } else {
            Ok(result as u32)
        };
        (keep, result)
    }

    /// The fixed file `via` names, or `Unsupported` when there is no O_DIRECT descriptor.
    fn fixed(&self, via: Via) -> io::Result<types::Fixed> {
        match via {
            Via::PageCache => Ok(IMAGE),
            Via::Direct if self.uncached.is_some() => Ok(IMAGE_UNCACHED),
            Via::Direct => Err(io::ErrorKind::Unsupported.into()),
        }
    }

    pub async fn read_at(
        &self,
        via: Via,
        buf: Vec<u8>,
        at: usize,
        offset: u64,
    ) -> (Vec<u8>, io::Result<usize>) {
        match self.fixed(via) {
            Ok(file) => self.read_from(file, buf, at, offset).await,
            Err(e) => (buf, Err(e)),
        }
    }

    async fn read_from(
        &self,
        file: types::Fixed,
        mut buf: Vec<u8>,
        at: usize,
        offset: u64,
    ) -> (Vec<u8>, io::Result<usize>) {
        let at = at.min(buf.len());
        let len = (buf.len() - at).min(u32::MAX as usize) as u32;
        // The pointer stays valid: the Vec's heap storage does not move when the Vec does,
        // and the Vec is owned by the operation until its completion.
        let ptr = buf[at..].as_mut_ptr();
        let entry = opcode::Read::new(file, ptr, len).offset(offset).build();
        let (keep, r) = self.run(entry, Some(buf)).await;
        (keep.unwrap_or_default(), r.map(|n| n as usize))
    }

    pub async fn write_at(
        &self,
        via: Via,
        buf: Vec<u8>,
        at: usize,
        offset: u64,
        dsync: bool,
    ) -> (Vec<u8>, io::Result<usize>) {
        match self.fixed(via) {
            Ok(file) => self.write_to(file, buf, at, offset, dsync).await,
            Err(e) => (buf, Err(e)),
        }
    }

    async fn write_to(
        &self,
        file: types::Fixed,
        buf: Vec<u8>,
        at: usize,
        offset: u64,
        dsync: bool,
    ) -> (Vec<u8>, io::Result<usize>) {
        let at = at.min(buf.len());
        let len = (buf.len() - at).min(u32::MAX as usize) as u32;
        let ptr = buf[at..].as_ptr();
        let flags = if dsync { libc::RWF_DSYNC } else { 0 };
        let entry = opcode::Write::new(file, ptr, len)
            .offset(offset)
            .rw_flags(flags)
            .build();
        let (keep, r) = self.run(entry, Some(buf)).await;
        (keep.unwrap_or_default(), r.map(|n| n as usize))
    }

    pub async fn datasync(&self) -> io::Result<()> {
        let entry = opcode::Fsync::new(IMAGE)
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        // An io-wq worker does this one; a spinning thread would only take its CPU.
        let _worker = nbd_server::spin::pause();
        self.run(entry, None).await.1.map(|_| ())
    }

    pub async fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        let entry = opcode::Fallocate::new(IMAGE, len)
            .offset(offset)
            .mode(mode)
            .build();
        let _worker = nbd_server::spin::pause();
        self.run(entry, None).await.1.map(|_| ())
    }
}

/// Makes a ring for `file` on this thread, and its reaper task on this thread's runtime.
fn new_ring(
    file: Arc<File>,
    uncached: Option<Arc<File>>,
) -> io::Result<(Arc<Shared>, tokio::task::JoinHandle<()>)> {
    #[cfg(test)]
    if FAIL_RING_SETUP.with(|f| f.get()) {
        return Err(io::Error::from_raw_os_error(libc::ENOMEM));
    }
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(io::Error::other(
            "the io_uring engine needs a tokio runtime",
        ));
    }
    let ring = IoUring::builder()
        .setup_cqsize(CQ_ENTRIES)
        .build(SQ_ENTRIES)?;
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for (op, name) in [
        (opcode::Read::CODE, "read"),
        (opcode::Write::CODE, "write"),
        (opcode::Fsync::CODE, "fsync"),
        (opcode::Fallocate::CODE, "fallocate"),
    ] {
        if !probe.is_supported(op) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring lacks the {name} operation on this kernel"),
            ));
        }
    }
    match &uncached {
        Some(u) => ring
            .submitter()
            .register_files(&[file.as_raw_fd(), u.as_raw_fd()])?,
        None => ring.submitter().register_files(&[file.as_raw_fd()])?,
    }
    // The ring's own descriptor polls readable while completions wait in its queue. A
    // duplicate is watched, so the reaper never holds a descriptor the ring closed.
    // SAFETY: `ring` is alive (a local of this function), so its descriptor is open for
    // this call.
    let ring_fd =
        unsafe { std::os::fd::BorrowedFd::borrow_raw(ring.as_raw_fd()) }.try_clone_to_owned()?;
    let spin = nbd_server::spin::watch(&ring_fd)
        .map_err(|e| tracing::debug!(error = %e, "io_uring descriptor not polled before sleeping"))
        .ok();
    let shared = Arc::new(Shared {
        ring: Mutex::new(Ring {
            ring,
            slots: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
        }),
        limit: Arc::new(Semaphore::new(CQ_ENTRIES as usize)),
        _files: (file, uncached),
        _spin: spin,
    });
    // SAFETY: the OwnedFd owns its descriptor and keeps it open, unchanged, until it is
    // dropped together with the AsyncFd that owns it.
    let ring_fd =
        unsafe { AsyncFd::register_with_interest(ring_fd, tokio::io::Interest::READABLE) }
            .map_err(|e| io::Error::other(format!("cannot watch the io_uring descriptor: {e}")))?;
    let reaper = tokio::spawn(reap_loop(Arc::downgrade(&shared), ring_fd));
    Ok((shared, reaper))
}

/// How often the reaper looks at the completion queue without being signalled, while
/// operations are in flight (and, much more slowly, while none are).
const SAFETY_POLL_BUSY: std::time::Duration = std::time::Duration::from_millis(2);
const SAFETY_POLL_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

async fn reap_loop(shared: Weak<Shared>, ring_fd: AsyncFd<std::os::fd::OwnedFd>) {
    let mut wake = Vec::new();
    loop {
        let busy = match shared.upgrade() {
            Some(s) => s.lock().in_flight > 0,
            None => return,
        };
        let period = if busy {
            SAFETY_POLL_BUSY
        } else {
            SAFETY_POLL_IDLE
        };
        // Readiness of the ring's descriptor is the normal path. The timer is a safety net:
        // under load (QD32, 1 MiB writes) a few completions a second sit in the queue with no
        // wake-up, with an eventfd as with the ring's own descriptor (open question, see
        // ARCHITECTURE.md); once, before this net existed, a benchmark hung on one. Now such a
        // completion is reaped within 2 ms.
        let guard = tokio::select! {
            r = ring_fd.readable() => match r {
                Ok(guard) => Some(guard),
                Err(_) => return,
            },
            _ = tokio::time::sleep(period) => None,
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        {
            let mut ring = shared.lock();
            if !ring.ring.submission().is_empty() {
                if let Err(e) = ring.submit() {
                    tracing::error!(error = %e, "io_uring submit failed");
                }
            }
            ring.reap(&mut wake);
            // Clear readiness while holding the ring: a completion posted after the reap
            // is a new edge that epoll reports.
            match guard {
                Some(mut g) => g.clear_ready(),
                None if !wake.is_empty() => {
                    tracing::debug!(
                        completions = wake.len(),
                        "io_uring completions found by the safety poll"
                    );
                }
                None => {}
            }
        }
        for w in wake.drain(..) {
            w.wake();
        }
    }
}

type Keep = (Option<Vec<u8>>, OwnedSemaphorePermit);

struct Op {
    shared: Arc<Shared>,
    entry: Option<squeue::Entry>,
    slot: Option<usize>,
    keep: Option<Keep>,
}

impl Future for Op {
    type Output = (Option<Vec<u8>>, i32);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let shared = this.shared.clone();
        let mut wake = Vec::new();
        let result = {
            let mut ring = shared.lock();
            if let Some(entry) = this.entry.take() {
                let idx = ring.alloc_slot(cx.waker().clone());
                let entry = entry.user_data(idx as u64);
                // SAFETY: the entry points at a buffer owned by `this.keep` (or at none),
                // which is kept alive until the completion for `idx` is reaped: either here,
                // or in the slot table if this future is dropped first (see Drop).
                let pushed = unsafe { ring.ring.submission().push(&entry).is_ok() };
                if !pushed {
                    // The submission queue is full: flush it and try once more.
                    let _ = ring.submit();
                    // SAFETY: as above.
                    if unsafe { ring.ring.submission().push(&entry).is_err() } {
                        ring.release(idx);
                        this.entry = Some(entry);
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                }
                ring.in_flight += 1;
                this.slot = Some(idx);
                if let Err(e) = ring.submit() {
                    tracing::error!(error = %e, "io_uring submit failed");
                }
                // Page-cache hits complete inline: collect them now, no wakeup needed.
                ring.reap(&mut wake);
            }
            match this.slot {
                Some(idx) => match &mut ring.slots[idx] {
                    Slot::Done(r) => {
                        let r = *r;
                        ring.release(idx);
                        this.slot = None;
                        Some(r)
                    }
                    Slot::Waiting(w) => {
                        if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                            *w = Some(cx.waker().clone());
                        }
                        None
                    }
                    _ => Some(-libc::EIO),
                },
                None => Some(-libc::EIO),
            }
        };
        for w in wake {
            w.wake();
        }
        match result {
            Some(r) => {
                let keep = this.keep.take().and_then(|(buf, _permit)| buf);
                Poll::Ready((keep, r))
            }
            None => Poll::Pending,
        }
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        let Some(idx) = self.slot.take() else {
            return;
        };
        let mut ring = self.shared.lock();
        match ring.slots[idx] {
            Slot::Done(_) => ring.release(idx),
            _ => {
                let keep: Box<dyn Any + Send> = Box::new(self.keep.take());
                ring.slots[idx] = Slot::Orphaned(keep);
            }
        }
    }
}
