//! Peer benchmark for event-store appends: cqrs-es + postgres-es against the Cloudphone event
//! log, the same device-lifecycle events into the same PostgreSQL, from one process.
//!
//! Layout: [`workload`] plans the events from the seed; [`ours`] and [`theirs`] are the two
//! stores behind one [`drive::Writer`] trait; [`drive`] runs a phase; this file sets up a fresh
//! database per phase, alternates the stores (theirs, ours, theirs, ours, ...) so machine noise
//! shows, verifies what each wrote, and prints the table, the ratios and the JSON report.
//!
//! Modes (each runs both stores):
//! - `append`: the writer keeps each aggregate's state from its own previous commands and
//!   appends one event with an optimistic-concurrency check. Ours: `EventStore::append` (group
//!   commit). Theirs: `PersistedEventStore::commit` on the cached aggregate context (the call
//!   `CqrsFramework::execute` ends with; one transaction per command).
//! - `natural`: every command loads its aggregate from the store first. Theirs:
//!   `CqrsFramework::execute` (select all the aggregate's events, apply, handle, commit), the
//!   framework's natural mode. Ours: `LogReader::read_stream` + fold + `EventStore::append`.
//! - `unbatched` (optional, slow): as `append`, but ours commits one transaction per command
//!   (`EventStore::append_unbatched`): both stores pay a WAL flush per command.

mod drive;
mod ours;
mod theirs;
mod workload;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use event_log::{EventStore, LogReader, StoreConfig};
use hdrhistogram::Histogram;
use serde::Serialize;
use sqlx::postgres::PgConnectOptions;
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, PgConnection};

use crate::drive::drive;
use crate::workload::Plan;

/// Appends the same device-lifecycle events through cqrs-es + postgres-es and through our
/// event log, each phase in a fresh database, and reports events/s, latency and the ratio.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Events (= commands) appended per phase.
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// Concurrent writers (tasks), each with its own share of the devices.
    #[arg(long, default_value_t = 32)]
    writers: usize,
    /// Devices (aggregates); the events are spread evenly over them.
    #[arg(long, default_value_t = 10_000)]
    devices: u32,
    /// Seed of the plan (device ids, sizes, the order of commands per writer).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Rounds: each round runs, per mode, theirs then ours.
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Modes to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "append,natural")]
    modes: Vec<Mode>,
    /// Server to create the phase databases on (any database of it; it is not written).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// Write the report as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
enum Mode {
    Append,
    Natural,
    Unbatched,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Append => "append",
            Mode::Natural => "natural",
            Mode::Unbatched => "unbatched",
        }
    }

    fn path(self, side: Side) -> &'static str {
        match (self, side) {
            (Mode::Append, Side::Theirs) | (Mode::Unbatched, Side::Theirs) => {
                "cached aggregate -> PersistedEventStore::commit (1 tx/command)"
            }
            (Mode::Natural, Side::Theirs) => "CqrsFramework::execute: load all events, handle, commit (1 tx/command)",
            (Mode::Append, Side::Ours) => "cached state -> EventStore::append (group commit)",
            (Mode::Natural, Side::Ours) => "LogReader::read_stream + fold -> EventStore::append (group commit)",
            (Mode::Unbatched, Side::Ours) => "cached state -> EventStore::append_unbatched (1 tx/command)",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Side {
    /// cqrs-es + postgres-es.
    Theirs,
    /// `event_log::EventStore`.
    Ours,
}

impl Side {
    fn label(self) -> &'static str {
        match self {
            Side::Theirs => "cqrs-es",
            Side::Ours => "ours",
        }
    }
}

#[derive(Debug, Serialize)]
struct Latency {
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
}

impl Latency {
    fn of(histogram: &Histogram<u64>) -> Self {
        let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
        Latency {
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: histogram.max() as f64 / 1000.0,
        }
    }
}

#[derive(Debug, Serialize)]
struct PhaseReport {
    round: u32,
    mode: Mode,
    store: Side,
    path: &'static str,
    database: String,
    events: u64,
    seconds: f64,
    events_per_second: f64,
    latency: Latency,
    /// Optimistic-concurrency conflicts retried (0 by design: writers own their devices).
    conflicts_retried: u64,
    /// `pg_database_size` after the phase (fresh database, so it is what the phase wrote
    /// plus the empty schema).
    database_bytes: i64,
    /// What was checked after the phase, untimed.
    verified: String,
}

