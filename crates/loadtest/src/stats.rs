//! What the workers count while a run is in progress, and how their counts merge.
//!
//! Each worker owns one [`WorkerStats`] behind a mutex that only its own connections and the
//! progress sampler ever take, for a few hundred nanoseconds each. Latencies go into HDR
//! histograms in nanoseconds (3 significant digits, up to an hour), which merge exactly: the
//! merged percentiles are those of one histogram fed every sample.
//!
//! Every request counts in the latency histogram, answered or not: a request without an answer
//! is recorded at the time it failed, and never below the timeout (see
//! [`crate::driver`]), so a server that stops answering shows in the percentiles rather than
//! only in the error count. Open-loop sends that never went out are recorded at the end as a
//! lower bound, as wrk2 and HdrHistogram recommend.

use std::{collections::BTreeMap, time::Duration};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::{RequestKind, body::Findings};

/// The largest latency the histograms hold; larger values are clamped to it.
const HIGHEST_NS: u64 = 3_600_000_000_000;

/// Distinct error texts kept per map before the rest are lumped together, so that messages
/// carrying ids or timings cannot grow a map without bound.
const MAX_DISTINCT_TEXTS: usize = 32;

/// The key that collects texts beyond [`MAX_DISTINCT_TEXTS`].
const OTHER_TEXTS: &str = "(other)";

/// A fresh latency histogram.
pub(crate) fn histogram() -> Histogram<u64> {
    // The bounds are constants that satisfy the crate's preconditions (1 <= low, 2 * low <= high,
    // 3 significant digits); no input reaches this call.
    Histogram::new_with_bounds(1, HIGHEST_NS, 3).expect("constant histogram bounds are valid")
}

/// Nanoseconds of a duration, clamped into the histograms' range.
pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos())
        .unwrap_or(u64::MAX)
        .min(HIGHEST_NS)
}

/// Why a request got no HTTP answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum TransportError {
    /// The server refused the connection (nothing listening).
    ConnectRefused,
    /// Connecting took longer than the request timeout.
    ConnectTimeout,
    /// Connecting failed another way (no route, no free local port, ...).
    ConnectFailed,
    /// The request timeout passed before the whole answer arrived.
    Timeout,
    /// The peer reset the connection.
    Reset,
    /// The peer closed the connection before answering in full.
    Closed,
    /// The answer was not valid HTTP/1.1.
    Protocol,
    /// The answer's body was larger than the generator keeps (64 MiB).
    BodyTooLarge,
    /// Another I/O error.
    Io,
}

impl TransportError {
    /// Every kind, in report order.
    pub const ALL: [Self; 9] = [
        Self::ConnectRefused,
        Self::ConnectTimeout,
        Self::ConnectFailed,
        Self::Timeout,
        Self::Reset,
        Self::Closed,
        Self::Protocol,
        Self::BodyTooLarge,
        Self::Io,
    ];

    /// The kind's name in reports.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ConnectRefused => "connect_refused",
            Self::ConnectTimeout => "connect_timeout",
            Self::ConnectFailed => "connect_failed",
            Self::Timeout => "timeout",
            Self::Reset => "reset",
            Self::Closed => "closed",
            Self::Protocol => "protocol",
            Self::BodyTooLarge => "body_too_large",
            Self::Io => "io",
        }
    }

    /// Whether no connection was made at all.
    #[must_use]
    pub fn is_connect(self) -> bool {
        matches!(
            self,
            Self::ConnectRefused | Self::ConnectTimeout | Self::ConnectFailed
        )
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// An HTTP answer, read in full.
#[derive(Debug, Clone)]
pub(crate) struct Answer {
    /// What was asked.
    pub kind: RequestKind,
    /// The status code.
    pub status: u16,
    /// The body when the generator needs to look inside it, else empty.
    pub body: bytes::Bytes,
    /// Body bytes received.
    pub bytes: u64,
}

/// What became of one request.
pub(crate) type Outcome = Result<Answer, TransportError>;

/// When the request counted as begun, and how it went.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    /// From the latency origin (the scheduled send in open loop) to the end of the answer or the
    /// failure; for a request without an answer at least the timeout.
    pub latency: Duration,
    /// From the actual send to the end of the answer or the failure: how long the request
    /// occupied its connection.
    pub service: Duration,
    /// Open loop only: the generator's own delay in sending (see [`crate::schedule`]).
    pub send_lag: Option<Duration>,
}

