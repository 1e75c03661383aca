//! The order in which a node's first joins of a room read the database, forced against a real
//! Postgres (issue 10, items 2.3 and 2.4), with no Redis so that another node's messages reach
//! the joining node only through its head checks.
//!
//! A join reads the room's head with one statement (`room_info`). The test holds an ACCESS
//! EXCLUSIVE lock on `rooms`, so that statement waits where the test can see it
//! (`pg_stat_activity`), then picks what happens to each waiting join: its backend is cancelled
//! (`pg_cancel_backend`, the join fails) or stopped (SIGSTOP to the backend process, the join
//! reads later than a second one). `cluster_joins` tries the same races by numbers; this makes
//! them happen every time.
//!
//! - 2.4: the first joiner (the session that opened the room on the node) fails its read while a
//!   second one joins. Before the fix only the opener seeded the room, so it stayed unseeded,
//!   head checks skipped it, and the second joiner never got another node's messages.
//! - 2.3: the second joiner reads an older head than the first. Before the fix the room was
//!   seeded with the first joiner's (newer) head, and the seqs between the two heads, committed
//!   on the other node, were never handed to the second joiner: in a quiet room it waited for
//!   them forever (a later message would have shown it the gap).
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sqlx::{Connection, Executor, PgConnection};

use support::cluster::Cluster;
use support::postgres::signal;
use support::scenario::scenario;
use support::ws::{Event, WsClient};

/// How long a joiner may take to get a message committed on the other node: the head-check
/// interval (100 ms) and a read, with room for a loaded box. Before the fix it never came.
const DELIVERY_DEADLINE: Duration = Duration::from_secs(10);
/// How long a join's statement may take to show up as waiting for the test's lock.
const WAIT_DEADLINE: Duration = Duration::from_secs(10);

/// The test's hold on the room head reads: a transaction with `rooms` locked, and a second
/// connection to watch and signal the node's backends.
struct Gate {
    lock: PgConnection,
    watch: PgConnection,
    /// Backends stopped with SIGSTOP, continued on drop whatever happens.
    stopped: Vec<u32>,
}

impl Gate {
    async fn close(database_url: &str) -> Gate {
        let mut lock = PgConnection::connect(database_url).await.unwrap();
        lock.execute("BEGIN").await.unwrap();
        lock.execute("LOCK TABLE rooms IN ACCESS EXCLUSIVE MODE")
            .await
            .unwrap();
        let watch = PgConnection::connect(database_url).await.unwrap();
        Gate {
            lock,
            watch,
            stopped: Vec::new(),
        }
    }

