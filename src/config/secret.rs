//! Secrets in the config: where they come from and the wrapper that keeps them unprintable.
//!
//! A secret is written as `{ env = "VAR" }`, `{ file = "/path" }`, `{ credential = "name" }`
//! (a file in systemd's `$CREDENTIALS_DIRECTORY`, as `LoadCredential=` provides) or a plain
//! string (allowed, with a warning). It is read once, at config load, straight into a
//! [`SecretString`]; from then on only [`Secret::expose`] reveals it, and nothing that prints a
//! [`Secret`] (`Debug`, `Display`, plans, errors) shows more than where it came from.

use std::fmt;
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};
use serde::de::{self, Deserializer, MapAccess, Visitor};

/// The environment variable systemd sets to the directory of `LoadCredential=` files.
pub const CREDENTIALS_DIRECTORY: &str = "CREDENTIALS_DIRECTORY";

/// Secret files larger than this are refused: a secret is a line, not a document.
const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;

/// Where a secret comes from, as written in the config (before it is read).
pub enum SecretSpec {
    /// Written in the config file itself; the value is already wrapped.
    Inline(SecretString),
    Env(String),
    File(PathBuf),
    Credential(String),
}

impl fmt::Debug for SecretSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSpec::Inline(_) => f.write_str("Inline([redacted])"),
            SecretSpec::Env(var) => write!(f, "Env({var:?})"),
            SecretSpec::File(path) => write!(f, "File({path:?})"),
            SecretSpec::Credential(name) => write!(f, "Credential({name:?})"),
        }
    }
}

impl<'de> de::Deserialize<'de> for SecretSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(SpecVisitor)
    }
}

const SPEC_EXPECTED: &str =
    "a string, or a table with exactly one of `env`, `file` or `credential`";

struct SpecVisitor;

