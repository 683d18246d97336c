//! Versions of each projection's tables. A version is a table layout plus the code that folds
//! events into it; `cloudphone replay` builds a version beside the live one (in its own
//! schema) and swaps it in.
//!
//! | projection    | version | tables                                        |
//! |---------------|---------|-----------------------------------------------|
//! | `fleet`       | 1       | `devices`, `device_stats`                     |
//! | `fleet`       | 2       | v1's, and `users` (tier, quota, registration, erased; no personal data), `fleet_status_changes` (per user, UTC hour and status: the net change of the device count) and `fleet_status_changes_all` (the same over every user); served by the query API's `users`, `User.tier`/`quota`/`registeredAt`/`erased` and `fleetHistory` |
//! | `daily_usage` | 1       | `daily_usage` keyed by day, user and device   |
//! | `daily_usage` | 2       | `daily_usage` keyed by user, day, device and currency (v1 added the cents of two currencies into one row; the key also serves a user's days, so v1's user index is gone), and `daily_usage_by_provider`: minutes, cost and sessions per user, day, provider and currency |
//! | `daily_usage` | 3       | version 2's tables, and `hourly_usage`: minutes and cost per user, UTC hour, device and currency, split exactly as the days are (the hours of a day always add up to its `daily_usage` row) |
//!
//! Version 1 of each is what the migrations create; the DDL here must say the same thing (a
//! test compares the catalog of a rebuilt version 1 with the migrated one).

use event_schema::StreamType;

use crate::Projection;

/// A projection's table layout at one version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableLayout {
    pub projection: Projection,
    pub version: i32,
}

impl Projection {
    /// The newest version this code can build and maintain.
    pub const fn latest_version(self) -> i32 {
        match self {
            Projection::Fleet => 2,
            Projection::DailyUsage => 3,
        }
    }

    /// The layout of `version`, or `None` when this code does not know it.
    pub fn layout(self, version: i32) -> Option<TableLayout> {
        (1..=self.latest_version()).contains(&version).then_some(TableLayout {
            projection: self,
            version,
        })
    }

    /// The projection called `name` (as stored in checkpoints).
    pub fn named(name: &str) -> Option<Projection> {
        Projection::ALL.into_iter().find(|p| p.name() == name)
    }
}

