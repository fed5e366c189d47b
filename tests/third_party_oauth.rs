//! Interoperability with an OAuth2 server that is not ours: oauth2-mock-server from the npm
//! registry (installed by `.ci/test`), made strict by tests/oauth2-mock/server.mjs. Covers
//! client_credentials with HTTP Basic (its endpoint found by OpenID discovery), and the password
//! grant followed by refresh_token with one-use refresh tokens — in real time, with 4 s tokens.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use ehrsync::clock::SystemClock;
use ehrsync::config::{self, Env};
use ehrsync::token::core::State;

const CLIENT_ID: &str = "ehrsync-interop";
const CLIENT_SECRET: &str = "interop-secret-4b1e";
const USERNAME: &str = "interop-user";
const PASSWORD: &str = "interop-password-77aa";

/// The server process; killed when dropped.
struct MockServer {
    child: Child,
    issuer: String,
}

impl Drop for MockServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_mock_server() -> MockServer {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/oauth2-mock");
    assert!(
        std::path::Path::new(dir)
            .join("node_modules/oauth2-mock-server")
            .exists(),
        "oauth2-mock-server is not installed: run `bash .ci/test` (it runs `npm ci` in tests/oauth2-mock)"
    );
    let mut child = Command::new("node")
        .arg("server.mjs")
        .current_dir(dir)
        .env("MOCK_CLIENT_ID", CLIENT_ID)
        .env("MOCK_CLIENT_SECRET", CLIENT_SECRET)
        .env("MOCK_USERNAME", USERNAME)
        .env("MOCK_PASSWORD", PASSWORD)
        .env("TOKEN_TTL_SECONDS", "4")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start node (installed by .ci/test)");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let info: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("server said: {line}"));
    MockServer {
        child,
        issuer: info["issuer"]
            .as_str()
            .unwrap()
            .trim_end_matches('/')
            .to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn client_credentials_with_basic_and_password_with_refresh_against_a_third_party_server() {
    let server = start_mock_server();
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[accounts.machine]\nvendor = 'generic'\ngrant = 'client_credentials'\nclient_auth = 'basic'\nissuer = '{issuer}'\n\
         client_id = '{CLIENT_ID}'\nclient_secret = {{ env = 'SECRET' }}\n\
         [accounts.user]\nvendor = 'generic'\ngrant = 'password'\nclient_auth = 'post'\ntoken_url = '{issuer}/token'\n\
         client_id = '{CLIENT_ID}'\nclient_secret = {{ env = 'SECRET' }}\nusername = '{USERNAME}'\npassword = {{ env = 'PASSWORD' }}\nscope = 'openid offline_access'\n\
         [accounts.wrong]\nvendor = 'generic'\ngrant = 'client_credentials'\nclient_auth = 'basic'\ntoken_url = '{issuer}/token'\n\
         client_id = '{CLIENT_ID}'\nclient_secret = 'not-the-secret'\n",
        issuer = server.issuer
    );
    let path = dir.path().join("ehrsync.toml");
    std::fs::write(&path, toml).unwrap();
    let env: Env = [("SECRET", CLIENT_SECRET), ("PASSWORD", PASSWORD)]
        .into_iter()
        .collect();
    let loaded = config::load_with_env(&path, &env).unwrap();
    let shared = common::shared_in(dir.path(), Arc::new(SystemClock)).await;
    let (handles, shutdown) = common::spawn_all(loaded.config.accounts, &shared).await;
    // 4 s tokens refresh 2 s before expiry (min_lead is capped at half the lifetime): in 7 s the
    // password account logs in once and refreshes about three times.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let m = &shared.metrics;
    assert!(
        m.token_requests("machine", "client_credentials", "success") >= 3,
        "{}",
        m.render()
    );
    assert_eq!(
        m.token_requests("machine", "client_credentials", "rejected"),
        0
    );
    assert_eq!(
        m.token_requests("user", "password", "success"),
        1,
        "{}",
        m.render()
    );
    assert!(
        m.token_requests("user", "refresh_token", "success") >= 2,
        "{}",
        m.render()
    );
    assert_eq!(
        m.token_requests("user", "refresh_token", "rejected"),
        0,
        "rotated refresh tokens are used once"
    );
    assert_eq!(
        m.token_requests("wrong", "client_credentials", "rejected"),
        1,
        "the server checks Basic credentials"
    );
    // Each account ends where it belongs. A transient failure under load is retried within a
    // second or two, so allow that long for the state to settle.
    for (handle, _) in &handles {
        let expected = if handle.account() == "wrong" {
            State::NeedsLogin
        } else {
            State::Valid
        };
        let settled = tokio::time::timeout(Duration::from_secs(5), async {
            while !matches!(handle.snapshot().state, s if s == expected || (expected == State::Valid && s == State::Refreshing)) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        let snap = handle.snapshot();
        assert!(
            settled.is_ok(),
            "{}: {:?}, last error {:?}\n{}",
            handle.account(),
            snap.state,
            snap.last_error,
            m.render()
        );
    }
    common::stop_all(handles, shutdown).await;
}