    /// Waits until `count` room head reads wait for the lock; returns their backends' pids,
    /// oldest statement first.
    async fn waiting(&mut self, count: usize) -> Vec<u32> {
        let until = Instant::now() + WAIT_DEADLINE;
        loop {
            let pids: Vec<(i32,)> = sqlx::query_as(
                "SELECT pid FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock' \
                   AND query LIKE '%min(seq)%' \
                 ORDER BY query_start, pid",
            )
            .fetch_all(&mut self.watch)
            .await
            .unwrap();
            if pids.len() >= count {
                return pids.into_iter().map(|(pid,)| pid as u32).collect();
            }
            assert!(
                Instant::now() < until,
                "{count} joins' head reads did not wait for the lock within {WAIT_DEADLINE:?} \
                 (saw {})",
                pids.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Cancels the statement of backend `pid`: its join fails.
    async fn cancel(&mut self, pid: u32) {
        let (cancelled,): (bool,) = sqlx::query_as("SELECT pg_cancel_backend($1)")
            .bind(pid as i32)
            .fetch_one(&mut self.watch)
            .await
            .unwrap();
        assert!(cancelled, "backend {pid} could not be cancelled");
    }

    /// Stops backend `pid`'s process: its statement goes on only after [`Gate::resume`].
    fn stop(&mut self, pid: u32) {
        signal("STOP", pid);
        self.stopped.push(pid);
    }

    fn resume(&mut self) {
        for pid in self.stopped.drain(..) {
            signal("CONT", pid);
        }
    }

    /// Releases the lock: waiting reads go on (stopped ones once resumed).
    async fn open(&mut self) {
        self.lock.execute("COMMIT").await.unwrap();
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.resume();
    }
}

/// Sends a `join` for `room` without waiting for the reply; returns its `ref`.
async fn send_join(client: &mut WsClient, room: &str) -> Value {
    let reference = client.new_ref();
    client
        .send_json(json!({"type": "join", "room": room, "ref": reference}))
        .await;
    reference
}

/// Reads `client`'s messages in `room` until seq `last`, expecting `after + 1 ..= last` in order.
async fn expect_seqs(client: &mut WsClient, what: &str, after: u64, last: u64) {
    let until = Instant::now() + DELIVERY_DEADLINE;
    let mut next = after + 1;
    while next <= last {
        let left = until.saturating_duration_since(Instant::now());
        match client.next_event(left).await {
            Some(Event::Frame(frame)) if frame["type"] == "message" => {
                assert_eq!(frame["seq"].as_u64(), Some(next), "{what}: {frame}");
                next += 1;
            }
            Some(Event::Frame(_)) => {}
            other => panic!(
                "{what} (joined at head {after}): waited {DELIVERY_DEADLINE:?} for seq {next} \
                 of {last}, committed on the other node: {other:?}"
            ),
        }
    }
}

/// Sends `count` messages to `room` through `sender`; returns the last seq.
async fn send(sender: &mut WsClient, room: &str, count: usize) -> u64 {
    let mut last = 0;
    for n in 0..count {
        let ack = sender.send_msg(room, json!({ "n": n })).await;
        assert_eq!(ack["type"], "ack", "{ack}");
        last = ack["seq"].as_u64().unwrap();
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_whose_first_join_failed_is_seeded_by_the_next_one() {
    scenario("first join fails", async {
        let cluster = Cluster::start(2, None, &[]).await;
        let room = "opener-fails";
        let mut sender = WsClient::connect(cluster.node(0)).await;
        let before = send(&mut sender, room, 2).await;

        let mut gate = Gate::close(&cluster.database_url).await;
        let mut opener = WsClient::connect(cluster.node(1)).await;
        let opener_ref = send_join(&mut opener, room).await;
        let opener_pid = gate.waiting(1).await[0];
        let mut second = WsClient::connect(cluster.node(1)).await;
        let second_ref = send_join(&mut second, room).await;
        let waiting = gate.waiting(2).await;
        assert_eq!(waiting[0], opener_pid, "the opener's read waits first");
        gate.cancel(opener_pid).await;
        let failed = opener.reply_to(&opener_ref).await;
        assert_eq!(failed["type"], "error", "the opener's join fails: {failed}");
        gate.open().await;
        let joined = second.reply_to(&second_ref).await;
        assert_eq!(joined["type"], "joined", "{joined}");
        assert_eq!(joined["head"].as_u64(), Some(before), "{joined}");

        let last = send(&mut sender, room, 3).await;
        expect_seqs(&mut second, "the second joiner", before, last).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joiner_that_read_an_older_head_gets_what_came_after_it() {
    scenario("second join reads first", async {
        let cluster = Cluster::start(2, None, &[]).await;
        let room = "older-head";
        let mut sender = WsClient::connect(cluster.node(0)).await;
        let older = send(&mut sender, room, 3).await;

        // The opener's read waits for the lock, then its backend stops, so the read it makes
        // once continued comes after the second joiner's and after more messages.
        let mut gate = Gate::close(&cluster.database_url).await;
        let mut opener = WsClient::connect(cluster.node(1)).await;
        let opener_ref = send_join(&mut opener, room).await;
        let opener_pid = gate.waiting(1).await[0];
        gate.stop(opener_pid);
        gate.open().await;
        let mut second = WsClient::connect(cluster.node(1)).await;
        let joined = second.join(room, None).await;
        assert_eq!(joined["head"].as_u64(), Some(older), "{joined}");

        let newer = send(&mut sender, room, 4).await;
        gate.resume();
        let opened = opener.reply_to(&opener_ref).await;
        assert_eq!(opened["type"], "joined", "{opened}");
        let opener_head = opened["head"].as_u64().unwrap();
        assert_eq!(
            opener_head, newer,
            "the opener read after the messages: {opened}"
        );

        // The room stays quiet now: nothing later shows the second joiner a gap, so the seqs
        // between its head and the opener's must come on their own.
        expect_seqs(&mut second, "the second joiner", older, newer).await;
        let last = send(&mut sender, room, 2).await;
        expect_seqs(&mut second, "the second joiner", newer, last).await;
        expect_seqs(&mut opener, "the opener", opener_head, last).await;
    })
    .await;
}
