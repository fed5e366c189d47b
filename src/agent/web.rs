//! The agent's HTTP listener: `/metrics`, `/healthz` (the process is alive), `/readyz` (200
//! only when every account holds a valid token), and the status page: `/`, one server-rendered
//! HTML page (no script, no external asset, reloading itself every 10 s), and `/status.json`,
//! the document `ehrsync status --json` prints. Both are built per request by
//! [`status::build_from`] from the agent's open store and the config in force (a watch
//! channel the agent replaces on each reload).

use std::fmt;
use std::sync::Arc;

use axum::Router;
use axum::extract::State as AxumState;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use chrono::{DateTime, Utc};
use tokio::sync::watch;

use crate::cli::status::{self, Report};
use crate::clock::SharedClock;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::store::{Holder, Store};
use crate::token::owner::TokenHandle;

/// The running accounts' token handles; replaced as a whole when a reload changes them.
pub type Handles = watch::Receiver<Arc<Vec<TokenHandle>>>;

/// The config in force; replaced as a whole by each reload that was accepted.
pub type ConfigRx = watch::Receiver<Arc<Config>>;

/// What the status page reads: the config in force, the agent's store, and who this agent is.
#[derive(Clone)]
pub struct StatusSource {
    pub config: ConfigRx,
    pub store: Store,
    pub holder: Arc<Holder>,
    /// When this agent started.
    pub started: DateTime<Utc>,
    /// The token broker, when it runs: its clients' latest use is newer than the stored.
    pub broker: Option<crate::broker::Broker>,
}

#[derive(Clone)]
struct Web {
    handles: Handles,
    metrics: Metrics,
    clock: SharedClock,
    status: StatusSource,
}

pub fn router(
    handles: Handles,
    metrics: Metrics,
    clock: SharedClock,
    status: StatusSource,
) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/status.json", get(status_json))
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(Web {
            handles,
            metrics,
            clock,
            status,
        })
}

impl Web {
    fn now(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.clock.now().unix_millis()).unwrap_or_else(Utc::now)
    }

    /// The report `ehrsync status` would print now, from the agent's own store.
    async fn report(&self) -> Result<Report, crate::store::StoreError> {
        // Cloned out of the channel: its guard must not be held across an await.
        let config = self.status.config.borrow().clone();
        let mut report = status::build_from(Some(&self.status.store), &config, self.now()).await?;
        if let (Some(broker), Some(shown)) = (&self.status.broker, report.broker.as_mut()) {
            let live = broker.usage();
            for c in &mut shown.clients {
                if let Some(u) = live.get(&c.name)
                    && let Some(at) = u.last_used_at
                {
                    c.used(at, u.last_account.as_deref());
                }
            }
        }
        Ok(report)
    }
}

async fn status_json(AxumState(web): AxumState<Web>) -> impl IntoResponse {
    let json = web
        .report()
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| serde_json::to_string_pretty(&r).map_err(|e| e.to_string()));
    match json {
        Ok(text) => (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-store"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            format!("{text}\n"),
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [
                (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
                (header::CACHE_CONTROL, "no-store"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            format!("cannot read the status: {e}\n"),
        ),
    }
}

async fn status_page(AxumState(web): AxumState<Web>) -> impl IntoResponse {
    let now = web.now();
    let me = Me {
        pid: web.status.holder.pid(),
        host: web.status.holder.host_name(),
        id: web.status.holder.id().to_owned(),
        up: status::since(web.status.started, now),
        version: env!("CARGO_PKG_VERSION"),
    };
    let (code, body) = match web.report().await {
        Ok(report) => (StatusCode::OK, Page::Report(&me, &report).to_string()),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Page::Failed(&me, &e.to_string(), now).to_string(),
        ),
    };
    (
        code,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            // Should anything ever slip past the escaping: no script runs, nothing is loaded.
            (header::CONTENT_SECURITY_POLICY, PAGE_POLICY),
        ],
        body,
    )
}

async fn metrics_page(AxumState(web): AxumState<Web>) -> impl IntoResponse {
    // Validity changes at expiry without any event: recompute it for every scrape.
    let now = web.clock.now();
    let handles = web.handles.borrow().clone();
    for h in handles.iter() {
        let valid = h.snapshot().token.is_some_and(|t| now < t.expires_at);
        web.metrics
            .token_valid
            .with_label_values(&[h.account()])
            .set(i64::from(valid));
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        web.metrics.render(),
    )
}

