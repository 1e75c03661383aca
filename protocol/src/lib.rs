//! The wire protocol (`shared/protocol.md`): parsing client frames and writing server frames.
//!
//! Client frames are parsed into borrowed raw JSON pieces first, so a frame with a bad field still
//! yields its `ref` for the error reply, and a message `body` is kept as the exact text the client
//! sent: it is stored and replayed byte for byte and never re-serialized.
//!
//! A crate of its own, with no I/O and few dependencies, so that the fuzz targets (`fuzz/`)
//! build in seconds and other clients of the protocol (the load generator) can share it; the
//! server re-exports it as `seqcast::protocol`.

mod frames;
mod pattern;

pub use frames::*;
pub use pattern::pattern_matches;

/// A committed message as stored and as sent in `message` frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub room: String,
    pub seq: u64,
    pub id: uuid::Uuid,
    pub sender: String,
    /// Serialized JSON text, exactly as it was sent.
    pub body: String,
    /// Commit time, milliseconds since the Unix epoch.
    pub ts_ms: i64,
}
