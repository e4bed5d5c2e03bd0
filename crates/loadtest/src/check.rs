//! `--check` expressions: thresholds a run must meet, e.g. `p99<50ms,error_rate<0.1%`.
//!
//! An expression is a comma-separated list of `metric operator value` clauses. Latency metrics
//! take a duration with its unit, `error_rate` a percentage, rates and counts a plain number.
//!
//! The latencies count every request, answered or not (see [`crate::Report`]); `rps` counts
//! answered requests, `success_rps` successful ones and `attempts_rps` every request sent.
//!
//! In open loop a run is also checked for having applied the load it was asked for: the
//! outcome `kept_up` fails when the generator did not send (almost) every request due, on
//! time, whether the server held it back or its own CPU did. Thresholds met at a lower load
//! than requested prove little. The clause `allow_behind` waives that check.
//!
//! ```
//! let checks: loadtest::Checks = "p99<50ms, error_rate<0.1%, rps>=1000".parse()?;
//! assert_eq!(checks.len(), 3);
//! assert!(checks.requires_kept_up());
//! let lenient: loadtest::Checks = "p99<50ms, allow_behind".parse()?;
//! assert_eq!(lenient.len(), 1);
//! assert!(!lenient.requires_kept_up());
//! assert!("p99<50".parse::<loadtest::Checks>().is_err()); // no unit
//! # Ok::<(), loadtest::CheckError>(())
//! ```

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

use crate::{Report, format};

/// A quantity a check can test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Metric {
    /// Median latency.
    P50,
    /// 75th percentile latency.
    P75,
    /// 90th percentile latency.
    P90,
    /// 95th percentile latency.
    P95,
    /// 99th percentile latency.
    P99,
    /// 99.9th percentile latency.
    P999,
    /// 99.99th percentile latency.
    P9999,
    /// Largest latency.
    Max,
    /// Mean latency.
    Mean,
    /// Share of requests without a successful answer, missed open-loop sends included.
    ErrorRate,
    /// Answered requests per second, whatever their status.
    Rps,
    /// Successful requests per second.
    SuccessRps,
    /// Requests sent per second, answered or not.
    AttemptsRps,
    /// Requests without a successful answer, missed open-loop sends included.
    Errors,
    /// Requests sent.
    Requests,
    /// Open-loop sends due that never went out.
    Missed,
    /// Per-source errors inside dashboard answers.
    SourceErrors,
}

/// The clause that waives the `kept_up` check.
const ALLOW_BEHIND: &str = "allow_behind";

/// The name of the outcome that says whether an open-loop run applied its load.
pub(crate) const KEPT_UP: &str = "kept_up";

/// The metric names a check accepts, for error messages.
const KNOWN: &str = "p50, p75, p90, p95, p99, p99.9, p99.99, max, mean (durations), error_rate \
                     (a percentage), rps (answered), success_rps, attempts_rps (req/s), errors, \
                     requests, missed, source_errors (counts), and the clause allow_behind";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    Duration,
    Ratio,
    Rate,
    Count,
}

