//! The bounded wait for a backend that can take a call (h2) or a client connection (l4).
//!
//! When no backend can take one right now — none ready (workers starting or restarting),
//! every one already tried, or every one at its cap of calls in flight — the caller waits
//! here instead of failing at once, until a backend can take it or its time is up
//! (linkerd's failfast queue, HAProxy's server queue). Waiters are woken oldest first when
//! a call finishes on a backend at its cap, and all at once when a backend enters rotation;
//! a slow recheck catches what no event announces (an ejection running out).
//!
//! The fast path never gets here: a pick that succeeds costs one atomic load more than
//! before (whether anyone waits, when a call finishes).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::metrics as m;

/// How often a waiter looks again without being woken: bounds the wait for changes that
/// send no wake-up (an ejection that runs out), while costing a queued call only a few
/// wake-ups a second.
const RECHECK: Duration = Duration::from_millis(250);

/// Wakes the calls and connections waiting for a backend; shared by a backend set and
/// every backend in it.
#[derive(Debug)]
pub(crate) struct Capacity {
    /// Waiters register here; `notify_one` wakes the oldest.
    notify: Notify,
    /// How many wait now, so a finished call wakes someone only when someone waits.
    waiting: AtomicUsize,
    /// Queue metrics, registered once.
    metrics: QueueMetrics,
}

#[derive(Debug)]
struct QueueMetrics {
    /// Waiting now.
    waiting: Gauge,
    /// How long each waited, whether it got a backend or not.
    wait: Histogram,
    /// Waits that ran out of time.
    timeouts: Counter,
}

impl Default for Capacity {
    fn default() -> Self {
        Self {
            notify: Notify::new(),
            waiting: AtomicUsize::new(0),
            metrics: QueueMetrics {
                waiting: gauge!(m::QUEUE_WAITING),
                wait: histogram!(m::QUEUE_WAIT_SECONDS),
                timeouts: counter!(m::QUEUE_TIMEOUTS),
            },
        }
    }
}

impl Capacity {
    /// A call or connection ended on some backend: the oldest waiter may now fit there.
    pub(crate) fn released(&self) {
        if self.waiting.load(Ordering::Relaxed) > 0 {
            self.notify.notify_one();
        }
    }

    /// A backend entered rotation: every waiter may now fit there.
    pub(crate) fn joined(&self) {
        if self.waiting.load(Ordering::Relaxed) > 0 {
            self.notify.notify_waiters();
        }
    }

    /// How many wait now.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Waits until `attempt` succeeds or `until` passes; `attempt` is tried once before
    /// the first wait and after every wake-up. `Err` carries how long it waited.
    pub(crate) async fn wait_for<T>(
        &self,
        until: Instant,
        mut attempt: impl FnMut() -> Option<T>,
    ) -> Result<T, Duration> {
        let started = Instant::now();
        self.waiting.fetch_add(1, Ordering::Relaxed);
        self.metrics.waiting.increment(1.0);
        // Counted out however the wait ends, also when the caller is dropped (a client
        // that cancels leaves the queue at once).
        let _leave = Leave(self);
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before looking, so a wake-up between the look and the wait is kept.
            notified.as_mut().enable();
            if let Some(found) = attempt() {
                self.metrics.wait.record(started.elapsed().as_secs_f64());
                return Ok(found);
            }
            let now = Instant::now();
            if now >= until {
                let waited = now.saturating_duration_since(started);
                self.metrics.wait.record(waited.as_secs_f64());
                self.metrics.timeouts.increment(1);
                return Err(waited);
            }
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(until.min(now + RECHECK)) => {}
            }
        }
    }
}

/// Takes a waiter off the count when its wait ends.
struct Leave<'a>(&'a Capacity);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.waiting.decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gets_what_becomes_free_and_leaves_the_count() {
        let c = Arc::new(Capacity::default());
        let free = Arc::new(AtomicBool::new(false));
        let (c2, f2) = (Arc::clone(&c), Arc::clone(&free));
        let waiter = tokio::spawn(async move {
            c2.wait_for(Instant::now() + Duration::from_secs(10), || {
                f2.load(Ordering::SeqCst).then_some(7)
            })
            .await
        });
        tokio::task::yield_now().await;
        assert_eq!(c.waiting(), 1);
        free.store(true, Ordering::SeqCst);
        c.released();
        assert_eq!(waiter.await.ok(), Some(Ok(7)));
        assert_eq!(c.waiting(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_ends_at_its_time_with_how_long_it_waited() {
        let c = Capacity::default();
        let until = Instant::now() + Duration::from_secs(3);
        let r: Result<(), Duration> = c.wait_for(until, || None).await;
        assert_eq!(r, Err(Duration::from_secs(3)));
        assert_eq!(c.waiting(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_woken_oldest_first() {
        let c = Arc::new(Capacity::default());
        let slots = Arc::new(AtomicUsize::new(0));
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..3 {
            let (c, slots, order) = (Arc::clone(&c), Arc::clone(&slots), Arc::clone(&order));
            tasks.push(tokio::spawn(async move {
                let got = c
                    .wait_for(Instant::now() + Duration::from_secs(60), || {
                        slots
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                            .ok()
                    })
                    .await;
                order.lock().unwrap_or_else(|p| p.into_inner()).push(i);
                got.is_ok()
            }));
            // Each one queued before the next arrives.
            tokio::task::yield_now().await;
        }
        assert_eq!(c.waiting(), 3);
        for _ in 0..3 {
            slots.fetch_add(1, Ordering::SeqCst);
            c.released();
            // Let the woken one take the slot before the next is freed.
            for _ in 0..5 {
                tokio::task::yield_now().await;
            }
        }
        for t in tasks {
            assert_eq!(t.await.ok(), Some(true));
        }
        assert_eq!(*order.lock().unwrap_or_else(|p| p.into_inner()), [0, 1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_waiter_leaves_the_queue_at_once() {
        let c = Arc::new(Capacity::default());
        let c2 = Arc::clone(&c);
        let waiter = tokio::spawn(async move {
            let _: Result<(), _> = c2
                .wait_for(Instant::now() + Duration::from_secs(60), || None)
                .await;
        });
        tokio::task::yield_now().await;
        assert_eq!(c.waiting(), 1);
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(c.waiting(), 0);
    }
}
