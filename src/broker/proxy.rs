//! `/v1/accounts/{account}/api/{path…}`: the call made for the client below the account's
//! `api_base`, with the owner's token and the account's headers added.
//!
//! - The path is read raw and checked by [`super::path::target`] (never decoded first).
//! - The client's `Authorization` (its broker key), hop-by-hop headers, `Host`, cookies,
//!   forwarding headers and any header the account sets itself (`nx-practice-id`: a client
//!   must not pick another practice) are dropped; the token and the account's headers added.
//! - The request body is read up to [`MAX_REQUEST_BODY`] (so the one retry after a 401 can
//!   send it again); the response body is streamed to the client as it arrives, up to
//!   [`MAX_RESPONSE_BODY`], within the broker's `proxy_timeout`.
//! - A 401 is reported to the owner and the call repeated once with the next token.
//! - Redirects are not followed: one within `api_base` is passed on, its `Location` rewritten
//!   to the broker's path; one anywhere else becomes 502.

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::Response;
use url::Url;

use super::{Broker, BrokerClient, Endpoint, Outcome, Served, TOKEN_WAIT, error, retry_later};
use crate::config::HeaderValue as ConfigHeaderValue;
use crate::token::owner::{Unavailable, bearer};

/// The largest request body the proxy accepts (it is kept for the retry after a 401).
pub const MAX_REQUEST_BODY: usize = 8 * 1024 * 1024;
/// The largest response body the proxy passes on; a longer one is cut off (and counted).
pub const MAX_RESPONSE_BODY: u64 = 256 * 1024 * 1024;

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), and those the
/// proxy replaces or must not pass on.
const DROPPED_REQUEST: [&str; 15] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "authorization",
    "content-length",
    "cookie",
    "forwarded",
    // The body is read whole before the call: nothing for the API to continue.
    "expect",
];
const DROPPED_RESPONSE: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "set-cookie",
    "alt-svc",
];

/// The fallback route: proxied calls, and 404 for anything else.
pub(super) async fn dispatch(State(b): State<Broker>, request: Request) -> Response {
    let raw = request.uri().path().to_owned();
    let Some((account, api_path)) = split(&raw) else {
        return error(StatusCode::NOT_FOUND, "no such broker endpoint");
    };
    let Some(client) = b.identify(request.headers()) else {
        return b.unknown_client(Endpoint::Api);
    };
    let Some(served) = b.allowed(&client, account, Endpoint::Api) else {
        return b.forbidden(&client, Endpoint::Api);
    };
    let name = served.account.name.to_string();
    if client.read_only && !matches!(*request.method(), Method::GET | Method::HEAD) {
        b.record(Some(&client.name), &name, Endpoint::Api, Outcome::Forbidden);
        return error(
            StatusCode::FORBIDDEN,
            "this client is read-only: only GET and HEAD are proxied",
        );
    }
    let Some(base) = served.account.api_base.as_ref() else {
        b.record(
            Some(&client.name),
            &name,
            Endpoint::Api,
            Outcome::BadRequest,
        );
        return error(
            StatusCode::NOT_FOUND,
            "the account has no api_base to proxy to",
        );
    };
    let url = match super::path::target(base, api_path, request.uri().query()) {
        Ok(u) => u,
        Err(e) => {
            b.record(
                Some(&client.name),
                &name,
                Endpoint::Api,
                Outcome::BadRequest,
            );
            tracing::info!(client = %client.name, account = %name, outcome = "bad_request", reason = %e,
                "broker refused a proxied path");
            return error(StatusCode::BAD_REQUEST, &e.to_string());
        }
    };
    let (parts, body) = request.into_parts();
    let read = axum::body::to_bytes(body, MAX_REQUEST_BODY);
    let body = match tokio::time::timeout(b.inner.proxy_timeout, read).await {
        Ok(Ok(b)) => b,
        Ok(Err(_)) | Err(_) => {
            b.record(Some(&client.name), &name, Endpoint::Api, Outcome::TooLarge);
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "the request body is larger than 8 MiB, or was not sent within the broker's proxy_timeout",
            );
        }
    };
    let call = Call {
        broker: &b,
        client: &client,
        served: &served,
        base,
        method: parts.method,
        headers: forwarded(&parts.headers, &served),
        body,
    };
    let (outcome, response) = call.send(url).await;
    b.record(Some(&client.name), &name, Endpoint::Api, outcome);
    tracing::debug!(client = %client.name, account = %name, outcome = outcome.as_str(),
        status = response.status().as_u16(), "broker proxied a call");
    response
}

