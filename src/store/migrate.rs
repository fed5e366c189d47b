//! `ehrsync migrate-store`: copies a SQLite store, whole, into an empty PostgreSQL database
//! with the same schema (`migrations/postgres`, kept in step by `tests/schema_parity.rs`).
//!
//! Every table PostgreSQL's schema has is copied from one consistent snapshot of the SQLite
//! database (one read transaction) inside one PostgreSQL transaction, so the target ends with
//! all of it or nothing. Tokens stay sealed: their bytes are copied, and the agents on
//! PostgreSQL open them with the same key. Not copied: the view tables and
//! `materialised_views` (the first start on PostgreSQL builds them from the records) and the
//! migration history (PostgreSQL has its own). Then it checks: each table's row count on both
//! sides, and a sample of rows (about 100 a table, spread over it) found in PostgreSQL with
//! every column equal.

use futures_util::TryStreamExt;
use sqlx::postgres::{PgPool, Postgres};
use sqlx::{AssertSqlSafe, QueryBuilder, Row};

use super::{POSTGRES_MIGRATOR, Store};
use crate::views::quote;

/// Tables PostgreSQL's schema has that are not copied.
const NOT_COPIED: [&str; 2] = ["_sqlx_migrations", "materialised_views"];

/// About this many rows of each table are checked column by column after the copy.
const SAMPLES_PER_TABLE: u64 = 100;

/// PostgreSQL takes at most 65,535 bind parameters a statement.
const MAX_PARAMETERS: usize = 65_535;

/// What one table's copy did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableCopied {
    pub table: String,
    pub rows: u64,
    /// Rows checked column by column in PostgreSQL after the copy.
    pub sampled: u64,
}

/// Why the copy was refused or failed. Nothing is left half-copied: the target's transaction
/// rolls back.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(
        "the PostgreSQL database already holds ehrsync data ({table}: {rows} rows); migrate-store only fills an empty one"
    )]
    NotEmpty { table: String, rows: i64 },
    #[error(
        "the SQLite database is in use ({agents} agents running, {leases} leases held); stop every ehrsync process on it first"
    )]
    InUse { agents: usize, leases: i64 },
    #[error(
        "the SQLite database is at schema version {sqlite}, PostgreSQL's schema at {postgres}; use the same ehrsync version for both"
    )]
    Versions { sqlite: i64, postgres: i64 },
    #[error("{table}: column {column} has PostgreSQL type {ty}, which migrate-store does not copy")]
    UnknownType {
        table: String,
        column: String,
        ty: String,
    },
    #[error("the check after the copy failed: {0}")]
    Verify(String),
    #[error("cannot apply the PostgreSQL schema: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    Database(#[from] sqlx::Error),
    #[error("{0}")]
    Store(#[from] super::StoreError),
}

/// How a column's values travel: by PostgreSQL's column type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Int,
    Real,
    Text,
    Bytes,
}

/// One column value, read from SQLite by its target's kind.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Int(Option<i64>),
    Real(Option<f64>),
    Text(Option<String>),
    Bytes(Option<Vec<u8>>),
}

struct Table {
    name: String,
    columns: Vec<(String, Kind)>,
}

