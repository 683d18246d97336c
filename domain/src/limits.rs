//! The allowed ranges of every value a command carries, and their checks.
//!
//! | value | allowed |
//! |---|---|
//! | `cpu_cores` | 1 to 16 |
//! | `memory_mb` | 1024 to 65536, a multiple of 512 |
//! | `android_version` | 9 to 15 |
//! | quota `max_devices` | 0 to 100 000 |
//! | quota `max_cpu_cores` | 0 to 1 600 000 |
//! | quota `max_memory_mb` | 0 to 4 000 000 000 |
//! | email | 3 to 254 characters, `local@domain.tld`, no spaces |
//! | phone | E.164: `+`, then 7 to 15 digits, the first not 0 |
//! | failure reason | 1 to 500 characters |
//!
//! A quota of 0 is valid: it blocks new devices without touching existing ones. Lowering a
//! quota below current usage is allowed for the same reason.

use event_schema::{Personal, Quota};

use crate::DomainError;

pub const CPU_CORES: std::ops::RangeInclusive<u32> = 1..=16;
pub const MEMORY_MB: std::ops::RangeInclusive<u32> = 1024..=65_536;
pub const MEMORY_STEP_MB: u32 = 512;
pub const ANDROID_VERSIONS: std::ops::RangeInclusive<u8> = 9..=15;
pub const MAX_QUOTA_DEVICES: u32 = 100_000;
pub const MAX_QUOTA_CPU_CORES: u32 = 1_600_000;
pub const MAX_QUOTA_MEMORY_MB: u32 = 4_000_000_000;
pub const MAX_FAILURE_REASON_CHARS: usize = 500;

pub fn check_cpu_cores(cpu_cores: u32) -> Result<u32, DomainError> {
    if CPU_CORES.contains(&cpu_cores) {
        Ok(cpu_cores)
    } else {
        Err(DomainError::CpuCoresOutOfRange {
            requested: cpu_cores,
            min: *CPU_CORES.start(),
            max: *CPU_CORES.end(),
        })
    }
}

pub fn check_memory_mb(memory_mb: u32) -> Result<u32, DomainError> {
    if MEMORY_MB.contains(&memory_mb) && memory_mb.is_multiple_of(MEMORY_STEP_MB) {
        Ok(memory_mb)
    } else {
        Err(DomainError::MemoryOutOfRange {
            requested: memory_mb,
            min: *MEMORY_MB.start(),
            max: *MEMORY_MB.end(),
            step: MEMORY_STEP_MB,
        })
    }
}

pub fn check_android_version(version: u8) -> Result<u8, DomainError> {
    if ANDROID_VERSIONS.contains(&version) {
        Ok(version)
    } else {
        Err(DomainError::UnsupportedAndroidVersion {
            requested: version,
            min: *ANDROID_VERSIONS.start(),
            max: *ANDROID_VERSIONS.end(),
        })
    }
}

pub fn check_quota(quota: &Quota) -> Result<Quota, DomainError> {
    let reason = if quota.max_devices > MAX_QUOTA_DEVICES {
        "max_devices is above 100000"
    } else if quota.max_cpu_cores > MAX_QUOTA_CPU_CORES {
        "max_cpu_cores is above 1600000"
    } else if quota.max_memory_mb > MAX_QUOTA_MEMORY_MB {
        "max_memory_mb is above 4000000000"
    } else {
        return Ok(*quota);
    };
    Err(DomainError::InvalidQuota { reason })
}

/// A deliberately small check: the address is confirmed by mail, not by a regex.
pub fn check_email(email: &Personal<String>) -> Result<(), DomainError> {
    let text = email.expose();
    let valid = (3..=254).contains(&text.chars().count())
        && !text.chars().any(|c| c.is_whitespace() || c.is_control())
        && match text.split_once('@') {
            Some((local, domain)) => {
                !local.is_empty()
                    && !domain.contains('@')
                    && domain
                        .split_once('.')
                        .is_some_and(|(host, tld)| !host.is_empty() && !tld.is_empty())
                    && !domain.ends_with('.')
            }
            None => false,
        };
    if valid { Ok(()) } else { Err(DomainError::InvalidEmail) }
}

pub fn check_phone(phone: &Personal<String>) -> Result<(), DomainError> {
    let text = phone.expose();
    let valid = match text.strip_prefix('+') {
        Some(digits) => {
            (7..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) && !digits.starts_with('0')
        }
        None => false,
    };
    if valid { Ok(()) } else { Err(DomainError::InvalidPhone) }
}

pub fn check_failure_reason(reason: &str) -> Result<(), DomainError> {
    let chars = reason.chars().count();
    if (1..=MAX_FAILURE_REASON_CHARS).contains(&chars) && !reason.contains('\0') {
        Ok(())
    } else {
        Err(DomainError::InvalidFailureReason {
            max: MAX_FAILURE_REASON_CHARS,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_outside_the_documented_ranges_are_refused() {
        assert!(check_cpu_cores(1).is_ok() && check_cpu_cores(16).is_ok());
        assert!(check_cpu_cores(0).is_err() && check_cpu_cores(17).is_err());
        assert!(check_memory_mb(1024).is_ok() && check_memory_mb(65_536).is_ok());
        assert!(check_memory_mb(1536).is_ok());
        assert!(check_memory_mb(512).is_err());
        assert!(check_memory_mb(1025).is_err());
        assert!(check_memory_mb(66_048).is_err());
        assert!(check_android_version(9).is_ok() && check_android_version(15).is_ok());
        assert!(check_android_version(8).is_err() && check_android_version(16).is_err());
    }

    #[test]
    fn emails_and_phones_are_checked_for_shape() {
        for good in ["a@b.co", "ada.lovelace+x@example.com"] {
            assert!(check_email(&Personal::new(good.to_owned())).is_ok(), "{good}");
        }
        for bad in ["", "ada", "@b.co", "a@b", "a@@b.co", "a b@c.de", "a@b.", "a@.b"] {
            assert!(check_email(&Personal::new(bad.to_owned())).is_err(), "{bad}");
        }
        for good in ["+4915112345678", "+1234567"] {
            assert!(check_phone(&Personal::new(good.to_owned())).is_ok(), "{good}");
        }
        for bad in [
            "",
            "4915112345678",
            "+0123456789",
            "+12345",
            "+1234567890123456",
            "+49 151",
        ] {
            assert!(check_phone(&Personal::new(bad.to_owned())).is_err(), "{bad}");
        }
    }

    #[test]
    fn quotas_above_the_ceiling_are_refused_but_zero_is_fine() {
        let zero = Quota {
            max_devices: 0,
            max_cpu_cores: 0,
            max_memory_mb: 0,
        };
        assert!(check_quota(&zero).is_ok());
        let too_many = Quota {
            max_devices: MAX_QUOTA_DEVICES + 1,
            ..zero
        };
        assert_eq!(check_quota(&too_many).map_err(|e| e.code()), Err("invalid_quota"));
    }
}
