//! The shared set of backends: where each one is, how many connections it carries, and
//! whether passive ejection currently keeps it out of rotation.

mod addr;
mod queue;
mod set;
mod state;

pub use addr::{BackendAddr, UNIX_ABSTRACT_PREFIX, UNIX_PREFIX};
pub use set::BackendSet;
pub use state::{CheckResult, Health, HealthState, Thresholds};

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use metrics::{Counter, Gauge, counter, gauge};
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics as m;
use queue::Capacity;

/// A spawned worker's number, 0-based; stable across its restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct WorkerIndex(pub usize);

impl std::fmt::Display for WorkerIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A backend as configured: the address to connect to and the name it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    /// As the user wrote it (`localhost:50052`, `unix:/run/app/w0.sock`); used in logs,
    /// metrics and `/backends`.
    pub name: String,
    /// Resolved once at start-up, so a slow resolver never sits on the connect path.
    pub addr: BackendAddr,
    /// The worker behind it, when portshare spawned it.
    pub worker: Option<WorkerIndex>,
}

/// How long a backend stays out of rotation after a failed connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EjectionConfig {
    /// The first ejection's length; each further one in a row doubles it.
    pub base_time: Duration,
    /// The longest ejection, so a backend that comes back is found again soon enough.
    pub max_time: Duration,
}

/// What the supervisor knows of a spawned worker.
#[derive(Debug, Default, Clone)]
struct WorkerState {
    /// Its process id while it runs.
    pid: Option<u32>,
    /// Times the worker was restarted (kept by the supervisor across the backends a
    /// worker moves through in surge restarts).
    restarts: u64,
    /// When the running process started.
    started_at: Option<Instant>,
    /// Resident memory of its process tree at the last sample.
    memory: Option<u64>,
    /// Why it is about to be recycled, once that is due.
    due: Option<&'static str>,
}

/// Everything about a backend that changes off the hot path, under one lock.
#[derive(Debug)]
struct State {
    /// Passive ejection.
    passive: Passive,
    /// Active health.
    health: HealthState,
    /// The worker process, if spawned.
    worker: WorkerState,
}

/// Passive-failure bookkeeping of one backend.
#[derive(Debug, Default)]
struct Passive {
    /// Out of rotation until then.
    ejected_until: Option<Instant>,
    /// Ejections since the last successful connect; sets the next ejection's length.
    streak: u32,
    /// Ejections over the process lifetime, for `/backends`.
    ejections: u64,
    /// Failed connects over the process lifetime, for `/backends`.
    connect_failures: u64,
    /// The most recent connect failure, for `/backends`.
    last_error: Option<String>,
}

/// Metric handles of one backend, registered once so the data path only adds to atomics.
#[derive(Debug)]
struct BackendMetrics {
    connections: Counter,
    refused: Counter,
    timeout: Counter,
    other_error: Counter,
    ejections: Counter,
    sent_bytes: Counter,
    received_bytes: Counter,
    active: Gauge,
    up: Gauge,
    /// h2 mode: calls that ended OK, by far the most common label set, so registered once.
    calls_ok: Counter,
    /// A spawned worker's calls (h2) or connections (l4), over all its processes.
    worker_calls: Option<Counter>,
}

impl BackendMetrics {
    fn new(name: &str, worker: Option<WorkerIndex>) -> Self {
        let label = || ("backend", name.to_owned());
        let error = |reason: &'static str| counter!(m::BACKEND_CONNECT_ERRORS, "backend" => name.to_owned(), "reason" => reason);
        Self {
            connections: counter!(m::BACKEND_CONNECTIONS, &[label()]),
            refused: error("refused"),
            timeout: error("timeout"),
            other_error: error("other"),
            ejections: counter!(m::BACKEND_EJECTIONS, &[label()]),
            sent_bytes: counter!(m::BACKEND_SENT_BYTES, &[label()]),
            received_bytes: counter!(m::BACKEND_RECEIVED_BYTES, &[label()]),
            active: gauge!(m::BACKEND_ACTIVE, &[label()]),
            up: gauge!(m::BACKEND_UP, &[label()]),
            calls_ok: counter!(m::CALLS, "backend" => name.to_owned(), "grpc_status" => "0"),
            worker_calls: worker.map(|w| counter!(m::WORKER_CALLS, "worker" => w.to_string())),
        }
    }
}

