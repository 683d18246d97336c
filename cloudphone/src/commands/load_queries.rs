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
//! 3. every query kind of every dashboard is asked of both servers and the answers are
//!    compared (counts, sums, device ids): a server that errs, answers nothing or answers
//!    differently stops the run before anything is timed;
//! 4. phases, each `--duration` seconds of `--clients` closed-loop HTTP clients after one
//!    unmeasured pass over every (dashboard, kind): the query API with its cache off
//!    (every answer from PostgreSQL), the query API with its cache (hit ratio from the
//!    `x-cache` headers), and PostGraphile (`ops/bench/postgraphile/run.sh`, a child
//!    process) with the queries of `queries.json`. With `--advance-checkpoints-ms`, one more
//!    phase measures the cached API while the projections' checkpoints move (every move is a
//!    new cache key for every answer, as when projectors apply a stream of events).
//!
//! The query API runs in this process; the load generator shares the machine's cores with
//! it, with PostGraphile and with PostgreSQL.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{NaiveDate, Utc};
use command_api::auth::{KeySource, Role};
use futures::StreamExt;
use hdrhistogram::Histogram;
use query_api::{QueryApi, QueryApiConfig};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::postgres::PgConnectOptions;
use sqlx::{AssertSqlSafe, ConnectOptions, PgPool};
use tokio::io::AsyncReadExt;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::load::{Latency, SECRET, histogram, load_token, recreate_database};
use crate::cli::LoadQueriesArgs;
use crate::progress::Progress;

const LOAD_DATABASE: &str = "cloudphone_load_queries";
/// Days of history the generated devices and usage cover.
const HISTORY_DAYS: i64 = 180;
/// Days of the range a dashboard shows.
const RANGE_DAYS: i64 = 30;
/// Longest PostGraphile may take to answer its first query (it may run `npm ci` first).
const POSTGRAPHILE_START: Duration = Duration::from_secs(180);

/// What a dashboard asks, with the weight of each in the mix (percent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Kind {
    DeviceStats,
    DailyUsage,
    DevicesPage,
    Device,
    UserOverview,
}

impl Kind {
    pub(crate) const ALL: [Kind; 5] = [
        Kind::DeviceStats,
        Kind::DailyUsage,
        Kind::DevicesPage,
        Kind::Device,
        Kind::UserOverview,
    ];

    /// Its key in `queries.json`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::DeviceStats => "device_stats",
            Kind::DailyUsage => "daily_usage",
            Kind::DevicesPage => "devices_page",
            Kind::Device => "device",
            Kind::UserOverview => "user_overview",
        }
    }

    fn weight(self) -> u32 {
        match self {
            Kind::DeviceStats | Kind::DailyUsage | Kind::DevicesPage => 25,
            Kind::Device => 15,
            Kind::UserOverview => 10,
        }
    }

    /// The kind a roll in 0..100 lands on.
    pub(crate) fn pick(roll: u32) -> Kind {
        let mut below = 0;
        for kind in Kind::ALL {
            below += kind.weight();
            if roll < below {
                return kind;
            }
        }
        Kind::UserOverview
    }

    fn index(self) -> usize {
        self as usize
    }

    /// The query API's equivalent of the `queries.json` query.
    pub(crate) fn ours(self) -> &'static str {
        match self {
            Kind::DeviceStats => {
                "query DeviceStats($userId: UUID!) {
  deviceStats(filter: { userId: $userId }) {
    rows { status provider deviceCount cpuCores memoryMb }
    totals { deviceCount cpuCores memoryMb }
  }
}"
            }
            Kind::DailyUsage => {
                "query DailyUsage($userId: UUID!, $from: NaiveDate!, $to: NaiveDate!) {
  dailyUsage(filter: { userId: $userId, from: $from, to: $to }) {
    rows { period minutes cost { amountMinor currency } }
    totals { minutes costs { amountMinor currency } }
  }
}"
            }
            Kind::DevicesPage => {
                "query DevicesPage($userId: UUID!) {
  devices(filter: { userId: $userId }, first: 20) {
    totalCount
    pageInfo { hasNextPage endCursor }
    nodes { id status provider cpuCores memoryMb createdAt }
  }
}"
            }
            Kind::Device => {
                "query Device($deviceId: UUID!) {
  device(id: $deviceId) {
    id ownerId provider status cpuCores memoryMb androidVersion
    createdAt lastStartedAt minutesUsed updatedPosition
  }
}"
            }
            Kind::UserOverview => {
                "query UserOverview($userId: UUID!, $from: NaiveDate!, $to: NaiveDate!) {
  user(id: $userId) {
    devices(first: 10) {
      totalCount
      pageInfo { hasNextPage endCursor }
      nodes { id status provider cpuCores memoryMb createdAt }
    }
    usage(from: $from, to: $to) {
      rows { period minutes cost { amountMinor currency } }
      totals { minutes costs { amountMinor currency } }
    }
  }
}"
            }
        }
    }
}

/// One watched dashboard: a user, one of their devices, and the range it shows.
#[derive(Debug, Clone)]
struct Dashboard {
    user: Uuid,
    device: Uuid,
    from: NaiveDate,
    to: NaiveDate,
}

