//! A raw-socket NBD client for protocol-level tests. Requests are encoded with the server
//! crate's encoder (it is trivially checked against the spec's layout in the tests), but
//! every reply is decoded here by hand from bytes, so the tests do not trust the codec under
//! test.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use nbd_server::proto::*;
use nbd_server::request::{encode_header, RequestHeader};

/// Socket read/write timeout: a silent server fails the test instead of hanging it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn set_timeouts(&self, t: Option<Duration>) {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(t).unwrap();
                s.set_write_timeout(t).unwrap();
            }
            Stream::Unix(s) => {
                s.set_read_timeout(t).unwrap();
                s.set_write_timeout(t).unwrap();
            }
        }
    }

    pub fn try_clone(&self) -> Stream {
        match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone().unwrap()),
            Stream::Unix(s) => Stream::Unix(s.try_clone().unwrap()),
        }
    }

    pub fn shutdown_write(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Write),
            Stream::Unix(s) => s.shutdown(Shutdown::Write),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Which reply format was negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No structured replies: what the Linux kernel client uses.
    Simple,
    Structured,
    Extended,
}

/// One option reply of the handshake.
#[derive(Debug, Clone)]
pub struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

/// A complete transmission reply (all chunks up to DONE), decoded by hand.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    pub cookie: u64,
    /// 0 on success, else the NBD error value.
    pub error: u32,
    pub message: String,
    /// READ data, assembled from OFFSET_DATA / OFFSET_HOLE chunks (or the simple reply).
    pub data: Vec<u8>,
    /// Block-status chunks: (context id, [(length, flags)]).
    pub extents: Vec<(u32, Vec<(u64, u64)>)>,
    pub chunk_types: Vec<u16>,
    /// Magic of every message of this reply.
    pub magics: Vec<u32>,
    /// The offset field of every extended reply chunk.
    pub echoed_offsets: Vec<u64>,
    /// Bytes of READ data received (to detect short replies).
    pub data_covered: u64,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    kind: u16,
    offset: u64,
    length: u64,
}

pub struct RawClient {
    pub s: Stream,
    pub mode: Mode,
    /// Export size and transmission flags after a successful GO / EXPORT_NAME.
    pub size: u64,
    pub tflags: u16,
    pending: HashMap<u64, Pending>,
    partial: HashMap<u64, Reply>,
    next_cookie: u64,
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// Is this error what a closed connection looks like?
pub fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

impl RawClient {
    pub fn new(s: Stream) -> RawClient {
        s.set_timeouts(Some(IO_TIMEOUT));
        RawClient {
            s,
            mode: Mode::Simple,
            size: 0,
            tflags: 0,
            pending: HashMap::new(),
            partial: HashMap::new(),
            next_cookie: 0xC0DE_0000_0000_0001,
        }
    }

