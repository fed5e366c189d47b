//! `ehrsync run`: every account's token owner, each job's schedule, and the HTTP listener for
//! `/metrics`, `/healthz`, `/readyz` and the status page (`/`, `/status.json`), steered by [`Control`] messages (signals, or a Windows
//! service stop):
//!
//! - **Stop**: jobs stop first, while the token owners still serve them. A run abandons the
//!   page it is fetching, finishes the one it is writing and records itself `interrupted`; a
//!   run still writing when `agent.shutdown_grace` ends is cut off (its transaction rolls
//!   back) and recorded `interrupted` here. Then the owners stop (token state is stored on
//!   every change, so nothing is left to save) and their leases are released.
//! - **Reload**: the config is read again. A bad one is rejected with its problems logged and
//!   counted, and the running config stays. A good one is compared with what runs
//!   ([`plan`]): only accounts and jobs that changed are stopped and started, so unchanged
//!   accounts keep their owners and tokens.

mod plan;
pub mod share;
mod web;

pub use plan::{Change, plan};

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::clock::{SharedClock, SystemClock};
use crate::config::{self, Account, Config, Env, Job};
use crate::crypto::{KeyError, TokenCipher};
use crate::metrics::Metrics;
use crate::notify;
use crate::scheduler;
use crate::signals::Control;
use crate::store::{Prepared, Store, StoreError};
use crate::sync::{JobRunner, SyncShared, api_client};
use crate::token::client::http_client;
use crate::token::owner::{Shared, TokenHandle, spawn};

