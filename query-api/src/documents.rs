//! Documents already read, by their text: parsed, measured within the limits and normalized.
//!
//! Dashboards send the same few documents again and again, and reading one (a scan, a parse,
//! a measure over its fragments, a normalization for the cache key) is work that gives the
//! same result every time for the same text and limits. Only documents within the limits are
//! kept, bounded by an estimate of their size, so a client sending endless distinct documents
//! costs what it cost before (each is read) and pushes out only other documents.

use std::sync::Arc;

use async_graphql::parser::types::ExecutableDocument;
use moka::sync::Cache;

use crate::cache::normalize_query;
use crate::graphql::document::{DocumentError, DocumentLimits, check_document};

/// A document within the limits, and its text as the answer cache keys it.
#[derive(Debug, Clone)]
pub struct ReadDocument {
    pub document: Arc<ExecutableDocument>,
    pub normalized: Arc<str>,
}

/// Read documents by text, bounded by an estimate of their bytes in memory.
#[derive(Debug)]
pub struct ReadDocuments {
    documents: Cache<Arc<str>, ReadDocument>,
}

impl ReadDocuments {
    /// A parsed document takes several times its text in memory (names, positions, nested
    /// vectors); this factor over the text's length is how each one is weighed.
    const BYTES_PER_TEXT_BYTE: usize = 16;

    pub fn new(max_bytes: u64) -> Self {
        ReadDocuments {
            documents: Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|text: &Arc<str>, read: &ReadDocument| {
                    let bytes = text.len() * (Self::BYTES_PER_TEXT_BYTE + 1) + read.normalized.len();
                    u32::try_from(bytes).unwrap_or(u32::MAX)
                })
                .build(),
        }
    }

    /// `text` read: from memory when it was read before, else checked against `limits`
    /// (the limits are the server's, the same for every read of a text).
    pub fn read(&self, text: &Arc<str>, limits: &DocumentLimits) -> Result<ReadDocument, DocumentError> {
        if let Some(read) = self.documents.get(text) {
            return Ok(read);
        }
        let checked = check_document(text, limits)?;
        let read = ReadDocument {
            document: Arc::new(checked.document),
            normalized: Arc::from(normalize_query(text)),
        };
        self.documents.insert(Arc::clone(text), read.clone());
        Ok(read)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_document_is_read_once_and_kept() {
        let documents = ReadDocuments::new(1024 * 1024);
        let limits = DocumentLimits::default();
        let text: Arc<str> = Arc::from("query Q { devices(first: 2) { totalCount } }");
        let first = documents.read(&text, &limits).unwrap();
        let again = documents.read(&Arc::from(&*text), &limits).unwrap();
        assert!(Arc::ptr_eq(&first.document, &again.document), "parsed once");
        assert_eq!(&*again.normalized, "query Q{devices(first:2){totalCount}}");
    }

    #[test]
    fn a_refused_document_is_refused_every_time_and_not_kept() {
        let documents = ReadDocuments::new(1024 * 1024);
        let limits = DocumentLimits::default();
        let deep: Arc<str> = Arc::from(format!("{}{}", "{ a ".repeat(200), "}".repeat(200)));
        for _ in 0..2 {
            assert!(documents.read(&deep, &limits).is_err());
        }
        documents.documents.run_pending_tasks();
        assert_eq!(documents.documents.entry_count(), 0);
    }

    #[test]
    fn distinct_documents_are_bounded_by_their_weight() {
        let documents = ReadDocuments::new(64 * 1024);
        let limits = DocumentLimits::default();
        for n in 0..2_000 {
            let text: Arc<str> = Arc::from(format!("query Q{n} {{ devices(first: {n}) {{ totalCount }} }}"));
            documents.read(&text, &limits).unwrap();
        }
        documents.documents.run_pending_tasks();
        assert!(documents.documents.weighted_size() <= 64 * 1024);
        assert!(documents.documents.entry_count() < 2_000);
    }
}
