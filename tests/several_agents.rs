//! Several `ehrsync run` processes on one database (PostgreSQL where the run keeps its stores
//! there, else one SQLite file): 300 Nextech accounts, each with a token URL of its own and a
//! job every 30 s, 30-second access tokens, three agents. The agents divide the accounts about
//! evenly; one is killed with SIGKILL, and its accounts are owned by the survivors within the
//! ownership TTL; another is paused (SIGSTOP) past its leases and resumed. Over the whole time
//! no account is ever without a valid token, the sandbox never sees two token requests for one
//! account at once, every job stores its records exactly once with no two runs of a job at
//! once, and the paused agent writes nothing to the runs it had in flight.
#![cfg(unix)]

mod common;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ehrsync::clock::{Clock, SystemClock};
use ehrsync::sandbox::{self, Issued, Lifetimes, Sandbox};
use ehrsync::token::Timestamp;
use ehrsync::vendor::Vendor;

const ACCOUNTS: usize = 300;
const AGENTS: usize = 3;

/// Gaps in an account's validity after `from`: a token issued after the one before it had
/// expired, or an account whose last token expired before `end`. Returns (gaps, longest ms).
fn gaps(issued: &[Issued], from: Timestamp, end: Timestamp) -> (usize, i64) {
    let mut by_tenant: HashMap<&str, Vec<&Issued>> = HashMap::new();
    for t in issued {
        by_tenant.entry(&t.tenant).or_default().push(t);
    }
    assert_eq!(by_tenant.len(), ACCOUNTS, "every account got tokens");
    let (mut count, mut longest) = (0, 0);
    for tokens in by_tenant.values_mut() {
        tokens.sort_by_key(|t| t.at);
        let mut valid_until = tokens[0].expires;
        for t in &tokens[1..] {
            if t.at > valid_until && t.at > from {
                count += 1;
                longest = longest.max(t.at.unix_millis() - valid_until.unix_millis());
            }
            valid_until = valid_until.max(t.expires);
        }
        if valid_until < end {
            count += 1;
            longest = longest.max(end.unix_millis() - valid_until.unix_millis());
        }
    }
    (count, longest)
}

