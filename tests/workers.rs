//! Spawned workers: portshare as the container entrypoint, starting real Python grpcio
//! workers itself, checking their health, restarting them and stopping them.

// A test stops at what it did not expect (unwrap/expect), and times real processes by the
// wall clock: the library's lints against both (Cargo.toml, clippy.toml) are not meant here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod support;

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::time::Duration;

use serde_json::Value;
#[cfg(target_os = "linux")]
use support::alive;
use support::{Proxy, client, eventually, python, python_dir, spread_counts};

fn start(n: usize, extra_worker_args: &[&str], env: &[(&str, &str)], flags: &[&str]) -> Proxy {
    support::spawned(n, extra_worker_args, env, flags)
}

fn states(proxy: &Proxy) -> Vec<String> {
    proxy.states()
}

fn all_healthy(proxy: &Proxy) -> bool {
    proxy.all_healthy()
}

#[cfg(unix)]
fn pids(proxy: &Proxy) -> Vec<u32> {
    proxy.pids()
}

fn worker_entry(proxy: &Proxy, index: u64) -> Value {
    proxy.worker_entry(index)
}

#[cfg(target_os = "linux")]
#[test]
fn workers_are_started_ready_and_stopped_cleanly() {
    let mut proxy = start(3, &[], &[], &["--drain-timeout", "5s"]);
    eventually(Duration::from_secs(30), "all workers ready", || {
        all_healthy(&proxy)
    });
    assert_eq!(proxy.admin_get("/readyz").0, 200);
    let entries = proxy.backends();
    let indexes: BTreeSet<u64> = entries
        .iter()
        .filter_map(|b| b["worker"].as_u64())
        .collect();
    assert_eq!(indexes, BTreeSet::from([0, 1, 2]));
    let r = client(&["spread", "--target", &proxy.target(), "--channels", "30"]);
    assert_eq!(r["errors"].as_array().map(Vec::len), Some(0), "{r}");
    let names: BTreeSet<String> = spread_counts(&r).into_keys().collect();
    // Each worker named itself from PORTSHARE_WORKER_INDEX.
    assert_eq!(
        names,
        BTreeSet::from(["w0".into(), "w1".into(), "w2".into()])
    );
    // Worker output is passed through with a prefix.
    assert!(
        proxy.log.contains("[worker 1]"),
        "no prefixed worker output"
    );
    // Free ports come from Linux's ephemeral range: portshare says so, with the fix.
    assert!(
        proxy.log.contains("ip_local_reserved_ports"),
        "no ephemeral-range warning"
    );

    let before = pids(&proxy);
    assert_eq!(before.len(), 3);
    assert!(before.iter().all(|p| alive(*p)));

    // `portshare status` shows the same, as a table.
    let admin = proxy.admin.to_string();
    let (code, table, err) = support::run_portshare(&["status", "--admin", &admin], &[]);
    assert_eq!(code, Some(0), "{err}");
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 4, "{table}");
    assert!(rows[0].starts_with("BACKEND"), "{table}");
    for pid in &before {
        assert!(table.contains(&pid.to_string()), "{table}");
    }
    assert_eq!(table.matches("healthy").count(), 3, "{table}");
    // `portshare probe` is the container health check: /readyz answered 200.
    let (code, out, err) = support::run_portshare(&["probe", "--admin", &admin], &[]);
    assert_eq!((code, out.trim()), (Some(0), "ready"), "{err}");

    support::signal(proxy.pid(), "TERM");
    let status = proxy
        .wait(Duration::from_secs(30))
        .expect("portshare exits");
    assert_eq!(status.code(), Some(0));
    for pid in before {
        assert!(!alive(pid), "worker {pid} outlived portshare");
    }
}

#[cfg(target_os = "linux")]
#[test]
fn a_killed_worker_comes_back_with_a_new_pid_and_no_call_fails() {
    let proxy = start(
        3,
        &[],
        &[("PORTSHARE_WORKERS__RESTART_BACKOFF", "50ms")],
        &[],
    );
    eventually(Duration::from_secs(30), "all workers ready", || {
        all_healthy(&proxy)
    });
    let victim = worker_entry(&proxy, 1);
    let (old_pid, port) = (
        victim["pid"].as_u64().unwrap_or(0),
        victim["address"].clone(),
    );
    support::signal(old_pid as u32, "KILL");
    // New connections keep succeeding while the worker is down and while it restarts.
    for _ in 0..3 {
        let r = client(&["spread", "--target", &proxy.target(), "--channels", "10"]);
        assert_eq!(r["errors"].as_array().map(Vec::len), Some(0), "{r}");
    }
    eventually(Duration::from_secs(30), "the worker is back", || {
        let w = worker_entry(&proxy, 1);
        w["state"] == "healthy" && w["pid"].as_u64().is_some_and(|p| p != old_pid)
    });
    let w = worker_entry(&proxy, 1);
    assert_eq!(w["address"], port, "same port after the restart");
    assert_eq!(w["restarts"], 1, "{w}");
    assert!(proxy.metric("portshare_worker_restarts_total{worker=\"1\",reason=\"exited\"}") >= 1.0);
    let r = client(&["spread", "--target", &proxy.target(), "--channels", "12"]);
    assert_eq!(
        spread_counts(&r).len(),
        3,
        "the restarted worker takes traffic again: {r}"
    );
}