/// `/v1/accounts/{account}/api/{rest}` → (`account`, `rest`); `…/api` alone → (`account`, "").
fn split(raw: &str) -> Option<(&str, &str)> {
    let rest = raw.strip_prefix("/v1/accounts/")?;
    let (account, tail) = rest.split_once('/')?;
    let api_path = match tail.strip_prefix("api") {
        Some("") => "",
        Some(p) => p.strip_prefix('/')?,
        None => return None,
    };
    Some((account, api_path))
}

/// The client's headers that go on: all but [`DROPPED_REQUEST`], those the `Connection`
/// header names, `x-forwarded-*`, and the account's own.
fn forwarded(headers: &HeaderMap, served: &Served) -> HeaderMap {
    let named_by_connection: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::new();
    for (name, value) in headers {
        let n = name.as_str();
        let dropped = DROPPED_REQUEST.contains(&n)
            || n.starts_with("x-forwarded-")
            || named_by_connection.iter().any(|c| c == n)
            || served
                .account
                .headers
                .iter()
                .any(|h| h.name.eq_ignore_ascii_case(n));
        if !dropped {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

struct Call<'a> {
    broker: &'a Broker,
    client: &'a BrokerClient,
    served: &'a Served,
    base: &'a Url,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
}

impl Call<'_> {
    /// Sends the call, once more after a 401 with the next token; the outcome and the answer.
    async fn send(&self, url: Url) -> (Outcome, Response) {
        let handle = &self.served.handle;
        let mut token = match tokio::time::timeout(TOKEN_WAIT, handle.token()).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                let wait = match e {
                    Unavailable::NeedsLogin(_) => 60,
                    Unavailable::Stopped => 5,
                };
                return (
                    Outcome::Unavailable,
                    retry_later(&format!("no token for the account: {e}"), wait),
                );
            }
            Err(_) => {
                return (
                    Outcome::Unavailable,
                    retry_later("no valid token within 30 s", 10),
                );
            }
        };
        let mut retried = false;
        loop {
            let mut request = self
                .broker
                .inner
                .http
                .request(self.method.clone(), url.clone())
                .headers(self.headers.clone())
                .header(header::AUTHORIZATION, bearer(&token))
                .body(self.body.clone());
            for h in &self.served.account.headers {
                request = match &h.value {
                    ConfigHeaderValue::Public(v) => request.header(h.name.as_str(), v.as_str()),
                    ConfigHeaderValue::Secret(s) => match sensitive(s.expose()) {
                        Some(v) => request.header(h.name.as_str(), v),
                        None => request,
                    },
                };
            }
            let answer = match request.send().await {
                Ok(a) => a,
                Err(e) => {
                    // The error's text without the URL: a query may hold patient data.
                    let reason = crate::http::TransportError::new(e, &url).without_url();
                    return (
                        Outcome::UpstreamError,
                        error(
                            StatusCode::BAD_GATEWAY,
                            &format!("the API did not answer: {reason}"),
                        ),
                    );
                }
            };
            if answer.status() == StatusCode::UNAUTHORIZED && !retried {
                handle.unauthorized(token.generation);
                match tokio::time::timeout(TOKEN_WAIT, handle.token_after(token.generation)).await {
                    Ok(Ok(next)) => {
                        token = next;
                        retried = true;
                        continue;
                    }
                    // No newer token: the client gets the API's 401.
                    _ => return (Outcome::Proxied, self.pass_on(answer)),
                }
            }
            if is_redirect(answer.status()) {
                return self.redirect(&url, answer);
            }
            if answer
                .content_length()
                .is_some_and(|n| n > MAX_RESPONSE_BODY)
            {
                return (
                    Outcome::TooLarge,
                    error(
                        StatusCode::BAD_GATEWAY,
                        "the API's answer is larger than the broker passes on (256 MiB)",
                    ),
                );
            }
            return (Outcome::Proxied, self.pass_on(answer));
        }
    }

    /// A redirect within `api_base` goes to the client with `Location` pointing at the broker;
    /// any other is refused.
    fn redirect(&self, url: &Url, answer: reqwest::Response) -> (Outcome, Response) {
        let location = answer
            .headers()
            .get(header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .and_then(|l| url.join(l).ok());
        let within = location.as_ref().and_then(|l| {
            let rest = super::path::within_base(self.base, l)?;
            // The rewritten path must pass the same checks as a client's.
            super::path::check_path(rest).is_ok().then(|| {
                let mut to = format!("/v1/accounts/{}/api/{rest}", self.served.account.name);
                if let Some(q) = l.query() {
                    to.push('?');
                    to.push_str(q);
                }
                to
            })
        });
        match within {
            Some(to) => {
                let mut r = self.pass_on(answer);
                match header::HeaderValue::from_str(&to) {
                    Ok(v) => {
                        r.headers_mut().insert(header::LOCATION, v);
                    }
                    Err(_) => {
                        r.headers_mut().remove(header::LOCATION);
                    }
                }
                (Outcome::Proxied, r)
            }
            None => {
                tracing::warn!(client = %self.client.name, account = %self.served.account.name,
                    "the API redirected a proxied call outside the account's api_base; not followed");
                (
                    Outcome::UpstreamError,
                    error(
                        StatusCode::BAD_GATEWAY,
                        "the API redirected outside the account's api_base; the broker does not follow",
                    ),
                )
            }
        }
    }

    /// The API's answer, headers filtered, body streamed (cut off past [`MAX_RESPONSE_BODY`]).
    fn pass_on(&self, answer: reqwest::Response) -> Response {
        let status = answer.status();
        let mut headers = HeaderMap::new();
        for (name, value) in answer.headers() {
            if !DROPPED_RESPONSE.contains(&name.as_str()) {
                headers.append(name.clone(), value.clone());
            }
        }
        let metrics = self.broker.inner.metrics.clone();
        let labels = [
            self.client.name.clone(),
            self.served.account.name.to_string(),
        ];
        let stream = futures_util::stream::unfold(Some((answer, 0u64)), move |state| {
            let metrics = metrics.clone();
            let labels = labels.clone();
            async move {
                let (mut answer, seen) = state?;
                match answer.chunk().await {
                    Ok(Some(bytes)) => {
                        let seen = seen + bytes.len() as u64;
                        if seen > MAX_RESPONSE_BODY {
                            metrics
                                .broker_requests
                                .with_label_values(&[
                                    labels[0].as_str(),
                                    labels[1].as_str(),
                                    "api",
                                    "too_large",
                                ])
                                .inc();
                            return Some((Err(std::io::Error::other("cut off at 256 MiB")), None));
                        }
                        Some((Ok(bytes), Some((answer, seen))))
                    }
                    Ok(None) => None,
                    Err(_) => Some((
                        Err(std::io::Error::other("the API's answer broke off")),
                        None,
                    )),
                }
            }
        });
        let mut response = Response::new(Body::from_stream(stream));
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        response
    }
}

fn is_redirect(status: StatusCode) -> bool {
    matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308)
}

/// A header value marked sensitive (HTTP/2 never indexes it; Debug output hides it).
fn sensitive(value: &str) -> Option<header::HeaderValue> {
    let mut v = header::HeaderValue::from_str(value).ok()?;
    v.set_sensitive(true);
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_account_and_path_are_split_from_the_raw_path() {
        assert_eq!(
            split("/v1/accounts/nx/api/Patient/1"),
            Some(("nx", "Patient/1"))
        );
        assert_eq!(split("/v1/accounts/nx/api"), Some(("nx", "")));
        assert_eq!(split("/v1/accounts/nx/api/"), Some(("nx", "")));
        assert_eq!(
            split("/v1/accounts/nx/api//evil/x"),
            Some(("nx", "/evil/x"))
        );
        assert_eq!(split("/v1/accounts/nx/apix"), None);
        assert_eq!(split("/v1/accounts/nx/token/x"), None);
        assert_eq!(split("/v2/accounts/nx/api/x"), None);
    }
}