#[derive(Debug, Serialize)]
struct Ratio {
    mode: Mode,
    /// Ours / theirs events/s, round by round.
    per_round: Vec<f64>,
    /// Best ours / best theirs events/s.
    best: f64,
    /// Mean ours / mean theirs events/s.
    mean: f64,
    /// Theirs p99 / ours p99 (best rounds): > 1 means ours is faster at p99.
    p99_theirs_over_ours: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    benchmark: &'static str,
    started_at: String,
    command: String,
    machine: Machine,
    events: u64,
    writers: usize,
    devices: u32,
    seed: u64,
    rounds: u32,
    versions: BTreeMap<&'static str, &'static str>,
    phases: Vec<PhaseReport>,
    ratios: Vec<Ratio>,
    guarantees: BTreeMap<&'static str, &'static str>,
}

#[derive(Debug, Serialize)]
struct Machine {
    cores: usize,
    memory_gib: f64,
    postgres: String,
    synchronous_commit: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.writers > 0 && args.events > 0,
        "--events and --writers must be positive"
    );
    anyhow::ensure!(
        args.devices as usize >= args.writers,
        "--devices must be at least --writers (each writer owns its devices)"
    );
    let mut modes = args.modes.clone();
    modes.sort();
    modes.dedup();
    let server = PgConnectOptions::from_str(&args.database_url).context("--database-url")?;
    let machine = machine(&server).await?;
    let plan = Arc::new(Plan::new(args.events, args.devices, args.writers, args.seed));
    println!(
        "cqrs-es + postgres-es vs our event log: {} events over {} devices, {} writers, seed {}, {} round(s)",
        args.events, args.devices, args.writers, args.seed, args.rounds
    );
    println!(
        "machine: {} cores, {:.0} GiB; {}; synchronous_commit={}",
        machine.cores, machine.memory_gib, machine.postgres, machine.synchronous_commit
    );
    let started_at = chrono::Utc::now().to_rfc3339();
    let mut phases = Vec::new();
    for round in 1..=args.rounds {
        for &mode in &modes {
            for side in [Side::Theirs, Side::Ours] {
                eprintln!("round {round}, {} / {}: {}", mode.name(), side.label(), mode.path(side));
                let phase = run_phase(&args, &server, &plan, round, mode, side)
                    .await
                    .with_context(|| format!("round {round}, {} / {}", mode.name(), side.label()))?;
                eprintln!(
                    "  {:.0} events/s, p50 {:.2} ms, p99 {:.2} ms ({})",
                    phase.events_per_second, phase.latency.p50_ms, phase.latency.p99_ms, phase.verified
                );
                phases.push(phase);
            }
        }
    }
    let ratios: Vec<Ratio> = modes.iter().filter_map(|&mode| ratio(&phases, mode)).collect();
    print_table(&phases, &ratios);
    let report = Report {
        benchmark: "event-store appends: cqrs-es + postgres-es vs event_log::EventStore",
        started_at,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine,
        events: args.events,
        writers: args.writers,
        devices: args.devices,
        seed: args.seed,
        rounds: args.rounds,
        versions: BTreeMap::from([
            ("cqrs-es", "0.5.0"),
            ("postgres-es", "0.5.0"),
            ("sqlx (theirs)", "0.8"),
            ("sqlx (ours)", "0.9"),
        ]),
        phases,
        ratios,
        guarantees: BTreeMap::from([
            (
                "ours",
                "per-stream optimistic concurrency; one global position per event, dense and visible in \
                 commit order (a reader by position never skips one); SHA-256 hash chain over all events; \
                 group commit (concurrent appends share a transaction)",
            ),
            (
                "cqrs-es",
                "per-aggregate gap-free sequence (primary key refuses a duplicate: optimistic concurrency); \
                 no global order or position across aggregates; no hash chain; one transaction per command",
            ),
        ]),
    };
    if let Some(path) = &args.json {
        let file = std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
        serde_json::to_writer_pretty(std::io::BufWriter::new(file), &report).context("write JSON report")?;
        println!("JSON report: {}", path.display());
    }
    Ok(())
}

async fn machine(server: &PgConnectOptions) -> anyhow::Result<Machine> {
    let mut conn = server.connect().await.context("connect to the server")?;
    let postgres: String = sqlx::query_scalar("SELECT version()").fetch_one(&mut conn).await?;
    let synchronous_commit: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(&mut conn)
        .await?;
    conn.close().await?;
    let memory_kib: f64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0.0);
    Ok(Machine {
        cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        memory_gib: memory_kib / 1024.0 / 1024.0,
        postgres: postgres.split(" on ").next().unwrap_or(&postgres).to_owned(),
        synchronous_commit,
    })
}

