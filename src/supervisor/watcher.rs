//! One worker's life: start it, watch it, restart it in place when it exits (with backoff),
//! replace it on request without losing capacity (surge restart), and stop it after its
//! calls are done.
//!
//! A surge restart starts the replacement on the worker's spare port (or, on sockets, the
//! next generation's socket path), waits until it is
//! ready (the same check as at start), lets it join the rotation, and only then takes the
//! old process out: it gets no new calls, its calls in flight (h2) or connections (l4)
//! finish, bounded by `stop_grace`, and it gets SIGTERM (Windows: terminated), then SIGKILL
//! after `stop_grace`. A replacement that exits or is not ready within `ready_timeout` is
//! stopped, and the old process goes on serving.

use std::io::{self, Write};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use metrics::{Gauge, counter, gauge};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::crash::{CrashLoop, Fleet};
use super::memory;
use super::place::{self, WorkerPlace};
use super::ports::{self, WorkerPorts};
use super::sockets;
use super::{WorkerOutput, WorkersConfig, platform};
use crate::backend::{Backend, BackendAddr, BackendSet, Health, WorkerIndex};
use crate::backoff::Backoff;
use crate::metrics as m;

/// How often a surge restart looks whether the replacement is ready.
const READY_POLL: Duration = Duration::from_millis(50);

/// How often a running worker is looked at for recycling (hung, calls, lifetime, memory).
const RECYCLE_TICK: Duration = Duration::from_secs(1);

/// How often its memory is sampled when `max_memory` is set ("two samples in a row" make
/// a recycle, so a spike shorter than this is forgiven); without a limit, only for
/// `/backends` and the metric, less often.
const MEMORY_SAMPLE_LIMITED: Duration = Duration::from_secs(2);
const MEMORY_SAMPLE: Duration = Duration::from_secs(10);

/// After a recycle whose replacement failed, the next try waits this long at first
/// (doubling up to `restart_backoff_max`).
const RECYCLE_RETRY: Duration = Duration::from_secs(5);

/// Why a worker gets a new process: the `reason` label of its restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reason {
    /// It exited by itself.
    Exited,
    /// A rolling restart (SIGHUP, `portshare restart`).
    Rolling,
    /// Its checks failed without a pass for `hang_timeout`.
    Hung,
    /// It served `max_calls`.
    Calls,
    /// It ran for `max_lifetime`.
    Lifetime,
    /// Its memory stayed above `max_memory`.
    Memory,
}

impl Reason {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Reason::Exited => "exited",
            Reason::Rolling => "rolling",
            Reason::Hung => "hung",
            Reason::Calls => "calls",
            Reason::Lifetime => "lifetime",
            Reason::Memory => "memory",
        }
    }
}

/// One process's recycling limits, jittered when it starts.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// Recycle once it has served this many.
    calls: Option<u64>,
    /// Recycle once this time has come.
    until: Option<Instant>,
}

/// Asks a watcher to replace its worker; answered with the outcome once the old process
/// is gone (or the replacement failed and the old one still serves).
pub(super) type Restart = oneshot::Sender<Result<Replaced, String>>;

/// What a replacement did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Replaced {
    /// The worker was replaced by a new process (its pid).
    Yes(Option<u32>),
    /// The worker was not running (it comes back as a new process anyway).
    NotRunning,
}

/// Watches one worker: starts it, waits for it to exit, restarts or replaces it.
pub(super) struct Watcher {
    pub(super) index: WorkerIndex,
    /// Where it listens: its ports (`current` is the running process's), or its socket.
    pub(super) place: WorkerPlace,
    /// The settings of the running process.
    pub(super) config: Arc<WorkersConfig>,
    /// The settings for the next process, which a reload may change.
    pub(super) settings: Arc<ArcSwap<WorkersConfig>>,
    /// Where its output relays run.
    pub(super) tasks: TaskTracker,
    /// Where its backends live: a replacement is added, a replaced process removed.
    pub(super) set: Arc<BackendSet>,
    /// The backend of the running process.
    pub(super) backend: Arc<Backend>,
    pub(super) guard: Arc<platform::Guard>,
    pub(super) stop: CancellationToken,
    /// Where the verdict that ends portshare goes.
    pub(super) crash: mpsc::Sender<CrashLoop>,
    /// Every worker's exits, for that verdict.
    pub(super) fleet: Arc<Fleet>,
    /// One permit, shared by every watcher and the rolling restart: at most one worker is
    /// being replaced at a time, so capacity never drops by more than the hung one.
    pub(super) replacing: Arc<Semaphore>,
}

