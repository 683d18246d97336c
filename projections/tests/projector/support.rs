//! A world to project: histories made by the domain's own decide/evolve, appended through the
//! real event store, and projectors running against the test's database.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use domain::PricingTable;
use domain::device::{self, DeviceCommand, DeviceContext, DeviceState};
use domain::user::{self, UserCommand, UserState};
use event_log::{AppendBatch, EventStore, ExpectedVersion, ManualClock, NewEvent, StoreConfig, StreamAppend};
use event_schema::{Event, EventMetadata, Personal, Quota, StopReason, StreamType, Tier};
use projections::runner::{ProjectorConfig, spawn_log_projectors};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use read_models::Projection;
use sqlx::PgPool;
use test_support::db::migrated;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Runs both projections until the returned token is cancelled.
pub fn start_projectors(pool: &PgPool) -> (CancellationToken, Vec<tokio::task::JoinHandle<()>>) {
    let stop = CancellationToken::new();
    let config = ProjectorConfig {
        batch_size: 50,
        poll_interval: Duration::from_millis(50),
        listen: true,
        ..ProjectorConfig::default()
    };
    let tasks = spawn_log_projectors(pool, config, &stop);
    (stop, tasks)
}

/// Waits until every projection's checkpoint has reached the log head.
pub async fn caught_up(pool: &PgPool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let statuses = read_models::status::projection_status(pool).await.unwrap_or_default();
        if statuses.len() == Projection::ALL.len() && statuses.iter().all(|s| s.lag_events == 0) {
            return;
        }
        assert!(Instant::now() < deadline, "projections did not catch up: {statuses:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts that the stored read models equal a rebuild from the whole log, row for row.
/// These databases stay at version 1 of `daily_usage` (no per-provider breakdown).
pub async fn assert_equals_rebuild(pool: &PgPool) {
    let reader = event_log::LogReader::new(pool.clone());
    let head = reader.head().await.unwrap().position;
    let rebuilt = projections::fold_log(&reader, head, 1_000)
        .await
        .unwrap()
        .without_provider_breakdown();
    let stored = read_models::stored::load_read_models(pool).await.unwrap();
    assert_eq!(stored.devices.len(), rebuilt.devices.len());
    assert_eq!(stored.devices, rebuilt.devices, "devices differ from a rebuild");
    assert_eq!(
        stored.device_stats, rebuilt.device_stats,
        "device_stats differ from a rebuild"
    );
    assert_eq!(
        stored.daily_usage, rebuilt.daily_usage,
        "daily_usage differs from a rebuild"
    );
}

pub fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2031, 3, 30, 20, 0, 0).single().expect("date")
}

/// Users and devices driven by the domain rules, appended through the event store.
pub struct World {
    pub store: Arc<EventStore>,
    pub clock: Arc<ManualClock>,
    users: Vec<(Uuid, UserState, i64)>,
    devices: HashMap<Uuid, (usize, DeviceState, i64)>,
    rng: StdRng,
    pricing: PricingTable,
}

impl World {
    pub async fn new(pool: &PgPool, users: usize, seed: u64) -> Self {
        migrated(pool).await;
        let clock = Arc::new(ManualClock::new(t0()));
        let store = Arc::new(
            EventStore::open_with_clock(pool.clone(), StoreConfig::default(), clock.clone())
                .await
                .expect("store"),
        );
        let mut world = World {
            store,
            clock,
            users: Vec::new(),
            devices: HashMap::new(),
            rng: StdRng::seed_from_u64(seed),
            pricing: PricingTable::standard(),
        };
        for _ in 0..users {
            let id = Uuid::now_v7();
            let register = UserCommand::Register {
                user_id: id,
                tier: [Tier::Free, Tier::Pro, Tier::Enterprise][world.rng.random_range(0..3)],
                email: Personal::new("user@example.com".into()),
                phone: Personal::new("+4915112345678".into()),
            };
            let events = user::decide(&register, &UserState::Unregistered, world.clock.now_utc()).expect("register");
            let mut state = UserState::Unregistered;
            for e in &events {
                state = user::evolve(state, e);
            }
            let quota = UserCommand::SetQuota {
                quota: Quota {
                    max_devices: 50,
                    max_cpu_cores: 400,
                    max_memory_mb: 1_000_000,
                },
            };
            let more = user::decide(&quota, &state, world.clock.now_utc()).expect("quota");
            for e in &more {
                state = user::evolve(state, e);
            }
            let all: Vec<Event> = events.into_iter().chain(more).map(Event::User).collect();
            let outcome = world
                .append(vec![(id, StreamType::User, id, ExpectedVersion::NoStream, all)])
                .await;
            world.users.push((id, state, outcome[0]));
        }
        world
    }

