//! `cloudphone load queries`: dashboards polling the query API over HTTP, uncached and with
//! its cache, against PostGraphile v4 serving the same read-model tables — the generic
//! GraphQL-over-PostgreSQL baseline — in the same run, on the same data and machine.
//!
//! In one fresh database `cloudphone_load_queries`:
//! 1. provisioning: the read-model tables (`devices`, `device_stats`, `daily_usage`) and the
//!    projections' checkpoints are filled with set-based SQL (no events: this measures
//!    reads), then vacuumed and analyzed;
//! 2. `--hot-users` dashboards are picked (seeded), each with one of its user's devices and
//!    a 30-day range that holds usage; each polls the same five queries, as dashboards do:
//!    device statistics 25 %, daily usage 25 %, the first page of devices 25 %, one device
//!    15 %, a user overview (devices and usage nested under the user) 10 %;
//! 3. every query kind of every dashboard is asked of every server and the answers are
//!    compared (counts, sums, device ids): a server that errs, answers nothing or answers
//!    differently stops the run before anything is timed;
//! 4. phases, each `--duration` seconds of `--clients` closed-loop HTTP clients after one
//!    unmeasured pass over every (dashboard, kind): the query API with its cache off
//!    (every answer from PostgreSQL), the query API with its cache (hit ratio from the
//!    `x-cache` headers), and PostGraphile v4 and v5 (`ops/bench/postgraphile*/run.sh`,
//!    child processes) with the queries of their `queries.json`. With `--advance-checkpoints-ms`, one more
//!    phase measures the cached API while the projections' checkpoints move (every move is a
//!    new cache key for every answer, as when projectors apply a stream of events).
//!
//! The query API runs in this process; the load generator shares the machine's cores with
//! it, with the PostGraphiles and with PostgreSQL.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use http_edge::auth::KeySource;
use operator_console::Progress;
use query_api::{QueryApi, QueryApiConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, PgPool};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::cli::LoadQueriesArgs;
use crate::harness::databases::{database_url_of, recreate_database, wait_for_replicas};
use crate::harness::postgraphile::{PostGraphile, postgraphile_dirs, postgraphile_label};
use crate::harness::report::{Latency, histogram, write_json};
use crate::harness::tokens::SECRET;
use crate::workloads::answers::{check_answers, compare, pass};
use crate::workloads::dashboards::{
    Dashboard, Flavor, Kind, Target, ours_target, pick_dashboards, postgraphile_target, send,
};
use crate::world::read_models::write_read_models;

const LOAD_DATABASE: &str = "cloudphone_load_queries";

#[derive(Debug, Default, Serialize)]
struct CacheCounts {
    hit: u64,
    miss: u64,
    bypass: u64,
}

