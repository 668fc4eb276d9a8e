//! Spawned workers: start N copies of the worker command on their own ports (or Unix
//! sockets), watch them,
//! restart the ones that exit (with jittered exponential backoff), end portshare when every
//! worker is in a crash loop (see `crash`), and stop them cleanly (SIGTERM, then SIGKILL after
//! a grace period).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// A signal passed on to every worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forwarded {
    /// SIGUSR1.
    Usr1,
    /// SIGUSR2.
    Usr2,
}

/// Where a worker's stdout and stderr go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerOutput {
    /// Read line by line and written to portshare's own stdout/stderr with a `[worker N]`
    /// prefix, so interleaved output stays attributable.
    Prefix,
    /// Shared with portshare as is (no copying; lines of different workers may mix).
    Inherit,
}

impl WorkerOutput {
    /// The spelling in config files.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerOutput::Prefix => "prefix",
            WorkerOutput::Inherit => "inherit",
        }
    }
}

/// How workers are started, restarted and stopped.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkersConfig {
    /// How many run at once.
    pub count: usize,
    /// Program and arguments; `{port}` (or `{socket}`) and `{index}` (and, in reuseport
    /// mode, `{shared}`) are substituted in the arguments.
    pub command: Vec<String>,
    /// reuseport mode: the public address every worker binds too, with SO_REUSEPORT, given
    /// as `{shared}` and `PORTSHARE_SHARED_ADDR`; its own port stays for the checks.
    pub shared: Option<SocketAddr>,
    /// Worker i listens on `port_base + i` and its replacement on `port_base + count + i`;
    /// 0 means free ports picked at start. Unused with `socket_dir`.
    pub port_base: u16,
    /// Workers listen on Unix sockets in this directory (absolute) instead of ports:
    /// `worker-<i>-<generation>.sock`. `None`: TCP ports.
    pub socket_dir: Option<PathBuf>,
    /// Extra environment for every worker.
    pub env: BTreeMap<String, String>,
    /// Working directory; portshare's own when unset.
    pub cwd: Option<PathBuf>,
    /// Where worker output goes.
    pub output: WorkerOutput,
    /// How long a worker may take to exit after SIGTERM before it gets SIGKILL.
    pub stop_grace: Duration,
    /// First delay before a restart; doubles on each exit in a row.
    pub restart_backoff: Duration,
    /// Longest delay before a restart.
    pub restart_backoff_max: Duration,
    /// This many exits of one worker within `crash_loop_window` make a crash loop (which
    /// ends portshare only when every worker is in one and none is ready).
    pub crash_loop_restarts: u32,
    /// See `crash_loop_restarts`; a worker that ran this long also starts its backoff over.
    pub crash_loop_window: Duration,
    /// In a rolling restart, how long a replacement may take to become ready before it is
    /// stopped and the restart ends as failed (the old process and the rest keep running).
    pub ready_timeout: Duration,
    /// A worker that was ready and has failed its checks without a pass for this long is
    /// hung: it is replaced and its process killed. `None`: never.
    pub hang_timeout: Option<Duration>,
    /// Calls (h2) or client connections (l4) after which a worker is recycled. `None`: never.
    pub max_calls: Option<u64>,
    /// Up to this many percent more on `max_calls`, drawn per process, so that workers
    /// started together do not all recycle together.
    pub max_calls_jitter: f64,
    /// Age after which a worker is recycled. `None`: never.
    pub max_lifetime: Option<Duration>,
    /// Up to this many percent more on `max_lifetime`, drawn per process.
    pub max_lifetime_jitter: f64,
    /// Resident memory of a worker's process tree above which (two samples in a row) it is
    /// recycled. `None`: never.
    pub max_memory: Option<u64>,
}

mod crash;
mod memory;
mod place;
mod ports;
mod sockets;
#[cfg(unix)]
mod unix;
mod watcher;
#[cfg(unix)]
use unix as platform;
#[cfg(windows)]
mod windows;
#[cfg(windows)]
use windows as platform;

use std::io;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use metrics::counter;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::{Backend, BackendSet, Health, WorkerIndex};
use crate::metrics as m;
pub use crash::CrashLoop;
use crash::Fleet;
pub use place::{WorkerPlace, plan};
pub use ports::{WorkerPorts, plan_ports};
pub use sockets::socket_path;
use watcher::{Replaced, Restart, Watcher};

