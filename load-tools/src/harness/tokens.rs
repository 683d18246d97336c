//! Bearer tokens of load runs: every server a run starts checks tokens with [`SECRET`], and
//! [`load_token`] signs them with it.

use chrono::Utc;
use http_edge::auth::{Role, mint_token};

/// The secret every load run's servers check tokens with, and [`load_token`] signs with.
pub const SECRET: &str = "cloudphone-load-secret";

/// A token for `subject` in `role`, signed with [`SECRET`] and valid longer than any run.
pub fn load_token(subject: &str, role: Role) -> anyhow::Result<String> {
    Ok(mint_token(
        SECRET,
        subject,
        role,
        &[],
        Utc::now(),
        chrono::Duration::hours(12),
    )?)
}
