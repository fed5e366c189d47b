//! Reading only the parts of a record that the derived tables use.
//!
//! Building a record as a [`serde_json::Value`] was over half the cost of deriving its rows
//! (a map and a string per element, for narrative, codings and references no view reads). A
//! record is therefore built with only the top-level members its views and the `patients` table
//! read ([`view::ViewDefinition::resource_members`](super::view::ViewDefinition::resource_members));
//! the rest is checked as JSON and skipped without being built.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::{Map, Value};

use super::fhirpath::choice_type;

/// Which top-level members to keep: each name in `fields`, and each in `members` with its choice
/// forms (`value` keeps `valueString`, `valueQuantity`, ...).
pub struct Wanted<'a> {
    pub fields: &'a [&'a str],
    pub members: &'a [&'a BTreeSet<String>],
}

impl Wanted<'_> {
    fn keeps(&self, key: &str) -> bool {
        self.fields.contains(&key)
            || self.members.iter().any(|set| {
                set.contains(key)
                    || set.iter().any(|name| {
                        key.strip_prefix(name.as_str())
                            .and_then(choice_type)
                            .is_some()
                    })
            })
    }
}

/// Parses `text`, a JSON object, keeping only the top-level members `wanted` names; `None` when
/// it is not valid JSON or not an object.
pub fn parse(text: &str, wanted: &Wanted<'_>) -> Option<Value> {
    let mut de = serde_json::Deserializer::from_str(text);
    let value = Filter(wanted).deserialize(&mut de).ok()?;
    de.end().ok()?;
    Some(value)
}

struct Filter<'w, 'a>(&'w Wanted<'a>);

impl<'de> DeserializeSeed<'de> for Filter<'_, '_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Filter<'_, '_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(Key(key)) = map.next_key()? {
            if self.0.keeps(&key) {
                out.insert(key.into_owned(), map.next_value()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(Value::Object(out))
    }
}

/// An object key, borrowed from the text when it has no escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }

            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }

            fn visit_string<E>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keeps_named_members_and_their_choice_forms_only() {
        let members = BTreeSet::from(["name".to_owned(), "deceased".to_owned()]);
        let wanted = Wanted {
            fields: &["resourceType"],
            members: &[&members],
        };
        let text = r#"{"resourceType":"Patient","text":{"div":"<div/>"},"name":[{"family":"A"}],
            "deceasedBoolean":false,"deceasedly":1,"gender":"female","na\u006de2":3}"#;
        assert_eq!(
            parse(text, &wanted),
            Some(json!({"resourceType": "Patient", "name": [{"family": "A"}],
                        "deceasedBoolean": false}))
        );
    }

    #[test]
    fn an_escaped_key_is_matched_by_its_value() {
        let members = BTreeSet::from(["name".to_owned()]);
        let wanted = Wanted {
            fields: &[],
            members: &[&members],
        };
        assert_eq!(
            parse(r#"{"na\u006de":1}"#, &wanted),
            Some(json!({"name": 1}))
        );
    }

    #[test]
    fn invalid_json_or_not_an_object_is_refused_even_in_skipped_parts() {
        let wanted = Wanted {
            fields: &["id"],
            members: &[],
        };
        assert_eq!(parse(r#"{"id":"1","text":{"div":}"#, &wanted), None);
        assert_eq!(parse(r#"{"id":"1"} trailing"#, &wanted), None);
        assert_eq!(parse(r#"[1,2]"#, &wanted), None);
        assert_eq!(
            parse(r#"{"id":"1","id":"2"}"#, &wanted),
            Some(json!({"id": "2"}))
        );
    }
}
