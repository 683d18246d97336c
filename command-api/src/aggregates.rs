//! The aggregates the API decides on, cached in memory per stream.
//!
//! A command locks its stream's slot, so commands on one aggregate run one at a time in this
//! process and never conflict with each other; the slot keeps the state and version from the
//! last command, so the hot path reads nothing from PostgreSQL. Another process writing the
//! same stream is caught by the expected version on append: the slot is cleared, reloaded from
//! the log, and the command decided again. Correctness rests on the log's version check; the
//! cache only saves work.

use std::sync::Arc;

use domain::device::{self, DeviceState};
use domain::user::{self, UserState};
use event_log::{LogReader, ReadError};
use event_schema::{Event, StreamType};
use moka::sync::Cache;
use tokio::sync::{Mutex, OwnedMutexGuard};
use uuid::Uuid;

/// A state rebuilt from a stream: what a decision reads and the version it must append at.
pub trait Aggregate: Default + Clone + Send + Sync + 'static {
    const STREAM_TYPE: StreamType;
    /// Applies an event of this aggregate's stream; ignores events of other streams.
    fn apply(self, event: &Event) -> Self;
}

impl Aggregate for UserState {
    const STREAM_TYPE: StreamType = StreamType::User;

    fn apply(self, event: &Event) -> Self {
        match event {
            Event::User(e) => user::evolve(self, e),
            Event::Device(_) => self,
        }
    }
}

impl Aggregate for DeviceState {
    const STREAM_TYPE: StreamType = StreamType::Device;

    fn apply(self, event: &Event) -> Self {
        match event {
            Event::Device(e) => device::evolve(self, e),
            Event::User(_) => self,
        }
    }
}

/// An aggregate's state at a version of its stream.
#[derive(Debug, Clone)]
pub struct Loaded<S> {
    pub state: Arc<S>,
    /// Stream version the state reflects (0: the stream does not exist).
    pub version: i64,
    /// Global position of the stream's last event (0: none).
    pub last_position: i64,
}

type Slot<S> = Arc<Mutex<Option<Loaded<S>>>>;

/// Cached slots of one aggregate type.
#[derive(Clone)]
pub struct Slots<S: Aggregate> {
    slots: Cache<Uuid, Slot<S>>,
}

impl<S: Aggregate> std::fmt::Debug for Slots<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Slots({} cached)", self.slots.entry_count())
    }
}

/// Exclusive use of one stream's slot while a command decides and appends.
///
/// Between [`SlotGuard::appending`] and the outcome ([`SlotGuard::advance`] or
/// [`SlotGuard::clear`]) the cached state may be about to fall behind the log. A guard dropped
/// in that window (its request timed out, or the client went away, while the append waited
/// in the writer's queue, which still commits it) clears the slot, so the next command reloads
/// from the log instead of deciding on the state before that append.
pub struct SlotGuard<S> {
    stream_id: Uuid,
    guard: OwnedMutexGuard<Option<Loaded<S>>>,
    appending: bool,
}

impl<S> Drop for SlotGuard<S> {
    fn drop(&mut self) {
        if self.appending {
            *self.guard = None;
        }
    }
}

impl<S> std::fmt::Debug for SlotGuard<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SlotGuard({}, loaded: {})", self.stream_id, self.guard.is_some())
    }
}

impl<S: Aggregate> Slots<S> {
    pub fn new(capacity: u64) -> Self {
        Slots {
            slots: Cache::new(capacity),
        }
    }

    pub async fn lock(&self, stream_id: Uuid) -> SlotGuard<S> {
        let slot = self.slots.get_with(stream_id, || Arc::new(Mutex::new(None)));
        SlotGuard {
            stream_id,
            guard: slot.lock_owned().await,
            appending: false,
        }
    }

    /// The current state, without keeping the slot locked.
    pub async fn snapshot(&self, stream_id: Uuid, reader: &LogReader) -> Result<Loaded<S>, ReadError> {
        let mut guard = self.lock(stream_id).await;
        guard.load(reader).await.cloned()
    }

    /// Forgets a stream's cached state.
    pub async fn forget(&self, stream_id: Uuid) {
        self.lock(stream_id).await.clear();
    }

    /// Records events appended without holding the slot: applied if they follow the cached
    /// version directly, otherwise the slot is cleared and reloads on next use.
    pub async fn advance(&self, stream_id: Uuid, events: &[Event], version: i64, last_position: i64) {
        self.lock(stream_id).await.advance(events, version, last_position);
    }
}

impl<S: Aggregate> SlotGuard<S> {
    /// The cached state, loading it from the log first if the slot is empty.
    pub async fn load(&mut self, reader: &LogReader) -> Result<&Loaded<S>, ReadError> {
        if self.guard.is_none() {
            *self.guard = Some(load_stream(reader, self.stream_id).await?);
        }
        // Just filled if it was empty.
        self.guard.as_ref().ok_or(ReadError::Corrupt {
            position: 0,
            reason: "aggregate slot empty after load".into(),
        })
    }

    /// The cached state, or else the empty stream's without reading the log: for a stream
    /// id this process has just generated. An append on it expects no stream, so were the id
    /// in the log after all, the append is refused and the slot cleared.
    pub fn load_assuming_new(&mut self) -> &Loaded<S> {
        self.guard.get_or_insert_with(|| Loaded {
            state: Arc::new(S::default()),
            version: 0,
            last_position: 0,
        })
    }

    /// Marks the start of an append to this stream: until its outcome is recorded, dropping
    /// the guard forgets the cached state.
    pub fn appending(&mut self) {
        self.appending = true;
    }

    /// Applies events this command appended, reaching `version` at `last_position`.
    pub fn advance(&mut self, events: &[Event], version: i64, last_position: i64) {
        self.appending = false;
        let next = match self.guard.take() {
            Some(loaded) if loaded.version + events.len() as i64 == version => {
                let state = events
                    .iter()
                    .fold(Arc::unwrap_or_clone(loaded.state), |state, e| state.apply(e));
                Some(Loaded {
                    state: Arc::new(state),
                    version,
                    last_position,
                })
            }
            _ => None,
        };
        *self.guard = next;
    }

    /// Forgets the cached state (after a conflict: someone else wrote the stream; or an
    /// append whose outcome is not known).
    pub fn clear(&mut self) {
        self.appending = false;
        *self.guard = None;
    }
}

/// Rebuilds an aggregate from its whole stream. A stream of another type reads as absent
/// (a device command on a user's id finds no device), but keeps its version so an append to
/// it is refused by the log.
async fn load_stream<S: Aggregate>(reader: &LogReader, stream_id: Uuid) -> Result<Loaded<S>, ReadError> {
    const PAGE: i64 = 5_000;
    let mut state = S::default();
    let mut version = 0;
    let mut last_position = 0;
    loop {
        let events = reader.read_stream(stream_id, version, PAGE).await?;
        let page_len = events.len() as i64;
        for envelope in &events {
            if envelope.stream_type == S::STREAM_TYPE {
                let event = envelope.decode().map_err(|e| ReadError::Corrupt {
                    position: envelope.position,
                    reason: e.to_string(),
                })?;
                state = state.apply(&event);
            }
            version = envelope.stream_version;
            last_position = envelope.position;
        }
        if page_len < PAGE {
            break;
        }
    }
    Ok(Loaded {
        state: Arc::new(state),
        version,
        last_position,
    })
}
