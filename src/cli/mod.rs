//! The command line: argument definitions and one module per command. Commands print their
//! results on stdout and their errors on stderr, and map failures to the documented exit codes.

mod changes;
mod check_config;
mod demo;
mod doctor;
mod export;
mod login;
mod migrate_store;
mod output;
pub(crate) mod status;
mod sync;
mod token;
mod views;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, Loaded};
use crate::logging::LogFormat;

/// Exit code of a command that failed at run time (database unreadable, …).
pub const EXIT_FAILURE: u8 = 1;
/// Exit code for an invalid config (and for command-line usage errors, as clap does).
pub const EXIT_CONFIG: u8 = 2;

/// `ehrsync --version`: the release and the commit it was built from (see build.rs).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("EHRSYNC_COMMIT"),
    ")"
);

/// Keeps EHR vendor tokens alive, pulls patient data into SQLite, and exposes Prometheus metrics.
#[derive(Debug, Parser)]
#[command(name = "ehrsync", version = VERSION, about)]
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
        /// After the pull, read every id the vendor holds and mark deleted the stored records
        /// it no longer returns (a full pull or a whole list does this anyway).
        #[arg(long)]
        reconcile: bool,
        /// Apply the reconcile even when it would delete more than the job's
        /// reconcile_max_delete (once: the vendor really deleted that many).
        #[arg(long)]
        force: bool,
    },
    /// Log an account in: for accounts whose grant needs a person (authorization_code), open
    /// the provider's login page and receive the result on a loopback redirect (PKCE, state,
    /// nonce; ID token checked), or with --device approve on any other device. For other
    /// accounts, log in once now with the configured credentials. The tokens are stored where
    /// `ehrsync run` reads them; a running agent picks them up without a restart.
    ///
    /// From another machine's browser: forward the redirect port over SSH
    /// (`ssh -L 8765:127.0.0.1:8765 server`) and run `ehrsync login ACCOUNT --no-browser
    /// --port 8765` on the server, or use --device where the provider offers it.
    Login {
        /// The account, as named in the config (`[accounts.NAME]`).
        account: String,
        /// Print the address to open instead of also opening a browser on this machine.
        #[arg(long)]
        no_browser: bool,
        /// Port of the loopback redirect http://127.0.0.1:PORT/callback (default: the account's
        /// `redirect_port`, else a free port).
        #[arg(long)]
        port: Option<u16>,
        /// Use the device authorization grant (RFC 8628): enter a code on any device, for
        /// servers without a browser. Only where the provider offers it.
        #[arg(long)]
        device: bool,
        /// Give up when the person has not finished within this long.
        #[arg(long, value_parser = crate::config::parse_duration, default_value = "5m")]
        timeout: std::time::Duration,
    },
    /// Check each account (or the one named) step by step: config, DNS, TCP, TLS, the token
    /// endpoint, the API and the clock. Prints one line per step, ✓ or ✗ with the fix, and exits
    /// 0 when every step passed, 1 otherwise.
    ///
    /// Uses a valid token the agent stored, else makes one token request with the account's
    /// own grant (not for an account waiting for a login, and never for a grant that needs a
    /// person). Stores nothing, so it may run beside `ehrsync run`.
    Doctor {
        /// The account, as named in the config (`[accounts.NAME]`); all accounts without it.
        account: Option<String>,
    },
    /// Try ehrsync with no credentials: start the built-in vendor sandbox on loopback and the
    /// agent against it (one account per preset, token lifetimes of tens of seconds), print a
    /// status table every 10 s, and pull patients into a demo database. Stops on Ctrl-C.
    Demo {
        /// Stop after this long (e.g. `90s`, `5m`) instead of waiting for Ctrl-C.
        #[arg(long = "for", value_parser = crate::config::parse_duration)]
        run_for: Option<std::time::Duration>,
        /// Directory for the demo's config, database and key (emptied of them at start).
        #[arg(long, default_value = "ehrsync-demo")]
        dir: PathBuf,
        /// Port for /metrics on 127.0.0.1 (another free port is used if it is taken).
        #[arg(long, default_value_t = 9870)]
        metrics_port: u16,
    },
    /// Show what the pulls changed, oldest first: records created, updated and deleted (by a
    /// reconcile), from the database's change log.
    Changes {
        /// Only this account's changes.
        account: Option<String>,
        /// Only changes to this resource type (Patient, NikoHealthPatient, …).
        #[arg(long)]
        resource: Option<String>,
        /// Start after this seq (a number, as printed), or at a time (2026-11-30T08:00:00Z,
        /// 2026-11-30, or a duration back from now such as 24h).
        #[arg(long, value_parser = changes::parse_since)]
        since: Option<changes::Since>,
        #[arg(long, value_enum, default_value_t = changes::Format::Table)]
        format: changes::Format,
    },
    /// Write a view's table ([[views]] name, or `patients`) or the live records of a resource
    /// type (Patient, …) as CSV or NDJSON, streamed from the database.
    Export {
        /// A view name, `patients`, or a resource type.
        what: String,
        /// Only this account's rows.
        #[arg(long)]
        account: Option<String>,
        #[arg(long, value_enum, default_value_t = export::Format::Csv)]
        format: export::Format,
        /// Write to this file (complete or not at all) instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print a valid access token of the account on stdout, for scripts:
    /// `curl -H "Authorization: Bearer $(ehrsync token nextech-main)" …`. With
    /// EHRSYNC_BROKER_KEY set (a [broker.clients] key), asks the running agent's broker;
    /// otherwise reads it through the database (refreshing under the account's lease if needed).
    Token {
        /// The account, as named in the config (`[accounts.NAME]`).
        account: String,
        /// The token must stay valid at least this long (e.g. `5m`); refreshed early if not.
        #[arg(long, value_parser = crate::config::parse_duration, default_value = "0s")]
        min_valid: std::time::Duration,
        /// The broker's address (`unix:/run/ehrsync/broker.sock`, `127.0.0.1:9871`) instead of
        /// the config's broker.listen. Used with EHRSYNC_BROKER_KEY.
        #[arg(long)]
        broker: Option<String>,
    },
    /// The SQL-on-FHIR views of [[views]]: list them, or rebuild their tables from the stored
    /// records.
    Views {
        #[command(subcommand)]
        action: ViewsAction,
    },
    /// Show each account's token state and each job's last and next run, from the database.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Copy the SQLite database, whole (tokens still sealed, runs, records, change log), into
    /// an empty PostgreSQL database, then check the copy (row counts, and about 100 rows a
    /// table compared column by column). Stop every agent first. The password comes from
    /// PGPASSWORD or ~/.pgpass, never the URL.
    MigrateStore {
        /// `postgres://USER@HOST[:PORT]/DATABASE[?sslmode=verify-full]`.
        #[arg(long)]
        to: String,
    },
    /// Install, remove or run ehrsync as a Windows service (Windows only; on Linux, use the
    /// systemd unit systemd/ehrsync.service).
    Service {
        #[command(subcommand)]
        action: ServiceAction,
    },
}

