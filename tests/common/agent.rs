//! `ehrsync run` and `ehrsync login` as child processes: the real binary with a controlled
//! environment, its log captured, its endpoints polled.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ehrsync::sandbox;

/// A running `ehrsync run`; killed on drop if a test fails before it exits.
pub struct Agent {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub log: PathBuf,
    /// The config's store lines (see [`super::database_lines`]), kept across rewrites.
    database: String,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An agent's config: a new store (`state/ehrsync.db`, or a new PostgreSQL database), the
/// metrics port, the stop grace, then `body`.
pub fn config_text(port: u16, body: &str, grace: &str) -> String {
    config_with(
        &super::database_lines("state/ehrsync.db"),
        port,
        body,
        grace,
    )
}

fn config_with(database: &str, port: u16, body: &str, grace: &str) -> String {
    format!(
        "[agent]\n{database}metrics_listen = '127.0.0.1:{port}'\nshutdown_grace = '{grace}'\n{body}"
    )
}

/// `ehrsync run --config PATH` with the sandbox's credentials and `extra_env`, its log
/// appended to `log`.
fn spawn_run(path: &std::path::Path, log: &std::path::Path, extra_env: &[(&str, &str)]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(super::binary())
        .env_clear()
        .envs(sandbox::credentials_env())
        .env("EHRSYNC_LOG", "debug")
        // After the default: a test may ask for another level.
        .envs(extra_env.iter().copied())
        .args(["run", "--config", path.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

impl Agent {
    pub fn start(body: &str, grace: &str, extra_env: &[(&str, &str)]) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let port = super::free_port();
        let database = super::database_lines("state/ehrsync.db");
        let path = super::write_config(dir.path(), &config_with(&database, port, body, grace));
        let log = dir.path().join("ehrsync.log");
        let child = spawn_run(&path, &log, extra_env);
        Agent {
            child,
            dir,
            port,
            log,
            database,
        }
    }

    /// Starts the agent again with the same config, database and log, once the previous
    /// process has exited (the sandbox's credentials only).
    pub fn restart(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_some(),
            "the agent is still running"
        );
        self.child = spawn_run(&self.config_path(), &self.log, &[]);
    }

    pub fn rewrite(&self, body: &str, grace: &str) {
        super::write_config(
            self.dir.path(),
            &config_with(&self.database, self.port, body, grace),
        );
    }

    /// The SQLite file of an agent on SQLite (tests of the file itself).
    pub fn db(&self) -> PathBuf {
        self.dir.path().join("state/ehrsync.db")
    }

    /// The agent's store, as its config names it.
    pub fn database(&self) -> ehrsync::config::Database {
        super::database_of(&self.config_path())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, name: &str) {
        let sent = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    }

    /// Waits up to `limit` for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let since = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                since.elapsed() < limit,
                "no exit within {limit:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        super::http_get(&format!("http://127.0.0.1:{}{path}", self.port)).await
    }

    pub async fn metrics(&self) -> String {
        self.get("/metrics").await.map(|r| r.1).unwrap_or_default()
    }

    /// Waits until `/metrics` satisfies `ok`, returning it.
    pub async fn metrics_until(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let since = Instant::now();
        loop {
            let m = self.metrics().await;
            if ok(&m) {
                return m;
            }
            assert!(
                since.elapsed() < Duration::from_secs(20),
                "{what} not seen within 20 s; metrics:\n{m}\nlog:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn wait_ready(&self) {
        let since = Instant::now();
        while self.get("/readyz").await.map(|r| r.0) != Some(200) {
            assert!(
                since.elapsed() < Duration::from_secs(20),
                "not ready within 20 s; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Agent {
    /// The config file the agent runs with (what `ehrsync login` must be given too).
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("ehrsync.toml")
    }
}

/// A running `ehrsync login`: its stdout read line by line as it comes, stderr to a file.
pub struct Login {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: PathBuf,
    _stderr_dir: tempfile::TempDir,
}

impl Drop for Login {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Login {
    /// Starts `ehrsync --config CONFIG login ARGS…` with the sandbox's credentials and `env`.
    pub fn start(config: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Login {
        let dir = tempfile::tempdir().unwrap();
        let stderr = dir.path().join("login.err");
        let mut child = Command::new(env!("CARGO_BIN_EXE_ehrsync"))
            .env_clear()
            .envs(sandbox::credentials_env())
            .envs(env.iter().copied())
            .arg("--config")
            .arg(config)
            .arg("login")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Login {
            child,
            lines,
            seen: Vec::new(),
            stderr,
            _stderr_dir: dir,
        }
    }

    /// The first line of stdout that is an address by itself (the authorization URL, or the
    /// device verification URL with its code), waiting up to 20 s.
    pub fn url(&mut self) -> String {
        let since = Instant::now();
        loop {
            if let Some(url) = self
                .seen
                .iter()
                .find(|l| l.starts_with("http://") || l.starts_with("https://"))
            {
                return url.clone();
            }
            let left = Duration::from_secs(20).saturating_sub(since.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!(
                    "no address printed within 20 s; stdout:\n{}\nstderr:\n{}",
                    self.seen.join("\n"),
                    std::fs::read_to_string(&self.stderr).unwrap_or_default()
                ),
            }
        }
    }

    /// Waits up to `limit` for the exit: its status, stdout and stderr.
    pub fn finish(mut self, limit: Duration) -> (ExitStatus, String, String) {
        let since = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                since.elapsed() < limit,
                "login did not exit within {limit:?}; stdout:\n{}\nstderr:\n{}",
                self.seen.join("\n"),
                std::fs::read_to_string(&self.stderr).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        // The reader thread ends with the pipe; collect what it still has.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.seen.push(line);
        }
        let stderr = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        (status, self.seen.join("\n"), stderr)
    }
}

/// A browser that follows nothing by itself: each redirect is looked at, as a test must.
pub fn browser() -> reqwest::Client {
    ehrsync::http::client_builder(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Opens the authorization URL (the sandbox consents at once) and returns where it redirects.
pub async fn authorize(url: &str) -> url::Url {
    let response = browser().get(url).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 302, "{url}");
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    url::Url::parse(&location).unwrap()
}

/// Delivers the redirect to `ehrsync login`'s loopback listener, as the browser would.
pub async fn deliver(callback: &url::Url) -> (u16, String) {
    let response = browser().get(callback.clone()).send().await.unwrap();
    (
        response.status().as_u16(),
        response.text().await.unwrap_or_default(),
    )
}

/// A whole browser login for `account` with `ehrsync --config CONFIG login ACCOUNT
/// --no-browser`, the sandbox consenting at once; panics unless it succeeds.
pub async fn log_in(config: &std::path::Path, account: &str) {
    let mut login = Login::start(config, &[account, "--no-browser"], &[]);
    let callback = authorize(&login.url()).await;
    let (status, page) = deliver(&callback).await;
    assert_eq!(status, 200, "{page}");
    let (exit, stdout, stderr) = login.finish(Duration::from_secs(20));
    assert!(exit.success(), "login failed:\n{stdout}\n{stderr}");
}
