//! Monitoring as an operator sets it up: `ehrsync run` against the vendor sandbox (two healthy
//! accounts with jobs, and a Nextech account whose password is wrong), its /metrics linted by
//! `promtool check metrics`, scraped by a real `prometheus` that loads
//! config/prometheus/alerts.yml, whose rules must all evaluate and whose needs-login alert must
//! go off for the wrong-password account only.
#![cfg(unix)]

mod common;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ehrsync::clock::SystemClock;
use ehrsync::sandbox::{self, Lifetimes, Sandbox};
use ehrsync::vendor::Vendor;
use serde_json::Value;

const ALERTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/prometheus/alerts.yml");

/// Every alert alerts.yml defines.
const ALERT_NAMES: [&str; 8] = [
    "EhrsyncDown",
    "EhrsyncTokenInvalid",
    "EhrsyncAccountNeedsLogin",
    "EhrsyncRefreshTokenExpiringSoon",
    "EhrsyncJobStale",
    "EhrsyncJobNeverSucceeded",
    "EhrsyncTokenRequestsFailing",
    "EhrsyncConfigReloadFailed",
];

/// Fails (never skips) when a Prometheus tool is missing.
fn require(tool: &str) {
    match Command::new(tool).arg("--version").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "`{tool} --version` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!(
            "`{tool}` is not on PATH ({e}). This test runs Prometheus's `prometheus` and \
             `promtool`; `bash .ci/test` installs them (Debian/Ubuntu package `prometheus`)."
        ),
    }
}

