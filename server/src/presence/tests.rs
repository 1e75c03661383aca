//! The single-node registry: counting, snapshots, diffs, counted rooms. The cluster (roster,
//! reports, heartbeats) is tested on real nodes in `server/tests/presence.rs`.

use std::mem;
use std::sync::Arc;

use serde_json::{json, Value};

use super::*;
use crate::hub::{Delivery, Mailbox};

fn watcher() -> Subscriber {
    Mailbox::new(64)
}

/// The presence frames queued for `sub`, parsed.
fn frames(sub: &Subscriber) -> Vec<Value> {
    let mut out = Vec::new();
    while let Some(delivery) = sub.try_recv() {
        if let Delivery::Notice(notice) = delivery {
            out.push(serde_json::from_str(notice.frame.as_str()).unwrap());
        }
    }
    out
}

fn users(list: &[&str]) -> Users {
    Present::Users(list.iter().map(|u| Arc::from(*u)).collect())
}

fn local() -> Presence {
    Presence::new("node".into(), 3, None)
}

#[tokio::test]
async fn a_user_arrives_once_and_leaves_with_their_last_connection() {
    let p = local();
    let room: Arc<str> = Arc::from("r");
    p.enter(&room, "alice");
    let w = watcher();
    assert_eq!(
        p.watch(&room, 1, Arc::clone(&w)).await.unwrap(),
        users(&["alice"])
    );
    // Bob's two connections: one arrival.
    p.enter(&room, "bob");
    p.enter(&room, "bob");
    p.flush([Arc::clone(&room)]);
    assert_eq!(
        frames(&w),
        [json!({"type":"presence","room":"r","joined":["bob"]})]
    );
    p.exit("r", "bob");
    p.flush([Arc::clone(&room)]);
    assert!(frames(&w).is_empty(), "bob still has a connection");
    p.exit("r", "bob");
    p.enter(&room, "carol");
    p.flush([Arc::clone(&room)]);
    assert_eq!(
        frames(&w),
        [json!({"type":"presence","room":"r","joined":["carol"],"left":["bob"]})],
        "one frame for what changed since the last"
    );
    // Came and went between two frames: nothing to tell.
    p.enter(&room, "dan");
    p.exit("r", "dan");
    p.flush([Arc::clone(&room)]);
    assert!(frames(&w).is_empty());
    assert_eq!(p.present("r").await.unwrap(), users(&["alice", "carol"]));
}

#[tokio::test]
async fn a_new_watcher_gets_a_snapshot_and_the_others_catch_up_first() {
    let p = local();
    let room: Arc<str> = Arc::from("r");
    let first = watcher();
    p.watch(&room, 1, Arc::clone(&first)).await.unwrap();
    p.enter(&room, "alice");
    // Not flushed yet when the second watcher arrives: the first is told now, the second gets
    // alice in its snapshot, and neither hears of her again.
    let second = watcher();
    assert_eq!(
        p.watch(&room, 2, Arc::clone(&second)).await.unwrap(),
        users(&["alice"])
    );
    assert_eq!(
        frames(&first),
        [json!({"type":"presence","room":"r","joined":["alice"]})]
    );
    p.flush([Arc::clone(&room)]);
    assert!(frames(&first).is_empty());
    assert!(frames(&second).is_empty());
    p.unwatch("r", 1);
    p.exit("r", "alice");
    p.flush([Arc::clone(&room)]);
    assert!(frames(&first).is_empty(), "unwatched");
    assert_eq!(
        frames(&second),
        [json!({"type":"presence","room":"r","left":["alice"]})]
    );
    p.unwatch("r", 2);
    assert!(
        p.0.rooms.is_empty(),
        "nothing kept for a room nobody joins or watches"
    );
}

#[tokio::test]
async fn a_large_room_is_counted_then_listed_again() {
    let p = local(); // at most 3 listed
    let room: Arc<str> = Arc::from("big");
    for u in ["a", "b", "c", "d"] {
        p.enter(&room, u);
    }
    let w = watcher();
    assert_eq!(
        p.watch(&room, 1, Arc::clone(&w)).await.unwrap(),
        Present::Count(4)
    );
    p.enter(&room, "e");
    p.flush([Arc::clone(&room)]);
    assert_eq!(
        frames(&w),
        [json!({"type":"presence","room":"big","count":5})]
    );
    p.exit("big", "e");
    p.exit("big", "d");
    p.flush([Arc::clone(&room)]);
    assert_eq!(
        frames(&w),
        [json!({"type":"presence","room":"big","users":["a","b","c"]})],
        "small again: the full list replaces the count"
    );
    assert_eq!(p.present("big").await.unwrap(), users(&["a", "b", "c"]));
}

