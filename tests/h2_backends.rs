//! h2 mode against scripted HTTP/2 backends (the `h2` crate, in-process), for what real
//! workers do only rarely: refused streams, resets, Trailers-Only answers followed by a
//! reset, answers before the request is read, GOAWAY. A Rust HTTP/2 client drives the real
//! binary.

// A test stops at what it did not expect (unwrap/expect), and times real processes by the
// wall clock: the library's lints against both (Cargo.toml, clippy.toml) are not meant here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use h2::Reason;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame};
use hyper::client::conn::http2;
use hyper::http::{HeaderMap, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::{Proxy, eventually_async};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// What a scripted backend does with each call.
#[derive(Clone, Copy, Debug)]
enum Script {
    /// A normal gRPC reply: headers, one message, trailers with grpc-status 0.
    Ok,
    /// RST_STREAM(REFUSED_STREAM) at once: the call was never processed.
    Refuse,
    /// Response headers, then RST_STREAM(CANCEL).
    CancelAfterHeaders,
    /// A Trailers-Only PERMISSION_DENIED (7), then RST_STREAM(NO_ERROR).
    TrailersOnlyThenReset,
    /// Answers OK at once without reading the request body.
    AnswerBeforeReading,
    /// Serves one call per connection, then GOAWAY.
    OneCallPerConnection,
}

/// A scripted HTTP/2 backend on 127.0.0.1:0; counts connections and calls.
struct Backend {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
}

async fn backend(script: Script) -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let connections = Arc::new(AtomicUsize::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let (conns, count) = (Arc::clone(&connections), Arc::clone(&calls));
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let count = Arc::clone(&count);
            let conns = Arc::clone(&conns);
            tokio::spawn(async move {
                // Health checks connect too, but never speak HTTP/2: count only real ones.
                let Ok(mut conn) = h2::server::handshake(socket).await else {
                    return;
                };
                conns.fetch_add(1, Ordering::SeqCst);
                // The connection must keep being polled while calls are handled, so each
                // call runs on its own task.
                while let Some(Ok((request, respond))) = conn.accept().await {
                    count.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(serve_call(script, request, respond));
                    if matches!(script, Script::OneCallPerConnection) {
                        conn.graceful_shutdown();
                    }
                }
            });
        }
    });
    Backend {
        addr,
        connections,
        calls,
    }
}

async fn serve_call(
    script: Script,
    request: hyper::http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) {
    let grpc = || {
        Response::builder()
            .status(200)
            .header("content-type", "application/grpc")
    };
    match script {
        Script::Refuse => respond.send_reset(Reason::REFUSED_STREAM),
        Script::CancelAfterHeaders => {
            if let Ok(resp) = grpc().body(()) {
                let _ = respond.send_response(resp, false);
            }
            respond.send_reset(Reason::CANCEL);
        }
        Script::TrailersOnlyThenReset => {
            if let Ok(resp) = grpc()
                .header("grpc-status", "7")
                .header("grpc-message", "go away")
                .body(())
            {
                let _ = respond.send_response(resp, true);
            }
            // Let the HEADERS frame go out first: h2 would otherwise drop a queued frame
            // in favour of the reset, which a real gRPC server does not do. Part of the
            // scripted backend's behaviour (the frames' order on the wire), not a wait.
            tokio::time::sleep(Duration::from_millis(20)).await;
            respond.send_reset(Reason::NO_ERROR);
        }
        Script::Ok | Script::AnswerBeforeReading | Script::OneCallPerConnection => {
            let mut body = request.into_body();
            if !matches!(script, Script::AnswerBeforeReading) {
                while let Some(chunk) = body.data().await {
                    let Ok(chunk) = chunk else { break };
                    let _ = body.flow_control().release_capacity(chunk.len());
                }
            }
            if let Ok(resp) = grpc().body(())
                && let Ok(mut send) = respond.send_response(resp, false)
            {
                let _ = send.send_data(message(b"ok"), false);
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", "0".parse().expect("value"));
                let _ = send.send_trailers(trailers);
            }
            // Keep the request body alive a moment: the client may still be sending when
            // this stream is already answered (the scripted behaviour, not a wait).
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(body);
        }
    }
}

/// A length-prefixed gRPC message.
fn message(payload: &[u8]) -> Bytes {
    let mut m = vec![0u8];
    m.extend_from_slice(&u32::try_from(payload.len()).expect("len").to_be_bytes());
    m.extend_from_slice(payload);
    Bytes::from(m)
}

/// The outcome of one call: HTTP status, gRPC status, grpc-message.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    http: u16,
    grpc: Option<String>,
    message: String,
}

/// A request body fed from a channel, so a test can keep sending after the answer came.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

async fn connect(addr: SocketAddr) -> http2::SendRequest<ChannelBody> {
    let stream = TcpStream::connect(addr)
        .await
        .expect("connect to portshare");
    let (send, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    send
}

/// One unary-style call: `messages` copies of a small message, then the end of the stream.
async fn call(
    send: &mut http2::SendRequest<ChannelBody>,
    messages: usize,
    pause: Duration,
) -> Outcome {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        for _ in 0..messages {
            if tx.send(message(&[7u8; 1000])).await.is_err() {
                return; // the call is over; the proxy stopped reading
            }
            // The caller's pace between messages: the stimulus.
            tokio::time::sleep(pause).await;
        }
    });
    let req = Request::builder()
        .method("POST")
        .uri("http://portshare/test.Scripted/Call")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(ChannelBody(rx))
        .expect("request");
    send.ready().await.expect("connection ready");
    let resp = tokio::time::timeout(Duration::from_secs(20), send.send_request(req))
        .await
        .expect("an answer within 20 s")
        .expect("an HTTP/2 response, not a reset");
    let http = resp.status().as_u16();
    let header = |h: &HeaderMap, k: &str| h.get(k).and_then(|v| v.to_str().ok()).map(str::to_owned);
    if let Some(code) = header(resp.headers(), "grpc-status") {
        let message = header(resp.headers(), "grpc-message").unwrap_or_default();
        return Outcome {
            http,
            grpc: Some(code),
            message,
        };
    }
    let collected = resp.into_body().collect().await.expect("response body");
    let trailers = collected.trailers().cloned().unwrap_or_default();
    Outcome {
        http,
        grpc: header(&trailers, "grpc-status"),
        message: header(&trailers, "grpc-message").unwrap_or_default(),
    }
}

