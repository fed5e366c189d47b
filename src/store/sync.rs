//! The queries of scheduled pulls: job leases, `sync_runs` bookkeeping, page upserts into
//! `resources`, and watermarks in `sync_state`.
//!
//! A page is one transaction: its records and the run's page/record counts commit together, so
//! `sync_runs` never claims a page the database does not hold. The watermark is written only in
//! the transaction that marks a run `success`.

use sqlx::{QueryBuilder, Sqlite};

use super::{Store, StoreError};

/// Rows per INSERT statement: seven bound values each stays far below SQLite's limit of 32,766
/// variables, and one statement per 500 rows keeps the hops to sqlx's worker thread few.
const ROWS_PER_STATEMENT: usize = 500;

/// One record of a page, ready to upsert into `resources`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRow {
    pub id: String,
    pub version_id: Option<String>,
    pub last_updated: Option<String>,
    /// The vendor's JSON for this record, as received.
    pub data: String,
}

/// Marks a job's `running` rows `interrupted`. Binds: finished_at, error, account, job.
const INTERRUPT_RUNNING: &str = "UPDATE sync_runs SET outcome = 'interrupted', \
     finished_at = coalesce(finished_at, ?), error = coalesce(error, ?) \
     WHERE account = ? AND job = ? AND outcome = 'running'";

/// The error given to a run found `running` when the next run of its job starts.
const STALE_RUN: &str =
    "no outcome was recorded: its process stopped, or could not write to the database";

/// When a job last ran and last succeeded (Unix seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct JobHistory {
    pub last_started: Option<i64>,
    pub last_success: Option<i64>,
}

/// What a new run starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunStart {
    /// The `sync_runs` row of this run.
    pub run_id: i64,
    /// The watermark of the last completed run, if any.
    pub watermark: Option<String>,
    /// Runs of this job left `running` by a process that stopped, now marked `interrupted`.
    pub interrupted: u64,
}

/// A job's lease as stored (for tests and diagnostics).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct JobLease {
    pub holder: String,
    pub expires_at: i64,
}

impl Store {
    /// Takes (or renews) the lease on running `account`/`job` for `holder` until `expires_at`,
    /// unless another holder's lease is still running at `now`. True when `holder` has it.
    pub async fn try_job_lease(
        &self,
        account: &str,
        job: &str,
        holder: &str,
        now: i64,
        expires_at: i64,
    ) -> Result<bool, StoreError> {
        let (account, job, holder) = (account.to_owned(), job.to_owned(), holder.to_owned());
        self.shield(|s| async move {
            let done = sqlx::query(
                "INSERT INTO job_leases (account, job, holder, expires_at) VALUES (?, ?, ?, ?) \
                 ON CONFLICT (account, job) DO UPDATE SET holder = excluded.holder, \
                     expires_at = excluded.expires_at \
                 WHERE job_leases.holder = excluded.holder OR job_leases.expires_at <= ?",
            )
            .bind(&account)
            .bind(&job)
            .bind(&holder)
            .bind(expires_at)
            .bind(now)
            .execute(&s.lease_pool)
            .await?;
            Ok(done.rows_affected() == 1)
        })
        .await
    }

    /// Gives up the lease on `account`/`job` if `holder` has it.
    pub async fn release_job_lease(
        &self,
        account: &str,
        job: &str,
        holder: &str,
    ) -> Result<(), StoreError> {
        let (account, job, holder) = (account.to_owned(), job.to_owned(), holder.to_owned());
        self.shield(|s| async move {
            sqlx::query("DELETE FROM job_leases WHERE account = ? AND job = ? AND holder = ?")
                .bind(&account)
                .bind(&job)
                .bind(&holder)
                .execute(&s.lease_pool)
                .await?;
            Ok(())
        })
        .await
    }

