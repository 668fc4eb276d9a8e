//! A connection flood against --max-connections: portshare stays within a memory bound,
//! keeps serving the connections it accepted, and recovers fully when the flood ends.

// A test stops at what it did not expect (unwrap/expect), and times real processes by the
// wall clock: the library's lints against both (Cargo.toml, clippy.toml) are not meant here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
// Reads /proc and sends Unix signals: Linux only.
#![cfg(target_os = "linux")]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::{Proxy, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An in-process echo backend: whatever arrives goes back. It shares the test's descriptor
/// limit with the 10,000 flooding sockets, so a failed accept (EMFILE) is waited out, not
/// the end of the backend.
async fn echo_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let mut s = match listener.accept().await {
                Ok((s, _)) => s,
                Err(_) => {
                    // Backing off a failed accept (EMFILE while the flood holds the
                    // descriptors), as a server does; no wait for anything.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Runs a blocking check (`eventually`, a scrape) without stalling this runtime's worker,
/// whose queued tasks (the echo backend's) move to another thread meanwhile.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

async fn ping(s: &mut TcpStream, text: &[u8]) {
    s.write_all(text).await.expect("write");
    let mut back = vec![0u8; text.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
        .await
        .expect("echo within 10 s")
        .expect("echo");
    assert_eq!(back, text);
}

/// The proxy's resident memory, from /proc (Linux).
#[cfg(target_os = "linux")]
fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_connections_against_a_limit_of_a_thousand() {
    let backend = echo_backend().await;
    let proxy = Proxy::start(&[
        "--backend",
        &backend.to_string(),
        "--max-connections",
        "1000",
    ]);
    let addr = proxy.addr;

    // A connection accepted before the flood.
    let mut steady = TcpStream::connect(addr).await.expect("connect");
    ping(&mut steady, b"before").await;

    // The flood: 10,000 connects at once, each given 3 s; they are held until the end.
    let attempts: Vec<_> = (0..10_000)
        .map(|_| {
            tokio::spawn(tokio::time::timeout(
                Duration::from_secs(3),
                TcpStream::connect(addr),
            ))
        })
        .collect();
    let mut held = Vec::new();
    for a in attempts {
        if let Ok(Ok(Ok(s))) = a.await {
            held.push(s);
        }
    }
    assert!(held.len() >= 1000, "only {} connects completed", held.len());
    blocking(|| {
        eventually(Duration::from_secs(20), "the limit is reached", || {
            proxy.metric("portshare_connections_active") >= 999.0
        })
    });
    // Never more than the limit held at once (the steady one included).
    assert!(blocking(|| proxy.metric("portshare_connections_active")) <= 1000.0);
    // The connection accepted before the flood is still served.
    ping(&mut steady, b"during").await;
    let peak = rss_kib(proxy.pid(), "VmHWM:");
    assert!(
        peak < 200 * 1024,
        "peak RSS {peak} KiB with 1000 connections"
    );

    // The flood ends: everything is released, and new connections are served at once.
    drop(held);
    blocking(|| {
        eventually(Duration::from_secs(60), "the flood drains", || {
            proxy.metric("portshare_connections_active") <= 1.0
        })
    });
    let mut after = TcpStream::connect(addr)
        .await
        .expect("connect after the flood");
    ping(&mut after, b"after").await;
    ping(&mut steady, b"still").await;
    eprintln!("peak RSS with 1000 held connections: {peak} KiB");
}
