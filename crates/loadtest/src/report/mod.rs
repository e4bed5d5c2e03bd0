//! The report of a run: every figure and the parameters that produced them (this module, and the
//! JSON file), and the plain-text summary printed at the end (`summary`).
//!
//! Latencies are in milliseconds (fractional, so microseconds survive), rates in requests per
//! second, durations in seconds. The JSON is [`Report`] serialized as is; `--compare` reads it
//! back, so its fields only grow (fields added since version 1 default when absent).
//!
//! What the headline figures count (format 2):
//!
//! - `requests` are the requests sent, answered or not; `attempts_rps` is their rate.
//!   `throughput_rps` counts *answered* requests (any status) and `success_rps` successful ones,
//!   so a server that is down has a throughput of zero, however fast its refusals come.
//! - In open loop, `missed` sends were due and never went out: the run ended with them queued
//!   behind requests still unanswered, or the generator was late. They count as errors
//!   (`error_rate = errors / (requests + missed)`) and in the latency.
//! - `latency` covers every request: answers to their end, requests without an answer to their
//!   failure and at least the timeout, and missed sends to the time their connection stopped (a
//!   lower bound, as wrk2 and HdrHistogram recommend). `success_latency` is the successful
//!   answers alone.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

mod summary;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::{
    Config, Error, Scenario,
    check::CheckOutcome,
    format,
    stats::{PhaseStats, TransportError, WorkerStats},
};

/// The JSON format's version; bumped when a field changes meaning.
///
/// Version 2: `throughput_rps` counts answered requests (it counted every request sent), the
/// latency figures include requests without an answer and missed open-loop sends, `errors` and
/// `error_rate` include missed sends, and `achieved_ratio` is the share of due sends that went
/// out. New: `attempts_rps`, `missed`, `success_latency`, and in open loop
/// `missed_on_busy_connections` and `capacity_rps`.
pub const FORMAT_VERSION: u32 = 2;

/// Send lag above this (p99) means the generator was short of CPU, not just at its timer's
/// millisecond granularity.
const LAG_WARNING_MS: f64 = 5.0;

/// A run that never sent more than this share of its schedule did not keep up.
const MISSED_TOLERANCE: f64 = 0.01;

/// Everything a run measured, with its parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// [`FORMAT_VERSION`] of the writer.
    pub format: u32,
    /// The generator and its version.
    pub tool: String,
    /// When the run started, in seconds since the Unix epoch.
    pub started_unix_s: u64,
    /// How the run was configured.
    pub parameters: Parameters,
    /// Where it ran.
    pub machine: Machine,
    /// The measured window: every headline figure.
    pub measured: Window,
    /// The warm-up window, excluded from [`Report::measured`].
    pub warmup: Warmup,
    /// Open loop only: requested against achieved rate, and the generator's own lag.
    pub open_loop: Option<OpenLoop>,
    /// Requests still in flight when the drain deadline ended the run; counted as timeouts.
    pub unfinished: u64,
    /// Throughput and latency over time, warm-up and drain included.
    pub timeline: Vec<TimelinePoint>,
    /// Results of `--check`, when given.
    #[serde(default)]
    pub checks: Vec<CheckOutcome>,
}

/// How a run was configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Parameters {
    /// Base URL.
    pub url: String,
    /// What was requested.
    pub scenario: Scenario,
    /// The mix, for the `mixed` scenario.
    pub mix: Option<String>,
    /// `closed` or `open`.
    pub load_model: String,
    /// Connections.
    pub connections: usize,
    /// Worker threads.
    pub threads: usize,
    /// `current-thread` or `multi-thread`.
    pub runtime: String,
    /// Requested rate (open loop).
    pub rate_rps: Option<f64>,
    /// Measured window length.
    pub duration_s: f64,
    /// Warm-up length.
    pub warmup_s: f64,
    /// Per-request timeout.
    pub timeout_s: f64,
    /// Ids drawn from `1..=users`.
    pub users: u64,
    /// Ids per batch request.
    pub batch_size: usize,
    /// `uniform` or `zipf:S`.
    pub distribution: String,
    /// Seed of the draws.
    pub seed: u64,
}

/// Where a run ran, and what the generator cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    /// Logical CPUs available to the generator.
    pub cores: usize,
    /// The generator process's CPU time over the run, as a percentage of one core (Linux only).
    pub generator_cpu_percent: Option<f64>,
}

