//! A backend's lifecycle state: where it stands (starting, ready, failing, draining,
//! stopped) and the consecutive-result streaks that move it. Health checks, the supervisor
//! and the data path all report here; nothing here knows how a check is made.

use std::fmt;

use serde::Serialize;
use tokio::time::Instant;

/// How many results in a row flip a backend (pingora's and HAProxy's `rise`/`fall`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// Consecutive passes that return an unhealthy backend to rotation.
    pub healthy: u32,
    /// Consecutive failures that take a ready backend out of rotation.
    pub unhealthy: u32,
}

/// Where a backend stands, as far as checks and the supervisor know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// A configured backend before its first check: given traffic optimistically, as
    /// passive ejection catches one that is down.
    Unknown,
    /// A spawned worker that has not passed a check yet: no traffic.
    Starting,
    /// Passing its checks.
    Healthy,
    /// Failing its checks.
    Unhealthy,
    /// Answered NOT_SERVING: drained, no new traffic.
    NotServing,
    /// Leaving rotation for good (replaced by a restart, or portshare is stopping): no new
    /// traffic; the calls and connections it has finish before its process is stopped.
    Draining,
    /// A spawned worker that is not running (exited, or being restarted).
    Stopped,
    /// A spawned worker that keeps exiting: restarted with its (capped) backoff while the
    /// other workers serve.
    CrashLoop,
}

impl Health {
    /// Whether new traffic may go there.
    pub fn takes_traffic(self) -> bool {
        matches!(self, Health::Unknown | Health::Healthy)
    }

