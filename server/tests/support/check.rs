//! Assertions on frames and answers as `protocol.md` defines them, and [`eventually`] for waiting
//! on a condition with a deadline (never a sleep as synchronization).
#![allow(dead_code)]

use std::future::Future;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Asserts `frame` is an `ack` for `room` with a seq, a UUID id and an RFC 3339 ts.
pub fn assert_ack(frame: &Value, room: &str) {
    assert_eq!(frame["type"], "ack", "expected an ack, got {frame}");
    assert_eq!(frame["room"], room, "ack names the room: {frame}");
    assert!(
        frame["seq"].as_u64().is_some_and(|s| s >= 1),
        "ack seq >= 1: {frame}"
    );
    assert_uuid(&frame["id"], frame);
    assert_rfc3339(&frame["ts"], frame);
}

/// Asserts `frame` is a complete `message` of `room` with sequence `seq`.
pub fn assert_message(frame: &Value, room: &str, seq: u64) {
    assert_eq!(frame["type"], "message", "expected a message, got {frame}");
    assert_eq!(frame["room"], room, "message room: {frame}");
    assert_eq!(frame["seq"], seq, "message seq: {frame}");
    assert!(frame["from"].is_string(), "message from: {frame}");
    assert!(frame.get("body").is_some(), "message body: {frame}");
    assert_uuid(&frame["id"], frame);
    assert_rfc3339(&frame["ts"], frame);
}

pub fn assert_uuid(value: &Value, context: &Value) {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("id is not a string: {context}"));
    assert!(
        uuid::Uuid::parse_str(text).is_ok(),
        "id is not a UUID: {context}"
    );
}

pub fn assert_rfc3339(value: &Value, context: &Value) {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("ts is not a string: {context}"));
    assert!(
        chrono::DateTime::parse_from_rfc3339(text).is_ok(),
        "ts is not RFC 3339: {context}"
    );
}

/// Asserts `seqs` is exactly `first..=last` in order (every seq once, no gap, no duplicate).
pub fn assert_contiguous(seqs: &[u64], first: u64, last: u64, what: &str) {
    let expected = last.saturating_sub(first) + 1;
    if let Some(position) = seqs
        .iter()
        .zip(first..)
        .position(|(got, want)| *got != want)
    {
        let from = position.saturating_sub(3);
        let to = (position + 4).min(seqs.len());
        panic!(
            "{what}: expected seqs {first}..={last} in order; at index {position} got {} \
             (neighbourhood {:?})",
            seqs[position],
            &seqs[from..to]
        );
    }
    assert_eq!(
        seqs.len() as u64,
        expected,
        "{what}: expected {expected} seqs {first}..={last}, got {} (last {:?})",
        seqs.len(),
        seqs.last()
    );
}

/// Polls `condition` until it holds, at most `deadline`; panics with `what` otherwise.
pub async fn eventually<F, Fut>(deadline: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let until = Instant::now() + deadline;
    loop {
        if condition().await {
            return;
        }
        if Instant::now() > until {
            panic!("{what}: not true within {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
