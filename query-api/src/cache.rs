//! Answers kept in memory (moka), keyed by the normalized query, its operation and variables,
//! the caller's scope, and the projection checkpoints of the source that answered. A newer
//! checkpoint is a new key, so an answer is never older than the checkpoints the request was
//! routed at, and nothing needs invalidating: old entries age out of the bounded cache.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use moka::sync::Cache;
use sha2::{Digest, Sha256};

/// Names of the cache's metrics.
pub mod metrics_names {
    /// Counter: lookups by result (`hit`, `miss`).
    pub const LOOKUPS_TOTAL: &str = "cloudphone_query_cache_lookups_total";
    /// Gauge: hits over lookups since start.
    pub const HIT_RATIO: &str = "cloudphone_query_cache_hit_ratio";
    /// Gauge: bytes of answers held.
    pub const SIZE_BYTES: &str = "cloudphone_query_cache_size_bytes";
    /// Gauge: requests waiting for the answer another request is computing under the same
    /// key (see [`crate::single_flight`]).
    pub const WAITING: &str = "cloudphone_query_cache_waiting";
}
use metrics_names as m;

/// What an answer depends on.
#[derive(Debug, Clone, Copy)]
pub struct CacheKeyParts<'a> {
    pub normalized_query: &'a str,
    pub operation_name: Option<&'a str>,
    /// The variables as canonical JSON.
    pub variables: &'a str,
    pub scope: &'a str,
    pub checkpoints: &'a [i64],
    /// The live version of each projection's tables on the source that answered.
    pub versions: &'a [i32],
}

/// A SHA-256 over the parts, each length-prefixed so no two tuples share an encoding.
pub type CacheKey = [u8; 32];

pub fn cache_key(parts: &CacheKeyParts<'_>) -> CacheKey {
    let mut hash = Sha256::new();
    for part in [
        parts.normalized_query,
        parts.operation_name.unwrap_or(""),
        parts.variables,
        parts.scope,
    ] {
        hash.update((part.len() as u64).to_le_bytes());
        hash.update(part.as_bytes());
    }
    hash.update((parts.checkpoints.len() as u64).to_le_bytes());
    for checkpoint in parts.checkpoints {
        hash.update(checkpoint.to_le_bytes());
    }
    for version in parts.versions {
        hash.update(version.to_le_bytes());
    }
    hash.finalize().into()
}

/// A serialized answer and the log position it reflects (every projection had applied at
/// least this much when it was read): what `x-read-position` reports when it is served.
#[derive(Debug, Clone)]
pub struct CachedAnswer {
    pub body: Bytes,
    pub position: Option<i64>,
}

