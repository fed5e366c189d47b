//! `ehrsync status` run by someone who may read the database but not write to its directory
//! (an operator in the service's group, a read-only mount): the WAL-mode database is read
//! without creating `-shm` or `-wal`, what the agent has committed to its WAL is seen, and a
//! WAL that cannot be read consistently is refused with what to do.
//!
//! Root ignores permission bits, so as root the command runs as `nobody` (setpriv); otherwise
//! the directory is made read-only (0500) for the test's own user.
#![cfg(target_os = "linux")]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Run, write_config};
use ehrsync::store::Store;

const NOBODY: u32 = 65534;

const CONFIG: &str = r#"
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
"#;

/// Who runs `status`, and how the database directory is kept from them.
enum Reader {
    /// Root's test: `nobody`, via setpriv, on root's 0755 directory and 0644 files.
    Nobody(PathBuf),
    /// Anyone else's: the test's own user, on a 0500 directory and 0400 files.
    Myself,
}

impl Reader {
    /// `None` (with the reason printed) when this machine offers no way to be denied writing.
    fn find() -> Option<Reader> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Some(Reader::Myself);
        }
        let Some(setpriv) = ["/usr/bin/setpriv", "/bin/setpriv"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
        else {
            eprintln!("skipped: running as root without setpriv, so nothing can deny a write");
            return None;
        };
        let works = Command::new(&setpriv)
            .args(nobody_args())
            .arg("/bin/true")
            .status()
            .is_ok_and(|s| s.success());
        if !works {
            eprintln!("skipped: running as root, and setpriv cannot switch to uid {NOBODY}");
            return None;
        }
        Some(Reader::Nobody(setpriv))
    }

    /// Keeps the reader from writing to `dir` and the files in it.
    fn deny_writes(&self, dir: &Path) {
        let (dir_mode, file_mode) = match self {
            Reader::Nobody(_) => (0o755, 0o644),
            Reader::Myself => (0o500, 0o400),
        };
        for entry in std::fs::read_dir(dir).unwrap() {
            chmod(&entry.unwrap().path(), file_mode);
        }
        chmod(dir, dir_mode);
    }

    fn status(&self, config: &Path, json: bool) -> Run {
        let bin = env!("CARGO_BIN_EXE_ehrsync");
        let mut cmd = match self {
            Reader::Nobody(setpriv) => {
                let mut cmd = Command::new(setpriv);
                cmd.args(nobody_args()).arg(bin);
                cmd
            }
            Reader::Myself => Command::new(bin),
        };
        cmd.env_clear().arg("status").arg("--config").arg(config);
        if json {
            cmd.arg("--json");
        }
        cmd.output().unwrap().into()
    }
}

