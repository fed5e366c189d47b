//! The token broker under load: the release `ehrsync run` holds one Nextech account whose
//! sandbox tokens live 20 s, and 100 concurrent clients on its Unix socket ask, in turn, for
//! the account's token and for a proxied FHIR page, for 2 minutes. Then, for the added
//! latency, the same clients call the sandbox directly with the token (and `nx-practice-id`)
//! for as many calls as went through the proxy per client, alternating with proxied ones.
//!
//! Prints requests per second, failed requests, tokens handed out that had expired (or that the
//! sandbox no longer accepted) when they arrived, every token request the sandbox saw (with the
//! shortest gap between two: a request caused by a client would follow another at once), and
//! the latency of proxied against direct calls.
//!
//! Run: `cargo bench --bench broker [-- --clients 100 --seconds 120 --lifetime 20]`.

#[cfg(target_os = "linux")]
mod common;

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("this benchmark uses a Unix socket and /proc: Linux only");
}

#[cfg(target_os = "linux")]
fn main() {
    bench::main();
}

#[cfg(target_os = "linux")]
mod bench {
    use std::process::{Command, Stdio};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    use ehrsync::clock::SystemClock;
    use ehrsync::sandbox::{self, Lifetimes, Sandbox};
    use ehrsync::vendor::Vendor;

    use crate::common::{self, quantile, sorted};

    const KEY: &str = "load-test-client-key-5c1e9a7b3d";

    #[derive(Default)]
    struct Counts {
        tokens: AtomicU64,
        pages: AtomicU64,
        failed: AtomicU64,
        expired: AtomicU64,
    }

