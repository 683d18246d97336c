//! `load kafka --faults`: the Kafka path's faults while commands keep flowing at the run's
//! rate (issue #25, item 4). One phase of `--fault-interval` seconds per window: a quiet
//! window first, then one fault at the start of each next window:
//! 1. a worker added (a dynamic member, as an autoscaler adds one: the group rebalances);
//! 2. that worker stopped with SIGTERM (it leaves the group: a rebalance back). A static
//!    member does not leave on SIGTERM (KIP-345): its partitions wait for its return, or on
//!    Apache Kafka for `session.timeout.ms`;
//! 3. a worker killed with `kill -9` and started again under its identity, as a supervisor
//!    restarts a pod (a static member: it takes its partitions back without a rebalance);
//! 4. a worker killed with `kill -9` for good, as a node dies: the group waits for its session
//!    to expire (`--session-timeout-ms`) and hands its partitions to the survivors;
//! 5. the broker killed with `kill -9` and started again, on the durable engine only (the
//!    memory engine forgets what it acknowledged, so a restart there loses events by design).
//!
//! For each window: the commands that showed in the read models during it (a command held up
//! by a fault counts in that fault's window, even if acknowledged before it), their
//! commit-to-read-model latency, and the spike: from the fault to the end of the last second
//! whose commands' p99 was over twice the quiet window's p99. The caller compares the read
//! models with a rebuild afterwards.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use hdrhistogram::Histogram;
use serde::Serialize;
use sqlx::PgPool;

use super::{Commands, User, drive};
use crate::cli::LoadKafkaArgs;
use kafka_adapters::metrics_names::KAFKA_ASSIGNED_PARTITIONS;
use read_models::Projection;

use crate::harness::broker::{Broker, BrokerEngine};
use crate::harness::metrics::{metric_sum, scrape};
use crate::harness::report::{Latency, histogram};
use crate::harness::roles::RoleProcess;
use crate::harness::visibility::{CheckpointWatch, Pending, outstanding, settle_each};

/// Longest a worker may take to join its groups and hold partitions.
const JOIN_LIMIT: Duration = Duration::from_secs(90);
/// Longest a worker may take to stop after SIGTERM.
const STOP_LIMIT: Duration = Duration::from_secs(60);
/// Longest the acknowledged commands may take to show once the phase's commands end.
const SETTLE_LIMIT: Duration = Duration::from_secs(180);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Fault {
    /// The window before any fault.
    None,
    AddWorker,
    StopWorker,
    KillWorker,
    LoseWorker,
    RestartBroker,
}

impl Fault {
    fn describe(self) -> &'static str {
        match self {
            Fault::None => "quiet",
            Fault::AddWorker => "worker added",
            Fault::StopWorker => "worker SIGTERM",
            Fault::KillWorker => "worker kill -9 + restart",
            Fault::LoseWorker => "worker kill -9 for good",
            Fault::RestartBroker => "broker kill -9 + restart",
        }
    }
}

#[derive(Debug, Serialize)]
pub(super) struct Window {
    fault: Fault,
    /// Seconds into the phase the window (and its fault) began.
    at_seconds: f64,
    /// How long the fault's action took: the new worker holding partitions, the stopped one
    /// gone, the killed one holding its partitions again, the survivors holding the lost
    /// one's, the broker answering again.
    action_ms: f64,
    latency: Latency,
    max_ms: f64,
    /// From the fault to the end of the last second (of the commands that showed then) whose
    /// p99 was over the spike threshold (0: none was).
    spike_ms: f64,
}

#[derive(Debug, Serialize)]
pub(super) struct FaultsReport {
    interval_seconds: u64,
    /// Twice the quiet window's p99: a second whose commands' p99 is over it counts in a
    /// fault's spike.
    spike_threshold_ms: f64,
    commands: Commands,
    windows: Vec<Window>,
    /// Faults not run, and why.
    skipped: Vec<String>,
}

