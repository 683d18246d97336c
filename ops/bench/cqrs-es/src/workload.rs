//! The workload both stores receive: device lifecycles (create, then start / stop cycles),
//! planned once from the seed, so every phase appends exactly the same events in the same
//! order per writer.
//!
//! Devices are dealt to writers round-robin (device `i` belongs to writer `i % writers`), so
//! two writers never touch one aggregate: every command still appends with an optimistic
//! concurrency check (expected version / next sequence), but no run depends on how conflicts
//! happen to be retried, and both stores do the same work.

use chrono::{DateTime, Duration, Utc};
use event_schema::{DeviceCreated, DeviceStarted, DeviceStopped, Event, EventPayload, Provider, StopReason};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One device of the fleet.
#[derive(Debug, Clone)]
pub struct Device {
    pub id: Uuid,
    /// `id` as cqrs-es wants it (aggregate ids are strings there).
    pub id_text: String,
    pub owner: Uuid,
    pub provider: Provider,
    pub cpu_cores: u32,
    pub memory_mb: u32,
}

/// One command: the `step`-th command of device `device` (0: create; odd: start; even: stop).
#[derive(Debug, Clone, Copy)]
pub struct Step {
    pub device: u32,
    pub step: u32,
}

/// Everything a run appends, per writer, in order.
#[derive(Debug)]
pub struct Plan {
    pub devices: Vec<Device>,
    pub writers: Vec<Vec<Step>>,
    pub events: u64,
    /// Event times are `base + step minutes`: the same in every phase of a run.
    pub base: DateTime<Utc>,
}

impl Plan {
    /// `events` commands over `devices` devices (each gets `events / devices`, the first ones
    /// one more), dealt to `writers` writers. Each writer goes through its devices in rounds,
    /// shuffled by the seed, so the histories of many devices grow side by side.
    pub fn new(events: u64, devices: u32, writers: usize, seed: u64) -> Plan {
        let mut rng = StdRng::seed_from_u64(seed);
        let owners: Vec<Uuid> = (0..devices.div_ceil(8).max(1))
            .map(|_| Uuid::from_bytes(rng.random()))
            .collect();
        let fleet: Vec<Device> = (0..devices)
            .map(|_| {
                let id = Uuid::from_bytes(rng.random());
                Device {
                    id,
                    id_text: id.to_string(),
                    owner: owners[rng.random_range(0..owners.len())],
                    provider: [Provider::Aws, Provider::Gcp, Provider::Azure][rng.random_range(0..3)],
                    cpu_cores: rng.random_range(1..9),
                    memory_mb: [2048, 4096, 8192][rng.random_range(0..3)],
                }
            })
            .collect();
        let per_device = |i: u32| events / u64::from(devices) + u64::from(u64::from(i) < events % u64::from(devices));
        let mut plans = Vec::with_capacity(writers);
        for writer in 0..writers {
            let mine: Vec<u32> = (0..devices).filter(|i| *i as usize % writers == writer).collect();
            let mut remaining: Vec<(u32, u32, u32)> = mine.iter().map(|&d| (d, 0, per_device(d) as u32)).collect();
            let mut steps = Vec::new();
            while !remaining.is_empty() {
                remaining.shuffle(&mut rng);
                for (device, next, _) in &mut remaining {
                    steps.push(Step {
                        device: *device,
                        step: *next,
                    });
                    *next += 1;
                }
                remaining.retain(|(_, next, total)| next < total);
            }
            plans.push(steps);
        }
        Plan {
            devices: fleet,
            writers: plans,
            events,
            base: Utc::now(),
        }
    }

    /// The command of a step, carrying the event it asks for.
    pub fn command(&self, step: Step) -> Command {
        let device = &self.devices[step.device as usize];
        let at = self.base + Duration::minutes(i64::from(step.step));
        match step.step {
            0 => Command::Create(DeviceCreated {
                device_id: device.id,
                owner_id: device.owner,
                provider: device.provider,
                cpu_cores: device.cpu_cores,
                memory_mb: device.memory_mb,
                android_version: 14,
                created_at: at,
            }),
            n if n % 2 == 1 => Command::Start(DeviceStarted {
                device_id: device.id,
                started_at: at,
            }),
            _ => Command::Stop(DeviceStopped {
                device_id: device.id,
                reason: StopReason::Requested,
                stopped_at: at,
            }),
        }
    }
}

/// A portal command. Each carries the event it would record, built from the plan.
#[derive(Debug, Clone)]
pub enum Command {
    Create(DeviceCreated),
    Start(DeviceStarted),
    Stop(DeviceStopped),
}

