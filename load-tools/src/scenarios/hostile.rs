//! `cloudphone load hostile`: the platform under hostile clients, against itself when quiet.
//!
//! `cloudphone serve` runs as a child process on a fresh database. Two phases of the same
//! length, in one run:
//! - **quiet**: portal clients send commands (create, start, stop) and probes ask both APIs'
//!   `/healthz` every 20 ms;
//! - **attack**: the same, while `--connections` sockets trickle header lines at both APIs
//!   (a line every 5 s; reconnecting a second after the server cuts one off; held by child
//!   processes of this binary, 5 000 each, within any process's file-descriptor limit) and
//!   `--document-clients` clients send the worst documents we know, each kind timed on its
//!   own: fragment bombs, bracket nesting, alias floods, token floods, introspection abuse,
//!   and the heaviest documents the limits allow.
//!
//! The report compares the phases: `/healthz` p99 of both APIs (target under 50 ms while
//! attacked), portal command p99 (target within 2x of quiet), and each document kind's p99
//! (target: answered or refused in under 100 ms).

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use http_edge::auth::Role;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::cli::LoadHostileArgs;
use crate::harness::databases::recreate_database;
use crate::harness::metrics::metric;
use crate::harness::portal::register_user;
use crate::harness::report::{Latency, histogram, write_json};
use crate::harness::roles::ServeProcess;
use crate::harness::sampling::cpu_seconds;
use crate::harness::tokens::load_token;

const DATABASE: &str = "cloudphone_load_hostile";

/// The documents the attack sends, by kind: each is the worst of its class we know. Those the
/// limits refuse always; with `allowed`, also the costliest documents the limits let through.
fn hostile_documents(allowed: bool) -> Vec<(&'static str, String)> {
    let mut bomb = String::from("query Bomb { ...F0 }\n");
    for level in 0..9 {
        let spreads = format!("...F{} ", level + 1).repeat(8);
        bomb.push_str(&format!("fragment F{level} on Query {{ {spreads} }}\n"));
    }
    bomb.push_str("fragment F9 on Query { projectionStatus { name position head } }\n");
    let nesting = format!("{{ devices(filter: {}) {{ totalCount }} }}", "[".repeat(20_000));
    let aliases: String = (0..3_000).map(|i| format!("a{i}:__typename ")).collect();
    let tokens = format!("{{ {} }}", "projectionStatus { name } ".repeat(2_400));
    let introspection_aliases: String = (0..200)
        .map(|i| format!("i{i}: __schema {{ types {{ name fields {{ name }} }} }} "))
        .collect();
    let introspection_lists =
        "{ __schema { types { fields { type { fields { type { fields { type { fields { name } } } } } } } } } }"
            .to_owned();
    let heavy: String = (0..7)
        .map(|i| {
            format!(
                "p{i}: devices(first: 100, orderBy: CREATED_AT_DESC) {{ totalCount nodes {{ id status provider cpuCores memoryMb }} }} "
            )
        })
        .collect();
    // What graphql-js 16 (GraphiQL, code generators) sends, byte for byte.
    let standard_introspection =
        include_str!("../../../query-api/tests/fixtures/introspection-graphql-js-16.graphql").to_owned();
    let mut documents = vec![
        ("fragment bomb (8^9 fields)", bomb),
        ("bracket nesting (20 000 deep)", nesting),
        ("alias flood (3 000)", format!("{{ {aliases} }}")),
        ("token flood (60 KB)", tokens),
        ("introspection aliases (200)", format!("{{ {introspection_aliases} }}")),
        ("introspection lists of lists", introspection_lists),
    ];
    if allowed {
        documents.push(("heaviest allowed (complexity 4907)", format!("{{ {heavy} }}")));
        documents.push(("standard introspection (graphql-js)", standard_introspection));
    }
    documents
}