/// How long a stop waits for the database's connections to close after the jobs and owners.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How often a running agent renews its row in `agents` (see [`crate::store::AgentRow`]).
pub const HEARTBEAT: Duration = Duration::from_secs(15);
/// An agent whose heartbeat is older than this is not running (three missed heartbeats).
pub const HEARTBEAT_STALE: Duration = Duration::from_secs(45);

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
    Http(#[from] crate::http::ClientSetupError),
    #[error("cannot set up metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("agent.ca_file: {0}")]
    CaFile(String),
    #[error(transparent)]
    Broker(#[from] crate::broker::server::ListenError),
}

/// Opens what token owners and job runners share: the store (migrated), the token key, the
/// HTTP clients and the metrics registry.
pub async fn open_engine(
    config: &Config,
    env: &Env,
    clock: SharedClock,
) -> Result<(Shared, SyncShared), AgentError> {
    if let Some(path) = &config.agent.ca_file {
        let n = crate::http::trust_extra_roots(path).map_err(AgentError::CaFile)?;
        tracing::info!(path = %path.display(), certificates = n, "trusting the extra certificate authorities of agent.ca_file");
    }
    let store = Store::open(&config.agent.database).await?;
    let cipher = TokenCipher::load(&config.agent.token_key, env)?;
    let shared = Shared::new(
        store.clone(),
        cipher,
        http_client(TOKEN_REQUEST_TIMEOUT)?,
        clock.clone(),
        Metrics::new()?,
    )
    .with_config_path(&config.path);
    let prepared = store
        .prepare_views(&config.views, clock.now().unix_seconds())
        .await?;
    for p in prepared {
        match p {
            Prepared::Current { .. } => {}
            Prepared::Built {
                name,
                records,
                rows,
            } => tracing::info!(view = %name, records, rows,
                "built the view's table from the stored records (new or changed definition)"),
            Prepared::Dropped { name } => {
                tracing::info!(view = %name, "dropped the table of a view no longer configured")
            }
        }
    }
    let sync = SyncShared {
        views: config.views.clone(),
        changes_retention: config.agent.changes_retention,
        ..SyncShared::new(&shared, api_client()?)
    };
    Ok((shared, sync))
}

/// Runs the agent for `config` until a [`Control::Stop`] arrives (or every sender is gone).
/// `env` is what the config was read with; a reload reads `config.path` with it again.
/// `on_ready` is called once the database is open, the listener bound and the owners started.
pub async fn run(
    config: Config,
    env: Env,
    mut controls: mpsc::UnboundedReceiver<Control>,
    on_ready: impl FnOnce(&Metrics),
) -> Result<(), AgentError> {
    let clock: SharedClock = Arc::new(SystemClock);
    let (shared, sync) = open_engine(&config, &env, clock.clone()).await?;
    let store = shared.store.clone();
    let listen = config.agent.metrics_listen;
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(source) => {
            store.close().await;
            return Err(AgentError::Listen {
                addr: listen,
                source,
            });
        }
    };
    let holder = shared.holder.clone();
    let version = env!("CARGO_PKG_VERSION");
    if let Err(e) = store
        .register_agent(&holder, version, clock.now().unix_seconds())
        .await
    {
        tracing::warn!(error = %e, "cannot record this agent in the database; `status` will say no agent is running");
    }
    let heartbeat = tokio::spawn(heartbeat(
        store.clone(),
        holder.clone(),
        clock.clone(),
        version,
    ));
    // The division of accounts between agents sharing the database: looked at once before
    // the accounts start, so that each starts knowing whether it is this agent's.
    let configured: Vec<String> = config.accounts.iter().map(|a| a.name.to_string()).collect();
    let (names_tx, names_rx) = watch::channel(configured.clone());
    let mut claimer = share::Claimer::new(
        store.clone(),
        holder.clone(),
        clock.clone(),
        shared.metrics.clone(),
        shared.ownership.clone(),
    );
    match claimer.round(&configured).await {
        Ok(round) => tracing::info!(
            owned = round.owned,
            live_agents = round.live_agents,
            "this agent owns {} of {} accounts",
            round.owned,
            configured.len()
        ),
        Err(e) => {
            tracing::warn!(error = %e, "cannot claim account ownership yet; every account may be refreshed by this agent until the database answers")
        }
    }
    let (claimer_stop_tx, claimer_stop) = watch::channel(false);
    let claimer = tokio::spawn(claimer.run(names_rx, claimer_stop));
    let (handles_tx, handles_rx) = watch::channel(Arc::new(Vec::new()));
    let (served_tx, served_rx) = watch::channel(crate::broker::ServedAccounts::default());
    let (clients_tx, clients_rx) = watch::channel(Arc::new(
        config
            .broker
            .as_ref()
            .map(|b| b.clients.clone())
            .unwrap_or_default(),
    ));
    let (config_tx, config_rx) = watch::channel(Arc::new(Config {
        path: config.path.clone(),
        env_overrides: config.env_overrides.clone(),
        agent: config.agent.clone(),
        accounts: config.accounts.clone(),
        views: config.views.clone(),
        broker: config.broker.clone(),
    }));
    let started = chrono::DateTime::from_timestamp_millis(clock.now().unix_millis())
        .unwrap_or_else(chrono::Utc::now);
    let mut agent = Agent {
        shared,
        sync,
        accounts: BTreeMap::new(),
        handles: handles_tx,
        served: served_tx,
        clients: clients_tx,
        broker: config.broker.clone(),
        config: config_tx,
        path: config.path.clone(),
        env,
        settings: config.agent.clone(),
        cleanup: JoinSet::new(),
        names: names_tx,
    };
    for account in config.accounts {
        if let Err(e) = agent.start_account(account).await {
            agent.shutdown().await;
            heartbeat.abort();
            claimer.abort();
            let _ = store.unregister_agent(&holder).await;
            store.close().await;
            return Err(e.into());
        }
    }
    agent.publish();
    let metrics = agent.shared.metrics.clone();
    metrics.config_loaded(true, clock.now().unix_seconds_f64(), false);

    let broker = match &config.broker {
        None => None,
        Some(settings) => {
            let broker = crate::broker::Broker::new(
                clients_rx,
                served_rx,
                settings.proxy_timeout,
                metrics.clone(),
                clock.clone(),
            )?;
            match crate::broker::server::listen(settings, broker.router()).await {
                Ok(listening) => {
                    tracing::info!(listen = %listening.address, clients = settings.clients.len(),
                        "the token broker is listening");
                    Some((broker, listening))
                }
                Err(e) => {
                    agent.shutdown().await;
                    heartbeat.abort();
                    claimer.abort();
                    let _ = store.unregister_agent(&holder).await;
                    store.close().await;
                    return Err(e.into());
                }
            }
        }
    };
    let usage_flush = broker
        .as_ref()
        .map(|(b, _)| tokio::spawn(crate::broker::flush_usage(b.clone(), store.clone())));

    let (server_stop_tx, mut server_stop) = watch::channel(false);
    let app = web::router(
        handles_rx,
        metrics.clone(),
        clock,
        web::StatusSource {
            config: config_rx,
            store: store.clone(),
            holder: holder.clone(),
            started,
            broker: broker.as_ref().map(|(b, _)| b.clone()),
        },
    );
    let server = tokio::spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = server_stop.wait_for(|stop| *stop).await;
        });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "the metrics listener stopped");
        }
    });
    let status = agent.status();
    tracing::info!(listen = %listen, "ehrsync is running: {status}");
    notify::ready(&status);
    let watchdog = notify::spawn_watchdog();
    on_ready(&metrics);

    while let Some(Control::Reload) = controls.recv().await {
        agent.reload().await;
    }

    let grace = agent.settings.shutdown_grace;
    tracing::info!(grace = %humantime::format_duration(grace), "stopping");
    notify::stopping("stopping: runs in progress finish their page");
    // The broker first: its clients get no answers from accounts that are stopping.
    if let Some((broker, listening)) = broker {
        listening.stop(CLOSE_TIMEOUT).await;
        if let Some(task) = usage_flush {
            task.abort();
        }
        crate::broker::store_usage(&broker, &store).await;
    }
    agent.shutdown().await;
    let cleanup = std::mem::take(&mut agent.cleanup);
    if tokio::time::timeout(CLOSE_TIMEOUT, cleanup.join_all())
        .await
        .is_err()
    {
        tracing::warn!(
            "could not record every cut-off run in time; the next run of each job marks it interrupted"
        );
    }
    // The accounts given up, for the other agents to take over at once.
    let _ = claimer_stop_tx.send(true);
    if tokio::time::timeout(CLOSE_TIMEOUT, claimer).await.is_err() {
        tracing::warn!(
            "could not give the accounts up in time; their ownership expires on its own"
        );
    }
    let _ = server_stop_tx.send(true);
    let _ = server.await;
    if let Some(w) = watchdog {
        w.abort();
    }
    heartbeat.abort();
    if let Err(e) = store.unregister_agent(&holder).await {
        tracing::warn!(error = %e, "cannot remove this agent's row; `status` will see its heartbeat go stale");
    }
    // A run cut off at the end of the grace may still hold a connection, waiting for a lock.
    if tokio::time::timeout(CLOSE_TIMEOUT, store.close())
        .await
        .is_err()
    {
        tracing::warn!(
            "the database did not close in time; exiting anyway (SQLite rolls back what was unfinished)"
        );
    }
    tracing::info!("stopped");
    Ok(())
}

