//! Ours: the Cloudphone event log (`event_log::EventStore`), exactly as the platform opens it.
//!
//! What it guarantees on top of per-stream optimistic concurrency (the `streams` table's
//! version check): one global position per event, dense (1, 2, 3, ... no gaps) and visible in
//! order, so a reader paging by position never skips a late commit; and a SHA-256 hash chain
//! over every event. Both need the appends serialised (the `log_head` row lock); group commit
//! is what makes that affordable: concurrent appends share one transaction and one WAL flush.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use event_log::{AppendBatch, AppendError, EventStore, ExpectedVersion, LogReader, NewEvent, StreamAppend};
use event_schema::{EventMetadata, StreamType};

use crate::drive::Writer;
use crate::workload::{DeviceState, Lifecycle, Plan, Step};

/// How a writer knows a device's state before it decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Kept in memory from its own previous commands (the command API's slot cache).
    Cached,
    /// Read back from the log on every command (`LogReader::read_stream` + fold), as cqrs-es
    /// loads an aggregate.
    Load,
}

/// One writer task's handles and memory.
#[derive(Debug)]
pub struct OurWriter {
    pub plan: Arc<Plan>,
    pub store: Arc<EventStore>,
    pub reader: LogReader,
    pub source: Source,
    /// `EventStore::append_unbatched` (one transaction per command) instead of group commit.
    pub unbatched: bool,
    pub cache: HashMap<u32, (DeviceState, i64)>,
}

impl OurWriter {
    async fn load(&self, step: Step) -> anyhow::Result<(DeviceState, i64)> {
        const PAGE: i64 = 5_000;
        let id = self.plan.devices[step.device as usize].id;
        let (mut state, mut version) = (DeviceState::default(), 0);
        loop {
            let page = self.reader.read_stream(id, version, PAGE).await?;
            for envelope in &page {
                state = state.evolve_logged(&envelope.decode()?);
                version = envelope.stream_version;
            }
            if (page.len() as i64) < PAGE {
                return Ok((state, version));
            }
        }
    }

    async fn append(&self, step: Step, event: Lifecycle, version: i64) -> anyhow::Result<i64> {
        let device = &self.plan.devices[step.device as usize];
        let occurred_at = event.occurred_at();
        let new = NewEvent::from_event(&event.into(), EventMetadata::default(), occurred_at)?;
        let batch = AppendBatch::single(StreamAppend {
            stream_id: device.id,
            stream_type: StreamType::Device,
            owner_id: device.owner,
            expected: if version == 0 {
                ExpectedVersion::NoStream
            } else {
                ExpectedVersion::Exact(version)
            },
            events: vec![new],
        });
        let outcome = if self.unbatched {
            self.store.append_unbatched(batch).await
        } else {
            self.store.append(batch).await
        };
        let outcome = outcome?;
        outcome
            .streams
            .first()
            .map(|s| s.version)
            .context("append outcome without its stream")
    }
}

impl Writer for OurWriter {
    async fn execute(&mut self, step: Step) -> anyhow::Result<u64> {
        let mut conflicts = 0;
        loop {
            let (state, version) = match self.source {
                Source::Cached => self.cache.get(&step.device).copied().unwrap_or_default(),
                Source::Load => self.load(step).await?,
            };
            let event = state.decide(self.plan.command(step))?;
            let next = state.evolve(&event);
            match self.append(step, event, version).await {
                Ok(version) => {
                    if self.source == Source::Cached {
                        self.cache.insert(step.device, (next, version));
                    }
                    return Ok(conflicts);
                }
                Err(error) if self.source == Source::Load && is_conflict(&error) => conflicts += 1,
                Err(error) => return Err(error),
            }
        }
    }
}

fn is_conflict(error: &anyhow::Error) -> bool {
    matches!(
        error.downcast_ref::<AppendError>(),
        Some(AppendError::WrongExpectedVersion { .. })
    )
}
