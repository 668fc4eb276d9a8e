//! h2 mode only: what per-call balancing adds over l4, and how it fails well.

// A test stops at what it did not expect (unwrap/expect), and times real processes by the
// wall clock: the library's lints against both (Cargo.toml, clippy.toml) are not meant here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::{Proxy, Worker, client, closed_port, eventually, spread_counts, unary_ok};

fn start(workers: &[Worker], extra: &[&str], env: &[(&str, &str)]) -> Proxy {
    let mut args: Vec<String> = vec!["--mode".into(), "h2".into()];
    for w in workers {
        args.extend(["--backend".to_owned(), w.addr()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Proxy::start_env(&refs, env)
}

/// The point of h2 mode: ONE client channel (one TCP connection) reaches every worker,
/// evenly enough.
#[test]
fn one_channel_spreads_its_calls_over_every_worker() {
    let workers = Worker::start_many(&["a", "b", "c", "d"]);
    let proxy = start(&workers, &[], &[]);
    let r = client(&["one-channel", "--target", &proxy.target(), "--calls", "400"]);
    assert_eq!(r["errors"].as_array().map(Vec::len), Some(0), "{r}");
    let counts = spread_counts(&r);
    assert_eq!(counts.len(), 4, "{counts:?}");
    for (w, n) in &counts {
        assert!(
            *n <= 150,
            "{w} took {n} of 400 calls (fair share 100): {counts:?}"
        );
    }
    // One client connection, many backend streams.
    assert_eq!(proxy.metric("portshare_connections_accepted_total"), 1.0);
}

/// A worker killed mid-call: that call ends UNAVAILABLE (never an HTTP error), and the
/// next call through the same proxy succeeds on the other worker.
#[cfg(unix)]
#[test]
fn a_worker_killed_mid_call_fails_only_that_call() {
    let mut workers = Worker::start_many(&["one", "two"]);
    // Checks so rare that only the failing call itself can notice the death.
    let proxy = start(&workers, &[], &[("PORTSHARE_HEALTH__INTERVAL", "1h")]);
    let call =
        support::client_spawn(&["unary", "--target", &proxy.target(), "--sleep-ms", "20000"]);
    eventually(Duration::from_secs(20), "the call is in flight", || {
        workers.iter().any(|w| w.log.contains("CALL Unary"))
    });
    let victim = workers
        .iter()
        .position(|w| w.log.contains("CALL Unary"))
        .unwrap_or(0);
    support::signal(workers[victim].pid(), "KILL");
    let r = support::client_result(call);
    assert_eq!(r["code"], "UNAVAILABLE", "{r}");
    assert!(
        r["details"]
            .as_str()
            .is_some_and(|d| d.contains("portshare")),
        "{r}"
    );
    drop(workers.remove(victim));
    for _ in 0..5 {
        let r = unary_ok(&proxy.target());
        assert_eq!(r["worker"], workers[0].name.as_str(), "{r}");
    }
}

/// No backend that can take the call: it waits up to the queue timeout, then ends
/// UNAVAILABLE with a message saying how long it waited and why; the proxy stays up. A
/// deadline shorter than the queue timeout ends the wait as DEADLINE_EXCEEDED.
#[test]
fn no_backend_is_unavailable_after_the_queue_timeout() {
    let dead = format!("127.0.0.1:{}", closed_port());
    let proxy = Proxy::start(&["--mode", "h2", "--backend", &dead, "--queue-timeout", "1s"]);
    let started = Instant::now();
    let r = client(&["unary", "--target", &proxy.target(), "--timeout", "10"]);
    assert_eq!(r["code"], "UNAVAILABLE", "{r}");
    let details = r["details"].as_str().unwrap_or_default();
    assert!(
        details.contains("no backend could take the call after waiting 1.0")
            && details.contains("no backend is ready"),
        "{r}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(proxy.metric("portshare_calls_total{backend=\"none\",grpc_status=\"14\"}") >= 1.0);
    // Counted with its method too, and timed.
    let method = "/portshare.test.Echo/Unary";
    assert!(
        proxy.metric(&format!(
            "portshare_method_calls_total{{method=\"{method}\",grpc_status=\"14\"}}"
        )) >= 1.0
    );
    assert!(
        proxy.metric(&format!(
            "portshare_call_duration_seconds_count{{method=\"{method}\"}}"
        )) >= 1.0
    );
    assert!(proxy.metric("portshare_queue_timeouts_total") >= 1.0);
    assert_eq!(proxy.metric("portshare_queue_waiting"), 0.0);
    let r = client(&["unary", "--target", &proxy.target(), "--timeout", "0.5"]);
    assert_eq!(r["code"], "DEADLINE_EXCEEDED", "{r}");

    // A queue timeout of 0 fails at once, as before there was a queue.
    let at_once = Proxy::start(&["--mode", "h2", "--backend", &dead, "--queue-timeout", "0s"]);
    let started = Instant::now();
    let r = client(&["unary", "--target", &at_once.target(), "--timeout", "10"]);
    assert_eq!(r["code"], "UNAVAILABLE", "{r}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
}

/// HTTP/1.1 gets a clear 505 answer; garbage is closed; a normal call follows.
#[test]
fn http1_and_garbage_are_rejected_clearly() {
    let workers = Worker::start_many(&["x"]);
    let proxy = start(&workers, &[], &[]);
    let mut s = TcpStream::connect(proxy.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
        .expect("send");
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 505"), "{answer:?}");
    assert!(answer.contains("HTTP/2"), "{answer:?}");

    let mut g = TcpStream::connect(proxy.addr).expect("connect");
    g.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    g.write_all(&[0x16, 0x03, 0x01, 0x00, 0xff, 0x42])
        .expect("send");
    let mut rest = Vec::new();
    let _ = g.read_to_end(&mut rest);
    assert!(rest.is_empty(), "garbage got an answer: {rest:?}");
    unary_ok(&proxy.target());
}

/// Over the limit of calls in flight, the excess is shed at once as RESOURCE_EXHAUSTED.
#[test]
fn calls_over_the_limit_are_shed_at_once() {
    let workers = Worker::start_many(&["busy"]);
    let proxy = start(&workers, &[], &[("PORTSHARE_H2__MAX_CALLS", "1")]);
    let slow = support::client_spawn(&["unary", "--target", &proxy.target(), "--sleep-ms", "3000"]);
    eventually(
        Duration::from_secs(20),
        "the slow call holds the only slot",
        || workers[0].log.contains("CALL Unary"),
    );
    let started = Instant::now();
    let r = client(&["unary", "--target", &proxy.target()]);
    assert_eq!(r["code"], "RESOURCE_EXHAUSTED", "{r}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "not shed at once"
    );
    assert!(proxy.metric("portshare_calls_shed_total") >= 1.0);
    assert_eq!(support::client_result(slow)["code"], "OK");
    unary_ok(&proxy.target());
}

/// A rolling restart under one steady client channel: each worker leaves rotation, its
/// in-flight calls finish, its GOAWAY sends new calls elsewhere; no call fails.
#[cfg(unix)]
#[test]
fn a_rolling_restart_loses_no_call_of_a_steady_channel() {
    let mut args: Vec<String> = vec!["--mode".into(), "h2".into()];
    args.extend(support::spawn_args(3, &[]));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let proxy = Proxy::start(&refs);
    eventually(Duration::from_secs(30), "workers ready", || {
        proxy.backends().iter().all(|b| b["state"] == "healthy")
    });
    let steady = support::client_spawn(&[
        "steady",
        "--target",
        &proxy.target(),
        "--seconds",
        "6",
        "--pause-ms",
        "2",
    ]);
    eventually(
        Duration::from_secs(20),
        "the steady client is calling",
        || proxy.worker_calls("Unary") >= 10,
    );
    support::signal(proxy.pid(), "HUP");
    eventually(
        Duration::from_secs(60),
        "the rolling restart is done",
        || proxy.log.contains("rolling restart done"),
    );
    let r = support::client_result(steady);
    assert_eq!(r["errors"].as_array().map(Vec::len), Some(0), "{r}");
    assert_eq!(spread_counts(&r).len(), 3, "{r}");
}

/// The access log: one JSON line per call, with the status its client saw, the method,
/// the backend and the bytes both ways.
#[test]
fn the_access_log_has_one_line_per_call_with_its_status() {
    let workers = Worker::start_many(&["a", "b"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("access.log");
    let log = path.to_str().expect("a UTF-8 path");
    // The proxy logs JSON (tests/support passes --log-format json): so does the access log.
    let proxy = start(&workers, &["--access-log", log], &[]);
    let r = client(&[
        "one-channel",
        "--target",
        &proxy.target(),
        "--calls",
        "1000",
    ]);
    assert_eq!(r["errors"].as_array().map(Vec::len), Some(0), "{r}");
    let r = client(&["unary", "--target", &proxy.target(), "--fail-code", "5"]);
    assert_eq!(r["code"], "NOT_FOUND", "{r}");
    let read = || support::json_lines(&path);
    // Written by a thread of their own: wait until all 1,001 are there.
    eventually(Duration::from_secs(10), "1,001 access-log lines", || {
        read().len() >= 1001
    });
    let lines = read();
    assert_eq!(lines.len(), 1001);
    let backends: Vec<String> = workers.iter().map(Worker::addr).collect();
    for line in &lines[..1000] {
        assert_eq!(line["kind"], "call", "{line}");
        assert_eq!(line["method"], "/portshare.test.Echo/Unary", "{line}");
        assert_eq!(line["grpc_status"], 0, "{line}");
        let backend = line["backend"].as_str().unwrap_or_default();
        assert!(backends.iter().any(|b| b == backend), "{line}");
        assert!(line["request_bytes"].as_u64() > Some(0), "{line}");
        assert!(line["response_bytes"].as_u64() > Some(0), "{line}");
        assert!(line["duration_ms"].as_f64().is_some(), "{line}");
    }
    assert_eq!(lines[1000]["grpc_status"], 5, "{}", lines[1000]);
}
