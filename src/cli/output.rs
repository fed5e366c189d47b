//! Command output on stdout, which may be a pipe whose reader stops early
//! (`ehrsync status | head -3`). Rust ignores SIGPIPE, so writing to such a pipe fails with
//! `BrokenPipe`, and `print!` turns that into a panic (exit 101, a backtrace hint on stderr).
//! Commands write through [`print`] instead and end with [`finish`].

use std::fmt;
use std::io::{self, Write};
use std::process::ExitCode;

/// Writes `text` to stdout (locked, so it is not interleaved) and flushes it. A failed write is
/// returned, never a panic.
pub fn print(text: impl fmt::Display) -> io::Result<()> {
    let mut out = io::stdout().lock();
    write!(out, "{text}")?;
    out.flush()
}

/// Whether `e` means the reader of stdout has gone.
pub fn reader_gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::BrokenPipe
}

/// The exit code of a command that would exit with `code` once `printed` its output.
///
/// A reader that closed the pipe early (`| head`) took what it wanted: the command exits
/// quietly with its own code (0 for `status`), as ripgrep does, rather than 141 (128 + SIGPIPE,
/// what a shell reports for a process the signal killed), which would fail a `set -o pipefail`
/// script for `ehrsync status | head -1`. Any other write error (a full disk behind `>`) is a
/// failure, reported on stderr.
pub fn finish(printed: io::Result<()>, code: ExitCode) -> ExitCode {
    match printed {
        Ok(()) => code,
        Err(e) if reader_gone(&e) => code,
        Err(e) => {
            // Not `eprintln!`, which panics when stderr is gone too.
            let _ = writeln!(
                io::stderr(),
                "error: cannot write the output to stdout: {e}"
            );
            ExitCode::from(super::EXIT_FAILURE)
        }
    }
}
