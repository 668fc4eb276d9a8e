//! Pooled HTTP/2 connections to the backends: one multiplexed connection per backend, opened
//! on first use with one driver task, and replaced when it closes or stops taking streams
//! (after a backend's GOAWAY, the old streams finish on the old connection while new calls
//! get a fresh one). No keep-alive pings: grpcio answers frequent pings with GOAWAY
//! "too_many_pings", and a dead connection shows itself on the next call anyway.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use h2::client::{Builder, SendRequest};
use tokio::sync::Mutex;

use crate::backend::{Backend, BackendSet, ConnectFailure};
use crate::connect::{self, Connect, ConnectError, SocketConnect};

/// HTTP/2 settings of the backend connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    /// How long a connect may take.
    pub connect_timeout: Duration,
    /// Per-stream flow-control window; large enough that a big message is not throttled
    /// by window updates on a fast local link.
    pub stream_window: u32,
    /// Per-connection window: several large streams at once.
    pub connection_window: u32,
    /// Largest header block accepted from a backend.
    pub max_header_list_size: u32,
}

/// Why no connection could be had. Either way it has been reported to the backend set
/// (a local shortage blames no backend).
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The connect failed.
    #[error("connect: {0}")]
    Connect(#[from] ConnectError),
    /// The HTTP/2 handshake failed.
    #[error("HTTP/2 handshake: {0}")]
    Handshake(#[source] h2::Error),
}

/// One open connection: the handle calls open streams with, and whether its driver task
/// has ended (the connection is gone; the handle would only answer with errors).
#[derive(Debug, Clone)]
struct Conn {
    send: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

/// One backend's connection slot.
#[derive(Debug, Default)]
struct Slot {
    /// The current connection, if any: read on every call, so a plain read lock.
    current: std::sync::RwLock<Option<Conn>>,
    /// Held across a connect, so callers that arrive meanwhile wait for that one connection
    /// instead of opening their own.
    connecting: Mutex<()>,
}

impl Slot {
    /// The current connection while it is open.
    fn ready(&self) -> Option<SendRequest<Bytes>> {
        let current = self.current.read().unwrap_or_else(PoisonError::into_inner);
        current
            .as_ref()
            .filter(|c| !c.closed.load(Ordering::Acquire))
            .map(|c| c.send.clone())
    }

    fn set(&self, conn: Option<Conn>) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = conn;
    }
}

/// Connections to every backend, opened through `C` (TCP but in tests).
#[derive(Debug)]
pub struct Pool<C = SocketConnect> {
    /// Read at each connect; a reload may replace it (open connections keep theirs).
    config: std::sync::Mutex<PoolConfig>,
    connector: C,
    /// One slot per backend, by backend id (an address can come back as another backend).
    /// Made on a backend's first call; read on every call, so a plain read lock.
    slots: RwLock<HashMap<u64, Entry>>,
}

/// A backend's slot, with the backend itself held weakly so that a slot whose backend left
/// the set can be told apart and dropped.
type Entry = (Weak<Backend>, Arc<Slot>);

impl<C: Connect> Pool<C> {
    /// An empty pool; backends get their slot on first use.
    pub fn new(config: PoolConfig, connector: C) -> Self {
        Self {
            config: std::sync::Mutex::new(config),
            connector,
            slots: RwLock::default(),
        }
    }

    /// Settings for the connections opened from now on.
    pub fn reconfigure(&self, config: PoolConfig) {
        *self.config.lock().unwrap_or_else(PoisonError::into_inner) = config;
    }

    /// `backend`'s slot, made on first use. Slots of backends that left the set go then
    /// (dropping the last handle of a connection closes it once its streams are done).
    fn slot(&self, backend: &Arc<Backend>) -> Arc<Slot> {
        let read = self.slots.read().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, slot)) = read.get(&backend.id()) {
            return Arc::clone(slot);
        }
        drop(read);
        let mut slots = self.slots.write().unwrap_or_else(PoisonError::into_inner);
        slots.retain(|_, (b, _)| b.upgrade().is_some_and(|b| !b.is_retired()));
        let (_, slot) = slots
            .entry(backend.id())
            .or_insert_with(|| (Arc::downgrade(backend), Arc::new(Slot::default())));
        Arc::clone(slot)
    }

    /// An open connection to `backend`, opened now if it has none; the outcome of a connect
    /// is reported to `set`. The handle may still find the connection gone (or going away)
    /// when a stream is opened: then [`Pool::invalidate`] and ask again.
    pub async fn get(
        &self,
        set: &BackendSet,
        backend: &Arc<Backend>,
    ) -> Result<SendRequest<Bytes>, PoolError> {
        let slot = self.slot(backend);
        if let Some(c) = slot.ready() {
            return Ok(c);
        }
        let _connecting = slot.connecting.lock().await;
        // Someone may have connected while this call waited.
        if let Some(c) = slot.ready() {
            return Ok(c);
        }
        // Boxed: a connect's state (TCP connect, HTTP/2 handshake) would otherwise size
        // every call's future.
        let fresh = Box::pin(self.connect(set, backend)).await?;
        let send = fresh.send.clone();
        slot.set(Some(fresh));
        Ok(send)
    }

    /// Forgets `backend`'s connection (it refused a stream), so the next call opens a new one.
    pub fn invalidate(&self, backend: &Backend) {
        let slots = self.slots.read().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, slot)) = slots.get(&backend.id()) {
            slot.set(None);
        }
    }

    async fn connect(&self, set: &BackendSet, backend: &Backend) -> Result<Conn, PoolError> {
        let config = *self.config.lock().unwrap_or_else(PoisonError::into_inner);
        let stream =
            connect::connect(&self.connector, set, backend, config.connect_timeout).await?;
        let handshake = Builder::new()
            .initial_window_size(config.stream_window)
            .initial_connection_window_size(config.connection_window)
            .max_header_list_size(config.max_header_list_size)
            // Streams beyond the backend's limit wait in h2's queue for a free one.
            .initial_max_send_streams(INITIAL_MAX_SEND_STREAMS)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .enable_push(false)
            .handshake::<_, Bytes>(stream)
            .await;
        let (send, conn) = match handshake {
            Ok(handshaken) => handshaken,
            Err(e) => {
                let error = format!("HTTP/2 handshake: {e}");
                connect::report_failure(set, backend, ConnectFailure::Other, &error);
                return Err(PoolError::Handshake(e));
            }
        };
        let closed = Arc::new(AtomicBool::new(false));
        let name = backend.name().to_owned();
        let ended = Arc::clone(&closed);
        // The driver: reads and writes the connection for every stream on it; ends when the
        // connection closes, or once no handle and no stream is left.
        tokio::spawn(async move {
            let result = conn.await;
            ended.store(true, Ordering::Release);
            match result {
                Ok(()) => tracing::debug!(backend = name, "backend connection closed"),
                Err(e) => tracing::debug!(backend = name, error = %e, "backend connection failed"),
            }
        });
        tracing::debug!(
            backend = backend.name(),
            "opened an HTTP/2 connection to the backend"
        );
        Ok(Conn { send, closed })
    }
}

