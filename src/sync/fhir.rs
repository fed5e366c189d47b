//! FHIR R4 search: the first URL of a run, reading a searchset `Bundle` page into rows without
//! re-serializing the resources (each one's JSON is kept byte for byte), and following
//! `Bundle.link[relation=next]` only to the API's own origin. A resource SQLite could not read
//! back (`super::limits`) fails its page.

use std::borrow::Cow;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Deserialize;
use serde_json::value::RawValue;
use url::Url;

use crate::store::PageRow;

/// What one Bundle page holds.
#[derive(Debug)]
pub struct BundlePage {
    pub rows: Vec<PageRow>,
    /// The next page, already resolved against the page's URL.
    pub next: Option<Url>,
    /// The largest `meta.lastUpdated` on the page.
    pub newest: Option<DateTime<Utc>>,
}

/// `{api_base}/{resource}?_count={page_size}`, plus `_lastUpdated=gt{since}` for an
/// incremental run.
pub fn first_url(
    api_base: &Url,
    resource: &str,
    page_size: u32,
    since: Option<DateTime<Utc>>,
) -> Url {
    let mut url = api_base.clone();
    if let Ok(mut segments) = url.path_segments_mut() {
        segments.pop_if_empty().push(resource);
    }
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("_count", &page_size.to_string());
        if let Some(since) = since {
            q.append_pair("_lastUpdated", &format!("gt{}", instant(since)));
        }
    }
    url
}

/// An instant as FHIR writes it, in UTC with milliseconds. Sub-millisecond digits are dropped
/// (rounding down), so a `gt` search never skips a record.
pub fn instant(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Parses a FHIR `instant` (such as `meta.lastUpdated`).
pub fn parse_instant(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

#[derive(Deserialize)]
struct Bundle<'a> {
    #[serde(rename = "resourceType", borrow)]
    resource_type: Cow<'a, str>,
    #[serde(rename = "type", default, borrow)]
    bundle_type: Option<Cow<'a, str>>,
    total: Option<u64>,
    #[serde(default)]
    link: Vec<Link>,
    #[serde(borrow)]
    entry: Option<Vec<Entry<'a>>>,
}

#[derive(Deserialize)]
struct Link {
    relation: String,
    url: String,
}

#[derive(Deserialize)]
struct Entry<'a> {
    #[serde(borrow)]
    resource: Option<&'a RawValue>,
    search: Option<Search>,
}

#[derive(Deserialize)]
struct Search {
    mode: Option<String>,
}

#[derive(Deserialize)]
struct Head<'a> {
    #[serde(rename = "resourceType", borrow)]
    resource_type: Cow<'a, str>,
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
    meta: Option<Meta>,
}

#[derive(Deserialize)]
struct Meta {
    #[serde(rename = "versionId")]
    version_id: Option<String>,
    #[serde(rename = "lastUpdated")]
    last_updated: Option<String>,
}

/// Reads one searchset page of `resource` records. `url` is where it came from (relative
/// `next` links resolve against it); `origin` is the API's, which `next` must keep; `first`
/// says whether this is the run's first page (only a first page may be empty).
pub fn read_page(
    body: &[u8],
    url: &Url,
    origin: &Url,
    resource: &str,
    first: bool,
) -> Result<BundlePage, String> {
    let bundle: Bundle<'_> = serde_json::from_slice(body).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            format!("the page is not valid JSON ({e})")
        } else {
            format!("the page is not a FHIR Bundle ({e})")
        }
    })?;
    if bundle.resource_type == "OperationOutcome" {
        let why = super::fetch::diagnostics(body).unwrap_or_default();
        return Err(format!(
            "the server answered with an OperationOutcome: {why}"
        ));
    }
    if bundle.resource_type != "Bundle" {
        return Err(format!(
            "expected a Bundle, got resourceType `{}`",
            short(&bundle.resource_type)
        ));
    }
    if let Some(t) = bundle.bundle_type.as_deref().filter(|t| *t != "searchset") {
        return Err(format!(
            "expected a searchset Bundle, got type `{}`",
            short(t)
        ));
    }
    let next = match bundle.link.iter().find(|l| l.relation == "next") {
        Some(link) => Some(next_url(&link.url, url, origin)?),
        None => None,
    };
    let entries = match bundle.entry {
        Some(e) if !e.is_empty() => e,
        _ => {
            // An empty result is a first page without `entry`; anywhere else a page without
            // records means the server lost them, and passing over it would lose them too.
            if !first || next.is_some() || bundle.total.is_some_and(|t| t > 0) {
                return Err("the Bundle has no `entry` where records were expected".to_owned());
            }
            Vec::new()
        }
    };
    let mut rows = Vec::with_capacity(entries.len());
    let mut newest: Option<DateTime<Utc>> = None;
    for (i, entry) in entries.into_iter().enumerate() {
        // `include` entries are other resources a search pulled in, `outcome` entries warnings.
        if entry
            .search
            .as_ref()
            .and_then(|s| s.mode.as_deref())
            .is_some_and(|m| m != "match")
        {
            continue;
        }
        let Some(raw) = entry.resource else {
            return Err(format!("entry {i} has no resource"));
        };
        let head: Head<'_> = serde_json::from_str(raw.get())
            .map_err(|e| format!("entry {i}'s resource is not a FHIR resource ({e})"))?;
        if head.resource_type != resource {
            tracing::debug!(resource_type = %short(&head.resource_type), "skipping a resource of another type");
            continue;
        }
        let id = match head.id {
            Some(id) if !id.is_empty() => id.into_owned(),
            _ => return Err(format!("entry {i}'s {resource} has no id")),
        };
        let (version_id, last_updated) = match head.meta {
            Some(m) => (m.version_id, m.last_updated),
            None => (None, None),
        };
        if let Some(text) = &last_updated {
            match parse_instant(text) {
                Some(t) => newest = newest.max(Some(t)),
                None => {
                    return Err(format!(
                        "entry {i}'s meta.lastUpdated is not an instant (`{}`)",
                        short(text)
                    ));
                }
            }
        }
        super::limits::check_record(&id, raw.get())?;
        rows.push(PageRow::new(
            id,
            version_id,
            last_updated,
            raw.get().to_owned(),
        ));
    }
    Ok(BundlePage { rows, next, newest })
}

