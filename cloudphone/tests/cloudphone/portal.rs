//! Portal clients and a dashboard for tests that put the real binary under load: users
//! with devices registered over HTTP, clients that start and stop them with one
//! Idempotency-Key per command (retried with the same key after a 503, as a portal should),
//! a tally of every answer, and the check that what was acknowledged is in the log and
//! nothing else is.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_edge::auth::Role;
use serde_json::{Value, json};
use sqlx::PgPool;
use test_support::tokens;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A user with devices, as the portal knows them.
#[derive(Debug, Clone)]
pub(crate) struct Tenant {
    pub(crate) user: Uuid,
    pub(crate) token: String,
    pub(crate) devices: Vec<Uuid>,
}

/// Registers `users` users with `devices` devices each (before any fault: all must succeed).
pub(crate) async fn provision(client: &reqwest::Client, command: &str, users: usize, devices: usize) -> Vec<Tenant> {
    let mut tenants = Vec::new();
    for _ in 0..users {
        let user = Uuid::now_v7();
        let token = tokens::development(&user.to_string(), Role::User);
        let answer = client
            .post(format!("{command}/v1/users"))
            .bearer_auth(&token)
            .json(&json!({"tier": "pro", "email": format!("faults.{}@example.com", user.simple()), "phone": "+4915100000000"}))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 201, "{}", answer.text().await.unwrap());
        let mut ids = Vec::new();
        for _ in 0..devices {
            let answer = client
                .post(format!("{command}/v1/devices"))
                .bearer_auth(&token)
                .json(&json!({"provider": "aws", "cpu_cores": 2, "memory_mb": 2048, "android_version": 14}))
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status(), 201, "{}", answer.text().await.unwrap());
            let body: Value = answer.json().await.unwrap();
            ids.push(body["id"].as_str().unwrap().parse().unwrap());
        }
        tenants.push(Tenant {
            user,
            token,
            devices: ids,
        });
    }
    tenants
}

/// A command the API acknowledged (2xx), with what it answered.
#[derive(Debug, Clone)]
pub(crate) struct Ack {
    pub(crate) owner: Uuid,
    pub(crate) device: Uuid,
    pub(crate) stream_version: i64,
    pub(crate) position: i64,
    pub(crate) at: Instant,
}

/// Everything the clients saw.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub(crate) acks: Vec<Ack>,
    /// 503 answers (each a well-formed problem document with Retry-After), when they came.
    pub(crate) unavailable: Vec<Instant>,
    /// Domain refusals (4xx problem documents): `status code`.
    pub(crate) refused: Vec<String>,
    /// Anything else: other statuses, malformed answers, transport errors.
    pub(crate) failures: Vec<String>,
    /// Slowest answer, acknowledged or not.
    pub(crate) slowest: Duration,
}

pub(crate) enum Answer {
    Accepted(Value),
    Unavailable,
    Refused(String),
    Failed(String),
}

/// Sorts one HTTP answer into what a portal may be told.
pub(crate) async fn classify(answer: Result<reqwest::Response, reqwest::Error>) -> Answer {
    let answer = match answer {
        Ok(answer) => answer,
        Err(error) => return Answer::Failed(format!("transport: {error:?}")),
    };
    let status = answer.status();
    let content_type = answer
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let retry_after = answer
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let body = match answer.text().await {
        Ok(body) => body,
        Err(error) => return Answer::Failed(format!("{status}: body cut off: {error:?}")),
    };
    let json: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    match status.as_u16() {
        200 | 201 if json["position"].is_i64() && json["stream_version"].is_i64() => Answer::Accepted(json),
        503 if content_type.starts_with("application/problem+json")
            && json["status"] == 503
            && json["code"] == "unavailable"
            && retry_after.is_some_and(|s| s >= 1) =>
        {
            Answer::Unavailable
        }
        404 | 409 | 422 if content_type.starts_with("application/problem+json") => {
            Answer::Refused(format!("{status} {}", json["code"]))
        }
        _ => Answer::Failed(format!(
            "{status} ({content_type}, Retry-After {retry_after:?}): {body}"
        )),
    }
}

/// One portal client: starts and stops the tenant's devices in turn until `done`, pausing
/// `pace` between commands. A 503 is retried with the same Idempotency-Key until the command
/// is answered for good (a portal's retry); the first failure ends the client.
pub(crate) async fn drive(
    client: reqwest::Client,
    command: String,
    tenant: Tenant,
    pace: Duration,
    tally: Arc<Mutex<Tally>>,
    done: CancellationToken,
) {
    let mut running = vec![false; tenant.devices.len()];
    let mut turn = 0;
    while !done.is_cancelled() {
        let index = turn % tenant.devices.len();
        turn += 1;
        let device = tenant.devices[index];
        let action = if running[index] { "stop" } else { "start" };
        let key = Uuid::now_v7().to_string();
        loop {
            let sent = Instant::now();
            let answer = client
                .post(format!("{command}/v1/devices/{device}/{action}"))
                .bearer_auth(&tenant.token)
                .header("idempotency-key", &key)
                .send()
                .await;
            let answer = classify(answer).await;
            let retry = {
                let mut tally = tally.lock().unwrap();
                tally.slowest = tally.slowest.max(sent.elapsed());
                match answer {
                    Answer::Accepted(body) => {
                        tally.acks.push(Ack {
                            owner: tenant.user,
                            device,
                            stream_version: body["stream_version"].as_i64().unwrap(),
                            position: body["position"].as_i64().unwrap(),
                            at: Instant::now(),
                        });
                        running[index] = !running[index];
                        false
                    }
                    Answer::Unavailable => {
                        tally.unavailable.push(Instant::now());
                        true
                    }
                    Answer::Refused(what) => {
                        tally.refused.push(format!("{action} {device}: {what}"));
                        // Already in the state asked for: the other action is next.
                        running[index] = !running[index];
                        false
                    }
                    Answer::Failed(what) => {
                        tally.failures.push(format!("{action} {device}: {what}"));
                        return;
                    }
                }
            };
            if !retry {
                break;
            }
            // Retry-After says a second; a portal in a hurry tries a little sooner.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if !pace.is_zero() {
            tokio::time::sleep(pace).await;
        }
    }
}