    /// The id of the `n`th user registered by [`World::new`].
    pub fn user_id(&self, n: usize) -> Uuid {
        self.users[n].0
    }

    async fn append(&self, streams: Vec<(Uuid, StreamType, Uuid, ExpectedVersion, Vec<Event>)>) -> Vec<i64> {
        let now = self.clock.now_utc();
        let batch = AppendBatch {
            streams: streams
                .into_iter()
                .map(|(stream_id, stream_type, owner_id, expected, events)| StreamAppend {
                    stream_id,
                    stream_type,
                    owner_id,
                    expected,
                    events: events
                        .iter()
                        .map(|e| NewEvent::from_event(e, EventMetadata::default(), now).expect("encode"))
                        .collect(),
                })
                .collect(),
            idempotency: None,
        };
        let outcome = self.store.append(batch).await.expect("append");
        outcome.streams.iter().map(|s| s.version).collect()
    }

    /// Runs a user command for the `n`th user (a tier change, a quota, an erasure), as the
    /// command API would: decided on the user's state, appended at its version. Returns whether
    /// the domain accepted it.
    pub async fn user_command(&mut self, n: usize, command: UserCommand) -> bool {
        let (id, state, version) = self.users[n].clone();
        let Ok(events) = user::decide(&command, &state, self.clock.now_utc()) else {
            return false;
        };
        if events.is_empty() {
            return false;
        }
        let all: Vec<Event> = events.iter().cloned().map(Event::User).collect();
        let versions = self
            .append(vec![(id, StreamType::User, id, ExpectedVersion::Exact(version), all)])
            .await;
        let user = &mut self.users[n];
        for e in &events {
            user.1 = user::evolve(std::mem::take(&mut user.1), e);
        }
        user.2 = versions[0];
        true
    }

