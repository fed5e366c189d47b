//! `ehrsync --version` names the release and the commit it was built from, so a practice can
//! say exactly what it runs.

use std::process::Command;

#[test]
fn version_names_the_release_and_the_commit() {
    let out = Command::new(env!("CARGO_BIN_EXE_ehrsync"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let want = format!("ehrsync {} (commit ", env!("CARGO_PKG_VERSION"));
    assert!(text.starts_with(&want), "{text}");
    let commit = text[want.len()..].trim_end().trim_end_matches(')');
    // Built from a clone (as CI and the README do): the commit checked out, as git names it.
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    match (std::env::var("EHRSYNC_COMMIT").ok(), head) {
        (Some(set), _) if !set.trim().is_empty() => assert_eq!(commit, set),
        (_, Some(head)) => assert_eq!(commit, head),
        (_, None) => assert_eq!(commit, "unknown"),
    }
}
