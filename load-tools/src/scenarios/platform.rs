//! `cloudphone load platform`: the whole platform under a realistic mix, as production runs it.
//!
//! It generates a world (a fleet's history recorded over months, so it fills several monthly
//! partitions, and the owners' registrations with quotas and encrypted personal data), starts
//! the command API, a projector and the query API as child processes of this binary (so each
//! role's CPU and memory are its own), waits for the projector to catch up, and then starts
//! operations on a fixed schedule: portal commands and dashboard queries, a dashboard read
//! after a command asking for that command's position (read-your-writes), an audit export
//! every few seconds and a replay of `daily_usage` in the background.
//!
//! Beside the latencies it reports each process's CPU per completed operation (the roles, the
//! load generator, PostgreSQL's processes and the replay's), so a profile starts from the part
//! that costs most.
//!
//! Latency counts from each operation's scheduled start (open loop), so a stall shows up in
//! the percentiles instead of slowing the load down. The run fails if any answer is a 5xx,
//! a transport error or a truncated export, or if the projector does not catch up afterwards.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::Utc;
use event_log::LogReader;
use hdrhistogram::Histogram;
use http_edge::auth::Role;
use operator_console::Progress;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::sync::{Mutex, Semaphore, mpsc};
use uuid::Uuid;

use crate::cli::LoadPlatformArgs;
use crate::harness::databases::{applied, recreate_database, settle_database};
use crate::harness::metrics::{metric_sum, scrape};
use crate::harness::report::{Latency, histogram, write_json};
use crate::harness::roles::RoleProcess;
use crate::harness::sampling::{PostgresCpu, cpu_seconds, vm_hwm_mib, vm_rss_mib};
use crate::harness::tokens::load_token;
use crate::workloads::dashboards::{Dashboard, Kind};
use crate::workloads::portal::{Device, Operation, PortalCommand};
use crate::world::history::write_history_since;
use crate::world::owners::register_owners;

const DATABASE: &str = "cloudphone_load_platform";
/// Longest the projector may take to catch up (on the world, and after the load).
const CATCH_UP_LIMIT: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
enum Op {
    Create,
    Start,
    Stop,
    Resize,
    Delete,
    /// A dashboard query with no position: any replica and the cache may answer.
    Dashboard,
    /// A dashboard query right after its user's command, with `X-Min-Position`.
    DashboardAfterWrite,
    /// A whole audit export of one user's history, downloaded.
    Export,
}

impl From<Operation> for Op {
    fn from(operation: Operation) -> Self {
        match operation {
            Operation::Create => Op::Create,
            Operation::Start => Op::Start,
            Operation::Stop => Op::Stop,
            Operation::Resize => Op::Resize,
            Operation::Delete => Op::Delete,
        }
    }
}

/// What one operation ended with.
struct Outcome {
    op: Op,
    /// From the scheduled start to the end of the answer's body.
    micros: u64,
    /// `None` when the operation did what it should.
    error: Option<String>,
    /// A 5xx, a transport error or a truncated export: what the platform must never do.
    fatal: bool,
}

#[derive(Debug, Serialize)]
struct World {
    events: i64,
    months: i64,
    users: i64,
    devices: i64,
    write_seconds: f64,
    /// Seconds the projector took to apply the world's history once started.
    catch_up_seconds: f64,
}

#[derive(Debug, Serialize)]
struct OpReport {
    per_second: f64,
    #[serde(flatten)]
    latency: Latency,
    errors: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize)]
struct LagReport {
    samples: u64,
    events_p50: u64,
    events_p99: u64,
    events_max: u64,
    seconds_p99: f64,
    seconds_max: f64,
    /// After the load stopped: seconds until every projection had applied the head.
    drain_seconds: f64,
}

#[derive(Debug, Serialize)]
struct CacheReport {
    hits: f64,
    misses: f64,
    hit_ratio: f64,
}

