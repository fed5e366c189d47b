//! The vendor sandbox: token endpoints on loopback that behave as the vendors' own documents
//! describe, for tests and `ehrsync demo`.
//!
//! - Nextech (Azure AD v1, seeds/000–001): password and refresh_token grants, client id in the
//!   form body (secret optional), a required `resource`, `expires_in`/`expires_on` as JSON
//!   strings, a JWT access token, refresh tokens rotated on each use and valid 14 days, AADSTS
//!   error descriptions.
//! - CareCentric (IdentityServer, seeds/003): password grant only, client id and secret in the
//!   body, a JWT whose `exp` is the expiry, no refresh token.
//! - NikoHealth (seeds/004): client_credentials only, HTTP Basic demanded, 1200 s, scope `external`.
//! - Net Health (seeds/002): an OpenID provider — discovery, authorization code with S256 PKCE
//!   to a loopback redirect (consent is given automatically: the sandbox has no person),
//!   client_secret_basic or _post, rotating refresh tokens with `refresh_token_expires_in`.
//!
//! Lifetimes scale down to seconds; faults (5xx, 429 + Retry-After, slow answers, malformed
//! JSON, invalid_grant, invalid_client, revoked refresh tokens) are injected per vendor; every
//! token request is counted. Time comes from a [`Clock`](crate::clock::Clock) shared with the
//! engine under test, so tokio's paused time moves both.

mod api;

pub use api::{
    ApiFault, DEFAULT_PATIENTS, ElementsSupport, NEXTECH_PRACTICE_ID, fhir_id, fhir_patient,
    niko_patient,
};

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use url::Url;

use crate::clock::SharedClock;
use crate::token::Timestamp;
use crate::vendor::Vendor;

/// The credentials the sandbox accepts, per vendor. Public by design: they guard nothing.
#[derive(Debug, Clone)]
pub struct SandboxCredentials {
    pub client_id: &'static str,
    pub client_secret: &'static str,
    pub username: &'static str,
    pub password: &'static str,
}

pub const NEXTECH_CREDENTIALS: SandboxCredentials = SandboxCredentials {
    client_id: "sandbox-nextech-client",
    client_secret: "sandbox-nextech-secret",
    username: "api@sandbox-practice.example",
    password: "sandbox-nextech-password",
};
pub const CARECENTRIC_CREDENTIALS: SandboxCredentials = SandboxCredentials {
    client_id: "FHIRUser",
    client_secret: "sandbox-carecentric-secret",
    username: "sandbox-user",
    password: "sandbox-carecentric-password",
};
pub const NIKOHEALTH_CREDENTIALS: SandboxCredentials = SandboxCredentials {
    client_id: "sandbox-niko-client",
    client_secret: "sandbox-niko-secret",
    username: "",
    password: "",
};
pub const NETHEALTH_CREDENTIALS: SandboxCredentials = SandboxCredentials {
    client_id: "sandbox-nethealth-client",
    client_secret: "sandbox-nethealth-secret",
    username: "",
    password: "",
};
/// The environment [`Sandbox::account_config`]'s secret references expect.
pub fn credentials_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("SANDBOX_NEXTECH_SECRET", NEXTECH_CREDENTIALS.client_secret),
        ("SANDBOX_NEXTECH_PASSWORD", NEXTECH_CREDENTIALS.password),
        (
            "SANDBOX_CARECENTRIC_SECRET",
            CARECENTRIC_CREDENTIALS.client_secret,
        ),
        (
            "SANDBOX_CARECENTRIC_PASSWORD",
            CARECENTRIC_CREDENTIALS.password,
        ),
        (
            "SANDBOX_NIKOHEALTH_SECRET",
            NIKOHEALTH_CREDENTIALS.client_secret,
        ),
        (
            "SANDBOX_NETHEALTH_SECRET",
            NETHEALTH_CREDENTIALS.client_secret,
        ),
    ]
}

/// The `resource` the sandbox's Nextech endpoint demands (the preset's default).
pub const NEXTECH_RESOURCE: &str = "https://select.nextech-api.com/api";

/// Token lifetimes the sandbox grants.
#[derive(Debug, Clone)]
pub struct Lifetimes {
    pub nextech_access: Duration,
    pub nextech_refresh: Duration,
    pub carecentric_access: Duration,
    pub nikohealth_access: Duration,
    pub nethealth_access: Duration,
    pub nethealth_refresh: Duration,
}

impl Lifetimes {
    /// What the vendors document: 1 h / 14 days, 48 h, 20 min.
    pub fn documented() -> Self {
        Lifetimes {
            nextech_access: Duration::from_secs(3600),
            nextech_refresh: Duration::from_secs(14 * 86_400),
            carecentric_access: Duration::from_secs(172_800),
            nikohealth_access: Duration::from_secs(1200),
            nethealth_access: Duration::from_secs(3600),
            nethealth_refresh: Duration::from_secs(30 * 86_400),
        }
    }

    /// Every lifetime divided by `factor` (at least one second), for demos and fast tests.
    pub fn scaled_down(factor: u32) -> Self {
        let d = Self::documented();
        let s = |x: Duration| (x / factor.max(1)).max(Duration::from_secs(1));
        Lifetimes {
            nextech_access: s(d.nextech_access),
            nextech_refresh: s(d.nextech_refresh),
            carecentric_access: s(d.carecentric_access),
            nikohealth_access: s(d.nikohealth_access),
            nethealth_access: s(d.nethealth_access),
            nethealth_refresh: s(d.nethealth_refresh),
        }
    }
}

