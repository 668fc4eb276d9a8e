//! The `grpc.health.v1.Health/Check` probe: a minimal gRPC client built directly on
//! hyper's HTTP/2 client, so portshare needs neither tonic nor a protobuf crate for the
//! one tiny call it makes. This file holds the call (connection, request, reading the
//! answer); the wire format itself, the messages' codec included, is [`crate::grpc`]'s.
//!
//! # The call
//! A unary gRPC call is an HTTP/2 `POST` to `/<package>.<Service>/<Method>` with
//! `content-type: application/grpc` and `te: trailers`, its message behind a 5-byte
//! prefix. The outcome travels in the `grpc-status` / `grpc-message` trailers, or in the
//! response headers when the server answers without a body (a "Trailers-Only" response,
//! which is how grpcio reports `UNIMPLEMENTED` or `NOT_FOUND`).
//!
//! # Connections
//! Each [`GrpcProbe`] keeps one plain-text HTTP/2 connection (prior knowledge, no TLS, no
//! upgrade) to its backend and reuses it for every check, opening a new one only when the
//! old one is gone or a check on it failed at the transport level. The connection sends
//! no keep-alive pings and keeps hyper's adaptive window (BDP probing, which also pings)
//! off: grpcio servers answer pings they find too frequent with
//! `GOAWAY too_many_pings`, which would turn every probe into a reconnect.
//!
//! A spawned task drives each connection; it ends when the probe (and with it the
//! connection's only `SendRequest`) is dropped or replaced, or when the connection fails.

use std::io;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http2::{self, SendRequest};
use hyper::header::{CONTENT_TYPE, HeaderMap, HeaderValue, TE, USER_AGENT};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::time::Instant;

use crate::backend::BackendAddr;
use crate::connect::{Connect, SocketConnect};
use crate::grpc::health::{ServingStatus, decode_response_frame, encode_request_frame};
use crate::grpc::{
    self, CONTENT_TYPE_GRPC, Code, GRPC_MESSAGE, GRPC_STATUS, GRPC_TIMEOUT, WireError,
};

/// The method path of the standard health check.
const CHECK_PATH: &str = "/grpc.health.v1.Health/Check";

/// The largest response body accepted. A `HealthCheckResponse` takes a handful of bytes;
/// anything this big is not a health check answer, and capping it keeps a confused or
/// hostile backend from making the prober buffer without bound.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Why a check gave no [`ServingStatus`].
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The connection could not be opened (refused, unreachable, out of descriptors).
    #[error("cannot connect: {0}")]
    Connect(#[source] io::Error),
    /// The whole check (connect included) took longer than the timeout it was given.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The HTTP/2 layer failed: handshake, connection lost, stream reset.
    #[error("HTTP/2: {0}")]
    Http2(#[source] hyper::Error),
    /// The server answered with a non-zero `grpc-status`, e.g. 12 `UNIMPLEMENTED` when the
    /// worker has no health service, or 5 `NOT_FOUND` for a service it does not know. A
    /// non-200 HTTP status is reported here too, translated to a gRPC code the way the
    /// gRPC spec's `http-grpc-status-mapping.md` says (404 becomes `UNIMPLEMENTED`, …).
    #[error("grpc-status {code} ({}){}", grpc::code_name(*.code), message_suffix(.message))]
    Status {
        /// The gRPC status code.
        code: u32,
        /// The `grpc-message`, percent-decoded; empty if the server sent none.
        message: String,
    },
    /// The response broke the gRPC or protobuf wire format (truncated frame or varint,
    /// missing `grpc-status`, a body over the size cap, …).
    #[error("malformed response: {0}")]
    Malformed(String),
    /// The request could not be built; only an absurd service name (over 4 GiB, beyond
    /// what a gRPC frame can carry) gets here.
    #[error("cannot build the request: {0}")]
    Request(String),
}

impl From<WireError> for ProbeError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::TooLarge(_) => Self::Request(e.to_string()),
            WireError::Malformed(what) => Self::Malformed(what),
        }
    }
}

