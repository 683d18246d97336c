//! Shared by the process-level tests: the test database's URL, roles as child processes with
//! JSON logs, a stream of realistic device histories, and the check that read models equal a
//! rebuild from the log.

#![allow(dead_code)] // each test binary uses a part

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use event_log::{AppendBatch, EventStore, ExpectedVersion, NewEvent, StreamAppend};
use event_schema::*;
use projections::stored::load_read_models;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

/// A child process that is killed when the test ends, however it ends.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `cloudphone` role as a child process (killed when dropped), its JSON log in a file.
pub struct RoleProcess {
    child: KillOnDrop,
    pub log: PathBuf,
}

impl RoleProcess {
    pub fn start(verb: &str, url: &str, env: &[(&str, &str)], dir: &Path) -> Self {
        let log = dir.join(format!("{verb}-{}.log", Uuid::now_v7().simple()));
        let mut command = Command::new(env!("CARGO_BIN_EXE_cloudphone"));
        command
            .arg(verb)
            .env("CLOUDPHONE_DATABASE_URL", url)
            .env("CLOUDPHONE_COMMAND_LISTEN", "127.0.0.1:0")
            .env("CLOUDPHONE_QUERY_LISTEN", "127.0.0.1:0")
            .env("CLOUDPHONE_OPS_LISTEN", "127.0.0.1:0")
            .env("CLOUDPHONE_LOG_FORMAT", "json")
            .env("CLOUDPHONE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (key, value) in env {
            command.env(key, value);
        }
        RoleProcess {
            child: KillOnDrop(command.spawn().unwrap()),
            log,
        }
    }

