//! The HTTP plumbing every outgoing request shares: the client builder, bodies read up to a
//! limit, transport failures described for an operator, and `Retry-After`.
//!
//! Token requests, API pages and discovery documents all go through these, so the rules hold for
//! each alike. A description names what failed and where (the URL without its query) and never
//! the request, whose body and headers hold client secrets, passwords and tokens. `Retry-After`
//! is parsed here but resolved against a time the caller passes in, so an HTTP-date means the same
//! thing on the engine's clock as every other deadline (simulated time in tests).

use std::fmt;
use std::time::{Duration, UNIX_EPOCH};

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use url::Url;

use crate::token::Timestamp;

/// The certificate authorities of `agent.ca_file`, trusted by every client built after
/// [`trust_extra_roots`] (once per process, at start), and by `doctor`'s own TLS check.
static EXTRA_ROOTS: std::sync::OnceLock<Vec<CertificateDer<'static>>> = std::sync::OnceLock::new();

/// Trusts the PEM certificates in `path` beside the system's roots, for every HTTP client this
/// process builds from now on. Returns how many were read; the first call wins.
pub fn trust_extra_roots(path: &std::path::Path) -> Result<usize, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not a PEM certificate bundle: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    // Checked here, once, so that building a client later cannot fail on them.
    for cert in &certs {
        reqwest::Certificate::from_der(cert).map_err(|e| {
            format!(
                "{} holds a certificate that cannot be read: {e}",
                path.display()
            )
        })?;
    }
    let n = certs.len();
    let _ = EXTRA_ROOTS.set(certs);
    Ok(n)
}

/// The roots [`trust_extra_roots`] added (none when `agent.ca_file` is unset).
pub fn extra_roots() -> &'static [CertificateDer<'static>] {
    EXTRA_ROOTS.get().map_or(&[], Vec::as_slice)
}

/// What every ehrsync HTTP client has: rustls on ring, a per-request deadline, ehrsync's user
/// agent, and no redirects (one would carry credentials or a token wherever it points); plus
/// the extra roots of `agent.ca_file`, if any.
pub fn client_builder(timeout: Duration) -> reqwest::ClientBuilder {
    // ring, not aws-lc-rs: no cmake or NASM in the build, and it cross-compiles for Windows.
    // Installing twice is harmless (the first provider stays), hence the ignored result.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Each was read by `reqwest::Certificate::from_der` in `trust_extra_roots` already.
    let certs = extra_roots()
        .iter()
        .filter_map(|der| reqwest::Certificate::from_der(der).ok());
    let builder = reqwest::Client::builder().tls_certs_merge(certs);
    builder
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .user_agent(concat!("ehrsync/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none())
}

/// Why an HTTP client could not be built, in words that name the fix where one is known.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ClientSetupError(String);

/// Builds `builder`'s client. The usual failure on Linux is a machine without CA certificates
/// (a minimal install or container image without the `ca-certificates` package), which
/// reqwest reports only as "builder error" with the cause beneath.
pub fn build(builder: reqwest::ClientBuilder) -> Result<reqwest::Client, ClientSetupError> {
    builder.build().map_err(|e| {
        let text = format!("{e}{}", causes(&e));
        if text.contains("No CA certificates") {
            ClientSetupError(format!(
                "no CA certificates were found on this machine, so no HTTPS server can be \
                 trusted ({text}): install them (Debian and Ubuntu: `apt install \
                 ca-certificates`; they go to /etc/ssl/certs), or name a PEM file of the CAs \
                 to trust in agent.ca_file"
            ))
        } else {
            ClientSetupError(text)
        }
    })
}

/// How a request failed to get a (complete) answer. Callers act on the kind (a connection that
/// never opened may mean a moved endpoint), so it is a type, not words in the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// No connection could be opened (DNS, refused, TLS handshake, connect timeout).
    Connect,
    /// Connected, but the answer did not arrive within the deadline.
    Timeout,
    /// Anything else: the connection closed mid-answer, a body that would not decode.
    Other,
}

/// Why a connection could not be opened, as far as the error's causes tell, with the one thing
/// to check for each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectProblem {
    /// The host name did not resolve.
    Dns,
    /// Nothing accepted the connection at that address and port.
    Refused,
    /// The TLS handshake failed: the certificate (untrusted issuer, wrong name, expired) or the
    /// protocol; rustls's words for it.
    Tls(String),
    /// No answer to the connection attempt in time.
    TimedOut,
    /// Something else (the causes say what).
    Other,
}

