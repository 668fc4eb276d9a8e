//! h2 mode: HTTP/2 is terminated and every gRPC call is balanced on its own, so even one
//! long-lived client channel uses every worker. Per call: shed if too many are in flight,
//! pick a backend (p2c over calls in flight), take its pooled connection, and stream
//! headers, messages and trailers through unchanged. A call that cannot be placed gets a
//! Trailers-Only UNAVAILABLE, never an HTTP error. A call is retried on another backend only
//! when the first certainly never saw it (connect failed, or its connection refused the
//! stream before sending anything).

mod call;
pub mod methods;
pub mod pool;
mod reset;
mod upload;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use metrics::{counter, gauge};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::access_log::AccessLog;
use crate::backend::BackendSet;
use crate::balance::{Balance, Balancer};
use crate::connect::SocketConnect;
use crate::metrics as m;
use crate::tls::Tls;
use call::InFlight;
use methods::{METHOD_LIMIT, Methods};
use pool::{Pool, PoolConfig};

/// The HTTP/2 connection preface every h2 client sends first.
pub(crate) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A client that has not sent the first bytes of its preface by then is dropped, so silent
/// connections cannot pile up before HTTP/2 even starts.
const PREFACE_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of h2 mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct H2Config {
    /// Streams one client connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_concurrent_streams: u32,
    /// Largest header block accepted, from clients and backends.
    pub max_header_list_size: u32,
    /// Calls in flight across the whole proxy; the excess is shed at once with
    /// RESOURCE_EXHAUSTED instead of queueing without bound.
    pub max_calls: usize,
    /// Backends tried for one call (only when the earlier ones certainly never saw it).
    pub attempts: usize,
    /// Flow-control window per stream, both sides.
    pub stream_window: u32,
    /// Flow-control window per connection, both sides.
    pub connection_window: u32,
    /// How long a connect to a backend may take.
    pub connect_timeout: Duration,
    /// How long a call may wait for a backend that can take it (none ready, or all at
    /// their cap) before it ends UNAVAILABLE; a call's own deadline ends the wait sooner.
    pub queue_timeout: Duration,
    /// Calls in flight one backend may have; beyond it, calls wait for a free one. `None`:
    /// no cap.
    pub max_calls_per_backend: Option<usize>,
}

/// The h2-mode proxy, shared by every connection.
#[derive(Debug)]
pub struct H2Proxy {
    /// A reload may replace it: new connections and calls take the new one.
    config: ArcSwap<H2Config>,
    backends: Arc<BackendSet>,
    balancer: Balancer,
    /// Backend connections, one pool per data-path thread: a call uses its own thread's.
    pools: Box<[Pool]>,
    /// Calls in flight, against `max_calls`.
    in_flight: InFlight,
    /// Per-call metric handles.
    metrics: CallMetrics,
    /// Per-method metric handles.
    methods: Methods,
    /// Where each call's line goes, if anywhere.
    access_log: Option<Arc<AccessLog>>,
}

/// The backend connections' part of `config`.
fn pool_config(config: &H2Config) -> PoolConfig {
    PoolConfig {
        connect_timeout: config.connect_timeout,
        stream_window: config.stream_window,
        connection_window: config.connection_window,
        max_header_list_size: config.max_header_list_size,
    }
}

/// What the first bytes of a connection say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Opening {
    /// The HTTP/2 preface (so far).
    Http2,
    /// Looks like an HTTP/1.x request line.
    Http1,
    /// Anything else, or nothing.
    Other,
}

/// How many opening bytes [`classify`] decides on.
pub(crate) const SNIFF_LEN: usize = 4;

