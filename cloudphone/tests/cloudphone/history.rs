//! The history checker under faults (issue #20), bounded for the test suite: `cloudphone load
//! history` against the real binary, once in the embedded mode and once in the Kafka mode,
//! each with every fault kind at least once (the primary restarted, `kill -9` of each role,
//! the network to PostgreSQL cut and blackholed; in Kafka mode the relay killed and the broker
//! killed). Each run has a PostgreSQL cluster and a broker of its own, so it touches no shared
//! service. The long version runs outside CI: `cloudphone load history --duration 1200`.

use std::process::Command;

use serde_json::Value;

/// Runs `cloudphone load history` with `args`; returns its JSON report, panicking with its
/// output when it fails.
fn load_history(args: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    // Its output goes where the test's goes: shown when the test fails or runs too long.
    let status = Command::new(env!("CARGO_BIN_EXE_cloudphone"))
        .args(["load", "history"])
        .args(args)
        .arg("--json")
        .arg(&report)
        .env("CLOUDPHONE_LOG", "info")
        .status()
        .unwrap();
    assert!(status.success(), "load history failed ({status}); its output is above");
    serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap()
}

/// What every run must show: every fault kind happened, nothing broke a promise, and the
/// history was rich enough to mean something.
fn assert_kept_every_promise(report: &Value, kinds: &[&str]) {
    for kind in kinds {
        assert!(
            report["faults_by_kind"][kind].as_u64().is_some_and(|n| n >= 1),
            "no {kind} fault: {}",
            report["faults_by_kind"]
        );
    }
    assert_eq!(report["violation_count"], 0, "{:#}", report["violations"]);
    assert_eq!(report["platform_failures"], Value::Array(Vec::new()));
    assert_eq!(report["read_models_equal_a_rebuild"], true);
    assert_eq!(report["query_api_reads_its_writes"], true);
    let operations = &report["operations"];
    assert!(operations["acknowledged"].as_u64().unwrap() >= 200, "{operations:#}");
    // Invalid operations on purpose: refusals happen, and each one was checked.
    assert!(
        report["checker"]["refusals_justified_by_state"].as_u64().unwrap() >= 5,
        "{:#}",
        report["checker"]
    );
    assert!(
        report["checker"]["refusals_justified_by_route"].as_u64().unwrap() >= 1,
        "{:#}",
        report["checker"]
    );
}

const EMBEDDED_FAULTS: [&str; 6] = [
    "primary_restart",
    "kill_command_api",
    "kill_projector",
    "kill_query_api",
    "network_cut",
    "network_blackhole",
];

#[test]
fn the_embedded_platform_keeps_every_promise_through_every_fault() {
    let report = load_history(&[
        "--duration",
        "25",
        "--fault-every",
        "3",
        "--clients",
        "8",
        "--seed",
        "7",
    ]);
    assert_kept_every_promise(&report, &EMBEDDED_FAULTS);
}

#[test]
fn the_kafka_platform_keeps_every_promise_through_every_fault() {
    let report = load_history(&[
        "--kafka",
        "--duration",
        "30",
        "--fault-every",
        "3",
        "--clients",
        "8",
        "--seed",
        "11",
    ]);
    let mut kinds = EMBEDDED_FAULTS.to_vec();
    kinds.extend(["kill_relay", "broker_kill"]);
    assert_kept_every_promise(&report, &kinds);
}
