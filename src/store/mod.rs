//! The store: opening it safely, migrating it, and the queries the rest of the crate runs, on
//! SQLite (a file, the default) or PostgreSQL (a database several agents share); see
//! [`backend`] for how one body of code serves both.
//!
//! Invariants kept here for SQLite: the database file is mode 0600 (SQLite gives its `-wal`/`-shm` files
//! the same mode) inside a directory created 0700; WAL mode with `synchronous = FULL`, so a
//! committed write (a rotated refresh token above all) survives a power cut; a busy timeout so
//! concurrent `ehrsync` processes wait rather than fail; migrations from `migrations/` are
//! embedded and applied at open, and a database written by a newer ehrsync is refused rather
//! than touched. Read-only opens (for `status`) never create, migrate or modify anything.

mod agents;
pub mod backend;
mod broker;
mod changes;
mod export;
mod lease;
pub mod migrate;
mod sync;
mod views;

pub use agents::AgentRow;
pub use broker::BrokerClientRow;
pub use changes::{ChangeFilter, ChangeRow};
pub use export::{ExportError, ExportEvent, ExportQuery, ExportValue};
pub use lease::{Holder, Lease, LeaseKey, LeaseRow, process_started, this_host};
pub use sync::{
    ChangeKind, JobHistory, PageChanges, PageRow, Reconciled, RunStart, STORED_ON_POSTGRES,
};
pub use views::Prepared;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::SqlitePool;
// Audited: the only SQL built at run time here is made of `&'static str` fragments chosen by
// `LeaseKey` (table and key columns); every value is a bound parameter.
use sqlx::AssertSqlSafe;
use sqlx::ConnectOptions as _;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

pub use crate::config::Database;
use backend::{Backend, Db, on};

/// The schema, embedded from `migrations/` at build time.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// The same schema for PostgreSQL, from `migrations/postgres/` (it starts at version 7, the
/// SQLite schema's state then); `tests/schema_parity.rs` keeps the two in step.
pub static POSTGRES_MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// How long a statement waits for another process's write lock before failing with "busy".
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a PostgreSQL session may sit inside a transaction without a statement before the
/// server ends it. Every transaction the agent opens is a few statements with no network wait
/// between them, so only a stopped or cut-off agent reaches this: the server then drops its
/// session and the row locks it held, which would otherwise stall every other agent's writes
/// to those rows until the process resumed or its TCP connection timed out.
pub const IDLE_IN_TRANSACTION: Duration = Duration::from_secs(15);

/// SQLite allows one writer; a few readers beside it are all the agent needs.
const MAX_CONNECTIONS: u32 = 4;
/// Connections to a PostgreSQL store, per process: writers do not wait for each other there,
/// and each agent's accounts and jobs share these.
const POSTGRES_CONNECTIONS: u32 = 8;
/// A writing connection's page cache, at most (SQLite's default is 2 MiB).
const PAGE_CACHE_KIB: u32 = 32 * 1024;
/// WAL pages between automatic checkpoints (SQLite's default is 1,000).
const WAL_AUTOCHECKPOINT_PAGES: u32 = 8000;

/// The newest schema version this build knows.
pub fn supported_schema_version() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the database directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create the database file {path}: {source}")]
    CreateFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the database {database}: {source}")]
    Open {
        database: String,
        source: sqlx::Error,
    },
    #[error(
        "the database {database} has schema version {found}, newer than this ehrsync supports \
         ({supported}); run the newer ehrsync that wrote it, or restore a backup from before the upgrade"
    )]
    TooNew {
        database: String,
        found: i64,
        supported: i64,
    },
    #[error(
        "the database {database} has schema version {found}; this ehrsync needs {supported}. \
         Start the agent (`ehrsync run`) once to upgrade it"
    )]
    NeedsMigration {
        database: String,
        found: i64,
        supported: i64,
    },
    #[error("cannot migrate the database {database}: {source}")]
    Migrate {
        database: String,
        source: sqlx::migrate::MigrateError,
    },
    #[error("database error: {0}")]
    Query(#[from] sqlx::Error),
    #[error("the database task failed: {0}")]
    Task(String),
    /// A write under a lease found the lease in other hands (fencing): nothing was written.
    #[error("the {0} lease was taken over by another process; nothing was written")]
    LeaseLost(&'static str),
    #[error(
        "cannot read the database {path} consistently as this user: its write-ahead log {wal} \
         holds changes not yet in the database file, and reading them needs a `-shm` file that \
         this user cannot create beside it. Run this as the user that runs ehrsync, or while \
         `ehrsync run` is running (it keeps that file), or after it has stopped cleanly (it \
         folds the log into the database)"
    )]
    WalUnreadable { path: PathBuf, wal: PathBuf },
}

