//! Reloading the configuration while serving (SIGHUP, `POST /config/reload`, `portshare
//! reload`): the file and the environment are read again and validated, then what may
//! change while running is applied and what may not (`listen`, `mode`, `admin`, the
//! worker count and command, ...) is reported as needing a restart and kept as it is. A
//! configuration that does not validate changes nothing.
//!
//! What changed is found by comparing the two configurations key by key, as `portshare
//! check` prints them, so a running instance's view (`GET /config`) and a candidate file
//! can be compared the same way (`portshare check --admin`).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use metrics::counter;
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::{Backend, BackendAddr, BackendSet, Health};
use crate::config::{Config, ConfigError};
use crate::h2::H2Proxy;
use crate::health::HealthConfig;
use crate::l4::{L4Proxy, SocketConnect};
use crate::listener::ConnectionLimit;
use crate::metrics as m;
use crate::supervisor::Supervisor;
use crate::tls::Tls;

/// Reads the configuration again, from the same file, environment and flags as at start.
pub type Loader = Box<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

/// When a changed key takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Applies {
    /// At once: for new connections and calls, and the checks' next round.
    Now,
    /// When each spawned worker next starts or is replaced.
    NextWorkerStart,
    /// Only when portshare is restarted; the running value is kept.
    Restart,
}

/// Keys (or whole sections) that only a restart can change.
const RESTART_KEYS: &[&str] = &[
    "listen",
    "mode",
    "admin",
    "log_format",
    "access_log",
    "tls",
    "workers",
    "workers.count",
    "workers.command",
    "workers.port_base",
    "workers.socket_dir",
    "workers.crash_loop_restarts",
    "workers.crash_loop_window",
];

/// When a change of `key` (a dotted name such as `health.interval`) takes effect.
pub fn applies(key: &str) -> Applies {
    if RESTART_KEYS.contains(&key) {
        Applies::Restart
    } else if key.starts_with("workers.") {
        Applies::NextWorkerStart
    } else {
        Applies::Now
    }
}

/// One key whose value differs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// The dotted key, or a section (`tls`, `workers`) turned on or off.
    pub key: String,
    /// The value before (`None`: not set).
    pub from: Option<String>,
    /// The value after.
    pub to: Option<String>,
    /// When it takes effect.
    pub applies: Applies,
}

/// What a reload changed, or a candidate would change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Every key that differs, in key order.
    pub changes: Vec<Change>,
}

impl Report {
    /// The keys that need a restart.
    pub fn needs_restart(&self) -> Vec<&str> {
        self.keys(Applies::Restart)
    }

    fn keys(&self, applies: Applies) -> Vec<&str> {
        self.changes
            .iter()
            .filter(|c| c.applies == applies)
            .map(|c| c.key.as_str())
            .collect()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.changes.is_empty() {
            return writeln!(f, "no change");
        }
        let none = || "(not set)".to_owned();
        for c in &self.changes {
            let when = match c.applies {
                Applies::Now => "applied",
                Applies::NextWorkerStart => "applies at each worker's next start",
                Applies::Restart => "needs a restart; the running value is kept",
            };
            writeln!(
                f,
                "{}: {} -> {} ({when})",
                c.key,
                c.from.clone().unwrap_or_else(none),
                c.to.clone().unwrap_or_else(none)
            )?;
        }
        Ok(())
    }
}

/// A configuration as flat `key = value` pairs, from what `portshare check` prints.
pub type Flat = BTreeMap<String, String>;

/// `config` flattened.
pub fn flatten(config: &Config) -> Flat {
    match toml::Table::try_from(config.to_raw()) {
        Ok(table) => flatten_table(&table),
        Err(_) => Flat::new(),
    }
}

/// A TOML configuration (as `GET /config` answers) flattened.
pub fn flatten_toml(text: &str) -> Result<Flat, toml::de::Error> {
    Ok(flatten_table(&text.parse::<toml::Table>()?))
}

fn flatten_table(table: &toml::Table) -> Flat {
    fn walk(prefix: &str, table: &toml::Table, out: &mut Flat) {
        for (k, v) in table {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                // The worker environment is one value: a variable's change is the table's.
                toml::Value::Table(t) if key != "workers.env" => walk(&key, t, out),
                v => {
                    out.insert(key, v.to_string());
                }
            }
        }
    }
    let mut out = Flat::new();
    walk("", table, &mut out);
    out
}

fn has_section(flat: &Flat, section: &str) -> bool {
    let prefix = format!("{section}.");
    flat.keys().any(|k| k.starts_with(&prefix))
}

