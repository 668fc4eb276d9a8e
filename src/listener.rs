//! The public listener: binding, the connection limit (a permit is taken *before* accept,
//! so a flood waits in the kernel's backlog instead of in our memory), accept errors backed
//! off, and one tracked task per connection.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use metrics::{Gauge, counter, gauge};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::metrics as m;
use crate::shutdown::Shutdown;
use crate::threads::DataThreads;

/// The kernel queue of connections not yet accepted; where a flood waits while every
/// permit is taken. Linux caps it at `net.core.somaxconn` anyway.
const BACKLOG: i32 = 1024;

/// First pause after an accept error such as EMFILE: long enough for a connection to close
/// and free a descriptor, short enough that service resumes promptly.
const ACCEPT_BACKOFF_BASE: Duration = Duration::from_millis(10);

/// Longest pause between accept attempts while the error persists.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Settings of the public listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// Client connections held at once; beyond that, new ones wait in the backlog.
    pub max_connections: usize,
}

/// Binds a TCP listener. An unspecified IPv6 address (`[::]`) also accepts IPv4 on every
/// platform (Windows defaults to IPv6-only). Needs a running tokio runtime.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // On Unix, SO_REUSEADDR lets a restarted portshare bind while old connections sit in
    // TIME_WAIT. On Windows it would let another process steal the port, so it stays off.
    #[cfg(unix)]
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        socket.set_only_v6(false)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}

/// Errors that concern one connection that died in the queue, not the listener: the loop
/// simply accepts the next one.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// Lowers the active-connection gauge when a connection task ends, however it ends.
struct ActiveConnection(Gauge);

impl ActiveConnection {
    fn new(gauge: &Gauge) -> Self {
        gauge.increment(1.0);
        Self(gauge.clone())
    }
}

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

pin_project_lite::pin_project! {
    /// A connection's task with what it holds until it ends: its permit and its place in the
    /// active gauge. A struct, not an `async` block awaiting `task`: such a block would keep
    /// `task` twice in its state (once captured, once awaited), doubling every connection's
    /// task allocation.
    struct Held<F> {
        #[pin]
        task: F,
        _permit: OwnedSemaphorePermit,
        _counted: ActiveConnection,
    }
}

impl<F: Future<Output = ()>> Future for Held<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.project().task.poll(cx)
    }
}

/// The cap on client connections held at once, which a reload may move: raised, the new
/// places are free at once; lowered, places are withdrawn as connections close (none is
/// cut for it).
#[derive(Debug)]
pub struct ConnectionLimit {
    permits: Arc<Semaphore>,
    max: std::sync::Mutex<usize>,
}

impl ConnectionLimit {
    /// A cap of `max`.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            permits: Arc::new(Semaphore::new(max)),
            max: std::sync::Mutex::new(max),
        })
    }

    /// Moves the cap to `max`; a lowering takes its places back on a task of `tasks`.
    pub fn set(&self, max: usize, tasks: &tokio_util::task::TaskTracker) {
        let mut current = self
            .max
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if max > *current {
            self.permits.add_permits(max - *current);
        } else if max < *current {
            let mut fewer = *current - max;
            let permits = Arc::clone(&self.permits);
            tasks.spawn(async move {
                // In chunks: one acquisition can take at most u32::MAX places.
                while fewer > 0 {
                    let n = u32::try_from(fewer).unwrap_or(u32::MAX);
                    match Arc::clone(&permits).acquire_many_owned(n).await {
                        Ok(p) => p.forget(),
                        Err(_) => return,
                    }
                    fewer -= n as usize;
                }
            });
        }
        *current = max;
    }
}

