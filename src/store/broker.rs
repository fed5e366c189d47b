//! `broker_clients`: each broker client's last use and request counts, for `ehrsync status`.

use sqlx::AssertSqlSafe;

use super::backend::on;
use super::{Store, StoreError};

/// A client's stored use.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct BrokerClientRow {
    pub name: String,
    pub last_used_at: Option<i64>,
    pub last_account: Option<String>,
    pub requests: i64,
    pub refused: i64,
}

impl Store {
    /// Adds `requests` and `refused` to `name`'s counts and sets its last use.
    pub async fn add_broker_usage(
        &self,
        name: &str,
        last_used_at: Option<i64>,
        last_account: Option<&str>,
        requests: u64,
        refused: u64,
    ) -> Result<(), StoreError> {
        let (name, last_account) = (name.to_owned(), last_account.map(str::to_owned));
        let requests = i64::try_from(requests).unwrap_or(i64::MAX);
        let refused = i64::try_from(refused).unwrap_or(i64::MAX);
        self.shield(|s| async move {
            on!(&s.db, pool, d => d::query(AssertSqlSafe(format!(
                "INSERT INTO broker_clients AS c (name, last_used_at, last_account, requests, \
                 refused) VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (name) DO UPDATE SET \
                 last_used_at = CASE WHEN excluded.last_used_at IS NULL THEN c.last_used_at \
                 ELSE {}(coalesce(c.last_used_at, 0), excluded.last_used_at) END, \
                 last_account = coalesce(excluded.last_account, c.last_account), \
                 requests = c.requests + excluded.requests, refused = c.refused + excluded.refused",
                d::GREATEST
            )))
            .bind(&name)
            .bind(last_used_at)
            .bind(&last_account)
            .bind(requests)
            .bind(refused)
            .execute(pool)
            .await
            .map(|_| ()))?;
            Ok(())
        })
        .await
    }

    /// Every client's stored use, by name.
    pub async fn broker_clients(&self) -> Result<Vec<BrokerClientRow>, StoreError> {
        Ok(on!(&self.db, pool, d => d::query_as(
            "SELECT name, last_used_at, last_account, requests, refused FROM broker_clients \
             ORDER BY name",
        )
        .fetch_all(pool)
        .await)?)
    }
}
