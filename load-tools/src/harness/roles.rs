//! Roles of the platform as child processes of this binary (`std::env::current_exe()`), each
//! on ports of its own and killed when dropped: one role (`command-api`, `query-api`,
//! `projector`), or every role in one `cloudphone serve`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::harness::tokens::SECRET;

/// Longest a role may take to answer /readyz.
const START_LIMIT: Duration = Duration::from_secs(120);

/// One role of the platform, a child process of this binary, killed with the load.
#[derive(Debug)]
pub struct RoleProcess {
    pub name: String,
    child: Mutex<Child>,
    pid: u32,
    /// Where its /readyz and /metrics are (for the APIs, also where they answer).
    pub base: String,
    log: PathBuf,
}

impl RoleProcess {
    /// Starts `cloudphone <name>` on a free port against `database_url`, logging to
    /// `<logs>/<name>.log`.
    pub fn start(name: &'static str, database_url: &str, logs: &Path) -> anyhow::Result<Self> {
        Self::start_with(name, database_url, logs, &[])
    }

    /// [`RoleProcess::start`] with more environment (`CLOUDPHONE_APPEND_MODE`, say).
    pub fn start_with(
        name: &'static str,
        database_url: &str,
        logs: &Path,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        Self::start_as(name, name, database_url, logs, env)
    }

    /// Starts `cloudphone <verb>` under a name of its own (`projector-2`, say: its log is
    /// `<logs>/<name>.log`), with more environment.
    pub fn start_as(
        verb: &'static str,
        name: &str,
        database_url: &str,
        logs: &Path,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let listen = format!("127.0.0.1:{}", free_port()?);
        let listen_variable = match verb {
            "projector" | "relay" => "CLOUDPHONE_OPS_LISTEN",
            "command-api" => "CLOUDPHONE_COMMAND_LISTEN",
            _ => "CLOUDPHONE_QUERY_LISTEN",
        };
        let mut command = Self::command(&[verb])?;
        command
            .env("CLOUDPHONE_DATABASE_URL", database_url)
            .env("CLOUDPHONE_OPS_LISTEN", "127.0.0.1:0")
            .env("CLOUDPHONE_COMMAND_LISTEN", "127.0.0.1:0")
            .env("CLOUDPHONE_QUERY_LISTEN", "127.0.0.1:0")
            .envs(env.iter().copied())
            .env(listen_variable, &listen);
        Self::spawn(name, command, listen, logs)
    }

    /// Starts `cloudphone <args...> --listen <a free port>` (a load verb that serves, such
    /// as `load fixed-answer-server`), logging to `<logs>/<name>.log`.
    pub fn start_verb(name: &str, args: &[&str], logs: &Path) -> anyhow::Result<Self> {
        let listen = format!("127.0.0.1:{}", free_port()?);
        let mut command = Self::command(args)?;
        command.arg("--listen").arg(&listen);
        Self::spawn(name, command, listen, logs)
    }

    /// This binary with `args` and the environment every role of a load run shares.
    fn command(args: &[&str]) -> anyhow::Result<Command> {
        let exe = std::env::current_exe().context("this binary")?;
        let mut command = Command::new(exe);
        command
            .args(args)
            .env("CLOUDPHONE_JWT_SECRET", SECRET)
            // The roles log warnings only, unless told otherwise (to diagnose a run).
            .env(
                "CLOUDPHONE_LOG",
                std::env::var("CLOUDPHONE_LOAD_ROLE_LOG").unwrap_or_else(|_| "warn".to_owned()),
            )
            .env("CLOUDPHONE_LOG_FORMAT", "text")
            .env("CLOUDPHONE_RATE_LIMIT", "1000000")
            .env_remove("CLOUDPHONE_KAFKA_BROKERS")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        Ok(command)
    }

    fn spawn(name: &str, mut command: Command, listen: String, logs: &Path) -> anyhow::Result<Self> {
        let log = logs.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let child = command
            .stderr(file)
            .spawn()
            .with_context(|| format!("start the {name}"))?;
        Ok(RoleProcess {
            name: name.to_owned(),
            pid: child.id(),
            child: Mutex::new(child),
            base: format!("http://{listen}"),
            log,
        })
    }

