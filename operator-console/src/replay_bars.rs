//! A replay's progress as the operator sees it: a bar (or structured progress lines) per
//! phase of `projections::replay`, for `cloudphone replay` and the replay benchmark alike.

use std::sync::Mutex;

use projections::replay::{ReplayObserver, ReplayPhase};

use crate::progress::Progress;

/// A progress bar (or structured progress lines) per phase.
#[derive(Debug, Default)]
pub struct BarObserver {
    bar: Mutex<Option<Progress>>,
}

impl BarObserver {
    /// Ends the current phase's bar.
    pub fn finish(&self) {
        if let Ok(mut bar) = self.bar.lock()
            && let Some(bar) = bar.take()
        {
            bar.finish();
        }
    }
}

impl ReplayObserver for BarObserver {
    fn phase(&self, phase: ReplayPhase) {
        self.finish();
        let Ok(mut bar) = self.bar.lock() else {
            return;
        };
        match phase {
            ReplayPhase::Bulk { resumed_at, target } => {
                let (done, total) = (
                    u64::try_from(resumed_at).unwrap_or(0),
                    u64::try_from(target).unwrap_or(0),
                );
                if done > 0 {
                    tracing::info!(
                        position = resumed_at,
                        target,
                        "resuming the rebuild from its checkpoint"
                    );
                }
                *bar = Some(Progress::resumed("replay", total, done));
            }
            ReplayPhase::WaitingForHistory { replayed, target } => {
                tracing::info!(replayed, target, "waiting for the history replica to replay the target");
                *bar = Some(Progress::resumed(
                    "replica",
                    u64::try_from(target).unwrap_or(0),
                    u64::try_from(replayed).unwrap_or(0),
                ));
            }
            ReplayPhase::Finishing => tracing::info!("bulk phase done: writing tables, keys and indexes"),
            ReplayPhase::Tailing => {
                tracing::info!("following the head until close enough to swap");
                *bar = Some(Progress::new("tail", 0));
            }
            ReplayPhase::Swapped { position } => tracing::info!(position, "swapped in"),
        }
    }

    fn progress(&self, position: i64, target: i64) {
        if let Ok(mut bar) = self.bar.lock()
            && let Some(bar) = bar.as_mut()
        {
            bar.set_total(u64::try_from(target).unwrap_or(0));
            bar.set(u64::try_from(position).unwrap_or(0));
        }
    }
}
