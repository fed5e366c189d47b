//! Many accounts with short tokens: the vendor sandbox issues 30-second Nextech tokens to 1,000
//! accounts (each with its own tenant, so the sandbox can tell them apart) and the release
//! `ehrsync run` keeps them all alive for 10 minutes. Prints the moments an account held no
//! valid token (from the sandbox's record of every token it issued), how late refreshes set
//! out against their plan (from the agents' logs), each agent's CPU share after start-up, its
//! RSS and threads, and how long start-up and shutdown took.
//!
//! With `--agents N`, N agents share the database and divide the accounts (each owns about
//! `accounts / N`; its `/metrics` says which): each agent's CPU and owned accounts are printed.
//! `--postgres URL` keeps the database on that PostgreSQL server (a new database, made with
//! the URL's role, which must be allowed to create one) instead of a SQLite file.
//!
//! Run: `cargo bench --bench accounts [-- --accounts 1000 --minutes 10 --lifetime 30
//! --agents 2 --postgres postgres://postgres@127.0.0.1:5432/postgres]`.

#[cfg(target_os = "linux")]
mod common;

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("this benchmark measures through /proc: Linux only");
}

#[cfg(target_os = "linux")]
fn main() {
    bench::main();
}

#[cfg(target_os = "linux")]
mod bench {
    use std::collections::HashMap;
    use std::process::{Command, Stdio};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use ehrsync::clock::{Clock, SystemClock};
    use ehrsync::sandbox::{self, Issued, Lifetimes, Sandbox};
    use ehrsync::vendor::Vendor;

    use crate::common::{self, Notify, quantile, sorted};

