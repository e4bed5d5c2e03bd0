//! The recommendation-service client.
//!
//! This crate will hold `RecommendationClient`: one pooled hyper client per process, with timeouts,
//! a body-size cap, typed errors, a circuit breaker and optional hedging.