/// Drops and creates `name` on the server; returns options pointing at it.
async fn fresh_database(server: &PgConnectOptions, name: &str) -> anyhow::Result<PgConnectOptions> {
    let mut admin = server.connect().await.context("connect to the server")?;
    sqlx::raw_sql(AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await?;
    sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&mut admin)
        .await?;
    admin.close().await?;
    Ok(server.clone().database(name))
}

async fn drop_database(server: &PgConnectOptions, name: &str) -> anyhow::Result<()> {
    let mut admin = server.connect().await?;
    sqlx::raw_sql(AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await?;
    admin.close().await?;
    Ok(())
}

/// Writes dirty pages of earlier phases out now, so no phase pays for another's checkpoint.
/// Returns the database's size in bytes.
async fn checkpoint(conn: &mut PgConnection) -> anyhow::Result<i64> {
    sqlx::raw_sql("CHECKPOINT").execute(&mut *conn).await?;
    let bytes: i64 = sqlx::query_scalar("SELECT pg_database_size(current_database())")
        .fetch_one(&mut *conn)
        .await?;
    Ok(bytes)
}

async fn run_phase(
    args: &Args,
    server: &PgConnectOptions,
    plan: &Arc<Plan>,
    round: u32,
    mode: Mode,
    side: Side,
) -> anyhow::Result<PhaseReport> {
    let name = format!("cqrs_es_bench_{}_{}", side.label().replace('-', "_"), mode.name());
    let options = fresh_database(server, &name).await?;
    // Every writer can hold a connection; a few more for our group-commit writer and reads.
    let connections = args.writers as u32 + 4;
    let mut conn = options.connect().await?;
    let (measured, database_bytes, verified) = match side {
        Side::Ours => {
            let pool = event_log::pool_options(connections)
                .acquire_timeout(Duration::from_secs(60))
                .connect_with(options.clone())
                .await?;
            event_log::migrate(&pool).await.context("migrate")?;
            warm_ours(&pool, connections).await?;
            let store = Arc::new(EventStore::open(pool.clone(), StoreConfig::default()).await?);
            let reader = LogReader::new(pool.clone());
            let writers = (0..args.writers)
                .map(|_| ours::OurWriter {
                    plan: Arc::clone(plan),
                    store: Arc::clone(&store),
                    reader: reader.clone(),
                    source: if mode == Mode::Natural {
                        ours::Source::Load
                    } else {
                        ours::Source::Cached
                    },
                    unbatched: mode == Mode::Unbatched,
                    cache: HashMap::new(),
                })
                .collect();
            checkpoint(&mut conn).await?;
            let measured = drive(plan, writers).await?;
            let store = Arc::try_unwrap(store).map_err(|_| anyhow::anyhow!("store still shared"))?;
            store.shutdown().await;
            let head = reader.head().await?;
            let chain = reader.verify_chain(1, None, 10_000, |_| {}).await?;
            if head.position as u64 != plan.events || chain.checked != plan.events || chain.broken.is_some() {
                bail!(
                    "log check failed: head {}, chain checked {}, broken {:?}",
                    head.position,
                    chain.checked,
                    chain.broken
                );
            }
            let bytes = checkpoint(&mut conn).await?;
            pool.close().await;
            (
                measured,
                bytes,
                format!("head position {} = events, hash chain verified", head.position),
            )
        }
        Side::Theirs => {
            sqlx::raw_sql(theirs::INIT_SQL).execute(&mut conn).await?;
            let pool = sqlx08::postgres::PgPoolOptions::new()
                .max_connections(connections)
                .acquire_timeout(Duration::from_secs(60))
                .connect(&connect_url(&args.database_url, &name))
                .await?;
            warm_theirs(&pool, connections).await?;
            let framework = theirs::framework(pool.clone());
            let store = Arc::new(theirs::store(pool.clone()));
            let writers = (0..args.writers)
                .map(|_| theirs::TheirWriter {
                    plan: Arc::clone(plan),
                    framework: Arc::clone(&framework),
                    store: Arc::clone(&store),
                    natural: mode == Mode::Natural,
                    cache: HashMap::new(),
                })
                .collect();
            checkpoint(&mut conn).await?;
            let measured = drive(plan, writers).await?;
            let (rows, aggregates, broken): (i64, i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM events), \
                        (SELECT count(DISTINCT aggregate_id) FROM events), \
                        (SELECT count(*) FROM (SELECT aggregate_id FROM events GROUP BY aggregate_id \
                                               HAVING max(sequence) <> count(*) OR min(sequence) <> 1) AS gaps)",
            )
            .fetch_one(&mut conn)
            .await?;
            if rows as u64 != plan.events || broken != 0 {
                bail!("events check failed: {rows} rows, {broken} aggregates with gaps");
            }
            let bytes = checkpoint(&mut conn).await?;
            pool.close().await;
            (
                measured,
                bytes,
                format!("{rows} rows = events, {aggregates} aggregates, sequences 1..n without gaps"),
            )
        }
    };
    conn.close().await?;
    drop_database(server, &name).await?;
    anyhow::ensure!(
        measured.events == plan.events,
        "phase appended {} events",
        measured.events
    );
    Ok(PhaseReport {
        round,
        mode,
        store: side,
        path: mode.path(side),
        database: name,
        events: measured.events,
        seconds: measured.seconds,
        events_per_second: measured.events as f64 / measured.seconds,
        latency: Latency::of(&measured.latency),
        conflicts_retried: measured.conflicts,
        database_bytes,
        verified,
    })
}

