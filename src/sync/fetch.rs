//! One page GET against a vendor API, with the fault rules of a pull: the account's token and
//! preset headers on every request; HTTP 401 → one forced token refresh and one retry; 429 →
//! wait for `Retry-After`; 5xx, 408, timeouts and connection errors → bounded retries with
//! backoff (a 503's `Retry-After` waited for at least); any other status → an error carrying
//! the server's `OperationOutcome` diagnostics.
//! Every answer is counted in `ehrsync_api_requests_total`.

use std::time::Duration;

use axum::http::{HeaderName, HeaderValue as HttpHeaderValue};
use reqwest::header::{ACCEPT, AUTHORIZATION};
use url::Url;

use super::SyncError;
use crate::clock::SharedClock;
use crate::config::{Account, HeaderValue};
use crate::http::{BodyError, RetryAfter, TransportError, read_limited};
use crate::metrics::Metrics;
use crate::token::owner::{CurrentToken, TokenHandle, Unavailable, bearer};

/// The largest page body accepted. 1,000 FHIR resources of a few kilobytes fit many times over.
pub const MAX_PAGE_BYTES: usize = 64 * 1024 * 1024;
/// Retries of a page after 5xx, 408, timeouts or connection errors, before the run fails.
pub const TRANSIENT_RETRIES: u32 = 4;
/// Backoff before the first retry; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// 429 answers honoured for one page before the run gives up.
pub const RATE_LIMIT_RETRIES: u32 = 10;
/// The longest `Retry-After` waited for (429 or 503); a longer one fails the run (the next run
/// tries again).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(15 * 60);
/// Wait for a 429 without `Retry-After`.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(30);
/// How long to wait for the token owner to replace a token the API refused.
const REFRESH_WAIT: Duration = Duration::from_secs(60);

/// Sends the GETs of one run for one account.
pub struct Fetcher<'a> {
    pub http: &'a reqwest::Client,
    pub account: &'a Account,
    pub tokens: &'a TokenHandle,
    pub metrics: &'a Metrics,
    pub clock: &'a SharedClock,
    /// How long to wait for a valid access token before the run fails (`token_wait`).
    pub token_wait: Duration,
}

/// The body of a page, and where it came from.
pub struct Page {
    pub url: Url,
    pub body: Vec<u8>,
}

enum Attempt {
    Done(Vec<u8>),
    Unauthorized(u64),
    RateLimited(Option<Duration>),
    /// `retry_after`: what a 503 stated (RFC 9110 §10.2.3), waited for at least.
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
}