#[test]
fn a_worker_that_never_becomes_ready_gets_no_traffic() {
    let proxy = start(3, &["--stall-index", "1"], &[], &[]);
    eventually(Duration::from_secs(30), "workers 0 and 2 ready", || {
        let s = states(&proxy);
        s.iter().filter(|s| *s == "healthy").count() == 2
    });
    let r = client(&["spread", "--target", &proxy.target(), "--channels", "20"]);
    assert_eq!(r["errors"].as_array().map(Vec::len), Some(0), "{r}");
    let names: BTreeSet<String> = spread_counts(&r).into_keys().collect();
    assert_eq!(names, BTreeSet::from(["w0".into(), "w2".into()]));
    let stalled = worker_entry(&proxy, 1);
    assert_eq!(stalled["state"], "starting", "{stalled}");
    assert_eq!(stalled["connect_failures"], 0, "{stalled}");
}

#[cfg(unix)]
#[test]
fn a_worker_that_turns_not_serving_is_taken_out_and_returns() {
    let proxy = start(
        2,
        &[],
        &[
            ("PORTSHARE_HEALTH__INTERVAL", "200ms"),
            ("PORTSHARE_HEALTH__UNHEALTHY_INTERVAL", "200ms"),
        ],
        &["--health", "grpc"],
    );
    eventually(Duration::from_secs(30), "both workers ready", || {
        all_healthy(&proxy)
    });
    let pid = worker_entry(&proxy, 0)["pid"].as_u64().unwrap_or(0) as u32;
    support::signal(pid, "USR1");
    eventually(Duration::from_secs(10), "worker 0 drained", || {
        worker_entry(&proxy, 0)["state"] == "not_serving"
    });
    let r = client(&["spread", "--target", &proxy.target(), "--channels", "10"]);
    assert_eq!(r["errors"].as_array().map(Vec::len), Some(0), "{r}");
    assert_eq!(spread_counts(&r).into_keys().collect::<Vec<_>>(), ["w1"]);
    support::signal(pid, "USR2");
    eventually(Duration::from_secs(10), "worker 0 back", || {
        worker_entry(&proxy, 0)["state"] == "healthy"
    });
}

#[test]
fn a_worker_that_fails_at_boot_ends_portshare_with_the_crash_loop_code() {
    let python = python().display().to_string();
    let (code, _, err) = support::run_portshare(
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--worker-port-base",
            "0",
            "--",
            &python,
            "-c",
            "import sys; print('boom', file=sys.stderr); sys.exit(3)",
        ],
        &[("PORTSHARE_WORKERS__RESTART_BACKOFF", "10ms")],
    );
    assert_eq!(code, Some(70), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(last.contains("exited 5 times"), "{err}");
    assert!(err.contains("[worker 0] boom"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_taken_worker_port_is_a_clear_error_before_anything_starts() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let base = port.to_string();
    let (code, _, err) = support::run_portshare(
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--worker-port-base",
            &base,
            "--",
            "true",
        ],
        &[],
    );
    assert_eq!(code, Some(1), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.contains(&format!("port {port} is already in use")),
        "{err}"
    );
    assert!(last.contains("SO_REUSEPORT"), "{err}");
}

#[test]
fn grpc_health_checks_static_backends_by_service_name() {
    let workers = support::Worker::start_many(&["g0"]);
    let good = Proxy::start(&[
        "--backend",
        &workers[0].addr(),
        "--health",
        "grpc",
        "--health-service",
        "portshare.test.Echo",
    ]);
    eventually(Duration::from_secs(10), "healthy by grpc check", || {
        all_healthy(&good)
    });
    support::unary_ok(&good.target());

    let unknown = Proxy::start(&[
        "--backend",
        &workers[0].addr(),
        "--health",
        "grpc",
        "--health-service",
        "no.such.Service",
    ]);
    eventually(
        Duration::from_secs(10),
        "unknown service is unhealthy",
        || states(&unknown) == ["unhealthy"],
    );
    assert_eq!(unknown.admin_get("/readyz").0, 503);
    let (code, _, err) =
        support::run_portshare(&["probe", "--admin", &unknown.admin.to_string()], &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("503") && err.lines().count() == 1, "{err}");
    let entry = worker_entry_static(&unknown);
    assert!(
        entry["last_check"]
            .as_str()
            .is_some_and(|s| s.contains("NOT_FOUND")),
        "{entry}"
    );
}

fn worker_entry_static(proxy: &Proxy) -> Value {
    proxy.backends().into_iter().next().expect("one backend")
}

/// When portshare is killed outright, the kernel kills its workers (PR_SET_PDEATHSIG).
#[cfg(target_os = "linux")]
#[test]
fn sigkill_of_portshare_leaves_no_worker_behind() {
    let mut proxy = start(2, &[], &[], &[]);
    eventually(Duration::from_secs(30), "workers ready", || {
        all_healthy(&proxy)
    });
    let before = pids(&proxy);
    assert_eq!(before.len(), 2);
    support::signal(proxy.pid(), "KILL");
    proxy
        .wait(Duration::from_secs(10))
        .expect("portshare is gone");
    eventually(Duration::from_secs(10), "workers gone", || {
        before.iter().all(|p| !alive(*p))
    });
}

/// Children of `parent`: (pid, command name, state).
#[cfg(target_os = "linux")]
fn children_of(parent: u32) -> Vec<(u32, String, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let (head, rest) = stat.rsplit_once(')')?;
            let comm = head.split_once('(')?.1.to_owned();
            let mut fields = rest.split_whitespace();
            let state = fields.next()?.to_owned();
            let ppid: u32 = fields.next()?.parse().ok()?;
            (ppid == parent).then_some((pid, comm, state))
        })
        .collect()
}