impl FaultsReport {
    pub(super) fn print(&self) {
        println!(
            "  faults, {} s apart: {} commands acknowledged, {} shed, {} errors; spike threshold {:.0} ms (2x the quiet p99)",
            self.interval_seconds,
            self.commands.acknowledged,
            self.commands.shed,
            self.commands.errors.values().sum::<u64>(),
            self.spike_threshold_ms
        );
        for window in &self.windows {
            println!(
                "  {:<26} at {:>5.1} s  action {:>7.0} ms   commit to read model p50 {:>7.1} ms  p99 {:>7.1} ms  max {:>7.1} ms   spike {:>7.0} ms",
                window.fault.describe(),
                window.at_seconds,
                window.action_ms,
                window.latency.p50_ms,
                window.latency.p99_ms,
                window.max_ms,
                window.spike_ms
            );
        }
        for skipped in &self.skipped {
            println!("  skipped: {skipped}");
        }
    }
}

/// What the faults act on: the run's database, broker, worker processes and their settings.
pub(super) struct Target<'a> {
    pub(super) pool: &'a PgPool,
    pub(super) client: &'a reqwest::Client,
    pub(super) base: &'a str,
    pub(super) users: &'a Arc<Vec<User>>,
    pub(super) url: &'a str,
    pub(super) logs: &'a std::path::Path,
    pub(super) kafka_env: &'a [(&'a str, &'a str)],
    pub(super) broker: &'a Broker,
    /// Partitions of the topic.
    pub(super) partitions: i32,
}

pub(super) async fn measure_faults(
    args: &LoadKafkaArgs,
    target: &Target<'_>,
    workers: &mut Vec<RoleProcess>,
) -> anyhow::Result<FaultsReport> {
    if workers.is_empty() {
        bail!("the faults need at least one worker");
    }
    let mut faults = vec![Fault::None, Fault::AddWorker, Fault::StopWorker, Fault::KillWorker];
    let mut skipped = Vec::new();
    if workers.len() >= 2 {
        faults.push(Fault::LoseWorker);
    } else {
        skipped.push("worker kill -9 for good: it needs a survivor (run with --workers 2 or more)".to_owned());
    }
    if args.broker_engine == BrokerEngine::Sqlite {
        faults.push(Fault::RestartBroker);
    } else {
        skipped.push(format!(
            "broker kill -9 + restart: the {} engine keeps nothing across a restart (run with --broker-engine sqlite)",
            args.broker_engine.name()
        ));
    }
    let interval = Duration::from_secs(args.fault_interval);
    let total = args.rate * args.fault_interval * faults.len() as u64;
    let pending: Pending = Arc::default();
    let mut watch = CheckpointWatch::start(target.pool).await?;
    let started = Instant::now();
    let driving = tokio::spawn(drive(
        target.client.clone(),
        target.base.to_owned(),
        Arc::clone(target.users),
        args.rate,
        total,
        args.seed ^ 0xfa17,
        vec![Arc::clone(&pending)],
    ));
    let mut samples: Vec<(Instant, u64)> = Vec::new();
    let settling = async {
        while !driving.is_finished() {
            let (position, at) = watch.next().await?;
            samples.extend(settle_each(&pending, position, at));
        }
        Ok::<_, anyhow::Error>(())
    };
    let acting = async {
        let mut actions = Vec::with_capacity(faults.len());
        for (index, fault) in faults.iter().enumerate() {
            tokio::time::sleep_until((started + interval * index as u32).into()).await;
            let began = Instant::now();
            act(*fault, target, workers).await?;
            actions.push((began, began.elapsed()));
        }
        Ok::<_, anyhow::Error>(actions)
    };
    let (settled, actions) = tokio::join!(settling, acting);
    // A failed action stops the commands too: the phase's figures would mean nothing.
    let actions = match (settled, actions) {
        (Ok(()), Ok(actions)) => actions,
        (Err(error), _) | (_, Err(error)) => {
            driving.abort();
            return Err(error);
        }
    };
    let commands = driving.await?;
    let deadline = Instant::now() + SETTLE_LIMIT;
    while outstanding(&pending) {
        if Instant::now() > deadline {
            bail!(
                "faults: acknowledged commands never showed in the read models within {SETTLE_LIMIT:?}; \
                 partitions behind the relay (projection, partition, applied up to, relayed up to): {:?}",
                stalled_partitions(target.pool).await?
            );
        }
        let (position, at) = watch.next().await?;
        samples.extend(settle_each(&pending, position, at));
    }
    for worker in workers.iter() {
        worker.alive()?;
    }
    Ok(report(
        &faults,
        &actions,
        &samples,
        started,
        commands,
        args.fault_interval,
        skipped,
    ))
}

