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

/// The `EHRSYNC__…` variables in effect, each with the key path it sets
/// (`EHRSYNC__ACCOUNTS__NIKO__DOMAIN` → `accounts.niko.domain`), so that a problem at such a key
/// names the variable the operator has to change: it is not in the file.
#[derive(Debug, Default)]
pub struct Overrides(Vec<(String, String)>);

impl Overrides {
    /// From (key path, variable name) pairs.
    pub fn new(pairs: Vec<(String, String)>) -> Self {
        Overrides(pairs)
    }

    /// The variables that set `key` itself.
    pub fn at<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(path, _)| path == key)
            .map(|(_, var)| var.as_str())
    }

    /// The variables that set `key` or a key below it, with the key path each sets.
    pub fn under<'a>(&'a self, key: &'a str) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        self.0
            .iter()
            .filter(move |(path, _)| {
                path == key || path.strip_prefix(key).is_some_and(|r| r.starts_with('.'))
            })
            .map(|(path, var)| (path.as_str(), var.as_str()))
    }

    /// `message` about `key`, followed by the variables that set it (or a key below it), unless
    /// it names them already. Names only: a variable's value may be a secret.
    pub fn annotate(&self, key: &str, message: String) -> String {
        if key.is_empty() {
            return message;
        }
        let under: Vec<(&str, &str)> = self.under(key).collect();
        if under.is_empty() || under.iter().any(|(_, var)| message.contains(var)) {
            return message;
        }
        if under.iter().all(|(path, _)| *path == key) {
            let vars: Vec<&str> = under.iter().map(|(_, var)| *var).collect();
            let (noun, names) = match vars.as_slice() {
                [one] => ("variable", (*one).to_owned()),
                [rest @ .., last] => ("variables", format!("{} and {last}", rest.join(", "))),
                [] => return message,
            };
            return format!("{message} (set by the environment {noun} {names})");
        }
        let sets: Vec<String> = under
            .iter()
            .map(|(path, var)| format!("{var} sets `{path}`"))
            .collect();
        format!("{message} (from the environment: {})", sets.join(", "))
    }
}

/// `var` (`EHRSYNC__ACCOUNTS__NIKO__DOMIAN`) with its last level replaced by `key` (`domain`),
/// in the case the variable was written in.
fn renamed(var: &str, key: &str) -> String {
    let (head, last) = var.rsplit_once(super::ENV_SEPARATOR).unwrap_or(("", var));
    let key = if last.chars().any(|c| c.is_ascii_lowercase()) {
        key.to_owned()
    } else {
        key.to_ascii_uppercase()
    };
    if head.is_empty() {
        key
    } else {
        format!("{head}{}{key}", super::ENV_SEPARATOR)
    }
}

/// Deserializes `value` (the section at key path `prefix`) into `T`, recording every unknown key
/// and the first type error into `problems`. Returns `None` when `T` could not be built. A
/// problem at a key set by an `EHRSYNC__…` variable names the variable (see [`Overrides`]).
pub fn parse_section<T: DeserializeOwned>(
    prefix: &str,
    value: config::Value,
    overrides: &Overrides,
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
        let full = join(prefix, &path);
        let suggestion = suggest(key, known);
        let hint = match overrides.at(&full).next() {
            // Not in the file: the fix is the variable's name.
            Some(var) => {
                let advice = match suggestion {
                    Some(s) => format!("did you mean `{s}`? Name the variable {}", renamed(var, s)),
                    None if known.is_empty() => "unset it".to_owned(),
                    None => format!("known keys here are {}", list(known)),
                };
                format!("unknown key, set by the environment variable {var}; {advice}")
            }
            None => match suggestion {
                Some(s) => format!("unknown key; did you mean `{s}`?"),
                None if known.is_empty() => "unknown key; remove it".to_owned(),
                None => format!("unknown key; known keys here are {}", list(known)),
            },
        };
        problems.push(Problem::new(full, hint));
    }
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            let key = join(prefix, &path);
            let message = overrides.annotate(&key, describe(e.inner()));
            problems.push(Problem::new(key, message));
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
            &Overrides::default(),
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
            &Overrides::default(),
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
    fn overrides_name_their_variable() {
        let overrides = Overrides::new(vec![
            (
                "agent.metrics_listen".into(),
                "EHRSYNC__AGENT__METRICS_LISTEN".into(),
            ),
            (
                "accounts.a.domain.x".into(),
                "EHRSYNC__ACCOUNTS__A__DOMAIN__X".into(),
            ),
        ]);
        assert_eq!(
            overrides.annotate("agent.metrics_listen", "bad".into()),
            "bad (set by the environment variable EHRSYNC__AGENT__METRICS_LISTEN)"
        );
        assert_eq!(
            overrides.annotate("accounts.a.domain", "a table".into()),
            "a table (from the environment: EHRSYNC__ACCOUNTS__A__DOMAIN__X sets `accounts.a.domain.x`)"
        );
        assert_eq!(
            overrides.annotate("accounts.a.domai", "other".into()),
            "other",
            "a key path is matched by whole levels"
        );
        assert_eq!(overrides.annotate("", "syntax".into()), "syntax");
        assert_eq!(
            overrides.annotate(
                "agent.metrics_listen",
                "EHRSYNC__AGENT__METRICS_LISTEN is bad".into()
            ),
            "EHRSYNC__AGENT__METRICS_LISTEN is bad",
            "named once"
        );
    }

    #[test]
    fn an_unknown_key_from_the_environment_names_the_variable_to_set() {
        let overrides = Overrides::new(vec![(
            "accounts.a.client_secert".into(),
            "ehrsync__accounts__a__client_secert".into(),
        )]);
        let mut problems = Vec::new();
        let _: Option<Sample> = parse_section(
            "accounts.a",
            value("client_secert = 'hunter2'\n"),
            &overrides,
            &mut problems,
        );
        assert_eq!(
            problems,
            vec![Problem::new(
                "accounts.a.client_secert",
                "unknown key, set by the environment variable ehrsync__accounts__a__client_secert; \
                 did you mean `client_secret`? Name the variable ehrsync__accounts__a__client_secret"
            )]
        );
        assert_eq!(
            renamed("EHRSYNC__ACCOUNTS__NIKO__DOMIAN", "domain"),
            "EHRSYNC__ACCOUNTS__NIKO__DOMAIN"
        );
    }

    #[test]
    fn join_handles_indices() {
        assert_eq!(join("a.jobs", "[0]"), "a.jobs[0]");
        assert_eq!(join("", "agent"), "agent");
        assert_eq!(join("a", ""), "a");
    }
}
