//! Whose ids are whose: every aggregate kind has an id space of its own.
//!
//! User ids come from the identity provider (a token's subject) or an operator. Device ids
//! are the server's: a client that wants a retried create to be safe names the device with a
//! *reference* of its own, and the device id is derived from the owner and that reference
//! (UUID version 5). So one owner's reference always names the same device, two owners'
//! equal references name two devices, and no client can choose an id, which would let it
//! take another person's future user id, or learn that someone else's device exists.

use uuid::Uuid;

use crate::DomainError;

/// The longest device reference, in bytes.
pub const MAX_DEVICE_REFERENCE: usize = 128;

/// The UUID namespace of device references (a fixed, random value: never change it, or every
/// reference names a new device).
const DEVICE_REFERENCE_NAMESPACE: Uuid = Uuid::from_u128(0x5d1c_7c3e_8f0a_4b6e_9a43_0c2b_71d4_e9f1);

/// Checks a client's reference: 1 to [`MAX_DEVICE_REFERENCE`] visible ASCII characters.
pub fn check_device_reference(reference: &str) -> Result<&str, DomainError> {
    let valid =
        (1..=MAX_DEVICE_REFERENCE).contains(&reference.len()) && reference.bytes().all(|b| b.is_ascii_graphic());
    if valid {
        Ok(reference)
    } else {
        Err(DomainError::InvalidDeviceReference {
            max: MAX_DEVICE_REFERENCE,
        })
    }
}

/// The id of the device `owner_id` names `reference`.
pub fn device_id_for_reference(owner_id: Uuid, reference: &str) -> Uuid {
    let mut name = Vec::with_capacity(16 + reference.len());
    name.extend_from_slice(owner_id.as_bytes());
    name.extend_from_slice(reference.as_bytes());
    Uuid::new_v5(&DEVICE_REFERENCE_NAMESPACE, &name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reference_names_one_device_per_owner() {
        let (ada, bob) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let first = device_id_for_reference(ada, "phone-1");
        assert_eq!(first, device_id_for_reference(ada, "phone-1"));
        assert_ne!(first, device_id_for_reference(bob, "phone-1"));
        assert_ne!(first, device_id_for_reference(ada, "phone-2"));
        // Not the owner's id, and not the reference read as an id.
        assert_ne!(first, ada);
        let as_id = Uuid::from_u128(7);
        assert_ne!(device_id_for_reference(ada, &as_id.to_string()), as_id);
        assert_eq!(first.get_version_num(), 5);
    }

    #[test]
    fn references_are_short_visible_ascii() {
        assert!(check_device_reference("order-42/phone").is_ok());
        assert!(check_device_reference(&"x".repeat(MAX_DEVICE_REFERENCE)).is_ok());
        for bad in ["", " ", "a b", "tab\t", "é", "\0"] {
            assert!(check_device_reference(bad).is_err(), "{bad:?}");
        }
        assert!(check_device_reference(&"x".repeat(MAX_DEVICE_REFERENCE + 1)).is_err());
    }
}