/// Which window of the run a request belongs to, by its scheduled (open loop) or actual (closed
/// loop) send time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Warmup,
    Measured,
}

/// Everything counted in one window of the run.
#[derive(Debug, Clone)]
pub(crate) struct PhaseStats {
    /// Latency of every request, from the latency origin: answered ones to the end of their
    /// answer, unanswered ones to their failure (at least the timeout), and in open loop the
    /// sends that never went out to when their connection stopped (a lower bound).
    pub latency: Histogram<u64>,
    /// Latency of successful answers (2xx, 3xx) only, from the latency origin.
    pub success: Histogram<u64>,
    /// Open loop: how long each request sent occupied its connection, from the actual send to
    /// its answer or failure (timeouts included).
    pub service: Histogram<u64>,
    /// Open loop: the generator's send lag, every send.
    pub send_lag: Histogram<u64>,
    /// Requests sent (answered or not).
    pub requests: u64,
    /// Requests with an HTTP answer.
    pub responses: u64,
    /// Body bytes received.
    pub bytes: u64,
    /// Answers by status code.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests without an answer, by kind (indexed by [`TransportError::index`]).
    pub transport: [u64; TransportError::ALL.len()],
    /// Error answers by status and the `error.code` of their body.
    pub error_codes: BTreeMap<u16, BTreeMap<String, u64>>,
    /// Per-source errors inside dashboard answers: source, then kind (or error text).
    pub source_errors: BTreeMap<String, BTreeMap<String, u64>>,
    /// Dashboard answers that carried at least one per-source error.
    pub partial_answers: u64,
    /// Per-id errors inside batch answers.
    pub batch_id_errors: u64,
    /// The same, by error text.
    pub batch_id_error_texts: BTreeMap<String, u64>,
    /// Successful answers whose body was not the expected JSON.
    pub undecodable: u64,
    /// Open loop: sends due in this window.
    pub scheduled: u64,
    /// Open loop, measured window only: sends due before the end of the run that never went out.
    pub missed: u64,
    /// Of [`PhaseStats::missed`], those whose connection was still carrying an earlier request
    /// when the run ended: held back by the server, not by the generator.
    pub missed_busy: u64,
}

impl PhaseStats {
    pub(crate) fn new() -> Self {
        Self {
            latency: histogram(),
            success: histogram(),
            service: histogram(),
            send_lag: histogram(),
            requests: 0,
            responses: 0,
            bytes: 0,
            statuses: BTreeMap::new(),
            transport: [0; TransportError::ALL.len()],
            error_codes: BTreeMap::new(),
            source_errors: BTreeMap::new(),
            partial_answers: 0,
            batch_id_errors: 0,
            batch_id_error_texts: BTreeMap::new(),
            undecodable: 0,
            scheduled: 0,
            missed: 0,
            missed_busy: 0,
        }
    }

    /// Requests without a successful answer: transport errors, statuses outside 200..=399, and
    /// open-loop sends that never went out (each of them a request a client wanted and did not
    /// get answered).
    pub(crate) fn errors(&self) -> u64 {
        let failed: u64 = self
            .statuses
            .iter()
            .filter(|(status, _)| !is_success(**status))
            .map(|(_, n)| n)
            .sum();
        failed + self.transport.iter().sum::<u64>() + self.missed
    }

    /// Successful answers.
    pub(crate) fn successes(&self) -> u64 {
        self.statuses
            .iter()
            .filter(|(status, _)| is_success(**status))
            .map(|(_, n)| n)
            .sum()
    }

