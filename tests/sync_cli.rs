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
    let mut config = format!(
        "[agent]\n{}{extra_agent}",
        common::database_lines("state/ehrsync.db")
    );
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
        first
            .stdout
            .trim_end()
            .ends_with("(full); 1050 created, 0 updated, 0 deleted (reconciled)"),
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

/// The mirror as an operator reads it: views kept by `sync`, `views list`/`rebuild`, `export`
/// in both formats, a reconcile, and `changes` in every format; a broken view file is a config
/// error naming its key.
#[tokio::test(flavor = "multi_thread")]
async fn views_export_and_changes_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let views = dir.path().join("views");
    std::fs::create_dir(&views).unwrap();
    for f in ["patient_demographics", "patient_contacts", "appointments"] {
        std::fs::copy(
            format!("{}/config/views/{f}.json", env!("CARGO_MANIFEST_DIR")),
            views.join(format!("{f}.json")),
        )
        .unwrap();
    }
    let extra = "[[views]]\nfile = 'views/patient_demographics.json'\n\
                 [[views]]\nfile = 'views/patient_contacts.json'\n\
                 [[views]]\nfile = 'views/appointments.json'\n";
    let (sandbox, path) = sandbox_with_config(dir.path(), extra).await;
    let config = path.to_str().unwrap();
    let env = sandbox::credentials_env();
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend_from_slice(&["--config", config]);
        ehrsync(&all, &env)
    };

    let check = run(&["check-config"]);
    assert_eq!(check.code, Some(0), "{}", check.stderr);
    assert!(
        check.stdout.contains(
            "[[views]] patient_demographics → table view_patient_demographics (Patient records;"
        ),
        "{}",
        check.stdout
    );
    let first = run(&["sync", "nx", "patients"]);
    assert_eq!(first.code, Some(0), "{}", first.stderr);
    let list = run(&["views", "list"]);
    assert!(
        list.stdout
            .contains("patient_demographics  table view_patient_demographics (1050 rows)")
            && list
                .stdout
                .contains("patient_contacts  table view_patient_contacts (2100 rows)")
            && list
                .stdout
                .contains("appointments  table view_appointments (0 rows)"),
        "{}",
        list.stdout
    );

    let csv_path = dir.path().join("demographics.csv");
    let export = run(&[
        "export",
        "patient_demographics",
        "--out",
        csv_path.to_str().unwrap(),
    ]);
    assert_eq!(export.code, Some(0), "{}", export.stderr);
    assert!(
        export.stderr.contains("exported 1050 rows"),
        "{}",
        export.stderr
    );
    let csv = std::fs::read_to_string(&csv_path).unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some(
            "account,resource_id,id,mrn,family,given,birth_date,gender,phone,email,active,\
             address_line,city,state,postal_code"
        )
    );
    let p7: serde_json::Value = serde_json::from_str(&sandbox.patient_json(7)).unwrap();
    let row7 = lines.find(|l| l.starts_with("nx,pat-0000007,")).unwrap();
    let address = p7["address"][0]["line"].as_array().unwrap();
    // The joined address holds a comma: RFC 4180 quotes the field.
    assert!(
        row7.contains(&format!(
            "\"{}, {}\"",
            address[0].as_str().unwrap(),
            address[1].as_str().unwrap()
        )) && row7.contains(p7["identifier"][0]["value"].as_str().unwrap())
            && row7.contains(",1,"),
        "{row7}"
    );
    assert_eq!(csv.lines().count(), 1051);
    assert!(!dir.path().join("demographics.csv.partial").exists());

    let ndjson = run(&["export", "Patient", "--account", "nx", "--format", "ndjson"]);
    assert_eq!(ndjson.code, Some(0), "{}", ndjson.stderr);
    assert_eq!(ndjson.stdout.lines().count(), 1050);
    for line in ndjson.stdout.lines().take(3) {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(record["resourceType"], "Patient");
    }
    let contacts = run(&["export", "patient_contacts", "--format", "ndjson"]);
    let contact: serde_json::Value =
        serde_json::from_str(contacts.stdout.lines().next().unwrap()).unwrap();
    assert_eq!(contact["account"], "nx");
    assert!(
        contact["system"] == "phone" || contact["system"] == "email",
        "{contact}"
    );

    let seq: i64 = {
        let all = run(&["changes", "--format", "json"]);
        assert_eq!(all.stdout.lines().count(), 1050, "{}", all.stderr);
        let last: serde_json::Value =
            serde_json::from_str(all.stdout.lines().last().unwrap()).unwrap();
        last["seq"].as_i64().unwrap()
    };
    sandbox.delete_patients([3, 4]);
    sandbox.change_patients([10, 11, 12]);
    let reconcile = run(&["sync", "nx", "patients", "--reconcile"]);
    assert_eq!(reconcile.code, Some(0), "{}", reconcile.stderr);
    assert!(
        reconcile
            .stdout
            .trim_end()
            .ends_with("0 created, 3 updated, 2 deleted (reconciled)"),
        "{}",
        reconcile.stdout
    );
    let since = seq.to_string();
    let changes = run(&["changes", "nx", "--since", &since, "--format", "json"]);
    let kinds: Vec<(String, String)> = changes
        .stdout
        .lines()
        .map(|l| {
            let c: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                c["id"].as_str().unwrap().to_owned(),
                c["kind"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let mut kinds = kinds;
    kinds.sort();
    assert_eq!(
        kinds,
        [
            ("pat-0000003", "deleted"),
            ("pat-0000004", "deleted"),
            ("pat-0000010", "updated"),
            ("pat-0000011", "updated"),
            ("pat-0000012", "updated"),
        ]
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
    );
    let table = run(&["changes", "nx", "--since", &since, "--resource", "Patient"]);
    assert!(
        table.stdout.starts_with("     SEQ  AT") && table.stdout.lines().count() == 6,
        "{}",
        table.stdout
    );
    let csv = run(&["changes", "--since", &since, "--format", "csv"]);
    assert!(
        csv.stdout
            .starts_with("seq,at,account,resource_type,id,kind,version_id,last_updated,run_id\n"),
        "{}",
        csv.stdout
    );
    let list = run(&["views", "list"]);
    assert!(list.stdout.contains("(1048 rows)"), "{}", list.stdout);
    let rebuilt = run(&["views", "rebuild", "patient_demographics"]);
    assert!(
        rebuilt
            .stdout
            .starts_with("patient_demographics: rebuilt from 1048 records, 1048 rows"),
        "{}",
        rebuilt.stdout
    );
    let unknown = run(&["export", "nothing"]);
    assert_eq!(unknown.code, Some(2));
    assert!(
        unknown
            .stderr
            .contains("neither a view (patients, patient_demographics"),
        "{}",
        unknown.stderr
    );

    std::fs::write(views.join("appointments.json"), r#"{"resourceType":"ViewDefinition","name":"appointments","status":"active","resource":"Appointment","select":[{"column":[{"name":"x","path":"id.frobnicate()"}]}]}"#).unwrap();
    let broken = run(&["check-config"]);
    assert_eq!(broken.code, Some(2));
    assert!(
        broken.stderr.contains("views[2].file") && broken.stderr.contains("frobnicate"),
        "{}",
        broken.stderr
    );
    for r in [&first, &export, &ndjson, &reconcile, &changes, &csv, &list] {
        r.assert_absent(&env.iter().map(|(_, v)| *v).collect::<Vec<_>>());
    }
}
