//! OpenID Connect: provider metadata from discovery (cached in memory and in the database,
//! fetched again daily or when an endpoint seems to have moved) and ID-token validation
//! ([`id_token`]).
//!
//! Explicit endpoints in an account's config always win over what discovery says; discovery
//! only fills the gaps (see `token::client::TokenTarget` and `login`).

pub mod id_token;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use crate::clock::SharedClock;
use crate::http::{BodyError, TransportError, read_limited};
use crate::store::Store;
use crate::token::Timestamp;

/// A discovery document younger than this is used without asking the provider again.
pub const MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// A forced re-fetch (an endpoint failed) happens at most this often per issuer.
const REFETCH_INTERVAL: Duration = Duration::from_secs(60);
/// Discovery documents are a few kilobytes; anything much larger is not one.
const MAX_DOCUMENT: usize = 256 * 1024;

/// What ehrsync uses of an OpenID provider's discovery document (OpenID Connect Discovery 1.0
/// §3, RFC 8414 §2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderMetadata {
    /// The issuer the document names (equal to the configured one, trailing `/` aside).
    pub issuer: String,
    pub authorization_endpoint: Option<Url>,
    pub token_endpoint: Url,
    /// RFC 8628 §4.
    pub device_authorization_endpoint: Option<Url>,
    pub jwks_uri: Option<Url>,
    /// `token_endpoint_auth_methods_supported`; empty when not stated (then
    /// `client_secret_basic` is the default, RFC 8414 §2).
    pub token_endpoint_auth_methods: Vec<String>,
    /// `code_challenge_methods_supported`; `None` when not stated (RFC 8414 §2: the server
    /// then does not support PKCE).
    pub code_challenge_methods: Option<Vec<String>>,
}

impl ProviderMetadata {
    /// Reads a discovery document fetched for `issuer`. The messages describe the document;
    /// it holds no secrets, but it is still not quoted whole.
    pub fn parse(issuer: &Url, body: &[u8]) -> Result<ProviderMetadata, String> {
        #[derive(Deserialize)]
        struct Raw {
            issuer: Option<String>,
            authorization_endpoint: Option<String>,
            token_endpoint: Option<String>,
            device_authorization_endpoint: Option<String>,
            jwks_uri: Option<String>,
            #[serde(default)]
            token_endpoint_auth_methods_supported: Vec<String>,
            code_challenge_methods_supported: Option<Vec<String>>,
        }
        let raw: Raw = serde_json::from_slice(body).map_err(|e| {
            format!(
                "the document is not the JSON object discovery describes (line {}, column {})",
                e.line(),
                e.column()
            )
        })?;
        let stated = raw
            .issuer
            .ok_or_else(|| "the document names no issuer".to_owned())?;
        // Discovery §4.3: the issuer in the document must be the one discovery was made for,
        // or an attacker's document could name someone else's endpoints.
        if stated.trim_end_matches('/') != issuer.as_str().trim_end_matches('/') {
            return Err(format!(
                "the document is for issuer `{stated}`, not `{issuer}` (OpenID Discovery §4.3); \
                 set `issuer` to exactly what the provider calls itself"
            ));
        }
        let url = |key: &str, value: Option<String>| -> Result<Option<Url>, String> {
            value
                .map(|v| Url::parse(&v).map_err(|e| format!("{key} `{v}` is not a URL ({e})")))
                .transpose()
        };
        Ok(ProviderMetadata {
            issuer: stated,
            authorization_endpoint: url("authorization_endpoint", raw.authorization_endpoint)?,
            token_endpoint: url("token_endpoint", raw.token_endpoint)?
                .ok_or_else(|| "the document names no token_endpoint".to_owned())?,
            device_authorization_endpoint: url(
                "device_authorization_endpoint",
                raw.device_authorization_endpoint,
            )?,
            jwks_uri: url("jwks_uri", raw.jwks_uri)?,
            token_endpoint_auth_methods: raw.token_endpoint_auth_methods_supported,
            code_challenge_methods: raw.code_challenge_methods_supported,
        })
    }

