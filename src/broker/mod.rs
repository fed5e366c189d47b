//! The token broker: the practice's other programs get fresh access tokens, or authenticated
//! API calls, from the agent over a local socket, without ever holding a vendor credential and
//! without ever sending a token request of their own.
//!
//! - **Who may ask**: `[broker.clients.NAME]`, each with a key (presented as
//!   `Authorization: Bearer KEY`, compared by SHA-256 in constant time against every client's)
//!   and the accounts it may use, the endpoints it may call (`token`, `api`) and whether its
//!   API calls are read-only. A wrong key gets 401; a good key asking for an account it may
//!   not use — configured or not — gets the same 403, so nobody learns which accounts exist.
//! - **What it gets**: `GET /v1/accounts/{account}/token` (the owner's current token, waited
//!   for when none is valid, refreshed early once when `min_valid` asks for more than is left)
//!   and `/v1/accounts/{account}/api/{path}` ([`proxy`]: the call made below `api_base` with
//!   the token and the account's headers added). `GET /v1/health` for the client's checks.
//! - **What is kept**: every request counted in `ehrsync_broker_requests_total`, token grants
//!   logged at info (client, account, outcome; never a token), and each client's last use
//!   ([`Usage`]) shown on the status page and stored for `ehrsync status`.
//!
//! [`server`] binds the listener (a Unix socket with its mode and group, or loopback TCP).

pub mod files;
pub mod path;
mod proxy;
pub mod server;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path as AxPath, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use secrecy::ExposeSecret;
use serde::Serialize;
use tokio::sync::watch;

use crate::clock::SharedClock;
use crate::config::{Account, BrokerClient, HeaderValue};
use crate::metrics::Metrics;
use crate::token::owner::{TokenHandle, Unavailable, Wanted};

/// How long a request waits for a valid token (the owner logging in or refreshing) before it
/// is answered 503.
pub const TOKEN_WAIT: Duration = Duration::from_secs(30);
/// The longest `min_valid` a client may ask for.
pub const MAX_MIN_VALID: Duration = Duration::from_secs(24 * 3600);

/// An account as the broker serves it: its settings and its owner's handle.
#[derive(Clone)]
pub struct Served {
    pub account: Arc<Account>,
    pub handle: TokenHandle,
}

/// The accounts that run, by name (published by the agent on every start, stop and reload).
pub type ServedAccounts = Arc<BTreeMap<String, Served>>;

/// A client's use of the broker since the agent started.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Usage {
    /// Unix seconds of its last request that presented its key.
    pub last_used_at: Option<i64>,
    /// The account of that request (`None` for `health`).
    pub last_account: Option<String>,
    /// Requests answered (any outcome after the key was accepted).
    pub requests: u64,
    /// Of those, refused (forbidden account or endpoint, bad request).
    pub refused: u64,
}

/// The broker's shared state; cheap to clone.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    clients: watch::Receiver<Arc<Vec<BrokerClient>>>,
    accounts: watch::Receiver<ServedAccounts>,
    http: reqwest::Client,
    /// How long a proxied call may take: reading the client's body, then the API's answer
    /// (the `http` client's own deadline).
    proxy_timeout: Duration,
    metrics: Metrics,
    clock: SharedClock,
    usage: Mutex<BTreeMap<String, Usage>>,
    /// What [`store_usage`] last wrote, per client: the next write adds only what is new.
    stored: tokio::sync::Mutex<BTreeMap<String, Usage>>,
}

/// Which endpoint a request used (its metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Token,
    Api,
    Health,
}

impl Endpoint {
    fn as_str(self) -> &'static str {
        match self {
            Endpoint::Token => "token",
            Endpoint::Api => "api",
            Endpoint::Health => "health",
        }
    }
}

impl Broker {
    /// A broker for `clients` and the `accounts` that run; its API calls go through a client
    /// built with `proxy_timeout` as its deadline.
    pub fn new(
        clients: watch::Receiver<Arc<Vec<BrokerClient>>>,
        accounts: watch::Receiver<ServedAccounts>,
        proxy_timeout: Duration,
        metrics: Metrics,
        clock: SharedClock,
    ) -> Result<Broker, crate::http::ClientSetupError> {
        let http = crate::http::build(crate::http::client_builder(proxy_timeout))?;
        Ok(Broker {
            inner: Arc::new(Inner {
                clients,
                accounts,
                http,
                proxy_timeout,
                metrics,
                clock,
                usage: Mutex::new(BTreeMap::new()),
                stored: tokio::sync::Mutex::new(BTreeMap::new()),
            }),
        })
    }

