use std::process::ExitCode;

use clap::Parser;
use cloudphone::cli::Cli;

fn main() -> ExitCode {
    // Before the process allocates in earnest: freed memory is kept for reuse.
    allocator::keep_freed_memory();
    let cli = Cli::parse();
    let telemetry = match cloudphone::telemetry::init(&cli.telemetry) {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("error: {}", cloudphone::errors::one_line(&error));
            return ExitCode::FAILURE;
        }
    };
    // Every connection and pool costs a descriptor: a low soft limit (often 1024) would let
    // a crowd of idle clients stop the APIs accepting. The listeners' limits are derived from
    // what this gives.
    let open_files = http_edge::connections::raise_open_files_limit(262_144);
    tracing::debug!(open_files, "file descriptor limit");
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(cloudphone::run(cli));
    telemetry.shutdown();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line, each cause once, no PostgreSQL internals (see `errors`).
            eprintln!("error: {}", cloudphone::errors::one_line(&error));
            ExitCode::FAILURE
        }
    }
}