    /// Whether the provider states that it supports PKCE with S256.
    pub fn supports_s256(&self) -> bool {
        self.code_challenge_methods
            .as_ref()
            .is_some_and(|m| m.iter().any(|m| m == "S256"))
    }
}

/// Discovery could not produce metadata.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("OpenID discovery at {url}: {why}")]
pub struct DiscoveryError {
    pub url: String,
    pub why: String,
}

/// Fetches and reads `issuer`'s discovery document; returns it with its text (for the cache).
pub async fn fetch(
    http: &reqwest::Client,
    issuer: &Url,
) -> Result<(ProviderMetadata, String), DiscoveryError> {
    let url = crate::config::discovery_url(issuer);
    let fail = |why: String| DiscoveryError {
        url: url.clone(),
        why,
    };
    let (status, body) = get_json(http, &url).await.map_err(fail)?;
    if !(200..300).contains(&status) {
        return Err(fail(format!("HTTP {status}")));
    }
    let metadata = ProviderMetadata::parse(issuer, &body).map_err(fail)?;
    let text = String::from_utf8(body).map_err(|_| fail("the document is not UTF-8".into()))?;
    Ok((metadata, text))
}

/// GETs a small JSON document (discovery, JWKS): status and body, at most [`MAX_DOCUMENT`].
pub(crate) async fn get_json(http: &reqwest::Client, url: &str) -> Result<(u16, Vec<u8>), String> {
    let parsed = Url::parse(url).map_err(|e| format!("`{url}` is not a URL ({e})"))?;
    let response = http
        .get(parsed.clone())
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| TransportError::new(e, &parsed).without_url())?;
    let status = response.status().as_u16();
    let body = read_limited(response, MAX_DOCUMENT)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge { .. } => e.to_string(),
            BodyError::Read(e) => e.without_url(),
        })?;
    Ok((status, body))
}

struct Entry {
    metadata: Arc<ProviderMetadata>,
    fetched_at: Timestamp,
    /// The last time a fetch was tried (successful or not), to pace forced re-fetches.
    tried_at: Timestamp,
}

/// Provider metadata per issuer, shared by every account of a process: fetched once, kept in
/// the database, fetched again when older than [`MAX_AGE`] or when asked to ([`Self::refetch`]).
/// When the provider cannot be reached, a stale copy is used (with a warning) rather than none.
pub struct Discovery {
    http: reqwest::Client,
    store: Option<Store>,
    clock: SharedClock,
    /// One fetch at a time: a thousand accounts of one provider cause one request.
    entries: tokio::sync::Mutex<HashMap<String, Entry>>,
}

