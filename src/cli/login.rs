//! `ehrsync login ACCOUNT`: a person logs an account in once — in a browser (authorization
//! code + PKCE, loopback redirect) or, with `--device`, on any device (RFC 8628) — and the
//! tokens are stored as the agent stores them, so a running agent picks them up on its own.
//! For accounts whose grant needs no person (password, client credentials) it logs in once now
//! with the configured credentials: the way to retry at once after fixing a password.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::output;
use crate::clock::{SharedClock, SystemClock};
use crate::config::{self, Account};
use crate::login::{self, LoggedIn, Progress};
use crate::token::Timestamp;
use crate::token::client::{GrantForm, TokenTarget, request_token};
use crate::token::owner::{NEEDS_LOGIN_POLL, Shared, StoredLogin, store_login};

/// The command's options (see `Command::Login`).
#[derive(Debug, Clone)]
pub struct Args {
    pub account: String,
    pub open_browser: bool,
    pub port: Option<u16>,
    pub device: bool,
    pub timeout: Duration,
}

pub async fn run(config_path: &Path, args: &Args) -> ExitCode {
    let env = config::Env::from_process();
    let config = match super::load_for_account(config_path, &env, &args.account) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(account) = config.account(&args.account) else {
        let names: Vec<&str> = config.accounts.iter().map(|a| a.name.as_str()).collect();
        eprintln!(
            "error: no account `{}` in {}; configured: {}",
            args.account,
            config.path.display(),
            names.join(", ")
        );
        return ExitCode::from(super::EXIT_CONFIG);
    };
    if args.device && !account.grant.needs_person() {
        eprintln!(
            "error: --device is for accounts whose grant needs a person (authorization_code); \
             `{}` uses the {} grant",
            account.name, account.grant
        );
        return ExitCode::from(super::EXIT_CONFIG);
    }
    let clock: SharedClock = Arc::new(SystemClock);
    let (shared, _) = match crate::agent::open_engine(&config, &env, clock.clone()).await {
        Ok(engine) => engine,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(super::EXIT_FAILURE);
        }
    };
    let code = login_and_store(&shared, account, args).await;
    shared.store.clone().close().await;
    code
}

async fn login_and_store(shared: &Shared, account: &Account, args: &Args) -> ExitCode {
    let obtained = if account.grant.needs_person() {
        let ctx = login::Context {
            http: &shared.http,
            discovery: &shared.discovery,
            clock: shared.clock.clone(),
            account,
        };
        let options = login::Options {
            open_browser: args.open_browser,
            port: args.port,
            timeout: args.timeout,
        };
        let mut show = |p: Progress<'_>| show(p, args.timeout);
        if args.device {
            login::device(&ctx, &options, &mut show).await
        } else {
            login::authorization_code(&ctx, &options, &mut show).await
        }
        .map_err(|e| e.to_string())
    } else {
        primary_grant(shared, account).await
    };
    let obtained = match obtained {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(super::EXIT_FAILURE);
        }
    };
    let notes = obtained.notes;
    let subject = obtained.subject;
    match store_login(shared, account, obtained.response, obtained.sent_at).await {
        Ok(stored) => output::finish(
            output::print(summary(
                account,
                subject.as_deref(),
                &stored,
                &notes,
                Utc::now(),
            )),
            ExitCode::SUCCESS,
        ),
        Err(e) => {
            eprintln!("error: the login worked but its tokens could not be stored: {e}");
            ExitCode::from(super::EXIT_FAILURE)
        }
    }
}