/// Latency figures of one histogram, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Smallest.
    pub min_ms: f64,
    /// Mean.
    pub mean_ms: f64,
    /// Standard deviation.
    pub stdev_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 75th percentile.
    pub p75_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p99_9_ms: f64,
    /// 99.99th percentile.
    pub p99_99_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

/// One point of a latency-by-percentile curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    /// Percentile, 0 to 100.
    pub percentile: f64,
    /// Latency at it.
    pub latency_ms: f64,
}

/// Per-source errors of one (source, kind) pair inside dashboard answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceErrorCount {
    /// The source, e.g. `recommendations`.
    pub source: String,
    /// The kind, or the error text when the answer gave no kind.
    pub kind: String,
    /// How many.
    pub count: u64,
}

/// Per-id errors inside batch answers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchIdErrors {
    /// All of them.
    pub total: u64,
    /// By kind, or error text when the answer gave no kind (the first 32 distinct, the rest
    /// under `(other)`).
    pub by_error: BTreeMap<String, u64>,
}

/// The measured window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Window {
    /// Its length.
    pub duration_s: f64,
    /// Requests sent in it, answered or not.
    pub requests: u64,
    /// Of which answered over HTTP.
    pub responses: u64,
    /// Of which with a 2xx or 3xx status.
    pub successes: u64,
    /// Open loop: sends due before the end that never went out (0 in closed loop).
    #[serde(default)]
    pub missed: u64,
    /// Requests without a successful answer (transport errors, 4xx and 5xx) plus missed sends.
    pub errors: u64,
    /// `errors / (requests + missed)`.
    pub error_rate: f64,
    /// `requests / duration`: requests sent per second, answered or not.
    #[serde(default)]
    pub attempts_rps: f64,
    /// `responses / duration`: answered requests per second, whatever their status. A server
    /// that is down has none, however fast its refusals come.
    pub throughput_rps: f64,
    /// `successes / duration`.
    pub success_rps: f64,
    /// Body bytes received.
    pub bytes_received: u64,
    /// Latency of every request, in open loop from its scheduled send: answered ones to the end
    /// of the answer, unanswered ones to their failure and at least the timeout, missed sends to
    /// when their connection stopped (a lower bound).
    pub latency: Latency,
    /// The same as a curve, for plotting and comparing.
    pub latency_curve: Vec<CurvePoint>,
    /// Latency of the successful answers alone.
    #[serde(default)]
    pub success_latency: Latency,
    /// Answers by status code.
    pub statuses: BTreeMap<String, u64>,
    /// Requests without an answer, by kind.
    pub transport_errors: BTreeMap<String, u64>,
    /// Error answers by status and body `error.code`, e.g. `404 not_found`.
    pub error_codes: BTreeMap<String, u64>,
    /// Dashboard answers that lacked at least one source.
    pub partial_answers: u64,
    /// Per-source errors inside dashboard answers.
    pub source_errors: Vec<SourceErrorCount>,
    /// Per-id errors inside batch answers.
    pub batch_id_errors: BatchIdErrors,
    /// Successful answers whose body was not the expected JSON.
    pub undecodable_bodies: u64,
}

impl Window {
    /// The sum of all per-source errors.
    #[must_use]
    pub fn source_error_total(&self) -> u64 {
        self.source_errors.iter().map(|e| e.count).sum()
    }

    /// The sum of all transport errors.
    #[must_use]
    pub fn transport_error_total(&self) -> u64 {
        self.transport_errors.values().sum()
    }
}

/// The warm-up window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Warmup {
    /// Its length.
    pub duration_s: f64,
    /// Requests sent in it.
    pub requests: u64,
    /// Of which errors.
    pub errors: u64,
    /// Their latency.
    pub latency: Latency,
}

