//! Configuration in two layers: a serde [`RawConfig`] assembled by the `config` crate from
//! defaults < TOML file < `PORTSHARE_*` environment < flags, then validated into the typed
//! [`Config`]. Every error names the key it is about.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use config::{Environment, File, FileFormat};
use serde::{Deserialize, Serialize};

use crate::backend::{BackendSpec, EjectionConfig, Thresholds};
use crate::balance::Balance;
use crate::cli::Opts;
use crate::h2::H2Config;
use crate::health::{CheckKind, HealthConfig};
use crate::l4::L4Config;
use crate::listener::ListenerConfig;
use crate::supervisor::{WorkerOutput, WorkersConfig};
use crate::tls::TlsConfig;
use std::path::PathBuf;

/// Environment variables with the `PORTSHARE_` prefix that are not config keys.
const NOT_CONFIG_KEYS: [&str; 3] = ["PORTSHARE_LOG", "PORTSHARE_PORT", "PORTSHARE_WORKER_INDEX"];

/// Whether an environment variable is meant as a config key. Kubernetes gives every pod
/// `<SERVICE>_SERVICE_HOST`, `<SERVICE>_PORT_50051_TCP`, ... for each Service, so a Service
/// named `portshare` puts `PORTSHARE_SERVICE_*` and `PORTSHARE_PORT_*` in the environment:
/// those are not ours and must not make portshare refuse to start.
fn is_config_var(name: &str) -> bool {
    name.strip_prefix("PORTSHARE_")
        .is_some_and(|key| !key.is_empty())
        && !NOT_CONFIG_KEYS.contains(&name)
        && !name.starts_with("PORTSHARE_SERVICE_")
        && !name.starts_with("PORTSHARE_PORT_")
}

/// A port range longer than this is almost certainly a typo (`5000-50000`), and would
/// open tens of thousands of backends.
const MAX_RANGE_PORTS: u32 = 1024;

/// A configuration problem: which key, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ConfigError {
    /// The key (or flag, for `--config`) at fault.
    pub key: String,
    /// What is wrong, in a few words.
    pub problem: String,
}

fn err(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        problem: problem.into(),
    }
}

/// How client connections are handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Each client connection goes to one backend; bytes are copied both ways.
    L4,
    /// HTTP/2 is terminated and every call is balanced on its own.
    H2,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mode::L4 => f.write_str("l4"),
            Mode::H2 => f.write_str("h2"),
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// For people at a terminal.
    Text,
    /// One JSON object a line, for log collectors in containers.
    Json,
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// The configuration as written, before validation: every key optional, unknown keys rejected.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// See the README's option table.
    pub listen: Option<String>,
    /// See the README's option table.
    pub mode: Option<String>,
    /// See the README's option table.
    pub backends: Option<Vec<String>>,
    /// See the README's option table.
    pub balance: Option<String>,
    /// See the README's option table.
    pub admin: Option<String>,
    /// See the README's option table.
    pub max_connections: Option<u64>,
    /// See the README's option table.
    pub drain_timeout: Option<String>,
    /// See the README's option table.
    pub connect_timeout: Option<String>,
    /// See the README's option table.
    pub connect_attempts: Option<u64>,
    /// See the README's option table.
    pub idle_timeout: Option<String>,
    /// See the README's option table.
    pub queue_timeout: Option<String>,
    /// See the README's option table.
    pub log_format: Option<String>,
    /// Passive ejection after failed connects.
    pub ejection: Option<RawEjection>,
    /// Active health checks.
    pub health: Option<RawHealth>,
    /// Spawned workers.
    pub workers: Option<RawWorkers>,
    /// h2-mode limits and windows.
    pub h2: Option<RawH2>,
    /// TLS termination.
    pub tls: Option<RawTls>,
}

/// `[tls]` as written.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// PEM certificate chain.
    pub cert: Option<String>,
    /// PEM private key.
    pub key: Option<String>,
    /// PEM CA certificates for client authentication.
    pub client_ca: Option<String>,
    /// Handshake limit.
    pub handshake_timeout: Option<String>,
    /// How often the files are checked for changes.
    pub watch_interval: Option<String>,
}

impl RawTls {
    fn validate(&self) -> Result<Option<TlsConfig>, ConfigError> {
        let present =
            |v: &Option<String>| v.as_deref().filter(|s| !s.is_empty()).map(PathBuf::from);
        let (cert, key) = match (present(&self.cert), present(&self.key)) {
            (None, None) => {
                if self.client_ca.is_some() {
                    return Err(err(
                        "tls.client_ca",
                        "client certificates need TLS: give tls.cert and tls.key too",
                    ));
                }
                return Ok(None);
            }
            (Some(_), None) => return Err(err("tls.key", "tls.cert is given, but not its key")),
            (None, Some(_)) => {
                return Err(err("tls.cert", "tls.key is given, but not the certificate"));
            }
            (Some(c), Some(k)) => (c, k),
        };
        Ok(Some(TlsConfig {
            cert,
            key,
            client_ca: present(&self.client_ca),
            handshake_timeout: positive(
                "tls.handshake_timeout",
                self.handshake_timeout.as_deref(),
                "10s",
            )?,
            watch_interval: positive("tls.watch_interval", self.watch_interval.as_deref(), "5s")?,
        }))
    }
}

