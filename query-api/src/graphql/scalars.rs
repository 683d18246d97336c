//! Scalars and opaque cursors of the GraphQL schema.

use async_graphql::{InputValueError, InputValueResult, Scalar, ScalarType, SchemaBuilder, Value};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, NaiveDate, Utc};
use uuid::Uuid;

use crate::reads::{DeviceKey, DeviceOrder};

/// A 64-bit integer, sent as a string (as PostGraphile does) so JavaScript clients never
/// round it; accepted as a string or a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BigInt(pub i64);

/// A signed 64-bit integer as a decimal string (`"9007199254740993"`), so JavaScript clients
/// never round it. Accepted as a string or a number.
#[Scalar(name = "BigInt")]
impl ScalarType for BigInt {
    fn parse(value: Value) -> InputValueResult<Self> {
        match &value {
            Value::String(text) => text
                .trim()
                .parse()
                .map(BigInt)
                .map_err(|_| InputValueError::custom(format!("`{text}` is not a 64-bit integer"))),
            Value::Number(number) => number
                .as_i64()
                .map(BigInt)
                .ok_or_else(|| InputValueError::custom(format!("{number} is not a 64-bit integer"))),
            _ => Err(InputValueError::expected_type(value)),
        }
    }

    fn to_value(&self) -> Value {
        Value::String(self.0.to_string())
    }
}

/// Says what the scalars async-graphql brings for chrono and uuid carry, in our terms (their
/// own descriptions name Rust types, or say less than a dashboard author needs).
pub(crate) fn describe_foreign_scalars<Q, M, S>(builder: SchemaBuilder<Q, M, S>) -> SchemaBuilder<Q, M, S> {
    builder
        .override_output_type_description::<DateTime<Utc>>(
            "An instant as an RFC 3339 string in UTC, with up to microseconds: \
             `2026-01-05T13:45:00.123456Z`. Accepted with any UTC offset.",
        )
        .override_output_type_description::<NaiveDate>(
            "A UTC calendar day as an ISO 8601 date, `YYYY-MM-DD`: `2026-01-05`.",
        )
        .override_output_type_description::<Uuid>(
            "A UUID in its hyphenated text form: `0190c2a4-5b1e-7f3a-9d2c-4e6f8a0b1c2d`.",
        )
}

/// Encodes a row's place in a device list as an opaque cursor. The order is part of it, so a
/// cursor from one order cannot be used with another.
pub fn encode_cursor(order: DeviceOrder, key: &DeviceKey) -> String {
    let order = match order {
        DeviceOrder::CreatedAtAsc => 'a',
        DeviceOrder::CreatedAtDesc => 'd',
    };
    URL_SAFE_NO_PAD.encode(format!(
        "d1:{order}:{}:{}",
        key.created_at.timestamp_micros(),
        key.device_id
    ))
}

/// Why a cursor was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    #[error("`{0}` is not a cursor this API issued")]
    Invalid(String),
    #[error("this cursor was issued for another orderBy")]
    OtherOrder,
}

pub fn decode_cursor(cursor: &str, order: DeviceOrder) -> Result<DeviceKey, CursorError> {
    let invalid = || CursorError::Invalid(cursor.chars().take(64).collect());
    let bytes = URL_SAFE_NO_PAD.decode(cursor.trim()).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let mut parts = text.splitn(4, ':');
    let (Some("d1"), Some(flag), Some(micros), Some(id)) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid());
    };
    let issued_for = match flag {
        "a" => DeviceOrder::CreatedAtAsc,
        "d" => DeviceOrder::CreatedAtDesc,
        _ => return Err(invalid()),
    };
    if issued_for != order {
        return Err(CursorError::OtherOrder);
    }
    let created_at = micros
        .parse()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(invalid)?;
    let device_id = Uuid::parse_str(id).map_err(|_| invalid())?;
    Ok(DeviceKey { created_at, device_id })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn cursors_round_trip(micros in -62_000_000_000_000_000i64..250_000_000_000_000_000, id: u128, desc: bool) {
            let order = if desc { DeviceOrder::CreatedAtDesc } else { DeviceOrder::CreatedAtAsc };
            let key = DeviceKey {
                created_at: DateTime::from_timestamp_micros(micros).unwrap(),
                device_id: Uuid::from_u128(id),
            };
            prop_assert_eq!(decode_cursor(&encode_cursor(order, &key), order), Ok(key));
        }

        #[test]
        fn garbage_is_an_error_not_a_panic(text in ".{0,80}") {
            let _ = decode_cursor(&text, DeviceOrder::CreatedAtAsc);
        }
    }

    #[test]
    fn a_cursor_of_another_order_is_refused() {
        let key = DeviceKey {
            created_at: DateTime::from_timestamp_micros(1).unwrap(),
            device_id: Uuid::nil(),
        };
        let cursor = encode_cursor(DeviceOrder::CreatedAtAsc, &key);
        assert_eq!(
            decode_cursor(&cursor, DeviceOrder::CreatedAtDesc),
            Err(CursorError::OtherOrder)
        );
        assert!(matches!(
            decode_cursor("bm9wZQ", DeviceOrder::CreatedAtAsc),
            Err(CursorError::Invalid(_))
        ));
    }
}
