//! Helpers shared by the integration tests: run the real binary with a controlled environment.

#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub mod agent;
pub mod pull;
pub mod tls;

/// The vendor sandbox on loopback, on the real clock, with the vendors' documented token
/// lifetimes.
pub async fn sandbox() -> ehrsync::sandbox::Sandbox {
    ehrsync::sandbox::Sandbox::start(
        std::sync::Arc::new(ehrsync::clock::SystemClock),
        ehrsync::sandbox::Lifetimes::documented(),
        0,
    )
    .await
    .unwrap()
}

/// A sandbox Nextech account `name` whose password is read from `$password_env`: set it to
/// anything but the sandbox's password and the account is refused and parks in `needs_login`.
pub fn nextech_with_password_from(
    sandbox: &ehrsync::sandbox::Sandbox,
    name: &str,
    password_env: &str,
) -> String {
    let nx = ehrsync::sandbox::NEXTECH_CREDENTIALS;
    format!(
        "[accounts.{name}]\nvendor = 'nextech'\ntoken_url = '{}'\nclient_id = '{}'\n\
         client_secret = {{ env = 'SANDBOX_NEXTECH_SECRET' }}\nusername = '{}'\n\
         password = {{ env = '{password_env}' }}\npractice_id = '1001'\n",
        sandbox.token_url(ehrsync::vendor::Vendor::Nextech),
        nx.client_id,
        nx.username
    )
}

pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Run {
    /// Panics naming the first of `secrets` found in stdout or stderr.
    pub fn assert_absent(&self, secrets: &[&str]) {
        for secret in secrets {
            assert!(
                !self.stdout.contains(secret),
                "{secret} in stdout:\n{}",
                self.stdout
            );
            assert!(
                !self.stderr.contains(secret),
                "{secret} in stderr:\n{}",
                self.stderr
            );
        }
    }
}

/// The ehrsync binary the tests run: this build's, or the one `EHRSYNC_TEST_BINARY` names
/// (to measure an older build against the same scenarios, as issue 14's figures were).
pub fn binary() -> PathBuf {
    std::env::var_os("EHRSYNC_TEST_BINARY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_ehrsync")))
}

/// Runs `ehrsync ARGS` with only `env` in its environment (nothing leaks in from the host).
pub fn ehrsync(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(binary());
    cmd.env_clear().args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run the ehrsync binary").into()
}

/// Writes `text` as `ehrsync.toml` in `dir` and returns its path.
pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("ehrsync.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// Whether this test run keeps its stores on PostgreSQL: `EHRSYNC_TEST_BACKEND=postgres`
/// (`.ci/test` runs the suite once on each backend), with the server `EHRSYNC_TEST_POSTGRES`
/// names. Otherwise SQLite files.
pub fn on_postgres() -> bool {
    let wanted = std::env::var("EHRSYNC_TEST_BACKEND").is_ok_and(|b| b == "postgres");
    if wanted {
        assert!(
            std::env::var("EHRSYNC_TEST_POSTGRES").is_ok_and(|u| !u.is_empty()),
            "EHRSYNC_TEST_BACKEND=postgres needs a server in EHRSYNC_TEST_POSTGRES"
        );
    }
    wanted
}

/// For tests of what only a SQLite file has (file modes, its WAL, locking it from another
/// connection): true, after saying so, when this run is on PostgreSQL.
pub fn sqlite_only() -> bool {
    let skip = on_postgres();
    if skip {
        eprintln!("skipped on PostgreSQL: this test is about the SQLite file");
    }
    skip
}

/// A new, empty database on the test PostgreSQL server, as its URL (the server trusts local
/// connections, so it holds no password). Created from a thread of its own, so that this can
/// be called from synchronous code and from inside a runtime alike.
pub fn new_postgres_database() -> String {
    let server = std::env::var("EHRSYNC_TEST_POSTGRES").expect("EHRSYNC_TEST_POSTGRES");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(async {
            use sqlx::Connection;
            let mut admin = sqlx::PgConnection::connect(&server)
                .await
                .expect("connect to the test PostgreSQL server");
            let name = format!(
                "ehrsync_t{}_{:08x}",
                std::process::id(),
                getrandom::u32().expect("random bytes")
            );
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&mut admin)
                .await
                .expect("create a test database");
            let mut url = url::Url::parse(&server).expect("EHRSYNC_TEST_POSTGRES is a URL");
            url.set_path(&name);
            url.to_string()
        })
    })
    .join()
    .expect("create a test database")
}

/// A fresh store location for one test: `dir/ehrsync.db`, or (on PostgreSQL) a new database.
pub fn fresh_database(dir: &Path) -> ehrsync::config::Database {
    if on_postgres() {
        ehrsync::config::Database::Postgres {
            url: new_postgres_database(),
            password: None,
        }
    } else {
        ehrsync::config::Database::File(dir.join("ehrsync.db"))
    }
}