// Every error built here describes the shape of the value, never the value: it may be a secret.
impl<'de> Visitor<'de> for SpecVisitor {
    type Value = SecretSpec;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(SPEC_EXPECTED)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<SecretSpec, E> {
        Ok(SecretSpec::Inline(SecretString::from(v)))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<SecretSpec, E> {
        Ok(SecretSpec::Inline(SecretString::from(v)))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SecretSpec, A::Error> {
        let mut found: Option<SecretSpec> = None;
        while let Some(key) = map.next_key::<String>()? {
            let value: String = map.next_value().map_err(|_| {
                de::Error::custom(format!("`{key}` must be a string (a name or a path)"))
            })?;
            let spec = match key.as_str() {
                "env" => SecretSpec::Env(value),
                "file" => SecretSpec::File(PathBuf::from(value)),
                "credential" => SecretSpec::Credential(value),
                other => {
                    return Err(de::Error::custom(format!(
                        "unknown key `{other}` in a secret; use exactly one of `env`, `file` or `credential`"
                    )));
                }
            };
            if found.replace(spec).is_some() {
                return Err(de::Error::custom(
                    "a secret takes exactly one of `env`, `file` or `credential`, not several",
                ));
            }
        }
        found.ok_or_else(|| {
            de::Error::custom(format!("expected {SPEC_EXPECTED}, found an empty table"))
        })
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<SecretSpec, E> {
        Err(shape_error("a boolean"))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<SecretSpec, E> {
        Err(shape_error("a number (quote it to make it a string)"))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<SecretSpec, E> {
        Err(shape_error("a number (quote it to make it a string)"))
    }
    fn visit_i128<E: de::Error>(self, _: i128) -> Result<SecretSpec, E> {
        Err(shape_error("a number (quote it to make it a string)"))
    }
    fn visit_u128<E: de::Error>(self, _: u128) -> Result<SecretSpec, E> {
        Err(shape_error("a number (quote it to make it a string)"))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<SecretSpec, E> {
        Err(shape_error("a number (quote it to make it a string)"))
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<SecretSpec, A::Error> {
        Err(shape_error("a list"))
    }
    fn visit_unit<E: de::Error>(self) -> Result<SecretSpec, E> {
        Err(shape_error("an empty value"))
    }
}

fn shape_error<E: de::Error>(found: &str) -> E {
    E::custom(format!("expected {SPEC_EXPECTED}, found {found}"))
}

/// Where a resolved secret came from; safe to print (a variable name, a path, a credential name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretOrigin {
    Inline,
    Env(String),
    File(PathBuf),
    Credential(String),
}

impl fmt::Display for SecretOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretOrigin::Inline => f.write_str("written in the config file"),
            SecretOrigin::Env(var) => write!(f, "env {var}"),
            SecretOrigin::File(path) => write!(f, "file {}", path.display()),
            SecretOrigin::Credential(name) => write!(f, "credential {name}"),
        }
    }
}

/// A secret value, read and wrapped; `Debug` and `Display` show `[redacted]` and its origin.
#[derive(Clone)]
pub struct Secret {
    value: SecretString,
    origin: SecretOrigin,
}

impl Secret {
    /// The secret itself. Call it only where the value goes onto the wire or into the cipher.
    pub fn expose(&self) -> &str {
        self.value.expose_secret()
    }

    pub fn origin(&self) -> &SecretOrigin {
        &self.origin
    }

    /// The secret as its file holds it now, if it comes from a file whose content changed
    /// (an operator fixed it without reloading). `None` when it is unchanged, not from a file,
    /// or unreadable or empty now (the value read before stays in use).
    pub fn reread(&self) -> Option<Secret> {
        let SecretOrigin::File(path) = &self.origin else {
            return None;
        };
        let value = read_secret_file(path, &mut Vec::new()).ok()?;
        (!value.expose_secret().is_empty() && value.expose_secret() != self.expose()).then(|| {
            Secret {
                value,
                origin: self.origin.clone(),
            }
        })
    }
}

/// Equal when read from the same place with the same value: a reload uses this to tell a
/// rotated secret from an unchanged one. (Not constant-time: it compares two config values the
/// process already holds, never something a caller supplies.)
impl PartialEq for Secret {
    fn eq(&self, other: &Secret) -> bool {
        self.origin == other.origin && self.expose() == other.expose()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret([redacted] from {})", self.origin)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[redacted] ({})", self.origin)
    }
}

/// Something that went wrong while reading a secret, worded as the fix. Never holds the value.
#[derive(Debug)]
pub struct SecretProblem(pub String);

/// Reads what `spec` points at. `base_dir` anchors relative `file` paths (the config's directory);
/// `lookup_env` is the environment (injected so tests and callers control it).
/// A secret that is deliberately not read (a command that does not use this account): its
/// origin is kept for display, its value is empty and must never be sent anywhere.
pub fn unread(spec: SecretSpec, base_dir: &Path) -> Secret {
    let origin = match spec {
        SecretSpec::Inline(_) => SecretOrigin::Inline,
        SecretSpec::Env(var) => SecretOrigin::Env(var),
        SecretSpec::File(path) if path.is_relative() => SecretOrigin::File(base_dir.join(path)),
        SecretSpec::File(path) => SecretOrigin::File(path),
        SecretSpec::Credential(name) => SecretOrigin::Credential(name),
    };
    Secret {
        value: SecretString::from(String::new()),
        origin,
    }
}

pub fn resolve(
    spec: SecretSpec,
    base_dir: &Path,
    lookup_env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Secret, Vec<String>), SecretProblem> {
    let mut warnings = Vec::new();
    let (value, origin) = match spec {
        SecretSpec::Inline(value) => {
            warnings.push(
                "is written in the config file in plain text; move it to { env = \"…\" }, \
                 { file = \"…\" } or { credential = \"…\" }"
                    .to_owned(),
            );
            (value, SecretOrigin::Inline)
        }
        SecretSpec::Env(var) => {
            if var.is_empty() {
                return Err(SecretProblem("`env` names no variable".into()));
            }
            match lookup_env(&var) {
                Some(value) => (SecretString::from(value), SecretOrigin::Env(var)),
                None => {
                    return Err(SecretProblem(format!(
                        "environment variable {var} is not set; set it or point this secret elsewhere"
                    )));
                }
            }
        }
        SecretSpec::File(path) => {
            let path = if path.is_relative() {
                base_dir.join(path)
            } else {
                path
            };
            let value = read_secret_file(&path, &mut warnings)?;
            (value, SecretOrigin::File(path))
        }
        SecretSpec::Credential(name) => {
            if name.is_empty() || name.contains(['/', '\\']) || name == "." || name == ".." {
                return Err(SecretProblem(
                    "a credential name is a plain file name (no `/`), as given to LoadCredential="
                        .into(),
                ));
            }
            let Some(dir) = lookup_env(CREDENTIALS_DIRECTORY) else {
                return Err(SecretProblem(format!(
                    "credential `{name}` needs ${CREDENTIALS_DIRECTORY}, which is not set; run under \
                     systemd with LoadCredential={name}:… or use {{ file = \"…\" }} instead"
                )));
            };
            let path = Path::new(&dir).join(&name);
            let value = read_secret_file(&path, &mut warnings)?;
            (value, SecretOrigin::Credential(name))
        }
    };
    if value.expose_secret().is_empty() {
        return Err(SecretProblem(format!("is empty (from {origin})")));
    }
    Ok((Secret { value, origin }, warnings))
}

fn read_secret_file(
    path: &Path,
    warnings: &mut Vec<String>,
) -> Result<SecretString, SecretProblem> {
    let unreadable = |e: std::io::Error| {
        SecretProblem(format!("cannot read secret file {}: {e}", path.display()))
    };
    let meta = std::fs::metadata(path).map_err(unreadable)?;
    if !meta.is_file() {
        return Err(SecretProblem(format!(
            "secret file {} is not a regular file",
            path.display()
        )));
    }
    if meta.len() > MAX_SECRET_FILE_BYTES {
        return Err(SecretProblem(format!(
            "secret file {} is {} bytes; a secret file holds one value (at most {MAX_SECRET_FILE_BYTES} bytes)",
            path.display(),
            meta.len()
        )));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            warnings.push(format!(
                "secret file {} is readable by other users; chmod 600 it",
                path.display()
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = warnings;
    let bytes = std::fs::read(path).map_err(unreadable)?;
    let mut text = String::from_utf8(bytes)
        .map_err(|_| SecretProblem(format!("secret file {} is not UTF-8 text", path.display())))?;
    // Editors and `echo` end files with a newline that is not part of the secret.
    let trimmed = text.trim_end_matches(['\n', '\r']).len();
    text.truncate(trimmed);
    Ok(SecretString::from(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn debug_and_display_never_show_the_value() {
        let (secret, _) = resolve(
            SecretSpec::Inline(SecretString::from("hunter2-value")),
            Path::new("."),
            &no_env,
        )
        .unwrap();
        assert_eq!(secret.expose(), "hunter2-value");
        for shown in [
            format!("{secret:?}"),
            format!("{secret}"),
            format!("{secret:#?}"),
        ] {
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(shown.contains("[redacted]"), "{shown}");
        }
        let spec = SecretSpec::Inline(SecretString::from("hunter2-value"));
        assert!(!format!("{spec:?}").contains("hunter2"));
    }

    #[test]
    fn file_secrets_lose_their_trailing_newline_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, " two words \r\n").unwrap();
        let (secret, _) = resolve(SecretSpec::File("s".into()), dir.path(), &no_env).unwrap();
        assert_eq!(secret.expose(), " two words ");
        assert_eq!(secret.origin(), &SecretOrigin::File(path));
    }

    #[test]
    fn empty_and_oversized_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("empty"), "\n").unwrap();
        std::fs::write(dir.path().join("big"), vec![b'a'; 70_000]).unwrap();
        let err = resolve(SecretSpec::File("empty".into()), dir.path(), &no_env).unwrap_err();
        assert!(err.0.contains("is empty"), "{}", err.0);
        let err = resolve(SecretSpec::File("big".into()), dir.path(), &no_env).unwrap_err();
        assert!(err.0.contains("at most"), "{}", err.0);
    }

    #[test]
    fn credential_names_cannot_escape_the_directory() {
        let env = |k: &str| (k == CREDENTIALS_DIRECTORY).then(|| "/tmp".to_owned());
        for name in ["../etc/passwd", "a/b", "..", ""] {
            let err =
                resolve(SecretSpec::Credential(name.into()), Path::new("."), &env).unwrap_err();
            assert!(err.0.contains("plain file name"), "{name}: {}", err.0);
        }
    }
}
