//! The `cloudphone` binary: parses the command line, sets up logging, and runs one role or
//! operator verb. `main.rs` is a thin shell over [`run`]; each verb lives in
//! [`commands`]. This crate wires the library crates together and must not hold business
//! rules or SQL of its own.
//!
//! `cloudphone load ...` is the `load-tools` crate, mounted here only with the `load` cargo
//! feature (on by default, off in the release image: `--no-default-features`). The progress
//! bars and flag groups both share are `operator-console`'s.

pub mod cli;
pub mod commands;
pub mod errors;
pub mod telemetry;

use crate::cli::{Cli, Command};

/// Runs the verb the command line asks for.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Migrate(database) => commands::migrate::run(database).await,
        Command::Partitions { database, action } => commands::partitions::run(database, action).await,
        Command::Verify(args) => commands::verify::run(args).await,
        Command::Serve(args) => commands::serve::run(args, commands::serve::Roles::All).await,
        Command::CommandApi(args) => commands::serve::run(args, commands::serve::Roles::CommandApi).await,
        Command::QueryApi(args) => commands::serve::run(args, commands::serve::Roles::QueryApi).await,
        Command::Projector(args) => commands::serve::run(args, commands::serve::Roles::Projector).await,
        Command::Relay(args) => commands::serve::run(args, commands::serve::Roles::Relay).await,
        Command::Replay(args) => commands::replay::run(args).await,
        Command::DeadLetters { database, action } => commands::dead_letters::run(database, action).await,
        Command::Export(args) => commands::export::run(args).await,
        Command::Keys { action } => commands::keys::run(action).await,
        Command::Erasures { action } => commands::erasures::run(action).await,
        #[cfg(feature = "load")]
        Command::Load { kind } => load_tools::run(kind).await,
        Command::Token(args) => commands::token::run(args),
    }
}
