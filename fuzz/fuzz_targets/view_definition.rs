//! SQL-on-FHIR ViewDefinitions and their FHIRPath (`views::view`, `views::fhirpath`): hostile
//! definitions and hostile resources never panic, overflow the stack or run away.
//!
//! An input is a ViewDefinition's JSON, a line holding only `---`, and a resource's JSON (the
//! corpus is the official test suite's views and resources). An input without the separator
//! is one FHIRPath expression, used as a column's path and evaluated against a patient.
//! Evaluating twice must give the same rows or the same error.

#![no_main]

use ehrsync::views::view::ViewDefinition;
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

fn patient() -> Value {
    json!({"resourceType": "Patient", "id": "p1", "active": true,
           "name": [{"use": "official", "family": "Doe", "given": ["A", "B"]}, {"given": ["C"]}],
           "birthDate": "1970-01-02", "deceasedDateTime": "2020-01-01T10:00:00Z",
           "extension": [{"url": "u", "valueString": "x"}],
           "managingOrganization": {"reference": "Organization/o1"}})
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (view, resource) = match text.split_once("\n---\n") {
        Some((v, r)) => {
            let (Ok(v), Ok(r)) = (
                serde_json::from_str::<Value>(v),
                serde_json::from_str::<Value>(r),
            ) else {
                return;
            };
            (v, r)
        }
        None => (
            json!({"resourceType": "ViewDefinition", "status": "active", "resource": "Patient",
                   "select": [{"column": [{"name": "c", "path": text, "collection": true}]}]}),
            patient(),
        ),
    };
    let Ok(definition) = ViewDefinition::parse(&view) else {
        return;
    };
    let first = definition.evaluate(&resource).map_err(|e| e.to_string());
    let second = definition.evaluate(&resource).map_err(|e| e.to_string());
    assert_eq!(first, second, "evaluation is not deterministic");
});
