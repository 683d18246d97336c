//! The ordering guarantee at scale (issue #10's fault suite): 64 writers spread over several
//! stores, as several processes would be, each append 10,000 single events to their own
//! device stream while two readers tail the log from the start, one woken by LISTEN and one
//! that only polls (as behind a transaction pooler). Every acknowledged append must be in the
//! log exactly once, every reader must see exactly positions 1..=head in order, and the hash
//! chain must verify.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_log::{AppendError, EventStore, ExpectedVersion, LogTail, StoreConfig, TailConfig};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use uuid::Uuid;

use crate::support::*;

const WRITERS: usize = 64;
const APPENDS_PER_WRITER: usize = 10_000;
/// Separate stores competing for the log head, like separate processes.
const STORES: usize = 4;
/// Every this many appends a writer claims a wrong version: that append must fail alone and
/// leave no trace.
const CONFLICT_EVERY: usize = 1_000;

/// What one reader saw: `(position, event id)` in the order it was returned.
type Seen = Vec<(i64, Uuid)>;

#[sqlx::test(migrations = false)]
async fn sixty_four_writers_times_ten_thousand_appends_while_readers_tail(_: PgPoolOptions, connect: PgConnectOptions) {
    // Other tests run beside this one on a server with max_connections = 100: stay near 30
    // (four store writers, two readers, one LISTEN connection, verification and slack).
    let pool = PgPoolOptions::new()
        .max_connections(24)
        .acquire_timeout(Duration::from_secs(60))
        .connect_with(connect)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    migrated(&pool).await;
    let mut stores = Vec::new();
    for _ in 0..STORES {
        stores.push(Arc::new(
            store_with(&pool, StoreConfig::default(), Arc::new(event_log::SystemClock)).await,
        ));
    }

    // Both readers start before the first append and follow until they see the last one: an
    // append made after every writer has finished.
    let last = starts(Uuid::now_v7(), Uuid::now_v7(), ExpectedVersion::NoStream, 1);
    let last_id = last.streams[0].events[0].event_id;
    let listening = spawn_reader(
        "listening",
        LogTail::start(
            reader(&pool),
            0,
            TailConfig {
                batch_size: 1_000,
                poll_interval: Duration::from_millis(250),
                listen: true,
                ..TailConfig::default()
            },
        )
        .await,
        last_id,
    );
    let polling = spawn_reader(
        "polling",
        LogTail::start(
            reader(&pool),
            0,
            TailConfig {
                batch_size: 777,
                poll_interval: Duration::from_millis(20),
                listen: false,
                ..TailConfig::default()
            },
        )
        .await,
        last_id,
    );

    let started = Instant::now();
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let store = stores[w % STORES].clone();
        writers.push(tokio::spawn(write_one_stream(w, store)));
    }
    // position -> event id of every acknowledged append.
    let mut committed: HashMap<i64, Uuid> = HashMap::with_capacity(WRITERS * APPENDS_PER_WRITER);
    let mut conflicts = 0;
    for writer in writers {
        let (acknowledged, refused) = writer.await.unwrap_or_else(|e| panic!("{e}"));
        conflicts += refused;
        for (position, event_id) in acknowledged {
            if let Some(other) = committed.insert(position, event_id) {
                panic!("position {position} was given to both {other} and {event_id}");
            }
        }
    }
    let elapsed = started.elapsed();
    let outcome = stores[0].append(last).await.unwrap_or_else(|e| panic!("{e}"));
    committed.insert(outcome.last_position, last_id);
    let head = reader(&pool).head().await.unwrap_or_else(|e| panic!("{e}")).position;
    assert_eq!(outcome.last_position, head);
    println!(
        "{} appends committed by {WRITERS} writers over {STORES} stores in {elapsed:.1?}: {:.0} appends/s; \
         {conflicts} deliberate conflicts refused",
        committed.len() - 1,
        (committed.len() - 1) as f64 / elapsed.as_secs_f64(),
    );
    for store in stores {
        if let Ok(store) = Arc::try_unwrap(store) {
            store.shutdown().await;
        }
    }

    // Each writer's deliberate conflicts failed, and everything else was acknowledged.
    assert_eq!(conflicts, WRITERS * APPENDS_PER_WRITER / CONFLICT_EVERY);
    assert_eq!(committed.len(), WRITERS * APPENDS_PER_WRITER - conflicts + 1);
    // Acknowledged positions are exactly 1..=head: dense, and nothing in the log that no one
    // was told about (a refused append wrote nothing).
    assert_eq!(committed.len() as i64, head);
    assert!(
        (1..=head).all(|p| committed.contains_key(&p)),
        "a position below the head was never acknowledged"
    );
    assert_eq!(count_events(&pool).await, head);

    for (name, reader_task) in [("listening", listening), ("polling", polling)] {
        let seen = tokio::time::timeout(Duration::from_secs(120), reader_task)
            .await
            .unwrap_or_else(|_| panic!("the {name} reader stalled before {head}"))
            .unwrap_or_else(|e| panic!("{e}"));
        let caught_up = started.elapsed();
        assert_eq!(
            seen.len() as i64,
            head,
            "the {name} reader saw {} events, not {head}",
            seen.len()
        );
        for (index, (position, event_id)) in seen.iter().enumerate() {
            let expected = index as i64 + 1;
            assert_eq!(*position, expected, "the {name} reader skipped or repeated a position");
            assert_eq!(
                committed.get(position),
                Some(event_id),
                "the {name} reader saw another event at {position} than the writer was told"
            );
        }
        println!("the {name} reader saw 1..={head} in order, caught up after {caught_up:.1?}");
    }

    let verifying = Instant::now();
    let report = reader(&pool)
        .verify_chain(1, None, 5_000, |_| {})
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.broken, None);
    assert_eq!(report.checked as i64, head);
    println!("hash chain of {head} events verified in {:.1?}", verifying.elapsed());
}

