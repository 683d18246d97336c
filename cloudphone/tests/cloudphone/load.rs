//! `cloudphone load platform` and `load kafka` on small worlds: every kind of operation runs,
//! the reports have figures for each and for every role, and nothing fails or is lost.

use std::process::Command;

use serde_json::Value;
use test_support::urls;

/// Runs `cloudphone load <args> --json <file>` against the test server and returns its report
/// and its output, failing with the output if the run failed.
fn run_load(args: &[&str]) -> (Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let output = Command::new(env!("CARGO_BIN_EXE_cloudphone"))
        .arg("load")
        .args(args)
        .arg("--json")
        .arg(&report)
        .env("CLOUDPHONE_DATABASE_URL", urls::server())
        .env("CLOUDPHONE_LOG", "warn")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{text}");
    let report = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    (report, text)
}

#[test]
fn load_platform_drives_every_operation_and_reports_every_role() {
    let (report, text) = run_load(&[
        "platform",
        "--history-events",
        "4000",
        "--history-months",
        "3",
        "--users",
        "8",
        "--duration",
        "6",
        "--rate",
        "60",
        "--export-every",
        "1",
    ]);

    // The world spans several monthly partitions and the projector applied it.
    assert!(report["world"]["events"].as_i64().unwrap() >= 4000, "{report:#}");
    assert!(report["world"]["months"].as_i64().unwrap() >= 3, "{report:#}");
    assert!(report["world"]["devices"].as_i64().unwrap() > 0, "{report:#}");
    // Commands, plain dashboard reads, reads after a write and exports all ran and were timed.
    let operations = &report["operations"];
    for op in ["dashboard", "dashboard_after_write", "export"] {
        assert!(operations[op]["count"].as_u64().unwrap_or(0) > 0, "no {op}: {report:#}");
        assert!(operations[op]["p99_ms"].as_f64().unwrap() > 0.0, "{report:#}");
    }
    let commands: u64 = ["create", "start", "stop", "resize", "delete"]
        .iter()
        .map(|op| operations[op]["count"].as_u64().unwrap_or(0))
        .sum();
    assert!(commands > 0, "{report:#}");
    assert_eq!(report["fatal_errors"], 0, "{report:#}");
    assert_eq!(report["replay"]["succeeded"], true, "{report:#}");
    // Every role's CPU and memory were measured from its own process.
    for role in ["command-api", "query-api", "projector", "load generator"] {
        let figures = &report["roles"][role];
        assert!(figures["peak_rss_mib"].as_f64().unwrap() > 1.0, "{role}: {report:#}");
        assert!(figures["cpu_seconds"].as_f64().unwrap() > 0.0, "{role}: {report:#}");
    }
    assert!(report["projection_lag"]["samples"].as_u64().unwrap() > 0, "{report:#}");
    let cache = &report["query_cache"];
    assert!(
        cache["hits"].as_f64().unwrap() + cache["misses"].as_f64().unwrap() > 0.0,
        "{report:#}"
    );
    // The text report names every figure too.
    for line in [
        "operations/s completed",
        "projection lag",
        "query cache",
        "replay of daily_usage",
    ] {
        assert!(text.contains(line), "{line}: {text}");
    }
}

/// `cloudphone load subscriptions` with a few sockets for a few seconds: commands acknowledged
/// in the push phase are seen on their users' subscriptions, and the report carries the push
/// latency, the poll baseline and the memory per subscription.
#[test]
fn load_subscriptions_sees_commands_pushed_to_their_users_dashboards() {
    let (report, text) = run_load(&[
        "subscriptions",
        "--subscribers",
        "40",
        "--users",
        "4",
        "--per-socket",
        "5",
        "--rate",
        "20",
        "--seconds",
        "3",
    ]);

    assert_eq!(report["sockets"], 8, "{report:#}");
    assert!(report["pushes_received"].as_u64().unwrap() > 40, "{report:#}");
    let phases = report["phases"].as_array().unwrap();
    assert_eq!(phases.len(), 3, "{report:#}");
    let (push, poll) = (&phases[1], &phases[2]);
    for phase in [push, poll] {
        assert!(phase["commands"]["acked"].as_u64().unwrap() > 0, "{report:#}");
        let latency = &phase["visible_latency"];
        assert!(latency["count"].as_u64().unwrap() > 0, "{report:#}");
        assert!(latency["p99_ms"].as_f64().unwrap() >= latency["p50_ms"].as_f64().unwrap());
        assert!(phase["answers_per_second"].as_f64().unwrap() > 0.0, "{report:#}");
    }
    assert!(push["evaluations_per_second"].as_f64().unwrap() > 0.0, "{report:#}");
    assert_eq!(push["answer_errors"], 0, "{report:#}");
    assert!(
        report["memory"]["kib_per_subscription"].as_f64().is_some(),
        "{report:#}"
    );
    assert!(
        text.contains("push (WebSocket)") && text.contains("KiB per subscription"),
        "{text}"
    );
}