    pub fn main() {
        let accounts: usize = common::arg("--accounts").unwrap_or(1000);
        let minutes: f64 = common::arg("--minutes").unwrap_or(10.0);
        let lifetime = Duration::from_secs(common::arg("--lifetime").unwrap_or(30));
        let agents: usize = common::arg("--agents").unwrap_or(1);
        let postgres: Option<String> = common::arg("--postgres");
        // The sandbox plays every vendor account on one thread of its own.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let clock = SystemClock;
        let sandbox = runtime
            .block_on(Sandbox::start(
                Arc::new(SystemClock),
                Lifetimes {
                    nextech_access: lifetime,
                    ..Lifetimes::documented()
                },
                0,
            ))
            .expect("the sandbox");
        sandbox.record_issuance();

        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut config = String::from("[agent]\n");
        match &postgres {
            Some(server) => config.push_str(&format!(
                "database = '{}'\ntoken_key = {{ file = 'ehrsync.key' }}\n",
                common::new_postgres_database(&runtime, server, "ehrsync_bench_accounts")
            )),
            None => config.push_str("database = 'state/ehrsync.db'\n"),
        }
        let shared_url = sandbox.token_url(Vendor::Nextech).to_string();
        for i in 0..accounts {
            let own_url = sandbox.tenant_token_url(&format!("t{i:04}")).to_string();
            config.push_str(
                &sandbox
                    .account_config(Vendor::Nextech, &format!("a{i:04}"))
                    .replace(&shared_url, &own_url),
            );
        }
        let path = dir.path().join("ehrsync.toml");
        std::fs::write(&path, config).expect("write the config");

        println!(
            "accounts: {accounts} Nextech accounts, {}-second access tokens, {minutes} minutes, \
             {agents} agent(s) on {}",
            lifetime.as_secs(),
            if postgres.is_some() {
                "PostgreSQL"
            } else {
                "a SQLite file"
            }
        );
        let started = Instant::now();
        let mut running: Vec<Agent> = (0..agents)
            .map(|i| Agent::start(&path, &dir.path().join(format!("agent{i}.log"))))
            .collect();
        let mut ready = Vec::new();
        for agent in &running {
            ready.push(
                agent
                    .notify
                    .wait_for("READY=1", Duration::from_secs(120))
                    .expect("READY=1 from ehrsync run"),
            );
        }
        let all_valid = loop {
            if running
                .iter()
                .all(|a| common::http_status(a.port, "/readyz") == Some(200))
            {
                break Instant::now();
            }
            assert!(
                started.elapsed() < Duration::from_secs(300),
                "the accounts never all held a valid token"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        let at_ready: Vec<common::Usage> = running
            .iter()
            .map(|a| common::usage(a.pid).expect("the running agent"))
            .collect();
        let until = all_valid + Duration::from_secs_f64(minutes * 60.0);
        while Instant::now() < until {
            std::thread::sleep(Duration::from_secs(1).min(until - Instant::now()));
            for agent in &mut running {
                let u = common::usage(agent.pid).expect("the running agent");
                agent.rss_mb.push(u.rss_kb as f64 / 1024.0);
                agent.threads = agent.threads.max(u.threads);
            }
        }
        let end = clock.now();
        let steady = all_valid.elapsed();
        let at_end: Vec<common::Usage> = running
            .iter()
            .map(|a| common::usage(a.pid).expect("the running agent"))
            .collect();
        let owned: Vec<Option<usize>> = running.iter().map(|a| owned(a.port)).collect();
        for agent in &running {
            // SAFETY: signalling our own child by its pid.
            unsafe { libc::kill(agent.pid as libc::pid_t, libc::SIGTERM) };
        }
        let stopping = Instant::now();
        let mut peaks = Vec::new();
        for agent in &mut running {
            let child = agent.child.take().expect("each agent is waited for once");
            let (code, peak_kb) = common::wait_with_peak_rss(child);
            assert_eq!(code, Some(0), "ehrsync run exited badly");
            peaks.push(peak_kb);
        }
        let stopped = stopping.elapsed();

        let issued = sandbox.issuance();
        let gaps = expired_moments(&issued, end);
        let late = sorted(
            running
                .iter()
                .flat_map(|a| lateness_ms(&std::fs::read_to_string(&a.log).unwrap_or_default()))
                .collect(),
        );
        let refreshes = issued.iter().filter(|t| t.grant == "refresh_token").count();
        let logins = issued.len() - refreshes;

        println!(
            "  start: READY=1 after {:.0} ms, every account valid after {:.2} s ({:.2} s of CPU)",
            ready
                .iter()
                .map(|r| (*r - started).as_secs_f64() * 1e3)
                .fold(0.0, f64::max),
            (all_valid - started).as_secs_f64(),
            at_ready.iter().map(|u| u.cpu.as_secs_f64()).sum::<f64>()
        );
        println!(
            "  tokens issued: {logins} logins, {refreshes} refreshes ({:.1} refreshes/s); overlapping requests for one account: {}",
            refreshes as f64 / steady.as_secs_f64(),
            sandbox.overlapping_token_requests()
        );
        println!(
            "  expired-token moments: {} (accounts affected {}, longest {:.0} ms)",
            gaps.count, gaps.accounts, gaps.longest_ms
        );
        println!(
            "  refresh lateness: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} refreshes)",
            quantile(&late, 0.5),
            quantile(&late, 0.9),
            quantile(&late, 0.99),
            late.last().copied().unwrap_or(f64::NAN),
            late.len()
        );
        for (i, agent) in running.iter().enumerate() {
            let cpu = (at_end[i].cpu - at_ready[i].cpu).as_secs_f64() / steady.as_secs_f64();
            let rss = sorted(agent.rss_mb.clone());
            println!(
                "  agent {i}: owns {} accounts; CPU after start-up {:.2} % of one core; RSS median {:.1} MB, max {:.1} MB, peak over the run {:.1} MB; threads {}",
                owned[i].map_or("?".to_owned(), |n| n.to_string()),
                cpu * 100.0,
                quantile(&rss, 0.5),
                rss.last().copied().unwrap_or(f64::NAN),
                peaks[i] as f64 / 1024.0,
                agent.threads
            );
        }
        println!("  SIGTERM -> exit: {:.0} ms", stopped.as_secs_f64() * 1e3);
    }

    /// One `ehrsync run` process and what is sampled of it.
    struct Agent {
        child: Option<std::process::Child>,
        pid: u32,
        port: u16,
        log: std::path::PathBuf,
        notify: Notify,
        rss_mb: Vec<f64>,
        threads: u64,
    }

    impl Agent {
        fn start(config: &std::path::Path, log: &std::path::Path) -> Agent {
            let port = common::free_port();
            let notify = Notify::new();
            let child = Command::new(common::EHRSYNC)
                .args(["run", "--config"])
                .arg(config)
                .env_clear()
                .envs(sandbox::credentials_env())
                .env(
                    "EHRSYNC__AGENT__METRICS_LISTEN",
                    format!("127.0.0.1:{port}"),
                )
                .env("EHRSYNC_LOG", "info")
                .env("EHRSYNC_LOG_FORMAT", "json")
                .env("NOTIFY_SOCKET", notify.path())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(log).expect("create the log"))
                .spawn()
                .expect("start ehrsync run");
            Agent {
                pid: child.id(),
                child: Some(child),
                port,
                log: log.to_owned(),
                notify,
                rss_mb: Vec::new(),
                threads: 0,
            }
        }
    }

    /// The accounts an agent owns, from its `/metrics` (`ehrsync_account_owned`).
    fn owned(port: u16) -> Option<usize> {
        let body = common::http_body(port, "/metrics")?;
        Some(
            body.lines()
                .filter(|l| l.starts_with("ehrsync_account_owned{") && l.ends_with(" 1"))
                .count(),
        )
    }

    struct Gaps {
        count: usize,
        accounts: usize,
        longest_ms: f64,
    }

    /// Moments an account held no valid token: a token issued after the previous one of its
    /// tenant had expired, or a tenant whose last token had expired by `end`.
    fn expired_moments(issued: &[Issued], end: ehrsync::token::Timestamp) -> Gaps {
        let mut by_tenant: HashMap<&str, Vec<&Issued>> = HashMap::new();
        for t in issued {
            by_tenant.entry(&t.tenant).or_default().push(t);
        }
        let mut gaps = Gaps {
            count: 0,
            accounts: 0,
            longest_ms: 0.0,
        };
        for tokens in by_tenant.values_mut() {
            tokens.sort_by_key(|t| t.at);
            let mut expiries: Vec<_> = tokens.iter().map(|t| t.expires).collect();
            let starts = tokens.iter().skip(1).map(|t| t.at);
            let mut found = 0;
            // A token counts from when the next one was issued, up to its own expiry.
            let mut valid_until = expiries[0];
            for (start, expires) in starts.zip(expiries.drain(1..)) {
                if start > valid_until {
                    found += 1;
                    let ms = start.unix_millis() - valid_until.unix_millis();
                    gaps.longest_ms = gaps.longest_ms.max(ms as f64);
                }
                valid_until = valid_until.max(expires);
            }
            if valid_until < end {
                found += 1;
                let ms = end.unix_millis() - valid_until.unix_millis();
                gaps.longest_ms = gaps.longest_ms.max(ms as f64);
            }
            gaps.count += found;
            gaps.accounts += usize::from(found > 0);
        }
        gaps
    }

    /// `late_ms` of every "obtained a new access token" line of the agent's JSON log, sorted.
    fn lateness_ms(log: &str) -> Vec<f64> {
        sorted(
            log.lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|v| v["message"] == "obtained a new access token")
                .filter_map(|v| v["late_ms"].as_f64())
                .collect(),
        )
    }
}
