//! Interoperability with an OpenID provider that is not ours: panva's oidc-provider from the npm
//! registry (installed by `.ci/test`), configured by tests/oidc-provider/server.mjs. This file
//! holds the harness — start the provider, act as the user's browser on its own login and
//! consent pages (`drive_login`, `drive_device`), revoke refresh tokens — and a self-test of it
//! that performs the authorization code flow (S256 PKCE, state, nonce, loopback redirect on a
//! random port), a rotating refresh, a withdrawn grant and the device flow by hand.
//!
//! Then ehrsync itself: `ehrsync login` completes through the provider's pages with nobody at
//! a browser, a running `ehrsync run` adopts the tokens and refreshes on its own, a withdrawn
//! grant sends the account to `needs_login`, and another login brings it back; and
//! `ehrsync login --device` completes the device flow.
#![cfg(unix)]

mod common;

use common::agent::{Agent, Login};

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::StatusCode;
use secrecy::ExposeSecret;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use url::Url;

const CLIENT_ID: &str = "ehrsync-login-interop";
const CLIENT_SECRET: &str = "login-interop-secret-5d0c";
/// Any login and any password pass the provider's development login page.
const LOGIN: &str = "practice-it";
const PASSWORD: &str = "any-password";

/// The provider process (node tests/oidc-provider/server.mjs); killed when dropped.
struct OidcProvider {
    child: Child,
    /// Exactly as discovery reports it: `http://127.0.0.1:PORT`, no trailing slash.
    issuer: String,
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the provider with access tokens living `access_ttl_secs`; its one client is
/// `CLIENT_ID`/`CLIENT_SECRET` (client_secret_basic), redirect `http://127.0.0.1:ANY/callback`.
fn start_oidc_provider(access_ttl_secs: u64) -> OidcProvider {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/oidc-provider");
    assert!(
        std::path::Path::new(dir)
            .join("node_modules/oidc-provider")
            .exists(),
        "oidc-provider is not installed: run `bash .ci/test` (it runs `npm ci` in tests/oidc-provider)"
    );
    let mut child = Command::new("node")
        .arg("server.mjs")
        .current_dir(dir)
        .env("OIDC_CLIENT_ID", CLIENT_ID)
        .env("OIDC_CLIENT_SECRET", CLIENT_SECRET)
        .env("ACCESS_TTL_SECONDS", access_ttl_secs.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start node (installed by .ci/test)");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let info: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("server said: {line}"));
    OidcProvider {
        child,
        issuer: info["issuer"].as_str().unwrap().to_owned(),
    }
}

fn http_client() -> reqwest::Client {
    // Redirects are off in ehrsync's builder: the browser below follows them itself.
    ehrsync::http::client_builder(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// The provider's OpenID discovery document.
async fn discover(issuer: &str) -> serde_json::Value {
    let response = http_client()
        .get(format!("{issuer}/.well-known/openid-configuration"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    json(response).await
}

/// A response body as JSON (reqwest's `json` feature is off).
async fn json(response: reqwest::Response) -> serde_json::Value {
    let text = response.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// Acts as the user's browser for an authorization request: follows the provider's redirects,
/// signs in as `login` (any password) and consents, until the provider redirects to a URL on
/// another host:port — the client's loopback redirect URI. It GETs that URL (the client's
/// listener answers it) and returns it, `http://127.0.0.1:PORT/callback?code=…&state=…&iss=…`
/// (or `?error=…` if the provider refused the request after the pages).
async fn drive_login(authorization_url: &str, login: &str) -> String {
    let mut browser = Browser::new(authorization_url);
    let mut page = browser.get(browser.url(authorization_url)).await;
    for _ in 0..20 {
        if let Some(next) = page.redirect() {
            if !browser.on_provider(&next) {
                let response = browser
                    .http
                    .get(next.as_str())
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("GET {next} (the client's redirect URI): {e}"));
                let _ = response.text().await;
                return next.into();
            }
            page = browser.get(next).await;
        } else if let Some(form) = page.form() {
            page = browser.submit(&page, form, login).await;
        } else {
            break;
        }
    }
    panic!("drive_login is stuck: {page}")
}

/// Acts as the user's browser for the device flow: opens `verification_uri_complete` (with the
/// user code), confirms the code, signs in as `login` and consents, until the provider's
/// "Sign-in Success" page.
async fn drive_device(verification_uri_complete: &str, login: &str) {
    let mut browser = Browser::new(verification_uri_complete);
    let mut page = browser.get(browser.url(verification_uri_complete)).await;
    for _ in 0..20 {
        if let Some(next) = page.redirect() {
            assert!(browser.on_provider(&next), "left the provider: {page}");
            page = browser.get(next).await;
        } else if let Some(form) = page.form() {
            page = browser.submit(&page, form, login).await;
        } else if page.status == StatusCode::OK && page.body.contains("Sign-in Success") {
            return;
        } else {
            break;
        }
    }
    panic!("drive_device is stuck: {page}")
}

/// Revokes `refresh_token` at the discovered `revocation_endpoint` (RFC 7009, client_secret_basic).
async fn revoke(issuer: &str, client_id: &str, secret: &str, refresh_token: &str) {
    let endpoint = discover(issuer).await["revocation_endpoint"]
        .as_str()
        .expect("revocation_endpoint")
        .to_owned();
    let response = http_client()
        .post(endpoint)
        .basic_auth(client_id, Some(secret))
        .form(&[
            ("token", refresh_token),
            ("token_type_hint", "refresh_token"),
        ])
        .send()
        .await
        .unwrap();
    let status = response.status();
    assert_eq!(status, StatusCode::OK, "{}", response.text().await.unwrap());
}

/// Withdraws every grant the provider has issued (test route of server.mjs): all its refresh
/// and access tokens stop working, as if the user had revoked the client's access. Returns how
/// many grants there were.
async fn revoke_all_grants(issuer: &str) -> u64 {
    let response = http_client()
        .post(format!("{issuer}/test/revoke-all"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = json(response).await;
    body["revoked_grants"].as_u64().unwrap()
}

/// A browser without JavaScript: a cookie jar for the provider's origin, no automatic redirects.
struct Browser {
    http: reqwest::Client,
    provider: url::Origin,
    cookies: BTreeMap<String, String>,
}

/// One response as the browser saw it.
struct Page {
    url: Url,
    status: StatusCode,
    location: Option<String>,
    body: String,
}

/// A `<form>`: where it goes and its named inputs (hidden ones with their values).
struct Form {
    action: String,
    post: bool,
    fields: Vec<(String, String)>,
}

impl Browser {
    fn new(start: &str) -> Browser {
        Browser {
            http: http_client(),
            provider: Url::parse(start).unwrap().origin(),
            cookies: BTreeMap::new(),
        }
    }

    fn url(&self, s: &str) -> Url {
        Url::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn on_provider(&self, url: &Url) -> bool {
        url.origin() == self.provider
    }

    async fn get(&mut self, url: Url) -> Page {
        let request = self.http.get(url.as_str());
        self.send(url, request).await
    }

    /// Submits `form` as it is, with `login` and a password typed into the login form.
    async fn submit(&mut self, page: &Page, form: Form, login: &str) -> Page {
        let action = page
            .url
            .join(&form.action)
            .unwrap_or_else(|e| panic!("form action {}: {e}", form.action));
        let fields: Vec<(String, String)> = form
            .fields
            .into_iter()
            .map(|(name, value)| match name.as_str() {
                "login" => (name, login.to_owned()),
                "password" => (name, PASSWORD.to_owned()),
                _ => (name, value),
            })
            .collect();
        if form.post {
            let request = self.http.post(action.as_str()).form(&fields);
            self.send(action, request).await
        } else {
            let mut action = action;
            action.query_pairs_mut().extend_pairs(&fields);
            self.get(action).await
        }
    }

    async fn send(&mut self, url: Url, mut request: reqwest::RequestBuilder) -> Page {
        let on_provider = self.on_provider(&url);
        if on_provider && !self.cookies.is_empty() {
            let header: Vec<String> = self
                .cookies
                .iter()
                .map(|(name, value)| format!("{name}={value}"))
                .collect();
            request = request.header(reqwest::header::COOKIE, header.join("; "));
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        if on_provider {
            for set_cookie in response.headers().get_all(reqwest::header::SET_COOKIE) {
                let set_cookie = set_cookie.to_str().unwrap_or_default();
                let pair = set_cookie.split(';').next().unwrap_or_default();
                let Some((name, value)) = pair.split_once('=') else {
                    continue;
                };
                let attributes = set_cookie.to_ascii_lowercase();
                if value.is_empty()
                    || attributes.contains("max-age=0")
                    || attributes.contains("expires=thu, 01 jan 1970")
                {
                    self.cookies.remove(name.trim());
                } else {
                    self.cookies
                        .insert(name.trim().to_owned(), value.trim().to_owned());
                }
            }
        }
        let status = response.status();
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .map(|v| v.to_str().unwrap().to_owned());
        let body = response.text().await.unwrap_or_default();
        Page {
            url,
            status,
            location,
            body,
        }
    }
}

impl Page {
    /// Where a 3xx answer points, resolved against this page's URL.
    fn redirect(&self) -> Option<Url> {
        if !self.status.is_redirection() {
            return None;
        }
        let location = self.location.as_deref()?;
        Some(
            self.url
                .join(location)
                .unwrap_or_else(|e| panic!("Location {location}: {e}")),
        )
    }

    /// The page's first `<form>` and its `<input>`s, by plain string search.
    fn form(&self) -> Option<Form> {
        if !self.status.is_success() {
            return None;
        }
        let body = &self.body;
        let start = body.find("<form")?;
        let tag_end = start + body[start..].find('>')?;
        let tag = &body[start..tag_end];
        let end = body[tag_end..]
            .find("</form>")
            .map_or(body.len(), |i| tag_end + i);
        let mut fields = Vec::new();
        let mut rest = &body[tag_end..end];
        while let Some(i) = rest.find("<input") {
            let input_end = rest[i..].find('>').map_or(rest.len(), |j| i + j);
            let input = &rest[i..input_end];
            if let Some(name) = attribute(input, "name") {
                fields.push((name, attribute(input, "value").unwrap_or_default()));
            }
            rest = &rest[input_end..];
        }
        Some(Form {
            action: attribute(tag, "action").unwrap_or_default(),
            post: attribute(tag, "method").is_some_and(|m| m.eq_ignore_ascii_case("post")),
            fields,
        })
    }
}

impl std::fmt::Display for Page {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let body: String = self.body.chars().take(3000).collect();
        write!(
            f,
            "{} {} (Location: {:?})\n{body}",
            self.status, self.url, self.location
        )
    }
}

/// The value of attribute `name` in an HTML start tag (quoted with " or '), entities decoded.
fn attribute(tag: &str, name: &str) -> Option<String> {
    let mut from = 0;
    while let Some(i) = tag[from..].find(name).map(|i| from + i) {
        from = i + name.len();
        let preceded_by_space = tag[..i].ends_with(|c: char| c.is_ascii_whitespace());
        let rest = &tag[from..];
        if !preceded_by_space || !rest.starts_with('=') {
            continue;
        }
        let rest = &rest[1..];
        let quote = rest.chars().next()?;
        if quote != '"' && quote != '\'' {
            continue;
        }
        let value = &rest[1..];
        let value = &value[..value.find(quote)?];
        return Some(unescape(value));
    }
    None
}

fn unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&#x27;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// 16 random bytes, base64url.
fn random_token() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).unwrap();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A JWT's header and payload, unverified.
fn jwt_parts(jwt: &str) -> (serde_json::Value, serde_json::Value) {
    let mut parts = jwt.split('.');
    let mut decode = || {
        let part = parts.next().expect("a JWT part");
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    };
    (decode(), decode())
}

/// A POST to the token endpoint with client_secret_basic: the status and the JSON body.
async fn token_request(endpoint: &str, form: &[(&str, &str)]) -> (StatusCode, serde_json::Value) {
    let response = http_client()
        .post(endpoint)
        .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
        .form(form)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, json(response).await)
}

/// A one-shot stand-in for `ehrsync login`'s loopback listener: answers the first request with
/// a small HTML page and reports its request target (`/callback?…`).
async fn callback_listener() -> (u16, tokio::sync::oneshot::Receiver<String>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = socket.read(&mut buf).await.unwrap();
            assert!(n > 0, "connection closed mid-request");
            request.extend_from_slice(&buf[..n]);
        }
        let request = String::from_utf8_lossy(&request);
        let target = request.split(' ').nth(1).unwrap_or_default().to_owned();
        let page = "<!DOCTYPE html><title>ehrsync</title><p>Signed in. You can close this tab.</p>";
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{page}",
            page.len()
        );
        socket.write_all(response.as_bytes()).await.unwrap();
        let _ = socket.shutdown().await;
        let _ = tx.send(target);
    });
    (port, rx)
}

#[tokio::test(flavor = "multi_thread")]
async fn harness_drives_code_and_device_flows() {
    let started = Instant::now();
    let provider = start_oidc_provider(4);
    let issuer = provider.issuer.as_str();
    let discovery = discover(issuer).await;
    assert_eq!(discovery["issuer"], issuer);
    let str_of = |key: &str| {
        discovery[key]
            .as_str()
            .unwrap_or_else(|| panic!("{key} in {discovery}"))
            .to_owned()
    };
    let token_endpoint = str_of("token_endpoint");

    // Authorization code + S256 PKCE, state, nonce; the loopback redirect on a random port
    // (registered without a port).
    let (port, callback) = callback_listener().await;
    let redirect_uri = format!("http://127.0.0.1:{port}/callback");
    let pkce = ehrsync::token::pkce::Pkce::generate().unwrap();
    let (state, nonce) = (random_token(), random_token());
    let mut authorization = Url::parse(&str_of("authorization_endpoint")).unwrap();
    authorization
        .query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", CLIENT_ID)
        .append_pair("redirect_uri", &redirect_uri)
        .append_pair("scope", "openid offline_access api")
        .append_pair("state", &state)
        .append_pair("nonce", &nonce)
        .append_pair("code_challenge", &pkce.challenge)
        .append_pair("code_challenge_method", "S256")
        .append_pair("prompt", "consent");
    let followed = drive_login(authorization.as_str(), LOGIN).await;
    let target = tokio::time::timeout(Duration::from_secs(5), callback)
        .await
        .unwrap()
        .unwrap();
    let followed = Url::parse(&followed).unwrap();
    assert_eq!(
        followed.as_str(),
        format!("http://127.0.0.1:{port}{target}")
    );
    assert_eq!(followed.path(), "/callback");
    let query: BTreeMap<String, String> = followed.query_pairs().into_owned().collect();
    assert_eq!(query.get("state"), Some(&state), "{followed}");
    assert_eq!(query.get("iss").map(String::as_str), Some(issuer));
    let code = query.get("code").expect("code");

    let (status, tokens) = token_request(
        &token_endpoint,
        &[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", &redirect_uri),
            ("code_verifier", pkce.verifier.expose_secret()),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{tokens}");
    for key in ["access_token", "refresh_token", "id_token"] {
        assert!(tokens[key].is_string(), "{key} in {tokens}");
    }
    assert_eq!(tokens["token_type"], "Bearer");
    assert_eq!(tokens["expires_in"], 4);
    assert_eq!(tokens["scope"], "openid offline_access api");
    let (header, claims) = jwt_parts(tokens["id_token"].as_str().unwrap());
    assert_eq!(header["alg"], "RS256");
    assert_eq!(claims["iss"], issuer);
    assert_eq!(claims["aud"], CLIENT_ID);
    assert_eq!(claims["sub"], LOGIN);
    assert_eq!(claims["nonce"], nonce.as_str());

    // The refresh token rotates.
    let refresh_token = tokens["refresh_token"].as_str().unwrap();
    let (status, refreshed) = token_request(
        &token_endpoint,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{refreshed}");
    let rotated = refreshed["refresh_token"]
        .as_str()
        .expect("a new refresh token");
    assert_ne!(rotated, refresh_token);
    assert_ne!(refreshed["access_token"], tokens["access_token"]);
    assert!(refreshed["id_token"].is_string(), "{refreshed}");

    // Withdrawn grants: the refresh token is refused with invalid_grant.
    assert_eq!(revoke_all_grants(issuer).await, 1);
    let (status, refused) = token_request(
        &token_endpoint,
        &[("grant_type", "refresh_token"), ("refresh_token", rotated)],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert_eq!(refused["error"], "invalid_grant");

    // The device flow.
    let response = http_client()
        .post(str_of("device_authorization_endpoint"))
        .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
        .form(&[("scope", "openid offline_access api")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let device = json(response).await;
    let device_code = device["device_code"].as_str().unwrap();
    let (status, pending) = token_request(
        &token_endpoint,
        &[
            ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
            ("device_code", device_code),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(pending["error"], "authorization_pending");
    drive_device(device["verification_uri_complete"].as_str().unwrap(), LOGIN).await;
    let mut interval = Duration::from_millis(200);
    let tokens = loop {
        let (status, body) = token_request(
            &token_endpoint,
            &[
                ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
                ("device_code", device_code),
            ],
        )
        .await;
        if status == StatusCode::OK {
            break body;
        }
        match body["error"].as_str() {
            Some("authorization_pending") => {}
            Some("slow_down") => interval += Duration::from_secs(5),
            _ => panic!("{status} {body}"),
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{body}");
        tokio::time::sleep(interval).await;
    };
    for key in ["access_token", "refresh_token", "id_token"] {
        assert!(tokens[key].is_string(), "{key} in {tokens}");
    }
    let (_, claims) = jwt_parts(tokens["id_token"].as_str().unwrap());
    assert_eq!(claims["sub"], LOGIN);

    // RFC 7009 revocation of that refresh token.
    let refresh_token = tokens["refresh_token"].as_str().unwrap();
    revoke(issuer, CLIENT_ID, CLIENT_SECRET, refresh_token).await;
    let (status, refused) = token_request(
        &token_endpoint,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert_eq!(refused["error"], "invalid_grant");
    eprintln!("harness self-test took {:?}", started.elapsed());
}

const ACCOUNT: &str = "op";

fn account_config(issuer: &str) -> String {
    format!(
        "[accounts.{ACCOUNT}]\nvendor = 'generic'\ngrant = 'authorization_code'\nissuer = '{issuer}'\n\
         client_id = '{CLIENT_ID}'\nclient_secret = {{ env = 'OP_SECRET' }}\nscope = 'openid offline_access api'\n"
    )
}

fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn needs_login(m: &str) -> f64 {
    sample(
        m,
        &format!("ehrsync_account_needs_login{{account=\"{ACCOUNT}\"}}"),
    )
}

fn valid(m: &str) -> f64 {
    sample(m, &format!("ehrsync_token_valid{{account=\"{ACCOUNT}\"}}"))
}

fn refreshes(m: &str) -> f64 {
    sample(
        m,
        &format!(
            "ehrsync_token_requests_total{{account=\"{ACCOUNT}\",grant=\"refresh_token\",outcome=\"success\"}}"
        ),
    )
}

/// `ehrsync login op --no-browser`, with this test as the person at the browser.
async fn ehrsync_login(agent: &Agent) -> String {
    let mut login = Login::start(
        &agent.config_path(),
        &[ACCOUNT, "--no-browser"],
        &[("OP_SECRET", CLIENT_SECRET)],
    );
    let url = login.url();
    let callback = drive_login(&url, LOGIN).await;
    assert!(callback.contains("code="), "{callback}");
    let (exit, stdout, stderr) = login.finish(Duration::from_secs(20));
    assert!(exit.success(), "login failed:\n{stdout}\n{stderr}");
    stdout
}

#[tokio::test(flavor = "multi_thread")]
async fn ehrsync_login_through_the_providers_pages_then_the_agent_refreshes_and_recovers_after_a_revocation()
 {
    let provider = start_oidc_provider(4);
    let agent = Agent::start(
        &account_config(&provider.issuer),
        "5s",
        &[("OP_SECRET", CLIENT_SECRET)],
    );
    agent
        .metrics_until("needs_login before any login", |m| needs_login(m) == 1.0)
        .await;

    let stdout = ehrsync_login(&agent).await;
    assert!(
        stdout.contains(&format!("(as {LOGIN})")),
        "the ID token was read: {stdout}"
    );
    assert!(stdout.contains("refresh token expires"), "{stdout}");
    agent
        .metrics_until("valid after the login", |m| {
            valid(m) == 1.0 && needs_login(m) == 0.0
        })
        .await;
    // 4-second access tokens: the agent refreshes them (rotating refresh tokens) by itself.
    agent
        .metrics_until("two refreshes", |m| refreshes(m) >= 2.0)
        .await;

    // The person withdraws the grant at the provider: the next refresh is refused.
    assert!(revoke_all_grants(&provider.issuer).await >= 1);
    agent
        .metrics_until("needs_login after the revocation", |m| {
            needs_login(m) == 1.0
        })
        .await;
    assert!(
        agent.log().contains(&format!("login {ACCOUNT}`")),
        "the log names the command: {}",
        agent.log()
    );

    ehrsync_login(&agent).await;
    let m = agent
        .metrics_until("valid after the second login", |m| {
            valid(m) == 1.0 && needs_login(m) == 0.0
        })
        .await;
    let before = refreshes(&m);
    agent
        .metrics_until("a refresh after the second login", |m| {
            refreshes(m) > before
        })
        .await;
    let log = agent.log();
    assert!(!log.contains(CLIENT_SECRET), "the client secret in the log");
}

#[tokio::test(flavor = "multi_thread")]
async fn ehrsync_login_device_completes_through_the_providers_device_pages() {
    let provider = start_oidc_provider(60);
    let dir = tempfile::tempdir().unwrap();
    let config = common::write_config(
        dir.path(),
        &format!(
            "[agent]\n{}{}",
            common::database_lines("ehrsync.db"),
            account_config(&provider.issuer)
        ),
    );
    let mut login = Login::start(
        &config,
        &[ACCOUNT, "--device"],
        &[("OP_SECRET", CLIENT_SECRET)],
    );
    let url = login.url();
    assert!(url.contains("user_code="), "{url}");
    drive_device(&url, LOGIN).await;
    // oidc-provider states no polling interval, so the first poll comes after RFC 8628's 5 s.
    let (exit, stdout, stderr) = login.finish(Duration::from_secs(30));
    assert!(exit.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("refresh token expires"), "{stdout}");
    let status = common::ehrsync(
        &["--config", config.to_str().unwrap(), "status", "--json"],
        &[("OP_SECRET", CLIENT_SECRET)],
    );
    let report: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(report["accounts"][0]["state"], "valid", "{report}");
    assert!(report["accounts"][0]["login_command"].is_null(), "{report}");
}
