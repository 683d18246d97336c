//! `cloudphone load projections`: how fast the projectors catch up on a history and how fresh
//! they keep the read models under a steady stream, against the design they replace —
//! materialized views of the same read models over the log, refreshed with
//! `REFRESH MATERIALIZED VIEW CONCURRENTLY` — in the same run, on the same data.
//!
//! Phases, in one fresh database `cloudphone_load`:
//! 1. history: `--events` events of device lifecycles over six months (bulk appends);
//! 2. catch-up: both embedded projectors from position 0 to the head (events/s);
//! 3. embedded latency: a steady stream at `--rate`; for each append, the time from its
//!    acknowledgement to both projections' checkpoints covering it;
//! 4. baseline: the equivalent views are created (their rows are checked against the
//!    projections' tables), a full `REFRESH ... CONCURRENTLY` is timed, then they are
//!    refreshed back to back under the same stream: an append becomes visible when the first
//!    refresh that started after it ends;
//! 5. Kafka latency (with `--kafka-brokers`): the same stream through the relay, the topic and
//!    projector workers in consumer groups (the relay starts at the head: the topic carries
//!    the measured stream only). Last, because the projections then belong to Kafka mode.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use event_log::{AppendBatch, EventStore, ExpectedVersion, LogReader, StoreConfig, StreamAppend};
use event_schema::{
    Currency, DeviceCreated, DeviceStarted, DeviceStopped, Money, Provider, StopReason, StreamType, UsageRecorded,
};
use kafka_adapters::projector::{KafkaProjectorConfig, run_kafka_projector};
use kafka_adapters::relay::{RelayConfig, run_relay};
use operator_console::Progress;
use projections::runner::{ProjectorConfig, run_log_projector, spawn_log_projectors};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use read_models::Projection;
use serde::Serialize;
use sqlx::{Executor, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::cli::LoadProjectionsArgs;
use crate::harness::databases::{applied, checkpoints, fresh_database, settle_database};
use crate::harness::report::{Latency, histogram, write_json};
use crate::harness::views::{VIEW_DIFFERENCES, VIEWS, refresh_views_concurrently};
use crate::harness::visibility::{Pending, acknowledged, outstanding, poll_checkpoints, settle};
use crate::world::history::{new_event, write_history};

/// Concurrent writers of the steady stream.
const STREAM_WRITERS: u64 = 4;

#[derive(Debug, Serialize)]
struct CatchUp {
    events: i64,
    seconds: f64,
    events_per_second: f64,
    /// Events/s each projection applied, running alone from position 0 to the head.
    per_projection_events_per_second: BTreeMap<&'static str, f64>,
}

#[derive(Debug, Serialize)]
struct LatencyPhase {
    mode: &'static str,
    events_per_second: f64,
    seconds: f64,
    latency: Latency,
    max_ms: f64,
}

#[derive(Debug, Serialize)]
struct Baseline {
    /// One full `REFRESH MATERIALIZED VIEW CONCURRENTLY` of both views over the history.
    refresh_seconds: f64,
    /// History events over refresh seconds: the rate the views "process" the log at.
    equivalent_events_per_second: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    events: u64,
    seed: u64,
    history_seconds: f64,
    catch_up: CatchUp,
    baseline: Baseline,
    /// One refresh of both views over the projectors' build of both models from scratch.
    catch_up_ratio: f64,
    latency: Vec<LatencyPhase>,
}

pub async fn run(args: &LoadProjectionsArgs) -> anyhow::Result<()> {
    if args.events == 0 || args.rate == 0 || args.kafka_rate == 0 {
        bail!("--events, --rate and --kafka-rate must be positive");
    }
    let pool = fresh_database(&args.database.database_url).await?;
    read_models::migrate(&pool).await?;
    println!(
        "load projections: {} events of history, {} events/s for {} s per latency phase, seed {}",
        args.events, args.rate, args.duration, args.seed
    );

    let started = Instant::now();
    write_history(&pool, args.events, args.seed).await?;
    let history_seconds = started.elapsed().as_secs_f64();
    let reader = LogReader::new(pool.clone());
    let head = reader.head().await?.position;
    println!("  history: {head} events in {history_seconds:.1} s");

    let catch_up = catch_up(&pool, head).await?;
    println!(
        "  (a) projectors build from scratch:   {:>9.0} events/s   (slowest projection; {}; {:.1} s for both)",
        catch_up.events_per_second,
        catch_up
            .per_projection_events_per_second
            .iter()
            .map(|(name, rate)| format!("{name} {rate:.0}/s"))
            .collect::<Vec<_>>()
            .join(", "),
        catch_up.seconds,
    );
    settle_database(&pool).await?;

    let store = Arc::new(EventStore::open(pool.clone(), StoreConfig::default()).await?);
    let mut latency = Vec::new();
    let phase = embedded_latency(&pool, &store, args).await?;
    phase.print();
    latency.push(phase);

    let baseline = create_views(&pool, head).await?;
    // Both read models from scratch: the projectors once, the views on every refresh.
    let catch_up_ratio = baseline.refresh_seconds / catch_up.seconds.max(1e-9);
    println!(
        "  (b) REFRESH MATERIALIZED VIEW CONCURRENTLY (both views): {:>9.0} events/s equivalent ({:.1} s per refresh)",
        baseline.equivalent_events_per_second, baseline.refresh_seconds
    );
    println!(
        "  both models from scratch: projectors {:.1} s once, views {:.1} s on every refresh ({catch_up_ratio:.2}x)",
        catch_up.seconds, baseline.refresh_seconds
    );
    let phase = view_latency(&pool, &store, args).await?;
    phase.print();
    latency.push(phase);
    // Last: after a Kafka run the projections belong to Kafka mode (their checkpoint is the
    // minimum over partitions), so the embedded projectors above would refuse to resume.
    if let Some(brokers) = &args.kafka_brokers {
        let phase = kafka_latency(&pool, &store, args, brokers).await?;
        phase.print();
        latency.push(phase);
    }
    if let Some(ours) = latency.first() {
        println!(
            "  views / embedded projectors: {:.0}x p50, {:.0}x p99 event-to-read-model latency",
            phase_ms(&latency, "views", |l| l.latency.p50_ms) / ours.latency.p50_ms.max(1e-3),
            phase_ms(&latency, "views", |l| l.latency.p99_ms) / ours.latency.p99_ms.max(1e-3),
        );
    }
    if let Ok(store) = Arc::try_unwrap(store) {
        store.shutdown().await;
    }

    let report = Report {
        events: args.events,
        seed: args.seed,
        history_seconds,
        catch_up,
        baseline,
        catch_up_ratio,
        latency,
    };
    if let Some(path) = &args.json {
        write_json(path, &report)?;
        println!("  report written to {}", path.display());
    }
    Ok(())
}

fn phase_ms(phases: &[LatencyPhase], mode: &str, figure: impl Fn(&LatencyPhase) -> f64) -> f64 {
    phases.iter().find(|p| p.mode == mode).map_or(0.0, figure)
}

impl LatencyPhase {
    fn print(&self) {
        println!(
            "  latency, {:<28} {:>6.0} events/s   p50 {:>8.2} ms   p99 {:>8.2} ms   p999 {:>8.2} ms   max {:>8.2} ms",
            self.mode,
            self.events_per_second,
            self.latency.p50_ms,
            self.latency.p99_ms,
            self.latency.p999_ms,
            self.max_ms
        );
    }
}

async fn stop_all(stop: CancellationToken, tasks: Vec<tokio::task::JoinHandle<()>>) {
    stop.cancel();
    for task in tasks {
        let _ = task.await;
    }
}

async fn catch_up(pool: &PgPool, head: i64) -> anyhow::Result<CatchUp> {
    // One projection at a time: each projector's own throughput, with the machine to itself.
    let mut per_projection = BTreeMap::new();
    let started = Instant::now();
    for projection in Projection::ALL {
        let stop = CancellationToken::new();
        let began = Instant::now();
        let task = tokio::spawn(run_log_projector(
            pool.clone(),
            projection,
            catch_up_config(),
            stop.clone(),
        ));
        let mut progress = Progress::new(projection.name(), u64::try_from(head).unwrap_or(0));
        loop {
            let at = checkpoints(pool).await?.get(projection.name()).copied().unwrap_or(0);
            progress.set(u64::try_from(at).unwrap_or(0));
            if at >= head {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let seconds = began.elapsed().as_secs_f64();
        progress.finish();
        stop_all(stop, vec![task]).await;
        per_projection.insert(projection.name(), head as f64 / seconds);
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(CatchUp {
        events: head,
        seconds,
        events_per_second: per_projection.values().copied().fold(f64::INFINITY, f64::min),
        per_projection_events_per_second: per_projection,
    })
}

/// The projectors as `serve` runs them.
fn catch_up_config() -> ProjectorConfig {
    ProjectorConfig::default()
}

/// Runs the embedded projectors until both cover the head (phases that appended with the
/// projectors stopped leave them behind).
async fn projections_to_head(pool: &PgPool) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let tasks = spawn_log_projectors(pool, ProjectorConfig::default(), &stop);
    let head = LogReader::new(pool.clone()).head().await?.position;
    let deadline = Instant::now() + Duration::from_secs(600);
    while applied(pool).await? < head {
        if Instant::now() > deadline {
            bail!("the projectors did not reach the head within 600 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_all(stop, tasks).await;
    Ok(())
}

/// A steady stream of device commands at `rate` events/s over `STREAM_WRITERS` writers,
/// until `stop`; each acknowledged append goes to `pending`. Returns the events written.
async fn steady_stream(
    store: Arc<EventStore>,
    rate: u64,
    seed: u64,
    pending: Pending,
    stop: CancellationToken,
) -> anyhow::Result<u64> {
    let writers = STREAM_WRITERS.min(rate);
    let mut tasks = tokio::task::JoinSet::new();
    for writer in 0..writers {
        let (store, pending, stop) = (Arc::clone(&store), Arc::clone(&pending), stop.clone());
        let per_writer = (rate / writers).max(1) as f64;
        tasks.spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed.wrapping_add(writer));
            let owner = Uuid::now_v7();
            // (device, version, running)
            let mut devices: Vec<(Uuid, i64, bool)> = Vec::new();
            let started = tokio::time::Instant::now();
            let mut written = 0u64;
            while !stop.is_cancelled() {
                // Whole microseconds, as PostgreSQL stores them (it rounds what the projection
                // truncates), so the baseline's views and the tables agree to the row.
                let now = Utc::now();
                let now = DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now);
                let create = devices.is_empty() || rng.random_range(0..10) == 0;
                let (index, events) = if create {
                    let device = Uuid::now_v7();
                    devices.push((device, 0, false));
                    let created = DeviceCreated {
                        device_id: device,
                        owner_id: owner,
                        provider: Provider::Gcp,
                        cpu_cores: 2,
                        memory_mb: 4096,
                        android_version: 14,
                        created_at: now,
                    };
                    (devices.len() - 1, vec![new_event(created, now)?])
                } else {
                    let index = rng.random_range(0..devices.len());
                    let (device, _, running) = devices[index];
                    let events = if running {
                        let minutes = rng.random_range(1..600);
                        vec![
                            new_event(
                                DeviceStopped {
                                    device_id: device,
                                    reason: StopReason::Requested,
                                    stopped_at: now,
                                },
                                now,
                            )?,
                            new_event(
                                UsageRecorded {
                                    owner_id: owner,
                                    device_id: device,
                                    provider: Provider::Gcp,
                                    started_at: now - chrono::Duration::minutes(i64::from(minutes)),
                                    ended_at: now,
                                    minutes,
                                    cost: Money::new(i64::from(minutes) * 3, Currency::USD),
                                    pricing_plan_id: "load".into(),
                                },
                                now,
                            )?,
                        ]
                    } else {
                        vec![new_event(
                            DeviceStarted {
                                device_id: device,
                                started_at: now,
                            },
                            now,
                        )?]
                    };
                    (index, events)
                };
                let (device, version, running) = devices[index];
                let count = events.len() as i64;
                let expected = if version == 0 {
                    ExpectedVersion::NoStream
                } else {
                    ExpectedVersion::Exact(version)
                };
                let outcome = store
                    .append(AppendBatch::single(StreamAppend {
                        stream_id: device,
                        stream_type: StreamType::Device,
                        owner_id: owner,
                        expected,
                        events,
                    }))
                    .await?;
                let acked = Instant::now();
                acknowledged(&pending, outcome.last_position, acked);
                devices[index] = (device, version + count, if create { false } else { !running });
                written += count as u64;
                // Paced by events written, so the rate holds whatever each append costs.
                tokio::time::sleep_until(started + Duration::from_secs_f64(written as f64 / per_writer)).await;
            }
            Ok::<u64, anyhow::Error>(written)
        });
    }
    let mut total = 0;
    while let Some(done) = tasks.join_next().await {
        total += done??;
    }
    Ok(total)
}

/// Runs the stream for `--duration` while `visible` polls what the read models show, then
/// lets the stream's tail settle; returns the latency phase.
async fn measure<F, Fut>(
    store: &Arc<EventStore>,
    rate: u64,
    args: &LoadProjectionsArgs,
    mode: &'static str,
    visible: F,
) -> anyhow::Result<LatencyPhase>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<(i64, Instant)>>,
{
    let pending: Pending = Arc::default();
    let stop = CancellationToken::new();
    let writer = tokio::spawn(steady_stream(
        Arc::clone(store),
        rate,
        args.seed,
        Arc::clone(&pending),
        stop.clone(),
    ));
    let mut latencies = histogram();
    let started = Instant::now();
    let mut progress = Progress::new(mode, args.duration);
    while started.elapsed() < Duration::from_secs(args.duration) {
        let (position, at) = visible().await?;
        settle(&pending, position, at, &mut latencies);
        progress.set(started.elapsed().as_secs());
    }
    stop.cancel();
    let written = writer.await??;
    let seconds = started.elapsed().as_secs_f64();
    progress.finish();
    // Everything acknowledged must become visible: wait for the tail (bounded).
    let deadline = Instant::now() + Duration::from_secs(120);
    while outstanding(&pending) {
        if Instant::now() > deadline {
            bail!("{mode}: appends never became visible in the read models");
        }
        let (position, at) = visible().await?;
        settle(&pending, position, at, &mut latencies);
    }
    Ok(LatencyPhase {
        mode,
        events_per_second: written as f64 / seconds,
        seconds,
        latency: Latency::of(&latencies),
        max_ms: latencies.max() as f64 / 1000.0,
    })
}

async fn embedded_latency(
    pool: &PgPool,
    store: &Arc<EventStore>,
    args: &LoadProjectionsArgs,
) -> anyhow::Result<LatencyPhase> {
    let stop = CancellationToken::new();
    let tasks = spawn_log_projectors(pool, ProjectorConfig::default(), &stop);
    let phase = measure(store, args.rate, args, "embedded projectors", || poll_checkpoints(pool)).await;
    stop_all(stop, tasks).await;
    phase
}

async fn kafka_latency(
    pool: &PgPool,
    store: &Arc<EventStore>,
    args: &LoadProjectionsArgs,
    brokers: &str,
) -> anyhow::Result<LatencyPhase> {
    let topic = format!("cloudphone.load.{}", Uuid::now_v7().simple());
    projections_to_head(pool).await?;
    let head = LogReader::new(pool.clone()).head().await?.position;
    // The relay starts at the head: the topic carries the measured stream only.
    sqlx::query("INSERT INTO relay_checkpoints (relay, position) VALUES ($1, $2)")
        .bind(&topic)
        .bind(head)
        .execute(pool)
        .await?;
    let stop = CancellationToken::new();
    let relay = RelayConfig {
        topic: topic.clone(),
        name: topic.clone(),
        ..RelayConfig::new(brokers)
    };
    let mut tasks = vec![tokio::spawn(run_relay(pool.clone(), relay, stop.clone()))];
    for projection in Projection::ALL {
        let config = KafkaProjectorConfig {
            topic: topic.clone(),
            group_id: format!("{topic}-{}", projection.name()),
            ..KafkaProjectorConfig::new(brokers, projection)
        };
        tasks.push(tokio::spawn(run_kafka_projector(
            pool.clone(),
            projection,
            config,
            stop.clone(),
        )));
    }
    // Warm up until the consumer groups are formed and an event went all the way through.
    let warm_up = Instant::now();
    let pending: Pending = Arc::default();
    let writer_stop = CancellationToken::new();
    let writer = tokio::spawn(steady_stream(
        Arc::clone(store),
        10,
        args.seed,
        pending,
        writer_stop.clone(),
    ));
    let result = async {
        loop {
            if applied(pool).await? > head {
                break;
            }
            if warm_up.elapsed() > Duration::from_secs(120) {
                bail!("nothing reached the read models through Kafka within 120 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        writer_stop.cancel();
        writer.await??;
        measure(store, args.kafka_rate, args, "relay + Kafka projectors", || {
            poll_checkpoints(pool)
        })
        .await
    }
    .await;
    stop_all(stop, tasks).await;
    result
}

/// Creates the views, checks they hold what the projections hold, and times one refresh.
async fn create_views(pool: &PgPool, history: i64) -> anyhow::Result<Baseline> {
    // The projections first catch up with everything the views will see.
    projections_to_head(pool).await?;
    pool.execute(VIEWS).await.context("create the baseline's views")?;
    let differences: i64 = sqlx::query_scalar(VIEW_DIFFERENCES).fetch_one(pool).await?;
    if differences != 0 {
        bail!("the baseline's views disagree with the projections in {differences} rows: not an equivalent baseline");
    }
    let started = Instant::now();
    refresh_views_concurrently(pool).await?;
    let refresh_seconds = started.elapsed().as_secs_f64();
    Ok(Baseline {
        refresh_seconds,
        equivalent_events_per_second: history as f64 / refresh_seconds,
    })
}

async fn view_latency(
    pool: &PgPool,
    store: &Arc<EventStore>,
    args: &LoadProjectionsArgs,
) -> anyhow::Result<LatencyPhase> {
    let reader = LogReader::new(pool.clone());
    // Refreshed back to back: what was committed when a refresh began shows when it ends.
    measure(store, args.rate, args, "views", || async {
        let head = reader.head().await?.position;
        refresh_views_concurrently(pool).await?;
        Ok((head, Instant::now()))
    })
    .await
}
