//! The tables of materialised SQL-on-FHIR views: created and (re)built from `resources` when
//! their definition is new or changed, dropped when no longer configured. Keeping them up to
//! date page by page is `store::sync`'s part.

use sqlx::AssertSqlSafe;

use super::backend::on;
use super::sync::insert_view_rows;
use super::{Store, StoreError};
use crate::views::{KEY_COLUMNS, Materialised, ViewSet, quote};

/// Records read from `resources` per step of a rebuild.
const REBUILD_BATCH: i64 = 2000;

/// What [`Store::prepare_views`] did to one view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prepared {
    /// Its table matches its definition.
    Current { name: String },
    /// Built from `resources`: new, changed, or asked for; `rows` rows from `records` records.
    Built {
        name: String,
        records: u64,
        rows: u64,
    },
    /// No longer configured: its table was dropped.
    Dropped { name: String },
}

impl Store {
    /// Brings every view table in line with `views`: a view whose table is missing or was
    /// built from another definition is rebuilt; tables of views no longer configured are
    /// dropped. Each view in its own transaction.
    pub async fn prepare_views(
        &self,
        views: &ViewSet,
        at: i64,
    ) -> Result<Vec<Prepared>, StoreError> {
        let built: Vec<(String, String)> = self
            .shield(|s| async move {
                Ok(on!(&s.db, pool, d => d::query_as(
                    "SELECT name, definition FROM materialised_views"
                )
                .fetch_all(pool)
                .await)?)
            })
            .await?;
        let mut done = Vec::new();
        for (name, _) in &built {
            if views.get(name).is_none() {
                self.drop_view(name).await?;
                done.push(Prepared::Dropped { name: name.clone() });
            }
        }
        for view in views.all() {
            let current = built
                .iter()
                .any(|(n, d)| *n == view.name && *d == view.fingerprint)
                && self.table_exists(&view.table).await?;
            if current {
                done.push(Prepared::Current {
                    name: view.name.clone(),
                });
            } else {
                done.push(self.rebuild_view(views, &view.name, at).await?);
            }
        }
        Ok(done)
    }

    /// Rebuilds the view `name` of `views` from the live records in `resources`, in one
    /// transaction (pulls wait for it, up to the busy timeout).
    pub async fn rebuild_view(
        &self,
        views: &ViewSet,
        name: &str,
        at: i64,
    ) -> Result<Prepared, StoreError> {
        let (views, name) = (views.clone(), name.to_owned());
        self.shield(|s| async move {
            let Some(view) = views.get(&name) else {
                return Err(StoreError::Task(format!(
                    "no view named {name} is configured"
                )));
            };
            let mut tx = s.db.begin().await?;
            for sql in create_statements(view, s.db.is_postgres()) {
                on!(&mut tx, c, d => d::query(AssertSqlSafe(sql)).execute(&mut **c).await.map(|_| ()))?;
            }
            let (mut records, mut rows) = (0u64, 0u64);
            // Where the last batch ended, in key order (the primary key's, so each batch is a
            // range of its index): (account, id).
            let mut after = (String::new(), String::new());
            loop {
                let batch: Vec<(String, String, String)> = on!(&mut tx, c, d => d::query_as(
                    "SELECT account, id, data FROM resources \
                     WHERE (account, resource_type, id) > (?1, ?2, ?3) AND resource_type = ?2 \
                       AND deleted_at IS NULL \
                     ORDER BY account, resource_type, id LIMIT ?4",
                )
                .bind(&after.0)
                .bind(&view.resource_type)
                .bind(&after.1)
                .bind(REBUILD_BATCH)
                .fetch_all(&mut **c)
                .await)?;
                let Some(last) = batch.last() else {
                    break;
                };
                after = (last.0.clone(), last.1.clone());
                // Rows per account, so that each insert binds one account.
                let mut evaluated: Vec<(String, String, Vec<Vec<crate::views::SqlValue>>)> =
                    Vec::with_capacity(batch.len());
                for (account, id, data) in batch {
                    records += 1;
                    let Ok(json) = serde_json::from_str::<serde_json::Value>(&data) else {
                        continue;
                    };
                    if let Ok(r) = view.evaluate(&json) {
                        rows += r.len() as u64;
                        evaluated.push((account, id, r));
                    }
                }
                evaluated.sort_by(|a, b| a.0.cmp(&b.0));
                for group in evaluated.chunk_by_mut(|a, b| a.0 == b.0) {
                    let account = group[0].0.clone();
                    let taken: Vec<_> = group
                        .iter_mut()
                        .map(|(_, _, r)| std::mem::take(r))
                        .collect();
                    let flat: Vec<(&str, Vec<crate::views::SqlValue>)> = group
                        .iter()
                        .zip(taken)
                        .flat_map(|((_, id, _), r)| r.into_iter().map(move |v| (id.as_str(), v)))
                        .collect();
                    insert_view_rows(&mut tx, view, &account, flat, view.columns.len() + 2).await?;
                }
            }
            on!(&mut tx, c, d => d::query(
                "INSERT INTO materialised_views (name, resource_type, definition, built_at) \
                 VALUES (?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET \
                 resource_type = excluded.resource_type, definition = excluded.definition, \
                 built_at = excluded.built_at",
            )
            .bind(&view.name)
            .bind(&view.resource_type)
            .bind(&view.fingerprint)
            .bind(at)
            .execute(&mut **c)
            .await.map(|_| ()))?;
            tx.commit().await?;
            Ok(Prepared::Built {
                name: view.name.clone(),
                records,
                rows,
            })
        })
        .await
    }

