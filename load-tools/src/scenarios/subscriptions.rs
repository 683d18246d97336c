//! `cloudphone load subscriptions`: dashboards kept live over WebSocket (pushed from
//! projection commits) against the same dashboards polled every second over HTTP, in the same
//! run, with the same users and the same command rate.
//!
//! The command API, a projector and the query API run as child processes of this binary on a
//! database of the run's own, so the query API's CPU and memory are its own. Users are
//! registered, then three phases of `--seconds` each run portal commands (create, start,
//! stop) at `--rate` per second for random users:
//!
//! 1. commands only: what the commands themselves cost the database, subtracted from the
//!    other phases to attribute transactions to the dashboards;
//! 2. push: `--subscribers` subscriptions over `--users`, `--per-socket` on each
//!    `graphql-transport-ws` socket, half `devices`, half `deviceStats` of their user;
//! 3. poll: as many dashboards, each posting the same query every `--poll-interval-ms`.
//!
//! Latency counts from a command's acknowledgement to the first answer (pushed or polled) for
//! its user whose `devices` page shows the device in the status the command left it in. An
//! answer seen before the acknowledgement counts as zero (the projector can beat the HTTP
//! answer home).
//!
//! SQL work is read two ways, as PostgreSQL may lack `pg_stat_statements`: the query API's own
//! counters (evaluations plus query cache misses: dashboard documents run against the read
//! models) and `pg_stat_database`'s transactions of the run's database (every role's).
//! The generator raises its file-descriptor limit for the sockets and the pollers'
//! connections; the query API's subscription limits (`LiveConfig`) have no flags, so a run
//! must fit their defaults (100 subscriptions per socket, 100 sockets per user).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::sync::{Semaphore, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::cli::LoadSubscriptionsArgs;
use crate::harness::databases::{database_url_of, recreate_database};
use crate::harness::metrics::metric;
use crate::harness::portal::register_user;
use crate::harness::report::{Latency, histogram, write_json};
use crate::harness::roles::RoleProcess;
use crate::harness::sampling::{cpu_seconds, vm_rss_mib};

const DATABASE: &str = "cloudphone_load_subscriptions";
/// Devices a user's fleet grows to at most, so every device fits on the dashboard's page.
const FLEET_CAP: usize = 20;
/// The dashboard's page: larger than any fleet.
const DEVICES: &str = "subscription Devices($userId: UUID!) { devices(filter: {userId: $userId}, first: 100) { totalCount nodes { id status } } }";
const DEVICE_STATS: &str = "subscription DeviceStats($userId: UUID!) { deviceStats(filter: {userId: $userId}) { rows { status provider deviceCount cpuCores memoryMb } totals { deviceCount cpuCores memoryMb } } }";
/// The query cache's misses: each a dashboard document run against the read models.
const CACHE_MISSES: &str = "cloudphone_query_cache_lookups_total{result=\"miss\"}";
/// Commands in flight at most; a command due with none free is counted as shed.
const MAX_IN_FLIGHT: usize = 512;
/// How long after the last command an answer may still show it.
const GRACE: Duration = Duration::from_secs(3);
/// Longest the sockets may take to open and get every first answer.
const OPEN_LIMIT: Duration = Duration::from_secs(180);
/// Sockets opened at once.
const OPENING_CONCURRENCY: usize = 64;
/// The query API's limits (`LiveConfig`'s defaults, which its CLI does not change).
const MAX_SUBSCRIPTIONS_PER_SOCKET: usize = 100;
const MAX_SOCKETS_PER_USER: usize = 100;

/// What a dashboard watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Board {
    Devices,
    DeviceStats,
}

impl Board {
    /// Half of each user's dashboards are device pages, half statistics.
    fn nth(i: usize) -> Self {
        if i.is_multiple_of(2) {
            Board::Devices
        } else {
            Board::DeviceStats
        }
    }

    fn subscription(self) -> &'static str {
        match self {
            Board::Devices => DEVICES,
            Board::DeviceStats => DEVICE_STATS,
        }
    }

    /// The same document as a query, for the pollers.
    fn query(self) -> String {
        self.subscription().replacen("subscription", "query", 1)
    }
}

/// A user of the run: its id, its token and what the portal knows of its fleet.
struct User {
    id: Uuid,
    token: String,
    /// Held while one of its commands is in flight (one at a time per user, as a portal's
    /// user would, so no command races another on the same device).
    fleet: tokio::sync::Mutex<Vec<(Uuid, bool)>>,
}

/// A command acknowledged and not yet seen on a dashboard.
struct Pending {
    device: Uuid,
    status: &'static str,
    sent: Instant,
    acked: Instant,
}

/// What the dashboards of one user have shown: each device's status in the last answer and
/// when that answer came, and the commands waiting to be seen. A command's status differs
/// from the device's status before it, so the first answer after it showing that status
/// reflects it (but for an answer from the query cache older than the command's previous
/// one on the same device, which would need two commands on one device within the cache's
/// staleness window: rare at these rates).
#[derive(Default)]
struct View {
    seen: HashMap<Uuid, (String, Instant)>,
    pending: Vec<Pending>,
}

