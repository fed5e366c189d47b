//! `ehrsync doctor [ACCOUNT]`: checks each account (or the one named) step by step — config,
//! DNS, TCP, TLS, the token endpoint, the API, the clock — and prints one line per step, with the
//! fix on a failed one.
//!
//! It may run beside `ehrsync run`: the database is opened read-only, a stored valid token is
//! used as it is, and a token it has to request (one request with the primary grant, never for
//! an account parked in `needs_login`, never for a grant that needs a person) is only used for
//! the API check and dropped, never stored. Output never holds a secret or a token.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderName, HeaderValue as HttpHeaderValue};
use secrecy::{ExposeSecret, SecretString};
use url::Url;

use super::output;
use crate::clock::{Clock, SystemClock};
use crate::config::{self, Account, HeaderValue, JobKind, KeySource, TokenEndpoint};
use crate::crypto::TokenCipher;
use crate::http::{ConnectProblem, TransportError, read_limited};
use crate::store::Store;
use crate::token::client::{GrantForm, TokenTarget, request_token};
use crate::token::core::Failure;

/// How long each network step may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP requests (token, API) get what the agent gives them.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A clock further off than this from a server's `Date` is a problem: token lifetimes,
/// `nbf`/`exp` checks and signed requests start failing around here.
const MAX_SKEW_SECS: i64 = 30;
/// A server certificate ending within this many days is a ✗: renewals normally happen a month
/// ahead, so one this close was missed.
const CERT_WARN_DAYS: i64 = 14;
/// A stored token must stay valid at least this long to be used for the API check.
const STORED_MARGIN: Duration = Duration::from_secs(30);
/// The API check reads at most this much of an answer.
const MAX_API_BODY: usize = 8 * 1024 * 1024;

/// How a step went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    Pass,
    Fail,
    /// Not applicable, or not possible after an earlier failure.
    Skip,
}

/// One printed line.
struct Step {
    mark: Mark,
    name: &'static str,
    text: String,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mark = match self.mark {
            Mark::Pass => "✓",
            Mark::Fail => "✗",
            Mark::Skip => "-",
        };
        writeln!(f, "  {mark} {:<8}{}", self.name, self.text)
    }
}

fn pass(name: &'static str, text: impl Into<String>) -> Step {
    Step {
        mark: Mark::Pass,
        name,
        text: text.into(),
    }
}

fn fail(name: &'static str, text: impl Into<String>) -> Step {
    Step {
        mark: Mark::Fail,
        name,
        text: text.into(),
    }
}

fn skip(name: &'static str, text: impl Into<String>) -> Step {
    Step {
        mark: Mark::Skip,
        name,
        text: text.into(),
    }
}

pub async fn run(config_path: &Path, account: Option<&str>) -> ExitCode {
    let env = config::Env::from_process();
    let config = match account {
        Some(name) => match super::load_for_account(config_path, &env, name) {
            Ok(c) => c,
            Err(code) => return code,
        },
        None => match config::load_with_env(config_path, &env) {
            Ok(loaded) => {
                for w in &loaded.warnings {
                    tracing::warn!(key = %w.key, "{}", w.message);
                }
                loaded.config
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(super::EXIT_CONFIG);
            }
        },
    };
    let accounts: Vec<&Account> = match account {
        Some(name) => match config.account(name) {
            Some(a) => vec![a],
            None => {
                let names: Vec<&str> = config.accounts.iter().map(|a| a.name.as_str()).collect();
                eprintln!(
                    "error: no account `{name}` in {}; configured: {}",
                    config.path.display(),
                    names.join(", ")
                );
                return ExitCode::from(super::EXIT_CONFIG);
            }
        },
        None => config.accounts.iter().collect(),
    };
    if accounts.is_empty() {
        return output::finish(
            output::print(format_args!(
                "no accounts in {}: nothing to check\n",
                config.path.display()
            )),
            ExitCode::SUCCESS,
        );
    }
    if let Some(path) = &config.agent.ca_file
        && let Err(e) = crate::http::trust_extra_roots(path)
    {
        eprintln!("error: agent.ca_file: {e}");
        return ExitCode::from(super::EXIT_CONFIG);
    }
    let http = match crate::token::client::http_client(REQUEST_TIMEOUT) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("error: cannot build the HTTP client: {e}");
            return ExitCode::from(super::EXIT_FAILURE);
        }
    };
    let stored = StoredTokens::open(&config, &env).await;
    let mut printed = Ok(());
    let mut failed = Vec::new();
    for account in &accounts {
        let ctx = Ctx {
            config: &config,
            account,
            http: &http,
            stored: &stored,
        };
        let header = format!("{} ({})\n", account.name, account.vendor);
        printed = printed.and_then(|()| output::print(&header));
        let mut problems = 0;
        for step in ctx.check().await {
            if step.mark == Mark::Fail {
                problems += 1;
            }
            printed = printed.and_then(|()| output::print(&step));
        }
        if problems > 0 {
            failed.push(account.name.as_str());
        }
        if printed.is_err() {
            // Nobody reads on: no further token requests for nothing.
            break;
        }
    }
    if let Some(store) = stored.store {
        store.close().await;
    }
    let summary = if failed.is_empty() {
        format!(
            "all checks passed ({} account{})\n",
            accounts.len(),
            if accounts.len() == 1 { "" } else { "s" }
        )
    } else {
        format!(
            "problems found for: {} (fix the first ✗ of each first; later steps depend on it)\n",
            failed.join(", ")
        )
    };
    printed = printed.and_then(|()| output::print(summary));
    let code = if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::EXIT_FAILURE)
    };
    output::finish(printed, code)
}