    /// Counts one open-loop send that never went out, `latency` after it was due (a lower bound:
    /// it was still waiting then). `busy` says whether its connection was still carrying an
    /// earlier request when the run ended.
    pub(crate) fn record_missed(&mut self, latency: Duration, busy: bool) {
        self.missed += 1;
        if busy {
            self.missed_busy += 1;
        }
        self.latency.saturating_record(nanos(latency));
    }

    /// Requests without an answer of the given kind.
    pub(crate) fn transport_count(&self, kind: TransportError) -> u64 {
        self.transport[kind.index()]
    }

    fn record(&mut self, timing: &Timing, outcome: &Outcome, findings: &Findings<'_>) {
        self.requests += 1;
        self.latency.saturating_record(nanos(timing.latency));
        // In closed loop the latency and the service time are the same; the service histogram
        // is only read in open loop, so skip the second record there.
        if let Some(lag) = timing.send_lag {
            self.send_lag.saturating_record(nanos(lag));
            self.service.saturating_record(nanos(timing.service));
        }
        let answer = match outcome {
            Ok(answer) => answer,
            Err(kind) => {
                self.transport[kind.index()] += 1;
                return;
            }
        };
        self.responses += 1;
        self.bytes += answer.bytes;
        *self.statuses.entry(answer.status).or_insert(0) += 1;
        if is_success(answer.status) {
            self.success.saturating_record(nanos(timing.latency));
        }
        match findings {
            Findings::Nothing => {}
            Findings::Sources(errors) => {
                if !errors.is_empty() {
                    self.partial_answers += 1;
                }
                for error in errors {
                    let kinds = match self.source_errors.get_mut(error.source.as_ref()) {
                        Some(kinds) => kinds,
                        None => self
                            .source_errors
                            .entry(error.source.clone().into_owned())
                            .or_default(),
                    };
                    bump(kinds, error.kind());
                }
            }
            Findings::BatchIds(errors) => {
                self.batch_id_errors += errors.len() as u64;
                for error in errors {
                    bump(&mut self.batch_id_error_texts, error.text());
                }
            }
            Findings::ErrorCode(code) => {
                bump(self.error_codes.entry(answer.status).or_default(), code);
            }
            Findings::Undecodable => self.undecodable += 1,
        }
    }

    /// Adds another window's counts to this one.
    pub(crate) fn merge(&mut self, other: &Self) {
        // The histograms share one configuration, so adding cannot fail; if it somehow did,
        // the samples would be dropped, never mis-counted.
        let _ = self.latency.add(&other.latency);
        let _ = self.success.add(&other.success);
        let _ = self.service.add(&other.service);
        let _ = self.send_lag.add(&other.send_lag);
        self.requests += other.requests;
        self.responses += other.responses;
        self.bytes += other.bytes;
        for (status, n) in &other.statuses {
            *self.statuses.entry(*status).or_insert(0) += n;
        }
        for (mine, theirs) in self.transport.iter_mut().zip(other.transport) {
            *mine += theirs;
        }
        for (status, codes) in &other.error_codes {
            merge_texts(self.error_codes.entry(*status).or_default(), codes);
        }
        for (source, kinds) in &other.source_errors {
            merge_texts(self.source_errors.entry(source.clone()).or_default(), kinds);
        }
        self.partial_answers += other.partial_answers;
        self.batch_id_errors += other.batch_id_errors;
        merge_texts(&mut self.batch_id_error_texts, &other.batch_id_error_texts);
        self.undecodable += other.undecodable;
        self.scheduled += other.scheduled;
        self.missed += other.missed;
        self.missed_busy += other.missed_busy;
    }
}

/// Whether a status counts as a successful answer.
pub(crate) fn is_success(status: u16) -> bool {
    (200..400).contains(&status)
}

fn bump(map: &mut BTreeMap<String, u64>, text: &str) {
    if let Some(n) = map.get_mut(text) {
        *n += 1;
    } else if map.len() < MAX_DISTINCT_TEXTS {
        map.insert(text.to_owned(), 1);
    } else {
        *map.entry(OTHER_TEXTS.to_owned()).or_insert(0) += 1;
    }
}

