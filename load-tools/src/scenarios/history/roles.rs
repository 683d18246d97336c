//! The platform under test: each role a child process of this binary on a port of its own
//! (kept across restarts, so clients find a restarted API where it was), and a supervisor that
//! restarts a role that exits by itself, as an orchestrator would. Also the throwaway
//! PostgreSQL cluster of the run, through an ops/dev script (the broker is
//! [`crate::harness::broker`]'s).

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::harness::broker::{ops_dev, script};
use crate::harness::roles::free_port;

/// How a role is started.
#[derive(Debug, Clone)]
pub struct RoleSpec {
    /// Unique in the run: `command-api`, `projector-1`, ...
    pub name: String,
    /// The `cloudphone` verb.
    pub verb: &'static str,
    /// The port of its API, or of its health and metrics endpoints.
    pub port: u16,
    pub env: Vec<(String, String)>,
}

impl RoleSpec {
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// What happened to a role during the run.
#[derive(Debug, Default, Clone, Serialize)]
pub struct RoleHistory {
    pub starts: u32,
    pub kills: u32,
    /// Exits nobody asked for (exit status, then the end of its log), each followed by a
    /// restart.
    pub exits: Vec<String>,
}

struct Running {
    spec: RoleSpec,
    child: Option<Child>,
    /// Down on purpose (a kill fault, or the end of the run): not restarted by the monitor.
    held: bool,
    last_start: Instant,
    history: RoleHistory,
}

/// The roles of the run, restarted when they exit on their own.
#[derive(Clone)]
pub struct Supervisor {
    exe: PathBuf,
    logs: PathBuf,
    roles: Arc<Mutex<BTreeMap<String, Running>>>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Supervisor({})", self.logs.display())
    }
}

