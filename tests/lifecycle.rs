//! Worker lifecycle without a failed call: calls made while no worker can take them wait
//! for one (workers still starting, the only worker restarting, every worker at its cap),
//! a dead backend leaves rotation within seconds, and one crash-looping worker does not
//! take the healthy ones down. Real grpcio workers behind the real binary, in both modes.

// A test stops at what it did not expect (unwrap/expect), and times real processes by the
// wall clock: the library's lints against both (Cargo.toml, clippy.toml) are not meant here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Proxy, Worker, client, client_spawn, eventually, spawned};

const MODES: [&str; 2] = ["l4", "h2"];

fn errors(r: &Value) -> Vec<String> {
    r["errors"]
        .as_array()
        .map(|e| e.iter().map(|v| v.to_string()).collect())
        .unwrap_or_default()
}

/// A call made while every worker is still booting waits for the first one to be ready.
#[test]
fn a_call_made_before_any_worker_is_ready_waits_and_succeeds() {
    for mode in MODES {
        let proxy = spawned(2, &["--bind-delay", "3"], &[], &["--mode", mode]);
        // The test means something only if no worker is ready when the call is made.
        let states = proxy.states();
        assert!(
            states.iter().all(|s| s != "healthy"),
            "{mode}: a worker was ready already: {states:?}"
        );
        let started = Instant::now();
        let r = client(&["unary", "--target", &proxy.target(), "--timeout", "20"]);
        assert_eq!(r["code"], "OK", "{mode}: {r}");
        assert!(
            started.elapsed() >= Duration::from_secs(1),
            "{mode}: answered in {:?}, before a worker could be ready",
            started.elapsed()
        );
        assert!(
            proxy.metric("portshare_queue_wait_seconds_count") >= 1.0,
            "{mode}: the call did not wait in the queue"
        );
        assert_eq!(proxy.metric("portshare_queue_waiting"), 0.0, "{mode}");
    }
}

/// kill -9 of the only worker: calls started after the kill are held until the
/// replacement is ready, then served by it; none fails.
#[cfg(unix)]
#[test]
fn calls_after_the_only_worker_is_killed_wait_for_its_replacement() {
    for mode in MODES {
        // The replacement takes 2 s to listen, so the clients below (however slowly a busy
        // machine starts them) certainly call while no worker is ready.
        let proxy = spawned(1, &["--bind-delay", "2"], &[], &["--mode", mode]);
        eventually(Duration::from_secs(30), "the worker is ready", || {
            proxy.all_healthy()
        });
        // The long-lived channel is connected before the kill (in l4 its connection dies
        // with the worker; grpcio then reconnects, which is a new connection to hold).
        let target = proxy.target();
        let old = proxy.pids();
        support::signal(old[0], "KILL");
        let steady = client_spawn(&["steady", "--target", &target, "--seconds", "6"]);
        let fresh = client_spawn(&[
            "steady",
            "--target",
            &target,
            "--seconds",
            "6",
            "--fresh-channels",
            "--pause-ms",
            "20",
        ]);
        for (kind, r) in [
            ("one channel", support::client_result(steady)),
            ("fresh", support::client_result(fresh)),
        ] {
            assert!(errors(&r).is_empty(), "{mode}, {kind}: {r}");
            assert!(r["calls"].as_u64() > Some(10), "{mode}, {kind}: {r}");
        }
        let now = proxy.pids();
        assert!(now.len() == 1 && now != old, "{mode}: {old:?} -> {now:?}");
        assert!(
            proxy.metric("portshare_queue_wait_seconds_count") >= 1.0,
            "{mode}: no call waited for the replacement"
        );
    }
}

