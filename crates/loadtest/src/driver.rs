//! One connection's loop (when to send, what to count), and a worker's set of connections, cut
//! at the drain deadline.
//!
//! The loop is generic over [`Exchange`] (one request and its whole answer) so that its timing
//! arithmetic can be tested on tokio's paused clock; the real exchange is
//! [`crate::raw::RawExchange`].
//!
//! Two rules keep a server that stops answering from hiding:
//!
//! - A request without an answer (timeout, reset, close, refused connect) counts in the latency
//!   at the time it failed, and at least at the timeout: a client that sent it got nothing for
//!   at least that long. A fast failure must never look like a fast answer.
//! - What a connection did is kept in its [`Tally`], outside the connection's task, so that when
//!   the drain deadline cuts the task the work is not lost: [`settle`] counts the request it had
//!   in flight (as a timeout) and, in open loop, each send that was due and never went out,
//!   recorded at the time the connection stopped as a lower bound of its latency.

use std::{
    future::Future,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::{
    task::JoinSet,
    time::{Instant, sleep_until, timeout_at},
};

use crate::{
    body::{self, Findings},
    schedule::{Schedule, latency_origin},
    stats::{Outcome, Phase, Timing, TransportError, WorkerStats},
};

/// After a failed connect in closed loop, wait this long before the next attempt, so that a
/// server that is down yields a steady trickle of `connect_refused` rather than a busy loop.
const CONNECT_BACKOFF: Duration = Duration::from_millis(10);

/// How long tasks cut at the drain deadline may take to finish being cancelled. A cancelled
/// task ends at its next await, so this is only reached by a task stuck in a blocking call.
const CANCEL_WAIT: Duration = Duration::from_millis(100);

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

/// A request on its way: what is needed to count it if its task is cut before it ends.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InFlight {
    /// Where its latency counts from.
    origin: Instant,
    /// When it was sent.
    sent: Instant,
    /// The window it counts in.
    phase: Phase,
    /// Open loop: the generator's send lag.
    send_lag: Option<Duration>,
}

/// What one connection has done so far, kept outside its task so that it survives the task
/// being cut at the drain deadline. Only the connection writes it, around each exchange; it is
/// read once the task has ended.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    /// Requests sent, the one in flight included.
    sent: u64,
    /// The request in flight, if any.
    in_flight: Option<InFlight>,
    /// When the last exchange ended.
    last_done: Option<Instant>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain counters behind, still usable; the
    // panic itself is reported as a failed run.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A worker's share of the run: where its connections count and when they are cut.
#[derive(Debug, Clone)]
pub(crate) struct Fleet {
    /// The time line.
    pub plan: Plan,
    /// Open loop: the total rate over all of the run's connections.
    pub rate: Option<f64>,
    /// Connections in the whole run (every worker's), which the open-loop schedule is dealt
    /// over.
    pub connections: usize,
    /// Per-worker statistics; connection `i` counts into `shards[i % len]`.
    pub shards: Arc<[Mutex<WorkerStats>]>,
    /// When connections still running are cut.
    pub drain_deadline: Instant,
}

impl Fleet {
    fn schedule(&self, index: usize) -> Option<Schedule> {
        self.rate
            .map(|rate| Schedule::new(self.plan.start, rate, self.connections, index))
    }

    fn shard(&self, index: usize) -> &Mutex<WorkerStats> {
        &self.shards[index % self.shards.len()]
    }
}

