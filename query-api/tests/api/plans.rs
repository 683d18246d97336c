//! How PostgreSQL plans the dashboards' batched reads: the read of one user's `device_stats`,
//! device count or usage (a dashboard's usual question) is planned once per connection, not afresh on
//! every execution as the same read over an array is, and a read of several users still
//! answers each of them in one statement.

use std::time::Duration;

use query_api::read_pool::{ReadPool, ReadPoolOptions};
use query_api::reads::{self, DeviceConditions, Period, UsageSubject};
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
    // Ten days of usage for A's first device; every third day of half a year (to 2026-01-30)
    // for one device of each of 2 000 others, as `load platform`'s world has it: a month is a
    // sixth of a user's rows, and a plan for one user reads fewer than one for ten.
    for n in 0..10u64 {
        insert_usage(
            &pool,
            day("2026-01-01") + chrono::Days::new(n),
            A,
            dev(1),
            10,
            100,
            "EUR",
        )
        .await;
    }
    sqlx::query(
        "INSERT INTO daily_usage (day, user_id, device_id, minutes, cost_minor, currency)
         SELECT DATE '2025-08-04' + d, ('00000000-0000-0000-0000-' || lpad(to_hex(4096 + o), 12, '0'))::uuid,
                ('00000000-0000-0000-0001-' || lpad(to_hex(o), 12, '0'))::uuid, 5, 50, 'EUR'
         FROM generate_series(0, 179, 3) AS d, generate_series(0, 1999) AS o",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE devices, device_stats, daily_usage")
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
        let usage = reads::usage_by(
            &read,
            UsageSubject::User,
            &[A],
            day("2026-01-01"),
            day("2026-01-31"),
            Period::Month,
        )
        .await
        .unwrap();
        assert_eq!(usage[&A].iter().map(|u| u.minutes).sum::<i64>(), 100);
    }
    // Several ids: one statement, every id answered.
    let stats = reads::stats_rows_by_user(&read, &[A, B]).await.unwrap();
    assert_eq!((stats[&A][0].device_count, stats[&B][0].device_count), (2, 1));
    let counts = reads::count_devices_by_owner(&read, &[A, B], &DeviceConditions::default())
        .await
        .unwrap();
    assert_eq!((counts[&A], counts[&B]), (2, 1));
    let other = Uuid::from_u128(4096);
    let usage = reads::usage_by(
        &read,
        UsageSubject::User,
        &[A, other],
        day("2026-01-01"),
        day("2026-01-31"),
        Period::Month,
    )
    .await
    .unwrap();
    assert_eq!(
        (
            usage[&A].iter().map(|u| u.minutes).sum::<i64>(),
            usage[&other].iter().map(|u| u.minutes).sum::<i64>()
        ),
        (100, 50)
    );

    // The pool's one connection prepared them all; each one-id read kept its generic plan.
    let mut connection = read.acquire().await.unwrap();
    let prepared: Vec<(String, i64, i64)> =
        sqlx::query_as("SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements")
            .fetch_all(&mut *connection)
            .await
            .unwrap();
    for table in ["FROM device_stats", "FROM devices", "FROM daily_usage"] {
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
