//! The pulled data as a true mirror, against the sandbox over real HTTP under paused time:
//! deletions found by sweeps (and only by completed ones, within `reconcile_max_delete`), the
//! change log written with the pages, and records that come back.

mod common;

use common::pull::{ACCOUNT, Harness, fhir_job, start, start_edited};
use ehrsync::sandbox::{ApiFault, ElementsSupport, Fault};
use ehrsync::store::{ChangeFilter, ChangeRow};
use ehrsync::sync::{Outcome, RunOptions};
use ehrsync::vendor::Vendor;

const RECONCILE: RunOptions = RunOptions {
    full: false,
    reconcile: true,
    force: false,
};

async fn changes_after(h: &Harness, seq: i64) -> Vec<ChangeRow> {
    h.shared
        .store
        .read_changes(&ChangeFilter::default(), seq, 1_000_000)
        .await
        .unwrap()
}

fn count(rows: &[ChangeRow], kind: &str) -> usize {
    rows.iter().filter(|r| r.kind == kind).count()
}

async fn last_seq(h: &Harness) -> i64 {
    h.scalar("SELECT coalesce(max(seq), 0) FROM changes").await
}

async fn live(h: &Harness) -> i64 {
    h.scalar("SELECT count(*) FROM resources WHERE deleted_at IS NULL")
        .await
}

async fn deleted(h: &Harness) -> i64 {
    h.scalar("SELECT count(*) FROM resources WHERE deleted_at IS NOT NULL")
        .await
}

async fn patients(h: &Harness) -> i64 {
    h.scalar("SELECT count(*) FROM patients").await
}

/// A FHIR Patient job over 5,000 patients, pulled in full once.
async fn five_thousand() -> Harness {
    let h = start(Vendor::Nextech, &fhir_job(1000), 5000).await;
    let first = h.run(false).await;
    assert_eq!(first.outcome, Outcome::Success, "{first}");
    assert_eq!(first.changes.created, 5000);
    assert_eq!(live(&h).await, 5000);
    h
}

#[tokio::test(start_paused = true)]
async fn deletions_changes_and_additions_are_mirrored_and_logged_exactly() {
    let h = five_thousand().await;
    let after_full = last_seq(&h).await;
    assert_eq!(count(&changes_after(&h, 0).await, "created"), 5000);

    // An unchanged re-read logs nothing (the full run reconciles too, and deletes nothing).
    let again = h.run(true).await;
    assert_eq!(again.outcome, Outcome::Success, "{again}");
    assert_eq!(
        (
            again.changes.created,
            again.changes.updated,
            again.changes.deleted
        ),
        (0, 0, 0)
    );
    assert!(again.to_string().contains("no changes"), "{again}");
    assert_eq!(last_seq(&h).await, after_full);

    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    let gone = h.sandbox.delete_patients((0..13).map(|i| 100 + i * 37));
    let changed = h.sandbox.change_patients((0..7).map(|i| 2000 + i * 11));
    let added = h.sandbox.add_patients(5);
    assert_eq!((gone.len(), changed.len(), added.len()), (13, 7, 5));

    let run = h.run_with(RECONCILE).await;
    assert_eq!(run.outcome, Outcome::Success, "{run}");
    assert!(run.reconciled, "{run}");
    assert_eq!(
        (
            run.changes.created,
            run.changes.updated,
            run.changes.deleted
        ),
        (5, 7, 13),
        "{run}"
    );
    assert_eq!(live(&h).await, 4992);
    assert_eq!(deleted(&h).await, 13);
    assert_eq!(patients(&h).await, 4992);
    let log = changes_after(&h, after_full).await;
    assert_eq!(
        (
            count(&log, "created"),
            count(&log, "updated"),
            count(&log, "deleted")
        ),
        (5, 7, 13)
    );
    let mut logged: Vec<&str> = log
        .iter()
        .filter(|r| r.kind == "deleted")
        .map(|r| r.id.as_str())
        .collect();
    logged.sort_unstable();
    assert_eq!(logged, gone.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        log.iter()
            .filter(|r| r.kind == "updated")
            .all(|r| changed.contains(&r.id) && r.version_id.as_deref() == Some("2"))
    );
    // The deleted records' rows are gone from the patients table too.
    for id in &gone {
        let n = h
            .row("SELECT count(*) AS n FROM patients WHERE id = ?", id)
            .await;
        assert_eq!(n.int("n"), 0);
    }
    let m = &h.shared.metrics;
    assert_eq!(m.sync_changes(ACCOUNT, "patients", "created"), 5005);
    assert_eq!(m.sync_changes(ACCOUNT, "patients", "updated"), 7);
    assert_eq!(m.sync_changes(ACCOUNT, "patients", "deleted"), 13);

    // A deleted record that comes back is live again, logged as created.
    let seq = last_seq(&h).await;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let back = h.sandbox.restore_patients([100]);
    let run = h.run(false).await;
    assert_eq!(run.outcome, Outcome::Success, "{run}");
    assert_eq!(live(&h).await, 4993);
    let log = changes_after(&h, seq).await;
    assert_eq!(log.len(), 1);
    assert_eq!(
        (log[0].id.as_str(), log[0].kind.as_str()),
        (back[0].as_str(), "created")
    );
}

