//! `ehrsync demo`: the agent against the built-in vendor sandbox on loopback, with nothing to
//! set up. One account per preset; lifetimes cut to tens of seconds so that logins, proactive
//! refreshes, a re-login after the sandbox revokes a refresh token, a person's login for the
//! Net Health account (what `ehrsync login` does, with the demo opening the page), and patient
//! pulls all happen within a minute or two. Its config, database and key live in `--dir`, started afresh
//! each time; a compact status table is printed every 10 s; Ctrl-C (or `--for`) stops it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::mpsc;

use super::{output, status};
use crate::clock::SystemClock;
use crate::config::{self, Env};
use crate::metrics::Metrics;
use crate::sandbox::{self, Lifetimes, Sandbox};
use crate::signals::Control;
use crate::store::Store;
use crate::vendor::Vendor;

/// Files the demo owns in its directory (removed at start: each demo begins with no state).
const CONFIG_FILE: &str = "ehrsync-demo.toml";
const DB_FILE: &str = "ehrsync-demo.db";
const KEY_FILE: &str = "ehrsync-demo.key";

/// How often the status table is printed.
const TABLE_EVERY: Duration = Duration::from_secs(10);
/// When the sandbox revokes Nextech's refresh tokens, to show the re-login that follows.
const REVOKE_AT: Duration = Duration::from_secs(35);
/// How often a few sandbox patients change, so incremental pulls have something to fetch.
const CHANGE_EVERY: Duration = Duration::from_secs(12);
/// Patients each sandbox vendor serves.
const PATIENTS: u64 = 1_000;

/// The demo's accounts: (vendor, account name, pull schedule).
const ACCOUNTS: [(Vendor, &str, Option<&str>); 4] = [
    (Vendor::Nextech, "demo-nextech", Some("*/15 * * * * *")),
    (
        Vendor::CareCentric,
        "demo-carecentric",
        Some("5/20 * * * * *"),
    ),
    (
        Vendor::NikoHealth,
        "demo-nikohealth",
        Some("10/20 * * * * *"),
    ),
    // Net Health grants access only after a person logs in (`ehrsync login`): the account
    // waits in `needs_login` until the demo logs in for it at LOGIN_AT, then refreshes on its
    // own. (No pull job: its runs would fail, correctly, until the login.)
    (Vendor::NetHealth, "demo-nethealth", None),
];

/// The account the demo logs in as a person would, and when.
const PERSON_ACCOUNT: &str = "demo-nethealth";
const LOGIN_AT: Duration = Duration::from_secs(15);

/// Sandbox lifetimes for the demo: tens of seconds instead of hours.
fn demo_lifetimes() -> Lifetimes {
    Lifetimes {
        nextech_access: Duration::from_secs(40),
        nextech_refresh: Duration::from_secs(14 * 60),
        carecentric_access: Duration::from_secs(45),
        nikohealth_access: Duration::from_secs(30),
        nethealth_access: Duration::from_secs(40),
        nethealth_refresh: Duration::from_secs(30 * 60),
    }
}