    /// The broker's routes. Everything below `/v1/accounts/{account}/api` goes to the proxy
    /// through the fallback, which reads the raw (undecoded) path itself.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/health", get(health))
            .route("/v1/accounts/{account}/token", get(token))
            .fallback(proxy::dispatch)
            .with_state(self.clone())
    }

    /// Each client's use so far, by name.
    pub fn usage(&self) -> BTreeMap<String, Usage> {
        self.inner
            .usage
            .lock()
            .map(|u| u.clone())
            .unwrap_or_default()
    }

    /// The client whose key `headers` present, if any. Every configured key is compared (no
    /// early exit), each in constant time, so the time taken says nothing about which matched.
    fn identify(&self, headers: &HeaderMap) -> Option<BrokerClient> {
        let presented = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
        let (scheme, key) = presented.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let key = key.trim();
        // No configured key is this short: refuse before comparing (an empty key is never one).
        if key.chars().count() < crate::config::MIN_CLIENT_KEY {
            return None;
        }
        let digest = crate::config::key_digest(key);
        let clients = self.inner.clients.borrow().clone();
        let mut found = None;
        for client in clients.iter() {
            let equal = constant_time_eq(&client.key_sha256, &digest);
            if equal && found.is_none() {
                found = Some(client.clone());
            }
        }
        found
    }

    /// The account `name` if `client` may use it on `endpoint`; `None` otherwise, whether or
    /// not such an account exists.
    fn allowed(&self, client: &BrokerClient, name: &str, endpoint: Endpoint) -> Option<Served> {
        let endpoint_ok = match endpoint {
            Endpoint::Token => client.token,
            Endpoint::Api => client.api,
            Endpoint::Health => true,
        };
        if !endpoint_ok || !client.accounts.iter().any(|a| a.as_str() == name) {
            return None;
        }
        self.inner.accounts.borrow().get(name).cloned()
    }

    /// Counts a request and notes the client's use. `account` is only ever a configured
    /// account's name (or ""): nothing a client writes becomes a metric label.
    fn record(&self, client: Option<&str>, account: &str, endpoint: Endpoint, outcome: Outcome) {
        self.inner
            .metrics
            .broker_requests
            .with_label_values(&[
                client.unwrap_or(""),
                account,
                endpoint.as_str(),
                outcome.as_str(),
            ])
            .inc();
        let Some(client) = client else {
            return;
        };
        if let Ok(mut usage) = self.inner.usage.lock() {
            let u = usage.entry(client.to_owned()).or_default();
            u.last_used_at = Some(self.inner.clock.now().unix_seconds());
            // A request without an account (health) keeps the last one, as the stored row does.
            if !account.is_empty() {
                u.last_account = Some(account.to_owned());
            }
            u.requests += 1;
            if outcome.refused() {
                u.refused += 1;
            }
        }
    }

    /// 401 for a request without a known key: the same answer whatever was presented.
    fn unknown_client(&self, endpoint: Endpoint) -> Response {
        self.record(None, "", endpoint, Outcome::Unauthorized);
        tracing::info!(
            endpoint = endpoint.as_str(),
            outcome = "unauthorized",
            "broker request without a known client key"
        );
        let mut r = error(StatusCode::UNAUTHORIZED, "a known client key is required");
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"ehrsync\""),
        );
        r
    }

    /// 403 for an account (or endpoint) the client may not use: the same answer whether the
    /// account exists or not.
    fn forbidden(&self, client: &BrokerClient, endpoint: Endpoint) -> Response {
        self.record(Some(&client.name), "", endpoint, Outcome::Forbidden);
        tracing::info!(client = %client.name, endpoint = endpoint.as_str(), outcome = "forbidden",
            "broker request for an account or endpoint the client may not use");
        error(
            StatusCode::FORBIDDEN,
            "this client may not use that account or endpoint",
        )
    }
}

/// How often clients' use is written to the database (for `ehrsync status`).
pub const USAGE_FLUSH: Duration = Duration::from_secs(15);

/// Writes clients' use to the database every [`USAGE_FLUSH`]; runs until aborted.
pub async fn flush_usage(broker: Broker, store: crate::store::Store) {
    loop {
        tokio::time::sleep(USAGE_FLUSH).await;
        store_usage(&broker, &store).await;
    }
}

/// Adds what clients did since the last write to `broker_clients`.
pub async fn store_usage(broker: &Broker, store: &crate::store::Store) {
    let mut stored = broker.inner.stored.lock().await;
    for (name, now) in broker.usage() {
        let before = stored.get(&name).cloned().unwrap_or_default();
        if before == now {
            continue;
        }
        let written = store
            .add_broker_usage(
                &name,
                now.last_used_at,
                now.last_account.as_deref(),
                now.requests.saturating_sub(before.requests),
                now.refused.saturating_sub(before.refused),
            )
            .await;
        match written {
            Ok(()) => {
                stored.insert(name, now);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot record the broker clients' use; `status` shows it late");
                return;
            }
        }
    }
}

