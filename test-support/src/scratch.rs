//! A PostgreSQL cluster of a test's own (ops/dev/scratch-postgres.sh), for tests that stop
//! and restart the primary: never the shared server.

use std::process::{Command, Stdio};

use crate::services::{ops_script, run_script};

/// A scratch cluster on a free port, destroyed when dropped.
#[derive(Debug)]
pub struct ScratchPostgres {
    port: u16,
}

impl ScratchPostgres {
    /// A new, running cluster.
    pub async fn fresh() -> Self {
        // A port nobody listens on now (the kernel's pick), released for the cluster.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cluster = ScratchPostgres { port };
        assert!(
            cluster.run("fresh").await,
            "cannot create a scratch cluster on port {port}"
        );
        cluster
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
