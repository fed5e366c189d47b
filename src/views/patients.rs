//! The `patients` table (`patient_rows`, read through the `patients` view): one flat row per
//! live patient of every source, computed here when a record is pulled rather than by SQLite on
//! every query. The rules are migration 0006's, which filled the table from older databases.

use serde_json::Value;

/// FHIR's patient resource type.
pub const FHIR_PATIENT: &str = "Patient";

/// A `patient_rows` row (the key columns come from the record).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PatientRow {
    pub family: Option<String>,
    pub given: Option<String>,
    pub birth_date: Option<String>,
    pub gender: Option<String>,
}

/// Whether records of `resource_type` are patients.
pub fn is_patient_type(resource_type: &str) -> bool {
    resource_type == FHIR_PATIENT || resource_type == crate::sync::list::RESOURCE_TYPE
}

/// The row of `data`, a `resource_type` record's JSON, read straight into the few fields it
/// needs (the rest is skipped, not built): `None` for other types or JSON that does not parse.
pub fn row_from_text(resource_type: &str, data: &str) -> Option<PatientRow> {
    if resource_type == FHIR_PATIENT {
        let p: FhirPatient = serde_json::from_str(data).ok()?;
        Some(fhir_fields(&p.name, p.birth_date, p.gender))
    } else if resource_type == crate::sync::list::RESOURCE_TYPE {
        let n: NikoPatient = serde_json::from_str(data).ok()?;
        Some(niko_fields(
            n.first_name.and_then(text_of),
            n.middle_name.and_then(text_of),
            n.last_name.and_then(text_of),
            n.date_of_birth.and_then(text_of),
            n.gender.and_then(text_of),
        ))
    } else {
        None
    }
}

/// The fields of a FHIR Patient the row needs.
#[derive(serde::Deserialize)]
struct FhirPatient {
    #[serde(default, deserialize_with = "lenient")]
    name: Value,
    #[serde(rename = "birthDate", default, deserialize_with = "lenient_text")]
    birth_date: Option<String>,
    #[serde(default, deserialize_with = "lenient_text")]
    gender: Option<String>,
}

/// The fields of a NikoHealth list record the row needs.
#[derive(serde::Deserialize)]
struct NikoPatient {
    #[serde(rename = "firstName", default)]
    first_name: Option<Value>,
    #[serde(rename = "middleName", default)]
    middle_name: Option<Value>,
    #[serde(rename = "lastName", default)]
    last_name: Option<Value>,
    #[serde(rename = "dateOfBirth", default)]
    date_of_birth: Option<Value>,
    #[serde(default)]
    gender: Option<Value>,
}

/// Any JSON value (a field of an unexpected shape is not an error: it gives no column).
fn lenient<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
    <Value as serde::Deserialize>::deserialize(d)
}

fn lenient_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(text_of(<Value as serde::Deserialize>::deserialize(d)?))
}

fn text_of(v: Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The top-level members of a `resource_type` record that [`row`] reads.
pub fn fields(resource_type: &str) -> &'static [&'static str] {
    if resource_type == FHIR_PATIENT {
        &["name", "birthDate", "gender"]
    } else if resource_type == crate::sync::list::RESOURCE_TYPE {
        &[
            "firstName",
            "middleName",
            "lastName",
            "dateOfBirth",
            "gender",
        ]
    } else {
        &[]
    }
}

/// The row of `record`, a `resource_type` record; `None` for other types.
pub fn row(resource_type: &str, record: &Value) -> Option<PatientRow> {
    if resource_type == FHIR_PATIENT {
        Some(fhir(record))
    } else if resource_type == crate::sync::list::RESOURCE_TYPE {
        Some(niko(record))
    } else {
        None
    }
}

/// A FHIR Patient: the name with use = `official`, else the first; its given names joined with
/// spaces; `birthDate` and `gender` as written.
fn fhir(record: &Value) -> PatientRow {
    fhir_fields(
        record.get("name").unwrap_or(&Value::Null),
        record.get("birthDate").and_then(text),
        record.get("gender").and_then(text),
    )
}

