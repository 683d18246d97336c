//! How much of the primary a replay may take while live appends run beside it: the rate the
//! bulk phase reads and folds the log, the rate COPY writes the rebuild's rows (each write
//! becomes WAL that a live commit queues behind), and the parallel workers a key or index
//! build may start.

use std::time::{Duration, Instant};

/// Limits on a replay's use of the primary. `Throttle::default()` is unlimited (what tests and
/// the first build of an empty platform want); `cloudphone replay` sets production limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttle {
    /// Log events the bulk phase reads and folds per second; `None`: as fast as it goes.
    pub events_per_second: Option<u64>,
    /// Bytes per second COPY sends to the rebuild's tables; `None`: as fast as it goes.
    pub write_bytes_per_second: Option<u64>,
    /// Parallel workers one key or index build may start (`max_parallel_maintenance_workers`);
    /// `None`: the server's setting.
    pub index_workers: Option<u32>,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::UNLIMITED
    }
}

impl Throttle {
    /// No limit: the replay takes what the machine gives it.
    pub const UNLIMITED: Throttle = Throttle {
        events_per_second: None,
        write_bytes_per_second: None,
        index_workers: None,
    };
}

/// Spreads work over time at `per_second` units: after each piece, waits until the total so
/// far is due. A piece done late is not made up for by a burst (the clock restarts when
/// the work falls behind by more than a second).
#[derive(Debug)]
pub(super) struct Pacer {
    per_second: f64,
    started: Instant,
    done: f64,
}

impl Pacer {
    /// A pacer at `per_second`, or `None` for no limit (a rate of 0 counts as none).
    pub(super) fn new(per_second: Option<u64>) -> Option<Pacer> {
        per_second.filter(|&rate| rate > 0).map(|rate| Pacer {
            per_second: rate as f64,
            started: Instant::now(),
            done: 0.0,
        })
    }

    /// How long after the start `amount` more units are due, counting them done.
    fn account(&mut self, amount: u64, now: Instant) -> Duration {
        let behind = now.saturating_duration_since(self.started).as_secs_f64() - self.done / self.per_second;
        if behind > 1.0 {
            // Slower than the limit anyway (the work itself, or a pause): no catch-up burst.
            self.started = now;
            self.done = 0.0;
        }
        self.done += amount as f64;
        Duration::from_secs_f64(self.done / self.per_second)
    }

    /// Counts `amount` units done and waits until they are due.
    pub(super) async fn pace(&mut self, amount: u64) {
        let due = self.started + self.account(amount, Instant::now());
        tokio::time::sleep_until(due.into()).await;
    }
}

/// Paces an optional pacer (no limit: returns at once).
pub(super) async fn pace(pacer: &mut Option<Pacer>, amount: u64) {
    if let Some(pacer) = pacer {
        pacer.pace(amount).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zero_or_missing_rate_is_no_limit() {
        assert!(Pacer::new(None).is_none());
        assert!(Pacer::new(Some(0)).is_none());
        assert!(Pacer::new(Some(1)).is_some());
    }

    #[test]
    fn work_is_due_in_proportion_to_the_rate() {
        let Some(mut pacer) = Pacer::new(Some(1_000)) else {
            panic!("a rate of 1000 is a limit");
        };
        let start = pacer.started;
        assert_eq!(pacer.account(500, start), Duration::from_millis(500));
        assert_eq!(pacer.account(1_500, start), Duration::from_secs(2));
    }

    #[test]
    fn falling_behind_does_not_earn_a_burst() {
        let Some(mut pacer) = Pacer::new(Some(1_000)) else {
            panic!("a rate of 1000 is a limit");
        };
        let start = pacer.started;
        pacer.account(1_000, start);
        // Ten seconds later (the work was slow): the next 1000 are due a second from now,
        // not at once.
        let later = start + Duration::from_secs(10);
        let due = pacer.account(1_000, later);
        assert_eq!(pacer.started + due, later + Duration::from_secs(1));
    }
}
