//! `api token --sub 42 [--scope users:batch] [--ttl 1h]`: an HS256 token signed with
//! `auth.secret`, for development and tests (`cargo xtask token` runs it with the local secret).
//! Production tokens come from the identity provider, signed with its keys.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use api::settings::AuthSettings;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

/// Arguments of `api token`.
#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    /// The token's subject: the user id whose dashboard it reads.
    #[arg(long)]
    sub: String,
    /// A scope to grant (repeat for several), e.g. dashboards:read, users:batch, ops:read.
    #[arg(long)]
    scope: Vec<String>,
    /// How long the token is valid (e.g. 15m, 1h).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: Duration,
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "str::is_empty")]
    scope: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

/// Signs a token for `args` with the HS256 secret of `auth`.
pub fn mint(auth: &AuthSettings, args: &TokenArgs) -> Result<String> {
    let Some(secret) = &auth.secret else {
        bail!(
            "no HS256 secret: set APP__AUTH__SECRET (cargo xtask token does it for the local stack)"
        );
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("the clock is before 1970")?
        .as_secs();
    let scope = args.scope.join(" ");
    let claims = Claims {
        sub: &args.sub,
        iat: now,
        exp: now + args.ttl.as_secs(),
        scope: &scope,
        iss: auth.issuer.as_deref(),
        aud: auth.audience.as_deref(),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .context("cannot sign the token")
}
