//! Token endpoint responses (RFC 6749 §5.1 success, §5.2 error) as vendors really send them:
//! Azure AD v1 sends `expires_in`/`expires_on` as JSON strings, IdentityServer puts the
//! authoritative expiry in the JWT's `exp` claim. Parsing is pure and never panics; an error
//! never quotes the body (it may hold tokens).

use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use secrecy::SecretString;
use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use super::Timestamp;

/// A successful token response, with its secrets wrapped from the moment they are parsed.
pub struct TokenResponse {
    pub access_token: SecretString,
    pub token_type: Option<String>,
    pub expires_in: Option<u64>,
    /// Azure AD v1: the expiry as Unix seconds.
    pub expires_on: Option<i64>,
    pub refresh_token: Option<SecretString>,
    pub refresh_token_expires_in: Option<u64>,
    pub scope: Option<String>,
    pub id_token: Option<SecretString>,
}

impl fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenResponse")
            .field("access_token", &"[redacted]")
            .field("token_type", &self.token_type)
            .field("expires_in", &self.expires_in)
            .field("expires_on", &self.expires_on)
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "[redacted]"),
            )
            .field("refresh_token_expires_in", &self.refresh_token_expires_in)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// An RFC 6749 §5.2 error body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthError {
    pub error: String,
    /// Trimmed to one line of at most [`MAX_DESCRIPTION`] characters: it is logged.
    pub description: Option<String>,
}

/// Longest `error_description` kept (Azure's run to several hundred characters with trace ids).
pub const MAX_DESCRIPTION: usize = 300;

/// Why a success body could not be used. Messages describe the body, never quote it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MalformedResponse {
    #[error("the token response is not JSON ({0} bytes, starting {1})")]
    NotJson(usize, &'static str),
    #[error("the token response is JSON but not an object of the fields RFC 6749 §5.1 names: {0}")]
    BadShape(String),
    #[error("the token response has no access_token")]
    NoAccessToken,
    #[error("the token response's token_type is `{0}`, not Bearer")]
    NotBearer(String),
}

#[derive(Deserialize)]
struct RawSuccess {
    access_token: Option<String>,
    token_type: Option<String>,
    #[serde(default, deserialize_with = "lenient_u64")]
    expires_in: Option<u64>,
    #[serde(default, deserialize_with = "lenient_i64")]
    expires_on: Option<i64>,
    refresh_token: Option<String>,
    #[serde(default, deserialize_with = "lenient_u64")]
    refresh_token_expires_in: Option<u64>,
    scope: Option<String>,
    id_token: Option<String>,
}

#[derive(Deserialize)]
struct RawError {
    error: String,
    error_description: Option<String>,
}

fn first_char_kind(body: &[u8]) -> &'static str {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        None => "with nothing",
        Some(b'<') => "like HTML or XML",
        Some(b'{' | b'[') => "like truncated JSON",
        Some(_) => "with text",
    }
}

/// Parses a 2xx token response body.
pub fn parse_success(body: &[u8]) -> Result<TokenResponse, MalformedResponse> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|_| MalformedResponse::NotJson(body.len(), first_char_kind(body)))?;
    let raw: RawSuccess = serde_json::from_value(value).map_err(|e| {
        // serde_json's message names the field and the expected type; values it may quote are
        // our own field shapes, but be strict: keep only the part before any quoted value.
        let text = e.to_string();
        let cut = text.find(['"', '`']).map_or(text.as_str(), |i| &text[..i]);
        MalformedResponse::BadShape(cut.trim().to_owned())
    })?;
    let access_token = raw
        .access_token
        .filter(|t| !t.is_empty())
        .ok_or(MalformedResponse::NoAccessToken)?;
    if let Some(tt) = &raw.token_type
        && !tt.eq_ignore_ascii_case("bearer")
    {
        return Err(MalformedResponse::NotBearer(tt.chars().take(20).collect()));
    }
    Ok(TokenResponse {
        access_token: SecretString::from(access_token),
        token_type: raw.token_type,
        expires_in: raw.expires_in,
        expires_on: raw.expires_on,
        refresh_token: raw
            .refresh_token
            .filter(|t| !t.is_empty())
            .map(SecretString::from),
        refresh_token_expires_in: raw.refresh_token_expires_in,
        scope: raw.scope,
        id_token: raw
            .id_token
            .filter(|t| !t.is_empty())
            .map(SecretString::from),
    })
}

