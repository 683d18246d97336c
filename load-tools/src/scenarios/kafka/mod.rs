//! `cloudphone load kafka`: the Kafka path at the command API's rate (issue #25).
//!
//! In one fresh database `cloudphone_load_kafka`, with a broker of the run's own
//! (ops/dev/broker.sh on a free port, `--broker-engine`):
//! 1. `--users` users registered through the command API (a child process), quotas raised;
//! 2. embedded: portal commands at `--rate`/s for `--duration` s, the embedded projector a
//!    child process; for each acknowledged command, the time until both projections'
//!    checkpoints cover its position;
//! 3. the broker alone: the log's own envelopes produced with the relay's settings and read
//!    back by a new consumer group of `--workers` consumers, no PostgreSQL on either side
//!    (the path's ceiling on this machine);
//! 4. Kafka: the embedded projector stopped, the relay and `--workers` projector workers
//!    (child processes, static members) on a topic that starts at the log's head; the same
//!    commands at the same rate, measured the same way, with the relay's throughput and lag,
//!    each worker's events/s, and CPU per process;
//! 5. with `--faults`, the same commands while workers are added, stopped, killed and lost
//!    and the broker restarts (`faults.rs`);
//! 6. the read models compared with a rebuild from the log: nothing lost, nothing counted
//!    twice. A difference fails the run.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use event_log::LogReader;
use kafka_adapters::broker_alone::{self, BrokerAloneReport};
use operator_console::Progress;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;
use tokio::sync::{Mutex, Semaphore};
use uuid::Uuid;

use crate::cli::LoadKafkaArgs;
use crate::harness::broker::Broker;
use crate::harness::databases::{applied, database_url_of, read_models_differ, recreate_database};
use crate::harness::metrics::{metric_sum, scrape};
use crate::harness::portal::provision_users;
use crate::harness::report::{Latency, histogram, write_json};
use crate::harness::roles::RoleProcess;
use crate::harness::sampling::{PostgresCpu, cpu_seconds};
use crate::harness::visibility::{CheckpointWatch, Pending, acknowledged, outstanding, settle};
use crate::workloads::portal::{Device, PortalCommand};

mod faults;

const DATABASE: &str = "cloudphone_load_kafka";
const TOPIC: &str = "cloudphone.load-kafka";
/// Commands in flight at most; one scheduled while all are busy is counted as shed.
const IN_FLIGHT: usize = 256;
/// Longest the appends of a phase may take to show in the read models once it ends.
const SETTLE_LIMIT: Duration = Duration::from_secs(120);
/// Longest the consumer groups may take to form and carry a first event.
const WARM_UP_LIMIT: Duration = Duration::from_secs(120);

/// A user the commands act for, and their fleet as the answers showed it.
struct User {
    token: String,
    fleet: Mutex<Vec<Device>>,
}

#[derive(Debug, Default, Serialize)]
struct Commands {
    scheduled: u64,
    acknowledged: u64,
    /// Scheduled while `IN_FLIGHT` commands were still waiting for their answers.
    shed: u64,
    errors: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize)]
struct Phase {
    mode: &'static str,
    seconds: f64,
    commands: Commands,
    commands_per_second: f64,
    events_per_second: f64,
    /// From a command's acknowledgement to both projections' checkpoints covering it.
    latency: Latency,
    max_ms: f64,
    /// CPU milliseconds per acknowledged command, by process.
    cpu_ms_per_command: BTreeMap<String, f64>,
    relay: Option<RelayFigures>,
    /// Events applied per second by each worker (over every projection it consumes for).
    worker_events_per_second: BTreeMap<String, f64>,
}

#[derive(Debug, Serialize)]
struct RelayFigures {
    published_per_second: f64,
    /// Means over the phase's rounds: events, milliseconds until the broker acknowledged
    /// them, milliseconds to record that in PostgreSQL.
    round_events: f64,
    round_publish_ms: f64,
    round_record_ms: f64,
    /// From a command's acknowledgement until the relay recorded its events as acknowledged
    /// by the broker: the relay's part of the commit-to-read-model latency.
    commit_to_relay: Latency,
    /// Events committed to the log and not yet acknowledged by the broker, sampled every
    /// 2 ms from the first command until every command showed in the read models.
    lag_p50_events: u64,
    lag_p99_events: u64,
    lag_max_events: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    rate: u64,
    duration: u64,
    users: usize,
    workers: usize,
    partitions: i32,
    broker_engine: &'static str,
    phases: Vec<Phase>,
    broker_alone: Option<BrokerAloneReport>,
    faults: Option<faults::FaultsReport>,
    /// Events per second the relay published over what the broker alone took in.
    relay_fraction_of_broker: Option<f64>,
    read_models_equal_a_rebuild: bool,
}