impl TableLayout {
    /// The tables of this version, all in one schema.
    pub fn tables(self) -> &'static [&'static str] {
        match (self.projection, self.version) {
            (Projection::Fleet, 1) => &["devices", "device_stats"],
            (Projection::Fleet, _) => &[
                "devices",
                "device_stats",
                "users",
                "fleet_status_changes",
                "fleet_status_changes_all",
            ],
            (Projection::DailyUsage, 1) => &["daily_usage"],
            (Projection::DailyUsage, 2) => &["daily_usage", "daily_usage_by_provider"],
            (Projection::DailyUsage, _) => &["daily_usage", "daily_usage_by_provider", "hourly_usage"],
        }
    }

    /// True when `daily_usage` rows are keyed by currency too (version 2 and later).
    pub fn usage_keyed_by_currency(self) -> bool {
        self.projection == Projection::DailyUsage && self.version >= 2
    }

    /// True when `users` and the fleet's history by status (`fleet_status_changes`,
    /// `fleet_status_changes_all`) are maintained (version 2 of `fleet` and later).
    pub fn has_users_and_history(self) -> bool {
        self.projection == Projection::Fleet && self.version >= 2
    }

    /// The streams whose events the projection folds: a rebuild reads only these.
    pub fn stream_types(self) -> &'static [StreamType] {
        if self.has_users_and_history() {
            &[StreamType::Device, StreamType::User]
        } else {
            &[StreamType::Device]
        }
    }

    /// True when `daily_usage_by_provider` is maintained.
    pub fn has_provider_breakdown(self) -> bool {
        self.projection == Projection::DailyUsage && self.version >= 2
    }

    /// True when `hourly_usage` is maintained (version 3 and later).
    pub fn has_hourly_usage(self) -> bool {
        self.projection == Projection::DailyUsage && self.version >= 3
    }

    /// `CREATE TABLE` statements for the tables, in `schema`, without keys or indexes (a bulk
    /// load fills them first; [`TableLayout::index_ddl`] adds those after).
    pub fn table_ddl(self, schema: &str) -> String {
        let s = quote_ident(schema);
        match self.projection {
            Projection::Fleet => {
                let mut ddl = format!(
                    "CREATE TABLE {s}.devices (
                     device_id uuid NOT NULL, owner_id uuid NOT NULL, provider text NOT NULL, status text NOT NULL,
                     cpu_cores integer NOT NULL, memory_mb integer NOT NULL, android_version smallint NOT NULL,
                     created_at timestamptz NOT NULL, last_started_at timestamptz,
                     minutes_used bigint NOT NULL DEFAULT 0, updated_position bigint NOT NULL);
                 CREATE TABLE {s}.device_stats (
                     user_id uuid NOT NULL, status text NOT NULL, provider text NOT NULL, device_count bigint NOT NULL,
                     total_cpu_cores bigint NOT NULL, total_memory_mb bigint NOT NULL,
                     last_created_at timestamptz NOT NULL) WITH (fillfactor = 70);"
                );
                if self.has_users_and_history() {
                    // Quota limits are u32 in events: bigint holds them all. Null until the
                    // first QuotaChanged. No email or phone: see `read_models::users`.
                    ddl.push_str(&format!(
                        "CREATE TABLE {s}.users (
                             user_id uuid NOT NULL, tier text NOT NULL, max_devices bigint, max_cpu_cores bigint,
                             max_memory_mb bigint, registered_at timestamptz NOT NULL, erased boolean NOT NULL,
                             erased_at timestamptz, updated_position bigint NOT NULL);
                         CREATE TABLE {s}.fleet_status_changes (
                             user_id uuid NOT NULL, hour timestamptz NOT NULL, status text NOT NULL, delta bigint NOT NULL);
                         CREATE TABLE {s}.fleet_status_changes_all (
                             hour timestamptz NOT NULL, status text NOT NULL, delta bigint NOT NULL);"
                    ));
                }
                ddl
            }
            Projection::DailyUsage => {
                let mut ddl = format!(
                    "CREATE TABLE {s}.daily_usage (
                         day date NOT NULL, user_id uuid NOT NULL, device_id uuid NOT NULL, minutes bigint NOT NULL,
                         cost_minor bigint NOT NULL, currency text NOT NULL);"
                );
                if self.has_provider_breakdown() {
                    ddl.push_str(&format!(
                        "CREATE TABLE {s}.daily_usage_by_provider (
                             user_id uuid NOT NULL, day date NOT NULL, provider text NOT NULL, currency text NOT NULL,
                             minutes bigint NOT NULL, cost_minor bigint NOT NULL, sessions bigint NOT NULL);"
                    ));
                }
                if self.has_hourly_usage() {
                    // `hour` is the start of a UTC hour (whole hours only).
                    ddl.push_str(&format!(
                        "CREATE TABLE {s}.hourly_usage (
                             user_id uuid NOT NULL, hour timestamptz NOT NULL, device_id uuid NOT NULL, currency text NOT NULL,
                             minutes bigint NOT NULL, cost_minor bigint NOT NULL);"
                    ));
                }
                ddl
            }
        }
    }

    /// Primary keys and indexes, with the names the live tables have (each version lives in
    /// its own schema, so the names never collide).
    pub fn index_ddl(self, schema: &str) -> String {
        let s = quote_ident(schema);
        match self.projection {
            Projection::Fleet => {
                let mut ddl = format!(
                "ALTER TABLE {s}.devices ADD CONSTRAINT devices_pkey PRIMARY KEY (device_id);
                 CREATE INDEX devices_owner_idx ON {s}.devices (owner_id, status, provider);
                 CREATE INDEX devices_created_idx ON {s}.devices (created_at, device_id);
                 CREATE INDEX devices_owner_created_idx ON {s}.devices (owner_id, created_at, device_id);
                 CREATE INDEX devices_last_started_idx
                     ON {s}.devices ((coalesce(last_started_at, '-infinity'::timestamptz)), device_id);
                 CREATE INDEX devices_owner_last_started_idx
                     ON {s}.devices (owner_id, (coalesce(last_started_at, '-infinity'::timestamptz)), device_id);
                 CREATE INDEX devices_minutes_used_idx ON {s}.devices (minutes_used, device_id);
                 CREATE INDEX devices_owner_minutes_used_idx ON {s}.devices (owner_id, minutes_used, device_id);
                 ALTER TABLE {s}.device_stats ADD CONSTRAINT device_stats_pkey PRIMARY KEY (user_id, status, provider);"
                );
                if self.has_users_and_history() {
                    // `users` is listed by its key (keyset pages). The history's keys serve
                    // its reads: one user's hours (base before a range, deltas within it),
                    // and every user's hours in the all-users table.
                    ddl.push_str(&format!(
                        "ALTER TABLE {s}.users ADD CONSTRAINT users_pkey PRIMARY KEY (user_id);
                         ALTER TABLE {s}.fleet_status_changes
                             ADD CONSTRAINT fleet_status_changes_pkey PRIMARY KEY (user_id, hour, status);
                         ALTER TABLE {s}.fleet_status_changes_all
                             ADD CONSTRAINT fleet_status_changes_all_pkey PRIMARY KEY (hour, status);"
                    ));
                }
                ddl
            }
            Projection::DailyUsage => {
                let mut ddl = if self.usage_keyed_by_currency() {
                    // Keyed by user first, the key also serves a user's range of days: no
                    // separate user index to build and maintain.
                    format!(
                        "ALTER TABLE {s}.daily_usage ADD CONSTRAINT daily_usage_pkey
                             PRIMARY KEY (user_id, day, device_id, currency);
                         CREATE INDEX daily_usage_device_idx ON {s}.daily_usage (device_id, day);"
                    )
                } else {
                    format!(
                        "ALTER TABLE {s}.daily_usage ADD CONSTRAINT daily_usage_pkey PRIMARY KEY (day, user_id, device_id);
                         CREATE INDEX daily_usage_user_idx ON {s}.daily_usage (user_id, day);
                         CREATE INDEX daily_usage_device_idx ON {s}.daily_usage (device_id, day);"
                    )
                };
                if self.has_provider_breakdown() {
                    ddl.push_str(&format!(
                        "ALTER TABLE {s}.daily_usage_by_provider
                             ADD CONSTRAINT daily_usage_by_provider_pkey PRIMARY KEY (user_id, day, provider, currency);"
                    ));
                }
                if self.has_hourly_usage() {
                    // As `daily_usage`: the key serves a user's range of hours, the device
                    // index one device's (`dailyUsage(filter: {deviceId})`, `Device.usage`).
                    ddl.push_str(&format!(
                        "ALTER TABLE {s}.hourly_usage
                             ADD CONSTRAINT hourly_usage_pkey PRIMARY KEY (user_id, hour, device_id, currency);
                         CREATE INDEX hourly_usage_device_idx ON {s}.hourly_usage (device_id, hour);"
                    ));
                }
                ddl
            }
        }
    }

    /// The `ON CONFLICT` target of an upsert into `daily_usage`.
    pub fn usage_conflict_target(self) -> &'static str {
        if self.usage_keyed_by_currency() {
            "(user_id, day, device_id, currency)"
        } else {
            "(day, user_id, device_id)"
        }
    }
}

