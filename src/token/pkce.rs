//! PKCE (RFC 7636) with the S256 method: a random code verifier and its challenge. Used by
//! `ehrsync login` and checked by the sandbox's OpenID provider.

use base64::Engine as _;
use secrecy::{ExposeSecret, SecretString};

/// A code verifier (secret until the code exchange) and the challenge sent with the
/// authorization request.
pub struct Pkce {
    pub verifier: SecretString,
    pub challenge: String,
}

impl Pkce {
    /// 32 random bytes, base64url: a 43-character verifier (RFC 7636 §4.1 allows 43–128).
    pub fn generate() -> Result<Pkce, getrandom::Error> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes)?;
        let verifier =
            SecretString::from(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes));
        let challenge = challenge_for(verifier.expose_secret());
        Ok(Pkce {
            verifier,
            challenge,
        })
    }
}

/// `BASE64URL(SHA256(verifier))`, RFC 7636 §4.2.
pub fn challenge_for(verifier: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rfc_7636_example_holds() {
        // RFC 7636 Appendix B.
        assert_eq!(
            challenge_for("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        let p = Pkce::generate().unwrap();
        assert_eq!(p.verifier.expose_secret().len(), 43);
        assert_eq!(p.challenge, challenge_for(p.verifier.expose_secret()));
    }
}
