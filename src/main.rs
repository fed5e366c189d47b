//! The `ehrsync` binary: parses the command line, sets up logging and the runtime, and hands
//! over to [`ehrsync::cli`]. Exit codes: 0 success, 1 failure, 2 invalid config or usage.

use std::process::ExitCode;

use clap::Parser;
use ehrsync::cli::{self, Cli};

/// mimalloc, not the C library's allocator: a pull allocates on the reader and frees on
/// SQLite's thread, where glibc's arenas contend and musl's (the static build's) is slower
/// still (ARCHITECTURE: decisions; docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // No paused test clock here: database calls need no hop through the blocking pool.
    ehrsync::store::unshield();
    let args = Cli::parse();
    if args.command.is_service_run() {
        // The Windows Service Control Manager's dispatcher takes this thread and runs the
        // service on another, which logs to a file and builds its own runtime.
        return cli::service_run(&args);
    }
    ehrsync::logging::init(args.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(cli::EXIT_FAILURE);
        }
    };
    let code = runtime.block_on(cli::run(args));
    // Work still running on the blocking pool is a database call that a stop gave up waiting
    // for (a run cut off at the end of its shutdown grace). Exiting abandons it: SQLite's
    // journal rolls an unfinished transaction back, so the database stays consistent.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    code
}
