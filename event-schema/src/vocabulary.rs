//! The small shared words of the event language: tiers, providers, statuses, money.
//!
//! They live here rather than in `domain` because read models and exports need the same
//! spelling the events use, and `projections` must not depend on `domain`.

use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A parse failure of one of the vocabulary words; `kind` names the word ("tier", ...).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} `{value}`; expected one of: {expected}")]
pub struct UnknownWord {
    pub kind: &'static str,
    pub value: String,
    pub expected: &'static str,
}

macro_rules! word_enum {
    (
        $(#[$meta:meta])*
        $name:ident as $kind:literal { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The spelling used in events, the API and the database.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownWord;

            fn from_str(value: &str) -> Result<Self, Self::Err> {
                match value {
                    $($text => Ok($name::$variant),)+
                    _ => Err(UnknownWord {
                        kind: $kind,
                        value: value.to_owned(),
                        expected: concat!($($text, " "),+),
                    }),
                }
            }
        }
    };
}

word_enum! {
    /// The aggregate a stream belongs to.
    StreamType as "stream type" {
        User = "user",
        Device = "device",
    }
}

word_enum! {
    /// A customer's subscription tier; it selects default quotas and prices.
    Tier as "tier" {
        Free = "free",
        Basic = "basic",
        Pro = "pro",
        Enterprise = "enterprise",
    }
}

word_enum! {
    /// The cloud that hosts a virtual device.
    Provider as "provider" {
        Aws = "aws",
        Gcp = "gcp",
        Azure = "azure",
        Alibaba = "alibaba",
        Huawei = "huawei",
    }
}

word_enum! {
    /// Why a device stopped.
    StopReason as "stop reason" {
        /// The owner (or an admin) asked for it.
        Requested = "requested",
        /// The device was deleted while running.
        Deleted = "deleted",
        /// Stopped by the platform after a period without use.
        Idle = "idle",
        /// Stopped for provider maintenance.
        Maintenance = "maintenance",
    }
}

word_enum! {
    /// The lifecycle status of a device as read models show it.
    DeviceStatus as "device status" {
        Stopped = "stopped",
        Running = "running",
        Failed = "failed",
        Deleted = "deleted",
    }
}

/// An ISO 4217 currency code, three upper-case ASCII letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Currency([u8; 3]);

impl Currency {
    pub const USD: Currency = Currency(*b"USD");
    pub const EUR: Currency = Currency(*b"EUR");

    /// Parses a currency code; only the shape is checked, not membership of ISO 4217.
    pub fn parse(code: &str) -> Result<Self, UnknownWord> {
        match code.as_bytes() {
            [a, b, c] if [a, b, c].iter().all(|ch| ch.is_ascii_uppercase()) => Ok(Currency([*a, *b, *c])),
            _ => Err(UnknownWord {
                kind: "currency",
                value: code.to_owned(),
                expected: "three upper-case letters (ISO 4217)",
            }),
        }
    }

    pub fn as_str(&self) -> &str {
        // The bytes were checked to be ASCII upper-case letters at construction.
        std::str::from_utf8(&self.0).unwrap_or("XXX")
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Currency {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let code = String::deserialize(deserializer)?;
        Currency::parse(&code).map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Currency {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Currency".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^[A-Z]{3}$",
            "description": "ISO 4217 currency code"
        })
    }
}

/// An amount of money in integer minor units (cents for USD). Never floating point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub struct Money {
    /// Amount in the currency's minor unit (e.g. cents).
    pub amount_minor: i64,
    pub currency: Currency,
}

impl Money {
    pub const fn new(amount_minor: i64, currency: Currency) -> Self {
        Money { amount_minor, currency }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_word_round_trips_through_its_spelling() {
        for tier in Tier::ALL {
            assert_eq!(tier.as_str().parse::<Tier>(), Ok(*tier));
            assert_eq!(serde_json::to_value(tier).ok(), Some(serde_json::json!(tier.as_str())));
        }
        for provider in Provider::ALL {
            assert_eq!(provider.as_str().parse::<Provider>(), Ok(*provider));
        }
        for status in DeviceStatus::ALL {
            assert_eq!(status.as_str().parse::<DeviceStatus>(), Ok(*status));
        }
        for stream in StreamType::ALL {
            assert_eq!(stream.as_str().parse::<StreamType>(), Ok(*stream));
        }
    }

    #[test]
    fn an_unknown_word_names_what_was_expected() {
        let err = "robot".parse::<StreamType>().unwrap_err();
        assert_eq!(err.kind, "stream type");
        assert!(err.to_string().contains("user device"), "{err}");
    }

    #[test]
    fn currency_accepts_only_three_upper_case_letters() {
        assert_eq!(Currency::parse("USD"), Ok(Currency::USD));
        for bad in ["usd", "US", "USDX", "U$D", ""] {
            assert!(Currency::parse(bad).is_err(), "{bad}");
        }
        let parsed: Result<Money, _> =
            serde_json::from_value(serde_json::json!({"amount_minor": 5, "currency": "eur"}));
        assert!(parsed.is_err());
    }
}
