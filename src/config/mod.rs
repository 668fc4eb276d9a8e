//! Configuration in two layers: a serde [`RawConfig`] assembled by the `config` crate from
//! the TOML file < `PORTSHARE_*` environment < flags, then validated into the typed
//! [`Config`], with the defaults of the keys table under all three. Every error names the
//! key it is about.
//!
//! - [`keys`]: the one table of keys: name, flag, default, what it is for.
//! - [`value`]: the value types (durations, sizes, percentages, words like `l4`), read
//!   and written by serde.
//! - [`raw`]: [`RawConfig`] and the layering of file, environment and flags.
//! - `validate`: [`RawConfig`] into [`Config`], defaults from [`keys`].
//! - `addr`: `HOST:PORT`, port ranges and name resolution.
//! - this file: the error type, [`Config`], and its rendering as `portshare check` prints it.

mod addr;
pub mod keys;
pub mod raw;
mod validate;
pub mod value;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::access_log;
use crate::backend::{BackendSpec, EjectionConfig};
use crate::balance::Balance;
use crate::h2::H2Config;
use crate::health::{CheckKind, HealthConfig};
use crate::l4::L4Config;
use crate::listener::ListenerConfig;
use crate::supervisor::WorkersConfig;
use crate::tls::TlsConfig;

use addr::resolve_one;
pub(crate) use addr::system_lookup;
#[cfg(any(test, fuzzing))]
pub(crate) use raw::raw_from_toml;
pub use raw::{Flags, Given, RawConfig, raw};
use raw::{RawCount, RawEjection, RawH2, RawHealth, RawTls, RawWorkers};
use value::{Check, Human, Percent, Size, Word};
pub use value::{LogFormat, Mode};

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
    /// Where the access log goes, if anywhere.
    pub access_log: Option<access_log::Target>,
}

/// Assembles and validates the configuration from the file named in `opts`, the
/// `PORTSHARE_*` entries of `env`, and the flags in `opts`.
pub fn load(opts: &impl Flags, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
    raw(opts, env)?.validate()
}

/// Only the admin address (for `portshare status`, which needs nothing else).
pub fn admin_addr(
    opts: &impl Flags,
    env: &HashMap<String, String>,
) -> Result<Option<SocketAddr>, ConfigError> {
    raw(opts, env)?
        .admin
        .as_deref()
        .filter(|s| !s.is_empty() && *s != "off")
        .map(|s| resolve_one("admin", s, false, system_lookup))
        .transpose()
}

impl Config {
    /// The effective configuration as the raw one that reads back to it: every key set.
    pub fn to_raw(&self) -> RawConfig {
        let human = |d: Duration| Some(Human(d));
        RawConfig {
            listen: Some(self.listener.addr.to_string()),
            mode: Some(Word(self.mode)),
            backends: (!self.backends.is_empty())
                .then(|| self.backends.iter().map(|b| b.name.clone()).collect()),
            balance: Some(Word(self.balance)),
            admin: Some(
                self.admin
                    .map_or_else(|| "off".to_owned(), |a| a.to_string()),
            ),
            max_connections: Some(self.listener.max_connections as u64),
            drain_timeout: human(self.drain_timeout),
            connect_timeout: human(self.l4.connect_timeout),
            connect_attempts: Some(self.l4.connect_attempts as u64),
            idle_timeout: human(self.l4.idle_timeout),
            queue_timeout: human(self.l4.queue_timeout),
            log_format: Some(Word(self.log_format)),
            access_log: Some(match &self.access_log {
                None => "off".to_owned(),
                Some(access_log::Target::Stdout) => "stdout".to_owned(),
                Some(access_log::Target::Stderr) => "stderr".to_owned(),
                Some(access_log::Target::File(path)) => path.display().to_string(),
            }),
            ejection: Some(RawEjection {
                base_time: human(self.ejection.base_time),
                max_time: human(self.ejection.max_time),
            }),
            health: Some(RawHealth {
                check: Some(Word(match self.health.kind {
                    CheckKind::Tcp => Check::Tcp,
                    CheckKind::Grpc { .. } => Check::Grpc,
                })),
                service: match &self.health.kind {
                    CheckKind::Grpc { service } => Some(service.clone()),
                    CheckKind::Tcp => None,
                },
                interval: human(self.health.interval),
                unhealthy_interval: human(self.health.unhealthy_interval),
                timeout: human(self.health.timeout),
                healthy_threshold: Some(u64::from(self.health.thresholds.healthy)),
                unhealthy_threshold: Some(u64::from(self.health.thresholds.unhealthy)),
            }),
            tls: self.tls.as_ref().map(|t| RawTls {
                cert: Some(t.cert.display().to_string()),
                key: Some(t.key.display().to_string()),
                client_ca: t.client_ca.as_ref().map(|p| p.display().to_string()),
                handshake_timeout: human(t.handshake_timeout),
                watch_interval: human(t.watch_interval),
            }),
            h2: Some(RawH2 {
                max_concurrent_streams: Some(u64::from(self.h2.max_concurrent_streams)),
                max_header_list_size: Some(u64::from(self.h2.max_header_list_size)),
                max_calls: Some(self.h2.max_calls as u64),
                stream_window: Some(u64::from(self.h2.stream_window)),
                connection_window: Some(u64::from(self.h2.connection_window)),
                queue_timeout: human(self.h2.queue_timeout),
                max_calls_per_backend: Some(self.h2.max_calls_per_backend.unwrap_or(0) as u64),
            }),
            workers: self.workers.as_ref().map(|w| RawWorkers {
                count: Some(RawCount::Number(w.count as u64)),
                command: Some(w.command.clone()),
                // Workers on sockets have no ports (and the two keys exclude each other).
                port_base: w.socket_dir.is_none().then_some(u64::from(w.port_base)),
                socket_dir: w.socket_dir.as_ref().map(|p| p.display().to_string()),
                env: Some(w.env.clone()),
                cwd: w.cwd.as_ref().map(|p| p.display().to_string()),
                output: Some(Word(w.output)),
                stop_grace: human(w.stop_grace),
                restart_backoff: human(w.restart_backoff),
                restart_backoff_max: human(w.restart_backoff_max),
                crash_loop_restarts: Some(u64::from(w.crash_loop_restarts)),
                crash_loop_window: human(w.crash_loop_window),
                ready_timeout: human(w.ready_timeout),
                hang_timeout: human(w.hang_timeout.unwrap_or_default()),
                max_calls: Some(w.max_calls.unwrap_or(0)),
                max_calls_jitter: Some(Percent(w.max_calls_jitter)),
                max_lifetime: human(w.max_lifetime.unwrap_or_default()),
                max_lifetime_jitter: Some(Percent(w.max_lifetime_jitter)),
                max_memory: Some(Size(w.max_memory.unwrap_or(0))),
            }),
        }
    }

    /// The effective configuration, as TOML that `--config` would accept: what
    /// `portshare check` prints.
    pub fn to_toml(&self) -> String {
        toml::to_string(&self.to_raw())
            .unwrap_or_else(|e| format!("# cannot render the configuration: {e}\n"))
    }
}

#[cfg(test)]
mod tests;