    /// Rows in `table`, a view's table; `None` when it does not exist.
    pub async fn count_rows(&self, table: &str) -> Result<Option<u64>, StoreError> {
        if !crate::views::valid_name(table) || !self.table_exists(table).await? {
            return Ok(None);
        }
        let sql = format!("SELECT count(*) FROM {}", quote(table));
        self.shield(|s| async move {
            let n: i64 = on!(&s.db, pool, d => d::query_scalar(AssertSqlSafe(sql))
                .fetch_one(pool)
                .await)?;
            Ok(Some(n.max(0) as u64))
        })
        .await
    }

    async fn drop_view(&self, name: &str) -> Result<(), StoreError> {
        let name = name.to_owned();
        self.shield(|s| async move {
            let mut tx = s.db.begin().await?;
            if crate::views::valid_name(&name) {
                let table = quote(&format!("view_{}", name.to_ascii_lowercase()));
                let sql = format!("DROP TABLE IF EXISTS {table}");
                on!(&mut tx, c, d => d::query(AssertSqlSafe(sql)).execute(&mut **c).await.map(|_| ()))?;
            }
            on!(&mut tx, c, d => d::query("DELETE FROM materialised_views WHERE name = ?")
                .bind(&name)
                .execute(&mut **c)
                .await.map(|_| ()))?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    async fn table_exists(&self, table: &str) -> Result<bool, StoreError> {
        let table = table.to_owned();
        self.shield(|s| async move {
            Ok(on!(&s.db, pool, d => d::query_scalar::<bool>(d::HAS_TABLE)
                .bind(&table)
                .fetch_one(pool)
                .await)?)
        })
        .await
    }
}

/// Drops and creates `view`'s table and its index on the key columns. On SQLite the table is
/// STRICT, so a value never silently changes type; on PostgreSQL every table is, and a column
/// without a type (SQLite's `ANY`) is text there.
fn create_statements(view: &Materialised, postgres: bool) -> Vec<String> {
    let table = quote(&view.table);
    let mut columns: Vec<String> = KEY_COLUMNS
        .iter()
        .map(|c| format!("{} TEXT NOT NULL", quote(c)))
        .collect();
    columns.extend(view.columns.iter().map(|c| {
        let ty = match (postgres, c.sql_type) {
            (true, "INTEGER") => "BIGINT",
            (true, "REAL") => "DOUBLE PRECISION",
            (true, _) => "TEXT",
            (false, ty) => ty,
        };
        format!("{} {ty}", quote(&c.name))
    }));
    let strict = if postgres { "" } else { " STRICT" };
    vec![
        format!("DROP TABLE IF EXISTS {table}"),
        format!("CREATE TABLE {table} ({}){strict}", columns.join(", ")),
        format!(
            "CREATE INDEX {} ON {table} (account, resource_id)",
            quote(&format!("{}_by_resource", view.table))
        ),
    ]
}
