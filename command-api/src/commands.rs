//! Running a command: authorise, load, decide, append with expected versions, retry the
//! decision after a concurrent change, and answer idempotent retries from the log.

use domain::DomainError;
use domain::device::{self, DeviceCommand, DeviceContext};
use domain::user::{self, UserCommand};
use event_log::erasure_ledger::ErasureRecord;
use event_log::{AppendBatch, AppendError, AppendOutcome, ExpectedVersion, NewEvent, StreamAppend};
use event_schema::{Actor, ActorRole, Event, EventMetadata, StreamType};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::extract::RequestMeta;
use crate::problem::ApiError;
use crate::state::AppState;
use http_edge::auth::{Principal, Role, scope};

/// What a command that was accepted answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CommandAccepted {
    /// The user or device the command acted on.
    pub id: Uuid,
    /// Its stream's version after the command.
    pub stream_version: i64,
    /// Global position of the last event written (or of the stream's last event when the
    /// command changed nothing). Pass it as `minPosition` to the query API to read your write.
    pub position: i64,
}

/// Everything a command needs about its request.
#[derive(Debug, Clone)]
pub struct CommandContext {
    pub principal: Principal,
    pub meta: RequestMeta,
    /// Idempotency key scoped to the caller, and the hash of the request.
    pub idempotency: Option<(String, Vec<u8>)>,
}

impl CommandContext {
    pub fn new(principal: Principal, meta: RequestMeta, body: &[u8]) -> Self {
        let idempotency = meta.idempotency_key.as_ref().map(|key| {
            (
                format!("{}:{}:{key}", principal.role, principal.subject),
                meta.request_hash(body),
            )
        });
        CommandContext {
            principal,
            meta,
            idempotency,
        }
    }

    /// A context for one item of a batch: its own idempotency key and hash. The item's key
    /// holds a space, which a client's key never does (visible ASCII only), so no single
    /// request's key can name a batch item's outcome, or the other way round.
    pub fn for_item(&self, index: usize, item_body: &[u8]) -> Self {
        let mut item = self.clone();
        item.idempotency = self
            .idempotency
            .as_ref()
            .map(|(key, _)| (batch_item_key(key, index), self.meta.request_hash(item_body)));
        item
    }

    fn metadata(&self) -> EventMetadata {
        EventMetadata {
            correlation_id: Some(self.meta.request_id),
            causation_id: None,
            actor: Some(actor_of(&self.principal)),
            trace_id: Some(self.meta.trace_id.clone()),
            idempotency_key: self.meta.idempotency_key.clone(),
            extra: Default::default(),
        }
    }
}

/// The stored idempotency key of item `index` of a batch sent with the (caller-scoped) `key`.
pub fn batch_item_key(key: &str, index: usize) -> String {
    format!("{key} batch-item {index}")
}

/// One attempt's result: done, done without writing (the state already was what the
/// command asks), or decide again on fresh state.
enum Attempt {
    Done(Result<CommandAccepted, ApiError>),
    Unchanged(CommandAccepted),
    Retry,
}

/// Runs a user command on `user_id`.
pub async fn run_user_command(
    state: &AppState,
    ctx: &CommandContext,
    user_id: Uuid,
    command: UserCommand,
) -> Result<CommandAccepted, ApiError> {
    authorize_user_command(&ctx.principal, user_id, &command)?;
    with_retries(state, ctx, user_id, || user_attempt(state, ctx, user_id, &command)).await
}