/// Why a connect to a backend failed; a label on the connect-error metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    /// Nothing listens there (the worker is down or restarting).
    Refused,
    /// No answer within the connect timeout.
    Timeout,
    /// Anything else (unreachable, out of ports, ...).
    Other,
}

/// One backend and its live counters.
#[derive(Debug)]
pub struct Backend {
    /// Unique among every backend this process ever had: an address can come back (a
    /// worker's spare port) as a different backend.
    id: u64,
    /// Name and address.
    spec: BackendSpec,
    /// Connections proxied to it right now; least-conn and p2c read it.
    active: AtomicUsize,
    /// Calls (h2) or connections (l4) it took since its process started, for recycling.
    served: AtomicU64,
    /// Ejection, health and worker state; touched when a connect fails, a check ends or
    /// the supervisor acts, and read when a backend is picked.
    state: Mutex<State>,
    /// Its metric handles.
    metrics: BackendMetrics,
    /// Wakes its health checker early: a new worker process started (so it is checked at
    /// once rather than at the next regular interval), or the data path saw a connect
    /// refused (so a dead backend is found out within a second).
    recheck: tokio::sync::Notify,
    /// Shared with the whole set: wakes calls waiting for a backend that can take them.
    capacity: Arc<Capacity>,
    /// Cancelled when it leaves the set for good: its checker and pooled connection go.
    retired: CancellationToken,
}