pub async fn run(args: &LoadKafkaArgs) -> anyhow::Result<()> {
    if args.rate == 0
        || args.duration == 0
        || args.users == 0
        || args.workers == 0
        || args.partitions <= 0
        || args.fault_interval == 0
    {
        bail!("--rate, --duration, --users, --workers, --partitions and --fault-interval must be positive");
    }
    let logs = std::env::temp_dir().join(format!("cloudphone-load-kafka-{}", std::process::id()));
    std::fs::create_dir_all(&logs).with_context(|| format!("create {}", logs.display()))?;
    println!(
        "load kafka: {} commands/s for {} s per phase, {} users, {} workers ({} rebalancing, session timeout {} ms), {} partitions, broker on {}; logs in {}",
        args.rate,
        args.duration,
        args.users,
        args.workers,
        args.assignment,
        args.session_timeout_ms,
        args.partitions,
        args.broker_engine.name(),
        logs.display()
    );
    let pool = recreate_database(&args.database.database_url, DATABASE, 8).await?;
    read_models::migrate(&pool).await?;
    let url = database_url_of(&args.database.database_url, DATABASE)?;
    let broker = Broker::fresh_on(&logs.join("broker"), args.broker_engine)
        .await
        .context("the run's broker")?;
    let client = reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_millis(2_500))
        .timeout(Duration::from_secs(30))
        .build()?;

    let command_api = RoleProcess::start("command-api", &url, &logs)?;
    command_api.ready(&client).await?;
    let users: Arc<Vec<User>> = Arc::new(
        provision_users(&client, &command_api.base, args.users)
            .await?
            .into_iter()
            .map(|(_, token)| User {
                token,
                fleet: Mutex::new(Vec::new()),
            })
            .collect(),
    );
    let reader = LogReader::new(pool.clone());
    let mut phases = Vec::new();

    // Embedded: the projector tails the log.
    let projector = RoleProcess::start("projector", &url, &logs)?;
    projector.ready(&client).await?;
    let roles = [&command_api, &projector];
    let phase = measure_phase(
        "embedded",
        args,
        &pool,
        &client,
        &command_api.base,
        &users,
        &roles,
        None,
        &[],
    )
    .await?;
    phase.print();
    phases.push(phase);
    to_head(&pool, &reader).await?;
    drop(projector);

    // The broker alone, with the log's own envelopes as its messages.
    let broker_alone = if args.broker_messages > 0 {
        let payloads = reader
            .read_all(0, 5_000)
            .await?
            .iter()
            .map(serde_json::to_vec)
            .collect::<Result<Vec<_>, _>>()?;
        let report = broker_alone::measure(
            &broker.address(),
            &format!("{TOPIC}.alone"),
            args.partitions,
            &payloads,
            args.broker_messages,
            args.workers,
            Duration::from_secs(300),
        )
        .await
        .context("the broker alone")?;
        println!(
            "  broker alone ({} messages of {:.0} bytes): produced {:>9.0}/s, consumed {:>9.0}/s by {} consumers (group joined in {:.1} s)",
            report.messages,
            report.mean_message_bytes,
            report.produced_per_second,
            report.consumed_per_second,
            report.consumers,
            report.group_join_seconds
        );
        let latency = &report.latency;
        println!(
            "  broker alone, one message at a time: acknowledged p50 {:.2} ms / p99 {:.2} ms, delivered to the group p50 {:.2} ms / p99 {:.2} ms",
            latency.acknowledged_p50_ms,
            latency.acknowledged_p99_ms,
            latency.delivered_p50_ms,
            latency.delivered_p99_ms
        );
        Some(report)
    } else {
        None
    };

    // Kafka: the relay starts at the head, so the topic carries this phase's events only.
    let head = reader.head().await?.position;
    sqlx::query("INSERT INTO relay_checkpoints (relay, position) VALUES ($1, $2)")
        .bind(TOPIC)
        .bind(head)
        .execute(&pool)
        .await?;
    let (address, partitions) = (broker.address(), args.partitions.to_string());
    let session_timeout = args.session_timeout_ms.to_string();
    let kafka_env = [
        ("CLOUDPHONE_KAFKA_BROKERS", address.as_str()),
        ("CLOUDPHONE_KAFKA_TOPIC", TOPIC),
        ("CLOUDPHONE_KAFKA_PARTITIONS", partitions.as_str()),
        ("CLOUDPHONE_KAFKA_SESSION_TIMEOUT_MS", session_timeout.as_str()),
        ("CLOUDPHONE_KAFKA_ASSIGNMENT", args.assignment.as_str()),
    ];
    let relay = RoleProcess::start_as("relay", "relay", &url, &logs, &kafka_env)?;
    let mut workers = Vec::with_capacity(args.workers + 1);
    for index in 1..=args.workers {
        let instance = format!("load-kafka-{index}");
        let mut env = kafka_env.to_vec();
        env.push(("CLOUDPHONE_KAFKA_INSTANCE_ID", instance.as_str()));
        workers.push(RoleProcess::start_as(
            "projector",
            &format!("projector-{index}"),
            &url,
            &logs,
            &env,
        )?);
    }
    relay.ready(&client).await?;
    for worker in &workers {
        worker.ready(&client).await?;
    }
    warm_up(&pool, &client, &command_api.base, &users, head, args.seed).await?;
    to_head(&pool, &reader).await?;
    let mut roles = vec![&command_api, &relay];
    roles.extend(workers.iter());
    let phase = measure_phase(
        "relay + Kafka workers",
        args,
        &pool,
        &client,
        &command_api.base,
        &users,
        &roles,
        Some((&relay, broker.pid())),
        &workers,
    )
    .await?;
    phase.print();
    phases.push(phase);
    for role in &roles {
        role.alive()?;
    }

    let faults = if args.faults {
        let target = faults::Target {
            pool: &pool,
            client: &client,
            base: &command_api.base,
            users: &users,
            url: &url,
            logs: &logs,
            kafka_env: &kafka_env,
            broker: &broker,
            partitions: args.partitions,
        };
        let report = faults::measure_faults(args, &target, &mut workers).await?;
        report.print();
        command_api.alive()?;
        relay.alive()?;
        Some(report)
    } else {
        None
    };

    let head = to_head(&pool, &reader).await?;
    let difference = read_models_differ(&reader, &pool, head).await?;
    match &difference {
        None => println!("  read models at position {head}: equal to a rebuild from the log"),
        Some(difference) => println!("  read models at position {head} DIFFER from a rebuild: {difference}"),
    }
    let relay_fraction_of_broker = broker_alone.as_ref().and_then(|alone| {
        let relay = phases.last()?.relay.as_ref()?;
        Some(relay.published_per_second / alone.produced_per_second.max(1e-9))
    });
    let report = Report {
        rate: args.rate,
        duration: args.duration,
        users: args.users,
        workers: args.workers,
        partitions: args.partitions,
        broker_engine: args.broker_engine.name(),
        phases,
        broker_alone,
        faults,
        relay_fraction_of_broker,
        read_models_equal_a_rebuild: difference.is_none(),
    };
    if let Some(path) = &args.json {
        write_json(path, &report)?;
        println!("  report written to {}", path.display());
    }
    if let Some(difference) = difference {
        bail!("the read models differ from a rebuild of the log: {difference}");
    }
    Ok(())
}

