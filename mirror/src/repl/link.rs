//! One authenticated replication connection for one volume: requests with sequence numbers
//! and their responses, a writer task that batches small frames into few syscalls, a reader
//! that routes responses to their waiters and hands requests to the volume, and liveness
//! (pings; silence longer than the peer timeout closes the link).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Notify};

use super::auth::{self, AuthKey, Transcript};
use super::frame::{self, FrameError, FrameHeader, Message, HEADER_LEN, VERSION};

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
    #[error("unexpected frame during the handshake")]
    Unexpected,
    #[error("protocol version {0} is not supported (this node speaks {VERSION})")]
    Version(u16),
    #[error("authentication failed: the peer does not know the shared secret")]
    BadProof,
    #[error("the peer refused: {0}")]
    Refused(String),
    #[error("no volume named {0:?} on this node")]
    UnknownVolume(String),
    #[error("the peer calls itself {0:?}, the same name as this node")]
    SameName(String),
}

/// Reads one frame (header and body). Returns `Ok(None)` on a clean end of stream before a
/// header.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<(FrameHeader, Message)>, HandshakeError> {
    let mut hb = [0u8; HEADER_LEN];
    match r.read_exact(&mut hb).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let h = frame::decode_header(&hb)?;
    let mut body = vec![0u8; h.length as usize];
    r.read_exact(&mut body).await?;
    let m = frame::decode_body(&h, body)?;
    Ok(Some((h, m)))
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
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(r)).await {
        Err(_) => Err(HandshakeError::Timeout),
        Ok(Err(e)) => Err(e),
        Ok(Ok(None)) => Err(HandshakeError::Io(std::io::ErrorKind::UnexpectedEof.into())),
        Ok(Ok(Some((_, Message::Error { message })))) => Err(HandshakeError::Refused(message)),
        Ok(Ok(Some((_, m)))) => Ok(m),
    }
}

/// The dialer's side: returns the peer's node name once both sides proved the secret.
pub async fn dial_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    key: &AuthKey,
    node: &str,
    volume: &str,
) -> Result<String, HandshakeError> {
    let my_nonce = auth::nonce();
    let hello = Message::Hello {
        version: VERSION,
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
    if version != VERSION {
        return Err(HandshakeError::Version(version));
    }
    let t = Transcript {
        dialer_node: node,
        acceptor_node: &peer,
        volume,
        dialer_nonce: &my_nonce,
        acceptor_nonce: &nonce,
    };
    if !auth::verify(key, auth::Side::Acceptor, &t, &proof) {
        return Err(HandshakeError::BadProof);
    }
    let mine = auth::proof(key, auth::Side::Dialer, &t);
    write_message(s, 0, &Message::HelloProof { proof: mine }).await?;
    Ok(peer)
}

/// What an accepted connection turned out to be.
pub struct Accepted {
    pub volume: String,
    pub peer_node: String,
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
        version,
        node: peer,
        volume,
        nonce: their_nonce,
    } = expect(s).await?
    else {
        return Err(HandshakeError::Unexpected);
    };
    if version != VERSION {
        return Err(HandshakeError::Version(version));
    }
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
    };
    let reply = Message::HelloReply {
        version: VERSION,
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
        peer_node: peer,
    })
}

/// The sending side of a live connection, shared by everyone who talks to the peer.
pub struct Link {
    pub peer_node: String,
    out: mpsc::UnboundedSender<Vec<u8>>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Message>>>,
    next_seq: AtomicU64,
    closed: AtomicBool,
    closed_notify: Notify,
    request_timeout: Duration,
}

impl Link {
    pub fn new(
        peer_node: String,
        request_timeout: Duration,
    ) -> (Arc<Link>, mpsc::UnboundedReceiver<Vec<u8>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Arc::new(Link {
                peer_node,
                out: tx,
                pending: Mutex::new(HashMap::new()),
                next_seq: AtomicU64::new(1),
                closed: AtomicBool::new(false),
                closed_notify: Notify::new(),
                request_timeout,
            }),
            rx,
        )
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<Message>>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Closes the link: every waiting request fails with [`LinkError::Down`], the writer
    /// stops, and the connection task ends.
    pub fn close(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            self.lock_pending().clear();
            self.closed_notify.notify_waiters();
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
        let _ = self.out.send(out);
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
        self.send(seq, m);
        self.wait(seq, rx).await
    }

    /// Sends a request already encoded (with any sequence number: it is replaced here, and
    /// the body checksum does not cover it) and waits for its response. Lets the caller
    /// encode a write's payload once and hand its buffer to the local disk at the same time.
    pub async fn request_frame(&self, mut frame: Vec<u8>) -> Result<Message, LinkError> {
        let (seq, rx) = self.register()?;
        if frame.len() < HEADER_LEN {
            return Err(LinkError::Down);
        }
        frame[8..16].copy_from_slice(&seq.to_be_bytes());
        if self.out.send(frame).is_err() {
            self.lock_pending().remove(&seq);
            return Err(LinkError::Down);
        }
        self.wait(seq, rx).await
    }

    /// Routes a response to its waiter; a response nobody waits for is dropped.
    pub fn deliver(&self, seq: u64, m: Message) {
        if let Some(tx) = self.lock_pending().remove(&seq) {
            let _ = tx.send(m);
        }
    }
}

/// Frames of at most this size are gathered into one write; larger ones go out on their own.
const BATCH_BYTES: usize = 256 * 1024;

/// Writes queued frames to the socket until the link closes or the socket fails.
pub async fn writer_task<W: AsyncWrite + Unpin>(
    link: Arc<Link>,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    mut w: W,
) {
    let mut batch: Vec<u8> = Vec::with_capacity(BATCH_BYTES);
    loop {
        let first = tokio::select! {
            f = rx.recv() => f,
            _ = link.closed() => None,
        };
        let Some(first) = first else { break };
        let mut pending = Some(first);
        let mut ok = true;
        while let Some(f) = pending.take() {
            if f.len() >= BATCH_BYTES {
                if !batch.is_empty() {
                    ok &= w.write_all(&batch).await.is_ok();
                    batch.clear();
                }
                ok &= w.write_all(&f).await.is_ok();
            } else {
                batch.extend_from_slice(&f);
                if batch.len() >= BATCH_BYTES {
                    ok &= w.write_all(&batch).await.is_ok();
                    batch.clear();
                }
            }
            if !ok {
                break;
            }
            pending = rx.try_recv().ok();
        }
        if ok && !batch.is_empty() {
            ok &= w.write_all(&batch).await.is_ok();
            batch.clear();
        }
        if ok {
            ok = w.flush().await.is_ok();
        }
        if !ok {
            break;
        }
    }
    link.close();
    let _ = w.shutdown().await;
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
pub async fn reader_loop<R: AsyncRead + Unpin>(
    link: &Arc<Link>,
    mut r: R,
    silence: Duration,
    mut on_request: impl FnMut(u64, Message),
) -> ReadEnd {
    loop {
        let next = tokio::select! {
            n = tokio::time::timeout(silence, read_frame(&mut r)) => n,
            _ = link.closed() => return ReadEnd::Closed,
        };
        match next {
            Err(_) => return ReadEnd::Silent(silence),
            Ok(Err(e)) => return ReadEnd::Error(e),
            Ok(Ok(None)) => return ReadEnd::Closed,
            Ok(Ok(Some((h, m)))) => match m {
                Message::Ping => link.send(h.seq, &Message::Pong),
                Message::Pong => {}
                m if m.is_response() => link.deliver(h.seq, m),
                m => on_request(h.seq, m),
            },
        }
    }
}
