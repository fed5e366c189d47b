//! `ehrsync views list` and `ehrsync views rebuild [NAME]`: the configured SQL-on-FHIR views and
//! their tables. A rebuild reads every live record of the view's type from `resources` in one
//! transaction (pulls wait meanwhile); the agent rebuilds a view whose definition changed by
//! itself at start-up.

use std::path::Path;
use std::process::ExitCode;

use super::output;
use crate::store::{Prepared, Store};

pub async fn rebuild(config_path: &Path, name: Option<String>) -> ExitCode {
    let loaded = match super::load_without_secrets(config_path) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let config = loaded.config;
    let names: Vec<String> = match name {
        Some(n) => match config.views.get(&n) {
            Some(v) => vec![v.name.clone()],
            None => {
                let known: Vec<&str> = config.views.all().iter().map(|v| v.name.as_str()).collect();
                eprintln!(
                    "error: no view `{n}` in {}; configured: {}",
                    config.path.display(),
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                );
                return ExitCode::from(super::EXIT_CONFIG);
            }
        },
        None => config.views.all().iter().map(|v| v.name.clone()).collect(),
    };
    let store = match Store::open(&config.agent.database).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(super::EXIT_FAILURE);
        }
    };
    let mut text = String::new();
    let mut code = ExitCode::SUCCESS;
    let now = chrono::Utc::now().timestamp();
    for n in &names {
        let started = std::time::Instant::now();
        match store.rebuild_view(&config.views, n, now).await {
            Ok(Prepared::Built {
                name,
                records,
                rows,
            }) => text.push_str(&format!(
                "{name}: rebuilt from {records} records, {rows} rows in {:.1}s\n",
                started.elapsed().as_secs_f64()
            )),
            Ok(_) => {}
            Err(e) => {
                eprintln!("error: view {n}: {e}");
                code = ExitCode::from(super::EXIT_FAILURE);
            }
        }
    }
    if names.is_empty() {
        text.push_str("no [[views]] are configured\n");
    }
    store.close().await;
    output::finish(output::print(text), code)
}

pub async fn list(config_path: &Path) -> ExitCode {
    let (config, store) = match super::open_database(config_path).await {
        Ok(opened) => opened,
        Err(code) => return code,
    };
    let mut text = String::new();
    for v in config.views.all() {
        let rows = match &store {
            Some(s) => s.count_rows(&v.table).await.ok().flatten(),
            None => None,
        };
        let columns: Vec<&str> = v.columns.iter().map(|c| c.name.as_str()).collect();
        text.push_str(&format!(
            "{}  table {} ({})  from {} records  columns {}\n  file {}\n",
            v.name,
            v.table,
            rows.map_or_else(|| "not built".to_owned(), |n| format!("{n} rows")),
            v.resource_type,
            columns.join(", "),
            v.file.display()
        ));
    }
    if text.is_empty() {
        text.push_str("no [[views]] are configured\n");
    }
    if let Some(s) = store {
        s.close().await;
    }
    output::finish(output::print(text), ExitCode::SUCCESS)
}
