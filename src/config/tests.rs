//! Loading and validating whole configurations: layering, defaults, errors, rendering.

use super::*;
// The flags as the command line makes them: only the tests reach back to it.
use crate::cli::Opts;
use std::io::Write;

fn opts(backends: &[&str]) -> Opts {
    Opts {
        backends: backends.iter().map(|s| s.to_string()).collect(),
        ..Opts::default()
    }
}

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn toml_file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .unwrap_or_else(|e| panic!("temp file: {e}"));
    f.write_all(text.as_bytes())
        .unwrap_or_else(|e| panic!("write: {e}"));
    f
}

fn load_err(o: &Opts, e: &HashMap<String, String>) -> ConfigError {
    match load(o, e) {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e,
    }
}

#[test]
fn defaults() {
    let c = load(&opts(&["127.0.0.1:50052"]), &env(&[])).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.listener.addr.to_string(), "[::]:50051");
    assert_eq!(c.listener.max_connections, 10_000);
    assert_eq!(c.mode, Mode::L4);
    assert_eq!(c.balance, Balance::LeastConn);
    assert_eq!(c.drain_timeout, Duration::from_secs(30));
    assert_eq!(c.l4.connect_attempts, 3);
    assert_eq!(c.admin, None);
    assert_eq!(c.log_format, LogFormat::Text);
}

#[test]
fn port_ranges_expand() {
    let c = load(&opts(&["127.0.0.1:50052-50055", "[::1]:7000"]), &env(&[]))
        .unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> = c.backends.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "127.0.0.1:50052",
            "127.0.0.1:50053",
            "127.0.0.1:50054",
            "127.0.0.1:50055",
            "[::1]:7000"
        ]
    );
    assert_eq!(c.backends[4].addr.to_string(), "[::1]:7000");
}

#[test]
fn flags_beat_env_beat_file() {
    let f = toml_file(
        "listen = \"127.0.0.1:1000\"\nbalance = \"p2c\"\nmax_connections = 5\nbackends = [\"127.0.0.1:9\"]\n[ejection]\nbase_time = \"1s\"\n",
    );
    let mut o = opts(&[]);
    o.config = Some(f.path().to_path_buf());
    o.listen = Some("127.0.0.1:3000".into());
    let e = env(&[
        ("PORTSHARE_LISTEN", "127.0.0.1:2000"),
        ("PORTSHARE_BALANCE", "round-robin"),
        ("PORTSHARE_EJECTION__MAX_TIME", "9s"),
        ("PORTSHARE_BACKENDS", "127.0.0.1:7,127.0.0.1:8"),
        ("PORTSHARE_LOG", "debug"),
        ("PORTSHARE_PORT", "1"),
        // What Kubernetes injects for a Service named portshare.
        ("PORTSHARE_SERVICE_HOST", "10.0.0.7"),
        ("PORTSHARE_SERVICE_PORT_GRPC", "9000"),
        ("PORTSHARE_PORT_9000_TCP_ADDR", "10.0.0.7"),
    ]);
    let c = load(&o, &e).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.listener.addr.to_string(), "127.0.0.1:3000");
    assert_eq!(c.balance, Balance::RoundRobin);
    assert_eq!(c.listener.max_connections, 5);
    assert_eq!(c.ejection.base_time, Duration::from_secs(1));
    assert_eq!(c.ejection.max_time, Duration::from_secs(9));
    assert_eq!(c.backends.len(), 2);
}

#[test]
fn unknown_keys_are_named() {
    let f = toml_file("backends = [\"127.0.0.1:9\"]\nlisten_addr = \"x\"\n");
    let mut o = opts(&[]);
    o.config = Some(f.path().to_path_buf());
    assert_eq!(load_err(&o, &env(&[])).key, "listen_addr");
    let f = toml_file("backends = [\"127.0.0.1:9\"]\n[ejection]\nbase = \"1s\"\n");
    o.config = Some(f.path().to_path_buf());
    assert_eq!(load_err(&o, &env(&[])).key, "ejection.base");
    let e = load_err(
        &opts(&["127.0.0.1:9"]),
        &env(&[("PORTSHARE_LISTENING", "x")]),
    );
    assert_eq!(e.key, "listening");
    // An empty key is named as TOML writes it (found by fuzzing).
    let f = toml_file("backends = [\"127.0.0.1:9\"]\n\"\" = 1\n");
    o.config = Some(f.path().to_path_buf());
    assert_eq!(load_err(&o, &env(&[])).key, "\"\"");
    // A bare `PORTSHARE_` is no key at all, so it is not read as one.
    assert!(load(&opts(&["127.0.0.1:9"]), &env(&[("PORTSHARE_", "x")])).is_ok());
}