/// Streams opened before the backend's SETTINGS say how many it takes (h2's default too).
const INITIAL_MAX_SEND_STREAMS: usize = 100;

/// Data a connection buffers per stream beyond what flow control lets out: a message in
/// flight, not a queue.
const MAX_SEND_BUFFER: usize = 1024 * 1024;

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::time::Instant;

    use super::*;
    use crate::backend::{BackendSpec, EjectionConfig, Thresholds};
    use crate::connect::scripted::{Script, Scripted};

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn pool(ports: &[u16], script: Script) -> (Pool<Scripted>, Arc<BackendSet>, Scripted) {
        let specs = ports.iter().map(|p| BackendSpec {
            name: addr(*p).to_string(),
            addr: addr(*p).into(),
            worker: None,
        });
        let set = Arc::new(BackendSet::new(
            specs,
            EjectionConfig {
                base_time: Duration::from_secs(5),
                max_time: Duration::from_secs(60),
            },
            Thresholds {
                healthy: 2,
                unhealthy: 3,
            },
        ));
        let connector = Scripted(Arc::new(script));
        let config = PoolConfig {
            connect_timeout: Duration::from_secs(1),
            stream_window: 65_535,
            connection_window: 65_535,
            max_header_list_size: 16 * 1024,
        };
        (Pool::new(config, connector.clone()), set, connector)
    }

    #[tokio::test]
    async fn a_local_shortage_blames_no_backend() {
        let script = Script {
            out_of_fds: true,
            ..Script::default()
        };
        let (pool, set, _) = pool(&[1, 2], script);
        let backend = Arc::clone(&set.snapshot()[0]);
        let err = pool.get(&set, &backend).await.expect_err("out of fds");
        assert!(
            matches!(err, PoolError::Connect(ConnectError::Local(_))),
            "{err}"
        );
        assert!(!backend.is_ejected(Instant::now()));
        assert_eq!(set.usable(Instant::now()), 2);
    }

    #[tokio::test]
    async fn a_refused_connect_ejects_the_backend() {
        let script = Script {
            refuse: vec![addr(1)],
            ..Script::default()
        };
        let (pool, set, _) = pool(&[1, 2], script);
        let backend = Arc::clone(&set.snapshot()[0]);
        let err = pool.get(&set, &backend).await.expect_err("refused");
        assert!(
            matches!(
                err,
                PoolError::Connect(ConnectError::Backend {
                    failure: ConnectFailure::Refused,
                    ..
                })
            ),
            "{err}"
        );
        assert!(backend.is_ejected(Instant::now()));
        assert_eq!(set.usable(Instant::now()), 1);
    }

    #[tokio::test]
    async fn one_connection_serves_every_call_until_it_closes() {
        let (pool, set, conn) = pool(&[1], Script::default());
        let backend = Arc::clone(&set.snapshot()[0]);
        let opened = pool.get(&set, &backend);
        let answered = async {
            // Plays the backend: the far end of the first connection speaks HTTP/2.
            loop {
                let far = conn.0.far_ends.lock().expect("lock").pop();
                if let Some(far) = far {
                    return h2::server::handshake(far).await.expect("server handshake");
                }
                tokio::task::yield_now().await;
            }
        };
        let (first, mut server) = tokio::join!(opened, answered);
        first.expect("first connection");
        pool.get(&set, &backend).await.expect("pooled");
        assert_eq!(conn.0.attempts.lock().expect("lock").len(), 1);
        // The backend closes the connection: the next call opens a new one.
        server.abrupt_shutdown(h2::Reason::NO_ERROR);
        drop(server);
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            while pool.slot(&backend).ready().is_some() {
                tokio::task::yield_now().await;
            }
        });
        closed.await.expect("the pool sees the connection close");
        let reopened =
            tokio::time::timeout(Duration::from_millis(200), pool.get(&set, &backend)).await;
        // Nobody answers the new connection's handshake here: what counts is the attempt.
        drop(reopened);
        assert_eq!(conn.0.attempts.lock().expect("lock").len(), 2);
    }
}