/// A misbehaviour to serve instead of (or before) the normal answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// HTTP 503.
    ServerError,
    /// HTTP 429 with `Retry-After: N`.
    RateLimited { retry_after_secs: u64 },
    /// HTTP 503 with `Retry-After: N` (down for maintenance, back in N seconds).
    Unavailable { retry_after_secs: u64 },
    /// Wait this long, then answer normally.
    Slow(Duration),
    /// HTTP 200 with a body that is not JSON.
    MalformedJson,
    /// HTTP 400 `invalid_grant` as the vendor words it.
    InvalidGrant,
    /// HTTP 401 `invalid_client`.
    InvalidClient,
    /// The person refuses consent: the authorization endpoint redirects with `access_denied`
    /// (and a device-flow approval page records a refusal).
    AccessDenied,
    /// Net Health: the next ID token is signed by a key the provider does not publish.
    ForgedIdToken,
    /// Nextech: the next token answer is issued as usual (its refresh token rotated) but says
    /// `expires_in` is 10^15 seconds.
    AbsurdExpiry,
}

/// An authorization code waiting for its exchange.
struct PendingCode {
    redirect_uri: String,
    challenge: String,
    scope: Option<String>,
    nonce: Option<String>,
    expires: Timestamp,
}

/// A device authorization (RFC 8628) waiting for its approval and then its poll.
struct PendingDevice {
    user_code: String,
    scope: Option<String>,
    approval: Option<bool>,
    expires: Timestamp,
}

#[derive(Default)]
struct Books {
    codes: HashMap<String, PendingCode>,
    /// By device code.
    devices: HashMap<String, PendingDevice>,
    /// Whether discovery advertises PKCE (a provider without it is refused by `ehrsync login`).
    hide_pkce: bool,
    faults: HashMap<Vendor, VecDeque<Fault>>,
    refresh_tokens: HashMap<String, (Vendor, Timestamp)>,
    access_tokens: HashMap<String, (Vendor, Timestamp)>,
    requests: HashMap<(Vendor, String), u32>,
    /// Every refresh token ever issued, including rotated and revoked ones.
    issued_refresh_tokens: Vec<String>,
    /// Access tokens revoked before they expired.
    revoked_access_tokens: Vec<String>,
    issued: u64,
    /// Every access token issued, once [`Sandbox::record_issuance`] asked for it.
    issuance: Option<Vec<Issued>>,
    /// How long every token answer waits after the work is done (see [`Sandbox::delay_answers`]).
    answer_delay: Option<Duration>,
    /// Token answers whose client hung up before they were handed over.
    unread: u32,
    /// Token requests being served, by token URL path (one path per vendor account or tenant).
    in_flight: HashMap<String, u32>,
    /// Token requests that arrived while another for the same path was being served.
    overlapping: u32,
    /// Token answers with a 4xx status, by vendor and grant.
    rejected: HashMap<(Vendor, String), u32>,
    /// How far every answer's `Date` header is off the real time, and whether ahead of it
    /// (see [`Sandbox::skew_date`]).
    date_skew: Option<(Duration, bool)>,
}

/// One access token the sandbox issued (see [`Sandbox::record_issuance`]). Only Nextech's
/// token endpoint records them so far: its tenant tells many accounts apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    pub vendor: Vendor,
    /// The tenant from the token URL.
    pub tenant: String,
    pub grant: String,
    pub at: Timestamp,
    pub expires: Timestamp,
}

struct Inner {
    /// `http://127.0.0.1:PORT`, for URLs the sandbox hands out.
    base: String,
    clock: SharedClock,
    lifetimes: Mutex<Lifetimes>,
    books: Mutex<Books>,
    /// The data APIs' patients, faults and counters.
    api: Mutex<api::ApiBooks>,
    /// Signs Net Health's ID tokens; its public half is served as the JWKS.
    signer: crate::oidc::id_token::TestSigner,
    /// Signs forged ID tokens (same `kid`, unpublished key).
    impostor: crate::oidc::id_token::TestSigner,
}

impl Inner {
    fn books(&self) -> MutexGuard<'_, Books> {
        // A panic while holding the lock leaves plain bookkeeping behind; keep serving.
        self.books.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Revokes every access token issued to `vendor`.
    fn revoke_access_tokens(&self, vendor: Vendor) {
        let mut books = self.books();
        let revoked: Vec<String> = books
            .access_tokens
            .iter()
            .filter(|(_, (v, _))| *v == vendor)
            .map(|(t, _)| t.clone())
            .collect();
        for t in &revoked {
            books.access_tokens.remove(t);
        }
        books.revoked_access_tokens.extend(revoked);
    }