#[derive(Debug, Serialize)]
struct RoleReport {
    /// CPU seconds (user + system) spent during the measured load.
    cpu_seconds: f64,
    /// Of one core, averaged over the load (200 % is both cores of this machine).
    cpu_percent: f64,
    /// CPU milliseconds per completed operation: which part to shrink for more operations/s.
    cpu_ms_per_operation: f64,
    /// `None` for PostgreSQL, whose processes come and go.
    rss_mib: Option<f64>,
    peak_rss_mib: Option<f64>,
}

impl RoleReport {
    fn of(cpu_seconds: f64, seconds: f64, completed: u64, pid: Option<u32>) -> Self {
        RoleReport {
            cpu_seconds,
            cpu_percent: 100.0 * cpu_seconds / seconds,
            cpu_ms_per_operation: 1000.0 * cpu_seconds / completed.max(1) as f64,
            rss_mib: pid.and_then(vm_rss_mib),
            peak_rss_mib: pid.and_then(vm_hwm_mib),
        }
    }
}

#[derive(Debug, Serialize)]
struct ReplayReport {
    seconds: f64,
    succeeded: bool,
    /// The replay process's own CPU (its fold), as last read before it exited (at most
    /// 0.1 s before); its statements' CPU is in PostgreSQL's.
    cpu_seconds: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    seed: u64,
    rate: u64,
    duration_seconds: f64,
    command_percent: u32,
    world: World,
    operations_per_second: f64,
    operations: BTreeMap<Op, OpReport>,
    /// Scheduled operations not started because `--max-in-flight` were still running.
    shed: u64,
    fatal_errors: u64,
    projection_lag: LagReport,
    query_cache: CacheReport,
    roles: BTreeMap<String, RoleReport>,
    replay: Option<ReplayReport>,
}

