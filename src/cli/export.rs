//! `ehrsync export (VIEW | RESOURCE) [--account A] [--format csv|ndjson] [--out FILE]`: a view's
//! table (a `[[views]]` name, or `patients`) or the live records of a resource type, streamed
//! row by row from the database (flat memory), as RFC 4180 CSV (UTF-8, header row) or NDJSON.
//! `--out` writes beside the file and renames it into place when complete, so a reader never
//! sees half an export.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::value::RawValue;

use super::output;
use crate::store::{ExportError, ExportEvent, ExportQuery, ExportValue, Store};

/// How `export` writes rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// RFC 4180 CSV, UTF-8, with a header row.
    Csv,
    /// One JSON object per line: a view's row by column name, or a record's JSON as stored.
    Ndjson,
}

pub struct Args {
    pub what: String,
    pub account: Option<String>,
    pub format: Format,
    pub out: Option<PathBuf>,
}

pub async fn run(config_path: &Path, args: Args) -> ExitCode {
    let (config, store) = match super::open_database(config_path).await {
        Ok(opened) => opened,
        Err(code) => return code,
    };
    let Some(store) = store else {
        eprintln!(
            "error: there is no database at {} yet: nothing has been pulled",
            config.agent.database
        );
        return ExitCode::from(super::EXIT_FAILURE);
    };
    let (query, json_columns) = match pick(&config, &args.what) {
        Ok(p) => p,
        Err(message) => {
            store.close().await;
            eprintln!("error: {message}");
            return ExitCode::from(super::EXIT_CONFIG);
        }
    };
    let code = match &args.out {
        None => {
            let stdout = std::io::stdout().lock();
            let mut out = std::io::BufWriter::with_capacity(64 * 1024, stdout);
            match export(&store, &query, &args, &json_columns, &mut out).await {
                Ok(_) => output::finish(out.flush(), ExitCode::SUCCESS),
                Err(ExportError::Write(e)) => output::finish(Err(e), ExitCode::SUCCESS),
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(super::EXIT_FAILURE)
                }
            }
        }
        Some(path) => to_file(&store, &query, &args, &json_columns, path).await,
    };
    store.close().await;
    code
}

/// Writes the export to `path` through a temporary file beside it.
async fn to_file(
    store: &Store,
    query: &ExportQuery,
    args: &Args,
    json_columns: &[String],
    path: &Path,
) -> ExitCode {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let file = match std::fs::File::create(&partial) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: cannot create {}: {e}", partial.display());
            return ExitCode::from(super::EXIT_FAILURE);
        }
    };
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, file);
    let done = export(store, query, args, json_columns, &mut out).await;
    let finished = done.and_then(|n| {
        let file = out
            .into_inner()
            .map_err(|e| ExportError::Write(e.into_error()))?;
        file.sync_all().map_err(ExportError::Write)?;
        std::fs::rename(&partial, path).map_err(ExportError::Write)?;
        Ok(n)
    });
    match finished {
        Ok(n) => {
            eprintln!("exported {n} rows to {}", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            eprintln!("error: {e}");
            ExitCode::from(super::EXIT_FAILURE)
        }
    }
}

/// What `what` names: a view (its query and the columns holding JSON), `patients`, or a
/// resource type.
fn pick(config: &crate::config::Config, what: &str) -> Result<(ExportQuery, Vec<String>), String> {
    if what.eq_ignore_ascii_case("patients") {
        return Ok((
            ExportQuery::Table {
                name: "patients".to_owned(),
            },
            Vec::new(),
        ));
    }
    if let Some(view) = config.views.get(what) {
        let json = view
            .columns
            .iter()
            .filter(|c| c.collection)
            .map(|c| c.name.clone())
            .collect();
        return Ok((
            ExportQuery::Table {
                name: view.table.clone(),
            },
            json,
        ));
    }
    if what.starts_with(|c: char| c.is_ascii_uppercase())
        && what.chars().all(|c| c.is_ascii_alphanumeric())
        && what.len() <= 64
    {
        return Ok((
            ExportQuery::Resources {
                resource_type: what.to_owned(),
            },
            Vec::new(),
        ));
    }
    let mut names: Vec<&str> = vec!["patients"];
    names.extend(config.views.all().iter().map(|v| v.name.as_str()));
    Err(format!(
        "`{what}` is neither a view ({}) nor a resource type (such as Patient)",
        names.join(", ")
    ))
}