/// One request with the account's own (non-interactive) grant.
async fn primary_grant(shared: &Shared, account: &Account) -> Result<LoggedIn, String> {
    let provider = match (&account.issuer, TokenTarget::needs_discovery(account)) {
        (Some(issuer), true) => Some(
            shared
                .discovery
                .get(issuer)
                .await
                .map_err(|e| e.to_string())?,
        ),
        _ => None,
    };
    let target = TokenTarget::resolve(account, provider.as_deref())
        .map_err(|e| login::describe_failure(&e))?;
    // Progress only: the login goes on without a reader.
    let _ = output::print(format_args!(
        "Logging in to {} with its {} grant...\n",
        account.name, account.grant
    ));
    let sent_at = shared.clock.now();
    let response = request_token(
        &shared.http,
        account,
        &target,
        GrantForm::Login(account.grant),
    )
    .await
    .map_err(|e| {
        format!(
            "the token endpoint did not log in: {}",
            login::describe_failure(&e)
        )
    })?;
    Ok(LoggedIn {
        response,
        sent_at,
        subject: None,
        notes: Vec::new(),
    })
}

/// Shows the person what to do. Written even when nobody reads stdout any more: the browser
/// this command opened (or the person) may still complete the login, which then ends normally.
fn show(progress: Progress<'_>, timeout: Duration) {
    match progress {
        Progress::Authorize { url, redirect_uri } => {
            let port = url::Url::parse(redirect_uri)
                .ok()
                .and_then(|u| u.port())
                .unwrap_or(0);
            let _ = output::print(format_args!(
                "Open this address in a browser and log in as the person whose access ehrsync should use:\n\n\
                 {url}\n\n\
                 Waiting up to {} for the provider to redirect to {redirect_uri} (Ctrl-C to give up).\n\
                 If the browser runs on another machine, forward the port to this one first: \
                 ssh -L {port}:127.0.0.1:{port} THIS-SERVER (and use --port {port}).\n",
                humantime::format_duration(timeout)
            ));
        }
        Progress::NoBrowser(why) => {
            eprintln!("note: cannot open a browser here ({why}); open the address above yourself");
        }
        Progress::Device {
            verification_uri,
            verification_uri_complete,
            user_code,
            expires_in,
        } => {
            let mut text =
                format!("On any device, open {verification_uri} and enter the code {user_code}\n");
            if let Some(complete) = verification_uri_complete {
                text.push_str(&format!(
                    "or open this address, which carries the code:\n\n{complete}\n\n"
                ));
            }
            text.push_str(&format!(
                "Waiting for the approval (the code expires in {}; Ctrl-C to give up).\n",
                humantime::format_duration(expires_in)
            ));
            let _ = output::print(text);
        }
    }
}

fn instant(t: Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_millis(t.unix_millis())
}

fn when(t: Timestamp, now: DateTime<Utc>) -> String {
    match instant(t) {
        Some(at) => format!(
            "{} ({})",
            at.format("%Y-%m-%d %H:%M:%SZ"),
            super::status::relative(at, now)
        ),
        None => t.to_string(),
    }
}

/// What the person reads once the tokens are stored.
fn summary(
    account: &Account,
    subject: Option<&str>,
    stored: &StoredLogin,
    notes: &[String],
    now: DateTime<Utc>,
) -> String {
    let mut out = format!("Logged in: account {}", account.name);
    if let Some(sub) = subject {
        out.push_str(&format!(" (as {sub})"));
    }
    out.push('\n');
    out.push_str(&format!(
        "  access token expires   {}\n",
        when(stored.expires_at, now)
    ));
    match stored.refresh_expires_at {
        Some(Some(at)) => out.push_str(&format!(
            "  refresh token expires  {}; log in again before then if the agent has not \
             refreshed (it refreshes on its own while it runs)\n",
            when(at, now)
        )),
        Some(None) => out.push_str(
            "  refresh token expires  not stated by the provider (set refresh_token_lifetime to track it)\n",
        ),
        None => out.push_str("  refresh token          none\n"),
    }
    for note in notes {
        out.push_str(&format!("note: {note}\n"));
    }
    out.push_str(&format!(
        "The tokens are stored. A running `ehrsync run` picks them up within {} s if the \
         account was waiting for a login, else at its next refresh.\n",
        NEEDS_LOGIN_POLL.as_secs()
    ));
    out
}
