//! What ehrsync derives from each pulled record and keeps beside it, in the same transaction:
//! the `patients` table and the configured SQL-on-FHIR v2 views (`[[views]]`), materialised as
//! `view_{name}` tables.
//!
//! A page's records are derived on the pull's reader side ([`ViewSet::derive`]), so the CPU
//! work overlaps the writer's transaction; the store then writes the derived rows of the
//! records that really changed, and removes those of deleted records (`store::sync`). The
//! ViewDefinitions are evaluated by [`view`], over the FHIRPath subset of [`fhirpath`].

pub mod fhirpath;
pub mod partial;
pub mod patients;
pub mod view;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use view::ViewDefinition;

/// A value of a derived row, as SQLite stores it.
#[derive(Debug, Clone, PartialEq)]
pub enum SqlValue {
    Null,
    Integer(i64),
    Real(f64),
    Text(String),
}

/// What one record contributes to the derived tables.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Derived {
    /// Its `patient_rows` row, for the patient resource types.
    pub patient: Option<patients::PatientRow>,
    /// Per view of the set that reads this resource type (in [`ViewSet::for_type`] order): the
    /// record's rows. A record the view cannot evaluate has none (and is counted).
    pub views: Vec<Vec<Vec<SqlValue>>>,
    /// Views that could not evaluate this record.
    pub view_errors: Vec<usize>,
}

/// A column of a materialised view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnDef {
    pub name: String,
    /// The SQLite column type: `INTEGER`, `REAL`, `TEXT` (collections are JSON text) or `ANY`.
    pub sql_type: &'static str,
    /// The FHIR type the ViewDefinition gives, if any.
    pub fhir_type: Option<String>,
    pub collection: bool,
}

/// One configured view: its definition, compiled, and the table it is kept in.
#[derive(Debug)]
pub struct Materialised {
    /// The ViewDefinition's `name`.
    pub name: String,
    /// `view_{name}`.
    pub table: String,
    pub resource_type: String,
    pub columns: Vec<ColumnDef>,
    /// SHA-256 (hex) of the definition's canonical JSON: a changed definition is rebuilt.
    pub fingerprint: String,
    /// Where it was read from.
    pub file: PathBuf,
    definition: ViewDefinition,
}

/// The columns ehrsync adds to every view table, before the view's own.
pub const KEY_COLUMNS: [&str; 2] = ["account", "resource_id"];

