//! The query API over HTTP against a real PostgreSQL: every query and filter over known rows
//! (`graphql`), device lists in every order under combined filters (`device_lists`), the
//! admin's operations fields (`operations`), version 2 of `fleet`: users and the fleet's
//! history (`fleet_v2`), the web console's files and development tokens
//! (`console`), hostile clients (`hostile`, in the nextest `load` group: it asserts
//! latencies), read routing through a real streaming replica (`replicas`, in the `replica`
//! group: one of them stops the replica), the dashboards' connection pool (`read_pool`), how
//! PostgreSQL plans the dashboards' batched reads (`plans`), and subscriptions over WebSocket
//! (`subscriptions`). `support` holds the rows to query; the API and its clients are
//! `test_support::query`'s and `test_support::live`'s.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests panic on purpose

mod console;
mod device_lists;
mod fleet_v2;
mod graphql;
mod hostile;
mod operations;
mod plans;
mod read_pool;
mod replicas;
mod subscriptions;
mod support;
