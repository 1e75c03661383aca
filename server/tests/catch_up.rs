//! Catch-up from the database (a session behind its rooms), against the real binary: how the
//! rooms that are behind share the session.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
mod support;

use std::time::Duration;

use serde_json::json;

use support::server::{run_scenario, ServerOptions, StoreKind, TestDatabase, TestServer};
use support::ws::{Event, WsClient, RECV_DEADLINE};

const BUSY_BACKLOG: usize = 5000;
const QUIET_ROOMS: usize = 10;

/// A session far behind in a busy room (5,000 messages) and behind in ten quiet rooms (one
/// message each) gets the quiet rooms' messages long before the busy room's backlog is through:
/// the rooms that are behind take turns a page each. (Served in the map's order, every quiet
/// room after the busy one waited for all 5,000; with ten quiet rooms, that is most orders.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_rooms_are_not_starved_by_a_busy_backlog() {
    run_scenario("quiet_rooms_are_not_starved_by_a_busy_backlog", async {
        let server =
            TestServer::start(ServerOptions::new(StoreKind::Sqlite).env("SEQCAST_SEND_RATE", "0"))
                .await;
        let mut writer = WsClient::connect(&server).await;
        let seqs = writer
            .send_pipelined("busy", BUSY_BACKLOG, 64, Duration::from_secs(120), |i| {
                json!(i)
            })
            .await;
        assert_eq!(seqs.len(), BUSY_BACKLOG);
        for q in 0..QUIET_ROOMS {
            writer.send_msg(&format!("quiet-{q}"), json!("hello")).await;
        }

        let mut reader = WsClient::connect(&server).await;
        reader
            .send_json(json!({"type": "join", "room": "busy", "since": 0}))
            .await;
        for q in 0..QUIET_ROOMS {
            let room = format!("quiet-{q}");
            reader
                .send_json(json!({"type": "join", "room": room, "since": 0}))
                .await;
        }
        let mut busy_before_quiet = 0;
        let mut quiet_seen = 0;
        while quiet_seen < QUIET_ROOMS {
            match reader.next_event(RECV_DEADLINE).await {
                Some(Event::Frame(f)) if f["type"] == "message" && f["room"] == "busy" => {
                    busy_before_quiet += 1;
                }
                Some(Event::Frame(f)) if f["type"] == "message" => quiet_seen += 1,
                Some(Event::Frame(f)) if f["type"] == "joined" => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(
            busy_before_quiet < BUSY_BACKLOG / 2,
            "{busy_before_quiet} of the busy room's {BUSY_BACKLOG} messages came before the \
             last quiet room's one"
        );
        // And the busy backlog still arrives whole, in order, once.
        let rest = reader
            .collect_seqs(
                "busy",
                BUSY_BACKLOG - busy_before_quiet,
                Duration::from_secs(60),
            )
            .await;
        let first = busy_before_quiet as u64 + 1;
        assert_eq!(rest, (first..=BUSY_BACKLOG as u64).collect::<Vec<_>>());
    })
    .await;
}

/// Retention deleting the messages a session is about to read (it is behind, replaying a room)
/// is not a silent gap: the session sends a fresh `joined` with `"truncated":true` and the
/// `first` seq still stored, then continues from there, as a join with an old `since` would.
/// The deletion is the retention job's statement, run by hand at a chosen moment: while the
/// session is stuck writing to a client that does not read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_during_a_catch_up_is_reported() {
    run_scenario("retention_during_a_catch_up_is_reported", async {
        const TOTAL: u64 = 3000;
        const DELETED_UPTO: u64 = 2500;
        let db = TestDatabase::fresh(StoreKind::Postgres).await;
        let server = TestServer::start(
            ServerOptions::new(StoreKind::Postgres)
                .database_url(db.url.clone())
                .write_timeout("60s")
                .env("SEQCAST_SEND_RATE", "0"),
        )
        .await;
        // 20 KB each: 60 MB in all, far more than the socket buffers between the two.
        let body = "x".repeat(20_000);
        let mut writer = WsClient::connect(&server).await;
        writer
            .send_pipelined("r", TOTAL as usize, 64, Duration::from_secs(120), |_| {
                json!(body)
            })
            .await;

        let mut reader = WsClient::connect(&server).await;
        let joined = reader.join("r", Some(0)).await;
        assert_eq!(
            (joined["first"].as_u64(), joined["head"].as_u64()),
            (Some(1), Some(TOTAL))
        );
        // Not reading: the session replays at most a few MB before it blocks.
        let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
        sqlx::query("DELETE FROM messages WHERE room = 'r' AND seq <= $1")
            .bind(DELETED_UPTO as i64)
            .execute(&pool)
            .await
            .unwrap();

        let mut last = 0;
        let mut told = false;
        while last < TOTAL {
            let frame = reader.recv_json_timeout(Duration::from_secs(30)).await;
            match frame["type"].as_str() {
                Some("message") => {
                    let seq = frame["seq"].as_u64().unwrap();
                    assert_eq!(seq, last + 1, "a gap after {last}, without a word");
                    last = seq;
                }
                Some("joined") => {
                    assert_eq!(frame["truncated"], true, "{frame}");
                    assert_eq!(frame["first"], DELETED_UPTO + 1, "{frame}");
                    assert!(frame.get("ref").is_none(), "{frame}");
                    assert!(last < DELETED_UPTO, "told after {last}");
                    told = true;
                    last = DELETED_UPTO;
                }
                _ => panic!("unexpected {frame}"),
            }
        }
        assert!(
            told,
            "the session was not behind when retention ran; the test proves nothing"
        );
        reader.ping().await;
    })
    .await;
}
