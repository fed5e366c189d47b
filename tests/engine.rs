//! The token engine against the vendor sandbox over real HTTP on loopback, under tokio's paused
//! clock: days of token lifetimes run in moments. Each test checks what DESIGN.md §2 promises
//! through the metrics, the sandbox's request counts and the stored state.

mod common;

use std::sync::Arc;
use std::time::Duration;

use ehrsync::clock::{SharedClock, TokioClock};
use ehrsync::config::{self, Account, Env, KeySource};
use ehrsync::crypto::TokenCipher;
use ehrsync::metrics::Metrics;
use ehrsync::sandbox::{self, Fault, Lifetimes, Sandbox};
use ehrsync::token::Timestamp;
use ehrsync::token::client::http_client;
use ehrsync::token::core::State;
use ehrsync::token::owner::{Shared, TokenHandle, Unavailable, spawn};
use ehrsync::vendor::Vendor;
use secrecy::ExposeSecret;
use tokio::sync::watch;

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

struct Harness {
    dir: tempfile::TempDir,
    sandbox: Sandbox,
    shared: Shared,
    account: Arc<Account>,
    handle: TokenHandle,
    task: tokio::task::JoinHandle<()>,
    shutdown: watch::Sender<bool>,
}

/// The account name each vendor's tests use.
fn account_name(vendor: Vendor) -> &'static str {
    match vendor {
        Vendor::Nextech => "nx",
        Vendor::CareCentric => "cc",
        Vendor::NikoHealth => "niko",
        Vendor::NetHealth => "nh",
        Vendor::Generic => "generic",
    }
}

/// The sandbox's credentials, with a different password for the password grants if given.
fn env(password_override: Option<&str>) -> Env {
    sandbox::credentials_env()
        .into_iter()
        .map(|(k, v)| match password_override {
            Some(p) if k.ends_with("_PASSWORD") => (k, p),
            _ => (k, v),
        })
        .collect()
}

async fn start_with(
    vendor: Vendor,
    lifetimes: Lifetimes,
    password: Option<&str>,
    prepare: impl FnOnce(&Sandbox),
) -> Harness {
    let clock: SharedClock = Arc::new(TokioClock::new(Timestamp::from_unix_millis(
        1_800_000_000_000,
    )));
    let sandbox = Sandbox::start(clock.clone(), lifetimes, 0).await.unwrap();
    prepare(&sandbox);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ehrsync.toml");
    std::fs::write(&path, sandbox.account_config(vendor, account_name(vendor))).unwrap();
    let loaded = config::load_with_env(&path, &env(password)).unwrap();
    let account = Arc::new(loaded.config.accounts.into_iter().next().unwrap());
    let shared = common::shared_in(dir.path(), clock).await;
    let (shutdown, rx) = watch::channel(false);
    let (handle, task) = spawn(account.clone(), shared.clone(), rx).await.unwrap();
    Harness {
        dir,
        sandbox,
        shared,
        account,
        handle,
        task,
        shutdown,
    }
}

async fn start(vendor: Vendor) -> Harness {
    start_with(vendor, Lifetimes::documented(), None, |_| {}).await
}

impl Harness {
    fn now(&self) -> Timestamp {
        self.shared.clock.now()
    }

    fn requests(&self, grant: &str, outcome: &str) -> u64 {
        self.shared
            .metrics
            .token_requests(self.account.name.as_str(), grant, outcome)
    }

    /// Asserts the account holds a token the sandbox accepts right now.
    async fn assert_valid_token(&self, when: &str) {
        let token = tokio::time::timeout(Duration::from_secs(5), self.handle.token())
            .await
            .unwrap_or_else(|_| panic!("{when}: no token within 5 s"))
            .unwrap_or_else(|e| panic!("{when}: {e}"));
        assert!(
            self.sandbox
                .access_token_valid(token.access_token.expose_secret()),
            "{when}: the sandbox rejects the token"
        );
    }

    /// Samples validity every `step` for `span`, counting samples without a valid token.
    async fn invalid_samples(&self, span: Duration, step: Duration) -> u32 {
        let mut invalid = 0;
        let end = tokio::time::Instant::now() + span;
        while tokio::time::Instant::now() < end {
            tokio::time::sleep(step).await;
            let snap = self.handle.snapshot();
            let ok = snap.token.is_some_and(|t| {
                self.now() < t.expires_at
                    && self
                        .sandbox
                        .access_token_valid(t.access_token.expose_secret())
            });
            invalid += u32::from(!ok);
        }
        invalid
    }

