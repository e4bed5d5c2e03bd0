//! PostgreSQL access for the dashboard service.
//!
//! The layer the seed article calls 仓库层 (section 四), built on deadpool-postgres and
//! tokio-postgres:
//!
//! - [`Database`] owns the pools: the primary's and each read replica's. Every wait on them is
//!   bounded (`wait`, `create` and `recycle` timeouts from [`DbConfig`]), and every statement runs
//!   under a server-side `statement_timeout`. Reads go to a replica that answers and is recent
//!   enough, else to the primary (`health`), and can go through a transaction pooler such as
//!   PgBouncer ([`Statements::Unnamed`]).
//! - The reads the dashboard and the batch summaries need ([`Conn::profile`], [`Conn::orders`],
//!   [`Conn::reviews`], [`Conn::user_summaries`]) run statements (prepared once per connection and cached, or unnamed through a pooler)
//!   cached per connection and return typed rows ([`models`]); money is an exact decimal.
//! - Errors are a typed [`Error`] a caller can match on: pool timeout, unavailable server,
//!   statement timeout, other query errors with their SQLSTATE. No database error panics.
//! - [`migrations`] applies the schema files of `migrations/` with refinery.

mod config;
mod database;
mod error;
mod health;
mod lane;
pub mod migrations;
pub mod models;
mod tls;

pub use config::{DbConfig, Secret, Statements, mask_url};
pub use database::{Conn, Database, LeaseCount, PoolStatus, SETTLE_TIMEOUT};
pub use error::Error;
pub use health::{DatabaseState, Reach, Role};
pub use models::{Order, OrderSummary, Page, Profile, Review, UserSummary};

/// Opens one connection outside the pool, for tools (migrations, seeding, admin statements).
/// The connection's driver task runs on the current tokio runtime until the client is dropped.
///
/// # Errors
///
/// [`Error::Config`] for unusable settings, [`Error::Unavailable`] when the server cannot be
/// reached within `create_timeout`, or another [`Error`] the server reports.
pub async fn connect(config: &DbConfig) -> Result<tokio_postgres::Client, Error> {
    let pg = config.pg_config()?;
    let tls = tls::Tls::for_config(&pg, config.tls_ca_file.as_deref())?;
    let (client, connection) = tokio::time::timeout(config.create_timeout, tls.connect(&pg))
        .await
        .map_err(|_| Error::Unavailable("connecting timed out".to_owned()))??;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "direct database connection ended");
        }
    });
    Ok(client)
}
