//! The agent's status page: `ehrsync run` against the vendor sandbox (two healthy accounts with
//! jobs, one whose password is wrong, one job failing on a hostile record), its `/` and
//! `/status.json` read over HTTP and `/` rendered by a real browser (Debian's `chromium`,
//! headless). The page shows every account and job, escapes what it shows, and holds no
//! secret, no token and no patient data.
#![cfg(unix)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ehrsync::clock::SystemClock;
use ehrsync::sandbox::{self, Lifetimes, Sandbox, fhir_id};
use ehrsync::vendor::Vendor;
use serde_json::Value;

use common::agent::Agent;

const BAD_PASSWORD: &str = "not-the-password-7c1d";

/// The id of the hostile record: markup, quotes and an ampersand, as a vendor might send.
const HOSTILE_ID: &str = "<script>alert('x')</script> & <b>more</b>";
/// The same, as the page must show it.
const HOSTILE_ESCAPED: &str =
    "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &lt;b&gt;more&lt;/b&gt;";

/// Nested arrays far past SQLite's JSON depth limit, so the record fails its page by id.
fn deep_array() -> String {
    format!("{}{}", "[".repeat(2000), "]".repeat(2000))
}

/// `nx` (Nextech, a FHIR job of 50-record pages), `niko` (NikoHealth, its list), and `bad`
/// (Nextech with a wrong password: `needs_login`). Each job runs once at start (it never ran),
/// then yearly.
fn config(sandbox: &Sandbox) -> String {
    let mut config = sandbox.account_config(Vendor::Nextech, "nx");
    config.push_str(
        "[[accounts.nx.jobs]]\nname = 'patients'\nkind = 'fhir'\npage_size = 50\n\
         schedule = '0 0 0 1 1 *'\n",
    );
    config.push_str(&sandbox.account_config(Vendor::NikoHealth, "niko"));
    config.push_str(
        "[[accounts.niko.jobs]]\nname = 'patients'\nkind = 'nikohealth_patients'\n\
         schedule = '0 30 2 * * *'\n",
    );
    config.push_str(&common::nextech_with_password_from(
        sandbox,
        "bad",
        "BAD_NEXTECH_PASSWORD",
    ));
    config
}

/// The sandbox and the agent, settled: tokens for `nx` and `niko`, `bad` parked, both jobs'
/// first runs finished. With `hostile`, patient 60 (page 2 of `nx/patients`, page 1 of
/// `niko/patients`) is a record too deep to store whose id is [`HOSTILE_ID`], so both runs
/// fail naming it.
async fn settled(hostile: bool) -> (Sandbox, Agent) {
    let sandbox = Sandbox::start(Arc::new(SystemClock), Lifetimes::documented(), 0)
        .await
        .unwrap();
    if hostile {
        let record = sandbox.patient_json(60).replace(
            &format!("\"id\":\"{}\"", fhir_id(60)),
            &format!(
                "\"id\":{},\"contained\":{}",
                serde_json::to_string(HOSTILE_ID).unwrap(),
                deep_array()
            ),
        );
        assert!(record.contains("contained"), "{record}");
        sandbox.plant_patient(60, record);
    }
    let agent = Agent::start(
        &config(&sandbox),
        "5s",
        &[("BAD_NEXTECH_PASSWORD", BAD_PASSWORD)],
    );
    // The NikoHealth list serves the same patients: its page 1 holds the hostile one.
    let outcome = if hostile { "failed" } else { "success" };
    let wanted = [
        "ehrsync_token_valid{account=\"nx\"} 1".to_owned(),
        "ehrsync_token_valid{account=\"niko\"} 1".to_owned(),
        "ehrsync_account_needs_login{account=\"bad\"} 1".to_owned(),
        format!(
            "ehrsync_sync_runs_total{{account=\"nx\",job=\"patients\",outcome=\"{outcome}\"}} 1"
        ),
        format!(
            "ehrsync_sync_runs_total{{account=\"niko\",job=\"patients\",outcome=\"{outcome}\"}} 1"
        ),
    ];
    agent
        .metrics_until("the accounts and jobs settled", |m| {
            wanted.iter().all(|w| m.contains(w.as_str()))
        })
        .await;
    (sandbox, agent)
}

/// The `<tr id="ID">…</tr>` row of `page`.
fn row<'a>(page: &'a str, id: &str) -> &'a str {
    let start = page
        .find(&format!("<tr id=\"{id}\">"))
        .unwrap_or_else(|| panic!("no row {id} in:\n{page}"));
    let len = page[start..]
        .find("</tr>")
        .unwrap_or_else(|| panic!("row {id} not closed"));
    &page[start..start + len]
}

