//! The open-loop send schedule and the coordinated-omission arithmetic.
//!
//! With `--rate R` over `C` connections, the run's sends are spaced `1/R` apart and dealt round
//! robin: connection `c` sends its `i`-th request at `start + (i·C + c) / R`. A connection has one
//! request in flight at a time, so when an answer comes late the next sends queue behind it and go
//! out back to back; their latency still counts from their *scheduled* time, which is what keeps a
//! stalled server from hiding its stall (the correction wrk2 makes).
//!
//! A send can also be late because the generator itself was late (its timer's millisecond
//! granularity, or a starved CPU) while the connection was idle. That delay is not the server's
//! doing: it is measured as *send lag*, reported on its own, and left out of the latency.

use std::time::Duration;

use tokio::time::Instant;

/// When one connection's requests are due.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Schedule {
    start: Instant,
    first_ns: f64,
    period_ns: f64,
}

impl Schedule {
    /// The schedule of connection `index` of `connections`, at `rate` requests per second in all.
    pub(crate) fn new(start: Instant, rate: f64, connections: usize, index: usize) -> Self {
        let spacing_ns = 1e9 / rate;
        // Connection counts are far below 2^52, so these conversions are exact.
        #[allow(clippy::cast_precision_loss)]
        Self {
            start,
            first_ns: spacing_ns * index as f64,
            period_ns: spacing_ns * connections as f64,
        }
    }

    /// The due time of this connection's `i`-th request, counting from 0.
    pub(crate) fn at(&self, i: u64) -> Instant {
        #[allow(clippy::cast_precision_loss)]
        let offset = self.first_ns + self.period_ns * i as f64;
        // The offset is non-negative and bounded by the run length (at most a day).
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let offset = Duration::from_nanos(offset.round() as u64);
        self.start + offset
    }

    /// How many of this connection's requests are due strictly before `t`.
    pub(crate) fn due_before(&self, t: Instant) -> u64 {
        #[allow(clippy::cast_precision_loss)]
        let elapsed = t.saturating_duration_since(self.start).as_nanos() as f64;
        let estimate = ((elapsed - self.first_ns) / self.period_ns).ceil().max(0.0);
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let mut n = estimate as u64;
        // Floating-point rounding can leave the estimate one off either way; settle it exactly.
        while self.at(n) < t {
            n += 1;
        }
        while n > 0 && self.at(n - 1) >= t {
            n -= 1;
        }
        n
    }
}

/// Splits the delay of a send into the server's share and the generator's.
///
/// `scheduled` is when the request was due, `previous_done` when the connection's previous answer
/// ended (so it could send again) and `sent` when it did send. Returns the instant the latency
/// counts from and the generator's send lag: the part of the delay after both the schedule and
/// the connection allowed the send.
pub(crate) fn latency_origin(
    scheduled: Instant,
    previous_done: Instant,
    sent: Instant,
) -> (Instant, Duration) {
    let could_send = scheduled.max(previous_done);
    let lag = sent.saturating_duration_since(could_send);
    (scheduled + lag, lag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_interleave_into_an_even_rate() {
        let start = Instant::now();
        let (rate, connections) = (1000.0, 7);
        let mut all: Vec<Duration> = (0..connections)
            .flat_map(|c| {
                let schedule = Schedule::new(start, rate, connections, c);
                (0..100).map(move |i| schedule.at(i) - start)
            })
            .collect();
        all.sort();
        for (n, due) in all.iter().enumerate() {
            assert_eq!(*due, Duration::from_millis(n as u64), "send {n}");
        }
    }

    #[test]
    fn due_counts_match_the_schedule() {
        let start = Instant::now();
        for (rate, connections) in [(3.0, 1), (1000.0, 64), (333.3, 5), (1e6, 3)] {
            let total: u64 = (0..connections)
                .map(|c| Schedule::new(start, rate, connections, c))
                .map(|s| s.due_before(start + Duration::from_secs(2)))
                .sum();
            let expected = (rate * 2.0).ceil() as u64;
            assert_eq!(total, expected, "rate {rate}, {connections} connections");
            for c in 0..connections {
                let schedule = Schedule::new(start, rate, connections, c);
                for i in 0..20 {
                    let due = schedule.at(i);
                    assert_eq!(schedule.due_before(due), i);
                    assert_eq!(schedule.due_before(due + Duration::from_nanos(1)), i + 1);
                }
            }
        }
        let schedule = Schedule::new(start, 10.0, 2, 1);
        assert_eq!(schedule.due_before(start), 0);
        assert_eq!(schedule.at(0), start + Duration::from_millis(100));
    }

    #[test]
    fn busy_connections_count_from_the_schedule_idle_ones_from_the_send() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // The previous answer ended 40ms after the due time; the send followed at once.
        let (origin, lag) = latency_origin(t0, t0 + ms(40), t0 + ms(40));
        assert_eq!((origin, lag), (t0, Duration::ZERO));
        // The connection was idle; the timer fired 2ms late: that is the generator's lag.
        let (origin, lag) = latency_origin(t0 + ms(10), t0, t0 + ms(12));
        assert_eq!((origin, lag), (t0 + ms(12), ms(2)));
        // Busy until 30ms, yet the send went at 33ms: 3ms of it was the generator's.
        let (origin, lag) = latency_origin(t0 + ms(10), t0 + ms(30), t0 + ms(33));
        assert_eq!((origin, lag), (t0 + ms(13), ms(3)));
    }
}