    fn lifetimes(&self) -> Lifetimes {
        self.lifetimes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// A running sandbox. Dropping it stops the server.
pub struct Sandbox {
    addr: SocketAddr,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Sandbox {
    /// Starts the sandbox on `127.0.0.1` (an ephemeral port when `port` is 0).
    pub async fn start(
        clock: SharedClock,
        lifetimes: Lifetimes,
        port: u16,
    ) -> std::io::Result<Sandbox> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        let signer = crate::oidc::id_token::TestSigner::generate("sandbox-1")
            .map_err(std::io::Error::other)?;
        let impostor = crate::oidc::id_token::TestSigner::generate("sandbox-1")
            .map_err(std::io::Error::other)?;
        let inner = Arc::new(Inner {
            signer,
            impostor,
            base: format!("http://{addr}"),
            api: Mutex::new(api::ApiBooks::new(clock.now())),
            clock,
            lifetimes: Mutex::new(lifetimes),
            books: Mutex::new(Books::default()),
        });
        let app = Router::new()
            .route("/nextech/{tenant}/oauth2/token", post(nextech_token))
            .route("/carecentric/connect/token", post(carecentric_token))
            .route(
                "/nikohealth/{domain}/api/identity/connect/token",
                post(nikohealth_token),
            )
            .route(
                "/nethealth/.well-known/openid-configuration",
                get(nethealth_discovery),
            )
            .route("/nethealth/authorize", get(nethealth_authorize))
            .route("/nethealth/jwks", get(nethealth_jwks))
            .route(
                "/nethealth/device_authorization",
                post(nethealth_device_authorization),
            )
            .route("/nethealth/device", get(nethealth_device_approve))
            .route("/nethealth/token", post(nethealth_token))
            .route("/{vendor}/fhir/Patient", get(api::fhir_search))
            .route("/{vendor}/api/Patient", get(api::fhir_search))
            .route("/{vendor}/fhir/metadata", get(api::fhir_metadata))
            .route("/{vendor}/api/metadata", get(api::fhir_metadata))
            .route(
                "/nikohealth/{domain}/api/external/v1/patients",
                get(api::niko_patients),
            )
            .layer(axum::middleware::from_fn_with_state(
                inner.clone(),
                token_answers,
            ))
            .layer(axum::middleware::from_fn_with_state(
                inner.clone(),
                skewed_date,
            ))
            .with_state(inner.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "the sandbox server stopped");
            }
        });
        Ok(Sandbox { addr, inner, task })
    }

    /// The OpenID issuer of the Net Health emulation (for `issuer = …` in an account).
    pub fn issuer(&self) -> Url {
        let text = format!("{}/nethealth", self.inner.base);
        // A loopback socket address and a fixed path always form a valid URL.
        Url::parse(&text).unwrap_or_else(|_| unreachable!("valid sandbox URL {text}"))
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The token URL of `vendor`'s emulation (for `token_url = …` in an account).
    pub fn token_url(&self, vendor: Vendor) -> Url {
        let path = match vendor {
            Vendor::Nextech => "/nextech/nextech-api.com/oauth2/token",
            Vendor::CareCentric => "/carecentric/connect/token",
            Vendor::NikoHealth => "/nikohealth/sandbox/api/identity/connect/token",
            Vendor::NetHealth => "/nethealth/token",
            Vendor::Generic => "/unsupported",
        };
        let text = format!("http://{}{path}", self.addr);
        // A loopback socket address and a fixed path always form a valid URL.
        Url::parse(&text).unwrap_or_else(|_| unreachable!("valid sandbox URL {text}"))
    }

    /// The base URL of `vendor`'s data API (for `api_base = …` in an account).
    pub fn api_base(&self, vendor: Vendor) -> Url {
        let text = format!("{}/{}", self.inner.base, api::fhir_path(vendor));
        // A loopback socket address and a fixed path always form a valid URL.
        Url::parse(&text).unwrap_or_else(|_| unreachable!("valid sandbox URL {text}"))
    }

    /// A `[accounts.NAME]` section for a `vendor` account that talks to this sandbox. Secrets
    /// are `{ env = … }` references to the variables [`credentials_env`] provides.
    pub fn account_config(&self, vendor: Vendor, name: &str) -> String {
        let head = format!(
            "[accounts.{name}]\nvendor = '{vendor}'\napi_base = '{}'\n",
            self.api_base(vendor)
        );
        match vendor {
            Vendor::Nextech => format!(
                "{head}token_url = '{}'\nclient_id = '{}'\nclient_secret = {{ env = 'SANDBOX_NEXTECH_SECRET' }}\n\
                 username = '{}'\npassword = {{ env = 'SANDBOX_NEXTECH_PASSWORD' }}\npractice_id = '1001'\n",
                self.token_url(vendor),
                NEXTECH_CREDENTIALS.client_id,
                NEXTECH_CREDENTIALS.username
            ),
            Vendor::CareCentric => format!(
                "{head}token_url = '{}'\nclient_id = '{}'\nclient_secret = {{ env = 'SANDBOX_CARECENTRIC_SECRET' }}\n\
                 username = '{}'\npassword = {{ env = 'SANDBOX_CARECENTRIC_PASSWORD' }}\n",
                self.token_url(vendor),
                CARECENTRIC_CREDENTIALS.client_id,
                CARECENTRIC_CREDENTIALS.username
            ),
            Vendor::NikoHealth => format!(
                "{head}token_url = '{}'\nclient_id = '{}'\nclient_secret = {{ env = 'SANDBOX_NIKOHEALTH_SECRET' }}\n",
                self.token_url(vendor),
                NIKOHEALTH_CREDENTIALS.client_id
            ),
            Vendor::NetHealth => format!(
                "{head}issuer = '{}'\nclient_id = '{}'\nclient_secret = {{ env = 'SANDBOX_NETHEALTH_SECRET' }}\n\
                 scope = 'openid offline_access api'\n",
                self.issuer(),
                NETHEALTH_CREDENTIALS.client_id
            ),
            Vendor::Generic => format!("{head}# the sandbox emulates no generic provider\n"),
        }
    }

    /// Nextech's token URL for `tenant` (accounts with different tenants are told apart in
    /// [`Sandbox::issuance`]).
    pub fn tenant_token_url(&self, tenant: &str) -> Url {
        let text = format!("{}/nextech/{tenant}/oauth2/token", self.inner.base);
        Url::parse(&text).unwrap_or_else(|_| self.token_url(Vendor::Nextech))
    }

    /// Starts recording every access token issued (Nextech's, by tenant), for benchmarks that
    /// check no account was ever left without a valid token.
    pub fn record_issuance(&self) {
        self.inner.books().issuance.get_or_insert_with(Vec::new);
    }

    /// The access tokens issued since [`Sandbox::record_issuance`], in order.
    pub fn issuance(&self) -> Vec<Issued> {
        self.inner.books().issuance.clone().unwrap_or_default()
    }

    /// Token requests served for `vendor` with `grant_type = grant` (faults included); also
    /// `"authorize"` and `"discovery"` for Net Health's other endpoints.
    pub fn requests(&self, vendor: Vendor, grant: &str) -> u32 {
        self.inner
            .books()
            .requests
            .get(&(vendor, grant.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// Token requests served for `vendor`, any grant.
    pub fn total_requests(&self, vendor: Vendor) -> u32 {
        self.inner
            .books()
            .requests
            .iter()
            .filter(|((v, _), _)| *v == vendor)
            .map(|(_, n)| n)
            .sum()
    }

    /// Serves `fault` to the next `times` token requests for `vendor` (after earlier faults).
    pub fn inject(&self, vendor: Vendor, fault: Fault, times: usize) {
        let mut books = self.inner.books();
        let queue = books.faults.entry(vendor).or_default();
        queue.extend(std::iter::repeat_n(fault, times));
    }

    /// Drops every fault still queued for `vendor` (the end of an outage).
    pub fn clear_faults(&self, vendor: Vendor) {
        self.inner.books().faults.remove(&vendor);
    }

    /// Revokes every refresh token issued for `vendor`: their next use gets `invalid_grant`.
    pub fn revoke_refresh_tokens(&self, vendor: Vendor) {
        self.inner
            .books()
            .refresh_tokens
            .retain(|_, (v, _)| *v != vendor);
    }

    /// Every access and refresh token issued so far (for tests that look for leaks).
    pub fn issued_tokens(&self) -> Vec<String> {
        let books = self.inner.books();
        books
            .access_tokens
            .keys()
            .chain(books.revoked_access_tokens.iter())
            .chain(books.issued_refresh_tokens.iter())
            .cloned()
            .collect()
    }

    /// Whether `token` is an access token this sandbox issued that has not expired.
    pub fn access_token_valid(&self, token: &str) -> bool {
        let now = self.inner.clock.now();
        self.inner
            .books()
            .access_tokens
            .get(token)
            .is_some_and(|(_, exp)| *exp > now)
    }

    /// Whether Net Health's discovery document advertises PKCE (S256); it does by default.
    pub fn advertise_pkce(&self, advertise: bool) {
        self.inner.books().hide_pkce = !advertise;
    }

    /// Approves (as the person at the device page would) the pending device login with
    /// `user_code`, or refuses it when an `AccessDenied` fault is queued. False if unknown.
    pub fn approve_device(&self, user_code: &str) -> bool {
        approve_device(&self.inner, user_code)
    }

    /// Makes every token endpoint answer `delay` after it has done its work (issued, rotated),
    /// as a slow vendor does; `None` answers at once. A client that hangs up meanwhile never
    /// reads its answer, which [`Sandbox::unread_answers`] counts.
    pub fn delay_answers(&self, delay: Option<Duration>) {
        self.inner.books().answer_delay = delay;
    }

    /// Token requests that arrived while another for the same account (the same token URL:
    /// a vendor's, or a tenant's) was still being served: two processes asking at once.
    pub fn overlapping_token_requests(&self) -> u32 {
        self.inner.books().overlapping
    }

    /// Token answers the sandbox had ready whose client hung up before reading them (a
    /// rotated refresh token in one of them is lost to the client).
    pub fn unread_answers(&self) -> u32 {
        self.inner.books().unread
    }

    /// Token requests for `vendor` with `grant_type = grant` answered with a 4xx status
    /// (`invalid_grant` for a refresh token already rotated, among others).
    pub fn rejected(&self, vendor: Vendor, grant: &str) -> u32 {
        self.inner
            .books()
            .rejected
            .get(&(vendor, grant.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// Makes every answer's `Date` header `skew` ahead of the real time (`ahead`) or behind it,
    /// as a server with a wrong clock sends it; `Duration::ZERO` sends the real time again.
    pub fn skew_date(&self, skew: Duration, ahead: bool) {
        self.inner.books().date_skew = (!skew.is_zero()).then_some((skew, ahead));
    }

    pub fn set_lifetimes(&self, lifetimes: Lifetimes) {
        *self
            .inner
            .lifetimes
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = lifetimes;
    }
}

/// Around every token endpoint: counts refusals by grant, and holds the answer back for the
/// configured delay after the endpoint has done its work, counting it unread if the client
/// hangs up meanwhile (hyper drops the handler's future when the connection closes).
async fn token_answers(
    State(inner): State<Arc<Inner>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = request.uri().path().to_owned();
    let is_token = request.method() == axum::http::Method::POST && path.ends_with("/token");
    if !is_token {
        return next.run(request).await;
    }
    let vendor = match path.split('/').nth(1) {
        Some("nextech") => Vendor::Nextech,
        Some("carecentric") => Vendor::CareCentric,
        Some("nikohealth") => Vendor::NikoHealth,
        Some("nethealth") => Vendor::NetHealth,
        _ => Vendor::Generic,
    };
    let _serving = InFlight::enter(&inner, path.clone());
    let (parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 64 * 1024).await else {
        return (StatusCode::PAYLOAD_TOO_LARGE, "").into_response();
    };
    let grant = form(&bytes).remove("grant_type").unwrap_or_default();
    let request = axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes));
    let response = next.run(request).await;
    if response.status().is_client_error() {
        *inner.books().rejected.entry((vendor, grant)).or_default() += 1;
    }
    let delay = inner.books().answer_delay;
    if let Some(delay) = delay {
        let mut unread = UnreadGuard {
            inner: &inner,
            armed: true,
        };
        tokio::time::sleep(delay).await;
        unread.armed = false;
    }
    response
}

/// Around every answer: a `Date` header off by the skew set with [`Sandbox::skew_date`] (hyper
/// adds the real one only where a header is missing). Real time, not the sandbox's clock: the
/// header is compared with the wall clock of the process that reads it.
async fn skewed_date(
    State(inner): State<Arc<Inner>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let mut response = next.run(request).await;
    let skew = inner.books().date_skew;
    if let Some((skew, ahead)) = skew {
        let now = std::time::SystemTime::now();
        let at = if ahead {
            now.checked_add(skew)
        } else {
            now.checked_sub(skew)
        };
        if let Some(value) = at
            .map(httpdate::fmt_http_date)
            .and_then(|d| header::HeaderValue::from_str(&d).ok())
        {
            response.headers_mut().insert(header::DATE, value);
        }
    }
    response
}

/// A token request being served, from its arrival until its answer is handed over (or its
/// client hangs up): counts one arriving while another for the same path is served.
struct InFlight<'a> {
    inner: &'a Inner,
    path: String,
}

impl<'a> InFlight<'a> {
    fn enter(inner: &'a Inner, path: String) -> Self {
        let mut books = inner.books();
        let n = books.in_flight.entry(path.clone()).or_default();
        *n += 1;
        if *n > 1 {
            books.overlapping += 1;
        }
        InFlight { inner, path }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(n) = self.inner.books().in_flight.get_mut(&self.path) {
            *n = n.saturating_sub(1);
        }
    }
}

/// Counts an answer as unread when dropped armed (its client hung up while it waited).
struct UnreadGuard<'a> {
    inner: &'a Inner,
    armed: bool,
}

impl Drop for UnreadGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.inner.books().unread += 1;
        }
    }
}