/// The events of this workload: our `event-schema` types, wrapped so cqrs-es can store them
/// (its `DomainEvent` trait cannot be implemented on another crate's type). The payload
/// inside is the same JSON our log stores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Lifecycle {
    DeviceCreated(DeviceCreated),
    DeviceStarted(DeviceStarted),
    DeviceStopped(DeviceStopped),
}

impl Lifecycle {
    pub fn event_type(&self) -> &'static str {
        match self {
            Lifecycle::DeviceCreated(_) => DeviceCreated::EVENT_TYPE,
            Lifecycle::DeviceStarted(_) => DeviceStarted::EVENT_TYPE,
            Lifecycle::DeviceStopped(_) => DeviceStopped::EVENT_TYPE,
        }
    }

    pub fn schema_version(&self) -> u16 {
        match self {
            Lifecycle::DeviceCreated(_) => DeviceCreated::SCHEMA_VERSION,
            Lifecycle::DeviceStarted(_) => DeviceStarted::SCHEMA_VERSION,
            Lifecycle::DeviceStopped(_) => DeviceStopped::SCHEMA_VERSION,
        }
    }

    /// When the fact happened.
    pub fn occurred_at(&self) -> DateTime<Utc> {
        match self {
            Lifecycle::DeviceCreated(e) => e.created_at,
            Lifecycle::DeviceStarted(e) => e.started_at,
            Lifecycle::DeviceStopped(e) => e.stopped_at,
        }
    }
}

impl From<Lifecycle> for Event {
    fn from(event: Lifecycle) -> Event {
        match event {
            Lifecycle::DeviceCreated(e) => e.into(),
            Lifecycle::DeviceStarted(e) => e.into(),
            Lifecycle::DeviceStopped(e) => e.into(),
        }
    }
}

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("device already exists")]
    Exists,
    #[error("device does not exist")]
    Missing,
    #[error("device is already running")]
    Running,
    #[error("device is not running")]
    NotRunning,
}

/// What a decision needs to know of a device: the same small state on both sides.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    pub created: bool,
    pub running: bool,
}

impl DeviceState {
    /// Command + state -> the one event to record, or why not.
    pub fn decide(self, command: Command) -> Result<Lifecycle, Refused> {
        match command {
            Command::Create(e) if !self.created => Ok(Lifecycle::DeviceCreated(e)),
            Command::Create(_) => Err(Refused::Exists),
            _ if !self.created => Err(Refused::Missing),
            Command::Start(e) if !self.running => Ok(Lifecycle::DeviceStarted(e)),
            Command::Start(_) => Err(Refused::Running),
            Command::Stop(e) if self.running => Ok(Lifecycle::DeviceStopped(e)),
            Command::Stop(_) => Err(Refused::NotRunning),
        }
    }

    pub fn evolve(self, event: &Lifecycle) -> DeviceState {
        match event {
            Lifecycle::DeviceCreated(_) => DeviceState {
                created: true,
                running: false,
            },
            Lifecycle::DeviceStarted(_) => DeviceState { running: true, ..self },
            Lifecycle::DeviceStopped(_) => DeviceState { running: false, ..self },
        }
    }

    /// `evolve` for an event read back from our log (other device events leave it as is).
    pub fn evolve_logged(self, event: &Event) -> DeviceState {
        use event_schema::DeviceEvent as D;
        match event {
            Event::Device(D::DeviceCreated(e)) => self.evolve(&Lifecycle::DeviceCreated(e.clone())),
            Event::Device(D::DeviceStarted(e)) => self.evolve(&Lifecycle::DeviceStarted(e.clone())),
            Event::Device(D::DeviceStopped(e)) => self.evolve(&Lifecycle::DeviceStopped(e.clone())),
            _ => self,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_planned_command_is_accepted_in_order() {
        let plan = Plan::new(1_003, 10, 3, 7);
        assert_eq!(plan.writers.iter().map(Vec::len).sum::<usize>(), 1_003);
        let mut states = vec![DeviceState::default(); plan.devices.len()];
        for steps in &plan.writers {
            for step in steps {
                let state = &mut states[step.device as usize];
                let event = state.decide(plan.command(*step)).unwrap_or_else(|e| panic!("{e}"));
                *state = state.evolve(&event);
            }
        }
    }

    #[test]
    fn the_same_seed_plans_the_same_events() {
        let (a, b) = (Plan::new(500, 20, 4, 1), Plan::new(500, 20, 4, 1));
        let ids = |p: &Plan| p.devices.iter().map(|d| d.id).collect::<Vec<_>>();
        assert_eq!(ids(&a), ids(&b));
        let order = |p: &Plan| {
            p.writers
                .iter()
                .flatten()
                .map(|s| (s.device, s.step))
                .collect::<Vec<_>>()
        };
        assert_eq!(order(&a), order(&b));
    }
}
