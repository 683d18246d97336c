//! Bearer tokens, as a portal, an operator or a service would present them (HS256).

use chrono::{Duration, Utc};
use http_edge::auth::{DEVELOPMENT_SECRET, Role, mint_token};

/// A token for `subject` with `role` and `scopes`, signed with `secret`, issued now and
/// valid for an hour.
pub fn signed(secret: &str, subject: &str, role: Role, scopes: &[&str]) -> String {
    signed_for(secret, subject, role, scopes, Duration::hours(1))
}

/// As [`signed`], valid for `lifetime`.
pub fn signed_for(secret: &str, subject: &str, role: Role, scopes: &[&str], lifetime: Duration) -> String {
    mint_token(secret, subject, role, scopes, Utc::now(), lifetime).unwrap()
}

/// A token for `subject` with `role`, signed with the development secret (what a role
/// started with no keys accepts), valid for an hour.
pub fn development(subject: &str, role: Role) -> String {
    signed(DEVELOPMENT_SECRET, subject, role, &[])
}
