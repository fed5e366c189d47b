use std::collections::HashMap;

use super::*;
use crate::token::response::parse_success;

const SEC: Duration = Duration::from_secs(1);
const DAY: Duration = Duration::from_secs(86_400);
const T0: Timestamp = Timestamp::from_unix_millis(1_800_000_000_000);

fn policy(grant: Grant) -> Policy {
    Policy::with_defaults(grant)
}

fn nextech() -> Policy {
    Policy {
        access_default: Some(Duration::from_secs(3600)),
        refresh_default: Some(14 * DAY),
        needs_person_codes: crate::vendor::NEXTECH.needs_person_codes,
        ..policy(Grant::Password)
    }
}

/// A Nextech core that logged in at T0: access token `a1`, refresh token `r1`, one hour.
fn logged_in_nextech() -> Core {
    let mut core = Core::new(nextech(), 7);
    core.step(T0, Event::Start);
    core.step(
        T0,
        success(
            r#"{"access_token":"a1","refresh_token":"r1","expires_in":3600}"#,
            T0,
        ),
    );
    core
}

fn success(json: &str, sent_at: Timestamp) -> Event {
    Event::Success {
        response: parse_success(json.as_bytes()).unwrap(),
        sent_at,
    }
}

fn oauth(status: u16, error: &str, description: Option<&str>) -> Event {
    Event::Failure(Failure::OAuth {
        status,
        error: OAuthError {
            error: error.into(),
            description: description.map(str::to_owned),
        },
    })
}

fn transient() -> Event {
    Event::Failure(Failure::transient(
        TransientKind::Connect,
        "connection refused",
    ))
}

fn tokens(issued: Timestamp, life: Duration) -> Tokens {
    Tokens {
        access_token: SecretString::from("at"),
        issued_at: issued,
        expires_at: issued + life,
        refresh: None,
        generation: 1,
    }
}

#[test]
fn refresh_lands_before_expiry_with_the_lead_over_many_generated_cases() {
    let mut rng = fastrand::Rng::with_seed(42);
    for case in 0..20_000 {
        let life = Duration::from_millis(rng.u64(1_000..=30 * 86_400_000));
        let ratio = 0.05 + rng.f64() * 0.90;
        let min_lead = Duration::from_millis(rng.u64(0..=600_000));
        let issued = Timestamp::from_unix_millis(rng.i64(0..=4_000_000_000_000));
        let p = Policy {
            refresh_ratio: ratio,
            min_lead,
            ..policy(Grant::ClientCredentials)
        };
        let mut core = Core::new(p, case);
        let t = tokens(issued, life);
        let at = core.plan(&t);
        let lead = min_lead.min(life / 2);
        assert!(
            at <= t.expires_at - lead,
            "case {case}: refresh at {at} is within {lead:?} of {}",
            t.expires_at
        );
        assert!(at >= issued, "case {case}: refresh before issue");
        // Jitter stays within ±5 % of the lifetime around the ratio (unless the lead cap moved it).
        let j = Policy::JITTER_RATIO.min(ratio / 2.0);
        let lo = issued + life.mul_f64(ratio - j) - Duration::from_millis(1);
        let hi = issued + life.mul_f64(ratio + j) + Duration::from_millis(1);
        assert!(
            at >= lo.min(t.expires_at - lead),
            "case {case}: {at} below the jitter band"
        );
        assert!(at <= hi, "case {case}: {at} above the jitter band");
    }
}

#[test]
fn the_design_examples_hold() {
    // DESIGN.md §2: 20 min → ~15 min; 1 h → ~45 min; 48 h → ~36 h; 20 s → ~10 s.
    for (life, expect) in [(1200, 900), (3600, 2700), (172_800, 129_600), (20, 10)] {
        let mut core = Core::new(policy(Grant::Password), life);
        let at = core.plan(&tokens(T0, Duration::from_secs(life)));
        let got = at.since(T0).as_secs_f64();
        let tolerance = 0.05 * life as f64 + 0.001;
        if life == 20 {
            assert!((got - 10.0).abs() < 0.001, "20 s token refreshes at {got}");
        } else {
            assert!((got - expect as f64).abs() <= tolerance, "{life}: {got}");
        }
    }
}

#[test]
fn jitter_spreads_refreshes() {
    let plans: Vec<i64> = (0..200)
        .map(|seed| {
            Core::new(policy(Grant::Password), seed)
                .plan(&tokens(T0, Duration::from_secs(3600)))
                .unix_millis()
        })
        .collect();
    let (min, max) = (plans.iter().min().unwrap(), plans.iter().max().unwrap());
    assert!(
        max - min > 250_000,
        "200 accounts should spread over most of the ±3 min band: {}",
        max - min
    );
}