impl ConnectProblem {
    /// Reads the class from `e`'s chain of causes.
    fn of(e: &(dyn std::error::Error + 'static)) -> ConnectProblem {
        let mut source = Some(e);
        while let Some(err) = source {
            if let Some(io) = err.downcast_ref::<std::io::Error>() {
                if let Some(tls) = io
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                {
                    return ConnectProblem::Tls(tls.to_string());
                }
                match io.kind() {
                    std::io::ErrorKind::ConnectionRefused => return ConnectProblem::Refused,
                    std::io::ErrorKind::TimedOut => return ConnectProblem::TimedOut,
                    _ => {}
                }
            }
            if let Some(tls) = err.downcast_ref::<rustls::Error>() {
                return ConnectProblem::Tls(tls.to_string());
            }
            // hyper-util's resolver wraps the system's lookup error in its own words, and the
            // TLS connector hands rustls's error on as text inside its own.
            let text = err.to_string();
            if let Some(at) = text.find("invalid peer certificate") {
                return ConnectProblem::Tls(text[at..].to_owned());
            }
            if text.starts_with("dns error") || text.contains("failed to lookup address") {
                return ConnectProblem::Dns;
            }
            source = err.source();
        }
        ConnectProblem::Other
    }

    /// The class and the one thing to check, for `host:port`.
    pub fn explain(&self, host: &str, port: &str) -> String {
        match self {
            ConnectProblem::Dns => format!(
                "DNS lookup of {host} failed: check the host name in the config and this server's DNS"
            ),
            ConnectProblem::Refused => format!(
                "connection refused by {host}:{port}: check the address and port, that the service runs, and that no firewall rejects it"
            ),
            ConnectProblem::Tls(why) => format!(
                "TLS with {host}:{port} failed ({why}): check the certificate; behind a TLS-inspecting firewall or proxy, this server must trust its CA"
            ),
            ConnectProblem::TimedOut => format!(
                "connecting to {host}:{port} timed out: check firewalls, or set HTTPS_PROXY if outbound connections must go through a proxy"
            ),
            ConnectProblem::Other => format!("cannot connect to {host}:{port}"),
        }
    }
}

/// A request that got no usable answer, described without the request itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportError {
    pub kind: TransportKind,
    /// For [`TransportKind::Connect`]: why, as far as the causes tell.
    pub problem: ConnectProblem,
    /// `host:port` of the request, for messages and the operator's firewall.
    host: String,
    port: String,
    /// Where the request went: scheme, host, port and path. The query and any user info are
    /// left out: queries carry search terms and cursors, user info a password.
    pub url: String,
    /// What reqwest calls the failure, for [`TransportKind::Other`] (its own words say little
    /// more than "error sending request", so the causes follow).
    what: String,
    /// `": cause: deeper cause…"`, the error's sources (the useful part: "connection refused").
    causes: String,
}

impl TransportError {
    /// Describes `e`, a failure of a request to `url`. Takes the URL from the caller rather than
    /// from `e`, which does not carry one for every failure (a body that broke off).
    pub fn new(e: reqwest::Error, url: &Url) -> TransportError {
        let kind = if e.is_timeout() {
            TransportKind::Timeout
        } else if e.is_connect() {
            TransportKind::Connect
        } else {
            TransportKind::Other
        };
        let e = e.without_url();
        TransportError {
            kind,
            problem: if kind == TransportKind::Connect {
                ConnectProblem::of(&e)
            } else {
                ConnectProblem::Other
            },
            host: url.host_str().unwrap_or("").to_owned(),
            port: url
                .port_or_known_default()
                .map_or_else(String::new, |p| p.to_string()),
            url: public_url(url),
            what: e.to_string(),
            causes: causes(&e),
        }
    }

