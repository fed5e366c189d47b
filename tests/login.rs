//! `ehrsync login` end to end against the sandbox's OpenID provider (Net Health's emulation):
//! the real binary, a loopback redirect followed by the test as a browser would, the tokens
//! picked up by a running `ehrsync run`, a revoked refresh token sending the account to
//! `needs_login` and another login bringing it back. Then every way a login must refuse: a
//! wrong `state`, an `access_denied` redirect, a provider without PKCE, a forged ID token.
#![cfg(unix)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ehrsync::clock::SystemClock;
use ehrsync::sandbox::{self, Fault, Lifetimes, Sandbox};
use ehrsync::vendor::Vendor;

use common::agent::{Agent, Login, authorize, deliver};

const ACCOUNT: &str = "nh";

async fn sandbox(access: Duration) -> Sandbox {
    let mut lifetimes = Lifetimes::documented();
    lifetimes.nethealth_access = access;
    Sandbox::start(Arc::new(SystemClock), lifetimes, 0)
        .await
        .unwrap()
}

/// Runs a whole browser login for `ACCOUNT` against the agent's config; returns its stdout.
async fn log_in(agent: &Agent) -> String {
    let mut login = Login::start(&agent.config_path(), &[ACCOUNT, "--no-browser"], &[]);
    let url = login.url();
    let callback = authorize(&url).await;
    assert_eq!(callback.path(), "/callback");
    assert_eq!(callback.host_str(), Some("127.0.0.1"));
    let (status, page) = deliver(&callback).await;
    assert_eq!(status, 200, "{page}");
    let (exit, stdout, stderr) = login.finish(Duration::from_secs(20));
    assert!(exit.success(), "login failed:\n{stdout}\n{stderr}");
    for (_, secret) in sandbox::credentials_env() {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "a secret in the login's output"
        );
    }
    // Nor the authorization code (the state is in the printed address by design).
    let callback_query = callback.query().unwrap_or_default().to_owned();
    for (_, value) in
        url::form_urlencoded::parse(callback_query.as_bytes()).filter(|(k, _)| k == "code")
    {
        assert!(
            !stdout.contains(value.as_ref()) && !stderr.contains(value.as_ref()),
            "a redirect value in the login's output"
        );
    }
    stdout
}