/// `[h2]` as written.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawH2 {
    /// Streams per client connection.
    pub max_concurrent_streams: Option<u64>,
    /// Largest header block, bytes.
    pub max_header_list_size: Option<u64>,
    /// Calls in flight across the proxy.
    pub max_calls: Option<u64>,
    /// Per-stream flow-control window, bytes.
    pub stream_window: Option<u64>,
    /// Per-connection flow-control window, bytes.
    pub connection_window: Option<u64>,
    /// How long a call may wait for a backend; the top-level `queue_timeout` by default.
    pub queue_timeout: Option<String>,
    /// Calls in flight one backend may have; 0 = no cap.
    pub max_calls_per_backend: Option<u64>,
}

/// `[health]` as written.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    /// `tcp` or `grpc`.
    pub check: Option<String>,
    /// The gRPC service name asked about.
    pub service: Option<String>,
    /// Time between checks of a ready backend.
    pub interval: Option<String>,
    /// Time between checks of a backend that is not ready.
    pub unhealthy_interval: Option<String>,
    /// One check's limit.
    pub timeout: Option<String>,
    /// Passes in a row that return a backend.
    pub healthy_threshold: Option<u64>,
    /// Failures in a row that take a backend out.
    pub unhealthy_threshold: Option<u64>,
}

/// `[workers]` as written.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawWorkers {
    /// How many: a number, or `"auto"`.
    pub count: Option<RawCount>,
    /// Program and arguments.
    pub command: Option<Vec<String>>,
    /// First worker port; 0 = free ports.
    pub port_base: Option<u64>,
    /// Extra environment.
    pub env: Option<std::collections::BTreeMap<String, String>>,
    /// Working directory.
    pub cwd: Option<String>,
    /// `prefix` or `inherit`.
    pub output: Option<String>,
    /// SIGTERM-to-SIGKILL grace.
    pub stop_grace: Option<String>,
    /// First restart delay.
    pub restart_backoff: Option<String>,
    /// Longest restart delay.
    pub restart_backoff_max: Option<String>,
    /// Exits within the window that end portshare.
    pub crash_loop_restarts: Option<u64>,
    /// The crash-loop window.
    pub crash_loop_window: Option<String>,
    /// Rolling restart: how long a restarted worker may take to be ready.
    pub ready_timeout: Option<String>,
    /// A worker failing its checks without a pass this long is replaced; 0 = never.
    pub hang_timeout: Option<String>,
    /// Calls (h2) or connections (l4) after which a worker is recycled; 0 = never.
    pub max_calls: Option<u64>,
    /// Random extra on `max_calls`, as a percentage ("10%").
    pub max_calls_jitter: Option<String>,
    /// Age after which a worker is recycled; 0 = never.
    pub max_lifetime: Option<String>,
    /// Random extra on `max_lifetime`, as a percentage ("10%").
    pub max_lifetime_jitter: Option<String>,
    /// Resident memory of a worker's process tree above which it is recycled ("512MiB").
    pub max_memory: Option<String>,
}

/// `[workers] count` as written: a number, or `"auto"` (one worker per CPU this process
/// may use).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum RawCount {
    /// A number of workers.
    Number(u64),
    /// `"auto"` (or a number written as text, as the environment gives it).
    Text(String),
}

/// One worker per CPU this process may use: `available_parallelism` honours the CPU
/// affinity mask and cgroup (v1 and v2) CPU quotas, so a container limited to 2 CPUs on a
/// 64-core host gets 2 workers; at least 1.
fn auto_count() -> u64 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u64)
}

/// `[ejection]` as written.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawEjection {
    /// The first ejection's length.
    pub base_time: Option<String>,
    /// The longest ejection.
    pub max_time: Option<String>,
}

/// The validated configuration; each component takes its own part of it.
#[derive(Debug, Clone)]
pub struct Config {
    /// The public listener.
    pub listener: ListenerConfig,
    /// How connections are handled.
    pub mode: Mode,
    /// Backends that already run.
    pub backends: Vec<BackendSpec>,
    /// How a backend is picked.
    pub balance: Balance,
    /// Connect and copy settings of l4 mode.
    pub l4: L4Config,
    /// Limits and windows of h2 mode.
    pub h2: H2Config,
    /// TLS termination, if on.
    pub tls: Option<TlsConfig>,
    /// Passive ejection settings.
    pub ejection: EjectionConfig,
    /// Active health checks.
    pub health: HealthConfig,
    /// Spawned workers, when portshare starts them (then `backends` is empty until the
    /// ports are known).
    pub workers: Option<WorkersConfig>,
    /// Admin listener, if any.
    pub admin: Option<SocketAddr>,
    /// How long open work may finish after a shutdown signal.
    pub drain_timeout: Duration,
    /// Log output format.
    pub log_format: LogFormat,
}

/// Assembles and validates the configuration from the file named in `opts`, the
/// `PORTSHARE_*` entries of `env`, and the flags in `opts`.
pub fn load(opts: &Opts, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
    raw(opts, env)?.validate()
}

/// Only the admin address (for `portshare status`, which needs nothing else).
pub fn admin_addr(
    opts: &Opts,
    env: &HashMap<String, String>,
) -> Result<Option<SocketAddr>, ConfigError> {
    raw(opts, env)?
        .admin
        .as_deref()
        .filter(|s| !s.is_empty() && *s != "off")
        .map(|s| resolve_one("admin", s, false, system_lookup))
        .transpose()
}

