//! `cloudphone keys`: master keys of personal data.
//!
//! Rotation without downtime: generate a key; on every role set it as CLOUDPHONE_MASTER_KEY
//! and the old one in CLOUDPHONE_PREVIOUS_MASTER_KEYS (a rolling restart; each role unwraps
//! with either); run `keys rotate`; once `keys status` shows no data key under the old key,
//! drop it from the configuration.

use anyhow::bail;
use event_log::personal::{MasterKey, PersonalDataKeys};
use operator_console::Progress;

use crate::cli::KeysAction;
use crate::commands::database::{self, Schema};

pub async fn run(action: &KeysAction) -> anyhow::Result<()> {
    match action {
        KeysAction::Generate { id } => {
            let id = id
                .clone()
                .unwrap_or_else(|| format!("mk-{}", chrono::Utc::now().format("%Y%m%d-%H%M%S")));
            let (_, spec) = MasterKey::generate(&id)?;
            println!("{spec}");
            Ok(())
        }
        KeysAction::Rotate {
            database,
            master_keys,
            batch,
        } => {
            let keyring = master_keys.keyring()?;
            let pool = database::connect_existing(database, Schema::Log).await?;
            let keys = PersonalDataKeys::new(pool, keyring.clone());
            let before = keys.inventory().await?;
            let pending: i64 = before
                .by_master_key
                .iter()
                .filter(|(id, _)| id != keyring.active().id())
                .map(|(_, count)| count)
                .sum();
            let mut progress = Progress::new("keys rotate", pending.max(0) as u64);
            let report = keys
                .rotate(*batch, chrono::Utc::now(), |done| progress.set(done))
                .await?;
            let elapsed = progress.finish();
            println!(
                "rewrapped {} data keys under master key {} in {:.1}s",
                report.rewrapped,
                keyring.active().id(),
                elapsed.as_secs_f64()
            );
            print_inventory(&keys).await
        }
        KeysAction::Status { database, master_keys } => {
            let pool = database::connect_existing(database, Schema::Log).await?;
            let keys = PersonalDataKeys::new(pool, master_keys.keyring()?);
            print_inventory(&keys).await
        }
    }
}

async fn print_inventory(keys: &PersonalDataKeys) -> anyhow::Result<()> {
    let inventory = keys.inventory().await?;
    let active = keys.keyring().active().id();
    for (id, count) in &inventory.by_master_key {
        let marker = if id == active { " (active)" } else { "" };
        println!("master key {id}{marker}: {count} data keys");
    }
    println!("erased users: {}", inventory.erased);
    if inventory.by_master_key.iter().any(|(id, _)| id != active) {
        bail!("some data keys are still wrapped by an older master key; run `cloudphone keys rotate`")
    }
    Ok(())
}
