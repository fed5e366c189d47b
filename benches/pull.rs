//! Pull throughput and memory: the vendor sandbox serves N generated FHIR Patients (~1.4 KB of
//! JSON each) on loopback, and `ehrsync sync` (the release binary, as operators run it) pulls
//! them all into a fresh SQLite database: once as configured by default (the change log and
//! the `patients` table kept with each page), once with two SQL-on-FHIR views as well
//! (`patient_demographics`, `patient_contacts`). On the largest size's last database with views,
//! it then measures `ehrsync export` (rows/s and peak RSS, CSV of a view and NDJSON of the
//! records) and a name lookup in `patients`. Beside it, the raw SQLite ceiling measured in the same
//! run: rusqlite upserting the same rows into the same schema, with the same durability (WAL,
//! `synchronous = FULL`), one prepared single-row statement, one transaction per 1,000-row page,
//! no HTTP and no JSON. Prints patients per second, the share of the ceiling, and the pull's
//! peak RSS (from `wait4`), at each size (default 100,000 and 1,000,000), so flat memory shows
//! as equal RSS.
//!
//! Run: `cargo bench --bench pull [-- --runs 3 [--baseline PATH] [--postgres URL] 100000 1000000]`.
//! `--baseline` also pulls with another ehrsync binary (an earlier build) for comparison.
//! `--postgres` also pulls into PostgreSQL: a new database on that server (a URL of a role
//! that may create databases, e.g. `postgres://postgres@127.0.0.1:5432/postgres`) per pull,
//! with and without the views, beside the SQLite figures.

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
        let baseline: Option<String> = common::arg("--baseline");
        let postgres: Option<String> = common::arg("--postgres");
        let sizes: Vec<u64> = common::positional(&["--runs", "--baseline", "--postgres"]);
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
            let (mut viewed, mut view_share, mut view_rss) = (vec![], vec![], vec![]);
            let (mut based, mut base_share) = (vec![], vec![]);
            let mut last = None;
            for _ in 0..runs {
                // Each measurement starts with no dirty pages of the one before to write back.
                common::flush_disks();
                let (rate, peak_mb, _) = pipeline(&sandbox, n, false, common::EHRSYNC);
                if let Some(binary) = &baseline {
                    common::flush_disks();
                    let (base, _, _) = pipeline(&sandbox, n, false, binary);
                    based.push(base);
                    base_share.push(rate / base * 100.0);
                }
                common::flush_disks();
                let (with_views, views_mb, dir) = pipeline(&sandbox, n, true, common::EHRSYNC);
                common::flush_disks();
                let raw = raw_ceiling(&sandbox, n);
                pulled.push(rate);
                ceiling.push(raw);
                share.push(rate / raw * 100.0);
                rss.push(peak_mb);
                viewed.push(with_views);
                view_share.push(with_views / rate * 100.0);
                view_rss.push(views_mb);
                last = Some(dir);
            }
            println!("  {n} patients:");
            println!("    ehrsync pull:      {} patients/s", spread(&pulled, 0));
            println!("    raw SQLite:        {} rows/s", spread(&ceiling, 0));
            println!("    share of ceiling:  {} %", spread(&share, 1));
            println!("    pull's peak RSS:   {} MB", spread(&rss, 1));
            if baseline.is_some() {
                println!("    baseline binary:   {} patients/s", spread(&based, 0));
                println!("    this / baseline:   {} %", spread(&base_share, 1));
            }
            println!("    with two views:    {} patients/s", spread(&viewed, 0));
            println!("    views / no views:  {} %", spread(&view_share, 1));
            println!("    peak RSS (views):  {} MB", spread(&view_rss, 1));
            if let Some(server) = &postgres {
                let (mut pg, mut pg_rss, mut pg_views, mut pg_views_rss) =
                    (vec![], vec![], vec![], vec![]);
                for _ in 0..runs {
                    common::flush_disks();
                    let (rate, mb) = pg_pipeline(&runtime, &sandbox, n, false, server);
                    pg.push(rate);
                    pg_rss.push(mb);
                    common::flush_disks();
                    let (rate, mb) = pg_pipeline(&runtime, &sandbox, n, true, server);
                    pg_views.push(rate);
                    pg_views_rss.push(mb);
                }
                println!("    PostgreSQL pull:   {} patients/s", spread(&pg, 0));
                println!("    its peak RSS:      {} MB", spread(&pg_rss, 1));
                println!("    PostgreSQL, views: {} patients/s", spread(&pg_views, 0));
                println!("    its peak RSS:      {} MB", spread(&pg_views_rss, 1));
            }
            if let Some(dir) = last {
                exports(&dir, n, runs);
                lookups(&dir);
            }
        }
    }

    /// `ehrsync export` of the pulled database: a view as CSV and the records as NDJSON, to
    /// files; rows per second and peak RSS.
    fn exports(dir: &tempfile::TempDir, n: u64, runs: usize) {
        for (what, format, rows_per_patient) in
            [("patient_demographics", "csv", 1), ("Patient", "ndjson", 1)]
        {
            let (mut rates, mut rss) = (vec![], vec![]);
            for _ in 0..runs {
                let out = dir.path().join(format!("export.{format}"));
                let started = Instant::now();
                let child = Command::new(common::EHRSYNC)
                    .args(["export", what, "--format", format, "--out"])
                    .arg(&out)
                    .arg("--config")
                    .arg(dir.path().join("ehrsync.toml"))
                    .env_clear()
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .expect("run ehrsync export");
                let (code, peak_kb) = common::wait_with_peak_rss(child);
                let secs = started.elapsed().as_secs_f64();
                assert_eq!(code, Some(0), "ehrsync export failed");
                let lines = std::io::BufRead::lines(std::io::BufReader::new(
                    std::fs::File::open(&out).expect("the export"),
                ))
                .count() as u64;
                let header = u64::from(format == "csv");
                assert_eq!(lines, n * rows_per_patient + header, "every row exported");
                rates.push((n * rows_per_patient) as f64 / secs);
                rss.push(peak_kb as f64 / 1024.0);
            }
            println!(
                "    export {what} ({format}): {} rows/s, peak RSS {} MB",
                spread(&rates, 0),
                spread(&rss, 1)
            );
        }
    }

    /// Looking a patient up by family and given name in `patients` (indexed), against the
    /// same question asked of the records' JSON as the version 2 view did.
    fn lookups(dir: &tempfile::TempDir) {
        let db = rusqlite::Connection::open(dir.path().join("ehrsync.db")).expect("the database");
        let names: Vec<(String, String)> = {
            let mut q = db
                .prepare("SELECT family, given FROM patients ORDER BY random() LIMIT 200")
                .expect("a query");
            q.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .and_then(Iterator::collect)
                .expect("sample names")
        };
        let sql = "SELECT account, id, birth_date FROM patients \
                   WHERE family = ?1 COLLATE NOCASE AND given = ?2 COLLATE NOCASE";
        let plan: String = db
            .query_row(&format!("EXPLAIN QUERY PLAN {sql}"), ("a", "b"), |r| {
                r.get(3)
            })
            .expect("the plan");
        let mut times = vec![];
        let mut found = 0usize;
        let mut q = db.prepare(sql).expect("the lookup");
        for (family, given) in &names {
            let t = Instant::now();
            found += q
                .query_map((family.to_uppercase(), given), |r| r.get::<_, String>(1))
                .and_then(Iterator::collect::<rusqlite::Result<Vec<_>>>)
                .expect("a lookup")
                .len();
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let times = common::sorted(times);
        println!(
            "    name lookup in patients: median {:.3} ms, p99 {:.3} ms ({:.0} rows each; plan: {plan})",
            common::quantile(&times, 0.5),
            common::quantile(&times, 0.99),
            found as f64 / names.len() as f64
        );
        let t = Instant::now();
        let (family, given) = &names[0];
        let _: i64 = db
            .query_row(
                "SELECT count(*) FROM resources WHERE resource_type = 'Patient' \
                 AND json_extract(data, '$.name[0].family') = ?1 \
                 AND (SELECT group_concat(g.value, ' ') FROM json_each(data, '$.name[0].given') AS g) = ?2",
                (family, given),
                |r| r.get(0),
            )
            .expect("the JSON scan");
        println!(
            "    the same lookup over the records' JSON (no table): {:.0} ms",
            t.elapsed().as_secs_f64() * 1000.0
        );
    }

    /// One full pull of `n` patients by the release binary, with or without two views:
    /// patients per second, peak RSS (MB), and the directory holding the database.
    fn pipeline(
        sandbox: &Sandbox,
        n: u64,
        views: bool,
        binary: &str,
    ) -> (f64, f64, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (secs, peak_kb) = timed_sync(sandbox, &dir, "database = 'ehrsync.db'\n", views, binary);
        let stored: i64 = rusqlite::Connection::open(dir.path().join("ehrsync.db"))
            .and_then(|c| c.query_row("SELECT count(*) FROM resources", [], |r| r.get(0)))
            .expect("count the stored patients");
        assert_eq!(stored, n as i64, "the pull stored every patient once");
        (n as f64 / secs, peak_kb as f64 / 1024.0, dir)
    }

    /// `ehrsync sync --full` of the sandbox's patients by `binary`, with a config in `dir` whose
    /// `[agent]` holds `database` (its lines) and, with `views`, the two shipped views: its
    /// wall time (s) and peak RSS (KB).
    fn timed_sync(
        sandbox: &Sandbox,
        dir: &tempfile::TempDir,
        database: &str,
        views: bool,
        binary: &str,
    ) -> (f64, u64) {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/views");
        let views = if views {
            format!(
                "[[views]]\nfile = '{}'\n[[views]]\nfile = '{}'\n",
                shipped.join("patient_demographics.json").display(),
                shipped.join("patient_contacts.json").display()
            )
        } else {
            String::new()
        };
        let config = format!(
            "[agent]\n{database}{views}{}\n[[accounts.nx.jobs]]\nname = 'patients'\nkind = 'fhir'\nschedule = '0 0 3 * * *'\npage_size = {PAGE}\n",
            sandbox.account_config(Vendor::Nextech, "nx")
        );
        let path = dir.path().join("ehrsync.toml");
        std::fs::write(&path, config).expect("write the config");
        let started = Instant::now();
        let child = Command::new(binary)
            .args(["sync", "nx", "patients", "--full", "--config"])
            .arg(&path)
            .env_clear()
            .envs(sandbox::credentials_env())
            .env("EHRSYNC_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("run ehrsync sync");
        let (code, peak_kb) = common::wait_with_peak_rss(child);
        assert_eq!(code, Some(0), "ehrsync sync failed");
        (started.elapsed().as_secs_f64(), peak_kb)
    }

    /// `ehrsync sync` of `n` patients into a new database on the PostgreSQL server `server`:
    /// patients per second and the pull's peak RSS (MB).
    fn pg_pipeline(
        runtime: &tokio::runtime::Runtime,
        sandbox: &Sandbox,
        n: u64,
        views: bool,
        server: &str,
    ) -> (f64, f64) {
        use sqlx::Connection;
        let dir = tempfile::tempdir().expect("a temporary directory");
        let url = common::new_postgres_database(
            runtime,
            server,
            &format!("ehrsync_bench_{}", std::process::id()),
        );
        let database = format!("database = '{url}'\ntoken_key = {{ file = 'ehrsync.key' }}\n");
        let (secs, peak_kb) = timed_sync(sandbox, &dir, &database, views, common::EHRSYNC);
        let stored: i64 = runtime.block_on(async {
            let mut c = sqlx::PgConnection::connect(&url).await.expect("connect");
            sqlx::query_scalar("SELECT count(*) FROM resources")
                .fetch_one(&mut c)
                .await
                .expect("count the stored patients")
        });
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
