//! The development stack that `cargo xtask` and its lab share: a project-local PostgreSQL cluster
//! (`pg`), the settings the commands read (`settings`), seed data generated inside PostgreSQL
//! (`seed`), and the service's binaries run as child processes (`stack`).
//!
//! It links none of the workspace's crates: `cargo xtask` builds and starts the `api`, `upstream`
//! and `loadtest` binaries instead, so its own debug build takes seconds. The chaos runs and
//! benchmarks, which drive the stand-in and the load generator in-process, are the `lab` binary
//! (`src/bin/lab`, feature `lab`), built in release when one of them is asked for.

pub mod pg;
pub mod seed;
pub mod settings;
pub mod stack;
