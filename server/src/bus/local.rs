//! An in-process bus: nodes created from one [`LocalNetwork`] reach each other through channels.
//!
//! A single node uses a network of one (nothing to send to); tests use larger networks to run the
//! bus contract without Redis. Like Redis pub/sub it is at-most-once: a node whose event queue is
//! full loses the message and is told so with [`BusEvent::MaybeLost`].

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::{Bus, BusError, BusEvent, BusMessage, BusState, Ephemeral, Topic};
use crate::metrics as m;

/// Events buffered per node before messages are dropped.
const EVENT_QUEUE: usize = 4096;

/// A set of in-process nodes.
#[derive(Clone, Default)]
pub struct LocalNetwork {
    nodes: Arc<Mutex<Vec<Arc<Node>>>>,
}

struct Node {
    id: u64,
    rooms: Mutex<HashSet<String>>,
    users: Mutex<HashSet<String>>,
    events: mpsc::Sender<BusEvent>,
}

impl LocalNetwork {
    pub fn new() -> LocalNetwork {
        LocalNetwork::default()
    }

    /// Adds a node to the network.
    pub fn join(&self) -> (LocalBus, mpsc::Receiver<BusEvent>) {
        let (events, rx) = mpsc::channel(EVENT_QUEUE);
        let mut nodes = lock(&self.nodes);
        let id = nodes.len() as u64;
        let node = Arc::new(Node {
            id,
            rooms: Mutex::new(HashSet::new()),
            users: Mutex::new(HashSet::new()),
            events,
        });
        nodes.push(Arc::clone(&node));
        (
            LocalBus {
                network: self.clone(),
                node,
            },
            rx,
        )
    }
}

/// One node's end of a [`LocalNetwork`].
pub struct LocalBus {
    network: LocalNetwork,
    node: Arc<Node>,
}

#[async_trait]
impl Bus for LocalBus {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn publish(&self, message: &BusMessage) {
        let nodes = lock(&self.network.nodes).clone();
        for node in nodes.iter().filter(|n| n.id != self.node.id) {
            if !lock(&node.rooms).contains(&*message.room) {
                continue;
            }
            if node
                .events
                .try_send(BusEvent::Message(message.clone()))
                .is_err()
            {
                // Best effort, as with Redis: the receiver's periodic head check repairs it.
                let _ = node.events.try_send(BusEvent::MaybeLost);
            }
        }
    }

    async fn subscribe(&self, room: &str) -> Result<(), BusError> {
        lock(&self.node.rooms).insert(room.to_string());
        Ok(())
    }

    async fn unsubscribe(&self, room: &str) -> Result<(), BusError> {
        lock(&self.node.rooms).remove(room);
        Ok(())
    }

    fn publish_ephemeral(&self, event: &Ephemeral) {
        let nodes = lock(&self.network.nodes).clone();
        for node in nodes.iter().filter(|n| n.id != self.node.id) {
            let subscribed = match &event.topic {
                Topic::Room(room) | Topic::Presence(room) => lock(&node.rooms).contains(&**room),
                Topic::User(user) => lock(&node.users).contains(&**user),
            };
            if !subscribed {
                continue;
            }
            // As on Redis, ephemeral frames never take the second half of the queue, which
            // stays for messages; dropped, they are gone (no loss notice: nothing repairs them).
            if node.events.capacity() <= EVENT_QUEUE / 2
                || node
                    .events
                    .try_send(BusEvent::Ephemeral(event.clone()))
                    .is_err()
            {
                metrics::counter!(m::EPHEMERAL_DROPPED, "at" => "bus").increment(1);
            }
        }
    }

    async fn subscribe_user(&self, user: &str) -> Result<(), BusError> {
        lock(&self.node.users).insert(user.to_string());
        Ok(())
    }

    async fn unsubscribe_user(&self, user: &str) -> Result<(), BusError> {
        lock(&self.node.users).remove(user);
        Ok(())
    }

    fn state(&self) -> BusState {
        BusState::Up
    }
}

// The critical sections are single inserts, removals and clones; a poisoned lock still holds a
// consistent set.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
