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
