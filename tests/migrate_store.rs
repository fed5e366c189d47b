//! `ehrsync migrate-store --to postgres://…`: a SQLite database an agent filled (tokens, runs,
//! records, the change log, `patients`) is copied into PostgreSQL whole and checked; a
//! non-empty target, a password in the URL and a database in use are refused. Runs where
//! `EHRSYNC_TEST_POSTGRES` names a server (`.ci/test` starts one); skipped otherwise, unless
//! `EHRSYNC_REQUIRE_POSTGRES` is set (as in CI).
#![cfg(unix)]

mod common;

use std::sync::Arc;

use common::ehrsync;
use ehrsync::clock::SystemClock;
use ehrsync::sandbox::{self, Lifetimes, Sandbox};
use ehrsync::vendor::Vendor;
use sqlx::{AssertSqlSafe, Connection};

/// A fresh, empty database on the test server; its URL.
async fn fresh_database(server: &url::Url, name: &str) -> url::Url {
    let mut admin = sqlx::PgConnection::connect(server.as_str()).await.unwrap();
    for sql in [
        format!("DROP DATABASE IF EXISTS {name}"),
        format!("CREATE DATABASE {name}"),
    ] {
        sqlx::query(AssertSqlSafe(sql))
            .execute(&mut admin)
            .await
            .unwrap();
    }
    let mut url = server.clone();
    url.set_path(name);
    url
}

/// Every row of `sql` (two text columns), sorted: the same query on either backend's pool.
macro_rules! sorted_rows {
    ($pool:expr, $sql:expr $(,)?) => {{
        let mut rows: Vec<(String, String)> = sqlx::query_as(AssertSqlSafe($sql.to_owned()))
            .fetch_all($pool)
            .await
            .unwrap();
        rows.sort();
        rows
    }};
}

