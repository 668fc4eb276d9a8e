//! reuseport mode (Linux): real grpcio workers built on the helper share the public address
//! with SO_REUSEPORT; portshare holds that address, supervises and checks the workers, and
//! refuses what it cannot do (a foreign listener on the address, static backends).

// A test stops at what it did not expect (unwrap/expect), and times real processes by the
// wall clock: the library's lints against both (Cargo.toml, clippy.toml) are not meant here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
#![cfg(target_os = "linux")]

mod support;

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use support::{Proxy, client, eventually, python, python_dir, run_portshare, spread_counts};

/// The helper-based test worker: its own port from `PORTSHARE_PORT`, the shared address
/// from `PORTSHARE_SHARED_ADDR`.
fn worker_command() -> Vec<String> {
    vec![
        python().display().to_string(),
        python_dir().join("helper_worker.py").display().to_string(),
    ]
}

/// portshare in reuseport mode with `n` helper workers on free private ports.
fn start(n: usize, flags: &[&str]) -> Proxy {
    let mut args: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
    args.extend(
        [
            "--mode",
            "reuseport",
            "--workers",
            &n.to_string(),
            "--worker-port-base",
            "0",
            "--",
        ]
        .map(String::from),
    );
    args.extend(worker_command());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Proxy::start(&refs)
}

/// `spread` calls, each on a fresh connection straight to the workers' shared port.
fn spread(proxy: &Proxy, calls: usize) -> serde_json::Value {
    client(&[
        "spread",
        "--target",
        &proxy.target(),
        "--channels",
        &calls.to_string(),
    ])
}

fn no_errors(r: &serde_json::Value) {
    assert_eq!(r["errors"].as_array().map(Vec::len), Some(0), "{r}");
}

#[test]
fn fresh_connections_spread_over_every_worker() {
    let proxy = start(3, &[]);
    eventually(Duration::from_secs(60), "all workers ready", || {
        proxy.all_healthy()
    });
    assert_eq!(proxy.admin_get("/readyz").0, 200);
    // 60 connections hashed over 3 listeners: that one gets none is a 1-in-10^10 event.
    let r = spread(&proxy, 60);
    no_errors(&r);
    let names: BTreeSet<String> = spread_counts(&r).into_keys().collect();
    assert_eq!(
        names,
        BTreeSet::from(["w0".into(), "w1".into(), "w2".into()]),
        "{r}"
    );
    // Calls to the listen address reached every worker, so each bound it beside its own
    // port; the private ports are what /backends lists and checks.
    let shared = proxy.addr.to_string();
    let backends = proxy.backends();
    assert_eq!(backends.len(), 3);
    for b in backends {
        let name = b["name"].as_str().expect("name");
        assert!(name.starts_with("127.0.0.1:") && name != shared, "{b}");
    }
}

#[test]
fn a_killed_worker_is_replaced_and_calls_after_succeed() {
    let proxy = start(2, &[]);
    eventually(Duration::from_secs(60), "all workers ready", || {
        proxy.all_healthy()
    });
    let old = proxy.worker_entry(0)["pid"].as_u64().expect("pid") as u32;
    support::signal(old, "KILL");
    eventually(
        Duration::from_secs(60),
        "worker 0 replaced and ready",
        || {
            let e = proxy.worker_entry(0);
            e["pid"].as_u64().is_some_and(|p| p as u32 != old) && proxy.all_healthy()
        },
    );
    let r = spread(&proxy, 40);
    no_errors(&r);
    let names: BTreeSet<String> = spread_counts(&r).into_keys().collect();
    assert_eq!(names, BTreeSet::from(["w0".into(), "w1".into()]), "{r}");
}

/// What portshare says at start about `net.ipv4.tcp_migrate_req`, whichever it is here.
#[test]
fn the_migration_sysctl_is_reported_at_start() {
    let proxy = start(1, &[]);
    let setting = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req");
    let wanted = match setting.as_deref().map(str::trim) {
        Ok("0") => "sysctl -w net.ipv4.tcp_migrate_req=1",
        Ok(_) => "net.ipv4.tcp_migrate_req=1: a stopping worker's queued connections move",
        Err(_) => "cannot be read",
    };
    eventually(Duration::from_secs(30), "the sysctl reported", || {
        proxy.log.contains(wanted)
    });
    if wanted.starts_with("sysctl") {
        assert!(proxy.log.contains("securityContext.sysctls"));
        assert_eq!(proxy.log.count("tcp_migrate_req is 0"), 1);
    }
}

fn refused_with(listen: &str) -> (Option<i32>, String) {
    let mut args = vec![
        "--mode",
        "reuseport",
        "--listen",
        listen,
        "--workers",
        "1",
        "--worker-port-base",
        "0",
        "--",
    ]
    .into_iter()
    .map(String::from)
    .collect::<Vec<_>>();
    args.extend(worker_command());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _, err) = run_portshare(&refs, &[]);
    (code, err)
}

#[test]
fn a_foreign_listener_on_the_address_is_refused() {
    // A plain listener: the bind alone would fail.
    let plain = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = plain.local_addr().unwrap().to_string();
    let (code, err) = refused_with(&addr);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("something already listens there"), "{err}");
    assert!(err.contains(&addr), "{err}");
    // One of the same user with SO_REUSEPORT, as grpcio binds by default: the kernel would
    // admit portshare's workers beside it and split the connections; refused all the same.
    let sharing = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    sharing.set_reuse_port(true).unwrap();
    sharing
        .bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
    sharing.listen(16).unwrap();
    let addr = sharing
        .local_addr()
        .unwrap()
        .as_socket()
        .unwrap()
        .to_string();
    let (code, err) = refused_with(&addr);
    assert_eq!(code, Some(1), "{err}");
    // The error is one line, the last portshare writes.
    let last = err.trim().lines().last().unwrap_or_default();
    assert!(last.contains("something already listens there"), "{err}");
}

#[test]
fn reuseport_with_static_backends_is_a_one_line_config_error() {
    let (code, out, err) = run_portshare(
        &[
            "--mode",
            "reuseport",
            "--listen",
            "127.0.0.1:0",
            "--backend",
            "127.0.0.1:9",
        ],
        &[],
    );
    assert_eq!(code, Some(64), "{out}{err}");
    let err = err.trim();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("mode"), "{err}");
    assert!(err.contains("spawned workers"), "{err}");
    assert!(err.contains("l4 and h2"), "{err}");
}