/// Classifies the first bytes of a connection: `None` while they are fewer than
/// [`SNIFF_LEN`] and could still open either the HTTP/2 preface or an HTTP/1.x request, so
/// more must be read. Once decided, more bytes never change the answer.
pub(crate) fn classify(opening: &[u8]) -> Option<Opening> {
    const HTTP1_METHODS: [&[u8; SNIFF_LEN]; 9] = [
        b"GET ", b"POST", b"PUT ", b"HEAD", b"DELE", b"OPTI", b"PATC", b"CONN", b"TRAC",
    ];
    let seen = &opening[..opening.len().min(SNIFF_LEN)];
    let could_be = |start: &[u8]| start.starts_with(seen);
    if seen.len() < SNIFF_LEN {
        let undecided = could_be(PREFACE) || HTTP1_METHODS.iter().any(|m| could_be(&m[..]));
        return (!undecided).then_some(Opening::Other);
    }
    Some(if seen == &PREFACE[..SNIFF_LEN] {
        Opening::Http2
    } else if HTTP1_METHODS.iter().any(|m| &m[..] == seen) {
        Opening::Http1
    } else {
        Opening::Other
    })
}

/// Peeks at the first bytes without consuming them.
async fn sniff(stream: &TcpStream) -> Opening {
    let look = async {
        let mut buf = [0u8; SNIFF_LEN];
        loop {
            let n = match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return Opening::Other,
                Ok(n) => n,
            };
            if let Some(opening) = classify(&buf[..n]) {
                return opening;
            }
            // Fewer than 4 bytes so far, and they could still open either protocol.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(PREFACE_TIMEOUT, look)
        .await
        .unwrap_or(Opening::Other)
}

/// The answer an HTTP/1.x client gets before the connection closes.
const HTTP1_ANSWER: &[u8] = b"HTTP/1.1 505 HTTP Version Not Supported\r\n\
content-type: text/plain; charset=utf-8\r\nconnection: close\r\ncontent-length: 86\r\n\r\n\
portshare (h2 mode) speaks HTTP/2 only: use a gRPC client or HTTP/2 prior knowledge.\r\n";

impl H2Proxy {
    /// A proxy over `backends`, serving connections on `threads` data-path threads.
    pub fn new(
        config: H2Config,
        backends: Arc<BackendSet>,
        balancer: Balancer,
        threads: usize,
    ) -> Self {
        let pool = pool_config(&config);
        let pools = (0..threads.max(1))
            .map(|_| Pool::new(pool, SocketConnect))
            .collect();
        Self {
            metrics: CallMetrics {
                in_flight: gauge!(m::CALLS_IN_FLIGHT),
            },
            methods: Methods::new(threads, METHOD_LIMIT),
            access_log: None,
            in_flight: InFlight::new(config.max_calls),
            config: ArcSwap::from_pointee(config),
            backends,
            balancer,
            pools,
        }
    }

    /// New limits, timeouts and balance (a reload): the stream limits and windows apply to
    /// connections opened from now on, the rest to calls that come next.
    pub fn reconfigure(&self, config: H2Config, balance: Balance) {
        for pool in &self.pools {
            pool.reconfigure(pool_config(&config));
        }
        self.in_flight.set_max(config.max_calls);
        self.config.store(Arc::new(config));
        self.balancer.set_kind(balance);
    }

    /// Writes a line for every call to `log`.
    pub fn with_access_log(mut self, log: Option<Arc<AccessLog>>) -> Self {
        self.access_log = log;
        self
    }

    /// The backend connections of the data-path thread this runs on.
    fn pool(&self) -> &Pool {
        &self.pools[crate::threads::current() % self.pools.len()]
    }

    /// Serves one client connection until it closes; on `stop`, sends GOAWAY and lets the
    /// calls in flight finish; on `abort`, closes it.
    pub async fn serve_connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        tls: Option<Arc<Tls>>,
        stop: CancellationToken,
        abort: CancellationToken,
    ) {
        if let Some(tls) = tls {
            // Boxed: the TLS stream and its HTTP/2 connection would otherwise widen every
            // plain connection's task by their size, too.
            Box::pin(async move {
                // ALPN offers only h2, so a TLS client that got this far speaks HTTP/2.
                if let Some(stream) = tls.accept(stream).await {
                    self.serve_http2(stream, peer, stop, abort).await;
                }
            })
            .await;
            return;
        }
        match sniff(&stream).await {
            Opening::Http2 => {}
            Opening::Http1 => {
                tracing::debug!(%peer, "HTTP/1.x request on the h2 listener: answered 505");
                let mut stream = stream;
                let _ = stream.write_all(HTTP1_ANSWER).await;
                let _ = stream.shutdown().await;
                counter!(m::CONNECTIONS_FAILED, "side" => "client", "reason" => "http1")
                    .increment(1);
                return;
            }
            Opening::Other => {
                tracing::debug!(%peer, "not HTTP/2: connection closed");
                counter!(m::CONNECTIONS_FAILED, "side" => "client", "reason" => "not_http2")
                    .increment(1);
                return;
            }
        }
        self.serve_http2(stream, peer, stop, abort).await;
    }

    /// Serves HTTP/2 on an established connection (plain or TLS): one task per client
    /// connection drives it and polls every call on it.
    async fn serve_http2<S>(
        self: Arc<Self>,
        stream: S,
        peer: SocketAddr,
        stop: CancellationToken,
        abort: CancellationToken,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let mut builder = h2::server::Builder::new();
        {
            let config = self.config.load();
            builder
                .max_concurrent_streams(config.max_concurrent_streams)
                .max_header_list_size(config.max_header_list_size)
                .initial_window_size(config.stream_window)
                .initial_connection_window_size(config.connection_window);
        }
        // Boxed: the handshake's state would otherwise widen every connection's task for
        // its whole life, although it is done with after the first round trip.
        let handshake = tokio::time::timeout(
            PREFACE_TIMEOUT,
            Box::pin(builder.handshake::<_, Bytes>(stream)),
        );
        let mut conn = tokio::select! {
            r = handshake => match r {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "HTTP/2 handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "no HTTP/2 handshake within {PREFACE_TIMEOUT:?}");
                    return;
                }
            },
            () = abort.cancelled() => return,
        };
        let proxy: &H2Proxy = &self;
        let mut calls = FuturesUnordered::new();
        let stopped = stop.cancelled();
        let aborted = abort.cancelled();
        tokio::pin!(stopped, aborted);
        let mut stopping = false;
        loop {
            // Calls first: what they wrote is then flushed by the connection's poll below,
            // in the same turn.
            tokio::select! {
                biased;
                () = &mut aborted => return,
                () = &mut stopped, if !stopping => {
                    // GOAWAY the two-step way (first the maximum stream id, then the real
                    // last one), then the calls in flight finish.
                    stopping = true;
                    conn.graceful_shutdown();
                }
                Some(()) = calls.next(), if !calls.is_empty() => {}
                accepted = conn.accept() => match accepted {
                    // Boxed: the set keeps a stub slot of its futures' type for its whole
                    // life, which would otherwise make every idle connection a call's
                    // future bigger.
                    Some(Ok((req, respond))) => calls.push(Box::pin(proxy.call(req, respond, peer))),
                    Some(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "client connection ended with an error");
                        break;
                    }
                    None => break,
                },
            }
        }
        // The connection is gone: what is left of its calls ends at once.
        tokio::select! {
            () = async { while calls.next().await.is_some() {} } => {}
            () = &mut aborted => {}
        }
    }
}

/// Metric handles used on every call, registered once.
#[derive(Debug, Clone)]
struct CallMetrics {
    in_flight: metrics::Gauge,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::Balance;

    /// An idle client connection holds this future; the TLS path must not widen it.
    #[tokio::test]
    async fn a_connection_task_stays_small() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let second = Duration::from_secs(1);
        let proxy = Arc::new(H2Proxy::new(
            H2Config {
                max_concurrent_streams: 100,
                max_header_list_size: 16 * 1024,
                max_calls: 100,
                attempts: 1,
                stream_window: 65_535,
                connection_window: 65_535,
                connect_timeout: second,
                queue_timeout: second,
                max_calls_per_backend: None,
            },
            BackendSet::empty(),
            Balancer::new(Balance::P2c),
            1,
        ));
        let token = CancellationToken::new();
        let task = proxy.serve_connection(client, addr, None, token.clone(), token);
        let size = std::mem::size_of_val(&task);
        eprintln!("h2 connection task: {size} bytes");
        assert!(size <= 3072, "an h2 connection's task is {size} bytes");
    }
}