/// The database and key, opened read-only, for the tokens the agent stored. Either may be
/// missing (no agent ran yet, the key is elsewhere): doctor then requests a token itself.
struct StoredTokens {
    store: Option<Store>,
    cipher: Option<TokenCipher>,
    /// Why stored tokens cannot be used, when they cannot.
    why_not: Option<String>,
}

impl StoredTokens {
    async fn open(config: &config::Config, env: &config::Env) -> StoredTokens {
        let store = match Store::open_read_only(&config.agent.database).await {
            Ok(Some(s)) => s,
            Ok(None) => {
                return StoredTokens {
                    store: None,
                    cipher: None,
                    why_not: Some("no database yet".to_owned()),
                };
            }
            Err(e) => {
                return StoredTokens {
                    store: None,
                    cipher: None,
                    why_not: Some(format!("the database cannot be read: {e}")),
                };
            }
        };
        // Never create a key: without one, nothing stored can be opened anyway.
        let key = match &config.agent.token_key {
            KeySource::File { path, .. } => KeySource::File {
                path: path.clone(),
                create: false,
            },
            other => other.clone(),
        };
        match TokenCipher::load(&key, env) {
            Ok(cipher) => StoredTokens {
                store: Some(store),
                cipher: Some(cipher),
                why_not: None,
            },
            Err(e) => StoredTokens {
                store: Some(store),
                cipher: None,
                why_not: Some(format!("the token key cannot be read: {e}")),
            },
        }
    }
}

/// What the database says about an account's token.
enum Stored {
    /// An access token valid for at least [`STORED_MARGIN`].
    Valid {
        token: SecretString,
        expires_in: Duration,
    },
    /// Parked: only a login (or fixed credentials) helps. The access token it may still hold
    /// (valid for at least [`STORED_MARGIN`]) serves the API check.
    NeedsLogin {
        last_error: Option<String>,
        valid: Option<(SecretString, Duration)>,
    },
    /// Nothing usable; why, for the line.
    None(String),
}

struct Ctx<'a> {
    config: &'a config::Config,
    account: &'a Account,
    http: &'a reqwest::Client,
    stored: &'a StoredTokens,
}

/// The token the API check uses.
struct Token {
    value: SecretString,
}

