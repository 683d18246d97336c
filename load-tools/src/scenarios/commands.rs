//! `cloudphone load commands`: drive the command API with a realistic portal mix over HTTP and
//! report throughput and latency, against the one-transaction-per-command baseline in the
//! same run, on the same machine and a fresh database each.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use command_api::{ApiConfig, AppendMode, Application};
use hdrhistogram::Histogram;
use http_edge::auth::{KeySource, Role};
use operator_console::Progress;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::json;
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::cli::LoadCommandsArgs;
use crate::harness::databases::fresh_database;
use crate::harness::portal::register_user;
use crate::harness::report::{Latency, histogram, write_json};
use crate::harness::tokens::{SECRET, load_token};
use crate::workloads::portal::{Device, Operation, PortalCommand};

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
}

pub async fn run(args: &LoadCommandsArgs) -> anyhow::Result<()> {
    if args.clients == 0 || args.users < args.clients {
        bail!("--users must be at least --clients (each client drives its own users)");
    }
    let mut modes = Vec::new();
    if !args.no_baseline {
        modes.push((AppendMode::Unbatched, "one transaction per command (baseline)"));
    }
    modes.push((AppendMode::GroupCommit, "group commit"));
    println!(
        "load commands: {} clients, {} users, {} s per mode, seed {}",
        args.clients, args.users, args.duration, args.seed
    );
    let mut reports = Vec::new();
    for (mode, label) in modes {
        let report = run_mode(args, mode, label).await?;
        println!(
            "  {:<40} {:>8.0} commands/s   p50 {:>6.2} ms   p99 {:>6.2} ms   p999 {:>7.2} ms   errors {:?}",
            label,
            report.commands_per_second,
            report.latency.p50_ms,
            report.latency.p99_ms,
            report.latency.p999_ms,
            report.errors
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
        reports.push(report);
    }
    let ratio = match &reports[..] {
        [baseline, grouped] => Some(grouped.commands_per_second / baseline.commands_per_second.max(1e-9)),
        _ => None,
    };
    if let Some(ratio) = ratio {
        println!("  group commit / baseline: {ratio:.1}x accepted commands/s");
    }
    let report = Report {
        clients: args.clients,
        users: args.users,
        seconds_per_mode: args.duration,
        seed: args.seed,
        modes: reports,
        ratio,
    };
    if let Some(path) = &args.json {
        write_json(path, &report)?;
        println!("  report written to {}", path.display());
    }
    Ok(())
}

async fn run_mode(args: &LoadCommandsArgs, mode: AppendMode, label: &'static str) -> anyhow::Result<ModeReport> {
    let pool = fresh_database(&args.database.database_url).await?;
    let config = ApiConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        keys: KeySource::Secret(SECRET.into()),
        rate_per_second: 10_000_000,
        rate_burst: 10_000_000,
        append_mode: mode,
        ..ApiConfig::default()
    };
    let app = Application::build(config, pool.clone(), http_edge::telemetry::prometheus()).await?;
    let base = format!("http://{}", app.local_addr());
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.clients)
        .timeout(Duration::from_secs(30))
        .build()?;

    let users = provision(&client, &base, args.users).await?;
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let users = Arc::new(users);
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
    let mut progress = Progress::new(label, args.duration);
    let started = Instant::now();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        progress.set(started.elapsed().as_secs());
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
    progress.finish();
    let _ = stop.send(());
    server.await.context("server task")?.context("server")?;
    pool.close().await;
    Ok(ModeReport {
        mode: label,
        seconds,
        accepted: total.len(),
        commands_per_second: total.len() as f64 / seconds,
        latency: Latency::of(&total),
        by_operation: by_operation.iter().map(|(op, h)| (*op, Latency::of(h))).collect(),
        errors,
    })
}

struct LoadUser {
    token: String,
}

/// Registers `count` enterprise users with room for a large fleet each.
async fn provision(client: &reqwest::Client, base: &str, count: usize) -> anyhow::Result<Vec<LoadUser>> {
    let admin = load_token(&Uuid::now_v7().to_string(), Role::Admin)?;
    let mut users = Vec::with_capacity(count);
    for _ in 0..count {
        let (id, token) = register_user(client, base).await?;
        let quota = client
            .put(format!("{base}/v1/users/{id}/quota"))
            .bearer_auth(&admin)
            .json(&json!({"max_devices": 100000, "max_cpu_cores": 1600000, "max_memory_mb": 4000000000u64}))
            .send()
            .await?;
        if !quota.status().is_success() {
            bail!("provisioning a quota failed: {}", quota.status());
        }
        users.push(LoadUser { token });
    }
    Ok(users)
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