/// What woke a watcher.
enum Next {
    Exited(io::Result<ExitStatus>),
    Stop,
    Asked(Restart),
    Tick,
}

/// Why a running worker's wait ended.
enum Ended {
    /// The process exited by itself.
    Exited(io::Result<ExitStatus>),
    /// portshare is stopping; the process was stopped.
    Stopped,
}

/// How a surge restart ended.
enum Surge {
    /// The replacement serves; the old process is gone. (Boxed: a child process handle is
    /// large on Windows, and the other outcomes are small.)
    Done(Box<Child>),
    /// The replacement failed; the old process still serves.
    Failed(String),
    /// The replacement failed and the old process exited meanwhile.
    BothGone(io::Result<ExitStatus>, String),
    /// portshare is stopping; the replacement was stopped.
    Stopping,
}

/// The watcher's per-worker metric handles.
struct WorkerMetrics {
    up: Gauge,
    memory: Gauge,
}

impl WorkerMetrics {
    fn restarted(index: WorkerIndex, reason: Reason) {
        counter!(m::WORKER_RESTARTS, "worker" => index.to_string(), "reason" => reason.as_str())
            .increment(1);
    }
}

impl Watcher {
    pub(super) async fn run(mut self, mut asked: mpsc::Receiver<Restart>) {
        let mut backoff =
            Backoff::new(self.config.restart_backoff, self.config.restart_backoff_max);
        let metrics = WorkerMetrics {
            up: gauge!(m::WORKER_UP, "worker" => self.index.to_string()),
            memory: gauge!(m::WORKER_MEMORY, "worker" => self.index.to_string()),
        };
        let mut restarts = 0u64;
        let mut first = true;
        while !self.stop.is_cancelled() {
            self.config = self.settings.load_full();
            if !first {
                restarts += 1;
                WorkerMetrics::restarted(self.index, Reason::Exited);
                // The port must be free again; an outgoing connection may have taken it.
                if let WorkerPlace::Ports(p) = &self.place
                    && let Err(e) = ports::port_is_free(p.current)
                {
                    let pause = backoff.next_delay();
                    tracing::error!(worker = %self.index, port = p.current, error = %e, retry_in = ?pause,
                        "cannot restart worker: its port is taken by another socket");
                    if self.pause(pause, &mut asked).await.is_err() {
                        return;
                    }
                    continue;
                }
            }
            first = false;
            let started = Instant::now();
            let addr = self.place.current();
            // A process that died leaves its socket file behind: the new one binds afresh.
            clear_socket(&addr);
            let last_exit = match self.spawn(&addr) {
                Err(e) => {
                    tracing::error!(worker = %self.index, command = ?self.config.command, error = %e, "cannot start worker");
                    format!("failed to start: {e}")
                }
                Ok(child) => {
                    let pid = child.id();
                    self.backend.worker_started(pid, restarts, started);
                    metrics.up.set(1.0);
                    tracing::info!(worker = %self.index, pid, addr = %addr, "worker started");
                    let ended = self.watch(child, &mut asked, &mut restarts, &metrics).await;
                    metrics.up.set(0.0);
                    match ended {
                        Ended::Stopped => return,
                        Ended::Exited(status) => {
                            if self.stop.is_cancelled() {
                                return;
                            }
                            let how = describe(&status);
                            tracing::warn!(worker = %self.index, exit = %how, ran_for = ?started.elapsed(), "worker exited");
                            how
                        }
                    }
                }
            };
            if self
                .after_exit(&mut backoff, started, last_exit, &mut asked)
                .await
                .is_err()
            {
                return;
            }
        }
    }

