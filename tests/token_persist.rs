//! Token state survives a restart encrypted: a still-valid stored token is reused with no token
//! request, no token is ever in the database file as plain text, and a changed key means a
//! clean re-login rather than an error loop.

mod common;

use std::time::Duration;

use ehrsync::store::Store;
use ehrsync::token::Timestamp;
use ehrsync::token::core::{Core, Event, Policy, Request, State};
use ehrsync::token::persist::{from_record, to_record};
use ehrsync::token::response::parse_success;
use ehrsync::vendor::Grant;
use secrecy::ExposeSecret;

const ACCESS: &str = "access-secret-5d1f9a";
const REFRESH: &str = "refresh-secret-0b77c2";

fn policy() -> Policy {
    Policy {
        access_default: Some(Duration::from_secs(3600)),
        refresh_default: Some(Duration::from_secs(14 * 86_400)),
        ..Policy::with_defaults(Grant::Password)
    }
}

fn now() -> Timestamp {
    Timestamp::from_unix_millis(chrono::Utc::now().timestamp_millis())
}

fn logged_in_core(at: Timestamp) -> Core {
    let mut core = Core::new(policy(), 5);
    assert_eq!(
        core.step(at, Event::Start).request,
        Some(Request::Login(Grant::Password))
    );
    let body = format!(
        r#"{{"access_token":"{ACCESS}","refresh_token":"{REFRESH}","expires_in":"3599","token_type":"Bearer"}}"#
    );
    core.step(
        at,
        Event::Success {
            response: parse_success(body.as_bytes()).unwrap(),
            sent_at: at,
        },
    );
    core
}

fn file_contains(path: &std::path::Path, needle: &str) -> bool {
    std::fs::read(path)
        .is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle.as_bytes()))
}

#[tokio::test]
async fn a_valid_stored_token_is_reused_after_restart_and_never_stored_in_clear() {
    let dir = tempfile::tempdir().unwrap();
    let db = common::fresh_database(dir.path());
    let key = dir.path().join("ehrsync.key");
    let store = Store::open(&db).await.unwrap();
    let cipher = common::cipher_in(&key);

    let t0 = now();
    let core = logged_in_core(t0);
    let planned = core.next_refresh_at().unwrap();
    store
        .save_token(
            &to_record("nextech-main", &core, t0, &cipher).unwrap(),
            None,
        )
        .await
        .unwrap();

    match &db {
        ehrsync::config::Database::File(_) => {
            for file in ["ehrsync.db", "ehrsync.db-wal"] {
                let path = dir.path().join(file);
                for secret in [ACCESS, REFRESH] {
                    assert!(
                        !file_contains(&path, secret),
                        "{secret} in {file} as plain text"
                    );
                }
            }
        }
        ehrsync::config::Database::Postgres { .. } => {
            for secret in [ACCESS, REFRESH] {
                let found = common::db_rows(
                    &db,
                    "SELECT count(*) AS n FROM token_state WHERE strpos(encode(\
                     coalesce(access_token, ''::bytea) || coalesce(refresh_token, ''::bytea), \
                     'escape'), ?) > 0",
                    &[secret],
                )
                .await
                .unwrap();
                assert_eq!(found[0].int("n"), 0, "{secret} stored as plain text");
            }
        }
    }
    store.close().await;

    // "Restart": a new store, a new cipher from the same key file, a new core.
    let store = Store::open(&db).await.unwrap();
    let cipher = common::cipher_in(&key);
    let record = store.load_token("nextech-main").await.unwrap().unwrap();
    assert_eq!(record.state, "valid");
    let (saved, problem) = from_record(record, &cipher);
    assert!(problem.is_none());
    let mut restarted = Core::restore(policy(), 6, saved);
    let later = t0 + Duration::from_secs(300);
    let out = restarted.step(later, Event::Start);
    assert_eq!(out.request, None, "a still-valid token: no token request");
    let wake = out.wake_at.unwrap();
    assert!(
        wake <= planned && planned.since(wake) < Duration::from_secs(1),
        "the plan survives (to the second)"
    );
    let tokens = restarted.valid_tokens(later).unwrap();
    assert_eq!(tokens.access_token.expose_secret(), ACCESS);
    assert_eq!(
        tokens.refresh.as_ref().unwrap().token.expose_secret(),
        REFRESH
    );
    assert_eq!(restarted.state(later), State::Valid);
    store.close().await;
}

#[tokio::test]
async fn a_changed_key_means_a_clean_login_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(common::fresh_database(dir.path()))
        .await
        .unwrap();
    let first = common::cipher_in(&dir.path().join("a.key"));
    let t0 = now();
    store
        .save_token(
            &to_record("acct", &logged_in_core(t0), t0, &first).unwrap(),
            None,
        )
        .await
        .unwrap();

    let second = common::cipher_in(&dir.path().join("b.key"));
    let (saved, problem) = from_record(store.load_token("acct").await.unwrap().unwrap(), &second);
    assert!(problem.is_some());
    assert!(saved.tokens.is_none());
    let mut core = Core::restore(policy(), 1, saved);
    assert_eq!(
        core.step(t0, Event::Start).request,
        Some(Request::Login(Grant::Password))
    );
    store.close().await;
}

#[tokio::test]
async fn needs_login_survives_a_restart_without_a_new_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(common::fresh_database(dir.path()))
        .await
        .unwrap();
    let cipher = common::cipher_in(&dir.path().join("k"));
    let t0 = now();
    let mut core = Core::new(policy(), 1);
    core.step(t0, Event::Start);
    let bad_password = ehrsync::token::core::Failure::OAuth {
        status: 400,
        error: ehrsync::token::response::parse_error(br#"{"error":"invalid_grant","error_description":"AADSTS50126: invalid username or password"}"#).unwrap(),
    };
    core.step(t0, Event::Failure(bad_password));
    store
        .save_token(&to_record("acct", &core, t0, &cipher).unwrap(), None)
        .await
        .unwrap();

    let record = store.load_token("acct").await.unwrap().unwrap();
    assert_eq!(record.state, "needs_login");
    assert!(
        record
            .last_error
            .as_deref()
            .unwrap()
            .contains("AADSTS50126")
    );
    let (saved, _) = from_record(record, &cipher);
    let mut restarted = Core::restore(policy(), 2, saved);
    let out = restarted.step(t0 + Duration::from_secs(5), Event::Start);
    assert_eq!(out.request, None, "a restart must not retry a bad password");
    assert!(out.wake_at.unwrap() >= t0 + Duration::from_secs(3599));
    store.close().await;
}