/// Ack-to-visible latencies, shared by the command generator and the dashboards.
struct Tracker {
    views: Vec<std::sync::Mutex<View>>,
    latency: std::sync::Mutex<Histogram<u64>>,
}

impl Tracker {
    fn new(users: usize) -> Self {
        Tracker {
            views: (0..users).map(|_| std::sync::Mutex::default()).collect(),
            latency: std::sync::Mutex::new(histogram()),
        }
    }

    fn record(&self, from: Instant, to: Instant) {
        if let Ok(mut latency) = self.latency.lock() {
            latency
                .record(to.saturating_duration_since(from).as_micros().max(1) as u64)
                .ok();
        }
    }

    /// A dashboard of `user` showed `answer` (a `devices` page) at `at`.
    fn observe(&self, user: usize, answer: &Value, at: Instant) {
        let Some(nodes) = answer["devices"]["nodes"].as_array() else {
            return;
        };
        let Some(Ok(mut view)) = self.views.get(user).map(|v| v.lock()) else {
            return;
        };
        for node in nodes {
            let (Some(id), Some(status)) = (
                node["id"].as_str().and_then(|s| s.parse::<Uuid>().ok()),
                node["status"].as_str(),
            ) else {
                continue;
            };
            view.seen.insert(id, (status.to_owned(), at));
        }
        let View { seen, pending } = &mut *view;
        pending.retain(|p| match seen.get(&p.device) {
            // Only devices on this answer (`seen` was just set to it for them).
            Some((status, when)) if status == p.status && *when == at => {
                self.record(p.acked, at);
                false
            }
            _ => true,
        });
    }

    /// A command of `user` was acknowledged: `device` should be shown in `status`.
    fn acked(&self, user: usize, pending: Pending) {
        let Some(Ok(mut view)) = self.views.get(user).map(|v| v.lock()) else {
            return;
        };
        match view.seen.get(&pending.device) {
            // Shown since it was sent (the projector and the answer beat the HTTP
            // acknowledgement home): zero.
            Some((status, since)) if status == pending.status && *since >= pending.sent => {
                self.record(pending.acked, pending.acked);
            }
            _ => view.pending.push(pending),
        }
    }

    /// The latencies so far and the commands never seen, both reset for the next phase.
    fn take(&self) -> (Histogram<u64>, u64) {
        let unseen = self
            .views
            .iter()
            .filter_map(|v| v.lock().ok())
            .map(|mut v| std::mem::take(&mut v.pending).len() as u64)
            .sum();
        let latency = self
            .latency
            .lock()
            .map(|mut l| std::mem::replace(&mut *l, histogram()))
            .unwrap_or_else(|_| histogram());
        (latency, unseen)
    }
}

#[derive(Debug, Default, Serialize)]
struct CommandFigures {
    acked: u64,
    per_second: f64,
    errors: BTreeMap<String, u64>,
    /// Due with `MAX_IN_FLIGHT` commands still running, or every user tried busy.
    shed: u64,
    ack_latency: Option<Latency>,
}

#[derive(Debug, Serialize)]
struct PhaseReport {
    phase: &'static str,
    seconds: f64,
    commands: CommandFigures,
    /// From a command's acknowledgement to the first answer showing it.
    visible_latency: Option<Latency>,
    /// Acknowledged commands no answer showed by `GRACE` after the phase.
    unseen: u64,
    /// Subscription answers pushed, or poll answers received, per second.
    answers_per_second: f64,
    /// Polls not sent on time because the one before had not been answered.
    polls_late: u64,
    answer_errors: u64,
    /// Failed polls by kind (HTTP status, GraphQL error code, transport or timeout).
    answer_error_kinds: BTreeMap<String, u64>,
    /// Of every core of the machine: the roles, PostgreSQL and this generator share them.
    machine_cpu_percent: f64,
    /// The query API's own mean from a batch's change notice to an answer it changed
    /// written (`cloudphone_subscription_push_latency_seconds`): the rest of the visible
    /// latency is the command's way through the projector.
    notice_to_push_mean_ms: Option<f64>,
    /// `cloudphone_subscription_evaluations_total` per second, from the query API's /metrics.
    evaluations_per_second: f64,
    /// Dashboard documents run against the read models per second, by the query API's own
    /// counters: subscription evaluations plus query cache misses (each runs the statements
    /// of one dashboard document; a cache hit runs none).
    read_executions_per_second: f64,
    /// The run's database's committed + rolled back transactions per second
    /// (`pg_stat_database`); read-only statements outside a transaction are one each.
    database_transactions_per_second: f64,
    /// The above less the commands-only phase's: what the dashboards cost. Approximate, and
    /// low when the machine is saturated: the projector then commits fewer, larger batches.
    dashboard_transactions_per_second: f64,
    /// The query API's CPU, of one core (200 % is both of this machine's).
    query_api_cpu_percent: f64,
    query_api_rss_mib: f64,
    /// This generator's CPU, which shares the cores.
    generator_cpu_percent: f64,
}