impl Discovery {
    pub fn new(http: reqwest::Client, store: Option<Store>, clock: SharedClock) -> Discovery {
        Discovery {
            http,
            store,
            clock,
            entries: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// `issuer`'s metadata: the cached copy while it is younger than [`MAX_AGE`], else fetched.
    pub async fn get(&self, issuer: &Url) -> Result<Arc<ProviderMetadata>, DiscoveryError> {
        self.lookup(issuer, false).await
    }

    /// `issuer`'s metadata fetched again (an endpoint it names failed, so it may have moved),
    /// unless it was fetched in the last minute.
    pub async fn refetch(&self, issuer: &Url) -> Result<Arc<ProviderMetadata>, DiscoveryError> {
        self.lookup(issuer, true).await
    }

    async fn lookup(
        &self,
        issuer: &Url,
        force: bool,
    ) -> Result<Arc<ProviderMetadata>, DiscoveryError> {
        let key = issuer.as_str().to_owned();
        let mut entries = self.entries.lock().await;
        let now = self.clock.now();
        if !entries.contains_key(&key)
            && let Some(entry) = self.load(issuer).await
        {
            entries.insert(key.clone(), entry);
        }
        if let Some(entry) = entries.get(&key) {
            let fresh = now.since(entry.fetched_at) < MAX_AGE;
            let paced = now.since(entry.tried_at) < REFETCH_INTERVAL;
            if (fresh && !force) || (force && paced) {
                return Ok(entry.metadata.clone());
            }
        }
        match fetch(&self.http, issuer).await {
            Ok((metadata, text)) => {
                let metadata = Arc::new(metadata);
                if let Some(old) = entries.get(&key)
                    && *old.metadata != *metadata
                {
                    tracing::info!(issuer = %issuer, token_endpoint = %metadata.token_endpoint, "the provider's OpenID configuration changed; using the new one");
                }
                self.save(issuer, &text, now).await;
                entries.insert(
                    key,
                    Entry {
                        metadata: metadata.clone(),
                        fetched_at: now,
                        tried_at: now,
                    },
                );
                Ok(metadata)
            }
            Err(e) => match entries.get_mut(&key) {
                Some(stale) => {
                    stale.tried_at = now;
                    tracing::warn!(issuer = %issuer, error = %e, fetched = %stale.fetched_at, "cannot fetch the provider's OpenID configuration; using the copy fetched earlier");
                    Ok(stale.metadata.clone())
                }
                None => Err(e),
            },
        }
    }

    async fn load(&self, issuer: &Url) -> Option<Entry> {
        let store = self.store.as_ref()?;
        let (text, fetched) = match store.load_provider(issuer.as_str()).await {
            Ok(row) => row?,
            Err(e) => {
                tracing::warn!(issuer = %issuer, error = %e, "cannot read the cached OpenID configuration");
                return None;
            }
        };
        // A cached document that no longer reads (an older build's, a changed issuer) is
        // simply fetched again.
        let metadata = ProviderMetadata::parse(issuer, text.as_bytes()).ok()?;
        let fetched_at = Timestamp::from_unix_millis(fetched.saturating_mul(1000));
        Some(Entry {
            metadata: Arc::new(metadata),
            fetched_at,
            tried_at: fetched_at,
        })
    }

    async fn save(&self, issuer: &Url, text: &str, now: Timestamp) {
        if let Some(store) = &self.store
            && let Err(e) = store
                .save_provider(issuer.as_str(), text, now.unix_seconds())
                .await
        {
            tracing::warn!(issuer = %issuer, error = %e, "cannot cache the OpenID configuration");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer() -> Url {
        Url::parse("https://id.example.com/tenant").unwrap()
    }

    #[test]
    fn reads_what_ehrsync_uses_and_checks_the_issuer() {
        let doc = br#"{"issuer":"https://id.example.com/tenant/","token_endpoint":"https://id.example.com/t",
            "authorization_endpoint":"https://id.example.com/a","jwks_uri":"https://id.example.com/k",
            "code_challenge_methods_supported":["plain","S256"],"extra":{"ignored":true}}"#;
        let m = ProviderMetadata::parse(&issuer(), doc).unwrap();
        assert_eq!(m.token_endpoint.as_str(), "https://id.example.com/t");
        assert!(m.supports_s256());
        assert!(m.token_endpoint_auth_methods.is_empty());

        let other = br#"{"issuer":"https://evil.example.com","token_endpoint":"https://evil.example.com/t"}"#;
        let e = ProviderMetadata::parse(&issuer(), other).unwrap_err();
        assert!(e.contains("not `https://id.example.com/tenant`"), "{e}");

        let no_pkce = br#"{"issuer":"https://id.example.com/tenant","token_endpoint":"https://id.example.com/t"}"#;
        assert!(
            !ProviderMetadata::parse(&issuer(), no_pkce)
                .unwrap()
                .supports_s256()
        );
        let plain_only = br#"{"issuer":"https://id.example.com/tenant","token_endpoint":"https://id.example.com/t","code_challenge_methods_supported":["plain"]}"#;
        assert!(
            !ProviderMetadata::parse(&issuer(), plain_only)
                .unwrap()
                .supports_s256()
        );
        for bad in [
            &b"<html>"[..],
            br#"{"issuer":"https://id.example.com/tenant"}"#,
            br#"{"issuer":"https://id.example.com/tenant","token_endpoint":"not a url"}"#,
            br#"{"issuer":"https://id.example.com/tenant","token_endpoint":7}"#,
        ] {
            assert!(ProviderMetadata::parse(&issuer(), bad).is_err());
        }
    }
}