/// Runs connections `(index, exchange)` to the end of the plan, cuts those still running at the
/// drain deadline, and settles every connection's counts (see [`settle`]).
///
/// # Errors
///
/// The message of the first connection task that panicked.
pub(crate) async fn drive_all<E: Exchange + 'static>(
    fleet: &Arc<Fleet>,
    connections: Vec<(usize, E)>,
) -> Result<(), String> {
    let mut tasks = JoinSet::new();
    let mut tallies = Vec::with_capacity(connections.len());
    for (index, mut exchange) in connections {
        let tally = Arc::new(Mutex::new(Tally::default()));
        tallies.push((index, Arc::clone(&tally)));
        let fleet = Arc::clone(fleet);
        tasks.spawn(async move {
            let schedule = fleet.schedule(index);
            drive(
                &mut exchange,
                &fleet.plan,
                schedule,
                fleet.shard(index),
                &tally,
            )
            .await;
        });
    }
    let mut panicked = None;
    let mut note = |joined: Result<(), tokio::task::JoinError>| {
        if let Err(e) = joined
            && e.is_panic()
        {
            panicked.get_or_insert_with(|| e.to_string());
        }
    };
    let drained = timeout_at(fleet.drain_deadline, async {
        while let Some(joined) = tasks.join_next().await {
            note(joined);
        }
    })
    .await;
    let cut_at = if drained.is_err() {
        let cut_at = Instant::now();
        tasks.abort_all();
        // Wait for the cancellations to land, so that no task is between its exchange and its
        // bookkeeping while the tallies are read.
        let _ = timeout_at(cut_at + CANCEL_WAIT, async {
            while let Some(joined) = tasks.join_next().await {
                note(joined);
            }
        })
        .await;
        Some(cut_at)
    } else {
        None
    };
    if let Some(message) = panicked {
        return Err(message);
    }
    for (index, tally) in tallies {
        let tally = lock(&tally);
        let schedule = fleet.schedule(index);
        settle(
            &fleet.plan,
            schedule.as_ref(),
            &tally,
            cut_at,
            &mut lock(fleet.shard(index)),
        );
    }
    Ok(())
}

/// Counts what a connection's loop could not count itself, once its task has ended (`cut_at`
/// is when the drain deadline cut the tasks still running, if it did).
///
/// A request still in flight is counted as a timeout, at least the timeout long, and as
/// unfinished. In open loop, the sends due in each window are counted from the schedule, and
/// each send due before the end that never went out is counted as missed, with the time from
/// when it was due to when the connection stopped as its latency: it was still waiting then, so
/// that is a lower bound.
pub(crate) fn settle(
    plan: &Plan,
    schedule: Option<&Schedule>,
    tally: &Tally,
    cut_at: Option<Instant>,
    stats: &mut WorkerStats,
) {
    let cut = match (tally.in_flight, cut_at) {
        (Some(request), Some(at)) => {
            let timing = Timing {
                latency: (at - request.origin).max(plan.timeout),
                service: at - request.sent,
                send_lag: request.send_lag,
            };
            stats.record(
                request.phase,
                &timing,
                &Err(TransportError::Timeout),
                &Findings::Nothing,
            );
            stats.unfinished += 1;
            Some(at)
        }
        _ => None,
    };
    let Some(schedule) = schedule else {
        return;
    };
    let due = schedule.due_before(plan.end);
    let due_warmup = schedule.due_before(plan.warmup_end);
    stats.warmup.scheduled += due_warmup;
    stats.measured.scheduled += due - due_warmup;
    // The loop sends in schedule order and stops at the end, so the sends that never went out
    // are the last ones due. The connection was held back by the server if it was still
    // carrying a request when the run ended; otherwise it was free and the generator was late.
    let last_done = tally.last_done.unwrap_or(plan.start);
    let stopped = cut.unwrap_or_else(|| last_done.max(plan.end));
    let busy = cut.is_some() || last_done >= plan.end;
    for i in tally.sent..due {
        let waited = stopped.saturating_duration_since(schedule.at(i));
        stats.measured.record_missed(waited, busy);
    }
}

/// Runs one connection from `plan.start` to `plan.end`, closed loop when `schedule` is `None`.
pub(crate) async fn drive<E: Exchange>(
    exchange: &mut E,
    plan: &Plan,
    schedule: Option<Schedule>,
    stats: &Mutex<WorkerStats>,
    tally: &Mutex<Tally>,
) {
    sleep_until(plan.start).await;
    match schedule {
        None => closed_loop(exchange, plan, stats, tally).await,
        Some(schedule) => open_loop(exchange, plan, &schedule, stats, tally).await,
    }
}

async fn closed_loop<E: Exchange>(
    exchange: &mut E,
    plan: &Plan,
    stats: &Mutex<WorkerStats>,
    tally: &Mutex<Tally>,
) {
    loop {
        let sent = Instant::now();
        if sent >= plan.end {
            return;
        }
        let request = InFlight {
            origin: sent,
            sent,
            phase: plan.phase(sent),
            send_lag: None,
        };
        if send(exchange, plan, request, stats, tally)
            .await
            .is_some_and(TransportError::is_connect)
        {
            sleep_until((Instant::now() + CONNECT_BACKOFF).min(plan.end)).await;
        }
    }
}

