//! seqcast on a Redis Cluster (`REDIS_URL=redis-cluster://...`): 3 masters and 3 replicas on
//! loopback, started by the harness (`support::redis_cluster`).
//!
//! - `rooms_on_every_shard_deliver_in_order`: three seqcast nodes; three rooms whose channels
//!   live on three different shards, senders and subscribers on every node: every subscriber
//!   gets 1..N once, in order. The channels are shard channels (`PUBSUB SHARDNUMSUB` counts the
//!   three nodes; classic SUBSCRIBE would not show there), and messages came over the bus.
//! - `leader_and_user_rate_on_a_cluster`: exactly one leader is elected, and one user sending on
//!   two nodes gets the user rate once, not once per node (the rate script runs on the shard of
//!   the user's key).
//! - `shard_failover_loses_nothing`: a paced stream into a room; the master that owns the room's
//!   slot is killed mid-stream and its replica promoted: nothing lost, nothing duplicated, in
//!   order, the nodes' bus state shows the outage, and messages cross the bus again after it.
//!   FIGURE lines give the failover time and the delivery delays around it.
//! - `subscriptions_follow_a_moved_slot`: the slot of a room's channel moves to another master
//!   mid-stream (the shard unsubscribes the nodes, and fred drops that notice unseen): the nodes
//!   subscribe on the new shard, renewing that room's channel only (not their 8 other rooms'),
//!   every message arrives once, in order, and every message sent once they followed crosses
//!   the bus.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
mod support;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::watch;

use support::cluster::{spawn_sender, wait_until, Cluster, DelayStats, Ledger, Pacing, Sender};
use support::redis_cluster::RedisCluster;
use support::scenario::*;
use support::server::Claims;
use support::ws::{Auth, WsClient};

const SECRET: &str = "redis-cluster-test-secret";

/// Three seqcast nodes on the Redis Cluster, with `env`.
async fn nodes_on(redis: &RedisCluster, env: &[(&str, &str)]) -> Cluster {
    let url = redis.url();
    let mut all = vec![("REDIS_URL", url.as_str())];
    all.extend_from_slice(env);
    Cluster::start(3, None, &all).await
}

/// Waits until every node's bus is up.
async fn bus_up(cluster: &Cluster) {
    for i in 0..cluster.len() {
        wait_until(
            Duration::from_secs(20),
            &format!("n{i} bus up"),
            || async move { cluster.ready(i).await.1["bus_state"] == "up" },
        )
        .await;
    }
}

