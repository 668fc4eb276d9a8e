//! The shared set of backends: where each one is, how many connections it carries, and
//! whether passive ejection currently keeps it out of rotation.

mod queue;
mod state;

pub use state::{CheckResult, Health, HealthState, Thresholds};

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use metrics::{Counter, Gauge, counter, gauge};
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff;
use crate::balance::Balancer;
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
    /// As the user wrote it (`localhost:50052`); used in logs, metrics and `/backends`.
    pub name: String,
    /// Resolved once at start-up, so a slow resolver never sits on the connect path.
    pub addr: SocketAddr,
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
    /// Resolved address.
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
    pub fn addr(&self) -> SocketAddr {
        self.spec.addr
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
/// may be tried again.
#[derive(Debug, Default)]
pub struct Tried(Vec<(SocketAddr, u64)>);

impl Tried {
    /// Nothing tried yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `backend` was tried.
    pub fn add(&mut self, backend: &Backend) {
        let generation = lock(&backend.state).health.generation;
        self.0.push((backend.addr(), generation));
    }

    /// How many tries so far.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether none was tried yet.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn has(&self, addr: SocketAddr, generation: u64) -> bool {
        self.0.contains(&(addr, generation))
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

/// All backends, shared by the data path, the admin endpoint and (later) the supervisor.
#[derive(Debug)]
pub struct BackendSet {
    /// The current list; replaced whole when membership changes, so readers take a cheap
    /// snapshot and never hold a lock while they connect.
    backends: RwLock<Arc<[Arc<Backend>]>>,
    /// Counts membership changes; the health checks follow it.
    members: watch::Sender<u64>,
    /// The next backend's id.
    next_id: AtomicU64,
    /// Serialises ejection decisions, so two failures at once cannot eject the last two.
    eject_lock: Mutex<()>,
    /// How long ejections last.
    ejection: EjectionConfig,
    /// The streaks that flip a backend; a connect refused on the data path counts as a
    /// failed check.
    thresholds: Thresholds,
    /// Wakes waiters when a backend can take more.
    capacity: Arc<Capacity>,
}

impl BackendSet {
    /// A set with no backends, for tests that only need something to hand over.
    #[cfg(test)]
    pub(crate) fn empty() -> Arc<Self> {
        let second = Duration::from_secs(1);
        Arc::new(Self::new(
            Vec::new(),
            EjectionConfig {
                base_time: second,
                max_time: second,
            },
            Thresholds {
                healthy: 1,
                unhealthy: 1,
            },
        ))
    }

    /// A set holding `specs`, all in rotation.
    pub fn new(
        specs: impl IntoIterator<Item = BackendSpec>,
        ejection: EjectionConfig,
        thresholds: Thresholds,
    ) -> Self {
        let now = Instant::now();
        let capacity = Arc::new(Capacity::default());
        let list: Vec<Arc<Backend>> = specs
            .into_iter()
            .enumerate()
            .map(|(id, s)| Arc::new(Backend::new(id as u64, s, now, Arc::clone(&capacity))))
            .collect();
        Self {
            next_id: AtomicU64::new(list.len() as u64),
            members: watch::Sender::new(0),
            backends: RwLock::new(list.into()),
            eject_lock: Mutex::new(()),
            ejection,
            thresholds,
            capacity,
        }
    }

    /// The backends as they are now.
    pub fn snapshot(&self) -> Arc<[Arc<Backend>]> {
        Arc::clone(&self.backends.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Adds a backend for `spec`, listed right after `beside` when given (a worker's
    /// replacement next to the process it replaces), else last. It starts as a new one
    /// does: `unknown`, or `stopped` for a spawned worker until it starts.
    pub fn add(&self, spec: BackendSpec, beside: Option<&Backend>) -> Arc<Backend> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let backend = Arc::new(Backend::new(
            id,
            spec,
            Instant::now(),
            Arc::clone(&self.capacity),
        ));
        {
            let mut list = self
                .backends
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            let mut next: Vec<Arc<Backend>> = list.iter().cloned().collect();
            let at = beside
                .and_then(|b| next.iter().position(|n| n.id == b.id))
                .map_or(next.len(), |i| i + 1);
            next.insert(at, Arc::clone(&backend));
            *list = next.into();
        }
        self.members.send_modify(|n| *n += 1);
        backend
    }

    /// Takes `backend` out of the set for good: no call can pick it any more, and its
    /// checker and pooled connection go.
    pub fn remove(&self, backend: &Backend) {
        {
            let mut list = self
                .backends
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            let next: Vec<Arc<Backend>> = list
                .iter()
                .filter(|b| b.id != backend.id)
                .cloned()
                .collect();
            *list = next.into();
        }
        backend.retired.cancel();
        // Its gauges stay in the exposition (the address may come back as a worker's spare
        // port); they must not go on saying it is up.
        backend.metrics.up.set(0.0);
        backend.metrics.active.set(0.0);
        self.members.send_modify(|n| *n += 1);
    }

    /// Changes whenever a backend is added or removed.
    pub fn membership(&self) -> watch::Receiver<u64> {
        self.members.subscribe()
    }

    /// The backends a new connection may go to, leaving out `tried` and those with `cap`
    /// calls in flight: the healthy ones in rotation, or, when passive ejection has left
    /// none of those, every healthy one not yet tried: if all look bad, keep trying them
    /// rather than refuse the client outright. Backends that checks or the supervisor took
    /// out (starting, unhealthy, not serving, draining, stopped) are never offered.
    pub fn candidates(&self, now: Instant, tried: &Tried, cap: Option<usize>) -> Vec<Arc<Backend>> {
        // This runs for every connection (l4) or call (h2): one pass, one lock per backend.
        let snapshot = self.snapshot();
        let mut usable = Vec::with_capacity(snapshot.len());
        let mut ejected = Vec::new();
        for b in snapshot.iter() {
            if cap.is_some_and(|cap| b.active() >= cap) {
                continue;
            }
            let (takes_traffic, is_ejected) = {
                let s = lock(&b.state);
                if !tried.is_empty() && tried.has(b.addr(), s.health.generation) {
                    continue;
                }
                (
                    s.health.health.takes_traffic(),
                    s.passive.ejected_until.is_some_and(|t| t > now),
                )
            };
            match (takes_traffic, is_ejected) {
                (true, false) => usable.push(Arc::clone(b)),
                (true, true) => ejected.push(Arc::clone(b)),
                _ => {}
            }
        }
        if usable.is_empty() { ejected } else { usable }
    }

    /// Picks a backend for one call or connection and counts it there: `None` when none
    /// can take it now (none in rotation, all tried, all at `cap`).
    pub fn pick(
        &self,
        balancer: &Balancer,
        tried: &Tried,
        cap: Option<usize>,
    ) -> Option<ActiveGuard> {
        // With a cap, another pick may take the last place between the look and the count;
        // then look again, a few times at most (the wait below catches the rest).
        for _ in 0..4 {
            let candidates = self.candidates(Instant::now(), tried, cap);
            let i = balancer.pick(&candidates, |b| b.active())?;
            if let Some(guard) = candidates[i].try_track(cap) {
                // Looked at again once counted: a backend taken out meanwhile (drained for
                // a restart) waits only for what it counts, so this one must go elsewhere.
                if candidates[i].health().takes_traffic() {
                    return Some(guard);
                }
            }
        }
        None
    }

    /// [`BackendSet::pick`], waiting until `until` when no backend can take it now.
    pub async fn pick_or_wait(
        &self,
        balancer: &Balancer,
        tried: &Tried,
        cap: Option<usize>,
        until: Instant,
    ) -> Result<ActiveGuard, Unplaced> {
        if let Some(guard) = self.pick(balancer, tried, cap) {
            return Ok(guard);
        }
        // Boxed: the slow path's state would otherwise widen every connection's task.
        Box::pin(
            self.capacity
                .wait_for(until, || self.pick(balancer, tried, cap)),
        )
        .await
        .map_err(|waited| Unplaced {
            waited,
            why: self.why_unplaced(tried, cap),
        })
    }

    /// Calls or connections waiting for a backend now.
    pub fn waiting(&self) -> usize {
        self.capacity.waiting()
    }

    /// Why no backend can take a call now, for the message its client gets.
    fn why_unplaced(&self, tried: &Tried, cap: Option<usize>) -> String {
        let now = Instant::now();
        let snapshot = self.snapshot();
        let in_rotation: Vec<&Arc<Backend>> =
            snapshot.iter().filter(|b| b.is_usable(now)).collect();
        if in_rotation.is_empty() {
            return "no backend is ready".to_owned();
        }
        if let Some(cap) = cap
            && in_rotation.iter().all(|b| b.active() >= cap)
        {
            return format!("every ready backend has {cap} calls in flight (its cap)");
        }
        let tried = tried.len();
        format!("every ready backend was tried ({tried} attempts) and failed")
    }

    /// How many backends are in rotation at `now`.
    pub fn usable(&self, now: Instant) -> usize {
        self.snapshot().iter().filter(|b| b.is_usable(now)).count()
    }

    /// How many backends have passed a health check and are in rotation at `now`: what
    /// `/readyz` asks for.
    pub fn ready(&self, now: Instant) -> usize {
        self.snapshot()
            .iter()
            .filter(|b| b.health() == Health::Healthy && !b.is_ejected(now))
            .count()
    }

    /// Applies one health-check result to `backend`, logging a flip once.
    pub fn record_check(&self, backend: &Backend, result: &CheckResult, now: Instant) {
        let before = lock(&backend.state)
            .health
            .observe(result, &self.thresholds, now);
        backend.changed(before, Some(result));
    }

    /// Records a successful connect: the backend's ejection streak starts over.
    pub fn connect_succeeded(&self, backend: &Backend) {
        backend.metrics.connections.increment(1);
        lock(&backend.state).passive.streak = 0;
    }

    /// Records a failed connect and ejects the backend, unless that would leave no backend
    /// in rotation. Returns the ejection's length when it was ejected.
    pub fn connect_failed(
        &self,
        backend: &Backend,
        failure: ConnectFailure,
        error: &str,
        now: Instant,
    ) -> Option<Duration> {
        match failure {
            ConnectFailure::Refused => {
                backend.metrics.refused.increment(1);
                // Nothing listens there: as good as a failed check, and worth checking
                // again at once, so a dead backend leaves rotation within a second or two.
                self.record_check(
                    backend,
                    &CheckResult::Fail(format!("data path: {error}")),
                    now,
                );
                backend.recheck.notify_one();
            }
            ConnectFailure::Timeout => backend.metrics.timeout.increment(1),
            ConnectFailure::Other => backend.metrics.other_error.increment(1),
        }
        let _decision = lock(&self.eject_lock);
        let others_in_rotation = self
            .snapshot()
            .iter()
            .filter(|b| b.addr() != backend.addr() && b.is_usable(now))
            .count();
        let mut s = lock(&backend.state);
        let p = &mut s.passive;
        p.connect_failures += 1;
        p.last_error = Some(error.to_owned());
        if others_in_rotation == 0 || p.ejected_until.is_some_and(|t| t > now) {
            return None;
        }
        let length =
            backoff::exponential(self.ejection.base_time, self.ejection.max_time, p.streak);
        p.streak = p.streak.saturating_add(1);
        p.ejections += 1;
        p.ejected_until = Some(now + length);
        backend.metrics.ejections.increment(1);
        Some(length)
    }

    /// Status of every backend, for `/backends`.
    pub fn statuses(&self, now: Instant) -> Vec<BackendStatus> {
        self.snapshot().iter().map(|b| b.status(now)).collect()
    }

    /// Sets the gauges that are cheaper to read at scrape time than to keep current.
    pub fn publish_gauges(&self, now: Instant) {
        for b in self.snapshot().iter() {
            b.metrics.active.set(b.active() as f64);
            b.metrics.up.set(if b.is_usable(now) { 1.0 } else { 0.0 });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn set(n: u16) -> BackendSet {
        let specs = (0..n).map(|i| {
            let addr = SocketAddr::from(([127, 0, 0, 1], 20000 + i));
            BackendSpec {
                name: addr.to_string(),
                addr,
                worker: None,
            }
        });
        BackendSet::new(
            specs,
            EjectionConfig {
                base_time: SEC,
                max_time: 4 * SEC,
            },
            Thresholds {
                healthy: 2,
                unhealthy: 3,
            },
        )
    }

    /// A connect that timed out: ejects, but says nothing certain about health.
    fn fail(set: &BackendSet, i: usize, now: Instant) -> Option<Duration> {
        let b = Arc::clone(&set.snapshot()[i]);
        set.connect_failed(&b, ConnectFailure::Timeout, "timed out", now)
    }

    fn tried(set: &BackendSet, which: &[usize]) -> Tried {
        let mut t = Tried::new();
        for i in which {
            t.add(&set.snapshot()[*i]);
        }
        t
    }

    #[test]
    fn ejection_grows_on_repeat_is_capped_and_resets_on_success() {
        let s = set(2);
        let mut now = Instant::now();
        let mut lengths = Vec::new();
        for _ in 0..4 {
            lengths.push(fail(&s, 0, now));
            now += 5 * SEC;
        }
        assert_eq!(
            lengths,
            [Some(SEC), Some(2 * SEC), Some(4 * SEC), Some(4 * SEC)]
        );
        let b = Arc::clone(&s.snapshot()[0]);
        s.connect_succeeded(&b);
        assert_eq!(fail(&s, 0, now), Some(SEC));
        assert_eq!(b.status(now).ejections, 5);
        assert_eq!(b.status(now).connect_failures, 5);
    }

    #[test]
    fn an_ejected_backend_leaves_rotation_until_its_time_is_up() {
        let s = set(3);
        let now = Instant::now();
        fail(&s, 1, now);
        let names: Vec<SocketAddr> = s
            .candidates(now, &Tried::new(), None)
            .iter()
            .map(|b| b.addr())
            .collect();
        assert_eq!(names.len(), 2);
        assert!(!names.contains(&s.snapshot()[1].addr()));
        assert_eq!(s.usable(now + 2 * SEC), 3);
        assert_eq!(s.snapshot()[1].status(now).state, "ejected");
    }

    #[test]
    fn the_last_backend_in_rotation_is_never_ejected() {
        let s = set(2);
        let now = Instant::now();
        assert!(fail(&s, 0, now).is_some());
        assert_eq!(fail(&s, 1, now), None);
        assert_eq!(s.usable(now), 1);
    }

    #[test]
    fn when_every_candidate_looks_bad_the_untried_ones_are_still_offered() {
        let s = set(2);
        let now = Instant::now();
        fail(&s, 0, now);
        let c = s.candidates(now, &tried(&s, &[1]), None);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].addr(), s.snapshot()[0].addr());
        assert!(s.candidates(now, &tried(&s, &[0, 1]), None).is_empty());
    }

    #[test]
    fn a_refused_connect_counts_as_a_failed_check() {
        let s = set(2);
        let now = Instant::now();
        let b = Arc::clone(&s.snapshot()[0]);
        s.record_check(&b, &CheckResult::Pass, now);
        for _ in 0..2 {
            s.connect_failed(&b, ConnectFailure::Refused, "refused", now);
            assert_eq!(b.health(), Health::Healthy);
            assert!(b.check_pace().1, "a failure streak is under way");
        }
        s.connect_failed(&b, ConnectFailure::Refused, "refused", now);
        assert_eq!(b.health(), Health::Unhealthy);
        assert_eq!(s.ready(now), 0);
    }

    #[test]
    fn a_backend_tried_in_one_incarnation_is_offered_in_the_next() {
        let s = set(1);
        let now = Instant::now();
        let b = Arc::clone(&s.snapshot()[0]);
        let t = tried(&s, &[0]);
        assert!(s.candidates(now, &t, None).is_empty());
        // It fails, leaves rotation, and comes back: a new incarnation.
        for _ in 0..3 {
            s.record_check(&b, &CheckResult::Fail("down".into()), now);
        }
        assert!(s.candidates(now, &Tried::new(), None).is_empty());
        for _ in 0..2 {
            s.record_check(&b, &CheckResult::Pass, now);
        }
        assert_eq!(s.candidates(now, &t, None).len(), 1);
    }

    #[test]
    fn a_backend_at_its_cap_takes_no_more() {
        let s = set(2);
        let balancer = Balancer::new(crate::balance::Balance::LeastConn);
        let none = Tried::new();
        let a = s.pick(&balancer, &none, Some(1));
        let b = s.pick(&balancer, &none, Some(1));
        let (Some(a), Some(b)) = (a, b) else {
            panic!("two backends with a cap of 1 take two calls");
        };
        assert_ne!(a.backend().addr(), b.backend().addr());
        assert!(s.pick(&balancer, &none, Some(1)).is_none());
        assert_eq!(
            s.why_unplaced(&none, Some(1)),
            "every ready backend has 1 calls in flight (its cap)"
        );
        drop(a);
        assert!(s.pick(&balancer, &none, Some(1)).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_waits_for_a_backend_to_enter_rotation() {
        let s = Arc::new(set(1));
        let b = Arc::clone(&s.snapshot()[0]);
        b.set_health(Health::Starting, Instant::now());
        let waiter = {
            let s = Arc::clone(&s);
            tokio::spawn(async move {
                let balancer = Balancer::new(crate::balance::Balance::P2c);
                let until = Instant::now() + 10 * SEC;
                s.pick_or_wait(&balancer, &Tried::new(), None, until)
                    .await
                    .map(|g| g.backend().addr())
            })
        };
        tokio::task::yield_now().await;
        assert_eq!(s.waiting(), 1);
        s.record_check(&b, &CheckResult::Pass, Instant::now());
        assert_eq!(waiter.await.ok(), Some(Ok(b.addr())));
        assert_eq!(s.waiting(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_that_runs_out_says_why() {
        let s = set(1);
        let b = Arc::clone(&s.snapshot()[0]);
        b.set_health(Health::Starting, Instant::now());
        let balancer = Balancer::new(crate::balance::Balance::P2c);
        let until = Instant::now() + 2 * SEC;
        let r = s.pick_or_wait(&balancer, &Tried::new(), None, until).await;
        let Err(unplaced) = r else {
            panic!("nothing can take it");
        };
        assert_eq!(unplaced.waited, 2 * SEC);
        assert_eq!(unplaced.why, "no backend is ready");
    }

    #[test]
    fn active_guard_counts_while_alive() {
        let s = set(1);
        let b = Arc::clone(&s.snapshot()[0]);
        let g1 = b.track();
        let g2 = b.track();
        assert_eq!(b.active(), 2);
        drop(g1);
        assert_eq!(g2.backend().active(), 1);
        drop(g2);
        assert_eq!(b.active(), 0);
    }
}
