//! Validation: [`RawConfig`] into the typed [`Config`], each component's part built from
//! its keys. A key not given takes its default from [`keys`](super::keys); what is checked
//! here is what no single value's type can say (ranges, "not zero", keys that must agree).
//! Every error names its key.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::addr::{Lookup, check_socket_path, parse_backend, resolve_one, system_lookup};
use super::keys::default_of;
use super::raw::{RawConfig, RawCount, RawH2, RawHealth, RawTls, RawWorkers};
use super::value::{Check, Human, Mode, Percent, Size, Word};
use super::{Config, ConfigError, err};
use crate::access_log;
use crate::backend::{BackendSpec, EjectionConfig, Thresholds};
use crate::balance::Balance;
use crate::h2::H2Config;
use crate::health::{CheckKind, HealthConfig};
use crate::l4::L4Config;
use crate::listener::ListenerConfig;
use crate::supervisor::WorkersConfig;
use crate::tls::TlsConfig;

/// The value given for `key`, else its default from the keys table.
fn given<T: Clone + DeserializeOwned>(key: &str, value: &Option<T>) -> Result<T, ConfigError> {
    match value {
        Some(v) => Ok(v.clone()),
        None => default_of(key).ok_or_else(|| err(key, "no value given and no default")),
    }
}

/// A duration key, given or its default.
fn duration(key: &str, value: &Option<Human>) -> Result<Duration, ConfigError> {
    given(key, value).map(|Human(d)| d)
}

/// A duration key that must not be zero.
fn positive(key: &str, value: &Option<Human>) -> Result<Duration, ConfigError> {
    let d = duration(key, value)?;
    if d.is_zero() {
        return Err(err(key, "must be longer than 0s"));
    }
    Ok(d)
}

/// A duration key where zero means "never".
fn unless_zero(key: &str, value: &Option<Human>) -> Result<Option<Duration>, ConfigError> {
    duration(key, value).map(|d| (!d.is_zero()).then_some(d))
}

/// A number key within `lo..=hi`.
fn ranged(key: &str, value: Option<u64>, lo: u64, hi: u64) -> Result<u64, ConfigError> {
    match given(key, &value)? {
        n if (lo..=hi).contains(&n) => Ok(n),
        n => Err(err(key, format!("{n} is out of range ({lo} to {hi})"))),
    }
}

/// A count of checks or exits in a row.
fn threshold(key: &str, value: Option<u64>) -> Result<u32, ConfigError> {
    ranged(key, value, 1, 100).map(|n| n as u32)
}

/// The most permits a tokio semaphore holds: the bound of every "in flight" limit.
const MAX_PERMITS: u64 = tokio::sync::Semaphore::MAX_PERMITS as u64;

impl RawConfig {
    /// Checks every key and turns the raw strings into typed values, resolving host names
    /// with the system's resolver.
    pub fn validate(&self) -> Result<Config, ConfigError> {
        self.validate_with(system_lookup)
    }