    /// The name used in logs and `/backends`.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Starting => "starting",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
            Health::NotServing => "not_serving",
            Health::Draining => "draining",
            Health::Stopped => "stopped",
            Health::CrashLoop => "crash_loop",
        }
    }

    /// Whether the supervisor alone moves it out of this state (checks only record).
    fn held_by_supervisor(self) -> bool {
        matches!(self, Health::Draining | Health::Stopped | Health::CrashLoop)
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckResult {
    /// Reachable and serving.
    Pass,
    /// Reachable but asks for no new traffic (gRPC NOT_SERVING).
    NotServing,
    /// Unreachable, timed out, or answered wrongly; the text says how.
    Fail(String),
}

/// The health of one backend: its state and the streaks that move it.
#[derive(Debug, Clone)]
pub struct HealthState {
    /// Current state.
    pub health: Health,
    /// When it entered that state.
    pub since: Instant,
    /// Consecutive passes so far.
    passes: u32,
    /// Consecutive failures (or NOT_SERVING answers) so far.
    failures: u32,
    /// The most recent check's result, for `/backends`.
    pub last_check: Option<String>,
    /// Times it entered rotation: a call that one incarnation refused may try the next.
    pub generation: u64,
    /// When a check last passed: a worker failing since long before is hung.
    pub last_pass: Option<Instant>,
    /// The next check result flips it whatever the thresholds: a backend a reload added
    /// waits out of rotation for its first check, no longer.
    pub first_result_decides: bool,
}

impl HealthState {
    /// A fresh state.
    pub fn new(health: Health, now: Instant) -> Self {
        Self {
            health,
            since: now,
            passes: 0,
            failures: 0,
            last_check: None,
            generation: 0,
            last_pass: None,
            first_result_decides: false,
        }
    }

    /// Whether a ready backend has failed its latest check(s) without being taken out yet:
    /// then it is checked at the short interval until it is decided (HAProxy's `fastinter`).
    pub fn failing(&self) -> bool {
        self.failures > 0
    }

    /// Moves to `health` (no-op if already there); returns the previous state on a change.
    pub fn set(&mut self, health: Health, now: Instant) -> Option<Health> {
        if self.health == health {
            return None;
        }
        let before = self.health;
        self.health = health;
        self.since = now;
        self.passes = 0;
        self.failures = 0;
        if health.takes_traffic() && !before.takes_traffic() {
            self.generation += 1;
        }
        Some(before)
    }

    /// Applies one check result under the thresholds; returns the previous state when it
    /// flipped. A backend in its first state (`unknown`, `starting`) flips on the first
    /// result, so a worker joins as soon as it answers; after that it takes a streak.
    /// `draining`, `stopped` and `crash_loop` belong to the supervisor, and checks do not
    /// move them.
    pub fn observe(
        &mut self,
        result: &CheckResult,
        thresholds: &Thresholds,
        now: Instant,
    ) -> Option<Health> {
        let fresh = matches!(self.health, Health::Unknown | Health::Starting)
            || std::mem::take(&mut self.first_result_decides);
        self.last_check = Some(match result {
            CheckResult::Pass => "ok".to_owned(),
            CheckResult::NotServing => "NOT_SERVING".to_owned(),
            CheckResult::Fail(why) => why.clone(),
        });
        if self.health.held_by_supervisor() {
            return None;
        }
        match result {
            CheckResult::Pass => {
                self.last_pass = Some(now);
                self.passes = self.passes.saturating_add(1);
                self.failures = 0;
                if self.health != Health::Healthy && (fresh || self.passes >= thresholds.healthy) {
                    return self.set(Health::Healthy, now);
                }
            }
            CheckResult::NotServing | CheckResult::Fail(_) => {
                self.failures = self.failures.saturating_add(1);
                self.passes = 0;
                let target = if *result == CheckResult::NotServing {
                    Health::NotServing
                } else {
                    Health::Unhealthy
                };
                // A booting worker that cannot be reached yet is simply still starting.
                if self.health == Health::Starting && target == Health::Unhealthy {
                    return None;
                }
                if self.health != target
                    && (fresh
                        || self.failures >= thresholds.unhealthy
                        || !self.health.takes_traffic())
                {
                    return self.set(target, now);
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Thresholds {
        Thresholds {
            healthy: 2,
            unhealthy: 3,
        }
    }

    fn fail() -> CheckResult {
        CheckResult::Fail("refused".into())
    }

    #[test]
    fn a_starting_worker_joins_on_its_first_pass_and_waits_through_failures() {
        let now = Instant::now();
        let mut s = HealthState::new(Health::Starting, now);
        for _ in 0..10 {
            assert_eq!(s.observe(&fail(), &config(), now), None);
        }
        assert_eq!(s.health, Health::Starting);
        assert_eq!(
            s.observe(&CheckResult::Pass, &config(), now),
            Some(Health::Starting)
        );
        assert_eq!(s.health, Health::Healthy);
    }

    #[test]
    fn a_ready_backend_leaves_only_after_the_unhealthy_threshold() {
        let now = Instant::now();
        let mut s = HealthState::new(Health::Healthy, now);
        assert_eq!(s.observe(&fail(), &config(), now), None);
        assert_eq!(s.observe(&fail(), &config(), now), None);
        // A pass in between starts the count again.
        assert_eq!(s.observe(&CheckResult::Pass, &config(), now), None);
        assert_eq!(s.observe(&fail(), &config(), now), None);
        assert_eq!(s.observe(&fail(), &config(), now), None);
        assert_eq!(s.observe(&fail(), &config(), now), Some(Health::Healthy));
        assert_eq!(s.health, Health::Unhealthy);
        // Flipped once: further failures change nothing.
        assert_eq!(s.observe(&fail(), &config(), now), None);
    }

    #[test]
    fn an_unhealthy_backend_returns_after_the_healthy_threshold() {
        let now = Instant::now();
        let mut s = HealthState::new(Health::Unhealthy, now);
        assert_eq!(s.observe(&CheckResult::Pass, &config(), now), None);
        assert_eq!(
            s.observe(&CheckResult::Pass, &config(), now),
            Some(Health::Unhealthy)
        );
        assert!(s.health.takes_traffic());
    }

    #[test]
    fn not_serving_drains_and_serving_returns() {
        let now = Instant::now();
        let mut s = HealthState::new(Health::Healthy, now);
        for _ in 0..2 {
            assert_eq!(s.observe(&CheckResult::NotServing, &config(), now), None);
        }
        assert_eq!(
            s.observe(&CheckResult::NotServing, &config(), now),
            Some(Health::Healthy)
        );
        assert!(!s.health.takes_traffic());
        assert_eq!(s.last_check.as_deref(), Some("NOT_SERVING"));
        assert_eq!(s.observe(&CheckResult::Pass, &config(), now), None);
        assert_eq!(
            s.observe(&CheckResult::Pass, &config(), now),
            Some(Health::NotServing)
        );
    }

    #[test]
    fn an_unknown_backend_is_decided_by_its_first_result() {
        let now = Instant::now();
        let mut s = HealthState::new(Health::Unknown, now);
        assert_eq!(s.observe(&fail(), &config(), now), Some(Health::Unknown));
        assert_eq!(s.health, Health::Unhealthy);
        let mut s = HealthState::new(Health::Unknown, now);
        assert_eq!(
            s.observe(&CheckResult::Pass, &config(), now),
            Some(Health::Unknown)
        );
    }

    #[test]
    fn checks_do_not_move_a_stopped_worker() {
        let now = Instant::now();
        let mut s = HealthState::new(Health::Stopped, now);
        assert_eq!(s.observe(&CheckResult::Pass, &config(), now), None);
        assert_eq!(s.health, Health::Stopped);
        assert_eq!(s.last_check.as_deref(), Some("ok"));
    }
}
