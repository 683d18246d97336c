//! The COPY writers: rows in PostgreSQL's binary COPY format, streamed to a table in chunks.

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use futures::future::BoxFuture;
use sqlx::PgConnection;
use sqlx::postgres::PgCopyIn;
use uuid::Uuid;

use read_models::fleet::{DeviceRow, StatsKey, StatsRow};
use read_models::history::StatusChangeKey;
use read_models::usage::{HourKey, ProviderDayKey, ProviderUsage, UsageDelta, UsageKey};
use read_models::users::UserRow;

use super::throttle::{Pacer, pace};

pub(super) async fn copy_devices<'r>(
    conn: &mut PgConnection,
    table: &str,
    rows: impl Iterator<Item = &'r DeviceRow> + Send,
    write_rate: Option<u64>,
) -> Result<(), sqlx::Error> {
    copy_each(conn, table, rows, write_rate, |copy, row| {
        copy.row(11)
            .uuid(row.device_id)
            .uuid(row.owner_id)
            .text(row.provider.as_str())
            .text(row.status.as_str())
            .int4(row.cpu_cores)
            .int4(row.memory_mb)
            .int2(row.android_version)
            .time(Some(row.created_at))
            .time(row.last_started_at)
            .int8(row.minutes_used)
            .int8(row.updated_position)
            .end_row();
    })
    .await
}

pub(super) async fn copy_device_stats<'r>(
    conn: &mut PgConnection,
    table: &str,
    rows: impl Iterator<Item = (&'r StatsKey, &'r StatsRow)> + Send,
    write_rate: Option<u64>,
) -> Result<(), sqlx::Error> {
    copy_each(conn, table, rows, write_rate, |copy, (key, row)| {
        copy.row(7)
            .uuid(key.user_id)
            .text(key.status.as_str())
            .text(key.provider.as_str())
            .int8(row.device_count)
            .int8(row.total_cpu_cores)
            .int8(row.total_memory_mb)
            .time(Some(row.last_created_at))
            .end_row();
    })
    .await
}

pub(super) async fn copy_users<'r>(
    conn: &mut PgConnection,
    table: &str,
    rows: impl Iterator<Item = &'r UserRow> + Send,
    write_rate: Option<u64>,
) -> Result<(), sqlx::Error> {
    copy_each(conn, table, rows, write_rate, |copy, row| {
        let limit = |pick: fn(&event_schema::Quota) -> u32| row.quota.as_ref().map(|q| i64::from(pick(q)));
        copy.row(9)
            .uuid(row.user_id)
            .text(row.tier.as_str())
            .opt_int8(limit(|q| q.max_devices))
            .opt_int8(limit(|q| q.max_cpu_cores))
            .opt_int8(limit(|q| q.max_memory_mb))
            .time(Some(row.registered_at))
            .bool(row.erased)
            .time(row.erased_at)
            .int8(row.updated_position)
            .end_row();
    })
    .await
}

pub(super) async fn copy_status_changes<'r>(
    conn: &mut PgConnection,
    table: &str,
    rows: impl Iterator<Item = (&'r StatusChangeKey, &'r i64)> + Send,
    write_rate: Option<u64>,
) -> Result<(), sqlx::Error> {
    copy_each(conn, table, rows, write_rate, |copy, (key, delta)| {
        copy.row(4)
            .uuid(key.user_id)
            .time(Some(key.hour))
            .text(key.status.as_str())
            .int8(*delta)
            .end_row();
    })
    .await
}

pub(super) async fn copy_usage<'r>(
    conn: &mut PgConnection,
    table: &str,
    rows: impl Iterator<Item = (&'r (UsageKey, String), &'r UsageDelta)> + Send,
    write_rate: Option<u64>,
) -> Result<(), sqlx::Error> {
    copy_each(conn, table, rows, write_rate, |copy, ((key, currency), delta)| {
        copy.row(6)
            .date(key.day)
            .uuid(key.user_id)
            .uuid(key.device_id)
            .int8(delta.minutes)
            .int8(delta.cost_minor)
            .text(currency)
            .end_row();
    })
    .await
}