fn json(status: StatusCode, body: serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        body.to_string(),
    )
        .into_response()
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    // The sandbox's tokens need to be unique, not secret: fall back to a fixed pattern.
    if getrandom::fill(&mut buf).is_err() {
        buf.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn jwt(claims: serde_json::Value) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!(
        "{}.{}.{}",
        b64(r#"{"alg":"RS256","typ":"JWT","kid":"sandbox"}"#),
        b64(&claims.to_string()),
        b64("sandbox-signature")
    )
}

fn form(body: &Bytes) -> HashMap<String, String> {
    url::form_urlencoded::parse(body).into_owned().collect()
}

/// `Authorization: Basic` credentials, form-decoded (RFC 6749 §2.3.1).
fn basic_auth(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()?,
    )
    .ok()?;
    let (id, secret) = decoded.split_once(':')?;
    let dec = |s: &str| {
        url::form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
    };
    Some((dec(id)?, dec(secret)?))
}

/// Counts the request and serves a queued fault, if any. `Slow` faults delay and continue.
async fn take_fault(inner: &Inner, vendor: Vendor, grant: &str) -> Option<Fault> {
    let fault = {
        let mut books = inner.books();
        *books
            .requests
            .entry((vendor, grant.to_owned()))
            .or_default() += 1;
        // Forged ID tokens and absurd expiries are served by the token response itself, not
        // instead of it.
        books
            .faults
            .get_mut(&vendor)
            .filter(|q| !matches!(q.front(), Some(Fault::ForgedIdToken | Fault::AbsurdExpiry)))
            .and_then(VecDeque::pop_front)
    };
    match fault {
        Some(Fault::Slow(d)) => {
            tokio::time::sleep(d).await;
            None
        }
        other => other,
    }
}

