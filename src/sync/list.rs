//! A paged JSON list (NikoHealth's patients): page URLs from the configured parameters, and the
//! records of a page found by a JSON pointer, each kept as the vendor's JSON byte for byte. A
//! record SQLite could not read back (`super::limits`) fails its page.

use std::borrow::Cow;
use std::collections::HashMap;

use serde_json::value::RawValue;
use url::Url;

use crate::config::ListPaging;
use crate::store::PageRow;

/// The `resources.resource_type` under which list records are stored.
pub const RESOURCE_TYPE: &str = "NikoHealthPatient";

/// The URL of page `number` (counted from `paging.first_page`).
pub fn page_url(api_base: &Url, paging: &ListPaging, page_size: u32, number: u32) -> Url {
    let mut url = api_base.clone();
    if let Ok(mut segments) = url.path_segments_mut() {
        segments.pop_if_empty();
        for part in paging.path.split('/').filter(|p| !p.is_empty()) {
            segments.push(part);
        }
    }
    url.query_pairs_mut()
        .append_pair(&paging.page_param, &number.to_string())
        .append_pair(&paging.page_size_param, &page_size.to_string());
    url
}

/// The records of one page.
pub fn read_page(body: &[u8], paging: &ListPaging) -> Result<Vec<PageRow>, String> {
    let root: &RawValue = serde_json::from_slice(body).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            format!("the page is not valid JSON ({e})")
        } else {
            format!("the page is not a JSON document ({e})")
        }
    })?;
    let mut at = root;
    let mut walked = String::new();
    for token in paging.items.split('/').skip(1) {
        let key = token.replace("~1", "/").replace("~0", "~");
        walked.push('/');
        walked.push_str(token);
        let missing = || format!("the page has nothing at `{walked}` (the job's `items` pointer)");
        at = if let Ok(object) = serde_json::from_str::<HashMap<Cow<'_, str>, &RawValue>>(at.get())
        {
            *object.get(key.as_str()).ok_or_else(missing)?
        } else if let Ok(array) = serde_json::from_str::<Vec<&RawValue>>(at.get()) {
            let index: usize = key.parse().map_err(|_| missing())?;
            *array.get(index).ok_or_else(missing)?
        } else {
            return Err(missing());
        };
    }
    let items: Vec<&RawValue> = serde_json::from_str(at.get()).map_err(|_| {
        format!(
            "`{}` in the page is not an array of records",
            if paging.items.is_empty() {
                "/"
            } else {
                &paging.items
            }
        )
    })?;
    items
        .into_iter()
        .enumerate()
        .map(|(i, raw)| {
            let record: HashMap<Cow<'_, str>, &RawValue> = serde_json::from_str(raw.get())
                .map_err(|_| format!("record {i} is not a JSON object"))?;
            let id = record
                .get(paging.id_field.as_str())
                .and_then(|v| scalar(v))
                .filter(|id| !id.is_empty())
                .ok_or_else(|| format!("record {i} has no `{}`", paging.id_field))?;
            let last_updated = paging
                .updated_field
                .as_deref()
                .and_then(|f| record.get(f))
                .and_then(|v| scalar(v));
            super::limits::check_record(&id, raw.get())?;
            Ok(PageRow::new(id, None, last_updated, raw.get().to_owned()))
        })
        .collect()
}

/// A string or number field as text; `None` for null, objects and arrays.
fn scalar(value: &RawValue) -> Option<String> {
    match serde_json::from_str::<serde_json::Value>(value.get()).ok()? {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paging(items: &str) -> ListPaging {
        ListPaging {
            path: "/api/external/v1/patients".into(),
            page_param: "page".into(),
            page_size_param: "pageSize".into(),
            first_page: 1,
            items: items.into(),
            id_field: "id".into(),
            updated_field: Some("modifiedDate".into()),
        }
    }

    #[test]
    fn page_urls_carry_the_configured_parameters() {
        let base = Url::parse("https://acme.nikohealth.com/").unwrap();
        assert_eq!(
            page_url(&base, &paging("/items"), 50, 3).as_str(),
            "https://acme.nikohealth.com/api/external/v1/patients?page=3&pageSize=50"
        );
    }

    #[test]
    fn records_are_found_by_pointer_and_kept_verbatim() {
        let body = br#"{"totalCount":2,"items":[{"id":17,"lastName":"Ng","modifiedDate":"2026-11-01T00:00:00Z"},{"id":"a-2","lastName":"D\u00edaz"}]}"#;
        let rows = read_page(body, &paging("/items")).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].id, "17");
        assert_eq!(
            rows[0].last_updated.as_deref(),
            Some("2026-11-01T00:00:00Z")
        );
        assert_eq!(rows[1].id, "a-2");
        assert!(rows[1].data.contains(r#""D\u00edaz""#));

        let bare = br#"[{"id":1},{"id":2}]"#;
        assert_eq!(read_page(bare, &paging("")).unwrap().len(), 2);
        let nested = br#"{"data":{"a/b":[{"id":1}]}}"#;
        assert_eq!(read_page(nested, &paging("/data/a~1b")).unwrap().len(), 1);
    }

    #[test]
    fn records_sqlite_could_not_read_fail_the_page_and_nothing_overflows() {
        use super::super::limits::MAX_DEPTH;
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let page = |extra: &str| {
            format!(r#"{{"items":[{{"id":1,"lastName":"Ng"}},{{"id":17,"notes":{extra}}}]}}"#)
        };
        let read = |body: &str| read_page(body.as_bytes(), &paging("/items"));
        // The record plus MAX_DEPTH - 1 arrays: as deep as SQLite reads.
        assert_eq!(read(&page(&deep(MAX_DEPTH - 1))).unwrap().len(), 2);
        for depth in [MAX_DEPTH, 200_000] {
            let err = read(&page(&deep(depth))).unwrap_err();
            assert!(
                err.contains("record `17` nests") && !err.contains("[[") && !err.contains("Ng"),
                "{err}"
            );
        }
        // Deep JSON where the pointer leads, or as an id, is refused without exhausting the stack.
        let d = deep(200_000);
        for (body, expected) in [
            (d.clone(), "nothing at `/items`"),
            (
                format!(r#"{{"items":{d}}}"#),
                "record 0 is not a JSON object",
            ),
            (
                format!(r#"{{"items":[{{"id":{d}}}]}}"#),
                "record 0 has no `id`",
            ),
            (
                format!(r#"{{"items":[{{"id":2,"modifiedDate":{d}}}]}}"#),
                "record `2` nests",
            ),
        ] {
            let err = read(&body).unwrap_err();
            assert!(err.contains(expected), "{expected}: {err}");
        }
    }

    #[test]
    fn bad_pages_name_what_is_wrong() {
        for (body, items, expected) in [
            (&b"{\"items\": ["[..], "/items", "not valid JSON"),
            (br#"{"results":[]}"#, "/items", "nothing at `/items`"),
            (br#"{"items":{"id":1}}"#, "/items", "not an array"),
            (
                br#"{"items":[{"name":"x"}]}"#,
                "/items",
                "record 0 has no `id`",
            ),
            (
                br#"{"items":[3]}"#,
                "/items",
                "record 0 is not a JSON object",
            ),
        ] {
            let err = read_page(body, &paging(items)).unwrap_err();
            assert!(err.contains(expected), "{expected}: {err}");
        }
    }
}