#[test]
fn bad_values_name_their_key() {
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        (&[], &[], "backends"),
        (&["127.0.0.1"], &[], "backends[0]"),
        (&["127.0.0.1:x"], &[], "backends[0]"),
        (&["127.0.0.1:0"], &[], "backends[0]"),
        (&["127.0.0.1:9", "127.0.0.1:9"], &[], "backends[1]"),
        (&["127.0.0.1:9-2"], &[], "backends[0]"),
        (&["127.0.0.1:1000-9000"], &[], "backends[0]"),
        (&["::1:9"], &[], "backends[0]"),
        (&["127.0.0.1:9"], &[("PORTSHARE_LISTEN", "nope")], "listen"),
        (&["127.0.0.1:9"], &[("PORTSHARE_MODE", "l7")], "mode"),
        (
            &["127.0.0.1:9"],
            &[("PORTSHARE_BALANCE", "random")],
            "balance",
        ),
        (
            &["127.0.0.1:9"],
            &[("PORTSHARE_DRAIN_TIMEOUT", "soon")],
            "drain_timeout",
        ),
        (
            &["127.0.0.1:9"],
            &[("PORTSHARE_MAX_CONNECTIONS", "0")],
            "max_connections",
        ),
        (
            &["127.0.0.1:9"],
            &[("PORTSHARE_MAX_CONNECTIONS", "many")],
            "max_connections",
        ),
        (
            &["127.0.0.1:9"],
            &[("PORTSHARE_CONNECT_ATTEMPTS", "0")],
            "connect_attempts",
        ),
        (
            &["127.0.0.1:9"],
            &[("PORTSHARE_IDLE_TIMEOUT", "0s")],
            "idle_timeout",
        ),
        (
            &["127.0.0.1:9"],
            &[("PORTSHARE_LOG_FORMAT", "xml")],
            "log_format",
        ),
        (&["127.0.0.1:9"], &[("PORTSHARE_ADMIN", "1.2.3.4")], "admin"),
        (
            &["127.0.0.1:9"],
            &[("PORTSHARE_EJECTION__MAX_TIME", "1ms")],
            "ejection.max_time",
        ),
        (
            &["127.0.0.1:9"],
            &[("PORTSHARE_EJECTION__MAX_TIME", "soon")],
            "ejection.max_time",
        ),
        (
            &["127.0.0.1:9"],
            &[("PORTSHARE_WORKERS__MAX_MEMORY", "lots")],
            "workers.max_memory",
        ),
        (
            &["127.0.0.1:9"],
            &[("PORTSHARE_WORKERS__MAX_CALLS_JITTER", "150%")],
            "workers.max_calls_jitter",
        ),
        (
            &["127.0.0.1:9"],
            &[("PORTSHARE_HEALTH__CHECK", "http")],
            "health.check",
        ),
    ];
    for (backends, vars, key) in cases {
        let e = load_err(&opts(backends), &env(vars));
        assert_eq!(&e.key, key, "{backends:?} {vars:?}: {e}");
        assert!(!e.to_string().contains('\n'), "one line: {e}");
    }
}

#[test]
fn missing_and_broken_files_are_reported_against_config() {
    let mut o = opts(&["127.0.0.1:9"]);
    o.config = Some("/nonexistent/portshare.toml".into());
    let e = load_err(&o, &env(&[]));
    assert_eq!(e.key, "--config");
    assert!(e.problem.contains("/nonexistent/portshare.toml"), "{e}");
    let f = toml_file("listen = [\n");
    o.config = Some(f.path().to_path_buf());
    let e = load_err(&o, &env(&[]));
    assert_eq!(e.key, "--config");
    assert!(!e.to_string().contains('\n'), "{e}");
}

