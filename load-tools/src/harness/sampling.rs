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

/// CPU of a PostgreSQL server over an interval: its postmaster and every process it forked
/// (backends, the WAL writer, the checkpointer, autovacuum, WAL senders), including those
/// started during the interval; a process that exits during it is not counted.
#[derive(Debug)]
pub struct PostgresCpu {
    postmaster: u32,
    start: std::collections::HashMap<u32, f64>,
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
        self.now()
            .into_iter()
            .map(|(pid, seconds)| seconds - self.start.get(&pid).copied().unwrap_or(0.0))
            .sum()
    }
}
