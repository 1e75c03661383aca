//! Store invariants under random sequences of batches, on SQLite and on Postgres.
//!
//! A case is a list of steps; a step appends one or more batches to one room, several batches
//! concurrently. Senders and idempotency keys come from small sets, so duplicates (earlier, in
//! the same batch, in a concurrent batch) are frequent. After every step the room is read back
//! and checked: seqs are `1..=n` with no hole, what was stored before is unchanged, every
//! result equals the stored row, a batch's new messages take consecutive seqs in input order,
//! each key is stored once and every duplicate is answered with that original. At the end of
//! the case every room is paged forwards and backwards with several page sizes and must read
//! the same as the whole list. Each case uses rooms of its own, so one store serves them all.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use serde_json::json;

use seqcast::store::{
    Appended, NewMessage, PostgresStore, RoomInfo, SqliteStore, Store, StoredMessage,
};

use crate::config;
use crate::support::postgres::TestPostgres;

/// Cases per backend in `cargo test`; `PROPTEST_CASES` overrides.
const CASES: u32 = 48;

#[derive(Debug, Clone)]
struct Msg {
    sender: u8,
    idem: Option<u8>,
}

#[derive(Debug, Clone)]
struct Step {
    room: u8,
    /// Appended concurrently when there are several.
    batches: Vec<Vec<Msg>>,
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let msg =
        (0_u8..3, proptest::option::of(0_u8..5)).prop_map(|(sender, idem)| Msg { sender, idem });
    let batch = vec(msg, 1..6);
    let step = (0_u8..3, vec(batch, 1..4)).prop_map(|(room, batches)| Step { room, batches });
    vec(step, 1..8)
}

/// Runs the property on `store` with a runtime of its own (proptest drives cases synchronously).
fn run(
    name: &str,
    make_store: impl std::future::Future<Output = (Arc<dyn Store>, Option<tempfile::TempDir>)>,
) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (store, _dir) = rt.block_on(make_store);
    let next_case = AtomicU64::new(0);
    let mut runner = TestRunner::new(config(CASES));
    let outcome = runner.run(&steps(), |steps| {
        let case = next_case.fetch_add(1, Ordering::Relaxed);
        rt.block_on(check_case(store.as_ref(), case, &steps));
        Ok(())
    });
    if let Err(e) = outcome {
        panic!("{name}: {e}");
    }
}

#[test]
fn sqlite_batches_keep_seqs_and_duplicates() {
    run("sqlite", async {
        let dir = tempfile::Builder::new()
            .prefix("seqcast-prop-")
            .tempdir()
            .unwrap();
        let url = format!("sqlite://{}", dir.path().join("seqcast.db").display());
        let store: Arc<dyn Store> = Arc::new(SqliteStore::connect(&url).await.unwrap());
        (store, Some(dir))
    });
}

#[test]
fn postgres_batches_keep_seqs_and_duplicates() {
    run("postgres", async {
        let url = TestPostgres::shared().fresh_database().await;
        let store: Arc<dyn Store> = Arc::new(PostgresStore::connect(&url).await.unwrap());
        (store, None)
    });
}

/// (sender, idem)
type Key = (String, String);

