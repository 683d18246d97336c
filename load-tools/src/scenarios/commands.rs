//! `cloudphone load commands`: drive the command API with a realistic portal mix over HTTP and
//! report throughput and latency, against the one-transaction-per-command baseline in the
//! same run, on the same machine and a fresh database each; and beside them what the parts
//! can do alone in the same run: the HTTP stack answering every command with a fixed answer
//! (driven by the same clients), and PostgreSQL writing the rows the run wrote in groups of
//! the size the run's writer made (pgbench). The command API runs as a child process, so
//! its CPU, PostgreSQL's and this load generator's are reported apart, per command.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use http_edge::auth::Role;
use operator_console::Progress;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use uuid::Uuid;

use crate::cli::LoadCommandsArgs;
use crate::harness::databases::{LOAD_DATABASE, database_url_of, fresh_database};
use crate::harness::fixed_answer;
use crate::harness::metrics::metric;
use crate::harness::portal::provision_users;
use crate::harness::postgres_alone::{PostgresAlone, write_the_same_rows};
use crate::harness::report::{Latency, histogram, write_json};
use crate::harness::roles::RoleProcess;
use crate::harness::sampling::{PostgresCpu, cpu_seconds};
use crate::harness::tokens::load_token;
use crate::workloads::portal::{Device, Operation, PortalCommand};

/// What a phase drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// The HTTP stack alone (fixed answers).
    FixedAnswers,
    /// The command API with one transaction per command.
    Unbatched,
    /// The command API with group commit.
    GroupCommit,
}

impl Target {
    fn label(self) -> &'static str {
        match self {
            Target::FixedAnswers => "HTTP stack alone (fixed answers)",
            Target::Unbatched => "one transaction per command (baseline)",
            Target::GroupCommit => "group commit",
        }
    }
}

/// CPU milliseconds per accepted command, by process.
#[derive(Debug, Clone, Copy, Serialize)]
struct CpuPerCommand {
    server_ms: Option<f64>,
    postgres_ms: Option<f64>,
    generator_ms: f64,
}

#[derive(Debug, Serialize)]
struct ModeReport {
    mode: &'static str,
    seconds: f64,
    accepted: u64,
    commands_per_second: f64,
    latency: Latency,
    by_operation: BTreeMap<Operation, Latency>,
    /// Responses that were not 2xx, by status and problem code.
    errors: BTreeMap<String, u64>,
    cpu_per_command: CpuPerCommand,
    /// Events the log took per accepted command, and per writer transaction (command API only).
    events_per_command: Option<f64>,
    events_per_group: Option<f64>,
}

/// PostgreSQL alone, in commands/s of the group-commit phase's mix.
#[derive(Debug, Serialize)]
struct PostgresLimit {
    #[serde(flatten)]
    run: PostgresAlone,
    commands_per_second: f64,
    postgres_cpu_ms_per_command: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    clients: usize,
    users: usize,
    seconds_per_mode: u64,
    seed: u64,
    modes: Vec<ModeReport>,
    /// Group commit's accepted commands/s over the baseline's, when both ran.
    ratio: Option<f64>,
    postgres_alone: Option<PostgresLimit>,
    /// Group commit's commands/s as a fraction of each part alone.
    fraction_of_http_alone: Option<f64>,
    fraction_of_postgres_alone: Option<f64>,
}

pub async fn run(args: &LoadCommandsArgs) -> anyhow::Result<()> {
    if args.clients == 0 || args.users < args.clients {
        bail!("--users must be at least --clients (each client drives its own users)");
    }
    let mut targets = Vec::new();
    if !args.no_limits {
        targets.push(Target::FixedAnswers);
    }
    if !args.no_baseline {
        targets.push(Target::Unbatched);
    }
    targets.push(Target::GroupCommit);
    println!(
        "load commands: {} clients, {} users, {} s per mode, seed {}; the server a child process",
        args.clients, args.users, args.duration, args.seed
    );
    let logs = std::env::temp_dir().join("cloudphone-load-commands");
    std::fs::create_dir_all(&logs).with_context(|| format!("create {}", logs.display()))?;
    let mut reports = Vec::new();
    let mut postgres_alone = None;
    for target in targets {
        let report = run_mode(args, target, &logs).await?;
        print_mode(&report);
        if target == Target::GroupCommit && !args.no_limits {
            postgres_alone = Some(measure_postgres_alone(args, &report).await?);
        }
        reports.push(report);
    }
    let rate_of = |label: &str| reports.iter().find(|r| r.mode == label).map(|r| r.commands_per_second);
    let grouped = rate_of(Target::GroupCommit.label()).unwrap_or(0.0);
    let ratio = rate_of(Target::Unbatched.label()).map(|baseline| grouped / baseline.max(1e-9));
    if let Some(ratio) = ratio {
        println!("  group commit / baseline: {ratio:.1}x accepted commands/s");
    }
    let fraction_of_http_alone = rate_of(Target::FixedAnswers.label()).map(|http| grouped / http.max(1e-9));
    let fraction_of_postgres_alone = postgres_alone
        .as_ref()
        .map(|limit: &PostgresLimit| grouped / limit.commands_per_second.max(1e-9));
    if let (Some(http), Some(postgres)) = (fraction_of_http_alone, fraction_of_postgres_alone) {
        println!(
            "  group commit = {:.0} % of the HTTP stack alone, {:.0} % of PostgreSQL alone",
            http * 100.0,
            postgres * 100.0
        );
    }
    let report = Report {
        clients: args.clients,
        users: args.users,
        seconds_per_mode: args.duration,
        seed: args.seed,
        modes: reports,
        ratio,
        postgres_alone,
        fraction_of_http_alone,
        fraction_of_postgres_alone,
    };
    if let Some(path) = &args.json {
        write_json(path, &report)?;
        println!("  report written to {}", path.display());
    }
    Ok(())
}

