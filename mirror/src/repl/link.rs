//! One authenticated replication connection for one volume: requests with sequence numbers
//! and their responses, a writer task that batches small frames into few syscalls, a reader
//! that routes responses to their waiters and hands requests to the volume, and liveness
//! (pings; silence longer than the peer timeout closes the link).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{oneshot, Notify};

use super::auth::{self, AuthKey, Transcript};
use super::frame::{self, FrameError, FrameHeader, Message, HEADER_LEN, MIN_VERSION, VERSION};

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("the replication link to the peer is down")]
    Down,
    #[error("the peer did not answer within {0:?}; link closed")]
    Timeout(Duration),
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("the peer did not finish the handshake in time")]
    Timeout,
    #[error("a {0}-byte frame during the handshake (at most {HANDSHAKE_MAX_BODY} bytes before authentication)")]
    TooLarge(u32),
    #[error("unexpected frame during the handshake")]
    Unexpected,
    #[error(
        "no replication protocol version in common: {peer} speaks versions {}-{}, this node \
         {MIN_VERSION}-{VERSION}; upgrade the older node",
        peer_versions.0, peer_versions.1
    )]
    NoCommonVersion {
        peer: String,
        peer_versions: (u16, u16),
    },
    #[error("authentication failed: the peer does not know the shared secret")]
    BadProof,
    #[error("the peer refused: {0}")]
    Refused(String),
    #[error("no volume named {0:?} on this node")]
    UnknownVolume(String),
    #[error("the peer calls itself {0:?}, the same name as this node")]
    SameName(String),
}

/// The largest frame body accepted before the peer is authenticated: a `Hello` or a proof
/// is a few hundred bytes. Without it, anyone reaching the replication port could make the
/// daemon allocate a full-size frame (32 MiB) per connection.
pub const HANDSHAKE_MAX_BODY: u32 = 64 << 10;

/// Reads one frame (header and body). Returns `Ok(None)` on a clean end of stream before a
/// header.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<(FrameHeader, Message)>, HandshakeError> {
    read_frame_limited(r, frame::MAX_BODY).await
}

/// [`read_frame`], refusing a body longer than `max_body` before reading (or allocating) it.
async fn read_frame_limited<R: AsyncRead + Unpin>(
    r: &mut R,
    max_body: u32,
) -> Result<Option<(FrameHeader, Message)>, HandshakeError> {
    let mut hb = [0u8; HEADER_LEN];
    match r.read_exact(&mut hb).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let h = frame::decode_header(&hb)?;
    if h.length > max_body {
        return Err(HandshakeError::TooLarge(h.length));
    }
    let len = h.length as usize;
    // A write's or a resync chunk's data goes straight into a buffer of its own, after the
    // fixed fields: the message then owns it without the payload being moved again.
    if let Some(p) = frame::payload_prefix(h.kind).filter(|&p| p <= len) {
        let mut prefix = [0u8; 32];
        r.read_exact(&mut prefix[..p]).await?;
        let payload = read_exactly(r, len - p).await?;
        let m = frame::decode_split(&h, &prefix[..p], payload)?;
        return Ok(Some((h, m)));
    }
    let body = read_exactly(r, len).await?;
    let m = frame::decode_body(&h, body)?;
    Ok(Some((h, m)))
}

/// Reads `len` bytes into spare capacity: zeroing a megabyte the socket overwrites anyway
/// showed up in profiles of a resync target (`len` is bounded by decode_header).
async fn read_exactly<R: AsyncRead + Unpin>(
    r: &mut R,
    len: usize,
) -> Result<Vec<u8>, HandshakeError> {
    let mut body = Vec::with_capacity(len);
    while body.len() < len {
        let want = (len - body.len()) as u64;
        if (&mut *r).take(want).read_buf(&mut body).await? == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
    }
    Ok(body)
}

pub async fn write_message<W: AsyncWrite + Unpin>(
    w: &mut W,
    seq: u64,
    m: &Message,
) -> std::io::Result<()> {
    let mut out = Vec::new();
    frame::encode(seq, m, &mut out);
    w.write_all(&out).await?;
    w.flush().await
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

async fn expect<R: AsyncRead + Unpin>(r: &mut R) -> Result<Message, HandshakeError> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame_limited(r, HANDSHAKE_MAX_BODY)).await {
        Err(_) => Err(HandshakeError::Timeout),
        Ok(Err(e)) => Err(e),
        Ok(Ok(None)) => Err(HandshakeError::Io(std::io::ErrorKind::UnexpectedEof.into())),
        Ok(Ok(Some((_, Message::Error { message })))) => Err(HandshakeError::Refused(message)),
        Ok(Ok(Some((_, m)))) => Ok(m),
    }
}

/// An authenticated peer: its node name and the protocol version the two nodes speak.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    pub peer_node: String,
    pub version: u16,
}

/// The dialer's side: returns the peer once both sides proved the secret.
pub async fn dial_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    key: &AuthKey,
    node: &str,
    volume: &str,
) -> Result<Authenticated, HandshakeError> {
    let my_nonce = auth::nonce();
    let hello = Message::Hello {
        min_version: MIN_VERSION,
        max_version: VERSION,
        node: node.to_string(),
        volume: volume.to_string(),
        nonce: my_nonce,
    };
    write_message(s, 0, &hello).await?;
    let Message::HelloReply {
        version,
        node: peer,
        nonce,
        proof,
    } = expect(s).await?
    else {
        return Err(HandshakeError::Unexpected);
    };
    if !(MIN_VERSION..=VERSION).contains(&version) {
        return Err(HandshakeError::NoCommonVersion {
            peer,
            peer_versions: (version, version),
        });
    }
    let t = Transcript {
        dialer_node: node,
        acceptor_node: &peer,
        volume,
        dialer_nonce: &my_nonce,
        acceptor_nonce: &nonce,
        offered_versions: (MIN_VERSION, VERSION),
        version,
    };
    if !auth::verify(key, auth::Side::Acceptor, &t, &proof) {
        return Err(HandshakeError::BadProof);
    }
    let mine = auth::proof(key, auth::Side::Dialer, &t);
    write_message(s, 0, &Message::HelloProof { proof: mine }).await?;
    Ok(Authenticated {
        peer_node: peer,
        version,
    })
}

