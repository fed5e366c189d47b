//! Logins that need a person (`ehrsync login`): the authorization code grant with PKCE (S256),
//! `state` and `nonce` through a loopback redirect (RFC 6749 §4.1, RFC 7636, RFC 8252), and the
//! device authorization grant for servers without a browser (RFC 8628). Both end with a token
//! response whose ID token, when there is one, has been validated; storing it is the caller's
//! job (`token::owner::store_login`, the same persistence the agent uses).

mod loopback;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use secrecy::SecretString;
use url::Url;

use crate::clock::SharedClock;
use crate::config::Account;
use crate::oidc::id_token::{self, Expected};
use crate::oidc::{Discovery, ProviderMetadata};
use crate::token::Timestamp;
use crate::token::client::{AuthMethod, GrantForm, TokenTarget, post_form, request_token};
use crate::token::core::Failure;
use crate::token::pkce::Pkce;
use crate::token::response::{TokenResponse, parse_error};

/// What a login needs from its surroundings.
pub struct Context<'a> {
    pub http: &'a reqwest::Client,
    pub discovery: &'a Discovery,
    pub clock: SharedClock,
    pub account: &'a Account,
}

/// How the person is reached.
#[derive(Debug, Clone)]
pub struct Options {
    /// Open the authorization page in a browser on this machine.
    pub open_browser: bool,
    /// Loopback port for the redirect; overrides the account's `redirect_port`. 0: any.
    pub port: Option<u16>,
    /// How long to wait for the person.
    pub timeout: Duration,
}

/// What the person should be told, as the login goes.
#[derive(Debug)]
pub enum Progress<'a> {
    /// Open this address (printed on a line of its own).
    Authorize { url: &'a Url, redirect_uri: &'a str },
    /// A browser could not be opened on this machine.
    NoBrowser(String),
    /// RFC 8628: open `verification_uri` anywhere and enter `user_code`.
    Device {
        verification_uri: &'a str,
        verification_uri_complete: Option<&'a str>,
        user_code: &'a str,
        expires_in: Duration,
    },
}

/// A login that worked.
pub struct LoggedIn {
    pub response: TokenResponse,
    /// When the token request was sent (lifetimes count from here).
    pub sent_at: Timestamp,
    /// The ID token's `sub`, when one came and was validated.
    pub subject: Option<String>,
    /// Worth telling the person (a scope the provider did not grant, …).
    pub notes: Vec<String>,
}

/// Why a login did not produce tokens. Never holds a secret; provider texts are trimmed.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("{0}")]
    Discovery(String),
    #[error("the provider names no authorization endpoint: set `authorization_url` in the account")]
    NoAuthorizationEndpoint,
    #[error(
        "the provider does not support PKCE with S256 ({0}); ehrsync will not receive an \
         authorization code on a loopback redirect without it, since an intercepted code would \
         then be usable by anyone (RFC 7636, RFC 8252 §8.1). If the provider does support S256 \
         but does not say so in its discovery document, set `authorization_url` explicitly"
    )]
    NoPkce(String),
    #[error(
        "the provider does not offer the device authorization grant (no \
         device_authorization_endpoint); log in with a browser instead (see `ehrsync login --help` \
         for logging in from another machine), or set `device_authorization_url`"
    )]
    NoDevice,
    #[error("cannot listen for the redirect on 127.0.0.1:{port}: {reason}")]
    Listen { port: u16, reason: String },
    #[error("the provider refused the login: {error}{}", description.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Denied {
        error: String,
        description: Option<String>,
    },
    #[error(
        "the redirect's state does not match this login (a stale browser tab, or a forged \
         redirect); nothing was stored. Run the command again"
    )]
    StateMismatch,
    #[error(
        "the redirect says it comes from issuer `{0}`, not this account's provider (a mix-up \
         attack, RFC 9207); nothing was stored"
    )]
    IssuerMismatch(String),
    #[error("the redirect carries neither a code nor an error")]
    NoCode,
    #[error("nobody completed the login within {}", humantime::format_duration(*.0))]
    TimedOut(Duration),
    #[error("the device code expired before the login was approved; run the command again")]
    DeviceExpired,
    #[error("the token endpoint did not give tokens: {0}")]
    Exchange(String),
    #[error("the device authorization endpoint: {0}")]
    DeviceAuthorization(String),
    #[error("{0}; nothing was stored")]
    IdToken(String),
    #[error("{0}")]
    Internal(String),
}

