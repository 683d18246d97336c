//! The erasure ledger: every erasure also written to a file outside the database, so that a
//! restore of the database to a point before an erasure cannot bring the person's data back
//! for good. After any restore, [`reapply`] (`cloudphone erasures reapply`, and the command
//! API at start) destroys again the data key of every user the ledger names.
//!
//! Guarantees, with the command API's part (`command_api::commands::erase_user`):
//!
//! - **Written first, fsync'd, or not acknowledged.** An erasure is appended to the ledger
//!   (one `write` on a file opened with `O_APPEND`, then `fsync`; the directory is fsync'd
//!   when the file is created) before the data key is destroyed and `UserErased` appended. If
//!   the ledger cannot be written the request fails (503) having changed nothing; the client
//!   retries. So the ledger names every acknowledged erasure, and possibly some that failed
//!   after it was written (reapplying those completes them, which is what was asked).
//! - **Idempotent.** A user may appear any number of times; reapplying destroys a key still
//!   present, records a tombstone for a user the database does not know (registered after the
//!   restore point: no key can ever be made for them again), and leaves erased users alone.
//! - **Survives what it must.** It is only worth something on storage a database restore does
//!   not roll back (another volume or host, backed up on its own schedule, never in the
//!   database's backup or data directory). Losing it loses nothing of the database; it loses
//!   the means to redo erasures after a restore.
//!
//! Format: one JSON object per line, `{"user_id":"<uuid>","erased_at":"<RFC 3339>"}`. A last
//! line without its newline is a write a crash tore (never acknowledged): reading ignores it,
//! and opening the ledger for writing ends it with a newline first, so the next record starts
//! on a line of its own. Any other line that does not parse is reported, never skipped
//! silently.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