/// What an accepted connection turned out to be.
pub struct Accepted {
    pub volume: String,
    pub peer: Authenticated,
}

/// The acceptor's side. `has_volume` says whether a volume name exists here. On any failure
/// the peer gets an `Error` frame (when the socket still works) and the caller logs it.
pub async fn accept_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    key: &AuthKey,
    node: &str,
    has_volume: impl Fn(&str) -> bool,
) -> Result<Accepted, HandshakeError> {
    let r = accept_inner(s, key, node, has_volume).await;
    if let Err(e) = &r {
        if !matches!(e, HandshakeError::Io(_)) {
            let msg = match e {
                // Say no more than needed to an unauthenticated party.
                HandshakeError::BadProof => "authentication failed".to_string(),
                other => other.to_string(),
            };
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                write_message(s, 0, &Message::Error { message: msg }),
            )
            .await;
        }
    }
    r
}

async fn accept_inner<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    key: &AuthKey,
    node: &str,
    has_volume: impl Fn(&str) -> bool,
) -> Result<Accepted, HandshakeError> {
    let Message::Hello {
        min_version,
        max_version,
        node: peer,
        volume,
        nonce: their_nonce,
    } = expect(s).await?
    else {
        return Err(HandshakeError::Unexpected);
    };
    let offered_versions = (min_version, max_version);
    let Some(version) = frame::negotiate_version(offered_versions, (MIN_VERSION, VERSION)) else {
        return Err(HandshakeError::NoCommonVersion {
            peer,
            peer_versions: offered_versions,
        });
    };
    if peer == node {
        return Err(HandshakeError::SameName(peer));
    }
    if !has_volume(&volume) {
        return Err(HandshakeError::UnknownVolume(volume));
    }
    let my_nonce = auth::nonce();
    let t = Transcript {
        dialer_node: &peer,
        acceptor_node: node,
        volume: &volume,
        dialer_nonce: &their_nonce,
        acceptor_nonce: &my_nonce,
        offered_versions,
        version,
    };
    let reply = Message::HelloReply {
        version,
        node: node.to_string(),
        nonce: my_nonce,
        proof: auth::proof(key, auth::Side::Acceptor, &t),
    };
    write_message(s, 0, &reply).await?;
    let Message::HelloProof { proof } = expect(s).await? else {
        return Err(HandshakeError::Unexpected);
    };
    if !auth::verify(key, auth::Side::Dialer, &t, &proof) {
        return Err(HandshakeError::BadProof);
    }
    Ok(Accepted {
        volume,
        peer: Authenticated {
            peer_node: peer,
            version,
        },
    })
}

/// The sending side of a live connection, shared by everyone who talks to the peer.
pub struct Link {
    pub peer_node: String,
    outbox: Mutex<Outbox>,
    /// Wakes the writer task when frames wait in the outbox.
    queued: Notify,
    pending: Mutex<HashMap<u64, oneshot::Sender<Message>>>,
    next_seq: AtomicU64,
    closed: AtomicBool,
    closed_notify: Notify,
    request_timeout: Duration,
    /// Requests from the peer being handled here (see [`Link::answering`]).
    answering: AtomicUsize,
    /// Wakes [`Link::drained`] waiters: the link is closed and its last request ended.
    drained: Notify,
}

/// A frame on its way to the socket: bytes of its own and, after them, optionally a payload
/// shared with the local disk write. A mirrored write's data is sent from the buffer the
/// local pwrite reads, instead of being copied into a frame first (a memmove of every
/// mirrored byte on the primary's busiest thread: 5 % of its CPU in 1 MiB writes).
pub struct OutFrame {
    head: Vec<u8>,
    tail: Option<Arc<Vec<u8>>>,
}

impl OutFrame {
    /// `head` (the frame header and fixed fields, CRC computed over them and `tail`) then
    /// `tail`.
    pub fn split(head: Vec<u8>, tail: Arc<Vec<u8>>) -> OutFrame {
        OutFrame {
            head,
            tail: Some(tail),
        }
    }

    fn len(&self) -> usize {
        self.head.len() + self.tail.as_ref().map_or(0, |t| t.len())
    }

    /// What is left to send after `sent` bytes: the rest of the head, then of the tail.
    fn rest(&self, sent: usize) -> (&[u8], &[u8]) {
        let tail: &[u8] = self.tail.as_deref().map_or(&[], Vec::as_slice);
        match self.head.get(sent..) {
            Some(head) => (head, tail),
            None => {
                let into_tail = (sent - self.head.len()).min(tail.len());
                (&[], &tail[into_tail..])
            }
        }
    }
}

impl From<Vec<u8>> for OutFrame {
    fn from(head: Vec<u8>) -> OutFrame {
        OutFrame { head, tail: None }
    }
}

/// Frames on their way to the socket. A sender whose frame has nothing queued ahead of it
/// writes it to the socket itself, on its own thread: a mirrored write leaves from the NBD
/// thread that received it, with no wake-up of the writer task (a thread switch per write
/// on the way out). When frames are queued, the writer task is busy, or the socket is full,
/// the frame joins a queue instead.
///
/// Two queues: resync chunks wait in `bulk`, everything else in `queue`, which the writer
/// always empties first. A resync fills its window (up to `window::MAX_BYTES`) whenever the
/// application pauses; in one queue, the next client write waited behind all of it: 30-60 ms
/// at queue depth 1 during a full sync on loopback, far worse on a slower link. Frames of one
/// queue keep the order in which senders took the lock. A client write may overtake resync
/// chunks because the two never cover the same range at once (the range lock) and because
/// what a flush covers is counted from acknowledgements, never from the order on the wire.
struct Outbox {
    queue: VecDeque<OutFrame>,
    bulk: VecDeque<OutFrame>,
    /// Bytes the writer took from `queue` since it last took a `bulk` frame: past
    /// [`BULK_EVERY_BYTES`] a waiting chunk goes next, so a client that always has frames
    /// queued cannot starve a resync (its chunk would time out and drop the link).
    urgent_since_bulk: usize,
    /// Bytes of the queue's first frame already on the wire (a direct write stopped short).
    head_sent: usize,
    /// The writer task holds frames it took from the queue and has not written yet.
    writer_busy: bool,
    /// The connection's socket, for direct writes (its own descriptor: the link drops it on
    /// close, so a late sender can never write to a descriptor number reused elsewhere).
    direct: Option<std::net::TcpStream>,
    closed: bool,
}

