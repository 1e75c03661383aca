//! Runs a session's two halves in its one task, polling each half only when it was woken.
//!
//! `tokio::join!` polls every unfinished future each time the task is woken. For a session that
//! meant a live message for the outbound half also polled the inbound half: a read attempt on the
//! socket (tungstenite zero-fills its read buffer before each one), the idle timer and the stop
//! token, for nothing. Under a fan-out that was one wasted read per delivery. Here each half gets
//! a waker of its own that marks it woken before waking the task.
//!
//! Cost per connection: two small `Arc`s (about 48 bytes each), made once.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// One half's waker: remembers that the half was woken, then wakes the task.
struct Half {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Half {
    fn new() -> Arc<Half> {
        Arc::new(Half {
            // Polled once at the start, like any new future.
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        })
    }

    /// Polls `fut` if this half was woken since it was last polled. The task's waker is stored
    /// before the flag is taken: a wake-up that lands after the check then wakes the task again.
    fn poll<F: Future<Output = ()>>(
        self: &Arc<Self>,
        waker: &Waker,
        fut: Pin<&mut F>,
        cx: &Context<'_>,
    ) -> Poll<()> {
        self.task.register(cx.waker());
        if !self.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        fut.poll(&mut Context::from_waker(waker))
    }
}

impl Wake for Half {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// Runs `a` and `b` to completion in the calling task; each is polled only after its own wake-up.
///
/// Takes the halves pinned where the caller made them: taken by value, an async fn keeps its
/// arguments and the pinned copies it polls, twice the size for the connection's whole life.
pub(super) async fn join<A, B>(mut a: Pin<&mut A>, mut b: Pin<&mut B>)
where
    A: Future<Output = ()>,
    B: Future<Output = ()>,
{
    let (half_a, half_b) = (Half::new(), Half::new());
    let waker_a = Waker::from(Arc::clone(&half_a));
    let waker_b = Waker::from(Arc::clone(&half_b));
    let (mut a_done, mut b_done) = (false, false);
    poll_fn(|cx| {
        if !a_done {
            a_done = half_a.poll(&waker_a, a.as_mut(), cx).is_ready();
        }
        if !b_done {
            b_done = half_b.poll(&waker_b, b.as_mut(), cx).is_ready();
        }
        if a_done && b_done {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::pin;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    /// Counts its polls; finishes when `done` is notified.
    async fn counted(polls: &AtomicUsize, done: &tokio::sync::Notify) {
        let mut notified = pin!(done.notified());
        poll_fn(|cx| {
            polls.fetch_add(1, Ordering::Relaxed);
            notified.as_mut().poll(cx)
        })
        .await;
    }

    #[tokio::test]
    async fn a_half_is_polled_only_when_woken_and_both_finish() {
        let (polls_a, polls_b) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let (done_a, done_b) = (tokio::sync::Notify::new(), tokio::sync::Notify::new());
        // `b` wakes itself 50 times before `a` is told to finish.
        let ticks = async {
            for _ in 0..50 {
                tokio::task::yield_now().await;
            }
            done_a.notify_one();
            done_b.notify_one();
        };
        let joined = async {
            let a = pin!(counted(&polls_a, &done_a));
            let b = pin!(async {
                tokio::join!(counted(&polls_b, &done_b), ticks);
            });
            join(a, b).await;
        };
        tokio::time::timeout(Duration::from_secs(10), joined)
            .await
            .expect("both halves finish");
        assert!(
            polls_b.load(Ordering::Relaxed) >= 50,
            "the yielding half ran"
        );
        // Polled once at the start and once when notified: never for the other half's wake-ups.
        assert_eq!(polls_a.load(Ordering::Relaxed), 2);
    }
}
