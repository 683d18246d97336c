//! Personal data marked in the type system.
//!
//! A field of type [`Personal<T>`] holds data about a person (email, phone). The marker does
//! three things today: `Debug` never prints the value (so it cannot leak into logs through
//! `?event`), the generated JSON Schema carries `"x-personal-data": true`, and every event type
//! lists its personal fields in [`crate::EventPayload::PERSONAL_FIELDS`] so the audit layer can
//! encrypt exactly those fields with a per-user key and shred them on erasure.

use std::borrow::Cow;
use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The JSON Schema keyword that marks a field as personal data.
pub const PERSONAL_DATA_KEYWORD: &str = "x-personal-data";

/// A value that is personal data. Serialises exactly like `T`; never shows in `Debug`.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Personal<T>(T);

impl<T> Personal<T> {
    pub const fn new(value: T) -> Self {
        Personal(value)
    }

    /// The personal value itself. Named loudly so reads of personal data stand out in review.
    pub fn expose(&self) -> &T {
        &self.0
    }

    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> fmt::Debug for Personal<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Personal(<redacted>)")
    }
}

impl<T: JsonSchema> JsonSchema for Personal<T> {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        format!("Personal_{}", T::schema_name()).into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let mut schema = T::json_schema(generator);
        schema.insert(PERSONAL_DATA_KEYWORD.to_owned(), true.into());
        schema
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_personal_data() {
        let email = Personal::new("ada@example.com".to_owned());
        let shown = format!("{email:?} {:?}", Some(&email));
        assert!(!shown.contains("ada"), "{shown}");
    }

    #[test]
    fn personal_data_serialises_like_its_inner_value() {
        let email = Personal::new("ada@example.com".to_owned());
        assert_eq!(
            serde_json::to_value(&email).ok(),
            Some(serde_json::json!("ada@example.com"))
        );
    }

    #[test]
    fn the_schema_marks_personal_data() {
        let schema = schemars::schema_for!(Personal<String>);
        assert_eq!(schema.get(PERSONAL_DATA_KEYWORD), Some(&serde_json::Value::Bool(true)));
    }
}