impl Ctx<'_> {
    fn name(&self) -> &str {
        self.account.name.as_str()
    }

    fn login_command(&self) -> String {
        format!(
            "{} {}",
            config::login_command(&self.config.path),
            self.account.name
        )
    }

    /// Every step for the account, stopping the network ones at the first failure.
    async fn check(&self) -> Vec<Step> {
        let mut steps = Vec::new();
        // 1. config: it loaded (else the command exited 2 before any check).
        let endpoint = match &self.account.token_endpoint {
            TokenEndpoint::Url(u) => u.clone(),
            TokenEndpoint::Discovery { issuer } => issuer.clone(),
        };
        steps.push(pass(
            "config",
            format!(
                "{} grant, token endpoint {}",
                self.account.grant, self.account.token_endpoint
            ),
        ));
        let (Some(host), Some(port)) = (
            endpoint.host_str().map(str::to_owned),
            endpoint.port_or_known_default(),
        ) else {
            steps.push(fail(
                "DNS",
                format!("{endpoint} has no host and port: fix the token endpoint in the config"),
            ));
            return skip_rest(steps, "DNS");
        };
        let port_text = port.to_string();
        // 2. DNS.
        let addrs = match resolve(&host, port).await {
            Ok(a) => a,
            Err(text) => {
                steps.push(fail("DNS", text));
                return skip_rest(steps, "DNS");
            }
        };
        let shown: Vec<String> = addrs.iter().take(3).map(|a| a.ip().to_string()).collect();
        steps.push(pass("DNS", format!("{host} → {}", shown.join(", "))));
        // 3. TCP.
        let (stream, addr, took) = match connect(&addrs).await {
            Ok(c) => c,
            Err((problem, cause)) => {
                let cause = match problem {
                    ConnectProblem::Other => cause.map(|c| format!(": {c}")).unwrap_or_default(),
                    _ => String::new(),
                };
                steps.push(fail(
                    "TCP",
                    format!("{}{cause}", problem.explain(&host, &port_text)),
                ));
                return skip_rest(steps, "TCP");
            }
        };
        steps.push(pass(
            "TCP",
            format!(
                "connected to {host}:{port} ({}) in {} ms",
                addr.ip(),
                took.as_millis()
            ),
        ));
        // 4. TLS.
        if endpoint.scheme() == "https" {
            match tls_handshake(stream, &host).await {
                Ok(shake) => steps.push(tls_step(&shake, &host, SystemTime::now())),
                Err(problem) => {
                    steps.push(fail("TLS", problem.explain(&host, &port_text)));
                    return skip_rest(steps, "TLS");
                }
            }
        } else {
            drop(stream);
            steps.push(skip("TLS", format!("not used ({} is plain http)", host)));
        }
        // 5. The token.
        let (step, token) = self.token().await;
        let token_failed = step.mark == Mark::Fail;
        steps.push(step);
        // 6. The API.
        let mut date = None;
        match (&token, &self.account.api_base) {
            (_, None) => steps.push(skip("API", "no api_base configured")),
            (None, Some(_)) => steps.push(skip("API", "not checked without a token")),
            (Some(token), Some(base)) => {
                let (step, answered) = self.api(base, token).await;
                date = answered;
                steps.push(step);
            }
        }
        // 7. The clock, against the API's answer, else the token endpoint's.
        if date.is_none() {
            date = date_of(self.http.get(endpoint.clone())).await;
        }
        steps.push(match date {
            Some((remote, local)) => clock_step(remote, local, &host),
            None if token_failed => skip("clock", "no answer with a Date header to compare"),
            None => skip("clock", "no answer carried a Date header"),
        });
        steps
    }

    /// Step 5: a stored valid token, else one request with the primary grant where allowed.
    async fn token(&self) -> (Step, Option<Token>) {
        let stored = self.stored_token().await;
        let note = match stored {
            Stored::Valid { token, expires_in } => {
                return (
                    pass(
                        "token",
                        format!(
                            "using the stored access token (valid for another {}); no request made",
                            minutes(expires_in)
                        ),
                    ),
                    Some(Token { value: token }),
                );
            }
            Stored::NeedsLogin { last_error, valid } => {
                let why = last_error.map(|e| format!(": {e}")).unwrap_or_default();
                let fix = if self.account.grant.needs_person() {
                    format!("run `{}`", self.login_command())
                } else {
                    format!(
                        "fix the account's credentials (client_secret, password) and reload the \
                         agent, or run `{}` to try them at once; doctor does not try them again \
                         (repeated refusals can lock the account)",
                        self.login_command()
                    )
                };
                let still = valid.as_ref().map_or_else(String::new, |(_, left)| {
                    format!(
                        " (its access token, valid for another {}, is used for the API check)",
                        minutes(*left)
                    )
                });
                return (
                    fail(
                        "token",
                        format!("the account waits for a login (needs_login{why}): {fix}{still}"),
                    ),
                    valid.map(|(value, _)| Token { value }),
                );
            }
            Stored::None(note) => note,
        };
        if self.account.grant.needs_person() {
            return (
                fail(
                    "token",
                    format!(
                        "no valid stored token ({note}) and the {} grant needs a person: run `{}`",
                        self.account.grant,
                        self.login_command()
                    ),
                ),
                None,
            );
        }
        let provider = match (
            &self.account.issuer,
            TokenTarget::needs_discovery(self.account),
        ) {
            (Some(issuer), true) => match crate::oidc::fetch(self.http, issuer).await {
                Ok((p, _)) => Some(p),
                Err(e) => {
                    return (
                        fail(
                            "token",
                            format!("{e}: check the account's issuer and the provider"),
                        ),
                        None,
                    );
                }
            },
            _ => None,
        };
        let target = match TokenTarget::resolve(self.account, provider.as_ref()) {
            Ok(t) => t,
            Err(e) => {
                return (fail("token", crate::login::describe_failure(&e)), None);
            }
        };
        // One request, never repeated: a wrong password tried twice may lock the account.
        let answer = request_token(
            self.http,
            self.account,
            &target,
            GrantForm::Login(self.account.grant),
        )
        .await;
        match answer {
            Ok(response) => {
                let lifetime = response
                    .expires_in
                    .filter(|s| *s > 0)
                    .map(|s| format!(", valid for {}", minutes(Duration::from_secs(s as u64))))
                    .unwrap_or_default();
                (
                    pass(
                        "token",
                        format!(
                            "new access token from the {} grant{lifetime} (no valid stored token: \
                             {note}); used for the API check only, not stored",
                            self.account.grant
                        ),
                    ),
                    Some(Token {
                        value: response.access_token,
                    }),
                )
            }
            Err(failure) => (fail("token", self.token_fix(&failure)), None),
        }
    }

    /// What a refused or failed token request means and what to do.
    fn token_fix(&self, failure: &Failure) -> String {
        let what = crate::login::describe_failure(failure);
        let name = self.name();
        match failure {
            Failure::Transient { .. } => format!("the token request failed: {what}"),
            Failure::RateLimited { .. } => {
                format!("the token endpoint refused: {what}: wait, then run doctor again")
            }
            Failure::OAuth { status, error } => {
                let fix = match error.error.as_str() {
                    "invalid_client" | "unauthorized_client" => format!(
                        "check accounts.{name}.client_id and client_secret (and that the client \
                         may use the {} grant)",
                        self.account.grant
                    ),
                    "invalid_grant" => format!(
                        "check accounts.{name}.username and password (and that the user is not \
                         locked or must not change the password)"
                    ),
                    "invalid_scope" => format!("check accounts.{name}.scope"),
                    "unsupported_grant_type" => format!(
                        "the endpoint does not offer the {} grant: check the vendor and the grant",
                        self.account.grant
                    ),
                    _ if (*status == 404 || *status == 405) => {
                        format!("check the token endpoint URL of accounts.{name}")
                    }
                    _ => format!("check accounts.{name}'s credentials with the vendor"),
                };
                format!("the token endpoint refused the credentials: {what}: {fix}")
            }
        }
    }

    async fn stored_token(&self) -> Stored {
        let (Some(store), Some(cipher)) = (&self.stored.store, &self.stored.cipher) else {
            return Stored::None(
                self.stored
                    .why_not
                    .clone()
                    .unwrap_or_else(|| "no database".to_owned()),
            );
        };
        let record = match store.load_token(self.name()).await {
            Ok(Some(r)) => r,
            Ok(None) => return Stored::None("none stored yet".to_owned()),
            Err(e) => return Stored::None(format!("the database cannot be read: {e}")),
        };
        let (saved, problem) = crate::token::persist::from_record(record, cipher);
        let now = SystemClock.now();
        let valid = saved
            .tokens
            .as_ref()
            .filter(|t| t.expires_at > now + STORED_MARGIN)
            .map(|t| (t.access_token.clone(), t.expires_at.since(now)));
        if saved.needs_login {
            return Stored::NeedsLogin {
                last_error: saved.last_error,
                valid,
            };
        }
        if problem.is_some() {
            return Stored::None("the stored token cannot be opened with this token key".into());
        }
        match (valid, saved.tokens) {
            (Some((token, expires_in)), _) => Stored::Valid { token, expires_in },
            (None, Some(_)) => Stored::None("the stored one has expired".to_owned()),
            (None, None) => Stored::None("none stored".to_owned()),
        }
    }

    /// Step 6: one authenticated GET, as a job makes it. Returns the answer's `Date` (and when
    /// it arrived) for the clock step.
    async fn api(&self, base: &Url, token: &Token) -> (Step, Option<(SystemTime, SystemTime)>) {
        let url = self.api_url(base);
        let shown = crate::http::public_url(&url);
        let mut request = self
            .http
            .get(url.clone())
            .header(ACCEPT, "application/fhir+json, application/json");
        let mut bearer =
            match HttpHeaderValue::from_str(&format!("Bearer {}", token.value.expose_secret())) {
                Ok(v) => v,
                Err(_) => {
                    return (
                        fail("API", "the access token is not a valid header value"),
                        None,
                    );
                }
            };
        bearer.set_sensitive(true);
        request = request.header(AUTHORIZATION, bearer);
        for h in &self.account.headers {
            let value = match &h.value {
                HeaderValue::Public(v) => v.as_str(),
                HeaderValue::Secret(s) => s.expose(),
            };
            let (Ok(name), Ok(mut value)) = (
                HeaderName::from_bytes(h.name.as_bytes()),
                HttpHeaderValue::from_str(value),
            ) else {
                return (
                    fail(
                        "API",
                        format!(
                            "header {}'s value is not a valid HTTP header value: fix \
                             accounts.{}.headers",
                            h.name,
                            self.name()
                        ),
                    ),
                    None,
                );
            };
            value.set_sensitive(matches!(h.value, HeaderValue::Secret(_)));
            request = request.header(name, value);
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                let e = TransportError::new(e, &url);
                return (
                    fail("API", format!("GET {shown}: {}", e.without_url())),
                    None,
                );
            }
        };
        let date = response_date(&response);
        let status = response.status().as_u16();
        let body = read_limited(response, MAX_API_BODY)
            .await
            .unwrap_or_default();
        let name = self.name();
        let step = match status {
            200..=299 => pass("API", format!("GET {shown}: HTTP {status}")),
            _ => {
                let detail = crate::sync::fetch::diagnostics(&body)
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default();
                let fix = match status {
                    401 if self.account.grant.needs_person() => format!(
                        "the API refused the token: check that api_base belongs to the same \
                         vendor environment as the token endpoint, then log in again with `{}`",
                        self.login_command()
                    ),
                    401 => "the API refused the token: check that this client (and user) may use \
                            the API and that api_base belongs to the same vendor environment as \
                            the token endpoint"
                        .to_owned(),
                    403 => format!(
                        "the token is not allowed here: check the practice id \
                         (accounts.{name}.practice_id / headers) and the client's permissions \
                         with the vendor"
                    ),
                    404 => format!("nothing at that address: check accounts.{name}.api_base"),
                    429 | 503 => "the API asks to slow down or is down: try again later".into(),
                    _ => format!("check accounts.{name}.api_base and the vendor's status"),
                };
                fail("API", format!("GET {shown}: HTTP {status}{detail}: {fix}"))
            }
        };
        (step, date)
    }

    /// The first list page for a NikoHealth list job, else the FHIR server's `metadata`.
    fn api_url(&self, base: &Url) -> Url {
        for job in &self.account.jobs {
            if let JobKind::NikohealthPatients(paging) = &job.kind {
                return crate::sync::list::page_url(base, paging, job.page_size, paging.first_page);
            }
        }
        let mut url = base.clone();
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.pop_if_empty();
            segments.push("metadata");
        }
        url
    }
}