impl Fetcher<'_> {
    /// GETs `url` (page number `page`, for messages) until it succeeds or the rules above give up.
    pub async fn get(&self, url: &Url, page: u32) -> Result<Page, SyncError> {
        let mut token = self.valid_token().await?;
        let mut refreshed = false;
        let mut transient = 0u32;
        let mut rate_limited = 0u32;
        loop {
            match self.attempt(url, page, &token).await? {
                Attempt::Done(body) => {
                    return Ok(Page {
                        url: url.clone(),
                        body,
                    });
                }
                Attempt::Unauthorized(generation) => {
                    if refreshed {
                        return Err(SyncError::Http {
                            url: url.to_string(),
                            page,
                            status: 401,
                            detail: "the API refused a freshly issued token too".to_owned(),
                        });
                    }
                    refreshed = true;
                    tracing::info!(account = %self.account.name, page, "the API refused the token (401); refreshing it once");
                    self.tokens.unauthorized(generation);
                    token = tokio::time::timeout(REFRESH_WAIT, self.tokens.token_after(generation))
                        .await
                        .map_err(|_| SyncError::Http {
                            url: url.to_string(),
                            page,
                            status: 401,
                            detail: format!(
                                "the API refused the token and no new one came within {}s",
                                REFRESH_WAIT.as_secs()
                            ),
                        })?
                        .map_err(token_error)?;
                }
                Attempt::RateLimited(after) => {
                    rate_limited += 1;
                    let wait = after.unwrap_or(DEFAULT_RETRY_AFTER);
                    if rate_limited > RATE_LIMIT_RETRIES || wait > MAX_RETRY_AFTER {
                        return Err(SyncError::Http {
                            url: url.to_string(),
                            page,
                            status: 429,
                            detail: format!(
                                "rate limited {rate_limited} times (Retry-After {}s); the next run continues",
                                wait.as_secs()
                            ),
                        });
                    }
                    tracing::info!(account = %self.account.name, page, wait_s = wait.as_secs(), "rate limited (429); waiting for Retry-After");
                    tokio::time::sleep(wait).await;
                    token = self.valid_token().await?;
                }
                Attempt::Transient {
                    reason,
                    retry_after,
                } => {
                    transient += 1;
                    if transient > TRANSIENT_RETRIES {
                        return Err(SyncError::Unreachable {
                            url: url.to_string(),
                            page,
                            attempts: transient,
                            reason,
                        });
                    }
                    if let Some(stated) = retry_after.filter(|d| *d > MAX_RETRY_AFTER) {
                        return Err(SyncError::Http {
                            url: url.to_string(),
                            page,
                            status: 503,
                            detail: format!(
                                "unavailable for {}s (Retry-After); the next run continues",
                                stated.as_secs()
                            ),
                        });
                    }
                    // At least what the server asked for, and never less than the backoff (a
                    // `Retry-After: 0` would otherwise be a tight loop).
                    let wait = backoff(transient).max(retry_after.unwrap_or_default());
                    tracing::warn!(account = %self.account.name, page, attempt = transient, wait_ms = wait.as_millis() as u64, reason = %reason, "page request failed; retrying");
                    tokio::time::sleep(wait).await;
                    token = self.valid_token().await?;
                }
            }
        }
    }

    /// A valid access token, waiting for the owner at most `token_wait`: an outage of the
    /// token endpoint then ends the run `failed`, saying why, instead of holding it open.
    async fn valid_token(&self) -> Result<CurrentToken, SyncError> {
        match tokio::time::timeout(self.token_wait, self.tokens.token()).await {
            Ok(token) => token.map_err(token_error),
            Err(_) => {
                let snap = self.tokens.snapshot();
                let why = snap
                    .last_error
                    .unwrap_or_else(|| format!("the account is {}", snap.state.as_str()));
                Err(SyncError::Token(format!(
                    "none within {} (token_wait): {why}",
                    humantime::format_duration(self.token_wait)
                )))
            }
        }
    }

    async fn attempt(
        &self,
        url: &Url,
        page: u32,
        token: &crate::token::owner::CurrentToken,
    ) -> Result<Attempt, SyncError> {
        let mut request = self
            .http
            .get(url.clone())
            .header(ACCEPT, "application/fhir+json, application/json")
            .header(AUTHORIZATION, bearer(token));
        for h in &self.account.headers {
            let value = match &h.value {
                HeaderValue::Public(v) => v.as_str(),
                HeaderValue::Secret(s) => s.expose(),
            };
            // Names and public values were validated at config load; a secret that is not a
            // valid header value is reported without its content.
            let name = HeaderName::from_bytes(h.name.as_bytes());
            let mut value = HttpHeaderValue::from_str(value).map_err(|_| SyncError::Config {
                reason: format!("header {}'s value is not a valid HTTP header value", h.name),
            })?;
            value.set_sensitive(matches!(h.value, HeaderValue::Secret(_)));
            if let Ok(name) = name {
                request = request.header(name, value);
            }
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                self.count("error");
                return Ok(Attempt::Transient {
                    reason: TransportError::new(e, url).without_url(),
                    retry_after: None,
                });
            }
        };
        let status = response.status().as_u16();
        match status {
            200..=299 => {
                let body = match read_limited(response, MAX_PAGE_BYTES).await {
                    Ok(b) => b,
                    Err(BodyError::TooLarge { .. }) => {
                        self.count("2xx");
                        return Err(SyncError::Malformed {
                            url: url.to_string(),
                            page,
                            reason: format!("the page is larger than {MAX_PAGE_BYTES} bytes"),
                        });
                    }
                    Err(BodyError::Read(e)) => {
                        self.count("error");
                        return Ok(Attempt::Transient {
                            reason: e.without_url(),
                            retry_after: None,
                        });
                    }
                };
                self.count("2xx");
                Ok(Attempt::Done(body))
            }
            401 => {
                self.count("401");
                Ok(Attempt::Unauthorized(token.generation))
            }
            429 => {
                self.count("429");
                Ok(Attempt::RateLimited(self.retry_after(&response)))
            }
            500..=599 | 408 => {
                self.count(if status == 408 { "4xx" } else { "5xx" });
                let retry_after = if status == 503 {
                    self.retry_after(&response)
                } else {
                    None
                };
                let body = read_limited(response, MAX_PAGE_BYTES)
                    .await
                    .unwrap_or_default();
                Ok(Attempt::Transient {
                    reason: format!("HTTP {status}{}", outcome_suffix(&body)),
                    retry_after,
                })
            }
            _ => {
                self.count(if status < 500 { "4xx" } else { "5xx" });
                let body = read_limited(response, MAX_PAGE_BYTES)
                    .await
                    .unwrap_or_default();
                Err(SyncError::Http {
                    url: url.to_string(),
                    page,
                    status,
                    detail: diagnostics(&body)
                        .unwrap_or_else(|| "no OperationOutcome in the answer".to_owned()),
                })
            }
        }
    }

    /// The answer's `Retry-After` as a wait from now on the run's clock.
    fn retry_after(&self, response: &reqwest::Response) -> Option<Duration> {
        RetryAfter::from_headers(response.headers()).map(|r| r.wait(self.clock.now()))
    }

    fn count(&self, status: &str) {
        self.metrics
            .api_requests
            .with_label_values(&[self.account.name.as_str(), status])
            .inc();
    }
}

