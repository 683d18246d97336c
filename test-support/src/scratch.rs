//! A PostgreSQL cluster of a test's own (ops/dev/scratch-postgres.sh), for tests that stop
//! and restart the primary or restore a backup (ops/dev/backup.sh): never the shared server.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::services::{free_port, ops_script, run_script};

/// A scratch cluster on a free port, destroyed when dropped.
#[derive(Debug)]
pub struct ScratchPostgres {
    port: u16,
}

impl ScratchPostgres {
    /// A new, running cluster.
    pub async fn fresh() -> Self {
        let port = free_port();
        let cluster = ScratchPostgres { port };
        assert!(
            cluster.run("fresh").await,
            "cannot create a scratch cluster on port {port}"
        );
        cluster
    }

    /// A new cluster restored by `ops/dev/backup.sh restore` from the base backups and WAL
    /// archive in `repo` to `target` (a PostgreSQL timestamp, or `latest`), recovered and
    /// promoted; its data directory is where scratch-postgres.sh keeps this port's.
    pub async fn restored(repo: &Path, target: &str) -> Self {
        let port = free_port();
        let cluster = ScratchPostgres { port };
        let dir = format!("/tmp/cloudphone-scratch-postgres-{port}");
        let args = vec![
            "restore".to_owned(),
            repo.display().to_string(),
            dir,
            port.to_string(),
            target.to_owned(),
        ];
        assert!(
            run_script("backup.sh", args).await,
            "cannot restore {} to {target} on port {port}",
            repo.display()
        );
        cluster
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of `database` on this cluster.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Runs a scratch-postgres.sh action (`stop`, `start`, ...) on this cluster; true when
    /// it succeeded.
    pub async fn run(&self, action: &str) -> bool {
        run_script("scratch-postgres.sh", vec![action.to_owned(), self.port.to_string()]).await
    }
}

impl Drop for ScratchPostgres {
    fn drop(&mut self) {
        let _ = Command::new(ops_script("scratch-postgres.sh"))
            .args(["destroy", &self.port.to_string()])
            .stdin(Stdio::null())
            .status();
    }
}