/// Marks the remaining network steps as not checked.
fn skip_rest(mut steps: Vec<Step>, after: &str) -> Vec<Step> {
    let names: &[&'static str] = match after {
        "DNS" => &["TCP", "TLS", "token", "API", "clock"],
        "TCP" => &["TLS", "token", "API", "clock"],
        _ => &["token", "API", "clock"],
    };
    for name in names {
        steps.push(skip(name, format!("not checked (the {after} step failed)")));
    }
    steps
}

fn minutes(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 2 * 3600 {
        format!("{} h", s / 3600)
    } else if s >= 120 {
        format!("{} min", s / 60)
    } else {
        format!("{s} s")
    }
}

async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    let dns = ConnectProblem::Dns.explain(host, &port.to_string());
    match tokio::time::timeout(STEP_TIMEOUT, tokio::net::lookup_host((host, port))).await {
        Ok(Ok(addrs)) => {
            let addrs: Vec<SocketAddr> = addrs.collect();
            if addrs.is_empty() {
                Err(format!("{dns} (no addresses)"))
            } else {
                Ok(addrs)
            }
        }
        Ok(Err(e)) => Err(format!("{dns}: {e}")),
        Err(_) => Err(format!(
            "{dns}: no answer within {} s",
            STEP_TIMEOUT.as_secs()
        )),
    }
}

