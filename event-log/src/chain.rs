//! The hash chain: each event's hash covers the previous event's hash and its own canonical
//! bytes (defined in `event_schema::canonical`), so changing, removing or reordering any
//! stored event breaks every hash after it.

use event_schema::canonical::envelope_bytes;
use event_schema::{ChainHash, EventEnvelope};
use sha2::{Digest, Sha256};

/// `SHA-256(prev || canonical)`.
pub fn chain_hash(prev: &ChainHash, canonical: &[u8]) -> ChainHash {
    let mut hasher = Sha256::new();
    hasher.update(prev.0);
    hasher.update(canonical);
    ChainHash(hasher.finalize().into())
}

/// Where and how a chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainBreak {
    #[error("position {expected} is missing (next event found is {found})")]
    MissingPosition { expected: i64, found: i64 },
    #[error("position {position}: prev_hash {found} does not match the previous event's hash {expected}")]
    PrevHashMismatch {
        position: i64,
        expected: ChainHash,
        found: ChainHash,
    },
    #[error("position {position}: stored hash {stored} does not match the recomputed {computed}")]
    HashMismatch {
        position: i64,
        stored: ChainHash,
        computed: ChainHash,
    },
}

impl ChainBreak {
    /// The first position the chain cannot vouch for.
    pub fn position(&self) -> i64 {
        match self {
            ChainBreak::MissingPosition { expected, .. } => *expected,
            ChainBreak::PrevHashMismatch { position, .. } | ChainBreak::HashMismatch { position, .. } => *position,
        }
    }
}

/// Checks events one by one, in position order, against the chain.
#[derive(Debug, Clone)]
pub struct ChainVerifier {
    next_position: i64,
    prev: ChainHash,
    checked: u64,
}

impl ChainVerifier {
    /// Verifies from the first event of the log.
    pub fn from_genesis() -> Self {
        Self::starting_at(1, ChainHash::GENESIS)
    }

    /// Verifies from `position`, trusting `prev_hash` as the hash of `position - 1`.
    pub fn starting_at(position: i64, prev_hash: ChainHash) -> Self {
        ChainVerifier {
            next_position: position,
            prev: prev_hash,
            checked: 0,
        }
    }

    /// Checks the next event; on success it becomes the anchor for the one after it.
    pub fn check(&mut self, event: &EventEnvelope) -> Result<(), ChainBreak> {
        if event.position != self.next_position {
            return Err(ChainBreak::MissingPosition {
                expected: self.next_position,
                found: event.position,
            });
        }
        if event.prev_hash != self.prev {
            return Err(ChainBreak::PrevHashMismatch {
                position: event.position,
                expected: self.prev,
                found: event.prev_hash,
            });
        }
        let computed = chain_hash(&self.prev, &envelope_bytes(event));
        if computed != event.hash {
            return Err(ChainBreak::HashMismatch {
                position: event.position,
                stored: event.hash,
                computed,
            });
        }
        self.prev = event.hash;
        self.next_position += 1;
        self.checked += 1;
        Ok(())
    }

    pub fn checked(&self) -> u64 {
        self.checked
    }

    /// Hash of the last event that verified (the anchor given at the start if none did).
    pub fn last_hash(&self) -> ChainHash {
        self.prev
    }

    pub fn next_position(&self) -> i64 {
        self.next_position
    }
}
