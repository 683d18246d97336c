//! What every scenario stands on, and nothing scenario-specific: the run's own databases,
//! tokens, role processes, the baselines' servers and views, and the instruments (latency
//! histograms, Prometheus scrapes, CPU and memory of processes).
//!
//! - [`broker`]: the ops/dev scripts, and a Kafka-protocol broker of the run's own.
//! - [`databases`]: each run's database, recreated on the server named; settling after a bulk
//!   load; the projections' checkpoints.
//! - [`tokens`]: the secret every run's servers check tokens with, and tokens signed with it.
//! - [`roles`]: roles as child processes of this binary; [`postgraphile`] and [`views`]: the
//!   baselines runs compare against; [`fixed_answer`] and [`postgres_alone`]: the HTTP stack
//!   and PostgreSQL alone, the ceilings a figure is a fraction of.
//! - [`visibility`]: commit-to-read-model latency (appends acknowledged, then seen in the
//!   projections' checkpoints).
//! - [`report`]: latency histograms and the JSON report; [`metrics`]: Prometheus scrapes;
//!   [`sampling`]: CPU and RSS from /proc.

pub mod broker;
pub mod databases;
pub mod fixed_answer;
pub mod metrics;
pub mod portal;
pub mod postgraphile;
pub mod postgres_alone;
pub mod report;
pub mod roles;
pub mod sampling;
pub mod tokens;
pub mod views;
pub mod visibility;