fn fault_response(vendor: Vendor, fault: Fault) -> Response {
    match fault {
        Fault::ServerError => {
            (StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable").into_response()
        }
        Fault::RateLimited { retry_after_secs } => (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, retry_after_secs.to_string())],
            "Too Many Requests",
        )
            .into_response(),
        Fault::Unavailable { retry_after_secs } => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, retry_after_secs.to_string())],
            "Service Unavailable",
        )
            .into_response(),
        Fault::MalformedJson => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            r#"{"access_token": "trunc"#,
        )
            .into_response(),
        Fault::InvalidGrant => oauth_error(
            vendor,
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            70000,
            "The provided grant has been revoked",
        ),
        Fault::InvalidClient => oauth_error(
            vendor,
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000215,
            "Invalid client secret provided",
        ),
        // Handled in take_fault, and at the authorization endpoint.
        Fault::Slow(_) | Fault::AccessDenied | Fault::ForgedIdToken | Fault::AbsurdExpiry => {
            (StatusCode::INTERNAL_SERVER_ERROR, "").into_response()
        }
    }
}

/// An error body in the vendor's own style: Azure AD's AADSTS descriptions for Nextech,
/// IdentityServer's bare codes otherwise.
fn oauth_error(
    vendor: Vendor,
    status: StatusCode,
    error: &str,
    aadsts: u32,
    text: &str,
) -> Response {
    let body = if vendor == Vendor::Nextech {
        serde_json::json!({
            "error": error,
            "error_description": format!("AADSTS{aadsts}: {text}.\r\nTrace ID: {}\r\nCorrelation ID: {}", random_hex(8), random_hex(8)),
            "error_codes": [aadsts],
        })
    } else {
        serde_json::json!({ "error": error, "error_description": text })
    };
    json(status, body)
}

