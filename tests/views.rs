//! Materialised views stay equal to their ViewDefinition evaluated from scratch over the live
//! records: after random sequences of creates, updates, unchanged re-reads and deletions
//! (seeded, so a failure names the seed that reproduces it), and after `ehrsync sync`
//! processes killed with SIGKILL in the middle of a pull.

mod common;

use std::path::Path;
use std::time::Duration;

use ehrsync::store::{Holder, LeaseKey, PageRow, Reconciled, Store};
use ehrsync::views::{Materialised, SqlValue, ViewSet};
use serde_json::{Value, json};

/// A view exercising what the shipped ones do not: `forEachOrNull`, nested `forEach`,
/// `unionAll`, a collection column, `where`, constants and `%rowIndex`.
const NAMES_VIEW: &str = r#"{
  "resourceType": "ViewDefinition", "name": "patient_names", "status": "active",
  "resource": "Patient",
  "constant": [{"name": "official", "valueCode": "official"}],
  "where": [{"path": "active.exists().not() or active"}],
  "select": [
    {"column": [{"name": "pid", "path": "getResourceKey()"},
                {"name": "all_given", "path": "name.given", "collection": true}]},
    {"forEachOrNull": "name",
     "column": [{"name": "idx", "path": "%rowIndex", "type": "integer"},
                {"name": "is_official", "path": "use = %official", "type": "boolean"},
                {"name": "family", "path": "family", "type": "string"}],
     "select": [{"unionAll": [
        {"forEach": "given", "column": [{"name": "part", "path": "$this", "type": "string"}]},
        {"forEach": "prefix", "column": [{"name": "part", "path": "$this", "type": "string"}]}
     ]}]}
  ]
}"#;

fn views() -> ViewSet {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/views");
    let mut all: Vec<Materialised> = ["patient_demographics", "patient_contacts"]
        .iter()
        .map(|f| Materialised::load(&dir.join(format!("{f}.json"))).unwrap())
        .collect();
    let names: Value = serde_json::from_str(NAMES_VIEW).unwrap();
    all.push(Materialised::from_json(&names, Path::new("names.json")).unwrap());
    ViewSet::new(all)
}

/// A random Patient `id`, version `v`: fields present or not, one or several names, telecoms
/// and identifiers, so every view path meets empty, single and multiple values.
fn patient(rng: &mut fastrand::Rng, id: &str, v: u32) -> Value {
    let pick = |rng: &mut fastrand::Rng, xs: &[&str]| xs[rng.usize(..xs.len())].to_owned();
    let mut p = json!({"resourceType": "Patient", "id": id, "meta": {"versionId": v.to_string()}});
    let names: Vec<Value> = (0..rng.usize(0..3))
        .map(|_| {
            let mut n = json!({"family": pick(rng, &["Smith", "O'Brien", "Núñez", "Lee"])});
            if rng.bool() {
                n["use"] = json!(pick(rng, &["official", "usual", "maiden"]));
            }
            n["given"] = json!(
                (0..rng.usize(0..3))
                    .map(|_| pick(rng, &["Ann", "José", "Bo", "Zoë"]))
                    .collect::<Vec<_>>()
            );
            if rng.u8(..4) == 0 {
                n["prefix"] = json!(["Dr."]);
            }
            n
        })
        .collect();
    if !names.is_empty() {
        p["name"] = json!(names);
    }
    let telecom: Vec<Value> = (0..rng.usize(0..4))
        .map(|k| {
            json!({"system": pick(rng, &["phone", "email", "fax"]),
                   "value": format!("v{k}-{}", rng.u16(..)), "rank": k + 1})
        })
        .collect();
    if !telecom.is_empty() {
        p["telecom"] = json!(telecom);
    }
    if rng.bool() {
        p["identifier"] = json!([{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]},
                                  "value": format!("MRN{}", rng.u32(..))}]);
    }
    if rng.bool() {
        p["birthDate"] = json!(format!(
            "19{:02}-0{}-1{}",
            rng.u8(..100),
            rng.u8(1..10),
            rng.u8(..10)
        ));
    }
    if rng.u8(..3) > 0 {
        p["active"] = json!(rng.u8(..4) > 0);
    }
    if rng.bool() {
        p["address"] = json!([{"use": "home", "line": ["1 Main St", "Apt 2"], "city": "Salem", "postalCode": "97301"}]);
    }
    p
}