/// The account's provider metadata, when it has an issuer.
async fn provider(ctx: &Context<'_>) -> Result<Option<Arc<ProviderMetadata>>, LoginError> {
    match &ctx.account.issuer {
        Some(issuer) => ctx
            .discovery
            .get(issuer)
            .await
            .map(Some)
            .map_err(|e| LoginError::Discovery(e.to_string())),
        None => Ok(None),
    }
}

/// The configured endpoint, else the one the provider's discovery document names.
fn endpoint(
    configured: &Option<Url>,
    provider: Option<&ProviderMetadata>,
    discovered: fn(&ProviderMetadata) -> &Option<Url>,
) -> Option<Url> {
    configured
        .clone()
        .or_else(|| provider.and_then(|p| discovered(p).clone()))
}

fn random_token() -> Result<String, LoginError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| LoginError::Internal(format!("no randomness for the login: {e}")))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

fn has_scope(account: &Account, scope: &str) -> bool {
    account
        .scope
        .as_deref()
        .is_some_and(|s| s.split(' ').any(|x| x == scope))
}

/// The authorization code grant with PKCE through a loopback redirect.
pub async fn authorization_code(
    ctx: &Context<'_>,
    options: &Options,
    progress: &mut (dyn FnMut(Progress<'_>) + Send),
) -> Result<LoggedIn, LoginError> {
    let account = ctx.account;
    let provider = provider(ctx).await?;
    let endpoint = endpoint(&account.authorization_endpoint, provider.as_deref(), |p| {
        &p.authorization_endpoint
    })
    .ok_or(LoginError::NoAuthorizationEndpoint)?;
    if let Some(p) = &provider {
        // A provider that lists its methods must list S256. One that lists none is trusted
        // only when the config names the authorization page itself.
        let stated = match &p.code_challenge_methods {
            Some(methods) => Some(format!(
                "its discovery document lists code_challenge_methods_supported: [{}]",
                methods.join(", ")
            )),
            None if account.authorization_endpoint.is_none() => {
                Some("its discovery document has no code_challenge_methods_supported".to_owned())
            }
            None => None,
        };
        if let Some(stated) = stated.filter(|_| !p.supports_s256()) {
            return Err(LoginError::NoPkce(stated));
        }
    }
    let target = TokenTarget::resolve(account, provider.as_deref())
        .map_err(|e| LoginError::Discovery(describe_failure(&e)))?;

    let port = options.port.or(account.redirect_port).unwrap_or(0);
    let listener = loopback::Listener::bind(port)
        .await
        .map_err(|reason| LoginError::Listen { port, reason })?;
    let redirect_uri = listener.redirect_uri();
    let pkce = Pkce::generate().map_err(|e| LoginError::Internal(e.to_string()))?;
    let state = random_token()?;
    let nonce = has_scope(account, "openid")
        .then(random_token)
        .transpose()?;

    let mut url = endpoint;
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("response_type", "code");
        q.append_pair("client_id", &account.client_id);
        q.append_pair("redirect_uri", &redirect_uri);
        if let Some(scope) = &account.scope {
            q.append_pair("scope", scope);
        }
        if let Some(resource) = &account.resource {
            q.append_pair("resource", resource);
        }
        q.append_pair("state", &state);
        q.append_pair("code_challenge", &pkce.challenge);
        q.append_pair("code_challenge_method", "S256");
        if let Some(nonce) = &nonce {
            q.append_pair("nonce", nonce);
        }
        // OpenID Connect Core §11: offline access (a refresh token) needs explicit consent.
        if has_scope(account, "offline_access") {
            q.append_pair("prompt", "consent");
        }
    }
    progress(Progress::Authorize {
        url: &url,
        redirect_uri: &redirect_uri,
    });
    if options.open_browser
        && let Err(e) = webbrowser::open(url.as_str())
    {
        progress(Progress::NoBrowser(e.to_string()));
    }

    let expected_issuer = provider.as_ref().map(|p| p.issuer.clone());
    let answer = tokio::time::timeout(
        options.timeout,
        listener.wait(&state, expected_issuer.as_deref()),
    )
    .await
    .map_err(|_| LoginError::TimedOut(options.timeout))??;

    let sent_at = ctx.clock.now();
    let response = request_token(
        ctx.http,
        account,
        &target,
        GrantForm::Code {
            code: &answer.code,
            verifier: &pkce.verifier,
            redirect_uri: &redirect_uri,
        },
    )
    .await
    .map_err(|e| LoginError::Exchange(describe_failure(&e)))?;
    finish(
        ctx,
        provider.as_deref(),
        response,
        sent_at,
        nonce.as_deref(),
    )
    .await
}

/// The device authorization grant (RFC 8628): the person approves on any device.
pub async fn device(
    ctx: &Context<'_>,
    options: &Options,
    progress: &mut (dyn FnMut(Progress<'_>) + Send),
) -> Result<LoggedIn, LoginError> {
    let account = ctx.account;
    let provider = provider(ctx).await?;
    let endpoint = endpoint(
        &account.device_authorization_endpoint,
        provider.as_deref(),
        |p| &p.device_authorization_endpoint,
    )
    .ok_or(LoginError::NoDevice)?;
    let target = TokenTarget::resolve(account, provider.as_deref())
        .map_err(|e| LoginError::Discovery(describe_failure(&e)))?;

    let mut form = Vec::new();
    if let Some(scope) = &account.scope {
        form.push(("scope", scope.clone()));
    }
    if let Some(resource) = &account.resource {
        form.push(("resource", resource.clone()));
    }
    let auth = AuthMethod::for_account(account, provider.as_deref());
    let answer = post_form(ctx.http, account, &endpoint, auth, form)
        .await
        .map_err(|e| LoginError::DeviceAuthorization(describe_failure(&e)))?;
    if !(200..300).contains(&answer.status) {
        let why = parse_error(&answer.body)
            .map(|e| e.error)
            .unwrap_or_else(|| format!("HTTP {}", answer.status));
        return Err(LoginError::DeviceAuthorization(why));
    }
    let grant = DeviceGrant::parse(&answer.body).map_err(LoginError::DeviceAuthorization)?;
    progress(Progress::Device {
        verification_uri: &grant.verification_uri,
        verification_uri_complete: grant.verification_uri_complete.as_deref(),
        user_code: &grant.user_code,
        expires_in: grant.expires_in,
    });

    let started = tokio::time::Instant::now();
    let give_up = started + grant.expires_in.min(options.timeout);
    let mut interval = grant.interval;
    loop {
        tokio::time::sleep(interval).await;
        if tokio::time::Instant::now() >= give_up {
            return Err(if grant.expires_in <= options.timeout {
                LoginError::DeviceExpired
            } else {
                LoginError::TimedOut(options.timeout)
            });
        }
        let sent_at = ctx.clock.now();
        let result = request_token(
            ctx.http,
            account,
            &target,
            GrantForm::DeviceCode(&grant.device_code),
        )
        .await;
        match result {
            Ok(response) => return finish(ctx, provider.as_deref(), response, sent_at, None).await,
            Err(Failure::OAuth { error, .. }) => match error.error.as_str() {
                "authorization_pending" => {}
                // RFC 8628 §3.5: poll five seconds slower from now on.
                "slow_down" => interval += Duration::from_secs(5),
                "expired_token" => return Err(LoginError::DeviceExpired),
                _ => {
                    return Err(LoginError::Denied {
                        error: error.error,
                        description: error.description,
                    });
                }
            },
            Err(Failure::RateLimited { retry_after }) => {
                let asked = retry_after.map(|r| r.wait(ctx.clock.now()));
                interval = interval.max(asked.unwrap_or(Duration::from_secs(5)));
            }
            // A network hiccup while the person is still typing: keep polling.
            Err(Failure::Transient {
                reason,
                retry_after,
                ..
            }) => {
                tracing::warn!(reason, "polling the token endpoint failed; trying again");
                // A 503's Retry-After holds for the next poll only (the loop sleeps `interval`).
                if let Some(r) = retry_after {
                    tokio::time::sleep(r.wait(ctx.clock.now()).saturating_sub(interval)).await;
                }
            }
        }
    }
}

/// The device authorization response (RFC 8628 §3.2).
struct DeviceGrant {
    device_code: SecretString,
    user_code: String,
    verification_uri: String,
    verification_uri_complete: Option<String>,
    expires_in: Duration,
    interval: Duration,
}

impl DeviceGrant {
    fn parse(body: &[u8]) -> Result<DeviceGrant, String> {
        #[derive(serde::Deserialize)]
        struct Raw {
            device_code: String,
            user_code: String,
            verification_uri: Option<String>,
            /// Google's older name for it.
            verification_url: Option<String>,
            verification_uri_complete: Option<String>,
            expires_in: u64,
            interval: Option<u64>,
        }
        let raw: Raw = serde_json::from_slice(body).map_err(|e| {
            let text = e.to_string();
            let cut = text.find(['"', '`']).map_or(text.as_str(), |i| &text[..i]);
            format!(
                "the answer is not RFC 8628's device authorization response: {}",
                cut.trim()
            )
        })?;
        let verification_uri = raw
            .verification_uri
            .or(raw.verification_url)
            .ok_or("the answer has no verification_uri")?;
        Ok(DeviceGrant {
            device_code: SecretString::from(raw.device_code),
            user_code: raw.user_code,
            verification_uri,
            verification_uri_complete: raw.verification_uri_complete,
            expires_in: Duration::from_secs(raw.expires_in),
            // RFC 8628 §3.2: five seconds when the provider does not say.
            interval: Duration::from_secs(raw.interval.unwrap_or(5).max(1)),
        })
    }
}

/// Validates the ID token (if any) and notes what the person should know.
async fn finish(
    ctx: &Context<'_>,
    provider: Option<&ProviderMetadata>,
    response: TokenResponse,
    sent_at: Timestamp,
    nonce: Option<&str>,
) -> Result<LoggedIn, LoginError> {
    let account = ctx.account;
    let mut notes = Vec::new();
    let mut subject = None;
    if let Some(token) = &response.id_token {
        match provider {
            Some(p) => {
                let jwks_uri = p.jwks_uri.as_ref().ok_or_else(|| {
                    LoginError::IdToken(
                        "an ID token came, but the provider publishes no jwks_uri to check it with"
                            .to_owned(),
                    )
                })?;
                let keys = id_token::fetch_jwks(ctx.http, jwks_uri)
                    .await
                    .map_err(LoginError::IdToken)?;
                let expected = Expected {
                    issuer: &p.issuer,
                    client_id: &account.client_id,
                    nonce,
                };
                let claims = id_token::verify(token, &keys, &expected, ctx.clock.now())
                    .map_err(|e| LoginError::IdToken(e.to_string()))?;
                subject = Some(claims.subject);
            }
            None => notes.push(
                "an ID token came but was not checked: the account has no `issuer` to take keys from (ehrsync does not use it)".to_owned(),
            ),
        }
    }
    if let (Some(granted), Some(asked)) = (&response.scope, &account.scope) {
        let granted: Vec<&str> = granted.split(' ').collect();
        let missing: Vec<&str> = asked
            .split(' ')
            .filter(|s| !s.is_empty() && !granted.contains(s))
            .collect();
        if !missing.is_empty() {
            notes.push(format!("the provider did not grant: {}", missing.join(" ")));
        }
    }
    if response.refresh_token.is_none() {
        let hint = if has_scope(account, "offline_access") {
            ""
        } else {
            " (add `offline_access` to the account's scope if the provider needs it)"
        };
        notes.push(format!(
            "no refresh token came{hint}: the account needs another login when this access token expires"
        ));
    }
    Ok(LoggedIn {
        response,
        sent_at,
        subject,
        notes,
    })
}

/// A token-endpoint failure as a person reads it (the provider's `error`, its description).
pub fn describe_failure(f: &Failure) -> String {
    match f {
        Failure::Transient { reason, .. } => reason.clone(),
        Failure::RateLimited { .. } => "the provider asks to slow down (HTTP 429)".to_owned(),
        Failure::OAuth { status, error } => {
            let mut text = format!("{} (HTTP {status})", error.error);
            if let Some(d) = &error.description {
                text.push_str(": ");
                text.push_str(d);
            }
            text
        }
    }
}