fn nobody_args() -> [String; 3] {
    [
        format!("--reuid={NOBODY}"),
        format!("--regid={NOBODY}"),
        "--clear-groups".to_owned(),
    ]
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The names of the files in `dir`.
fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A closed database in `dir/db` with one successful run of niko/patients (`records` records),
/// and the config (readable by the reader) in `dir`.
async fn database(dir: &Path, records: i64) -> (PathBuf, PathBuf) {
    chmod(dir, 0o755);
    let config = write_config(dir, CONFIG);
    chmod(&config, 0o644);
    let db = dir.join("db/ehrsync.db");
    let store = Store::open(&db).await.unwrap();
    add_run(&store, records).await;
    store.close().await;
    (config, db)
}

async fn add_run(store: &Store, records: i64) {
    sqlx::query(
        "INSERT INTO sync_runs (account, job, started_at, finished_at, outcome, pages, records) \
         VALUES ('niko', 'patients', 1, 2, 'success', 1, ?)",
    )
    .bind(records)
    .execute(store.sqlite_pool().unwrap())
    .await
    .unwrap();
}

fn last_records(run: &Run) -> i64 {
    let report: serde_json::Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", run.stdout, run.stderr));
    report["accounts"][0]["jobs"][0]["last_run"]["records"]
        .as_i64()
        .unwrap_or_else(|| panic!("{report}"))
}

#[tokio::test]
async fn status_reads_a_database_whose_directory_it_cannot_write() {
    let Some(reader) = Reader::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (config, db) = database(dir.path(), 1717).await;
    let db_dir = db.parent().unwrap().to_owned();
    assert_eq!(files(&db_dir), ["ehrsync.db"], "closed: no -wal, no -shm");
    let before = std::fs::read(&db).unwrap();
    reader.deny_writes(&db_dir);

    let run = reader.status(&config, true);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(last_records(&run), 1717);
    let table = reader.status(&config, false);
    assert_eq!(table.code, Some(0), "{}", table.stderr);
    assert!(table.stdout.contains("niko/patients"), "{}", table.stdout);
    assert_eq!(files(&db_dir), ["ehrsync.db"], "status creates nothing");
    assert_eq!(std::fs::read(&db).unwrap(), before, "status writes nothing");
    chmod(&db_dir, 0o700);
}

#[tokio::test]
async fn status_sees_what_a_running_agent_committed_to_its_wal() {
    let Some(reader) = Reader::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (config, db) = database(dir.path(), 1).await;
    let db_dir = db.parent().unwrap().to_owned();
    // The agent is running: its connections keep `-wal` and `-shm`, and a committed run sits in
    // the WAL, not yet in the database file.
    let agent = Store::open(&db).await.unwrap();
    add_run(&agent, 2828).await;
    assert_eq!(
        files(&db_dir),
        ["ehrsync.db", "ehrsync.db-shm", "ehrsync.db-wal"]
    );
    reader.deny_writes(&db_dir);

    let run = reader.status(&config, true);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(last_records(&run), 2828, "the WAL's commit is seen");
    chmod(&db_dir, 0o700);

    // The same files left by an agent that crashed (copied while it ran): still read, WAL
    // included.
    let crashed = dir.path().join("crashed");
    std::fs::create_dir(&crashed).unwrap();
    for name in files(&db_dir) {
        std::fs::copy(db_dir.join(&name), crashed.join(&name)).unwrap();
    }
    agent.close().await;
    let crashed_config = dir.path().join("crashed.toml");
    std::fs::write(
        &crashed_config,
        CONFIG.replace("db/ehrsync.db", "crashed/ehrsync.db"),
    )
    .unwrap();
    chmod(&crashed_config, 0o644);
    reader.deny_writes(&crashed);
    let run = reader.status(&crashed_config, true);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(last_records(&run), 2828, "the WAL's commit is seen");
    chmod(&crashed, 0o700);
}

#[tokio::test]
async fn status_refuses_a_wal_it_cannot_read_consistently_and_says_what_to_do() {
    let Some(reader) = Reader::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (_, db) = database(dir.path(), 1).await;
    let db_dir = db.parent().unwrap().to_owned();
    // A copy taken while the agent ran: the database and its WAL, without `-shm`. Reading the
    // database file alone would show the run before the one in the WAL.
    let agent = Store::open(&db).await.unwrap();
    add_run(&agent, 3939).await;
    let copy = dir.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    for name in ["ehrsync.db", "ehrsync.db-wal"] {
        std::fs::copy(db_dir.join(name), copy.join(name)).unwrap();
    }
    agent.close().await;
    let config_text = CONFIG.replace("db/ehrsync.db", "copy/ehrsync.db");
    let copy_config = dir.path().join("copy.toml");
    std::fs::write(&copy_config, config_text).unwrap();
    chmod(&copy_config, 0o644);
    reader.deny_writes(&copy);

    let run = reader.status(&copy_config, true);
    assert_eq!(run.code, Some(1), "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains("ehrsync.db-wal") && run.stderr.contains("-shm"),
        "{}",
        run.stderr
    );
    assert_eq!(files(&copy), ["ehrsync.db", "ehrsync.db-wal"]);
    chmod(&copy, 0o700);
}
