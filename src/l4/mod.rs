//! l4 mode: pick a backend, connect to it (with a timeout, trying another backend when a
//! connect fails so the client never notices), then copy bytes both ways, passing each
//! half-close on, until both sides are done, the connection goes idle, or the drain ends.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use metrics::counter;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::access_log::{AccessLog, ConnectionRecord, Record};
use crate::backend::{ActiveGuard, Backend, BackendSet, Tried};
use crate::balance::{Balance, Balancer};
use crate::connect::{self, ConnectError};
pub use crate::connect::{Connect, SocketConnect};
use crate::metrics as m;
use copy::{Activity, Tracked, copy_both_ways};

mod copy;

/// Connect and copy settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L4Config {
    /// How long one connect may take before the next backend is tried.
    pub connect_timeout: Duration,
    /// Backends tried for one client connection before it is given up.
    pub connect_attempts: usize,
    /// A connection with no bytes either way for this long is closed.
    pub idle_timeout: Duration,
    /// How long an accepted connection may wait for a backend that can take it (none
    /// ready, e.g. while the only worker restarts) before it is closed.
    pub queue_timeout: Duration,
}

/// Which side of a proxied connection an error came from; a metric label, and the log
/// level (client trouble is routine, backend trouble deserves attention).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client.
    Client,
    /// A backend.
    Backend,
}

impl Side {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Backend => "backend",
        }
    }
}

/// Why a proxied connection failed.
#[derive(Debug, thiserror::Error)]
pub enum L4Error {
    /// Every backend tried refused or timed out (or there was none to try).
    #[error("no backend took the connection after {attempts} attempt(s); last error: {last}")]
    NoBackend {
        /// Connects tried.
        attempts: usize,
        /// The last failure, naming its backend.
        last: String,
    },
    /// This process ran out of something (file descriptors, local ports) while connecting.
    #[error("cannot open a connection to a backend here: {0}")]
    Local(#[source] io::Error),
    /// Reading or writing failed after the connection was set up.
    #[error("{} side of the connection to {backend} failed: {source}", side.as_str())]
    Copy {
        /// Where the error came from.
        side: Side,
        /// The backend's name.
        backend: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

impl L4Error {
    /// Which side caused it.
    pub fn side(&self) -> Side {
        match self {
            L4Error::NoBackend { .. } => Side::Backend,
            // Not the client's doing, but no backend's either: logged loudly, like a backend fault.
            L4Error::Local(_) => Side::Backend,
            L4Error::Copy { side, .. } => *side,
        }
    }

    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            L4Error::NoBackend { .. } => "no_backend",
            L4Error::Local(_) => "local_resources",
            L4Error::Copy { .. } => "io",
        }
    }
}

/// How a proxied connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides closed.
    Closed,
    /// Nothing moved for the idle timeout.
    Idle,
    /// Shutdown's drain time ran out.
    Aborted,
}

impl End {
    /// As the access log writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::Idle => "idle",
            End::Aborted => "aborted",
        }
    }
}

/// What one proxied connection did.
#[derive(Debug, Clone)]
pub struct Transfer {
    /// The backend it went to (shared, so finishing a connection allocates nothing).
    pub backend: Arc<Backend>,
    /// Bytes from the client to the backend.
    pub to_backend: u64,
    /// Bytes from the backend to the client.
    pub to_client: u64,
    /// How it ended.
    pub end: End,
}

/// The l4 proxy: shared by every connection task.
#[derive(Debug)]
pub struct L4Proxy<C = SocketConnect> {
    /// Timeouts and attempts; a reload may replace them (connections under way keep theirs).
    config: ArcSwap<L4Config>,
    /// Where connections may go.
    backends: Arc<BackendSet>,
    /// How one is picked.
    balancer: Balancer,
    /// How one is reached.
    connector: C,
    /// Where each connection's line goes, if anywhere.
    access_log: Option<Arc<AccessLog>>,
}

impl<C: Connect> L4Proxy<C> {
    /// A proxy over `backends`.
    pub fn new(
        config: L4Config,
        backends: Arc<BackendSet>,
        balancer: Balancer,
        connector: C,
    ) -> Self {
        Self {
            config: ArcSwap::from_pointee(config),
            backends,
            balancer,
            connector,
            access_log: None,
        }
    }

    /// New timeouts, attempts and balance for the connections that come next (a reload).
    pub fn reconfigure(&self, config: L4Config, balance: Balance) {
        self.config.store(Arc::new(config));
        self.balancer.set_kind(balance);
    }