impl Metric {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "p50" => Self::P50,
            "p75" => Self::P75,
            "p90" => Self::P90,
            "p95" => Self::P95,
            "p99" => Self::P99,
            "p99.9" | "p999" => Self::P999,
            "p99.99" | "p9999" => Self::P9999,
            "max" => Self::Max,
            "mean" => Self::Mean,
            "error_rate" => Self::ErrorRate,
            "rps" | "throughput" => Self::Rps,
            "success_rps" => Self::SuccessRps,
            "attempts_rps" => Self::AttemptsRps,
            "errors" => Self::Errors,
            "requests" => Self::Requests,
            "missed" => Self::Missed,
            "source_errors" => Self::SourceErrors,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::P50 => "p50",
            Self::P75 => "p75",
            Self::P90 => "p90",
            Self::P95 => "p95",
            Self::P99 => "p99",
            Self::P999 => "p99.9",
            Self::P9999 => "p99.99",
            Self::Max => "max",
            Self::Mean => "mean",
            Self::ErrorRate => "error_rate",
            Self::Rps => "rps",
            Self::SuccessRps => "success_rps",
            Self::AttemptsRps => "attempts_rps",
            Self::Errors => "errors",
            Self::Requests => "requests",
            Self::Missed => "missed",
            Self::SourceErrors => "source_errors",
        }
    }

    fn unit(self) -> Unit {
        match self {
            Self::ErrorRate => Unit::Ratio,
            Self::Rps | Self::SuccessRps | Self::AttemptsRps => Unit::Rate,
            Self::Errors | Self::Requests | Self::Missed | Self::SourceErrors => Unit::Count,
            _ => Unit::Duration,
        }
    }

    /// The metric's value in a report (milliseconds for latencies, a fraction for the error
    /// rate), or `None` for a latency of a run that sent nothing.
    #[allow(clippy::cast_precision_loss)]
    fn value(self, report: &Report) -> Option<f64> {
        let m = &report.measured;
        let l = &m.latency;
        if self.unit() == Unit::Duration && l.count == 0 {
            return None;
        }
        Some(match self {
            Self::P50 => l.p50_ms,
            Self::P75 => l.p75_ms,
            Self::P90 => l.p90_ms,
            Self::P95 => l.p95_ms,
            Self::P99 => l.p99_ms,
            Self::P999 => l.p99_9_ms,
            Self::P9999 => l.p99_99_ms,
            Self::Max => l.max_ms,
            Self::Mean => l.mean_ms,
            Self::ErrorRate => m.error_rate,
            Self::Rps => m.throughput_rps,
            Self::SuccessRps => m.success_rps,
            Self::AttemptsRps => m.attempts_rps,
            Self::Errors => m.errors as f64,
            Self::Requests => m.requests as f64,
            Self::Missed => m.missed as f64,
            Self::SourceErrors => m.source_error_total() as f64,
        })
    }

    fn show(self, value: f64) -> String {
        match self.unit() {
            Unit::Duration => format::latency(value),
            Unit::Ratio => format::percent(value),
            Unit::Rate => format!("{} req/s", format::rate(value)),
            // Counts are whole numbers stored as f64.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            Unit::Count => format::count(value as u64),
        }
    }
}

/// A comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `<`
    Less,
    /// `<=`
    LessOrEqual,
    /// `>`
    Greater,
    /// `>=`
    GreaterOrEqual,
}

impl Op {
    fn holds(self, actual: f64, threshold: f64) -> bool {
        match self {
            Self::Less => actual < threshold,
            Self::LessOrEqual => actual <= threshold,
            Self::Greater => actual > threshold,
            Self::GreaterOrEqual => actual >= threshold,
        }
    }

    fn symbol(self) -> &'static str {
        match self {
            Self::Less => "<",
            Self::LessOrEqual => "<=",
            Self::Greater => ">",
            Self::GreaterOrEqual => ">=",
        }
    }
}

/// One threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// What is tested.
    pub metric: Metric,
    /// How.
    pub op: Op,
    /// Against what: milliseconds for latencies, a fraction for the error rate, req/s or a count.
    pub threshold: f64,
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let threshold = match self.metric.unit() {
            Unit::Duration => format!("{}ms", self.threshold),
            Unit::Ratio => format!("{}%", self.threshold * 100.0),
            Unit::Rate | Unit::Count => format!("{}", self.threshold),
        };
        write!(f, "{}{}{threshold}", self.metric.name(), self.op.symbol())
    }
}

/// A parsed `--check` expression: every clause must hold, and an open-loop run must have kept
/// up with its rate unless the expression says `allow_behind`.
#[derive(Debug, Clone, PartialEq)]
pub struct Checks {
    checks: Vec<Check>,
    allow_behind: bool,
}

impl Checks {
    /// The threshold clauses.
    #[must_use]
    pub fn checks(&self) -> &[Check] {
        &self.checks
    }

    /// Number of threshold clauses (`allow_behind` is not one).
    #[must_use]
    pub fn len(&self) -> usize {
        self.checks.len()
    }

