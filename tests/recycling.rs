//! Workers replaced before they hurt: a hung worker (SIGSTOP) is replaced, and workers are
//! recycled after so many calls, so long a life, or so much memory — each through the
//! surge path, so no call fails. Real grpcio workers behind the real binary.

// A test stops at what it did not expect (unwrap/expect), and times real processes by the
// wall clock: the library's lints against both (Cargo.toml, clippy.toml) are not meant here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod support;

use std::time::Duration;

use serde_json::Value;
#[cfg(target_os = "linux")]
use support::alive;
use support::{Proxy, client, eventually, spawned};

fn errors(r: &Value) -> Vec<String> {
    r["errors"]
        .as_array()
        .map(|e| e.iter().map(|v| v.to_string()).collect())
        .unwrap_or_default()
}

/// The pids that surge replacements replaced, from the log.
#[cfg(target_os = "linux")]
fn replaced_pids(proxy: &Proxy) -> Vec<u64> {
    proxy
        .log
        .all()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == "rolling restart: replacement started")
        .filter_map(|v| v["replaces"].as_u64())
        .collect()
}

/// Restarts of `worker` for `reason`.
fn restarts(proxy: &Proxy, worker: u64, reason: &str) -> f64 {
    proxy.metric(&format!(
        "portshare_worker_restarts_total{{worker=\"{worker}\",reason=\"{reason}\"}}"
    ))
}

/// A worker stopped with SIGSTOP fails its grpc check, is replaced once `hang_timeout` has
/// passed since its last pass, and the stopped process is killed (SIGTERM cannot reach a
/// stopped process: SIGKILL must come). Its index serves again; only calls in flight on it
/// may fail.
#[cfg(target_os = "linux")]
#[test]
fn a_hung_worker_is_replaced_and_killed() {
    for mode in ["h2", "l4"] {
        let proxy = spawned(
            2,
            &[],
            &[
                ("PORTSHARE_HEALTH__INTERVAL", "1s"),
                ("PORTSHARE_WORKERS__STOP_GRACE", "1s"),
            ],
            &[
                "--mode",
                mode,
                "--health",
                "grpc",
                "--worker-hang-timeout",
                "2s",
            ],
        );
        let target = proxy.target();
        eventually(Duration::from_secs(30), "workers ready", || {
            proxy.all_healthy()
        });
        let hung = proxy.worker_entry(0)["pid"].as_u64().unwrap_or(0);
        // l4: fresh connections, which least-conn keeps off the stuck worker once one
        // hangs there; h2: one channel, whose calls p2c moves away from it.
        let mut args = vec![
            "steady",
            "--target",
            &target,
            "--seconds",
            "14",
            "--timeout",
            "3",
            "--pause-ms",
            "20",
        ];
        if mode == "l4" {
            args.push("--fresh-channels");
        }
        let steady = support::client_spawn(&args);
        eventually(Duration::from_secs(20), "the client is calling", || {
            proxy.worker_calls("Unary") >= 5
        });
        support::signal(hung as u32, "STOP");
        eventually(Duration::from_secs(30), "worker 0 replaced", || {
            let w = proxy.worker_entry(0);
            w["state"] == "healthy" && w["pid"].as_u64().is_some_and(|p| p != hung)
        });
        eventually(Duration::from_secs(10), "the hung process is gone", || {
            !alive(hung as u32)
        });
        assert!(restarts(&proxy, 0, "hung") >= 1.0, "{mode}");
        assert!(
            proxy.log.contains("did not stop in time; killing it"),
            "{mode}"
        );
        let r = support::client_result(steady);
        let errors = errors(&r);
        assert!(
            errors.len() <= 3 && errors.iter().all(|e| e.contains("DEADLINE_EXCEEDED")),
            "{mode}: only calls stuck on the hung worker may fail: {r}"
        );
        // Its index serves again.
        eventually(
            Duration::from_secs(10),
            "worker 0 takes calls again",
            || {
                let r = client(&["spread", "--target", &target, "--channels", "8"]);
                r["workers"]["w0"].as_u64() > Some(0)
            },
        );
    }
}

/// `max_calls 50`: every worker is recycled several times during 500 calls, through the
/// surge path: no call fails, and every replaced process is gone afterwards.
#[cfg(target_os = "linux")]
#[test]
fn workers_are_recycled_after_max_calls_without_a_failed_call() {
    let proxy = spawned(2, &[], &[], &["--mode", "h2", "--worker-max-calls", "50"]);
    let target = proxy.target();
    eventually(Duration::from_secs(30), "workers ready", || {
        proxy.all_healthy()
    });
    let r = client(&[
        "steady",
        "--target",
        &target,
        "--calls",
        "500",
        "--seconds",
        "120",
        "--pause-ms",
        "15",
    ]);
    assert!(errors(&r).is_empty(), "{r}");
    assert_eq!(r["calls"], 500, "{r}");
    for w in 0..2 {
        assert!(
            restarts(&proxy, w, "calls") >= 2.0,
            "worker {w} recycled less than twice"
        );
    }
    let replaced = replaced_pids(&proxy);
    assert!(replaced.len() >= 4, "{replaced:?}");
    eventually(
        Duration::from_secs(20),
        "every replaced process is gone",
        || replaced.iter().all(|p| !alive(*p as u32)),
    );
    // At most one at a time: never more than one replacement beside the two workers.
    assert!(
        !proxy
            .log
            .contains("rolling restart: replacing the worker failed"),
        "a recycle failed"
    );
}

