//! Token endpoint responses (RFC 6749 §5.1 success, §5.2 error) as vendors really send them:
//! Azure AD v1 sends `expires_in`/`expires_on` as JSON strings, IdentityServer puts the
//! authoritative expiry in the JWT's `exp` claim. Parsing is pure and never panics; an error
//! never quotes the body (it may hold tokens).

use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use secrecy::SecretString;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::Timestamp;

/// A successful token response, with its secrets wrapped from the moment they are parsed.
///
/// Lifetimes are kept as stated, sane or not: a response with an absurd `expires_in` may still
/// carry a rotated refresh token that must be kept, so [`access_expiry`] judges them, not the
/// parser.
pub struct TokenResponse {
    pub access_token: SecretString,
    pub token_type: Option<String>,
    /// Seconds, as stated (may be zero, negative or absurdly large).
    pub expires_in: Option<i64>,
    /// Azure AD v1: the expiry as Unix seconds.
    pub expires_on: Option<i64>,
    pub refresh_token: Option<SecretString>,
    /// Seconds, as stated.
    pub refresh_token_expires_in: Option<i64>,
    pub scope: Option<String>,
    pub id_token: Option<SecretString>,
    /// The first lifetime field whose value is not a finite number (`1e309`, `"soon"`, `{}`).
    pub unreadable_lifetime: Option<&'static str>,
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
            .field("unreadable_lifetime", &self.unreadable_lifetime)
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
struct RawSuccess<'a> {
    access_token: Option<String>,
    token_type: Option<String>,
    /// Lifetimes are read from their raw text: a number serde_json cannot hold (`1e309`) must
    /// not make the whole response unreadable, or its refresh token would be lost.
    #[serde(borrow)]
    expires_in: Option<&'a RawValue>,
    #[serde(borrow)]
    expires_on: Option<&'a RawValue>,
    refresh_token: Option<String>,
    #[serde(borrow)]
    refresh_token_expires_in: Option<&'a RawValue>,
    scope: Option<String>,
    id_token: Option<String>,
}

/// The longest access-token lifetime ehrsync believes: the vendors' are 20 minutes to 48 hours,
/// and a token that claims to live longer than a year would never be refreshed.
pub const MAX_ACCESS_LIFETIME: Duration = Duration::from_secs(366 * 86_400);
/// The longest refresh-token lifetime ehrsync believes (the vendors' are 14 to 30 days).
pub const MAX_REFRESH_LIFETIME: Duration = Duration::from_secs(10 * 366 * 86_400);