    /// Whether there are no threshold clauses (only `allow_behind`).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.checks.is_empty()
    }

    /// Whether an open-loop run fails the checks when the generator did not keep up with the
    /// requested rate (true unless the expression says `allow_behind`).
    #[must_use]
    pub fn requires_kept_up(&self) -> bool {
        !self.allow_behind
    }

    /// Tests every clause against a report, and for an open-loop run whether it kept up (the
    /// outcome named `kept_up`, unless waived).
    #[must_use]
    pub fn evaluate(&self, report: &Report) -> Vec<CheckOutcome> {
        let mut outcomes: Vec<CheckOutcome> = self
            .checks
            .iter()
            .map(|check| match check.metric.value(report) {
                Some(actual) => CheckOutcome {
                    expression: check.to_string(),
                    actual: check.metric.show(actual),
                    passed: check.op.holds(actual, check.threshold),
                },
                None => CheckOutcome {
                    expression: check.to_string(),
                    actual: "nothing was sent to measure".to_owned(),
                    passed: false,
                },
            })
            .collect();
        if let Some(open) = report.open_loop.as_ref().filter(|_| !self.allow_behind) {
            let actual = if open.kept_up {
                format!(
                    "yes: {} of the sends due went out, send lag p99 {}",
                    format::percent(open.achieved_ratio),
                    format::latency(open.send_lag.p99_ms)
                )
            } else {
                format!(
                    "no: {} of the sends due went out ({} missed), send lag p99 {}; the load \
                     asked for was not applied (add {ALLOW_BEHIND} to accept that)",
                    format::percent(open.achieved_ratio),
                    format::count(open.missed),
                    format::latency(open.send_lag.p99_ms)
                )
            };
            outcomes.push(CheckOutcome {
                expression: KEPT_UP.to_owned(),
                actual,
                passed: open.kept_up,
            });
        }
        outcomes
    }
}

/// The result of one clause.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckOutcome {
    /// The clause, normalised (e.g. `p99<50ms`).
    pub expression: String,
    /// The measured value, formatted with its unit.
    pub actual: String,
    /// Whether it held.
    pub passed: bool,
}

/// A malformed `--check` expression; the message names the clause and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CheckError {
    /// Nothing at all.
    #[error("the check expression is empty; write e.g. 'p99<50ms,error_rate<0.1%'")]
    Empty,
    /// Two commas in a row, or a trailing comma.
    #[error("empty clause in `{0}` (two commas in a row, or a trailing comma?)")]
    EmptyClause(String),
    /// No comparison operator.
    #[error(
        "`{0}` has no comparison: write metric, then <, <=, > or >=, then a value, e.g. p99<50ms"
    )]
    MissingOperator(String),
    /// `=`, `==` or `!=`.
    #[error("`{0}`: only <, <=, > and >= are supported")]
    UnsupportedOperator(String),
    /// A metric name that is not known.
    #[error("`{clause}`: unknown metric `{metric}`; known metrics are {KNOWN}")]
    UnknownMetric {
        /// The clause.
        clause: String,
        /// The name given.
        metric: String,
    },
    /// A value that does not fit the metric.
    #[error("`{clause}`: {problem}")]
    BadValue {
        /// The clause.
        clause: String,
        /// What is wrong with the value.
        problem: String,
    },
}

impl FromStr for Checks {
    type Err = CheckError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().is_empty() {
            return Err(CheckError::Empty);
        }
        let mut allow_behind = false;
        let mut checks = Vec::new();
        for clause in s.split(',').map(str::trim) {
            if clause == ALLOW_BEHIND {
                allow_behind = true;
            } else {
                checks.push(parse_clause(s, clause)?);
            }
        }
        Ok(Self {
            checks,
            allow_behind,
        })
    }
}

