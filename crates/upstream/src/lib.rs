//! A local recommendation service.
//!
//! This crate will hold the stand-in for the external recommendation API that development,
//! integration tests and load runs use: deterministic items, configurable latency, fault injection.
