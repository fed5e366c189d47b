//! The queries of scheduled pulls: job leases, `sync_runs` bookkeeping, page upserts into
//! `resources`, and watermarks in `sync_state`.
//!
//! A page is one transaction: its records and the run's page/record counts commit together, so
//! `sync_runs` never claims a page the database does not hold. The watermark is written only in
//! the transaction that marks a run `success`.

use std::collections::{HashMap, HashSet};

use sqlx::{Database, Encode, QueryBuilder, Type};
// Audited: the only SQL built at run time here is made of `&'static str` fragments chosen by
// `LeaseKey` (table and key columns); every value is a bound parameter.
use sqlx::AssertSqlSafe;

use super::backend::{Backend, Db, Tx, on, postgres, sqlite};
use super::{Lease, Store, StoreError};
use crate::views::patients::is_patient_type;
use crate::views::{Derived, SqlValue, ViewSet, quote};

/// Rows per INSERT statement: seven bound values each stays far below SQLite's limit of 32,766
/// variables, and one statement per 500 rows keeps the hops to sqlx's worker thread few.
const ROWS_PER_STATEMENT: usize = 500;

/// One record of a page, ready to upsert into `resources`.
#[derive(Debug, Clone, PartialEq)]
pub struct PageRow {
    pub id: String,
    pub version_id: Option<String>,
    pub last_updated: Option<String>,
    /// The vendor's JSON for this record, as received.
    pub data: String,
    /// SHA-256 of `data`: a record read again unchanged is not an update.
    pub hash: [u8; 32],
    /// What it contributes to `patient_rows` and the view tables (the pull's reader fills it
    /// with [`ViewSet::derive`]).
    pub derived: Derived,
}

impl PageRow {
    pub fn new(
        id: String,
        version_id: Option<String>,
        last_updated: Option<String>,
        data: String,
    ) -> PageRow {
        PageRow {
            hash: crate::crypto::sha256(data.as_bytes()),
            id,
            version_id,
            last_updated,
            data,
            derived: Derived::default(),
        }
    }
}

/// What a change did to a record (`changes.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    Created,
    Updated,
    Deleted,
}

impl ChangeKind {
    pub const ALL: [ChangeKind; 3] = [
        ChangeKind::Created,
        ChangeKind::Updated,
        ChangeKind::Deleted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Created => "created",
            ChangeKind::Updated => "updated",
            ChangeKind::Deleted => "deleted",
        }
    }
}

/// What a page changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageChanges {
    pub created: u64,
    pub updated: u64,
}

/// What a completed sweep found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconciled {
    /// `deleted` of the `live` records were marked deleted.
    Applied { deleted: u64, live: u64 },
    /// More than the allowed share would have been deleted: nothing was.
    Refused { gone: u64, live: u64 },
}

/// Marks a job's `running` rows `interrupted`. Binds: finished_at, error, account, job.
const INTERRUPT_RUNNING: &str = "UPDATE sync_runs SET outcome = 'interrupted', \
     finished_at = coalesce(finished_at, ?), error = coalesce(error, ?) \
     WHERE account = ? AND job = ? AND outcome = 'running'";

/// The name index of `patient_rows`, as migration 0006 creates it. Names arrive in random order,
/// so once the index outgrows SQLite's page cache almost every record of a page dirties one of
/// its pages (written to the WAL, then again by the checkpoint): a first pull of 1,000,000
/// patients ran at 26,200 /s with it and 48,500 /s without (docs/performance.md). So a run
/// that starts while `patient_rows` is small drops it, and [`ensure_name_index`] builds it once,
/// in key order: when that run ends, when it has written [`NAME_INDEX_BUILD_AT`] records
/// (so the build, which holds the database, stays short: about 1.6 s per 1,000,000 rows), or
/// when a store is opened after a crash.
const NAME_INDEX: &str = "CREATE INDEX IF NOT EXISTS patient_rows_by_name \
     ON patient_rows (family COLLATE NOCASE, given COLLATE NOCASE)";

/// Below this many `patient_rows` rows a run drops the name index for its duration (rebuilding
/// it costs little then); above it, a run keeps it (an incremental pull is small, and a
/// practice looking names up meanwhile keeps its fast lookups).
const NAME_INDEX_DEFER_BELOW: i64 = 10_000;

