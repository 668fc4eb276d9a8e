//! Bad input and awkward peers: each is followed by a normal call that must succeed, and the
//! proxy stays up. Plus the byte-level guarantees of l4: half-close passed on, idle timeout.

// A test stops at what it did not expect (unwrap/expect), and times real processes by the
// wall clock: the library's lints against both (Cargo.toml, clippy.toml) are not meant here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

#[macro_use]
mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use support::{Proxy, Worker, eventually, unary_ok};

fn start(mode: &str, workers: &[Worker], extra: &[&str]) -> Proxy {
    let mut args: Vec<String> = vec!["--mode".into(), mode.into()];
    args.extend(
        workers
            .iter()
            .flat_map(|w| ["--backend".to_owned(), w.addr()]),
    );
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Proxy::start(&refs)
}

/// Reads until the peer closes (or 10 s pass); returns what arrived.
fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    got
}

fn garbage_bytes_then_a_normal_call(mode: &str) {
    let workers = Worker::start_many(&["g"]);
    let mut proxy = start(mode, &workers, &[]);
    let mut s = TcpStream::connect(proxy.addr).expect("connect");
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    s.write_all(&garbage).expect("send garbage");
    read_until_closed(&mut s);
    unary_ok(&proxy.target());
    assert!(proxy.is_running());
}

fn an_http1_request_then_a_normal_call(mode: &str) {
    let workers = Worker::start_many(&["h"]);
    let mut proxy = start(mode, &workers, &[]);
    let mut s = TcpStream::connect(proxy.addr).expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
        .expect("send");
    read_until_closed(&mut s);
    unary_ok(&proxy.target());
    assert!(proxy.is_running());
}

fn a_silent_client_does_not_hold_up_others(mode: &str) {
    let workers = Worker::start_many(&["s"]);
    let mut proxy = start(mode, &workers, &[]);
    let silent: Vec<TcpStream> = (0..5)
        .map(|_| TcpStream::connect(proxy.addr).expect("connect"))
        .collect();
    unary_ok(&proxy.target());
    drop(silent);
    unary_ok(&proxy.target());
    assert!(proxy.is_running());
}

fn five_hundred_connections_opened_and_dropped_at_once(mode: &str) {
    let workers = Worker::start_many(&["f0", "f1"]);
    let mut proxy = start(mode, &workers, &[]);
    let conns: Vec<TcpStream> = (0..500)
        .filter_map(|_| TcpStream::connect(proxy.addr).ok())
        .collect();
    assert!(
        conns.len() >= 450,
        "only {} of 500 connects succeeded",
        conns.len()
    );
    drop(conns);
    unary_ok(&proxy.target());
    eventually(
        Duration::from_secs(20),
        "every dropped connection is closed",
        || proxy.metric("portshare_connections_active") == 0.0,
    );
    // Nothing was blamed on the workers: a client hanging up is not a backend fault.
    for b in proxy.backends() {
        assert_eq!(b["ejections"], 0, "{b}");
    }
    assert!(proxy.is_running());
}

/// A backend that, on every connection, reads until the client's half-close, then answers
/// with the byte count (health checks connect too, so it serves any number).
fn counting_backend() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            thread::spawn(move || {
                let mut got = Vec::new();
                if s.read_to_end(&mut got).is_ok() {
                    let _ = write!(s, "got {} bytes", got.len());
                }
            });
        }
    });
    addr
}

#[test]
fn half_close_is_passed_on_both_ways() {
    let backend = counting_backend();
    let proxy = Proxy::start(&["--backend", &backend]);
    let mut s = TcpStream::connect(proxy.addr).expect("connect");
    s.write_all(b"hello").expect("send");
    s.shutdown(Shutdown::Write).expect("half-close");
    // The backend only answers after it saw our FIN; its own close must reach us as EOF.
    let answer = read_until_closed(&mut s);
    assert_eq!(String::from_utf8_lossy(&answer), "got 5 bytes");
}

#[test]
fn an_idle_connection_is_closed_after_the_idle_timeout() {
    // A backend that accepts and then says nothing, like a worker waiting for a request.
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let backend = l.local_addr().expect("addr").to_string();
    thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            thread::spawn(move || {
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink);
            });
        }
    });
    let proxy = Proxy::start(&["--backend", &backend, "--idle-timeout", "300ms"]);
    let mut s = TcpStream::connect(proxy.addr).expect("connect");
    s.write_all(b"ping").expect("send");
    let started = std::time::Instant::now();
    let got = read_until_closed(&mut s);
    assert!(got.is_empty());
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "not closed by the idle timeout"
    );
}

/// Out of file descriptors: accept fails with EMFILE, which is logged and backed off (not a
/// spin, not an exit), no worker is blamed, and service returns once descriptors free up.
#[cfg(target_os = "linux")]
#[test]
fn running_out_of_file_descriptors_is_survived() {
    use std::process::{Command, Stdio};
    if Command::new("prlimit")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        eprintln!(
            "SKIPPED: prlimit (util-linux) is not installed; running out of descriptors is not tested"
        );
        return;
    }
    let workers = Worker::start_many(&["fd"]);
    // A small descriptor table: ~20 for the runtime and listeners, and two per proxied
    // connection.
    let mut child_args: Vec<String> = vec![
        "--nofile=48:48".into(),
        "--".into(),
        env!("CARGO_BIN_EXE_portshare").into(),
    ];
    child_args.extend(["--backend".into(), workers[0].addr()]);
    let mut proxy = Proxy::start_with("prlimit", &child_args);
    let held: Vec<TcpStream> = (0..60)
        .filter_map(|_| TcpStream::connect(proxy.addr).ok())
        .collect();
    eventually(
        Duration::from_secs(20),
        "accept runs out of descriptors",
        || proxy.log.contains("accept failed"),
    );
    assert!(proxy.is_running());
    drop(held);
    eventually(Duration::from_secs(30), "service returns", || {
        support::client(&["unary", "--target", &proxy.target(), "--timeout", "5"])["code"] == "OK"
    });
    assert!(proxy.metric("portshare_accept_errors_total") >= 1.0);
    for b in proxy.backends() {
        assert_eq!(
            b["ejections"], 0,
            "a worker was blamed for our own shortage: {b}"
        );
    }
    assert!(proxy.is_running());
}

in_both_modes!(
    garbage_bytes_then_a_normal_call,
    an_http1_request_then_a_normal_call,
    a_silent_client_does_not_hold_up_others,
    five_hundred_connections_opened_and_dropped_at_once,
);
