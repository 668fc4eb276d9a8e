//! h2 mode's call path alone, in one process: an HTTP/2 client → portshare's `H2Proxy` →
//! an HTTP/2 backend, over loopback TCP, with unary gRPC calls. It reports calls/s and the
//! CPU time the proxy's own threads spent per call (the client and backend run on threads
//! of their own, measured apart), so a change to the call path can be judged in a minute:
//!
//! ```text
//! cargo bench --bench h2_call_path                 # 40,000 calls, 1 connection × 32 streams
//! cargo bench --bench h2_call_path -- 100000 4 8   # CALLS CONNECTIONS STREAMS
//! ```
//!
//! The proxy runs on 2 data-path threads as `portshare` does on a 2-core machine. Thread
//! CPU comes from `/proc/self/task/*/schedstat` (Linux); elsewhere only calls/s is shown.
//! `bench/run.sh` stays the reference against HAProxy and nginx: this measures the proxy's
//! code, not the whole system.

// The bench stops at what it did not expect (unwrap/expect) and measures by the wall clock
// (its runtime's time is never paused): the library's lints against both are not meant here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use http::{HeaderMap, HeaderValue, Request, Response};
use portshare::backend::{BackendSet, BackendSpec, EjectionConfig, Thresholds};
use portshare::balance::{Balance, Balancer};
use portshare::h2::{H2Config, H2Proxy};
use portshare::threads::DataThreads;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// The proxy's data-path threads are named so, and measured.
const PROXY_THREAD: &str = "portshare-h2-";

/// Data-path threads, as portshare starts on a 2-core machine.
const THREADS: usize = 2;

/// One gRPC message: EchoRequest { payload: "hello" }.
const MESSAGE: &[u8] = b"\x00\x00\x00\x00\x07\x0a\x05hello";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let number = |i: usize, default: usize| -> Result<usize, String> {
        args.get(i).map_or(Ok(default), |a| {
            a.parse()
                .ok()
                .filter(|&n| n > 0)
                .ok_or(format!("h2_call_path: {a:?} is not a positive number"))
        })
    };
    let (calls, connections, streams) = match (number(0, 40_000), number(1, 1), number(2, 32)) {
        (Ok(c), Ok(n), Ok(s)) => (c, n, s),
        (Err(e), ..) | (_, Err(e), _) | (.., Err(e)) => {
            eprintln!("{e}\nusage: h2_call_path [CALLS [CONNECTIONS [STREAMS]]]");
            return ExitCode::FAILURE;
        }
    };
    match run(calls, connections, streams) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("h2_call_path: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(calls: usize, connections: usize, streams: usize) -> Result<(), String> {
    let peers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-peer")
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let threads = DataThreads::start(THREADS).map_err(|e| format!("threads: {e}"))?;

    let backend = peers.block_on(TcpListener::bind((Ipv4Addr::LOCALHOST, 0)));
    let backend = backend.map_err(|e| format!("bind: {e}"))?;
    let backend_addr = backend.local_addr().map_err(|e| e.to_string())?;
    peers.spawn(serve_backend(backend));

    let stop = CancellationToken::new();
    let proxy_addr = peers.block_on(start_proxy(backend_addr, Arc::new(threads), stop.clone()))?;

    // A short warm-up opens the backend connection and fills the allocator's caches.
    peers.block_on(load(proxy_addr, 1, streams, 2_000))?;
    let cpu_before = proxy_cpu();
    let started = Instant::now();
    peers.block_on(load(proxy_addr, connections, streams, calls))?;
    let elapsed = started.elapsed();
    let cpu = proxy_cpu()
        .zip(cpu_before)
        .map(|(after, before)| after - before);
    stop.cancel();

    let per_second = calls as f64 / elapsed.as_secs_f64();
    println!(
        "h2_call_path: {calls} unary calls, {connections} connection(s) x {streams} streams: \
         {per_second:.0} calls/s"
    );
    match cpu {
        Some(cpu) => println!(
            "h2_call_path: proxy CPU {:.1} µs per call ({:.0}% of one core)",
            cpu.as_secs_f64() * 1e6 / calls as f64,
            100.0 * cpu.as_secs_f64() / elapsed.as_secs_f64()
        ),
        None => println!("h2_call_path: per-thread CPU time is not available here"),
    }
    Ok(())
}

