//! The token broker of a real `ehrsync run` against the vendor sandbox, over its Unix socket:
//! tokens for allowed clients only, the API proxy (headers added, a 401 retried, a rotation
//! mid-stream survived, escapes refused), socket permissions, token files, `ehrsync token`,
//! and no token or key in the log (at trace level), `status` or the status page.
#![cfg(unix)]

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ehrsync::sandbox::{ApiFault, Sandbox};
use ehrsync::vendor::Vendor;

use common::agent::Agent;

const REPORTS_KEY: &str = "reports-key-6f1c0b9e2d7a4c58";
const NICHE_KEY: &str = "niche-key-83a2e5d91b4f7c06";
const WRONG_KEY: &str = "not-a-client-key-0000000000";

/// The agent's config: accounts `nx` (Nextech, with `nx_extra` in its table) and `cc`
/// (CareCentric), and a broker on `broker.sock` in the config's directory (with
/// `broker_extra` in its table) for two clients.
fn config(sandbox: &Sandbox, nx_extra: &str, broker_extra: &str) -> String {
    format!(
        "{}{nx_extra}{}\n[broker]\nlisten = 'unix:broker.sock'\n{broker_extra}\
         [broker.clients.reports]\nkey = {{ env = 'REPORTS_KEY' }}\naccounts = ['nx']\n\
         [broker.clients.niche]\nkey = {{ env = 'NICHE_KEY' }}\naccounts = ['cc']\n\
         endpoints = ['api']\nread_only = true\n",
        sandbox.account_config(Vendor::Nextech, "nx"),
        sandbox.account_config(Vendor::CareCentric, "cc"),
    )
}

fn start(sandbox: &Sandbox, nx_extra: &str, broker_extra: &str, log_level: &str) -> Agent {
    Agent::start(
        &config(sandbox, nx_extra, broker_extra),
        "5s",
        &[
            ("REPORTS_KEY", REPORTS_KEY),
            ("NICHE_KEY", NICHE_KEY),
            ("EHRSYNC_LOG", log_level),
        ],
    )
}

fn socket(agent: &Agent) -> PathBuf {
    agent.dir.path().join("broker.sock")
}

/// A client of the broker's socket.
fn client(socket: &Path) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .unix_socket(socket)
        .timeout(Duration::from_secs(40))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

async fn get(socket: &Path, path: &str, key: Option<&str>) -> (u16, String) {
    let mut request = client(socket).get(format!("http://broker{path}"));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// Sends `target` byte for byte (no client-side URL normalisation) and returns the status.
fn raw_status(socket: &Path, method: &str, target: &str, key: &str) -> u16 {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(
        stream,
        "{method} {target} HTTP/1.1\r\nHost: broker\r\nAuthorization: Bearer {key}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"))
}

