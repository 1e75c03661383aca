//! `append_rooms`: several rooms' batches in one transaction.

use std::collections::HashSet;
use std::sync::Arc;

use seqcast::store::{NewMessage, RoomInfo, Store};

use crate::{appended_seqs, fill, keyed, msg, seqs};

contract!(
    append_rooms_commits_each_room_as_append_would,
    append_rooms_groups_concurrently_without_holes,
);

/// after its own head, idempotency keys honoured per room), in input order.
async fn append_rooms_commits_each_room_as_append_would(store: Arc<dyn Store>) {
    fill(&*store, "b", 3).await;
    let a = [msg("alice", "1"), keyed("alice", "2", "k")];
    let b = [
        msg("bob", "4"),
        keyed("bob", "5", "k"),
        keyed("bob", "5 again", "k"),
    ];
    let empty: [NewMessage; 0] = [];
    let out = store
        .append_rooms(&[("a", &a), ("b", &b), ("c", &empty)])
        .await
        .unwrap();
    assert_eq!(out.len(), 3);
    assert_eq!(appended_seqs(&out[0]), [1, 2]);
    assert_eq!(appended_seqs(&out[1]), [4, 5, 5]);
    assert!(
        out[1][2].duplicate,
        "a key repeated in the batch is the original"
    );
    assert!(out[2].is_empty());
    assert_eq!(out[0][1].message.room, "a");
    assert_eq!(out[1][0].message.body, "4");
    assert_eq!(
        store.room_info("a").await.unwrap(),
        RoomInfo { head: 2, first: 1 }
    );
    assert_eq!(
        store.room_info("b").await.unwrap(),
        RoomInfo { head: 5, first: 1 }
    );
    assert_eq!(
        store.room_info("c").await.unwrap(),
        RoomInfo { head: 0, first: 1 }
    );
    // Keys stored by a group are found by a later plain append.
    let again = store
        .append("a", &[keyed("alice", "2", "k")])
        .await
        .unwrap();
    assert!(again[0].duplicate);
    assert_eq!(again[0].message.seq, 2);
}

/// Groups without idempotency keys (one statement on Postgres), several writers at once over
/// overlapping rooms: every room ends up with consecutive seqs, each message stored once, in
/// its writer's order, and the timestamps follow the seqs.
async fn append_rooms_groups_concurrently_without_holes(store: Arc<dyn Store>) {
    fill(&*store, "r2", 5).await;
    let rooms = ["r0", "r1", "r2", "r3"];
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                for round in 0..20 {
                    let batches: Vec<Vec<NewMessage>> = rooms
                        .iter()
                        .map(|_| {
                            (0..3)
                                .map(|i| msg(&format!("w{w}"), &format!("{round}.{i}")))
                                .collect()
                        })
                        .collect();
                    let group: Vec<(&str, &[NewMessage])> = rooms
                        .iter()
                        .zip(&batches)
                        .map(|(room, b)| (*room, b.as_slice()))
                        .collect();
                    let out = store.append_rooms(&group).await.unwrap();
                    for (appended, room) in out.iter().zip(rooms) {
                        let s = appended_seqs(appended);
                        assert_eq!(s.len(), 3);
                        assert!(s.windows(2).all(|p| p[1] == p[0] + 1), "{room}: {s:?}");
                        assert!(appended.iter().all(|a| a.message.room == room));
                    }
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    for room in rooms {
        let base = if room == "r2" { 5 } else { 0 };
        let head = base + 4 * 20 * 3;
        assert_eq!(
            store.room_info(room).await.unwrap(),
            RoomInfo { head, first: 1 }
        );
        let stored = store.read_after(room, 0, None, 1000).await.unwrap();
        assert_eq!(seqs(&stored), (1..=head).collect::<Vec<_>>(), "{room}");
        assert!(
            stored.windows(2).all(|p| p[0].ts_ms <= p[1].ts_ms),
            "{room}: ts follow seqs"
        );
        let ids: HashSet<_> = stored.iter().map(|m| m.id).collect();
        assert_eq!(ids.len(), stored.len());
        // Each writer's messages keep their order within the room.
        for w in 0..4 {
            let mine: Vec<&str> = stored
                .iter()
                .filter(|m| m.sender == format!("w{w}"))
                .map(|m| m.body.as_str())
                .collect();
            let expected: Vec<String> = (0..20)
                .flat_map(|r| (0..3).map(move |i| format!("{r}.{i}")))
                .collect();
            assert_eq!(mine, expected, "{room}, writer {w}");
        }
    }
}