    /// The failure without the URL, for messages that name the URL already.
    pub fn without_url(&self) -> String {
        let what = match self.kind {
            TransportKind::Connect => self.problem.explain(&self.host, &self.port),
            TransportKind::Timeout => "no answer in time".to_owned(),
            TransportKind::Other => self.what.clone(),
        };
        format!("{what}{}", self.causes)
    }
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let url = &self.url;
        match self.kind {
            TransportKind::Connect => write!(
                f,
                "{} (for {url})",
                self.problem.explain(&self.host, &self.port)
            )?,
            TransportKind::Timeout => write!(f, "no answer from {url} in time")?,
            TransportKind::Other => write!(f, "{} ({url})", self.what)?,
        }
        f.write_str(&self.causes)
    }
}

impl std::error::Error for TransportError {}

/// `url` as an error message may show it: without query, fragment or user info.
pub fn public_url(url: &Url) -> String {
    let mut url = url.clone();
    url.set_query(None);
    url.set_fragment(None);
    // Only URLs that cannot have user info refuse these, and then they have none to remove.
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.to_string()
}

/// `": cause: deeper cause…"`: the sources of `e`, for errors whose own text says too little.
/// Empty when there are none.
pub fn causes(e: &dyn std::error::Error) -> String {
    let mut text = String::new();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A body that could not be read whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// Longer than the caller's limit (by `Content-Length` or as it streamed in).
    TooLarge { limit: usize },
    /// The answer broke off or timed out while the body was read.
    Read(TransportError),
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BodyError::TooLarge { limit } => write!(f, "the answer is larger than {limit} bytes"),
            BodyError::Read(e) => write!(f, "reading the answer: {e}"),
        }
    }
}

impl std::error::Error for BodyError {}

/// Reads `response`'s body, at most `limit` bytes. A server's answer is untrusted input: without
/// a limit, one endless body would take the whole memory of a process serving every account.
pub async fn read_limited(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, BodyError> {
    let url = response.url().clone();
    let announced = response.content_length();
    if announced.is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge { limit });
    }
    // Sized by what the server announces (within the limit): a page of many megabytes is then
    // not copied over and over as the vector grows.
    let capacity = announced.map_or(16 * 1024, |n| n as usize).min(limit);
    let mut body = Vec::with_capacity(capacity);
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| BodyError::Read(TransportError::new(e, &url)))?
    {
        if body.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A `Retry-After` value as sent (RFC 9110 §10.2.3): a delay, or an HTTP-date. A date only
/// becomes a wait against "now", which is the caller's (the token core's `now`, the sync's
/// clock), never read here: so simulated time and a test's fixed instant resolve it too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryAfter {
    /// `delay-seconds`.
    Delay(Duration),
    /// `HTTP-date`.
    At(Timestamp),
}

