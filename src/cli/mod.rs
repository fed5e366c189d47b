//! The command line: argument definitions and one module per command. Commands print their
//! results on stdout and their errors on stderr, and map failures to the documented exit codes.

mod check_config;
mod status;
mod sync;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, Loaded};
use crate::logging::LogFormat;

/// Exit code of a command that failed at run time (database unreadable, …).
pub const EXIT_FAILURE: u8 = 1;
/// Exit code for an invalid config (and for command-line usage errors, as clap does).
pub const EXIT_CONFIG: u8 = 2;

/// Keeps EHR vendor tokens alive, pulls patient data into SQLite, and exposes Prometheus metrics.
#[derive(Debug, Parser)]
#[command(name = "ehrsync", version, about)]
pub struct Cli {
    /// Config file.
    #[arg(
        long,
        global = true,
        env = "EHRSYNC_CONFIG",
        default_value = "config/ehrsync.toml"
    )]
    pub config: PathBuf,

    /// Log line format (logs go to stderr; level from EHRSYNC_LOG or RUST_LOG, default info).
    #[arg(long, global = true, value_enum, env = "EHRSYNC_LOG_FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent in the foreground: keep every account's token valid, run every job on its
    /// schedule, and serve /metrics, /healthz and /readyz. Stops cleanly on SIGINT or SIGTERM.
    Run,
    /// Validate the config and print the resolved plan (accounts, endpoints, grants, schedules),
    /// secrets redacted. Exits 2 listing every problem when the config is invalid.
    CheckConfig,
    /// Run one job of one account now, print a one-line summary, and exit (0 when the run
    /// succeeded). May run beside `ehrsync run` on the same database.
    Sync {
        /// The account, as named in the config (`[accounts.NAME]`).
        account: String,
        /// The job's `name`.
        job: String,
        /// Pull everything, ignoring the watermark of the last completed run.
        #[arg(long)]
        full: bool,
    },
    /// Show each account's token state and each job's last and next run, from the database.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Runs the parsed command line to completion.
pub async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Run => run_agent(&cli.config).await,
        Command::CheckConfig => check_config::run(&cli.config),
        Command::Status { json } => status::run(&cli.config, json).await,
        Command::Sync { account, job, full } => sync::run(&cli.config, &account, &job, full).await,
    }
}

async fn run_agent(path: &std::path::Path) -> ExitCode {
    let env = config::Env::from_process();
    let loaded = match config::load_with_env(path, &env) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    for w in &loaded.warnings {
        tracing::warn!(key = %w.key, "{}", w.message);
    }
    let controls = match crate::signals::listen() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: cannot listen for signals: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match crate::agent::run(loaded.config, env, controls, |_| {}).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "ehrsync cannot run");
            eprintln!("error: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Loads the config for a command, printing every problem and returning the exit code on failure.
fn load_config(path: &std::path::Path) -> Result<Loaded, ExitCode> {
    config::load(path).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_CONFIG)
    })
}
