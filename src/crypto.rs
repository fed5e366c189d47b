//! Encryption at rest for stored tokens: XChaCha20-Poly1305 with a 256-bit key from a key file
//! (created 0600 on first start), a systemd credential or an environment variable.
//!
//! A sealed value is `version (1 byte) ‖ nonce (24 bytes, random) ‖ ciphertext+tag`. Callers
//! pass associated data naming what the value is (account and column), so a ciphertext moved
//! to another row or column fails to open instead of being accepted. Errors never contain key
//! material or plaintext.

use std::fmt;
use std::io::Write as _;
use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use secrecy::{ExposeSecret, ExposeSecretMut, SecretBox, SecretString};

use crate::config::{Env, KeySource};

const VERSION: u8 = 1;
const NONCE_LEN: usize = 24;
const KEY_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the token key {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot create the token key {path}: {source}")]
    Create {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "the token key {0} is not 64 hexadecimal digits (make one with `openssl rand -hex 32`)"
    )]
    Format(String),
    #[error("environment variable {0} (the token key) is not set")]
    EnvUnset(String),
    #[error("the system random number generator failed: {0}")]
    Random(String),
}

/// A stored value could not be opened: wrong key, or altered or misplaced data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a stored token could not be decrypted (the token key changed, or the data was altered)")]
pub struct OpenError;

/// The cipher for stored tokens. `Debug` shows no key.
pub struct TokenCipher {
    aead: XChaCha20Poly1305,
    /// For [`TokenCipher::fingerprint`]: derived from the token key, never the key itself.
    mac: ring::hmac::Key,
}

impl fmt::Debug for TokenCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenCipher([redacted])")
    }
}

impl TokenCipher {
    /// Reads the key from `source`, creating a key file on first start where allowed.
    pub fn load(source: &KeySource, env: &Env) -> Result<TokenCipher, KeyError> {
        let key = match source {
            KeySource::Env(var) => {
                let text = SecretString::from(
                    env.get(var)
                        .ok_or_else(|| KeyError::EnvUnset(var.clone()))?,
                );
                parse_key(text.expose_secret())
                    .ok_or_else(|| KeyError::Format(format!("in env {var}")))?
            }
            KeySource::File { path, create } => {
                if *create && !path.exists() {
                    create_key_file(path)?;
                }
                read_key_file(path)?
            }
        };
        Ok(TokenCipher::from_key(&key))
    }

    pub fn from_key(key: &SecretBox<[u8; KEY_LEN]>) -> TokenCipher {
        let aead = XChaCha20Poly1305::new(key.expose_secret().into());
        // A key of its own for fingerprints, so the AEAD key is used for nothing else.
        let root = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.expose_secret());
        let derived = ring::hmac::sign(&root, b"ehrsync/fingerprint-key/v1");
        let mac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, derived.as_ref());
        TokenCipher { aead, mac }
    }

    /// A keyed fingerprint of `parts` (HMAC-SHA256, hex): equal inputs give equal fingerprints
    /// under one token key, and it tells nothing about them to whoever lacks the key. Used to
    /// notice that an account's credentials changed without storing them.
    pub fn fingerprint(&self, label: &str, parts: &[&[u8]]) -> String {
        let mut ctx = ring::hmac::Context::with_key(&self.mac);
        ctx.update(label.as_bytes());
        for part in parts {
            // Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
        ctx.sign()
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Encrypts `plaintext`, bound to `aad`.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, KeyError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| KeyError::Random(e.to_string()))?;
        let nonce = XNonce::from(nonce);
        // Encryption fails only for messages beyond 256 GiB, which no token approaches.
        let sealed = self
            .aead
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .map_err(|_| KeyError::Random("encryption refused the message".into()))?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
        out.push(VERSION);
        out.extend_from_slice(nonce.as_slice());
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Decrypts what [`seal`](Self::seal) produced with the same `aad`, as a secret string.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<SecretString, OpenError> {
        let (&version, rest) = sealed.split_first().ok_or(OpenError)?;
        if version != VERSION || rest.len() < NONCE_LEN {
            return Err(OpenError);
        }
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let nonce = XNonce::try_from(nonce).map_err(|_| OpenError)?;
        let plain = self
            .aead
            .decrypt(
                &nonce,
                Payload {
                    msg: ciphertext,
                    aad,
                },
            )
            .map_err(|_| OpenError)?;
        String::from_utf8(plain)
            .map(SecretString::from)
            .map_err(|_| OpenError)
    }
}

fn parse_key(text: &str) -> Option<SecretBox<[u8; KEY_LEN]>> {
    let hex = text.trim();
    if hex.len() != KEY_LEN * 2 {
        return None;
    }
    let mut key = SecretBox::new(Box::new([0u8; KEY_LEN]));
    for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
        let digits = std::str::from_utf8(pair).ok()?;
        key.expose_secret_mut()[i] = u8::from_str_radix(digits, 16).ok()?;
    }
    Some(key)
}