/// A server under load: where to send, and the prepared request of each (dashboard, kind).
#[derive(Debug)]
struct Target {
    label: &'static str,
    url: String,
    /// Per dashboard, per kind (in `Kind::ALL` order): the JSON request body.
    bodies: Vec<[Vec<u8>; 5]>,
    /// Per dashboard: the `Authorization` header (PostGraphile has no auth and ignores the
    /// admin token it is sent; it is there so both servers parse the same requests).
    auth: Vec<HeaderValue>,
    flavor: Flavor,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavor {
    Ours,
    PostGraphile,
}

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
    /// ≥ 3x PostGraphile's queries/s (warm).
    throughput_3x: Option<bool>,
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
    /// Query API with its cache over PostGraphile, queries/s.
    warm_over_postgraphile: Option<f64>,
    /// Query API without its cache over PostGraphile, queries/s.
    uncached_over_postgraphile: Option<f64>,
    targets: Targets,
}

pub async fn run(args: &LoadQueriesArgs) -> anyhow::Result<()> {
    if args.clients == 0 || args.hot_users == 0 || args.devices == 0 || args.users == 0 || args.duration == 0 {
        bail!("--clients, --hot-users, --devices, --users and --duration must be positive");
    }
    if args.usage_rows < args.devices {
        bail!("--usage-rows must be at least --devices (every device has usage)");
    }
    let postgraphile_dir = if args.no_postgraphile {
        None
    } else {
        Some(postgraphile_dir(args)?)
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
    projections::migrate(&pool).await?;
    let started = Instant::now();
    let users_with_devices = provision(&pool, args).await?;
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

    // PostGraphile first, so both servers are checked before anything is timed; it idles
    // while the query API is measured.
    let mut postgraphile = match &postgraphile_dir {
        Some(dir) => Some(PostGraphile::start(dir, args, &dashboards, &client).await?),
        None => None,
    };
    let result = phases(args, &dashboards, &client, postgraphile.as_ref()).await;
    if let Some(server) = postgraphile.take() {
        server.stop().await;
    }
    let phases = result?;

    let qps = |name: &str| phases.iter().find(|p| p.phase == name).map(|p| p.queries_per_second);
    let baseline = qps(PHASE_POSTGRAPHILE);
    let warm_over_postgraphile = baseline.zip(qps(PHASE_WARM)).map(|(b, w)| w / b.max(1e-9));
    let uncached_over_postgraphile = baseline.zip(qps(PHASE_UNCACHED)).map(|(b, u)| u / b.max(1e-9));
    let warm = phases.iter().find(|p| p.phase == PHASE_WARM);
    let targets = Targets {
        throughput_3x: warm_over_postgraphile.map(|r| r >= 3.0),
        warm_p99_under_5ms: warm.map(|p| p.latency.p99_ms < 5.0),
        hit_ratio_over_95: warm.and_then(|p| p.hit_ratio).map(|r| r > 0.95),
    };
    if let Some(ratio) = uncached_over_postgraphile {
        println!("  query API uncached / PostGraphile: {ratio:.2}x queries/s");
    }
    if let Some(ratio) = warm_over_postgraphile {
        println!("  query API cached / PostGraphile:   {ratio:.2}x queries/s");
    }
    let verdict = |met: Option<bool>| match met {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "not measured",
    };
    println!(
        "  targets: >= 3x PostGraphile's throughput: {} ({}); p99 < 5 ms warm: {} ({:.2} ms); hit ratio > 95 %: {} ({})",
        verdict(targets.throughput_3x),
        warm_over_postgraphile.map_or("-".to_owned(), |r| format!("{r:.2}x")),
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
        targets,
    };
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("write {}", path.display()))?;
        println!("  report written to {}", path.display());
    }
    Ok(())
}

