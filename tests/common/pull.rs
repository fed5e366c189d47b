//! The pull harness of the sync and mirror tests: one sandbox account with one job, its token
//! owner, and a runner over real HTTP on loopback, under tokio's paused clock.

use std::sync::Arc;
use std::time::Duration;

use ehrsync::clock::{SharedClock, TokioClock};
use ehrsync::config::{self, Account, Env};
use ehrsync::sandbox::{self, Lifetimes, Sandbox};
use ehrsync::sync::{JobRunner, RunOptions, RunSummary, SyncShared, api_client};
use ehrsync::token::Timestamp;
use ehrsync::token::owner::{Shared, TokenHandle, spawn};
use ehrsync::vendor::Vendor;
use tokio::sync::watch;

pub const ACCOUNT: &str = "acct";

pub struct Harness {
    pub _dir: tempfile::TempDir,
    pub sandbox: Sandbox,
    pub shared: Shared,
    pub sync: SyncShared,
    pub account: Arc<Account>,
    pub tokens: TokenHandle,
    pub owner: tokio::task::JoinHandle<()>,
    pub owner_stop: watch::Sender<bool>,
    /// Never set: runs in these tests are not shut down.
    pub no_stop: watch::Receiver<bool>,
    pub _no_stop_tx: watch::Sender<bool>,
}

/// A `vendor` account with one job (`job_toml` is the job's keys; name `patients`), against a
/// sandbox serving `patients` generated patients.
pub async fn start(vendor: Vendor, job_toml: &str, patients: u64) -> Harness {
    start_edited(vendor, job_toml, patients, |config| config).await
}

/// [`start`], with the config text passed through `edit` first.
pub async fn start_edited(
    vendor: Vendor,
    job_toml: &str,
    patients: u64,
    edit: impl FnOnce(String) -> String,
) -> Harness {
    let clock: SharedClock = Arc::new(TokioClock::new(Timestamp::from_unix_millis(
        1_800_000_000_000,
    )));
    let sandbox = Sandbox::start(clock.clone(), Lifetimes::documented(), 0)
        .await
        .unwrap();
    sandbox.set_patients(patients);
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{}\n[[accounts.{ACCOUNT}.jobs]]\nname = 'patients'\n{job_toml}\n",
        sandbox.account_config(vendor, ACCOUNT)
    );
    let path = super::write_config(dir.path(), &edit(text));
    let env: Env = sandbox::credentials_env().into_iter().collect();
    let loaded = config::load_with_env(&path, &env).unwrap();
    let account = Arc::new(loaded.config.accounts.into_iter().next().unwrap());
    let shared = super::shared_in(dir.path(), clock.clone()).await;
    let (owner_stop, rx) = watch::channel(false);
    let (tokens, owner) = spawn(account.clone(), shared.clone(), rx).await.unwrap();
    let sync = SyncShared::new(&shared, api_client().unwrap());
    let (no_stop_tx, no_stop) = watch::channel(false);
    Harness {
        _dir: dir,
        sandbox,
        shared,
        sync,
        account,
        tokens,
        owner,
        owner_stop,
        no_stop,
        _no_stop_tx: no_stop_tx,
    }
}

/// A FHIR Patient job, `page_size` per page, no overlap (so an incremental run fetches exactly
/// the changed records).
pub fn fhir_job(page_size: u32) -> String {
    format!("kind = 'fhir'\nschedule = '0 0 * * * *'\npage_size = {page_size}\noverlap = '0s'")
}

impl Harness {
    pub fn runner(&self) -> JobRunner {
        JobRunner::new(
            self.account.clone(),
            self.account.jobs[0].clone(),
            self.tokens.clone(),
            self.sync.clone(),
        )
    }

    pub async fn run_with(&self, options: RunOptions) -> RunSummary {
        self.runner().run_once(options, &self.no_stop).await
    }

    /// Pulls keep `views` from now on (their tables built from what is stored).
    pub async fn set_views(&mut self, views: ehrsync::views::ViewSet) {
        self.shared.store.prepare_views(&views, 1).await.unwrap();
        self.sync.views = views;
    }

    pub async fn run(&self, full: bool) -> RunSummary {
        let options = RunOptions {
            full,
            ..RunOptions::default()
        };
        self.runner().run_once(options, &self.no_stop).await
    }

    pub async fn scalar(&self, sql: &'static str) -> i64 {
        self.try_scalar(sql).await.unwrap()
    }

    /// One row of `sql` (written with SQLite's `?`) with `bind` as its parameter, its columns
    /// as text (numbers too) by name.
    pub async fn row(&self, sql: &'static str, bind: &str) -> super::TestRow {
        super::test_row(&self.shared.store, sql, bind).await
    }

    pub async fn rows(&self) -> i64 {
        self.scalar("SELECT count(*) FROM resources").await
    }

    pub async fn watermark(&self) -> Option<String> {
        self.shared
            .store
            .watermark(ACCOUNT, "patients")
            .await
            .unwrap()
    }

    pub fn api(&self, status: &str) -> u64 {
        self.shared.metrics.api_requests(ACCOUNT, status)
    }

    /// Runs the job's schedule (as `ehrsync run` does) for `span` of simulated time.
    pub async fn schedule_for(&self, span: Duration) {
        let (stop_tx, stop) = watch::channel(false);
        let task = ehrsync::agent::schedule_job(Arc::new(self.runner()), stop)
            .await
            .unwrap();
        tokio::time::sleep(span).await;
        let _ = stop_tx.send(true);
        task.await.unwrap();
    }

    /// Starts a run in the background and returns once it has committed `pages` pages.
    pub async fn spawn_run_until_pages(&self, pages: i64) -> tokio::task::JoinHandle<RunSummary> {
        let runner = self.runner();
        let stop = self.no_stop.clone();
        let run = tokio::spawn(async move { runner.run_once(RunOptions::default(), &stop).await });
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let runs = self.shared.store.runs(ACCOUNT, "patients").await.unwrap();
            if runs.last().is_some_and(|r| r.pages >= pages) {
                return run;
            }
        }
    }

    pub async fn run_count(&self) -> usize {
        self.shared
            .store
            .runs(ACCOUNT, "patients")
            .await
            .unwrap()
            .len()
    }

    pub async fn stop(self) {
        let _ = self.owner_stop.send(true);
        let _ = self.owner.await;
    }

    /// `sql`'s one value, or the database's error.
    pub async fn try_scalar(&self, sql: &'static str) -> Result<i64, String> {
        super::scalar(&self.shared.store, sql).await
    }

    pub async fn last_run(&self) -> ehrsync::store::SyncRunRow {
        let runs = self.shared.store.runs(ACCOUNT, "patients").await.unwrap();
        runs.last().cloned().unwrap()
    }
}
