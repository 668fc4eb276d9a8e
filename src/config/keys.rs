//! The one table of configuration keys: each key's name, flag, default and one line saying
//! what it is for. Validation takes its defaults from here, the flags' `--help` text is
//! made from it, and README.md's options table is rendered from it (`tests/docs.rs` checks
//! that the README and `config/portshare.toml` list the same keys and defaults).

use serde::de::{DeserializeOwned, IntoDeserializer, value::Error as ValueError};

/// What a key holds when it is not given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyDefault {
    /// This text, read as if it had been written (a TOML string in the file).
    Text(&'static str),
    /// This number (a TOML integer in the file).
    Number(u64),
    /// Nothing: the key is unset unless given, or worked out from other keys; the words
    /// say what then holds (markdown, for the README), "" when there is nothing to say.
    Unset(&'static str),
}

/// One configuration key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    /// The key as `PORTSHARE_*` and errors name it: `health.interval` is `interval` in the
    /// file's `[health]` table and `PORTSHARE_HEALTH__INTERVAL` in the environment.
    pub name: &'static str,
    /// The flag that sets it, with its value's placeholder, if there is one: the one place
    /// both are written (`--help`, the README and the command line's parser read them here).
    /// `-- COMMAND ...` is the positional command after `--`.
    pub flag: Option<&'static str>,
    /// Its default.
    pub default: KeyDefault,
    /// What it is for, in one line: the README's "meaning" and the flag's `--help`.
    pub doc: &'static str,
}

impl Key {
    /// The table (`[health]`) the key lives in, if not the top level, and its name there.
    pub fn split(&self) -> (Option<&'static str>, &'static str) {
        match self.name.split_once('.') {
            Some((table, name)) => (Some(table), name),
            None => (None, self.name),
        }
    }

    /// The flag's long name, `listen` for `--listen ADDR`; `None` for a key without a flag,
    /// and for the command after `--`, which is positional.
    pub fn long(&self) -> Option<&'static str> {
        self.flag?
            .split_whitespace()
            .next()?
            .strip_prefix("--")
            .filter(|long| !long.is_empty())
    }

    /// The placeholder of the flag's value, `ADDR` for `--listen ADDR`.
    pub fn placeholder(&self) -> Option<&'static str> {
        self.flag?.split_whitespace().nth(1)
    }

    /// The default as the README shows it.
    pub fn shown_default(&self) -> String {
        match self.default {
            KeyDefault::Text(t) => format!("`{t}`"),
            KeyDefault::Number(n) => n.to_string(),
            KeyDefault::Unset("") => "—".to_owned(),
            KeyDefault::Unset(words) => words.to_owned(),
        }
    }
}

/// Shorthand for the table below.
const fn key(
    name: &'static str,
    flag: Option<&'static str>,
    default: KeyDefault,
    doc: &'static str,
) -> Key {
    Key {
        name,
        flag,
        default,
        doc,
    }
}

use KeyDefault::{Number, Text, Unset};