    pub fn main() {
        let clients: usize = common::arg("--clients").unwrap_or(100);
        let seconds: u64 = common::arg("--seconds").unwrap_or(120);
        let lifetime = Duration::from_secs(common::arg("--lifetime").unwrap_or(20));
        let _ = rustls::crypto::ring::default_provider().install_default();
        // The sandbox gets a runtime of its own, so the clients' load does not starve it.
        let sandbox_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let sandbox = sandbox_rt
            .block_on(Sandbox::start(
                Arc::new(SystemClock),
                Lifetimes {
                    nextech_access: lifetime,
                    ..Lifetimes::documented()
                },
                0,
            ))
            .expect("the sandbox");
        sandbox.set_patients(1000);
        sandbox.record_issuance();
        let sandbox = Arc::new(sandbox);

        let dir = tempfile::tempdir().expect("a temporary directory");
        let port = common::free_port();
        let config = format!(
            "[agent]\ndatabase = 'state/ehrsync.db'\nmetrics_listen = '127.0.0.1:{port}'\n{}\
             [broker]\nlisten = 'unix:broker.sock'\n[broker.clients.load]\n\
             key = {{ env = 'LOAD_KEY' }}\naccounts = ['nx']\n",
            sandbox.account_config(Vendor::Nextech, "nx")
        );
        let path = dir.path().join("ehrsync.toml");
        std::fs::write(&path, config).expect("write the config");
        let mut child = Command::new(common::EHRSYNC)
            .args(["run", "--config"])
            .arg(&path)
            .env_clear()
            .envs(sandbox::credentials_env())
            .env("LOAD_KEY", KEY)
            .env("EHRSYNC_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start ehrsync run");
        let socket = dir.path().join("broker.sock");
        let started = Instant::now();
        while common::http_status(port, "/readyz") != Some(200) || !socket.exists() {
            assert!(started.elapsed() < Duration::from_secs(60), "never ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        println!(
            "broker: {clients} clients, {seconds} s, {}-second access tokens",
            lifetime.as_secs()
        );

        let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
        let broker = reqwest::Client::builder()
            .unix_socket(socket.as_path())
            .pool_max_idle_per_host(clients)
            .timeout(Duration::from_secs(60))
            .build()
            .expect("a client");
        let direct = reqwest::Client::builder()
            .pool_max_idle_per_host(clients)
            .timeout(Duration::from_secs(60))
            .build()
            .expect("a client");
        let counts = Arc::new(Counts::default());
        let api = sandbox.api_base(Vendor::Nextech).to_string();
        let first_request = sandbox.issuance().len();
        let load_started = Instant::now();
        let until = load_started + Duration::from_secs(seconds);
        let proxied: Vec<Vec<f64>> = runtime.block_on(async {
            let tasks: Vec<_> = (0..clients)
                .map(|_| {
                    let (broker, counts, sandbox) =
                        (broker.clone(), counts.clone(), sandbox.clone());
                    tokio::spawn(async move {
                        let mut latencies = Vec::new();
                        while Instant::now() < until {
                            token(&broker, &counts, &sandbox).await;
                            latencies.push(timed_page(&counts, proxied_page(&broker)).await);
                        }
                        latencies
                    })
                })
                .collect();
            let mut all = Vec::new();
            for t in tasks {
                all.push(t.await.expect("a client task"));
            }
            all
        });
        let load = load_started.elapsed().as_secs_f64();
        let token_requests: Vec<_> = sandbox.issuance().split_off(first_request);
        let (tokens, pages) = (
            counts.tokens.load(Ordering::Relaxed),
            counts.pages.load(Ordering::Relaxed),
        );
        let (failed, expired) = (
            counts.failed.load(Ordering::Relaxed),
            counts.expired.load(Ordering::Relaxed),
        );
        println!(
            "  {:.0} requests/s ({tokens} tokens, {pages} proxied pages in {load:.0} s)",
            (tokens + pages) as f64 / load
        );
        println!("  failed requests: {failed}; expired tokens handed out: {expired}");
        let mut at: Vec<i64> = token_requests.iter().map(|t| t.at.unix_millis()).collect();
        at.sort_unstable();
        let shortest = at.windows(2).map(|w| w[1] - w[0]).min();
        println!(
            "  token requests the sandbox saw while loaded: {} ({}), shortest gap between two {}; \
             the owner alone refreshes about every {:.0} s",
            token_requests.len(),
            token_requests
                .iter()
                .map(|t| t.grant.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            shortest.map_or_else(|| "-".to_owned(), |ms| format!("{:.1} s", ms as f64 / 1e3)),
            {
                // The owner's plan: 75 % of the lifetime, but at least min_lead (60 s, at most
                // half the lifetime) before expiry.
                let lead = (lifetime / 2).min(Duration::from_secs(60));
                lifetime.mul_f64(0.75).min(lifetime - lead).as_secs_f64()
            }
        );

        // Added latency: per client, the same number of calls alternating proxied and direct.
        let per_client = 50;
        let (via_broker, straight): (Vec<f64>, Vec<f64>) = runtime.block_on(async {
            let tasks: Vec<_> = (0..clients)
                .map(|_| {
                    let (broker, direct, counts, sandbox, api) = (
                        broker.clone(),
                        direct.clone(),
                        counts.clone(),
                        sandbox.clone(),
                        api.clone(),
                    );
                    tokio::spawn(async move {
                        let (mut b, mut d) = (Vec::new(), Vec::new());
                        for _ in 0..per_client {
                            let Some(token) = token(&broker, &counts, &sandbox).await else {
                                continue;
                            };
                            b.push(timed_page(&counts, proxied_page(&broker)).await);
                            let straight = direct
                                .get(format!("{api}/Patient?_count=10"))
                                .bearer_auth(token)
                                .header("nx-practice-id", "1001");
                            d.push(timed_page(&counts, straight).await);
                        }
                        (b, d)
                    })
                })
                .collect();
            let (mut b, mut d) = (Vec::new(), Vec::new());
            for t in tasks {
                let (tb, td) = t.await.expect("a client task");
                b.extend(tb);
                d.extend(td);
            }
            (b, d)
        });
        let (proxied, via_broker, straight) = (
            sorted(proxied.into_iter().flatten().collect()),
            sorted(via_broker),
            sorted(straight),
        );
        println!(
            "  proxied page under load: p50 {:.1} ms, p99 {:.1} ms",
            quantile(&proxied, 0.5),
            quantile(&proxied, 0.99)
        );
        println!(
            "  alternating, {per_client} calls per client: proxied p50 {:.1} ms p99 {:.1} ms; direct p50 {:.1} ms p99 {:.1} ms; \
             added by the proxy: {:.1} ms at p50",
            quantile(&via_broker, 0.5),
            quantile(&via_broker, 0.99),
            quantile(&straight, 0.5),
            quantile(&straight, 0.99),
            quantile(&via_broker, 0.5) - quantile(&straight, 0.5)
        );
        println!(
            "  failed requests over both phases: {}",
            counts.failed.load(Ordering::Relaxed)
        );
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let _ = child.wait();
    }

    /// Asks the broker for the token; counts it, and whether it had expired on arrival.
    async fn token(broker: &reqwest::Client, counts: &Counts, sandbox: &Sandbox) -> Option<String> {
        let answer = broker
            .get("http://broker/v1/accounts/nx/token")
            .bearer_auth(KEY)
            .send()
            .await;
        let body = match answer {
            Ok(a) if a.status().is_success() => a.bytes().await.ok(),
            _ => None,
        };
        let parsed: Option<serde_json::Value> = body.and_then(|b| serde_json::from_slice(&b).ok());
        let Some(access) = parsed
            .as_ref()
            .and_then(|v| v["access_token"].as_str())
            .map(str::to_owned)
        else {
            counts.failed.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        counts.tokens.fetch_add(1, Ordering::Relaxed);
        let left = parsed.as_ref().and_then(|v| v["expires_in"].as_u64());
        if left == Some(0) || !sandbox.access_token_valid(&access) {
            counts.expired.fetch_add(1, Ordering::Relaxed);
        }
        Some(access)
    }

    /// Sends a page request and counts it, as a page when it came back 200 with a Bundle, else
    /// as failed; returns how long it took, in milliseconds.
    async fn timed_page(counts: &Counts, request: reqwest::RequestBuilder) -> f64 {
        let started = Instant::now();
        let ok = match request.send().await {
            Ok(a) if a.status().is_success() => a
                .bytes()
                .await
                .is_ok_and(|b| b.windows(8).any(|w| w == b"\"Bundle\"")),
            _ => false,
        };
        let ms = started.elapsed().as_secs_f64() * 1e3;
        if ok {
            counts.pages.fetch_add(1, Ordering::Relaxed);
        } else {
            counts.failed.fetch_add(1, Ordering::Relaxed);
        }
        ms
    }

    /// A page of ten patients through the broker's proxy.
    fn proxied_page(broker: &reqwest::Client) -> reqwest::RequestBuilder {
        broker
            .get("http://broker/v1/accounts/nx/api/Patient?_count=10")
            .bearer_auth(KEY)
    }
}