    /// [`RawConfig::validate`] with `lookup` resolving the host names that are not IP
    /// addresses.
    pub(crate) fn validate_with(&self, lookup: Lookup) -> Result<Config, ConfigError> {
        let listen = resolve_one("listen", &given("listen", &self.listen)?, true, lookup)?;
        let Word(mode) = given("mode", &self.mode)?;
        let mut backends: Vec<BackendSpec> = Vec::new();
        let mut seen = HashSet::new();
        for (i, entry) in self.backends.iter().flatten().enumerate() {
            let key = format!("backends[{i}]");
            for spec in parse_backend(&key, entry, lookup)? {
                if !seen.insert(spec.addr.clone()) {
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
        let mut workers = workers;
        if mode == Mode::Reuseport {
            reuseport_fits(workers.is_some(), self.tls.as_ref())?;
            if let Some(w) = workers.as_mut() {
                w.shared = Some(listen);
            }
        }
        let health = self.health.clone().unwrap_or_default().validate()?;
        let balance = match (self.balance, mode) {
            (Some(Word(b)), _) => b,
            // reuseport: the kernel picks; the balance applies to nothing.
            (None, Mode::L4 | Mode::Reuseport) => Balance::LeastConn,
            // Calls are short and many: p2c spreads them without herding on one "best".
            (None, Mode::H2) => Balance::P2c,
        };
        let admin = Some(given("admin", &self.admin)?)
            .filter(|s| !s.is_empty() && s != "off")
            .map(|s| resolve_one("admin", &s, true, lookup))
            .transpose()?;
        let max_connections = match given("max_connections", &self.max_connections)? {
            0 => return Err(err("max_connections", "must be at least 1")),
            n => usize::try_from(n)
                .ok()
                .filter(|n| *n <= tokio::sync::Semaphore::MAX_PERMITS)
                .ok_or_else(|| err("max_connections", format!("{n} is too large")))?,
        };
        let connect_attempts = ranged("connect_attempts", self.connect_attempts, 1, 100)? as usize;
        let ejection = self.ejection.clone().unwrap_or_default();
        let base_time = duration("ejection.base_time", &ejection.base_time)?;
        let max_time = duration("ejection.max_time", &ejection.max_time)?;
        if max_time < base_time {
            return Err(err(
                "ejection.max_time",
                "must not be shorter than ejection.base_time",
            ));
        }
        let connect_timeout = positive("connect_timeout", &self.connect_timeout)?;
        let idle_timeout = positive("idle_timeout", &self.idle_timeout)?;
        let Word(log_format) = given("log_format", &self.log_format)?;
        let access_log = match given("access_log", &self.access_log)?.trim() {
            "" => {
                return Err(err(
                    "access_log",
                    "is empty (off, stdout, stderr or a file path)",
                ));
            }
            "off" => None,
            "stdout" => Some(access_log::Target::Stdout),
            "stderr" => Some(access_log::Target::Stderr),
            path => Some(access_log::Target::File(path.into())),
        };
        if mode == Mode::Reuseport {
            reuseport_sees_no_calls(access_log.is_some(), workers.as_ref())?;
        }
        let queue_timeout = duration("queue_timeout", &self.queue_timeout)?;
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
            drain_timeout: duration("drain_timeout", &self.drain_timeout)?,
            log_format,
            access_log,
        })
    }
}

/// Whether `mode = "reuseport"` can run here: Linux, spawned workers (the workers bind the
/// shared address themselves, so they must be portshare's), and no TLS (portshare sees no
/// byte of the calls; the workers would terminate TLS themselves).
fn reuseport_fits(spawned: bool, tls: Option<&RawTls>) -> Result<(), ConfigError> {
    if !cfg!(target_os = "linux") {
        return Err(err(
            "mode",
            "reuseport needs Linux (the kernel spreads connections over the workers' SO_REUSEPORT sockets); l4 and h2 are the portable modes",
        ));
    }
    if !spawned {
        return Err(err(
            "mode",
            "reuseport needs spawned workers (--workers N -- COMMAND), which bind the listen address themselves; for backends that already run, l4 and h2 are the modes",
        ));
    }
    if tls.is_some_and(|t| t.cert.as_deref().is_some_and(|c| !c.is_empty())) {
        return Err(err(
            "mode",
            "reuseport leaves the connections to the workers, so portshare cannot terminate TLS ([tls]); let the workers do it, or use l4 or h2",
        ));
    }
    Ok(())
}

/// In reuseport mode portshare never sees a call or a client connection, so what counts
/// them would silently do nothing: refused instead, naming the key.
fn reuseport_sees_no_calls(
    access_log: bool,
    workers: Option<&WorkersConfig>,
) -> Result<(), ConfigError> {
    if access_log {
        return Err(err(
            "access_log",
            "reuseport mode: the calls go to the workers, not through portshare, so there is nothing to log; turn it off (the workers log their own calls)",
        ));
    }
    if workers.is_some_and(|w| w.max_calls.is_some()) {
        return Err(err(
            "workers.max_calls",
            "reuseport mode: portshare sees no calls to count; recycle by workers.max_lifetime or workers.max_memory instead",
        ));
    }
    Ok(())
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
            handshake_timeout: positive("tls.handshake_timeout", &self.handshake_timeout)?,
            watch_interval: positive("tls.watch_interval", &self.watch_interval)?,
        }))
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
                1,
                u64::from(u32::MAX),
            )?),
            max_header_list_size: u32_of(ranged(
                "h2.max_header_list_size",
                self.max_header_list_size,
                1024,
                16 * 1024 * 1024,
            )?),
            max_calls: ranged("h2.max_calls", self.max_calls, 1, MAX_PERMITS)? as usize,
            attempts,
            stream_window: u32_of(ranged(
                "h2.stream_window",
                self.stream_window,
                65_535,
                MAX_WINDOW,
            )?),
            connection_window: u32_of(ranged(
                "h2.connection_window",
                self.connection_window,
                65_535,
                MAX_WINDOW,
            )?),
            connect_timeout,
            queue_timeout: self.queue_timeout.map_or(queue_timeout, |Human(d)| d),
            max_calls_per_backend: match ranged(
                "h2.max_calls_per_backend",
                self.max_calls_per_backend,
                0,
                MAX_PERMITS,
            )? {
                0 => None,
                n => Some(n as usize),
            },
        })
    }
}

impl RawHealth {
    fn validate(&self) -> Result<HealthConfig, ConfigError> {
        let kind = match given("health.check", &self.check)? {
            Word(Check::Tcp) => CheckKind::Tcp,
            Word(Check::Grpc) => CheckKind::Grpc {
                service: self.service.clone().unwrap_or_default(),
            },
        };
        if self.service.is_some() && kind == CheckKind::Tcp {
            return Err(err(
                "health.service",
                "only the grpc check asks about a service; add --health grpc",
            ));
        }
        Ok(HealthConfig {
            kind,
            interval: positive("health.interval", &self.interval)?,
            unhealthy_interval: positive("health.unhealthy_interval", &self.unhealthy_interval)?,
            timeout: positive("health.timeout", &self.timeout)?,
            thresholds: Thresholds {
                healthy: threshold("health.healthy_threshold", self.healthy_threshold)?,
                unhealthy: threshold("health.unhealthy_threshold", self.unhealthy_threshold)?,
            },
        })
    }
}

