//! Structured concurrency for tokio.
//!
//! This crate will hold the task group: children spawned into a group belong to it, fail-fast or
//! collect-all policies decide what a failure does to the siblings, and no child outlives the group.
