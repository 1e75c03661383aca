//! A node before it serves. It listens at once and answers `/live`; `/ready` is 503 with the
//! reason it is not serving yet, and every other request 503 `unavailable`, while it opens its
//! database, retrying with capped exponential backoff: an orchestrator that starts the node
//! before Postgres (or Postgres restarts meanwhile) sees a live node that is not ready, not a
//! crash loop. Once the store is open (and the schema current) the node's full router takes
//! over ([`Startup::serve`]).

use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::Router;

use crate::config::Config;
use crate::store::{self, Store, StoreError, StoreOptions};

/// The first wait between attempts at opening the database.
const FIRST_RETRY: Duration = Duration::from_millis(100);

/// The longest wait between attempts (reached after six failures).
const MAX_RETRY: Duration = Duration::from_secs(5);

/// What a node that is not serving yet says about itself, and the router it serves once it is.
/// Cheap to clone.
#[derive(Clone)]
pub struct Startup(Arc<Shared>);

struct Shared {
    node_id: String,
    /// `/ready`'s reason while starting. A std mutex: held only to copy a string, never across
    /// an await.
    reason: Mutex<String>,
    /// The node's full routers, once it serves.
    serving: OnceLock<Routers>,
}

/// Which of a node's HTTP surfaces a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// `SEQCAST_LISTEN`: the API, WebSockets, health (and metrics without an admin listener).
    Public,
    /// `SEQCAST_ADMIN_LISTEN`: metrics and health.
    Admin,
}

struct Routers {
    public: Router,
    admin: Router,
}

impl Startup {
    pub fn new(node_id: &str) -> Startup {
        Startup(Arc::new(Shared {
            node_id: node_id.to_owned(),
            reason: Mutex::new("opening the database".to_owned()),
            serving: OnceLock::new(),
        }))
    }

    pub fn node_id(&self) -> &str {
        &self.0.node_id
    }

    /// Why the node is not serving yet.
    pub fn reason(&self) -> String {
        self.0
            .reason
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn set_reason(&self, reason: String) {
        *self
            .0
            .reason
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = reason;
    }

    /// From now on every request goes to `public` or, on the admin listener, to `admin`.
    pub fn serve(&self, public: Router, admin: Router) {
        if self.0.serving.set(Routers { public, admin }).is_err() {
            tracing::warn!("the node was already serving");
        }
    }

    /// The full router of `surface`, once the node serves.
    pub fn router(&self, surface: Surface) -> Option<Router> {
        let routers = self.0.serving.get()?;
        Some(match surface {
            Surface::Public => routers.public.clone(),
            Surface::Admin => routers.admin.clone(),
        })
    }
}

/// Opens the node's store, retrying (100 ms doubling to 5 s, with jitter, so that nodes started
/// together do not retry in step) for as long as it takes, and keeps `startup`'s reason up to
/// date meanwhile. Fails only for a `DATABASE_URL` that no retry can fix (it does not parse).
pub async fn open_store(config: &Config, startup: &Startup) -> anyhow::Result<Arc<dyn Store>> {
    let options = StoreOptions {
        timeout: config.db_timeout,
        pool_size: config.db_pool_size,
        migrate: config.migrate,
        max_message_bytes: Some(config.max_message_bytes),
    };
    let mut backoff = Backoff::new(FIRST_RETRY, MAX_RETRY);
    loop {
        let error = match store::connect(config.database_url.expose(), &options).await {
            Ok(store) => return Ok(store),
            Err(StoreError::Other(sqlx::Error::Configuration(e))) => {
                anyhow::bail!("DATABASE_URL {}: {e}", config.database_url)
            }
            Err(e) => e,
        };
        let reason = match &error {
            StoreError::Unavailable(e) => format!("database unreachable: {e}"),
            other => other.to_string(),
        };
        let wait = backoff.next_wait();
        tracing::warn!(%reason, retry_in = ?wait, "not serving yet");
        startup.set_reason(reason);
        tokio::time::sleep(wait).await;
    }
}

/// Capped exponential backoff with jitter: each wait is drawn from the upper half of the
/// current step, which doubles up to the cap.
#[derive(Debug)]
pub struct Backoff {
    step: Duration,
    cap: Duration,
    hasher: std::collections::hash_map::RandomState,
    draws: u64,
}

impl Backoff {
    pub fn new(first: Duration, cap: Duration) -> Backoff {
        Backoff {
            step: first.min(cap),
            cap,
            // A randomly keyed hasher: randomness enough for jitter without a dependency.
            hasher: std::collections::hash_map::RandomState::new(),
            draws: 0,
        }
    }

    /// The next wait.
    pub fn next_wait(&mut self) -> Duration {
        self.draws += 1;
        let fraction = (self.hasher.hash_one(self.draws) % 1000) as u32;
        let half = self.step / 2;
        let wait = half + half * fraction / 1000;
        self.step = self.step.saturating_mul(2).min(self.cap);
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let mut backoff = Backoff::new(FIRST_RETRY, MAX_RETRY);
        let steps = [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000];
        for step in steps {
            let step = Duration::from_millis(step);
            let wait = backoff.next_wait();
            assert!(
                wait >= step / 2 && wait <= step,
                "{wait:?} not within the upper half of {step:?}"
            );
        }
    }
}
