//! The checked-in contracts against the baseline (`contracts/baseline/`, the contracts as of
//! the last release): every breaking difference must be named in `contracts/BREAKING.md`.
//!
//! `CLOUDPHONE_BLESS_BASELINE=1` copies the checked-in contracts into the baseline (at a
//! release, when clients have been told; then the notes in `BREAKING.md` can go).

use std::path::{Path, PathBuf};

use contracts::{Breaking, graphql, openapi, unacknowledged};

/// The checked-in contracts (relative to the workspace) and their baseline files.
const CONTRACTS: [(&str, &str); 3] = [
    ("command-api/openapi.json", "command-api.openapi.json"),
    ("query-api/openapi.json", "query-api.openapi.json"),
    ("query-api/schema.graphql", "query-api.schema.graphql"),
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A file's text; a missing one fails the test (a contract that is gone is no pass).
fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn breaking_changes(contract: &str, old: &str, new: &str) -> Vec<Breaking> {
    if contract.ends_with(".graphql") {
        graphql::breaking_changes(old, new).unwrap_or_else(|e| panic!("{contract}: {e}"))
    } else {
        let parse = |text: &str| serde_json::from_str(text).unwrap_or_else(|e| panic!("{contract}: {e}"));
        let api = contract.split('/').next().unwrap_or(contract);
        openapi::breaking_changes(api, &parse(old), &parse(new))
    }
}

#[test]
fn no_contract_breaks_clients_without_a_note() {
    let root = workspace();
    let baseline = root.join("contracts/baseline");
    if std::env::var_os("CLOUDPHONE_BLESS_BASELINE").is_some() {
        for (contract, file) in CONTRACTS {
            std::fs::copy(root.join(contract), baseline.join(file)).unwrap();
        }
    }
    let notes = read(&root.join("contracts/BREAKING.md"));
    let mut missing = Vec::new();
    for (contract, file) in CONTRACTS {
        let changes = breaking_changes(contract, &read(&baseline.join(file)), &read(&root.join(contract)));
        missing.extend(unacknowledged(&changes, &notes).into_iter().cloned());
    }
    assert!(
        missing.is_empty(),
        "breaking changes since the baseline (contracts/baseline/) that contracts/BREAKING.md \
         does not name; if they are meant, add each line below to BREAKING.md with what \
         clients must do:\n{}",
        missing.iter().map(|b| format!("- `{b}`\n")).collect::<String>()
    );
}

/// The baseline and the checked-in files are the same kind of document, so the check above
/// compares like with like (an empty or truncated baseline would hide every change).
#[test]
fn the_baseline_holds_every_contract() {
    let root = workspace();
    for (contract, file) in CONTRACTS {
        let text = read(&root.join("contracts/baseline").join(file));
        if contract.ends_with(".graphql") {
            assert!(text.contains("type Query {"), "{file}");
        } else {
            let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert!(doc["paths"].as_object().is_some_and(|p| !p.is_empty()), "{file}");
        }
    }
}