    /// Watches the running process until it exits or portshare stops, replacing it
    /// whenever a rolling restart asks, or when it is hung or due for recycling.
    async fn watch(
        &mut self,
        mut child: Child,
        asked: &mut mpsc::Receiver<Restart>,
        restarts: &mut u64,
        metrics: &WorkerMetrics,
    ) -> Ended {
        let mut limits = self.limits(Instant::now());
        let mut tick = tokio::time::interval(RECYCLE_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let sample_every = if self.config.max_memory.is_some() {
            MEMORY_SAMPLE_LIMITED
        } else {
            MEMORY_SAMPLE
        };
        let mut next_sample = Instant::now();
        let mut over_memory = 0u32;
        let mut retry = Backoff::new(
            RECYCLE_RETRY,
            self.config.restart_backoff_max.max(RECYCLE_RETRY),
        );
        let mut retry_at = Instant::now();
        loop {
            // Read now: a child that has been waited for no longer says.
            let pid = child.id();
            let next = tokio::select! {
                status = child.wait() => Next::Exited(status),
                () = self.stop.cancelled() => Next::Stop,
                Some(reply) = asked.recv() => Next::Asked(reply),
                _ = tick.tick() => Next::Tick,
            };
            let (reason, reply, permit) = match next {
                Next::Exited(status) => {
                    // Out of rotation at once: its pid is gone.
                    self.backend.worker_stopped(Instant::now());
                    self.guard.forget(pid);
                    return Ended::Exited(status);
                }
                Next::Stop => {
                    let backend = Arc::clone(&self.backend);
                    self.retire(&mut child, &backend, true).await;
                    return Ended::Stopped;
                }
                // The rolling restart holds the replacing permit itself.
                Next::Asked(reply) => (Reason::Rolling, Some(reply), None),
                Next::Tick => {
                    let now = Instant::now();
                    if now >= next_sample {
                        next_sample = now + sample_every;
                        let rss = pid.and_then(memory::tree_rss);
                        self.backend.set_memory(rss);
                        if let Some(bytes) = rss {
                            metrics.memory.set(bytes as f64);
                        }
                        over_memory = match (rss, self.config.max_memory) {
                            (Some(bytes), Some(limit)) if bytes > limit => over_memory + 1,
                            _ => 0,
                        };
                    }
                    let due = self.due(now, &limits, over_memory);
                    self.backend.set_due(due.map(Reason::as_str));
                    let Some(reason) = due else {
                        continue;
                    };
                    if now < retry_at {
                        continue;
                    }
                    // Another worker is being replaced: this one's turn comes at a later tick.
                    let Ok(permit) = Arc::clone(&self.replacing).try_acquire_owned() else {
                        continue;
                    };
                    tracing::warn!(worker = %self.index, pid, reason = reason.as_str(),
                        calls = self.backend.calls_served(), memory = ?self.backend.status(now).memory_bytes,
                        "replacing worker: {}", describe_reason(reason));
                    (reason, None, Some(permit))
                }
            };
            match self.surge(&mut child, *restarts + 1, reason).await {
                Surge::Done(fresh) => {
                    *restarts += 1;
                    WorkerMetrics::restarted(self.index, reason);
                    if let Some(reply) = reply {
                        let _ = reply.send(Ok(Replaced::Yes(fresh.id())));
                    }
                    child = *fresh;
                    limits = self.limits(Instant::now());
                    over_memory = 0;
                    retry.reset();
                }
                Surge::Failed(why) => {
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(why));
                    } else {
                        retry_at = Instant::now() + retry.next_delay();
                    }
                }
                Surge::BothGone(status, why) => {
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(why));
                    }
                    return Ended::Exited(status);
                }
                Surge::Stopping => {
                    let backend = Arc::clone(&self.backend);
                    self.retire(&mut child, &backend, true).await;
                    return Ended::Stopped;
                }
            }
            drop(permit);
        }
    }

    /// The recycling limits of a process started at `now`, each with its own jitter.
    fn limits(&self, now: Instant) -> Limits {
        let c = &self.config;
        Limits {
            calls: c.max_calls.map(|n| {
                let extra = (n as f64 * c.max_calls_jitter / 100.0 * fastrand::f64()) as u64;
                n.saturating_add(extra)
            }),
            until: c
                .max_lifetime
                .map(|d| now + d + d.mul_f64(c.max_lifetime_jitter / 100.0 * fastrand::f64())),
        }
    }

    /// Whether the running process is due for a replacement, and why.
    fn due(&self, now: Instant, limits: &Limits, over_memory: u32) -> Option<Reason> {
        let b = &self.backend;
        if let Some(timeout) = self.config.hang_timeout
            && b.health() == Health::Unhealthy
            && b.last_pass()
                .is_some_and(|pass| now.saturating_duration_since(pass) >= timeout)
        {
            return Some(Reason::Hung);
        }
        if limits.calls.is_some_and(|n| b.calls_served() >= n) {
            return Some(Reason::Calls);
        }
        if limits.until.is_some_and(|t| now >= t) {
            return Some(Reason::Lifetime);
        }
        // Two samples in a row, so one short spike does not cost a restart.
        (over_memory >= 2).then_some(Reason::Memory)
    }

    /// Replaces the running process `old` without a moment of lower capacity (see the
    /// module's documentation).
    async fn surge(&mut self, old: &mut Child, restarts: u64, reason: Reason) -> Surge {
        self.config = self.settings.load_full();
        let next = match self.next_place() {
            Ok(p) => p,
            Err(why) => return Surge::Failed(why),
        };
        let addr = next.current();
        clear_socket(&addr);
        let fresh = self
            .set
            .add(place::spec(addr.clone(), self.index), Some(&self.backend));
        let mut new = match self.spawn(&addr) {
            Ok(c) => c,
            Err(e) => {
                self.set.remove(&fresh);
                return Surge::Failed(format!("cannot start the replacement: {e}"));
            }
        };
        let started = Instant::now();
        let (new_pid, old_pid) = (new.id(), old.id());
        fresh.worker_started(new_pid, restarts, started);
        tracing::info!(worker = %self.index, pid = new_pid, addr = %addr, replaces = old_pid, reason = reason.as_str(),
            "rolling restart: replacement started");
        let deadline = started + self.config.ready_timeout;
        let mut old_exit = None;
        let failure = loop {
            if fresh.health() == Health::Healthy {
                break None;
            }
            tokio::select! {
                () = self.stop.cancelled() => {
                    self.retire(&mut new, &fresh, false).await;
                    self.set.remove(&fresh);
                    return Surge::Stopping;
                }
                status = new.wait() => {
                    fresh.worker_stopped(Instant::now());
                    self.guard.forget(new_pid);
                    break Some(format!("the replacement exited before it was ready ({})", describe(&status)));
                }
                status = old.wait(), if old_exit.is_none() => {
                    self.backend.worker_stopped(Instant::now());
                    self.guard.forget(old_pid);
                    tracing::warn!(worker = %self.index, exit = %describe(&status), "worker exited while its replacement was starting");
                    old_exit = Some(status);
                }
                () = tokio::time::sleep_until(deadline) => {
                    break Some(format!("the replacement was not ready within {:?}", self.config.ready_timeout));
                }
                () = tokio::time::sleep(READY_POLL) => {}
            }
        };
        if let Some(why) = failure {
            // The replacement goes; the old process (if it still runs) keeps serving.
            if new.id().is_some() {
                self.retire(&mut new, &fresh, false).await;
            }
            clear_socket(fresh.addr());
            self.set.remove(&fresh);
            tracing::error!(worker = %self.index, why = %why, "rolling restart: replacing the worker failed; the old process keeps serving");
            return match old_exit {
                None => Surge::Failed(why),
                Some(status) => Surge::BothGone(status, why),
            };
        }
        // The replacement is in rotation: the old process leaves it.
        tracing::info!(worker = %self.index, pid = new_pid, took = ?started.elapsed(),
            "rolling restart: replacement ready; draining the old process");
        let replaced = std::mem::replace(&mut self.backend, fresh);
        self.place = next;
        if old_exit.is_none() {
            // A hung process finishes nothing: it is stopped at once.
            self.retire(old, &replaced, reason != Reason::Hung).await;
        }
        clear_socket(replaced.addr());
        self.set.remove(&replaced);
        Surge::Done(Box::new(new))
    }

    /// Where the next replacement listens, as the worker's place once it took over: on
    /// ports, the spare (see [`Watcher::spare_port`]), the two swapped; on a socket, the
    /// next generation's.
    fn next_place(&mut self) -> Result<WorkerPlace, String> {
        match &self.place {
            WorkerPlace::Ports(p) => {
                let current = p.current;
                let port = self.spare_port()?;
                Ok(WorkerPlace::Ports(WorkerPorts {
                    current: port,
                    spare: current,
                }))
            }
            WorkerPlace::Socket {
                dir,
                index,
                generation,
            } => Ok(WorkerPlace::Socket {
                dir: Arc::clone(dir),
                index: *index,
                generation: generation + 1,
            }),
        }
    }

    /// The port for the next replacement: the spare, checked free; with free ports
    /// (`port_base` 0) another free one if something took it meanwhile.
    fn spare_port(&mut self) -> Result<u16, String> {
        let port_base = self.config.port_base;
        let WorkerPlace::Ports(ports) = &mut self.place else {
            return Err("the worker has no ports".to_owned());
        };
        let spare = ports.spare;
        match ports::port_is_free(spare) {
            Ok(()) => Ok(spare),
            Err(e) if port_base == 0 => {
                let other = ports::free_port()
                    .map_err(|e| format!("no free port for the replacement: {e}"))?;
                tracing::warn!(worker = %self.index, taken = spare, error = %e, port = other,
                    "the spare port was taken; the replacement gets another free port");
                ports.spare = other;
                Ok(other)
            }
            Err(e) => Err(format!(
                "the spare port {spare} for the replacement is taken ({e})"
            )),
        }
    }

    /// Takes a running process out of rotation for good: no new calls or connections;
    /// with `drain`, those it has finish (bounded by `stop_grace`); then it is stopped.
    async fn retire(&self, child: &mut Child, backend: &Backend, drain: bool) {
        backend.set_health(Health::Draining, Instant::now());
        let open = backend.active();
        if drain && open > 0 {
            tracing::info!(worker = %self.index, pid = child.id(), open, "draining worker: waiting for its calls and connections");
            if !backend.idle_within(self.config.stop_grace).await {
                tracing::warn!(worker = %self.index, pid = child.id(), open = backend.active(), grace = ?self.config.stop_grace,
                    "worker still has calls or connections after the grace; stopping it anyway");
            }
        }
        self.stop_child(child).await;
        clear_socket(backend.addr());
        backend.worker_stopped(Instant::now());
    }

    /// After an unplanned exit: crash-loop accounting, then the backoff pause. `Err` means
    /// stop watching (every worker is crash-looping, or portshare is stopping).
    async fn after_exit(
        &self,
        backoff: &mut Backoff,
        started: Instant,
        last_exit: String,
        asked: &mut mpsc::Receiver<Restart>,
    ) -> Result<(), ()> {
        let now = Instant::now();
        // A worker that ran for a whole window was healthy: its next failure starts small.
        if now.saturating_duration_since(started) >= self.config.crash_loop_window {
            backoff.reset();
        }
        let (looping, fleet_down) = self.fleet.exited(self.index, now);
        if fleet_down {
            let _ = self.crash.try_send(CrashLoop {
                index: self.index,
                exits: looping.unwrap_or(0),
                window: self.config.crash_loop_window,
                last_exit,
            });
            return Err(());
        }
        let pause = backoff.next_delay();
        match looping {
            Some(exits) => {
                // Out of rotation already; the others serve while this one is retried.
                self.backend.set_health(Health::CrashLoop, now);
                tracing::error!(worker = %self.index, exits, window = ?self.config.crash_loop_window,
                    last_exit = %last_exit, restart_in = ?pause,
                    "worker is in a crash loop: restarting it with backoff while the other workers serve");
            }
            None => tracing::info!(worker = %self.index, restart_in = ?pause, "restarting worker"),
        }
        self.pause(pause, asked).await
    }

    /// Sleeps, unless stopping: then `Err`. A rolling restart that reaches a worker which is
    /// down anyway is answered at once.
    async fn pause(&self, d: Duration, asked: &mut mpsc::Receiver<Restart>) -> Result<(), ()> {
        let wake = Instant::now() + d;
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return Err(()),
                () = tokio::time::sleep_until(wake) => return Ok(()),
                Some(reply) = asked.recv() => { let _ = reply.send(Ok(Replaced::NotRunning)); }
            }
        }
    }

    /// Starts a process listening at `addr`: a port is given as `{port}` and
    /// `PORTSHARE_PORT`, a socket path as `{socket}` and `PORTSHARE_SOCKET`.
    fn spawn(&self, addr: &BackendAddr) -> io::Result<Child> {
        let (placeholder, variable, value) = match addr {
            BackendAddr::Tcp(a) => ("{port}", "PORTSHARE_PORT", a.port().to_string()),
            BackendAddr::Unix(path) => (
                "{socket}",
                "PORTSHARE_SOCKET",
                path.to_str()
                    .ok_or_else(|| {
                        io::Error::new(
                            io::ErrorKind::InvalidInput,
                            format!("the socket path {} is not UTF-8", path.display()),
                        )
                    })?
                    .to_owned(),
            ),
            BackendAddr::UnixAbstract(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "spawned workers get socket paths, not abstract names",
                ));
            }
        };
        let index = self.index.to_string();
        let (program, args) =
            self.config.command.split_first().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "empty worker command")
            })?;
        let shared = self.config.shared.map(|a| a.to_string());
        let mut cmd = Command::new(program);
        cmd.args(args.iter().map(|a| {
            let a = a.replace(placeholder, &value).replace("{index}", &index);
            match &shared {
                Some(shared) => a.replace("{shared}", shared),
                None => a,
            }
        }))
        .env(variable, &value)
        .env("PORTSHARE_WORKER_INDEX", &index)
        // Lets a worker notice that portshare is gone (its parent pid changes) where the
        // OS cannot kill it for us (macOS has no parent-death signal).
        .env("PORTSHARE_PID", std::process::id().to_string())
        .envs(shared.as_ref().map(|a| ("PORTSHARE_SHARED_ADDR", a)))
        .envs(&self.config.env)
        .stdin(Stdio::null())
        // Should this task ever be dropped without stopping its worker, the worker dies.
        .kill_on_drop(true);
        if let Some(dir) = &self.config.cwd {
            cmd.current_dir(dir);
        }
        match self.config.output {
            WorkerOutput::Prefix => cmd.stdout(Stdio::piped()).stderr(Stdio::piped()),
            WorkerOutput::Inherit => cmd.stdout(Stdio::inherit()).stderr(Stdio::inherit()),
        };
        platform::prepare(&mut cmd);
        let mut child = self.guard.spawn(&mut cmd)?;
        if let Some(out) = child.stdout.take() {
            self.tasks.spawn(relay(out, self.index, Stream::Stdout));
        }
        if let Some(err) = child.stderr.take() {
            self.tasks.spawn(relay(err, self.index, Stream::Stderr));
        }
        Ok(child)
    }

    /// SIGTERM (Windows: terminate), up to `stop_grace` to exit, then SIGKILL.
    async fn stop_child(&self, child: &mut Child) {
        let pid = child.id();
        if let Err(e) = platform::ask_to_stop(child) {
            tracing::warn!(worker = %self.index, error = %e, "cannot signal worker");
        }
        match tokio::time::timeout(self.config.stop_grace, child.wait()).await {
            Ok(status) => {
                tracing::info!(worker = %self.index, pid, exit = %describe(&status), "worker stopped");
            }
            Err(_) => {
                tracing::warn!(worker = %self.index, pid, grace = ?self.config.stop_grace, "worker did not stop in time; killing it");
                if let Err(e) = platform::force_stop(child) {
                    tracing::warn!(worker = %self.index, error = %e, "cannot kill worker");
                }
                let _ = child.wait().await;
            }
        }
        self.guard.forget(pid);
    }
}

