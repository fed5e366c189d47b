//! `ehrsync run`: every account's token owner, plus the HTTP listener for `/metrics`,
//! `/healthz` (the process is alive) and `/readyz` (200 only when every account holds a valid
//! token), and each job's schedule. Runs until `shutdown` resolves, then stops the jobs (each
//! finishing its page), then the owners, and returns.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State as AxumState;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::watch;

use crate::clock::{SharedClock, SystemClock};
use crate::config::{Config, Env};
use crate::crypto::{KeyError, TokenCipher};
use crate::metrics::Metrics;
use crate::scheduler;
use crate::store::{Store, StoreError};
use crate::sync::{JobRunner, SyncShared, api_client};
use crate::token::client::http_client;
use crate::token::owner::{Shared, TokenHandle, spawn};

/// How long a token request may take before it counts as a transient failure.
pub const TOKEN_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("cannot listen on {addr} for metrics: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot set up the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("cannot set up metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

#[derive(Clone)]
struct Web {
    handles: Arc<Vec<TokenHandle>>,
    metrics: Metrics,
    clock: SharedClock,
}

/// Opens what token owners and job runners share: the store (migrated), the token key, the
/// HTTP clients and the metrics registry.
pub async fn open_engine(
    config: &Config,
    env: &Env,
    clock: SharedClock,
) -> Result<(Shared, SyncShared), AgentError> {
    let store = Store::open(&config.agent.database).await?;
    let cipher = TokenCipher::load(&config.agent.token_key, env)?;
    let shared = Shared::new(
        store.clone(),
        cipher,
        http_client(TOKEN_REQUEST_TIMEOUT)?,
        clock.clone(),
        Metrics::new()?,
    );
    let sync = SyncShared {
        store,
        http: api_client()?,
        clock,
        metrics: shared.metrics.clone(),
        holder: shared.holder.clone(),
    };
    Ok((shared, sync))
}

/// Runs the agent for `config` until `shutdown` completes.
pub async fn run(
    config: Config,
    env: &Env,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    let clock: SharedClock = Arc::new(SystemClock);
    let (shared, sync) = open_engine(&config, env, clock.clone()).await?;
    let store = shared.store.clone();
    let listen = config.agent.metrics_listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| AgentError::Listen {
            addr: listen,
            source,
        })?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let (jobs_stop_tx, jobs_stop_rx) = watch::channel(false);
    let mut handles = Vec::new();
    let mut tasks = Vec::new();
    let mut schedulers = Vec::new();
    for account in config.accounts {
        let account = Arc::new(account);
        let (handle, task) = spawn(account.clone(), shared.clone(), stop_rx.clone()).await?;
        for job in &account.jobs {
            let runner = JobRunner {
                account: account.clone(),
                job: job.clone(),
                tokens: handle.clone(),
                shared: sync.clone(),
            };
            schedulers.push(schedule_job(runner, jobs_stop_rx.clone()).await?);
        }
        handles.push(handle);
        tasks.push(task);
    }
    let web = Web {
        handles: Arc::new(handles),
        metrics: shared.metrics.clone(),
        clock,
    };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(web);
    tracing::info!(listen = %listen, accounts = tasks.len(), jobs = schedulers.len(), "ehrsync is running");

    let mut server_stop = stop_rx.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        // Stops when the owners are told to stop.
        let _ = server_stop.wait_for(|stop| *stop).await;
    });
    let server = tokio::spawn(async move { server.await });
    shutdown.await;
    tracing::info!("stopping");
    // Jobs stop first (a run abandons the page it is fetching, finishes the one it is writing
    // and records itself interrupted), while the token owners still serve them; then the owners. Receivers are held by the tasks being stopped;
    // if they are all gone there is nothing to do.
    let _ = jobs_stop_tx.send(true);
    for task in schedulers {
        let _ = task.await;
    }
    let _ = stop_tx.send(true);
    for task in tasks {
        let _ = task.await;
    }
    let _ = server.await;
    store.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// Starts `runner`'s schedule: a run at once if one was missed while the agent was down (or the
/// job never ran), then one per occurrence, skipping (and counting) occurrences that find the
/// previous run still going.
pub async fn schedule_job(
    runner: JobRunner,
    stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, StoreError> {
    let (account, job) = (runner.account.name.to_string(), runner.job.name.to_string());
    let clock = runner.shared.clock.clone();
    let last = runner.shared.store.last_run_started(&account, &job).await?;
    let due = scheduler::missed(&runner.job.schedule, last, clock.now());
    if due {
        tracing::info!(account = %account, job = %job, "running the job now: it never ran, or missed a run while ehrsync was down");
    }
    let schedule = runner.job.schedule.clone();
    let runner = Arc::new(runner);
    let (run_stop, skipping) = (stop.clone(), runner.clone());
    let start = move || {
        let (runner, stop) = (runner.clone(), run_stop.clone());
        async move {
            runner.run_once(false, &stop).await;
        }
    };
    let skipped = move |due| skipping.skipped(due);
    Ok(tokio::spawn(scheduler::drive(
        schedule, clock, stop, due, start, skipped,
    )))
}

async fn metrics(AxumState(web): AxumState<Web>) -> impl IntoResponse {
    // Validity changes at expiry without any event: recompute it for every scrape.
    let now = web.clock.now();
    for h in web.handles.iter() {
        let valid = h.snapshot().token.is_some_and(|t| now < t.expires_at);
        web.metrics
            .token_valid
            .with_label_values(&[h.account()])
            .set(i64::from(valid));
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        web.metrics.render(),
    )
}

async fn readyz(AxumState(web): AxumState<Web>) -> impl IntoResponse {
    let now = web.clock.now();
    let not_ready: Vec<String> = web
        .handles
        .iter()
        .filter_map(|h| {
            let snap = h.snapshot();
            let valid = snap.token.as_ref().is_some_and(|t| now < t.expires_at);
            (!valid).then(|| format!("{}: {}", h.account(), snap.state.as_str()))
        })
        .collect();
    if not_ready.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready:\n{}\n", not_ready.join("\n")),
        )
    }
}

/// Resolves on SIGINT (Ctrl-C) or, on Unix, SIGTERM.
pub async fn termination_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; stopping on Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
