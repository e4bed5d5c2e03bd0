//! Dashboard and batch orchestration.
//!
//! This crate will hold the dashboard fan-out (profile, orders, reviews, recommendations in one
//! task group) and the batch summaries, on top of `repository`, `client` and `taskgroup`.
