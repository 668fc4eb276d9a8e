//! Pooled HTTP/2 connections to the backends: one multiplexed connection per backend, opened
//! on first use with one driver task, and replaced when it closes or stops taking streams
//! (after a backend's GOAWAY, the old streams finish on the old connection while new calls
//! get a fresh one). No keep-alive pings: grpcio answers frequent pings with GOAWAY
//! "too_many_pings", and a dead connection shows itself on the next call anyway.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, PoisonError, RwLock, Weak};
use std::time::Duration;

use hyper::client::conn::http2::{Builder, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use super::replay::ReplayBody;
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
    Handshake(#[source] hyper::Error),
}

/// One backend's connection slot.
#[derive(Debug, Default)]
struct Slot {
    /// The current connection, if any: read on every call, so a plain read lock.
    current: std::sync::RwLock<Option<SendRequest<ReplayBody>>>,
    /// Held across a connect, so callers that arrive meanwhile wait for that one connection
    /// instead of opening their own.
    connecting: Mutex<()>,
}

impl Slot {
    /// The current connection when it can take a stream now.
    fn ready(&self) -> Option<SendRequest<ReplayBody>> {
        let current = self.current.read().unwrap_or_else(PoisonError::into_inner);
        current
            .as_ref()
            .filter(|c| c.is_ready() && !c.is_closed())
            .cloned()
    }

    fn set(&self, conn: Option<SendRequest<ReplayBody>>) {
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

    /// A connection to `backend` that can take a stream now; `true` with it when it was
    /// opened just now.
    pub async fn get(
        &self,
        backend: &Arc<Backend>,
    ) -> Result<(SendRequest<ReplayBody>, bool), PoolError> {
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
        slot.set(Some(fresh.clone()));
        Ok((fresh, true))
    }

    /// Forgets `backend`'s connection (it refused a stream), so the next call opens a new one.
    pub async fn invalidate(&self, backend: &Backend) {
        let slots = self.slots.read().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, slot)) = slots.get(&backend.id()) {
            slot.set(None);
        }
    }

    async fn connect(&self, backend: &Backend) -> Result<SendRequest<ReplayBody>, PoolError> {
        let addr = backend.addr();
        let stream = tokio::time::timeout(self.config.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| PoolError::Timeout(self.config.connect_timeout))?
            .map_err(PoolError::Connect)?;
        stream.set_nodelay(true).map_err(PoolError::Connect)?;
        let (send, conn) = Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(self.config.stream_window)
            .initial_connection_window_size(self.config.connection_window)
            .max_header_list_size(self.config.max_header_list_size)
            .adaptive_window(false)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(PoolError::Handshake)?;
        let name = backend.name().to_owned();
        tokio::spawn(async move {
            match conn.await {
                Ok(()) => tracing::debug!(backend = name, "backend connection closed"),
                Err(e) => tracing::debug!(backend = name, error = %e, "backend connection failed"),
            }
        });
        tracing::debug!(
            backend = backend.name(),
            "opened an HTTP/2 connection to the backend"
        );
        Ok(send)
    }
}
