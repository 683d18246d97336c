//! 100,000 random and malformed requests against the real binary (issue #10's fault suite):
//! `cloudphone serve` on its own database answers the command API and the query API with no
//! 5xx and no panic, and writes nothing it did not acknowledge.
//!
//! Each request is generated from its own RNG, seeded from the run's seed and the request's
//! index, so a failing request is reproduced with `FUZZ_SEED=<seed>` (printed at the start)
//! and named by its index. About a tenth of the requests are valid commands and queries, so
//! the world changes under the fuzzing (devices are created, started, stopped, resized and
//! deleted; users registered and erased; idempotency keys reused). The rest: JSON bodies with
//! a field replaced, removed or added; random JSON; broken JSON bytes; wrong, missing and odd
//! content types; empty and oversized bodies; missing, malformed, expired, forged and
//! unsigned tokens; bad UUIDs and odd paths; unknown methods; odd headers; random and
//! malformed GraphQL (syntax errors, deep nesting, many aliases, fragment cycles, wrong
//! variables, persisted query ids); audit exports with random query strings; and broken HTTP
//! framing over raw TCP.
//!
//! "No partial write": every command request carries its own `x-request-id`, which the API
//! stores as the correlation id of the events it writes. At the end every event in the log
//! must belong to a request that was answered 2xx, each such request's events must end at
//! the position its answer reported (contiguously, one transaction), and the log's event
//! count must equal the events of those accepted commands; device creations must have their
//! quota reservation, stream versions must be dense, and `cloudphone verify` must pass.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use http_edge::auth::{DEVELOPMENT_SECRET, Role, mint_token};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use reqwest::Method;
use reqwest::header::{HeaderName, HeaderValue};
use serde_json::{Value, json};
use sqlx::PgPool;
use test_support::roles::KillOnDrop;
use test_support::{tokens, urls};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

const REQUESTS: usize = 100_000;
const CONCURRENCY: usize = 32;
/// Users registered before the fuzzing starts; valid commands act for them.
const USERS: usize = 16;
/// A query registered once as a persisted query (Apollo APQ), and its SHA-256.
const PERSISTED_QUERY: &str = "{ projectionStatus { name position } }";
const PERSISTED_QUERY_SHA256: &str = "79ee60f19a6f9fb235629e8c0888a7ceb0487ffe5f81a5bc53c0b8dbcbc71889";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Api {
    Command,
    Query,
}

/// One request to send.
#[derive(Debug)]
struct Probe {
    api: Api,
    kind: &'static str,
    method: Method,
    /// Path and query string.
    path: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Option<Vec<u8>>,
    /// A valid device creation for this user: remember the device when it is created.
    creates_for: Option<usize>,
}

/// Raw bytes over TCP: broken HTTP framing that a client library would not send.
#[derive(Debug)]
struct RawProbe {
    api: Api,
    kind: &'static str,
    bytes: Vec<u8>,
    /// Close the sending side after the bytes (a truncated request).
    half_close: bool,
    /// The `x-request-id` in the bytes, if any.
    request_id: Option<Uuid>,
}

#[derive(Debug)]
enum Request {
    Http(Probe),
    Raw(RawProbe),
}

/// What came back.
#[derive(Debug, Clone)]
struct Record {
    index: usize,
    api: Api,
    kind: &'static str,
    /// The `x-request-id` sent (command API requests only): the events' correlation id.
    request_id: Option<Uuid>,
    /// None when no HTTP answer came (connection closed, timeout).
    status: Option<u16>,
    /// Positions reported by a 2xx command answer (one per accepted batch item).
    positions: Vec<i64>,
    batch: bool,
    /// The request and the answer, for a report.
    summary: String,
    oversized: bool,
    raw: bool,
    problem_json: bool,
}

/// The users, devices and tokens valid requests act with.
struct World {
    users: Vec<(Uuid, String)>,
    admin: String,
    service: String,
    auditor: String,
    /// (owner index, device id) of every device created.
    devices: Mutex<Vec<(usize, Uuid)>>,
}

impl World {
    fn device(&self, rng: &mut StdRng) -> (usize, Uuid) {
        let devices = self.devices.lock().unwrap();
        if devices.is_empty() {
            return (0, Uuid::now_v7());
        }
        devices[rng.random_range(0..devices.len())]
    }

    fn user(&self, rng: &mut StdRng) -> (usize, Uuid, String) {
        let index = rng.random_range(0..self.users.len());
        let (id, token) = &self.users[index];
        (index, *id, token.clone())
    }
}

/// A valid token: signed with the development secret, for two hours.
fn mint(subject: &str, role: Role, scopes: &[&str]) -> String {
    tokens::signed_for(DEVELOPMENT_SECRET, subject, role, scopes, chrono::Duration::hours(2))
}

/// URL-safe base64 without padding, for hand-made tokens.
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// An Authorization header that must not authenticate.
fn bad_authorization(rng: &mut StdRng, world: &World) -> Option<Vec<u8>> {
    let (_, user, token) = world.user(rng);
    let now = Utc::now();
    let claims = |role: &str| {
        base64url(
            json!({"sub": user.to_string(), "role": role, "iat": now.timestamp(), "exp": now.timestamp() + 3600})
                .to_string()
                .as_bytes(),
        )
    };
    let value = match rng.random_range(0..12) {
        0 => return None,
        1 => "Bearer".to_owned(),
        2 => "Bearer ".to_owned(),
        3 => format!("Basic {}", base64url(b"admin:admin")),
        4 => format!("Bearer {}", random_text(rng, 0..80)),
        // Expired an hour ago.
        5 => format!(
            "Bearer {}",
            mint_token(
                DEVELOPMENT_SECRET,
                &user.to_string(),
                Role::User,
                &[],
                now - chrono::Duration::hours(3),
                chrono::Duration::hours(1),
            )
            .unwrap()
        ),
        // Signed with another secret.
        6 => format!(
            "Bearer {}",
            mint_token(
                "not-the-secret",
                &user.to_string(),
                Role::Admin,
                &[],
                now,
                chrono::Duration::hours(1)
            )
            .unwrap()
        ),
        // A real signature over other claims: promoted to admin.
        7 => {
            let parts: Vec<&str> = token.split('.').collect();
            format!("Bearer {}.{}.{}", parts[0], claims("admin"), parts[2])
        }
        // Unsigned.
        8 => format!(
            "Bearer {}.{}.",
            base64url(br#"{"alg":"none","typ":"JWT"}"#),
            claims("admin")
        ),
        // A role that does not exist, and a subject that is not a UUID.
        9 => format!(
            "Bearer {}.{}.{}",
            base64url(br#"{"alg":"HS256","typ":"JWT"}"#),
            claims("root"),
            base64url(&random_bytes(rng, 32..33))
        ),
        10 => format!(
            "Bearer {}",
            mint(
                "not-a-uuid",
                if rng.random_bool(0.5) { Role::User } else { Role::Admin },
                &[]
            )
        ),
        // A token with one character changed.
        _ => {
            let mut bytes = token.into_bytes();
            let at = rng.random_range(0..bytes.len());
            bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
            format!("Bearer {}", String::from_utf8(bytes).unwrap())
        }
    };
    Some(value.into_bytes())
}

fn random_bytes(rng: &mut StdRng, len: std::ops::Range<usize>) -> Vec<u8> {
    let len = rng.random_range(len);
    (0..len).map(|_| rng.random()).collect()
}

fn random_text(rng: &mut StdRng, len: std::ops::Range<usize>) -> String {
    const PIECES: &str =
        "a|Z|0|9|-|_|.| |\"|\\|/|{|}|[|]|:|,|\u{0}|\u{7f}|é|日本|🦀|\u{202e}|\u{feff}|%|%00|'|;|DROP TABLE|null|\n|\t";
    let len = rng.random_range(len);
    (0..len).map(|_| one_of(rng, PIECES)).collect()
}

/// One of the `|`-separated choices.
fn one_of<'a>(rng: &mut StdRng, choices: &'a str) -> &'a str {
    let choices: Vec<&str> = choices.split('|').collect();
    choices[rng.random_range(0..choices.len())]
}

