//! The command API's own metrics (the HTTP ones, the recorder and request tracing are the
//! HTTP edge's: [`http_edge::telemetry`]).

/// Counter: commands decided again after a concurrent change to their streams.
pub const COMMAND_RETRIES_TOTAL: &str = "cloudphone_command_retries_total";
/// Counter: decisions that would have written nothing (a refusal or a no-op) made on a cached
/// aggregate found behind the log, and so decided again on the log's state.
pub const COMMAND_STALE_DECISIONS_TOTAL: &str = "cloudphone_command_stale_decisions_total";
/// Counter: requests answered from a stored outcome of the same Idempotency-Key.
pub const IDEMPOTENT_REPLAYS_TOTAL: &str = "cloudphone_http_idempotent_replays_total";
/// Counter: users whose personal data key was destroyed (erasures).
pub const PERSONAL_DATA_KEYS_DESTROYED_TOTAL: &str = "cloudphone_personal_data_keys_destroyed_total";

/// Describes the command API's metrics to the installed recorder, and exports the ones
/// dashboards and alerts must see before their first event at 0.
pub fn describe_metrics() {
    metrics::describe_counter!(
        COMMAND_RETRIES_TOTAL,
        "Commands decided again after a concurrent change"
    );
    metrics::describe_counter!(
        COMMAND_STALE_DECISIONS_TOTAL,
        "Refusals or no-ops decided on a cached aggregate behind the log, decided again"
    );
    metrics::counter!(COMMAND_STALE_DECISIONS_TOTAL).increment(0);
    metrics::describe_counter!(IDEMPOTENT_REPLAYS_TOTAL, "Requests answered from an earlier outcome");
    metrics::describe_counter!(
        PERSONAL_DATA_KEYS_DESTROYED_TOTAL,
        "Users whose personal data key was destroyed (erasures)"
    );
}
