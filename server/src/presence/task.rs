//! The presence task: one per node, every `SEQCAST_PRESENCE_INTERVAL`.
//!
//! Each turn it takes what changed since the last one and:
//! 1. (cluster) writes this node's changed (room, user) pairs to the roster, in one transaction;
//! 2. (cluster) reports the rooms it wrote to the other nodes: on each room's bus channel when
//!    the bus is up, else with a NOTIFY on `seqcast_presence` in that same transaction (heard
//!    by every node's LISTEN connection, `relay::listen`);
//! 3. (cluster) reads again the watched rooms other nodes reported;
//! 4. tells each changed watched room's watchers what changed, in one frame.
//!
//! And every third of `SEQCAST_PRESENCE_TTL`, a heartbeat keeps this node counted. Other
//! nodes' reports are at most once, so a heartbeat also reads every watched room again when
//! the set of live nodes changed (a node died or stopped: its users leave), when this node's
//! bus is down (it hears no reports), and every tenth time regardless. The bounds that follow:
//! - a killed node's users leave, for every watcher, within TTL + TTL/3 + one interval (its
//!   heartbeat runs out, the next heartbeat of each other node notices);
//! - a change reaches other nodes' watchers within an interval plus the report's travel
//!   (bus or NOTIFY) plus an interval; a lost report within ten heartbeats.
//!
//! A failed write keeps the changes for the next turn; a failed read keeps the rooms. A node
//! that cannot reach the database for longer than the TTL stops being counted by the others;
//! its next heartbeat counts it again (the others read every room when the live set changes).

use std::collections::{BTreeSet, HashSet};
use std::mem;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use tokio_util::sync::CancellationToken;

use super::{Pending, Presence};
use crate::bus::{Bus, BusState, Ephemeral, Topic};
use crate::metrics as m;
use crate::store::Roster;

/// A safety pass over every watched room, every this many heartbeats.
const FULL_PASS_EVERY: u64 = 10;

/// Starts the node's presence task; it stops with `stop` (removing the node from the roster).
pub fn spawn(
    presence: Presence,
    bus: Option<Arc<dyn Bus>>,
    interval: Duration,
    ttl: Duration,
    stop: CancellationToken,
) {
    tokio::spawn(run(presence, bus, interval, ttl, stop));
}

struct Cluster {
    roster: Roster,
    bus: Option<Arc<dyn Bus>>,
    ttl: Duration,
    /// The (room, user) rows this node has in the roster.
    written: HashSet<(Arc<str>, Arc<str>)>,
    /// The other live nodes at the last heartbeat; `None` before the first.
    live: Option<BTreeSet<String>>,
    beats: u64,
}

async fn run(
    presence: Presence,
    bus: Option<Arc<dyn Bus>>,
    interval: Duration,
    ttl: Duration,
    stop: CancellationToken,
) {
    let mut cluster = presence.0.roster.clone().map(|roster| Cluster {
        roster,
        bus,
        ttl,
        written: HashSet::new(),
        live: None,
        beats: 0,
    });
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heartbeat = tokio::time::interval((ttl / 3).max(Duration::from_millis(10)));
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = heartbeat.tick(), if cluster.is_some() => {
                if let Some(cluster) = &mut cluster {
                    cluster.heartbeat(&presence).await;
                }
            }
            _ = tick.tick() => {
                // Nothing to do most of the time: wait for a change, then for the next tick,
                // so that a burst of changes makes one turn.
                let due = !presence.pending().is_empty();
                if !due {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = presence.0.wake.notified() => {}
                        _ = heartbeat.tick(), if cluster.is_some() => {
                            if let Some(cluster) = &mut cluster {
                                cluster.heartbeat(&presence).await;
                            }
                        }
                    }
                    continue;
                }
                turn(&presence, cluster.as_mut()).await;
            }
        }
    }
    if let Some(cluster) = cluster {
        if let Err(e) = cluster.roster.leave(&presence.0.node).await {
            tracing::debug!(error = %e, "could not take this node off the presence roster");
        }
    }
}

