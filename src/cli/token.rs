//! `ehrsync token ACCOUNT [--min-valid 60s]`: prints a valid access token of the account, for
//! scripts (`curl -H "Authorization: Bearer $(ehrsync token nextech-main)" …`).
//!
//! - With `EHRSYNC_BROKER_KEY` set (a broker client's key), it asks the running agent's broker
//!   (at `--broker`, else the config's `broker.listen`): the way for a user who may not read
//!   the database or its key. The broker's rules apply (the client must be allowed the account).
//! - Without it, it reads the token through the database like `ehrsync sync` does: the stored
//!   token when it is valid long enough, else a refresh under the account's lease (so it takes
//!   turns with a running agent, and adopts what the agent stores meanwhile).
//!
//! Only the token goes to stdout (one line); everything else to stderr.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use secrecy::ExposeSecret;
use tokio::sync::watch;

use crate::clock::{SharedClock, SystemClock};
use crate::config::{self, BrokerListen};
use crate::token::owner::{Shared, Wanted};

/// How long `ehrsync token` waits for a token before giving up.
const WAIT: Duration = Duration::from_secs(60);
/// The environment variable holding a broker client's key.
pub const BROKER_KEY_ENV: &str = "EHRSYNC_BROKER_KEY";

pub struct Args {
    pub account: String,
    pub min_valid: Duration,
    /// `unix:/path` or `127.0.0.1:PORT`: overrides the config's `broker.listen`.
    pub broker: Option<String>,
}

pub async fn run(config_path: &Path, args: Args) -> ExitCode {
    let env = config::Env::from_process();
    let printed = match env.get(BROKER_KEY_ENV).filter(|k| !k.is_empty()) {
        Some(key) => from_broker(config_path, &args, &key).await,
        None => from_store(config_path, &env, &args).await,
    };
    match printed {
        Ok(token) => {
            let code = ExitCode::SUCCESS;
            super::output::finish(super::output::print(format_args!("{token}\n")), code)
        }
        Err((code, message)) => {
            eprintln!("error: {message}");
            ExitCode::from(code)
        }
    }
}

type Failure = (u8, String);

async fn from_store(config_path: &Path, env: &config::Env, args: &Args) -> Result<String, Failure> {
    let config = super::load_for_account(config_path, env, &args.account).map_err(|_| {
        (
            super::EXIT_CONFIG,
            "the config is invalid (see above)".to_owned(),
        )
    })?;
    let Some(account) = config.account(&args.account).cloned() else {
        let names: Vec<&str> = config.accounts.iter().map(|a| a.name.as_str()).collect();
        return Err((
            super::EXIT_CONFIG,
            format!(
                "no account `{}` in {}; configured: {}",
                args.account,
                config.path.display(),
                names.join(", ")
            ),
        ));
    };
    let failed = |e: &dyn std::fmt::Display| (super::EXIT_FAILURE, e.to_string());
    let clock: SharedClock = Arc::new(SystemClock);
    if let Some(path) = &config.agent.ca_file {
        crate::http::trust_extra_roots(path).map_err(|e| failed(&e))?;
    }
    let store = crate::store::Store::open(&config.agent.database)
        .await
        .map_err(|e| failed(&e))?;
    let cipher = match crate::crypto::TokenCipher::load(&config.agent.token_key, env) {
        Ok(c) => c,
        Err(e) => {
            store.close().await;
            return Err(failed(&e));
        }
    };
    let http = match crate::token::client::http_client(crate::agent::TOKEN_REQUEST_TIMEOUT) {
        Ok(h) => h,
        Err(e) => {
            store.close().await;
            return Err(failed(&e));
        }
    };
    let metrics = crate::metrics::Metrics::new().map_err(|e| failed(&e))?;
    let shared =
        Shared::new(store.clone(), cipher, http, clock, metrics).with_config_path(&config.path);
    let (stop_tx, stop) = watch::channel(false);
    let spawned = crate::token::owner::spawn(Arc::new(account), shared, stop).await;
    let (handle, owner) = match spawned {
        Ok(s) => s,
        Err(e) => {
            store.close().await;
            return Err(failed(&e));
        }
    };
    let wanted = tokio::time::timeout(WAIT, handle.token_valid_for(args.min_valid)).await;
    let _ = stop_tx.send(true);
    let _ = owner.await;
    store.close().await;
    match wanted {
        Ok(Ok(t)) => Ok(t.access_token.expose_secret().to_owned()),
        Ok(Err(Wanted::Unavailable(e))) => Err(failed(&e)),
        Ok(Err(Wanted::LongerThanLifetime { lifetime })) => Err((
            super::EXIT_FAILURE,
            format!(
                "--min-valid cannot be met: the account's access tokens live {}, and one is refreshed early only once it is a tenth of that old",
                humantime::format_duration(lifetime)
            ),
        )),
        Err(_) => Err((
            super::EXIT_FAILURE,
            "no valid token within 60 s; see `ehrsync status` for the account's last error"
                .to_owned(),
        )),
    }
}

