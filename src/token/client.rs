//! One token request over HTTP: the form RFC 6749 describes for each grant, client
//! authentication in the body or as HTTP Basic, preset extras (`resource`, `scope`), a per-request
//! deadline, and the answer mapped to what the lifecycle core understands. Nothing here decides
//! what to do next; that is [`super::core`]'s job.

use std::time::Duration;

use base64::Engine as _;
use secrecy::{ExposeSecret, SecretString};
use url::Url;

use super::core::{Failure, Request};
use super::response::{OAuthError, TokenResponse, parse_error, parse_success};
use crate::config::{Account, TokenEndpoint};
use crate::oidc::ProviderMetadata;
use crate::vendor::{ClientAuth, Grant};

/// Token responses are a few kilobytes; anything much larger is not one.
const MAX_BODY: usize = 256 * 1024;

/// What every ehrsync HTTP client has: rustls on ring, a per-request deadline, ehrsync's user
/// agent, and no redirects (one would carry credentials or a token wherever it points).
pub fn client_builder(timeout: Duration) -> reqwest::ClientBuilder {
    // ring, not aws-lc-rs: no cmake or NASM in the build, and it cross-compiles for Windows.
    // Installing twice is harmless (the first provider stays), hence the ignored result.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .user_agent(concat!("ehrsync/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none())
}

/// The HTTP client the engine shares between accounts for token requests.
pub fn http_client(timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
    client_builder(timeout)
        // Token requests are minutes apart, so a pooled connection is always long idle, and a
        // server closing it as it is reused fails the request ("connection closed before
        // message completed"). A fresh connection per token request avoids that race.
        .pool_max_idle_per_host(0)
        .build()
}

/// How the client authenticates at the token endpoint (RFC 6749 §2.3.1, OpenID Connect Core §9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// `client_secret_basic`: HTTP Basic with `client_id:client_secret`.
    Basic,
    /// `client_secret_post`: both as form fields.
    Post,
    /// A public client (no secret): `client_id` as a form field, nothing else (`none`).
    None,
}

impl AuthMethod {
    /// The method for `account`: none without a secret; else the configured one; else the first
    /// of basic and post the provider's discovery document lists; else basic (RFC 8414 §2's
    /// default).
    pub fn for_account(account: &Account, provider: Option<&ProviderMetadata>) -> AuthMethod {
        if account.client_secret.is_none() {
            return AuthMethod::None;
        }
        match account.client_auth {
            Some(ClientAuth::Basic) => AuthMethod::Basic,
            Some(ClientAuth::Post) => AuthMethod::Post,
            None => {
                let listed = |m: &str| {
                    provider.is_some_and(|p| p.token_endpoint_auth_methods.iter().any(|x| x == m))
                };
                if !listed("client_secret_basic") && listed("client_secret_post") {
                    AuthMethod::Post
                } else {
                    AuthMethod::Basic
                }
            }
        }
    }
}

/// Where an account's token requests go and how the client authenticates there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenTarget {
    pub url: Url,
    pub auth: AuthMethod,
}

impl TokenTarget {
    /// The target from the config, with discovery's `provider` filling what it leaves open.
    pub fn resolve(
        account: &Account,
        provider: Option<&ProviderMetadata>,
    ) -> Result<TokenTarget, Failure> {
        let url = match (&account.token_endpoint, provider) {
            (TokenEndpoint::Url(u), _) => u.clone(),
            (TokenEndpoint::Discovery { .. }, Some(p)) => p.token_endpoint.clone(),
            (TokenEndpoint::Discovery { issuer }, None) => {
                return Err(Failure::Transient {
                    reason: format!("the token endpoint of {issuer} is not discovered yet"),
                });
            }
        };
        Ok(TokenTarget {
            url,
            auth: AuthMethod::for_account(account, provider),
        })
    }

    /// Whether resolving needs the provider's discovery document.
    pub fn needs_discovery(account: &Account) -> bool {
        account.issuer.is_some()
            && (matches!(account.token_endpoint, TokenEndpoint::Discovery { .. })
                || (account.client_auth.is_none() && account.client_secret.is_some()))
    }
}

