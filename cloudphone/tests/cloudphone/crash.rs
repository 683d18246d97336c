//! A projector process killed (SIGKILL) at random points while events flow ends, once caught
//! up, with read models equal to a rebuild from scratch: nothing counted twice, nothing lost.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use event_log::{EventStore, StoreConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::PgPool;
use test_support::{db, urls};

use crate::support::{assert_read_models_equal_a_rebuild, projections_reach, write_history};

fn projector(url: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_cloudphone"))
        .arg("projector")
        .env("CLOUDPHONE_DATABASE_URL", url)
        .env("CLOUDPHONE_OPS_LISTEN", "127.0.0.1:0")
        .env("CLOUDPHONE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[sqlx::test(migrations = false)]
async fn a_projector_killed_twenty_times_ends_equal_to_a_rebuild(pool: PgPool) {
    db::migrated(&pool).await;
    let url = urls::database(&pool).await;
    let store = Arc::new(EventStore::open(pool.clone(), StoreConfig::default()).await.unwrap());
    let done = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|seed| tokio::spawn(write_history(store.clone(), done.clone(), seed, Duration::ZERO)))
        .collect();

    let mut rng = StdRng::seed_from_u64(99);
    for _ in 0..20 {
        let mut child = projector(&url);
        // Let it run for a random while (mid-batch, mid-commit or idle), then SIGKILL.
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..400))).await;
        child.kill().unwrap();
        child.wait().unwrap();
    }
    done.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }

    // A last run catches up.
    let mut child = projector(&url);
    let head = event_log::LogReader::new(pool.clone()).head().await.unwrap().position;
    assert!(head > 500, "enough events flowed: {head}");
    projections_reach(&pool, head, Duration::from_secs(60)).await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert_read_models_equal_a_rebuild(&pool).await;
}