/// A random JSON value, biased toward the names and values the API knows.
fn random_json(rng: &mut StdRng, depth: u32) -> Value {
    let leaf = |rng: &mut StdRng| match rng.random_range(0..16) {
        0 => Value::Null,
        1 => Value::Bool(rng.random()),
        2 => Value::from(rng.random::<i64>()),
        3 => Value::from(rng.random_range(-3i64..70_000)),
        4 => Value::from(rng.random::<f64>() * 1e6 - 5e5),
        5 => Value::from(
            *[
                0u64,
                1,
                2,
                4,
                8,
                16,
                17,
                512,
                1024,
                4096,
                65536,
                65537,
                4_294_967_295,
                4_294_967_296,
                u64::MAX,
            ]
            .choose(rng)
            .unwrap(),
        ),
        6 => Value::from(
            *[0.5, 4.0, -0.0, 1e300, 2048.0, 9_007_199_254_740_993.0]
                .choose(rng)
                .unwrap(),
        ),
        7 => Value::from(one_of(
            rng,
            "aws|gcp|azure|huawei|AWS|free|pro|enterprise|requested|idle|maintenance|deleted|start|stop|delete|",
        )),
        8 => Value::from(Uuid::now_v7().to_string()),
        9 => Value::from("+4915112345678"),
        10 => Value::from("a@b.co"),
        11 => Value::from("x".repeat(rng.random_range(0..2_000))),
        _ => Value::from(random_text(rng, 0..12)),
    };
    if depth == 0 || rng.random_bool(0.5) {
        return leaf(rng);
    }
    if rng.random_bool(0.4) {
        Value::Array(
            (0..rng.random_range(0..5))
                .map(|_| random_json(rng, depth - 1))
                .collect(),
        )
    } else {
        const KEYS: &str = "provider|cpu_cores|memory_mb|android_version|device_id|owner_id|user_id|tier|email|phone|reason|operations|op|max_devices|max_cpu_cores|max_memory_mb";
        let mut map = serde_json::Map::new();
        for _ in 0..rng.random_range(0..6) {
            let key = if rng.random_bool(0.8) {
                one_of(rng, KEYS).to_owned()
            } else {
                random_text(rng, 0..8)
            };
            map.insert(key, random_json(rng, depth - 1));
        }
        Value::Object(map)
    }
}

/// JSON text broken at the byte level.
fn broken_json(rng: &mut StdRng, valid: &Value) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(valid).unwrap();
    match rng.random_range(0..10) {
        0 => {
            let at = rng.random_range(0..=bytes.len());
            bytes.truncate(at);
        }
        1 => bytes = b"{\"cpu_cores\": 1e999, \"memory_mb\": -1e-999}".to_vec(),
        2 => {
            bytes = format!(
                "{}{}",
                "[".repeat(rng.random_range(100..5_000)),
                "]".repeat(rng.random_range(0..3))
            )
            .into_bytes()
        }
        3 => bytes = br#"{"provider": "\ud800", "reason": "\uDFFF\u0000"}"#.to_vec(),
        4 => bytes = random_bytes(rng, 0..200),
        5 => {
            bytes =
                br#"{"provider":"aws","provider":"gcp","cpu_cores":2,"memory_mb":2048,"android_version":14}"#.to_vec()
        }
        6 => {
            bytes.extend_from_slice(b" trailing garbage");
        }
        7 => bytes = [&b"\xef\xbb\xbf"[..], &bytes].concat(),
        _ => {
            for _ in 0..rng.random_range(1..6) {
                if bytes.is_empty() {
                    break;
                }
                let at = rng.random_range(0..bytes.len());
                match rng.random_range(0..3) {
                    0 => bytes[at] = rng.random(),
                    1 => {
                        bytes.remove(at);
                    }
                    _ => bytes.insert(at, *b"{}[]\",:\\0".choose(rng).unwrap()),
                }
            }
        }
    }
    bytes
}

fn content_type(rng: &mut StdRng) -> Option<&'static str> {
    [
        None,
        Some("text/plain"),
        Some("application/xml"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        Some("application/json; charset=utf-16"),
        Some("application/vnd.cloudphone+json"),
        Some("APPLICATION/JSON"),
        Some("application/jsonx"),
        Some(";;;"),
        Some("application/json, text/plain"),
    ]
    .choose(rng)
    .copied()
    .flatten()
}

fn valid_device_body(rng: &mut StdRng) -> Value {
    json!({
        "provider": one_of(rng, "aws|gcp|azure|alibaba|huawei"),
        "cpu_cores": rng.random_range(1..=4),
        "memory_mb": 512 * rng.random_range(2..=8),
        "android_version": rng.random_range(9..=15),
    })
}

/// A command route with a body that the API accepts for the right caller.
fn command_route(rng: &mut StdRng, world: &World) -> (Method, String, Value) {
    let (_, device) = world.device(rng);
    let (_, user, _) = world.user(rng);
    match rng.random_range(0..11) {
        0 => (
            Method::POST,
            "/v1/users".into(),
            json!({"tier": "pro", "email": "a@b.co", "phone": "+4915112345678"}),
        ),
        1 | 2 => (Method::POST, "/v1/devices".into(), valid_device_body(rng)),
        3 => (Method::POST, format!("/v1/devices/{device}/start"), Value::Null),
        4 => (
            Method::POST,
            format!("/v1/devices/{device}/stop"),
            json!({"reason": "idle"}),
        ),
        5 => (
            Method::POST,
            format!("/v1/devices/{device}/resize"),
            json!({"cpu_cores": 2, "memory_mb": 4096}),
        ),
        6 => (
            Method::POST,
            format!("/v1/devices/{device}/failure"),
            json!({"reason": "host lost"}),
        ),
        7 => (
            Method::PUT,
            format!("/v1/users/{user}/quota"),
            json!({"max_devices": 50, "max_cpu_cores": 500, "max_memory_mb": 1_000_000}),
        ),
        8 => (
            Method::PUT,
            format!("/v1/users/{user}/tier"),
            json!({"tier": "enterprise"}),
        ),
        9 => (
            Method::POST,
            "/v1/devices/batch".into(),
            json!({"operations": [{"op": "start", "device_id": device}, {"op": "stop", "device_id": device}]}),
        ),
        _ => (Method::DELETE, format!("/v1/devices/{device}"), Value::Null),
    }
}