async fn check_case(store: &dyn Store, case: u64, steps: &[Step]) {
    // Per room: what it held after the last step, and the seq each key was stored under.
    let mut rooms: HashMap<String, Vec<StoredMessage>> = HashMap::new();
    let mut keys: HashMap<String, HashMap<Key, u64>> = HashMap::new();
    for (s, step) in steps.iter().enumerate() {
        let room = format!("p{case}-r{}", step.room);
        let batches: Vec<Vec<NewMessage>> = step
            .batches
            .iter()
            .enumerate()
            .map(|(b, batch)| {
                batch
                    .iter()
                    .enumerate()
                    .map(|(i, m)| NewMessage {
                        sender: format!("s{}", m.sender),
                        body: json!({"case": case, "step": s, "batch": b, "i": i}).to_string(),
                        idem: m.idem.map(|k| format!("k{k}")),
                    })
                    .collect()
            })
            .collect();
        let results: Vec<Vec<Appended>> =
            futures_util::future::join_all(batches.iter().map(|batch| store.append(&room, batch)))
                .await
                .into_iter()
                .map(|r| r.unwrap_or_else(|e| panic!("append to {room}: {e}")))
                .collect();
        let before = rooms.remove(&room).unwrap_or_default();
        let known = keys.entry(room.clone()).or_default();
        let all = store.read_after(&room, 0, None, 100_000).await.unwrap();
        let step_name = format!("case {case} step {s} ({room}, {} batches)", batches.len());

        for (i, m) in all.iter().enumerate() {
            assert_eq!(
                m.seq,
                i as u64 + 1,
                "{step_name}: seqs have a hole: {all:#?}"
            );
            assert_eq!(m.room, room);
        }
        assert!(
            all.starts_with(&before),
            "{step_name}: stored messages changed:\nbefore {before:#?}\nafter {all:#?}"
        );

        let mut new_count = 0;
        let mut new_keys: HashMap<Key, u64> = HashMap::new();
        let mut duplicates: Vec<(Key, u64)> = Vec::new();
        for (batch, appended) in batches.iter().zip(&results) {
            assert_eq!(
                appended.len(),
                batch.len(),
                "{step_name}: one result per message"
            );
            let mut last_new: Option<u64> = None;
            let mut seen: HashSet<Key> = HashSet::new();
            for (m, a) in batch.iter().zip(appended) {
                let seq = a.message.seq;
                let row = usize::try_from(seq)
                    .unwrap()
                    .checked_sub(1)
                    .and_then(|i| all.get(i));
                assert_eq!(
                    row,
                    Some(&a.message),
                    "{step_name}: a result differs from the stored row"
                );
                assert_eq!(a.message.sender, m.sender, "{step_name}: sender");
                let key = m.idem.clone().map(|idem| (m.sender.clone(), idem));
                if a.duplicate {
                    let key = key.unwrap_or_else(|| {
                        panic!("{step_name}: a message without idem reported as duplicate: {a:?}")
                    });
                    if step.batches.len() == 1 && !known.contains_key(&key) {
                        assert!(
                            seen.contains(&key),
                            "{step_name}: duplicate of {key:?} before its original in the batch"
                        );
                    }
                    duplicates.push((key.clone(), seq));
                    seen.insert(key);
                } else {
                    new_count += 1;
                    assert!(
                        seq as usize > before.len(),
                        "{step_name}: a new message got the old seq {seq}"
                    );
                    assert_eq!(a.message.body, m.body, "{step_name}: body");
                    if let Some(prev) = last_new {
                        assert_eq!(
                            seq,
                            prev + 1,
                            "{step_name}: a batch's new messages take consecutive seqs in order"
                        );
                    }
                    last_new = Some(seq);
                    if let Some(key) = key {
                        assert!(
                            !known.contains_key(&key),
                            "{step_name}: {key:?} stored again (first as seq {:?})",
                            known.get(&key)
                        );
                        assert!(
                            new_keys.insert(key.clone(), seq).is_none(),
                            "{step_name}: {key:?} stored twice in one step"
                        );
                        seen.insert(key);
                    }
                }
            }
        }
        assert_eq!(
            all.len(),
            before.len() + new_count,
            "{step_name}: rows stored vs new results"
        );
        known.extend(new_keys);
        for (key, seq) in duplicates {
            assert_eq!(
                known.get(&key),
                Some(&seq),
                "{step_name}: duplicate of {key:?} not answered with the original"
            );
        }
        rooms.insert(room, all);
    }

    for (room, all) in &rooms {
        check_pages(store, room, all).await;
    }
    let mut names: Vec<String> = rooms.keys().cloned().collect();
    names.push(format!("p{case}-never-written"));
    let mut heads = store.room_heads(&names).await.unwrap();
    heads.sort();
    let mut expected: Vec<(String, u64)> = rooms
        .iter()
        .map(|(room, all)| (room.clone(), all.len() as u64))
        .collect();
    expected.sort();
    assert_eq!(heads, expected, "case {case}: room_heads");
}

/// Pages of every size read the same as the whole list, forwards and backwards.
async fn check_pages(store: &dyn Store, room: &str, all: &[StoredMessage]) {
    let n = all.len() as u64;
    assert_eq!(
        store.room_info(room).await.unwrap(),
        RoomInfo { head: n, first: 1 }
    );
    for limit in [1, 2, 3, 7, 1000] {
        let mut forward = Vec::new();
        let mut after = 0;
        for _ in 0..=all.len() {
            let page = store.read_after(room, after, None, limit).await.unwrap();
            assert!(page.len() <= limit, "{room}: page over its limit");
            let Some(last) = page.last() else { break };
            after = last.seq;
            forward.extend(page);
        }
        assert_eq!(forward, all, "{room}: read_after pages of {limit}");

        let mut backward: Vec<StoredMessage> = Vec::new();
        let mut before = n + 1;
        for _ in 0..=all.len() {
            let page = store.read_before(room, before, limit).await.unwrap();
            assert!(page.len() <= limit, "{room}: page over its limit");
            let Some(first) = page.first() else { break };
            assert_eq!(
                page.last().map(|m| m.seq),
                Some(before - 1),
                "{room}: read_before({before}) ends just below"
            );
            before = first.seq;
            backward.splice(0..0, page);
        }
        assert_eq!(backward, all, "{room}: read_before pages of {limit}");
    }
    // Windows with an upper bound.
    for after in [0, n / 3, n / 2, n.saturating_sub(1), n] {
        for up_to in [after, after + 1, n, n + 5] {
            let got = store
                .read_after(room, after, Some(up_to), 1000)
                .await
                .unwrap();
            let end = usize::try_from(up_to.min(n)).unwrap();
            let start = usize::try_from(after).unwrap().min(end);
            assert_eq!(
                got,
                all[start..end],
                "{room}: read_after({after}, up_to {up_to})"
            );
        }
    }
}