async fn open_loop<E: Exchange>(
    exchange: &mut E,
    plan: &Plan,
    schedule: &Schedule,
    stats: &Mutex<WorkerStats>,
    tally: &Mutex<Tally>,
) {
    let mut previous_done = plan.start;
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
            // Still behind at the end: what is left of the schedule is counted as missed by
            // `settle`.
            break;
        }
        let (origin, lag) = latency_origin(scheduled, previous_done, sent);
        // The window is that of the actual send, as in closed loop: when the connection is
        // behind, sends due in the warm-up go out (and count) in the measured window, with their
        // latency still counted from when they were due.
        let request = InFlight {
            origin,
            sent,
            phase: plan.phase(sent),
            send_lag: Some(lag),
        };
        send(exchange, plan, request, stats, tally).await;
        previous_done = Instant::now();
    }
}

/// Sends one request, waits for its outcome and counts it, keeping the tally up to date.
/// Returns why there was no answer, if there was none.
async fn send<E: Exchange>(
    exchange: &mut E,
    plan: &Plan,
    request: InFlight,
    stats: &Mutex<WorkerStats>,
    tally: &Mutex<Tally>,
) -> Option<TransportError> {
    {
        let mut tally = lock(tally);
        tally.sent += 1;
        tally.in_flight = Some(request);
    }
    let outcome = exchange.exchange(request.sent + plan.timeout).await;
    let done = Instant::now();
    let answered = done - request.origin;
    let timing = Timing {
        // A request without an answer is at least as slow as the timeout: its client waited
        // that long, or would have, and got nothing.
        latency: if outcome.is_ok() {
            answered
        } else {
            answered.max(plan.timeout)
        },
        service: done - request.sent,
        send_lag: request.send_lag,
    };
    // No await from here on: a task cut at the drain deadline either has its request in flight
    // (and `settle` counts it) or has counted it here, never both.
    {
        let mut tally = lock(tally);
        tally.in_flight = None;
        tally.last_done = Some(done);
    }
    record(stats, request.phase, &timing, &outcome);
    outcome.err()
}

