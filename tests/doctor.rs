//! `ehrsync doctor`: the real binary against the sandbox on loopback. Each failure is named at
//! its step with its fix, a password or secret is tried at most once, and nothing is stored.

mod common;

use std::path::Path;
use std::time::Duration;

use ehrsync::sandbox::{self, ApiFault, Sandbox};
use ehrsync::vendor::Vendor;

/// A config in `dir` with `accounts` (sections as [`Sandbox::account_config`] writes them).
fn config(dir: &Path, accounts: &str) -> String {
    let text = format!(
        "[agent]\n{}{accounts}",
        common::database_lines("state/ehrsync.db")
    );
    let path = common::write_config(dir, &text);
    path.to_str().unwrap().to_owned()
}

fn doctor(config: &str, account: Option<&str>, env: &[(&str, &str)]) -> common::Run {
    let mut args = vec!["--config", config, "doctor"];
    args.extend(account);
    common::ehrsync(&args, env)
}

/// The line of `step` that failed, panicking with the output when there is none.
fn failed_line<'a>(run: &'a common::Run, step: &str) -> &'a str {
    let mark = format!("✗ {step} ");
    run.stdout
        .lines()
        .find(|l| l.trim_start().starts_with(&mark))
        .unwrap_or_else(|| panic!("no failed {step} step:\n{}\n{}", run.stdout, run.stderr))
}

/// Every secret the sandbox's accounts use, and every token it issued.
fn secrets(sandbox: &Sandbox) -> Vec<String> {
    let mut all: Vec<String> = sandbox::credentials_env()
        .into_iter()
        .map(|(_, v)| v.to_owned())
        .collect();
    all.extend(sandbox.issued_tokens());
    all
}