/// Connects to the first address that accepts, each attempt within [`STEP_TIMEOUT`].
async fn connect(
    addrs: &[SocketAddr],
) -> Result<(tokio::net::TcpStream, SocketAddr, Duration), (ConnectProblem, Option<String>)> {
    let mut problem = (ConnectProblem::Other, None);
    for addr in addrs {
        let started = Instant::now();
        match tokio::time::timeout(STEP_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => return Ok((stream, *addr, started.elapsed())),
            Ok(Err(e)) => {
                problem = match e.kind() {
                    std::io::ErrorKind::ConnectionRefused => (ConnectProblem::Refused, None),
                    std::io::ErrorKind::TimedOut => (ConnectProblem::TimedOut, None),
                    _ => (ConnectProblem::Other, Some(format!("{addr}: {e}"))),
                }
            }
            Err(_) => problem = (ConnectProblem::TimedOut, None),
        }
    }
    Err(problem)
}

/// A TLS handshake on `stream` with the verifier reqwest uses (rustls-platform-verifier on
/// ring): the system's roots plus `agent.ca_file`'s.
async fn tls_handshake(
    stream: tokio::net::TcpStream,
    host: &str,
) -> Result<Handshake, ConnectProblem> {
    let std_stream = stream.into_std().map_err(|_| ConnectProblem::Other)?;
    let host = host.to_owned();
    let work = tokio::task::spawn_blocking(move || handshake_blocking(std_stream, &host));
    match work.await {
        Ok(result) => result,
        Err(_) => Err(ConnectProblem::Other),
    }
}