fn record(stats: &Mutex<WorkerStats>, phase: Phase, timing: &Timing, outcome: &Outcome) {
    // Decode the body before taking the lock, which the progress sampler shares.
    let findings = match outcome {
        Ok(answer) if body::wants_body(answer.kind, answer.status) => {
            body::inspect(answer.kind, answer.status, &answer.body)
        }
        _ => Findings::Nothing,
    };
    lock(stats).record(phase, timing, outcome, &findings);
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use bytes::Bytes;

    use super::*;
    use crate::{
        Checks, Config, Report, RequestKind,
        report::{Inputs, build},
        stats::Answer,
    };

    /// A server stand-in whose answers take scripted times; the paused clock makes them exact.
    struct Scripted {
        delays: VecDeque<Duration>,
        default: Duration,
        refuse: bool,
        /// From this instant on, no request is answered: each waits out its deadline.
        stall_at: Option<Instant>,
        /// After this many answers, the next request never ends, whatever its deadline (as an
        /// exchange stuck past its timeout would be).
        hang_after: Option<usize>,
        /// The next request panics.
        panic: bool,
        answered: usize,
    }

    impl Scripted {
        fn new(delays: &[u64], default: u64) -> Self {
            Self {
                delays: delays.iter().copied().map(Duration::from_millis).collect(),
                default: Duration::from_millis(default),
                refuse: false,
                stall_at: None,
                hang_after: None,
                panic: false,
                answered: 0,
            }
        }
    }

    impl Exchange for Scripted {
        async fn exchange(&mut self, deadline: Instant) -> Outcome {
            assert!(!self.panic, "scripted panic");
            if self.refuse {
                return Err(TransportError::ConnectRefused);
            }
            if self.hang_after == Some(self.answered) {
                std::future::pending::<()>().await;
            }
            if self.stall_at.is_some_and(|at| Instant::now() >= at) {
                sleep_until(deadline).await;
                return Err(TransportError::Timeout);
            }
            let delay = self.delays.pop_front().unwrap_or(self.default);
            if Instant::now() + delay > deadline {
                sleep_until(deadline).await;
                return Err(TransportError::Timeout);
            }
            tokio::time::sleep(delay).await;
            self.answered += 1;
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

    /// Runs one connection per server through [`drive_all`], as a worker does, with the drain
    /// deadline a run uses (the end, one timeout, and 500ms of grace).
    async fn run(plan: Plan, rate: Option<f64>, servers: Vec<Scripted>) -> WorkerStats {
        let fleet = Arc::new(Fleet {
            plan,
            rate,
            connections: servers.len(),
            shards: [Mutex::new(WorkerStats::new())].into(),
            drain_deadline: plan.end + plan.timeout + Duration::from_millis(500),
        });
        drive_all(&fleet, servers.into_iter().enumerate().collect())
            .await
            .unwrap();
        fleet.shards[0].lock().unwrap().clone()
    }

    /// The report of a run of `plan`, as `loadtest::run` builds it.
    fn report(plan: &Plan, rate: Option<f64>, connections: usize, stats: &WorkerStats) -> Report {
        let config = Config {
            duration: plan.end - plan.warmup_end,
            warmup: plan.warmup_end - plan.start,
            rate,
            connections,
            timeout: plan.timeout,
            ..Config::default()
        };
        build(
            Inputs {
                config: &config,
                threads: 1,
                started_unix_s: 0,
                generator_cpu: Some(Duration::ZERO),
                wall: plan.end - plan.start,
                timeline: Vec::new(),
            },
            stats,
        )
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

    /// What `recorded_ms` shows for `ms`: HDR histograms keep three significant digits, so
    /// values of seconds show at the top of their bucket (6300ms as 6304ms).
    fn shown_ms(expected: &[(u64, u64)]) -> Vec<(u64, u64)> {
        let h = crate::stats::histogram();
        expected
            .iter()
            .map(|&(ms, n)| {
                let top = h.highest_equivalent(ms * 1_000_000);
                ((top as f64 / 1e6).round() as u64, n)
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_stall_is_charged_to_the_requests_queued_behind_it() {
        // 10 req/s on one connection for 1s: due at 0, 100, ..., 900 ms. Every answer takes
        // 10ms except the third (due at 200ms), which takes 350ms and ends at 550ms.
        let plan = plan(0, 1000);
        let stats = run(plan, Some(10.0), vec![Scripted::new(&[10, 10, 350], 10)]).await;
        let m = &stats.measured;
        assert_eq!(m.requests, 10);
        assert_eq!(m.missed, 0);
        // Due at 300 (sent 550, done 560) -> 260ms; due at 400 (sent 560) -> 170ms;
        // due at 500 (sent 570) -> 80ms; from 600ms on the connection is back on schedule.
        assert_eq!(
            recorded_ms(&m.latency),
            [(10, 6), (80, 1), (170, 1), (260, 1), (350, 1)]
        );
        assert_eq!(recorded_ms(&m.success), recorded_ms(&m.latency));
        // Service time, from the actual send, hides the queueing: that is the omission.
        assert_eq!(recorded_ms(&m.service), [(10, 9), (350, 1)]);
        // The paused clock wakes timers exactly, so the generator never lagged.
        assert_eq!(m.send_lag.max(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn sends_that_never_went_out_count_as_missed_errors_with_a_lower_bound_latency() {
        // Answers take 300ms but are due every 100ms: the connection falls ever further behind.
        let plan = plan(0, 1000);
        let stats = run(plan, Some(10.0), vec![Scripted::new(&[], 300)]).await;
        let m = &stats.measured;
        // Sent at 0, 300, 600, 900 (due at 0, 100, 200, 300), the last answered at 1200ms;
        // latencies from the due time: 300, 500, 700, 900ms.
        assert_eq!(m.requests, 4);
        assert_eq!(m.scheduled, 10);
        assert_eq!(m.missed, 6);
        // The connection was still busy at the end: held back by the server.
        assert_eq!(m.missed_busy, 6);
        assert_eq!(m.errors(), 6);
        // The six sends due at 400..=900ms were still waiting when the connection stopped at
        // 1200ms: 800, 700, 600, 500, 400 and 300ms at least.
        assert_eq!(
            recorded_ms(&m.latency),
            [
                (300, 2),
                (400, 1),
                (500, 2),
                (600, 1),
                (700, 2),
                (800, 1),
                (900, 1)
            ]
        );
        assert_eq!(
            recorded_ms(&m.success),
            [(300, 1), (500, 1), (700, 1), (900, 1)]
        );
        let r = report(&plan, Some(10.0), 1, &stats);
        assert_eq!(r.measured.missed, 6);
        assert!((r.measured.error_rate - 0.6).abs() < 1e-12);
        assert_eq!(r.measured.latency.count, 10);
        assert_eq!(r.measured.success_latency.count, 4);
        let open = r.open_loop.as_ref().unwrap();
        assert!((open.achieved_ratio - 0.4).abs() < 1e-12);
        assert_eq!(open.missed_on_busy_connections, 6);
        assert!(
            open.statement.starts_with("The server is the bottleneck"),
            "{}",
            open.statement
        );
    }

    #[tokio::test(start_paused = true)]
    async fn warmup_sends_are_kept_apart() {
        let plan = plan(300, 1000);
        let stats = run(plan, Some(10.0), vec![Scripted::new(&[], 5)]).await;
        assert_eq!(stats.warmup.requests, 3);
        assert_eq!(stats.measured.requests, 7);
        assert_eq!(stats.warmup.missed + stats.measured.missed, 0);
        assert_eq!((stats.warmup.scheduled, stats.measured.scheduled), (3, 7));
    }

    #[tokio::test(start_paused = true)]
    async fn closed_loop_sends_when_the_last_answer_arrives() {
        let plan = plan(200, 1000);
        let stats = run(plan, None, vec![Scripted::new(&[], 100)]).await;
        assert_eq!(stats.warmup.requests, 2);
        assert_eq!(stats.measured.requests, 8);
        assert_eq!(recorded_ms(&stats.measured.latency), [(100, 8)]);
        assert_eq!(stats.measured.send_lag.len(), 0);
        assert_eq!(stats.measured.scheduled, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_that_is_down_has_no_throughput() {
        let plan = plan(0, 1000);
        let mut server = Scripted::new(&[], 1);
        server.refuse = true;
        let stats = run(plan, None, vec![server]).await;
        let m = &stats.measured;
        assert_eq!(m.transport_count(TransportError::ConnectRefused), 100);
        assert_eq!(m.responses, 0);
        // A refusal is no answer: it counts at the timeout, not at the microseconds it took.
        assert_eq!(recorded_ms(&m.latency), shown_ms(&[(5000, 100)]));
        assert!(m.success.is_empty());
        let r = report(&plan, None, 1, &stats);
        assert_eq!(r.measured.throughput_rps, 0.0);
        assert_eq!(r.measured.success_rps, 0.0);
        assert!((r.measured.attempts_rps - 100.0).abs() < 1e-9);
        assert_eq!(r.measured.error_rate, 1.0);
        let outcomes = "rps>=10".parse::<Checks>().unwrap().evaluate(&r);
        assert!(!outcomes[0].passed, "{outcomes:?}");
        assert!(r.summary().contains("0 answered"), "{}", r.summary());
    }

    #[tokio::test(start_paused = true)]
    async fn timeouts_end_the_wait_at_the_deadline_and_count_in_the_latency() {
        let mut plan = plan(0, 1000);
        plan.timeout = Duration::from_millis(250);
        // The first answer would take an hour; the timeout cuts it at 250ms.
        let stats = run(plan, None, vec![Scripted::new(&[3_600_000], 250)]).await;
        let m = &stats.measured;
        assert_eq!(m.transport_count(TransportError::Timeout), 1);
        assert_eq!(m.responses, 3);
        assert_eq!(recorded_ms(&m.latency), [(250, 4)]);
        assert_eq!(recorded_ms(&m.success), [(250, 3)]);
        assert_eq!(Instant::now(), plan.end);
    }

    /// The reviewer's scenario: a server that answers at once for 2s and then stops answering,
    /// loaded at 100 req/s over 4 connections for 4s with a 1s timeout.
    #[tokio::test(start_paused = true)]
    async fn a_server_that_stops_answering_is_not_blamed_on_the_generator() {
        let mut plan = plan(0, 4000);
        plan.timeout = Duration::from_secs(1);
        let servers = (0..4)
            .map(|_| {
                let mut server = Scripted::new(&[], 0);
                server.stall_at = Some(plan.start + Duration::from_secs(2));
                server
            })
            .collect();
        let stats = run(plan, Some(100.0), servers).await;
        let m = &stats.measured;
        // Each connection is due every 40ms: 50 answers before the stall, then one send that
        // times out after 1s and one more, sent at once from the queue, that times out after
        // the end; its other 48 sends never go out.
        assert_eq!(m.scheduled, 400);
        assert_eq!(m.responses, 200);
        assert_eq!(m.transport_count(TransportError::Timeout), 8);
        assert_eq!(m.requests, 208);
        assert_eq!((m.missed, m.missed_busy), (192, 192));
        // Every request and every missed send is in the latency.
        assert_eq!(m.latency.len(), 400);
        let r = report(&plan, Some(100.0), 4, &stats);
        let w = &r.measured;
        assert!((w.error_rate - 0.5).abs() < 1e-12, "{}", w.error_rate);
        assert!(w.latency.p99_ms >= 1000.0, "p99 {}", w.latency.p99_ms);
        assert_eq!(w.success_latency.count, 200);
        let open = r.open_loop.as_ref().unwrap();
        assert!(!open.kept_up);
        assert!((open.achieved_ratio - 0.52).abs() < 1e-12);
        assert!(
            open.statement.starts_with(
                "The server is the bottleneck, not the generator: the generator sent 52.0 req/s"
            ),
            "{}",
            open.statement
        );
        assert!(
            open.statement.contains("8 requests timed out after 1.00s"),
            "{}",
            open.statement
        );
        assert!(
            !open.statement.contains("short of CPU"),
            "{}",
            open.statement
        );
        // Service times include the 8 timeouts of 1s, so the capacity estimate is about 4 /
        // (8s / 208) = 104 req/s rather than thousands.
        let capacity = open.capacity_rps.unwrap();
        assert!((capacity - 104.0).abs() < 1.0, "{capacity}");
        let outcomes = "p99<250ms,error_rate<5%"
            .parse::<Checks>()
            .unwrap()
            .evaluate(&r);
        let verdicts: Vec<(&str, bool)> = outcomes
            .iter()
            .map(|o| (o.expression.as_str(), o.passed))
            .collect();
        assert_eq!(
            verdicts,
            [
                ("p99<250ms", false),
                ("error_rate<5%", false),
                ("kept_up", false)
            ]
        );
        let outcomes = "error_rate<60%,allow_behind"
            .parse::<Checks>()
            .unwrap()
            .evaluate(&r);
        assert_eq!(outcomes.len(), 1);
        assert!(outcomes[0].passed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_cut_at_the_drain_deadline_keeps_its_counts() {
        // 10 req/s on one connection for 1s; the fourth request (due and sent at 300ms) never
        // ends, not even at its deadline, so the drain deadline (1000 + 5000 + 500ms) cuts it.
        let plan = plan(0, 1000);
        let mut server = Scripted::new(&[], 10);
        server.hang_after = Some(3);
        let stats = run(plan, Some(10.0), vec![server]).await;
        let m = &stats.measured;
        assert_eq!(m.scheduled, 10);
        assert_eq!(stats.unfinished, 1);
        assert_eq!(m.requests, 4);
        assert_eq!(m.responses, 3);
        assert_eq!(m.transport_count(TransportError::Timeout), 1);
        assert_eq!((m.missed, m.missed_busy), (6, 6));
        // The cut request waited from 300 to 6500ms; the missed sends, due at 400..=900ms, at
        // least until the cut.
        let mut expected = vec![(10, 3)];
        expected.extend((0..6).map(|k| (5600 + 100 * k, 1)));
        expected.push((6200, 1));
        expected.sort_unstable();
        assert_eq!(recorded_ms(&m.latency), shown_ms(&expected));
        let r = report(&plan, Some(10.0), 1, &stats);
        let open = r.open_loop.as_ref().unwrap();
        assert!((open.achieved_ratio - 0.4).abs() < 1e-12);
        assert!(open.achieved_ratio <= 1.0);
        assert_eq!(r.unfinished, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_loop_request_cut_at_the_drain_deadline_is_a_timeout() {
        let plan = plan(0, 1000);
        let mut server = Scripted::new(&[], 100);
        server.hang_after = Some(2);
        let stats = run(plan, None, vec![server]).await;
        let m = &stats.measured;
        assert_eq!((m.requests, m.responses, stats.unfinished), (3, 2, 1));
        assert_eq!(m.transport_count(TransportError::Timeout), 1);
        // Sent at 200ms, cut at 6500ms.
        assert_eq!(recorded_ms(&m.latency), shown_ms(&[(100, 2), (6300, 1)]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_connection_fails_the_worker() {
        let plan = plan(0, 1000);
        let fleet = Arc::new(Fleet {
            plan,
            rate: None,
            connections: 2,
            shards: [Mutex::new(WorkerStats::new())].into(),
            drain_deadline: plan.end + plan.timeout,
        });
        let mut bad = Scripted::new(&[], 10);
        bad.panic = true;
        let connections = vec![(0, Scripted::new(&[], 10)), (1, bad)];
        let message = drive_all(&fleet, connections).await.unwrap_err();
        assert!(message.contains("panicked"), "{message}");
    }
}
