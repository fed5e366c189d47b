//! The SQLite store: migrations are idempotent, files are private, newer schemas are refused,
//! and `status` reads a database without creating or changing it.

mod common;

use std::path::Path;

use common::{ehrsync, write_config};
use std::time::Duration;

use ehrsync::store::{self, PageRow, Store, StoreError};
use ehrsync::views::ViewSet;

async fn migration_rows(store: &Store) -> Vec<(i64, Vec<u8>)> {
    sqlx::query_as("SELECT version, checksum FROM _sqlx_migrations ORDER BY version")
        .fetch_all(store.sqlite_pool().unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn migrations_are_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ehrsync.db");
    let first = Store::open(&path).await.unwrap();
    let applied = migration_rows(&first).await;
    assert_eq!(applied.len(), store::MIGRATOR.iter().count());
    assert_eq!(
        first.schema_version().await.unwrap(),
        store::supported_schema_version()
    );
    sqlx::query(
        "INSERT INTO sync_state (account, job, watermark, updated_at) VALUES ('a', 'j', 'w', 1)",
    )
    .execute(first.sqlite_pool().unwrap())
    .await
    .unwrap();
    first.close().await;

    for _ in 0..2 {
        let again = Store::open(&path).await.unwrap();
        assert_eq!(
            migration_rows(&again).await,
            applied,
            "re-opening must apply nothing new"
        );
        let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM sync_state")
            .fetch_one(again.sqlite_pool().unwrap())
            .await
            .unwrap();
        assert_eq!(kept, 1, "re-opening must not touch data");
        again.close().await;
    }
}

#[tokio::test]
async fn the_database_uses_wal_and_a_busy_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("e.db")).await.unwrap();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(store.sqlite_pool().unwrap())
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    let timeout: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
        .fetch_one(store.sqlite_pool().unwrap())
        .await
        .unwrap();
    assert_eq!(timeout, store::BUSY_TIMEOUT.as_millis() as i64);
    let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(store.sqlite_pool().unwrap())
        .await
        .unwrap();
    assert_eq!(sync, 2, "synchronous = FULL");
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[cfg(unix)]
#[tokio::test]
async fn files_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state").join("nested");
    let path = state.join("ehrsync.db");
    let store = Store::open(&path).await.unwrap();
    // Force a write so the WAL exists.
    sqlx::query("INSERT INTO sync_state (account, job, updated_at) VALUES ('a', 'j', 1)")
        .execute(store.sqlite_pool().unwrap())
        .await
        .unwrap();
    assert_eq!(mode(&path), 0o600, "database file");
    let wal = path.with_extension("db-wal");
    assert!(wal.exists());
    assert_eq!(mode(&wal), 0o600, "WAL file");
    assert_eq!(mode(&state), 0o700, "created directory");
    store.close().await;
}

#[cfg(unix)]
#[tokio::test]
async fn an_existing_readable_database_is_tightened() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ehrsync.db");
    std::fs::write(&path, b"").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    Store::open(&path).await.unwrap().close().await;
    assert_eq!(mode(&path), 0o600);
}

async fn make_newer(path: &Path) {
    let store = Store::open(path).await.unwrap();
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (9999, 'from the future', 1, x'00', 0)",
    )
    .execute(store.sqlite_pool().unwrap())
    .await
    .unwrap();
    store.close().await;
}

#[tokio::test]
async fn a_database_from_a_newer_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ehrsync.db");
    make_newer(&path).await;
    let err = Store::open(&path).await.unwrap_err();
    assert!(
        matches!(err, StoreError::TooNew { found: 9999, .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("newer than this ehrsync supports"),
        "{err}"
    );
    let err = Store::open_read_only(&path).await.unwrap_err();
    assert!(matches!(err, StoreError::TooNew { .. }), "{err}");
}

/// A database at schema version 5 holding `rows` (resource type, id, JSON), as an older
/// ehrsync left it.
async fn version_5_database(path: &Path, rows: &[(&str, &str, &str)]) {
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true);
    let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
    let mut old = sqlx::migrate::Migrator::DEFAULT;
    old.migrations = store::MIGRATOR
        .iter()
        .filter(|m| m.version <= 5)
        .cloned()
        .collect::<Vec<_>>()
        .into();
    old.run(&pool).await.unwrap();
    for (rt, id, data) in rows {
        sqlx::query(
            "INSERT INTO resources (account, resource_type, id, last_updated, data, synced_at) \
             VALUES ('a', ?, ?, '2026-01-01T00:00:00Z', ?, 1)",
        )
        .bind(rt)
        .bind(id)
        .bind(data)
        .execute(&pool)
        .await
        .unwrap();
    }
    pool.close().await;
}

