//! The connections the dashboard reads run on: a pool that takes a connection back without a
//! round trip.
//!
//! sqlx's pool pings every connection it takes back (one more round trip per statement, a
//! third of an uncached dashboard query's time in BENCHMARKS.md, "The ping on every return"),
//! and no option turns that off. The ping is there to drain what a read cut short left
//! behind: the rest of a result whose future was dropped, or the `ROLLBACK` a dropped
//! transaction queued. Here a returned connection drains only when something is pending
//! (sqlx's `Connection::flush`, which waits for the replies still owed and costs nothing when
//! none are), and one that fails to drain is closed instead of pooled. A connection idle for
//! longer than [`event_log::PING_IDLE_AFTER`] is pinged before it is handed out, as the
//! platform's other pools do, so one the server or a proxy closed meanwhile is not used.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::FutureExt;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long a returned connection may take to drain what a cut-short read left before it is
/// closed instead.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How a [`ReadPool`] sizes and tests its connections.
#[derive(Debug, Clone, Copy)]
pub struct ReadPoolOptions {
    /// Most connections open at once.
    pub max_connections: u32,
    /// Longest wait for a connection (a free one, or a new one connected) before
    /// `PoolTimedOut`.
    pub acquire_timeout: Duration,
    /// A connection idle longer than this is pinged before it is handed out.
    pub ping_idle_after: Duration,
    /// A connection idle longer than this is closed.
    pub idle_timeout: Duration,
}

impl ReadPoolOptions {
    pub fn new(max_connections: u32, acquire_timeout: Duration) -> Self {
        ReadPoolOptions {
            max_connections: max_connections.max(1),
            acquire_timeout,
            ping_idle_after: event_log::PING_IDLE_AFTER,
            idle_timeout: Duration::from_secs(600),
        }
    }
}

/// A pool of read connections to one database; cheap to clone (clones share the pool).
/// Connections open lazily, on the first [`ReadPool::acquire`] that finds none idle.
#[derive(Clone)]
pub struct ReadPool {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ReadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadPool")
            .field("size", &self.size())
            .field("idle", &self.num_idle())
            .field("options", &self.shared.options)
            .finish_non_exhaustive()
    }
}

struct Shared {
    connect: PgConnectOptions,
    options: ReadPoolOptions,
    /// Idle connections, the most recently returned last (handed out first, so a few hot
    /// connections carry a light load and the rest age out).
    idle: Mutex<VecDeque<Idle>>,
    /// One permit per connection handed out.
    permits: Arc<Semaphore>,
    /// Connections open: idle, handed out, or draining.
    open: AtomicU32,
}

struct Idle {
    connection: PgConnection,
    since: Instant,
}

impl ReadPool {
    pub fn new(connect: PgConnectOptions, options: ReadPoolOptions) -> Self {
        ReadPool {
            shared: Arc::new(Shared {
                connect,
                permits: Arc::new(Semaphore::new(options.max_connections as usize)),
                options,
                idle: Mutex::new(VecDeque::new()),
                open: AtomicU32::new(0),
            }),
        }
    }

    /// A connection for one read, waiting at most the acquire timeout for one.
    pub async fn acquire(&self) -> Result<ReadConnection, sqlx::Error> {
        let started = Instant::now();
        let timeout = self.shared.options.acquire_timeout;
        let permit = match tokio::time::timeout(timeout, Arc::clone(&self.shared.permits).acquire_owned()).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) => return Err(sqlx::Error::PoolClosed),
            Err(_) => return Err(sqlx::Error::PoolTimedOut),
        };
        while let Some(Idle { mut connection, since }) = self.shared.take_idle() {
            if since.elapsed() > self.shared.options.ping_idle_after {
                let left = timeout.saturating_sub(started.elapsed());
                if !matches!(tokio::time::timeout(left, connection.ping()).await, Ok(Ok(()))) {
                    self.shared.discard(connection);
                    continue;
                }
            }
            return Ok(self.handed_out(connection, permit));
        }
        let left = timeout.saturating_sub(started.elapsed());
        let connection = match tokio::time::timeout(left, self.shared.connect.connect()).await {
            Ok(connected) => connected?,
            Err(_) => return Err(sqlx::Error::PoolTimedOut),
        };
        self.shared.open.fetch_add(1, Ordering::Relaxed);
        Ok(self.handed_out(connection, permit))
    }

    fn handed_out(&self, connection: PgConnection, permit: OwnedSemaphorePermit) -> ReadConnection {
        ReadConnection {
            connection: Some(connection),
            permit: Some(permit),
            shared: Arc::clone(&self.shared),
        }
    }

    /// Connections open (idle, handed out, or draining).
    pub fn size(&self) -> u32 {
        self.shared.open.load(Ordering::Relaxed)
    }

    /// Connections idle in the pool.
    pub fn num_idle(&self) -> usize {
        self.shared.idle.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    pub fn max_connections(&self) -> u32 {
        self.shared.options.max_connections
    }

    /// Refuses further acquires and closes the idle connections; connections handed out are
    /// closed when they come back.
    pub async fn close(&self) {
        self.shared.permits.close();
        let idle: Vec<Idle> = self
            .shared
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
            .collect();
        for Idle { connection, .. } in idle {
            self.shared.open.fetch_sub(1, Ordering::Relaxed);
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, connection.close()).await;
        }
    }
}

