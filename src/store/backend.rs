//! The two databases a [`Store`](super::Store) can sit on, and how one body of store code runs
//! on either.
//!
//! SQLite (a file, the default) and PostgreSQL (a server several agents share) are both reached
//! through sqlx's own drivers, not its `Any` driver: SQLite keeps its connection settings
//! (WAL, `synchronous = FULL`, the busy timeout), and neither pays for converting each value
//! to a common type. A store method is written once; [`on!`] expands its statements for each
//! backend, where sqlx's types differ (a `SqliteRow` is not a `PgRow`), and gives them the
//! backend's [`sqlite`] or [`postgres`] module: `query`, `query_as`, `query_scalar` and
//! `builder`, plus the few SQL fragments the two dialects spell differently.
//!
//! Statements are written with SQLite's placeholders, `?` (numbered in order) or `?N`, which
//! [`postgres`] renumbers as `$N`; everything else in them is SQL both databases read alike
//! (`ON CONFLICT`, `RETURNING`, `excluded`, row values). Every bound value is an `i64`, `f64`,
//! text or bytes, and every column is `BIGINT`, `DOUBLE PRECISION`, `TEXT` or `BYTEA` on
//! PostgreSQL (see `migrations/postgres/`), so a value binds alike on both.

use sqlx::{Postgres, Sqlite};

/// One of each backend's version of something: a pool, a transaction.
#[derive(Debug, Clone)]
pub enum Backend<S, P> {
    Sqlite(S),
    Postgres(P),
}

/// A store's connections.
pub type Db = Backend<sqlx::SqlitePool, sqlx::PgPool>;

/// An open transaction on either backend.
pub type Tx = Backend<sqlx::Transaction<'static, Sqlite>, sqlx::Transaction<'static, Postgres>>;

impl Db {
    pub fn is_postgres(&self) -> bool {
        matches!(self, Backend::Postgres(_))
    }

    /// A transaction for reading and then writing. On SQLite it takes the write lock at once
    /// (`BEGIN IMMEDIATE`): a deferred transaction could not upgrade to a writer once another
    /// process wrote meanwhile (SQLITE_BUSY at once, without the busy timeout's wait). On
    /// PostgreSQL rows are locked as they are written, and fences lock the lease row
    /// ([`postgres::LOCK_SHARED`]).
    pub async fn begin_write(&self) -> Result<Tx, sqlx::Error> {
        Ok(match self {
            Backend::Sqlite(p) => Backend::Sqlite(p.begin_with("BEGIN IMMEDIATE").await?),
            Backend::Postgres(p) => Backend::Postgres(p.begin().await?),
        })
    }

    /// A transaction whose first statement decides (SQLite's default, deferred).
    pub async fn begin(&self) -> Result<Tx, sqlx::Error> {
        Ok(match self {
            Backend::Sqlite(p) => Backend::Sqlite(p.begin().await?),
            Backend::Postgres(p) => Backend::Postgres(p.begin().await?),
        })
    }

    pub async fn close(&self) {
        match self {
            Backend::Sqlite(p) => p.close().await,
            Backend::Postgres(p) => p.close().await,
        }
    }
}

impl Tx {
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Backend::Sqlite(t) => t.commit().await,
            Backend::Postgres(t) => t.commit().await,
        }
    }
}

/// Runs `$body` with `$c` bound to the backend's value inside `$on` (a [`Db`] pool, or a
/// [`Tx`]'s transaction) and `$d` naming that backend's module ([`sqlite`] or [`postgres`]).
/// `$body` is compiled once per backend, so it must give both arms the same type: read rows
/// into plain values inside it.
///
/// ```ignore
/// let n: u64 = on!(&self.db, pool, d => d::query("DELETE FROM agents WHERE id = ?")
///     .bind(&id).execute(pool).await?.rows_affected());
/// ```
macro_rules! on {
    ($on:expr, $c:ident, $d:ident => $body:expr) => {
        match $on {
            $crate::store::backend::Backend::Sqlite($c) => {
                #[allow(unused_imports)]
                use $crate::store::backend::sqlite as $d;
                $body
            }
            $crate::store::backend::Backend::Postgres($c) => {
                #[allow(unused_imports)]
                use $crate::store::backend::postgres as $d;
                $body
            }
        }
    };
}
pub(crate) use on;

/// SQLite: statements as written.
pub mod sqlite {
    use sqlx::query::{Query, QueryAs, QueryScalar};
    use sqlx::sqlite::SqliteArguments;
    use sqlx::{FromRow, QueryBuilder, SqlSafeStr, Sqlite};

    pub type Db = Sqlite;

    pub fn query<'q>(sql: impl SqlSafeStr) -> Query<'q, Sqlite, SqliteArguments> {
        sqlx::query(sql)
    }

    pub fn query_as<'q, O>(sql: impl SqlSafeStr) -> QueryAs<'q, Sqlite, O, SqliteArguments>
    where
        O: for<'r> FromRow<'r, sqlx::sqlite::SqliteRow>,
    {
        sqlx::query_as(sql)
    }

    pub fn query_scalar<'q, O>(sql: impl SqlSafeStr) -> QueryScalar<'q, Sqlite, O, SqliteArguments>
    where
        (O,): for<'r> FromRow<'r, sqlx::sqlite::SqliteRow>,
    {
        sqlx::query_scalar(sql)
    }