fn read_key_file(path: &Path) -> Result<SecretBox<[u8; KEY_LEN]>, KeyError> {
    let read_err = |source| KeyError::Read {
        path: path.display().to_string(),
        source,
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(read_err)?;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "token key was readable by other users; setting mode 0600");
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(read_err)?;
        }
    }
    let text = SecretString::from(std::fs::read_to_string(path).map_err(read_err)?);
    parse_key(text.expose_secret()).ok_or_else(|| KeyError::Format(path.display().to_string()))
}

/// Writes a fresh random key, 0600, refusing to overwrite (two processes starting at once:
/// the loser reads the winner's key).
fn create_key_file(path: &Path) -> Result<(), KeyError> {
    let create_err = |source| KeyError::Create {
        path: path.display().to_string(),
        source,
    };
    let mut key = SecretBox::new(Box::new([0u8; KEY_LEN]));
    getrandom::fill(key.expose_secret_mut()).map_err(|e| KeyError::Random(e.to_string()))?;
    let hex = SecretString::from(
        key.expose_secret()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>(),
    );
    // Its directory, if missing, as the database's is made: private to this user. (Beside a
    // SQLite database it exists already; with PostgreSQL the key may be the only file.)
    if let Some(dir) = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty() && !d.exists())
    {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(dir).map_err(create_err)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = match options.open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(create_err(e)),
    };
    file.write_all(hex.expose_secret().as_bytes())
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.sync_all())
        .map_err(create_err)?;
    tracing::info!(path = %path.display(), "created a new token key");
    Ok(())
}

/// SHA-256 of `data`: the fingerprint of a record's content or a view's definition (not a
/// secret's: those are keyed, see the credentials fingerprint).
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// [`sha256`] as lower-case hex.
pub fn sha256_hex(data: &[u8]) -> String {
    sha256(data)
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            use std::fmt::Write as _;
            // Writing to a String cannot fail.
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cipher() -> TokenCipher {
        TokenCipher::from_key(&SecretBox::new(Box::new([7u8; KEY_LEN])))
    }

    #[test]
    fn sealed_values_open_only_with_the_same_key_and_aad() {
        let c = cipher();
        let sealed = c.seal(b"niko/access_token", b"eyJ-secret-token").unwrap();
        assert!(
            !sealed.windows(6).any(|w| w == b"secret"),
            "no plaintext in the ciphertext"
        );
        assert_eq!(
            c.open(b"niko/access_token", &sealed)
                .unwrap()
                .expose_secret(),
            "eyJ-secret-token"
        );
        assert_eq!(
            c.open(b"other/access_token", &sealed).unwrap_err(),
            OpenError
        );
        let other = TokenCipher::from_key(&SecretBox::new(Box::new([8u8; KEY_LEN])));
        assert_eq!(
            other.open(b"niko/access_token", &sealed).unwrap_err(),
            OpenError
        );
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert_eq!(
            c.open(b"niko/access_token", &tampered).unwrap_err(),
            OpenError
        );
        for short in [&sealed[..0], &sealed[..1], &sealed[..20]] {
            assert_eq!(c.open(b"niko/access_token", short).unwrap_err(), OpenError);
        }
        // Fresh nonces: the same value seals differently each time.
        assert_ne!(c.seal(b"a", b"x").unwrap(), c.seal(b"a", b"x").unwrap());
    }

    #[test]
    fn a_key_file_is_created_once_0600_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ehrsync.key");
        let source = KeySource::File {
            path: path.clone(),
            create: true,
        };
        let first = TokenCipher::load(&source, &Env::default()).unwrap();
        let sealed = first.seal(b"a", b"token").unwrap();
        let second = TokenCipher::load(&source, &Env::default()).unwrap();
        assert_eq!(second.open(b"a", &sealed).unwrap().expose_secret(), "token");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap().trim().len(), 64);
    }

    #[test]
    fn keys_from_credentials_and_env_must_exist_and_be_hex() {
        let dir = tempfile::tempdir().unwrap();
        let missing = KeySource::File {
            path: dir.path().join("nope"),
            create: false,
        };
        assert!(matches!(
            TokenCipher::load(&missing, &Env::default()),
            Err(KeyError::Read { .. })
        ));
        let bad = dir.path().join("bad");
        std::fs::write(&bad, "not-hex").unwrap();
        let err = TokenCipher::load(
            &KeySource::File {
                path: bad,
                create: false,
            },
            &Env::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("openssl rand -hex 32"), "{err}");
        let hex = "ab".repeat(32);
        let env: Env = [("EHRSYNC_TOKEN_KEY", hex.as_str())].into_iter().collect();
        assert!(TokenCipher::load(&KeySource::Env("EHRSYNC_TOKEN_KEY".into()), &env).is_ok());
        let err = TokenCipher::load(&KeySource::Env("UNSET".into()), &env).unwrap_err();
        assert!(matches!(err, KeyError::EnvUnset(_)));
        assert!(
            !format!("{:?}", cipher()).contains('7'),
            "Debug shows no key"
        );
    }
}
