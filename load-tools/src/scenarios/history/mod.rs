//! `cloudphone load history`: a history checker for faults (issue #20).
//!
//! The run builds a platform of its own: a throwaway PostgreSQL cluster
//! (ops/dev/scratch-postgres.sh), a TCP proxy in this process between each role and that
//! cluster ([`proxy`]), and the roles as child processes of this binary ([`roles`]): the
//! command API, a projector and the query API, or with `--kafka` the relay and two Kafka
//! projector workers on a broker of the run's own. Portal clients ([`clients`]) run random
//! device operations, recording each one's invocation and outcome ([`record`]), while faults come on a
//! schedule ([`faults`]): the primary stopped and started, `kill -9` of each role, the network
//! to PostgreSQL cut or blackholed, the broker killed.
//!
//! At the end everything is healed, the command API stopped gracefully (so the log is final),
//! the projections awaited at the log's head, and the history checked against the log
//! ([`checker`]: every acknowledged command exactly once and where it was answered, nothing
//! from refused ones, every refusal justified by a state of its streams at that time); the
//! read models must equal a rebuild from the log. Any violation fails the run.

pub mod checker;
pub mod clients;
pub mod faults;
pub mod proxy;
pub mod record;
pub mod roles;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::Utc;
use event_log::LogReader;
use http_edge::auth::Role;
use operator_console::Progress;
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use self::checker::{Tally, Violation};
use self::clients::{Clock, Portal, Tenant};
use self::faults::{Fault, FaultKind, Platform};
use self::proxy::{LinkStats, Proxy};
use self::record::{LoggedEvent, Operation, Outcome};
use self::roles::{RoleHistory, RoleSpec, ScratchPostgres, Supervisor};
use crate::cli::LoadHistoryArgs;
use crate::harness::broker::Broker;
use crate::harness::databases::{applied, read_models_differ, recreate_database};
use crate::harness::report::write_json;
use crate::harness::roles::free_port;
use crate::harness::tokens::{SECRET, load_token};

const DATABASE: &str = "cloudphone_history";
const TOPIC: &str = "cloudphone.history";
/// Users each client acts for.
const USERS_PER_CLIENT: usize = 2;
/// What the development broker carries to a consumer group comfortably (BENCHMARKS.md):
/// about 200 messages/s, and an operation writes one to three events.
const KAFKA_RATE: u64 = 40;
const START_LIMIT: Duration = Duration::from_secs(120);
/// Longest in-flight operations may take to finish once the load stops and faults heal.
const GRACE: Duration = Duration::from_secs(60);
/// Least time the projections get to reach the head after the load (at least as long as
/// the load itself, too).
const CATCH_UP_LIMIT: Duration = Duration::from_secs(120);
/// Violations listed in the report (all are counted).
const LISTED: usize = 200;

#[derive(Debug, Default, Serialize)]
struct OperationsReport {
    total: usize,
    acknowledged: usize,
    refused: usize,
    indeterminate: usize,
    /// Operations that needed more than one attempt (after a 503 or a transport error).
    retried: usize,
    /// Command -> outcome -> count.
    by_command: BTreeMap<&'static str, BTreeMap<&'static str, usize>>,
    refusals_by_code: BTreeMap<String, usize>,
    /// Why operations were given up (the last reason).
    indeterminate_by_reason: BTreeMap<String, usize>,
    /// Why attempts were retried, over all operations.
    retries_by_reason: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize)]
struct Report {
    seed: u64,
    kafka: bool,
    clients: usize,
    users: usize,
    /// Seconds of load (longer than `--duration` when the first round of faults needed it).
    load_seconds: f64,
    fault_every_seconds: u64,
    request_timeout_seconds: u64,
    operations: OperationsReport,
    faults_by_kind: BTreeMap<FaultKind, usize>,
    faults: Vec<Fault>,
    roles: BTreeMap<String, RoleHistory>,
    proxy: BTreeMap<String, LinkStats>,
    log_events: usize,
    /// Seconds from the end of the load until every projection had applied the head.
    projections_caught_up_seconds: Option<f64>,
    read_models_equal_a_rebuild: bool,
    query_api_reads_its_writes: bool,
    checker: Tally,
    violation_count: usize,
    violations_by_kind: BTreeMap<checker::ViolationKind, usize>,
    /// The first violations, with details.
    violations: Vec<Violation>,
    /// What failed outside the history: read models, projections, the query API, faults.
    platform_failures: Vec<String>,
    /// Role logs, and the history when something failed.
    logs: PathBuf,
}