fn merge_texts(mine: &mut BTreeMap<String, u64>, theirs: &BTreeMap<String, u64>) {
    for (text, n) in theirs {
        let key = if mine.contains_key(text) || mine.len() < MAX_DISTINCT_TEXTS {
            text.clone()
        } else {
            OTHER_TEXTS.to_owned()
        };
        *mine.entry(key).or_insert(0) += n;
    }
}

/// The progress sampler's share: what happened since it last looked.
#[derive(Debug, Clone)]
pub(crate) struct Interval {
    /// Latencies of the requests finished since the last sample, answered or not.
    pub latency: Histogram<u64>,
    /// Requests finished since the last sample.
    pub requests: u64,
    /// Of which errors.
    pub errors: u64,
}

/// One worker's counts.
#[derive(Debug, Clone)]
pub(crate) struct WorkerStats {
    pub warmup: PhaseStats,
    pub measured: PhaseStats,
    pub interval: Interval,
    /// Requests still in flight when the drain deadline cut the run (also counted as timeouts).
    pub unfinished: u64,
}

impl WorkerStats {
    pub(crate) fn new() -> Self {
        Self {
            warmup: PhaseStats::new(),
            measured: PhaseStats::new(),
            interval: Interval {
                latency: histogram(),
                requests: 0,
                errors: 0,
            },
            unfinished: 0,
        }
    }

    /// Counts one finished request.
    pub(crate) fn record(
        &mut self,
        phase: Phase,
        timing: &Timing,
        outcome: &Outcome,
        findings: &Findings<'_>,
    ) {
        let stats = match phase {
            Phase::Warmup => &mut self.warmup,
            Phase::Measured => &mut self.measured,
        };
        stats.record(timing, outcome, findings);
        self.interval.requests += 1;
        self.interval
            .latency
            .saturating_record(nanos(timing.latency));
        if !matches!(outcome, Ok(answer) if is_success(answer.status)) {
            self.interval.errors += 1;
        }
    }

