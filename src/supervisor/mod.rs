//! Spawned workers: start N copies of the worker command on their own ports, watch them,
//! restart the ones that exit (with jittered exponential backoff), end portshare when every
//! worker is in a crash loop (see `crash`), and stop them cleanly (SIGTERM, then SIGKILL after
//! a grace period).

use std::collections::BTreeMap;
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkersConfig {
    /// How many run at once.
    pub count: usize,
    /// Program and arguments; `{port}` and `{index}` are substituted in the arguments.
    pub command: Vec<String>,
    /// Worker i listens on `port_base + i`; 0 means free ports picked at start.
    pub port_base: u16,
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
    /// In a rolling restart, how long a restarted worker may take to become ready before
    /// the restart stops (leaving the remaining workers as they are).
    pub ready_timeout: Duration,
}

mod crash;
#[cfg(unix)]
mod unix;
#[cfg(unix)]
use unix as platform;
#[cfg(windows)]
mod windows;
#[cfg(windows)]
use windows as platform;

use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use metrics::{counter, gauge};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, Health, WorkerIndex};
use crate::backoff::Backoff;
use crate::metrics as m;
pub use crash::CrashLoop;
use crash::Fleet;

/// Workers listen on loopback; portshare is their only client.
pub const WORKER_HOST: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// What can go wrong with workers.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// A worker's port is taken before anything started.
    #[error(
        "worker {index}: port {port} is already in use ({source}); another server listens there (grpcio servers set SO_REUSEPORT by default, so two could silently share it). Choose another --worker-port-base, or 0 for free ports"
    )]
    PortTaken {
        /// Whose port.
        index: WorkerIndex,
        /// The port.
        port: u16,
        /// The bind error.
        #[source]
        source: io::Error,
    },
    /// No free ports could be had.
    #[error("cannot pick free ports for the workers: {0}")]
    NoFreePorts(#[source] io::Error),
    /// The Job Object (Windows) could not be set up.
    #[error("cannot set up worker process control: {0}")]
    Platform(#[source] io::Error),
}

/// Checks that a port is free by binding it, as a worker will; the socket is closed at once.
fn port_is_free(port: u16) -> io::Result<()> {
    TcpListener::bind(SocketAddr::from((WORKER_HOST, port))).map(drop)
}

/// The ports the workers will use: `port_base + i`, each checked free, or free ports picked
/// by the OS. Warns when they lie in Linux's ephemeral range.
pub fn plan_ports(config: &WorkersConfig) -> Result<Vec<u16>, SupervisorError> {
    let ports: Vec<u16> = if config.port_base == 0 {
        // Hold every listener until all are bound, so no port is handed out twice.
        let held: Vec<TcpListener> = (0..config.count)
            .map(|_| TcpListener::bind(SocketAddr::from((WORKER_HOST, 0))))
            .collect::<io::Result<_>>()
            .map_err(SupervisorError::NoFreePorts)?;
        held.iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<io::Result<_>>()
            .map_err(SupervisorError::NoFreePorts)?
    } else {
        let ports: Vec<u16> = (0..config.count)
            .map(|i| config.port_base.saturating_add(i as u16))
            .collect();
        for (i, port) in ports.iter().enumerate() {
            port_is_free(*port).map_err(|source| SupervisorError::PortTaken {
                index: WorkerIndex(i),
                port: *port,
                source,
            })?;
        }
        ports
    };
    warn_if_ephemeral(&ports);
    Ok(ports)
}

/// Linux hands out outgoing-connection ports from a range (32768-60999 by default); a worker
/// port inside it can be taken by one while the worker restarts.
#[cfg(target_os = "linux")]
fn warn_if_ephemeral(ports: &[u16]) {
    let Ok(range) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") else {
        return;
    };
    let mut bounds = range
        .split_whitespace()
        .filter_map(|n| n.parse::<u16>().ok());
    let (Some(lo), Some(hi)) = (bounds.next(), bounds.next()) else {
        return;
    };
    let reserved =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports").unwrap_or_default();
    let is_reserved = |p: u16| {
        reserved
            .trim()
            .split(',')
            .filter(|s| !s.is_empty())
            .any(|r| match r.split_once('-') {
                Some((a, b)) => {
                    a.parse::<u16>().is_ok_and(|a| a <= p) && b.parse::<u16>().is_ok_and(|b| p <= b)
                }
                None => r.parse::<u16>() == Ok(p),
            })
    };
    let exposed: Vec<u16> = ports
        .iter()
        .copied()
        .filter(|p| (lo..=hi).contains(p) && !is_reserved(*p))
        .collect();
    if let (Some(first), Some(last)) = (exposed.iter().min(), exposed.iter().max()) {
        tracing::warn!(
            ports = ?exposed,
            ephemeral_range = %format!("{lo}-{hi}"),
            "worker ports lie in the ephemeral port range: an outgoing connection can take one while its worker restarts. Reserve them (sysctl -w net.ipv4.ip_local_reserved_ports={first}-{last}) or use a --worker-port-base below {lo}"
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn warn_if_ephemeral(_ports: &[u16]) {}

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
    /// Each worker's backend and the channel that asks its watcher for a restart.
    workers: Vec<(Arc<Backend>, mpsc::Sender<Restart>)>,
    /// Set while a rolling restart runs, so a second SIGHUP does not start another.
    rolling: Arc<AtomicBool>,
    /// How long a restarted worker may take to become ready in a rolling restart.
    ready_timeout: Duration,
    /// Keeps the platform's process control alive (the Job Object on Windows).
    _guard: Arc<platform::Guard>,
}

/// Asks a watcher to restart its worker; answered once the old process is gone.
type Restart = oneshot::Sender<()>;

/// Where a crash loop is reported.
#[derive(Debug)]
pub struct Crashes(Option<mpsc::Receiver<CrashLoop>>);

impl Crashes {
    /// Reports that never come (no spawned workers).
    pub fn none() -> Self {
        Self(None)
    }

    /// Completes when a worker is in a crash loop (never, if none is).
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

impl Supervisor {
    /// Starts one watcher per backend that has a worker index; each spawns its worker at once.
    pub fn start(
        config: WorkersConfig,
        backends: &[Arc<Backend>],
    ) -> Result<Self, SupervisorError> {
        let guard = Arc::new(platform::Guard::new().map_err(SupervisorError::Platform)?);
        let config = Arc::new(config);
        let stop = CancellationToken::new();
        let (crash_tx, crashes) = mpsc::channel(1);
        let mut tasks = JoinSet::new();
        let mut workers = Vec::new();
        let spawned: Vec<Arc<Backend>> = backends
            .iter()
            .filter(|b| b.worker().is_some())
            .cloned()
            .collect();
        let fleet = Fleet::new(
            &spawned,
            config.crash_loop_restarts,
            config.crash_loop_window,
        );
        for backend in backends {
            let Some(index) = backend.worker() else {
                continue;
            };
            let (restart_tx, restart_rx) = mpsc::channel(1);
            let watcher = Watcher {
                index,
                port: backend.addr().port(),
                config: Arc::clone(&config),
                backend: Arc::clone(backend),
                guard: Arc::clone(&guard),
                stop: stop.clone(),
                crash: crash_tx.clone(),
                fleet: Arc::clone(&fleet),
            };
            tasks.spawn(watcher.run(restart_rx));
            workers.push((Arc::clone(backend), restart_tx));
        }
        Ok(Self {
            tasks,
            stop,
            crashes: Some(crashes),
            workers,
            rolling: Arc::new(AtomicBool::new(false)),
            ready_timeout: config.ready_timeout,
            _guard: guard,
        })
    }

    /// The crash-loop reports (once; later calls get a receiver that never fires).
    pub fn crashes(&mut self) -> Crashes {
        Crashes(self.crashes.take())
    }

    /// Restarts the workers one at a time: each leaves rotation, is stopped gracefully
    /// (SIGTERM, so it can finish its calls and tell its clients to go elsewhere), started
    /// again, and must be ready before the next one goes. Runs in the background; returns
    /// false when a rolling restart is already under way.
    pub fn rolling_restart(&self) -> bool {
        if self.rolling.swap(true, Ordering::AcqRel) {
            return false;
        }
        let workers = self.workers.clone();
        let rolling = Arc::clone(&self.rolling);
        let stop = self.stop.clone();
        let ready_timeout = self.ready_timeout;
        tokio::spawn(async move {
            tokio::select! {
                () = roll(workers, ready_timeout) => {}
                () = stop.cancelled() => {}
            }
            rolling.store(false, Ordering::Release);
        });
        true
    }

    /// Passes `signal` on to every running worker's process group.
    pub fn forward(&self, signal: Forwarded) {
        let now = Instant::now();
        for (backend, _) in &self.workers {
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

    /// Stops every worker (SIGTERM, then SIGKILL after the grace) and waits for all.
    pub async fn stop(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// One pass of a rolling restart.
async fn roll(workers: Vec<(Arc<Backend>, mpsc::Sender<Restart>)>, ready_timeout: Duration) {
    tracing::info!(
        workers = workers.len(),
        "rolling restart: one worker at a time"
    );
    for (backend, restart) in &workers {
        let index = backend.worker().map_or_else(String::new, |w| w.to_string());
        if backend.health() != Health::Healthy {
            // Down or starting already: it comes back as a new process anyway.
            tracing::info!(worker = %index, state = %backend.health(), "rolling restart: skipping a worker that is not ready");
            continue;
        }
        let (done_tx, done_rx) = oneshot::channel();
        if restart.send(done_tx).await.is_err() || done_rx.await.is_err() {
            return; // the supervisor is stopping
        }
        let deadline = Instant::now() + ready_timeout;
        while backend.health() != Health::Healthy {
            if Instant::now() >= deadline {
                tracing::error!(worker = %index, timeout = ?ready_timeout,
                    "rolling restart stopped: the restarted worker did not become ready; the others keep running");
                return;
            }
            tokio::time::sleep(READY_POLL).await;
        }
        tracing::info!(worker = %index, pid = backend.status(Instant::now()).pid, "rolling restart: worker is back");
    }
    tracing::info!("rolling restart done");
}

/// Between a worker leaving rotation and its SIGTERM in a rolling restart: long enough for a
/// call picked an instant earlier to reach it, short enough not to slow the restart.
const LEAVE_ROTATION_DELAY: Duration = Duration::from_millis(100);

/// How often a rolling restart looks whether the restarted worker is ready.
const READY_POLL: Duration = Duration::from_millis(50);

/// Watches one worker: starts it, waits for it to exit, restarts it.
struct Watcher {
    index: WorkerIndex,
    port: u16,
    config: Arc<WorkersConfig>,
    backend: Arc<Backend>,
    guard: Arc<platform::Guard>,
    stop: CancellationToken,
    /// Where the verdict that ends portshare goes.
    crash: mpsc::Sender<CrashLoop>,
    /// Every worker's exits, for that verdict.
    fleet: Arc<Fleet>,
}

/// Why a running worker's wait ended.
enum Ended {
    /// The process exited by itself.
    Exited(io::Result<ExitStatus>),
    /// A rolling restart asked for it.
    Restart(Restart),
    /// portshare is stopping.
    Stop,
}

impl Watcher {
    async fn run(self, mut restarts_asked: mpsc::Receiver<Restart>) {
        let mut backoff =
            Backoff::new(self.config.restart_backoff, self.config.restart_backoff_max);
        let up = gauge!(m::WORKER_UP, "worker" => self.index.to_string());
        let restarts = counter!(m::WORKER_RESTARTS, "worker" => self.index.to_string());
        let mut first = true;
        while !self.stop.is_cancelled() {
            if !first {
                restarts.increment(1);
                // The port must be free again; an outgoing connection may have taken it.
                if let Err(e) = port_is_free(self.port) {
                    let pause = backoff.next_delay();
                    tracing::error!(worker = %self.index, port = self.port, error = %e, retry_in = ?pause,
                        "cannot restart worker: its port is taken by another socket");
                    if self.pause(pause, &mut restarts_asked).await.is_err() {
                        return;
                    }
                    continue;
                }
            }
            first = false;
            let started = Instant::now();
            let last_exit = match self.spawn() {
                Err(e) => {
                    tracing::error!(worker = %self.index, command = ?self.config.command, error = %e, "cannot start worker");
                    format!("failed to start: {e}")
                }
                Ok(mut child) => {
                    let pid = child.id();
                    self.backend.worker_started(pid, started);
                    up.set(1.0);
                    tracing::info!(worker = %self.index, pid, port = self.port, "worker started");
                    let ended = tokio::select! {
                        s = child.wait() => Ended::Exited(s),
                        () = self.stop.cancelled() => Ended::Stop,
                        Some(done) = restarts_asked.recv() => Ended::Restart(done),
                    };
                    // Out of rotation before anything else, so no new connection goes there.
                    self.backend.worker_stopped(Instant::now());
                    if !matches!(ended, Ended::Exited(_)) {
                        if matches!(ended, Ended::Restart(_)) {
                            tracing::info!(worker = %self.index, pid, "rolling restart: stopping worker");
                            // Calls placed just before the worker left rotation are on their
                            // way; let them arrive before it starts shutting down.
                            tokio::time::sleep(LEAVE_ROTATION_DELAY).await;
                        }
                        self.stop_child(&mut child).await;
                    }
                    self.guard.forget(pid);
                    up.set(0.0);
                    match ended {
                        Ended::Stop => return,
                        Ended::Restart(done) => {
                            let _ = done.send(());
                            // A planned restart: start again at once, without counting an exit.
                            continue;
                        }
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
                .after_exit(&mut backoff, started, last_exit, &mut restarts_asked)
                .await
                .is_err()
            {
                return;
            }
        }
    }

    /// After an unplanned exit: crash-loop accounting, then the backoff pause. `Err` means
    /// stop watching (every worker is crash-looping, or portshare is stopping).
    async fn after_exit(
        &self,
        backoff: &mut Backoff,
        started: Instant,
        last_exit: String,
        restarts_asked: &mut mpsc::Receiver<Restart>,
    ) -> Result<(), ()> {
        let now = Instant::now();
        // A worker that ran for a whole window was healthy: its next failure starts small.
        if now.saturating_duration_since(started) >= self.config.crash_loop_window {
            backoff.reset();
        }
        let (looping, fleet_down) = self.fleet.exited(&self.backend, now);
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
        self.pause(pause, restarts_asked).await
    }

    /// Sleeps, unless stopping: then `Err`. A rolling restart that reaches a worker which is
    /// down anyway is answered at once.
    async fn pause(
        &self,
        d: Duration,
        restarts_asked: &mut mpsc::Receiver<Restart>,
    ) -> Result<(), ()> {
        let wake = Instant::now() + d;
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return Err(()),
                () = tokio::time::sleep_until(wake) => return Ok(()),
                Some(done) = restarts_asked.recv() => { let _ = done.send(()); }
            }
        }
    }

    fn spawn(&self) -> io::Result<Child> {
        let port = self.port.to_string();
        let index = self.index.to_string();
        let (program, args) =
            self.config.command.split_first().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "empty worker command")
            })?;
        let mut cmd = Command::new(program);
        cmd.args(
            args.iter()
                .map(|a| a.replace("{port}", &port).replace("{index}", &index)),
        )
        .env("PORTSHARE_PORT", &port)
        .env("PORTSHARE_WORKER_INDEX", &index)
        // Lets a worker notice that portshare is gone (its parent pid changes) where the
        // OS cannot kill it for us (macOS has no parent-death signal).
        .env("PORTSHARE_PID", std::process::id().to_string())
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
            tokio::spawn(relay(out, self.index, Stream::Stdout));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(relay(err, self.index, Stream::Stderr));
        }
        Ok(child)
    }

    /// SIGTERM, up to `stop_grace` to exit, then SIGKILL.
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