    /// The lease on `account`/`job`, if any row exists.
    pub async fn job_lease(
        &self,
        account: &str,
        job: &str,
    ) -> Result<Option<JobLease>, StoreError> {
        let (account, job) = (account.to_owned(), job.to_owned());
        self.shield(|s| async move {
            Ok(sqlx::query_as(
                "SELECT holder, expires_at FROM job_leases WHERE account = ? AND job = ?",
            )
            .bind(&account)
            .bind(&job)
            .fetch_optional(&s.pool)
            .await?)
        })
        .await
    }

    /// Records `account`/`job`'s runs still marked `running` as `interrupted` at `at`, with
    /// `reason` unless they hold an error already; returns how many there were. For a stop
    /// that had to cut a run off (the caller holds the job's lease, so they are its own).
    pub async fn interrupt_runs(
        &self,
        account: &str,
        job: &str,
        at: i64,
        reason: &str,
    ) -> Result<u64, StoreError> {
        let (account, job, reason) = (account.to_owned(), job.to_owned(), reason.to_owned());
        self.shield(|s| async move {
            Ok(sqlx::query(INTERRUPT_RUNNING)
                .bind(at)
                .bind(&reason)
                .bind(&account)
                .bind(&job)
                .execute(&s.pool)
                .await?
                .rows_affected())
        })
        .await
    }

    /// Starts a run of `account`/`job` (the caller holds the job's lease): runs of it still
    /// marked `running` belong to a process that stopped and become `interrupted`; a new
    /// `running` row is added; the job's watermark is read. One transaction.
    pub async fn begin_run(
        &self,
        account: &str,
        job: &str,
        full: bool,
        started_at: i64,
    ) -> Result<RunStart, StoreError> {
        let (account, job) = (account.to_owned(), job.to_owned());
        self.shield(|s| async move {
            let mut tx = s.pool.begin().await?;
            let interrupted = sqlx::query(INTERRUPT_RUNNING)
                .bind(started_at)
                .bind(STALE_RUN)
                .bind(&account)
                .bind(&job)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            let run_id: i64 = sqlx::query_scalar(
                "INSERT INTO sync_runs (account, job, full, started_at, outcome) \
                 VALUES (?, ?, ?, ?, 'running') RETURNING id",
            )
            .bind(&account)
            .bind(&job)
            .bind(full)
            .bind(started_at)
            .fetch_one(&mut *tx)
            .await?;
            let watermark: Option<String> = sqlx::query_scalar(
                "SELECT watermark FROM sync_state WHERE account = ? AND job = ?",
            )
            .bind(&account)
            .bind(&job)
            .fetch_optional(&mut *tx)
            .await?
            .flatten();
            tx.commit().await?;
            Ok(RunStart {
                run_id,
                watermark,
                interrupted,
            })
        })
        .await
    }