#[tokio::test(flavor = "multi_thread")]
async fn a_populated_sqlite_database_moves_to_postgres_whole() {
    let Some(server) = common::test_postgres() else {
        return;
    };
    let server = url::Url::parse(&server).expect("EHRSYNC_TEST_POSTGRES is a URL");
    let target = fresh_database(&server, &format!("migrate_{}", std::process::id())).await;

    let sandbox = Sandbox::start(Arc::new(SystemClock), Lifetimes::documented(), 0)
        .await
        .unwrap();
    sandbox.set_patients(1_234);
    let dir = tempfile::tempdir().unwrap();
    let mut config = String::from("[agent]\ndatabase = 'state/ehrsync.db'\n");
    config.push_str(&sandbox.account_config(Vendor::Nextech, "nx"));
    config.push_str(&sandbox.account_config(Vendor::NikoHealth, "niko"));
    config.push_str(
        "[[accounts.nx.jobs]]\nname = 'patients'\nkind = 'fhir'\nschedule = '0 0 3 * * *'\npage_size = 100\n\
         [[accounts.niko.jobs]]\nname = 'patients'\nkind = 'nikohealth_patients'\nschedule = '0 0 3 * * *'\npage_size = 200\n",
    );
    let path = common::write_config(dir.path(), &config);
    let config = path.to_str().unwrap();
    let env = sandbox::credentials_env();
    for (account, job) in [("nx", "patients"), ("niko", "patients")] {
        let run = ehrsync(&["sync", "--config", config, account, job], &env);
        assert_eq!(run.code, Some(0), "{}", run.stderr);
    }
    sandbox.change_patients([3, 4]);
    let run = ehrsync(&["sync", "--config", config, "nx", "patients"], &env);
    assert_eq!(run.code, Some(0), "{}", run.stderr);

    // A password in the URL is refused before anything is opened.
    let mut with_password = target.clone();
    with_password.set_password(Some("hunter2-secret")).unwrap();
    let refused = ehrsync(
        &[
            "migrate-store",
            "--config",
            config,
            "--to",
            with_password.as_str(),
        ],
        &env,
    );
    assert_eq!(refused.code, Some(2), "{}", refused.stderr);
    assert!(refused.stderr.contains("PGPASSWORD"), "{}", refused.stderr);
    assert!(
        !refused.stderr.contains("hunter2-secret"),
        "{}",
        refused.stderr
    );

    // sslmode as libpq names it: `require` against this server, which has no TLS, fails to
    // connect (TLS is built in, and not skipped), naming where but no credentials.
    let mut tls = target.clone();
    tls.set_query(Some("sslmode=require"));
    let no_tls = ehrsync(
        &["migrate-store", "--config", config, "--to", tls.as_str()],
        &env,
    );
    assert_eq!(no_tls.code, Some(1), "{}", no_tls.stderr);
    assert!(
        no_tls
            .stderr
            .contains("cannot connect to PostgreSQL at 127.0.0.1:"),
        "{}",
        no_tls.stderr
    );

    // A lease some agent still holds: the database is in use, and nothing is copied.
    let db = dir.path().join("state/ehrsync.db");
    let writer = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    let held = "INSERT INTO job_leases (account, job, holder, expires_at, generation) \
                VALUES ('nx', 'other', 'another-agent', 99999999999, 1)";
    sqlx::query(held).execute(&writer).await.unwrap();
    let in_use = ehrsync(
        &["migrate-store", "--config", config, "--to", target.as_str()],
        &env,
    );
    assert_eq!(in_use.code, Some(1), "{}", in_use.stderr);
    assert!(
        in_use.stderr.contains("stop every ehrsync process"),
        "{}",
        in_use.stderr
    );
    sqlx::query("DELETE FROM job_leases WHERE holder = 'another-agent'")
        .execute(&writer)
        .await
        .unwrap();
    // An agent between token requests holds no lease, but its heartbeat is fresh.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    sqlx::query(
        "INSERT INTO agents (id, host, host_key, pid, pid_started, version, started_at, \
         heartbeat_at) VALUES ('agent-elsewhere', 'other', 'other-host', 1, 1, 'x', ?1, ?1)",
    )
    .bind(now)
    .execute(&writer)
    .await
    .unwrap();
    let running = ehrsync(
        &["migrate-store", "--config", config, "--to", target.as_str()],
        &env,
    );
    assert_eq!(running.code, Some(1), "{}", running.stderr);
    assert!(
        running.stderr.contains("1 agents running"),
        "{}",
        running.stderr
    );
    sqlx::query("DELETE FROM agents WHERE id = 'agent-elsewhere'")
        .execute(&writer)
        .await
        .unwrap();
    writer.close().await;

    let moved = ehrsync(
        &["migrate-store", "--config", config, "--to", target.as_str()],
        &env,
    );
    assert_eq!(moved.code, Some(0), "{}\n{}", moved.stdout, moved.stderr);
    assert!(
        moved.stdout.contains("row counts match"),
        "{}",
        moved.stdout
    );
    for table in [
        "token_state",
        "resources",
        "sync_runs",
        "changes",
        "patient_rows",
    ] {
        assert!(moved.stdout.contains(table), "{table}: {}", moved.stdout);
    }

    let sqlite = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}?mode=ro",
        dir.path().join("state/ehrsync.db").display()
    ))
    .await
    .unwrap();
    let pg = sqlx::PgPool::connect(target.as_str()).await.unwrap();
    // Tokens: the sealed bytes, as hex, and every other column that says where they stand.
    let tokens_lite = sorted_rows!(
        &sqlite,
        "SELECT account, lower(hex(access_token)) || lower(hex(refresh_token)) || '/' || state \
         || '/' || generation || '/' || access_token_expires_at || '/' || coalesce(credentials, '') \
         FROM token_state",
    );
    let tokens_pg = sorted_rows!(
        &pg,
        "SELECT account, coalesce(encode(access_token, 'hex'), '') \
         || coalesce(encode(refresh_token, 'hex'), '') || '/' || state \
         || '/' || generation || '/' || access_token_expires_at || '/' || coalesce(credentials, '') \
         FROM token_state",
    );
    assert_eq!(tokens_lite.len(), 2, "both accounts hold tokens");
    assert_eq!(tokens_lite, tokens_pg);
    // Records, whole.
    let records = "SELECT account || '/' || resource_type || '/' || id, \
                   coalesce(version_id, '') || '/' || data FROM resources";
    let records_lite = sorted_rows!(&sqlite, records);
    assert_eq!(records_lite.len(), 2 * 1_234);
    assert_eq!(records_lite, sorted_rows!(&pg, records));
    // Runs, the change log and the patients table.
    let runs = "SELECT CAST(id AS TEXT), account || '/' || job || '/' || outcome || '/' || records \
                FROM sync_runs";
    assert_eq!(sorted_rows!(&sqlite, runs), sorted_rows!(&pg, runs));
    let changes = "SELECT CAST(seq AS TEXT), id || '/' || kind FROM changes";
    let changes_lite = sorted_rows!(&sqlite, changes);
    assert_eq!(changes_lite.len(), 2 * 1_234 + 2);
    assert_eq!(changes_lite, sorted_rows!(&pg, changes));
    let patients = "SELECT account || '/' || id, coalesce(family, '') || '/' || coalesce(given, '') \
                    FROM patients";
    assert_eq!(sorted_rows!(&sqlite, patients), sorted_rows!(&pg, patients));
    // New runs and changes continue after the copied ids.
    let next: i64 = sqlx::query_scalar(
        "INSERT INTO sync_runs (account, job, started_at, outcome) \
         VALUES ('nx', 'patients', 1, 'running') RETURNING id",
    )
    .fetch_one(&pg)
    .await
    .unwrap();
    let last: i64 = sqlx::query_scalar("SELECT max(id) FROM sync_runs WHERE id < $1")
        .bind(next)
        .fetch_one(&pg)
        .await
        .unwrap();
    assert_eq!(next, last + 1);

    // The target now holds data: a second copy is refused and changes nothing.
    let again = ehrsync(
        &["migrate-store", "--config", config, "--to", target.as_str()],
        &env,
    );
    assert_eq!(again.code, Some(1), "{}", again.stderr);
    assert!(
        again.stderr.contains("already holds ehrsync data"),
        "{}",
        again.stderr
    );
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM resources")
        .fetch_one(&pg)
        .await
        .unwrap();
    assert_eq!(count, 2 * 1_234);

    // No token or key reaches the output.
    let output = format!(
        "{}{}{}{}",
        moved.stdout, moved.stderr, again.stdout, again.stderr
    );
    for token in sandbox.issued_tokens() {
        assert!(!output.contains(&token), "a token reached the output");
    }
    pg.close().await;
}