/// Parses an error body; `None` when it is not an RFC 6749 error object.
pub fn parse_error(body: &[u8]) -> Option<OAuthError> {
    let raw: RawError = serde_json::from_slice(body).ok()?;
    let valid_code = !raw.error.is_empty()
        && raw.error.len() <= 100
        && raw
            .error
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\');
    if !valid_code {
        return None;
    }
    let description = raw.error_description.map(|d| {
        let one_line: String = d
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let mut s: String = one_line.trim().chars().take(MAX_DESCRIPTION).collect();
        if one_line.trim().chars().count() > MAX_DESCRIPTION {
            s.push('…');
        }
        s
    });
    Some(OAuthError {
        error: raw.error,
        description,
    })
}

/// The `exp` claim of a JWT access token (decoded, not verified: only its expiry is used).
/// `None` for opaque tokens, encrypted (5-part) JWTs or payloads without a numeric `exp`.
pub fn jwt_exp(token: &str) -> Option<i64> {
    let mut parts = token.split('.');
    let (_header, payload, _sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?;
    exp.as_i64()
        .or_else(|| exp.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
}

/// Where an access token's expiry came from, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpirySource {
    JwtExp,
    ExpiresOn,
    ExpiresIn,
    PresetDefault,
    Fallback,
}

/// The access token's expiry: the earliest credible (later than `issued_at`) of JWT `exp`,
/// `expires_on`, `issued_at + expires_in` and `issued_at + default`; `issued_at + fallback`
/// when none is credible.
pub fn access_expiry(
    resp: &TokenResponse,
    access_token: &str,
    issued_at: Timestamp,
    default: Option<Duration>,
    fallback: Duration,
) -> (Timestamp, ExpirySource) {
    let secs = |s: i64| Timestamp::from_unix_millis(s.saturating_mul(1000));
    let candidates = [
        (jwt_exp(access_token).map(secs), ExpirySource::JwtExp),
        (resp.expires_on.map(secs), ExpirySource::ExpiresOn),
        (
            resp.expires_in
                .filter(|s| *s > 0)
                .map(|s| issued_at + Duration::from_secs(s)),
            ExpirySource::ExpiresIn,
        ),
        (default.map(|d| issued_at + d), ExpirySource::PresetDefault),
    ];
    candidates
        .into_iter()
        .filter_map(|(t, src)| t.filter(|t| *t > issued_at).map(|t| (t, src)))
        .min_by_key(|(t, _)| *t)
        .unwrap_or((issued_at + fallback, ExpirySource::Fallback))
}

fn lenient_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    lenient_i64(d).and_then(|v| match v {
        None => Ok(None),
        Some(n) => u64::try_from(n)
            .map(Some)
            .map_err(|_| de::Error::custom("a negative lifetime")),
    })
}

