//! CPU and memory of a process (a role, a child verb, the load generator itself), read from
//! Linux's /proc.

/// Linux reports CPU time in /proc in USER_HZ ticks, 100 per second on every architecture
/// Linux supports today.
const TICKS_PER_SECOND: f64 = 100.0;

/// User + system CPU seconds of a process so far, from /proc.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is the first, utime the
    // 12th, stime the 13th.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / TICKS_PER_SECOND)
}

/// Resident memory of a process now, in MiB (VmRSS).
pub fn vm_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Peak resident memory of a process so far, in MiB (VmHWM).
pub fn vm_hwm_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The parent process id of `pid`, from /proc.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name: state, then the parent's id.
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

/// User + system CPU seconds of the children `pid` has waited for (reaped) so far, from /proc.
fn reaped_children_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // cutime and cstime follow utime and stime (see `cpu_seconds`).
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(13)?.parse::<f64>().ok()? + fields.get(14)?.parse::<f64>().ok()?;
    Some(ticks / TICKS_PER_SECOND)
}

/// CPU of a PostgreSQL server over an interval: its postmaster and every process it forked
/// (backends, the WAL writer, the checkpointer, autovacuum, WAL senders), including those
/// started during the interval, and those that exited during it (the postmaster reaps them,
/// and the kernel adds their CPU to its children's).
#[derive(Debug)]
pub struct PostgresCpu {
    postmaster: u32,
    start: std::collections::HashMap<u32, f64>,
    reaped_at_start: f64,
}

impl PostgresCpu {
    /// Starts counting for the server `pool` talks to (on this machine; `None` when its
    /// processes are not visible here).
    pub async fn start(pool: &sqlx::PgPool) -> Option<Self> {
        let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(pool)
            .await
            .ok()?;
        let postmaster = parent_of(u32::try_from(backend).ok()?)?;
        let mut meter = PostgresCpu {
            postmaster,
            start: std::collections::HashMap::new(),
            reaped_at_start: reaped_children_cpu_seconds(postmaster).unwrap_or(0.0),
        };
        meter.start = meter.now();
        Some(meter)
    }

    /// CPU seconds of each of the server's processes now.
    fn now(&self) -> std::collections::HashMap<u32, f64> {
        let mut processes = std::collections::HashMap::new();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return processes;
        };
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else {
                continue;
            };
            if (pid == self.postmaster || parent_of(pid) == Some(self.postmaster))
                && let Some(seconds) = cpu_seconds(pid)
            {
                processes.insert(pid, seconds);
            }
        }
        processes
    }

    /// CPU seconds the server has used since [`PostgresCpu::start`].
    pub fn seconds(&self) -> f64 {
        let now = self.now();
        self.living_seconds(&now) + self.exited_seconds(&now)
    }

    /// CPU in the interval of the processes running now.
    fn living_seconds(&self, now: &std::collections::HashMap<u32, f64>) -> f64 {
        now.iter()
            .map(|(pid, seconds)| seconds - self.start.get(pid).copied().unwrap_or(0.0))
            .sum()
    }

    /// CPU in the interval of the processes that exited during it: what the postmaster's
    /// reaped children used since the start, less what those alive at the start had used by
    /// then.
    fn exited_seconds(&self, now: &std::collections::HashMap<u32, f64>) -> f64 {
        let reaped =
            reaped_children_cpu_seconds(self.postmaster).unwrap_or(self.reaped_at_start) - self.reaped_at_start;
        let before_start: f64 = self
            .start
            .iter()
            .filter(|(pid, _)| !now.contains_key(pid))
            .map(|(_, seconds)| seconds)
            .sum();
        reaped - before_start
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use sqlx::{ConnectOptions, Connection};

    use super::*;

    /// A backend that runs and exits within the interval is counted, as the replay's
    /// connections in `load platform` do.
    #[sqlx::test(migrations = false)]
    async fn a_backend_that_exits_within_the_interval_is_counted(pool: sqlx::PgPool) {
        let meter = PostgresCpu::start(&pool)
            .await
            .unwrap_or_else(|| panic!("PostgreSQL's processes are not visible from here"));
        let mut conn = pool.connect_options().connect().await.unwrap();
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        let pid = u32::try_from(pid).unwrap();
        sqlx::query("SELECT count(*) FROM generate_series(1, 3000000)")
            .execute(&mut conn)
            .await
            .unwrap();
        let burned = cpu_seconds(pid).unwrap();
        assert!(burned >= 0.05, "the backend used only {burned} s");
        conn.close().await.unwrap();
        // The postmaster reaps it: its /proc entry goes.
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::path::Path::new(&format!("/proc/{pid}")).exists() {
            assert!(Instant::now() < deadline, "backend {pid} never exited");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let exited = meter.exited_seconds(&meter.now());
        // Within a tick of /proc's accounting.
        assert!(
            exited >= burned - 0.011,
            "the exited backend used {burned} s; counted for exited processes: {exited} s"
        );
        assert!(meter.seconds() >= exited);
    }
}