/// Open-loop figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpenLoop {
    /// The requested arrival rate.
    pub requested_rps: f64,
    /// Sends due in the measured window.
    pub scheduled: u64,
    /// Sends made in the measured window (some may have been due in the warm-up, when the
    /// connections were behind).
    pub sent: u64,
    /// Sends due before the end of the run that never went out: still queued behind slow
    /// answers when it ended, or not sent in time by the generator.
    pub missed: u64,
    /// Of the missed sends, those whose connection was still carrying an earlier request when
    /// the run ended: held back by the server, not by the generator.
    #[serde(default)]
    pub missed_on_busy_connections: u64,
    /// `sent / duration`.
    pub achieved_rps: f64,
    /// The share of the sends due in the run (warm-up included) that went out; at most 1.
    pub achieved_ratio: f64,
    /// Whether the generator sent (almost) everything, on time: the requested load was applied.
    pub kept_up: bool,
    /// How long each send occupied its connection, from the actual send to its answer or
    /// failure (timeouts included). It hides queueing behind slow answers: for contrast, and
    /// for [`OpenLoop::capacity_rps`].
    pub service_time: Latency,
    /// The same as a curve.
    pub service_curve: Vec<CurvePoint>,
    /// What the connections could carry at the mean service time, one request in flight on
    /// each: `connections / mean service time`. `None` without sends.
    #[serde(default)]
    pub capacity_rps: Option<f64>,
    /// The generator's own delay in sending, excluded from the latency figures.
    pub send_lag: Latency,
    /// What the figures above mean, in a sentence or two.
    pub statement: String,
}

/// Which part of the run a timeline point falls in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimelinePhase {
    /// Before measuring.
    Warmup,
    /// Measured.
    Measured,
    /// After the last send, while answers drain.
    Drain,
}

/// Throughput and latency over one sampling interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimelinePoint {
    /// End of the interval, seconds since the start.
    pub t_s: f64,
    /// Requests finished per second.
    pub rps: f64,
    /// Of which errors per second.
    pub errors_per_s: f64,
    /// Median latency of the answers in the interval (0 when none).
    pub p50_ms: f64,
    /// 99th percentile of the same.
    pub p99_ms: f64,
    /// Which part of the run.
    pub phase: TimelinePhase,
}

/// Milliseconds of a nanosecond histogram value.
#[allow(clippy::cast_precision_loss)]
fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

impl Latency {
    pub(crate) fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let q = |q: f64| ms(h.value_at_quantile(q));
        Self {
            count: h.len(),
            min_ms: ms(h.min()),
            mean_ms: h.mean() / 1e6,
            stdev_ms: h.stdev() / 1e6,
            p50_ms: q(0.50),
            p75_ms: q(0.75),
            p90_ms: q(0.90),
            p95_ms: q(0.95),
            p99_ms: q(0.99),
            p99_9_ms: q(0.999),
            p99_99_ms: q(0.9999),
            max_ms: ms(h.max()),
        }
    }
}

/// The latency at percentiles `1 - 10^(-i/10)` for `i` in 0..=50 (0% to 99.999%) and 100%,
/// evenly spaced on the usual "nines" axis.
pub(crate) fn curve(h: &Histogram<u64>) -> Vec<CurvePoint> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut points: Vec<CurvePoint> = (0..=50)
        .map(|i| {
            let quantile = 1.0 - 10f64.powf(-f64::from(i) / 10.0);
            CurvePoint {
                percentile: quantile * 100.0,
                latency_ms: ms(h.value_at_quantile(quantile)),
            }
        })
        .collect();
    points.push(CurvePoint {
        percentile: 100.0,
        latency_ms: ms(h.max()),
    });
    points
}

/// What [`build`] needs besides the merged counts.
pub(crate) struct Inputs<'a> {
    pub config: &'a Config,
    pub threads: usize,
    pub started_unix_s: u64,
    pub generator_cpu: Option<Duration>,
    pub wall: Duration,
    pub timeline: Vec<TimelinePoint>,
}

