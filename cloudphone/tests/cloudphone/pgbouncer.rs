//! Roles through PgBouncer in transaction mode (ops/dev/pgbouncer.sh), as the deploy topology
//! runs them: the command API, the query API and the embedded projectors under the load of
//! portal clients, a dashboard and a live subscription, with sqlx's prepared statements, the
//! idempotency probe and group commit all going through the pooler. What cannot work there
//! (migrations and the relay's leadership under session advisory locks, a replay's session,
//! the query API's statement timeout sent at connect) is refused at start in one line;
//! `LISTEN` degrades to polling, which the live subscription proves. And PgBouncer killed
//! under load costs 503s, never an acknowledged command.

use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::PgPool;
use test_support::live::LiveClient;
use test_support::roles::{RoleProcess, init_test_logs};
use test_support::urls;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::portal::{Tally, admin_token, assert_acks_in_log, await_acks, dashboard, provision, spawn_drivers};
use crate::readonly::refusal;
use crate::support::{CLOUDPHONE, assert_read_models_equal_a_rebuild, projections_reach};

/// Roles told not to migrate: behind the pooler, `cloudphone migrate` runs directly.
const NOT_MIGRATING: [(&str, &str); 1] = [("CLOUDPHONE_MIGRATE_ON_START", "false")];

async fn database_name(pool: &PgPool) -> String {
    sqlx::query_scalar("SELECT current_database()")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The query API's statement timeout, which a pooler cannot carry at connect, set by the
/// server for the database (new server connections take it).
async fn set_statement_timeout(pool: &PgPool) {
    let name = database_name(pool).await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE \"{name}\" SET statement_timeout = '5500ms'"
    )))
    .execute(pool)
    .await
    .unwrap();
}