/// The layered, not yet validated configuration.
pub fn raw(opts: &Opts, env: &HashMap<String, String>) -> Result<RawConfig, ConfigError> {
    let mut builder = config::Config::builder();
    if let Some(path) = &opts.config {
        builder = builder.add_source(file_source(path)?);
    }
    layer(builder, opts, env)
}

/// [`raw`] with the file's TOML given as text instead of a `--config` path.
pub(crate) fn raw_from_toml(
    toml: &str,
    opts: &Opts,
    env: &HashMap<String, String>,
) -> Result<RawConfig, ConfigError> {
    let builder = config::Config::builder().add_source(File::from_str(toml, FileFormat::Toml));
    layer(builder, opts, env)
}

/// Adds the environment and the flags over whatever `builder` holds, and deserializes.
fn layer(
    mut builder: config::builder::ConfigBuilder<config::builder::DefaultState>,
    opts: &Opts,
    env: &HashMap<String, String>,
) -> Result<RawConfig, ConfigError> {
    let env_vars: config::Map<String, String> = env
        .iter()
        .filter(|(k, _)| is_config_var(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    builder = builder.add_source(
        Environment::with_prefix("PORTSHARE")
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("backends")
            .with_list_parse_key("workers.command")
            .source(Some(env_vars)),
    );
    let flag = |key: &str, e: config::ConfigError| err(key, e.to_string());
    let strings = [
        ("listen", &opts.listen),
        ("mode", &opts.mode),
        ("balance", &opts.balance),
        ("admin", &opts.admin),
        ("drain_timeout", &opts.drain_timeout),
        ("connect_timeout", &opts.connect_timeout),
        ("idle_timeout", &opts.idle_timeout),
        ("queue_timeout", &opts.queue_timeout),
        ("workers.hang_timeout", &opts.worker_hang_timeout),
        ("workers.max_lifetime", &opts.worker_max_lifetime),
        ("workers.max_memory", &opts.worker_max_memory),
        ("log_format", &opts.log_format),
        ("health.check", &opts.health),
        ("tls.cert", &opts.tls_cert),
        ("tls.key", &opts.tls_key),
        ("tls.client_ca", &opts.tls_client_ca),
        ("health.service", &opts.health_service),
    ];
    for (key, value) in strings {
        if let Some(v) = value {
            builder = builder
                .set_override(key, v.as_str())
                .map_err(|e| flag(key, e))?;
        }
    }
    let numbers = [
        ("max_connections", opts.max_connections),
        ("connect_attempts", opts.connect_attempts),
        ("workers.port_base", opts.worker_port_base),
        ("workers.max_calls", opts.worker_max_calls),
        ("h2.max_calls_per_backend", opts.max_calls_per_backend),
    ];
    for (key, value) in numbers {
        if let Some(v) = value {
            builder = builder.set_override(key, v).map_err(|e| flag(key, e))?;
        }
    }
    if let Some(count) = &opts.workers {
        builder = match count.trim().parse::<u64>() {
            Ok(n) => builder.set_override("workers.count", n),
            Err(_) => builder.set_override("workers.count", count.as_str()),
        }
        .map_err(|e| flag("workers.count", e))?;
    }
    if !opts.command.is_empty() {
        builder = builder
            .set_override("workers.command", opts.command.clone())
            .map_err(|e| flag("workers.command", e))?;
    }
    if !opts.backends.is_empty() {
        builder = builder
            .set_override("backends", opts.backends.clone())
            .map_err(|e| flag("backends", e))?;
    }
    let built = builder.build().map_err(from_config_crate)?;
    built.try_deserialize().map_err(from_config_crate)
}

fn file_source(path: &Path) -> Result<File<config::FileSourceFile, FileFormat>, ConfigError> {
    let shown = path.display();
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(File::from(path).format(FileFormat::Toml).required(true)),
        Ok(_) => Err(err("--config", format!("{shown} is not a file"))),
        Err(e) => Err(err("--config", format!("cannot read {shown}: {e}"))),
    }
}

/// Turns the `config` crate's errors into ones that name the key and fit on one line.
fn from_config_crate(e: config::ConfigError) -> ConfigError {
    match e {
        config::ConfigError::Type {
            key: Some(key),
            unexpected,
            expected,
            ..
        } => err(key, format!("expected {expected}, found {unexpected}")),
        config::ConfigError::At {
            error,
            key: Some(key),
            ..
        } => {
            let inner = from_config_crate(*error);
            if inner.key == "config" {
                err(key, inner.problem)
            } else {
                // An unknown key inside a table: name it in full (`ejection.base`).
                err(format!("{key}.{}", inner.key), inner.problem)
            }
        }
        config::ConfigError::Message(m) => unknown_field(&m),
        config::ConfigError::FileParse { uri, cause } => {
            let file = uri.unwrap_or_else(|| "config file".to_owned());
            let cause = cause.to_string().replace('\n', " ");
            err(
                "--config",
                format!(
                    "{file}: {}",
                    cause.split_whitespace().collect::<Vec<_>>().join(" ")
                ),
            )
        }
        other => err("config", other.to_string().replace('\n', " ")),
    }
}

/// serde reports an unknown key as "unknown field `x`, expected one of ..."; lead with the key.
fn unknown_field(message: &str) -> ConfigError {
    if let Some((field, _)) = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split_once('`'))
    {
        // TOML allows an empty key (`"" = 1`); name it as TOML writes it.
        let field = if field.is_empty() { "\"\"" } else { field };
        return err(
            field,
            "unknown key (see config/portshare.toml for the keys)",
        );
    }
    err("config", message.replace('\n', " "))
}