/// Removes the socket file at `addr`, if it is a worker's socket: its process is gone (or
/// about to start afresh there).
fn clear_socket(addr: &BackendAddr) {
    if let Some(path) = place::socket_file(addr) {
        sockets::remove_socket(path);
    }
}

fn describe(status: &io::Result<ExitStatus>) -> String {
    match status {
        Ok(s) => s.to_string(),
        Err(e) => format!("unknown ({e})"),
    }
}

#[derive(Debug, Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

/// Copies a worker's output line by line, each prefixed with `[worker N]`; bytes that are
/// not UTF-8 are shown replaced rather than dropped.
async fn relay(from: impl AsyncRead + Unpin, index: WorkerIndex, stream: Stream) {
    let mut reader = BufReader::new(from);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end_matches(['\n', '\r']);
                // A closed stdout or stderr must not take portshare down: errors are ignored.
                let _ = match stream {
                    Stream::Stdout => writeln!(io::stdout().lock(), "[worker {index}] {text}"),
                    Stream::Stderr => writeln!(io::stderr().lock(), "[worker {index}] {text}"),
                };
            }
        }
    }
}

/// What a recycle reason means, for the log.
fn describe_reason(reason: Reason) -> &'static str {
    match reason {
        Reason::Hung => "its health check has failed without a pass for hang_timeout",
        Reason::Calls => "it served max_calls",
        Reason::Lifetime => "it reached max_lifetime",
        Reason::Memory => "its memory stayed above max_memory",
        Reason::Exited | Reason::Rolling => "asked",
    }
}
