//! One connection's loop: when to send, what to count.
//!
//! The loop is generic over [`Exchange`] (one request and its whole answer) so that its timing
//! arithmetic can be tested on tokio's paused clock; the real exchange is
//! [`crate::raw::RawExchange`] (and [`crate::hyper_client::HyperExchange`]).

use std::{future::Future, sync::Mutex, time::Duration};

use tokio::time::{Instant, sleep_until};

use crate::{
    body::{self, Findings},
    schedule::{Schedule, latency_origin},
    stats::{Outcome, Phase, Timing, WorkerStats},
};

/// After a failed connect in closed loop, wait this long before the next attempt, so that a
/// server that is down yields a steady trickle of `connect_refused` rather than a busy loop.
const CONNECT_BACKOFF: Duration = Duration::from_millis(10);

/// Sends one request and reads its whole answer.
pub(crate) trait Exchange: Send {
    /// Sends the next request and waits for its answer, giving up at `deadline`.
    fn exchange(&mut self, deadline: Instant) -> impl Future<Output = Outcome> + Send;
}

/// The run's time line, shared by every connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    /// When the first requests go out.
    pub start: Instant,
    /// When the warm-up ends and measuring begins.
    pub warmup_end: Instant,
    /// When no further request starts.
    pub end: Instant,
    /// The per-request timeout.
    pub timeout: Duration,
}

impl Plan {
    fn phase(&self, at: Instant) -> Phase {
        if at < self.warmup_end {
            Phase::Warmup
        } else {
            Phase::Measured
        }
    }
}

/// Runs one connection from `plan.start` to `plan.end`, closed loop when `schedule` is `None`.
pub(crate) async fn drive<E: Exchange>(
    exchange: &mut E,
    plan: &Plan,
    schedule: Option<Schedule>,
    stats: &Mutex<WorkerStats>,
) {
    sleep_until(plan.start).await;
    match schedule {
        None => closed_loop(exchange, plan, stats).await,
        Some(schedule) => open_loop(exchange, plan, &schedule, stats).await,
    }
}

async fn closed_loop<E: Exchange>(exchange: &mut E, plan: &Plan, stats: &Mutex<WorkerStats>) {
    loop {
        let sent = Instant::now();
        if sent >= plan.end {
            return;
        }
        let outcome = exchange.exchange(sent + plan.timeout).await;
        let done = Instant::now();
        let timing = Timing {
            latency: done - sent,
            service: done - sent,
            send_lag: None,
        };
        let refused = matches!(&outcome, Err(kind) if kind.is_connect());
        record(stats, plan.phase(sent), &timing, &outcome);
        if refused {
            sleep_until((done + CONNECT_BACKOFF).min(plan.end)).await;
        }
    }
}

async fn open_loop<E: Exchange>(
    exchange: &mut E,
    plan: &Plan,
    schedule: &Schedule,
    stats: &Mutex<WorkerStats>,
) {
    let mut previous_done = plan.start;
    let mut sent_total = 0u64;
    for i in 0.. {
        let scheduled = schedule.at(i);
        if scheduled >= plan.end {
            break;
        }
        if Instant::now() < scheduled {
            sleep_until(scheduled).await;
        }
        let sent = Instant::now();
        if sent >= plan.end {
            // Still behind at the end: what is left of the schedule is counted as missed below.
            break;
        }
        let (origin, lag) = latency_origin(scheduled, previous_done, sent);
        let outcome = exchange.exchange(sent + plan.timeout).await;
        let done = Instant::now();
        let timing = Timing {
            latency: done - origin,
            service: done - sent,
            send_lag: Some(lag),
        };
        // The window is that of the actual send, as in closed loop: when the connection is
        // behind, sends due in the warm-up go out (and count) in the measured window, with their
        // latency still counted from when they were due.
        sent_total += 1;
        record(stats, plan.phase(sent), &timing, &outcome);
        previous_done = done;
    }
    let due = schedule.due_before(plan.end);
    let due_warmup = schedule.due_before(plan.warmup_end);
    let mut stats = stats
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    stats.warmup.scheduled += due_warmup;
    stats.measured.scheduled += due - due_warmup;
    // Sends due before the end that never went out: the run ended with them still queued.
    stats.measured.missed += due.saturating_sub(sent_total);
}