impl Outbox {
    /// Queues `frame`, or writes it now when nothing is ahead of it and the sender is
    /// `alone` (no other exchange in progress). Returns whether the writer task must be woken.
    /// A `bulk` frame (a resync chunk) is never written directly: it yields to the rest.
    fn push(&mut self, frame: OutFrame, alone: bool, bulk: bool) -> Result<bool, LinkError> {
        if self.closed {
            return Err(LinkError::Down);
        }
        if bulk {
            self.bulk.push_back(frame);
            return Ok(true);
        }
        let mut sent = 0;
        if alone && self.queue.is_empty() && !self.writer_busy {
            if let Some(socket) = self.direct.as_mut() {
                sent = write_nonblocking(socket, &frame);
                if sent == frame.len() {
                    return Ok(false);
                }
            }
        }
        if self.queue.is_empty() {
            self.head_sent = sent;
        }
        self.queue.push_back(frame);
        Ok(true)
    }

    /// The next frame for the writer and the bytes of it already sent.
    fn pop(&mut self) -> Option<(OutFrame, usize)> {
        // A frame the socket took in part is always finished first.
        let bulk_due = !self.bulk.is_empty()
            && self.head_sent == 0
            && self.urgent_since_bulk >= BULK_EVERY_BYTES;
        if !bulk_due {
            if let Some(f) = self.queue.pop_front() {
                self.urgent_since_bulk = self.urgent_since_bulk.saturating_add(f.len());
                return Some((f, std::mem::take(&mut self.head_sent)));
            }
        }
        let f = self.bulk.pop_front()?;
        self.urgent_since_bulk = 0;
        Some((f, 0))
    }
}

