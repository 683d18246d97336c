//! Contracts (the OpenAPI documents, the GraphQL schema) are checked in beside the crate that
//! serves them, so a change to one shows in review.

/// Asserts that `generated` equals the checked-in file at `path`; with
/// `CLOUDPHONE_BLESS_CONTRACTS` set, rewrites the file first. `bless` is the test command that
/// regenerates it, for the failure message.
pub fn assert_checked_in(generated: &str, path: &str, bless: &str) {
    if std::env::var_os("CLOUDPHONE_BLESS_CONTRACTS").is_some() {
        std::fs::write(path, generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        generated == checked_in,
        "{path} differs from what the code generates; if the change is meant, run \
         CLOUDPHONE_BLESS_CONTRACTS=1 {bless} and review the diff"
    );
}
