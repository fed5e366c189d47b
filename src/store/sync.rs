//! The queries of scheduled pulls: job leases, `sync_runs` bookkeeping, page upserts into
//! `resources`, and watermarks in `sync_state`.
//!
//! A page is one transaction: its records and the run's page/record counts commit together, so
//! `sync_runs` never claims a page the database does not hold. The watermark is written only in
//! the transaction that marks a run `success`.

use sqlx::{QueryBuilder, Sqlite};
// Audited: the only SQL built at run time here is made of `&'static str` fragments chosen by
// `LeaseKey` (table and key columns); every value is a bound parameter.
use sqlx::AssertSqlSafe;

use super::{Lease, Store, StoreError};

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
    /// How the latest run ended (`running` if it never recorded an end).
    pub last_outcome: Option<&'static str>,
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

impl Store {
    /// Records run `run_id`, if still marked `running`, as `interrupted` at `at` with
    /// `reason`: for a run a stop had to cut off. True when it was still running.
    pub async fn interrupt_run(
        &self,
        run_id: i64,
        at: i64,
        reason: &str,
    ) -> Result<bool, StoreError> {
        let reason = reason.to_owned();
        self.shield(|s| async move {
            Ok(sqlx::query(
                "UPDATE sync_runs SET outcome = 'interrupted', finished_at = ?, \
                 error = coalesce(error, ?) WHERE id = ? AND outcome = 'running'",
            )
            .bind(at)
            .bind(&reason)
            .bind(run_id)
            .execute(&s.pool)
            .await?
            .rows_affected()
                == 1)
        })
        .await
    }

    /// Starts a run of `account`/`job` (the caller holds the job's lease): runs of it still
    /// marked `running` belong to a process that stopped and become `interrupted`; a new
    /// `running` row is added; the job's watermark is read. One transaction.
    pub async fn begin_run(
        &self,
        lease: &Lease,
        account: &str,
        job: &str,
        full: bool,
        started_at: i64,
    ) -> Result<RunStart, StoreError> {
        let (account, job, lease) = (account.to_owned(), job.to_owned(), lease.clone());
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
            check_fence(&mut tx, &lease).await?;
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
        lease: &Lease,
        run_id: i64,
        account: &str,
        resource_type: &str,
        rows: Vec<PageRow>,
        synced_at: i64,
    ) -> Result<(), StoreError> {
        let (account, resource_type, lease) =
            (account.to_owned(), resource_type.to_owned(), lease.clone());
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
            check_fence(&mut tx, &lease).await?;
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
        lease: &Lease,
        run_id: i64,
        account: &str,
        job: &str,
        outcome: &'static str,
        finished_at: i64,
        error: Option<String>,
        watermark: Option<String>,
    ) -> Result<(), StoreError> {
        let (account, job, lease) = (account.to_owned(), job.to_owned(), lease.clone());
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
            check_fence(&mut tx, &lease).await?;
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
            let (last_started, last_success, last_outcome): (_, _, Option<String>) =
                sqlx::query_as(
                    "SELECT max(started_at), \
                            max(CASE WHEN outcome = 'success' THEN finished_at END), \
                            (SELECT outcome FROM sync_runs WHERE account = ?1 AND job = ?2 \
                              ORDER BY id DESC LIMIT 1) \
                     FROM sync_runs WHERE account = ?1 AND job = ?2",
                )
                .bind(&account)
                .bind(&job)
                .fetch_one(&s.pool)
                .await?;
            Ok(JobHistory {
                last_started,
                last_success,
                last_outcome: last_outcome.and_then(|o| {
                    ["running", "success", "failed", "interrupted"]
                        .into_iter()
                        .find(|k| *k == o)
                }),
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

/// Ends a write transaction under `lease` by checking that the lease still holds. It runs after
/// the transaction's writes, so this connection already has SQLite's write lock and nobody can
/// take the lease over between the check and the commit.
async fn check_fence(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    lease: &Lease,
) -> Result<(), StoreError> {
    let sql = format!("SELECT {}", lease.key.fence());
    let holds: bool = lease
        .bind_fence(sqlx::query(AssertSqlSafe(sql)))
        .fetch_one(&mut **tx)
        .await
        .map(|r| sqlx::Row::get(&r, 0))?;
    if holds {
        Ok(())
    } else {
        Err(StoreError::LeaseLost("job"))
    }
}
