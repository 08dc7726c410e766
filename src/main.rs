//! The `pgferry` command: `run` serves from a config file, `sandbox` starts
//! two local PostgreSQL clusters with the proxy in front, `ctl` talks to a
//! running pgferry's admin API.

mod sandbox;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "pgferry",
    version,
    about = "PostgreSQL wire-protocol proxy that moves live sessions between backends",
    long_about = "pgferry sits between PostgreSQL clients and a set of interchangeable \
PostgreSQL backends. Clients connect to it as to PostgreSQL (TLS, SCRAM-SHA-256); it \
authenticates them itself, picks the backend with the fewest sessions and forwards \
the protocol byte for byte.\n\nLogging follows RUST_LOG (default: info)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve clients as described by a config file.
    Run(RunArgs),
    /// Start two local PostgreSQL clusters (with --replica: a primary and
    /// its streaming standby) and pgferry in front of them, print a psql
    /// connection string, and stop everything on Ctrl-C.
    Sandbox(sandbox::SandboxArgs),
    /// Inspect and steer a running pgferry through its admin API.
    #[command(long_about = pgferry_ctl::LONG_ABOUT)]
    Ctl(pgferry_ctl::CtlArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Path to pgferry.toml ([proxy], [tls], [auth], [backend_tls],
    /// [[backend]]; see docs/configuration.md).
    #[arg(short, long, default_value = "pgferry.toml", env = "PGFERRY_CONFIG")]
    config: PathBuf,
    /// Take over the pgferry running with this config (its
    /// proxy.handoff_socket): its listeners, then each of its sessions at
    /// a safe point, TLS included; it exits when it has nothing left.
    #[arg(long)]
    takeover: bool,
}

/// Logs to stderr, as text or (`[log] format = "json"`, or
/// `PGFERRY_LOG_FORMAT=json`) one JSON object a line, each carrying the
/// fields of its spans (a session's id, user, database and backend).
fn init_logging(command: &Command) {
    use pgferry_proxy::config::LogFormat;
    let from_env = match std::env::var("PGFERRY_LOG_FORMAT").as_deref() {
        Ok("json") => Some(LogFormat::Json),
        Ok("text") => Some(LogFormat::Text),
        _ => None,
    };
    // The config is read here only for its [log] section; a config that
    // does not load is reported by `run` itself.
    let format = from_env.unwrap_or_else(|| match command {
        Command::Run(args) => pgferry_proxy::Config::load(&args.config)
            .map(|c| c.log.format)
            .unwrap_or_default(),
        _ => LogFormat::Text,
    });
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder
            .json()
            .with_current_span(false)
            .with_span_list(true)
            .init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // ctl is a synchronous HTTP client: no runtime, and no log lines mixed
    // into the output scripts parse.
    let command = match cli.command {
        Command::Ctl(args) => return pgferry_ctl::run(args),
        other => other,
    };
    init_logging(&command);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgferry: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match command {
            Command::Run(args) => serve::run_from_file(&args.config, args.takeover).await,
            Command::Sandbox(args) => sandbox::run(args).await,
            Command::Ctl(_) => unreachable!("ctl returned above"),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgferry: {e:#}");
            ExitCode::FAILURE
        }
    }
}
