//! The synchronisation primitives of the group's books, from `std` or, under
//! `cfg(taskgroup_loom)`, from loom, so that the loom model checks the real protocol.
//!
//! Only what the protocol's correctness depends on goes through this shim: the books' mutex
//! and the "stopping" flag read without it. Statistics counters and the process-wide gauge
//! stay plain `std` atomics (loom cannot put an atomic in a `static`, and they decide nothing).
//! The cfg is not `loom` because tokio reads that one to switch itself to its own loom build.

#[cfg(not(taskgroup_loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicUsize};
#[cfg(not(taskgroup_loom))]
pub(crate) use std::sync::{Mutex, MutexGuard};

#[cfg(taskgroup_loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicUsize};
#[cfg(taskgroup_loom)]
pub(crate) use loom::sync::{Mutex, MutexGuard};
