//! ID-token validation (OpenID Connect Core 1.0 §3.1.3.7) with `jsonwebtoken`: the signature
//! by one of the provider's published keys (JWKS), then `iss`, `aud` (and `azp`), `exp` and
//! `nonce`. Only asymmetric algorithms are accepted: a token signed `none` or with a shared
//! secret (HS256) proves nothing about the provider.
//!
//! `exp` is checked here, against ehrsync's clock, from claims deserialized into exact types:
//! a claim of the wrong JSON type (`"exp": "never"`) fails to read instead of being skipped.

use jsonwebtoken::jwk::{Jwk, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::token::Timestamp;

/// Clock skew tolerated on `exp`, as most OpenID libraries do.
pub const LEEWAY_SECS: i64 = 60;

/// The signature algorithms accepted: the provider's private keys, never a shared secret.
const ACCEPTED: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// What the ID token must say.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    /// The issuer exactly as the provider's discovery document names it.
    pub issuer: &'a str,
    pub client_id: &'a str,
    /// The nonce sent with the authorization request; `None` where none was sent (a refresh,
    /// the device flow).
    pub nonce: Option<&'a str>,
}

/// The claims ehrsync reads from a validated ID token (nothing here is secret, but `sub` is an
/// identifier of a person: it is shown to the person logging in, never logged).
#[derive(Debug, Clone, PartialEq)]
pub struct IdClaims {
    pub subject: String,
    pub expires_at: Timestamp,
}

/// Why an ID token was refused. Messages never quote the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdTokenError {
    #[error("the ID token is not a signed JWT ({0})")]
    Malformed(String),
    #[error(
        "the ID token is signed with `{0}`; ehrsync accepts only the provider's own keys (RS*, PS*, ES256/384, EdDSA)"
    )]
    Algorithm(String),
    #[error(
        "no key in the provider's JWKS matches the ID token (kid {0}); the provider may have rotated its keys"
    )]
    NoKey(String),
    #[error("the ID token's signature does not verify with the provider's keys")]
    BadSignature,
    #[error("the ID token was issued by someone else (iss is not `{0}`)")]
    Issuer(String),
    #[error("the ID token is not for this client (aud does not hold `{0}`)")]
    Audience(String),
    #[error("the ID token names several audiences but its azp is not this client")]
    AuthorizedParty,
    #[error("the ID token expired at {0}")]
    Expired(Timestamp),
    #[error("the ID token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the ID token's nonce does not match this login's (a replayed or injected token)")]
    Nonce,
    #[error("the ID token's claims are incomplete or of the wrong type: {0}")]
    Claims(String),
}

/// Reads a JWKS document (RFC 7517 §5).
pub fn parse_jwks(body: &[u8]) -> Result<JwkSet, String> {
    serde_json::from_slice(body).map_err(|e| {
        format!(
            "the provider's JWKS is not a JSON Web Key Set (line {}, column {})",
            e.line(),
            e.column()
        )
    })
}

/// Fetches the provider's signing keys from `jwks_uri`.
pub async fn fetch_jwks(http: &reqwest::Client, url: &url::Url) -> Result<JwkSet, String> {
    let (status, body) = super::get_json(http, url.as_str())
        .await
        .map_err(|e| format!("cannot fetch the provider's keys from {url}: {e}"))?;
    if !(200..300).contains(&status) {
        return Err(format!(
            "cannot fetch the provider's keys from {url}: HTTP {status}"
        ));
    }
    parse_jwks(&body)
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    // Tried in order: a list first, since `IgnoredAny` would take a list too.
    Many(Vec<String>),
    /// jsonwebtoken has checked the value; only the shape matters here.
    One(serde::de::IgnoredAny),
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    /// NumericDate: seconds, possibly with a fraction (RFC 7519 §2).
    exp: f64,
    nonce: Option<String>,
    azp: Option<String>,
    aud: Audience,
}

/// Validates `token` against `keys` and `expected` at `now`.
pub fn verify(
    token: &SecretString,
    keys: &JwkSet,
    expected: &Expected<'_>,
    now: Timestamp,
) -> Result<IdClaims, IdTokenError> {
    let token = token.expose_secret();
    let header =
        jsonwebtoken::decode_header(token).map_err(|e| IdTokenError::Malformed(e.to_string()))?;
    if !ACCEPTED.contains(&header.alg) {
        return Err(IdTokenError::Algorithm(format!("{:?}", header.alg)));
    }
    let candidates: Vec<&Jwk> = keys
        .keys
        .iter()
        .filter(|k| header.kid.is_none() || k.common.key_id == header.kid)
        .filter(|k| {
            !matches!(
                k.common.public_key_use,
                Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
            )
        })
        .filter(|k| {
            k.common
                .key_algorithm
                .is_none_or(|a| key_alg_matches(a, header.alg))
        })
        .collect();
    if candidates.is_empty() {
        return Err(IdTokenError::NoKey(
            header.kid.clone().unwrap_or_else(|| "none".to_owned()),
        ));
    }
    let mut validation = Validation::new(header.alg);
    validation.set_issuer(&[expected.issuer]);
    validation.set_audience(&[expected.client_id]);
    validation.set_required_spec_claims(&["iss", "aud", "exp"]);
    validation.validate_nbf = true;
    // Checked below against ehrsync's clock (tests run on simulated time).
    validation.validate_exp = false;

    let mut last = IdTokenError::BadSignature;
    for key in candidates {
        let Ok(decoding) = DecodingKey::from_jwk(key) else {
            continue;
        };
        match jsonwebtoken::decode::<serde_json::Value>(token, &decoding, &validation) {
            Ok(data) => return check_claims(data.claims, expected, now),
            Err(e) => {
                last = map_error(e.kind(), expected);
                // A signature that fails with this key may verify with the next one; any
                // other failure is about the claims, which no other key changes.
                if last != IdTokenError::BadSignature {
                    return Err(last);
                }
            }
        }
    }
    Err(last)
}