/// `": message"`, or nothing for the empty message grpcio sends with `NOT_FOUND`.
fn message_suffix(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

/// A health-check client for one backend, holding its connection between checks.
#[derive(Debug)]
pub struct GrpcProbe {
    /// The backend checked.
    addr: BackendAddr,
    /// The service name put in the request; empty asks about the server as a whole.
    service: String,
    /// The open connection, if any. `None` before the first check and after one that left
    /// the connection in doubt; the next check then opens a fresh one.
    conn: Option<SendRequest<Full<Bytes>>>,
}

impl GrpcProbe {
    /// A probe for `service` (`""` for the server as a whole) on the backend at `addr`.
    /// Connects lazily, on the first [`check`](Self::check).
    pub fn new(addr: impl Into<BackendAddr>, service: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            service: service.into(),
            conn: None,
        }
    }

    /// One check, bounded by `timeout` as a whole (connect + call).
    ///
    /// Reuses the connection from the previous check when it is still open. Never panics
    /// on anything the backend sends.
    pub async fn check(&mut self, timeout: Duration) -> Result<ServingStatus, ProbeError> {
        let started = Instant::now();
        match tokio::time::timeout(timeout, self.check_within(started, timeout)).await {
            Ok(result) => result,
            Err(_elapsed) => {
                // With no pings on the connection, a frozen worker and a dead network path
                // look the same as a slow answer. Drop the connection so the next check
                // starts from a fresh one instead of queueing behind a half-open socket;
                // at probe cadence a reconnect costs nothing.
                self.conn = None;
                Err(ProbeError::Timeout(timeout))
            }
        }
    }

    /// The check itself; [`check`](Self::check) bounds it with the timeout.
    async fn check_within(
        &mut self,
        started: Instant,
        timeout: Duration,
    ) -> Result<ServingStatus, ProbeError> {
        let body = encode_request_frame(&self.service)?;
        let uri = Uri::try_from(format!("http://{}{CHECK_PATH}", self.addr.authority()))
            .map_err(|e| ProbeError::Request(format!("URI: {e}")))?;
        // grpc-timeout tells the server how long the caller still waits, so grpcio can give
        // up (DEADLINE_EXCEEDED) on a check nobody will read; measured from the start so a
        // slow connect is counted.
        let request = |body: Bytes| {
            build_request(uri.clone(), body, timeout.saturating_sub(started.elapsed()))
        };

        let (mut sender, reused) = match self.conn.take() {
            Some(sender) if !sender.is_closed() => (sender, true),
            _ => (connect(&self.addr).await?, false),
        };
        let response = match sender.send_request(request(body.clone())?).await {
            Ok(response) => response,
            Err(error) if reused => {
                // The kept connection went away (the worker restarted or closed it) before
                // its driver noticed, or during this very call. A health check is
                // idempotent, so try once more on a fresh connection rather than report a
                // healthy worker as failing.
                tracing::debug!(
                    addr = %self.addr,
                    %error,
                    "health probe: kept connection failed; reconnecting"
                );
                sender = connect(&self.addr).await?;
                sender
                    .send_request(request(body)?)
                    .await
                    .map_err(ProbeError::Http2)?
            }
            Err(error) => return Err(ProbeError::Http2(error)),
        };
        // The stream got response headers, so the connection works: keep it for the next
        // check whatever the answer says.
        self.conn = Some(sender);

        let result = read_response(response).await;
        if let Err(ProbeError::Http2(_)) = &result {
            // Without the h2 crate's error type a stream reset cannot be told from a lost
            // connection; assume the worse, since reconnecting is cheap.
            self.conn = None;
        }
        result
    }
}

/// Opens a connection to `addr` (TCP with TCP_NODELAY, as the data path's, or a Unix
/// socket), does the HTTP/2 handshake and spawns the task that drives the connection.
async fn connect(addr: &BackendAddr) -> Result<SendRequest<Full<Bytes>>, ProbeError> {
    let stream = SocketConnect
        .connect(addr)
        .await
        .map_err(ProbeError::Connect)?;

    let mut builder = http2::Builder::new(TokioExecutor::new());
    // Both are hyper's defaults today; set them anyway, because either one sending pings
    // gets the connection closed by grpcio (GOAWAY too_many_pings).
    builder.keep_alive_interval(None).adaptive_window(false);
    let addr = addr.clone();
    let (sender, connection) = builder
        .handshake(TokioIo::new(stream))
        .await
        .map_err(ProbeError::Http2)?;
    // The driver finishes once every SendRequest is dropped (the probe replaced or dropped
    // its connection) or the connection fails, so it cannot outlive its use.
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%addr, %error, "health probe connection ended");
        }
    });
    Ok(sender)
}

