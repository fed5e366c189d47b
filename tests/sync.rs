//! Pull runs against the vendor sandbox's data APIs over real HTTP on loopback, under tokio's
//! paused clock: full and incremental FHIR pulls, NikoHealth's list, runs dropped halfway and
//! repeated, 401/429/5xx/malformed pages, records too deep for SQLite (planted with
//! `Sandbox::plant_patient`: the page fails naming the record, nothing of it is stored, and the
//! database keeps answering), and a schedule whose runs outlast its interval.

mod common;

use common::pull::{ACCOUNT, Harness, fhir_job, start, start_edited};

use std::time::Duration;

use ehrsync::sandbox::{self, ApiFault, Fault, fhir_id};
use ehrsync::sync::{Mode, Outcome, RunOptions};
use ehrsync::vendor::Vendor;
use tokio::sync::watch;

/// The newest `lastUpdated` among generated patients `0..n` (none changed), as stored.
fn newest_generated(h: &Harness, n: u64) -> String {
    let json: serde_json::Value = serde_json::from_str(&h.sandbox.patient_json(n - 1)).unwrap();
    json["meta"]["lastUpdated"].as_str().unwrap().to_owned()
}

#[tokio::test(start_paused = true)]
async fn a_full_pull_then_an_incremental_one_fetches_only_the_changes() {
    let h = start(Vendor::Nextech, &fhir_job(500), 20_000).await;
    let first = h.run(false).await;
    assert_eq!(first.outcome, Outcome::Success, "{first}");
    assert_eq!(first.mode, Mode::Full);
    assert_eq!((first.pages, first.records), (40, 20_000));
    assert_eq!(h.rows().await, 20_000);
    assert_eq!(
        h.scalar(
            "SELECT count(*) FROM patients WHERE family IS NOT NULL AND birth_date IS NOT NULL"
        )
        .await,
        20_000,
        "every row is visible in the patients view"
    );
    assert_eq!(h.watermark().await, Some(newest_generated(&h, 20_000)));
    if common::on_postgres() {
        // A page's lookup of its records probes the primary key with each id, even for an
        // account the planner's statistics do not know (a new account's first pull), where
        // `id IN (…)` was planned as a probe by account and type only, filtering `id` over
        // every row the account had.
        use ehrsync::store::backend::{Backend, postgres};
        let database = h.shared.store.database().clone();
        common::db_rows(&database, "ANALYZE resources", &[])
            .await
            .unwrap();
        let Backend::Postgres(pool) = h.shared.store.db() else {
            panic!("a PostgreSQL store");
        };
        let ids: Vec<String> = (0..500).map(sandbox::fhir_id).collect();
        let plan: Vec<String> = postgres::query_scalar(sqlx::AssertSqlSafe(format!(
            "EXPLAIN {}",
            ehrsync::store::STORED_ON_POSTGRES
        )))
        .bind(&ids)
        .bind("a-new-account")
        .bind("Patient")
        .fetch_all(pool)
        .await
        .unwrap();
        let plan = plan.join("\n");
        assert!(
            plan.contains("id = k.id") && !plan.contains("Filter"),
            "{plan}"
        );
    }

    tokio::time::sleep(Duration::from_secs(60)).await;
    let changed = h.sandbox.change_patients((0..37).map(|k| k * 531));
    assert_eq!(changed.len(), 37);
    let second = h.run(false).await;
    assert_eq!(second.outcome, Outcome::Success, "{second}");
    assert!(matches!(second.mode, Mode::Incremental { .. }), "{second}");
    assert_eq!(second.records, 37, "only the changed patients: {second}");
    assert_eq!(h.rows().await, 20_000);
    for (k, id) in changed.iter().enumerate() {
        let row = h
            .row("SELECT version_id, data FROM resources WHERE id = ?", id)
            .await;
        assert_eq!(row.text("version_id"), "2", "{id}");
        assert_eq!(
            row.text("data"),
            h.sandbox.patient_json(k as u64 * 531),
            "{id} holds the new data byte for byte"
        );
    }
    let newest: serde_json::Value =
        serde_json::from_str(&h.sandbox.patient_json(36 * 531)).unwrap();
    assert_eq!(
        h.watermark().await.as_deref(),
        newest["meta"]["lastUpdated"].as_str()
    );

    let third = h.run(false).await;
    assert_eq!(
        (third.outcome, third.records),
        (Outcome::Success, 0),
        "{third}"
    );
    assert_eq!(
        h.watermark().await.as_deref(),
        newest["meta"]["lastUpdated"].as_str(),
        "a run that finds nothing keeps the watermark"
    );
    let full = h.run(true).await;
    assert_eq!((&full.mode, full.records), (&Mode::Full, 20_000), "{full}");
    assert_eq!(h.rows().await, 20_000);
    assert_eq!(h.sandbox.max_concurrent_api_requests(Vendor::Nextech), 1);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_default_overlap_refetches_a_margin_but_stores_each_record_once() {
    let h = start(
        Vendor::CareCentric,
        "kind = 'fhir'\nschedule = '0 0 * * * *'\npage_size = 100",
        1_000,
    )
    .await;
    assert_eq!(h.run(false).await.records, 1_000);
    h.sandbox.change_patients([3, 4]);
    let second = h.run(false).await;
    // Generated patients are a second apart: the 5-minute overlap re-reads the newest 300.
    assert_eq!(second.records, 302, "{second}");
    assert_eq!(h.rows().await, 1_000);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_run_dropped_halfway_is_completed_by_the_next_run() {
    let h = start(Vendor::Nextech, &fhir_job(100), 5_000).await;
    assert_eq!(h.run(false).await.records, 5_000);
    let before = h.watermark().await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    let changed = h.sandbox.change_patients(0..300);
    // The third page hangs; the run is dropped while it waits, after two committed pages.
    h.sandbox.inject_api_after(
        Vendor::Nextech,
        2,
        ApiFault::Http(Fault::Slow(Duration::from_secs(3600))),
        1,
    );
    let run = h.spawn_run_until_pages(2).await;
    run.abort();
    assert!(run.await.unwrap_err().is_cancelled());
    let runs = h.shared.store.runs(ACCOUNT, "patients").await.unwrap();
    assert_eq!(runs.last().unwrap().outcome, "running");
    assert_eq!(
        h.watermark().await,
        before,
        "an unfinished run leaves the watermark"
    );

    let again = h.run(false).await;
    assert_eq!(again.outcome, Outcome::Success, "{again}");
    assert_eq!(
        again.records, 300,
        "the whole change set again, from the old watermark"
    );
    let runs = h.shared.store.runs(ACCOUNT, "patients").await.unwrap();
    let outcomes: Vec<&str> = runs.iter().map(|r| r.outcome.as_str()).collect();
    assert_eq!(outcomes, ["success", "interrupted", "success"]);
    assert_eq!(h.rows().await, 5_000);
    assert_eq!(
        h.scalar("SELECT count(DISTINCT id) FROM resources").await,
        5_000,
        "every patient exactly once"
    );
    assert_eq!(
        h.scalar("SELECT count(*) FROM resources WHERE version_id = '2'")
            .await,
        300
    );
    let newest: serde_json::Value = serde_json::from_str(&h.sandbox.patient_json(299)).unwrap();
    assert_eq!(
        h.watermark().await.as_deref(),
        newest["meta"]["lastUpdated"].as_str()
    );
    assert_eq!(changed.len(), 300);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_token_revoked_mid_run_costs_one_refresh_and_one_retry() {
    let h = start(Vendor::Nextech, &fhir_job(100), 1_000).await;
    h.sandbox
        .inject_api_after(Vendor::Nextech, 3, ApiFault::RevokeAccessTokens, 1);
    let run = h.run(false).await;
    assert_eq!(
        (run.outcome, run.records),
        (Outcome::Success, 1_000),
        "{run}"
    );
    assert_eq!(h.api("401"), 1);
    assert_eq!(h.api("2xx"), 10);
    assert_eq!(h.sandbox.requests(Vendor::Nextech, "refresh_token"), 1);
    assert_eq!(h.sandbox.requests(Vendor::Nextech, "password"), 1);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn rate_limits_wait_for_retry_after() {
    let h = start(Vendor::Nextech, &fhir_job(100), 300).await;
    h.sandbox.inject_api_after(
        Vendor::Nextech,
        1,
        ApiFault::Http(Fault::RateLimited {
            retry_after_secs: 45,
        }),
        2,
    );
    let started = tokio::time::Instant::now();
    let run = h.run(false).await;
    assert_eq!((run.outcome, run.records), (Outcome::Success, 300), "{run}");
    assert_eq!(h.api("429"), 2);
    assert!(
        started.elapsed() >= Duration::from_secs(90),
        "waited 2 × Retry-After: {:?}",
        started.elapsed()
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_503s_retry_after_is_waited_for() {
    let h = start(Vendor::Nextech, &fhir_job(100), 300).await;
    h.sandbox.inject_api_after(
        Vendor::Nextech,
        1,
        ApiFault::Http(Fault::Unavailable {
            retry_after_secs: 40,
        }),
        2,
    );
    let started = tokio::time::Instant::now();
    let run = h.run(false).await;
    assert_eq!((run.outcome, run.records), (Outcome::Success, 300), "{run}");
    assert_eq!(h.api("5xx"), 2);
    assert!(
        started.elapsed() >= Duration::from_secs(80),
        "waited 2 × Retry-After, not the 1-2 s backoff: {:?}",
        started.elapsed()
    );
    h.stop().await;

    // Longer than the sync waits: the run fails now and the next run continues.
    let h = start(Vendor::Nextech, &fhir_job(100), 300).await;
    h.sandbox.inject_api_after(
        Vendor::Nextech,
        1,
        ApiFault::Http(Fault::Unavailable {
            retry_after_secs: 3600,
        }),
        1,
    );
    let started = tokio::time::Instant::now();
    let run = h.run(false).await;
    assert_eq!(run.outcome, Outcome::Failed, "{run}");
    let error = run.error.clone().unwrap();
    assert!(error.contains("HTTP 503: unavailable for 3600s"), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn server_errors_are_retried_a_few_times_then_the_run_fails_keeping_its_pages() {
    let h = start(Vendor::Nextech, &fhir_job(100), 500).await;
    h.sandbox
        .inject_api_after(Vendor::Nextech, 1, ApiFault::Http(Fault::ServerError), 2);
    let run = h.run(false).await;
    assert_eq!((run.outcome, run.records), (Outcome::Success, 500), "{run}");
    assert_eq!(h.api("5xx"), 2);

    let h = start(Vendor::Nextech, &fhir_job(100), 500).await;
    h.sandbox
        .inject_api_after(Vendor::Nextech, 2, ApiFault::Http(Fault::ServerError), 100);
    let run = h.run(false).await;
    assert_eq!(run.outcome, Outcome::Failed);
    let error = run.error.clone().unwrap();
    assert!(
        error.starts_with("page 3 (GET http://127.0.0.1:"),
        "{error}"
    );
    assert!(
        error.contains("no answer after 5 attempts: HTTP 503"),
        "{error}"
    );
    assert_eq!((run.pages, run.records), (2, 200));
    assert_eq!(h.rows().await, 200, "the committed pages stay");
    assert_eq!(h.watermark().await, None);
    let row = h
        .shared
        .store
        .runs(ACCOUNT, "patients")
        .await
        .unwrap()
        .remove(0);
    assert_eq!(
        (row.outcome.as_str(), row.pages, row.records),
        ("failed", 2, 200)
    );
    assert_eq!(row.error.as_deref(), Some(error.as_str()));
    assert_eq!(h.shared.metrics.sync_runs(ACCOUNT, "patients", "failed"), 1);
    h.sandbox.clear_api_faults(Vendor::Nextech);
    assert_eq!(h.run(false).await.records, 500, "the next run recovers");
    assert_eq!(h.rows().await, 500);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn bad_pages_fail_the_run_with_the_page_and_the_reason() {
    let cases = [
        (ApiFault::Http(Fault::MalformedJson), "not valid JSON"),
        (
            ApiFault::MissingEntries,
            "no `entry` where records were expected",
        ),
        (
            ApiFault::ForeignNextLink,
            "refusing to send the token there",
        ),
    ];
    for (fault, expected) in cases {
        let h = start(Vendor::Nextech, &fhir_job(100), 1_000).await;
        h.sandbox.inject_api_after(Vendor::Nextech, 2, fault, 1);
        let run = h.run(false).await;
        assert_eq!(run.outcome, Outcome::Failed, "{expected}");
        let error = run.error.unwrap();
        assert!(error.starts_with("page 3 (GET "), "{error}");
        assert!(error.contains(expected), "{error}");
        // ForeignNextLink spoils page 3's link, so page 3 itself is still stored.
        assert!([200, 300].contains(&h.rows().await), "{error}");
        assert_eq!(h.watermark().await, None);
        let rerun = h.run(false).await;
        assert_eq!((rerun.outcome, h.rows().await), (Outcome::Success, 1_000));
        h.stop().await;
    }
}

#[tokio::test(start_paused = true)]
async fn api_errors_report_the_operation_outcome() {
    // The Nextech route refuses a practice the client may not access (HTTP 403).
    let h = start_edited(Vendor::Nextech, &fhir_job(10), 10, |config| {
        config.replace("practice_id = '1001'", "practice_id = '999'")
    })
    .await;
    let run = h.run(false).await;
    assert_eq!(run.outcome, Outcome::Failed);
    let error = run.error.unwrap();
    assert!(
        error.contains("HTTP 403: OperationOutcome: error forbidden: The nx-practice-id header"),
        "{error}"
    );
    assert_eq!(h.api("4xx"), 1);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn nikohealth_patient_lists_are_paged_until_a_short_page() {
    let h = start(
        Vendor::NikoHealth,
        "kind = 'nikohealth_patients'\nschedule = '0 0 * * * *'\npage_size = 100",
        1_234,
    )
    .await;
    let run = h.run(false).await;
    assert_eq!(run.outcome, Outcome::Success, "{run}");
    assert_eq!(run.mode, Mode::Whole);
    assert_eq!((run.pages, run.records), (13, 1_234));
    let row = h
        .row(
            "SELECT family, given, birth_date, gender, last_updated FROM patients \
             WHERE account = ? AND id = '43'",
            ACCOUNT,
        )
        .await;
    let niko: serde_json::Value = serde_json::from_str(&sandbox::niko_patient(42, 0, 1)).unwrap();
    assert_eq!(row.text("family"), niko["lastName"]);
    assert_eq!(
        row.text("given"),
        format!(
            "{} {}",
            niko["firstName"].as_str().unwrap(),
            niko["middleName"].as_str().unwrap()
        )
    );
    assert_eq!(
        row.text("birth_date"),
        niko["dateOfBirth"].as_str().unwrap()[..10]
    );
    assert!(["male", "female"].contains(&row.text("gender").as_str()));
    assert!(row.0.get("last_updated").cloned().flatten().is_some());
    // The list has no change filter: every run reads it whole, leaving each record once.
    assert_eq!(h.run(false).await.records, 1_234);
    assert_eq!(h.rows().await, 1_234);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_job_whose_runs_outlast_its_interval_skips_instead_of_overlapping() {
    let h = start(
        Vendor::CareCentric,
        "kind = 'fhir'\nschedule = '* * * * * *'\npage_size = 100",
        50,
    )
    .await;
    // Every page takes 3 s: a run lasts three occurrences of its every-second schedule.
    h.sandbox.inject_api(
        Vendor::CareCentric,
        std::iter::repeat_n(ApiFault::Http(Fault::Slow(Duration::from_secs(3))), 1_000),
    );
    h.schedule_for(Duration::from_secs(30)).await;

    let runs = h.shared.store.runs(ACCOUNT, "patients").await.unwrap();
    let skipped = h.shared.metrics.sync_runs(ACCOUNT, "patients", "skipped");
    assert!(
        (7..=11).contains(&runs.len()),
        "{} runs of ~3 s in 30 s",
        runs.len()
    );
    assert!(skipped >= 15, "{skipped} skipped occurrences");
    assert_eq!(
        h.sandbox.max_concurrent_api_requests(Vendor::CareCentric),
        1
    );
    for pair in runs.windows(2) {
        assert!(
            pair[1].started_at >= pair[0].finished_at.unwrap(),
            "runs never overlap: {pair:?}"
        );
    }
    // The run in progress at the stop is interrupted; every earlier one completed.
    let (last, earlier) = runs.split_last().unwrap();
    assert!(
        earlier
            .iter()
            .all(|r| r.outcome == "success" && r.records == 50)
    );
    assert!(["success", "interrupted"].contains(&last.outcome.as_str()));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_run_finds_the_job_leased_by_another_process_and_skips() {
    let h = start(Vendor::Nextech, &fhir_job(100), 100).await;
    let now = h.shared.clock.now().unix_seconds();
    let other = ehrsync::store::Holder::elsewhere("other-process");
    let key = ehrsync::store::LeaseKey::job(ACCOUNT, "patients");
    assert!(
        h.shared
            .store
            .acquire(&key, &other, now, Duration::from_secs(120))
            .await
            .unwrap()
            .is_some()
    );
    let run = h.run(false).await;
    assert_eq!(run.outcome, Outcome::Skipped, "{run}");
    assert_eq!(
        h.shared.metrics.sync_runs(ACCOUNT, "patients", "skipped"),
        1
    );
    assert!(
        h.shared
            .store
            .runs(ACCOUNT, "patients")
            .await
            .unwrap()
            .is_empty()
    );
    // A holder on another host that crashed: its lease expires.
    tokio::time::sleep(Duration::from_secs(121)).await;
    assert_eq!(h.run(false).await.outcome, Outcome::Success);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn every_page_request_carries_the_token_and_the_practice_header() {
    // The sandbox refuses a request without a valid bearer token (401) or, on the Nextech route,
    // without the account's nx-practice-id (403): a successful pull proves both were sent.
    let h = start(Vendor::Nextech, &fhir_job(10), 95).await;
    let run = h.run(false).await;
    assert_eq!((run.pages, run.records), (10, 95));
    assert_eq!(h.api("2xx"), 10);
    assert_eq!(h.api("401") + h.api("4xx"), 0);
    assert_eq!(fhir_id(94), "pat-0000094");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_job_runs_at_start_when_it_never_ran_or_missed_a_run_while_down() {
    let h = start(
        Vendor::Nextech,
        "kind = 'fhir'\nschedule = '0 0 3 * * *'\npage_size = 100",
        100,
    )
    .await;
    h.schedule_for(Duration::from_secs(10)).await;
    assert_eq!(h.run_count().await, 1, "never ran: runs at start");
    h.schedule_for(Duration::from_secs(10)).await;
    assert_eq!(
        h.run_count().await,
        1,
        "ran moments ago: a restart waits for 03:00"
    );
    // Down for a day: 03:00 passed unseen, so the next start runs it once.
    tokio::time::sleep(Duration::from_secs(86_400)).await;
    h.schedule_for(Duration::from_secs(10)).await;
    assert_eq!(
        h.run_count().await,
        2,
        "missed while down: runs once at start"
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_page_that_times_out_is_retried() {
    let h = start(Vendor::Nextech, &fhir_job(100), 300).await;
    // Longer than the 60 s request deadline, once.
    h.sandbox.inject_api_after(
        Vendor::Nextech,
        1,
        ApiFault::Http(Fault::Slow(Duration::from_secs(600))),
        1,
    );
    let run = h.run(false).await;
    assert_eq!((run.outcome, run.records), (Outcome::Success, 300), "{run}");
    assert_eq!(h.api("error"), 1, "the timed-out attempt");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_locked_database_fails_the_run_cleanly_and_the_next_run_recovers() {
    // SQLite busy (another process holding the write lock past the busy timeout).
    if common::sqlite_only() {
        return;
    }
    let h = start(Vendor::Nextech, &fhir_job(100), 500).await;
    // Page 2 takes 10 simulated seconds (less than the 30 s lease renewal, so the page's
    // commit is the first write to meet the lock); meanwhile another process takes SQLite's
    // write lock.
    h.sandbox.inject_api_after(
        Vendor::Nextech,
        1,
        ApiFault::Http(Fault::Slow(Duration::from_secs(10))),
        1,
    );
    let run = h.spawn_run_until_pages(1).await;
    let path = h.shared.store.database().file().unwrap().to_owned();
    // Held for 1.5 × SQLite's 5 s busy timeout: the page's commit gives up, and the
    // run's outcome is recorded once the lock is gone.
    let holder = common::lock_database(path, ehrsync::store::BUSY_TIMEOUT * 3 / 2);
    let failed = run.await.unwrap();
    holder.join().unwrap();
    assert_eq!(failed.outcome, Outcome::Failed, "{failed}");
    assert!(
        failed
            .error
            .as_deref()
            .unwrap_or("")
            .contains("database is locked"),
        "{failed}"
    );
    assert_eq!(h.rows().await, 100, "the first page stays");
    let again = h.run(false).await;
    assert_eq!(
        (again.outcome, again.records),
        (Outcome::Success, 500),
        "{again}"
    );
    assert_eq!(h.rows().await, 500);
    let outcomes: Vec<String> = h
        .shared
        .store
        .runs(ACCOUNT, "patients")
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.outcome)
        .collect();
    assert_eq!(outcomes, ["failed", "success"]);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_shutdown_mid_run_keeps_the_written_pages_and_records_interrupted() {
    let h = start(Vendor::Nextech, &fhir_job(100), 1_000).await;
    // The third page hangs for an hour; the shutdown comes while the run waits for it.
    h.sandbox.inject_api_after(
        Vendor::Nextech,
        2,
        ApiFault::Http(Fault::Slow(Duration::from_secs(3600))),
        1,
    );
    let (stop_tx, stop) = watch::channel(false);
    let runner = h.runner();
    let run = tokio::spawn(async move { runner.run_once(RunOptions::default(), &stop).await });
    tokio::time::sleep(Duration::from_secs(60)).await;
    let stopped_at = tokio::time::Instant::now();
    stop_tx.send(true).unwrap();
    let run = run.await.unwrap();
    assert!(
        stopped_at.elapsed() < Duration::from_secs(1),
        "stops without waiting for the page"
    );
    assert_eq!(
        (run.outcome, run.pages, run.records),
        (Outcome::Interrupted, 2, 200),
        "{run}"
    );
    let row = h
        .shared
        .store
        .runs(ACCOUNT, "patients")
        .await
        .unwrap()
        .remove(0);
    assert_eq!((row.outcome.as_str(), row.pages), ("interrupted", 2));
    assert_eq!(h.rows().await, 200);
    assert_eq!(h.watermark().await, None);
    assert_eq!(
        h.shared
            .metrics
            .sync_runs(ACCOUNT, "patients", "interrupted"),
        1
    );
    h.stop().await;
}

/// Nested arrays in the hostile record: far past SQLite's JSON depth limit (1000).
const DEPTH: usize = 200_000;

/// `DEPTH` nested arrays.
fn deep_array() -> String {
    format!("{}{}", "[".repeat(DEPTH), "]".repeat(DEPTH))
}

/// `record` (a JSON object) with a `contained` member that is [`deep_array`].
fn with_deep_member(record: &str) -> String {
    format!("{{\"contained\":{},{}", deep_array(), &record[1..])
}

#[tokio::test(start_paused = true)]
async fn a_fhir_record_too_deep_for_sqlite_fails_its_page_and_the_view_still_answers() {
    let h = start(Vendor::Nextech, &fhir_job(50), 250).await;
    // Patient 60 is on page 2.
    let hostile = with_deep_member(&h.sandbox.patient_json(60));
    h.sandbox.plant_patient(60, hostile);

    let failed = h.run(true).await;
    assert_eq!(failed.outcome, Outcome::Failed, "{failed}");
    let error = failed.error.clone().unwrap_or_default();
    for expected in [
        "page 2 (GET ",
        &format!("record `{}`", fhir_id(60)),
        "1000 levels deep",
        "none of this page's records were stored",
    ] {
        assert!(error.contains(expected), "`{expected}` in: {error}");
    }
    assert!(!error.contains("[["), "no record content in: {error}");
    // The run's row says the same; page 1 is kept, nothing of page 2 is stored.
    let run = h.last_run().await;
    assert_eq!(run.outcome, "failed");
    assert_eq!(run.error.as_deref(), Some(error.as_str()));
    assert_eq!((run.pages, run.records), (1, 50));
    assert_eq!(
        h.try_scalar("SELECT count(*) FROM resources WHERE id >= 'pat-0000050'")
            .await,
        Ok(0)
    );
    // Every stored row is readable by the database's JSON functions, so the view answers.
    assert_eq!(h.try_scalar("SELECT count(*) FROM patients").await, Ok(50));
    let invalid = if common::on_postgres() {
        // The cast fails the query on any row that is not JSON.
        "SELECT count(*) FROM resources WHERE jsonb_typeof(data::jsonb) IS NULL"
    } else {
        "SELECT count(*) FROM resources WHERE NOT json_valid(data)"
    };
    assert_eq!(h.try_scalar(invalid).await, Ok(0));

    // Once the vendor corrects the record, the next run stores everything.
    h.sandbox.unplant_patients();
    let fixed = h.run(true).await;
    assert_eq!(fixed.outcome, Outcome::Success, "{fixed}");
    assert_eq!((fixed.pages, fixed.records), (5, 250));
    assert_eq!(h.try_scalar("SELECT count(*) FROM patients").await, Ok(250));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_nikohealth_record_too_deep_for_sqlite_fails_its_page() {
    let h = start(
        Vendor::NikoHealth,
        "kind = 'nikohealth_patients'\nschedule = '0 0 * * * *'\npage_size = 20",
        60,
    )
    .await;
    // NikoHealth ids are the index + 1: patient 45 (id 46) is on page 3.
    let hostile = with_deep_member(&sandbox::niko_patient(45, 1_700_000_000_000, 1));
    h.sandbox.plant_patient(45, hostile);

    let failed = h.run(true).await;
    assert_eq!(failed.outcome, Outcome::Failed, "{failed}");
    let error = failed.error.clone().unwrap_or_default();
    assert!(
        error.contains("page 3 (GET ") && error.contains("record `46`"),
        "{error}"
    );
    assert!(!error.contains("[["), "no record content in: {error}");
    assert_eq!((failed.pages, failed.records), (2, 40));
    assert_eq!(h.try_scalar("SELECT count(*) FROM patients").await, Ok(40));

    h.sandbox.unplant_patients();
    let fixed = h.run(true).await;
    assert_eq!(fixed.outcome, Outcome::Success, "{fixed}");
    assert_eq!(h.try_scalar("SELECT count(*) FROM patients").await, Ok(60));
    h.stop().await;
}
