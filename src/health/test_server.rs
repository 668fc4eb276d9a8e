//! An in-process HTTP/2 server on `127.0.0.1:0` for the health probe's tests: a handler
//! answers each request, and the test can count, and cut, the connections it accepted.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::grpc::frame;

/// What a handler answers with.
pub(super) type TestBody = BoxBody<Bytes, Infallible>;

/// An HTTP/2 server on 127.0.0.1:0 answering every request with a handler.
pub(super) struct TestServer {
    /// Where it listens.
    pub(super) addr: SocketAddr,
    /// Connections accepted so far.
    accepts: Arc<AtomicUsize>,
    /// Connections that ended so far.
    closed: Arc<AtomicUsize>,
    /// Bumping it drops every open connection without a GOAWAY.
    kill: watch::Sender<u64>,
    /// The accept loop, stopped when the server is dropped.
    accept_task: JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl TestServer {
    pub(super) async fn start<F, Fut>(handler: F) -> Self
    where
        F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<TestBody>> + Send + 'static,
    {
        Self::start_with(watch::channel(0).0, handler).await
    }

    /// Like `start`, with the kill switch made by the caller so a handler can use it.
    pub(super) async fn start_with<F, Fut>(kill: watch::Sender<u64>, handler: F) -> Self
    where
        F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<TestBody>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let accept_task = tokio::spawn({
            let (accepts, closed, kill) = (accepts.clone(), closed.clone(), kill.clone());
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    accepts.fetch_add(1, Ordering::SeqCst);
                    let handler = handler.clone();
                    let closed = closed.clone();
                    let mut killed = kill.subscribe();
                    let generation = *killed.borrow();
                    tokio::spawn(async move {
                        let service = service_fn(move |req| {
                            let answer = handler(req);
                            async move { Ok::<_, Infallible>(answer.await) }
                        });
                        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), service);
                        tokio::select! {
                            _ = conn => {}
                            _ = killed.wait_for(|g| *g != generation) => {}
                        }
                        closed.fetch_add(1, Ordering::SeqCst);
                    });
                }
            }
        });
        Self {
            addr,
            accepts,
            closed,
            kill,
            accept_task,
        }
    }

    pub(super) fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }

    pub(super) fn kill_connections(&self) {
        self.kill.send_modify(|g| *g += 1);
    }

    pub(super) async fn wait_closed(&self, n: usize) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while self.closed.load(Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("server connection did not close");
    }
}

/// A normal unary answer: headers, one message, trailers with grpc-status 0.
pub(super) fn grpc_ok(msg: &[u8]) -> Response<TestBody> {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let body = Full::new(frame::encode(msg).unwrap())
        .with_trailers(std::future::ready(Some(Ok(trailers))))
        .boxed();
    Response::builder()
        .header(CONTENT_TYPE, "application/grpc")
        .body(body)
        .unwrap()
}

/// A Trailers-Only answer: the status in the one HEADERS frame, no body.
pub(super) fn trailers_only(code: u32, message: &str) -> Response<TestBody> {
    Response::builder()
        .header(CONTENT_TYPE, "application/grpc")
        .header("grpc-status", code.to_string())
        .header("grpc-message", message)
        .body(Empty::new().boxed())
        .unwrap()
}
