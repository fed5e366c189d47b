//! A token request, once sent, is finished and its answer stored, whatever happens to whoever
//! asked. The real binary against the sandbox, whose refresh tokens rotate on every use (an
//! old one is refused with `invalid_grant`) and whose token answers are delayed the way a slow
//! vendor's are: SIGTERM in the middle of a refresh, `ehrsync sync` processes ending in the
//! middle of one beside `ehrsync run`, a `sync` killed mid-run.
#![cfg(unix)]

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ehrsync::clock::SystemClock;
use ehrsync::sandbox::{self, ApiFault, Fault, Lifetimes, Sandbox};
use ehrsync::vendor::Vendor;

use common::agent::{Agent, log_in};

const ACCOUNT: &str = "acct";

async fn sandbox(access: Duration) -> Sandbox {
    let mut lifetimes = Lifetimes::documented();
    lifetimes.nextech_access = access;
    lifetimes.nethealth_access = access;
    Sandbox::start(Arc::new(SystemClock), lifetimes, 0)
        .await
        .unwrap()
}

/// Polls `ok` every 20 ms for up to `limit`; `context` says what to show on failure.
async fn wait_for(
    what: &str,
    limit: Duration,
    context: impl Fn() -> String,
    ok: impl Fn() -> bool,
) {
    let since = Instant::now();
    while !ok() {
        assert!(
            since.elapsed() < limit,
            "{what}: not within {limit:?}:\n{}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn counter(metrics: &str, grant: &str, outcome: &str) -> u64 {
    let prefix = format!(
        "ehrsync_token_requests_total{{account=\"{ACCOUNT}\",grant=\"{grant}\",outcome=\"{outcome}\"}} "
    );
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// An agent for a `vendor` account (logged in by a person where the vendor needs one) with 8 s
/// tokens, one second into a refresh whose answer the sandbox holds back for three.
async fn one_second_into_a_slow_refresh(vendor: Vendor) -> (Sandbox, Agent) {
    let sandbox = sandbox(Duration::from_secs(8)).await;
    let agent = Agent::start(&sandbox.account_config(vendor, ACCOUNT), "5s", &[]);
    if vendor == Vendor::NetHealth {
        log_in(&agent.config_path(), ACCOUNT).await;
    }
    agent
        .metrics_until("a valid token", |m| {
            m.contains(&format!("ehrsync_token_valid{{account=\"{ACCOUNT}\"}} 1"))
        })
        .await;
    // The next refresh (not one answered while the login was being adopted).
    let earlier = sandbox.requests(vendor, "refresh_token");
    sandbox.delay_answers(Some(Duration::from_secs(3)));
    wait_for(
        "a refresh sent",
        Duration::from_secs(30),
        || agent.log(),
        || sandbox.requests(vendor, "refresh_token") > earlier,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    (sandbox, agent)
}

/// SIGTERM one second into a refresh whose answer takes three: the agent reads the answer and
/// stores it before exiting, and the restarted agent refreshes with the rotated token.
async fn sigterm_during_a_refresh(vendor: Vendor, primary_grant: &str) {
    let (sandbox, mut agent) = one_second_into_a_slow_refresh(vendor).await;
    agent.signal("TERM");
    let status = agent.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "log:\n{}", agent.log());
    assert_eq!(
        sandbox.unread_answers(),
        0,
        "the stopping agent hung up on its refresh; log:\n{}",
        agent.log()
    );
    let before = sandbox.requests(vendor, "refresh_token");

    agent.restart();
    wait_for(
        "a refresh after the restart",
        Duration::from_secs(30),
        || agent.log(),
        || sandbox.requests(vendor, "refresh_token") > before,
    )
    .await;
    agent
        .metrics_until("the restarted agent's refresh succeeded", |m| {
            counter(m, "refresh_token", "success") >= 1
        })
        .await;
    assert_eq!(
        sandbox.rejected(vendor, "refresh_token"),
        0,
        "a rotated refresh token was lost; log:\n{}",
        agent.log()
    );
    assert_eq!(
        sandbox.requests(vendor, primary_grant),
        1,
        "only the first login; log:\n{}",
        agent.log()
    );
    assert_eq!(sandbox.unread_answers(), 0);
    agent.signal("TERM");
    agent.wait_exit(Duration::from_secs(20));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_refresh_keeps_the_rotated_token_of_a_password_account() {
    sigterm_during_a_refresh(Vendor::Nextech, "password").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_refresh_keeps_the_rotated_token_of_an_authorization_code_account() {
    sigterm_during_a_refresh(Vendor::NetHealth, "authorization_code").await;
}

const JOB: &str = "[[accounts.acct.jobs]]\nname = 'patients'\nkind = 'fhir'\nresource = 'Patient'\n\
                   schedule = '0 0 0 1 1 *'\npage_size = 10\n";

/// `ehrsync --config CONFIG sync acct patients`.
fn sync_once(config: &std::path::Path) -> common::Run {
    common::ehrsync(
        &[
            "--config",
            config.to_str().unwrap(),
            "sync",
            ACCOUNT,
            "patients",
        ],
        &sandbox::credentials_env(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn run_beside_five_looping_syncs_loses_no_rotated_refresh_token() {
    // 10 s tokens: a refresh every 7.5 s or so, by whichever process holds the lease; every
    // token answer takes 300 ms, so processes often end while one is in flight.
    let sandbox = sandbox(Duration::from_secs(10)).await;
    sandbox.set_patients(20);
    let config = format!("{}{JOB}", sandbox.account_config(Vendor::Nextech, ACCOUNT));
    let agent = Agent::start(&config, "5s", &[]);
    agent.wait_ready().await;
    sandbox.delay_answers(Some(Duration::from_millis(300)));
    let agent = Arc::new(std::sync::Mutex::new(agent));
    let span = Duration::from_secs(120);
    let started = Instant::now();
    let loops: Vec<_> = (0..5)
        .map(|_| {
            let agent = agent.clone();
            std::thread::spawn(move || {
                let mut outcomes = Vec::new();
                let config = agent.lock().unwrap().config_path();
                while started.elapsed() < span {
                    let run = sync_once(&config);
                    outcomes.push((run.code, run.stdout, run.stderr));
                }
                outcomes
            })
        })
        .collect();
    let mut runs = 0;
    for handle in loops {
        for (code, stdout, stderr) in handle.join().unwrap() {
            runs += 1;
            // Five processes share one job: a run finds it running elsewhere now and then.
            assert!(
                code == Some(0) || stdout.contains("skipped"),
                "{stdout}\n{stderr}"
            );
        }
    }
    let mut agent = Arc::into_inner(agent).unwrap().into_inner().unwrap();
    agent.signal("TERM");
    assert_eq!(agent.wait_exit(Duration::from_secs(20)).code(), Some(0));
    let (requests, refreshes, rejected, logins, unread) = (
        sandbox.total_requests(Vendor::Nextech),
        sandbox.requests(Vendor::Nextech, "refresh_token"),
        sandbox.rejected(Vendor::Nextech, "refresh_token"),
        sandbox.requests(Vendor::Nextech, "password"),
        sandbox.unread_answers(),
    );
    // For the record (the closing note of issue 14 quotes these).
    println!(
        "{runs} sync runs in {span:?}: {requests} token requests ({refreshes} refreshes), \
         {rejected} refused, {logins} password logins, {unread} answers unread"
    );
    assert!(runs >= 25, "the syncs ran: {runs}");
    assert!(refreshes >= 10, "tokens were refreshed: {refreshes}");
    assert_eq!(rejected, 0, "a rotated refresh token was lost");
    assert_eq!(logins, 1, "only the first login");
    assert_eq!(unread, 0, "every token answer was read");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sync_killed_mid_run_does_not_block_the_next_one() {
    let sandbox = sandbox(Duration::from_secs(3600)).await;
    sandbox.set_patients(3_000);
    let config = format!(
        "{}{}",
        sandbox.account_config(Vendor::Nextech, ACCOUNT),
        JOB.replace("page_size = 10", "page_size = 100")
    );
    // No agent: only `ehrsync sync` processes use the database.
    let dir = tempfile::tempdir().unwrap();
    let path = common::write_config(
        dir.path(),
        &common::agent::config_text(common::free_port(), &config, "5s"),
    );
    sandbox.inject_api(
        Vendor::Nextech,
        std::iter::repeat_n(ApiFault::Http(Fault::Slow(Duration::from_millis(300))), 10),
    );
    let mut first = Command::new(env!("CARGO_BIN_EXE_ehrsync"))
        .env_clear()
        .envs(sandbox::credentials_env())
        .args([
            "--config",
            path.to_str().unwrap(),
            "sync",
            ACCOUNT,
            "patients",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(
        "the first sync's run",
        Duration::from_secs(20),
        String::new,
        || sandbox.api_requests(Vendor::Nextech) >= 2,
    )
    .await;
    first.kill().unwrap();
    first.wait().unwrap();
    // At once, not after the dead process's 45 s lease: its process is gone.
    let run = sync_once(&path);
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("success"), "{}", run.stdout);
    assert!(run.stdout.contains("3000 records"), "{}", run.stdout);
    assert!(run.stderr.contains("took over a lease"), "{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_sealed_with_another_key_are_reported_once_not_every_poll() {
    let sandbox = sandbox(Duration::from_secs(3600)).await;
    let mut agent = Agent::start(
        &sandbox.account_config(Vendor::NetHealth, ACCOUNT),
        "5s",
        &[],
    );
    log_in(&agent.config_path(), ACCOUNT).await;
    agent
        .metrics_until("a valid token", |m| {
            m.contains(&format!("ehrsync_token_valid{{account=\"{ACCOUNT}\"}} 1"))
        })
        .await;
    agent.signal("TERM");
    assert_eq!(agent.wait_exit(Duration::from_secs(20)).code(), Some(0));
    // The token key is replaced (restored from another machine, say): the stored tokens can
    // no longer be opened, and the account waits for a person.
    std::fs::remove_file(agent.dir.path().join("state/ehrsync.key")).unwrap();
    agent.restart();
    agent
        .metrics_until("needs_login", |m| {
            m.contains(&format!(
                "ehrsync_account_needs_login{{account=\"{ACCOUNT}\"}} 1"
            ))
        })
        .await;
    // Three of the parked account's 5 s looks at the database.
    tokio::time::sleep(Duration::from_secs(16)).await;
    let log = agent.log();
    assert_eq!(
        log.matches("stored tokens are unusable").count(),
        1,
        "said once, at start:\n{log}"
    );
    assert_eq!(log.matches("cannot be opened").count(), 0, "{log}");
    agent.signal("TERM");
    agent.wait_exit(Duration::from_secs(20));
}

/// `kill -9` one second into a refresh whose answer takes three: the answer is lost with the
/// process, and the provider has already rotated the refresh token it was sent. The restarted
/// agent finds the refresh the dead process recorded before sending it.
async fn killed_during_a_refresh(vendor: Vendor) -> (Sandbox, Agent) {
    let (sandbox, mut agent) = one_second_into_a_slow_refresh(vendor).await;
    agent.signal("KILL");
    agent.wait_exit(Duration::from_secs(5));
    wait_for(
        "the lost answer",
        Duration::from_secs(5),
        || agent.log(),
        || sandbox.unread_answers() == 1,
    )
    .await;
    sandbox.delay_answers(None);
    agent.restart();
    (sandbox, agent)
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_kill_mid_refresh_a_password_account_logs_in_instead_of_presenting_a_dead_token() {
    let (sandbox, mut agent) = killed_during_a_refresh(Vendor::Nextech).await;
    wait_for(
        "a second login",
        Duration::from_secs(30),
        || agent.log(),
        || sandbox.requests(Vendor::Nextech, "password") == 2,
    )
    .await;
    agent
        .metrics_until("a valid token", |m| {
            m.contains(&format!("ehrsync_token_valid{{account=\"{ACCOUNT}\"}} 1"))
        })
        .await;
    assert_eq!(
        sandbox.rejected(Vendor::Nextech, "refresh_token"),
        0,
        "the possibly rotated refresh token was not presented; log:\n{}",
        agent.log()
    );
    assert!(
        agent
            .log()
            .contains("logging in again rather than presenting")
    );
    agent.signal("TERM");
    agent.wait_exit(Duration::from_secs(20));
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_kill_mid_refresh_an_authorization_code_account_tries_once_then_says_why() {
    let (sandbox, mut agent) = killed_during_a_refresh(Vendor::NetHealth).await;
    agent
        .metrics_until("needs_login", |m| {
            m.contains(&format!(
                "ehrsync_account_needs_login{{account=\"{ACCOUNT}\"}} 1"
            ))
        })
        .await;
    // One try with the refresh token the provider had rotated, no more.
    assert_eq!(sandbox.rejected(Vendor::NetHealth, "refresh_token"), 1);
    let status = common::ehrsync(
        &[
            "--config",
            agent.config_path().to_str().unwrap(),
            "status",
            "--json",
        ],
        &[],
    );
    assert!(
        status.stdout.contains("cut short"),
        "status says why: {}",
        status.stdout
    );
    agent.signal("TERM");
    agent.wait_exit(Duration::from_secs(20));
}
