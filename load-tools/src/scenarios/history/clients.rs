//! Portal clients: users registered first (their quota raised by an admin), then random device
//! operations, one at a time per client, each with its own Idempotency-Key, retried with that
//! key after a 503 or a transport error (a portal's retry) until answered for good or given
//! up. Some operations are invalid on purpose, so refusals happen; every one is recorded with
//! its invocation and outcome for the checker.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::bail;
use event_schema::{Quota, Tier};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::Method;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::record::{Operation, Outcome, Request};

/// The clock every client times its operations on.
#[derive(Debug, Clone, Copy)]
pub struct Clock(pub Instant);

impl Clock {
    pub fn now_us(&self) -> u64 {
        u64::try_from(self.0.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}

/// How the clients behave.
#[derive(Debug, Clone)]
pub struct Portal {
    pub http: reqwest::Client,
    /// The command API.
    pub base: String,
    pub admin_token: String,
    pub clock: Clock,
    /// Between two operations of one client.
    pub pause: Duration,
    /// Longest a client retries one operation.
    pub give_up: Duration,
    /// Percent of operations given up at their first 503 or transport error (a portal user
    /// who closes the tab): they leave indeterminate operations behind.
    pub abandon_percent: u32,
    /// Percent of operations that are invalid on purpose.
    pub invalid_percent: u32,
    /// After this, in-flight operations are given up (the run is over).
    pub hard_stop: CancellationToken,
}

/// A user a client acts for, and what the client believes of their devices.
#[derive(Debug)]
pub struct Tenant {
    pub user: Uuid,
    pub token: String,
    devices: Vec<Known>,
    /// Devices deleted (or found missing): targets of invalid operations.
    gone: Vec<(Uuid, String)>,
    references: u32,
}

impl Tenant {
    pub fn new(user: Uuid, token: String) -> Self {
        Tenant {
            user,
            token,
            devices: Vec::new(),
            gone: Vec::new(),
            references: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Belief {
    Stopped,
    Running,
    /// An operation on it was given up: it may have been applied.
    Unknown,
}

#[derive(Debug, Clone)]
struct Known {
    id: Uuid,
    reference: String,
    belief: Belief,
    cpu_cores: u32,
}

/// One request to send: what it asks, and how.
struct Call {
    request: Request,
    device: Option<Uuid>,
    method: Method,
    path: String,
    body: Option<Value>,
}

/// How one attempt was answered.
enum Answer {
    Final(Outcome),
    /// 503, 429, a concurrency conflict or a transport error: try again with the same key.
    Retry(String),
    /// A 5xx other than 503, or a malformed 2xx: recorded, and tried again.
    ServerError(String),
}

impl Portal {
    /// Sends `call` with one Idempotency-Key until it is answered for good or given up.
    async fn perform(&self, client: usize, user: Uuid, token: &str, call: Call, rng: &mut StdRng) -> Operation {
        let key = Uuid::now_v7().to_string();
        let invoked_us = self.clock.now_us();
        let started = Instant::now();
        let mut attempts = 0;
        let mut server_errors = Vec::new();
        let mut retried_after: BTreeMap<String, u32> = BTreeMap::new();
        let outcome = loop {
            attempts += 1;
            let mut request = self
                .http
                .request(call.method.clone(), format!("{}{}", self.base, call.path))
                .bearer_auth(token)
                .header("idempotency-key", &key);
            if let Some(body) = &call.body {
                request = request.json(body);
            }
            let reason = match classify(request.send().await).await {
                Answer::Final(outcome) => break outcome,
                Answer::Retry(reason) => reason,
                Answer::ServerError(error) => {
                    server_errors.push(error.clone());
                    error
                }
            };
            *retried_after
                .entry(reason.split(':').next().unwrap_or_default().to_owned())
                .or_insert(0) += 1;
            let abandon = attempts == 1 && rng.random_range(0..100) < self.abandon_percent;
            if abandon || started.elapsed() > self.give_up || self.hard_stop.is_cancelled() {
                break Outcome::Indeterminate { reason };
            }
            let backoff = Duration::from_millis(rng.random_range(100..300));
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = self.hard_stop.cancelled() => {}
            }
        };
        Operation {
            id: 0,
            client,
            user,
            device: call.device,
            request: call.request,
            key,
            invoked_us,
            completed_us: self.clock.now_us(),
            attempts,
            server_errors,
            retried_after,
            outcome,
        }
    }

    /// Registers the tenant's user (enterprise tier) and raises their quota as an admin; both
    /// must be acknowledged.
    pub async fn provision(&self, client: usize, tenant: &Tenant, seed: u64) -> anyhow::Result<Vec<Operation>> {
        let mut rng = StdRng::seed_from_u64(seed);
        let email = format!("history.{}@example.com", tenant.user.simple());
        let phone = "+4915112345678".to_owned();
        let register = Call {
            request: Request::Register {
                tier: Tier::Enterprise,
                email: email.clone(),
                phone: phone.clone(),
            },
            device: None,
            method: Method::POST,
            path: "/v1/users".into(),
            body: Some(json!({"tier": "enterprise", "email": email, "phone": phone})),
        };
        let quota = Quota {
            max_devices: 100_000,
            max_cpu_cores: 1_600_000,
            max_memory_mb: 4_000_000_000,
        };
        let raise = Call {
            request: Request::SetQuota { quota },
            device: None,
            method: Method::PUT,
            path: format!("/v1/users/{}/quota", tenant.user),
            body: Some(json!(quota)),
        };
        let registered = self
            .perform(client, tenant.user, &tenant.token, register, &mut rng)
            .await;
        let raised = self
            .perform(client, tenant.user, &self.admin_token, raise, &mut rng)
            .await;
        for op in [&registered, &raised] {
            if !matches!(op.outcome, Outcome::Acknowledged { .. }) {
                bail!("provisioning {}: {} {:?}", tenant.user, op.request.name(), op.outcome);
            }
        }
        Ok(vec![registered, raised])
    }

    /// One portal client: random operations on its tenants' devices until `stop`.
    pub async fn drive(
        self,
        client: usize,
        mut tenants: Vec<Tenant>,
        seed: u64,
        stop: CancellationToken,
    ) -> Vec<Operation> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut operations = Vec::new();
        while !stop.is_cancelled() && !tenants.is_empty() {
            let which = rng.random_range(0..tenants.len());
            let tenant = &mut tenants[which];
            let call = self.choose(client, tenant, &mut rng);
            let operation = self
                .perform(client, tenant.user, &tenant.token.clone(), call, &mut rng)
                .await;
            learn(tenant, &operation);
            operations.push(operation);
            if !self.pause.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(self.pause) => {}
                    () = stop.cancelled() => {}
                }
            }
        }
        operations
    }

    /// The next operation: mostly what fits the tenant's fleet as the client believes it;
    /// `invalid_percent` of the time one that should be refused.
    fn choose(&self, client: usize, tenant: &mut Tenant, rng: &mut StdRng) -> Call {
        let roll = rng.random_range(0..100);
        if tenant.devices.len() < 2 || (roll < 10 && tenant.devices.len() < 8) {
            tenant.references += 1;
            let reference = format!("c{client}/d{}", tenant.references);
            return create(tenant.user, &reference, "aws", 2);
        }
        if roll >= 100 - self.invalid_percent {
            return invalid(client, tenant, rng);
        }
        let index = rng.random_range(0..tenant.devices.len());
        let device = tenant.devices[index].clone();
        let pick = rng.random_range(0..100);
        let request = match device.belief {
            Belief::Running if pick < 90 => Request::Stop,
            Belief::Running => Request::Delete,
            Belief::Stopped if pick < 60 => Request::Start,
            Belief::Stopped if pick < 90 => resize(device.cpu_cores, rng),
            Belief::Stopped => Request::Delete,
            Belief::Unknown => match pick % 4 {
                0 => Request::Start,
                1 => Request::Stop,
                2 => resize(device.cpu_cores, rng),
                _ => Request::Delete,
            },
        };
        on_device(device.id, request)
    }
}

/// A create with a reference (the device id is derived from the owner and it).
fn create(user: Uuid, reference: &str, provider: &str, cpu_cores: u32) -> Call {
    let device = domain::ids::check_device_reference(reference)
        .ok()
        .map(|reference| domain::ids::device_id_for_reference(user, reference));
    let memory_mb = cpu_cores.saturating_mul(1024);
    Call {
        request: Request::Create {
            reference: reference.to_owned(),
            provider: provider.to_owned(),
            cpu_cores,
            memory_mb,
            android_version: 14,
        },
        device,
        method: Method::POST,
        path: "/v1/devices".into(),
        body: Some(json!({
            "reference": reference,
            "provider": provider,
            "cpu_cores": cpu_cores,
            "memory_mb": memory_mb,
            "android_version": 14,
        })),
    }
}

/// Another size than `cpu_cores` (one time in twenty the same: a no-op).
fn resize(cpu_cores: u32, rng: &mut StdRng) -> Request {
    let cores = if rng.random_range(0..20) == 0 {
        cpu_cores
    } else if cpu_cores == 2 {
        4
    } else {
        2
    };
    Request::Resize {
        cpu_cores: cores,
        memory_mb: cores * 1024,
    }
}

fn on_device(device: Uuid, request: Request) -> Call {
    let (method, path, body) = match &request {
        Request::Start => (Method::POST, format!("/v1/devices/{device}/start"), None),
        Request::Stop => (Method::POST, format!("/v1/devices/{device}/stop"), None),
        Request::Resize { cpu_cores, memory_mb } => (
            Method::POST,
            format!("/v1/devices/{device}/resize"),
            Some(json!({"cpu_cores": cpu_cores, "memory_mb": memory_mb})),
        ),
        _ => (Method::DELETE, format!("/v1/devices/{device}"), None),
    };
    Call {
        request,
        device: Some(device),
        method,
        path,
        body,
    }
}

/// An operation the platform should refuse, whatever the client believes.
fn invalid(client: usize, tenant: &mut Tenant, rng: &mut StdRng) -> Call {
    let known = &tenant.devices[rng.random_range(0..tenant.devices.len())];
    match rng.random_range(0..8) {
        // A second create with a reference in use (or once used).
        0 => {
            let reference = match tenant.gone.first() {
                Some((_, reference)) if rng.random_bool(0.5) => reference.clone(),
                _ => known.reference.clone(),
            };
            create(tenant.user, &reference, "aws", 2)
        }
        1 => {
            tenant.references += 1;
            create(tenant.user, &format!("c{client}/d{}", tenant.references), "mars", 2)
        }
        2 => create(tenant.user, "not a reference", "aws", 2),
        3 => {
            tenant.references += 1;
            create(tenant.user, &format!("c{client}/d{}", tenant.references), "aws", 99)
        }
        4 => on_device(Uuid::now_v7(), Request::Start),
        5 => match tenant.gone.last() {
            Some((id, _)) => on_device(*id, Request::Stop),
            None => on_device(
                known.id,
                Request::Resize {
                    cpu_cores: 99,
                    memory_mb: 2048,
                },
            ),
        },
        // The transition the device is in already.
        _ => match known.belief {
            Belief::Running => on_device(known.id, Request::Start),
            _ => on_device(known.id, Request::Stop),
        },
    }
}

/// What the client learns of its tenant's fleet from an operation's outcome.
fn learn(tenant: &mut Tenant, operation: &Operation) {
    let Some(device) = operation.device else {
        return;
    };
    let position = tenant.devices.iter().position(|d| d.id == device);
    let set = |tenant: &mut Tenant, belief: Belief| match position {
        Some(i) => tenant.devices[i].belief = belief,
        None => {
            if let Request::Create {
                reference, cpu_cores, ..
            } = &operation.request
            {
                // A reference whose device was missing can be created after all.
                tenant.gone.retain(|(id, _)| *id != device);
                tenant.devices.push(Known {
                    id: device,
                    reference: reference.clone(),
                    belief,
                    cpu_cores: *cpu_cores,
                });
            }
        }
    };
    let forget = |tenant: &mut Tenant| {
        if let Some(i) = position {
            let gone = tenant.devices.swap_remove(i);
            tenant.gone.push((gone.id, gone.reference));
        }
    };
    match &operation.outcome {
        Outcome::Acknowledged { .. } => match &operation.request {
            Request::Create { .. } | Request::Stop => set(tenant, Belief::Stopped),
            Request::Start => set(tenant, Belief::Running),
            Request::Resize { cpu_cores, .. } => {
                if let Some(i) = position {
                    tenant.devices[i].cpu_cores = *cpu_cores;
                }
            }
            Request::Delete => forget(tenant),
            Request::Register { .. } | Request::SetQuota { .. } => {}
        },
        Outcome::Refused { code, .. } => match code.as_str() {
            "device_already_running" | "device_running" => set(tenant, Belief::Running),
            "device_not_running" => set(tenant, Belief::Stopped),
            "device_deleted" | "device_not_found" => forget(tenant),
            // Made by a create given up earlier.
            "device_already_exists" => set(tenant, Belief::Unknown),
            _ => {}
        },
        Outcome::Indeterminate { .. } => set(tenant, Belief::Unknown),
    }
}

/// Sorts one answer into what the client does next.
async fn classify(answer: Result<reqwest::Response, reqwest::Error>) -> Answer {
    let answer = match answer {
        Ok(answer) => answer,
        Err(error) => {
            let kind = if error.is_timeout() {
                "timeout"
            } else if error.is_connect() {
                "connect"
            } else {
                "transport"
            };
            return Answer::Retry(kind.to_owned());
        }
    };
    let status = answer.status();
    let body: Value = match answer.text().await {
        Ok(text) => serde_json::from_str(&text).unwrap_or(Value::String(text)),
        Err(_) => return Answer::Retry(format!("{} body cut off", status.as_u16())),
    };
    let code = body["code"].as_str().unwrap_or("-").to_owned();
    let status = status.as_u16();
    match status {
        200..=299 => match (
            body["id"].as_str().and_then(|id| id.parse::<Uuid>().ok()),
            body["stream_version"].as_i64(),
            body["position"].as_i64(),
        ) {
            (Some(id), Some(stream_version), Some(position)) => Answer::Final(Outcome::Acknowledged {
                id,
                stream_version,
                position,
            }),
            _ => Answer::ServerError(format!("{status} malformed: {body}")),
        },
        503 | 429 => Answer::Retry(format!("{status} {code}")),
        // "retry the request", the problem document says.
        409 if code == "concurrency_conflict" => Answer::Retry(format!("{status} {code}")),
        500..=599 => Answer::ServerError(format!("{status} {code}: {body}")),
        _ => Answer::Final(Outcome::Refused { status, code }),
    }
}