/// A number, or a numeric string (Azure AD v1 sends `"expires_in": "3599"`), or null.
fn lenient_i64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = Option<i64>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a number of seconds, as a number or a numeric string")
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            i64::try_from(v)
                .map(Some)
                .map_err(|_| E::custom("a number too large"))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            if v.is_finite() && v.abs() < 1e15 {
                Ok(Some(v as i64))
            } else {
                Err(E::custom("a number out of range"))
            }
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            let v = v.trim();
            v.parse::<i64>()
                .or_else(|_| {
                    v.parse::<f64>()
                        .ok()
                        .filter(|f| f.is_finite() && f.abs() < 1e15)
                        .map(|f| f as i64)
                        .ok_or(())
                })
                .map(Some)
                .map_err(|_| E::custom("a string that is not a number"))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(V)
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    fn jwt(claims: &str) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!(
            "{}.{}.sig",
            b64(r#"{"alg":"RS256","typ":"JWT"}"#),
            b64(claims)
        )
    }

    #[test]
    fn azure_ad_v1_sends_strings() {
        // The shape of seeds/000 and seeds/001's response tables, as Azure AD v1 serializes it.
        let body = br#"{"token_type":"Bearer","scope":"user_impersonation","expires_in":"3599",
            "ext_expires_in":"3599","expires_on":"1800003599","not_before":"1800000000",
            "resource":"https://select.nextech-api.com/api","access_token":"at-1","refresh_token":"rt-1"}"#;
        let r = parse_success(body).unwrap();
        assert_eq!(r.expires_in, Some(3599));
        assert_eq!(r.expires_on, Some(1_800_003_599));
        assert_eq!(r.access_token.expose_secret(), "at-1");
        assert_eq!(r.refresh_token.as_ref().unwrap().expose_secret(), "rt-1");
    }

    #[test]
    fn carecentric_expiry_comes_from_the_jwt() {
        // seeds/003: "the JWT exp claim is authoritative".
        let issued = Timestamp::from_unix_millis(1_800_000_000_000);
        let token = jwt(r#"{"exp":1800172000,"sub":"x"}"#);
        let body =
            format!(r#"{{"access_token":"{token}","expires_in":172800,"token_type":"Bearer"}}"#);
        let r = parse_success(body.as_bytes()).unwrap();
        let (at, src) = access_expiry(
            &r,
            &token,
            issued,
            Some(Duration::from_secs(172_800)),
            Duration::from_secs(300),
        );
        assert_eq!(src, ExpirySource::JwtExp);
        assert_eq!(at, Timestamp::from_unix_millis(1_800_172_000_000));
    }

    #[test]
    fn the_earliest_credible_expiry_wins() {
        let issued = Timestamp::from_unix_millis(1_800_000_000_000);
        let r = parse_success(
            br#"{"access_token":"opaque","expires_in":1200,"expires_on":1700000000}"#,
        )
        .unwrap();
        // expires_on is in the past relative to issue: not credible; 1200 s beats the 1 h default.
        let (at, src) = access_expiry(
            &r,
            "opaque",
            issued,
            Some(Duration::from_secs(3600)),
            Duration::from_secs(300),
        );
        assert_eq!(
            (at, src),
            (issued + Duration::from_secs(1200), ExpirySource::ExpiresIn)
        );
        let r = parse_success(br#"{"access_token":"opaque"}"#).unwrap();
        let (at, src) = access_expiry(&r, "opaque", issued, None, Duration::from_secs(300));
        assert_eq!(
            (at, src),
            (issued + Duration::from_secs(300), ExpirySource::Fallback)
        );
    }

    #[test]
    fn malformed_bodies_are_clear_errors_that_quote_nothing() {
        let cases: [(&[u8], &str); 5] = [
            (b"<html>secret-page</html>", "like HTML"),
            (b"", "0 bytes"),
            (br#"{"token_type":"Bearer"}"#, "no access_token"),
            (
                br#"{"access_token":"secret-at","expires_in":"soon"}"#,
                "not an object",
            ),
            (
                br#"{"access_token":"secret-at","token_type":"MAC"}"#,
                "not Bearer",
            ),
        ];
        for (body, expect) in cases {
            let e = parse_success(body).unwrap_err().to_string();
            assert!(e.contains(expect), "{e}");
            assert!(!e.contains("secret"), "{e}");
        }
    }

    #[test]
    fn error_bodies_are_parsed_and_tamed() {
        let e = parse_error(br#"{"error":"invalid_grant","error_description":"AADSTS50126: Error validating credentials.\r\nTrace ID: 1"}"#).unwrap();
        assert_eq!(e.error, "invalid_grant");
        assert_eq!(
            e.description.as_deref(),
            Some("AADSTS50126: Error validating credentials.  Trace ID: 1")
        );
        assert!(parse_error(b"<html>").is_none());
        assert!(parse_error(br#"{"error":""}"#).is_none());
        let long = format!(
            r#"{{"error":"x","error_description":"{}"}}"#,
            "a".repeat(1000)
        );
        assert_eq!(
            parse_error(long.as_bytes())
                .unwrap()
                .description
                .unwrap()
                .chars()
                .count(),
            MAX_DESCRIPTION + 1
        );
    }

    #[test]
    fn jwt_exp_handles_odd_tokens() {
        assert_eq!(jwt_exp(&jwt(r#"{"exp":123}"#)), Some(123));
        assert_eq!(jwt_exp(&jwt(r#"{"exp":123.9}"#)), Some(123));
        assert_eq!(jwt_exp(&jwt(r#"{"exp":"123"}"#)), None);
        assert_eq!(jwt_exp("opaque-token"), None);
        assert_eq!(jwt_exp("a.b.c.d.e"), None);
        assert_eq!(jwt_exp("a.!!!.c"), None);
        assert_eq!(jwt_exp(""), None);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut rng = fastrand::Rng::with_seed(7);
        let seeds: [&[u8]; 3] = [
            br#"{"access_token":"a","expires_in":"3599"}"#,
            br#"{"error":"invalid_grant"}"#,
            b"x.y.z",
        ];
        for _ in 0..20_000 {
            let mut body = seeds[rng.usize(..seeds.len())].to_vec();
            for _ in 0..rng.usize(0..4) {
                if body.is_empty() {
                    break;
                }
                let i = rng.usize(..body.len());
                body[i] = rng.u8(..);
            }
            let _ = parse_success(&body);
            let _ = parse_error(&body);
            let _ = jwt_exp(&String::from_utf8_lossy(&body));
        }
    }
}