type PatientRow = (
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

async fn patients(store: &Store) -> Vec<PatientRow> {
    sqlx::query_as(
        "SELECT account, id, family, given, birth_date, gender FROM patients ORDER BY id",
    )
    .fetch_all(store.sqlite_pool().unwrap())
    .await
    .unwrap()
}

/// The `patients` table is filled by migration 0006 from an older database's records, and by
/// each page's transaction since: both give the same rows (the migration's SQL and
/// `views::patients` follow one rule).
#[tokio::test]
async fn the_patients_table_is_the_same_whether_migrated_or_pulled() {
    let patient = r#"{"resourceType":"Patient","id":"p1","gender":"female","birthDate":"1980-02-03",
        "name":[{"use":"nickname","given":["Jo"]},{"use":"official","family":"Smith","given":["Joanna","Q"]}]}"#;
    let first_name = r#"{"resourceType":"Patient","id":"p3","name":[{"family":"Lee","given":["Al"]},{"family":"X"}]}"#;
    let unnamed = r#"{"resourceType":"Patient","id":"p2"}"#;
    let other = r#"{"resourceType":"Encounter","id":"e1"}"#;
    let niko = r#"{"id":7,"firstName":"Ann","middleName":"B","lastName":"Ng","dateOfBirth":"1990-04-05T00:00:00","gender":"Female"}"#;
    let records = [
        ("Patient", "p1", patient),
        ("Patient", "p2", unnamed),
        ("Patient", "p3", first_name),
        ("Encounter", "e1", other),
        ("NikoHealthPatient", "7", niko),
    ];
    let expected: Vec<PatientRow> = vec![
        (
            "a".into(),
            "7".into(),
            Some("Ng".into()),
            Some("Ann B".into()),
            Some("1990-04-05".into()),
            Some("female".into()),
        ),
        (
            "a".into(),
            "p1".into(),
            Some("Smith".into()),
            Some("Joanna Q".into()),
            Some("1980-02-03".into()),
            Some("female".into()),
        ),
        ("a".into(), "p2".into(), None, None, None, None),
        (
            "a".into(),
            "p3".into(),
            Some("Lee".into()),
            Some("Al".into()),
            None,
            None,
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let migrated = dir.path().join("old.db");
    version_5_database(&migrated, &records).await;
    let store = Store::open(&migrated).await.unwrap();
    assert_eq!(patients(&store).await, expected);
    store.close().await;

    let store = Store::open(&dir.path().join("new.db")).await.unwrap();
    let holder = ehrsync::store::Holder::this_process();
    for (rt, id, data) in records {
        let key = ehrsync::store::LeaseKey::job("a", rt);
        let lease = store
            .acquire(&key, &holder, 1, Duration::from_secs(60))
            .await
            .unwrap()
            .unwrap();
        let run = store.begin_run(&lease, "a", rt, false, 1).await.unwrap();
        let mut row = PageRow::new(
            id.into(),
            None,
            Some("2026-01-01T00:00:00Z".into()),
            data.into(),
        );
        row.derived = ViewSet::default().derive(rt, data);
        store
            .commit_page(
                &lease,
                run.run_id,
                "a",
                rt,
                vec![row],
                1,
                &ViewSet::default(),
            )
            .await
            .unwrap();
    }
    assert_eq!(patients(&store).await, expected);
}

async fn has_name_index(store: &Store) -> bool {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master \
         WHERE type = 'index' AND name = 'patient_rows_by_name')",
    )
    .fetch_one(store.sqlite_pool().unwrap())
    .await
    .unwrap()
}