#[test]
fn effective_config_round_trips_through_toml() {
    let c = load(&opts(&["127.0.0.1:50052-50053"]), &env(&[])).unwrap_or_else(|e| panic!("{e}"));
    let text = c.to_toml();
    let f = toml_file(&text);
    let o = Opts {
        config: Some(f.path().to_path_buf()),
        ..Opts::default()
    };
    let again = load(&o, &env(&[])).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(again.to_toml(), text);
}

/// The keys `check` prints are the keys table's: none missing from it, none it lacks.
#[test]
fn check_prints_the_keys_of_the_keys_table() {
    let everything = Opts {
        workers: Some("2".into()),
        listen: Some("127.0.0.1:9000".into()),
        command: vec!["true".into()],
        health: Some("grpc".into()),
        tls_cert: Some("cert.pem".into()),
        tls_key: Some("key.pem".into()),
        tls_client_ca: Some("ca.pem".into()),
        worker_max_memory: Some("1GiB".into()),
        // Windows has no worker sockets; the key is listed for it below.
        worker_socket_dir: cfg!(unix).then(|| "/tmp/portshare-sockets".into()),
        ..Opts::default()
    };
    let e = env(&[("PORTSHARE_WORKERS__CWD", "/tmp")]);
    let c = load(&everything, &e).unwrap_or_else(|e| panic!("{e}"));
    let effective: toml::Table = c.to_toml().parse().unwrap_or_else(|e| panic!("{e}"));
    let mut printed = vec!["backends".to_owned()];
    for (k, v) in &effective {
        match v {
            toml::Value::Table(t) => printed.extend(t.keys().map(|name| format!("{k}.{name}"))),
            _ => printed.push(k.clone()),
        }
    }
    // One of the two: with sockets (Unix, above) no port_base, on Windows no socket_dir.
    printed.push(
        if cfg!(windows) {
            "workers.socket_dir"
        } else {
            "workers.port_base"
        }
        .to_owned(),
    );
    printed.sort();
    let mut table: Vec<String> = keys::KEYS.iter().map(|k| k.name.to_owned()).collect();
    table.sort();
    assert_eq!(printed, table);
}

#[test]
fn the_shipped_example_config_is_valid() {
    let o = Opts {
        config: Some(concat!(env!("CARGO_MANIFEST_DIR"), "/config/portshare.toml").into()),
        ..Opts::default()
    };
    load(&o, &env(&[])).unwrap_or_else(|e| panic!("config/portshare.toml: {e}"));
}

#[test]
fn recycling_is_off_unless_asked_and_hang_detection_is_on() {
    let mut o = Opts {
        workers: Some("2".into()),
        worker_port_base: Some(0),
        command: vec!["true".into()],
        ..Opts::default()
    };
    let w = load(&o, &env(&[])).ok().and_then(|c| c.workers);
    let Some(w) = w else {
        panic!("a worker configuration");
    };
    assert_eq!(w.hang_timeout, Some(Duration::from_secs(30)));
    assert_eq!(
        (w.max_calls, w.max_lifetime, w.max_memory),
        (None, None, None)
    );
    o.worker_hang_timeout = Some("0s".into());
    o.worker_max_memory = Some("1GiB".into());
    let w = load(&o, &env(&[("PORTSHARE_WORKERS__MAX_CALLS", "1000")]))
        .ok()
        .and_then(|c| c.workers);
    let Some(w) = w else {
        panic!("a worker configuration");
    };
    assert_eq!(w.hang_timeout, None);
    assert_eq!(w.max_calls, Some(1000));
    assert_eq!(w.max_memory, Some(1 << 30));
    // `check` renders what it read, so the rendering reads back the same.
    let c = load(
        &o,
        &env(&[("PORTSHARE_WORKERS__MAX_CALLS_JITTER", "12.3%")]),
    );
    let Ok(c) = c else {
        panic!("a configuration");
    };
    let text = c.to_toml();
    assert!(text.contains("max_calls_jitter = \"12.3%\""), "{text}");
    assert!(text.contains("max_memory = \"1073741824B\""), "{text}");
    o.workers = Some("auto".into());
    let count = load(&o, &env(&[]))
        .ok()
        .and_then(|c| c.workers)
        .map(|w| w.count);
    assert!(count.is_some_and(|n| n >= 1));
}

