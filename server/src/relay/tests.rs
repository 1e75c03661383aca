//! Head checks against a real (SQLite) store, with a hub whose sessions come and go mid-check.

use std::sync::atomic::AtomicUsize;
use std::sync::Mutex;

use async_trait::async_trait;

use super::*;
use crate::hub::{Delivery, Mailbox};
use crate::store::instrumented::Instrumented;
use crate::store::NewMessage;

/// A store whose room `r` holds `count` messages.
async fn store_with(count: usize) -> Arc<Instrumented> {
    let store = Instrumented::new().await;
    let messages: Vec<NewMessage> = (0..count)
        .map(|n| NewMessage {
            sender: "alice".into(),
            body: n.to_string(),
            idem: None,
        })
        .collect();
    for chunk in messages.chunks(500) {
        store.append_rooms(&[("r", chunk)]).await.expect("append");
    }
    store
}

fn clustered() -> Hub {
    let (changes, _) = mpsc::unbounded_channel();
    let (holes, _) = mpsc::unbounded_channel();
    Hub::clustered(changes, holes)
}

fn seqs(mailbox: &Mailbox) -> Vec<u64> {
    std::iter::from_fn(|| match mailbox.try_recv()? {
        Delivery::Live(live) => Some(live.seq),
        other => panic!("unexpected {other:?}"),
    })
    .collect()
}

fn live(seq: u64) -> Arc<Live> {
    Arc::new(Live {
        room: "r".into(),
        seq,
        frame: Utf8Bytes::from(format!("m{seq}")),
    })
}

/// Issue 10, 2.5: the room's last session leaves while `room_heads` runs. The check must not
/// read the room (from 0 that was its whole history, inline, stalling every head check).
#[tokio::test]
async fn a_room_left_during_the_heads_query_is_not_read() {
    let store = store_with(1200).await;
    let hub = clustered();
    hub.subscribe("r", 1, Mailbox::new(16));
    hub.init_head("r", 1000);
    let leaving = hub.clone();
    store.during_next_heads(Box::new(move || leaving.unsubscribe("r", 1)));
    check_heads(store.as_ref(), &hub, &Notify::new())
        .await
        .expect("check");
    assert_eq!(store.read_rows(), 0, "nothing read");
}

/// A room far behind is read a bounded number of pages per check; the next check goes on.
#[tokio::test]
async fn a_check_reads_a_bounded_amount_per_room_and_goes_on() {
    let total = REPAIR_PAGE * (CHECK_REPAIR_PAGES + 2);
    let store = store_with(total).await;
    let hub = clustered();
    let mailbox = Mailbox::new(total * 2);
    hub.subscribe("r", 1, Arc::clone(&mailbox));
    hub.init_head("r", 0);
    let again = Notify::new();
    check_heads(store.as_ref(), &hub, &again)
        .await
        .expect("check");
    assert_eq!(store.reads(), CHECK_REPAIR_PAGES, "bounded per check");
    assert_eq!(
        hub.delivered("r"),
        Some((REPAIR_PAGE * CHECK_REPAIR_PAGES) as u64)
    );
    // The rest follows at once, in the next check.
    tokio::time::timeout(std::time::Duration::from_secs(1), again.notified())
        .await
        .expect("another check asked for");
    check_heads(store.as_ref(), &hub, &again)
        .await
        .expect("check");
    assert_eq!(hub.delivered("r"), Some(total as u64));
    let got = seqs(&mailbox);
    assert_eq!(
        got,
        (1..=total as u64).collect::<Vec<_>>(),
        "in order, each once"
    );
}

/// Issue 10, item 1: holes of other nodes' messages between this node's own (the bus is down):
/// one head check reads them all in one pass, rather than one read (and one grace) per hole.
#[tokio::test]
async fn every_hole_of_a_room_is_read_in_one_pass() {
    let store = store_with(30).await;
    let hub = clustered();
    let mailbox = Mailbox::new(64);
    hub.subscribe("r", 1, Arc::clone(&mailbox));
    hub.init_head("r", 0);
    // This node's own commits, each beyond a hole.
    for seq in [5, 10, 20] {
        assert_eq!(hub.publish(live(seq)).1, 0, "held");
    }
    check_heads(store.as_ref(), &hub, &Notify::new())
        .await
        .expect("check");
    assert_eq!(store.reads(), 1, "one read for three holes");
    assert_eq!(seqs(&mailbox), (1..=30).collect::<Vec<_>>());
}