    /// Adds another worker's counts (but not its unsampled interval) to these.
    pub(crate) fn merge(&mut self, other: &Self) {
        self.warmup.merge(&other.warmup);
        self.measured.merge(&other.measured);
        self.unfinished += other.unfinished;
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;
    use crate::body::SourceError;

    fn timing(ms: u64) -> Timing {
        Timing {
            latency: Duration::from_millis(ms),
            service: Duration::from_millis(ms),
            send_lag: None,
        }
    }

    fn ok(status: u16) -> Outcome {
        Ok(Answer {
            kind: RequestKind::Dashboard,
            status,
            body: bytes::Bytes::new(),
            bytes: 10,
        })
    }

    fn ms_at(h: &Histogram<u64>, q: f64) -> f64 {
        h.value_at_quantile(q) as f64 / 1e6
    }

    #[test]
    fn merged_histograms_have_the_percentiles_of_all_samples() {
        let mut a = WorkerStats::new();
        let mut b = WorkerStats::new();
        let mut all = PhaseStats::new();
        // Worker a sees 1..=500 ms, worker b 501..=1000 ms.
        for ms in 1..=1000u64 {
            let worker = if ms <= 500 { &mut a } else { &mut b };
            worker.record(Phase::Measured, &timing(ms), &ok(200), &Findings::Nothing);
            all.record(&timing(ms), &ok(200), &Findings::Nothing);
        }
        let mut merged = WorkerStats::new();
        merged.merge(&a);
        merged.merge(&b);
        let m = &merged.measured;
        assert_eq!(m.requests, 1000);
        assert_eq!(m.latency.len(), 1000);
        for q in [0.5, 0.9, 0.99, 0.999, 1.0] {
            assert_eq!(
                m.latency.value_at_quantile(q),
                all.latency.value_at_quantile(q)
            );
        }
        // HDR keeps three significant digits: p50 of 1..=1000 ms is 500 ms within 0.1%.
        for (q, expected) in [(0.5, 500.0), (0.9, 900.0), (0.99, 990.0), (1.0, 1000.0)] {
            let got = ms_at(&m.latency, q);
            assert!((got - expected).abs() <= expected * 0.001, "q={q}: {got}");
        }
        assert_eq!(m.latency.min(), all.latency.min());
    }

    #[test]
    fn statuses_errors_and_findings_are_counted() {
        let mut w = WorkerStats::new();
        w.record(Phase::Measured, &timing(1), &ok(200), &Findings::Nothing);
        w.record(
            Phase::Measured,
            &timing(1),
            &ok(404),
            &Findings::ErrorCode(Cow::Borrowed("not_found")),
        );
        w.record(
            Phase::Measured,
            &timing(1),
            &Err(TransportError::Timeout),
            &Findings::Nothing,
        );
        let timeout = SourceError {
            source: Cow::Borrowed("recommendations"),
            kind: Some(Cow::Borrowed("timeout")),
            error: None,
        };
        let untyped = SourceError {
            source: Cow::Borrowed("reviews"),
            kind: None,
            error: Some(Cow::Borrowed("connection refused")),
        };
        let findings = Findings::Sources(vec![timeout, untyped]);
        w.record(Phase::Measured, &timing(1), &ok(200), &findings);
        w.record(Phase::Warmup, &timing(1), &ok(503), &Findings::Nothing);
        let m = &w.measured;
        assert_eq!(m.requests, 4);
        assert_eq!(m.responses, 3);
        assert_eq!(m.statuses.get(&200), Some(&2));
        assert_eq!(m.statuses.get(&404), Some(&1));
        assert_eq!(m.errors(), 2);
        assert_eq!(m.transport_count(TransportError::Timeout), 1);
        assert_eq!(m.error_codes[&404]["not_found"], 1);
        assert_eq!(m.source_errors["recommendations"]["timeout"], 1);
        assert_eq!(m.source_errors["reviews"]["connection refused"], 1);
        assert_eq!(m.partial_answers, 1);
        assert_eq!(
            m.latency.len(),
            4,
            "unanswered requests count in the latency"
        );
        assert_eq!(m.success.len(), 2, "only successful answers");
        assert_eq!(w.warmup.requests, 1);
        assert_eq!(w.warmup.errors(), 1);
        assert_eq!(w.interval.requests, 5);
        assert_eq!(w.interval.errors, 3);
    }

    #[test]
    fn missed_sends_are_errors_with_a_latency() {
        let mut w = WorkerStats::new();
        w.record(Phase::Measured, &timing(5), &ok(200), &Findings::Nothing);
        w.measured.record_missed(Duration::from_millis(700), true);
        w.measured.record_missed(Duration::from_millis(300), false);
        let mut merged = WorkerStats::new();
        merged.merge(&w);
        merged.merge(&w);
        let m = &merged.measured;
        assert_eq!((m.requests, m.missed, m.missed_busy), (2, 4, 2));
        assert_eq!(m.errors(), 4);
        assert_eq!(m.successes(), 2);
        assert_eq!(m.latency.len(), 6);
        assert_eq!(m.success.len(), 2);
        assert!(ms_at(&m.latency, 1.0) >= 700.0);
    }

    #[test]
    fn distinct_texts_are_bounded() {
        let mut map = BTreeMap::new();
        for i in 0..100 {
            bump(&mut map, &format!("user {i} failed"));
        }
        assert_eq!(map.len(), MAX_DISTINCT_TEXTS + 1);
        assert_eq!(map[OTHER_TEXTS], 100 - MAX_DISTINCT_TEXTS as u64);
        let mut other = BTreeMap::new();
        merge_texts(&mut other, &map);
        merge_texts(&mut other, &map);
        assert_eq!(other.values().sum::<u64>(), 200);
    }

    #[test]
    fn huge_latencies_are_clamped_not_lost() {
        let mut w = WorkerStats::new();
        let t = Timing {
            latency: Duration::from_secs(100_000),
            service: Duration::from_secs(100_000),
            send_lag: Some(Duration::MAX),
        };
        w.record(Phase::Measured, &t, &ok(200), &Findings::Nothing);
        assert_eq!(w.measured.latency.len(), 1);
        assert!(w.measured.latency.max() >= HIGHEST_NS - HIGHEST_NS / 1000);
    }
}