#[derive(Debug, Serialize)]
struct MemoryReport {
    rss_before_mib: f64,
    rss_after_mib: f64,
    kib_per_subscription: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    subscribers: usize,
    users: usize,
    sockets: usize,
    per_socket: usize,
    rate: u64,
    seconds: u64,
    seed: u64,
    /// Seconds to open every socket and receive every subscription's first answer.
    open_seconds: f64,
    /// Distinct live questions the query API kept (identical subscriptions share one).
    subscription_groups: f64,
    pushes_received: u64,
    memory: MemoryReport,
    phases: Vec<PhaseReport>,
    /// Push over poll: latency p99, dashboard transactions/s, query API CPU.
    ratios: BTreeMap<String, f64>,
}

pub async fn run(args: &LoadSubscriptionsArgs) -> anyhow::Result<()> {
    if args.users == 0 || args.subscribers < args.users || args.per_socket == 0 || args.rate == 0 || args.seconds == 0 {
        bail!("--users, --per-socket, --rate and --seconds must be positive, --subscribers at least --users");
    }
    let per_user = args.subscribers / args.users;
    let per_socket = args.per_socket.min(per_user);
    let sockets_per_user = per_user.div_ceil(per_socket);
    if per_socket > MAX_SUBSCRIPTIONS_PER_SOCKET || sockets_per_user > MAX_SOCKETS_PER_USER {
        bail!(
            "the query API allows {MAX_SUBSCRIPTIONS_PER_SOCKET} subscriptions per socket and {MAX_SOCKETS_PER_USER} sockets per user: raise --users or --per-socket"
        );
    }
    let subscribers = per_user * args.users;
    let sockets = sockets_per_user * args.users;
    // Each socket is a file descriptor here too, and so is each HTTP connection the pollers
    // hold open (as many as polls in flight, at worst one per dashboard).
    let wanted = sockets.max(subscribers) as u64 + 1_024;
    let limit = http_edge::connections::raise_open_files_limit(wanted);
    if limit < sockets as u64 + 1_024 {
        bail!("{sockets} sockets need a file-descriptor limit above {limit} (ulimit -n)");
    }
    println!(
        "load subscriptions: {subscribers} subscriptions over {} users ({sockets} sockets, {per_socket} per socket), {} commands/s, {} s per phase, seed {}",
        args.users, args.rate, args.seconds, args.seed
    );

    let pool = recreate_database(&args.database.database_url, DATABASE, 4).await?;
    let url = database_url_of(&args.database.database_url, DATABASE)?;
    let logs = std::env::temp_dir().join(format!("cloudphone-load-subscriptions-{}", std::process::id()));
    std::fs::create_dir_all(&logs).with_context(|| format!("create {}", logs.display()))?;
    println!("  role logs in {}", logs.display());
    let projector = RoleProcess::start("projector", &url, &logs)?;
    let command = RoleProcess::start("command-api", &url, &logs)?;
    let query = RoleProcess::start("query-api", &url, &logs)?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(16_384)
        .timeout(Duration::from_secs(30))
        .build()?;
    for role in [&projector, &command, &query] {
        role.ready(&client).await?;
    }
    let users = Arc::new(register(&client, &command.base, args.users).await?);
    println!("  {} users registered", users.len());
    let tracker = Arc::new(Tracker::new(users.len()));
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut phases = Vec::new();

    // 1. Commands only: the database's transactions that are not the dashboards'.
    let commands_only = measure(
        args,
        &pool,
        &client,
        &command.base,
        &query,
        &users,
        &tracker,
        &mut rng,
        || 0,
    )
    .await?;
    let calibration = commands_only.transactions / commands_only.seconds.max(1e-9);
    let mut commands_only = report_phase("commands only", commands_only, calibration);
    // No dashboard was open to see them.
    commands_only.unseen = 0;
    phases.push(commands_only);

    // 2. Push: every socket opened and every first answer in before the load starts.
    let rss_before = vm_rss_mib(query.pid()).unwrap_or(0.0);
    let stop = CancellationToken::new();
    let pushes = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let ws_url = format!("{}/graphql", query.base.replacen("http://", "ws://", 1));
    let opened = Instant::now();
    let mut holders = Vec::with_capacity(sockets);
    let mut readies = Vec::with_capacity(sockets);
    let opening = Arc::new(Semaphore::new(OPENING_CONCURRENCY));
    for (index, user) in users.iter().enumerate() {
        for socket in 0..sockets_per_user {
            let boards: Vec<Board> = (socket * per_socket..((socket + 1) * per_socket).min(per_user))
                .map(Board::nth)
                .collect();
            let (ready, readied) = oneshot::channel();
            readies.push(readied);
            let live = Live {
                url: ws_url.clone(),
                token: user.token.clone(),
                user_id: user.id,
                user: index,
                boards,
                tracker: Arc::clone(&tracker),
                pushes: Arc::clone(&pushes),
                failures: Arc::clone(&failures),
                stop: stop.clone(),
            };
            let opening = Arc::clone(&opening);
            holders.push(tokio::spawn(async move { live.hold(opening, ready).await }));
        }
    }
    let deadline = tokio::time::Instant::now() + OPEN_LIMIT;
    for readied in readies {
        match tokio::time::timeout_at(deadline, readied).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => bail!("a subscription socket failed to open: {error:#}"),
            Ok(Err(_)) => bail!("a subscription socket task ended before its first answers"),
            Err(_) => bail!("the sockets were not all open with their first answers in {OPEN_LIMIT:?}"),
        }
    }
    let open_seconds = opened.elapsed().as_secs_f64();
    // Let the first answers' buffers go before reading the resident set.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after = vm_rss_mib(query.pid()).unwrap_or(0.0);
    let groups = metric(&client, &query.base, "cloudphone_subscription_groups").await;
    let memory = MemoryReport {
        rss_before_mib: rss_before,
        rss_after_mib: rss_after,
        kib_per_subscription: (rss_after - rss_before).max(0.0) * 1024.0 / subscribers as f64,
    };
    println!(
        "  {sockets} sockets, {subscribers} subscriptions open with first answers in {open_seconds:.1} s; {groups} groups; query API RSS {rss_before:.0} -> {rss_after:.0} MiB ({:.1} KiB per subscription)",
        memory.kib_per_subscription
    );
    tracker.take();
    let pushed_before = pushes.load(Ordering::Relaxed);
    let push_phase = measure(
        args,
        &pool,
        &client,
        &command.base,
        &query,
        &users,
        &tracker,
        &mut rng,
        || pushes.load(Ordering::Relaxed) - pushed_before,
    )
    .await?;
    let lost = failures.load(Ordering::Relaxed);
    stop.cancel();
    for holder in holders {
        holder.await.context("a subscription socket task panicked")?;
    }
    let mut push_report = report_phase("push (WebSocket)", push_phase, calibration);
    push_report.answer_errors = lost;
    phases.push(push_report);
    let pushes_received = pushes.load(Ordering::Relaxed);

    // 3. Poll: the same dashboards, each asking every interval over HTTP.
    if !args.no_poll {
        let stop = CancellationToken::new();
        let polls = Arc::new(AtomicU64::new(0));
        let late = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
        let interval = Duration::from_millis(args.poll_interval_ms.max(1));
        let mut pollers = Vec::with_capacity(subscribers);
        for (index, user) in users.iter().enumerate() {
            for i in 0..per_user {
                let poller = Poller {
                    client: client.clone(),
                    url: format!("{}/graphql", query.base),
                    token: user.token.clone(),
                    user_id: user.id,
                    user: index,
                    board: Board::nth(i),
                    tracker: Arc::clone(&tracker),
                    polls: Arc::clone(&polls),
                    late: Arc::clone(&late),
                    errors: Arc::clone(&errors),
                    stop: stop.clone(),
                };
                // Spread over the interval, as dashboards opened at different moments are.
                let offset = interval.mul_f64(rng.random_range(0.0..1.0));
                pollers.push(tokio::spawn(poller.run(interval, offset)));
            }
        }
        // One interval for every poller to have asked once.
        tokio::time::sleep(interval).await;
        tracker.take();
        let (polled_before, late_before) = (polls.load(Ordering::Relaxed), late.load(Ordering::Relaxed));
        let poll_phase = measure(
            args,
            &pool,
            &client,
            &command.base,
            &query,
            &users,
            &tracker,
            &mut rng,
            || polls.load(Ordering::Relaxed) - polled_before,
        )
        .await?;
        stop.cancel();
        for poller in pollers {
            poller.await.context("a poller panicked")?;
        }
        let mut poll_report = report_phase("poll (HTTP, every interval)", poll_phase, calibration);
        poll_report.polls_late = late.load(Ordering::Relaxed) - late_before;
        if let Ok(errors) = errors.lock() {
            poll_report.answer_errors = errors.values().sum();
            poll_report.answer_error_kinds = errors.clone();
        }
        phases.push(poll_report);
    }
    for role in [&projector, &command, &query] {
        role.alive()?;
    }

    let mut ratios = BTreeMap::new();
    if let [_, push, poll] = &phases[..] {
        let p99 = |p: &PhaseReport| p.visible_latency.as_ref().map_or(f64::NAN, |l| l.p99_ms);
        ratios.insert("visible_p99_poll_over_push".to_owned(), p99(poll) / p99(push));
        ratios.insert(
            "read_executions_poll_over_push".to_owned(),
            poll.read_executions_per_second / push.read_executions_per_second.max(1e-9),
        );
        ratios.insert(
            "database_transactions_poll_over_push".to_owned(),
            poll.database_transactions_per_second / push.database_transactions_per_second.max(1e-9),
        );
        ratios.insert(
            "query_api_cpu_poll_over_push".to_owned(),
            poll.query_api_cpu_percent / push.query_api_cpu_percent.max(0.1),
        );
    }
    let report = Report {
        subscribers,
        users: users.len(),
        sockets,
        per_socket,
        rate: args.rate,
        seconds: args.seconds,
        seed: args.seed,
        open_seconds,
        subscription_groups: groups,
        pushes_received,
        memory,
        phases,
        ratios,
    };
    print_summary(&report);
    if let Some(path) = &args.json {
        write_json(path, &report)?;
        println!("  report written to {}", path.display());
    }
    pool.close().await;
    Ok(())
}

