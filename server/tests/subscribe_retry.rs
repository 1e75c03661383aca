//! A SUBSCRIBE that fails while the bus stays up is retried (issue 10, item 2.9), against a real
//! Redis: node b's Redis user may not subscribe to any channel (an ACL without channel
//! permissions), so its SUBSCRIBE for the room is refused with NOPERM while its PINGs, and so
//! its link, stay up. Then the permission is granted, without a reconnect: the relay's retry
//! must subscribe, and node a's messages reach node b through the bus again.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use support::check::eventually;
use support::http::{metric_value, Http};
use support::postgres::TestPostgres;
use support::redis::TestRedis;
use support::server::{ServerOptions, StoreKind, TestServer};
use support::ws::WsClient;

const ROOM: &str = "acl";
const RECEIVED: &str = "seqcast_bus_received_total";
const PUBLISHED: &str = "seqcast_bus_published_total";
const DEADLINE: Duration = Duration::from_secs(120);

async fn metric(http: &Http, name: &str) -> f64 {
    metric_value(&http.get("/metrics").await.text, name).unwrap_or(0.0)
}

async fn wait_bus_up(http: &Http) {
    eventually(Duration::from_secs(20), "bus_state up", || {
        let http = http.clone();
        async move { http.get("/ready").await.json()["bus_state"] == "up" }
    })
    .await;
}

/// Before the fix, fred reported the refused SUBSCRIBE as a success (it answers SUBSCRIBE when
/// written and dropped the `-NOPERM` reply unseen), so the relay never retried it and b heard
/// nothing through the bus until a reconnect. The bus now pipelines a PING behind each SUBSCRIBE
/// to learn the outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_subscribe_is_retried_while_the_bus_stays_up() {
    let scenario = async {
        let redis = TestRedis::start();
        // Every command and key, no channel.
        redis.command(&[
            "ACL",
            "SETUSER",
            "nodeb",
            "on",
            ">nodeb-secret",
            "~*",
            "resetchannels",
            "+@all",
        ]);
        let database = TestPostgres::shared().fresh_database().await;
        let start = |id: &str, redis_url: String| {
            ServerOptions::new(StoreKind::Postgres)
                .database_url(database.clone())
                .node_id(id)
                .redis_url(redis_url)
        };
        let a = TestServer::start(start("a", redis.url())).await;
        let b_url = format!("redis://nodeb:nodeb-secret@127.0.0.1:{}", redis.port());
        let b = TestServer::start(start("b", b_url)).await;
        let (http_a, http_b) = (Http::new(&a), Http::new(&b));
        wait_bus_up(&http_a).await;
        wait_bus_up(&http_b).await;

        let mut listener = WsClient::connect(&b).await;
        listener.join(ROOM, None).await;
        let mut sender = WsClient::connect(&a).await;
        let sending = Arc::new(AtomicBool::new(true));
        let keep_sending = Arc::clone(&sending);
        let sends = tokio::spawn(async move {
            let mut n = 0;
            while keep_sending.load(Ordering::Relaxed) {
                n += 1;
                let ack = sender.send_msg(ROOM, json!({ "n": n })).await;
                assert_eq!(ack["type"], "ack", "{ack}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            n
        });

        // a publishes; b, refused its SUBSCRIBE, hears none of it, and its link stays up.
        eventually(Duration::from_secs(20), "a publishes", || {
            let http = http_a.clone();
            async move { metric(&http, PUBLISHED).await >= 20.0 }
        })
        .await;
        assert_eq!(
            metric(&http_b, RECEIVED).await,
            0.0,
            "b has no channel permission"
        );
        assert_eq!(http_b.get("/ready").await.json()["bus_state"], "up");

        // The refusals are seen and retried: Redis logs every denied SUBSCRIBE (one ACL LOG
        // entry whose count grows). Before the fix it stayed at 1.
        eventually(
            Duration::from_secs(10),
            "b retries its refused SUBSCRIBE",
            || {
                let log = redis.command(&["ACL", "LOG"]);
                async move { denied_subscribes(&log) >= 2 }
            },
        )
        .await;
        assert_eq!(http_b.get("/ready").await.json()["bus_state"], "up");
        redis.command(&["ACL", "SETUSER", "nodeb", "allchannels"]);
        // The retry backs off to 2 s at most.
        eventually(Duration::from_secs(10), "b hears a through the bus", || {
            let http = http_b.clone();
            async move { metric(&http, RECEIVED).await > 0.0 }
        })
        .await;
        sending.store(false, Ordering::Relaxed);
        let sent = sends.await.unwrap();
        eprintln!(
            "sent {sent}; b received {} through the bus",
            metric(&http_b, RECEIVED).await
        );
    };
    tokio::time::timeout(DEADLINE, scenario).await.unwrap();
}

/// The `count` of the ACL LOG entry for a channel denial on the room's channel, from
/// `redis-cli ACL LOG` output (one field name or value per line).
fn denied_subscribes(log: &str) -> u64 {
    let lines: Vec<&str> = log.lines().map(str::trim).collect();
    let mut count = 0;
    for entry in lines.split(|line| *line == "count").skip(1) {
        let is_room_channel = entry
            .windows(2)
            .any(|w| w[0] == "object" && w[1].ends_with(&format!("room:{ROOM}")));
        if is_room_channel {
            count += entry
                .first()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    count
}