fn proxy(backends: &[&Backend], extra: &[&str]) -> Proxy {
    proxy_env(backends, extra, &[])
}

/// [`proxy`], with `env` for portshare.
fn proxy_env(backends: &[&Backend], extra: &[&str], env: &[(&str, &str)]) -> Proxy {
    let mut args: Vec<String> = vec!["--mode".into(), "h2".into()];
    for b in backends {
        args.extend(["--backend".to_owned(), b.addr.to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Proxy::start_env(&refs, env)
}

/// REFUSED_STREAM means the backend never processed the call: it goes to another backend
/// and the client never notices.
#[tokio::test]
async fn a_refused_call_is_sent_to_another_backend() {
    let refuser = backend(Script::Refuse).await;
    let good = backend(Script::Ok).await;
    let p = proxy(&[&refuser, &good], &["--balance", "round-robin"]);
    let mut send = connect(p.addr).await;
    for _ in 0..6 {
        let o = call(&mut send, 1, Duration::ZERO).await;
        assert_eq!(o.grpc.as_deref(), Some("0"), "{o:?}");
    }
    assert!(
        refuser.calls.load(Ordering::SeqCst) >= 1,
        "the refuser was never tried"
    );
    assert!(p.metric("portshare_call_retries_total") >= 1.0);
}

/// With nowhere else to go, a refused call is UNAVAILABLE (a Trailers-Only answer, HTTP 200).
#[tokio::test]
async fn a_refused_call_with_no_other_backend_is_unavailable() {
    let refuser = backend(Script::Refuse).await;
    let p = proxy(&[&refuser], &[]);
    let o = call(&mut connect(p.addr).await, 1, Duration::ZERO).await;
    assert_eq!((o.http, o.grpc.as_deref()), (200, Some("14")), "{o:?}");
    assert!(o.message.contains("portshare"), "{o:?}");
}

/// A backend that resets with CANCEL mid-call: the client gets CANCELLED, as from a direct
/// connection.
#[tokio::test]
async fn a_backend_cancel_is_cancelled() {
    let b = backend(Script::CancelAfterHeaders).await;
    let p = proxy(&[&b], &[]);
    let o = call(&mut connect(p.addr).await, 1, Duration::ZERO).await;
    assert_eq!(o.grpc.as_deref(), Some("1"), "{o:?}");
}

/// A Trailers-Only error followed by RST_STREAM(NO_ERROR) stays the error the backend sent.
#[tokio::test]
async fn a_trailers_only_error_then_reset_stays_that_error() {
    let b = backend(Script::TrailersOnlyThenReset).await;
    let p = proxy(&[&b], &[]);
    let mut send = connect(p.addr).await;
    let o = call(&mut send, 20, Duration::from_millis(5)).await;
    assert_eq!(o.grpc.as_deref(), Some("7"), "{o:?}");
    assert_eq!(o.message, "go away");
}

/// A backend that answers before it read the whole request (while the client still sends)
/// is fine: the call succeeds, and the backend stays in rotation for the next ones.
#[tokio::test]
async fn an_answer_before_the_request_ends_does_not_cost_the_backend() {
    let b = backend(Script::AnswerBeforeReading).await;
    let p = proxy(&[&b], &[]);
    let mut send = connect(p.addr).await;
    let o = call(&mut send, 200, Duration::from_millis(1)).await;
    assert_eq!(o.grpc.as_deref(), Some("0"), "{o:?}");
    for _ in 0..3 {
        let o = call(&mut send, 1, Duration::ZERO).await;
        assert_eq!(o.grpc.as_deref(), Some("0"), "{o:?}");
    }
    let status = p.backends();
    assert_eq!(status[0]["ejections"], 0, "{status:?}");
    assert_eq!(
        b.connections.load(Ordering::SeqCst),
        1,
        "the connection was dropped"
    );
}

/// After a backend's GOAWAY, new calls get a fresh connection; none fails.
#[tokio::test]
async fn a_backend_goaway_moves_new_calls_to_a_fresh_connection() {
    let b = backend(Script::OneCallPerConnection).await;
    // At debug, the pool logs each backend connection's end, which is what the loop waits for.
    let p = proxy_env(&[&b], &[], &[("PORTSHARE_LOG", "info,portshare=debug")]);
    let mut send = connect(p.addr).await;
    for i in 0..4 {
        let o = call(&mut send, 1, Duration::ZERO).await;
        assert_eq!(o.grpc.as_deref(), Some("0"), "call {i}: {o:?}");
        // The GOAWAY has arrived, and closed the pool's connection, before the next call.
        eventually_async(
            Duration::from_secs(10),
            "the pool's connection closed after the GOAWAY",
            || p.log.count("backend connection closed") > i,
        )
        .await;
    }
    assert!(
        b.connections.load(Ordering::SeqCst) >= 4,
        "connections were not replaced"
    );
}
