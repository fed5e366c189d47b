//! `agents`: one row per running `ehrsync run`, so that `status` (and other agents sharing the
//! database) can tell whether an agent is alive: written at start, the heartbeat renewed while
//! it runs, removed on a clean stop. A row whose heartbeat is stale, or whose process this host
//! can prove gone, belongs to an agent that did not stop cleanly.

use super::backend::on;
use super::{Holder, Store, StoreError, this_host};

/// An agent's row.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AgentRow {
    pub id: String,
    pub host: String,
    pub host_key: String,
    pub pid: i64,
    pub pid_started: i64,
    pub version: String,
    pub started_at: i64,
    pub heartbeat_at: i64,
}

impl AgentRow {
    /// Whether the agent is alive at `now` (Unix seconds): its heartbeat is no older than
    /// `stale_after` seconds, and if it ran on this host, its process still exists.
    pub fn alive(&self, now: i64, stale_after: i64) -> bool {
        if now.saturating_sub(self.heartbeat_at) > stale_after {
            return false;
        }
        let lease_like = super::LeaseRow {
            holder: self.id.clone(),
            expires_at: i64::MAX,
            generation: 0,
            host: self.host_key.clone(),
            pid: self.pid,
            pid_started: self.pid_started,
        };
        !lease_like.holder_is_dead()
    }
}

impl Store {
    /// Records `holder` as a running agent of `version`, started and alive at `now`.
    pub async fn register_agent(
        &self,
        holder: &Holder,
        version: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        let (holder, version) = (holder.clone(), version.to_owned());
        self.shield(|s| async move {
            on!(&s.lease_db, pool, d => d::query(
                "INSERT INTO agents (id, host, host_key, pid, pid_started, version, started_at, \
                 heartbeat_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) \
                 ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
            )
            .bind(holder.id())
            .bind(holder.host_name())
            .bind(this_host())
            .bind(i64::from(holder.pid()))
            .bind(i64::try_from(holder.pid_started()).unwrap_or(0))
            .bind(&version)
            .bind(now)
            .bind(now)
            .execute(pool)
            .await
            .map(|_| ()))?;
            Ok(())
        })
        .await
    }

    /// Renews `holder`'s heartbeat at `now`. False when its row is gone (then it is written
    /// again by the caller).
    pub async fn heartbeat(&self, holder: &Holder, now: i64) -> Result<bool, StoreError> {
        let id = holder.id().to_owned();
        self.shield(|s| async move {
            let done = on!(&s.lease_db, pool, d =>
                d::query("UPDATE agents SET heartbeat_at = ? WHERE id = ?")
                    .bind(now)
                    .bind(&id)
                    .execute(pool)
                    .await?
                    .rows_affected());
            Ok(done == 1)
        })
        .await
    }

    /// Removes `holder`'s row: a clean stop.
    pub async fn unregister_agent(&self, holder: &Holder) -> Result<(), StoreError> {
        let id = holder.id().to_owned();
        self.shield(|s| async move {
            on!(&s.lease_db, pool, d => d::query("DELETE FROM agents WHERE id = ?")
                .bind(&id)
                .execute(pool)
                .await
                .map(|_| ()))?;
            Ok(())
        })
        .await
    }

    /// Every agent row, the most recent heartbeat first.
    pub async fn agents(&self) -> Result<Vec<AgentRow>, StoreError> {
        self.shield(|s| async move {
            Ok(on!(&s.db, pool, d => d::query_as(
                "SELECT id, host, host_key, pid, pid_started, version, started_at, heartbeat_at \
                 FROM agents ORDER BY heartbeat_at DESC, id",
            )
            .fetch_all(pool)
            .await)?)
        })
        .await
    }
}
