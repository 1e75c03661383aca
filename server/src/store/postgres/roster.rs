//! The cluster's presence roster in Postgres (migration 0005): each node's share of who is
//! joined where, counted while the node's heartbeat is fresh.
//!
//! Every statement touches this node's own rows only (or, for reads, filters by room), so
//! nodes never wait on each other's locks here; the one exception, deleting nodes expired for a
//! minute (and their rows, by cascade), removes rows no live node writes.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;

use super::{classify, timed_out};
use crate::store::StoreResult;

/// Who is present in a room on the other nodes, as the roster says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listed {
    /// The users present on other nodes (at most the `max` asked for).
    Users(BTreeSet<Arc<str>>),
    /// Too many to list: the users present on any live node, the asking one included as of
    /// its last write.
    Count(u64),
}

/// The NOTIFY channel a node reports changed rooms on while its bus is down; the payload is a
/// JSON array of room names.
pub const CHANNEL: &str = "seqcast_presence";

/// Largest NOTIFY payload Postgres takes is 8000 bytes; rooms are reported in chunks below it.
const NOTIFY_CHUNK: usize = 7000;

/// A heartbeat's outcome.
#[derive(Debug)]
pub struct Beat {
    /// The node's row was not there: its rows are gone too (it was away so long that another
    /// node removed it), and must be written again.
    pub inserted: bool,
    /// The other nodes whose heartbeat is fresh.
    pub live: BTreeSet<String>,
}

/// The roster, on the store's connection pool. Cheap to clone.
#[derive(Clone)]
pub struct Roster {
    pool: PgPool,
    timeout: Duration,
}

impl Roster {
    /// `timeout` bounds each operation (`SEQCAST_DB_TIMEOUT`), connection wait included.
    pub fn new(pool: PgPool, timeout: Duration) -> Roster {
        Roster { pool, timeout }
    }