/// Builds the `Check` request around an already framed body.
fn build_request(
    uri: Uri,
    body: Bytes,
    remaining: Duration,
) -> Result<Request<Full<Bytes>>, ProbeError> {
    let grpc_timeout = HeaderValue::try_from(grpc::format_timeout(remaining))
        .map_err(|e| ProbeError::Request(format!("grpc-timeout: {e}")))?;
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_2;
    let headers = request.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE_GRPC));
    // Required by gRPC: it tells proxies on the way that the client understands trailers,
    // where the status lives.
    headers.insert(TE, HeaderValue::from_static("trailers"));
    headers.insert(GRPC_TIMEOUT, grpc_timeout);
    headers.insert(
        USER_AGENT,
        HeaderValue::from_static(concat!("portshare/", env!("CARGO_PKG_VERSION"))),
    );
    Ok(request)
}

/// Turns the response into a serving status: a `grpc-status` in the headers (a
/// Trailers-Only response) decides alone; otherwise the HTTP status, then the
/// `grpc-status` trailer, then the message.
async fn read_response(response: Response<Incoming>) -> Result<ServingStatus, ProbeError> {
    let (parts, mut body) = response.into_parts();

    // A grpc-status in the headers marks a Trailers-Only response: the status is all
    // there is, whatever the HTTP status says.
    if let Some(code) = grpc_status(&parts.headers)? {
        return Err(status_error(code, &parts.headers).unwrap_or_else(|| {
            ProbeError::Malformed("grpc-status 0 without a response message".into())
        }));
    }
    if parts.status != StatusCode::OK {
        return Err(ProbeError::Status {
            code: Code::from_http(parts.status).as_u32(),
            message: format!("HTTP status {}", parts.status),
        });
    }
    if let Some(content_type) = parts.headers.get(CONTENT_TYPE)
        && !content_type
            .as_bytes()
            .starts_with(CONTENT_TYPE_GRPC.as_bytes())
    {
        return Err(ProbeError::Malformed(format!(
            "content-type {content_type:?} is not gRPC"
        )));
    }

    let mut data = BytesMut::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(ProbeError::Http2)?;
        match frame.into_data() {
            Ok(chunk) => {
                if data.len() + chunk.len() > MAX_RESPONSE_BYTES {
                    return Err(ProbeError::Malformed(format!(
                        "response body over {MAX_RESPONSE_BYTES} bytes"
                    )));
                }
                data.extend_from_slice(&chunk);
            }
            Err(frame) => {
                if let Ok(map) = frame.into_trailers() {
                    trailers = Some(map);
                }
            }
        }
    }

    let trailers = trailers.ok_or_else(|| {
        ProbeError::Malformed("response ended without trailers (no grpc-status)".into())
    })?;
    let code = grpc_status(&trailers)?
        .ok_or_else(|| ProbeError::Malformed("trailers without grpc-status".into()))?;
    if let Some(error) = status_error(code, &trailers) {
        return Err(error);
    }
    Ok(decode_response_frame(&data)?)
}

/// The `grpc-status` in `headers`, if there is one; a malformed one is an error.
fn grpc_status(headers: &HeaderMap) -> Result<Option<u32>, ProbeError> {
    let Some(value) = headers.get(&GRPC_STATUS) else {
        return Ok(None);
    };
    grpc::parse_status(value.as_bytes())
        .map(Some)
        .map_err(|e| ProbeError::Malformed(format!("grpc-status {value:?} {e}")))
}

