//! Tokens: first-frame auth, refresh before expiry, giving up on a refused token.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use seqcast_client::{Client, Error, Event, Options, State};
use serde_json::json;
use support::{mint_token, next_matching, Node};

const SECRET: &str = "rust-client-test-secret";

async fn node() -> Node {
    // No leeway: a connection whose token is not refreshed is closed right at exp.
    Node::start(&[("SEQCAST_JWT_SECRET", SECRET), ("SEQCAST_JWT_LEEWAY", "0s")]).await
}

#[tokio::test]
async fn a_token_refreshed_before_exp_keeps_the_connection_past_exp() {
    let node = node().await;
    let calls = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&calls);
    let opts = Options::new(&node.ws)
        .refresh_margin(Duration::from_secs(2)) // a 5 s token is refreshed at about 3 s
        .token_fn(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Ok(mint_token(SECRET, "alice", 5)) }
        });
    let (c, mut events) = Client::new(opts);
    c.join("refresh-room", None).await.unwrap();
    let started = Instant::now();
    // Past the first token's exp (5 s, leeway 0) and the second's (~8 s).
    tokio::time::sleep(Duration::from_secs(9)).await;
    let ack = c
        .send("refresh-room", json!("still here"), None)
        .await
        .unwrap();
    assert_eq!(ack.seq, 1);
    let mut others = Vec::new();
    let m = next_matching(
        &mut events,
        Duration::from_secs(5),
        "own message",
        |e| match e {
            Event::Message(m) => Some(m),
            e => {
                others.push(e);
                None
            }
        },
    )
    .await;
    assert_eq!(m.from, "alice", "the token got there");
    // One connection all along, and no error.
    let expected = [
        Event::State(State::Connecting),
        Event::State(State::Open {
            url: node.ws.clone(),
        }),
    ];
    assert_eq!(others, expected);
    c.close().await;
    let calls = calls.load(Ordering::SeqCst);
    assert!(calls >= 3, "token callback called {calls} times");
    println!(
        "refresh: connection kept {:.1} s with 5 s tokens, token callback called {calls} times",
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test]
async fn a_refused_fixed_token_closes_the_client() {
    let node = node().await;
    let (c, mut events) = Client::new(Options::new(&node.ws).token("not-a-jwt"));
    let err = c.join("nope", None).await.unwrap_err();
    assert!(matches!(err, Error::Unauthorized(_)), "{err:?}");
    next_matching(&mut events, Duration::from_secs(5), "closed", |e| {
        (e == Event::State(State::Closed { code: Some(1008) })).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_refused_token_from_the_callback_is_retried_then_given_up() {
    let node = node().await;
    let calls = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&calls);
    let opts = Options::new(&node.ws)
        .backoff(Duration::from_millis(10), Duration::from_millis(50))
        .token_fn(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Ok(mint_token("another-secret", "mallory", 60)) }
        });
    let (c, _events) = Client::new(opts);
    let err = c.send("nope", json!(1), None).await.unwrap_err();
    assert!(matches!(err, Error::Unauthorized(_)), "{err:?}");
    // The first try and max_auth_failures (3) more, each with a fresh token.
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}