/// Registers `count` enterprise users (room for `FLEET_CAP` devices each) through the command
/// API, 32 at a time.
async fn register(client: &reqwest::Client, base: &str, count: usize) -> anyhow::Result<Vec<User>> {
    futures::stream::iter(0..count)
        .map(|_| async move {
            let (id, token) = register_user(client, base).await?;
            Ok(User {
                id,
                token,
                fleet: tokio::sync::Mutex::new(Vec::new()),
            })
        })
        .buffered(32)
        .collect::<Vec<anyhow::Result<User>>>()
        .await
        .into_iter()
        .collect()
}

/// One phase's raw figures, before the calibration is subtracted.
struct Measured {
    seconds: f64,
    commands: CommandFigures,
    latency: Histogram<u64>,
    unseen: u64,
    answers: u64,
    evaluations: f64,
    misses: f64,
    transactions: f64,
    query_cpu_seconds: f64,
    own_cpu_seconds: f64,
    query_rss_mib: f64,
    machine_cpu_percent: f64,
    notice_to_push_mean_ms: Option<f64>,
}

/// Runs the commands for `--seconds`, waits `GRACE` for the answers to show them, and reads
/// the counters around it; `answers` counts the dashboards' answers so far.
#[allow(clippy::too_many_arguments)]
async fn measure(
    args: &LoadSubscriptionsArgs,
    pool: &PgPool,
    client: &reqwest::Client,
    command_base: &str,
    query: &RoleProcess,
    users: &Arc<Vec<User>>,
    tracker: &Arc<Tracker>,
    rng: &mut StdRng,
    answers: impl Fn() -> u64,
) -> anyhow::Result<Measured> {
    let evaluations_before = metric(client, &query.base, "cloudphone_subscription_evaluations_total").await;
    let misses_before = metric(client, &query.base, CACHE_MISSES).await;
    let transactions_before = transactions(pool).await?;
    let (cpu_before, own_before) = (cpu_seconds(query.pid()), cpu_seconds(std::process::id()));
    let answers_before = answers();
    let machine_before = machine_ticks();
    let pushed_before = push_latency(client, &query.base).await;
    let started = Instant::now();
    let commands = drive(args, client, command_base, users, tracker, rng.random()).await;
    let seconds = started.elapsed().as_secs_f64();
    let (answers_after, evaluations_after) = (
        answers(),
        metric(client, &query.base, "cloudphone_subscription_evaluations_total").await,
    );
    let (cpu_after, own_after) = (cpu_seconds(query.pid()), cpu_seconds(std::process::id()));
    let misses_after = metric(client, &query.base, CACHE_MISSES).await;
    let query_rss_mib = vm_rss_mib(query.pid()).unwrap_or(0.0);
    let machine_after = machine_ticks();
    let pushed_after = push_latency(client, &query.base).await;
    let machine_cpu_percent = match (machine_before, machine_after) {
        (Some((busy0, all0)), Some((busy1, all1))) if all1 > all0 => {
            (busy1 - busy0) as f64 * 100.0 / (all1 - all0) as f64
        }
        _ => f64::NAN,
    };
    let pushes = pushed_after.1 - pushed_before.1;
    let notice_to_push_mean_ms = (pushes > 0.0).then(|| (pushed_after.0 - pushed_before.0) * 1000.0 / pushes);
    // Backends report their counts about once a second while busy, so the window read is
    // shifted by about as much at both ends, not shortened.
    let transactions_after = transactions(pool).await?;
    // The grace only lets late answers count.
    tokio::time::sleep(GRACE).await;
    let (latency, unseen) = tracker.take();
    let delta = |before: Option<f64>, after: Option<f64>| after.unwrap_or(0.0) - before.unwrap_or(0.0);
    Ok(Measured {
        seconds,
        commands,
        latency,
        unseen,
        answers: answers_after - answers_before,
        evaluations: counter_delta(evaluations_before, evaluations_after),
        misses: counter_delta(misses_before, misses_after),
        transactions: (transactions_after - transactions_before) as f64,
        query_cpu_seconds: delta(cpu_before, cpu_after),
        own_cpu_seconds: delta(own_before, own_after),
        query_rss_mib,
        machine_cpu_percent,
        notice_to_push_mean_ms,
    })
}

