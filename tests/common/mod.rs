//! Helpers shared by the integration tests: run the real binary with a controlled environment.

#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Run {
    /// Panics naming the first of `secrets` found in stdout or stderr.
    pub fn assert_absent(&self, secrets: &[&str]) {
        for secret in secrets {
            assert!(
                !self.stdout.contains(secret),
                "{secret} in stdout:\n{}",
                self.stdout
            );
            assert!(
                !self.stderr.contains(secret),
                "{secret} in stderr:\n{}",
                self.stderr
            );
        }
    }
}

/// Runs `ehrsync ARGS` with only `env` in its environment (nothing leaks in from the host).
pub fn ehrsync(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ehrsync"));
    cmd.env_clear().args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run the ehrsync binary").into()
}

/// Writes `text` as `ehrsync.toml` in `dir` and returns its path.
pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("ehrsync.toml");
    std::fs::write(&path, text).expect("write config");
    path
}
