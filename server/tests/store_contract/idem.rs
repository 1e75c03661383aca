//! Idempotency keys: a repeated (room, sender, idem) returns the original.

use std::sync::Arc;

use seqcast::store::{Appended, RoomInfo, Store};

use crate::{appended_seqs, keyed, msg, seqs};

contract!(
    repeated_idem_returns_the_original,
    idem_is_scoped_to_sender_and_room,
    repeated_idem_within_one_batch,
);

async fn repeated_idem_returns_the_original(store: Arc<dyn Store>) {
    let original = store
        .append("general", &[keyed("alice", r#""first""#, "k1")])
        .await
        .unwrap()
        .remove(0);
    assert!(!original.duplicate);
    store.append("general", &[msg("bob", "2")]).await.unwrap();

    // Same sender, same key, other body: the original comes back, nothing new is stored.
    let repeat = store
        .append("general", &[keyed("alice", r#""second""#, "k1")])
        .await
        .unwrap();
    assert_eq!(
        repeat,
        [Appended {
            message: original.message.clone(),
            duplicate: true
        }]
    );
    assert_eq!(
        store.room_info("general").await.unwrap(),
        RoomInfo { head: 2, first: 1 }
    );
    assert_eq!(
        seqs(&store.read_after("general", 0, None, 100).await.unwrap()),
        [1, 2]
    );

    // A repeat within a batch of new messages: those still get the next seqs.
    let mixed = store
        .append(
            "general",
            &[
                msg("carol", "3"),
                keyed("alice", r#""third""#, "k1"),
                keyed("alice", "4", "k2"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(appended_seqs(&mixed), [3, 1, 4]);
    assert_eq!(
        mixed.iter().map(|a| a.duplicate).collect::<Vec<_>>(),
        [false, true, false]
    );
    assert_eq!(mixed[1].message, original.message);
    assert_eq!(store.room_info("general").await.unwrap().head, 4);
}

async fn idem_is_scoped_to_sender_and_room(store: Arc<dyn Store>) {
    let alice = store
        .append("general", &[keyed("alice", "1", "k")])
        .await
        .unwrap();
    let bob = store
        .append("general", &[keyed("bob", "2", "k")])
        .await
        .unwrap();
    let elsewhere = store
        .append("random", &[keyed("alice", "3", "k")])
        .await
        .unwrap();
    assert!(!alice[0].duplicate && !bob[0].duplicate && !elsewhere[0].duplicate);
    assert_eq!(alice[0].message.seq, 1);
    assert_eq!(bob[0].message.seq, 2);
    assert_eq!(elsewhere[0].message.seq, 1);
    assert_ne!(alice[0].message.id, elsewhere[0].message.id);
}

async fn repeated_idem_within_one_batch(store: Arc<dyn Store>) {
    let appended = store
        .append(
            "general",
            &[
                keyed("alice", "1", "k"),
                keyed("bob", "2", "k"),
                keyed("alice", "3", "k"),
                msg("alice", "4"),
                keyed("bob", "5", "k"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(appended_seqs(&appended), [1, 2, 1, 3, 2]);
    assert_eq!(
        appended.iter().map(|a| a.duplicate).collect::<Vec<_>>(),
        [false, false, true, false, true]
    );
    assert_eq!(appended[2].message, appended[0].message);
    assert_eq!(appended[2].message.body, "1");
    assert_eq!(appended[4].message, appended[1].message);
    let stored = store.read_after("general", 0, None, 100).await.unwrap();
    assert_eq!(
        stored.iter().map(|m| m.body.as_str()).collect::<Vec<_>>(),
        ["1", "2", "4"]
    );
}
