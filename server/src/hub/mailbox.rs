//! A session's queue of live frames: the hub pushes without ever waiting, the session's
//! outbound half takes.
//!
//! Bounded: when it is full the frame is dropped for this session and the mailbox remembers that
//! it lagged; the session then reads what it missed from the database. The dropped-frame signal
//! and the frames share one lock and one waker, so a session is woken once for either.
//!
//! Ephemeral frames ([`Notice`]: signals, read cursors) share the queue but never its second
//! half: one is dropped (not counted as a lag: nothing repairs it) while the queue is half full,
//! so a burst of signals can never make a session drop a message and read the database.
//!
//! Not a tokio channel: an mpsc channel allocated its shared state and a first block of slots
//! (about 0.8 KiB) for every connection, idle or not. This is a `VecDeque` that allocates when
//! the first frame arrives, and an `AtomicWaker` (the session's one task is the only reader).

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;

use futures_util::task::AtomicWaker;

use super::{Live, Notice};

/// What the outbound half takes from its mailbox.
#[derive(Debug)]
pub enum Delivery {
    /// The next live frame.
    Live(Arc<Live>),
    /// An ephemeral frame (signal, read cursor).
    Notice(Arc<Notice>),
    /// Frames were dropped since the last take (the mailbox was full): read the database.
    Lagged,
    /// The node is draining: close the connection (1012). Reported from then on, before
    /// anything else.
    Closing,
}

/// Past this many slots, an emptied queue gives its memory back (a burst is over).
const KEEP_CAPACITY: usize = 64;

#[derive(Debug)]
pub struct Mailbox {
    inner: Mutex<Inner>,
    reader: AtomicWaker,
    capacity: usize,
}

/// A queued frame.
#[derive(Debug)]
enum Queued {
    Live(Arc<Live>),
    Notice(Arc<Notice>),
}

#[derive(Debug, Default)]
struct Inner {
    frames: VecDeque<Queued>,
    lagged: bool,
    closing: bool,
}

impl Mailbox {
    /// A mailbox holding at most `capacity` frames (at least one).
    pub fn new(capacity: usize) -> Arc<Mailbox> {
        Arc::new(Mailbox {
            inner: Mutex::default(),
            reader: AtomicWaker::new(),
            capacity: capacity.max(1),
        })
    }

    /// Queues `live`, or drops it and marks the mailbox lagged when full. Never waits. True if
    /// it was queued.
    pub fn push(&self, live: &Arc<Live>) -> bool {
        let queued = {
            let mut inner = self.lock();
            if inner.frames.len() < self.capacity {
                inner.frames.push_back(Queued::Live(Arc::clone(live)));
                true
            } else {
                inner.lagged = true;
                false
            }
        };
        self.reader.wake();
        queued
    }

    /// Queues `notice` while the queue is less than half full, else drops it (the session is
    /// not told: at most once). Never waits. True if it was queued.
    pub fn push_notice(&self, notice: &Arc<Notice>) -> bool {
        let queued = {
            let mut inner = self.lock();
            if inner.frames.len() < self.capacity.div_ceil(2) {
                inner.frames.push_back(Queued::Notice(Arc::clone(notice)));
                true
            } else {
                false
            }
        };
        if queued {
            self.reader.wake();
        }
        queued
    }

    /// Tells the session the node is draining (see [`Delivery::Closing`]).
    pub fn close(&self) {
        self.lock().closing = true;
        self.reader.wake();
    }

    /// The next delivery, if any; closing comes first, then a lag, then the frames still queued.
    pub fn try_recv(&self) -> Option<Delivery> {
        let mut inner = self.lock();
        if inner.closing {
            return Some(Delivery::Closing);
        }
        if std::mem::take(&mut inner.lagged) {
            return Some(Delivery::Lagged);
        }
        let next = inner.frames.pop_front()?;
        if inner.frames.is_empty() && inner.frames.capacity() > KEEP_CAPACITY {
            inner.frames = VecDeque::new();
        }
        Some(match next {
            Queued::Live(live) => Delivery::Live(live),
            Queued::Notice(notice) => Delivery::Notice(notice),
        })
    }

