//! `ehrsync sync` and `ehrsync run` as operators use them: real processes pulling from the vendor
//! sandbox, watched through their output, `ehrsync status` and `/metrics`.
#![cfg(unix)]

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::ehrsync;
use ehrsync::clock::SystemClock;
use ehrsync::sandbox::{self, Lifetimes, Sandbox};
use ehrsync::vendor::Vendor;

async fn sandbox_with_config(
    dir: &std::path::Path,
    extra_agent: &str,
) -> (Sandbox, std::path::PathBuf) {
    let sandbox = Sandbox::start(Arc::new(SystemClock), Lifetimes::documented(), 0)
        .await
        .unwrap();
    sandbox.set_patients(1_050);
    let mut config = format!("[agent]\ndatabase = 'state/ehrsync.db'\n{extra_agent}");
    config.push_str(&sandbox.account_config(Vendor::Nextech, "nx"));
    config.push_str(&sandbox.account_config(Vendor::NikoHealth, "niko"));
    config.push_str(
        "[[accounts.nx.jobs]]\nname = 'patients'\nkind = 'fhir'\nschedule = '0 0 3 * * *'\npage_size = 100\n\
         [[accounts.niko.jobs]]\nname = 'patients'\nkind = 'nikohealth_patients'\nschedule = '0 0 3 * * *'\npage_size = 200\n",
    );
    let path = common::write_config(dir, &config);
    (sandbox, path)
}

#[tokio::test(flavor = "multi_thread")]
async fn sync_runs_one_job_and_prints_a_summary() {
    let dir = tempfile::tempdir().unwrap();
    let (sandbox, path) = sandbox_with_config(dir.path(), "").await;
    let config = path.to_str().unwrap();
    let env = sandbox::credentials_env();
    let sync = |args: &[&str]| {
        let mut all = vec!["sync", "--config", config];
        all.extend_from_slice(args);
        ehrsync(&all, &env)
    };

    let first = sync(&["nx", "patients"]);
    assert_eq!(first.code, Some(0), "{}", first.stderr);
    assert!(
        first
            .stdout
            .starts_with("nx/patients: success, 11 pages, 1050 records in "),
        "{}",
        first.stdout
    );
    assert!(
        first.stdout.trim_end().ends_with("(full)"),
        "{}",
        first.stdout
    );

    sandbox.change_patients([7, 8, 9]);
    let second = sync(&["nx", "patients"]);
    assert_eq!(second.code, Some(0), "{}", second.stderr);
    // The default 5-minute overlap also re-reads the newest generated patients.
    assert!(
        second.stdout.contains("(changes after "),
        "{}",
        second.stdout
    );

    let niko = sync(&["niko", "patients", "--full"]);
    assert_eq!(niko.code, Some(0), "{}", niko.stderr);
    assert!(
        niko.stdout
            .starts_with("niko/patients: success, 6 pages, 1050 records"),
        "{}",
        niko.stdout
    );

    let status = ehrsync(&["status", "--json", "--config", config], &env);
    let report: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    let nx = &report["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "nx")
        .unwrap()["jobs"][0];
    assert_eq!(nx["last_run"]["outcome"], "success", "{nx}");
    assert!(nx["next_run"].as_str().unwrap().ends_with("T03:00:00Z"));
    let table = ehrsync(&["status", "--config", config], &env);
    assert!(table.stdout.contains("niko/patients"), "{}", table.stdout);

    let unknown = sync(&["nx", "encounters"]);
    assert_eq!(unknown.code, Some(2));
    assert!(
        unknown
            .stderr
            .contains("account `nx` has no job `encounters`; its jobs: patients"),
        "{}",
        unknown.stderr
    );
    let nobody = sync(&["nope", "patients"]);
    assert_eq!(nobody.code, Some(2));
    assert!(
        nobody.stderr.contains("no account `nope`"),
        "{}",
        nobody.stderr
    );

    sandbox.inject_api_after(
        Vendor::Nextech,
        0,
        sandbox::ApiFault::Http(sandbox::Fault::MalformedJson),
        1,
    );
    let failed = sync(&["nx", "patients", "--full"]);
    assert_eq!(failed.code, Some(1));
    assert!(
        failed.stdout.contains("nx/patients: failed, 0 pages")
            && failed.stdout.contains("page 1 (GET http://127.0.0.1:"),
        "{}",
        failed.stdout
    );
    for run in [&first, &second, &niko, &failed, &status, &table] {
        run.assert_absent(&env.iter().map(|(_, v)| *v).collect::<Vec<_>>());
    }
}

async fn get(url: &str) -> Option<String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn run_pulls_jobs_that_never_ran_at_start_and_reports_them_in_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (_sandbox, path) = sandbox_with_config(
        dir.path(),
        &format!("metrics_listen = '127.0.0.1:{port}'\n"),
    )
    .await;
    let env = sandbox::credentials_env();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ehrsync"))
        .env_clear()
        .envs(env.iter().copied())
        .args(["run", "--config", path.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let metrics = loop {
        let text = get(&format!("http://127.0.0.1:{port}/metrics"))
            .await
            .unwrap_or_default();
        let done = ["nx", "niko"].iter().all(|a| {
            text.contains(&format!(
                "ehrsync_sync_runs_total{{account=\"{a}\",job=\"patients\",outcome=\"success\"}} 1"
            ))
        });
        if done {
            break text;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no successful runs within 30 s:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for line in [
        "ehrsync_sync_records_total{account=\"nx\",job=\"patients\"} 1050",
        "ehrsync_sync_records_total{account=\"niko\",job=\"patients\"} 1050",
        "ehrsync_api_requests_total{account=\"nx\",status=\"2xx\"} 11",
        "ehrsync_sync_last_success_timestamp_seconds{account=\"niko\",job=\"patients\"}",
        "ehrsync_sync_duration_seconds_count{account=\"nx\",job=\"patients\"} 1",
    ] {
        assert!(metrics.contains(line), "missing {line} in:\n{metrics}");
    }
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let exit = child.wait().unwrap();
    assert_eq!(exit.code(), Some(0));
}
