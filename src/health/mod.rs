//! Active health checks: TCP connect or `grpc.health.v1.Health/Check`, run for every backend
//! on an interval, with consecutive thresholds before a backend flips between ready and not
//! ready (each flip logged once). Spawned workers start as `starting` and take no traffic
//! until a check passes.
//!
//! This file runs the checks and reports them; [`grpc`] is the `grpc.health.v1` probe (the
//! call on its kept connection; the messages' codec is [`crate::grpc::health`]), and
//! `test_server` the in-process HTTP/2 server its tests answer from.

pub mod grpc;
#[cfg(test)]
mod test_server;

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, histogram};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::{Backend, BackendAddr, BackendSet, CheckResult, Health, Thresholds};
use crate::connect::{Connect, SocketConnect};
use crate::grpc::health::ServingStatus;
use crate::metrics as m;

/// While a worker boots, it is checked this often, so it joins the rotation promptly; a
/// TCP connect to a local port is cheap enough for that.
const STARTING_INTERVAL: Duration = Duration::from_millis(100);

/// Which check to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// A connect succeeds (TCP, or to a Unix socket backend).
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
    /// Results in a row that flip a backend in or out of rotation.
    pub thresholds: Thresholds,
}

/// One backend's probe: a connect, or a reusable gRPC health client.
enum Probe {
    Tcp(BackendAddr),
    Grpc(grpc::GrpcProbe),
}

impl Probe {
    fn new(kind: &CheckKind, addr: &BackendAddr) -> Self {
        match kind {
            CheckKind::Tcp => Probe::Tcp(addr.clone()),
            CheckKind::Grpc { service } => {
                Probe::Grpc(grpc::GrpcProbe::new(addr.clone(), service.clone()))
            }
        }
    }

    async fn check(&mut self, timeout: Duration) -> CheckResult {
        match self {
            Probe::Tcp(addr) => {
                match tokio::time::timeout(timeout, SocketConnect.connect(addr)).await {
                    Ok(Ok(_)) => CheckResult::Pass,
                    Ok(Err(e)) => CheckResult::Fail(format!("connect: {e}")),
                    Err(_) => CheckResult::Fail(format!("connect: no answer within {timeout:?}")),
                }
            }
            Probe::Grpc(probe) => match probe.check(timeout).await {
                Ok(ServingStatus::Serving) => CheckResult::Pass,
                Ok(ServingStatus::NotServing) => CheckResult::NotServing,
                Ok(other) => CheckResult::Fail(format!("health status {other}")),
                Err(e) => CheckResult::Fail(e.to_string()),
            },
        }
    }
}

/// Checks every backend of `set`, following its membership: a backend that joins gets its
/// own checking task, one that leaves ends its own. Each check follows the settings
/// `config` holds at the time (a reload may change them). Returns once `stop` is cancelled
/// and every checking task has ended.
pub async fn run(
    set: Arc<BackendSet>,
    config: watch::Receiver<HealthConfig>,
    stop: CancellationToken,
) {
    let mut members = set.membership();
    let mut checked: HashSet<u64> = HashSet::new();
    let tasks = TaskTracker::new();
    loop {
        // Marked seen before the look, so a change after it is not missed.
        members.borrow_and_update();
        let snapshot = set.snapshot();
        for backend in snapshot.iter() {
            if checked.insert(backend.id()) {
                tasks.spawn(check_loop(
                    Arc::clone(backend),
                    Arc::clone(&set),
                    config.clone(),
                    stop.clone(),
                ));
            }
        }
        checked.retain(|id| snapshot.iter().any(|b| b.id() == *id));
        tokio::select! {
            () = stop.cancelled() => break,
            changed = members.changed() => if changed.is_err() { break },
        }
    }
    tasks.close();
    tasks.wait().await;
}

async fn check_loop(
    backend: Arc<Backend>,
    set: Arc<BackendSet>,
    mut settings: watch::Receiver<HealthConfig>,
    stop: CancellationToken,
) {
    let mut config = settings.borrow().clone();
    let mut probe = Probe::new(&config.kind, backend.addr());
    let mut kind = config.kind.to_string();
    loop {
        let changed = *settings.borrow_and_update() != config;
        if changed {
            let next = settings.borrow().clone();
            if next.kind != config.kind {
                probe = Probe::new(&next.kind, backend.addr());
                kind = next.kind.to_string();
            }
            config = next;
        }
        let (health, _) = backend.check_pace();
        // A worker that is not running, or one the supervisor is draining, has nothing to
        // tell a check.
        if !matches!(
            health,
            Health::Stopped | Health::CrashLoop | Health::Draining
        ) {
            let started = Instant::now();
            let result = tokio::select! {
                () = stop.cancelled() => return,
                () = backend.retired() => return,
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
            set.record_check(&backend, &result, Instant::now());
        }
        let pause = pace(backend.check_pace(), &config);
        // Up to 10% of jitter, so checks of many backends do not move in lockstep.
        let jitter = pause.mul_f64(fastrand::f64() * 0.1);
        tokio::select! {
            () = stop.cancelled() => return,
            () = backend.retired() => return,
            () = tokio::time::sleep(pause + jitter) => {}
            () = backend.recheck_requested() => {}
            // New settings: check at once under them.
            Ok(()) = settings.changed() => {}
        }
    }
}

/// The time to the next check: short while a worker boots; `unhealthy_interval` while a
/// backend is out of rotation *or* has begun failing (so a dead backend is decided within
/// a couple of seconds, HAProxy's `fastinter`); the regular `interval` otherwise.
fn pace((health, failing): (Health, bool), config: &HealthConfig) -> Duration {
    match health {
        Health::Starting | Health::Stopped | Health::CrashLoop => STARTING_INTERVAL,
        Health::Healthy | Health::Unknown if failing => config.unhealthy_interval,
        Health::Healthy | Health::Unknown | Health::Draining => config.interval,
        Health::Unhealthy | Health::NotServing => config.unhealthy_interval,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ready_backend_that_begins_failing_is_checked_at_the_short_interval() {
        let config = HealthConfig {
            kind: CheckKind::Tcp,
            interval: Duration::from_secs(5),
            unhealthy_interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            thresholds: Thresholds {
                healthy: 2,
                unhealthy: 3,
            },
        };
        assert_eq!(pace((Health::Healthy, false), &config), config.interval);
        assert_eq!(
            pace((Health::Healthy, true), &config),
            config.unhealthy_interval
        );
        assert_eq!(
            pace((Health::Unknown, true), &config),
            config.unhealthy_interval
        );
        assert_eq!(
            pace((Health::Unhealthy, false), &config),
            config.unhealthy_interval
        );
        assert_eq!(pace((Health::Starting, false), &config), STARTING_INTERVAL);
    }
}
