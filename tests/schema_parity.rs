//! The SQLite and PostgreSQL schemas stay in step: a fresh database of each, migrated, has the
//! same tables and views, the same columns in the same order with the same types (SQLite's
//! INTEGER, TEXT and BLOB are PostgreSQL's BIGINT, TEXT and BYTEA) and nullability, and the same
//! secondary indexes. Runs where `EHRSYNC_TEST_POSTGRES` names a server (`.ci/test` starts one);
//! without it the test is skipped, unless `EHRSYNC_REQUIRE_POSTGRES` is set (as in CI).

mod common;

use std::collections::BTreeMap;

use sqlx::{AssertSqlSafe, Connection, Row};

/// Table or view → its columns: (name, type, not null).
type Columns = BTreeMap<String, Vec<(String, String, bool)>>;

fn sqlite_type(declared: &str) -> String {
    match declared.to_ascii_uppercase().as_str() {
        "INTEGER" => "bigint",
        "TEXT" => "text",
        "BLOB" => "bytea",
        "REAL" => "double precision",
        other => panic!("a SQLite column type the parity test does not know: {other:?}"),
    }
    .to_owned()
}

async fn sqlite_schema(pool: &sqlx::SqlitePool) -> (Columns, Vec<String>) {
    let names: Vec<(String, String)> = sqlx::query_as(
        "SELECT name, type FROM sqlite_master WHERE type IN ('table', 'view', 'index') \
         AND name NOT LIKE 'sqlite_%' AND name <> '_sqlx_migrations' AND sql IS NOT NULL",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut columns = Columns::new();
    let mut indexes = Vec::new();
    for (name, kind) in names {
        if kind == "index" {
            indexes.push(name);
            continue;
        }
        let rows = sqlx::query(AssertSqlSafe(format!("PRAGMA table_info(\"{name}\")")))
            .fetch_all(pool)
            .await
            .unwrap();
        let cols = rows
            .iter()
            .map(|r| {
                let declared: String = r.get("type");
                let not_null: i64 = r.get("notnull");
                let pk: i64 = r.get("pk");
                // A view's columns are nullable to PostgreSQL whatever their source says.
                let not_null = kind == "table" && (not_null == 1 || pk > 0);
                (r.get::<String, _>("name"), sqlite_type(&declared), not_null)
            })
            .collect();
        columns.insert(name, cols);
    }
    indexes.sort();
    (columns, indexes)
}

async fn postgres_schema(pg: &mut sqlx::PgConnection, schema: &str) -> (Columns, Vec<String>) {
    let rows = sqlx::query(
        "SELECT table_name::text AS t, column_name::text AS c, data_type::text AS ty, \
         is_nullable::text AS n FROM information_schema.columns \
         WHERE table_schema = $1 AND table_name <> '_sqlx_migrations' \
         ORDER BY table_name, ordinal_position",
    )
    .bind(schema)
    .fetch_all(&mut *pg)
    .await
    .unwrap();
    let mut columns = Columns::new();
    for r in rows {
        columns.entry(r.get("t")).or_default().push((
            r.get("c"),
            r.get("ty"),
            r.get::<String, _>("n") == "NO",
        ));
    }
    let mut indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexname::text FROM pg_indexes WHERE schemaname = $1 \
         AND indexname NOT LIKE '%\\_pkey' AND tablename <> '_sqlx_migrations'",
    )
    .bind(schema)
    .fetch_all(&mut *pg)
    .await
    .unwrap();
    indexes.sort();
    (columns, indexes)
}

#[tokio::test]
async fn sqlite_and_postgres_schemas_match() {
    let Some(url) = common::test_postgres() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = ehrsync::store::Store::open(&dir.path().join("ehrsync.db"))
        .await
        .unwrap();
    let (lite_columns, lite_indexes) = sqlite_schema(store.sqlite_pool().unwrap()).await;
    store.close().await;

    let mut pg = sqlx::PgConnection::connect(&url).await.unwrap();
    let schema = format!("parity_{}", std::process::id());
    for statement in [
        format!("DROP SCHEMA IF EXISTS {schema} CASCADE"),
        format!("CREATE SCHEMA {schema}"),
        format!("SET search_path TO {schema}"),
    ] {
        sqlx::query(AssertSqlSafe(statement))
            .execute(&mut pg)
            .await
            .unwrap();
    }
    ehrsync::store::POSTGRES_MIGRATOR
        .run(&mut pg)
        .await
        .unwrap();
    let (pg_columns, pg_indexes) = postgres_schema(&mut pg, &schema).await;
    sqlx::query(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
        .execute(&mut pg)
        .await
        .unwrap();

    let lite_tables: Vec<&String> = lite_columns.keys().collect();
    let pg_tables: Vec<&String> = pg_columns.keys().collect();
    assert_eq!(lite_tables, pg_tables, "the same tables and views");
    for (table, columns) in &lite_columns {
        assert_eq!(columns, &pg_columns[table], "the columns of {table}");
    }
    assert_eq!(lite_indexes, pg_indexes, "the same secondary indexes");
    assert_eq!(
        ehrsync::store::POSTGRES_MIGRATOR
            .iter()
            .map(|m| m.version)
            .max(),
        Some(ehrsync::store::supported_schema_version()),
        "both backends at the same schema version"
    );
}
