//! portshare: one listener that accepts gRPC (HTTP/2) connections and balances them over
//! worker processes on distinct ports — on Linux, macOS and Windows.
//!
//! # Layout
//! In data-path order:
//! - [`cli`]: the command line, mirroring the config keys (help text from the keys table).
//! - [`config`]: the one table of keys (name, flag, default, doc); defaults < TOML file <
//!   `PORTSHARE_*` env < flags, validated into [`config::Config`].
//! - [`control`]: requests from outside (SIGHUP, `POST /workers/restart`,
//!   `POST /config/reload`, forwarded signals).
//! - [`reload`]: the configuration read again while serving: what changed, applied where it
//!   can be, "needs a restart" where not.
//! - [`shutdown`]: signals, the stop token and task tracker, the bounded drain.
//! - [`listener`]: bind, permit before accept, accept backoff, one task per connection.
//! - [`threads`]: h2 mode's data-path threads, one runtime each, connections in turn.
//! - [`tls`]: rustls termination (ALPN h2, client certificates), reload on SIGHUP and file change.
//! - [`balance`]: round-robin, least-conn and p2c over a list of candidates.
//! - [`backend`]: the shared backend set: addresses, load, passive ejection, each backend's
//!   lifecycle state (starting, ready, failing, draining, stopped) that checks, the
//!   supervisor and the data path report to, and the bounded wait for a backend.
//! - [`connect`]: the one connect path of both modes: timeout, a backend's failure told from
//!   a local shortage, the outcome reported to the backend set.
//! - [`l4`]: pick → connect (timeout, retry elsewhere) → copy both ways.
//! - [`h2`]: HTTP/2 terminated; per call: pick → pooled backend connection → stream through.
//! - [`grpc`]: the gRPC wire format both modes' gRPC code speaks: status codes, the
//!   `grpc-status`, `grpc-message` and `grpc-timeout` headers, message framing,
//!   Trailers-Only answers, the `grpc.health.v1` messages.
//! - [`health`]: active checks (TCP, `grpc.health.v1`) of every backend, following the set's
//!   membership, reporting to each backend's state.
//! - [`reuseport`]: reuseport mode (Linux): the public address held for the workers, which
//!   listen on it themselves; the `tcp_migrate_req` warning.
//! - [`supervisor`]: spawned workers: port plan or socket directory, start, restart, surge
//!   replacement, drain and stop, crash loops.
//! - [`backoff`]: the one jittered exponential backoff.
//! - [`metrics`]: metric names, described once; the Prometheus recorder.
//! - [`access_log`]: one line per call (h2) or connection (l4), written off the data path.
//! - [`admin`]: `/healthz`, `/readyz`, `/backends`, `/metrics`.
//! - [`status`]: `portshare status`, a table from a running instance's `/backends`.
//! - `fuzz`: the entry points of the fuzz targets in `fuzz/`, built only for tests and
//!   for `cargo fuzz` (`--cfg fuzzing`).
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod access_log;
pub mod admin;
pub mod backend;
pub mod backoff;
pub mod balance;
pub mod cli;
pub mod config;
pub mod connect;
pub mod control;
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub mod fuzz;
pub mod grpc;
pub mod h2;
pub mod health;
pub mod l4;
pub mod listener;
pub mod metrics;
pub mod reload;
pub mod reuseport;
pub mod shutdown;
pub mod status;
pub mod supervisor;
pub mod threads;
pub mod tls;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::access_log::AccessLog;
use crate::backend::{BackendSet, WorkerIndex};
use crate::balance::Balancer;
use crate::config::{Config, Mode};
use crate::control::{Control, Controls};
use crate::h2::H2Proxy;
use crate::l4::{L4Proxy, SocketConnect};
use crate::shutdown::{Drained, Shutdown};
use crate::threads::DataThreads;

