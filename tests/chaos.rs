//! Chaos under load: a steady client of all four call kinds while spawned workers are
//! killed at random. Every failed call must be one that was in flight on a killed worker:
//! the client makes one call at a time, so there can be no more failures than kills, and
//! each must be UNAVAILABLE. portshare's memory must not grow.
//!
//! Short by default; the soak run is the same test, longer:
//! `PORTSHARE_CHAOS_SECONDS=120 cargo test --release --test chaos -- --nocapture`

// A test stops at what it did not expect (unwrap/expect), and times real processes by the
// wall clock: the library's lints against both (Cargo.toml, clippy.toml) are not meant here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
// Reads /proc and sends Unix signals: Linux only.
#![cfg(target_os = "linux")]

mod support;

use std::time::{Duration, Instant};

use support::{Proxy, eventually};

fn chaos_seconds() -> u64 {
    std::env::var("PORTSHARE_CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8)
}

#[cfg(target_os = "linux")]
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

#[cfg(target_os = "linux")]
fn chaos(mode: &str) {
    let seconds = chaos_seconds();
    let mut args: Vec<String> = vec!["--mode".into(), mode.into()];
    args.extend(support::spawn_args(4, &[]));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let proxy = Proxy::start_env(
        &refs,
        &[
            // Short and capped: with the default cap (30 s), the backoff of a worker killed
            // again and again grows until all four are down at once, and calls fail for want
            // of any worker, which is not what this test is about.
            ("PORTSHARE_WORKERS__RESTART_BACKOFF", "50ms"),
            ("PORTSHARE_WORKERS__RESTART_BACKOFF_MAX", "200ms"),
            // Kills are exits too: they must not count as a crash loop here.
            ("PORTSHARE_WORKERS__CRASH_LOOP_RESTARTS", "100"),
            ("PORTSHARE_LOG", "info"),
        ],
    );
    let all_healthy = || {
        let b = proxy.backends();
        b.len() == 4 && b.iter().all(|w| w["state"] == "healthy")
    };
    eventually(Duration::from_secs(30), "workers ready", all_healthy);
    let total = (seconds + 3).to_string();
    let client = support::client_spawn(&[
        "steady",
        "--target",
        &proxy.target(),
        "--seconds",
        &total,
        "--pause-ms",
        "2",
        "--all-kinds",
    ]);
    // Warm-up, then the memory baseline: the client rotates through the four kinds, so 50
    // bidi calls begun means 200 calls of every kind through the proxy (h2: over every
    // worker's pooled connection) before the baseline is read.
    eventually(Duration::from_secs(30), "200 calls of every kind", || {
        proxy.worker_calls("Bidi") >= 50
    });
    let baseline = rss_kib(proxy.pid());
    let started = Instant::now();
    let mut kills = 0u32;
    while started.elapsed() < Duration::from_secs(seconds) {
        // One worker down at a time: every failure is then a call in flight on it.
        eventually(Duration::from_secs(30), "every worker is back", all_healthy);
        let pick = started.elapsed().subsec_nanos() as u64 % 4;
        let victim = proxy
            .backends()
            .into_iter()
            .find(|b| b["worker"].as_u64() == Some(pick))
            .and_then(|b| b["pid"].as_u64());
        if let Some(pid) = victim {
            support::signal(pid as u32, "KILL");
            kills += 1;
        }
        // The stimulus: the time between kills, varied so they land at different points
        // of a call. Not a wait for anything.
        std::thread::sleep(Duration::from_millis(600 + (pick * 150)));
    }
    let r = support::client_result(client);
    let errors: Vec<String> = r["errors"]
        .as_array()
        .map(|e| {
            e.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let calls = r["calls"].as_u64().unwrap_or(0);
    eprintln!(
        "{mode}: {calls} calls, {kills} kills, {} failed: {errors:?}",
        errors.len()
    );
    assert!(calls > 100, "the client hardly ran: {r}");
    assert!(kills >= 3, "too few kills to mean anything");
    assert!(
        errors.len() as u32 <= kills,
        "{} failures for {kills} kills: calls on healthy workers failed: {errors:?}",
        errors.len()
    );
    for e in &errors {
        assert!(
            e.contains("UNAVAILABLE"),
            "a failure other than UNAVAILABLE: {e}"
        );
    }
    eventually(Duration::from_secs(30), "every worker is back", all_healthy);
    let end = rss_kib(proxy.pid());
    eprintln!("{mode}: RSS {baseline} KiB after warm-up, {end} KiB at the end");
    // Within 10% of where it settled (and a page-sized slack for tiny processes).
    assert!(
        end <= baseline + baseline / 10 + 512,
        "RSS grew: {baseline} -> {end} KiB"
    );
}

#[cfg(target_os = "linux")]
#[test]
fn chaos_l4() {
    chaos("l4");
}

#[cfg(target_os = "linux")]
#[test]
fn chaos_h2() {
    chaos("h2");
}