/// Every row of every view table, and every row the views give evaluated from scratch over
/// the live records: both as sorted text, to compare.
async fn actual_and_expected(store: &Store, views: &ViewSet) -> (Vec<String>, Vec<String>) {
    use ehrsync::store::{ExportEvent, ExportQuery, ExportValue};
    let (mut actual, mut expected) = (Vec::new(), Vec::new());
    // On PostgreSQL a column without a type holds text (see `store::views`).
    let postgres = store.is_shared();
    for view in views.all() {
        let table = ExportQuery::Table {
            name: view.table.clone(),
        };
        store
            .export(&table, None, |event| {
                if let ExportEvent::Row(values) = event {
                    let cells: Vec<String> = values
                        .iter()
                        .map(|v| match v {
                            ExportValue::Null => "NULL".to_owned(),
                            ExportValue::Integer(i) => format!("i{i}"),
                            ExportValue::Real(f) => format!("r{f}"),
                            ExportValue::Text(t) => format!("t{t}"),
                        })
                        .collect();
                    actual.push(format!("{} {}", view.name, cells.join("|")));
                }
                Ok(())
            })
            .await
            .unwrap();
        let mut records: Vec<(String, String, String)> = Vec::new();
        let resources = ExportQuery::Resources {
            resource_type: view.resource_type.clone(),
        };
        store
            .export(&resources, None, |event| {
                if let ExportEvent::Row(
                    [
                        ExportValue::Text(account),
                        ExportValue::Text(id),
                        ExportValue::Text(data),
                    ],
                ) = event
                {
                    records.push((account.to_string(), id.to_string(), data.to_string()));
                }
                Ok(())
            })
            .await
            .unwrap();
        for (account, id, data) in records {
            let json: Value = serde_json::from_str(&data).unwrap();
            for row in view.evaluate(&json).unwrap_or_default() {
                let cells: Vec<String> = [format!("t{account}"), format!("t{id}")]
                    .into_iter()
                    .chain(row.into_iter().zip(&view.columns).map(|(v, c)| {
                        let text = postgres && c.sql_type == "ANY";
                        match v {
                            SqlValue::Null => "NULL".to_owned(),
                            SqlValue::Integer(i) if text => format!("t{i}"),
                            SqlValue::Real(f) if text => format!("t{f}"),
                            SqlValue::Integer(i) => format!("i{i}"),
                            SqlValue::Real(f) => format!("r{f}"),
                            SqlValue::Text(t) => format!("t{t}"),
                        }
                    }))
                    .collect();
                expected.push(format!("{} {}", view.name, cells.join("|")));
            }
        }
    }
    actual.sort();
    expected.sort();
    (actual, expected)
}

/// A run of job `p` of `account`, as a pull makes one: its lease and `sync_runs` row.
async fn begin(store: &Store, account: &str) -> (ehrsync::store::Lease, i64) {
    let holder = Holder::this_process();
    let lease = store
        .acquire(
            &LeaseKey::job(account, "p"),
            &holder,
            1,
            Duration::from_secs(60),
        )
        .await
        .unwrap()
        .unwrap();
    let run = store
        .begin_run(&lease, account, "p", false, 1)
        .await
        .unwrap();
    (lease, run.run_id)
}

/// Ends a run [`begin`] started, at Unix second `at`.
async fn end(store: &Store, account: &str, lease: ehrsync::store::Lease, run_id: i64, at: i64) {
    store
        .finish_run(&lease, run_id, account, "p", "success", at, None, None)
        .await
        .unwrap();
    store.release(&lease).await.unwrap();
}

/// One run's page of `records` for account `account`, written as a pull writes it.
async fn write_page(store: &Store, views: &ViewSet, account: &str, records: &[Value]) {
    let (lease, run_id) = begin(store, account).await;
    let rows = records
        .iter()
        .map(|r| {
            let data = r.to_string();
            let mut row = PageRow::new(
                r["id"].as_str().unwrap().to_owned(),
                r["meta"]["versionId"].as_str().map(str::to_owned),
                None,
                data.clone(),
            );
            row.derived = views.derive("Patient", &data);
            row
        })
        .collect();
    store
        .commit_page(&lease, run_id, account, "Patient", rows, 1, views)
        .await
        .unwrap();
    end(store, account, lease, run_id, 2).await;
}

/// A completed sweep of `account` that saw only `kept`.
async fn sweep(store: &Store, views: &ViewSet, account: &str, kept: Vec<String>) -> Reconciled {
    let (lease, run_id) = begin(store, account).await;
    store
        .mark_seen(&lease, run_id, account, "Patient", kept)
        .await
        .unwrap();
    let done = store
        .reconcile(&lease, run_id, account, "Patient", None, 3, views)
        .await
        .unwrap();
    end(store, account, lease, run_id, 3).await;
    done
}

