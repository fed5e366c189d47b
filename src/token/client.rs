//! One token request over HTTP: the form RFC 6749 describes for each grant, client
//! authentication in the body or as HTTP Basic, preset extras (`resource`, `scope`), a per-request
//! deadline, and the answer mapped to what the lifecycle core understands. Nothing here decides
//! what to do next; that is [`super::core`]'s job.

use std::time::Duration;

use base64::Engine as _;
use secrecy::{ExposeSecret, SecretString};
use url::Url;

use super::core::{Failure, Request, TransientKind};
use super::response::{OAuthError, TokenResponse, parse_error, parse_success};
use crate::config::{Account, TokenEndpoint};
use crate::http::{BodyError, RetryAfter, TransportError, TransportKind, read_limited};
use crate::oidc::ProviderMetadata;
use crate::vendor::{ClientAuth, Grant};

/// Token responses are a few kilobytes; anything much larger is not one.
const MAX_BODY: usize = 256 * 1024;

/// The HTTP client the engine shares between accounts for token requests.
pub fn http_client(timeout: Duration) -> Result<reqwest::Client, crate::http::ClientSetupError> {
    crate::http::build(
        crate::http::client_builder(timeout)
            // Token requests are minutes apart, so a pooled connection is always long idle, and
            // a server closing it as it is reused fails the request ("connection closed before
            // message completed"). A fresh connection per token request avoids that race.
            .pool_max_idle_per_host(0),
    )
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
                return Err(Failure::transient(
                    TransientKind::Other,
                    format!("the token endpoint of {issuer} is not discovered yet"),
                ));
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
    /// Resolved by whoever acts on it, against their own clock.
    pub retry_after: Option<RetryAfter>,
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
        .map_err(|e| transport(TransportError::new(e, url)))?;
    let status = response.status().as_u16();
    let retry_after = RetryAfter::from_headers(response.headers());
    let body = read_limited(response, MAX_BODY)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge { limit } => Failure::transient(
                TransientKind::Malformed,
                format!(
                    "the answer from {} is larger than {limit} bytes",
                    crate::http::public_url(url)
                ),
            ),
            BodyError::Read(e) => transport(e),
        })?;
    Ok(FormAnswer {
        status,
        retry_after,
        body,
    })
}

/// Maps an HTTP answer from a token endpoint (separate from the I/O so it can be tested alone).
pub fn map_answer(
    status: u16,
    retry_after: Option<RetryAfter>,
    body: &[u8],
) -> Result<TokenResponse, Failure> {
    match status {
        200..=299 => parse_success(body)
            .map_err(|e| Failure::transient(TransientKind::Malformed, e.to_string())),
        429 => Err(Failure::RateLimited { retry_after }),
        408 | 500..=599 => {
            let detail = parse_error(body)
                .map(|e| format!(": {}", e.error))
                .unwrap_or_default();
            Err(Failure::Transient {
                kind: TransientKind::Status(status),
                reason: format!("the token endpoint answered HTTP {status}{detail}"),
                // RFC 9110 §10.2.3: on a 503 it is how long the service expects to be down
                // (maintenance, overload); a retry before it only adds to the load.
                retry_after: retry_after.filter(|_| status == 503),
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

/// Whether `failure` is a connection that never opened (the endpoint may have moved).
pub fn is_connect_failure(failure: &Failure) -> bool {
    matches!(
        failure,
        Failure::Transient {
            kind: TransientKind::Connect,
            ..
        }
    )
}

/// A request that got no answer, as a transient failure. The description names the endpoint
/// and the cause, never the request (its body holds secrets).
fn transport(e: TransportError) -> Failure {
    let kind = match e.kind {
        TransportKind::Connect => TransientKind::Connect,
        TransportKind::Timeout => TransientKind::Timeout,
        TransportKind::Other => TransientKind::Other,
    };
    Failure::transient(kind, e.to_string())
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
        let seven = Some(RetryAfter::Delay(Duration::from_secs(7)));
        assert!(matches!(
            map_answer(429, seven, b""),
            Err(Failure::RateLimited { retry_after }) if retry_after == seven
        ));
        for status in [408, 500, 502, 503] {
            match map_answer(status, None, b"oops") {
                Err(Failure::Transient {
                    kind: TransientKind::Status(s),
                    retry_after: None,
                    ..
                }) => assert_eq!(s, status),
                other => panic!("{status}: {other:?}"),
            }
        }
        assert!(matches!(
            map_answer(200, None, b"<html>"),
            Err(Failure::Transient {
                kind: TransientKind::Malformed,
                ..
            })
        ));
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
    fn retry_after_counts_on_503_and_429_only() {
        // RFC 9110 §10.2.3 gives Retry-After a meaning on 503 (and RFC 6585 on 429); on other
        // statuses it is ignored and the backoff decides.
        let seven = Some(RetryAfter::Delay(Duration::from_secs(7)));
        assert!(matches!(
            map_answer(503, seven, b"Service Unavailable"),
            Err(Failure::Transient { kind: TransientKind::Status(503), retry_after, .. }) if retry_after == seven
        ));
        for status in [500, 502, 504, 408] {
            assert!(
                matches!(
                    map_answer(status, seven, b""),
                    Err(Failure::Transient {
                        retry_after: None,
                        ..
                    })
                ),
                "{status}"
            );
        }
    }

    #[test]
    fn only_connect_failures_count_as_connect_failures() {
        assert!(is_connect_failure(&Failure::transient(
            TransientKind::Connect,
            "cannot connect to https://id.example.com/token"
        )));
        for kind in [
            TransientKind::Timeout,
            TransientKind::Status(503),
            TransientKind::Malformed,
            TransientKind::Other,
        ] {
            // Even when the words say so: the kind decides, not the message.
            assert!(!is_connect_failure(&Failure::transient(
                kind,
                "cannot connect to the token endpoint"
            )));
        }
    }

    #[test]
    fn basic_credentials_are_form_encoded_first() {
        // RFC 6749 §2.3.1: "client_id:secret" after application/x-www-form-urlencoded encoding.
        assert_eq!(form_encode("a b:c/é"), "a+b%3Ac%2F%C3%A9");
    }
}