#[derive(Debug, Serialize)]
struct PhaseReport {
    phase: &'static str,
    seconds: f64,
    command_healthz: Latency,
    query_healthz: Latency,
    /// Probes that failed (refused, timed out, not 200).
    healthz_failures: u64,
    commands: Latency,
    command_errors: BTreeMap<String, u64>,
    documents: BTreeMap<&'static str, DocumentReport>,
    /// Connections the server held open at the end of the phase, by listener.
    open_connections: BTreeMap<String, f64>,
    refused_connections: f64,
    server_cpu_seconds: f64,
}

#[derive(Debug, Serialize)]
struct DocumentReport {
    latency: Latency,
    /// Answers by `extensions.code` (or `data` when answered).
    outcomes: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize)]
struct Report {
    connections: usize,
    document_clients: usize,
    command_clients: usize,
    seconds_per_phase: u64,
    phases: Vec<PhaseReport>,
    /// Attacked command p99 over quiet command p99.
    command_p99_ratio: f64,
}

/// Sockets one attacking process holds: well within a common hard limit of open files.
const SOCKETS_PER_ATTACKER: usize = 5_000;

pub async fn run(args: &LoadHostileArgs) -> anyhow::Result<()> {
    if !args.trickle_at.is_empty() {
        return trickle_only(args).await;
    }
    let pool = recreate_database(&args.database.database_url, DATABASE, 4).await?;
    pool.close().await;
    let mut url = reqwest::Url::parse(&args.database.database_url).context("--database-url")?;
    url.set_path(&format!("/{DATABASE}"));
    let logs = std::env::temp_dir().join(format!("cloudphone-load-hostile-{}", Uuid::now_v7()));
    std::fs::create_dir_all(&logs)?;
    let server = ServeProcess::start(url.as_str(), &logs)?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .context("HTTP client")?;
    server.ready(&client).await?;
    println!(
        "load hostile: serve pid {} (log {}), {} s per phase, {} command clients",
        server.pid,
        server.log.display(),
        args.duration,
        args.command_clients
    );
    let users = register_users(&client, &server.command, args.command_clients).await?;
    let quiet = phase(args, &server, &client, &users, false).await?;
    print_phase(&quiet);
    let attacked = phase(args, &server, &client, &users, true).await?;
    print_phase(&attacked);
    server.alive()?;
    let ratio = attacked.commands.p99_ms / quiet.commands.p99_ms.max(0.001);
    println!(
        "  under attack: /healthz p99 {:.2} ms (command) / {:.2} ms (query); portal commands p99 {:.2} ms = {ratio:.2}x quiet",
        attacked.command_healthz.p99_ms, attacked.query_healthz.p99_ms, attacked.commands.p99_ms
    );
    let report = Report {
        connections: args.connections,
        document_clients: args.document_clients,
        command_clients: args.command_clients,
        seconds_per_phase: args.duration,
        phases: vec![quiet, attacked],
        command_p99_ratio: ratio,
    };
    if let Some(path) = &args.json {
        write_json(path, &report)?;
    }
    Ok(())
}

/// One registered portal user per command client, with a token.
async fn register_users(client: &reqwest::Client, command: &str, count: usize) -> anyhow::Result<Vec<String>> {
    let mut tokens = Vec::new();
    for _ in 0..count {
        tokens.push(register_user(client, command).await?.1);
    }
    Ok(tokens)
}

