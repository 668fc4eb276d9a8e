//! Pooled HTTP/2 connections to the backends: one multiplexed connection per backend, opened
//! on first use with one driver task, and replaced when it closes or stops taking streams
//! (after a backend's GOAWAY, the old streams finish on the old connection while new calls
//! get a fresh one). No keep-alive pings: grpcio answers frequent pings with GOAWAY
//! "too_many_pings", and a dead connection shows itself on the next call anyway.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use h2::client::{Builder, SendRequest};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use crate::backend::Backend;

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

/// Why no connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The TCP connect failed.
    #[error("connect: {0}")]
    Connect(#[source] io::Error),
    /// The TCP connect took too long.
    #[error("connect: no answer within {0:?}")]
    Timeout(Duration),
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

/// Connections to every backend.
#[derive(Debug)]
pub struct Pool {
    config: PoolConfig,
    /// One slot per backend, by backend id (an address can come back as another backend).
    /// Made on a backend's first call; read on every call, so a plain read lock.
    slots: RwLock<HashMap<u64, Entry>>,
}

/// A backend's slot, with the backend itself held weakly so that a slot whose backend left
/// the set can be told apart and dropped.
type Entry = (Weak<Backend>, Arc<Slot>);

impl Pool {
    /// An empty pool; backends get their slot on first use.
    pub fn new(config: PoolConfig) -> Self {
        Self {
            config,
            slots: RwLock::default(),
        }
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

    /// An open connection to `backend`; `true` with it when it was opened just now. The
    /// handle may still find the connection gone (or going away) when a stream is opened:
    /// then [`Pool::invalidate`] and ask again.
    pub async fn get(
        &self,
        backend: &Arc<Backend>,
    ) -> Result<(SendRequest<Bytes>, bool), PoolError> {
        let slot = self.slot(backend);
        if let Some(c) = slot.ready() {
            return Ok((c, false));
        }
        let _connecting = slot.connecting.lock().await;
        // Someone may have connected while this call waited.
        if let Some(c) = slot.ready() {
            return Ok((c, false));
        }
        // Boxed: a connect's state (TCP connect, HTTP/2 handshake) would otherwise size
        // every call's future, which is moved into its stream task on every call.
        let fresh = Box::pin(self.connect(backend)).await?;
        let send = fresh.send.clone();
        slot.set(Some(fresh));
        Ok((send, true))
    }

    /// Forgets `backend`'s connection (it refused a stream), so the next call opens a new one.
    pub fn invalidate(&self, backend: &Backend) {
        let slots = self.slots.read().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, slot)) = slots.get(&backend.id()) {
            slot.set(None);
        }
    }

    async fn connect(&self, backend: &Backend) -> Result<Conn, PoolError> {
        let addr = backend.addr();
        let stream = tokio::time::timeout(self.config.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| PoolError::Timeout(self.config.connect_timeout))?
            .map_err(PoolError::Connect)?;
        stream.set_nodelay(true).map_err(PoolError::Connect)?;
        let (send, conn) = Builder::new()
            .initial_window_size(self.config.stream_window)
            .initial_connection_window_size(self.config.connection_window)
            .max_header_list_size(self.config.max_header_list_size)
            // Streams beyond the backend's limit wait in h2's queue for a free one.
            .initial_max_send_streams(INITIAL_MAX_SEND_STREAMS)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .enable_push(false)
            .handshake::<_, Bytes>(stream)
            .await
            .map_err(PoolError::Handshake)?;
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