fn gauge(metrics: &str, name: &str) -> Option<f64> {
    let prefix = format!("{name}{{account=\"{ACCOUNT}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

fn is(metrics: &str, name: &str, value: f64) -> bool {
    gauge(metrics, name) == Some(value)
}

#[tokio::test(flavor = "multi_thread")]
async fn login_then_the_agent_refreshes_and_a_revoked_refresh_token_needs_another_login() {
    let sandbox = sandbox(Duration::from_secs(6)).await;
    let agent = Agent::start(
        &sandbox.account_config(Vendor::NetHealth, ACCOUNT),
        "5s",
        &[],
    );
    // Nobody has logged in yet: the account waits for a person, and says how.
    agent
        .metrics_until("needs_login = 1", |m| {
            is(m, "ehrsync_account_needs_login", 1.0)
        })
        .await;
    let command = format!(
        "ehrsync --config {} login {ACCOUNT}",
        agent.config_path().display()
    );
    let status = common::ehrsync(
        &[
            "--config",
            agent.config_path().to_str().unwrap(),
            "status",
            "--json",
        ],
        &sandbox::credentials_env(),
    );
    let report: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(report["accounts"][0]["state"], "needs_login", "{report}");
    assert_eq!(report["accounts"][0]["login_command"], command.as_str());
    assert!(
        agent.log().contains(&format!("run `{command}`")),
        "{}",
        agent.log()
    );

    let stdout = log_in(&agent).await;
    assert!(stdout.contains("refresh token expires"), "{stdout}");
    assert!(stdout.contains("(as sandbox-person)"), "{stdout}");

    // The running agent adopts the stored tokens on its own, then keeps them fresh.
    agent
        .metrics_until("valid after the login", |m| {
            is(m, "ehrsync_token_valid", 1.0) && is(m, "ehrsync_account_needs_login", 0.0)
        })
        .await;
    let since = Instant::now();
    while sandbox.requests(Vendor::NetHealth, "refresh_token") < 2 {
        assert!(
            since.elapsed() < Duration::from_secs(20),
            "no refreshes; log:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(sandbox.requests(Vendor::NetHealth, "authorization_code"), 1);

    // The provider revokes the refresh token: the next refresh is refused, and only a person
    // can help.
    sandbox.revoke_refresh_tokens(Vendor::NetHealth);
    agent
        .metrics_until("needs_login after the revocation", |m| {
            is(m, "ehrsync_account_needs_login", 1.0)
        })
        .await;
    let log = agent.log();
    assert!(
        log.matches(&format!("run `{command}`")).count() >= 2,
        "{log}"
    );
    log_in(&agent).await;
    agent
        .metrics_until("valid after the second login", |m| {
            is(m, "ehrsync_token_valid", 1.0) && is(m, "ehrsync_account_needs_login", 0.0)
        })
        .await;
    assert_eq!(sandbox.requests(Vendor::NetHealth, "authorization_code"), 2);

    // No token of any kind reached the agent's log or the login's output.
    let log = agent.log();
    for token in sandbox.issued_tokens() {
        assert!(!log.contains(&token), "a token in the agent's log");
        assert!(!stdout.contains(&token), "a token in the login's output");
    }
}

/// A config for `ACCOUNT` alone, for tests that need no agent.
fn lone_config(sandbox: &Sandbox) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = common::write_config(
        dir.path(),
        &format!(
            "[agent]\n{}{}",
            common::database_lines("ehrsync.db"),
            sandbox.account_config(Vendor::NetHealth, ACCOUNT)
        ),
    );
    (dir, path)
}

/// Whether `ACCOUNT` has tokens stored in the database of the config in `dir`.
async fn tokens_stored(dir: &std::path::Path) -> bool {
    let db = common::database_of(&dir.join("ehrsync.toml"));
    let Ok(Some(store)) = ehrsync::store::Store::open_read_only(&db).await else {
        return false;
    };
    let record = store.load_token(ACCOUNT).await.unwrap();
    store.close().await;
    record.is_some_and(|r| r.access_token.is_some())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redirect_with_another_state_is_refused_and_the_code_never_exchanged() {
    let sandbox = sandbox(Duration::from_secs(3600)).await;
    let (dir, config) = lone_config(&sandbox);
    let mut login = Login::start(&config, &[ACCOUNT, "--no-browser"], &[]);
    let mut callback = authorize(&login.url()).await;
    let pairs: Vec<(String, String)> = callback
        .query_pairs()
        .map(|(k, v)| {
            let v = if k == "state" {
                "forged-state".to_owned()
            } else {
                v.into_owned()
            };
            (k.into_owned(), v)
        })
        .collect();
    callback.query_pairs_mut().clear().extend_pairs(pairs);
    let (status, page) = deliver(&callback).await;
    assert_eq!(status, 400);
    assert!(page.contains("state does not match"), "{page}");
    let (exit, _, stderr) = login.finish(Duration::from_secs(10));
    assert_eq!(exit.code(), Some(1), "{stderr}");
    assert!(stderr.contains("state does not match"), "{stderr}");
    assert_eq!(sandbox.requests(Vendor::NetHealth, "authorization_code"), 0);
    assert!(!tokens_stored(dir.path()).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_access_denied_redirect_is_reported_as_the_providers_refusal() {
    let sandbox = sandbox(Duration::from_secs(3600)).await;
    sandbox.inject(Vendor::NetHealth, Fault::AccessDenied, 1);
    let (dir, config) = lone_config(&sandbox);
    let mut login = Login::start(&config, &[ACCOUNT, "--no-browser"], &[]);
    let callback = authorize(&login.url()).await;
    assert!(callback.query().unwrap().contains("error=access_denied"));
    let (status, page) = deliver(&callback).await;
    assert_eq!(status, 400, "{page}");
    let (exit, _, stderr) = login.finish(Duration::from_secs(10));
    assert_eq!(exit.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the provider refused the login: access_denied (the user declined)"),
        "{stderr}"
    );
    assert_eq!(sandbox.requests(Vendor::NetHealth, "authorization_code"), 0);
    assert!(!tokens_stored(dir.path()).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provider_without_pkce_is_refused_before_anyone_is_sent_to_it() {
    let sandbox = sandbox(Duration::from_secs(3600)).await;
    sandbox.advertise_pkce(false);
    let (dir, config) = lone_config(&sandbox);
    let (exit, stdout, stderr) =
        Login::start(&config, &[ACCOUNT, "--no-browser"], &[]).finish(Duration::from_secs(10));
    assert_eq!(exit.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("does not support PKCE with S256"),
        "{stderr}"
    );
    assert!(
        !stdout.contains("http"),
        "no address may be shown: {stdout}"
    );
    assert_eq!(sandbox.requests(Vendor::NetHealth, "authorize"), 0);
    assert!(!tokens_stored(dir.path()).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_id_token_with_a_bad_signature_is_refused_and_nothing_stored() {
    let sandbox = sandbox(Duration::from_secs(3600)).await;
    sandbox.inject(Vendor::NetHealth, Fault::ForgedIdToken, 1);
    let (dir, config) = lone_config(&sandbox);
    let mut login = Login::start(&config, &[ACCOUNT, "--no-browser"], &[]);
    let callback = authorize(&login.url()).await;
    let (status, _) = deliver(&callback).await;
    assert_eq!(status, 200, "the redirect itself was fine");
    let (exit, _, stderr) = login.finish(Duration::from_secs(10));
    assert_eq!(exit.code(), Some(1), "{stderr}");
    assert!(stderr.contains("signature does not verify"), "{stderr}");
    assert_eq!(sandbox.requests(Vendor::NetHealth, "authorization_code"), 1);
    assert!(!tokens_stored(dir.path()).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_device_flow_logs_in_once_the_code_is_approved_elsewhere() {
    let sandbox = sandbox(Duration::from_secs(3600)).await;
    let (dir, config) = lone_config(&sandbox);
    let mut login = Login::start(&config, &[ACCOUNT, "--device"], &[]);
    // The person opens the address carrying the code on another device.
    let url = login.url();
    assert!(url.contains("user_code="), "{url}");
    // Let a poll or two find it pending first.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, _) = deliver(&url::Url::parse(&url).unwrap()).await;
    assert_eq!(status, 200);
    let (exit, stdout, stderr) = login.finish(Duration::from_secs(20));
    assert!(exit.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("refresh token expires"), "{stdout}");
    assert!(sandbox.requests(Vendor::NetHealth, ehrsync::token::client::DEVICE_CODE_GRANT) >= 2);
    assert!(tokens_stored(dir.path()).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_denied_device_login_stores_nothing() {
    let sandbox = sandbox(Duration::from_secs(3600)).await;
    sandbox.inject(Vendor::NetHealth, Fault::AccessDenied, 1);
    let (dir, config) = lone_config(&sandbox);
    let mut login = Login::start(&config, &[ACCOUNT, "--device"], &[]);
    let url = login.url();
    deliver(&url::Url::parse(&url).unwrap()).await;
    let (exit, _, stderr) = login.finish(Duration::from_secs(20));
    assert_eq!(exit.code(), Some(1), "{stderr}");
    assert!(stderr.contains("access_denied"), "{stderr}");
    assert!(!tokens_stored(dir.path()).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn login_and_status_read_no_other_accounts_secrets() {
    // Under systemd another account's secret is often a credential only the service can read.
    let sandbox = sandbox(Duration::from_secs(3600)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = common::write_config(
        dir.path(),
        &format!(
            "[agent]\n{}{}\n\
             [accounts.niko]\nvendor = 'nikohealth'\ndomain = 'acme'\nclient_id = 'c'\n\
             client_secret = {{ credential = 'niko-secret' }}\n",
            common::database_lines("ehrsync.db"),
            sandbox.account_config(Vendor::NetHealth, ACCOUNT)
        ),
    );
    let path = config.to_str().unwrap();
    let env = sandbox::credentials_env();
    let check = common::ehrsync(&["--config", path, "check-config"], &env);
    assert_eq!(check.code, Some(2), "check-config reads every secret");
    assert!(
        check.stderr.contains("accounts.niko.client_secret"),
        "{}",
        check.stderr
    );

    let mut login = Login::start(&config, &[ACCOUNT, "--no-browser"], &[]);
    let callback = authorize(&login.url()).await;
    deliver(&callback).await;
    let (exit, stdout, stderr) = login.finish(Duration::from_secs(20));
    assert!(exit.success(), "{stdout}\n{stderr}");

    let status = common::ehrsync(&["--config", path, "status", "--json"], &env);
    assert_eq!(status.code, Some(0), "{}", status.stderr);
    let report: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    let states: Vec<(&str, &str)> = report["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["name"].as_str().unwrap(), a["state"].as_str().unwrap()))
        .collect();
    assert_eq!(states, [("nh", "valid"), ("niko", "no_token")]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_password_account_logs_in_once_at_once_and_a_wrong_password_is_reported() {
    let sandbox = sandbox(Duration::from_secs(3600)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = common::write_config(
        dir.path(),
        &format!(
            "[agent]\n{}{}",
            common::database_lines("ehrsync.db"),
            sandbox.account_config(Vendor::Nextech, "nx")
        ),
    );
    let (exit, stdout, stderr) = Login::start(
        &config,
        &["nx"],
        &[("SANDBOX_NEXTECH_PASSWORD", "not-it-7c1d")],
    )
    .finish(Duration::from_secs(20));
    assert_eq!(exit.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stderr.contains("AADSTS50126"), "{stderr}");
    assert!(
        !stderr.contains("not-it-7c1d") && !stdout.contains("not-it-7c1d"),
        "the password in the output: {stderr}"
    );

    let (exit, stdout, stderr) =
        Login::start(&config, &["nx"], &[]).finish(Duration::from_secs(20));
    assert!(exit.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("Logged in: account nx"), "{stdout}");
    assert!(stdout.contains("refresh token expires"), "{stdout}");
    assert_eq!(sandbox.requests(Vendor::Nextech, "password"), 2);
    let store = ehrsync::store::Store::open(common::database_of(&config))
        .await
        .unwrap();
    let record = store.load_token("nx").await.unwrap().unwrap();
    store.close().await;
    assert_eq!(record.state, "valid");
}
