//! Read cursors: `mark_read` only raises, caps at the head, stores no 0; `room_info_with_read`
//! and `unread` read them back; concurrent marks end at the larger seq.

use std::sync::Arc;

use seqcast::store::{ReadMark, RoomInfo, Store, Unread};

use crate::fill;

contract!(
    cursors_only_move_up_and_stop_at_the_head,
    cursors_are_per_user_and_room,
    concurrent_marks_end_at_the_largest,
);

async fn cursors_only_move_up_and_stop_at_the_head(store: Arc<dyn Store>) {
    // A room never written to has no head to read up to: nothing is stored.
    let mark = store.mark_read("alice", "empty", 5).await.unwrap();
    assert_eq!(
        mark,
        ReadMark {
            seq: 0,
            moved: false
        }
    );
    assert_eq!(store.unread("alice").await.unwrap(), Vec::<Unread>::new());

    fill(&*store, "general", 10).await;
    let mark = |seq| {
        let store = store.clone();
        async move { store.mark_read("alice", "general", seq).await.unwrap() }
    };
    assert_eq!(
        mark(0).await,
        ReadMark {
            seq: 0,
            moved: false
        },
        "0 stores nothing"
    );
    assert_eq!(
        mark(4).await,
        ReadMark {
            seq: 4,
            moved: true
        }
    );
    assert_eq!(
        mark(4).await,
        ReadMark {
            seq: 4,
            moved: false
        },
        "the same: no move"
    );
    assert_eq!(
        mark(2).await,
        ReadMark {
            seq: 4,
            moved: false
        },
        "never back"
    );
    assert_eq!(
        mark(99).await,
        ReadMark {
            seq: 10,
            moved: true
        },
        "capped at the head"
    );
    assert_eq!(
        mark(u64::MAX).await,
        ReadMark {
            seq: 10,
            moved: false
        }
    );
    assert_eq!(
        store.room_info_with_read("general", "alice").await.unwrap(),
        (RoomInfo { head: 10, first: 1 }, 10)
    );
    fill(&*store, "general", 5).await;
    assert_eq!(
        store.unread("alice").await.unwrap(),
        vec![Unread {
            room: "general".into(),
            head: 15,
            read: 10
        }]
    );
    assert_eq!(
        mark(12).await,
        ReadMark {
            seq: 12,
            moved: true
        }
    );
}

async fn cursors_are_per_user_and_room(store: Arc<dyn Store>) {
    fill(&*store, "b-room", 3).await;
    fill(&*store, "a-room", 8).await;
    fill(&*store, "quiet", 2).await;
    store.mark_read("alice", "b-room", 1).await.unwrap();
    store.mark_read("alice", "a-room", 8).await.unwrap();
    store.mark_read("bob", "a-room", 2).await.unwrap();
    assert_eq!(
        store.unread("alice").await.unwrap(),
        vec![
            Unread {
                room: "a-room".into(),
                head: 8,
                read: 8
            },
            Unread {
                room: "b-room".into(),
                head: 3,
                read: 1
            },
        ],
        "ordered by room; rooms without a cursor left out"
    );
    assert_eq!(
        store.room_info_with_read("a-room", "bob").await.unwrap().1,
        2
    );
    assert_eq!(
        store.room_info_with_read("quiet", "bob").await.unwrap(),
        (RoomInfo { head: 2, first: 1 }, 0),
        "no cursor: 0"
    );
    assert_eq!(
        store.room_info_with_read("never", "bob").await.unwrap(),
        (RoomInfo { head: 0, first: 1 }, 0)
    );
    assert_eq!(store.unread("carol").await.unwrap(), Vec::<Unread>::new());
}

async fn concurrent_marks_end_at_the_largest(store: Arc<dyn Store>) {
    fill(&*store, "busy", 200).await;
    let marks: Vec<_> = (1..=200u64)
        .rev()
        .map(|seq| {
            let store = store.clone();
            tokio::spawn(async move { store.mark_read("alice", "busy", seq).await.unwrap() })
        })
        .collect();
    let mut moved = 0;
    for mark in marks {
        let mark = mark.await.unwrap();
        moved += usize::from(mark.moved);
        assert!(mark.seq >= 1);
    }
    assert!(moved >= 1);
    assert_eq!(
        store.room_info_with_read("busy", "alice").await.unwrap().1,
        200
    );
}