/// A run that dropped the name index builds it once it has written this many records.
const NAME_INDEX_BUILD_AT: i64 = 1_000_000;

/// Builds the name index of `patient_rows` if it is missing (see [`NAME_INDEX`]), outside any
/// transaction. Its sort spills to temporary files, not memory as the store's other temporary
/// data does, so that building it over 1,000,000 rows does not raise the process's memory. A
/// failure (the database busy past its timeout, the disk full) is logged, not returned: the
/// index only speeds lookups up, and the next run's end or the next start builds it.
pub(super) async fn ensure_name_index(db: &Db) {
    // PostgreSQL keeps its index throughout: its pages are written in place.
    let Backend::Sqlite(pool) = db else {
        return;
    };
    async fn build(pool: &sqlx::SqlitePool) -> Result<(), sqlx::Error> {
        let mut conn = pool.acquire().await?;
        let missing: bool = sqlx::query_scalar(
            "SELECT NOT EXISTS (SELECT 1 FROM sqlite_master \
             WHERE type = 'index' AND name = 'patient_rows_by_name')",
        )
        .fetch_one(&mut *conn)
        .await?;
        if !missing {
            return Ok(());
        }
        sqlx::query("PRAGMA temp_store = FILE")
            .execute(&mut *conn)
            .await?;
        let built = sqlx::query(NAME_INDEX).execute(&mut *conn).await;
        if let Err(e) = sqlx::query("PRAGMA temp_store = MEMORY")
            .execute(&mut *conn)
            .await
        {
            // Not back in the pool with the slower setting.
            conn.close_on_drop();
            return Err(e);
        }
        built.map(|_| ())
    }
    if let Err(e) = build(pool).await {
        tracing::warn!(error = %e, "cannot build the name index of `patients` yet; the next run's end or the next start tries again");
    }
}

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

