//! l4 mode: pick a backend, connect to it (with a timeout, trying another backend when a
//! connect fails so the client never notices), then copy bytes both ways, passing each
//! half-close on, until both sides are done, the connection goes idle, or the drain ends.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use metrics::counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backend::{ActiveGuard, Backend, BackendSet, ConnectFailure};
use crate::balance::Balancer;
use crate::metrics as m;

/// Connect and copy settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L4Config {
    /// How long one connect may take before the next backend is tried.
    pub connect_timeout: Duration,
    /// Backends tried for one client connection before it is given up.
    pub connect_attempts: usize,
    /// A connection with no bytes either way for this long is closed.
    pub idle_timeout: Duration,
}

/// Opens connections to backends; injectable so tests can script what a backend does.
pub trait Connect: Send + Sync + 'static {
    /// The connection type.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Connects to `addr`.
    fn connect(&self, addr: SocketAddr) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

/// Plain TCP with TCP_NODELAY, so small gRPC frames are not held back by Nagle.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpConnect;

impl Connect for TcpConnect {
    type Stream = TcpStream;

    async fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
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

/// What one proxied connection did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    /// The backend's name.
    pub backend: String,
    /// Bytes from the client to the backend.
    pub to_backend: u64,
    /// Bytes from the backend to the client.
    pub to_client: u64,
    /// How it ended.
    pub end: End,
}

/// The l4 proxy: shared by every connection task.
#[derive(Debug)]
pub struct L4Proxy<C = TcpConnect> {
    /// Timeouts and attempts.
    config: L4Config,
    /// Where connections may go.
    backends: Arc<BackendSet>,
    /// How one is picked.
    balancer: Balancer,
    /// How one is reached.
    connector: C,
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
            config,
            backends,
            balancer,
            connector,
        }
    }

    /// Serves one client connection, logging and counting how it ended.
    pub async fn handle<S>(&self, client: S, abort: &CancellationToken)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        match self.proxy(client, abort).await {
            Ok(t) => tracing::debug!(
                backend = t.backend,
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
            r = tokio::io::copy_bidirectional(&mut client, &mut server) => r.map(|_| End::Closed),
            () = activity.idle_for(self.config.idle_timeout) => Ok(End::Idle),
            () = abort.cancelled() => Ok(End::Aborted),
        };
        client.report();
        server.report();
        match copied {
            Ok(end) => Ok(Transfer {
                backend: backend.name().to_owned(),
                to_backend: client.total,
                to_client: server.total,
                end,
            }),
            Err(source) => Err(L4Error::Copy {
                // copy_bidirectional does not say which side failed; the wrappers saw it.
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
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut last = String::from("no backend to try");
        for attempt in 0..self.config.connect_attempts {
            let candidates = self.backends.candidates(Instant::now(), &tried);
            let Some(i) = self.balancer.pick(&candidates, |b| b.active()) else {
                break;
            };
            let backend = &candidates[i];
            if attempt > 0 {
                counter!(m::CONNECT_RETRIES).increment(1);
            }
            // Counted while connecting too, so concurrent picks already see the load.
            let guard = backend.track();
            let (failure, error) = match tokio::time::timeout(
                self.config.connect_timeout,
                self.connector.connect(backend.addr()),
            )
            .await
            {
                Ok(Ok(stream)) => {
                    self.backends.connect_succeeded(backend);
                    return Ok((stream, guard));
                }
                Ok(Err(e)) if is_local_shortage(&e) => {
                    // Out of descriptors or ports here: no backend is at fault, so none is
                    // ejected and no other is tried; this client waits for better times.
                    return Err(L4Error::Local(e));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    (ConnectFailure::Refused, e.to_string())
                }
                Ok(Err(e)) => (ConnectFailure::Other, e.to_string()),
                Err(_) => (
                    ConnectFailure::Timeout,
                    format!("no answer within {:?}", self.config.connect_timeout),
                ),
            };
            drop(guard);
            tried.push(backend.addr());
            let ejected = self
                .backends
                .connect_failed(backend, failure, &error, Instant::now());
            tracing::warn!(
                backend = backend.name(),
                error = %error,
                ejected_for = ?ejected,
                "connect to backend failed"
            );
            last = format!("{}: {error}", backend.name());
        }
        Err(L4Error::NoBackend {
            attempts: tried.len(),
            last,
        })
    }
}

/// Whether a connect failed for want of local resources rather than because of the backend.
fn is_local_shortage(e: &io::Error) -> bool {
    if e.kind() == io::ErrorKind::AddrNotAvailable {
        // Out of ephemeral ports (EADDRNOTAVAIL).
        return true;
    }
    // EMFILE and ENFILE have no ErrorKind of their own; their numbers are the same on
    // Linux, macOS and the BSDs. Windows reports WSAEMFILE.
    #[cfg(unix)]
    const OUT_OF_FDS: [i32; 2] = [23, 24];
    #[cfg(windows)]
    const OUT_OF_FDS: [i32; 1] = [10024];
    e.raw_os_error()
        .is_some_and(|code| OUT_OF_FDS.contains(&code))
}

/// When bytes last moved on a connection, in milliseconds since it started; both copy
/// directions update it, and the idle watchdog reads it.
#[derive(Debug)]
struct Activity {
    /// The connection's start.
    start: Instant,
    /// Milliseconds from `start` to the last read that returned data.
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Completes once nothing has moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// A stream that notes activity, counts the bytes read from it and remembers whether it failed.
struct Tracked<'a, S> {
    inner: S,
    activity: &'a Activity,
    /// Adds read bytes to the backend's byte counter for this direction.
    report_to: &'a (dyn Fn(u64) + Sync),
    /// Bytes read so far.
    total: u64,
    /// Bytes read but not yet added to the backend's byte counter; flushed in batches so a
    /// stream of small frames does not touch the shared counter on every read.
    unreported: u64,
    /// Whether a read or write on this side returned an error.
    failed: bool,
}

/// Byte counts are flushed to the metrics at least this often (in bytes), so long-lived
/// connections show up in `/metrics` while they run, not only when they close.
const REPORT_EVERY: u64 = 64 * 1024;

impl<'a, S> Tracked<'a, S> {
    fn new(inner: S, activity: &'a Activity, report_to: &'a (dyn Fn(u64) + Sync)) -> Self {
        Self {
            inner,
            activity,
            report_to,
            total: 0,
            unreported: 0,
            failed: false,
        }
    }

    /// Hands the bytes not yet reported to the metric.
    fn report(&mut self) {
        if self.unreported > 0 {
            (self.report_to)(self.unreported);
            self.unreported = 0;
        }
    }

    fn note<T>(&mut self, r: io::Result<T>) -> io::Result<T> {
        if r.is_err() {
            self.failed = true;
        }
        r
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = ready!(Pin::new(&mut this.inner).poll_read(cx, buf));
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            this.activity.touch();
            this.total += n;
            this.unreported += n;
            if this.unreported >= REPORT_EVERY {
                this.report();
            }
        }
        Poll::Ready(this.note(r))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = ready!(Pin::new(&mut this.inner).poll_write(cx, buf));
        Poll::Ready(this.note(r))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = ready!(Pin::new(&mut this.inner).poll_flush(cx));
        Poll::Ready(this.note(r))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = ready!(Pin::new(&mut this.inner).poll_shutdown(cx));
        Poll::Ready(this.note(r))
    }
}