/// Copies `source` into `target` (see the module's documentation) after applying PostgreSQL's
/// schema to it. Refuses when the target already holds data, or the source is in use: an
/// agent's heartbeat is fresh or a lease is held at `now` (Unix seconds).
pub async fn copy_to_postgres(
    source: &Store,
    target: &PgPool,
    now: i64,
) -> Result<Vec<TableCopied>, MigrateError> {
    POSTGRES_MIGRATOR.run(target).await?;
    let sqlite = source.schema_version().await?;
    let postgres: i64 =
        sqlx::query_scalar("SELECT coalesce(max(version), 0) FROM _sqlx_migrations")
            .fetch_one(target)
            .await?;
    if sqlite != postgres {
        return Err(MigrateError::Versions { sqlite, postgres });
    }
    let tables = target_tables(target).await?;
    for table in &tables {
        let rows: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM {}",
            quote(&table.name)
        )))
        .fetch_one(target)
        .await?;
        if rows > 0 {
            return Err(MigrateError::NotEmpty {
                table: table.name.clone(),
                rows,
            });
        }
    }

    // An agent between token requests holds no lease, but would refresh (and rotate) tokens
    // after the copy: a live heartbeat counts too.
    let agents = source.agents().await?;

    // One read transaction: every table from the same snapshot.
    let Some(pool) = source.sqlite_pool() else {
        return Err(MigrateError::Verify(
            "the source is not a SQLite database".to_owned(),
        ));
    };
    let mut read = pool.begin().await?;
    let leases: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM token_leases WHERE expires_at > ?1) \
              + (SELECT count(*) FROM job_leases WHERE expires_at > ?1)",
    )
    .bind(now)
    .fetch_one(&mut *read)
    .await?;
    let stale = i64::try_from(crate::agent::HEARTBEAT_STALE.as_secs()).unwrap_or(45);
    let agents = agents.iter().filter(|a| a.alive(now, stale)).count();
    if leases > 0 || agents > 0 {
        return Err(MigrateError::InUse { agents, leases });
    }
    let mut write = target.begin().await?;
    // The copy reads SQLite between its inserts; a large table must not look like a stalled
    // agent to the server (`store::IDLE_IN_TRANSACTION`).
    sqlx::query("SET LOCAL idle_in_transaction_session_timeout = 0")
        .execute(&mut *write)
        .await?;
    let mut copied = Vec::new();
    let mut samples: Vec<(usize, Vec<Value>)> = Vec::new();
    for (t, table) in tables.iter().enumerate() {
        let count: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM {}",
            quote(&table.name)
        )))
        .fetch_one(&mut *read)
        .await?;
        let every = (u64::try_from(count).unwrap_or(0) / SAMPLES_PER_TABLE).max(1);
        let names: Vec<String> = table.columns.iter().map(|(c, _)| quote(c)).collect();
        let select = format!("SELECT {} FROM {}", names.join(", "), quote(&table.name));
        let per_statement = (MAX_PARAMETERS / table.columns.len().max(1)).clamp(1, 1000);
        let mut rows = sqlx::query(AssertSqlSafe(select)).fetch(&mut *read);
        let mut batch: Vec<Vec<Value>> = Vec::new();
        let (mut n, mut sampled) = (0u64, 0u64);
        while let Some(row) = rows.try_next().await? {
            let values = table
                .columns
                .iter()
                .enumerate()
                .map(|(i, (_, kind))| read_value(&row, i, *kind))
                .collect::<Result<Vec<_>, _>>()?;
            if n % every == 0 {
                samples.push((t, values.clone()));
                sampled += 1;
            }
            n += 1;
            batch.push(values);
            if batch.len() == per_statement {
                insert(&mut write, table, &names, std::mem::take(&mut batch)).await?;
            }
        }
        drop(rows);
        if !batch.is_empty() {
            insert(&mut write, table, &names, batch).await?;
        }
        copied.push(TableCopied {
            table: table.name.clone(),
            rows: n,
            sampled,
        });
    }
    // Identity columns continue after the copied values.
    for (table, column) in [("sync_runs", "id"), ("changes", "seq")] {
        sqlx::query(AssertSqlSafe(format!(
            "SELECT setval(pg_get_serial_sequence('{table}', '{column}'), \
             coalesce((SELECT max({column}) FROM {table}), 0) + 1, false)"
        )))
        .execute(&mut *write)
        .await?;
    }
    write.commit().await?;
    read.rollback().await?;

    verify(target, &tables, &copied, &samples).await?;
    Ok(copied)
}

