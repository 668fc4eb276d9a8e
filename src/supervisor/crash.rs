//! Crash loops: one worker that keeps exiting is restarted with its (capped) backoff and
//! reported while the others go on serving; only when *every* worker keeps exiting and
//! none is ready — the deployment itself is broken — does portshare give up (exit 70), so
//! the orchestrator sees it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::backend::{Backend, Health, WorkerIndex};

/// Every worker kept exiting and none was ready: portshare must end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "every worker is in a crash loop and none is ready: worker {index} exited {exits} times within {window:?} (last: {last_exit}); giving up"
)]
pub struct CrashLoop {
    /// The worker whose exit made it so.
    pub index: WorkerIndex,
    /// Its exits within the window.
    pub exits: usize,
    /// The window.
    pub window: Duration,
    /// How it last ended.
    pub last_exit: String,
}

/// Exits of one worker within the crash-loop window.
#[derive(Debug)]
pub(super) struct ExitHistory {
    /// Exits within the window that make a crash loop.
    limit: usize,
    /// The window.
    window: Duration,
    /// Exit times within the window, oldest first.
    exits: VecDeque<Instant>,
}

impl ExitHistory {
    pub(super) fn new(limit: u32, window: Duration) -> Self {
        Self {
            limit: limit as usize,
            window,
            exits: VecDeque::new(),
        }
    }

    /// Records an exit at `at`; returns the number of exits in the window when that is a
    /// crash loop.
    pub(super) fn record(&mut self, at: Instant) -> Option<usize> {
        self.exits.push_back(at);
        self.forget_before(at);
        (self.exits.len() >= self.limit).then_some(self.exits.len())
    }

    /// Whether the exits within the window that ends at `now` make a crash loop: a worker
    /// that has run without exiting for a whole window is no longer in one.
    fn looping(&mut self, now: Instant) -> bool {
        self.forget_before(now);
        self.exits.len() >= self.limit
    }

    fn forget_before(&mut self, now: Instant) {
        while self
            .exits
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > self.window)
        {
            self.exits.pop_front();
        }
    }
}

/// The exit histories of all workers, for the verdict that ends portshare.
#[derive(Debug)]
pub(super) struct Fleet {
    /// One entry per worker: its backend and its exits.
    workers: Vec<(Arc<Backend>, Mutex<ExitHistory>)>,
}

impl Fleet {
    pub(super) fn new(backends: &[Arc<Backend>], limit: u32, window: Duration) -> Arc<Self> {
        Arc::new(Self {
            workers: backends
                .iter()
                .map(|b| (Arc::clone(b), Mutex::new(ExitHistory::new(limit, window))))
                .collect(),
        })
    }

    /// Records an exit of `backend`'s worker at `now`. Returns `Some(exits)` when that
    /// worker is in a crash loop, and whether the whole fleet is: every worker looping and
    /// none ready.
    pub(super) fn exited(&self, backend: &Backend, now: Instant) -> (Option<usize>, bool) {
        let mut exits = None;
        let mut all_looping = true;
        for (b, history) in &self.workers {
            let mut h = history.lock().unwrap_or_else(PoisonError::into_inner);
            let looping = if std::ptr::eq(Arc::as_ptr(b), backend) {
                exits = h.record(now);
                exits.is_some()
            } else {
                h.looping(now)
            };
            all_looping &= looping;
        }
        let none_ready = self
            .workers
            .iter()
            .all(|(b, _)| b.health() != Health::Healthy);
        (exits, exits.is_some() && all_looping && none_ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{BackendSet, BackendSpec, CheckResult, EjectionConfig, Thresholds};
    use std::net::SocketAddr;

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn a_crash_loop_is_so_many_exits_within_the_window() {
        let t0 = Instant::now();
        let mut h = ExitHistory::new(3, 10 * SEC);
        assert_eq!(h.record(t0), None);
        assert_eq!(h.record(t0 + SEC), None);
        assert_eq!(h.record(t0 + 2 * SEC), Some(3));
        assert!(h.looping(t0 + 5 * SEC));
        // A whole window without an exit: over.
        assert!(!h.looping(t0 + 12 * SEC));
    }

    #[test]
    fn exits_spread_wider_than_the_window_are_no_crash_loop() {
        let t0 = Instant::now();
        let mut h = ExitHistory::new(3, 10 * SEC);
        for i in 0..20 {
            assert_eq!(h.record(t0 + i * 6 * SEC), None, "exit {i}");
        }
    }

    fn workers(n: u16) -> BackendSet {
        BackendSet::new(
            (0..n).map(|i| {
                let addr = SocketAddr::from(([127, 0, 0, 1], 21000 + i));
                BackendSpec {
                    name: addr.to_string(),
                    addr,
                    worker: Some(WorkerIndex(usize::from(i))),
                }
            }),
            EjectionConfig {
                base_time: SEC,
                max_time: SEC,
            },
            Thresholds {
                healthy: 1,
                unhealthy: 1,
            },
        )
    }

    #[test]
    fn one_worker_in_a_crash_loop_does_not_end_the_fleet() {
        let set = workers(2);
        let all = set.snapshot();
        let fleet = Fleet::new(&all, 2, 60 * SEC);
        let now = Instant::now();
        set.record_check(&all[0], &CheckResult::Pass, now);
        assert_eq!(fleet.exited(&all[1], now), (None, false));
        assert_eq!(fleet.exited(&all[1], now), (Some(2), false));
        assert_eq!(fleet.exited(&all[1], now), (Some(3), false));
    }

    #[test]
    fn every_worker_in_a_crash_loop_and_none_ready_ends_it() {
        let set = workers(2);
        let all = set.snapshot();
        let fleet = Fleet::new(&all, 2, 60 * SEC);
        let now = Instant::now();
        for b in all.iter() {
            fleet.exited(b, now);
        }
        assert_eq!(fleet.exited(&all[0], now), (Some(2), false));
        assert_eq!(fleet.exited(&all[1], now), (Some(2), true));
    }

    #[test]
    fn a_ready_worker_keeps_the_fleet_going() {
        let set = workers(2);
        let all = set.snapshot();
        let fleet = Fleet::new(&all, 1, 60 * SEC);
        let now = Instant::now();
        assert_eq!(fleet.exited(&all[0], now), (Some(1), false));
        // Worker 1 came back and is ready, although it crashed before.
        assert_eq!(fleet.exited(&all[1], now), (Some(1), true));
        all[1].worker_started(Some(1), now);
        set.record_check(&all[1], &CheckResult::Pass, now);
        assert_eq!(fleet.exited(&all[0], now), (Some(2), false));
    }
}