/// Workers listen on loopback; portshare is their only client.
pub const WORKER_HOST: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// What can go wrong with workers.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// A worker's port is taken before anything started.
    #[error(
        "worker {index}: {} {port} is already in use ({source}); another server listens there (grpcio servers set SO_REUSEPORT by default, so two could silently share it). Choose another --worker-port-base, or 0 for free ports",
        if *spare { "spare port (for its replacement in a restart)" } else { "port" }
    )]
    PortTaken {
        /// Whose port.
        index: WorkerIndex,
        /// The port.
        port: u16,
        /// Whether it is the worker's spare port.
        spare: bool,
        /// The bind error.
        #[source]
        source: io::Error,
    },
    /// No free ports could be had.
    #[error("cannot pick free ports for the workers: {0}")]
    NoFreePorts(#[source] io::Error),
    /// The socket directory cannot be used.
    #[error("workers.socket_dir {}: {why}", dir.display())]
    SocketDir {
        /// The directory.
        dir: PathBuf,
        /// Why not.
        why: String,
    },
    /// The Job Object (Windows) could not be set up.
    #[error("cannot set up worker process control: {0}")]
    Platform(#[source] io::Error),
}

/// The running supervisor: one watcher task per worker.
#[derive(Debug)]
pub struct Supervisor {
    /// The watchers.
    tasks: JoinSet<()>,
    /// Tells the watchers to stop their workers.
    stop: CancellationToken,
    /// Receives the verdict that every worker is crash-looping; taken by
    /// [`Supervisor::crashes`].
    crashes: Option<mpsc::Receiver<CrashLoop>>,
    /// Each worker's channel that asks its watcher for a replacement, by index.
    watchers: Vec<mpsc::Sender<Restart>>,
    /// The backends, where each worker's current process is found.
    set: Arc<BackendSet>,
    /// At most one worker is replaced at a time (see `Watcher::replacing`).
    replacing: Arc<Semaphore>,
    /// Set while a rolling restart runs, so a second request does not start another.
    rolling: Arc<AtomicBool>,
    /// The settings the next processes start with.
    settings: Arc<ArcSwap<WorkersConfig>>,
    /// Where rolling restarts run.
    background: TaskTracker,
    /// Keeps the platform's process control alive (the Job Object on Windows).
    _guard: Arc<platform::Guard>,
}

/// Where a crash loop is reported.
#[derive(Debug)]
pub struct Crashes(Option<mpsc::Receiver<CrashLoop>>);

impl Crashes {
    /// Reports that never come (no spawned workers).
    pub fn none() -> Self {
        Self(None)
    }

    /// Completes when every worker is in a crash loop (never, if that does not happen).
    pub async fn next(&mut self) -> CrashLoop {
        match self.0.as_mut() {
            Some(rx) => match rx.recv().await {
                Some(c) => c,
                None => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    }
}

/// How a rolling restart ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestartOutcome {
    /// Every running worker was replaced; the text says by what.
    Done(String),
    /// A replacement failed; that worker's old process and the rest keep running.
    Failed(String),
    /// Another rolling restart is under way.
    AlreadyRunning,
}

impl Supervisor {
    /// Starts one watcher per backend of `set` that has a worker index, listening at
    /// `places[index]` (see [`plan`]); each spawns its worker at once. Rolling restarts
    /// and the workers' output relays run on `background`.
    pub fn start(
        config: WorkersConfig,
        set: &Arc<BackendSet>,
        places: &[WorkerPlace],
        background: &TaskTracker,
    ) -> Result<Self, SupervisorError> {
        let guard = Arc::new(platform::Guard::new().map_err(SupervisorError::Platform)?);
        let settings = Arc::new(ArcSwap::from_pointee(config));
        let config = settings.load_full();
        let stop = CancellationToken::new();
        let (crash_tx, crashes) = mpsc::channel(1);
        let mut tasks = JoinSet::new();
        let mut watchers = Vec::new();
        let replacing = Arc::new(Semaphore::new(1));
        if config.max_memory.is_some() && !memory::MEASURED {
            tracing::warn!(
                "workers.max_memory: resident memory is measured on Linux only; no worker is recycled for memory here"
            );
        }
        let fleet = Arc::new(Fleet::new(
            Arc::clone(set),
            config.count,
            config.crash_loop_restarts,
            config.crash_loop_window,
        ));
        for backend in set.snapshot().iter() {
            let Some(index) = backend.worker() else {
                continue;
            };
            let Some(place) = places.get(index.0).cloned() else {
                continue;
            };
            let (restart_tx, restart_rx) = mpsc::channel(1);
            let watcher = Watcher {
                index,
                place,
                config: Arc::clone(&config),
                settings: Arc::clone(&settings),
                tasks: background.clone(),
                set: Arc::clone(set),
                backend: Arc::clone(backend),
                guard: Arc::clone(&guard),
                stop: stop.clone(),
                crash: crash_tx.clone(),
                fleet: Arc::clone(&fleet),
                replacing: Arc::clone(&replacing),
            };
            tasks.spawn(watcher.run(restart_rx));
            watchers.push(restart_tx);
        }
        Ok(Self {
            tasks,
            stop,
            crashes: Some(crashes),
            watchers,
            set: Arc::clone(set),
            replacing,
            rolling: Arc::new(AtomicBool::new(false)),
            settings,
            background: background.clone(),
            _guard: guard,
        })
    }

    /// Settings for the processes started from now on (a reload): each worker's next
    /// start or replacement uses them. The count and the crash-loop verdict's settings
    /// stay as they were started.
    pub fn update(&self, config: WorkersConfig) {
        self.settings.store(Arc::new(config));
    }

    /// The crash-loop reports (once; later calls get a receiver that never fires).
    pub fn crashes(&mut self) -> Crashes {
        Crashes(self.crashes.take())
    }

    /// Replaces the workers one at a time, each by the surge path (see `watcher`): the
    /// replacement is started and ready before the old process leaves rotation, drains and
    /// is stopped, so capacity never drops. Runs in the background; `done` hears how it
    /// ended.
    pub fn rolling_restart(&self, done: Option<oneshot::Sender<RestartOutcome>>) {
        if self.rolling.swap(true, Ordering::AcqRel) {
            tracing::warn!("rolling restart requested while one is under way: ignored");
            if let Some(done) = done {
                let _ = done.send(RestartOutcome::AlreadyRunning);
            }
            return;
        }
        let watchers = self.watchers.clone();
        let set = Arc::clone(&self.set);
        let replacing = Arc::clone(&self.replacing);
        let rolling = Arc::clone(&self.rolling);
        let stop = self.stop.clone();
        self.background.spawn(async move {
            let outcome = tokio::select! {
                o = roll(&watchers, &set, &replacing) => Some(o),
                () = stop.cancelled() => None,
            };
            rolling.store(false, Ordering::Release);
            let result = match &outcome {
                Some(RestartOutcome::Done(_)) => "done",
                _ => "failed",
            };
            counter!(m::ROLLING_RESTARTS, "result" => result).increment(1);
            if let (Some(done), Some(outcome)) = (done, outcome) {
                let _ = done.send(outcome);
            }
        });
    }

    /// Passes `signal` on to every running worker's process group.
    pub fn forward(&self, signal: Forwarded) {
        let now = Instant::now();
        for backend in self.set.snapshot().iter() {
            if backend.worker().is_none() {
                continue;
            }
            let Some(pid) = backend.status(now).pid else {
                continue;
            };
            match platform::forward(pid, signal) {
                Ok(()) => {
                    tracing::info!(worker = ?backend.worker(), pid, ?signal, "signal passed on to worker")
                }
                Err(e) => {
                    tracing::warn!(worker = ?backend.worker(), pid, ?signal, error = %e, "cannot pass the signal on")
                }
            }
        }
    }

    /// Stops every worker (drained, SIGTERM, SIGKILL after the grace) and waits for all.
    pub async fn stop(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// The running (not draining) backend of worker `index`.
fn current(set: &BackendSet, index: usize) -> Option<Arc<Backend>> {
    set.snapshot()
        .iter()
        .find(|b| b.worker() == Some(WorkerIndex(index)) && b.health() != Health::Draining)
        .cloned()
}

/// One pass of a rolling restart.
async fn roll(
    watchers: &[mpsc::Sender<Restart>],
    set: &BackendSet,
    replacing: &Arc<Semaphore>,
) -> RestartOutcome {
    tracing::info!(
        workers = watchers.len(),
        "rolling restart: one worker at a time, each replacement ready before the old process goes"
    );
    let mut replaced = 0;
    for (index, watcher) in watchers.iter().enumerate() {
        let state = current(set, index).map(|b| b.health());
        if state != Some(Health::Healthy) {
            // Down or starting already: it comes back as a new process anyway.
            tracing::info!(worker = index, state = ?state, "rolling restart: skipping a worker that is not ready");
            continue;
        }
        // One replacement at a time, also with the workers' own recycling.
        let Ok(_turn) = Arc::clone(replacing).acquire_owned().await else {
            return RestartOutcome::Failed("portshare is stopping".to_owned());
        };
        let (done_tx, done_rx) = oneshot::channel();
        if watcher.send(done_tx).await.is_err() {
            return RestartOutcome::Failed("portshare is stopping".to_owned());
        }
        match done_rx.await {
            Ok(Ok(Replaced::Yes(pid))) => {
                replaced += 1;
                tracing::info!(worker = index, pid, "rolling restart: worker is back");
            }
            Ok(Ok(Replaced::NotRunning)) => {
                tracing::info!(
                    worker = index,
                    "rolling restart: the worker was not running"
                );
            }
            Ok(Err(why)) => {
                let text = format!(
                    "worker {index}: {why}; it keeps its old process, and the workers after it were not restarted"
                );
                tracing::error!(worker = index, why = %why, "rolling restart stopped: the others keep running");
                return RestartOutcome::Failed(text);
            }
            Err(_) => return RestartOutcome::Failed("portshare is stopping".to_owned()),
        }
    }
    tracing::info!(replaced, "rolling restart done");
    RestartOutcome::Done(format!("{replaced} of {} workers replaced", watchers.len()))
}