pub async fn run(args: &LoadHistoryArgs) -> anyhow::Result<()> {
    if args.clients == 0 || args.duration == 0 || args.fault_every == 0 {
        bail!("--clients, --duration and --fault-every must be positive");
    }
    let rate = args.rate.or(args.kafka.then_some(KAFKA_RATE)).unwrap_or(0);
    let logs = std::env::temp_dir().join(format!("cloudphone-load-history-{}", std::process::id()));
    std::fs::create_dir_all(&logs).with_context(|| format!("create {}", logs.display()))?;
    println!(
        "load history: {} clients ({} users), {} s with a fault every {} s, {} mode, seed {}; logs in {}",
        args.clients,
        args.clients * USERS_PER_CLIENT,
        args.duration,
        args.fault_every,
        if args.kafka { "Kafka" } else { "embedded" },
        args.seed,
        logs.display()
    );

    let cluster = ScratchPostgres::fresh().await.context("a scratch PostgreSQL cluster")?;
    let pool = recreate_database(&cluster.url("postgres"), DATABASE, 4).await?;
    read_models::migrate(&pool).await.context("read model migrations")?;
    let broker = match args.kafka {
        true => Some(Broker::fresh(&logs.join("broker")).await.context("a broker")?),
        false => None,
    };
    let stop = CancellationToken::new();
    let role_names: Vec<&str> = if args.kafka {
        vec!["command-api", "projector-1", "projector-2", "query-api", "relay"]
    } else {
        vec!["command-api", "projector", "query-api"]
    };
    let upstream = format!("127.0.0.1:{}", cluster.port).parse()?;
    let proxy = Proxy::start(upstream, &role_names, &stop).await?;
    let supervisor = Supervisor::new(&logs)?;
    let platform = Arc::new(Platform {
        cluster,
        broker,
        proxy,
        supervisor: supervisor.clone(),
    });
    // Interrupted (Ctrl-C, or SIGTERM from a test runner's timeout): the roles, the cluster
    // and the broker are cleaned up all the same.
    let outcome = tokio::select! {
        outcome = drive(args, rate, &platform, &pool, &logs, &stop) => outcome,
        () = interrupted() => Err(anyhow::anyhow!("interrupted (logs in {})", logs.display())),
    };
    supervisor.kill_all();
    stop.cancel();
    pool.close().await;
    // The cluster and the broker go with the last reference to the platform (the fault
    // schedule holds another until the token stops it), before their directories go.
    drop(platform);
    let report = outcome?;
    print(&report);
    if let Some(path) = &args.json {
        write_json(path, &report)?;
        println!("  report written to {}", path.display());
    }
    if report.violation_count > 0 || !report.platform_failures.is_empty() {
        bail!(
            "{} violations of the history, {} platform failures (logs and history in {})",
            report.violation_count,
            report.platform_failures.len(),
            report.logs.display()
        );
    }
    // Nothing to look at: the role logs go.
    let _ = std::fs::remove_dir_all(&logs);
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn interrupted() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

/// Starts the roles, provisions the users, runs the load with faults, settles and checks.
async fn drive(
    args: &LoadHistoryArgs,
    rate: u64,
    platform: &Arc<Platform>,
    pool: &PgPool,
    logs: &std::path::Path,
    stop: &CancellationToken,
) -> anyhow::Result<Report> {
    let supervisor = &platform.supervisor;
    for spec in role_specs(args, platform)? {
        supervisor.add(spec)?;
    }
    tokio::spawn(supervisor.clone().monitor(stop.clone()));
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(args.request_timeout + 3))
        .connect_timeout(Duration::from_secs(2))
        .build()?;
    for name in supervisor.names() {
        supervisor.ready(&name, &http, START_LIMIT).await?;
    }
    let command_base = supervisor.spec("command-api").context("the command API")?.base();
    let query_base = supervisor.spec("query-api").context("the query API")?.base();

    let hard_stop = CancellationToken::new();
    let portal = Portal {
        http: http.clone(),
        base: command_base,
        admin_token: load_token(&Uuid::now_v7().to_string(), Role::Admin)?,
        clock: Clock(Instant::now()),
        pause: match rate {
            0 => Duration::ZERO,
            rate => Duration::from_secs_f64(args.clients as f64 / rate as f64),
        },
        give_up: Duration::from_secs(20),
        abandon_percent: 5,
        invalid_percent: 8,
        hard_stop: hard_stop.clone(),
    };
    let mut history: Vec<Operation> = Vec::new();
    let mut tenants_by_client = Vec::new();
    for client in 0..args.clients {
        let mut tenants = Vec::new();
        for _ in 0..USERS_PER_CLIENT {
            let user = Uuid::now_v7();
            let tenant = Tenant::new(user, load_token(&user.to_string(), Role::User)?);
            history.extend(portal.provision(client, &tenant, args.seed).await?);
            tenants.push(tenant);
        }
        tenants_by_client.push(tenants);
    }

    // The load, with faults.
    let began = Instant::now();
    let stop_clients = CancellationToken::new();
    let stop_faults = CancellationToken::new();
    let drivers: Vec<_> = tenants_by_client
        .into_iter()
        .enumerate()
        .map(|(client, tenants)| {
            let seed = args.seed.wrapping_mul(1_000_003).wrapping_add(client as u64);
            tokio::spawn(portal.clone().drive(client, tenants, seed, stop_clients.clone()))
        })
        .collect();
    let schedule = tokio::spawn(faults::schedule(
        Arc::clone(platform),
        args.kafka,
        Duration::from_secs(args.fault_every),
        args.seed,
        began,
        stop_faults.clone(),
        stop.clone(),
    ));
    let mut progress = Progress::new("load with faults", args.duration);
    while began.elapsed() < Duration::from_secs(args.duration) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        progress.set(began.elapsed().as_secs().min(args.duration));
    }
    progress.finish();
    // The first round of faults finishes even past --duration: every kind happens.
    stop_faults.cancel();
    let faults = schedule.await.context("the fault schedule")?;
    let load_seconds = began.elapsed().as_secs_f64();
    stop_clients.cancel();
    let mut platform_failures: Vec<String> = faults
        .iter()
        .filter_map(|f| f.error.as_ref().map(|e| format!("fault {:?}: {e}", f.kind)))
        .collect();
    platform.heal().await.context("healing the platform")?;
    let grace = tokio::spawn({
        let hard_stop = hard_stop.clone();
        async move {
            tokio::time::sleep(GRACE).await;
            hard_stop.cancel();
        }
    });
    for driver in drivers {
        history.extend(driver.await.context("a portal client panicked")?);
    }
    grace.abort();
    let load_ended = Instant::now();

    // The log is final once the command API has stopped (gracefully: appends in flight finish).
    supervisor.ready("command-api", &http, START_LIMIT).await?;
    supervisor.terminate("command-api", Duration::from_secs(30)).await?;
    let reader = LogReader::new(pool.clone());
    let head = reader.head().await?.position;
    let limit = CATCH_UP_LIMIT.max(Duration::from_secs(args.duration));
    let projections_caught_up_seconds = match reach(pool, head, limit).await {
        Ok(()) => Some(load_ended.elapsed().as_secs_f64()),
        Err(error) => {
            platform_failures.push(format!("{error:#}"));
            None
        }
    };
    let log = read_log(&reader, head).await?;
    history.sort_by_key(|op| (op.invoked_us, op.client));
    for (id, op) in history.iter_mut().enumerate() {
        op.id = id;
    }
    let checked = checker::check(&history, &log, Utc::now());
    let read_models_equal_a_rebuild = match read_models_differ(&reader, pool, head).await? {
        None => true,
        Some(difference) => {
            platform_failures.push(format!("read models differ from a rebuild: {difference}"));
            false
        }
    };
    let query_api_reads_its_writes = match reads_its_writes(&http, &query_base, head).await {
        Ok(()) => true,
        Err(error) => {
            platform_failures.push(format!("{error:#}"));
            false
        }
    };
    if !checked.violations.is_empty() || !platform_failures.is_empty() {
        dump(logs, &history, &log)?;
    }

    let mut faults_by_kind = BTreeMap::new();
    for fault in &faults {
        *faults_by_kind.entry(fault.kind).or_insert(0) += 1;
    }
    for kind in FaultKind::all(args.kafka) {
        if !faults_by_kind.contains_key(&kind) {
            platform_failures.push(format!("no {kind:?} fault happened"));
        }
    }
    let violations_by_kind = checker::by_kind(&checked.violations);
    Ok(Report {
        seed: args.seed,
        kafka: args.kafka,
        clients: args.clients,
        users: args.clients * USERS_PER_CLIENT,
        load_seconds,
        fault_every_seconds: args.fault_every,
        request_timeout_seconds: args.request_timeout,
        operations: summarize(&history),
        faults_by_kind,
        faults,
        roles: supervisor.histories(),
        proxy: platform.proxy.stats(),
        log_events: log.len(),
        projections_caught_up_seconds,
        read_models_equal_a_rebuild,
        query_api_reads_its_writes,
        checker: checked.tally,
        violation_count: checked.violations.len(),
        violations_by_kind,
        violations: checked.violations.into_iter().take(LISTED).collect(),
        platform_failures,
        logs: logs.to_owned(),
    })
}

