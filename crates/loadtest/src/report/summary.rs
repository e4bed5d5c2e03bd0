//! The plain-text summary of a [`Report`], printed at the end of a run and written to read well
//! in a CI log: parameters, throughput, latency, errors by kind, and the verdict on the load.

use std::fmt::Write as _;

use super::*;

impl Report {
    /// The plain-text summary printed at the end of a run, written to read well in a CI log.
    #[must_use]
    pub fn summary(&self) -> String {
        let p = &self.parameters;
        let m = &self.measured;
        let mut out = String::new();
        let model = match p.rate_rps {
            Some(rate) => format!("open loop at {} req/s", format::rate(rate)),
            None => "closed loop".to_owned(),
        };
        let _ = writeln!(
            out,
            "loadtest {}: {model}, {} connections, {} {} threads, {} measured after {} of warm-up",
            p.scenario.as_str(),
            p.connections,
            p.threads,
            p.runtime,
            format::seconds(p.duration_s),
            format::seconds(p.warmup_s),
        );
        let mix = p
            .mix
            .as_deref()
            .map(|m| format!(", mix {m}"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  target     {} (ids 1..={} {}, seed {}{mix})",
            p.url,
            format::count(p.users),
            p.distribution,
            p.seed
        );
        let _ = writeln!(
            out,
            "  requests   {} sent in {} ({} req/s); {} answered: {} req/s, {} req/s successful",
            format::count(m.requests),
            format::seconds(m.duration_s),
            format::rate(m.attempts_rps),
            format::count(m.responses),
            format::rate(m.throughput_rps),
            format::rate(m.success_rps),
        );
        let unanswered = m.requests - m.responses;
        let failed_answers = m.responses - m.successes;
        let missed = if m.missed > 0 {
            format!(", {} due sends never went out", format::count(m.missed))
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "  errors     {} ({}): {} without an answer, {} error statuses{missed}",
            format::count(m.errors),
            format::percent(m.error_rate),
            format::count(unanswered),
            format::count(failed_answers),
        );
        write_latency_table(&mut out, "latency", &m.latency);
        if m.errors > 0 {
            write_latency_table(&mut out, "successful", &m.success_latency);
        }
        if let Some(open) = &self.open_loop {
            write_latency_table(&mut out, "service", &open.service_time);
            let _ = writeln!(
                out,
                "  (latency counts from each request's scheduled send, so queueing behind a slow \
                 answer is included; service time counts from the actual send)"
            );
        }
        if unanswered + m.missed > 0 {
            let _ = writeln!(
                out,
                "  (latency includes every request: those without an answer at their failure and \
                 at least the timeout, sends that never went out until the run ended)"
            );
        }
        let _ = writeln!(out, "  status     {}", counts(&m.statuses, "no answers"));
        if !m.transport_errors.is_empty() {
            let _ = writeln!(out, "  transport  {}", counts(&m.transport_errors, ""));
        }
        if !m.error_codes.is_empty() {
            let _ = writeln!(out, "  error body {}", counts(&m.error_codes, ""));
        }
        if p.scenario == Scenario::Dashboard || p.scenario == Scenario::Mixed {
            let sources = if m.source_errors.is_empty() {
                "none".to_owned()
            } else {
                m.source_errors
                    .iter()
                    .map(|e| format!("{}: {} ×{}", e.source, e.kind, format::count(e.count)))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let _ = writeln!(
                out,
                "  sources    {sources} ({} partial dashboards)",
                format::count(m.partial_answers)
            );
        }
        if p.scenario == Scenario::Batch || p.scenario == Scenario::Mixed {
            let _ = writeln!(
                out,
                "  batch ids  {} per-id errors{}",
                format::count(m.batch_id_errors.total),
                if m.batch_id_errors.by_error.is_empty() {
                    String::new()
                } else {
                    format!(": {}", counts(&m.batch_id_errors.by_error, ""))
                }
            );
        }
        if m.undecodable_bodies > 0 {
            let _ = writeln!(
                out,
                "  bodies     {} successful answers were not the expected JSON",
                format::count(m.undecodable_bodies)
            );
        }
        let _ = writeln!(
            out,
            "  warm-up    {}: {} requests, errors {}, p99 {}; excluded from every figure above",
            format::seconds(self.warmup.duration_s),
            format::count(self.warmup.requests),
            format::count(self.warmup.errors),
            format::latency(self.warmup.latency.p99_ms),
        );
        if let Some(open) = &self.open_loop {
            let _ = writeln!(out, "  open loop  {}", open.statement);
        }
        if self.unfinished > 0 {
            let _ = writeln!(
                out,
                "  drain      {} requests were still unanswered at the drain deadline: counted as \
                 timeouts",
                format::count(self.unfinished)
            );
        }
        let cpu = self
            .machine
            .generator_cpu_percent
            .map(|c| {
                format!(
                    "CPU {c:.0}% of one core ({} cores here), ",
                    self.machine.cores
                )
            })
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  generator  {cpu}received {}",
            format::bytes(m.bytes_received)
        );
        for check in &self.checks {
            let _ = writeln!(
                out,
                "  check      {} {}: {}",
                if check.passed { "pass" } else { "FAIL" },
                check.expression,
                check.actual
            );
        }
        out
    }
}

fn write_latency_table(out: &mut String, label: &str, l: &Latency) {
    if l.count == 0 {
        let _ = writeln!(out, "  {label:<10} no answers");
        return;
    }
    let cells = [
        ("p50", l.p50_ms),
        ("p90", l.p90_ms),
        ("p99", l.p99_ms),
        ("p99.9", l.p99_9_ms),
        ("max", l.max_ms),
        ("mean", l.mean_ms),
    ];
    let mut head = format!("  {label:<10}");
    let mut values = format!("  {:<10}", "");
    for (name, value) in cells {
        let _ = write!(head, "{name:>9}");
        let _ = write!(values, "{:>9}", format::latency(value));
    }
    let _ = writeln!(out, "{head}\n{values}");
}

fn counts(map: &BTreeMap<String, u64>, empty: &str) -> String {
    if map.is_empty() {
        return empty.to_owned();
    }
    map.iter()
        .map(|(key, n)| format!("{key} ×{}", format::count(*n)))
        .collect::<Vec<_>>()
        .join(", ")
}