impl Supervisor {
    pub fn new(logs: &Path) -> anyhow::Result<Self> {
        Ok(Supervisor {
            exe: std::env::current_exe().context("this binary")?,
            logs: logs.to_owned(),
            roles: Arc::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Running>> {
        // A panic while holding the lock leaves plain data behind; carry on with it.
        self.roles.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn log_of(&self, name: &str) -> PathBuf {
        self.logs.join(format!("{name}.log"))
    }

    fn spawn(&self, spec: &RoleSpec) -> anyhow::Result<Child> {
        let log = self.log_of(&spec.name);
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("open {}", log.display()))?;
        writeln!(file, "--- cloudphone {} starting", spec.verb)?;
        let mut command = Command::new(&self.exe);
        command
            .arg(spec.verb)
            .env_remove("CLOUDPHONE_KAFKA_BROKERS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file);
        for (key, value) in &spec.env {
            command.env(key, value);
        }
        command.spawn().with_context(|| format!("start the {}", spec.name))
    }

    /// Starts a role for the first time.
    pub fn add(&self, spec: RoleSpec) -> anyhow::Result<()> {
        let child = self.spawn(&spec)?;
        let mut roles = self.lock();
        roles.insert(
            spec.name.clone(),
            Running {
                spec,
                child: Some(child),
                held: false,
                last_start: Instant::now(),
                history: RoleHistory {
                    starts: 1,
                    ..RoleHistory::default()
                },
            },
        );
        Ok(())
    }

    pub fn names(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    pub fn spec(&self, name: &str) -> Option<RoleSpec> {
        self.lock().get(name).map(|r| r.spec.clone())
    }

    /// `kill -9`: the role is held down until [`Supervisor::resume`].
    pub fn kill(&self, name: &str) -> anyhow::Result<()> {
        let mut roles = self.lock();
        let role = roles.get_mut(name).with_context(|| format!("no role {name}"))?;
        role.held = true;
        role.history.kills += 1;
        if let Some(mut child) = role.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        Ok(())
    }

    /// Starts a held role again.
    pub fn resume(&self, name: &str) -> anyhow::Result<()> {
        let mut roles = self.lock();
        let role = roles.get_mut(name).with_context(|| format!("no role {name}"))?;
        if role.child.is_none() {
            role.child = Some(self.spawn(&role.spec)?);
            role.history.starts += 1;
            role.last_start = Instant::now();
        }
        role.held = false;
        Ok(())
    }

    /// SIGTERM, and waits up to `limit` for a graceful exit (then SIGKILL). The role stays down.
    pub async fn terminate(&self, name: &str, limit: Duration) -> anyhow::Result<()> {
        let pid = {
            let mut roles = self.lock();
            let role = roles.get_mut(name).with_context(|| format!("no role {name}"))?;
            role.held = true;
            role.child.as_ref().map(Child::id)
        };
        let Some(pid) = pid else {
            return Ok(());
        };
        let _ = tokio::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
        let deadline = Instant::now() + limit;
        loop {
            {
                let mut roles = self.lock();
                if let Some(role) = roles.get_mut(name)
                    && let Some(child) = &mut role.child
                    && !matches!(child.try_wait(), Ok(None))
                {
                    role.child = None;
                    return Ok(());
                }
                if Instant::now() > deadline {
                    if let Some(role) = roles.get_mut(name)
                        && let Some(mut child) = role.child.take()
                    {
                        let _ = child.kill();
                        let _ = child.wait();
                    }
                    bail!("the {name} did not stop within {limit:?} of SIGTERM");
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Restarts roles that exited on their own, every 200 ms until `stop`.
    pub async fn monitor(self, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            let mut roles = self.lock();
            for role in roles.values_mut() {
                if role.held {
                    continue;
                }
                let exited = match &mut role.child {
                    Some(child) => match child.try_wait() {
                        Ok(Some(status)) => Some(status.to_string()),
                        Ok(None) => None,
                        Err(error) => Some(error.to_string()),
                    },
                    None => Some("not running".to_owned()),
                };
                let Some(status) = exited else {
                    continue;
                };
                if role.child.take().is_some() {
                    let tail = tail(&self.log_of(&role.spec.name), 6);
                    tracing::warn!(role = %role.spec.name, %status, "role exited by itself; restarting");
                    role.history.exits.push(format!("{status}: {tail}"));
                }
                // A role that cannot reach its database at start exits at once: back off.
                if role.last_start.elapsed() < Duration::from_millis(500) {
                    continue;
                }
                match self.spawn(&role.spec) {
                    Ok(child) => {
                        role.child = Some(child);
                        role.history.starts += 1;
                        role.last_start = Instant::now();
                    }
                    Err(error) => tracing::warn!(role = %role.spec.name, %error, "restart failed"),
                }
            }
        }
    }

    /// Waits until the role answers `/readyz` with 200.
    pub async fn ready(&self, name: &str, client: &reqwest::Client, limit: Duration) -> anyhow::Result<()> {
        let base = self.spec(name).with_context(|| format!("no role {name}"))?.base();
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(answer) = client.get(format!("{base}/readyz")).send().await
                && answer.status().is_success()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the {name} was not ready within {limit:?}; the end of its log:\n{}",
                    tail(&self.log_of(name), 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn histories(&self) -> BTreeMap<String, RoleHistory> {
        self.lock()
            .iter()
            .map(|(name, role)| (name.clone(), role.history.clone()))
            .collect()
    }

    /// Kills every role (the end of the run, or a failure).
    pub fn kill_all(&self) {
        let mut roles = self.lock();
        for role in roles.values_mut() {
            role.held = true;
            if let Some(mut child) = role.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// The last `lines` lines of a file, joined with " | ".
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let last: Vec<&str> = text.lines().rev().take(lines).collect();
    last.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// A PostgreSQL cluster of the run's own (ops/dev/scratch-postgres.sh), destroyed when dropped.
#[derive(Debug)]
pub struct ScratchPostgres {
    pub port: u16,
}

impl ScratchPostgres {
    pub async fn fresh() -> anyhow::Result<Self> {
        let port = free_port()?;
        let cluster = ScratchPostgres { port };
        script("scratch-postgres.sh", &["fresh", &port.to_string()], &[]).await?;
        Ok(cluster)
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// A fast shutdown: sessions are ended as a restarting primary ends them.
    pub async fn stop(&self) -> anyhow::Result<()> {
        script("scratch-postgres.sh", &["stop", &self.port.to_string()], &[]).await
    }

    pub async fn start(&self) -> anyhow::Result<()> {
        script("scratch-postgres.sh", &["start", &self.port.to_string()], &[]).await
    }
}

impl Drop for ScratchPostgres {
    fn drop(&mut self) {
        let _ = Command::new(ops_dev().join("scratch-postgres.sh"))
            .args(["destroy", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
