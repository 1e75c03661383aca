//! How many database reads one user may have in flight on a node at once
//! (`SEQCAST_USER_READ_CONCURRENCY`): HTTP history and room reads, and a session's join and
//! catch-up reads.
//!
//! The store already keeps commit capacity for itself (reads may hold 12 of Postgres's 16
//! connections); this keeps one user from taking all 12, so other users' joins, catch-ups and
//! history pages still get their turn. What happens past the limit differs by caller:
//!
//! - an HTTP read is refused at once with 429 `rate_limited` and `Retry-After: 1`: queueing it
//!   would keep a request, its connection and its memory per hostile request, and a well-behaved
//!   client simply asks again;
//! - a WebSocket read (join, catch-up page) waits its turn: a session's cursor is stateful and
//!   refusing mid-stream would leave the client to guess; the wait only slows the same user's
//!   other reads, and the session's reads are one at a time anyway.
//!
//! The server key is not limited (it is the operator's own backend).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The default of `SEQCAST_USER_READ_CONCURRENCY`: a third of the reads the store lets through
/// at once, so at least three users always share the read connections.
pub const DEFAULT_USER_READ_CONCURRENCY: usize = 4;

/// The per-user read slots of a node. Cheap to clone.
#[derive(Clone)]
pub struct UserReads {
    inner: Arc<Inner>,
}

struct Inner {
    /// Reads per user at once; 0 = no limit.
    limit: usize,
    /// Users with a read in flight or waiting. A std mutex: held for a lookup or a removal, never
    /// across an `.await`. An entry goes as soon as nobody holds or waits for its slots.
    users: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// A read slot, given back when dropped.
pub struct ReadPermit {
    slot: Option<(OwnedSemaphorePermit, String, Arc<Inner>)>,
}

impl Drop for ReadPermit {
    fn drop(&mut self) {
        let Some((permit, user, inner)) = self.slot.take() else {
            return;
        };
        drop(permit);
        let mut users = inner.lock();
        // Only the map holds the semaphore: no read of this user in flight or waiting.
        if users
            .get(&user)
            .is_some_and(|sem| Arc::strong_count(sem) == 1)
        {
            users.remove(&user);
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Semaphore>>> {
        // Poisoning needs a panic while the lock is held: a lookup or a removal.
        self.users.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn semaphore(&self, user: &str) -> Arc<Semaphore> {
        let mut users = self.lock();
        Arc::clone(
            users
                .entry(user.to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(self.limit))),
        )
    }
}

impl UserReads {
    /// At most `limit` reads per user at once; 0 = no limit.
    pub fn new(limit: usize) -> UserReads {
        UserReads {
            inner: Arc::new(Inner {
                limit,
                users: Mutex::default(),
            }),
        }
    }

    /// A slot for `user` if one is free now (HTTP: refuse otherwise).
    pub fn try_acquire(&self, user: &str) -> Option<ReadPermit> {
        if self.inner.limit == 0 {
            return Some(ReadPermit { slot: None });
        }
        let semaphore = self.inner.semaphore(user);
        match Arc::clone(&semaphore).try_acquire_owned() {
            Ok(permit) => Some(self.permit(permit, user)),
            Err(_) => {
                self.forget_if_idle(user, semaphore);
                None
            }
        }
    }

    /// A slot for `user`, waiting for one (WebSocket reads).
    pub async fn acquire(&self, user: &str) -> ReadPermit {
        if self.inner.limit == 0 {
            return ReadPermit { slot: None };
        }
        let semaphore = self.inner.semaphore(user);
        match semaphore.acquire_owned().await {
            Ok(permit) => self.permit(permit, user),
            // Never closed; without a slot the read goes ahead unlimited rather than failing.
            Err(_) => ReadPermit { slot: None },
        }
    }

    fn permit(&self, permit: OwnedSemaphorePermit, user: &str) -> ReadPermit {
        ReadPermit {
            slot: Some((permit, user.to_owned(), Arc::clone(&self.inner))),
        }
    }

    fn forget_if_idle(&self, user: &str, semaphore: Arc<Semaphore>) {
        drop(semaphore);
        let mut users = self.inner.lock();
        if users
            .get(user)
            .is_some_and(|sem| Arc::strong_count(sem) == 1)
        {
            users.remove(user);
        }
    }

    /// Users with a read in flight or waiting (for tests).
    pub fn users(&self) -> usize {
        self.inner.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_user_gets_at_most_the_limit_and_slots_come_back() {
        let reads = UserReads::new(2);
        let a1 = reads.try_acquire("alice").expect("first");
        let a2 = reads.try_acquire("alice").expect("second");
        assert!(reads.try_acquire("alice").is_none(), "third refused");
        // Another user is not affected.
        let b1 = reads.try_acquire("bob").expect("bob");
        // A waiting read gets the slot given back.
        let waiting = tokio::spawn({
            let reads = reads.clone();
            async move { reads.acquire("alice").await }
        });
        drop(a1);
        let a3 = waiting.await.expect("joined");
        assert!(reads.try_acquire("alice").is_none());
        drop((a2, a3, b1));
        assert_eq!(reads.users(), 0, "idle users are forgotten");
    }

    #[tokio::test]
    async fn zero_is_no_limit() {
        let reads = UserReads::new(0);
        let permits: Vec<_> = (0..100).map(|_| reads.try_acquire("alice")).collect();
        assert!(permits.iter().all(Option::is_some));
        assert_eq!(reads.users(), 0);
    }
}
