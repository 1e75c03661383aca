//! A throwaway Redis Cluster on loopback: 3 masters and 3 replicas, each a [`TestRedis`] with
//! `--cluster-enabled yes`, joined with `redis-cli --cluster create`.
//!
//! `cluster-node-timeout` is 1 s, so a killed master is replaced by its replica within a few
//! seconds. [`RedisCluster::url`] is the `redis-cluster://` URL seqcast takes in `REDIS_URL`.
#![allow(dead_code)]
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use super::redis::TestRedis;

/// How long the cluster may take to agree it is whole (after creation, after a failover).
const SETTLE_DEADLINE: Duration = Duration::from_secs(30);

pub struct RedisCluster {
    /// Every node, masters and replicas; `None` once killed.
    nodes: Vec<Option<TestRedis>>,
}

impl RedisCluster {
    /// Starts `masters` masters with one replica each and waits until every node reports the
    /// cluster ok. Needs `redis-cli` (Debian's `redis-tools`, installed with `redis-server`).
    pub fn start(masters: usize) -> RedisCluster {
        let args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "1000",
            // A replica takes over however stale it is (loopback: it never is by much).
            "--cluster-replica-validity-factor",
            "0",
        ];
        let nodes: Vec<Option<TestRedis>> = (0..masters * 2)
            .map(|_| Some(TestRedis::start_with(&args)))
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .flatten()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run redis-cli ({e}): install it (`apt-get install -y redis-tools`, \
                     which comes with redis-server) or run the tests through scripts/test.sh"
                )
            });
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { nodes };
        cluster.wait_ok();
        cluster
    }

    /// `redis-cluster://` with every live node as a seed.
    pub fn url(&self) -> String {
        let mut live = self.live();
        let first = live.next().expect("a live node");
        let rest: Vec<String> = live
            .map(|n| format!("node=127.0.0.1:{}", n.port()))
            .collect();
        format!(
            "redis-cluster://127.0.0.1:{}?{}",
            first.port(),
            rest.join("&")
        )
    }

    fn live(&self) -> impl Iterator<Item = &TestRedis> {
        self.nodes.iter().flatten()
    }

    /// A command to any live node.
    pub fn command(&self, args: &[&str]) -> String {
        self.live().next().expect("a live node").command(args)
    }

    /// The slot of `key` (a channel name hashes the same way).
    pub fn keyslot(&self, key: &str) -> u16 {
        self.command(&["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .unwrap()
    }

    /// The port of the master that owns `slot`, as a live node sees it.
    pub fn master_of(&self, slot: u16) -> u16 {
        self.owner(slot).unwrap_or_else(|| {
            panic!(
                "no live master owns slot {slot}:\n{}",
                self.command(&["CLUSTER", "NODES"])
            )
        })
    }

    fn owner(&self, slot: u16) -> Option<u16> {
        let nodes = self.command(&["CLUSTER", "NODES"]);
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let owns = fields[8..].iter().any(|range| match range.split_once('-') {
                Some((a, b)) => {
                    (a.parse::<u16>().unwrap()..=b.parse::<u16>().unwrap()).contains(&slot)
                }
                None => range.parse::<u16>().ok() == Some(slot),
            });
            if owns {
                let port = fields[1].split(['@', ':']).nth(1).unwrap();
                return port.parse().ok();
            }
        }
        None
    }

    /// `PUBSUB SHARDNUMSUB channel` on the master that owns it: how many connections subscribe.
    pub fn shard_subscribers(&self, channel: &str) -> usize {
        let port = self.master_of(self.keyslot(channel));
        let node = self.live().find(|n| n.port() == port).unwrap();
        let reply = node.command(&["PUBSUB", "SHARDNUMSUB", channel]);
        reply
            .lines()
            .last()
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Kills (SIGKILL) the master that owns `slot`; returns its port.
    /// How many times the live nodes together ran `command` (lower case, as `INFO
    /// commandstats` names it) since they started.
    pub fn calls(&self, command: &str) -> u64 {
        let field = format!("cmdstat_{command}:calls=");
        self.live()
            .map(|n| {
                let stats = n.command(&["INFO", "commandstats"]);
                stats
                    .lines()
                    .find_map(|line| line.strip_prefix(field.as_str()))
                    .and_then(|rest| rest.split(',').next()?.parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .sum()
    }

    pub fn kill_master_of(&mut self, slot: u16) -> u16 {
        let port = self.master_of(slot);
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.as_ref().is_some_and(|n| n.port() == port))
            .unwrap();
        if let Some(mut redis) = node.take() {
            redis.kill();
        }
        port
    }

    /// Waits until a live node other than `old` owns `slot` and the cluster is ok again;
    /// returns how long that took.
    pub async fn wait_failover(&self, slot: u16, old: u16) -> Duration {
        let start = Instant::now();
        loop {
            if self.cluster_ok() && self.owner(slot).is_some_and(|p| p != old) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < SETTLE_DEADLINE,
                "slot {slot} not taken over within {SETTLE_DEADLINE:?}:\n{}",
                self.command(&["CLUSTER", "NODES"])
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The live masters' (port, node id).
    fn masters(&self) -> Vec<(u16, String)> {
        let nodes = self.command(&["CLUSTER", "NODES"]);
        nodes
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let master = fields.get(2)?.contains("master") && !fields[2].contains("fail");
                let port = fields.get(1)?.split(['@', ':']).nth(1)?.parse().ok()?;
                master.then(|| (port, fields[0].to_owned()))
            })
            .collect()
    }

    fn node(&self, port: u16) -> &TestRedis {
        self.live().find(|n| n.port() == port).unwrap()
    }

    /// Moves `slot` (which must hold no keys: shard channels are not keys) from its master to
    /// another master, as `redis-cli --cluster reshard` would (IMPORTING, MIGRATING, then NODE
    /// on every master); returns the new owner's port once the old owner agrees.
    pub async fn move_slot(&self, slot: u16) -> u16 {
        let from = self.master_of(slot);
        let masters = self.masters();
        let id_of = |port: u16| masters.iter().find(|m| m.0 == port).unwrap().1.clone();
        let to = masters.iter().map(|m| m.0).find(|&p| p != from).unwrap();
        let (from_id, to_id) = (id_of(from), id_of(to));
        let slot_arg = slot.to_string();
        let set = |port: u16, args: &[&str]| {
            let mut all = vec!["CLUSTER", "SETSLOT", slot_arg.as_str()];
            all.extend_from_slice(args);
            self.node(port).command(&all)
        };
        set(to, &["IMPORTING", &from_id]);
        set(from, &["MIGRATING", &to_id]);
        for (port, _) in &masters {
            set(*port, &["NODE", &to_id]);
        }
        let start = Instant::now();
        while self.owner(slot) != Some(to) {
            assert!(
                start.elapsed() < SETTLE_DEADLINE,
                "slot {slot} did not move"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        to
    }

    fn cluster_ok(&self) -> bool {
        self.live()
            .all(|n| n.command(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
    }

    fn wait_ok(&self) {
        let start = Instant::now();
        while !self.cluster_ok() {
            assert!(
                start.elapsed() < SETTLE_DEADLINE,
                "the Redis Cluster did not settle:\n{}",
                self.command(&["CLUSTER", "NODES"])
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