/// Every key whose value differs between `old` and `new`. A section turned on or off
/// (`tls`, `workers`) is one change; spawned workers on or off also make `backends` a
/// restart's business.
pub fn diff(old: &Flat, new: &Flat) -> Report {
    let mut changes = Vec::new();
    let mut toggled = Vec::new();
    for section in ["tls", "workers"] {
        let (before, after) = (has_section(old, section), has_section(new, section));
        if before != after {
            let state = |on: bool| Some(if on { "on" } else { "off" }.to_owned());
            changes.push(Change {
                key: section.to_owned(),
                from: state(before),
                to: state(after),
                applies: Applies::Restart,
            });
            toggled.push(section);
        }
    }
    let workers_toggled = toggled.contains(&"workers");
    let mut keys: Vec<&String> = old.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    for key in keys {
        let section = key.split('.').next().unwrap_or(key);
        if key.contains('.') && toggled.contains(&section) {
            continue;
        }
        let (from, to) = (old.get(key), new.get(key));
        if from == to {
            continue;
        }
        let applies = if workers_toggled && key == "backends" {
            Applies::Restart
        } else {
            applies(key)
        };
        changes.push(Change {
            key: key.clone(),
            from: from.cloned(),
            to: to.cloned(),
            applies,
        });
    }
    changes.sort_by(|a, b| a.key.cmp(&b.key));
    Report { changes }
}

/// `new` with every part that needs a restart put back as `old` has it: what runs after a
/// reload.
fn keep_restart_only(old: &Config, mut new: Config) -> Config {
    new.listener.addr = old.listener.addr;
    new.mode = old.mode;
    new.admin = old.admin;
    new.log_format = old.log_format;
    new.access_log.clone_from(&old.access_log);
    if old.tls.is_some() != new.tls.is_some() {
        new.tls.clone_from(&old.tls);
    }
    match (&old.workers, &mut new.workers) {
        (Some(was), Some(now)) => {
            now.count = was.count;
            now.command.clone_from(&was.command);
            now.port_base = was.port_base;
            now.shared = was.shared;
            now.socket_dir.clone_from(&was.socket_dir);
            now.crash_loop_restarts = was.crash_loop_restarts;
            now.crash_loop_window = was.crash_loop_window;
        }
        (None, None) => {}
        _ => {
            new.workers.clone_from(&old.workers);
            new.backends.clone_from(&old.backends);
        }
    }
    new
}

/// The parts of a running portshare a reload reaches.
pub(crate) struct Live {
    /// What runs now.
    pub config: Config,
    pub load: Loader,
    pub backends: Arc<BackendSet>,
    pub l4: Option<Arc<L4Proxy<SocketConnect>>>,
    pub h2: Option<Arc<H2Proxy>>,
    pub health: watch::Sender<HealthConfig>,
    pub limit: Arc<ConnectionLimit>,
    pub tls: Option<Arc<Tls>>,
    /// Where the drains of removed backends run.
    pub tasks: TaskTracker,
    /// Ends those drains early when portshare stops.
    pub stop: CancellationToken,
}

impl Live {
    /// Reads the configuration again and applies it; on any error nothing changes, and the
    /// error names the key (or file) and the problem.
    pub fn reload(&mut self, workers: Option<&Supervisor>) -> Result<Report, String> {
        let outcome = self.try_reload(workers);
        let result = match &outcome {
            Ok(report) => {
                for c in &report.changes {
                    match c.applies {
                        Applies::Restart => {
                            tracing::warn!(key = %c.key, from = ?c.from, to = ?c.to,
                            "reload: this key needs a restart of portshare; the running value is kept")
                        }
                        Applies::NextWorkerStart => {
                            tracing::info!(key = %c.key, from = ?c.from, to = ?c.to,
                            "reload: takes effect at each worker's next start")
                        }
                        Applies::Now => {
                            tracing::info!(key = %c.key, from = ?c.from, to = ?c.to, "reload: applied")
                        }
                    }
                }
                tracing::info!(changes = report.changes.len(), "configuration reloaded");
                "ok"
            }
            Err(e) => {
                tracing::error!(error = %e, "reload failed; the running configuration is kept");
                "error"
            }
        };
        counter!(m::CONFIG_RELOADS, "result" => result).increment(1);
        outcome
    }

    fn try_reload(&mut self, workers: Option<&Supervisor>) -> Result<Report, String> {
        let loaded = (self.load)().map_err(|e| e.to_string())?;
        let report = diff(&flatten(&self.config), &flatten(&loaded));
        let next = keep_restart_only(&self.config, loaded);
        // The one step that can still fail goes first, so a failure changes nothing.
        if let (Some(tls), Some(config)) = (&self.tls, &next.tls) {
            tls.replace(config.clone()).map_err(|e| e.to_string())?;
        }
        self.backends.retune(next.ejection, next.health.thresholds);
        self.health.send_if_modified(|h| {
            let changed = *h != next.health;
            h.clone_from(&next.health);
            changed
        });
        if let Some(l4) = &self.l4 {
            l4.reconfigure(next.l4.clone(), next.balance);
        }
        if let Some(h2) = &self.h2 {
            h2.reconfigure(next.h2.clone(), next.balance);
        }
        self.limit.set(next.listener.max_connections, &self.tasks);
        if let (Some(w), Some(config)) = (workers, &next.workers) {
            w.update(config.clone());
        }
        if next.workers.is_none() {
            self.apply_backends(&next);
        }
        self.config = next;
        Ok(report)
    }

