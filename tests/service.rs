//! `ehrsync run` as a service manager drives it: real signals to the real binary against the
//! vendor sandbox. SIGTERM mid-pull (within and beyond the shutdown grace), a second SIGTERM,
//! SIGHUP with good and bad configs, and systemd's notification protocol.
#![cfg(unix)]

mod common;

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::agent::Agent;
use ehrsync::clock::SystemClock;
use ehrsync::config::Database;
use ehrsync::sandbox::{self, ApiFault, Fault, Lifetimes, Sandbox};
use ehrsync::vendor::Vendor;

/// The latest run of `job`: (outcome, pages, records, error).
async fn latest_run(db: &Database, job: &str) -> Option<(String, i64, i64, Option<String>)> {
    let rows = common::db_rows(
        db,
        "SELECT outcome, pages, records, error FROM sync_runs WHERE job = ? ORDER BY id DESC LIMIT 1",
        &[job],
    )
    .await?;
    let r = rows.first()?;
    Some((
        r.text("outcome"),
        r.int("pages"),
        r.int("records"),
        r.0.get("error").cloned().flatten(),
    ))
}

/// Waits until the agent's first run of `job` has committed `pages` pages.
async fn wait_for_pages(agent: &Agent, job: &str, pages: i64) {
    let since = Instant::now();
    let db = agent.database();
    loop {
        if let Some((outcome, done, ..)) = latest_run(&db, job).await {
            assert_eq!(outcome, "running", "log:\n{}", agent.log());
            if done >= pages {
                return;
            }
        }
        assert!(
            since.elapsed() < Duration::from_secs(20),
            "{pages} pages not committed within 20 s; log:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An intact database holding exactly the records of the latest run's committed pages (a
/// page's rows and the run's counts commit together).
async fn assert_pages_intact(db: &Database) {
    if let Database::File(path) = db {
        let check = common::db_rows(db, "PRAGMA integrity_check", &[])
            .await
            .unwrap_or_else(|| panic!("cannot read {}", path.display()));
        assert_eq!(check[0].text("integrity_check"), "ok");
    }
    let pages = common::db_int(db, "SELECT pages FROM sync_runs ORDER BY id DESC LIMIT 1").await;
    let records =
        common::db_int(db, "SELECT records FROM sync_runs ORDER BY id DESC LIMIT 1").await;
    let stored = common::db_int(db, "SELECT count(*) FROM resources").await;
    assert!(pages >= 1);
    assert_eq!(
        (stored, records),
        (pages * 100, pages * 100),
        "every committed page, and only those"
    );
}

/// What a stop must leave: intact pages, the run `interrupted`, no run left `running`, no
/// lease held, the token kept.
async fn assert_consistent_after_stop(db: &Database) {
    assert_pages_intact(db).await;
    let (outcome, ..) = latest_run(db, "patients").await.unwrap();
    assert_eq!(outcome, "interrupted");
    let running = common::db_int(
        db,
        "SELECT count(*) FROM sync_runs WHERE outcome = 'running'",
    )
    .await;
    assert_eq!(running, 0);
    for (table, sql) in [
        (
            "job_leases",
            "SELECT count(*) FROM job_leases WHERE holder <> ''",
        ),
        (
            "token_leases",
            "SELECT count(*) FROM token_leases WHERE holder <> ''",
        ),
    ] {
        let held = common::db_int(db, sql).await;
        assert_eq!(held, 0, "{table} released");
    }
    let state = common::db_rows(
        db,
        "SELECT state FROM token_state WHERE account = 'nx'",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(
        state[0].text("state"),
        "valid",
        "the token is kept for the next start"
    );
}

const JOB: &str = "[[accounts.nx.jobs]]\nname = 'patients'\nkind = 'fhir'\nresource = 'Patient'\n\
                   schedule = '0 0 0 1 1 *'\npage_size = 100\n";

/// A sandbox whose Nextech API serves 3,000 patients, each page taking `page_delay`.
async fn slow_sandbox(page_delay: Duration) -> Sandbox {
    let sandbox = Sandbox::start(Arc::new(SystemClock), Lifetimes::documented(), 0)
        .await
        .unwrap();
    sandbox.set_patients(3_000);
    sandbox.inject_api(
        Vendor::Nextech,
        std::iter::repeat_n(ApiFault::Http(Fault::Slow(page_delay)), 40),
    );
    sandbox
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_pull_commits_the_page_and_exits_0_within_the_grace() {
    let sandbox = slow_sandbox(Duration::from_millis(300)).await;
    let config = format!("{}{JOB}", sandbox.account_config(Vendor::Nextech, "nx"));
    let mut agent = Agent::start(&config, "5s", &[]);
    wait_for_pages(&agent, "patients", 2).await;

    agent.signal("TERM");
    let stopping = Instant::now();
    let status = agent.wait_exit(Duration::from_secs(10));
    let took = stopping.elapsed();
    assert_eq!(status.code(), Some(0), "log:\n{}", agent.log());
    assert!(
        took < Duration::from_secs(5),
        "took {took:?}, beyond the 5 s grace"
    );
    assert_consistent_after_stop(&agent.database()).await;
    let log = agent.log();
    assert!(log.contains("stopping") && log.contains("stopped"), "{log}");
    assert!(!log.contains("it was cut off"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_page_write_that_outlasts_the_grace_is_cut_off_and_recorded_interrupted() {
    let sandbox = slow_sandbox(Duration::from_millis(200)).await;
    let config = format!("{}{JOB}", sandbox.account_config(Vendor::Nextech, "nx"));
    let mut agent = Agent::start(&config, "1s", &[]);
    wait_for_pages(&agent, "patients", 1).await;
    // Another process holds the write lock for 3 s (under SQLite's 5 s busy timeout): the next
    // page's commit waits on it past the 1 s grace.
    let holder = common::lock_store(agent.database(), Duration::from_secs(3));
    let locked = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    agent.signal("TERM");
    let status = agent.wait_exit(Duration::from_secs(10));
    let took = locked.elapsed();
    holder.join().unwrap();
    assert_eq!(status.code(), Some(0), "log:\n{}", agent.log());
    // Cut off after the grace, then recorded once the lock is gone; bounded by the lock.
    assert!(took < Duration::from_secs(6), "took {took:?}");
    let log = agent.log();
    assert!(log.contains("it was cut off"), "{log}");
    // The row's error is the cut-off's, or none when the run's own `interrupted` outcome (also
    // waiting on the lock, and not cancelled by the cut-off) lands first: both are correct.
    assert_consistent_after_stop(&agent.database()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_sigterm_exits_at_once() {
    let sandbox = slow_sandbox(Duration::from_millis(200)).await;
    let config = format!("{}{JOB}", sandbox.account_config(Vendor::Nextech, "nx"));
    let mut agent = Agent::start(&config, "20s", &[]);
    wait_for_pages(&agent, "patients", 1).await;
    // The page commit is stuck behind another process's lock, so the first SIGTERM waits.
    let holder = common::lock_store(agent.database(), Duration::from_secs(4));
    tokio::time::sleep(Duration::from_millis(500)).await;
    agent.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(agent.child.try_wait().unwrap().is_none(), "still stopping");
    agent.signal("TERM");
    let second = Instant::now();
    let status = agent.wait_exit(Duration::from_secs(3));
    assert!(second.elapsed() < Duration::from_secs(1));
    assert_eq!(status.code(), Some(128 + 15), "128 + SIGTERM");
    holder.join().unwrap();
    // Exiting mid-transaction loses nothing committed: SQLite's journal rolls back the rest.
    assert_pages_intact(&agent.database()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_cut_off_by_a_reload_never_commits_its_page_and_the_reload_keeps_to_the_grace() {
    let sandbox = slow_sandbox(Duration::from_millis(200)).await;
    let account = sandbox.account_config(Vendor::Nextech, "nx");
    let mut agent = Agent::start(&format!("{account}{JOB}"), "1s", &[]);
    wait_for_pages(&agent, "patients", 1).await;
    // Another process holds the write lock for 6 s, longer than SQLite's 5 s busy timeout:
    // the page being committed waits for it, past the reload's 1 s grace.
    let holder = common::lock_store(agent.database(), Duration::from_secs(6));
    let (_, committed, ..) = latest_run(&agent.database(), "patients").await.unwrap();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    // The job changes (page size): the reload stops it, cutting the stuck run off.
    agent.rewrite(
        &format!(
            "{account}{}",
            JOB.replace("page_size = 100", "page_size = 50")
        ),
        "1s",
    );
    agent.signal("HUP");
    let since = Instant::now();
    while !agent.log().contains("config reloaded") {
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "no reload; log:
{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The reload ended with the grace, while the database was still locked: it did not wait
    // for the cut-off run's bookkeeping.
    assert!(
        !holder.is_finished(),
        "the reload waited for the lock; log:
{}",
        agent.log()
    );
    holder.join().unwrap();
    // Let the restarted job run, then stop.
    tokio::time::sleep(Duration::from_secs(2)).await;
    agent.signal("TERM");
    assert_eq!(agent.wait_exit(Duration::from_secs(30)).code(), Some(0));
    let log = agent.log();
    assert!(log.contains("it was cut off"), "{log}");
    let db = agent.database();
    let first = common::db_rows(
        &db,
        "SELECT outcome, pages, records FROM sync_runs WHERE job = 'patients' ORDER BY id LIMIT 1",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(
        (
            first[0].text("outcome"),
            first[0].int("pages"),
            first[0].int("records")
        ),
        ("interrupted".to_owned(), committed, committed * 100),
        "the cut-off run's page never committed; log:\n{log}"
    );
    let running = common::db_int(
        &db,
        "SELECT count(*) FROM sync_runs WHERE outcome = 'running'",
    )
    .await;
    assert_eq!(running, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_killed_mid_pull_is_repeated_at_start_up_and_the_count_is_exact() {
    let sandbox = slow_sandbox(Duration::from_millis(100)).await;
    let config = format!("{}{JOB}", sandbox.account_config(Vendor::Nextech, "nx"));
    let mut agent = Agent::start(&config, "5s", &[]);
    wait_for_pages(&agent, "patients", 3).await;
    agent.signal("KILL");
    agent.wait_exit(Duration::from_secs(5));
    let (outcome, killed_at, ..) = latest_run(&agent.database(), "patients").await.unwrap();
    assert_eq!(
        outcome, "running",
        "nobody recorded the end of the killed run"
    );

    // The schedule's next occurrence is months away: only the unfinished run brings it back.
    agent.restart();
    let since = Instant::now();
    let finished = loop {
        if let Some(run) = latest_run(&agent.database(), "patients").await
            && run.0 != "running"
        {
            break run;
        }
        assert!(
            since.elapsed() < Duration::from_secs(60),
            "the run was not repeated; log:
{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        finished.0,
        "success",
        "log:
{}",
        agent.log()
    );
    assert!(killed_at >= 3);
    let db = agent.database();
    let stored = common::db_int(&db, "SELECT count(*) FROM resources").await;
    assert_eq!(stored, 3_000, "every patient exactly once");
    let outcomes: Vec<String> =
        common::db_rows(&db, "SELECT outcome FROM sync_runs ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.text("outcome"))
            .collect();
    assert_eq!(outcomes, ["interrupted", "success"]);
    let log = agent.log();
    assert!(log.contains("its last run did not complete"), "{log}");
    // The killed process's job lease was taken over at once, not after its 120 s TTL.
    assert!(log.contains("took over a lease"), "{log}");
    agent.signal("TERM");
    agent.wait_exit(Duration::from_secs(10));
}

fn token_requests(sandbox: &Sandbox, vendor: Vendor) -> u32 {
    sandbox.total_requests(vendor)
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_applies_a_good_config_and_rejects_a_bad_one() {
    let sandbox = Sandbox::start(Arc::new(SystemClock), Lifetimes::documented(), 0)
        .await
        .unwrap();
    let nx = sandbox.account_config(Vendor::Nextech, "nx");
    let niko = sandbox.account_config(Vendor::NikoHealth, "niko");
    let cc = sandbox.account_config(Vendor::CareCentric, "cc");
    let mut agent = Agent::start(&format!("{nx}{niko}"), "5s", &[]);
    agent.wait_ready().await;
    let before = (
        token_requests(&sandbox, Vendor::Nextech),
        token_requests(&sandbox, Vendor::NikoHealth),
    );
    assert_eq!(before, (1, 1));

    // Added: cc. Unchanged: nx and niko keep their tokens (no new token request).
    agent.rewrite(&format!("{nx}{niko}{cc}"), "5s");
    agent.signal("HUP");
    let m = agent
        .metrics_until("cc's token after the reload", |m| {
            m.contains("ehrsync_token_valid{account=\"cc\"} 1")
        })
        .await;
    assert!(
        m.contains("ehrsync_config_reloads_total{outcome=\"success\"} 1"),
        "{m}"
    );
    assert!(m.contains("ehrsync_config_last_reload_successful 1"), "{m}");
    assert_eq!(
        (
            token_requests(&sandbox, Vendor::Nextech),
            token_requests(&sandbox, Vendor::NikoHealth)
        ),
        before,
        "unchanged accounts made no token request"
    );
    assert_eq!(token_requests(&sandbox, Vendor::CareCentric), 1);
    agent.wait_ready().await;
    // Their owners kept running (a restarted owner would adopt the stored tokens, also
    // without a request, so the log is the witness).
    let log = agent.log();
    assert!(log.contains("starting the account account=cc"), "{log}");
    assert!(!log.contains("restarting"), "{log}");

    // A bad config: rejected, logged with its key, counted; the running one stays.
    agent.rewrite(
        &format!("{nx}{niko}{cc}[accounts.bad]\nvendor = 'nope'\n"),
        "5s",
    );
    agent.signal("HUP");
    let m = agent
        .metrics_until("the rejected reload", |m| {
            m.contains("ehrsync_config_last_reload_successful 0")
        })
        .await;
    assert!(
        m.contains("ehrsync_config_reloads_total{outcome=\"failure\"} 1"),
        "{m}"
    );
    for account in ["nx", "niko", "cc"] {
        assert!(
            m.contains(&format!("ehrsync_token_valid{{account=\"{account}\"}} 1")),
            "{m}"
        );
    }
    assert_eq!(agent.get("/readyz").await.map(|r| r.0), Some(200));
    let log = agent.log();
    assert!(
        log.contains("config reload rejected") && log.contains("accounts.bad.vendor"),
        "{log}"
    );

    // Removed: niko (its gauges go, so alerts on it resolve). nx is still untouched.
    agent.rewrite(&format!("{nx}{cc}"), "5s");
    agent.signal("HUP");
    let m = agent
        .metrics_until("niko's removal", |m| {
            m.contains("ehrsync_config_reloads_total{outcome=\"success\"} 2")
        })
        .await;
    assert!(!m.contains("ehrsync_token_valid{account=\"niko\"}"), "{m}");
    assert!(m.contains("ehrsync_config_last_reload_successful 1"), "{m}");
    assert_eq!(token_requests(&sandbox, Vendor::Nextech), before.0);

    agent.signal("TERM");
    assert_eq!(agent.wait_exit(Duration::from_secs(10)).code(), Some(0));
    for (_, secret) in sandbox::credentials_env() {
        assert!(
            !agent.log().contains(secret),
            "{secret} leaked into the log"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn systemd_hears_ready_watchdog_reloading_and_stopping() {
    let sandbox = Sandbox::start(Arc::new(SystemClock), Lifetimes::documented(), 0)
        .await
        .unwrap();
    let socket_dir = tempfile::tempdir().unwrap();
    let socket_path = socket_dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let nx = sandbox.account_config(Vendor::Nextech, "nx");
    let mut agent = Agent::start(
        &nx,
        "5s",
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            // WatchdogSec=0.4s: pings every 200 ms.
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let mut messages = Vec::new();
    let read_until = |want: &str, messages: &mut Vec<String>| {
        let mut buf = [0u8; 4096];
        loop {
            let n = socket.recv(&mut buf).unwrap_or_else(|e| {
                panic!("no {want} (got {messages:?}): {e}");
            });
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            messages.push(message.clone());
            if message.lines().any(|l| l == want) {
                return message;
            }
        }
    };
    let ready = read_until("READY=1", &mut messages);
    assert!(ready.contains("STATUS=1 account, 0 jobs"), "{ready}");
    // The database is open and the listener bound when READY=1 arrives.
    assert_eq!(agent.get("/healthz").await.map(|r| r.0), Some(200));
    let since = Instant::now();
    read_until("WATCHDOG=1", &mut messages);
    read_until("WATCHDOG=1", &mut messages);
    assert!(since.elapsed() < Duration::from_secs(2));

    agent.signal("HUP");
    let reloading = read_until("RELOADING=1", &mut messages);
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    read_until("READY=1", &mut messages);

    agent.signal("TERM");
    read_until("STOPPING=1", &mut messages);
    assert_eq!(agent.wait_exit(Duration::from_secs(10)).code(), Some(0));
}