/// Each projection's partitions whose workers have not applied what the relay published.
async fn stalled_partitions(pool: &PgPool) -> anyhow::Result<Vec<(String, i32, i64, i64)>> {
    Ok(sqlx::query_as(
        "SELECT o.projection, o.partition, o.last_position, r.last_position
         FROM projection_offsets o JOIN relay_partitions r ON r.relay = o.topic AND r.partition = o.partition
         WHERE o.last_position < r.last_position ORDER BY 1, 2",
    )
    .fetch_all(pool)
    .await?)
}

/// Carries out one fault on the running path.
async fn act(fault: Fault, target: &Target<'_>, workers: &mut Vec<RoleProcess>) -> anyhow::Result<()> {
    match fault {
        Fault::None => {}
        Fault::AddWorker => {
            // A dynamic member, as an autoscaler adds: it leaves the group when stopped.
            let worker = start_worker(target, &format!("projector-{}", workers.len() + 1), None)?;
            worker.ready(target.client).await?;
            holds_partitions(target.client, &worker).await?;
            workers.push(worker);
        }
        Fault::StopWorker => {
            if let Some(worker) = workers.pop() {
                worker.terminate(STOP_LIMIT).await?;
            }
        }
        Fault::KillWorker => {
            // Dropping a role kills it with SIGKILL; its successor takes its identity.
            drop(workers.remove(0));
            let worker = start_worker(target, "projector-1-restarted", Some(1))?;
            worker.ready(target.client).await?;
            holds_partitions(target.client, &worker).await?;
            workers.insert(0, worker);
        }
        Fault::LoseWorker => {
            // Killed and never started again: the survivors take its partitions once its
            // session expires, which is the action's duration.
            drop(workers.remove(0));
            holds_every_partition(target, workers).await?;
        }
        Fault::RestartBroker => {
            target.broker.run("kill").await?;
            target.broker.run("start").await?;
        }
    }
    Ok(())
}

/// A `cloudphone projector` in Kafka mode: the static member `load-kafka-<member>`, or a
/// dynamic one.
fn start_worker(target: &Target<'_>, name: &str, member: Option<usize>) -> anyhow::Result<RoleProcess> {
    let instance = member.map(|member| format!("load-kafka-{member}"));
    let mut env = target.kafka_env.to_vec();
    if let Some(instance) = &instance {
        env.push(("CLOUDPHONE_KAFKA_INSTANCE_ID", instance.as_str()));
    }
    RoleProcess::start_as("projector", name, target.url, target.logs, &env)
}

/// Waits until `worker` holds partitions of every projection (its group has rebalanced).
async fn holds_partitions(client: &reqwest::Client, worker: &RoleProcess) -> anyhow::Result<()> {
    let what = format!("the {} held no partitions", worker.name);
    assigned_until(client, std::slice::from_ref(worker), |held| held > 0.0, &what).await
}

/// Waits until `workers` together hold every partition of every projection.
async fn holds_every_partition(target: &Target<'_>, workers: &[RoleProcess]) -> anyhow::Result<()> {
    let partitions = f64::from(target.partitions);
    let what = format!("the surviving workers did not hold all {partitions} partitions");
    assigned_until(target.client, workers, |held| held >= partitions, &what).await
}