/// What a page's upsert does with a record already stored: it takes the new version (and is
/// no longer deleted).
macro_rules! upsert_resource {
    () => {
        " ON CONFLICT (account, resource_type, id) DO UPDATE SET \
     version_id = excluded.version_id, last_updated = excluded.last_updated, \
     data = excluded.data, synced_at = excluded.synced_at, \
     content_hash = excluded.content_hash, seen_run = excluded.seen_run, deleted_at = NULL"
    };
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
            let interrupted = on!(&s.db, pool, d => d::query(
                "UPDATE sync_runs SET outcome = 'interrupted', finished_at = ?, \
                 error = coalesce(error, ?) WHERE id = ? AND outcome = 'running'",
            )
            .bind(at)
            .bind(&reason)
            .bind(run_id)
            .execute(pool)
            .await?
            .rows_affected())
                == 1;
            ensure_name_index(&s.db).await;
            Ok(interrupted)
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
            let mut tx = s.db.begin().await?;
            let interrupted = on!(&mut tx, c, d => d::query(INTERRUPT_RUNNING)
                .bind(started_at)
                .bind(STALE_RUN)
                .bind(&account)
                .bind(&job)
                .execute(&mut **c)
                .await?
                .rows_affected());
            if let Backend::Sqlite(c) = &mut tx {
                let small: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM (SELECT 1 FROM patient_rows LIMIT ?)")
                        .bind(NAME_INDEX_DEFER_BELOW)
                        .fetch_one(&mut **c)
                        .await?;
                if small < NAME_INDEX_DEFER_BELOW {
                    sqlx::query("DROP INDEX IF EXISTS patient_rows_by_name")
                        .execute(&mut **c)
                        .await?;
                }
            }
            let run_id: i64 = on!(&mut tx, c, d => d::query_scalar(
                "INSERT INTO sync_runs (account, job, \"full\", started_at, outcome) \
                 VALUES (?, ?, ?, ?, 'running') RETURNING id",
            )
            .bind(&account)
            .bind(&job)
            .bind(i64::from(full))
            .bind(started_at)
            .fetch_one(&mut **c)
            .await)?;
            let watermark: Option<String> = on!(&mut tx, c, d => d::query_scalar(
                "SELECT watermark FROM sync_state WHERE account = ? AND job = ?",
            )
            .bind(&account)
            .bind(&job)
            .fetch_optional(&mut **c)
            .await)?
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

    /// Writes one page of `resource_type` records for `account` and counts it in run `run_id`,
    /// in one transaction: records new or changed since they were last stored (by version and
    /// content hash) are upserted, logged in `changes` and re-derived into `patient_rows` and
    /// `views`' tables; unchanged ones are only marked seen by this run. Records are keyed by
    /// `(account, resource_type, id)`, so repeating a page changes nothing.
    #[allow(clippy::too_many_arguments)] // the page and where it goes
    pub async fn commit_page(
        &self,
        lease: &Lease,
        run_id: i64,
        account: &str,
        resource_type: &str,
        rows: Vec<PageRow>,
        synced_at: i64,
        views: &ViewSet,
    ) -> Result<PageChanges, StoreError> {
        self.commit_pages(
            lease,
            run_id,
            account,
            resource_type,
            rows,
            1,
            synced_at,
            views,
        )
        .await
    }

    /// [`Store::commit_page`] for the records of `pages` consecutive pages, in one
    /// transaction (a record that appears on two of them keeps its later version).
    #[allow(clippy::too_many_arguments)] // the pages and where they go
    pub async fn commit_pages(
        &self,
        lease: &Lease,
        run_id: i64,
        account: &str,
        resource_type: &str,
        rows: Vec<PageRow>,
        pages: u32,
        synced_at: i64,
        views: &ViewSet,
    ) -> Result<PageChanges, StoreError> {
        let (account, resource_type, lease, views) = (
            account.to_owned(),
            resource_type.to_owned(),
            lease.clone(),
            views.clone(),
        );
        self.shield(|s| async move {
            let total = rows.len();
            let mut rows = last_of_each_id(rows);
            // The derived rows, owned apart from the records, so their values move into the
            // statements instead of being copied.
            let mut derived: Vec<Derived> = rows
                .iter_mut()
                .map(|r| std::mem::take(&mut r.derived))
                .collect();
            // It reads before it writes (see `Db::begin_write`).
            let mut tx = s.db.begin_write().await?;
            let existing = stored_versions(&mut tx, &account, &resource_type, &rows).await?;
            // Each record to write (its index in `rows`) with the change it makes (None:
            // unchanged, but written to record its hash, for records stored before hashes were
            // kept).
            let mut writes: Vec<(usize, Option<ChangeKind>)> = Vec::new();
            let mut unchanged: Vec<&str> = Vec::new();
            for (i, row) in rows.iter().enumerate() {
                match existing.get(row.id.as_str()) {
                    None => writes.push((i, Some(ChangeKind::Created))),
                    Some(e) if e.deleted => writes.push((i, Some(ChangeKind::Created))),
                    Some(e) => {
                        let same = e.version_id == row.version_id
                            && match (&e.hash, &e.data) {
                                (Some(h), _) => h.as_slice() == row.hash.as_slice(),
                                (None, Some(d)) => *d == row.data,
                                (None, None) => false,
                            };
                        match (same, e.hash.is_some()) {
                            (true, true) => unchanged.push(&row.id),
                            (true, false) => writes.push((i, None)),
                            (false, _) => writes.push((i, Some(ChangeKind::Updated))),
                        }
                    }
                }
            }
            match &mut tx {
                // SQLite: multi-row `VALUES`, within its limit of bound parameters.
                Backend::Sqlite(c) => {
                    for chunk in writes.chunks(ROWS_PER_STATEMENT) {
                        let mut q = sqlite::builder(
                            "INSERT INTO resources (account, resource_type, id, version_id, \
                             last_updated, data, synced_at, content_hash, seen_run, deleted_at) ",
                        );
                        q.push_values(chunk, |mut b, &(i, _)| {
                            let row = &rows[i];
                            b.push_bind(&account)
                                .push_bind(&resource_type)
                                .push_bind(&row.id)
                                .push_bind(&row.version_id)
                                .push_bind(&row.last_updated)
                                .push_bind(&row.data)
                                .push_bind(synced_at)
                                .push_bind(row.hash.as_slice())
                                .push_bind(run_id)
                                .push_bind(None::<i64>);
                        });
                        q.push(upsert_resource!());
                        q.build().execute(&mut **c).await?;
                    }
                }
                // PostgreSQL: the page's columns as arrays, one statement whatever its size
                // (ARCHITECTURE, "Decisions": faster than `VALUES` or `COPY` here).
                Backend::Postgres(c) => {
                    if !writes.is_empty() {
                        let n = writes.len();
                        let (mut ids, mut versions, mut updated, mut data, mut hashes) = (
                            Vec::with_capacity(n),
                            Vec::with_capacity(n),
                            Vec::with_capacity(n),
                            Vec::with_capacity(n),
                            Vec::with_capacity(n),
                        );
                        for &(i, _) in &writes {
                            let row = &rows[i];
                            ids.push(row.id.as_str());
                            versions.push(row.version_id.as_deref());
                            updated.push(row.last_updated.as_deref());
                            data.push(row.data.as_str());
                            hashes.push(row.hash.as_slice());
                        }
                        postgres::query(concat!(
                            "INSERT INTO resources (account, resource_type, id, version_id, \
                             last_updated, data, synced_at, content_hash, seen_run, deleted_at) \
                             SELECT ?, ?, u.id, u.version_id, u.last_updated, u.data, ?, \
                             u.content_hash, ?, NULL \
                             FROM UNNEST(?::text[], ?::text[], ?::text[], ?::text[], ?::bytea[]) \
                             AS u(id, version_id, last_updated, data, content_hash)",
                            upsert_resource!()
                        ))
                        .bind(&account)
                        .bind(&resource_type)
                        .bind(synced_at)
                        .bind(run_id)
                        .bind(&ids)
                        .bind(&versions)
                        .bind(&updated)
                        .bind(&data)
                        .bind(&hashes)
                        .execute(&mut **c)
                        .await?;
                    }
                }
            }
            for chunk in unchanged.chunks(ROWS_PER_STATEMENT) {
                on!(&mut tx, c, d => {
                let mut q = d::builder("UPDATE resources SET seen_run = ");
                q.push_bind(run_id);
                push_key_filter(&mut q, &account, &resource_type, "id", chunk);
                q.build().execute(&mut **c).await?;
                });
            }
            let changed: Vec<(usize, ChangeKind)> = writes
                .iter()
                .filter_map(|&(i, kind)| kind.map(|k| (i, k)))
                .collect();
            for chunk in changed.chunks(ROWS_PER_STATEMENT) {
                on!(&mut tx, c, d => {
                let mut q = d::builder(
                    "INSERT INTO changes (account, resource_type, id, kind, version_id, \
                     last_updated, run_id, at) ",
                );
                q.push_values(chunk, |mut b, &(i, kind)| {
                    let row = &rows[i];
                    b.push_bind(&account)
                        .push_bind(&resource_type)
                        .push_bind(&row.id)
                        .push_bind(kind.as_str())
                        .push_bind(&row.version_id)
                        .push_bind(&row.last_updated)
                        .push_bind(run_id)
                        .push_bind(synced_at);
                });
                q.build().execute(&mut **c).await?;
                });
            }
            let derived_of: Vec<(&PageRow, ChangeKind, Derived)> = changed
                .iter()
                .map(|&(i, k)| (&rows[i], k, std::mem::take(&mut derived[i])))
                .collect();
            write_derived(&mut tx, &views, &account, &resource_type, derived_of).await?;
            let records = i64::try_from(total).unwrap_or(i64::MAX);
            let run_records: Option<i64> = on!(&mut tx, c, d => d::query_scalar(
                "UPDATE sync_runs SET pages = pages + ?, records = records + ? WHERE id = ? \
                 RETURNING records",
            )
            .bind(i64::from(pages))
            .bind(records)
            .bind(run_id)
            .fetch_optional(&mut **c)
            .await)?;
            check_fence(&mut tx, &lease).await?;
            tx.commit().await?;
            let run_records = run_records.unwrap_or(0);
            if run_records >= NAME_INDEX_BUILD_AT && run_records - records < NAME_INDEX_BUILD_AT {
                ensure_name_index(&s.db).await;
            }
            let count = |k| changed.iter().filter(|(_, c)| *c == k).count() as u64;
            Ok(PageChanges {
                created: count(ChangeKind::Created),
                updated: count(ChangeKind::Updated),
            })
        })
        .await
    }

    /// Marks the `ids` a sweep read (run `run_id`, holding `lease`) as seen; returns how many
    /// of them are not stored at all.
    pub async fn mark_seen(
        &self,
        lease: &Lease,
        run_id: i64,
        account: &str,
        resource_type: &str,
        mut ids: Vec<String>,
    ) -> Result<u64, StoreError> {
        let (account, resource_type, lease) =
            (account.to_owned(), resource_type.to_owned(), lease.clone());
        ids.sort_unstable();
        ids.dedup();
        self.shield(|s| async move {
            let mut tx = s.db.begin().await?;
            let mut known = 0u64;
            for chunk in ids.chunks(ROWS_PER_STATEMENT) {
                let chunk: Vec<&str> = chunk.iter().map(String::as_str).collect();
                known += on!(&mut tx, c, d => {
                    let mut q = d::builder("UPDATE resources SET seen_run = ");
                    q.push_bind(run_id);
                    push_key_filter(&mut q, &account, &resource_type, "id", &chunk);
                    q.build().execute(&mut **c).await?.rows_affected()
                });
            }
            check_fence(&mut tx, &lease).await?;
            tx.commit().await?;
            Ok((ids.len() as u64).saturating_sub(known))
        })
        .await
    }

    /// Ends a completed sweep of run `run_id`: the live `resource_type` records of `account`
    /// that neither it nor a later run saw are marked deleted at `at`, logged in `changes`,
    /// and removed from `patient_rows` and the view tables, in one transaction. When they are
    /// more than `max_delete` (a fraction) of the live records, nothing is deleted and the
    /// count is returned as refused.
    #[allow(clippy::too_many_arguments)] // the sweep and its limits
    pub async fn reconcile(
        &self,
        lease: &Lease,
        run_id: i64,
        account: &str,
        resource_type: &str,
        max_delete: Option<f64>,
        at: i64,
        views: &ViewSet,
    ) -> Result<Reconciled, StoreError> {
        let (account, resource_type, lease, views) = (
            account.to_owned(),
            resource_type.to_owned(),
            lease.clone(),
            views.clone(),
        );
        // ?1 account, ?2 resource type, ?3 the sweep's run. Run ids only grow: a record a run
        // started later wrote (another job of the same type) is not this sweep's to judge.
        const GONE: &str = "account = ?1 AND resource_type = ?2 AND deleted_at IS NULL \
                            AND coalesce(seen_run, 0) < ?3";
        self.shield(|s| async move {
            // As in commit_page: reads first, then writes.
            let mut tx = s.db.begin_write().await?;
            let (live, gone): (i64, i64) = on!(&mut tx, c, d => d::query_as(
                "SELECT count(*), \
                        count(CASE WHEN coalesce(seen_run, 0) < ?3 THEN 1 END) \
                 FROM resources WHERE account = ?1 AND resource_type = ?2 AND deleted_at IS NULL",
            )
            .bind(&account)
            .bind(&resource_type)
            .bind(run_id)
            .fetch_one(&mut **c)
            .await)?;
            let (live, gone) = (live.max(0) as u64, gone.max(0) as u64);
            if let Some(max) = max_delete
                && gone as f64 > live as f64 * max
            {
                return Ok(Reconciled::Refused { gone, live });
            }
            if gone > 0 {
                let mut statements = vec![format!(
                    "INSERT INTO changes (account, resource_type, id, kind, version_id, \
                     last_updated, run_id, at) SELECT account, resource_type, id, 'deleted', \
                     version_id, last_updated, ?3, ?4 FROM resources WHERE {GONE}"
                )];
                if is_patient_type(&resource_type) {
                    statements.push(format!(
                        "DELETE FROM patient_rows WHERE account = ?1 AND resource_type = ?2 \
                         AND id IN (SELECT id FROM resources WHERE {GONE})"
                    ));
                }
                for view in views.for_type(&resource_type) {
                    statements.push(format!(
                        "DELETE FROM {} WHERE account = ?1 AND resource_id IN \
                         (SELECT id FROM resources WHERE {GONE})",
                        quote(&view.table)
                    ));
                }
                statements.push(format!("UPDATE resources SET deleted_at = ?4 WHERE {GONE}"));
                for sql in statements {
                    // Every statement binds the same four values, also those that name only
                    // some (their types are sent with them, so PostgreSQL accepts unused ones).
                    on!(&mut tx, c, d => d::query(AssertSqlSafe(sql))
                        .bind(&account)
                        .bind(&resource_type)
                        .bind(run_id)
                        .bind(at)
                        .execute(&mut **c)
                        .await.map(|_| ()))?;
                }
            }
            check_fence(&mut tx, &lease).await?;
            tx.commit().await?;
            Ok(Reconciled::Applied {
                deleted: gone,
                live,
            })
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
            let mut tx = s.db.begin().await?;
            on!(&mut tx, c, d => d::query(
                "UPDATE sync_runs SET outcome = ?, finished_at = ?, error = ? WHERE id = ?",
            )
            .bind(outcome)
            .bind(finished_at)
            .bind(&error)
            .bind(run_id)
            .execute(&mut **c)
            .await.map(|_| ()))?;
            if outcome == "success" {
                on!(&mut tx, c, d => d::query(
                    "INSERT INTO sync_state (account, job, watermark, updated_at) VALUES (?, ?, ?, ?) \
                     ON CONFLICT (account, job) DO UPDATE SET \
                         watermark = coalesce(excluded.watermark, sync_state.watermark), \
                         updated_at = excluded.updated_at",
                )
                .bind(&account)
                .bind(&job)
                .bind(&watermark)
                .bind(finished_at)
                .execute(&mut **c)
                .await.map(|_| ()))?;
            }
            check_fence(&mut tx, &lease).await?;
            tx.commit().await?;
            ensure_name_index(&s.db).await;
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
                on!(&s.db, pool, d => d::query_as(
                    "SELECT max(started_at), \
                            max(CASE WHEN outcome = 'success' THEN finished_at END), \
                            (SELECT outcome FROM sync_runs WHERE account = ?1 AND job = ?2 \
                              ORDER BY id DESC LIMIT 1) \
                     FROM sync_runs WHERE account = ?1 AND job = ?2",
                )
                .bind(&account)
                .bind(&job)
                .fetch_one(pool)
                .await)?;
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
            Ok(on!(&s.db, pool, d => d::query_scalar(
                "SELECT watermark FROM sync_state WHERE account = ? AND job = ?",
            )
            .bind(&account)
            .bind(&job)
            .fetch_optional(pool)
            .await)?
            .flatten())
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
            Ok(on!(&s.db, pool, d => d::query_as(
                "SELECT account, job, \"full\" <> 0 AS \"full\", started_at, finished_at, outcome, \
                        pages, records, error \
                 FROM sync_runs WHERE account = ? AND job = ? ORDER BY id",
            )
            .bind(&account)
            .bind(&job)
            .fetch_all(pool)
            .await)?)
        })
        .await
    }
}