#[tokio::test(start_paused = true)]
async fn a_sweep_cut_off_halfway_deletes_nothing() {
    let h = five_thousand().await;
    h.sandbox.delete_patients(0..10);
    // The incremental page (nothing changed), two sweep pages, then a page that is not JSON.
    h.sandbox
        .inject_api_after(Vendor::Nextech, 3, ApiFault::Http(Fault::MalformedJson), 1);
    let run = h.run_with(RECONCILE).await;
    assert_eq!(run.outcome, Outcome::Failed, "{run}");
    assert!(!run.reconciled);
    assert_eq!(run.changes.deleted, 0);
    assert_eq!((live(&h).await, deleted(&h).await), (5000, 0));
    assert_eq!(count(&changes_after(&h, 0).await, "deleted"), 0);
    // The next sweep completes and applies it.
    let run = h.run_with(RECONCILE).await;
    assert_eq!(run.outcome, Outcome::Success, "{run}");
    assert_eq!((live(&h).await, deleted(&h).await), (4990, 10));
}

#[tokio::test(start_paused = true)]
async fn a_sweep_missing_forty_percent_refuses_until_forced() {
    let h = five_thousand().await;
    // A permission change at the vendor: 2,000 of 5,000 patients vanish from the search.
    h.sandbox.delete_patients(1000..3000);
    let run = h.run_with(RECONCILE).await;
    assert_eq!(run.outcome, Outcome::Failed, "{run}");
    let error = run.error.clone().unwrap_or_default();
    assert!(
        error.contains("2000 of the 5000 stored Patient records (40.0 %)")
            && error.contains("reconcile_max_delete (10.0 %)")
            && error.contains("--reconcile --force"),
        "{error}"
    );
    assert_eq!((live(&h).await, deleted(&h).await), (5000, 0));
    assert_eq!(count(&changes_after(&h, 0).await, "deleted"), 0);
    let runs = h.shared.store.runs(ACCOUNT, "patients").await.unwrap();
    assert_eq!(runs.last().unwrap().outcome, "failed");

    let forced = h
        .run_with(RunOptions {
            force: true,
            ..RECONCILE
        })
        .await;
    assert_eq!(forced.outcome, Outcome::Success, "{forced}");
    assert_eq!(forced.changes.deleted, 2000);
    assert_eq!((live(&h).await, deleted(&h).await), (3000, 2000));
    assert_eq!(patients(&h).await, 3000);
}

#[tokio::test(start_paused = true)]
async fn a_server_that_ignores_or_refuses_elements_is_swept_whole() {
    for support in [ElementsSupport::Ignore, ElementsSupport::Reject] {
        let h = five_thousand().await;
        h.sandbox.set_elements_support(support);
        h.sandbox.delete_patients([7, 8, 9]);
        let run = h.run_with(RECONCILE).await;
        assert_eq!(run.outcome, Outcome::Success, "{support:?}: {run}");
        assert_eq!(run.changes.deleted, 3, "{support:?}");
        // Whole records in the sweep are only read for their ids: nothing is rewritten.
        assert_eq!(run.changes.updated, 0, "{support:?}");
        assert_eq!(live(&h).await, 4997);
    }
}

#[tokio::test(start_paused = true)]
async fn every_completed_whole_list_run_reconciles() {
    let job = "kind = 'nikohealth_patients'\nschedule = '0 0 * * * *'\npage_size = 100";
    let h = start(Vendor::NikoHealth, job, 500).await;
    let first = h.run(false).await;
    assert_eq!(first.outcome, Outcome::Success, "{first}");
    assert_eq!(first.changes.created, 500);
    h.sandbox.delete_patients([0, 250, 499]);
    let run = h.run(false).await;
    assert_eq!(run.outcome, Outcome::Success, "{run}");
    assert!(run.reconciled);
    assert_eq!(
        (
            run.changes.created,
            run.changes.updated,
            run.changes.deleted
        ),
        (0, 0, 3),
        "{run}"
    );
    assert_eq!((live(&h).await, patients(&h).await), (497, 497));
}

#[tokio::test(start_paused = true)]
async fn reconcile_max_delete_is_configurable() {
    let job = format!("{}\nreconcile_max_delete = '50%'", fhir_job(1000));
    let h = start_edited(Vendor::Nextech, &job, 1000, |c| c).await;
    assert_eq!(h.run(false).await.outcome, Outcome::Success);
    h.sandbox.delete_patients(0..400);
    let run = h.run_with(RECONCILE).await;
    assert_eq!(run.outcome, Outcome::Success, "{run}");
    assert_eq!(run.changes.deleted, 400);
}