/// A first pull builds the name index of `patients` once, at its end, instead of inserting into
/// it record by record; a crash in between leaves it to the next open; lookups use it.
#[tokio::test]
async fn a_first_pull_builds_the_name_index_at_its_end_or_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ehrsync.db");
    let store = Store::open(&path).await.unwrap();
    assert!(has_name_index(&store).await, "migrated with the index");
    let holder = ehrsync::store::Holder::this_process();
    let key = ehrsync::store::LeaseKey::job("a", "patients");
    let lease = store
        .acquire(&key, &holder, 1, Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    let data =
        r#"{"resourceType":"Patient","id":"p1","name":[{"family":"Smith","given":["Ann"]}]}"#;
    let page = |id: &str| {
        let mut row = PageRow::new(id.into(), None, None, data.into());
        row.derived = ViewSet::default().derive("Patient", data);
        vec![row]
    };
    let run = store
        .begin_run(&lease, "a", "patients", true, 1)
        .await
        .unwrap();
    assert!(
        !has_name_index(&store).await,
        "a first pull runs without it"
    );
    store
        .commit_page(
            &lease,
            run.run_id,
            "a",
            "Patient",
            page("p1"),
            2,
            &ViewSet::default(),
        )
        .await
        .unwrap();
    store
        .finish_run(
            &lease, run.run_id, "a", "patients", "success", 3, None, None,
        )
        .await
        .unwrap();
    assert!(has_name_index(&store).await, "built when the run ends");
    let plan: Vec<(i64, i64, i64, String)> = sqlx::query_as(
        "EXPLAIN QUERY PLAN SELECT id FROM patients WHERE family = 'smith' AND given = 'ann'",
    )
    .fetch_all(store.sqlite_pool().unwrap())
    .await
    .unwrap();
    assert!(
        plan.iter().any(|p| p.3.contains("patient_rows_by_name")),
        "{plan:?}"
    );

    // A crash mid-pull: the index stays missing until the store is opened again.
    let run = store
        .begin_run(&lease, "a", "patients", true, 4)
        .await
        .unwrap();
    store
        .commit_page(
            &lease,
            run.run_id,
            "a",
            "Patient",
            page("p2"),
            5,
            &ViewSet::default(),
        )
        .await
        .unwrap();
    assert!(!has_name_index(&store).await);
    store.close().await;
    let store = Store::open(&path).await.unwrap();
    assert!(has_name_index(&store).await, "built at open after a crash");
    let found: i64 =
        sqlx::query_scalar("SELECT count(*) FROM patients WHERE family = 'SMITH' COLLATE NOCASE")
            .fetch_one(store.sqlite_pool().unwrap())
            .await
            .unwrap();
    assert_eq!(found, 2);
}

const TWO_ACCOUNTS: &str = r#"
[agent]
database = "db/ehrsync.db"

[accounts.niko]
vendor = "nikohealth"
domain = "acme"
client_id = "ehrsync"
client_secret = { env = "NIKO_SECRET" }

[[accounts.niko.jobs]]
name = "patients"
kind = "nikohealth_patients"
schedule = "0 */30 * * * *"

[accounts.cc]
vendor = "carecentric"
client_id = "FHIRUser"
client_secret = { env = "NIKO_SECRET" }
username = "u"
password = { env = "NIKO_SECRET" }
"#;

const ENV: [(&str, &str); 1] = [("NIKO_SECRET", "status-secret-31d7")];

#[test]
fn status_without_a_database_says_so_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), TWO_ACCOUNTS);
    let run = ehrsync(&["status", "--config", config.to_str().unwrap()], &ENV);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stdout.contains("does not exist yet"), "{}", run.stdout);
    assert!(
        run.stdout.contains("niko: no database yet"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("cc: no database yet"), "{}", run.stdout);
    assert!(
        !dir.path().join("db").exists(),
        "status must not create the database"
    );
}