/// Erases a user: destroys their data key first, then appends `UserErased`. In this order a
/// failure in between leaves the data unreadable with the event still to be written (the
/// retry writes it), never the event written with the data still readable.
pub async fn erase_user(state: &AppState, ctx: &CommandContext, user_id: Uuid) -> Result<CommandAccepted, ApiError> {
    let command = UserCommand::Erase;
    authorize_user_command(&ctx.principal, user_id, &command)?;
    let now = state.clock.now();
    // The ledger first: an erasure it does not hold is never acknowledged, so a restore of
    // the database can always be followed by reapplying every acknowledged erasure.
    if let Some(ledger) = &state.config.erasure_ledger {
        let record = ErasureRecord {
            user_id,
            erased_at: now,
        };
        if let Err(error) = ledger.record_blocking(record).await {
            tracing::error!(%user_id, error = %error, "erasure not recorded in the ledger; refused");
            return Err(ApiError::unavailable(
                "the erasure ledger cannot be written; retry later",
            ));
        }
    }
    if state.personal.erase(user_id, now).await? {
        metrics::counter!(crate::telemetry::PERSONAL_DATA_KEYS_DESTROYED_TOTAL).increment(1);
        tracing::info!(%user_id, "personal data key destroyed");
    }
    with_retries(state, ctx, user_id, || user_attempt(state, ctx, user_id, &command)).await
}

/// Runs a device command on `device_id`.
pub async fn run_device_command(
    state: &AppState,
    ctx: &CommandContext,
    device_id: Uuid,
    command: DeviceCommand,
) -> Result<CommandAccepted, ApiError> {
    run_device_command_loading(state, ctx, device_id, command, Load::FromLog).await
}

/// Runs a command on a device id this process has just generated (`Uuid::now_v7()` for a
/// create without a reference). No stream can have that id, so the first attempt decides on
/// an empty stream without reading the log; were the id taken after all, the append's
/// `NoStream` check refuses it, and the next attempt reads the log as any other does.
pub async fn run_device_command_on_generated_id(
    state: &AppState,
    ctx: &CommandContext,
    device_id: Uuid,
    command: DeviceCommand,
) -> Result<CommandAccepted, ApiError> {
    run_device_command_loading(state, ctx, device_id, command, Load::AssumeNew).await
}

/// Runs a device command whose first attempt gets the device's stream as `first` says; every
/// later attempt reads it from the log.
async fn run_device_command_loading(
    state: &AppState,
    ctx: &CommandContext,
    device_id: Uuid,
    command: DeviceCommand,
    first: Load,
) -> Result<CommandAccepted, ApiError> {
    authorize_device_command(&ctx.principal, &command)?;
    let mut load = first;
    with_retries(state, ctx, device_id, || {
        let this_attempt = std::mem::replace(&mut load, Load::FromLog);
        device_attempt(state, ctx, device_id, &command, this_attempt)
    })
    .await
}

/// How an attempt gets the state of the command's own stream when its slot is empty.
#[derive(Debug, Clone, Copy)]
enum Load {
    FromLog,
    /// The stream is one this process has just named: empty, nothing to read.
    AssumeNew,
}

async fn with_retries<F, Fut>(
    state: &AppState,
    ctx: &CommandContext,
    id: Uuid,
    mut attempt: F,
) -> Result<CommandAccepted, ApiError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Attempt, ApiError>>,
{
    // A retried request is not looked up first: that read would cost every request a round
    // trip for the few that are retries. Its attempt either appends, and the writer finds the
    // key in the same transaction and answers with the stored outcome (writing nothing), or
    // appends nothing, and is answered from the stored outcome below.
    for _ in 0..state.config.max_attempts.max(1) {
        match attempt().await {
            Ok(Attempt::Done(result)) => {
                // A duplicate that lost the race to its twin may be refused by state the twin
                // created: answer it as the twin was answered.
                if result.is_err()
                    && let Some(accepted) = replay_idempotent(state, ctx, id).await?
                {
                    return Ok(accepted);
                }
                return result;
            }
            // Likewise a duplicate that finds the state its twin created already what it asks
            // (a resize to the size the twin set): the twin's answer, not a no-op's, whose
            // position would be the stream's last event rather than the twin's last event.
            Ok(Attempt::Unchanged(unchanged)) => {
                return Ok(replay_idempotent(state, ctx, id).await?.unwrap_or(unchanged));
            }
            Ok(Attempt::Retry) => {
                metrics::counter!(crate::telemetry::COMMAND_RETRIES_TOTAL).increment(1);
            }
            Err(error) => return Err(error),
        }
    }
    Err(ApiError::Conflict {
        code: "concurrency_conflict",
        detail: "the resource kept changing concurrently; retry the request".to_owned(),
    })
}