/// Every key, in the order of `config/portshare.toml`.
pub const KEYS: &[Key] = &[
    key(
        "listen",
        Some("--listen ADDR"),
        Text("[::]:50051"),
        "The public listener ([::] also takes IPv4).",
    ),
    key(
        "mode",
        Some("--mode l4|h2|reuseport"),
        Text("l4"),
        "l4: each client connection goes to one backend, bytes copied both ways; h2: HTTP/2 terminated and every call balanced on its own; reuseport (Linux, spawned workers only): the workers share the listen address with SO_REUSEPORT, portshare supervises them and is not in the data path.",
    ),
    key(
        "backends",
        Some("--backend ADDR"),
        Unset(""),
        "A backend that already runs, HOST:PORT; HOST:P1-P2 adds a port range; unix:PATH a Unix socket (Linux, macOS), unix-abstract:NAME one in Linux's abstract namespace. Repeatable. Give either backends or workers.",
    ),
    key(
        "balance",
        Some("--balance least-conn|round-robin|p2c"),
        Unset("`least-conn` (l4), `p2c` (h2)"),
        "How a backend is picked, per connection (l4) or per call (h2); p2c: the lighter of two random ones.",
    ),
    key(
        "admin",
        Some("--admin ADDR"),
        Text("off"),
        "Admin HTTP listener for /metrics, /healthz, /readyz and /backends.",
    ),
    key(
        "max_connections",
        Some("--max-connections N"),
        Number(10_000),
        "Client connections held at once; more wait in the kernel's backlog.",
    ),
    key(
        "drain_timeout",
        Some("--drain-timeout D"),
        Text("30s"),
        "How long open connections may finish after SIGTERM.",
    ),
    key(
        "connect_timeout",
        Some("--connect-timeout D"),
        Text("2s"),
        "How long a connect to a backend may take before another is tried.",
    ),
    key(
        "connect_attempts",
        Some("--connect-attempts N"),
        Number(3),
        "Backends tried for one client connection (h2: one call) before it is given up.",
    ),
    key(
        "idle_timeout",
        Some("--idle-timeout D"),
        Text("1h"),
        "A proxied connection with no bytes either way for this long is closed.",
    ),
    key(
        "queue_timeout",
        Some("--queue-timeout D"),
        Text("10s"),
        "How long a call (h2) or client connection (l4) may wait for a backend that can take it (none ready, e.g. while workers start or restart; all at their cap); 0s fails at once.",
    ),
    key(
        "log_format",
        Some("--log-format text|json"),
        Text("text"),
        "Log lines as human-readable text or JSON objects.",
    ),
    key(
        "access_log",
        Some("--access-log off|stdout|stderr|PATH"),
        Text("off"),
        "One line per call (h2) or client connection (l4), in the log format; PATH is appended to. Never slows a call: lines that cannot be written in time are dropped and counted.",
    ),
    key(
        "ejection.base_time",
        None,
        Text("5s"),
        "How long a backend whose connect failed leaves rotation; doubled on each ejection in a row.",
    ),
    key(
        "ejection.max_time",
        None,
        Text("60s"),
        "The longest ejection.",
    ),
    key(
        "h2.max_concurrent_streams",
        None,
        Number(1000),
        "Streams one client connection may have open at once.",
    ),
    key(
        "h2.max_header_list_size",
        None,
        Number(16_384),
        "Largest header block accepted, in bytes.",
    ),
    key(
        "h2.max_calls",
        None,
        Number(10_000),
        "Calls in flight across the proxy, waiting ones included; more are refused with RESOURCE_EXHAUSTED.",
    ),
    key(
        "h2.max_calls_per_backend",
        Some("--max-calls-per-backend N"),
        Number(0),
        "h2: calls in flight one backend may have; more wait for a free one (0: no cap).",
    ),
    key(
        "h2.queue_timeout",
        None,
        Unset("`queue_timeout`"),
        "How long a call may wait for a backend in h2 mode.",
    ),
    key(
        "h2.stream_window",
        None,
        Number(1 << 20),
        "HTTP/2 flow-control window of one stream, in bytes.",
    ),
    key(
        "h2.connection_window",
        None,
        Number(16 << 20),
        "HTTP/2 flow-control window of one connection, in bytes.",
    ),
    key(
        "tls.cert",
        Some("--tls-cert FILE"),
        Unset("off"),
        "Terminate TLS with this PEM certificate chain (with --tls-key).",
    ),
    key(
        "tls.key",
        Some("--tls-key FILE"),
        Unset("off"),
        "The PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1).",
    ),
    key(
        "tls.client_ca",
        Some("--tls-client-ca FILE"),
        Unset("off"),
        "Require client certificates signed by these PEM CA certificates (mTLS).",
    ),
    key(
        "tls.handshake_timeout",
        None,
        Text("10s"),
        "A client that has not finished its TLS handshake by then is dropped.",
    ),
    key(
        "tls.watch_interval",
        None,
        Text("5s"),
        "How often the TLS files are checked for changes.",
    ),
    key(
        "health.check",
        Some("--health tcp|grpc"),
        Text("tcp"),
        "Active health check of every backend: a connect (TCP, or to its Unix socket), or grpc.health.v1.Health/Check answering SERVING.",
    ),
    key(
        "health.service",
        Some("--health-service NAME"),
        Unset("`\"\"`, the whole server"),
        "The service name asked about by the grpc check.",
    ),
    key(
        "health.interval",
        None,
        Text("5s"),
        "Time between checks of a ready backend.",
    ),
    key(
        "health.unhealthy_interval",
        None,
        Text("1s"),
        "Time between checks of a backend that is not ready.",
    ),
    key("health.timeout", None, Text("1s"), "One check's limit."),
    key(
        "health.healthy_threshold",
        None,
        Number(2),
        "Passes in a row that return an unhealthy backend to rotation.",
    ),
    key(
        "health.unhealthy_threshold",
        None,
        Number(3),
        "Failures in a row that take a ready backend out of rotation.",
    ),
    key(
        "workers.count",
        Some("--workers N|auto"),
        Unset(""),
        "Spawn and supervise N workers running COMMAND (given after --); auto: one per CPU this process may use (cgroup CPU quotas honoured), at least 1.",
    ),
    key(
        "workers.command",
        Some("-- COMMAND ARGS..."),
        Unset(""),
        "The worker command and its arguments; {port} becomes the worker's port (with socket_dir: {socket} its socket path) and {index} its number (reuseport mode: {shared}, the listen address every worker binds with SO_REUSEPORT).",
    ),
    key(
        "workers.port_base",
        Some("--worker-port-base P"),
        Unset("listen port + 1"),
        "Worker i listens on P+i and its replacement in a rolling restart on P+N+i (N workers take 2N ports); 0 picks free ports. Not with socket_dir (workers on sockets have no ports).",
    ),
    key(
        "workers.socket_dir",
        Some("--worker-socket-dir DIR"),
        Unset("off: TCP ports"),
        "Workers listen on Unix sockets in DIR instead of ports (Linux, macOS): {socket} and PORTSHARE_SOCKET give worker i DIR/worker-<i>-<generation>.sock. DIR is made (mode 0700) when missing and refused when others can write to it.",
    ),
    key(
        "workers.cwd",
        None,
        Unset("portshare's own"),
        "The workers' working directory.",
    ),
    key(
        "workers.output",
        None,
        Text("prefix"),
        "prefix: each output line is passed on as \"[worker N] line\"; inherit: shared as is.",
    ),
    key(
        "workers.stop_grace",
        None,
        Text("10s"),
        "How long a worker leaving rotation may finish its work before SIGTERM, and then exit before SIGKILL.",
    ),
    key(
        "workers.restart_backoff",
        None,
        Text("250ms"),
        "Delay before restarting a worker that exited; doubled (with jitter) on each exit in a row.",
    ),
    key(
        "workers.restart_backoff_max",
        None,
        Text("30s"),
        "The longest restart delay.",
    ),
    key(
        "workers.crash_loop_restarts",
        None,
        Number(5),
        "Exits within crash_loop_window that put a worker in a crash loop.",
    ),
    key(
        "workers.crash_loop_window",
        None,
        Text("60s"),
        "The window crash_loop_restarts counts in.",
    ),
    key(
        "workers.ready_timeout",
        None,
        Text("60s"),
        "How long a replacement in a rolling restart may take to be ready.",
    ),
    key(
        "workers.hang_timeout",
        Some("--worker-hang-timeout D"),
        Text("30s"),
        "A worker whose health check has failed without a pass this long is replaced (its replacement ready first), and the hung process killed; 0s: never.",
    ),
    key(
        "workers.max_calls",
        Some("--worker-max-calls N"),
        Number(0),
        "Recycle a worker after this many calls (h2) or client connections (l4), plus up to max_calls_jitter more; 0: never.",
    ),
    key(
        "workers.max_calls_jitter",
        None,
        Text("10%"),
        "The most that is added to max_calls, drawn per process.",
    ),
    key(
        "workers.max_lifetime",
        Some("--worker-max-lifetime D"),
        Text("0s"),
        "Recycle a worker after it has run this long (e.g. 6h), plus up to max_lifetime_jitter more; 0s: never.",
    ),
    key(
        "workers.max_lifetime_jitter",
        None,
        Text("10%"),
        "The most that is added to max_lifetime, drawn per process.",
    ),
    key(
        "workers.max_memory",
        Some("--worker-max-memory SIZE"),
        Unset("off"),
        "Recycle a worker whose process tree's resident memory stays above this (e.g. 512MiB).",
    ),
    key(
        "workers.env",
        None,
        Unset(""),
        "Extra environment for every worker (a table of names and values).",
    ),
];

