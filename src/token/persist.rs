//! Between the lifecycle core's [`Saved`] state and the `token_state` row: tokens sealed with
//! the [`TokenCipher`] (bound to account and column), times in whole seconds (rounded down, so a
//! restored expiry is never later than the real one).

use secrecy::ExposeSecret;

use super::Timestamp;
use super::core::{Core, RefreshToken, Saved, Tokens};
use crate::config::{Account, TokenEndpoint};
use crate::crypto::{KeyError, OpenError, TokenCipher};
use crate::store::TokenRecord;

fn aad(account: &str, column: &str) -> Vec<u8> {
    format!("ehrsync/token_state/{account}/{column}").into_bytes()
}

fn secs(t: Timestamp) -> i64 {
    t.unix_seconds()
}

fn from_secs(s: i64) -> Timestamp {
    Timestamp::from_unix_millis(s.saturating_mul(1000))
}

/// The row that stores `core`'s state for `account` at `now`.
pub fn to_record(
    account: &str,
    core: &Core,
    now: Timestamp,
    cipher: &TokenCipher,
) -> Result<TokenRecord, KeyError> {
    let saved = core.snapshot();
    let tokens = saved.tokens.as_ref();
    let refresh = tokens.and_then(|t| t.refresh.as_ref());
    Ok(TokenRecord {
        account: account.to_owned(),
        state: core.state(now).as_str().to_owned(),
        access_token: tokens
            .map(|t| {
                cipher.seal(
                    &aad(account, "access_token"),
                    t.access_token.expose_secret().as_bytes(),
                )
            })
            .transpose()?,
        access_token_issued_at: tokens.map(|t| secs(t.issued_at)),
        access_token_expires_at: tokens.map(|t| secs(t.expires_at)),
        next_refresh_at: saved.next_refresh_at.map(secs),
        refresh_token: refresh
            .map(|r| {
                cipher.seal(
                    &aad(account, "refresh_token"),
                    r.token.expose_secret().as_bytes(),
                )
            })
            .transpose()?,
        refresh_token_issued_at: refresh.map(|r| secs(r.issued_at)),
        refresh_token_expires_at: refresh.and_then(|r| r.expires_at).map(secs),
        generation: i64::try_from(saved.generation).unwrap_or(i64::MAX),
        last_error: saved.last_error,
        updated_at: secs(now),
        // Storing the state answers any request in flight.
        request_holder: None,
        request_generation: None,
        request_sent_at: None,
        credentials: None,
    })
}

/// The core state stored in `record`. Tokens that cannot be opened (the key changed, the row
/// was altered) are dropped — the account logs in again — and the reason is returned.
pub fn from_record(record: TokenRecord, cipher: &TokenCipher) -> (Saved, Option<OpenError>) {
    let account = record.account.as_str();
    let mut problem = None;
    let mut open = |column: &str, sealed: Option<Vec<u8>>| {
        sealed.and_then(|s| {
            cipher
                .open(&aad(account, column), &s)
                .map_err(|e| problem = Some(e))
                .ok()
        })
    };
    let access = open("access_token", record.access_token);
    let refresh = open("refresh_token", record.refresh_token);
    let tokens = match (
        access,
        record.access_token_issued_at,
        record.access_token_expires_at,
    ) {
        (Some(access_token), Some(issued), Some(expires)) if problem.is_none() => Some(Tokens {
            access_token,
            issued_at: from_secs(issued),
            expires_at: from_secs(expires),
            refresh: refresh.map(|token| RefreshToken {
                token,
                issued_at: from_secs(record.refresh_token_issued_at.unwrap_or(issued)),
                expires_at: record.refresh_token_expires_at.map(from_secs),
            }),
            generation: u64::try_from(record.generation).unwrap_or(0),
        }),
        _ => None,
    };
    let saved = Saved {
        tokens,
        generation: u64::try_from(record.generation).unwrap_or(0),
        next_refresh_at: record.next_refresh_at.map(from_secs),
        needs_login: record.state == "needs_login",
        last_error: record.last_error,
    };
    (saved, problem)
}

/// The keyed fingerprint of what `account` logs in with: grant, token endpoint, client id and
/// secret, user name and password. Stored beside the token state, it tells a parked account
/// whose credentials were fixed since they were refused (try once, at once) from one whose
/// credentials are the same (wait for `login_retry`). Never the credentials themselves.
pub fn credentials_fingerprint(account: &Account, cipher: &TokenCipher) -> String {
    let endpoint = match &account.token_endpoint {
        TokenEndpoint::Url(url) => url.as_str(),
        TokenEndpoint::Discovery { issuer } => issuer.as_str(),
    };
    fn secret(s: &Option<crate::config::Secret>) -> &str {
        s.as_ref().map_or("", |s| s.expose())
    }
    cipher.fingerprint(
        "ehrsync/credentials/v1",
        &[
            account.grant.as_str().as_bytes(),
            endpoint.as_bytes(),
            account.client_id.as_bytes(),
            secret(&account.client_secret).as_bytes(),
            account.username.as_deref().unwrap_or("").as_bytes(),
            secret(&account.password).as_bytes(),
        ],
    )
}