/// A process a worker starts and abandons is adopted by portshare (Linux child subreaper),
/// as it would be by PID 1 in a container, and reaped when it exits: no zombie is left.
#[cfg(target_os = "linux")]
#[test]
fn orphans_of_workers_are_adopted_and_reaped() {
    let script = format!(
        "(sleep 1 &); exec '{}' '{}' --port \"$PORTSHARE_PORT\"",
        python().display(),
        python_dir().join("worker.py").display()
    );
    let proxy = Proxy::start(&[
        "--workers",
        "1",
        "--worker-port-base",
        "0",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    let me = proxy.pid();
    eventually(Duration::from_secs(10), "the orphan is adopted", || {
        children_of(me).iter().any(|(_, comm, _)| comm == "sleep")
    });
    eventually(Duration::from_secs(10), "the orphan is reaped", || {
        let kids = children_of(me);
        !kids
            .iter()
            .any(|(_, comm, state)| comm == "sleep" || state == "Z")
    });
    // The worker itself is untouched by the reaper and still serves.
    eventually(Duration::from_secs(10), "worker ready", || {
        all_healthy(&proxy)
    });
    support::unary_ok(&proxy.target());
}

/// A worker that ignores SIGTERM is killed once `stop_grace` is over, and portshare still
/// exits 0 with nothing left behind.
#[cfg(target_os = "linux")]
#[test]
fn a_worker_that_ignores_sigterm_is_killed_after_the_grace() {
    let stubborn = "import os, signal, socket, time\n\
        signal.signal(signal.SIGTERM, signal.SIG_IGN)\n\
        s = socket.socket()\n\
        s.bind(('127.0.0.1', int(os.environ['PORTSHARE_PORT'])))\n\
        s.listen()\n\
        time.sleep(600)\n";
    let python = python().display().to_string();
    let mut proxy = Proxy::start_env(
        &[
            "--workers",
            "1",
            "--worker-port-base",
            "0",
            "--drain-timeout",
            "1s",
            "--",
            &python,
            "-c",
            stubborn,
        ],
        &[("PORTSHARE_WORKERS__STOP_GRACE", "500ms")],
    );
    eventually(Duration::from_secs(30), "worker ready", || {
        all_healthy(&proxy)
    });
    let pid = worker_entry(&proxy, 0)["pid"].as_u64().unwrap_or(0) as u32;
    support::signal(proxy.pid(), "TERM");
    let status = proxy
        .wait(Duration::from_secs(15))
        .expect("portshare exits");
    assert_eq!(status.code(), Some(0));
    assert!(
        proxy.log.contains("did not stop in time"),
        "no SIGKILL logged"
    );
    assert!(!alive(pid), "the stubborn worker survived");
}

/// `[workers] env` and `cwd` reach the worker, with PORTSHARE_PORT, PORTSHARE_WORKER_INDEX
/// and PORTSHARE_PID.
#[test]
fn workers_get_their_environment_and_working_directory() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cwd = dir.path().canonicalize().expect("canonical");
    let python = python().display().to_string();
    let worker = python_dir().join("worker.py").display().to_string();
    let script = format!(
        "import os, sys\n\
         print('env', os.environ['GREETING'], os.getcwd(), os.environ['PORTSHARE_WORKER_INDEX'], os.environ['PORTSHARE_PID'], flush=True)\n\
         os.execv(sys.executable, [sys.executable, {worker:?}, '--port', os.environ['PORTSHARE_PORT']])\n"
    );
    let config = dir.path().join("portshare.toml");
    let toml = format!(
        "[workers]\ncount = 1\nport_base = 0\ncwd = {cwd:?}\ncommand = [{python:?}, \"-c\", {script:?}]\n[workers.env]\nGREETING = \"hello there\"\n",
        cwd = cwd.display().to_string(),
    );
    std::fs::write(&config, toml).expect("write config");
    let proxy = Proxy::start(&["--config", config.to_str().expect("utf-8")]);
    let expected = format!(
        "[worker 0] env hello there {} 0 {}",
        cwd.display(),
        proxy.pid()
    );
    eventually(
        Duration::from_secs(30),
        "the worker printed its environment",
        || proxy.log.contains(&expected),
    );
    eventually(Duration::from_secs(30), "worker ready", || {
        all_healthy(&proxy)
    });
    support::unary_ok(&proxy.target());
}

/// A restart whose port was taken meanwhile (e.g. by an outgoing connection) fails loudly
/// and is retried, not hung; the worker returns once the port is free.
#[cfg(unix)]
#[test]
fn a_restart_whose_port_is_taken_is_retried_loudly() {
    let proxy = start(1, &[], &[("PORTSHARE_WORKERS__RESTART_BACKOFF", "1s")], &[]);
    eventually(Duration::from_secs(30), "worker ready", || {
        all_healthy(&proxy)
    });
    let w = worker_entry(&proxy, 0);
    let old = w["pid"].as_u64().unwrap_or(0);
    let addr: std::net::SocketAddr = w["address"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .expect("address");
    support::signal(old as u32, "KILL");
    let mut squatter = None;
    eventually(Duration::from_secs(5), "the test takes the port", || {
        squatter = TcpListener::bind(addr).ok();
        squatter.is_some()
    });
    eventually(
        Duration::from_secs(20),
        "portshare says the port is taken",
        || proxy.log.contains("its port is taken"),
    );
    assert_ne!(worker_entry(&proxy, 0)["state"], "healthy");
    drop(squatter);
    eventually(Duration::from_secs(30), "the worker is back", || {
        let w = worker_entry(&proxy, 0);
        w["state"] == "healthy" && w["pid"].as_u64().is_some_and(|p| p != old)
    });
}

/// `portshare restart --admin ADDR` does what SIGHUP does (the way on Windows).
#[test]
fn the_admin_endpoint_restarts_workers_where_there_is_no_sighup() {
    let proxy = start(2, &[], &[], &[]);
    eventually(Duration::from_secs(30), "workers ready", || {
        all_healthy(&proxy)
    });
    let old: Vec<u64> = proxy
        .backends()
        .iter()
        .filter_map(|b| b["pid"].as_u64())
        .collect();
    let admin = proxy.admin.to_string();
    let (code, out, err) = support::run_portshare(&["restart", "--admin", &admin], &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("rolling restart done: 2 of 2 workers replaced"),
        "{out}"
    );
    eventually(Duration::from_secs(30), "both workers replaced", || {
        let b = proxy.backends();
        b.iter().all(|w| {
            w["state"] == "healthy" && w["pid"].as_u64().is_some_and(|p| !old.contains(&p))
        })
    });

    // Without spawned workers there is nothing to restart: a clear refusal.
    let sidecar = Proxy::start(&["--backend", &proxy.target()]);
    let (code, _, err) =
        support::run_portshare(&["restart", "--admin", &sidecar.admin.to_string()], &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no spawned workers"), "{err}");
}

/// SIGUSR1 and SIGUSR2 sent to portshare reach every worker, as an init such as tini passes
/// signals on (the test worker turns NOT_SERVING / SERVING on them).
#[cfg(unix)]
#[test]
fn user_signals_are_passed_on_to_the_workers() {
    let proxy = start(
        2,
        &[],
        &[
            ("PORTSHARE_HEALTH__INTERVAL", "200ms"),
            ("PORTSHARE_HEALTH__UNHEALTHY_INTERVAL", "200ms"),
        ],
        &["--health", "grpc"],
    );
    eventually(Duration::from_secs(30), "workers ready", || {
        all_healthy(&proxy)
    });
    support::signal(proxy.pid(), "USR1");
    eventually(
        Duration::from_secs(10),
        "both workers drained by their own health",
        || states(&proxy).iter().all(|s| s == "not_serving"),
    );
    assert_eq!(proxy.admin_get("/readyz").0, 503);
    support::signal(proxy.pid(), "USR2");
    eventually(Duration::from_secs(10), "both back", || all_healthy(&proxy));
}