async fn nextech_token(
    State(inner): State<Arc<Inner>>,
    Path(tenant): Path<String>,
    body: Bytes,
) -> Response {
    let vendor = Vendor::Nextech;
    let f = form(&body);
    let grant = f.get("grant_type").cloned().unwrap_or_default();
    if let Some(fault) = take_fault(&inner, vendor, &grant).await {
        return fault_response(vendor, fault);
    }
    let c = NEXTECH_CREDENTIALS;
    if f.get("client_id").map(String::as_str) != Some(c.client_id) {
        return oauth_error(
            vendor,
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700016,
            "Application with identifier was not found in the directory",
        );
    }
    if f.get("client_secret").is_some_and(|s| s != c.client_secret) {
        return oauth_error(
            vendor,
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000215,
            "Invalid client secret provided",
        );
    }
    if f.get("resource").map(String::as_str) != Some(NEXTECH_RESOURCE) {
        return oauth_error(
            vendor,
            StatusCode::BAD_REQUEST,
            "invalid_request",
            900144,
            "The request body must contain the following parameter: 'resource'",
        );
    }
    let now = inner.clock.now();
    match grant.as_str() {
        "password" => {
            if f.get("username").map(String::as_str) != Some(c.username)
                || f.get("password").map(String::as_str) != Some(c.password)
            {
                return oauth_error(
                    vendor,
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    50126,
                    "Error validating credentials due to invalid username or password",
                );
            }
        }
        "refresh_token" => {
            let presented = f.get("refresh_token").cloned().unwrap_or_default();
            // Rotation: a refresh token is good for one use.
            match inner.books().refresh_tokens.remove(&presented) {
                Some((v, exp)) if v == vendor && exp > now => {}
                Some((v, _)) if v == vendor => {
                    return oauth_error(
                        vendor,
                        StatusCode::BAD_REQUEST,
                        "invalid_grant",
                        70008,
                        "The provided authorization code or refresh token has expired due to inactivity",
                    );
                }
                _ => {
                    return oauth_error(
                        vendor,
                        StatusCode::BAD_REQUEST,
                        "invalid_grant",
                        70000,
                        "The provided grant has been revoked or is invalid",
                    );
                }
            }
        }
        _ => {
            return oauth_error(
                vendor,
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                70003,
                "The app requested an unsupported grant type",
            );
        }
    }
    let life = inner.lifetimes();
    let expires = now + life.nextech_access;
    let access = jwt(serde_json::json!({
        "aud": NEXTECH_RESOURCE, "iss": "https://sts.windows.net/sandbox/", "iat": now.unix_seconds(),
        "nbf": now.unix_seconds(), "exp": expires.unix_seconds(), "scp": "user_impersonation", "jti": random_hex(8),
    }));
    let refresh = format!("0.nx-{}", random_hex(24));
    let expires_in = {
        let mut books = inner.books();
        let queue = books.faults.entry(vendor).or_default();
        if queue.front() == Some(&Fault::AbsurdExpiry) {
            queue.pop_front();
            "1000000000000000".to_owned()
        } else {
            life.nextech_access.as_secs().to_string()
        }
    };
    {
        let mut books = inner.books();
        books.issued += 1;
        if let Some(log) = &mut books.issuance {
            log.push(Issued {
                vendor,
                tenant,
                grant,
                at: now,
                expires,
            });
        }
        books
            .access_tokens
            .insert(access.clone(), (vendor, expires));
        books
            .refresh_tokens
            .insert(refresh.clone(), (vendor, now + life.nextech_refresh));
    }
    // Azure AD v1 sends every number as a JSON string.
    json(
        StatusCode::OK,
        serde_json::json!({
            "token_type": "Bearer",
            "scope": "user_impersonation",
            "expires_in": expires_in,
            "ext_expires_in": life.nextech_access.as_secs().to_string(),
            "expires_on": expires.unix_seconds().to_string(),
            "not_before": now.unix_seconds().to_string(),
            "resource": NEXTECH_RESOURCE,
            "access_token": access,
            "refresh_token": refresh,
        }),
    )
}

async fn carecentric_token(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let vendor = Vendor::CareCentric;
    let f = form(&body);
    let grant = f.get("grant_type").cloned().unwrap_or_default();
    if let Some(fault) = take_fault(&inner, vendor, &grant).await {
        return fault_response(vendor, fault);
    }
    let c = CARECENTRIC_CREDENTIALS;
    if !client_is(&c, &headers, &f) {
        return json(
            StatusCode::BAD_REQUEST,
            serde_json::json!({ "error": "invalid_client" }),
        );
    }
    if grant != "password" {
        return json(
            StatusCode::BAD_REQUEST,
            serde_json::json!({ "error": "unsupported_grant_type" }),
        );
    }
    if f.get("username").map(String::as_str) != Some(c.username)
        || f.get("password").map(String::as_str) != Some(c.password)
    {
        return json(
            StatusCode::BAD_REQUEST,
            serde_json::json!({ "error": "invalid_grant", "error_description": "invalid_username_or_password" }),
        );
    }
    let now = inner.clock.now();
    let life = inner.lifetimes().carecentric_access;
    let expires = now + life;
    let access = jwt(serde_json::json!({
        "iss": "https://prv-is.grhapp.com", "nbf": now.unix_seconds(), "iat": now.unix_seconds(),
        "exp": expires.unix_seconds(), "client_id": c.client_id, "sub": random_hex(8),
        "scope": f.get("scope").map(|s| s.split(' ').collect::<Vec<_>>()),
    }));
    inner
        .books()
        .access_tokens
        .insert(access.clone(), (vendor, expires));
    json(
        StatusCode::OK,
        serde_json::json!({ "access_token": access, "expires_in": life.as_secs(), "token_type": "Bearer" }),
    )
}

async fn nikohealth_token(
    State(inner): State<Arc<Inner>>,
    Path(_domain): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let vendor = Vendor::NikoHealth;
    let f = form(&body);
    let grant = f.get("grant_type").cloned().unwrap_or_default();
    if let Some(fault) = take_fault(&inner, vendor, &grant).await {
        return fault_response(vendor, fault);
    }
    let c = NIKOHEALTH_CREDENTIALS;
    // seeds/004: "--header 'Authorization: Basic YOUR-ENCODED-CREDENTIALS'".
    match basic_auth(&headers) {
        Some((id, secret)) if id == c.client_id && secret == c.client_secret => {}
        _ => {
            return json(
                StatusCode::UNAUTHORIZED,
                serde_json::json!({ "error": "invalid_client" }),
            );
        }
    }
    if grant != "client_credentials" {
        return json(
            StatusCode::BAD_REQUEST,
            serde_json::json!({ "error": "unsupported_grant_type" }),
        );
    }
    let now = inner.clock.now();
    let life = inner.lifetimes().nikohealth_access;
    let access = random_hex(32).to_uppercase();
    inner
        .books()
        .access_tokens
        .insert(access.clone(), (vendor, now + life));
    json(
        StatusCode::OK,
        serde_json::json!({
            "access_token": access,
            "expires_in": life.as_secs(),
            "token_type": "Bearer",
            "scope": f.get("scope").map_or("external", String::as_str),
        }),
    )
}

