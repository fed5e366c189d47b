//! Process logging: tracing-subscriber to stderr, human text or JSON lines.
//!
//! The filter comes from `EHRSYNC_LOG`, else `RUST_LOG`, else `info`, in `EnvFilter` syntax
//! (`ehrsync=debug,sqlx=warn`). Standard output is left to commands' own output (plans,
//! `status --json`), so logs never mix into what scripts parse.

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

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

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init(format: LogFormat) {
    let (filter, bad) = filter_from(
        std::env::var(LOG_ENV)
            .ok()
            .or_else(|| std::env::var("RUST_LOG").ok()),
    );
    // Colour only on a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
    if let Some((directive, error)) = bad {
        tracing::warn!(%directive, %error, "ignoring an invalid log filter; logging at {DEFAULT_FILTER}");
    }
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
}