async fn phase(
    args: &LoadHostileArgs,
    server: &ServeProcess,
    client: &reqwest::Client,
    users: &[String],
    attacked: bool,
) -> anyhow::Result<PhaseReport> {
    let label = if attacked { "attack" } else { "quiet" };
    let done = CancellationToken::new();
    let cpu_before = cpu_seconds(server.pid).unwrap_or(0.0);
    let mut attackers = Vec::new();
    let mut documents = Vec::new();
    // Dropped after the senders are awaited, at the end of the phase.
    let senders = match attacked {
        true => Some(IdleRuntime::new(2).context("document clients' threads")?),
        false => None,
    };
    if attacked {
        let targets = format!(
            "{},{}",
            server.command.trim_start_matches("http://"),
            server.query.trim_start_matches("http://")
        );
        let mut left = args.connections;
        while left > 0 {
            let share = left.min(SOCKETS_PER_ATTACKER);
            attackers.push(Attacker::start(&targets, share)?);
            left -= share;
        }
        // Let the sockets connect before the clock starts (the server holds what its
        // file-descriptor limit allows; the rest keep reconnecting).
        let deadline = Instant::now() + Duration::from_secs(30);
        let wanted =
            (args.connections as f64 * 0.9).min(2.0 * http_edge::connections::default_max_connections() as f64 * 0.9);
        while open_connections(client, server).await.values().sum::<f64>() < wanted {
            if Instant::now() > deadline {
                println!("  (not every trickling socket connected within 30 s; measuring anyway)");
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let kinds = Arc::new(hostile_documents(args.with_allowed));
        let admin = load_token(&Uuid::from_u128(0xad).to_string(), Role::Admin)?;
        // The document clients run on threads of their own under SCHED_IDLE, like the
        // attacking processes, with connections of their own: the probes and portal clients
        // measure the server, not a CPU queue behind the generator's own work.
        let senders = senders.as_ref().context("document clients' threads")?;
        let documents_client = reqwest::Client::builder()
            .pool_max_idle_per_host(args.document_clients)
            .build()
            .context("HTTP client")?;
        for i in 0..args.document_clients {
            let sending = send_documents(
                documents_client.clone(),
                server.query.clone(),
                admin.clone(),
                Arc::clone(&kinds),
                i,
                done.clone(),
            );
            documents.push(senders.spawn(sending));
        }
    }
    let probes: Vec<_> = [&server.command, &server.query]
        .into_iter()
        .map(|base| tokio::spawn(probe(client.clone(), format!("{base}/healthz"), done.clone())))
        .collect();
    let commanders: Vec<_> = users
        .iter()
        .map(|token| {
            tokio::spawn(portal_client(
                client.clone(),
                server.command.clone(),
                token.clone(),
                done.clone(),
            ))
        })
        .collect();
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.duration)).await;
    let open = open_connections(client, server).await;
    let refused = metric(client, &server.command, "cloudphone_http_connections_refused_total").await
        + metric(client, &server.query, "cloudphone_http_connections_refused_total").await;
    done.cancel();
    let seconds = started.elapsed().as_secs_f64();
    let mut healthz = Vec::new();
    let mut healthz_failures = 0;
    for probe in probes {
        let (latencies, failures) = probe.await?;
        healthz.push(Latency::of(&latencies));
        healthz_failures += failures;
    }
    let mut commands = histogram();
    let mut command_errors = BTreeMap::new();
    for commander in commanders {
        let (latencies, errors) = commander.await?;
        commands.add(&latencies)?;
        for (error, count) in errors {
            *command_errors.entry(error).or_insert(0) += count;
        }
    }
    let mut by_kind: BTreeMap<&'static str, (Histogram<u64>, BTreeMap<String, u64>)> = BTreeMap::new();
    for sender in documents {
        for (kind, latency, outcome) in sender.await? {
            let entry = by_kind.entry(kind).or_insert_with(|| (histogram(), BTreeMap::new()));
            entry.0.record(latency).ok();
            *entry.1.entry(outcome).or_insert(0) += 1;
        }
    }
    drop(attackers);
    let mut healthz = healthz.into_iter();
    let (Some(command_healthz), Some(query_healthz)) = (healthz.next(), healthz.next()) else {
        bail!("the health probes reported nothing");
    };
    Ok(PhaseReport {
        phase: label,
        seconds,
        command_healthz,
        query_healthz,
        healthz_failures,
        commands: Latency::of(&commands),
        command_errors,
        documents: by_kind
            .into_iter()
            .map(|(kind, (latency, outcomes))| {
                (
                    kind,
                    DocumentReport {
                        latency: Latency::of(&latency),
                        outcomes,
                    },
                )
            })
            .collect(),
        open_connections: open,
        refused_connections: refused,
        server_cpu_seconds: cpu_seconds(server.pid).unwrap_or(0.0) - cpu_before,
    })
}

/// A runtime whose threads run under SCHED_IDLE: they get only the CPU nothing else wants.
struct IdleRuntime(Option<tokio::runtime::Runtime>);