/// `url` with its database replaced by `name` (sqlx 0.8 takes a URL, not our options).
fn connect_url(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let base = match base.rsplit_once('/') {
        Some((server, _)) if server.contains("//") && !server.ends_with('/') => server,
        _ => base,
    };
    format!("{base}/{name}{query}")
}

/// Opens every pool connection before the clock starts, so neither side pays for connecting.
async fn warm_ours(pool: &sqlx::PgPool, connections: u32) -> anyhow::Result<()> {
    let mut held = Vec::new();
    for _ in 0..connections {
        held.push(pool.acquire().await?);
    }
    Ok(())
}

async fn warm_theirs(pool: &sqlx08::PgPool, connections: u32) -> anyhow::Result<()> {
    let mut held = Vec::new();
    for _ in 0..connections {
        held.push(pool.acquire().await?);
    }
    Ok(())
}

fn ratio(phases: &[PhaseReport], mode: Mode) -> Option<Ratio> {
    let of =
        |side: Side| -> Vec<&PhaseReport> { phases.iter().filter(|p| p.mode == mode && p.store == side).collect() };
    let (theirs, ours) = (of(Side::Theirs), of(Side::Ours));
    let best = |runs: &[&PhaseReport]| {
        runs.iter()
            .max_by(|a, b| a.events_per_second.total_cmp(&b.events_per_second))
            .map(|p| (p.events_per_second, p.latency.p99_ms))
    };
    let mean = |runs: &[&PhaseReport]| runs.iter().map(|p| p.events_per_second).sum::<f64>() / runs.len() as f64;
    let ((their_best, their_p99), (our_best, our_p99)) = (best(&theirs)?, best(&ours)?);
    Some(Ratio {
        mode,
        per_round: theirs
            .iter()
            .zip(&ours)
            .map(|(t, o)| o.events_per_second / t.events_per_second)
            .collect(),
        best: our_best / their_best,
        mean: mean(&ours) / mean(&theirs),
        p99_theirs_over_ours: their_p99 / our_p99,
    })
}

fn print_table(phases: &[PhaseReport], ratios: &[Ratio]) {
    println!();
    println!(
        "{:<5} {:<9} {:<8} {:>8} {:>8} {:>10} {:>8} {:>8} {:>8} {:>8} {:>7}",
        "round", "mode", "store", "events", "seconds", "events/s", "p50 ms", "p99 ms", "p999 ms", "max ms", "DB MiB"
    );
    for p in phases {
        println!(
            "{:<5} {:<9} {:<8} {:>8} {:>8.1} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>8.1} {:>7.1}",
            p.round,
            p.mode.name(),
            p.store.label(),
            p.events,
            p.seconds,
            p.events_per_second,
            p.latency.p50_ms,
            p.latency.p99_ms,
            p.latency.p999_ms,
            p.latency.max_ms,
            p.database_bytes as f64 / 1024.0 / 1024.0
        );
    }
    println!();
    for r in ratios {
        let rounds: Vec<String> = r.per_round.iter().map(|x| format!("{x:.2}x")).collect();
        println!(
            "{:<9} ours / cqrs-es events/s: rounds {}; best vs best {:.2}x; mean vs mean {:.2}x; p99 cqrs-es / ours {:.2}x",
            r.mode.name(),
            rounds.join(", "),
            r.best,
            r.mean,
            r.p99_theirs_over_ours
        );
    }
}

#[cfg(test)]
mod tests {
    use super::connect_url;

    #[test]
    fn the_phase_database_replaces_the_url_database() {
        assert_eq!(
            connect_url("postgres://postgres@127.0.0.1:5432/postgres", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            connect_url("postgres://u@h/db?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
        assert_eq!(connect_url("postgres://u@h", "x"), "postgres://u@h/x");
    }
}