impl Shared {
    fn take_idle(&self) -> Option<Idle> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner).pop_back()
    }

    /// Pools a connection that owes nothing, then lets the next acquire in (in that order, so
    /// it finds the connection). The oldest idle connection goes if it has idled too long.
    fn release(&self, connection: PgConnection, permit: OwnedSemaphorePermit) {
        if self.permits.is_closed() {
            drop(permit);
            self.discard(connection);
            return;
        }
        let now = Instant::now();
        let stale = {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            idle.push_back(Idle { connection, since: now });
            let too_many = idle.len() > self.options.max_connections as usize;
            let aged = idle
                .front()
                .is_some_and(|oldest| now.duration_since(oldest.since) > self.options.idle_timeout);
            if too_many || aged { idle.pop_front() } else { None }
        };
        drop(permit);
        if let Some(Idle { connection, .. }) = stale {
            self.discard(connection);
        }
    }

    /// Closes a connection the pool will not use again: politely where a runtime can wait for
    /// it, else by dropping its socket.
    fn discard(&self, connection: PgConnection) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = tokio::time::timeout(DRAIN_TIMEOUT, connection.close()).await;
            });
        }
    }

    /// A connection that failed to drain may be mid-reply or dead: its socket is dropped.
    fn discard_broken(&self, connection: PgConnection) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        drop(connection);
    }
}

/// A connection handed out by a [`ReadPool`]; it goes back when dropped. Run statements on
/// `&mut *connection`.
pub struct ReadConnection {
    connection: Option<PgConnection>,
    permit: Option<OwnedSemaphorePermit>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ReadConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadConnection").finish_non_exhaustive()
    }
}

impl std::ops::Deref for ReadConnection {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        // Only `Drop` takes the connection out.
        self.connection
            .as_ref()
            .unwrap_or_else(|| unreachable!("a ReadConnection holds its connection until dropped"))
    }
}

impl std::ops::DerefMut for ReadConnection {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.connection
            .as_mut()
            .unwrap_or_else(|| unreachable!("a ReadConnection holds its connection until dropped"))
    }
}

impl Drop for ReadConnection {
    fn drop(&mut self) {
        let (Some(mut connection), Some(permit)) = (self.connection.take(), self.permit.take()) else {
            return;
        };
        // A read that ran to its end owes nothing, and the flush is ready at its first poll
        // without touching the socket. One cut short owes replies: they are drained on a task.
        match connection.flush().now_or_never() {
            Some(Ok(())) => self.shared.release(connection, permit),
            Some(Err(_)) => self.shared.discard_broken(connection),
            None => {
                let shared = Arc::clone(&self.shared);
                match tokio::runtime::Handle::try_current() {
                    Ok(runtime) => {
                        runtime.spawn(async move {
                            match tokio::time::timeout(DRAIN_TIMEOUT, connection.flush()).await {
                                Ok(Ok(())) => shared.release(connection, permit),
                                _ => shared.discard_broken(connection),
                            }
                        });
                    }
                    Err(_) => shared.discard_broken(connection),
                }
            }
        }
    }
}
