//! Token files: for a program that can only read a file, each new access token of an account is
//! written to the files its `[[accounts.NAME.token_files]]` name — atomically (a temporary file
//! beside it, written, flushed to disk, renamed over the old one, the directory flushed), with
//! the configured mode and group — and each file's `on_rotate` command is run after it (no
//! shell, bounded by its timeout). A file is only as safe as its permissions: anyone who can
//! read it holds the account's API access until the token expires.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use secrecy::ExposeSecret;
use tokio::sync::watch;

use crate::config::{Account, TokenFile, TokenFileFormat};
use crate::metrics::Metrics;
use crate::token::owner::{CurrentToken, TokenHandle};

/// How soon a token file that could not be written is tried again (same token).
const RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// Keeps `account`'s token files current until `stop` turns true. Runs as a task the agent
/// owns beside the account's token owner. A file that cannot be written (its directory is
/// missing, the disk is full) is tried again every few seconds until it is.
pub async fn keep(
    account: Arc<Account>,
    handle: TokenHandle,
    metrics: Metrics,
    mut stop: watch::Receiver<bool>,
) {
    let name = account.name.to_string();
    let mut snapshots = handle.watch();
    // The token generation each file holds.
    let mut written: Vec<Option<u64>> = vec![None; account.token_files.len()];
    // The generation whose failure each file last warned about (once per token, not per try).
    let mut warned: Vec<Option<u64>> = vec![None; account.token_files.len()];
    loop {
        let token = snapshots.borrow_and_update().token.clone();
        let mut behind = false;
        if let Some(token) = token {
            let files = account.token_files.iter().zip(written.iter_mut());
            for ((file, held), warned) in files.zip(warned.iter_mut()) {
                if *held == Some(token.generation) {
                    continue;
                }
                let contents = contents(file.format, &name, &token);
                let f = file.clone();
                let result = tokio::task::spawn_blocking(move || write_atomically(&f, &contents))
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
                match result {
                    Ok(()) => {
                        *held = Some(token.generation);
                        metrics
                            .token_files
                            .with_label_values(&[name.as_str(), "written"])
                            .inc();
                        tracing::debug!(account = %name, path = %file.path.display(), "wrote the token file");
                        if let Some(command) = &file.on_rotate {
                            run_on_rotate(&name, file, command, &metrics).await;
                        }
                    }
                    Err(e) => {
                        behind = true;
                        metrics
                            .token_files
                            .with_label_values(&[name.as_str(), "write_failed"])
                            .inc();
                        if *warned != Some(token.generation) {
                            *warned = Some(token.generation);
                            tracing::warn!(account = %name, path = %file.path.display(), error = %e,
                                "cannot write the token file; trying again every 5 s (the program reading it keeps the previous token)");
                        }
                    }
                }
            }
        }
        let retry = async {
            if behind {
                tokio::time::sleep(RETRY).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            changed = snapshots.changed() => if changed.is_err() { return },
            _ = retry => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Removes `files` (an account removed from the config, or files no longer listed).
pub fn remove(account: &str, files: &[TokenFile]) {
    for f in files {
        match std::fs::remove_file(&f.path) {
            Ok(()) => {
                tracing::info!(account, path = %f.path.display(), "removed the token file of an account no longer configured")
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(account, path = %f.path.display(), error = %e, "cannot remove the token file")
            }
        }
    }
}

/// What the file holds: the bare token (no newline), or a JSON object with its expiry.
fn contents(format: TokenFileFormat, account: &str, token: &CurrentToken) -> Vec<u8> {
    match format {
        TokenFileFormat::Token => token.access_token.expose_secret().as_bytes().to_vec(),
        TokenFileFormat::Json => serde_json::json!({
            "account": account,
            "access_token": token.access_token.expose_secret(),
            "token_type": "Bearer",
            "expires_at": token.expires_at.to_string(),
        })
        .to_string()
        .into_bytes(),
    }
}

/// Writes `contents` to `file.path` so that a reader sees the old file or the new one, never
/// a part: a temporary file in the same directory (created with the final mode, so the token
/// is never readable more widely), flushed, renamed over the old, then the directory flushed.
pub fn write_atomically(file: &TokenFile, contents: &[u8]) -> std::io::Result<()> {
    let path = &file.path;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "token".to_owned());
    let temp: PathBuf = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&temp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(file.mode);
    }
    let written = (|| {
        let mut f = options.open(&temp)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            // The umask may have narrowed the mode at creation; the configured one is meant.
            f.set_permissions(std::fs::Permissions::from_mode(file.mode))?;
            if let Some(gid) = file.gid {
                std::os::unix::fs::fchown(&f, None, Some(gid))?;
            }
        }
        f.write_all(contents)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&temp, path)?;
        #[cfg(unix)]
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written
}

/// Runs `command` (program and arguments, no shell) in the file's directory with
/// `EHRSYNC_ACCOUNT` and `EHRSYNC_TOKEN_FILE` set, its output discarded (it could echo the
/// token), killed at `file.on_rotate_timeout`.
async fn run_on_rotate(account: &str, file: &TokenFile, command: &[String], metrics: &Metrics) {
    let Some((program, args)) = command.split_first() else {
        return;
    };
    let child = tokio::process::Command::new(program)
        .args(args)
        .env("EHRSYNC_ACCOUNT", account)
        .env("EHRSYNC_TOKEN_FILE", &file.path)
        .current_dir(
            file.path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new(".")),
        )
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let outcome = match child {
        Err(e) => Err(format!("cannot start it: {e}")),
        Ok(mut child) => match tokio::time::timeout(file.on_rotate_timeout, child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(format!("it exited with {status}")),
            Ok(Err(e)) => Err(format!("cannot wait for it: {e}")),
            Err(_) => {
                let _ = child.kill().await;
                Err(format!(
                    "it ran longer than {} and was killed",
                    humantime::format_duration(file.on_rotate_timeout)
                ))
            }
        },
    };
    match outcome {
        Ok(()) => {
            metrics
                .token_files
                .with_label_values(&[account, "command_ok"])
                .inc();
            tracing::info!(account, program = %program, "ran the token file's on_rotate command");
        }
        Err(reason) => {
            metrics
                .token_files
                .with_label_values(&[account, "command_failed"])
                .inc();
            tracing::warn!(account, program = %program, reason = %reason, "the token file's on_rotate command failed");
        }
    }
}