#[tokio::test]
async fn status_on_an_empty_database_reports_each_account() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), TWO_ACCOUNTS);
    let db = dir.path().join("db/ehrsync.db");
    Store::open(&db).await.unwrap().close().await;
    let before = std::fs::read(&db).unwrap();

    let run = ehrsync(&["status", "--config", config.to_str().unwrap()], &ENV);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    for account in ["niko", "cc"] {
        assert!(
            run.stdout
                .contains(&format!("{account}: no token stored yet")),
            "{account}:\n{}",
            run.stdout
        );
    }
    assert!(run.stdout.contains("niko/patients"), "{}", run.stdout);
    assert!(run.stdout.contains("never"), "{}", run.stdout);

    let run = ehrsync(
        &["status", "--json", "--config", config.to_str().unwrap()],
        &ENV,
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(report["database_exists"], true);
    assert_eq!(report["schema_version"], store::supported_schema_version());
    let accounts = report["accounts"].as_array().unwrap();
    assert_eq!(accounts.len(), 2);
    for a in accounts {
        assert_eq!(a["state"], "no_token");
        assert_eq!(a["stored"], false);
    }
    let niko = accounts.iter().find(|a| a["name"] == "niko").unwrap();
    assert_eq!(niko["jobs"][0]["name"], "patients");
    assert!(niko["jobs"][0]["last_run"].is_null());
    assert!(niko["jobs"][0]["next_run"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        std::fs::read(&db).unwrap(),
        before,
        "status must not write to the database"
    );
}

#[tokio::test]
async fn status_shows_stored_token_state_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), TWO_ACCOUNTS);
    let store = Store::open(&dir.path().join("db/ehrsync.db"))
        .await
        .unwrap();
    let now = chrono::Utc::now().timestamp();
    sqlx::query(
        "INSERT INTO token_state (account, state, access_token_expires_at, next_refresh_at, \
         refresh_token_expires_at, last_error, updated_at) VALUES \
         ('niko', 'valid', ?, ?, NULL, NULL, ?), ('gone', 'needs_login', NULL, NULL, NULL, 'invalid_client', ?)",
    )
    // +30 s keeps the floor-rounded "in 20m"/"in 15m" true however slowly the test runs.
    .bind(now + 1200 + 30)
    .bind(now + 900 + 30)
    .bind(now)
    .bind(now)
    .execute(store.sqlite_pool().unwrap())
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO sync_runs (account, job, started_at, finished_at, outcome, pages, records) \
         VALUES ('niko', 'patients', ?, ?, 'success', 3, 250)",
    )
    .bind(now - 60)
    .bind(now - 50)
    .execute(store.sqlite_pool().unwrap())
    .await
    .unwrap();
    store.close().await;

    let run = ehrsync(&["status", "--config", config.to_str().unwrap()], &ENV);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let line = run.stdout.lines().find(|l| l.starts_with("niko ")).unwrap();
    assert!(
        line.contains("valid") && line.contains("(in 20m)") && line.contains("(in 15m)"),
        "{line}"
    );
    let job = run
        .stdout
        .lines()
        .find(|l| l.starts_with("niko/patients"))
        .unwrap();
    assert!(job.contains("success") && job.contains("250"), "{job}");
    assert!(
        run.stdout.contains("gone: not in the config any more"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("gone: last error: invalid_client"),
        "{}",
        run.stdout
    );
    assert!(!run.stdout.contains("status-secret-31d7"));
}

#[tokio::test]
async fn status_refuses_a_newer_database_with_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), TWO_ACCOUNTS);
    make_newer(&dir.path().join("db/ehrsync.db")).await;
    let run = ehrsync(&["status", "--config", config.to_str().unwrap()], &ENV);
    assert_eq!(run.code, Some(1), "{}", run.stdout);
    assert!(run.stderr.contains("schema version 9999"), "{}", run.stderr);
}

