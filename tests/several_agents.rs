//! Several `ehrsync run` processes on one database (SQLite, the embedded store): 300 Nextech
//! accounts, each with a token URL of its own, 30-second access tokens, three agents. One
//! agent is killed with SIGKILL while they run. Over the whole time no account is ever without
//! a valid token, and the sandbox never sees two token requests for one account at once: the
//! token leases hold across processes, and a dead holder's lease is taken over.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_on_one_database_keep_300_accounts_valid_through_a_kill() {
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
    }
    let path = common::write_config(dir.path(), &config);

    let ports: Vec<u16> = (0..AGENTS).map(|_| common::free_port()).collect();
    let mut agents: Vec<Child> = ports
        .iter()
        .enumerate()
        .map(|(i, port)| start_agent(&path, *port, &dir.path().join(format!("agent{i}.log"))))
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

    // Two token lifetimes, then one agent dies without a word, then three more lifetimes.
    tokio::time::sleep(Duration::from_secs(40)).await;
    agents[0].kill().unwrap();
    agents[0].wait().unwrap();
    tokio::time::sleep(Duration::from_secs(90)).await;
    for port in &ports[1..] {
        assert!(ready(*port).await, "a surviving agent is not ready");
    }
    let end = SystemClock.now();

    for agent in &mut agents[1..] {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(agent.id() as libc::pid_t, libc::SIGTERM) };
    }
    for (i, agent) in agents.iter_mut().enumerate().skip(1) {
        let status = agent.wait().unwrap();
        let log =
            std::fs::read_to_string(dir.path().join(format!("agent{i}.log"))).unwrap_or_default();
        assert_eq!(status.code(), Some(0), "agent {i} stopped badly:\n{log}");
    }

    let issued = sandbox.issuance();
    let (count, longest_ms) = gaps(&issued, from, end);
    assert_eq!(
        count, 0,
        "{count} moments an account had no valid token (longest {longest_ms} ms)"
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
