//! The bus: how committed messages reach the other nodes of a cluster without a database read.
//!
//! A bus is an accelerator, never the source of truth. It is at-most-once (Redis pub/sub drops
//! messages when a subscriber reconnects or falls behind), so everything it delivers goes through
//! the same seq checks as local messages, and every node also reads the heads of its rooms from
//! the database (see `relay`) to find what the bus lost. Two implementations sit behind [`Bus`]:
//! [`redis::RedisBus`] for clusters and [`local::LocalBus`] for nodes in one process (the
//! single node, and tests); both pass `server/tests/bus_contract.rs`.
//!
//! Besides committed messages it carries *ephemeral* frames ([`Ephemeral`]): signals, on their
//! room's channel (so they reach exactly the nodes subscribed to the room), and read-cursor
//! updates, on a channel per user that a node subscribes to while it has a connection of that
//! user (so a node hears only about its own users, whatever the cluster's size). Ephemeral
//! frames have no seq and are never repaired: lost on the bus, they are lost (at most once).
//! Without a bus (no Redis, or Redis down) they reach the sessions of the node they were sent
//! on only. (A Postgres LISTEN/NOTIFY link could carry them later: another [`Bus`] whose
//! `publish_ephemeral` is a NOTIFY; nothing above the trait would change.)

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

/// Where an ephemeral frame goes: the sessions joined to a room (a signal), or the connections
/// of a user (a read cursor).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Topic {
    Room(Arc<str>),
    User(Arc<str>),
    /// "Presence changed in this room": sent on the room's channel, with an empty frame, to the
    /// nodes' presence tasks (`presence`), never to a session.
    Presence(Arc<str>),
}

/// A frame with no seq, no storage and no repair, serialized once by the node it came from.
#[derive(Debug, Clone)]
pub struct Ephemeral {
    pub topic: Topic,
    pub frame: Utf8Bytes,
}

#[derive(Debug)]
pub enum BusEvent {
    /// A message committed on another node, for a room this node subscribed to.
    Message(BusMessage),
    /// An ephemeral frame from another node, for a room or user this node subscribed to.
    Ephemeral(Ephemeral),
    /// Messages may have been lost (a reconnect, a receiver that fell behind): every
    /// subscription is renewed and every local room's head checked against the database.
    MaybeLost,
    /// Some subscriptions were dropped without a reconnect (a Redis Cluster moved slots to
    /// another shard, which unsubscribes their subscribers): those of the topics in
    /// [`Affected`] are renewed, and what was published to them meanwhile was missed (their
    /// rooms' heads are checked once renewed).
    Dropped(Affected),
    /// The bus went up or down.
    State(BusState),
}

/// Which topics a [`BusEvent::Dropped`] concerns, as the bus that reports it tells (a Redis
/// Cluster bus: those whose channel's slot moved). Cheap to clone.
#[derive(Clone)]
pub struct Affected(Arc<dyn Fn(&Topic) -> bool + Send + Sync>);

impl Affected {
    pub fn new(contains: impl Fn(&Topic) -> bool + Send + Sync + 'static) -> Affected {
        Affected(Arc::new(contains))
    }

    pub fn contains(&self, topic: &Topic) -> bool {
        (self.0)(topic)
    }
}

impl std::fmt::Debug for Affected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Affected(..)")
    }
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

    /// Sends an ephemeral frame to the other nodes subscribed to its topic (a room's, as for
    /// messages; a user's, see [`Bus::subscribe_user`]). Never waits, and never crowds out
    /// messages: when the bus is down or its queue is half full, the frame is dropped (and
    /// counted), nothing repairs it.
    fn publish_ephemeral(&self, event: &Ephemeral);

    /// Starts receiving ephemeral frames for `user` (read cursors). Idempotent.
    async fn subscribe_user(&self, user: &str) -> Result<(), BusError>;

    /// Stops receiving ephemeral frames for `user`. Idempotent.
    async fn unsubscribe_user(&self, user: &str) -> Result<(), BusError>;

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

/// The header's first word for an ephemeral frame, where a message has its seq: a node of an
/// older version, which knows no ephemeral frames, fails to parse it as a seq and ignores the
/// frame (a rolling upgrade needs no coordination).
const EPHEMERAL_MARK: &str = "~";

/// The header's first word for a presence report (likewise ignored by older nodes).
const PRESENCE_MARK: &str = "~p";

/// The wire form of an ephemeral frame: a header line `~ <origin>` (`~p <origin>` for a presence
/// report) then the frame.
pub(crate) fn encode_ephemeral(origin: &str, topic: &Topic, frame: &Utf8Bytes) -> Bytes {
    let mark = match topic {
        Topic::Presence(_) => PRESENCE_MARK,
        Topic::Room(_) | Topic::User(_) => EPHEMERAL_MARK,
    };
    let mut out = BytesMut::with_capacity(origin.len() + 4 + frame.len());
    out.put_slice(mark.as_bytes());
    out.put_u8(b' ');
    out.put_slice(origin.as_bytes());
    out.put_u8(b'\n');
    out.put_slice(frame.as_bytes());
    out.freeze()
}

/// What a payload on a bus channel is: a committed message (with its seq) or an ephemeral
/// frame, and the node it came from.
#[derive(Debug, PartialEq)]
pub(crate) enum Decoded {
    Message {
        origin: String,
        seq: u64,
        frame: Utf8Bytes,
    },
    Ephemeral {
        origin: String,
        frame: Utf8Bytes,
    },
    /// A presence report for the channel's room.
    Presence {
        origin: String,
    },
}

/// Parses what [`encode`] or [`encode_ephemeral`] wrote. `None` for anything else (a foreign
/// publisher on our channel), which is ignored.
pub(crate) fn decode(payload: Bytes) -> Option<Decoded> {
    let newline = payload.iter().position(|&b| b == b'\n')?;
    let header = std::str::from_utf8(&payload[..newline]).ok()?;
    let (first, origin) = header.split_once(' ')?;
    let origin = origin.to_string();
    let frame = Utf8Bytes::try_from(payload.slice(newline + 1..)).ok()?;
    if first == EPHEMERAL_MARK {
        return Some(Decoded::Ephemeral { origin, frame });
    }
    if first == PRESENCE_MARK {
        return Some(Decoded::Presence { origin });
    }
    let seq = first.parse().ok()?;
    Some(Decoded::Message { origin, seq, frame })
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
        assert_eq!(
            decode(encode("node-a", &m)),
            Some(Decoded::Message {
                origin: "node-a".into(),
                seq: 42,
                frame: Utf8Bytes::from(r#"{"type":"message"}"#)
            })
        );
        let signal = Utf8Bytes::from(r#"{"type":"signal"}"#);
        assert_eq!(
            decode(encode_ephemeral(
                "node-b",
                &Topic::Room("r".into()),
                &signal
            )),
            Some(Decoded::Ephemeral {
                origin: "node-b".into(),
                frame: signal
            })
        );
        assert_eq!(
            decode(encode_ephemeral(
                "node-c",
                &Topic::Presence("r".into()),
                &Utf8Bytes::from_static("")
            )),
            Some(Decoded::Presence {
                origin: "node-c".into()
            })
        );
        assert!(decode(Bytes::from_static(b"garbage")).is_none());
        assert!(decode(Bytes::from_static(b"x y\n{}")).is_none());
    }
}
