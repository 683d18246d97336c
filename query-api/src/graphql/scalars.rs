//! Scalars and opaque cursors of the GraphQL schema.

use async_graphql::{InputValueError, InputValueResult, Scalar, ScalarType, SchemaBuilder, Value};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, NaiveDate, Utc};
use uuid::Uuid;

use crate::reads::{DeviceKey, DeviceOrder, SortValue};

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

/// The tag of each order in a cursor.
fn order_tag(order: DeviceOrder) -> &'static str {
    match order {
        DeviceOrder::CreatedAtAsc => "ca",
        DeviceOrder::CreatedAtDesc => "cd",
        DeviceOrder::LastStartedAtAsc => "la",
        DeviceOrder::LastStartedAtDesc => "ld",
        DeviceOrder::MinutesUsedAsc => "ma",
        DeviceOrder::MinutesUsedDesc => "md",
    }
}

/// Encodes a row's place in a device list as an opaque cursor. The order is part of it, so a
/// cursor from one order cannot be used with another.
pub fn encode_cursor(order: DeviceOrder, key: &DeviceKey) -> String {
    let value = match key.sort {
        SortValue::CreatedAt(at) | SortValue::LastStartedAt(Some(at)) => at.timestamp_micros().to_string(),
        SortValue::LastStartedAt(None) => "-".to_owned(),
        SortValue::MinutesUsed(minutes) => minutes.to_string(),
    };
    URL_SAFE_NO_PAD.encode(format!("d2:{}:{value}:{}", order_tag(order), key.device_id))
}

/// Why a cursor was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    #[error("`{0}` is not a cursor this API issued")]
    Invalid(String),
    #[error("this cursor was issued for another orderBy")]
    OtherOrder,
}

/// The key a cursor holds, if it was issued for `order`. Cursors of the first format (`d1`,
/// creation order only) are still read: clients may hold some across an upgrade.
pub fn decode_cursor(cursor: &str, order: DeviceOrder) -> Result<DeviceKey, CursorError> {
    let invalid = || CursorError::Invalid(cursor.chars().take(64).collect());
    let bytes = URL_SAFE_NO_PAD.decode(cursor.trim()).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let mut parts = text.splitn(4, ':');
    let (Some(format), Some(tag), Some(value), Some(id)) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid());
    };
    let issued_for = match (format, tag) {
        ("d1", "a") => DeviceOrder::CreatedAtAsc,
        ("d1", "d") => DeviceOrder::CreatedAtDesc,
        ("d2", tag) => DeviceOrder::ALL
            .into_iter()
            .find(|order| order_tag(*order) == tag)
            .ok_or_else(invalid)?,
        _ => return Err(invalid()),
    };
    if issued_for != order {
        return Err(CursorError::OtherOrder);
    }
    let instant = |micros: &str| micros.parse().ok().and_then(DateTime::from_timestamp_micros);
    let sort = match order {
        DeviceOrder::CreatedAtAsc | DeviceOrder::CreatedAtDesc => {
            SortValue::CreatedAt(instant(value).ok_or_else(invalid)?)
        }
        DeviceOrder::LastStartedAtAsc | DeviceOrder::LastStartedAtDesc => SortValue::LastStartedAt(match value {
            "-" => None,
            micros => Some(instant(micros).ok_or_else(invalid)?),
        }),
        DeviceOrder::MinutesUsedAsc | DeviceOrder::MinutesUsedDesc => {
            SortValue::MinutesUsed(value.parse().map_err(|_| invalid())?)
        }
    };
    let device_id = Uuid::parse_str(id).map_err(|_| invalid())?;
    Ok(DeviceKey { sort, device_id })
}

/// Encodes a user's place in the user list (ordered by id) as an opaque cursor.
pub fn encode_user_cursor(user_id: Uuid) -> String {
    URL_SAFE_NO_PAD.encode(format!("u1:{user_id}"))
}

