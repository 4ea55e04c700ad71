//! Volumes behind the NBD server.
//!
//! Today: [`image::ImageFile`], a raw image served through an I/O [`engine`] (io_uring or
//! pread/pwrite). Next (issue 3): the replicated volume, which wraps an `ImageFile` and
//! acknowledges a write only after the local write completed and the peer acknowledged it,
//! or after its dirty bit is durable and the volume is degraded.

pub mod engine;
pub mod image;
pub mod metadata;

pub use engine::{Engine, EngineKind};
pub use image::{create_image, ImageError, ImageFile};
