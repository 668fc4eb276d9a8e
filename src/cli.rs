//! The command line, mirroring the contract in the README: every option here is also a
//! config-file key and a `PORTSHARE_*` variable, and overrides both.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::keys;

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
    /// `listen` (the text is the keys table's).
    #[arg(long, global = true, value_name = "ADDR", help = keys::help("listen"))]
    pub listen: Option<String>,
    /// `mode` (the text is the keys table's).
    #[arg(long, global = true, value_name = "l4|h2", help = keys::help("mode"))]
    pub mode: Option<String>,
    /// `backends` (the text is the keys table's).
    #[arg(long = "backend", global = true, value_name = "ADDR", help = keys::help("backends"))]
    pub backends: Vec<String>,
    /// `balance` (the text is the keys table's).
    #[arg(long, global = true, value_name = "least-conn|round-robin|p2c", help = keys::help("balance"))]
    pub balance: Option<String>,
    /// `admin` (the text is the keys table's).
    #[arg(long, global = true, value_name = "ADDR", help = keys::help("admin"))]
    pub admin: Option<String>,
    /// `max_connections` (the text is the keys table's).
    #[arg(long, global = true, value_name = "N", help = keys::help("max_connections"))]
    pub max_connections: Option<u64>,
    /// `drain_timeout` (the text is the keys table's).
    #[arg(long, global = true, value_name = "DURATION", help = keys::help("drain_timeout"))]
    pub drain_timeout: Option<String>,
    /// `connect_timeout` (the text is the keys table's).
    #[arg(long, global = true, value_name = "DURATION", help = keys::help("connect_timeout"))]
    pub connect_timeout: Option<String>,
    /// `connect_attempts` (the text is the keys table's).
    #[arg(long, global = true, value_name = "N", help = keys::help("connect_attempts"))]
    pub connect_attempts: Option<u64>,
    /// `idle_timeout` (the text is the keys table's).
    #[arg(long, global = true, value_name = "DURATION", help = keys::help("idle_timeout"))]
    pub idle_timeout: Option<String>,
    /// `queue_timeout` (the text is the keys table's).
    #[arg(long, global = true, value_name = "DURATION", help = keys::help("queue_timeout"))]
    pub queue_timeout: Option<String>,
    /// `h2.max_calls_per_backend` (the text is the keys table's).
    #[arg(long, global = true, value_name = "N", help = keys::help("h2.max_calls_per_backend"))]
    pub max_calls_per_backend: Option<u64>,
    /// `health.check` (the text is the keys table's).
    #[arg(long, global = true, value_name = "tcp|grpc", help = keys::help("health.check"))]
    pub health: Option<String>,
    /// `health.service` (the text is the keys table's).
    #[arg(long, global = true, value_name = "NAME", help = keys::help("health.service"))]
    pub health_service: Option<String>,
    /// `workers.count` (the text is the keys table's).
    #[arg(long, global = true, value_name = "N|auto", help = keys::help("workers.count"))]
    pub workers: Option<String>,
    /// `workers.port_base` (the text is the keys table's).
    #[arg(long, global = true, value_name = "P", help = keys::help("workers.port_base"))]
    pub worker_port_base: Option<u64>,
    /// `workers.socket_dir` (the text is the keys table's).
    #[arg(long, global = true, value_name = "DIR", help = keys::help("workers.socket_dir"))]
    pub worker_socket_dir: Option<String>,
    /// `workers.hang_timeout` (the text is the keys table's).
    #[arg(long, global = true, value_name = "DURATION", help = keys::help("workers.hang_timeout"))]
    pub worker_hang_timeout: Option<String>,
    /// `workers.max_calls` (the text is the keys table's).
    #[arg(long, global = true, value_name = "N", help = keys::help("workers.max_calls"))]
    pub worker_max_calls: Option<u64>,
    /// `workers.max_lifetime` (the text is the keys table's).
    #[arg(long, global = true, value_name = "DURATION", help = keys::help("workers.max_lifetime"))]
    pub worker_max_lifetime: Option<String>,
    /// `workers.max_memory` (the text is the keys table's).
    #[arg(long, global = true, value_name = "SIZE", help = keys::help("workers.max_memory"))]
    pub worker_max_memory: Option<String>,
    /// `workers.command` (the text is the keys table's).
    #[arg(last = true, global = true, value_name = "COMMAND", help = keys::help("workers.command"))]
    pub command: Vec<String>,
    /// `tls.cert` (the text is the keys table's).
    #[arg(long, global = true, value_name = "FILE", help = keys::help("tls.cert"))]
    pub tls_cert: Option<String>,
    /// `tls.key` (the text is the keys table's).
    #[arg(long, global = true, value_name = "FILE", help = keys::help("tls.key"))]
    pub tls_key: Option<String>,
    /// `tls.client_ca` (the text is the keys table's).
    #[arg(long, global = true, value_name = "FILE", help = keys::help("tls.client_ca"))]
    pub tls_client_ca: Option<String>,
    /// `log_format` (the text is the keys table's).
    #[arg(long, global = true, value_name = "text|json", help = keys::help("log_format"))]
    pub log_format: Option<String>,
    /// `access_log` (the text is the keys table's).
    #[arg(long, global = true, value_name = "off|stdout|stderr|PATH", help = keys::help("access_log"))]
    pub access_log: Option<String>,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// Each key's flag shows the keys table's text for it.
    #[test]
    fn flags_take_their_help_from_the_keys_table() {
        let command = Cli::command();
        for key in keys::KEYS {
            let Some(flag) = key.flag else { continue };
            let arg = match flag.split_whitespace().next() {
                Some("--") => command.get_arguments().find(|a| a.get_id() == "command"),
                Some(long) => command
                    .get_arguments()
                    .find(|a| a.get_long() == long.strip_prefix("--")),
                None => None,
            };
            let Some(arg) = arg else {
                panic!("{}: no flag {flag}", key.name);
            };
            let shown = arg.get_help().map(ToString::to_string);
            assert_eq!(shown, Some(keys::help(key.name)), "{flag}");
        }
    }
}