    /// Its process id, for sampling its CPU and memory.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Fails with the end of its log when the process has exited.
    pub fn alive(&self) -> anyhow::Result<()> {
        let exited = self
            .child
            .lock()
            .map_err(|_| anyhow::anyhow!("the {} process handle", self.name))?
            .try_wait()?;
        if let Some(status) = exited {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            bail!(
                "the {} exited ({status}); the end of {}:\n{}",
                self.name,
                self.log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(())
    }

    /// Sends it SIGTERM (a graceful stop, as an orchestrator does) and waits for it to exit,
    /// at most `limit`; fails when it does not exit, or exits unsuccessfully.
    pub async fn terminate(&self, limit: Duration) -> anyhow::Result<()> {
        let sent = tokio::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .await
            .context("run kill -TERM")?;
        if !sent.success() {
            bail!("kill -TERM {} ({}) failed", self.pid, self.name);
        }
        let deadline = Instant::now() + limit;
        loop {
            let exited = self
                .child
                .lock()
                .map_err(|_| anyhow::anyhow!("the {} process handle", self.name))?
                .try_wait()?;
            match exited {
                Some(status) if status.success() => return Ok(()),
                Some(status) => bail!(
                    "the {} exited with {status} on SIGTERM (log: {})",
                    self.name,
                    self.log.display()
                ),
                None if Instant::now() > deadline => {
                    bail!("the {} did not exit within {limit:?} of SIGTERM", self.name)
                }
                None => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    /// Waits until it answers `/readyz` with a success (fails when it exits first).
    pub async fn ready(&self, client: &reqwest::Client) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_LIMIT;
        loop {
            self.alive()?;
            if let Ok(answer) = client.get(format!("{}/readyz", self.base)).send().await
                && answer.status().is_success()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the {} was not ready in {START_LIMIT:?} (log: {})",
                    self.name,
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for RoleProcess {
    fn drop(&mut self) {
        if let Ok(child) = self.child.get_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A free loopback port (the kernel's pick, released for a child to bind).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("find a free port")?;
    Ok(listener.local_addr()?.port())
}

/// `cloudphone serve` as a child process, killed when dropped.
#[derive(Debug)]
pub struct ServeProcess {
    child: Mutex<Child>,
    pub pid: u32,
    /// Where the command API and the query API answer.
    pub command: String,
    pub query: String,
    pub log: PathBuf,
}

impl ServeProcess {
    /// Starts `cloudphone serve` with both APIs on free ports, logging to `<logs>/serve.log`.
    pub fn start(database_url: &str, logs: &Path) -> anyhow::Result<Self> {
        let free = || -> anyhow::Result<u16> { Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()) };
        let (command, query) = (format!("127.0.0.1:{}", free()?), format!("127.0.0.1:{}", free()?));
        let log = logs.join("serve.log");
        let file = std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let child = RoleProcess::command(&["serve"])?
            .env("CLOUDPHONE_DATABASE_URL", database_url)
            .env("CLOUDPHONE_COMMAND_LISTEN", &command)
            .env("CLOUDPHONE_QUERY_LISTEN", &query)
            .stderr(file)
            .spawn()
            .context("start cloudphone serve")?;
        Ok(ServeProcess {
            pid: child.id(),
            child: Mutex::new(child),
            command: format!("http://{command}"),
            query: format!("http://{query}"),
            log,
        })
    }

    /// Fails when the process has exited.
    pub fn alive(&self) -> anyhow::Result<()> {
        let exited = self
            .child
            .lock()
            .map_err(|_| anyhow::anyhow!("the serve process handle"))?
            .try_wait()?;
        if let Some(status) = exited {
            bail!("cloudphone serve exited ({status}); see {}", self.log.display());
        }
        Ok(())
    }

    /// Waits until both APIs answer `/readyz` with a success (at most 120 s).
    pub async fn ready(&self, client: &reqwest::Client) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        for base in [&self.command, &self.query] {
            loop {
                self.alive()?;
                if client
                    .get(format!("{base}/readyz"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
                {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("serve was not ready in 120 s; see {}", self.log.display());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        if let Ok(child) = self.child.get_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
