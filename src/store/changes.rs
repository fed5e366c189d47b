//! Reading and pruning the `changes` log (written by `store::sync` with the pages and
//! reconciles that made each change).

use super::backend::on;
use super::{Store, StoreError};

/// A row of `changes`.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, serde::Serialize)]
pub struct ChangeRow {
    pub seq: i64,
    pub account: String,
    pub resource_type: String,
    pub id: String,
    pub kind: String,
    pub version_id: Option<String>,
    pub last_updated: Option<String>,
    pub run_id: Option<i64>,
    /// Unix seconds.
    pub at: i64,
}

/// Which changes to read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeFilter {
    pub account: Option<String>,
    pub resource_type: Option<String>,
    /// Only changes with a larger `seq`.
    pub after_seq: Option<i64>,
    /// Only changes made at or after this time (Unix seconds).
    pub since_time: Option<i64>,
}

impl Store {
    /// Up to `limit` changes matching `filter` with `seq` above `after`, in `seq` order (read
    /// in steps, so a long log never sits in memory whole).
    pub async fn read_changes(
        &self,
        filter: &ChangeFilter,
        after: i64,
        limit: u32,
    ) -> Result<Vec<ChangeRow>, StoreError> {
        let filter = filter.clone();
        self.shield(|s| async move {
            Ok(on!(&s.db, pool, d => {
            let mut q = d::builder(
                "SELECT seq, account, resource_type, id, kind, version_id, last_updated, run_id, at \
                 FROM changes WHERE seq > ",
            );
            q.push_bind(after.max(filter.after_seq.unwrap_or(0)));
            if let Some(a) = &filter.account {
                q.push(" AND account = ").push_bind(a.clone());
            }
            if let Some(t) = &filter.resource_type {
                q.push(" AND resource_type = ").push_bind(t.clone());
            }
            if let Some(at) = filter.since_time {
                q.push(" AND at >= ").push_bind(at);
            }
            q.push(" ORDER BY seq LIMIT ").push_bind(i64::from(limit));
            q.build_query_as().fetch_all(pool).await?
            }))
        })
        .await
    }

    /// Deletes the changes older than the first one made at or after `before` (Unix seconds);
    /// returns how many. By `seq`, so it needs no index on the time (the log is written in
    /// time order; after a clock step back, a few rows may wait for the next prune).
    pub async fn prune_changes(&self, before: i64) -> Result<u64, StoreError> {
        self.shield(|s| async move {
            Ok(on!(&s.db, pool, d => d::query(
                "DELETE FROM changes WHERE seq < coalesce(\
                 (SELECT seq FROM changes WHERE at >= ?1 ORDER BY seq LIMIT 1), \
                 (SELECT max(seq) + 1 FROM changes WHERE at < ?1), 0)",
            )
            .bind(before)
            .execute(pool)
            .await?
            .rows_affected()))
        })
        .await
    }
}
