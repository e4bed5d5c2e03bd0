//! The chaos report: per scenario, what was sent, how it was answered, what was lost, how long
//! recovery took, the state left behind, and each expectation with PASS or FAIL.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use super::client::{Outcome, Record};

/// One expectation and whether it held.
#[derive(Debug, Clone)]
pub struct Check {
    /// What was expected, in a few words.
    pub expectation: String,
    /// Whether it held.
    pub passed: bool,
    /// The figure that decided it.
    pub evidence: String,
}

/// The outcome of one scenario.
#[derive(Debug, Clone, Default)]
pub struct ScenarioReport {
    /// The scenario's command-line name, with the query mode it ran under, if any.
    pub name: String,
    /// What it does, in one line.
    pub title: &'static str,
    /// Requests sent (or attempted).
    pub sent: u64,
    /// Answers by status, and failures by kind.
    pub outcomes: BTreeMap<String, u64>,
    /// Requests that got no complete answer although they should have.
    pub lost: u64,
    /// How long until the service was back to normal, when the scenario measures it.
    pub recovery: Option<Duration>,
    /// `/metrics` (and database) state once the scenario was over.
    pub after: String,
    /// Other figures worth reading.
    pub figures: Vec<String>,
    /// The expectations.
    pub checks: Vec<Check>,
    /// How long the scenario ran.
    pub elapsed: Duration,
}

impl ScenarioReport {
    /// An empty report for a scenario.
    pub fn new(name: impl Into<String>, title: &'static str) -> Self {
        Self {
            name: name.into(),
            title,
            ..Self::default()
        }
    }

    /// Adds an expectation.
    pub fn check(
        &mut self,
        expectation: impl Into<String>,
        passed: bool,
        evidence: impl Into<String>,
    ) {
        self.checks.push(Check {
            expectation: expectation.into(),
            passed,
            evidence: evidence.into(),
        });
    }

    /// Adds a figure.
    pub fn figure(&mut self, figure: impl Into<String>) {
        self.figures.push(figure.into());
    }

    /// Counts the records of a load into `sent` and `outcomes`.
    pub fn count(&mut self, records: &[Record]) {
        self.sent += records.len() as u64;
        for record in records {
            *self.outcomes.entry(record.label()).or_default() += 1;
        }
    }

    /// Counts one outcome by label.
    pub fn count_label(&mut self, label: impl Into<String>) {
        self.sent += 1;
        *self.outcomes.entry(label.into()).or_default() += 1;
    }

    /// Whether every expectation held.
    pub fn passed(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.passed)
    }

    /// The scenario's section of the report.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let verdict = if self.passed() { "PASS" } else { "FAIL" };
        let _ = writeln!(out, "== {} [{verdict}] {}", self.name, self.title);
        let answered = self
            .outcomes
            .iter()
            .map(|(label, n)| format!("{label}: {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(out, "   requests sent   {}", self.sent);
        let _ = writeln!(out, "   answered        {answered}");
        let _ = writeln!(out, "   lost            {}", self.lost);
        let recovery = self
            .recovery
            .map_or_else(|| "-".to_owned(), |d| format!("{:.0} ms", ms(d)));
        let _ = writeln!(out, "   recovery        {recovery}");
        let _ = writeln!(out, "   after           {}", self.after);
        for figure in &self.figures {
            let _ = writeln!(out, "   ·  {figure}");
        }
        for check in &self.checks {
            let mark = if check.passed { "PASS" } else { "FAIL" };
            let _ = writeln!(out, "   {mark}  {} ({})", check.expectation, check.evidence);
        }
        let _ = writeln!(out, "   took {:.1} s", self.elapsed.as_secs_f64());
        out
    }
}

/// Milliseconds of a duration, for printing.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Latency percentiles of a set of durations: `(p50, p99, max)`.
pub fn percentiles(mut values: Vec<Duration>) -> Option<(Duration, Duration, Duration)> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    let at = |q: f64| {
        let index = ((values.len() as f64 * q).ceil() as usize).clamp(1, values.len()) - 1;
        values[index]
    };
    Some((at(0.50), at(0.99), values[values.len() - 1]))
}

