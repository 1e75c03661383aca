//! Read cursors: `mark_read` only raises, caps at the head, stores no 0; `room_info_with_read`
//! and `unread` read them back, a page at a time in bytewise order; concurrent marks end at the
//! larger seq.

use std::sync::Arc;

use seqcast::store::{ReadMark, RoomInfo, Store, Unread};

use crate::fill;

contract!(
    cursors_only_move_up_and_stop_at_the_head,
    cursors_are_per_user_and_room,
    concurrent_marks_end_at_the_largest,
    unread_pages_by_room_name_bytewise,
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
    assert_eq!(
        store.unread("alice", "", 100).await.unwrap(),
        Vec::<Unread>::new()
    );

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
        store.unread("alice", "", 100).await.unwrap(),
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
        store.unread("alice", "", 100).await.unwrap(),
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
    assert_eq!(
        store.unread("carol", "", 100).await.unwrap(),
        Vec::<Unread>::new()
    );
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

/// `unread` pages: the first `limit` rooms after `after`, by name compared as bytes (as room
/// names are everywhere: "B" before "a", "a" before "a-1" before "a.1"), whatever the database's
/// collation (the contract's Postgres databases are ICU ones too, see `collation.rs`).
async fn unread_pages_by_room_name_bytewise(store: Arc<dyn Store>) {
    let rooms = ["a.1", "B", "a", "a-1", "_x", "Z9"];
    for room in rooms {
        fill(&*store, room, 2).await;
        store.mark_read("dora", room, 1).await.unwrap();
    }
    let mut sorted: Vec<&str> = rooms.to_vec();
    sorted.sort_unstable(); // str's Ord is bytewise
    let names = |page: Vec<Unread>| page.into_iter().map(|u| u.room).collect::<Vec<_>>();
    assert_eq!(names(store.unread("dora", "", 100).await.unwrap()), sorted);
    let mut paged = Vec::new();
    let mut after = String::new();
    loop {
        let page = names(store.unread("dora", &after, 4).await.unwrap());
        assert!(page.len() <= 4);
        let Some(last) = page.last() else { break };
        after = last.clone();
        paged.extend(page);
    }
    assert_eq!(paged, sorted, "pages of 4 cover every room once, in order");
    assert_eq!(
        names(store.unread("dora", "a", 2).await.unwrap()),
        ["a-1", "a.1"],
        "strictly after"
    );
    assert!(store.unread("dora", "zzz", 10).await.unwrap().is_empty());
}