/// A point-in-time view of one backend, as `/backends` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct BackendStatus {
    /// As configured.
    pub name: String,
    /// Resolved address: `IP:PORT`, `unix:PATH` or `unix-abstract:NAME`.
    pub address: String,
    /// The worker's index, when spawned.
    pub worker: Option<WorkerIndex>,
    /// The worker's process id, while it runs.
    pub pid: Option<u32>,
    /// Whether new connections may go there now.
    pub ready: bool,
    /// The health state, or `ejected` when passive ejection keeps a healthy backend out.
    pub state: &'static str,
    /// Seconds since the health state last changed.
    pub state_for_s: u64,
    /// The most recent health check's result.
    pub last_check: Option<String>,
    /// Times the worker was restarted.
    pub restarts: u64,
    /// Calls (h2) or connections (l4) its running process took.
    pub calls_served: u64,
    /// Seconds since its running process started.
    pub age_s: Option<u64>,
    /// Resident memory of its process tree, bytes, as last sampled (Linux).
    pub memory_bytes: Option<u64>,
    /// Why it is being recycled, when that is due: hung, calls, lifetime or memory.
    pub recycle_due: Option<&'static str>,
    /// Connections open to it now.
    pub active_connections: usize,
    /// Passive ejections so far.
    pub ejections: u64,
    /// Milliseconds until an ejection ends, when ejected.
    pub ejected_for_ms: Option<u64>,
    /// Failed connects so far.
    pub connect_failures: u64,
    /// The most recent connect error, if any.
    pub last_error: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded data is plain counters that stay consistent even if a holder panicked.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Backend {
    fn new(id: u64, spec: BackendSpec, now: Instant, capacity: Arc<Capacity>) -> Self {
        let metrics = BackendMetrics::new(&spec.name, spec.worker);
        // A spawned worker must prove itself first; a configured backend is given the
        // benefit of the doubt until its first check.
        let health = if spec.worker.is_some() {
            Health::Stopped
        } else {
            Health::Unknown
        };
        Self {
            id,
            spec,
            active: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            state: Mutex::new(State {
                passive: Passive::default(),
                health: HealthState::new(health, now),
                worker: WorkerState::default(),
            }),
            metrics,
            recheck: tokio::sync::Notify::new(),
            capacity,
            retired: CancellationToken::new(),
        }
    }

    /// Unique to this backend (see `id`).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Completes when the backend has left the set for good.
    pub async fn retired(&self) {
        self.retired.cancelled().await;
    }

    /// Whether the backend has left the set for good.
    pub fn is_retired(&self) -> bool {
        self.retired.is_cancelled()
    }

    /// Logs a change of state once and, when the backend entered rotation, wakes the
    /// calls waiting for one.
    fn changed(&self, before: Option<Health>, check: Option<&CheckResult>) {
        let Some(before) = before else {
            return;
        };
        let now = self.health();
        log_flip(self, before, now, check);
        if now.takes_traffic() {
            self.capacity.joined();
        }
    }

    /// The spawned worker's index, if any.
    pub fn worker(&self) -> Option<WorkerIndex> {
        self.spec.worker
    }

    /// The health state.
    pub fn health(&self) -> Health {
        lock(&self.state).health.health
    }

    /// Whether new connections may go there at `now`.
    pub fn is_usable(&self, now: Instant) -> bool {
        let s = lock(&self.state);
        s.health.health.takes_traffic() && s.passive.ejected_until.is_none_or(|t| t <= now)
    }

    /// Sets the health state from the supervisor's side (started, stopped); logs a change.
    pub fn set_health(&self, health: Health, now: Instant) {
        let before = lock(&self.state).health.set(health, now);
        self.changed(before, None);
    }

    /// Records that the worker process started with `pid`, its `restarts`-th restart.
    pub fn worker_started(&self, pid: Option<u32>, restarts: u64, now: Instant) {
        let before = {
            let mut s = lock(&self.state);
            s.worker.restarts = restarts;
            s.worker.started_at = Some(now);
            s.worker.memory = None;
            s.worker.due = None;
            self.served.store(0, Ordering::Relaxed);
            s.worker.pid = pid;
            // Ejections of the previous process say nothing about this one.
            s.passive.ejected_until = None;
            s.passive.streak = 0;
            s.health.set(Health::Starting, now)
        };
        self.changed(before, None);
        self.recheck.notify_one();
    }

    /// Completes when the backend should be checked at once (see `recheck`).
    pub async fn recheck_requested(&self) {
        self.recheck.notified().await;
    }

    /// The state and whether a failure streak is under way, for the checker's pace.
    pub fn check_pace(&self) -> (Health, bool) {
        let s = lock(&self.state);
        (s.health.health, s.health.failing())
    }

    /// Records that the worker process exited.
    pub fn worker_stopped(&self, now: Instant) {
        let before = {
            let mut s = lock(&self.state);
            s.worker.pid = None;
            s.health.set(Health::Stopped, now)
        };
        self.changed(before, None);
    }

    /// The configured name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The address to connect to.
    pub fn addr(&self) -> &BackendAddr {
        &self.spec.addr
    }

    /// Connections proxied to it right now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Whether passive ejection keeps it out of rotation at `now`.
    pub fn is_ejected(&self, now: Instant) -> bool {
        lock(&self.state)
            .passive
            .ejected_until
            .is_some_and(|t| t > now)
    }

    /// Counts a connection to this backend until the guard is dropped.
    pub fn track(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.count_served();
        ActiveGuard(Arc::clone(self))
    }

    /// Counts one more call or connection served (see `served`).
    fn count_served(&self) {
        self.served.fetch_add(1, Ordering::Relaxed);
        if let Some(c) = &self.metrics.worker_calls {
            c.increment(1);
        }
    }

    /// Calls (h2) or connections (l4) taken since the process started.
    pub fn calls_served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// When a check last passed.
    pub fn last_pass(&self) -> Option<Instant> {
        lock(&self.state).health.last_pass
    }

    /// Records the worker's resident memory (its whole process tree), as last sampled.
    pub fn set_memory(&self, bytes: Option<u64>) {
        lock(&self.state).worker.memory = bytes;
    }

    /// Records why the worker is about to be recycled (`None`: nothing is due).
    pub fn set_due(&self, why: Option<&'static str>) {
        lock(&self.state).worker.due = why;
    }

    /// Like [`Backend::track`], unless `cap` calls are in flight there already.
    fn try_track(self: &Arc<Self>, cap: Option<usize>) -> Option<ActiveGuard> {
        let Some(cap) = cap else {
            return Some(self.track());
        };
        self.active
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < cap).then_some(n + 1)
            })
            .ok()
            .map(|_| {
                self.count_served();
                ActiveGuard(Arc::clone(self))
            })
    }

    /// Waits until no call or connection is counted here any more, for up to `limit`;
    /// returns whether it got there.
    pub async fn idle_within(&self, limit: Duration) -> bool {
        /// Often enough that a restart is not slowed, rarely enough to cost nothing.
        const POLL: Duration = Duration::from_millis(20);
        let deadline = Instant::now() + limit;
        while self.active() > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(POLL).await;
        }
        true
    }

    /// Counts a finished call (h2 mode) with its gRPC status.
    pub fn count_call(&self, grpc_status: u32) {
        if grpc_status == 0 {
            self.metrics.calls_ok.increment(1);
        } else {
            counter!(m::CALLS, "backend" => self.spec.name.clone(), "grpc_status" => grpc_status.to_string())
                .increment(1);
        }
    }

    /// Adds to the bytes-sent-to-backend counter.
    pub fn count_sent(&self, n: u64) {
        self.metrics.sent_bytes.increment(n);
    }

    /// Adds to the bytes-received-from-backend counter.
    pub fn count_received(&self, n: u64) {
        self.metrics.received_bytes.increment(n);
    }

    /// A snapshot for `/backends`.
    pub fn status(&self, now: Instant) -> BackendStatus {
        let s = lock(&self.state);
        let p = &s.passive;
        let ejected_for = p
            .ejected_until
            .and_then(|t| t.checked_duration_since(now))
            .filter(|d| !d.is_zero());
        let health = s.health.health;
        BackendStatus {
            name: self.spec.name.clone(),
            address: self.spec.addr.to_string(),
            worker: self.spec.worker,
            pid: s.worker.pid,
            ready: health.takes_traffic() && ejected_for.is_none(),
            state: match (health.takes_traffic(), ejected_for) {
                (true, Some(_)) => "ejected",
                _ => health.as_str(),
            },
            state_for_s: now.saturating_duration_since(s.health.since).as_secs(),
            last_check: s.health.last_check.clone(),
            restarts: s.worker.restarts,
            calls_served: self.calls_served(),
            age_s: s
                .worker
                .started_at
                .filter(|_| s.worker.pid.is_some())
                .map(|t| now.saturating_duration_since(t).as_secs()),
            memory_bytes: s.worker.memory.filter(|_| s.worker.pid.is_some()),
            recycle_due: s.worker.due,
            active_connections: self.active(),
            ejections: p.ejections,
            ejected_for_ms: ejected_for.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            connect_failures: p.connect_failures,
            last_error: p.last_error.clone(),
        }
    }
}