/// One turn: write, report, read, tell.
async fn turn(presence: &Presence, cluster: Option<&mut Cluster>) {
    let Pending {
        changed,
        flush,
        reread,
        reread_all,
    } = mem::take(&mut *presence.pending());
    let mut tell: HashSet<Arc<str>> = flush;
    if let Some(cluster) = cluster {
        let wrote = cluster.write(presence, changed).await;
        // A counted room's number includes this node's rows: read it again once they changed.
        let mut read: HashSet<Arc<str>> = wrote
            .into_iter()
            .filter(|room| presence.is_counted(room))
            .collect();
        if reread_all {
            read.extend(presence.watched_rooms());
        } else {
            read.extend(reread);
        }
        read.retain(|room| presence.watched_key(room).is_some());
        if !read.is_empty() {
            let rooms: Vec<Arc<str>> = read.into_iter().collect();
            let node = &presence.0.node;
            match cluster
                .roster
                .remote(&rooms, node, presence.0.max_users)
                .await
            {
                Ok(remote) => {
                    presence.set_remote(remote, &rooms);
                    tell.extend(rooms);
                }
                Err(e) => {
                    metrics::counter!(m::PRESENCE_ROSTER_ERRORS, "op" => "read").increment(1);
                    tracing::warn!(error = %e, "reading the presence roster failed; retrying");
                    presence.pending().reread.extend(rooms);
                }
            }
        }
    }
    presence.flush(tell);
}

impl Cluster {
    /// Writes this node's `changed` pairs to the roster and reports the rooms; returns the rooms
    /// written. On failure the pairs wait for the next turn.
    async fn write(
        &mut self,
        presence: &Presence,
        changed: HashSet<(Arc<str>, Arc<str>)>,
    ) -> HashSet<Arc<str>> {
        if changed.is_empty() {
            return HashSet::new();
        }
        if self.live.is_none() {
            // Not in the roster yet (no heartbeat succeeded): rows would have no node to
            // belong to.
            presence.pending().changed.extend(changed);
            return HashSet::new();
        }
        let mut add = Vec::new();
        let mut remove = Vec::new();
        for pair in &changed {
            let here = presence.is_local(&pair.0, &pair.1);
            match (here, self.written.contains(pair)) {
                (true, false) => add.push(pair.clone()),
                (false, true) => remove.push(pair.clone()),
                _ => {}
            }
        }
        let rooms: Vec<Arc<str>> = add
            .iter()
            .chain(&remove)
            .map(|(room, _)| Arc::clone(room))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if rooms.is_empty() {
            return HashSet::new();
        }
        let bus_up = self
            .bus
            .as_ref()
            .is_some_and(|bus| bus.state() == BusState::Up);
        let notify: &[Arc<str>] = if bus_up { &[] } else { &rooms };
        let node = &presence.0.node;
        if let Err(e) = self.roster.write(node, &add, &remove, notify).await {
            metrics::counter!(m::PRESENCE_ROSTER_ERRORS, "op" => "write").increment(1);
            tracing::warn!(error = %e, "writing the presence roster failed; retrying");
            presence.pending().changed.extend(changed);
            return HashSet::new();
        }
        for pair in remove {
            self.written.remove(&pair);
        }
        self.written.extend(add);
        if bus_up {
            if let Some(bus) = &self.bus {
                for room in &rooms {
                    bus.publish_ephemeral(&Ephemeral {
                        topic: Topic::Presence(Arc::clone(room)),
                        frame: Utf8Bytes::from_static(""),
                    });
                }
            }
        }
        rooms.into_iter().collect()
    }

    /// Keeps this node counted; reads every watched room again when the cluster changed, when
    /// the bus is down, and on every tenth beat.
    async fn heartbeat(&mut self, presence: &Presence) {
        let beat = match self.roster.heartbeat(&presence.0.node, self.ttl).await {
            Ok(beat) => beat,
            Err(e) => {
                metrics::counter!(m::PRESENCE_ROSTER_ERRORS, "op" => "heartbeat").increment(1);
                tracing::warn!(error = %e, "presence heartbeat failed");
                return;
            }
        };
        self.beats += 1;
        let mut pending = presence.pending();
        if beat.inserted {
            // New in the roster: the first beat, or away long enough for another node to
            // remove this one, rows and all. Write the whole share (again).
            self.written.clear();
            pending.changed.extend(presence.local_pairs());
        }
        let bus_down = self
            .bus
            .as_ref()
            .is_none_or(|bus| bus.state() != BusState::Up);
        if self.live.as_ref() != Some(&beat.live) || bus_down || self.beats % FULL_PASS_EVERY == 0 {
            pending.reread_all = true;
        }
        drop(pending);
        self.live = Some(beat.live);
        presence.0.wake.notify_one();
    }
}