/// The stored answer of an earlier request with this idempotency key, if there is one.
async fn replay_idempotent(
    state: &AppState,
    ctx: &CommandContext,
    id: Uuid,
) -> Result<Option<CommandAccepted>, ApiError> {
    let Some((key, request_hash)) = &ctx.idempotency else {
        return Ok(None);
    };
    match state.reader.idempotent_outcome(key).await? {
        None => Ok(None),
        Some((stored_hash, _)) if stored_hash != *request_hash => {
            Err(AppendError::IdempotencyKeyReused { key: key.clone() }.into())
        }
        Some((_, outcome)) => {
            metrics::counter!(crate::telemetry::IDEMPOTENT_REPLAYS_TOTAL).increment(1);
            Ok(Some(accepted(id, &outcome)))
        }
    }
}

/// The answer for an outcome. The command's own stream is always the first of its batch, so
/// a replay answers with the original id even when the retry asked for a fresh one (a create
/// whose device id the server generated).
fn accepted(fallback_id: Uuid, outcome: &AppendOutcome) -> CommandAccepted {
    let (id, stream_version) = outcome
        .streams
        .first()
        .map_or((fallback_id, 0), |s| (s.stream_id, s.version));
    CommandAccepted {
        id,
        stream_version,
        position: outcome.last_position,
    }
}

fn expected(version: i64) -> ExpectedVersion {
    if version == 0 {
        ExpectedVersion::NoStream
    } else {
        ExpectedVersion::Exact(version)
    }
}

