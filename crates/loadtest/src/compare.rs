//! `--compare`: two reports side by side, with the ratio of each figure.
//!
//! The ratio is `new / base`. Whether that is better depends on the figure (higher throughput,
//! lower latency), so each row also says `better` or `worse` when the difference exceeds 5%:
//! closer than that is within the noise of a shared machine and shown as `~`.

use std::fmt::Write as _;

use crate::{Report, format};

/// Differences smaller than this are called neither better nor worse.
const NOISE: f64 = 0.05;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Better {
    Higher,
    Lower,
}

#[derive(Clone, Copy)]
enum Kind {
    Count,
    Rate,
    Latency,
    Percent,
}

fn show(kind: Kind, value: f64) -> String {
    match kind {
        // Counts are whole numbers stored as f64.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        Kind::Count => format::count(value as u64),
        Kind::Rate => format::rate(value),
        Kind::Latency => format::latency(value),
        Kind::Percent => format::percent(value),
    }
}

/// Renders two runs side by side: `base` (e.g. an earlier run) and `new`, labelled.
#[must_use]
#[allow(clippy::cast_precision_loss)]
pub fn compare(base: &Report, base_label: &str, new: &Report, new_label: &str) -> String {
    let (a, b) = (&base.measured, &new.measured);
    let mut rows: Vec<(&str, Kind, Better, f64, f64)> = vec![
        (
            "requests",
            Kind::Count,
            Better::Higher,
            a.requests as f64,
            b.requests as f64,
        ),
        (
            "throughput req/s",
            Kind::Rate,
            Better::Higher,
            a.throughput_rps,
            b.throughput_rps,
        ),
        (
            "successful req/s",
            Kind::Rate,
            Better::Higher,
            a.success_rps,
            b.success_rps,
        ),
        (
            "error rate",
            Kind::Percent,
            Better::Lower,
            a.error_rate,
            b.error_rate,
        ),
        (
            "latency p50",
            Kind::Latency,
            Better::Lower,
            a.latency.p50_ms,
            b.latency.p50_ms,
        ),
        (
            "latency p90",
            Kind::Latency,
            Better::Lower,
            a.latency.p90_ms,
            b.latency.p90_ms,
        ),
        (
            "latency p99",
            Kind::Latency,
            Better::Lower,
            a.latency.p99_ms,
            b.latency.p99_ms,
        ),
        (
            "latency p99.9",
            Kind::Latency,
            Better::Lower,
            a.latency.p99_9_ms,
            b.latency.p99_9_ms,
        ),
        (
            "latency max",
            Kind::Latency,
            Better::Lower,
            a.latency.max_ms,
            b.latency.max_ms,
        ),
        (
            "latency mean",
            Kind::Latency,
            Better::Lower,
            a.latency.mean_ms,
            b.latency.mean_ms,
        ),
        (
            "transport errors",
            Kind::Count,
            Better::Lower,
            a.transport_error_total() as f64,
            b.transport_error_total() as f64,
        ),
        (
            "source errors",
            Kind::Count,
            Better::Lower,
            a.source_error_total() as f64,
            b.source_error_total() as f64,
        ),
    ];
    if let (Some(x), Some(y)) = (&base.open_loop, &new.open_loop) {
        rows.push((
            "achieved req/s",
            Kind::Rate,
            Better::Higher,
            x.achieved_rps,
            y.achieved_rps,
        ));
        rows.push((
            "send lag p99",
            Kind::Latency,
            Better::Lower,
            x.send_lag.p99_ms,
            y.send_lag.p99_ms,
        ));
    }
    let width_a = base_label.chars().count().max(12);
    let width_b = new_label.chars().count().max(12);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<18} {base_label:>width_a$} {new_label:>width_b$} {:>9}",
        "", "ratio"
    );
    for (name, kind, better, x, y) in rows {
        let (ratio, verdict) = if x == 0.0 {
            // No ratio to a zero; the direction still says which way it went.
            let verdict = if y == 0.0 {
                "~"
            } else if better == Better::Higher {
                "better"
            } else {
                "worse"
            };
            ("-".to_owned(), verdict)
        } else {
            let r = y / x;
            let verdict = if (r - 1.0).abs() <= NOISE {
                "~"
            } else if (r > 1.0) == (better == Better::Higher) {
                "better"
            } else {
                "worse"
            };
            (format!("{r:.2}×"), verdict)
        };
        let _ = writeln!(
            out,
            "{name:<18} {:>width_a$} {:>width_b$} {ratio:>9}  {verdict}",
            show(kind, x),
            show(kind, y),
        );
    }
    for difference in differences(base, new) {
        let _ = writeln!(out, "note: the runs differ in {difference}");
    }
    out
}

