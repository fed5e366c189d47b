//! Streaming a table out (`ehrsync export`): rows are read one at a time from the database and
//! handed to the caller's writer, so an export's memory stays flat whatever its size.

use futures_util::TryStreamExt as _;
use sqlx::{AssertSqlSafe, Column as _, Row as _, TypeInfo as _, ValueRef as _};

use super::backend::on;
use super::{Store, StoreError};

/// What to export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportQuery {
    /// Every column of a table or view (a materialised view, `patients`).
    Table { name: String },
    /// The live records of one resource type, each as its JSON.
    Resources { resource_type: String },
}

/// A value of an exported row, borrowed from the database's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ExportValue<'a> {
    Null,
    Integer(i64),
    Real(f64),
    Text(&'a str),
}

/// What an export hands its writer: the column names once, then each row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ExportEvent<'a> {
    Header(&'a [&'a str]),
    Row(&'a [ExportValue<'a>]),
}

/// Why an export stopped.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write the export: {0}")]
    Write(std::io::Error),
}

impl Store {
    /// Streams `query`'s rows (of `account` only, when given) in key order to `sink`: the
    /// column names first, then each row. Returns the number of rows.
    pub async fn export(
        &self,
        query: &ExportQuery,
        account: Option<&str>,
        mut sink: impl FnMut(ExportEvent<'_>) -> std::io::Result<()>,
    ) -> Result<u64, ExportError> {
        let filter = if account.is_some() {
            " WHERE account = ?"
        } else {
            ""
        };
        let sql = match query {
            ExportQuery::Table { name } => {
                let table = crate::views::quote(name);
                let key = if name.starts_with("view_") {
                    "account, resource_id"
                } else {
                    "account, id"
                };
                format!("SELECT * FROM {table}{filter} ORDER BY {key}")
            }
            ExportQuery::Resources { .. } => format!(
                "SELECT account, id, data FROM resources \
                 WHERE resource_type = ?2 AND deleted_at IS NULL{} ORDER BY account, id",
                if account.is_some() {
                    " AND account = ?1"
                } else {
                    ""
                }
            ),
        };
        let n = on!(&self.db, pool, d => {
        let mut q = d::query(AssertSqlSafe(sql));
        match query {
            ExportQuery::Table { .. } => {
                if let Some(a) = account {
                    q = q.bind(a.to_owned());
                }
            }
            ExportQuery::Resources { resource_type } => {
                q = q
                    .bind(account.unwrap_or_default().to_owned())
                    .bind(resource_type.clone());
            }
        }
        let mut rows = q.fetch(pool);
        let mut n = 0u64;
        let mut header_done = false;
        while let Some(r) = rows.try_next().await.map_err(StoreError::from)? {
            if !header_done {
                let names: Vec<&str> = r.columns().iter().map(|c| c.name()).collect();
                sink(ExportEvent::Header(&names)).map_err(ExportError::Write)?;
                header_done = true;
            }
            let mut values: Vec<ExportValue<'_>> = Vec::with_capacity(r.len());
            for i in 0..r.len() {
                let raw = r.try_get_raw(i).map_err(StoreError::from)?;
                let v = if raw.is_null() {
                    ExportValue::Null
                } else {
                    // SQLite's storage classes, PostgreSQL's types.
                    match raw.type_info().name() {
                        "INTEGER" | "INT8" => {
                            ExportValue::Integer(r.try_get(i).map_err(StoreError::from)?)
                        }
                        "REAL" | "FLOAT8" => {
                            ExportValue::Real(r.try_get(i).map_err(StoreError::from)?)
                        }
                        _ => ExportValue::Text(r.try_get(i).map_err(StoreError::from)?),
                    }
                };
                values.push(v);
            }
            sink(ExportEvent::Row(&values)).map_err(ExportError::Write)?;
            n += 1;
        }
        n
        });
        Ok(n)
    }
}