fn probe(api: Api, kind: &'static str, method: Method, path: impl Into<String>) -> Probe {
    Probe {
        api,
        kind,
        method,
        path: path.into(),
        headers: Vec::new(),
        body: None,
        creates_for: None,
    }
}

impl Probe {
    fn header(mut self, name: &str, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.to_owned(), value.into()));
        self
    }

    fn bearer(self, token: &str) -> Self {
        self.header("authorization", format!("Bearer {token}"))
    }

    fn json(self, body: &Value) -> Self {
        let mut probe = self.header("content-type", "application/json");
        probe.body = Some(serde_json::to_vec(body).unwrap());
        probe
    }

    fn body(mut self, body: Vec<u8>) -> Self {
        self.body = Some(body);
        self
    }
}

/// A valid command for a user of the world, by the caller allowed to send it (mostly).
fn valid_command(rng: &mut StdRng, world: &World) -> Probe {
    let (owner, device) = world.device(rng);
    let owner_token = world.users[owner].1.clone();
    let (user_index, user, user_token) = world.user(rng);
    let mut probe = match rng.random_range(0..20) {
        0..=4 => {
            let mut p = probe(Api::Command, "valid create", Method::POST, "/v1/devices")
                .bearer(&user_token)
                .json(&valid_device_body(rng));
            p.creates_for = Some(user_index);
            p
        }
        5..=7 => probe(
            Api::Command,
            "valid start",
            Method::POST,
            format!("/v1/devices/{device}/start"),
        )
        .bearer(&owner_token),
        8..=10 => {
            let p = probe(
                Api::Command,
                "valid stop",
                Method::POST,
                format!("/v1/devices/{device}/stop"),
            )
            .bearer(&owner_token);
            match rng.random_range(0..3) {
                0 => p,
                1 => p.json(&json!({"reason": *["requested", "idle", "maintenance"].choose(rng).unwrap()})),
                _ => p.json(&Value::Null),
            }
        }
        11 => probe(
            Api::Command,
            "valid resize",
            Method::POST,
            format!("/v1/devices/{device}/resize"),
        )
        .bearer(&owner_token)
        .json(&json!({"cpu_cores": rng.random_range(1..=4), "memory_mb": 1024 * rng.random_range(1..=4)})),
        12 => probe(
            Api::Command,
            "valid failure",
            Method::POST,
            format!("/v1/devices/{device}/failure"),
        )
        .bearer(&world.service)
        .json(&json!({"reason": "provider reported the host lost"})),
        13 => probe(
            Api::Command,
            "valid delete",
            Method::DELETE,
            format!("/v1/devices/{device}"),
        )
        .bearer(&owner_token),
        14 => {
            let newcomer = Uuid::now_v7();
            probe(Api::Command, "valid register", Method::POST, "/v1/users")
                .bearer(&mint(&newcomer.to_string(), Role::User, &[]))
                .json(&json!({"tier": one_of(rng, "free|basic|pro|enterprise"),
                    "email": "someone@example.com", "phone": "+4915112345678"}))
        }
        15 => probe(
            Api::Command,
            "valid quota",
            Method::PUT,
            format!("/v1/users/{user}/quota"),
        )
        .bearer(&world.admin)
        .json(&json!({"max_devices": rng.random_range(20..200), "max_cpu_cores": 1_000, "max_memory_mb": 4_000_000})),
        16 => probe(
            Api::Command,
            "valid tier",
            Method::PUT,
            format!("/v1/users/{user}/tier"),
        )
        .bearer(&world.service)
        .json(&json!({"tier": *["pro", "enterprise"].choose(rng).unwrap()})),
        17 | 18 => {
            let devices = world.devices.lock().unwrap();
            let mine: Vec<Uuid> = devices.iter().filter(|(o, _)| *o == owner).map(|(_, d)| *d).collect();
            drop(devices);
            let operations: Vec<Value> = (0..rng.random_range(1..6))
                .map(|_| {
                    json!({"op": one_of(rng, "start|stop|delete|start"),
                        "device_id": *mine.choose(rng).unwrap_or(&device)})
                })
                .collect();
            probe(Api::Command, "valid batch", Method::POST, "/v1/devices/batch")
                .bearer(&owner_token)
                .json(&json!({"operations": operations}))
        }
        // Rarely: a user erases themselves (their later commands are then refused).
        _ if rng.random_bool(0.05) => {
            probe(Api::Command, "valid erase", Method::DELETE, format!("/v1/users/{user}")).bearer(&user_token)
        }
        _ => probe(
            Api::Command,
            "valid start",
            Method::POST,
            format!("/v1/devices/{device}/start"),
        )
        .bearer(&owner_token),
    };
    // Retries with a key from a small pool: replays, and keys reused for other requests.
    if rng.random_bool(0.2) {
        probe = probe.header("idempotency-key", format!("key-{}", rng.random_range(0..40)));
    }
    probe
}