fn handshake_blocking(
    mut stream: std::net::TcpStream,
    host: &str,
) -> Result<Handshake, ConnectProblem> {
    use rustls::pki_types::ServerName;
    let tls = |e: rustls::Error| ConnectProblem::Tls(e.to_string());
    stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(STEP_TIMEOUT)))
        .and_then(|()| stream.set_write_timeout(Some(STEP_TIMEOUT)))
        .map_err(|_| ConnectProblem::Other)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let extra = crate::http::extra_roots().iter().cloned();
    let verifier =
        rustls_platform_verifier::Verifier::new_with_extra_roots(extra, provider.clone())
            .map_err(tls)?;
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(tls)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    let name = ServerName::try_from(host.to_owned())
        .map_err(|e| ConnectProblem::Tls(format!("{host} is not a valid server name: {e}")))?;
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(tls)?;
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut stream) {
            if let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return Err(ConnectProblem::Tls(inner.to_string()));
            }
            return Err(match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    ConnectProblem::TimedOut
                }
                _ => ConnectProblem::Tls(format!("the handshake broke off: {e}")),
            });
        }
    }
    let version = conn
        .protocol_version()
        .map_or_else(|| "TLS".to_owned(), |v| format!("{v:?}").replace('_', "."));
    let not_after = conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| not_after(leaf));
    Ok(Handshake { version, not_after })
}

/// What a TLS handshake that passed tells: the protocol version and when the server's
/// certificate ends.
struct Handshake {
    version: String,
    not_after: Option<SystemTime>,
}

/// The end of a certificate's validity (`notAfter`), if its DER can be read.
fn not_after(der: &[u8]) -> Option<SystemTime> {
    use x509_cert::der::Decode;
    let cert = x509_cert::Certificate::from_der(der).ok()?;
    let since_epoch = cert.tbs_certificate.validity.not_after.to_unix_duration();
    Some(SystemTime::UNIX_EPOCH + since_epoch)
}