/// Each flag the keys table names sets that key (and no other place says otherwise).
#[test]
fn every_flag_of_the_keys_table_sets_its_key() {
    use clap::Parser;
    for key in keys::KEYS {
        let Some(flag) = key.flag else { continue };
        let mut words = flag.split_whitespace();
        let (Some(name), Some(placeholder)) = (words.next(), words.next()) else {
            panic!("{}: flag {flag:?} has no value placeholder", key.name);
        };
        let value = match (placeholder, key.default) {
            ("ADDR", _) => "127.0.0.1:9",
            ("FILE", _) => "x.pem",
            ("NAME", _) => "svc",
            ("SIZE", _) => "1MiB",
            ("COMMAND", _) => "true",
            (words, _) if words.contains('|') => words.split('|').next().unwrap_or_default(),
            (_, keys::KeyDefault::Text(t)) => t,
            _ => "1",
        };
        let args = ["portshare", name, value];
        let opts = crate::cli::Cli::try_parse_from(args)
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
            .opts;
        let r = raw(&opts, &env(&[])).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        let written: toml::Table = toml::to_string(&r)
            .ok()
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("{args:?}: not rendered"));
        let set = match key.split() {
            (Some(table), name) => written.get(table).and_then(|t| t.get(name)),
            (None, name) => written.get(name),
        };
        assert!(set.is_some(), "{flag} does not set {}: {written}", key.name);
    }
}

fn reuseport_opts() -> Opts {
    Opts {
        listen: Some("127.0.0.1:50051".into()),
        mode: Some("reuseport".into()),
        workers: Some("2".into()),
        command: vec!["python".into(), "server.py".into()],
        ..Opts::default()
    }
}

#[cfg(target_os = "linux")]
#[test]
fn reuseport_gives_the_workers_the_listen_address() {
    let c = load(&reuseport_opts(), &env(&[])).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.mode, Mode::Reuseport);
    let shared = c.workers.and_then(|w| w.shared).map(|a| a.to_string());
    assert_eq!(shared.as_deref(), Some("127.0.0.1:50051"));
    // The other modes give the workers no shared address.
    let mut l4 = reuseport_opts();
    l4.mode = None;
    let c = load(&l4, &env(&[])).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.workers.and_then(|w| w.shared), None);
}

#[test]
fn reuseport_refusals_name_their_key() {
    let static_backends = Opts {
        mode: Some("reuseport".into()),
        ..opts(&["127.0.0.1:9"])
    };
    let e = load_err(&static_backends, &env(&[]));
    assert_eq!(e.key, "mode");
    assert!(e.problem.contains("l4 and h2"), "{e}");
    if cfg!(target_os = "linux") {
        assert!(e.problem.contains("spawned workers"), "{e}");
        for (var, value, key) in [
            ("PORTSHARE_ACCESS_LOG", "stdout", "access_log"),
            ("PORTSHARE_WORKERS__MAX_CALLS", "1000", "workers.max_calls"),
        ] {
            let e = load_err(&reuseport_opts(), &env(&[(var, value)]));
            assert_eq!(e.key, key, "{e}");
        }
    } else {
        assert!(e.problem.contains("needs Linux"), "{e}");
    }
}