/// `cloudphone load kafka` at a low rate: commands go through the embedded projector and then
/// through the relay and two Kafka workers on a broker of the run's own; both phases are
/// timed, the broker alone carried every message, each worker applied events, and the read
/// models equal a rebuild of the log.
#[test]
fn load_kafka_measures_both_modes_and_the_broker_alone() {
    let (report, text) = run_load(&[
        "kafka",
        "--rate",
        "40",
        "--duration",
        "4",
        "--users",
        "8",
        "--workers",
        "2",
        "--partitions",
        "4",
        "--broker-messages",
        "2000",
    ]);

    let phases = report["phases"].as_array().unwrap();
    assert_eq!(phases.len(), 2, "{report:#}");
    for phase in phases {
        assert!(phase["commands"]["acknowledged"].as_u64().unwrap() > 40, "{report:#}");
        assert!(phase["latency"]["count"].as_u64().unwrap() > 40, "{report:#}");
        assert!(phase["latency"]["p99_ms"].as_f64().unwrap() > 0.0, "{report:#}");
        assert!(
            phase["cpu_ms_per_command"]["command-api"].as_f64().unwrap() > 0.0,
            "{report:#}"
        );
    }
    let kafka = &phases[1];
    assert!(
        kafka["relay"]["published_per_second"].as_f64().unwrap() > 0.0,
        "{report:#}"
    );
    let workers = kafka["worker_events_per_second"].as_object().unwrap();
    assert_eq!(workers.len(), 2, "{report:#}");
    for (worker, rate) in workers {
        assert!(rate.as_f64().unwrap() > 0.0, "{worker} applied nothing: {report:#}");
    }
    let alone = &report["broker_alone"];
    assert_eq!(alone["messages"], 2000, "{report:#}");
    assert!(alone["consumed_per_second"].as_f64().unwrap() > 0.0, "{report:#}");
    assert_eq!(report["read_models_equal_a_rebuild"], true, "{report:#}");
    assert!(text.contains("equal to a rebuild"), "{text}");
}

/// `cloudphone load kafka --faults` on the durable engine: while commands flow, a worker is
/// added, one stopped with SIGTERM, one killed and restarted, one killed for good (its
/// partitions move once its session expires) and the broker killed and restarted. Every
/// window acknowledges commands that reach the read models, and at the end the read models
/// equal a rebuild: nothing lost, nothing counted twice.
#[test]
fn load_kafka_faults_lose_nothing_and_measure_each_spike() {
    let (report, text) = run_load(&[
        "kafka",
        "--rate",
        "40",
        "--duration",
        "2",
        "--users",
        "8",
        "--workers",
        "2",
        "--partitions",
        "4",
        "--broker-engine",
        "sqlite",
        "--broker-messages",
        "0",
        "--faults",
        "--fault-interval",
        "10",
        "--session-timeout-ms",
        "6000",
    ]);
    let faults = &report["faults"];
    assert_eq!(faults["skipped"], serde_json::json!([]), "{report:#}");
    let windows: Vec<&str> = faults["windows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|window| window["fault"].as_str().unwrap())
        .collect();
    assert_eq!(
        windows,
        [
            "none",
            "add_worker",
            "stop_worker",
            "kill_worker",
            "lose_worker",
            "restart_broker"
        ],
        "{report:#}"
    );
    for window in faults["windows"].as_array().unwrap() {
        assert!(
            window["latency"]["count"].as_u64().unwrap() > 100,
            "a window whose commands never showed: {report:#}"
        );
    }
    // The survivors wait for the lost worker's session (6 s) before they take its partitions.
    let lost = &faults["windows"][4];
    assert!(lost["action_ms"].as_f64().unwrap() > 3_000.0, "{report:#}");
    assert_eq!(report["read_models_equal_a_rebuild"], true, "{report:#}");
    assert!(text.contains("equal to a rebuild"), "{text}");
}