/// The highest `INFLIGHT n` a worker reported.
fn most_in_flight(proxy: &Proxy, index: u64) -> u64 {
    proxy
        .worker_lines(index)
        .iter()
        .filter_map(|l| l.strip_prefix("INFLIGHT ")?.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

/// `[h2] max_calls_per_backend`: a worker at its cap gets no more calls; when all are at
/// their cap, calls wait for a free one, and all succeed.
#[test]
fn a_backend_at_its_cap_takes_no_more_calls_and_the_rest_wait() {
    let proxy = spawned(
        2,
        &[],
        &[],
        &["--mode", "h2", "--max-calls-per-backend", "1"],
    );
    eventually(Duration::from_secs(30), "workers ready", || {
        proxy.all_healthy()
    });
    let r = client(&[
        "parallel",
        "--target",
        &proxy.target(),
        "--calls",
        "6",
        "--sleep-ms",
        "400",
    ]);
    assert!(errors(&r).is_empty(), "{r}");
    let served: u64 = ["w0", "w1"]
        .iter()
        .map(|w| r["workers"][w].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(served, 6, "{r}");
    for w in 0..2 {
        assert_eq!(
            most_in_flight(&proxy, w),
            1,
            "worker {w} went beyond its cap"
        );
    }
    // Six 400 ms calls, two at a time: three rounds.
    assert!(r["seconds"].as_f64() >= Some(1.1), "{r}");
    assert!(proxy.metric("portshare_queue_wait_seconds_count") >= 4.0);

    // Without a cap the same load runs side by side: the measure above can fail.
    let free = spawned(1, &[], &[], &["--mode", "h2"]);
    eventually(Duration::from_secs(30), "worker ready", || {
        free.all_healthy()
    });
    let r = client(&["parallel", "--target", &free.target(), "--calls", "3"]);
    assert!(errors(&r).is_empty(), "{r}");
    eventually(
        Duration::from_secs(5),
        "the worker logged its calls",
        || most_in_flight(&free, 0) > 1,
    );
}

/// A static backend that dies leaves rotation within 5 s at the default check settings:
/// a refused connect on the data path counts as a failed check, and a failing backend is
/// checked at the short interval until it is decided.
#[test]
fn a_dead_static_backend_leaves_rotation_within_five_seconds() {
    for mode in MODES {
        let mut workers = Worker::start_many(&["s0"]);
        let addr = workers[0].addr();
        let proxy = Proxy::start(&["--mode", mode, "--backend", &addr]);
        eventually(Duration::from_secs(10), "the backend is healthy", || {
            proxy.all_healthy()
        });
        assert_eq!(proxy.admin_get("/readyz").0, 200);
        drop(workers.remove(0));
        let died = Instant::now();
        // Clients keep trying meanwhile (short calls that give up quickly).
        let tries = client_spawn(&[
            "steady",
            "--target",
            &proxy.target(),
            "--seconds",
            "6",
            "--timeout",
            "0.5",
            "--fresh-channels",
            "--pause-ms",
            "100",
        ]);
        eventually(Duration::from_secs(5), "the dead backend is out", || {
            proxy.admin_get("/readyz").0 == 503
        });
        let took = died.elapsed();
        assert!(took < Duration::from_secs(5), "{mode}: took {took:?}");
        assert_eq!(proxy.states(), ["unhealthy"], "{mode}");
        let _ = support::collect(tries, Duration::from_secs(20));
    }
}

/// One worker of two crash-loops: it is restarted with backoff and reported, while the
/// other goes on serving, for a minute and more; portshare does not exit.
#[test]
fn a_crash_looping_worker_does_not_take_the_healthy_one_down() {
    let mut proxy = spawned(
        2,
        &["--crash-index", "1"],
        &[
            ("PORTSHARE_WORKERS__RESTART_BACKOFF", "50ms"),
            ("PORTSHARE_WORKERS__RESTART_BACKOFF_MAX", "2s"),
        ],
        &["--mode", "h2"],
    );
    eventually(Duration::from_secs(30), "worker 0 ready", || {
        proxy.worker_entry(0)["state"] == "healthy"
    });
    let r = client(&["steady", "--target", &proxy.target(), "--seconds", "62"]);
    assert!(errors(&r).is_empty(), "{r}");
    assert!(r["calls"].as_u64() > Some(100), "{r}");
    assert!(proxy.is_running(), "portshare ended");
    assert!(
        proxy.log.contains("worker is in a crash loop"),
        "the crash loop was not reported"
    );
    let w1 = proxy.worker_entry(1);
    assert!(w1["restarts"].as_u64() >= Some(5), "{w1}");
    assert_ne!(w1["state"], "healthy", "{w1}");
    assert_eq!(r["workers"]["w0"].as_u64(), r["calls"].as_u64(), "{r}");
}

/// How a rolling restart is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ask {
    /// SIGHUP to portshare.
    #[cfg(unix)]
    Sighup,
    /// `portshare restart --admin ADDR` (the way on Windows); it must exit 0.
    Command,
}

/// The position of the first log line at or after `from` that contains `needle`.
fn line_after(lines: &[String], from: usize, needle: &str) -> Option<usize> {
    lines
        .iter()
        .skip(from)
        .position(|l| l.contains(needle))
        .map(|i| i + from)
}

/// Replaces `n` workers under steady load from one long-lived channel and from fresh
/// channels, and checks the surge order and the calls.
fn rolling_restart_under_load(mode: &str, n: usize, ask: Ask) {
    let what = format!("{mode}, {n} worker(s), {ask:?}");
    let dir = tempfile::tempdir().expect("temp dir");
    let stop_file = dir.path().join("stop");
    let stop = stop_file.to_str().expect("utf-8");
    let proxy = spawned(
        n,
        &["--grace", "5"],
        // An l4 client keeps its connection to the old process until grpcio's graceful
        // stop moves it: the drain before SIGTERM waits for it only this long.
        &[("PORTSHARE_WORKERS__STOP_GRACE", "2s")],
        &["--mode", mode],
    );
    eventually(Duration::from_secs(30), "workers ready", || {
        proxy.all_healthy()
    });
    let old = proxy.pids();
    let target = proxy.target();
    // Both run until the stop file appears (90 s at most), each writing how many calls it
    // has made to its progress file.
    let client = |progress: &Path, extra: &[&str]| {
        let progress = progress.to_str().expect("utf-8");
        let mut args = vec!["steady", "--target", &target, "--seconds", "90"];
        args.extend(["--until-file", stop, "--progress-file", progress]);
        args.extend(extra);
        client_spawn(&args)
    };
    let progress = [dir.path().join("steady"), dir.path().join("fresh")];
    let made = || {
        progress.each_ref().map(|path| {
            std::fs::read_to_string(path)
                .ok()
                .and_then(|n| n.trim().parse::<u64>().ok())
                .unwrap_or(0)
        })
    };
    let steady = client(&progress[0], &[]);
    let fresh = client(&progress[1], &["--fresh-channels", "--pause-ms", "20"]);
    // Both clients are making calls before the restart begins.
    eventually(Duration::from_secs(20), "the clients are calling", || {
        made().iter().all(|&n| n >= 5)
    });
    let admin = proxy.admin.to_string();
    let command = match ask {
        #[cfg(unix)]
        Ask::Sighup => {
            support::signal(proxy.pid(), "HUP");
            None
        }
        Ask::Command => Some(std::thread::spawn(move || {
            support::run_portshare(&["restart", "--admin", &admin], &[])
        })),
    };
    // While a replacement boots, its worker shows two processes.
    eventually(
        Duration::from_secs(30),
        "old and new process side by side",
        || {
            let zero: Vec<Value> = proxy
                .backends()
                .into_iter()
                .filter(|b| b["worker"] == 0)
                .collect();
            zero.len() == 2
                && zero[0]["pid"] != zero[1]["pid"]
                && zero.iter().all(|b| b["pid"].is_u64())
        },
    );
    eventually(
        Duration::from_secs(120),
        "the rolling restart is done",
        || proxy.log.contains("rolling restart done"),
    );
    if let Some(command) = command {
        let (code, out, err) = command.join().expect("portshare restart");
        assert_eq!(code, Some(0), "{what}: {err}");
        assert!(
            out.contains(&format!("{n} of {n} workers replaced")),
            "{what}: {out}"
        );
    }
    // Before the clients stop, each makes calls of the new processes, and has made enough
    // (more than 20, as checked below) to mean something.
    let at_done = made();
    eventually(
        Duration::from_secs(30),
        "each client's calls after the rolling restart",
        || {
            made()
                .iter()
                .zip(at_done)
                .all(|(&now, done)| now >= done + 5 && now > 20)
        },
    );
    std::fs::write(&stop_file, b"").expect("stop file");
    let results = [
        ("one channel", support::client_result(steady)),
        ("fresh channels", support::client_result(fresh)),
    ];

    let now = proxy.pids();
    assert!(
        now.len() == n && now.iter().all(|p| !old.contains(p)),
        "{what}: {old:?} -> {now:?}"
    );
    assert!(proxy.all_healthy(), "{what}");
    for b in proxy.backends() {
        assert_eq!(b["restarts"], 1, "{what}: {b}");
    }
    // Surge order, one worker at a time: the replacement is ready before the old process
    // stops, and each worker is back before the next replacement starts.
    let lines = proxy.log.all();
    let mut at = 0;
    for w in 0..n {
        let started = line_after(&lines, at, "rolling restart: replacement started")
            .unwrap_or_else(|| panic!("{what}: worker {w} not started"));
        let ready = line_after(
            &lines,
            started,
            "replacement ready; draining the old process",
        )
        .unwrap_or_else(|| panic!("{what}: worker {w} not ready"));
        let stopped = line_after(&lines, ready, "\"worker stopped\"")
            .unwrap_or_else(|| panic!("{what}: worker {w}: old not stopped"));
        at = line_after(&lines, stopped, "rolling restart: worker is back")
            .unwrap_or_else(|| panic!("{what}: worker {w} not back"));
        assert!(
            lines[started].contains(&format!("\"worker\":{w}"))
                || lines[started].contains(&format!("\"worker\":\"{w}\"")),
            "{what}: {}",
            lines[started]
        );
    }
    for (kind, r) in results {
        let errors = errors(&r);
        assert!(r["calls"].as_u64() > Some(20), "{what}, {kind}: {r}");
        if mode == "h2" {
            assert!(errors.is_empty(), "{what}, {kind}: {r}");
        } else {
            // grpcio's graceful stop has a race of its own: a call that reaches the old
            // process between its shutdown and the client's reading of its GOAWAY fails,
            // with or without a proxy in between. At most that, once per worker.
            assert!(errors.len() <= n, "{what}, {kind}: {r}");
        }
    }
    assert!(
        proxy.metric("portshare_rolling_restarts_total{result=\"done\"}") >= 1.0,
        "{what}"
    );
}

#[cfg(unix)]
#[test]
fn sighup_replaces_each_worker_before_it_stops_and_no_call_fails() {
    for mode in MODES {
        for n in [1, 3] {
            rolling_restart_under_load(mode, n, Ask::Sighup);
        }
    }
}

#[test]
fn portshare_restart_replaces_the_workers_the_same_way() {
    for mode in MODES {
        rolling_restart_under_load(mode, 2, Ask::Command);
    }
}

/// A replacement that never becomes ready is stopped after `ready_timeout`; the old
/// process keeps serving, and `portshare restart` says the restart failed.
#[test]
fn a_replacement_that_is_never_ready_leaves_the_old_worker_serving() {
    let dir = tempfile::tempdir().expect("temp dir");
    let stall = dir.path().join("stall");
    let stall_arg = stall.to_str().expect("utf-8");
    let proxy = spawned(
        1,
        &["--stall-if-exists", stall_arg],
        &[("PORTSHARE_WORKERS__READY_TIMEOUT", "2s")],
        &["--mode", "h2"],
    );
    eventually(Duration::from_secs(30), "worker ready", || {
        proxy.all_healthy()
    });
    let old = proxy.pids();
    std::fs::write(&stall, b"").expect("stall file");
    let admin = proxy.admin.to_string();
    let (code, _, err) = support::run_portshare(&["restart", "--admin", &admin], &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not ready within 2s"), "{err}");
    assert_eq!(proxy.pids(), old, "the old process is the one left");
    assert_eq!(proxy.backends().len(), 1);
    assert!(proxy.all_healthy());
    support::unary_ok(&proxy.target());
    assert!(proxy.metric("portshare_rolling_restarts_total{result=\"failed\"}") >= 1.0);
}