/// The entry of `name`, if it is a key.
pub fn find(name: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.name == name)
}

/// The long name of key `name`'s flag (see [`Key::long`]), for the command line's parser.
pub fn long(name: &str) -> Option<&'static str> {
    find(name)?.long()
}

/// The placeholder of key `name`'s flag value (see [`Key::placeholder`]).
pub fn placeholder(name: &str) -> Option<&'static str> {
    find(name)?.placeholder()
}

/// The `--help` text of the flag of key `name`: what it is for, and its default.
pub fn help(name: &str) -> String {
    let Some(key) = find(name) else {
        return String::new();
    };
    let default = match key.default {
        KeyDefault::Text(t) => t.to_owned(),
        KeyDefault::Number(n) => n.to_string(),
        KeyDefault::Unset(words) => words.replace('`', ""),
    };
    // As clap writes a doc comment: no full stop at the end.
    let doc = key.doc.trim_end_matches('.');
    if default.is_empty() {
        doc.to_owned()
    } else {
        format!("{doc} [default: {default}]")
    }
}

/// The default of key `name`, read as `T` by the same parser as a value given for it;
/// `None` when the key has none (or is no key, or its default does not read as `T`:
/// the table's tests rule both out).
pub fn default_of<T: DeserializeOwned>(name: &str) -> Option<T> {
    match find(name)?.default {
        KeyDefault::Text(t) => {
            T::deserialize(IntoDeserializer::<ValueError>::into_deserializer(t)).ok()
        }
        KeyDefault::Number(n) => {
            T::deserialize(IntoDeserializer::<ValueError>::into_deserializer(n)).ok()
        }
        KeyDefault::Unset(_) => None,
    }
}

