//! Following the log as it grows: a reader wakes on `NOTIFY cloudphone_events` from each
//! commit and also polls, so it keeps working behind a pooler (PgBouncer in transaction mode)
//! that drops notifications, and after its listening connection breaks.
//!
//! A listening tail also reads on its listening session, which plans the read once
//! ([`tail_session_options`]): the log is partitioned by month, and PostgreSQL otherwise plans
//! the read afresh at every batch, because a plan made for the given `recorded_at` floor (the
//! months before it pruned) always looks cheaper than the generic plan, which prunes the same
//! months when it runs. Planning took longer than the read itself (0.3 to 0.8 ms against
//! 0.03 ms for an empty read), at every batch of every projector.

use std::time::Duration;

use chrono::{DateTime, Utc};
use event_schema::EventEnvelope;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::time::Instant;

use crate::read::{LogReader, ReadError, epoch, read_all_since_on};

/// The channel every append notifies with its last position.
pub const NOTIFY_CHANNEL: &str = "cloudphone_events";

/// The options of a tail's own session: its reads get their generic plan, made once per
/// session, which prunes the months before the floor as it runs (see the module
/// documentation). A setting at connect needs a session of its own, as `LISTEN` does: a
/// transaction pooler refuses it, and a tail behind one does not listen.
pub fn tail_session_options(base: &PgConnectOptions) -> PgConnectOptions {
    base.clone().options([("plan_cache_mode", "force_generic_plan")])
}

/// How a tail waits for new events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TailConfig {
    /// Most events one `next_batch` returns.
    pub batch_size: i64,
    /// How long to wait for a notification before reading anyway.
    pub poll_interval: Duration,
    /// Whether to LISTEN at all (off: poll only, as behind a transaction pooler).
    pub listen: bool,
    /// Least time from one batch to the next while the log keeps growing (zero: none). A
    /// consumer that commits each batch pays a transaction and a WAL flush per batch, whatever
    /// its size: under steady appends a tail that reads at every commit returns batches of a
    /// few events, and this gathers them for at most this long. A full batch (catching up)
    /// waits for nothing.
    pub min_batch_interval: Duration,
}

impl Default for TailConfig {
    fn default() -> Self {
        TailConfig {
            batch_size: 1_000,
            poll_interval: Duration::from_millis(500),
            listen: true,
            min_batch_interval: Duration::ZERO,
        }
    }
}

/// A cursor that returns every committed event after a position exactly once, in order.
///
/// Positions are dense and become visible in order (see the crate documentation), so the
/// tail only ever asks for "after my last position" and never has to look back for a late
/// commit; it still checks that every batch continues where the last one ended and fails
/// loudly if not.
#[derive(Debug)]
pub struct LogTail {
    reader: LogReader,
    position: i64,
    recorded_floor: DateTime<Utc>,
    config: TailConfig,
    /// One connection, with [`tail_session_options`], for the listener; made on first use.
    session: Option<PgPool>,
    listener: Option<PgListener>,
    listen_failed: bool,
    /// When the next batch may be read, after a batch that was not full.
    next_batch_due: Option<Instant>,
}

impl LogTail {
    /// Starts after `position` (0 = from the beginning).
    pub async fn start(reader: LogReader, position: i64, config: TailConfig) -> Self {
        let mut tail = LogTail {
            reader,
            position,
            recorded_floor: epoch(),
            config,
            session: None,
            listener: None,
            listen_failed: false,
            next_batch_due: None,
        };
        if config.listen {
            tail.listener = tail.connect_listener().await;
        }
        tail
    }