fn fuzzed_command(rng: &mut StdRng, world: &World) -> Probe {
    let (method, path, valid) = command_route(rng, world);
    let (_, _, user_token) = world.user(rng);
    let token = match rng.random_range(0..4) {
        0 => world.admin.clone(),
        1 => world.service.clone(),
        _ => user_token,
    };
    match rng.random_range(0..14) {
        0 | 1 => {
            // One field replaced by anything, or removed, or one unknown field added.
            let mut body = valid.clone();
            if let Some(object) = body.as_object_mut() {
                let keys: Vec<String> = object.keys().cloned().collect();
                match (rng.random_range(0..3), keys.choose(rng)) {
                    (0, Some(key)) => {
                        object.remove(key);
                    }
                    (1, _) => {
                        object.insert(random_text(rng, 1..6), random_json(rng, 2));
                    }
                    (_, Some(key)) => {
                        object.insert(key.clone(), random_json(rng, 3));
                    }
                    (_, None) => {}
                }
            }
            probe(Api::Command, "mutated field", method, path)
                .bearer(&token)
                .json(&body)
        }
        2 => probe(Api::Command, "random json", method, path)
            .bearer(&token)
            .json(&random_json(rng, 4)),
        3 | 4 => probe(Api::Command, "broken json", method, path)
            .bearer(&token)
            .header("content-type", "application/json")
            .body(broken_json(rng, &valid)),
        5 => {
            let p = probe(Api::Command, "content type", method, path).bearer(&token);
            let p = match content_type(rng) {
                Some(ct) => p.header("content-type", ct),
                None => p,
            };
            p.body(serde_json::to_vec(&valid).unwrap())
        }
        6 => {
            // Empty, whitespace, or over the 256 KiB limit.
            let body = match rng.random_range(0..4) {
                0 => Vec::new(),
                1 => b"   \n\t ".to_vec(),
                2 => {
                    let mut big = valid.clone();
                    if let Some(object) = big.as_object_mut() {
                        object.insert("reason".into(), Value::from("x".repeat(300 * 1024)));
                    }
                    serde_json::to_vec(&big).unwrap()
                }
                _ => vec![b' '; rng.random_range(257 * 1024..1024 * 1024)],
            };
            probe(Api::Command, "body size", method, path)
                .bearer(&token)
                .header("content-type", "application/json")
                .body(body)
        }
        7 | 8 => {
            let p = probe(Api::Command, "bad token", method, path).json(&valid);
            match bad_authorization(rng, world) {
                Some(value) => p.header("authorization", value),
                None => p,
            }
        }
        9 => {
            let bad = one_of(
                rng,
                "not-a-uuid|00000000-0000-0000-0000-00000000000g|%00|%F0%9F%A6%80|12345678123456781234567812345678123456781234567812345678|..|%2e%2e%2fusers|{id}|-1|00000000-0000-0000-0000-000000000000|ffffffff-ffff-ffff-ffff-ffffffffffff| ",
            );
            let long = "a".repeat(rng.random_range(1..10_000));
            let id = if rng.random_bool(0.1) { long.as_str() } else { bad };
            let path = match rng.random_range(0..7) {
                0 => format!("/v1/devices/{id}/start"),
                1 => format!("/v1/devices/{id}/stop"),
                2 => format!("/v1/devices/{id}/resize"),
                3 => format!("/v1/devices/{id}"),
                4 => format!("/v1/users/{id}/quota"),
                5 => format!("/v1/users/{id}/tier"),
                _ => format!("/v1/users/{id}"),
            };
            let method = if path.ends_with("quota") || path.ends_with("tier") {
                Method::PUT
            } else if path.matches('/').count() == 3 {
                Method::DELETE
            } else {
                Method::POST
            };
            probe(Api::Command, "bad id", method, path).bearer(&token).json(&valid)
        }
        10 => {
            let method = [
                Method::GET,
                Method::PUT,
                Method::PATCH,
                Method::HEAD,
                Method::OPTIONS,
                Method::TRACE,
                Method::from_bytes(b"FROB").unwrap(),
                Method::from_bytes(b"PROPFIND").unwrap(),
            ]
            .choose(rng)
            .unwrap()
            .clone();
            probe(Api::Command, "wrong method", method, path)
                .bearer(&token)
                .json(&valid)
        }
        11 => {
            let path = one_of(
                rng,
                "/|/v1|/v1/devices/|/v2/devices|/v1/devices/batch/start|/v1//devices|/v1/devices?x=1&&=&%zz|/openapi.json?%|/metrics/../v1/users|/v1/users/me|/healthz/x|/%ff%fe",
            );
            probe(Api::Command, "odd path", method, path)
                .bearer(&token)
                .json(&valid)
        }
        _ => {
            // Odd headers: idempotency keys, request ids, trace context, duplicates.
            let p = probe(Api::Command, "odd headers", method, path)
                .bearer(&token)
                .json(&valid);
            match rng.random_range(0..6) {
                0 => p.header("idempotency-key", ""),
                1 => p.header("idempotency-key", "k".repeat(rng.random_range(150..400))),
                2 => p.header("idempotency-key", "sp ace\x7f"),
                3 => p.header("idempotency-key", b"\xc3\xa9t\xc3\xa9".to_vec()),
                4 => p.header("traceparent", random_text(rng, 0..60)),
                _ => p
                    .header("traceparent", "00-00000000000000000000000000000000-0000000000000000-01")
                    .header("authorization", "Bearer second"),
            }
        }
    }
}

const GRAPHQL_QUERIES: &[&str] = &[
    "{ projectionStatus { name position head lagEvents lagSeconds } }",
    "query($f: DeviceFilterInput) { deviceStats(filter: $f) { rows { userId status provider deviceCount cpuCores memoryMb } totals { deviceCount cpuCores memoryMb } } }",
    "query($f: UsageFilter!, $g: UsageGroupBy) { dailyUsage(filter: $f, groupBy: $g) { rows { period minutes cost { amountMinor currency } } totals { minutes costs { amountMinor currency } } } }",
    "query($f: DeviceFilterInput, $o: DevicesOrderBy, $first: Int, $after: String, $last: Int, $before: String) { devices(filter: $f, orderBy: $o, first: $first, after: $after, last: $last, before: $before) { totalCount pageInfo { hasNextPage hasPreviousPage startCursor endCursor } edges { cursor node { id status provider cpuCores memoryMb androidVersion createdAt ownerId } } } }",
    "query($id: UUID!) { device(id: $id) { id provider status minutesUsed owner { id } usage(from: \"2026-01-01\", to: \"2026-01-31\") { totals { minutes } } } }",
    "query($id: UUID!, $p: BigInt) { user(id: $id, minPosition: $p) { id devices(first: 10) { totalCount nodes { id status } } stats { totals { deviceCount memoryMb } } } }",
];

fn graphql_variables(rng: &mut StdRng, world: &World) -> Value {
    let (_, device) = world.device(rng);
    let (_, user, _) = world.user(rng);
    let filters = [
        json!({"userId": user}),
        json!({"provider": "AWS"}),
        json!({"status": "RUNNING"}),
        json!({"from": "2026-01-01", "to": "2026-03-31", "userId": user}),
        Value::Null,
    ];
    let filter = filters.choose(rng).unwrap().clone();
    json!({
        "f": filter,
        "g": *["DAY", "WEEK", "MONTH"].choose(rng).unwrap(),
        "o": "CREATED_AT_DESC",
        "first": rng.random_range(1..50),
        "id": *[device, user].choose(rng).unwrap(),
        "p": 1,
    })
}

/// GraphQL text broken in the ways a parser and validator must refuse.
fn broken_query(rng: &mut StdRng) -> String {
    let valid = (*GRAPHQL_QUERIES.choose(rng).unwrap()).to_owned();
    match rng.random_range(0..12) {
        0 => {
            let mut chars: Vec<char> = valid.chars().collect();
            for _ in 0..rng.random_range(1..5) {
                let at = rng.random_range(0..chars.len());
                match rng.random_range(0..3) {
                    0 => {
                        chars.remove(at);
                    }
                    1 => chars.insert(
                        at,
                        *['{', '}', '(', ')', '$', '!', '@', ':', '"', '.', '#']
                            .choose(rng)
                            .unwrap(),
                    ),
                    _ => chars[at] = *['x', ' ', '\u{0}', '日', '\\'].choose(rng).unwrap(),
                }
            }
            chars.into_iter().collect()
        }
        1 => {
            let depth = rng.random_range(5..200);
            format!(
                "{{ devices(first: 2) {{ nodes {{ {} id {} }} }} }}",
                "owner { devices(first: 2) { nodes { ".repeat(depth),
                "} } }".repeat(depth)
            )
        }
        2 => format!(
            "{{ {} }}",
            (0..rng.random_range(10..1_000))
                .map(|i| format!("a{i}: projectionStatus {{ name }}"))
                .collect::<Vec<_>>()
                .join(" ")
        ),
        3 => "query { ...A } fragment A on Query { ...B } fragment B on Query { ...A }".into(),
        4 => "{ __schema { types { name fields { name type { name ofType { name ofType { name } } } } } } }".into(),
        5 => "{ devices(first: 1000000) { nodes { id } } }".into(),
        6 => "{ devices(first: -1, last: -5, after: \"not a cursor\") { nodes { id } } }".into(),
        7 => "{ dailyUsage(filter: {from: \"2026-02-30\", to: \"1900-01-01\"}) { totals { minutes } } }".into(),
        8 => "mutation { deleteEverything }".into(),
        9 => "subscription { events }".into(),
        10 => format!(
            "{}{}",
            "{".repeat(rng.random_range(1..10_000)),
            "}".repeat(rng.random_range(0..10))
        ),
        _ => random_text(rng, 0..200),
    }
}