    /// Serves one client connection, logging and counting how it ended.
    pub async fn handle<S>(&self, client: S, peer: SocketAddr, abort: &CancellationToken)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        match &self.access_log {
            None => self.finish(self.proxy(client, abort).await),
            // Boxed: the line's facts would otherwise widen every connection's task.
            Some(log) => Box::pin(self.handle_logged(client, peer, abort, log)).await,
        }
    }

    /// [`L4Proxy::handle`], writing the connection's access-log line at the end.
    async fn handle_logged<S>(
        &self,
        client: S,
        peer: SocketAddr,
        abort: &CancellationToken,
        log: &AccessLog,
    ) where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let (at, started) = (SystemTime::now(), Instant::now());
        let result = self.proxy(client, abort).await;
        {
            let (backend, to_backend, to_client, end) = match &result {
                Ok(t) => (
                    Some(t.backend.name().to_owned()),
                    t.to_backend,
                    t.to_client,
                    t.end.as_str(),
                ),
                Err(L4Error::Copy { backend, .. }) => (Some(backend.clone()), 0, 0, "error"),
                Err(e) => (None, 0, 0, e.reason()),
            };
            log.log(Record::Connection(ConnectionRecord {
                at,
                peer,
                backend,
                duration: started.elapsed(),
                to_backend,
                to_client,
                end,
            }));
        }
        self.finish(result);
    }

    /// Logs and counts how a connection ended.
    fn finish(&self, result: Result<Transfer, L4Error>) {
        match result {
            Ok(t) => tracing::debug!(
                backend = t.backend.name(),
                to_backend = t.to_backend,
                to_client = t.to_client,
                end = ?t.end,
                "connection closed"
            ),
            Err(e) => {
                counter!(m::CONNECTIONS_FAILED, "side" => e.side().as_str(), "reason" => e.reason())
                    .increment(1);
                match e.side() {
                    Side::Client => tracing::debug!(error = %e, "connection failed"),
                    Side::Backend => tracing::warn!(error = %e, "connection failed"),
                }
            }
        }
    }

    /// Writes a line for every client connection to `log`.
    pub fn with_access_log(mut self, log: Option<Arc<AccessLog>>) -> Self {
        self.access_log = log;
        self
    }

    /// Connects `client` to a backend and copies bytes both ways until the connection ends.
    pub async fn proxy<S>(&self, client: S, abort: &CancellationToken) -> Result<Transfer, L4Error>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let (server, guard) = self.connect().await?;
        let backend: &Backend = guard.backend();
        let activity = Activity::new();
        let sent = |n| backend.count_sent(n);
        let received = |n| backend.count_received(n);
        let mut client = Tracked::new(client, &activity, &sent);
        let mut server = Tracked::new(server, &activity, &received);
        let copied = tokio::select! {
            r = copy_both_ways(&mut client, &mut server) => r.map(|()| End::Closed),
            () = activity.idle_for(self.config.load().idle_timeout) => Ok(End::Idle),
            () = abort.cancelled() => Ok(End::Aborted),
        };
        client.report();
        server.report();
        match copied {
            Ok(end) => Ok(Transfer {
                backend: Arc::clone(guard.backend()),
                to_backend: client.total,
                to_client: server.total,
                end,
            }),
            Err(source) => Err(L4Error::Copy {
                // The copy does not say which side failed; the wrappers saw it.
                side: if server.failed {
                    Side::Backend
                } else {
                    Side::Client
                },
                backend: backend.name().to_owned(),
                source,
            }),
        }
    }

    /// Picks a backend and connects to it; on a refused or timed-out connect, marks that
    /// backend and tries another, up to the configured number of attempts.
    async fn connect(&self) -> Result<(C::Stream, ActiveGuard), L4Error> {
        let mut tried = Tried::new();
        let mut last = String::from("no backend to try");
        let until = Instant::now() + self.config.load().queue_timeout;
        for attempt in 0..self.config.load().connect_attempts {
            // Counted while connecting too, so concurrent picks already see the load.
            let guard = match self
                .backends
                .pick_or_wait(&self.balancer, &tried, None, until)
                .await
            {
                Ok(guard) => guard,
                Err(unplaced) => {
                    last = format!("{} (waited {:.1?} for one)", unplaced.why, unplaced.waited);
                    break;
                }
            };
            let backend = Arc::clone(guard.backend());
            let backend = &backend;
            if attempt > 0 {
                counter!(m::CONNECT_RETRIES).increment(1);
            }
            let timeout = self.config.load().connect_timeout;
            match connect::connect(&self.connector, &self.backends, backend, timeout).await {
                Ok(stream) => return Ok((stream, guard)),
                // Out of descriptors or ports here: no backend is at fault, so none is
                // ejected and no other is tried; this client waits for better times.
                Err(ConnectError::Local(e)) => return Err(L4Error::Local(e)),
                Err(ConnectError::Backend { error, .. }) => {
                    drop(guard);
                    tried.add(backend);
                    last = format!("{}: {error}", backend.name());
                }
            }
        }
        Err(L4Error::NoBackend {
            attempts: tried.len(),
            last,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{BackendSpec, EjectionConfig, Thresholds};
    use crate::balance::Balance;
    use crate::connect::scripted::{Script, Scripted};
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn proxy(ports: &[u16], script: Script, idle: Duration) -> (L4Proxy<Scripted>, Scripted) {
        let specs = ports.iter().map(|p| BackendSpec {
            name: addr(*p).to_string(),
            addr: addr(*p).into(),
            worker: None,
        });
        let ejection = EjectionConfig {
            base_time: Duration::from_secs(5),
            max_time: Duration::from_secs(60),
        };
        let thresholds = Thresholds {
            healthy: 2,
            unhealthy: 3,
        };
        let backends = Arc::new(BackendSet::new(specs, ejection, thresholds));
        let connector = Scripted(Arc::new(script));
        let config = L4Config {
            connect_timeout: Duration::from_secs(1),
            connect_attempts: 3,
            idle_timeout: idle,
            queue_timeout: Duration::from_secs(1),
        };
        // Round-robin from the first backend: the order of attempts is known.
        let balancer = Balancer::starting_at(Balance::RoundRobin, 0);
        let p = L4Proxy::new(config, backends, balancer, connector.clone());
        (p, connector)
    }

    fn far_end(c: &Scripted) -> DuplexStream {
        c.0.far_ends
            .lock()
            .expect("lock")
            .pop()
            .expect("a backend was connected")
    }

    #[tokio::test]
    async fn a_refused_connect_is_retried_elsewhere_and_ejects_the_backend() {
        let script = Script {
            refuse: vec![addr(1), addr(2)],
            ..Script::default()
        };
        let (p, conn) = proxy(&[1, 2, 3], script, Duration::from_secs(60));
        let (mut client, client_far) = tokio::io::duplex(1024);
        let never = CancellationToken::new();
        let task = tokio::spawn(async move { p.proxy(client_far, &never).await.map(|t| (t, p)) });
        client.write_all(b"ping").await.expect("write");
        client.shutdown().await.expect("half-close");
        // Round-robin tried :1 (refused), then the second of the remaining [:2, :3].
        let mut backend = loop {
            if let Some(b) = conn.0.far_ends.lock().expect("lock").pop() {
                break b;
            }
            tokio::task::yield_now().await;
        };
        let mut got = Vec::new();
        backend.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"ping");
        backend.write_all(b"pong").await.expect("write");
        drop(backend);
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.expect("read");
        assert_eq!(answer, b"pong");
        let (transfer, p) = task.await.expect("join").expect("proxied");
        assert_eq!(transfer.backend.name(), addr(3).to_string());
        assert_eq!(
            (transfer.to_backend, transfer.to_client, transfer.end),
            (4, 4, End::Closed)
        );
        assert_eq!(*conn.0.attempts.lock().expect("lock"), [addr(1), addr(3)]);
        let statuses = p.backends.statuses(Instant::now());
        let states: Vec<_> = statuses.iter().map(|s| (s.state, s.ejections)).collect();
        // Refused: ejected, and (nothing listens there) out of rotation by its health too.
        assert_eq!(states, [("unhealthy", 1), ("unknown", 0), ("unknown", 0)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connect_that_times_out_is_retried_elsewhere() {
        let script = Script {
            hang: vec![addr(1)],
            ..Script::default()
        };
        let (p, conn) = proxy(&[1, 2], script, Duration::from_secs(60));
        let (_client, far) = tokio::io::duplex(64);
        let abort = CancellationToken::new();
        let a = abort.clone();
        let started = Instant::now();
        let task = tokio::spawn(async move { p.proxy(far, &a).await.map(|t| (t, p)) });
        // Wait until the connection reached :2, after :1 timed out.
        loop {
            if !conn.0.far_ends.lock().expect("lock").is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        abort.cancel();
        let (t, p) = task.await.expect("join").expect("proxied");
        assert_eq!(t.backend.name(), addr(2).to_string());
        // :1 was tried first: it cost one connect timeout, then it was ejected.
        assert_eq!(*conn.0.attempts.lock().expect("lock"), [addr(1), addr(2)]);
        assert!(started.elapsed() >= Duration::from_secs(1));
        let s = p.backends.statuses(Instant::now());
        assert_eq!(s[0].state, "ejected");
        assert!(
            s[0].last_error
                .as_deref()
                .is_some_and(|e| e.contains("no answer"))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn when_every_backend_refuses_the_client_is_given_up() {
        let script = Script {
            refuse: vec![addr(1), addr(2)],
            ..Script::default()
        };
        let (p, conn) = proxy(&[1, 2], script, Duration::from_secs(60));
        let (_client, far) = tokio::io::duplex(64);
        let err = p
            .proxy(far, &CancellationToken::new())
            .await
            .expect_err("no backend");
        assert!(
            matches!(err, L4Error::NoBackend { attempts: 2, .. }),
            "{err}"
        );
        assert_eq!(err.side(), Side::Backend);
        // Each backend was tried once, not attempts-many times.
        assert_eq!(conn.0.attempts.lock().expect("lock").len(), 2);
        // Nothing listens on either: both are out by their health, after a wait for one to
        // come back; passive ejection alone never took the last one.
        let statuses = p.backends.statuses(Instant::now());
        assert!(statuses.iter().all(|s| s.state == "unhealthy"));
        assert_eq!(statuses.iter().map(|s| s.ejections).sum::<u64>(), 1);
        assert!(
            err.to_string().contains("no backend is ready (waited 1.0s"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_local_shortage_blames_no_backend() {
        let script = Script {
            out_of_fds: true,
            ..Script::default()
        };
        let (p, conn) = proxy(&[1, 2], script, Duration::from_secs(60));
        let (_client, far) = tokio::io::duplex(64);
        let err = p
            .proxy(far, &CancellationToken::new())
            .await
            .expect_err("shortage");
        assert!(matches!(err, L4Error::Local(_)), "{err}");
        assert_eq!(conn.0.attempts.lock().expect("lock").len(), 1);
        assert_eq!(p.backends.usable(Instant::now()), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_ends_after_the_idle_timeout_and_activity_resets_it() {
        let (p, conn) = proxy(&[1], Script::default(), Duration::from_secs(10));
        let (mut client, far) = tokio::io::duplex(64);
        let started = Instant::now();
        let task = tokio::spawn(async move { p.proxy(far, &CancellationToken::new()).await });
        tokio::time::sleep(Duration::from_secs(6)).await;
        client.write_all(b"x").await.expect("write");
        let _backend = far_end(&conn);
        let t = task.await.expect("join").expect("proxied");
        assert_eq!(t.end, End::Idle);
        assert!(
            started.elapsed() >= Duration::from_secs(16),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn the_abort_token_closes_an_open_connection() {
        let (p, conn) = proxy(&[1], Script::default(), Duration::from_secs(3600));
        let (_client, far) = tokio::io::duplex(64);
        let abort = CancellationToken::new();
        let a = abort.clone();
        let task = tokio::spawn(async move { p.proxy(far, &a).await });
        loop {
            if !conn.0.far_ends.lock().expect("lock").is_empty() {
                break;
            }
            tokio::task::yield_now().await;
        }
        abort.cancel();
        let t = task.await.expect("join").expect("proxied");
        assert_eq!(t.end, End::Aborted);
    }

    /// Through a pipe that holds only 64 bytes, a megabyte each way arrives whole and in
    /// order (the writer pushes back all the time), and each side's EOF is passed on.
    #[tokio::test]
    async fn copy_both_ways_survives_backpressure_and_passes_half_close() {
        let (mut client, mut client_far) = tokio::io::duplex(64);
        let (mut server, mut server_far) = tokio::io::duplex(64);
        let copier =
            tokio::spawn(async move { copy_both_ways(&mut client_far, &mut server_far).await });
        let up: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = up.iter().rev().copied().collect();
        let (up2, down2) = (up.clone(), down.clone());
        let client_side = tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(&mut client);
            let send = async {
                w.write_all(&up2).await.expect("client write");
                w.shutdown().await.expect("client half-close");
            };
            let mut got = Vec::new();
            let recv = r.read_to_end(&mut got);
            let ((), read) = tokio::join!(send, recv);
            read.expect("client read");
            got
        });
        let server_side = tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(&mut server);
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.expect("server read");
            // Only after the client's EOF arrived does the server answer, then close.
            w.write_all(&down2).await.expect("server write");
            w.shutdown().await.expect("server close");
            got
        });
        assert_eq!(server_side.await.expect("join"), up);
        assert_eq!(client_side.await.expect("join"), down);
        copier.await.expect("join").expect("copy");
    }
}
