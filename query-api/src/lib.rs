//! Cloudphone query side: the GraphQL API dashboards query, served from read replicas.
//!
//! A request to `POST /graphql` goes through the HTTP edge's layers (`routes`), then the
//! extractors (`extract`): when its time started, who asks (authenticated, rate limited,
//! allowed to read dashboards) and what (its document resolved, measured and parsed, its
//! position). The handler (`graphql::handler`) then routes the question to a source,
//! answers it from the cache or executes it, and asks again elsewhere when a replica fails.
//!
//! - [`startup`]: [`QueryApi`] built, bound and served until stopped; `state`: what every
//!   handler shares; `routes`: the router (`/graphql`, GraphiQL, the audit export,
//!   health, readiness, metrics, fallbacks) and the edge's refusals; `reply`: the GraphQL
//!   error JSON every refusal is worded in.
//! - `extract`: the request extractors; [`consistency`]: read-your-writes positions (the
//!   `X-Min-Position` header and `minPosition` arguments asked for, `X-Read-Position`
//!   answered).
//! - [`graphql`]: the schema (device statistics, daily usage, device connections, users,
//!   projection status), scoped to the caller before any SQL is built; nested loads batched.
//! - [`reads`]: every SQL statement over the read models; [`read_pool`]: the connections
//!   they run on, taken back without a round trip.
//! - [`sources`]: the primary and its replicas, health-checked rotation, fallback, and
//!   read-your-writes (a source whose projections reached the caller's position).
//! - [`cache`]: answers kept in memory, keyed by what was asked, by whom, and the checkpoints
//!   they were read at; [`single_flight`]: concurrent misses of one key computed once;
//!   [`persisted`]: automatic persisted queries; [`safelist`]: only registered documents,
//!   when an operator asks for that.
//! - [`graphql::document`]: a document measured (tokens, nesting, fragments expanded without
//!   expanding them, depth, introspection) before anything expensive sees it, and
//!   [`documents`] each text read once; [`executor`]:
//!   the threads validation and execution run on, apart from every other role's.
//! - [`subscriptions`]: the same questions kept live over WebSocket (`GET /graphql` upgraded),
//!   evaluated again when a projection batch touched what they read, pushed when changed.
//! - [`audit`]: `GET /v1/audit/events`, the event history exported for auditors.
//! - `console`: the web console at `/` and GraphiQL at `GET /graphql`, their files embedded
//!   from `web/` (nothing loaded from another host), and development tokens.
//!
//! This crate must never write: not the log, not the read models.

pub mod audit;
pub mod cache;
pub mod config;
pub mod consistency;
pub(crate) mod console;
pub mod documents;
pub mod executor;
pub(crate) mod extract;
pub mod graphql;
pub mod openapi;
pub mod persisted;
pub mod read_pool;
pub mod reads;
pub(crate) mod reply;
pub(crate) mod routes;
pub mod safelist;
pub mod single_flight;
pub mod sources;
pub mod startup;
pub(crate) mod state;
pub mod subscriptions;
mod watermark;

pub use config::QueryApiConfig;
pub use sources::{ReadError, ReadSources, Route, Source, SourcesConfig};
pub use startup::QueryApi;