const PHASE_UNCACHED: &str = "query API, cache off";
const PHASE_WARM: &str = "query API, cache warm";
const PHASE_POSTGRAPHILE: &str = "PostGraphile v4";
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
    postgraphile: Option<&PostGraphile>,
) -> anyhow::Result<Vec<PhaseReport>> {
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
    if let Some(postgraphile) = postgraphile {
        let answers = pass(client, &postgraphile.target, args.clients).await?;
        compare(&reference, &answers, postgraphile.target.label)?;
        println!(
            "  checked: all 5 query kinds of {} dashboards answer without errors, with data, the same on both servers",
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

    if let Some(postgraphile) = postgraphile {
        pass(client, &postgraphile.target, args.clients).await?;
        let report = measure(client, &postgraphile.target, args).await?;
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
        let api = QueryApi::build(config, pool.clone(), command_api::telemetry::prometheus())
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

fn ours_target(label: &'static str, url: String, dashboards: &[Dashboard]) -> anyhow::Result<Target> {
    let mut bodies = Vec::with_capacity(dashboards.len());
    let mut auth = Vec::with_capacity(dashboards.len());
    for dashboard in dashboards {
        let variables = |kind: Kind| match kind {
            Kind::DeviceStats | Kind::DevicesPage => json!({"userId": dashboard.user}),
            Kind::DailyUsage | Kind::UserOverview => json!({
                "userId": dashboard.user,
                "from": dashboard.from.to_string(),
                "to": dashboard.to.to_string(),
            }),
            Kind::Device => json!({"deviceId": dashboard.device}),
        };
        let body = |kind: Kind| serde_json::to_vec(&json!({"query": kind.ours(), "variables": variables(kind)}));
        bodies.push([
            body(Kind::DeviceStats)?,
            body(Kind::DailyUsage)?,
            body(Kind::DevicesPage)?,
            body(Kind::Device)?,
            body(Kind::UserOverview)?,
        ]);
        let token = load_token(&dashboard.user.to_string(), Role::User)?;
        auth.push(HeaderValue::from_str(&format!("Bearer {token}"))?);
    }
    Ok(Target {
        label,
        url,
        bodies,
        auth,
        flavor: Flavor::Ours,
    })
}

/// The PostGraphile baseline's directory: `--postgraphile-dir`, or this repository's.
fn postgraphile_dir(args: &LoadQueriesArgs) -> anyhow::Result<PathBuf> {
    let dir = match &args.postgraphile_dir {
        Some(dir) => dir.clone(),
        None => {
            let in_repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/bench/postgraphile");
            if in_repo.is_dir() {
                in_repo
            } else {
                PathBuf::from("ops/bench/postgraphile")
            }
        }
    };
    for file in ["run.sh", "queries.json"] {
        if !dir.join(file).is_file() {
            bail!(
                "the PostGraphile baseline is missing {} (pass --postgraphile-dir, or --no-postgraphile to skip it)",
                dir.join(file).display()
            );
        }
    }
    Ok(dir)
}

/// The PostGraphile baseline, a child process (killed when dropped).
struct PostGraphile {
    child: tokio::process::Child,
    target: Arc<Target>,
}

impl PostGraphile {
    async fn start(
        dir: &Path,
        args: &LoadQueriesArgs,
        dashboards: &[Dashboard],
        client: &reqwest::Client,
    ) -> anyhow::Result<Self> {
        let node = tokio::process::Command::new("node").arg("--version").output().await;
        match node {
            Ok(output) if output.status.success() => {}
            _ => bail!(
                "`node` is not installed or does not run: the PostGraphile baseline needs Node 18+ (and npm if {} has no node_modules); \
                 install it or pass --no-postgraphile",
                dir.display()
            ),
        }
        if !dir.join("node_modules").is_dir() {
            let npm = tokio::process::Command::new("npm").arg("--version").output().await;
            if !matches!(npm, Ok(output) if output.status.success()) {
                bail!(
                    "{} has no node_modules and `npm` is not installed to fetch them; install npm or pass --no-postgraphile",
                    dir.display()
                );
            }
        }
        let queries = std::fs::read_to_string(dir.join("queries.json"))
            .with_context(|| format!("read {}", dir.join("queries.json").display()))?;
        let queries: Value = serde_json::from_str(&queries).context("queries.json is not JSON")?;
        let port = {
            let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
            listener.local_addr()?.port()
        };
        let url = database_url_of(&args.database.database_url, LOAD_DATABASE)?;
        let mut command = tokio::process::Command::new(dir.join("run.sh"));
        command
            .arg(&url)
            .arg(port.to_string())
            .env("PGL_MAX_POOL_SIZE", args.pool_size.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(workers) = args.postgraphile_workers {
            command.env("PGL_CLUSTER_WORKERS", workers.to_string());
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot run {}", dir.join("run.sh").display()))?;
        // Keep the tail of its stderr for the error message if it dies.
        let stderr_tail = Arc::new(Mutex::new(String::new()));
        if let Some(mut stderr) = child.stderr.take() {
            let tail = Arc::clone(&stderr_tail);
            tokio::spawn(async move {
                let mut buffer = [0u8; 4096];
                while let Ok(read) = stderr.read(&mut buffer).await {
                    if read == 0 {
                        break;
                    }
                    if let Ok(mut tail) = tail.lock() {
                        tail.push_str(&String::from_utf8_lossy(&buffer[..read]));
                        if tail.len() > 8192 {
                            let cut = tail.len() - 8192;
                            let cut = (cut..tail.len()).find(|i| tail.is_char_boundary(*i)).unwrap_or(0);
                            tail.drain(..cut);
                        }
                    }
                }
            });
        }
        let target = Arc::new(postgraphile_target(
            format!("http://127.0.0.1:{port}/graphql"),
            &queries,
            dashboards,
        )?);
        let mut server = PostGraphile { child, target };
        server.wait_ready(client, &stderr_tail).await?;
        println!(
            "  PostGraphile v4 answering on 127.0.0.1:{port} (pool {})",
            args.pool_size
        );
        Ok(server)
    }

    /// Polls with the first dashboard's device statistics until an answer with data comes.
    async fn wait_ready(&mut self, client: &reqwest::Client, stderr: &Mutex<String>) -> anyhow::Result<()> {
        let started = Instant::now();
        let body = self.target.bodies[0][Kind::DeviceStats.index()].clone();
        let mut last = String::from("no answer yet");
        let mut child_exited = None;
        while started.elapsed() < POSTGRAPHILE_START {
            let answer = client
                .post(&self.target.url)
                .header(CONTENT_TYPE, "application/json")
                .body(body.clone())
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            match answer {
                Ok(response) => {
                    let status = response.status();
                    let text = response.text().await.unwrap_or_default();
                    if status.is_success() && !text.contains("\"errors\"") && text.contains("\"data\"") {
                        return Ok(());
                    }
                    last = format!("HTTP {status}: {}", text.chars().take(500).collect::<String>());
                }
                Err(error) => last = error.to_string(),
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                child_exited = Some(status);
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Let the stderr reader take in what the child wrote last.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let tail = stderr.lock().map(|t| t.clone()).unwrap_or_default();
        match child_exited {
            Some(status) => {
                bail!("PostGraphile exited ({status}) before answering (last: {last}); its stderr:\n{tail}")
            }
            None => bail!(
                "PostGraphile did not answer a query within {POSTGRAPHILE_START:?} (last: {last}); its stderr:\n{tail}"
            ),
        }
    }

    /// SIGTERM (its documented stop), then SIGKILL if it lingers.
    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = tokio::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
                .await;
            if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
                .await
                .is_ok()
            {
                return;
            }
        }
        let _ = self.child.kill().await;
    }
}

/// `url` with its database replaced by `database` (for a child process that takes a URL).
fn database_url_of(url: &str, database: &str) -> anyhow::Result<String> {
    let scheme_end = url.find("://").context("--database-url is not a URL")? + 3;
    let rest = &url[scheme_end..];
    let (path_part, query) = match rest.find('?') {
        Some(at) => rest.split_at(at),
        None => (rest, ""),
    };
    let authority = path_part.split('/').next().unwrap_or(path_part);
    Ok(format!("{}{authority}/{database}{query}", &url[..scheme_end]))
}

fn postgraphile_target(url: String, queries: &Value, dashboards: &[Dashboard]) -> anyhow::Result<Target> {
    let mut bodies = Vec::with_capacity(dashboards.len());
    for dashboard in dashboards {
        let body = |kind: Kind| -> anyhow::Result<Vec<u8>> {
            let entry = &queries[kind.name()];
            let query = entry["query"]
                .as_str()
                .with_context(|| format!("queries.json has no query for `{}`", kind.name()))?;
            let mut variables = serde_json::Map::new();
            if let Some(given) = entry["variables"].as_object() {
                for (name, value) in given {
                    let value = match value.as_str() {
                        Some("$USER_ID") => json!(dashboard.user),
                        Some("$DEVICE_ID") => json!(dashboard.device),
                        Some("$FROM") => json!(dashboard.from.to_string()),
                        Some("$TO") => json!(dashboard.to.to_string()),
                        _ => value.clone(),
                    };
                    variables.insert(name.clone(), value);
                }
            }
            Ok(serde_json::to_vec(&json!({"query": query, "variables": variables}))?)
        };
        bodies.push([
            body(Kind::DeviceStats)?,
            body(Kind::DailyUsage)?,
            body(Kind::DevicesPage)?,
            body(Kind::Device)?,
            body(Kind::UserOverview)?,
        ]);
    }
    let admin = load_token(&Uuid::now_v7().to_string(), Role::Admin)?;
    let admin = HeaderValue::from_str(&format!("Bearer {admin}"))?;
    Ok(Target {
        label: PHASE_POSTGRAPHILE,
        url,
        auth: vec![admin; bodies.len()],
        bodies,
        flavor: Flavor::PostGraphile,
    })
}

/// One device per generated row `n`, as a function of `n` and the seed alone, so the usage
/// statement can recompute owner and creation time without reading `devices`.
/// $1 seed, $2 devices, $3 users, $4 first creation time, $5 microseconds between creations.
const DEVICE_GENERATOR: &str = "
gen AS (
    SELECT n,
           md5('device:' || $1::bigint || ':' || n)::uuid AS device_id,
           md5('user:' || $1::bigint || ':'
               || floor($3::bigint * power((h & 4294967295)::float8 / 4294967296.0, 1.5))::bigint)::uuid AS owner_id,
           (ARRAY['aws', 'gcp', 'azure', 'alibaba', 'huawei'])[1 + ((h >> 48) & 255) % 5] AS provider,
           CASE WHEN ((h >> 32) & 65535) % 100 < 45 THEN 'stopped'
                WHEN ((h >> 32) & 65535) % 100 < 80 THEN 'running'
                WHEN ((h >> 32) & 65535) % 100 < 90 THEN 'failed'
                ELSE 'deleted' END AS status,
           ((h2 >> 40) & 65535) % 100 AS roll,
           1 + ((h >> 56) & 7)::int AS cpu_cores,
           (ARRAY[2048, 4096, 8192])[1 + ((h2 >> 20) & 65535) % 3] AS memory_mb,
           (11 + ((h >> 59) & 3))::smallint AS android_version,
           $4::timestamptz + n * $5::bigint * interval '1 microsecond' AS created_at,
           h2
    FROM generate_series(0::bigint, $2::bigint - 1) AS n
    CROSS JOIN LATERAL (SELECT hashint8extended(n, $1::bigint) AS h,
                               hashint8extended(n, $1::bigint + 1) AS h2) AS hashes
)";

/// Fills the read models; returns how many users own devices.
async fn provision(pool: &PgPool, args: &LoadQueriesArgs) -> anyhow::Result<i64> {
    let seed = i64::try_from(args.seed % (1 << 40)).unwrap_or(0);
    let devices = i64::try_from(args.devices).context("--devices")?;
    let users = i64::try_from(args.users).context("--users")?;
    let usage_rows = i64::try_from(args.usage_rows).context("--usage-rows")?;
    // Usage days per device: each device's rows fall on distinct days after its creation.
    let per_device = (usage_rows + devices - 1) / devices;
    if per_device > HISTORY_DAYS - 30 {
        bail!(
            "--usage-rows / --devices is {per_device}: at most {} usage days per device fit in the {HISTORY_DAYS} days generated",
            HISTORY_DAYS - 30
        );
    }
    let today = Utc::now().date_naive();
    let end_day = today; // usage up to yesterday; `day < end_day`
    let first = (today - chrono::Duration::days(HISTORY_DAYS))
        .and_hms_opt(0, 0, 0)
        .context("midnight")?
        .and_utc();
    // Creation times spread over the history, leaving every device `per_device` days of
    // usage before `end_day`; microseconds apart, so keyset order is by time.
    let span_us = (HISTORY_DAYS - per_device - 1) * 86_400 * 1_000_000;
    let step_us = span_us / devices;
    if step_us < 1 {
        bail!("too many devices for distinct creation times");
    }

    let mut progress = Progress::new("provisioning", 5);
    // Usage first: device `n` gets rows j = 0..per_device on distinct days between its
    // creation and yesterday, owned by its owner.
    sqlx::query(AssertSqlSafe(format!(
        "WITH {DEVICE_GENERATOR}
         INSERT INTO daily_usage (day, user_id, device_id, minutes, cost_minor, currency)
         SELECT created_day + ((r / $2::bigint) * ($6::date - created_day) / $7::bigint)::int,
                g.owner_id, g.device_id, m.minutes, m.minutes * 3, 'USD'
         FROM generate_series(0::bigint, $8::bigint - 1) AS r
         JOIN gen g ON g.n = r % $2::bigint
         CROSS JOIN LATERAL (SELECT (g.created_at AT TIME ZONE 'UTC')::date AS created_day,
                                    1 + (hashint8extended(r, $1::bigint + 2) & 2047) % 1440 AS minutes) AS m"
    )))
    .bind(seed)
    .bind(devices)
    .bind(users)
    .bind(first)
    .bind(step_us)
    .bind(end_day)
    .bind(per_device)
    .bind(usage_rows)
    .execute(pool)
    .await
    .context("generate daily_usage")?;
    progress.set(1);
    sqlx::query(AssertSqlSafe(format!(
        "WITH {DEVICE_GENERATOR}
         INSERT INTO devices (device_id, owner_id, provider, status, cpu_cores, memory_mb, android_version,
                              created_at, last_started_at, minutes_used, updated_position)
         SELECT g.device_id, g.owner_id, g.provider, g.status, g.cpu_cores, g.memory_mb, g.android_version,
                g.created_at,
                CASE WHEN g.status = 'running' OR g.roll >= 20
                     THEN g.created_at + ((g.h2 & 1048575) % 86400) * interval '1 second' END,
                coalesce(u.minutes, 0), 1
         FROM gen g
         LEFT JOIN (SELECT device_id, sum(minutes)::bigint AS minutes FROM daily_usage GROUP BY device_id) AS u
                USING (device_id)
         ORDER BY g.n"
    )))
    .bind(seed)
    .bind(devices)
    .bind(users)
    .bind(first)
    .bind(step_us)
    .execute(pool)
    .await
    .context("generate devices")?;
    progress.set(2);
    sqlx::query(
        "INSERT INTO device_stats (user_id, status, provider, device_count, total_cpu_cores, total_memory_mb, last_created_at)
         SELECT owner_id, status, provider, count(*), sum(cpu_cores), sum(memory_mb), max(created_at)
         FROM devices WHERE status <> 'deleted' GROUP BY owner_id, status, provider",
    )
    .execute(pool)
    .await
    .context("generate device_stats")?;
    // The read models stand at position 1: the API needs a watermark to key its cache on.
    sqlx::query(
        "INSERT INTO projection_checkpoints (projection, position, last_recorded_at)
         VALUES ('fleet', 1, now()), ('daily_usage', 1, now())",
    )
    .execute(pool)
    .await?;
    progress.set(3);
    // What autovacuum would long since have done: statistics and the visibility map.
    for table in ["devices", "device_stats", "daily_usage"] {
        sqlx::raw_sql(AssertSqlSafe(format!("VACUUM (ANALYZE) {table}")))
            .execute(pool)
            .await?;
    }
    progress.set(4);
    let (generated, collisions): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM daily_usage),
                (SELECT count(*) FROM daily_usage u JOIN devices d USING (device_id)
                 WHERE u.user_id <> d.owner_id OR u.day < (d.created_at AT TIME ZONE 'UTC')::date OR u.day >= $1)",
    )
    .bind(end_day)
    .fetch_one(pool)
    .await?;
    if generated != usage_rows || collisions != 0 {
        bail!("generated {generated} usage rows ({collisions} inconsistent with their device) instead of {usage_rows}");
    }
    let users_with_devices: i64 = sqlx::query_scalar("SELECT count(DISTINCT owner_id) FROM devices")
        .fetch_one(pool)
        .await?;
    progress.set(5);
    progress.finish();
    Ok(users_with_devices)
}

/// Waits (at most two minutes) until streaming replicas of the server have replayed the
/// provisioning's WAL, so their replay does not compete with the first phase for the cores.
async fn wait_for_replicas(pool: &PgPool) {
    let started = Instant::now();
    loop {
        let behind: Result<Option<i64>, sqlx::Error> = sqlx::query_scalar(
            "SELECT max(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn))::bigint FROM pg_stat_replication",
        )
        .fetch_one(pool)
        .await;
        match behind {
            Ok(Some(bytes)) if bytes > 0 => {
                if started.elapsed() > Duration::from_secs(120) {
                    println!(
                        "  a streaming replica is still {bytes} bytes of WAL behind after 120 s: measuring anyway"
                    );
                    return;
                }
            }
            // Caught up, no replicas, or not allowed to look.
            _ => {
                if started.elapsed() > Duration::from_secs(1) {
                    println!(
                        "  waited {:.1} s for streaming replicas to replay the provisioning",
                        started.elapsed().as_secs_f64()
                    );
                }
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The watched dashboards: users with a live device and usage, drawn with the seed; each
/// with one of its devices and a 30-day range that holds usage.
async fn pick_dashboards(pool: &PgPool, args: &LoadQueriesArgs) -> anyhow::Result<Vec<Dashboard>> {
    let owners: Vec<(Uuid, Vec<Uuid>)> = sqlx::query_as(
        "SELECT owner_id, array_agg(device_id ORDER BY created_at, device_id)
         FROM devices GROUP BY owner_id HAVING bool_or(status <> 'deleted') ORDER BY owner_id",
    )
    .fetch_all(pool)
    .await?;
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut order: Vec<usize> = (0..owners.len()).collect();
    order.shuffle(&mut rng);
    order.truncate(args.hot_users.saturating_mul(2) + 16);
    let candidates: Vec<Uuid> = order.iter().map(|i| owners[*i].0).collect();
    let days: Vec<(Uuid, Vec<NaiveDate>)> = sqlx::query_as(
        "SELECT user_id, array_agg(DISTINCT day ORDER BY day) FROM daily_usage WHERE user_id = ANY($1) GROUP BY user_id",
    )
    .bind(&candidates)
    .fetch_all(pool)
    .await?;
    let days: BTreeMap<Uuid, Vec<NaiveDate>> = days.into_iter().collect();
    let mut dashboards = Vec::with_capacity(args.hot_users);
    for index in order {
        let (user, devices) = &owners[index];
        let Some(user_days) = days.get(user).filter(|d| !d.is_empty()) else {
            continue;
        };
        let (Some(last), Some(device)) = (user_days.last(), devices.get(rng.random_range(0..devices.len()))) else {
            continue;
        };
        let day = user_days[rng.random_range(0..user_days.len())];
        let to = (day + chrono::Duration::days(rng.random_range(0..RANGE_DAYS))).min(*last);
        dashboards.push(Dashboard {
            user: *user,
            device: *device,
            from: to - chrono::Duration::days(RANGE_DAYS - 1),
            to,
        });
        if dashboards.len() == args.hot_users {
            break;
        }
    }
    if dashboards.len() < args.hot_users {
        println!(
            "  only {} users have live devices and usage: watching {} dashboards",
            dashboards.len(),
            dashboards.len()
        );
    }
    if dashboards.is_empty() {
        bail!("no user has live devices and usage to watch");
    }
    Ok(dashboards)
}

/// What one answer says, reduced to what both servers must agree on.
type Facts = Value;

/// One request, timed from send to the last byte of the answer.
struct Sent {
    elapsed: Duration,
    outcome: Result<Vec<u8>, String>,
    cache: Option<&'static str>,
}

async fn send(client: &reqwest::Client, target: &Target, dashboard: usize, kind: Kind) -> Sent {
    let mut request = client
        .post(&target.url)
        .header(CONTENT_TYPE, "application/json")
        .body(target.bodies[dashboard][kind.index()].clone());
    if let Some(auth) = target.auth.get(dashboard) {
        request = request.header(AUTHORIZATION, auth.clone());
    }
    let started = Instant::now();
    let response = request.send().await;
    let (outcome, cache) = match response {
        Ok(response) => {
            let status = response.status();
            let cache = response.headers().get("x-cache").and_then(|v| match v.as_bytes() {
                b"hit" => Some("hit"),
                b"miss" => Some("miss"),
                b"bypass" => Some("bypass"),
                _ => None,
            });
            match response.bytes().await {
                Ok(body) if status.is_success() && !mentions_errors(&body) => (Ok(body.to_vec()), cache),
                Ok(body) => (Err(error_reason(status.as_u16(), &body)), cache),
                Err(error) => (Err(transport_reason(&error)), cache),
            }
        }
        Err(error) => (Err(transport_reason(&error)), None),
    };
    Sent {
        elapsed: started.elapsed(),
        outcome,
        cache,
    }
}

fn mentions_errors(body: &[u8]) -> bool {
    body.windows(8).any(|w| w == b"\"errors\"")
}

fn transport_reason(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        "timeout".to_owned()
    } else {
        format!("transport: {error}")
    }
}

/// The status and the first error's code or message, as the report counts it.
fn error_reason(status: u16, body: &[u8]) -> String {
    let parsed: Value = serde_json::from_slice(body).unwrap_or_default();
    let error = &parsed["errors"][0];
    let what = error["extensions"]["code"]
        .as_str()
        .or_else(|| error["message"].as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned());
    format!("{status} {what}")
}

/// Asks every (dashboard, kind) once, `concurrency` at a time; fails on the first error, and
/// returns what each answer says.
async fn pass(client: &reqwest::Client, target: &Target, concurrency: usize) -> anyhow::Result<Vec<[Facts; 5]>> {
    let work: Vec<(usize, Kind)> = (0..target.bodies.len())
        .flat_map(|d| Kind::ALL.into_iter().map(move |k| (d, k)))
        .collect();
    let answers: Vec<(usize, Kind, Sent)> = futures::stream::iter(work)
        .map(|(d, kind)| async move { (d, kind, send(client, target, d, kind).await) })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut facts: Vec<[Facts; 5]> = (0..target.bodies.len()).map(|_| Default::default()).collect();
    for (d, kind, sent) in answers {
        let body = sent.outcome.map_err(|reason| {
            anyhow::anyhow!("{}: `{}` of dashboard {d} failed: {reason}", target.label, kind.name())
        })?;
        let answer: Value = serde_json::from_slice(&body).with_context(|| {
            format!(
                "{}: `{}` answered with something that is not JSON",
                target.label,
                kind.name()
            )
        })?;
        facts[d][kind.index()] = match target.flavor {
            Flavor::Ours => facts_ours(kind, &answer["data"]),
            Flavor::PostGraphile => facts_postgraphile(kind, &answer["data"]),
        }
        .with_context(|| {
            format!(
                "{}: `{}` of dashboard {d} answered {}",
                target.label,
                kind.name(),
                String::from_utf8_lossy(&body[..body.len().min(600)])
            )
        })?;
    }
    Ok(facts)
}

/// An integer sent as a JSON number or (BigInt, BigFloat) string.
fn int(value: &Value) -> anyhow::Result<i64> {
    match value {
        Value::Number(n) => n.as_i64().context("not an integer"),
        Value::String(s) => s
            .parse::<i64>()
            .or_else(|_| s.parse::<f64>().map(|f| f.round() as i64))
            .with_context(|| format!("`{s}` is not a number")),
        other => bail!("{other} is not a number"),
    }
}

fn array<'a>(value: &'a Value, what: &str) -> anyhow::Result<&'a Vec<Value>> {
    value.as_array().with_context(|| format!("{what} is not a list"))
}

fn ids(nodes: &[Value], field: &str) -> Value {
    Value::Array(nodes.iter().map(|n| n[field].clone()).collect())
}

fn facts_ours(kind: Kind, data: &Value) -> anyhow::Result<Facts> {
    Ok(match kind {
        Kind::DeviceStats => {
            let stats = &data["deviceStats"];
            json!({
                "rows": array(&stats["rows"], "rows")?.len(),
                "devices": int(&stats["totals"]["deviceCount"])?,
                "cpu": int(&stats["totals"]["cpuCores"])?,
                "memory": int(&stats["totals"]["memoryMb"])?,
            })
        }
        Kind::DailyUsage => usage_ours(&data["dailyUsage"])?,
        Kind::DevicesPage => page_ours(&data["devices"])?,
        Kind::Device => device_facts(&data["device"], "id")?,
        Kind::UserOverview => {
            let user = &data["user"];
            if user.is_null() {
                bail!("no user");
            }
            json!({"devices": page_ours(&user["devices"])?, "usage": usage_ours(&user["usage"])?})
        }
    })
}

/// A device's facts; the two servers differ only in the name of its id field.
fn device_facts(device: &Value, id_field: &str) -> anyhow::Result<Facts> {
    if device.is_null() {
        bail!("no device");
    }
    Ok(json!({
        "id": device[id_field],
        "owner": device["ownerId"],
        "status": device["status"].as_str().unwrap_or_default().to_lowercase(),
        "provider": device["provider"].as_str().unwrap_or_default().to_lowercase(),
        "cpu": int(&device["cpuCores"])?,
        "minutes": int(&device["minutesUsed"])?,
    }))
}

fn usage_ours(usage: &Value) -> anyhow::Result<Facts> {
    let days = array(&usage["rows"], "rows")?.len();
    let costs = array(&usage["totals"]["costs"], "costs")?;
    let cost = costs
        .iter()
        .map(|c| int(&c["amountMinor"]))
        .sum::<anyhow::Result<i64>>()?;
    Ok(json!({"days": days, "minutes": int(&usage["totals"]["minutes"])?, "cost": cost}))
}

fn page_ours(page: &Value) -> anyhow::Result<Facts> {
    let nodes = array(&page["nodes"], "nodes")?;
    Ok(json!({
        "total": int(&page["totalCount"])?,
        "next": page["pageInfo"]["hasNextPage"],
        "ids": ids(nodes, "id"),
    }))
}

fn facts_postgraphile(kind: Kind, data: &Value) -> anyhow::Result<Facts> {
    Ok(match kind {
        Kind::DeviceStats => {
            let stats = &data["allDeviceStats"];
            let sum = &stats["aggregates"]["sum"];
            json!({
                "rows": array(&stats["nodes"], "nodes")?.len(),
                "devices": int(&sum["deviceCount"])?,
                "cpu": int(&sum["totalCpuCores"])?,
                "memory": int(&sum["totalMemoryMb"])?,
            })
        }
        Kind::DailyUsage => usage_postgraphile(&data["allDailyUsages"])?,
        Kind::DevicesPage => page_postgraphile(&data["allDevices"])?,
        Kind::Device => device_facts(&data["deviceByDeviceId"], "deviceId")?,
        Kind::UserOverview => json!({
            "devices": page_postgraphile(&data["devices"])?,
            "usage": usage_postgraphile(&data["usage"])?,
        }),
    })
}

/// PostGraphile answers one row per (day, device): the days are the distinct `day`s.
fn usage_postgraphile(usage: &Value) -> anyhow::Result<Facts> {
    let nodes = array(&usage["nodes"], "nodes")?;
    let mut days: Vec<&str> = nodes.iter().filter_map(|n| n["day"].as_str()).collect();
    days.dedup();
    let sum = &usage["aggregates"]["sum"];
    Ok(json!({"days": days.len(), "minutes": int(&sum["minutes"])?, "cost": int(&sum["costMinor"])?}))
}

fn page_postgraphile(page: &Value) -> anyhow::Result<Facts> {
    let nodes = array(&page["nodes"], "nodes")?;
    Ok(json!({
        "total": int(&page["totalCount"])?,
        "next": page["pageInfo"]["hasNextPage"],
        "ids": ids(nodes, "deviceId"),
    }))
}

/// Every kind of every dashboard answered with data (not empty lists).
fn check_answers(facts: &[[Facts; 5]], dashboards: &[Dashboard]) -> anyhow::Result<()> {
    for (d, answers) in facts.iter().enumerate() {
        let empty = |kind: Kind, what: &str| {
            anyhow::anyhow!(
                "`{}` of dashboard {d} (user {}) answered no {what}: {}",
                kind.name(),
                dashboards[d].user,
                answers[kind.index()]
            )
        };
        if answers[Kind::DeviceStats.index()]["rows"].as_u64().unwrap_or(0) == 0 {
            return Err(empty(Kind::DeviceStats, "rows"));
        }
        if answers[Kind::DailyUsage.index()]["days"].as_u64().unwrap_or(0) == 0 {
            return Err(empty(Kind::DailyUsage, "usage"));
        }
        if answers[Kind::DevicesPage.index()]["ids"]
            .as_array()
            .is_none_or(Vec::is_empty)
        {
            return Err(empty(Kind::DevicesPage, "devices"));
        }
        let overview = &answers[Kind::UserOverview.index()];
        if overview["devices"]["ids"].as_array().is_none_or(Vec::is_empty) || overview["usage"]["days"] == 0 {
            return Err(empty(Kind::UserOverview, "devices or usage"));
        }
    }
    Ok(())
}

fn compare(reference: &[[Facts; 5]], answers: &[[Facts; 5]], label: &str) -> anyhow::Result<()> {
    for (d, (ours, theirs)) in reference.iter().zip(answers).enumerate() {
        for kind in Kind::ALL {
            let (a, b) = (&ours[kind.index()], &theirs[kind.index()]);
            if a != b {
                bail!(
                    "{label} answers `{}` of dashboard {d} differently from the uncached query API:\n  query API: {a}\n  {label}: {b}",
                    kind.name()
                );
            }
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_load_database_replaces_only_the_database_of_the_url() {
        let url = |u| database_url_of(u, "cloudphone_load_queries").unwrap();
        assert_eq!(
            url("postgres://postgres@127.0.0.1:5432/cloudphone"),
            "postgres://postgres@127.0.0.1:5432/cloudphone_load_queries"
        );
        assert_eq!(
            url("postgres://u:p@db:5433/x?sslmode=disable"),
            "postgres://u:p@db:5433/cloudphone_load_queries?sslmode=disable"
        );
        assert_eq!(url("postgresql://h"), "postgresql://h/cloudphone_load_queries");
        assert!(database_url_of("not a url", "x").is_err());
    }

    #[test]
    fn the_mix_has_its_weights() {
        assert_eq!(Kind::ALL.iter().map(|k| k.weight()).sum::<u32>(), 100);
        let mut counts = BTreeMap::new();
        for roll in 0..100 {
            *counts.entry(Kind::pick(roll)).or_insert(0u32) += 1;
        }
        for kind in Kind::ALL {
            assert_eq!(counts[&kind], kind.weight(), "{kind:?}");
            assert_eq!(Kind::ALL[kind.index()], kind);
        }
    }
}