async fn nethealth_discovery(State(inner): State<Arc<Inner>>) -> Response {
    *inner
        .books()
        .requests
        .entry((Vendor::NetHealth, "discovery".to_owned()))
        .or_default() += 1;
    let issuer = format!("{}/nethealth", inner.base);
    let mut doc = serde_json::json!({
            "issuer": issuer,
            "authorization_endpoint": format!("{issuer}/authorize"),
            "token_endpoint": format!("{issuer}/token"),
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "jwks_uri": format!("{issuer}/jwks"),
            "device_authorization_endpoint": format!("{issuer}/device_authorization"),
            "id_token_signing_alg_values_supported": ["ES256"],
            "grant_types_supported": ["authorization_code", "refresh_token", crate::token::client::DEVICE_CODE_GRANT],
            "response_types_supported": ["code"],
            "scopes_supported": ["openid", "offline_access", "api"],
    });
    if !inner.books().hide_pkce {
        doc["code_challenge_methods_supported"] = serde_json::json!(["S256"]);
    }
    json(StatusCode::OK, doc)
}

async fn nethealth_jwks(State(inner): State<Arc<Inner>>) -> Response {
    json(StatusCode::OK, inner.signer.jwks())
}

/// Whether the client authenticated as `c`, by HTTP Basic or in the form body (IdentityServer
/// and Net Health's provider take either).
fn client_is(c: &SandboxCredentials, headers: &HeaderMap, f: &HashMap<String, String>) -> bool {
    let client = basic_auth(headers)
        .or_else(|| Some((f.get("client_id")?.clone(), f.get("client_secret")?.clone())));
    client.as_ref().map(|(i, s)| (i.as_str(), s.as_str())) == Some((c.client_id, c.client_secret))
}

/// RFC 8628 §3.1–3.2: a device code for the client, a user code for the person.
async fn nethealth_device_authorization(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let f = form(&body);
    if !client_is(&NETHEALTH_CREDENTIALS, &headers, &f) {
        return json(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({ "error": "invalid_client" }),
        );
    }
    let device_code = random_hex(20);
    let raw = random_hex(4).to_uppercase();
    let user_code = format!("{}-{}", &raw[..4], &raw[4..]);
    let issuer = format!("{}/nethealth", inner.base);
    let life = Duration::from_secs(600);
    inner.books().devices.insert(
        device_code.clone(),
        PendingDevice {
            user_code: user_code.clone(),
            scope: f.get("scope").cloned(),
            approval: None,
            expires: inner.clock.now() + life,
        },
    );
    json(
        StatusCode::OK,
        serde_json::json!({
            "device_code": device_code,
            "user_code": user_code,
            "verification_uri": format!("{issuer}/device"),
            "verification_uri_complete": format!("{issuer}/device?user_code={user_code}"),
            "expires_in": life.as_secs(),
            "interval": 1,
        }),
    )
}

fn approve_device(inner: &Inner, user_code: &str) -> bool {
    let mut books = inner.books();
    let refuse =
        books.faults.get(&Vendor::NetHealth).and_then(|q| q.front()) == Some(&Fault::AccessDenied);
    if refuse && let Some(q) = books.faults.get_mut(&Vendor::NetHealth) {
        q.pop_front();
    }
    match books
        .devices
        .values_mut()
        .find(|d| d.user_code == user_code)
    {
        Some(d) => {
            d.approval = Some(!refuse);
            true
        }
        None => false,
    }
}

/// The device page a person opens: approval is automatic (the sandbox has no person).
async fn nethealth_device_approve(
    State(inner): State<Arc<Inner>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let code = q.get("user_code").map(String::as_str).unwrap_or_default();
    if approve_device(&inner, code) {
        (StatusCode::OK, "Device approved; you can close this page.").into_response()
    } else {
        (StatusCode::NOT_FOUND, "Unknown code.").into_response()
    }
}

/// A redirect to the client's `redirect_uri` with `params` added to its query.
fn redirect(redirect_uri: &Url, params: &[(&str, String)]) -> Response {
    let mut url = redirect_uri.clone();
    url.query_pairs_mut()
        .extend_pairs(params.iter().map(|(k, v)| (*k, v.as_str())));
    (StatusCode::FOUND, [(header::LOCATION, url.to_string())]).into_response()
}

