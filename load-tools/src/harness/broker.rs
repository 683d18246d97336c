//! The ops/dev scripts a run drives, and a Kafka-protocol broker of the run's own started by
//! one of them (ops/dev/broker.sh).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

use crate::harness::roles::free_port;

/// The ops/dev scripts: in this repository when run from a checkout, else `ops/dev`.
pub fn ops_dev() -> PathBuf {
    let in_repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/dev");
    if in_repo.join("scratch-postgres.sh").exists() {
        in_repo
    } else {
        PathBuf::from("ops/dev")
    }
}

/// Runs an ops/dev script; fails with its output when it does.
pub async fn script(name: &str, args: &[&str], env: &[(&str, String)]) -> anyhow::Result<()> {
    let path = ops_dev().join(name);
    let mut command = tokio::process::Command::new(&path);
    command.args(args).stdin(Stdio::null());
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command
        .output()
        .await
        .with_context(|| format!("run {}", path.display()))?;
    if !output.status.success() {
        bail!(
            "{} {} failed ({}): {}",
            path.display(),
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// How the development broker stores what it is sent (`CLOUDPHONE_BROKER_ENGINE` of
/// ops/dev/broker.sh).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BrokerEngine {
    /// SQLite on disk: a `kill -9` and restart loses nothing acknowledged (the tests' engine).
    Sqlite,
    /// In memory: nothing survives the broker, for runs that measure throughput alone.
    Memory,
}

impl BrokerEngine {
    pub fn name(self) -> &'static str {
        match self {
            BrokerEngine::Sqlite => "sqlite",
            BrokerEngine::Memory => "memory",
        }
    }
}

/// A Kafka-protocol broker of the run's own (ops/dev/broker.sh on a free port with its own
/// data directory), so killing it touches nobody else's; stopped and deleted when dropped.
#[derive(Debug)]
pub struct Broker {
    pub port: u16,
    dir: PathBuf,
    engine: BrokerEngine,
}

impl Broker {
    /// A broker on the tests' engine (SQLite).
    pub async fn fresh(dir: &Path) -> anyhow::Result<Self> {
        Self::fresh_on(dir, BrokerEngine::Sqlite).await
    }

    pub async fn fresh_on(dir: &Path, engine: BrokerEngine) -> anyhow::Result<Self> {
        let broker = Broker {
            port: free_port()?,
            dir: dir.to_owned(),
            engine,
        };
        broker.run("fresh").await?;
        Ok(broker)
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Its process id while it runs (from the script's pid file), for sampling its CPU.
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("broker.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn env(&self) -> [(&'static str, String); 3] {
        [
            ("CLOUDPHONE_BROKER_PORT", self.port.to_string()),
            ("CLOUDPHONE_BROKER_DIR", self.dir.display().to_string()),
            ("CLOUDPHONE_BROKER_ENGINE", self.engine.name().to_owned()),
        ]
    }

    /// `broker.sh kill` (a `kill -9`), `start`, ...
    pub async fn run(&self, action: &str) -> anyhow::Result<()> {
        script("broker.sh", &[action], &self.env()).await
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let mut command = Command::new(ops_dev().join("broker.sh"));
        command
            .arg("stop")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (key, value) in self.env() {
            command.env(key, value);
        }
        let _ = command.status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