impl Command {
    /// `service run`: the one command that must not start a runtime or log to stderr before it
    /// hands the main thread to the Windows Service Control Manager.
    pub fn is_service_run(&self) -> bool {
        matches!(
            self,
            Command::Service {
                action: ServiceAction::Run
            }
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum ViewsAction {
    /// Each view: its table, row count, resource type, columns and file.
    List,
    /// Rebuild the table of the view named (all views without a name) from the stored records.
    Rebuild {
        /// The view's name (its ViewDefinition's `name`).
        name: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Subcommand)]
pub enum ServiceAction {
    /// Register the Windows service `ehrsync` (from an elevated prompt).
    ///
    /// The service starts at boot as the virtual account NT SERVICE\ehrsync, is restarted when
    /// it fails, and runs `ehrsync service run --config <--config, made absolute>` (plus
    /// `--log-format json` when given here). The config must be valid: exits 2 listing its
    /// problems otherwise.
    Install,
    /// Stop the Windows service if it runs (gracefully, as `ehrsync run` stops), then remove it.
    Uninstall,
    /// Run as the Windows service: called by the Service Control Manager; not for interactive
    /// use.
    ///
    /// To run ehrsync in the foreground, use `ehrsync run`. The service logs to
    /// %ProgramData%\ehrsync\logs\ehrsync.log.
    Run,
}

/// Runs the parsed command line to completion.
pub async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Run => run_agent(&cli.config).await,
        Command::CheckConfig => check_config::run(&cli.config),
        Command::Status { json } => status::run(&cli.config, json).await,
        Command::Token {
            account,
            min_valid,
            broker,
        } => {
            let args = token::Args {
                account,
                min_valid,
                broker,
            };
            token::run(&cli.config, args).await
        }
        Command::Changes {
            account,
            resource,
            since,
            format,
        } => changes::run(&cli.config, account, resource, since, format).await,
        Command::Export {
            what,
            account,
            format,
            out,
        } => {
            let args = export::Args {
                what,
                account,
                format,
                out,
            };
            export::run(&cli.config, args).await
        }
        Command::MigrateStore { to } => migrate_store::run(&cli.config, &to).await,
        Command::Views { action } => match action {
            ViewsAction::List => views::list(&cli.config).await,
            ViewsAction::Rebuild { name } => views::rebuild(&cli.config, name).await,
        },
        Command::Doctor { account } => doctor::run(&cli.config, account.as_deref()).await,
        Command::Sync {
            account,
            job,
            full,
            reconcile,
            force,
        } => {
            let options = crate::sync::RunOptions {
                full,
                reconcile,
                force,
            };
            sync::run(&cli.config, &account, &job, options).await
        }
        Command::Login {
            account,
            no_browser,
            port,
            device,
            timeout,
        } => {
            let args = login::Args {
                account,
                open_browser: !no_browser,
                port,
                device,
                timeout,
            };
            login::run(&cli.config, &args).await
        }
        Command::Demo {
            run_for,
            dir,
            metrics_port,
        } => demo::run(&dir, run_for, metrics_port).await,
        Command::Service { action } => match action {
            ServiceAction::Install => service_install(&cli.config, cli.log_format),
            ServiceAction::Uninstall => service_uninstall(),
            // `main` calls `service_run` before any runtime exists; this is only a fallback.
            ServiceAction::Run => service_run(&cli),
        },
    }
}

/// `ehrsync service run`: hands the calling thread to the Windows Service Control Manager until
/// the service stops. Call it outside any tokio runtime and before installing a logger: the
/// service logs to a file and builds its own runtime.
pub fn service_run(cli: &Cli) -> ExitCode {
    match crate::service::run(&cli.config, cli.log_format) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => service_failed(&e),
    }
}