/// Every role on a port of its own, its database URL through its own link of the proxy.
fn role_specs(args: &LoadHistoryArgs, platform: &Platform) -> anyhow::Result<Vec<RoleSpec>> {
    let mut specs = Vec::new();
    for name in platform.proxy.names() {
        let link = platform.proxy.address(name).context("a proxy link")?;
        let port = free_port()?;
        let listen = format!("127.0.0.1:{port}");
        let verb = match name {
            "command-api" => "command-api",
            "query-api" => "query-api",
            "relay" => "relay",
            _ => "projector",
        };
        let mut env: Vec<(String, String)> = [
            (
                "CLOUDPHONE_DATABASE_URL",
                format!("postgres://postgres@{link}/{DATABASE}"),
            ),
            ("CLOUDPHONE_DATABASE_MAX_CONNECTIONS", "8".to_owned()),
            // Migrated by the run before any role starts.
            ("CLOUDPHONE_MIGRATE_ON_START", "false".to_owned()),
            ("CLOUDPHONE_JWT_SECRET", SECRET.to_owned()),
            // Kafka assignments and restarts, to tell a stalled consumer group from a bug.
            (
                "CLOUDPHONE_LOG",
                "warn,kafka_adapters::projector=info,kafka_adapters::relay=info".to_owned(),
            ),
            ("CLOUDPHONE_LOG_FORMAT", "text".to_owned()),
            ("CLOUDPHONE_RATE_LIMIT", "1000000".to_owned()),
            ("CLOUDPHONE_REQUEST_TIMEOUT", args.request_timeout.to_string()),
            ("CLOUDPHONE_COMMAND_LISTEN", "127.0.0.1:0".to_owned()),
            ("CLOUDPHONE_QUERY_LISTEN", "127.0.0.1:0".to_owned()),
            ("CLOUDPHONE_OPS_LISTEN", "127.0.0.1:0".to_owned()),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect();
        let listener = match verb {
            "command-api" => "CLOUDPHONE_COMMAND_LISTEN",
            "query-api" => "CLOUDPHONE_QUERY_LISTEN",
            _ => "CLOUDPHONE_OPS_LISTEN",
        };
        env.push((listener.to_owned(), listen));
        if let Some(broker) = &platform.broker
            && matches!(verb, "projector" | "relay")
        {
            env.push(("CLOUDPHONE_KAFKA_BROKERS".to_owned(), broker.address()));
            env.push(("CLOUDPHONE_KAFKA_TOPIC".to_owned(), TOPIC.to_owned()));
            env.push(("CLOUDPHONE_KAFKA_PARTITIONS".to_owned(), "4".to_owned()));
            if verb == "projector" {
                // Static members: a worker killed and restarted takes its partitions back
                // without a rebalance, as a StatefulSet's pods do.
                env.push(("CLOUDPHONE_KAFKA_INSTANCE_ID".to_owned(), format!("history-{name}")));
            }
        }
        specs.push(RoleSpec {
            name: name.to_owned(),
            verb,
            port,
            env,
        });
    }
    Ok(specs)
}

/// Waits until every projection has applied `head`.
async fn reach(pool: &PgPool, head: i64, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    let mut progress = Progress::new("projections to the head", u64::try_from(head).unwrap_or(0));
    loop {
        let applied = applied(pool).await?;
        progress.set(u64::try_from(applied.min(head)).unwrap_or(0));
        if applied >= head {
            progress.finish();
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the projections applied {applied} of {head} events in {limit:?}: {}",
                bookkeeping(pool).await
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The projections' and the relay's bookkeeping, to say where a projection stopped.
async fn bookkeeping(pool: &PgPool) -> String {
    let mut parts = Vec::new();
    for (label, statement) in [
        (
            "checkpoints",
            "SELECT projection || ' ' || position FROM projection_checkpoints ORDER BY 1",
        ),
        (
            "offsets",
            "SELECT projection || ' p' || partition || ' next ' || next_offset || ' at ' || last_position \
             FROM projection_offsets ORDER BY 1",
        ),
        (
            "relay",
            "SELECT relay || ' ' || position FROM relay_checkpoints ORDER BY 1",
        ),
        (
            "relay partitions",
            "SELECT 'p' || partition || ' last ' || last_offset || ' at ' || last_position \
             FROM relay_partitions ORDER BY 1",
        ),
    ] {
        let rows: Vec<String> = sqlx::query_scalar(statement)
            .fetch_all(pool)
            .await
            .unwrap_or_else(|error| vec![error.to_string()]);
        parts.push(format!("{label}: [{}]", rows.join(", ")));
    }
    parts.join("; ")
}

/// The whole log up to `head`, in position order.
async fn read_log(reader: &LogReader, head: i64) -> anyhow::Result<Vec<LoggedEvent>> {
    let mut log = Vec::with_capacity(usize::try_from(head).unwrap_or(0));
    let mut after = 0;
    while after < head {
        let page = reader.read_all(after, 10_000.min(head - after)).await?;
        let Some(last) = page.last() else {
            break;
        };
        after = last.position;
        log.extend(page.iter().map(LoggedEvent::from_envelope));
    }
    Ok(log)
}

/// The query API answers a read at the log's head (it recovered from every fault).
async fn reads_its_writes(http: &reqwest::Client, base: &str, head: i64) -> anyhow::Result<()> {
    let token = load_token(&Uuid::now_v7().to_string(), Role::Admin)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answer = http
            .post(format!("{base}/graphql"))
            .bearer_auth(&token)
            .header("x-min-position", head.to_string())
            .json(&json!({"query": "{ devices(first: 1) { totalCount } }"}))
            .send()
            .await;
        let seen = match answer {
            Ok(answer) => {
                let status = answer.status();
                let body: Value = answer.json().await.unwrap_or_default();
                if status.is_success() && body["errors"].is_null() {
                    return Ok(());
                }
                format!("{status}: {body}")
            }
            Err(error) => error.to_string(),
        };
        if Instant::now() > deadline {
            bail!("the query API did not answer a read at the head ({head}): {seen}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Writes the history and the log where the role logs are, for a closer look.
fn dump(logs: &std::path::Path, history: &[Operation], log: &[LoggedEvent]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut file = std::io::BufWriter::new(std::fs::File::create(logs.join("history.ndjson"))?);
    for op in history {
        serde_json::to_writer(&mut file, op)?;
        file.write_all(b"\n")?;
    }
    file.flush()?;
    let mut file = std::io::BufWriter::new(std::fs::File::create(logs.join("log.ndjson"))?);
    for event in log {
        let line = json!({
            "position": event.position,
            "stream_id": event.stream_id,
            "stream_type": event.stream_type,
            "stream_version": event.stream_version,
            "event_type": event.event_type,
            "key": event.key,
        });
        serde_json::to_writer(&mut file, &line)?;
        file.write_all(b"\n")?;
    }
    file.flush()?;
    Ok(())
}

fn summarize(history: &[Operation]) -> OperationsReport {
    let mut report = OperationsReport {
        total: history.len(),
        ..OperationsReport::default()
    };
    for op in history {
        *report
            .by_command
            .entry(op.request.name())
            .or_default()
            .entry(op.outcome.label())
            .or_insert(0) += 1;
        report.retried += usize::from(op.attempts > 1);
        for (reason, count) in &op.retried_after {
            *report.retries_by_reason.entry(reason.clone()).or_insert(0) += u64::from(*count);
        }
        match &op.outcome {
            Outcome::Acknowledged { .. } => report.acknowledged += 1,
            Outcome::Refused { code, .. } => {
                report.refused += 1;
                *report.refusals_by_code.entry(code.clone()).or_insert(0) += 1;
            }
            Outcome::Indeterminate { reason } => {
                report.indeterminate += 1;
                *report.indeterminate_by_reason.entry(reason.clone()).or_insert(0) += 1;
            }
        }
    }
    report
}

fn print(report: &Report) {
    let ops = &report.operations;
    println!(
        "\n  {} operations in {:.0} s: {} acknowledged, {} refused, {} indeterminate; {} retried after a 503 or a transport error",
        ops.total, report.load_seconds, ops.acknowledged, ops.refused, ops.indeterminate, ops.retried
    );
    for (command, outcomes) in &ops.by_command {
        println!("    {command:<10} {outcomes:?}");
    }
    println!("  refusals by code: {:?}", ops.refusals_by_code);
    if !ops.retries_by_reason.is_empty() {
        println!("  attempts retried after: {:?}", ops.retries_by_reason);
    }
    if !ops.indeterminate_by_reason.is_empty() {
        println!("  given up after: {:?}", ops.indeterminate_by_reason);
    }
    println!(
        "  faults: {} ({})",
        report.faults.len(),
        report
            .faults_by_kind
            .iter()
            .map(|(kind, n)| format!(
                "{} {n}",
                serde_json::to_value(kind)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for (role, history) in &report.roles {
        println!(
            "    {role:<12} started {} times, killed {}, exited by itself {}",
            history.starts,
            history.kills,
            history.exits.len()
        );
        for exit in history.exits.iter().take(3) {
            println!("      exit: {exit}");
        }
    }
    let tally = &report.checker;
    println!(
        "  log: {} events; projections at the head {} after the load; read models equal a rebuild: {}; query API reads at the head: {}",
        report.log_events,
        report
            .projections_caught_up_seconds
            .map_or("never".to_owned(), |s| format!("{s:.1} s")),
        if report.read_models_equal_a_rebuild {
            "yes"
        } else {
            "NO"
        },
        if report.query_api_reads_its_writes { "yes" } else { "NO" },
    );
    println!(
        "  checker: {} refusals justified by the streams' state, {} by the request; {} acknowledged no-ops; {} indeterminate applied, {} not",
        tally.refusals_justified_by_state,
        tally.refusals_justified_by_route,
        tally.acknowledged_no_ops,
        tally.indeterminate_applied,
        tally.indeterminate_not_applied
    );
    println!(
        "  violations: {} {:?}",
        report.violation_count, report.violations_by_kind
    );
    for violation in report.violations.iter().take(20) {
        println!("    {:?}: {}", violation.kind, violation.detail);
    }
    for failure in &report.platform_failures {
        println!("  FAILED: {failure}");
    }
}