/// Why a ViewDefinition file cannot be used. The reason never quotes record content.
#[derive(Debug, thiserror::Error)]
pub enum ViewFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not JSON: {reason}")]
    Json { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

impl Materialised {
    /// Reads and checks the ViewDefinition in `path`.
    pub fn load(path: &Path) -> Result<Materialised, ViewFileError> {
        let text = std::fs::read(path).map_err(|source| ViewFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        let json: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| ViewFileError::Json {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        Materialised::from_json(&json, path).map_err(|reason| ViewFileError::Invalid {
            path: path.to_owned(),
            reason,
        })
    }

    /// A view from its ViewDefinition JSON (`file` is only remembered, for messages).
    pub fn from_json(json: &serde_json::Value, file: &Path) -> Result<Materialised, String> {
        let definition = ViewDefinition::parse(json).map_err(|e| e.to_string())?;
        let name = definition.name().to_owned();
        if !valid_name(&name) {
            return Err(format!(
                "the view's name `{}` must start with a letter and hold only letters, digits \
                 and `_` (it names the table view_{{name}})",
                short(&name)
            ));
        }
        let mut columns: Vec<ColumnDef> = Vec::new();
        for c in definition.columns() {
            if KEY_COLUMNS.iter().any(|k| k.eq_ignore_ascii_case(&c.name)) {
                return Err(format!(
                    "column `{}`: ehrsync adds `account` and `resource_id` to every view table; \
                     name the column otherwise",
                    c.name
                ));
            }
            if columns.iter().any(|d| d.name.eq_ignore_ascii_case(&c.name)) {
                return Err(format!("column `{}` appears twice", c.name));
            }
            columns.push(ColumnDef {
                name: c.name.clone(),
                sql_type: sql_type(c.ty.as_deref(), c.collection),
                fhir_type: c.ty.clone(),
                collection: c.collection,
            });
        }
        let canonical = serde_json::to_vec(json).unwrap_or_default();
        Ok(Materialised {
            table: format!("view_{}", name.to_ascii_lowercase()),
            name,
            resource_type: definition.resource().to_owned(),
            columns,
            fingerprint: crate::crypto::sha256_hex(&canonical),
            file: file.to_owned(),
            definition,
        })
    }

    /// `record`'s rows in this view, converted to SQLite values.
    pub fn evaluate(&self, record: &serde_json::Value) -> Result<Vec<Vec<SqlValue>>, String> {
        let rows = self
            .definition
            .evaluate(record)
            .map_err(|e| e.to_string())?;
        Ok(rows
            .into_iter()
            .map(|row| {
                row.into_iter()
                    .zip(&self.columns)
                    .map(|(v, c)| to_sql(v, c))
                    .collect()
            })
            .collect())
    }
}

/// The configured views, shared by every pull of a process.
#[derive(Debug, Clone, Default)]
pub struct ViewSet(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    views: Vec<Materialised>,
    /// Per resource type with views: the top-level members they read together, or `None` when
    /// one of them may read the whole record.
    members: Vec<(String, Option<BTreeSet<String>>)>,
}

impl ViewSet {
    pub fn new(views: Vec<Materialised>) -> ViewSet {
        let mut members: Vec<(String, Option<BTreeSet<String>>)> = Vec::new();
        for view in &views {
            let read = view.definition.resource_members();
            match members.iter_mut().find(|(t, _)| *t == view.resource_type) {
                Some((_, all)) => match (all.as_mut(), read) {
                    (Some(all), Some(read)) => all.extend(read),
                    _ => *all = None,
                },
                None => members.push((view.resource_type.clone(), read)),
            }
        }
        ViewSet(Arc::new(Inner { views, members }))
    }

    pub fn all(&self) -> &[Materialised] {
        &self.0.views
    }

    pub fn get(&self, name: &str) -> Option<&Materialised> {
        self.0
            .views
            .iter()
            .find(|v| v.name.eq_ignore_ascii_case(name))
    }

    /// The views of `resource_type`, in the order [`Derived::views`] holds their rows.
    pub fn for_type<'a>(
        &'a self,
        resource_type: &'a str,
    ) -> impl Iterator<Item = &'a Materialised> {
        self.0
            .views
            .iter()
            .filter(move |v| v.resource_type == resource_type)
    }

    /// Each view's name and definition fingerprint (to tell whether a new config changed them).
    pub fn fingerprints(&self) -> Vec<(&str, &str)> {
        self.0
            .views
            .iter()
            .map(|v| (v.name.as_str(), v.fingerprint.as_str()))
            .collect()
    }

    /// Whether anything is derived from `resource_type` records.
    pub fn derives(&self, resource_type: &str) -> bool {
        patients::is_patient_type(resource_type) || self.for_type(resource_type).next().is_some()
    }

    /// What `data`, a `resource_type` record, contributes to the derived tables. JSON that does
    /// not parse contributes nothing (the pull's readers have checked it already).
    pub fn derive(&self, resource_type: &str, data: &str) -> Derived {
        if self.for_type(resource_type).next().is_none() {
            // Only the patients table: read its few fields, without building the whole record.
            return Derived {
                patient: patients::row_from_text(resource_type, data),
                ..Derived::default()
            };
        }
        // Only what the views and the patients table read is built (see `partial`).
        let members = self
            .0
            .members
            .iter()
            .find(|(t, _)| t == resource_type)
            .and_then(|(_, m)| m.as_ref());
        let json = match members {
            Some(members) => partial::parse(
                data,
                &partial::Wanted {
                    fields: patients::fields(resource_type),
                    members: &[members],
                },
            ),
            None => serde_json::from_str::<serde_json::Value>(data).ok(),
        };
        let Some(json) = json else {
            return Derived::default();
        };
        let mut derived = Derived {
            patient: patients::row(resource_type, &json),
            ..Derived::default()
        };
        for (i, view) in self.for_type(resource_type).enumerate() {
            match view.evaluate(&json) {
                Ok(rows) => derived.views.push(rows),
                Err(_) => {
                    derived.views.push(Vec::new());
                    derived.view_errors.push(i);
                }
            }
        }
        derived
    }
}

/// The SQLite type of a column of FHIR type `ty`: numbers and booleans (0/1) as numbers, every
/// other FHIR type as text; a column without a type keeps each value's own (`ANY`).
fn sql_type(ty: Option<&str>, collection: bool) -> &'static str {
    match ty {
        _ if collection => "TEXT",
        None => "ANY",
        Some("boolean" | "integer" | "positiveInt" | "unsignedInt" | "integer64") => "INTEGER",
        Some("decimal") => "REAL",
        Some(_) => "TEXT",
    }
}

/// A view's value as stored in its column (view tables are STRICT): an `INTEGER` column holds
/// integers (booleans as 0/1), a `REAL` one numbers, a `TEXT` one text (collections and complex
/// values as JSON); a value the column's type cannot hold is stored as NULL rather than failing
/// the page. `ANY` keeps each value's own type.
fn to_sql(value: serde_json::Value, column: &ColumnDef) -> SqlValue {
    use serde_json::Value;
    match (column.sql_type, value) {
        (_, Value::Null) => SqlValue::Null,
        ("INTEGER", Value::Bool(b)) => SqlValue::Integer(i64::from(b)),
        ("INTEGER", Value::Number(n)) => n.as_i64().map_or(SqlValue::Null, SqlValue::Integer),
        ("INTEGER", Value::String(s)) => s.parse().map_or(SqlValue::Null, SqlValue::Integer),
        ("REAL", Value::Number(n)) => n.as_f64().map_or(SqlValue::Null, SqlValue::Real),
        ("REAL", Value::String(s)) => s
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .map_or(SqlValue::Null, SqlValue::Real),
        ("INTEGER" | "REAL", _) => SqlValue::Null,
        ("ANY", Value::Bool(b)) => SqlValue::Integer(i64::from(b)),
        ("ANY", Value::Number(n)) => n
            .as_i64()
            .map(SqlValue::Integer)
            .or_else(|| n.as_f64().map(SqlValue::Real))
            .unwrap_or(SqlValue::Null),
        (_, Value::String(s)) => SqlValue::Text(s),
        (_, other) => SqlValue::Text(other.to_string()),
    }
}

/// Table and view names: `[A-Za-z][A-Za-z0-9_]*`, at most 63 characters.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 63
}

fn short(text: &str) -> String {
    text.chars().take(64).collect()
}

/// `"name"`, a quoted SQL identifier (names are checked by [`valid_name`]; quoting keeps
/// SQLite's keywords usable as column names).
pub fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
