//! Runs the official SQL on FHIR v2 test suite (`tests/sql-on-fhir/*.json`) against
//! `ehrsync::views::view`, prints `file: passed/total` per file, and fails on any case that fails
//! without being listed in [`KNOWN_FAILURES`] — or that passes while listed there.

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::path::Path;

use ehrsync::views::partial;
use ehrsync::views::view::{ViewDefinition, ViewError};
use serde_json::{Map, Value};

/// Cases expected to fail: (file, case title, why the suite is wrong or out of scope).
const KNOWN_FAILURES: &[(&str, &str, &str)] = &[];

#[test]
fn sql_on_fhir_suite() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sql-on-fhir");
    let mut files: Vec<_> = fs::read_dir(&dir)
        .expect("the suite directory is readable")
        .map(|entry| entry.expect("the suite directory is listable").path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 22, "the suite has 22 files");

    let mut report = String::from("SQL on FHIR v2 test suite\n");
    let mut problems = Vec::new();
    let (mut passed_total, mut total) = (0, 0);
    for path in &files {
        let file = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("file name");
        let text = fs::read_to_string(path).expect("a suite file is readable");
        let suite: Value = serde_json::from_str(&text).expect("a suite file is JSON");
        let resources = suite["resources"].as_array().expect("resources");
        let cases = suite["tests"].as_array().expect("tests");
        let mut passed = 0;
        for case in cases {
            let title = case["title"].as_str().expect("title");
            let known = KNOWN_FAILURES
                .iter()
                .find(|(f, t, _)| *f == file && *t == title);
            match (run_case(case, resources), known) {
                (Ok(()), None) => passed += 1,
                (Ok(()), Some(_)) => problems.push(format!(
                    "{file}: '{title}' passes but is listed in KNOWN_FAILURES"
                )),
                (Err(e), None) => problems.push(format!("{file}: '{title}': {e}")),
                (Err(_), Some(_)) => {}
            }
        }
        passed_total += passed;
        total += cases.len();
        writeln!(report, "  {file:<24} {passed:>3}/{}", cases.len()).expect("write to a String");
    }
    writeln!(
        report,
        "  {:<24} {passed_total:>3}/{total} ({} known failures)",
        "total",
        KNOWN_FAILURES.len()
    )
    .expect("write to a String");
    // Straight to stderr, past the test harness's capture, so the table shows on every run.
    std::io::stderr()
        .write_all(report.as_bytes())
        .expect("stderr is writable");
    assert_eq!(total, 134, "the suite has 134 cases");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Runs one case: `Err` says how the implementation disagrees with it.
///
/// Where the view names the members it reads, each resource is evaluated twice, as a whole
/// and as the pull builds it (only those members, `views::partial`): the two must agree, and
/// the partial one is what is checked against the case.
fn run_case(case: &Value, resources: &[Value]) -> Result<(), String> {
    let outcome = ViewDefinition::parse(&case["view"]).and_then(|view| {
        let members = view.resource_members();
        let mut rows = Vec::new();
        for resource in resources {
            let whole = view.evaluate(resource);
            let rows_of = match &members {
                None => whole?,
                Some(members) => {
                    let text = resource.to_string();
                    let wanted = partial::Wanted {
                        fields: &[],
                        members: &[members],
                    };
                    let part = partial::parse(&text, &wanted).expect("a suite resource is JSON");
                    let from_part = view.evaluate(&part);
                    assert_eq!(
                        from_part.as_ref().map_err(ToString::to_string),
                        whole.as_ref().map_err(ToString::to_string),
                        "{}: the members {members:?} give other rows than the whole resource",
                        case["title"]
                    );
                    from_part?
                }
            };
            rows.extend(rows_of.into_iter().map(|row| {
                let names = view.columns().iter().map(|c| c.name.clone());
                Value::Object(names.zip(row).collect::<Map<_, _>>())
            }));
        }
        Ok::<_, ViewError>((view, rows))
    });
    if case.get("expectError") == Some(&Value::Bool(true)) {
        return match outcome {
            Err(_) => Ok(()),
            Ok(_) => Err("expected an error, got rows".into()),
        };
    }
    let (view, rows) = outcome.map_err(|e| format!("unexpected error: {e}"))?;
    if let Some(expected) = case.get("expectColumns") {
        let names: Vec<Value> = view
            .columns()
            .iter()
            .map(|c| c.name.clone().into())
            .collect();
        if expected.as_array() != Some(&names) {
            return Err(format!("columns {names:?}, expected {expected}"));
        }
    }
    if let Some(count) = case.get("expectCount").and_then(Value::as_u64) {
        if rows.len() as u64 != count {
            return Err(format!("{} rows, expected {count}", rows.len()));
        }
        return Ok(());
    }
    let expected = case["expect"]
        .as_array()
        .ok_or("the case expects nothing")?;
    let mut unmatched: Vec<&Value> = rows.iter().collect();
    for row in expected {
        let position = unmatched.iter().position(|actual| json_equal(actual, row));
        match position {
            Some(i) => {
                unmatched.swap_remove(i);
            }
            None => {
                return Err(format!(
                    "missing row {row}; got {}",
                    Value::from(rows.clone())
                ));
            }
        }
    }
    if unmatched.is_empty() {
        Ok(())
    } else {
        Err(format!("unexpected rows {unmatched:?}"))
    }
}

/// JSON equality with numbers compared by value (`1 == 1.0`).
fn json_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_equal(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_equal(v, w)))
        }
        _ => a == b,
    }
}