/// One worker per CPU this process may use: `available_parallelism` honours the CPU
/// affinity mask and cgroup (v1 and v2) CPU quotas, so a container limited to 2 CPUs on a
/// 64-core host gets 2 workers; at least 1.
fn auto_count() -> u64 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u64)
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
        let socket_dir = self.socket_dir(&command, count)?;
        // Workers on sockets have no ports to plan.
        let port_base = match socket_dir {
            Some(_) if self.port_base.is_some() => {
                return Err(err(
                    "workers.port_base",
                    "workers on sockets (workers.socket_dir) get no ports: give one of the two",
                ));
            }
            Some(_) => 0,
            None => self.port_base(listen, count)?,
        };
        let restart_backoff = positive("workers.restart_backoff", &self.restart_backoff)?;
        let restart_backoff_max =
            positive("workers.restart_backoff_max", &self.restart_backoff_max)?;
        if restart_backoff_max < restart_backoff {
            return Err(err(
                "workers.restart_backoff_max",
                "must not be shorter than workers.restart_backoff",
            ));
        }
        let Word(output) = given("workers.output", &self.output)?;
        let Percent(max_calls_jitter) = given("workers.max_calls_jitter", &self.max_calls_jitter)?;
        let Percent(max_lifetime_jitter) =
            given("workers.max_lifetime_jitter", &self.max_lifetime_jitter)?;
        Ok(WorkersConfig {
            count,
            command,
            // Set for reuseport mode once the mode is known (see `validate_with`).
            shared: None,
            port_base,
            socket_dir,
            env: self.env.clone().unwrap_or_default(),
            cwd: self.cwd.as_ref().map(PathBuf::from),
            output,
            stop_grace: duration("workers.stop_grace", &self.stop_grace)?,
            restart_backoff,
            restart_backoff_max,
            crash_loop_restarts: threshold(
                "workers.crash_loop_restarts",
                self.crash_loop_restarts,
            )?,
            crash_loop_window: positive("workers.crash_loop_window", &self.crash_loop_window)?,
            ready_timeout: positive("workers.ready_timeout", &self.ready_timeout)?,
            hang_timeout: unless_zero("workers.hang_timeout", &self.hang_timeout)?,
            max_calls: Some(given("workers.max_calls", &self.max_calls)?).filter(|n| *n > 0),
            max_calls_jitter,
            max_lifetime: unless_zero("workers.max_lifetime", &self.max_lifetime)?,
            max_lifetime_jitter,
            max_memory: self.max_memory.map(|Size(n)| n).filter(|n| *n > 0),
        })
    }

    /// The socket directory, made absolute (workers may run elsewhere): only on Unix,
    /// with room in a socket address for the longest socket path, and with a command that
    /// asks for `{socket}` rather than `{port}` (or for neither, reading the environment).
    fn socket_dir(&self, command: &[String], count: usize) -> Result<Option<PathBuf>, ConfigError> {
        const KEY: &str = "workers.socket_dir";
        let Some(dir) = self.socket_dir.as_deref().map(str::trim) else {
            if command.iter().any(|a| a.contains("{socket}")) {
                return Err(err(
                    "workers.command",
                    "{socket} is given only to workers on sockets: add --worker-socket-dir DIR, or use {port}",
                ));
            }
            return Ok(None);
        };
        if !cfg!(unix) {
            return Err(err(
                KEY,
                "Unix domain sockets are not available on this platform; workers use TCP ports here",
            ));
        }
        if dir.is_empty() {
            return Err(err(KEY, "empty directory name"));
        }
        if command.iter().any(|a| a.contains("{port}")) {
            return Err(err(
                "workers.command",
                "workers on sockets get no port: use {socket} (or $PORTSHARE_SOCKET) instead of {port}",
            ));
        }
        let dir = std::path::absolute(dir)
            .map_err(|e| err(KEY, format!("cannot make {dir:?} absolute: {e}")))?;
        // The longest path a worker gets: its index, and a generation a long run can reach.
        let longest = crate::supervisor::socket_path(
            &dir,
            crate::backend::WorkerIndex(count.saturating_sub(1)),
            u64::from(u32::MAX),
        );
        check_socket_path(KEY, &longest)?;
        Ok(Some(dir))
    }

    /// The first worker port: given, or the one after the listen port; checked so that
    /// every worker and its spare fit below 65536 and clear of the listen port.
    fn port_base(&self, listen: SocketAddr, count: usize) -> Result<u16, ConfigError> {
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
        Ok(port_base)
    }
}