/// Turns the merged counts into a report.
pub(crate) fn build(inputs: Inputs<'_>, stats: &WorkerStats) -> Report {
    let config = inputs.config;
    let m = &stats.measured;
    let duration_s = config.duration.as_secs_f64();
    let open_loop = config
        .rate
        .map(|rate| open_loop(config, rate, m, m.scheduled + stats.warmup.scheduled));
    #[allow(clippy::cast_precision_loss)]
    let generator_cpu_percent = inputs
        .generator_cpu
        .filter(|_| !inputs.wall.is_zero())
        .map(|cpu| 100.0 * cpu.as_secs_f64() / inputs.wall.as_secs_f64());
    Report {
        format: FORMAT_VERSION,
        tool: format!("loadtest {}", env!("CARGO_PKG_VERSION")),
        started_unix_s: inputs.started_unix_s,
        parameters: Parameters {
            url: config.url().to_owned(),
            scenario: config.scenario,
            mix: (config.scenario == Scenario::Mixed).then(|| config.mix.to_string()),
            load_model: if config.rate.is_some() {
                "open"
            } else {
                "closed"
            }
            .to_owned(),
            connections: config.connections,
            threads: inputs.threads,
            runtime: config.runtime.as_str().to_owned(),
            rate_rps: config.rate,
            duration_s,
            warmup_s: config.warmup.as_secs_f64(),
            timeout_s: config.timeout.as_secs_f64(),
            users: config.users,
            batch_size: config.batch_size,
            distribution: config.distribution.to_string(),
            seed: config.seed,
        },
        machine: Machine {
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            generator_cpu_percent,
        },
        measured: window(m, duration_s),
        warmup: Warmup {
            duration_s: config.warmup.as_secs_f64(),
            requests: stats.warmup.requests,
            errors: stats.warmup.errors(),
            latency: Latency::of(&stats.warmup.latency),
        },
        open_loop,
        unfinished: stats.unfinished,
        timeline: inputs.timeline,
        checks: Vec::new(),
    }
}

#[allow(clippy::cast_precision_loss)]
fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

#[allow(clippy::cast_precision_loss)]
fn window(m: &PhaseStats, duration_s: f64) -> Window {
    let successes = m.successes();
    let errors = m.errors();
    let mut source_errors: Vec<SourceErrorCount> = m
        .source_errors
        .iter()
        .flat_map(|(source, kinds)| {
            kinds.iter().map(|(kind, count)| SourceErrorCount {
                source: source.clone(),
                kind: kind.clone(),
                count: *count,
            })
        })
        .collect();
    source_errors.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.source.cmp(&b.source)));
    Window {
        duration_s,
        requests: m.requests,
        responses: m.responses,
        successes,
        missed: m.missed,
        errors,
        error_rate: ratio(errors, m.requests + m.missed),
        attempts_rps: m.requests as f64 / duration_s,
        throughput_rps: m.responses as f64 / duration_s,
        success_rps: successes as f64 / duration_s,
        bytes_received: m.bytes,
        latency: Latency::of(&m.latency),
        latency_curve: curve(&m.latency),
        success_latency: Latency::of(&m.success),
        statuses: m
            .statuses
            .iter()
            .map(|(status, n)| (status.to_string(), *n))
            .collect(),
        transport_errors: TransportError::ALL
            .iter()
            .filter(|kind| m.transport_count(**kind) > 0)
            .map(|kind| (kind.as_str().to_owned(), m.transport_count(*kind)))
            .collect(),
        error_codes: m
            .error_codes
            .iter()
            .flat_map(|(status, codes)| {
                codes
                    .iter()
                    .map(move |(code, n)| (format!("{status} {code}"), *n))
            })
            .collect(),
        partial_answers: m.partial_answers,
        source_errors,
        batch_id_errors: BatchIdErrors {
            total: m.batch_id_errors,
            by_error: m.batch_id_error_texts.clone(),
        },
        undecodable_bodies: m.undecodable,
    }
}

