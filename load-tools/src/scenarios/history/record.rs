//! What the portal clients asked and were told, and the log as read back afterwards: the two
//! inputs of the checker. Times are microseconds since the run started, on one monotonic
//! clock shared by every client.

use std::collections::BTreeMap;

use domain::device::DeviceCommand;
use domain::user::UserCommand;
use event_schema::{Event, EventEnvelope, Personal, Quota, StopReason, StreamType, Tier};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One client operation: a command sent with its own Idempotency-Key, retried with that key
/// until answered for good or given up.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Operation {
    /// Its index in the history.
    pub id: usize,
    pub client: usize,
    /// The user the command acts for: the owner of the device, or the user commanded.
    pub user: Uuid,
    /// The device stream a device command is about (for a create, the id the server derives
    /// from the owner and the reference); `None` for user commands and for a create whose
    /// reference is malformed (no id can be derived).
    pub device: Option<Uuid>,
    pub request: Request,
    /// The Idempotency-Key every attempt carried; the log stores it in each event's metadata.
    pub key: String,
    /// When the first attempt was sent.
    pub invoked_us: u64,
    /// When the final answer came, or when the client gave up.
    pub completed_us: u64,
    pub attempts: u32,
    /// Answers that were 5xx other than 503 (or malformed 2xx): promises broken even when a
    /// retry was then answered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub server_errors: Vec<String>,
    /// Why attempts were retried: `503 unavailable`, `timeout`, `connect`, ... with counts.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub retried_after: BTreeMap<String, u32>,
    pub outcome: Outcome,
}

/// What the client asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    Register {
        tier: Tier,
        email: String,
        phone: String,
    },
    SetQuota {
        quota: Quota,
    },
    Create {
        reference: String,
        provider: String,
        cpu_cores: u32,
        memory_mb: u32,
        android_version: u32,
    },
    Start,
    Stop,
    Resize {
        cpu_cores: u32,
        memory_mb: u32,
    },
    Delete,
}

/// A command of either aggregate, as the command API turns a request into one.
#[derive(Debug, Clone)]
pub enum Command {
    User(UserCommand),
    Device(DeviceCommand),
}

impl Request {
    /// A short name for summaries.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Register { .. } => "register",
            Request::SetQuota { .. } => "set_quota",
            Request::Create { .. } => "create",
            Request::Start => "start",
            Request::Stop => "stop",
            Request::Resize { .. } => "resize",
            Request::Delete => "delete",
        }
    }

    /// The event one application of the command writes exactly once to its own stream:
    /// counting them counts applications.
    pub fn primary_event(&self) -> &'static str {
        match self {
            Request::Register { .. } => "UserRegistered",
            Request::SetQuota { .. } => "QuotaChanged",
            Request::Create { .. } => "DeviceCreated",
            Request::Start => "DeviceStarted",
            Request::Stop => "DeviceStopped",
            Request::Resize { .. } => "DeviceResized",
            Request::Delete => "DeviceDeleted",
        }
    }

    /// The refusal the command API gives this request before any state is read (the route's
    /// own validation), if any.
    pub fn refused_by_route(&self) -> Option<&'static str> {
        match self {
            Request::Create { reference, .. } => domain::ids::check_device_reference(reference)
                .err()
                .map(|error| error.code()),
            _ => None,
        }
    }

    /// The domain command the command API decides for this request on `device` of `user`.
    pub fn command(&self, user: Uuid, device: Option<Uuid>) -> Option<Command> {
        Some(match self {
            Request::Register { tier, email, phone } => Command::User(UserCommand::Register {
                user_id: user,
                tier: *tier,
                email: Personal::new(email.clone()),
                phone: Personal::new(phone.clone()),
            }),
            Request::SetQuota { quota } => Command::User(UserCommand::SetQuota { quota: *quota }),
            Request::Create {
                provider,
                cpu_cores,
                memory_mb,
                android_version,
                ..
            } => Command::Device(DeviceCommand::Create {
                device_id: device?,
                owner_id: user,
                provider: provider.clone(),
                cpu_cores: *cpu_cores,
                memory_mb: *memory_mb,
                // As the route does: past a byte is out of range just the same.
                android_version: u8::try_from(*android_version).unwrap_or(u8::MAX),
            }),
            Request::Start => Command::Device(DeviceCommand::Start),
            Request::Stop => Command::Device(DeviceCommand::Stop {
                reason: StopReason::Requested,
            }),
            Request::Resize { cpu_cores, memory_mb } => Command::Device(DeviceCommand::Resize {
                cpu_cores: *cpu_cores,
                memory_mb: *memory_mb,
            }),
            Request::Delete => Command::Device(DeviceCommand::Delete),
        })
    }
}

/// How an operation ended, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// A 2xx: `{id, stream_version, position}`.
    Acknowledged {
        id: Uuid,
        stream_version: i64,
        position: i64,
    },
    /// A 4xx problem document with its `code`.
    Refused { status: u16, code: String },
    /// Given up without a final answer (after 503s or transport errors): it may or may not
    /// have been applied.
    Indeterminate { reason: String },
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Acknowledged { .. } => "acknowledged",
            Outcome::Refused { .. } => "refused",
            Outcome::Indeterminate { .. } => "indeterminate",
        }
    }
}

/// One event of the log, as the checker needs it.
#[derive(Debug, Clone)]
pub struct LoggedEvent {
    pub position: i64,
    pub stream_id: Uuid,
    pub stream_type: StreamType,
    pub stream_version: i64,
    pub event_type: String,
    /// `metadata.idempotency_key`: the client's key.
    pub key: Option<String>,
    /// `None` when the stored payload does not decode.
    pub event: Option<Event>,
}

impl LoggedEvent {
    pub fn from_envelope(envelope: &EventEnvelope) -> Self {
        LoggedEvent {
            position: envelope.position,
            stream_id: envelope.stream_id,
            stream_type: envelope.stream_type,
            stream_version: envelope.stream_version,
            event_type: envelope.event_type.clone(),
            key: envelope.metadata.idempotency_key.clone(),
            event: envelope.decode().ok(),
        }
    }
}