/// Starts an `H2Proxy` in front of `backend`, its connections served on `threads` as
/// portshare's listener hands them out; returns its address.
async fn start_proxy(
    backend: SocketAddr,
    threads: Arc<DataThreads>,
    stop: CancellationToken,
) -> Result<SocketAddr, String> {
    let set = Arc::new(BackendSet::new(
        [BackendSpec {
            name: backend.to_string(),
            addr: backend.into(),
            worker: None,
        }],
        EjectionConfig {
            base_time: Duration::from_secs(1),
            max_time: Duration::from_secs(1),
        },
        Thresholds {
            healthy: 1,
            unhealthy: 1,
        },
    ));
    let proxy = Arc::new(H2Proxy::new(
        H2Config {
            max_concurrent_streams: 1000,
            max_header_list_size: 16 * 1024,
            max_calls: 100_000,
            attempts: 2,
            stream_window: 1 << 20,
            connection_window: 1 << 20,
            connect_timeout: Duration::from_secs(2),
            queue_timeout: Duration::from_secs(2),
            max_calls_per_backend: None,
        },
        set,
        Balancer::new(Balance::P2c),
        threads.len(),
    ));
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .map_err(|e| format!("bind: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = stop.cancelled() => return,
            };
            let Ok((stream, peer)) = accepted else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let runtime = threads.next();
            let moved = stream.into_std().and_then(|std| {
                let _on = runtime.enter();
                TcpStream::from_std(std)
            });
            let Ok(stream) = moved else {
                continue;
            };
            let proxy = Arc::clone(&proxy);
            let stop = stop.clone();
            runtime.spawn(proxy.serve_connection(stream, peer, None, stop.clone(), stop));
        }
    });
    Ok(addr)
}

/// `calls` unary calls over `connections` connections, `streams` at a time on each.
async fn load(
    proxy: SocketAddr,
    connections: usize,
    streams: usize,
    calls: usize,
) -> Result<(), String> {
    let mut clients = JoinSet::new();
    for c in 0..connections {
        let share = calls / connections + usize::from(c < calls % connections);
        clients.spawn(client(proxy, streams, share));
    }
    while let Some(done) = clients.join_next().await {
        done.map_err(|e| format!("client task: {e}"))??;
    }
    Ok(())
}

/// One client connection sending `calls` calls, `streams` at a time.
async fn client(proxy: SocketAddr, streams: usize, calls: usize) -> Result<(), String> {
    let tcp = TcpStream::connect(proxy)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (send, conn) = h2::client::handshake(tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let mut running = JoinSet::new();
    for s in 0..streams {
        let share = calls / streams + usize::from(s < calls % streams);
        let send = send.clone();
        running.spawn(async move {
            for _ in 0..share {
                one_call(send.clone()).await?;
            }
            Ok::<(), String>(())
        });
    }
    while let Some(done) = running.join_next().await {
        done.map_err(|e| format!("call task: {e}"))??;
    }
    Ok(())
}

/// One unary call; an error unless it ends with `grpc-status: 0`.
async fn one_call(send: h2::client::SendRequest<Bytes>) -> Result<(), String> {
    let mut send = send.ready().await.map_err(|e| format!("ready: {e}"))?;
    let request = Request::post("http://bench/portshare.test.Echo/Unary")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .map_err(|e| e.to_string())?;
    let (response, mut body) = send
        .send_request(request, false)
        .map_err(|e| format!("send: {e}"))?;
    body.send_data(Bytes::from_static(MESSAGE), true)
        .map_err(|e| format!("send data: {e}"))?;
    let response = response.await.map_err(|e| format!("response: {e}"))?;
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| format!("response data: {e}"))?;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body
        .trailers()
        .await
        .map_err(|e| format!("trailers: {e}"))?;
    match trailers.as_ref().and_then(|t| t.get("grpc-status")) {
        Some(status) if status == "0" => Ok(()),
        other => Err(format!("call ended with grpc-status {other:?}")),
    }
}

/// The backend: answers every call with its own message and `grpc-status: 0`.
async fn serve_backend(listener: TcpListener) {
    while let Ok((tcp, _)) = listener.accept().await {
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let Ok(mut conn) = h2::server::handshake(tcp).await else {
                return;
            };
            while let Some(Ok((request, respond))) = conn.accept().await {
                tokio::spawn(answer(request, respond));
            }
        });
    }
}

async fn answer(request: Request<RecvStream>, mut respond: SendResponse<Bytes>) {
    let mut body = request.into_body();
    let mut message = Vec::new();
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
        message.extend_from_slice(&chunk);
    }
    let response = Response::builder()
        .header("content-type", "application/grpc")
        .body(());
    let Ok(response) = response else { return };
    let Ok(mut stream) = respond.send_response(response, false) else {
        return;
    };
    let _ = stream.send_data(Bytes::from(message), false);
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let _ = stream.send_trailers(trailers);
}

/// CPU time of the proxy's threads so far (Linux: `/proc/self/task/*/schedstat`).
fn proxy_cpu() -> Option<Duration> {
    let tasks = std::fs::read_dir("/proc/self/task").ok()?;
    let mut total = Duration::ZERO;
    for task in tasks.flatten() {
        let path = task.path();
        let Ok(name) = std::fs::read_to_string(path.join("comm")) else {
            continue;
        };
        if !name.starts_with(PROXY_THREAD) {
            continue;
        }
        let stat = std::fs::read_to_string(path.join("schedstat")).ok()?;
        let ns: u64 = stat.split_whitespace().next()?.parse().ok()?;
        total += Duration::from_nanos(ns);
    }
    Some(total)
}