#[allow(clippy::cast_precision_loss)]
fn open_loop(config: &Config, rate: f64, m: &PhaseStats, scheduled_total: u64) -> OpenLoop {
    let duration_s = config.duration.as_secs_f64();
    let scheduled = m.scheduled;
    let sent = m.requests;
    let achieved_rps = sent as f64 / duration_s;
    // Measured against the whole run's schedule: sends due in the warm-up may go out in the
    // measured window, so `sent / scheduled` alone could exceed 1.
    let achieved_ratio = if scheduled_total == 0 {
        1.0
    } else {
        ratio(scheduled_total.saturating_sub(m.missed), scheduled_total)
    };
    let service_time = Latency::of(&m.service);
    let send_lag = Latency::of(&m.send_lag);
    // Each connection carries one request at a time, so the connections can carry at most
    // connections / mean service time requests per second. Timeouts are in the mean: a request
    // that times out holds its connection for the whole timeout.
    let capacity_rps = (service_time.mean_ms > 0.0)
        .then(|| config.connections as f64 / (service_time.mean_ms / 1000.0));
    let sent_all = m.missed as f64 <= MISSED_TOLERANCE * scheduled_total as f64;
    let on_time = send_lag.p99_ms <= LAG_WARNING_MS;
    let kept_up = sent_all && on_time;
    let figures = if m.missed > 0 {
        format!(
            "sent {} req/s of the {} requested ({} of the sends due), and {} sends due before the \
             end never went out",
            format::rate(achieved_rps),
            format::rate(rate),
            format::percent(achieved_ratio),
            format::count(m.missed),
        )
    } else {
        format!(
            "sent {} req/s of the {} requested ({} of the sends due)",
            format::rate(achieved_rps),
            format::rate(rate),
            format::percent(achieved_ratio),
        )
    };
    let lag = format!(
        "send lag (p99 {}, max {})",
        format::latency(send_lag.p99_ms),
        format::latency(send_lag.max_ms)
    );
    let timeouts = m.transport_count(TransportError::Timeout);
    let missed_idle = m.missed - m.missed_busy;
    let statement = if !sent_all && (timeouts > 0 || m.missed_busy >= missed_idle) {
        // The sends that never went out were queued behind requests the server had not
        // answered: the generator was waiting on the server, not short of CPU.
        let timed_out = if timeouts > 0 {
            format!(
                ", and {} requests timed out after {}",
                format::count(timeouts),
                format::latency(config.timeout.as_secs_f64() * 1000.0)
            )
        } else {
            String::new()
        };
        let capacity = capacity_rps.map_or_else(String::new, |capacity| {
            format!(
                " With one request in flight on each of {} connections and a mean service time of \
                 {} (timeouts included), they carry at most about {} req/s.",
                config.connections,
                format::latency(service_time.mean_ms),
                format::rate(capacity),
            )
        });
        let advice = if timeouts > 0 {
            " The missed sends and the timeouts count as errors and in the latency."
        } else {
            " More --connections would offer the server more requests at once, if it can take \
             them; the missed sends count as errors and in the latency."
        };
        let also_late = if on_time {
            String::new()
        } else {
            format!(" The generator was also late sending, with a {lag}: give it more --threads.")
        };
        format!(
            "The server is the bottleneck, not the generator: the generator {figures}, because \
             their connections were still waiting for earlier requests{timed_out}.{capacity}\
             {advice}{also_late}"
        )
    } else if !sent_all {
        format!(
            "The generator could not keep up with the requested rate: it {figures}, with a {lag}, \
             while its connections were free to send. It was short of CPU: give it more \
             --threads, or lower the --rate."
        )
    } else if !on_time {
        format!(
            "The generator kept the rate on average ({figures}) but was late sending, with a \
             {lag} well beyond timer granularity. It was short of CPU; the latencies exclude that \
             lag, but the server saw bursts rather than an even rate."
        )
    } else {
        format!(
            "The generator kept up: it {figures}; its own {lag} is excluded from the latencies."
        )
    };
    OpenLoop {
        requested_rps: rate,
        scheduled,
        sent,
        missed: m.missed,
        missed_on_busy_connections: m.missed_busy,
        achieved_rps,
        achieved_ratio,
        kept_up,
        service_time,
        service_curve: curve(&m.service),
        capacity_rps,
        send_lag,
        statement,
    }
}

/// Where [`write()`] put the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The JSON file.
    pub json: PathBuf,
    /// The SVG file.
    pub svg: PathBuf,
}

/// Writes `{dir}/{name}.json` and `{dir}/{name}.svg`, creating `dir` if needed.
///
/// # Errors
///
/// [`Error::Write`] when the directory or a file cannot be written, [`Error::Encode`] or
/// [`Error::Render`] when the report cannot be encoded or drawn.
pub fn write(report: &Report, dir: &Path, name: &str) -> Result<Written, Error> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Write {
        path: dir.to_owned(),
        source,
    })?;
    let json = dir.join(format!("{name}.json"));
    let svg = dir.join(format!("{name}.svg"));
    let text = serde_json::to_string_pretty(report).map_err(Error::Encode)?;
    std::fs::write(&json, text + "\n").map_err(|source| Error::Write {
        path: json.clone(),
        source,
    })?;
    let drawing = crate::svg::render(report)?;
    std::fs::write(&svg, drawing).map_err(|source| Error::Write {
        path: svg.clone(),
        source,
    })?;
    Ok(Written { json, svg })
}