pub(crate) fn spawn_drivers(
    client: &reqwest::Client,
    command: &str,
    tenants: &[Tenant],
    pace: Duration,
    tally: &Arc<Mutex<Tally>>,
    done: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    tenants
        .iter()
        .map(|tenant| {
            tokio::spawn(drive(
                client.clone(),
                command.to_owned(),
                tenant.clone(),
                pace,
                tally.clone(),
                done.clone(),
            ))
        })
        .collect()
}

/// Acknowledgements since `since`.
pub(crate) fn acks_since(tally: &Mutex<Tally>, since: Instant) -> usize {
    tally.lock().unwrap().acks.iter().filter(|a| a.at >= since).count()
}

/// Waits until the clients have had `count` acknowledgements since `since`; returns when the
/// first of them came.
pub(crate) async fn await_acks(tally: &Mutex<Tally>, since: Instant, count: usize, limit: Duration) -> Instant {
    let deadline = Instant::now() + limit;
    loop {
        {
            let tally = tally.lock().unwrap();
            assert!(tally.failures.is_empty(), "a client failed: {:?}", tally.failures);
            let mut after: Vec<Instant> = tally.acks.iter().map(|a| a.at).filter(|at| *at >= since).collect();
            if after.len() >= count {
                after.sort();
                return after[0];
            }
            assert!(
                Instant::now() < deadline,
                "only {} commands acknowledged in {limit:?} ({} answered 503)",
                after.len(),
                tally.unavailable.iter().filter(|at| **at >= since).count()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every acknowledged command is in the log as it was answered: its device's event at the
/// stream version it named, at or before the position it named, in the owner's history. And
/// nothing was written that was not acknowledged: each device's stream ends at the version
/// of its last acknowledgement (a 503 whose write had committed was answered by the retry
/// with the same key, never repeated).
pub(crate) async fn assert_acks_in_log(pool: &PgPool, acks: &[Ack], tenants: &[Tenant]) {
    let rows: Vec<(Uuid, i64, i64, Uuid)> = sqlx::query_as(
        "SELECT stream_id, stream_version, position, owner_id FROM user_events WHERE stream_type = 'device'",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let stored: HashMap<(Uuid, i64), (i64, Uuid)> = rows
        .into_iter()
        .map(|(stream, version, position, owner)| ((stream, version), (position, owner)))
        .collect();
    let mut last: HashMap<Uuid, i64> = HashMap::new();
    for ack in acks {
        let (position, owner) = stored
            .get(&(ack.device, ack.stream_version))
            .unwrap_or_else(|| panic!("acknowledged but not in the log: {ack:?}"));
        assert!(
            *position <= ack.position,
            "{ack:?} is at position {position} in the log"
        );
        assert_eq!(*owner, ack.owner, "{ack:?}");
        let previous = last.insert(ack.device, ack.stream_version);
        assert!(
            previous.is_none_or(|p| p < ack.stream_version),
            "{ack:?} after version {previous:?}"
        );
    }
    let versions: HashMap<Uuid, i64> =
        sqlx::query_as::<_, (Uuid, i64)>("SELECT stream_id, version FROM streams WHERE stream_type = 'device'")
            .fetch_all(pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    for device in tenants.iter().flat_map(|t| &t.devices) {
        // Version 1 is the creation, acknowledged before the load.
        let acknowledged = last.get(device).copied().unwrap_or(1);
        assert_eq!(
            versions[device], acknowledged,
            "device {device} holds events nobody was told about"
        );
    }
}

pub(crate) async fn status_of(client: &reqwest::Client, url: &str) -> Option<u16> {
    client.get(url).send().await.ok().map(|r| r.status().as_u16())
}

/// Polls `url` until it answers `status`; returns how long that took.
pub(crate) async fn await_status(client: &reqwest::Client, url: &str, status: u16, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let got = status_of(client, url).await;
        if got == Some(status) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{url} answered {got:?}, not {status}, for {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) fn admin_token() -> String {
    tokens::development(&Uuid::from_u128(0xad).to_string(), Role::Admin)
}

/// A dashboard polling the query API until `done`; returns every status it got (transport
/// errors as 0).
pub(crate) async fn dashboard(client: reqwest::Client, query: String, done: CancellationToken) -> Vec<(u16, String)> {
    let token = admin_token();
    let mut seen = Vec::new();
    while !done.is_cancelled() {
        let answer = client
            .post(format!("{query}/graphql"))
            .bearer_auth(&token)
            .json(&json!({"query": "{ deviceStats { totals { deviceCount } } devices(first: 3) { totalCount } }"}))
            .send()
            .await;
        match answer {
            Ok(answer) => {
                let status = answer.status().as_u16();
                let body = answer.text().await.unwrap_or_default();
                seen.push((status, body));
            }
            Err(error) => seen.push((0, format!("{error:?}"))),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    seen
}