/// Ends a write transaction under `lease` by checking that the lease still holds. It runs after
/// the transaction's writes, so on SQLite this connection already has the write lock, and on
/// PostgreSQL the check locks the lease row: either way nobody can take the lease over between
/// the check and the commit.
async fn check_fence(tx: &mut Tx, lease: &Lease) -> Result<(), StoreError> {
    let holds: bool = on!(tx, c, d => {
        let sql = format!("SELECT {}", lease.key.fence(d::LOCK_SHARED));
        lease
            .bind_fence(d::query(AssertSqlSafe(sql)))
            .fetch_one(&mut **c)
            .await
            .and_then(|r| sqlx::Row::try_get(&r, 0))?
    });
    if holds {
        Ok(())
    } else {
        Err(StoreError::LeaseLost("job"))
    }
}

/// A stored record as a page finds it.
struct Stored {
    version_id: Option<String>,
    hash: Option<Vec<u8>>,
    /// Its data, only for records stored without a hash.
    data: Option<String>,
    deleted: bool,
}

/// id, version_id, content_hash, data (without a hash only), deleted.
type StoredRow = (
    String,
    Option<String>,
    Option<Vec<u8>>,
    Option<String>,
    bool,
);

/// [`stored_versions`]' statement on PostgreSQL: the ids, the account, the resource type.
#[doc(hidden)] // public for the test of its plan
pub const STORED_ON_POSTGRES: &str = "SELECT r.id, r.version_id, r.content_hash, \
     CASE WHEN r.content_hash IS NULL THEN r.data END, r.deleted_at IS NOT NULL \
     FROM UNNEST(?::text[]) AS k(id) CROSS JOIN LATERAL ( \
       SELECT * FROM resources \
       WHERE account = ? AND resource_type = ? AND id = k.id LIMIT 1) AS r";