fn query_request(rng: &mut StdRng, world: &World) -> Probe {
    let (_, user, user_token) = world.user(rng);
    let token = match rng.random_range(0..5) {
        0 => world.admin.clone(),
        1 => world.auditor.clone(),
        2 => mint("dashboards", Role::Service, &["dashboards:read"]),
        _ => user_token,
    };
    match rng.random_range(0..20) {
        0..=2 => {
            let query = *GRAPHQL_QUERIES.choose(rng).unwrap();
            let p = probe(Api::Query, "valid graphql", Method::POST, "/graphql")
                .bearer(&token)
                .json(&json!({"query": query, "variables": graphql_variables(rng, world)}));
            if rng.random_bool(0.1) {
                p.header("x-min-position", "1")
            } else {
                p
            }
        }
        3..=6 => probe(Api::Query, "broken graphql", Method::POST, "/graphql")
            .bearer(&token)
            .json(&json!({"query": broken_query(rng), "variables": graphql_variables(rng, world)})),
        7 | 8 => {
            // The right query with wrong variables.
            let query = *GRAPHQL_QUERIES.choose(rng).unwrap();
            let variables = match rng.random_range(0..4) {
                0 => random_json(rng, 3),
                1 => json!({"id": random_text(rng, 0..40), "first": random_json(rng, 1), "f": random_json(rng, 2)}),
                2 => {
                    let positions = [json!(-1), json!("9999999999999999999999"), json!(1.5), json!(i64::MAX)];
                    let position = positions.choose(rng).unwrap().clone();
                    json!({"p": position, "id": user})
                }
                _ => Value::from(random_text(rng, 0..10)),
            };
            let mut body = json!({"query": query, "variables": variables});
            if rng.random_bool(0.3) {
                body["operationName"] = random_json(rng, 0);
            }
            probe(Api::Query, "graphql variables", Method::POST, "/graphql")
                .bearer(&token)
                .json(&body)
        }
        9 | 10 => {
            let hash = match rng.random_range(0..4) {
                0 => PERSISTED_QUERY_SHA256.to_owned(),
                1 => format!("{:064x}", rng.random::<u128>()),
                2 => random_text(rng, 0..80),
                _ => PERSISTED_QUERY_SHA256.to_ascii_uppercase(),
            };
            let version = [json!(1), json!(1), json!(2), json!(-1), json!("1"), Value::Null]
                .choose(rng)
                .unwrap()
                .clone();
            let mut body = json!({"extensions": {"persistedQuery": {"version": version, "sha256Hash": hash}}});
            match rng.random_range(0..4) {
                0 => body["query"] = Value::from(PERSISTED_QUERY),
                1 => body["query"] = Value::from(broken_query(rng)),
                _ => {}
            }
            probe(Api::Query, "persisted query", Method::POST, "/graphql")
                .bearer(&token)
                .json(&body)
        }
        11 => {
            let body = match rng.random_range(0..5) {
                0 => br#"[{"query": "{ projectionStatus { name } }"}]"#.to_vec(),
                1 => random_bytes(rng, 0..100),
                2 => vec![b' '; rng.random_range(65 * 1024..300 * 1024)],
                3 => serde_json::to_vec(&random_json(rng, 4)).unwrap(),
                _ => broken_json(rng, &json!({"query": "{ projectionStatus { name } }"})),
            };
            let p = probe(Api::Query, "graphql body", Method::POST, "/graphql")
                .bearer(&token)
                .body(body);
            match content_type(rng) {
                Some(ct) => p.header("content-type", ct),
                None => p,
            }
        }
        12 | 13 => {
            let p = probe(Api::Query, "graphql bad token", Method::POST, "/graphql")
                .json(&json!({"query": GRAPHQL_QUERIES[0]}));
            match bad_authorization(rng, world) {
                Some(value) => p.header("authorization", value),
                None => p,
            }
        }
        14 => {
            let p = probe(Api::Query, "graphql headers", Method::POST, "/graphql")
                .bearer(&token)
                .json(&json!({"query": GRAPHQL_QUERIES[1]}));
            match rng.random_range(0..4) {
                0 => p.header("x-min-position", random_text(rng, 0..20)),
                1 => p.header("x-min-position", "-5"),
                2 => p.header("x-request-id", random_text(rng, 0..50)),
                _ => p.header("traceparent", "00-zz-01"),
            }
        }
        15 => {
            let method = [
                Method::GET,
                Method::PUT,
                Method::DELETE,
                Method::PATCH,
                Method::OPTIONS,
                Method::from_bytes(b"QUERY").unwrap(),
            ]
            .choose(rng)
            .unwrap()
            .clone();
            let path = one_of(
                rng,
                "/graphql|/graphql?query={projectionStatus{name}}|/v1/audit/events|/|/graphiql|/v1/audit",
            );
            probe(Api::Query, "query method", method, path).bearer(&token)
        }
        _ => audit_request(rng, world),
    }
}

fn audit_request(rng: &mut StdRng, world: &World) -> Probe {
    let (_, user, user_token) = world.user(rng);
    let (_, device) = world.device(rng);
    let token = match rng.random_range(0..4) {
        0 => world.admin.clone(),
        1 => world.auditor.clone(),
        2 => user_token,
        _ => world.service.clone(),
    };
    let mut params: Vec<String> = Vec::new();
    // Valid exports stay small: one stream, one user, or the first positions.
    match rng.random_range(0..3) {
        0 => params.push(format!("streamId={device}")),
        1 => params.push(format!("userId={user}&until={}", rng.random_range(0..50))),
        _ => params.push(format!("until={}", rng.random_range(0..30))),
    }
    for _ in 0..rng.random_range(0..4) {
        params.push(match rng.random_range(0..14) {
            0 => format!("userId={}", random_text(rng, 0..40)),
            1 => "streamId=not-a-uuid".to_owned(),
            2 => format!("eventType={}", one_of(rng, "DeviceCreated|device_created|Nope||%00")),
            3 => format!(
                "from={}",
                one_of(
                    rng,
                    "2026-01-01T00:00:00Z|yesterday|2026-13-45T99:00:00Z||+275760-09-13T00:00:00Z"
                )
            ),
            4 => "from=2030-01-01T00:00:00Z&to=2020-01-01T00:00:00Z".to_owned(),
            5 => format!(
                "after={}",
                one_of(rng, "-1|abc|9223372036854775807|9223372036854775808|1.5|")
            ),
            6 => format!("until={}", *["-7", "x", "0"].choose(rng).unwrap()),
            7 => format!("format={}", one_of(rng, "csv|ndjson|xml|CSV|")),
            8 => format!("personal={}", one_of(rng, "omit|decrypt|show|")),
            9 => format!("{}={}", random_text(rng, 1..8), random_text(rng, 0..8)),
            10 => "until=5&until=6".to_owned(),
            11 => "%zz=%".to_owned(),
            12 => "streamId".to_owned(),
            _ => "&&&=".to_owned(),
        });
    }
    let p = probe(
        Api::Query,
        "audit",
        Method::GET,
        format!("/v1/audit/events?{}", params.join("&")),
    )
    .bearer(&token);
    match rng.random_range(0..5) {
        0 => p.header("accept", "text/csv"),
        1 => {
            let mut p = p;
            p.headers.retain(|(name, _)| name != "authorization");
            match bad_authorization(rng, world) {
                Some(value) => p.header("authorization", value),
                None => p,
            }
        }
        _ => p,
    }
}