/// Why the ledger could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("erasure ledger {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("erasure ledger {0} is not a regular file")]
    NotAFile(PathBuf),
    #[error("erasure ledger: {0}")]
    Database(#[from] sqlx::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LedgerError + '_ {
    move |source| LedgerError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One erasure as the ledger records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErasureRecord {
    pub user_id: Uuid,
    pub erased_at: DateTime<Utc>,
}

/// A ledger file the command API appends to.
#[derive(Debug)]
pub struct ErasureLedger {
    path: PathBuf,
    // One record written and fsync'd at a time within the process.
    write: Mutex<()>,
}

impl ErasureLedger {
    /// Opens the ledger at `path`, creating it (and fsyncing its directory) when missing,
    /// and ends a torn last line. Fails when it cannot be read and written.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, LedgerError> {
        let path = path.into();
        let existed = path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io(&path))?;
        if !file.metadata().map_err(io(&path))?.is_file() {
            return Err(LedgerError::NotAFile(path));
        }
        let len = file.metadata().map_err(io(&path))?.len();
        if len > 0 {
            let mut last = [0u8; 1];
            file.seek(SeekFrom::Start(len - 1)).map_err(io(&path))?;
            file.read_exact(&mut last).map_err(io(&path))?;
            if last[0] != b'\n' {
                file.write_all(b"\n").map_err(io(&path))?;
                file.sync_data().map_err(io(&path))?;
            }
        }
        if !existed {
            file.sync_all().map_err(io(&path))?;
            sync_parent(&path)?;
        }
        Ok(ErasureLedger {
            path,
            write: Mutex::new(()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `record` and waits until it is on disk. Blocking: call it off the async
    /// threads ([`ErasureLedger::record_blocking`] does).
    pub fn record(&self, record: &ErasureRecord) -> Result<(), LedgerError> {
        let mut line = serde_json::to_vec(record).map_err(|e| LedgerError::Io {
            path: self.path.clone(),
            source: e.into(),
        })?;
        line.push(b'\n');
        let _guard = self.write.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // Opened for each record: a ledger volume that went away fails the erasure now,
        // rather than writing to a file nobody can reach.
        let mut file = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(io(&self.path))?;
        file.write_all(&line).map_err(io(&self.path))?;
        file.sync_data().map_err(io(&self.path))
    }

    /// [`ErasureLedger::record`] on a blocking thread.
    pub async fn record_blocking(self: &std::sync::Arc<Self>, record: ErasureRecord) -> Result<(), LedgerError> {
        let ledger = std::sync::Arc::clone(self);
        match tokio::task::spawn_blocking(move || ledger.record(&record)).await {
            Ok(result) => result,
            Err(join) => Err(LedgerError::Io {
                path: self.path.clone(),
                source: std::io::Error::other(join.to_string()),
            }),
        }
    }
}

fn sync_parent(path: &Path) -> Result<(), LedgerError> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(parent).and_then(|dir| dir.sync_all()).map_err(io(parent))
}

/// What a ledger file holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LedgerContents {
    pub records: Vec<ErasureRecord>,
    /// Line numbers (from 1) of complete lines that do not parse.
    pub unreadable_lines: Vec<usize>,
    /// A last line without its newline was ignored (a write torn by a crash).
    pub torn_tail: bool,
}

impl LedgerContents {
    /// Each erased user once, with the earliest time the ledger gives.
    pub fn users(&self) -> BTreeMap<Uuid, DateTime<Utc>> {
        let mut users = BTreeMap::new();
        for record in &self.records {
            users
                .entry(record.user_id)
                .and_modify(|at: &mut DateTime<Utc>| *at = (*at).min(record.erased_at))
                .or_insert(record.erased_at);
        }
        users
    }

    /// Adds another ledger's records (one ledger per command API instance).
    pub fn extend(&mut self, other: LedgerContents) {
        self.records.extend(other.records);
        self.unreadable_lines.extend(other.unreadable_lines);
        self.torn_tail |= other.torn_tail;
    }
}

/// Reads the ledger at `path` (blocking).
pub fn read(path: &Path) -> Result<LedgerContents, LedgerError> {
    let metadata = std::fs::metadata(path).map_err(io(path))?;
    if !metadata.is_file() {
        return Err(LedgerError::NotAFile(path.to_owned()));
    }
    let bytes = std::fs::read(path).map_err(io(path))?;
    Ok(parse(&bytes))
}

/// Parses a ledger's bytes.
pub fn parse(bytes: &[u8]) -> LedgerContents {
    let mut contents = LedgerContents::default();
    let mut rest = bytes;
    let mut number = 0;
    while !rest.is_empty() {
        number += 1;
        let Some(end) = rest.iter().position(|b| *b == b'\n') else {
            contents.torn_tail = true;
            break;
        };
        let line = &rest[..end];
        rest = &rest[end + 1..];
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<ErasureRecord>(line) {
            Ok(record) => contents.records.push(record),
            Err(_) => contents.unreadable_lines.push(number),
        }
    }
    contents
}

/// What reapplying a ledger did (or, for [`pending`], would do).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReapplyReport {
    /// Users the ledger names.
    pub users: u64,
    /// Data keys the database held again and that were destroyed again.
    pub reshredded: u64,
    /// Users the database did not know at all: a tombstone now stops a key being made.
    pub tombstoned: u64,
    /// Users the database had erased already.
    pub already_erased: u64,
}

impl ReapplyReport {
    /// Whether the database was missing any erasure of the ledger.
    pub fn changed(&self) -> bool {
        self.reshredded + self.tombstoned > 0
    }
}

const CHUNK: usize = 10_000;

