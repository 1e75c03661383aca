//! Ephemeral frames on their way to local sessions: signals to a room's sessions, read cursors
//! to a user's connections (and the registry of those), none of it ordered, stored or repaired.

use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;

use super::{read, Hub, RoomChange, SessionId, Subscriber};

/// A frame with no seq (a signal, a read cursor) on its way to sessions, serialized once.
#[derive(Debug)]
pub struct Notice {
    /// A signal's room: written only while the session is joined to it. `None` for a read
    /// cursor, written to every connection of its user.
    pub room: Option<Arc<str>>,
    /// The local session it came from, which does not receive it.
    pub except: Option<SessionId>,
    pub frame: Utf8Bytes,
}

impl Hub {
    /// Counts a connection of `user` until [`Hub::deregister_user`]; the user's first local
    /// connection is reported (the bus subscribes to the user's channel).
    pub fn register_user(&self, user: &str, id: SessionId, mailbox: Subscriber) {
        if let Some(mut entry) = self.users.get_mut(user) {
            entry.insert(id, mailbox);
            return;
        }
        // Under the shard lock, as rooms: ordered with a removal's report.
        let entry = self.users.entry(Arc::from(user));
        let opened = matches!(entry, dashmap::Entry::Vacant(_));
        let mut entry = entry.or_default();
        entry.insert(id, mailbox);
        if opened {
            self.report(RoomChange::UserOpened(Arc::clone(entry.key())));
        }
    }

    pub fn deregister_user(&self, user: &str, id: SessionId) {
        self.users.remove_if_mut(user, |key, sessions| {
            sessions.remove(&id);
            let empty = sessions.is_empty();
            if empty {
                self.report(RoomChange::UserClosed(Arc::clone(key)));
            }
            empty
        });
    }

    /// The users with at least one local connection.
    pub fn users(&self) -> Vec<Arc<str>> {
        self.users.iter().map(|e| Arc::clone(e.key())).collect()
    }

    /// Hands a signal to the local sessions of `room` (but the one it came from); returns how
    /// many queues took it.
    pub fn signal(&self, room: &str, notice: &Arc<Notice>) -> usize {
        let Some(entry) = self.rooms.get(room).map(|e| Arc::clone(e.value())) else {
            return 0;
        };
        let sessions = read(&entry.sessions);
        offer(sessions.iter(), notice)
    }

    /// Hands a read cursor to the local connections of `user` (but the one it came from);
    /// returns how many queues took it.
    pub fn to_user(&self, user: &str, notice: &Arc<Notice>) -> usize {
        match self.users.get(user) {
            Some(sessions) => offer(sessions.iter(), notice),
            None => 0,
        }
    }
}

/// Offers `notice` to every session of `sessions` but its sender; returns how many took it.
fn offer<'s>(
    sessions: impl Iterator<Item = (&'s SessionId, &'s Subscriber)>,
    notice: &Arc<Notice>,
) -> usize {
    let mut queued = 0;
    let mut dropped = 0;
    for (id, mailbox) in sessions {
        if notice.except == Some(*id) {
            continue;
        }
        if mailbox.push_notice(notice) {
            queued += 1;
        } else {
            dropped += 1;
        }
    }
    if dropped > 0 {
        metrics::counter!(crate::metrics::EPHEMERAL_DROPPED, "at" => "session").increment(dropped);
    }
    queued
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::{Delivery, Mailbox};
    use tokio::sync::mpsc;

    fn sub(cap: usize) -> (Subscriber, Subscriber) {
        let mailbox = Mailbox::new(cap);
        (Arc::clone(&mailbox), mailbox)
    }

    #[test]
    fn notices_skip_their_sender_and_users_come_and_go() {
        let (tx, mut changes) = mpsc::unbounded_channel();
        let hub = Hub::clustered(tx, mpsc::unbounded_channel().0);
        let (a, a_rx) = sub(8);
        let (b, b_rx) = sub(8);
        hub.subscribe("r", 1, Arc::clone(&a));
        hub.subscribe("r", 2, Arc::clone(&b));
        let signal = Arc::new(Notice {
            room: Some("r".into()),
            except: Some(1),
            frame: Utf8Bytes::from("s"),
        });
        assert_eq!(hub.signal("r", &signal), 1, "not back to its sender");
        assert!(a_rx.try_recv().is_none());
        assert!(matches!(b_rx.try_recv(), Some(Delivery::Notice(_))));
        assert_eq!(hub.signal("elsewhere", &signal), 0);

        hub.register_user("alice", 1, a);
        hub.register_user("alice", 2, b);
        let read = Arc::new(Notice {
            room: None,
            except: Some(2),
            frame: Utf8Bytes::from("r"),
        });
        assert_eq!(hub.to_user("alice", &read), 1);
        assert!(matches!(a_rx.try_recv(), Some(Delivery::Notice(_))));
        assert_eq!(hub.users(), vec![Arc::from("alice")]);
        hub.deregister_user("alice", 1);
        hub.deregister_user("alice", 2);
        hub.deregister_user("alice", 2);
        assert!(hub.users().is_empty(), "gone with the last connection");
        let got: Vec<_> = std::iter::from_fn(|| changes.try_recv().ok())
            .filter(|c| matches!(c, RoomChange::UserOpened(_) | RoomChange::UserClosed(_)))
            .collect();
        assert_eq!(
            got,
            vec![
                RoomChange::UserOpened("alice".into()),
                RoomChange::UserClosed("alice".into())
            ]
        );
    }
}