#[derive(Debug, Serialize)]
struct PhaseReport {
    phase: &'static str,
    seconds: f64,
    /// Answered without errors.
    queries: u64,
    queries_per_second: f64,
    latency: Latency,
    by_kind: BTreeMap<Kind, Latency>,
    /// Requests that failed (non-200, `errors` in the body, transport), by kind and reason.
    errors: BTreeMap<String, u64>,
    /// `x-cache` headers seen (the query API only).
    cache: Option<CacheCounts>,
    /// hits / (hits + misses), when the cache was on.
    hit_ratio: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Targets {
    /// ≥ 3x PostGraphile's queries/s (warm; issue #6).
    throughput_3x: Option<bool>,
    /// ≥ 3x PostGraphile's queries/s with the cache off (issue #24).
    uncached_3x: Option<bool>,
    /// p99 < 5 ms with the cache warm.
    warm_p99_under_5ms: Option<bool>,
    /// Cache hit ratio > 95 % on the mix.
    hit_ratio_over_95: Option<bool>,
}

#[derive(Debug, Serialize)]
struct Report {
    devices: u64,
    usage_rows: u64,
    users: u64,
    users_with_devices: i64,
    hot_users: usize,
    clients: usize,
    pool_size: u32,
    seconds_per_phase: u64,
    seed: u64,
    cores: usize,
    provisioning_seconds: f64,
    mix_percent: BTreeMap<Kind, u32>,
    tokens: &'static str,
    postgraphile_workers: Option<u32>,
    advance_checkpoints_ms: Option<u64>,
    phases: Vec<PhaseReport>,
    /// Query API with its cache over the fastest PostGraphile, queries/s.
    warm_over_postgraphile: Option<f64>,
    /// Query API without its cache over the fastest PostGraphile, queries/s.
    uncached_over_postgraphile: Option<f64>,
    /// Each PostGraphile's queries/s, and the query API's (cached and not) over it.
    over_each_postgraphile: Vec<OverBaseline>,
    targets: Targets,
}

#[derive(Debug, Serialize)]
struct OverBaseline {
    baseline: &'static str,
    queries_per_second: f64,
    uncached_over: Option<f64>,
    warm_over: Option<f64>,
}

pub async fn run(args: &LoadQueriesArgs) -> anyhow::Result<()> {
    if args.clients == 0 || args.hot_users == 0 || args.devices == 0 || args.users == 0 || args.duration == 0 {
        bail!("--clients, --hot-users, --devices, --users and --duration must be positive");
    }
    if args.usage_rows < args.devices {
        bail!("--usage-rows must be at least --devices (every device has usage)");
    }
    let postgraphile_dirs = if args.no_postgraphile {
        Vec::new()
    } else {
        postgraphile_dirs(&args.postgraphile_dir)?
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "load queries: {} devices, {} usage rows, {} users ({} watched), {} clients, {} s per phase, pool {}, seed {}",
        args.devices,
        args.usage_rows,
        args.users,
        args.hot_users,
        args.clients,
        args.duration,
        args.pool_size,
        args.seed
    );
    println!(
        "  {cores} cores shared by the load generator, the query API (in this process), PostGraphile and PostgreSQL"
    );

    recreate_database(&args.database.database_url, LOAD_DATABASE, 4)
        .await?
        .close()
        .await;
    // Provisioning statements take seconds by design: not worth a slow-statement warning.
    let options = PgConnectOptions::from_str(&args.database.database_url)
        .context("--database-url")?
        .database(LOAD_DATABASE)
        .disable_statement_logging();
    let pool = event_log::pool_options(2).connect_with(options).await?;
    read_models::migrate(&pool).await?;
    let started = Instant::now();
    let users_with_devices = write_read_models(&pool, args).await?;
    let provisioning_seconds = started.elapsed().as_secs_f64();
    println!(
        "  provisioning: {} devices of {users_with_devices} users, {} usage rows, device_stats; {provisioning_seconds:.1} s",
        args.devices, args.usage_rows
    );
    let dashboards = pick_dashboards(&pool, args).await?;
    wait_for_replicas(&pool).await;
    pool.close().await;

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.clients)
        .timeout(Duration::from_secs(30))
        .no_proxy()
        .build()?;

    // The baselines first, so every server is checked before anything is timed; they idle
    // while the query API is measured.
    let mut baselines = Vec::with_capacity(postgraphile_dirs.len());
    for dir in &postgraphile_dirs {
        match Baseline::start(dir, args, &dashboards, &client).await {
            Ok(baseline) => baselines.push(baseline),
            Err(error) => {
                for baseline in baselines {
                    baseline.stop().await;
                }
                return Err(error);
            }
        }
    }
    let result = phases(args, &dashboards, &client, &baselines).await;
    let labels: Vec<&'static str> = baselines.iter().map(|b| b.target.label).collect();
    for baseline in baselines {
        baseline.stop().await;
    }
    let phases = result?;

