//! The hash chain catches any change to the stored history (made here past the append-only
//! triggers, as a superuser could).

use event_log::{ChainBreak, ExpectedVersion};
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::*;

async fn ten_events(pool: &PgPool) {
    let log = store(pool).await;
    let (device, owner) = (Uuid::now_v7(), Uuid::now_v7());
    log.append(create_device(device, owner))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    log.append(starts(device, owner, ExpectedVersion::Exact(1), 8))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

#[sqlx::test(migrations = false)]
async fn an_untouched_log_verifies_whole_and_in_part(pool: PgPool) {
    ten_events(&pool).await;
    let log = reader(&pool);
    let whole = log
        .verify_chain(1, None, 3, |_| {})
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((whole.checked, whole.last_position, whole.broken), (10, 10, None));
    let head = log.head().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(whole.last_hash, head.hash);
    let part = log
        .verify_chain(4, Some(7), 100, |_| {})
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((part.checked, part.last_position, part.broken), (4, 7, None));
}

#[sqlx::test(migrations = false)]
async fn a_payload_changed_by_sql_is_found_at_its_position(pool: PgPool) {
    ten_events(&pool).await;
    let changed = tamper(
        &pool,
        "UPDATE user_events SET payload = jsonb_set(payload, '{started_at}', '\"2001-01-01T00:00:00Z\"') WHERE position = 7",
    )
    .await;
    assert_eq!(changed, 1);
    let report = reader(&pool)
        .verify_chain(1, None, 4, |_| {})
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        matches!(report.broken, Some(ChainBreak::HashMismatch { position: 7, .. })),
        "{report:?}"
    );
    assert_eq!(report.last_position, 6);
}

#[sqlx::test(migrations = false)]
async fn a_deleted_event_is_found_as_a_missing_position(pool: PgPool) {
    ten_events(&pool).await;
    assert_eq!(tamper(&pool, "DELETE FROM user_events WHERE position = 5").await, 1);
    let report = reader(&pool)
        .verify_chain(1, None, 100, |_| {})
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.broken.map(|b| b.position()), Some(5));
}

#[sqlx::test(migrations = false)]
async fn a_rewritten_hash_breaks_the_next_link(pool: PgPool) {
    ten_events(&pool).await;
    // A forger recomputing one row's hash cannot fix the prev_hash stored in the next row.
    assert_eq!(
        tamper(&pool, "UPDATE user_events SET hash = sha256(hash) WHERE position = 3").await,
        1
    );
    let report = reader(&pool)
        .verify_chain(1, None, 100, |_| {})
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.broken.map(|b| b.position()), Some(3));
}
