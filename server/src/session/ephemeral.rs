//! Signals and read cursors: the two frames whose effects reach other sessions without a `seq`.
//!
//! Each is serialized once, handed to this node's hub (which skips the session it came from) and
//! published on the bus for the other nodes (a signal on its room's channel, a read cursor on its
//! user's). Neither is stored in the message log, ordered or repaired: delivery is at most once.
//! Without a bus they reach this node's sessions only; a read cursor is in the database all the
//! same, so the user's connections elsewhere see it in their next `joined`.

use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;

use crate::app::AppState;
use crate::bus::{Ephemeral, Topic};
use crate::hub::{Notice, SessionId};
use crate::metrics as m;
use seqcast_protocol::{self as protocol, Ref};

/// Relays a signal from session `id` (of `user`) to the other sessions joined to `room`.
/// Permission and size were checked by the caller.
pub(super) fn signal(state: &AppState, id: SessionId, user: &str, room: &str, body: &str) {
    metrics::counter!(m::SIGNALS).increment(1);
    let frame = Utf8Bytes::from(protocol::signal_frame(room, user, body));
    let room: Arc<str> = Arc::from(room);
    // The bus first: it only queues (never waits), and the other nodes' share should not wait
    // for this node's fan-out.
    if let Some(bus) = &state.bus {
        bus.publish_ephemeral(&Ephemeral {
            topic: Topic::Room(Arc::clone(&room)),
            frame: frame.clone(),
        });
    }
    let notice = Arc::new(Notice {
        room: Some(Arc::clone(&room)),
        except: Some(id),
        frame,
    });
    state.hub.signal(&room, &notice);
}

/// Raises `user`'s read cursor in `room` (for session `id`'s `read` frame) and returns the
/// reply; when the cursor moved, the user's other connections are told, here and through the
/// bus. Permission was checked by the caller.
pub(super) async fn mark_read(
    state: AppState,
    id: SessionId,
    user: String,
    room: String,
    seq: u64,
    r: Option<Ref>,
) -> String {
    let mark = match state.store.mark_read(&user, &room, seq).await {
        Ok(mark) => mark,
        Err(e) => return super::store_error_frame(&e, r.as_ref()),
    };
    if mark.moved {
        metrics::counter!(m::READ_CURSORS_MOVED).increment(1);
        // Concurrent `read`s of one user on several connections may reach a connection out of
        // order: clients keep the larger cursor (the database always does).
        let frame = Utf8Bytes::from(protocol::read_frame(&room, mark.seq, None));
        let user: Arc<str> = Arc::from(user);
        if let Some(bus) = &state.bus {
            bus.publish_ephemeral(&Ephemeral {
                topic: Topic::User(Arc::clone(&user)),
                frame: frame.clone(),
            });
        }
        let notice = Arc::new(Notice {
            room: None,
            except: Some(id),
            frame,
        });
        state.hub.to_user(&user, &notice);
    }
    protocol::read_frame(&room, mark.seq, r.as_ref())
}