/// Broken HTTP framing, sent over a raw connection.
fn raw_request(rng: &mut StdRng, world: &World) -> RawProbe {
    let api = if rng.random_bool(0.5) { Api::Command } else { Api::Query };
    let path = match api {
        Api::Command => "/v1/devices",
        Api::Query => "/graphql",
    };
    let token = &world.users[0].1;
    let request_id = Uuid::now_v7();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\n\
         x-request-id: {request_id}\r\n"
    );
    let (kind, bytes, half_close): (&'static str, Vec<u8>, bool) = match rng.random_range(0..10) {
        0 => ("raw garbage", random_bytes(rng, 1..300), true),
        1 => (
            "raw version",
            format!("GET {path} HTTP/9.9\r\nhost: x\r\n\r\n").into_bytes(),
            false,
        ),
        2 => (
            "raw truncated body",
            format!("{head}content-length: 100\r\n\r\n{{\"provider\": \"aws\"").into_bytes(),
            true,
        ),
        3 => (
            "raw bad chunk",
            format!("{head}transfer-encoding: chunked\r\n\r\nZZ\r\nabc\r\n0\r\n\r\n").into_bytes(),
            false,
        ),
        4 => (
            "raw negative length",
            format!("{head}content-length: -1\r\n\r\n").into_bytes(),
            false,
        ),
        5 => (
            "raw length and chunked",
            format!("{head}content-length: 3\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n").into_bytes(),
            false,
        ),
        6 => (
            "raw huge header",
            format!(
                "{head}x-pad: {}\r\ncontent-length: 2\r\n\r\n{{}}",
                "a".repeat(rng.random_range(10_000..200_000))
            )
            .into_bytes(),
            false,
        ),
        7 => (
            "raw no host",
            format!("POST {path} HTTP/1.1\r\ncontent-length: 2\r\n\r\n{{}}").into_bytes(),
            false,
        ),
        8 => (
            "raw bad header",
            format!("POST {path} HTTP/1.1\r\nhost: x\r\nbad header\r\n\r\n").into_bytes(),
            false,
        ),
        _ => (
            "raw request line",
            format!(
                "{} /v1/devices{} HTTP/1.1\r\nhost: x\r\n\r\n",
                random_text(rng, 0..6),
                random_text(rng, 0..20)
            )
            .into_bytes(),
            false,
        ),
    };
    RawProbe {
        api,
        kind,
        bytes,
        half_close,
        request_id: (api == Api::Command).then_some(request_id),
    }
}

fn generate(rng: &mut StdRng, world: &World) -> Request {
    let roll = rng.random_range(0..100);
    Request::Http(match roll {
        0..=5 => valid_command(rng, world),
        6..=54 => fuzzed_command(rng, world),
        55..=97 => query_request(rng, world),
        _ => return Request::Raw(raw_request(rng, world)),
    })
}

struct Target {
    command: String,
    query: String,
}

impl Target {
    fn base(&self, api: Api) -> &str {
        match api {
            Api::Command => &self.command,
            Api::Query => &self.query,
        }
    }
}

fn describe(method: &Method, path: &str, headers: &[(String, Vec<u8>)], body: Option<&[u8]>) -> String {
    let headers: Vec<String> = headers
        .iter()
        .map(|(n, v)| format!("{n}: {}", String::from_utf8_lossy(&v[..v.len().min(120)])))
        .collect();
    let body = body.map(|b| String::from_utf8_lossy(&b[..b.len().min(300)]).into_owned());
    format!("{method} {} {headers:?} body={body:?}", clip(path, 200))
}

/// The first `n` characters of `text`.
fn clip(text: &str, n: usize) -> String {
    text.chars().take(n).collect()
}

async fn send(client: &reqwest::Client, target: &Target, index: usize, mut probe: Probe, world: &World) -> Record {
    let request_id = (probe.api == Api::Command).then(Uuid::now_v7);
    if let Some(id) = request_id {
        probe.headers.push(("x-request-id".into(), id.to_string().into_bytes()));
    }
    let oversized = probe.body.as_ref().is_some_and(|b| b.len() > 64 * 1024);
    let url = format!("{}{}", target.base(probe.api), probe.path);
    let mut request = client.request(probe.method.clone(), &url);
    for (name, value) in &probe.headers {
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_bytes(value)) {
            request = request.header(name, value);
        }
    }
    if let Some(body) = &probe.body {
        request = request.body(body.clone());
    }
    let mut summary = describe(&probe.method, &probe.path, &probe.headers, probe.body.as_deref());
    let batch = probe.path.starts_with("/v1/devices/batch");
    let mut record = Record {
        index,
        api: probe.api,
        kind: probe.kind,
        request_id,
        status: None,
        positions: Vec::new(),
        batch,
        summary: String::new(),
        oversized,
        raw: false,
        problem_json: false,
    };
    let response = match request.send().await {
        Ok(response) => response,
        Err(error) => {
            record.summary = format!("{summary} -> no answer: {error:?}");
            return record;
        }
    };
    let status = response.status().as_u16();
    record.problem_json = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"));
    let body = match response.bytes().await {
        Ok(body) => body,
        Err(error) => {
            record.summary = format!("{summary} -> {status}, body cut off: {error:?}");
            return record;
        }
    };
    record.status = Some(status);
    summary.push_str(&format!(
        " -> {status} {}",
        String::from_utf8_lossy(&body[..body.len().min(400)])
    ));
    record.summary = summary;
    if probe.api == Api::Command && (200..300).contains(&status) {
        let answer: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if batch {
            for item in answer["results"].as_array().into_iter().flatten() {
                if let Some(position) = item["result"]["position"].as_i64() {
                    record.positions.push(position);
                }
            }
        } else if let Some(position) = answer["position"].as_i64() {
            record.positions.push(position);
        }
        if let (Some(owner), Some(id), 201) = (probe.creates_for, answer["id"].as_str(), status) {
            world.devices.lock().unwrap().push((owner, id.parse().unwrap()));
        }
    }
    record
}

