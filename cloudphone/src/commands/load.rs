//! `cloudphone load commands`: drive the command API with a realistic portal mix over HTTP and
//! report throughput and latency, against the one-transaction-per-command baseline in the
//! same run, on the same machine and a fresh database each.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::Utc;
use command_api::auth::{KeySource, Role, mint_token};
use command_api::{ApiConfig, AppendMode, Application};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::json;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, Executor, PgPool};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::cli::{LoadCommandsArgs, LoadKind};
use crate::progress::Progress;

/// The secret every load run's servers check tokens with, and `load_token` signs with.
pub(crate) const SECRET: &str = "cloudphone-load-secret";
const LOAD_DATABASE: &str = "cloudphone_load";

pub async fn run(kind: &LoadKind) -> anyhow::Result<()> {
    match kind {
        LoadKind::Commands(args) => commands(args).await,
        LoadKind::Projections(args) => super::load_projections::run(args).await,
        LoadKind::Queries(args) => super::load_queries::run(args).await,
        LoadKind::Replay(args) => super::load_replay::run(args).await,
        LoadKind::Export(args) => super::load_export::run(args).await,
        LoadKind::Platform(args) => super::load_platform::run(args).await,
        LoadKind::Hostile(args) => super::load_hostile::run(args).await,
        LoadKind::History(args) => super::load_history::run(args).await,
    }
}

/// A portal command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Operation {
    Create,
    Start,
    Stop,
    Resize,
    Delete,
}

#[derive(Debug, Serialize)]
pub(crate) struct Latency {
    pub(crate) count: u64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) p999_ms: f64,
}

impl Latency {
    pub(crate) fn of(histogram: &Histogram<u64>) -> Self {
        let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
        Latency {
            count: histogram.len(),
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
        }
    }
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

async fn commands(args: &LoadCommandsArgs) -> anyhow::Result<()> {
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
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("write {}", path.display()))?;
        println!("  report written to {}", path.display());
    }
    Ok(())
}

/// A fresh database for one mode, so each starts from the same empty state.
pub(crate) async fn fresh_database(url: &str) -> anyhow::Result<PgPool> {
    recreate_database(url, LOAD_DATABASE, 32).await
}

/// Drops and creates the database `name` on the server of `url` (never the database `url`
/// names), and applies the event log's migrations.
pub(crate) async fn recreate_database(url: &str, name: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(url).context("--database-url")?;
    let mut admin = options
        .clone()
        .database("postgres")
        .disable_statement_logging()
        .connect()
        .await
        .context("connect to postgres")?;
    admin
        .execute(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .await?;
    admin
        .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await?;
    admin.close().await?;
    let pool = event_log::pool_options(max_connections)
        .connect_with(options.database(name))
        .await?;
    event_log::migrate(&pool).await?;
    Ok(pool)
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
    let app = Application::build(config, pool.clone(), command_api::telemetry::prometheus()).await?;
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

/// A token for `subject` in `role`, signed with [`SECRET`] and valid longer than any run.
pub(crate) fn load_token(subject: &str, role: Role) -> anyhow::Result<String> {
    Ok(mint_token(
        SECRET,
        subject,
        role,
        &[],
        Utc::now(),
        chrono::Duration::hours(12),
    )?)
}

#[allow(clippy::expect_used)] // constant bounds, checked by every run
pub(crate) fn histogram() -> Histogram<u64> {
    // 1 µs .. 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

struct LoadUser {
    token: String,
}

/// Registers `count` enterprise users with room for a large fleet each.
async fn provision(client: &reqwest::Client, base: &str, count: usize) -> anyhow::Result<Vec<LoadUser>> {
    let admin = load_token(&Uuid::now_v7().to_string(), Role::Admin)?;
    let mut users = Vec::with_capacity(count);
    for _ in 0..count {
        let id = Uuid::now_v7();
        let token = load_token(&id.to_string(), Role::User)?;
        let registered = client
            .post(format!("{base}/v1/users"))
            .bearer_auth(&token)
            .json(&json!({"tier": "enterprise", "email": "load@example.com", "phone": "+4915112345678"}))
            .send()
            .await?;
        if !registered.status().is_success() {
            bail!("provisioning a user failed: {}", registered.status());
        }
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

/// A device a portal client knows of, and whether it last saw it running.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Device {
    pub(crate) id: Uuid,
    pub(crate) running: bool,
}

/// The portal command a client sends next, chosen to fit what it knows of the user's fleet.
#[derive(Clone, Copy)]
pub(crate) struct PortalCommand {
    pub(crate) operation: Operation,
    /// Which of the fleet's devices the command is about; `None` for a create.
    device: Option<usize>,
}

impl PortalCommand {
    /// About 15 % creates, 35 % starts, 35 % stops, 8 % resizes, 7 % deletes once the user has
    /// two devices; a create before that. Returns the command and its request, without auth.
    pub(crate) fn choose(
        rng: &mut StdRng,
        client: &reqwest::Client,
        base: &str,
        fleet: &[Device],
    ) -> (Self, reqwest::RequestBuilder) {
        let roll = rng.random_range(0..100);
        if fleet.len() < 2 || roll < 15 {
            let body = json!({"provider": "aws", "cpu_cores": 2, "memory_mb": 2048, "android_version": 14});
            let command = PortalCommand {
                operation: Operation::Create,
                device: None,
            };
            return (command, client.post(format!("{base}/v1/devices")).json(&body));
        }
        let index = rng.random_range(0..fleet.len());
        let Device { id, running } = fleet[index];
        let (operation, request) = match (running, roll) {
            (_, 15..=21) => (Operation::Delete, client.delete(format!("{base}/v1/devices/{id}"))),
            (true, _) => (Operation::Stop, client.post(format!("{base}/v1/devices/{id}/stop"))),
            (false, 22..=29) => {
                let cores = [2, 4][rng.random_range(0..2)];
                let body = json!({"cpu_cores": cores, "memory_mb": cores * 1024});
                let request = client.post(format!("{base}/v1/devices/{id}/resize")).json(&body);
                (Operation::Resize, request)
            }
            (false, _) => (Operation::Start, client.post(format!("{base}/v1/devices/{id}/start"))),
        };
        let command = PortalCommand {
            operation,
            device: Some(index),
        };
        (command, request)
    }

    /// Brings the client's picture of the fleet up to date once the command succeeded with
    /// `body` as its answer.
    pub(crate) fn succeeded(self, fleet: &mut Vec<Device>, body: &serde_json::Value) {
        match (self.operation, self.device) {
            (Operation::Create, _) => {
                if let Some(id) = body["id"].as_str().and_then(|s| s.parse().ok()) {
                    fleet.push(Device { id, running: false });
                }
            }
            (Operation::Delete, Some(i)) => {
                fleet.swap_remove(i);
            }
            (Operation::Start, Some(i)) => fleet[i].running = true,
            (Operation::Stop, Some(i)) => fleet[i].running = false,
            _ => {}
        }
    }
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
                    .or_insert_with(histogram)
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
