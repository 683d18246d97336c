//! Domain errors: every refusal a command can meet, with a stable machine-readable code.

use event_schema::UnknownWord;

/// Which resource of a quota a command would exceed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaResource {
    Devices,
    CpuCores,
    MemoryMb,
}

impl QuotaResource {
    pub const fn as_str(self) -> &'static str {
        match self {
            QuotaResource::Devices => "devices",
            QuotaResource::CpuCores => "cpu_cores",
            QuotaResource::MemoryMb => "memory_mb",
        }
    }
}

/// How the edge should report an error; the HTTP layer maps each kind to one status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The aggregate does not exist (404).
    NotFound,
    /// The command does not fit the aggregate's current state (409).
    Conflict,
    /// The command's values are out of range or over a quota (422).
    Invalid,
}

/// A command refused by the domain rules. `code()` is part of the public API: never reuse
/// or rename one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("user is already registered")]
    UserAlreadyRegistered,
    #[error("user not found")]
    UserNotFound,
    #[error("user has been erased")]
    UserErased,
    #[error("invalid email address")]
    InvalidEmail,
    #[error("invalid phone number: expected E.164, like +4915112345678")]
    InvalidPhone,
    #[error("invalid quota: {reason}")]
    InvalidQuota { reason: &'static str },
    #[error("{0}")]
    UnknownProvider(UnknownWord),
    #[error("cpu_cores must be between {min} and {max}, got {requested}")]
    CpuCoresOutOfRange { requested: u32, min: u32, max: u32 },
    #[error("memory_mb must be a multiple of {step} between {min} and {max}, got {requested}")]
    MemoryOutOfRange {
        requested: u32,
        min: u32,
        max: u32,
        step: u32,
    },
    #[error("android_version must be between {min} and {max}, got {requested}")]
    UnsupportedAndroidVersion { requested: u8, min: u8, max: u8 },
    #[error("failure reason must be 1 to {max} characters")]
    InvalidFailureReason { max: usize },
    #[error("a device reference must be 1 to {max} visible ASCII characters")]
    InvalidDeviceReference { max: usize },
    #[error("device already exists")]
    DeviceAlreadyExists,
    #[error("device not found")]
    DeviceNotFound,
    #[error("device has been deleted")]
    DeviceDeleted,
    #[error("device is already running")]
    DeviceAlreadyRunning,
    #[error("device is not running")]
    DeviceNotRunning,
    #[error("device is running; stop it first")]
    DeviceRunning,
    #[error("quota exceeded for {}: limit {limit}, would use {requested}", resource.as_str())]
    QuotaExceeded {
        resource: QuotaResource,
        limit: u64,
        requested: u64,
    },
}

impl DomainError {
    /// The stable, machine-readable code clients switch on.
    pub fn code(&self) -> &'static str {
        match self {
            DomainError::UserAlreadyRegistered => "user_already_registered",
            DomainError::UserNotFound => "user_not_found",
            DomainError::UserErased => "user_erased",
            DomainError::InvalidEmail => "invalid_email",
            DomainError::InvalidPhone => "invalid_phone",
            DomainError::InvalidQuota { .. } => "invalid_quota",
            DomainError::UnknownProvider(_) => "unknown_provider",
            DomainError::CpuCoresOutOfRange { .. } => "cpu_cores_out_of_range",
            DomainError::MemoryOutOfRange { .. } => "memory_out_of_range",
            DomainError::UnsupportedAndroidVersion { .. } => "unsupported_android_version",
            DomainError::InvalidFailureReason { .. } => "invalid_failure_reason",
            DomainError::InvalidDeviceReference { .. } => "invalid_device_reference",
            DomainError::DeviceAlreadyExists => "device_already_exists",
            DomainError::DeviceNotFound => "device_not_found",
            DomainError::DeviceDeleted => "device_deleted",
            DomainError::DeviceAlreadyRunning => "device_already_running",
            DomainError::DeviceNotRunning => "device_not_running",
            DomainError::DeviceRunning => "device_running",
            DomainError::QuotaExceeded { .. } => "quota_exceeded",
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            DomainError::UserNotFound | DomainError::DeviceNotFound => ErrorKind::NotFound,
            DomainError::UserAlreadyRegistered
            | DomainError::UserErased
            | DomainError::DeviceAlreadyExists
            | DomainError::DeviceDeleted
            | DomainError::DeviceAlreadyRunning
            | DomainError::DeviceNotRunning
            | DomainError::DeviceRunning => ErrorKind::Conflict,
            DomainError::InvalidEmail
            | DomainError::InvalidPhone
            | DomainError::InvalidQuota { .. }
            | DomainError::UnknownProvider(_)
            | DomainError::CpuCoresOutOfRange { .. }
            | DomainError::MemoryOutOfRange { .. }
            | DomainError::UnsupportedAndroidVersion { .. }
            | DomainError::InvalidFailureReason { .. }
            | DomainError::InvalidDeviceReference { .. }
            | DomainError::QuotaExceeded { .. } => ErrorKind::Invalid,
        }
    }
}
