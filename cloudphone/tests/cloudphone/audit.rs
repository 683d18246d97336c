//! Audit end to end, through the real binary: personal data is encrypted at rest, exported
//! decrypted to auditors, and after `DELETE /v1/users/{id}` gone from every read path (export,
//! replayed projections, the database dump, the logs) while the hash chain still verifies.
//! Export files verify, and an edited or truncated one is caught.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use event_log::chain::chain_hash;
use event_log::personal::MasterKey;
use event_schema::EventEnvelope;
use event_schema::canonical::envelope_bytes;
use http_edge::auth::Role;
use serde_json::{Value, json};
use sqlx::PgPool;
use test_support::roles::KillOnDrop;
use test_support::{tokens, urls};
use uuid::Uuid;

/// Runs a `cloudphone` verb against `url` with the master key; returns its output.
fn cloudphone(url: &str, master_key: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cloudphone"))
        .args(args)
        .env("CLOUDPHONE_DATABASE_URL", url)
        .env("CLOUDPHONE_MASTER_KEY", master_key)
        .env("CLOUDPHONE_LOG_FORMAT", "json")
        .env("CLOUDPHONE_LOG", "debug")
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

/// `pg_dump` of the test database, as SQL text.
fn dump(url: &str) -> String {
    let output = Command::new("pg_dump").args(["--no-owner", url]).output().unwrap();
    assert!(output.status.success(), "pg_dump: {}", text(&output));
    String::from_utf8(output.stdout).unwrap()
}

/// `cloudphone serve` with JSON logs at debug level, and where its two APIs listen.
struct Serve {
    child: KillOnDrop,
    command: String,
    query: String,
    logs: std::thread::JoinHandle<Vec<String>>,
}

fn serve(url: &str, master_key: &str) -> Serve {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cloudphone"))
        .arg("serve")
        .env("CLOUDPHONE_DATABASE_URL", url)
        .env("CLOUDPHONE_COMMAND_LISTEN", "127.0.0.1:0")
        .env("CLOUDPHONE_QUERY_LISTEN", "127.0.0.1:0")
        .env("CLOUDPHONE_MASTER_KEY", master_key)
        .env("CLOUDPHONE_LOG_FORMAT", "json")
        .env("CLOUDPHONE_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let (mut command, mut query) = (None, None);
    while command.is_none() || query.is_none() {
        let line = lines.next().expect("serve exited before listening").unwrap();
        let entry: Value = serde_json::from_str(&line).unwrap_or_default();
        let address = entry["address"].as_str().map(str::to_owned);
        match entry["message"].as_str() {
            Some("command API listening") => command = address,
            Some("query API listening") => query = address,
            _ => {}
        }
        seen.push(line);
    }
    let logs = std::thread::spawn(move || {
        seen.extend(lines.map_while(Result::ok));
        seen
    });
    Serve {
        child: KillOnDrop(child),
        command: format!("http://{}", command.unwrap()),
        query: format!("http://{}", query.unwrap()),
        logs,
    }
}

impl Serve {
    /// SIGTERM, wait, and the whole log.
    fn stop(mut self) -> String {
        let pid = self.child.0.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let status = self.child.0.wait().unwrap();
        assert!(status.success(), "serve exited with {status}");
        self.logs.join().unwrap().join("\n")
    }
}

struct Person {
    id: Uuid,
    email: String,
    phone: String,
}

impl Person {
    fn new() -> Self {
        let id = Uuid::now_v7();
        let digits = id.as_u128() % 100_000_000;
        Person {
            id,
            email: format!("ada.{}@example.com", id.simple()),
            phone: format!("+49151{digits:08}"),
        }
    }

    /// Whether `haystack` holds any of this person's personal data in clear.
    fn appears_in(&self, haystack: &str) -> bool {
        haystack.contains(&self.email)
            || haystack.contains(&self.phone)
            || haystack.contains(self.phone.trim_start_matches('+'))
            || haystack.contains(&self.email.replace('@', "\\u0040"))
    }
}

async fn register(client: &reqwest::Client, serve: &Serve, person: &Person) -> Value {
    let response = client
        .post(format!("{}/v1/users", serve.command))
        .bearer_auth(tokens::development(&person.id.to_string(), Role::User))
        .json(&json!({"tier": "pro", "email": person.email, "phone": person.phone}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let device = client
        .post(format!("{}/v1/devices", serve.command))
        .bearer_auth(tokens::development(&person.id.to_string(), Role::User))
        .json(&json!({"provider": "huawei", "cpu_cores": 2, "memory_mb": 2048, "android_version": 14}))
        .send()
        .await
        .unwrap();
    assert_eq!(device.status(), 201);
    device.json().await.unwrap()
}

/// `GET /v1/audit/events` as an auditor.
async fn audit_export(client: &reqwest::Client, serve: &Serve, query: &str) -> (reqwest::StatusCode, String) {
    let response = client
        .get(format!("{}/v1/audit/events?{query}", serve.query))
        .bearer_auth(tokens::development("auditor-1", Role::Auditor))
        .send()
        .await
        .unwrap();
    (response.status(), response.text().await.unwrap())
}

fn lines(body: &str) -> Vec<Value> {
    body.lines().map(|line| serde_json::from_str(line).unwrap()).collect()
}

fn verify_file(url: &str, key: &str, path: &Path) -> Output {
    cloudphone(url, key, &["verify", "--file", path.to_str().unwrap(), "--against-log"])
}

#[sqlx::test(migrations = false)]
async fn an_erased_user_leaves_no_personal_data_in_the_database_the_exports_or_the_logs(pool: PgPool) {
    let url = urls::database(&pool).await;
    let (_, master_key) = MasterKey::generate("test-1").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let serve_run = serve(&url, &master_key);
    let client = reqwest::Client::new();
    let (ada, grace) = (Person::new(), Person::new());
    register(&client, &serve_run, &ada).await;
    let last = register(&client, &serve_run, &grace).await;

    // Encrypted at rest: the database never held the plaintext, only tokens.
    let before = dump(&url);
    assert!(!ada.appears_in(&before) && !grace.appears_in(&before));
    assert!(before.contains("enc:v1:"), "personal fields are stored as tokens");

    // An auditor's export shows the personal data decrypted, beside the stored ciphertext.
    let (status, body) = audit_export(&client, &serve_run, &format!("userId={}", ada.id)).await;
    assert_eq!(status, 200, "{body}");
    let exported = lines(&body);
    let registered = exported
        .iter()
        .find(|e| e["event_type"] == "UserRegistered")
        .expect("UserRegistered exported");
    assert_eq!(
        registered["personal"],
        json!({"status": "decrypted", "values": {"email": ada.email, "phone": ada.phone}})
    );
    assert!(registered["payload"]["email"].as_str().unwrap().starts_with("enc:v1:"));
    let trailer = &exported.last().unwrap()["trailer"];
    assert_eq!(trailer["count"], json!(exported.len() - 1), "{trailer}");
    assert_eq!(trailer["contiguous"], json!(false));
    std::fs::write(dir.path().join("before.ndjson"), &body).unwrap();
    let verified = verify_file(&url, &master_key, &dir.path().join("before.ndjson"));
    assert!(verified.status.success(), "{}", text(&verified));

    // The user erases themselves; erasing again is harmless; registering again is refused.
    let erase = |who: Role, subject: String| {
        client
            .delete(format!("{}/v1/users/{}", serve_run.command, ada.id))
            .bearer_auth(tokens::development(&subject, who))
            .send()
    };
    let other = erase(Role::User, grace.id.to_string()).await.unwrap();
    assert_eq!(other.status(), 403, "another user may not erase ada");
    let erased = erase(Role::User, ada.id.to_string()).await.unwrap();
    assert_eq!(erased.status(), 200);
    let erased_position = erased.json::<Value>().await.unwrap()["position"].as_i64().unwrap();
    assert!(erased_position > last["position"].as_i64().unwrap());
    assert_eq!(
        erase(Role::Admin, Uuid::now_v7().to_string()).await.unwrap().status(),
        200
    );
    let again = client
        .post(format!("{}/v1/users", serve_run.command))
        .bearer_auth(tokens::development(&ada.id.to_string(), Role::User))
        .json(&json!({"tier": "pro", "email": ada.email, "phone": ada.phone}))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409);

    // The HTTP export now shows ada's fields as erased; grace's still decrypt.
    let (status, body) = audit_export(&client, &serve_run, "").await;
    assert_eq!(status, 200);
    assert!(!ada.appears_in(&body), "erased data in the HTTP export");
    assert!(grace.appears_in(&body), "grace's data is still exported");
    let exported = lines(&body);
    let ada_registered = exported
        .iter()
        .find(|e| e["event_type"] == "UserRegistered" && e["owner_id"] == json!(ada.id))
        .unwrap();
    assert_eq!(ada_registered["personal"], json!({"status": "erased"}));
    assert!(exported.iter().any(|e| e["event_type"] == "UserErased"));
    assert_eq!(exported.last().unwrap()["trailer"]["contiguous"], json!(true));
    std::fs::write(dir.path().join("all.ndjson"), &body).unwrap();
    let serve_logs = serve_run.stop();

    // Every projection rebuilt from the whole history, then exports by the CLI.
    let mut logs = vec![serve_logs];
    for projection in ["fleet", "daily-usage"] {
        let replayed = cloudphone(&url, &master_key, &["replay", projection]);
        assert!(replayed.status.success(), "{}", text(&replayed));
        logs.push(text(&replayed));
    }
    let mut exports = vec![body];
    for (file, extra) in [("ada.ndjson", "--user"), ("ada.csv", "--user"), ("everything.csv", "")] {
        let path = dir.path().join(file);
        let mut args = vec!["export", "-o", path.to_str().unwrap()];
        let ada_id = ada.id.to_string();
        if !extra.is_empty() {
            args.extend([extra, &ada_id]);
        }
        let exported = cloudphone(&url, &master_key, &args);
        assert!(exported.status.success(), "{}", text(&exported));
        logs.push(text(&exported));
        let contents = std::fs::read_to_string(&path).unwrap();
        assert!(contents.contains("erased"), "{file}: {contents}");
        let verified = verify_file(&url, &master_key, &path);
        assert!(verified.status.success(), "{file}: {}", text(&verified));
        logs.push(text(&verified));
        exports.push(contents);
    }
    let chain = cloudphone(&url, &master_key, &["verify"]);
    assert!(chain.status.success(), "the chain covers ciphertext: {}", text(&chain));

    let after = dump(&url);
    let logs = logs.join("\n");
    assert!(
        logs.contains("audit export started") && logs.contains("replay"),
        "logs were captured"
    );
    for (place, haystack) in [("database dump", &after), ("logs", &logs)] {
        assert!(!ada.appears_in(haystack), "ada's personal data in the {place}");
        assert!(!grace.appears_in(haystack), "grace's personal data in the {place}");
    }
    for export in &exports {
        assert!(!ada.appears_in(export), "ada's personal data in an export");
    }
    // The key is gone for good: only a tombstone is left.
    let key: (Option<Vec<u8>>, bool) =
        sqlx::query_as("SELECT wrapped_key, erased_at IS NOT NULL FROM personal_data_keys WHERE user_id = $1")
            .bind(ada.id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(key, (None, true));
}

/// The audit route refuses what it must (no token, wrong role, bad parameters) with
/// problem+json before streaming anything; `after` resumes an export exactly where a partial
/// one stopped; CSV is chosen by `Accept`; an edited or truncated file is caught by `verify`.
#[sqlx::test(migrations = false)]
async fn audit_exports_refuse_bad_requests_resume_and_catch_edited_files(pool: PgPool) {
    let url = urls::database(&pool).await;
    let (_, master_key) = MasterKey::generate("test-2").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let serve_run = serve(&url, &master_key);
    let client = reqwest::Client::new();
    for _ in 0..3 {
        register(&client, &serve_run, &Person::new()).await;
    }
    let url_for = |query: &str| format!("{}/v1/audit/events?{query}", serve_run.query);

    let anonymous = client.get(url_for("")).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let user = client
        .get(url_for(""))
        .bearer_auth(tokens::development(&Uuid::now_v7().to_string(), Role::User))
        .send()
        .await
        .unwrap();
    assert_eq!(user.status(), 403);
    assert_eq!(
        user.headers()["content-type"],
        "application/problem+json",
        "errors before the body are problem+json"
    );
    for bad in [
        "userId=nope",
        "format=xml",
        "eventType=Nope",
        "from=yesterday",
        "from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z",
        "after=-1",
        "personal=show",
        "colour=blue",
    ] {
        let (status, body) = audit_export(&client, &serve_run, bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body.contains("invalid_parameter"), "{bad}: {body}");
    }

    // A whole export, then one resumed after its fourth event: the same events follow.
    let (status, whole) = audit_export(&client, &serve_run, "").await;
    assert_eq!(status, 200);
    let whole = lines(&whole);
    let events = &whole[..whole.len() - 1];
    assert!(events.len() >= 9, "three users with a device each: {}", events.len());
    let fourth = events[3]["position"].as_i64().unwrap();
    let (_, rest) = audit_export(&client, &serve_run, &format!("after={fourth}")).await;
    let rest = lines(&rest);
    assert_eq!(&rest[..rest.len() - 1], &events[4..]);
    assert_eq!(rest.last().unwrap()["trailer"]["first_position"], json!(fourth + 1));
    let (_, only_devices) = audit_export(&client, &serve_run, "eventType=DeviceCreated").await;
    let only_devices = lines(&only_devices);
    assert_eq!(only_devices.len(), 4, "three DeviceCreated and the trailer");
    assert!(only_devices[..3].iter().all(|e| e["event_type"] == "DeviceCreated"));

    let csv = client
        .get(url_for(""))
        .bearer_auth(tokens::development("auditor-2", Role::Auditor))
        .header("accept", "text/csv")
        .send()
        .await
        .unwrap();
    assert_eq!(csv.status(), 200);
    assert!(csv.headers()["content-type"].to_str().unwrap().starts_with("text/csv"));
    let csv = csv.text().await.unwrap();
    assert!(csv.starts_with("record,position,event_id"), "{csv}");
    let csv_path = dir.path().join("all.csv");
    std::fs::write(&csv_path, &csv).unwrap();
    let verified = verify_file(&url, &master_key, &csv_path);
    assert!(verified.status.success(), "{}", text(&verified));

    // Edit one exported event: verify names its position.
    let (_, ndjson) = audit_export(&client, &serve_run, "").await;
    let mut edited: Vec<String> = ndjson.lines().map(str::to_owned).collect();
    let target = edited
        .iter()
        .position(|line| line.contains("\"DeviceCreated\"") && line.contains("\"cpu_cores\": 2"))
        .unwrap();
    let target_position = lines(&edited[target])[0]["position"].as_i64().unwrap();
    edited[target] = edited[target].replace("\"cpu_cores\": 2", "\"cpu_cores\": 64");
    let edited_path = dir.path().join("edited.ndjson");
    std::fs::write(&edited_path, edited.join("\n") + "\n").unwrap();
    let verified = verify_file(&url, &master_key, &edited_path);
    assert!(!verified.status.success());
    assert!(
        text(&verified).contains(&format!("broken at position {target_position}")),
        "{}",
        text(&verified)
    );

    // Drop the trailer (a download cut short): verify says the file is incomplete.
    let truncated_path = dir.path().join("truncated.ndjson");
    let all: Vec<&str> = ndjson.lines().collect();
    std::fs::write(&truncated_path, all[..all.len() - 1].join("\n") + "\n").unwrap();
    let verified = verify_file(&url, &master_key, &truncated_path);
    assert!(!verified.status.success());
    assert!(text(&verified).contains("trailer"), "{}", text(&verified));

    // A forgery: one event changed and every hash after it recomputed, so the file is
    // consistent in itself. Only comparing with the log (--against-log) exposes it.
    let mut envelopes: Vec<EventEnvelope> = all[..all.len() - 1]
        .iter()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    envelopes[target].payload["cpu_cores"] = json!(64);
    for i in target..envelopes.len() {
        if i > 0 {
            envelopes[i].prev_hash = envelopes[i - 1].hash;
        }
        envelopes[i].hash = chain_hash(&envelopes[i].prev_hash, &envelope_bytes(&envelopes[i]));
    }
    let mut trailer = lines(all[all.len() - 1])[0].clone();
    trailer["trailer"]["last_hash"] = json!(envelopes.last().unwrap().hash.to_hex());
    let forged_path = dir.path().join("forged.ndjson");
    let forged: Vec<String> = envelopes
        .iter()
        .map(|e| serde_json::to_string(e).unwrap())
        .chain([trailer.to_string()])
        .collect();
    std::fs::write(&forged_path, forged.join("\n") + "\n").unwrap();
    let alone = cloudphone(&url, &master_key, &["verify", "--file", forged_path.to_str().unwrap()]);
    assert!(
        alone.status.success(),
        "the forgery is self-consistent: {}",
        text(&alone)
    );
    let verified = verify_file(&url, &master_key, &forged_path);
    assert!(!verified.status.success(), "{}", text(&verified));
    assert!(text(&verified).contains("not the log's history"), "{}", text(&verified));

    // In a filtered export events do not link to each other: a middle one changed with its
    // own hash recomputed passes alone; --against-log compares every hash with the log.
    let (_, devices_only) = audit_export(&client, &serve_run, "eventType=DeviceCreated").await;
    let mut records: Vec<String> = devices_only.lines().map(str::to_owned).collect();
    let mut middle: EventEnvelope = serde_json::from_str(&records[1]).unwrap();
    middle.payload["memory_mb"] = json!(65536);
    middle.hash = chain_hash(&middle.prev_hash, &envelope_bytes(&middle));
    records[1] = serde_json::to_string(&middle).unwrap();
    let filtered_path = dir.path().join("filtered-forged.ndjson");
    std::fs::write(&filtered_path, records.join("\n") + "\n").unwrap();
    let alone = cloudphone(
        &url,
        &master_key,
        &["verify", "--file", filtered_path.to_str().unwrap()],
    );
    assert!(alone.status.success(), "{}", text(&alone));
    let verified = verify_file(&url, &master_key, &filtered_path);
    assert!(!verified.status.success(), "{}", text(&verified));
    assert!(
        text(&verified).contains(&format!("hash at position {} differs", middle.position)),
        "{}",
        text(&verified)
    );
    serve_run.stop();
}