fn parse_clause(expression: &str, clause: &str) -> Result<Check, CheckError> {
    if clause.is_empty() {
        return Err(CheckError::EmptyClause(expression.to_owned()));
    }
    let Some(at) = clause.find(['<', '>', '=', '!']) else {
        return Err(CheckError::MissingOperator(clause.to_owned()));
    };
    let (metric, rest) = clause.split_at(at);
    let (op, value) = if let Some(v) = rest.strip_prefix("<=") {
        (Op::LessOrEqual, v)
    } else if let Some(v) = rest.strip_prefix(">=") {
        (Op::GreaterOrEqual, v)
    } else if let Some(v) = rest.strip_prefix('<') {
        (Op::Less, v)
    } else if let Some(v) = rest.strip_prefix('>') {
        (Op::Greater, v)
    } else {
        return Err(CheckError::UnsupportedOperator(clause.to_owned()));
    };
    let metric_name = metric.trim();
    let metric = Metric::parse(metric_name).ok_or_else(|| CheckError::UnknownMetric {
        clause: clause.to_owned(),
        metric: metric_name.to_owned(),
    })?;
    let bad = |problem: String| CheckError::BadValue {
        clause: clause.to_owned(),
        problem,
    };
    let value = value.trim();
    if value.is_empty() {
        return Err(bad("the threshold is missing".to_owned()));
    }
    if value.starts_with(['<', '>', '=']) {
        return Err(CheckError::UnsupportedOperator(clause.to_owned()));
    }
    let threshold = match metric.unit() {
        Unit::Duration => latency_ms(value).ok_or_else(|| {
            bad(format!(
                "{} is a latency: give a duration with its unit, e.g. 50ms or 1.5s, not `{value}`",
                metric.name()
            ))
        })?,
        Unit::Ratio => {
            let number = value.strip_suffix('%').ok_or_else(|| {
                bad(format!(
                    "{} is a share of requests: write it as a percentage, e.g. 0.1%",
                    metric.name()
                ))
            })?;
            let percent = number
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|p| p.is_finite() && (0.0..=100.0).contains(p))
                .ok_or_else(|| bad(format!("`{value}` is not a percentage between 0% and 100%")))?;
            percent / 100.0
        }
        Unit::Rate | Unit::Count => {
            let (number, scale) = match value.strip_suffix(['k', 'K']) {
                Some(n) => (n, 1000.0),
                None => (value.trim_end_matches("/s"), 1.0),
            };
            number
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|n| n.is_finite() && *n >= 0.0)
                .map(|n| n * scale)
                .ok_or_else(|| {
                    bad(format!(
                        "{} takes a plain number (e.g. 5000 or 5k), not `{value}`",
                        metric.name()
                    ))
                })?
        }
    };
    Ok(Check {
        metric,
        op,
        threshold,
    })
}