impl IdleRuntime {
    fn new(threads: usize) -> std::io::Result<Self> {
        use thread_priority::{
            NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy, set_thread_priority_and_policy,
            thread_native_id,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("hostile-documents")
            .on_thread_start(|| {
                let idle = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
                if let Err(error) = set_thread_priority_and_policy(thread_native_id(), ThreadPriority::Min, idle) {
                    tracing::warn!(?error, "the document clients' threads keep their priority");
                }
            })
            .enable_all()
            .build()?;
        Ok(IdleRuntime(Some(runtime)))
    }

    fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match &self.0 {
            Some(runtime) => runtime.spawn(task),
            None => tokio::spawn(task),
        }
    }
}

impl Drop for IdleRuntime {
    fn drop(&mut self) {
        // Not where blocking is allowed (inside the main runtime).
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// A child process of this binary holding trickling sockets (`--trickle-at`), killed when
/// dropped.
struct Attacker(Child);

impl Attacker {
    fn start(targets: &str, connections: usize) -> anyhow::Result<Self> {
        // Under SCHED_IDLE (chrt, util-linux): the attack's own CPU would be other machines';
        // here it takes only what the server and the measuring clients leave. A nice value is
        // not enough: a niced thread still keeps the CPU for its slice when a server thread
        // wakes, which alone doubles the portal clients' p99 on two cores.
        let child = Command::new("chrt")
            .args(["--idle", "0"])
            .arg(std::env::current_exe().context("this binary")?)
            .args(["load", "hostile", "--trickle-at", targets, "--connections"])
            .arg(connections.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start an attacking process")?;
        Ok(Attacker(child))
    }
}

impl Drop for Attacker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The attacking process: `--connections` sockets trickling at the `--trickle-at` targets in
/// turn, until killed.
async fn trickle_only(args: &LoadHostileArgs) -> anyhow::Result<()> {
    let wanted = u64::try_from(args.connections).unwrap_or(u64::MAX) + 256;
    let limit = http_edge::connections::raise_open_files_limit(wanted);
    if limit < wanted {
        bail!("this process may open {limit} files; {wanted} are needed");
    }
    let done = CancellationToken::new();
    let sockets: Vec<_> = (0..args.connections)
        .map(|i| {
            let host = args.trickle_at[i % args.trickle_at.len()].clone();
            tokio::spawn(trickle_forever(host, done.clone()))
        })
        .collect();
    for socket in sockets {
        socket.await?;
    }
    Ok(())
}

/// Keeps one socket trickling header lines at `host` (a line every 5 s, as slowloris does,
/// under any header timeout a server might count per line), reconnecting a second after the
/// server cuts it off, until `done`.
async fn trickle_forever(host: String, done: CancellationToken) {
    let mut buffer = [0u8; 512];
    // Spread the first connections over a second.
    let start = rand::random::<u64>() % 1_000;
    tokio::time::sleep(Duration::from_millis(start)).await;
    let mut first = true;
    while !done.is_cancelled() {
        if !first {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        first = false;
        let Ok(Ok(mut socket)) = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&host)).await else {
            continue;
        };
        if socket.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n").await.is_err() {
            continue;
        }
        let mut line = 0u64;
        loop {
            tokio::select! {
                () = done.cancelled() => return,
                read = socket.read(&mut buffer) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                },
                () = tokio::time::sleep(Duration::from_secs(5)) => {
                    line += 1;
                    if socket.write_all(format!("x-trickle-{line}: 1\r\n").as_bytes()).await.is_err() {
                        break;
                    }
                }
            }
        }
    }
}