impl RawConfig {
    /// Checks every key and turns the raw strings into typed values, resolving host names
    /// with the system's resolver.
    pub fn validate(&self) -> Result<Config, ConfigError> {
        self.validate_with(system_lookup)
    }

    /// [`RawConfig::validate`] with `lookup` resolving the host names that are not IP
    /// addresses.
    pub(crate) fn validate_with(&self, lookup: Lookup) -> Result<Config, ConfigError> {
        let listen = match &self.listen {
            Some(s) => resolve_one("listen", s, true, lookup)?,
            None => SocketAddr::from(([0u16; 8], 50051)),
        };
        let mode = match self.mode.as_deref().unwrap_or("l4") {
            "l4" => Mode::L4,
            "h2" => Mode::H2,
            other => {
                return Err(err(
                    "mode",
                    format!("unknown mode {other:?} (expected l4 or h2)"),
                ));
            }
        };
        let mut backends: Vec<BackendSpec> = Vec::new();
        let mut seen = HashSet::new();
        for (i, entry) in self.backends.iter().flatten().enumerate() {
            let key = format!("backends[{i}]");
            for spec in parse_backend(&key, entry, lookup)? {
                if !seen.insert(spec.addr) {
                    return Err(err(key, format!("{} is listed twice", spec.name)));
                }
                backends.push(spec);
            }
        }
        let workers = self
            .workers
            .as_ref()
            .map(|w| w.validate(listen))
            .transpose()?;
        match (&workers, backends.is_empty()) {
            (None, true) => {
                return Err(err(
                    "backends",
                    "no backends: give --backend HOST:PORT (or HOST:P1-P2), or --workers N -- COMMAND",
                ));
            }
            (Some(_), false) => {
                return Err(err(
                    "workers",
                    "give either backends (workers that already run) or workers (spawned by portshare), not both",
                ));
            }
            _ => {}
        }
        let health = self.health.clone().unwrap_or_default().validate()?;
        let balance = match (&self.balance, mode) {
            (Some(s), _) => s.parse().map_err(|e: String| err("balance", e))?,
            (None, Mode::L4) => Balance::LeastConn,
            // Calls are short and many: p2c spreads them without herding on one "best".
            (None, Mode::H2) => Balance::P2c,
        };
        let admin = self
            .admin
            .as_deref()
            .filter(|s| !s.is_empty() && *s != "off")
            .map(|s| resolve_one("admin", s, true, lookup))
            .transpose()?;
        let max_connections = match self.max_connections {
            None => 10_000,
            Some(0) => return Err(err("max_connections", "must be at least 1")),
            Some(n) => usize::try_from(n)
                .ok()
                .filter(|n| *n <= tokio::sync::Semaphore::MAX_PERMITS)
                .ok_or_else(|| err("max_connections", format!("{n} is too large")))?,
        };
        let connect_attempts = match self.connect_attempts {
            None => 3,
            Some(n @ 1..=100) => n as usize,
            Some(n) => {
                return Err(err(
                    "connect_attempts",
                    format!("{n} is out of range (1 to 100)"),
                ));
            }
        };
        let ejection = self.ejection.clone().unwrap_or_default();
        let base_time = duration("ejection.base_time", ejection.base_time.as_deref(), "5s")?;
        let max_time = duration("ejection.max_time", ejection.max_time.as_deref(), "60s")?;
        if max_time < base_time {
            return Err(err(
                "ejection.max_time",
                "must not be shorter than ejection.base_time",
            ));
        }
        let connect_timeout = duration("connect_timeout", self.connect_timeout.as_deref(), "2s")?;
        if connect_timeout.is_zero() {
            return Err(err("connect_timeout", "must be longer than 0s"));
        }
        let idle_timeout = duration("idle_timeout", self.idle_timeout.as_deref(), "1h")?;
        if idle_timeout.is_zero() {
            return Err(err("idle_timeout", "must be longer than 0s"));
        }
        let log_format = match self.log_format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(err(
                    "log_format",
                    format!("unknown format {other:?} (expected text or json)"),
                ));
            }
        };
        let queue_timeout = duration("queue_timeout", self.queue_timeout.as_deref(), "10s")?;
        let h2 = self.h2.clone().unwrap_or_default().validate(
            connect_timeout,
            connect_attempts,
            queue_timeout,
        )?;
        let tls = self.tls.clone().unwrap_or_default().validate()?;
        Ok(Config {
            tls,
            h2,
            listener: ListenerConfig {
                addr: listen,
                max_connections,
            },
            mode,
            backends,
            balance,
            l4: L4Config {
                connect_timeout,
                connect_attempts,
                idle_timeout,
                queue_timeout,
            },
            ejection: EjectionConfig {
                base_time,
                max_time,
            },
            health,
            workers,
            admin,
            drain_timeout: duration("drain_timeout", self.drain_timeout.as_deref(), "30s")?,
            log_format,
        })
    }
}