/// Renews this agent's row every [`HEARTBEAT`], writing it again if it went missing (a
/// database restored from a backup, say). Runs until aborted.
async fn heartbeat(
    store: Store,
    holder: Arc<crate::store::Holder>,
    clock: SharedClock,
    version: &'static str,
) {
    loop {
        tokio::time::sleep(HEARTBEAT).await;
        let now = clock.now().unix_seconds();
        match store.heartbeat(&holder, now).await {
            Ok(true) => {}
            Ok(false) => {
                if let Err(e) = store.register_agent(&holder, version, now).await {
                    tracing::warn!(error = %e, "cannot record this agent's heartbeat");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot record this agent's heartbeat"),
        }
    }
}

/// What runs: one token owner per account, one schedule per job.
struct Agent {
    shared: Shared,
    sync: SyncShared,
    accounts: BTreeMap<String, AccountRun>,
    handles: watch::Sender<Arc<Vec<TokenHandle>>>,
    /// The accounts the broker serves (published with `handles`).
    served: watch::Sender<crate::broker::ServedAccounts>,
    /// The broker's clients (a reload replaces them).
    clients: watch::Sender<Arc<Vec<config::BrokerClient>>>,
    /// `[broker]` as started (where it listens cannot change without a restart).
    broker: Option<config::BrokerSettings>,
    /// The config in force, for the status page: the last accepted one, with the `[agent]`
    /// settings that are in effect (those a reload cannot change stay as started).
    config: watch::Sender<Arc<Config>>,
    /// Where the config came from, and the environment it was read with (for reloads).
    path: PathBuf,
    env: Env,
    /// The `[agent]` settings in force (a reload applies only `shutdown_grace`).
    settings: config::Agent,
    /// Recording runs that were cut off (their rows, their leases): owned here, so a stop
    /// waits for them (bounded) instead of leaving them detached, and a reload does not wait
    /// for them past its grace (the database may be what held the run up).
    cleanup: JoinSet<()>,
    /// The accounts that run, for the claimer dividing them between agents (`share`).
    names: watch::Sender<Vec<String>>,
}

struct AccountRun {
    /// The account as last configured (its `jobs` may be newer than the owner's copy).
    account: Arc<Account>,
    handle: TokenHandle,
    stop: watch::Sender<bool>,
    owner: JoinHandle<()>,
    /// Writes the account's token files, when it has any (stopped with the owner).
    files: Option<JoinHandle<()>>,
    jobs: BTreeMap<String, JobRun>,
}

struct JobRun {
    job: Job,
    stop: watch::Sender<bool>,
    /// The schedule's task; aborting it aborts the run in progress (see `scheduler::drive`).
    task: JoinHandle<()>,
    runner: Arc<JobRunner>,
}

impl Agent {
    async fn start_account(&mut self, account: Account) -> Result<(), StoreError> {
        let name = account.name.to_string();
        let account = Arc::new(account);
        let (stop, stop_rx) = watch::channel(false);
        let (handle, owner) = spawn(account.clone(), self.shared.clone(), stop_rx.clone()).await?;
        let files = (!account.token_files.is_empty()).then(|| {
            tokio::spawn(crate::broker::files::keep(
                account.clone(),
                handle.clone(),
                self.shared.metrics.clone(),
                stop_rx,
            ))
        });
        let mut run = AccountRun {
            account: account.clone(),
            handle,
            stop,
            owner,
            files,
            jobs: BTreeMap::new(),
        };
        for job in &account.jobs {
            let job_run = self.start_job(&run, job.clone()).await;
            match job_run {
                Ok(j) => {
                    run.jobs.insert(job.name.to_string(), j);
                }
                Err(e) => {
                    self.stop_accounts(vec![run]).await;
                    return Err(e);
                }
            }
        }
        self.accounts.insert(name, run);
        Ok(())
    }

    async fn start_job(&self, account: &AccountRun, job: Job) -> Result<JobRun, StoreError> {
        let (stop, stop_rx) = watch::channel(false);
        let runner = Arc::new(JobRunner::new(
            account.account.clone(),
            job.clone(),
            account.handle.clone(),
            self.sync.clone(),
        ));
        let task = schedule_job(runner.clone(), stop_rx).await?;
        Ok(JobRun {
            job,
            stop,
            task,
            runner,
        })
    }

    /// Stops `jobs` (account name, job name, run) together: each finishes the page it is
    /// writing, within one shutdown grace for all of them. A run still going when the grace
    /// ends is aborted with its schedule; recording it happens in the background (`cleanup`),
    /// so this returns within the grace.
    async fn stop_jobs(&mut self, jobs: Vec<(String, String, JobRun)>) {
        // Forget the cut-off records already written (their tasks have ended).
        while self.cleanup.try_join_next().is_some() {}
        for (_, _, run) in &jobs {
            let _ = run.stop.send(true);
        }
        let grace = self.settings.shutdown_grace;
        let deadline = tokio::time::Instant::now() + grace;
        for (account, job, run) in jobs {
            let mut task = run.task;
            if tokio::time::timeout_at(deadline, &mut task).await.is_ok() {
                continue;
            }
            task.abort();
            let _ = task.await;
            tracing::warn!(account = %account, job = %job, grace = %humantime::format_duration(grace),
                "the run did not finish its page within the shutdown grace; it was cut off and its page rolled back");
            let runner = run.runner;
            self.cleanup.spawn(async move {
                runner
                    .cut_off("cut off at shutdown: the page being written did not commit within agent.shutdown_grace")
                    .await;
            });
        }
    }

    /// Stops whole accounts: all their jobs first (one grace for all), then their owners.
    async fn stop_accounts(&mut self, runs: Vec<AccountRun>) {
        let mut jobs = Vec::new();
        let mut owners = Vec::new();
        for run in runs {
            let name = run.account.name.to_string();
            for (job, j) in run.jobs {
                jobs.push((name.clone(), job, j));
            }
            owners.push((run.stop, run.owner, run.files));
        }
        self.stop_jobs(jobs).await;
        for (stop, _, _) in &owners {
            let _ = stop.send(true);
        }
        for (_, owner, files) in owners {
            let _ = owner.await;
            if let Some(files) = files {
                let _ = files.await;
            }
        }
    }

    /// Stops everything.
    async fn shutdown(&mut self) {
        let runs = std::mem::take(&mut self.accounts).into_values().collect();
        self.stop_accounts(runs).await;
        self.publish();
    }

    /// Tells the web listener which accounts run.
    fn publish(&self) {
        let handles = self.accounts.values().map(|a| a.handle.clone()).collect();
        self.handles.send_replace(Arc::new(handles));
        let served = self
            .accounts
            .iter()
            .map(|(name, a)| {
                let served = crate::broker::Served {
                    account: a.account.clone(),
                    handle: a.handle.clone(),
                };
                (name.clone(), served)
            })
            .collect();
        self.served.send_replace(Arc::new(served));
        self.names
            .send_replace(self.accounts.keys().cloned().collect());
    }

    /// One line for logs and `systemctl status`.
    fn status(&self) -> String {
        let jobs: usize = self.accounts.values().map(|a| a.jobs.len()).sum();
        let n = self.accounts.len();
        let plural = |count: usize| if count == 1 { "" } else { "s" };
        format!("{n} account{}, {jobs} job{}", plural(n), plural(jobs))
    }

    /// Re-reads the config and applies what changed; a bad config changes nothing.
    async fn reload(&mut self) {
        notify::reloading();
        let metrics = self.shared.metrics.clone();
        let now = self.sync.clock.now().unix_seconds_f64();
        let loaded = match config::load_with_env(&self.path, &self.env) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("config reload rejected; the running config stays in use. {e}");
                metrics.config_loaded(false, now, true);
                notify::ready(&format!(
                    "{}; the last reload was rejected (see the log)",
                    self.status()
                ));
                return;
            }
        };
        for w in &loaded.warnings {
            tracing::warn!(key = %w.key, "{}", w.message);
        }
        let config = loaded.config;
        self.apply_agent_settings(&config.agent);
        self.apply_broker_settings(config.broker.as_ref());
        let in_force = Arc::new(Config {
            path: config.path.clone(),
            env_overrides: config.env_overrides.clone(),
            agent: self.settings.clone(),
            accounts: config.accounts.clone(),
            views: self.sync.views.clone(),
            broker: self.broker.clone(),
        });
        if config.views.fingerprints() != self.sync.views.fingerprints() {
            tracing::warn!(
                "the [[views]] changed; views are read at start: restart the agent to apply them"
            );
        }
        let changes = plan(
            self.accounts
                .values()
                .map(|a| (&*a.account, a.jobs.values().map(|j| &j.job).collect())),
            &config.accounts,
        );
        let unchanged = self
            .accounts
            .keys()
            .filter(|name| !changes.iter().any(|c| c.account() == name.as_str()))
            .count();
        let failed = self.apply(changes.clone(), config.accounts).await;
        self.publish();
        self.config.send_replace(in_force);
        metrics.config_loaded(failed == 0, now, true);
        let status = self.status();
        if failed == 0 {
            tracing::info!(
                changes = changes.len(),
                unchanged_accounts = unchanged,
                "config reloaded: {status}"
            );
        } else {
            tracing::error!(
                failed,
                "config reloaded with {failed} changes that could not be applied (see above): {status}"
            );
        }
        notify::ready(&status);
    }

    /// A reload replaces the broker's clients (keys, accounts, endpoints); where and how it
    /// listens, and whether it runs at all, wait for a restart.
    fn apply_broker_settings(&mut self, new: Option<&config::BrokerSettings>) {
        match (&mut self.broker, new) {
            (Some(old), Some(new)) => {
                let listening = old.listen != new.listen
                    || old.socket_mode != new.socket_mode
                    || old.socket_group != new.socket_group
                    || old.proxy_timeout != new.proxy_timeout;
                if listening {
                    tracing::warn!(
                        key = "broker",
                        "where and how the broker listens changed in the config; it takes effect when ehrsync restarts"
                    );
                }
                if old.clients != new.clients {
                    tracing::info!(
                        clients = new.clients.len(),
                        "the broker's clients changed; applied"
                    );
                    old.clients = new.clients.clone();
                    self.clients.send_replace(Arc::new(new.clients.clone()));
                }
            }
            (None, None) => {}
            _ => tracing::warn!(
                key = "broker",
                "[broker] was added or removed in the config; it takes effect when ehrsync restarts"
            ),
        }
    }

    fn apply_agent_settings(&mut self, new: &config::Agent) {
        let old = &self.settings;
        for (key, changed) in [
            ("agent.database", old.database != new.database),
            (
                "agent.metrics_listen",
                old.metrics_listen != new.metrics_listen,
            ),
            ("agent.token_key", old.token_key != new.token_key),
            (
                "agent.changes_retention",
                old.changes_retention != new.changes_retention,
            ),
        ] {
            if changed {
                tracing::warn!(
                    key,
                    "changed in the config; it takes effect when ehrsync restarts"
                );
            }
        }
        self.settings.shutdown_grace = new.shutdown_grace;
    }

    /// Applies `changes` (from [`plan`]) with the accounts of the new config; returns how many
    /// could not be applied (each is logged).
    async fn apply(&mut self, changes: Vec<Change>, new: Vec<Account>) -> usize {
        let mut new: BTreeMap<String, Account> =
            new.into_iter().map(|a| (a.name.to_string(), a)).collect();
        let metrics = self.sync.metrics.clone();
        // Stops first, all within one grace.
        let mut stopped_accounts = Vec::new();
        let mut stopped_jobs = Vec::new();
        let mut forget = Vec::new();
        let mut starts = Vec::new();
        for change in changes {
            match change {
                Change::RemoveAccount(name) => {
                    if let Some(run) = self.accounts.remove(&name) {
                        tracing::info!(account = %name, "account removed from the config: stopping it");
                        metrics.forget_account(&name);
                        for job in run.jobs.keys() {
                            metrics.forget_job(&name, job);
                        }
                        stopped_accounts.push(run);
                    }
                }
                Change::RestartAccount {
                    account: name,
                    identity_changed,
                } => {
                    if let Some(run) = self.accounts.remove(&name) {
                        tracing::info!(account = %name, identity_changed,
                            "account settings changed: restarting its token owner and jobs");
                        for job in run.jobs.keys() {
                            metrics.forget_job(&name, job);
                        }
                        if identity_changed {
                            forget.push(name.clone());
                        }
                        stopped_accounts.push(run);
                        starts.push(Change::AddAccount(name));
                    }
                }
                Change::StopJob {
                    account,
                    job,
                    restart,
                } => {
                    let run = self
                        .accounts
                        .get_mut(&account)
                        .and_then(|a| a.jobs.remove(&job));
                    if let Some(run) = run {
                        tracing::info!(account = %account, job = %job,
                            "{}", if restart { "job changed: restarting it" } else { "job removed from the config: stopping it" });
                        metrics.forget_job(&account, &job);
                        stopped_jobs.push((account, job, run));
                    }
                }
                start @ (Change::AddAccount(_) | Change::StartJob { .. }) => starts.push(start),
            }
        }
        // Token files of removed accounts, and those a restarted account no longer lists.
        let unlisted: Vec<(String, Vec<config::TokenFile>)> = stopped_accounts
            .iter()
            .map(|run| {
                let name = run.account.name.to_string();
                let keep = new
                    .get(&name)
                    .map(|a| a.token_files.as_slice())
                    .unwrap_or(&[]);
                let gone = run
                    .account
                    .token_files
                    .iter()
                    .filter(|f| !keep.iter().any(|k| k.path == f.path))
                    .cloned()
                    .collect();
                (name, gone)
            })
            .collect();
        self.stop_jobs(stopped_jobs).await;
        self.stop_accounts(stopped_accounts).await;
        for (name, files) in unlisted {
            crate::broker::files::remove(&name, &files);
        }
        let mut failed = 0;
        for name in forget {
            if let Err(e) = self.shared.store.forget_tokens(&name).await {
                tracing::error!(account = %name, error = %e, "cannot drop the tokens of the account's previous login");
                failed += 1;
            }
        }
        for start in starts {
            match start {
                Change::AddAccount(name) => {
                    let Some(account) = new.remove(&name) else {
                        continue;
                    };
                    tracing::info!(account = %name, "starting the account");
                    if let Err(e) = self.start_account(account).await {
                        tracing::error!(account = %name, error = %e, "cannot start the account");
                        failed += 1;
                    }
                }
                Change::StartJob { account, job } => {
                    let Some(next) = new.get(&account) else {
                        continue;
                    };
                    let Some(spec) = next.jobs.iter().find(|j| j.name.as_str() == job) else {
                        continue;
                    };
                    let Some(run) = self.accounts.get(&account) else {
                        continue;
                    };
                    tracing::info!(account = %account, job = %job, "starting the job");
                    match self.start_job(run, spec.clone()).await {
                        Ok(j) => {
                            if let Some(run) = self.accounts.get_mut(&account) {
                                run.jobs.insert(job, j);
                            }
                        }
                        Err(e) => {
                            tracing::error!(account = %account, job = %job, error = %e, "cannot start the job");
                            failed += 1;
                        }
                    }
                }
                _ => {}
            }
        }
        // Accounts that keep their owner adopt the new config's copy, so the next reload
        // compares against it (their settings are equal; only the jobs list may differ).
        for (name, account) in new {
            if let Some(run) = self.accounts.get_mut(&name)
                && run.account.same_settings(&account)
            {
                run.account = Arc::new(account);
            }
        }
        failed
    }
}