/// Sends every kind of hostile document in turn (starting at `offset`) until `done`; returns
/// each answer's kind, latency (µs) and outcome.
async fn send_documents(
    client: reqwest::Client,
    query: String,
    token: String,
    kinds: Arc<Vec<(&'static str, String)>>,
    offset: usize,
    done: CancellationToken,
) -> Vec<(&'static str, u64, String)> {
    let mut answers = Vec::new();
    let mut turn = offset;
    while !done.is_cancelled() {
        let (kind, document) = &kinds[turn % kinds.len()];
        turn += 1;
        let started = Instant::now();
        let answer = client
            .post(format!("{query}/graphql"))
            .bearer_auth(&token)
            .json(&json!({"query": document}))
            .send()
            .await;
        let outcome = match answer {
            Ok(answer) => {
                let status = answer.status().as_u16();
                match answer.json::<Value>().await {
                    Ok(body) => match body["errors"][0]["extensions"]["code"].as_str() {
                        Some(code) => format!("{status} {code}"),
                        None if body["data"].is_object() => format!("{status} data"),
                        None => format!("{status} no code"),
                    },
                    Err(_) => format!("{status} not JSON"),
                }
            }
            Err(error) => format!("transport: {error}"),
        };
        answers.push((*kind, micros(started), outcome));
    }
    answers
}

/// Probes `url` every 20 ms until `done`: latencies (µs) and failures.
async fn probe(client: reqwest::Client, url: String, done: CancellationToken) -> (Histogram<u64>, u64) {
    let mut latencies = histogram();
    let mut failures = 0;
    while !done.is_cancelled() {
        let started = Instant::now();
        let ok = client
            .get(&url)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if ok {
            latencies.record(micros(started)).ok();
        } else {
            failures += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (latencies, failures)
}

/// A portal user creating, starting and stopping devices, one command at a time, with a
/// 10 ms pause between commands (a steady load, far below saturation).
async fn portal_client(
    client: reqwest::Client,
    command: String,
    token: String,
    done: CancellationToken,
) -> (Histogram<u64>, BTreeMap<String, u64>) {
    let mut latencies = histogram();
    let mut errors = BTreeMap::new();
    let mut device: Option<(String, bool)> = None;
    while !done.is_cancelled() {
        let (path, body) = match &device {
            None => (
                "/v1/devices".to_owned(),
                Some(json!({"provider": "aws", "cpu_cores": 1, "memory_mb": 1024, "android_version": 14})),
            ),
            Some((id, false)) => (format!("/v1/devices/{id}/start"), None),
            Some((id, true)) => (format!("/v1/devices/{id}/stop"), None),
        };
        let started = Instant::now();
        let mut request = client.post(format!("{command}{path}")).bearer_auth(&token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        match request.send().await {
            Ok(answer) if answer.status().is_success() => {
                latencies.record(micros(started)).ok();
                let body: Value = answer.json().await.unwrap_or_default();
                device = match device.take() {
                    None => body["id"].as_str().map(|id| (id.to_owned(), false)),
                    Some((id, running)) => Some((id, !running)),
                };
            }
            Ok(answer) => *errors.entry(answer.status().to_string()).or_insert(0) += 1,
            Err(error) => *errors.entry(format!("transport: {error}")).or_insert(0) += 1,
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (latencies, errors)
}

fn micros(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX).max(1)
}

async fn open_connections(client: &reqwest::Client, server: &ServeProcess) -> BTreeMap<String, f64> {
    let mut open = BTreeMap::new();
    for (listener, base) in [("command", &server.command), ("query", &server.query)] {
        let name = format!("cloudphone_http_connections_open{{listener=\"{listener}\"}}");
        open.insert(listener.to_owned(), metric(client, base, &name).await);
    }
    open
}

fn print_phase(report: &PhaseReport) {
    println!(
        "  {:<7} /healthz p99 {:>7.2} ms (command) {:>7.2} ms (query), {} failed; commands p99 {:>7.2} ms ({} sent, errors {:?}); open {:?}, refused {}; server CPU {:.1} s",
        report.phase,
        report.command_healthz.p99_ms,
        report.query_healthz.p99_ms,
        report.healthz_failures,
        report.commands.p99_ms,
        report.commands.count,
        report.command_errors,
        report.open_connections,
        report.refused_connections,
        report.server_cpu_seconds,
    );
    for (kind, document) in &report.documents {
        println!(
            "          {kind:<40} p50 {:>7.2} ms  p99 {:>7.2} ms  ({} sent: {:?})",
            document.latency.p50_ms, document.latency.p99_ms, document.latency.count, document.outcomes
        );
    }
}
