//! `ehrsync run` as operators run it: a real process against the vendor sandbox, watched
//! through /readyz, /metrics and `ehrsync status`, stopped with SIGTERM.
#![cfg(unix)]

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ehrsync::clock::SystemClock;
use ehrsync::sandbox::{self, Lifetimes, Sandbox};
use ehrsync::vendor::Vendor;

#[tokio::test(flavor = "multi_thread")]
async fn run_serves_metrics_and_readiness_and_stops_on_sigterm() {
    let sandbox = Sandbox::start(Arc::new(SystemClock), Lifetimes::documented(), 0)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let mut config = format!(
        "[agent]\n{}metrics_listen = '127.0.0.1:{port}'\n",
        common::database_lines("state/ehrsync.db")
    );
    for (vendor, name) in [
        (Vendor::Nextech, "nx"),
        (Vendor::CareCentric, "cc"),
        (Vendor::NikoHealth, "niko"),
    ] {
        config.push_str(&sandbox.account_config(vendor, name));
    }
    let path = common::write_config(dir.path(), &config);
    let secrets = sandbox::credentials_env();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ehrsync"))
        .env_clear()
        .envs(secrets.iter().copied())
        .env("EHRSYNC_LOG", "debug")
        .args(["run", "--config", path.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let base = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    loop {
        if let Some((200, _)) = common::http_get(&format!("{base}/readyz")).await {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "not ready within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        common::http_get(&format!("{base}/healthz"))
            .await
            .map(|r| r.0),
        Some(200)
    );
    let (status, metrics) = common::http_get(&format!("{base}/metrics")).await.unwrap();
    assert_eq!(status, 200);
    for account in ["nx", "cc", "niko"] {
        for line in [
            format!("ehrsync_token_valid{{account=\"{account}\"}} 1"),
            format!("ehrsync_account_needs_login{{account=\"{account}\"}} 0"),
            format!("ehrsync_token_expiry_timestamp_seconds{{account=\"{account}\"}}"),
        ] {
            assert!(metrics.contains(&line), "missing {line} in:\n{metrics}");
        }
    }
    for line in [
        "ehrsync_token_requests_total{account=\"nx\",grant=\"password\",outcome=\"success\"} 1",
        "ehrsync_token_requests_total{account=\"niko\",grant=\"client_credentials\",outcome=\"success\"} 1",
        "ehrsync_refresh_token_expiry_timestamp_seconds{account=\"nx\"}",
        "ehrsync_token_request_duration_seconds_count{account=\"cc\",grant=\"password\"} 1",
        "ehrsync_build_info{version=\"",
    ] {
        assert!(metrics.contains(line), "missing {line} in:\n{metrics}");
    }

    // `status` reads the live database from another process.
    let status = common::ehrsync(
        &["status", "--json", "--config", path.to_str().unwrap()],
        &secrets,
    );
    assert_eq!(status.code, Some(0), "{}", status.stderr);
    let report: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    for account in report["accounts"].as_array().unwrap() {
        assert_eq!(account["state"], "valid", "{account}");
        assert!(account["token_expires_at"].is_string());
    }

    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let stopped = Instant::now();
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(10),
            "no exit within 10 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(exit.code(), Some(0));
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("obtained a new access token"), "{stderr}");
    assert!(
        !stderr.contains('\u{1b}'),
        "no terminal colour codes in logs that go to a file or journald"
    );
    for (_, secret) in secrets {
        assert!(
            !stderr.contains(secret) && !metrics.contains(secret),
            "{secret} leaked"
        );
    }
    for token in sandbox.issued_tokens() {
        assert!(
            !stderr.contains(&token) && !metrics.contains(&token),
            "a token leaked"
        );
    }
}
