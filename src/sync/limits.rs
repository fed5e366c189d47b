//! What SQLite can read back: records beyond its limits are refused when their page is read.
//!
//! Every view over `resources.data` (`patients` above all) parses each row's JSON, and a single
//! row SQLite's JSON parser refuses makes the whole query fail with `malformed JSON`, for every
//! account. serde_json does not catch such a record: pages are read with borrowed `RawValue`s,
//! and skipping over a value (`RawValue`, ignored fields) is iterative in serde_json, with no
//! depth limit (its limit of 128 applies only to values it builds). A 200,000-deep array thus
//! passes serde_json, and without the check here it was stored as a success.
//!
//! The limits are those of the bundled SQLite (libsqlite3-sys 0.37: SQLite 3.51.3, compiled
//! without `SQLITE_JSON_MAX_DEPTH` or `SQLITE_MAX_LENGTH` overrides); the tests below measure
//! them against that build, so an upgrade that changes them fails a test.

/// The deepest nesting of arrays and objects SQLite's JSON functions parse: `JSON_MAX_DEPTH` in
/// sqlite3.c (2000 before SQLite 3.42, 1000 since). The record itself counts as one level.
pub const MAX_DEPTH: usize = 1000;

/// The longest text SQLite stores: `SQLITE_MAX_LENGTH`, the default `SQLITE_LIMIT_LENGTH`. A
/// longer value fails its INSERT (`string or blob too big`). SQLite's JSON functions have no
/// size limit of their own. Pages are capped at `fetch::MAX_PAGE_BYTES` (64 MiB) today, so this
/// guards against that cap being raised.
pub const MAX_BYTES: usize = 1_000_000_000;

/// Refuses a record that SQLite could not store or its JSON functions could not parse. The
/// error names the record by `id` (shortened) and never quotes its content.
pub fn check_record(id: &str, json: &str) -> Result<(), String> {
    check_with(id, json, MAX_DEPTH, MAX_BYTES)
}

fn check_with(id: &str, json: &str, max_depth: usize, max_bytes: usize) -> Result<(), String> {
    let refused = |what: String| {
        format!(
            "record `{}` {what}; none of this page's records were stored. Ask the vendor to \
             correct the record: until then every run of this job stops at this page",
            id.chars().take(64).collect::<String>()
        )
    };
    if json.len() > max_bytes {
        return Err(refused(format!(
            "is {} bytes long, more than the {max_bytes} SQLite stores in one value",
            json.len()
        )));
    }
    if nesting(json, max_depth) > max_depth {
        return Err(refused(format!(
            "nests arrays or objects more than {max_depth} levels deep, deeper than SQLite's \
             JSON functions read: stored, it would make the `patients` view (and every query \
             of the stored JSON) fail for all accounts"
        )));
    }
    Ok(())
}

/// How deeply `json` (valid JSON) nests arrays and objects, counted up to `limit + 1` and no
/// further. A loop over the bytes, so no depth can exhaust the stack.
fn nesting(json: &str, limit: usize) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &b in json.as_bytes() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > deepest {
                    deepest = depth;
                    if deepest > limit {
                        break;
                    }
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `depth` nested arrays.
    fn deep(depth: usize) -> String {
        format!("{}{}", "[".repeat(depth), "]".repeat(depth))
    }

    /// A Patient whose `extension` holds `depth - 1` nested arrays: `depth` levels in all.
    fn patient(depth: usize) -> String {
        format!(
            r#"{{"resourceType":"Patient","id":"p1","name":[{{"family":"Ng"}}],"extension":{}}}"#,
            deep(depth - 1)
        )
    }

    #[test]
    fn the_limits_are_those_of_the_bundled_sqlite() {
        let db = rusqlite::Connection::open_in_memory().unwrap();
        let version: String = db
            .query_row("SELECT sqlite_version()", [], |r| r.get(0))
            .unwrap();
        let valid = |json: &str| -> i64 {
            db.query_row("SELECT json_valid(?1)", [json], |r| r.get(0))
                .unwrap()
        };
        // The boundary, for bare arrays and for a record shaped as stored.
        for make in [deep as fn(usize) -> String, patient] {
            assert_eq!(valid(&make(MAX_DEPTH)), 1, "SQLite {version}");
            assert_eq!(valid(&make(MAX_DEPTH + 1)), 0, "SQLite {version}");
        }
        // What the `patients` view does with a row: json_extract fails on the whole text.
        let family = |json: &str| {
            db.query_row("SELECT json_extract(?1, '$.name[0].family')", [json], |r| {
                r.get::<_, String>(0)
            })
        };
        assert_eq!(family(&patient(MAX_DEPTH)).unwrap(), "Ng");
        let err = family(&patient(MAX_DEPTH + 1)).unwrap_err().to_string();
        assert!(err.contains("malformed JSON"), "{err}");
        let err = family(&patient(200_000)).unwrap_err().to_string();
        assert!(err.contains("malformed JSON"), "{err}");
        // The length limit: zeroblob values take no memory, yet are checked against it.
        let blob = |n: usize| {
            db.query_row("SELECT typeof(zeroblob(?1))", [n as i64], |r| {
                r.get::<_, String>(0)
            })
        };
        assert_eq!(blob(MAX_BYTES).unwrap(), "blob");
        let err = blob(MAX_BYTES + 1).unwrap_err().to_string();
        assert!(err.contains("too big"), "{err}");
        // Depth is the only difference in what the two parsers take: text serde_json accepts
        // near the edges of the grammar, SQLite reads too.
        for json in [
            r#"{"a":"\ud800","b":"\u0000","c":1e999,"d":-0,"e":123456789012345678901234567890}"#,
            r#"{"":{"":[]},"k":"\"]]]}}}\\","k":2}"#,
        ] {
            assert!(serde_json::from_str::<&serde_json::value::RawValue>(json).is_ok());
            assert_eq!(valid(json), 1, "{json}");
        }
    }

    #[test]
    fn depth_is_counted_outside_strings_only() {
        assert_eq!(nesting(r#"{"a":[1,{"b":[]}],"c":{}}"#, 10), 4);
        assert_eq!(nesting(r#"["[[[[\"[[[", "\\", []]"#, 10), 2);
        assert_eq!(nesting("3", 10), 0);
        // Counting stops past the limit.
        assert_eq!(nesting(&deep(200_000), MAX_DEPTH), MAX_DEPTH + 1);
    }

    #[test]
    fn records_beyond_the_limits_are_refused_by_id_without_their_content() {
        assert!(check_record("p1", &patient(MAX_DEPTH)).is_ok());
        let err = check_record("p1", &patient(MAX_DEPTH + 1)).unwrap_err();
        assert!(
            err.contains("record `p1`") && err.contains("1000 levels"),
            "{err}"
        );
        assert!(!err.contains("[[") && !err.contains("Ng"), "{err}");
        let err = check_record(&"x".repeat(500), &patient(200_000)).unwrap_err();
        assert!(!err.contains(&"x".repeat(65)), "ids are shortened: {err}");
        let err = check_with("p2", r#"{"id":"p2","name":"Ng"}"#, 10, 16).unwrap_err();
        assert!(err.contains("record `p2` is 23 bytes long"), "{err}");
        assert!(!err.contains("Ng"), "{err}");
    }
}
