//! Test support: a Python venv with grpcio (created once under target/), real Python gRPC
//! workers on free ports, a launcher for the real portshare binary, a Python gRPC client,
//! and `eventually`, which polls instead of sleeping.
#![allow(dead_code)] // each test binary uses a different part of this module
#![allow(unused_macros)] // likewise

/// `in_both_modes!(a, b, #[cfg(unix)] c)`: for each `fn name(mode: &str)` named, a test
/// `l4::name` and a test `h2::name` that run it in that mode; attributes go along. Needs
/// `#[macro_use] mod support;`.
macro_rules! in_both_modes {
    ($($(#[$attr:meta])* $name:ident),* $(,)?) => {
        mod l4 {
            $( $(#[$attr])* #[test] fn $name() { super::$name("l4") } )*
        }
        mod h2 {
            $( $(#[$attr])* #[test] fn $name() { super::$name("h2") } )*
        }
    };
}

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Generous: a cold venv install or a busy 2-core machine can make Python slow to start.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The repository's `tests/python` folder.
pub fn python_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("python")
}

/// The venv's Python interpreter; creates the venv on first use (under a lock, so test
/// binaries running at once do not race), and again whenever the requirements change.
pub fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("pyenv");
        let requirements = python_dir().join("requirements.txt");
        let wanted = fs::read_to_string(&requirements).expect("read tests/python/requirements.txt");
        fs::create_dir_all(env!("CARGO_TARGET_TMPDIR")).expect("create target tmp dir");
        let lock = File::create(root.with_extension("lock")).expect("create venv lock file");
        lock.lock().expect("lock the venv");
        let exe = if cfg!(windows) {
            root.join("Scripts").join("python.exe")
        } else {
            root.join("bin").join("python")
        };
        let stamp = root.join("requirements.installed");
        if fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
            eprintln!("creating the test venv in {} (once)", root.display());
            let _ = fs::remove_dir_all(&root);
            let host_python = std::env::var("PYTHON")
                .unwrap_or_else(|_| if cfg!(windows) { "python" } else { "python3" }.to_owned());
            run_ok(Command::new(host_python).arg("-m").arg("venv").arg(&root));
            run_ok(
                Command::new(&exe)
                    .args([
                        "-m",
                        "pip",
                        "install",
                        "--quiet",
                        "--disable-pip-version-check",
                        "-r",
                    ])
                    .arg(&requirements),
            );
            fs::write(&stamp, &wanted).expect("write venv stamp");
        }
        let _ = lock.unlock();
        exe
    })
}

fn run_ok(cmd: &mut Command) {
    let status = cmd.status().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(status.success(), "{cmd:?} failed: {status}");
}

/// Polls `check` every 20 ms until it holds or `timeout` passes; panics with `what` then.
pub fn eventually(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// [`eventually`] inside a tokio test: polls without blocking the runtime's thread, so the
/// in-process servers the test runs on it keep being served meanwhile.
pub async fn eventually_async(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Collects a child's output lines on a thread, echoing them (prefixed) for failed-test logs.
#[derive(Clone, Default)]
pub struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    fn follow(
        &self,
        from: impl Read + Send + 'static,
        prefix: String,
        tx: Option<mpsc::Sender<String>>,
    ) {
        let lines = self.clone();
        thread::spawn(move || {
            for line in BufReader::new(from).lines() {
                let Ok(line) = line else { break };
                eprintln!("{prefix} {line}");
                if let Some(tx) = &tx {
                    let _ = tx.send(line.clone());
                }
                lines.0.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
    }

    /// Every line so far.
    pub fn all(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether any line so far contains `needle`.
    pub fn contains(&self, needle: &str) -> bool {
        self.all().iter().any(|l| l.contains(needle))
    }

    /// How many lines so far contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.all().iter().filter(|l| l.contains(needle)).count()
    }
}

/// Waits for a child to exit, killing it after `timeout`.
pub fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// Sends a signal by name (`TERM`, `KILL`, ...) to a process.
#[cfg(unix)]
pub fn signal(pid: u32, name: &str) {
    run_ok(
        Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string()),
    );
}

/// Whether a process runs (a zombie counts as gone).
#[cfg(target_os = "linux")]
pub fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// A real Python grpcio worker (tests/python/worker.py) on a free port, or on a Unix
/// socket.
pub struct Worker {
    child: Child,
    /// Its name, as it reports it in replies.
    pub name: String,
    /// The port it listens on (127.0.0.1); meaningless when `address` is set.
    pub port: u16,
    /// The address it listens on instead of a port (`unix:PATH`, `unix-abstract:NAME`).
    pub address: Option<String>,
    /// Its stderr: `CALL <method> <peer>` and `CANCELLED <method>` lines.
    pub log: Lines,
}

impl Worker {
    /// Starts `names.len()` workers at once and waits until each has bound its port.
    pub fn start_many(names: &[&str]) -> Vec<Worker> {
        let at: Vec<(&str, Option<String>)> = names.iter().map(|n| (*n, None)).collect();
        Self::start_at(&at)
    }

    /// Starts workers at once, each named and bound to its address (`unix:PATH`,
    /// `unix-abstract:NAME`; `None`: a free port), and waits until each listens.
    pub fn start_at(workers: &[(&str, Option<String>)]) -> Vec<Worker> {
        let python = python();
        let pending: Vec<_> = workers
            .iter()
            .map(|(name, address)| {
                let bind: Vec<&str> = match address {
                    Some(a) => vec!["--address", a],
                    None => vec!["--port", "0"],
                };
                let mut child = Command::new(python)
                    .arg(python_dir().join("worker.py"))
                    .args(bind)
                    .args(["--name", name])
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap_or_else(|e| panic!("start worker {name}: {e}"));
                let log = Lines::default();
                let (tx, rx) = mpsc::channel();
                if let Some(out) = child.stdout.take() {
                    Lines::default().follow(out, format!("[{name} stdout]"), Some(tx));
                }
                if let Some(err) = child.stderr.take() {
                    log.follow(err, format!("[{name}]"), None);
                }
                (name.to_string(), address.clone(), child, log, rx)
            })
            .collect();
        pending
            .into_iter()
            .map(|(name, address, mut child, log, rx)| {
                let port = loop {
                    let line = rx.recv_timeout(START_TIMEOUT).unwrap_or_else(|_| {
                        let _ = child.kill();
                        panic!("worker {name} did not report its port: {:?}", log.all())
                    });
                    if let Some(p) = line.strip_prefix("PORT ") {
                        break p.trim().parse().expect("worker port");
                    }
                };
                Worker {
                    child,
                    name,
                    port,
                    address,
                    log,
                }
            })
            .collect()
    }

    /// `127.0.0.1:<port>`, or its socket address as `--backend` takes it.
    pub fn addr(&self) -> String {
        match &self.address {
            Some(a) => a.clone(),
            None => format!("127.0.0.1:{}", self.port),
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `--workers N --worker-port-base 0 -- python worker.py --port {port} EXTRA...`: portshare
/// spawning the test workers itself.
pub fn spawn_args(n: usize, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--workers".into(),
        n.to_string(),
        "--worker-port-base".into(),
        "0".into(),
        "--".into(),
        python().display().to_string(),
        python_dir().join("worker.py").display().to_string(),
        "--port".into(),
        "{port}".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// A port nothing listens on: bound, then released.
pub fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// The portshare binary under test, without the `PORTSHARE_*` variables of the environment
/// the tests run in: those are configuration to portshare (a test's own knob, such as
/// `PORTSHARE_CHAOS_SECONDS`, would be refused as an unknown key), and a test sets what
/// it means to.
pub fn portshare() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_portshare"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("PORTSHARE_") {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// A running portshare, started with JSON logs so the bound addresses can be read back.
pub struct Proxy {
    child: Child,
    /// The public listener.
    pub addr: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
    /// Its log lines (JSON objects).
    pub log: Lines,
}

impl Proxy {
    /// Starts portshare on 127.0.0.1:0 with an admin listener, plus `args`; waits until
    /// both listeners are bound.
    pub fn start(args: &[&str]) -> Proxy {
        Self::spawn(portshare(), args)
    }

    /// Starts portshare with `--config file` plus `args` and nothing else on the command
    /// line, so every key in the file can be reloaded; the file must set `listen` and
    /// `admin` (port 0 is fine) and `log_format = "json"`.
    pub fn start_file(file: &Path, args: &[&str]) -> Proxy {
        let mut cmd = portshare();
        cmd.arg("--config").arg(file);
        Self::launch(cmd, args)
    }

    /// Like [`Proxy::start`], with extra environment variables.
    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Proxy {
        let mut cmd = portshare();
        cmd.envs(env.iter().copied());
        Self::spawn(cmd, args)
    }

    /// Like [`Proxy::start`], but runs portshare through `wrapper` (e.g. `prlimit`), whose
    /// own arguments `wrapper_args` end with the path to the binary.
    pub fn start_with(wrapper: &str, wrapper_args: &[String]) -> Proxy {
        let mut cmd = Command::new(wrapper);
        cmd.args(wrapper_args);
        Self::spawn(cmd, &[])
    }

    fn spawn(mut cmd: Command, args: &[&str]) -> Proxy {
        cmd.args([
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ]);
        Self::launch(cmd, args)
    }

    fn launch(mut cmd: Command, args: &[&str]) -> Proxy {
        let mut child = cmd
            .args(args)
            .env("PORTSHARE_LOG", "info,portshare=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start portshare");
        let log = Lines::default();
        let (tx, rx) = mpsc::channel();
        if let Some(err) = child.stderr.take() {
            log.follow(err, "[portshare]".into(), Some(tx));
        }
        // Workers' stdout is relayed to portshare's stdout: collected in the same log.
        if let Some(out) = child.stdout.take() {
            log.follow(out, "[portshare stdout]".into(), None);
        }
        let (mut addr, mut admin) = (None, None);
        while addr.is_none() || admin.is_none() {
            let Ok(line) = rx.recv_timeout(START_TIMEOUT) else {
                let _ = child.kill();
                panic!("portshare did not start: {:?}", log.all());
            };
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if v["message"] == "listening" {
                let a: SocketAddr = v["addr"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .expect("addr");
                match v["listener"].as_str() {
                    Some("proxy") => addr = Some(a),
                    Some("admin") => admin = Some(a),
                    _ => {}
                }
            }
        }
        Proxy {
            child,
            addr: addr.expect("proxy addr"),
            admin: admin.expect("admin addr"),
            log,
        }
    }

    /// `127.0.0.1:<port>` of the public listener.
    pub fn target(&self) -> String {
        self.addr.to_string()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for it to exit.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_with_timeout(&mut self.child, timeout)
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// GET `path` from the admin listener: (status, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path)
    }

    /// The value of one sample in `/metrics`, e.g.
    /// `portshare_backend_connections_total{backend="127.0.0.1:5"}`. Panics when the
    /// sample is absent, so an assertion on a renamed or never-registered metric fails
    /// instead of reading 0.
    pub fn metric(&self, sample: &str) -> f64 {
        let (_, body) = self.admin_get("/metrics");
        sample_in(&body, sample)
            .unwrap_or_else(|| panic!("no sample {sample} in /metrics:\n{body}"))
    }

    /// Like [`Proxy::metric`], but `None` while the sample is absent: for polling a counter
    /// that appears with its first event.
    pub fn try_metric(&self, sample: &str) -> Option<f64> {
        sample_in(&self.admin_get("/metrics").1, sample)
    }

    /// `/backends`, parsed.
    pub fn backends(&self) -> Vec<Value> {
        let (status, body) = self.admin_get("/backends");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("backends JSON")
    }

    /// Every backend's state, in `/backends` order.
    pub fn states(&self) -> Vec<String> {
        self.backends()
            .iter()
            .map(|b| b["state"].as_str().unwrap_or("?").to_owned())
            .collect()
    }

    /// Whether every backend is healthy.
    pub fn all_healthy(&self) -> bool {
        self.states().iter().all(|s| s == "healthy")
    }

    /// The pids of the running workers.
    pub fn pids(&self) -> Vec<u32> {
        self.backends()
            .iter()
            .filter_map(|b| b["pid"].as_u64())
            .map(|p| p as u32)
            .collect()
    }

    /// The `/backends` entry of spawned worker `index` (the first, if it has two).
    pub fn worker_entry(&self, index: u64) -> Value {
        self.backends()
            .into_iter()
            .find(|b| b["worker"].as_u64() == Some(index))
            .expect("worker listed")
    }

    /// Calls of `method` (any method for "") that the spawned workers have begun, from the
    /// `CALL <method> <peer>` lines of their output: what tests wait on to know a client's
    /// calls are flowing.
    pub fn worker_calls(&self, method: &str) -> usize {
        let needle = format!("CALL {method}");
        self.log
            .all()
            .iter()
            .filter_map(|l| l.strip_prefix("[worker "))
            .filter_map(|l| l.split_once("] ").map(|(_, text)| text))
            .filter(|text| text.starts_with(&needle))
            .count()
    }

    /// Lines of spawned worker `index`'s output (without the `[worker N] ` prefix).
    pub fn worker_lines(&self, index: u64) -> Vec<String> {
        let prefix = format!("[worker {index}] ");
        self.log
            .all()
            .iter()
            .filter_map(|l| l.strip_prefix(&prefix).map(str::to_owned))
            .collect()
    }
}

/// portshare spawning `n` test workers (see [`spawn_args`]), with `flags` before them and
/// `env` for portshare.
pub fn spawned(
    n: usize,
    extra_worker_args: &[&str],
    env: &[(&str, &str)],
    flags: &[&str],
) -> Proxy {
    let mut args: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
    args.extend(spawn_args(n, extra_worker_args));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Proxy::start_env(&refs, env)
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of `sample` (a metric name with its labels, exactly) in Prometheus text.
fn sample_in(body: &str, sample: &str) -> Option<f64> {
    body.lines().find_map(|l| {
        let rest = l.strip_prefix(sample)?;
        // The whole name: `..._total` must not match `..._total_more`.
        rest.starts_with(' ').then(|| rest.trim().parse().ok())?
    })
}

/// GET from an admin endpoint, through the client `portshare status` uses: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    portshare::status::get(addr, path, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// Starts tests/python/client.py with `args` (it prints one JSON object).
pub fn client_spawn(args: &[&str]) -> Child {
    Command::new(python())
        .arg(python_dir().join("client.py"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start client.py")
}

/// Waits (up to `timeout`, then kills) for a child whose stdout and stderr are piped;
/// returns its exit status and both outputs.
pub fn collect(mut child: Child, timeout: Duration) -> (Option<ExitStatus>, String, String) {
    fn drain(from: Option<impl Read + Send + 'static>) -> thread::JoinHandle<String> {
        thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut r) = from {
                let _ = r.read_to_string(&mut text);
            }
            text
        })
    }
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let status = wait_with_timeout(&mut child, timeout);
    (
        status,
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    )
}

/// Waits for a client started with [`client_spawn`] and returns its JSON answer.
pub fn client_result(child: Child) -> Value {
    let (status, out, err) = collect(child, Duration::from_secs(120));
    assert!(
        status.is_some_and(|s| s.success()),
        "client.py failed ({status:?}): {err}\n{out}"
    );
    serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("client.py output {out:?}: {e}\n{err}"))
}

/// Runs tests/python/client.py with `args` and returns its JSON answer.
pub fn client(args: &[&str]) -> Value {
    client_result(client_spawn(args))
}

/// One unary call through `target`; panics unless it succeeds.
pub fn unary_ok(target: &str) -> Value {
    let r = client(&["unary", "--target", target]);
    assert_eq!(r["code"], "OK", "{r}");
    r
}

/// How many calls each worker answered, from a `spread`/`one-channel` answer.
pub fn spread_counts(v: &Value) -> BTreeMap<String, u64> {
    v["workers"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, c)| (k.clone(), c.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

/// Runs the binary with `args` to completion (for commands that must exit by themselves
/// within 30 s): (exit code, stdout, stderr).
pub fn run_portshare(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let child = portshare()
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start portshare");
    let (status, out, err) = collect(child, Duration::from_secs(30));
    (status.and_then(|s| s.code()), out, err)
}

/// A file's lines, each parsed as JSON (a test fails on one that is not); none while the
/// file does not exist yet.
pub fn json_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

/// One call of each kind through `target` (unary, server stream of 200, client stream of
/// 100 × 1000 bytes, bidi of 10,000), each checked complete and in order.
pub fn every_call_kind_ok(target: &str) {
    let r = unary_ok(target);
    assert_eq!(r["payload_ok"], true, "{r}");
    let r = client(&["server-stream", "--target", target, "--count", "200"]);
    assert_complete(&r, "received", 200, "in_order");
    let r = client(&[
        "client-stream",
        "--target",
        target,
        "--count",
        "100",
        "--payload-size",
        "1000",
    ]);
    assert_complete(&r, "seq", 100, "payload_ok");
    let r = client(&["bidi", "--target", target, "--count", "10000"]);
    assert_complete(&r, "received", 10000, "in_order");
}

/// A client.py answer that ended OK with `r[count] == n` and `r[check] == true`.
pub fn assert_complete(r: &Value, count: &str, n: u64, check: &str) {
    assert_eq!(
        (r["code"].as_str(), r[count].as_u64(), r[check].as_bool()),
        (Some("OK"), Some(n), Some(true)),
        "{r}"
    );
}