#[derive(Debug, thiserror::Error)]
enum DemoError {
    #[error("cannot prepare {path}: {source}")]
    Files {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the vendor sandbox: {0}")]
    Sandbox(std::io::Error),
    #[error("the demo config is invalid (a bug): {0}")]
    Config(#[from] config::ConfigError),
    #[error("cannot listen for Ctrl-C: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Agent(#[from] crate::agent::AgentError),
    #[error("the agent task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("cannot write to stdout: {0}")]
    Output(std::io::Error),
}

pub async fn run(dir: &Path, run_for: Option<Duration>, metrics_port: u16) -> ExitCode {
    match demo(dir, run_for, metrics_port).await {
        Ok(()) => ExitCode::SUCCESS,
        // Whoever read the output (`ehrsync demo | head`) stopped: so does the demo, as after
        // Ctrl-C (see `output::finish`).
        Err(DemoError::Output(e)) if output::reader_gone(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(super::EXIT_FAILURE)
        }
    }
}

async fn demo(dir: &Path, run_for: Option<Duration>, metrics_port: u16) -> Result<(), DemoError> {
    let files = |source| DemoError::Files {
        path: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(files)?;
    for name in [
        DB_FILE,
        &format!("{DB_FILE}-wal"),
        &format!("{DB_FILE}-shm"),
        KEY_FILE,
    ] {
        match std::fs::remove_file(dir.join(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(files(e)),
            _ => {}
        }
    }
    let sandbox = Sandbox::start(Arc::new(SystemClock), demo_lifetimes(), 0)
        .await
        .map_err(DemoError::Sandbox)?;
    sandbox.set_patients(PATIENTS);
    let listen = metrics_listen(metrics_port);
    let config_path = dir.join(CONFIG_FILE);
    std::fs::write(&config_path, demo_config(&sandbox, listen)).map_err(files)?;
    let env: Env = sandbox::credentials_env().into_iter().collect();
    let loaded = config::load_with_env(&config_path, &env)?;
    let login_env = env.clone();
    let table_config = config::load_with_env(&config_path, &env)?.config;
    // The demo's config names a file in `dir`.
    let db = match loaded.config.agent.database.file() {
        Some(path) => path.to_owned(),
        None => dir.join(DB_FILE),
    };

    output::print(format_args!(
        "ehrsync demo: the agent against the built-in vendor sandbox at http://{}\n\
         \x20 config    {}\n\
         \x20 database  {}\n\
         \x20 metrics   http://{listen}/metrics   (also /healthz, /readyz)\n\
         \x20 lifetimes Nextech 40 s, CareCentric 45 s, NikoHealth 30 s, Net Health 40 s; Nextech's refresh tokens are revoked at {} s\n\
         \x20 login     {PERSON_ACCOUNT} waits for a person; at {} s the demo logs in as one would with `ehrsync login {PERSON_ACCOUNT}`\n\
         \x20 {}\n\n",
        sandbox.addr(),
        config_path.display(),
        db.display(),
        REVOKE_AT.as_secs(),
        LOGIN_AT.as_secs(),
        match run_for {
            Some(d) => format!("runs for  {}, or until Ctrl-C", humantime::format_duration(d)),
            None => "runs until Ctrl-C".to_owned(),
        }
    ))
    .map_err(DemoError::Output)?;

    let mut signals = crate::signals::listen().map_err(DemoError::Signals)?;
    let (controls_tx, controls) = mpsc::unbounded_channel();
    let (metrics_tx, metrics_rx) = tokio::sync::oneshot::channel::<Metrics>();
    let agent = tokio::spawn(crate::agent::run(loaded.config, env, controls, move |m| {
        let _ = metrics_tx.send(m.clone());
    }));
    let Ok(metrics) = metrics_rx.await else {
        // The agent stopped before it was ready: its error says why.
        agent.await??;
        return Ok(());
    };

    let started = tokio::time::Instant::now();
    let mut table = tokio::time::interval_at(started + TABLE_EVERY, TABLE_EVERY);
    let mut changes = tokio::time::interval_at(started + CHANGE_EVERY, CHANGE_EVERY);
    let revoke = tokio::time::sleep(REVOKE_AT);
    tokio::pin!(revoke);
    let mut revoked = false;
    let login = tokio::time::sleep(LOGIN_AT);
    tokio::pin!(login);
    let mut login_started = false;
    let mut login_task = None;
    let end = run_for.map(|d| started + d);
    let mut changed = 0u64;
    let mut last_table = started;
    let mut unwritable = None;
    loop {
        tokio::select! {
            control = signals.recv() => match control {
                Some(Control::Reload) => continue,
                _ => break,
            },
            _ = sleep_until(end) => break,
            _ = &mut revoke, if !revoked => {
                revoked = true;
                sandbox.revoke_refresh_tokens(Vendor::Nextech);
                tracing::info!("demo: the sandbox revoked demo-nextech's refresh tokens (as a password change or the 14-day limit would); the next refresh fails and the agent logs in again");
            }
            _ = &mut login, if !login_started => {
                login_started = true;
                let (path, env) = (config_path.clone(), login_env.clone());
                login_task = Some(tokio::spawn(async move {
                    match log_in_as_a_person(&path, &env).await {
                        Ok(()) => tracing::info!(account = PERSON_ACCOUNT, "demo: logged in as a person would with `ehrsync login {PERSON_ACCOUNT}` (the sandbox consents at once); the agent picks the tokens up by itself"),
                        Err(e) => tracing::error!(account = PERSON_ACCOUNT, error = %e, "demo: the login failed"),
                    }
                }));
            }
            _ = changes.tick() => {
                let first = (changed * 7) % PATIENTS;
                sandbox.change_patients((0..3).map(|i| (first + i * 101) % PATIENTS));
                changed += 1;
            }
            _ = table.tick() => {
                if let Err(e) = print_table(&table_config, &db, &metrics, started.elapsed()).await {
                    unwritable = Some(e);
                    break;
                }
                last_table = tokio::time::Instant::now();
            }
        }
    }
    if let Some(task) = login_task {
        task.abort();
    }
    let _ = controls_tx.send(Control::Stop);
    agent.await??;
    if let Some(e) = unwritable {
        return Err(DemoError::Output(e));
    }
    if last_table.elapsed() > Duration::from_secs(2) {
        // The final state, unless a table was printed a moment ago.
        print_table(&table_config, &db, &metrics, started.elapsed())
            .await
            .map_err(DemoError::Output)?;
    }
    output::print(format_args!(
        "\nThe pulled records stay in {}; for example:\n  sqlite3 {} \"SELECT account, count(*) FROM patients GROUP BY account\"\n",
        db.display(),
        db.display()
    ))
    .map_err(DemoError::Output)
}

/// What `ehrsync login demo-nethealth` does, with the demo playing the person: it opens the
/// authorization address itself (the sandbox consents at once and redirects to the login's
/// loopback listener). The tokens are stored for the running agent to pick up.
async fn log_in_as_a_person(config_path: &Path, env: &Env) -> Result<(), String> {
    let config = config::load_with_env(config_path, env)
        .map_err(|e| e.to_string())?
        .config;
    let account = config
        .account(PERSON_ACCOUNT)
        .ok_or("the demo config has no Net Health account")?;
    let clock: crate::clock::SharedClock = Arc::new(SystemClock);
    let (shared, _) = crate::agent::open_engine(&config, env, clock)
        .await
        .map_err(|e| e.to_string())?;
    let ctx = crate::login::Context {
        http: &shared.http,
        discovery: &shared.discovery,
        clock: shared.clock.clone(),
        account,
    };
    let options = crate::login::Options {
        open_browser: false,
        port: None,
        timeout: Duration::from_secs(30),
    };
    let http = shared.http.clone();
    let mut person = |progress: crate::login::Progress<'_>| {
        if let crate::login::Progress::Authorize { url, .. } = progress {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move {
                // The authorization page redirects to the loopback listener; follow it once.
                let redirect = http.get(url).send().await.ok().and_then(|r| {
                    r.headers()
                        .get(reqwest::header::LOCATION)
                        .and_then(|l| l.to_str().ok())
                        .map(str::to_owned)
                });
                if let Some(callback) = redirect {
                    let _ = http.get(callback).send().await;
                }
            });
        }
    };
    let result = async {
        let logged_in = crate::login::authorization_code(&ctx, &options, &mut person)
            .await
            .map_err(|e| e.to_string())?;
        crate::token::owner::store_login(&shared, account, logged_in.response, logged_in.sent_at)
            .await
    }
    .await;
    shared.store.clone().close().await;
    result.map(|_| ())
}

async fn sleep_until(end: Option<tokio::time::Instant>) {
    match end {
        Some(end) => tokio::time::sleep_until(end).await,
        None => std::future::pending().await,
    }
}

/// `127.0.0.1:{port}` if it is free, else a free port.
fn metrics_listen(port: u16) -> std::net::SocketAddr {
    let free = std::net::TcpListener::bind(("127.0.0.1", port))
        .or_else(|_| std::net::TcpListener::bind(("127.0.0.1", 0)))
        .and_then(|l| l.local_addr());
    free.unwrap_or_else(|_| std::net::SocketAddr::from(([127, 0, 0, 1], port)))
}

fn demo_config(sandbox: &Sandbox, listen: std::net::SocketAddr) -> String {
    let mut text = format!(
        "# Written by `ehrsync demo` for its sandbox on this run's ports; rewritten each run.\n\
         [agent]\ndatabase = '{DB_FILE}'\ntoken_key = {{ file = '{KEY_FILE}' }}\nmetrics_listen = '{listen}'\nshutdown_grace = '5s'\n\n"
    );
    for (vendor, name, schedule) in ACCOUNTS {
        text.push_str(&sandbox.account_config(vendor, name));
        if let Some(schedule) = schedule {
            let kind = match vendor {
                Vendor::NikoHealth => "kind = 'nikohealth_patients'",
                _ => "kind = 'fhir'\nresource = 'Patient'\noverlap = '0s'",
            };
            text.push_str(&format!(
                "\n[[accounts.{name}.jobs]]\nname = 'patients'\n{kind}\nschedule = '{schedule}'\npage_size = 100\n"
            ));
        }
        text.push('\n');
    }
    text
}

/// One line per account: state, token time left, logins and refreshes so far, patients stored,
/// and the last pull.
async fn print_table(
    config: &config::Config,
    db: &Path,
    metrics: &Metrics,
    elapsed: Duration,
) -> std::io::Result<()> {
    let now = Utc::now();
    let report = match status::build(config, now).await {
        Ok(r) => r,
        Err(e) => return output::print(format_args!("(status unavailable: {e})\n")),
    };
    let counts = patient_counts(db).await;
    let mut rows = vec![
        [
            "ACCOUNT",
            "STATE",
            "TOKEN",
            "LOGINS",
            "REFRESHES",
            "PATIENTS",
            "LAST PULL",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for a in &report.accounts {
        let token = match a.token_expires() {
            Some(t) if t > now => format!(
                "{} left",
                status::relative(t, now).trim_start_matches("in ")
            ),
            Some(_) => "expired".to_owned(),
            None => "-".to_owned(),
        };
        let logins: u64 = ["password", "client_credentials", "authorization_code"]
            .iter()
            .map(|g| metrics.token_requests(&a.name, g, "success"))
            .sum();
        let refreshes = metrics.token_requests(&a.name, "refresh_token", "success");
        let patients = counts
            .iter()
            .find(|(account, _)| *account == a.name)
            .map_or(0, |(_, n)| *n);
        let last = a
            .jobs
            .first()
            .and_then(|j| j.last_run.as_ref())
            .map_or_else(
                || "-".to_owned(),
                |r| {
                    let ago = r
                        .started()
                        .map(|t| status::relative(t, now))
                        .unwrap_or_default();
                    format!("{} {} records {ago}", r.outcome, r.records)
                },
            );
        rows.push(vec![
            a.name.clone(),
            a.state.clone(),
            token,
            logins.to_string(),
            refreshes.to_string(),
            patients.to_string(),
            last,
        ]);
    }
    let secs = elapsed.as_secs();
    output::print(format_args!(
        "── ehrsync demo, {}:{:02} ──\n{}",
        secs / 60,
        secs % 60,
        status::Table(&rows)
    ))
}

/// Patients stored per account (the `patients` view), read alongside the running agent.
async fn patient_counts(db: &Path) -> Vec<(String, i64)> {
    let Ok(Some(store)) = Store::open_read_only(db).await else {
        return Vec::new();
    };
    let counts = crate::store::backend::on!(store.db(), pool, d =>
        d::query_as("SELECT account, count(*) FROM patients GROUP BY account")
            .fetch_all(pool)
            .await
            .unwrap_or_default());
    store.close().await;
    counts
}