    async fn bounded<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, sqlx::Error>>,
    ) -> StoreResult<T> {
        match tokio::time::timeout(self.timeout, work).await {
            Ok(result) => result.map_err(classify),
            Err(_) => Err(timed_out()),
        }
    }

    /// Keeps `node` counted for `ttl` from now (the database's clock), removes nodes expired for
    /// a minute (their rows with them), and lists the other live nodes.
    pub async fn heartbeat(&self, node: &str, ttl: Duration) -> StoreResult<Beat> {
        let row: (bool, Vec<String>) = self
            .bounded(
                sqlx::query_as(
                    "WITH beat AS (
                         INSERT INTO presence_nodes (node, expires_at)
                         VALUES ($1, now() + make_interval(secs => $2))
                         ON CONFLICT (node) DO UPDATE SET expires_at = EXCLUDED.expires_at
                         RETURNING (xmax = 0) AS inserted
                     ), gone AS (
                         DELETE FROM presence_nodes
                         WHERE expires_at < now() - interval '1 minute' AND node <> $1
                     )
                     SELECT (SELECT inserted FROM beat),
                            coalesce((SELECT array_agg(node ORDER BY node) FROM presence_nodes
                                      WHERE expires_at > now() AND node <> $1), '{}')",
                )
                .bind(node)
                .bind(ttl.as_secs_f64())
                .fetch_one(&self.pool),
            )
            .await?;
        Ok(Beat {
            inserted: row.0,
            live: row.1.into_iter().collect(),
        })
    }

    /// Writes this node's changes in one transaction: `add` and `remove` are (room, user)
    /// pairs. `notify` rooms are reported on [`CHANNEL`] when it commits (the bus is down).
    pub async fn write(
        &self,
        node: &str,
        add: &[(Arc<str>, Arc<str>)],
        remove: &[(Arc<str>, Arc<str>)],
        notify: &[Arc<str>],
    ) -> StoreResult<()> {
        let split = |pairs: &[(Arc<str>, Arc<str>)]| -> (Vec<String>, Vec<String>) {
            pairs
                .iter()
                .map(|(r, u)| (r.to_string(), u.to_string()))
                .unzip()
        };
        let (add_rooms, add_users) = split(add);
        let (remove_rooms, remove_users) = split(remove);
        let payloads = notify_payloads(notify);
        let work = async {
            let mut tx = self.pool.begin().await?;
            if !remove_rooms.is_empty() {
                sqlx::query(
                    "DELETE FROM presence p USING unnest($2::text[], $3::text[]) AS t(room, user_id)
                     WHERE p.node = $1 AND p.room = t.room AND p.user_id = t.user_id",
                )
                .bind(node)
                .bind(&remove_rooms)
                .bind(&remove_users)
                .execute(&mut *tx)
                .await?;
            }
            if !add_rooms.is_empty() {
                sqlx::query(
                    "INSERT INTO presence (room, user_id, node)
                     SELECT room, user_id, $1 FROM unnest($2::text[], $3::text[]) AS t(room, user_id)
                     ON CONFLICT DO NOTHING",
                )
                .bind(node)
                .bind(&add_rooms)
                .bind(&add_users)
                .execute(&mut *tx)
                .await?;
            }
            for payload in &payloads {
                sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(CHANNEL)
                    .bind(payload)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await
        };
        self.bounded(work).await
    }

    /// What the roster says of `rooms` on nodes other than `node`: the users, or, for a room
    /// where they are more than `max`, the number of users present on any live node.
    pub async fn remote(
        &self,
        rooms: &[Arc<str>],
        node: &str,
        max: usize,
    ) -> StoreResult<HashMap<Arc<str>, Listed>> {
        let names: Vec<String> = rooms.iter().map(|r| r.to_string()).collect();
        // At most max + 1 names per room: one more than can be listed says "count it".
        let rows: Vec<(String, String)> = self
            .bounded(
                sqlx::query_as(
                    "SELECT room, user_id FROM (
                         SELECT room, user_id,
                                row_number() OVER (PARTITION BY room ORDER BY user_id) AS k
                         FROM (SELECT DISTINCT p.room, p.user_id
                               FROM presence p JOIN presence_nodes n ON n.node = p.node
                               WHERE p.room = ANY($1) AND p.node <> $2 AND n.expires_at > now()) d
                     ) w WHERE k <= $3",
                )
                .bind(&names)
                .bind(node)
                .bind(i64::try_from(max).unwrap_or(i64::MAX - 1) + 1)
                .fetch_all(&self.pool),
            )
            .await?;
        let mut listed: HashMap<&str, BTreeSet<Arc<str>>> = HashMap::new();
        for (room, user) in &rows {
            listed
                .entry(room.as_str())
                .or_default()
                .insert(Arc::from(user.as_str()));
        }
        let mut out = HashMap::with_capacity(rooms.len());
        let mut large = Vec::new();
        for room in rooms {
            match listed.remove(room.as_ref()) {
                Some(users) if users.len() > max => large.push(room.to_string()),
                Some(users) => {
                    out.insert(Arc::clone(room), Listed::Users(users));
                }
                None => {
                    out.insert(Arc::clone(room), Listed::Users(BTreeSet::new()));
                }
            }
        }
        if !large.is_empty() {
            let counts: Vec<(String, i64)> = self
                .bounded(
                    sqlx::query_as(
                        "SELECT p.room, count(DISTINCT p.user_id)
                         FROM presence p JOIN presence_nodes n ON n.node = p.node
                         WHERE p.room = ANY($1) AND n.expires_at > now()
                         GROUP BY p.room",
                    )
                    .bind(&large)
                    .fetch_all(&self.pool),
                )
                .await?;
            for (room, n) in counts {
                if let Some(key) = rooms.iter().find(|r| r.as_ref() == room) {
                    out.insert(Arc::clone(key), Listed::Count(n.max(0) as u64));
                }
            }
        }
        Ok(out)
    }

    /// Removes `node` and its rows (a node stopping cleanly): the others stop counting it at
    /// their next heartbeat rather than when it expires.
    pub async fn leave(&self, node: &str) -> StoreResult<()> {
        self.bounded(
            sqlx::query("DELETE FROM presence_nodes WHERE node = $1")
                .bind(node)
                .execute(&self.pool),
        )
        .await
        .map(|_| ())
    }
}

/// `rooms` as JSON arrays, each below the NOTIFY payload limit.
fn notify_payloads(rooms: &[Arc<str>]) -> Vec<String> {
    let mut out = Vec::new();
    let mut chunk: Vec<&str> = Vec::new();
    let mut size = 2;
    for room in rooms {
        let cost = serde_json::to_string(&**room).map_or(0, |s| s.len()) + 1;
        if !chunk.is_empty() && size + cost > NOTIFY_CHUNK {
            out.push(serde_json::to_string(&chunk).unwrap_or_default());
            chunk.clear();
            size = 2;
        }
        chunk.push(room);
        size += cost;
    }
    if !chunk.is_empty() {
        out.push(serde_json::to_string(&chunk).unwrap_or_default());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_stay_below_the_payload_limit() {
        let rooms: Vec<Arc<str>> = (0..2000)
            .map(|i| Arc::from(format!("room-{i:05}")))
            .collect();
        let payloads = notify_payloads(&rooms);
        assert!(payloads.len() > 1);
        let mut seen = 0;
        for p in &payloads {
            assert!(p.len() < 8000, "{} bytes", p.len());
            seen += serde_json::from_str::<Vec<String>>(p).unwrap().len();
        }
        assert_eq!(seen, rooms.len());
        assert!(notify_payloads(&[]).is_empty());
    }
}
