//! GraphQL subscriptions over WebSocket at `/graphql`: dashboards get each answer at once,
//! then again whenever it changed, pushed from projection commits rather than polled.
//!
//! - [`protocol`]: the `graphql-transport-ws` and legacy `graphql-ws` messages and close codes.
//! - `socket`: one connection: authentication (the `connection_init` payload's
//!   `authorization`, or the upgrade request's header), its subscriptions, keep-alive, slow
//!   clients, shutdown.
//! - `hub`: identical subscriptions (same document, variables and caller scope) share one
//!   evaluation; the groups a batch touched are evaluated again, at most once per interval.
//! - `listener`: the projectors' change notices (`read_models::changes`), received with
//!   `LISTEN` on the primary; behind a transaction pooler, which delivers no notifications,
//!   the projections' checkpoints polled instead ([`ChangeFeed`]).
//!
//! Reading from replicas, a round reads from one that has replayed everything the primary had
//! committed when the round began, so an answer is pushed only once its source holds the
//! batch that caused it.

pub(crate) mod hub;
pub(crate) mod listener;
pub mod protocol;
pub(crate) mod socket;

use std::time::Duration;

/// Names of the subscription metrics.
pub mod metrics_names {
    /// Gauge: open subscription sockets (acknowledged).
    pub const CONNECTIONS: &str = "cloudphone_subscription_connections";
    /// Gauge: open subscriptions.
    pub const SUBSCRIPTIONS: &str = "cloudphone_subscriptions";
    /// Gauge: distinct questions kept live (groups of identical subscriptions).
    pub const GROUPS: &str = "cloudphone_subscription_groups";
    /// Counter: evaluations by result (`changed`, `unchanged`, `failed`).
    pub const EVALUATIONS_TOTAL: &str = "cloudphone_subscription_evaluations_total";
    /// Counter: evaluation rounds run (each for the notices since the last).
    pub const ROUNDS_TOTAL: &str = "cloudphone_subscription_rounds_total";
    /// Counter: answers written to clients.
    pub const PUSHES_TOTAL: &str = "cloudphone_subscription_pushes_total";
    /// Histogram: seconds from a batch's change notice arriving to an answer it changed
    /// written to a client.
    pub const PUSH_LATENCY_SECONDS: &str = "cloudphone_subscription_push_latency_seconds";
    /// Counter: sockets closed by the server, by reason.
    pub const CLOSED_TOTAL: &str = "cloudphone_subscription_closed_total";
    /// Gauge: 1 while change notices are being received.
    pub const LISTENING: &str = "cloudphone_subscription_listening";
}

/// Limits and pacing of subscriptions.
#[derive(Debug, Clone, Copy)]
pub struct LiveConfig {
    /// A subscription is evaluated at most once per this interval (changes in between are
    /// coalesced into one evaluation).
    pub evaluation_interval: Duration,
    /// Evaluations run at once in a round.
    pub evaluation_concurrency: usize,
    /// Subscriptions one socket may hold.
    pub max_subscriptions_per_connection: usize,
    /// Sockets one client (token subject) may hold.
    pub max_connections_per_client: usize,
    /// Sockets the server holds.
    pub max_connections: usize,
    /// How often the server pings; a client heard nothing from for two intervals is closed.
    pub keep_alive: Duration,
    /// How long a client has to send `connection_init`.
    pub init_timeout: Duration,
    /// How long one answer may take to be written before the client counts as too slow.
    pub send_timeout: Duration,
    /// Largest message a client may send.
    pub max_message_bytes: usize,
    /// How the hub learns that projections wrote.
    pub change_feed: ChangeFeed,
}

/// How the hub learns that projections wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeFeed {
    /// `LISTEN` for the projectors' change notices on the primary (a session of its own):
    /// each notice names the owners and devices a batch touched.
    Listen,
    /// Read the projections' checkpoints this often and count a moved one as "everything of
    /// that projection changed": for a primary behind a transaction pooler. Costs one indexed
    /// read per interval and broader evaluation rounds.
    PollCheckpoints(Duration),
}

impl Default for LiveConfig {
    fn default() -> Self {
        LiveConfig {
            evaluation_interval: Duration::from_millis(50),
            evaluation_concurrency: 8,
            max_subscriptions_per_connection: 100,
            max_connections_per_client: 100,
            max_connections: 20_000,
            keep_alive: Duration::from_secs(15),
            init_timeout: Duration::from_secs(5),
            send_timeout: Duration::from_secs(10),
            max_message_bytes: 64 * 1024,
            change_feed: ChangeFeed::Listen,
        }
    }
}
