//! The owners of a world's devices, registered as the command API registers users:
//! `UserRegistered` with email and phone sealed under each owner's own data key, their tier's
//! `QuotaChanged`, and an admin's raises.

use anyhow::Context;
use chrono::Utc;
use event_log::personal::PersonalDataKeys;
use event_log::{AppendBatch, EventStore, ExpectedVersion, NewEvent, StoreConfig, StreamAppend};
use event_schema::{
    Actor, ActorRole, Event, EventMetadata, EventPayload as _, Personal, Quota, QuotaChanged, StreamType, Tier,
    UserRegistered,
};
use futures::{StreamExt as _, TryStreamExt as _};
use operator_console::Progress;
use operator_console::flags::MasterKeyArgs;
use sqlx::PgPool;
use uuid::Uuid;

/// Users registered per append (each with its own data key).
const USERS_PER_BATCH: usize = 1_000;

/// Registers every owner of a device, as the command API does: `UserRegistered` with email
/// and phone encrypted under the owner's new data key, then `QuotaChanged`. `remaining` events
/// are spread over them (two each when there are enough; past two, each further one is an
/// admin's `QuotaChanged`; with fewer, fewer users, some with `UserRegistered` only).
pub async fn register_owners(pool: &PgPool, master_keys: &MasterKeyArgs, remaining: i64) -> anyhow::Result<()> {
    let owners: Vec<Uuid> = sqlx::query_scalar("SELECT DISTINCT owner_id FROM user_events ORDER BY owner_id")
        .fetch_all(pool)
        .await
        .context("the owners of the history")?;
    if owners.is_empty() || remaining <= 0 {
        return Ok(());
    }
    let registrations = owners
        .len()
        .min(usize::try_from((remaining + 1) / 2).unwrap_or(usize::MAX));
    let (base, extra) = (remaining / registrations as i64, remaining % registrations as i64);
    let keys = PersonalDataKeys::new(pool.clone(), master_keys.keyring()?);
    let store = EventStore::open(pool.clone(), StoreConfig::default()).await?;
    let registered_at = Utc::now() - chrono::Duration::days(200);
    let mut progress = Progress::new("users", registrations as u64);
    let mut done = 0usize;
    for chunk in owners[..registrations].chunks(USERS_PER_BATCH) {
        // One data key per user: created concurrently, as many portals would.
        let now = Utc::now();
        let data_keys: Vec<_> = futures::stream::iter(chunk.iter().copied())
            .map(|user| {
                let keys = keys.clone();
                async move { keys.key_for_writing(user, now).await.map(|key| (user, key)) }
            })
            .buffered(16)
            .try_collect()
            .await
            .context("data keys")?;
        let mut streams = Vec::with_capacity(chunk.len());
        for (user, key) in data_keys {
            let index = done + streams.len();
            let count = base + i64::from((index as i64) < extra);
            streams.push(registration(&key, user, index, count, registered_at)?);
        }
        done += streams.len();
        store
            .append(AppendBatch {
                streams,
                idempotency: None,
            })
            .await
            .context("append registrations")?;
        progress.set(done as u64);
    }
    progress.finish();
    store.shutdown().await;
    Ok(())
}

/// One user's registration as `count` events (`UserRegistered`, its tier's `QuotaChanged`,
/// then an admin's raises), personal fields sealed.
fn registration(
    key: &event_log::personal::DataKey,
    user: Uuid,
    index: usize,
    count: i64,
    registered_at: chrono::DateTime<Utc>,
) -> anyhow::Result<StreamAppend> {
    let tier = [Tier::Free, Tier::Basic, Tier::Pro, Tier::Enterprise][index % 4];
    let metadata = || EventMetadata {
        correlation_id: Some(Uuid::now_v7()),
        actor: Some(Actor {
            role: ActorRole::User,
            subject: user.to_string(),
        }),
        trace_id: Some(Uuid::now_v7().simple().to_string()),
        ..EventMetadata::default()
    };
    let registered: Event = UserRegistered {
        user_id: user,
        tier,
        email: Personal::new(format!("user{index}@example.com")),
        phone: Personal::new(format!("+49151{:08}", index % 100_000_000)),
        registered_at,
    }
    .into();
    // The tiers' default quotas (`domain::user::default_quota`), then raises by an admin.
    let quota = |max_devices: u32| Quota {
        max_devices,
        max_cpu_cores: max_devices * 8,
        max_memory_mb: max_devices * 16_384,
    };
    let default_quota = match tier {
        Tier::Free => Quota {
            max_devices: 1,
            max_cpu_cores: 2,
            max_memory_mb: 4_096,
        },
        Tier::Basic => Quota {
            max_devices: 3,
            max_cpu_cores: 8,
            max_memory_mb: 16_384,
        },
        Tier::Pro => Quota {
            max_devices: 10,
            max_cpu_cores: 40,
            max_memory_mb: 81_920,
        },
        Tier::Enterprise => Quota {
            max_devices: 100,
            max_cpu_cores: 800,
            max_memory_mb: 1_638_400,
        },
    };
    let mut sealed = NewEvent::from_event(&registered, metadata(), registered_at)?;
    event_log::personal::seal_fields(key, user, UserRegistered::PERSONAL_FIELDS, &mut sealed.payload);
    let mut events = vec![sealed];
    if count >= 2 {
        let changed: Event = QuotaChanged {
            user_id: user,
            quota: default_quota,
        }
        .into();
        events.push(NewEvent::from_event(&changed, metadata(), registered_at)?);
    }
    for raise in 2..count {
        let changed: Event = QuotaChanged {
            user_id: user,
            quota: quota(100 + u32::try_from(raise).unwrap_or(0)),
        }
        .into();
        let admin = EventMetadata {
            actor: Some(Actor {
                role: ActorRole::Admin,
                subject: "load-admin".into(),
            }),
            ..metadata()
        };
        events.push(NewEvent::from_event(&changed, admin, registered_at)?);
    }
    Ok(StreamAppend {
        stream_id: user,
        stream_type: StreamType::User,
        owner_id: user,
        expected: ExpectedVersion::NoStream,
        events,
    })
}