/// `max_lifetime`: workers are recycled when they reach their (jittered) age; no call fails.
#[test]
fn workers_are_recycled_after_max_lifetime_without_a_failed_call() {
    let proxy = spawned(
        2,
        &[],
        &[],
        &["--mode", "h2", "--worker-max-lifetime", "3s"],
    );
    let target = proxy.target();
    eventually(Duration::from_secs(30), "workers ready", || {
        proxy.all_healthy()
    });
    let r = client(&[
        "steady",
        "--target",
        &target,
        "--seconds",
        "10",
        "--pause-ms",
        "10",
    ]);
    assert!(errors(&r).is_empty(), "{r}");
    for w in 0..2 {
        assert!(
            restarts(&proxy, w, "lifetime") >= 1.0,
            "worker {w} was not recycled for its age"
        );
    }
    for b in proxy.backends() {
        assert!(b["age_s"].as_u64() < Some(8), "{b}");
    }
}

/// `max_memory`: a worker that grows past the limit (two samples in a row) is recycled.
#[cfg(target_os = "linux")]
#[test]
fn a_worker_over_max_memory_is_recycled() {
    let proxy = spawned(
        1,
        &[],
        &[],
        &["--mode", "h2", "--worker-max-memory", "150MiB"],
    );
    let target = proxy.target();
    eventually(Duration::from_secs(30), "worker ready", || {
        proxy.all_healthy()
    });
    let first = proxy.worker_entry(0);
    let pid = first["pid"].as_u64().unwrap_or(0);
    // The first sample may be taken while Python is still loading: wait for a grown one.
    eventually(Duration::from_secs(20), "its memory is sampled", || {
        proxy.worker_entry(0)["memory_bytes"]
            .as_u64()
            .is_some_and(|b| b > 4 << 20)
    });
    assert!(proxy.metric("portshare_worker_memory_bytes{worker=\"0\"}") > 1e6);
    let r = client(&["unary", "--target", &target, "--metadata", "x-grow-mb=300"]);
    assert_eq!(r["code"], "OK", "{r}");
    eventually(
        Duration::from_secs(30),
        "the grown worker is replaced",
        || {
            let w = proxy.worker_entry(0);
            w["state"] == "healthy" && w["pid"].as_u64().is_some_and(|p| p != pid)
        },
    );
    assert!(restarts(&proxy, 0, "memory") >= 1.0);
    eventually(Duration::from_secs(10), "the grown process is gone", || {
        !alive(pid as u32)
    });
    support::unary_ok(&target);
}

/// `--workers auto`: one worker per CPU this process may use, cgroup quota included.
#[test]
fn workers_auto_counts_the_cpus_this_process_may_use() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (code, out, err) = support::run_portshare(
        &[
            "check",
            "--listen",
            "127.0.0.1:0",
            "--worker-port-base",
            "0",
            "--workers",
            "auto",
            "--",
            "true",
        ],
        &[],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains(&format!("count = {cpus}\n")), "{out}");
    let (code, _, err) = support::run_portshare(
        &[
            "check",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "many",
            "--",
            "true",
        ],
        &[],
    );
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("workers.count") && err.contains("\"many\""),
        "{err}"
    );
}

/// Under a cgroup CPU quota of one CPU, `--workers auto` gives 1 worker, whatever the host
/// has. Needs a writable cgroup v1 `cpu` hierarchy (root); says so when there is none.
#[cfg(target_os = "linux")]
#[test]
fn workers_auto_honours_a_cgroup_cpu_quota() {
    let dir = std::path::PathBuf::from(format!(
        "/sys/fs/cgroup/cpu/portshare-test-{}",
        std::process::id()
    ));
    if std::fs::create_dir(&dir).is_err() {
        eprintln!(
            "SKIPPED: cannot create {} (no writable cgroup v1 cpu hierarchy here); the quota case is not tested",
            dir.display()
        );
        return;
    }
    let setup = std::fs::write(dir.join("cpu.cfs_period_us"), "100000")
        .and_then(|()| std::fs::write(dir.join("cpu.cfs_quota_us"), "100000"));
    let procs = dir.join("cgroup.procs");
    let script = format!(
        "echo $$ > '{}' && exec '{}' check --listen 127.0.0.1:0 --worker-port-base 0 --workers auto -- true",
        procs.display(),
        env!("CARGO_BIN_EXE_portshare")
    );
    let out = setup.and_then(|()| {
        std::process::Command::new("sh")
            .args(["-c", &script])
            .output()
    });
    let _ = std::fs::remove_dir(&dir);
    let out = out.expect("run portshare in the cgroup");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("count = 1\n"), "{text}");
}
