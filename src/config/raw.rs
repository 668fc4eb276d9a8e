//! The configuration as written, before validation: the serde [`RawConfig`], every key
//! optional and unknown keys refused, assembled by the `config` crate from the TOML file <
//! the `PORTSHARE_*` environment < the flags (the defaults come in at validation, from
//! [`keys`](super::keys)). Values are read by their types in [`value`](super::value), and
//! the `config` crate's errors are turned into one line that names the key.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use config::{Environment, File, FileFormat};
use serde::{Deserialize, Serialize};

use super::value::{Check, Human, LogFormat, Mode, Percent, Size, Word};
use super::{ConfigError, err};
use crate::balance::Balance;
use crate::supervisor::WorkerOutput;

/// Environment variables with the `PORTSHARE_` prefix that are not config keys.
const NOT_CONFIG_KEYS: [&str; 4] = [
    "PORTSHARE_LOG",
    "PORTSHARE_PORT",
    "PORTSHARE_WORKER_INDEX",
    "PORTSHARE_SHARED_ADDR",
];

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

/// The configuration as written: every key optional, unknown keys rejected. The fields are
/// the keys of [`KEYS`](super::keys::KEYS), which says what each is for.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// The public listener, `HOST:PORT`.
    pub listen: Option<String>,
    /// l4, h2 or reuseport.
    pub mode: Option<Word<Mode>>,
    /// Workers that already run: `HOST:PORT` or `HOST:P1-P2`.
    pub backends: Option<Vec<String>>,
    /// How a backend is picked.
    pub balance: Option<Word<Balance>>,
    /// The admin listener, or `off`.
    pub admin: Option<String>,
    /// Client connections held at once.
    pub max_connections: Option<u64>,
    /// How long open work may finish after a shutdown signal.
    pub drain_timeout: Option<Human>,
    /// One connect's limit.
    pub connect_timeout: Option<Human>,
    /// Backends tried for one connection or call.
    pub connect_attempts: Option<u64>,
    /// A connection with no bytes moving this long is closed.
    pub idle_timeout: Option<Human>,
    /// How long a connection or call may wait for a backend.
    pub queue_timeout: Option<Human>,
    /// text or json.
    pub log_format: Option<Word<LogFormat>>,
    /// off, stdout, stderr or a file path.
    pub access_log: Option<String>,
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
    pub handshake_timeout: Option<Human>,
    /// How often the files are checked for changes.
    pub watch_interval: Option<Human>,
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
    pub queue_timeout: Option<Human>,
    /// Calls in flight one backend may have; 0 = no cap.
    pub max_calls_per_backend: Option<u64>,
}

/// `[health]` as written.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    /// `tcp` or `grpc`.
    pub check: Option<Word<Check>>,
    /// The gRPC service name asked about.
    pub service: Option<String>,
    /// Time between checks of a ready backend.
    pub interval: Option<Human>,
    /// Time between checks of a backend that is not ready.
    pub unhealthy_interval: Option<Human>,
    /// One check's limit.
    pub timeout: Option<Human>,
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
    /// Unix sockets in this directory instead of ports.
    pub socket_dir: Option<String>,
    /// Extra environment.
    pub env: Option<BTreeMap<String, String>>,
    /// Working directory.
    pub cwd: Option<String>,
    /// `prefix` or `inherit`.
    pub output: Option<Word<WorkerOutput>>,
    /// SIGTERM-to-SIGKILL grace.
    pub stop_grace: Option<Human>,
    /// First restart delay.
    pub restart_backoff: Option<Human>,
    /// Longest restart delay.
    pub restart_backoff_max: Option<Human>,
    /// Exits within the window that make a crash loop.
    pub crash_loop_restarts: Option<u64>,
    /// The crash-loop window.
    pub crash_loop_window: Option<Human>,
    /// Rolling restart: how long a restarted worker may take to be ready.
    pub ready_timeout: Option<Human>,
    /// A worker failing its checks without a pass this long is replaced; 0 = never.
    pub hang_timeout: Option<Human>,
    /// Calls (h2) or connections (l4) after which a worker is recycled; 0 = never.
    pub max_calls: Option<u64>,
    /// Random extra on `max_calls`, as a percentage ("10%").
    pub max_calls_jitter: Option<Percent>,
    /// Age after which a worker is recycled; 0 = never.
    pub max_lifetime: Option<Human>,
    /// Random extra on `max_lifetime`, as a percentage ("10%").
    pub max_lifetime_jitter: Option<Percent>,
    /// Resident memory of a worker's process tree above which it is recycled ("512MiB").
    pub max_memory: Option<Size>,
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

/// `[ejection]` as written.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawEjection {
    /// The first ejection's length.
    pub base_time: Option<Human>,
    /// The longest ejection.
    pub max_time: Option<Human>,
}

/// A key's value as its flag gave it, for the layering to put over the file and the
/// environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Given<'a> {
    /// Text, read by the key's own parser (`30s`, `h2`, `auto`).
    Text(&'a str),
    /// A number clap has already read.
    Number(u64),
    /// A list (`--backend` repeated, the command after `--`).
    List(&'a [String]),
}

/// What the command line gave: the file to read, and each key a flag set (the command
/// line's own module implements it; the layering needs nothing else of it).
pub trait Flags {
    /// `--config`.
    fn file(&self) -> Option<&Path>;
    /// Each key a flag was given for, with the value given.
    fn given(&self) -> Vec<(&'static str, Given<'_>)>;
}

/// The layered, not yet validated configuration.
pub fn raw(opts: &impl Flags, env: &HashMap<String, String>) -> Result<RawConfig, ConfigError> {
    let mut builder = config::Config::builder();
    if let Some(path) = opts.file() {
        builder = builder.add_source(file_source(path)?);
    }
    layer(builder, opts, env)
}

/// [`raw`] with the file's TOML given as text instead of a `--config` path (for the fuzz
/// entry points).
#[cfg(any(test, fuzzing))]
pub(crate) fn raw_from_toml(
    toml: &str,
    opts: &impl Flags,
    env: &HashMap<String, String>,
) -> Result<RawConfig, ConfigError> {
    let builder = config::Config::builder().add_source(File::from_str(toml, FileFormat::Toml));
    layer(builder, opts, env)
}

/// Adds the environment and the flags over whatever `builder` holds, and deserializes.
fn layer(
    mut builder: config::builder::ConfigBuilder<config::builder::DefaultState>,
    opts: &impl Flags,
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
    // The flags: each names its key (cli's `key_flags!`), and its value is read by the
    // key's own parser like the file's and the environment's.
    for (key, value) in opts.given() {
        builder = match value {
            Given::Text(text) => builder.set_override(key, text),
            Given::Number(n) => builder.set_override(key, n),
            Given::List(items) => builder.set_override(key, items.to_vec()),
        }
        .map_err(|e| err(key, e.to_string()))?;
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