async fn readyz(AxumState(web): AxumState<Web>) -> impl IntoResponse {
    let now = web.clock.now();
    let handles = web.handles.borrow().clone();
    let not_ready: Vec<String> = handles
        .iter()
        .filter_map(|h| {
            let snap = h.snapshot();
            let valid = snap.token.as_ref().is_some_and(|t| now < t.expires_at);
            (!valid).then(|| format!("{}: {}", h.account(), snap.state.as_str()))
        })
        .collect();
    if not_ready.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready:\n{}\n", not_ready.join("\n")),
        )
    }
}

/// This agent, as the page introduces it.
struct Me {
    pid: u32,
    host: String,
    id: String,
    up: String,
    version: &'static str,
}

/// Text escaped for HTML, in element content and in quoted attribute values alike.
pub(crate) struct Esc<'a>(pub &'a str);

impl fmt::Display for Esc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(i) = rest.find(['&', '<', '>', '"', '\'']) {
            f.write_str(&rest[..i])?;
            f.write_str(match rest.as_bytes()[i] {
                b'&' => "&amp;",
                b'<' => "&lt;",
                b'>' => "&gt;",
                b'"' => "&quot;",
                _ => "&#39;",
            })?;
            rest = &rest[i + 1..];
        }
        f.write_str(rest)
    }
}

/// `text` with the query of every URL in it cut to `?…`: an error names the request it
/// failed on, and a query string is no business of a page anyone on the network may read
/// (`/status.json` has the whole text, as `status --json` does).
fn without_queries(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = ["http://", "https://"]
        .iter()
        .filter_map(|scheme| rest.find(scheme))
        .min()
    {
        out.push_str(&rest[..start]);
        let url = &rest[start..];
        let end = url
            .find(|c: char| c.is_whitespace() || "()<>`'\"[]{}".contains(c))
            .unwrap_or(url.len());
        // Punctuation ending a sentence is not part of the URL.
        let token = url[..end].trim_end_matches(['.', ',', ';', ':']);
        match token.find('?') {
            Some(q) => {
                out.push_str(&token[..q]);
                out.push_str("?…");
            }
            None => out.push_str(token),
        }
        rest = &url[token.len()..];
    }
    out.push_str(rest);
    out
}

/// The status page: the report, or why it could not be read.
enum Page<'a> {
    Report(&'a Me, &'a Report),
    Failed(&'a Me, &'a str, DateTime<Utc>),
}

