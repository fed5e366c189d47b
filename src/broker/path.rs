//! Where a proxied call may go: the part of the broker's request path after
//! `/v1/accounts/{account}/api/`, as the client sent it (still percent-encoded), checked and
//! joined onto the account's `api_base`. Whatever the client writes, the result is below
//! `api_base` on its origin, or the request is refused: the broker's token must never reach
//! another host or another part of the host.
//!
//! The checks work on the raw text, before anything decodes it, and refuse rather than
//! normalise: a client that writes `..`, an encoded dot or slash, a doubled slash or a
//! backslash gets 400, never a guess at what it meant. After joining, the URL is parsed again
//! and its origin and path prefix compared with `api_base`'s (a second, independent check).

use url::Url;

/// Why a proxied path is refused (the client sees this text; it holds nothing secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path has a `.` or `..` segment")]
    DotSegment,
    #[error("the path has an empty segment (`//`)")]
    EmptySegment,
    #[error("the path has a percent-encoded `.`, `/`, `\\`, `%` or control character")]
    EncodedSeparator,
    #[error("the path has a backslash")]
    Backslash,
    #[error("the path has a character that must be percent-encoded")]
    BadCharacter,
    #[error("the path has a malformed percent-encoding")]
    BadPercent,
    #[error("the path names a scheme or host (`scheme:` in the first segment)")]
    Absolute,
    #[error("the query has a character that must be percent-encoded")]
    BadQuery,
    #[error("the request leaves the account's api_base")]
    LeavesBase,
}

/// Checks `path` (what follows `/api/`, raw) and `query` (raw, without `?`) and joins them onto
/// `base`: `https://host/fhir` + `Patient/1` → `https://host/fhir/Patient/1`.
pub fn target(base: &Url, path: &str, query: Option<&str>) -> Result<Url, PathError> {
    check_path(path)?;
    if let Some(q) = query {
        check_query(q)?;
    }
    let mut text = base
        .as_str()
        .split(['?', '#'])
        .next()
        .unwrap_or("")
        .to_owned();
    if !text.ends_with('/') {
        text.push('/');
    }
    text.push_str(path);
    if let Some(q) = query.filter(|q| !q.is_empty()) {
        text.push('?');
        text.push_str(q);
    }
    let url = Url::parse(&text).map_err(|_| PathError::LeavesBase)?;
    // The second check: the parsed URL must keep api_base's origin and sit below its path.
    if within_base(base, &url).is_none() || url.fragment().is_some() {
        return Err(PathError::LeavesBase);
    }
    Ok(url)
}

/// The path of `url` below `base`'s (`https://host/fhir/` + `Patient/1` → `Patient/1`), when
/// `url` has `base`'s origin, no user information, and sits below its path; else `None`. Both
/// a client's target and a redirect's `Location` pass it.
pub fn within_base<'u>(base: &Url, url: &'u Url) -> Option<&'u str> {
    let same_origin = url.scheme() == base.scheme()
        && url.host() == base.host()
        && url.port_or_known_default() == base.port_or_known_default()
        && url.username().is_empty()
        && url.password().is_none();
    let base_path = base.path();
    let rest = url.path().strip_prefix(base_path)?;
    // Below the base's path: after its `/`, or after the `/` that follows it.
    let rest = if base_path.ends_with('/') {
        rest
    } else {
        rest.strip_prefix('/')?
    };
    same_origin.then_some(rest)
}

/// The raw path's rules: RFC 3986 path characters only; no dot or empty segment; no encoded
/// `.`, `/`, `\`, `%` (a second decoding) or control character; no backslash; no scheme.
pub fn check_path(path: &str) -> Result<(), PathError> {
    if path.is_empty() {
        return Ok(());
    }
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or(PathError::BadPercent)?;
                let hex = std::str::from_utf8(hex).map_err(|_| PathError::BadPercent)?;
                let value = u8::from_str_radix(hex, 16).map_err(|_| PathError::BadPercent)?;
                if matches!(value, b'.' | b'/' | b'\\' | b'%') || value < 0x20 || value == 0x7f {
                    return Err(PathError::EncodedSeparator);
                }
                i += 3;
                continue;
            }
            b'\\' => return Err(PathError::Backslash),
            _ if is_pchar(b) || b == b'/' => {}
            _ => return Err(PathError::BadCharacter),
        }
        i += 1;
    }
    for (n, segment) in path.split('/').enumerate() {
        match segment {
            "." | ".." => return Err(PathError::DotSegment),
            // A trailing slash (`Patient/`) is a segment of its own right; others are not.
            "" if n + 1 < path.split('/').count() || n == 0 => {
                return Err(PathError::EmptySegment);
            }
            s if n == 0 && s.contains(':') => return Err(PathError::Absolute),
            _ => {}
        }
    }
    Ok(())
}