/// `p50 / p99 / max` in milliseconds, or `none`.
pub fn describe_latency(values: Vec<Duration>) -> String {
    match percentiles(values) {
        Some((p50, p99, max)) => format!(
            "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            ms(p50),
            ms(p99),
            ms(max)
        ),
        None => "none".to_owned(),
    }
}

/// Latencies of the records that match.
pub fn latencies(records: &[Record], keep: impl Fn(&Record) -> bool) -> Vec<Duration> {
    records
        .iter()
        .filter(|r| keep(r))
        .map(|r| r.latency)
        .collect()
}

/// Records that were sent and got no complete answer.
pub fn lost(records: &[Record]) -> u64 {
    records
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Lost(_)))
        .count() as u64
}

/// How long after `from` the service kept failing: the end of the last request sent at or after
/// `from` that was not a clean 200, measured from `from` (zero when there was none); and how many
/// clean answers came after that.
pub fn recovery(records: &[Record], from: Duration) -> (Duration, usize) {
    let last_failure = records
        .iter()
        .filter(|r| r.sent >= from && !r.outcome.is_clean())
        .map(Record::ended)
        .max();
    let recovered_at = last_failure.unwrap_or(from);
    let clean_after = records
        .iter()
        .filter(|r| r.sent >= recovered_at && r.outcome.is_clean())
        .count();
    (recovered_at.saturating_sub(from), clean_after)
}

/// Each distinct item of a list with how often it occurs (`503 ×4, 200 ×1`).
pub fn sample(items: &[String]) -> String {
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for item in items {
        *counts.entry(item.as_str()).or_default() += 1;
    }
    counts
        .iter()
        .map(|(item, n)| format!("{item} ×{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The final table of every scenario's verdict.
pub fn summary(reports: &[ScenarioReport], total: Duration) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "== summary");
    let _ = writeln!(
        out,
        "   {:<26} {:>8} {:>6} {:>10} {:>7}  verdict",
        "scenario", "sent", "lost", "recovery", "took"
    );
    for report in reports {
        let recovery = report
            .recovery
            .map_or_else(|| "-".to_owned(), |d| format!("{:.0} ms", ms(d)));
        let failed: Vec<&str> = report
            .checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| c.expectation.as_str())
            .collect();
        let verdict = if report.passed() {
            "PASS".to_owned()
        } else if failed.is_empty() {
            "FAIL (no checks ran)".to_owned()
        } else {
            format!("FAIL: {}", failed.join("; "))
        };
        let _ = writeln!(
            out,
            "   {:<26} {:>8} {:>6} {:>10} {:>6.1}s  {verdict}",
            report.name,
            report.sent,
            report.lost,
            recovery,
            report.elapsed.as_secs_f64()
        );
    }
    let _ = writeln!(out, "   total {:.1} s", total.as_secs_f64());
    out
}

/// Ends a chaos run: prints the summary, writes every report and the summary to `path`, and
/// fails naming the scenarios that failed.
///
/// # Errors
///
/// When the file cannot be written or a scenario failed.
pub(crate) fn finish(
    reports: &[ScenarioReport],
    took: Duration,
    path: &std::path::Path,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let summary = summary(reports, took);
    println!("{summary}");
    let text: String = reports
        .iter()
        .map(ScenarioReport::render)
        .chain(std::iter::once(summary))
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    println!("report written to {}", path.display());
    let failed: Vec<&str> = reports
        .iter()
        .filter(|r| !r.passed())
        .map(|r| r.name.as_str())
        .collect();
    anyhow::ensure!(
        failed.is_empty(),
        "{} of {} scenarios failed: {}",
        failed.len(),
        reports.len(),
        failed.join(", ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_ranks() {
        let values: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let (p50, p99, max) = percentiles(values).unwrap();
        assert_eq!(
            (p50, p99, max),
            (
                Duration::from_millis(50),
                Duration::from_millis(99),
                Duration::from_millis(100)
            )
        );
        assert!(percentiles(Vec::new()).is_none());
    }

    #[test]
    fn a_report_without_checks_fails() {
        let mut report = ScenarioReport::new("x", "y");
        assert!(!report.passed());
        report.check("it works", true, "yes");
        assert!(report.passed());
        report.check("it is fast", false, "no");
        assert!(!report.passed());
        assert!(report.render().contains("FAIL  it is fast (no)"));
    }
}