/// The change log is pruned by age through `seq` (it has no index on time): every change
/// before the first one made at or after the cut-off goes, the rest stays.
#[tokio::test]
async fn the_change_log_is_pruned_by_age() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("c.db")).await.unwrap();
    for at in [10, 20, 30, 40, 50] {
        sqlx::query(
            "INSERT INTO changes (account, resource_type, id, kind, at) \
             VALUES ('a', 'Patient', 'p', 'created', ?)",
        )
        .bind(at)
        .execute(store.sqlite_pool().unwrap())
        .await
        .unwrap();
    }
    assert_eq!(store.prune_changes(5).await.unwrap(), 0);
    assert_eq!(store.prune_changes(30).await.unwrap(), 2);
    let filter = ehrsync::store::ChangeFilter::default();
    let left: Vec<i64> = store
        .read_changes(&filter, 0, 100)
        .await
        .unwrap()
        .iter()
        .map(|c| c.at)
        .collect();
    assert_eq!(left, [30, 40, 50]);
    assert_eq!(store.prune_changes(1000).await.unwrap(), 3);
    // seq keeps growing after pruning.
    sqlx::query(
        "INSERT INTO changes (account, resource_type, id, kind, at) VALUES ('a', 'Patient', 'p', 'created', 60)",
    )
    .execute(store.sqlite_pool().unwrap())
    .await
    .unwrap();
    assert_eq!(store.read_changes(&filter, 0, 100).await.unwrap()[0].seq, 6);
}

/// PostgreSQL's form of the busy timeout, and what ends a stopped agent's hold: a session
/// left inside a transaction with a row locked (an agent stopped or cut off mid-write) makes
/// another agent's write to that row fail after `BUSY_TIMEOUT` instead of waiting, and the
/// server ends the stalled session after `IDLE_IN_TRANSACTION`, freeing the row.
#[tokio::test]
async fn a_stalled_postgres_session_holds_a_row_only_until_the_server_ends_it() {
    use ehrsync::store::Holder;
    use ehrsync::store::backend::{Backend, postgres};
    if !common::on_postgres() {
        eprintln!("skipped on SQLite: the file's own busy timeout is tested above");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let database = common::fresh_database(dir.path());
    let stalled = Store::open(&database).await.unwrap();
    let other = Store::open(&database).await.unwrap();
    let holder = Holder::elsewhere("agent-b");
    let Backend::Postgres(pool) = stalled.db() else {
        panic!("a PostgreSQL store");
    };
    postgres::query(
        "INSERT INTO account_owners (account, holder, expires_at, generation, host, pid, \
         pid_started) VALUES ('a', 'agent-b', 0, 1, '', 0, 0)",
    )
    .execute(pool)
    .await
    .unwrap();
    let mut tx = pool.begin().await.unwrap();
    postgres::query("UPDATE account_owners SET generation = generation WHERE account = 'a'")
        .execute(&mut *tx)
        .await
        .unwrap();
    let idle_from = std::time::Instant::now();

    // The other agent's write waits for the lock only so long, then fails as "busy" would.
    let waited = std::time::Instant::now();
    let first = tokio::time::timeout(
        store::BUSY_TIMEOUT * 3,
        other.renew_owned(&holder, 100, Duration::from_secs(30)),
    )
    .await
    .expect("the write gave up waiting for the lock");
    assert!(first.is_err(), "the row was locked: {first:?}");
    assert!(
        waited.elapsed() >= store::BUSY_TIMEOUT,
        "{:?}",
        waited.elapsed()
    );

    // Once the server has ended the stalled session, the row is free again.
    tokio::time::sleep(
        (store::IDLE_IN_TRANSACTION + Duration::from_secs(1)).saturating_sub(idle_from.elapsed()),
    )
    .await;
    let renewed = other
        .renew_owned(&holder, 100, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(renewed, vec![("a".to_owned(), 1)]);
    // The stalled agent, woken, finds its transaction gone: nothing it wrote is kept.
    assert!(tx.commit().await.is_err(), "the stalled session was ended");
    assert_eq!(
        common::scalar(
            &other,
            "SELECT expires_at FROM account_owners WHERE account = 'a'"
        )
        .await
        .unwrap(),
        130
    );
}
