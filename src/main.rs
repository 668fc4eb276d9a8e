//! The `portshare` binary: flags → configuration → logging and metrics → [`portshare::run`].
//! Errors are one line on stderr; exit codes: 0 clean, 64 bad configuration or usage,
//! 1 run-time failure.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use portshare::cli::{Cli, Command};
use portshare::config::{self, Config, LogFormat};
use portshare::shutdown::{Shutdown, Signals};
use portshare::{Error, Listeners};
use tracing_subscriber::EnvFilter;

/// mimalloc instead of the system allocator: h2 mode allocates per call (streams, headers,
/// frames), and glibc's malloc/free were 8% of its CPU in profiles; with mimalloc h2 mode
/// used about 10% less CPU per call. Transparent huge pages are off (`no_thp`): with them a
/// fresh process held 8 MiB more and an idle h2 connection twice the memory.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// EX_USAGE from sysexits.h: the command was used incorrectly.
const EXIT_USAGE: u8 = 64;

/// A worker kept crashing (EX_SOFTWARE; the contract reserves 70 and up for this).
const EXIT_CRASH_LOOP: u8 = 70;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid usage");
            eprintln!(
                "portshare: {} (see portshare --help)",
                first.trim_start_matches("error: ")
            );
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let env = environment();
    if matches!(
        cli.command,
        Some(Command::Status | Command::Probe { .. } | Command::Restart | Command::Reload)
    ) {
        return ask_admin(&cli, &env);
    }
    let config = match config::load(&cli.opts, &env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("portshare: invalid configuration: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Some(Command::Check) = cli.command {
        // The TLS files are part of the configuration: check they load, too.
        if let Some(tls) = &config.tls
            && let Err(e) = portshare::tls::Tls::new(tls.clone())
        {
            eprintln!("portshare: invalid configuration: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
        if cli.opts.admin.is_some()
            && let Some(admin) = config.admin
        {
            return compare_with_running(&config, admin);
        }
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    init_logging(
        config.log_format,
        env.get("PORTSHARE_LOG").map(String::as_str),
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("portshare: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let opts = cli.opts.clone();
    let load: portshare::reload::Loader = Box::new(move || config::load(&opts, &environment()));
    match runtime.block_on(serve(config, load)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ Error::Tls(_)) => {
            eprintln!("portshare: invalid configuration: {e}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(e @ Error::CrashLoop(_)) => {
            eprintln!("portshare: {e}");
            ExitCode::from(EXIT_CRASH_LOOP)
        }
        Err(e) => {
            eprintln!("portshare: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The environment's variables that are valid Unicode (the `PORTSHARE_*` ones are read).
fn environment() -> HashMap<String, String> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect()
}

/// `portshare status`, `probe` and `restart`: they need only the admin address, not a
/// complete configuration.
fn ask_admin(cli: &Cli, env: &HashMap<String, String>) -> ExitCode {
    let admin = match config::admin_addr(&cli.opts, env) {
        Ok(Some(addr)) => addr,
        Ok(None) => {
            eprintln!(
                "portshare: this needs the admin address: give --admin ADDR (or admin in the config file)"
            );
            return ExitCode::from(EXIT_USAGE);
        }
        Err(e) => {
            eprintln!("portshare: invalid configuration: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let answer = match &cli.command {
        Some(Command::Probe { path }) => portshare::status::probe(admin, path),
        Some(Command::Restart) => portshare::status::restart(admin),
        Some(Command::Reload) => portshare::status::reload(admin),
        _ => portshare::status::fetch(admin),
    };
    match answer {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("portshare: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `portshare check --admin ADDR`: what reloading `candidate` into the portshare at `admin`
/// would change.
fn compare_with_running(candidate: &Config, admin: std::net::SocketAddr) -> ExitCode {
    let running = match portshare::status::running_config(admin) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("portshare: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut running = match portshare::reload::flatten_toml(&running) {
        Ok(flat) => flat,
        Err(e) => {
            eprintln!("portshare: the configuration {admin} reports does not parse: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut candidate = portshare::reload::flatten(candidate);
    // The admin address asked is the running one's, whatever it was configured as.
    running.remove("admin");
    candidate.remove("admin");
    let report = portshare::reload::diff(&running, &candidate);
    print!("the configuration is valid; against the portshare at {admin}, a reload:\n{report}");
    ExitCode::SUCCESS
}

async fn serve(config: Config, load: portshare::reload::Loader) -> Result<(), Error> {
    let prometheus = portshare::metrics::install()?;
    let signals = Signals::new().map_err(Error::Signals)?;
    let shutdown = Shutdown::new();
    let listeners = Listeners::bind(&config)?;
    let controls = portshare::control::Controls::new();
    tokio::spawn(signals.watch(shutdown.clone(), controls.sender()));
    portshare::run(
        config,
        listeners,
        shutdown,
        Some(prometheus),
        controls,
        load,
    )
    .await
}

/// Logs go to stderr: text for people (coloured only on a terminal) or JSON for collectors;
/// `PORTSHARE_LOG` is the filter (e.g. `debug`, `portshare=trace`), `info` by default.
fn init_logging(format: LogFormat, filter: Option<&str>) {
    let filter = filter.unwrap_or("info");
    let (filter, bad_filter) = match EnvFilter::try_new(filter) {
        Ok(f) => (f, None),
        Err(e) => (
            EnvFilter::new("info"),
            Some(format!(
                "PORTSHARE_LOG={filter:?} is not a log filter ({e}); using info"
            )),
        ),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    if let Some(msg) = bad_filter {
        tracing::warn!("{msg}");
    }
}
