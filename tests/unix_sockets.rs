//! Backends on Unix domain sockets, end to end: real grpcio workers bound to `unix:` paths
//! (and, on Linux, `unix-abstract:` names) behind the real binary, in both modes; and
//! spawned workers given a socket each by `--worker-socket-dir`.
#![cfg(unix)]
// A test stops at what it did not expect (unwrap/expect), and times real processes by the
// wall clock: the library's lints against both (Cargo.toml, clippy.toml) are not meant here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

#[macro_use]
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

in_both_modes!(
    static_socket_backends_serve_every_kind_of_call,
    a_dead_socket_backend_costs_no_call,
    spawned_socket_workers_serve_and_come_back_after_kill_9,
);

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

// ---- spawned workers on sockets (--worker-socket-dir) ----

/// portshare spawning `n` test workers on sockets in `dir`, with `flags` before them; the
/// workers bind `$PORTSHARE_SOCKET` unless `worker_args` says otherwise.
fn spawned_on_sockets(n: usize, dir: &Path, flags: &[&str], worker_args: &[&str]) -> Proxy {
    let mut args: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
    args.extend([
        "--workers".to_owned(),
        n.to_string(),
        "--worker-socket-dir".to_owned(),
        dir.display().to_string(),
        "--".to_owned(),
        support::python().display().to_string(),
        support::python_dir()
            .join("worker.py")
            .display()
            .to_string(),
    ]);
    args.extend(worker_args.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Proxy::start(&refs)
}

/// The socket files portshare's workers have in `dir`, by name, sorted.
fn worker_sockets(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("worker-") && n.ends_with(".sock"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn addresses(proxy: &Proxy) -> Vec<String> {
    proxy
        .backends()
        .iter()
        .map(|b| b["address"].as_str().unwrap_or("?").to_owned())
        .collect()
}

fn spawned_socket_workers_serve_and_come_back_after_kill_9(mode: &str) {
    use std::os::unix::fs::PermissionsExt;

    let root = tempfile::tempdir().expect("temp dir");
    // Missing: portshare makes it, private.
    let dir = root.path().join("sockets");
    let mut proxy = spawned_on_sockets(3, &dir, &["--mode", mode, "--drain-timeout", "5s"], &[]);
    eventually(WAIT, "all socket workers ready", || proxy.all_healthy());
    let mode_bits = std::fs::metadata(&dir).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode_bits, 0o700);
    let expected: Vec<String> = (0..3)
        .map(|i| format!("unix:{}", dir.join(format!("worker-{i}-0.sock")).display()))
        .collect();
    assert_eq!(addresses(&proxy), expected);

    let r = client(&["spread", "--target", &proxy.target(), "--channels", "30"]);
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    let names: Vec<String> = support::spread_counts(&r).into_keys().collect();
    assert_eq!(names, ["w0", "w1", "w2"], "{r}");

    // kill -9: the socket file stays behind; the worker is restarted on the same path.
    let victim = proxy.worker_entry(1)["pid"].as_u64().expect("pid") as u32;
    support::signal(victim, "KILL");
    eventually(WAIT, "worker 1 restarted and ready", || {
        let w = proxy.worker_entry(1);
        w["restarts"].as_u64() >= Some(1)
            && w["pid"].as_u64().is_some_and(|p| p as u32 != victim)
            && proxy.all_healthy()
    });
    assert_eq!(addresses(&proxy), expected);
    let r = client(&["spread", "--target", &proxy.target(), "--channels", "30"]);
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    assert_eq!(support::spread_counts(&r).len(), 3, "{r}");

    // Stopped workers leave no socket behind.
    support::signal(proxy.pid(), "TERM");
    let status = proxy.wait(Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert_eq!(worker_sockets(&dir), Vec::<String>::new());
}

/// SIGHUP under one steady client channel: each replacement starts on its own (next
/// generation's) socket and is ready before the old process drains and goes, whose
/// socket is then removed; no call fails. The command asks for `{socket}` itself.
#[test]
fn a_rolling_restart_of_socket_workers_loses_no_call() {
    let root = tempfile::tempdir().expect("temp dir");
    let dir = root.path().join("sockets");
    let proxy = spawned_on_sockets(2, &dir, &["--mode", "h2"], &["--address", "unix:{socket}"]);
    eventually(WAIT, "socket workers ready", || proxy.all_healthy());
    assert_eq!(worker_sockets(&dir), ["worker-0-0.sock", "worker-1-0.sock"]);
    let steady = support::client_spawn(&[
        "steady",
        "--target",
        &proxy.target(),
        "--seconds",
        "8",
        "--pause-ms",
        "2",
    ]);
    eventually(WAIT, "the steady client's calls arriving", || {
        proxy
            .backends()
            .iter()
            .any(|b| b["calls_served"].as_u64() > Some(0))
    });
    support::signal(proxy.pid(), "HUP");
    eventually(
        Duration::from_secs(60),
        "the rolling restart is done",
        || proxy.log.contains("rolling restart done"),
    );
    let expected: Vec<String> = (0..2)
        .map(|i| format!("unix:{}", dir.join(format!("worker-{i}-1.sock")).display()))
        .collect();
    eventually(WAIT, "both workers on their next sockets", || {
        addresses(&proxy) == expected && proxy.all_healthy()
    });
    eventually(WAIT, "the old sockets removed", || {
        worker_sockets(&dir) == ["worker-0-1.sock", "worker-1-1.sock"]
    });
    let r = support::client_result(steady);
    assert_eq!(r["errors"].as_array().map(Vec::len), Some(0), "{r}");
    assert!(r["calls"].as_u64() > Some(0), "{r}");
}

/// Sockets a previous run left behind (killed with it) are removed at start; nothing
/// else in the directory is touched.
#[test]
fn stale_sockets_in_the_directory_are_removed_at_start() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixListener;

    let root = tempfile::tempdir().expect("temp dir");
    let dir = root.path().join("sockets");
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    // A bound-then-dropped listener leaves its file: a stale socket nobody listens on.
    for stale in ["worker-0-0.sock", "worker-5-12.sock"] {
        drop(UnixListener::bind(dir.join(stale)).expect("bind"));
    }
    std::fs::write(dir.join("keep.txt"), b"mine").expect("write");
    let proxy = spawned_on_sockets(1, &dir, &[], &[]);
    eventually(WAIT, "the worker ready", || proxy.all_healthy());
    assert!(proxy.log.contains("removed a stale worker socket"));
    assert_eq!(worker_sockets(&dir), ["worker-0-0.sock"]);
    assert!(dir.join("keep.txt").exists());
    unary_ok(&proxy.target());
}

/// A directory others can write to is refused before any worker starts: someone could
/// put a socket of theirs in a worker's place.
#[test]
fn a_socket_directory_others_can_write_to_is_refused() {
    use std::os::unix::fs::PermissionsExt;

    let root = tempfile::tempdir().expect("temp dir");
    let dir = root.path().join("shared");
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let worker = support::python_dir().join("worker.py");
    let (code, _, err) = run_portshare(
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--worker-socket-dir",
            &dir.display().to_string(),
            "--",
            &support::python().display().to_string(),
            &worker.display().to_string(),
        ],
        &[],
    );
    assert_eq!(code, Some(1), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.contains("workers.socket_dir") && last.contains("others can write"),
        "{err}"
    );
    assert_eq!(worker_sockets(&dir), Vec::<String>::new());
}
