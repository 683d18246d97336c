//! How PostgreSQL plans the dashboards' batched reads: the read of one user's `device_stats` or
//! device count (a dashboard's usual question) is planned once per connection, not afresh on
//! every execution as the same read over an array is, and a read of several users still
//! answers each of them in one statement.

use std::time::Duration;

use query_api::read_pool::{ReadPool, ReadPoolOptions};
use query_api::reads::{self, DeviceConditions};
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::*;

/// Executions of each read: PostgreSQL makes custom plans for the first five, then keeps the
/// generic plan when it costs no more than they did.
const EXECUTIONS: i64 = 8;

#[sqlx::test(migrations = false)]
async fn one_ids_batched_reads_keep_one_plan_per_connection(pool: PgPool) {
    migrated(&pool).await;
    // A's two devices and B's one among 600 of 60 other owners in every status and provider
    // (about 600 `device_stats` rows), analyzed: on a table of a few rows every plan costs
    // the same, and PostgreSQL keeps even the array's generic one.
    const STATUSES: [&str; 4] = ["running", "stopped", "failed", "deleted"];
    const PROVIDERS: [&str; 3] = ["aws", "gcp", "azure"];
    let seeded = |n: u128, owner: Uuid, status: &'static str, provider: &'static str| {
        SeedDevice::small(dev(n), owner, provider, status, at(1_000_000))
    };
    let mut devices = vec![
        seeded(1, A, "running", "aws"),
        seeded(2, A, "running", "aws"),
        seeded(3, B, "running", "aws"),
    ];
    devices.extend((0..600u128).map(|n| {
        let owner = Uuid::from_u128(0x100 + n % 60);
        seeded(
            0x1000 + n,
            owner,
            STATUSES[(n / 60 % 4) as usize],
            PROVIDERS[(n / 240) as usize],
        )
    }));
    insert_devices(&pool, &devices).await;
    derive_device_stats(&pool).await;
    sqlx::query("ANALYZE devices, device_stats")
        .execute(&pool)
        .await
        .unwrap();
    let read = ReadPool::new(
        (*pool.connect_options()).clone(),
        ReadPoolOptions::new(1, Duration::from_secs(5)),
    );

    for _ in 0..EXECUTIONS {
        let stats = reads::stats_rows_by_user(&read, &[A]).await.unwrap();
        assert_eq!(stats[&A].len(), 1);
        assert_eq!(stats[&A][0].device_count, 2);
        let counts = reads::count_devices_by_owner(&read, &[A], &DeviceConditions::default())
            .await
            .unwrap();
        assert_eq!(counts[&A], 2);
    }
    // Several ids: one statement, every id answered.
    let stats = reads::stats_rows_by_user(&read, &[A, B]).await.unwrap();
    assert_eq!((stats[&A][0].device_count, stats[&B][0].device_count), (2, 1));
    let counts = reads::count_devices_by_owner(&read, &[A, B], &DeviceConditions::default())
        .await
        .unwrap();
    assert_eq!((counts[&A], counts[&B]), (2, 1));

    // The pool's one connection prepared them all; each one-id read kept its generic plan.
    let mut connection = read.acquire().await.unwrap();
    let prepared: Vec<(String, i64, i64)> =
        sqlx::query_as("SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements")
            .fetch_all(&mut *connection)
            .await
            .unwrap();
    for table in ["FROM device_stats", "FROM devices"] {
        let generic = prepared
            .iter()
            .filter(|(statement, _, _)| statement.contains(table))
            .map(|(_, generic, _)| *generic)
            .max();
        assert!(
            generic >= Some(EXECUTIONS - 5),
            "the one-id read {table} was planned on every execution: {prepared:?}"
        );
    }
}