    let qps = |name: &str| phases.iter().find(|p| p.phase == name).map(|p| p.queries_per_second);
    let (warm, uncached) = (qps(PHASE_WARM), qps(PHASE_UNCACHED));
    let over = |ours: Option<f64>, baseline: f64| ours.map(|q| q / baseline.max(1e-9));
    let over_each_postgraphile: Vec<OverBaseline> = labels
        .iter()
        .filter_map(|label| {
            qps(label).map(|baseline| OverBaseline {
                baseline: label,
                queries_per_second: baseline,
                uncached_over: over(uncached, baseline),
                warm_over: over(warm, baseline),
            })
        })
        .collect();
    // The targets hold against every baseline: the ratio over the one that did best.
    let fastest = over_each_postgraphile
        .iter()
        .map(|b| b.queries_per_second)
        .fold(None, |best: Option<f64>, q| Some(best.map_or(q, |b| b.max(q))));
    let warm_over_postgraphile = fastest.and_then(|b| over(warm, b));
    let uncached_over_postgraphile = fastest.and_then(|b| over(uncached, b));
    let warm = phases.iter().find(|p| p.phase == PHASE_WARM);
    let targets = Targets {
        throughput_3x: warm_over_postgraphile.map(|r| r >= 3.0),
        uncached_3x: uncached_over_postgraphile.map(|r| r >= 3.0),
        warm_p99_under_5ms: warm.map(|p| p.latency.p99_ms < 5.0),
        hit_ratio_over_95: warm.and_then(|p| p.hit_ratio).map(|r| r > 0.95),
    };
    for baseline in &over_each_postgraphile {
        let ratio = |r: Option<f64>| r.map_or("-".to_owned(), |r| format!("{r:.2}x"));
        println!(
            "  query API over {}: uncached {}, cached {} queries/s",
            baseline.baseline,
            ratio(baseline.uncached_over),
            ratio(baseline.warm_over)
        );
    }
    let verdict = |met: Option<bool>| match met {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "not measured",
    };
    println!(
        "  targets: >= 3x the faster PostGraphile's throughput cached: {} ({}), uncached: {} ({}); p99 < 5 ms warm: {} ({:.2} ms); hit ratio > 95 %: {} ({})",
        verdict(targets.throughput_3x),
        warm_over_postgraphile.map_or("-".to_owned(), |r| format!("{r:.2}x")),
        verdict(targets.uncached_3x),
        uncached_over_postgraphile.map_or("-".to_owned(), |r| format!("{r:.2}x")),
        verdict(targets.warm_p99_under_5ms),
        warm.map_or(f64::NAN, |p| p.latency.p99_ms),
        verdict(targets.hit_ratio_over_95),
        warm.and_then(|p| p.hit_ratio)
            .map_or("-".to_owned(), |r| format!("{:.2} %", r * 100.0)),
    );

    let report = Report {
        devices: args.devices,
        usage_rows: args.usage_rows,
        users: args.users,
        users_with_devices,
        hot_users: dashboards.len(),
        clients: args.clients,
        pool_size: args.pool_size,
        seconds_per_phase: args.duration,
        seed: args.seed,
        cores,
        provisioning_seconds,
        mix_percent: Kind::ALL.iter().map(|k| (*k, k.weight())).collect(),
        tokens: "query API: one Role::User token per watched user (answers scoped and cached per user); \
                 PostGraphile: a Role::Admin token (it has no auth and ignores it)",
        postgraphile_workers: args.postgraphile_workers,
        advance_checkpoints_ms: args.advance_checkpoints_ms,
        phases,
        warm_over_postgraphile,
        uncached_over_postgraphile,
        over_each_postgraphile,
        targets,
    };
    if let Some(path) = &args.json {
        write_json(path, &report)?;
        println!("  report written to {}", path.display());
    }
    Ok(())
}

const PHASE_UNCACHED: &str = "query API, cache off";
const PHASE_WARM: &str = "query API, cache warm";
const PHASE_MOVING: &str = "query API, cache, moving checkpoints";

/// Moves both projections' checkpoints one position on every `every`, until stopped; returns
/// how many times.
async fn advance_checkpoints(pool: PgPool, every: Duration, stop: CancellationToken) -> anyhow::Result<u64> {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut advances = 0;
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(advances),
            _ = ticker.tick() => {
                sqlx::query(
                    "UPDATE projection_checkpoints SET position = position + 1, last_recorded_at = now(), updated_at = now()",
                )
                .execute(&pool)
                .await?;
                advances += 1;
            }
        }
    }
}