    /// A statement assembled piece by piece (`push_bind` numbers its own placeholders).
    pub fn builder(head: impl Into<String>) -> QueryBuilder<Sqlite> {
        QueryBuilder::new(head)
    }

    /// The larger of two values (SQLite's two-argument `max`).
    pub const GREATEST: &str = "max";
    /// Whether sqlx's migrations table exists.
    pub const HAS_MIGRATIONS: &str = "SELECT EXISTS (SELECT 1 FROM sqlite_master \
         WHERE type = 'table' AND name = '_sqlx_migrations')";
    /// Whether the table named by the one parameter exists.
    pub const HAS_TABLE: &str =
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?)";
    /// A lock on the row a fence reads, so that nobody takes the lease between the check
    /// and the commit: none needed, as a SQLite writer holds the whole database.
    pub const LOCK_SHARED: &str = "";
}

/// PostgreSQL: `?` and `?N` renumbered as `$N`.
pub mod postgres {
    use sqlx::postgres::{PgArguments, PgRow};
    use sqlx::query::{Query, QueryAs, QueryScalar};
    use sqlx::{AssertSqlSafe, FromRow, Postgres, QueryBuilder, SqlSafeStr};

    pub type Db = Postgres;

    pub fn query<'q>(sql: impl SqlSafeStr) -> Query<'q, Postgres, PgArguments> {
        sqlx::query(AssertSqlSafe(numbered(sql.into_sql_str().as_str())))
    }

    pub fn query_as<'q, O>(sql: impl SqlSafeStr) -> QueryAs<'q, Postgres, O, PgArguments>
    where
        O: for<'r> FromRow<'r, PgRow>,
    {
        sqlx::query_as(AssertSqlSafe(numbered(sql.into_sql_str().as_str())))
    }

    pub fn query_scalar<'q, O>(sql: impl SqlSafeStr) -> QueryScalar<'q, Postgres, O, PgArguments>
    where
        (O,): for<'r> FromRow<'r, PgRow>,
    {
        sqlx::query_scalar(AssertSqlSafe(numbered(sql.into_sql_str().as_str())))
    }

    /// A statement assembled piece by piece (`push_bind` numbers its own placeholders; pieces
    /// pushed must not hold `?`).
    pub fn builder(head: impl Into<String>) -> QueryBuilder<Postgres> {
        QueryBuilder::new(head)
    }

    pub const GREATEST: &str = "greatest";
    pub const HAS_MIGRATIONS: &str = "SELECT EXISTS (SELECT 1 FROM information_schema.tables \
         WHERE table_schema = current_schema() AND table_name = '_sqlx_migrations')";
    pub const HAS_TABLE: &str = "SELECT EXISTS (SELECT 1 FROM information_schema.tables \
         WHERE table_schema = current_schema() AND table_name = ?)";
    /// Locks the lease row a fence reads until the transaction ends: a takeover (an update of
    /// that row) waits for this commit, and one committed first makes the fence fail.
    pub const LOCK_SHARED: &str = " FOR SHARE";

    /// `sql` with SQLite's placeholders as PostgreSQL's: `?N` becomes `$N`, and each bare `?`
    /// the next number. Quoted text and identifiers are left alone. (sqlx's SQLite driver
    /// does not allow both forms in one statement, so neither do callers.)
    pub fn numbered(sql: &str) -> String {
        let mut out = String::with_capacity(sql.len() + 8);
        let mut next = 0u32;
        let mut quote: Option<char> = None;
        let mut chars = sql.chars().peekable();
        while let Some(c) = chars.next() {
            match (quote, c) {
                (Some(q), _) if c == q => {
                    quote = None;
                    out.push(c);
                }
                (Some(_), _) => out.push(c),
                (None, '\'' | '"') => {
                    quote = Some(c);
                    out.push(c);
                }
                (None, '?') => {
                    out.push('$');
                    if chars.peek().is_some_and(char::is_ascii_digit) {
                        while let Some(d) = chars.next_if(char::is_ascii_digit) {
                            out.push(d);
                        }
                    } else {
                        next += 1;
                        out.push_str(&next.to_string());
                    }
                }
                (None, _) => out.push(c),
            }
        }
        out
    }

    #[cfg(test)]
    mod tests {
        use super::numbered;

        #[test]
        fn placeholders_are_renumbered_outside_quotes() {
            assert_eq!(
                numbered("SELECT a FROM t WHERE b = ? AND c IN (?, ?)"),
                "SELECT a FROM t WHERE b = $1 AND c IN ($2, $3)"
            );
            assert_eq!(
                numbered("DELETE FROM x WHERE at >= ?1 OR at < ?12"),
                "DELETE FROM x WHERE at >= $1 OR at < $12"
            );
            assert_eq!(
                numbered("SELECT '?', \"a?\" FROM t WHERE x = ?"),
                "SELECT '?', \"a?\" FROM t WHERE x = $1"
            );
            assert_eq!(
                numbered("SELECT 'it''s ?' WHERE y = ?"),
                "SELECT 'it''s ?' WHERE y = $1"
            );
        }
    }
}