/// The stored versions of the page's records.
async fn stored_versions(
    tx: &mut Tx,
    account: &str,
    resource_type: &str,
    rows: &[PageRow],
) -> Result<HashMap<String, Stored>, StoreError> {
    let mut found = HashMap::with_capacity(rows.len());
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let ids: Vec<&str> = chunk.iter().map(|r| r.id.as_str()).collect();
        let stored: Vec<StoredRow> = match &mut *tx {
            Backend::Sqlite(c) => {
                let mut q = sqlite::builder(
                    "SELECT id, version_id, content_hash, \
                     CASE WHEN content_hash IS NULL THEN data END, deleted_at IS NOT NULL \
                     FROM resources",
                );
                push_key_filter(&mut q, account, resource_type, "id", &ids);
                q.build_query_as().fetch_all(&mut **c).await?
            }
            // One primary-key probe per id. Not `id IN (…)`: for an account its statistics
            // do not know yet (a new account's first pull) the planner expects one row for
            // `account = ? AND resource_type = ?`, probes the key with those two only, and
            // filters `id` over every row the account has, page after page. A lateral
            // subquery with `LIMIT 1` cannot be flattened, so each id is its own probe.
            Backend::Postgres(c) => {
                postgres::query_as(STORED_ON_POSTGRES)
                    .bind(&ids)
                    .bind(account)
                    .bind(resource_type)
                    .fetch_all(&mut **c)
                    .await?
            }
        };
        for (id, version_id, hash, data, deleted) in stored {
            found.insert(
                id,
                Stored {
                    version_id,
                    hash,
                    data,
                    deleted,
                },
            );
        }
    }
    Ok(found)
}

