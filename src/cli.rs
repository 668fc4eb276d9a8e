//! The command line, mirroring the contract in the README: every option here is also a
//! config-file key and a `PORTSHARE_*` variable, and overrides both.

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::config::{Flags, Given, keys};

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
    /// Given --admin on the command line, compare it with what that running portshare runs
    /// instead: what a reload would change, and what would need a restart.
    Check,
    /// Make a running portshare read its configuration file and environment again, via its
    /// admin endpoint (--admin): SIGHUP's reload, also on Windows (without the workers'
    /// rolling restart). Prints what changed; exit 1 if the configuration is invalid.
    Reload,
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

impl Flags for Opts {
    fn file(&self) -> Option<&Path> {
        self.config.as_deref()
    }

    fn given(&self) -> Vec<(&'static str, Given<'_>)> {
        Opts::given(self)
    }
}

/// A flag field's value, if it was given.
trait GivenFlag {
    fn given(&self) -> Option<Given<'_>>;
}

impl GivenFlag for Option<String> {
    fn given(&self) -> Option<Given<'_>> {
        self.as_deref().map(Given::Text)
    }
}

impl GivenFlag for Option<u64> {
    fn given(&self) -> Option<Given<'_>> {
        self.map(Given::Number)
    }
}

impl GivenFlag for Vec<String> {
    fn given(&self) -> Option<Given<'_>> {
        (!self.is_empty()).then_some(Given::List(self))
    }
}

/// Declares [`Opts`] from one line per key flag, `field: Type = "key"`: the field, its
/// flag (long name, placeholder and `--help` from the keys table's entry for the key),
/// and [`Opts::given`], which is how the layering learns the key a flag sets. A key's flag
/// is thus written once, in the keys table, and tied to its key once, here.
macro_rules! key_flags {
    ($( $(#[$attr:meta])* $field:ident: $ty:ty = $key:literal, )*) => {
        /// Options; each one overrides the `PORTSHARE_*` variable and the config-file key of
        /// the same name.
        #[derive(Debug, Clone, Default, Args)]
        pub struct Opts {
            /// TOML configuration file (see config/portshare.toml for every key).
            #[arg(long, global = true, value_name = "FILE")]
            pub config: Option<PathBuf>,
            $(
                $(#[$attr])*
                #[arg(
                    long = keys::long($key),
                    global = true,
                    value_name = keys::placeholder($key),
                    help = keys::help($key)
                )]
                pub $field: $ty,
            )*
        }

        impl Opts {
            /// The keys that have a flag, in the order of the fields.
            pub const KEYS: &'static [&'static str] = &[$($key),*];

            /// Each key a flag was given for, with the value given.
            pub fn given(&self) -> Vec<(&'static str, Given<'_>)> {
                let mut given = Vec::new();
                $(
                    if let Some(value) = self.$field.given() {
                        given.push(($key, value));
                    }
                )*
                given
            }
        }
    };
}

key_flags! {
    /// `listen`.
    listen: Option<String> = "listen",
    /// `mode`.
    mode: Option<String> = "mode",
    /// `backends`, one per `--backend`.
    backends: Vec<String> = "backends",
    /// `balance`.
    balance: Option<String> = "balance",
    /// `admin`.
    admin: Option<String> = "admin",
    /// `max_connections`.
    max_connections: Option<u64> = "max_connections",
    /// `drain_timeout`.
    drain_timeout: Option<String> = "drain_timeout",
    /// `connect_timeout`.
    connect_timeout: Option<String> = "connect_timeout",
    /// `connect_attempts`.
    connect_attempts: Option<u64> = "connect_attempts",
    /// `idle_timeout`.
    idle_timeout: Option<String> = "idle_timeout",
    /// `queue_timeout`.
    queue_timeout: Option<String> = "queue_timeout",
    /// `h2.max_calls_per_backend`.
    max_calls_per_backend: Option<u64> = "h2.max_calls_per_backend",
    /// `health.check`.
    health: Option<String> = "health.check",
    /// `health.service`.
    health_service: Option<String> = "health.service",
    /// `workers.count`: a number or `auto`, as text, read as the file's value is.
    workers: Option<String> = "workers.count",
    /// `workers.port_base`.
    worker_port_base: Option<u64> = "workers.port_base",
    /// `workers.socket_dir`.
    worker_socket_dir: Option<String> = "workers.socket_dir",
    /// `workers.hang_timeout`.
    worker_hang_timeout: Option<String> = "workers.hang_timeout",
    /// `workers.max_calls`.
    worker_max_calls: Option<u64> = "workers.max_calls",
    /// `workers.max_lifetime`.
    worker_max_lifetime: Option<String> = "workers.max_lifetime",
    /// `workers.max_memory`.
    worker_max_memory: Option<String> = "workers.max_memory",
    /// `workers.command`: everything after `--`.
    #[arg(last = true)]
    command: Vec<String> = "workers.command",
    /// `tls.cert`.
    tls_cert: Option<String> = "tls.cert",
    /// `tls.key`.
    tls_key: Option<String> = "tls.key",
    /// `tls.client_ca`.
    tls_client_ca: Option<String> = "tls.client_ca",
    /// `log_format`.
    log_format: Option<String> = "log_format",
    /// `access_log`.
    access_log: Option<String> = "access_log",
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use clap::CommandFactory;

    use super::*;

    /// Every key the keys table gives a flag is a field of `Opts`, once, and every field's
    /// key has a flag there (else clap would take it for a positional argument).
    #[test]
    fn the_flagged_keys_are_the_fields() {
        let flagged: BTreeSet<&str> = keys::KEYS
            .iter()
            .filter(|k| k.flag.is_some())
            .map(|k| k.name)
            .collect();
        let fields: BTreeSet<&str> = Opts::KEYS.iter().copied().collect();
        assert_eq!(fields.len(), Opts::KEYS.len(), "a key twice in key_flags!");
        assert_eq!(flagged, fields);
    }

    /// A flag reaches the layering under its key, with its value as given.
    #[test]
    fn a_flag_given_is_its_key() {
        let cli = Cli::try_parse_from([
            "portshare",
            "--drain-timeout",
            "5s",
            "--backend",
            "a:1",
            "--backend",
            "b:2",
            "--max-connections",
            "7",
            "--",
            "run",
            "{port}",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let backends = ["a:1".to_owned(), "b:2".to_owned()];
        let command = ["run".to_owned(), "{port}".to_owned()];
        assert_eq!(
            cli.opts.given(),
            [
                ("backends", Given::List(&backends)),
                ("max_connections", Given::Number(7)),
                ("drain_timeout", Given::Text("5s")),
                ("workers.command", Given::List(&command)),
            ]
        );
        assert_eq!(Opts::default().given(), []);
    }

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