fn ranged(
    key: &str,
    value: Option<u64>,
    default: u64,
    lo: u64,
    hi: u64,
) -> Result<u64, ConfigError> {
    match value.unwrap_or(default) {
        n if (lo..=hi).contains(&n) => Ok(n),
        n => Err(err(key, format!("{n} is out of range ({lo} to {hi})"))),
    }
}

impl RawH2 {
    fn validate(
        &self,
        connect_timeout: Duration,
        attempts: usize,
        queue_timeout: Duration,
    ) -> Result<H2Config, ConfigError> {
        // HTTP/2's own bounds: windows up to 2^31-1; at least the 64 KiB default.
        const MAX_WINDOW: u64 = (1 << 31) - 1;
        let u32_of = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
        Ok(H2Config {
            max_concurrent_streams: u32_of(ranged(
                "h2.max_concurrent_streams",
                self.max_concurrent_streams,
                1000,
                1,
                u64::from(u32::MAX),
            )?),
            max_header_list_size: u32_of(ranged(
                "h2.max_header_list_size",
                self.max_header_list_size,
                16 * 1024,
                1024,
                16 * 1024 * 1024,
            )?),
            max_calls: ranged(
                "h2.max_calls",
                self.max_calls,
                10_000,
                1,
                tokio::sync::Semaphore::MAX_PERMITS as u64,
            )? as usize,
            attempts,
            stream_window: u32_of(ranged(
                "h2.stream_window",
                self.stream_window,
                1024 * 1024,
                65_535,
                MAX_WINDOW,
            )?),
            connection_window: u32_of(ranged(
                "h2.connection_window",
                self.connection_window,
                16 * 1024 * 1024,
                65_535,
                MAX_WINDOW,
            )?),
            connect_timeout,
            queue_timeout: match &self.queue_timeout {
                Some(text) => duration("h2.queue_timeout", Some(text), "10s")?,
                None => queue_timeout,
            },
            max_calls_per_backend: match ranged(
                "h2.max_calls_per_backend",
                self.max_calls_per_backend,
                0,
                0,
                tokio::sync::Semaphore::MAX_PERMITS as u64,
            )? {
                0 => None,
                n => Some(n as usize),
            },
        })
    }
}

fn threshold(key: &str, value: Option<u64>, default: u32) -> Result<u32, ConfigError> {
    match value {
        None => Ok(default),
        Some(n @ 1..=100) => Ok(n as u32),
        Some(n) => Err(err(key, format!("{n} is out of range (1 to 100)"))),
    }
}

fn positive(key: &str, value: Option<&str>, default: &str) -> Result<Duration, ConfigError> {
    let d = duration(key, value, default)?;
    if d.is_zero() {
        return Err(err(key, "must be longer than 0s"));
    }
    Ok(d)
}

impl RawHealth {
    fn validate(&self) -> Result<HealthConfig, ConfigError> {
        let kind = match self.check.as_deref().unwrap_or("tcp") {
            "tcp" => CheckKind::Tcp,
            "grpc" => CheckKind::Grpc {
                service: self.service.clone().unwrap_or_default(),
            },
            other => {
                return Err(err(
                    "health.check",
                    format!("unknown check {other:?} (expected tcp or grpc)"),
                ));
            }
        };
        if self.service.is_some() && kind == CheckKind::Tcp {
            return Err(err(
                "health.service",
                "only the grpc check asks about a service; add --health grpc",
            ));
        }
        let interval = positive("health.interval", self.interval.as_deref(), "5s")?;
        let timeout = positive("health.timeout", self.timeout.as_deref(), "1s")?;
        Ok(HealthConfig {
            kind,
            interval,
            unhealthy_interval: positive(
                "health.unhealthy_interval",
                self.unhealthy_interval.as_deref(),
                "1s",
            )?,
            timeout,
            thresholds: Thresholds {
                healthy: threshold("health.healthy_threshold", self.healthy_threshold, 2)?,
                unhealthy: threshold("health.unhealthy_threshold", self.unhealthy_threshold, 3)?,
            },
        })
    }
}

