//! The broker's proxied paths (`broker::path::target`): whatever a client writes after
//! `/v1/accounts/{account}/api/`, the URL the token is sent to stays on `api_base`'s origin
//! and below its path, unchanged from what was checked.
//!
//! The first input byte picks `api_base`; the rest is the raw request target's tail: up to the
//! first `?` the path, after it the query. Checks on every accepted URL: same scheme, host and
//! port as `api_base`, no user info or fragment, the path is `api_base`'s path followed by
//! exactly the input path (nothing decoded or normalised away), no `.`/`..` segment and no
//! encoded `.`, `/`, `\` in it; and parsing the URL's text again gives the same URL.

#![no_main]

use std::sync::LazyLock;

use ehrsync::broker::path::{check_path, target};
use libfuzzer_sys::fuzz_target;
use url::Url;

static BASES: LazyLock<[Url; 4]> = LazyLock::new(|| {
    [
        "https://api.example.org/fhir/r4",
        "http://127.0.0.1:1/nextech/api/",
        "https://acme.nikohealth.com/",
        "https://host:8443/a%20b/fhir",
    ]
    .map(|u| Url::parse(u).expect("a URL"))
});

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let base = &BASES[usize::from(pick) % BASES.len()];
    let text = String::from_utf8_lossy(rest);
    let (path, query) = match text.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (text.as_ref(), None),
    };
    let Ok(url) = target(base, path, query) else {
        return;
    };
    assert!(check_path(path).is_ok(), "accepted a path check_path refuses");
    assert_eq!(url.scheme(), base.scheme(), "{url}");
    assert_eq!(url.host(), base.host(), "{url}");
    assert_eq!(url.port_or_known_default(), base.port_or_known_default(), "{url}");
    assert!(url.username().is_empty() && url.password().is_none(), "{url}");
    assert!(url.fragment().is_none(), "{url}");
    let mut base_path = base.path().to_owned();
    if !base_path.ends_with('/') {
        base_path.push('/');
    }
    assert_eq!(url.path(), format!("{base_path}{path}"), "the path was changed");
    for segment in path.split('/') {
        assert!(segment != "." && segment != "..", "{url}");
    }
    let lower = path.to_ascii_lowercase();
    for encoded in ["%2e", "%2f", "%5c", "%25", "%00"] {
        assert!(!lower.contains(encoded), "{url}");
    }
    assert!(!path.contains('\\') && !path.contains("//"), "{url}");
    assert_eq!(Url::parse(url.as_str()).ok().as_ref(), Some(&url), "{url}");
});
