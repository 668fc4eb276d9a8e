//! h2 mode: HTTP/2 is terminated and every gRPC call is balanced on its own, so even one
//! long-lived client channel uses every worker. Per call: shed if too many are in flight,
//! pick a backend (p2c over calls in flight), take its pooled connection, and stream
//! headers, messages and trailers through unchanged. A call that cannot be placed gets a
//! Trailers-Only UNAVAILABLE, never an HTTP error. A call is retried on another backend only
//! when the first certainly never saw it (connect failed, or its connection refused the
//! stream before sending anything).

pub mod grpc;
pub mod pool;
pub mod replay;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use metrics::{counter, gauge, histogram};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backend::{ActiveGuard, Backend, BackendSet, ConnectFailure, Tried};
use crate::balance::Balancer;
use crate::metrics as m;
use crate::tls::Tls;
use grpc::Code;
use pool::{Pool, PoolConfig, PoolError};
use replay::Replay;

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
    config: H2Config,
    backends: Arc<BackendSet>,
    balancer: Balancer,
    pool: Pool,
    /// Permits for calls in flight.
    calls: Arc<Semaphore>,
    /// Per-call metric handles.
    metrics: CallMetrics,
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
    /// A proxy over `backends`.
    pub fn new(config: H2Config, backends: Arc<BackendSet>, balancer: Balancer) -> Self {
        let pool = Pool::new(PoolConfig {
            connect_timeout: config.connect_timeout,
            stream_window: config.stream_window,
            connection_window: config.connection_window,
            max_header_list_size: config.max_header_list_size,
        });
        Self {
            metrics: CallMetrics {
                in_flight: gauge!(m::CALLS_IN_FLIGHT),
                duration: histogram!(m::CALL_DURATION_SECONDS),
            },
            calls: Arc::new(Semaphore::new(config.max_calls)),
            config,
            backends,
            balancer,
            pool,
        }
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

    /// Serves HTTP/2 on an established connection (plain or TLS).
    async fn serve_http2<S>(
        self: Arc<Self>,
        stream: S,
        peer: SocketAddr,
        stop: CancellationToken,
        abort: CancellationToken,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let proxy = Arc::clone(&self);
        let service = service_fn(move |req| {
            let proxy = Arc::clone(&proxy);
            async move { Ok::<_, Infallible>(proxy.call(req).await) }
        });
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(self.config.max_concurrent_streams)
            .max_header_list_size(self.config.max_header_list_size)
            .initial_stream_window_size(self.config.stream_window)
            .initial_connection_window_size(self.config.connection_window)
            .adaptive_window(false)
            // Headers pass through unchanged: no `date` added to the backend's response.
            .auto_date_header(false)
            .serve_connection(TokioIo::new(stream), service);
        tokio::pin!(conn);
        let result = tokio::select! {
            r = conn.as_mut() => r,
            () = stop.cancelled() => {
                // GOAWAY the two-step way (hyper/h2: first the maximum stream id, then the
                // real last one), then let the calls in flight finish.
                conn.as_mut().graceful_shutdown();
                tokio::select! {
                    r = conn.as_mut() => r,
                    () = abort.cancelled() => Ok(()),
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "client connection ended with an error");
        }
    }

    /// Places one call.
    async fn call(self: Arc<Self>, req: Request<Incoming>) -> Response<CallBody> {
        let started = Instant::now();
        let Ok(permit) = Arc::clone(&self.calls).try_acquire_owned() else {
            counter!(m::CALLS_SHED).increment(1);
            return self.finish_early(
                None,
                started,
                Code::ResourceExhausted,
                "portshare: too many calls in flight",
            );
        };
        let deadline = grpc::timeout(req.headers()).map(|t| started + t);
        let (parts, body) = req.into_parts();
        let replay = Replay::new(body);
        // The request as first sent, or as handed back unsent by a connection.
        let mut unsent = None;
        // A refused call is sent again at most once.
        let mut replayed = false;
        let mut tried = Tried::new();
        let mut last = String::from("no backend is ready");
        let queue_until = started + self.config.queue_timeout;
        let wait_until = deadline.map_or(queue_until, |d| d.min(queue_until));
        let cap = self.config.max_calls_per_backend;
        for attempt in 0..self.config.attempts {
            let guard = match self
                .backends
                .pick_or_wait(&self.balancer, &tried, cap, wait_until)
                .await
            {
                Ok(guard) => guard,
                Err(unplaced) => {
                    let waited = format!("{:.1?}", unplaced.waited);
                    let (code, why) = if deadline.is_some_and(|d| d <= queue_until) {
                        (Code::DeadlineExceeded, "deadline exceeded")
                    } else {
                        (Code::Unavailable, "no backend could take the call")
                    };
                    let detail = if tried.is_empty() {
                        unplaced.why
                    } else {
                        format!("{}; last: {last}", unplaced.why)
                    };
                    return self.finish_early(
                        None,
                        started,
                        code,
                        &format!("portshare: {why} after waiting {waited} ({detail})"),
                    );
                }
            };
            let backend = Arc::clone(guard.backend());
            if attempt > 0 {
                counter!(m::CALL_RETRIES).increment(1);
            }
            tried.add(&backend);
            let Some(got) = by_deadline(deadline, self.pool.get(&backend)).await else {
                return self.finish_early(
                    Some(&backend),
                    started,
                    Code::DeadlineExceeded,
                    "portshare: deadline exceeded while connecting to a backend",
                );
            };
            let mut send = match got {
                Ok((send, fresh)) => {
                    if fresh {
                        self.backends.connect_succeeded(&backend);
                    }
                    send
                }
                Err(e) => {
                    let failure = match &e {
                        PoolError::Connect(io)
                            if io.kind() == std::io::ErrorKind::ConnectionRefused =>
                        {
                            ConnectFailure::Refused
                        }
                        PoolError::Timeout(_) => ConnectFailure::Timeout,
                        _ => ConnectFailure::Other,
                    };
                    let text = e.to_string();
                    let ejected =
                        self.backends
                            .connect_failed(&backend, failure, &text, Instant::now());
                    tracing::warn!(backend = backend.name(), error = %text, ejected_for = ?ejected, "connect to backend failed");
                    last = format!("{}: {text}", backend.name());
                    continue;
                }
            };
            let req = unsent.take().unwrap_or_else(|| {
                let mut r = Request::new(replay.body());
                *r.method_mut() = parts.method.clone();
                *r.uri_mut() = parts.uri.clone();
                *r.version_mut() = parts.version;
                *r.headers_mut() = parts.headers.clone();
                r
            });
            // Dropping the request on the deadline resets the backend's stream.
            let Some(result) = by_deadline(deadline, send.try_send_request(req)).await else {
                return self.finish_early(
                    Some(&backend),
                    started,
                    Code::DeadlineExceeded,
                    "portshare: deadline exceeded waiting for the backend",
                );
            };
            match result {
                Ok(resp) => return self.respond(resp, guard, permit, started),
                Err(mut e) => match e.take_message() {
                    Some(back) => {
                        // The connection would not take the stream (e.g. after a GOAWAY): the
                        // backend never saw the call, which is still whole.
                        self.pool.invalidate(&backend).await;
                        last = format!("{}: {}", backend.name(), e.error());
                        unsent = Some(back);
                        continue;
                    }
                    None if !replayed
                        && grpc::never_processed(e.error())
                        && replay.can_replay() =>
                    {
                        // Refused unprocessed (REFUSED_STREAM, or beyond a GOAWAY's last
                        // stream), and all it was sent is recorded: once more, elsewhere.
                        replayed = true;
                        // REFUSED_STREAM concerns one stream; only a GOAWAY retires the
                        // connection (which hyper then no longer offers as ready).
                        tracing::debug!(backend = backend.name(), error = %e.error(), "backend refused the call unprocessed; sending it elsewhere");
                        last = format!("{}: {}", backend.name(), e.error());
                        continue;
                    }
                    None => {
                        let err = e.into_error();
                        let code = grpc::code_for(&err);
                        tracing::debug!(backend = backend.name(), error = %err, detail = ?err, "backend failed the call");
                        return self.finish_early(
                            Some(&backend),
                            started,
                            code,
                            &format!(
                                "portshare: backend {} failed the call: {err}",
                                backend.name()
                            ),
                        );
                    }
                },
            }
        }
        self.finish_early(
            None,
            started,
            Code::Unavailable,
            &format!("portshare: no backend could take the call ({last})"),
        )
    }

    /// Ends a call with a Trailers-Only status of the proxy's own, counting it against
    /// `backend` when one was involved.
    fn finish_early(
        &self,
        backend: Option<&Backend>,
        started: Instant,
        code: Code,
        message: &str,
    ) -> Response<CallBody> {
        match backend {
            Some(b) => {
                b.count_call(code.as_u32());
                self.metrics
                    .duration
                    .record(started.elapsed().as_secs_f64());
            }
            None => record_unplaced(code.as_u32(), started),
        }
        grpc::trailers_only(code, message)
    }

    /// Streams the backend's response back, keeping the call counted until it ends.
    fn respond(
        &self,
        resp: Response<Incoming>,
        guard: ActiveGuard,
        permit: OwnedSemaphorePermit,
        started: Instant,
    ) -> Response<CallBody> {
        // A Trailers-Only answer has its status in the headers.
        let status = grpc::status(resp.headers());
        let (parts, body) = resp.into_parts();
        self.metrics.in_flight.increment(1.0);
        let body = CallBody {
            inner: Some(body),
            call: Some(Call {
                metrics: self.metrics.clone(),
                guard,
                _permit: permit,
                started,
                status,
            }),
        };
        Response::from_parts(parts, body)
    }
}

/// Runs `f`, bounded by the call's deadline when it has one; `None` once the deadline passed.
async fn by_deadline<F: std::future::Future>(deadline: Option<Instant>, f: F) -> Option<F::Output> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, f).await.ok(),
        None => Some(f.await),
    }
}