/// `count` room names whose channels are owned by `count` different masters.
fn rooms_on_distinct_shards(redis: &RedisCluster, count: usize) -> Vec<String> {
    let mut masters = BTreeSet::new();
    let mut rooms = Vec::new();
    for i in 0.. {
        let room = format!("shard{i}");
        let master = redis.master_of(redis.keyslot(&format!("seqcast:room:{room}")));
        if masters.insert(master) {
            rooms.push(room);
        }
        if rooms.len() == count {
            return rooms;
        }
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_on_every_shard_deliver_in_order() {
    scenario("rooms_on_every_shard_deliver_in_order", async {
        const PER_SENDER: usize = 100;
        let redis = RedisCluster::start(3);
        let cluster = nodes_on(&redis, &[]).await;
        bus_up(&cluster).await;
        let rooms = rooms_on_distinct_shards(&redis, 3);
        let until = Instant::now() + STREAM_DEADLINE;
        let progress = Arc::new(AtomicUsize::new(0));
        let mut all_listeners = Vec::new();
        let mut handles = Vec::new();
        for room in &rooms {
            let (target_tx, target) = watch::channel(0);
            let listeners = listeners_on(
                &cluster,
                room,
                &[("n0", 0), ("n1", 1), ("n2", 2)],
                &target,
                until,
            )
            .await;
            all_listeners.push((target_tx, listeners));
        }
        for room in &rooms {
            let channel = format!("seqcast:room:{room}");
            shard_subscribers_reach(&redis, &channel, 3, &format!("{channel} on its shard")).await;
            for node in 0..3 {
                let sender = Sender::new(format!("{room}-n{node}"), room, PER_SENDER);
                handles.push(spawn_sender(
                    sender,
                    vec![cluster.ws(node)],
                    Pacing::pipelined(8),
                    until,
                    Arc::clone(&progress),
                ));
            }
        }
        let senders = join_senders(handles).await;
        for (room, (target_tx, listeners)) in rooms.iter().zip(all_listeners) {
            let mine: Vec<&Sender> = senders.iter().filter(|s| s.room == *room).collect();
            let ledger = Ledger::of(&mine);
            assert_eq!(ledger.head, 3 * PER_SENDER as u64, "{room}");
            finish_and_check(listeners, &target_tx, &ledger).await;
        }
        let mut received = 0.0;
        for i in 0..3 {
            received += cluster.metric(i, "seqcast_bus_received_total").await;
        }
        assert!(received > 0.0, "messages crossed nodes over the bus");
        // A cluster whose slots stay put is not taken for one that moved them (which would
        // renew every subscription and check every head each second).
        for i in 0..3 {
            let moves = cluster.metric(i, "seqcast_bus_slot_moves_total").await;
            assert_eq!(moves, 0.0, "n{i} saw slots move on a still cluster");
        }
        figure("messages received over sharded pub/sub (3 nodes)", received);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_and_user_rate_on_a_cluster() {
    scenario("leader_and_user_rate_on_a_cluster", async {
        let redis = RedisCluster::start(3);
        let env = [
            ("SEQCAST_JWT_SECRET", SECRET),
            ("SEQCAST_USER_SEND_RATE", "10"),
        ];
        let cluster = nodes_on(&redis, &env).await;
        bus_up(&cluster).await;
        // Exactly one leader.
        let c = &cluster;
        wait_until(
            Duration::from_secs(20),
            "exactly one leader",
            || async move {
                let mut leaders = 0;
                for i in 0..3 {
                    if c.ready(i).await.1["leader"] == true {
                        leaders += 1;
                    }
                }
                assert!(leaders <= 1, "{leaders} leaders at once");
                leaders == 1
            },
        )
        .await;

        // One user on two nodes: burst 40 + 10/s in total, not per node.
        let token = Claims::new("frank", &["*"]).sign(SECRET);
        let token = token.as_str();
        let mut a = WsClient::try_connect(&cluster.node(0).ws_url(), Auth::Query(token))
            .await
            .unwrap();
        let mut b = WsClient::try_connect(&cluster.node(1).ws_url(), Auth::Query(token))
            .await
            .unwrap();
        let start = Instant::now();
        let (on_a, on_b) = tokio::join!(burst(&mut a, 60), burst(&mut b, 60));
        let elapsed = start.elapsed().as_secs_f64();
        let acked = on_a + on_b;
        assert!(
            acked as f64 <= 40.0 + 10.0 * elapsed + 2.0,
            "{acked} acked in {elapsed:.2}s: the limit was not shared"
        );
        assert!(acked >= 30, "{acked} acked: the limit refused too much");
    })
    .await;
}

/// Sends `n` messages at once and counts the acks (the rest are refused `rate_limited`).
async fn burst(ws: &mut WsClient, n: usize) -> usize {
    let refs: Vec<Value> = (0..n).map(|i| json!(format!("b{i}"))).collect();
    for r in &refs {
        ws.send_json(json!({"type": "send", "room": "rl", "body": 1, "ref": r}))
            .await;
    }
    let mut acked = 0;
    for r in &refs {
        let reply = ws.reply_to(r).await;
        match reply["type"].as_str() {
            Some("ack") => acked += 1,
            _ => assert_eq!(reply["code"], "rate_limited", "{reply}"),
        }
    }
    acked
}

/// Waits until at least `n` connections subscribe to `channel` on the shard that owns it.
async fn shard_subscribers_reach(redis: &RedisCluster, channel: &str, n: usize, what: &str) {
    wait_until(Duration::from_secs(20), what, || {
        let now = redis.shard_subscribers(channel);
        async move { now >= n }
    })
    .await;
}

/// A sender on node 0, about 100 messages/s.
fn paced_sender(
    cluster: &Cluster,
    label: &str,
    room: &str,
    messages: usize,
    until: Instant,
    progress: &Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<Sender> {
    spawn_sender(
        Sender::new(label, room, messages),
        vec![cluster.ws(0)],
        Pacing::paced(4, Duration::from_millis(10)),
        until,
        Arc::clone(progress),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_failover_loses_nothing() {
    scenario("shard_failover_loses_nothing", async {
        const MESSAGES: usize = 1200;
        let mut redis = RedisCluster::start(3);
        let cluster = nodes_on(&redis, &[]).await;
        bus_up(&cluster).await;
        let room = rooms_on_distinct_shards(&redis, 1).remove(0);
        let channel = format!("seqcast:room:{room}");
        let slot = redis.keyslot(&channel);
        let until = Instant::now() + STREAM_DEADLINE;
        let (target_tx, target) = watch::channel(0);
        let listeners = listeners_on(
            &cluster,
            &room,
            &[("n1-a", 1), ("n1-b", 1), ("n2", 2)],
            &target,
            until,
        )
        .await;
        shard_subscribers_reach(&redis, &channel, 2, "subscribed on the shard").await;
        let progress = Arc::new(AtomicUsize::new(0));
        let handles = vec![paced_sender(
            &cluster, "paced", &room, MESSAGES, until, &progress,
        )];
        progress_reaches(&progress, 150, "150 acks before the failover").await;
        let killed_at = Instant::now();
        let old = redis.kill_master_of(slot);
        eprintln!(
            "killed master :{old} after {} acks",
            progress.load(Ordering::Relaxed)
        );
        let failover = redis.wait_failover(slot, old).await;
        // The bus comes back on its own: the nodes see Redis up again, and messages cross on
        // the promoted replica.
        bus_up(&cluster).await;
        let up_again = killed_at.elapsed();
        let received_before = cluster.metric(1, "seqcast_bus_received_total").await;
        let senders = join_senders(handles).await;
        let ledger = ledger_of(&senders);
        assert_eq!(ledger.head, MESSAGES as u64);
        let streams = finish_and_check(listeners, &target_tx, &ledger).await;
        let received_after = cluster.metric(1, "seqcast_bus_received_total").await;
        assert!(
            received_after > received_before,
            "no message crossed the bus after the failover ({received_before} before)"
        );
        figure("bus up again on every node after the kill", ms(up_again));
        let during: Vec<Duration> = streams
            .iter()
            .flatten()
            .filter(|m| m.arrived >= killed_at)
            .map(|m| m.delay)
            .collect();
        figure(
            "shard failover (master killed to replica owning the slot)",
            ms(failover),
        );
        figure(
            "delivery delay of messages after the kill",
            DelayStats::of(during.into_iter()),
        );
        figure(
            "delivery delay over the whole stream",
            DelayStats::of(streams.iter().flatten().map(|m| m.delay)),
        );
        cluster.print_bus_metrics(&[0, 1, 2]).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_follow_a_moved_slot() {
    scenario("subscriptions_follow_a_moved_slot", async {
        // Sent around the move, then once the nodes follow (each about 100 messages/s).
        const AROUND: usize = 300;
        const AFTER: usize = 200;
        const OTHER_ROOMS: usize = 8;
        let redis = RedisCluster::start(3);
        let cluster = nodes_on(&redis, &[]).await;
        bus_up(&cluster).await;
        let room = rooms_on_distinct_shards(&redis, 1).remove(0);
        let channel = format!("seqcast:room:{room}");
        let slot = redis.keyslot(&channel);
        let until = Instant::now() + STREAM_DEADLINE;
        let (target_tx, target) = watch::channel(0);
        let listeners =
            listeners_on(&cluster, &room, &[("n1", 1), ("n2", 2)], &target, until).await;
        // Rooms on other slots, joined on the same nodes: their subscriptions are not renewed
        // when the room's slot moves.
        let mut bystanders = Vec::new();
        for i in 0..OTHER_ROOMS {
            for node in [1, 2] {
                let mut ws = WsClient::connect(cluster.node(node)).await;
                ws.join(&format!("bystander{i}"), None).await;
                bystanders.push(ws);
            }
        }
        shard_subscribers_reach(&redis, &channel, 2, "subscribed on the shard").await;
        let subscribed = redis.calls("ssubscribe");
        let progress = Arc::new(AtomicUsize::new(0));
        let around = paced_sender(&cluster, "around", &room, AROUND, until, &progress);
        progress_reaches(&progress, 150, "150 acks before the move").await;
        let moved_at = Instant::now();
        let to = redis.move_slot(slot).await;
        eprintln!("slot {slot} moved to :{to}");
        // The new owner has the nodes' subscriptions once they followed.
        shard_subscribers_reach(&redis, &channel, 2, "subscriptions on the new shard").await;
        let followed = moved_at.elapsed();
        // n1 and n2 renewed the moved room's channel (once each per time they saw the move),
        // not each of their 9 rooms' (and users') channels.
        let renewed = redis.calls("ssubscribe") - subscribed;
        assert!(
            (2..=6).contains(&renewed),
            "{renewed} SSUBSCRIBEs after the move, for one channel on two nodes"
        );
        figure("SSUBSCRIBEs after the move (n1 and n2)", renewed);
        let mut senders = join_senders(vec![around]).await;
        // Everything sent from now on crosses the bus through the new shard.
        let before = [
            cluster.metric(1, "seqcast_bus_received_total").await,
            cluster.metric(2, "seqcast_bus_received_total").await,
        ];
        let after = paced_sender(&cluster, "after", &room, AFTER, until, &progress);
        senders.extend(join_senders(vec![after]).await);
        let ledger = ledger_of(&senders);
        assert_eq!(ledger.head, (AROUND + AFTER) as u64);
        finish_and_check(listeners, &target_tx, &ledger).await;
        cluster.print_bus_metrics(&[0, 1, 2]).await;
        for i in 0..3 {
            let moves = cluster.metric(i, "seqcast_bus_slot_moves_total").await;
            assert!(moves >= 1.0, "n{i} did not notice the slot move");
        }
        for (i, before) in [1, 2].into_iter().zip(before) {
            let crossed = cluster.metric(i, "seqcast_bus_received_total").await - before;
            assert!(
                crossed >= AFTER as f64,
                "n{i}: {crossed} of the {AFTER} messages sent after the move came over the bus"
            );
        }
        figure(
            "subscriptions on the slot's new shard after the move",
            ms(followed),
        );
    })
    .await;
}
