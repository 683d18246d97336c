//! `cloudphone token`: mint a development bearer token.

use anyhow::{Context, bail};
use chrono::Utc;
use http_edge::auth::{self, Role};

use crate::cli::{RoleArg, TokenArgs};

pub fn run(args: &TokenArgs) -> anyhow::Result<()> {
    let role = match args.role {
        RoleArg::User => Role::User,
        RoleArg::Admin => Role::Admin,
        RoleArg::Service => Role::Service,
        RoleArg::Auditor => Role::Auditor,
    };
    if role != Role::Service && uuid::Uuid::parse_str(&args.user).is_err() {
        bail!("--user must be a UUID for user and admin tokens, got `{}`", args.user);
    }
    if args.ttl_hours <= 0 {
        bail!("--ttl-hours must be positive");
    }
    let secret = args.jwt_secret.as_deref().unwrap_or(auth::DEVELOPMENT_SECRET);
    let scopes: Vec<&str> = args.scope.iter().map(String::as_str).collect();
    let token = auth::mint_token(
        secret,
        &args.user,
        role,
        &scopes,
        Utc::now(),
        chrono::Duration::hours(args.ttl_hours),
    )
    .context("cannot sign the token")?;
    println!("{token}");
    Ok(())
}