/// Writes what the socket takes without blocking. Errors are left for the writer task,
/// which meets them again and closes the link.
fn write_nonblocking(socket: &mut std::net::TcpStream, frame: &OutFrame) -> usize {
    use std::io::{IoSlice, Write};
    let mut sent = 0;
    // Bounded: each round either makes progress or stops.
    while sent < frame.len() {
        let (head, tail) = frame.rest(sent);
        match socket.write_vectored(&[IoSlice::new(head), IoSlice::new(tail)]) {
            Ok(0) => break,
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    sent
}

impl Link {
    /// `direct` is a second handle on the connection's socket (non-blocking) for senders
    /// that write their frames themselves; without it every frame goes through the writer
    /// task.
    pub fn new(
        peer_node: String,
        request_timeout: Duration,
        direct: Option<std::net::TcpStream>,
    ) -> Arc<Link> {
        Arc::new(Link {
            peer_node,
            outbox: Mutex::new(Outbox {
                queue: VecDeque::new(),
                bulk: VecDeque::new(),
                urgent_since_bulk: 0,
                head_sent: 0,
                writer_busy: false,
                direct,
                closed: false,
            }),
            queued: Notify::new(),
            pending: Mutex::new(HashMap::new()),
            next_seq: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            closed_notify: Notify::new(),
            request_timeout,
            answering: AtomicUsize::new(0),
            drained: Notify::new(),
        })
    }

    fn lock_outbox(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `alone`: this frame is the only exchange in progress on the link. Only then is a
    /// direct write worth it: with many in flight, a loopback or LAN send costs more than
    /// the wake-up it saves, and the writer task gathers the frames into few writes.
    fn push_frame(&self, frame: OutFrame, alone: bool, bulk: bool) -> Result<(), LinkError> {
        let wake = self.lock_outbox().push(frame, alone, bulk)?;
        if wake {
            self.queued.notify_one();
        }
        Ok(())
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<Message>>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_closed(&self) -> bool {
        // SeqCst, with the swap in `close` and the counter in `answering`: see there.
        self.closed.load(Ordering::SeqCst)
    }

    /// Closes the link: every waiting request fails with [`LinkError::Down`], the writer
    /// stops, and the connection task ends.
    pub fn close(&self) {
        if !self.closed.swap(true, Ordering::SeqCst) {
            {
                let mut outbox = self.lock_outbox();
                outbox.closed = true;
                outbox.direct = None;
                outbox.queue.clear();
                outbox.bulk.clear();
            }
            self.lock_pending().clear();
            self.closed_notify.notify_waiters();
            // A link closed with no request in service is drained at once.
            self.drained.notify_waiters();
        }
    }

    pub async fn closed(&self) {
        let n = self.closed_notify.notified();
        tokio::pin!(n);
        n.as_mut().enable();
        if self.is_closed() {
            return;
        }
        n.await
    }

    /// Sends a frame that expects no answer (responses, pings, state).
    pub fn send(&self, seq: u64, m: &Message) {
        let mut out = Vec::new();
        frame::encode(seq, m, &mut out);
        let alone = self.answering.load(Ordering::Relaxed) <= 1 && self.lock_pending().is_empty();
        let _ = self.push_frame(out.into(), alone, false);
    }

    /// Counts a request from the peer as being handled until the guard drops; its response
    /// goes out directly only when it is the only one. `None` once the link is closed: a
    /// request read from a closed link must not be applied (its answer could not be sent,
    /// and a newer link may already be served: see [`Link::drained`]).
    pub fn answering(self: &Arc<Self>) -> Option<Answering> {
        // Counted first, then the closed flag read, both SeqCst, while `close` sets the flag
        // before a waiter reads the count (SeqCst too): a waiter that finds no request in
        // service can never be followed by a request that saw the link open. On x86 this is
        // the same locked add as before plus a plain load.
        self.answering.fetch_add(1, Ordering::SeqCst);
        let guard = Answering(self.clone());
        if self.is_closed() {
            return None;
        }
        Some(guard)
    }

    /// Requests from the peer still being handled here.
    pub fn requests_in_service(&self) -> usize {
        self.answering.load(Ordering::SeqCst)
    }

    /// Closed, and no request of the peer is being handled any more (none can start).
    pub fn is_drained(&self) -> bool {
        self.is_closed() && self.requests_in_service() == 0
    }

    /// Resolves once the link is closed and every request of the peer it started has ended
    /// (see [`Link::answering`]). Requests that arrive later are refused, so from then on
    /// nothing this link carried can still reach the image.
    pub async fn drained(&self) {
        loop {
            let n = self.drained.notified();
            tokio::pin!(n);
            // Registered before the check: a last request that ends in between wakes it.
            n.as_mut().enable();
            if self.is_drained() {
                return;
            }
            n.await;
        }
    }

    fn register(&self) -> Result<(u64, oneshot::Receiver<Message>), LinkError> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let mut p = self.lock_pending();
        if self.is_closed() {
            return Err(LinkError::Down);
        }
        p.insert(seq, tx);
        Ok((seq, rx))
    }

    async fn wait(&self, seq: u64, rx: oneshot::Receiver<Message>) -> Result<Message, LinkError> {
        match tokio::time::timeout(self.request_timeout, rx).await {
            Ok(Ok(m)) => Ok(m),
            Ok(Err(_)) => Err(LinkError::Down),
            Err(_) => {
                self.lock_pending().remove(&seq);
                // A peer that accepts frames but never answers is as good as gone: close,
                // so the volume degrades instead of stalling every write.
                self.close();
                Err(LinkError::Timeout(self.request_timeout))
            }
        }
    }

    /// Sends a request and waits for its response.
    pub async fn request(&self, m: &Message) -> Result<Message, LinkError> {
        let (seq, rx) = self.register()?;
        let mut out = Vec::new();
        frame::encode(seq, m, &mut out);
        if let Err(e) = self.push_frame(out.into(), self.alone_in_flight(), false) {
            self.lock_pending().remove(&seq);
            return Err(e);
        }
        self.wait(seq, rx).await
    }

    /// Sends a request already encoded (with any sequence number: it is replaced here, and
    /// the body checksum does not cover it) and waits for its response. Lets the caller
    /// encode a write's payload once and hand its buffer to the local disk at the same time.
    pub async fn request_frame(&self, frame: impl Into<OutFrame>) -> Result<Message, LinkError> {
        self.request_encoded(frame.into(), false).await
    }

    /// [`Link::request_frame`] for a resync chunk: sent after every other queued frame (see
    /// [`Outbox`]).
    pub async fn request_bulk_frame(&self, frame: Vec<u8>) -> Result<Message, LinkError> {
        self.request_encoded(frame.into(), true).await
    }

    async fn request_encoded(&self, mut frame: OutFrame, bulk: bool) -> Result<Message, LinkError> {
        let (seq, rx) = self.register()?;
        if frame.head.len() < HEADER_LEN {
            self.lock_pending().remove(&seq);
            return Err(LinkError::Down);
        }
        frame.head[8..16].copy_from_slice(&seq.to_be_bytes());
        if let Err(e) = self.push_frame(frame, self.alone_in_flight(), bulk) {
            self.lock_pending().remove(&seq);
            return Err(e);
        }
        self.wait(seq, rx).await
    }

    /// Whether the request just registered is the only exchange in progress.
    fn alone_in_flight(&self) -> bool {
        self.answering.load(Ordering::Relaxed) == 0 && self.lock_pending().len() <= 1
    }

    /// Routes a response to its waiter; a response nobody waits for is dropped.
    pub fn deliver(&self, seq: u64, m: Message) {
        if let Some(tx) = self.lock_pending().remove(&seq) {
            let _ = tx.send(m);
        }
    }
}

/// See [`Link::answering`].
pub struct Answering(Arc<Link>);

impl Drop for Answering {
    fn drop(&mut self) {
        // Only the last request of a closed link wakes anyone (`drained`): on an open link
        // this costs one load more than the decrement.
        if self.0.answering.fetch_sub(1, Ordering::SeqCst) == 1 && self.0.is_closed() {
            self.0.drained.notify_waiters();
        }
    }
}

/// Under a steady stream of other frames, one resync chunk leaves after this many of their
/// bytes: a resync keeps moving (a chunk at a time while the application is busy) and a
/// client write waits behind at most one chunk.
const BULK_EVERY_BYTES: usize = 4 << 20;

/// Frames of at most this size are gathered into one write; larger ones go out on their own.
const BATCH_BYTES: usize = 256 * 1024;

/// Writes queued frames to the socket until the link closes or the socket fails.
pub async fn writer_task<W: AsyncWrite + Unpin>(link: Arc<Link>, mut w: W) {
    let mut batch: Vec<u8> = Vec::with_capacity(BATCH_BYTES);
    loop {
        tokio::select! {
            _ = link.queued.notified() => {}
            _ = link.closed() => break,
        }
        // Drain until the queue is empty and everything taken is written; only then may
        // senders write directly again. A write can wait for as long as the peer's kernel
        // keeps its receive window shut (a stopped process): when the link is closed
        // meanwhile (silence), the socket and the frame are let go at once.
        let drained = async {
            loop {
                let next = {
                    let mut outbox = link.lock_outbox();
                    match outbox.pop() {
                        Some(taken) => {
                            outbox.writer_busy = true;
                            Some(taken)
                        }
                        None if batch.is_empty() => {
                            outbox.writer_busy = false;
                            None
                        }
                        None => Some((OutFrame::from(Vec::new()), 0)),
                    }
                };
                let Some((f, already)) = next else { break };
                let (head, tail) = f.rest(already);
                let rest_len = head.len() + tail.len();
                let flush_first = rest_len == 0 || batch.len() + rest_len > BATCH_BYTES;
                if flush_first && !batch.is_empty() {
                    w.write_all(&batch).await?;
                    batch.clear();
                }
                if rest_len >= BATCH_BYTES {
                    // A large frame goes out on its own, without a copy.
                    write_parts(&mut w, head, tail).await?;
                } else {
                    batch.extend_from_slice(head);
                    batch.extend_from_slice(tail);
                }
            }
            w.flush().await
        };
        let written = tokio::select! {
            r = drained => r.is_ok(),
            _ = link.closed() => false,
        };
        if !written {
            break;
        }
    }
    link.close();
    let _ = tokio::time::timeout(Duration::from_secs(1), w.shutdown()).await;
}

/// Writes `head` then `tail` with vectored writes: one segment on the wire where two
/// separate writes would send the small head on its own first.
async fn write_parts<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut head: &[u8],
    mut tail: &[u8],
) -> std::io::Result<()> {
    use std::io::IoSlice;
    // Bounded: every round writes at least one byte or fails.
    while !head.is_empty() || !tail.is_empty() {
        let n = w
            .write_vectored(&[IoSlice::new(head), IoSlice::new(tail)])
            .await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let from_head = n.min(head.len());
        head = &head[from_head..];
        tail = &tail[(n - from_head).min(tail.len())..];
    }
    Ok(())
}

/// Sends a ping every `interval` so the peer's reader sees traffic even when idle.
pub async fn pinger(link: Arc<Link>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => link.send(0, &Message::Ping),
            _ = link.closed() => return,
        }
    }
}