/// The `[agent]` lines that put an agent's store where this test run keeps stores: `file`
/// (relative to the config) for SQLite, or a new PostgreSQL database with a token key file
/// beside `file` (a PostgreSQL store needs one named).
pub fn database_lines(file: &str) -> String {
    if on_postgres() {
        let key = Path::new(file).with_file_name("ehrsync.key");
        format!(
            "database = '{}'\ntoken_key = {{ file = '{}' }}\n",
            new_postgres_database(),
            key.display()
        )
    } else {
        format!("database = '{file}'\n")
    }
}

/// One row read by [`test_row`]: each column's value as text (NULL as `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestRow(pub std::collections::BTreeMap<String, Option<String>>);

impl TestRow {
    /// Column `name`'s text; panics when it is NULL or missing.
    pub fn text(&self, name: &str) -> String {
        self.0
            .get(name)
            .cloned()
            .flatten()
            .unwrap_or_else(|| panic!("no value in column {name}: {self:?}"))
    }

    pub fn int(&self, name: &str) -> i64 {
        self.text(name).parse().expect("an integer column")
    }
}

fn row_values<R: sqlx::Row>(row: &R) -> TestRow
where
    usize: sqlx::ColumnIndex<R>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<f64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    use sqlx::Column;
    let mut values = std::collections::BTreeMap::new();
    for (i, column) in row.columns().iter().enumerate() {
        let value = row
            .try_get::<Option<String>, _>(i)
            .or_else(|_| {
                row.try_get::<Option<i64>, _>(i)
                    .map(|v| v.map(|n| n.to_string()))
            })
            .or_else(|_| {
                row.try_get::<Option<f64>, _>(i)
                    .map(|v| v.map(|n| n.to_string()))
            })
            .unwrap_or_else(|e| panic!("column {}: {e}", column.name()));
        values.insert(column.name().to_owned(), value);
    }
    TestRow(values)
}

/// One row of `sql` (SQLite's `?` placeholders; renumbered for PostgreSQL) with `bind`, from
/// whichever backend `store` is on.
pub async fn test_row(store: &ehrsync::store::Store, sql: &'static str, bind: &str) -> TestRow {
    use ehrsync::store::backend::{Backend, postgres};
    let (db, bind) = (store.db().clone(), bind.to_owned());
    ehrsync::store::shielded(async move {
        Ok(match &db {
            Backend::Sqlite(p) => row_values(&sqlx::query(sql).bind(bind).fetch_one(p).await?),
            Backend::Postgres(p) => {
                row_values(&postgres::query(sql).bind(bind).fetch_one(p).await?)
            }
        })
    })
    .await
    .unwrap()
}

/// `sql`'s one integer, from whichever backend `store` is on; the database's error as text.
pub async fn scalar(store: &ehrsync::store::Store, sql: &'static str) -> Result<i64, String> {
    use ehrsync::store::backend::{Backend, postgres};
    let db = store.db().clone();
    // Shielded like every store call, so paused time does not jump during the query.
    ehrsync::store::shielded(async move {
        Ok(match &db {
            Backend::Sqlite(p) => sqlx::query_scalar(sql).fetch_one(p).await?,
            Backend::Postgres(p) => postgres::query_scalar(sql).fetch_one(p).await?,
        })
    })
    .await
    .map_err(|e| e.to_string())
}

/// The store the config at `path` names (`agent.database`).
pub fn database_of(path: &Path) -> ehrsync::config::Database {
    ehrsync::config::load_scoped(
        path,
        &ehrsync::config::Env::default(),
        &ehrsync::config::Secrets::None,
    )
    .expect("the test's config loads")
    .config
    .agent
    .database
}

/// The token engine's shared parts for a test: a database (see [`fresh_database`]) and a token
/// key in `dir` (`ehrsync.key`), a 30 s HTTP client and fresh metrics.
pub async fn shared_in(
    dir: &Path,
    clock: ehrsync::clock::SharedClock,
) -> ehrsync::token::owner::Shared {
    let store = ehrsync::store::Store::open(fresh_database(dir))
        .await
        .expect("open the store");
    let cipher = cipher_in(&dir.join("ehrsync.key"));
    let http = ehrsync::token::client::http_client(std::time::Duration::from_secs(30))
        .expect("HTTP client");
    let metrics = ehrsync::metrics::Metrics::new().expect("metrics");
    ehrsync::token::owner::Shared::new(store, cipher, http, clock, metrics)
}

pub type Owners = Vec<(
    ehrsync::token::owner::TokenHandle,
    tokio::task::JoinHandle<()>,
)>;

/// Starts a token owner for every account; stop them with [`stop_all`].
pub async fn spawn_all(
    accounts: Vec<ehrsync::config::Account>,
    shared: &ehrsync::token::owner::Shared,
) -> (Owners, tokio::sync::watch::Sender<bool>) {
    let (stop, rx) = tokio::sync::watch::channel(false);
    let mut owners = Vec::new();
    for account in accounts {
        owners.push(
            ehrsync::token::owner::spawn(std::sync::Arc::new(account), shared.clone(), rx.clone())
                .await
                .expect("spawn an owner"),
        );
    }
    (owners, stop)
}

pub async fn stop_all(owners: Owners, stop: tokio::sync::watch::Sender<bool>) {
    let _ = stop.send(true);
    for (_, task) in owners {
        let _ = task.await;
    }
}