    /// Configured backends: new ones join (in rotation once a check passes), removed ones
    /// leave rotation, drain for up to the drain timeout, and are forgotten.
    fn apply_backends(&self, next: &Config) {
        let now = Instant::now();
        let snapshot = self.backends.snapshot();
        let wanted: Vec<&BackendAddr> = next.backends.iter().map(|b| &b.addr).collect();
        for spec in &next.backends {
            let present = snapshot.iter().find(|b| *b.addr() == spec.addr);
            match present {
                // Removed by an earlier reload and still draining: back into service.
                Some(b) if b.health() == Health::Draining => {
                    tracing::info!(backend = %b.name(), "reload: backend is back; it stays");
                    b.set_health(Health::Unknown, now);
                }
                Some(_) => {}
                None => {
                    let b = self.backends.join(spec.clone());
                    tracing::info!(backend = %b.name(), "reload: backend added; it joins once a check passes");
                }
            }
        }
        for b in snapshot.iter() {
            if wanted.contains(&b.addr()) || b.health() == Health::Draining {
                continue;
            }
            tracing::info!(backend = %b.name(), open = b.active(), "reload: backend removed; draining it");
            b.set_health(Health::Draining, now);
            self.tasks.spawn(drain_and_forget(
                Arc::clone(&self.backends),
                Arc::clone(b),
                next.drain_timeout,
                self.stop.clone(),
            ));
        }
    }
}

/// Waits until `backend` has nothing in flight (up to `grace`), then takes it out of the
/// set, unless a later reload brought it back meanwhile.
async fn drain_and_forget(
    set: Arc<BackendSet>,
    backend: Arc<Backend>,
    grace: Duration,
    stop: CancellationToken,
) {
    let idle = tokio::select! {
        idle = backend.idle_within(grace) => idle,
        () = stop.cancelled() => return,
    };
    if backend.health() != Health::Draining {
        return;
    }
    if !idle {
        tracing::warn!(backend = %backend.name(), open = backend.active(), ?grace,
            "removed backend still busy after the drain timeout; forgetting it anyway");
    }
    set.remove(&backend);
    tracing::info!(backend = %backend.name(), "removed backend drained and forgotten");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(pairs: &[(&str, &str)]) -> Flat {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn each_changed_key_is_told_when_it_applies() {
        let old = flat(&[
            ("listen", "\"[::]:50051\""),
            ("balance", "\"least-conn\""),
            ("health.interval", "\"5s\""),
            ("workers.count", "4"),
            ("workers.stop_grace", "\"10s\""),
        ]);
        let new = flat(&[
            ("listen", "\"[::]:50061\""),
            ("balance", "\"p2c\""),
            ("health.interval", "\"5s\""),
            ("workers.count", "4"),
            ("workers.stop_grace", "\"20s\""),
        ]);
        let report = diff(&old, &new);
        let got: Vec<(&str, Applies)> = report
            .changes
            .iter()
            .map(|c| (c.key.as_str(), c.applies))
            .collect();
        assert_eq!(
            got,
            [
                ("balance", Applies::Now),
                ("listen", Applies::Restart),
                ("workers.stop_grace", Applies::NextWorkerStart),
            ]
        );
        assert_eq!(report.needs_restart(), ["listen"]);
    }

    #[test]
    fn a_section_turned_on_is_one_change_that_needs_a_restart() {
        let old = flat(&[("backends", "[\"127.0.0.1:1\"]")]);
        let new = flat(&[
            ("backends", "[\"127.0.0.1:2\"]"),
            ("tls.cert", "\"c.pem\""),
            ("tls.key", "\"k.pem\""),
        ]);
        let report = diff(&old, &new);
        let keys: Vec<&str> = report.changes.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(keys, ["backends", "tls"]);
        assert_eq!(report.needs_restart(), ["tls"]);
    }

    #[test]
    fn no_change_says_so() {
        let same = flat(&[("listen", "\"[::]:50051\"")]);
        let report = diff(&same, &same);
        assert!(report.changes.is_empty());
        assert_eq!(report.to_string(), "no change\n");
    }

    #[test]
    fn every_key_of_the_table_is_known_here() {
        // A key that only a restart can change must be listed; the rest apply live.
        for key in crate::config::keys::KEYS {
            let _ = applies(key.name);
        }
        for key in RESTART_KEYS {
            let section = key.split('.').next().unwrap_or(key);
            assert!(
                crate::config::keys::KEYS
                    .iter()
                    .any(|k| k.name == *key || k.name.starts_with(&format!("{section}."))),
                "{key} is not a configuration key"
            );
        }
    }
}