/// A lifetime field's value: a JSON number, or a string holding one (Azure AD v1 sends
/// `"expires_in": "3599"`), or null. `Err` when it is not a finite number.
fn read_lifetime(raw: Option<&RawValue>) -> Result<Option<i64>, ()> {
    let Some(raw) = raw else { return Ok(None) };
    let text = raw.get().trim();
    if text == "null" {
        return Ok(None);
    }
    let owned;
    let number = if text.starts_with('"') {
        owned = serde_json::from_str::<String>(text).map_err(|_| ())?;
        owned.trim()
    } else {
        text
    };
    if let Ok(n) = number.parse::<i64>() {
        return Ok(Some(n));
    }
    match number.parse::<f64>() {
        // Saturating: an absurd value stays absurd and is judged as such.
        Ok(f) if f.is_finite() => Ok(Some(f as i64)),
        _ => Err(()),
    }
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
    let raw: RawSuccess = serde_json::from_slice(body).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            return MalformedResponse::NotJson(body.len(), first_char_kind(body));
        }
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
    let mut unreadable_lifetime = None;
    let mut lifetime = |name: &'static str, raw: Option<&RawValue>| {
        read_lifetime(raw).unwrap_or_else(|()| {
            unreadable_lifetime.get_or_insert(name);
            None
        })
    };
    let expires_in = lifetime("expires_in", raw.expires_in);
    let expires_on = lifetime("expires_on", raw.expires_on);
    let refresh_token_expires_in =
        lifetime("refresh_token_expires_in", raw.refresh_token_expires_in);
    Ok(TokenResponse {
        access_token: SecretString::from(access_token),
        token_type: raw.token_type,
        expires_in,
        expires_on,
        refresh_token: raw
            .refresh_token
            .filter(|t| !t.is_empty())
            .map(SecretString::from),
        refresh_token_expires_in,
        scope: raw.scope,
        id_token: raw
            .id_token
            .filter(|t| !t.is_empty())
            .map(SecretString::from),
        unreadable_lifetime,
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
/// when the response states none.
///
/// A stated lifetime outside sane bounds is an error, never replaced by a default: `expires_in`
/// of zero or less, any expiry more than [`MAX_ACCESS_LIFETIME`] after issue, or a value that
/// is not a finite number. (An `expires_on` or `exp` at or before issue is clock skew between
/// the vendor and us, and is passed over for the other fields, as before.)
pub fn access_expiry(
    resp: &TokenResponse,
    access_token: &str,
    issued_at: Timestamp,
    default: Option<Duration>,
    fallback: Duration,
) -> Result<(Timestamp, ExpirySource), String> {
    if let Some(field) = resp.unreadable_lifetime {
        return Err(format!(
            "the token response's {field} is not a finite number of seconds"
        ));
    }
    let secs = |s: i64| Timestamp::from_unix_millis(s.saturating_mul(1000));
    let latest = issued_at + MAX_ACCESS_LIFETIME;
    let beyond = |field: &str, at: Timestamp| {
        format!(
            "the token response's {field} puts the access token's expiry at {at}, more than a year after it was issued; refusing to trust it"
        )
    };
    if let Some(s) = resp.expires_in {
        if s <= 0 {
            return Err(format!(
                "the token response's expires_in is {s}: the access token would be dead on arrival"
            ));
        }
        let at = issued_at + Duration::from_secs(s.unsigned_abs());
        if at > latest {
            return Err(beyond("expires_in", at));
        }
    }
    let jwt = jwt_exp(access_token).map(secs);
    let on = resp.expires_on.map(secs);
    for (field, at) in [("JWT exp claim", jwt), ("expires_on", on)] {
        if let Some(at) = at.filter(|at| *at > latest) {
            return Err(beyond(field, at));
        }
    }
    let candidates = [
        (jwt, ExpirySource::JwtExp),
        (on, ExpirySource::ExpiresOn),
        (
            resp.expires_in
                .map(|s| issued_at + Duration::from_secs(s.unsigned_abs())),
            ExpirySource::ExpiresIn,
        ),
        (default.map(|d| issued_at + d), ExpirySource::PresetDefault),
    ];
    Ok(candidates
        .into_iter()
        .filter_map(|(t, src)| t.filter(|t| *t > issued_at).map(|t| (t, src)))
        .min_by_key(|(t, _)| *t)
        .unwrap_or((issued_at + fallback, ExpirySource::Fallback)))
}

/// The refresh token's stated lifetime, if the response states one. An error when it is zero
/// or less, more than [`MAX_REFRESH_LIFETIME`], or not a number (the token is then kept, with
/// an unknown lifetime, by whoever reads this).
pub fn refresh_lifetime(resp: &TokenResponse) -> Result<Option<Duration>, String> {
    match resp.refresh_token_expires_in {
        None => Ok(None),
        Some(s) if s <= 0 => Err(format!(
            "the token response's refresh_token_expires_in is {s}: the refresh token would be dead on arrival"
        )),
        Some(s) if Duration::from_secs(s.unsigned_abs()) > MAX_REFRESH_LIFETIME => Err(format!(
            "the token response's refresh_token_expires_in is {s} seconds, more than ten years; refusing to trust it"
        )),
        Some(s) => Ok(Some(Duration::from_secs(s.unsigned_abs()))),
    }
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
        )
        .unwrap();
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
        )
        .unwrap();
        assert_eq!(
            (at, src),
            (issued + Duration::from_secs(1200), ExpirySource::ExpiresIn)
        );
        let r = parse_success(br#"{"access_token":"opaque"}"#).unwrap();
        let (at, src) =
            access_expiry(&r, "opaque", issued, None, Duration::from_secs(300)).unwrap();
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
            (br#"["secret-at"]"#, "not an object"),
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

#[cfg(test)]
mod lifetime_tests {
    use secrecy::ExposeSecret;

    use super::*;

    const ISSUED: Timestamp = Timestamp::from_unix_millis(1_800_000_000_000);

    fn expiry(body: &str) -> Result<(Timestamp, ExpirySource), String> {
        let r = parse_success(body.as_bytes()).expect("parses");
        access_expiry(&r, "opaque", ISSUED, None, Duration::from_secs(300))
    }

    #[test]
    fn absurd_lifetimes_are_errors_that_keep_the_refresh_token() {
        for (body, says) in [
            (
                r#"{"access_token":"a","refresh_token":"rt-kept","expires_in":1e309}"#,
                "expires_in is not a finite number",
            ),
            (
                r#"{"access_token":"a","refresh_token":"rt-kept","expires_in":"soon"}"#,
                "expires_in is not a finite number",
            ),
            (
                r#"{"access_token":"a","refresh_token":"rt-kept","expires_in":1000000000000000}"#,
                "more than a year",
            ),
            (
                r#"{"access_token":"a","refresh_token":"rt-kept","expires_in":1e300}"#,
                "more than a year",
            ),
            (
                r#"{"access_token":"a","refresh_token":"rt-kept","expires_in":0}"#,
                "expires_in is 0",
            ),
            (
                r#"{"access_token":"a","refresh_token":"rt-kept","expires_in":-5}"#,
                "expires_in is -5",
            ),
            (
                r#"{"access_token":"a","refresh_token":"rt-kept","expires_in":60,"expires_on":"99999999999"}"#,
                "expires_on puts",
            ),
        ] {
            // The body parses: its refresh token is there to be kept.
            let r = parse_success(body.as_bytes()).expect(body);
            assert_eq!(
                r.refresh_token
                    .as_ref()
                    .map(|t| t.expose_secret().to_owned()),
                Some("rt-kept".to_owned())
            );
            let e = expiry(body).expect_err(body);
            assert!(e.contains(says), "{body}: {e}");
            assert!(!e.contains("rt-kept"), "{e}");
        }
        // Sane ones still work, as numbers or strings.
        assert_eq!(
            expiry(r#"{"access_token":"a","expires_in":"3599"}"#).unwrap(),
            (ISSUED + Duration::from_secs(3599), ExpirySource::ExpiresIn)
        );
        assert_eq!(
            expiry(r#"{"access_token":"a","expires_in":1200.0}"#).unwrap(),
            (ISSUED + Duration::from_secs(1200), ExpirySource::ExpiresIn)
        );
        assert_eq!(
            expiry(r#"{"access_token":"a","expires_in":null}"#)
                .unwrap()
                .1,
            ExpirySource::Fallback
        );
    }

    #[test]
    fn refresh_lifetimes_are_bounded_too() {
        let life = |body: &str| refresh_lifetime(&parse_success(body.as_bytes()).unwrap());
        assert_eq!(
            life(r#"{"access_token":"a","refresh_token_expires_in":"86400"}"#),
            Ok(Some(Duration::from_secs(86_400)))
        );
        assert_eq!(life(r#"{"access_token":"a"}"#), Ok(None));
        assert!(life(r#"{"access_token":"a","refresh_token_expires_in":0}"#).is_err());
        assert!(life(r#"{"access_token":"a","refresh_token_expires_in":1e12}"#).is_err());
        let r = parse_success(br#"{"access_token":"a","refresh_token_expires_in":1e999}"#).unwrap();
        assert_eq!(r.unreadable_lifetime, Some("refresh_token_expires_in"));
    }
}