/// The token cipher for the key file at `path`, created on first use.
pub fn cipher_in(path: &Path) -> ehrsync::crypto::TokenCipher {
    let key = ehrsync::config::KeySource::File {
        path: path.to_owned(),
        create: true,
    };
    ehrsync::crypto::TokenCipher::load(&key, &ehrsync::config::Env::default()).expect("token key")
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind an ephemeral port")
        .local_addr()
        .expect("its address")
        .port()
}

/// `GET url` with a 2 s timeout: the status and body, or `None` when nothing answered.
pub async fn http_get(url: &str) -> Option<(u16, String)> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let response = reqwest::Client::new()
        .get(url)
        .timeout(std::time::Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

/// Holds SQLite's write lock on the database at `db` from another connection (as another
/// process would) for `hold`, on a thread of its own; returns once the lock is taken.
pub fn lock_database(db: PathBuf, hold: std::time::Duration) -> std::thread::JoinHandle<()> {
    lock_store(ehrsync::config::Database::File(db), hold)
}

/// Holds the store's write lock from another connection (as another process would) for
/// `hold`, on a thread of its own; returns once the lock is taken. SQLite: its one write lock
/// (`BEGIN IMMEDIATE`). PostgreSQL: the tables every page and run write (`resources`,
/// `sync_runs`), locked against writers (`EXCLUSIVE`), so that writes wait as on SQLite.
pub fn lock_store(
    database: ehrsync::config::Database,
    hold: std::time::Duration,
) -> std::thread::JoinHandle<()> {
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(async {
            use sqlx::Connection;
            match &database {
                ehrsync::config::Database::File(db) => {
                    let mut c =
                        sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
                            .await
                            .expect("connect");
                    sqlx::query("BEGIN IMMEDIATE")
                        .execute(&mut c)
                        .await
                        .expect("take the write lock");
                    locked_tx.send(()).expect("signal the lock");
                    std::thread::sleep(hold);
                    sqlx::query("ROLLBACK")
                        .execute(&mut c)
                        .await
                        .expect("release the lock");
                }
                ehrsync::config::Database::Postgres { url, .. } => {
                    let mut c = sqlx::PgConnection::connect(url).await.expect("connect");
                    let mut tx = c.begin().await.expect("begin");
                    sqlx::query("LOCK TABLE resources, sync_runs IN EXCLUSIVE MODE")
                        .execute(&mut *tx)
                        .await
                        .expect("lock the tables");
                    locked_tx.send(()).expect("signal the lock");
                    std::thread::sleep(hold);
                    tx.rollback().await.expect("release the lock");
                }
            }
        });
    });
    locked_rx.recv().expect("the lock is taken");
    holder
}

/// Every row of `sql` (SQLite's `?` placeholders, each bound to the next of `binds`), read
/// over a connection of its own from the store at `database`; `None` when it cannot be read
/// (no database yet, or no such table).
pub async fn db_rows(
    database: &ehrsync::config::Database,
    sql: &'static str,
    binds: &[&str],
) -> Option<Vec<TestRow>> {
    use sqlx::Connection;
    match database {
        ehrsync::config::Database::File(db) => {
            if !db.exists() {
                return None;
            }
            let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
                .await
                .ok()?;
            let mut q = sqlx::query(sql);
            for b in binds {
                q = q.bind(*b);
            }
            let rows = q.fetch_all(&mut c).await.ok()?;
            Some(rows.iter().map(row_values).collect())
        }
        ehrsync::config::Database::Postgres { url, .. } => {
            let mut c = sqlx::PgConnection::connect(url).await.ok()?;
            let mut q = ehrsync::store::backend::postgres::query(sql);
            for b in binds {
                q = q.bind(*b);
            }
            let rows = q.fetch_all(&mut c).await.ok()?;
            Some(rows.iter().map(row_values).collect())
        }
    }
}

/// The one integer `sql` gives, from the store at `database` (see [`db_rows`]).
pub async fn db_int(database: &ehrsync::config::Database, sql: &'static str) -> i64 {
    let rows = db_rows(database, sql, &[])
        .await
        .unwrap_or_else(|| panic!("cannot read {sql}"));
    let row = rows.first().expect("one row");
    let value = row.0.values().next().cloned().flatten().expect("a value");
    value.parse().expect("an integer")
}

/// The PostgreSQL server the tests may use (`EHRSYNC_TEST_POSTGRES`, a URL; `.ci/test` starts
/// one). `None` skips the test, unless `EHRSYNC_REQUIRE_POSTGRES` is set (as in CI): then a
/// missing server fails it.
pub fn test_postgres() -> Option<String> {
    match std::env::var("EHRSYNC_TEST_POSTGRES") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var_os("EHRSYNC_REQUIRE_POSTGRES").is_none(),
                "EHRSYNC_REQUIRE_POSTGRES is set but EHRSYNC_TEST_POSTGRES names no server"
            );
            eprintln!("skipped: EHRSYNC_TEST_POSTGRES is not set");
            None
        }
    }
}