/// The TLS step's line for a trusted certificate: ✗ once it has expired or ends within
/// [`CERT_WARN_DAYS`] (a renewal that did not happen), with how many days are left.
fn tls_step(shake: &Handshake, host: &str, now: SystemTime) -> Step {
    let roots = if crate::http::extra_roots().is_empty() {
        "this system's roots"
    } else {
        "this system's roots and agent.ca_file"
    };
    let Some(end) = shake.not_after else {
        return pass(
            "TLS",
            format!(
                "{} with {host}, certificate trusted by {roots} (its end date could not be read)",
                shake.version
            ),
        );
    };
    let days = match end.duration_since(now) {
        Ok(left) => (left.as_secs() / 86_400) as i64,
        Err(past) => -((past.duration().as_secs() / 86_400) as i64) - 1,
    };
    let until = chrono::DateTime::<chrono::Utc>::from(end).format("%Y-%m-%d");
    if days < CERT_WARN_DAYS {
        let when = if days < 0 {
            format!("expired on {until}")
        } else {
            format!("expires in {days} days ({until})")
        };
        return fail(
            "TLS",
            format!(
                "{host}'s certificate {when}: ask the vendor (or whoever runs {host}) to renew it"
            ),
        );
    }
    pass(
        "TLS",
        format!(
            "{} with {host}, certificate trusted by {roots}, {days} days to expiry ({until})",
            shake.version
        ),
    )
}

/// An answer's `Date` and the local time it arrived.
fn response_date(response: &reqwest::Response) -> Option<(SystemTime, SystemTime)> {
    let local = SystemTime::now();
    let value = response
        .headers()
        .get(reqwest::header::DATE)?
        .to_str()
        .ok()?;
    httpdate::parse_http_date(value).ok().map(|d| (d, local))
}

/// The `Date` of the answer to `request` (any status), if one came.
async fn date_of(request: reqwest::RequestBuilder) -> Option<(SystemTime, SystemTime)> {
    let response = request.send().await.ok()?;
    response_date(&response)
}

/// Step 7: this server's clock against `remote`, a server's `Date` read at `local`.
fn clock_step(remote: SystemTime, local: SystemTime, host: &str) -> Step {
    // Milliseconds this server is ahead of the other (negative: behind). `Date` has whole
    // seconds, cut off: the server's time was half a second later on average.
    let millis = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    let ahead_ms = match local.duration_since(remote) {
        Ok(d) => millis(d),
        Err(e) => -millis(e.duration()),
    } - 500;
    let ahead = (ahead_ms as f64 / 1000.0).round() as i64;
    if ahead.abs() <= MAX_SKEW_SECS {
        pass(
            "clock",
            format!("within {} s of {host}'s", ahead.abs().max(1)),
        )
    } else {
        let way = if ahead > 0 { "ahead of" } else { "behind" };
        fail(
            "clock",
            format!(
                "this server's clock is {} s {way} {host}'s: fix NTP on this server \
                 (timedatectl status; chrony or systemd-timesyncd)",
                ahead.abs()
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skew_is_named_with_its_direction() {
        // A `Date` header has whole seconds, cut off: 12:00:00 was sent at 12:00:00.0–0.999.
        let date = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let at = |ms: u64| date + Duration::from_millis(ms);
        // Sent at .5 on average; read 45 s later here: this clock is 45 s ahead.
        let step = clock_step(date, at(45_500), "h");
        assert_eq!(step.mark, Mark::Fail);
        assert!(step.text.contains("45 s ahead of h's"), "{}", step.text);
        assert!(step.text.contains("fix NTP"), "{}", step.text);
        // The server's Date is 45 s ahead of the real time: this clock is 45 s behind.
        let step = clock_step(date + Duration::from_secs(45), at(300), "h");
        assert!(step.text.contains("45 s behind h's"), "{}", step.text);
        // 30 s is still fine, 31 s is not.
        assert_eq!(clock_step(date, at(30_500), "h").mark, Mark::Pass);
        assert_eq!(clock_step(date, at(31_500), "h").mark, Mark::Fail);
        assert_eq!(clock_step(date, at(700), "h").mark, Mark::Pass);
    }
}
