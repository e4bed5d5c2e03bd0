//! A local stand-in for the external recommendation service.
//!
//! The dashboard asks a recommendation API for `GET {base}/users/{id}/recommendations` and expects
//! `{"items": [...]}`. This crate serves that API on loopback with hyper, with deterministic items
//! per user, a configurable latency model (delay, jitter, a slow tail) and fault injection (error
//! statuses, hangs, malformed JSON, oversized bodies, connection resets), drawn from a seed so runs
//! are reproducible. It is a development and load-test tool, not part of the product: `cargo xtask
//! upstream` runs it from the command line, and integration tests start it in-process on an
//! ephemeral port with [`Server::start`].
//!
//! Faults can also be forced per request, which is what deterministic tests use: the
//! `x-upstream-fault` and `x-upstream-delay-ms` headers, a script of replies for the next requests
//! ([`Server::script`]), or a reply for one user id ([`Server::set_user_reply`]).
//!
//! ```
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let server = upstream::Server::start(upstream::Config::default()).await?;
//!
//! let mut tcp = tokio::net::TcpStream::connect(server.addr()).await?;
//! tcp.write_all(b"GET /users/7/recommendations HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
//!     .await?;
//! let mut answer = String::new();
//! tcp.read_to_string(&mut answer).await?;
//! assert!(answer.starts_with("HTTP/1.1 200 OK"));
//! assert!(answer.contains(r#"{"user_id":7,"items":[{"product_id":"#));
//!
//! assert_eq!(server.stats().requests, 1);
//! server.shutdown().await;
//! # Ok(())
//! # }
//! ```

mod body;
mod catalog;
mod config;
mod reset;
mod server;

pub use catalog::Item;
pub use config::{
    Config, Fault, MAX_DELAY, MAX_ITEMS_PER_USER, MAX_OVERSIZED_BYTES, ParseFaultError, Reply,
    Shape,
};
pub use server::{DELAY_HEADER, FAULT_HEADER, Server, Stats};

/// The status code type of [`Config::error_status`] and [`Fault::Status`], re-exported so that
/// users need not depend on `http` themselves.
pub use http::StatusCode;

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is inconsistent; the message names the field.
    #[error("invalid upstream configuration: {0}")]
    InvalidConfig(String),
    /// The listening socket could not be bound.
    #[error("could not listen on {addr}")]
    Bind {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
}
