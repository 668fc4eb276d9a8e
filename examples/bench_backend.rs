//! A small, fast gRPC backend for `bench/run.sh`: every POST gets a valid unary gRPC reply
//! (status 200, `content-type: application/grpc`, one length-prefixed message that echoes the
//! request's message, trailers `grpc-status: 0`).
//!
//! It exists so the benchmark can show what a proxy itself costs: the Python workers spend
//! far more CPU per call than any proxy, which hides the proxy's share. This one does almost
//! nothing per call and runs on tokio's multi-threaded runtime, so it is not the bottleneck.
//!
//! ```text
//! cargo run --release --example bench_backend -- --port 0
//! cargo run --release --example bench_backend -- --unix /tmp/b0.sock   # Unix only
//! ```
//!
//! Protocol with the harness:
//! - stdout: `PORT <n>` once the listener is bound (loopback only; `PORT 0` on a Unix
//!   socket, which replaces a stale file at the path).
//! - stdin: each line `stats` is answered with `CALLS <n>` (replies sent since start), so the
//!   harness can see how calls spread over backends for every proxy, not only portshare.
//!   Stdin is used instead of a signal because it works on every platform (CI runs clippy on
//!   all targets for Windows too) and because end of stdin stops the backend: if the harness
//!   dies, its backends do not linger.
//!
//! Echoing the request bytes is a valid reply for `portshare.test.Echo/Unary` when the request
//! carries only `payload` (field 1 is `bytes payload` in both EchoRequest and EchoReply),
//! which is what the benchmark sends.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// Streams allowed per client connection: the same as portshare's default, so h2load's
/// 32-stream workload is never throttled by the backend when it is hit directly.
const MAX_CONCURRENT_STREAMS: u32 = 1000;

/// The reply body: one DATA frame, then the trailers. A hand-written body because
/// `http_body_util::Full` cannot carry trailers, and this avoids pulling in a stream crate.
struct Reply {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for Reply {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    // No exact size on purpose: hyper would turn it into `content-length`, which gRPC servers
    // do not send; the lower bound still lets it size its buffers.
    fn size_hint(&self) -> SizeHint {
        let mut hint = SizeHint::new();
        if let Some(data) = &self.data {
            hint.set_lower(data.len() as u64);
        }
        hint
    }
}

/// Trailers with a gRPC status (and a message when it is an error).
fn trailers(status: &'static str, message: Option<&'static str>) -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", HeaderValue::from_static(status));
    if let Some(m) = message {
        t.insert("grpc-message", HeaderValue::from_static(m));
    }
    t
}

/// Answers one call. Only POST is gRPC; anything else is a plain 405 so a stray probe is
/// not mistaken for a call.
async fn answer(req: Request<Incoming>, calls: Arc<AtomicU64>) -> Response<Reply> {
    if req.method() != Method::POST {
        let mut resp = Response::new(Reply {
            data: None,
            trailers: None,
        });
        *resp.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        return resp;
    }
    // The whole request (a unary call is one small message) is read before answering, as a
    // real unary handler would; a client that resets the stream simply ends it here.
    let (data, grpc) = match req.into_body().collect().await {
        Ok(body) => {
            let bytes = body.to_bytes();
            // One well-formed length-prefixed message: echo it whole (prefix included). A
            // malformed one is an INTERNAL error, so a proxy that mangles bodies shows up as
            // an error rather than as a fast "success".
            let well_formed = bytes.len() >= 5
                && bytes[0] == 0
                && u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize
                    == bytes.len() - 5;
            if well_formed {
                (Some(bytes), trailers("0", None))
            } else {
                (
                    None,
                    trailers("13", Some("bench_backend: not one length-prefixed message")),
                )
            }
        }
        Err(_) => (
            None,
            trailers("1", Some("bench_backend: request body failed")),
        ),
    };
    // Counted once the reply is decided: "calls answered", which the harness compares with
    // what the client saw to catch calls lost in between.
    calls.fetch_add(1, Ordering::Relaxed);
    let mut resp = Response::new(Reply {
        data,
        trailers: Some(grpc),
    });
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    resp
}

