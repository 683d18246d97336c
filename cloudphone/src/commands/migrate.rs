//! `cloudphone migrate`.

use anyhow::Context;

use crate::cli::DatabaseArgs;
use crate::commands::database;

pub async fn run(args: &DatabaseArgs) -> anyhow::Result<()> {
    let pool = database::connect(args).await?;
    event_log::migrate(&pool).await.context("migration failed")?;
    read_models::migrate(&pool)
        .await
        .context("read model migration failed")?;
    let partitions = event_log::partitions::list_partitions(&pool).await?;
    println!(
        "database is up to date; {} live partitions, {} archived",
        partitions.iter().filter(|p| !p.archived).count(),
        partitions.iter().filter(|p| p.archived).count()
    );
    Ok(())
}
