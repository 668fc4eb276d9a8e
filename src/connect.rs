//! The one connect path of both modes: connect to a backend within the connect timeout,
//! tell a failure of the backend (refused, no answer, reset) from a shortage here (out of
//! descriptors or ephemeral ports), and report the outcome to the backend set, which counts
//! it and may eject the backend. l4 calls it for every client connection, h2 mode's pool
//! for every backend connection it opens. [`Connect`] is the seam tests script.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::backend::{Backend, BackendSet, ConnectFailure};

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
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            (ConnectFailure::Refused, e.to_string())
        }
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

        async fn connect(&self, addr: SocketAddr) -> io::Result<DuplexStream> {
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
