//! Reloading the configuration of a running portshare (SIGHUP, `portshare reload`,
//! `POST /config/reload`) in front of real grpcio workers: backends join and leave without
//! a failed call, a broken file changes nothing, keys that need a restart are reported and
//! kept.

// A test stops at what it did not expect (unwrap/expect), and times real processes by the
// wall clock: the library's lints against both (Cargo.toml, clippy.toml) are not meant here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use support::{Proxy, Worker, client, client_spawn, eventually, run_portshare, spread_counts};

/// The whole configuration, in one file, so that every key is the file's (flags would win
/// over it and could not be reloaded).
fn write_config(path: &Path, backends: &[&Worker], extra: &str) {
    let list: Vec<String> = backends
        .iter()
        .map(|w| format!("\"{}\"", w.addr()))
        .collect();
    let text = format!(
        "listen = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nlog_format = \"json\"\nmode = \"h2\"\n\
         drain_timeout = \"20s\"\nbackends = [{}]\n{extra}\n\
         [health]\ninterval = \"500ms\"\nunhealthy_interval = \"200ms\"\n",
        list.join(", ")
    );
    std::fs::write(path, text).expect("write config");
}

/// `portshare reload --admin`: (exit code, stdout, stderr).
fn reload(proxy: &Proxy) -> (Option<i32>, String, String) {
    run_portshare(&["reload", "--admin", &proxy.admin.to_string()], &[])
}

fn reload_ok(proxy: &Proxy) -> String {
    let (code, out, err) = reload(proxy);
    assert_eq!(code, Some(0), "portshare reload: {err}\n{out}");
    out
}

/// The `/backends` entry of `worker`, if listed.
fn entry(proxy: &Proxy, worker: &Worker) -> Option<Value> {
    proxy
        .backends()
        .into_iter()
        .find(|b| b["name"] == worker.addr().as_str())
}

fn state_of(proxy: &Proxy, worker: &Worker) -> Option<String> {
    entry(proxy, worker).map(|b| b["state"].as_str().unwrap_or("?").to_owned())
}

/// Calls on one channel (h2 mode balances each call): how many each worker answered.
fn calls_per_worker(proxy: &Proxy, calls: usize) -> std::collections::BTreeMap<String, u64> {
    let r = client(&[
        "one-channel",
        "--target",
        &proxy.target(),
        "--calls",
        &calls.to_string(),
    ]);
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    spread_counts(&r)
}