/// `None` for status 0, otherwise the error carrying `code` and the `grpc-message`.
fn status_error(code: u32, headers: &HeaderMap) -> Option<ProbeError> {
    (code != 0).then(|| ProbeError::Status {
        code,
        message: headers
            .get(&GRPC_MESSAGE)
            .map(|m| grpc::decode_message(m.as_bytes()))
            .unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::Empty;
    use tokio::net::TcpListener;
    use tokio::sync::watch;

    use crate::grpc::frame;
    use crate::grpc::health::decode_varint;
    use crate::health::test_server::{TestBody, TestServer, grpc_ok, trailers_only};

    fn assert_malformed(result: Result<ServingStatus, ProbeError>) {
        assert!(
            matches!(result, Err(ProbeError::Malformed(_))),
            "expected Malformed, got {result:?}"
        );
    }

    #[test]
    fn status_errors_read_well() {
        let with = ProbeError::Status {
            code: 12,
            message: "Method not found!".into(),
        };
        assert_eq!(
            with.to_string(),
            "grpc-status 12 (UNIMPLEMENTED): Method not found!"
        );
        let without = ProbeError::Status {
            code: 5,
            message: String::new(),
        };
        assert_eq!(without.to_string(), "grpc-status 5 (NOT_FOUND)");
        let odd = ProbeError::Status {
            code: 99,
            message: String::new(),
        };
        assert_eq!(odd.to_string(), "grpc-status 99 (unknown code)");
    }

    #[test]
    fn grpc_status_must_be_digits() {
        let mut headers = HeaderMap::new();
        assert!(grpc_status(&headers).unwrap().is_none());
        headers.insert("grpc-status", HeaderValue::from_static("12"));
        assert_eq!(grpc_status(&headers).unwrap(), Some(12));
        for bad in ["+1", "", "x", "99999999999"] {
            headers.insert("grpc-status", HeaderValue::from_static(bad));
            assert!(grpc_status(&headers).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn ipv6_authority_drops_the_scope_id() {
        let addr = BackendAddr::from(SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::LOCALHOST,
            50051,
            0,
            2,
        )));
        assert_eq!(addr.authority(), "[::1]:50051");
        assert!(Uri::try_from(format!("http://{}{CHECK_PATH}", addr.authority())).is_ok());
    }

    #[test]
    fn check_future_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let mut probe = GrpcProbe::new(SocketAddr::from(([127, 0, 0, 1], 1)), "");
        assert_send(&probe.check(Duration::from_secs(1)));
    }

    // ---- end to end, against an in-process hyper HTTP/2 server ----

    const SERVING: &[u8] = &[0x08, 0x01];
    const NOT_SERVING: &[u8] = &[0x08, 0x02];
    const TIMEOUT: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn e2e_serving() {
        let server = TestServer::start(|_| async { grpc_ok(SERVING) }).await;
        let mut probe = GrpcProbe::new(server.addr, "");
        assert_eq!(probe.check(TIMEOUT).await.unwrap(), ServingStatus::Serving);
    }

    #[tokio::test]
    async fn e2e_not_serving() {
        let server = TestServer::start(|_| async { grpc_ok(NOT_SERVING) }).await;
        let mut probe = GrpcProbe::new(server.addr, "");
        assert_eq!(
            probe.check(TIMEOUT).await.unwrap(),
            ServingStatus::NotServing
        );
    }

    #[tokio::test]
    async fn e2e_trailers_only_unimplemented() {
        let server =
            TestServer::start(|_| async { trailers_only(12, "Method%20not%20found!") }).await;
        let mut probe = GrpcProbe::new(server.addr, "");
        match probe.check(TIMEOUT).await {
            Err(ProbeError::Status { code, message }) => {
                assert_eq!(code, 12);
                assert_eq!(message, "Method not found!");
            }
            other => panic!("expected UNIMPLEMENTED, got {other:?}"),
        }
        // A gRPC-level failure leaves the connection usable.
        let _ = probe.check(TIMEOUT).await;
        assert_eq!(server.accepts(), 1);
    }

    /// What a grpcio health servicer does with the request, checking it on the way; a
    /// request it finds wrong gets INVALID_ARGUMENT with the reason.
    async fn strict_health_service(req: Request<Incoming>) -> Response<TestBody> {
        let problem = |what: String| trailers_only(3, &what);
        if req.method() != Method::POST || req.uri().path() != CHECK_PATH {
            return problem(format!("{} {}", req.method(), req.uri()));
        }
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        if header("content-type") != "application/grpc" || header("te") != "trailers" {
            return problem(format!("headers {:?}", req.headers()));
        }
        let timeout = header("grpc-timeout");
        let left = grpc::parse_timeout(timeout.as_bytes());
        if !left.is_some_and(|t| t > Duration::ZERO && t <= TIMEOUT) {
            return problem(format!("grpc-timeout {timeout:?}"));
        }
        let body = match req.into_body().collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) => return problem(format!("body: {e}")),
        };
        // The prefix, then (unless empty) field 1 = 0x0a, a varint length and the name.
        let service = match body.as_ref() {
            [0, 0, 0, 0, 0] => String::new(),
            [0, l0, l1, l2, l3, 0x0a, rest @ ..] => {
                let Ok((n, used)) = decode_varint(rest) else {
                    return problem("length varint".into());
                };
                let name = &rest[used..];
                let framed = u32::from_be_bytes([*l0, *l1, *l2, *l3]) as usize;
                if framed != 1 + used + name.len() || n as usize != name.len() {
                    return problem(format!("lengths in {body:02x?}"));
                }
                String::from_utf8_lossy(name).into_owned()
            }
            other => return problem(format!("body {other:02x?}")),
        };
        match service.as_str() {
            "" | "portshare.test.Echo" => grpc_ok(SERVING),
            _ => trailers_only(5, "unknown service"),
        }
    }

    #[tokio::test]
    async fn e2e_request_is_well_formed() {
        let server = TestServer::start(strict_health_service).await;
        for service in ["", "portshare.test.Echo"] {
            let mut probe = GrpcProbe::new(server.addr, service);
            assert_eq!(
                probe.check(TIMEOUT).await.unwrap(),
                ServingStatus::Serving,
                "service {service:?}"
            );
        }
        let mut probe = GrpcProbe::new(server.addr, "no.such.Service");
        match probe.check(TIMEOUT).await {
            Err(ProbeError::Status { code: 5, message }) => assert_eq!(message, "unknown service"),
            other => panic!("expected NOT_FOUND, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn e2e_authority_is_the_backend_address() {
        let server = TestServer::start(|req: Request<Incoming>| async move {
            let authority = req.uri().authority().map(|a| a.to_string());
            let local = req.headers().get("host").cloned();
            match (authority, local) {
                (Some(a), None) => trailers_only(3, &format!("authority={a}")),
                other => trailers_only(3, &format!("unexpected {other:?}")),
            }
        })
        .await;
        let mut probe = GrpcProbe::new(server.addr, "");
        match probe.check(TIMEOUT).await {
            Err(ProbeError::Status { message, .. }) => {
                assert_eq!(message, format!("authority={}", server.addr));
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn e2e_two_checks_reuse_one_connection() {
        let server = TestServer::start(|_| async { grpc_ok(SERVING) }).await;
        let mut probe = GrpcProbe::new(server.addr, "");
        for _ in 0..3 {
            assert_eq!(probe.check(TIMEOUT).await.unwrap(), ServingStatus::Serving);
        }
        assert_eq!(server.accepts(), 1);
    }

    #[tokio::test]
    async fn e2e_reconnects_after_the_server_closed_the_connection() {
        let server = TestServer::start(|_| async { grpc_ok(SERVING) }).await;
        let mut probe = GrpcProbe::new(server.addr, "");
        assert_eq!(probe.check(TIMEOUT).await.unwrap(), ServingStatus::Serving);
        server.kill_connections();
        server.wait_closed(1).await;
        assert_eq!(probe.check(TIMEOUT).await.unwrap(), ServingStatus::Serving);
        assert_eq!(server.accepts(), 2);
    }

    #[tokio::test]
    async fn e2e_retries_once_when_the_kept_connection_dies_mid_call() {
        // The second request arrives on the kept connection, and the server drops that
        // connection instead of answering: the probe cannot have seen it coming, so this
        // exercises the retry on a fresh connection rather than the closed-check.
        let (kill, _) = watch::channel(0u64);
        let requests = Arc::new(AtomicUsize::new(0));
        let server = TestServer::start_with(kill.clone(), {
            let requests = requests.clone();
            move |_| {
                let n = requests.fetch_add(1, Ordering::SeqCst);
                let kill = kill.clone();
                async move {
                    if n == 1 {
                        kill.send_modify(|g| *g += 1);
                        std::future::pending::<()>().await;
                    }
                    grpc_ok(SERVING)
                }
            }
        })
        .await;
        let mut probe = GrpcProbe::new(server.addr, "");
        assert_eq!(probe.check(TIMEOUT).await.unwrap(), ServingStatus::Serving);
        assert_eq!(probe.check(TIMEOUT).await.unwrap(), ServingStatus::Serving);
        assert_eq!(requests.load(Ordering::SeqCst), 3);
        assert_eq!(server.accepts(), 2);
    }

    #[tokio::test]
    async fn e2e_closed_port_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let mut probe = GrpcProbe::new(addr, "");
        match probe.check(TIMEOUT).await {
            Err(ProbeError::Connect(e)) => {
                assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused)
            }
            other => panic!("expected a connect error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn e2e_silent_server_times_out_within_the_timeout() {
        let server = TestServer::start(|_| std::future::pending()).await;
        let mut probe = GrpcProbe::new(server.addr, "");
        let timeout = Duration::from_millis(300);
        let started = tokio::time::Instant::now();
        let result = probe.check(timeout).await;
        let elapsed = started.elapsed();
        assert!(
            matches!(result, Err(ProbeError::Timeout(t)) if t == timeout),
            "{result:?}"
        );
        assert!(elapsed >= timeout, "gave up early: {elapsed:?}");
        assert!(
            elapsed < timeout + Duration::from_millis(500),
            "{elapsed:?}"
        );
        // A timed-out connection is not trusted again: the next check opens a new one.
        let _ = probe.check(timeout).await;
        assert_eq!(server.accepts(), 2);
    }

    #[tokio::test]
    async fn e2e_dropping_the_probe_closes_its_connection() {
        let server = TestServer::start(|_| async { grpc_ok(SERVING) }).await;
        let mut probe = GrpcProbe::new(server.addr, "");
        assert_eq!(probe.check(TIMEOUT).await.unwrap(), ServingStatus::Serving);
        drop(probe);
        server.wait_closed(1).await;
    }

    #[tokio::test]
    async fn e2e_http_404_maps_to_unimplemented() {
        let server = TestServer::start(|_| async {
            Response::builder()
                .status(StatusCode::NOT_FOUND)
                .body(Empty::new().boxed())
                .unwrap()
        })
        .await;
        let mut probe = GrpcProbe::new(server.addr, "");
        assert!(matches!(
            probe.check(TIMEOUT).await,
            Err(ProbeError::Status { code: 12, .. })
        ));
    }

    #[tokio::test]
    async fn e2e_missing_trailers_and_oversized_bodies_are_malformed() {
        let server = TestServer::start(|req: Request<Incoming>| async move {
            let body = if req.headers().contains_key("x-big") {
                vec![0u8; MAX_RESPONSE_BYTES + 1]
            } else {
                frame::encode(SERVING).unwrap().to_vec()
            };
            Response::builder()
                .header(CONTENT_TYPE, "application/grpc")
                .body(Full::new(Bytes::from(body)).boxed())
                .unwrap()
        })
        .await;
        let mut probe = GrpcProbe::new(server.addr, "");
        assert_malformed(probe.check(TIMEOUT).await);

        // The oversized case, driven by hand since the probe's request has no x-big.
        let mut sender = connect(&server.addr.into()).await.unwrap();
        let uri = Uri::try_from(format!(
            "http://{}{CHECK_PATH}",
            BackendAddr::from(server.addr).authority()
        ))
        .unwrap();
        let mut request = build_request(uri, encode_request_frame("").unwrap(), TIMEOUT).unwrap();
        request
            .headers_mut()
            .insert("x-big", HeaderValue::from_static("1"));
        let response = sender.send_request(request).await.unwrap();
        assert_malformed(read_response(response).await);
    }
}
