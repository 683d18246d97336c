//! The load tools: the load generators and benchmarks behind `cloudphone load <kind>`, which
//! drive the platform with realistic loads (and hostile ones, and faults) and report on it,
//! against baselines run in the same process on the same data where there are any.
//!
//! The layout follows what a run is made of:
//!
//! - [`cli`]: the flags of every load verb.
//! - [`harness`]: what runs stand on: their own databases, tokens, roles as child processes,
//!   the baselines' servers and views, latency histograms and reports, metrics scrapes, CPU
//!   and memory samples.
//! - [`world`]: the worlds runs act in, written before anything is measured: a generated
//!   history, its owners registered, or read models with no history.
//! - [`workloads`]: what simulated users do: portals' commands, dashboards' queries.
//! - [`scenarios`]: one module per verb, built only from the three above, never from
//!   another scenario.
//!
//! Roles are started as child processes of the running binary (`std::env::current_exe()`,
//! which is `cloudphone`), so the tools only work inside it; they own SQL of their own (their
//! worlds, baselines and bookkeeping) and touch only databases they create, never the one
//! `--database-url` names.
//!
//! This crate must never be linked into the release image (the `cloudphone` binary builds it
//! only with its default `load` feature, which the image's build leaves out), and no role may
//! ever use it: it is an adapter at the edge of the platform, like a client, and nothing of
//! the platform depends on it.

pub mod cli;
pub mod harness;
pub mod scenarios;
pub mod workloads;
pub mod world;

use crate::cli::LoadKind;

/// Runs the load `kind` names, to its report.
pub async fn run(kind: &LoadKind) -> anyhow::Result<()> {
    match kind {
        LoadKind::Commands(args) => scenarios::commands::run(args).await,
        LoadKind::Projections(args) => scenarios::projections::run(args).await,
        LoadKind::Queries(args) => scenarios::queries::run(args).await,
        LoadKind::Replay(args) => scenarios::replay::run(args).await,
        LoadKind::Export(args) => scenarios::export::run(args).await,
        LoadKind::Platform(args) => scenarios::platform::run(args).await,
        LoadKind::Hostile(args) => scenarios::hostile::run(args).await,
        LoadKind::History(args) => scenarios::history::run(args).await,
        LoadKind::Subscriptions(args) => scenarios::subscriptions::run(args).await,
        LoadKind::Kafka(args) => scenarios::kafka::run(args).await,
        LoadKind::FixedAnswerServer(args) => harness::fixed_answer::serve(args.listen).await,
    }
}
