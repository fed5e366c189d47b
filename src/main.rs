//! The `ehrsync` binary: parses the command line, sets up logging and the runtime, and hands
//! over to [`ehrsync::cli`]. Exit codes: 0 success, 1 failure, 2 invalid config or usage.

use std::process::ExitCode;

use clap::Parser;
use ehrsync::cli::{self, Cli};

fn main() -> ExitCode {
    let args = Cli::parse();
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
    runtime.block_on(cli::run(args))
}
