//! What an operator's dashboards and alerts scrape: every long-running role exports the
//! partition maintenance, connection and process gauges, and its counters from zero.

use std::process::Command;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use test_support::roles::RoleProcess;
use test_support::urls;

use crate::support::CLOUDPHONE;

/// Scrapes `/metrics` at `address` (a base URL) until every one of `expected` appears (the first
/// maintenance pass and the first sample run right after the listener is up).
async fn scrape_until(address: &str, expected: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = match reqwest::get(format!("{address}/metrics")).await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let missing: Vec<&str> = expected.iter().copied().filter(|e| !text.contains(e)).collect();
        if missing.is_empty() {
            return text;
        }
        assert!(Instant::now() < deadline, "missing {missing:?} from /metrics:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The value of the sample line that starts with `series` (name and labels).
fn value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no sample {series}:\n{metrics}"))
}

#[sqlx::test(migrations = false)]
async fn serve_exports_partition_connection_and_process_metrics_and_counters_from_zero(pool: PgPool) {
    let url = urls::database(&pool).await;
    let dir = tempfile::tempdir().unwrap();
    let mut serve = RoleProcess::start(
        CLOUDPHONE,
        "serve",
        &url,
        &[
            ("CLOUDPHONE_PARTITIONS_AHEAD", "5"),
            ("CLOUDPHONE_PARTITION_RETENTION_MONTHS", "12"),
        ],
        dir.path(),
    );
    let address = serve.address("command API listening").await;
    let metrics = scrape_until(
        &address,
        &[
            "cloudphone_partition_maintenance_runs_total{outcome=\"ok\"} 1",
            "cloudphone_db_server_connections ",
            "process_resident_memory_bytes ",
        ],
    )
    .await;

    // Partitions: five months ahead (migrate made three).
    assert_eq!(value(&metrics, "cloudphone_partition_months_ahead"), 5.0);
    assert_eq!(value(&metrics, "cloudphone_partitions{state=\"live\"}"), 6.0);
    assert_eq!(value(&metrics, "cloudphone_partitions{state=\"archived\"}"), 0.0);
    // The command API's writer also makes sure of the months ahead when it opens: which of
    // the two created them is a race.
    assert!(value(&metrics, "cloudphone_partitions_created_total") <= 2.0);
    assert_eq!(value(&metrics, "cloudphone_partitions_archived_total"), 0.0);
    assert_eq!(
        value(
            &metrics,
            "cloudphone_partition_maintenance_runs_total{outcome=\"error\"}"
        ),
        0.0
    );
    let last_success = value(
        &metrics,
        "cloudphone_partition_maintenance_last_success_timestamp_seconds",
    );
    let now = chrono::Utc::now().timestamp() as f64;
    assert!(
        (now - 60.0..=now + 1.0).contains(&last_success),
        "{last_success} vs {now}"
    );

    // Connections: the pools of `serve` (the dashboards' reads on the primary, no replica
    // here), and the server's.
    for pool in ["primary", "query", "query_reads:primary"] {
        assert_eq!(
            value(
                &metrics,
                &format!("cloudphone_db_pool_max_connections{{pool=\"{pool}\"}}")
            ),
            16.0
        );
        for state in ["idle", "in_use"] {
            value(
                &metrics,
                &format!("cloudphone_db_pool_connections{{pool=\"{pool}\",state=\"{state}\"}}"),
            );
        }
    }
    assert!(value(&metrics, "cloudphone_db_server_connections") >= 1.0);
    assert!(value(&metrics, "cloudphone_db_server_max_connections") >= 1.0);

    // The process.
    assert!(value(&metrics, "process_resident_memory_bytes") > 0.0);
    assert!(value(&metrics, "process_open_fds") > 0.0);
    assert!(value(&metrics, "process_start_time_seconds") > 0.0);
    value(&metrics, "process_cpu_seconds_total");

    // Counters nothing has incremented yet, each role's, at 0.
    for series in [
        "cloudphone_append_events_total",
        "cloudphone_append_conflicts_total",
        "cloudphone_command_retries_total",
        "cloudphone_http_idempotent_replays_total",
        "cloudphone_append_idempotent_replays_total",
        "cloudphone_personal_data_keys_destroyed_total",
        "cloudphone_read_fallbacks_total{reason=\"no_replica\"}",
        "cloudphone_read_fallbacks_total{reason=\"replica_failed\"}",
        "cloudphone_read_fallbacks_total{reason=\"replica_behind\"}",
        "cloudphone_audit_export_failures_total",
        "cloudphone_projection_dead_letters_total{projection=\"fleet\"}",
        "cloudphone_projection_dead_letters_total{projection=\"daily_usage\"}",
        "cloudphone_projection_events_total{projection=\"daily_usage\"}",
    ] {
        assert_eq!(value(&metrics, series), 0.0, "{series}");
    }
    // No relay in the embedded default.
    assert!(!metrics.contains("cloudphone_relay_published_total"), "{metrics}");
}

#[sqlx::test(migrations = false)]
async fn a_projector_samples_its_process_and_pool_on_its_ops_listener(pool: PgPool) {
    let url = urls::database(&pool).await;
    let dir = tempfile::tempdir().unwrap();
    let mut projector = RoleProcess::start(CLOUDPHONE, "projector", &url, &[], dir.path());
    let address = projector.address("health, readiness and metrics listening").await;
    let metrics = scrape_until(
        &address,
        &[
            "cloudphone_db_pool_connections{pool=\"primary\",state=\"in_use\"}",
            "cloudphone_db_server_max_connections ",
            "process_cpu_seconds_total ",
        ],
    )
    .await;
    assert_eq!(
        value(&metrics, "cloudphone_projection_events_total{projection=\"fleet\"}"),
        0.0
    );
    // Only `serve` and the command API maintain partitions, only they have a query pool.
    assert!(
        !metrics.contains("cloudphone_partition_maintenance_runs_total"),
        "{metrics}"
    );
    assert!(!metrics.contains("pool=\"query\""), "{metrics}");
}

#[test]
fn the_partition_maintenance_flags_are_documented() {
    let help = Command::new(env!("CARGO_BIN_EXE_cloudphone"))
        .args(["command-api", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--partitions-ahead",
        "CLOUDPHONE_PARTITIONS_AHEAD",
        "--partition-maintenance-interval-secs",
        "CLOUDPHONE_PARTITION_MAINTENANCE_INTERVAL_SECS",
        "--partition-retention-months",
        "CLOUDPHONE_PARTITION_RETENTION_MONTHS",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help:\n{help}");
    }
    let refused = Command::new(env!("CARGO_BIN_EXE_cloudphone"))
        .args(["command-api", "--partitions-ahead", "121"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
}