/// Runs commands on PgBouncer's admin console with psql (the console speaks only the simple
/// protocol); returns what it printed, `|`-separated with a header line.
fn pgbouncer_console(commands: &[&str]) -> String {
    let port = std::env::var("CLOUDPHONE_PGBOUNCER_PORT").unwrap_or_else(|_| "6432".into());
    let mut psql = Command::new("psql");
    psql.args([
        &format!("postgres://postgres@127.0.0.1:{port}/pgbouncer"),
        "-A",
        "-F",
        "|",
    ]);
    for command in commands {
        psql.args(["-c", command]);
    }
    let output = psql.stdin(Stdio::null()).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

/// Closes PgBouncer's server connections to the test's database when dropped, however the
/// test ends: it keeps idle ones for minutes, and they would stop `#[sqlx::test]` dropping
/// the database ("being accessed by other users").
struct ServerConnectionsClosed(String);

impl Drop for ServerConnectionsClosed {
    fn drop(&mut self) {
        let name = &self.0;
        // KILL pauses the database in PgBouncer until RESUME.
        let _ = std::panic::catch_unwind(|| pgbouncer_console(&[&format!("KILL {name}"), &format!("RESUME {name}")]));
    }
}

/// Transactions PgBouncer has run for `database` since it started (`SHOW STATS`).
fn pooled_transactions(database: &str) -> i64 {
    let text = pgbouncer_console(&["SHOW STATS"]);
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split('|').collect();
    let column = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let (database_column, transactions_column) = (column("database"), column("total_xact_count"));
    lines
        .map(|line| line.split('|').collect::<Vec<_>>())
        .find(|row| row.get(database_column) == Some(&database))
        .map_or(0, |row| row[transactions_column].parse().unwrap())
}

/// The command API, the query API and the projectors, each its own process and each on the
/// test's database through PgBouncer, under 8 portal clients starting and stopping 3 devices
/// each, a dashboard polling, and an admin watching the device count live. Every command is
/// acknowledged once and is in the log, nothing else is; a key sent again is answered as the
/// first time; the projectors (polling) reach the head and equal a rebuild; the query API
/// reads its writes; the subscription (fed by polled checkpoints) sees the final count; and
/// PgBouncer ran the transactions.
#[sqlx::test(migrations = false)]
async fn the_roles_run_through_pgbouncer_under_load(pool: PgPool) {
    init_test_logs();
    // Directly: migrations hold a session advisory lock.
    test_support::db::migrated(&pool).await;
    set_statement_timeout(&pool).await;
    let database = database_name(&pool).await;
    let _closed = ServerConnectionsClosed(database.clone());
    let pooled = urls::pooled_database(&pool).await;
    let transactions_before = pooled_transactions(&database);
    let dir = tempfile::tempdir().unwrap();
    let mut command_api = RoleProcess::start(CLOUDPHONE, "command-api", &pooled, &NOT_MIGRATING, dir.path());
    let mut query_api = RoleProcess::start(CLOUDPHONE, "query-api", &pooled, &NOT_MIGRATING, dir.path());
    let mut projector = RoleProcess::start(CLOUDPHONE, "projector", &pooled, &NOT_MIGRATING, dir.path());
    let command = command_api.address("command API listening").await;
    let query = query_api.address("query API listening").await;
    let polling = |who: &'static str| {
        move |entry: &Value| {
            entry["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("behind a transaction pooler") && m.contains(who))
        }
    };
    projector.logged("that it polls the log", polling("projectors")).await;
    query_api
        .logged("that it polls checkpoints", polling("subscriptions"))
        .await;

    // An admin watches the device count live before any device exists.
    let mut watcher = LiveClient::connect(query.trim_start_matches("http://").parse().unwrap(), &admin_token()).await;
    watcher
        .subscribe("count", "subscription { devices(first: 1) { totalCount } }", json!({}))
        .await;
    assert_eq!(watcher.next_of("count").await["data"]["devices"]["totalCount"], "0");

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut tenants = provision(&client, &command, 9, 3).await;
    // One tenant is kept out of the load for the idempotency probe.
    let probe = tenants.pop().unwrap();

    // The same command and key twice: one event, the same answer.
    let key = Uuid::now_v7().to_string();
    let mut answers = Vec::new();
    for _ in 0..2 {
        let answer = client
            .post(format!("{command}/v1/devices/{}/start", probe.devices[0]))
            .bearer_auth(&probe.token)
            .header("idempotency-key", &key)
            .send()
            .await
            .unwrap();
        assert_eq!(
            answer.status(),
            200,
            "{:?}\n{}",
            answer.text().await,
            std::fs::read_to_string(&command_api.log).unwrap_or_default()
        );
        answers.push(answer.json::<Value>().await.unwrap());
    }
    assert_eq!(
        answers[0], answers[1],
        "a repeated key was not answered as the first time"
    );
    assert_eq!(answers[0]["stream_version"], 2, "{}", answers[0]);

    let tally = Arc::new(Mutex::new(Tally::default()));
    let done = CancellationToken::new();
    let drivers = spawn_drivers(&client, &command, &tenants, Duration::ZERO, &tally, &done);
    let reader = tokio::spawn(dashboard(client.clone(), query.clone(), done.clone()));
    let began = Instant::now();
    await_acks(&tally, began, 1_500, Duration::from_secs(90)).await;
    let loaded = began.elapsed();
    done.cancel();
    for driver in drivers {
        driver.await.unwrap();
    }
    let dashboard_seen = reader.await.unwrap();
    for role in [&mut command_api, &mut query_api, &mut projector] {
        role.assert_alive();
    }

    let tally = Arc::try_unwrap(tally).unwrap().into_inner().unwrap();
    assert!(tally.failures.is_empty(), "clients failed: {:#?}", tally.failures);
    assert!(tally.refused.is_empty(), "clients were refused: {:#?}", tally.refused);
    assert!(
        tally.unavailable.is_empty(),
        "{} commands were answered 503",
        tally.unavailable.len()
    );
    let failed_reads: Vec<_> = dashboard_seen
        .iter()
        .filter(|(status, _)| *status != 200)
        .take(3)
        .collect();
    assert!(failed_reads.is_empty(), "the dashboard got {failed_reads:#?}");
    assert_acks_in_log(&pool, &tally.acks, &tenants).await;
    let probe_version: i64 = sqlx::query_scalar("SELECT version FROM streams WHERE stream_id = $1")
        .bind(probe.devices[0])
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(probe_version, 2, "the repeated key appended again");

    let head = event_log::LogReader::new(pool.clone()).head().await.unwrap().position;
    projections_reach(&pool, head, Duration::from_secs(60)).await;
    assert_read_models_equal_a_rebuild(&pool).await;

    // The query API reads its writes through the pooler.
    let devices = (9 * 3).to_string();
    let answer: Value = client
        .post(format!("{query}/graphql"))
        .bearer_auth(admin_token())
        .header("x-min-position", head.to_string())
        .json(&json!({"query": "{ devices(first: 1) { totalCount } }"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["data"]["devices"]["totalCount"], devices, "{answer}");
    watcher
        .next_until("count", |answer| {
            answer["data"]["devices"]["totalCount"] == devices.as_str()
        })
        .await;

    let transactions = pooled_transactions(&database) - transactions_before;
    assert!(
        transactions >= tally.acks.len() as i64,
        "PgBouncer ran {transactions} transactions for {} acknowledged commands: the roles bypassed it",
        tally.acks.len()
    );
    for role in [&command_api, &query_api, &projector] {
        let errors: Vec<Value> = role
            .entries()
            .into_iter()
            .filter(|e| e["level"] == "ERROR" || e["message"] == "internal error")
            .collect();
        assert!(errors.is_empty(), "{} logged errors: {errors:#?}", role.log.display());
    }
    eprintln!(
        "through PgBouncer: {} commands acknowledged in {loaded:?} ({:.0}/s, slowest {:?}), \
         {} dashboard queries, {transactions} pooled transactions",
        tally.acks.len(),
        tally.acks.len() as f64 / loaded.as_secs_f64(),
        tally.slowest,
        dashboard_seen.len()
    );
}

fn cloudphone(url: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(CLOUDPHONE);
    command
        .args(args)
        .env("CLOUDPHONE_DATABASE_URL", url)
        .env("CLOUDPHONE_COMMAND_LISTEN", "127.0.0.1:0")
        .env("CLOUDPHONE_QUERY_LISTEN", "127.0.0.1:0")
        .env("CLOUDPHONE_OPS_LISTEN", "127.0.0.1:0")
        .env("CLOUDPHONE_LOG", "error")
        .env("CLOUDPHONE_LOG_FORMAT", "json")
        .stdin(Stdio::null());
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().unwrap()
}

/// Pointed through PgBouncer, whatever needs a session of its own refuses to start, in one
/// line that says why and what to do, before it changes anything: `migrate`, `serve` and a
/// role that migrates on start (a session advisory lock around the migrations), the relay
/// (session-lock leadership and LISTEN), a replay (a session lock for its whole run), and the
/// query API on a server that sets no statement timeout (it cannot send its own at connect).
#[sqlx::test(migrations = false)]
async fn what_needs_a_session_refuses_pgbouncer_at_start(pool: PgPool) {
    let _closed = ServerConnectionsClosed(database_name(&pool).await);
    let pooled = urls::pooled_database(&pool).await;
    let migrating = [("CLOUDPHONE_MIGRATE_ON_START", "true")];
    for args in [&["migrate"][..], &["serve"], &["command-api"]] {
        let line = refusal(args, &cloudphone(&pooled, args, &migrating));
        assert!(
            line.contains("transaction pooler")
                && line.contains("run `cloudphone migrate` against PostgreSQL directly"),
            "{args:?}: {line}"
        );
    }
    let tables: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(tables, 0, "a refused verb changed the schema");

    test_support::db::migrated(&pool).await;
    let relay = [
        ("CLOUDPHONE_MIGRATE_ON_START", "false"),
        ("CLOUDPHONE_KAFKA_BROKERS", "127.0.0.1:9"),
    ];
    let line = refusal(&["relay"], &cloudphone(&pooled, &["relay"], &relay));
    assert!(line.contains("the relay leads under a session advisory lock"), "{line}");
    let line = refusal(&["replay", "fleet"], &cloudphone(&pooled, &["replay", "fleet"], &[]));
    assert!(line.contains("a replay holds a session advisory lock"), "{line}");
    let line = refusal(&["query-api"], &cloudphone(&pooled, &["query-api"], &NOT_MIGRATING));
    assert!(
        line.contains("cannot carry the query API's statement_timeout") && line.contains("ALTER ROLE"),
        "{line}"
    );
    let rebuilds: i64 = sqlx::query_scalar("SELECT count(*) FROM projection_rebuilds")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rebuilds, 0, "the refused replay started a rebuild");

    // The same verbs connected directly are not refused for it.
    let direct = urls::database(&pool).await;
    let replayed = cloudphone(&direct, &["replay", "fleet"], &[]);
    assert!(
        replayed.status.success(),
        "a direct replay failed: {}",
        String::from_utf8_lossy(&replayed.stderr)
    );
}

/// A PgBouncer of the test's own (ops/dev/pgbouncer.sh on a free port), destroyed when
/// dropped: the shared one stays up for the other tests.
struct OwnPgBouncer {
    port: u16,
}

impl OwnPgBouncer {
    async fn start() -> Self {
        let port = test_support::services::free_port();
        let own = OwnPgBouncer { port };
        assert!(own.run("ensure").await, "cannot start PgBouncer on port {port}");
        own
    }

    async fn run(&self, action: &str) -> bool {
        let port = self.port.to_string();
        tokio::task::spawn_blocking({
            let action = action.to_owned();
            move || {
                Command::new(test_support::services::ops_script("pgbouncer.sh"))
                    .arg(action)
                    .env("CLOUDPHONE_PGBOUNCER_PORT", port)
                    .stdin(Stdio::null())
                    .status()
                    .is_ok_and(|status| status.success())
            }
        })
        .await
        .unwrap()
    }
}

impl Drop for OwnPgBouncer {
    fn drop(&mut self) {
        let _ = Command::new(test_support::services::ops_script("pgbouncer.sh"))
            .arg("destroy")
            .env("CLOUDPHONE_PGBOUNCER_PORT", self.port.to_string())
            .stdin(Stdio::null())
            .status();
    }
}

/// The command API through PgBouncer under 6 portal clients; PgBouncer is killed (`kill -9`:
/// every client and server connection cut, transactions in flight rolled back) and started
/// again 3 s later. Meanwhile commands are answered 503 with Retry-After, never 500; the
/// process stays up; once PgBouncer is back, commands are acknowledged again without a
/// restart; every acknowledged command is in the log once and nothing else was written (a
/// 503 whose write had committed is answered by the retry with the same key).
#[sqlx::test(migrations = false)]
async fn a_pgbouncer_killed_under_load_costs_503s_and_loses_nothing_acknowledged(pool: PgPool) {
    init_test_logs();
    test_support::db::migrated(&pool).await;
    let bouncer = OwnPgBouncer::start().await;
    let database = database_name(&pool).await;
    let url = format!("postgres://postgres@127.0.0.1:{}/{database}", bouncer.port);
    let dir = tempfile::tempdir().unwrap();
    let mut command_api = RoleProcess::start(CLOUDPHONE, "command-api", &url, &NOT_MIGRATING, dir.path());
    let command = command_api.address("command API listening").await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let tenants = provision(&client, &command, 6, 2).await;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let done = CancellationToken::new();
    let drivers = spawn_drivers(&client, &command, &tenants, Duration::from_millis(5), &tally, &done);
    await_acks(&tally, Instant::now(), 100, Duration::from_secs(60)).await;

    assert!(bouncer.run("kill").await, "PgBouncer was not killed");
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(30);
    while tally.lock().unwrap().unavailable.iter().all(|at| *at < killed) {
        assert!(
            Instant::now() < deadline,
            "no command was answered 503 while PgBouncer was down"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if let Some(rest) = Duration::from_secs(3).checked_sub(killed.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    command_api.assert_alive();
    assert!(bouncer.run("ensure").await, "PgBouncer did not start again");
    let restarted = Instant::now();
    let first_ack = await_acks(&tally, restarted, 3 * tenants.len(), Duration::from_secs(60)).await;
    done.cancel();
    for driver in drivers {
        driver.await.unwrap();
    }
    command_api.assert_alive();

    let tally = Arc::try_unwrap(tally).unwrap().into_inner().unwrap();
    assert!(tally.failures.is_empty(), "clients failed: {:#?}", tally.failures);
    assert!(tally.refused.is_empty(), "clients were refused: {:#?}", tally.refused);
    assert_acks_in_log(&pool, &tally.acks, &tenants).await;
    let internal = command_api
        .entries()
        .into_iter()
        .filter(|e| e["message"] == "internal error")
        .count();
    assert_eq!(internal, 0, "the command API answered 500 while PgBouncer was down");
    eprintln!(
        "PgBouncer killed: {} commands acknowledged, {} answered 503, first acknowledgement {:?} after the restart",
        tally.acks.len(),
        tally.unavailable.iter().filter(|at| **at >= killed).count(),
        first_ack.saturating_duration_since(restarted)
    );
}