fn assert_no_secret(run: &common::Run, sandbox: &Sandbox) {
    let secrets = secrets(sandbox);
    let refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
    run.assert_absent(&refs);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_step_passes_for_nextech_nikohealth_and_carecentric_accounts() {
    let sandbox = common::sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        dir.path(),
        &format!(
            "{}[[accounts.nx.jobs]]\nname = 'patients'\nkind = 'fhir'\nschedule = '0 0 3 * * *'\n\
             {}[[accounts.niko.jobs]]\nname = 'patients'\nkind = 'nikohealth_patients'\nschedule = '0 0 3 * * *'\n\
             {}",
            sandbox.account_config(Vendor::Nextech, "nx"),
            sandbox.account_config(Vendor::NikoHealth, "niko"),
            sandbox.account_config(Vendor::CareCentric, "cc"),
        ),
    );
    let env = sandbox::credentials_env();
    let run = doctor(&config, None, &env);
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    assert!(!run.stdout.contains('✗'), "{}", run.stdout);
    for step in ["config", "DNS", "TCP", "token", "API", "clock"] {
        let passed = run
            .stdout
            .lines()
            .filter(|l| l.trim_start().starts_with(&format!("✓ {step} ")))
            .count();
        assert_eq!(passed, 3, "{step}:\n{}", run.stdout);
    }
    assert!(
        run.stdout.contains("/nextech/api/metadata: HTTP 200"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("/api/external/v1/patients: HTTP 200"),
        "the list job's first page:\n{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("all checks passed (3 accounts)"),
        "{}",
        run.stdout
    );
    // One token request per account, and nothing stored: no database was created.
    for vendor in [Vendor::Nextech, Vendor::NikoHealth, Vendor::CareCentric] {
        assert_eq!(sandbox.total_requests(vendor), 1, "{vendor:?}");
    }
    assert!(!dir.path().join("state/ehrsync.db").exists());
    assert_no_secret(&run, &sandbox);

    // With a token the agent (here `login`) stored, doctor uses it and asks for none.
    let login = common::ehrsync(&["--config", &config, "login", "nx"], &env);
    assert_eq!(login.code, Some(0), "{}", login.stderr);
    assert_eq!(sandbox.total_requests(Vendor::Nextech), 2);
    let run = doctor(&config, Some("nx"), &env);
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("using the stored access token"),
        "{}",
        run.stdout
    );
    assert_eq!(sandbox.total_requests(Vendor::Nextech), 2, "no request");
    assert!(
        !run.stdout.contains("niko"),
        "only the named account:\n{}",
        run.stdout
    );
    assert_no_secret(&run, &sandbox);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_client_secret_fails_at_the_token_step_after_one_request() {
    let sandbox = common::sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        dir.path(),
        &sandbox.account_config(Vendor::NikoHealth, "niko"),
    );
    let mut env = sandbox::credentials_env();
    env.retain(|(k, _)| *k != "SANDBOX_NIKOHEALTH_SECRET");
    env.push(("SANDBOX_NIKOHEALTH_SECRET", "a-wrong-secret-4711"));
    let run = doctor(&config, Some("niko"), &env);
    assert_eq!(run.code, Some(1), "{}\n{}", run.stdout, run.stderr);
    let line = failed_line(&run, "token");
    assert!(line.contains("invalid_client"), "{line}");
    assert!(line.contains("client_secret"), "names the fix: {line}");
    assert!(run.stdout.contains("- API"), "{}", run.stdout);
    assert_eq!(
        sandbox.total_requests(Vendor::NikoHealth),
        1,
        "exactly one try"
    );
    assert!(
        run.stdout.contains("problems found for: niko"),
        "{}",
        run.stdout
    );
    run.assert_absent(&["a-wrong-secret-4711"]);
    assert_no_secret(&run, &sandbox);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_closed_port_fails_at_the_tcp_step_naming_the_address() {
    let sandbox = common::sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let section = sandbox.account_config(Vendor::NikoHealth, "niko").replace(
        sandbox.token_url(Vendor::NikoHealth).as_str(),
        &format!("http://127.0.0.1:{port}/token"),
    );
    let config = config(dir.path(), &section);
    let run = doctor(&config, None, &sandbox::credentials_env());
    assert_eq!(run.code, Some(1), "{}\n{}", run.stdout, run.stderr);
    let line = failed_line(&run, "TCP");
    assert!(line.contains(&format!("127.0.0.1:{port}")), "{line}");
    assert!(line.contains("refused"), "{line}");
    assert!(line.contains("check the address and port"), "{line}");
    assert!(run.stdout.contains("✓ DNS"), "{}", run.stdout);
    assert_eq!(sandbox.total_requests(Vendor::NikoHealth), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_the_api_refuses_fails_at_the_api_step() {
    let sandbox = common::sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &sandbox.account_config(Vendor::Nextech, "nx"));
    sandbox.inject_api(Vendor::Nextech, [ApiFault::RevokeAccessTokens]);
    let run = doctor(&config, Some("nx"), &sandbox::credentials_env());
    assert_eq!(run.code, Some(1), "{}\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("✓ token"), "{}", run.stdout);
    let line = failed_line(&run, "API");
    assert!(line.contains("HTTP 401"), "{line}");
    assert!(line.contains("refused the token"), "{line}");
    assert!(run.stdout.contains("✓ clock"), "{}", run.stdout);
    assert_no_secret(&run, &sandbox);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clock_45_seconds_off_fails_at_the_clock_step() {
    let sandbox = common::sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        dir.path(),
        &sandbox.account_config(Vendor::CareCentric, "cc"),
    );
    sandbox.skew_date(Duration::from_secs(45), true);
    let run = doctor(&config, None, &sandbox::credentials_env());
    assert_eq!(run.code, Some(1), "{}\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("✓ API"), "{}", run.stdout);
    let line = failed_line(&run, "clock");
    // The server's Date is 45 s ahead: this one's clock is behind (±1 s of rounding).
    assert!(
        ["44 s behind", "45 s behind", "46 s behind"]
            .iter()
            .any(|s| line.contains(s)),
        "{line}"
    );
    assert!(line.contains("fix NTP"), "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_authorization_code_account_without_a_login_is_told_to_log_in() {
    let sandbox = common::sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &sandbox.account_config(Vendor::NetHealth, "nh"));
    let run = doctor(&config, Some("nh"), &sandbox::credentials_env());
    assert_eq!(run.code, Some(1), "{}\n{}", run.stdout, run.stderr);
    let line = failed_line(&run, "token");
    assert!(line.contains("needs a person"), "{line}");
    assert!(line.contains(" login nh`"), "{line}");
    assert!(line.contains("ehrsync --config /"), "{line}");
    assert_eq!(
        sandbox.total_requests(Vendor::NetHealth),
        0,
        "no token request"
    );
    assert_no_secret(&run, &sandbox);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_account_is_a_usage_error() {
    let sandbox = common::sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &sandbox.account_config(Vendor::Nextech, "nx"));
    let run = doctor(&config, Some("nope"), &sandbox::credentials_env());
    assert_eq!(run.code, Some(2), "{}\n{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("no account `nope`"), "{}", run.stderr);
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread")]
async fn an_untrusted_certificate_fails_at_the_tls_step() {
    let sandbox = common::sandbox().await;
    // A TLS server whose certificate nobody issued.
    let dir = tempfile::tempdir().unwrap();
    let server = common::tls::self_signed(dir.path());
    let port = server.port;
    let section = sandbox.account_config(Vendor::NikoHealth, "niko").replace(
        sandbox.token_url(Vendor::NikoHealth).as_str(),
        &format!("https://127.0.0.1:{port}/token"),
    );
    let config = config(dir.path(), &section);
    let run = doctor(&config, None, &sandbox::credentials_env());
    drop(server);
    assert_eq!(run.code, Some(1), "{}\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("✓ TCP"), "{}", run.stdout);
    let line = failed_line(&run, "TLS");
    assert!(
        line.contains(&format!("TLS with 127.0.0.1:{port} failed")),
        "{line}"
    );
    assert!(line.contains("certificate"), "{line}");
    assert_eq!(sandbox.total_requests(Vendor::NikoHealth), 0);
}

/// A doctor run against a server whose certificate a private CA issued for `days` days, with
/// that CA as `agent.ca_file` (or not).
#[cfg(unix)]
async fn doctor_with_private_ca(days: u32, trust_it: bool) -> (common::Run, u16) {
    let sandbox = common::sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let server = common::tls::private_ca_for(dir.path(), days);
    let port = server.port;
    let section = sandbox.account_config(Vendor::NikoHealth, "niko").replace(
        sandbox.token_url(Vendor::NikoHealth).as_str(),
        &format!("https://127.0.0.1:{port}/token"),
    );
    let ca = server.ca.clone().unwrap();
    let agent = if trust_it {
        format!("ca_file = '{}'\n", ca.display())
    } else {
        String::new()
    };
    let text = format!(
        "[agent]\n{}{agent}{section}",
        common::database_lines("state/ehrsync.db")
    );
    let config = common::write_config(dir.path(), &text);
    let run = doctor(config.to_str().unwrap(), None, &sandbox::credentials_env());
    drop(server);
    (run, port)
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_from_agent_ca_file_is_trusted_and_its_days_to_expiry_shown() {
    let (run, port) = doctor_with_private_ca(90, true).await;
    let tls = run
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("✓ TLS "))
        .unwrap_or_else(|| panic!("no passed TLS step:\n{}\n{}", run.stdout, run.stderr));
    assert!(tls.contains("agent.ca_file"), "{tls}");
    // Issued a moment ago for 90 days: 89 whole days and some hours are left.
    assert!(tls.contains(" 89 days to expiry"), "{tls}");
    // `openssl s_server -www` is no token endpoint: the next step fails, naming the address.
    let token = failed_line(&run, "token");
    assert!(
        token.contains(&port.to_string()) || token.contains("127.0.0.1"),
        "{token}"
    );

    // The same server without `agent.ca_file`: its issuer is unknown to this system.
    let (run, port) = doctor_with_private_ca(90, false).await;
    let line = failed_line(&run, "TLS");
    assert!(line.contains(&format!("127.0.0.1:{port}")), "{line}");
    assert!(line.contains("certificate"), "{line}");
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_ending_within_two_weeks_fails_at_the_tls_step() {
    let (run, _) = doctor_with_private_ca(10, true).await;
    assert_eq!(run.code, Some(1), "{}\n{}", run.stdout, run.stderr);
    let line = failed_line(&run, "TLS");
    assert!(line.contains("certificate expires in 9 days"), "{line}");
    assert!(line.contains("renew"), "{line}");
    // The certificate still works for nine days: the later steps run (and fail here only
    // because `openssl s_server` is no token endpoint).
    assert!(run.stdout.contains("✗ token "), "{}", run.stdout);
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread")]
async fn an_account_parked_by_a_running_agent_is_not_tried_again() {
    let sandbox = common::sandbox().await;
    let wrong = [("SANDBOX_NIKOHEALTH_SECRET", "a-wrong-secret-4711")];
    let mut agent = common::agent::Agent::start(
        &sandbox.account_config(Vendor::NikoHealth, "niko"),
        "5s",
        &wrong,
    );
    agent
        .metrics_until("needs_login", |m| {
            m.contains("ehrsync_account_needs_login{account=\"niko\"} 1")
        })
        .await;
    assert_eq!(sandbox.total_requests(Vendor::NikoHealth), 1);
    let mut env = sandbox::credentials_env();
    env.retain(|(k, _)| *k != "SANDBOX_NIKOHEALTH_SECRET");
    env.extend(wrong);
    let config = agent.config_path();
    let run = doctor(config.to_str().unwrap(), Some("niko"), &env);
    assert_eq!(run.code, Some(1), "{}\n{}", run.stdout, run.stderr);
    let line = failed_line(&run, "token");
    assert!(line.contains("waits for a login"), "{line}");
    assert!(line.contains("client_secret"), "{line}");
    assert_eq!(
        sandbox.total_requests(Vendor::NikoHealth),
        1,
        "doctor does not try refused credentials again"
    );
    run.assert_absent(&["a-wrong-secret-4711"]);
    agent.signal("TERM");
    assert_eq!(agent.wait_exit(Duration::from_secs(20)).code(), Some(0));
}
