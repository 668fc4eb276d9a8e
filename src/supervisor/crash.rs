//! Crash loops: one worker that keeps exiting is restarted with its (capped) backoff and
//! reported while the others go on serving; only when *every* worker keeps exiting and
//! none is ready — the deployment itself is broken — does portshare give up (exit 70), so
//! the orchestrator sees it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::backend::{BackendSet, Health, WorkerIndex};

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
    /// Where the workers' backends are, to see whether any is ready.
    set: Arc<BackendSet>,
    /// One history per worker, by index.
    histories: Vec<Mutex<ExitHistory>>,
}

impl Fleet {
    pub(super) fn new(set: Arc<BackendSet>, count: usize, limit: u32, window: Duration) -> Self {
        Self {
            set,
            histories: (0..count)
                .map(|_| Mutex::new(ExitHistory::new(limit, window)))
                .collect(),
        }
    }

    /// Records an exit of worker `index` at `now`. Returns `Some(exits)` when that worker
    /// is in a crash loop, and whether the whole fleet is: every worker looping and none
    /// ready.
    pub(super) fn exited(&self, index: WorkerIndex, now: Instant) -> (Option<usize>, bool) {
        let mut exits = None;
        let mut all_looping = true;
        for (i, history) in self.histories.iter().enumerate() {
            let mut h = history.lock().unwrap_or_else(PoisonError::into_inner);
            let looping = if i == index.0 {
                exits = h.record(now);
                exits.is_some()
            } else {
                h.looping(now)
            };
            all_looping &= looping;
        }
        let none_ready = self
            .set
            .snapshot()
            .iter()
            .filter(|b| b.worker().is_some())
            .all(|b| b.health() != Health::Healthy);
        (exits, exits.is_some() && all_looping && none_ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{BackendSet, BackendSpec, CheckResult, EjectionConfig, Thresholds};
    use std::net::SocketAddr;

    const SEC: Duration = Duration::from_secs(1);
    const W0: WorkerIndex = WorkerIndex(0);
    const W1: WorkerIndex = WorkerIndex(1);

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
                    addr: addr.into(),
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
        let set = Arc::new(workers(2));
        let all = set.snapshot();
        let fleet = Fleet::new(Arc::clone(&set), 2, 2, 60 * SEC);
        let now = Instant::now();
        all[0].worker_started(Some(7), 0, now);
        set.record_check(&all[0], &CheckResult::Pass, now);
        assert_eq!(all[0].health(), Health::Healthy);
        assert_eq!(fleet.exited(W1, now), (None, false));
        assert_eq!(fleet.exited(W1, now), (Some(2), false));
        assert_eq!(fleet.exited(W1, now), (Some(3), false));
    }

    #[test]
    fn every_worker_in_a_crash_loop_and_none_ready_ends_it() {
        let set = Arc::new(workers(2));
        let fleet = Fleet::new(Arc::clone(&set), 2, 2, 60 * SEC);
        let now = Instant::now();
        fleet.exited(W0, now);
        fleet.exited(W1, now);
        assert_eq!(fleet.exited(W0, now), (Some(2), false));
        assert_eq!(fleet.exited(W1, now), (Some(2), true));
    }

    #[test]
    fn a_ready_worker_keeps_the_fleet_going() {
        let set = Arc::new(workers(2));
        let all = set.snapshot();
        let fleet = Fleet::new(Arc::clone(&set), 2, 1, 60 * SEC);
        let now = Instant::now();
        assert_eq!(fleet.exited(W0, now), (Some(1), false));
        // Worker 1 came back and is ready, although it crashed before.
        assert_eq!(fleet.exited(W1, now), (Some(1), true));
        all[1].worker_started(Some(1), 1, now);
        set.record_check(&all[1], &CheckResult::Pass, now);
        assert_eq!(fleet.exited(W0, now), (Some(2), false));
    }
}
