//! What the checker knows of each stream: its states at every cut of the log (folded with the
//! domain's own `evolve`, from snapshots), and the bounds real time puts on those cuts.

use domain::device::{self, DeviceState};
use domain::user::{self, UserState};
use event_schema::Event;

use crate::scenarios::history::record::{LoggedEvent, Operation, Outcome};

/// The positions one operation's events take on one stream.
#[derive(Debug, Clone, Copy)]
pub(super) struct Touch {
    pub(super) op: usize,
    pub(super) first: i64,
    pub(super) last: i64,
}

/// For one stream, what real time allows: the last position of operations acknowledged by a
/// given time, and the first position of operations sent after a given time.
#[derive(Debug, Default)]
pub(super) struct Bounds {
    /// (completed, running max of last positions) over acknowledged operations, by completion.
    acknowledged: Vec<(u64, i64)>,
    /// (invoked, min of first positions from here on) over all operations, by invocation.
    invoked: Vec<(u64, i64)>,
}

impl Bounds {
    pub(super) fn new(touches: &[Touch], history: &[Operation]) -> Self {
        let mut acknowledged: Vec<(u64, i64)> = touches
            .iter()
            .filter(|t| matches!(history[t.op].outcome, Outcome::Acknowledged { .. }))
            .map(|t| (history[t.op].completed_us, t.last))
            .collect();
        acknowledged.sort_unstable();
        let mut running = 0;
        for entry in &mut acknowledged {
            running = running.max(entry.1);
            entry.1 = running;
        }
        let mut invoked: Vec<(u64, i64)> = touches.iter().map(|t| (history[t.op].invoked_us, t.first)).collect();
        invoked.sort_unstable();
        let mut least = i64::MAX;
        for entry in invoked.iter_mut().rev() {
            least = least.min(entry.1);
            entry.1 = least;
        }
        Bounds { acknowledged, invoked }
    }

    /// The last position of operations acknowledged strictly before `at` (0: none).
    pub(super) fn acknowledged_before(&self, at: u64) -> i64 {
        let n = self.acknowledged.partition_point(|(completed, _)| *completed < at);
        if n == 0 { 0 } else { self.acknowledged[n - 1].1 }
    }

    /// The first position of operations invoked strictly after `at` (`i64::MAX`: none).
    pub(super) fn invoked_after(&self, at: u64) -> i64 {
        let n = self.invoked.partition_point(|(invoked, _)| *invoked <= at);
        self.invoked.get(n).map_or(i64::MAX, |(_, first)| *first)
    }
}

/// An aggregate the checker folds with the domain's own `evolve`.
pub(super) trait Fold: Default + Clone {
    fn apply(self, event: &Event) -> Self;
}

impl Fold for DeviceState {
    fn apply(self, event: &Event) -> Self {
        match event {
            Event::Device(event) => device::evolve(self, event),
            Event::User(_) => self,
        }
    }
}

impl Fold for UserState {
    fn apply(self, event: &Event) -> Self {
        match event {
            Event::User(event) => user::evolve(self, event),
            Event::Device(_) => self,
        }
    }
}

/// Every state of one stream, rebuilt on demand from snapshots taken every [`Self::EVERY`]
/// events.
pub(super) struct States<S> {
    /// Indices into the log, in version order.
    pub(super) events: Vec<usize>,
    /// The state after `i * EVERY` events.
    snapshots: Vec<S>,
}

/// A stream's state at a cut of the log.
pub(super) struct At<S> {
    pub(super) state: S,
    pub(super) version: i64,
    pub(super) last_position: i64,
}

impl<S: Fold> States<S> {
    const EVERY: usize = 32;

    pub(super) fn new(events: Vec<usize>, log: &[LoggedEvent]) -> Self {
        let mut snapshots = vec![S::default()];
        let mut state = S::default();
        for (n, index) in events.iter().enumerate() {
            if let Some(event) = &log[*index].event {
                state = state.apply(event);
            }
            if (n + 1) % Self::EVERY == 0 {
                snapshots.push(state.clone());
            }
        }
        States { events, snapshots }
    }

    /// The state after every event at or before position `cut`.
    pub(super) fn at(&self, cut: i64, log: &[LoggedEvent]) -> At<S> {
        let count = self.events.partition_point(|index| log[*index].position <= cut);
        let base = count / Self::EVERY;
        let mut state = self.snapshots[base].clone();
        for index in &self.events[base * Self::EVERY..count] {
            if let Some(event) = &log[*index].event {
                state = state.apply(event);
            }
        }
        let (version, last_position) = match count {
            0 => (0, 0),
            n => {
                let last = &log[self.events[n - 1]];
                (last.stream_version, last.position)
            }
        };
        At {
            state,
            version,
            last_position,
        }
    }
}