/// Waits until, for every projection, the partitions `workers` hold together (their
/// `cloudphone_kafka_assigned_partitions` gauges) satisfy `enough`; fails with `what` after
/// [`JOIN_LIMIT`].
async fn assigned_until(
    client: &reqwest::Client,
    workers: &[RoleProcess],
    enough: impl Fn(f64) -> bool,
    what: &str,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + JOIN_LIMIT;
    loop {
        let mut held = vec![0.0; Projection::ALL.len()];
        for worker in workers {
            worker.alive()?;
            let samples = scrape(client, &worker.base).await.unwrap_or_default();
            for (held, projection) in held.iter_mut().zip(Projection::ALL) {
                let label = format!("projection=\"{}\"", projection.name());
                *held += metric_sum(&samples, KAFKA_ASSIGNED_PARTITIONS, &label);
            }
        }
        if held.iter().all(|held| enough(*held)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what} within {JOIN_LIMIT:?} (held per projection: {held:?})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Each window's figures from the commands acknowledged in it.
fn report(
    faults: &[Fault],
    actions: &[(Instant, Duration)],
    samples: &[(Instant, u64)],
    started: Instant,
    commands: Commands,
    interval_seconds: u64,
    skipped: Vec<String>,
) -> FaultsReport {
    // A command belongs to the window in which it showed: one acknowledged just before a
    // fault and held up by it counts in that fault's window, not in the one before.
    let shown = |(acked, micros): &(Instant, u64)| *acked + Duration::from_micros(*micros);
    let window_of = |index: usize| {
        let begins = actions[index].0;
        let ends = actions.get(index + 1).map(|(at, _)| *at);
        samples.iter().filter(move |sample| {
            let shown = shown(sample);
            shown >= begins && ends.is_none_or(|ends| shown < ends)
        })
    };
    let quiet = {
        let mut latencies = histogram();
        for (_, micros) in window_of(0) {
            let _ = latencies.record(*micros);
        }
        latencies.value_at_quantile(0.99)
    };
    let threshold = quiet.saturating_mul(2);
    let windows = faults
        .iter()
        .enumerate()
        .map(|(index, fault)| {
            let mut latencies = histogram();
            // Per second after the fault, by when the commands showed: one slow command is
            // noise, a second whose p99 is over the threshold is part of the spike (commands
            // held up by a pause all show at its end, in the pause's last second).
            let mut seconds: BTreeMap<u64, Histogram<u64>> = BTreeMap::new();
            for sample in window_of(index) {
                let _ = latencies.record(sample.1);
                let second = shown(sample).saturating_duration_since(actions[index].0).as_secs();
                let _ = seconds.entry(second).or_insert_with(histogram).record(sample.1);
            }
            let spike = seconds
                .iter()
                .filter(|(_, latencies)| latencies.value_at_quantile(0.99) > threshold)
                .map(|(second, _)| Duration::from_secs(second + 1))
                .max()
                .unwrap_or_default();
            Window {
                fault: *fault,
                at_seconds: actions[index].0.saturating_duration_since(started).as_secs_f64(),
                action_ms: actions[index].1.as_secs_f64() * 1000.0,
                latency: Latency::of(&latencies),
                max_ms: latencies.max() as f64 / 1000.0,
                spike_ms: spike.as_secs_f64() * 1000.0,
            }
        })
        .collect();
    FaultsReport {
        interval_seconds,
        spike_threshold_ms: threshold as f64 / 1000.0,
        commands,
        windows,
        skipped,
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{Commands, Fault, report};

    /// Each window holds the commands that showed between its fault and the next, even those
    /// acknowledged before its fault; the spike ends with the last second whose p99 is over
    /// twice the quiet window's, and one slow command alone is no spike.
    #[test]
    fn windows_split_at_the_faults_and_a_spike_is_a_slow_second() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let actions = [(at(0), Duration::ZERO), (at(10_000), Duration::from_millis(700))];
        let mut samples = Vec::new();
        for ms in (0..9_900).step_by(10) {
            // Quiet: 20 ms, with one outlier.
            samples.push((at(ms), if ms == 5_000 { 900_000 } else { 20_000 }));
        }
        for ms in (9_900..10_000).step_by(10) {
            // Acknowledged before the fault and held up by it: they show at 10.6 s.
            samples.push((at(ms), (10_600 - ms) * 1_000));
        }
        for ms in (10_000..20_000).step_by(10) {
            // The fault: 3 s of 500 ms (shown until 13.49 s), then 20 ms with a lone outlier.
            let slow = ms < 13_000 || ms == 18_500;
            samples.push((at(ms), if slow { 500_000 } else { 20_000 }));
        }
        let faults = [Fault::None, Fault::AddWorker];
        let report = report(&faults, &actions, &samples, start, Commands::default(), 10, Vec::new());
        assert!(
            (report.spike_threshold_ms - 40.0).abs() < 0.1,
            "{}",
            report.spike_threshold_ms
        );
        let (quiet, added) = (&report.windows[0], &report.windows[1]);
        assert_eq!(quiet.latency.count, 990);
        assert_eq!(quiet.spike_ms, 0.0, "one slow command is no spike");
        assert_eq!(
            added.latency.count, 1_010,
            "the held-up commands count in the fault's window"
        );
        assert_eq!(added.spike_ms, 4_000.0, "the slow commands showed until 13.49 s");
        assert_eq!(added.action_ms, 700.0);
        assert!((added.max_ms - 700.0).abs() < 1.0, "{}", added.max_ms);
    }
}
