//! The generic GraphQL-over-PostgreSQL baselines of `load queries`: PostGraphile v4 and v5 as
//! child processes (`ops/bench/postgraphile/run.sh`, `ops/bench/postgraphile-v5/run.sh`), each
//! started on a free port, polled until it answers with data, and stopped as its
//! documentation says.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use reqwest::header::CONTENT_TYPE;
use serde_json::Value;
use tokio::io::AsyncReadExt;

/// Longest PostGraphile may take to answer its first query (it may run `npm ci` first).
const POSTGRAPHILE_START: Duration = Duration::from_secs(180);

/// The PostGraphile baselines' directories: `given` (`--postgraphile-dir`, repeatable), or
/// this repository's two, v4 and v5.
pub fn postgraphile_dirs(given: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let dirs = if given.is_empty() {
        ["postgraphile", "postgraphile-v5"]
            .iter()
            .map(|name| {
                let in_repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/bench").join(name);
                if in_repo.is_dir() {
                    in_repo
                } else {
                    Path::new("ops/bench").join(name)
                }
            })
            .collect()
    } else {
        given.to_vec()
    };
    for dir in &dirs {
        for file in ["run.sh", "queries.json", "package.json"] {
            if !dir.join(file).is_file() {
                bail!(
                    "the PostGraphile baseline is missing {} (pass --postgraphile-dir, or --no-postgraphile to skip it)",
                    dir.join(file).display()
                );
            }
        }
    }
    Ok(dirs)
}

/// "PostGraphile v4" or "v5": the major version its `package.json` pins.
pub fn postgraphile_label(dir: &Path) -> anyhow::Result<&'static str> {
    let manifest = std::fs::read_to_string(dir.join("package.json"))
        .with_context(|| format!("read {}", dir.join("package.json").display()))?;
    let manifest: Value = serde_json::from_str(&manifest).context("package.json is not JSON")?;
    let version = manifest["dependencies"]["postgraphile"].as_str().unwrap_or_default();
    Ok(match version.trim_start_matches(['^', '~', '=']).split('.').next() {
        Some("4") => "PostGraphile v4",
        Some("5") => "PostGraphile v5",
        _ => "PostGraphile",
    })
}

/// The PostGraphile baseline, a child process (killed when dropped).
#[derive(Debug)]
pub struct PostGraphile {
    child: tokio::process::Child,
    /// Where it answers GraphQL.
    pub url: String,
    pub port: u16,
    /// The tail of its stderr, for the error message if it dies.
    stderr_tail: Arc<Mutex<String>>,
}

impl PostGraphile {
    /// Checks that Node (and npm, if `dir` has no `node_modules`) run, and returns the
    /// queries of `dir/queries.json`.
    pub async fn prepare(dir: &Path) -> anyhow::Result<Value> {
        let node = tokio::process::Command::new("node").arg("--version").output().await;
        match node {
            Ok(output) if output.status.success() => {}
            _ => bail!(
                "`node` is not installed or does not run: the PostGraphile baselines need Node 18+ (and npm if {} has no node_modules; v5 installs its own Node 22); \
                 install it or pass --no-postgraphile",
                dir.display()
            ),
        }
        if !dir.join("node_modules").is_dir() {
            let npm = tokio::process::Command::new("npm").arg("--version").output().await;
            if !matches!(npm, Ok(output) if output.status.success()) {
                bail!(
                    "{} has no node_modules and `npm` is not installed to fetch them; install npm or pass --no-postgraphile",
                    dir.display()
                );
            }
        }
        let queries = std::fs::read_to_string(dir.join("queries.json"))
            .with_context(|| format!("read {}", dir.join("queries.json").display()))?;
        let queries: Value = serde_json::from_str(&queries).context("queries.json is not JSON")?;
        Ok(queries)
    }

    /// Runs `dir/run.sh` on a free port over the database `database_url`, with a pool of
    /// `pool_size` (and `workers` cluster workers when given).
    pub fn spawn(dir: &Path, database_url: &str, pool_size: u32, workers: Option<u32>) -> anyhow::Result<Self> {
        let port = {
            let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
            listener.local_addr()?.port()
        };
        let mut command = tokio::process::Command::new(dir.join("run.sh"));
        command
            .arg(database_url)
            .arg(port.to_string())
            .env("PGL_MAX_POOL_SIZE", pool_size.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(workers) = workers {
            command.env("PGL_CLUSTER_WORKERS", workers.to_string());
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot run {}", dir.join("run.sh").display()))?;
        // Keep the tail of its stderr for the error message if it dies.
        let stderr_tail = Arc::new(Mutex::new(String::new()));
        if let Some(mut stderr) = child.stderr.take() {
            let tail = Arc::clone(&stderr_tail);
            tokio::spawn(async move {
                let mut buffer = [0u8; 4096];
                while let Ok(read) = stderr.read(&mut buffer).await {
                    if read == 0 {
                        break;
                    }
                    if let Ok(mut tail) = tail.lock() {
                        tail.push_str(&String::from_utf8_lossy(&buffer[..read]));
                        if tail.len() > 8192 {
                            let cut = tail.len() - 8192;
                            let cut = (cut..tail.len()).find(|i| tail.is_char_boundary(*i)).unwrap_or(0);
                            tail.drain(..cut);
                        }
                    }
                }
            });
        }
        Ok(PostGraphile {
            child,
            url: format!("http://127.0.0.1:{port}/graphql"),
            port,
            stderr_tail,
        })
    }

    /// Polls with `body` (a query that has data) until an answer with data comes.
    pub async fn wait_ready(&mut self, client: &reqwest::Client, body: Vec<u8>) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut last = String::from("no answer yet");
        let mut child_exited = None;
        while started.elapsed() < POSTGRAPHILE_START {
            let answer = client
                .post(&self.url)
                .header(CONTENT_TYPE, "application/json")
                .body(body.clone())
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            match answer {
                Ok(response) => {
                    let status = response.status();
                    let text = response.text().await.unwrap_or_default();
                    if status.is_success() && !text.contains("\"errors\"") && text.contains("\"data\"") {
                        return Ok(());
                    }
                    last = format!("HTTP {status}: {}", text.chars().take(500).collect::<String>());
                }
                Err(error) => last = error.to_string(),
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                child_exited = Some(status);
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Let the stderr reader take in what the child wrote last.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let tail = self.stderr_tail.lock().map(|t| t.clone()).unwrap_or_default();
        match child_exited {
            Some(status) => {
                bail!("PostGraphile exited ({status}) before answering (last: {last}); its stderr:\n{tail}")
            }
            None => bail!(
                "PostGraphile did not answer a query within {POSTGRAPHILE_START:?} (last: {last}); its stderr:\n{tail}"
            ),
        }
    }

    /// SIGTERM (its documented stop), then SIGKILL if it lingers.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = tokio::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
                .await;
            if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
                .await
                .is_ok()
            {
                return;
            }
        }
        let _ = self.child.kill().await;
    }
}
