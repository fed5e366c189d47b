//! An idle agent: four accounts (two Nextech, CareCentric, NikoHealth) with tokens stored by
//! an earlier `ehrsync sync` of each account's daily pull, so `ehrsync run` starts with valid
//! tokens and nothing due. Prints the time from start to READY=1 and to `/readyz` 200, then
//! CPU, wake-ups and RSS over 60 s of idling, and the token requests made meanwhile (0 when
//! stored tokens are used).
//!
//! Run: `cargo bench --bench idle [-- --seconds 60 --runs 3]`.

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
    use std::process::{Command, Stdio};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use ehrsync::clock::SystemClock;
    use ehrsync::sandbox::{self, Lifetimes, Sandbox};
    use ehrsync::vendor::Vendor;

    use crate::common::{self, Notify, spread};

    const ACCOUNTS: [(&str, Vendor); 4] = [
        ("nextech-a", Vendor::Nextech),
        ("nextech-b", Vendor::Nextech),
        ("carecentric", Vendor::CareCentric),
        ("nikohealth", Vendor::NikoHealth),
    ];

    pub fn main() {
        let seconds: f64 = common::arg("--seconds").unwrap_or(60.0);
        let runs: usize = common::arg("--runs").unwrap_or(3);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let sandbox = runtime
            .block_on(Sandbox::start(
                Arc::new(SystemClock),
                Lifetimes::documented(),
                0,
            ))
            .expect("the sandbox");
        sandbox.set_patients(1000);

        let dir = tempfile::tempdir().expect("a temporary directory");
        let port = common::free_port();
        let mut config = format!(
            "[agent]\ndatabase = 'state/ehrsync.db'\nmetrics_listen = '127.0.0.1:{port}'\n"
        );
        for (name, vendor) in ACCOUNTS {
            config.push_str(&sandbox.account_config(vendor, name));
            let kind = if vendor == Vendor::NikoHealth {
                "nikohealth_patients"
            } else {
                "fhir"
            };
            config.push_str(&format!(
                "[[accounts.{name}.jobs]]\nname = 'patients'\nkind = '{kind}'\nschedule = '0 0 3 * * *'\n"
            ));
        }
        let path = dir.path().join("ehrsync.toml");
        std::fs::write(&path, config).expect("write the config");
        let ehrsync = |args: &[&str]| {
            let mut cmd = Command::new(common::EHRSYNC);
            cmd.args(args)
                .arg("--config")
                .arg(&path)
                .env_clear()
                .envs(sandbox::credentials_env())
                .env("EHRSYNC_LOG", "warn");
            cmd
        };
        // Tokens and a completed run for every job, as a running installation has them.
        for (name, _) in ACCOUNTS {
            let out = ehrsync(&["sync", name, "patients"])
                .output()
                .expect("run ehrsync sync");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }

        println!(
            "idle: `ehrsync run`, 4 accounts with stored tokens, {seconds} s idle, {runs} runs"
        );
        let (mut to_ready, mut to_valid, mut cpu, mut wakeups, mut rss, mut requests) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        for _ in 0..runs {
            let before = token_requests(&sandbox);
            let notify = Notify::new();
            let started = Instant::now();
            let child = ehrsync(&["run"])
                .env("NOTIFY_SOCKET", notify.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start ehrsync run");
            let pid = child.id();
            let ready = notify
                .wait_for("READY=1", Duration::from_secs(30))
                .expect("READY=1 from ehrsync run");
            let valid = loop {
                if common::http_status(port, "/readyz") == Some(200) {
                    break Instant::now();
                }
                assert!(started.elapsed() < Duration::from_secs(30), "never ready");
                std::thread::sleep(Duration::from_millis(1));
            };
            to_ready.push((ready - started).as_secs_f64() * 1e3);
            to_valid.push((valid - started).as_secs_f64() * 1e3);
            // Let start-up settle, then measure the idling.
            std::thread::sleep(Duration::from_secs(1));
            let (c0, w0, t0) = (cpu_ns(pid), context_switches(pid), Instant::now());
            std::thread::sleep(Duration::from_secs_f64(seconds));
            let (c1, w1, wall) = (
                cpu_ns(pid),
                context_switches(pid),
                t0.elapsed().as_secs_f64(),
            );
            let u1 = common::usage(pid).expect("the agent");
            cpu.push(c1.saturating_sub(c0) as f64 / 1e9 / wall * 100.0);
            wakeups.push(w1.saturating_sub(w0) as f64 / wall);
            rss.push(u1.rss_kb as f64 / 1024.0);
            // SAFETY: signalling our own child by its pid.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
            let (code, _) = common::wait_with_peak_rss(child);
            assert_eq!(code, Some(0), "ehrsync run exited badly");
            requests.push((token_requests(&sandbox) - before) as f64);
        }
        println!("  start -> READY=1: {} ms", spread(&to_ready, 1));
        println!(
            "  start -> /readyz 200 (every token valid): {} ms",
            spread(&to_valid, 1)
        );
        println!("  CPU while idle: {} % of one core", spread(&cpu, 4));
        println!(
            "  wake-ups (context switches) while idle: {} per second",
            spread(&wakeups, 2)
        );
        println!("  RSS while idle: {} MB", spread(&rss, 1));
        println!("  token requests during the runs: {}", spread(&requests, 0));
    }

    /// Nanoseconds on CPU of every thread of `pid` so far (`schedstat`: finer than the clock
    /// ticks of `stat`, which would round an idle minute to zero).
    fn cpu_ns(pid: u32) -> u64 {
        per_thread(pid, "schedstat", |text| {
            text.split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        })
    }

    /// Context switches of every thread of `pid` so far: each is a wake-up.
    fn context_switches(pid: u32) -> u64 {
        per_thread(pid, "status", |text| {
            text.lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum()
        })
    }

    /// The sum over `pid`'s threads of `read` applied to each one's `/proc/PID/task/TID/FILE`.
    fn per_thread(pid: u32, file: &str, read: impl Fn(&str) -> u64) -> u64 {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return 0;
        };
        tasks
            .filter_map(Result::ok)
            .filter_map(|t| std::fs::read_to_string(t.path().join(file)).ok())
            .map(|text| read(&text))
            .sum()
    }

    fn token_requests(sandbox: &Sandbox) -> u64 {
        let mut n = 0;
        for vendor in [Vendor::Nextech, Vendor::CareCentric, Vendor::NikoHealth] {
            for grant in ["password", "refresh_token", "client_credentials"] {
                n += u64::from(sandbox.requests(vendor, grant));
            }
        }
        n
    }
}
