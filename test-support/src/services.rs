//! The services the test command (ops/dev/test.sh) starts and several tests share: the
//! Kafka-protocol broker (ops/dev/broker.sh) and the streaming replica (ops/dev/replica.sh).
//! A test that stops one runs in a nextest test group of its own kind (.config/nextest.toml).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where the development broker listens.
pub const BROKERS: &str = "127.0.0.1:9092";

/// A script of the workspace's `ops/dev/`.
pub fn ops_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/dev").join(name)
}

/// A port nobody listens on now (the kernel's pick), released for a service of a test's own
/// (a scratch cluster, a PgBouncer).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs an ops/dev script off the async workers (it may take seconds); true when it succeeded.
pub async fn run_script(name: &'static str, args: Vec<String>) -> bool {
    tokio::task::spawn_blocking(move || {
        Command::new(ops_script(name))
            .args(&args)
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    })
    .await
    .unwrap()
}

/// `ops/dev/broker.sh <action>` (`start`, `stop`, ...); panics when it fails.
pub fn broker(action: &str) {
    let status = Command::new(ops_script("broker.sh")).arg(action).status().unwrap();
    assert!(status.success(), "ops/dev/broker.sh {action} failed");
}

/// `ops/dev/replica.sh <action>` (`start`, `stop`, ...); panics when it fails.
pub fn replica(action: &str) {
    let status = Command::new(ops_script("replica.sh")).arg(action).status().unwrap();
    assert!(status.success(), "ops/dev/replica.sh {action} failed");
}

/// Starts the shared replica and waits (at most 30 s) until it has replayed the creation and
/// migrations of `pool`'s database; that database's URL on the replica.
pub async fn replica_of(pool: &sqlx::PgPool) -> String {
    replica("start");
    crate::db::migrated(pool).await;
    let url = crate::urls::replica_database(pool).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let migrated = match sqlx::PgPool::connect(&url).await {
            Ok(replica) => {
                let table: Option<Option<String>> =
                    sqlx::query_scalar("SELECT to_regclass('projection_checkpoints')::text")
                        .fetch_optional(&replica)
                        .await
                        .unwrap_or(None);
                replica.close().await;
                table.flatten().is_some()
            }
            Err(_) => false,
        };
        if migrated {
            return url;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the replica never replayed the migrations"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// WAL replay paused on the shared replica (`pg_wal_replay_pause()`: it answers queries but
/// falls behind); resumed when dropped, so a failing test cannot leave it paused.
#[derive(Debug)]
pub struct ReplayPaused {
    url: String,
}

impl ReplayPaused {
    /// Pauses replay on the replica server of `url` (any of its databases).
    pub async fn pause(url: &str) -> Self {
        let replica = sqlx::PgPool::connect(url).await.unwrap();
        sqlx::query("SELECT pg_wal_replay_pause()")
            .execute(&replica)
            .await
            .unwrap();
        replica.close().await;
        ReplayPaused { url: url.to_owned() }
    }
}

impl Drop for ReplayPaused {
    fn drop(&mut self) {
        let resumed = Command::new("psql")
            .args([self.url.as_str(), "-Atqc", "SELECT pg_wal_replay_resume()"])
            .status();
        assert!(
            resumed.is_ok_and(|s| s.success()),
            "could not resume replay on the replica"
        );
    }
}
