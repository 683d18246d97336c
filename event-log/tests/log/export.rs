//! Audit export from the database: archived months included, time ranges pruned, filters,
//! resumption, and files that verify; personal data keys: created once, erased for good,
//! rotated to a new master key without losing a user.

use std::sync::Arc;

use chrono::NaiveDate;
use event_log::export::{ExportFormat, verify_export};
use event_log::history::{ExportOptions, HistoryExport, HistoryFilter};
use event_log::partitions;
use event_log::personal::{MasterKey, MasterKeyring, PersonalDataError, PersonalDataKeys};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::*;

async fn export(pool: &PgPool, filter: HistoryFilter, format: ExportFormat) -> Vec<u8> {
    let mut options = ExportOptions::new(format);
    options.page_size = 2; // many pages, even for a small history
    let mut export = HistoryExport::start(pool.clone(), filter, options).await.unwrap();
    let mut file = Vec::new();
    while let Some(chunk) = export.next_chunk().await {
        file.extend(chunk.unwrap());
    }
    file
}

fn positions(ndjson: &[u8]) -> Vec<i64> {
    let text = std::str::from_utf8(ndjson).unwrap();
    text.lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .filter_map(|line| line["position"].as_i64())
        .collect()
}

/// Six events: one device's in January and March 2034 (January archived), written by a
/// clock in those months.
async fn archived_history(pool: &PgPool) -> Uuid {
    let clock = manual_clock(utc(2034, 1, 10, 8, 0, 0));
    let log = store_with(pool, event_log::StoreConfig::default(), clock.clone()).await;
    let (device, owner) = (Uuid::now_v7(), Uuid::now_v7());
    log.append(create_device(device, owner)).await.unwrap();
    log.append(starts(device, owner, event_log::ExpectedVersion::Exact(1), 2))
        .await
        .unwrap();
    clock.set(utc(2034, 3, 5, 8, 0, 0));
    log.append(starts(device, owner, event_log::ExpectedVersion::Exact(3), 2))
        .await
        .unwrap();
    partitions::archive_partition(pool, NaiveDate::from_ymd_opt(2034, 1, 1).unwrap())
        .await
        .unwrap();
    owner
}

#[sqlx::test(migrations = false)]
async fn an_export_reads_archived_months_resumes_and_verifies(pool: PgPool) {
    let owner = archived_history(&pool).await;

    let whole = export(&pool, HistoryFilter::default(), ExportFormat::Ndjson).await;
    assert_eq!(positions(&whole), [1, 2, 3, 4, 5, 6], "archived January included");
    let verified = verify_export(&whole[..], ExportFormat::Ndjson).unwrap();
    assert_eq!((verified.count, verified.contiguous), (6, true));
    let csv = export(&pool, HistoryFilter::default(), ExportFormat::Csv).await;
    assert_eq!(verify_export(&csv[..], ExportFormat::Csv).unwrap().count, 6);

    // Resumed after position 4: the rest, and a trailer that says where it starts.
    let rest = export(
        &pool,
        HistoryFilter {
            after: 4,
            ..Default::default()
        },
        ExportFormat::Ndjson,
    )
    .await;
    assert_eq!(positions(&rest), [5, 6]);
    assert_eq!(
        verify_export(&rest[..], ExportFormat::Ndjson).unwrap().anchor,
        Some(
            serde_json::from_slice::<event_schema::EventEnvelope>(whole.split(|b| *b == b'\n').nth(3).unwrap())
                .unwrap()
                .hash
        )
    );

    // A time range: March only, and `until` stops early.
    let march = HistoryFilter {
        from: Some(utc(2034, 3, 1, 0, 0, 0)),
        to: Some(utc(2034, 4, 1, 0, 0, 0)),
        ..Default::default()
    };
    assert_eq!(
        positions(&export(&pool, march.clone(), ExportFormat::Ndjson).await),
        [5, 6]
    );
    let january_only = HistoryFilter {
        until: Some(2),
        ..Default::default()
    };
    assert_eq!(
        positions(&export(&pool, january_only, ExportFormat::Ndjson).await),
        [1, 2]
    );

    // Filters by owner and type are not contiguous, and still verify.
    let owned = HistoryFilter {
        owner_id: Some(owner),
        event_type: Some("DeviceStarted".into()),
        ..Default::default()
    };
    let file = export(&pool, owned, ExportFormat::Ndjson).await;
    assert_eq!(positions(&file), [3, 4, 5, 6]);
    let verified = verify_export(&file[..], ExportFormat::Ndjson).unwrap();
    assert!(!verified.contiguous);
    let nobody = HistoryFilter {
        owner_id: Some(Uuid::now_v7()),
        ..Default::default()
    };
    let empty = export(&pool, nobody, ExportFormat::Ndjson).await;
    assert_eq!(verify_export(&empty[..], ExportFormat::Ndjson).unwrap().count, 0);
}