fn token_error(e: Unavailable) -> SyncError {
    SyncError::Token(e.to_string())
}

/// Backoff before retry `attempt` (1-based): doubling from 1 s, capped at 30 s, with jitter in
/// its upper half so retries of many jobs spread out.
fn backoff(attempt: u32) -> Duration {
    let ceiling = FIRST_BACKOFF
        .saturating_mul(1 << attempt.saturating_sub(1).min(16))
        .min(MAX_BACKOFF);
    ceiling / 2 + ceiling.mul_f64(fastrand::f64() / 2.0)
}

/// The diagnostics of an `OperationOutcome` body: each issue's severity, code and
/// `diagnostics` (or `details.text`), joined, at most 300 characters.
pub fn diagnostics(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Outcome {
        #[serde(rename = "resourceType")]
        resource_type: String,
        #[serde(default)]
        issue: Vec<Issue>,
    }
    #[derive(serde::Deserialize)]
    struct Issue {
        severity: Option<String>,
        code: Option<String>,
        diagnostics: Option<String>,
        details: Option<Details>,
    }
    #[derive(serde::Deserialize)]
    struct Details {
        text: Option<String>,
    }
    let outcome: Outcome = serde_json::from_slice(body).ok()?;
    if outcome.resource_type != "OperationOutcome" {
        return None;
    }
    let text = outcome
        .issue
        .iter()
        .map(|i| {
            let words = i
                .diagnostics
                .clone()
                .or_else(|| i.details.as_ref().and_then(|d| d.text.clone()))
                .unwrap_or_default();
            format!(
                "{} {}: {}",
                i.severity.as_deref().unwrap_or("error"),
                i.code.as_deref().unwrap_or("unknown"),
                words
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    Some(format!("OperationOutcome: {}", truncate(&text, 300)))
}

fn outcome_suffix(body: &[u8]) -> String {
    diagnostics(body).map_or_else(String::new, |d| format!(" ({d})"))
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_bounds() {
        for attempt in 1..=10 {
            let ceiling = (FIRST_BACKOFF * (1 << (attempt - 1))).min(MAX_BACKOFF);
            for _ in 0..50 {
                let d = backoff(attempt);
                assert!(d >= ceiling / 2 && d <= ceiling, "{attempt}: {d:?}");
            }
        }
    }

    #[test]
    fn operation_outcome_diagnostics_are_reported() {
        let body = br#"{"resourceType":"OperationOutcome","issue":[
            {"severity":"error","code":"invalid","diagnostics":"Unknown search parameter _foo"},
            {"severity":"warning","code":"processing","details":{"text":"slow query"}}]}"#;
        assert_eq!(
            diagnostics(body).unwrap(),
            "OperationOutcome: error invalid: Unknown search parameter _foo; warning processing: slow query"
        );
        assert_eq!(diagnostics(b"<html>oops</html>"), None);
        assert_eq!(diagnostics(br#"{"resourceType":"Patient"}"#), None);
        let long = format!(
            r#"{{"resourceType":"OperationOutcome","issue":[{{"diagnostics":"{}"}}]}}"#,
            "x".repeat(1000)
        );
        assert!(diagnostics(long.as_bytes()).unwrap().chars().count() < 340);
    }
}