pub async fn run(args: &LoadPlatformArgs) -> anyhow::Result<()> {
    if args.rate == 0 || args.duration == 0 || args.users == 0 {
        bail!("--rate, --duration and --users must be positive");
    }
    println!(
        "load platform: world of {} events over {} months, {} users, {} operations/s for {} s ({} % commands), seed {}",
        args.history_events, args.history_months, args.users, args.rate, args.duration, args.command_percent, args.seed
    );
    let (pool, url, write_seconds) = write_world(args).await?;
    let logs = std::env::temp_dir().join(format!("cloudphone-load-platform-{}", std::process::id()));
    std::fs::create_dir_all(&logs).with_context(|| format!("create {}", logs.display()))?;
    println!("  role logs in {}", logs.display());

    // The projector first: its catch-up over the world is a figure of its own.
    let projector = RoleProcess::start("projector", &url, &logs)?;
    // The roles close a connection idle for their keep-alive timeout (5 s). An open-loop
    // schedule leaves some pooled connections idle that long whenever fewer operations are in
    // flight, and a request sent on one just as the role closes it fails in transport (6 of
    // 94 000 operations in one run at 3 000/s): the client retires its idle connections first.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.max_in_flight)
        .pool_idle_timeout(http_edge::connections::ConnectionLimits::default().keep_alive_timeout / 2)
        .timeout(Duration::from_secs(60))
        .build()?;
    projector.ready(&client).await?;
    let head = LogReader::new(pool.clone()).head().await?.position;
    let caught_up = Instant::now();
    reach(&pool, head, "projector catch-up").await?;
    let catch_up_seconds = caught_up.elapsed().as_secs_f64();
    let command = RoleProcess::start("command-api", &url, &logs)?;
    let query = RoleProcess::start("query-api", &url, &logs)?;
    command.ready(&client).await?;
    query.ready(&client).await?;
    let world = describe(&pool, write_seconds, catch_up_seconds).await?;
    println!(
        "  world: {} events in {} months, {} users, {} devices (written in {:.1} s, projected in {:.1} s)",
        world.events, world.months, world.users, world.devices, world.write_seconds, world.catch_up_seconds
    );

    let users = Arc::new(portal_users(&pool, &client, &command.base, args).await?);
    let roles = [&command, &query, &projector];
    let cpu_before: Vec<f64> = roles.iter().map(|r| cpu_seconds(r.pid()).unwrap_or(0.0)).collect();
    let own_cpu_before = cpu_seconds(std::process::id()).unwrap_or(0.0);
    // The server's backends, WAL writer, checkpointer and WAL sender; the replay's too, which
    // exit before the end.
    let postgres_cpu = PostgresCpu::start(&pool).await;
    let cache_before = scrape(&client, &query.base).await.unwrap_or_default();

    let stop = tokio_util::sync::CancellationToken::new();
    let lag_task = tokio::spawn(sample_lag(pool.clone(), stop.clone()));
    let (sender, mut receiver) = mpsc::unbounded_channel::<Outcome>();
    let exports = (args.export_every > 0).then(|| {
        tokio::spawn(export_loop(
            client.clone(),
            query.base.clone(),
            Arc::clone(&users),
            args.seed,
            Duration::from_secs(args.export_every),
            sender.clone(),
            stop.clone(),
        ))
    });
    let replay = (!args.no_replay).then(|| {
        let url = url.clone();
        let logs = logs.clone();
        let delay = Duration::from_secs(args.duration) / 3;
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            replay_daily_usage(&url, &logs).await
        })
    });

    // The schedule: one operation every 1/rate s, whatever the answers take.
    let (command_base, query_base) = (Arc::new(command.base.clone()), Arc::new(query.base.clone()));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.duration);
    let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
    let in_flight = Arc::new(Semaphore::new(args.max_in_flight.max(1)));
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut progress = Progress::new("load", args.duration);
    let mut next = tokio::time::Instant::now();
    let mut shed = 0u64;
    let mut outcomes = Vec::new();
    while Instant::now() < deadline {
        tokio::time::sleep_until(next).await;
        let scheduled = Instant::now();
        next += interval;
        while let Ok(outcome) = receiver.try_recv() {
            outcomes.push(outcome);
        }
        progress.set(started.elapsed().as_secs());
        let Ok(permit) = Arc::clone(&in_flight).try_acquire_owned() else {
            shed += 1;
            continue;
        };
        let command = rng.random_range(0..100) < args.command_percent;
        let seed: u64 = rng.random();
        let (client, users, sender) = (client.clone(), Arc::clone(&users), sender.clone());
        let base = if command {
            command_base.clone()
        } else {
            query_base.clone()
        };
        tokio::spawn(async move {
            let outcome = if command {
                portal_command(&client, &base, &users, seed, scheduled).await
            } else {
                dashboard_query(&client, &base, &users, seed, scheduled).await
            };
            if let Some(outcome) = outcome {
                let _ = sender.send(outcome);
            }
            drop(permit);
        });
    }
    // Every operation started has finished once all permits are back.
    let _all = in_flight
        .acquire_many(u32::try_from(args.max_in_flight.max(1)).unwrap_or(u32::MAX))
        .await
        .context("the in-flight limit")?;
    let seconds = started.elapsed().as_secs_f64();
    progress.finish();
    stop.cancel();
    if let Some(exports) = exports {
        exports.await.context("export loop")?;
    }
    drop(sender);
    while let Some(outcome) = receiver.recv().await {
        outcomes.push(outcome);
    }
    let cpu_after: Vec<f64> = roles.iter().map(|r| cpu_seconds(r.pid()).unwrap_or(0.0)).collect();
    let own_cpu_after = cpu_seconds(std::process::id()).unwrap_or(0.0);
    let postgres_seconds = postgres_cpu.as_ref().map(PostgresCpu::seconds);
    let cache_after = scrape(&client, &query.base).await.unwrap_or_default();

    let replay = match replay {
        Some(task) => Some(task.await.context("replay task")?),
        None => None,
    };
    let head = LogReader::new(pool.clone()).head().await?.position;
    let draining = Instant::now();
    let drained = reach(&pool, head, "projector drain").await;
    let drain_seconds = draining.elapsed().as_secs_f64();
    let lag = lag_task.await.context("lag sampler")?;

    let mut by_op: BTreeMap<Op, (Histogram<u64>, BTreeMap<String, u64>)> = BTreeMap::new();
    let mut fatal_errors = 0u64;
    for outcome in &outcomes {
        let (histogram, errors) = by_op
            .entry(outcome.op)
            .or_insert_with(|| (histogram(), BTreeMap::new()));
        match &outcome.error {
            None => {
                histogram.record(outcome.micros.max(1)).ok();
            }
            Some(kind) => *errors.entry(kind.clone()).or_insert(0) += 1,
        }
        fatal_errors += u64::from(outcome.fatal);
    }
    let operations: BTreeMap<Op, OpReport> = by_op
        .into_iter()
        .map(|(op, (histogram, errors))| {
            let report = OpReport {
                per_second: histogram.len() as f64 / seconds,
                latency: Latency::of(&histogram),
                errors,
            };
            (op, report)
        })
        .collect();
    let hits = metric_sum(&cache_after, "cloudphone_query_cache_lookups_total", "result=\"hit\"")
        - metric_sum(&cache_before, "cloudphone_query_cache_lookups_total", "result=\"hit\"");
    let misses = metric_sum(&cache_after, "cloudphone_query_cache_lookups_total", "result=\"miss\"")
        - metric_sum(&cache_before, "cloudphone_query_cache_lookups_total", "result=\"miss\"");
    let completed: u64 = operations.values().map(|o| o.latency.count).sum();
    let mut role_reports = BTreeMap::new();
    for (index, role) in roles.iter().enumerate() {
        let cpu = cpu_after[index] - cpu_before[index];
        role_reports.insert(
            role.name.to_owned(),
            RoleReport::of(cpu, seconds, completed, Some(role.pid())),
        );
    }
    role_reports.insert(
        "load generator".to_owned(),
        RoleReport::of(
            own_cpu_after - own_cpu_before,
            seconds,
            completed,
            Some(std::process::id()),
        ),
    );
    if let Some(postgres) = postgres_seconds {
        role_reports.insert(
            "postgresql".to_owned(),
            RoleReport::of(postgres, seconds, completed, None),
        );
    }
    let report = Report {
        seed: args.seed,
        rate: args.rate,
        duration_seconds: seconds,
        command_percent: args.command_percent,
        world,
        operations_per_second: completed as f64 / seconds,
        operations,
        shed,
        fatal_errors,
        projection_lag: LagReport {
            samples: lag.events.len(),
            events_p50: lag.events.value_at_quantile(0.5).saturating_sub(1),
            events_p99: lag.events.value_at_quantile(0.99).saturating_sub(1),
            events_max: lag.events.max().saturating_sub(1),
            seconds_p99: lag.millis.value_at_quantile(0.99).saturating_sub(1) as f64 / 1000.0,
            seconds_max: lag.millis.max().saturating_sub(1) as f64 / 1000.0,
            drain_seconds,
        },
        query_cache: CacheReport {
            hits,
            misses,
            hit_ratio: if hits + misses > 0.0 {
                hits / (hits + misses)
            } else {
                0.0
            },
        },
        roles: role_reports,
        replay,
    };
    print(&report);
    if let Some(path) = &args.json {
        write_json(path, &report)?;
        println!("  report written to {}", path.display());
    }
    drained?;
    for role in roles {
        role.alive()?;
    }
    if fatal_errors > 0 {
        bail!("{fatal_errors} operations ended in a 5xx, a transport error or a truncated export");
    }
    if report.replay.as_ref().is_some_and(|r| !r.succeeded) {
        bail!("the replay failed (its log is in {})", logs.display());
    }
    Ok(())
}

