//! The one connect path of both modes: connect to a backend within the connect timeout,
//! tell a failure of the backend (refused, no answer, reset) from a shortage here (out of
//! descriptors or ephemeral ports), and report the outcome to the backend set, which counts
//! it and may eject the backend. l4 calls it for every client connection, h2 mode's pool
//! for every backend connection it opens. [`Connect`] is the seam tests script.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
#[cfg(unix)]
use tokio::net::UnixStream;
use tokio::time::Instant;

use crate::backend::{Backend, BackendAddr, BackendSet, ConnectFailure};

/// Opens connections to backends; injectable so tests can script what a backend does.
pub trait Connect: Send + Sync + 'static {
    /// The connection type.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Connects to `addr`.
    fn connect(&self, addr: &BackendAddr) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

/// The operating system's sockets: TCP with TCP_NODELAY (so small gRPC frames are not held
/// back by Nagle), or a Unix domain socket (a path, or a Linux abstract name).
#[derive(Debug, Clone, Copy, Default)]
pub struct SocketConnect;

impl Connect for SocketConnect {
    type Stream = BackendStream;

    async fn connect(&self, addr: &BackendAddr) -> io::Result<BackendStream> {
        match addr {
            BackendAddr::Tcp(a) => {
                let stream = TcpStream::connect(a).await?;
                stream.set_nodelay(true)?;
                Ok(BackendStream::Tcp(stream))
            }
            #[cfg(unix)]
            BackendAddr::Unix(path) => Ok(BackendStream::Unix(UnixStream::connect(path).await?)),
            // tokio takes a path that starts with a NUL byte as an abstract name.
            #[cfg(target_os = "linux")]
            BackendAddr::UnixAbstract(name) => Ok(BackendStream::Unix(
                UnixStream::connect(format!("\0{name}")).await?,
            )),
            // Configuration refuses these here already; this is the connect path's word.
            #[allow(unreachable_patterns)]
            other => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("{other}: not supported on this platform"),
            )),
        }
    }
}

/// A connection to a backend, over TCP or a Unix domain socket; reads and writes go
/// straight to the socket underneath.
#[derive(Debug)]
pub enum BackendStream {
    /// TCP.
    Tcp(TcpStream),
    /// A Unix domain socket.
    #[cfg(unix)]
    Unix(UnixStream),
}

impl AsyncRead for BackendStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            #[cfg(unix)]
            BackendStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BackendStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            #[cfg(unix)]
            BackendStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendStream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            #[cfg(unix)]
            BackendStream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            BackendStream::Tcp(s) => s.is_write_vectored(),
            #[cfg(unix)]
            BackendStream::Unix(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            #[cfg(unix)]
            BackendStream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            #[cfg(unix)]
            BackendStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Why no connection to a backend could be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Out of descriptors or ports here: no backend is at fault, none is ejected, and
    /// trying another would fail the same way.
    #[error("out of local resources: {0}")]
    Local(#[source] io::Error),
    /// The backend refused, did not answer in time, or failed otherwise: counted against
    /// it (and it may have been ejected); another backend may do better.
    #[error("{error}")]
    Backend {
        /// What kind of failure.
        failure: ConnectFailure,
        /// What happened, for logs and the client's message.
        error: String,
    },
}

impl ConnectError {
    /// Whether the backend is to blame (so trying another one makes sense).
    pub fn is_backend(&self) -> bool {
        matches!(self, ConnectError::Backend { .. })
    }
}

/// Connects to `backend` through `connector` within `timeout`, and reports the outcome to
/// `set`: a success clears the backend's failure streak; a failure of the backend counts
/// and may eject it; a local shortage blames nobody.
pub async fn connect<C: Connect>(
    connector: &C,
    set: &BackendSet,
    backend: &Backend,
    timeout: Duration,
) -> Result<C::Stream, ConnectError> {
    let (failure, error) = match tokio::time::timeout(timeout, connector.connect(backend.addr()))
        .await
    {
        Ok(Ok(stream)) => {
            set.connect_succeeded(backend);
            return Ok(stream);
        }
        Ok(Err(e)) if is_local_shortage(&e) => {
            tracing::warn!(backend = backend.name(), error = %e, "cannot connect to a backend: out of local resources");
            return Err(ConnectError::Local(e));
        }
        Ok(Err(e)) if is_refused(&e) => (ConnectFailure::Refused, e.to_string()),
        Ok(Err(e)) => (ConnectFailure::Other, e.to_string()),
        Err(_) => (
            ConnectFailure::Timeout,
            format!("no answer within {timeout:?}"),
        ),
    };
    report_failure(set, backend, failure, &error);
    Err(ConnectError::Backend { failure, error })
}

/// Reports a failure of `backend` to `set` (which counts it and may eject the backend),
/// and logs it: what [`connect`] does on a failed connect, and h2 mode's pool on a failed
/// HTTP/2 handshake.
pub fn report_failure(set: &BackendSet, backend: &Backend, failure: ConnectFailure, error: &str) {
    let ejected = set.connect_failed(backend, failure, error, Instant::now());
    tracing::warn!(backend = backend.name(), error = %error, ejected_for = ?ejected, "connect to backend failed");
}

/// Whether nothing listens at the backend's address: TCP's connection refused, and for a
/// Unix socket path also a missing socket file (a worker that is down or not yet bound;
/// its file is removed when it stops).
pub fn is_refused(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
    )
}

