//! The binary's contract for bad input at start-up: one clear stderr line naming the key or
//! the problem, the right exit code, never a panic; and `portshare check`.

// A test stops at what it did not expect (unwrap/expect), and times real processes by the
// wall clock: the library's lints against both (Cargo.toml, clippy.toml) are not meant here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod support;

use std::io::Write;
use std::net::TcpListener;

use support::run_portshare;

/// EX_USAGE, the contract's code for bad configuration or usage.
const USAGE: Option<i32> = Some(64);

fn assert_one_clear_line(stderr: &str, needle: &str) {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line expected:\n{stderr}");
    assert!(lines[0].contains(needle), "{needle:?} not in {stderr:?}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn missing_config_file() {
    let (code, _, err) = run_portshare(&["--config", "/nonexistent/portshare.toml"], &[]);
    assert_eq!(code, USAGE);
    assert_one_clear_line(&err, "/nonexistent/portshare.toml");
}

#[test]
fn unknown_key_in_file_and_env() {
    let mut f = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("temp");
    writeln!(f, "backends = [\"127.0.0.1:9\"]\nmax_conections = 5").expect("write");
    let path = f.path().to_str().expect("utf-8 path");
    let (code, _, err) = run_portshare(&["--config", path], &[]);
    assert_eq!(code, USAGE);
    assert_one_clear_line(&err, "max_conections");

    let (code, _, err) = run_portshare(
        &["--backend", "127.0.0.1:9"],
        &[("PORTSHARE_BALANCER", "p2c")],
    );
    assert_eq!(code, USAGE);
    assert_one_clear_line(&err, "balancer");
}

#[test]
fn unparseable_addresses() {
    let (code, _, err) = run_portshare(&["--backend", "127.0.0.1:9", "--listen", "localhost"], &[]);
    assert_eq!(code, USAGE);
    assert_one_clear_line(&err, "listen");

    let (code, _, err) = run_portshare(&["--backend", "127.0.0.1:notaport"], &[]);
    assert_eq!(code, USAGE);
    assert_one_clear_line(&err, "backends[0]");
}

#[test]
fn no_backends() {
    let (code, _, err) = run_portshare(&["--listen", "127.0.0.1:0"], &[]);
    assert_eq!(code, USAGE);
    assert_one_clear_line(&err, "backends");
}

#[test]
fn unknown_flag_is_a_usage_error() {
    let (code, _, err) = run_portshare(&["--backend", "127.0.0.1:9", "--frobnicate"], &[]);
    assert_eq!(code, USAGE);
    assert_one_clear_line(&err, "--frobnicate");
}

#[test]
fn listen_address_in_use_is_a_runtime_failure() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let (code, _, err) = run_portshare(&["--listen", &addr, "--backend", "127.0.0.1:9"], &[]);
    assert_eq!(code, Some(1), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.contains(&addr) && last.to_lowercase().contains("in use"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn check_prints_the_effective_configuration() {
    let (code, out, err) = run_portshare(
        &[
            "check",
            "--backend",
            "127.0.0.1:7000-7001",
            "--balance",
            "p2c",
        ],
        &[("PORTSHARE_DRAIN_TIMEOUT", "5s")],
    );
    assert_eq!(code, Some(0), "{err}");
    let effective: toml::Table = out.parse().expect("check prints TOML");
    assert_eq!(effective["balance"].as_str(), Some("p2c"));
    assert_eq!(effective["drain_timeout"].as_str(), Some("5s"));
    assert_eq!(effective["listen"].as_str(), Some("[::]:50051"));
    let backends = effective["backends"].as_array().expect("backends list");
    assert_eq!(backends.len(), 2);

    let (code, _, err) = run_portshare(
        &["check", "--backend", "127.0.0.1:7000", "--mode", "l7"],
        &[],
    );
    assert_eq!(code, USAGE);
    assert_one_clear_line(&err, "mode");
}

#[test]
fn status_needs_a_reachable_admin_address() {
    let (code, _, err) = run_portshare(&["status"], &[]);
    assert_eq!(code, USAGE);
    assert_one_clear_line(&err, "--admin");

    let closed = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = closed.local_addr().expect("addr").to_string();
    drop(closed);
    let (code, _, err) = run_portshare(&["status", "--admin", &addr], &[]);
    assert_eq!(code, Some(1));
    assert_one_clear_line(&err, &addr);
}