/// `application/x-www-form-urlencoded` encoding (RFC 6749 §2.3.1 applies it to Basic credentials too).
fn form_encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// The grant-specific part of a token request.
pub enum GrantForm<'a> {
    /// The account's primary grant, as the lifecycle core asks for it.
    Login(Grant),
    /// The refresh_token grant (RFC 6749 §6).
    Refresh(&'a SecretString),
    /// The token-exchange half of authorization_code with PKCE (RFC 6749 §4.1.3, RFC 7636 §4.5).
    Code {
        code: &'a SecretString,
        verifier: &'a SecretString,
        redirect_uri: &'a str,
    },
    /// A poll of the device authorization grant (RFC 8628 §3.4).
    DeviceCode(&'a SecretString),
}

/// The `grant_type` of RFC 8628's device access token request.
pub const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

impl GrantForm<'_> {
    /// The form for the core's `request`, given the refresh token held (if any).
    pub fn for_request(
        request: Request,
        refresh_token: Option<&SecretString>,
    ) -> Option<GrantForm<'_>> {
        match request {
            Request::Login(grant) => Some(GrantForm::Login(grant)),
            Request::Refresh => refresh_token.map(GrantForm::Refresh),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Other,
    Code,
    Device,
}

/// Sends a token request for `account` to `target` and maps the answer.
pub async fn request_token(
    http: &reqwest::Client,
    account: &Account,
    target: &TokenTarget,
    grant: GrantForm<'_>,
) -> Result<TokenResponse, Failure> {
    let grant_kind = match grant {
        GrantForm::Code { .. } => Kind::Code,
        GrantForm::DeviceCode(_) => Kind::Device,
        _ => Kind::Other,
    };
    let mut form: Vec<(&str, String)> = Vec::new();
    match grant {
        GrantForm::Login(Grant::Password) => {
            let (Some(user), Some(password)) = (&account.username, &account.password) else {
                return Err(not_configured("username and password"));
            };
            form.push(("grant_type", "password".to_owned()));
            form.push(("username", user.clone()));
            form.push(("password", password.expose().to_owned()));
        }
        GrantForm::Login(Grant::ClientCredentials) => {
            form.push(("grant_type", "client_credentials".to_owned()))
        }
        GrantForm::Login(Grant::AuthorizationCode) => {
            return Err(not_configured("an authorization code from `ehrsync login`"));
        }
        GrantForm::Refresh(rt) => {
            form.push(("grant_type", "refresh_token".to_owned()));
            form.push(("refresh_token", rt.expose_secret().to_owned()));
        }
        GrantForm::Code {
            code,
            verifier,
            redirect_uri,
        } => {
            form.push(("grant_type", "authorization_code".to_owned()));
            form.push(("code", code.expose_secret().to_owned()));
            form.push(("code_verifier", verifier.expose_secret().to_owned()));
            form.push(("redirect_uri", redirect_uri.to_owned()));
        }
        GrantForm::DeviceCode(device_code) => {
            form.push(("grant_type", DEVICE_CODE_GRANT.to_owned()));
            form.push(("device_code", device_code.expose_secret().to_owned()));
        }
    }
    // The code and device grants were scoped at the authorization request; repeating the scope
    // is harmless for the others and some providers (Azure AD v1) want `resource` every time.
    let scoped = !matches!(grant_kind, Kind::Code | Kind::Device);
    if let Some(scope) = account.scope.as_ref().filter(|_| scoped) {
        form.push(("scope", scope.clone()));
    }
    if let Some(resource) = &account.resource {
        form.push(("resource", resource.clone()));
    }
    let answer = post_form(http, account, &target.url, target.auth, form).await?;
    map_answer(answer.status, answer.retry_after, &answer.body)
}

/// An HTTP answer from an OAuth endpoint, its body bounded.
pub struct FormAnswer {
    pub status: u16,
    pub retry_after: Option<Duration>,
    pub body: Vec<u8>,
}

/// POSTs `form` to one of the provider's endpoints (token, device authorization) with the
/// client authenticated by `auth`. The form may hold secrets: it is dropped once encoded.
pub async fn post_form(
    http: &reqwest::Client,
    account: &Account,
    url: &Url,
    auth: AuthMethod,
    mut form: Vec<(&str, String)>,
) -> Result<FormAnswer, Failure> {
    let mut builder = http
        .post(url.clone())
        .header(reqwest::header::ACCEPT, "application/json");
    match auth {
        AuthMethod::Basic => {
            let secret = account.client_secret.as_ref().map_or("", |s| s.expose());
            let pair = SecretString::from(format!(
                "{}:{}",
                form_encode(&account.client_id),
                form_encode(secret)
            ));
            let encoded = SecretString::from(
                base64::engine::general_purpose::STANDARD.encode(pair.expose_secret()),
            );
            let mut value = reqwest::header::HeaderValue::try_from(format!(
                "Basic {}",
                encoded.expose_secret()
            ))
            .map_err(|_| not_configured("a client id that fits in a header"))?;
            value.set_sensitive(true);
            builder = builder.header(reqwest::header::AUTHORIZATION, value);
        }
        AuthMethod::Post | AuthMethod::None => {
            form.push(("client_id", account.client_id.clone()));
            if let Some(secret) = account
                .client_secret
                .as_ref()
                .filter(|_| auth == AuthMethod::Post)
            {
                form.push(("client_secret", secret.expose().to_owned()));
            }
        }
    }
    let body = SecretString::from(
        url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form.iter().map(|(k, v)| (*k, v.as_str())))
            .finish(),
    );
    drop(form);
    let response = builder
        .header(
            reqwest::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .body(body.expose_secret().to_owned())
        .send()
        .await
        .map_err(|e| transport(&e))?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    let body = read_limited(response).await?;
    Ok(FormAnswer {
        status,
        retry_after,
        body,
    })
}

/// Maps an HTTP answer from a token endpoint (separate from the I/O so it can be tested alone).
pub fn map_answer(
    status: u16,
    retry_after: Option<Duration>,
    body: &[u8],
) -> Result<TokenResponse, Failure> {
    match status {
        200..=299 => parse_success(body).map_err(|e| Failure::Transient {
            reason: e.to_string(),
        }),
        429 => Err(Failure::RateLimited { retry_after }),
        408 | 500..=599 => {
            let detail = parse_error(body)
                .map(|e| format!(": {}", e.error))
                .unwrap_or_default();
            Err(Failure::Transient {
                reason: format!("the token endpoint answered HTTP {status}{detail}"),
            })
        }
        _ => Err(Failure::OAuth {
            status,
            error: parse_error(body).unwrap_or_else(|| OAuthError {
                error: format!("http_{status}"),
                description: Some("the answer is not an OAuth error body".to_owned()),
            }),
        }),
    }
}

/// `Retry-After`: delay-seconds or an HTTP-date (RFC 9110 §10.2.3).
fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

async fn read_limited(mut response: reqwest::Response) -> Result<Vec<u8>, Failure> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| transport(&e))? {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(Failure::Transient {
                reason: format!("the token endpoint's answer is larger than {MAX_BODY} bytes"),
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// How a failure to reach the token endpoint at all begins.
const CONNECT_FAILED: &str = "cannot connect to the token endpoint";

/// Whether `failure` is a connection that never opened (the endpoint may have moved).
pub fn is_connect_failure(failure: &Failure) -> bool {
    matches!(failure, Failure::Transient { reason } if reason.starts_with(CONNECT_FAILED))
}

/// Describes a transport failure without the request (whose body holds secrets).
fn transport(e: &reqwest::Error) -> Failure {
    let kind = if e.is_timeout() {
        "the token endpoint did not answer in time"
    } else if e.is_connect() {
        CONNECT_FAILED
    } else {
        "the token request failed"
    };
    Failure::Transient {
        reason: format!("{kind}{}", causes(e)),
    }
}

/// `": cause: deeper cause…"`: the sources of `e`, for errors whose own text says too little
/// (reqwest's "error sending request"). Empty when there are none.
pub fn causes(e: &dyn std::error::Error) -> String {
    let mut text = String::new();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn not_configured(what: &str) -> Failure {
    Failure::OAuth {
        status: 0,
        error: OAuthError {
            error: "not_configured".to_owned(),
            description: Some(format!("this request needs {what}")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_map_to_failures_as_the_design_says() {
        assert!(map_answer(200, None, br#"{"access_token":"a","expires_in":"3599"}"#).is_ok());
        assert!(matches!(
            map_answer(200, None, b"<html>"),
            Err(Failure::Transient { .. })
        ));
        assert!(matches!(
            map_answer(429, Some(Duration::from_secs(7)), b""),
            Err(Failure::RateLimited { retry_after: Some(d) }) if d == Duration::from_secs(7)
        ));
        for status in [408, 500, 502, 503] {
            assert!(
                matches!(
                    map_answer(status, None, b"oops"),
                    Err(Failure::Transient { .. })
                ),
                "{status}"
            );
        }
        match map_answer(
            400,
            None,
            br#"{"error":"invalid_grant","error_description":"AADSTS70008"}"#,
        ) {
            Err(Failure::OAuth { status: 400, error }) => assert_eq!(error.error, "invalid_grant"),
            other => panic!("{other:?}"),
        }
        match map_answer(401, None, b"Unauthorized") {
            Err(Failure::OAuth { status: 401, error }) => assert_eq!(error.error, "http_401"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        assert_eq!(parse_retry_after("120"), Some(Duration::from_secs(120)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn basic_credentials_are_form_encoded_first() {
        // RFC 6749 §2.3.1: "client_id:secret" after application/x-www-form-urlencoded encoding.
        assert_eq!(form_encode("a b:c/é"), "a+b%3Ac%2F%C3%A9");
    }
}