async fn export(
    store: &Store,
    query: &ExportQuery,
    args: &Args,
    json_columns: &[String],
    out: &mut dyn Write,
) -> Result<u64, ExportError> {
    let resources = matches!(query, ExportQuery::Resources { .. });
    let mut sink = match args.format {
        Format::Csv => Sink::Csv(Box::new(
            csv::WriterBuilder::new()
                .has_headers(false)
                .from_writer(out),
        )),
        Format::Ndjson => Sink::Lines(out),
    };
    let mut names: Vec<String> = Vec::new();
    let mut is_json: Vec<bool> = Vec::new();
    let mut line = String::new();
    let n = store
        .export(query, args.account.as_deref(), |event| {
            match (&mut sink, event) {
                (Sink::Csv(csv), ExportEvent::Header(header)) => {
                    csv.write_record(header).map_err(std::io::Error::from)
                }
                (Sink::Lines(_), ExportEvent::Header(header)) => {
                    names = header.iter().map(|h| (*h).to_owned()).collect();
                    is_json = names.iter().map(|n| json_columns.contains(n)).collect();
                    Ok(())
                }
                (Sink::Csv(csv), ExportEvent::Row(values)) => {
                    for v in values {
                        match v {
                            ExportValue::Null => csv.write_field(""),
                            ExportValue::Integer(i) => csv.write_field(i.to_string()),
                            ExportValue::Real(f) => csv.write_field(f.to_string()),
                            ExportValue::Text(t) => csv.write_field(t),
                        }?;
                    }
                    csv.write_record(None::<&[u8]>)
                        .map_err(std::io::Error::from)
                }
                (Sink::Lines(out), ExportEvent::Row(values)) => {
                    line.clear();
                    if resources {
                        // account, id, data: the record as stored, on one line.
                        match values.get(2) {
                            Some(ExportValue::Text(t)) => one_line(t, &mut line),
                            _ => line.push_str("null"),
                        }
                    } else {
                        json_object(&names, &is_json, values, &mut line);
                    }
                    line.push('\n');
                    out.write_all(line.as_bytes())
                }
            }
        })
        .await?;
    match sink {
        Sink::Csv(mut csv) => csv.flush(),
        Sink::Lines(out) => out.flush(),
    }
    .map_err(ExportError::Write)?;
    Ok(n)
}

/// Where rows go.
enum Sink<'a> {
    Csv(Box<csv::Writer<&'a mut dyn Write>>),
    Lines(&'a mut dyn Write),
}

/// A view's row as a JSON object by column name; columns holding JSON (collections) are
/// embedded as JSON.
fn json_object(names: &[String], is_json: &[bool], values: &[ExportValue<'_>], line: &mut String) {
    line.push('{');
    for (i, (name, v)) in names.iter().zip(values).enumerate() {
        if i > 0 {
            line.push(',');
        }
        push_json_string(line, name);
        line.push(':');
        match v {
            ExportValue::Null => line.push_str("null"),
            ExportValue::Integer(n) => line.push_str(&n.to_string()),
            ExportValue::Real(f) => match serde_json::Number::from_f64(*f) {
                Some(n) => line.push_str(&n.to_string()),
                None => line.push_str("null"),
            },
            ExportValue::Text(t)
                if is_json.get(i).copied().unwrap_or(false)
                    && serde_json::from_str::<&RawValue>(t).is_ok() =>
            {
                one_line(t, line)
            }
            ExportValue::Text(t) => push_json_string(line, t),
        }
    }
    line.push('}');
}

fn push_json_string(out: &mut String, s: &str) {
    // Serializing a str to a String cannot fail.
    out.push_str(&serde_json::to_string(s).unwrap_or_default());
}

/// Appends JSON `text` with the whitespace between its tokens removed (NDJSON needs one line
/// per record; a vendor may send its JSON pretty-printed). Strings are copied untouched.
fn one_line(text: &str, out: &mut String) {
    if !text.contains(['\n', '\r']) {
        out.push_str(text);
        return;
    }
    let (mut in_string, mut escaped) = (false, false);
    for c in text.chars() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !c.is_whitespace() {
            out.push(c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pretty_json_becomes_one_line_with_strings_untouched() {
        let mut out = String::new();
        one_line("{\n  \"a\": \"x \\\" \n y\",\n  \"b\": [1, 2]\n}", &mut out);
        assert_eq!(out, "{\"a\":\"x \\\" \n y\",\"b\":[1,2]}");
    }
}
