//! `ehrsync service …` outside Windows: every action exits 2 and points to the systemd unit,
//! before looking at the config.

#![cfg(not(windows))]

mod common;

use common::ehrsync;

#[test]
fn service_commands_are_windows_only() {
    for action in ["install", "uninstall", "run"] {
        let run = ehrsync(
            &["service", action, "--config", "/nonexistent/ehrsync.toml"],
            &[],
        );
        assert_eq!(run.code, Some(2), "service {action}: {}", run.stderr);
        assert!(run.stdout.is_empty(), "service {action}: {}", run.stdout);
        assert!(
            run.stderr.contains("Windows service")
                && run.stderr.contains("systemd/ehrsync.service"),
            "service {action}: {}",
            run.stderr
        );
        // Not a config problem: the config is never read.
        assert!(!run.stderr.contains("invalid config"), "{}", run.stderr);
    }
}

#[test]
fn service_run_is_documented_as_not_interactive() {
    let run = ehrsync(&["service", "run", "--help"], &[]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stdout
            .contains("called by the Service Control Manager; not for interactive use"),
        "{}",
        run.stdout
    );
}