fn service_install(path: &std::path::Path, log_format: crate::logging::LogFormat) -> ExitCode {
    if let Err(e) = crate::service::supported() {
        return service_failed(&e);
    }
    // The service starts in C:\Windows\System32: a relative path would not find the file.
    let path = match std::path::absolute(path) {
        Ok(p) => p,
        Err(e) => {
            eprintln!(
                "error: cannot resolve the config path {}: {e}",
                path.display()
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let loaded = match load_config(&path) {
        Ok(l) => l,
        Err(code) => return code,
    };
    for w in &loaded.warnings {
        eprintln!("warning: {w}");
    }
    if !loaded.config.env_overrides.is_empty() {
        eprintln!(
            "warning: the service does not see this shell's environment; these overrides will \
             not apply to it: {}",
            loaded.config.env_overrides.join(", ")
        );
    }
    match crate::service::install(&path, log_format) {
        Ok(()) => output::finish(
            output::print(format_args!(
                "installed the service {name} (runs as {account}, config {config})\n\
                 next: grant {account} access to the config, secrets and data directory \
                 (docs/operations.md, \"Install on Windows\"), then `sc.exe start {name}`\n",
                name = crate::service::SERVICE_NAME,
                account = crate::service::ACCOUNT,
                config = path.display(),
            )),
            ExitCode::SUCCESS,
        ),
        Err(e) => service_failed(&e),
    }
}

fn service_uninstall() -> ExitCode {
    use crate::service::{SERVICE_NAME, Uninstalled};
    match crate::service::uninstall() {
        Ok(Uninstalled::Removed) => output::finish(
            output::print(format_args!("removed the service {SERVICE_NAME}\n")),
            ExitCode::SUCCESS,
        ),
        Ok(Uninstalled::MarkedForDeletion) => output::finish(
            output::print(format_args!(
                "the service {SERVICE_NAME} is marked for deletion: it is removed once it has \
                 stopped and nothing holds it open (close the Services console), or at the next \
                 reboot\n"
            )),
            ExitCode::SUCCESS,
        ),
        Err(e) => service_failed(&e),
    }
}

fn service_failed(e: &crate::service::ServiceError) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(e.exit_code())
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

/// Loads the config for a command about one account, reading only that account's secrets (the
/// others may be readable by the service alone); warnings are logged. On failure, prints every
/// problem and returns the exit code.
fn load_for_account(
    path: &std::path::Path,
    env: &config::Env,
    account: &str,
) -> Result<config::Config, ExitCode> {
    let scope = config::Secrets::Account(account.to_owned());
    let loaded = config::load_scoped(path, env, &scope).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_CONFIG)
    })?;
    for w in &loaded.warnings {
        tracing::warn!(key = %w.key, "{}", w.message);
    }
    Ok(loaded.config)
}

/// Loads the config without reading any secret (for commands that only read or rebuild the
/// database), printing every problem and returning the exit code on failure.
fn load_without_secrets(path: &std::path::Path) -> Result<Loaded, ExitCode> {
    let loaded = config::load_scoped(path, &config::Env::from_process(), &config::Secrets::None)
        .map_err(|e| {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_CONFIG)
        })?;
    for w in &loaded.warnings {
        tracing::warn!(key = %w.key, "{}", w.message);
    }
    Ok(loaded)
}

/// The config (no secrets read) and its database opened read-only (`None`: none exists yet).
async fn open_database(
    path: &std::path::Path,
) -> Result<(config::Config, Option<crate::store::Store>), ExitCode> {
    let config = load_without_secrets(path)?.config;
    match crate::store::Store::open_read_only(&config.agent.database).await {
        Ok(store) => Ok((config, store)),
        Err(e) => {
            eprintln!("error: {e}");
            Err(ExitCode::from(EXIT_FAILURE))
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