    pub fn entries(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// Panics (with its log) when the process has exited.
    pub fn assert_alive(&mut self) {
        if let Some(status) = self.child.0.try_wait().unwrap() {
            panic!(
                "{} exited ({status}):\n{}",
                self.log.display(),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }

    /// Waits up to 90 s until the role logs an entry that `matches`; returns it.
    pub async fn logged(&mut self, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
        self.logged_within(what, Duration::from_secs(90), matches).await
    }

    /// Waits up to `limit` until the role logs an entry that `matches`; returns it. Panics,
    /// with the log, when the time is up or the role has exited.
    pub async fn logged_within(&mut self, what: &str, limit: Duration, matches: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(entry) = self.entries().into_iter().find(&matches) {
                return entry;
            }
            self.assert_alive();
            assert!(
                Instant::now() < deadline,
                "{} never logged {what}:\n{}",
                self.log.display(),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The base URL of the listener the role announced with `message`.
    pub async fn address(&mut self, message: &str) -> String {
        let entry = self.logged(message, |e| e["message"] == message).await;
        format!("http://{}", entry["address"].as_str().unwrap())
    }
}

/// Logs of in-process roles, shown when `TEST_LOG` is set (e.g. `TEST_LOG=debug`).
pub fn init_test_logs() {
    if let Ok(filter) = std::env::var("TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}

/// A bearer token for `subject`, signed with the development secret, valid for an hour.
pub fn token(subject: &str, role: command_api::auth::Role) -> String {
    command_api::auth::mint_token(
        command_api::auth::DEVELOPMENT_SECRET,
        subject,
        role,
        &[],
        Utc::now(),
        chrono::Duration::hours(1),
    )
    .unwrap()
}

/// A URL for the test's own database on the server of `DATABASE_URL`.
pub async fn url_of(pool: &PgPool) -> String {
    let name: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(pool)
        .await
        .unwrap();
    let server = std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let base = server
        .rsplit_once('/')
        .map(|(base, _)| base.to_owned())
        .unwrap_or(server);
    format!("{base}/{name}")
}

pub fn event(event: impl Into<Event>) -> NewEvent {
    NewEvent::from_event(&event.into(), EventMetadata::default(), Utc::now()).unwrap()
}

/// Device lifecycles: create, then start / stop+usage cycles, sometimes a delete.
/// Appends until `done`, pausing `pace` between appends (zero: as fast as possible).
pub async fn write_history(store: Arc<EventStore>, done: Arc<AtomicBool>, seed: u64, pace: Duration) {
    let mut rng = StdRng::seed_from_u64(seed);
    let owner = Uuid::now_v7();
    let mut devices: Vec<(Uuid, i64, bool)> = Vec::new();
    while !done.load(Ordering::Relaxed) {
        let now = Utc::now();
        let (device, version, running, events) = if devices.is_empty() || rng.random_range(0..8) == 0 {
            let device = Uuid::now_v7();
            let created = DeviceCreated {
                device_id: device,
                owner_id: owner,
                provider: Provider::Aws,
                cpu_cores: rng.random_range(1..5),
                memory_mb: 2048,
                android_version: 14,
                created_at: now,
            };
            (device, 0, false, vec![event(created)])
        } else {
            let index = rng.random_range(0..devices.len());
            let (device, version, running) = devices[index];
            if running {
                let stopped = DeviceStopped {
                    device_id: device,
                    reason: StopReason::Requested,
                    stopped_at: now,
                };
                let minutes = rng.random_range(1..3000);
                let usage = UsageRecorded {
                    owner_id: owner,
                    device_id: device,
                    provider: Provider::Aws,
                    started_at: now - chrono::Duration::minutes(i64::from(minutes)),
                    ended_at: now,
                    minutes,
                    cost: Money::new(i64::from(minutes) / 5, Currency::USD),
                    pricing_plan_id: "test".into(),
                };
                (device, version, true, vec![event(stopped), event(usage)])
            } else {
                (
                    device,
                    version,
                    false,
                    vec![event(DeviceStarted {
                        device_id: device,
                        started_at: now,
                    })],
                )
            }
        };
        let count = events.len() as i64;
        let expected = if version == 0 {
            ExpectedVersion::NoStream
        } else {
            ExpectedVersion::Exact(version)
        };
        let batch = AppendBatch::single(StreamAppend {
            stream_id: device,
            stream_type: StreamType::Device,
            owner_id: owner,
            expected,
            events,
        });
        store.append(batch).await.unwrap();
        match devices.iter_mut().find(|(id, _, _)| *id == device) {
            Some(entry) => *entry = (device, version + count, !running),
            None => devices.push((device, count, false)),
        }
        if pace.is_zero() {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(pace).await;
        }
    }
}

/// Waits until every projection's checkpoint reaches `head`.
pub async fn projections_reach(pool: &PgPool, head: i64, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let positions: Vec<i64> = sqlx::query_scalar("SELECT position FROM projection_checkpoints")
            .fetch_all(pool)
            .await
            .unwrap();
        if positions.len() == 2 && positions.iter().all(|p| *p >= head) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "projections stuck at {positions:?}, head {head}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every read model equals one folded from the whole log.
pub async fn assert_read_models_equal_a_rebuild(pool: &PgPool) {
    let reader = event_log::LogReader::new(pool.clone());
    let head = reader.head().await.unwrap().position;
    let rebuilt = projections::fold_log(&reader, head, 5_000).await.unwrap();
    let stored = load_read_models(pool).await.unwrap();
    assert_eq!(stored.devices.len(), rebuilt.devices.len());
    let differing: Vec<_> = stored
        .devices
        .iter()
        .filter(|(id, row)| rebuilt.devices.get(*id) != Some(*row))
        .take(3)
        .collect();
    assert!(
        differing.is_empty(),
        "devices differ from a rebuild, e.g. {differing:?}"
    );
    assert!(
        stored.device_stats == rebuilt.device_stats,
        "device_stats differ from a rebuild"
    );
    assert!(
        stored.daily_usage == rebuilt.daily_usage,
        "daily_usage differs from a rebuild"
    );
}

/// Runs `statement` (an UPDATE, DELETE or TRUNCATE of stored events) past the log's
/// append-only triggers, as an operator with superuser rights deliberately could: in its own
/// transaction with `SET LOCAL session_replication_role = replica` (see
/// event-log/migrations/0005_append_only_log.sql). Tests connect as a superuser. Returns the
/// rows affected.
pub async fn tamper(pool: &PgPool, statement: &'static str) -> u64 {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await
        .unwrap();
    let done = sqlx::query(statement).execute(&mut *tx).await.unwrap();
    tx.commit().await.unwrap();
    done.rows_affected()
}

/// Waits until the relay named `relay` has published the log up to `head`.
pub async fn relay_reaches(pool: &PgPool, relay: &str, head: i64, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let position: Option<i64> = sqlx::query_scalar("SELECT position FROM relay_checkpoints WHERE relay = $1")
            .bind(relay)
            .fetch_optional(pool)
            .await
            .unwrap();
        if position.is_some_and(|p| p >= head) {
            return;
        }
        assert!(Instant::now() < deadline, "relay stuck at {position:?}, head {head}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One scrape of `/metrics`: every sample, keyed by name and labels as written.
pub async fn scrape(client: &reqwest::Client, base: &str) -> BTreeMap<String, f64> {
    let response = client.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200, "{base}/metrics");
    let text = response.text().await.unwrap();
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap();
            (series.to_owned(), value.parse::<f64>().unwrap_or(f64::NAN))
        })
        .collect()
}