/// How far a counter moved; NaN (shown as such, never as a negative rate) when a scrape
/// failed and read 0, as the query API's `/metrics` can under the poll phase's load.
fn counter_delta(before: f64, after: f64) -> f64 {
    if after < before || before.is_nan() || after.is_nan() {
        f64::NAN
    } else {
        after - before
    }
}

/// The sum and count of the query API's notice-to-push latency histogram.
async fn push_latency(client: &reqwest::Client, base: &str) -> (f64, f64) {
    (
        metric(client, base, "cloudphone_subscription_push_latency_seconds_sum").await,
        metric(client, base, "cloudphone_subscription_push_latency_seconds_count").await,
    )
}

/// Busy and all CPU ticks of the machine so far (/proc/stat; idle and iowait are not busy).
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    let all: u64 = ticks.iter().sum();
    let idle = ticks.get(3)? + ticks.get(4).unwrap_or(&0);
    Some((all - idle, all))
}

fn report_phase(phase: &'static str, measured: Measured, calibration: f64) -> PhaseReport {
    let seconds = measured.seconds.max(1e-9);
    let transactions = measured.transactions / seconds;
    PhaseReport {
        phase,
        seconds: measured.seconds,
        commands: measured.commands,
        visible_latency: (!measured.latency.is_empty()).then(|| Latency::of(&measured.latency)),
        unseen: measured.unseen,
        answers_per_second: measured.answers as f64 / seconds,
        polls_late: 0,
        answer_errors: 0,
        answer_error_kinds: BTreeMap::new(),
        machine_cpu_percent: measured.machine_cpu_percent,
        notice_to_push_mean_ms: measured.notice_to_push_mean_ms,
        evaluations_per_second: measured.evaluations / seconds,
        read_executions_per_second: (measured.evaluations + measured.misses) / seconds,
        database_transactions_per_second: transactions,
        dashboard_transactions_per_second: (transactions - calibration).max(0.0),
        query_api_cpu_percent: measured.query_cpu_seconds * 100.0 / seconds,
        query_api_rss_mib: measured.query_rss_mib,
        generator_cpu_percent: measured.own_cpu_seconds * 100.0 / seconds,
    }
}

