//! One contract for every bus: the same test functions run against the in-process bus and
//! against Redis pub/sub (a throwaway `redis-server`), like the store contract.
//!
//! Redis-only tests at the end exercise the failure modes the relay depends on: a paused Redis is
//! reported down within the timeout, publishing while down does not block, and a killed
//! subscription connection is reported as possible loss.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use seqcast::bus::local::LocalNetwork;
use seqcast::bus::redis::RedisBus;
use seqcast::bus::{Bus, BusEvent, BusMessage, BusState, Ephemeral, Topic};
use seqcast::redis::RedisLink;
use support::redis::TestRedis;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const TIMEOUT: Duration = Duration::from_millis(500);
const DEADLINE: Duration = Duration::from_secs(10);

type Node = (Arc<dyn Bus>, mpsc::Receiver<BusEvent>);

/// Two connected nodes of one bus, and whatever must live as long as they do.
struct Pair {
    a: Node,
    b: Node,
    _redis: Option<TestRedis>,
    stop: CancellationToken,
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn local_pair() -> Pair {
    let net = LocalNetwork::new();
    let (a, ra) = net.join();
    let (b, rb) = net.join();
    Pair {
        a: (Arc::new(a), ra),
        b: (Arc::new(b), rb),
        _redis: None,
        stop: CancellationToken::new(),
    }
}

async fn redis_node(redis: &TestRedis, stop: &CancellationToken) -> Node {
    let link = RedisLink::start(&redis.url(), "test:", TIMEOUT, stop.clone()).expect("link");
    let (bus, events) = RedisBus::start(&link, stop.clone());
    let bus: Arc<dyn Bus> = Arc::new(bus);
    wait_for_state(&bus, BusState::Up).await;
    (bus, events)
}

async fn redis_pair() -> Pair {
    let redis = TestRedis::start();
    let stop = CancellationToken::new();
    let a = redis_node(&redis, &stop).await;
    let b = redis_node(&redis, &stop).await;
    Pair {
        a,
        b,
        _redis: Some(redis),
        stop,
    }
}

async fn wait_for_state(bus: &Arc<dyn Bus>, want: BusState) {
    let until = Instant::now() + DEADLINE;
    while bus.state() != want {
        assert!(
            Instant::now() < until,
            "bus not {want:?} within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn message(room: &str, seq: u64) -> BusMessage {
    let frame = format!(r#"{{"type":"message","room":"{room}","seq":{seq},"body":"é"}}"#);
    BusMessage {
        room: Arc::from(room),
        seq,
        frame: Utf8Bytes::from(frame),
    }
}

/// The next message event, skipping state and loss notices; panics after `within`.
async fn next_message(events: &mut mpsc::Receiver<BusEvent>, within: Duration) -> BusMessage {
    let until = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(until, events.recv()).await {
            Ok(Some(BusEvent::Message(m))) => return m,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("bus event stream ended"),
            Err(_) => panic!("no message within {within:?}"),
        }
    }
}

/// Asserts no message arrives for a while (a negative check needs a bounded wait).
async fn no_message(events: &mut mpsc::Receiver<BusEvent>, within: Duration) {
    let until = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(until, events.recv()).await {
            Ok(Some(BusEvent::Message(m))) => panic!("unexpected message {m:?}"),
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => return,
        }
    }
}

/// Publishes `seq` until a message arrives on `to` (a fresh Redis subscription takes effect
/// asynchronously), then returns the seq that arrived first.
async fn publish_until_heard(
    from: &Arc<dyn Bus>,
    to: &mut mpsc::Receiver<BusEvent>,
    room: &str,
) -> u64 {
    let until = Instant::now() + DEADLINE;
    for seq in 1.. {
        from.publish(&message(room, seq));
        match tokio::time::timeout(Duration::from_millis(100), next_message(to, DEADLINE)).await {
            Ok(m) => return m.seq,
            Err(_) => assert!(Instant::now() < until, "nothing heard on {room}"),
        }
    }
    unreachable!()
}

async fn delivers_to_subscribers_with_the_same_bytes(mut p: Pair) {
    p.b.0.subscribe("r1").await.expect("subscribe");
    let first = publish_until_heard(&p.a.0, &mut p.b.1, "r1").await;
    for seq in first + 1..first + 50 {
        p.a.0.publish(&message("r1", seq));
    }
    for seq in first + 1..first + 50 {
        let got = next_message(&mut p.b.1, DEADLINE).await;
        let want = message("r1", seq);
        assert_eq!((&*got.room, got.seq), ("r1", seq), "in publish order");
        assert_eq!(
            got.frame.as_str(),
            want.frame.as_str(),
            "frame bytes unchanged"
        );
    }
}

async fn own_messages_do_not_come_back(mut p: Pair) {
    p.a.0.subscribe("r2").await.expect("subscribe a");
    p.b.0.subscribe("r2").await.expect("subscribe b");
    let first = publish_until_heard(&p.a.0, &mut p.b.1, "r2").await;
    // b's traffic reaches a, a's own does not.
    let heard = publish_until_heard(&p.b.0, &mut p.a.1, "r2").await;
    assert!(heard >= 1);
    p.a.0.publish(&message("r2", first + 1000));
    no_message(&mut p.a.1, Duration::from_millis(300)).await;
}

async fn only_subscribed_rooms_are_delivered(mut p: Pair) {
    p.b.0.subscribe("in").await.expect("subscribe");
    publish_until_heard(&p.a.0, &mut p.b.1, "in").await;
    p.a.0.publish(&message("out", 1));
    p.a.0.publish(&message("in", 1000));
    let got = next_message(&mut p.b.1, DEADLINE).await;
    assert_eq!(
        (&*got.room, got.seq),
        ("in", 1000),
        "`out` was never subscribed"
    );
    p.b.0.unsubscribe("in").await.expect("unsubscribe");
    p.b.0
        .unsubscribe("in")
        .await
        .expect("unsubscribe is idempotent");
    p.a.0.publish(&message("in", 1001));
    no_message(&mut p.b.1, Duration::from_millis(300)).await;
}

fn ephemeral(topic: Topic, n: u64) -> Ephemeral {
    Ephemeral {
        topic,
        frame: Utf8Bytes::from(format!(r#"{{"type":"signal","n":{n},"body":"é"}}"#)),
    }
}

/// The next ephemeral event, skipping everything else; panics after `within`.
async fn next_ephemeral(events: &mut mpsc::Receiver<BusEvent>, within: Duration) -> Ephemeral {
    let until = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(until, events.recv()).await {
            Ok(Some(BusEvent::Ephemeral(e))) => return e,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("bus event stream ended"),
            Err(_) => panic!("no ephemeral frame within {within:?}"),
        }
    }
}

/// The `n` an [`ephemeral`] frame carries.
fn number(e: &Ephemeral) -> u64 {
    let v: serde_json::Value = serde_json::from_str(e.frame.as_str()).expect("json");
    v["n"].as_u64().expect("n")
}

/// Publishes numbered ephemeral frames on `topic` until one arrives on `to` (a fresh Redis
/// subscription takes effect asynchronously); returns the number that arrived.
async fn ephemeral_until_heard(
    from: &Arc<dyn Bus>,
    to: &mut mpsc::Receiver<BusEvent>,
    topic: Topic,
) -> u64 {
    let until = Instant::now() + DEADLINE;
    for n in 1.. {
        from.publish_ephemeral(&ephemeral(topic.clone(), n));
        match tokio::time::timeout(Duration::from_millis(100), next_ephemeral(to, DEADLINE)).await {
            Ok(e) => {
                assert_eq!(e.topic, topic);
                return number(&e);
            }
            Err(_) => assert!(Instant::now() < until, "nothing heard on {topic:?}"),
        }
    }
    unreachable!()
}

/// Waits for the ephemeral frame numbered `n` (earlier ones, sent while waiting for the
/// subscription, may still be on their way) and returns it.
async fn ephemeral_numbered(events: &mut mpsc::Receiver<BusEvent>, n: u64) -> Ephemeral {
    loop {
        let e = next_ephemeral(events, DEADLINE).await;
        let got = number(&e);
        if got == n {
            return e;
        }
        assert!(got < 1000, "unexpected frame {got} while waiting for {n}");
    }
}

/// Asserts no ephemeral frame numbered `n` arrives for a while (a negative check needs a
/// bounded wait, as [`no_message`]).
async fn never_numbered(events: &mut mpsc::Receiver<BusEvent>, n: u64) {
    let until = tokio::time::Instant::now() + Duration::from_millis(300);
    while let Ok(Some(event)) = tokio::time::timeout_at(until, events.recv()).await {
        if let BusEvent::Ephemeral(e) = event {
            assert_ne!(number(&e), n, "frame {n} should not have arrived");
        }
    }
}

/// Signals travel on their room's channel, beside its messages, and come out as ephemeral
/// events (no seq), byte for byte; a node hears neither its own nor a room's it left.
async fn signals_reach_the_room_subscribers_as_ephemeral(mut p: Pair) {
    let room = Topic::Room(Arc::from("s1"));
    p.a.0.subscribe("s1").await.expect("subscribe a");
    p.b.0.subscribe("s1").await.expect("subscribe b");
    ephemeral_until_heard(&p.a.0, &mut p.b.1, room.clone()).await;
    // A message and a signal on the same channel: each comes out as what it is.
    publish_until_heard(&p.a.0, &mut p.b.1, "s1").await;
    let sent = ephemeral(room.clone(), 5000);
    p.a.0.publish_ephemeral(&sent);
    let got = ephemeral_numbered(&mut p.b.1, 5000).await;
    assert_eq!(got.topic, room);
    assert_eq!(
        got.frame.as_str(),
        sent.frame.as_str(),
        "frame bytes unchanged"
    );
    // Not back to its own node (which does listen: it hears b's).
    ephemeral_until_heard(&p.b.0, &mut p.a.1, room.clone()).await;
    p.a.0.publish_ephemeral(&ephemeral(room.clone(), 6000));
    never_numbered(&mut p.a.1, 6000).await;
    p.b.0.unsubscribe("s1").await.expect("unsubscribe");
    p.a.0.publish_ephemeral(&ephemeral(room, 7000));
    never_numbered(&mut p.b.1, 7000).await;
}

/// Read cursors travel on a user's channel, to the nodes subscribed to that user only.
async fn user_frames_reach_only_nodes_of_that_user(mut p: Pair) {
    let alice = Topic::User(Arc::from("alice"));
    p.b.0
        .subscribe_user("alice")
        .await
        .expect("subscribe alice");
    ephemeral_until_heard(&p.a.0, &mut p.b.1, alice.clone()).await;
    // Neither another user's nor a room's of the same name reaches b.
    p.a.0
        .publish_ephemeral(&ephemeral(Topic::User(Arc::from("bob")), 5001));
    p.a.0
        .publish_ephemeral(&ephemeral(Topic::Room(Arc::from("alice")), 5002));
    p.a.0.publish_ephemeral(&ephemeral(alice.clone(), 5003));
    let got = ephemeral_numbered(&mut p.b.1, 5003).await;
    assert_eq!(got.topic, alice);
    p.b.0.unsubscribe_user("alice").await.expect("unsubscribe");
    p.b.0
        .unsubscribe_user("alice")
        .await
        .expect("unsubscribe is idempotent");
    p.a.0.publish_ephemeral(&ephemeral(alice, 6000));
    never_numbered(&mut p.b.1, 6000).await;
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod local {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::local_pair()).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::redis_pair().await).await;
                }
            )*
        }
    };
}