/// The user id a user-list cursor holds. A device cursor is refused: it is of another list.
pub fn decode_user_cursor(cursor: &str) -> Result<Uuid, CursorError> {
    let invalid = || CursorError::Invalid(cursor.chars().take(64).collect());
    let bytes = URL_SAFE_NO_PAD.decode(cursor.trim()).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let id = text.strip_prefix("u1:").ok_or_else(invalid)?;
    Uuid::parse_str(id).map_err(|_| invalid())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sort_value(order: DeviceOrder, micros: i64, started: bool) -> SortValue {
        let at = DateTime::from_timestamp_micros(micros).unwrap();
        match order {
            DeviceOrder::CreatedAtAsc | DeviceOrder::CreatedAtDesc => SortValue::CreatedAt(at),
            DeviceOrder::LastStartedAtAsc | DeviceOrder::LastStartedAtDesc => {
                SortValue::LastStartedAt(started.then_some(at))
            }
            DeviceOrder::MinutesUsedAsc | DeviceOrder::MinutesUsedDesc => SortValue::MinutesUsed(micros),
        }
    }

    proptest! {
        #[test]
        fn cursors_round_trip(
            micros in -62_000_000_000_000_000i64..250_000_000_000_000_000,
            id: u128,
            order in 0..DeviceOrder::ALL.len(),
            started: bool,
        ) {
            let order = DeviceOrder::ALL[order];
            let key = DeviceKey { sort: sort_value(order, micros, started), device_id: Uuid::from_u128(id) };
            prop_assert_eq!(decode_cursor(&encode_cursor(order, &key), order), Ok(key));
        }

        #[test]
        fn garbage_is_an_error_not_a_panic(text in ".{0,80}") {
            for order in DeviceOrder::ALL {
                let _ = decode_cursor(&text, order);
            }
        }
    }

    #[test]
    fn a_cursor_of_another_order_is_refused() {
        for issued in DeviceOrder::ALL {
            let key = DeviceKey {
                sort: sort_value(issued, 1, true),
                device_id: Uuid::nil(),
            };
            let cursor = encode_cursor(issued, &key);
            for order in DeviceOrder::ALL.into_iter().filter(|o| *o != issued) {
                assert_eq!(decode_cursor(&cursor, order), Err(CursorError::OtherOrder));
            }
        }
        assert!(matches!(
            decode_cursor("bm9wZQ", DeviceOrder::CreatedAtAsc),
            Err(CursorError::Invalid(_))
        ));
    }

    #[test]
    fn a_cursor_issued_before_the_other_orders_existed_still_pages() {
        let id = Uuid::from_u128(7);
        let cursor = URL_SAFE_NO_PAD.encode(format!("d1:d:1767225600000000:{id}"));
        let key = DeviceKey {
            sort: SortValue::CreatedAt(DateTime::from_timestamp_micros(1_767_225_600_000_000).unwrap()),
            device_id: id,
        };
        assert_eq!(decode_cursor(&cursor, DeviceOrder::CreatedAtDesc), Ok(key));
        assert_eq!(
            decode_cursor(&cursor, DeviceOrder::CreatedAtAsc),
            Err(CursorError::OtherOrder)
        );
    }

    proptest! {
        #[test]
        fn user_cursors_round_trip_and_garbage_is_refused(id in any::<u128>(), text in ".{0,80}") {
            let id = Uuid::from_u128(id);
            prop_assert_eq!(decode_user_cursor(&encode_user_cursor(id)), Ok(id));
            let _ = decode_user_cursor(&text);
        }
    }

    #[test]
    fn a_device_cursor_is_not_a_user_cursor() {
        let key = DeviceKey {
            sort: SortValue::CreatedAt(DateTime::from_timestamp_micros(0).unwrap()),
            device_id: Uuid::from_u128(1),
        };
        let device_cursor = encode_cursor(DeviceOrder::CreatedAtAsc, &key);
        assert!(decode_user_cursor(&device_cursor).is_err());
        assert!(decode_cursor(&encode_user_cursor(Uuid::from_u128(1)), DeviceOrder::CreatedAtAsc).is_err());
    }
}
