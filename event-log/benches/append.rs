//! Append throughput and latency: group commit against one-transaction-per-command baselines,
//! group commit by several stores sharing one log (as several command API instances do), and
//! bulk appends against the physical limit of COPY, in one process on one database.
//!
//! ```sh
//! cargo bench -p event-log --bench append            # 10 s per phase
//! CLOUDPHONE_BENCH_SECONDS=30 cargo bench -p event-log --bench append
//! ```
//!
//! It drops and recreates the database `cloudphone_bench` on `DATABASE_URL`'s server.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark may stop on failure

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use event_log::{AppendBatch, EventStore, ExpectedVersion, NewEvent, StoreConfig, StreamAppend};
use event_schema::{DeviceFailed, DeviceStarted, Event, EventMetadata, StreamType};
use hdrhistogram::Histogram;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Executor, PgPool};
use uuid::Uuid;

fn task_count() -> usize {
    std::env::var("CLOUDPHONE_BENCH_TASKS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64)
}
const BULK_BATCH: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Marten-style: positions from a sequence, one transaction per command, no global
    /// order guarantee (a reader by position can skip late commits). Context only.
    SequenceUnordered,
    /// Our log, one transaction per command (the naive gap-free baseline).
    Unbatched,
    /// Our log with group commit.
    GroupCommit,
    /// Our log with group commit, the tasks spread over `STORES` stores sharing it, as over
    /// as many command API instances: their groups take turns at the log head.
    GroupCommitStores,
}

/// Stores (command API instances) of the shared-log phase.
const STORES: usize = 4;

impl Mode {
    fn label(self) -> String {
        match self {
            Mode::SequenceUnordered => "naive, sequence positions (NOT gap-free)".to_owned(),
            Mode::Unbatched => "(a) naive: one transaction per command".to_owned(),
            Mode::GroupCommit => "(b) group commit".to_owned(),
            Mode::GroupCommitStores => format!("(c) group commit, {STORES} stores on one log"),
        }
    }
}

struct PhaseResult {
    mode: Mode,
    events: u64,
    seconds: f64,
    latency: Histogram<u64>,
}

impl PhaseResult {
    fn per_second(&self) -> f64 {
        self.events as f64 / self.seconds
    }

    fn print(&self) {
        let ms = |q: f64| self.latency.value_at_quantile(q) as f64 / 1000.0;
        println!(
            "  {:<44} {:>9.0} events/s   p50 {:>7.2} ms   p99 {:>7.2} ms   p999 {:>7.2} ms",
            self.mode.label(),
            self.per_second(),
            ms(0.50),
            ms(0.99),
            ms(0.999)
        );
    }
}

fn started_event(device: Uuid) -> NewEvent {
    let event = Event::from(DeviceStarted {
        device_id: device,
        started_at: Utc::now(),
    });
    NewEvent::from_event(&event, EventMetadata::default(), Utc::now()).expect("encode")
}