/// Destroys again the data key of every user in `users` (user id, erased at), in
/// transactions of 10 000 users; idempotent.
pub async fn reapply(pool: &PgPool, users: &BTreeMap<Uuid, DateTime<Utc>>) -> Result<ReapplyReport, LedgerError> {
    let mut report = ReapplyReport {
        users: users.len() as u64,
        ..ReapplyReport::default()
    };
    let users: Vec<(Uuid, DateTime<Utc>)> = users.iter().map(|(id, at)| (*id, *at)).collect();
    for chunk in users.chunks(CHUNK) {
        let ids: Vec<Uuid> = chunk.iter().map(|(id, _)| *id).collect();
        let times: Vec<DateTime<Utc>> = chunk.iter().map(|(_, at)| *at).collect();
        let mut tx = pool.begin().await?;
        let reshredded = sqlx::query(
            "UPDATE personal_data_keys AS k SET wrapped_key = NULL, master_key_id = NULL, erased_at = r.erased_at \
             FROM unnest($1::uuid[], $2::timestamptz[]) AS r(user_id, erased_at) \
             WHERE k.user_id = r.user_id AND k.erased_at IS NULL",
        )
        .bind(&ids)
        .bind(&times)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let tombstoned = sqlx::query(
            "INSERT INTO personal_data_keys (user_id, created_at, erased_at) \
             SELECT user_id, erased_at, erased_at FROM unnest($1::uuid[], $2::timestamptz[]) AS r(user_id, erased_at) \
             ON CONFLICT (user_id) DO NOTHING",
        )
        .bind(&ids)
        .bind(&times)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        report.reshredded += reshredded;
        report.tombstoned += tombstoned;
    }
    report.already_erased = report.users - report.reshredded - report.tombstoned;
    Ok(report)
}

/// What [`reapply`] would do, changing nothing.
pub async fn pending(pool: &PgPool, users: &BTreeMap<Uuid, DateTime<Utc>>) -> Result<ReapplyReport, LedgerError> {
    let mut report = ReapplyReport {
        users: users.len() as u64,
        ..ReapplyReport::default()
    };
    let ids: Vec<Uuid> = users.keys().copied().collect();
    for chunk in ids.chunks(CHUNK) {
        let (keyed, erased): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE erased_at IS NULL), count(*) FILTER (WHERE erased_at IS NOT NULL) \
             FROM personal_data_keys WHERE user_id = ANY($1)",
        )
        .bind(chunk)
        .fetch_one(pool)
        .await?;
        report.reshredded += keyed as u64;
        report.already_erased += erased as u64;
        report.tombstoned += chunk.len() as u64 - keyed as u64 - erased as u64;
    }
    Ok(report)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn record(n: u128) -> ErasureRecord {
        ErasureRecord {
            user_id: Uuid::from_u128(n),
            erased_at: DateTime::from_timestamp(1_700_000_000 + n as i64, 0).unwrap(),
        }
    }

    #[test]
    fn a_recorded_erasure_is_read_back_and_a_torn_line_is_ended_before_the_next() {
        let dir = std::env::temp_dir().join(format!("cloudphone-ledger-{}", Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("erasures.ndjson");
        let ledger = ErasureLedger::open(&path).unwrap();
        ledger.record(&record(1)).unwrap();
        ledger.record(&record(1)).unwrap();
        // A crash tore the next write.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"user_id\":\"0000")
            .unwrap();
        let torn = read(&path).unwrap();
        assert!(torn.torn_tail);
        assert_eq!(torn.records, vec![record(1), record(1)]);
        let ledger = ErasureLedger::open(&path).unwrap();
        ledger.record(&record(2)).unwrap();
        let contents = read(&path).unwrap();
        assert_eq!(contents.records, vec![record(1), record(1), record(2)]);
        assert_eq!(contents.unreadable_lines, vec![3]);
        assert!(!contents.torn_tail);
        assert_eq!(contents.users().len(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_ledger_whose_directory_is_gone_refuses_to_record() {
        let dir = std::env::temp_dir().join(format!("cloudphone-ledger-{}", Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let ledger = ErasureLedger::open(dir.join("erasures.ndjson")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(ledger.record(&record(1)).is_err());
    }

    #[test]
    fn a_directory_is_not_a_ledger() {
        assert!(matches!(
            ErasureLedger::open(std::env::temp_dir()),
            Err(LedgerError::NotAFile(_) | LedgerError::Io { .. })
        ));
    }
}