/// A run-time failure (configuration errors are [`config::ConfigError`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({role}): {source}")]
    Bind {
        /// `proxy` or `admin`.
        role: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] io::Error),
    /// A TLS file cannot be used (a configuration error: exit 64).
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// Workers could not be set up.
    #[error(transparent)]
    Workers(#[from] supervisor::SupervisorError),
    /// A worker exited too often.
    #[error(transparent)]
    CrashLoop(#[from] supervisor::CrashLoop),
    /// The metrics recorder could not be installed.
    #[error("cannot install the metrics recorder: {0}")]
    Metrics(#[from] metrics_exporter_prometheus::BuildError),
    /// The access log could not be opened.
    #[error("cannot open the access log {target}: {source}")]
    AccessLog {
        /// Where it was to go.
        target: String,
        /// Why not.
        #[source]
        source: io::Error,
    },
    /// reuseport mode: the public address cannot be held for the workers.
    #[error(transparent)]
    Shared(#[from] reuseport::SharedError),
    /// The data-path threads could not be started.
    #[error("cannot start the data-path threads: {0}")]
    Runtime(#[source] io::Error),
}

/// Data-path threads for h2 mode: one per core this process may use (a container's CPU
/// limit included, as the standard library reads it).
fn data_thread_count() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// The public address as `run` gets it.
#[derive(Debug)]
pub enum Public {
    /// l4 and h2: portshare's own listener.
    Listener(TcpListener),
    /// reuseport: held for the workers, which listen on it themselves.
    Shared(reuseport::SharedPort),
}

/// The bound sockets `run` serves: the binary binds the configured addresses, tests bind
/// port 0 and read the real ones back.
#[derive(Debug)]
pub struct Listeners {
    /// The public listener (or, in reuseport mode, the address held for the workers).
    pub proxy: Public,
    /// The admin listener, if enabled.
    pub admin: Option<TcpListener>,
}

impl Listeners {
    /// Binds the listeners `config` asks for. Needs a running tokio runtime.
    pub fn bind(config: &Config) -> Result<Self, Error> {
        let bind =
            |role, addr| listener::bind(addr).map_err(|source| Error::Bind { role, addr, source });
        let proxy = match config.mode {
            Mode::Reuseport => Public::Shared(reuseport::SharedPort::hold(config.listener.addr)?),
            Mode::L4 | Mode::H2 => Public::Listener(bind("proxy", config.listener.addr)?),
        };
        Ok(Self {
            proxy,
            admin: config.admin.map(|a| bind("admin", a)).transpose()?,
        })
    }
}

fn log_bound(role: &'static str, l: &TcpListener) {
    match l.local_addr() {
        Ok(addr) => tracing::info!(listener = role, %addr, "listening"),
        Err(e) => tracing::warn!(listener = role, error = %e, "listening, address unknown"),
    }
}

/// One l4 client connection, TLS terminated first if configured. This future is what every
/// open connection holds while idle, so it is kept small: the TLS path, whose stream state
/// is kilobytes, is boxed instead of widening every plain connection's task.
async fn l4_connection(
    proxy: Arc<L4Proxy<SocketConnect>>,
    stream: TcpStream,
    peer: SocketAddr,
    abort: CancellationToken,
    tls: Option<Arc<tls::Tls>>,
) {
    match tls {
        None => proxy.handle(stream, peer, &abort).await,
        Some(tls) => {
            Box::pin(async move {
                if let Some(stream) = tls.accept(stream).await {
                    proxy.handle(stream, peer, &abort).await;
                }
            })
            .await
        }
    }
}

/// Serves until `shutdown` begins, then drains for up to the configured drain timeout.
/// Requests on `controls` reload the configuration (read again by `load`), restart spawned
/// workers, or pass signals to them.
pub async fn run(
    mut config: Config,
    listeners: Listeners,
    shutdown: Shutdown,
    prometheus: Option<PrometheusHandle>,
    controls: Controls,
    load: reload::Loader,
) -> Result<(), Error> {
    let (control_tx, mut controls) = controls.into_parts();
    let tls = config
        .tls
        .clone()
        .map(tls::Tls::new)
        .transpose()?
        .map(Arc::new);
    if let (Public::Shared(held), Some(w)) = (&listeners.proxy, config.workers.as_mut()) {
        // Port 0 asked for: the workers bind the port the OS picked.
        w.shared = Some(held.addr());
        reuseport::Migration::read().warn();
    }
    let places = match &config.workers {
        None => Vec::new(),
        Some(w) => supervisor::plan(w)?,
    };
    let specs = match &config.workers {
        None => config.backends.clone(),
        Some(_) => places
            .iter()
            .enumerate()
            .map(|(i, p)| p.spec(WorkerIndex(i)))
            .collect(),
    };
    let backends = Arc::new(BackendSet::new(
        specs,
        config.ejection,
        config.health.thresholds,
    ));
    let mut workers = config
        .workers
        .clone()
        .map(|w| supervisor::Supervisor::start(w, &backends, &places, shutdown.background()))
        .transpose()?;
    // Stops the background tasks: health checks, TLS file watching, metrics upkeep, the
    // drains of backends a reload removed.
    let background_stop = shutdown.finish_token();
    let background = shutdown.background().clone();
    if let Some(handle) = &prometheus {
        background.spawn(metrics::upkeep(handle.clone(), background_stop.clone()));
    }
    let (health_tx, health_rx) = tokio::sync::watch::channel(config.health.clone());
    background.spawn(health::run(
        Arc::clone(&backends),
        health_rx,
        background_stop.clone(),
    ));
    if let Some(t) = &tls {
        background.spawn(Arc::clone(t).watch(background_stop.clone()));
    }
    match &listeners.proxy {
        Public::Listener(l) => log_bound("proxy", l),
        Public::Shared(held) => {
            tracing::info!(listener = "proxy", addr = %held.addr(), by = "the workers, SO_REUSEPORT", "listening")
        }
    }
    if let Some(l) = listeners.admin {
        log_bound("admin", &l);
        let state = admin::AdminState {
            backends: Arc::clone(&backends),
            prometheus,
            draining: shutdown.stop_token().clone(),
            restart: workers.is_some().then(|| control_tx.clone()),
            control: control_tx.clone(),
        };
        background.spawn(admin::serve(
            l,
            state,
            shutdown.finish_token(),
            background.clone(),
        ));
    }
    // In reuseport mode the kernel places connections; portshare's balance is never used.
    let balance = match config.mode {
        Mode::Reuseport => "the kernel's (SO_REUSEPORT)".to_owned(),
        _ => config.balance.to_string(),
    };
    tracing::info!(
        mode = %config.mode,
        balance,
        backends = backends.snapshot().len(),
        spawned = workers.is_some(),
        health = %config.health.kind,
        "serving"
    );
    let mut crash = None;
    let balancer = Balancer::new(config.balance);
    // h2 mode's calls run on threads of their own (see `threads`); l4's copies stay on the
    // main runtime, whose work is mostly the kernel's.
    let access_log = match &config.access_log {
        None => None,
        Some(target) => {
            let format = match config.log_format {
                config::LogFormat::Text => access_log::Format::Text,
                config::LogFormat::Json => access_log::Format::Json,
            };
            let log = AccessLog::start(target, format).map_err(|e| Error::AccessLog {
                target: target.to_string(),
                source: e,
            })?;
            Some(Arc::new(log))
        }
    };
    let data_threads = match config.mode {
        Mode::H2 => Some(DataThreads::start(data_thread_count()).map_err(Error::Runtime)?),
        Mode::L4 | Mode::Reuseport => None,
    };
    let abort = shutdown.abort_token().clone();
    let conn_tls = tls.clone();
    let limit = listener::ConnectionLimit::new(config.listener.max_connections);
    let mut live = reload::Live {
        config: config.clone(),
        load,
        backends: Arc::clone(&backends),
        l4: None,
        h2: None,
        health: health_tx,
        limit: Arc::clone(&limit),
        tls: tls.clone(),
        tasks: background.clone(),
        stop: background_stop.clone(),
    };
    let serve: Pin<Box<dyn Future<Output = ()> + Send + '_>> = match (config.mode, listeners.proxy)
    {
        // The workers serve; portshare holds the address until the stop begins.
        (_, Public::Shared(held)) => {
            let stop = shutdown.stop_token().clone();
            Box::pin(async move {
                stop.cancelled().await;
                drop(held);
            })
        }
        (Mode::L4 | Mode::Reuseport, Public::Listener(proxy_listener)) => {
            let proxy = Arc::new(
                L4Proxy::new(
                    config.l4.clone(),
                    Arc::clone(&backends),
                    balancer,
                    SocketConnect,
                )
                .with_access_log(access_log.clone()),
            );
            live.l4 = Some(Arc::clone(&proxy));
            Box::pin(listener::serve(
                proxy_listener,
                Arc::clone(&limit),
                &shutdown,
                None,
                move |stream, peer| {
                    l4_connection(
                        Arc::clone(&proxy),
                        stream,
                        peer,
                        abort.clone(),
                        conn_tls.clone(),
                    )
                },
            ))
        }
        (Mode::H2, Public::Listener(proxy_listener)) => {
            let proxy = Arc::new(
                H2Proxy::new(
                    config.h2.clone(),
                    Arc::clone(&backends),
                    balancer,
                    data_threads.as_ref().map_or(1, DataThreads::len),
                )
                .with_access_log(access_log.clone()),
            );
            live.h2 = Some(Arc::clone(&proxy));
            let stop = shutdown.stop_token().clone();
            Box::pin(listener::serve(
                proxy_listener,
                Arc::clone(&limit),
                &shutdown,
                data_threads.as_ref(),
                move |stream, peer| {
                    Arc::clone(&proxy).serve_connection(
                        stream,
                        peer,
                        conn_tls.clone(),
                        stop.clone(),
                        abort.clone(),
                    )
                },
            ))
        }
    };
    let mut crashes = match workers.as_mut() {
        Some(w) => w.crashes(),
        None => supervisor::Crashes::none(),
    };
    tokio::pin!(serve);
    loop {
        tokio::select! {
            () = &mut serve => break,
            c = crashes.next() => {
                tracing::error!(error = %c, "worker crash loop: shutting down");
                crash = Some(c);
                shutdown.begin();
            }
            Some(control) = controls.recv() => match control {
                Control::Reload(done) => {
                    // The TLS files are read again with the configuration; when that fails,
                    // they are still read again as they were (a certificate renewed in place).
                    if live.reload(workers.as_ref()).is_err()
                        && let Some(t) = &tls
                    {
                        t.reload_and_log("reload requested");
                    }
                    match &workers {
                        Some(w) => w.rolling_restart(done),
                        None => tracing::info!("reload: no spawned workers to restart"),
                    }
                }
                Control::ReloadConfig(done) => {
                    let _ = done.send(live.reload(workers.as_ref()));
                }
                Control::ShowConfig(done) => {
                    let _ = done.send(live.config.to_toml());
                }
                Control::Forward(signal) => match &workers {
                    Some(w) => w.forward(signal),
                    None => tracing::info!(?signal, "no spawned workers to pass the signal to"),
                },
            },
        }
    }
    let drain_timeout = live.config.drain_timeout;
    let open = shutdown.tracker().len();
    tracing::info!(open, timeout = ?drain_timeout, "stopped accepting; draining");
    match shutdown.drain(drain_timeout).await {
        Drained::Clean => tracing::info!("drained; every connection finished"),
        Drained::Forced(left) => {
            tracing::warn!(left, "drain time over; closed the connections still open")
        }
    }
    // Only now that no connection needs them do the workers get SIGTERM.
    if let Some(w) = workers {
        tracing::info!("stopping workers");
        w.stop().await;
    }
    // Last, the admin listener, the checks and the rest of the background work.
    shutdown.finish().await;
    match crash {
        Some(c) => Err(Error::CrashLoop(c)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::Balance;
    use crate::l4::L4Config;
    use std::time::Duration;

    /// An idle l4 connection costs its task plus two sockets; the task is most of it, and
    /// the benchmark's target is 2 KiB a connection in all.
    #[tokio::test]
    async fn an_l4_connection_task_stays_small() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let second = Duration::from_secs(1);
        let proxy = Arc::new(L4Proxy::new(
            L4Config {
                connect_timeout: second,
                connect_attempts: 1,
                idle_timeout: second,
                queue_timeout: second,
            },
            BackendSet::empty(),
            Balancer::new(Balance::LeastConn),
            SocketConnect,
        ));
        let task = l4_connection(proxy, client, addr, CancellationToken::new(), None);
        let size = std::mem::size_of_val(&task);
        assert!(size <= 1024, "an l4 connection's task is {size} bytes");
    }
}