async fn run_phase(mode: Mode, stores: &[Arc<EventStore>], pool: PgPool, duration: Duration) -> PhaseResult {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    let stores = if mode == Mode::GroupCommitStores {
        stores
    } else {
        &stores[..1]
    };
    for task in 0..task_count() {
        let (store, pool, stop) = (stores[task % stores.len()].clone(), pool.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
            let (device, owner) = (Uuid::now_v7(), Uuid::now_v7());
            let mut version = 0i64;
            if mode == Mode::SequenceUnordered {
                sqlx::query("INSERT INTO bench_streams (stream_id, version) VALUES ($1, 0)")
                    .bind(device)
                    .execute(&pool)
                    .await
                    .expect("stream row");
            }
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                match mode {
                    Mode::SequenceUnordered => {
                        let event = started_event(device);
                        let mut tx = pool.begin().await.expect("begin");
                        let updated = sqlx::query(
                            "UPDATE bench_streams SET version = version + 1 WHERE stream_id = $1 AND version = $2",
                        )
                        .bind(device)
                        .bind(version)
                        .execute(&mut *tx)
                        .await
                        .expect("update stream");
                        assert_eq!(updated.rows_affected(), 1);
                        sqlx::query(
                            "INSERT INTO bench_events (event_id, stream_id, stream_version, event_type, payload) \
                             VALUES ($1, $2, $3, $4, $5)",
                        )
                        .bind(event.event_id)
                        .bind(device)
                        .bind(version + 1)
                        .bind(&event.event_type)
                        .bind(&event.payload)
                        .execute(&mut *tx)
                        .await
                        .expect("insert event");
                        tx.commit().await.expect("commit");
                        version += 1;
                    }
                    Mode::Unbatched | Mode::GroupCommit | Mode::GroupCommitStores => {
                        let batch = AppendBatch::single(StreamAppend {
                            stream_id: device,
                            stream_type: StreamType::Device,
                            owner_id: owner,
                            expected: ExpectedVersion::Exact(version),
                            events: vec![started_event(device)],
                        });
                        let outcome = if mode == Mode::Unbatched {
                            store.append_unbatched(batch).await
                        } else {
                            store.append(batch).await
                        };
                        version = outcome.expect("append").streams[0].version;
                    }
                }
                latency.record(started.elapsed().as_micros() as u64).ok();
            }
            latency
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    for task in tasks {
        latency.add(task.await.expect("task")).expect("merge");
    }
    let seconds = started.elapsed().as_secs_f64();
    PhaseResult {
        mode,
        events: latency.len(),
        seconds,
        latency,
    }
}

/// Appends `batches` batches of 10 000 events (the COPY path) and returns events/s.
async fn bulk_append(store: &EventStore, batches: usize) -> f64 {
    let owner = Uuid::now_v7();
    let prepared: Vec<AppendBatch> = (0..batches)
        .map(|_| {
            let device = Uuid::now_v7();
            let events = (0..BULK_BATCH)
                .map(|i| {
                    let event = Event::from(DeviceFailed {
                        device_id: device,
                        reason: format!("bulk event {i}"),
                        failed_at: Utc::now(),
                    });
                    NewEvent::from_event(&event, EventMetadata::default(), Utc::now()).expect("encode")
                })
                .collect();
            AppendBatch::single(StreamAppend {
                stream_id: device,
                stream_type: StreamType::Device,
                owner_id: owner,
                expected: ExpectedVersion::NoStream,
                events,
            })
        })
        .collect();
    let started = Instant::now();
    for batch in prepared {
        store.append(batch).await.expect("bulk append");
    }
    (batches * BULK_BATCH) as f64 / started.elapsed().as_secs_f64()
}

/// COPYs the same number of already-encoded rows straight into `user_events`: no checks, no
/// hashing, no stream versions. The physical limit the bulk path is measured against.
async fn raw_copy(pool: &PgPool, batches: usize) -> f64 {
    let head: i64 = sqlx::query_scalar("SELECT position FROM log_head")
        .fetch_one(pool)
        .await
        .expect("head");
    let recorded_at = Utc::now().format("%Y-%m-%d %H:%M:%S%.6f+00").to_string();
    let owner = Uuid::now_v7();
    let hash = format!("\\\\x{}", "ab".repeat(32));
    let mut payloads = Vec::with_capacity(batches);
    let mut position = head + 1_000_000;
    for _ in 0..batches {
        let device = Uuid::now_v7();
        let mut buffer = Vec::with_capacity(BULK_BATCH * 400);
        for i in 0..BULK_BATCH {
            position += 1;
            let payload =
                format!(r#"{{"device_id":"{device}","failed_at":"2026-11-22T00:00:00Z","reason":"bulk event {i}"}}"#);
            buffer.extend_from_slice(
                format!(
                    "{position}\t{}\t{device}\tdevice\t{}\tDeviceFailed\t1\t{owner}\t{recorded_at}\t{recorded_at}\t{payload}\t{{}}\t{hash}\t{hash}\n",
                    Uuid::now_v7(),
                    i + 1
                )
                .as_bytes(),
            );
        }
        payloads.push(buffer);
    }
    let mut conn = pool.acquire().await.expect("connection");
    let started = Instant::now();
    for buffer in payloads {
        let mut tx = (*conn).begin().await.expect("begin");
        let mut copy = tx
            .copy_in_raw(
                "COPY user_events (position, event_id, stream_id, stream_type, stream_version, event_type, \
                 schema_version, owner_id, occurred_at, recorded_at, payload, metadata, prev_hash, hash) FROM STDIN",
            )
            .await
            .expect("copy");
        copy.send(buffer).await.expect("send");
        copy.finish().await.expect("finish");
        tx.commit().await.expect("commit");
    }
    (batches * BULK_BATCH) as f64 / started.elapsed().as_secs_f64()
}

async fn fresh_database() -> PgPool {
    let admin_url =
        std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let admin = PgConnectOptions::from_str(&admin_url).expect("DATABASE_URL");
    let mut conn = admin.connect().await.expect("connect");
    conn.execute("DROP DATABASE IF EXISTS cloudphone_bench WITH (FORCE)")
        .await
        .expect("drop");
    conn.execute("CREATE DATABASE cloudphone_bench").await.expect("create");
    conn.close().await.ok();
    let pool = PgPoolOptions::new()
        .max_connections(task_count().min(90) as u32 + 4)
        .connect_with(admin.database("cloudphone_bench"))
        .await
        .expect("bench pool");
    event_log::migrate(&pool).await.expect("migrate");
    pool.execute(
        "CREATE TABLE bench_streams (stream_id uuid PRIMARY KEY, version bigint NOT NULL);
         CREATE TABLE bench_events (position bigserial PRIMARY KEY, event_id uuid NOT NULL, stream_id uuid NOT NULL,
             stream_version bigint NOT NULL, event_type text NOT NULL, payload jsonb NOT NULL,
             recorded_at timestamptz NOT NULL DEFAULT now(), UNIQUE (stream_id, stream_version));",
    )
    .await
    .expect("baseline tables");
    pool
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let seconds: u64 = std::env::var("CLOUDPHONE_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let duration = Duration::from_secs(seconds);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let pool = fresh_database().await;
        let mut stores = Vec::with_capacity(STORES);
        for _ in 0..STORES {
            stores.push(Arc::new(
                EventStore::open(pool.clone(), StoreConfig::default())
                    .await
                    .expect("store"),
            ));
        }
        let store = stores[0].clone();
        let sync_commit: String = sqlx::query_scalar("SHOW synchronous_commit")
            .fetch_one(&pool)
            .await
            .expect("show");
        println!(
            "append benchmark: {} concurrent tasks, single-event appends, {seconds} s per phase, \
             synchronous_commit={sync_commit}",
            task_count()
        );

        // Interleave the phases twice so drift on a shared machine hits every mode alike.
        let mut results = Vec::new();
        for round in 1..=2 {
            println!("round {round}");
            for mode in [
                Mode::SequenceUnordered,
                Mode::Unbatched,
                Mode::GroupCommit,
                Mode::GroupCommitStores,
            ] {
                let result = run_phase(mode, &stores, pool.clone(), duration).await;
                result.print();
                results.push(result);
            }
        }
        let best = |mode: Mode| {
            results
                .iter()
                .filter(|r| r.mode == mode)
                .max_by(|a, b| a.per_second().total_cmp(&b.per_second()))
                .expect("phase ran")
        };
        let (naive, grouped, sequence, shared) = (
            best(Mode::Unbatched),
            best(Mode::GroupCommit),
            best(Mode::SequenceUnordered),
            best(Mode::GroupCommitStores),
        );
        let p99 = |r: &PhaseResult| r.latency.value_at_quantile(0.99) as f64 / 1000.0;
        println!(
            "ratio (b)/(a): throughput {:.1}x, p99 {:.2} ms vs {:.2} ms; (b) vs sequence baseline: {:.1}x",
            grouped.per_second() / naive.per_second(),
            p99(grouped),
            p99(naive),
            grouped.per_second() / sequence.per_second()
        );
        println!(
            "ratio (c)/(b): {STORES} stores on one log against one store: throughput {:.2}x, p99 {:.2} ms vs {:.2} ms",
            shared.per_second() / grouped.per_second(),
            p99(shared),
            p99(grouped)
        );

        let batches = 20;
        let bulk = bulk_append(&store, batches).await;
        let copy = raw_copy(&pool, batches).await;
        println!(
            "bulk: {batches} x {BULK_BATCH}-event batches: log append {bulk:.0} events/s, raw COPY {copy:.0} events/s \
             ({:.0}% of the COPY limit)",
            100.0 * bulk / copy
        );
    });
}