    /// Runs `steps` random valid-or-refused commands, moving the clock by up to 3 hours
    /// between them (so sessions cross midnight and month ends).
    pub async fn run(&mut self, steps: usize) {
        for _ in 0..steps {
            let seconds = self.rng.random_range(0..10_800);
            self.clock.advance(chrono::Duration::seconds(seconds));
            let now = self.clock.now_utc();
            let pick_new = self.devices.is_empty() || self.rng.random_range(0..10) < 2;
            let (device_id, owner_index, command) = if pick_new {
                let owner_index = self.rng.random_range(0..self.users.len());
                let device_id = Uuid::now_v7();
                let command = DeviceCommand::Create {
                    device_id,
                    owner_id: self.users[owner_index].0,
                    provider: ["aws", "gcp", "huawei"][self.rng.random_range(0..3)].into(),
                    cpu_cores: [1, 2, 4][self.rng.random_range(0..3)],
                    memory_mb: [1024, 2048, 4096][self.rng.random_range(0..3)],
                    android_version: 14,
                };
                (device_id, owner_index, command)
            } else {
                // In creation order (v7 ids), not the map's, which differs from run to run:
                // a seed then gives the same history every time.
                let mut ids: Vec<Uuid> = self.devices.keys().copied().collect();
                ids.sort_unstable();
                let device_id = ids[self.rng.random_range(0..ids.len())];
                let command = match self.rng.random_range(0..10) {
                    0..=3 => DeviceCommand::Start,
                    4..=6 => DeviceCommand::Stop {
                        reason: StopReason::Requested,
                    },
                    7 => DeviceCommand::Resize {
                        cpu_cores: 2,
                        memory_mb: 2048,
                    },
                    8 => DeviceCommand::ReportFailure {
                        reason: "host lost".into(),
                    },
                    _ => DeviceCommand::Delete,
                };
                (device_id, self.devices[&device_id].0, command)
            };
            let (device_state, device_version) = self
                .devices
                .get(&device_id)
                .map(|(_, s, v)| (s.clone(), *v))
                .unwrap_or((DeviceState::Absent, 0));
            let (owner_id, owner_state, owner_version) = self.users[owner_index].clone();
            let ctx = DeviceContext {
                device: &device_state,
                owner: &owner_state,
                pricing: &self.pricing,
            };
            let Ok(events) = device::decide(&command, ctx, now) else {
                continue;
            };
            if events.is_empty() {
                continue;
            }
            let (device_events, owner_events): (Vec<Event>, Vec<Event>) =
                events.into_iter().partition(|e| e.stream_type() == StreamType::Device);
            let expected = |v: i64| {
                if v == 0 {
                    ExpectedVersion::NoStream
                } else {
                    ExpectedVersion::Exact(v)
                }
            };
            let mut streams = vec![(
                device_id,
                StreamType::Device,
                owner_id,
                expected(device_version),
                device_events.clone(),
            )];
            if !owner_events.is_empty() {
                streams.push((
                    owner_id,
                    StreamType::User,
                    owner_id,
                    expected(owner_version),
                    owner_events.clone(),
                ));
            }
            let versions = self.append(streams).await;
            let mut state = device_state;
            for e in &device_events {
                if let Event::Device(e) = e {
                    state = device::evolve(state, e);
                }
            }
            self.devices.insert(device_id, (owner_index, state, versions[0]));
            if let Some(version) = versions.get(1) {
                let user = &mut self.users[owner_index];
                for e in &owner_events {
                    if let Event::User(e) = e {
                        user.1 = user::evolve(std::mem::take(&mut user.1), e);
                    }
                }
                user.2 = *version;
            }
        }
    }
}

trait NowUtc {
    fn now_utc(&self) -> DateTime<Utc>;
}

impl NowUtc for ManualClock {
    fn now_utc(&self) -> DateTime<Utc> {
        event_log::Clock::now(self)
    }
}

/// Appends a row straight into the log, bypassing the writer's checks (as a foreign or
/// corrupted producer would), keeping positions dense.
pub async fn append_raw(
    pool: &PgPool,
    stream_id: Uuid,
    event_type: &str,
    schema_version: i16,
    payload: serde_json::Value,
) {
    let mut tx = pool.begin().await.expect("begin");
    let (position, hash, recorded_at): (i64, Vec<u8>, DateTime<Utc>) =
        sqlx::query_as("SELECT position, hash, recorded_at FROM log_head FOR UPDATE")
            .fetch_one(&mut *tx)
            .await
            .expect("head");
    let version: i64 = sqlx::query_scalar("SELECT coalesce(max(version), 0) + 1 FROM streams WHERE stream_id = $1")
        .bind(stream_id)
        .fetch_one(&mut *tx)
        .await
        .expect("version");
    sqlx::query(
        "INSERT INTO user_events (position, event_id, stream_id, stream_type, stream_version, event_type, schema_version,
             owner_id, occurred_at, recorded_at, payload, metadata, prev_hash, hash)
         VALUES ($1, $2, $3, 'device', $4, $5, $6, $3, $7, $7, $8, '{}', $9, $9)",
    )
    .bind(position + 1)
    .bind(Uuid::now_v7())
    .bind(stream_id)
    .bind(version)
    .bind(event_type)
    .bind(schema_version)
    .bind(recorded_at)
    .bind(payload)
    .bind(hash)
    .execute(&mut *tx)
    .await
    .expect("raw insert");
    sqlx::query("UPDATE log_head SET position = $1")
        .bind(position + 1)
        .execute(&mut *tx)
        .await
        .expect("head update");
    tx.commit().await.expect("commit");
}