/// Version 1 has no such table: its fold leaves no rows, and no rows open no COPY.
pub(super) async fn copy_by_provider<'r>(
    conn: &mut PgConnection,
    table: &str,
    rows: impl Iterator<Item = (&'r ProviderDayKey, &'r ProviderUsage)> + Send,
    write_rate: Option<u64>,
) -> Result<(), sqlx::Error> {
    copy_each(conn, table, rows, write_rate, |copy, (key, delta)| {
        copy.row(7)
            .uuid(key.user_id)
            .date(key.day)
            .text(key.provider.as_str())
            .text(&key.currency)
            .int8(delta.minutes)
            .int8(delta.cost_minor)
            .int8(delta.sessions)
            .end_row();
    })
    .await
}

/// Versions 1 and 2 have no such table: their folds leave no rows, and no rows open no COPY.
pub(super) async fn copy_hourly<'r>(
    conn: &mut PgConnection,
    table: &str,
    rows: impl Iterator<Item = (&'r HourKey, &'r UsageDelta)> + Send,
    write_rate: Option<u64>,
) -> Result<(), sqlx::Error> {
    copy_each(conn, table, rows, write_rate, |copy, (key, delta)| {
        copy.row(6)
            .uuid(key.user_id)
            .time(Some(key.hour))
            .uuid(key.device_id)
            .text(&key.currency)
            .int8(delta.minutes)
            .int8(delta.cost_minor)
            .end_row();
    })
    .await
}

/// Streams `rows` into `table`, each written by `encode`, in chunks paced to `write_rate`.
/// No rows open no COPY: a table a layout lacks is never named.
///
/// A boxed future whose `Send` is checked here, against the bounds: left to the callers'
/// futures, the compiler cannot prove it for every lifetime of the borrowed rows (the
/// "`Send` is not general enough" of rust-lang/rust#64552).
fn copy_each<'a, T: Send + 'a>(
    conn: &'a mut PgConnection,
    table: &'a str,
    rows: impl Iterator<Item = T> + Send + 'a,
    write_rate: Option<u64>,
    encode: impl Fn(&mut CopyRows, T) + Send + 'a,
) -> BoxFuture<'a, Result<(), sqlx::Error>> {
    Box::pin(async move {
        let mut rows = rows.peekable();
        if rows.peek().is_none() {
            return Ok(());
        }
        let mut copy = CopySink::open(conn, table, write_rate).await?;
        for row in rows {
            encode(&mut copy.rows, row);
            copy.flush_if_full().await?;
        }
        copy.finish().await
    })
}

/// Rows in PostgreSQL's binary COPY format (no text to format or parse: uuids, dates and
/// numbers go as their bytes), columns in table order.
#[derive(Debug, Default)]
struct CopyRows {
    buffer: Vec<u8>,
    rows: u64,
}

/// Days and microseconds in PostgreSQL's binary formats count from 2000-01-01.
const PG_EPOCH_DAYS_FROM_CE: i32 = 730_120;
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

impl CopyRows {
    const SIGNATURE: &'static [u8] = b"PGCOPY\n\xff\r\n\0";

    fn header() -> Vec<u8> {
        let mut header = Self::SIGNATURE.to_vec();
        header.extend_from_slice(&0i32.to_be_bytes()); // flags
        header.extend_from_slice(&0i32.to_be_bytes()); // header extension length
        header
    }

    fn row(&mut self, fields: i16) -> &mut Self {
        self.buffer.extend_from_slice(&fields.to_be_bytes());
        self
    }

    fn field(&mut self, bytes: &[u8]) -> &mut Self {
        let len = i32::try_from(bytes.len()).unwrap_or(i32::MAX);
        self.buffer.extend_from_slice(&len.to_be_bytes());
        self.buffer.extend_from_slice(bytes);
        self
    }

    fn uuid(&mut self, value: Uuid) -> &mut Self {
        self.field(value.as_bytes())
    }

    fn date(&mut self, value: NaiveDate) -> &mut Self {
        self.field(&(value.num_days_from_ce() - PG_EPOCH_DAYS_FROM_CE).to_be_bytes())
    }

    fn int2(&mut self, value: i16) -> &mut Self {
        self.field(&value.to_be_bytes())
    }

    fn int4(&mut self, value: i32) -> &mut Self {
        self.field(&value.to_be_bytes())
    }

