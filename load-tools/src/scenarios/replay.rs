//! `cloudphone load replay`: how fast a replay rebuilds each projection from the whole log,
//! what it does to live append latency with and without its throttle and replica, against
//! the roadmap's design — the read models as materialized views over the log, rebuilt with
//! `REFRESH MATERIALIZED VIEW` — in the same run, on the same data.
//!
//! Phases, in one fresh database `cloudphone_load_replay`:
//! 1. history: `--events` events of device lifecycles over six months (bulk appends);
//! 2. first build: both projections replayed at version 1 from an empty live version (no
//!    other load, in this process), which also gives the live projectors their starting point;
//! 3. for each mode, old then new: `--rate` single-event appends per second for `--duration`
//!    seconds with the embedded projectors following (quiet), then the same stream while
//!    `fleet` (v1 again) and `daily_usage` (v2) are replayed by `cloudphone replay` child
//!    processes, as an operator runs them. The old mode is unthrottled and reads the primary
//!    (what replays did before issue #24); the new mode is the binary's defaults (throttled),
//!    reading `--replica-url` when given;
//! 4. baseline (unless `--skip-views`): the equivalent views (as in `load projections`) are
//!    created, then each is rebuilt with `REFRESH MATERIALIZED VIEW` and timed.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use event_log::{AppendBatch, EventStore, ExpectedVersion, LogReader, NewEvent, StoreConfig, StreamAppend};
use event_schema::{DeviceCreated, Event, EventMetadata, Provider, StreamType};
use hdrhistogram::Histogram;
use operator_console::BarObserver;
use projections::replay::{self, ReplayConfig, ReplaySummary};
use projections::runner::{ProjectorConfig, spawn_log_projectors};
use read_models::Projection;
use serde::Serialize;
use sqlx::{Executor, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::cli::LoadReplayArgs;
use crate::harness::databases::{database_url_of, recreate_database, settle_database, wait_for_replicas};
use crate::harness::report::{Latency, histogram, write_json};
use crate::harness::views::VIEWS;
use crate::world::history::write_history;

const DATABASE: &str = "cloudphone_load_replay";
/// Concurrent writers of the steady stream.
const WRITERS: u64 = 4;

#[derive(Debug, Serialize)]
struct ReplayFigures {
    projection: &'static str,
    version: i32,
    /// Log positions the bulk phase folded per second.
    bulk_events_per_second: f64,
    bulk_seconds: f64,
    /// Tables, keys and indexes written from the fold.
    finish_seconds: f64,
    tail_events: i64,
    swap_ms: f64,
    /// History positions over the whole replay (bulk, finish, tail and swap).
    overall_events_per_second: f64,
    total_seconds: f64,
}

impl ReplayFigures {
    fn of(summary: &ReplaySummary, history: i64) -> Self {
        ReplayFigures {
            projection: summary.projection.name(),
            version: summary.version,
            bulk_events_per_second: summary.bulk_positions as f64 / summary.bulk_seconds.max(1e-9),
            bulk_seconds: summary.bulk_seconds,
            finish_seconds: summary.finish_seconds,
            tail_events: summary.tail_events,
            swap_ms: summary.swap_seconds * 1000.0,
            overall_events_per_second: history as f64 / summary.total_seconds.max(1e-9),
            total_seconds: summary.total_seconds,
        }
    }
}

#[derive(Debug, Serialize)]
struct ViewFigures {
    view: &'static str,
    /// `REFRESH MATERIALIZED VIEW`: readers of the view wait until it ends.
    refresh_seconds: f64,
    events_per_second: f64,
    /// `REFRESH MATERIALIZED VIEW CONCURRENTLY`: the design's zero-downtime rebuild.
    concurrent_refresh_seconds: f64,
}

/// One `cloudphone replay` child process under load.
#[derive(Debug, Serialize)]
struct ChildReplay {
    /// When it ended (not reported): where its phases were, for the appends' latency by phase.
    #[serde(skip)]
    ended: Instant,
    projection: &'static str,
    version: i32,
    /// Where the bulk phase read the history (`primary` or `replica`).
    history: String,
    /// The child's wall time: start, waiting for the replica, bulk, finish, tail, swap.
    wall_seconds: f64,
    bulk_seconds: f64,
    finish_seconds: f64,
    tail_events: i64,
    swap_ms: f64,
    total_seconds: f64,
}

/// What the `--json` summary of `cloudphone replay` holds that this report uses.
#[derive(Debug, serde::Deserialize)]
struct ChildSummary {
    history: String,
    bulk_seconds: f64,
    finish_seconds: f64,
    tail_events: i64,
    swap_seconds: f64,
    total_seconds: f64,
}

/// How the replays of one mode run, and what the appends saw.
#[derive(Debug, Serialize)]
struct ModeFigures {
    mode: &'static str,
    /// The `cloudphone replay` arguments of this mode beyond the projection and version.
    replay_args: Vec<String>,
    /// Appends just before this mode's replays, with nothing else running.
    appends_quiet: Latency,
    appends_during_replays: Latency,
    /// During / quiet, at each quantile.
    p50_ratio: f64,
    p99_ratio: f64,
    p999_ratio: f64,
    /// The appends during the replays by the phase the replays were in: reading and folding
    /// the history (`bulk`), writing the tables, keys and indexes (`finish`), and the rest
    /// (starting, waiting for the replica, tail and swap).
    appends_by_phase: Vec<PhaseLatency>,
    replays: Vec<ChildReplay>,
    /// Both replays' wall time.
    replay_seconds: f64,
}

/// The appends made while the replays were in one phase, against the quiet appends.
#[derive(Debug, Serialize)]
struct PhaseLatency {
    phase: &'static str,
    appends: Latency,
    p99_ratio: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    events: i64,
    seed: u64,
    first_build: Vec<ReplayFigures>,
    /// The replays as `cloudphone replay` processes beside live appends: unthrottled from the
    /// primary (the old behaviour), then with this binary's defaults (throttled) and the
    /// replica when one is given.
    modes: Vec<ModeFigures>,
    /// The new mode's replays' wall time over the old mode's.
    new_over_old_replay_seconds: f64,
    views: Vec<ViewFigures>,
    /// Both projections replayed (old mode, under load) against both views refreshed.
    replay_vs_refresh: f64,
    append_rate: u64,
}

/// The replays each mode runs, in order.
const REPLAYS: [(Projection, i32); 2] = [(Projection::Fleet, 1), (Projection::DailyUsage, 2)];

pub async fn run(args: &LoadReplayArgs) -> anyhow::Result<()> {
    let pool = recreate_database(&args.database.database_url, DATABASE, 32).await?;
    read_models::migrate(&pool).await.context("read model migrations")?;
    write_history(&pool, args.events, args.seed).await?;
    settle_database(&pool).await?;
    let history = LogReader::new(pool.clone()).head().await?.position;
    eprintln!("history: {history} events");
    let config = ReplayConfig::default();

    let mut first_build = Vec::new();
    for projection in Projection::ALL {
        let summary = run_replay(&pool, projection, 1, config).await?;
        first_build.push(ReplayFigures::of(&summary, history));
    }
    settle_database(&pool).await?;
    wait_for_replicas(&pool).await;

    let url = database_url_of(&args.database.database_url, DATABASE)?;
    let old_args: Vec<String> = [
        "--max-events-per-second=0",
        "--max-write-mib-per-second=0",
        "--index-workers=2",
    ]
    .map(String::from)
    .to_vec();
    let mut new_args: Vec<String> = Vec::new();
    if let Some(replica) = &args.replica_url {
        new_args.push(format!("--history-url={}", database_url_of(replica, DATABASE)?));
    }
    new_args.extend(args.new_mode_arg.iter().cloned());

    let store = Arc::new(EventStore::open(pool.clone(), StoreConfig::default()).await?);
    let stop_projectors = CancellationToken::new();
    let projectors = spawn_log_projectors(&pool, ProjectorConfig::default(), &stop_projectors);
    let mut modes = Vec::new();
    for (mode, replay_args) in [("old", old_args), ("new", new_args)] {
        eprintln!("{mode} mode: quiet appends for {} s", args.duration);
        let ((), quiet) = appends_while(&store, args.rate, async {
            tokio::time::sleep(Duration::from_secs(args.duration)).await;
            Ok(())
        })
        .await?;
        eprintln!("{mode} mode: replays ({})", replay_args.join(" "));
        let (replays, during) = appends_while(&store, args.rate, async {
            let mut replays = Vec::new();
            for (projection, version) in REPLAYS {
                replays.push(child_replay(&url, projection, version, &replay_args).await?);
            }
            Ok(replays)
        })
        .await?;
        let phases = by_phase(&during, &replays);
        let (quiet, during) = (Latency::of(&quiet.all()), Latency::of(&during.all()));
        let ratio = |during: f64, quiet: f64| during / quiet.max(1e-9);
        let appends_by_phase = phases
            .iter()
            .map(|(phase, appends)| {
                let appends = Latency::of(appends);
                PhaseLatency {
                    phase,
                    p99_ratio: ratio(appends.p99_ms, quiet.p99_ms),
                    appends,
                }
            })
            .collect();
        modes.push(ModeFigures {
            mode,
            replay_args,
            p50_ratio: ratio(during.p50_ms, quiet.p50_ms),
            p99_ratio: ratio(during.p99_ms, quiet.p99_ms),
            p999_ratio: ratio(during.p999_ms, quiet.p999_ms),
            appends_by_phase,
            appends_quiet: quiet,
            appends_during_replays: during,
            replay_seconds: replays.iter().map(|r| r.wall_seconds).sum(),
            replays,
        });
    }
    stop_projectors.cancel();
    for task in projectors {
        let _ = task.await;
    }
    if let Ok(store) = Arc::try_unwrap(store) {
        store.shutdown().await;
    }

    let views = if args.skip_views {
        Vec::new()
    } else {
        refresh_views(&pool, history).await?
    };
    let old_seconds = modes.first().map_or(0.0, |m| m.replay_seconds);
    let new_seconds = modes.last().map_or(0.0, |m| m.replay_seconds);
    let refresh_seconds: f64 = views.iter().map(|v| v.refresh_seconds).sum();
    let report = Report {
        events: history,
        seed: args.seed,
        first_build,
        modes,
        new_over_old_replay_seconds: new_seconds / old_seconds.max(1e-9),
        views,
        replay_vs_refresh: refresh_seconds / old_seconds.max(1e-9),
        append_rate: args.rate,
    };
    print(&report);
    if let Some(path) = &args.json {
        write_json(path, &report)?;
    }
    Ok(())
}

/// `cloudphone replay <projection> --version <version> --keep-old 0 --json`, as an operator
/// runs it: a process of its own beside the appends, with `extra` arguments.
async fn child_replay(
    url: &str,
    projection: Projection,
    version: i32,
    extra: &[String],
) -> anyhow::Result<ChildReplay> {
    let exe = std::env::current_exe().context("the path of this binary")?;
    let started = Instant::now();
    let output = tokio::process::Command::new(exe)
        .args(["--log", "warn", "replay", projection.name().replace('_', "-").as_str()])
        .args(["--version", &version.to_string(), "--keep-old", "0", "--json"])
        .args(extra)
        .env("CLOUDPHONE_DATABASE_URL", url)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .output()
        .await
        .context("run cloudphone replay")?;
    let ended = Instant::now();
    let wall_seconds = ended.duration_since(started).as_secs_f64();
    anyhow::ensure!(
        output.status.success(),
        "cloudphone replay {} --version {version} {} failed ({})",
        projection.name(),
        extra.join(" "),
        output.status
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let summary: ChildSummary = stdout
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str(line).ok())
        .with_context(|| format!("no JSON summary from cloudphone replay: {stdout}"))?;
    Ok(ChildReplay {
        ended,
        projection: projection.name(),
        version,
        history: summary.history,
        wall_seconds,
        bulk_seconds: summary.bulk_seconds,
        finish_seconds: summary.finish_seconds,
        tail_events: summary.tail_events,
        swap_ms: summary.swap_seconds * 1000.0,
        total_seconds: summary.total_seconds,
    })
}

/// The phases of a replay that `by_phase` splits the appends by: the windows of
/// [`ChildReplay`]'s bulk and finish, in that order, then [`OUTSIDE_THE_WINDOWS`].
const PHASES: [&str; 3] = ["bulk", "finish", "other"];

/// Where in [`PHASES`] an append made outside every replay's bulk and finish windows goes.
const OUTSIDE_THE_WINDOWS: usize = 2;

/// The appends' latency in each of [`PHASES`], from where each replay's phases were: a
/// replay's bulk and finish phases end `total - bulk - finish` seconds (its tail and swap)
/// before the process did.
fn by_phase(appends: &Appends, replays: &[ChildReplay]) -> Vec<(&'static str, Histogram<u64>)> {
    let windows: Vec<[(Instant, Instant); 2]> = replays
        .iter()
        .map(|r| {
            let before = |at: Instant, s: f64| at.checked_sub(Duration::from_secs_f64(s.max(0.0))).unwrap_or(at);
            let finish_ended = before(r.ended, r.total_seconds - r.bulk_seconds - r.finish_seconds);
            let bulk_ended = before(finish_ended, r.finish_seconds);
            [
                (before(bulk_ended, r.bulk_seconds), bulk_ended),
                (bulk_ended, finish_ended),
            ]
        })
        .collect();
    let mut phases = PHASES.map(|phase| (phase, histogram()));
    for &(at, micros) in &appends.samples {
        let phase = windows
            .iter()
            .find_map(|w| w.iter().position(|(from, to)| (*from..*to).contains(&at)))
            .unwrap_or(OUTSIDE_THE_WINDOWS);
        phases[phase].1.saturating_record(micros);
    }
    phases.into_iter().collect()
}

/// Each acknowledged append: when it started and its latency in microseconds.
#[derive(Debug, Default)]
struct Appends {
    samples: Vec<(Instant, u64)>,
}

impl Appends {
    fn all(&self) -> Histogram<u64> {
        let mut all = histogram();
        for &(_, micros) in &self.samples {
            all.saturating_record(micros);
        }
        all
    }
}

/// Runs `work` while the append stream runs at `rate`; its result and the appends.
async fn appends_while<T>(
    store: &Arc<EventStore>,
    rate: u64,
    work: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(T, Appends)> {
    let stop = CancellationToken::new();
    let stream = tokio::spawn(append_stream(Arc::clone(store), rate, stop.clone()));
    let outcome = work.await;
    stop.cancel();
    let latencies = stream.await??;
    Ok((outcome?, latencies))
}

async fn run_replay(
    pool: &PgPool,
    projection: Projection,
    version: i32,
    config: ReplayConfig,
) -> anyhow::Result<ReplaySummary> {
    let observer = BarObserver::default();
    let summary = replay::replay(
        pool,
        projection,
        Some(version),
        config,
        &observer,
        &CancellationToken::new(),
    )
    .await;
    observer.finish();
    let summary = summary.with_context(|| format!("replay of {} v{version}", projection.name()))?;
    replay::drop_replaced(pool, Some(projection), 0).await?;
    Ok(summary)
}

/// Single-event appends (a portal creating a device) at `rate` per second over `WRITERS`
/// writers until `stop`; returns each acknowledged append.
async fn append_stream(store: Arc<EventStore>, rate: u64, stop: CancellationToken) -> anyhow::Result<Appends> {
    let mut tasks = tokio::task::JoinSet::new();
    let writers = WRITERS.min(rate.max(1));
    let period = Duration::from_secs_f64(writers as f64 / rate.max(1) as f64);
    for _ in 0..writers {
        let (store, stop) = (Arc::clone(&store), stop.clone());
        tasks.spawn(async move {
            let mut samples = Vec::new();
            let owner = Uuid::now_v7();
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let device = Uuid::now_v7();
                let now = Utc::now();
                let created: Event = DeviceCreated {
                    device_id: device,
                    owner_id: owner,
                    provider: Provider::Gcp,
                    cpu_cores: 2,
                    memory_mb: 2048,
                    android_version: 14,
                    created_at: now,
                }
                .into();
                let batch = AppendBatch::single(StreamAppend {
                    stream_id: device,
                    stream_type: StreamType::Device,
                    owner_id: owner,
                    expected: ExpectedVersion::NoStream,
                    events: vec![NewEvent::from_event(&created, EventMetadata::default(), now)?],
                });
                let started = Instant::now();
                store.append(batch).await?;
                let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                samples.push((started, micros.max(1)));
            }
            anyhow::Ok(samples)
        });
    }
    let mut all = Appends::default();
    while let Some(done) = tasks.join_next().await {
        all.samples.extend(done??);
    }
    Ok(all)
}

/// Creates the views, then rebuilds each with `REFRESH MATERIALIZED VIEW`, timed.
async fn refresh_views(pool: &PgPool, history: i64) -> anyhow::Result<Vec<ViewFigures>> {
    eprintln!("baseline: creating the materialized views");
    pool.execute(VIEWS).await.context("create the baseline's views")?;
    let mut figures = Vec::new();
    for view in ["mv_device_stats", "mv_daily_usage"] {
        eprintln!("baseline: REFRESH MATERIALIZED VIEW {view}");
        let started = Instant::now();
        pool.execute(sqlx::AssertSqlSafe(format!("REFRESH MATERIALIZED VIEW {view}")))
            .await
            .with_context(|| format!("refresh {view}"))?;
        let seconds = started.elapsed().as_secs_f64();
        eprintln!("baseline: REFRESH MATERIALIZED VIEW CONCURRENTLY {view}");
        let started = Instant::now();
        pool.execute(sqlx::AssertSqlSafe(format!(
            "REFRESH MATERIALIZED VIEW CONCURRENTLY {view}"
        )))
        .await
        .with_context(|| format!("refresh {view} concurrently"))?;
        figures.push(ViewFigures {
            view,
            refresh_seconds: seconds,
            events_per_second: history as f64 / seconds,
            concurrent_refresh_seconds: started.elapsed().as_secs_f64(),
        });
    }
    Ok(figures)
}

fn print(report: &Report) {
    println!("\nreplay over {} events (seed {})", report.events, report.seed);
    println!(
        "{:<34} {:>3} {:>14} {:>9} {:>9} {:>8} {:>9} {:>14}",
        "replay", "v", "bulk events/s", "bulk s", "finish s", "tail", "swap ms", "overall ev/s"
    );
    for f in &report.first_build {
        println!(
            "{:<34} {:>3} {:>14.0} {:>9.1} {:>9.1} {:>8} {:>9.1} {:>14.0}",
            format!("{} (first build)", f.projection),
            f.version,
            f.bulk_events_per_second,
            f.bulk_seconds,
            f.finish_seconds,
            f.tail_events,
            f.swap_ms,
            f.overall_events_per_second
        );
    }
    for v in &report.views {
        println!(
            "{:<34} {:>3} {:>14.0} {:>9.1}   (REFRESH MATERIALIZED VIEW; CONCURRENTLY: {:.1} s)",
            v.view, "", v.events_per_second, v.refresh_seconds, v.concurrent_refresh_seconds
        );
    }
    if !report.views.is_empty() {
        println!(
            "refresh time of both views / replay time of both projections (old mode, under load) = {:.2}",
            report.replay_vs_refresh
        );
    }
    println!(
        "\nreplays beside {} single-event appends/s, as `cloudphone replay` processes:",
        report.append_rate
    );
    for mode in &report.modes {
        println!(
            "{} mode: cloudphone replay ... {}",
            mode.mode,
            mode.replay_args.join(" ")
        );
        for r in &mode.replays {
            println!(
                "  {:<12} v{} from the {:<7} wall {:>7.1} s (bulk {:.1} s, finish {:.1} s, tail {} events, swap {:.0} ms)",
                r.projection,
                r.version,
                r.history,
                r.wall_seconds,
                r.bulk_seconds,
                r.finish_seconds,
                r.tail_events,
                r.swap_ms
            );
        }
        let (q, d) = (&mode.appends_quiet, &mode.appends_during_replays);
        println!(
            "  appends quiet  p50 {:.2} ms p99 {:.2} ms p999 {:.2} ms ({} appends)",
            q.p50_ms, q.p99_ms, q.p999_ms, q.count
        );
        println!(
            "  appends during p50 {:.2} ms p99 {:.2} ms p999 {:.2} ms ({} appends): during/quiet p50 {:.2}x p99 {:.2}x p999 {:.2}x",
            d.p50_ms, d.p99_ms, d.p999_ms, d.count, mode.p50_ratio, mode.p99_ratio, mode.p999_ratio
        );
        for phase in &mode.appends_by_phase {
            let a = &phase.appends;
            println!(
                "    while {:<6} p50 {:.2} ms p99 {:.2} ms p999 {:.2} ms ({} appends): p99 {:.2}x quiet",
                phase.phase, a.p50_ms, a.p99_ms, a.p999_ms, a.count, phase.p99_ratio
            );
        }
    }
    println!(
        "new mode's replays take {:.2}x the old mode's wall time",
        report.new_over_old_replay_seconds
    );
}