/// Counts a call that was answered without a backend.
fn record_unplaced(status: u32, started: Instant) {
    counter!(m::CALLS, "backend" => "none", "grpc_status" => status.to_string()).increment(1);
    histogram!(m::CALL_DURATION_SECONDS).record(started.elapsed().as_secs_f64());
}

/// A call in flight: released (and counted) when its response body ends or is dropped.
#[derive(Debug)]
struct Call {
    /// Counts the call against its backend (p2c reads that).
    guard: ActiveGuard,
    /// Where the call is counted when it ends.
    metrics: CallMetrics,
    /// Counts it against the proxy-wide limit.
    _permit: OwnedSemaphorePermit,
    started: Instant,
    /// The gRPC status, once seen.
    status: Option<u32>,
}

impl Drop for Call {
    fn drop(&mut self) {
        self.metrics.in_flight.decrement(1.0);
        // No status seen: the client went away (or the backend vanished) mid-call.
        let status = self.status.unwrap_or(Code::Cancelled.as_u32());
        self.guard.backend().count_call(status);
        self.metrics
            .duration
            .record(self.started.elapsed().as_secs_f64());
    }
}

/// Metric handles used on every call, registered once.
#[derive(Debug, Clone)]
struct CallMetrics {
    in_flight: metrics::Gauge,
    duration: metrics::Histogram,
}