fn check_claims(
    value: serde_json::Value,
    expected: &Expected<'_>,
    now: Timestamp,
) -> Result<IdClaims, IdTokenError> {
    let claims: Claims = serde_json::from_value(value).map_err(|e| {
        // serde's message names the field and the expected type; cut any quoted value.
        let text = e.to_string();
        let cut = text.find(['"', '`']).map_or(text.as_str(), |i| &text[..i]);
        IdTokenError::Claims(cut.trim().to_owned())
    })?;
    if let Audience::Many(list) = &claims.aud
        && list.len() > 1
        && claims.azp.as_deref() != Some(expected.client_id)
    {
        return Err(IdTokenError::AuthorizedParty);
    }
    if let Some(azp) = &claims.azp
        && azp != expected.client_id
    {
        return Err(IdTokenError::AuthorizedParty);
    }
    if !claims.exp.is_finite() {
        return Err(IdTokenError::Claims(
            "exp is not a number of seconds".into(),
        ));
    }
    let expires_at = Timestamp::from_unix_millis((claims.exp * 1000.0) as i64);
    if now.unix_seconds() > expires_at.unix_seconds() + LEEWAY_SECS {
        return Err(IdTokenError::Expired(expires_at));
    }
    if let Some(nonce) = expected.nonce
        && claims.nonce.as_deref() != Some(nonce)
    {
        return Err(IdTokenError::Nonce);
    }
    Ok(IdClaims {
        subject: claims.sub,
        expires_at,
    })
}

fn map_error(kind: &jsonwebtoken::errors::ErrorKind, expected: &Expected<'_>) -> IdTokenError {
    use jsonwebtoken::errors::ErrorKind as K;
    match kind {
        K::InvalidSignature | K::InvalidEcdsaKey | K::InvalidEddsaKey | K::InvalidRsaKey(_) => {
            IdTokenError::BadSignature
        }
        K::InvalidIssuer => IdTokenError::Issuer(expected.issuer.to_owned()),
        K::InvalidAudience => IdTokenError::Audience(expected.client_id.to_owned()),
        K::ImmatureSignature => IdTokenError::NotYetValid,
        K::InvalidAlgorithm | K::UnsupportedAlgorithm | K::MissingAlgorithm => {
            IdTokenError::BadSignature
        }
        K::MissingRequiredClaim(c) => IdTokenError::Claims(format!("no `{c}` claim")),
        K::InvalidClaimFormat(c) => IdTokenError::Claims(format!("`{c}` has the wrong type")),
        other => IdTokenError::Malformed(format!("{other:?}")),
    }
}

fn key_alg_matches(key: KeyAlgorithm, alg: Algorithm) -> bool {
    matches!(
        (key, alg),
        (KeyAlgorithm::RS256, Algorithm::RS256)
            | (KeyAlgorithm::RS384, Algorithm::RS384)
            | (KeyAlgorithm::RS512, Algorithm::RS512)
            | (KeyAlgorithm::PS256, Algorithm::PS256)
            | (KeyAlgorithm::PS384, Algorithm::PS384)
            | (KeyAlgorithm::PS512, Algorithm::PS512)
            | (KeyAlgorithm::ES256, Algorithm::ES256)
            | (KeyAlgorithm::ES384, Algorithm::ES384)
            | (KeyAlgorithm::EdDSA, Algorithm::EdDSA)
    )
}

/// Signs ID tokens with a P-256 key (ES256), for the sandbox's OpenID provider and for tests:
/// ring signs, jsonwebtoken verifies, so the two sides share no code.
pub struct TestSigner {
    key: ring::signature::EcdsaKeyPair,
    kid: String,
}