/// How a broker request ended (its metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Granted,
    Proxied,
    Unauthorized,
    Forbidden,
    BadRequest,
    Unavailable,
    UpstreamError,
    TooLarge,
    Ok,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Granted => "granted",
            Outcome::Proxied => "proxied",
            Outcome::Unauthorized => "unauthorized",
            Outcome::Forbidden => "forbidden",
            Outcome::BadRequest => "bad_request",
            Outcome::Unavailable => "unavailable",
            Outcome::UpstreamError => "upstream_error",
            Outcome::TooLarge => "too_large",
            Outcome::Ok => "ok",
        }
    }

    fn refused(self) -> bool {
        matches!(
            self,
            Outcome::Forbidden | Outcome::BadRequest | Outcome::TooLarge
        )
    }
}

/// Compares two digests without an early exit.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// A JSON error answer: `{"error": "…"}`, never cached.
pub(crate) fn error(status: StatusCode, message: &str) -> Response {
    let mut r = (status, axum::Json(serde_json::json!({ "error": message }))).into_response();
    no_store(&mut r);
    r
}

fn no_store(r: &mut Response) {
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
}

/// The headers an API call of `account` carries besides `Authorization`, as a client that
/// calls the API itself needs them: only those whose value is not a secret. A secret header
/// (a vendor API key, say) is a credential; the proxy adds it, the token endpoint never
/// hands it out.
fn public_headers(account: &Account) -> BTreeMap<String, String> {
    account
        .headers
        .iter()
        .filter_map(|h| match &h.value {
            HeaderValue::Public(v) => Some((h.name.clone(), v.clone())),
            HeaderValue::Secret(_) => None,
        })
        .collect()
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    client: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    accounts: Vec<HealthAccount>,
}

#[derive(Serialize)]
struct HealthAccount {
    account: String,
    state: String,
    token_valid: bool,
}

/// `GET /v1/health`: `{"status":"ok"}`; with a client's key, also the client's name and the
/// state of each account it may use (a wrong key gets 401, so a client can check its key).
async fn health(State(b): State<Broker>, headers: HeaderMap) -> Response {
    if !headers.contains_key(header::AUTHORIZATION) {
        b.record(None, "", Endpoint::Health, Outcome::Ok);
        return axum::Json(Health {
            status: "ok",
            client: None,
            accounts: Vec::new(),
        })
        .into_response();
    }
    let Some(client) = b.identify(&headers) else {
        return b.unknown_client(Endpoint::Health);
    };
    let now = b.inner.clock.now();
    let served = b.inner.accounts.borrow().clone();
    let accounts = client
        .accounts
        .iter()
        .filter_map(|name| served.get(name.as_str()))
        .map(|s| {
            let snap = s.handle.snapshot();
            HealthAccount {
                account: s.account.name.to_string(),
                state: snap.state.as_str().to_owned(),
                token_valid: snap.token.as_ref().is_some_and(|t| now < t.expires_at),
            }
        })
        .collect();
    b.record(Some(&client.name), "", Endpoint::Health, Outcome::Ok);
    axum::Json(Health {
        status: "ok",
        client: Some(client.name.clone()),
        accounts,
    })
    .into_response()
}

#[derive(Serialize)]
struct TokenAnswer<'a> {
    account: &'a str,
    access_token: &'a str,
    token_type: &'static str,
    /// RFC 3339, UTC.
    expires_at: String,
    /// Whole seconds left when answered.
    expires_in: u64,
    /// Which token this is: report it with `?unauthorized=` when the API refuses it.
    generation: u64,
    headers: BTreeMap<String, String>,
}

