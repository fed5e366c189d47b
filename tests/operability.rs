//! Living with the agent: an account whose credentials were refused comes back as soon as they
//! are fixed (a reload, a restart, or just the secret file rewritten) and never retries the same
//! credentials in a loop; `status` knows whether an agent is running. The real binary against
//! the sandbox.
#![cfg(unix)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ehrsync::clock::SystemClock;
use ehrsync::sandbox::{self, Lifetimes, NIKOHEALTH_CREDENTIALS, Sandbox};
use ehrsync::vendor::Vendor;

use common::agent::Agent;

const ACCOUNT: &str = "niko";

fn write_secret(path: &Path, value: &str) {
    std::fs::write(path, format!("{value}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A NikoHealth account whose client secret is read from `secret` (an absolute path).
fn niko_config(sandbox: &Sandbox, secret: &Path) -> String {
    sandbox.account_config(Vendor::NikoHealth, ACCOUNT).replace(
        "client_secret = { env = 'SANDBOX_NIKOHEALTH_SECRET' }",
        &format!("client_secret = {{ file = '{}' }}", secret.display()),
    )
}

struct Parked {
    sandbox: Sandbox,
    agent: Agent,
    secret: PathBuf,
    _secret_dir: tempfile::TempDir,
}

/// An agent whose NikoHealth account was refused a wrong client secret and is parked in
/// `needs_login` (one token request so far).
async fn parked() -> Parked {
    let sandbox = common::sandbox().await;
    let secret_dir = tempfile::tempdir().unwrap();
    let secret = secret_dir.path().join("niko.secret");
    write_secret(&secret, "a-wrong-secret");
    let agent = Agent::start(&niko_config(&sandbox, &secret), "5s", &[]);
    agent
        .metrics_until("needs_login", |m| {
            m.contains("ehrsync_account_needs_login{account=\"niko\"} 1")
        })
        .await;
    assert_eq!(sandbox.total_requests(Vendor::NikoHealth), 1);
    Parked {
        sandbox,
        agent,
        secret,
        _secret_dir: secret_dir,
    }
}

fn status(agent: &Agent, json: bool) -> common::Run {
    let config = agent.config_path();
    let mut args = vec!["--config", config.to_str().unwrap(), "status"];
    if json {
        args.push("--json");
    }
    common::ehrsync(&args, &[])
}

async fn wait_valid(agent: &Agent) {
    agent
        .metrics_until("a valid token", |m| {
            m.contains("ehrsync_token_valid{account=\"niko\"} 1")
                && m.contains("ehrsync_account_needs_login{account=\"niko\"} 0")
        })
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fixed_secret_and_a_reload_bring_the_account_back_at_once() {
    let mut p = parked().await;
    // Status advises fixing the credentials, not a person's login.
    let shown = status(&p.agent, false);
    assert!(
        shown
            .stdout
            .contains("its credentials were refused: fix `accounts.niko.client_secret`"),
        "{}",
        shown.stdout
    );
    assert!(!shown.stdout.contains("needs a person"), "{}", shown.stdout);
    // A reload with the same secret tries nothing (the vendor would lock the account).
    p.agent.signal("HUP");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(p.sandbox.total_requests(Vendor::NikoHealth), 1);

    write_secret(&p.secret, NIKOHEALTH_CREDENTIALS.client_secret);
    p.agent.signal("HUP");
    wait_valid(&p.agent).await;
    assert_eq!(
        p.sandbox.total_requests(Vendor::NikoHealth),
        2,
        "one request with the fixed secret"
    );
    assert!(p.agent.log().contains("changed since they were refused"));
    p.agent.signal("TERM");
    p.agent.wait_exit(Duration::from_secs(20));
    shown_no_secret(&p.agent);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fixed_secret_and_a_restart_bring_the_account_back_at_once() {
    let mut p = parked().await;
    p.agent.signal("TERM");
    assert_eq!(p.agent.wait_exit(Duration::from_secs(20)).code(), Some(0));
    // A restart with the same secret waits for login_retry.
    p.agent.restart();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(p.sandbox.total_requests(Vendor::NikoHealth), 1);
    p.agent.signal("TERM");
    p.agent.wait_exit(Duration::from_secs(20));

    write_secret(&p.secret, NIKOHEALTH_CREDENTIALS.client_secret);
    p.agent.restart();
    wait_valid(&p.agent).await;
    assert_eq!(p.sandbox.total_requests(Vendor::NikoHealth), 2);
    p.agent.signal("TERM");
    p.agent.wait_exit(Duration::from_secs(20));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_secret_file_fixed_on_disk_is_noticed_without_a_reload() {
    let mut p = parked().await;
    // Rewritten with the same wrong value: nothing to try.
    write_secret(&p.secret, "a-wrong-secret");
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(p.sandbox.total_requests(Vendor::NikoHealth), 1);

    write_secret(&p.secret, NIKOHEALTH_CREDENTIALS.client_secret);
    let since = Instant::now();
    wait_valid(&p.agent).await;
    assert!(since.elapsed() < Duration::from_secs(15));
    assert_eq!(p.sandbox.total_requests(Vendor::NikoHealth), 2);
    // Fixed again to a wrong one later: refused once more, then it waits (no loop).
    p.agent.signal("TERM");
    p.agent.wait_exit(Duration::from_secs(20));
}

fn shown_no_secret(agent: &Agent) {
    let log = agent.log();
    for secret in ["a-wrong-secret", NIKOHEALTH_CREDENTIALS.client_secret] {
        assert!(!log.contains(secret), "{secret} in the log");
    }
    for (_, secret) in sandbox::credentials_env() {
        assert!(!log.contains(secret), "a sandbox secret in the log");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn status_knows_whether_an_agent_is_running() {
    let sandbox = Sandbox::start(Arc::new(SystemClock), Lifetimes::scaled_down(60), 0)
        .await
        .unwrap();
    let config = format!(
        "{}[[accounts.niko.jobs]]\nname = 'patients'\nkind = 'nikohealth_patients'\n\
         schedule = '0 0 0 1 1 *'\n",
        sandbox.account_config(Vendor::NikoHealth, ACCOUNT)
    );
    let mut agent = Agent::start(&config, "5s", &[]);
    agent.wait_ready().await;
    let live = status(&agent, false);
    let pid = agent.child.id();
    assert!(
        live.stdout
            .contains(&format!("agent: running (pid {pid}, host ")),
        "{}",
        live.stdout
    );
    let json: serde_json::Value = serde_json::from_str(&status(&agent, true).stdout).unwrap();
    assert_eq!(json["agents"][0]["running"], true, "{json}");
    assert_eq!(json["agents"][0]["pid"], pid);

    // A clean stop removes the agent's row.
    agent.signal("TERM");
    assert_eq!(agent.wait_exit(Duration::from_secs(20)).code(), Some(0));
    let stopped = status(&agent, false);
    assert!(
        stopped.stdout.contains("agent: not running\n"),
        "{}",
        stopped.stdout
    );
    let json: serde_json::Value = serde_json::from_str(&status(&agent, true).stdout).unwrap();
    assert_eq!(json["agents"], serde_json::json!([]), "{json}");
    // With no agent, the next run is nobody's to make.
    assert!(
        stopped.stdout.contains("no agent is running"),
        "{}",
        stopped.stdout
    );

    // kill -9: the row stays, but its process is gone from this host.
    agent.restart();
    agent.wait_ready().await;
    let pid = agent.child.id();
    agent.signal("KILL");
    agent.wait_exit(Duration::from_secs(5));
    let killed = status(&agent, false);
    assert!(
        killed.stdout.contains(&format!(
            "agent: not running (last seen 0s ago: pid {pid} on host"
        )) || killed.stdout.contains(&format!("s ago: pid {pid} on host")),
        "{}",
        killed.stdout
    );
    assert!(killed.stdout.contains("did not stop cleanly"));
    let json: serde_json::Value = serde_json::from_str(&status(&agent, true).stdout).unwrap();
    assert_eq!(json["agents"][0]["running"], false, "{json}");
}

/// `ehrsync sync niko patients` for a NikoHealth account whose token endpoint is `token_url`
/// and whose job waits at most 3 s for a token.
fn sync_with_token_url(sandbox: &Sandbox, token_url: &str) -> common::Run {
    sync_with(sandbox, token_url, None, &[])
}

/// [`sync_with_token_url`], trusting `ca` (`agent.ca_file`) and with `env` added.
fn sync_with(
    sandbox: &Sandbox,
    token_url: &str,
    ca: Option<&Path>,
    env: &[(&str, &str)],
) -> common::Run {
    let dir = tempfile::tempdir().unwrap();
    let account = sandbox.account_config(Vendor::NikoHealth, ACCOUNT).replace(
        &format!("token_url = '{}'", sandbox.token_url(Vendor::NikoHealth)),
        &format!("token_url = '{token_url}'"),
    );
    assert!(account.contains(token_url), "{account}");
    let ca = ca.map_or_else(String::new, |ca| format!("ca_file = '{}'\n", ca.display()));
    let config = format!(
        "[agent]\n{}{ca}{account}[[accounts.niko.jobs]]\nname = 'patients'\n\
         kind = 'nikohealth_patients'\nschedule = '0 0 0 1 1 *'\ntoken_wait = '3s'\n",
        common::database_lines("ehrsync.db")
    );
    let path = common::write_config(dir.path(), &config);
    let mut all_env = sandbox::credentials_env();
    all_env.extend_from_slice(env);
    let run = common::ehrsync(
        &[
            "--config",
            path.to_str().unwrap(),
            "sync",
            ACCOUNT,
            "patients",
        ],
        &all_env,
    );
    run.assert_absent(&[NIKOHEALTH_CREDENTIALS.client_secret]);
    run
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_endpoint_that_refuses_connections_fails_the_run_naming_host_and_port() {
    let sandbox = common::sandbox().await;
    let port = common::free_port();
    let since = Instant::now();
    let run = sync_with_token_url(&sandbox, &format!("http://127.0.0.1:{port}/token"));
    assert_eq!(run.code, Some(1), "{}\n{}", run.stdout, run.stderr);
    assert!(
        since.elapsed() < Duration::from_secs(30),
        "bounded by token_wait"
    );
    let line = run.stdout.trim();
    assert!(line.starts_with("niko/patients: failed"), "{line}");
    assert!(line.contains("within 3s (token_wait)"), "{line}");
    assert!(
        line.contains(&format!("connection refused by 127.0.0.1:{port}")),
        "{line}"
    );
    assert!(line.contains("check the address and port"), "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_endpoint_with_an_untrusted_certificate_fails_naming_the_certificate_problem() {
    let sandbox = common::sandbox().await;
    // A TLS server whose certificate nobody issued.
    let dir = tempfile::tempdir().unwrap();
    let server = common::tls::self_signed(dir.path());
    let port = server.port;
    let run = sync_with_token_url(&sandbox, &format!("https://127.0.0.1:{port}/token"));
    drop(server);
    assert_eq!(run.code, Some(1), "{}\n{}", run.stdout, run.stderr);
    let line = run.stdout.trim();
    assert!(
        line.contains(&format!("TLS with 127.0.0.1:{port} failed")),
        "{line}"
    );
    assert!(line.contains("certificate"), "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn check_config_ends_with_the_hosts_a_firewall_must_allow() {
    let sandbox = common::sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{}{}",
        sandbox.account_config(Vendor::NikoHealth, ACCOUNT),
        sandbox.account_config(Vendor::NetHealth, "nh")
    );
    let path = common::write_config(dir.path(), &config);
    let run = common::ehrsync(
        &["--config", path.to_str().unwrap(), "check-config"],
        &sandbox::credentials_env(),
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let list = run
        .stdout
        .split("outbound connections (the firewall allow-list):\n")
        .nth(1)
        .unwrap_or_else(|| panic!("no host list:\n{}", run.stdout));
    // One loopback host:port serves every emulated vendor: one line, every use.
    let line = list.lines().next().unwrap();
    assert!(line.starts_with(&format!("  {}", sandbox.addr())), "{list}");
    for use_ in [
        "niko: token endpoint",
        "niko: API",
        "nh: OpenID discovery",
        "nh: API",
    ] {
        assert!(line.contains(use_), "{use_} in {line}");
    }
    run.assert_absent(&[NIKOHEALTH_CREDENTIALS.client_secret]);
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_ca_file_trusts_a_private_certificate_authority() {
    let sandbox = common::sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let server = common::tls::private_ca(dir.path());
    let (port, ca) = (server.port, server.ca.clone().unwrap());
    let token_url = format!("https://127.0.0.1:{port}/token");
    let without = sync_with(&sandbox, &token_url, None, &[]);
    let with = sync_with(&sandbox, &token_url, Some(&ca), &[]);
    drop(server);
    assert!(
        without
            .stdout
            .contains(&format!("TLS with 127.0.0.1:{port} failed")),
        "{}",
        without.stdout
    );
    // With the CA trusted the handshake succeeds; `s_server` is no token endpoint, so the run
    // still fails, at the answer rather than at TLS.
    assert_eq!(with.code, Some(1));
    assert!(
        !with.stdout.contains("TLS with"),
        "{}\n{}",
        with.stdout,
        with.stderr
    );
    assert!(
        with.stderr
            .contains("trusting the extra certificate authorities"),
        "{}",
        with.stderr
    );
}

/// A machine without the `ca-certificates` package (a minimal install, a slim container image):
/// rustls finds no system roots. Found walking through the README on a bare Debian root, where
/// every command failed with only "cannot set up the HTTP client: builder error".
#[tokio::test(flavor = "multi_thread")]
async fn a_machine_without_ca_certificates_is_told_to_install_them_or_set_agent_ca_file() {
    let sandbox = common::sandbox().await;
    // rustls-native-certs reads only these when they are set.
    let no_roots = [
        ("SSL_CERT_FILE", "/nonexistent/ca-certificates.crt"),
        ("SSL_CERT_DIR", "/nonexistent/certs"),
    ];
    let token_url = sandbox.token_url(Vendor::NikoHealth).to_string();
    let run = sync_with(&sandbox, &token_url, None, &no_roots);
    assert_eq!(run.code, Some(1), "{}\n{}", run.stdout, run.stderr);
    let line = run
        .stderr
        .lines()
        .find(|l| l.contains("cannot set up the HTTP client"))
        .unwrap_or_else(|| panic!("no setup error:\n{}", run.stderr));
    assert!(line.contains("no CA certificates were found"), "{line}");
    assert!(line.contains("apt install ca-certificates"), "{line}");
    assert!(line.contains("agent.ca_file"), "{line}");
    assert_eq!(sandbox.total_requests(Vendor::NikoHealth), 0);

    // agent.ca_file alone is enough: the pull over plain http to loopback succeeds.
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, common::tls::ca_pem(dir.path())).unwrap();
    let run = sync_with(&sandbox, &token_url, Some(&ca), &no_roots);
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("success"), "{}", run.stdout);
}

/// A CONNECT proxy on loopback: it tunnels every `CONNECT host:port` it is asked for and
/// records the targets.
async fn connect_proxy() -> (u16, Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let mut client = BufReader::new(client);
                let mut head = String::new();
                client.read_line(&mut head).await.ok()?;
                let target = head.strip_prefix("CONNECT ")?.split(' ').next()?.to_owned();
                loop {
                    let mut line = String::new();
                    client.read_line(&mut line).await.ok()?;
                    if line == "\r\n" || line.is_empty() {
                        break;
                    }
                }
                record.lock().unwrap().push(target.clone());
                let mut upstream = tokio::net::TcpStream::connect(&target).await.ok()?;
                let mut client = client.into_inner();
                client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .ok()?;
                tokio::io::copy_bidirectional(&mut client, &mut upstream)
                    .await
                    .ok()
            });
        }
    });
    (port, seen)
}

#[tokio::test(flavor = "multi_thread")]
async fn https_proxy_carries_token_requests_and_no_proxy_bypasses_it() {
    let sandbox = common::sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let server = common::tls::private_ca(dir.path());
    let port = server.port;
    let (proxy_port, seen) = connect_proxy().await;
    let token_url = format!("https://127.0.0.1:{port}/token");
    let ca = server.ca.clone().unwrap();
    let proxy = format!("http://127.0.0.1:{proxy_port}");
    let env = [("HTTPS_PROXY", proxy.as_str())];
    let through = sync_with(&sandbox, &token_url, Some(&ca), &env);
    let tunnelled = seen.lock().unwrap().clone();
    assert!(
        tunnelled.contains(&format!("127.0.0.1:{port}")),
        "the token request went through the proxy: {tunnelled:?}\n{}\n{}",
        through.stdout,
        through.stderr
    );
    // The tunnel carried a TLS handshake that succeeded (the CA is trusted).
    assert!(!through.stdout.contains("TLS with"), "{}", through.stdout);

    seen.lock().unwrap().clear();
    let env = [("HTTPS_PROXY", proxy.as_str()), ("NO_PROXY", "127.0.0.1")];
    let _direct = sync_with(&sandbox, &token_url, Some(&ca), &env);
    drop(server);
    assert!(
        seen.lock().unwrap().is_empty(),
        "NO_PROXY bypasses the proxy"
    );
}