/// Committed and rolled back transactions of the run's database so far.
async fn transactions(pool: &PgPool) -> anyhow::Result<i64> {
    // A fresh snapshot of the statistics, not the one cached in this session.
    sqlx::query("SELECT pg_stat_clear_snapshot()").execute(pool).await?;
    let count: i64 = sqlx::query_scalar(
        "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(pool)
    .await
    .context("pg_stat_database")?;
    Ok(count)
}

/// Portal commands at `--rate` per second for `--seconds`, open loop: each is due on its
/// schedule whatever the answers' latency, for a random user with no command in flight.
async fn drive(
    args: &LoadSubscriptionsArgs,
    client: &reqwest::Client,
    base: &str,
    users: &Arc<Vec<User>>,
    tracker: &Arc<Tracker>,
    seed: u64,
) -> CommandFigures {
    let mut rng = StdRng::seed_from_u64(seed);
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut tasks = Vec::new();
    let mut shed = 0u64;
    let started = Instant::now();
    let end = Duration::from_secs(args.seconds);
    let mut issued = 0u64;
    let mut ticker = tokio::time::interval(Duration::from_millis(5));
    while started.elapsed() < end {
        ticker.tick().await;
        let due = (started.elapsed().min(end).as_secs_f64() * args.rate as f64) as u64;
        while issued < due {
            issued += 1;
            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                shed += 1;
                continue;
            };
            // A user with no command in flight: a few tries, then the command is shed.
            let chosen = (0..4)
                .map(|_| rng.random_range(0..users.len()))
                .find(|&i| users[i].fleet.try_lock().is_ok());
            let Some(index) = chosen else {
                shed += 1;
                continue;
            };
            let (client, base, users, tracker) =
                (client.clone(), base.to_owned(), Arc::clone(users), Arc::clone(tracker));
            let roll = rng.random_range(0..100u32);
            let pick = rng.random_range(0..FLEET_CAP);
            tasks.push(tokio::spawn(async move {
                let _slot = slot;
                command(&client, &base, &users, index, &tracker, roll, pick).await
            }));
        }
    }
    let mut figures = CommandFigures {
        shed,
        ..CommandFigures::default()
    };
    let mut acks = histogram();
    for task in tasks {
        match task.await {
            Ok(Ok(micros)) => {
                acks.record(micros).ok();
            }
            Ok(Err(error)) => *figures.errors.entry(error).or_insert(0) += 1,
            Err(_) => *figures.errors.entry("panicked".to_owned()).or_insert(0) += 1,
        }
    }
    figures.acked = acks.len();
    figures.per_second = acks.len() as f64 / started.elapsed().as_secs_f64().max(1e-9);
    figures.ack_latency = (!acks.is_empty()).then(|| Latency::of(&acks));
    figures
}

