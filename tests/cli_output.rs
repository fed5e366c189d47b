//! Commands whose stdout cannot be written: a pipe whose reader has gone (`ehrsync status |
//! head`) ends the command quietly with its own exit code; another write error fails it with
//! exit 1 and a message. Never a panic (exit 101).
#![cfg(unix)]

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;

use common::Run;
use ehrsync::clock::SystemClock;
use ehrsync::sandbox::{self, Lifetimes, Sandbox};
use ehrsync::vendor::Vendor;

/// Runs `ehrsync ARGS` with `stdout` as its standard output and only `env` in its environment.
fn ehrsync_to(stdout: Stdio, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ehrsync"));
    cmd.env_clear()
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn()
        .expect("run the ehrsync binary")
        .wait_with_output()
        .expect("wait for ehrsync")
        .into()
}

/// Runs `ehrsync ARGS` writing to a pipe whose read end was closed before it started, so its
/// very first write meets a reader that has gone.
fn with_reader_gone(args: &[&str], env: &[(&str, &str)]) -> Run {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    ehrsync_to(writer.into(), args, env)
}

/// A sandbox with a Nextech account `nx` (a `patients` job), and its config in `dir`.
async fn sandbox_config(dir: &std::path::Path) -> (Sandbox, String) {
    let sandbox = Sandbox::start(Arc::new(SystemClock), Lifetimes::documented(), 0)
        .await
        .unwrap();
    sandbox.set_patients(120);
    let config = format!(
        "[agent]\n{}{}\
         [[accounts.nx.jobs]]\nname = 'patients'\nkind = 'fhir'\nschedule = '0 0 3 * * *'\npage_size = 50\n",
        common::database_lines("state/ehrsync.db"),
        sandbox.account_config(Vendor::Nextech, "nx")
    );
    let path = common::write_config(dir, &config);
    (sandbox, path.to_str().unwrap().to_owned())
}

fn assert_quiet(run: &Run, code: i32, what: &str) {
    assert!(
        !run.stderr.contains("panicked"),
        "{what} panicked:\n{}",
        run.stderr
    );
    assert_eq!(run.code, Some(code), "{what}:\n{}", run.stderr);
    assert!(
        !run.stderr.contains("cannot write"),
        "{what} reports the closed pipe:\n{}",
        run.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_whose_reader_has_gone_exit_quietly_with_their_own_code() {
    let dir = tempfile::tempdir().unwrap();
    let (sandbox, config) = sandbox_config(dir.path()).await;
    let env = sandbox::credentials_env();
    let config = config.as_str();

    // Before any database exists, and after a run has filled one.
    let status = with_reader_gone(&["status", "--config", config], &env);
    assert_quiet(&status, 0, "status without a database");
    let check = with_reader_gone(&["check-config", "--config", config], &env);
    assert_quiet(&check, 0, "check-config");
    let login = with_reader_gone(&["login", "nx", "--config", config], &env);
    assert_quiet(&login, 0, "login");
    let sync = with_reader_gone(&["sync", "nx", "patients", "--config", config], &env);
    assert_quiet(&sync, 0, "sync");
    for args in [
        &["status", "--config", config][..],
        &["status", "--json", "--config", config],
    ] {
        let status = with_reader_gone(args, &env);
        assert_quiet(&status, 0, &args.join(" "));
    }
    // The run happened and was recorded although nobody read its summary.
    let report = common::ehrsync(&["status", "--json", "--config", config], &env);
    let report: serde_json::Value = serde_json::from_str(&report.stdout).unwrap();
    assert_eq!(
        report["accounts"][0]["jobs"][0]["last_run"]["outcome"], "success",
        "{report}"
    );

    // A failed run keeps its exit code 1 when nobody reads its summary.
    sandbox.inject_api(
        Vendor::Nextech,
        [sandbox::ApiFault::Http(sandbox::Fault::MalformedJson)],
    );
    let failed = with_reader_gone(&["sync", "nx", "patients", "--config", config], &env);
    assert_quiet(&failed, 1, "a failed sync");

    // The demo stops as after Ctrl-C.
    let port = common::free_port().to_string();
    let demo_dir = dir.path().join("demo");
    let demo = with_reader_gone(
        &[
            "demo",
            "--for",
            "60s",
            "--dir",
            demo_dir.to_str().unwrap(),
            "--metrics-port",
            &port,
        ],
        &[],
    );
    assert_quiet(&demo, 0, "demo");
}

#[cfg(target_os = "linux")]
#[test]
fn other_write_errors_fail_with_exit_1_and_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::write_config(dir.path(), "[agent]\ndatabase = 'ehrsync.db'\n");
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let run = ehrsync_to(
        full.into(),
        &["status", "--config", config.to_str().unwrap()],
        &[],
    );
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("error: cannot write the output to stdout: No space left on device"),
        "{}",
        run.stderr
    );
}