    /// Upserts one page of `resource_type` records for `account` and counts it in run `run_id`,
    /// in one transaction. Records are keyed by `(account, resource_type, id)`, so repeating a
    /// page leaves each record once, holding the newest data.
    pub async fn commit_page(
        &self,
        run_id: i64,
        account: &str,
        resource_type: &str,
        rows: Vec<PageRow>,
        synced_at: i64,
    ) -> Result<(), StoreError> {
        let (account, resource_type) = (account.to_owned(), resource_type.to_owned());
        self.shield(|s| async move {
            let mut tx = s.pool.begin().await?;
            for chunk in rows.chunks(ROWS_PER_STATEMENT) {
                let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
                    "INSERT INTO resources \
                     (account, resource_type, id, version_id, last_updated, data, synced_at) ",
                );
                q.push_values(chunk, |mut b, row| {
                    b.push_bind(&account)
                        .push_bind(&resource_type)
                        .push_bind(&row.id)
                        .push_bind(&row.version_id)
                        .push_bind(&row.last_updated)
                        .push_bind(&row.data)
                        .push_bind(synced_at);
                });
                q.push(
                    " ON CONFLICT (account, resource_type, id) DO UPDATE SET \
                     version_id = excluded.version_id, last_updated = excluded.last_updated, \
                     data = excluded.data, synced_at = excluded.synced_at",
                );
                q.build().execute(&mut *tx).await?;
            }
            let records = i64::try_from(rows.len()).unwrap_or(i64::MAX);
            sqlx::query(
                "UPDATE sync_runs SET pages = pages + 1, records = records + ? WHERE id = ?",
            )
            .bind(records)
            .bind(run_id)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    /// Ends run `run_id` with `outcome` (`success`, `failed` or `interrupted`). A successful
    /// run of `account`/`job` also stores `watermark` (when it has one), in the same
    /// transaction: the watermark moves only with a completed run.
    #[allow(clippy::too_many_arguments)] // one value per column written
    pub async fn finish_run(
        &self,
        run_id: i64,
        account: &str,
        job: &str,
        outcome: &'static str,
        finished_at: i64,
        error: Option<String>,
        watermark: Option<String>,
    ) -> Result<(), StoreError> {
        let (account, job) = (account.to_owned(), job.to_owned());
        self.shield(|s| async move {
            let mut tx = s.pool.begin().await?;
            sqlx::query(
                "UPDATE sync_runs SET outcome = ?, finished_at = ?, error = ? WHERE id = ?",
            )
            .bind(outcome)
            .bind(finished_at)
            .bind(&error)
            .bind(run_id)
            .execute(&mut *tx)
            .await?;
            if outcome == "success" {
                sqlx::query(
                    "INSERT INTO sync_state (account, job, watermark, updated_at) VALUES (?, ?, ?, ?) \
                     ON CONFLICT (account, job) DO UPDATE SET \
                         watermark = coalesce(excluded.watermark, sync_state.watermark), \
                         updated_at = excluded.updated_at",
                )
                .bind(&account)
                .bind(&job)
                .bind(&watermark)
                .bind(finished_at)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    /// When the latest run of `account`/`job` started and when its latest successful run
    /// finished (Unix seconds), where they exist.
    pub async fn job_history(&self, account: &str, job: &str) -> Result<JobHistory, StoreError> {
        let (account, job) = (account.to_owned(), job.to_owned());
        self.shield(|s| async move {
            let (last_started, last_success) = sqlx::query_as(
                "SELECT max(started_at), max(CASE WHEN outcome = 'success' THEN finished_at END) \
                 FROM sync_runs WHERE account = ? AND job = ?",
            )
            .bind(&account)
            .bind(&job)
            .fetch_one(&s.pool)
            .await?;
            Ok(JobHistory {
                last_started,
                last_success,
            })
        })
        .await
    }

    /// `account`/`job`'s watermark, if a completed run set one.
    pub async fn watermark(&self, account: &str, job: &str) -> Result<Option<String>, StoreError> {
        let (account, job) = (account.to_owned(), job.to_owned());
        self.shield(|s| async move {
            Ok(
                sqlx::query_scalar(
                    "SELECT watermark FROM sync_state WHERE account = ? AND job = ?",
                )
                .bind(&account)
                .bind(&job)
                .fetch_optional(&s.pool)
                .await?
                .flatten(),
            )
        })
        .await
    }

    /// Every run of `account`/`job`, oldest first (for tests and diagnostics).
    pub async fn runs(
        &self,
        account: &str,
        job: &str,
    ) -> Result<Vec<super::SyncRunRow>, StoreError> {
        let (account, job) = (account.to_owned(), job.to_owned());
        self.shield(|s| async move {
            Ok(sqlx::query_as(
                "SELECT account, job, full, started_at, finished_at, outcome, pages, records, error \
                 FROM sync_runs WHERE account = ? AND job = ? ORDER BY id",
            )
            .bind(&account)
            .bind(&job)
            .fetch_all(&s.pool)
            .await?)
        })
        .await
    }
}
