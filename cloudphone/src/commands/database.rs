//! Connecting to the primary the way every verb does.

use std::str::FromStr;

use anyhow::Context;
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;

use crate::cli::DatabaseArgs;

/// Connects to the primary, creating its database first if it does not exist.
pub async fn connect(args: &DatabaseArgs) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(&args.database_url)
        .context("CLOUDPHONE_DATABASE_URL / --database-url is not a valid PostgreSQL URL")?;
    if event_log::create_database_if_missing(&options)
        .await
        .with_context(|| format!("cannot reach PostgreSQL at {}", redact(&args.database_url)))?
    {
        tracing::info!(
            database = options.get_database().unwrap_or_default(),
            "created database"
        );
    }
    event_log::pool_options(args.database_max_connections)
        .connect_with(options)
        .await
        .with_context(|| format!("cannot connect to {}", redact(&args.database_url)))
}

/// Connects to the primary (which must exist) with a `statement_timeout` on every connection:
/// for roles that only read.
pub async fn connect_with_statement_timeout(
    args: &DatabaseArgs,
    timeout: std::time::Duration,
) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(&args.database_url)
        .context("CLOUDPHONE_DATABASE_URL / --database-url is not a valid PostgreSQL URL")?
        .options([("statement_timeout", timeout.as_millis().to_string())]);
    event_log::pool_options(args.database_max_connections)
        .connect_with(options)
        .await
        .with_context(|| format!("cannot connect to {}", redact(&args.database_url)))
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(redact("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
    }
}
