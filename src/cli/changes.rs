//! `ehrsync changes [ACCOUNT] [--resource T] [--since SEQ|TIME] [--format table|json|csv]`:
//! the change log, oldest first, read in steps (flat memory however long it is).

use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;

use chrono::{DateTime, NaiveDate, Utc};

use super::output;
use crate::store::{ChangeFilter, ChangeRow};

/// Changes read per step.
const STEP: u32 = 5000;

/// How `changes` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns, for people.
    Table,
    /// One JSON object per line (seq, account, resource_type, id, kind, version_id,
    /// last_updated, run_id, at).
    Json,
    /// RFC 4180 CSV with a header row.
    Csv,
}

/// Where `--since` starts: after a `seq`, or at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Since {
    Seq(i64),
    Time(i64),
}

/// `--since`: a number is a `seq` (changes after it); otherwise an RFC 3339 time, a date
/// (midnight UTC), or a duration back from now (`24h`, `7d`).
pub fn parse_since(text: &str) -> Result<Since, String> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse()
            .map(Since::Seq)
            .map_err(|_| format!("`{text}` is too large for a seq"));
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(Since::Time(t.timestamp()));
    }
    if let Ok(d) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(Since::Time(
            d.and_time(chrono::NaiveTime::MIN).and_utc().timestamp(),
        ));
    }
    if let Ok(ago) = crate::config::parse_duration(text) {
        let secs = i64::try_from(ago.as_secs()).unwrap_or(i64::MAX);
        return Ok(Since::Time(Utc::now().timestamp().saturating_sub(secs)));
    }
    Err(format!(
        "`{text}` is not a seq (a number), a time (2026-11-30T08:00:00Z), a date (2026-11-30) \
         or a duration back from now (24h, 7d)"
    ))
}

pub async fn run(
    config_path: &Path,
    account: Option<String>,
    resource: Option<String>,
    since: Option<Since>,
    format: Format,
) -> ExitCode {
    let (_config, store) = match super::open_database(config_path).await {
        Ok(opened) => opened,
        Err(code) => return code,
    };
    let filter = ChangeFilter {
        account,
        resource_type: resource,
        after_seq: match since {
            Some(Since::Seq(s)) => Some(s),
            _ => None,
        },
        since_time: match since {
            Some(Since::Time(t)) => Some(t),
            _ => None,
        },
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let (mut after, mut first, mut code) = (0i64, true, ExitCode::SUCCESS);
    let mut written: std::io::Result<()> = Ok(());
    if let Some(store) = store {
        loop {
            let rows = match store.read_changes(&filter, after, STEP).await {
                Ok(rows) => rows,
                Err(e) => {
                    eprintln!("error: {e}");
                    code = ExitCode::from(super::EXIT_FAILURE);
                    break;
                }
            };
            let Some(last) = rows.last() else {
                break;
            };
            after = last.seq;
            written = write_rows(&mut out, format, &rows, first);
            first = false;
            if written.is_err() || rows.len() < STEP as usize {
                break;
            }
        }
        store.close().await;
    }
    if first && written.is_ok() {
        written = write_rows(&mut out, format, &[], true);
    }
    output::finish(written.and_then(|()| out.flush()), code)
}

const COLUMNS: [&str; 9] = [
    "seq",
    "at",
    "account",
    "resource_type",
    "id",
    "kind",
    "version_id",
    "last_updated",
    "run_id",
];

fn write_rows(
    out: &mut dyn std::io::Write,
    format: Format,
    rows: &[ChangeRow],
    first: bool,
) -> std::io::Result<()> {
    let at = |r: &ChangeRow| {
        DateTime::from_timestamp(r.at, 0)
            .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
            .unwrap_or_default()
    };
    match format {
        Format::Table => {
            if first {
                writeln!(
                    out,
                    "{:>8}  {:<20}  {:<16}  {:<14}  {:<8}  {:<24}  {:<8}  LAST UPDATED",
                    "SEQ", "AT", "ACCOUNT", "TYPE", "KIND", "ID", "VERSION"
                )?;
                if rows.is_empty() {
                    writeln!(out, "(no changes)")?;
                }
            }
            for r in rows {
                writeln!(
                    out,
                    "{:>8}  {:<20}  {:<16}  {:<14}  {:<8}  {:<24}  {:<8}  {}",
                    r.seq,
                    at(r),
                    r.account,
                    r.resource_type,
                    r.kind,
                    r.id,
                    r.version_id.as_deref().unwrap_or("-"),
                    r.last_updated.as_deref().unwrap_or("-")
                )?;
            }
        }
        Format::Json => {
            for r in rows {
                serde_json::to_writer(&mut *out, r).map_err(std::io::Error::other)?;
                out.write_all(b"\n")?;
            }
        }
        Format::Csv => {
            let mut w = csv::WriterBuilder::new()
                .has_headers(false)
                .from_writer(&mut *out);
            if first {
                w.write_record(COLUMNS)?;
            }
            for r in rows {
                w.write_record([
                    r.seq.to_string(),
                    at(r),
                    r.account.clone(),
                    r.resource_type.clone(),
                    r.id.clone(),
                    r.kind.clone(),
                    r.version_id.clone().unwrap_or_default(),
                    r.last_updated.clone().unwrap_or_default(),
                    r.run_id.map(|i| i.to_string()).unwrap_or_default(),
                ])?;
            }
            w.flush()?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_a_seq_a_time_a_date_or_a_duration() {
        assert_eq!(parse_since("42"), Ok(Since::Seq(42)));
        assert_eq!(
            parse_since("2026-11-30T08:00:00Z"),
            Ok(Since::Time(1_796_025_600))
        );
        assert_eq!(parse_since("2026-11-30"), Ok(Since::Time(1_795_996_800)));
        let Ok(Since::Time(t)) = parse_since("24h") else {
            panic!("a duration is a time");
        };
        assert!((Utc::now().timestamp() - 86_400 - t).abs() < 5);
        assert!(parse_since("yesterday").unwrap_err().contains("not a seq"));
    }
}