/// Resolves a `next` link (absolute or relative) and refuses one that leaves the API's origin:
/// the account's token goes with every request.
pub fn next_url(link: &str, current: &Url, origin: &Url) -> Result<Url, String> {
    let next = current
        .join(link)
        .map_err(|e| format!("the next link is not a URL ({e})"))?;
    if next.origin() != origin.origin() {
        return Err(format!(
            "the next link points at {}, not at the API's {}; refusing to send the token there",
            next.origin().ascii_serialization(),
            origin.origin().ascii_serialization()
        ));
    }
    Ok(next)
}

/// Vendor-supplied words in an error message, kept short.
fn short(text: &str) -> String {
    text.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn first_url_appends_the_resource_and_filters() {
        let since = parse_instant("2026-11-20T10:00:00.123456+02:00").unwrap();
        for base in ["https://x.example/fhir", "https://x.example/fhir/"] {
            assert_eq!(
                first_url(&url(base), "Patient", 50, Some(since)).as_str(),
                "https://x.example/fhir/Patient?_count=50&_lastUpdated=gt2026-11-20T08%3A00%3A00.123Z"
            );
        }
        assert_eq!(
            first_url(&url("https://x.example/api"), "Encounter", 100, None).as_str(),
            "https://x.example/api/Encounter?_count=100"
        );
    }

    #[test]
    fn pages_keep_each_resource_byte_for_byte() {
        let body = br#"{"resourceType":"Bundle","type":"searchset","total":3,
          "link":[{"relation":"self","url":"https://x.example/fhir/Patient?_count=2"},
                  {"relation":"next","url":"Patient?_count=2&_page=2"}],
          "entry":[
            {"resource":{"resourceType":"Patient","id":"a","meta":{"versionId":"3","lastUpdated":"2026-11-20T10:00:00Z"},"name":[{"family":"O\u2019Brien"}]},"search":{"mode":"match"}},
            {"resource":{"resourceType":"Patient","id":"b","meta":{"lastUpdated":"2026-11-21T10:00:00.5+01:00"}}},
            {"resource":{"resourceType":"Organization","id":"o1"},"search":{"mode":"include"}}]}"#;
        let here = url("https://x.example/fhir/Patient?_count=2");
        let page = read_page(body, &here, &here, "Patient", true).unwrap();
        assert_eq!(page.rows.len(), 2);
        assert_eq!(page.rows[0].id, "a");
        assert_eq!(page.rows[0].version_id.as_deref(), Some("3"));
        assert!(page.rows[0].data.contains(r#""family":"O\u2019Brien""#));
        assert_eq!(
            page.next.unwrap().as_str(),
            "https://x.example/fhir/Patient?_count=2&_page=2"
        );
        assert_eq!(
            page.newest.map(instant).as_deref(),
            Some("2026-11-21T09:00:00.500Z")
        );
    }

    #[test]
    fn bad_pages_are_refused_with_a_reason() {
        let here = url("https://x.example/fhir/Patient");
        let cases: [(&[u8], bool, &str); 8] = [
            (b"{\"resourceType\":\"Bundle\",\"entry\":[", true, "not valid JSON"),
            (b"[1,2]", true, "not a FHIR Bundle"),
            (br#"{"resourceType":"Patient","id":"x"}"#, true, "expected a Bundle"),
            (br#"{"resourceType":"Bundle","type":"searchset","total":5}"#, true, "no `entry`"),
            (br#"{"resourceType":"Bundle","type":"searchset"}"#, false, "no `entry`"),
            (br#"{"resourceType":"Bundle","entry":[{"resource":{"resourceType":"Patient"}}]}"#, true, "has no id"),
            (br#"{"resourceType":"Bundle","entry":[{"resource":{"resourceType":"Patient","id":"1","meta":{"lastUpdated":"yesterday"}}}]}"#, true, "not an instant"),
            (br#"{"resourceType":"Bundle","link":[{"relation":"next","url":"https://evil.example/fhir/Patient?page=2"}],"entry":[{"resource":{"resourceType":"Patient","id":"1"}}]}"#, true, "refusing to send the token"),
        ];
        for (body, first, expected) in cases {
            let err = read_page(body, &here, &here, "Patient", first).unwrap_err();
            assert!(err.contains(expected), "{expected}: {err}");
        }
        let empty = read_page(
            br#"{"resourceType":"Bundle","type":"searchset","total":0}"#,
            &here,
            &here,
            "Patient",
            true,
        )
        .unwrap();
        assert!(empty.rows.is_empty() && empty.next.is_none());
    }

    #[test]
    fn records_sqlite_could_not_read_fail_the_page_and_nothing_overflows() {
        use super::super::limits::MAX_DEPTH;
        let here = url("https://x.example/fhir/Patient");
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let page = |extension: &str| {
            format!(
                r#"{{"resourceType":"Bundle","type":"searchset","entry":[
                  {{"resource":{{"resourceType":"Patient","id":"fine"}}}},
                  {{"resource":{{"resourceType":"Patient","id":"deep-1","extension":{extension}}}}}]}}"#
            )
        };
        let read = |body: &str| read_page(body.as_bytes(), &here, &here, "Patient", true);
        // The resource plus MAX_DEPTH - 1 arrays: as deep as SQLite reads.
        assert_eq!(read(&page(&deep(MAX_DEPTH - 1))).unwrap().rows.len(), 2);
        for depth in [MAX_DEPTH, 200_000] {
            let err = read(&page(&deep(depth))).unwrap_err();
            assert!(
                err.contains("record `deep-1` nests") && !err.contains("[["),
                "{err}"
            );
        }
        // Deep JSON anywhere else in a page is skipped or refused, and never exhausts the stack.
        let d = deep(200_000);
        let skipped = read(&format!(
            r#"{{"resourceType":"Bundle","meta":{d},"entry":[{{"resource":{{"resourceType":"Organization","id":"o","x":{d}}}}}]}}"#
        ))
        .unwrap();
        assert!(skipped.rows.is_empty());
        for body in [
            d.clone(),
            format!(r#"{{"resourceType":"Bundle","link":{d}}}"#),
            format!(r#"{{"resourceType":"Bundle","entry":{d}}}"#),
            format!(r#"{{"resourceType":"Bundle","entry":[{{"resource":{d}}}]}}"#),
            format!(r#"{{"resourceType":"Bundle","entry":[{{"search":{d},"resource":{{}}}}]}}"#),
            format!(
                r#"{{"resourceType":"Bundle","entry":[{{"resource":{{"resourceType":"Patient","id":{d}}}}}]}}"#
            ),
            format!(
                r#"{{"resourceType":"Bundle","entry":[{{"resource":{{"resourceType":"Patient","id":"x","meta":{{"lastUpdated":{d}}}}}}}]}}"#
            ),
        ] {
            assert!(read(&body).is_err(), "{}", &body[..80]);
        }
    }

    #[test]
    fn next_links_keep_scheme_host_and_port() {
        let api = url("https://x.example/fhir");
        let here = url("https://x.example/fhir/Patient?_count=2");
        assert!(next_url("/fhir?page=2", &here, &api).is_ok());
        assert!(next_url("https://x.example/fhir?page=2", &here, &api).is_ok());
        for bad in [
            "http://x.example/fhir?page=2",
            "https://x.example:8443/fhir?page=2",
            "//other.example/fhir",
        ] {
            assert!(next_url(bad, &here, &api).is_err(), "{bad}");
        }
    }
}