impl Phase {
    fn print(&self) {
        println!(
            "  {:<22} {:>6.0} commands/s ({:.0} events/s, {} shed, {} errors)   commit to read model p50 {:>7.2} ms   p99 {:>7.2} ms   p999 {:>7.2} ms   max {:>7.2} ms",
            self.mode,
            self.commands_per_second,
            self.events_per_second,
            self.commands.shed,
            self.commands.errors.values().sum::<u64>(),
            self.latency.p50_ms,
            self.latency.p99_ms,
            self.latency.p999_ms,
            self.max_ms
        );
        if let Some(relay) = &self.relay {
            println!(
                "  {:<22} commit to the relay's record p50 {:>7.2} ms   p99 {:>7.2} ms   p999 {:>7.2} ms (the rest is the workers')",
                "", relay.commit_to_relay.p50_ms, relay.commit_to_relay.p99_ms, relay.commit_to_relay.p999_ms
            );
            println!(
                "  {:<22} relay published {:.0} events/s in rounds of {:.0} events ({:.1} ms to the broker's acknowledgement, {:.1} ms to record it), lag p50 {} / p99 {} / max {} events; workers {}",
                "",
                relay.published_per_second,
                relay.round_events,
                relay.round_publish_ms,
                relay.round_record_ms,
                relay.lag_p50_events,
                relay.lag_p99_events,
                relay.lag_max_events,
                self.worker_events_per_second
                    .iter()
                    .map(|(name, rate)| format!("{name} {rate:.0} events/s"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        println!(
            "  {:<22} CPU per command: {}",
            "",
            self.cpu_ms_per_command
                .iter()
                .map(|(name, ms)| format!("{name} {ms:.3} ms"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}

/// Waits until both projections have applied the log's head; returns that head.
async fn to_head(pool: &PgPool, reader: &LogReader) -> anyhow::Result<i64> {
    let head = reader.head().await?.position;
    let deadline = Instant::now() + SETTLE_LIMIT;
    while applied(pool).await? < head {
        if Instant::now() > deadline {
            bail!("the projections did not reach position {head} within {SETTLE_LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(head)
}

/// A few commands until one has gone all the way through the relay, the broker and the
/// workers' consumer groups (which form meanwhile).
async fn warm_up(
    pool: &PgPool,
    client: &reqwest::Client,
    base: &str,
    users: &Arc<Vec<User>>,
    head: i64,
    seed: u64,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    while applied(pool).await? <= head {
        if started.elapsed() > WARM_UP_LIMIT {
            bail!("nothing reached the read models through Kafka within {WARM_UP_LIMIT:?}");
        }
        send_command(client, base, users, rng.random(), &[]).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "  consumer groups formed, first event through in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Outcome of one command: its error kind, if it failed.
type Sent = Result<(), String>;

/// One portal command for a user not busy with another; its position is noted in `pending`
/// when acknowledged. `None` when every user tried was busy.
async fn send_command(
    client: &reqwest::Client,
    base: &str,
    users: &[User],
    seed: u64,
    pending: &[Pending],
) -> Option<Sent> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (user, mut fleet) = (0..8).find_map(|_| {
        let user = &users[rng.random_range(0..users.len())];
        user.fleet.try_lock().ok().map(|fleet| (user, fleet))
    })?;
    let (command, request) = PortalCommand::choose(&mut rng, client, base, &fleet);
    let answer = request
        .bearer_auth(&user.token)
        .header("idempotency-key", Uuid::now_v7().to_string())
        .send()
        .await;
    Some(match answer {
        Ok(answer) if answer.status().is_success() => {
            let body: Value = answer.json().await.unwrap_or_default();
            if let Some(position) = body["position"].as_i64() {
                let now = Instant::now();
                for pending in pending {
                    acknowledged(pending, position, now);
                }
            }
            command.succeeded(&mut fleet, &body);
            Ok(())
        }
        Ok(answer) => {
            let status = answer.status().as_u16();
            let body: Value = answer.json().await.unwrap_or_default();
            Err(format!("{status} {}", body["code"].as_str().unwrap_or("?")))
        }
        Err(error) if error.is_timeout() => Err("timeout".to_owned()),
        Err(_) => Err("transport".to_owned()),
    })
}

/// CPU seconds of each named process now.
fn cpu_now(processes: &[(String, u32)]) -> BTreeMap<String, f64> {
    processes
        .iter()
        .filter_map(|(name, pid)| Some((name.clone(), cpu_seconds(*pid)?)))
        .collect()
}

/// Events each worker has applied so far, over every projection.
async fn worker_events(client: &reqwest::Client, workers: &[RoleProcess]) -> BTreeMap<String, f64> {
    let mut events = BTreeMap::new();
    for worker in workers {
        let applied = match scrape(client, &worker.base).await {
            Ok(samples) => metric_sum(&samples, projections::metrics_names::PROJECTION_EVENTS_TOTAL, ""),
            Err(_) => 0.0,
        };
        events.insert(worker.name.clone(), applied);
    }
    events
}

/// Commands at `--rate`/s (open loop) for `--duration`, while the read models are watched.
#[allow(clippy::too_many_arguments)]
async fn measure_phase(
    mode: &'static str,
    args: &LoadKafkaArgs,
    pool: &PgPool,
    client: &reqwest::Client,
    base: &str,
    users: &Arc<Vec<User>>,
    roles: &[&RoleProcess],
    relay: Option<(&RoleProcess, Option<u32>)>,
    workers: &[RoleProcess],
) -> anyhow::Result<Phase> {
    let mut processes: Vec<(String, u32)> = roles.iter().map(|role| (role.name.clone(), role.pid())).collect();
    if let Some((_, Some(broker))) = relay {
        processes.push(("broker".to_owned(), broker));
    }
    processes.push(("load generator".to_owned(), std::process::id()));
    let cpu_before = cpu_now(&processes);
    let postgres = PostgresCpu::start(pool).await;
    let head_before = LogReader::new(pool.clone()).head().await?.position;
    use kafka_adapters::relay::metrics_names::{
        RELAY_BATCH_EVENTS as BATCH_EVENTS, RELAY_PUBLISHED_TOTAL as published, RELAY_ROUND_SECONDS as ROUND_SECONDS,
    };
    let rounds_before = match relay {
        Some((relay, _)) => scrape(client, &relay.base).await.unwrap_or_default(),
        None => BTreeMap::new(),
    };
    let workers_before = worker_events(client, workers).await;

    let mut watch = CheckpointWatch::start(pool).await?;
    let pending: Pending = Arc::default();
    // With the relay: the same commands until the relay recorded them as acknowledged by the
    // broker, which splits the path's latency into the relay's part and the workers'.
    let relayed: Pending = Arc::default();
    let total = args.rate * args.duration;
    let driving = tokio::spawn(drive(
        client.clone(),
        base.to_owned(),
        Arc::clone(users),
        args.rate,
        total,
        args.seed,
        match relay {
            Some(_) => vec![Arc::clone(&pending), Arc::clone(&relayed)],
            None => vec![Arc::clone(&pending)],
        },
    ));
    let watching_relay = tokio_util::sync::CancellationToken::new();
    let relay_watch =
        relay.map(|_| tokio::spawn(watch_relay(pool.clone(), Arc::clone(&relayed), watching_relay.clone())));
    let mut latencies = histogram();
    let started = Instant::now();
    let mut progress = Progress::new(mode, args.duration);
    while !driving.is_finished() {
        let (position, at) = watch.next().await?;
        settle(&pending, position, at, &mut latencies);
        progress.set(started.elapsed().as_secs().min(args.duration));
    }
    let commands = driving.await?;
    let seconds = started.elapsed().as_secs_f64();
    progress.finish();
    let deadline = Instant::now() + SETTLE_LIMIT;
    while outstanding(&pending) {
        if Instant::now() > deadline {
            bail!("{mode}: acknowledged commands never showed in the read models within {SETTLE_LIMIT:?}");
        }
        let (position, at) = watch.next().await?;
        settle(&pending, position, at, &mut latencies);
    }
    // The checkpoints never pass the relay's, so everything is relayed by now.
    watching_relay.cancel();
    let relay_watch = match relay_watch {
        Some(task) => Some(task.await??),
        None => None,
    };
    let events = LogReader::new(pool.clone()).head().await?.position - head_before;

    let cpu_after = cpu_now(&processes);
    let per_command = |seconds: f64| seconds * 1000.0 / commands.acknowledged.max(1) as f64;
    let mut cpu_ms_per_command: BTreeMap<String, f64> = cpu_after
        .iter()
        .map(|(name, after)| {
            (
                name.clone(),
                per_command(after - cpu_before.get(name).copied().unwrap_or(0.0)),
            )
        })
        .collect();
    if let Some(postgres) = postgres {
        cpu_ms_per_command.insert("PostgreSQL".to_owned(), per_command(postgres.seconds()));
    }
    let relay = match relay {
        Some((relay, _)) => {
            let rounds_after = scrape(client, &relay.base).await.unwrap_or_default();
            let delta = |name: &str, label: &str| {
                let value = |samples: &BTreeMap<String, f64>| {
                    if label.is_empty() {
                        samples.get(name).copied().unwrap_or(0.0)
                    } else {
                        metric_sum(samples, name, label)
                    }
                };
                value(&rounds_after) - value(&rounds_before)
            };
            let rounds = delta(&format!("{ROUND_SECONDS}_count"), "phase=\"publish\"").max(1.0);
            let (lag, relayed) = relay_watch.unwrap_or_else(|| (histogram(), histogram()));
            Some(RelayFigures {
                commit_to_relay: Latency::of(&relayed),
                published_per_second: delta(published, "") / seconds,
                round_events: delta(&format!("{BATCH_EVENTS}_sum"), "") / rounds,
                round_publish_ms: delta(&format!("{ROUND_SECONDS}_sum"), "phase=\"publish\"") * 1000.0 / rounds,
                round_record_ms: delta(&format!("{ROUND_SECONDS}_sum"), "phase=\"record\"") * 1000.0 / rounds,
                lag_p50_events: lag.value_at_quantile(0.5),
                lag_p99_events: lag.value_at_quantile(0.99),
                lag_max_events: lag.max(),
            })
        }
        None => None,
    };
    let workers_after = worker_events(client, workers).await;
    let worker_events_per_second = workers_after
        .iter()
        .map(|(name, after)| {
            (
                name.clone(),
                (after - workers_before.get(name).copied().unwrap_or(0.0)) / seconds,
            )
        })
        .collect();
    Ok(Phase {
        mode,
        seconds,
        commands_per_second: commands.acknowledged as f64 / seconds,
        events_per_second: events as f64 / seconds,
        commands,
        latency: Latency::of(&latencies),
        max_ms: latencies.max() as f64 / 1000.0,
        cpu_ms_per_command,
        relay,
        worker_events_per_second,
    })
}

/// Sends `total` commands on a fixed schedule of `rate`/s (open loop: a slow answer does not
/// slow the schedule; one due while `IN_FLIGHT` wait is shed).
async fn drive(
    client: reqwest::Client,
    base: String,
    users: Arc<Vec<User>>,
    rate: u64,
    total: u64,
    seed: u64,
    pending: Vec<Pending>,
) -> Commands {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let acknowledged = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(std::sync::Mutex::new(BTreeMap::<String, u64>::new()));
    let mut commands = Commands::default();
    let started = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..total {
        tokio::time::sleep_until(started + Duration::from_secs_f64(index as f64 / rate as f64)).await;
        commands.scheduled += 1;
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            commands.shed += 1;
            continue;
        };
        let (client, base, users, pending) = (client.clone(), base.clone(), Arc::clone(&users), pending.clone());
        let (acknowledged, errors) = (Arc::clone(&acknowledged), Arc::clone(&errors));
        tasks.spawn(async move {
            let sent = send_command(&client, &base, &users, seed.wrapping_add(index), &pending).await;
            drop(slot);
            match sent {
                Some(Ok(())) => {
                    acknowledged.fetch_add(1, Ordering::Relaxed);
                }
                Some(Err(kind)) => {
                    if let Ok(mut errors) = errors.lock() {
                        *errors.entry(kind).or_insert(0) += 1;
                    }
                }
                // Every user tried was busy with another command: as good as shed.
                None => {
                    if let Ok(mut errors) = errors.lock() {
                        *errors.entry("every user busy".to_owned()).or_insert(0) += 1;
                    }
                }
            }
        });
        // Reap finished tasks as we go, so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    commands.acknowledged = acknowledged.load(Ordering::Relaxed);
    commands.errors = errors.lock().map(|e| e.clone()).unwrap_or_default();
    commands
}

/// The relay's progress every 2 ms until `stop`: its lag (log head minus its checkpoint) and,
/// for each acknowledged command in `relayed`, the time until the relay recorded it. A query
/// every 2 ms costs PostgreSQL little beside the commands (it reads two one-row tables).
async fn watch_relay(
    pool: PgPool,
    relayed: Pending,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<(hdrhistogram::Histogram<u64>, hdrhistogram::Histogram<u64>)> {
    let (mut lag, mut latencies) = (histogram(), histogram());
    while !stop.is_cancelled() {
        let (head, position): (i64, i64) =
            sqlx::query_as("SELECT (SELECT position FROM log_head), position FROM relay_checkpoints WHERE relay = $1")
                .bind(TOPIC)
                .fetch_one(&pool)
                .await?;
        settle(&relayed, position, Instant::now(), &mut latencies);
        let _ = lag.record(u64::try_from(head - position).unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok((lag, latencies))
}