fn fhir_fields(names: &Value, birth_date: Option<String>, gender: Option<String>) -> PatientRow {
    let names = names.as_array();
    let name = names.and_then(|n| {
        n.iter()
            .find(|n| n.get("use").and_then(Value::as_str) == Some("official"))
            .or_else(|| n.first())
    });
    let given = name
        .and_then(|n| n.get("given"))
        .and_then(Value::as_array)
        .map(|g| g.iter().filter_map(text).collect::<Vec<_>>().join(" "))
        .filter(|g| !g.is_empty());
    PatientRow {
        family: name.and_then(|n| n.get("family")).and_then(text),
        given,
        birth_date,
        gender,
    }
}

/// NikoHealth's list record: firstName and middleName, lastName, the date part of dateOfBirth,
/// gender lower-cased (as FHIR writes it).
fn niko(record: &Value) -> PatientRow {
    let field = |k: &str| record.get(k).and_then(text);
    niko_fields(
        field("firstName"),
        field("middleName"),
        field("lastName"),
        field("dateOfBirth"),
        field("gender"),
    )
}

fn niko_fields(
    first: Option<String>,
    middle: Option<String>,
    last: Option<String>,
    birth: Option<String>,
    gender: Option<String>,
) -> PatientRow {
    let given = format!(
        "{} {}",
        first.unwrap_or_default(),
        middle.unwrap_or_default()
    )
    .trim()
    .to_owned();
    PatientRow {
        family: last,
        given: Some(given).filter(|g| !g.is_empty()),
        birth_date: birth.map(|d| d.chars().take(10).collect()),
        gender: gender.map(|g| g.to_lowercase()),
    }
}

/// A string or number as text (what SQLite's `json_extract` gave the version 2 view).
fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fhir_patients_take_the_official_name() {
        let p = json!({"resourceType": "Patient", "id": "1",
            "name": [{"use": "usual", "given": ["Bob"]},
                     {"use": "official", "family": "Smith", "given": ["Robert", "James"]}],
            "birthDate": "1970-01-02", "gender": "male"});
        assert_eq!(
            row(FHIR_PATIENT, &p),
            Some(PatientRow {
                family: Some("Smith".into()),
                given: Some("Robert James".into()),
                birth_date: Some("1970-01-02".into()),
                gender: Some("male".into()),
            })
        );
        assert_eq!(
            row_from_text(FHIR_PATIENT, &p.to_string()),
            row(FHIR_PATIENT, &p)
        );
        let odd = json!({"name": 5, "gender": ["x"], "birthDate": 1970});
        assert_eq!(
            row_from_text(FHIR_PATIENT, &odd.to_string()),
            row(FHIR_PATIENT, &odd)
        );
        let first = json!({"name": [{"family": "Jones"}, {"family": "Other"}]});
        assert_eq!(fhir(&first).family.as_deref(), Some("Jones"));
        assert_eq!(fhir(&json!({"name": "not a list"})), PatientRow::default());
    }

    #[test]
    fn niko_patients_are_mapped_like_the_old_view() {
        let n = json!({"id": 7, "firstName": "Ann", "lastName": "Lee",
            "dateOfBirth": "1980-05-06T00:00:00", "gender": "Female"});
        let r = row(crate::sync::list::RESOURCE_TYPE, &n).unwrap();
        assert_eq!(
            row_from_text(crate::sync::list::RESOURCE_TYPE, &n.to_string()),
            Some(r.clone())
        );
        assert_eq!(r.given.as_deref(), Some("Ann"));
        assert_eq!(r.birth_date.as_deref(), Some("1980-05-06"));
        assert_eq!(r.gender.as_deref(), Some("female"));
        assert_eq!(row("Observation", &n), None);
    }
}