async fn send_raw(target: &Target, index: usize, probe: RawProbe) -> Record {
    let address = target.base(probe.api).trim_start_matches("http://").to_owned();
    let mut record = Record {
        index,
        api: probe.api,
        kind: probe.kind,
        request_id: probe.request_id,
        status: None,
        positions: Vec::new(),
        batch: false,
        summary: format!(
            "raw {:?}",
            String::from_utf8_lossy(&probe.bytes[..probe.bytes.len().min(300)])
        ),
        oversized: false,
        raw: true,
        problem_json: false,
    };
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(&address).await?;
        // The server may answer and close before it has read everything.
        let _ = stream.write_all(&probe.bytes).await;
        if probe.half_close {
            let _ = stream.shutdown().await;
        }
        let mut answer = Vec::new();
        let mut buffer = [0u8; 4096];
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    answer.extend_from_slice(&buffer[..n]);
                    // The status line is all we need.
                    if answer.windows(2).any(|w| w == b"\r\n") {
                        break;
                    }
                }
            }
        }
        Ok::<_, std::io::Error>(answer)
    };
    match tokio::time::timeout(Duration::from_secs(5), exchange).await {
        Ok(Ok(answer)) => {
            let line = String::from_utf8_lossy(&answer);
            record.status = line
                .strip_prefix("HTTP/1.1 ")
                .or_else(|| line.strip_prefix("HTTP/1.0 "))
                .and_then(|rest| rest.get(..3))
                .and_then(|code| code.parse().ok());
            record
                .summary
                .push_str(&format!(" -> {:?}", &line[..line.len().min(200)]));
        }
        Ok(Err(error)) => record.summary.push_str(&format!(" -> {error}")),
        Err(_) => record.summary.push_str(" -> no answer within 5 s"),
    }
    record
}

