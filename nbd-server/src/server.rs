//! The server loop: listeners, one task per connection, the handshake over the socket, and
//! the transmission phase with many requests in flight and replies sent as they complete.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn, Instrument};

use crate::backend::{BlockBackend, ZeroMode};
use crate::handshake::{self, ExportInfo, Negotiation, Next, Session, MAX_OPTION_LEN};
use crate::listen::ListenAddr;
use crate::proto::*;
use crate::reply::{self, Extent, ReplyMode, ReplyTo};
use crate::request::{self, Command, RequestHeader};

/// Most extents returned by one BLOCK_STATUS reply (clients ask again for the rest).
const MAX_EXTENTS: usize = 1024;
/// Per-connection budget of bytes in flight (payloads and read buffers), so one client
/// cannot make the server allocate without bound: reading pauses once it is spent.
const CONNECTION_BUDGET: u64 = 96 * 1024 * 1024;
/// Fixed cost of a request in the budget, so a flood of zero-length requests is bounded too.
const REQUEST_COST: u64 = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {reason}")]
    Bind { addr: ListenAddr, reason: String },
}

/// One export: what the handshake shows, and the storage behind it.
pub struct Export<B> {
    pub info: ExportInfo,
    pub backend: Arc<B>,
}

/// Transmission flags for a backend.
pub fn transmission_flags(read_only: bool) -> u16 {
    let mut flags = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_CAN_MULTI_CONN | TF_SEND_CACHE;
    if read_only {
        flags |= TF_READ_ONLY;
    } else {
        flags |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO;
    }
    flags
}

pub enum Listener {
    Tcp(TcpListener, ListenAddr),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    pub fn addr(&self) -> ListenAddr {
        match self {
            Listener::Tcp(_, a) => a.clone(),
            Listener::Unix(_, p) => ListenAddr::Unix(p.clone()),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Binds every address before serving any, so a typo fails the start instead of leaving a
/// half-listening daemon.
pub async fn bind_all(addrs: &[ListenAddr]) -> Result<Vec<Listener>, ServerError> {
    let mut out = Vec::new();
    for addr in addrs {
        out.push(bind(addr).await?);
    }
    Ok(out)
}

fn bind_reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::AddrInUse => {
            "address already in use (is another NBD server running there?)".into()
        }
        io::ErrorKind::AddrNotAvailable => {
            "address not available (not an address of this host)".into()
        }
        io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

async fn bind(addr: &ListenAddr) -> Result<Listener, ServerError> {
    let err = |reason: String| ServerError::Bind {
        addr: addr.clone(),
        reason,
    };
    match addr {
        ListenAddr::Tcp(a) => {
            let l = TcpListener::bind(a.as_str())
                .await
                .map_err(|e| err(bind_reason(&e)))?;
            Ok(Listener::Tcp(l, addr.clone()))
        }
        ListenAddr::Unix(path) => {
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                use std::os::unix::fs::FileTypeExt;
                if !meta.file_type().is_socket() {
                    return Err(err(
                        "the path exists and is not a socket (refusing to replace it)".into(),
                    ));
                }
                // A socket file left by a crashed daemon is removed; a live one is not stolen.
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(err(
                        "address already in use (a server answers on this socket)".into(),
                    ));
                }
                std::fs::remove_file(path)
                    .map_err(|e| err(format!("cannot remove stale socket: {e}")))?;
            }
            let l = UnixListener::bind(path).map_err(|e| err(bind_reason(&e)))?;
            Ok(Listener::Unix(l, path.clone()))
        }
    }
}

struct Shared<B> {
    infos: Vec<ExportInfo>,
    backends: Vec<Arc<B>>,
}

/// A socket accepted by a listener, on its way to a shard. It travels as a std socket
/// because a tokio socket belongs to the reactor of the runtime that made it.
enum Accepted {
    Tcp(std::net::TcpStream, String),
    Unix(std::os::unix::net::UnixStream, String),
}

impl Accepted {
    /// Puts the socket on this thread's poll-before-sleep list (see [`crate::spin`]).
    fn watch(&self) -> io::Result<crate::spin::Watch> {
        match self {
            Accepted::Tcp(s, _) => crate::spin::watch(s),
            Accepted::Unix(s, _) => crate::spin::watch(s),
        }
    }

    fn into_halves(self) -> io::Result<(BoxRead, BoxWrite, String)> {
        match self {
            Accepted::Tcp(s, peer) => {
                let s = tokio::net::TcpStream::from_std(s)?;
                let (r, w) = s.into_split();
                Ok((Box::new(r), Box::new(w), peer))
            }
            Accepted::Unix(s, peer) => {
                let s = tokio::net::UnixStream::from_std(s)?;
                let (r, w) = s.into_split();
                Ok((Box::new(r), Box::new(w), peer))
            }
        }
    }
}

/// Serves until `shutdown` turns true, then stops accepting, lets every connection finish
/// its in-flight requests, and returns.
///
/// Connections are spread over `threads` shards, each a single-threaded runtime on its own
/// OS thread: a connection lives on one thread from accept to close, so a request never
/// waits for a wake-up from another thread (measured: a multi-threaded runtime added
/// about 10 us to every queue-depth-1 request on this 2-core machine). With `threads` 0 the
/// connections run on the caller's runtime instead, which must then be one whose thread
/// keeps running it (the mirror serves a volume on the thread that runs its replication link).
pub async fn serve<B: BlockBackend>(
    listeners: Vec<Listener>,
    exports: Vec<Export<B>>,
    shutdown: watch::Receiver<bool>,
    threads: usize,
) {
    let (infos, backends) = exports.into_iter().map(|e| (e.info, e.backend)).unzip();
    let shared = Arc::new(Shared { infos, backends });
    let mut shards = Vec::new();
    let mut finished = Vec::new();
    if threads == 0 {
        let (tx, rx) = mpsc::unbounded_channel::<Accepted>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            shard_loop(rx, shared, shutdown).await;
            let _ = done_tx.send(());
        });
        shards.push(tx);
        finished.push(done_rx);
    }
    for index in 0..threads {
        let (tx, rx) = mpsc::unbounded_channel::<Accepted>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-shard-{index}"))
            .spawn(move || {
                run_shard(rx, shared, shutdown);
                let _ = done_tx.send(());
            });
        match spawned {
            Ok(_) => {
                shards.push(tx);
                finished.push(done_rx);
            }
            Err(e) => warn!(error = %e, "cannot start a data-plane thread; continuing with fewer"),
        }
    }
    if shards.is_empty() {
        warn!("no data-plane thread could start; not serving");
        return;
    }
    let shards = Arc::new(shards);
    let mut accept_loops = JoinSet::new();
    for listener in listeners {
        accept_loops.spawn(accept_loop(listener, shards.clone(), shutdown.clone()));
    }
    while accept_loops.join_next().await.is_some() {}
    // Closing the channels tells each shard no connection will come; it then finishes
    // the ones it has.
    drop(shards);
    for done in finished {
        let _ = done.await;
    }
}

