//! `cloudphone load replay`: how fast a replay rebuilds each projection from the whole log,
//! what it does to live append latency, against the roadmap's design — the read models as
//! materialized views over the log, rebuilt with `REFRESH MATERIALIZED VIEW` — in the same
//! run, on the same data.
//!
//! Phases, in one fresh database `cloudphone_load_replay`:
//! 1. history: `--events` events of device lifecycles over six months (bulk appends);
//! 2. first build: both projections replayed at version 1 from an empty live version (no
//!    other load), which also gives the live projectors their starting point;
//! 3. quiet: the embedded projectors follow the log while `--rate` single-event appends per
//!    second are made for `--duration` seconds (append latency with no replay);
//! 4. replays under load: `fleet` (v1 again) and `daily_usage` v1 -> v2, while the same
//!    stream runs (append latency during replays);
//! 5. baseline: the equivalent views (as in `load projections`) are created, then each is
//!    rebuilt with `REFRESH MATERIALIZED VIEW` and timed.

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
use crate::harness::databases::{recreate_database, settle_database};
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

#[derive(Debug, Serialize)]
struct Report {
    events: i64,
    seed: u64,
    first_build: Vec<ReplayFigures>,
    under_load: Vec<ReplayFigures>,
    views: Vec<ViewFigures>,
    /// Both projections replayed (under load) against both views refreshed, events/s.
    replay_vs_refresh: f64,
    appends_quiet: Latency,
    appends_during_replay: Latency,
    append_rate: u64,
}

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

    let store = Arc::new(EventStore::open(pool.clone(), StoreConfig::default()).await?);
    let stop_projectors = CancellationToken::new();
    let projectors = spawn_log_projectors(&pool, ProjectorConfig::default(), &stop_projectors);
    let quiet = {
        let stop = CancellationToken::new();
        let stream = tokio::spawn(append_stream(Arc::clone(&store), args.rate, stop.clone()));
        tokio::time::sleep(Duration::from_secs(args.duration)).await;
        stop.cancel();
        stream.await??
    };
    let (under_load, during) = {
        let stop = CancellationToken::new();
        let stream = tokio::spawn(append_stream(Arc::clone(&store), args.rate, stop.clone()));
        let mut figures = Vec::new();
        for (projection, version) in [(Projection::Fleet, 1), (Projection::DailyUsage, 2)] {
            let summary = run_replay(&pool, projection, version, config).await?;
            figures.push(ReplayFigures::of(&summary, history));
        }
        stop.cancel();
        (figures, stream.await??)
    };
    stop_projectors.cancel();
    for task in projectors {
        let _ = task.await;
    }
    if let Ok(store) = Arc::try_unwrap(store) {
        store.shutdown().await;
    }

    let views = refresh_views(&pool, history).await?;
    let replay_seconds: f64 = under_load.iter().map(|f| f.total_seconds).sum();
    let refresh_seconds: f64 = views.iter().map(|v| v.refresh_seconds).sum();
    let report = Report {
        events: history,
        seed: args.seed,
        first_build,
        under_load,
        views,
        replay_vs_refresh: refresh_seconds / replay_seconds.max(1e-9),
        appends_quiet: Latency::of(&quiet),
        appends_during_replay: Latency::of(&during),
        append_rate: args.rate,
    };
    print(&report);
    if let Some(path) = &args.json {
        write_json(path, &report)?;
    }
    Ok(())
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
/// writers until `stop`; returns the latency of each acknowledged append.
async fn append_stream(store: Arc<EventStore>, rate: u64, stop: CancellationToken) -> anyhow::Result<Histogram<u64>> {
    let mut tasks = tokio::task::JoinSet::new();
    let writers = WRITERS.min(rate.max(1));
    let period = Duration::from_secs_f64(writers as f64 / rate.max(1) as f64);
    for _ in 0..writers {
        let (store, stop) = (Arc::clone(&store), stop.clone());
        tasks.spawn(async move {
            let mut latencies = histogram();
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
                latencies.saturating_record(micros.max(1));
            }
            anyhow::Ok(latencies)
        });
    }
    let mut all = histogram();
    while let Some(done) = tasks.join_next().await {
        all.add(done??)?;
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
    for (label, figures) in [("first build", &report.first_build), ("under load", &report.under_load)] {
        for f in figures {
            println!(
                "{:<34} {:>3} {:>14.0} {:>9.1} {:>9.1} {:>8} {:>9.1} {:>14.0}",
                format!("{} ({label})", f.projection),
                f.version,
                f.bulk_events_per_second,
                f.bulk_seconds,
                f.finish_seconds,
                f.tail_events,
                f.swap_ms,
                f.overall_events_per_second
            );
        }
    }
    for v in &report.views {
        println!(
            "{:<34} {:>3} {:>14.0} {:>9.1}   (REFRESH MATERIALIZED VIEW; CONCURRENTLY: {:.1} s)",
            v.view, "", v.events_per_second, v.refresh_seconds, v.concurrent_refresh_seconds
        );
    }
    let replays: f64 = report.under_load.iter().map(|f| f.total_seconds).sum();
    let refreshes: f64 = report.views.iter().map(|v| v.refresh_seconds).sum();
    println!(
        "both projections replayed under load {replays:.1} s vs both views refreshed {refreshes:.1} s: refresh time / replay time = {:.2}",
        report.replay_vs_refresh
    );
    println!(
        "appends at {}/s: quiet p50 {:.2} ms p99 {:.2} ms p999 {:.2} ms ({} appends); during replays p50 {:.2} ms p99 {:.2} ms p999 {:.2} ms ({} appends)",
        report.append_rate,
        report.appends_quiet.p50_ms,
        report.appends_quiet.p99_ms,
        report.appends_quiet.p999_ms,
        report.appends_quiet.count,
        report.appends_during_replay.p50_ms,
        report.appends_during_replay.p99_ms,
        report.appends_during_replay.p999_ms,
        report.appends_during_replay.count
    );
}
