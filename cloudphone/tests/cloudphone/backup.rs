//! Backup and point-in-time restore, as ops/runbooks/restore-from-backup.md does them
//! (ops/dev/backup.sh: pg_basebackup, a WAL archive, recovery to a time, promotion), on
//! PostgreSQL clusters of the test's own: the restored log verifies and ends at the last
//! event before the target, the projections catch up to equal a rebuild, and an erasure the
//! restore rolled back is made again from the erasure ledger: by `cloudphone erasures
//! reapply`, or by the command API itself at start.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use event_log::{EventStore, LogReader, StoreConfig};
use http_edge::auth::Role;
use serde_json::{Value, json};
use sqlx::PgPool;
use test_support::roles::{RoleProcess, init_test_logs};
use test_support::scratch::ScratchPostgres;
use test_support::services::ops_script;
use test_support::tokens;
use uuid::Uuid;

use crate::support::{CLOUDPHONE, assert_read_models_equal_a_rebuild, projections_reach, write_history};

/// Runs a `cloudphone` verb against `url`.
fn cloudphone(url: &str, args: &[&str]) -> Output {
    Command::new(CLOUDPHONE)
        .args(args)
        .env("CLOUDPHONE_DATABASE_URL", url)
        .env("CLOUDPHONE_LOG_FORMAT", "json")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `ops/dev/backup.sh <args>`; its stdout, panicking when it fails.
async fn backup_sh(args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(ops_script("backup.sh"))
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(output.status.success(), "backup.sh failed: {}", text(&output));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Appends at least `events` device events through the event store's append path.
async fn append_history(pool: &PgPool, seed: u64, events: i64) {
    let reader = LogReader::new(pool.clone());
    let target = reader.head().await.unwrap().position + events;
    let store = Arc::new(EventStore::open(pool.clone(), StoreConfig::default()).await.unwrap());
    let done = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_history(
        Arc::clone(&store),
        Arc::clone(&done),
        seed,
        Duration::ZERO,
    ));
    let deadline = Instant::now() + Duration::from_secs(60);
    while reader.head().await.unwrap().position < target {
        assert!(Instant::now() < deadline, "history not written within 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    if let Ok(store) = Arc::try_unwrap(store) {
        store.shutdown().await;
    }
}

async fn register(client: &reqwest::Client, command: &str, user: Uuid) {
    let response = client
        .post(format!("{command}/v1/users"))
        .bearer_auth(tokens::development(&user.to_string(), Role::User))
        .json(&json!({"tier": "pro", "email": format!("{}@example.com", user.simple()), "phone": "+4915112345678"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
}

async fn erase(client: &reqwest::Client, command: &str, user: Uuid) -> reqwest::Response {
    client
        .delete(format!("{command}/v1/users/{user}"))
        .bearer_auth(tokens::development(&user.to_string(), Role::User))
        .send()
        .await
        .unwrap()
}

/// The `personal` status (`decrypted` or `erased`) of the user's registration, as
/// `cloudphone export` shows it.
fn personal_status(url: &str, user: Uuid) -> String {
    let output = cloudphone(
        url,
        &[
            "export",
            "--user",
            &user.to_string(),
            "--event-type",
            "UserRegistered",
            "-o",
            "-",
        ],
    );
    assert!(output.status.success(), "export: {}", text(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let registered: Vec<Value> = stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|event| event["event_type"] == "UserRegistered")
        .collect();
    assert_eq!(registered.len(), 1, "{stdout}");
    registered[0]["personal"]["status"].as_str().unwrap().to_owned()
}

async fn head(pool: &PgPool) -> i64 {
    LogReader::new(pool.clone()).head().await.unwrap().position
}

/// A directory the cluster's `postgres` user may enter (tempdirs are 0700, owned by root).
fn shared_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir
}

/// History, a base backup, more history, a time `T`, more history and an erasure; then the
/// backup restored to `T` on another cluster. The log verifies and ends at the last event
/// before `T`; the erased user's personal data is readable again (the restore took the
/// erasure back) until `cloudphone erasures reapply` shreds it again from the ledger
/// (idempotently); the projections catch up and equal a rebuild. A second restore, opened by
/// the command API with the ledger, is shredded before the API answers anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_to_a_point_in_time_verifies_rebuilds_and_keeps_erasures_erased() {
    init_test_logs();
    let repo_dir = shared_tempdir();
    let repo = repo_dir.path().join("repo");
    let repo_arg = repo.to_str().unwrap();
    // The ledger lives apart from the database and its backups.
    let ledger_dir = tempfile::tempdir().unwrap();
    let ledger = ledger_dir.path().join("erasures.ndjson");
    let ledger_arg = ledger.to_str().unwrap();
    let logs = tempfile::tempdir().unwrap();

    let source = ScratchPostgres::fresh().await;
    backup_sh(&["archive-on", &source.url("postgres"), repo_arg]).await;
    assert!(source.run("restart").await, "the scratch cluster did not restart");
    let url = source.url("cloudphone");
    let mut serve = RoleProcess::start(
        CLOUDPHONE,
        "serve",
        &url,
        &[("CLOUDPHONE_ERASURE_LEDGER", ledger_arg)],
        logs.path(),
    );
    let command = serve.address("command API listening").await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let pool = PgPool::connect(&url).await.unwrap();

    // Before the backup: history, and the users, one of them erased already.
    let (ada, grace, erased_early) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    for user in [ada, grace, erased_early] {
        register(&client, &command, user).await;
    }
    assert_eq!(erase(&client, &command, erased_early).await.status(), 200);
    append_history(&pool, 1, 300).await;
    let base = backup_sh(&["base", &source.url("postgres"), repo_arg]).await;
    assert!(base.contains("/base/"), "{base}");

    // After the backup, before T.
    append_history(&pool, 2, 300).await;
    let head_at_t = head(&pool).await;
    let t: String = sqlx::query_scalar("SELECT clock_timestamp()::text")
        .fetch_one(&pool)
        .await
        .unwrap();

    // After T: more history, and ada erased (in the ledger before it was acknowledged).
    append_history(&pool, 3, 300).await;
    assert_eq!(erase(&client, &command, ada).await.status(), 200);
    let recorded = std::fs::read_to_string(&ledger).unwrap();
    assert!(recorded.contains(&ada.to_string()), "{recorded}");
    assert!(recorded.contains(&erased_early.to_string()), "{recorded}");
    assert_eq!(personal_status(&url, ada), "erased");
    assert!(head(&pool).await > head_at_t);
    backup_sh(&["wait-archived", &source.url("postgres")]).await;
    serve.assert_alive();
    drop(serve);
    pool.close().await;

    // Restore to T.
    let started = Instant::now();
    let restored = ScratchPostgres::restored(&repo, &t).await;
    let restore_took = started.elapsed();
    let restored_url = restored.url("cloudphone");
    let restored_pool = PgPool::connect(&restored_url).await.unwrap();
    assert_eq!(
        head(&restored_pool).await,
        head_at_t,
        "the log does not end at the last event before T"
    );
    let verified = cloudphone(&restored_url, &["verify"]);
    assert!(verified.status.success(), "verify: {}", text(&verified));
    assert!(
        String::from_utf8_lossy(&verified.stdout).contains(&format!("..={head_at_t})")),
        "verify did not end at {head_at_t}: {}",
        text(&verified)
    );

    // The restore took ada's erasure back: her data reads again, until the ledger is reapplied.
    assert_eq!(personal_status(&restored_url, ada), "decrypted");
    assert_eq!(personal_status(&restored_url, grace), "decrypted");
    assert_eq!(personal_status(&restored_url, erased_early), "erased");
    let check = cloudphone(&restored_url, &["erasures", "check", "--ledger", ledger_arg]);
    assert!(!check.status.success(), "check found nothing missing: {}", text(&check));
    let reapplied = cloudphone(&restored_url, &["erasures", "reapply", "--ledger", ledger_arg]);
    assert!(reapplied.status.success(), "reapply: {}", text(&reapplied));
    assert!(
        String::from_utf8_lossy(&reapplied.stdout).contains("data keys shredded again: 1;"),
        "{}",
        text(&reapplied)
    );
    assert_eq!(personal_status(&restored_url, ada), "erased");
    assert_eq!(personal_status(&restored_url, grace), "decrypted");
    let again = cloudphone(&restored_url, &["erasures", "reapply", "--ledger", ledger_arg]);
    assert!(
        again.status.success() && String::from_utf8_lossy(&again.stdout).contains("data keys shredded again: 0;"),
        "reapply is not idempotent: {}",
        text(&again)
    );
    let check = cloudphone(&restored_url, &["erasures", "check", "--ledger", ledger_arg]);
    assert!(check.status.success(), "check after reapply: {}", text(&check));

    // The projections, restored with their checkpoints as of T, catch up and equal a rebuild.
    let mut projector = RoleProcess::start(CLOUDPHONE, "projector", &restored_url, &[], logs.path());
    projections_reach(&restored_pool, head_at_t, Duration::from_secs(60)).await;
    projector.assert_alive();
    assert_read_models_equal_a_rebuild(&restored_pool).await;
    drop(projector);
    restored_pool.close().await;
    drop(restored);

    // Restored again, and opened by the command API with the ledger: it reapplies before
    // it listens.
    let second = ScratchPostgres::restored(&repo, &t).await;
    let second_url = second.url("cloudphone");
    assert_eq!(personal_status(&second_url, ada), "decrypted");
    let mut api = RoleProcess::start(
        CLOUDPHONE,
        "command-api",
        &second_url,
        &[("CLOUDPHONE_ERASURE_LEDGER", ledger_arg)],
        logs.path(),
    );
    api.address("command API listening").await;
    let reapplied = api
        .logged("the ledger reapplied", |e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.contains("reapplied from the ledger"))
        })
        .await;
    assert_eq!(reapplied["reshredded"], 1, "{reapplied}");
    assert_eq!(personal_status(&second_url, ada), "erased");
    assert_eq!(personal_status(&second_url, grace), "decrypted");
    eprintln!("restore to T took {:.1}s", restore_took.as_secs_f64());
}

/// An erasure the ledger cannot record is refused (503) and changes nothing: the user's
/// data key stays, so no acknowledged erasure is ever missing from the ledger.
#[sqlx::test(migrations = false)]
async fn an_erasure_the_ledger_cannot_record_is_not_acknowledged(pool: PgPool) {
    let url = test_support::urls::database(&pool).await;
    let ledger_dir = tempfile::tempdir().unwrap();
    let ledger = ledger_dir.path().join("erasures.ndjson");
    let logs = tempfile::tempdir().unwrap();
    let mut api = RoleProcess::start(
        CLOUDPHONE,
        "command-api",
        &url,
        &[("CLOUDPHONE_ERASURE_LEDGER", ledger.to_str().unwrap())],
        logs.path(),
    );
    let command = api.address("command API listening").await;
    let client = reqwest::Client::new();
    let (kept, erased) = (Uuid::now_v7(), Uuid::now_v7());
    register(&client, &command, kept).await;
    register(&client, &command, erased).await;
    assert_eq!(erase(&client, &command, erased).await.status(), 200);
    assert_eq!(personal_status(&url, erased), "erased");

    // The ledger's volume goes away.
    std::fs::remove_dir_all(ledger_dir.path()).unwrap();
    let refused = erase(&client, &command, kept).await;
    assert_eq!(refused.status(), 503);
    assert_eq!(personal_status(&url, kept), "decrypted");
    let key_destroyed: bool =
        sqlx::query_scalar("SELECT erased_at IS NOT NULL FROM personal_data_keys WHERE user_id = $1")
            .bind(kept)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(!key_destroyed);
    api.assert_alive();
    assert!(!Path::new(&ledger).exists());
}