/// A query keeps its own syntax (the API reads it), but only in characters a URI allows.
fn check_query(query: &str) -> Result<(), PathError> {
    let ok = query
        .bytes()
        .all(|b| is_pchar(b) || matches!(b, b'/' | b'?' | b'%'));
    if ok { Ok(()) } else { Err(PathError::BadQuery) }
}

/// RFC 3986 `pchar` less `%` (handled by the caller): unreserved, sub-delims, `:` and `@`.
fn is_pchar(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Url {
        Url::parse("https://api.example.org/fhir/r4").unwrap()
    }

    fn ok(path: &str, query: Option<&str>) -> String {
        target(&base(), path, query).unwrap().to_string()
    }

    #[test]
    fn within_base_needs_the_origin_and_a_path_below_the_base() {
        let base = base();
        let rest = |u: &str| within_base(&base, &Url::parse(u).unwrap()).map(str::to_owned);
        assert_eq!(
            rest("https://api.example.org/fhir/r4/Patient/1?x=1").as_deref(),
            Some("Patient/1")
        );
        assert_eq!(
            rest("https://api.example.org:443/fhir/r4/").as_deref(),
            Some("")
        );
        for outside in [
            "https://api.example.org/fhir/r4",
            "https://api.example.org/fhir/r4x/Patient",
            "https://api.example.org/fhir/Patient",
            "http://api.example.org/fhir/r4/Patient",
            "https://api.example.org:8443/fhir/r4/Patient",
            "https://evil.example.org/fhir/r4/Patient",
            "https://user:pw@api.example.org/fhir/r4/Patient",
        ] {
            assert_eq!(rest(outside), None, "{outside}");
        }
    }

    #[test]
    fn paths_join_below_api_base() {
        assert_eq!(
            ok("Patient/1", None),
            "https://api.example.org/fhir/r4/Patient/1"
        );
        assert_eq!(ok("", None), "https://api.example.org/fhir/r4/");
        assert_eq!(
            ok("Patient", Some("name=O%27Brien&_count=10")),
            "https://api.example.org/fhir/r4/Patient?name=O%27Brien&_count=10"
        );
        assert_eq!(
            ok("Patient/", None),
            "https://api.example.org/fhir/r4/Patient/"
        );
        assert_eq!(
            ok("Binary/a%20b", None),
            "https://api.example.org/fhir/r4/Binary/a%20b"
        );
        let slash = Url::parse("https://api.example.org/fhir/").unwrap();
        assert_eq!(
            target(&slash, "metadata", None).unwrap().as_str(),
            "https://api.example.org/fhir/metadata"
        );
    }

    #[test]
    fn escapes_are_refused() {
        for (path, error) in [
            ("../admin", PathError::DotSegment),
            ("Patient/../../admin", PathError::DotSegment),
            ("./Patient", PathError::DotSegment),
            ("%2e%2e/admin", PathError::EncodedSeparator),
            ("%2E%2E/admin", PathError::EncodedSeparator),
            (".%2e/admin", PathError::EncodedSeparator),
            ("Patient%2f..%2f..%2fadmin", PathError::EncodedSeparator),
            ("Patient%5c..", PathError::EncodedSeparator),
            ("Patient%252e%252e", PathError::EncodedSeparator),
            ("Patient%00", PathError::EncodedSeparator),
            ("/evil.example/x", PathError::EmptySegment),
            ("Patient//x", PathError::EmptySegment),
            ("https:/evil.example/", PathError::Absolute),
            ("https:", PathError::Absolute),
            ("Patient\\..\\x", PathError::Backslash),
            ("Patient/a b", PathError::BadCharacter),
            ("Patient/\u{e9}", PathError::BadCharacter),
            ("Patient/%zz", PathError::BadPercent),
            ("Patient/%2", PathError::BadPercent),
        ] {
            assert_eq!(target(&base(), path, None), Err(error), "{path}");
        }
        assert_eq!(
            target(&base(), "Patient", Some("a=b#frag")),
            Err(PathError::BadQuery)
        );
        assert_eq!(
            target(&base(), "Patient", Some("a=b c")),
            Err(PathError::BadQuery)
        );
    }

    #[test]
    fn a_colon_after_the_first_segment_is_a_path_character() {
        assert_eq!(
            ok("Patient/urn:x", None),
            "https://api.example.org/fhir/r4/Patient/urn:x"
        );
    }
}