/// Reads a JSON report written by [`write()`].
///
/// # Errors
///
/// [`Error::Read`] when the file cannot be read, [`Error::NotAReport`] when it is not a report.
pub fn read(path: &Path) -> Result<Report, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| Error::NotAReport {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        body::Findings,
        stats::{Answer, Outcome, Phase, Timing},
    };

    /// A report of `n` dashboard answers taking 1..=n ms, one timeout, one 404 and one partial
    /// dashboard, over a 10s window.
    pub(crate) fn sample_report(n: u64, rate: Option<f64>) -> Report {
        let mut stats = WorkerStats::new();
        let ok = |status| -> Outcome {
            Ok(Answer {
                kind: crate::RequestKind::Dashboard,
                status,
                body: bytes::Bytes::new(),
                bytes: 100,
            })
        };
        let timing = |ms| Timing {
            latency: Duration::from_millis(ms),
            service: Duration::from_millis(ms / 2),
            send_lag: rate.map(|_| Duration::from_micros(500)),
        };
        for i in 1..=n {
            stats.record(Phase::Measured, &timing(i), &ok(200), &Findings::Nothing);
        }
        let not_found = Findings::ErrorCode("not_found".into());
        stats.record(Phase::Measured, &timing(1), &ok(404), &not_found);
        stats.record(
            Phase::Measured,
            &timing(1),
            &Err(TransportError::Timeout),
            &Findings::Nothing,
        );
        let partial = Findings::Sources(vec![crate::body::SourceError {
            source: "recommendations".into(),
            kind: Some("timeout".into()),
            error: None,
        }]);
        stats.record(Phase::Measured, &timing(1), &ok(200), &partial);
        stats.record(Phase::Warmup, &timing(1), &ok(200), &Findings::Nothing);
        if rate.is_some() {
            // Every send went out when due.
            stats.measured.scheduled = stats.measured.requests;
            stats.warmup.scheduled = stats.warmup.requests;
        }
        let config = Config {
            duration: Duration::from_secs(10),
            rate,
            ..Config::default()
        };
        build(
            Inputs {
                config: &config,
                threads: 2,
                started_unix_s: 0,
                generator_cpu: Some(Duration::from_secs(5)),
                wall: Duration::from_secs(10),
                timeline: Vec::new(),
            },
            &stats,
        )
    }

    #[test]
    fn figures_add_up() {
        let r = sample_report(1000, None);
        let m = &r.measured;
        assert_eq!(m.requests, 1003);
        assert_eq!(m.responses, 1002);
        assert_eq!(m.successes, 1001);
        assert_eq!(m.errors, 2);
        assert_eq!(m.missed, 0);
        // Throughput counts answers; the attempts are a figure of their own.
        assert!((m.throughput_rps - 100.2).abs() < 1e-9);
        assert!((m.attempts_rps - 100.3).abs() < 1e-9);
        assert!((m.success_rps - 100.1).abs() < 1e-9);
        // Every request is in the latency, the timeout too; the successful answers apart.
        assert_eq!(m.latency.count, 1003);
        assert_eq!(m.success_latency.count, 1001);
        assert_eq!(m.statuses["200"], 1001);
        assert_eq!(m.transport_errors["timeout"], 1);
        assert_eq!(m.error_codes["404 not_found"], 1);
        assert_eq!(m.source_errors[0].kind, "timeout");
        assert_eq!(r.warmup.requests, 1);
        // 1002 answers: three of 1ms, then 2..=1000ms; the 501st is 499ms.
        assert!(
            (m.latency.p50_ms - 499.0).abs() < 0.5,
            "{}",
            m.latency.p50_ms
        );
        assert!((m.latency.max_ms - 1000.0).abs() < 1.0);
        assert_eq!(r.machine.generator_cpu_percent, Some(50.0));
        assert!(r.open_loop.is_none());
        // The curve rises monotonically from min to max.
        let curve = &m.latency_curve;
        assert_eq!(curve.len(), 52);
        assert!(curve.windows(2).all(|w| w[0].latency_ms <= w[1].latency_ms));
        assert_eq!(curve.last().map(|p| p.percentile), Some(100.0));
    }

    #[test]
    fn summary_names_every_figure() {
        let text = sample_report(1000, None).summary();
        for needle in [
            "loadtest dashboard: closed loop, 64 connections",
            "1,003 sent in 10s (100.3 req/s); 1,002 answered: 100.2 req/s, 100.1 req/s successful",
            "errors     2 (0.20%): 1 without an answer, 1 error statuses",
            "successful",
            "latency includes every request",
            "p99.9",
            "200 ×1,001, 404 ×1",
            "timeout ×1",
            "404 not_found ×1",
            "recommendations: timeout ×1",
            "warm-up    5s: 1 requests",
            "CPU 50% of one core",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }

    #[test]
    fn open_loop_says_whether_it_kept_up() {
        let r = sample_report(1000, Some(100.0));
        let open = r.open_loop.as_ref().unwrap();
        assert_eq!(open.sent, 1003);
        assert!(open.kept_up, "{}", open.statement);
        assert!(open.statement.starts_with("The generator kept up"));
        // Twice the rate that was sent: it could not keep up, and says why.
        let r = sample_report(1000, Some(200.0));
        let mut config = Config {
            duration: Duration::from_secs(10),
            rate: Some(200.0),
            connections: 1,
            ..Config::default()
        };
        let mut stats = WorkerStats::new();
        stats.measured.requests = r.measured.requests;
        stats.measured.scheduled = 2000;
        stats.measured.missed = 997;
        stats.measured.missed_busy = 997;
        let _ = stats.measured.service.record(100_000_000);
        // Every missed send was queued behind an unanswered request: the server held it back.
        let open = open_loop(&config, 200.0, &stats.measured, 2000);
        assert!(!open.kept_up);
        assert_eq!(open.missed_on_busy_connections, 997);
        assert!(
            open.statement
                .starts_with("The server is the bottleneck, not the generator"),
            "{}",
            open.statement
        );
        assert!(
            open.statement
                .contains("997 sends due before the end never went out"),
            "{}",
            open.statement
        );
        // One connection at 100ms a request carries 10 req/s.
        let capacity = open.capacity_rps.unwrap();
        assert!((capacity - 10.0).abs() < 0.01, "{capacity}");
        assert!(
            open.statement
                .contains("they carry at most about 10.0 req/s"),
            "{}",
            open.statement
        );
        assert!(!open.statement.contains("CPU"), "{}", open.statement);
        // The connections were free and the sends still did not go out: the generator's CPU.
        stats.measured.missed_busy = 0;
        config.connections = 1000;
        let open = open_loop(&config, 200.0, &stats.measured, 2000);
        assert!(
            open.statement.contains("short of CPU"),
            "{}",
            open.statement
        );
        // Timeouts mean the server, even when the sends were missed on free connections.
        stats.measured.transport[TransportError::Timeout as usize] = 3;
        let open = open_loop(&config, 200.0, &stats.measured, 2000);
        assert!(
            open.statement.starts_with("The server is the bottleneck")
                && open.statement.contains("3 requests timed out"),
            "{}",
            open.statement
        );
        assert!(r.summary().contains("scheduled send"));
    }

    #[test]
    fn json_round_trips() {
        let r = sample_report(100, Some(50.0));
        let text = serde_json::to_string(&r).unwrap();
        let back: Report = serde_json::from_str(&text).unwrap();
        // Floats may differ in their last bit after a decimal round trip; everything else is
        // exact.
        assert_eq!(back.parameters, r.parameters);
        assert_eq!(back.measured.statuses, r.measured.statuses);
        assert_eq!(back.measured.requests, r.measured.requests);
        assert_eq!(back.open_loop.as_ref().map(|o| o.sent), Some(103));
        assert!((back.measured.error_rate - r.measured.error_rate).abs() < 1e-15);
        assert_eq!(
            back.measured.latency_curve.len(),
            r.measured.latency_curve.len()
        );
        let dir = std::env::temp_dir().join(format!("loadtest-report-{}", std::process::id()));
        let written = write(&r, &dir, "run").unwrap();
        assert_eq!(read(&written.json).unwrap(), back);
        let not_json = dir.join("run.svg");
        assert!(matches!(read(&not_json), Err(Error::NotAReport { .. })));
        assert!(matches!(
            read(&dir.join("missing.json")),
            Err(Error::Read { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