/// One writer: its own device stream, one event per append, the expected version each time.
/// Returns the `(position, event id)` of every acknowledged append and the number refused.
async fn write_one_stream(w: usize, store: Arc<EventStore>) -> (Vec<(i64, Uuid)>, usize) {
    let owner = Uuid::now_v7();
    let device = Uuid::now_v7();
    let mut acknowledged = Vec::with_capacity(APPENDS_PER_WRITER);
    let mut refused = 0;
    let mut version = 0i64;
    for i in 0..APPENDS_PER_WRITER {
        let conflicting = i % CONFLICT_EVERY == CONFLICT_EVERY / 2;
        let expected = match (version, conflicting) {
            (_, true) => ExpectedVersion::Exact(version + 1),
            (0, false) => ExpectedVersion::NoStream,
            (v, false) => ExpectedVersion::Exact(v),
        };
        let batch = starts(device, owner, expected, 1);
        let event_id = batch.streams[0].events[0].event_id;
        match store.append(batch).await {
            Ok(outcome) => {
                assert!(!conflicting, "writer {w}: a wrong expected version was accepted");
                assert_eq!(outcome.first_position, outcome.last_position);
                assert_eq!(outcome.streams[0].version, version + 1);
                version = outcome.streams[0].version;
                acknowledged.push((outcome.first_position, event_id));
            }
            Err(AppendError::WrongExpectedVersion { .. }) if conflicting => refused += 1,
            Err(other) => panic!("writer {w}, append {i}: {other}"),
        }
    }
    (acknowledged, refused)
}

/// Follows the log from the start until it returns the event `last`.
fn spawn_reader(name: &'static str, mut tail: LogTail, last: Uuid) -> tokio::task::JoinHandle<Seen> {
    tokio::spawn(async move {
        let mut seen = Seen::new();
        loop {
            let batch = tail.next_batch().await.unwrap_or_else(|e| panic!("{name} reader: {e}"));
            seen.extend(batch.iter().map(|e| (e.position, e.event_id)));
            if batch.iter().any(|e| e.event_id == last) {
                return seen;
            }
        }
    })
}