    async fn stop(self) -> (tempfile::TempDir, Sandbox, Shared) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
        (self.dir, self.sandbox, self.shared)
    }
}

#[tokio::test(start_paused = true)]
async fn nikohealth_client_credentials_with_basic_auth_for_a_day() {
    let h = start(Vendor::NikoHealth).await;
    h.assert_valid_token("first login").await;
    assert_eq!(
        h.invalid_samples(DAY, Duration::from_secs(60)).await,
        0,
        "a valid token every minute of the day"
    );
    // 20-minute tokens refreshed at ~15 min: ~96 logins a day (±5 % jitter).
    let logins = h.sandbox.requests(Vendor::NikoHealth, "client_credentials");
    assert!((90..=103).contains(&logins), "{logins} logins");
    assert_eq!(
        h.requests("client_credentials", "success"),
        u64::from(logins)
    );
    assert_eq!(h.handle.snapshot().state, State::Valid);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn carecentric_logs_in_again_before_the_jwt_expires() {
    let h = start(Vendor::CareCentric).await;
    h.assert_valid_token("first login").await;
    let first = h.handle.snapshot().token.unwrap();
    assert_eq!(
        first.expires_at,
        h.now() + Duration::from_secs(172_800),
        "expiry from the 48 h JWT"
    );
    assert_eq!(
        h.invalid_samples(10 * DAY, Duration::from_secs(600)).await,
        0
    );
    // 48 h tokens renewed at ~36 h: 10 days → 7 logins, never a refresh grant (none is issued).
    let logins = h.sandbox.requests(Vendor::CareCentric, "password");
    assert!((7..=8).contains(&logins), "{logins}");
    assert_eq!(h.sandbox.requests(Vendor::CareCentric, "refresh_token"), 0);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn nextech_refreshes_hourly_and_logs_in_again_after_a_15_day_outage() {
    let h = start(Vendor::Nextech).await;
    h.assert_valid_token("first login").await;
    assert_eq!(
        h.invalid_samples(10 * DAY, Duration::from_secs(300)).await,
        0,
        "days 0–10"
    );
    // Outage: every token request fails for 15 days, longer than the 14-day refresh token.
    h.sandbox
        .inject(Vendor::Nextech, Fault::ServerError, 1_000_000);
    tokio::time::sleep(15 * DAY).await;
    assert!(
        h.handle
            .snapshot()
            .token
            .is_none_or(|t| t.expires_at < h.now()),
        "no token survives the outage"
    );
    h.sandbox.clear_faults(Vendor::Nextech);
    // Back within one backoff cap (5 min).
    tokio::time::sleep(Duration::from_secs(301)).await;
    h.assert_valid_token("after the outage").await;
    assert_eq!(
        h.invalid_samples(5 * DAY, Duration::from_secs(300)).await,
        0,
        "days 25–30"
    );

    assert_eq!(
        h.requests("password", "success"),
        2,
        "the first login and one re-login after the outage"
    );
    assert_eq!(
        h.requests("refresh_token", "rejected"),
        0,
        "the dead refresh token is never presented"
    );
    let refreshes = h.requests("refresh_token", "success");
    assert!(
        refreshes > 450 && refreshes < 560,
        "~45-min refreshes over 15 days of service: {refreshes}"
    );
    // Every planned refresh is timed against its plan; on the simulated clock none is late.
    let lateness = &h.shared.metrics.token_refresh_lateness;
    assert!(
        lateness.get_sample_count() >= refreshes,
        "{} lateness samples for {refreshes} refreshes",
        lateness.get_sample_count()
    );
    assert!(
        lateness.get_sample_sum() < 1.0,
        "{}",
        lateness.get_sample_sum()
    );
    assert!(
        h.requests("refresh_token", "transient_error") + h.requests("password", "transient_error")
            > 1000,
        "retried through the outage"
    );
    let record = h.shared.store.load_token("nx").await.unwrap().unwrap();
    assert_eq!(record.state, "valid");
    assert!(
        record.refresh_token_expires_at.unwrap() > h.now().unix_seconds() + 13 * 86_400,
        "a fresh 14-day refresh token"
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_revoked_refresh_token_leads_to_one_password_login() {
    let h = start(Vendor::Nextech).await;
    h.assert_valid_token("first login").await;
    h.sandbox.revoke_refresh_tokens(Vendor::Nextech);
    tokio::time::sleep(HOUR).await;
    h.assert_valid_token("after the revocation").await;
    assert_eq!(h.requests("refresh_token", "rejected"), 1);
    assert_eq!(h.requests("password", "success"), 2);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_foreign_lease_held_past_the_tokens_life_discards_no_token() {
    let mut lifetimes = Lifetimes::documented();
    lifetimes.nextech_access = Duration::from_secs(20);
    let h = start_with(Vendor::Nextech, lifetimes, None, |_| {}).await;
    h.assert_valid_token("first login").await;
    // Another host's process holds the account's token lease for 35 s: past the planned
    // refresh (about 15 s) and past the token's expiry (20 s).
    let other = ehrsync::store::Holder::elsewhere("a-process-on-another-host");
    let key = ehrsync::store::LeaseKey::token("nx");
    // The owner releases the lease just after publishing the token: wait for that.
    while h
        .shared
        .store
        .acquire(
            &key,
            &other,
            h.now().unix_seconds(),
            Duration::from_secs(35),
        )
        .await
        .unwrap()
        .is_none()
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_secs(40)).await;
    // The refresh went out once the lease expired; its answer is judged from when it was
    // sent, not from when the refresh was first wanted, so it is kept.
    h.assert_valid_token("after the foreign lease").await;
    assert_eq!(h.requests("refresh_token", "success"), 1);
    assert_eq!(h.requests("refresh_token", "transient_error"), 0);
    assert_eq!(h.requests("refresh_token", "rejected"), 0);
    assert_eq!(h.requests("password", "success"), 1, "no second login");
    assert_eq!(h.sandbox.rejected(Vendor::Nextech, "refresh_token"), 0);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_absurd_expiry_keeps_the_rotated_refresh_token() {
    let h = start(Vendor::Nextech).await;
    h.assert_valid_token("first login").await;
    // The next refresh's answer claims a lifetime of ~31 million years: an error, but the
    // refresh token it rotated is kept, and the retry presents it.
    h.sandbox.inject(Vendor::Nextech, Fault::AbsurdExpiry, 1);
    tokio::time::sleep(HOUR).await;
    h.assert_valid_token("after the absurd answer").await;
    assert_eq!(h.requests("refresh_token", "transient_error"), 1);
    assert_eq!(h.requests("refresh_token", "success"), 1);
    assert_eq!(h.requests("refresh_token", "rejected"), 0);
    assert_eq!(h.requests("password", "success"), 1, "no second login");
    assert_eq!(h.sandbox.rejected(Vendor::Nextech, "refresh_token"), 0);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn rate_limits_wait_for_retry_after() {
    let h = start_with(Vendor::NikoHealth, Lifetimes::documented(), None, |s| {
        s.inject(
            Vendor::NikoHealth,
            Fault::RateLimited {
                retry_after_secs: 30,
            },
            1,
        )
    })
    .await;
    tokio::time::sleep(Duration::from_secs(29)).await;
    assert_eq!(
        h.sandbox.total_requests(Vendor::NikoHealth),
        1,
        "nothing before Retry-After"
    );
    assert!(h.handle.snapshot().token.is_none());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(h.sandbox.total_requests(Vendor::NikoHealth), 2);
    h.assert_valid_token("after Retry-After").await;
    assert_eq!(h.requests("client_credentials", "transient_error"), 1);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_503_with_retry_after_is_retried_no_earlier() {
    // Seen before: `503` with `Retry-After` was retried on the backoff (567 ms after a
    // `Retry-After: 1`), so a token endpoint down for maintenance was asked again at once.
    let h = start_with(Vendor::NikoHealth, Lifetimes::documented(), None, |s| {
        s.inject(
            Vendor::NikoHealth,
            Fault::Unavailable {
                retry_after_secs: 20,
            },
            2,
        )
    })
    .await;
    let started = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(19)).await;
    assert_eq!(
        h.sandbox.total_requests(Vendor::NikoHealth),
        1,
        "nothing before Retry-After"
    );
    assert_eq!(h.handle.snapshot().state, State::Retrying);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(h.sandbox.total_requests(Vendor::NikoHealth), 2);
    // The second 503 says the same: again nothing for 20 s.
    tokio::time::sleep(Duration::from_secs(18)).await;
    assert_eq!(h.sandbox.total_requests(Vendor::NikoHealth), 2);
    h.assert_valid_token("after two Retry-Afters").await;
    assert!(started.elapsed() >= Duration::from_secs(40));
    assert_eq!(h.sandbox.total_requests(Vendor::NikoHealth), 3);
    assert_eq!(h.requests("client_credentials", "transient_error"), 2);
    assert_eq!(h.requests("client_credentials", "success"), 1);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn server_errors_malformed_json_and_slow_answers_are_retried() {
    let h = start_with(Vendor::CareCentric, Lifetimes::documented(), None, |s| {
        s.inject(Vendor::CareCentric, Fault::ServerError, 3);
        s.inject(Vendor::CareCentric, Fault::MalformedJson, 1);
        // Slower than the 30 s request timeout: abandoned and retried.
        s.inject(Vendor::CareCentric, Fault::Slow(Duration::from_secs(60)), 1);
        // Slow but within the timeout: accepted.
        s.inject(Vendor::CareCentric, Fault::Slow(Duration::from_secs(10)), 1);
    })
    .await;
    // Backoff ceilings 1, 2, 4, 8, 16 s plus a 30 s timeout: well within 3 minutes.
    tokio::time::sleep(Duration::from_secs(180)).await;
    h.assert_valid_token("after the faults").await;
    assert_eq!(h.requests("password", "transient_error"), 5);
    assert_eq!(h.requests("password", "success"), 1);
    assert_eq!(h.sandbox.requests(Vendor::CareCentric, "password"), 6);
    let text = h.shared.metrics.render();
    assert!(text.contains("ehrsync_token_request_duration_seconds_bucket{account=\"cc\",grant=\"password\",le=\"30\"}"), "{text}");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn invalid_client_waits_in_needs_login_and_retries_hourly() {
    let h = start_with(Vendor::NikoHealth, Lifetimes::documented(), None, |s| {
        s.inject(Vendor::NikoHealth, Fault::InvalidClient, 1)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(h.handle.snapshot().state, State::NeedsLogin);
    assert!(matches!(
        h.handle.token().await,
        Err(Unavailable::NeedsLogin(_))
    ));
    assert!(
        h.shared
            .metrics
            .render()
            .contains("ehrsync_account_needs_login{account=\"niko\"} 1")
    );
    tokio::time::sleep(Duration::from_secs(3590)).await;
    assert_eq!(
        h.sandbox.total_requests(Vendor::NikoHealth),
        1,
        "no retry within the hour"
    );
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(h.sandbox.total_requests(Vendor::NikoHealth), 2);
    h.assert_valid_token("after the hourly retry").await;
    assert!(
        h.shared
            .metrics
            .render()
            .contains("ehrsync_account_needs_login{account=\"niko\"} 0")
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_wrong_password_is_tried_once_an_hour_not_in_a_loop() {
    let h = start_with(
        Vendor::Nextech,
        Lifetimes::documented(),
        Some("wrong-password"),
        |_| {},
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3 * 3600 + 60)).await;
    // Start, then +1 h, +2 h, +3 h: four attempts in three hours, never a burst.
    assert_eq!(h.sandbox.requests(Vendor::Nextech, "password"), 4);
    assert_eq!(h.requests("password", "rejected"), 4);
    let snap = h.handle.snapshot();
    assert_eq!(snap.state, State::NeedsLogin);
    assert!(snap.last_error.unwrap().contains("AADSTS50126"));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn concurrent_readers_and_401s_cause_one_request_each() {
    let h = start(Vendor::NikoHealth).await;
    let readers: Vec<_> = (0..50)
        .map(|_| {
            let handle = h.handle.clone();
            tokio::spawn(async move { handle.token().await.map(|t| t.generation) })
        })
        .collect();
    for r in readers {
        assert_eq!(r.await.unwrap(), Ok(1));
    }
    assert_eq!(
        h.sandbox.total_requests(Vendor::NikoHealth),
        1,
        "50 readers, one login"
    );
    // Many API calls see 401 with generation 1: one forced refresh.
    for _ in 0..20 {
        h.handle.unauthorized(1);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(h.sandbox.total_requests(Vendor::NikoHealth), 2);
    assert_eq!(h.handle.token().await.unwrap().generation, 2);
    // A late 401 about generation 1 changes nothing.
    h.handle.unauthorized(1);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(h.sandbox.total_requests(Vendor::NikoHealth), 2);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_crash_after_rotations_loses_no_refresh_token_and_a_restart_sends_no_request() {
    let h = start(Vendor::Nextech).await;
    h.assert_valid_token("first login").await;
    // Two refreshes: the refresh token has rotated twice; the first two are dead at the sandbox.
    tokio::time::sleep(2 * HOUR - Duration::from_secs(600)).await;
    assert_eq!(h.requests("refresh_token", "success"), 2);
    let before = h.handle.token().await.unwrap();
    // A crash: the owner is killed, not stopped.
    h.task.abort();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let requests = h.sandbox.total_requests(Vendor::Nextech);

    let (_tx, rx) = watch::channel(false);
    let (handle, task) = spawn(h.account.clone(), h.shared.clone(), rx)
        .await
        .unwrap();
    let after = handle.token().await.unwrap();
    assert_eq!(
        after.access_token.expose_secret(),
        before.access_token.expose_secret()
    );
    assert_eq!(after.generation, before.generation);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(
        h.sandbox.total_requests(Vendor::Nextech),
        requests,
        "no token request after the restart"
    );
    // The next refresh presents the latest rotated refresh token, restored from the database.
    tokio::time::sleep(HOUR).await;
    assert_eq!(h.requests("refresh_token", "success"), 3);
    assert_eq!(
        h.requests("refresh_token", "rejected"),
        0,
        "the stored refresh token was the live one"
    );
    assert_eq!(
        h.requests("password", "success"),
        1,
        "no re-login was needed"
    );
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn two_processes_sharing_a_database_make_one_request_per_refresh() {
    let h = start(Vendor::Nextech).await;
    h.assert_valid_token("first process").await;
    // A second process: its own core, lease holder and metrics; the same database and key.
    let cipher = TokenCipher::load(
        &KeySource::File {
            path: h.dir.path().join("ehrsync.key"),
            create: false,
        },
        &Env::default(),
    )
    .unwrap();
    let other = Shared::new(
        h.shared.store.clone(),
        cipher,
        http_client(Duration::from_secs(30)).unwrap(),
        h.shared.clock.clone(),
        Metrics::new().unwrap(),
    );
    assert_ne!(other.holder, h.shared.holder);
    let (_stop, rx) = watch::channel(false);
    let (second, task) = spawn(h.account.clone(), other.clone(), rx).await.unwrap();
    let token = second.token().await.unwrap();
    assert_eq!(
        h.sandbox.total_requests(Vendor::Nextech),
        1,
        "the second process starts from the stored token"
    );
    assert_eq!(token.generation, 1);

    let end = tokio::time::Instant::now() + 2 * DAY;
    while tokio::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(300)).await;
        for handle in [&h.handle, &second] {
            let t = handle.snapshot().token.unwrap();
            assert!(
                h.now() < t.expires_at
                    && h.sandbox.access_token_valid(t.access_token.expose_secret()),
                "{}",
                handle.account()
            );
        }
    }
    // Rotating refresh tokens make a duplicate refresh fail loudly: there must be none.
    let rejected = h.requests("refresh_token", "rejected")
        + other
            .metrics
            .token_requests("nx", "refresh_token", "rejected");
    assert_eq!(rejected, 0);
    let refreshes = h.requests("refresh_token", "success")
        + other
            .metrics
            .token_requests("nx", "refresh_token", "success");
    assert_eq!(
        u64::from(h.sandbox.requests(Vendor::Nextech, "refresh_token")),
        refreshes
    );
    // One refresh per ~45 min for the pair, as for one process (not two per cycle).
    assert!(
        (58..=70).contains(&refreshes),
        "{refreshes} refreshes in 2 days"
    );
    assert!(
        h.requests("refresh_token", "success") > 0
            && other
                .metrics
                .token_requests("nx", "refresh_token", "success")
                > 0,
        "both take turns"
    );
    task.abort();
    h.stop().await;
}

/// What `ehrsync login` does, without a browser: discovery, authorization with PKCE and
/// `state` (the sandbox consents for its person), the code exchange, and storing the tokens
/// where the running agent finds them. `Err` carries the provider's `error`.
async fn person_logs_in(h: &Harness) -> Result<(), String> {
    use ehrsync::config::TokenEndpoint;
    use ehrsync::token::client::{GrantForm, TokenTarget, request_token};
    use ehrsync::token::pkce::Pkce;

    let http = &h.shared.http;
    let TokenEndpoint::Discovery { issuer } = &h.account.token_endpoint else {
        panic!("a Net Health account discovers its endpoints");
    };
    let (found, _) = ehrsync::oidc::fetch(http, issuer)
        .await
        .map_err(|e| e.to_string())?;
    assert!(found.supports_s256());
    let pkce = Pkce::generate().unwrap();
    let state = "state-4f1c";
    let redirect_uri = "http://127.0.0.1:9/callback";
    let mut url = found.authorization_endpoint.clone().unwrap();
    url.query_pairs_mut().extend_pairs([
        ("response_type", "code"),
        ("client_id", h.account.client_id.as_str()),
        ("redirect_uri", redirect_uri),
        ("scope", h.account.scope.as_deref().unwrap_or("openid")),
        ("state", state),
        ("code_challenge", pkce.challenge.as_str()),
        ("code_challenge_method", "S256"),
    ]);
    let answer = http.get(url).send().await.map_err(|e| e.to_string())?;
    assert_eq!(answer.status().as_u16(), 302);
    let location = url::Url::parse(answer.headers()["location"].to_str().unwrap()).unwrap();
    let params: std::collections::HashMap<String, String> =
        location.query_pairs().into_owned().collect();
    if let Some(error) = params.get("error") {
        return Err(error.clone());
    }
    assert_eq!(
        params.get("state").map(String::as_str),
        Some(state),
        "state must come back unchanged"
    );
    let code = secrecy::SecretString::from(params["code"].clone());
    let sent_at = h.now();
    let form = GrantForm::Code {
        code: &code,
        verifier: &pkce.verifier,
        redirect_uri,
    };
    let target = TokenTarget::resolve(&h.account, Some(&found)).map_err(|e| format!("{e:?}"))?;
    let response = request_token(http, &h.account, &target, form)
        .await
        .map_err(|e| format!("{e:?}"))?;
    // Stored as `ehrsync login` stores it: on top of what is there, under the lease.
    ehrsync::token::owner::store_login(&h.shared, &h.account, response, sent_at)
        .await
        .map(|_| ())
}

#[tokio::test(start_paused = true)]
async fn nethealth_waits_for_a_person_then_lives_on_refresh_tokens() {
    let h = start(Vendor::NetHealth).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        h.handle.snapshot().state,
        State::NeedsLogin,
        "nothing stored: only a person can start it"
    );
    assert!(matches!(
        h.handle.token().await,
        Err(Unavailable::NeedsLogin(_))
    ));
    assert_eq!(
        h.sandbox.total_requests(Vendor::NetHealth),
        0,
        "nothing to try without a person"
    );

    person_logs_in(&h).await.unwrap();
    // The running agent finds the stored tokens on its own (no restart).
    tokio::time::sleep(Duration::from_secs(6)).await;
    h.assert_valid_token("after the login").await;
    assert!(
        h.shared
            .metrics
            .render()
            .contains("ehrsync_account_needs_login{account=\"nh\"} 0")
    );

    // A day of 1-hour tokens, refreshed at ~45 min with rotating refresh tokens (discovered endpoint).
    assert_eq!(h.invalid_samples(DAY, Duration::from_secs(300)).await, 0);
    let refreshes = h.requests("refresh_token", "success");
    assert!((28..=36).contains(&refreshes), "{refreshes}");
    let record = h.shared.store.load_token("nh").await.unwrap().unwrap();
    assert!(
        record.refresh_token_expires_at.unwrap() > h.now().unix_seconds() + 29 * 86_400,
        "refresh_token_expires_in is used"
    );

    // The provider revokes the refresh token: needs_login, and no retries.
    h.sandbox.revoke_refresh_tokens(Vendor::NetHealth);
    tokio::time::sleep(HOUR).await;
    let snap = h.handle.snapshot();
    assert_eq!(snap.state, State::NeedsLogin);
    assert!(snap.last_error.unwrap().contains("ehrsync login"));
    assert_eq!(h.requests("refresh_token", "rejected"), 1);
    assert!(
        h.shared
            .metrics
            .render()
            .contains("ehrsync_account_needs_login{account=\"nh\"} 1")
    );
    let requests = h.sandbox.total_requests(Vendor::NetHealth);
    tokio::time::sleep(3 * HOUR).await;
    assert_eq!(
        h.sandbox.total_requests(Vendor::NetHealth),
        requests,
        "no automatic retries for a person's grant"
    );

    // The person declines once, then logs in: back in service without a restart.
    h.sandbox.inject(Vendor::NetHealth, Fault::AccessDenied, 1);
    assert_eq!(person_logs_in(&h).await, Err("access_denied".to_owned()));
    person_logs_in(&h).await.unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    h.assert_valid_token("after the second login").await;
    assert_eq!(h.handle.snapshot().state, State::Valid);
    h.stop().await;
}