fn run_shard<B: BlockBackend>(
    incoming: mpsc::UnboundedReceiver<Accepted>,
    shared: Arc<Shared<B>>,
    shutdown: watch::Receiver<bool>,
) {
    let runtime = match crate::spin::install(&mut tokio::runtime::Builder::new_current_thread())
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            warn!(error = %e, "cannot start a data-plane runtime");
            return;
        }
    };
    runtime.block_on(shard_loop(incoming, shared, shutdown));
}

async fn shard_loop<B: BlockBackend>(
    mut incoming: mpsc::UnboundedReceiver<Accepted>,
    shared: Arc<Shared<B>>,
    shutdown: watch::Receiver<bool>,
) {
    {
        let mut connections = JoinSet::new();
        // One per connection: how the shard gives up on its client after the grace.
        let mut give_up: Vec<oneshot::Sender<()>> = Vec::new();
        while let Some(accepted) = incoming.recv().await {
            while connections.try_join_next().is_some() {}
            give_up.retain(|tx| !tx.is_closed());
            let (give_up_tx, give_up_rx) = oneshot::channel();
            give_up.push(give_up_tx);
            let id = NEXT_CONNECTION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let watch = accepted.watch();
            let (rd, wr, peer) = match accepted.into_halves() {
                Ok(h) => h,
                Err(e) => {
                    warn!(error = %e, "cannot adopt an accepted socket");
                    continue;
                }
            };
            let span = tracing::info_span!("conn", id, peer = %peer);
            let shared = shared.clone();
            let shutdown = shutdown.clone();
            connections.spawn(
                async move {
                    debug!("connected");
                    // Dropped with the connection: it holds a duplicate of the socket.
                    let _watch =
                        watch.map_err(|e| debug!(error = %e, "socket not polled before sleeping"));
                    let give_up = GiveUp::new(give_up_rx);
                    match handle_connection(rd, wr, shared, shutdown, give_up).await {
                        Ok(()) => debug!("closed"),
                        Err(e) => debug!(error = %e, "connection ended"),
                    }
                }
                .instrument(span),
            );
        }
        // Requests in flight normally finish in milliseconds; only a client that stopped
        // reading its replies can hold a connection open, and it must not hold the daemon.
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(
                connections = connections.len(),
                grace_seconds = SHUTDOWN_GRACE.as_secs(),
                "closing connections whose clients do not read their replies; their requests in flight finish first"
            );
            // Not aborted: a connection given up on stops waiting on its client, but still
            // runs its requests in flight to their end (see `finish_in_flight`).
            for tx in give_up.drain(..) {
                let _ = tx.send(());
            }
            let finished = tokio::time::timeout(IN_FLIGHT_LAST_RESORT, async {
                while connections.join_next().await.is_some() {}
            })
            .await;
            if finished.is_err() {
                error!(
                    connections = connections.len(),
                    limit_seconds = IN_FLIGHT_LAST_RESORT.as_secs(),
                    "requests in flight did not finish; dropping them (an I/O still in the kernel may land after a later write to its range)"
                );
                connections.abort_all();
                while connections.join_next().await.is_some() {}
            }
        }
    }
}

/// How long a shutdown waits for connections to finish before closing them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// After the grace, how long a shutdown waits for the requests in flight of the connections
/// it gave up on before it drops them anyway. Only a liveness guard: every request the
/// backends start ends on its own (local I/O completes, a mirrored write waits for its peer
/// at most the link's timeouts), except a mirrored write held for permission to be
/// acknowledged alone (a witness' quorum), which a demotion releases but a plain stop of
/// the daemon does not. Such a write finished its I/O already, so dropping it is safe; a
/// dropped write whose I/O is still in the kernel is not (see `finish_in_flight`), which is
/// why this is far longer than any local write takes.
const IN_FLIGHT_LAST_RESORT: Duration = Duration::from_secs(30);
/// How long a connection still in the handshake waits, once a shutdown began, for the
/// client's next option (answered `NBD_REP_ERR_SHUTDOWN`) before it closes. A client
/// haggling sends it within a round trip; an idle one must not hold up a demotion, which
/// waits for every connection of the export.
const NEGOTIATION_SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

/// TCP keepalive on NBD connections: a client that vanished (power loss, a cut link) is
/// noticed after about KEEPALIVE_IDLE + KEEPALIVE_PROBES * KEEPALIVE_INTERVAL = 2 minutes
/// of silence, instead of its connection (and its task, buffers and socket) lingering for
/// good; nothing else is ever sent on an idle connection. A live but idle client answers
/// the probes in the kernel and is not disturbed.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_PROBES: u32 = 6;

static NEXT_CONNECTION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