/// The parameters that differ between two runs, as `name (base vs new)`.
fn differences(base: &Report, new: &Report) -> Vec<String> {
    let (a, b) = (&base.parameters, &new.parameters);
    let mut out = Vec::new();
    let mut differ = |name: &str, x: String, y: String| {
        if x != y {
            out.push(format!("{name} ({x} vs {y})"));
        }
    };
    // Format 2 counts throughput as answered requests and puts unanswered requests in the
    // latency; side by side with a format 1 report those rows do not measure the same thing.
    differ(
        "report format",
        base.format.to_string(),
        new.format.to_string(),
    );
    differ(
        "scenario",
        a.scenario.as_str().to_owned(),
        b.scenario.as_str().to_owned(),
    );
    differ("load model", a.load_model.clone(), b.load_model.clone());
    differ(
        "connections",
        a.connections.to_string(),
        b.connections.to_string(),
    );
    differ("threads", a.threads.to_string(), b.threads.to_string());
    let rate = |r: Option<f64>| {
        r.map_or_else(
            || "closed loop".to_owned(),
            |r| format!("{} req/s", format::rate(r)),
        )
    };
    differ("rate", rate(a.rate_rps), rate(b.rate_rps));
    differ(
        "duration",
        format::seconds(a.duration_s),
        format::seconds(b.duration_s),
    );
    differ("url", a.url.clone(), b.url.clone());
    differ(
        "distribution",
        a.distribution.clone(),
        b.distribution.clone(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::sample_report;

    #[test]
    fn ratios_and_verdicts() {
        let base = sample_report(1000, None);
        let new = sample_report(500, None);
        let text = compare(&base, "base.json", &new, "this run");
        let line = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("no {name} row in\n{text}"))
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert!(text.lines().next().unwrap().contains("base.json"));
        // 1003 vs 503 requests over the same 10s.
        assert_eq!(line("requests"), "requests 1,003 503 0.50× worse");
        // Answered requests: 1002 vs 502.
        assert_eq!(
            line("throughput req/s"),
            "throughput req/s 100.2 50.2 0.50× worse"
        );
        // Latencies halve: better.
        assert!(
            line("latency max").ends_with("0.50× better"),
            "{}",
            line("latency max")
        );
        // The same single timeout in both: a ratio of 1.
        assert_eq!(line("transport errors"), "transport errors 1 1 1.00× ~");
        assert!(!text.contains("note:"), "{text}");
    }

    #[test]
    fn differing_parameters_are_noted() {
        let base = sample_report(10, None);
        let mut new = sample_report(10, Some(100.0));
        new.parameters.connections = 128;
        let text = compare(&base, "a", &new, "b");
        assert!(
            text.contains("note: the runs differ in connections (64 vs 128)"),
            "{text}"
        );
        assert!(
            text.contains("note: the runs differ in rate (closed loop vs 100.0 req/s)"),
            "{text}"
        );
        assert!(
            text.contains("note: the runs differ in load model (closed vs open)"),
            "{text}"
        );
        let mut old = sample_report(10, None);
        old.format = 1;
        let text = compare(&old, "a", &base, "b");
        assert!(
            text.contains("note: the runs differ in report format (1 vs 2)"),
            "{text}"
        );
    }

    #[test]
    fn zero_baselines_have_no_ratio() {
        let mut base = sample_report(10, None);
        base.measured.transport_errors.clear();
        let new = sample_report(10, None);
        let text = compare(&base, "a", &new, "b");
        let row = text
            .lines()
            .find(|l| l.starts_with("transport errors"))
            .unwrap();
        assert!(row.split_whitespace().any(|w| w == "-"), "{row}");
        assert!(row.ends_with("worse"), "from none to one is worse: {row}");
    }
}