#[tokio::test]
async fn view_tables_equal_a_fresh_evaluation_after_random_changes() {
    let views = views();
    for seed in 1..=12u64 {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(common::fresh_database(dir.path()))
            .await
            .unwrap();
        store.prepare_views(&views, 1).await.unwrap();
        let mut rng = fastrand::Rng::with_seed(seed);
        // Each account's live patients: id → version.
        let mut live: Vec<Vec<(String, u32)>> = vec![Vec::new(), Vec::new()];
        let mut next_id = 0u32;
        for step in 0..25 {
            let a = rng.usize(..2);
            let account = ["north", "south"][a];
            match rng.u8(..10) {
                // A sweep that no longer sees a random fifth of the account's patients.
                0 | 1 if !live[a].is_empty() => {
                    live[a].retain(|_| rng.u8(..5) > 0);
                    let kept = live[a].iter().map(|(id, _)| id.clone()).collect();
                    sweep(&store, &views, account, kept).await;
                }
                _ => {
                    let mut page = Vec::new();
                    for _ in 0..rng.usize(1..40) {
                        let existing = !live[a].is_empty() && rng.bool();
                        if existing {
                            let k = rng.usize(..live[a].len());
                            // Half of the re-reads are unchanged; the rest are updates.
                            if rng.bool() {
                                live[a][k].1 += 1;
                            }
                            let (id, v) = live[a][k].clone();
                            let mut seeded = fastrand::Rng::with_seed(
                                seed * 1_000_003 + u64::from(v) * 7919 + id.len() as u64,
                            );
                            page.push(patient(&mut seeded, &id, v));
                        } else {
                            next_id += 1;
                            let id = format!("p{next_id}");
                            let mut seeded = fastrand::Rng::with_seed(
                                seed * 1_000_003 + 7919 + id.len() as u64 + u64::from(next_id),
                            );
                            page.push(patient(&mut seeded, &id, 1));
                            live[a].push((id, 1));
                        }
                    }
                    write_page(&store, &views, account, &page).await;
                }
            }
            let (actual, expected) = actual_and_expected(&store, &views).await;
            assert_eq!(actual, expected, "seed {seed}, step {step}");
        }
        let (actual, _) = actual_and_expected(&store, &views).await;
        assert!(!actual.is_empty(), "seed {seed} built no rows");
        store.close().await;
    }
}

/// `ehrsync sync` killed with SIGKILL at random moments of a pull with three views: after
/// every kill, and after the run that completes, the tables equal a fresh evaluation.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread")]
async fn view_tables_survive_a_process_killed_mid_page() {
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let sandbox = ehrsync::sandbox::Sandbox::start(
        Arc::new(ehrsync::clock::SystemClock),
        ehrsync::sandbox::Lifetimes::documented(),
        0,
    )
    .await
    .unwrap();
    sandbox.set_patients(20_000);
    let views_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/views");
    std::fs::write(dir.path().join("names.json"), NAMES_VIEW).unwrap();
    let config = format!(
        "[agent]\n{}\
         [[views]]\nfile = '{}'\n[[views]]\nfile = '{}'\n[[views]]\nfile = 'names.json'\n{}\
         [[accounts.nx.jobs]]\nname = 'patients'\nkind = 'fhir'\nschedule = '0 0 3 * * *'\npage_size = 500\n",
        common::database_lines("db/e.db"),
        views_dir.join("patient_demographics.json").display(),
        views_dir.join("patient_contacts.json").display(),
        sandbox.account_config(ehrsync::vendor::Vendor::Nextech, "nx"),
    );
    let path = common::write_config(dir.path(), &config);
    let env = ehrsync::sandbox::credentials_env();
    let config_env: ehrsync::config::Env = env.iter().copied().collect();
    let views = ehrsync::config::load_with_env(&path, &config_env)
        .unwrap()
        .config
        .views;
    let mut rng = fastrand::Rng::with_seed(7);
    let mut kills = 0;
    for round in 0..6 {
        let mut child = std::process::Command::new(common::binary())
            .env_clear()
            .envs(env.iter().copied())
            .args(["sync", "nx", "patients", "--config", path.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200 + rng.u64(..1200))).await;
        if child.try_wait().unwrap().is_none() {
            kills += 1;
            child.kill().unwrap();
        }
        child.wait().unwrap();
        // Changes between rounds, so the next run updates rows as well as adding them.
        sandbox.change_patients((0..50).map(|i| i * 13 + round));
        let store = Store::open(common::database_of(&path)).await.unwrap();
        let (actual, expected) = actual_and_expected(&store, &views).await;
        assert_eq!(actual.len(), expected.len(), "round {round}");
        assert!(
            actual == expected,
            "round {round}: the view tables differ from a fresh evaluation"
        );
        store.close().await;
    }
    assert!(
        kills >= 3,
        "only {kills} runs were killed before they finished"
    );
    let done = common::ehrsync(
        &["sync", "nx", "patients", "--config", path.to_str().unwrap()],
        &env,
    );
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    let store = Store::open(common::database_of(&path)).await.unwrap();
    let (actual, expected) = actual_and_expected(&store, &views).await;
    assert!(actual == expected);
    let demographics = common::scalar(&store, "SELECT count(*) FROM view_patient_demographics")
        .await
        .unwrap();
    assert_eq!(demographics, 20_000);
}
