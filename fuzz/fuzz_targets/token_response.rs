//! Token endpoint bodies: `parse_success`, `parse_error`, `jwt_exp` and `access_expiry`.
//!
//! Besides "never panics" it checks what `src/token/response.rs` promises: an error (and the
//! `Debug` of a parsed response) never shows a token from the body, an `OAuthError` is one
//! tame line, and the chosen expiry is credible (after `issued_at`, never later than a given
//! default).

#![no_main]

use std::time::Duration;

use ehrsync::token::Timestamp;
use ehrsync::token::response::{
    ExpirySource, MAX_ACCESS_LIFETIME, MAX_DESCRIPTION, MalformedResponse, TokenResponse,
    access_expiry, jwt_exp, parse_error, parse_success, refresh_lifetime,
};
use libfuzzer_sys::fuzz_target;
use secrecy::ExposeSecret;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// The fields whose values are secrets.
const SECRET_FIELDS: [&str; 3] = ["access_token", "refresh_token", "id_token"];

fuzz_target!(|data: &[u8]| {
    let parsed = parse_success(data);
    let shown = render(&parsed);
    assert_no_secret_shown(data, &shown);
    if let Ok(resp) = &parsed {
        check_success(resp);
    }

    if let Some(e) = parse_error(data) {
        assert!(!e.error.is_empty() && e.error.len() <= 100, "{e:?}");
        assert!(
            e.error
                .bytes()
                .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\'),
            "{e:?}"
        );
        if let Some(d) = &e.description {
            let n = d.chars().count();
            assert!(n <= MAX_DESCRIPTION + 1, "{n} characters");
            assert!(n <= MAX_DESCRIPTION || d.ends_with('…'), "{d:?}");
            assert!(!d.chars().any(char::is_control), "{d:?}");
        }
    }

    // The whole input as a token, too (`x.y.z` shapes come from the corpus).
    let _ = jwt_exp(&String::from_utf8_lossy(data));
});

/// Everything the caller could print about a parse: `Debug` of either outcome, `Display` of
/// an error.
fn render(parsed: &Result<TokenResponse, MalformedResponse>) -> String {
    match parsed {
        Ok(resp) => format!("{resp:?} {resp:#?}"),
        Err(e) => format!("{e} {e:?}"),
    }
}

/// Fails when a secret field's value shows in `shown` *because* it is the secret: the same
/// body with that value disguised (same length, every character different) must show it too,
/// or the text came from the secret and not from elsewhere (a `token_type` quoted in an error,
/// a `scope`, the message's own words).
///
/// The disguise is spliced into the body's own bytes, at every place the field occurs: a body
/// rebuilt from a parsed `Value` would lose a duplicate field (the parser keeps the last) and
/// with it the very error being checked.
fn assert_no_secret_shown(data: &[u8], shown: &str) {
    let Ok(Entries(entries)) = serde_json::from_slice::<Entries>(data) else {
        // Not a JSON object: `parse_success` fails before it reads any field.
        return;
    };
    for field in SECRET_FIELDS {
        // Where each occurrence of the field's string value sits in `data`, and its text.
        let spots: Vec<(std::ops::Range<usize>, String)> = entries
            .iter()
            .filter(|(key, _)| key == field)
            .filter_map(|(_, raw)| {
                let value = serde_json::from_str::<String>(raw.get()).ok()?;
                let start = raw.get().as_ptr() as usize - data.as_ptr() as usize;
                Some((start..start + raw.get().len(), value))
            })
            .collect();
        for (_, secret) in &spots {
            if secret.is_empty() || !shown.contains(secret.as_str()) {
                continue;
            }
            let mut other = data.to_vec();
            // Back to front, so that earlier ranges stay where they are.
            for (range, value) in spots.iter().rev() {
                let literal = serde_json::to_string(&disguise(value)).expect("a string serializes");
                other.splice(range.clone(), literal.into_bytes());
            }
            let shown_other = render(&parse_success(&other));
            assert!(
                shown_other.contains(secret.as_str()),
                "the {field} value is shown: {shown}"
            );
        }
    }
}

/// A JSON object's members in order, duplicates kept, each value as the slice of the input it
/// was read from.
struct Entries<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for Entries<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> Visitor<'de> for Members {
            type Value = Entries<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry::<String, &'de RawValue>()? {
                    members.push(member);
                }
                Ok(Entries(members))
            }
        }
        deserializer.deserialize_map(Members)
    }
}

fn disguise(s: &str) -> String {
    s.chars()
        .map(|c| if c == 'Z' { 'Y' } else { 'Z' })
        .collect()
}

fn check_success(resp: &TokenResponse) {
    let access = resp.access_token.expose_secret();
    assert!(!access.is_empty());
    if let Some(t) = &resp.token_type {
        assert!(t.eq_ignore_ascii_case("bearer"), "{t:?}");
    }
    assert!(
        resp.refresh_token
            .as_ref()
            .is_none_or(|t| !t.expose_secret().is_empty())
    );
    assert!(
        resp.id_token
            .as_ref()
            .is_none_or(|t| !t.expose_secret().is_empty())
    );

    let issued = Timestamp::from_unix_millis(1_800_000_000_000);
    let fallback = Duration::from_secs(300);
    let secs = |s: i64| Timestamp::from_unix_millis(s.saturating_mul(1000));
    for default in [None, Some(Duration::from_secs(3600))] {
        let (at, source) = match access_expiry(resp, access, issued, default, fallback) {
            Ok(chosen) => chosen,
            Err(reason) => {
                // A stated lifetime out of bounds: a reason naming the field.
                assert!(reason.starts_with("the token response's"), "{reason}");
                continue;
            }
        };
        // Only a credible expiry (after issue), never more than a year on, the earliest one.
        assert!(at > issued, "{at:?} from {source:?}");
        assert!(at <= issued + MAX_ACCESS_LIFETIME, "{at:?} from {source:?}");
        if let Some(d) = default {
            assert!(at <= issued + d, "{at:?} from {source:?}");
        }
        let expected = match source {
            ExpirySource::JwtExp => jwt_exp(access).map(secs),
            ExpirySource::ExpiresOn => resp.expires_on.map(secs),
            ExpirySource::ExpiresIn => resp
                .expires_in
                .map(|s| issued + Duration::from_secs(s.unsigned_abs())),
            ExpirySource::PresetDefault => default.map(|d| issued + d),
            ExpirySource::Fallback => Some(issued + fallback),
        };
        assert_eq!(Some(at), expected, "{source:?}");
        // Log lines print it.
        let _ = at.to_string();
    }
    if let Err(reason) = refresh_lifetime(resp) {
        assert!(reason.starts_with("the token response's"), "{reason}");
    }
    for token in [&resp.refresh_token, &resp.id_token].into_iter().flatten() {
        let _ = jwt_exp(token.expose_secret());
    }
}
