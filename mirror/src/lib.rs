//! Volumes behind the NBD server: local image I/O, and the replicated volume.
//!
//! - [`image::ImageFile`]: a raw image served through an I/O [`engine`] (io_uring or
//!   pread/pwrite).
//! - [`volume::Volume`]: a replicated volume. On the primary it acknowledges a write only
//!   after the local write completed and the peer acknowledged it, or after its dirty bit is
//!   durable while the peer is away. On the secondary it applies the primary's writes and
//!   resync data.
//! - [`repl`]: the replication protocol (frames, authentication, the connection).
//! - [`decide`]: the pure rules: resync direction, split brain, promotion.
//! - [`metadata`]: the persistent dirty map, activity map and generations.
//! - [`node`]: the daemon's volumes and the replication listener and dialers.
//! - [`window`]: how many resync chunks may be in flight (by count and by bytes).

pub mod decide;
pub mod engine;
pub mod image;
pub mod metadata;
pub mod node;
pub mod rangelock;
pub mod repl;
pub mod unflushed;
pub mod volume;
pub mod window;

pub use engine::{Engine, EngineKind};
pub use image::{create_image, ImageError, ImageFile};
