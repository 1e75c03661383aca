//! Leader election and the background jobs, against a real `redis-server` per test (see
//! `support::redis`) and a real SQLite database.
//!
//! The candidates are in-process [`Leadership`]s, each with its own Redis connection, as on
//! separate nodes. "Stopping" a leader cancels its election (it releases the lock); "crashing"
//! one aborts its task (the lock stays until its TTL runs out).
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use seqcast::jobs::{self, ElectionConfig, Leadership};
use seqcast::redis::{LinkState, RedisLink};
use seqcast::store::{NewMessage, RoomInfo, SqliteStore, Store};
use seqcast::Config;
use support::redis::TestRedis;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Lock TTL of the tests: short, so that failover is quick.
const TTL: Duration = Duration::from_secs(1);

/// Redis command timeout of the tests: well inside the TTL.
const TIMEOUT: Duration = Duration::from_millis(200);

const KEY: &str = "test:leader";

/// A node's Redis link, once its first probe answered.
async fn redis_link(redis: &TestRedis) -> RedisLink {
    let link = RedisLink::start(&redis.url(), "test:", TIMEOUT, CancellationToken::new()).unwrap();
    assert_eq!(
        link.settled().await,
        LinkState::Up,
        "the test Redis answers"
    );
    link
}

/// One node's part in the election.
struct Candidate {
    name: String,
    leadership: Leadership,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Candidate {
    async fn start(redis: &TestRedis, name: &str) -> Candidate {
        let config = ElectionConfig {
            key: KEY.to_owned(),
            node_id: name.to_owned(),
            ttl: TTL,
        };
        let (leadership, election) = Leadership::elect(redis_link(redis).await, config);
        let stop = CancellationToken::new();
        let task = tokio::spawn(election.run(stop.clone()));
        Candidate {
            name: name.to_owned(),
            leadership,
            stop,
            task,
        }
    }

    fn leads(&self) -> bool {
        self.leadership.is_leader()
    }

    /// Stops the election as a shutdown does, and waits until the lock is released.
    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("a stopped election ends within the Redis timeout")
            .unwrap();
    }

    /// Ends the election without releasing the lock, as a crash does.
    async fn crash(self) {
        self.task.abort();
        assert!(self.task.await.unwrap_err().is_cancelled());
    }
}

