//! Backends on Unix domain sockets, end to end: real grpcio workers bound to `unix:` paths
//! (and, on Linux, `unix-abstract:` names) behind the real binary, in both modes; and
//! spawned workers given a socket each by `--worker-socket-dir`.
#![cfg(unix)]

mod support;

use std::path::Path;
use std::time::Duration;

use support::{Proxy, Worker, client, eventually, every_call_kind_ok, run_portshare, unary_ok};

const WAIT: Duration = Duration::from_secs(30);

/// Workers named `names`, each on `DIR/<name>.sock`.
fn socket_workers(dir: &Path, names: &[&str]) -> Vec<Worker> {
    let at: Vec<(&str, Option<String>)> = names
        .iter()
        .map(|n| {
            (
                *n,
                Some(format!("unix:{}", dir.join(format!("{n}.sock")).display())),
            )
        })
        .collect();
    Worker::start_at(&at)
}

fn proxy_for(workers: &[Worker], flags: &[&str]) -> Proxy {
    let mut args: Vec<String> = workers
        .iter()
        .flat_map(|w| ["--backend".to_owned(), w.addr()])
        .collect();
    args.extend(flags.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Proxy::start(&refs)
}

fn static_socket_backends_serve_every_kind_of_call(mode: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let workers = socket_workers(dir.path(), &["a", "b"]);
    let proxy = proxy_for(&workers, &["--mode", mode]);
    eventually(WAIT, "both socket backends healthy", || proxy.all_healthy());
    every_call_kind_ok(&proxy.target());

    // Calls reach both workers (sequential connections visit every backend in l4).
    let r = client(&["spread", "--target", &proxy.target(), "--channels", "10"]);
    let counts = support::spread_counts(&r);
    assert_eq!(counts.len(), 2, "{r}");

    // /backends and `portshare status` name the sockets as they were given.
    let addresses: Vec<String> = proxy
        .backends()
        .iter()
        .map(|b| b["address"].as_str().unwrap_or("?").to_owned())
        .collect();
    let given: Vec<String> = workers.iter().map(Worker::addr).collect();
    assert_eq!(addresses, given);
    let (code, out, err) = run_portshare(&["status", "--admin", &proxy.admin.to_string()], &[]);
    assert_eq!(code, Some(0), "{err}");
    for w in &given {
        assert!(
            out.lines()
                .any(|l| l.starts_with(w.as_str()) && l.contains("healthy")),
            "{w} not in:\n{out}"
        );
    }
}

/// A socket backend whose worker dies is a refused connect: the other serves every call,
/// and the dead one leaves rotation.
fn a_dead_socket_backend_costs_no_call(mode: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut workers = socket_workers(dir.path(), &["a", "b"]);
    let proxy = proxy_for(&workers, &["--mode", mode]);
    eventually(WAIT, "both socket backends healthy", || proxy.all_healthy());
    let dead = workers.remove(0);
    support::signal(dead.pid(), "KILL");
    // grpcio leaves its socket file behind when killed: a stale file refuses.
    let r = client(&["spread", "--target", &proxy.target(), "--channels", "10"]);
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    assert_eq!(support::spread_counts(&r).get("b"), Some(&10), "{r}");
    eventually(WAIT, "the dead backend out of rotation", || {
        proxy.states()[0] != "healthy"
    });
}

mod l4 {
    #[test]
    fn static_socket_backends_serve_every_kind_of_call() {
        super::static_socket_backends_serve_every_kind_of_call("l4");
    }

    #[test]
    fn a_dead_socket_backend_costs_no_call() {
        super::a_dead_socket_backend_costs_no_call("l4");
    }
}

mod h2 {
    #[test]
    fn static_socket_backends_serve_every_kind_of_call() {
        super::static_socket_backends_serve_every_kind_of_call("h2");
    }

    #[test]
    fn a_dead_socket_backend_costs_no_call() {
        super::a_dead_socket_backend_costs_no_call("h2");
    }
}

/// `grpc.health.v1` over a socket: NOT_SERVING takes the backend out of rotation and
/// SERVING brings it back, so the probe really talks to the worker.
#[test]
fn grpc_health_checks_reach_a_socket_backend() {
    let dir = tempfile::tempdir().expect("temp dir");
    let workers = socket_workers(dir.path(), &["a", "b"]);
    let mut args: Vec<String> = workers
        .iter()
        .flat_map(|w| ["--backend".to_owned(), w.addr()])
        .collect();
    args.extend(["--mode", "h2", "--health", "grpc"].map(String::from));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let proxy = Proxy::start_env(
        &refs,
        &[
            ("PORTSHARE_HEALTH__INTERVAL", "200ms"),
            ("PORTSHARE_HEALTH__UNHEALTHY_INTERVAL", "100ms"),
        ],
    );
    eventually(WAIT, "both socket backends healthy by grpc check", || {
        proxy.all_healthy()
    });
    support::signal(workers[0].pid(), "USR1");
    eventually(WAIT, "NOT_SERVING drains the first", || {
        proxy.states() == ["not_serving", "healthy"]
    });
    let r = client(&["spread", "--target", &proxy.target(), "--channels", "6"]);
    assert_eq!(support::spread_counts(&r).get("b"), Some(&6), "{r}");
    support::signal(workers[0].pid(), "USR2");
    eventually(WAIT, "SERVING brings it back", || proxy.all_healthy());
}

#[cfg(target_os = "linux")]
#[test]
fn an_abstract_namespace_backend_serves_with_grpc_checks() {
    let name = format!("portshare-test-{}-abstract", std::process::id());
    let workers = Worker::start_at(&[("a", Some(format!("unix-abstract:{name}")))]);
    for mode in ["l4", "h2"] {
        let proxy = proxy_for(&workers, &["--mode", mode, "--health", "grpc"]);
        eventually(WAIT, "the abstract backend healthy", || proxy.all_healthy());
        assert_eq!(
            proxy.backends()[0]["address"],
            format!("unix-abstract:{name}")
        );
        let r = unary_ok(&proxy.target());
        assert_eq!(r["worker"], "a", "{r}");
    }
}