/// Accepts connections until shutdown begins, running `handle` for each one on a tracked
/// task: on the current runtime, or, given data-path `threads`, on each of theirs in turn.
/// Returns once the listener has stopped accepting; the tasks go on.
pub async fn serve<H, F>(
    listener: TcpListener,
    limit: Arc<ConnectionLimit>,
    shutdown: &Shutdown,
    threads: Option<&DataThreads>,
    handle: H,
) where
    H: Fn(TcpStream, SocketAddr) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let permits = Arc::clone(&limit.permits);
    let stop = shutdown.stop_token();
    let accepted = counter!(m::CONNECTIONS_ACCEPTED);
    let accept_errors = counter!(m::ACCEPT_ERRORS);
    // Registered once here, not on every connection.
    let active = gauge!(m::CONNECTIONS_ACTIVE);
    let mut backoff = Backoff::new(ACCEPT_BACKOFF_BASE, ACCEPT_BACKOFF_MAX);
    loop {
        let permit = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            p = Arc::clone(&permits).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let result = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match result {
            Ok(conn) => conn,
            Err(e) if is_connection_error(&e) => {
                tracing::debug!(error = %e, "a connection died before it was accepted");
                continue;
            }
            Err(e) => {
                accept_errors.increment(1);
                let pause = backoff.next_delay();
                tracing::warn!(error = %e, pause = ?pause, "accept failed; pausing before the next accept");
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(pause) => continue,
                }
            }
        };
        backoff.reset();
        accepted.increment(1);
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY on a client connection");
        }
        let span = tracing::debug_span!("conn", %peer);
        let Some(threads) = threads else {
            let task = Held {
                task: handle(stream, peer),
                _permit: permit,
                _counted: ActiveConnection::new(&active),
            };
            shutdown.tracker().spawn(task.instrument(span));
            continue;
        };
        // The connection moves to the thread's own I/O driver.
        let runtime = threads.next();
        let moved = stream.into_std().and_then(|std| {
            let _on = runtime.enter();
            TcpStream::from_std(std)
        });
        let stream = match moved {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "cannot hand a connection to a data-path thread");
                continue;
            }
        };
        let task = Held {
            task: handle(stream, peer),
            _permit: permit,
            _counted: ActiveConnection::new(&active),
        };
        shutdown.tracker().spawn_on(task.instrument(span), runtime);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn the_permit_is_taken_before_accept() {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let limit = ConnectionLimit::new(1);
        let shutdown = Shutdown::new();
        let release = tokio_util::sync::CancellationToken::new();
        let served = {
            let shutdown = shutdown.clone();
            let release = release.clone();
            tokio::spawn(async move {
                serve(listener, limit, &shutdown, None, move |mut s, _| {
                    let release = release.clone();
                    async move {
                        let _ = s.write_all(b"hi").await;
                        release.cancelled().await;
                    }
                })
                .await;
            })
        };
        let mut first = TcpStream::connect(addr).await.expect("connect");
        let mut buf = [0u8; 2];
        first.read_exact(&mut buf).await.expect("greeting");
        // The second connection completes in the kernel backlog but is not served...
        let mut second = TcpStream::connect(addr).await.expect("connect");
        let waited =
            tokio::time::timeout(Duration::from_millis(200), second.read_exact(&mut buf)).await;
        assert!(waited.is_err(), "served beyond max_connections");
        // ...until the first one's permit is released.
        release.cancel();
        second
            .read_exact(&mut buf)
            .await
            .expect("served after release");
        shutdown.begin();
        served.await.expect("serve loop ends on shutdown");
    }

    #[tokio::test]
    async fn a_lowered_limit_takes_its_places_back_as_connections_close() {
        let limit = ConnectionLimit::new(2);
        let tasks = tokio_util::task::TaskTracker::new();
        let held = Arc::clone(&limit.permits)
            .acquire_many_owned(2)
            .await
            .expect("places");
        limit.set(1, &tasks);
        assert_eq!(limit.permits.available_permits(), 0);
        drop(held);
        tasks.close();
        tasks.wait().await;
        assert_eq!(limit.permits.available_permits(), 1);
        limit.set(3, &tasks);
        assert_eq!(limit.permits.available_permits(), 3);
    }

    #[tokio::test]
    async fn an_unspecified_ipv6_listener_also_accepts_ipv4() {
        let listener = match bind("[::]:0".parse().expect("addr")) {
            Ok(listener) => listener,
            Err(e) => {
                eprintln!(
                    "SKIPPED: cannot bind [::]:0 ({e}): no IPv6 on this machine; [::] taking IPv4 is not tested"
                );
                return;
            }
        };
        let port = listener.local_addr().expect("addr").port();
        let (accepted, connected) = tokio::join!(
            listener.accept(),
            TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port)))
        );
        assert!(accepted.is_ok() && connected.is_ok());
    }
}