fn print_mode(report: &ModeReport) {
    let cpu = report.cpu_per_command;
    let ms = |value: Option<f64>| value.map_or_else(|| "-".to_owned(), |v| format!("{v:.3}"));
    println!(
        "  {:<40} {:>8.0} commands/s   p50 {:>6.2} ms   p99 {:>6.2} ms   p999 {:>7.2} ms   errors {:?}",
        report.mode,
        report.commands_per_second,
        report.latency.p50_ms,
        report.latency.p99_ms,
        report.latency.p999_ms,
        report.errors
    );
    println!(
        "      CPU per command: server {} ms, PostgreSQL {} ms, load generator {:.3} ms{}",
        ms(cpu.server_ms),
        ms(cpu.postgres_ms),
        cpu.generator_ms,
        match (report.events_per_command, report.events_per_group) {
            (Some(command), Some(group)) => format!("; {command:.2} events per command, {group:.1} per transaction"),
            _ => String::new(),
        }
    );
    for (operation, latency) in &report.by_operation {
        println!(
            "      {:<10} {:>7} commands   p50 {:>6.2} ms   p99 {:>6.2} ms",
            format!("{operation:?}").to_lowercase(),
            latency.count,
            latency.p50_ms,
            latency.p99_ms
        );
    }
}

/// pgbench writing the group-commit phase's rows again, in its database, in groups of the
/// size its writer made.
async fn measure_postgres_alone(args: &LoadCommandsArgs, grouped: &ModeReport) -> anyhow::Result<PostgresLimit> {
    let (Some(events_per_command), Some(events_per_group)) = (grouped.events_per_command, grouped.events_per_group)
    else {
        bail!("the group-commit phase reported no events per group");
    };
    let url = database_url_of(&args.database.database_url, LOAD_DATABASE)?;
    let pool = event_log::pool_options(2).connect(&url).await?;
    let group = events_per_group.round().clamp(1.0, f64::from(u32::MAX)) as u32;
    let run = write_the_same_rows(&pool, &url, group, args.duration).await?;
    pool.close().await;
    let commands_per_second = run.events_per_second / events_per_command.max(1e-9);
    let limit = PostgresLimit {
        postgres_cpu_ms_per_command: run
            .postgres_cpu_seconds
            .map(|cpu| cpu * 1000.0 / (commands_per_second * run.seconds).max(1.0)),
        commands_per_second,
        run,
    };
    println!(
        "  {:<40} {:>8.0} commands/s   ({:.0} events/s in {} groups/s of {} events, pgbench on one connection); \
         CPU per command: PostgreSQL {} ms",
        "PostgreSQL alone (the same rows)",
        limit.commands_per_second,
        limit.run.events_per_second,
        limit.run.groups_per_second.round(),
        limit.run.events_per_group,
        limit
            .postgres_cpu_ms_per_command
            .map_or_else(|| "-".to_owned(), |v| format!("{v:.3}")),
    );
    Ok(limit)
}

