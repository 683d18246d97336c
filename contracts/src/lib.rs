//! Breaking changes between two versions of a contract: the OpenAPI documents
//! ([`openapi::breaking_changes`]) and the GraphQL schema ([`graphql::breaking_changes`]).
//!
//! The contracts are checked in beside the crates that serve them (`command-api/openapi.json`,
//! `query-api/openapi.json`, `query-api/schema.graphql`; each crate's own test keeps its file
//! equal to what it serves). `contracts/baseline/` holds the same files as of the last
//! release. The test of this crate (`tests/contracts`) classifies every difference between
//! the baseline and the checked-in files and fails on a breaking one that
//! `contracts/BREAKING.md` does not name, so a change that breaks clients needs a written
//! note in the same review. What counts as breaking is what can make a working client fail:
//! something removed that a client may send or read, an input made stricter, an output made
//! looser. Additions never are.

pub mod graphql;
pub mod openapi;

use std::fmt;

/// One breaking change, described in one stable line: the line `BREAKING.md` must contain
/// to acknowledge it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Breaking(pub String);

impl fmt::Display for Breaking {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A contract that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ContractError {
    #[error("the GraphQL schema does not parse: {0}")]
    GraphqlSyntax(#[from] async_graphql_parser::Error),
    #[error("the OpenAPI document is not JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// The changes of `changes` that `notes` (the text of `BREAKING.md`) does not name, each
/// named by its exact line anywhere in the notes (as a list item, in backticks or not).
pub fn unacknowledged<'a>(changes: &'a [Breaking], notes: &str) -> Vec<&'a Breaking> {
    changes
        .iter()
        .filter(|change| !notes.contains(change.0.as_str()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_breaking_change_is_acknowledged_only_by_its_own_line() {
        let changes = vec![
            Breaking("graphql: removed field Device.status".into()),
            Breaking("graphql: removed field Device.provider".into()),
        ];
        let notes = "# Breaking changes\n\n- `graphql: removed field Device.status`: read `state` instead.\n";
        assert_eq!(unacknowledged(&changes, notes), vec![&changes[1]]);
    }
}