#[test]
fn unix_socket_backends_are_kept_as_written() {
    let given = [
        "unix:/run/app/w0.sock",
        "unix-abstract:app-w1",
        "127.0.0.1:9",
    ];
    #[cfg(target_os = "linux")]
    {
        let c = load(&opts(&given), &env(&[])).unwrap_or_else(|e| panic!("{e}"));
        let names: Vec<&str> = c.backends.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(names, given);
        assert_eq!(
            c.backends[0].addr,
            crate::backend::BackendAddr::Unix("/run/app/w0.sock".into())
        );
        assert_eq!(
            c.backends[1].addr,
            crate::backend::BackendAddr::UnixAbstract("app-w1".into())
        );
        let again = load(
            &opts(&["unix:/run/app/w0.sock", "unix:/run/app/w0.sock"]),
            &env(&[]),
        );
        assert!(again.is_err_and(|e| e.to_string().starts_with("backends[1]")));
    }
    #[cfg(unix)]
    {
        let long = format!("unix:/{}", "a".repeat(200));
        let e = load_err(&opts(&[&long]), &env(&[]));
        assert!(e.to_string().starts_with("backends[0]"), "{e}");
        let e = load_err(&opts(&["unix:"]), &env(&[]));
        assert!(e.to_string().contains("no path"), "{e}");
    }
    #[cfg(not(target_os = "linux"))]
    {
        let e = load_err(&opts(&[given[1]]), &env(&[]));
        assert!(e.to_string().starts_with("backends[0]"), "{e}");
        assert!(e.to_string().contains("Linux only"), "{e}");
    }
    #[cfg(windows)]
    {
        let e = load_err(&opts(&[given[0]]), &env(&[]));
        assert!(e.to_string().starts_with("backends[0]"), "{e}");
        assert!(e.to_string().contains("not supported"), "{e}");
    }
    let e = load_err(&opts(&["unix-abstract:"]), &env(&[]));
    assert!(e.to_string().starts_with("backends[0]"), "{e}");
}

#[test]
fn workers_on_sockets_need_no_port_and_no_port_placeholder() {
    let o = Opts {
        workers: Some("2".into()),
        worker_socket_dir: Some("run/sockets".into()),
        command: vec!["python".into(), "server.py".into()],
        ..Opts::default()
    };
    #[cfg(unix)]
    {
        // No port plan is needed, so a listen port of 0 is fine.
        let c = load(&o, &env(&[("PORTSHARE_LISTEN", "127.0.0.1:0")]))
            .unwrap_or_else(|e| panic!("{e}"));
        let w = c.workers.clone().expect("workers");
        let dir = w.socket_dir.expect("a socket dir");
        assert!(dir.is_absolute() && dir.ends_with("run/sockets"), "{dir:?}");
        let text = c.to_toml();
        assert!(text.contains("socket_dir = "), "{text}");

        let with_port = Opts {
            command: vec!["python".into(), "--port".into(), "{port}".into()],
            ..o.clone()
        };
        let e = load_err(&with_port, &env(&[]));
        assert!(e.to_string().starts_with("workers.command"), "{e}");
        let long = Opts {
            worker_socket_dir: Some(format!("/{}", "d".repeat(120))),
            ..o.clone()
        };
        let e = load_err(&long, &env(&[]));
        assert!(e.to_string().starts_with("workers.socket_dir"), "{e}");
        // A port base beside a socket directory would be silently unused: refused.
        let with_base = Opts {
            worker_port_base: Some(20000),
            ..o.clone()
        };
        let e = load_err(&with_base, &env(&[]));
        assert!(e.to_string().starts_with("workers.port_base"), "{e}");
        assert!(e.to_string().contains("socket_dir"), "{e}");
        // What `check` prints for workers on sockets loads again as it is.
        let path =
            std::env::temp_dir().join(format!("portshare-sockets-{}.toml", std::process::id()));
        std::fs::write(&path, &text).unwrap_or_else(|e| panic!("{e}"));
        let again = Opts {
            config: Some(path.clone()),
            ..Opts::default()
        };
        let reloaded = load(&again, &env(&[]));
        let _ = std::fs::remove_file(&path);
        let reloaded = reloaded.unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(reloaded.to_toml(), text);
    }
    #[cfg(windows)]
    {
        let e = load_err(&o, &env(&[]));
        assert!(e.to_string().starts_with("workers.socket_dir"), "{e}");
    }
    let socket_without_dir = Opts {
        worker_socket_dir: None,
        worker_port_base: Some(0),
        command: vec!["python".into(), "{socket}".into()],
        ..o
    };
    let e = load_err(&socket_without_dir, &env(&[]));
    assert!(e.to_string().starts_with("workers.command"), "{e}");
}
