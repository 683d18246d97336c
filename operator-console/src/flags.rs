//! The flag groups several verbs flatten into their own: the primary database and the master
//! keys of personal data, with their `CLOUDPHONE_*` environment fallbacks.

use clap::Args;

/// The database every verb uses unless told otherwise: a local PostgreSQL.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/cloudphone";

// The primary PostgreSQL database and how many connections to open to it. (No doc comment:
// clap would make it the `about` of a verb that flattens this group and has none of its own.)
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// The primary PostgreSQL database. `migrate`, `serve` and roles that migrate on start
    /// create it if it does not exist; every other verb needs it migrated
    /// (`cloudphone migrate`) and creates nothing.
    #[arg(long, env = "CLOUDPHONE_DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    pub database_url: String,
    /// Most connections this process opens to the primary.
    #[arg(long, env = "CLOUDPHONE_DATABASE_MAX_CONNECTIONS", default_value_t = 16)]
    pub database_max_connections: u32,
}

/// The master keys that wrap each user's personal-data key.
#[derive(Debug, Clone, Args)]
pub struct MasterKeyArgs {
    /// The active master key, `<id>:<base64 of 32 bytes>` (`cloudphone keys generate` makes
    /// one). New data keys are wrapped with it [default: a development key from the source
    /// code, with a warning].
    #[arg(long, env = "CLOUDPHONE_MASTER_KEY", hide_env_values = true)]
    pub master_key: Option<String>,
    /// Earlier master keys, comma-separated, still accepted for unwrapping until
    /// `cloudphone keys rotate` has rewrapped everything under the active one.
    #[arg(
        long,
        env = "CLOUDPHONE_PREVIOUS_MASTER_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub previous_master_keys: Vec<String>,
}

impl MasterKeyArgs {
    /// The keyring these flags name (a warning when it is the development key).
    pub fn keyring(&self) -> anyhow::Result<std::sync::Arc<event_log::personal::MasterKeyring>> {
        let keyring =
            event_log::personal::MasterKeyring::from_config(self.master_key.as_deref(), &self.previous_master_keys)?;
        if keyring.is_development() {
            tracing::warn!(
                "NO MASTER KEY CONFIGURED: personal data is encrypted under the built-in development \
                 master key. Set CLOUDPHONE_MASTER_KEY (cloudphone keys generate) in production."
            );
        }
        Ok(std::sync::Arc::new(keyring))
    }
}