/// Whether a connect failed for want of local resources rather than because of the backend.
pub fn is_local_shortage(e: &io::Error) -> bool {
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

/// A connector for tests of both modes: its backends are in-memory pipes; some addresses
/// refuse, some never answer, or every connect fails with a local shortage; the rest hand
/// the test their far end.
#[cfg(test)]
pub(crate) mod scripted {
    use std::io;
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};

    use tokio::io::DuplexStream;

    use super::Connect;
    use crate::backend::BackendAddr;

    /// The connector; clones share one script.
    #[derive(Clone, Default)]
    pub(crate) struct Scripted(pub(crate) Arc<Script>);

    /// What each address does, and what happened.
    #[derive(Default)]
    pub(crate) struct Script {
        /// Addresses that refuse.
        pub(crate) refuse: Vec<SocketAddr>,
        /// Addresses that never answer (a firewalled or hung host).
        pub(crate) hang: Vec<SocketAddr>,
        /// Every connect fails with EMFILE.
        pub(crate) out_of_fds: bool,
        /// Every connect tried, in order.
        pub(crate) attempts: Mutex<Vec<SocketAddr>>,
        /// The far ends of the connections made, for the test to play the backend.
        pub(crate) far_ends: Mutex<Vec<DuplexStream>>,
    }

    impl Connect for Scripted {
        type Stream = DuplexStream;

        async fn connect(&self, addr: &BackendAddr) -> io::Result<DuplexStream> {
            let Some(addr) = addr.tcp() else {
                return Err(io::ErrorKind::Unsupported.into());
            };
            self.0.attempts.lock().expect("lock").push(addr);
            if self.0.out_of_fds {
                return Err(io::Error::from_raw_os_error(if cfg!(windows) {
                    10024
                } else {
                    24
                }));
            }
            if self.0.refuse.contains(&addr) {
                return Err(io::ErrorKind::ConnectionRefused.into());
            }
            if self.0.hang.contains(&addr) {
                std::future::pending::<()>().await;
            }
            let (near, far) = tokio::io::duplex(64 * 1024);
            self.0.far_ends.lock().expect("lock").push(far);
            Ok(near)
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixListener;

    use super::*;

    #[tokio::test]
    async fn a_unix_socket_backend_is_reached_and_a_missing_one_refuses() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("w0.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let addr = BackendAddr::Unix(path.clone());
        let (client, server) = tokio::join!(SocketConnect.connect(&addr), listener.accept());
        let (mut client, (mut server, _)) = (client.expect("connect"), server.expect("accept"));
        client.write_all(b"ping").await.expect("write");
        let mut got = [0; 4];
        server.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"ping");

        let gone = BackendAddr::Unix(dir.path().join("nobody.sock"));
        let e = SocketConnect
            .connect(&gone)
            .await
            .expect_err("no socket file");
        assert!(is_refused(&e), "{e}");
        // A socket file nobody listens on any more (a worker killed before it cleaned up).
        drop(listener);
        let e = SocketConnect
            .connect(&addr)
            .await
            .expect_err("stale socket");
        assert!(is_refused(&e), "{e}");
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn an_abstract_socket_backend_is_reached() {
        let name = format!("portshare-test-{}", std::process::id());
        let listener = UnixListener::bind(format!("\0{name}")).expect("bind");
        let addr = BackendAddr::UnixAbstract(name);
        let (client, server) = tokio::join!(SocketConnect.connect(&addr), listener.accept());
        assert!(client.is_ok() && server.is_ok());
    }
}
