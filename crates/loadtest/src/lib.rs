//! A load generator for the dashboard service, behind `cargo xtask loadtest`.
//!
//! It knows the service it loads: besides latency, throughput and status codes it counts the
//! per-source errors inside partial dashboard answers and the per-id errors inside batch
//! answers. It is built to be trusted over a generic tool:
//!
//! - **Two load models.** Closed loop: each connection sends its next request when the last
//!   answer arrives. Open loop (`rate`): sends are due on a fixed schedule, and latency counts
//!   from each request's *scheduled* send, so a stall is charged to every request queued behind
//!   it rather than hidden (coordinated omission, as wrk2 corrects it). The generator's own
//!   lateness in sending (timer granularity, a starved CPU) is measured separately as *send lag*
//!   and left out of the latency; the report says plainly when the generator could not keep up,
//!   and whether the server or the generator's CPU held it back.
//! - **Nothing unanswered hides.** A request without an answer counts in the latency at the time
//!   it failed and at least the timeout; an open-loop send that never went out counts as an
//!   error and, at the end, in the latency from when it was due (a lower bound). Throughput
//!   counts answers, not attempts, and in open loop `--check` fails when the requested load was
//!   not applied.
//! - **Exact statistics.** One HDR histogram per worker (nanoseconds, 3 significant digits),
//!   merged exactly at the end; the warm-up is counted apart and excluded.
//! - **Bounded.** Every request has a timeout covering connect, send and the whole answer; the run
//!   ends at warm-up + duration + at most one timeout of drain, whatever the server does.
//! - **Cheap.** One task per keep-alive connection, a current-thread runtime per worker thread,
//!   reused buffers, bodies only decoded when they carry something to count, and one timer per
//!   connection rather than per request. It writes and reads HTTP/1.1 directly on the socket
//!   (`httparse` for the response head), as wrk does; hyper's client, tried as a second engine,
//!   cost about 1.8µs more CPU per request on a 2-core machine shared with the server. Its counts
//!   are cross-checked against wrk's by `cargo xtask bench overhead`, not by a second engine.
//!
//! Outputs: [`Report::summary`] (a terminal table), [`write()`] (`NAME.json`, every figure and the
//! parameters, and `NAME.svg`, the latency curve and throughput over time), [`Checks`]
//! (`--check`), and [`compare()`] (`--compare`).
//!
//! ```no_run
//! # async fn example() -> Result<(), loadtest::Error> {
//! let config = loadtest::Config {
//!     url: Some("http://127.0.0.1:9100".to_owned()),
//!     scenario: loadtest::Scenario::Recommendations,
//!     duration: std::time::Duration::from_secs(10),
//!     ..loadtest::Config::default()
//! };
//! let report = loadtest::run(&config, loadtest::Progress::Auto).await?;
//! println!("{}", report.summary());
//! loadtest::write(&report, std::path::Path::new("target/loadtest"), "recommendations")?;
//! # Ok(())
//! # }
//! ```

mod body;
mod check;
pub mod codec;
mod compare;
mod config;
mod driver;
mod error;
mod format;
mod ids;
mod net;
mod progress;
mod raw;
mod report;
mod requests;
mod run;
mod schedule;
mod stats;
mod svg;

pub use check::{Check, CheckError, CheckOutcome, Checks, Metric, Op};
pub use compare::compare;
pub use config::{
    Config, DEFAULT_SERVICE_URL, DEFAULT_UPSTREAM_URL, Distribution, Mix, ParseError, RequestKind,
    RuntimeFlavor, Scenario,
};
pub use error::Error;
pub use ids::{Zipf, ZipfError};
pub use progress::{PLAIN_EVERY, Progress};
pub use report::{
    BatchIdErrors, CurvePoint, FORMAT_VERSION, Latency, Machine, OpenLoop, Parameters, Report,
    SourceErrorCount, TimelinePhase, TimelinePoint, Warmup, Window, Written, read, write,
};
pub use run::run;
pub use stats::TransportError;
pub use svg::render as render_svg;