/// Serialized answers, bounded by their size in bytes; one answer may take at most a
/// sixty-fourth of the cache (between 64 KiB and 1 MiB), so a few huge answers cannot push
/// out everything else.
#[derive(Debug)]
pub struct ResponseCache {
    answers: Cache<CacheKey, CachedAnswer>,
    max_entry_bytes: usize,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl ResponseCache {
    pub fn new(max_bytes: u64) -> Self {
        ResponseCache {
            answers: Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_, answer: &CachedAnswer| u32::try_from(answer.body.len() + 96).unwrap_or(u32::MAX))
                .build(),
            max_entry_bytes: usize::try_from(max_bytes / 64)
                .unwrap_or(usize::MAX)
                .clamp(64 * 1024, 1024 * 1024),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// The largest answer kept.
    pub fn max_entry_bytes(&self) -> usize {
        self.max_entry_bytes
    }

    pub fn get(&self, key: &CacheKey) -> Option<CachedAnswer> {
        let answer = self.answers.get(key);
        let (result, counter) = match answer {
            Some(_) => ("hit", &self.hits),
            None => ("miss", &self.misses),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::LOOKUPS_TOTAL, "result" => result).increment(1);
        metrics::gauge!(m::HIT_RATIO).set(self.hit_ratio());
        answer
    }

    /// Keeps `answer` unless it is over the per-answer limit; true when kept.
    pub fn insert(&self, key: CacheKey, answer: CachedAnswer) -> bool {
        if answer.body.len() > self.max_entry_bytes {
            return false;
        }
        self.answers.insert(key, answer);
        metrics::gauge!(m::SIZE_BYTES).set(self.answers.weighted_size() as f64);
        true
    }

    /// Hits over lookups since start (0 before the first lookup).
    pub fn hit_ratio(&self) -> f64 {
        let hits = self.hits.load(Ordering::Relaxed) as f64;
        let total = hits + self.misses.load(Ordering::Relaxed) as f64;
        if total == 0.0 { 0.0 } else { hits / total }
    }
}

/// The checkpoints answers are keyed by: an epoch that moves forward at most once per
/// `window`, so that while projections apply a steady stream (checkpoints moving every few
/// milliseconds) an answer is computed once per window instead of once per checkpoint.
///
/// An answer is stored under the epoch only when it was read at or after it, so it is never
/// older than its key. The epoch was the newest checkpoint seen at most `window` ago, which
/// bounds how stale an answer is for callers that named no position; a caller whose
/// `minPosition` the epoch has not reached gets an answer keyed by the exact checkpoints.
/// A zero window keys every answer by the exact checkpoints it was read at.
#[derive(Debug)]
pub struct CacheEpoch {
    window: std::time::Duration,
    current: std::sync::Mutex<Option<(std::time::Instant, Vec<i64>)>>,
}

impl CacheEpoch {
    pub fn new(window: std::time::Duration) -> Self {
        CacheEpoch {
            window,
            current: std::sync::Mutex::new(None),
        }
    }

    /// The checkpoints to key an answer with, for a source known to have reached `seen`.
    pub fn key_for(&self, seen: &[i64], min_position: Option<i64>) -> Vec<i64> {
        if self.window.is_zero() {
            return seen.to_vec();
        }
        let Ok(mut current) = self.current.lock() else {
            return seen.to_vec();
        };
        let reached = |epoch: &[i64]| epoch.len() == seen.len() && seen.iter().zip(epoch).all(|(s, e)| s >= e);
        match current.as_ref() {
            Some((since, epoch)) if since.elapsed() < self.window => {
                let wanted = min_position.is_none_or(|p| epoch.iter().all(|&c| c >= p));
                if reached(epoch) && wanted {
                    return epoch.clone();
                }
                seen.to_vec()
            }
            // The window is over: the epoch moves to what this source has, if that is ahead
            // (a lagging replica never moves it back).
            Some((_, epoch)) if !reached(epoch) => seen.to_vec(),
            _ => {
                *current = Some((std::time::Instant::now(), seen.to_vec()));
                seen.to_vec()
            }
        }
    }
}

/// A query text with insignificant differences removed: comments, commas (insignificant in
/// GraphQL), and whitespace except where it separates two names. String literals are kept
/// as written. Two texts that normalize alike parse alike.
pub fn normalize_query(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    // A separator is pending between two tokens; written only if both sides are name-like.
    let mut pending_space = false;
    while let Some(c) = chars.next() {
        match c {
            '#' => {
                for c in chars.by_ref() {
                    if c == '\n' || c == '\r' {
                        break;
                    }
                }
                pending_space = true;
            }
            c if c.is_whitespace() || c == ',' || c == '\u{feff}' => pending_space = true,
            '"' => {
                flush_space(&mut out, &mut pending_space, c);
                out.push('"');
                let block = chars.peek() == Some(&'"') && {
                    let mut ahead = chars.clone();
                    ahead.next();
                    ahead.peek() == Some(&'"')
                };
                if block {
                    out.push_str("\"\"");
                    chars.next();
                    chars.next();
                    let mut quotes = 0;
                    for c in chars.by_ref() {
                        out.push(c);
                        quotes = if c == '"' { quotes + 1 } else { 0 };
                        if quotes == 3 && !out.ends_with("\\\"\"\"") {
                            break;
                        }
                    }
                } else {
                    let mut escaped = false;
                    for c in chars.by_ref() {
                        out.push(c);
                        if escaped {
                            escaped = false;
                        } else if c == '\\' {
                            escaped = true;
                        } else if c == '"' || c == '\n' {
                            break;
                        }
                    }
                }
            }
            c => {
                flush_space(&mut out, &mut pending_space, c);
                out.push(c);
            }
        }
    }
    out
}

fn flush_space(out: &mut String, pending: &mut bool, next: char) {
    let name_like = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-' || c == '"' || c == '$';
    if *pending && out.chars().last().is_some_and(name_like) && name_like(next) {
        out.push(' ');
    }
    *pending = false;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layout_comments_and_commas_do_not_change_the_key() {
        let a = "query Q($id: UUID!) {\n  device(id: $id) { id, status }  # the device\n}";
        let b = "query Q($id:UUID!){device(id:$id){id status}}";
        assert_eq!(normalize_query(a), normalize_query(b));
        assert_eq!(normalize_query(b), "query Q($id:UUID!){device(id:$id){id status}}");
    }

    #[test]
    fn strings_and_separated_names_are_kept() {
        assert_eq!(normalize_query(r#"{ a(s: "x,  # y") b }"#), r#"{a(s:"x,  # y")b}"#);
        assert_ne!(normalize_query("{ a b }"), normalize_query("{ ab }"));
        assert_eq!(normalize_query("{ f(n: -1 x: 2) }"), "{f(n:-1 x:2)}");
        assert_eq!(normalize_query(r#"{ f(s: """a "" b""") }"#), r#"{f(s:"""a "" b""")}"#);
    }

    #[test]
    fn every_part_of_the_key_matters() {
        let base = CacheKeyParts {
            normalized_query: "{a}",
            operation_name: None,
            variables: "{}",
            scope: "everyone",
            checkpoints: &[1, 2],
            versions: &[1, 1],
        };
        let key = cache_key(&base);
        assert_ne!(
            key,
            cache_key(&CacheKeyParts {
                scope: "user:x",
                ..base
            })
        );
        assert_ne!(
            key,
            cache_key(&CacheKeyParts {
                checkpoints: &[1, 3],
                ..base
            })
        );
        assert_ne!(
            key,
            cache_key(&CacheKeyParts {
                versions: &[1, 2],
                ..base
            })
        );
        assert_ne!(
            key,
            cache_key(&CacheKeyParts {
                variables: "{\"a\":1}",
                ..base
            })
        );
        assert_ne!(
            key,
            cache_key(&CacheKeyParts {
                operation_name: Some("Q"),
                ..base
            })
        );
        // Length prefixes: moving a boundary between parts changes the key.
        assert_ne!(
            cache_key(&CacheKeyParts {
                normalized_query: "{a}x",
                scope: "",
                ..base
            }),
            cache_key(&CacheKeyParts {
                normalized_query: "{a}",
                scope: "x",
                ..base
            })
        );
    }

    proptest! {
        #[test]
        fn normalizing_is_idempotent(text in "[a-z{}()$:!, \\n#\"]{0,60}") {
            let once = normalize_query(&text);
            prop_assert_eq!(normalize_query(&once), once);
        }
    }

    #[test]
    fn the_epoch_holds_for_its_window_and_never_keys_an_answer_older_than_it() {
        let epoch = CacheEpoch::new(std::time::Duration::from_secs(3600));
        assert_eq!(epoch.key_for(&[10, 10], None), vec![10, 10]);
        // Newer reads share the epoch's key while the window lasts.
        assert_eq!(epoch.key_for(&[12, 15], None), vec![10, 10]);
        // A lagging source keys by what it has; a position past the epoch by the exact read.
        assert_eq!(epoch.key_for(&[9, 12], None), vec![9, 12]);
        assert_eq!(epoch.key_for(&[14, 14], Some(11)), vec![14, 14]);
        assert_eq!(epoch.key_for(&[14, 14], Some(10)), vec![10, 10]);

        let exact = CacheEpoch::new(std::time::Duration::ZERO);
        assert_eq!(exact.key_for(&[1, 2], None), vec![1, 2]);
        assert_eq!(exact.key_for(&[3, 4], None), vec![3, 4]);

        let short = CacheEpoch::new(std::time::Duration::from_millis(200));
        short.key_for(&[5, 5], None);
        std::thread::sleep(std::time::Duration::from_millis(250));
        // After the window the epoch moves forward, never back.
        assert_eq!(short.key_for(&[4, 9], None), vec![4, 9]);
        assert_eq!(short.key_for(&[6, 6], None), vec![6, 6]);
        assert_eq!(short.key_for(&[7, 7], None), vec![6, 6]);
    }

    #[test]
    fn the_cache_is_bounded_by_bytes() {
        let cache = ResponseCache::new(10_000);
        for i in 0u64..1000 {
            let mut key = [0u8; 32];
            key[..8].copy_from_slice(&i.to_le_bytes());
            cache.insert(
                key,
                CachedAnswer {
                    body: Bytes::from(vec![b'x'; 500]),
                    position: Some(1),
                },
            );
        }
        cache.answers.run_pending_tasks();
        assert!(
            cache.answers.weighted_size() <= 10_000,
            "{}",
            cache.answers.weighted_size()
        );
    }

    #[test]
    fn one_answer_takes_at_most_a_sixty_fourth_of_the_cache() {
        let cache = ResponseCache::new(64 * 1024 * 1024);
        assert_eq!(cache.max_entry_bytes(), 1024 * 1024);
        let answer = |bytes: usize| CachedAnswer {
            body: Bytes::from(vec![b'x'; bytes]),
            position: None,
        };
        assert!(!cache.insert([1; 32], answer(1024 * 1024 + 1)));
        assert!(cache.get(&[1; 32]).is_none());
        assert!(cache.insert([2; 32], answer(1024 * 1024)));
        assert!(cache.get(&[2; 32]).is_some());
        // Small caches still keep ordinary answers.
        assert_eq!(ResponseCache::new(1024 * 1024).max_entry_bytes(), 64 * 1024);
    }
}