/// The child processes of the test, killed when it ends, also when an assertion fails (then
/// their logs are printed).
struct Processes(Vec<(&'static str, Child, PathBuf)>);

impl Processes {
    fn spawn(&mut self, name: &'static str, cmd: &mut Command, log: PathBuf) -> u32 {
        let file = File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        let pid = child.id();
        self.0.push((name, child, log));
        pid
    }

    /// Panics with the process's log if it has exited.
    fn assert_running(&mut self, name: &str) {
        let (_, child, log) = self.0.iter_mut().find(|p| p.0 == name).unwrap();
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "{name} exited ({status}):\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
    }

    fn child(&mut self, name: &str) -> &mut Child {
        &mut self.0.iter_mut().find(|p| p.0 == name).unwrap().1
    }

    fn log(&self, name: &str) -> String {
        let log = &self.0.iter().find(|p| p.0 == name).unwrap().2;
        std::fs::read_to_string(log).unwrap_or_default()
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for (name, child, log) in &mut self.0 {
            if child.try_wait().ok().flatten().is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
            if std::thread::panicking() {
                let text = std::fs::read_to_string(&*log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(60).collect();
                eprintln!("--- last lines of the {name} log ---");
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

/// `GET {prometheus}/api/v1/{path}` answered with status "success": its `data`; else what came
/// back (until it is ready, Prometheus answers 503 in plain text).
async fn api(prometheus: &str, path: &str, params: &[(&str, &str)]) -> Result<Value, String> {
    let url = url::Url::parse_with_params(&format!("{prometheus}/api/v1/{path}"), params).unwrap();
    let (status, body) = common::http_get(url.as_str())
        .await
        .ok_or_else(|| format!("no answer from {url}"))?;
    match serde_json::from_str::<Value>(&body) {
        Ok(answer) if status == 200 && answer["status"] == "success" => Ok(answer["data"].clone()),
        _ => Err(format!("{url} answered {status}: {body}")),
    }
}

/// The instant vector of `query` as (labels, value) pairs.
async fn query(prometheus: &str, query: &str) -> Vec<(Value, String)> {
    let data = api(prometheus, "query", &[("query", query)])
        .await
        .unwrap_or_else(|e| panic!("query {query} failed: {e}"));
    data["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["metric"].clone(),
                s["value"][1].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Retries `check` every 250 ms until it returns Some or `limit` passes; then panics with the
/// last `Err` it returned.
async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let started = Instant::now();
    loop {
        match check().await {
            Ok(value) => return value,
            Err(last) if started.elapsed() > limit => {
                panic!("{what}: not within {limit:?}; last seen: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

fn agent_config(sandbox: &Sandbox, port: u16) -> String {
    let mut config = format!(
        "[agent]\n{}metrics_listen = '127.0.0.1:{port}'\n",
        common::database_lines("state/ehrsync.db")
    );
    config.push_str(&sandbox.account_config(Vendor::Nextech, "nx"));
    config.push_str(
        "[[accounts.nx.jobs]]\nname = 'patients'\nkind = 'fhir'\nschedule = '0 0 * * * *'\n",
    );
    config.push_str(&sandbox.account_config(Vendor::NikoHealth, "niko"));
    config.push_str(
        "[[accounts.niko.jobs]]\nname = 'patients'\nkind = 'nikohealth_patients'\nschedule = '0 0 * * * *'\n",
    );
    // The right client, the wrong password: rejected, so the account parks in needs_login.
    config.push_str(&common::nextech_with_password_from(
        sandbox,
        "bad",
        "BAD_NEXTECH_PASSWORD",
    ));
    config
}

fn prometheus_config(dir: &Path, agent_port: u16) -> PathBuf {
    let path = dir.join("prometheus.yml");
    let mut file = File::create(&path).unwrap();
    write!(
        file,
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - {ALERTS:?}\n\
         scrape_configs:\n  - job_name: ehrsync\n    static_configs:\n      \
         - targets: ['127.0.0.1:{agent_port}']\n"
    )
    .unwrap();
    path
}

/// promtool's lint of the exposition: exit 0 and its output.
fn promtool_check_metrics(metrics: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_the_agent_and_evaluates_the_alert_rules() {
    require("promtool");
    require("prometheus");
    let sandbox = Sandbox::start(Arc::new(SystemClock), Lifetimes::documented(), 0)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut processes = Processes(Vec::new());

    // The agent.
    let agent_port = common::free_port();
    let path = common::write_config(dir.path(), &agent_config(&sandbox, agent_port));
    let mut env = sandbox::credentials_env();
    env.push(("BAD_NEXTECH_PASSWORD", "not-the-password-5e2a"));
    let agent_pid = processes.spawn(
        "ehrsync",
        Command::new(env!("CARGO_BIN_EXE_ehrsync"))
            .env_clear()
            .envs(env.iter().copied())
            .args(["run", "--config", path.to_str().unwrap()]),
        dir.path().join("ehrsync.log"),
    );
    let agent = format!("http://127.0.0.1:{agent_port}");

    // Tokens for nx and niko, needs_login for bad, and each job's first run done (a job that
    // never ran runs at start-up).
    let wanted = [
        "ehrsync_token_valid{account=\"nx\"} 1",
        "ehrsync_token_valid{account=\"niko\"} 1",
        "ehrsync_account_needs_login{account=\"bad\"} 1",
        "ehrsync_account_needs_login{account=\"nx\"} 0",
        "ehrsync_sync_last_success_timestamp_seconds{account=\"nx\",job=\"patients\"}",
        "ehrsync_sync_last_success_timestamp_seconds{account=\"niko\",job=\"patients\"}",
    ];
    let metrics = wait_for(
        "the agent's accounts and jobs settled",
        Duration::from_secs(30),
        || {
            processes.assert_running("ehrsync");
            let url = format!("{agent}/metrics");
            async move {
                let (status, metrics) = common::http_get(&url)
                    .await
                    .ok_or("no answer from /metrics")?;
                match wanted.iter().find(|w| !metrics.contains(*w)) {
                    None if status == 200 => Ok(metrics),
                    missing => Err(format!("{status}, missing {missing:?} in:\n{metrics}")),
                }
            }
        },
    )
    .await;
    // Not ready while an account holds no token; the answer names it.
    let (status, body) = common::http_get(&format!("{agent}/readyz")).await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("bad"), "{body}");

    // a. The exposition passes promtool's lint.
    let (ok, output) = promtool_check_metrics(&metrics);
    assert!(
        ok,
        "promtool check metrics failed:\n{output}\non these metrics:\n{metrics}"
    );

    // b. A real Prometheus scraping the agent with the shipped alert rules.
    let prometheus_port = common::free_port();
    let config = prometheus_config(dir.path(), agent_port);
    let tsdb = dir.path().join("tsdb");
    processes.spawn(
        "prometheus",
        Command::new("prometheus").args([
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", tsdb.display()),
            format!("--web.listen-address=127.0.0.1:{prometheus_port}"),
        ]),
        dir.path().join("prometheus.log"),
    );
    let prometheus = format!("http://127.0.0.1:{prometheus_port}");

    let prom = prometheus.as_str();
    wait_for("up{job=\"ehrsync\"} == 1", Duration::from_secs(30), || {
        processes.assert_running("prometheus");
        async move {
            let data = api(prom, "query", &[("query", "up{job=\"ehrsync\"}")]).await?;
            let result = data["result"].as_array().cloned().unwrap_or_default();
            match result.as_slice() {
                [sample] if sample["value"][1] == "1" => Ok(()),
                _ => Err(data.to_string()),
            }
        }
    })
    .await;

    let valid = query(prom, "ehrsync_token_valid{account=\"nx\"}").await;
    assert_eq!(valid.len(), 1, "{valid:?}");
    assert_eq!(valid[0].1, "1", "{valid:?}");
    assert_eq!(valid[0].0["job"], "ehrsync", "{valid:?}");
    assert_eq!(
        valid[0].0["instance"],
        format!("127.0.0.1:{agent_port}"),
        "{valid:?}"
    );

    // The agent's own `job` label (the ehrsync job) clashes with the scrape job's and is kept as
    // `exported_job`: alerts.yml relies on that.
    let success = query(
        prom,
        "ehrsync_sync_last_success_timestamp_seconds{account=\"nx\"}",
    )
    .await;
    assert_eq!(success.len(), 1, "{success:?}");
    assert_eq!(success[0].0["job"], "ehrsync", "{success:?}");
    assert_eq!(success[0].0["exported_job"], "patients", "{success:?}");
    // EhrsyncJobStale and EhrsyncJobNeverSucceeded match the two gauges on all their labels: one
    // interval per job, each beside its job's last success.
    let matched = query(
        prom,
        "ehrsync_sync_interval_seconds and ehrsync_sync_last_success_timestamp_seconds",
    )
    .await;
    let mut jobs: Vec<String> = matched
        .iter()
        .map(|(labels, _)| {
            format!(
                "{}/{}",
                labels["account"].as_str().unwrap_or("?"),
                labels["exported_job"].as_str().unwrap_or("?")
            )
        })
        .collect();
    jobs.sort_unstable();
    assert_eq!(jobs, ["niko/patients", "nx/patients"], "{matched:?}");
    let reload = query(prom, "ehrsync_config_last_reload_successful").await;
    assert_eq!(reload.len(), 1, "{reload:?}");
    assert_eq!(reload[0].1, "1", "{reload:?}");

    // Every rule of alerts.yml loaded and evaluates without error.
    wait_for(
        "every rule evaluated with health ok",
        Duration::from_secs(30),
        || async move {
            let data = api(prom, "rules", &[]).await?;
            let groups = data["groups"].as_array().cloned().unwrap_or_default();
            let rules: Vec<&Value> = groups
                .iter()
                .filter(|g| g["name"] == "ehrsync")
                .flat_map(|g| g["rules"].as_array().unwrap())
                .collect();
            let mut names: Vec<&str> = rules.iter().map(|r| r["name"].as_str().unwrap()).collect();
            names.sort_unstable();
            let mut expected = ALERT_NAMES.to_vec();
            expected.sort_unstable();
            if names != expected {
                return Err(format!("rules {names:?}, expected {expected:?}"));
            }
            let unhealthy: Vec<String> = rules
                .iter()
                .filter(|r| r["health"] != "ok")
                .map(|r| format!("{} {} {}", r["name"], r["health"], r["lastError"]))
                .collect();
            if unhealthy.is_empty() {
                Ok(())
            } else {
                Err(unhealthy.join("; "))
            }
        },
    )
    .await;

    // The wrong password raises EhrsyncAccountNeedsLogin for `bad`; the healthy accounts and the
    // agent itself raise nothing.
    wait_for(
        "alerts for the bad account only",
        Duration::from_secs(30),
        || async move {
            let data = api(prom, "alerts", &[]).await?;
            let alerts = data["alerts"].as_array().cloned().unwrap_or_default();
            let needs_login = alerts.iter().any(|a| {
                a["labels"]["alertname"] == "EhrsyncAccountNeedsLogin"
                    && a["labels"]["account"] == "bad"
                    && (a["state"] == "pending" || a["state"] == "firing")
            });
            let others: Vec<&Value> = alerts
                .iter()
                .filter(|a| a["labels"]["account"] != "bad")
                .collect();
            if needs_login && others.is_empty() {
                Ok(())
            } else {
                Err(serde_json::to_string_pretty(&alerts).unwrap())
            }
        },
    )
    .await;

    // Stop Prometheus, then the agent with SIGTERM: it exits 0.
    let prometheus_child = processes.child("prometheus");
    prometheus_child.kill().unwrap();
    prometheus_child.wait().unwrap();
    assert!(
        Command::new("kill")
            .args(["-TERM", &agent_pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let stopped = Instant::now();
    let exit = loop {
        if let Some(exit) = processes.child("ehrsync").try_wait().unwrap() {
            break exit;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(10),
            "no exit within 10 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(exit.code(), Some(0), "{}", processes.log("ehrsync"));
}