/// Panics if `text` holds a sandbox secret, the wrong password, an issued token or a
/// patient's name or MRN.
fn assert_nothing_secret(what: &str, text: &str, sandbox: &Sandbox) {
    for (name, secret) in sandbox::credentials_env() {
        assert!(!text.contains(secret), "{name}'s value in {what}");
    }
    assert!(!text.contains(BAD_PASSWORD), "the wrong password in {what}");
    let tokens = sandbox.issued_tokens();
    assert!(
        tokens.len() >= 2,
        "the sandbox issued {} tokens",
        tokens.len()
    );
    for token in tokens {
        assert!(!text.contains(&token), "an issued token in {what}");
    }
    let patient: Value = serde_json::from_str(&sandbox.patient_json(1)).unwrap();
    let family = patient["name"][0]["family"].as_str().unwrap();
    assert!(
        !text.contains(family),
        "a patient's name ({family}) in {what}"
    );
    let mrn = patient["identifier"][0]["value"].as_str().unwrap();
    assert!(!text.contains(mrn), "a patient's MRN in {what}");
}

/// Panics if `page` shows a request's query string (errors name requests without it there).
fn assert_no_query(what: &str, page: &str) {
    for query in ["_count=", "_cursor=", "_lastUpdated", "page=", "pageSize="] {
        assert!(!page.contains(query), "a query string ({query}) in {what}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_status_page_shows_every_account_and_job_escaped_and_without_secrets() {
    let (sandbox, mut agent) = settled(true).await;
    let pid = agent.child.id();

    let response = reqwest::get(format!("http://127.0.0.1:{}/", agent.port))
        .await
        .expect("an answer from /");
    let header = |name: &str| {
        response.headers()[name]
            .to_str()
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(header("content-type"), "text/html; charset=utf-8");
    let policy = header("content-security-policy");
    assert!(policy.starts_with("default-src 'none'"), "{policy}");
    assert!(!policy.contains("script-src"), "{policy}");
    assert_eq!(response.status().as_u16(), 200);
    let page = response.text().await.unwrap();
    // One self-contained page that reloads itself.
    assert!(page.starts_with("<!DOCTYPE html>"), "{page}");
    assert!(
        page.contains("<meta http-equiv=\"refresh\" content=\"10\">"),
        "{page}"
    );
    let lower = page.to_lowercase();
    for external in ["<script", "<link", "<img", "<iframe", "src=\"", "@import"] {
        assert!(!lower.contains(external), "`{external}` in:\n{page}");
    }
    // The agent: running, with its pid.
    assert!(page.contains("Agent running"), "{page}");
    assert!(page.contains(&format!("pid {pid}, host ")), "{page}");

    // Every account with its state.
    for (account, state) in [("nx", "valid"), ("niko", "valid"), ("bad", "needs_login")] {
        let r = row(&page, &format!("account-{account}"));
        assert!(r.contains(&format!("<td>{account}</td>")), "{r}");
        assert!(r.contains(&format!(">{state}</td>")), "{state} in {r}");
    }
    let bad = row(&page, "account-bad");
    assert!(bad.contains("refused"), "the reason in {bad}");
    let nx = row(&page, "account-nx");
    assert!(nx.contains(" (in "), "the token's expiry in {nx}");
    // Every job: its last run and the next one.
    let niko = row(&page, "job-niko-patients");
    assert!(niko.contains("<td>niko/patients</td>"), "{niko}");
    assert!(niko.contains(">failed</td>"), "{niko}");
    assert!(niko.contains(">0</td>"), "{niko}");
    assert!(niko.contains("02:30:00Z (in "), "the next run in {niko}");
    let nx = row(&page, "job-nx-patients");
    assert!(nx.contains(">failed</td>"), "{nx}");
    assert!(nx.contains(">50</td>"), "page 1's records in {nx}");
    assert!(
        nx.contains("-01-01 00:00:00Z (in "),
        "the next run (yearly) in {nx}"
    );
    // The hostile record's id is in the errors, escaped; the request without its query.
    for job in [niko, nx] {
        assert!(job.contains(HOSTILE_ESCAPED), "the escaped id in {job}");
        assert!(
            job.contains("?…)"),
            "the request without its query in {job}"
        );
    }
    assert!(!page.contains(HOSTILE_ID), "the raw id in:\n{page}");
    assert!(!page.contains("<b>more"), "{page}");
    assert_nothing_secret("the page", &page, &sandbox);
    assert_no_query("the page", &page);

    // /status.json: the document `status --json` prints.
    let (status, json) = agent.get("/status.json").await.expect("an answer");
    assert_eq!(status, 200, "{json}");
    let doc: Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    let agents = doc["agents"].as_array().expect("agents");
    assert!(
        agents
            .iter()
            .any(|a| a["pid"] == pid && a["running"] == true),
        "{json}"
    );
    let accounts = doc["accounts"].as_array().expect("accounts");
    let names: Vec<&str> = accounts.iter().filter_map(|a| a["name"].as_str()).collect();
    assert_eq!(names, ["bad", "niko", "nx"], "{json}");
    assert_eq!(accounts[0]["state"], "needs_login");
    assert_eq!(accounts[2]["jobs"][0]["last_run"]["outcome"], "failed");
    assert!(
        accounts[2]["jobs"][0]["last_run"]["error"]
            .as_str()
            .is_some_and(|e| e.contains(HOSTILE_ID)),
        "{json}"
    );
    assert_eq!(doc["database_exists"], true);
    assert_nothing_secret("/status.json", &json, &sandbox);
    // The same document as `ehrsync status --json` (but for the time it was made).
    let path = agent.config_path();
    let cli = common::ehrsync(
        &["--config", path.to_str().unwrap(), "status", "--json"],
        &[],
    );
    assert_eq!(cli.code, Some(0), "{}", cli.stderr);
    let mut from_cli: Value = serde_json::from_str(&cli.stdout).unwrap();
    let mut from_web = doc.clone();
    for d in [&mut from_cli, &mut from_web] {
        d["generated_at"] = Value::Null;
        for a in d["agents"].as_array_mut().unwrap() {
            a["heartbeat_at"] = Value::Null;
        }
        for a in d["accounts"].as_array_mut().unwrap() {
            for j in a["jobs"].as_array_mut().unwrap() {
                j["next_run"] = Value::Null;
            }
        }
    }
    assert_eq!(from_cli, from_web);

    // A reload: the page follows the config in force. `bad` is removed (its stored row is
    // still listed, as not configured), `cc` is added.
    let before = config(&sandbox);
    let kept = &before[..before.find("[accounts.bad]").unwrap()];
    agent.rewrite(
        &format!(
            "{kept}{}",
            sandbox.account_config(Vendor::CareCentric, "cc")
        ),
        "5s",
    );
    agent.signal("HUP");
    agent
        .metrics_until("cc's token after the reload", |m| {
            m.contains("ehrsync_token_valid{account=\"cc\"} 1")
        })
        .await;
    let (status, page) = agent.get("/").await.expect("an answer from /");
    assert_eq!(status, 200, "{page}");
    assert!(row(&page, "account-cc").contains(">valid</td>"), "{page}");
    let bad = row(&page, "account-bad");
    assert!(bad.contains("not in the config any more"), "{bad}");
    assert!(
        row(&page, "job-nx-patients").contains(">failed</td>"),
        "{page}"
    );
    agent.signal("TERM");
    assert_eq!(agent.wait_exit(Duration::from_secs(20)).code(), Some(0));
}

/// `chromium` or `chromium-browser` on PATH; fails (never skips) without one.
fn chromium() -> &'static str {
    for name in ["chromium", "chromium-browser"] {
        let found = Command::new(name)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .is_ok_and(|o| o.status.success());
        if found {
            return name;
        }
    }
    panic!(
        "neither `chromium` nor `chromium-browser` is on PATH. This test renders the status page \
         in a real headless browser; `bash .ci/test` installs it (Debian package `chromium`)."
    );
}

/// Runs headless `browser` with `args` and `url`, a fresh profile in `profile`, within 90 s:
/// its stdout.
fn headless(browser: &str, profile: &Path, args: &[&str], url: &str) -> String {
    let out_path = profile.join("stdout");
    let err_path = profile.join("stderr");
    let mut child = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            "--no-default-browser-check",
        ])
        .arg(format!(
            "--user-data-dir={}",
            profile.join("profile").display()
        ))
        .args(args)
        .arg(url)
        .env("HOME", profile)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let since = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if since.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{browser} {args:?} did not finish within 90 s; stderr:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "{browser} {args:?} failed ({status}); stderr:\n{}",
        std::fs::read_to_string(&err_path).unwrap_or_default()
    );
    std::fs::read_to_string(&out_path).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_headless_browser_renders_the_status_page() {
    let browser = chromium();
    let (sandbox, mut agent) = settled(false).await;
    let url = format!("http://127.0.0.1:{}/", agent.port);

    // The DOM as the browser built it: every account and job row, the states.
    let dom_dir = tempfile::tempdir().unwrap();
    let dom = headless(browser, dom_dir.path(), &["--dump-dom"], &url);
    for (account, state) in [("nx", "valid"), ("niko", "valid"), ("bad", "needs_login")] {
        let r = row(&dom, &format!("account-{account}"));
        assert!(r.contains(&format!(">{state}</td>")), "{state} in {r}");
    }
    for job in ["job-nx-patients", "job-niko-patients"] {
        assert!(row(&dom, job).contains(">success</td>"), "{dom}");
    }
    assert!(dom.contains("Agent running"), "{dom}");
    assert_nothing_secret("the browser's DOM", &dom, &sandbox);
    assert_no_query("the browser's DOM", &dom);

    // A screenshot: a PNG the size of the window. EHRSYNC_SCREENSHOT=PATH keeps a copy (how
    // docs/status-page.png is made).
    let shot_dir = tempfile::tempdir().unwrap();
    let shot: PathBuf = shot_dir.path().join("status-page.png");
    headless(
        browser,
        shot_dir.path(),
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1200,800",
            "--hide-scrollbars",
        ],
        &url,
    );
    let png = std::fs::read(&shot).expect("the screenshot");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    let (width, height) = (
        u32::from_be_bytes(png[16..20].try_into().unwrap()),
        u32::from_be_bytes(png[20..24].try_into().unwrap()),
    );
    assert_eq!((width, height), (1200, 800));
    if let Some(keep) = std::env::var_os("EHRSYNC_SCREENSHOT") {
        std::fs::copy(&shot, keep).unwrap();
    }

    agent.signal("TERM");
    assert_eq!(agent.wait_exit(Duration::from_secs(20)).code(), Some(0));
}
