//! Polling a data-plane thread's sockets for a moment before the thread sleeps.
//!
//! On a virtual machine a sleeping vCPU is expensive to wake: the waker sends an
//! inter-processor interrupt, the hypervisor schedules the vCPU back in, and only then does
//! `epoll_wait` return. That costs more than serving a 4 KiB request. A client at queue
//! depth 1 sends its next request a few microseconds after it reads a reply, and a peer
//! answers a mirrored write within tens of microseconds, so a data-plane thread that polls
//! its own sockets for up to `--spin-us` (default [`DEFAULT_SPIN_US`]) before it parks usually finds the next message
//! without having slept at all. This is the hybrid polling that io_uring and NVMe drivers
//! use for the same reason, kept to the threads and sockets that serve requests.
//!
//! The cost is bounded: at most `--spin-us` (default [`DEFAULT_SPIN_US`]) of CPU per park, only on threads that registered a
//! socket with [`watch`], and none once a thread's spins keep ending empty (a quiet client,
//! an idle daemon): after [`MISSES_BEFORE_REST`] empty spins in a row a thread parks at once
//! until a spin pays again, trying one in every [`REST_PERIOD`] parks.
//!
//! The runtime calls [`before_park`] from `on_thread_park` (see [`install`]).

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};

/// Default longest poll before a thread parks, in microseconds: above a loopback or LAN
/// round trip plus a request's service time, far below what a client would notice as CPU
/// taken from it.
pub const DEFAULT_SPIN_US: u64 = 50;

/// Default longest poll of a thread that serves its peer's mirrored writes (a secondary's
/// volume thread). Its wait for the next frame spans two hops of the primary's (the ack read
/// and answered to the client, the client's next request read and forwarded), so at queue
/// depth 1 a 50 us poll mostly ended just before the frame came and the wake-up landed on
/// the write. Measured on this 2-vCPU VM, alternated single runs of a pair, 4 KiB writes at
/// queue depth 1: p50 67-92 us with 50 us on both nodes, 33-41 us with 200 us on the
/// secondary (and 45-50 us with 200 us on both: a primary that polls longer takes the CPU its
/// client needs). Queue depth 32 and 1 MiB writes did not move.
pub const DEFAULT_REPLICA_SPIN_US: u64 = 200;

static BUDGET_US: AtomicU64 = AtomicU64::new(DEFAULT_SPIN_US);
static REPLICA_BUDGET_US: AtomicU64 = AtomicU64::new(DEFAULT_REPLICA_SPIN_US);

/// Sets how long every data-plane thread polls before it parks (0: never), for the whole
/// process (`--spin-us`).
pub fn set_budget(micros: u64) {
    BUDGET_US.store(micros, Ordering::Relaxed);
}

/// Sets how long a thread that last served its peer's mirrored writes polls before it parks
/// (0: never), for the whole process (`serve --replica-spin-us`).
pub fn set_replica_budget(micros: u64) {
    REPLICA_BUDGET_US.store(micros, Ordering::Relaxed);
}

/// After a thread waited for its device to flush, how long its parks do not poll. Measured on
/// this 2-vCPU VM with fio at queue depth 1, a write and a FLUSH in turn: 3,840 IOPS polling,
/// 4,950 without, and nbdkit 4,230. Both the writes and the flushes took longer while the
/// thread polled between them. A wake-up is a small part of a cycle that waits ~150 us for the
/// device, and the polling vCPU competes with the work the flush needs (the other vCPU, and
/// the host's I/O path behind the virtual disk). A client that flushes every write, or every
/// few, thus serves faster from a thread that sleeps; one that stops flushing gets polling
/// back within this period.
pub const QUIET_AFTER_FLUSH: Duration = Duration::from_millis(1);

/// Empty spins in a row after which a thread stops spinning.
pub const MISSES_BEFORE_REST: u32 = 16;

/// While resting, one park in this many still spins, to notice traffic coming back.
pub const REST_PERIOD: u32 = 32;

thread_local! {
    static WATCHED: RefCell<Vec<Weak<OwnedFd>>> = const { RefCell::new(Vec::new()) };
    static MISSES: Cell<u32> = const { Cell::new(0) };
    static RESTING_PARKS: Cell<u32> = const { Cell::new(0) };
    static PAUSED: Cell<u32> = const { Cell::new(0) };
    static SERVING: Cell<u32> = const { Cell::new(0) };
    static QUIET_UNTIL: Cell<Option<Instant>> = const { Cell::new(None) };
    static REPLICA: Cell<bool> = const { Cell::new(false) };
    static PEAK_SINCE_PARK: Cell<u32> = const { Cell::new(0) };
}

/// A count of the current thread's, raised while the guard lives. A future moved to another
/// thread (a multi-threaded runtime) before it drops must not unbalance that thread's count,
/// so the guard remembers its thread.
pub struct Held {
    count: &'static std::thread::LocalKey<Cell<u32>>,
    thread: std::thread::ThreadId,
}