/// A response body: the backend's, passed through frame by frame, or nothing (Trailers-Only).
#[derive(Debug, Default)]
pub struct CallBody {
    inner: Option<Incoming>,
    call: Option<Call>,
}

impl Body for CallBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match ready!(Pin::new(inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let (Some(t), Some(call)) = (frame.trailers_ref(), this.call.as_mut()) {
                    call.status = grpc::status(t);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                // The backend failed mid-call (reset, or its connection died): end the call
                // with the matching gRPC status rather than a bare reset.
                this.inner = None;
                let code = grpc::code_for(&e);
                let backend = this
                    .call
                    .as_ref()
                    .map(|c| c.guard.backend().name().to_owned())
                    .unwrap_or_default();
                if let Some(call) = this.call.as_mut() {
                    call.status = Some(code.as_u32());
                }
                this.call = None;
                let message = format!("portshare: backend {backend} failed mid-call: {e}");
                Poll::Ready(Some(Ok(Frame::trailers(grpc::status_trailers(
                    code, &message,
                )))))
            }
            None => {
                this.inner = None;
                this.call = None;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
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
        ));
        let token = CancellationToken::new();
        let task = proxy.serve_connection(client, addr, None, token.clone(), token);
        let size = std::mem::size_of_val(&task);
        eprintln!("h2 connection task: {size} bytes");
        assert!(size <= 3072, "an h2 connection's task is {size} bytes");
    }
}