/// A bus whose first `failures` SUBSCRIBEs fail (as against a paused Redis) while its state
/// stays up, so no reconnect event ever asks for a resubscription.
struct FlakyBus {
    failures: AtomicUsize,
    subscribed: Mutex<Vec<String>>,
}

#[async_trait]
impl Bus for FlakyBus {
    fn kind(&self) -> &'static str {
        "flaky"
    }
    fn publish(&self, _message: &crate::bus::BusMessage) {}
    async fn subscribe(&self, room: &str) -> Result<(), crate::bus::BusError> {
        let failing = self
            .failures
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Err(crate::bus::BusError::Timeout);
        }
        self.subscribed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(room.to_owned());
        Ok(())
    }
    async fn unsubscribe(&self, _room: &str) -> Result<(), crate::bus::BusError> {
        Ok(())
    }
    fn publish_ephemeral(&self, _event: &crate::bus::Ephemeral) {}
    async fn subscribe_user(&self, _user: &str) -> Result<(), crate::bus::BusError> {
        Ok(())
    }
    async fn unsubscribe_user(&self, _user: &str) -> Result<(), crate::bus::BusError> {
        Ok(())
    }
    fn state(&self) -> BusState {
        BusState::Up
    }
}

impl FlakyBus {
    fn failing(failures: usize) -> Arc<FlakyBus> {
        Arc::new(FlakyBus {
            failures: AtomicUsize::new(failures),
            subscribed: Mutex::new(Vec::new()),
        })
    }
}

/// A clustered hub whose subscriptions task runs on `bus`, with its renewals and its stop.
fn subscriptions_on(bus: &Arc<FlakyBus>) -> (Hub, Arc<Renewals>, CancellationToken) {
    let (changes_tx, changes) = mpsc::unbounded_channel();
    let (holes, _) = mpsc::unbounded_channel();
    let hub = Hub::clustered(changes_tx, holes);
    let stop = CancellationToken::new();
    let renewals = Arc::new(Renewals::default());
    tokio::spawn(subscriptions(
        Some(Arc::clone(bus) as Arc<dyn Bus>),
        hub.clone(),
        changes,
        Arc::new(Notify::new()),
        Arc::clone(&renewals),
        stop.clone(),
    ));
    (hub, renewals, stop)
}

/// Issue 10, 2.9: failed SUBSCRIBEs are retried (with backoff) until they succeed, while the bus
/// stays up.
#[tokio::test]
async fn a_failed_subscribe_is_retried_until_it_succeeds() {
    let bus = FlakyBus::failing(3);
    let (hub, _, stop) = subscriptions_on(&bus);
    hub.subscribe("r", 1, Mailbox::new(4));
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        if bus
            .subscribed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&"r".to_owned())
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the room was never subscribed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    stop.cancel();
}

/// How many times `room` was subscribed on `bus`.
fn times_subscribed(bus: &FlakyBus, room: &str) -> usize {
    let subscribed = bus.subscribed.lock().unwrap_or_else(|e| e.into_inner());
    subscribed.iter().filter(|r| *r == room).count()
}

/// Waits until `room` was subscribed `times` times on `bus`.
async fn subscribed_times(bus: &FlakyBus, room: &str, times: usize) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while times_subscribed(bus, room) < times {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{room} was not subscribed {times} times"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Dropped subscriptions (a Redis Cluster slot moved) renew only the topics the bus names, and
/// a reconnect renews them all.
#[tokio::test]
async fn a_renewal_of_some_topics_subscribes_only_those() {
    let bus = FlakyBus::failing(0);
    let (hub, renewals, stop) = subscriptions_on(&bus);
    for (i, room) in ["a", "b", "c"].into_iter().enumerate() {
        hub.subscribe(room, i as u64, Mailbox::new(4));
        subscribed_times(&bus, room, 1).await;
    }
    let only_b = || Affected::new(|t| *t == Topic::Room(Arc::from("b")));
    renewals.some(only_b());
    subscribed_times(&bus, "b", 2).await;
    // Once a second renewal of "b" is done, the first one certainly is.
    renewals.some(only_b());
    subscribed_times(&bus, "b", 3).await;
    assert_eq!(times_subscribed(&bus, "a"), 1);
    assert_eq!(times_subscribed(&bus, "c"), 1);
    renewals.all();
    for room in ["a", "b", "c"] {
        let before = if room == "b" { 3 } else { 1 };
        subscribed_times(&bus, room, before + 1).await;
    }
    stop.cancel();
}
