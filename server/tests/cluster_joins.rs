//! Many sessions joining one room on one node at once while another node sends (issue 10, 2.3):
//! every joiner gets every message after the head its join reported, however the joins'
//! database reads interleave with the room's first seeding on the node.
//!
//! Without Redis, so that the other node's messages reach the joining node only through its
//! head checks: a joiner that read an older head than the one the room was seeded with waited
//! forever for the seqs between the two heads once the room went quiet.
//!
//! This storm leaves the interleaving to chance (it passed before the fix too); `join_seeding`
//! forces the two orders that failed, with a lock and a stopped backend in Postgres.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
mod support;

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::cluster::{spawn_sender, Cluster, Pacing, Sender};
use support::scenario::{join_senders, scenario, STREAM_DEADLINE};
use support::ws::{Auth, Event, WsClient};

/// Rooms tried, each with its own join storm.
const ROUNDS: usize = 12;
/// Sessions joining each room at once.
const JOINERS: usize = 16;
/// Messages sent per room, while the sessions join.
const MESSAGES: usize = 40;
/// How long a joiner may take to get the room's last message once the sender is done: the poll
/// interval (100 ms) and a read, with room for a loaded box. A stalled joiner never gets it.
const QUIET_DEADLINE: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_joins_get_every_message() {
    scenario("join_storm", async {
        let cluster = Cluster::start(2, None, &[]).await;
        let until = Instant::now() + STREAM_DEADLINE;
        for round in 0..ROUNDS {
            let room = format!("js{round}");
            let progress = Arc::new(AtomicUsize::new(0));
            let sending = spawn_sender(
                Sender::new(format!("r{round}"), &room, MESSAGES),
                vec![cluster.ws(0)],
                Pacing::paced(2, Duration::from_millis(2)),
                until,
                Arc::clone(&progress),
            );
            let url = cluster.ws(1).1;
            let joins = (0..JOINERS).map(|_| {
                let (url, room) = (url.clone(), room.clone());
                tokio::spawn(async move {
                    let mut client = WsClient::try_connect(&url, Auth::None).await.unwrap();
                    let joined = client.join(&room, None).await;
                    let head = joined["head"].as_u64().expect("joined head");
                    (client, head)
                })
            });
            let mut joiners = Vec::new();
            for join in joins {
                joiners.push(join.await.unwrap());
            }
            join_senders(vec![sending]).await;
            let last = MESSAGES as u64;
            for (index, (client, head)) in joiners.iter_mut().enumerate() {
                let mut next = *head + 1;
                let deadline = Instant::now() + QUIET_DEADLINE;
                while next <= last {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match client.next_event(left).await {
                        Some(Event::Frame(frame)) if frame["type"] == "message" => {
                            let seq = frame["seq"].as_u64().unwrap();
                            assert_eq!(
                                seq, next,
                                "round {round}, joiner {index} (joined at head {head})"
                            );
                            next += 1;
                        }
                        Some(Event::Frame(_)) => {}
                        other => panic!(
                            "round {round}, joiner {index} joined at head {head}: waited \
                             {QUIET_DEADLINE:?} for seq {next} of {last}: {other:?}"
                        ),
                    }
                }
            }
            for (client, _) in joiners {
                client.close().await;
            }
        }
    })
    .await;
}
