//! When a publisher sends and when it is done: the one loop logic of both publishers
//! ([`crate::publisher`], [`crate::raw_publisher`]), which differ only in how they send and hear
//! acks.
//!
//! A publisher sends while it is before `stop_at`, has room in its window, is due (when paced)
//! and, with a shared budget, can take a send from it. It is done once it no longer sends and
//! nothing is in flight. It fails when acks are still due `drain` after it stopped sending, or
//! when it heard nothing for `io_timeout` while acks were due.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::publisher::{PublisherOutcome, PublisherSpec};

/// What a publisher does after its sends of the moment.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Wait for an ack (or any frame) until this instant, then look again.
    WaitUntil(Instant),
    /// Nothing is in flight and nothing more will be sent.
    Done,
    /// The run failed (the text names the publisher).
    Failed(String),
}

pub struct Pacing<'a> {
    spec: &'a PublisherSpec,
    stop_at: Instant,
    ack_deadline: Instant,
    io_timeout: Duration,
    drain: Duration,
    next_send: Instant,
    budget_spent: bool,
    /// The spec's room the next send goes to.
    cursor: usize,
}

impl<'a> Pacing<'a> {
    pub fn new(
        spec: &'a PublisherSpec,
        stop_at: Instant,
        drain: Duration,
        io_timeout: Duration,
    ) -> Pacing<'a> {
        Pacing {
            spec,
            stop_at,
            ack_deadline: stop_at + drain,
            io_timeout,
            drain,
            next_send: Instant::now() + spec.start_offset,
            budget_spent: false,
            cursor: 0,
        }
    }

    fn sending(&self, now: Instant) -> bool {
        now < self.stop_at && !self.budget_spent
    }

    /// The room of one more send now, with `in_flight` unacknowledged (the spec's rooms in
    /// turn), or `None`; takes the send from the budget. Call until it says `None`.
    pub fn next_send(&mut self, in_flight: usize, now: Instant) -> Option<&'a (usize, Arc<str>)> {
        if !self.sending(now) || in_flight >= self.spec.window {
            return None;
        }
        if self.spec.interval.is_some() && self.next_send > now {
            return None;
        }
        if let Some(budget) = &self.spec.budget {
            let took = budget
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                    left.checked_sub(1)
                })
                .is_ok();
            if !took {
                self.budget_spent = true;
                return None;
            }
        }
        if let Some(interval) = self.spec.interval {
            self.next_send += interval;
        }
        let room = &self.spec.rooms[self.cursor];
        self.cursor = (self.cursor + 1) % self.spec.rooms.len();
        Some(room)
    }

    /// What to do once the sends of the moment are made, with `in_flight` unacknowledged and
    /// the last ack (or frame) heard at `heard`. Looks at the state after those sends: a budget
    /// found spent just now with nothing in flight is `Done` at once.
    pub fn next(&self, in_flight: usize, heard: Instant, now: Instant) -> Next {
        let sending = self.sending(now);
        let id = self.spec.id;
        if !sending && in_flight == 0 {
            return Next::Done;
        }
        if !sending && now >= self.ack_deadline {
            return Next::Failed(format!(
                "publisher {id}: {in_flight} acks missing {:?} after the end of sending",
                self.drain
            ));
        }
        if in_flight > 0 && now.duration_since(heard) > self.io_timeout {
            return Next::Failed(format!(
                "publisher {id}: nothing heard for {:?} with {in_flight} acks due",
                self.io_timeout
            ));
        }
        let mut wake = if sending {
            self.stop_at
        } else {
            self.ack_deadline
        };
        if sending && self.spec.interval.is_some() && in_flight < self.spec.window {
            wake = wake.min(self.next_send);
        }
        if in_flight > 0 {
            wake = wake.min(heard + self.io_timeout + Duration::from_millis(1));
        }
        Next::WaitUntil(wake)
    }

    /// [`Pacing::next`] for a run loop: the instant to wait until, or `None` to stop (a failure
    /// is recorded in `out`).
    pub fn wake(
        &self,
        in_flight: usize,
        heard: Instant,
        now: Instant,
        out: &mut PublisherOutcome,
    ) -> Option<Instant> {
        match self.next(in_flight, heard, now) {
            Next::WaitUntil(wake) => Some(wake),
            Next::Done => None,
            Next::Failed(why) => {
                out.error(why);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    fn spec(window: usize, budget: Option<u64>, interval: Option<Duration>) -> PublisherSpec {
        PublisherSpec {
            id: 7,
            node: crate::client::Node {
                http: "http://127.0.0.1:1".into(),
                ws: "ws://127.0.0.1:1/v1/ws".into(),
                addr: "127.0.0.1:1".parse().unwrap(),
            },
            rooms: vec![(0, Arc::from("a")), (1, Arc::from("b"))],
            window,
            interval,
            start_offset: Duration::ZERO,
            budget: budget.map(|n| Arc::new(AtomicU64::new(n))),
            pad: Arc::from(""),
            idem: true,
        }
    }

    const LONG: Duration = Duration::from_secs(300);

    /// The smoke bench's "catchup hang": a publisher whose shared budget ran out (the other
    /// publisher took the last sends) while nothing of its own was in flight waited for the
    /// whole fill timeout (5 minutes) instead of finishing, because it decided to wait from
    /// whether it was sending *before* it found the budget spent.
    #[test]
    fn a_budget_found_spent_with_nothing_in_flight_is_done_at_once() {
        let spec = spec(4, Some(0), None);
        let now = Instant::now();
        let mut pacing = Pacing::new(&spec, now + LONG, LONG, LONG);
        assert!(pacing.next_send(0, now).is_none());
        assert_eq!(pacing.next(0, now, now), Next::Done);
    }

    #[test]
    fn a_budget_is_shared_rooms_take_turns_and_the_window_bounds_what_is_in_flight() {
        let spec = spec(2, Some(3), None);
        let now = Instant::now();
        let mut pacing = Pacing::new(&spec, now + LONG, LONG, LONG);
        let room = |sent: Option<&(usize, Arc<str>)>| sent.map(|(index, _)| *index);
        assert_eq!(room(pacing.next_send(0, now)), Some(0));
        assert_eq!(room(pacing.next_send(1, now)), Some(1), "the rooms in turn");
        assert!(pacing.next_send(2, now).is_none(), "the window is full");
        assert_eq!(pacing.next(2, now, now), Next::WaitUntil(now + LONG));
        assert!(pacing.next_send(1, now).is_some(), "an ack made room");
        assert!(
            pacing.next_send(1, now).is_none(),
            "the budget of 3 is spent"
        );
        // The acks still due are waited for, until the drain deadline.
        let next = pacing.next(1, now, now);
        assert_eq!(
            next,
            Next::WaitUntil(now + LONG + Duration::from_millis(1)),
            "{next:?}"
        );
        assert_eq!(pacing.next(0, now, now), Next::Done);
    }

    #[test]
    fn paced_sends_wait_for_their_tick_and_silence_fails() {
        let tick = Duration::from_millis(100);
        let spec = spec(8, None, Some(tick));
        let mut pacing = Pacing::new(
            &spec,
            Instant::now() + LONG,
            Duration::from_secs(1),
            tick * 5,
        );
        // The first send is due when the pacing starts.
        let now = Instant::now();
        assert!(pacing.next_send(0, now).is_some());
        assert!(pacing.next_send(1, now).is_none(), "not due yet");
        let Next::WaitUntil(wake) = pacing.next(1, now, now) else {
            panic!("should wait");
        };
        assert!(wake <= now + tick + Duration::from_millis(5));
        let later = now + tick * 6;
        assert!(matches!(
            pacing.next(1, now, later),
            Next::Failed(text) if text.contains("nothing heard")
        ));
    }
}
