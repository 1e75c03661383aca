//! Paging a room's history: `read_after` and `read_before` bounds.

use std::sync::Arc;

use seqcast::store::Store;

use crate::{fill, seqs};

contract!(read_after_bounds_and_limit, read_before_is_ascending);

async fn read_after_bounds_and_limit(store: Arc<dyn Store>) {
    fill(&*store, "general", 10).await;
    let read = |after, up_to, limit| {
        let store = store.clone();
        async move {
            seqs(
                &store
                    .read_after("general", after, up_to, limit)
                    .await
                    .unwrap(),
            )
        }
    };
    assert_eq!(read(0, None, 100).await, (1..=10).collect::<Vec<_>>());
    assert_eq!(read(3, None, 4).await, [4, 5, 6, 7]);
    assert_eq!(read(8, None, 100).await, [9, 10]);
    assert_eq!(read(3, Some(5), 100).await, [4, 5]);
    assert_eq!(read(3, Some(9), 2).await, [4, 5]);
    assert_eq!(read(0, Some(0), 100).await, Vec::<u64>::new());
    assert_eq!(read(5, Some(5), 100).await, Vec::<u64>::new());
    assert_eq!(read(10, None, 100).await, Vec::<u64>::new());
    assert_eq!(read(u64::MAX, None, 100).await, Vec::<u64>::new());
    assert_eq!(read(0, Some(u64::MAX), 3).await, [1, 2, 3]);
    assert_eq!(read(0, None, 0).await, Vec::<u64>::new());
}

async fn read_before_is_ascending(store: Arc<dyn Store>) {
    fill(&*store, "general", 10).await;
    let read = |before, limit| {
        let store = store.clone();
        async move { seqs(&store.read_before("general", before, limit).await.unwrap()) }
    };
    assert_eq!(read(11, 3).await, [8, 9, 10]);
    assert_eq!(read(u64::MAX, 2).await, [9, 10]);
    assert_eq!(read(5, 100).await, [1, 2, 3, 4]);
    assert_eq!(read(5, 2).await, [3, 4]);
    assert_eq!(read(1, 100).await, Vec::<u64>::new());
    assert_eq!(read(0, 100).await, Vec::<u64>::new());
    assert_eq!(read(11, 0).await, Vec::<u64>::new());
    let messages = store.read_before("general", 4, 100).await.unwrap();
    assert_eq!(
        messages.iter().map(|m| m.body.as_str()).collect::<Vec<_>>(),
        ["0", "1", "2"]
    );
}
