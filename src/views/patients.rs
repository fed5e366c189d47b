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
    let names = record.get("name").and_then(Value::as_array);
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
        birth_date: record.get("birthDate").and_then(text),
        gender: record.get("gender").and_then(text),
    }
}

/// NikoHealth's list record: firstName and middleName, lastName, the date part of dateOfBirth,
/// gender lower-cased (as FHIR writes it).
fn niko(record: &Value) -> PatientRow {
    let field = |k: &str| record.get(k).and_then(text);
    let given = format!(
        "{} {}",
        field("firstName").unwrap_or_default(),
        field("middleName").unwrap_or_default()
    )
    .trim()
    .to_owned();
    PatientRow {
        family: field("lastName"),
        given: Some(given).filter(|g| !g.is_empty()),
        birth_date: field("dateOfBirth").map(|d| d.chars().take(10).collect()),
        gender: field("gender").map(|g| g.to_lowercase()),
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
        let first = json!({"name": [{"family": "Jones"}, {"family": "Other"}]});
        assert_eq!(fhir(&first).family.as_deref(), Some("Jones"));
        assert_eq!(fhir(&json!({"name": "not a list"})), PatientRow::default());
    }

    #[test]
    fn niko_patients_are_mapped_like_the_old_view() {
        let n = json!({"id": 7, "firstName": "Ann", "lastName": "Lee",
            "dateOfBirth": "1980-05-06T00:00:00", "gender": "Female"});
        let r = row(crate::sync::list::RESOURCE_TYPE, &n).unwrap();
        assert_eq!(r.given.as_deref(), Some("Ann"));
        assert_eq!(r.birth_date.as_deref(), Some("1980-05-06"));
        assert_eq!(r.gender.as_deref(), Some("female"));
        assert_eq!(row("Observation", &n), None);
    }
}