/// The page's Content-Security-Policy: its inline style, nothing else, and no framing.
const PAGE_POLICY: &str = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}\
h1{font-size:1.4em;margin:0 0 .3em}h2{font-size:1.1em;margin:1.4em 0 .4em}\
table{border-collapse:collapse;width:100%}\
th,td{text-align:left;vertical-align:top;padding:.3em .6em;border-bottom:1px solid #ddd}\
th{background:#f3f3f3;font-weight:600}td.n{text-align:right}\
.ok{color:#176e2c}.warn{color:#9a6200}.bad{color:#b3261e;font-weight:600}\
.err{white-space:pre-wrap;word-break:break-word;max-width:40em}.muted{color:#666}\
p.agent{padding:.5em .8em;background:#eef7ef;border-left:4px solid #176e2c}";

/// A class for a token state (a fixed word, whatever the state says).
fn state_class(state: &str) -> &'static str {
    match state {
        "valid" | "refreshing" => "ok",
        "needs_login" | "expired" => "bad",
        _ => "warn",
    }
}

/// A class for a run's outcome.
fn outcome_class(outcome: &str) -> &'static str {
    match outcome {
        "success" => "ok",
        "failed" => "bad",
        "interrupted" => "warn",
        _ => "",
    }
}

fn head(f: &mut fmt::Formatter<'_>) -> fmt::Result {
    write!(
        f,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta http-equiv=\"refresh\" content=\"10\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>ehrsync status</title>\n<style>{STYLE}</style>\n</head>\n<body>\n\
         <h1>ehrsync status</h1>\n"
    )
}

fn agent_line(f: &mut fmt::Formatter<'_>, me: &Me) -> fmt::Result {
    writeln!(
        f,
        "<p class=\"agent\" id=\"agent\"><strong class=\"ok\">Agent running</strong>: \
         pid {}, host {}, up {}, ehrsync {}</p>",
        me.pid,
        Esc(&me.host),
        Esc(&me.up),
        Esc(me.version)
    )
}

fn foot(f: &mut fmt::Formatter<'_>, now: DateTime<Utc>) -> fmt::Result {
    writeln!(
        f,
        "<p class=\"muted\">Generated {} UTC; this page reloads every 10 s. \
         The same as JSON: <a href=\"/status.json\">/status.json</a>.</p>\n</body>\n</html>",
        now.format("%Y-%m-%d %H:%M:%S")
    )
}

/// A table cell holding `text`, escaped.
fn cell(f: &mut fmt::Formatter<'_>, class: &str, text: &str) -> fmt::Result {
    if class.is_empty() {
        write!(f, "<td>{}</td>", Esc(text))
    } else {
        write!(f, "<td class=\"{class}\">{}</td>", Esc(text))
    }
}

impl fmt::Display for Page<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        head(f)?;
        match self {
            Page::Failed(me, error, now) => {
                agent_line(f, me)?;
                writeln!(
                    f,
                    "<p class=\"bad err\">Cannot read the status from the database: {}</p>",
                    Esc(&without_queries(error))
                )?;
                foot(f, *now)
            }
            Page::Report(me, report) => {
                agent_line(f, me)?;
                body(f, me, report)?;
                foot(f, report.now())
            }
        }
    }
}

fn body(f: &mut fmt::Formatter<'_>, me: &Me, report: &Report) -> fmt::Result {
    let now = report.now();
    for a in report.agents.iter().filter(|a| a.running && a.id != me.id) {
        writeln!(
            f,
            "<p>Also running on this database: pid {}, host {}, up {}, ehrsync {}</p>",
            a.pid,
            Esc(&a.host),
            Esc(&a
                .started()
                .map_or_else(|| "-".to_owned(), |t| status::since(t, now))),
            Esc(&a.version)
        )?;
    }
    let schema = report
        .schema_version
        .map_or_else(String::new, |v| format!(" (schema {v})"));
    writeln!(
        f,
        "<p class=\"muted\">Database {}{}</p>",
        Esc(&report.database),
        Esc(&schema)
    )?;

    writeln!(f, "<h2>Accounts</h2>")?;
    if report.accounts.is_empty() {
        writeln!(f, "<p>No accounts are configured.</p>")?;
    } else {
        writeln!(
            f,
            "<table id=\"accounts\">\n<thead><tr><th>Account</th><th>Vendor</th><th>State</th>\
             <th>Token expires</th><th>Next refresh</th><th>Refresh token expires</th>\
             <th>Last error</th></tr></thead>\n<tbody>"
        )?;
        for a in &report.accounts {
            write!(f, "<tr id=\"account-{}\">", Esc(&a.name))?;
            cell(f, "", &a.name)?;
            cell(f, "", a.vendor.as_deref().unwrap_or("-"))?;
            cell(f, state_class(&a.state), &a.state)?;
            cell(f, "", &status::expiry(a.token_expires(), now))?;
            cell(f, "", &status::planned(a.next_refresh(), now, true))?;
            cell(f, "", &status::expiry(a.refresh_token_expires(), now))?;
            write!(f, "<td class=\"err\">")?;
            match &a.last_error {
                Some(e) => write!(f, "<span class=\"bad\">{}</span>", Esc(&without_queries(e)))?,
                None => write!(f, "-")?,
            }
            for extra in [&a.note, &a.advice].into_iter().flatten() {
                write!(
                    f,
                    "<br><span class=\"muted\">{}</span>",
                    Esc(&without_queries(extra))
                )?;
            }
            writeln!(f, "</td></tr>")?;
        }
        writeln!(f, "</tbody>\n</table>")?;
    }

    writeln!(f, "<h2>Jobs</h2>")?;
    if report.accounts.iter().all(|a| a.jobs.is_empty()) {
        writeln!(f, "<p>No jobs are configured.</p>")?;
        return broker_section(f, report, now);
    }
    writeln!(
        f,
        "<table id=\"jobs\">\n<thead><tr><th>Job</th><th>Kind</th><th>Schedule</th>\
         <th>Last run</th><th>Outcome</th><th>Records</th><th>Error</th><th>Next run</th>\
         </tr></thead>\n<tbody>"
    )?;
    for a in &report.accounts {
        for j in &a.jobs {
            let name = format!("{}/{}", a.name, j.name);
            write!(f, "<tr id=\"job-{}-{}\">", Esc(&a.name), Esc(&j.name))?;
            cell(f, "", &name)?;
            cell(f, "", &j.kind)?;
            cell(f, "", &j.schedule)?;
            match &j.last_run {
                Some(r) => {
                    cell(f, "", &status::when(r.started(), now))?;
                    cell(f, outcome_class(&r.outcome), &r.outcome)?;
                    write!(f, "<td class=\"n\">{}</td>", r.records)?;
                    cell(
                        f,
                        "err",
                        &r.error
                            .as_deref()
                            .map_or_else(|| "-".to_owned(), without_queries),
                    )?;
                }
                None => {
                    cell(f, "muted", "never")?;
                    cell(f, "", "-")?;
                    cell(f, "n", "-")?;
                    cell(f, "", "-")?;
                }
            }
            cell(f, "", &status::when(j.next(), now))?;
            writeln!(f, "</tr>")?;
        }
    }
    writeln!(f, "</tbody>\n</table>")?;
    broker_section(f, report, now)
}

/// The broker's clients and their last use (nothing secret: names, accounts, times, counts).
fn broker_section(f: &mut fmt::Formatter<'_>, report: &Report, now: DateTime<Utc>) -> fmt::Result {
    let Some(b) = &report.broker else {
        return Ok(());
    };
    writeln!(
        f,
        "<h2>Broker</h2>\n<p class=\"muted\">Listening on {}</p>",
        Esc(&b.listen)
    )?;
    if b.clients.is_empty() {
        return writeln!(f, "<p>No clients are configured.</p>");
    }
    writeln!(
        f,
        "<table id=\"broker-clients\">\n<thead><tr><th>Client</th><th>Accounts</th><th>Endpoints</th>\
         <th>Last use</th><th>Requests</th><th>Refused</th></tr></thead>\n<tbody>"
    )?;
    for c in &b.clients {
        write!(f, "<tr id=\"client-{}\">", Esc(&c.name))?;
        cell(f, "", &c.name)?;
        cell(f, "", &c.accounts.join(", "))?;
        let endpoints = format!(
            "{}{}",
            c.endpoints.join(", "),
            if c.read_only { " (read-only)" } else { "" }
        );
        cell(f, "", &endpoints)?;
        let last = match (&c.last_used_at, &c.last_account) {
            (Some(_), Some(a)) => format!("{} ({a})", status::when(c.last_used, now)),
            (Some(_), None) => status::when(c.last_used, now),
            (None, _) => "never".to_owned(),
        };
        cell(f, "", &last)?;
        write!(
            f,
            "<td class=\"n\">{}</td><td class=\"n\">{}</td>",
            c.requests, c.refused
        )?;
        writeln!(f, "</tr>")?;
    }
    writeln!(f, "</tbody>\n</table>")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escape(text: &str) -> String {
        Esc(text).to_string()
    }

    #[test]
    fn escape_leaves_no_markup() {
        let hostile = r#"<script>alert("x")</script> & 'quoted' <img src=x onerror=alert(1)>"#;
        let escaped = escape(hostile);
        assert_eq!(
            escaped,
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;quoted&#39; \
             &lt;img src=x onerror=alert(1)&gt;"
        );
        for c in ['<', '>', '"', '\''] {
            assert!(!escaped.contains(c), "{c} in {escaped}");
        }
        assert_eq!(escape("plain text, é ü 漢"), "plain text, é ü 漢");
        assert_eq!(escape(""), "");
        assert_eq!(escape("&amp;"), "&amp;amp;");
    }

    #[test]
    fn urls_are_shown_without_their_query() {
        assert_eq!(
            without_queries(
                "page 2 (GET https://api.example/fhir/Patient?_count=50&key=s3cret): HTTP 400; \
                 see http://x.example/a?b=c, or `https://y.example/p?q` and http://z.example/p"
            ),
            "page 2 (GET https://api.example/fhir/Patient?…): HTTP 400; \
             see http://x.example/a?…, or `https://y.example/p?…` and http://z.example/p"
        );
        assert_eq!(without_queries("no URL? none"), "no URL? none");
        assert_eq!(without_queries("https://a?"), "https://a?…");
        assert_eq!(without_queries("at https://a/b?c=d."), "at https://a/b?….");
        assert_eq!(without_queries(""), "");
    }
}
