//! Records the commit ehrsync is built from, for `ehrsync --version` (and the metrics'
//! `ehrsync_build_info`): `git rev-parse` in a clone, else `$EHRSYNC_COMMIT` (a build from a
//! source tarball), else `unknown`.

use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!text.is_empty()).then_some(text)
}

fn main() {
    println!("cargo:rerun-if-env-changed=EHRSYNC_COMMIT");
    let from_env = std::env::var("EHRSYNC_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty());
    let commit = match from_env {
        Some(commit) => commit,
        None => {
            // Rebuilt when HEAD moves: HEAD itself (a checkout), its reflog (appended by every
            // commit and checkout, even when the branch's ref is packed) and the branch it points
            // at. `--git-path` resolves each inside a worktree's or the clone's git directory.
            // Only files that exist are watched: Cargo counts a missing one as changed on every
            // build, which rebuilt the crate each time in a clone without `packed-refs`.
            let mut watch = vec![
                "HEAD".to_owned(),
                "logs/HEAD".to_owned(),
                "packed-refs".to_owned(),
            ];
            watch.extend(git(&["symbolic-ref", "-q", "HEAD"]));
            for name in watch {
                let path = git(&["rev-parse", "--git-path", &name]).map(PathBuf::from);
                if let Some(path) = path.filter(|p| p.exists()) {
                    println!("cargo:rerun-if-changed={}", path.display());
                }
            }
            git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".to_owned())
        }
    };
    println!("cargo:rustc-env=EHRSYNC_COMMIT={commit}");
}