/// One portal command for user `index`: a create while its fleet is small (and sometimes
/// until `FLEET_CAP`), else a start or stop of one of its devices. Returns the microseconds
/// to its acknowledgement, or what went wrong.
async fn command(
    client: &reqwest::Client,
    base: &str,
    users: &[User],
    index: usize,
    tracker: &Tracker,
    roll: u32,
    pick: usize,
) -> Result<u64, String> {
    let user = users.get(index).ok_or("no such user")?;
    // Another command of this user may have taken the fleet since it was chosen: wait.
    let mut fleet = user.fleet.lock().await;
    let create = fleet.len() < 2 || (fleet.len() < FLEET_CAP && roll < 20);
    let (request, target) = if create {
        let body = json!({"provider": "aws", "cpu_cores": 2, "memory_mb": 2048, "android_version": 14});
        (client.post(format!("{base}/v1/devices")).json(&body), None)
    } else {
        let at = pick % fleet.len();
        let (id, running) = fleet[at];
        let verb = if running { "stop" } else { "start" };
        (client.post(format!("{base}/v1/devices/{id}/{verb}")), Some(at))
    };
    let sent = Instant::now();
    let response = request
        .bearer_auth(&user.token)
        .send()
        .await
        .map_err(|e| if e.is_timeout() { "timeout" } else { "transport" }.to_owned())?;
    let acked = Instant::now();
    let status = response.status();
    let body: Value = response.json().await.unwrap_or_default();
    if !status.is_success() {
        return Err(format!("{} {}", status.as_u16(), body["code"].as_str().unwrap_or("?")));
    }
    let (device, shown) = match target {
        None => {
            let id = body["id"]
                .as_str()
                .and_then(|s| s.parse::<Uuid>().ok())
                .ok_or("a create answered without an id")?;
            fleet.push((id, false));
            (id, "STOPPED")
        }
        Some(at) => {
            let device = &mut fleet[at];
            device.1 = !device.1;
            (device.0, if device.1 { "RUNNING" } else { "STOPPED" })
        }
    };
    tracker.acked(
        index,
        Pending {
            device,
            status: shown,
            sent,
            acked,
        },
    );
    Ok(acked.duration_since(sent).as_micros() as u64)
}

/// One subscription socket of a user, its subscriptions and what it counts.
struct Live {
    url: String,
    token: String,
    user_id: Uuid,
    user: usize,
    boards: Vec<Board>,
    tracker: Arc<Tracker>,
    pushes: Arc<AtomicU64>,
    failures: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl Live {
    /// Opens the socket (`opening` bounds how many open at once), subscribes, reports on
    /// `ready` once every subscription has its first answer, then reads pushes until stopped.
    async fn hold(self, opening: Arc<Semaphore>, ready: oneshot::Sender<anyhow::Result<()>>) {
        let permit = opening.acquire_owned().await;
        let mut socket = match self.open().await {
            Ok(socket) => socket,
            Err(error) => {
                let _ = ready.send(Err(error));
                return;
            }
        };
        drop(permit);
        let mut ready = Some(ready);
        let mut waiting_first: usize = self.boards.len();
        let mut answered = vec![false; self.boards.len()];
        loop {
            let frame = tokio::select! {
                () = self.stop.cancelled() => break,
                frame = socket.next() => frame,
            };
            let text = match frame {
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                    self.failures.fetch_add(1, Ordering::Relaxed);
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(Err(anyhow::anyhow!("the socket closed before its first answers")));
                    }
                    return;
                }
                Some(Ok(_)) => continue,
            };
            let at = Instant::now();
            let Ok(message) = serde_json::from_str::<Value>(text.as_str()) else {
                self.failures.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            match message["type"].as_str() {
                Some("ping") => {
                    let _ = socket.send(Message::text(json!({"type": "pong"}).to_string())).await;
                }
                Some("next") => {
                    self.pushes.fetch_add(1, Ordering::Relaxed);
                    let slot = message["id"].as_str().and_then(|id| id.parse::<usize>().ok());
                    let Some(slot) = slot.filter(|s| *s < self.boards.len()) else {
                        continue;
                    };
                    if self.boards[slot] == Board::Devices {
                        self.tracker.observe(self.user, &message["payload"]["data"], at);
                    }
                    if !answered[slot] {
                        answered[slot] = true;
                        waiting_first -= 1;
                        if waiting_first == 0
                            && let Some(ready) = ready.take()
                        {
                            let _ = ready.send(Ok(()));
                        }
                    }
                }
                Some("error") | Some("complete") => {
                    self.failures.fetch_add(1, Ordering::Relaxed);
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(Err(anyhow::anyhow!("a subscription ended: {message}")));
                    }
                }
                _ => {}
            }
        }
        let _ = socket.close(None).await;
    }

    /// A `graphql-transport-ws` socket, signed in, with every subscription sent.
    async fn open(
        &self,
    ) -> anyhow::Result<tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>>
    {
        let mut request = self.url.as_str().into_client_request()?;
        request.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_static("graphql-transport-ws"),
        );
        let (mut socket, _) = tokio_tungstenite::connect_async(request)
            .await
            .context("open the socket")?;
        let init = json!({"type": "connection_init", "payload": {"authorization": format!("Bearer {}", self.token)}});
        socket.send(Message::text(init.to_string())).await?;
        let ack = tokio::time::timeout(Duration::from_secs(30), socket.next())
            .await
            .context("no connection_ack in 30 s")?;
        match ack {
            Some(Ok(Message::Text(text))) if text.as_str().contains("connection_ack") => {}
            other => bail!("not acknowledged: {other:?}"),
        }
        for (slot, board) in self.boards.iter().enumerate() {
            let subscribe = json!({"id": slot.to_string(), "type": "subscribe", "payload": {
                "query": board.subscription(), "variables": {"userId": self.user_id}}});
            socket.send(Message::text(subscribe.to_string())).await?;
        }
        Ok(socket)
    }
}