#[test]
fn backoff_is_capped_full_jitter() {
    let p = policy(Grant::ClientCredentials);
    let mut core = Core::new(p.clone(), 1);
    let mut seen_max = Duration::ZERO;
    for attempt in 1..200u32 {
        core.failures = attempt;
        let ceiling = p.backoff_ceiling(attempt);
        assert!(ceiling <= Policy::BACKOFF_CAP);
        assert_eq!(
            ceiling,
            (SEC * 2u32.saturating_pow((attempt - 1).min(30))).min(Policy::BACKOFF_CAP)
        );
        for _ in 0..50 {
            let d = core.backoff();
            assert!(d <= ceiling, "attempt {attempt}: {d:?} > {ceiling:?}");
            seen_max = seen_max.max(d);
        }
    }
    assert!(
        seen_max > Duration::from_secs(240),
        "full jitter reaches near the cap"
    );
}

#[test]
fn first_login_then_proactive_refresh_with_rotation() {
    let mut core = Core::new(nextech(), 7);
    let out = core.step(T0, Event::Start);
    assert_eq!(out.request, Some(Request::Login(Grant::Password)));
    assert_eq!(core.state(T0), State::Acquiring);
    let out = core.step(T0 + SEC, success(r#"{"access_token":"a1","refresh_token":"r1","expires_in":"3600","token_type":"Bearer"}"#, T0));
    assert!(out.persist);
    assert_eq!(
        out.finished,
        Some((Request::Login(Grant::Password), Outcome::Success))
    );
    assert_eq!(core.state(T0 + SEC), State::Valid);
    let wake = out.wake_at.unwrap();
    assert!(
        wake >= T0 + Duration::from_secs(2520) && wake <= T0 + Duration::from_secs(2880),
        "{wake}"
    );
    assert_eq!(
        core.tokens().unwrap().refresh.as_ref().unwrap().expires_at,
        Some(T0 + 14 * DAY)
    );

    // Too early: nothing happens.
    assert_eq!(core.step(wake - SEC, Event::Timer).request, None);
    let out = core.step(wake, Event::Timer);
    assert_eq!(out.request, Some(Request::Refresh));
    assert_eq!(core.state(wake), State::Refreshing);
    core.step(
        wake,
        success(
            r#"{"access_token":"a2","refresh_token":"r2","expires_in":3600}"#,
            wake,
        ),
    );
    let t = core.tokens().unwrap();
    assert_eq!(t.access_token.expose_secret(), "a2");
    assert_eq!(t.refresh.as_ref().unwrap().token.expose_secret(), "r2");
    assert_eq!(
        t.refresh.as_ref().unwrap().expires_at,
        Some(wake + 14 * DAY),
        "a new refresh token has a new lifetime"
    );
    assert_eq!(t.generation, 2);
}

#[test]
fn a_refresh_without_a_new_refresh_token_keeps_the_old_one_and_its_expiry() {
    let mut core = logged_in_nextech();
    let at = core.next_refresh_at().unwrap();
    core.step(at, Event::Timer);
    core.step(
        at,
        success(r#"{"access_token":"a2","expires_in":3600}"#, at),
    );
    let r = core.tokens().unwrap().refresh.as_ref().unwrap();
    assert_eq!(r.token.expose_secret(), "r1");
    assert_eq!(r.expires_at, Some(T0 + 14 * DAY));
}

#[test]
fn a_refresh_token_near_death_is_not_used() {
    let mut core = Core::new(nextech(), 7);
    core.step(T0, Event::Start);
    core.step(T0, success(r#"{"access_token":"a1","refresh_token":"r1","expires_in":3600,"refresh_token_expires_in":100}"#, T0));
    // The refresh token dies at +100 s; within min_lead / 2 (30 s) of that it may die in flight.
    let out = core.step(
        T0 + Duration::from_secs(75),
        Event::Unauthorized { generation: 1 },
    );
    assert_eq!(out.request, Some(Request::Login(Grant::Password)));
}

#[test]
fn invalid_grant_on_refresh_logs_in_again_at_once() {
    let mut core = logged_in_nextech();
    let at = core.next_refresh_at().unwrap();
    core.step(at, Event::Timer);
    let out = core.step(
        at,
        oauth(
            400,
            "invalid_grant",
            Some("AADSTS70008: The refresh token has expired"),
        ),
    );
    assert_eq!(out.finished, Some((Request::Refresh, Outcome::Rejected)));
    assert_eq!(out.request, Some(Request::Login(Grant::Password)));
    assert!(
        core.tokens().unwrap().refresh.is_none(),
        "the dead refresh token is dropped"
    );
    assert_eq!(
        core.state(at),
        State::Refreshing,
        "the old access token is still served"
    );
}

#[test]
fn bad_passwords_are_never_retried_in_a_loop() {
    let mut core = Core::new(nextech(), 7);
    core.step(T0, Event::Start);
    let out = core.step(
        T0,
        oauth(
            400,
            "invalid_grant",
            Some("AADSTS50126: Error validating credentials due to invalid username or password."),
        ),
    );
    assert_eq!(
        out.finished,
        Some((Request::Login(Grant::Password), Outcome::Rejected))
    );
    assert_eq!(out.request, None);
    assert_eq!(core.state(T0), State::NeedsLogin);
    assert_eq!(out.wake_at, Some(T0 + Policy::LOGIN_RETRY));
    // Timers, 401s and restarts before the hour is up send nothing.
    for t in [T0 + SEC, T0 + Duration::from_secs(3599)] {
        assert_eq!(core.step(t, Event::Timer).request, None);
    }
    let restored = Core::restore(nextech(), 8, core.snapshot());
    let mut restored = restored;
    assert_eq!(
        restored
            .step(T0 + Duration::from_secs(10), Event::Start)
            .request,
        None
    );
    assert_eq!(restored.state(T0), State::NeedsLogin);
    // After an hour: exactly one more attempt.
    assert_eq!(
        core.step(T0 + Policy::LOGIN_RETRY, Event::Timer).request,
        Some(Request::Login(Grant::Password))
    );
}

#[test]
fn errors_map_as_the_design_says() {
    type Case = (Grant, Event, Outcome, State);
    let cases: Vec<(&str, Case)> = vec![
        (
            "5xx",
            (
                Grant::ClientCredentials,
                oauth(503, "server_error", None),
                Outcome::TransientError,
                State::Retrying,
            ),
        ),
        (
            "temporarily_unavailable",
            (
                Grant::ClientCredentials,
                oauth(400, "temporarily_unavailable", None),
                Outcome::TransientError,
                State::Retrying,
            ),
        ),
        (
            "connection",
            (
                Grant::ClientCredentials,
                transient(),
                Outcome::TransientError,
                State::Retrying,
            ),
        ),
        (
            "invalid_client",
            (
                Grant::ClientCredentials,
                oauth(401, "invalid_client", None),
                Outcome::Rejected,
                State::NeedsLogin,
            ),
        ),
        (
            "unauthorized_client",
            (
                Grant::Password,
                oauth(400, "unauthorized_client", None),
                Outcome::Rejected,
                State::NeedsLogin,
            ),
        ),
        (
            "unsupported_grant_type",
            (
                Grant::Password,
                oauth(400, "unsupported_grant_type", None),
                Outcome::Rejected,
                State::NeedsLogin,
            ),
        ),
        (
            "MFA",
            (
                Grant::Password,
                oauth(400, "invalid_grant", Some("AADSTS50076: MFA required")),
                Outcome::Rejected,
                State::NeedsLogin,
            ),
        ),
        (
            "consent",
            (
                Grant::Password,
                oauth(400, "invalid_grant", Some("AADSTS65001: consent")),
                Outcome::Rejected,
                State::NeedsLogin,
            ),
        ),
        (
            "locked",
            (
                Grant::Password,
                oauth(400, "invalid_grant", Some("AADSTS50053: locked")),
                Outcome::Rejected,
                State::NeedsLogin,
            ),
        ),
        (
            "unknown 4xx",
            (
                Grant::ClientCredentials,
                oauth(400, "invalid_request", None),
                Outcome::Rejected,
                State::NeedsLogin,
            ),
        ),
    ];
    for (name, (grant, event, outcome, state)) in cases {
        let mut core = Core::new(policy(grant), 3);
        core.step(T0, Event::Start);
        let out = core.step(T0, event);
        assert_eq!(out.finished.map(|f| f.1), Some(outcome), "{name}");
        assert_eq!(core.state(T0), state, "{name}");
        assert!(out.persist, "{name}: a new state is stored");
        assert_eq!(out.request, None, "{name}: nothing is sent at once");
        assert!(core.last_error().is_some(), "{name}");
        match state {
            State::Retrying => assert!(
                out.wake_at.unwrap() <= T0 + SEC,
                "{name}: first retry within 1 s"
            ),
            _ => assert_eq!(
                out.wake_at,
                Some(T0 + Policy::LOGIN_RETRY),
                "{name}: slow retries only"
            ),
        }
    }
}

#[test]
fn repeated_identical_failures_are_stored_once() {
    let mut core = Core::new(policy(Grant::ClientCredentials), 3);
    core.step(T0, Event::Start);
    let mut out = core.step(T0, transient());
    assert!(out.persist, "the first failure changes the state");
    for _ in 0..10 {
        let now = out.wake_at.unwrap();
        assert!(core.step(now, Event::Timer).request.is_some());
        out = core.step(now, transient());
        assert!(!out.persist, "the same failure again: nothing new to store");
    }
    let now = out.wake_at.unwrap();
    core.step(now, Event::Timer);
    assert!(
        core.step(now, oauth(401, "invalid_client", None)).persist,
        "a new failure is stored"
    );
}

#[test]
fn rate_limits_wait_for_retry_after() {
    let mut core = Core::new(policy(Grant::ClientCredentials), 3);
    core.step(T0, Event::Start);
    let out = core.step(
        T0,
        Event::Failure(Failure::RateLimited {
            retry_after: Some(RetryAfter::Delay(Duration::from_secs(30))),
        }),
    );
    assert_eq!(out.wake_at, Some(T0 + Duration::from_secs(30)));
    assert_eq!(
        out.finished,
        Some((
            Request::Login(Grant::ClientCredentials),
            Outcome::TransientError
        ))
    );
    assert_eq!(
        core.step(T0 + Duration::from_secs(29), Event::Timer)
            .request,
        None
    );
    assert!(
        core.step(T0 + Duration::from_secs(30), Event::Timer)
            .request
            .is_some()
    );
    // An absurd Retry-After is capped.
    core.step(
        T0,
        Event::Failure(Failure::RateLimited {
            retry_after: Some(RetryAfter::Delay(Duration::from_secs(10 * 86_400))),
        }),
    );
    assert_eq!(core.next_refresh_at(), core.next_refresh_at());
    let out = core.step(T0 + Duration::from_secs(31), Event::Timer);
    assert_eq!(out.wake_at, Some(T0 + Policy::RETRY_AFTER_CAP));
}

fn unavailable(retry_after: Option<RetryAfter>) -> Event {
    Event::Failure(Failure::Transient {
        kind: TransientKind::Status(503),
        reason: "the token endpoint answered HTTP 503".into(),
        retry_after,
    })
}

#[test]
fn a_503_waits_for_its_retry_after() {
    // Seen: `503` with `Retry-After: 1` was retried on the full-jitter backoff, 567 ms later.
    for (name, stated, due) in [
        (
            "seconds",
            RetryAfter::Delay(Duration::from_secs(30)),
            T0 + Duration::from_secs(30),
        ),
        (
            "an HTTP-date, read on the core's clock",
            RetryAfter::At(T0 + Duration::from_secs(90)),
            T0 + Duration::from_secs(90),
        ),
        (
            "one second, more than the first backoff's ceiling",
            RetryAfter::Delay(SEC),
            T0 + SEC,
        ),
    ] {
        let mut core = Core::new(policy(Grant::ClientCredentials), 3);
        core.step(T0, Event::Start);
        let out = core.step(T0, unavailable(Some(stated)));
        assert_eq!(out.wake_at, Some(due), "{name}");
        assert_eq!(
            out.finished,
            Some((
                Request::Login(Grant::ClientCredentials),
                Outcome::TransientError
            )),
            "{name}"
        );
        assert_eq!(core.state(T0), State::Retrying, "{name}");
        assert!(
            core.last_error().is_some_and(|e| e.contains("Retry-After")),
            "{name}: {:?}",
            core.last_error()
        );
        assert_eq!(
            core.step(due - Duration::from_millis(1), Event::Timer)
                .request,
            None,
            "{name}: nothing before Retry-After"
        );
        assert!(
            core.step(due, Event::Timer).request.is_some(),
            "{name}: the retry at Retry-After"
        );
    }

    // An absurd Retry-After is capped, as on a 429.
    let mut core = Core::new(policy(Grant::ClientCredentials), 3);
    core.step(T0, Event::Start);
    let out = core.step(
        T0,
        unavailable(Some(RetryAfter::Delay(Duration::from_secs(10 * 86_400)))),
    );
    assert_eq!(out.wake_at, Some(T0 + Policy::RETRY_AFTER_CAP));

    // Without Retry-After a 503 is an ordinary transient failure: within the first backoff.
    let mut core = Core::new(policy(Grant::ClientCredentials), 3);
    core.step(T0, Event::Start);
    assert!(core.step(T0, unavailable(None)).wake_at.unwrap() <= T0 + SEC);
}

#[test]
fn a_retry_after_of_zero_still_backs_off() {
    // A server repeating `Retry-After: 0` must not be asked again in a tight loop: the backoff
    // still grows underneath the stated delay.
    for zero in [
        Event::Failure(Failure::RateLimited {
            retry_after: Some(RetryAfter::Delay(Duration::ZERO)),
        }),
        unavailable(Some(RetryAfter::Delay(Duration::ZERO))),
    ] {
        let is_429 = matches!(zero, Event::Failure(Failure::RateLimited { .. }));
        let again = || {
            if is_429 {
                Event::Failure(Failure::RateLimited {
                    retry_after: Some(RetryAfter::Delay(Duration::ZERO)),
                })
            } else {
                unavailable(Some(RetryAfter::Delay(Duration::ZERO)))
            }
        };
        let mut core = Core::new(policy(Grant::ClientCredentials), 3);
        core.step(T0, Event::Start);
        let mut now = T0;
        let mut out = core.step(now, zero);
        for _ in 0..10 {
            now = out.wake_at.unwrap();
            assert!(core.step(now, Event::Timer).request.is_some());
            out = core.step(now, again());
        }
        assert!(
            now.since(T0) > Duration::from_secs(60),
            "429: {is_429}: eleven answers in {:?}",
            now.since(T0)
        );
    }
}

#[test]
fn rate_limits_read_an_http_date_on_the_cores_clock() {
    let mut core = Core::new(policy(Grant::ClientCredentials), 3);
    core.step(T0, Event::Start);
    let out = core.step(
        T0,
        Event::Failure(Failure::RateLimited {
            retry_after: Some(RetryAfter::At(T0 + Duration::from_secs(45))),
        }),
    );
    assert_eq!(out.wake_at, Some(T0 + Duration::from_secs(45)));
}

#[test]
fn which_error_descriptions_need_a_person_is_the_presets_word() {
    // Azure AD refuses a refresh for MFA with `invalid_grant`. For Nextech (whose preset lists
    // the AADSTS codes) that parks the account: a password login would hit the same wall, and
    // bad passwords in a loop lock the account.
    let mfa = || {
        oauth(
            400,
            "invalid_grant",
            Some("AADSTS50076: Due to a configuration change, you must use MFA"),
        )
    };
    let mut core = logged_in_nextech();
    let at = core.next_refresh_at().unwrap();
    core.step(at, Event::Timer);
    let out = core.step(at, mfa());
    assert_eq!(out.finished, Some((Request::Refresh, Outcome::Rejected)));
    assert_eq!(out.request, None);
    assert_eq!(core.state(at), State::NeedsLogin);

    // A vendor without such codes reads the same answer by its `error` alone: a dead refresh
    // token, so the password grant logs in again at once.
    let generic = Policy {
        needs_person_codes: &[],
        ..nextech()
    };
    let mut core = Core::new(generic, 7);
    core.step(T0, Event::Start);
    core.step(
        T0,
        success(
            r#"{"access_token":"a1","refresh_token":"r1","expires_in":3600}"#,
            T0,
        ),
    );
    let at = core.next_refresh_at().unwrap();
    core.step(at, Event::Timer);
    let out = core.step(at, mfa());
    assert_eq!(out.finished, Some((Request::Refresh, Outcome::Rejected)));
    assert_eq!(out.request, Some(Request::Login(Grant::Password)));
}

#[test]
fn an_accounts_policy_carries_its_presets_codes() {
    let text = r#"
[accounts.nx]
vendor = "nextech"
client_id = "c"
username = "u"
password = "p"
practice_id = "1"

[accounts.other]
vendor = "generic"
token_url = "https://id.example.com/token"
grant = "client_credentials"
client_id = "c"
client_secret = "s"
"#;
    let loaded = crate::config::load_text(
        std::path::Path::new("/etc/ehrsync/ehrsync.toml"),
        text,
        &crate::config::Env::from_iter(Vec::<(String, String)>::new()),
        &crate::config::Secrets::All,
    )
    .unwrap();
    let policy = |name: &str| {
        let account = loaded
            .config
            .accounts
            .iter()
            .find(|a| a.name.as_str() == name)
            .unwrap();
        Policy::for_account(account)
    };
    assert_eq!(
        policy("nx").needs_person_codes,
        crate::vendor::NEXTECH.needs_person_codes
    );
    assert!(policy("nx").needs_person_codes.contains(&"AADSTS50126"));
    assert!(policy("other").needs_person_codes.is_empty());
}

#[test]
fn a_failing_refresh_keeps_serving_the_token_until_it_expires() {
    let mut core = Core::new(policy(Grant::ClientCredentials), 3);
    core.step(T0, Event::Start);
    core.step(
        T0,
        success(r#"{"access_token":"a1","expires_in":1200}"#, T0),
    );
    let mut now = core.next_refresh_at().unwrap();
    let expiry = T0 + Duration::from_secs(1200);
    let mut out = core.step(now, Event::Timer);
    while now < expiry + Duration::from_secs(600) {
        if out.request.is_some() {
            out = core.step(now, transient());
        }
        let state = core.state(now);
        if now < expiry {
            assert_eq!(state, State::Retrying, "at {now}");
            assert_eq!(
                core.valid_tokens(now).unwrap().access_token.expose_secret(),
                "a1"
            );
        } else {
            assert_eq!(state, State::Expired, "at {now}");
            assert!(core.valid_tokens(now).is_none());
        }
        now = out.wake_at.unwrap();
        out = core.step(now, Event::Timer);
    }
}

#[test]
fn a_401_forces_at_most_one_refresh_per_token() {
    let mut core = logged_in_nextech();
    let t = T0 + Duration::from_secs(60);
    assert_eq!(
        core.step(t, Event::Unauthorized { generation: 1 }).request,
        Some(Request::Refresh)
    );
    // Concurrent 401s while the refresh is in flight send nothing more.
    assert_eq!(
        core.step(t, Event::Unauthorized { generation: 1 }).request,
        None
    );
    core.step(
        t,
        success(
            r#"{"access_token":"a2","refresh_token":"r2","expires_in":3600}"#,
            t,
        ),
    );
    // A 401 seen with the old token: it has changed meanwhile, nothing to do.
    assert_eq!(
        core.step(t, Event::Unauthorized { generation: 1 }).request,
        None
    );
    // The new token gets its one forced refresh, and no second.
    assert_eq!(
        core.step(t, Event::Unauthorized { generation: 2 }).request,
        Some(Request::Refresh)
    );
    core.step(t, transient());
    assert_eq!(
        core.step(t + SEC, Event::Unauthorized { generation: 2 })
            .request,
        None
    );
}

#[test]
fn a_readers_min_valid_refreshes_early_once_per_token() {
    let mut core = logged_in_nextech();
    // Younger than a tenth of its lifetime, at most a minute: a refresh would not give more.
    assert_eq!(
        core.step(
            T0 + Duration::from_secs(30),
            Event::RefreshEarly { generation: 1 }
        )
        .request,
        None
    );
    let t = T0 + Duration::from_secs(600);
    assert_eq!(
        core.step(t, Event::RefreshEarly { generation: 1 }).request,
        Some(Request::Refresh)
    );
    // Many readers, one request: nothing more while it is in flight.
    assert_eq!(
        core.step(t, Event::RefreshEarly { generation: 1 }).request,
        None
    );
    core.step(t, transient());
    // Failures are the owner's to retry on its schedule; readers add nothing.
    assert_eq!(
        core.step(t + SEC, Event::RefreshEarly { generation: 1 })
            .request,
        None
    );
    let mut core = logged_in_nextech();
    core.step(t, Event::RefreshEarly { generation: 1 });
    core.step(
        t,
        success(
            r#"{"access_token":"a2","refresh_token":"r2","expires_in":3600}"#,
            t,
        ),
    );
    assert_eq!(core.state(t), State::Valid);
    // The old generation asks no more; the new one gets its own single early refresh.
    assert_eq!(
        core.step(t, Event::RefreshEarly { generation: 1 }).request,
        None
    );
    assert_eq!(
        core.step(t, Event::RefreshEarly { generation: 2 }).request,
        None,
        "the new token is too young"
    );
    let later = t + Duration::from_secs(60);
    assert_eq!(
        core.step(later, Event::RefreshEarly { generation: 2 })
            .request,
        Some(Request::Refresh)
    );
}

#[test]
fn min_valid_never_parks_a_person_grant_without_a_refresh_token() {
    // A person logged in; the provider gave no refresh token. The access token still works.
    let saved = Saved {
        tokens: Some(tokens(T0, DAY)),
        generation: 1,
        next_refresh_at: None,
        needs_login: false,
        last_error: None,
    };
    let mut core = Core::restore(policy(Grant::AuthorizationCode), 3, saved);
    core.step(T0, Event::Start);
    let t = T0 + Duration::from_secs(60);
    let out = core.step(t, Event::RefreshEarly { generation: 1 });
    assert_eq!(out.request, None);
    assert_eq!(core.state(t), State::Valid, "not needs_login");
}

#[test]
fn a_person_grant_refreshes_before_its_refresh_token_dies_then_needs_login() {
    // Net Health: authorization_code by a person, then refresh tokens with a 2 h lifetime here.
    let p = Policy {
        refresh_default: Some(Duration::from_secs(7200)),
        ..policy(Grant::AuthorizationCode)
    };
    let mut core = Core::new(p.clone(), 3);
    let out = core.step(T0, Event::Start);
    assert_eq!(out.request, None);
    assert_eq!(
        core.state(T0),
        State::NeedsLogin,
        "nothing stored: only `ehrsync login` can start it"
    );
    assert_eq!(out.wake_at, None);

    // After a login stored tokens (access 1 day, refresh 2 h), the plan is before the refresh token dies.
    let saved = Saved {
        tokens: Some(Tokens {
            refresh: Some(RefreshToken {
                token: SecretString::from("r"),
                issued_at: T0,
                expires_at: Some(T0 + Duration::from_secs(7200)),
            }),
            ..tokens(T0, DAY)
        }),
        generation: 0,
        next_refresh_at: None,
        needs_login: false,
        last_error: None,
    };
    let mut core = Core::restore(p, 3, saved);
    let out = core.step(T0, Event::Start);
    assert_eq!(out.wake_at, Some(T0 + Duration::from_secs(7200 - 60)));
    let now = T0 + Duration::from_secs(7200 - 60);
    assert_eq!(core.step(now, Event::Timer).request, Some(Request::Refresh));
    // The provider says the refresh token was revoked: only a person can help, and no retries.
    let out = core.step(now, oauth(400, "invalid_grant", Some("revoked")));
    assert_eq!(out.request, None);
    assert_eq!(core.state(now), State::NeedsLogin);
    assert_eq!(out.wake_at, None);
    assert!(core.last_error().unwrap().contains("ehrsync login"));
}

#[test]
fn a_restart_with_a_valid_token_sends_nothing() {
    let core = logged_in_nextech();
    let planned = core.next_refresh_at().unwrap();
    let mut restarted = Core::restore(nextech(), 99, core.snapshot());
    let out = restarted.step(T0 + Duration::from_secs(600), Event::Start);
    assert_eq!(out.request, None);
    assert_eq!(out.wake_at, Some(planned), "the stored plan is kept");
    // A restart after the planned time refreshes at once.
    let mut late = Core::restore(nextech(), 99, core.snapshot());
    assert_eq!(
        late.step(planned + SEC, Event::Start).request,
        Some(Request::Refresh)
    );
}

#[test]
fn stray_answers_change_nothing() {
    let mut core = Core::new(nextech(), 3);
    let out = core.step(T0, success(r#"{"access_token":"a1"}"#, T0));
    assert_eq!(out, Output::default());
    assert!(core.tokens().is_none());
    let out = core.step(T0, transient());
    assert_eq!(out, Output::default());
}

/// A Nextech-like token server: 1 h access tokens (as strings, like Azure AD v1), rotating
/// refresh tokens valid 14 days, and an outage window in which it answers nothing.
struct NextechServer {
    refresh_tokens: HashMap<String, Timestamp>,
    outage: (Timestamp, Timestamp),
    issued: u64,
    logins: u32,
    refreshes: u32,
    dead_refreshes: u32,
}

impl NextechServer {
    fn answer(&mut self, now: Timestamp, request: Request, refresh_token: Option<String>) -> Event {
        if now >= self.outage.0 && now < self.outage.1 {
            return transient();
        }
        match request {
            Request::Login(Grant::Password) => self.logins += 1,
            Request::Refresh => {
                let rt = refresh_token.expect("a refresh request carries a refresh token");
                match self.refresh_tokens.remove(&rt) {
                    Some(exp) if exp > now => self.refreshes += 1,
                    _ => {
                        self.dead_refreshes += 1;
                        return oauth(400, "invalid_grant", Some("AADSTS70008: expired"));
                    }
                }
            }
            other => panic!("unexpected request {other:?}"),
        }
        self.issued += 1;
        let rt = format!("rt-{}", self.issued);
        self.refresh_tokens.insert(rt.clone(), now + 14 * DAY);
        success(
            &format!(
                r#"{{"token_type":"Bearer","expires_in":"3599","access_token":"at-{}","refresh_token":"{rt}"}}"#,
                self.issued
            ),
            now,
        )
    }
}

#[test]
fn nextech_survives_30_days_with_a_15_day_outage() {
    let outage = (T0 + 10 * DAY, T0 + 25 * DAY);
    let mut server = NextechServer {
        refresh_tokens: HashMap::new(),
        outage,
        issued: 0,
        logins: 0,
        refreshes: 0,
        dead_refreshes: 0,
    };
    let mut core = Core::new(nextech(), 11);
    let end = T0 + 30 * DAY;
    let latency = Duration::from_millis(300);
    let mut now = T0;
    let mut out = core.step(now, Event::Start);
    let mut gaps = Duration::ZERO;
    let mut steps = 0u32;
    let mut in_flight = 0;
    while now < end {
        steps += 1;
        assert!(steps < 100_000, "runaway");
        if let Some(request) = out.request {
            in_flight += 1;
            assert_eq!(in_flight, 1, "one request at a time");
            if request == Request::Refresh && (now < outage.0 || now >= outage.1) {
                let t = core.tokens().unwrap();
                assert!(
                    t.expires_at.since(now) >= Duration::from_secs(59),
                    "refresh at least min_lead before expiry"
                );
            }
            let rt = core
                .tokens()
                .and_then(|t| t.refresh.as_ref())
                .map(|r| r.token.expose_secret().to_owned());
            now = now + latency;
            let answer = server.answer(now, request, rt);
            in_flight -= 1;
            out = core.step(now, answer);
            continue;
        }
        let wake = out
            .wake_at
            .expect("the core always has a next wake-up here");
        assert!(wake >= now, "no wake-ups in the past");
        // Time without a valid token, outside the outage and the recovery after it: retries are
        // at most one backoff cap apart, so service returns within that (plus latency).
        if let Some(t) = core.tokens() {
            let lost_from = t.expires_at.max(now);
            if wake > lost_from {
                let outside = |a: Timestamp, b: Timestamp| {
                    let (o0, o1) = (outage.0, outage.1 + Policy::BACKOFF_CAP + latency);
                    let before = b.min(o0).since(a);
                    let after = b.since(a.max(o1));
                    before + if b > o1 { after } else { Duration::ZERO }
                };
                gaps += outside(lost_from, wake.min(end));
            }
        }
        now = wake;
        out = core.step(now, Event::Timer);
    }
    assert_eq!(
        gaps,
        Duration::ZERO,
        "a valid token at every moment outside the outage"
    );
    assert_eq!(
        server.dead_refreshes, 0,
        "the dead refresh token is never tried: re-login instead"
    );
    assert_eq!(
        server.logins, 2,
        "the first login and one re-login after the outage"
    );
    // ~45 min per refresh for 15 days of service.
    assert!(
        server.refreshes > 400 && server.refreshes < 560,
        "{}",
        server.refreshes
    );
    assert!(
        core.valid_tokens(now).is_some(),
        "a valid token at the end: {:?}",
        core.state(now)
    );
}

/// A Net Health (authorization code) core holding tokens a person's login stored at T0.
fn logged_in_person_grant() -> Core {
    let mut core = Core::new(policy(Grant::AuthorizationCode), 5);
    core.logged_in(
        T0,
        parse_success(br#"{"access_token":"a1","refresh_token":"r1","expires_in":3600}"#).unwrap(),
        T0,
    );
    core
}

#[test]
fn a_refused_refresh_on_a_person_grant_says_the_server_refused_it() {
    let mut core = logged_in_person_grant();
    let at = core.next_refresh_at().unwrap();
    assert_eq!(core.step(at, Event::Timer).request, Some(Request::Refresh));
    core.step(at, oauth(400, "invalid_grant", Some("grant revoked")));
    assert_eq!(core.state(at), State::NeedsLogin);
    let e = core.last_error().unwrap();
    assert!(
        e.contains("the refresh token was refused: invalid_grant (grant revoked)"),
        "{e}"
    );
    assert!(e.contains("log in again"), "{e}");
    assert!(!e.contains("no refresh token"), "{e}");
}

#[test]
fn an_interrupted_refresh_logs_in_again_where_no_person_is_needed() {
    let mut core = logged_in_nextech();
    let at = core.next_refresh_at().unwrap();
    assert_eq!(core.step(at, Event::Timer).request, Some(Request::Refresh));
    // The lease holder found another process's refresh intent, never answered.
    assert_eq!(
        core.refresh_interrupted(at),
        Some(Request::Login(Grant::Password)),
        "a refresh token that may be rotated already is not presented"
    );
    assert!(core.tokens().unwrap().refresh.is_none());
    let out = core.step(
        at,
        success(
            r#"{"access_token":"a2","refresh_token":"r2","expires_in":3600}"#,
            at,
        ),
    );
    assert_eq!(
        out.finished,
        Some((Request::Login(Grant::Password), Outcome::Success))
    );
}

#[test]
fn an_interrupted_refresh_of_a_person_grant_tries_once_then_says_why() {
    let mut core = logged_in_person_grant();
    let at = core.next_refresh_at().unwrap();
    core.step(at, Event::Timer);
    assert_eq!(core.refresh_interrupted(at), Some(Request::Refresh));
    core.step(at, oauth(400, "invalid_grant", None));
    assert_eq!(core.state(at), State::NeedsLogin);
    let e = core.last_error().unwrap();
    assert!(e.contains("cut short"), "{e}");
    // Succeeding instead clears the suspicion: a later refusal is worded plainly.
    let mut core = logged_in_person_grant();
    core.step(at, Event::Timer);
    core.refresh_interrupted(at);
    core.step(
        at,
        success(
            r#"{"access_token":"a2","refresh_token":"r2","expires_in":3600}"#,
            at,
        ),
    );
    let next = core.next_refresh_at().unwrap();
    core.step(next, Event::Timer);
    core.step(next, oauth(400, "invalid_grant", None));
    assert!(!core.last_error().unwrap().contains("cut short"));
}

#[test]
fn a_response_with_an_absurd_lifetime_keeps_its_refresh_token() {
    let mut core = logged_in_nextech();
    let at = core.next_refresh_at().unwrap();
    core.step(at, Event::Timer);
    let out = core.step(
        at,
        success(
            r#"{"access_token":"a2","refresh_token":"r2","expires_in":1e309}"#,
            at,
        ),
    );
    assert_eq!(
        out.finished,
        Some((Request::Refresh, Outcome::TransientError))
    );
    assert!(out.persist, "the rotated refresh token is stored");
    let t = core.tokens().unwrap();
    assert_eq!(t.refresh.as_ref().unwrap().token.expose_secret(), "r2");
    assert!(t.expires_at <= at, "the access token is never handed out");
    assert!(core.valid_tokens(at).is_none());
    assert!(core.last_error().unwrap().contains("not a finite number"));
    // The retry presents the new refresh token.
    let retry = core.next_refresh_at().unwrap_or(at);
    let out = core.step(retry.max(at + Duration::from_secs(600)), Event::Timer);
    assert_eq!(out.request, Some(Request::Refresh));
}