#[sqlx::test(migrations = false)]
async fn a_stored_payload_changed_by_sql_breaks_the_exported_file_at_that_position(pool: PgPool) {
    archived_history(&pool).await;
    tamper(&pool, "UPDATE user_events SET payload = jsonb_set(payload, '{started_at}', '\"2001-01-01T00:00:00Z\"') WHERE position = 5").await;
    let file = export(&pool, HistoryFilter::default(), ExportFormat::Ndjson).await;
    let broken = verify_export(&file[..], ExportFormat::Ndjson).unwrap_err();
    assert_eq!(broken.position(), Some(5), "{broken}");
}

fn keyring(active: &MasterKey, previous: &[&MasterKey]) -> Arc<MasterKeyring> {
    Arc::new(MasterKeyring::new(active.clone(), previous.iter().map(|k| (*k).clone()).collect()).unwrap())
}

#[sqlx::test(migrations = false)]
async fn data_keys_are_created_once_destroyed_for_good_and_rotated(pool: PgPool) {
    migrated(&pool).await;
    let (old, _) = MasterKey::generate("old").unwrap();
    let (new, _) = MasterKey::generate("new").unwrap();
    let now = chrono::Utc::now();
    let keys = PersonalDataKeys::new(pool.clone(), keyring(&old, &[]));
    let users: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
    let mut tokens = Vec::new();
    for user in &users {
        let key = keys.key_for_writing(*user, now).await.unwrap();
        tokens.push(key.encrypt_field(*user, "email", &json!(format!("{user}@example.com"))));
    }
    // The same key on the next use.
    let again = keys.key_for_writing(users[0], now).await.unwrap();
    assert!(again.decrypt_field(users[0], "email", &tokens[0]).is_ok());

    // Erasure destroys the key; it cannot come back, and a second erasure destroys nothing.
    assert!(keys.erase(users[4], now).await.unwrap());
    assert!(!keys.erase(users[4], now).await.unwrap());
    assert!(keys.key_for_reading(users[4]).await.unwrap().is_none());
    assert!(matches!(
        keys.key_for_writing(users[4], now).await,
        Err(PersonalDataError::Erased(_))
    ));
    // Erasing someone who never had a key leaves a tombstone that refuses a key later.
    let never = Uuid::now_v7();
    assert!(!keys.erase(never, now).await.unwrap());
    assert!(matches!(
        keys.key_for_writing(never, now).await,
        Err(PersonalDataError::Erased(_))
    ));

    // Without the old master key, the keys it wraps do not open.
    let new_only = PersonalDataKeys::new(pool.clone(), keyring(&new, &[]));
    assert!(matches!(
        new_only.key_for_reading(users[0]).await,
        Err(PersonalDataError::UnknownMasterKey { .. })
    ));
    // Rotation, with the old key still accepted: every live key rewrapped, in batches of 2.
    let rotating = PersonalDataKeys::new(pool.clone(), keyring(&new, &[&old]));
    let mut seen = Vec::new();
    let report = rotating.rotate(2, now, |done| seen.push(done)).await.unwrap();
    assert_eq!(report.rewrapped, 4);
    assert_eq!(seen, [2, 4]);
    let inventory = rotating.inventory().await.unwrap();
    assert_eq!(inventory.by_master_key, [("new".to_owned(), 4)]);
    assert_eq!(inventory.erased, 2);
    // Now the new key alone opens every live user's data, encrypted before the rotation.
    for (user, token) in users.iter().zip(&tokens).take(4) {
        let key = new_only.key_for_reading(*user).await.unwrap().unwrap();
        assert_eq!(
            key.decrypt_field(*user, "email", token).unwrap(),
            json!(format!("{user}@example.com"))
        );
    }
    assert_eq!(
        rotating.rotate(2, now, |_| {}).await.unwrap().rewrapped,
        0,
        "nothing left"
    );
}