/// README.md's options table: one row per key, in the table's order.
pub fn markdown_table() -> String {
    let cell = |s: &str| s.replace('|', "\\|");
    let mut out = String::from("| flag | config key | meaning | default |\n|---|---|---|---|\n");
    out.push_str(
        "| `--config FILE` | — | TOML file; every key is documented in [`config/portshare.toml`](config/portshare.toml) | none |\n",
    );
    for key in KEYS {
        let flag = key
            .flag
            .map_or_else(|| "—".to_owned(), |f| format!("`{}`", cell(f)));
        let name = match key.split() {
            (Some(table), name) => format!("`[{table}] {name}`"),
            (None, name) => format!("`{name}`"),
        };
        out.push_str(&format!(
            "| {flag} | {name} | {} | {} |\n",
            cell(key.doc),
            cell(&key.shown_default())
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_help_shows_the_default() {
        for (i, key) in KEYS.iter().enumerate() {
            assert!(
                KEYS[..i].iter().all(|k| k.name != key.name),
                "{} twice",
                key.name
            );
        }
        assert_eq!(
            help("drain_timeout"),
            "How long open connections may finish after SIGTERM [default: 30s]"
        );
        assert_eq!(default_of::<u64>("connect_attempts"), Some(3));
        assert_eq!(
            long("h2.max_calls_per_backend"),
            Some("max-calls-per-backend")
        );
        assert_eq!(placeholder("listen"), Some("ADDR"));
        assert_eq!(long("workers.command"), None);
        assert_eq!(placeholder("workers.command"), Some("COMMAND"));
        assert_eq!(long("health.interval"), None);
        assert_eq!(default_of::<String>("balance"), None);
    }
}
