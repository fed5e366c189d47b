//! `ehrsync sync ACCOUNT JOB [--full] [--reconcile [--force]]`: one run of one job now, with the same token handling,
//! leases and bookkeeping as the agent (so it may run beside `ehrsync run` on one database),
//! then a one-line summary. Ctrl-C or SIGTERM stops it between pages, as `interrupted`.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use tokio::sync::watch;

use crate::clock::{SharedClock, SystemClock};
use crate::config::{self, Config};
use crate::sync::{JobRunner, Outcome, RunOptions};

pub async fn run(config_path: &Path, account: &str, job: &str, options: RunOptions) -> ExitCode {
    let env = config::Env::from_process();
    let mut config = match super::load_for_account(config_path, &env, account) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let (account, job) = match pick(&mut config, account, job) {
        Ok(found) => found,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(super::EXIT_CONFIG);
        }
    };
    let mut controls = match crate::signals::listen() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: cannot listen for signals: {e}");
            return ExitCode::from(super::EXIT_FAILURE);
        }
    };
    let clock: SharedClock = Arc::new(SystemClock);
    let (shared, sync) = match crate::agent::open_engine(&config, &env, clock).await {
        Ok(engine) => engine,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(super::EXIT_FAILURE);
        }
    };
    let store = shared.store.clone();
    let (owner_stop_tx, owner_stop) = watch::channel(false);
    let (handle, owner) =
        match crate::token::owner::spawn(account.clone(), shared, owner_stop).await {
            Ok(started) => started,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(super::EXIT_FAILURE);
            }
        };
    let (stop_tx, stop) = watch::channel(false);
    let signals = tokio::spawn(async move {
        // A reload means nothing to a single run; a stop ends it after the page being written.
        while let Some(control) = controls.recv().await {
            if control == crate::signals::Control::Stop {
                tracing::warn!("stopping after the page in progress");
                let _ = stop_tx.send(true);
                break;
            }
        }
    });
    let runner = JobRunner::new(account, job, handle, sync);
    let summary = runner.run_once(options, &stop).await;
    signals.abort();
    let _ = owner_stop_tx.send(true);
    let _ = owner.await;
    store.close().await;
    let code = if summary.outcome == Outcome::Success {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::EXIT_FAILURE)
    };
    // The run is over and recorded whatever becomes of its summary line.
    super::output::finish(super::output::print(format_args!("{summary}\n")), code)
}

/// The named account (taken out of `config`) and its named job, or what to write instead.
fn pick(
    config: &mut Config,
    account: &str,
    job: &str,
) -> Result<(Arc<crate::config::Account>, crate::config::Job), String> {
    let names = |it: &mut dyn Iterator<Item = &str>| it.collect::<Vec<_>>().join(", ");
    let Some(i) = config
        .accounts
        .iter()
        .position(|a| a.name.as_str() == account)
    else {
        return Err(format!(
            "no account `{account}` in {}; configured: {}",
            config.path.display(),
            names(&mut config.accounts.iter().map(|a| a.name.as_str()))
        ));
    };
    let a = config.accounts.swap_remove(i);
    let Some(j) = a.jobs.iter().find(|j| j.name.as_str() == job) else {
        return Err(format!(
            "account `{account}` has no job `{job}`; its jobs: {}",
            names(&mut a.jobs.iter().map(|j| j.name.as_str()))
        ));
    };
    let j = j.clone();
    Ok((Arc::new(a), j))
}