impl RawWorkers {
    fn validate(&self, listen: SocketAddr) -> Result<WorkersConfig, ConfigError> {
        let count = match &self.count {
            None => {
                return Err(err(
                    "workers.count",
                    "how many workers? give --workers N or auto (with the command after --)",
                ));
            }
            Some(RawCount::Number(n)) => *n,
            Some(RawCount::Text(t)) if t.trim() == "auto" => auto_count(),
            Some(RawCount::Text(t)) => t.trim().parse::<u64>().map_err(|_| {
                err(
                    "workers.count",
                    format!("{t:?} is not a number of workers or \"auto\""),
                )
            })?,
        };
        let count = match count {
            n @ 1..=1024 => n as usize,
            n => {
                return Err(err(
                    "workers.count",
                    format!("{n} is out of range (1 to 1024)"),
                ));
            }
        };
        let command = self.command.clone().unwrap_or_default();
        if command.first().is_none_or(|p| p.trim().is_empty()) {
            return Err(err(
                "workers.command",
                "no worker command: give it after --, e.g. --workers 4 -- python server.py --port {port}",
            ));
        }
        let port_base = match self.port_base {
            Some(p) => u16::try_from(p)
                .map_err(|_| err("workers.port_base", format!("{p} is not a port (0-65535)")))?,
            None if listen.port() == 0 => {
                return Err(err(
                    "workers.port_base",
                    "the listen port is 0 (picked at start), so worker ports cannot follow it; give --worker-port-base P, or 0 for free ports",
                ));
            }
            None => listen.port().checked_add(1).ok_or_else(|| {
                err(
                    "workers.port_base",
                    "the listen port is 65535; give --worker-port-base P",
                )
            })?,
        };
        if port_base != 0 {
            // Each worker has a spare port for its replacement in a surge restart.
            let last = u32::from(port_base) + 2 * count as u32 - 1;
            if last > u32::from(u16::MAX) {
                return Err(err(
                    "workers.port_base",
                    format!(
                        "{count} workers take {} ports (one spare each for restarts); from port {port_base} they run past port 65535",
                        2 * count
                    ),
                ));
            }
            if (u32::from(port_base)..=last).contains(&u32::from(listen.port())) {
                return Err(err(
                    "workers.port_base",
                    format!(
                        "worker ports {port_base}-{last} (one spare each for restarts) include the listen port {}",
                        listen.port()
                    ),
                ));
            }
        }
        let output = match self.output.as_deref().unwrap_or("prefix") {
            "prefix" => WorkerOutput::Prefix,
            "inherit" => WorkerOutput::Inherit,
            other => {
                return Err(err(
                    "workers.output",
                    format!("unknown output {other:?} (expected prefix or inherit)"),
                ));
            }
        };
        let restart_backoff = positive(
            "workers.restart_backoff",
            self.restart_backoff.as_deref(),
            "250ms",
        )?;
        let restart_backoff_max = positive(
            "workers.restart_backoff_max",
            self.restart_backoff_max.as_deref(),
            "30s",
        )?;
        if restart_backoff_max < restart_backoff {
            return Err(err(
                "workers.restart_backoff_max",
                "must not be shorter than workers.restart_backoff",
            ));
        }
        Ok(WorkersConfig {
            count,
            command,
            port_base,
            env: self.env.clone().unwrap_or_default(),
            cwd: self.cwd.as_ref().map(std::path::PathBuf::from),
            output,
            stop_grace: duration("workers.stop_grace", self.stop_grace.as_deref(), "10s")?,
            restart_backoff,
            restart_backoff_max,
            crash_loop_restarts: threshold(
                "workers.crash_loop_restarts",
                self.crash_loop_restarts,
                5,
            )?,
            crash_loop_window: positive(
                "workers.crash_loop_window",
                self.crash_loop_window.as_deref(),
                "60s",
            )?,
            ready_timeout: positive(
                "workers.ready_timeout",
                self.ready_timeout.as_deref(),
                "60s",
            )?,
            hang_timeout: nonzero(duration(
                "workers.hang_timeout",
                self.hang_timeout.as_deref(),
                "30s",
            )?),
            max_calls: self.max_calls.filter(|n| *n > 0),
            max_calls_jitter: percent(
                "workers.max_calls_jitter",
                self.max_calls_jitter.as_deref(),
            )?,
            max_lifetime: nonzero(duration(
                "workers.max_lifetime",
                self.max_lifetime.as_deref(),
                "0s",
            )?),
            max_lifetime_jitter: percent(
                "workers.max_lifetime_jitter",
                self.max_lifetime_jitter.as_deref(),
            )?,
            max_memory: self
                .max_memory
                .as_deref()
                .map(|text| bytes("workers.max_memory", text))
                .transpose()?
                .filter(|n| *n > 0),
        })
    }
}

/// `None` for a zero duration (the "never" of the recycling keys).
fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

/// A percentage such as `10%` (the `%` may be left out), as written (10.0 for `10%`; kept
/// as a percentage so that `check` renders exactly what it read); 10% when unset.
fn percent(key: &str, value: Option<&str>) -> Result<f64, ConfigError> {
    let text = value.unwrap_or("10%").trim();
    match text.strip_suffix('%').unwrap_or(text).trim().parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(err(
            key,
            format!("{text:?} is not a percentage from 0% to 100%"),
        )),
    }
}

/// A size such as `512MiB`, `2GiB`, `300MB` or `1048576` (bytes).
fn bytes(key: &str, text: &str) -> Result<u64, ConfigError> {
    const UNITS: [(&str, u64); 9] = [
        ("KiB", 1 << 10),
        ("MiB", 1 << 20),
        ("GiB", 1 << 30),
        ("TiB", 1 << 40),
        ("KB", 1_000),
        ("MB", 1_000_000),
        ("GB", 1_000_000_000),
        ("TB", 1_000_000_000_000),
        ("B", 1),
    ];
    let text = text.trim();
    let bad = || {
        err(
            key,
            format!("{text:?} is not a size like 512MiB, 2GiB or 300MB"),
        )
    };
    let (number, unit) = UNITS
        .iter()
        .find_map(|(name, factor)| text.strip_suffix(name).map(|n| (n.trim(), *factor)))
        .unwrap_or((text, 1));
    let n: f64 = number.parse().map_err(|_| bad())?;
    if !n.is_finite() || n < 0.0 {
        return Err(bad());
    }
    let total = n * unit as f64;
    if total > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(total as u64)
}