async fn nethealth_authorize(
    State(inner): State<Arc<Inner>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if q.get("client_id").map(String::as_str) != Some(NETHEALTH_CREDENTIALS.client_id) {
        return (StatusCode::BAD_REQUEST, "unknown client_id").into_response();
    }
    // RFC 8252 §7.3: native apps receive the code on a loopback redirect.
    let redirect_uri = match q.get("redirect_uri").and_then(|u| Url::parse(u).ok()) {
        Some(u)
            if u.scheme() == "http"
                && matches!(u.host_str(), Some("127.0.0.1" | "[::1]" | "localhost")) =>
        {
            u
        }
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                "redirect_uri must be a loopback http URL (RFC 8252)",
            )
                .into_response();
        }
    };
    let send = |mut params: Vec<(&'static str, String)>| {
        if let Some(state) = q.get("state").filter(|s| !s.is_empty()) {
            params.push(("state", state.clone()));
        }
        redirect(&redirect_uri, &params)
    };
    if q.get("response_type").map(String::as_str) != Some("code") {
        return send(vec![("error", "unsupported_response_type".into())]);
    }
    let challenge = match (
        q.get("code_challenge"),
        q.get("code_challenge_method").map(String::as_str),
    ) {
        (Some(c), Some("S256")) if !c.is_empty() => c.clone(),
        _ => {
            return send(vec![
                ("error", "invalid_request".into()),
                (
                    "error_description",
                    "PKCE with code_challenge_method=S256 is required".into(),
                ),
            ]);
        }
    };
    if take_fault(&inner, Vendor::NetHealth, "authorize").await == Some(Fault::AccessDenied) {
        return send(vec![
            ("error", "access_denied".into()),
            ("error_description", "the user declined".into()),
        ]);
    }
    let code = random_hex(16);
    let pending = PendingCode {
        redirect_uri: redirect_uri.to_string(),
        challenge,
        scope: q.get("scope").cloned(),
        nonce: q.get("nonce").cloned(),
        expires: inner.clock.now() + Duration::from_secs(60),
    };
    inner.books().codes.insert(code.clone(), pending);
    send(vec![("code", code)])
}

async fn nethealth_token(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let vendor = Vendor::NetHealth;
    let f = form(&body);
    let grant = f.get("grant_type").cloned().unwrap_or_default();
    if let Some(fault) = take_fault(&inner, vendor, &grant).await {
        return fault_response(vendor, fault);
    }
    let c = NETHEALTH_CREDENTIALS;
    if !client_is(&NETHEALTH_CREDENTIALS, &headers, &f) {
        return json(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({ "error": "invalid_client" }),
        );
    }
    let now = inner.clock.now();
    let invalid = |why: &str| {
        json(
            StatusCode::BAD_REQUEST,
            serde_json::json!({ "error": "invalid_grant", "error_description": why }),
        )
    };
    let mut nonce = None;
    let scope = match grant.as_str() {
        "authorization_code" => {
            let code = f.get("code").cloned().unwrap_or_default();
            let Some(pending) = inner.books().codes.remove(&code) else {
                return invalid("unknown or used authorization code");
            };
            if pending.expires <= now {
                return invalid("the authorization code has expired");
            }
            if f.get("redirect_uri") != Some(&pending.redirect_uri) {
                return invalid("redirect_uri does not match the authorization request");
            }
            let verifier = f.get("code_verifier").cloned().unwrap_or_default();
            if crate::token::pkce::challenge_for(&verifier) != pending.challenge {
                return invalid("code_verifier does not match the code_challenge");
            }
            nonce = pending.nonce;
            pending.scope
        }
        crate::token::client::DEVICE_CODE_GRANT => {
            let code = f.get("device_code").cloned().unwrap_or_default();
            let mut books = inner.books();
            let (approval, expired) = match books.devices.get(&code) {
                Some(d) => (d.approval, d.expires <= now),
                None => return invalid("unknown device code"),
            };
            let error = match (approval, expired) {
                (_, true) => "expired_token",
                (None, false) => "authorization_pending",
                (Some(false), false) => "access_denied",
                (Some(true), false) => "",
            };
            if !error.is_empty() {
                if error != "authorization_pending" {
                    books.devices.remove(&code);
                }
                return json(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({ "error": error }),
                );
            }
            books.devices.remove(&code).and_then(|d| d.scope)
        }
        "refresh_token" => {
            let presented = f.get("refresh_token").cloned().unwrap_or_default();
            match inner.books().refresh_tokens.remove(&presented) {
                Some((v, exp)) if v == vendor && exp > now => {}
                _ => return invalid("the refresh token is invalid, expired or revoked"),
            }
            f.get("scope").cloned()
        }
        _ => {
            return json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({ "error": "unsupported_grant_type" }),
            );
        }
    };
    let life = inner.lifetimes();
    let expires = now + life.nethealth_access;
    let access = jwt(serde_json::json!({
        "iss": format!("{}/nethealth", inner.base), "aud": "api", "iat": now.unix_seconds(),
        "exp": expires.unix_seconds(), "sub": "sandbox-person", "client_id": c.client_id,
    }));
    let refresh = random_hex(24);
    let scope = scope.unwrap_or_else(|| "openid offline_access".to_owned());
    let id_token = if scope.split(' ').any(|s| s == "openid") {
        let mut claims = serde_json::json!({
            "iss": format!("{}/nethealth", inner.base), "aud": c.client_id, "sub": "sandbox-person",
            "iat": now.unix_seconds(), "exp": expires.unix_seconds(),
        });
        if let Some(n) = nonce {
            claims["nonce"] = serde_json::Value::String(n);
        }
        let forged = {
            let mut books = inner.books();
            let queue = books.faults.entry(vendor).or_default();
            let forged = queue.front() == Some(&Fault::ForgedIdToken);
            if forged {
                queue.pop_front();
            }
            forged
        };
        let signer = if forged {
            &inner.impostor
        } else {
            &inner.signer
        };
        signer.sign(&claims).ok()
    } else {
        None
    };
    {
        let mut books = inner.books();
        books
            .access_tokens
            .insert(access.clone(), (vendor, expires));
        books
            .refresh_tokens
            .insert(refresh.clone(), (vendor, now + life.nethealth_refresh));
        books.issued_refresh_tokens.push(refresh.clone());
    }
    let mut body = serde_json::json!({
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": life.nethealth_access.as_secs(),
        "refresh_token": refresh,
        "refresh_token_expires_in": life.nethealth_refresh.as_secs(),
        "scope": scope,
    });
    if let Some(id_token) = id_token {
        body["id_token"] = serde_json::Value::String(id_token);
    }
    json(StatusCode::OK, body)
}