    pub fn connect_unix(path: &Path) -> RawClient {
        let s = UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()));
        RawClient::new(Stream::Unix(s))
    }

    pub fn from_tcp(s: TcpStream) -> RawClient {
        s.set_nodelay(true).unwrap();
        RawClient::new(Stream::Tcp(s))
    }

    pub fn set_timeout(&self, t: Duration) {
        self.s.set_timeouts(Some(t));
    }

    // ---- bytes ----

    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.s.write_all(bytes)
    }

    pub fn recv(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b)?;
        Ok(b)
    }

    /// Waits until the server closes the connection. Returns false if it sent more data
    /// instead (the data is discarded) or kept it open past `timeout`.
    pub fn server_closed_within(&mut self, timeout: Duration) -> bool {
        self.s.set_timeouts(Some(timeout));
        let mut buf = [0u8; 4096];
        let r = match self.s.read(&mut buf) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => is_disconnect(&e),
        };
        self.s.set_timeouts(Some(IO_TIMEOUT));
        r
    }

    /// Makes the next close send a TCP RST (SO_LINGER 0). No-op on unix sockets.
    pub fn set_reset_on_close(&self) {
        if let Stream::Tcp(s) = &self.s {
            let l = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::Linger, &l)
                .expect("SO_LINGER");
        }
    }

    // ---- handshake ----

    /// Reads the 18-byte greeting and returns the handshake flags.
    pub fn read_greeting(&mut self) -> io::Result<u16> {
        let b = self.recv(18)?;
        assert_eq!(be64(&b[0..8]), 0x4e42_444d_4147_4943, "greeting NBDMAGIC");
        assert_eq!(be64(&b[8..16]), 0x4948_4156_454f_5054, "greeting IHAVEOPT");
        Ok(be16(&b[16..18]))
    }

    pub fn send_client_flags(&mut self, flags: u32) -> io::Result<()> {
        self.send(&flags.to_be_bytes())
    }

    /// Greeting, then client flags FIXED_NEWSTYLE | NO_ZEROES.
    pub fn start(&mut self) {
        let f = self.read_greeting().expect("greeting");
        assert_eq!(
            f & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES),
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
            "server handshake flags {f:#x}"
        );
        self.send_client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
            .expect("client flags");
    }

    pub fn send_option(&mut self, option: u32, data: &[u8]) -> io::Result<()> {
        let mut b = Vec::with_capacity(16 + data.len());
        b.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b)
    }

    pub fn read_opt_reply(&mut self) -> io::Result<OptReply> {
        let h = self.recv(20)?;
        assert_eq!(be64(&h[0..8]), 0x0003_e889_0455_65a9, "option reply magic");
        let len = be32(&h[16..20]);
        assert!(len <= 16 << 20, "option reply of {len} bytes");
        let data = self.recv(len as usize)?;
        Ok(OptReply {
            option: be32(&h[8..12]),
            kind: be32(&h[12..16]),
            data,
        })
    }

    /// Sends an option without data and returns its single reply.
    pub fn option_simple(&mut self, option: u32) -> OptReply {
        self.send_option(option, &[]).expect("send option");
        let r = self.read_opt_reply().expect("option reply");
        assert_eq!(r.option, option, "reply names the option");
        r
    }

    fn go_data(name: &str, info_requests: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(info_requests.len() as u16).to_be_bytes());
        for r in info_requests {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    /// NBD_OPT_INFO or NBD_OPT_GO. Ok((size, transmission flags, infos)) on ACK, Err(reply)
    /// on an error reply.
    pub fn info_or_go(
        &mut self,
        option: u32,
        name: &str,
        info_requests: &[u16],
    ) -> Result<(u64, u16, Vec<Vec<u8>>), OptReply> {
        self.send_option(option, &Self::go_data(name, info_requests))
            .expect("send GO");
        let mut export = None;
        let mut infos = Vec::new();
        for _ in 0..64 {
            let r = self.read_opt_reply().expect("GO reply");
            assert_eq!(r.option, option);
            match r.kind {
                REP_INFO => {
                    assert!(r.data.len() >= 2, "short NBD_REP_INFO");
                    if be16(&r.data) == INFO_EXPORT {
                        assert_eq!(r.data.len(), 12, "NBD_INFO_EXPORT length");
                        export = Some((be64(&r.data[2..10]), be16(&r.data[10..12])));
                    }
                    infos.push(r.data);
                }
                REP_ACK => {
                    let (size, flags) = export.expect("ACK without NBD_INFO_EXPORT");
                    return Ok((size, flags, infos));
                }
                k if k & (1 << 31) != 0 => return Err(r),
                k => panic!("unexpected reply type {k:#x} to GO/INFO"),
            }
        }
        panic!("more than 64 replies to GO");
    }

    /// NBD_OPT_GO; panics on error. Enters transmission.
    pub fn go(&mut self, name: &str) {
        let (size, flags, _) = self
            .info_or_go(OPT_GO, name, &[])
            .unwrap_or_else(|r| panic!("GO {name:?} refused: {r:?}"));
        self.size = size;
        self.tflags = flags;
    }

    /// SET_META_CONTEXT (or LIST); returns the (id, name) pairs.
    pub fn meta_context(
        &mut self,
        option: u32,
        name: &str,
        queries: &[&str],
    ) -> Result<Vec<(u32, String)>, OptReply> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        self.send_option(option, &d).expect("send meta context");
        let mut out = Vec::new();
        for _ in 0..64 {
            let r = self.read_opt_reply().expect("meta context reply");
            match r.kind {
                REP_META_CONTEXT => {
                    out.push((be32(&r.data), String::from_utf8_lossy(&r.data[4..]).into()));
                }
                REP_ACK => return Ok(out),
                _ => return Err(r),
            }
        }
        panic!("more than 64 meta context replies");
    }

    /// Full handshake: greeting, flags, the reply-format option, optionally
    /// SET_META_CONTEXT base:allocation, then GO for `name`. Returns the context id.
    pub fn negotiate(&mut self, mode: Mode, base_allocation: bool, name: &str) -> Option<u32> {
        self.start();
        match mode {
            Mode::Simple => {}
            Mode::Structured => {
                let r = self.option_simple(OPT_STRUCTURED_REPLY);
                assert_eq!(r.kind, REP_ACK, "STRUCTURED_REPLY: {r:?}");
            }
            Mode::Extended => {
                let r = self.option_simple(OPT_EXTENDED_HEADERS);
                assert_eq!(r.kind, REP_ACK, "EXTENDED_HEADERS: {r:?}");
            }
        }
        let mut id = None;
        if base_allocation {
            let ctxs = self
                .meta_context(OPT_SET_META_CONTEXT, name, &[BASE_ALLOCATION])
                .expect("SET_META_CONTEXT refused");
            assert_eq!(ctxs.len(), 1, "one context selected: {ctxs:?}");
            assert_eq!(ctxs[0].1, BASE_ALLOCATION);
            id = Some(ctxs[0].0);
        }
        self.go(name);
        self.mode = mode;
        id
    }

    /// Connects to a unix socket and negotiates (structured replies, no meta context).
    pub fn open_unix(path: &Path, mode: Mode) -> RawClient {
        let mut c = RawClient::connect_unix(path);
        c.negotiate(mode, false, "");
        c
    }

    // ---- transmission ----

    pub fn next_cookie(&mut self) -> u64 {
        self.next_cookie = self.next_cookie.wrapping_add(0x1_0000_0003);
        self.next_cookie
    }

    /// Encodes a request (extended or compact, per the negotiated mode) into `out` and
    /// remembers it so its reply can be decoded.
    #[allow(clippy::too_many_arguments)] // one argument per header field, as in the spec
    pub fn encode_request(
        &mut self,
        out: &mut Vec<u8>,
        flags: u16,
        kind: u16,
        cookie: u64,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) {
        let h = RequestHeader {
            flags,
            kind,
            cookie,
            offset,
            length,
        };
        encode_header(&h, self.mode == Mode::Extended, out);
        out.extend_from_slice(payload);
        let old = self.pending.insert(
            cookie,
            Pending {
                kind,
                offset,
                length,
            },
        );
        assert!(old.is_none(), "cookie {cookie:#x} reused while in flight");
    }

    pub fn send_request(
        &mut self,
        flags: u16,
        kind: u16,
        cookie: u64,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> io::Result<()> {
        let mut b = Vec::with_capacity(32 + payload.len());
        self.encode_request(&mut b, flags, kind, cookie, offset, length, payload);
        self.send(&b)
    }

    /// Sends one request and waits for its reply (no other request may be in flight).
    pub fn request(
        &mut self,
        flags: u16,
        kind: u16,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> Reply {
        let cookie = self.next_cookie();
        self.send_request(flags, kind, cookie, offset, length, payload)
            .expect("send request");
        let r = self.read_reply().expect("read reply");
        assert_eq!(r.cookie, cookie, "reply cookie");
        r
    }

    /// WRITE (with PAYLOAD_LEN in extended mode); returns the error value.
    pub fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> u32 {
        let flags = if self.mode == Mode::Extended {
            flags | CMD_FLAG_PAYLOAD_LEN
        } else {
            flags
        };
        self.request(flags, CMD_WRITE, offset, data.len() as u64, data)
            .error
    }

    pub fn read(&mut self, offset: u64, length: u64) -> Result<Vec<u8>, u32> {
        let r = self.request(0, CMD_READ, offset, length, &[]);
        if r.error != 0 {
            return Err(r.error);
        }
        assert_eq!(
            r.data_covered, length,
            "READ reply covered {} of {length} bytes",
            r.data_covered
        );
        Ok(r.data)
    }

    pub fn flush(&mut self) -> u32 {
        self.request(0, CMD_FLUSH, 0, 0, &[]).error
    }

    /// Sends NBD_CMD_DISC (no reply) and waits for the close.
    pub fn disconnect(mut self) {
        let cookie = self.next_cookie();
        self.send_request(0, CMD_DISC, cookie, 0, 0, &[])
            .expect("send DISC");
        assert!(
            self.server_closed_within(Duration::from_secs(10)),
            "server did not close after NBD_CMD_DISC"
        );
    }

    fn read_header_rest(&mut self, n: usize) -> io::Result<Vec<u8>> {
        self.recv(n)
    }

    /// Reads messages until some request's reply is complete, and returns it.
    pub fn read_reply(&mut self) -> io::Result<Reply> {
        for _ in 0..1_000_000 {
            let magic = be32(&self.recv(4)?);
            match magic {
                SIMPLE_REPLY_MAGIC => {
                    let h = self.read_header_rest(12)?;
                    let error = be32(&h[0..4]);
                    let cookie = be64(&h[4..12]);
                    let p = self.take_pending(cookie);
                    assert!(
                        !self.partial.contains_key(&cookie),
                        "simple reply after structured chunks for cookie {cookie:#x}"
                    );
                    let mut r = Reply {
                        cookie,
                        error,
                        magics: vec![magic],
                        ..Reply::default()
                    };
                    if p.kind == CMD_READ && error == 0 {
                        r.data = self.recv(p.length as usize)?;
                        r.data_covered = p.length;
                    }
                    return Ok(r);
                }
                STRUCTURED_REPLY_MAGIC | EXTENDED_REPLY_MAGIC => {
                    let extended = magic == EXTENDED_REPLY_MAGIC;
                    let h = self.read_header_rest(if extended { 28 } else { 16 })?;
                    let flags = be16(&h[0..2]);
                    let kind = be16(&h[2..4]);
                    let cookie = be64(&h[4..12]);
                    let (echo, len) = if extended {
                        (Some(be64(&h[12..20])), be64(&h[20..28]))
                    } else {
                        (None, be32(&h[12..16]) as u64)
                    };
                    assert!(len <= 64 << 20, "reply chunk of {len} bytes");
                    let payload = self.recv(len as usize)?;
                    let p = *self
                        .pending
                        .get(&cookie)
                        .unwrap_or_else(|| panic!("chunk for unknown cookie {cookie:#x}"));
                    let r = self.partial.entry(cookie).or_insert_with(|| Reply {
                        cookie,
                        data: if p.kind == CMD_READ {
                            vec![0u8; p.length as usize]
                        } else {
                            Vec::new()
                        },
                        ..Reply::default()
                    });
                    r.magics.push(magic);
                    r.chunk_types.push(kind);
                    if let Some(o) = echo {
                        r.echoed_offsets.push(o);
                    }
                    decode_chunk(r, p, kind, &payload);
                    if flags & REPLY_FLAG_DONE != 0 {
                        self.pending.remove(&cookie);
                        return Ok(self.partial.remove(&cookie).unwrap());
                    }
                }
                other => panic!("bad reply magic {other:#010x}"),
            }
        }
        unreachable!()
    }

    fn take_pending(&mut self, cookie: u64) -> Pending {
        self.pending
            .remove(&cookie)
            .unwrap_or_else(|| panic!("reply for unknown cookie {cookie:#x}"))
    }

    /// Requests still waiting for a reply.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }
}

fn decode_chunk(r: &mut Reply, p: Pending, kind: u16, payload: &[u8]) {
    match kind {
        REPLY_TYPE_NONE => assert!(payload.is_empty(), "NONE chunk with payload"),
        REPLY_TYPE_OFFSET_DATA => {
            assert!(payload.len() > 8, "OFFSET_DATA chunk too short");
            assert_eq!(p.kind, CMD_READ, "OFFSET_DATA for a non-READ");
            let off = be64(payload);
            let data = &payload[8..];
            assert!(
                off >= p.offset && off + data.len() as u64 <= p.offset + p.length,
                "OFFSET_DATA [{off}, +{}) outside request [{}, +{})",
                data.len(),
                p.offset,
                p.length
            );
            let s = (off - p.offset) as usize;
            r.data[s..s + data.len()].copy_from_slice(data);
            r.data_covered += data.len() as u64;
        }
        REPLY_TYPE_OFFSET_HOLE => {
            assert_eq!(payload.len(), 12, "OFFSET_HOLE length");
            let off = be64(payload);
            let len = be32(&payload[8..]) as u64;
            assert!(off >= p.offset && off + len <= p.offset + p.length);
            let s = (off - p.offset) as usize;
            r.data[s..s + len as usize].fill(0);
            r.data_covered += len;
        }
        REPLY_TYPE_BLOCK_STATUS => {
            assert!(
                payload.len() >= 12 && (payload.len() - 4) & 7 == 0,
                "BLOCK_STATUS payload of {} bytes",
                payload.len()
            );
            let ctx = be32(payload);
            let ext = payload[4..]
                .chunks(8)
                .map(|c| (be32(c) as u64, be32(&c[4..]) as u64))
                .collect();
            r.extents.push((ctx, ext));
        }
        REPLY_TYPE_BLOCK_STATUS_EXT => {
            assert!(
                payload.len() >= 24 && (payload.len() - 8) & 15 == 0,
                "BLOCK_STATUS_EXT payload of {} bytes",
                payload.len()
            );
            let ctx = be32(payload);
            let count = be32(&payload[4..]) as usize;
            assert_eq!(
                count * 16 + 8,
                payload.len(),
                "BLOCK_STATUS_EXT descriptor count"
            );
            let ext = payload[8..]
                .chunks(16)
                .map(|c| (be64(c), be64(&c[8..])))
                .collect();
            r.extents.push((ctx, ext));
        }
        REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
            assert!(payload.len() >= 6, "error chunk too short");
            r.error = be32(payload);
            let mlen = be16(&payload[4..]) as usize;
            assert!(
                6 + mlen <= payload.len(),
                "error message overruns the chunk"
            );
            r.message = String::from_utf8_lossy(&payload[6..6 + mlen]).into();
            assert_ne!(r.error, 0, "error chunk with error 0");
        }
        other => panic!("unknown reply chunk type {other}"),
    }
}
