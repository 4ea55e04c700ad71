//! The replication link between the two nodes: frames, authentication, and the connection
//! that carries mirrored writes, acknowledgements and resync data.

pub mod auth;
pub mod frame;
pub mod link;