/// Where to listen.
enum Listen {
    /// 127.0.0.1 and this port (0: any free one).
    Port(u16),
    /// A Unix domain socket at this path.
    Unix(std::path::PathBuf),
}

fn parse_args() -> Result<Listen, String> {
    let mut args = std::env::args().skip(1);
    let mut listen = Listen::Port(0);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" => {
                let v = args.next().ok_or("--port needs a value")?;
                listen = Listen::Port(v.parse().map_err(|_| format!("bad port {v:?}"))?);
            }
            "--unix" => {
                let v = args.next().ok_or("--unix needs a path")?;
                listen = Listen::Unix(v.into());
            }
            "-h" | "--help" => {
                return Err(
                    "usage: bench_backend [--port P | --unix PATH]  (port 0 = any free port)"
                        .into(),
                );
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(listen)
}

/// Serves one connection's calls until it closes.
async fn serve<S>(stream: S, calls: Arc<AtomicU64>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let calls = Arc::clone(&calls);
        async move { Ok::<_, Infallible>(answer(req, calls).await) }
    });
    // Errors here are clients going away (h2load closing, a proxy's reset); nothing to
    // report for a benchmark target.
    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        // gRPC servers send no `date`; skipping it also saves a clock read per call.
        .auto_date_header(false)
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// Out of file descriptors and the like: keep serving the connections we have.
async fn accept_failed(e: std::io::Error) {
    eprintln!("bench_backend: accept: {e}");
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
}

/// Accepts on a Unix socket at `path` (a stale file there is replaced) until it fails to
/// bind; returns the exit code.
#[cfg(unix)]
async fn serve_unix(path: &std::path::Path, calls: Arc<AtomicU64>) -> ExitCode {
    let _ = std::fs::remove_file(path);
    let listener = match tokio::net::UnixListener::bind(path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("bench_backend: cannot bind {}: {e}", path.display());
            return ExitCode::from(1);
        }
    };
    println!("PORT 0");
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve(stream, Arc::clone(&calls)));
            }
            Err(e) => accept_failed(e).await,
        }
    }
}

#[cfg(not(unix))]
async fn serve_unix(_path: &std::path::Path, _calls: Arc<AtomicU64>) -> ExitCode {
    eprintln!("bench_backend: --unix needs a Unix");
    ExitCode::from(64)
}

/// Answers `stats` lines on stdin; returns at end of stdin.
async fn stats_on_stdin(calls: Arc<AtomicU64>) {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut out = tokio::io::stdout();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.trim() == "stats" {
            let reply = format!("CALLS {}\n", calls.load(Ordering::Relaxed));
            if out.write_all(reply.as_bytes()).await.is_err() || out.flush().await.is_err() {
                return;
            }
        }
    }
}

// The default multi-threaded runtime: one worker thread per core.
#[tokio::main]
async fn main() -> ExitCode {
    let calls = Arc::new(AtomicU64::new(0));
    let port = match parse_args() {
        Ok(Listen::Port(p)) => p,
        Ok(Listen::Unix(path)) => {
            return tokio::select! {
                code = serve_unix(&path, Arc::clone(&calls)) => code,
                () = stats_on_stdin(Arc::clone(&calls)) => {
                    let _ = std::fs::remove_file(&path);
                    ExitCode::SUCCESS
                }
            };
        }
        Err(e) => {
            eprintln!("bench_backend: {e}");
            return ExitCode::from(64);
        }
    };
    // Loopback only: this is a benchmark target, never a service.
    let listener = match TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("bench_backend: cannot bind 127.0.0.1:{port}: {e}");
            return ExitCode::from(1);
        }
    };
    let bound = match listener.local_addr() {
        Ok(a) => a.port(),
        Err(e) => {
            eprintln!("bench_backend: {e}");
            return ExitCode::from(1);
        }
    };
    println!("PORT {bound}");

    let accept = async {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            };
            // Small replies must leave at once, not wait for Nagle to coalesce them.
            let _ = stream.set_nodelay(true);
            tokio::spawn(serve(stream, Arc::clone(&calls)));
        }
    };
    tokio::select! {
        () = accept => ExitCode::SUCCESS,
        () = stats_on_stdin(Arc::clone(&calls)) => ExitCode::SUCCESS,
    }
}
