//! Config problems (errors and warnings), each tied to a key path, and the deserialization step
//! that collects them.
//!
//! Every section is deserialized on its own ([`parse_section`]), so one bad account cannot hide
//! the problems of another, and every unknown key is reported (with a "did you mean"), not only
//! the first. Messages describe values by shape, never by content: a mistyped key may hold a
//! secret.

use std::fmt;
use std::path::PathBuf;

use serde::de::{self, DeserializeOwned, Deserializer, Visitor};

/// One thing wrong with (or worth saying about) the config, at a key path such as
/// `accounts.niko.client_secret` or `accounts.niko.jobs[0].schedule`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl Problem {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Problem {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

/// The config could not be used. Holds every problem found, in file order where possible.
#[derive(Debug)]
pub struct ConfigError {
    pub path: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "invalid config {}: {n} problem{}",
            self.path.display(),
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Joins a key path and a child key (`a` + `b` → `a.b`, `a` + `[0]` → `a[0]`).
pub fn join(prefix: &str, child: &str) -> String {
    match (prefix.is_empty(), child.is_empty()) {
        (true, _) => child.to_owned(),
        (_, true) => prefix.to_owned(),
        _ if child.starts_with('[') => format!("{prefix}{child}"),
        _ => format!("{prefix}.{child}"),
    }
}

/// Deserializes `value` (the section at key path `prefix`) into `T`, recording every unknown key
/// and the first type error into `problems`. Returns `None` when `T` could not be built.
pub fn parse_section<T: DeserializeOwned>(
    prefix: &str,
    value: config::Value,
    problems: &mut Vec<Problem>,
) -> Option<T> {
    let mut unknown = Vec::new();
    let result: Result<T, _> = {
        let mut record = |path: serde_ignored::Path<'_>| unknown.push(path.to_string());
        let ignoring = serde_ignored::Deserializer::new(value, &mut record);
        serde_path_to_error::deserialize(ignoring)
    };
    let known = field_names::<T>();
    for path in unknown {
        let key = path.rsplit('.').next().unwrap_or(&path);
        let hint = match suggest(key, known) {
            Some(s) => format!("unknown key; did you mean `{s}`?"),
            None if known.is_empty() => "unknown key; remove it".to_owned(),
            None => format!("unknown key; known keys here are {}", list(known)),
        };
        problems.push(Problem::new(join(prefix, &path), hint));
    }
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            problems.push(Problem::new(join(prefix, &path), describe(e.inner())));
            None
        }
    }
}

/// Words a deserialization error for an operator: "expected X, found <kind>". The value itself
/// is never repeated (a misplaced value can be a secret), and the `config` crate's "for key `x`
/// in y" is dropped because the problem's own key path says it.
fn describe(e: &config::ConfigError) -> String {
    match e {
        config::ConfigError::Type {
            unexpected,
            expected,
            ..
        } => {
            format!(
                "expected {expected}, found {}",
                shape(&unexpected.to_string())
            )
        }
        config::ConfigError::At { error, .. } => describe(error),
        other => {
            let text = other.to_string();
            // serde's own wording: "invalid type: string \"…\", expected a table".
            let parsed = ["invalid type: ", "invalid value: "]
                .iter()
                .find_map(|p| text.strip_prefix(p))
                .and_then(|rest| rest.rsplit_once(", expected "));
            match parsed {
                // A derived struct names itself ("struct RawAccount"); operators know a table.
                Some((found, expected)) if expected.starts_with("struct ") => {
                    format!("expected a table of keys, found {}", shape(found))
                }
                Some((found, expected)) => format!("expected {expected}, found {}", shape(found)),
                None => text,
            }
        }
    }
}

/// The kind of a value from its description ("string \"…\"", "64-bit integer `5`", "map", …),
/// without the value.
fn shape(described: &str) -> &'static str {
    let kinds = [
        ("boolean", "a boolean"),
        ("integer", "an integer"),
        ("floating", "a number"),
        ("string", "a string"),
        ("char", "a string"),
        ("unit", "nothing"),
        ("sequence", "a list"),
        ("map", "a table"),
    ];
    kinds
        .iter()
        .find(|(word, _)| described.contains(word))
        .map_or("a value of another kind", |(_, kind)| kind)
}

/// Formats names as `` `a`, `b` or `c` ``.
pub fn list(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    match quoted.split_last() {
        None => String::new(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

/// The closest known name to `key`, when it is close enough to be a typo.
pub fn suggest<'a>(key: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (strsim::damerau_levenshtein(key, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// The field names a derived `Deserialize` struct accepts, read from serde itself so the list
/// used in "did you mean" hints cannot drift from the struct.
pub fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
    let mut fields: &'static [&'static str] = &[];
    // The error is the expected outcome: the probe only records the field list.
    let _ = T::deserialize(FieldProbe(&mut fields));
    fields
}

struct FieldProbe<'a>(&'a mut &'static [&'static str]);

#[derive(Debug)]
struct Probed;

impl fmt::Display for Probed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("field probe")
    }
}

impl std::error::Error for Probed {}

impl de::Error for Probed {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Probed
    }
}

impl<'de> Deserializer<'de> for FieldProbe<'_> {
    type Error = Probed;

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Probed> {
        *self.0 = fields;
        Err(Probed)
    }

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Probed> {
        Err(Probed)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Sample {
        client_secret: Option<String>,
        page_size: Option<u32>,
    }

    fn value(toml: &str) -> config::Value {
        config::Config::builder()
            .add_source(config::File::from_str(toml, config::FileFormat::Toml))
            .build()
            .unwrap()
            .cache
    }

    #[test]
    fn field_names_come_from_serde() {
        assert_eq!(field_names::<Sample>(), &["client_secret", "page_size"]);
    }

    #[test]
    fn every_unknown_key_is_reported_with_a_suggestion() {
        let mut problems = Vec::new();
        let parsed: Option<Sample> = parse_section(
            "accounts.a",
            value("client_secert = 'x'\nbogus = 1\n"),
            &mut problems,
        );
        assert!(parsed.is_some());
        problems.sort_by(|a, b| a.key.cmp(&b.key));
        assert_eq!(
            problems,
            vec![
                Problem::new(
                    "accounts.a.bogus",
                    "unknown key; known keys here are `client_secret` or `page_size`"
                ),
                Problem::new(
                    "accounts.a.client_secert",
                    "unknown key; did you mean `client_secret`?"
                ),
            ]
        );
    }

    #[test]
    fn type_errors_name_the_key_and_not_the_value() {
        let mut problems = Vec::new();
        let parsed: Option<Sample> = parse_section(
            "accounts.a",
            value("page_size = 'lots-of-secret'\n"),
            &mut problems,
        );
        assert!(parsed.is_none());
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].key, "accounts.a.page_size");
        assert!(
            !problems[0].message.contains("lots-of-secret"),
            "{}",
            problems[0].message
        );
    }

    #[test]
    fn join_handles_indices() {
        assert_eq!(join("a.jobs", "[0]"), "a.jobs[0]");
        assert_eq!(join("", "agent"), "agent");
        assert_eq!(join("a", ""), "a");
    }
}