/// The events as the log stores them: personal fields (those an event type lists in
/// `PERSONAL_FIELDS`) encrypted with the owner's data key, created on first use.
async fn encode(
    state: &AppState,
    ctx: &CommandContext,
    owner_id: Uuid,
    events: &[Event],
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<NewEvent>, ApiError> {
    let metadata = ctx.metadata();
    let mut encoded = Vec::with_capacity(events.len());
    let mut data_key = None;
    for event in events {
        let mut new_event =
            NewEvent::from_event(event, metadata.clone(), now).map_err(|e| ApiError::internal(e.to_string()))?;
        let personal_fields = event_schema::kind_of(event.event_type()).map_or(&[][..], |kind| kind.personal_fields);
        if !personal_fields.is_empty() {
            let key = match &data_key {
                Some(key) => key,
                None => data_key.insert(state.personal.key_for_writing(owner_id, now).await?),
            };
            event_log::personal::seal_fields(key, owner_id, personal_fields, &mut new_event.payload);
        }
        encoded.push(new_event);
    }
    Ok(encoded)
}

fn batch(ctx: &CommandContext, streams: Vec<StreamAppend>) -> AppendBatch {
    AppendBatch {
        streams,
        idempotency: ctx.idempotency.as_ref().map(|(key, hash)| event_log::IdempotencyKey {
            key: key.clone(),
            request_hash: hash.clone(),
        }),
    }
}

async fn user_attempt(
    state: &AppState,
    ctx: &CommandContext,
    user_id: Uuid,
    command: &UserCommand,
) -> Result<Attempt, ApiError> {
    let now = state.clock.now();
    let mut slot = state.users.lock(user_id).await;
    let loaded = slot.load(&state.reader).await?.clone();
    let events: Vec<Event> = match user::decide(command, &loaded.state, now) {
        Ok(events) if !events.is_empty() => events.into_iter().map(Event::User).collect(),
        decided => {
            if !cached_states_current(state, &[(user_id, loaded.version)]).await? {
                slot.clear();
                return Ok(Attempt::Retry);
            }
            return Ok(match decided {
                Ok(_) => Attempt::Unchanged(CommandAccepted {
                    id: user_id,
                    stream_version: loaded.version,
                    position: loaded.last_position,
                }),
                Err(error) => Attempt::Done(Err(error.into())),
            });
        }
    };
    let stream = StreamAppend {
        stream_id: user_id,
        stream_type: StreamType::User,
        owner_id: user_id,
        expected: expected(loaded.version),
        events: encode(state, ctx, user_id, &events, now).await?,
    };
    slot.appending();
    match state.append(batch(ctx, vec![stream])).await {
        Ok(outcome) => {
            if outcome.replayed {
                slot.clear();
            } else {
                slot.advance(&events, outcome.streams[0].version, outcome.last_position);
            }
            Ok(Attempt::Done(Ok(accepted(user_id, &outcome))))
        }
        Err(AppendError::WrongExpectedVersion { .. }) => {
            slot.clear();
            Ok(Attempt::Retry)
        }
        Err(error) => {
            // Its outcome may be unknown (a broken commit): reload before the next decision.
            slot.clear();
            Err(error.into())
        }
    }
}

async fn device_attempt(
    state: &AppState,
    ctx: &CommandContext,
    device_id: Uuid,
    command: &DeviceCommand,
    load: Load,
) -> Result<Attempt, ApiError> {
    let now = state.clock.now();
    // Lock order is always device, then owner: no deadlock between commands.
    let mut device_slot = state.devices.lock(device_id).await;
    let device = match load {
        Load::FromLog => device_slot.load(&state.reader).await?.clone(),
        Load::AssumeNew => device_slot.load_assuming_new().clone(),
    };
    // Another tenant's device is answered exactly as a missing one: nobody learns from us
    // whether an id they do not own exists.
    let owner_id = match command {
        DeviceCommand::Create { owner_id, .. } => *owner_id,
        _ => match device.state.device() {
            Some(d) if may_touch_devices_of(&ctx.principal, d.owner_id) => d.owner_id,
            _ => {
                if !cached_states_current(state, &[(device_id, device.version)]).await? {
                    device_slot.clear();
                    return Ok(Attempt::Retry);
                }
                return Ok(Attempt::Done(Err(DomainError::DeviceNotFound.into())));
            }
        },
    };

    // Commands that reserve quota hold the owner's slot and check its version: two creates
    // racing for the last unit of quota cannot both win. The others only read the owner.
    let reserves_quota = matches!(command, DeviceCommand::Create { .. } | DeviceCommand::Resize { .. });
    let mut owner_slot = if reserves_quota {
        Some(state.users.lock(owner_id).await)
    } else {
        None
    };
    let owner = match &mut owner_slot {
        Some(slot) => slot.load(&state.reader).await?.clone(),
        None => state.users.snapshot(owner_id, &state.reader).await?,
    };
    let decision = device::decide(
        command,
        DeviceContext {
            device: &device.state,
            owner: &owner.state,
            pricing: &state.pricing,
        },
        now,
    );
    let events = match decision {
        Ok(events) if !events.is_empty() => events,
        decided => {
            // Nothing to append, so no version check will catch a stale cache: a refusal (or
            // a no-op) is only answered once the states it rests on are the log's.
            if !cached_states_current(state, &[(device_id, device.version), (owner_id, owner.version)]).await? {
                device_slot.clear();
                match &mut owner_slot {
                    Some(slot) => slot.clear(),
                    None => {
                        drop(device_slot);
                        state.users.forget(owner_id).await;
                    }
                }
                return Ok(Attempt::Retry);
            }
            return Ok(match decided {
                Ok(_) => Attempt::Unchanged(CommandAccepted {
                    id: device_id,
                    stream_version: device.version,
                    position: device.last_position,
                }),
                Err(error) => Attempt::Done(Err(error.into())),
            });
        }
    };
    let (device_events, owner_events): (Vec<Event>, Vec<Event>) =
        events.into_iter().partition(|e| e.stream_type() == StreamType::Device);
    let mut streams = vec![StreamAppend {
        stream_id: device_id,
        stream_type: StreamType::Device,
        owner_id,
        expected: expected(device.version),
        events: encode(state, ctx, owner_id, &device_events, now).await?,
    }];
    if !owner_events.is_empty() {
        streams.push(StreamAppend {
            stream_id: owner_id,
            stream_type: StreamType::User,
            owner_id,
            // A release never breaks a quota, so it needs no version check (and deletes of
            // one user's devices do not queue behind each other).
            expected: if reserves_quota {
                expected(owner.version)
            } else {
                ExpectedVersion::Any
            },
            events: encode(state, ctx, owner_id, &owner_events, now).await?,
        });
    }
    device_slot.appending();
    if let Some(slot) = &mut owner_slot {
        slot.appending();
    }
    match state.append(batch(ctx, streams)).await {
        Ok(outcome) => {
            if outcome.replayed {
                device_slot.clear();
                if let Some(slot) = &mut owner_slot {
                    slot.clear();
                }
            } else {
                device_slot.advance(&device_events, outcome.streams[0].version, outcome.last_position);
                if let Some(owner_revision) = outcome.streams.get(1) {
                    match &mut owner_slot {
                        Some(slot) => slot.advance(&owner_events, owner_revision.version, outcome.last_position),
                        None => {
                            drop(device_slot);
                            state
                                .users
                                .advance(owner_id, &owner_events, owner_revision.version, outcome.last_position)
                                .await;
                        }
                    }
                }
            }
            Ok(Attempt::Done(Ok(accepted(device_id, &outcome))))
        }
        Err(AppendError::WrongExpectedVersion { .. }) => {
            device_slot.clear();
            if let Some(slot) = &mut owner_slot {
                slot.clear();
            }
            Ok(Attempt::Retry)
        }
        Err(error) => {
            // Its outcome may be unknown (a broken commit): reload before the next decision.
            device_slot.clear();
            if let Some(slot) = &mut owner_slot {
                slot.clear();
            }
            Err(error.into())
        }
    }
}

/// True when every `(stream, version)` a decision read from the cache is the log's current
/// version (0: no such stream). A cache can only fall behind the log (another process wrote
/// the stream, or an append whose caller gave up committed later); appends catch that with
/// their expected versions, and decisions that append nothing are checked here.
async fn cached_states_current(state: &AppState, cached: &[(Uuid, i64)]) -> Result<bool, ApiError> {
    let ids: Vec<Uuid> = cached.iter().map(|(id, _)| *id).collect();
    let current = state.reader.stream_versions(&ids).await?;
    let stale = cached.iter().any(|(id, version)| {
        let logged = current.iter().find(|(stream, _)| stream == id).map_or(0, |(_, v)| *v);
        logged != *version
    });
    if stale {
        metrics::counter!(crate::telemetry::COMMAND_STALE_DECISIONS_TOTAL).increment(1);
        tracing::info!(?cached, ?current, "cached aggregate behind the log; deciding again");
    }
    Ok(!stale)
}

fn forbidden(what: &str) -> ApiError {
    ApiError::forbidden(format!("this token may not {what}"))
}

/// Who may run which user command.
fn authorize_user_command(principal: &Principal, user_id: Uuid, command: &UserCommand) -> Result<(), ApiError> {
    let allowed = principal.is_admin()
        || match command {
            UserCommand::Register { .. } => principal.is_user(user_id) || principal.has_scope(scope::USERS_WRITE),
            UserCommand::ChangeTier { .. } => principal.has_scope(scope::USERS_WRITE),
            UserCommand::SetQuota { .. } => false,
            UserCommand::Erase => principal.is_user(user_id),
        };
    if allowed {
        Ok(())
    } else {
        Err(forbidden("act on this user"))
    }
}

/// Who may run a device command at all: decided from the token and the request alone, so a
/// refusal (403) says nothing about any device.
fn authorize_device_command(principal: &Principal, command: &DeviceCommand) -> Result<(), ApiError> {
    let allowed = principal.is_admin()
        || principal.role == http_edge::auth::Role::User
        || principal.has_scope(scope::DEVICES_WRITE)
        || (matches!(command, DeviceCommand::ReportFailure { .. }) && principal.has_scope(scope::DEVICES_REPORT));
    if !allowed {
        return Err(forbidden("act on devices"));
    }
    match command {
        DeviceCommand::Create { owner_id, .. } if !may_touch_devices_of(principal, *owner_id) => {
            Err(forbidden("create devices for another user"))
        }
        _ => Ok(()),
    }
}

/// Whether the caller (already allowed the command) may touch devices of `owner_id`: a user
/// only their own; admins and scoped services every user's.
fn may_touch_devices_of(principal: &Principal, owner_id: Uuid) -> bool {
    principal.role != http_edge::auth::Role::User || principal.is_user(owner_id)
}

/// The actor recorded in the metadata of the events a caller's command appends.
fn actor_of(principal: &Principal) -> Actor {
    Actor {
        role: match principal.role {
            Role::User => ActorRole::User,
            Role::Admin => ActorRole::Admin,
            // Auditors are refused every command, so no event names one; should that ever
            // change, `service` (a non-person principal named by its subject) is closest.
            Role::Service | Role::Auditor => ActorRole::Service,
        },
        subject: principal.subject.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::extract::FromRequestParts;
    use domain::device::DeviceCommand;
    use domain::user::UserCommand;
    use event_log::{EventStore, LogReader, StoreConfig, SystemClock};
    use event_schema::{Personal, Tier};
    use http_edge::auth::{KeySource, Principal, Role, TokenVerifier};
    use sqlx::PgPool;
    use uuid::Uuid;

    use super::{CommandContext, run_device_command, run_device_command_on_generated_id, run_user_command};
    use crate::config::ApiConfig;
    use crate::extract::RequestMeta;
    use crate::state::{AppState, Inner};

    async fn state(pool: &PgPool) -> AppState {
        event_log::migrate(pool).await.unwrap();
        let config = ApiConfig {
            keys: KeySource::Secret("test-secret".into()),
            ..ApiConfig::default()
        };
        let store = Arc::new(EventStore::open(pool.clone(), StoreConfig::default()).await.unwrap());
        let verifier = TokenVerifier::new(&config.keys).unwrap();
        let metrics = http_edge::telemetry::prometheus();
        AppState(Arc::new(Inner::new(
            config,
            store,
            verifier,
            metrics,
            Arc::new(SystemClock),
        )))
    }

    async fn context(user: Uuid, path: &str) -> CommandContext {
        let request = axum::http::Request::post(path).body(()).unwrap();
        let meta = RequestMeta::from_request_parts(&mut request.into_parts().0, &())
            .await
            .unwrap();
        let principal = Principal {
            role: Role::User,
            subject: user.to_string(),
            user_id: Some(user),
            scopes: Vec::new(),
            expires_at: i64::MAX,
        };
        CommandContext::new(principal, meta, b"")
    }

    /// The path an id generated here takes if it is in the log after all (another process
    /// wrote it; here, this process before its slot was forgotten): the first attempt decides
    /// on an empty stream and its append is refused; the next reads the log and is refused as
    /// a create on a taken id always is, writing nothing.
    #[sqlx::test(migrations = false)]
    async fn a_generated_id_found_in_the_log_is_read_from_it_and_refused(pool: PgPool) {
        let state = state(&pool).await;
        let owner = Uuid::now_v7();
        let register = UserCommand::Register {
            user_id: owner,
            tier: Tier::Pro,
            email: Personal::new("someone@example.com".into()),
            phone: Personal::new("+4915112345678".into()),
        };
        run_user_command(&state, &context(owner, "/v1/users").await, owner, register)
            .await
            .unwrap();
        let device = Uuid::now_v7();
        let create = DeviceCommand::Create {
            device_id: device,
            owner_id: owner,
            provider: "aws".into(),
            cpu_cores: 2,
            memory_mb: 2048,
            android_version: 14,
        };
        let ctx = context(owner, "/v1/devices").await;
        run_device_command(&state, &ctx, device, create.clone()).await.unwrap();
        let reader = LogReader::new(pool.clone());
        let written = reader.read_all(0, 1_000).await.unwrap().len();

        state.devices.forget(device).await;
        let refused = run_device_command_on_generated_id(&state, &ctx, device, create)
            .await
            .unwrap_err();
        assert_eq!(refused.problem().code, "device_already_exists", "{refused:?}");
        assert_eq!(reader.read_all(0, 1_000).await.unwrap().len(), written);
    }
}