impl TestSigner {
    pub fn generate(kid: &str) -> Result<TestSigner, String> {
        let rng = ring::rand::SystemRandom::new();
        let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng)
            .map_err(|_| "cannot generate a P-256 key".to_owned())?;
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng)
            .map_err(|_| "cannot read the generated P-256 key".to_owned())?;
        Ok(TestSigner {
            key,
            kid: kid.to_owned(),
        })
    }

    /// The public key as a JWKS document.
    pub fn jwks(&self) -> serde_json::Value {
        use base64::Engine as _;
        use ring::signature::KeyPair as _;
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        // An uncompressed SEC1 point: 0x04, then x and y (32 bytes each).
        let point = self.key.public_key().as_ref();
        let (x, y) = point[1..].split_at(32);
        serde_json::json!({ "keys": [{
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256",
            "kid": self.kid, "x": b64(x), "y": b64(y),
        }]})
    }

    /// A compact JWS of `claims`, signed ES256 under this key's `kid`.
    pub fn sign(&self, claims: &serde_json::Value) -> Result<String, String> {
        use base64::Engine as _;
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let header = serde_json::json!({ "alg": "ES256", "typ": "JWT", "kid": self.kid });
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let signature = self
            .key
            .sign(&ring::rand::SystemRandom::new(), input.as_bytes())
            .map_err(|_| "cannot sign".to_owned())?;
        Ok(format!("{input}.{}", b64(signature.as_ref())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISSUER: &str = "https://id.example.com";
    const CLIENT: &str = "ehrsync-client";

    fn now() -> Timestamp {
        Timestamp::from_unix_millis(1_800_000_000_000)
    }

    fn claims(extra: serde_json::Value) -> serde_json::Value {
        let mut c = serde_json::json!({
            "iss": ISSUER, "aud": CLIENT, "sub": "person-1", "nonce": "n-123",
            "iat": 1_800_000_000, "exp": 1_800_000_300,
        });
        if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                c.insert(k.clone(), v.clone());
            }
        }
        c
    }

    fn expected() -> Expected<'static> {
        Expected {
            issuer: ISSUER,
            client_id: CLIENT,
            nonce: Some("n-123"),
        }
    }

    fn check(
        signer: &TestSigner,
        keys: &JwkSet,
        extra: serde_json::Value,
    ) -> Result<IdClaims, IdTokenError> {
        let token = SecretString::from(signer.sign(&claims(extra)).unwrap());
        verify(&token, keys, &expected(), now())
    }

    #[test]
    fn a_good_token_passes_and_each_rule_refuses_its_fault() {
        let signer = TestSigner::generate("k1").unwrap();
        let keys = parse_jwks(signer.jwks().to_string().as_bytes()).unwrap();
        let ok = check(&signer, &keys, serde_json::json!({})).unwrap();
        assert_eq!(ok.subject, "person-1");

        let cases = [
            (
                serde_json::json!({"iss": "https://evil.example.com"}),
                "issued by someone else",
            ),
            (
                serde_json::json!({"aud": "other-client"}),
                "not for this client",
            ),
            (serde_json::json!({"aud": [CLIENT, "other"]}), "azp"),
            (serde_json::json!({"azp": "other"}), "azp"),
            (serde_json::json!({"exp": 1_799_999_000}), "expired"),
            (serde_json::json!({"exp": "never"}), "wrong type"),
            (serde_json::json!({"nonce": "other"}), "nonce"),
            (serde_json::json!({"nbf": 1_900_000_000}), "not valid yet"),
        ];
        for (extra, want) in cases {
            let e = check(&signer, &keys, extra.clone())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{extra}: {e}");
        }
        // Several audiences are fine with azp naming this client.
        assert!(
            check(
                &signer,
                &keys,
                serde_json::json!({"aud": [CLIENT, "x"], "azp": CLIENT})
            )
            .is_ok()
        );
        // Within the leeway.
        assert!(check(&signer, &keys, serde_json::json!({"exp": 1_799_999_970})).is_ok());
    }

    #[test]
    fn signatures_must_come_from_the_providers_keys() {
        let signer = TestSigner::generate("k1").unwrap();
        let impostor = TestSigner::generate("k1").unwrap();
        let keys = parse_jwks(signer.jwks().to_string().as_bytes()).unwrap();
        let forged = SecretString::from(impostor.sign(&claims(serde_json::json!({}))).unwrap());
        assert_eq!(
            verify(&forged, &keys, &expected(), now()),
            Err(IdTokenError::BadSignature)
        );
        let rotated = TestSigner::generate("k2").unwrap();
        let token = SecretString::from(rotated.sign(&claims(serde_json::json!({}))).unwrap());
        assert!(matches!(
            verify(&token, &keys, &expected(), now()),
            Err(IdTokenError::NoKey(_))
        ));
        // alg none and HS256 are refused before any key is tried.
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        for alg in ["none", "HS256"] {
            let t = format!(
                "{}.{}.{}",
                b64(&format!(r#"{{"alg":"{alg}","kid":"k1"}}"#)),
                b64(&claims(serde_json::json!({})).to_string()),
                b64("sig")
            );
            let e = verify(&SecretString::from(t), &keys, &expected(), now());
            assert!(
                matches!(
                    e,
                    Err(IdTokenError::Algorithm(_) | IdTokenError::Malformed(_))
                ),
                "{alg}: {e:?}"
            );
        }
        assert!(matches!(
            verify(
                &SecretString::from("not.a.jwt".to_owned()),
                &keys,
                &expected(),
                now()
            ),
            Err(IdTokenError::Malformed(_))
        ));
    }
}