async fn run_mode(args: &LoadCommandsArgs, target: Target, logs: &Path) -> anyhow::Result<ModeReport> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.clients)
        .timeout(Duration::from_secs(30))
        .build()?;
    // The command API's database: fresh for each mode, so each starts from the same state.
    let pool = match target {
        Target::FixedAnswers => None,
        Target::Unbatched | Target::GroupCommit => Some(fresh_database(&args.database.database_url).await?),
    };
    let server = match target {
        Target::FixedAnswers => fixed_answer::start(logs)?,
        Target::Unbatched | Target::GroupCommit => {
            let mode = if target == Target::Unbatched {
                "unbatched"
            } else {
                "group"
            };
            let url = database_url_of(&args.database.database_url, LOAD_DATABASE)?;
            RoleProcess::start_with("command-api", &url, logs, &[("CLOUDPHONE_APPEND_MODE", mode)])?
        }
    };
    server.ready(&client).await?;
    let base = server.base.clone();
    let users = match target {
        Target::FixedAnswers => (0..args.users)
            .map(|_| {
                Ok(LoadUser {
                    token: load_token(&Uuid::now_v7().to_string(), Role::User)?,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?,
        Target::Unbatched | Target::GroupCommit => provision_users(&client, &base, args.users)
            .await?
            .into_iter()
            .map(|(_, token)| LoadUser { token })
            .collect(),
    };
    let users = Arc::new(users);
    let postgres = match &pool {
        Some(pool) => PostgresCpu::start(pool).await,
        None => None,
    };
    let (server_before, generator_before) = (cpu_seconds(server.pid()), cpu_seconds(std::process::id()));
    let events_before = metric(&client, &base, event_log::metrics_names::APPEND_EVENTS_TOTAL).await;
    let groups_before = metric(&client, &base, GROUPS).await;
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let (client, base, users) = (client.clone(), base.clone(), Arc::clone(&users));
        let seed = args.seed.wrapping_add(c as u64);
        let clients = args.clients;
        tasks.push(tokio::spawn(async move {
            let own: Vec<usize> = (c..users.len()).step_by(clients).collect();
            drive(client, base, users, own, seed, deadline).await
        }));
    }
    let label = target.label();
    let mut progress = Progress::new(label, args.duration);
    let started = Instant::now();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        progress.set(started.elapsed().as_secs());
        server.alive()?;
    }
    let mut total = histogram();
    let mut by_operation: BTreeMap<Operation, Histogram<u64>> = BTreeMap::new();
    let mut errors = BTreeMap::new();
    for task in tasks {
        let outcome = task.await.context("load client panicked")?;
        for (operation, histogram) in outcome.latencies {
            total.add(&histogram).ok();
            by_operation
                .entry(operation)
                .or_insert_with(self::histogram)
                .add(&histogram)
                .ok();
        }
        for (error, count) in outcome.errors {
            *errors.entry(error).or_insert(0) += count;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let accepted = total.len();
    let per_command = |cpu: f64| cpu * 1000.0 / (accepted.max(1) as f64);
    let cpu_per_command = CpuPerCommand {
        server_ms: cpu_seconds(server.pid())
            .zip(server_before)
            .map(|(after, before)| per_command(after - before)),
        postgres_ms: postgres.map(|meter| per_command(meter.seconds())),
        generator_ms: per_command(cpu_seconds(std::process::id()).unwrap_or(0.0) - generator_before.unwrap_or(0.0)),
    };
    progress.finish();
    let (events_per_command, events_per_group) = if pool.is_some() {
        let events = metric(&client, &base, event_log::metrics_names::APPEND_EVENTS_TOTAL).await - events_before;
        let groups = metric(&client, &base, GROUPS).await - groups_before;
        (
            Some(events / (accepted.max(1) as f64)),
            (target == Target::GroupCommit && groups > 0.0).then(|| events / groups),
        )
    } else {
        (None, None)
    };
    drop(server);
    if let Some(pool) = pool {
        pool.close().await;
    }
    Ok(ModeReport {
        mode: label,
        seconds,
        accepted,
        commands_per_second: accepted as f64 / seconds,
        latency: Latency::of(&total),
        by_operation: by_operation.iter().map(|(op, h)| (*op, Latency::of(h))).collect(),
        errors,
        cpu_per_command,
        events_per_command,
        events_per_group,
    })
}

/// Transactions of the group-commit writer (one sample of the group-size summary each).
const GROUPS: &str = "cloudphone_append_group_batches_count";

struct LoadUser {
    token: String,
}

struct ClientOutcome {
    latencies: BTreeMap<Operation, Histogram<u64>>,
    errors: BTreeMap<String, u64>,
}

/// One portal client: picks one of its users and a command that fits what it knows of that
/// user's devices (about 15 % creates, 35 % starts, 35 % stops, 8 % resizes, 7 % deletes).
async fn drive(
    client: reqwest::Client,
    base: String,
    users: Arc<Vec<LoadUser>>,
    own: Vec<usize>,
    seed: u64,
    deadline: Instant,
) -> ClientOutcome {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut fleets: Vec<Vec<Device>> = vec![Vec::new(); own.len()];
    let mut latencies: BTreeMap<Operation, Histogram<u64>> = BTreeMap::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    while Instant::now() < deadline {
        let slot = rng.random_range(0..own.len());
        let user = &users[own[slot]];
        let fleet = &mut fleets[slot];
        let (command, request) = PortalCommand::choose(&mut rng, &client, &base, fleet);
        let started = Instant::now();
        let response = request.bearer_auth(&user.token).send().await;
        let elapsed = started.elapsed();
        match response {
            Ok(response) if response.status().is_success() => {
                latencies
                    .entry(command.operation)
                    .or_insert_with(self::histogram)
                    .record(elapsed.as_micros() as u64)
                    .ok();
                let body: serde_json::Value = response.json().await.unwrap_or_default();
                command.succeeded(fleet, &body);
            }
            Ok(response) => {
                let status = response.status().as_u16();
                let body: serde_json::Value = response.json().await.unwrap_or_default();
                let code = body["code"].as_str().unwrap_or("?").to_owned();
                *errors.entry(format!("{status} {code}")).or_insert(0) += 1;
            }
            Err(error) => {
                let kind = if error.is_timeout() { "timeout" } else { "transport" };
                *errors.entry(kind.to_owned()).or_insert(0) += 1;
            }
        }
    }
    ClientOutcome { latencies, errors }
}
