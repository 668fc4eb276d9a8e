//! Active health checks: TCP connect or `grpc.health.v1.Health/Check`, run for every backend
//! on an interval, with consecutive thresholds before a backend flips between ready and not
//! ready (each flip logged once). Spawned workers start as `starting` and take no traffic
//! until a check passes.

pub mod grpc;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, histogram};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, BackendSet};
use crate::metrics as m;

/// While a worker boots, it is checked this often, so it joins the rotation promptly; a
/// TCP connect to a local port is cheap enough for that.
const STARTING_INTERVAL: Duration = Duration::from_millis(100);

/// Which check to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// A TCP connect succeeds.
    Tcp,
    /// `grpc.health.v1.Health/Check` for `service` answers SERVING.
    Grpc {
        /// The service name asked about; empty means the whole server.
        service: String,
    },
}

impl fmt::Display for CheckKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckKind::Tcp => f.write_str("tcp"),
            CheckKind::Grpc { .. } => f.write_str("grpc"),
        }
    }
}

/// Settings of the active checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// What to check.
    pub kind: CheckKind,
    /// Time between checks of a ready backend.
    pub interval: Duration,
    /// Time between checks of a backend that is not ready (so it returns promptly).
    pub unhealthy_interval: Duration,
    /// One check's limit.
    pub timeout: Duration,
    /// Consecutive passes that return an unhealthy backend to rotation.
    pub healthy_threshold: u32,
    /// Consecutive failures that take a ready backend out of rotation.
    pub unhealthy_threshold: u32,
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
    /// A spawned worker that is not running (exited, or being restarted).
    Stopped,
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
            Health::Stopped => "stopped",
        }
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
        }
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
        Some(before)
    }

    /// Applies one check result under the thresholds; returns the previous state when it
    /// flipped. A backend in its first state (`unknown`, `starting`) flips on the first
    /// result, so a worker joins as soon as it answers; after that it takes a streak.
    /// `stopped` belongs to the supervisor, and checks do not move it.
    pub fn observe(
        &mut self,
        result: &CheckResult,
        config: &HealthConfig,
        now: Instant,
    ) -> Option<Health> {
        self.last_check = Some(match result {
            CheckResult::Pass => "ok".to_owned(),
            CheckResult::NotServing => "NOT_SERVING".to_owned(),
            CheckResult::Fail(why) => why.clone(),
        });
        if self.health == Health::Stopped {
            return None;
        }
        let fresh = matches!(self.health, Health::Unknown | Health::Starting);
        match result {
            CheckResult::Pass => {
                self.passes = self.passes.saturating_add(1);
                self.failures = 0;
                if self.health != Health::Healthy
                    && (fresh || self.passes >= config.healthy_threshold)
                {
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
                        || self.failures >= config.unhealthy_threshold
                        || !self.health.takes_traffic())
                {
                    return self.set(target, now);
                }
            }
        }
        None
    }
}

/// One backend's probe: a TCP connect, or a reusable gRPC health client.
enum Probe {
    Tcp(SocketAddr),
    Grpc(grpc::GrpcProbe),
}

impl Probe {
    fn new(kind: &CheckKind, addr: SocketAddr) -> Self {
        match kind {
            CheckKind::Tcp => Probe::Tcp(addr),
            CheckKind::Grpc { service } => Probe::Grpc(grpc::GrpcProbe::new(addr, service.clone())),
        }
    }

    async fn check(&mut self, timeout: Duration) -> CheckResult {
        match self {
            Probe::Tcp(addr) => {
                match tokio::time::timeout(timeout, TcpStream::connect(*addr)).await {
                    Ok(Ok(_)) => CheckResult::Pass,
                    Ok(Err(e)) => CheckResult::Fail(format!("connect: {e}")),
                    Err(_) => CheckResult::Fail(format!("connect: no answer within {timeout:?}")),
                }
            }
            Probe::Grpc(probe) => match probe.check(timeout).await {
                Ok(grpc::ServingStatus::Serving) => CheckResult::Pass,
                Ok(grpc::ServingStatus::NotServing) => CheckResult::NotServing,
                Ok(other) => CheckResult::Fail(format!("health status {other}")),
                Err(e) => CheckResult::Fail(e.to_string()),
            },
        }
    }
}

/// Starts one checking task per backend; they end when `stop` is cancelled.
pub fn spawn_checkers(set: &Arc<BackendSet>, config: &HealthConfig, stop: &CancellationToken) {
    for backend in set.snapshot().iter() {
        tokio::spawn(check_loop(
            Arc::clone(backend),
            Arc::clone(set),
            config.clone(),
            stop.clone(),
        ));
    }
}

async fn check_loop(
    backend: Arc<Backend>,
    set: Arc<BackendSet>,
    config: HealthConfig,
    stop: CancellationToken,
) {
    let mut probe = Probe::new(&config.kind, backend.addr());
    let kind = config.kind.to_string();
    loop {
        let health = backend.health();
        if health != Health::Stopped {
            let started = Instant::now();
            let result = tokio::select! {
                () = stop.cancelled() => return,
                r = probe.check(config.timeout) => r,
            };
            histogram!(m::HEALTH_CHECK_SECONDS, "check" => kind.clone())
                .record(started.elapsed().as_secs_f64());
            let outcome = match result {
                CheckResult::Pass => "pass",
                CheckResult::NotServing => "not_serving",
                CheckResult::Fail(_) => "fail",
            };
            counter!(m::HEALTH_CHECKS, "backend" => backend.name().to_owned(), "result" => outcome)
                .increment(1);
            set.record_check(&backend, &result, &config, Instant::now());
        }
        let pause = match backend.health() {
            Health::Starting | Health::Stopped => STARTING_INTERVAL,
            Health::Healthy | Health::Unknown => config.interval,
            Health::Unhealthy | Health::NotServing => config.unhealthy_interval,
        };
        // Up to 10% of jitter, so checks of many backends do not move in lockstep.
        let jitter = pause.mul_f64(fastrand::f64() * 0.1);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(pause + jitter) => {}
            () = backend.worker_started_signal() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> HealthConfig {
        HealthConfig {
            kind: CheckKind::Tcp,
            interval: Duration::from_secs(5),
            unhealthy_interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
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
