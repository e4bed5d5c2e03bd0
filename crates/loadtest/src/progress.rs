//! The progress sampler: every tick it collects what the workers finished since the last one,
//! keeps it as the run's timeline, and shows it as a live line (indicatif) on a terminal or as a
//! plain line every few seconds in a CI log.

use std::{sync::Mutex, time::Duration};

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::time::Instant;

use crate::{
    driver::Plan,
    format,
    report::{TimelinePhase, TimelinePoint},
    stats::{WorkerStats, histogram},
};

/// Whether to show progress while a run is in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Progress {
    /// A live line on a terminal; a plain line every [`PLAIN_EVERY`] on anything else.
    #[default]
    Auto,
    /// Nothing.
    Off,
}

/// How often a plain progress line is printed when stderr is not a terminal.
pub const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// The sampling interval for a run of this length: about 240 points, between 100ms and 1s.
pub(crate) fn tick_for(total: Duration) -> Duration {
    (total / 240).clamp(Duration::from_millis(100), Duration::from_secs(1))
}

pub(crate) struct Sampler {
    plan: Plan,
    last: Instant,
    scratch: Histogram<u64>,
    timeline: Vec<TimelinePoint>,
    bar: Option<ProgressBar>,
    plain: bool,
    last_plain: Instant,
    errors: u64,
}

impl Sampler {
    pub(crate) fn new(plan: Plan, progress: Progress) -> Self {
        let total_ms = u64::try_from((plan.end - plan.start).as_millis()).unwrap_or(u64::MAX);
        let (bar, plain) = match progress {
            Progress::Off => (None, false),
            Progress::Auto => {
                let bar = ProgressBar::new(total_ms);
                if bar.is_hidden() {
                    (None, true)
                } else {
                    if let Ok(style) = ProgressStyle::with_template("{bar:12.cyan/blue} {msg}") {
                        bar.set_style(style.progress_chars("=> "));
                    }
                    (Some(bar), false)
                }
            }
        };
        Self {
            plan,
            last: plan.start,
            scratch: histogram(),
            timeline: Vec::new(),
            bar,
            plain,
            last_plain: plan.start,
            errors: 0,
        }
    }

    /// Collects the workers' intervals into one timeline point and shows it.
    pub(crate) fn sample(&mut self, shards: &[Mutex<WorkerStats>]) {
        let now = Instant::now();
        if now <= self.last {
            return;
        }
        let (mut requests, mut errors) = (0u64, 0u64);
        for shard in shards {
            let mut stats = shard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let interval = &mut stats.interval;
            // Same configuration on both sides, so adding cannot fail.
            let _ = self.scratch.add(&interval.latency);
            interval.latency.reset();
            requests += std::mem::take(&mut interval.requests);
            errors += std::mem::take(&mut interval.errors);
        }
        let seconds = (now - self.last).as_secs_f64();
        let middle = self.last + (now - self.last) / 2;
        let phase = if middle < self.plan.warmup_end {
            TimelinePhase::Warmup
        } else if middle < self.plan.end {
            TimelinePhase::Measured
        } else {
            TimelinePhase::Drain
        };
        let quantile = |q| {
            if self.scratch.is_empty() {
                0.0
            } else {
                #[allow(clippy::cast_precision_loss)]
                let ns = self.scratch.value_at_quantile(q) as f64;
                ns / 1e6
            }
        };
        #[allow(clippy::cast_precision_loss)]
        let point = TimelinePoint {
            t_s: (now - self.plan.start).as_secs_f64(),
            rps: requests as f64 / seconds,
            errors_per_s: errors as f64 / seconds,
            p50_ms: quantile(0.5),
            p99_ms: quantile(0.99),
            phase,
        };
        self.scratch.reset();
        self.last = now;
        self.errors += errors;
        self.show(&point, now);
        self.timeline.push(point);
    }

    fn show(&mut self, point: &TimelinePoint, now: Instant) {
        let phase = match point.phase {
            TimelinePhase::Warmup => "warm-up",
            TimelinePhase::Measured => "measuring",
            TimelinePhase::Drain => "draining",
        };
        let total = (self.plan.end - self.plan.start).as_secs_f64();
        let p99 = if point.rps > 0.0 {
            format::latency(point.p99_ms)
        } else {
            "-".to_owned()
        };
        // Short enough, with the bar, for an 80-column terminal: a wrapped line would redraw
        // badly.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let rps = format::count(point.rps.max(0.0).round() as u64);
        let line = format!(
            "{phase:<9} {:>5.1}s/{total:.0}s {rps:>9} req/s  p99 {p99:>7}  errors {}",
            point.t_s.min(total),
            format::count(self.errors),
        );
        if let Some(bar) = &self.bar {
            let elapsed = u64::try_from((now - self.plan.start).as_millis()).unwrap_or(u64::MAX);
            bar.set_position(elapsed);
            bar.set_message(line);
        } else if self.plain && now - self.last_plain >= PLAIN_EVERY {
            self.last_plain = now;
            eprintln!("loadtest: {line}");
        }
    }

    /// Clears the live line and hands over the timeline.
    pub(crate) fn finish(self) -> Vec<TimelinePoint> {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        self.timeline
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        RequestKind,
        body::Findings,
        stats::{Answer, Phase, Timing},
    };

    #[test]
    fn ticks_scale_with_the_run() {
        assert_eq!(tick_for(Duration::from_secs(1)), Duration::from_millis(100));
        assert_eq!(
            tick_for(Duration::from_secs(60)),
            Duration::from_millis(250)
        );
        assert_eq!(tick_for(Duration::from_secs(3600)), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn samples_become_timeline_points() {
        let start = Instant::now();
        let plan = Plan {
            start,
            warmup_end: start + Duration::from_secs(1),
            end: start + Duration::from_secs(3),
            timeout: Duration::from_secs(1),
        };
        let shards = [
            Mutex::new(WorkerStats::new()),
            Mutex::new(WorkerStats::new()),
        ];
        let mut sampler = Sampler::new(plan, Progress::Off);
        let answer = Ok(Answer {
            kind: RequestKind::Dashboard,
            status: 200,
            body: bytes::Bytes::new(),
            bytes: 0,
        });
        for (i, shard) in shards.iter().enumerate() {
            for ms in 1..=50u64 {
                let timing = Timing {
                    latency: Duration::from_millis(ms + 50 * i as u64),
                    service: Duration::ZERO,
                    send_lag: None,
                };
                shard
                    .lock()
                    .unwrap()
                    .record(Phase::Warmup, &timing, &answer, &Findings::Nothing);
            }
        }
        tokio::time::advance(Duration::from_millis(500)).await;
        sampler.sample(&shards);
        tokio::time::advance(Duration::from_secs(1)).await;
        sampler.sample(&shards);
        let timeline = sampler.finish();
        assert_eq!(timeline.len(), 2);
        let first = &timeline[0];
        assert_eq!(first.phase, TimelinePhase::Warmup);
        assert!((first.rps - 200.0).abs() < 1e-9, "100 answers in 0.5s");
        assert!((first.p99_ms - 99.0).abs() < 0.1, "{}", first.p99_ms);
        assert!((first.p50_ms - 50.0).abs() < 0.1, "{}", first.p50_ms);
        let second = &timeline[1];
        assert_eq!(second.phase, TimelinePhase::Measured);
        assert_eq!(second.rps, 0.0);
        assert!((second.t_s - 1.5).abs() < 1e-9);
    }
}
