//! The web console in a real browser: `cloudphone serve` on a fresh database, a user with one
//! stopped device, then `ops/dev/browser/console.test.mjs` (headless chromium through
//! playwright-core, installed by `ops/dev/browser.sh ensure`, which ops/dev/test.sh runs) signs
//! in, watches the device start live, looks at the operator's view and at GraphiQL. Its
//! screenshots are kept in `target/browser-artifacts/`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use http_edge::auth::Role;
use serde_json::{Value, json};
use sqlx::PgPool;
use test_support::roles::RoleProcess;
use test_support::{tokens, urls};
use uuid::Uuid;

use crate::support::CLOUDPHONE;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Where screenshots go: beside the build, so CI can keep them.
fn artifacts() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace().join("target"), PathBuf::from);
    target.join("browser-artifacts")
}

/// Registers `user` and creates one of their devices; returns the device's id.
async fn user_with_a_device(client: &reqwest::Client, command: &str, user: Uuid, token: &str) -> Uuid {
    let registered = client
        .post(format!("{command}/v1/users"))
        .bearer_auth(token)
        .json(&json!({"tier": "pro", "email": format!("console.{}@example.com", user.simple()), "phone": "+4915100000000"}))
        .send()
        .await
        .unwrap();
    assert_eq!(registered.status(), 201, "{:?}", registered.text().await);
    let created = client
        .post(format!("{command}/v1/devices"))
        .bearer_auth(token)
        .json(&json!({"provider": "huawei", "cpu_cores": 2, "memory_mb": 2048, "android_version": 14}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let body: Value = created.json().await.unwrap();
    body["id"].as_str().unwrap().parse().unwrap()
}

/// Waits until the query API shows `device` to its owner (the page's first answer then has it).
async fn device_visible(client: &reqwest::Client, query: &str, token: &str, device: Uuid) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer: Value = client
            .post(format!("{query}/graphql"))
            .bearer_auth(token)
            .json(&json!({"query": format!("{{ device(id: \"{device}\") {{ status }} }}")}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if answer["data"]["device"]["status"] == "STOPPED" {
            return;
        }
        assert!(Instant::now() < deadline, "the device never showed: {answer}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[sqlx::test(migrations = false)]
async fn a_user_watches_their_device_start_live_and_an_admin_sees_projection_lag_in_the_console(pool: PgPool) {
    let installed = Command::new(workspace().join("ops/dev/browser.sh"))
        .arg("status")
        .status()
        .is_ok_and(|status| status.success());
    assert!(
        installed,
        "no browser for the console test: run ops/dev/browser.sh ensure (ops/dev/test.sh does)"
    );
    let url = urls::database(&pool).await;
    let dir = tempfile::tempdir().unwrap();
    // No JWT secret: the development one, so the console offers to mint tokens.
    let mut serve = RoleProcess::start(CLOUDPHONE, "serve", &url, &[], dir.path());
    let command = serve.address("command API listening").await;
    let query = serve.address("query API listening").await;

    let client = reqwest::Client::new();
    let user = Uuid::now_v7();
    let token = tokens::development(&user.to_string(), Role::User);
    let device = user_with_a_device(&client, &command, user, &token).await;
    device_visible(&client, &query, &token, device).await;

    let artifacts = artifacts();
    std::fs::create_dir_all(&artifacts).unwrap();
    let chromium = Command::new(workspace().join("ops/dev/browser.sh"))
        .arg("path")
        .output()
        .unwrap();
    let script = workspace().join("ops/dev/browser/console.test.mjs");
    let mut node = tokio::process::Command::new("node");
    node.arg(&script)
        .current_dir(workspace())
        .env("CONSOLE_URL", &query)
        .env("COMMAND_URL", &command)
        .env("USER_TOKEN", &token)
        .env("USER_ID", user.to_string())
        .env("DEVICE_ID", device.to_string())
        .env("CHROMIUM", String::from_utf8_lossy(&chromium.stdout).trim())
        .env("ARTIFACTS_DIR", &artifacts)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let run = tokio::time::timeout(Duration::from_secs(180), node.output())
        .await
        .expect("the browser test ran for more than 3 minutes")
        .unwrap();
    println!("{}", String::from_utf8_lossy(&run.stdout));
    eprintln!("{}", String::from_utf8_lossy(&run.stderr));
    println!("screenshots: {}", artifacts.display());
    serve.assert_alive();
    assert!(
        run.status.success(),
        "the console's browser test failed ({}); see its steps above and the screenshots in {}",
        run.status,
        artifacts.display()
    );
}
