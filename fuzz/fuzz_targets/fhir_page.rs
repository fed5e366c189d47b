//! Data pages: a FHIR searchset `Bundle` (`sync::fhir::read_page`) and a NikoHealth-style
//! list (`sync::list::read_page`), from the same bytes.
//!
//! The first input byte is control: bit 0 is `first` (the run's first page), bits 1–2 pick the
//! list's paging; the rest is the body. Checks: each row's `data` is the record's JSON (valid,
//! the record's own id and type), ids are non-empty, and a FHIR `next` link keeps the API's
//! scheme, host and port (the token goes with it).

#![no_main]

use std::collections::BTreeMap;
use std::sync::LazyLock;

use ehrsync::config::ListPaging;
use ehrsync::sync::{fhir, list};
use libfuzzer_sys::fuzz_target;
use serde::de::IgnoredAny;
use serde_json::Value;
use serde_json::value::RawValue;
use url::Url;

/// Where the page came from, and the API's origin.
static URLS: LazyLock<(Url, Url)> = LazyLock::new(|| {
    (
        Url::parse("http://127.0.0.1:1/fhir/Patient?_count=10").expect("a URL"),
        Url::parse("http://127.0.0.1:1/fhir").expect("a URL"),
    )
});

const RESOURCE: &str = "Patient";

/// Pagings as configs write them: NikoHealth's defaults, a bare array, a nested pointer with
/// an escaped `/`, and an array index in the pointer.
static PAGINGS: LazyLock<[ListPaging; 4]> = LazyLock::new(|| {
    let paging = |items: &str, id: &str, updated: Option<&str>| ListPaging {
        path: "/api/external/v1/patients".to_owned(),
        page_param: "page".to_owned(),
        page_size_param: "pageSize".to_owned(),
        first_page: 1,
        items: items.to_owned(),
        id_field: id.to_owned(),
        updated_field: updated.map(str::to_owned),
    };
    [
        paging("/items", "id", Some("modifiedDate")),
        paging("", "id", None),
        paging("/data/a~1b", "patientId", Some("lastModified")),
        paging("/pages/0/records", "Id", Some("updated")),
    ]
});

fuzz_target!(|data: &[u8]| {
    let Some((&control, body)) = data.split_first() else {
        return;
    };
    check_fhir(body, control & 1 == 1);
    check_list(body, &PAGINGS[usize::from((control >> 1) & 3)]);
});

fn check_fhir(body: &[u8], first: bool) {
    let (url, origin) = &*URLS;
    let page = match fhir::read_page(body, url, origin, RESOURCE, first) {
        Ok(page) => page,
        Err(e) => {
            assert!(!e.is_empty());
            return;
        }
    };
    let mut newest = None;
    for row in &page.rows {
        assert!(!row.id.is_empty(), "{row:?}");
        let record = object(&row.data);
        assert_eq!(field(&record, "resourceType"), Some(Value::from(RESOURCE)));
        assert_eq!(field(&record, "id"), Some(Value::from(row.id.as_str())));
        let meta = match record.get("meta").map(|m| m.get()) {
            None | Some("null") => BTreeMap::new(),
            Some(m) => object(m),
        };
        let text = |name: &str| field(&meta, name).and_then(|v| v.as_str().map(str::to_owned));
        assert_eq!(row.version_id, text("versionId"));
        assert_eq!(row.last_updated, text("lastUpdated"));
        if let Some(text) = &row.last_updated {
            let t = fhir::parse_instant(text).expect("a stored lastUpdated is an instant");
            newest = newest.max(Some(t));
        }
    }
    assert_eq!(page.newest, newest);
    if let Some(next) = &page.next {
        assert_eq!(next.scheme(), origin.scheme(), "{next}");
        assert_eq!(next.host(), origin.host(), "{next}");
        assert_eq!(
            next.port_or_known_default(),
            origin.port_or_known_default(),
            "{next}"
        );
    }
}

fn check_list(body: &[u8], paging: &ListPaging) {
    let rows = match list::read_page(body, paging) {
        Ok(rows) => rows,
        Err(e) => {
            assert!(!e.is_empty());
            return;
        }
    };
    for row in &rows {
        assert!(!row.id.is_empty(), "{row:?}");
        assert_eq!(row.version_id, None);
        let record = object(&row.data);
        assert_eq!(
            scalar(field(&record, &paging.id_field)),
            Some(row.id.clone())
        );
        let updated = paging
            .updated_field
            .as_deref()
            .and_then(|f| scalar(field(&record, f)));
        assert_eq!(row.last_updated, updated);
    }
}

/// A JSON object, its members kept raw. A row's `data` must be one.
///
/// Valid JSON, checked by its grammar: `RawValue` keeps numbers beyond f64 (`1e400`) verbatim,
/// which is valid JSON that SQLite's JSON functions read but `serde_json::Value` refuses, so
/// only the members looked at are read as `Value`.
fn object(json: &str) -> BTreeMap<String, Box<RawValue>> {
    if let Err(e) = serde_json::from_str::<IgnoredAny>(json) {
        panic!("not valid JSON ({e}): {json:?}");
    }
    match serde_json::from_str(json) {
        Ok(map) => map,
        Err(e) => panic!("not a JSON object ({e}): {json:?}"),
    }
}

/// A member as a `Value`; `None` when absent or beyond what `Value` holds.
fn field(object: &BTreeMap<String, Box<RawValue>>, name: &str) -> Option<Value> {
    serde_json::from_str(object.get(name)?.get()).ok()
}

/// A string or number field as text, as the list reader takes ids.
fn scalar(value: Option<Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}