/// The world: device histories recorded over the last `--history-months` months, then every
/// owner registered (with a quota and encrypted email and phone).
async fn write_world(args: &LoadPlatformArgs) -> anyhow::Result<(PgPool, String, f64)> {
    let pool = recreate_database(&args.database.database_url, DATABASE, 16).await?;
    let mut url = reqwest::Url::parse(&args.database.database_url).context("--database-url")?;
    url.set_path(&format!("/{DATABASE}"));
    let started = Instant::now();
    // Each registration is two events; the history has one owner per 100 device events.
    let device_events = args.history_events - args.history_events * 2 / 102;
    let since = Utc::now() - chrono::Duration::days(30 * i64::from(args.history_months.max(1)));
    write_history_since(&pool, device_events, args.seed, Some(since)).await?;
    let written = LogReader::new(pool.clone()).head().await?.position;
    let wanted = i64::try_from(args.history_events).unwrap_or(i64::MAX);
    register_owners(&pool, &args.master_keys, (wanted - written).max(2)).await?;
    let seconds = started.elapsed().as_secs_f64();
    read_models::migrate(&pool).await.context("read model migrations")?;
    settle_database(&pool).await?;
    Ok((pool, url.to_string(), seconds))
}

async fn describe(pool: &PgPool, write_seconds: f64, catch_up_seconds: f64) -> anyhow::Result<World> {
    let events = LogReader::new(pool.clone()).head().await?.position;
    let months: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT date_trunc('month', recorded_at)) FROM user_events_all")
            .fetch_one(pool)
            .await?;
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM user_events_all WHERE event_type = 'UserRegistered'")
        .fetch_one(pool)
        .await?;
    let devices: i64 = sqlx::query_scalar("SELECT count(*) FROM devices")
        .fetch_one(pool)
        .await?;
    Ok(World {
        events,
        months,
        users,
        devices,
        write_seconds,
        catch_up_seconds,
    })
}