/// A latency threshold in milliseconds: a number and a unit (`us`, `ms`, `s`). Not humantime,
/// which the duration flags use: thresholds want fractions (`1.5ms`), which it does not take.
fn latency_ms(value: &str) -> Option<f64> {
    let split = value.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = value.split_at(split);
    let number: f64 = number.parse().ok()?;
    let per_unit = match unit.trim() {
        "us" | "µs" => 1e-3,
        "ms" => 1.0,
        "s" => 1e3,
        _ => return None,
    };
    Some(number * per_unit).filter(|ms| ms.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::sample_report;

    fn parse(s: &str) -> Result<Checks, CheckError> {
        s.parse()
    }

    #[test]
    fn clauses_parse_into_base_units() {
        let checks = parse("p99<50ms, error_rate<0.1%,rps>=5k, p99.9 <= 1.5s,errors>0").unwrap();
        let c = checks.checks();
        assert_eq!(c.len(), 5);
        assert_eq!(
            (c[0].metric, c[0].op, c[0].threshold),
            (Metric::P99, Op::Less, 50.0)
        );
        assert_eq!(c[1].metric, Metric::ErrorRate);
        assert!((c[1].threshold - 0.001).abs() < 1e-12);
        assert_eq!(
            (c[2].metric, c[2].op, c[2].threshold),
            (Metric::Rps, Op::GreaterOrEqual, 5000.0)
        );
        assert_eq!(
            (c[3].metric, c[3].op, c[3].threshold),
            (Metric::P999, Op::LessOrEqual, 1500.0)
        );
        assert_eq!((c[4].metric, c[4].op), (Metric::Errors, Op::Greater));
        assert_eq!(c[0].to_string(), "p99<50ms");
        assert_eq!(c[1].to_string(), "error_rate<0.1%");
    }

    #[test]
    fn malformed_expressions_name_the_problem() {
        let cases = [
            ("", "empty"),
            ("p99<50ms,", "empty clause"),
            ("p99 50ms", "has no comparison"),
            ("p99=50ms", "only <, <=, > and >="),
            ("p99==50ms", "only <, <=, > and >="),
            ("p99<<50ms", "only <, <=, > and >="),
            ("p98<50ms", "unknown metric `p98`"),
            ("p99<50", "give a duration with its unit"),
            ("p99<fast", "give a duration with its unit"),
            ("error_rate<0.1", "write it as a percentage"),
            ("error_rate<200%", "between 0% and 100%"),
            ("rps>lots", "plain number"),
            ("p99<", "threshold is missing"),
        ];
        for (expression, needle) in cases {
            let message = parse(expression).unwrap_err().to_string();
            assert!(message.contains(needle), "{expression:?}: {message}");
        }
        let message = parse("p99<50ms,p98<1ms").unwrap_err().to_string();
        assert!(message.starts_with("`p98<1ms`"), "{message}");
    }

    #[test]
    fn evaluation_passes_and_fails() {
        // 1000 answers of 1..=1000 ms, 1 timeout, 1 404 over 10s.
        let report = sample_report(1000, None);
        let outcomes =
            parse("p50<600ms,p99<50ms,error_rate<1%,error_rate<0.1%,rps>100,requests>=1003")
                .unwrap()
                .evaluate(&report);
        let passed: Vec<bool> = outcomes.iter().map(|o| o.passed).collect();
        assert_eq!(passed, [true, false, true, false, true, true]);
        assert_eq!(outcomes[1].expression, "p99<50ms");
        assert_eq!(outcomes[1].actual, "990ms");
        assert_eq!(outcomes[3].actual, "0.20%");
    }

    #[test]
    fn latency_checks_fail_without_answers() {
        let mut report = sample_report(1, None);
        report.measured.latency = crate::report::Latency::default();
        let outcome = &parse("p99<1s").unwrap().evaluate(&report)[0];
        assert!(!outcome.passed);
        assert_eq!(outcome.actual, "nothing was sent to measure");
    }

    #[test]
    fn throughput_checks_count_answers_not_attempts() {
        // 1003 requests over 10s, of which 1002 answered and 1001 successful.
        let report = sample_report(1000, None);
        let outcomes = parse("rps>100.25,attempts_rps>100.25,success_rps>=100.1,missed<1")
            .unwrap()
            .evaluate(&report);
        let passed: Vec<bool> = outcomes.iter().map(|o| o.passed).collect();
        assert_eq!(passed, [false, true, true, true]);
        assert_eq!(outcomes[0].actual, "100.2 req/s");
    }

    #[test]
    fn open_loop_runs_must_keep_up_unless_waived() {
        let mut report = sample_report(1000, Some(100.0));
        let outcomes = parse("p50<600ms").unwrap().evaluate(&report);
        assert_eq!(outcomes.len(), 2);
        assert_eq!(outcomes[1].expression, KEPT_UP);
        assert!(outcomes[1].passed, "{:?}", outcomes[1]);
        assert!(outcomes[1].actual.starts_with("yes"), "{:?}", outcomes[1]);
        // The same figures, but the load asked for did not go out.
        let open = report.open_loop.as_mut().unwrap();
        open.kept_up = false;
        open.missed = 500;
        let outcomes = parse("p50<600ms").unwrap().evaluate(&report);
        assert!(outcomes[0].passed);
        assert!(!outcomes[1].passed);
        assert!(
            outcomes[1].actual.contains("500 missed"),
            "{:?}",
            outcomes[1]
        );
        assert!(outcomes[1].actual.contains(ALLOW_BEHIND));
        // Waived: only the thresholds count.
        let waived = parse("p50<600ms, allow_behind").unwrap();
        assert!(!waived.requires_kept_up());
        assert_eq!(waived.len(), 1);
        let outcomes = waived.evaluate(&report);
        assert_eq!(outcomes.len(), 1);
        assert!(outcomes[0].passed);
        // Closed-loop runs have no schedule to keep up with.
        let closed = parse("p50<600ms")
            .unwrap()
            .evaluate(&sample_report(10, None));
        assert_eq!(closed.len(), 1);
        // A lone waiver parses, and checks nothing else.
        assert!(parse("allow_behind").unwrap().is_empty());
    }
}
