//! A real SQLite store that records what it is asked, for unit tests of the store's callers
//! (the writer, the relay): every group `append_rooms` committed, how many reads and rows
//! `read_after` served, and a hook run while `room_heads` is in flight.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::{
    Appended, NewMessage, ReadMark, RoomInfo, SqliteStore, Store, StoreResult, StoredMessage,
    Unread,
};

/// Runs once while `room_heads` is in flight (after the query, before it answers).
pub type Hook = Box<dyn FnOnce() + Send>;

pub struct Instrumented {
    inner: SqliteStore,
    /// Removed with the store.
    _dir: tempfile::TempDir,
    /// Each `append_rooms` call's messages, one list per room.
    groups: Mutex<Vec<Vec<Vec<NewMessage>>>>,
    reads: AtomicUsize,
    read_rows: AtomicUsize,
    during_heads: Mutex<Option<Hook>>,
}

impl Instrumented {
    /// An empty store in a temporary directory of its own.
    pub async fn new() -> Arc<Instrumented> {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("store.db").display());
        Arc::new(Instrumented {
            inner: SqliteStore::connect(&url).await.expect("sqlite"),
            _dir: dir,
            groups: Mutex::default(),
            reads: AtomicUsize::new(0),
            read_rows: AtomicUsize::new(0),
            during_heads: Mutex::new(None),
        })
    }

    /// Every `append_rooms` call so far: its messages, one list per room.
    pub fn groups(&self) -> Vec<Vec<Vec<NewMessage>>> {
        lock(&self.groups).clone()
    }

    /// `read_after` calls answered so far.
    pub fn reads(&self) -> usize {
        self.reads.load(Ordering::Relaxed)
    }

    /// Messages `read_after` returned so far.
    pub fn read_rows(&self) -> usize {
        self.read_rows.load(Ordering::Relaxed)
    }

    /// Runs `hook` during the next `room_heads` call.
    pub fn during_next_heads(&self, hook: Hook) {
        *lock(&self.during_heads) = Some(hook);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[async_trait]
impl Store for Instrumented {
    async fn append_rooms(
        &self,
        batches: &[(&str, &[NewMessage])],
    ) -> StoreResult<Vec<Vec<Appended>>> {
        lock(&self.groups).push(batches.iter().map(|(_, b)| b.to_vec()).collect());
        self.inner.append_rooms(batches).await
    }
    async fn room_info(&self, room: &str) -> StoreResult<RoomInfo> {
        self.inner.room_info(room).await
    }
    async fn read_after(
        &self,
        room: &str,
        after: u64,
        up_to: Option<u64>,
        limit: usize,
    ) -> StoreResult<Vec<StoredMessage>> {
        let page = self.inner.read_after(room, after, up_to, limit).await?;
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.read_rows.fetch_add(page.len(), Ordering::Relaxed);
        Ok(page)
    }
    async fn read_before(
        &self,
        room: &str,
        before: u64,
        limit: usize,
    ) -> StoreResult<Vec<StoredMessage>> {
        self.inner.read_before(room, before, limit).await
    }
    async fn room_heads(&self, rooms: &[String]) -> StoreResult<Vec<(String, u64)>> {
        let heads = self.inner.room_heads(rooms).await;
        let hook = lock(&self.during_heads).take();
        if let Some(hook) = hook {
            hook();
        }
        heads
    }
    async fn delete_before(&self, ts_ms: i64, limit: usize) -> StoreResult<u64> {
        self.inner.delete_before(ts_ms, limit).await
    }
    async fn mark_read(&self, user: &str, room: &str, seq: u64) -> StoreResult<ReadMark> {
        self.inner.mark_read(user, room, seq).await
    }
    async fn room_info_with_read(&self, room: &str, user: &str) -> StoreResult<(RoomInfo, u64)> {
        self.inner.room_info_with_read(room, user).await
    }
    async fn unread(&self, user: &str, after: &str, limit: usize) -> StoreResult<Vec<Unread>> {
        self.inner.unread(user, after, limit).await
    }
    async fn ping(&self) -> StoreResult<()> {
        self.inner.ping().await
    }
    fn kind(&self) -> &'static str {
        "instrumented"
    }
}