#[test]
fn a_backend_added_to_the_file_joins_once_checked_and_gets_calls() {
    let workers = Worker::start_many(&["a0", "a1"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("portshare.toml");
    write_config(&file, &[&workers[0]], "");
    let proxy = Proxy::start_file(&file, &[]);
    eventually(Duration::from_secs(20), "a0 healthy", || {
        state_of(&proxy, &workers[0]).as_deref() == Some("healthy")
    });
    assert_eq!(calls_per_worker(&proxy, 10).get("a1"), None);

    write_config(&file, &[&workers[0], &workers[1]], "");
    let out = reload_ok(&proxy);
    assert!(
        out.contains("backends:") && out.contains("(applied)"),
        "{out}"
    );
    eventually(Duration::from_secs(20), "a1 checked and healthy", || {
        state_of(&proxy, &workers[1]).as_deref() == Some("healthy")
    });
    let counts = calls_per_worker(&proxy, 40);
    assert!(
        counts.get("a0").is_some_and(|n| *n > 0) && counts.get("a1").is_some_and(|n| *n > 0),
        "both backends take calls after the reload: {counts:?}"
    );
    assert_eq!(
        proxy.metric("portshare_config_reloads_total{result=\"ok\"}"),
        1.0
    );
}

#[test]
fn a_removed_backend_takes_no_new_calls_and_its_open_ones_finish() {
    let workers = Worker::start_many(&["r0", "r1"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("portshare.toml");
    write_config(&file, &[&workers[0], &workers[1]], "");
    let proxy = Proxy::start_file(&file, &[]);
    eventually(Duration::from_secs(20), "both healthy", || {
        proxy.states() == ["healthy", "healthy"]
    });
    // Slow calls in flight on both backends (least-conn spreads them).
    let slow = client_spawn(&[
        "parallel",
        "--target",
        &proxy.target(),
        "--calls",
        "4",
        "--sleep-ms",
        "3000",
    ]);
    eventually(Duration::from_secs(20), "slow calls on r1", || {
        entry(&proxy, &workers[1]).is_some_and(|b| b["active_connections"].as_u64() > Some(0))
    });

    write_config(&file, &[&workers[0]], "");
    reload_ok(&proxy);
    assert_eq!(
        state_of(&proxy, &workers[1]).as_deref(),
        Some("draining"),
        "the removed backend drains"
    );
    // New calls go to the one that stays only.
    let counts = calls_per_worker(&proxy, 20);
    assert_eq!(counts.get("r1"), None, "{counts:?}");
    // The calls it had finish, and then it is forgotten.
    let r = support::client_result(slow);
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    assert!(r["workers"]["r1"].as_u64() > Some(0), "{r}");
    eventually(Duration::from_secs(20), "r1 forgotten", || {
        entry(&proxy, &workers[1]).is_none()
    });
    assert!(proxy.log.contains("removed backend drained and forgotten"));
}

#[test]
fn a_broken_file_changes_nothing_and_the_error_names_the_key() {
    let workers = Worker::start_many(&["b0"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("portshare.toml");
    write_config(&file, &[&workers[0]], "balance = \"p2c\"");
    let proxy = Proxy::start_file(&file, &[]);
    eventually(Duration::from_secs(20), "b0 healthy", || {
        proxy.all_healthy()
    });

    write_config(&file, &[&workers[0]], "balance = \"sideways\"");
    let (code, out, err) = reload(&proxy);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        err.contains("balance") && err.contains("running configuration is kept"),
        "{err}"
    );
    eventually(Duration::from_secs(10), "the error is logged", || {
        proxy
            .log
            .all()
            .iter()
            .any(|l| l.contains("reload failed") && l.contains("balance") && l.contains("sideways"))
    });
    assert_eq!(
        proxy.metric("portshare_config_reloads_total{result=\"error\"}"),
        1.0
    );
    // The old backend list and balance still serve.
    assert_eq!(calls_per_worker(&proxy, 5).get("b0"), Some(&5));
    let (_, running) = proxy.admin_get("/config");
    assert!(running.contains("balance = \"p2c\""), "{running}");
    assert!(running.contains(&workers[0].addr()), "{running}");
    // SIGHUP takes the same path.
    #[cfg(unix)]
    {
        support::signal(proxy.pid(), "HUP");
        eventually(
            Duration::from_secs(10),
            "the second error is counted",
            || proxy.try_metric("portshare_config_reloads_total{result=\"error\"}") == Some(2.0),
        );
        assert_eq!(calls_per_worker(&proxy, 5).get("b0"), Some(&5));
    }
}

#[test]
fn a_changed_listen_address_needs_a_restart_and_disturbs_nothing() {
    let workers = Worker::start_many(&["l0"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("portshare.toml");
    write_config(&file, &[&workers[0]], "");
    let proxy = Proxy::start_file(&file, &[]);
    eventually(Duration::from_secs(20), "l0 healthy", || {
        proxy.all_healthy()
    });
    let text = std::fs::read_to_string(&file).expect("read config");
    let changed = text
        .replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\"")
        .replace("drain_timeout = \"20s\"", "drain_timeout = \"25s\"");
    std::fs::write(&file, changed).expect("write config");

    // `portshare check --admin` tells beforehand what a reload would do.
    let (code, out, err) = run_portshare(
        &[
            "check",
            "--config",
            file.to_str().expect("utf-8"),
            "--admin",
            &proxy.admin.to_string(),
        ],
        &[],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("listen: \"127.0.0.1:0\" -> \"127.0.0.1:1\" (needs a restart"),
        "{out}"
    );
    assert!(
        out.contains("drain_timeout: \"20s\" -> \"25s\" (applied)"),
        "{out}"
    );

    let out = reload_ok(&proxy);
    assert!(
        out.contains("listen") && out.contains("needs a restart"),
        "{out}"
    );
    eventually(Duration::from_secs(10), "the warning is logged", || {
        proxy
            .log
            .all()
            .iter()
            .any(|l| l.contains("needs a restart") && l.contains("\"key\":\"listen\""))
    });
    // Still serving where it was; the running view keeps the old address, takes the rest.
    assert_eq!(calls_per_worker(&proxy, 5).get("l0"), Some(&5));
    let (_, running) = proxy.admin_get("/config");
    assert!(running.contains("listen = \"127.0.0.1:0\""), "{running}");
    assert!(running.contains("drain_timeout = \"25s\""), "{running}");
}

/// Calls the workers have seen so far, from their logs.
#[cfg(unix)]
fn calls(workers: &[Worker]) -> usize {
    workers.iter().map(|w| w.log.count("CALL ")).sum()
}

#[cfg(unix)]
#[test]
fn ten_reloads_under_steady_load_fail_no_call() {
    let workers = Worker::start_many(&["s0", "s1", "s2"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("portshare.toml");
    let stop_file = dir.path().join("stop");
    let stop = stop_file.to_str().expect("utf-8");
    write_config(&file, &[&workers[0], &workers[1]], "");
    let proxy = Proxy::start_file(&file, &[]);
    eventually(Duration::from_secs(20), "both healthy", || {
        proxy.states() == ["healthy", "healthy"]
    });
    let target = proxy.target();
    let steady = |extra: &[&str]| {
        let mut args = vec!["steady", "--target", &target, "--seconds", "90"];
        args.extend(["--until-file", stop, "--all-kinds"]);
        args.extend(extra);
        client_spawn(&args)
    };
    let one = steady(&[]);
    let fresh = steady(&["--fresh-channels", "--pause-ms", "20"]);
    eventually(Duration::from_secs(20), "the clients are calling", || {
        proxy
            .try_metric("portshare_connections_accepted_total")
            .is_some_and(|n| n >= 2.0)
    });
    let balances = ["round-robin", "p2c", "least-conn"];
    for round in 0..10 {
        // Alternately a third backend joins and leaves, and the balance changes.
        let extra = format!("balance = \"{}\"", balances[round % balances.len()]);
        let third = round % 2 == 0;
        let list: Vec<&Worker> = if third {
            workers.iter().collect()
        } else {
            workers[..2].iter().collect()
        };
        write_config(&file, &list, &extra);
        support::signal(proxy.pid(), "HUP");
        let reloads = (round + 1) as f64;
        eventually(Duration::from_secs(20), "the reload is applied", || {
            proxy
                .try_metric("portshare_config_reloads_total{result=\"ok\"}")
                .is_some_and(|n| n == reloads)
        });
        // Calls keep flowing across every reload.
        let before = calls(&workers);
        eventually(Duration::from_secs(20), "calls after the reload", || {
            calls(&workers) >= before + 10
        });
        if third {
            let before = workers[2].log.count("CALL ");
            eventually(Duration::from_secs(20), "s2 in rotation and called", || {
                workers[2].log.count("CALL ") > before
            });
        } else {
            eventually(Duration::from_secs(30), "s2 drained and gone", || {
                entry(&proxy, &workers[2]).is_none()
            });
        }
    }
    std::fs::write(&stop_file, b"").expect("stop file");
    let results = [
        ("one channel", support::client_result(one)),
        ("fresh channels", support::client_result(fresh)),
    ];
    for (what, r) in results {
        assert_eq!(r["errors"], serde_json::json!([]), "{what}: {r}");
        assert!(r["calls"].as_u64() > Some(20), "{what}: {r}");
        assert!(
            r["workers"]["s2"].as_u64() > Some(0),
            "{what}: the third backend took calls while it was in: {r}"
        );
    }
}

/// `[workers]` settings changed in the file reach the workers at their next start: the
/// rolling restart that follows SIGHUP's reload starts them with the new environment.
#[cfg(unix)]
#[test]
fn new_worker_settings_take_effect_at_the_rolling_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let python = support::python().display().to_string();
    let worker = support::python_dir()
        .join("worker.py")
        .display()
        .to_string();
    let script = format!(
        "import os, sys\n\
         print('greeting', os.environ['GREETING'], flush=True)\n\
         os.execv(sys.executable, [sys.executable, {worker:?}, '--port', os.environ['PORTSHARE_PORT']])\n"
    );
    let file = dir.path().join("portshare.toml");
    let write = |greeting: &str| {
        let toml = format!(
            "listen = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nlog_format = \"json\"\n\
             [workers]\ncount = 1\nport_base = 0\ncommand = [{python:?}, \"-c\", {script:?}]\n\
             [workers.env]\nGREETING = {greeting:?}\n"
        );
        std::fs::write(&file, toml).expect("write config");
    };
    write("hello");
    let proxy = Proxy::start_file(&file, &[]);
    eventually(Duration::from_secs(30), "worker ready", || {
        proxy.all_healthy()
    });
    assert!(proxy.log.contains("[worker 0] greeting hello"));

    write("again");
    support::signal(proxy.pid(), "HUP");
    eventually(
        Duration::from_secs(60),
        "the replacement started with the new environment",
        || proxy.log.contains("[worker 0] greeting again"),
    );
    eventually(
        Duration::from_secs(60),
        "the rolling restart is done",
        || proxy.log.contains("rolling restart done"),
    );
    assert_eq!(
        proxy.metric("portshare_config_reloads_total{result=\"ok\"}"),
        1.0
    );
    assert!(
        proxy
            .log
            .all()
            .iter()
            .any(|l| l.contains("\"key\":\"workers.env\"") && l.contains("next start")),
        "the reload says when workers.env applies"
    );
    support::unary_ok(&proxy.target());
}