async fn from_broker(config_path: &Path, args: &Args, key: &str) -> Result<String, Failure> {
    let listen = match &args.broker {
        Some(text) => match text.strip_prefix("unix:") {
            Some(p) => BrokerListen::Unix(p.into()),
            None => BrokerListen::Tcp(text.parse().map_err(|_| {
                (
                    super::EXIT_CONFIG,
                    format!("--broker `{text}` is neither unix:PATH nor an address and port"),
                )
            })?),
        },
        None => {
            let loaded = super::load_without_secrets(config_path).map_err(|_| {
                (
                    super::EXIT_CONFIG,
                    "the config is invalid (see above); or name the broker with --broker"
                        .to_owned(),
                )
            })?;
            match loaded.config.broker {
                Some(b) => b.listen,
                None => {
                    return Err((
                        super::EXIT_CONFIG,
                        format!(
                            "{BROKER_KEY_ENV} is set but the config has no [broker]; name it with --broker"
                        ),
                    ));
                }
            }
        }
    };
    let builder = crate::http::client_builder(crate::broker::TOKEN_WAIT + Duration::from_secs(5));
    let (builder, base) = match &listen {
        BrokerListen::Tcp(addr) => (builder, format!("http://{addr}")),
        #[cfg(unix)]
        BrokerListen::Unix(path) => (
            builder.unix_socket(path.as_path()),
            "http://broker".to_owned(),
        ),
        #[cfg(not(unix))]
        BrokerListen::Unix(_) => {
            return Err((
                super::EXIT_CONFIG,
                "Unix sockets are not available here".to_owned(),
            ));
        }
    };
    let client = builder.build().map_err(|e| {
        (
            super::EXIT_FAILURE,
            format!("cannot set up the HTTP client: {e}"),
        )
    })?;
    let mut url = format!("{base}/v1/accounts/{}/token", args.account);
    if !args.min_valid.is_zero() {
        url.push_str(&format!("?min_valid={}s", args.min_valid.as_secs()));
    }
    let answer = client
        .get(&url)
        .bearer_auth(key)
        .send()
        .await
        .map_err(|e| {
            (
                super::EXIT_FAILURE,
                format!(
                    "cannot reach the broker at {listen}: {e}{}",
                    crate::http::causes(&e)
                ),
            )
        })?;
    let status = answer.status();
    let body: serde_json::Value = answer
        .bytes()
        .await
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| {
            (
                super::EXIT_FAILURE,
                format!("the broker at {listen} answered HTTP {status} without JSON"),
            )
        })?;
    if !status.is_success() {
        let reason = body["error"].as_str().unwrap_or("no reason given");
        return Err((
            super::EXIT_FAILURE,
            format!("the broker refused (HTTP {}): {reason}", status.as_u16()),
        ));
    }
    body["access_token"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| {
            (
                super::EXIT_FAILURE,
                "the broker's answer has no access_token".to_owned(),
            )
        })
}