/// ` WHERE account = ? AND resource_type = ? AND {id_column} IN (…)`.
fn push_key_filter<DB: Database>(
    q: &mut QueryBuilder<DB>,
    account: &str,
    resource_type: &str,
    id_column: &'static str,
    ids: &[&str],
) where
    for<'a> &'a str: Encode<'a, DB> + Type<DB>,
{
    q.push(" WHERE account = ")
        .push_bind(account)
        .push(" AND resource_type = ")
        .push_bind(resource_type)
        .push(" AND ")
        .push(id_column)
        .push(" IN (");
    let mut list = q.separated(", ");
    for id in ids {
        list.push_bind(*id);
    }
    list.push_unseparated(")");
}

/// The page's records, each id once (its last occurrence wins, as the upsert did before),
/// in page order.
fn last_of_each_id(rows: Vec<PageRow>) -> Vec<PageRow> {
    let mut seen: HashSet<String> = HashSet::with_capacity(rows.len());
    let mut kept: Vec<PageRow> = rows
        .into_iter()
        .rev()
        .filter(|r| seen.insert(r.id.clone()))
        .collect();
    kept.reverse();
    kept
}

/// Replaces the derived rows (`patient_rows`, the view tables) of the `changed` records (id,
/// change, what it derives; the values move into the statements). A created record has none
/// yet (a deleted one lost them with its deletion): only updated ones have rows to remove first.
async fn write_derived(
    tx: &mut Tx,
    views: &ViewSet,
    account: &str,
    resource_type: &str,
    mut changed: Vec<(&PageRow, ChangeKind, Derived)>,
) -> Result<(), StoreError> {
    if changed.is_empty() {
        return Ok(());
    }
    let updated: Vec<&str> = changed
        .iter()
        .filter(|(_, k, _)| *k == ChangeKind::Updated)
        .map(|(row, _, _)| row.id.as_str())
        .collect();
    if is_patient_type(resource_type) {
        for ids in updated.chunks(ROWS_PER_STATEMENT) {
            on!(&mut *tx, c, d => {
                let mut q = d::builder("DELETE FROM patient_rows");
                push_key_filter(&mut q, account, resource_type, "id", ids);
                q.build().execute(&mut **c).await?;
            });
        }
        for chunk in changed.chunks_mut(ROWS_PER_STATEMENT) {
            let rows: Vec<(&PageRow, crate::views::patients::PatientRow)> = chunk
                .iter_mut()
                .filter_map(|(row, _, d)| d.patient.take().map(|p| (*row, p)))
                .collect();
            if rows.is_empty() {
                continue;
            }
            on!(&mut *tx, c, d => {
                let mut q = d::builder(
                    "INSERT INTO patient_rows (account, resource_type, id, family, given, \
                     birth_date, gender, last_updated) ",
                );
                q.push_values(rows, |mut b, (row, p)| {
                    b.push_bind(account)
                        .push_bind(resource_type)
                        .push_bind(&row.id)
                        .push_bind(p.family)
                        .push_bind(p.given)
                        .push_bind(p.birth_date)
                        .push_bind(p.gender)
                        .push_bind(&row.last_updated);
                });
                q.build().execute(&mut **c).await?;
            });
        }
    }
    for (i, view) in views.for_type(resource_type).enumerate() {
        let table = quote(&view.table);
        let width = view.columns.len() + 2;
        for ids in updated.chunks(ROWS_PER_STATEMENT) {
            on!(&mut *tx, c, d => {
                let mut q = d::builder(format!("DELETE FROM {table} WHERE account = "));
                q.push_bind(account).push(" AND resource_id IN (");
                let mut list = q.separated(", ");
                for id in ids {
                    list.push_bind(*id);
                }
                list.push_unseparated(")");
                q.build().execute(&mut **c).await?;
            });
        }
        let rows: Vec<(&str, Vec<SqlValue>)> = changed
            .iter_mut()
            .filter_map(|(row, _, d)| {
                d.views
                    .get_mut(i)
                    .map(|v| (row.id.as_str(), std::mem::take(v)))
            })
            .flat_map(|(id, rows)| rows.into_iter().map(move |v| (id, v)))
            .collect();
        insert_view_rows(tx, view, account, rows, width).await?;
    }
    Ok(())
}

