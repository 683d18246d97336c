//! Automatic persisted queries (Apollo's protocol): a client sends the SHA-256 of a query
//! instead of its text; the first time, it is told `PersistedQueryNotFound` and sends both,
//! and from then on the hash alone is enough. Saves bandwidth and parsing on every poll.

use std::sync::Arc;

use moka::sync::Cache;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// `extensions.persistedQuery` of a request.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PersistedQuery {
    pub version: u32,
    pub sha256_hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PersistedQueryError {
    /// The hash is not known here: the client sends the query with it.
    #[error("PersistedQueryNotFound")]
    NotFound,
    #[error("provided sha does not match query")]
    HashMismatch,
    #[error("unsupported persisted query version {0}; only version 1 is known")]
    Version(u32),
    #[error("a request needs a `query` or a `persistedQuery` extension")]
    NoQuery,
}

impl PersistedQueryError {
    /// The `extensions.code` Apollo clients look for.
    pub fn code(&self) -> &'static str {
        match self {
            PersistedQueryError::NotFound => "PERSISTED_QUERY_NOT_FOUND",
            PersistedQueryError::HashMismatch | PersistedQueryError::Version(_) | PersistedQueryError::NoQuery => {
                "BAD_REQUEST"
            }
        }
    }
}

/// Query texts by their SHA-256 (hex), bounded in number.
#[derive(Debug, Clone)]
pub struct PersistedQueries {
    texts: Cache<String, Arc<str>>,
}

impl PersistedQueries {
    pub fn new(capacity: u64) -> Self {
        PersistedQueries {
            texts: Cache::new(capacity),
        }
    }

    /// The query text of a request: its `query`, registered under its hash when it carries
    /// one, or the text registered earlier under the hash it carries.
    pub fn resolve(
        &self,
        query: Option<String>,
        persisted: Option<&PersistedQuery>,
    ) -> Result<Arc<str>, PersistedQueryError> {
        match (query, persisted) {
            (Some(query), None) => Ok(Arc::from(query)),
            (None, None) => Err(PersistedQueryError::NoQuery),
            (_, Some(persisted)) if persisted.version != 1 => Err(PersistedQueryError::Version(persisted.version)),
            (Some(query), Some(persisted)) => {
                let hash = hex::encode(Sha256::digest(query.as_bytes()));
                if !hash.eq_ignore_ascii_case(&persisted.sha256_hash) {
                    return Err(PersistedQueryError::HashMismatch);
                }
                let text: Arc<str> = Arc::from(query);
                self.texts.insert(hash, Arc::clone(&text));
                Ok(text)
            }
            (None, Some(persisted)) => self
                .texts
                .get(&persisted.sha256_hash.to_ascii_lowercase())
                .ok_or(PersistedQueryError::NotFound),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(text: &str) -> PersistedQuery {
        PersistedQuery {
            version: 1,
            sha256_hash: hex::encode(Sha256::digest(text.as_bytes())),
        }
    }

    #[test]
    fn a_hash_is_unknown_until_registered_with_its_query() {
        let store = PersistedQueries::new(10);
        let query = "{ projectionStatus { name } }";
        assert_eq!(
            store.resolve(None, Some(&hash(query))),
            Err(PersistedQueryError::NotFound)
        );
        assert_eq!(&*store.resolve(Some(query.into()), Some(&hash(query))).unwrap(), query);
        assert_eq!(&*store.resolve(None, Some(&hash(query))).unwrap(), query);
    }

    #[test]
    fn a_query_that_does_not_match_its_hash_is_refused() {
        let store = PersistedQueries::new(10);
        let wrong = hash("{ other }");
        assert_eq!(
            store.resolve(Some("{ projectionStatus { name } }".into()), Some(&wrong)),
            Err(PersistedQueryError::HashMismatch)
        );
        // Nothing was registered under the wrong hash.
        assert_eq!(store.resolve(None, Some(&wrong)), Err(PersistedQueryError::NotFound));
        assert_eq!(store.resolve(None, None), Err(PersistedQueryError::NoQuery));
    }
}