/// One dashboard polling over HTTP, as dashboards do today.
struct Poller {
    client: reqwest::Client,
    url: String,
    token: String,
    user_id: Uuid,
    user: usize,
    board: Board,
    tracker: Arc<Tracker>,
    polls: Arc<AtomicU64>,
    late: Arc<AtomicU64>,
    errors: Arc<std::sync::Mutex<BTreeMap<String, u64>>>,
    stop: CancellationToken,
}

impl Poller {
    fn failed(&self, kind: &str) {
        if let Ok(mut errors) = self.errors.lock() {
            *errors.entry(kind.to_owned()).or_insert(0) += 1;
        }
    }

    /// Asks every `interval` from `offset` on; a poll due while the last is unanswered is
    /// skipped (and counted late), as a browser's timer after a slow fetch would.
    async fn run(self, interval: Duration, offset: Duration) {
        let body = json!({"query": self.board.query(), "variables": {"userId": self.user_id}});
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + offset, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut last = tokio::time::Instant::now();
        loop {
            let tick = tokio::select! {
                () = self.stop.cancelled() => return,
                tick = ticker.tick() => tick,
            };
            let skipped = (tick.saturating_duration_since(last).as_secs_f64() / interval.as_secs_f64()) as u64;
            if skipped > 1 {
                self.late.fetch_add(skipped - 1, Ordering::Relaxed);
            }
            last = tick;
            let answer = self
                .client
                .post(&self.url)
                .bearer_auth(&self.token)
                .json(&body)
                .send()
                .await;
            let at = Instant::now();
            let answer = match answer {
                Ok(answer) => answer,
                Err(error) => {
                    self.failed(if error.is_timeout() { "timeout" } else { "transport" });
                    continue;
                }
            };
            let status = answer.status();
            let data: Value = answer.json().await.unwrap_or_default();
            if !status.is_success() {
                self.failed(&format!("HTTP {}", status.as_u16()));
                continue;
            }
            if let Some(error) = data["errors"].get(0) {
                self.failed(&format!(
                    "GraphQL {}",
                    error["extensions"]["code"].as_str().unwrap_or("?")
                ));
                continue;
            }
            self.polls.fetch_add(1, Ordering::Relaxed);
            if self.board == Board::Devices {
                self.tracker.observe(self.user, &data["data"], at);
            }
        }
    }
}

fn print_summary(report: &Report) {
    println!();
    println!(
        "  {:<28} {:>9} {:>9} {:>9} {:>7} {:>10} {:>8} {:>8} {:>8} {:>9} {:>8}",
        "phase",
        "vis p50",
        "vis p99",
        "vis p999",
        "unseen",
        "answers/s",
        "evals/s",
        "execs/s",
        "db tx/s",
        "dash tx/s",
        "qapi CPU"
    );
    for phase in &report.phases {
        let (p50, p99, p999) = phase
            .visible_latency
            .as_ref()
            .map_or((f64::NAN, f64::NAN, f64::NAN), |l| (l.p50_ms, l.p99_ms, l.p999_ms));
        println!(
            "  {:<28} {:>7.1}ms {:>7.1}ms {:>7.1}ms {:>7} {:>10.0} {:>8.0} {:>8.0} {:>8.0} {:>9.0} {:>7.0}%",
            phase.phase,
            p50,
            p99,
            p999,
            phase.unseen,
            phase.answers_per_second,
            phase.evaluations_per_second,
            phase.read_executions_per_second,
            phase.database_transactions_per_second,
            phase.dashboard_transactions_per_second,
            phase.query_api_cpu_percent
        );
        println!(
            "      commands: {} acked ({:.0}/s), shed {}, errors {:?}; ack p99 {:.1} ms; generator CPU {:.0} %; query API RSS {:.0} MiB; answer errors {}, polls late {}",
            phase.commands.acked,
            phase.commands.per_second,
            phase.commands.shed,
            phase.commands.errors,
            phase.commands.ack_latency.as_ref().map_or(f64::NAN, |l| l.p99_ms),
            phase.generator_cpu_percent,
            phase.query_api_rss_mib,
            phase.answer_errors,
            phase.polls_late
        );
        println!(
            "      machine CPU {:.0} % of all cores; query API notice-to-push mean {:.1} ms; answer errors by kind {:?}",
            phase.machine_cpu_percent,
            phase.notice_to_push_mean_ms.unwrap_or(f64::NAN),
            phase.answer_error_kinds
        );
    }
    println!(
        "  memory: query API RSS {:.0} -> {:.0} MiB with {} subscriptions: {:.1} KiB per subscription; {} pushes received in all",
        report.memory.rss_before_mib,
        report.memory.rss_after_mib,
        report.subscribers,
        report.memory.kib_per_subscription,
        report.pushes_received
    );
    for (name, ratio) in &report.ratios {
        println!("  {name}: {ratio:.1}x");
    }
}