/// Why a reader stopped.
#[derive(Debug)]
pub enum ReadEnd {
    Closed,
    Silent(Duration),
    Error(HandshakeError),
}

impl std::fmt::Display for ReadEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadEnd::Closed => f.write_str("connection closed"),
            ReadEnd::Silent(d) => write!(f, "no frame from the peer for {d:?}"),
            ReadEnd::Error(e) => write!(f, "{e}"),
        }
    }
}

/// Reads frames until the connection ends, delivering responses and passing everything
/// else to `on_request(seq, message)`.
/// Reads the peer's frames until the link ends: answers pings, delivers responses to their
/// requests, and hands each request to `on_request`, whose future is awaited before the next
/// frame is read (that is how a busy receiver slows a sender down: see `Node`'s byte budget).
pub async fn reader_loop<R, F, Fut>(
    link: &Arc<Link>,
    r: R,
    silence: Duration,
    mut on_request: F,
) -> ReadEnd
where
    R: AsyncRead + Unpin,
    F: FnMut(u64, Message) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    // Silence is a peer that sends nothing, not a large frame still arriving: a 32 MiB write
    // takes longer than the default 5 s over a link below ~55 Mbit/s, and the peer's pings
    // queue behind it. So the clock restarts whenever bytes arrive.
    let received = AtomicU64::new(0);
    let mut r = Counted {
        inner: r,
        bytes: &received,
    };
    let tick = (silence / 4).max(Duration::from_millis(10));
    loop {
        let read = read_frame(&mut r);
        tokio::pin!(read);
        let mut seen = received.load(Ordering::Relaxed);
        let mut last_progress = tokio::time::Instant::now();
        let next = loop {
            tokio::select! {
                n = tokio::time::timeout(tick, &mut read) => match n {
                    Ok(n) => break n,
                    Err(_) => {
                        let now = received.load(Ordering::Relaxed);
                        if now != seen {
                            seen = now;
                            last_progress = tokio::time::Instant::now();
                        } else if last_progress.elapsed() >= silence {
                            return ReadEnd::Silent(silence);
                        }
                    }
                },
                _ = link.closed() => return ReadEnd::Closed,
            }
        };
        match next {
            Err(e) => return ReadEnd::Error(e),
            Ok(None) => return ReadEnd::Closed,
            Ok(Some((h, m))) => match m {
                Message::Ping => link.send(h.seq, &Message::Pong),
                // The answer to a ping sent as a request (`Volume::peer_answers`); the
                // keepalive's pings go as sequence 0, whose answers wake nobody.
                Message::Pong if h.seq != 0 => link.deliver(h.seq, m),
                Message::Pong => {}
                m if m.is_response() => link.deliver(h.seq, m),
                m => {
                    tokio::select! {
                        () = on_request(h.seq, m) => {}
                        _ = link.closed() => return ReadEnd::Closed,
                    }
                }
            },
        }
    }
}

/// A reader that counts the bytes read through it (see `reader_loop`).
struct Counted<'a, R> {
    inner: R,
    bytes: &'a AtomicU64,
}