    async fn connect_listener(&mut self) -> Option<PgListener> {
        let session = self.session.get_or_insert_with(|| {
            let options = tail_session_options(&self.reader.pool().connect_options());
            PgPoolOptions::new()
                .max_connections(1)
                .max_lifetime(None)
                .idle_timeout(None)
                .connect_lazy_with(options)
        });
        let result = async {
            let mut listener = PgListener::connect_with(session).await?;
            listener.listen(NOTIFY_CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        }
        .await;
        match result {
            Ok(listener) => Some(listener),
            Err(error) => {
                if !self.listen_failed {
                    tracing::warn!(%error, "cannot LISTEN for new events; polling only");
                }
                self.listen_failed = true;
                None
            }
        }
    }

    /// Position of the last event returned.
    pub fn position(&self) -> i64 {
        self.position
    }

    /// Returns the next events after the current position, waiting until there is at least
    /// one, and no sooner than `min_batch_interval` after the last batch unless that was full.
    pub async fn next_batch(&mut self) -> Result<Vec<EventEnvelope>, ReadError> {
        if let Some(due) = self.next_batch_due.take() {
            self.linger(due).await;
        }
        loop {
            let events = self.poll().await?;
            if !events.is_empty() {
                let full = events.len() as i64 >= self.config.batch_size;
                if !full && !self.config.min_batch_interval.is_zero() {
                    self.next_batch_due = Some(Instant::now() + self.config.min_batch_interval);
                }
                return Ok(events);
            }
            self.wait().await;
        }
    }

    /// Waits until `due`, reading the notifications that arrive meanwhile: the next read
    /// returns what they announce anyway, and each left unread would wake a later wait for
    /// an empty read (and a listener that stops reading holds PostgreSQL's notification queue).
    async fn linger(&mut self, due: Instant) {
        while let Some(listener) = &mut self.listener {
            match tokio::time::timeout_at(due, listener.try_recv()).await {
                Err(_) => return,
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    tracing::warn!(%error, "LISTEN connection failed; polling until it is back");
                    self.listener = None;
                }
            }
        }
        tokio::time::sleep_until(due).await;
    }

    /// Returns whatever is committed after the current position now, possibly nothing.
    pub async fn poll(&mut self) -> Result<Vec<EventEnvelope>, ReadError> {
        let (after, floor, limit) = (self.position, self.recorded_floor, self.config.batch_size);
        let events = match &mut self.listener {
            Some(listener) => match read_all_since_on(&mut *listener, after, floor, limit).await {
                Ok(events) => events,
                // The session is gone: the next wait listens again; this read goes to the pool.
                Err(error) if error.is_unavailable() => {
                    tracing::warn!(%error, "LISTEN connection failed; polling until it is back");
                    self.listener = None;
                    self.reader.read_all_since(after, floor, limit).await?
                }
                Err(error) => return Err(error),
            },
            None => self.reader.read_all_since(after, floor, limit).await?,
        };
        for (offset, event) in events.iter().enumerate() {
            let expected = self.position + 1 + offset as i64;
            if event.position != expected {
                return Err(ReadError::Corrupt {
                    position: expected,
                    reason: format!("the log skipped from {} to {}", expected - 1, event.position),
                });
            }
        }
        if let Some(last) = events.last() {
            self.position = last.position;
            self.recorded_floor = last.recorded_at;
        }
        Ok(events)
    }

    /// Waits for a notification or the poll interval, whichever comes first.
    async fn wait(&mut self) {
        if self.config.listen && self.listener.is_none() {
            self.listener = self.connect_listener().await;
        }
        match &mut self.listener {
            Some(listener) => match tokio::time::timeout(self.config.poll_interval, listener.try_recv()).await {
                Ok(Ok(Some(_))) | Err(_) => {}
                // Connection lost: notifications sent meanwhile are gone, which is fine
                // because the next read asks the table, not the channel.
                Ok(Ok(None)) => {}
                Ok(Err(error)) => {
                    tracing::warn!(%error, "LISTEN connection failed; polling until it is back");
                    self.listener = None;
                    tokio::time::sleep(self.config.poll_interval).await;
                }
            },
            None => tokio::time::sleep(self.config.poll_interval).await,
        }
    }
}
