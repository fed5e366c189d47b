//! Pull throughput and memory: the vendor sandbox serves N generated FHIR Patients (~1.4 KB of
//! JSON each) on loopback, and `ehrsync sync` (the release binary, as operators run it) pulls
//! them all into a fresh SQLite database. Beside it, the raw SQLite ceiling measured in the same
//! run: rusqlite upserting the same rows into the same schema, with the same durability (WAL,
//! `synchronous = FULL`), one prepared single-row statement, one transaction per 1,000-row page,
//! no HTTP and no JSON. Prints patients per second, the share of the ceiling, and the pull's
//! peak RSS (from `wait4`), at each size (default 100,000 and 1,000,000), so flat memory shows
//! as equal RSS.
//!
//! Run: `cargo bench --bench pull [-- --runs 3 100000 1000000]`.

#[cfg(target_os = "linux")]
mod common;

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("this benchmark measures through /proc and wait4: Linux only");
}

#[cfg(target_os = "linux")]
fn main() {
    bench::main();
}

#[cfg(target_os = "linux")]
mod bench {
    use std::path::Path;
    use std::process::Command;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use ehrsync::clock::SystemClock;
    use ehrsync::sandbox::{self, Lifetimes, Sandbox};
    use ehrsync::vendor::Vendor;

    use crate::common::{self, spread};

    const PAGE: u64 = 1000;

    pub fn main() {
        let runs: usize = common::arg("--runs").unwrap_or(3);
        let sizes: Vec<u64> = common::positional(&["--runs"]);
        let sizes = if sizes.is_empty() {
            vec![100_000, 1_000_000]
        } else {
            sizes
        };
        let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
        let sandbox = runtime
            .block_on(Sandbox::start(
                Arc::new(SystemClock),
                Lifetimes::documented(),
                0,
            ))
            .expect("the sandbox");
        println!("pull: sandbox -> ehrsync sync -> SQLite, against raw SQLite, {runs} runs");
        for n in sizes {
            sandbox.set_patients(n);
            let (mut pulled, mut ceiling, mut share, mut rss) = (vec![], vec![], vec![], vec![]);
            for _ in 0..runs {
                // Each measurement starts with no dirty pages of the one before to write back.
                common::flush_disks();
                let (rate, peak_mb) = pipeline(&sandbox, n);
                common::flush_disks();
                let raw = raw_ceiling(&sandbox, n);
                pulled.push(rate);
                ceiling.push(raw);
                share.push(rate / raw * 100.0);
                rss.push(peak_mb);
            }
            println!("  {n} patients:");
            println!("    ehrsync pull:      {} patients/s", spread(&pulled, 0));
            println!("    raw SQLite:        {} rows/s", spread(&ceiling, 0));
            println!("    share of ceiling:  {} %", spread(&share, 1));
            println!("    pull's peak RSS:   {} MB", spread(&rss, 1));
        }
    }

    /// One full pull of `n` patients by the release binary: patients per second, peak RSS (MB).
    fn pipeline(sandbox: &Sandbox, n: u64) -> (f64, f64) {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let config = format!(
            "[agent]\ndatabase = 'ehrsync.db'\n{}\n[[accounts.nx.jobs]]\nname = 'patients'\nkind = 'fhir'\nschedule = '0 0 3 * * *'\npage_size = {PAGE}\n",
            sandbox.account_config(Vendor::Nextech, "nx")
        );
        let path = dir.path().join("ehrsync.toml");
        std::fs::write(&path, config).expect("write the config");
        let started = Instant::now();
        let child = Command::new(common::EHRSYNC)
            .args(["sync", "nx", "patients", "--full", "--config"])
            .arg(&path)
            .env_clear()
            .envs(sandbox::credentials_env())
            .env("EHRSYNC_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("run ehrsync sync");
        let (code, peak_kb) = common::wait_with_peak_rss(child);
        let secs = started.elapsed().as_secs_f64();
        assert_eq!(code, Some(0), "ehrsync sync failed");
        let stored: i64 = rusqlite::Connection::open(dir.path().join("ehrsync.db"))
            .and_then(|c| c.query_row("SELECT count(*) FROM resources", [], |r| r.get(0)))
            .expect("count the stored patients");
        assert_eq!(stored, n as i64, "the pull stored every patient once");
        (n as f64 / secs, peak_kb as f64 / 1024.0)
    }

    /// Rows per second upserting the sandbox's `n` patients straight into SQLite. Only the
    /// inserts and commits are timed, not generating the rows.
    fn raw_ceiling(sandbox: &Sandbox, n: u64) -> f64 {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let db = open_like_ehrsync(&dir.path().join("raw.db")).expect("open the raw database");
        let mut timed = Duration::ZERO;
        let mut page = Vec::with_capacity(PAGE as usize);
        for start in (0..n).step_by(PAGE as usize) {
            page.clear();
            for i in start..(start + PAGE).min(n) {
                let data = sandbox.patient_json(i);
                let head: serde_json::Value =
                    serde_json::from_str(&data).expect("the sandbox's patient JSON");
                let meta = |k: &str| head["meta"][k].as_str().map(str::to_owned);
                page.push((
                    sandbox::fhir_id(i),
                    meta("versionId"),
                    meta("lastUpdated"),
                    data,
                ));
            }
            let t = Instant::now();
            write_page(&db, &page).expect("write a page");
            timed += t.elapsed();
        }
        n as f64 / timed.as_secs_f64()
    }

    type Row = (String, Option<String>, Option<String>, String);

    fn write_page(db: &rusqlite::Connection, rows: &[Row]) -> rusqlite::Result<()> {
        let tx = db.unchecked_transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO resources \
                 (account, resource_type, id, version_id, last_updated, data, synced_at) \
                 VALUES ('nx', 'Patient', ?, ?, ?, ?, 0) \
                 ON CONFLICT (account, resource_type, id) DO UPDATE SET \
                 version_id = excluded.version_id, last_updated = excluded.last_updated, \
                 data = excluded.data, synced_at = excluded.synced_at",
            )?;
            for (id, version, updated, data) in rows {
                insert.execute((id, version, updated, data))?;
            }
        }
        tx.commit()
    }

    /// A database with ehrsync's schema (its migrations, in order) and durability settings.
    fn open_like_ehrsync(path: &Path) -> rusqlite::Result<rusqlite::Connection> {
        let db = rusqlite::Connection::open(path)?;
        db.pragma_update(None, "journal_mode", "wal")?;
        db.pragma_update(None, "synchronous", "full")?;
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .expect("the migrations directory")
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "sql"))
            .collect();
        files.sort();
        for file in files {
            db.execute_batch(&std::fs::read_to_string(file).expect("a migration"))?;
        }
        Ok(db)
    }
}
