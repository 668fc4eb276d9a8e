//! The command line, mirroring the contract in the README: every option here is also a
//! config-file key and a `PORTSHARE_*` variable, and overrides both.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// One listener that balances gRPC (HTTP/2) connections over worker processes.
#[derive(Debug, Parser)]
#[command(name = "portshare", version, about, long_about = None)]
pub struct Cli {
    /// Run a subcommand instead of the proxy.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Options shared by the proxy and its subcommands.
    #[command(flatten)]
    pub opts: Opts,
}

/// What to do instead of proxying.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the configuration and print the effective one (exit 0), or say what is wrong (exit 64).
    Check,
    /// Print the backends of a running portshare as a table, from its admin endpoint (--admin).
    Status,
    /// Replace a running portshare's spawned workers one at a time, via its admin endpoint
    /// (--admin): what SIGHUP does, also on Windows. Waits until it is over; exit 1 if a
    /// replacement failed.
    Restart,
    /// Exit 0 if a running portshare's admin endpoint (--admin) answers /readyz with 200,
    /// else 1: a container health check that needs no curl.
    Probe {
        /// The admin path to ask.
        #[arg(long, default_value = "/readyz")]
        path: String,
    },
}

/// Options; each one overrides the `PORTSHARE_*` variable and the config-file key of the same name.
#[derive(Debug, Clone, Default, Args)]
pub struct Opts {
    /// TOML configuration file (see config/portshare.toml for every key).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The public listener [default: [::]:50051].
    #[arg(long, global = true, value_name = "ADDR")]
    pub listen: Option<String>,
    /// l4: each client connection goes to one backend, bytes copied both ways; h2: HTTP/2
    /// terminated and every call balanced on its own [default: l4].
    #[arg(long, global = true, value_name = "l4|h2")]
    pub mode: Option<String>,
    /// A backend that already runs, HOST:PORT; HOST:P1-P2 adds a port range. Repeatable.
    #[arg(long = "backend", global = true, value_name = "ADDR")]
    pub backends: Vec<String>,
    /// How a backend is picked, per connection (l4) or per call (h2) [default: least-conn in
    /// l4, p2c in h2].
    #[arg(long, global = true, value_name = "least-conn|round-robin|p2c")]
    pub balance: Option<String>,
    /// Admin HTTP listener for /metrics, /healthz, /readyz and /backends [default: off].
    #[arg(long, global = true, value_name = "ADDR")]
    pub admin: Option<String>,
    /// Client connections held at once; more wait in the kernel's backlog [default: 10000].
    #[arg(long, global = true, value_name = "N")]
    pub max_connections: Option<u64>,
    /// How long open connections may finish after SIGTERM [default: 30s].
    #[arg(long, global = true, value_name = "DURATION")]
    pub drain_timeout: Option<String>,
    /// How long a connect to a backend may take before another is tried [default: 2s].
    #[arg(long, global = true, value_name = "DURATION")]
    pub connect_timeout: Option<String>,
    /// Backends tried for one client connection before it is given up [default: 3].
    #[arg(long, global = true, value_name = "N")]
    pub connect_attempts: Option<u64>,
    /// A proxied connection with no bytes either way for this long is closed [default: 1h].
    #[arg(long, global = true, value_name = "DURATION")]
    pub idle_timeout: Option<String>,
    /// How long a call (h2) or client connection (l4) may wait for a backend that can take
    /// it (none ready, e.g. while workers start or restart; all at their cap) [default: 10s].
    #[arg(long, global = true, value_name = "DURATION")]
    pub queue_timeout: Option<String>,
    /// h2: calls in flight one backend may have; more wait for a free one (0: no cap)
    /// [default: 0].
    #[arg(long, global = true, value_name = "N")]
    pub max_calls_per_backend: Option<u64>,
    /// Active health check of every backend [default: tcp].
    #[arg(long, global = true, value_name = "tcp|grpc")]
    pub health: Option<String>,
    /// The service name asked about by the grpc check [default: "", the whole server].
    #[arg(long, global = true, value_name = "NAME")]
    pub health_service: Option<String>,
    /// Spawn and supervise N workers running COMMAND (given after `--`); `auto`: one per
    /// CPU this process may use (cgroup CPU quotas honoured), at least 1.
    #[arg(long, global = true, value_name = "N|auto")]
    pub workers: Option<String>,
    /// Worker i listens on P+i and its replacement in a rolling restart on P+N+i (N workers
    /// take 2N ports); 0 picks free ports [default: listen port + 1].
    #[arg(long, global = true, value_name = "P")]
    pub worker_port_base: Option<u64>,
    /// A worker whose health check has failed without a pass this long is replaced (its
    /// replacement ready first), and the hung process killed; 0: never [default: 30s].
    #[arg(long, global = true, value_name = "DURATION")]
    pub worker_hang_timeout: Option<String>,
    /// Recycle a worker after this many calls (h2) or client connections (l4), plus up to
    /// [workers] max_calls_jitter (10%) more; 0: never [default: 0].
    #[arg(long, global = true, value_name = "N")]
    pub worker_max_calls: Option<u64>,
    /// Recycle a worker after it has run this long (e.g. 6h), plus up to 10% more; 0:
    /// never [default: 0].
    #[arg(long, global = true, value_name = "DURATION")]
    pub worker_max_lifetime: Option<String>,
    /// Recycle a worker whose process tree's resident memory stays above this (e.g.
    /// 512MiB) [default: off].
    #[arg(long, global = true, value_name = "SIZE")]
    pub worker_max_memory: Option<String>,
    /// The worker command and its arguments; `{port}` becomes the worker's port and
    /// `{index}` its number.
    #[arg(last = true, global = true, value_name = "COMMAND")]
    pub command: Vec<String>,
    /// Terminate TLS with this PEM certificate chain (with --tls-key).
    #[arg(long, global = true, value_name = "FILE")]
    pub tls_cert: Option<String>,
    /// The PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, global = true, value_name = "FILE")]
    pub tls_key: Option<String>,
    /// Require client certificates signed by these PEM CA certificates (mTLS).
    #[arg(long, global = true, value_name = "FILE")]
    pub tls_client_ca: Option<String>,
    /// Log lines as human-readable text or JSON objects [default: text].
    #[arg(long, global = true, value_name = "text|json")]
    pub log_format: Option<String>,
}
