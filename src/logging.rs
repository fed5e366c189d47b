//! Process logging: tracing-subscriber to stderr (or, for the Windows service, which has no
//! stderr, to a file), human text or JSON lines.
//!
//! The filter comes from `EHRSYNC_LOG`, else `RUST_LOG`, else `info`, in `EnvFilter` syntax
//! (`ehrsync=debug,sqlx=warn`). Standard output is left to commands' own output (plans,
//! `status --json`), so logs never mix into what scripts parse.

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::sync::Mutex;

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// The variable that sets the log filter; `RUST_LOG` is read when it is unset.
pub const LOG_ENV: &str = "EHRSYNC_LOG";
const DEFAULT_FILTER: &str = "info";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Installs the global subscriber, writing to stderr. Call once, first thing in `main` (a second
/// call does nothing).
pub fn init(format: LogFormat) {
    // Colour only on a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // Fails only when a subscriber is already installed, which then keeps logging.
    let _ = install(format, std::io::stderr, ansi);
}

/// Installs the global subscriber, appending to the file at `path` (its directories are
/// created), without colours. For processes that have no stderr worth writing to, such as the
/// Windows service. Same filter and formats as [`init`].
pub fn init_file(path: &Path, format: LogFormat) -> std::io::Result<()> {
    let file = open_append(path)?;
    install(format, Mutex::new(file), false).map_err(std::io::Error::other)
}

/// Opens `path` for appending, creating it and its directories.
fn open_append(path: &Path) -> std::io::Result<File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    OpenOptions::new().create(true).append(true).open(path)
}

fn install<W>(
    format: LogFormat,
    writer: W,
    ansi: bool,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let (filter, bad) = filter_from(
        std::env::var(LOG_ENV)
            .ok()
            .or_else(|| std::env::var("RUST_LOG").ok()),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.try_init()?,
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init()?,
    }
    if let Some((directive, error)) = bad {
        tracing::warn!(%directive, %error, "ignoring an invalid log filter; logging at {DEFAULT_FILTER}");
    }
    Ok(())
}

/// The filter for `directive`, or the default together with why `directive` was refused.
fn filter_from(directive: Option<String>) -> (EnvFilter, Option<(String, String)>) {
    match directive.filter(|d| !d.trim().is_empty()) {
        None => (EnvFilter::new(DEFAULT_FILTER), None),
        Some(d) => match EnvFilter::try_new(&d) {
            Ok(f) => (f, None),
            Err(e) => (EnvFilter::new(DEFAULT_FILTER), Some((d, e.to_string()))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_filters_fall_back_to_info() {
        let (f, bad) = filter_from(Some("ehrsync=loud".into()));
        assert!(bad.is_some());
        assert_eq!(f.to_string(), "info");
        let (f, bad) = filter_from(Some("ehrsync=debug".into()));
        assert!(bad.is_none());
        assert_eq!(f.to_string(), "ehrsync=debug");
        assert_eq!(filter_from(None).0.to_string(), "info");
    }

    #[test]
    fn log_files_are_created_with_their_directories_and_appended_to() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs").join("nested").join("ehrsync.log");
        writeln!(open_append(&path).unwrap(), "one").unwrap();
        writeln!(open_append(&path).unwrap(), "two").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "one\ntwo\n");
    }
}