impl Held {
    fn new(count: &'static std::thread::LocalKey<Cell<u32>>) -> Held {
        count.with(|c| c.set(c.get().saturating_add(1)));
        Held {
            count,
            thread: std::thread::current().id(),
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if std::thread::current().id() == self.thread {
            self.count.with(|c| c.set(c.get().saturating_sub(1)));
        }
    }
}

/// While the guard lives, the current thread parks without spinning: it waits for work that
/// another thread does on its behalf (an fsync in an io_uring worker), which a spinning thread
/// would only delay on a small machine.
pub fn pause() -> Held {
    Held::new(&PAUSED)
}

/// Tells the current thread that it just waited for the device to flush (an fdatasync, a FUA
/// write): its parks do not poll for [`QUIET_AFTER_FLUSH`].
pub fn device_flushed() {
    QUIET_UNTIL.set(Some(Instant::now() + QUIET_AFTER_FLUSH));
}

/// Counts a request being served on the current thread until the guard drops (a peer's
/// request that is neither a mirrored write nor bulk traffic, such as the end of a resync).
/// The thread's budget stays as it was.
pub fn serving() -> Held {
    let held = Held::new(&SERVING);
    PEAK_SINCE_PARK.set(PEAK_SINCE_PARK.get().max(SERVING.get()));
    held
}

/// Counts a client's NBD request (from its arrival) or the peer's bulk traffic (resync,
/// verify) until the guard drops, and puts the thread back on the `--spin-us` budget.
pub fn serving_client() -> Held {
    REPLICA.set(false);
    serving()
}

/// Counts a peer's mirrored write (or trim, zeroes, flush) being served on the current thread
/// until the guard drops, and makes the thread poll with the replica budget
/// ([`set_replica_budget`]) until it serves a client's request again.
pub fn serving_replica() -> Held {
    REPLICA.set(true);
    serving()
}

/// How long the current thread polls before it parks: the replica budget if the last request
/// it served was a peer's mirrored write and exactly one request was in service at a time
/// since it last parked (a queue-depth-1 stream), else `--spin-us`. A thread that served
/// nothing since its last park (idle, or a former secondary's thread now the home of a
/// primary whose clients run on other threads) gets the short poll. With bursts in flight the next frame
/// is seldom far, and a long poll only took CPU from the primary and its client on a small
/// machine (the secondary's CPU per write at queue depth 32: 8.5-10.4 us with 50 us for every
/// park, 11.2-13.6 with 200).
fn budget() -> Duration {
    let one_at_a_time = PEAK_SINCE_PARK.replace(SERVING.get()) == 1;
    let micros = if REPLICA.get() && one_at_a_time {
        &REPLICA_BUDGET_US
    } else {
        &BUDGET_US
    };
    Duration::from_micros(micros.load(Ordering::Relaxed))
}

/// Requests being served on the current thread ([`serving`]). A request that finds itself
/// alone may block the thread briefly (an inline fdatasync) without delaying anybody.
pub fn requests_here() -> u32 {
    SERVING.get()
}

/// Keeps a socket on the current thread's poll list while it lives. It holds a duplicate of
/// the descriptor: drop it before (or with) the connection, or the socket stays open.
pub struct Watch {
    _fd: Arc<OwnedFd>,
}

/// Adds `socket` to the current thread's poll list until the returned guard drops.
pub fn watch(socket: &impl AsFd) -> io::Result<Watch> {
    let fd = Arc::new(socket.as_fd().try_clone_to_owned()?);
    WATCHED.with(|w| w.borrow_mut().push(Arc::downgrade(&fd)));
    Ok(Watch { _fd: fd })
}

/// Makes `builder`'s threads poll their watched sockets before they park.
pub fn install(builder: &mut tokio::runtime::Builder) -> &mut tokio::runtime::Builder {
    builder.on_thread_park(before_park)
}

/// Polls the current thread's watched sockets until one is readable or the thread's budget
/// ([`budget`]) passed.
pub fn before_park() {
    let budget = budget();
    if budget.is_zero() {
        return;
    }
    let live: Vec<Arc<OwnedFd>> = WATCHED.with(|w| {
        let mut w = w.borrow_mut();
        w.retain(|weak| weak.strong_count() > 0);
        w.iter().filter_map(Weak::upgrade).collect()
    });
    if live.is_empty() || PAUSED.get() > 0 {
        return;
    }
    if let Some(until) = QUIET_UNTIL.get() {
        if Instant::now() < until {
            return;
        }
        QUIET_UNTIL.set(None);
    }
    if MISSES.get() >= MISSES_BEFORE_REST {
        let n = RESTING_PARKS.get().wrapping_add(1);
        RESTING_PARKS.set(n);
        if !n.is_multiple_of(REST_PERIOD) {
            return;
        }
    }
    let mut fds: Vec<PollFd> = live
        .iter()
        .map(|fd| PollFd::new(fd.as_fd(), PollFlags::POLLIN))
        .collect();
    let start = Instant::now();
    let found = loop {
        match nix::poll::poll(&mut fds, PollTimeout::ZERO) {
            Ok(n) if n > 0 => break true,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => break false,
        }
        if start.elapsed() >= budget {
            break false;
        }
        std::hint::spin_loop();
    };
    if found {
        MISSES.set(0);
        RESTING_PARKS.set(0);
    } else {
        MISSES.set(MISSES.get().saturating_add(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_readable_socket_ends_the_spin_at_once() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let _w = watch(&a).unwrap();
        b.write_all(b"x").unwrap();
        MISSES.set(0);
        before_park();
        assert_eq!(MISSES.get(), 0);
    }

    #[test]
    fn a_quiet_socket_counts_a_miss_and_rest_follows() {
        let (a, _b) = UnixStream::pair().unwrap();
        let _w = watch(&a).unwrap();
        MISSES.set(0);
        before_park();
        assert_eq!(MISSES.get(), 1);
        MISSES.set(MISSES_BEFORE_REST);
        RESTING_PARKS.set(0);
        // Resting: most parks return without polling, so misses stop counting up.
        for _ in 0..REST_PERIOD - 1 {
            before_park();
        }
        assert_eq!(MISSES.get(), MISSES_BEFORE_REST);
        before_park();
        assert_eq!(MISSES.get(), MISSES_BEFORE_REST + 1);
    }

    #[test]
    fn a_pause_skips_the_spin() {
        let (a, _b) = UnixStream::pair().unwrap();
        let _w = watch(&a).unwrap();
        MISSES.set(0);
        let p = pause();
        before_park();
        assert_eq!(MISSES.get(), 0, "no spin while paused");
        drop(p);
        before_park();
        assert_eq!(MISSES.get(), 1);
    }

    #[test]
    fn no_spin_for_a_while_after_a_device_flush() {
        let (a, _b) = UnixStream::pair().unwrap();
        let _w = watch(&a).unwrap();
        MISSES.set(0);
        device_flushed();
        before_park();
        assert_eq!(MISSES.get(), 0, "no spin right after a flush");
        // Bounded: the quiet period is 1 ms; give up after 2 s.
        let start = Instant::now();
        while QUIET_UNTIL.get().is_some_and(|t| Instant::now() < t) {
            assert!(start.elapsed() < Duration::from_secs(2));
            std::thread::sleep(QUIET_AFTER_FLUSH / 4);
        }
        before_park();
        assert_eq!(MISSES.get(), 1, "polling again once the period is over");
        assert_eq!(QUIET_UNTIL.get(), None);
    }

    #[test]
    fn serving_counts_requests_of_this_thread_only() {
        assert_eq!(requests_here(), 0);
        let a = serving();
        let b = serving();
        assert_eq!(requests_here(), 2);
        std::thread::spawn(|| assert_eq!(requests_here(), 0))
            .join()
            .unwrap();
        drop(a);
        assert_eq!(requests_here(), 1);
        // Dropped on another thread: neither count changes.
        std::thread::spawn(move || drop(b)).join().unwrap();
        assert_eq!(requests_here(), 1);
    }

    #[test]
    fn a_peer_write_switches_the_thread_to_the_replica_budget_until_a_client_request() {
        set_budget(DEFAULT_SPIN_US);
        set_replica_budget(DEFAULT_REPLICA_SPIN_US);
        drop(serving_client());
        assert_eq!(budget(), Duration::from_micros(DEFAULT_SPIN_US));
        let r = serving_replica();
        assert_eq!(requests_here(), 1);
        drop(r);
        assert_eq!(budget(), Duration::from_micros(DEFAULT_REPLICA_SPIN_US));
        // Two at once since the last park: a burst, so the short poll.
        let (r1, r2) = (serving_replica(), serving_replica());
        drop((r1, r2));
        assert_eq!(budget(), Duration::from_micros(DEFAULT_SPIN_US));
        // Nothing served since the last park (idle, or now a primary whose clients run on
        // other threads): the short poll, though the flag is still set.
        assert_eq!(budget(), Duration::from_micros(DEFAULT_SPIN_US));
        // A write still in flight at the park (waiting for the disk) counts for the next one.
        let in_flight = serving_replica();
        assert_eq!(budget(), Duration::from_micros(DEFAULT_REPLICA_SPIN_US));
        drop(in_flight);
        assert_eq!(budget(), Duration::from_micros(DEFAULT_REPLICA_SPIN_US));
        // Another thread keeps its own budget.
        std::thread::spawn(|| {
            drop(serving());
            assert_eq!(budget(), Duration::from_micros(DEFAULT_SPIN_US))
        })
        .join()
        .unwrap();
        // Other peer requests leave the budget; a client's request ends it.
        drop(serving());
        assert_eq!(budget(), Duration::from_micros(DEFAULT_REPLICA_SPIN_US));
        drop(serving_client());
        assert_eq!(budget(), Duration::from_micros(DEFAULT_SPIN_US));
    }

    #[test]
    fn a_dropped_watch_leaves_the_list_and_closes_its_duplicate() {
        let (a, _b) = UnixStream::pair().unwrap();
        let w = watch(&a).unwrap();
        assert_eq!(WATCHED.with(|l| l.borrow().len()), 1);
        drop(w);
        before_park();
        assert_eq!(WATCHED.with(|l| l.borrow().len()), 0);
    }
}