/// The tables of PostgreSQL's schema to copy, with their columns in order.
async fn target_tables(target: &PgPool) -> Result<Vec<Table>, MigrateError> {
    let columns: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT c.table_name::text, c.column_name::text, c.data_type::text \
         FROM information_schema.columns AS c \
         JOIN information_schema.tables AS t \
           ON t.table_schema = c.table_schema AND t.table_name = c.table_name \
         WHERE c.table_schema = current_schema() AND t.table_type = 'BASE TABLE' \
         ORDER BY c.table_name, c.ordinal_position",
    )
    .fetch_all(target)
    .await?;
    let mut tables: Vec<Table> = Vec::new();
    for (table, column, ty) in columns {
        if NOT_COPIED.contains(&table.as_str()) {
            continue;
        }
        let kind = match ty.as_str() {
            "bigint" | "integer" | "smallint" => Kind::Int,
            "double precision" | "real" => Kind::Real,
            "text" | "character varying" => Kind::Text,
            "bytea" => Kind::Bytes,
            _ => {
                return Err(MigrateError::UnknownType { table, column, ty });
            }
        };
        match tables.last_mut() {
            Some(t) if t.name == table => t.columns.push((column, kind)),
            _ => tables.push(Table {
                name: table,
                columns: vec![(column, kind)],
            }),
        }
    }
    Ok(tables)
}

fn read_value(row: &sqlx::sqlite::SqliteRow, i: usize, kind: Kind) -> Result<Value, sqlx::Error> {
    Ok(match kind {
        Kind::Int => Value::Int(row.try_get(i)?),
        Kind::Real => Value::Real(row.try_get(i)?),
        Kind::Text => Value::Text(row.try_get(i)?),
        Kind::Bytes => Value::Bytes(row.try_get(i)?),
    })
}

fn bind(q: &mut QueryBuilder<Postgres>, v: Value) {
    match v {
        Value::Int(x) => q.push_bind(x),
        Value::Real(x) => q.push_bind(x),
        Value::Text(x) => q.push_bind(x),
        Value::Bytes(x) => q.push_bind(x),
    };
}

async fn insert(
    write: &mut sqlx::Transaction<'_, Postgres>,
    table: &Table,
    names: &[String],
    batch: Vec<Vec<Value>>,
) -> Result<(), sqlx::Error> {
    let mut q: QueryBuilder<Postgres> = QueryBuilder::new(format!(
        "INSERT INTO {} ({}) VALUES ",
        quote(&table.name),
        names.join(", ")
    ));
    for (r, row) in batch.into_iter().enumerate() {
        q.push(if r == 0 { "(" } else { ", (" });
        for (i, v) in row.into_iter().enumerate() {
            if i > 0 {
                q.push(", ");
            }
            bind(&mut q, v);
        }
        q.push(")");
    }
    q.build().execute(&mut **write).await?;
    Ok(())
}

/// Row counts on both sides, then each sampled row found in PostgreSQL with every column equal.
async fn verify(
    target: &PgPool,
    tables: &[Table],
    copied: &[TableCopied],
    samples: &[(usize, Vec<Value>)],
) -> Result<(), MigrateError> {
    for (table, done) in tables.iter().zip(copied) {
        let rows: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM {}",
            quote(&table.name)
        )))
        .fetch_one(target)
        .await?;
        if u64::try_from(rows).ok() != Some(done.rows) {
            return Err(MigrateError::Verify(format!(
                "{}: {} rows read from SQLite, {rows} in PostgreSQL",
                table.name, done.rows
            )));
        }
    }
    for (t, values) in samples {
        let table = &tables[*t];
        let mut q: QueryBuilder<Postgres> = QueryBuilder::new(format!(
            "SELECT count(*) FROM {} WHERE ",
            quote(&table.name)
        ));
        for (i, ((column, _), v)) in table.columns.iter().zip(values).enumerate() {
            if i > 0 {
                q.push(" AND ");
            }
            q.push(format!("{} IS NOT DISTINCT FROM ", quote(column)));
            bind(&mut q, v.clone());
        }
        let found: i64 = q.build_query_scalar().fetch_one(target).await?;
        if found == 0 {
            // Which row is not said: its columns may hold patient data or sealed tokens.
            return Err(MigrateError::Verify(format!(
                "{}: a sampled row is not in PostgreSQL as it is in SQLite",
                table.name
            )));
        }
    }
    Ok(())
}