/// The address in the first entry of the JSON log `log` whose message is `message`.
async fn listening_address(log: &Path, message: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let found = text
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .find(|entry| entry["message"] == message);
        if let Some(entry) = found {
            return format!("http://{}", entry["address"].as_str().unwrap());
        }
        assert!(Instant::now() < deadline, "no `{message}` in the log:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn start_serve(url: &str, log: &Path) -> KillOnDrop {
    let file = std::fs::File::create(log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_cloudphone"))
        .arg("serve")
        .env("CLOUDPHONE_DATABASE_URL", url)
        .env("CLOUDPHONE_DATABASE_MAX_CONNECTIONS", "10")
        .env("CLOUDPHONE_COMMAND_LISTEN", "127.0.0.1:0")
        .env("CLOUDPHONE_QUERY_LISTEN", "127.0.0.1:0")
        .env("CLOUDPHONE_OPS_LISTEN", "127.0.0.1:0")
        .env("CLOUDPHONE_LOG_FORMAT", "json")
        .env("CLOUDPHONE_LOG", "warn,cloudphone=info")
        // A query naming a position past the projections waits at most this long.
        .env("CLOUDPHONE_READ_YOUR_WRITES_WAIT_MS", "100")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .unwrap();
    KillOnDrop(child)
}

/// Registers the world's users (enterprise tier) with two devices each.
async fn populate(client: &reqwest::Client, target: &Target, records: &mut Vec<Record>) -> World {
    let mut users = Vec::new();
    for _ in 0..USERS {
        let id = Uuid::now_v7();
        users.push((id, mint(&id.to_string(), Role::User, &[])));
    }
    let world = World {
        users,
        admin: mint(&Uuid::now_v7().to_string(), Role::Admin, &[]),
        service: mint(
            "billing",
            Role::Service,
            &["users:write", "devices:write", "devices:report"],
        ),
        auditor: mint("auditor", Role::Auditor, &[]),
        devices: Mutex::new(Vec::new()),
    };
    let mut index = REQUESTS;
    for (u, (_, token)) in world.users.iter().enumerate() {
        let register = probe(Api::Command, "setup", Method::POST, "/v1/users")
            .bearer(token)
            .json(&json!({"tier": "enterprise", "email": "someone@example.com", "phone": "+4915112345678"}));
        let record = send(client, target, index, register, &world).await;
        assert_eq!(record.status, Some(201), "{}", record.summary);
        records.push(record);
        index += 1;
        for _ in 0..2 {
            let mut create = probe(Api::Command, "setup", Method::POST, "/v1/devices")
                .bearer(token)
                .json(&json!({"provider": "aws", "cpu_cores": 2, "memory_mb": 2048, "android_version": 14}));
            create.creates_for = Some(u);
            let record = send(client, target, index, create, &world).await;
            assert_eq!(record.status, Some(201), "{}", record.summary);
            records.push(record);
            index += 1;
        }
    }
    world
}

#[sqlx::test(migrations = false)]
async fn a_hundred_thousand_fuzzed_requests_cause_no_5xx_no_panic_and_no_partial_write(pool: PgPool) {
    let seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("FUZZ_SEED={seed}");
    let url = urls::database(&pool).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serve.log");
    let mut serve = start_serve(&url, &log);
    let target = Target {
        command: listening_address(&log, "command API listening").await,
        query: listening_address(&log, "query API listening").await,
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(CONCURRENCY)
        .build()
        .unwrap();

    let mut records = Vec::new();
    let world = Arc::new(populate(&client, &target, &mut records).await);
    // Register the persisted query once, so its hash alone also finds it.
    let register = probe(Api::Query, "setup", Method::POST, "/graphql")
        .bearer(&world.admin)
        .json(&json!({"query": PERSISTED_QUERY, "extensions": {"persistedQuery": {"version": 1, "sha256Hash": PERSISTED_QUERY_SHA256}}}));
    let record = send(&client, &target, REQUESTS + records.len(), register, &world).await;
    assert_eq!(record.status, Some(200), "{}", record.summary);

    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let target = Arc::new(target);
    let mut workers = Vec::new();
    for _ in 0..CONCURRENCY {
        let (next, target, world, client) = (next.clone(), target.clone(), world.clone(), client.clone());
        workers.push(tokio::spawn(async move {
            let mut records = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= REQUESTS {
                    return records;
                }
                if index > 0 && index % 10_000 == 0 {
                    println!("{index} requests after {:.1?}", started.elapsed());
                }
                let mut rng = StdRng::seed_from_u64(seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                records.push(match generate(&mut rng, &world) {
                    Request::Http(probe) => send(&client, &target, index, probe, &world).await,
                    Request::Raw(probe) => send_raw(&target, index, probe).await,
                });
            }
        }));
    }
    for worker in workers {
        records.extend(worker.await.unwrap());
    }
    let elapsed = started.elapsed();
    println!(
        "{REQUESTS} requests in {elapsed:.1?}: {:.0} requests/s",
        REQUESTS as f64 / elapsed.as_secs_f64()
    );

    // The status histogram, per API and per kind of request.
    let mut histogram: BTreeMap<(Api, Option<u16>), usize> = BTreeMap::new();
    let mut by_kind: BTreeMap<&str, BTreeMap<Option<u16>, usize>> = BTreeMap::new();
    for record in &records {
        *histogram.entry((record.api, record.status)).or_default() += 1;
        *by_kind
            .entry(record.kind)
            .or_default()
            .entry(record.status)
            .or_default() += 1;
    }
    println!("statuses (None: no HTTP answer):");
    for ((api, status), count) in &histogram {
        println!("  {api:?} {status:?}: {count}");
    }
    for (kind, statuses) in &by_kind {
        println!("  {kind}: {statuses:?}");
    }

    // Zero 5xx.
    let server_errors: Vec<&Record> = records.iter().filter(|r| r.status.is_some_and(|s| s >= 500)).collect();
    assert!(
        server_errors.is_empty(),
        "{} answers were 5xx (reproduce with FUZZ_SEED={seed}), e.g.:\n{}",
        server_errors.len(),
        first_few(&server_errors)
    );
    // Every request through a client got an answer, except oversized bodies (the server may
    // refuse them and close before the client has sent everything) and broken framing.
    let unanswered: Vec<&Record> = records
        .iter()
        .filter(|r| r.status.is_none() && !r.oversized && !r.raw)
        .collect();
    assert!(
        unanswered.is_empty(),
        "{} requests got no answer (FUZZ_SEED={seed}), e.g.:\n{}",
        unanswered.len(),
        first_few(&unanswered)
    );
    // Refusals by the command API are problem documents.
    let not_problems: Vec<&Record> = records
        .iter()
        .filter(|r| r.api == Api::Command && !r.raw && r.status.is_some_and(|s| s >= 400) && !r.problem_json)
        .collect();
    assert!(
        not_problems.is_empty(),
        "{} command API refusals were not problem+json (FUZZ_SEED={seed}), e.g.:\n{}",
        not_problems.len(),
        first_few(&not_problems)
    );
    // The fuzzing reached writes and refusals.
    let accepted = records
        .iter()
        .filter(|r| r.api == Api::Command && r.status.is_some_and(|s| (200..300).contains(&s)))
        .count();
    assert!(accepted > 1_000, "only {accepted} commands were accepted");

    // Alive, and no panic.
    assert!(serve.0.try_wait().unwrap().is_none(), "cloudphone serve died");
    let text = String::from_utf8_lossy(&std::fs::read(&log).unwrap()).into_owned();
    let panics: Vec<&str> = text.lines().filter(|l| l.contains("panicked")).take(5).collect();
    assert!(panics.is_empty(), "cloudphone serve panicked:\n{}", panics.join("\n"));
    let errors: Vec<&str> = text.lines().filter(|l| l.contains("\"level\":\"ERROR\"")).collect();
    println!(
        "server log: {} lines, {} errors{}",
        text.lines().count(),
        errors.len(),
        errors.iter().take(5).map(|l| format!("\n  {l}")).collect::<String>()
    );

    no_partial_writes(&pool, &records, seed).await;

    let verify = Command::new(env!("CARGO_BIN_EXE_cloudphone"))
        .arg("verify")
        .env("CLOUDPHONE_DATABASE_URL", &url)
        .env("CLOUDPHONE_LOG", "warn")
        .output()
        .unwrap();
    let head: i64 = sqlx::query_scalar("SELECT position FROM log_head")
        .fetch_one(&pool)
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&verify.stdout);
    assert!(
        verify.status.success() && stdout.contains(&format!("verified {head} events")),
        "cloudphone verify: {stdout}{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    println!("{}", stdout.trim());
    drop(serve);
}

fn first_few(records: &[&Record]) -> String {
    records
        .iter()
        .take(8)
        .map(|r| format!("  #{} {:?} {}: {}", r.index, r.api, r.kind, r.summary))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every event belongs to a command answered 2xx and ends where its answer said; nothing
/// else is in the log.
async fn no_partial_writes(pool: &PgPool, records: &[Record], seed: u64) {
    let head: i64 = sqlx::query_scalar("SELECT position FROM log_head")
        .fetch_one(pool)
        .await
        .unwrap();
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM user_events_all")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(count, head, "positions are dense");

    let groups: Vec<(Option<Uuid>, Vec<i64>)> = sqlx::query_as(
        "SELECT (metadata->>'correlation_id')::uuid, array_agg(position ORDER BY position)
         FROM user_events_all GROUP BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let by_request: HashMap<Uuid, &Record> = records.iter().filter_map(|r| Some((r.request_id?, r))).collect();
    let mut problems = Vec::new();
    let mut accepted_events = 0;
    let mut unanswered_writes = 0;
    let mut written_by = HashMap::new();
    for (correlation, positions) in &groups {
        let Some(record) = correlation.and_then(|c| by_request.get(&c)) else {
            problems.push(format!(
                "{} events at {positions:?} belong to no request sent ({correlation:?})",
                positions.len()
            ));
            continue;
        };
        written_by.insert(record.request_id, positions);
        let contiguous = positions.windows(2).all(|w| w[1] == w[0] + 1);
        if record.status.is_none() && record.oversized && !record.batch && contiguous {
            // A command with a body the handler never reads (start, delete) may be answered
            // before the client has sent it all, and the client loses the answer: a whole
            // write whose acknowledgement went missing, not a partial one.
            unanswered_writes += 1;
            accepted_events += positions.len() as i64;
            continue;
        }
        if !record.status.is_some_and(|s| (200..300).contains(&s)) {
            problems.push(format!(
                "a refused request wrote events {positions:?}: #{} {}",
                record.index, record.summary
            ));
            continue;
        }
        accepted_events += positions.len() as i64;
        if record.batch {
            // Each item is its own append: the last event is the last item's that wrote.
            let reported_here: Vec<i64> = record
                .positions
                .iter()
                .copied()
                .filter(|p| positions.contains(p))
                .collect();
            if reported_here.iter().max() != positions.last() {
                problems.push(format!(
                    "batch #{} reported {:?} but wrote {positions:?}: {}",
                    record.index, record.positions, record.summary
                ));
            }
        } else if record.positions != [*positions.last().unwrap()] || !contiguous {
            problems.push(format!(
                "#{} reported {:?} but wrote {positions:?}: {}",
                record.index, record.positions, record.summary
            ));
        }
    }
    // An accepted command that wrote nothing (a no-op, an idempotent replay) reports a
    // position that exists.
    for record in records {
        if record.status.is_some_and(|s| (200..300).contains(&s))
            && !written_by.contains_key(&record.request_id)
            && let Some(p) = record.positions.iter().find(|p| !(1..=head).contains(*p))
        {
            problems.push(format!(
                "#{} reported position {p} past the head {head}: {}",
                record.index, record.summary
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{} partial or unacknowledged writes (FUZZ_SEED={seed}):\n{}",
        problems.len(),
        problems.iter().take(8).cloned().collect::<Vec<_>>().join("\n")
    );
    assert_eq!(
        accepted_events, count,
        "the log holds exactly the events of accepted commands"
    );
    println!(
        "{count} events in the log, all written by the {} accepted commands that wrote \
         ({unanswered_writes} of them oversized requests whose answer the client lost)",
        written_by.len()
    );

    // Each creation with its reservation, dense stream versions, streams table in step.
    let orphans: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM user_events_all d WHERE d.event_type = 'DeviceCreated' AND NOT EXISTS (
             SELECT 1 FROM user_events_all r WHERE r.event_type = 'QuotaReserved'
             AND r.payload->>'device_id' = d.stream_id::text)",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(orphans, 0, "devices created without their quota reservation");
    let gaps: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT stream_id, max(stream_version) AS v, count(*) AS n
             FROM user_events_all GROUP BY stream_id) s
         LEFT JOIN streams t USING (stream_id) WHERE s.v <> s.n OR t.version IS DISTINCT FROM s.v",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(
        gaps, 0,
        "streams whose versions have gaps or disagree with the streams table"
    );
}
