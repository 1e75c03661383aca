//! The storage contract: one set of test functions, each taking an `Arc<dyn Store>`, run against
//! every backend: a fresh Postgres database from the test server of `support::postgres` (once
//! with the "C" collation, once with an ICU en-US one, where room names sort differently from
//! their bytes), and a SQLite file in a temporary directory. Each module is one group of
//! scenarios; Postgres-only behaviour (several nodes on one database, failures, timeouts) sits
//! in the modules that name it.
#![allow(clippy::unwrap_used)]

#[path = "../support/mod.rs"]
mod support;

use std::sync::Arc;

use seqcast::store::{Appended, NewMessage, PostgresStore, SqliteStore, Store, StoredMessage};
use support::postgres::TestPostgres;

/// For each contract function `async fn name(store: Arc<dyn Store>)` of the calling module,
/// generates the tests `postgres::name`, `postgres_icu::name` and `sqlite::name` in it.
macro_rules! contract {
    ($($name:ident),+ $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let backend = crate::postgres_backend().await;
                    super::$name(backend.store.clone()).await;
                }
            )+
        }
        mod postgres_icu {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let backend = crate::postgres_icu_backend().await;
                    super::$name(backend.store.clone()).await;
                }
            )+
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let backend = crate::sqlite_backend().await;
                    super::$name(backend.store.clone()).await;
                }
            )+
        }
    };
}

mod appends;
mod collation;
mod cursors;
mod failures;
mod groups;
mod idem;
mod keyed_groups;
mod nodes;
mod reads;
mod retention;

/// A store under test, with what must live as long as it.
pub struct Backend {
    pub store: Arc<dyn Store>,
    /// For tests that reach into the database behind the store's back.
    pub url: String,
    /// The SQLite file's directory; `None` for Postgres.
    _dir: Option<tempfile::TempDir>,
}

async fn postgres_store(url: String) -> Backend {
    let store = PostgresStore::connect(&url).await.unwrap();
    assert_eq!(store.kind(), "postgres");
    Backend {
        store: Arc::new(store),
        url,
        _dir: None,
    }
}

/// A fresh database with the "C" collation (room names sort by their bytes).
pub async fn postgres_backend() -> Backend {
    postgres_store(TestPostgres::shared().fresh_c_database().await).await
}

/// A fresh database with an ICU en-US collation: `general` sorts before `Lobby`.
pub async fn postgres_icu_backend() -> Backend {
    postgres_store(TestPostgres::shared().fresh_icu_database().await).await
}

pub async fn sqlite_backend() -> Backend {
    let dir = tempfile::Builder::new()
        .prefix("seqcast-store-")
        .tempdir()
        .unwrap();
    let url = format!("sqlite://{}", dir.path().join("seqcast.db").display());
    let store = SqliteStore::connect(&url).await.unwrap();
    assert_eq!(store.kind(), "sqlite");
    Backend {
        store: Arc::new(store),
        url,
        _dir: Some(dir),
    }
}

pub fn msg(sender: &str, body: &str) -> NewMessage {
    NewMessage {
        sender: sender.to_owned(),
        body: body.to_owned(),
        idem: None,
    }
}

pub fn keyed(sender: &str, body: &str, idem: &str) -> NewMessage {
    NewMessage {
        idem: Some(idem.to_owned()),
        ..msg(sender, body)
    }
}

pub fn seqs(messages: &[StoredMessage]) -> Vec<u64> {
    messages.iter().map(|m| m.seq).collect()
}

pub fn appended_seqs(appended: &[Appended]) -> Vec<u64> {
    appended.iter().map(|a| a.message.seq).collect()
}

/// Appends `n` plain messages with bodies `0..n`.
pub async fn fill(store: &dyn Store, room: &str, n: usize) -> Vec<Appended> {
    let batch: Vec<NewMessage> = (0..n).map(|i| msg("alice", &i.to_string())).collect();
    store.append(room, &batch).await.unwrap()
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        .try_into()
        .unwrap()
}
