//! The baseline the projection benchmarks measure against: the roadmap's design, in which
//! each read model is a materialized view over the log, refreshed with `REFRESH MATERIALIZED
//! VIEW`.

use sqlx::{Executor, PgPool};

/// The roadmap's design: each read model a materialized view over the log.
pub const VIEWS: &str = r"
CREATE MATERIALIZED VIEW mv_device_stats AS
WITH created AS (
    SELECT stream_id AS device_id, owner_id, payload->>'provider' AS provider,
           (payload->>'cpu_cores')::bigint AS cpu, (payload->>'memory_mb')::bigint AS memory,
           (payload->>'created_at')::timestamptz AS created_at
    FROM user_events WHERE event_type = 'DeviceCreated'
), sized AS (
    SELECT DISTINCT ON (stream_id) stream_id AS device_id,
           (payload->>'cpu_cores')::bigint AS cpu, (payload->>'memory_mb')::bigint AS memory
    FROM user_events WHERE event_type = 'DeviceResized'
    ORDER BY stream_id, position DESC
), state AS (
    SELECT DISTINCT ON (stream_id) stream_id AS device_id,
           CASE event_type WHEN 'DeviceStarted' THEN 'running' WHEN 'DeviceStopped' THEN 'stopped'
                           WHEN 'DeviceFailed' THEN 'failed' ELSE 'deleted' END AS status
    FROM user_events
    WHERE event_type IN ('DeviceStarted', 'DeviceStopped', 'DeviceFailed', 'DeviceDeleted')
    ORDER BY stream_id, position DESC
)
SELECT c.owner_id AS user_id, coalesce(s.status, 'stopped') AS status, c.provider,
       count(*) AS device_count, sum(coalesce(z.cpu, c.cpu)) AS total_cpu_cores,
       sum(coalesce(z.memory, c.memory)) AS total_memory_mb, max(c.created_at) AS last_created_at
FROM created c LEFT JOIN sized z USING (device_id) LEFT JOIN state s USING (device_id)
WHERE coalesce(s.status, 'stopped') <> 'deleted'
GROUP BY 1, 2, 3;
CREATE UNIQUE INDEX ON mv_device_stats (user_id, status, provider);

CREATE MATERIALIZED VIEW mv_daily_usage AS
WITH sessions AS (
    SELECT owner_id AS user_id, stream_id AS device_id,
           (payload->>'started_at')::timestamptz AT TIME ZONE 'UTC' AS started,
           (payload->>'ended_at')::timestamptz AT TIME ZONE 'UTC' AS ended,
           (payload->>'minutes')::bigint AS minutes,
           (payload->'cost'->>'amount_minor')::bigint AS cost,
           payload->'cost'->>'currency' AS currency
    FROM user_events WHERE event_type = 'UsageRecorded'
), shares AS (
    -- Each billed minute belongs to the UTC day it starts in (as the projection splits).
    SELECT d.day::date AS day, s.user_id, s.device_id, s.minutes, s.cost, s.currency,
           least(s.minutes, ceil(extract(epoch FROM least(d.day + interval '1 day', s.ended) - s.started) / 60))
         - least(s.minutes, ceil(extract(epoch FROM greatest(d.day, s.started) - s.started) / 60)) AS day_minutes
    FROM sessions s
    CROSS JOIN LATERAL generate_series(date_trunc('day', s.started), s.ended, interval '1 day') AS d(day)
    WHERE d.day < s.ended OR d.day = date_trunc('day', s.started)
)
SELECT day, user_id, device_id, sum(day_minutes)::bigint AS minutes,
       sum(CASE WHEN minutes > 0 THEN cost * day_minutes / minutes ELSE cost END)::bigint AS cost_minor,
       min(currency) AS currency
FROM shares GROUP BY 1, 2, 3;
CREATE UNIQUE INDEX ON mv_daily_usage (day, user_id, device_id);
";

/// Rows where a view and the projection's table disagree (cost rounding aside: the views
/// split cost proportionally, the projection by largest remainder).
pub const VIEW_DIFFERENCES: &str = r"
SELECT (SELECT count(*) FROM (
          (SELECT user_id, status, provider, device_count, total_cpu_cores, total_memory_mb, last_created_at FROM device_stats
           EXCEPT SELECT user_id, status, provider, device_count, total_cpu_cores, total_memory_mb, last_created_at FROM mv_device_stats)
          UNION ALL
          (SELECT user_id, status, provider, device_count, total_cpu_cores, total_memory_mb, last_created_at FROM mv_device_stats
           EXCEPT SELECT user_id, status, provider, device_count, total_cpu_cores, total_memory_mb, last_created_at FROM device_stats)) d)
     + (SELECT count(*) FROM (
          (SELECT day, user_id, device_id, minutes FROM daily_usage EXCEPT SELECT day, user_id, device_id, minutes FROM mv_daily_usage)
          UNION ALL
          (SELECT day, user_id, device_id, minutes FROM mv_daily_usage EXCEPT SELECT day, user_id, device_id, minutes FROM daily_usage)) u)";

/// `REFRESH MATERIALIZED VIEW CONCURRENTLY` of both views, one after the other.
pub async fn refresh_views_concurrently(pool: &PgPool) -> anyhow::Result<()> {
    pool.execute("REFRESH MATERIALIZED VIEW CONCURRENTLY mv_device_stats")
        .await?;
    pool.execute("REFRESH MATERIALIZED VIEW CONCURRENTLY mv_daily_usage")
        .await?;
    Ok(())
}
