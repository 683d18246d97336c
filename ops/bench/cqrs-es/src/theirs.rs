//! The peer: cqrs-es 0.5 with postgres-es 0.5 (`PostgresEventRepository` behind a
//! `PersistedEventStore` in event-store mode), on sqlx 0.8.
//!
//! What it guarantees: per aggregate, a gap-free `sequence` (the primary key
//! `(aggregate_type, aggregate_id, sequence)` refuses a second writer of the same sequence:
//! optimistic concurrency). There is no global order across aggregates and no hash chain; a
//! consumer that wants "everything after X" has nothing to page by.
//!
//! What it costs: `commit` is one transaction per command (BEGIN, one INSERT per event,
//! COMMIT), so every command waits for its own WAL flush, as PostgreSQL group-flushes it with
//! whatever else is committing at that moment.

use std::collections::HashMap;
use std::sync::Arc;

use cqrs_es::event_sink::EventSink;
use cqrs_es::persist::EventStoreAggregateContext;
use cqrs_es::persist::PersistedEventStore;
use cqrs_es::{Aggregate, AggregateError, CqrsFramework, DomainEvent, EventStore as _};
use postgres_es::PostgresEventRepository;
use serde::{Deserialize, Serialize};

use crate::drive::Writer;
use crate::workload::{Command, DeviceState, Lifecycle, Plan, Refused, Step};

/// The `events` table of postgres-es's `db/init.sql` (and its `snapshots` table, which
/// event-store mode never writes), without the sample row, view table and user it also holds.
pub const INIT_SQL: &str = "
CREATE TABLE events
(
    aggregate_type text                         NOT NULL,
    aggregate_id   text                         NOT NULL,
    sequence       bigint CHECK (sequence >= 0) NOT NULL,
    event_type     text                         NOT NULL,
    event_version  text                         NOT NULL,
    payload        json                         NOT NULL,
    metadata       json                         NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);
CREATE TABLE snapshots
(
    aggregate_type   text                                 NOT NULL,
    aggregate_id     text                                 NOT NULL,
    last_sequence    bigint CHECK (last_sequence >= 0)    NOT NULL,
    current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL,
    payload          json                                 NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
);
";

impl DomainEvent for Lifecycle {
    fn event_type(&self) -> String {
        Lifecycle::event_type(self).to_owned()
    }

    fn event_version(&self) -> String {
        self.schema_version().to_string()
    }
}

/// The device aggregate the cqrs-es way: `handle` decides and writes to the sink, `apply`
/// evolves. The decision is the same function our side calls.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeviceAggregate {
    state: DeviceState,
}

impl Aggregate for DeviceAggregate {
    const TYPE: &'static str = "Device";
    type Command = Command;
    type Event = Lifecycle;
    type Error = Refused;
    type Services = ();

    async fn handle(&mut self, command: Command, _: &(), sink: &EventSink<Self>) -> Result<(), Refused> {
        let event = self.state.decide(command)?;
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: Lifecycle) {
        self.state = self.state.evolve(&event);
    }
}

pub type Store = PersistedEventStore<PostgresEventRepository, DeviceAggregate>;
pub type Framework = CqrsFramework<DeviceAggregate, Store>;

/// A store over `pool`: event-store mode (events are the source of truth, no snapshots).
pub fn store(pool: sqlx08::PgPool) -> Store {
    PersistedEventStore::new_event_store(PostgresEventRepository::new(pool))
}

/// The framework's natural path: load the aggregate from all its events, handle, commit.
pub fn framework(pool: sqlx08::PgPool) -> Arc<Framework> {
    Arc::new(CqrsFramework::new(store(pool), vec![], ()))
}

/// What a writer keeps of a device between commands in `append` mode (as our command API
/// keeps it in its slot cache).
#[derive(Debug, Clone, Default)]
pub struct Cached {
    pub aggregate: DeviceAggregate,
    pub sequence: usize,
}

/// Decides on the cached aggregate and commits through `PersistedEventStore::commit` (the
/// same call `CqrsFramework::execute` ends with), skipping only the load.
pub async fn commit_cached(
    store: &Store,
    aggregate_id: &str,
    cached: &mut Cached,
    command: Command,
) -> Result<(), AggregateError<Refused>> {
    let mut context = EventStoreAggregateContext {
        aggregate_id: aggregate_id.to_owned(),
        aggregate: cached.aggregate.clone(),
        current_sequence: cached.sequence,
        current_snapshot: None,
    };
    let sink = EventSink::default();
    context
        .aggregate
        .handle(command, &(), &sink)
        .await
        .map_err(AggregateError::UserError)?;
    let decided = context.aggregate.clone();
    let events = sink.collect().await;
    let count = events.len();
    store.commit(events, context, HashMap::new()).await?;
    cached.aggregate = decided;
    cached.sequence += count;
    Ok(())
}

/// Is this the optimistic-concurrency refusal (another writer took the sequence)?
pub fn is_conflict(error: &AggregateError<Refused>) -> bool {
    matches!(error, AggregateError::AggregateConflict)
}

/// One writer task's handles and memory.
pub struct TheirWriter {
    pub plan: Arc<Plan>,
    pub framework: Arc<Framework>,
    pub store: Arc<Store>,
    /// `CqrsFramework::execute` (load every event, handle, commit) instead of committing on
    /// the cached aggregate.
    pub natural: bool,
    pub cache: HashMap<u32, Cached>,
}

impl std::fmt::Debug for TheirWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TheirWriter(natural: {}, {} cached)", self.natural, self.cache.len())
    }
}

impl Writer for TheirWriter {
    async fn execute(&mut self, step: Step) -> anyhow::Result<u64> {
        let id = &self.plan.devices[step.device as usize].id_text;
        let mut conflicts = 0;
        loop {
            let command = self.plan.command(step);
            let result = if self.natural {
                self.framework.execute(id, command).await
            } else {
                let cached = self.cache.entry(step.device).or_default();
                commit_cached(&self.store, id, cached, command).await
            };
            match result {
                Ok(()) => return Ok(conflicts),
                Err(error) if self.natural && is_conflict(&error) => conflicts += 1,
                Err(error) => return Err(error.into()),
            }
        }
    }
}
