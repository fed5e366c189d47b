//! Pull throughput and memory: the vendor sandbox serves N generated FHIR Patients (~1.4 KB of
//! JSON each) on loopback, and `ehrsync sync` (the release binary, as operators run it) pulls
//! them all into a fresh SQLite database. Prints patients per second and the process's peak
//! RSS, at each size given (default 20,000 and 200,000), so flat memory shows as equal RSS.
//!
//! Run: `cargo bench --bench pull` or `cargo bench --bench pull -- 1000000`.
//! Needs `/usr/bin/time` (Debian package `time`) for the peak RSS.

use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use ehrsync::clock::SystemClock;
use ehrsync::sandbox::{self, Lifetimes, Sandbox};
use ehrsync::vendor::Vendor;

fn main() {
    let sizes: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.replace('_', "").parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![20_000, 200_000]
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
    for n in sizes {
        sandbox.set_patients(n);
        let dir = tempfile::tempdir().expect("a temporary directory");
        let config = format!(
            "[agent]\ndatabase = 'ehrsync.db'\n{}\n[[accounts.nx.jobs]]\nname = 'patients'\nkind = 'fhir'\nschedule = '0 0 3 * * *'\npage_size = 1000\n",
            sandbox.account_config(Vendor::Nextech, "nx")
        );
        let path = dir.path().join("ehrsync.toml");
        std::fs::write(&path, config).expect("write the config");
        let started = Instant::now();
        let out = Command::new("/usr/bin/time")
            .args(["-f", "peak_rss_kb=%M"])
            .arg(env!("CARGO_BIN_EXE_ehrsync"))
            .args(["sync", "nx", "patients", "--full", "--config"])
            .arg(&path)
            .env_clear()
            .envs(sandbox::credentials_env())
            .env("EHRSYNC_LOG", "warn")
            .output()
            .expect("run /usr/bin/time ehrsync sync");
        let secs = started.elapsed().as_secs_f64();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let rss_kb: f64 = stderr
            .lines()
            .find_map(|l| l.strip_prefix("peak_rss_kb="))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(f64::NAN);
        assert!(out.status.success(), "{stdout}\n{stderr}");
        let db = std::fs::metadata(dir.path().join("ehrsync.db")).map_or(0, |m| m.len());
        println!(
            "pull {n:>9} patients: {secs:7.2} s, {:>8.0} patients/s, peak RSS {:6.1} MB, database {:.0} MB",
            n as f64 / secs,
            rss_kb / 1024.0,
            db as f64 / 1_048_576.0
        );
        println!("  {}", stdout.trim());
    }
}