/// `name` as a quoted SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_version_from_one_to_the_latest_has_a_layout() {
        for projection in Projection::ALL {
            assert!(projection.layout(0).is_none());
            assert!(projection.layout(projection.latest_version() + 1).is_none());
            for version in 1..=projection.latest_version() {
                let layout = projection.layout(version).map(|l| l.tables().len());
                assert!(layout.is_some_and(|n| n > 0), "{projection:?} v{version}");
            }
            assert_eq!(Projection::named(projection.name()), Some(projection));
        }
        assert_eq!(Projection::named("nope"), None);
    }

    #[test]
    fn every_table_of_a_version_gets_a_primary_key() {
        for projection in Projection::ALL {
            for version in 1..=projection.latest_version() {
                let Some(layout) = projection.layout(version) else {
                    continue;
                };
                let ddl = layout.index_ddl("shadow");
                for table in layout.tables() {
                    let flat = ddl.split_whitespace().collect::<Vec<_>>().join(" ");
                    assert!(
                        flat.contains(&format!("\"shadow\".{table} ADD CONSTRAINT {table}_pkey PRIMARY KEY")),
                        "{table} of {projection:?} v{version}"
                    );
                    assert!(layout.table_ddl("shadow").contains(&format!("\"shadow\".{table} (")));
                }
            }
        }
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
