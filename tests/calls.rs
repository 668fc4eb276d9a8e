//! Both modes end to end: real Python grpcio workers behind the real binary, driven by real
//! Python grpcio clients. Each behaviour is one function taking the mode; the `l4` and `h2`
//! modules at the bottom run it in each.

// A test stops at what it did not expect (unwrap/expect), and times real processes by the
// wall clock: the library's lints against both (Cargo.toml, clippy.toml) are not meant here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

#[macro_use]
mod support;

use std::collections::HashSet;
use std::time::Duration;

use support::{
    Proxy, Worker, client, closed_port, eventually, every_call_kind_ok, spread_counts, unary_ok,
};

fn backends_args(workers: &[Worker]) -> Vec<String> {
    workers
        .iter()
        .flat_map(|w| ["--backend".to_owned(), w.addr()])
        .collect()
}

fn start_proxy(mode: &str, workers: &[Worker], extra: &[&str]) -> Proxy {
    let mut args = backends_args(workers);
    args.extend(["--mode".to_owned(), mode.to_owned()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Proxy::start(&refs)
}

fn every_kind_of_call_goes_through(mode: &str) {
    let workers = Worker::start_many(&["a", "b"]);
    let proxy = start_proxy(mode, &workers, &[]);
    let t = proxy.target();

    every_call_kind_ok(&t);

    if mode == "h2" {
        // Every call is counted with its backend and gRPC status.
        let ok: f64 = workers
            .iter()
            .map(|w| {
                proxy.metric(&format!(
                    "portshare_calls_total{{backend=\"{}\",grpc_status=\"0\"}}",
                    w.addr()
                ))
            })
            .sum();
        assert_eq!(ok, 4.0, "four calls, all OK");
        // And with its gRPC method: one call of each kind.
        for method in ["Unary", "ServerStream", "ClientStream", "Bidi"] {
            let series = format!(
                "portshare_method_calls_total{{method=\"/portshare.test.Echo/{method}\",grpc_status=\"0\"}}"
            );
            assert_eq!(proxy.metric(&series), 1.0, "{series}");
        }
        return;
    }
    // Byte counters moved in both directions, per backend.
    let sent: f64 = workers
        .iter()
        .map(|w| {
            proxy.metric(&format!(
                "portshare_backend_sent_bytes_total{{backend=\"{}\"}}",
                w.addr()
            ))
        })
        .sum();
    let received: f64 = workers
        .iter()
        .map(|w| {
            proxy.metric(&format!(
                "portshare_backend_received_bytes_total{{backend=\"{}\"}}",
                w.addr()
            ))
        })
        .sum();
    assert!(
        sent > 100_000.0 && received > 10_000.0,
        "sent {sent}, received {received}"
    );
}

fn an_8_mib_message_arrives_byte_exact_both_ways(mode: &str) {
    let workers = Worker::start_many(&["a"]);
    let proxy = start_proxy(mode, &workers, &[]);
    let r = client(&[
        "unary",
        "--target",
        &proxy.target(),
        "--payload-size",
        "8388608",
    ]);
    support::assert_complete(&r, "payload_len", 8 << 20, "payload_ok");
    let r = client(&[
        "unary",
        "--target",
        &proxy.target(),
        "--payload-size",
        "10",
        "--reply-size",
        "8388608",
    ]);
    support::assert_complete(&r, "payload_len", 8 << 20, "payload_ok");
}

fn metadata_status_and_details_pass_unchanged(mode: &str) {
    let workers = Worker::start_many(&["meta"]);
    let proxy = start_proxy(mode, &workers, &[]);
    let t = proxy.target();

    let r = client(&[
        "unary",
        "--target",
        &t,
        "--metadata",
        "x-request-id=abc123",
        "--metadata",
        "x-tenant=blue",
    ]);
    assert_eq!(r["code"], "OK", "{r}");
    assert_eq!(r["metadata"]["x-request-id"], "abc123", "{r}");
    assert_eq!(r["metadata"]["x-tenant"], "blue", "{r}");
    assert_eq!(r["initial_metadata"]["x-worker"], "meta", "{r}");
    assert_eq!(r["trailing_metadata"]["x-trailer"], "done-meta", "{r}");

    let r = client(&[
        "unary",
        "--target",
        &t,
        "--fail-code",
        "9",
        "--fail-message",
        "not today: precondition",
    ]);
    assert_eq!(r["code"], "FAILED_PRECONDITION", "{r}");
    assert_eq!(r["details"], "not today: precondition", "{r}");
    assert_eq!(
        r["trailing_metadata"]["x-error-detail"], "not today: precondition",
        "{r}"
    );
    assert_eq!(r["trailing_metadata"]["x-error-bin"], "0001feff", "{r}");
}

fn a_deadline_is_exceeded_on_a_slow_worker(mode: &str) {
    let workers = Worker::start_many(&["slow"]);
    let proxy = start_proxy(mode, &workers, &[]);
    let r = client(&[
        "unary",
        "--target",
        &proxy.target(),
        "--sleep-ms",
        "5000",
        "--timeout",
        "0.5",
    ]);
    assert_eq!(r["code"], "DEADLINE_EXCEEDED", "{r}");
    // The deadline travelled through the proxy: the worker itself gave up on the call.
    eventually(
        Duration::from_secs(10),
        "the worker sees the call cancelled",
        || workers[0].log.contains("CANCELLED Unary"),
    );
    unary_ok(&proxy.target());
}

fn forty_channels_spread_over_all_four_backends(mode: &str) {
    let workers = Worker::start_many(&["w0", "w1", "w2", "w3"]);
    let proxy = start_proxy(mode, &workers, &[]);
    let r = client(&["spread", "--target", &proxy.target(), "--channels", "40"]);
    assert_eq!(r["errors"].as_array().map(Vec::len), Some(0), "{r}");
    let counts = spread_counts(&r);
    assert_eq!(counts.len(), 4, "not every worker was reached: {counts:?}");
    // l4's least-conn rotates through ties, so sequential connections spread evenly; h2's
    // p2c picks at random among equals, so only reaching every worker is certain.
    if mode == "l4" {
        for (worker, n) in &counts {
            assert!(*n >= 4, "{worker} got only {n} of 40: {counts:?}");
        }
    }
    let accepted = proxy.metric("portshare_connections_accepted_total");
    assert!(accepted >= 40.0, "accepted {accepted}");
}

fn other_balancers_spread_too(mode: &str) {
    let workers = Worker::start_many(&["r0", "r1", "r2"]);
    for balance in ["round-robin", "p2c"] {
        let proxy = start_proxy(mode, &workers, &["--balance", balance]);
        let r = client(&["spread", "--target", &proxy.target(), "--channels", "30"]);
        assert_eq!(
            r["errors"].as_array().map(Vec::len),
            Some(0),
            "{balance}: {r}"
        );
        assert_eq!(spread_counts(&r).len(), 3, "{balance}: {r}");
    }
}

/// Passive path: a backend that dies between health checks is found out by the first
/// connection to it, which is retried elsewhere; the backend is ejected.
fn a_backend_that_dies_is_skipped_without_a_failed_call(mode: &str) {
    let mut workers = Worker::start_many(&["up0", "up1", "up2", "doomed"]);
    let mut args = backends_args(&workers);
    args.extend(["--mode".to_owned(), mode.to_owned()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    // Checks so rare that only real traffic can notice the death.
    let proxy = Proxy::start_env(&refs, &[("PORTSHARE_HEALTH__INTERVAL", "1h")]);
    eventually(
        Duration::from_secs(10),
        "every backend checked healthy",
        || proxy.backends().iter().all(|b| b["state"] == "healthy"),
    );
    let doomed = workers.pop().expect("four workers");
    let dead = doomed.addr();
    drop(doomed);
    let r = client(&["spread", "--target", &proxy.target(), "--channels", "30"]);
    assert_eq!(r["errors"].as_array().map(Vec::len), Some(0), "{r}");
    let reached: HashSet<String> = spread_counts(&r).into_keys().collect();
    assert_eq!(reached.len(), 3, "{r}");

    let retries = match mode {
        "l4" => "portshare_connect_retries_total",
        _ => "portshare_call_retries_total",
    };
    assert!(proxy.metric(retries) >= 1.0, "{retries}");
    let refused =
        format!("portshare_backend_connect_errors_total{{backend=\"{dead}\",reason=\"refused\"}}");
    assert!(proxy.metric(&refused) >= 1.0, "{refused}");
    let backends = proxy.backends();
    let entry = backends
        .iter()
        .find(|b| b["name"] == dead.as_str())
        .expect("dead backend listed");
    assert!(entry["ejections"].as_u64() >= Some(1), "{entry}");
    assert!(entry["connect_failures"].as_u64() >= Some(1), "{entry}");
    assert_eq!(entry["state"], "ejected", "{entry}");
    assert_eq!(entry["active_connections"], 0, "{entry}");
    assert_eq!(proxy.admin_get("/readyz").0, 200);
    assert_eq!(proxy.admin_get("/healthz").0, 200);
}

/// Active path: a backend that is down from the start fails its first check and never gets
/// a connection.
fn a_backend_that_is_down_from_the_start_gets_no_traffic(mode: &str) {
    let workers = Worker::start_many(&["live0", "live1"]);
    let dead = format!("127.0.0.1:{}", closed_port());
    let proxy = start_proxy(mode, &workers, &["--backend", &dead]);
    eventually(
        Duration::from_secs(10),
        "the dead backend is marked unhealthy",
        || {
            proxy
                .backends()
                .iter()
                .any(|b| b["name"] == dead.as_str() && b["state"] == "unhealthy")
        },
    );
    let r = client(&["spread", "--target", &proxy.target(), "--channels", "20"]);
    assert_eq!(r["errors"].as_array().map(Vec::len), Some(0), "{r}");
    assert_eq!(spread_counts(&r).len(), 2, "{r}");
    let tried =
        format!("portshare_backend_connect_errors_total{{backend=\"{dead}\",reason=\"refused\"}}");
    assert_eq!(
        proxy.metric(&tried),
        0.0,
        "traffic was sent to a backend known to be down"
    );
    let (status, body) = proxy.admin_get("/metrics");
    assert_eq!(status, 200);
    assert!(
        body.contains(&format!("portshare_backend_up{{backend=\"{dead}\"}} 0")),
        "{body}"
    );
    assert_eq!(proxy.admin_get("/readyz").0, 200);
}

#[cfg(unix)]
fn sigterm_lets_an_in_flight_call_complete_and_exits_zero(mode: &str) {
    let workers = Worker::start_many(&["drain"]);
    let mut proxy = start_proxy(mode, &workers, &["--drain-timeout", "20s"]);
    let call = support::client_spawn(&["unary", "--target", &proxy.target(), "--sleep-ms", "2000"]);
    eventually(
        Duration::from_secs(30),
        "the call reaches the worker",
        || workers[0].log.contains("CALL Unary"),
    );
    support::signal(proxy.pid(), "TERM");
    // While draining, readiness is withdrawn so an orchestrator stops sending work.
    eventually(Duration::from_secs(5), "/readyz says draining", || {
        proxy.admin_get("/readyz").0 == 503
    });
    let r = support::client_result(call);
    assert_eq!(r["code"], "OK", "{r}");
    let status = proxy
        .wait(Duration::from_secs(20))
        .expect("portshare exits after the drain");
    assert_eq!(status.code(), Some(0));
    assert!(proxy.log.contains("drained"), "{:?}", proxy.log.all());
}

#[cfg(unix)]
fn the_drain_timeout_closes_what_is_left(mode: &str) {
    let workers = Worker::start_many(&["stuck"]);
    let mut proxy = start_proxy(mode, &workers, &["--drain-timeout", "300ms"]);
    let call = support::client_spawn(&[
        "unary",
        "--target",
        &proxy.target(),
        "--sleep-ms",
        "20000",
        "--timeout",
        "60",
    ]);
    eventually(
        Duration::from_secs(30),
        "the call reaches the worker",
        || workers[0].log.contains("CALL Unary"),
    );
    support::signal(proxy.pid(), "TERM");
    let status = proxy
        .wait(Duration::from_secs(10))
        .expect("portshare exits when the drain time is over");
    assert_eq!(status.code(), Some(0));
    let r = support::client_result(call);
    assert_eq!(r["code"], "UNAVAILABLE", "{r}");
}

fn max_connections_holds_the_excess_in_the_backlog(mode: &str) {
    use std::net::TcpStream;
    let workers = Worker::start_many(&["cap"]);
    let proxy = start_proxy(mode, &workers, &["--max-connections", "2"]);
    let held: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(proxy.addr).expect("connect"))
        .collect();
    // The gauge appears once the listener runs: absent until then, not yet 2.
    eventually(Duration::from_secs(10), "both connections proxied", || {
        proxy
            .try_metric("portshare_connections_active")
            .is_some_and(|n| n >= 2.0)
    });
    let r = client(&["unary", "--target", &proxy.target(), "--timeout", "1"]);
    assert_ne!(r["code"], "OK", "a third connection was served: {r}");
    drop(held);
    eventually(
        Duration::from_secs(10),
        "the held connections close",
        || proxy.metric("portshare_connections_active") == 0.0,
    );
    unary_ok(&proxy.target());
}

/// A Trailers-Only error (the worker fails before sending any header) arrives as it was sent.
fn a_trailers_only_error_arrives_unchanged(mode: &str) {
    let workers = Worker::start_many(&["to"]);
    let proxy = start_proxy(mode, &workers, &[]);
    let r = client(&[
        "unary",
        "--target",
        &proxy.target(),
        "--fail-code",
        "5",
        "--fail-message",
        "gone",
        "--trailers-only",
    ]);
    assert_eq!(r["code"], "NOT_FOUND", "{r}");
    assert_eq!(r["details"], "gone", "{r}");
    assert_eq!(r["initial_metadata"], serde_json::json!({}), "{r}");
    assert_eq!(r["trailing_metadata"]["x-error-bin"], "0001feff", "{r}");
    unary_ok(&proxy.target());
}

/// A client that cancels: the worker observes the cancellation.
fn a_client_cancel_reaches_the_worker(mode: &str) {
    let workers = Worker::start_many(&["cx"]);
    let proxy = start_proxy(mode, &workers, &[]);
    let r = client(&[
        "unary",
        "--target",
        &proxy.target(),
        "--sleep-ms",
        "20000",
        "--cancel-after",
        "0.5",
    ]);
    assert_eq!(r["code"], "CANCELLED", "{r}");
    eventually(
        Duration::from_secs(10),
        "the worker sees the cancel",
        || workers[0].log.contains("CANCELLED Unary"),
    );
    unary_ok(&proxy.target());
}

in_both_modes!(
    every_kind_of_call_goes_through,
    an_8_mib_message_arrives_byte_exact_both_ways,
    metadata_status_and_details_pass_unchanged,
    a_deadline_is_exceeded_on_a_slow_worker,
    forty_channels_spread_over_all_four_backends,
    other_balancers_spread_too,
    a_backend_that_dies_is_skipped_without_a_failed_call,
    a_backend_that_is_down_from_the_start_gets_no_traffic,
    #[cfg(unix)]
    sigterm_lets_an_in_flight_call_complete_and_exits_zero,
    #[cfg(unix)]
    the_drain_timeout_closes_what_is_left,
    a_trailers_only_error_arrives_unchanged,
    a_client_cancel_reaches_the_worker,
);

/// The connection limit is a listener feature; its test speaks raw TCP, which is l4's.
#[test]
fn max_connections_holds_the_excess_in_the_backlog_l4() {
    max_connections_holds_the_excess_in_the_backlog("l4");
}

/// l4's access log: one line per client connection, naming its backend and the bytes
/// both ways. (h2's, one line per call, is tested in tests/h2.rs.)
#[test]
fn the_l4_access_log_has_one_line_per_connection() {
    let workers = Worker::start_many(&["a"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("access.log");
    let log = path.to_str().expect("a UTF-8 path");
    // The proxy logs JSON (tests/support passes --log-format json): so does the access log.
    let proxy = start_proxy("l4", &workers, &["--access-log", log]);
    for _ in 0..3 {
        unary_ok(&proxy.target());
    }
    let read = || support::json_lines(&path);
    // A line is written when its connection ends: each client process closes its own.
    eventually(Duration::from_secs(10), "3 access-log lines", || {
        read().len() >= 3
    });
    let lines = read();
    assert_eq!(lines.len(), 3, "{lines:?}");
    for line in &lines {
        assert_eq!(line["kind"], "connection", "{line}");
        assert_eq!(line["backend"], workers[0].addr(), "{line}");
        assert_eq!(line["end"], "closed", "{line}");
        assert!(line["to_backend"].as_u64() > Some(0), "{line}");
        assert!(line["to_client"].as_u64() > Some(0), "{line}");
    }
}