/// Whether store calls go through the blocking pool (see [`shielded`]); the binary turns it off.
static SHIELD: AtomicBool = AtomicBool::new(true);

/// Makes [`shielded`] run database futures on the caller's task, without the blocking-pool hop
/// that only tokio's paused test clock needs. The binary calls this once at start (measured
/// with 1,000 accounts: 521 threads became 9, RSS fell from 48 to 34 MB and CPU by a third); tests
/// that pause time must not.
pub fn unshield() {
    SHIELD.store(false, Ordering::Relaxed);
}

/// Runs a database future from a blocking-pool thread. SQLite work happens on sqlx's own worker
/// thread, and under tokio's paused test clock an await on another thread lets simulated time
/// jump to the next timer (measured: an hour passed during a 50 ms wait). Tokio does not advance
/// paused time while a blocking task runs, so database calls made through here take no
/// simulated time. After [`unshield`] (the binary) the future is simply awaited.
pub async fn shielded<F, T>(work: F) -> Result<T, StoreError>
where
    F: std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    T: Send + 'static,
{
    if !SHIELD.load(Ordering::Relaxed) {
        return work.await;
    }
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || handle.block_on(work))
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
}

/// An open database.
#[derive(Debug, Clone)]
pub struct Store {
    db: Db,
    /// For leases and heartbeats. On SQLite a pool of its own with `synchronous = NORMAL`,
    /// because a lease lost in a power cut just expires, and fsyncing every take and release
    /// of a lease made a 15-day outage test with thousands of retries nine times slower. On
    /// PostgreSQL the same pool.
    lease_db: Db,
    database: Database,
}

impl From<&Path> for Database {
    fn from(path: &Path) -> Database {
        Database::File(path.to_owned())
    }
}

impl From<&PathBuf> for Database {
    fn from(path: &PathBuf) -> Database {
        Database::File(path.clone())
    }
}

impl From<&Database> for Database {
    fn from(database: &Database) -> Database {
        database.clone()
    }
}

impl Store {
    /// Opens (creating a SQLite file if needed) the database for reading and writing, and
    /// brings its schema up to date.
    pub async fn open(database: impl Into<Database>) -> Result<Store, StoreError> {
        let database = database.into();
        shielded(async move {
            match database {
                Database::File(path) => Store::open_now(&path).await,
                Database::Postgres { url, password } => {
                    let store = Store::open_postgres(&url, password.as_ref(), false).await?;
                    store.migrate().await?;
                    Ok(store)
                }
            }
        })
        .await
    }

    /// Opens an existing database read-only, for inspection. `Ok(None)` when there is no file
    /// yet (or, on PostgreSQL, no schema). The schema must be exactly the one this build knows.
    pub async fn open_read_only(
        database: impl Into<Database>,
    ) -> Result<Option<Store>, StoreError> {
        let database = database.into();
        shielded(async move {
            match database {
                Database::File(path) => Store::open_read_only_now(&path).await,
                Database::Postgres { url, password } => {
                    let store = Store::open_postgres(&url, password.as_ref(), true).await?;
                    let found = store.schema_version_now().await?;
                    if found == 0 {
                        store.close().await;
                        return Ok(None);
                    }
                    store.check_version(found)?;
                    Ok(Some(store))
                }
            }
        })
        .await
    }

