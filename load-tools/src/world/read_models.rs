//! A world of read models with no history behind it, for benchmarks that measure reads:
//! `devices`, `device_stats` and `daily_usage` generated with set-based SQL (a function of the
//! seed alone), and the projections' checkpoints set, then vacuumed and analyzed.

use anyhow::{Context, bail};
use chrono::Utc;
use operator_console::Progress;
use sqlx::{AssertSqlSafe, PgPool};

use crate::cli::LoadQueriesArgs;

/// Days of history the generated devices and usage cover.
const HISTORY_DAYS: i64 = 180;

/// One device per generated row `n`, as a function of `n` and the seed alone, so the usage
/// statement can recompute owner and creation time without reading `devices`.
/// $1 seed, $2 devices, $3 users, $4 first creation time, $5 microseconds between creations.
const DEVICE_GENERATOR: &str = "
gen AS (
    SELECT n,
           md5('device:' || $1::bigint || ':' || n)::uuid AS device_id,
           md5('user:' || $1::bigint || ':'
               || floor($3::bigint * power((h & 4294967295)::float8 / 4294967296.0, 1.5))::bigint)::uuid AS owner_id,
           (ARRAY['aws', 'gcp', 'azure', 'alibaba', 'huawei'])[1 + ((h >> 48) & 255) % 5] AS provider,
           CASE WHEN ((h >> 32) & 65535) % 100 < 45 THEN 'stopped'
                WHEN ((h >> 32) & 65535) % 100 < 80 THEN 'running'
                WHEN ((h >> 32) & 65535) % 100 < 90 THEN 'failed'
                ELSE 'deleted' END AS status,
           ((h2 >> 40) & 65535) % 100 AS roll,
           1 + ((h >> 56) & 7)::int AS cpu_cores,
           (ARRAY[2048, 4096, 8192])[1 + ((h2 >> 20) & 65535) % 3] AS memory_mb,
           (11 + ((h >> 59) & 3))::smallint AS android_version,
           $4::timestamptz + n * $5::bigint * interval '1 microsecond' AS created_at,
           h2
    FROM generate_series(0::bigint, $2::bigint - 1) AS n
    CROSS JOIN LATERAL (SELECT hashint8extended(n, $1::bigint) AS h,
                               hashint8extended(n, $1::bigint + 1) AS h2) AS hashes
)";

/// Fills the read models; returns how many users own devices.
pub async fn write_read_models(pool: &PgPool, args: &LoadQueriesArgs) -> anyhow::Result<i64> {
    let seed = i64::try_from(args.seed % (1 << 40)).unwrap_or(0);
    let devices = i64::try_from(args.devices).context("--devices")?;
    let users = i64::try_from(args.users).context("--users")?;
    let usage_rows = i64::try_from(args.usage_rows).context("--usage-rows")?;
    // Usage days per device: each device's rows fall on distinct days after its creation.
    let per_device = (usage_rows + devices - 1) / devices;
    if per_device > HISTORY_DAYS - 30 {
        bail!(
            "--usage-rows / --devices is {per_device}: at most {} usage days per device fit in the {HISTORY_DAYS} days generated",
            HISTORY_DAYS - 30
        );
    }
    let today = Utc::now().date_naive();
    let end_day = today; // usage up to yesterday; `day < end_day`
    let first = (today - chrono::Duration::days(HISTORY_DAYS))
        .and_hms_opt(0, 0, 0)
        .context("midnight")?
        .and_utc();
    // Creation times spread over the history, leaving every device `per_device` days of
    // usage before `end_day`; microseconds apart, so keyset order is by time.
    let span_us = (HISTORY_DAYS - per_device - 1) * 86_400 * 1_000_000;
    let step_us = span_us / devices;
    if step_us < 1 {
        bail!("too many devices for distinct creation times");
    }

    let mut progress = Progress::new("provisioning", 5);
    // Usage first: device `n` gets rows j = 0..per_device on distinct days between its
    // creation and yesterday, owned by its owner.
    sqlx::query(AssertSqlSafe(format!(
        "WITH {DEVICE_GENERATOR}
         INSERT INTO daily_usage (day, user_id, device_id, minutes, cost_minor, currency)
         SELECT created_day + ((r / $2::bigint) * ($6::date - created_day) / $7::bigint)::int,
                g.owner_id, g.device_id, m.minutes, m.minutes * 3, 'USD'
         FROM generate_series(0::bigint, $8::bigint - 1) AS r
         JOIN gen g ON g.n = r % $2::bigint
         CROSS JOIN LATERAL (SELECT (g.created_at AT TIME ZONE 'UTC')::date AS created_day,
                                    1 + (hashint8extended(r, $1::bigint + 2) & 2047) % 1440 AS minutes) AS m"
    )))
    .bind(seed)
    .bind(devices)
    .bind(users)
    .bind(first)
    .bind(step_us)
    .bind(end_day)
    .bind(per_device)
    .bind(usage_rows)
    .execute(pool)
    .await
    .context("generate daily_usage")?;
    progress.set(1);
    sqlx::query(AssertSqlSafe(format!(
        "WITH {DEVICE_GENERATOR}
         INSERT INTO devices (device_id, owner_id, provider, status, cpu_cores, memory_mb, android_version,
                              created_at, last_started_at, minutes_used, updated_position)
         SELECT g.device_id, g.owner_id, g.provider, g.status, g.cpu_cores, g.memory_mb, g.android_version,
                g.created_at,
                CASE WHEN g.status = 'running' OR g.roll >= 20
                     THEN g.created_at + ((g.h2 & 1048575) % 86400) * interval '1 second' END,
                coalesce(u.minutes, 0), 1
         FROM gen g
         LEFT JOIN (SELECT device_id, sum(minutes)::bigint AS minutes FROM daily_usage GROUP BY device_id) AS u
                USING (device_id)
         ORDER BY g.n"
    )))
    .bind(seed)
    .bind(devices)
    .bind(users)
    .bind(first)
    .bind(step_us)
    .execute(pool)
    .await
    .context("generate devices")?;
    progress.set(2);
    read_models::fleet::derive_device_stats(&mut *pool.acquire().await?)
        .await
        .context("generate device_stats")?;
    // The read models stand at position 1: the API needs a watermark to key its cache on.
    sqlx::query(
        "INSERT INTO projection_checkpoints (projection, position, last_recorded_at)
         VALUES ('fleet', 1, now()), ('daily_usage', 1, now())",
    )
    .execute(pool)
    .await?;
    progress.set(3);
    // What autovacuum would long since have done: statistics and the visibility map.
    for table in ["devices", "device_stats", "daily_usage"] {
        sqlx::raw_sql(AssertSqlSafe(format!("VACUUM (ANALYZE) {table}")))
            .execute(pool)
            .await?;
    }
    progress.set(4);
    let (generated, collisions): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM daily_usage),
                (SELECT count(*) FROM daily_usage u JOIN devices d USING (device_id)
                 WHERE u.user_id <> d.owner_id OR u.day < (d.created_at AT TIME ZONE 'UTC')::date OR u.day >= $1)",
    )
    .bind(end_day)
    .fetch_one(pool)
    .await?;
    if generated != usage_rows || collisions != 0 {
        bail!("generated {generated} usage rows ({collisions} inconsistent with their device) instead of {usage_rows}");
    }
    let users_with_devices: i64 = sqlx::query_scalar("SELECT count(DISTINCT owner_id) FROM devices")
        .fetch_one(pool)
        .await?;
    progress.set(5);
    progress.finish();
    Ok(users_with_devices)
}
