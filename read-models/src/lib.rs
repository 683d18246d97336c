//! The read models' shape: what the projectors write and the query API reads.
//!
//! - [`Projection`]: the projections and the names their checkpoints are stored under;
//!   [`versions`]: each projection's tables by version, with their DDL.
//! - [`fleet`]: `devices` and `device_stats` rows, and the one definition of `device_stats`
//!   from `devices`; [`users`] and [`history`]: the `users` rows and the fleet's size by
//!   status over time of `fleet` version 2; [`usage`]: `daily_usage`, `daily_usage_by_provider`
//!   and `hourly_usage` rows.
//! - [`status`]: where every projection stands against the log head, its live version and dead
//!   letters, and the rebuilds in progress; [`changes`]: what a committed batch changed,
//!   published to listeners (the query API's subscriptions); [`dead_letters`]: the events a
//!   projection parked and what operators did about them.
//! - [`migrate()`]: the tables' migrations (versions 1000 and up, in `migrations/`), the
//!   projectors' bookkeeping (checkpoints, Kafka offsets, dead letters) included.
//! - [`stored`]: every read model at once, in memory and as read from the tables.
//!
//! Both `projections` (the writer) and `query-api` (the reader) depend on this crate, so the
//! reader never links the projector. It must never fold events or tail the log: that is the
//! writer's job.

pub mod changes;
pub mod dead_letters;
pub mod fleet;
pub mod history;
pub mod status;
pub mod stored;
pub mod usage;
pub mod users;
pub mod versions;

use sqlx::PgPool;
use sqlx::migrate::Migrator;

pub use stored::{ReadModels, load_read_models};

/// The projections this code maintains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Projection {
    /// `devices` and `device_stats` (from version 2, `users` and the fleet's history too).
    Fleet,
    /// `daily_usage`.
    DailyUsage,
}

impl Projection {
    pub const ALL: [Projection; 2] = [Projection::Fleet, Projection::DailyUsage];

    /// The name its checkpoint, offsets and dead letters are stored under.
    pub const fn name(self) -> &'static str {
        match self {
            Projection::Fleet => "fleet",
            Projection::DailyUsage => "daily_usage",
        }
    }
}

/// Applies the read-model migrations (versions 1000+; the event log's are ignored here).
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    migrator().run(pool).await
}

/// The read-model migrations embedded in the binary (versions 1000+), told to ignore the
/// event log's versions recorded in the same table.
pub fn migrator() -> Migrator {
    let mut migrator: Migrator = sqlx::migrate!("./migrations");
    migrator.set_ignore_missing(true);
    migrator
}