contract!(
    delivers_to_subscribers_with_the_same_bytes,
    own_messages_do_not_come_back,
    only_subscribed_rooms_are_delivered,
    signals_reach_the_room_subscribers_as_ephemeral,
    user_frames_reach_only_nodes_of_that_user,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_is_reported_down_and_publishing_does_not_block() {
    let mut p = redis_pair().await;
    p.b.0.subscribe("p").await.expect("subscribe");
    publish_until_heard(&p.a.0, &mut p.b.1, "p").await;
    let redis = p._redis.as_ref().expect("redis");
    redis.pause();
    let paused_at = Instant::now();
    wait_for_state(&p.a.0, BusState::Down).await;
    let detected = paused_at.elapsed();
    eprintln!("paused Redis detected after {detected:?} (timeout {TIMEOUT:?})");
    assert!(detected < TIMEOUT * 6, "detection took {detected:?}");
    let started = Instant::now();
    for seq in 0..10_000 {
        p.a.0.publish(&message("p", 10_000 + seq));
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "publish must never wait on Redis"
    );
    redis.resume();
    wait_for_state(&p.a.0, BusState::Up).await;
    wait_for_state(&p.b.0, BusState::Up).await;
    // The relay renews subscriptions after a reconnect; do the same, then traffic flows again.
    p.b.0.subscribe("p").await.expect("resubscribe");
    publish_until_heard(&p.a.0, &mut p.b.1, "p").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_subscription_is_reported_as_possible_loss() {
    let mut p = redis_pair().await;
    p.b.0.subscribe("k").await.expect("subscribe");
    publish_until_heard(&p.a.0, &mut p.b.1, "k").await;
    let reply = p
        ._redis
        .as_ref()
        .expect("redis")
        .command(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert!(!reply.starts_with("-"), "CLIENT KILL failed: {reply}");
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        match tokio::time::timeout_at(until, p.b.1.recv()).await {
            Ok(Some(BusEvent::MaybeLost)) => break,
            Ok(Some(_)) => continue,
            other => panic!("no loss notice after CLIENT KILL: {other:?}"),
        }
    }
    p.b.0.subscribe("k").await.expect("resubscribe");
    publish_until_heard(&p.a.0, &mut p.b.1, "k").await;
}