fn record(stats: &Mutex<WorkerStats>, phase: Phase, timing: &Timing, outcome: &Outcome) {
    // Decode the body before taking the lock, which the progress sampler shares.
    let findings = match outcome {
        Ok(answer) if body::wants_body(answer.kind, answer.status) => {
            body::inspect(answer.kind, answer.status, &answer.body)
        }
        _ => Findings::Nothing,
    };
    stats
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .record(phase, timing, outcome, &findings);
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use bytes::Bytes;

    use super::*;
    use crate::{
        RequestKind,
        stats::{Answer, TransportError},
    };

    /// A server stand-in whose answers take scripted times; the paused clock makes them exact.
    struct Scripted {
        delays: VecDeque<Duration>,
        default: Duration,
        refuse: bool,
    }

    impl Scripted {
        fn new(delays: &[u64], default: u64) -> Self {
            Self {
                delays: delays.iter().copied().map(Duration::from_millis).collect(),
                default: Duration::from_millis(default),
                refuse: false,
            }
        }
    }

    impl Exchange for Scripted {
        async fn exchange(&mut self, deadline: Instant) -> Outcome {
            if self.refuse {
                return Err(TransportError::ConnectRefused);
            }
            let delay = self.delays.pop_front().unwrap_or(self.default);
            if Instant::now() + delay > deadline {
                sleep_until(deadline).await;
                return Err(TransportError::Timeout);
            }
            tokio::time::sleep(delay).await;
            Ok(Answer {
                kind: RequestKind::Recommendations,
                status: 200,
                body: Bytes::new(),
                bytes: 0,
            })
        }
    }

    fn plan(warmup_ms: u64, run_ms: u64) -> Plan {
        let start = Instant::now();
        Plan {
            start,
            warmup_end: start + Duration::from_millis(warmup_ms),
            end: start + Duration::from_millis(run_ms),
            timeout: Duration::from_secs(5),
        }
    }

    /// The recorded values, in milliseconds, as the histogram's distinct buckets report them.
    fn recorded_ms(h: &hdrhistogram::Histogram<u64>) -> Vec<(u64, u64)> {
        h.iter_recorded()
            .map(|v| {
                let ms = (v.value_iterated_to() as f64 / 1e6).round() as u64;
                (ms, v.count_at_value())
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_stall_is_charged_to_the_requests_queued_behind_it() {
        // 10 req/s on one connection for 1s: due at 0, 100, ..., 900 ms. Every answer takes
        // 10ms except the third (due at 200ms), which takes 350ms and ends at 550ms.
        let plan = plan(0, 1000);
        let schedule = Schedule::new(plan.start, 10.0, 1, 0);
        let stats = Mutex::new(WorkerStats::new());
        let mut server = Scripted::new(&[10, 10, 350], 10);
        drive(&mut server, &plan, Some(schedule), &stats).await;
        let stats = stats.into_inner().unwrap();
        let m = &stats.measured;
        assert_eq!(m.requests, 10);
        assert_eq!(m.missed, 0);
        // Due at 300 (sent 550, done 560) -> 260ms; due at 400 (sent 560) -> 170ms;
        // due at 500 (sent 570) -> 80ms; from 600ms on the connection is back on schedule.
        assert_eq!(
            recorded_ms(&m.latency),
            [(10, 6), (80, 1), (170, 1), (260, 1), (350, 1)]
        );
        // Service time, from the actual send, hides the queueing: that is the omission.
        assert_eq!(recorded_ms(&m.service), [(10, 9), (350, 1)]);
        // The paused clock wakes timers exactly, so the generator never lagged.
        assert_eq!(m.send_lag.max(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn sends_that_never_went_out_are_counted_as_missed() {
        // Answers take 300ms but are due every 100ms: the connection falls ever further behind.
        let plan = plan(0, 1000);
        let schedule = Schedule::new(plan.start, 10.0, 1, 0);
        let stats = Mutex::new(WorkerStats::new());
        let mut server = Scripted::new(&[], 300);
        drive(&mut server, &plan, Some(schedule), &stats).await;
        let m = stats.into_inner().unwrap().measured;
        // Sent at 0, 300, 600, 900 (due at 0, 100, 200, 300); latencies from the due time.
        assert_eq!(m.requests, 4);
        assert_eq!(m.missed, 6);
        assert_eq!(
            recorded_ms(&m.latency),
            [(300, 1), (500, 1), (700, 1), (900, 1)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn warmup_sends_are_kept_apart() {
        let plan = plan(300, 1000);
        let schedule = Schedule::new(plan.start, 10.0, 1, 0);
        let stats = Mutex::new(WorkerStats::new());
        drive(&mut Scripted::new(&[], 5), &plan, Some(schedule), &stats).await;
        let stats = stats.into_inner().unwrap();
        assert_eq!(stats.warmup.requests, 3);
        assert_eq!(stats.measured.requests, 7);
        assert_eq!(stats.warmup.missed + stats.measured.missed, 0);
        assert_eq!((stats.warmup.scheduled, stats.measured.scheduled), (3, 7));
    }

    #[tokio::test(start_paused = true)]
    async fn closed_loop_sends_when_the_last_answer_arrives() {
        let plan = plan(200, 1000);
        let stats = Mutex::new(WorkerStats::new());
        drive(&mut Scripted::new(&[], 100), &plan, None, &stats).await;
        let stats = stats.into_inner().unwrap();
        assert_eq!(stats.warmup.requests, 2);
        assert_eq!(stats.measured.requests, 8);
        assert_eq!(recorded_ms(&stats.measured.latency), [(100, 8)]);
        assert_eq!(stats.measured.send_lag.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn closed_loop_backs_off_after_refused_connects() {
        let plan = plan(0, 1000);
        let stats = Mutex::new(WorkerStats::new());
        let mut server = Scripted::new(&[], 1);
        server.refuse = true;
        drive(&mut server, &plan, None, &stats).await;
        let m = stats.into_inner().unwrap().measured;
        assert_eq!(m.transport_count(TransportError::ConnectRefused), 100);
        assert_eq!(m.responses, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn timeouts_end_the_wait_at_the_deadline() {
        let mut plan = plan(0, 1000);
        plan.timeout = Duration::from_millis(250);
        let stats = Mutex::new(WorkerStats::new());
        // The first answer would take an hour; the timeout cuts it at 250ms.
        drive(&mut Scripted::new(&[3_600_000], 250), &plan, None, &stats).await;
        let m = stats.into_inner().unwrap().measured;
        assert_eq!(m.transport_count(TransportError::Timeout), 1);
        assert_eq!(m.responses, 3);
        assert_eq!(Instant::now(), plan.end);
    }
}