/// Polls `condition` every millisecond until it holds; panics with `what` after `limit`.
async fn wait_until(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Waits until exactly one of `candidates` leads, and returns its index.
async fn one_leader(candidates: &[Candidate], limit: Duration) -> usize {
    let mut leader = None;
    wait_until(limit, "one candidate leads", || {
        let leading: Vec<usize> = (0..candidates.len())
            .filter(|&i| candidates[i].leads())
            .collect();
        assert!(leading.len() <= 1, "two leaders at once: {leading:?}");
        leader = leading.first().copied();
        leader.is_some()
    })
    .await;
    leader.unwrap()
}

/// Checks for `period` that exactly `leader` of `candidates` leads, all along.
async fn leads_alone_for(candidates: &[Candidate], leader: usize, period: Duration) {
    let end = Instant::now() + period;
    while Instant::now() < end {
        for (i, candidate) in candidates.iter().enumerate() {
            assert_eq!(
                candidate.leads(),
                i == leader,
                "{} leads: {}",
                candidate.name,
                candidate.leads()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_one_of_two_leads() {
    let redis = TestRedis::start();
    let candidates = [
        Candidate::start(&redis, "a").await,
        Candidate::start(&redis, "b").await,
    ];
    let leader = one_leader(&candidates, 3 * TTL).await;
    // Several renewals: the same node keeps leading, the other never does.
    leads_alone_for(&candidates, leader, 3 * TTL).await;
    let value = redis.command(&["GET", KEY]);
    assert!(
        value.starts_with(&format!("{}:", candidates[leader].name)),
        "the lock holds {value:?}"
    );
    let mut state = candidates[leader].leadership.subscribe();
    assert!(*state.borrow_and_update());

    let [a, b] = candidates;
    a.stop().await;
    b.stop().await;
    assert_eq!(redis.command(&["EXISTS", KEY]), "0", "released at shutdown");
    assert!(!*state.borrow_and_update());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_leader_is_replaced_within_the_ttl() {
    let redis = TestRedis::start();
    let mut candidates = vec![
        Candidate::start(&redis, "a").await,
        Candidate::start(&redis, "b").await,
    ];
    let leader = one_leader(&candidates, 3 * TTL).await;
    let old = candidates.remove(leader);
    let old_leadership = old.leadership.clone();
    let stopped = Instant::now();
    old.stop().await;
    assert!(!old_leadership.is_leader());
    // It released the lock, so the other node need not wait for the TTL.
    one_leader(&candidates, TTL).await;
    eprintln!("stopped leader replaced after {:?}", stopped.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_leader_is_replaced_once_its_lock_expires() {
    let redis = TestRedis::start();
    let mut candidates = vec![
        Candidate::start(&redis, "a").await,
        Candidate::start(&redis, "b").await,
    ];
    let leader = one_leader(&candidates, 3 * TTL).await;
    let old = candidates.remove(leader);
    let old_leadership = old.leadership.clone();
    let crashed = Instant::now();
    old.crash().await;
    // The lock outlives the crash, so the other node must wait for it to expire: at most a TTL
    // after the last renewal, plus one retry interval (a tenth of the TTL) to notice.
    one_leader(&candidates, TTL + TTL / 2).await;
    let elapsed = crashed.elapsed();
    eprintln!("crashed leader replaced after {elapsed:?}");
    assert!(
        !old_leadership.is_leader(),
        "the crashed node's lease ran out first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_redis_ends_leadership_before_the_lock_expires() {
    let redis = TestRedis::start();
    let candidates = [
        Candidate::start(&redis, "a").await,
        Candidate::start(&redis, "b").await,
    ];
    let leader = one_leader(&candidates, 3 * TTL).await;

    // The leader's last renewal was sent before the pause, so its lock may expire a TTL after
    // the pause began: it must stop leading before that.
    redis.pause();
    let paused = Instant::now();
    wait_until(
        TTL,
        "the leader stops leading while Redis is paused",
        || !candidates[leader].leads(),
    )
    .await;
    eprintln!("leader gave up {:?} into the pause", paused.elapsed());
    // Nobody leads while Redis does not answer.
    let end = paused + 3 * TTL;
    while Instant::now() < end {
        assert!(
            candidates.iter().all(|c| !c.leads()),
            "a leader without Redis"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    redis.resume();
    let leader = one_leader(&candidates, 3 * TTL).await;
    leads_alone_for(&candidates, leader, 2 * TTL).await;
}

/// What the sampler of [`never_two_leaders_at_once`] saw.
#[derive(Debug, Default)]
struct Samples {
    /// Passes over all candidates that took so little time that they show one instant.
    instants: u64,
    /// Instants with exactly one leader.
    one_leader: u64,
    /// Instants with more than one: must stay 0.
    two_leaders: u64,
}

/// Reads every candidate's `is_leader()` in a tight loop on a thread of its own until `stop`.
/// A pass that took longer than `INSTANT` (the thread was preempted) is not counted: a handover
/// needs at least two Redis round trips, so a pass shorter than one cannot straddle one, while a
/// real overlap of two leases would last far longer than a pass.
fn sample(candidates: Arc<Mutex<Vec<Leadership>>>, stop: Arc<AtomicBool>) -> Samples {
    const INSTANT: Duration = Duration::from_micros(20);
    let mut samples = Samples::default();
    while !stop.load(Ordering::Relaxed) {
        {
            let candidates = candidates.lock().unwrap();
            let started = std::time::Instant::now();
            let leaders = candidates.iter().filter(|c| c.is_leader()).count();
            if started.elapsed() <= INSTANT {
                samples.instants += 1;
                match leaders {
                    0 => {}
                    1 => samples.one_leader += 1,
                    _ => samples.two_leaders += 1,
                }
            }
        }
        std::thread::yield_now();
    }
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_two_leaders_at_once() {
    let redis = TestRedis::start();
    let mut candidates = Vec::new();
    for name in ["n0", "n1", "n2"] {
        candidates.push(Candidate::start(&redis, name).await);
    }
    let watched = Arc::new(Mutex::new(
        candidates
            .iter()
            .map(|c| c.leadership.clone())
            .collect::<Vec<_>>(),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (watched, stop) = (watched.clone(), stop.clone());
        std::thread::spawn(move || sample(watched, stop))
    };

    // Take the leader away four times, alternately stopping and crashing it, and bring in a
    // new candidate each time. The sampler keeps watching the old ones too: a crashed leader
    // believes it leads until its lease runs out.
    for round in 0..4 {
        let leader = one_leader(&candidates, 3 * TTL).await;
        let old = candidates.remove(leader);
        if round % 2 == 0 {
            old.stop().await;
        } else {
            old.crash().await;
        }
        let new = Candidate::start(&redis, &format!("n{}", round + 3)).await;
        watched.lock().unwrap().push(new.leadership.clone());
        candidates.push(new);
    }
    let leader = one_leader(&candidates, 3 * TTL).await;
    leads_alone_for(&candidates, leader, TTL).await;

    stop.store(true, Ordering::Relaxed);
    let samples = sampler.join().unwrap();
    eprintln!("{samples:?}");
    assert_eq!(samples.two_leaders, 0, "two leaders at once: {samples:?}");
    assert!(
        samples.one_leader > 1000,
        "too few instants sampled: {samples:?}"
    );
    for candidate in candidates {
        candidate.stop().await;
    }
}

#[tokio::test]
async fn without_redis_every_node_leads() {
    let leadership = Leadership::always();
    assert!(leadership.is_leader());
    assert!(*leadership.subscribe().borrow());
    let config = Config::default();
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(&dir).await;
    let shutdown = CancellationToken::new();
    let jobs = jobs::spawn(&config, store, None, shutdown.clone());
    assert!(jobs.is_leader());
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), jobs.stopped())
        .await
        .unwrap();
}

// ---- retention ----

async fn sqlite_store(dir: &tempfile::TempDir) -> Arc<dyn Store> {
    let url = format!("sqlite://{}", dir.path().join("seqcast.db").display());
    Arc::new(SqliteStore::connect(&url).await.unwrap())
}

async fn fill(store: &dyn Store, room: &str, n: usize) {
    let batch: Vec<NewMessage> = (0..n)
        .map(|i| NewMessage {
            sender: "alice".to_owned(),
            body: i.to_string(),
            idem: None,
        })
        .collect();
    store.append(room, &batch).await.unwrap();
}

/// Polls `room_info` until it equals `expected`.
async fn wait_for_room(store: &dyn Store, room: &str, expected: RoomInfo, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let info = store.room_info(room).await.unwrap();
        if info == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "room {room}: {info:?}, expected {expected:?} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A configuration whose retention deletes every message after a millisecond.
fn retention_config(node_id: &str) -> Config {
    Config {
        node_id: node_id.to_owned(),
        redis_prefix: "test:".to_owned(),
        redis_timeout: TIMEOUT,
        leader_ttl: TTL,
        retention: Some(Duration::from_millis(1)),
        job_interval: Duration::from_millis(100),
        ..Config::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_old_messages_and_keeps_heads() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(&dir).await;
    fill(&*store, "a", 2500).await;
    fill(&*store, "b", 3).await;
    let shutdown = CancellationToken::new();
    let jobs = jobs::spawn(
        &retention_config("solo"),
        store.clone(),
        None,
        shutdown.clone(),
    );

    // 2500 messages take three batches.
    let limit = Duration::from_secs(10);
    wait_for_room(
        &*store,
        "a",
        RoomInfo {
            head: 2500,
            first: 2501,
        },
        limit,
    )
    .await;
    wait_for_room(&*store, "b", RoomInfo { head: 3, first: 4 }, limit).await;

    // Seqs continue after the head, and new messages age out too.
    fill(&*store, "b", 1).await;
    assert_eq!(store.read_after("b", 0, None, 10).await.unwrap()[0].seq, 4);
    wait_for_room(&*store, "b", RoomInfo { head: 4, first: 5 }, limit).await;

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), jobs.stopped())
        .await
        .expect("jobs stop at shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_runs_only_on_the_leader() {
    let redis = TestRedis::start();
    // Another node holds the lock.
    redis.command(&["SET", "test:leader", "elsewhere:1", "PX", "60000"]);
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(&dir).await;
    fill(&*store, "a", 3).await;
    let shutdown = CancellationToken::new();
    let jobs = jobs::spawn(
        &retention_config("here"),
        store.clone(),
        Some(redis_link(&redis).await),
        shutdown.clone(),
    );

    // Several job intervals and election attempts go by: nothing is deleted.
    let end = Instant::now() + 5 * Duration::from_millis(100);
    while Instant::now() < end {
        assert!(!jobs.is_leader());
        assert_eq!(
            store.room_info("a").await.unwrap(),
            RoomInfo { head: 3, first: 1 }
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The other node goes away: this one takes over and runs retention.
    redis.command(&["DEL", "test:leader"]);
    wait_until(TTL, "this node leads", || jobs.is_leader()).await;
    wait_for_room(
        &*store,
        "a",
        RoomInfo { head: 3, first: 4 },
        Duration::from_secs(5),
    )
    .await;

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), jobs.stopped())
        .await
        .expect("jobs stop at shutdown");
    assert_eq!(redis.command(&["EXISTS", "test:leader"]), "0");
}