/// Waits until every projection has applied `head`, with a progress bar.
async fn reach(pool: &PgPool, head: i64, label: &'static str) -> anyhow::Result<()> {
    let deadline = Instant::now() + CATCH_UP_LIMIT;
    let mut progress = Progress::new(label, u64::try_from(head).unwrap_or(0));
    loop {
        let applied = applied(pool).await?;
        progress.set(u64::try_from(applied.min(head)).unwrap_or(0));
        if applied >= head {
            progress.finish();
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{label}: the projections applied {applied} of {head} events in {CATCH_UP_LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A user the portals and dashboards act for.
struct PortalUser {
    id: Uuid,
    token: String,
    /// What the portal knows of the user's fleet; one command at a time per user, as one
    /// person at a portal.
    fleet: Mutex<Vec<Device>>,
    /// A device of theirs the device dashboard shows.
    watched_device: Uuid,
    /// The position of their last acknowledged command, and of the last one a dashboard
    /// read asked for: a read after a write asks for the write's position.
    last_write: AtomicI64,
    last_read: AtomicI64,
}

/// `--users` owners of the world with devices, their quotas raised by an admin through the
/// command API, and their fleets as the read models show them.
async fn portal_users(
    pool: &PgPool,
    client: &reqwest::Client,
    command_base: &str,
    args: &LoadPlatformArgs,
) -> anyhow::Result<Vec<PortalUser>> {
    let owners: Vec<Uuid> = sqlx::query_scalar(
        "SELECT owner_id FROM devices WHERE status <> 'deleted' GROUP BY owner_id \
         ORDER BY md5(owner_id::text || $1) LIMIT $2",
    )
    .bind(args.seed.to_string())
    .bind(i64::try_from(args.users).unwrap_or(i64::MAX))
    .fetch_all(pool)
    .await
    .context("the world's owners")?;
    if owners.is_empty() {
        bail!("the world has no owner with a device: raise --history-events");
    }
    let admin = load_token(&Uuid::now_v7().to_string(), Role::Admin)?;
    let mut users = Vec::with_capacity(owners.len());
    for owner in owners {
        let raised = client
            .put(format!("{command_base}/v1/users/{owner}/quota"))
            .bearer_auth(&admin)
            .json(&json!({"max_devices": 10000, "max_cpu_cores": 160000, "max_memory_mb": 400000000u64}))
            .send()
            .await?;
        if !raised.status().is_success() {
            bail!(
                "raising {owner}'s quota: {} {}",
                raised.status(),
                raised.text().await.unwrap_or_default()
            );
        }
        let position = raised.json::<Value>().await?["position"].as_i64().unwrap_or(0);
        let fleet: Vec<(Uuid, String)> =
            sqlx::query_as("SELECT device_id, status FROM devices WHERE owner_id = $1 AND status <> 'deleted'")
                .bind(owner)
                .fetch_all(pool)
                .await?;
        let watched_device = fleet.first().map(|(id, _)| *id).unwrap_or(owner);
        users.push(PortalUser {
            id: owner,
            token: load_token(&owner.to_string(), Role::User)?,
            fleet: Mutex::new(
                fleet
                    .into_iter()
                    .map(|(id, status)| Device {
                        id,
                        running: status == "running",
                    })
                    .collect(),
            ),
            watched_device,
            last_write: AtomicI64::new(position),
            last_read: AtomicI64::new(0),
        });
    }
    Ok(users)
}

fn micros_since(scheduled: Instant) -> u64 {
    u64::try_from(scheduled.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// What an answer that is not a success is counted as, and whether the platform broke a
/// promise with it.
fn failure(status: reqwest::StatusCode, body: &Value) -> (String, bool) {
    let code = body["code"].as_str().unwrap_or("-");
    (
        format!("{} {code}", status.as_u16()),
        status.is_server_error() && status != 503,
    )
}

fn transport(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        "timeout".into()
    } else {
        "transport".into()
    }
}

/// One portal command for a user not busy with another: about 15 % creates, 35 % starts,
/// 35 % stops, 8 % resizes, 7 % deletes, as `load commands` drives them.
async fn portal_command(
    client: &reqwest::Client,
    base: &str,
    users: &[PortalUser],
    seed: u64,
    scheduled: Instant,
) -> Option<Outcome> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (user, mut fleet) = (0..8).find_map(|_| {
        let user = &users[rng.random_range(0..users.len())];
        user.fleet.try_lock().ok().map(|fleet| (user, fleet))
    })?;
    let (command, request) = PortalCommand::choose(&mut rng, client, base, &fleet);
    let answer = request
        .bearer_auth(&user.token)
        .header("idempotency-key", Uuid::now_v7().to_string())
        .send()
        .await;
    let (error, fatal) = match answer {
        Ok(answer) => {
            let status = answer.status();
            let body: Value = answer.json().await.unwrap_or_default();
            if status.is_success() {
                if let Some(position) = body["position"].as_i64() {
                    user.last_write.fetch_max(position, Ordering::Relaxed);
                }
                command.succeeded(&mut fleet, &body);
                (None, false)
            } else {
                let (kind, fatal) = failure(status, &body);
                (Some(kind), fatal)
            }
        }
        Err(error) => (Some(transport(&error)), true),
    };
    Some(Outcome {
        op: command.operation.into(),
        micros: micros_since(scheduled),
        error,
        fatal,
    })
}

/// One dashboard query of a user's; with their position when they have written since their
/// last read.
async fn dashboard_query(
    client: &reqwest::Client,
    base: &str,
    users: &[PortalUser],
    seed: u64,
    scheduled: Instant,
) -> Option<Outcome> {
    let mut rng = StdRng::seed_from_u64(seed);
    let user = &users[rng.random_range(0..users.len())];
    let kind = Kind::pick(rng.random_range(0..100));
    let today = Utc::now().date_naive();
    let from = today - chrono::Duration::days(30);
    let dashboard = Dashboard {
        user: user.id,
        device: user.watched_device,
        from,
        to: today,
    };
    let variables = dashboard.variables(kind);
    let mut request = client
        .post(format!("{base}/graphql"))
        .bearer_auth(&user.token)
        .json(&json!({"query": kind.ours(), "variables": variables}));
    let written = user.last_write.load(Ordering::Relaxed);
    let op = if user.last_read.fetch_max(written, Ordering::Relaxed) < written {
        request = request.header("x-min-position", written.to_string());
        Op::DashboardAfterWrite
    } else {
        Op::Dashboard
    };
    let (error, fatal) = match request.send().await {
        Ok(answer) => {
            let status = answer.status();
            let body: Value = answer.json().await.unwrap_or_default();
            if !status.is_success() {
                let (kind, fatal) = failure(status, &body);
                (Some(kind), fatal)
            } else if let Some(errors) = body["errors"].as_array().filter(|e| !e.is_empty()) {
                let code = errors[0]["extensions"]["code"].as_str().unwrap_or("-");
                (Some(format!("graphql {code}")), code == "INTERNAL")
            } else {
                (None, false)
            }
        }
        Err(error) => (Some(transport(&error)), true),
    };
    Some(Outcome {
        op,
        micros: micros_since(scheduled),
        error,
        fatal,
    })
}

/// An auditor's export of one user's whole history every `every`, downloaded to the end and
/// checked for its trailer.
async fn export_loop(
    client: reqwest::Client,
    base: String,
    users: Arc<Vec<PortalUser>>,
    seed: u64,
    every: Duration,
    sender: mpsc::UnboundedSender<Outcome>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x0e7b_0e7b);
    let Ok(token) = load_token("load-auditor", Role::Auditor) else {
        return;
    };
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let scheduled = Instant::now();
        let user = users[rng.random_range(0..users.len())].id;
        let answer = client
            .get(format!("{base}/v1/audit/events?userId={user}"))
            .bearer_auth(&token)
            .send()
            .await;
        let (error, fatal) = match answer {
            Ok(answer) if answer.status().is_success() => match answer.text().await {
                Ok(file) if file.lines().last().is_some_and(|l| l.starts_with("{\"trailer\"")) => (None, false),
                Ok(_) => (Some("truncated (no trailer)".to_owned()), true),
                Err(error) => (Some(transport(&error)), true),
            },
            Ok(answer) => {
                let status = answer.status();
                let body: Value = answer.json().await.unwrap_or_default();
                let (kind, fatal) = failure(status, &body);
                (Some(kind), fatal)
            }
            Err(error) => (Some(transport(&error)), true),
        };
        let _ = sender.send(Outcome {
            op: Op::Export,
            micros: micros_since(scheduled),
            error,
            fatal,
        });
    }
}

/// `cloudphone replay daily-usage` as an operator runs it, beside the live projector.
async fn replay_daily_usage(url: &str, logs: &Path) -> ReplayReport {
    let started = Instant::now();
    let log = logs.join("replay.log");
    let child = match (std::env::current_exe(), std::fs::File::create(&log)) {
        (Ok(exe), Ok(file)) => tokio::process::Command::new(exe)
            .args(["replay", "daily-usage"])
            .env("CLOUDPHONE_DATABASE_URL", url)
            .env("CLOUDPHONE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .ok(),
        _ => None,
    };
    let (mut succeeded, mut cpu_seconds_read) = (false, 0.0);
    if let Some(mut child) = child {
        // Its CPU is read while it runs: once reaped, /proc no longer has it.
        let pid = child.id();
        loop {
            tokio::select! {
                status = child.wait() => {
                    succeeded = status.is_ok_and(|status| status.success());
                    break;
                }
                () = tokio::time::sleep(Duration::from_millis(100)) => {
                    if let Some(seconds) = pid.and_then(cpu_seconds) {
                        cpu_seconds_read = seconds;
                    }
                }
            }
        }
    }
    ReplayReport {
        seconds: started.elapsed().as_secs_f64(),
        succeeded,
        cpu_seconds: cpu_seconds_read,
    }
}

struct LagSamples {
    /// Events between the head and the slowest projection, plus one (a histogram's floor).
    events: Histogram<u64>,
    /// Age of the oldest event not yet applied, in ms, plus one.
    millis: Histogram<u64>,
}

/// Every 250 ms until `stop`: how far the slowest projection is behind the head.
async fn sample_lag(pool: PgPool, stop: tokio_util::sync::CancellationToken) -> LagSamples {
    let mut samples = LagSamples {
        events: histogram(),
        millis: histogram(),
    };
    let reader = LogReader::new(pool.clone());
    while !stop.is_cancelled() {
        if let (Ok(head), Ok(applied)) = (reader.head().await, applied(&pool).await) {
            let behind = (head.position - applied).max(0);
            samples.events.record(u64::try_from(behind).unwrap_or(0) + 1).ok();
            let age_ms = if behind > 0 {
                let oldest: Option<chrono::DateTime<Utc>> =
                    sqlx::query_scalar("SELECT recorded_at FROM user_events WHERE position = $1")
                        .bind(applied + 1)
                        .fetch_optional(&pool)
                        .await
                        .ok()
                        .flatten();
                oldest.map_or(0, |at| (Utc::now() - at).num_milliseconds().max(0))
            } else {
                0
            };
            samples.millis.record(u64::try_from(age_ms).unwrap_or(0) + 1).ok();
        }
        tokio::select! {
            () = stop.cancelled() => {}
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
    samples
}

fn print(report: &Report) {
    println!(
        "\n  {:.0} operations/s completed over {:.1} s (scheduled {}/s; {} shed)",
        report.operations_per_second, report.duration_seconds, report.rate, report.shed
    );
    println!(
        "  {:<24} {:>8} {:>9} {:>9} {:>9} {:>9}  errors",
        "operation", "count", "per s", "p50 ms", "p99 ms", "p999 ms"
    );
    for (op, figures) in &report.operations {
        println!(
            "  {:<24} {:>8} {:>9.1} {:>9.2} {:>9.2} {:>9.2}  {:?}",
            serde_json::to_value(op)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            figures.latency.count,
            figures.per_second,
            figures.latency.p50_ms,
            figures.latency.p99_ms,
            figures.latency.p999_ms,
            figures.errors
        );
    }
    let lag = &report.projection_lag;
    println!(
        "  projection lag: p50 {} events, p99 {} events, max {} events; oldest unapplied p99 {:.3} s, max {:.3} s; drained in {:.2} s",
        lag.events_p50, lag.events_p99, lag.events_max, lag.seconds_p99, lag.seconds_max, lag.drain_seconds
    );
    println!(
        "  query cache: {:.0} hits, {:.0} misses, hit ratio {:.1} %",
        report.query_cache.hits,
        report.query_cache.misses,
        100.0 * report.query_cache.hit_ratio
    );
    for (role, figures) in &report.roles {
        let memory = match (figures.rss_mib, figures.peak_rss_mib) {
            (Some(rss), Some(peak)) => format!("   RSS {rss:>7.1} MiB (peak {peak:>7.1} MiB)"),
            _ => String::new(),
        };
        println!(
            "  {:<16} CPU {:>7.1} s ({:>5.1} % of a core, {:.3} ms per operation){memory}",
            role, figures.cpu_seconds, figures.cpu_percent, figures.cpu_ms_per_operation
        );
    }
    if let Some(replay) = &report.replay {
        println!(
            "  replay of daily_usage beside the load: {} in {:.1} s, its process's CPU {:.1} s",
            if replay.succeeded { "swapped" } else { "FAILED" },
            replay.seconds,
            replay.cpu_seconds
        );
    }
    println!(
        "  fatal errors (5xx, transport, truncated export): {}",
        report.fatal_errors
    );
}