impl RetryAfter {
    /// Reads a header value; `None` when it is neither form (then there is no stated delay).
    pub fn parse(value: &str) -> Option<RetryAfter> {
        let value = value.trim();
        if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
            // All digits but too many for u64: longer than any cap, so the longest delay.
            let secs = value.parse::<u64>().unwrap_or(u64::MAX);
            return Some(RetryAfter::Delay(Duration::from_secs(secs)));
        }
        let at = httpdate::parse_http_date(value).ok()?;
        let millis = at.duration_since(UNIX_EPOCH).ok()?.as_millis();
        Some(RetryAfter::At(Timestamp::from_unix_millis(
            i64::try_from(millis).unwrap_or(i64::MAX),
        )))
    }

    /// The `Retry-After` header of an answer, if it has a readable one.
    pub fn from_headers(headers: &reqwest::header::HeaderMap) -> Option<RetryAfter> {
        let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
        RetryAfter::parse(value)
    }

    /// How long to wait from `now`; zero for a date already past.
    pub fn wait(self, now: Timestamp) -> Duration {
        match self {
            RetryAfter::Delay(d) => d,
            RetryAfter::At(at) => at.since(now),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const NOW: Timestamp = Timestamp::from_unix_millis(1_800_000_000_000);

    #[test]
    fn retry_after_takes_seconds_or_a_date_on_the_callers_clock() {
        assert_eq!(
            RetryAfter::parse(" 120 ").map(|r| r.wait(NOW)),
            Some(Duration::from_secs(120))
        );
        let in_90s = httpdate::fmt_http_date(
            UNIX_EPOCH + Duration::from_millis(NOW.unix_millis() as u64 + 90_000),
        );
        let parsed = RetryAfter::parse(&in_90s).unwrap();
        assert_eq!(parsed.wait(NOW), Duration::from_secs(90));
        // The same date, read an hour later on a simulated clock, is already past.
        assert_eq!(parsed.wait(NOW + Duration::from_secs(3600)), Duration::ZERO);
        assert_eq!(
            RetryAfter::parse("Wed, 21 Oct 2015 07:28:00 GMT").map(|r| r.wait(NOW)),
            Some(Duration::ZERO)
        );
        assert_eq!(
            RetryAfter::parse("99999999999999999999999"),
            Some(RetryAfter::Delay(Duration::from_secs(u64::MAX)))
        );
        for bad in ["soon", "", "-5", "+5", "1.5"] {
            assert_eq!(RetryAfter::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn error_urls_lose_query_fragment_and_user_info() {
        let url =
            Url::parse("https://user:pw@api.example.com:8443/fhir/Patient?name=Smith&_count=5#x")
                .unwrap();
        assert_eq!(
            public_url(&url),
            "https://api.example.com:8443/fhir/Patient"
        );
    }

    fn client() -> reqwest::Client {
        client_builder(Duration::from_secs(5)).build().unwrap()
    }

    /// A loopback server that answers every connection with `answer` and closes.
    async fn serve(answer: &'static [u8]) -> Url {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut buf = [0u8; 4096];
                let _ = socket.read(&mut buf).await;
                let _ = socket.write_all(answer).await;
            }
        });
        Url::parse(&format!("http://{addr}/token?cursor=abc")).unwrap()
    }

    #[tokio::test]
    async fn a_refused_connection_names_the_url_and_the_cause_but_not_the_request() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let url = Url::parse(&format!("http://{addr}/token?tenant=x")).unwrap();
        let e = client()
            .post(url.clone())
            .header("authorization", "Basic c2VjcmV0")
            .body("client_secret=hunter2")
            .send()
            .await
            .unwrap_err();
        let e = TransportError::new(e, &url);
        assert_eq!(e.kind, TransportKind::Connect);
        assert_eq!(e.problem, ConnectProblem::Refused);
        let text = e.to_string();
        assert!(
            text.starts_with(&format!(
                "connection refused by {addr}: check the address and port"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!("(for http://{addr}/token)")),
            "{text}"
        );
        for secret in ["hunter2", "c2VjcmV0", "tenant="] {
            assert!(!text.contains(secret), "{text}");
        }
        assert!(
            e.without_url()
                .starts_with(&format!("connection refused by {addr}")),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn bodies_are_read_up_to_the_limit() {
        let url = serve(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789").await;
        let response = client().get(url.clone()).send().await.unwrap();
        assert_eq!(read_limited(response, 10).await.unwrap(), b"0123456789");
        let response = client().get(url).send().await.unwrap();
        assert_eq!(
            read_limited(response, 9).await,
            Err(BodyError::TooLarge { limit: 9 })
        );

        // No Content-Length: the limit is enforced as the body streams in.
        let url = serve(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n0123456789").await;
        let response = client().get(url).send().await.unwrap();
        assert_eq!(
            read_limited(response, 4).await,
            Err(BodyError::TooLarge { limit: 4 })
        );

        // A body that breaks off is a read failure, named by its URL without the query.
        let url = serve(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort").await;
        let response = client().get(url.clone()).send().await.unwrap();
        match read_limited(response, 1000).await {
            Err(BodyError::Read(e)) => {
                assert_eq!(e.kind, TransportKind::Other);
                assert_eq!(e.url, public_url(&url));
                assert!(!e.to_string().contains("cursor"), "{e}");
            }
            other => panic!("{other:?}"),
        }
    }
}