impl Config {
    /// The effective configuration, as TOML that `--config` would accept.
    pub fn to_toml(&self) -> String {
        let human = |d: Duration| humantime::format_duration(d).to_string();
        let raw = RawConfig {
            listen: Some(self.listener.addr.to_string()),
            mode: Some(self.mode.to_string()),
            backends: (!self.backends.is_empty())
                .then(|| self.backends.iter().map(|b| b.name.clone()).collect()),
            balance: Some(self.balance.to_string()),
            admin: Some(
                self.admin
                    .map_or_else(|| "off".to_owned(), |a| a.to_string()),
            ),
            max_connections: Some(self.listener.max_connections as u64),
            drain_timeout: Some(human(self.drain_timeout)),
            connect_timeout: Some(human(self.l4.connect_timeout)),
            connect_attempts: Some(self.l4.connect_attempts as u64),
            idle_timeout: Some(human(self.l4.idle_timeout)),
            queue_timeout: Some(human(self.l4.queue_timeout)),
            log_format: Some(self.log_format.to_string()),
            ejection: Some(RawEjection {
                base_time: Some(human(self.ejection.base_time)),
                max_time: Some(human(self.ejection.max_time)),
            }),
            health: Some(RawHealth {
                check: Some(self.health.kind.to_string()),
                service: match &self.health.kind {
                    CheckKind::Grpc { service } => Some(service.clone()),
                    CheckKind::Tcp => None,
                },
                interval: Some(human(self.health.interval)),
                unhealthy_interval: Some(human(self.health.unhealthy_interval)),
                timeout: Some(human(self.health.timeout)),
                healthy_threshold: Some(u64::from(self.health.thresholds.healthy)),
                unhealthy_threshold: Some(u64::from(self.health.thresholds.unhealthy)),
            }),
            tls: self.tls.as_ref().map(|t| RawTls {
                cert: Some(t.cert.display().to_string()),
                key: Some(t.key.display().to_string()),
                client_ca: t.client_ca.as_ref().map(|p| p.display().to_string()),
                handshake_timeout: Some(human(t.handshake_timeout)),
                watch_interval: Some(human(t.watch_interval)),
            }),
            h2: Some(RawH2 {
                max_concurrent_streams: Some(u64::from(self.h2.max_concurrent_streams)),
                max_header_list_size: Some(u64::from(self.h2.max_header_list_size)),
                max_calls: Some(self.h2.max_calls as u64),
                stream_window: Some(u64::from(self.h2.stream_window)),
                connection_window: Some(u64::from(self.h2.connection_window)),
                queue_timeout: Some(human(self.h2.queue_timeout)),
                max_calls_per_backend: Some(self.h2.max_calls_per_backend.unwrap_or(0) as u64),
            }),
            workers: self.workers.as_ref().map(|w| RawWorkers {
                count: Some(RawCount::Number(w.count as u64)),
                command: Some(w.command.clone()),
                port_base: Some(u64::from(w.port_base)),
                env: Some(w.env.clone()),
                cwd: w.cwd.as_ref().map(|p| p.display().to_string()),
                output: Some(w.output.as_str().to_owned()),
                stop_grace: Some(human(w.stop_grace)),
                restart_backoff: Some(human(w.restart_backoff)),
                restart_backoff_max: Some(human(w.restart_backoff_max)),
                crash_loop_restarts: Some(u64::from(w.crash_loop_restarts)),
                crash_loop_window: Some(human(w.crash_loop_window)),
                ready_timeout: Some(human(w.ready_timeout)),
                hang_timeout: Some(w.hang_timeout.map_or_else(|| "0s".to_owned(), human)),
                max_calls: Some(w.max_calls.unwrap_or(0)),
                max_calls_jitter: Some(format!("{}%", w.max_calls_jitter)),
                max_lifetime: Some(w.max_lifetime.map_or_else(|| "0s".to_owned(), human)),
                max_lifetime_jitter: Some(format!("{}%", w.max_lifetime_jitter)),
                max_memory: Some(format!("{}B", w.max_memory.unwrap_or(0))),
            }),
        };
        toml::to_string(&raw)
            .unwrap_or_else(|e| format!("# cannot render the configuration: {e}\n"))
    }
}

fn duration(key: &str, value: Option<&str>, default: &str) -> Result<Duration, ConfigError> {
    let text = value.unwrap_or(default).trim();
    humantime::parse_duration(text).map_err(|e| {
        err(
            key,
            format!("{text:?} is not a duration like 500ms or 30s ({e})"),
        )
    })
}

/// Splits `HOST:PORT` (IPv6 hosts in brackets) into host and port text.
fn split_host_port<'a>(key: &str, s: &'a str) -> Result<(&'a str, &'a str), ConfigError> {
    let bad = |why: &str| err(key, format!("{s:?} is not HOST:PORT ({why})"));
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| bad("no closing bracket"))?;
        let port = after.strip_prefix(':').ok_or_else(|| bad("no port"))?;
        Ok((host, port))
    } else {
        let (host, port) = s.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        if host.contains(':') {
            return Err(bad("an IPv6 address goes in brackets, e.g. [::1]:50052"));
        }
        Ok((host, port))
    }
}

fn parse_port(key: &str, whole: &str, text: &str, zero_ok: bool) -> Result<u16, ConfigError> {
    match text.parse::<u16>() {
        Ok(0) if !zero_ok => Err(err(key, format!("{whole:?}: port 0 is not a backend port"))),
        Ok(p) => Ok(p),
        Err(_) => Err(err(
            key,
            format!("{whole:?}: {text:?} is not a port (1-65535)"),
        )),
    }
}