#[tokio::test]
async fn unwatched_rooms_cost_no_frames_and_no_pending_work_on_a_single_node() {
    let p = local();
    let room: Arc<str> = Arc::from("quiet");
    p.enter(&room, "alice");
    assert!(
        p.pending().is_empty(),
        "no watcher, no roster: nothing to do"
    );
    p.exit("quiet", "alice");
    assert!(p.0.rooms.is_empty());
}

/// A queue more than half full refuses a presence frame (`Mailbox::push_notice`). The room's
/// next difference would then be wrong for that watcher, so it is sent its own (from what it was
/// last told) at each turn until one is queued; the other watchers go on as before.
#[tokio::test]
async fn a_watcher_that_missed_frames_gets_what_it_missed_once_it_has_room() {
    let p = local();
    let room: Arc<str> = Arc::from("r");
    let slow = Mailbox::new(4);
    let fast = watcher();
    p.watch(&room, 1, Arc::clone(&slow)).await.unwrap();
    p.watch(&room, 2, Arc::clone(&fast)).await.unwrap();
    // Two queued messages fill half of the slow session's queue.
    let live = |seq| {
        Arc::new(crate::hub::Live {
            room: Arc::clone(&room),
            seq,
            frame: Utf8Bytes::from_static("m"),
        })
    };
    assert!(slow.push(&live(1)) && slow.push(&live(2)));

    p.enter(&room, "alice");
    p.flush([Arc::clone(&room)]);
    assert_eq!(
        frames(&fast),
        [json!({"type":"presence","room":"r","joined":["alice"]})]
    );
    assert!(
        p.pending().flush.contains(&room),
        "the slow watcher is due again at the next turn"
    );
    p.enter(&room, "bob");
    let due = mem::take(&mut p.pending().flush);
    p.flush(due);
    assert_eq!(
        frames(&fast),
        [json!({"type":"presence","room":"r","joined":["bob"]})]
    );
    assert!(
        p.pending().flush.contains(&room),
        "still no room: due again"
    );

    // The slow session reads its messages (and no presence frame: both were refused).
    assert!(frames(&slow).is_empty());
    p.exit("r", "alice");
    let due = mem::take(&mut p.pending().flush);
    p.flush(due);
    assert_eq!(
        frames(&fast),
        [json!({"type":"presence","room":"r","left":["alice"]})]
    );
    assert_eq!(
        frames(&slow),
        [json!({"type":"presence","room":"r","joined":["bob"]})],
        "its own difference: it never heard of alice, and must not hear that she left"
    );
    assert!(p.pending().is_empty(), "nobody is behind any more");
    p.enter(&room, "carol");
    p.flush([Arc::clone(&room)]);
    assert_eq!(
        frames(&slow),
        [json!({"type":"presence","room":"r","joined":["carol"]})],
        "back to the room's differences"
    );
    assert_eq!(
        frames(&fast),
        [json!({"type":"presence","room":"r","joined":["carol"]})]
    );

    // Behind again, and what it missed is undone before it has room: nothing to tell it.
    assert!(slow.push(&live(3)) && slow.push(&live(4)));
    p.enter(&room, "dan");
    p.flush([Arc::clone(&room)]);
    assert!(p.pending().flush.contains(&room));
    assert!(frames(&slow).is_empty());
    p.exit("r", "dan");
    let due = mem::take(&mut p.pending().flush);
    p.flush(due);
    assert!(
        frames(&slow).is_empty(),
        "dan came and went: it was exact all along"
    );
    assert!(p.pending().is_empty());
    assert_eq!(
        frames(&fast),
        [
            json!({"type":"presence","room":"r","joined":["dan"]}),
            json!({"type":"presence","room":"r","left":["dan"]})
        ]
    );
}

/// A moved Redis Cluster slot drops the subscriptions of the rooms whose channels hash to it:
/// only those watched rooms are read from the roster again, not every one (a node may watch
/// thousands). The roster itself is not used here: `connect_lazy` never connects.
#[tokio::test]
async fn a_moved_slot_rereads_only_the_watched_rooms_it_moved() {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .connect_lazy("postgres://unused@127.0.0.1:1/unused")
        .unwrap();
    let roster = crate::store::Roster::new(pool, std::time::Duration::from_secs(1));
    let p = Presence::new("node".into(), 3, Some(roster));
    for (id, room) in ["a", "b", "c"].into_iter().enumerate() {
        let room: Arc<str> = Arc::from(room);
        let empty = Remote::Users(Default::default());
        p.add_watcher(&room, id as u64, &watcher(), Some(empty));
    }
    let _ = mem::take(&mut *p.pending());
    p.reread_some(&Affected::new(|t| *t == Topic::Presence(Arc::from("b"))));
    let pending = mem::take(&mut *p.pending());
    assert_eq!(pending.reread, HashSet::from([Arc::from("b")]));
    assert!(!pending.reread_all);
    p.reread_some(&Affected::new(|_| false));
    assert!(p.pending().is_empty(), "nothing moved, nothing to read");
}
