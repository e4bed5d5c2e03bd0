//! The errors a run, a report read or a report write can end with.
//!
//! Transport failures of single requests are not errors here: they are counted in the report by
//! kind. An [`Error`] means the run itself could not start, finish or be written down. Messages
//! do not repeat their cause; it is the error's `source()`, which `anyhow`'s `{:#}` prints after
//! it.

use std::{io, path::PathBuf, time::Duration};

/// Why a run, or reading or writing a report, failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A run parameter is out of range or malformed.
    #[error("invalid {field}: {problem}")]
    Config {
        /// The parameter, named as on the command line (`connections`, `url`, ...).
        field: &'static str,
        /// What is wrong with it, in a sentence.
        problem: String,
    },
    /// The target host name could not be resolved.
    #[error("could not resolve {host}")]
    Resolve {
        /// The host name from the URL.
        host: String,
        /// The resolver's error.
        source: io::Error,
    },
    /// The resolver did not answer in time.
    #[error("resolving {host} took longer than {timeout:?}")]
    ResolveTimeout {
        /// The host name from the URL.
        host: String,
        /// How long the resolver was given.
        timeout: Duration,
    },
    /// The host name resolved to no address at all.
    #[error("{host} resolved to no address")]
    NoAddress {
        /// The host name from the URL.
        host: String,
    },
    /// A worker thread or its runtime could not be started.
    #[error("could not start a worker")]
    Spawn(#[source] io::Error),
    /// A worker failed while the run was in progress (a connection task panicked, or a worker
    /// did not stop by the drain deadline).
    #[error("a worker failed: {0}")]
    Worker(String),
    /// A report file could not be written.
    #[error("could not write {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// A report file could not be read.
    #[error("could not read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// A file is not a JSON report written by this crate.
    #[error("{} is not a loadtest JSON report", path.display())]
    NotAReport {
        /// The file.
        path: PathBuf,
        /// Why it did not decode.
        source: serde_json::Error,
    },
    /// The report could not be encoded as JSON.
    #[error("could not encode the report as JSON")]
    Encode(#[source] serde_json::Error),
    /// The SVG report could not be drawn.
    #[error("could not draw the SVG report: {0}")]
    Render(String),
}