fn log_flip(backend: &Backend, from: Health, to: Health, check: Option<&CheckResult>) {
    let worker = backend
        .worker()
        .map_or_else(|| "-".to_owned(), |w| w.to_string());
    let name = backend.name();
    match check {
        // Checks moved it: leaving rotation deserves attention, the rest is routine.
        Some(result) => {
            let why = match result {
                CheckResult::Fail(why) => why.as_str(),
                CheckResult::NotServing => "NOT_SERVING",
                CheckResult::Pass => "check passed",
            };
            if from.takes_traffic() && !to.takes_traffic() {
                tracing::warn!(backend = name, worker, %from, %to, why, "backend left rotation");
            } else {
                tracing::info!(backend = name, worker, %from, %to, why, "backend health changed");
            }
        }
        // The supervisor moved it (started, stopped): it logs why itself.
        None => tracing::info!(backend = name, worker, %from, %to, "backend state changed"),
    }
}

/// Keeps a backend's active-connection count raised while it lives.
#[derive(Debug)]
pub struct ActiveGuard(Arc<Backend>);

impl ActiveGuard {
    /// The backend this connection counts against.
    pub fn backend(&self) -> &Arc<Backend> {
        &self.0
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        self.0.capacity.released();
    }
}

/// The backends one call or connection has tried, each in the incarnation it tried: a
/// worker that refused it and was then restarted (or a backend that failed and came back)
/// may be tried again. Backends are told apart by id, which is unique to each one.
#[derive(Debug, Default)]
pub struct Tried(Vec<(u64, u64)>);

impl Tried {
    /// Nothing tried yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `backend` was tried.
    pub fn add(&mut self, backend: &Backend) {
        let generation = lock(&backend.state).health.generation;
        self.0.push((backend.id(), generation));
    }

    /// How many tries so far.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether none was tried yet.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn has(&self, id: u64, generation: u64) -> bool {
        self.0.contains(&(id, generation))
    }
}

/// Why a wait for a backend ended without one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unplaced {
    /// How long it waited.
    pub waited: Duration,
    /// What kept every backend from taking it, in a few words.
    pub why: String,
}
