//! How far one source's projections are, as last read, and reads of it shared between the
//! requests that wait for a position.
//!
//! A read-your-writes request waits until a source's projections have applied its position.
//! Each waiting request used to read the checkpoints on its own, every 2 to 50 ms; in
//! `load platform` (about 470 such requests/s) that was about 2 000 reads/s, every connection
//! of the query API's primary pool was busy with them, and answers waited for a connection
//! rather than for the projector. Now a source is read by one request at a time; a request
//! takes any reading newer than the last it looked at, whoever made it, and wakes when
//! another request's reading comes in.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::Notify;

use crate::sources::{Checkpoints, checkpoints};

/// One read of a source's checkpoints: when it started, and what it found.
#[derive(Debug, Clone)]
pub(crate) struct Reading {
    pub started: Instant,
    pub result: Result<Checkpoints, Arc<sqlx::Error>>,
}

#[derive(Debug, Default)]
pub(crate) struct Watermark {
    last: Mutex<Option<Reading>>,
    /// Held by the request reading the source; the others wait for its reading.
    turn: tokio::sync::Mutex<()>,
    /// Woken by every reading.
    read: Notify,
}

impl Watermark {
    /// The checkpoints, if read successfully within `max_age`.
    pub(crate) fn get(&self, max_age: Duration) -> Option<Checkpoints> {
        let last = self.last.lock().ok()?;
        let reading = last.as_ref().filter(|r| r.started.elapsed() <= max_age)?;
        reading.result.as_ref().ok().cloned()
    }

    /// A reading that started after `after`: the newest one if it did, else one this request
    /// makes, or takes from the request that began reading while this one waited its turn.
    /// A read longer than `timeout` counts as failed.
    pub(crate) async fn read_after(&self, pool: &PgPool, after: Instant, timeout: Duration) -> Reading {
        if let Some(reading) = self.newer_than(after) {
            return reading;
        }
        let _turn = self.turn.lock().await;
        if let Some(reading) = self.newer_than(after) {
            return reading;
        }
        let started = Instant::now();
        let result = match tokio::time::timeout(timeout, checkpoints(pool)).await {
            Ok(read) => read.map_err(Arc::new),
            Err(_) => Err(Arc::new(sqlx::Error::PoolTimedOut)),
        };
        let reading = Reading { started, result };
        if let Ok(mut last) = self.last.lock() {
            *last = Some(reading.clone());
        }
        self.read.notify_waiters();
        reading
    }

    /// Returns at the next reading of this source, or after `pause`.
    pub(crate) async fn next_reading_or(&self, pause: Duration) {
        tokio::select! {
            () = self.read.notified() => {}
            () = tokio::time::sleep(pause) => {}
        }
    }

    fn newer_than(&self, after: Instant) -> Option<Reading> {
        let last = self.last.lock().ok()?;
        last.as_ref().filter(|r| r.started > after).cloned()
    }
}
