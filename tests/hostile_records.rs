//! Records a vendor should never send: a run meets them in the sandbox's data APIs (planted with
//! `Sandbox::plant_patient`), fails at their page naming the record, stores nothing of that
//! page, and leaves the database answering queries for every account.

mod common;

use std::sync::Arc;

use ehrsync::clock::{SharedClock, TokioClock};
use ehrsync::config::{self, Env};
use ehrsync::sandbox::{self, Lifetimes, Sandbox, fhir_id};
use ehrsync::store::{SyncRunRow, shielded};
use ehrsync::sync::{JobRunner, Outcome, RunSummary, SyncShared, api_client};
use ehrsync::token::Timestamp;
use ehrsync::token::owner::{Shared, spawn};
use ehrsync::vendor::Vendor;
use tokio::sync::watch;

const ACCOUNT: &str = "acct";
/// Nested arrays in the hostile record: far past SQLite's JSON depth limit (1000).
const DEPTH: usize = 200_000;

/// `DEPTH` nested arrays.
fn deep_array() -> String {
    format!("{}{}", "[".repeat(DEPTH), "]".repeat(DEPTH))
}

/// `record` (a JSON object) with a `contained` member that is [`deep_array`].
fn with_deep_member(record: &str) -> String {
    format!("{{\"contained\":{},{}", deep_array(), &record[1..])
}

struct Harness {
    _dir: tempfile::TempDir,
    sandbox: Sandbox,
    shared: Shared,
    runner: JobRunner,
    owner: tokio::task::JoinHandle<()>,
    owner_stop: watch::Sender<bool>,
    no_stop: (watch::Sender<bool>, watch::Receiver<bool>),
}

/// A `vendor` account with one `patients` job (`job_toml`), against `patients` patients.
async fn start(vendor: Vendor, job_toml: &str, patients: u64) -> Harness {
    let clock: SharedClock = Arc::new(TokioClock::new(Timestamp::from_unix_millis(
        1_800_000_000_000,
    )));
    let sandbox = Sandbox::start(clock.clone(), Lifetimes::documented(), 0)
        .await
        .unwrap();
    sandbox.set_patients(patients);
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{}\n[[accounts.{ACCOUNT}.jobs]]\nname = 'patients'\nschedule = '0 0 * * * *'\n{job_toml}\n",
        sandbox.account_config(vendor, ACCOUNT)
    );
    let path = common::write_config(dir.path(), &text);
    let env: Env = sandbox::credentials_env().into_iter().collect();
    let loaded = config::load_with_env(&path, &env).unwrap();
    let account = Arc::new(loaded.config.accounts.into_iter().next().unwrap());
    let shared = common::shared_in(dir.path(), clock.clone()).await;
    let (owner_stop, rx) = watch::channel(false);
    let (tokens, owner) = spawn(account.clone(), shared.clone(), rx).await.unwrap();
    let runner = JobRunner::new(
        account.clone(),
        account.jobs[0].clone(),
        tokens,
        SyncShared {
            store: shared.store.clone(),
            http: api_client().unwrap(),
            clock,
            metrics: shared.metrics.clone(),
            holder: shared.holder.clone(),
        },
    );
    Harness {
        _dir: dir,
        sandbox,
        shared,
        runner,
        owner,
        owner_stop,
        no_stop: watch::channel(false),
    }
}

impl Harness {
    async fn run(&self) -> RunSummary {
        self.runner.run_once(true, &self.no_stop.1).await
    }

    /// `sql`'s one value, or SQLite's error.
    async fn scalar(&self, sql: &'static str) -> Result<i64, String> {
        let pool = self.shared.store.pool().clone();
        shielded(async move { Ok(sqlx::query_scalar(sql).fetch_one(&pool).await?) })
            .await
            .map_err(|e| e.to_string())
    }

    async fn last_run(&self) -> SyncRunRow {
        let runs = self.shared.store.runs(ACCOUNT, "patients").await.unwrap();
        runs.last().cloned().unwrap()
    }

    async fn stop(self) {
        let _ = self.owner_stop.send(true);
        let _ = self.owner.await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_fhir_record_too_deep_for_sqlite_fails_its_page_and_the_view_still_answers() {
    let h = start(Vendor::Nextech, "kind = 'fhir'\npage_size = 50", 250).await;
    // Patient 60 is on page 2.
    let hostile = with_deep_member(&h.sandbox.patient_json(60));
    h.sandbox.plant_patient(60, hostile);

    let failed = h.run().await;
    assert_eq!(failed.outcome, Outcome::Failed, "{failed}");
    let error = failed.error.clone().unwrap_or_default();
    for expected in [
        "page 2 (GET ",
        &format!("record `{}`", fhir_id(60)),
        "1000 levels deep",
        "none of this page's records were stored",
    ] {
        assert!(error.contains(expected), "`{expected}` in: {error}");
    }
    assert!(!error.contains("[["), "no record content in: {error}");
    // The run's row says the same; page 1 is kept, nothing of page 2 is stored.
    let run = h.last_run().await;
    assert_eq!(run.outcome, "failed");
    assert_eq!(run.error.as_deref(), Some(error.as_str()));
    assert_eq!((run.pages, run.records), (1, 50));
    assert_eq!(
        h.scalar("SELECT count(*) FROM resources WHERE id >= 'pat-0000050'")
            .await,
        Ok(0)
    );
    // Every stored row is readable by SQLite's JSON functions, so the view answers.
    assert_eq!(h.scalar("SELECT count(*) FROM patients").await, Ok(50));
    assert_eq!(
        h.scalar("SELECT count(*) FROM resources WHERE NOT json_valid(data)")
            .await,
        Ok(0)
    );

    // Once the vendor corrects the record, the next run stores everything.
    h.sandbox.unplant_patients();
    let fixed = h.run().await;
    assert_eq!(fixed.outcome, Outcome::Success, "{fixed}");
    assert_eq!((fixed.pages, fixed.records), (5, 250));
    assert_eq!(h.scalar("SELECT count(*) FROM patients").await, Ok(250));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_nikohealth_record_too_deep_for_sqlite_fails_its_page() {
    let h = start(
        Vendor::NikoHealth,
        "kind = 'nikohealth_patients'\npage_size = 20",
        60,
    )
    .await;
    // NikoHealth ids are the index + 1: patient 45 (id 46) is on page 3.
    let hostile = with_deep_member(&sandbox::niko_patient(45, 1_700_000_000_000, 1));
    h.sandbox.plant_patient(45, hostile);

    let failed = h.run().await;
    assert_eq!(failed.outcome, Outcome::Failed, "{failed}");
    let error = failed.error.clone().unwrap_or_default();
    assert!(
        error.contains("page 3 (GET ") && error.contains("record `46`"),
        "{error}"
    );
    assert!(!error.contains("[["), "no record content in: {error}");
    assert_eq!((failed.pages, failed.records), (2, 40));
    assert_eq!(h.scalar("SELECT count(*) FROM patients").await, Ok(40));

    h.sandbox.unplant_patients();
    let fixed = h.run().await;
    assert_eq!(fixed.outcome, Outcome::Success, "{fixed}");
    assert_eq!(h.scalar("SELECT count(*) FROM patients").await, Ok(60));
    h.stop().await;
}
