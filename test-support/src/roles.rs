//! Roles as child processes, and the logs of roles run in the test's own process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use uuid::Uuid;

/// A child process that is killed when the test ends, however it ends.
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A role of the `cloudphone` binary as a child process (killed when dropped), listening on
/// ports the kernel picks, its JSON log in a file.
#[derive(Debug)]
pub struct RoleProcess {
    child: KillOnDrop,
    pub log: PathBuf,
}

impl RoleProcess {
    /// Starts `binary verb` (the binary: `env!("CARGO_BIN_EXE_cloudphone")` of the test) on
    /// the database at `url`, with `env` on top of the defaults; its log goes to a file in
    /// `dir`.
    pub fn start(binary: &str, verb: &str, url: &str, env: &[(&str, &str)], dir: &Path) -> Self {
        let log = dir.join(format!("{verb}-{}.log", Uuid::now_v7().simple()));
        let mut command = Command::new(binary);
        command
            .arg(verb)
            .env("CLOUDPHONE_DATABASE_URL", url)
            .env("CLOUDPHONE_COMMAND_LISTEN", "127.0.0.1:0")
            .env("CLOUDPHONE_QUERY_LISTEN", "127.0.0.1:0")
            .env("CLOUDPHONE_OPS_LISTEN", "127.0.0.1:0")
            .env("CLOUDPHONE_LOG_FORMAT", "json")
            .env("CLOUDPHONE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (key, value) in env {
            command.env(key, value);
        }
        RoleProcess {
            child: KillOnDrop(command.spawn().unwrap()),
            log,
        }
    }

    pub fn entries(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// Panics (with its log) when the process has exited.
    pub fn assert_alive(&mut self) {
        if let Some(status) = self.child.0.try_wait().unwrap() {
            panic!(
                "{} exited ({status}):\n{}",
                self.log.display(),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }

    /// Waits up to 90 s until the role logs an entry that `matches`; returns it.
    pub async fn logged(&mut self, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
        self.logged_within(what, Duration::from_secs(90), matches).await
    }

    /// Waits up to `limit` until the role logs an entry that `matches`; returns it. Panics,
    /// with the log, when the time is up or the role has exited.
    pub async fn logged_within(&mut self, what: &str, limit: Duration, matches: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(entry) = self.entries().into_iter().find(&matches) {
                return entry;
            }
            self.assert_alive();
            assert!(
                Instant::now() < deadline,
                "{} never logged {what}:\n{}",
                self.log.display(),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The base URL of the listener the role announced with `message`.
    pub async fn address(&mut self, message: &str) -> String {
        let entry = self.logged(message, |e| e["message"] == message).await;
        format!("http://{}", entry["address"].as_str().unwrap())
    }
}

/// Logs of in-process roles, shown when `TEST_LOG` is set (e.g. `TEST_LOG=debug`).
pub fn init_test_logs() {
    if let Ok(filter) = std::env::var("TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}