/// Inserts `rows` (resource id, values) into `view`'s table, as many per statement as
/// SQLite's variable limit allows. Each NULL binds with its column's type, and on PostgreSQL a
/// column without a type (SQLite's `ANY`) is text, so its numbers bind as text there.
pub(super) async fn insert_view_rows(
    tx: &mut Tx,
    view: &crate::views::Materialised,
    account: &str,
    rows: Vec<(&str, Vec<SqlValue>)>,
    width: usize,
) -> Result<(), StoreError> {
    let per_statement = (30_000 / width.max(1)).clamp(1, ROWS_PER_STATEMENT);
    let columns: Vec<String> = crate::views::KEY_COLUMNS
        .iter()
        .map(|c| quote(c))
        .chain(view.columns.iter().map(|c| quote(&c.name)))
        .collect();
    let head = format!(
        "INSERT INTO {} ({}) ",
        quote(&view.table),
        columns.join(", ")
    );
    let postgres = matches!(tx, Backend::Postgres(_));
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        on!(&mut *tx, c, d => {
            let mut q = d::builder(head.clone());
            q.push_values(rows.by_ref().take(per_statement), |mut b, (id, values)| {
                b.push_bind(account).push_bind(id);
                let values = values.into_iter().chain(std::iter::repeat(SqlValue::Null));
                for (value, column) in values.zip(&view.columns) {
                    let text = postgres && column.sql_type == "ANY";
                    match value {
                        SqlValue::Null if column.sql_type == "INTEGER" => {
                            b.push_bind(None::<i64>)
                        }
                        SqlValue::Null if column.sql_type == "REAL" => b.push_bind(None::<f64>),
                        SqlValue::Null => b.push_bind(None::<String>),
                        SqlValue::Integer(i) if text => b.push_bind(i.to_string()),
                        SqlValue::Real(f) if text => b.push_bind(f.to_string()),
                        SqlValue::Integer(i) => b.push_bind(i),
                        SqlValue::Real(f) => b.push_bind(f),
                        SqlValue::Text(t) => b.push_bind(t),
                    };
                }
            });
            q.build().execute(&mut **c).await?;
        });
    }
    Ok(())
}
