//! NBD server: the protocol as a pure codec ([`handshake`], [`request`], [`reply`]) and the
//! server loop ([`server`]) over TCP and unix sockets.
//!
//! Invariants:
//! - Nothing a client sends can panic the server: every length is bounded before it is
//!   allocated, every range is checked before it reaches the backend, and a misbehaving
//!   connection only ends itself.
//! - A reply is sent only after the backend finished the request; with FUA or FLUSH only
//!   after the backend made it durable. Replies go out as requests complete (out of order).
//! - The storage is reached only through [`backend::BlockBackend`], so the protocol knows
//!   nothing of files, io_uring or mirroring.

pub mod backend;
pub mod fuzzing;
pub mod handshake;
pub mod listen;
pub mod proto;
pub mod reply;
pub mod request;
pub mod server;
pub mod spin;
mod wire;

pub use backend::{BackendError, BackendResult, BlockBackend, ZeroMode};
pub use handshake::ExportInfo;
pub use listen::ListenAddr;
pub use reply::Extent;
pub use server::{bind_all, serve, transmission_flags, Export, Listener, ServerError};