    /// Waits for the next delivery. One reader at a time.
    pub async fn recv(&self) -> Delivery {
        poll_fn(|cx| {
            // Registered before looking: a push after the look wakes this reader.
            self.reader.register(cx.waker());
            match self.try_recv() {
                Some(delivery) => Poll::Ready(delivery),
                None => Poll::Pending,
            }
        })
        .await
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section is a push, a pop or a flag: consistent even after a panic.
        super::lock(&self.inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::ws::Utf8Bytes;
    use std::time::Duration;

    fn live(seq: u64) -> Arc<Live> {
        Arc::new(Live {
            room: "r".into(),
            seq,
            frame: Utf8Bytes::from(format!("m{seq}")),
        })
    }

    fn seq(delivery: Option<Delivery>) -> Option<u64> {
        match delivery? {
            Delivery::Live(live) => Some(live.seq),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn bounded_in_order_and_a_lag_comes_first() {
        let mailbox = Mailbox::new(2);
        assert!(mailbox.push(&live(1)));
        assert!(mailbox.push(&live(2)));
        assert!(!mailbox.push(&live(3)), "full: dropped");
        assert!(matches!(mailbox.try_recv(), Some(Delivery::Lagged)));
        assert_eq!(seq(mailbox.try_recv()), Some(1));
        assert_eq!(seq(mailbox.try_recv()), Some(2));
        assert!(
            mailbox.try_recv().is_none(),
            "3 was dropped, the lag reported once"
        );
    }

    #[test]
    fn notices_never_take_the_second_half_and_are_not_a_lag() {
        let mailbox = Mailbox::new(4);
        let notice = Arc::new(Notice {
            room: None,
            except: None,
            frame: Utf8Bytes::from("n"),
        });
        assert!(mailbox.push_notice(&notice));
        assert!(mailbox.push_notice(&notice));
        assert!(!mailbox.push_notice(&notice), "half full: dropped");
        assert!(mailbox.push(&live(1)), "messages still fit");
        assert!(mailbox.push(&live(2)));
        assert!(matches!(mailbox.try_recv(), Some(Delivery::Notice(_))));
        assert!(matches!(mailbox.try_recv(), Some(Delivery::Notice(_))));
        assert_eq!(seq(mailbox.try_recv()), Some(1), "no lag reported");
        assert_eq!(seq(mailbox.try_recv()), Some(2));
    }

    #[test]
    fn closing_comes_before_everything_and_stays() {
        let mailbox = Mailbox::new(4);
        assert!(mailbox.push(&live(1)));
        mailbox.close();
        assert!(matches!(mailbox.try_recv(), Some(Delivery::Closing)));
        assert!(matches!(mailbox.try_recv(), Some(Delivery::Closing)));
    }

    #[test]
    fn an_emptied_queue_gives_back_a_burst_worth_of_memory() {
        let mailbox = Mailbox::new(1024);
        for n in 0..1000 {
            mailbox.push(&live(n));
        }
        while mailbox.try_recv().is_some() {}
        assert!(mailbox.lock().frames.capacity() <= KEEP_CAPACITY);
    }

    #[tokio::test]
    async fn a_waiting_reader_is_woken_by_a_push() {
        let mailbox = Mailbox::new(4);
        let (got, ()) = tokio::join!(
            tokio::time::timeout(Duration::from_secs(5), mailbox.recv()),
            async {
                tokio::task::yield_now().await;
                mailbox.push(&live(7));
            }
        );
        match got.expect("woken") {
            Delivery::Live(live) => assert_eq!(live.seq, 7),
            other => panic!("unexpected {other:?}"),
        }
    }
}
