//! The bus: how committed messages reach the other nodes of a cluster without a database read.
//!
//! A bus is an accelerator, never the source of truth. It is at-most-once (Redis pub/sub drops
//! messages when a subscriber reconnects or falls behind), so everything it delivers goes through
//! the same seq checks as local messages, and every node also reads the heads of its rooms from
//! the database (see `relay`) to find what the bus lost. Two implementations sit behind [`Bus`]:
//! [`redis::RedisBus`] for clusters and [`local::LocalBus`] for nodes in one process (the
//! single node, and tests); both pass `server/tests/bus_contract.rs`.

pub mod local;
pub mod redis;

use std::sync::Arc;

use async_trait::async_trait;
use axum::extract::ws::Utf8Bytes;
use bytes::{BufMut, Bytes, BytesMut};

/// A committed message as it travels between nodes: the serialized `message` frame and the two
/// fields a receiver needs without parsing it.
#[derive(Debug, Clone)]
pub struct BusMessage {
    pub room: Arc<str>,
    pub seq: u64,
    pub frame: Utf8Bytes,
}

#[derive(Debug)]
pub enum BusEvent {
    /// A message committed on another node, for a room this node subscribed to.
    Message(BusMessage),
    /// Messages may have been lost (a reconnect, a receiver that fell behind): every local room's
    /// head should be checked against the database.
    MaybeLost,
    /// The bus went up or down.
    State(BusState),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusState {
    Up,
    Down,
}

impl BusState {
    pub fn as_str(self) -> &'static str {
        match self {
            BusState::Up => "up",
            BusState::Down => "down",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    #[error("bus command timed out")]
    Timeout,
}

/// A transport between the nodes of a cluster. Events (messages of subscribed rooms, state
/// changes) come out of the receiver handed back with the bus when it is created.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Short name for `/ready` and logs ("redis", "local").
    fn kind(&self) -> &'static str;

    /// Sends a committed message to the other nodes. Never waits on the network: when the bus is
    /// down or its queue is full the message is dropped (and counted); receivers repair the gap
    /// from the database.
    fn publish(&self, message: &BusMessage);

    /// Starts receiving messages of `room`. Idempotent.
    async fn subscribe(&self, room: &str) -> Result<(), BusError>;

    /// Stops receiving messages of `room`. Idempotent.
    async fn unsubscribe(&self, room: &str) -> Result<(), BusError>;

    fn state(&self) -> BusState;
}

/// The wire form of a bus message: a header line `<seq> <origin>` then the frame. `origin` lets a
/// node skip its own messages (it delivered them locally already).
pub(crate) fn encode(origin: &str, message: &BusMessage) -> Bytes {
    let seq = message.seq.to_string();
    let mut out = BytesMut::with_capacity(seq.len() + origin.len() + 2 + message.frame.len());
    out.put_slice(seq.as_bytes());
    out.put_u8(b' ');
    out.put_slice(origin.as_bytes());
    out.put_u8(b'\n');
    out.put_slice(message.frame.as_bytes());
    out.freeze()
}

/// Parses what [`encode`] wrote: `(origin, seq, frame)`. `None` for anything else (a foreign
/// publisher on our channel), which is ignored.
pub(crate) fn decode(payload: Bytes) -> Option<(String, u64, Utf8Bytes)> {
    let newline = payload.iter().position(|&b| b == b'\n')?;
    let header = std::str::from_utf8(&payload[..newline]).ok()?;
    let (seq, origin) = header.split_once(' ')?;
    let seq = seq.parse().ok()?;
    let frame = Utf8Bytes::try_from(payload.slice(newline + 1..)).ok()?;
    Some((origin.to_string(), seq, frame))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_round_trips() {
        let m = BusMessage {
            room: "r".into(),
            seq: 42,
            frame: Utf8Bytes::from(r#"{"type":"message"}"#),
        };
        let (origin, seq, frame) = decode(encode("node-a", &m)).unwrap();
        assert_eq!(
            (origin.as_str(), seq, frame.as_str()),
            ("node-a", 42, r#"{"type":"message"}"#)
        );
        assert!(decode(Bytes::from_static(b"garbage")).is_none());
        assert!(decode(Bytes::from_static(b"x y\n{}")).is_none());
    }
}