async fn wait_for_socket(agent: &Agent) {
    agent.wait_ready().await;
    let since = Instant::now();
    while !socket(agent).exists() {
        assert!(since.elapsed() < Duration::from_secs(10), "no socket");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_get_only_their_accounts_tokens() {
    // 30-second Nextech tokens: the owner refreshes 15 s before expiry; min_valid can ask
    // for an early one once a token is 3 s old.
    let sandbox = Sandbox::start(
        std::sync::Arc::new(ehrsync::clock::SystemClock),
        ehrsync::sandbox::Lifetimes {
            nextech_access: Duration::from_secs(30),
            ..ehrsync::sandbox::Lifetimes::documented()
        },
        0,
    )
    .await
    .unwrap();
    let agent = start(&sandbox, "", "", "trace");
    wait_for_socket(&agent).await;
    let sock = socket(&agent);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "the socket's mode");

    let (status, body) = get(&sock, "/v1/health", None).await;
    assert_eq!((status, json(&body)["status"].as_str()), (200, Some("ok")));
    let (status, body) = get(&sock, "/v1/health", Some(REPORTS_KEY)).await;
    assert_eq!(status, 200);
    assert_eq!(json(&body)["client"], "reports");
    assert_eq!(json(&body)["accounts"][0]["account"], "nx");

    let (status, body) = get(&sock, "/v1/accounts/nx/token", Some(REPORTS_KEY)).await;
    assert_eq!(status, 200, "{body}");
    let token = json(&body);
    let access = token["access_token"].as_str().unwrap().to_owned();
    assert!(
        sandbox.access_token_valid(&access),
        "the sandbox accepts it"
    );
    assert_eq!(token["token_type"], "Bearer");
    assert_eq!(token["headers"]["nx-practice-id"], "1001");
    assert!(token["expires_in"].as_u64().unwrap() > 20, "{body}");

    // Refused: no key, a wrong key, an account not allowed, one that does not exist, and an
    // endpoint the client may not use. Forbidden answers say nothing of what exists.
    assert_eq!(get(&sock, "/v1/accounts/nx/token", None).await.0, 401);
    assert_eq!(
        get(&sock, "/v1/accounts/nx/token", Some(WRONG_KEY)).await.0,
        401
    );
    let other = get(&sock, "/v1/accounts/cc/token", Some(REPORTS_KEY)).await;
    let missing = get(&sock, "/v1/accounts/nope/token", Some(REPORTS_KEY)).await;
    assert_eq!(other.0, 403);
    assert_eq!(
        other, missing,
        "a forbidden account looks like a missing one"
    );
    assert_eq!(
        get(&sock, "/v1/accounts/cc/token", Some(NICHE_KEY)).await.0,
        403,
        "niche may only use the proxy"
    );
    assert_eq!(
        get(
            &sock,
            "/v1/accounts/nx/token?min_valid=2h",
            Some(REPORTS_KEY)
        )
        .await
        .0,
        422,
        "longer than the tokens live"
    );
    assert_eq!(
        get(
            &sock,
            "/v1/accounts/nx/token?min_valid=30s",
            Some(REPORTS_KEY)
        )
        .await
        .0,
        422,
        "the token is too young to be refreshed early"
    );
    assert_eq!(
        get(
            &sock,
            "/v1/accounts/nx/token?min_valid=soon",
            Some(REPORTS_KEY)
        )
        .await
        .0,
        400
    );

    // min_valid near the lifetime: one early refresh, however many clients ask.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let refreshes = sandbox.total_requests(Vendor::Nextech);
    let asks = (0..8).map(|_| {
        let sock = sock.clone();
        tokio::spawn(async move {
            get(
                &sock,
                "/v1/accounts/nx/token?min_valid=27s",
                Some(REPORTS_KEY),
            )
            .await
        })
    });
    let mut fresh = Vec::new();
    for ask in asks {
        let (status, body) = ask.await.unwrap();
        assert_eq!(status, 200, "{body}");
        let t = json(&body);
        assert!(t["expires_in"].as_u64().unwrap() >= 27, "{body}");
        fresh.push(t["access_token"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        sandbox.total_requests(Vendor::Nextech),
        refreshes + 1,
        "one early refresh for eight clients"
    );
    fresh.dedup();
    assert_eq!(fresh.len(), 1, "all eight got the new token");
    assert_ne!(fresh[0], access);

    // A client whose token the API refused reports it and gets the next one (one refresh).
    let refused = json(
        &get(&sock, "/v1/accounts/nx/token", Some(REPORTS_KEY))
            .await
            .1,
    );
    let before = sandbox.total_requests(Vendor::Nextech);
    let path = format!(
        "/v1/accounts/nx/token?unauthorized={}",
        refused["generation"].as_u64().unwrap()
    );
    let (status, body) = get(&sock, &path, Some(REPORTS_KEY)).await;
    assert_eq!(status, 200, "{body}");
    let next = json(&body);
    assert_ne!(next["access_token"], refused["access_token"]);
    assert!(next["generation"].as_u64() > refused["generation"].as_u64());
    // The same report again, about a token already replaced: no second refresh.
    let (status, again) = get(&sock, &path, Some(REPORTS_KEY)).await;
    assert_eq!(status, 200);
    assert_eq!(json(&again)["access_token"], next["access_token"]);
    assert_eq!(sandbox.total_requests(Vendor::Nextech), before + 1);

    let metrics = agent
        .metrics_until("broker counts", |m| {
            m.contains("ehrsync_broker_requests_total{account=\"nx\",client=\"reports\",endpoint=\"token\",outcome=\"granted\"} 12")
        })
        .await;
    for line in [
        "ehrsync_broker_requests_total{account=\"\",client=\"\",endpoint=\"token\",outcome=\"unauthorized\"} 2",
        "ehrsync_broker_requests_total{account=\"\",client=\"reports\",endpoint=\"token\",outcome=\"forbidden\"} 2",
        "ehrsync_broker_requests_total{account=\"nx\",client=\"reports\",endpoint=\"token\",outcome=\"bad_request\"} 3",
    ] {
        assert!(metrics.contains(line), "missing {line} in:\n{metrics}");
    }
    assert!(
        !metrics.contains("nope"),
        "a client's made-up account is no label"
    );

    // The status page and `ehrsync status` list the clients, never a token or key.
    let (_, page) = agent.get("/").await.unwrap();
    assert!(page.contains("id=\"client-reports\""), "{page}");
    tokio::time::sleep(ehrsync::broker::USAGE_FLUSH + Duration::from_secs(1)).await;
    let status = common::ehrsync(
        &["--config", agent.config_path().to_str().unwrap(), "status"],
        &[],
    );
    assert!(status.stdout.contains("reports"), "{}", status.stdout);
    assert!(status.stdout.contains("broker: unix:"), "{}", status.stdout);

    let mut secrets: Vec<String> = sandbox.issued_tokens();
    secrets.extend([REPORTS_KEY, NICHE_KEY].map(str::to_owned));
    let log = agent.log();
    assert!(log.contains("broker token request"), "grants are logged");
    for s in &secrets {
        assert!(!log.contains(s.as_str()), "a secret reached the log");
        assert!(!page.contains(s.as_str()), "a secret reached the page");
        assert!(
            !status.stdout.contains(s.as_str()),
            "a secret reached status"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_proxy_adds_the_token_and_stays_below_api_base() {
    let sandbox = common::sandbox().await;
    sandbox.set_patients(40);
    let agent = start(&sandbox, "", "", "debug");
    wait_for_socket(&agent).await;
    let sock = socket(&agent);
    let http = client(&sock);

    // A FHIR page: the token and nx-practice-id added (the sandbox refuses a call without
    // either), the client's own practice header replaced.
    let page = http
        .get("http://broker/v1/accounts/nx/api/Patient?_count=5")
        .bearer_auth(REPORTS_KEY)
        .header("nx-practice-id", "9999")
        .send()
        .await
        .unwrap();
    assert_eq!(page.status().as_u16(), 200);
    let bundle = json(&page.text().await.unwrap());
    assert_eq!(bundle["entry"].as_array().unwrap().len(), 5);

    // A 401: reported, one refresh, the call repeated once.
    let refreshes = sandbox.total_requests(Vendor::Nextech);
    sandbox.inject_api(Vendor::Nextech, [ApiFault::RevokeAccessTokens]);
    let (status, body) = get(
        &sock,
        "/v1/accounts/nx/api/Patient?_count=3",
        Some(REPORTS_KEY),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["entry"].as_array().unwrap().len(), 3);
    assert_eq!(sandbox.total_requests(Vendor::Nextech), refreshes + 1);

    // A slow answer keeps streaming while the token rotates under it.
    sandbox.inject_api(
        Vendor::Nextech,
        [
            ApiFault::Trickle {
                chunks: 8,
                pause: Duration::from_millis(250),
            },
            ApiFault::RevokeAccessTokens,
        ],
    );
    let slow = {
        let http = http.clone();
        tokio::spawn(async move {
            let r = http
                .get("http://broker/v1/accounts/nx/api/Patient?_count=20")
                .bearer_auth(REPORTS_KEY)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (status, _) = get(
        &sock,
        "/v1/accounts/nx/api/Patient?_count=1",
        Some(REPORTS_KEY),
    )
    .await;
    assert_eq!(
        status, 200,
        "the call that met the revoked token was retried"
    );
    let (status, body) = slow.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(json(&body)["entry"].as_array().unwrap().len(), 20);
    assert_eq!(sandbox.total_requests(Vendor::Nextech), refreshes + 2);

    // Escapes are refused before anything reaches the vendor.
    let before = sandbox.api_requests(Vendor::Nextech);
    for target in [
        "/v1/accounts/nx/api/../oauth2/token",
        "/v1/accounts/nx/api/Patient/../../x",
        "/v1/accounts/nx/api/%2e%2e/x",
        "/v1/accounts/nx/api/%2E%2E%2Fx",
        "/v1/accounts/nx/api//evil.example/x",
        "/v1/accounts/nx/api/https://evil.example/x",
        "/v1/accounts/nx/api/https:%2f%2fevil.example/x",
        "/v1/accounts/nx/api/Patient%5c..%5cx",
    ] {
        assert_eq!(
            raw_status(&sock, "GET", target, REPORTS_KEY),
            400,
            "{target}"
        );
    }
    // An absolute-form request target is not a broker path at all.
    assert_eq!(
        raw_status(&sock, "GET", "http://evil.example/x", REPORTS_KEY),
        404
    );
    assert_eq!(
        sandbox.api_requests(Vendor::Nextech),
        before,
        "nothing was sent"
    );

    // Redirects: off the origin refused, within api_base passed on through the broker.
    sandbox.inject_api(
        Vendor::Nextech,
        [ApiFault::Redirect("https://evil.example/steal".to_owned())],
    );
    let (status, body) = get(&sock, "/v1/accounts/nx/api/Patient", Some(REPORTS_KEY)).await;
    assert_eq!(status, 502, "{body}");
    let inside = format!("{}/Patient?_count=2", sandbox.api_base(Vendor::Nextech));
    sandbox.inject_api(Vendor::Nextech, [ApiFault::Redirect(inside)]);
    let moved = http
        .get("http://broker/v1/accounts/nx/api/Patient")
        .bearer_auth(REPORTS_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(moved.status().as_u16(), 302);
    assert_eq!(
        moved.headers()["location"],
        "/v1/accounts/nx/api/Patient?_count=2"
    );

    // A read-only client may not write; nor use an account it was not given.
    assert_eq!(
        raw_status(&sock, "POST", "/v1/accounts/cc/api/Patient", NICHE_KEY),
        403
    );
    assert_eq!(
        raw_status(&sock, "GET", "/v1/accounts/nx/api/Patient", NICHE_KEY),
        403
    );
    let (status, _) = get(
        &sock,
        "/v1/accounts/cc/api/Patient?_count=1",
        Some(NICHE_KEY),
    )
    .await;
    assert_eq!(status, 200);

    let log = agent.log();
    for s in sandbox.issued_tokens() {
        assert!(!log.contains(&s), "a token reached the log");
    }
}

/// Runs `ehrsync` as user 65534 (nobody) with group `gid` and no other groups.
fn as_nobody(args: &[&str], env: &[(&str, &str)], gid: u32) -> common::Run {
    std::process::Command::new("setpriv")
        .args(["--reuid=65534", &format!("--regid={gid}"), "--clear-groups"])
        .arg(common::binary())
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .unwrap()
        .into()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_socket_admits_only_its_group() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0
        || std::process::Command::new("setpriv")
            .arg("--version")
            .output()
            .is_err()
    {
        eprintln!("skipped: needs root and setpriv to act as another user");
        return;
    }
    let Some(group) = ["nogroup", "nobody"]
        .into_iter()
        .find(|g| nix_group_exists(g))
    else {
        eprintln!("skipped: no nogroup/nobody group");
        return;
    };
    let sandbox = common::sandbox().await;
    let agent = start(&sandbox, "", &format!("socket_group = '{group}'\n"), "info");
    wait_for_socket(&agent).await;
    // The test's temporary directory must be passable for nobody to reach the socket.
    std::fs::set_permissions(agent.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = socket(&agent);
    let target = format!("unix:{}", sock.display());
    let args = ["token", "nx", "--broker", target.as_str()];
    let env = [("EHRSYNC_BROKER_KEY", REPORTS_KEY)];

    let member = as_nobody(&args, &env, 65534);
    assert_eq!(member.code, Some(0), "{}", member.stderr);
    assert!(sandbox.access_token_valid(member.stdout.trim()));

    let outsider = as_nobody(&args, &env, 100);
    assert_eq!(outsider.code, Some(1), "{}", outsider.stdout);
    assert!(
        outsider.stderr.contains("cannot reach the broker"),
        "{}",
        outsider.stderr
    );
    assert!(outsider.stdout.is_empty());
}

fn nix_group_exists(name: &str) -> bool {
    std::fs::read_to_string("/etc/group")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(':').next() == Some(name))
}

#[tokio::test(flavor = "multi_thread")]
async fn token_files_follow_rotations_and_go_with_their_account() {
    let sandbox = common::sandbox().await;
    // The directory does not exist at first: the writer keeps trying until it does.
    let files = "[[accounts.nx.token_files]]\npath = 'tokens/nx.token'\nmode = '0640'\n\
                 on_rotate = ['/usr/bin/touch', 'rotated']\n\
                 [[accounts.nx.token_files]]\npath = 'tokens/nx.json'\nformat = 'json'\n";
    let agent = start(&sandbox, files, "", "debug");
    wait_for_socket(&agent).await;
    std::fs::create_dir_all(agent.dir.path().join("tokens")).unwrap();
    let path = agent.dir.path().join("tokens/nx.token");
    let first = wait_for_file(&path, |t| sandbox.access_token_valid(t)).await;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640);
    let doc = wait_for_file(&agent.dir.path().join("tokens/nx.json"), |t| {
        t.contains(&first)
    })
    .await;
    assert_eq!(json(&doc)["access_token"], first.as_str());
    let since = Instant::now();
    while !agent.dir.path().join("tokens/rotated").exists() {
        assert!(since.elapsed() < Duration::from_secs(10), "on_rotate ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A rotation (the API refuses the token, the owner refreshes) rewrites the file.
    sandbox.inject_api(Vendor::Nextech, [ApiFault::RevokeAccessTokens]);
    let (status, _) = get(
        &socket(&agent),
        "/v1/accounts/nx/api/Patient?_count=1",
        Some(REPORTS_KEY),
    )
    .await;
    assert_eq!(status, 200);
    let second = wait_for_file(&path, |t| t != first && sandbox.access_token_valid(t)).await;
    assert_ne!(first, second);
    let json_path = agent.dir.path().join("tokens/nx.json");
    wait_for_file(&json_path, |t| t.contains(&second)).await;
    let leftovers: Vec<_> = std::fs::read_dir(agent.dir.path().join("tokens"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "no temporary files are left behind");

    // `ehrsync token` through the database and through the broker, beside the agent.
    let config_arg = agent.config_path();
    let direct = common::ehrsync(
        &["--config", config_arg.to_str().unwrap(), "token", "nx"],
        &ehrsync::sandbox::credentials_env(),
    );
    assert_eq!(direct.code, Some(0), "{}", direct.stderr);
    assert!(sandbox.access_token_valid(direct.stdout.trim()));
    let mut env = ehrsync::sandbox::credentials_env();
    env.push(("EHRSYNC_BROKER_KEY", REPORTS_KEY));
    let brokered = common::ehrsync(
        &["--config", config_arg.to_str().unwrap(), "token", "nx"],
        &env,
    );
    assert_eq!(brokered.code, Some(0), "{}", brokered.stderr);
    assert!(sandbox.access_token_valid(brokered.stdout.trim()));
    env.pop();
    env.push(("EHRSYNC_BROKER_KEY", WRONG_KEY));
    let refused = common::ehrsync(
        &["--config", config_arg.to_str().unwrap(), "token", "nx"],
        &env,
    );
    assert_eq!(refused.code, Some(1));
    assert!(refused.stderr.contains("HTTP 401"), "{}", refused.stderr);

    // The account removed from the config (and reloaded): its files go too.
    let without_nx = format!(
        "{}\n[broker]\nlisten = 'unix:broker.sock'\n[broker.clients.niche]\nkey = {{ env = 'NICHE_KEY' }}\naccounts = ['cc']\n",
        sandbox.account_config(Vendor::CareCentric, "cc")
    );
    agent.rewrite(&without_nx, "5s");
    agent.signal("HUP");
    let since = Instant::now();
    while path.exists() {
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "the token file was removed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!agent.dir.path().join("tokens/nx.json").exists());
    // The reload replaced the clients: `reports` is gone.
    assert_eq!(
        get(&socket(&agent), "/v1/health", Some(REPORTS_KEY))
            .await
            .0,
        401
    );
    assert_eq!(
        get(&socket(&agent), "/v1/health", Some(NICHE_KEY)).await.0,
        200
    );
}

/// Waits until the file at `path` holds text that satisfies `ok`, returning it.
async fn wait_for_file(path: &Path, ok: impl Fn(&str) -> bool) -> String {
    let since = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && ok(&text)
        {
            return text;
        }
        assert!(
            since.elapsed() < Duration::from_secs(15),
            "{} never held the expected token",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