/// Starts `runner`'s schedule: a run at once if one was missed while the agent was down (or the
/// job never ran), then one per occurrence, skipping (and counting) occurrences that find the
/// previous run still going.
pub async fn schedule_job(
    runner: Arc<JobRunner>,
    stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, StoreError> {
    let (account, job) = (runner.account.name.to_string(), runner.job.name.to_string());
    let clock = runner.shared.clock.clone();
    let history = runner.shared.store.job_history(&account, &job).await?;
    let now = clock.now();
    let reason = scheduler::run_at_start(
        &runner.job.schedule,
        history.last_started,
        history.last_outcome,
        now,
    );
    let due = reason.is_some();
    if let Some(reason) = reason {
        tracing::info!(account = %account, job = %job, reason = reason.as_str(),
            "running the job now: {}", reason.explain());
    }
    let metrics = &runner.shared.metrics;
    let labels = [account.as_str(), job.as_str()];
    if let Some(at) = history.last_success {
        metrics
            .sync_last_success
            .with_label_values(&labels)
            .set(at as f64);
    }
    if let Some(gap) = chrono::DateTime::from_timestamp_millis(now.unix_millis())
        .and_then(|now| runner.job.schedule.longest_gap(now))
    {
        metrics
            .sync_interval
            .with_label_values(&labels)
            .set(gap.as_secs_f64());
    }
    let (schedule, reconcile) = (runner.job.schedule.clone(), runner.job.reconcile.clone());
    let (run_stop, skipping) = (stop.clone(), runner.clone());
    let start = move |reconcile: bool| {
        let (runner, stop) = (runner.clone(), run_stop.clone());
        let options = crate::sync::RunOptions {
            reconcile,
            ..crate::sync::RunOptions::default()
        };
        async move {
            runner.run_once(options, &stop).await;
        }
    };
    let hooks = JobHooks {
        ownership: skipping.shared.ownership.subscribe(),
        held: skipping.shared.ownership.holds(&account),
        runner: skipping,
    };
    Ok(tokio::spawn(scheduler::drive(
        schedule, reconcile, clock, stop, due, start, hooks,
    )))
}

/// What a job's schedule hears besides its occurrences. Among agents sharing a database,
/// the moment this agent takes the account over: a run the previous owner left unfinished
/// (it died or was cut off mid-run), or an occurrence it missed, is repeated then, from the
/// last completed run's watermark — not at the job's next occurrence, which for a daily job
/// is a day away.
struct JobHooks {
    runner: Arc<JobRunner>,
    /// Changes of the division of accounts.
    ownership: watch::Receiver<u64>,
    /// Whether this agent held the account at the last look.
    held: bool,
}

impl scheduler::Hooks for JobHooks {
    fn skipped(&mut self, due: chrono::DateTime<chrono::Utc>) {
        self.runner.skipped(due);
    }

    async fn due_now(&mut self) {
        loop {
            let account = self.runner.account.name.as_str();
            let holds = self.runner.shared.ownership.holds(account);
            if !holds {
                self.held = false;
            } else if !self.held {
                // Marked held only once looked at: when an occurrence comes first and drops
                // this future mid-look, the next call looks again.
                let reason = self.due_after_takeover().await;
                self.held = true;
                if let Some(reason) = reason {
                    tracing::info!(account, job = %self.runner.job.name, reason = reason.as_str(),
                        "took the account over; running the job now: {}", reason.explain());
                    return;
                }
            }
            if self.ownership.changed().await.is_err() {
                // The agent is going away; its stop ends the schedule.
                std::future::pending::<()>().await;
            }
        }
    }
}

impl JobHooks {
    /// Why the job runs now that this agent owns the account, if it does: as at an agent's
    /// start (`scheduler::run_at_start`). A run still leased to the previous owner is waited
    /// for until the lease ends (or its holder is seen dead), so that this run is not turned
    /// away as "already running".
    async fn due_after_takeover(&self) -> Option<scheduler::StartRun> {
        let (account, job) = (
            self.runner.account.name.as_str(),
            self.runner.job.name.as_str(),
        );
        let (store, clock) = (&self.runner.shared.store, &self.runner.shared.clock);
        loop {
            let history = match store.job_history(account, job).await {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(account, job, error = %e,
                        "cannot read the job's runs after taking the account over; it runs at its next occurrence");
                    return None;
                }
            };
            let now = clock.now();
            let reason = scheduler::run_at_start(
                &self.runner.job.schedule,
                history.last_started,
                history.last_outcome,
                now,
            )?;
            let lease = store
                .lease_row(&crate::store::LeaseKey::job(account, job))
                .await
                .ok()
                .flatten();
            let held_elsewhere = lease.filter(|l| {
                l.live(now.unix_seconds()) && l.holder != self.runner.shared.holder.id()
            });
            let Some(lease) = held_elsewhere else {
                return Some(reason);
            };
            let left = lease.expires_at.saturating_sub(now.unix_seconds());
            tokio::time::sleep(Duration::from_secs(u64::try_from(left).unwrap_or(0) + 1)).await;
        }
    }
}