/// `GET /v1/accounts/{account}/token[?min_valid=60s][&unauthorized=GENERATION]`.
async fn token(
    State(b): State<Broker>,
    AxPath(name): AxPath<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let Some(client) = b.identify(&headers) else {
        return b.unknown_client(Endpoint::Token);
    };
    let Some(served) = b.allowed(&client, &name, Endpoint::Token) else {
        return b.forbidden(&client, Endpoint::Token);
    };
    let account = served.account.name.as_str();
    let asked = match token_query(query.as_deref()) {
        Ok(q) => q,
        Err(message) => {
            b.record(
                Some(&client.name),
                account,
                Endpoint::Token,
                Outcome::BadRequest,
            );
            return error(StatusCode::BAD_REQUEST, &message);
        }
    };
    let handle = &served.handle;
    let wanted = tokio::time::timeout(TOKEN_WAIT, async {
        // The API refused the token the client holds: the owner's 401 rule (one refresh per
        // token), then a token of another generation. A report about an older token than the
        // current one needs nothing: the client gets the current.
        if let Some(refused) = asked.unauthorized
            && handle.snapshot().token.map(|t| t.generation) == Some(refused)
        {
            tracing::info!(client = %client.name, account, generation = refused,
                "a broker client reports the API refused the account's token");
            handle.unauthorized(refused);
            handle
                .token_after(refused)
                .await
                .map_err(Wanted::Unavailable)?;
        }
        handle.token_valid_for(asked.min_valid).await
    })
    .await;
    let (outcome, response) = match wanted {
        Ok(Ok(t)) => {
            let now = b.inner.clock.now();
            let answer = TokenAnswer {
                account,
                access_token: t.access_token.expose_secret(),
                token_type: "Bearer",
                expires_at: t.expires_at.to_string(),
                expires_in: t.expires_at.since(now).as_secs(),
                generation: t.generation,
                headers: public_headers(&served.account),
            };
            let mut r = axum::Json(answer).into_response();
            no_store(&mut r);
            (Outcome::Granted, r)
        }
        Ok(Err(Wanted::Unavailable(Unavailable::NeedsLogin(_)))) => (
            Outcome::Unavailable,
            retry_later(
                "the account needs a person to log in again (`ehrsync login`); no token can be had until then",
                60,
            ),
        ),
        Ok(Err(Wanted::Unavailable(Unavailable::Stopped))) => (
            Outcome::Unavailable,
            retry_later("the account's token owner is stopping", 5),
        ),
        Ok(Err(Wanted::LongerThanLifetime { lifetime })) => (
            Outcome::BadRequest,
            error(
                StatusCode::UNPROCESSABLE_ENTITY,
                &format!(
                    "min_valid cannot be met: the account's access tokens live {}, and one is refreshed early only once it is a tenth of that old; ask for less",
                    humantime::format_duration(lifetime)
                ),
            ),
        ),
        Err(_) => (
            Outcome::Unavailable,
            retry_later(
                "no valid token within 30 s: the vendor's token endpoint is failing or slow (see `ehrsync status`)",
                10,
            ),
        ),
    };
    b.record(Some(&client.name), account, Endpoint::Token, outcome);
    tracing::info!(client = %client.name, account, outcome = outcome.as_str(), "broker token request");
    response
}

/// 503 with `Retry-After`.
pub(crate) fn retry_later(message: &str, seconds: u32) -> Response {
    let mut r = error(StatusCode::SERVICE_UNAVAILABLE, message);
    r.headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from(seconds));
    r
}

/// What a token request asks for.
#[derive(Debug, PartialEq, Eq)]
struct TokenQuery {
    /// `min_valid` (`60s`, `5m`; default none), at most [`MAX_MIN_VALID`].
    min_valid: Duration,
    /// `unauthorized`: the generation of a token the API refused.
    unauthorized: Option<u64>,
}

fn token_query(query: Option<&str>) -> Result<TokenQuery, String> {
    let mut found = TokenQuery {
        min_valid: Duration::ZERO,
        unauthorized: None,
    };
    for (key, value) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match key.as_ref() {
            "min_valid" => {
                let d = humantime::parse_duration(&value)
                    .map_err(|_| "min_valid must be a duration such as `60s` or `5m`".to_owned())?;
                if d > MAX_MIN_VALID {
                    return Err("min_valid may be at most 24h".to_owned());
                }
                found.min_valid = d;
            }
            "unauthorized" => {
                let generation = value.parse().map_err(|_| {
                    "unauthorized must be the `generation` of the token the API refused".to_owned()
                })?;
                found.unauthorized = Some(generation);
            }
            _ => {
                return Err(
                    "unknown query parameter; the token endpoint takes min_valid and unauthorized"
                        .to_owned(),
                );
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_queries_read_durations_and_generations_and_refuse_the_rest() {
        let min = |q| token_query(Some(q)).map(|t| t.min_valid);
        assert_eq!(token_query(None).map(|t| t.min_valid), Ok(Duration::ZERO));
        assert_eq!(min("min_valid=60s"), Ok(Duration::from_secs(60)));
        assert_eq!(min("min_valid=5m"), Ok(Duration::from_secs(300)));
        assert!(min("min_valid=soon").is_err());
        assert!(min("min_valid=2d").is_err());
        assert!(min("other=1").is_err());
        assert_eq!(
            token_query(Some("unauthorized=7&min_valid=1m")),
            Ok(TokenQuery {
                min_valid: Duration::from_secs(60),
                unauthorized: Some(7)
            })
        );
        assert!(token_query(Some("unauthorized=x")).is_err());
    }

    #[test]
    fn digests_compare_whole() {
        let a = [7u8; 32];
        let mut b = a;
        assert!(constant_time_eq(&a, &b));
        b[31] = 8;
        assert!(!constant_time_eq(&a, &b));
    }
}
