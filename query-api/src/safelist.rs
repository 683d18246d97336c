//! A safelist: in production an operator may let only registered documents run (the
//! persisted queries the dashboards ship with), as Hasura's allow-list does, closing the door
//! on arbitrary documents.
//!
//! The list is a JSON file in either of the two formats tools write:
//! - an Apollo persisted query manifest:
//!   `{"format": "apollo-persisted-query-manifest", "version": 1, "operations": [{"id": "<sha256>", "body": "query ..."}]}`
//! - a map of ids to documents (Relay's `persisted-queries.json`): `{"<id>": "query ..."}`.
//!
//! A request names a document by `extensions.persistedQuery.sha256Hash` (Apollo), or by a
//! top-level `documentId` / `id` (Relay and the GraphQL-over-HTTP draft), or sends its text,
//! which runs only if it is a registered document up to insignificant whitespace, commas and
//! comments. Anything else is refused with `DOCUMENT_NOT_ALLOWED` before it is parsed.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::cache::normalize_query;

#[derive(Debug, thiserror::Error)]
pub enum SafelistError {
    #[error("cannot read the safelist {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the safelist {path} is neither an Apollo persisted query manifest nor a map of ids to documents: {source}"
    )]
    Format {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the safelist {path} registers no document")]
    Empty { path: String },
}

/// Documents that may run, by id and by normalized text.
#[derive(Debug, Clone)]
pub struct Safelist {
    by_id: HashMap<String, Arc<str>>,
    by_text: HashMap<String, Arc<str>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SafelistFile {
    Manifest { operations: Vec<ManifestOperation> },
    Map(HashMap<String, String>),
}

#[derive(Deserialize)]
struct ManifestOperation {
    id: String,
    body: String,
}

impl Safelist {
    pub fn from_file(path: &Path) -> Result<Self, SafelistError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| SafelistError::Read {
            path: shown.clone(),
            source,
        })?;
        let file: SafelistFile = serde_json::from_str(&text).map_err(|source| SafelistError::Format {
            path: shown.clone(),
            source,
        })?;
        let documents: Vec<(String, String)> = match file {
            SafelistFile::Manifest { operations } => operations.into_iter().map(|o| (o.id, o.body)).collect(),
            SafelistFile::Map(map) => map.into_iter().collect(),
        };
        if documents.is_empty() {
            return Err(SafelistError::Empty { path: shown });
        }
        Ok(Self::from_documents(documents))
    }

    /// Registers each `(id, text)`; every text is also reachable by its SHA-256 (hex), the id
    /// Apollo clients send.
    pub fn from_documents(documents: impl IntoIterator<Item = (String, String)>) -> Self {
        let mut list = Safelist {
            by_id: HashMap::new(),
            by_text: HashMap::new(),
        };
        for (id, text) in documents {
            let text: Arc<str> = Arc::from(text);
            list.by_id
                .insert(hex::encode(Sha256::digest(text.as_bytes())), Arc::clone(&text));
            list.by_id.insert(id.to_ascii_lowercase(), Arc::clone(&text));
            list.by_text.insert(normalize_query(&text), text);
        }
        list
    }

    /// The registered document with this id (case-insensitive, as hex hashes are).
    pub fn by_id(&self, id: &str) -> Option<Arc<str>> {
        self.by_id.get(&id.to_ascii_lowercase()).cloned()
    }

    /// The registered document a sent text is, if it is one.
    pub fn by_text(&self, text: &str) -> Option<Arc<str>> {
        self.by_text.get(&normalize_query(text)).cloned()
    }

    pub fn len(&self) -> usize {
        self.by_text.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_text.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATS: &str = "query Stats { deviceStats { totals { deviceCount } } }";

    #[test]
    fn both_file_formats_load_and_name_their_documents() {
        let dir = std::env::temp_dir().join(format!("safelist-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let manifest = dir.join("manifest.json");
        std::fs::write(
            &manifest,
            serde_json::json!({"format": "apollo-persisted-query-manifest", "version": 1,
                "operations": [{"id": "abc", "name": "Stats", "type": "query", "body": STATS}]})
            .to_string(),
        )
        .unwrap();
        let list = Safelist::from_file(&manifest).unwrap();
        assert_eq!(list.by_id("ABC").as_deref(), Some(STATS));
        let map = dir.join("map.json");
        std::fs::write(&map, serde_json::json!({"q1": STATS}).to_string()).unwrap();
        let list = Safelist::from_file(&map).unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list.by_id("q1").as_deref(), Some(STATS));
        let hash = hex::encode(Sha256::digest(STATS.as_bytes()));
        assert_eq!(list.by_id(&hash).as_deref(), Some(STATS));
        std::fs::write(&map, "[1, 2]").unwrap();
        assert!(matches!(Safelist::from_file(&map), Err(SafelistError::Format { .. })));
        std::fs::write(&map, "{}").unwrap();
        assert!(matches!(Safelist::from_file(&map), Err(SafelistError::Empty { .. })));
        assert!(matches!(
            Safelist::from_file(&dir.join("missing.json")),
            Err(SafelistError::Read { .. })
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_sent_text_runs_only_if_it_is_a_registered_document() {
        let list = Safelist::from_documents([("q1".to_owned(), STATS.to_owned())]);
        let reformatted = "query Stats {\n  deviceStats { totals { deviceCount } } # mine\n}";
        assert_eq!(list.by_text(reformatted).as_deref(), Some(STATS));
        assert!(
            list.by_text("query Stats { deviceStats { totals { cpuCores } } }")
                .is_none()
        );
        assert!(list.by_text("{ __schema { types { name } } }").is_none());
        assert!(list.by_id("unknown").is_none());
    }
}
