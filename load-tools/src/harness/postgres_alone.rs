//! PostgreSQL alone: the rows a run appended, written again by `pgbench` with the statements
//! of a group commit (lock the head, read the streams' versions, insert the events from
//! JSON text, upsert the streams, move the head, notify) in groups of the size the run's
//! writer made, on one connection like the writer's. No HTTP, no Rust, no hashing: what the
//! database on this machine can take of this log's rows, so a command figure can be read as
//! a fraction of it.
//!
//! The copies keep their hashes, so the database's chain is broken afterwards: run it only in
//! a load run's own database, after what it measures.

use std::time::Instant;

use anyhow::{Context, bail};
use sqlx::PgPool;

use crate::harness::sampling::{PostgresCpu, cpu_seconds};

/// One group: the statements of `event_log`'s group commit, on rows of the run picked at
/// random. `:rows` and `:g` (events per group) come from `-D`.
const SCRIPT: &str = r"\set lo random(1, :rows - :g + 1)
\set hi :lo + :g - 1
BEGIN;
SELECT position AS head FROM log_head FOR UPDATE \gset
\set next :head + :g
SELECT stream_id, stream_type, owner_id, version FROM streams
    WHERE stream_id IN (SELECT stream_id FROM cloudphone_limit_rows WHERE n BETWEEN (:lo)::bigint AND (:hi)::bigint);
WITH picked AS (
    SELECT * FROM cloudphone_limit_rows WHERE n BETWEEN (:lo)::bigint AND (:hi)::bigint
), new_events AS (
    INSERT INTO user_events (position, event_id, stream_id, stream_type, stream_version, event_type,
                             schema_version, owner_id, occurred_at, recorded_at, payload, metadata,
                             prev_hash, hash)
    SELECT (:head)::bigint + n - (:lo)::bigint + 1, gen_random_uuid(), stream_id, stream_type, stream_version, event_type,
           schema_version, owner_id, occurred_at, now(), payload::jsonb, metadata::jsonb, prev_hash, hash
    FROM picked
), stream_versions AS (
    INSERT INTO streams (stream_id, stream_type, owner_id, version, created_at, updated_at, last_position)
    SELECT DISTINCT ON (stream_id) stream_id, stream_type, owner_id, stream_version, now(), now(),
           (:head)::bigint + n - (:lo)::bigint + 1
    FROM picked ORDER BY stream_id, n DESC
    ON CONFLICT (stream_id) DO UPDATE
        SET version = streams.version + 1, updated_at = EXCLUDED.updated_at,
            last_position = EXCLUDED.last_position
), head AS (
    UPDATE log_head SET position = (:next)::bigint, recorded_at = now() RETURNING position
)
SELECT pg_notify('cloudphone_events', position::text) FROM head;
COMMIT;
";

/// What PostgreSQL alone did with the run's rows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PostgresAlone {
    pub events_per_group: u32,
    pub seconds: f64,
    pub groups_per_second: f64,
    pub events_per_second: f64,
    /// CPU seconds of the PostgreSQL server and of pgbench over the run.
    pub postgres_cpu_seconds: Option<f64>,
    pub pgbench_cpu_seconds: Option<f64>,
}

/// Writes the events `pool`'s database holds again, `events_per_group` per transaction, for
/// `seconds`, with pgbench against `database_url` (the same database).
pub async fn write_the_same_rows(
    pool: &PgPool,
    database_url: &str,
    events_per_group: u32,
    seconds: u64,
) -> anyhow::Result<PostgresAlone> {
    sqlx::query("DROP TABLE IF EXISTS cloudphone_limit_rows")
        .execute(pool)
        .await?;
    // JSON as text, as the writer sends it: the server parses it again on every insert.
    sqlx::query(
        "CREATE TABLE cloudphone_limit_rows AS
         SELECT row_number() OVER (ORDER BY position) AS n, stream_id, stream_type, stream_version,
                event_type, schema_version, owner_id, occurred_at, payload::text AS payload,
                metadata::text AS metadata, prev_hash, hash
         FROM user_events",
    )
    .execute(pool)
    .await?;
    sqlx::query("ALTER TABLE cloudphone_limit_rows ADD PRIMARY KEY (n)")
        .execute(pool)
        .await?;
    sqlx::query("ANALYZE cloudphone_limit_rows").execute(pool).await?;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM cloudphone_limit_rows")
        .fetch_one(pool)
        .await?;
    let events_per_group = events_per_group.max(1);
    if rows < i64::from(events_per_group) {
        bail!("the run wrote {rows} events, fewer than a group of {events_per_group}");
    }
    let script = std::env::temp_dir().join(format!("cloudphone-postgres-alone-{}.sql", std::process::id()));
    std::fs::write(&script, SCRIPT).with_context(|| format!("write {}", script.display()))?;

    let postgres = PostgresCpu::start(pool).await;
    let started = Instant::now();
    let child = tokio::process::Command::new(pgbench()?)
        .args(["--no-vacuum", "--protocol=prepared", "--client=1", "--jobs=1"])
        .arg(format!("--time={seconds}"))
        .arg(format!("--define=rows={rows}"))
        .arg(format!("--define=g={events_per_group}"))
        .arg(format!("--file={}", script.display()))
        .arg(database_url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("start pgbench")?;
    let pid = child.id();
    // Sampled just before it exits (its CPU is gone from /proc once reaped).
    let pgbench_cpu = tokio::spawn(async move {
        let mut last = None;
        while let Some(pid) = pid {
            match cpu_seconds(pid) {
                Some(seconds) => last = Some(seconds),
                None => break,
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        last
    });
    let output = child.wait_with_output().await.context("pgbench")?;
    let elapsed = started.elapsed().as_secs_f64();
    let postgres_cpu_seconds = postgres.map(|meter| meter.seconds());
    let pgbench_cpu_seconds = pgbench_cpu.await.ok().flatten();
    let _ = std::fs::remove_file(&script);
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "pgbench failed ({}): {}{}",
            output.status,
            stdout,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let groups_per_second = tps(&stdout).with_context(|| format!("no tps in pgbench's output: {stdout}"))?;
    Ok(PostgresAlone {
        events_per_group,
        seconds: elapsed,
        groups_per_second,
        events_per_second: groups_per_second * f64::from(events_per_group),
        postgres_cpu_seconds,
        pgbench_cpu_seconds,
    })
}

/// pgbench: on the PATH (Debian's `postgresql-client` links it there), or next to the
/// server's binaries.
fn pgbench() -> anyhow::Result<std::path::PathBuf> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join("pgbench"))
        .find(|candidate| candidate.is_file());
    let beside_server = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|version| version.path().join("bin/pgbench"))
        .find(|candidate| candidate.is_file());
    on_path
        .or(beside_server)
        .context("pgbench not found (it comes with PostgreSQL: ops/dev/postgres.sh installs it)")
}

/// The `tps = N (without initial connection time)` figure.
fn tps(output: &str) -> Option<f64> {
    output
        .lines()
        .find(|line| line.starts_with("tps = "))?
        .trim_start_matches("tps = ")
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_rate_is_read_from_pgbenchs_summary() {
        let output = "number of transactions actually processed: 3021\n\
                      latency average = 3.310 ms\n\
                      initial connection time = 2.797 ms\n\
                      tps = 302.071734 (without initial connection time)\n";
        assert_eq!(super::tps(output), Some(302.071734));
        assert_eq!(super::tps("pgbench: error: connection failed"), None);
    }
}
