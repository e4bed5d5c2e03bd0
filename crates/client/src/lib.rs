//! The client of the external recommendation service.
//!
//! The dashboard asks a recommendation API for `GET {base}/users/{id}/recommendations` and gets
//! `{"items": [...]}`: what an item is (a product id, an object) is the service's business, and
//! the client passes the array on verbatim ([`Recommendations`]). [`RecommendationClient`] makes that call on
//! hyper and hyper-util's pooled client, shared by every request of the process, and adds what a
//! high-concurrency service needs around it:
//!
//! - a time budget per call (configured, default 5 s, or shorter per call via a deadline) that
//!   covers connecting, waiting, reading and retries;
//! - keep-alive reuse with a cap on idle connections (error answers included: their small bodies
//!   are read to the end so the connection stays open), a connect timeout and a cap on requests
//!   in flight, beyond which calls queue within their budget;
//! - a response-size cap (default 1 MiB), enforced before reading when the length is announced;
//! - typed errors ([`RecommendationError`]) whose messages are one readable line and whose
//!   [`ErrorKind`] labels metrics;
//! - a circuit breaker that fails fast while the service keeps failing, and judges the service
//!   only on requests it actually received (a call that ran out of time queueing in this client
//!   is `saturated`, not a failure of the service);
//! - optional hedged requests against a slow latency tail, and optional retries of failed
//!   connects.
//!
//! Settings come from the `[recommendations]` section of the API's configuration, deserialised
//! into [`ClientConfig`].

mod breaker;
mod client;
mod config;
mod error;

pub use breaker::{BreakerSnapshot, BreakerState};
pub use client::{ClientStats, ErrorCounts, RecommendationClient, Recommendations};
pub use config::{BreakerConfig, ClientConfig, HedgeConfig};
pub use error::{ConfigError, ErrorKind, RecommendationError};