fn start_agent(config: &std::path::Path, port: u16, log: &std::path::Path) -> Child {
    Command::new(common::binary())
        .args(["run", "--config"])
        .arg(config)
        .env_clear()
        .envs(sandbox::credentials_env())
        .env(
            "EHRSYNC__AGENT__METRICS_LISTEN",
            format!("127.0.0.1:{port}"),
        )
        .env("EHRSYNC_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("create the log"))
        .spawn()
        .expect("start ehrsync run")
}

async fn ready(port: u16) -> bool {
    matches!(
        common::http_get(&format!("http://127.0.0.1:{port}/readyz")).await,
        Some((200, _))
    )
}

/// Each agent's owned accounts, from its `/metrics` (`ehrsync_account_owned`); `None` for an
/// agent that does not answer.
async fn owned(port: u16) -> Option<usize> {
    let (_, body) = common::http_get(&format!("http://127.0.0.1:{port}/metrics")).await?;
    Some(
        body.lines()
            .filter(|l| l.starts_with("ehrsync_account_owned{") && l.ends_with(" 1"))
            .count(),
    )
}

/// Polls `ports`' owned counts until `ok` holds for them, up to `limit`; returns them and how
/// long it took.
async fn owned_until(
    ports: &[u16],
    limit: Duration,
    ok: impl Fn(&[usize]) -> bool,
) -> (Vec<usize>, Duration) {
    let since = Instant::now();
    loop {
        let mut counts = Vec::new();
        for port in ports {
            counts.push(owned(*port).await.unwrap_or(0));
        }
        if ok(&counts) || since.elapsed() > limit {
            return (counts, since.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn signal(child: &Child, signal: libc::c_int) {
    // SAFETY: signalling our own child by its pid.
    let sent = unsafe { libc::kill(child.id() as libc::pid_t, signal) };
    assert_eq!(sent, 0, "signal {signal} to {}", child.id());
}

/// Stops `child` (SIGSTOP) outside a write. A process stopped inside a write transaction on
/// a SQLite file keeps the file's one write lock until it resumes, so every other agent's
/// writes fail "busy" meanwhile: SQLite's nature, and why failover wants PostgreSQL, whose
/// server ends a stalled session (`a_stalled_postgres_session_…` in `tests/store.rs`). On a
/// file the test resumes such a process and stops it again a moment later.
async fn stop_outside_a_write(child: &Child, database: &ehrsync::config::Database) {
    use sqlx::{Connection, sqlite::SqliteConnectOptions};
    for attempt in 1..=40 {
        signal(child, libc::SIGSTOP);
        let ehrsync::config::Database::File(path) = database else {
            return;
        };
        // Another agent's own writes are short: wait for those, not for a stopped one's.
        let options = SqliteConnectOptions::new()
            .filename(path)
            .busy_timeout(Duration::from_millis(500));
        let mut c = sqlx::SqliteConnection::connect_with(&options)
            .await
            .unwrap();
        if sqlx::query("BEGIN IMMEDIATE").execute(&mut c).await.is_ok() {
            sqlx::query("ROLLBACK").execute(&mut c).await.unwrap();
            if attempt > 1 {
                eprintln!("stopped outside a write at attempt {attempt}");
            }
            return;
        }
        signal(child, libc::SIGCONT);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the agent was inside a write at each of 40 tries to stop it");
}

/// The last lines of an agent's log, for a failure's message.
fn log_tail(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The store's runs, oldest first.
async fn runs(database: &ehrsync::config::Database) -> Vec<common::TestRow> {
    common::db_rows(
        database,
        "SELECT id, outcome, records FROM sync_runs ORDER BY id",
        &[],
    )
    .await
    .unwrap_or_default()
}

/// Polls the store's runs until one satisfies `found`, for at most `limit`; on failure shows
/// the runs and the end of the agent's `log`.
async fn first_run(
    database: &ehrsync::config::Database,
    limit: Duration,
    log: &std::path::Path,
    found: impl Fn(&common::TestRow) -> bool,
) -> common::TestRow {
    let since = Instant::now();
    loop {
        let rows = runs(database).await;
        if let Some(run) = rows.iter().find(|r| found(r)) {
            return run.clone();
        }
        assert!(
            since.elapsed() < limit,
            "no such run within {limit:?}: {rows:?}\n{}",
            log_tail(log)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Patients each account's job stores.
const PATIENTS: u64 = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_divide_300_accounts_and_survive_a_kill_and_a_pause() {
    // Five minutes on PostgreSQL, the shared store; shorter on a SQLite file.
    let total = if common::on_postgres() {
        Duration::from_secs(300)
    } else {
        Duration::from_secs(240)
    };
    let sandbox = Sandbox::start(
        Arc::new(SystemClock),
        Lifetimes {
            nextech_access: Duration::from_secs(30),
            ..Lifetimes::documented()
        },
        0,
    )
    .await
    .unwrap();
    sandbox.record_issuance();
    sandbox.set_patients(PATIENTS);
    // Each answer is held back a little, so two requests for one account would overlap.
    sandbox.delay_answers(Some(Duration::from_millis(50)));

    let dir = tempfile::tempdir().unwrap();
    let mut config = format!("[agent]\n{}", common::database_lines("state/ehrsync.db"));
    let shared_url = sandbox.token_url(Vendor::Nextech).to_string();
    for i in 0..ACCOUNTS {
        let own_url = sandbox.tenant_token_url(&format!("t{i:04}")).to_string();
        config.push_str(
            &sandbox
                .account_config(Vendor::Nextech, &format!("a{i:04}"))
                .replace(&shared_url, &own_url),
        );
        config.push_str(&format!(
            "[[accounts.a{i:04}.jobs]]\nname = 'patients'\nkind = 'fhir'\nresource = 'Patient'\n\
             schedule = '*/30 * * * * *'\npage_size = 10\n"
        ));
    }
    let path = common::write_config(dir.path(), &config);
    let database = common::database_of(&path);
    let log = |i: usize| dir.path().join(format!("agent{i}.log"));

    let ports: Vec<u16> = (0..AGENTS).map(|_| common::free_port()).collect();
    let mut agents: Vec<Child> = ports
        .iter()
        .enumerate()
        .map(|(i, port)| start_agent(&path, *port, &log(i)))
        .collect();
    let started = Instant::now();
    for port in &ports {
        while !ready(*port).await {
            assert!(
                started.elapsed() < Duration::from_secs(180),
                "agent on port {port} never had every account valid"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let from = SystemClock.now();
    let began = Instant::now();

    // The shares converge: about a third each.
    let (shares, took) = owned_until(&ports, Duration::from_secs(60), |c| {
        c.iter().sum::<usize>() == ACCOUNTS && c.iter().all(|n| (90..=110).contains(n))
    })
    .await;
    assert!(
        shares.iter().sum::<usize>() == ACCOUNTS && shares.iter().all(|n| (90..=110).contains(n)),
        "shares {shares:?} after {took:?}"
    );
    eprintln!("shares {shares:?} within {took:?} of every agent being ready");

    // One agent dies without a word: its accounts are owned by the survivors within the TTL.
    tokio::time::sleep(Duration::from_secs(30)).await;
    agents[0].kill().unwrap();
    agents[0].wait().unwrap();
    let (after_kill, took) = owned_until(&ports[1..], Duration::from_secs(40), |c| {
        c.iter().sum::<usize>() == ACCOUNTS
    })
    .await;
    assert_eq!(
        after_kill.iter().sum::<usize>(),
        ACCOUNTS,
        "owned by the survivors {after_kill:?} after {took:?}"
    );
    assert!(
        took <= ehrsync::agent::share::OWNER_TTL,
        "the dead agent's accounts took {took:?} to be owned again"
    );
    eprintln!("the dead agent's accounts were owned again within {took:?}: {after_kill:?}");

    // Another is paused past its leases while its runs are slow (so some are in flight): just
    // before the jobs' next occurrence (every :00 and :30) their first pages turn slow, and the
    // agent stops a moment after it.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let into = SystemClock.now().unix_millis().rem_euclid(30_000);
    tokio::time::sleep(Duration::from_millis(
        u64::try_from(30_000 - into).unwrap() - 500,
    ))
    .await;
    sandbox.inject_api(
        Vendor::Nextech,
        std::iter::repeat_n(
            ehrsync::sandbox::ApiFault::Http(ehrsync::sandbox::Fault::Slow(Duration::from_secs(3))),
            150,
        ),
    );
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    stop_outside_a_write(&agents[1], &database).await;
    let paused = SystemClock.now();
    // What the paused agent was running: its job leases, and those runs' rows as they stand.
    let paused_id = common::db_rows(
        &database,
        "SELECT id FROM agents WHERE CAST(pid AS TEXT) = ?",
        &[&agents[1].id().to_string()],
    )
    .await
    .unwrap()[0]
        .text("id");
    let held = common::db_rows(
        &database,
        "SELECT account, job FROM job_leases WHERE holder = ?",
        &[&paused_id],
    )
    .await
    .unwrap();
    let mut frozen = Vec::new();
    for lease in &held {
        let run = common::db_rows(
            &database,
            "SELECT id, pages, records, outcome FROM sync_runs WHERE account = ? AND job = ? \
             ORDER BY id DESC LIMIT 1",
            &[&lease.text("account"), &lease.text("job")],
        )
        .await
        .unwrap();
        frozen.push(run[0].clone());
    }
    let in_flight = frozen
        .iter()
        .filter(|r| r.text("outcome") == "running")
        .count();
    assert!(
        in_flight > 0,
        "the paused agent had no run in flight: the fencing check would prove nothing"
    );
    let (survivor, took) =
        owned_until(&ports[2..], Duration::from_secs(60), |c| c[0] == ACCOUNTS).await;
    assert_eq!(
        survivor[0],
        ACCOUNTS,
        "the last agent owns every account after {took:?}; its log ends:\n{}",
        log_tail(&log(2))
    );
    // Paused until the other agent holds every job lease the paused one held (each expired,
    // and the job's next occurrence took it over): only then is there anything to fence.
    let since = Instant::now();
    loop {
        let still = common::db_rows(
            &database,
            "SELECT count(*) AS n FROM job_leases WHERE holder = ?",
            &[&paused_id],
        )
        .await
        .unwrap()[0]
            .int("n");
        if still == 0 {
            break;
        }
        assert!(
            since.elapsed() < Duration::from_secs(150),
            "{still} job leases of the paused agent were never taken over"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    signal(&agents[1], libc::SIGCONT);
    let woke = SystemClock.now();
    eprintln!(
        "paused {} s; {in_flight} runs were in flight",
        (woke.unix_millis() - paused.unix_millis()) / 1000,
    );

    // The rest of the time, then a clean stop of both survivors.
    tokio::time::sleep(total.saturating_sub(began.elapsed())).await;
    for port in &ports[1..] {
        assert!(ready(*port).await, "a surviving agent is not ready");
    }
    let end = SystemClock.now();
    let (rebalanced, _) = owned_until(&ports[1..], Duration::from_secs(1), |_| true).await;
    eprintln!("at the end the two agents own {rebalanced:?}");

    for agent in &mut agents[1..] {
        signal(agent, libc::SIGTERM);
    }
    for (i, agent) in agents.iter_mut().enumerate().skip(1) {
        let status = agent.wait().unwrap();
        let text = std::fs::read_to_string(log(i)).unwrap_or_default();
        assert_eq!(status.code(), Some(0), "agent {i} stopped badly:\n{text}");
    }

    // No gap while agents run or die; the pause is another matter: a paused owner holds its
    // accounts (and a token lease it held) until they expire, longer than these 30 s tokens
    // last, so the check resumes once the woken agent has looked again.
    let issued = sandbox.issuance();
    let before_pause: Vec<Issued> = issued.iter().filter(|t| t.at <= paused).cloned().collect();
    let (count, longest_ms) = gaps(&before_pause, from, paused);
    assert_eq!(
        count, 0,
        "{count} moments an account had no valid token before the pause (longest {longest_ms} ms)"
    );
    let recovered = Timestamp::from_unix_millis(woke.unix_millis() + 40_000);
    let (count, longest_ms) = gaps(&issued, recovered, end);
    assert_eq!(
        count, 0,
        "{count} moments an account had no valid token after the pause (longest {longest_ms} ms)"
    );
    assert_eq!(
        sandbox.overlapping_token_requests(),
        0,
        "two token requests for one account at once"
    );
    // Every refresh was someone's; the dead agent's accounts kept being refreshed.
    let after_kill = issued
        .iter()
        .filter(|t| t.at > from)
        .map(|t| t.tenant.as_str())
        .collect::<std::collections::HashSet<_>>();
    assert_eq!(after_kill.len(), ACCOUNTS, "every account was refreshed");

    // Fencing: the paused agent's runs got nothing more written after it woke.
    for before in &frozen {
        let now = common::db_rows(
            &database,
            "SELECT id, pages, records, outcome FROM sync_runs WHERE CAST(id AS TEXT) = ?",
            &[&before.text("id")],
        )
        .await
        .unwrap();
        assert_eq!(
            (now[0].int("pages"), now[0].int("records")),
            (before.int("pages"), before.int("records")),
            "run {} gained pages after its agent woke",
            before.text("id")
        );
        // Unchanged, or marked `interrupted` by the job's next run (the new owner's).
        let (was, is) = (before.text("outcome"), now[0].text("outcome"));
        assert!(
            is == was || (was == "running" && is == "interrupted"),
            "run {} went from {was} to {is} after its agent woke",
            before.text("id")
        );
    }
    let woken_log = std::fs::read_to_string(log(1)).unwrap_or_default();
    assert!(
        woken_log.contains("ownership of some accounts lapsed"),
        "the paused agent noticed it lost its accounts:\n{woken_log}"
    );

    // Every job stored its records exactly once, and no job's runs overlapped.
    let per_account = common::db_rows(
        &database,
        "SELECT account, count(*) AS n FROM resources GROUP BY account ORDER BY account",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(
        per_account.len(),
        ACCOUNTS,
        "every account's job stored records"
    );
    for row in &per_account {
        assert_eq!(row.int("n"), PATIENTS as i64, "{}", row.text("account"));
    }
    let runs = common::db_rows(
        &database,
        "SELECT account, started_at, finished_at, outcome FROM sync_runs ORDER BY account, id",
        &[],
    )
    .await
    .unwrap();
    let mut overlaps = 0;
    for pair in runs.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if a.text("account") != b.text("account") {
            continue;
        }
        if let Some(done) = a.0.get("finished_at").cloned().flatten() {
            let done: i64 = done.parse().unwrap();
            // Whole seconds: a run may start in the second the one before it ended.
            if b.int("started_at") < done {
                overlaps += 1;
            }
        }
    }
    assert_eq!(overlaps, 0, "runs of one job overlapped");
    let successes = runs
        .iter()
        .filter(|r| r.text("outcome") == "success")
        .count();
    eprintln!(
        "{} runs, {successes} successful, {} token requests",
        runs.len(),
        issued.len()
    );
}

/// The sandbox's count above can fail: two requests for one account at once are counted, one
/// each for two accounts is not.
#[tokio::test]
async fn the_sandbox_counts_overlapping_token_requests_per_account() {
    let sandbox = common::sandbox().await;
    sandbox.delay_answers(Some(Duration::from_millis(300)));
    let client = ehrsync::http::client_builder(Duration::from_secs(10))
        .build()
        .unwrap();
    let post = |tenant: &str| {
        client
            .post(sandbox.tenant_token_url(tenant).as_str())
            .form(&[("grant_type", "client_credentials")])
            .send()
    };
    let (a, b) = tokio::join!(post("t1"), post("t2"));
    assert!(a.is_ok() && b.is_ok());
    assert_eq!(sandbox.overlapping_token_requests(), 0);
    let (a, b) = tokio::join!(post("t1"), post("t1"));
    assert!(a.is_ok() && b.is_ok());
    assert_eq!(sandbox.overlapping_token_requests(), 1);
}

/// A run cut short by its agent's death is repeated by the agent that takes the account over
/// as soon as it does, from the last watermark: for a daily job, the next occurrence would be
/// a day away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_new_owner_repeats_a_dead_owners_unfinished_run_at_once() {
    const RECORDS: u64 = 40;
    let sandbox = common::sandbox().await;
    sandbox.set_patients(RECORDS);
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[agent]\n{}{}[[accounts.clinic.jobs]]\nname = 'patients'\nkind = 'fhir'\n\
         resource = 'Patient'\nschedule = '0 0 3 * * *'\npage_size = 5\n",
        common::database_lines("state/ehrsync.db"),
        sandbox.account_config(Vendor::Nextech, "clinic"),
    );
    let path = common::write_config(dir.path(), &config);
    let database = common::database_of(&path);
    let log = |i: usize| dir.path().join(format!("agent{i}.log"));
    // The first agent's run (it never ran: at once) reads its eight pages slowly.
    sandbox.inject_api(
        Vendor::Nextech,
        std::iter::repeat_n(
            ehrsync::sandbox::ApiFault::Http(ehrsync::sandbox::Fault::Slow(Duration::from_secs(2))),
            8,
        ),
    );
    let ports = [common::free_port(), common::free_port()];
    let mut first = start_agent(&path, ports[0], &log(0));
    let cut = first_run(&database, Duration::from_secs(60), &log(0), |r| {
        r.int("records") > 0
    })
    .await;
    // A second agent joins while it runs; the account is the first one's.
    let mut second = start_agent(&path, ports[1], &log(1));
    let since = Instant::now();
    while !ready(ports[1]).await {
        assert!(
            since.elapsed() < Duration::from_secs(60),
            "the second agent never got ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        owned(ports[1]).await,
        Some(0),
        "the account was the first agent's"
    );
    assert_eq!(runs(&database).await[0].text("outcome"), "running");

    first.kill().unwrap();
    first.wait().unwrap();
    let killed = Instant::now();
    // The survivor sees the dead owner at its next round (at most `CLAIM_EVERY`) and repeats
    // the run then; the remaining slow pages are its to read.
    first_run(&database, ehrsync::agent::share::OWNER_TTL, &log(1), |r| {
        r.int("id") > cut.int("id")
    })
    .await;
    let started = killed.elapsed();
    let repeated = first_run(
        &database,
        Duration::from_secs(90).saturating_sub(started),
        &log(1),
        |r| r.text("outcome") == "success",
    )
    .await;
    eprintln!(
        "repeated {started:?} after the kill, done after {:?} ({} records were stored before it)",
        killed.elapsed(),
        cut.int("records")
    );
    assert!(repeated.int("id") > cut.int("id"));
    let cut_now = common::db_rows(
        &database,
        "SELECT outcome FROM sync_runs WHERE CAST(id AS TEXT) = ?",
        &[&cut.text("id")],
    )
    .await
    .unwrap();
    assert_eq!(cut_now[0].text("outcome"), "interrupted");
    assert_eq!(
        common::db_rows(&database, "SELECT count(*) AS n FROM resources", &[])
            .await
            .unwrap()[0]
            .int("n"),
        RECORDS as i64,
        "every record stored once"
    );
    assert!(
        std::fs::read_to_string(log(1))
            .unwrap()
            .contains("took the account over")
    );
    signal(&second, libc::SIGTERM);
    assert_eq!(second.wait().unwrap().code(), Some(0));
}
