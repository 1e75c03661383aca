//! The queue between a session's two halves: replies and commands from the inbound half to the
//! outbound half, in order, bounded (the inbound half waits for room, which is how a client that
//! does not read stops being read).
//!
//! Both halves run in the session's one task (`tokio::join!`), one sending and one receiving, so
//! the queue lives in that task and allocates nothing up front: a tokio channel cost every idle
//! connection about 1.5 KiB (its shared state plus a first block of 32 slots). This is a
//! `VecDeque` that allocates on first use. The outbound half (the one reader) waits on an
//! `AtomicWaker`, registered before it looks at the queue, as the mailbox's reader does: its
//! `select!` polls `recv` again for every live delivery, and a `Notify` waiter, linked in and
//! out of a list under a lock each time, was a visible share of a fan-out's CPU. The inbound
//! half waits for room on a `Notify`, whose stored permit covers the moment between finding the
//! queue full and waiting.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Mutex, MutexGuard};
use std::task::Poll;

use futures_util::task::AtomicWaker;
use tokio::sync::Notify;

use super::Control;

/// Commands and replies queued between the halves at most.
pub(super) const CAPACITY: usize = 64;

#[derive(Default)]
pub(super) struct ControlQueue {
    inner: Mutex<Inner>,
    /// Woken when a command is queued or the inbound half is gone.
    ready: AtomicWaker,
    /// Signalled when a command is taken or the outbound half is gone.
    space: Notify,
    /// Signalled (for good) when the outbound half is gone: how the inbound half learns to stop.
    closed: Notify,
}

#[derive(Default)]
struct Inner {
    items: VecDeque<Control>,
    inbound_gone: bool,
    outbound_gone: bool,
}

impl Inner {
    /// Takes the first item. The buffer is freed when that empties it: the queue is empty most
    /// of a connection's life, and its buffer (128 bytes and up) would otherwise stay with every
    /// idle connection that ever queued anything; allocating it again is cheap next to the
    /// socket write each reply costs.
    fn pop(&mut self) -> Option<Control> {
        let cmd = self.items.pop_front();
        if self.items.is_empty() && self.items.capacity() > 0 {
            self.items = VecDeque::new();
        }
        cmd
    }
}

impl ControlQueue {
    /// Queues `cmd`, waiting for room; gives it back if the outbound half is gone.
    pub(super) async fn send(&self, cmd: Control) -> Result<(), Control> {
        loop {
            {
                let mut inner = self.lock();
                if inner.outbound_gone {
                    return Err(cmd);
                }
                if inner.items.len() < CAPACITY {
                    inner.items.push_back(cmd);
                    drop(inner);
                    self.ready.wake();
                    return Ok(());
                }
            }
            self.space.notified().await;
        }
    }

    /// The next command; `None` once the inbound half is gone and the queue is empty. One
    /// reader at a time.
    pub(super) async fn recv(&self) -> Option<Control> {
        poll_fn(|cx| {
            // Registered before looking: a push after the look wakes this reader.
            self.ready.register(cx.waker());
            let mut inner = self.lock();
            if let Some(cmd) = inner.pop() {
                drop(inner);
                self.space.notify_one();
                return Poll::Ready(Some(cmd));
            }
            if inner.inbound_gone {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await
    }

    /// The next command if one is queued.
    pub(super) fn try_recv(&self) -> Option<Control> {
        let cmd = self.lock().pop();
        if cmd.is_some() {
            self.space.notify_one();
        }
        cmd
    }

    /// The inbound half ended: `recv` returns `None` once the queue is drained.
    pub(super) fn inbound_gone(&self) {
        self.lock().inbound_gone = true;
        self.ready.wake();
    }

    /// The outbound half ended: `send` fails from now on.
    pub(super) fn outbound_gone(&self) {
        let mut inner = self.lock();
        inner.outbound_gone = true;
        // What is queued will never be written.
        inner.items = VecDeque::new();
        drop(inner);
        self.space.notify_one();
        self.closed.notify_waiters();
    }

    /// Completes once the outbound half is gone (at once if it already is).
    pub(super) async fn outbound_closed(&self) {
        loop {
            // Made before the check: `notify_waiters` completes every `Notified` created before
            // it, polled or not, so a close between the check and the await is not missed.
            let notified = self.closed.notified();
            if self.lock().outbound_gone {
                return;
            }
            notified.await;
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section is a push, a pop or a flag: consistent even after a panic.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn reply(n: usize) -> Control {
        Control::Reply(n.to_string())
    }

    fn text(cmd: Control) -> String {
        match cmd {
            Control::Reply(s) => s,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn in_order_bounded_and_closed_from_either_side() {
        let queue = ControlQueue::default();
        for n in 0..CAPACITY {
            queue.send(reply(n)).await.unwrap();
        }
        // Full: the next send waits until something is taken.
        let blocked = tokio::time::timeout(Duration::from_millis(50), queue.send(reply(999))).await;
        assert!(blocked.is_err(), "a full queue makes the sender wait");
        let (sent, first) = tokio::join!(queue.send(reply(CAPACITY)), async {
            tokio::task::yield_now().await;
            queue.recv().await
        });
        assert!(sent.is_ok());
        assert_eq!(text(first.unwrap()), "0");
        for n in 1..=CAPACITY {
            assert_eq!(text(queue.try_recv().unwrap()), n.to_string());
        }
        assert!(queue.try_recv().is_none());

        // The inbound half goes away: what is queued is still delivered, then `None`.
        queue.send(reply(7)).await.unwrap();
        queue.inbound_gone();
        assert_eq!(text(queue.recv().await.unwrap()), "7");
        assert!(queue.recv().await.is_none());

        // The outbound half goes away: sends fail at once, and the inbound half hears of it.
        let queue = ControlQueue::default();
        let (closed, ()) = tokio::join!(
            tokio::time::timeout(Duration::from_secs(5), queue.outbound_closed()),
            async {
                tokio::task::yield_now().await;
                queue.outbound_gone();
            }
        );
        assert!(closed.is_ok(), "a waiting inbound half is told");
        assert!(queue.send(reply(1)).await.is_err());
        tokio::time::timeout(Duration::from_secs(5), queue.outbound_closed())
            .await
            .expect("and one that asks later");
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken_by_a_send() {
        let queue = ControlQueue::default();
        let (got, sent) = tokio::join!(queue.recv(), async {
            tokio::task::yield_now().await;
            queue.send(reply(5)).await
        });
        assert!(sent.is_ok());
        assert_eq!(text(got.unwrap()), "5");
    }
}