/// Resolves a host name (never an IP address) and port to addresses.
pub(crate) type Lookup = fn(&str, u16) -> std::io::Result<Vec<SocketAddr>>;

/// The system's resolver (`getaddrinfo`, which also reads the hosts file).
pub(crate) fn system_lookup(host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
    Ok((host, port).to_socket_addrs()?.collect())
}

fn resolve(
    key: &str,
    whole: &str,
    host: &str,
    port: u16,
    lookup: Lookup,
) -> Result<SocketAddr, ConfigError> {
    if host.is_empty() {
        return Err(err(key, format!("{whole:?} has no host")));
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    lookup(host, port)
        .map_err(|e| err(key, format!("cannot resolve {host:?}: {e}")))?
        .into_iter()
        .next()
        .ok_or_else(|| err(key, format!("{host:?} resolves to no address")))
}

/// One `HOST:PORT` address.
fn resolve_one(
    key: &str,
    s: &str,
    zero_ok: bool,
    lookup: Lookup,
) -> Result<SocketAddr, ConfigError> {
    let (host, port) = split_host_port(key, s.trim())?;
    let port = parse_port(key, s, port, zero_ok)?;
    resolve(key, s, host, port, lookup)
}

/// One `backends` entry: `HOST:PORT` or `HOST:P1-P2`.
fn parse_backend(key: &str, s: &str, lookup: Lookup) -> Result<Vec<BackendSpec>, ConfigError> {
    let s = s.trim();
    let (host, ports) = split_host_port(key, s)?;
    let (first, last) = match ports.split_once('-') {
        Some((a, b)) => (parse_port(key, s, a, false)?, parse_port(key, s, b, false)?),
        None => {
            let p = parse_port(key, s, ports, false)?;
            (p, p)
        }
    };
    if first > last {
        return Err(err(
            key,
            format!("{s:?}: the range {first}-{last} runs backwards"),
        ));
    }
    if u32::from(last - first) >= MAX_RANGE_PORTS {
        return Err(err(
            key,
            format!("{s:?}: a range of more than {MAX_RANGE_PORTS} ports is not allowed"),
        ));
    }
    let shown_host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    let base = resolve(key, s, host, first, lookup)?;
    Ok((first..=last)
        .map(|port| BackendSpec {
            name: format!("{shown_host}:{port}"),
            addr: SocketAddr::new(base.ip(), port),
            worker: None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let c =
            load(&opts(&["127.0.0.1:50052-50053"]), &env(&[])).unwrap_or_else(|e| panic!("{e}"));
        let text = c.to_toml();
        let f = toml_file(&text);
        let o = Opts {
            config: Some(f.path().to_path_buf()),
            ..Opts::default()
        };
        let again = load(&o, &env(&[])).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(again.to_toml(), text);
    }

    /// Every key `check` can print is documented in config/portshare.toml (set, or shown
    /// commented out with its default).
    #[test]
    fn the_shipped_example_config_documents_every_key() {
        let text = include_str!("../config/portshare.toml");
        let workers = Opts {
            workers: Some("2".into()),
            listen: Some("127.0.0.1:9000".into()),
            command: vec!["true".into()],
            health: Some("grpc".into()),
            ..Opts::default()
        };
        let c = load(&workers, &env(&[])).unwrap_or_else(|e| panic!("{e}"));
        let effective: toml::Table = c.to_toml().parse().unwrap_or_else(|e| panic!("{e}"));
        fn keys(table: &toml::Table, out: &mut Vec<String>) {
            for (k, v) in table {
                out.push(k.clone());
                if let toml::Value::Table(t) = v {
                    keys(t, out);
                }
            }
        }
        let mut all = Vec::new();
        keys(&effective, &mut all);
        all.push("backends".into());
        for key in all {
            let documented = text.lines().any(|l| {
                let l = l.trim_start_matches('#').trim();
                l.starts_with(&format!("{key} ="))
                    || l == format!("[{key}]")
                    || l.ends_with(&format!(".{key}]"))
            });
            assert!(
                documented,
                "config/portshare.toml does not document {key:?}"
            );
        }
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
    fn sizes_and_percentages_read_as_written() {
        assert_eq!(bytes("k", "512MiB"), Ok(512 << 20));
        assert_eq!(bytes("k", "2GiB"), Ok(2 << 30));
        assert_eq!(bytes("k", "300MB"), Ok(300_000_000));
        assert_eq!(bytes("k", "1.5 KiB"), Ok(1536));
        assert_eq!(bytes("k", "4096"), Ok(4096));
        let e = bytes("workers.max_memory", "lots").expect_err("not a size");
        assert_eq!(e.key, "workers.max_memory");
        assert!(bytes("k", "-1MiB").is_err());
        assert_eq!(percent("k", Some("25%")), Ok(25.0));
        assert_eq!(percent("k", Some("12.3%")), Ok(12.3));
        assert_eq!(percent("k", Some("0")), Ok(0.0));
        assert_eq!(percent("k", None), Ok(10.0));
        assert_eq!(
            percent("workers.max_calls_jitter", Some("150%")).map_err(|e| e.key),
            Err("workers.max_calls_jitter".to_owned())
        );
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
}
