//! The query API over HTTP against a real PostgreSQL: every query and filter over known rows
//! (`graphql`), device lists in every order under combined filters (`device_lists`), the
//! admin's operations fields (`operations`), hostile clients (`hostile`, in the nextest `load`
//! group: it asserts latencies), and read routing through a real streaming replica
//! (`replicas`, in the `replica` group: one of them stops the replica). `support` holds the
//! rows to query; the API and its client are `test_support::query`'s.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests panic on purpose

mod device_lists;
mod graphql;
mod hostile;
mod operations;
mod replicas;
mod support;
