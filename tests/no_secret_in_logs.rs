//! Secrets and tokens never reach the logs, even at `trace` level, nor the database as plain
//! text. Runs every preset through logins, refreshes and failures with a global subscriber
//! capturing every thread's output (its own test binary, since the subscriber is global).

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use ehrsync::clock::{SharedClock, TokioClock};
use ehrsync::config::{self, Env};
use ehrsync::sandbox::{self, ApiFault, Fault, Lifetimes, Sandbox};
use ehrsync::sync::{JobRunner, Outcome, RunOptions, SyncShared, api_client};
use ehrsync::token::Timestamp;
use ehrsync::vendor::Vendor;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn contains(haystack: &str, needle: &str) -> bool {
    !needle.is_empty() && haystack.contains(needle)
}

#[tokio::test(start_paused = true)]
async fn no_secret_or_token_in_trace_logs_or_the_database() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let clock: SharedClock = Arc::new(TokioClock::new(Timestamp::from_unix_millis(
        1_800_000_000_000,
    )));
    let lifetimes = Lifetimes {
        nextech_access: Duration::from_secs(120),
        nextech_refresh: Duration::from_secs(3600),
        carecentric_access: Duration::from_secs(600),
        nikohealth_access: Duration::from_secs(300),
        nethealth_access: Duration::from_secs(600),
        nethealth_refresh: Duration::from_secs(3600),
    };
    let sandbox = Sandbox::start(clock.clone(), lifetimes, 0).await.unwrap();
    // A fault of each kind along the way, so error paths log too.
    sandbox.inject(Vendor::Nextech, Fault::MalformedJson, 1);
    sandbox.inject(Vendor::CareCentric, Fault::ServerError, 1);
    sandbox.inject(Vendor::NikoHealth, Fault::InvalidGrant, 1);

    let dir = tempfile::tempdir().unwrap();
    let mut toml = String::new();
    for (vendor, name) in [
        (Vendor::Nextech, "nx"),
        (Vendor::CareCentric, "cc"),
        (Vendor::NikoHealth, "niko"),
    ] {
        toml.push_str(&sandbox.account_config(vendor, name));
    }
    // A Nextech account with a wrong password, for the needs_login path.
    let nx = sandbox::NEXTECH_CREDENTIALS;
    toml.push_str(&format!(
        "[accounts.bad]\nvendor = 'nextech'\ntoken_url = '{}'\nclient_id = '{}'\nusername = '{}'\npassword = {{ env = 'BAD_PASSWORD' }}\npractice_id = '1'\n",
        sandbox.token_url(Vendor::Nextech),
        nx.client_id,
        nx.username
    ));
    for account in ["nx", "niko"] {
        let kind = if account == "nx" {
            "fhir"
        } else {
            "nikohealth_patients"
        };
        toml.push_str(&format!(
            "[[accounts.{account}.jobs]]\nname = 'patients'\nkind = '{kind}'\nschedule = '0 0 * * * *'\npage_size = 25\n"
        ));
    }
    let path = dir.path().join("ehrsync.toml");
    std::fs::write(&path, toml).unwrap();
    let bad_password = "wrong-password-8c1d";
    let mut vars = sandbox::credentials_env();
    vars.push(("BAD_PASSWORD", bad_password));
    let env: Env = vars.iter().copied().collect();
    let loaded = config::load_with_env(&path, &env).unwrap();
    let shared = common::shared_in(dir.path(), clock).await;
    let (handles, shutdown) = common::spawn_all(loaded.config.accounts, &shared).await;
    // Short lifetimes (2 min Nextech access, 1 h refresh): two hours cover logins, refreshes with
    // rotation, a revoked refresh token and the hourly retries of the bad password.
    tokio::time::sleep(Duration::from_secs(1800)).await;
    sandbox.revoke_refresh_tokens(Vendor::Nextech);
    tokio::time::sleep(Duration::from_secs(2 * 3600 + 60)).await;
    for (handle, _) in &handles {
        // A 401 report, so that path logs as well.
        if let Some(t) = handle.snapshot().token {
            handle.unauthorized(t.generation);
        }
    }
    tokio::time::sleep(Duration::from_secs(60)).await;
    // Pulls, with a revoked token, a malformed page and a server error on the way.
    let patients = 120;
    sandbox.set_patients(patients);
    let sync = SyncShared::new(&shared, api_client().unwrap());
    let (_never, no_stop) = tokio::sync::watch::channel(false);
    // Accounts are sorted by name: bad, cc, niko, nx.
    for (vendor, index) in [(Vendor::Nextech, 3), (Vendor::NikoHealth, 2)] {
        sandbox.inject_api(
            vendor,
            [
                ApiFault::Pass,
                ApiFault::RevokeAccessTokens,
                ApiFault::Http(Fault::ServerError),
                ApiFault::Pass,
                ApiFault::Http(Fault::MalformedJson),
            ],
        );
        let (handle, _) = &handles[index];
        let account = Arc::new(
            config::load_with_env(&path, &env)
                .unwrap()
                .config
                .accounts
                .remove(index),
        );
        let runner = JobRunner::new(
            account.clone(),
            account.jobs[0].clone(),
            handle.clone(),
            sync.clone(),
        );
        assert_eq!(
            runner
                .run_once(RunOptions::default(), &no_stop)
                .await
                .outcome,
            Outcome::Failed
        );
        // With 2-minute tokens, a proactive refresh can land between the revocation and the
        // retry, and the run then fails earlier, leaving faults queued: clear them.
        sandbox.clear_api_faults(vendor);
        let second = runner.run_once(RunOptions::default(), &no_stop).await;
        assert_eq!(second.outcome, Outcome::Success, "{second}");
    }
    common::stop_all(handles, shutdown).await;
    assert!(
        shared
            .metrics
            .token_requests("nx", "refresh_token", "success")
            > 10,
        "refreshes happened"
    );
    assert_eq!(
        shared.metrics.token_requests("bad", "password", "rejected"),
        3,
        "the bad password: at start, +1 h, +2 h"
    );
    assert_eq!(
        shared
            .metrics
            .token_requests("nx", "refresh_token", "rejected"),
        1,
        "the revoked refresh token"
    );

    let logs = String::from_utf8_lossy(&capture.0.lock().unwrap()).into_owned();
    assert!(
        logs.len() > 10_000,
        "trace logging captured {} bytes",
        logs.len()
    );
    let niko = sandbox::NIKOHEALTH_CREDENTIALS;
    let basic = base64::engine::general_purpose::STANDARD
        .encode(format!("{}:{}", niko.client_id, niko.client_secret));
    let mut secrets: Vec<String> = vars.iter().map(|(_, v)| v.to_string()).collect();
    secrets.push(basic);
    let tokens = sandbox.issued_tokens();
    assert!(tokens.len() > 50, "{} tokens issued", tokens.len());
    secrets.extend(tokens);
    for secret in &secrets {
        assert!(
            !contains(&logs, secret),
            "a secret or token appears in the logs: {}…",
            &secret[..8.min(secret.len())]
        );
    }
    // Patient data: what identifies each patient served (names are too common to grep for).
    for i in 0..patients {
        let fhir: serde_json::Value =
            serde_json::from_str(&sandbox::fhir_patient(i, 0, 1)).unwrap();
        let markers = [
            fhir["identifier"][0]["value"].as_str().unwrap().to_owned(),
            fhir["telecom"][0]["value"].as_str().unwrap().to_owned(),
            format!("patient{i}@example.org"),
        ];
        for marker in markers {
            assert!(
                !logs.contains(&marker),
                "patient data in the logs: {marker}"
            );
        }
    }
    for file in ["ehrsync.db", "ehrsync.db-wal"] {
        let bytes = std::fs::read(dir.path().join(file)).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        for secret in &secrets {
            assert!(
                !contains(&text, secret),
                "{file} holds a secret or token as plain text"
            );
        }
    }
}