async fn phases(
    args: &LoadQueriesArgs,
    dashboards: &[Dashboard],
    client: &reqwest::Client,
    baselines: &[Baseline],
) -> anyhow::Result<Vec<PhaseReport>> {
    // Each server gets a pool of its own: connections opened on a query API's executor
    // threads belong to that runtime and die with it, so a pool must not outlive its API.
    let pool = api_pool(args).await?;
    let ours = |label: &'static str, url: String| -> anyhow::Result<Arc<Target>> {
        Ok(Arc::new(ours_target(label, url, dashboards)?))
    };
    let mut reports = Vec::new();

    // The query API without its cache: its answers are the reference both other phases must
    // give, and its first pass also checks them.
    let server = OurServer::start(&pool, 0, Duration::ZERO).await?;
    let target = ours(PHASE_UNCACHED, server.url.clone())?;
    let reference = pass(client, &target, args.clients).await?;
    check_answers(&reference, dashboards)?;
    for baseline in baselines {
        let answers = pass(client, &baseline.target, args.clients).await?;
        compare(&reference, &answers, baseline.target.label)?;
    }
    if !baselines.is_empty() {
        println!(
            "  checked: all 5 query kinds of {} dashboards answer without errors, with data, the same on every server",
            dashboards.len()
        );
    } else {
        println!(
            "  checked: all 5 query kinds of {} dashboards answer without errors and with data",
            dashboards.len()
        );
    }
    let report = measure(client, &target, args).await?;
    report.print();
    reports.push(report);
    server.stop().await?;
    pool.close().await;

    let pool = api_pool(args).await?;
    let server = OurServer::start(
        &pool,
        QueryApiConfig::default().cache_max_bytes,
        Duration::from_millis(args.cache_staleness_ms),
    )
    .await?;
    let target = ours(PHASE_WARM, server.url.clone())?;
    // The warm-up: every (dashboard, kind) once, which fills the cache.
    let answers = pass(client, &target, args.clients).await?;
    compare(&reference, &answers, target.label)?;
    let report = measure(client, &target, args).await?;
    report.print();
    reports.push(report);
    if let Some(every) = args.advance_checkpoints_ms {
        let target = ours(PHASE_MOVING, server.url.clone())?;
        let stop = CancellationToken::new();
        let mover = tokio::spawn(advance_checkpoints(
            pool.clone(),
            Duration::from_millis(every.max(1)),
            stop.clone(),
        ));
        let report = measure(client, &target, args).await;
        stop.cancel();
        let advances = mover.await.context("checkpoint task")??;
        let report = report?;
        report.print();
        println!(
            "      (checkpoints advanced {advances} times, every {every} ms; the API reads them every {:?} and keys answers by an epoch that moves at most every {} ms)",
            QueryApiConfig::default().watermark_interval,
            args.cache_staleness_ms
        );
        reports.push(report);
    }
    server.stop().await?;
    pool.close().await;

    for baseline in baselines {
        pass(client, &baseline.target, args.clients).await?;
        let report = measure(client, &baseline.target, args).await?;
        report.print();
        reports.push(report);
    }
    Ok(reports)
}

/// The query API's pool on the load database, with the statement timeout `serve` sets.
async fn api_pool(args: &LoadQueriesArgs) -> anyhow::Result<PgPool> {
    let timeout = QueryApiConfig::default().query_timeout + Duration::from_millis(500);
    let options = PgConnectOptions::from_str(&args.database.database_url)
        .context("--database-url")?
        .database(LOAD_DATABASE)
        .options([("statement_timeout", timeout.as_millis().to_string())]);
    Ok(event_log::pool_options(args.pool_size).connect_with(options).await?)
}

/// The query API in this process on a free port.
struct OurServer {
    url: String,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl OurServer {
    async fn start(pool: &PgPool, cache_max_bytes: u64, cache_staleness: Duration) -> anyhow::Result<Self> {
        let config = QueryApiConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            keys: KeySource::Secret(SECRET.into()),
            cache_max_bytes,
            cache_staleness,
            // A capacity benchmark: the per-client limit (checked on every request) never bites.
            rate_per_second: 10_000_000,
            rate_burst: 10_000_000,
            ..QueryApiConfig::default()
        };
        let api = QueryApi::build(config, pool.clone(), http_edge::telemetry::prometheus())
            .await
            .context("cannot start the query API")?;
        let url = format!("http://{}/graphql", api.local_addr());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(api.run_until_stopped(async move {
            let _ = stopped.await;
        }));
        Ok(OurServer { url, stop, task })
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.task.await.context("query API task")?.context("query API")?;
        Ok(())
    }
}

/// PostGraphile, and the requests it is sent (killed when dropped).
struct Baseline {
    server: PostGraphile,
    target: Arc<Target>,
}

impl Baseline {
    /// Starts PostGraphile over the load database and waits until it answers with data.
    async fn start(
        dir: &Path,
        args: &LoadQueriesArgs,
        dashboards: &[Dashboard],
        client: &reqwest::Client,
    ) -> anyhow::Result<Self> {
        let queries = PostGraphile::prepare(dir).await?;
        let label = postgraphile_label(dir)?;
        let url = database_url_of(&args.database.database_url, LOAD_DATABASE)?;
        let mut server = PostGraphile::spawn(dir, &url, args.pool_size, args.postgraphile_workers)?;
        let target = Arc::new(postgraphile_target(label, server.url.clone(), &queries, dashboards)?);
        let probe = target.bodies[0][Kind::DeviceStats.index()].clone();
        server.wait_ready(client, probe).await?;
        println!(
            "  {label} answering on 127.0.0.1:{} (pool {})",
            server.port, args.pool_size
        );
        Ok(Baseline { server, target })
    }