async fn accept_loop(
    listener: Listener,
    shards: Arc<Vec<mpsc::UnboundedSender<Accepted>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut next = 0usize;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            a = accept(&listener) => a,
        };
        match accepted {
            Ok(conn) => {
                next = next.wrapping_add(1);
                if shards[next % shards.len()].send(conn).is_err() {
                    warn!("data-plane thread gone; dropping connection");
                }
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(listen = %listener.addr(), error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

type BoxRead = Box<dyn AsyncRead + Unpin + Send>;
type BoxWrite = Box<dyn AsyncWrite + Unpin + Send>;

async fn accept(listener: &Listener) -> io::Result<Accepted> {
    match listener {
        Listener::Tcp(l, _) => {
            let (s, peer) = l.accept().await?;
            // Replies are small and latency-bound: never wait for Nagle.
            s.set_nodelay(true)?;
            if let Err(e) = set_keepalive(&s) {
                // Not worth refusing the client over: only a vanished one is affected.
                warn!(peer = %peer, error = %e, "cannot enable TCP keepalive; the connection stays open if the client vanishes");
            }
            Ok(Accepted::Tcp(s.into_std()?, peer.to_string()))
        }
        Listener::Unix(l, path) => {
            let (s, _) = l.accept().await?;
            Ok(Accepted::Unix(
                s.into_std()?,
                format!("unix:{}", path.display()),
            ))
        }
    }
}

/// Turns on TCP keepalive with our timers (see [`KEEPALIVE_IDLE`]) rather than the
/// kernel's defaults, which wait two hours before the first probe.
fn set_keepalive(s: &impl std::os::fd::AsFd) -> nix::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    setsockopt(s, sockopt::TcpKeepIdle, &(KEEPALIVE_IDLE.as_secs() as u32))?;
    setsockopt(
        s,
        sockopt::TcpKeepInterval,
        &(KEEPALIVE_INTERVAL.as_secs() as u32),
    )?;
    setsockopt(s, sockopt::TcpKeepCount, &KEEPALIVE_PROBES)?;
    setsockopt(s, sockopt::KeepAlive, &true)
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    #[error("handshake: {0}")]
    Handshake(#[from] handshake::HandshakeError),
    #[error("protocol: {0}")]
    Request(#[from] request::RequestError),
    #[error("closed in the handshake by the server's shutdown")]
    ShutDown,
    #[error("closed by the server's shutdown: the client held the connection past the grace")]
    GivenUp,
}

/// The shard's word that it gave up on this connection's client (a shutdown whose grace ran
/// out, see `shard_loop`). A oneshot, so waiting for it costs the connection an atomic load
/// per wake-up, and no lock shared with other connections.
struct GiveUp {
    rx: Option<oneshot::Receiver<()>>,
    given_up: bool,
}

impl GiveUp {
    fn new(rx: oneshot::Receiver<()>) -> Self {
        GiveUp {
            rx: Some(rx),
            given_up: false,
        }
    }

    /// Resolves once the shard gave up on the client (at once if it did already). A sender
    /// dropped without a word is no give-up: the shard has nothing more to say.
    async fn wait(&mut self) {
        if let Some(rx) = self.rx.as_mut() {
            self.given_up = rx.await.is_ok();
            self.rx = None;
        }
        if !self.given_up {
            std::future::pending::<()>().await;
        }
    }
}

async fn handle_connection<B: BlockBackend>(
    rd: BoxRead,
    wr: BoxWrite,
    shared: Arc<Shared<B>>,
    mut shutdown: watch::Receiver<bool>,
    mut give_up: GiveUp,
) -> Result<(), ConnError> {
    let mut rd = BufReader::with_capacity(128 * 1024, rd);
    let mut wr = BufWriter::with_capacity(256 * 1024, wr);
    let negotiated = match negotiate(&mut rd, &mut wr, &shared.infos, &mut shutdown).await {
        Ok(n) => n,
        Err(ConnError::ShutDown) => None,
        Err(e) => return Err(e),
    };
    let Some(session) = negotiated else {
        return Ok(());
    };
    let info = &shared.infos[session.export];
    debug!(export = %info.name, structured = session.structured_replies,
           extended = session.extended_headers, "transmission");
    let backend = shared.backends[session.export].clone();
    let result = transmission(
        rd,
        &mut wr,
        session,
        info.size,
        backend,
        shutdown,
        &mut give_up,
    )
    .await;
    if !matches!(result, Err(ConnError::GivenUp)) {
        // This flushes what is buffered, so a client that does not read can hold it: the
        // shard's give-up ends that wait too (it used to abort the whole task).
        tokio::select! {
            biased;
            _ = wr.shutdown() => {}
            () = give_up.wait() => {}
        }
    }
    result
}

/// The handshake's view of a shutdown. A shutdown does not cut a handshake's I/O short
/// (the client may be in the middle of an option, and the stream must stay in step to
/// answer it): from the moment it begins, the connection has
/// [`NEGOTIATION_SHUTDOWN_GRACE`] in all, during which every option is answered
/// `NBD_REP_ERR_SHUTDOWN` as the spec asks, and is closed when that runs out.
struct HandshakeStop<'a> {
    shutdown: &'a mut watch::Receiver<bool>,
    deadline: Option<tokio::time::Instant>,
}

impl HandshakeStop<'_> {
    fn begin(&mut self) {
        if self.deadline.is_none() {
            self.deadline = Some(tokio::time::Instant::now() + NEGOTIATION_SHUTDOWN_GRACE);
        }
    }

    /// Whether the server is shutting down, also when no I/O noticed it yet.
    fn shutting_down(&mut self) -> bool {
        if *self.shutdown.borrow() {
            self.begin();
        }
        self.deadline.is_some()
    }

    /// Runs one piece of handshake I/O; [`ConnError::ShutDown`] once the grace ran out.
    async fn run<T>(&mut self, io: impl Future<Output = io::Result<T>>) -> Result<T, ConnError> {
        tokio::pin!(io);
        loop {
            match self.deadline {
                None => tokio::select! {
                    biased;
                    r = &mut io => return Ok(r?),
                    _ = stopping(self.shutdown) => self.begin(),
                },
                Some(deadline) => tokio::select! {
                    biased;
                    r = &mut io => return Ok(r?),
                    _ = tokio::time::sleep_until(deadline) => return Err(ConnError::ShutDown),
                },
            }
        }
    }
}

async fn negotiate(
    rd: &mut BufReader<BoxRead>,
    wr: &mut BufWriter<BoxWrite>,
    infos: &[ExportInfo],
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<Session>, ConnError> {
    let mut stop = HandshakeStop {
        shutdown,
        deadline: None,
    };
    stop.run(async {
        wr.write_all(&handshake::greeting()).await?;
        wr.flush().await
    })
    .await?;
    let client_flags = stop.run(rd.read_u32()).await?;
    let mut negotiation = Negotiation::new(infos, client_flags)?;
    loop {
        let mut header = [0u8; 16];
        stop.run(rd.read_exact(&mut header)).await?;
        let (option, len) = handshake::parse_option_header(&header)?;
        let data = if len > MAX_OPTION_LEN {
            stop.run(discard(rd, len as u64)).await?;
            None
        } else {
            let mut data = vec![0u8; len as usize];
            stop.run(rd.read_exact(&mut data)).await?;
            Some(data)
        };
        let outcome = match data {
            _ if stop.shutting_down() => negotiation.handle_option_shutting_down(option),
            None => negotiation.handle_oversized(option),
            Some(data) => negotiation.handle_option(option, &data),
        };
        stop.run(async {
            wr.write_all(&outcome.reply).await?;
            wr.flush().await
        })
        .await?;
        match outcome.next {
            Next::Continue => {}
            Next::Transmit(session) => return Ok(Some(session)),
            Next::Close => return Ok(None),
        }
    }
}

async fn discard<R: AsyncRead + Unpin>(rd: &mut R, mut len: u64) -> io::Result<()> {
    // On the heap: an array here would be part of every connection's future (it lives
    // across an await), making that 130 KB, all copied through the stack when a debug
    // build spawns or polls it. Only refused or oversized data comes here.
    let mut sink = vec![0u8; (len as usize).min(64 * 1024)];
    while len > 0 {
        let n = (len as usize).min(sink.len());
        rd.read_exact(&mut sink[..n]).await?;
        len -= n as u64;
    }
    Ok(())
}

/// Resolves once shutdown was requested (without holding the watch's lock afterwards).
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// A decoded request, ready to run.
struct Incoming {
    to: ReplyTo,
    command: Result<Command, request::Rejection>,
    payload: Vec<u8>,
    cost: u64,
}

enum Outcome {
    Done,
    Data(Vec<u8>),
    Extents(Vec<Extent>),
    Failed(NbdErrno, String),
}

struct Completed {
    to: ReplyTo,
    outcome: Outcome,
    cost: u64,
}

/// What a request counts against the connection's in-flight budget.
fn request_cost(length: u64) -> u64 {
    REQUEST_COST + length.min(MAX_PAYLOAD as u64)
}

/// What the transmission loop does after a request header.
enum AfterRequest {
    Run(Incoming),
    /// NBD_CMD_DISC, or a shutdown while the payload was arriving: stop reading.
    StopReading,
}

/// Runs `work` (a reply to send, a payload to read: anything that waits on this client)
/// while the requests in flight keep running; those that finish meanwhile queue in
/// `finished`. A finished request releases what it holds (a mirrored write's range lock,
/// its activity registration) only when it is polled to its end, so a loop that stopped
/// polling while one client dawdled would hold up every other client's overlapping writes,
/// resync and demotion, for as long as that client stayed stuck.
async fn while_driving<T, F: Future<Output = Completed>>(
    work: impl Future<Output = T>,
    inflight: &mut FuturesUnordered<F>,
    finished: &mut VecDeque<Completed>,
) -> T {
    tokio::pin!(work);
    loop {
        tokio::select! {
            biased;
            out = &mut work => return out,
            Some(done) = inflight.next(), if !inflight.is_empty() => finished.push_back(done),
        }
    }
}

/// Sends the replies of the requests in `finished`, and of those that finish meanwhile.
async fn send_finished<F: Future<Output = Completed>>(
    wr: &mut BufWriter<BoxWrite>,
    mode: ReplyMode,
    scratch: &mut Vec<u8>,
    inflight: &mut FuturesUnordered<F>,
    finished: &mut VecDeque<Completed>,
    cost_in_flight: &mut u64,
) -> Result<(), ConnError> {
    while let Some(done) = finished.pop_front() {
        *cost_in_flight -= done.cost;
        let send = send_reply(wr, mode, done, scratch);
        while_driving(send, inflight, finished).await?;
    }
    Ok(())
}

/// Runs the requests still in flight to their end, once the exchange with the client ended
/// (it went away, a reply could not be sent, the shard gave up on it); their replies are
/// discarded. Dropping them instead would not stop their I/O: a write, trim or zeroes
/// submitted to the kernel (an io_uring operation) completes on its own, but a dropped
/// mirrored write releases its range lock at once, so another connection's overlapping
/// write could be applied and acknowledged first and then be overwritten by the orphan on
/// this node, and by the resync of the range on the peer. Only a request's completion can
/// release its locks safely, so no time limit is set here: each request is bounded by its
/// backend (local I/O completes; a mirrored write waits for its peer at most the link's
/// timeouts; a write waiting for permission to be acknowledged alone gives up when a
/// demotion begins). A shutdown keeps a last resort ([`IN_FLIGHT_LAST_RESORT`]).
async fn finish_in_flight<F: Future<Output = Completed>>(inflight: &mut FuturesUnordered<F>) {
    if inflight.is_empty() {
        return;
    }
    debug!(
        requests = inflight.len(),
        "finishing the requests in flight before closing; their replies are dropped"
    );
    while inflight.next().await.is_some() {}
}

/// The transmission phase in one loop: read requests, start each at once, send replies as
/// they complete. One task, no channel: a request starts its I/O in the same poll that
/// read it. Reading pauses while the in-flight budget is spent, so memory stays bounded
/// (a finished request counts against it until its reply is sent).
///
/// Whatever ends the exchange with the client (it hung up or reset, a reply cannot be sent,
/// a protocol error, the shard giving up on it), the requests in flight run to their end
/// before this returns: see [`finish_in_flight`].
async fn transmission<B: BlockBackend>(
    mut rd: BufReader<BoxRead>,
    wr: &mut BufWriter<BoxWrite>,
    session: Session,
    size: u64,
    backend: Arc<B>,
    mut shutdown: watch::Receiver<bool>,
    give_up: &mut GiveUp,
) -> Result<(), ConnError> {
    let mode = ReplyMode::for_session(session.structured_replies, session.extended_headers);
    let header_len = request::header_len(session.extended_headers);
    let mut header = [0u8; request::EXTENDED_HEADER_LEN];
    let mut filled = 0usize;
    let mut inflight = FuturesUnordered::new();
    let mut finished = VecDeque::new();
    let mut cost_in_flight = 0u64;
    let mut reading = true;
    let mut scratch = Vec::with_capacity(64);
    let payload_stop = shutdown.clone();
    let result = {
        // Everything that waits on the client. It may end early (`?`, or the shard giving up on
        // the client), but the requests in flight are not its own: they stay in `inflight`,
        // which outlives it.
        let client = async {
            loop {
                // Every finished reply leaves the buffer before this waits: one left behind
                // (a request that finished while the last flush waited for a slow reader)
                // would wait for the client's next request, and a client waiting for that
                // reply (a FLUSH, the end of a batch) would hang. Only a burst of requests
                // already read keeps the buffer filling, for fewer socket writes.
                loop {
                    send_finished(
                        wr,
                        mode,
                        &mut scratch,
                        &mut inflight,
                        &mut finished,
                        &mut cost_in_flight,
                    )
                    .await?;
                    let burst = reading
                        && rd.buffer().len() >= header_len
                        && cost_in_flight < CONNECTION_BUDGET;
                    if wr.buffer().is_empty() || burst {
                        break;
                    }
                    while_driving(wr.flush(), &mut inflight, &mut finished).await?;
                    if finished.is_empty() {
                        break;
                    }
                }
                let can_read = reading && cost_in_flight < CONNECTION_BUDGET;
                if !can_read && inflight.is_empty() {
                    if reading {
                        // Budget spent with nothing in flight cannot happen; guard the loop anyway.
                        cost_in_flight = 0;
                        continue;
                    }
                    break;
                }
                tokio::select! {
                    biased;
                    Some(done) = inflight.next(), if !inflight.is_empty() => {
                        let done: Completed = done;
                        cost_in_flight -= done.cost;
                        let send = send_reply(wr, mode, done, &mut scratch);
                        while_driving(send, &mut inflight, &mut finished).await?;
                    }
                    _ = stopping(&mut shutdown), if reading => reading = false,
                    // read() is cancel-safe: a header arrives in pieces across iterations.
                    r = rd.read(&mut header[filled..header_len]), if can_read => {
                        let n = match r {
                            Ok(n) => n,
                            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => 0,
                            Err(e) => return Err(e.into()),
                        };
                        if n == 0 {
                            // The client hung up; finish what it asked for, then close.
                            reading = false;
                            continue;
                        }
                        filled += n;
                        if filled < header_len {
                            continue;
                        }
                        filled = 0;
                        let next = next_request(&mut rd, &header[..header_len], &session, size, &payload_stop);
                        match while_driving(next, &mut inflight, &mut finished).await? {
                            AfterRequest::Run(req) => {
                                cost_in_flight += req.cost;
                                inflight.push(execute(backend.clone(), req, crate::spin::serving_client()));
                            }
                            AfterRequest::StopReading => reading = false,
                        }
                        // More requests already buffered: take them before flushing replies, so a
                        // pipelined burst is answered with few socket writes.
                        if reading && rd.buffer().len() >= header_len && cost_in_flight < CONNECTION_BUDGET {
                            continue;
                        }
                    }
                }
                while let Some(Some(done)) = inflight.next().now_or_never() {
                    finished.push_back(done);
                }
            }
            wr.flush().await?;
            Ok::<(), ConnError>(())
        };
        tokio::pin!(client);
        tokio::select! {
            biased;
            r = &mut client => r,
            () = give_up.wait() => Err(ConnError::GivenUp),
        }
    };
    finish_in_flight(&mut inflight).await;
    result
}

/// Decodes one request whose header was read, reads its payload, and validates it.
async fn next_request(
    rd: &mut BufReader<BoxRead>,
    header: &[u8],
    session: &Session,
    size: u64,
    shutdown: &watch::Receiver<bool>,
) -> Result<AfterRequest, ConnError> {
    let extended = session.extended_headers;
    let h: RequestHeader = request::decode_header(header, extended)?;
    let payload_len = request::payload_len(&h, extended)?;
    let command = request::validate(&h, session, size);
    let payload = if payload_len > MAX_PAYLOAD as u64 {
        // Refused, but the bytes must still be consumed to stay in step with the client.
        discard(rd, payload_len).await?;
        Vec::new()
    } else if payload_len > 0 {
        // Read into spare capacity: no need to zero a buffer the socket overwrites.
        let mut buf = Vec::with_capacity(payload_len as usize);
        // A client stalled mid-payload must not hold up a shutdown; the request was not
        // acknowledged, so dropping it loses nothing.
        let mut stop = shutdown.clone();
        tokio::select! {
            biased;
            _ = stopping(&mut stop) => return Ok(AfterRequest::StopReading),
            r = read_payload(rd, &mut buf, payload_len as usize) => r?,
        }
        if command.is_err() {
            Vec::new()
        } else {
            buf
        }
    } else {
        Vec::new()
    };
    if let Err(r) = &command {
        debug!(cookie = h.cookie, kind = h.kind, offset = h.offset, length = h.length,
               errno = ?r.errno, reason = r.message, "request refused");
    }
    if command == Ok(Command::Disconnect) {
        return Ok(AfterRequest::StopReading);
    }
    let reply_len = if h.kind == CMD_READ { h.length } else { 0 };
    Ok(AfterRequest::Run(Incoming {
        to: ReplyTo {
            cookie: h.cookie,
            offset: h.offset,
        },
        command,
        payload,
        cost: request_cost(payload_len.max(reply_len)),
    }))
}

/// Fills `buf` (empty, with capacity `len`) with exactly `len` bytes. Unlike
/// `read_to_end`, it never grows the buffer, so a full payload is never copied again.
async fn read_payload(
    rd: &mut BufReader<BoxRead>,
    buf: &mut Vec<u8>,
    len: usize,
) -> io::Result<()> {
    while buf.len() < len {
        let want = (len - buf.len()) as u64;
        if (&mut *rd).take(want).read_buf(buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(())
}

/// `_serving` counts the request on its thread from the moment it is read (see
/// [`crate::spin::requests_here`]).
async fn execute<B: BlockBackend>(
    backend: Arc<B>,
    req: Incoming,
    _serving: crate::spin::Held,
) -> Completed {
    let outcome = match req.command {
        Err(r) => Outcome::Failed(r.errno, r.message.to_string()),
        Ok(cmd) => run_command(&*backend, cmd, req.payload).await,
    };
    Completed {
        to: req.to,
        outcome,
        cost: req.cost,
    }
}

async fn run_command<B: BlockBackend>(backend: &B, cmd: Command, payload: Vec<u8>) -> Outcome {
    let result = match cmd {
        Command::Read { offset, length } => {
            return match backend.read(offset, length as usize).await {
                Ok(data) => Outcome::Data(data),
                Err(e) => failed(e),
            }
        }
        Command::BlockStatus {
            offset,
            length,
            req_one,
        } => {
            let max = if req_one { 1 } else { MAX_EXTENTS };
            return match backend.block_status(offset, length, max).await {
                Ok(extents) if !extents.is_empty() => Outcome::Extents(extents),
                Ok(_) => Outcome::Failed(NbdErrno::Io, "backend returned no extents".into()),
                Err(e) => failed(e),
            };
        }
        Command::Write { offset, fua, .. } => backend.write(offset, payload, fua).await,
        Command::Flush => backend.flush().await,
        Command::Trim {
            offset,
            length,
            fua,
        } => backend.trim(offset, length, fua).await,
        Command::Cache { offset, length } => backend.cache(offset, length).await,
        Command::WriteZeroes {
            offset,
            length,
            fua,
            may_trim,
            fast_only,
        } => {
            let mode = ZeroMode {
                may_trim,
                fast_only,
                fua,
            };
            backend.write_zeroes(offset, length, mode).await
        }
        Command::Disconnect => Ok(()),
    };
    match result {
        Ok(()) => Outcome::Done,
        Err(e) => failed(e),
    }
}

fn failed(e: crate::backend::BackendError) -> Outcome {
    let errno = e.errno();
    if errno != NbdErrno::NotSup {
        warn!(error = %e, "I/O failed");
    }
    Outcome::Failed(errno, e.to_string())
}

async fn send_reply(
    wr: &mut BufWriter<BoxWrite>,
    mode: ReplyMode,
    done: Completed,
    header: &mut Vec<u8>,
) -> io::Result<()> {
    header.clear();
    match done.outcome {
        Outcome::Done => reply::ok(header, mode, done.to),
        Outcome::Failed(errno, message) => reply::error(header, mode, done.to, errno, &message),
        Outcome::Extents(extents) => {
            reply::block_status(header, mode, done.to, BASE_ALLOCATION_ID, &extents)
        }
        Outcome::Data(data) => {
            reply::read_data_header(header, mode, done.to, data.len() as u64);
            wr.write_all(header).await?;
            return wr.write_all(&data).await;
        }
    }
    wr.write_all(header).await
}

/// Logs where the server listens (one line per address, for operators and tests).
pub fn log_listening(listeners: &[Listener], exports: &[ExportInfo]) {
    for l in listeners {
        for e in exports {
            info!(listen = %l.addr(), export = %e.name, size = e.size, "serving");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use tokio::net::TcpStream;

    async fn tcp_listener() -> (Listener, SocketAddr) {
        let addr: ListenAddr = "127.0.0.1:0".parse().expect("address");
        let mut listeners = bind_all(&[addr]).await.expect("bind an ephemeral port");
        let listener = listeners.remove(0);
        let Listener::Tcp(l, _) = &listener else {
            panic!("a TCP address gives a TCP listener");
        };
        let local = l.local_addr().expect("local address");
        (listener, local)
    }

    /// A server on an ephemeral loopback port, its connections on this test's runtime (the
    /// handshake tests never reach its backend).
    async fn start() -> (SocketAddr, watch::Sender<bool>, tokio::task::JoinHandle<()>) {
        start_with(Arc::new(Gated::new())).await
    }

    async fn start_with<B: BlockBackend>(
        backend: Arc<B>,
    ) -> (SocketAddr, watch::Sender<bool>, tokio::task::JoinHandle<()>) {
        let (listener, addr) = tcp_listener().await;
        let exports = vec![Export {
            info: ExportInfo {
                name: "disk0".into(),
                description: String::new(),
                size: 1 << 20,
                base_flags: transmission_flags(false),
            },
            backend,
        }];
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(serve(vec![listener], exports, stop_rx, 0));
        (addr, stop, task)
    }

    async fn send_option(s: &mut TcpStream, option: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        s.write_all(&b).await.expect("send option");
    }

    /// (option, reply type) of the next option reply; its data is read and dropped.
    async fn read_option_reply(s: &mut TcpStream) -> io::Result<(u32, u32)> {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).await?;
        assert_eq!(&h[0..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        let word = |i: usize| u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let mut body = vec![0u8; word(16) as usize];
        s.read_exact(&mut body).await?;
        Ok((word(8), word(12)))
    }

    async fn closed_by_server(s: &mut TcpStream) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    /// The spec: a server shutting down SHOULD error further options (other than ABORT)
    /// with NBD_REP_ERR_SHUTDOWN, and the client then disconnects softly.
    #[tokio::test]
    async fn options_during_a_shutdown_are_answered_err_shutdown() {
        let (addr, stop, task) = start().await;
        let mut c = TcpStream::connect(addr).await.expect("connect");
        let mut greeting = [0u8; 18];
        c.read_exact(&mut greeting).await.expect("greeting");
        c.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
            .await
            .expect("client flags");
        send_option(&mut c, OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(
            read_option_reply(&mut c).await.expect("reply"),
            (OPT_STRUCTURED_REPLY, REP_ACK)
        );

        stop.send(true).expect("server running");
        // Let the connection see the shutdown before its next option arrives.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut go = 5u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"disk0");
        go.extend_from_slice(&0u16.to_be_bytes());
        send_option(&mut c, OPT_GO, &go).await;
        assert_eq!(
            read_option_reply(&mut c)
                .await
                .expect("an answer, not a closed socket"),
            (OPT_GO, REP_ERR_SHUTDOWN)
        );
        send_option(&mut c, OPT_ABORT, &[]).await;
        // The spec lets the server close without answering ABORT; we acknowledge it.
        assert_eq!(
            read_option_reply(&mut c).await.expect("abort answered"),
            (OPT_ABORT, REP_ACK)
        );
        assert!(closed_by_server(&mut c).await);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("serve returns once the connection closed")
            .expect("serve task");
    }

    /// A client that sits in the handshake without sending anything does not hold up the
    /// shutdown (a demotion waits for it) longer than the short window for a next option.
    #[tokio::test]
    async fn an_idle_handshake_does_not_hold_the_shutdown() {
        let (addr, stop, task) = start().await;
        let mut c = TcpStream::connect(addr).await.expect("connect");
        let mut greeting = [0u8; 18];
        c.read_exact(&mut greeting).await.expect("greeting");
        c.write_all(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes())
            .await
            .expect("client flags");
        tokio::time::sleep(Duration::from_millis(20)).await;
        let started = std::time::Instant::now();
        stop.send(true).expect("server running");
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("serve returns")
            .expect("serve task");
        assert!(
            started.elapsed() < NEGOTIATION_SHUTDOWN_GRACE + Duration::from_secs(1),
            "took {:?}",
            started.elapsed()
        );
        assert!(closed_by_server(&mut c).await);
    }

    /// Without keepalive, a client that vanished (power loss, a cut link) leaves its
    /// connection open for good: nothing is ever sent on an idle one.
    #[tokio::test]
    async fn accepted_tcp_connections_have_keepalive() {
        use nix::sys::socket::{getsockopt, sockopt};
        let (listener, addr) = tcp_listener().await;
        let _client = TcpStream::connect(addr).await.expect("connect");
        let accepted = accept(&listener).await.expect("accept");
        let Accepted::Tcp(s, _) = accepted else {
            panic!("a TCP listener accepts TCP connections");
        };
        assert!(getsockopt(&s, sockopt::KeepAlive).expect("SO_KEEPALIVE"));
        assert_eq!(
            getsockopt(&s, sockopt::TcpKeepIdle).expect("TCP_KEEPIDLE"),
            KEEPALIVE_IDLE.as_secs() as u32
        );
        assert_eq!(
            getsockopt(&s, sockopt::TcpKeepInterval).expect("TCP_KEEPINTVL"),
            KEEPALIVE_INTERVAL.as_secs() as u32
        );
        assert_eq!(
            getsockopt(&s, sockopt::TcpKeepCount).expect("TCP_KEEPCNT"),
            KEEPALIVE_PROBES
        );
        assert!(getsockopt(&s, sockopt::TcpNoDelay).expect("TCP_NODELAY"));
    }

    /// A backend whose writes finish only when the test releases them, and which counts a
    /// write whose future was dropped before it finished: in the real backends that is a
    /// write whose I/O may still be in the kernel (an orphaned io_uring operation) while the
    /// range lock it held is already free for an overlapping write.
    struct Gated {
        release: tokio::sync::Semaphore,
        started: std::sync::atomic::AtomicUsize,
        finished: std::sync::atomic::AtomicUsize,
        dropped_unfinished: std::sync::atomic::AtomicUsize,
        /// FLUSH waits for a permit instead of the writes.
        gate_flush: bool,
    }

    impl Gated {
        fn new() -> Self {
            Gated {
                release: tokio::sync::Semaphore::new(0),
                started: Default::default(),
                finished: Default::default(),
                dropped_unfinished: Default::default(),
                gate_flush: false,
            }
        }

        fn gating_flush() -> Self {
            Gated {
                gate_flush: true,
                ..Gated::new()
            }
        }

        async fn gate(&self) -> crate::BackendResult<()> {
            match self.release.acquire().await {
                Ok(permit) => {
                    permit.forget();
                    Ok(())
                }
                Err(_) => Err(crate::BackendError::ShuttingDown),
            }
        }

        fn count(c: &std::sync::atomic::AtomicUsize) -> usize {
            c.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    /// Counts its write as dropped unfinished unless disarmed.
    struct Unfinished<'a>(Option<&'a std::sync::atomic::AtomicUsize>);

    impl Drop for Unfinished<'_> {
        fn drop(&mut self) {
            if let Some(c) = self.0 {
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }

    impl BlockBackend for Gated {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read_only(&self) -> bool {
            false
        }
        async fn read(&self, _: u64, length: usize) -> crate::BackendResult<Vec<u8>> {
            Ok(vec![0; length])
        }
        async fn write(&self, _: u64, _: Vec<u8>, _: bool) -> crate::BackendResult<()> {
            use std::sync::atomic::Ordering::SeqCst;
            self.started.fetch_add(1, SeqCst);
            let mut unfinished = Unfinished(Some(&self.dropped_unfinished));
            if !self.gate_flush {
                self.gate().await?;
            }
            unfinished.0 = None;
            self.finished.fetch_add(1, SeqCst);
            Ok(())
        }
        async fn flush(&self) -> crate::BackendResult<()> {
            if self.gate_flush {
                self.gate().await?;
            }
            Ok(())
        }
        async fn trim(&self, _: u64, _: u64, _: bool) -> crate::BackendResult<()> {
            Ok(())
        }
        async fn write_zeroes(&self, _: u64, _: u64, _: ZeroMode) -> crate::BackendResult<()> {
            Ok(())
        }
        async fn cache(&self, _: u64, _: u64) -> crate::BackendResult<()> {
            Ok(())
        }
        async fn block_status(
            &self,
            _: u64,
            length: u64,
            _: usize,
        ) -> crate::BackendResult<Vec<Extent>> {
            Ok(vec![Extent { length, flags: 0 }])
        }
    }

    fn request(kind: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b
    }

    /// A request that finishes while the server's last flush of replies waits for a slow
    /// reader is answered without the client sending anything more. Here: a FLUSH and a READ
    /// back to back over a 64-byte pipe; the READ's reply fills the pipe, the FLUSH finishes
    /// meanwhile. Its reply used to stay in the buffer until the client's next request: a
    /// client waiting for it (a guest's sync) hung (found by a review, reproduced over TCP
    /// and unix sockets with a real client).
    #[tokio::test]
    async fn a_reply_finished_during_a_blocked_flush_is_sent_without_another_request() {
        let backend = Arc::new(Gated::gating_flush());
        let shared = Arc::new(Shared {
            infos: vec![ExportInfo {
                name: "disk0".into(),
                description: String::new(),
                size: 1 << 20,
                base_flags: transmission_flags(false),
            }],
            backends: vec![backend.clone()],
        });
        let (server_end, mut c) = tokio::io::duplex(64);
        let (r, w) = tokio::io::split(server_end);
        let (_stop, stop_rx) = watch::channel(false);
        let (_give_up, give_up_rx) = oneshot::channel();
        tokio::spawn(handle_connection(
            Box::new(r),
            Box::new(w),
            shared,
            stop_rx,
            GiveUp::new(give_up_rx),
        ));
        let mut greeting = [0u8; 18];
        c.read_exact(&mut greeting).await.expect("greeting");
        c.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
            .await
            .expect("client flags");
        let mut go = IHAVEOPT.to_be_bytes().to_vec();
        go.extend_from_slice(&OPT_GO.to_be_bytes());
        go.extend_from_slice(&11u32.to_be_bytes());
        go.extend_from_slice(&5u32.to_be_bytes());
        go.extend_from_slice(b"disk0");
        go.extend_from_slice(&0u16.to_be_bytes());
        c.write_all(&go).await.expect("GO");
        loop {
            let mut h = [0u8; 20];
            c.read_exact(&mut h).await.expect("GO answered");
            let word = |i: usize| u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
            let mut body = vec![0u8; word(16) as usize];
            c.read_exact(&mut body).await.expect("GO reply data");
            if word(12) == REP_ACK {
                break;
            }
        }
        let mut burst = request(CMD_FLUSH, 2, 0, 0);
        burst.extend(request(CMD_READ, 1, 0, 4096));
        c.write_all(&burst).await.expect("requests");
        tokio::time::sleep(Duration::from_millis(100)).await;
        backend.release.add_permits(1);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut read_reply = vec![0u8; 16 + 4096];
        c.read_exact(&mut read_reply).await.expect("READ reply");
        assert_eq!(
            u64::from_be_bytes(read_reply[8..16].try_into().expect("8")),
            1
        );
        let mut flush_reply = [0u8; 16];
        tokio::time::timeout(Duration::from_secs(3), c.read_exact(&mut flush_reply))
            .await
            .expect("the FLUSH's reply waits for another request")
            .expect("FLUSH reply");
        assert_eq!(
            u64::from_be_bytes(flush_reply[8..16].try_into().expect("8")),
            2
        );
    }

    /// Connects and negotiates export "disk0" with OPT_GO (simple replies).
    async fn transmitting(addr: SocketAddr) -> TcpStream {
        let mut c = TcpStream::connect(addr).await.expect("connect");
        let mut greeting = [0u8; 18];
        c.read_exact(&mut greeting).await.expect("greeting");
        c.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
            .await
            .expect("client flags");
        let mut go = 5u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"disk0");
        go.extend_from_slice(&0u16.to_be_bytes());
        send_option(&mut c, OPT_GO, &go).await;
        loop {
            let (option, reply) = read_option_reply(&mut c).await.expect("GO answered");
            assert_eq!(option, OPT_GO);
            match reply {
                REP_INFO => continue,
                REP_ACK => return c,
                other => panic!("GO refused: {other:#x}"),
            }
        }
    }

    async fn send_write(c: &mut TcpStream, cookie: u64, offset: u64, len: u32) {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&CMD_WRITE.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.resize(b.len() + len as usize, 0xab);
        c.write_all(&b).await.expect("send a write");
    }

    async fn wait_until(what: &str, cond: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A client that resets its connection with two writes in flight: the first finishes,
    /// its reply cannot be sent, and the connection ends. The second write must still run to
    /// its end, not be dropped halfway: a mirrored write's range lock is released when its
    /// future ends, and a dropped one may leave its local write in the kernel, to land after
    /// a later overlapping write that another connection made and had acknowledged.
    #[tokio::test]
    async fn a_reset_client_does_not_drop_its_requests_in_flight() {
        let backend = Arc::new(Gated::new());
        let (addr, stop, task) = start_with(backend.clone()).await;
        let mut c = transmitting(addr).await;
        send_write(&mut c, 1, 0, 4096).await;
        send_write(&mut c, 2, 0, 4096).await;
        wait_until("both writes started", || {
            Gated::count(&backend.started) == 2
        })
        .await;
        c.set_zero_linger().expect("SO_LINGER 0");
        drop(c);
        // Let the server see the reset, then finish one write: its reply fails to go out.
        tokio::time::sleep(Duration::from_millis(100)).await;
        backend.release.add_permits(1);
        wait_until("one write finished", || {
            Gated::count(&backend.finished) == 1
        })
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            Gated::count(&backend.dropped_unfinished),
            0,
            "the connection dropped a write still in flight"
        );
        backend.release.add_permits(1);
        wait_until("the second write finished", || {
            Gated::count(&backend.finished) == 2
        })
        .await;
        stop.send(true).expect("server running");
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("serve returns")
            .expect("serve task");
        assert_eq!(Gated::count(&backend.dropped_unfinished), 0);
    }

    /// A shutdown gives up on a client that does not read (after the grace), but not on its
    /// requests in flight: they run to their end before the connection, and the shutdown,
    /// finish.
    #[tokio::test]
    async fn a_shutdown_does_not_drop_requests_in_flight() {
        let backend = Arc::new(Gated::new());
        let (addr, stop, task) = start_with(backend.clone()).await;
        let mut c = transmitting(addr).await;
        send_write(&mut c, 1, 0, 4096).await;
        wait_until("the write started", || Gated::count(&backend.started) == 1).await;
        stop.send(true).expect("server running");
        tokio::time::sleep(SHUTDOWN_GRACE + Duration::from_millis(500)).await;
        assert_eq!(
            Gated::count(&backend.dropped_unfinished),
            0,
            "the shutdown dropped a write still in flight"
        );
        assert!(!task.is_finished(), "serve returned with a write in flight");
        backend.release.add_permits(1);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("serve returns once the write finished")
            .expect("serve task");
        assert_eq!(Gated::count(&backend.finished), 1);
        assert_eq!(Gated::count(&backend.dropped_unfinished), 0);
    }
}
