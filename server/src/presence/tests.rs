//! The single-node registry: counting, snapshots, diffs, counted rooms. The cluster (roster,
//! reports, heartbeats) is tested on real nodes in `server/tests/presence.rs`.

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