impl<R: AsyncRead + Unpin> AsyncRead for Counted<'_, R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::os::fd::AsFd;

    /// A writer stuck on a peer that stopped reading (its receive window shut) lets go of the
    /// socket as soon as the link is closed.
    #[test]
    fn a_writer_blocked_by_a_peer_that_does_not_read_ends_with_the_link() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let (ours, _theirs_never_read) = tokio::io::duplex(4096);
            let link = Link::new("peer".into(), Duration::from_secs(10), None);
            let writer = tokio::spawn(writer_task(link.clone(), ours));
            link.send(
                1,
                &Message::Write {
                    offset: 0,
                    fua: false,
                    data: vec![1; 1 << 20],
                },
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(!writer.is_finished(), "the write is blocked");
            link.close();
            tokio::time::timeout(Duration::from_secs(2), writer)
                .await
                .expect("the writer ends once the link is closed")
                .expect("writer task");
        });
    }

    /// A large frame arriving slowly (a slow link) is not silence; a peer that stops sending
    /// is, once `silence` has passed without a byte.
    #[test]
    fn silence_is_no_bytes_not_a_slow_frame() {
        use tokio::io::AsyncWriteExt;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let (ours, mut theirs) = tokio::io::duplex(1 << 16);
            let mut frame = Vec::new();
            let m = Message::Write {
                offset: 0,
                fua: false,
                data: vec![0x5a; 256 << 10],
            };
            frame::encode(9, &m, &mut frame);
            let sender = tokio::spawn(async move {
                // 0.9 s for one frame, a piece every 50 ms, with a silence of 0.3 s.
                for piece in frame.chunks(frame.len().div_ceil(18)) {
                    theirs.write_all(piece).await.expect("send");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                // Then nothing, with the stream still open.
                tokio::time::sleep(Duration::from_secs(5)).await;
                drop(theirs);
            });
            let link = Link::new("peer".into(), Duration::from_secs(10), None);
            let mut got = Vec::new();
            let started = std::time::Instant::now();
            let end = reader_loop(&link, ours, Duration::from_millis(300), |seq, m| {
                got.push((seq, m));
                std::future::ready(())
            })
            .await;
            assert!(matches!(end, ReadEnd::Silent(_)), "{end}");
            assert_eq!(got.len(), 1, "the slow frame arrived whole");
            assert_eq!(got[0].0, 9);
            let took = started.elapsed();
            assert!(
                took < Duration::from_secs(3),
                "silence noticed {took:?} after the start"
            );
            sender.abort();
        });
    }

    /// Before authentication, a header announcing a full-size body is refused at once: the
    /// body is neither awaited nor allocated.
    #[test]
    fn an_oversized_frame_is_refused_before_authentication() {
        use tokio::io::AsyncWriteExt;
        handshake_runtime().block_on(async {
            let (mut ours, mut theirs) = tokio::io::duplex(1 << 16);
            let mut hello = Vec::new();
            frame::encode(
                1,
                &Message::Hello {
                    min_version: frame::MIN_VERSION,
                    max_version: frame::VERSION,
                    node: "intruder".into(),
                    volume: "disk0".into(),
                    nonce: [7; 32],
                },
                &mut hello,
            );
            hello[16..20].copy_from_slice(&(32u32 << 20).to_be_bytes());
            theirs
                .write_all(&hello[..HEADER_LEN])
                .await
                .expect("header");
            let key = crate::repl::auth::AuthKey::from_secret("a secret of the pair, long enough");
            let r = tokio::time::timeout(
                Duration::from_secs(5),
                accept_handshake(&mut ours, &key, "node-b", |_| true),
            )
            .await
            .expect("refused without waiting for the body");
            assert!(
                matches!(r, Err(HandshakeError::TooLarge(n)) if n == 32 << 20),
                "{:?}",
                r.err()
            );
        });
    }

    fn handshake_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    /// Sends `hello` (with `trailer` appended to its body, as a later version may) to an
    /// acceptor and returns what the acceptor decided and the first frame it answered.
    async fn offer_versions(
        min_version: u16,
        max_version: u16,
        trailer: &[u8],
    ) -> (
        Result<Accepted, HandshakeError>,
        Result<Message, HandshakeError>,
    ) {
        use tokio::io::AsyncWriteExt;
        let (mut ours, mut theirs) = tokio::io::duplex(1 << 16);
        let mut hello = Vec::new();
        frame::encode(
            0,
            &Message::Hello {
                min_version,
                max_version,
                node: "node-a".into(),
                volume: "disk0".into(),
                nonce: [7; 32],
            },
            &mut hello,
        );
        let mut body = hello.split_off(HEADER_LEN);
        body.extend_from_slice(trailer);
        hello[16..20].copy_from_slice(&(body.len() as u32).to_be_bytes());
        hello[20..24].copy_from_slice(&crc32fast::hash(&body).to_be_bytes());
        hello.extend_from_slice(&body);
        theirs.write_all(&hello).await.expect("hello");
        let key = crate::repl::auth::AuthKey::from_secret("a secret of the pair, long enough");
        // The dialer's end reads the first answer and hangs up: an acceptor that answered
        // with a reply then ends waiting for a proof.
        let dialer = async move {
            let answer = expect(&mut theirs).await;
            drop(theirs);
            answer
        };
        tokio::time::timeout(Duration::from_secs(5), async {
            tokio::join!(
                accept_handshake(&mut ours, &key, "node-b", |_| true),
                dialer
            )
        })
        .await
        .expect("the acceptor answers at once")
    }

    #[test]
    fn both_sides_agree_on_the_newest_version_they_share() {
        handshake_runtime().block_on(async {
            let (mut a, mut b) = tokio::io::duplex(1 << 16);
            let key = crate::repl::auth::AuthKey::from_secret("a secret of the pair, long enough");
            let (dialed, accepted) = tokio::join!(
                dial_handshake(&mut a, &key, "node-a", "disk0"),
                accept_handshake(&mut b, &key, "node-b", |v| v == "disk0"),
            );
            let dialed = dialed.expect("dialer authenticated");
            let accepted = accepted.expect("acceptor authenticated");
            assert_eq!(dialed.peer_node, "node-b");
            assert_eq!(accepted.peer.peer_node, "node-a");
            assert_eq!(accepted.volume, "disk0");
            assert_eq!((dialed.version, accepted.peer.version), (VERSION, VERSION));
        });
    }

    /// A node of a later release (versions up to 9, and more fields in its Hello) is answered
    /// in the newest version this one speaks: a rolling upgrade keeps the pair replicating.
    #[test]
    fn a_newer_peer_is_answered_in_our_newest_version() {
        handshake_runtime().block_on(async {
            let (_, answer) = offer_versions(MIN_VERSION, 9, b"a later field").await;
            let answer = answer.expect("a reply");
            let Message::HelloReply { version, node, .. } = answer else {
                panic!("expected a HelloReply, got {answer:?}");
            };
            assert_eq!((version, node.as_str()), (VERSION, "node-b"));
        });
    }

    #[test]
    fn a_peer_without_a_common_version_is_told_both_ranges() {
        handshake_runtime().block_on(async {
            let (r, answer) = offer_versions(VERSION + 1, VERSION + 3, b"").await;
            assert!(
                matches!(&r, Err(HandshakeError::NoCommonVersion { peer, peer_versions })
                    if peer == "node-a" && *peer_versions == (VERSION + 1, VERSION + 3)),
                "{:?}",
                r.err()
            );
            let Err(HandshakeError::Refused(message)) = answer else {
                panic!("expected a refusal, got {answer:?}");
            };
            let expected = format!(
                "node-a speaks versions {}-{}, this node {MIN_VERSION}-{VERSION}; upgrade the older node",
                VERSION + 1,
                VERSION + 3
            );
            assert!(message.contains(&expected), "{message}");
        });
    }

    #[test]
    fn a_split_frame_resumes_at_any_byte() {
        let f = OutFrame::split(vec![1, 2, 3], Arc::new(vec![4, 5]));
        assert_eq!(f.len(), 5);
        let whole = [1u8, 2, 3, 4, 5];
        for sent in 0..=6 {
            let (head, tail) = f.rest(sent);
            let rest: Vec<u8> = head.iter().chain(tail).copied().collect();
            assert_eq!(rest, whole[sent.min(5)..], "after {sent} bytes");
        }
        let plain = OutFrame::from(vec![7, 8]);
        assert_eq!(plain.rest(1), (&[8u8][..], &[][..]));
    }

    /// Answers go straight to the socket only while one request is being answered; with a
    /// burst of requests counted from their arrival, they wait for the writer task, which
    /// sends them in one write.
    #[test]
    fn answers_to_a_burst_queue_for_one_write() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let sender =
            std::net::TcpStream::connect(listener.local_addr().expect("address")).expect("connect");
        let (_receiver, _) = listener.accept().expect("accept");
        sender.set_nonblocking(true).expect("non-blocking");
        let link = Link::new("peer".into(), Duration::from_secs(10), Some(sender));

        let alone = link.answering().expect("open link");
        link.send(1, &Message::Ack { errno: 0 });
        assert_eq!(link.lock_outbox().queue.len(), 0, "alone: written directly");
        drop(alone);

        let burst: Vec<Answering> = (0..3)
            .map(|_| link.answering().expect("open link"))
            .collect();
        for (seq, guard) in (2..).zip(burst) {
            link.send(seq, &Message::Ack { errno: 0 });
            drop(guard);
        }
        assert_eq!(
            link.lock_outbox().queue.len(),
            3,
            "every answer of the burst waits for the writer task, the last one too"
        );
    }

    /// Resync chunks queued before a client write leave after it: a write does not wait for
    /// a resync's window to cross the link. Each queue keeps its own order.
    #[test]
    fn a_write_overtakes_queued_resync_chunks() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let link = Link::new("peer".into(), Duration::from_secs(10), None);
            let chunk = |offset: u64| {
                let m = Message::ResyncData {
                    offset,
                    raw_len: 4096,
                    compressed: false,
                    raw_crc: 0,
                    payload: vec![7; 4096],
                };
                let mut out = Vec::new();
                frame::encode(0, &m, &mut out);
                out
            };
            let chunks: Vec<_> = [0u64, 4096, 8192]
                .into_iter()
                .map(|offset| {
                    let link = link.clone();
                    let frame = chunk(offset);
                    tokio::spawn(async move { link.request_bulk_frame(frame).await })
                })
                .collect();
            tokio::task::yield_now().await;
            let queued = |o: &Outbox| o.queue.len() + o.bulk.len();
            assert_eq!(queued(&link.lock_outbox()), 3, "the chunks wait");
            let mut write = Vec::new();
            frame::encode(
                0,
                &Message::Write {
                    offset: 1 << 20,
                    fua: false,
                    data: vec![1; 512],
                },
                &mut write,
            );
            let write = {
                let link = link.clone();
                tokio::spawn(async move { link.request_frame(write).await })
            };
            tokio::task::yield_now().await;

            let (ours, mut theirs) = tokio::io::duplex(1 << 20);
            let writer = tokio::spawn(writer_task(link.clone(), ours));
            let mut order = Vec::new();
            for _ in 0..4 {
                let read = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut theirs));
                match read.await.expect("a frame within 5 s") {
                    Ok(Some((_, Message::Write { offset, .. }))) => order.push(("write", offset)),
                    Ok(Some((_, Message::ResyncData { offset, .. }))) => {
                        order.push(("chunk", offset))
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            assert_eq!(
                order,
                [
                    ("write", 1 << 20),
                    ("chunk", 0),
                    ("chunk", 4096),
                    ("chunk", 8192)
                ]
            );
            link.close();
            let _ = writer.await;
            for t in chunks {
                assert!(t.await.expect("task").is_err(), "closed before an answer");
            }
            assert!(write.await.expect("task").is_err());
        });
    }

    /// A client that always has frames queued does not starve a resync: a chunk leaves after
    /// every `BULK_EVERY_BYTES` of other frames (else it timed out and dropped the link).
    #[test]
    fn a_steady_stream_of_writes_lets_a_chunk_through() {
        let link = Link::new("peer".into(), Duration::from_secs(10), None);
        let mut outbox = link.lock_outbox();
        outbox
            .push(OutFrame::from(vec![0xbb; 1 << 20]), false, true)
            .expect("open");
        let mut popped = Vec::new();
        for _ in 0..16 {
            // The client refills the queue as fast as the writer empties it.
            while outbox.queue.len() < 4 {
                outbox
                    .push(OutFrame::from(vec![0xaa; 1 << 20]), false, false)
                    .expect("open");
            }
            let (f, _) = outbox.pop().expect("a frame");
            popped.push(f.head[0]);
        }
        let at = popped.iter().position(|&b| b == 0xbb);
        assert!(
            at.is_some_and(|i| i <= BULK_EVERY_BYTES / (1 << 20)),
            "the chunk left at {at:?}: {popped:x?}"
        );
    }

    /// A closed link takes no new request from the peer, and is drained once the requests
    /// it started have ended: what a newer link of the volume waits for (`Volume::link_up`).
    #[test]
    fn a_closed_link_takes_no_request_and_drains_with_its_last_one() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let link = Link::new("peer".into(), Duration::from_secs(10), None);
            let first = link.answering().expect("an open link takes requests");
            let second = link.answering().expect("an open link takes requests");
            assert!(!link.is_drained(), "open");
            link.close();
            assert!(link.answering().is_none(), "a closed link takes none");
            assert_eq!(
                link.requests_in_service(),
                2,
                "the refused one is not counted"
            );
            let waiter = tokio::spawn({
                let link = link.clone();
                async move { link.drained().await }
            });
            drop(first);
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(!waiter.is_finished(), "a request is still in service");
            drop(second);
            tokio::time::timeout(Duration::from_secs(2), waiter)
                .await
                .expect("drained once the last request ended")
                .expect("waiter task");
            assert!(link.is_drained());
            // Closed with nothing in service: drained at once.
            let idle = Link::new("peer".into(), Duration::from_secs(10), None);
            idle.close();
            tokio::time::timeout(Duration::from_secs(2), idle.drained())
                .await
                .expect("drained at once");
        });
    }

    /// A frame that the socket took only in part stays first: a later sender must queue
    /// behind it even when the socket has room again (writing directly would splice its
    /// frame into the middle of the first one).
    #[test]
    fn a_partly_written_frame_keeps_its_place() {
        use std::io::Read;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let sender =
            std::net::TcpStream::connect(listener.local_addr().expect("address")).expect("connect");
        let (mut receiver, _) = listener.accept().expect("accept");
        sender.set_nonblocking(true).expect("non-blocking");
        receiver
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("read timeout");
        let direct = sender.try_clone().expect("dup");
        let link = Link::new("peer".into(), Duration::from_secs(10), Some(direct));

        let big = Message::ResyncData {
            offset: 0,
            raw_len: 64 << 20,
            compressed: false,
            raw_crc: 0,
            payload: vec![0xab; 64 << 20],
        };
        link.send(1, &big);
        let head_sent = link.lock_outbox().head_sent;
        assert!(head_sent > 0, "the socket took part of the frame");
        assert_eq!(link.lock_outbox().queue.len(), 1);
        // Drain what the socket took, so it has room again.
        let mut got = vec![0u8; head_sent];
        receiver
            .read_exact(&mut got)
            .expect("the part that was sent");
        link.send(2, &Message::Ack { errno: 0 });
        assert_eq!(
            link.lock_outbox().queue.len(),
            2,
            "queued behind the big frame"
        );
        let mut more = [0u8; 1];
        assert!(
            receiver.read(&mut more).is_err(),
            "nothing may be written while a frame is half sent"
        );

        // The writer task finishes the first frame, then sends the second.
        // Worker threads drive the writer while this thread waits for the reader.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let _guard = rt.enter();
        let writer_socket = tokio::net::TcpStream::from_std(sender).expect("tokio socket");
        let writer = rt.spawn(writer_task(link.clone(), writer_socket));
        let mut expected = Vec::new();
        frame::encode(1, &big, &mut expected);
        frame::encode(2, &Message::Ack { errno: 0 }, &mut expected);
        let want = expected.len() - got.len();
        let reader = std::thread::spawn(move || {
            receiver
                .set_read_timeout(Some(Duration::from_secs(20)))
                .expect("read timeout");
            let mut rest = Vec::new();
            let mut buf = vec![0u8; 1 << 20];
            // Bounded by the read timeout and the expected size.
            while rest.len() < want {
                match receiver.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => rest.extend_from_slice(&buf[..n]),
                }
            }
            (got, rest)
        });
        let (got, rest) = reader.join().expect("reader");
        let mut wire = got;
        wire.extend_from_slice(&rest);
        assert_eq!(wire.len(), expected.len());
        assert!(wire == expected, "frames arrived whole and in order");
        link.close();
        let _ = rt.block_on(writer);
    }

    /// Senders on several threads, small, large and split (head + shared data) frames, a
    /// reader slow enough to fill the socket: every frame arrives whole, exactly once, and in
    /// each sender's order, whether it went out directly or through the writer task.
    #[test]
    fn frames_from_many_threads_arrive_whole_and_in_order() {
        const THREADS: u32 = 4;
        const FRAMES: u32 = 1000;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind loopback");
            let addr = listener.local_addr().expect("address");
            let (client, server) =
                tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
            let client = client.expect("connect");
            let (server, _) = server.expect("accept");
            let direct =
                std::net::TcpStream::from(server.as_fd().try_clone_to_owned().expect("dup"));
            let (_server_rd, server_wr) = server.into_split();
            let link = Link::new("peer".into(), Duration::from_secs(10), Some(direct));
            let writer = tokio::spawn(writer_task(link.clone(), server_wr));

            let senders: Vec<_> = (0..THREADS)
                .map(|t| {
                    let link = link.clone();
                    std::thread::spawn(move || {
                        for i in 0..FRAMES {
                            let id = t << 24 | i;
                            if i % 20 == 7 {
                                // Large enough to fill the socket and split a write.
                                link.send(
                                    u64::from(id),
                                    &Message::ResyncData {
                                        offset: u64::from(id),
                                        raw_len: 300_000,
                                        compressed: false,
                                        raw_crc: 0,
                                        payload: vec![t as u8; 300_000],
                                    },
                                );
                            } else if i % 20 == 13 {
                                // A mirrored write: head and shared data, large enough to
                                // stop short in either part.
                                let data = Arc::new(vec![t as u8 ^ 0x5a; 200_000 + i as usize]);
                                let head = frame::encode_write_head(
                                    u64::from(id),
                                    u64::from(id),
                                    false,
                                    &data,
                                );
                                let _ = link.push_frame(
                                    OutFrame::split(head, data),
                                    i % 40 == 13,
                                    false,
                                );
                            } else {
                                link.send(u64::from(id), &Message::Ack { errno: id });
                            }
                        }
                    })
                })
                .collect();

            let mut rd = tokio::io::BufReader::new(client);
            let mut next: HashMap<u32, u32> = HashMap::new();
            let mut received = 0;
            // A slow reader at first, so the socket fills, direct writes stop short and
            // frames queue up behind them.
            tokio::time::sleep(Duration::from_millis(300)).await;
            while received < THREADS * FRAMES {
                if received % 100 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let (h, m) = tokio::time::timeout(Duration::from_secs(20), read_frame(&mut rd))
                    .await
                    .expect("frames keep coming")
                    .expect("a valid frame")
                    .expect("not the end of the stream");
                let id = h.seq as u32;
                let (t, i) = (id >> 24, id & 0xff_ffff);
                match m {
                    Message::Ack { errno } => assert_eq!(errno, id),
                    Message::ResyncData {
                        offset, payload, ..
                    } => {
                        assert_eq!(offset, u64::from(id));
                        assert!(payload.iter().all(|&b| b == t as u8));
                    }
                    Message::Write { offset, data, .. } => {
                        assert_eq!(offset, u64::from(id));
                        assert_eq!(data.len(), 200_000 + i as usize);
                        assert!(data.iter().all(|&b| b == t as u8 ^ 0x5a));
                    }
                    other => panic!("unexpected frame {other:?}"),
                }
                let expected = next.entry(t).or_insert(0);
                assert_eq!(i, *expected, "sender {t}: frames out of order");
                *expected += 1;
                received += 1;
            }
            for s in senders {
                s.join().expect("sender thread");
            }
            link.close();
            let _ = writer.await;
            // Closed: a late sender is refused, never written.
            assert!(matches!(
                link.request(&Message::Flush).await,
                Err(LinkError::Down)
            ));
        });
    }
}