    async fn stop(self) {
        self.server.stop().await;
    }
}

struct ClientOutcome {
    by_kind: BTreeMap<Kind, Histogram<u64>>,
    errors: BTreeMap<String, u64>,
    cache: CacheCounts,
}

/// `--clients` closed loops for `--duration` seconds over the mix.
async fn measure(
    client: &reqwest::Client,
    target: &Arc<Target>,
    args: &LoadQueriesArgs,
) -> anyhow::Result<PhaseReport> {
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let mut tasks = Vec::with_capacity(args.clients);
    for c in 0..args.clients {
        let (client, target) = (client.clone(), Arc::clone(target));
        // The same sequence of (dashboard, kind) per client in every phase.
        let seed = args.seed.wrapping_mul(31).wrapping_add(c as u64);
        tasks.push(tokio::spawn(async move { drive(client, target, seed, deadline).await }));
    }
    let mut progress = Progress::new(target.label, args.duration);
    let started = Instant::now();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        progress.set(started.elapsed().as_secs());
    }
    let mut by_kind: BTreeMap<Kind, Histogram<u64>> = BTreeMap::new();
    let mut errors = BTreeMap::new();
    let mut cache = CacheCounts::default();
    for task in tasks {
        let outcome = task.await.context("load client panicked")?;
        for (kind, h) in outcome.by_kind {
            by_kind.entry(kind).or_insert_with(histogram).add(&h).ok();
        }
        for (error, count) in outcome.errors {
            *errors.entry(error).or_insert(0) += count;
        }
        cache.hit += outcome.cache.hit;
        cache.miss += outcome.cache.miss;
        cache.bypass += outcome.cache.bypass;
    }
    let seconds = started.elapsed().as_secs_f64();
    progress.finish();
    let mut total = histogram();
    for h in by_kind.values() {
        total.add(h).ok();
    }
    let ours = target.flavor == Flavor::Ours;
    let looked_up = cache.hit + cache.miss;
    Ok(PhaseReport {
        phase: target.label,
        seconds,
        queries: total.len(),
        queries_per_second: total.len() as f64 / seconds,
        latency: Latency::of(&total),
        by_kind: by_kind.iter().map(|(k, h)| (*k, Latency::of(h))).collect(),
        errors,
        hit_ratio: (ours && looked_up > 0).then(|| cache.hit as f64 / looked_up as f64),
        cache: ours.then_some(cache),
    })
}

async fn drive(client: reqwest::Client, target: Arc<Target>, seed: u64, deadline: Instant) -> ClientOutcome {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut by_kind: BTreeMap<Kind, Histogram<u64>> = BTreeMap::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut cache = CacheCounts::default();
    let dashboards = target.bodies.len();
    while Instant::now() < deadline {
        let dashboard = rng.random_range(0..dashboards);
        let kind = Kind::pick(rng.random_range(0..100));
        let sent = send(&client, &target, dashboard, kind).await;
        match sent.cache {
            Some("hit") => cache.hit += 1,
            Some("miss") => cache.miss += 1,
            Some(_) => cache.bypass += 1,
            None => {}
        }
        match sent.outcome {
            Ok(_) => {
                let micros = u64::try_from(sent.elapsed.as_micros()).unwrap_or(u64::MAX).max(1);
                by_kind.entry(kind).or_insert_with(histogram).record(micros).ok();
            }
            Err(reason) => *errors.entry(format!("{} {reason}", kind.name())).or_insert(0) += 1,
        }
    }
    ClientOutcome { by_kind, errors, cache }
}

impl PhaseReport {
    fn print(&self) {
        let hit_ratio = self
            .hit_ratio
            .map_or(String::new(), |r| format!("   hit ratio {:.2} %", r * 100.0));
        println!(
            "  {:<24} {:>8.0} queries/s   p50 {:>6.2} ms   p99 {:>6.2} ms   p999 {:>7.2} ms   errors {}{hit_ratio}",
            self.phase,
            self.queries_per_second,
            self.latency.p50_ms,
            self.latency.p99_ms,
            self.latency.p999_ms,
            self.errors.values().sum::<u64>(),
        );
        for (kind, latency) in &self.by_kind {
            println!(
                "      {:<14} {:>8} queries   p50 {:>6.2} ms   p99 {:>6.2} ms",
                kind.name(),
                latency.count,
                latency.p50_ms,
                latency.p99_ms
            );
        }
        for (error, count) in &self.errors {
            println!("      error: {count} x {error}");
        }
    }
}