    /// Connects to the PostgreSQL database at `url`. `read_only` sessions refuse writes
    /// (`default_transaction_read_only`).
    async fn open_postgres(
        url: &str,
        password: Option<&crate::config::Secret>,
        read_only: bool,
    ) -> Result<Store, StoreError> {
        let database = Database::Postgres {
            url: url.to_owned(),
            password: password.cloned(),
        };
        let open_err = |source| StoreError::Open {
            database: url.to_owned(),
            source,
        };
        let mut options: PgConnectOptions = url.parse().map_err(open_err)?;
        if let Some(p) = password {
            options = options.password(p.expose());
        }
        options = options
            .application_name("ehrsync")
            .log_slow_statements(log::LevelFilter::Warn, BUSY_TIMEOUT);
        // As SQLite's busy timeout: a statement waits this long for another session's lock,
        // then fails ("busy"), and the caller retries as after any store error.
        options = options.options([
            ("lock_timeout", format!("{}ms", BUSY_TIMEOUT.as_millis())),
            (
                "idle_in_transaction_session_timeout",
                format!("{}ms", IDLE_IN_TRANSACTION.as_millis()),
            ),
        ]);
        if read_only {
            options = options.options([("default_transaction_read_only", "on")]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(if read_only { 2 } else { POSTGRES_CONNECTIONS })
            .acquire_timeout(BUSY_TIMEOUT.saturating_mul(2))
            .connect_with(options)
            .await
            .map_err(open_err)?;
        let db = Backend::Postgres(pool);
        Ok(Store {
            lease_db: db.clone(),
            db,
            database,
        })
    }

    /// Refuses a schema version other than this build's.
    fn check_version(&self, found: i64) -> Result<(), StoreError> {
        let supported = supported_schema_version();
        let database = self.database.to_string();
        if found > supported {
            return Err(StoreError::TooNew {
                database,
                found,
                supported,
            });
        }
        if found < supported {
            return Err(StoreError::NeedsMigration {
                database,
                found,
                supported,
            });
        }
        Ok(())
    }

    /// The highest migration applied successfully; 0 for a database ehrsync has never migrated.
    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        self.shield(|s| async move { s.schema_version_now().await })
            .await
    }

    /// Every stored token state, for `status`. Token columns are not read.
    pub async fn token_states(&self) -> Result<Vec<TokenStateRow>, StoreError> {
        self.shield(|s| async move { s.token_states_now().await })
            .await
    }

    /// The latest run of every (account, job) that has run at least once.
    pub async fn latest_runs(&self) -> Result<Vec<SyncRunRow>, StoreError> {
        self.shield(|s| async move { s.latest_runs_now().await })
            .await
    }

    /// Writes one account's token state in a single statement: with `synchronous = FULL` it is
    /// on disk when this returns, so a rotated refresh token is durable before it is used.
    ///
    /// Never overwrites tokens of a higher generation (another process's newer login or
    /// refresh), and, under `lease`, writes only while the lease still holds (fencing). False
    /// when either refused the write.
    pub async fn save_token(
        &self,
        record: &TokenRecord,
        lease: Option<&Lease>,
    ) -> Result<bool, StoreError> {
        let (record, lease) = (record.clone(), lease.cloned());
        self.shield(|s| async move { s.save_token_now(&record, lease.as_ref()).await })
            .await
    }

    /// Records, durably, that `holder` is about to send a refresh request presenting the
    /// refresh token of `generation` (see migration 0004): whoever takes the lease next and
    /// finds it still set knows the answer was never read. Under `lease` (fenced). False when
    /// nothing was written (no stored row, or the lease is gone).
    pub async fn mark_request(
        &self,
        lease: &Lease,
        generation: i64,
        sent_at: i64,
    ) -> Result<bool, StoreError> {
        let lease = lease.clone();
        self.shield(|s| async move {
            let LeaseKey::Token { account } = &lease.key else {
                return Ok(false);
            };
            let done = on!(&s.db, pool, d => {
                let sql = format!(
                    "UPDATE token_state SET request_holder = ?, request_generation = ?, \
                     request_sent_at = ? WHERE account = ? AND {}",
                    lease.key.fence(d::LOCK_SHARED)
                );
                let q = d::query(AssertSqlSafe(sql))
                    .bind(lease.holder.as_str())
                    .bind(generation)
                    .bind(sent_at)
                    .bind(account.as_str());
                lease.bind_fence(q).execute(pool).await?.rows_affected()
            });
            Ok(done == 1)
        })
        .await
    }

    /// One account's stored token state, sealed columns included.
    pub async fn load_token(&self, account: &str) -> Result<Option<TokenRecord>, StoreError> {
        let account = account.to_owned();
        self.shield(|s| async move { s.load_token_now(&account).await })
            .await
    }

    /// Drops `account`'s stored tokens and token state (its login settings changed, so they
    /// belong to another identity). The next owner of the account starts with a login.
    pub async fn forget_tokens(&self, account: &str) -> Result<(), StoreError> {
        let account = account.to_owned();
        self.shield(|s| async move {
            on!(&s.db, pool, d => d::query("DELETE FROM token_state WHERE account = ?")
                .bind(&account)
                .execute(pool)
                .await
                .map(|_| ()))?;
            Ok(())
        })
        .await
    }

    /// The cached discovery document of `issuer` and when it was fetched (Unix seconds).
    pub async fn load_provider(&self, issuer: &str) -> Result<Option<(String, i64)>, StoreError> {
        let issuer = issuer.to_owned();
        self.shield(|s| async move {
            let row: Option<(String, i64)> = on!(&s.db, pool, d =>
                d::query_as("SELECT document, fetched_at FROM oidc_providers WHERE issuer = ?")
                    .bind(&issuer)
                    .fetch_optional(pool)
                    .await)?;
            Ok(row)
        })
        .await
    }

    /// Stores `issuer`'s discovery document as fetched at `fetched_at` (Unix seconds).
    pub async fn save_provider(
        &self,
        issuer: &str,
        document: &str,
        fetched_at: i64,
    ) -> Result<(), StoreError> {
        let (issuer, document) = (issuer.to_owned(), document.to_owned());
        self.shield(|s| async move {
            on!(&s.db, pool, d => d::query(
                "INSERT INTO oidc_providers (issuer, document, fetched_at) VALUES (?, ?, ?) \
                 ON CONFLICT (issuer) DO UPDATE SET document = excluded.document, \
                 fetched_at = excluded.fetched_at",
            )
            .bind(&issuer)
            .bind(&document)
            .bind(fetched_at)
            .execute(pool)
            .await
            .map(|_| ()))?;
            Ok(())
        })
        .await
    }

    pub async fn close(self) {
        // Closing only waits for connections to finish; there is nothing to report.
        let _ = shielded(async move {
            self.lease_db.close().await;
            self.db.close().await;
            Ok(())
        })
        .await;
    }

    /// Runs `work` on this store through [`shielded`].
    async fn shield<T, F, Fut>(&self, work: F) -> Result<T, StoreError>
    where
        F: FnOnce(Store) -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
        T: Send + 'static,
    {
        shielded(work(self.clone())).await
    }

    async fn open_now(path: &Path) -> Result<Store, StoreError> {
        prepare_file(path)?;
        let options = SqliteConnectOptions::new()
            .filename(path)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true)
            .pragma("cache_size", format!("-{PAGE_CACHE_KIB}"))
            .pragma("temp_store", "memory")
            .pragma("wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES.to_string())
            // sqlx warns of statements over 1 s by default, which a first pull's index build
            // (about 1.2 s a million patients) and the writes waiting for it reach as a matter
            // of course; one as slow as the busy timeout is worth a warning.
            .log_slow_statements(log::LevelFilter::Warn, BUSY_TIMEOUT);
        let mut store = Store::connect(path, options.clone()).await?;
        store.migrate().await?;
        // A run that dropped the name index and never ended (a crash) left it missing.
        sync::ensure_name_index(&store.db).await;
        store.lease_db = Backend::Sqlite(
            connect_pool(path, 1, options.synchronous(SqliteSynchronous::Normal)).await?,
        );
        Ok(store)
    }

    async fn open_read_only_now(path: &Path) -> Result<Option<Store>, StoreError> {
        if !path.exists() {
            return Ok(None);
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .read_only(true)
            .busy_timeout(BUSY_TIMEOUT);
        let (store, found) = match Store::read_only_checked(path, options.clone()).await {
            Ok(opened) => opened,
            Err(e) if Store::lacks_wal_index(&e) => Store::open_immutable(path, options, e).await?,
            Err(e) => return Err(e),
        };
        if let Err(e) = store.check_version(found) {
            store.close().await;
            return Err(e);
        }
        Ok(Some(store))
    }

    /// Opens with `options` and reads the schema version, which is when SQLite first reads the
    /// file (and its WAL).
    async fn read_only_checked(
        path: &Path,
        options: SqliteConnectOptions,
    ) -> Result<(Store, i64), StoreError> {
        let store = Store::connect(path, options).await?;
        match store.schema_version_now().await {
            Ok(found) => Ok((store, found)),
            Err(e) => {
                store.close().await;
                Err(e)
            }
        }
    }

    /// The read-only open of a WAL-mode database by a user who cannot create its `-shm` file
    /// (the directory or file system is read-only to them, e.g. an operator in the service's
    /// group): `failed` is why the normal open failed.
    ///
    /// SQLite (since 3.22) reads a WAL database read-only when its `-wal` and `-shm` exist, as
    /// they do while the agent runs or after it crashed, or when it may create them. Otherwise
    /// the only read-only way is `immutable=1`, which skips locking and the WAL: SQLite then
    /// assumes nothing changes the file. That is true enough here only when there is no WAL
    /// (or an empty one): every commit is then in the database file, and no writer is attached
    /// (a writer's connection keeps `-wal` and `-shm`, and a normal open would have worked).
    /// What remains is a writer starting during the few milliseconds `status` reads: its
    /// commits go to a new WAL this read does not see (as if `status` had run a moment
    /// earlier), and only a checkpoint copying pages into the file mid-read could show a torn
    /// page, as an error or an odd row in a report that writes nothing. A non-empty WAL holds
    /// commits that an immutable read would silently miss, so it is refused, saying what to do.
    /// (`locking_mode=EXCLUSIVE` with `nolock=1` would read a WAL without `-shm`, just as
    /// unlocked; SQLite documents exclusive mode for the file's sole user, not for a reader
    /// beside a writer.)
    async fn open_immutable(
        path: &Path,
        options: SqliteConnectOptions,
        failed: StoreError,
    ) -> Result<(Store, i64), StoreError> {
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        let wal = PathBuf::from(wal);
        match std::fs::metadata(&wal) {
            Ok(m) if m.len() > 0 => {
                return Err(StoreError::WalUnreadable {
                    path: path.to_owned(),
                    wal,
                });
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(_) => return Err(failed),
        }
        tracing::debug!(path = %path.display(), error = %failed, "cannot create the database's -shm file; reading it as immutable (it has no WAL)");
        Store::read_only_checked(path, options.immutable(true)).await
    }

    /// Whether `e` is SQLite failing to open a WAL-mode database read-only for want of its `-shm`
    /// (wal-index) file, which it may not create: SQLITE_READONLY_DIRECTORY (1544) when there is no
    /// WAL either, SQLITE_CANTOPEN (14) when only the WAL exists (measured with the bundled
    /// SQLite, `tests/status_read_only.rs`). Other READONLY codes (SQLITE_READONLY_CANTINIT, 1288)
    /// mean the same in other versions. A file the user cannot read at all also gives CANTOPEN; the
    /// immutable open that follows then fails the same way.
    fn lacks_wal_index(e: &StoreError) -> bool {
        const SQLITE_READONLY: i32 = 8;
        const SQLITE_CANTOPEN: i32 = 14;
        let (StoreError::Query(sqlx::Error::Database(db))
        | StoreError::Open {
            source: sqlx::Error::Database(db),
            ..
        }) = e
        else {
            return false;
        };
        db.code()
            .and_then(|c| c.parse::<i32>().ok())
            .is_some_and(|c| matches!(c & 0xff, SQLITE_READONLY | SQLITE_CANTOPEN))
    }

    async fn connect(path: &Path, options: SqliteConnectOptions) -> Result<Store, StoreError> {
        let pool = Backend::Sqlite(connect_pool(path, MAX_CONNECTIONS, options).await?);
        // Read-only stores take no leases; writable ones get their own lease pool in `open_now`.
        Ok(Store {
            lease_db: pool.clone(),
            db: pool,
            database: Database::File(path.to_owned()),
        })
    }

    /// Where this store lives.
    pub fn database(&self) -> &Database {
        &self.database
    }

    /// The connections, for code that must speak to one backend itself (`migrate-store`,
    /// tests).
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The SQLite pool, when the store is a SQLite file.
    pub fn sqlite_pool(&self) -> Option<&SqlitePool> {
        match &self.db {
            Backend::Sqlite(p) => Some(p),
            Backend::Postgres(_) => None,
        }
    }

    /// Whether several agents may share this store (PostgreSQL).
    pub fn is_shared(&self) -> bool {
        self.db.is_postgres()
    }

    async fn schema_version_now(&self) -> Result<i64, StoreError> {
        let has_table: bool = on!(&self.db, pool, d => d::query_scalar(d::HAS_MIGRATIONS)
            .fetch_one(pool)
            .await)?;
        if !has_table {
            return Ok(0);
        }
        let version: Option<i64> = on!(&self.db, pool, d =>
            d::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
                .fetch_one(pool)
                .await)?;
        Ok(version.unwrap_or(0))
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let supported = supported_schema_version();
        let found = self.schema_version_now().await?;
        if found > supported {
            return Err(StoreError::TooNew {
                database: self.database.to_string(),
                found,
                supported,
            });
        }
        // Two processes opening a fresh database at once (`ehrsync run` and `ehrsync login`
        // started together) race to apply the same migrations; the loser fails on "table
        // already exists" while the winner is still migrating. Applied migrations are recorded
        // one by one, so running again continues where the other stopped.
        let deadline = tokio::time::Instant::now() + BUSY_TIMEOUT;
        loop {
            let ran = match &self.db {
                Backend::Sqlite(pool) => MIGRATOR.run(pool).await,
                // PostgreSQL's migrator holds an advisory lock while it works.
                Backend::Postgres(pool) => POSTGRES_MIGRATOR.run(pool).await,
            };
            match ran {
                Ok(()) => return Ok(()),
                Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(source) => {
                    return Err(StoreError::Migrate {
                        database: self.database.to_string(),
                        source,
                    });
                }
            }
        }
    }

    async fn token_states_now(&self) -> Result<Vec<TokenStateRow>, StoreError> {
        Ok(on!(&self.db, pool, d => d::query_as(
            "SELECT account, state, access_token_expires_at, next_refresh_at, \
                    refresh_token_expires_at, last_error, updated_at \
             FROM token_state ORDER BY account",
        )
        .fetch_all(pool)
        .await)?)
    }

    async fn latest_runs_now(&self) -> Result<Vec<SyncRunRow>, StoreError> {
        Ok(on!(&self.db, pool, d => d::query_as(
            "SELECT r.account, r.job, r.\"full\" <> 0 AS \"full\", r.started_at, r.finished_at, r.outcome, r.pages, \
                    r.records, r.error \
             FROM sync_runs AS r \
             JOIN (SELECT max(id) AS id FROM sync_runs GROUP BY account, job) AS latest \
               ON latest.id = r.id \
             ORDER BY r.account, r.job",
        )
        .fetch_all(pool)
        .await)?)
    }

    async fn save_token_now(
        &self,
        r: &TokenRecord,
        lease: Option<&Lease>,
    ) -> Result<bool, StoreError> {
        let fence = |lock| match lease {
            Some(l) => l.key.fence(lock),
            None => "true".to_owned(),
        };
        // INSERT … SELECT, so that a first write under a lease is fenced too (the WHERE also
        // tells SQLite's parser that ON CONFLICT belongs to the INSERT).
        let sql = "INSERT INTO token_state (account, state, access_token, access_token_issued_at, \
                 access_token_expires_at, next_refresh_at, refresh_token, refresh_token_issued_at, \
                 refresh_token_expires_at, generation, last_error, updated_at, request_holder, \
                 request_generation, request_sent_at, credentials) \
             SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ? WHERE {fence} \
             ON CONFLICT (account) DO UPDATE SET \
                 state = excluded.state, access_token = excluded.access_token, \
                 access_token_issued_at = excluded.access_token_issued_at, \
                 access_token_expires_at = excluded.access_token_expires_at, \
                 next_refresh_at = excluded.next_refresh_at, refresh_token = excluded.refresh_token, \
                 refresh_token_issued_at = excluded.refresh_token_issued_at, \
                 refresh_token_expires_at = excluded.refresh_token_expires_at, \
                 generation = excluded.generation, last_error = excluded.last_error, \
                 updated_at = excluded.updated_at, request_holder = excluded.request_holder, \
                 request_generation = excluded.request_generation, \
                 request_sent_at = excluded.request_sent_at, \
                 credentials = coalesce(excluded.credentials, token_state.credentials) \
             WHERE token_state.generation <= excluded.generation";
        let done = on!(&self.db, pool, d => {
        let sql = sql.replace("{fence}", &fence(d::LOCK_SHARED));
        let q = d::query(AssertSqlSafe(sql))
            .bind(&r.account)
            .bind(&r.state)
            .bind(&r.access_token)
            .bind(r.access_token_issued_at)
            .bind(r.access_token_expires_at)
            .bind(r.next_refresh_at)
            .bind(&r.refresh_token)
            .bind(r.refresh_token_issued_at)
            .bind(r.refresh_token_expires_at)
            .bind(r.generation)
            .bind(&r.last_error)
            .bind(r.updated_at)
            .bind(&r.request_holder)
            .bind(r.request_generation)
            .bind(r.request_sent_at)
            .bind(&r.credentials);
        let q = match lease {
            Some(l) => l.bind_fence(q),
            None => q,
        };
        q.execute(pool).await?.rows_affected()
        });
        Ok(done == 1)
    }

    async fn load_token_now(&self, account: &str) -> Result<Option<TokenRecord>, StoreError> {
        Ok(on!(&self.db, pool, d => d::query_as(
            "SELECT account, state, access_token, access_token_issued_at, access_token_expires_at, \
                    next_refresh_at, refresh_token, refresh_token_issued_at, refresh_token_expires_at, \
                    generation, last_error, updated_at, request_holder, request_generation, \
                    request_sent_at, credentials \
             FROM token_state WHERE account = ?",
        )
        .bind(account)
        .fetch_optional(pool)
        .await)?)
    }
}

/// A pool on `path`. Opening sets the journal mode, which SQLite answers with "busy" without
/// waiting when another process is opening the same new database at that moment (`ehrsync
/// run` and `ehrsync login` started together): that is retried for up to [`BUSY_TIMEOUT`].
async fn connect_pool(
    path: &Path,
    max_connections: u32,
    options: SqliteConnectOptions,
) -> Result<SqlitePool, StoreError> {
    let deadline = tokio::time::Instant::now() + BUSY_TIMEOUT;
    loop {
        let opened = SqlitePoolOptions::new()
            .max_connections(max_connections)
            .connect_with(options.clone())
            .await;
        match opened {
            Ok(pool) => return Ok(pool),
            Err(sqlx::Error::Database(e))
                if e.code().as_deref() == Some("5") && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(source) => {
                return Err(StoreError::Open {
                    database: path.display().to_string(),
                    source,
                });
            }
        }
    }
}

/// The operator-visible part of an account's stored token state.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct TokenStateRow {
    pub account: String,
    pub state: String,
    pub access_token_expires_at: Option<i64>,
    pub next_refresh_at: Option<i64>,
    pub refresh_token_expires_at: Option<i64>,
    pub last_error: Option<String>,
    pub updated_at: i64,
}

/// A whole `token_state` row. The token columns hold [`crate::crypto`] ciphertext; times are
/// Unix seconds.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct TokenRecord {
    pub account: String,
    pub state: String,
    pub access_token: Option<Vec<u8>>,
    pub access_token_issued_at: Option<i64>,
    pub access_token_expires_at: Option<i64>,
    pub next_refresh_at: Option<i64>,
    pub refresh_token: Option<Vec<u8>>,
    pub refresh_token_issued_at: Option<i64>,
    pub refresh_token_expires_at: Option<i64>,
    pub generation: i64,
    pub last_error: Option<String>,
    pub updated_at: i64,
    /// The holder of a refresh request sent and not yet answered (see [`Store::mark_request`]).
    pub request_holder: Option<String>,
    /// The token generation whose refresh token that request presented.
    pub request_generation: Option<i64>,
    pub request_sent_at: Option<i64>,
    /// The keyed fingerprint of the credentials in use when this was stored (see
    /// [`crate::crypto::TokenCipher::fingerprint`]); `None` keeps the stored one.
    pub credentials: Option<String>,
}

/// One row of `sync_runs`.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SyncRunRow {
    pub account: String,
    pub job: String,
    pub full: bool,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub outcome: String,
    pub pages: i64,
    pub records: i64,
    pub error: Option<String>,
}

/// Creates the database's directory (0700) and file (0600) if missing, and tightens an existing
/// file that others can read. SQLite would create the file with the process umask otherwise.
fn prepare_file(path: &Path) -> Result<(), StoreError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.exists() {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder
            .create(dir)
            .map_err(|source| StoreError::CreateDir {
                path: dir.to_owned(),
                source,
            })?;
    }
    let create_err = |source| StoreError::CreateFile {
        path: path.to_owned(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options.open(path).map_err(create_err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = file.metadata().map_err(create_err)?;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "database file was readable by other users; setting mode 0600");
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(create_err)?;
        }
        if let Ok(dir_meta) = std::fs::metadata(dir) {
            if dir_meta.uid() != meta.uid() {
                tracing::warn!(dir = %dir.display(), "database directory is owned by another user than the database file");
            }
            if dir_meta.mode() & 0o022 != 0 {
                tracing::warn!(dir = %dir.display(), "database directory is writable by other users; give ehrsync a directory of its own (mode 0700)");
            }
        }
    }
    #[cfg(not(unix))]
    drop(file);
    Ok(())
}
