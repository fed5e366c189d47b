//! `ehrsync migrate-store --to postgres://USER@HOST[:PORT]/DATABASE[?sslmode=…]`: copies the
//! config's SQLite database, whole, into an empty PostgreSQL database (`store::migrate`), then
//! checks the copy. The password never travels in the URL (it would show in the process list
//! and the shell's history): libpq's `PGPASSWORD` or a `~/.pgpass` entry gives it, as for
//! `psql`.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use sqlx::ConnectOptions as _;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use super::{EXIT_CONFIG, EXIT_FAILURE};
use crate::store::Store;
use crate::store::migrate::copy_to_postgres;

/// Parses `--to`: a `postgres://` URL without a password. The message names the problem.
pub fn target_options(to: &str) -> Result<(PgConnectOptions, String), String> {
    let url = url::Url::parse(to).map_err(|e| format!("--to: not a URL: {e}"))?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return Err("--to: must be a postgres:// URL".to_owned());
    }
    if url.password().is_some() {
        return Err(
            "--to: the password must not be written in the URL (it would show in the process \
             list and the shell's history); set PGPASSWORD or a ~/.pgpass entry"
                .to_owned(),
        );
    }
    let options = PgConnectOptions::from_url(&url).map_err(|e| format!("--to: {e}"))?;
    // Where, for messages: host, port and database, never credentials.
    let shown = format!(
        "{}:{}/{}",
        url.host_str().unwrap_or("localhost"),
        url.port().unwrap_or(5432),
        url.path().trim_start_matches('/')
    );
    Ok((options, shown))
}

pub async fn run(config_path: &Path, to: &str) -> ExitCode {
    let config = match super::load_without_secrets(config_path) {
        Ok(loaded) => loaded.config,
        Err(code) => return code,
    };
    let (options, shown) = match target_options(to) {
        Ok(parsed) => parsed,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let database = match &config.agent.database {
        crate::config::Database::File(path) => path,
        crate::config::Database::Postgres { .. } => {
            eprintln!(
                "error: agent.database is already a PostgreSQL database; migrate-store copies a \
                 SQLite file into one"
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if !database.exists() {
        eprintln!(
            "error: there is no database at {} to copy",
            database.display()
        );
        return ExitCode::from(EXIT_FAILURE);
    }
    let source = match Store::open(database).await {
        Ok(store) => store,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let target = match PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(options)
        .await
    {
        Ok(pool) => pool,
        Err(e) => {
            eprintln!("error: cannot connect to PostgreSQL at {shown}: {e}");
            source.close().await;
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let started = Instant::now();
    let now = crate::clock::Clock::now(&crate::clock::SystemClock).unix_seconds();
    let outcome = copy_to_postgres(&source, &target, now).await;
    source.close().await;
    target.close().await;
    match outcome {
        Ok(tables) => {
            println!("copied {} into PostgreSQL at {shown}:", database.display());
            for t in &tables {
                println!(
                    "  {:<20} {:>10} rows, {:>3} checked column by column",
                    t.table, t.rows, t.sampled
                );
            }
            let rows: u64 = tables.iter().map(|t| t.rows).sum();
            println!(
                "{rows} rows in {:.1} s; row counts match. Next: set agent.database to the URL \
                 and start the agents (view tables are rebuilt from the records at the first start).",
                started.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
