//! Read routing against a real streaming replica (ops/dev/replica.sh): reads go to the
//! replica while it is well, survive it stopping, come back when it restarts; a read with a
//! position sees that write every time.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests panic on purpose

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use event_log::{AppendBatch, EventStore, ExpectedVersion, NewEvent, StoreConfig, StreamAppend};
use event_schema::{DeviceCreated, Event, EventMetadata, Provider, StreamType};
use projections::runner::{ProjectorConfig, spawn_log_projectors};
use query_api::{ReadError, ReadSources, Source, SourcesConfig};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn replica(action: &str) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../ops/dev/replica.sh");
    let status = Command::new(script).arg(action).status().unwrap();
    assert!(status.success(), "ops/dev/replica.sh {action} failed");
}

/// The test database's URL on the replica (databases replicate like everything else).
async fn replica_url(pool: &PgPool) -> String {
    let name: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(pool)
        .await
        .unwrap();
    let port = std::env::var("CLOUDPHONE_REPLICA_PORT").unwrap_or_else(|_| "5433".into());
    format!("postgres://postgres@127.0.0.1:{port}/{name}")
}

async fn prepared(pool: &PgPool) -> ReadSources {
    replica("start");
    event_log::migrate(pool).await.unwrap();
    projections::migrate(pool).await.unwrap();
    let config = SourcesConfig {
        position_wait: Duration::from_secs(5),
        ..SourcesConfig::default()
    };
    let url = replica_url(pool).await;
    // The replica replays the test database's creation and migrations a moment later.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let migrated = match sqlx::PgPool::connect(&url).await {
            Ok(replica) => {
                let table: Option<Option<String>> =
                    sqlx::query_scalar("SELECT to_regclass('projection_checkpoints')::text")
                        .fetch_optional(&replica)
                        .await
                        .unwrap_or(None);
                replica.close().await;
                table.flatten().is_some()
            }
            Err(_) => false,
        };
        if migrated {
            break;
        }
        assert!(Instant::now() < deadline, "the replica never replayed the migrations");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sources = ReadSources::new(pool.clone(), &[url], config).unwrap();
    in_rotation(&sources, true).await;
    sources
}

/// Probes until the replica is (or is not) in rotation.
async fn in_rotation(sources: &ReadSources, wanted: bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        sources.check_health().await;
        if sources
            .replica_states()
            .iter()
            .all(|(_, healthy, _)| *healthy == wanted)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "replica never became {}: {:?}",
            if wanted { "healthy" } else { "unhealthy" },
            sources.replica_states()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn count_checkpoints(pool: PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM projection_checkpoints")
        .fetch_one(&pool)
        .await
}

#[sqlx::test(migrations = false)]
async fn reads_go_to_the_replica_survive_its_outage_and_return_when_it_is_back(pool: PgPool) {
    let sources = prepared(&pool).await;
    let (_, source) = sources.read(count_checkpoints).await.unwrap();
    assert!(matches!(source, Source::Replica(_)), "{source:?}");

    // Queries keep running while the replica goes down: none fails.
    let done = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (sources, done) = (sources.clone(), Arc::clone(&done));
        tokio::spawn(async move {
            let mut answered = Vec::new();
            for _ in 0..400 {
                let (_, source) = sources.read(count_checkpoints).await.expect("no query fails");
                answered.push(source);
                done.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            answered
        })
    };
    while done.load(Ordering::Relaxed) < 20 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    replica("stop");
    let answered = reader.await.unwrap();
    assert!(answered.contains(&Source::Primary), "the primary took over");
    in_rotation(&sources, false).await;
    let (_, source) = sources.read(count_checkpoints).await.unwrap();
    assert_eq!(source, Source::Primary);

    replica("start");
    in_rotation(&sources, true).await;
    let (_, source) = sources.read(count_checkpoints).await.unwrap();
    assert!(matches!(source, Source::Replica(_)), "{source:?}");

    // A query error that is the query's fault is not a replica failure.
    let error = sources
        .read(|pool| async move { sqlx::query("SELECT * FROM no_such_table").execute(&pool).await })
        .await
        .unwrap_err();
    assert!(matches!(error, ReadError::Database(_)), "{error}");
    assert!(sources.replica_states().iter().all(|(_, healthy, _)| *healthy));
}

#[sqlx::test(migrations = false)]
async fn a_read_with_a_position_sees_that_write_every_time(pool: PgPool) {
    let sources = prepared(&pool).await;
    let stop = CancellationToken::new();
    let projectors = spawn_log_projectors(&pool, ProjectorConfig::default(), &stop);
    let store = Arc::new(EventStore::open(pool.clone(), StoreConfig::default()).await.unwrap());
    let owner = Uuid::now_v7();
    let mut from_replica = 0;
    for _ in 0..1000 {
        let device = Uuid::now_v7();
        let created: Event = DeviceCreated {
            device_id: device,
            owner_id: owner,
            provider: Provider::Aws,
            cpu_cores: 2,
            memory_mb: 2048,
            android_version: 14,
            created_at: Utc::now(),
        }
        .into();
        let outcome = store
            .append(AppendBatch::single(StreamAppend {
                stream_id: device,
                stream_type: StreamType::Device,
                owner_id: owner,
                expected: ExpectedVersion::NoStream,
                events: vec![NewEvent::from_event(&created, EventMetadata::default(), Utc::now()).unwrap()],
            }))
            .await
            .unwrap();
        let (source_pool, source) = sources.source_at(outcome.last_position).await.unwrap();
        let seen: Option<Uuid> = sqlx::query_scalar("SELECT device_id FROM devices WHERE device_id = $1")
            .bind(device)
            .fetch_optional(&source_pool)
            .await
            .unwrap();
        assert_eq!(seen, Some(device), "device {device} not visible on {source:?}");
        from_replica += i32::from(matches!(source, Source::Replica(_)));
    }
    assert!(from_replica > 0, "the replica answered none of the reads");

    // A position the log never reached: a clear error after the bounded wait.
    let impatient = ReadSources::new(
        pool.clone(),
        &[],
        SourcesConfig {
            position_wait: Duration::from_millis(200),
            ..SourcesConfig::default()
        },
    )
    .unwrap();
    let error = impatient.source_at(1_000_000).await.unwrap_err();
    assert!(
        matches!(error, ReadError::NotYetVisible { wanted: 1_000_000, .. }),
        "{error}"
    );
    stop.cancel();
    for task in projectors {
        task.await.unwrap();
    }
}