    fn int8(&mut self, value: i64) -> &mut Self {
        self.field(&value.to_be_bytes())
    }

    fn opt_int8(&mut self, value: Option<i64>) -> &mut Self {
        match value {
            Some(value) => self.int8(value),
            None => self.null(),
        }
    }

    fn bool(&mut self, value: bool) -> &mut Self {
        self.field(&[u8::from(value)])
    }

    fn null(&mut self) -> &mut Self {
        self.buffer.extend_from_slice(&(-1i32).to_be_bytes());
        self
    }

    fn time(&mut self, value: Option<DateTime<Utc>>) -> &mut Self {
        match value {
            Some(at) => self.field(&(at.timestamp_micros() - PG_EPOCH_UNIX_MICROS).to_be_bytes()),
            None => self.null(),
        }
    }

    fn text(&mut self, value: &str) -> &mut Self {
        self.field(value.as_bytes())
    }

    fn end_row(&mut self) {
        self.rows += 1;
    }
}

/// Rows streamed to PostgreSQL with `COPY ... FROM STDIN (FORMAT binary)` in chunks, so the
/// server stores one chunk while the next is encoded.
struct CopySink<'c> {
    copy: PgCopyIn<&'c mut PgConnection>,
    rows: CopyRows,
    /// Bytes per second sent, when throttled.
    pacer: Option<Pacer>,
}

impl<'c> CopySink<'c> {
    const CHUNK_BYTES: usize = 1 << 20;

    /// Opens a COPY into `table` that sends at most `write_rate` bytes per second.
    async fn open(conn: &'c mut PgConnection, table: &str, write_rate: Option<u64>) -> Result<Self, sqlx::Error> {
        let copy = conn
            .copy_in_raw(&format!("COPY {table} FROM STDIN (FORMAT binary)"))
            .await?;
        Ok(CopySink {
            copy,
            rows: CopyRows {
                buffer: CopyRows::header(),
                rows: 0,
            },
            pacer: Pacer::new(write_rate),
        })
    }

    async fn flush_if_full(&mut self) -> Result<(), sqlx::Error> {
        if self.rows.buffer.len() >= Self::CHUNK_BYTES {
            let chunk = std::mem::take(&mut self.rows.buffer);
            let bytes = chunk.len() as u64;
            self.copy.send(chunk).await?;
            pace(&mut self.pacer, bytes).await;
        }
        Ok(())
    }

    async fn finish(mut self) -> Result<(), sqlx::Error> {
        self.rows.buffer.extend_from_slice(&(-1i16).to_be_bytes()); // trailer
        let chunk = std::mem::take(&mut self.rows.buffer);
        let bytes = chunk.len() as u64;
        self.copy.send(chunk).await?;
        self.copy.finish().await?;
        pace(&mut self.pacer, bytes).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    #[test]
    fn copy_rows_are_postgres_binary_format() {
        let mut copy = CopyRows::default();
        let at = Utc.with_ymd_and_hms(2000, 1, 2, 0, 0, 0).single();
        let day = NaiveDate::from_ymd_opt(2000, 1, 3).unwrap_or_default();
        copy.row(6)
            .uuid(Uuid::from_u128(1))
            .text("gcp")
            .int8(-5)
            .time(at)
            .time(None)
            .date(day)
            .end_row();
        let mut expected = vec![0, 6];
        expected.extend_from_slice(&[0, 0, 0, 16]);
        expected.extend_from_slice(Uuid::from_u128(1).as_bytes());
        expected.extend_from_slice(&[0, 0, 0, 3, b'g', b'c', b'p']);
        expected.extend_from_slice(&[0, 0, 0, 8]);
        expected.extend_from_slice(&(-5i64).to_be_bytes());
        expected.extend_from_slice(&[0, 0, 0, 8]);
        expected.extend_from_slice(&86_400_000_000i64.to_be_bytes());
        expected.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        expected.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 2]);
        assert_eq!(copy.buffer, expected);
        assert_eq!(copy.rows, 1);
        assert_eq!(&CopyRows::header()[..11], b"PGCOPY\n\xff\r\n\0");
        assert_eq!(CopyRows::header().len(), 19);
    }
}
