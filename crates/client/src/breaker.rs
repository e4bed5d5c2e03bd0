//! The circuit breaker: stop calling a service that keeps failing, and find out cheaply when it
//! has recovered.
//!
//! Closed, it lets every call through and counts consecutive failures. At the threshold it opens:
//! calls fail at once, without touching the network, until the cool-down ends. The first call
//! after that is the probe (half-open): its success closes the circuit, its failure reopens it for
//! another cool-down; other calls keep failing fast while the probe is in flight. A probe that is
//! cancelled (its caller gave up) tells nothing, so it hands the probe to the next call.
//!
//! Time comes from `tokio::time::Instant`, so tests drive it with the paused clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::BreakerConfig;

/// The state of the circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Calls fail fast until the cool-down ends.
    Open,
    /// One probe call is in flight; the others fail fast.
    HalfOpen,
}

impl BreakerState {
    /// `closed`, `open` or `half_open`.
    pub const fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    /// The state as a gauge, in order of severity: 0 closed, 1 half-open (probing), 2 open.
    /// `/metrics` exports exactly this.
    pub const fn as_gauge(self) -> u8 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }
}

/// The breaker's state and counters at one moment, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSnapshot {
    /// The current state. An open circuit whose cool-down has ended still reads `Open` until
    /// the next call becomes the probe.
    pub state: BreakerState,
    /// Failures since the last success.
    pub consecutive_failures: u32,
    /// How many times the circuit has opened since start.
    pub opened_total: u64,
    /// Calls refused without touching the network since start.
    pub rejected_total: u64,
    /// Probe calls let through since start.
    pub probes_total: u64,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Closed,
    Open { until: Instant },
    HalfOpen,
}

#[derive(Debug)]
struct Inner {
    state: State,
    consecutive_failures: u32,
}

/// A thread-safe circuit breaker. The lock is held only for a few assignments, never across an
/// `.await`.
#[derive(Debug)]
pub(crate) struct Breaker {
    config: BreakerConfig,
    inner: Mutex<Inner>,
    opened_total: AtomicU64,
    rejected_total: AtomicU64,
    probes_total: AtomicU64,
}

/// How a call that was let through ended, from the breaker's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The service answered well.
    Success,
    /// The service failed (see `RecommendationError::is_service_failure`).
    Failure,
    /// The call says nothing about the service's health (cancelled, or a 4xx answer).
    Neutral,
}

/// Permission to make one call. Report how it went with [`Permit::record`]; a permit dropped
/// without a record (the call was cancelled) counts as [`Outcome::Neutral`].
#[derive(Debug)]
pub(crate) struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
    recorded: bool,
}

impl Permit<'_> {
    pub(crate) fn record(mut self, outcome: Outcome) {
        self.recorded = true;
        self.breaker.record(self.probe, outcome);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.recorded {
            self.breaker.record(self.probe, Outcome::Neutral);
        }
    }
}

impl Breaker {
    pub(crate) fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            inner: Mutex::new(Inner {
                state: State::Closed,
                consecutive_failures: 0,
            }),
            opened_total: AtomicU64::new(0),
            rejected_total: AtomicU64::new(0),
            probes_total: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every critical section leaves `Inner` consistent, so a panic elsewhere while holding the
        // lock cannot have left it half-updated.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a call may go ahead now, without taking a permit: `Err` (counted as a rejection)
    /// carries how long until a probe will be allowed. The client asks this before it queues for
    /// an in-flight slot, so that an open circuit fails fast even when every slot is busy; the
    /// permit itself is taken once the call has its slot, so that a permit, and above all the
    /// probe's, stands for a request that is actually sent.
    pub(crate) fn check(&self) -> Result<(), Duration> {
        if !self.config.enabled {
            return Ok(());
        }
        let now = Instant::now();
        let state = self.lock().state;
        match state {
            State::Closed => Ok(()),
            State::Open { until } if now >= until => Ok(()),
            State::Open { until } => Err(self.reject(until - now)),
            State::HalfOpen => Err(self.reject(Duration::ZERO)),
        }
    }

    /// Asks to make a call now. `Err` (counted as a rejection) carries how long until a probe
    /// will be allowed.
    pub(crate) fn try_acquire(&self) -> Result<Permit<'_>, Duration> {
        if !self.config.enabled {
            return Ok(self.permit(false));
        }
        let now = Instant::now();
        let mut inner = self.lock();
        match inner.state {
            State::Closed => Ok(self.permit(false)),
            State::Open { until } if now >= until => {
                inner.state = State::HalfOpen;
                drop(inner);
                self.probes_total.fetch_add(1, Ordering::Relaxed);
                Ok(self.permit(true))
            }
            State::Open { until } => {
                drop(inner);
                Err(self.reject(until - now))
            }
            State::HalfOpen => {
                drop(inner);
                Err(self.reject(Duration::ZERO))
            }
        }
    }

    fn reject(&self, retry_in: Duration) -> Duration {
        self.rejected_total.fetch_add(1, Ordering::Relaxed);
        retry_in
    }

    fn permit(&self, probe: bool) -> Permit<'_> {
        Permit {
            breaker: self,
            probe,
            recorded: false,
        }
    }

    fn record(&self, probe: bool, outcome: Outcome) {
        if !self.config.enabled {
            return;
        }
        let mut inner = self.lock();
        match (outcome, inner.state) {
            (Outcome::Success, State::Closed) => inner.consecutive_failures = 0,
            (Outcome::Success, State::HalfOpen) if probe => {
                inner.consecutive_failures = 0;
                inner.state = State::Closed;
                drop(inner);
                info!("recommendation service recovered; circuit closed");
            }
            (Outcome::Success, _) => {
                // Only the probe closes an open circuit: a late success of a call that started
                // before the circuit opened says less than the failures that opened it.
            }
            (Outcome::Failure, State::HalfOpen) if probe => {
                inner.consecutive_failures = inner.consecutive_failures.saturating_add(1);
                self.open(&mut inner);
            }
            (Outcome::Failure, State::Closed) => {
                inner.consecutive_failures = inner.consecutive_failures.saturating_add(1);
                if inner.consecutive_failures >= self.config.failure_threshold {
                    self.open(&mut inner);
                }
            }
            (Outcome::Failure, _) => {
                // A late failure of a call that started before the circuit opened: already
                // accounted for by the open circuit.
                inner.consecutive_failures = inner.consecutive_failures.saturating_add(1);
            }
            (Outcome::Neutral, State::HalfOpen) if probe => {
                // Nothing learned: let the next call probe right away.
                inner.state = State::Open {
                    until: Instant::now(),
                };
            }
            (Outcome::Neutral, _) => {}
        }
    }

    fn open(&self, inner: &mut Inner) {
        inner.state = State::Open {
            until: Instant::now() + self.config.cooldown,
        };
        self.opened_total.fetch_add(1, Ordering::Relaxed);
        warn!(
            consecutive_failures = inner.consecutive_failures,
            cooldown = ?self.config.cooldown,
            "recommendation service failing; circuit opened"
        );
    }

    pub(crate) fn snapshot(&self) -> BreakerSnapshot {
        let (state, consecutive_failures) = {
            let inner = self.lock();
            let state = match inner.state {
                State::Closed => BreakerState::Closed,
                State::Open { .. } => BreakerState::Open,
                State::HalfOpen => BreakerState::HalfOpen,
            };
            (state, inner.consecutive_failures)
        };
        BreakerSnapshot {
            state,
            consecutive_failures,
            opened_total: self.opened_total.load(Ordering::Relaxed),
            rejected_total: self.rejected_total.load(Ordering::Relaxed),
            probes_total: self.probes_total.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(threshold: u32) -> Breaker {
        Breaker::new(BreakerConfig {
            enabled: true,
            failure_threshold: threshold,
            cooldown: Duration::from_secs(10),
        })
    }

    fn fail(breaker: &Breaker) {
        breaker.try_acquire().unwrap().record(Outcome::Failure);
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_the_threshold_of_consecutive_failures() {
        let b = breaker(3);
        fail(&b);
        fail(&b);
        // A success in between resets the count.
        b.try_acquire().unwrap().record(Outcome::Success);
        fail(&b);
        fail(&b);
        assert_eq!(b.snapshot().state, BreakerState::Closed);
        assert_eq!(b.snapshot().consecutive_failures, 2);
        fail(&b);
        let snapshot = b.snapshot();
        assert_eq!(snapshot.state, BreakerState::Open);
        assert_eq!(snapshot.opened_total, 1);

        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(b.try_acquire().unwrap_err(), Duration::from_secs(6));
        assert_eq!(b.snapshot().rejected_total, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_single_probe_after_the_cooldown_decides() {
        let b = breaker(1);
        fail(&b);
        tokio::time::advance(Duration::from_secs(10)).await;

        let probe = b.try_acquire().unwrap();
        assert_eq!(b.snapshot().state, BreakerState::HalfOpen);
        // Everyone else fails fast while the probe is out.
        assert_eq!(b.try_acquire().unwrap_err(), Duration::ZERO);
        probe.record(Outcome::Failure);
        assert_eq!(b.snapshot().state, BreakerState::Open);
        assert_eq!(b.snapshot().opened_total, 2);

        tokio::time::advance(Duration::from_secs(10)).await;
        b.try_acquire().unwrap().record(Outcome::Success);
        let snapshot = b.snapshot();
        assert_eq!(snapshot.state, BreakerState::Closed);
        assert_eq!(snapshot.consecutive_failures, 0);
        assert_eq!(snapshot.probes_total, 2);
        assert_eq!(snapshot.rejected_total, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_check_rejects_like_a_permit_but_takes_nothing() {
        let b = breaker(1);
        assert_eq!(b.check(), Ok(()));
        fail(&b);
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(b.check(), Err(Duration::from_secs(6)));
        assert_eq!(b.snapshot().rejected_total, 1);

        // After the cool-down a check lets the call go on to ask for the probe, but does not
        // become the probe itself.
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(b.check(), Ok(()));
        assert_eq!(b.snapshot().state, BreakerState::Open);
        assert_eq!(b.snapshot().probes_total, 0);
        let probe = b.try_acquire().unwrap();
        assert_eq!(b.check(), Err(Duration::ZERO));
        probe.record(Outcome::Success);
        assert_eq!(b.check(), Ok(()));
        assert_eq!(b.snapshot().rejected_total, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_probe_hands_over_to_the_next_call() {
        let b = breaker(1);
        fail(&b);
        tokio::time::advance(Duration::from_secs(10)).await;
        drop(b.try_acquire().unwrap());
        assert_eq!(b.snapshot().state, BreakerState::Open);
        // No new cool-down: the next call is the probe.
        let probe = b.try_acquire().unwrap();
        probe.record(Outcome::Success);
        assert_eq!(b.snapshot().state, BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn late_outcomes_of_calls_started_while_closed_do_not_close_or_reopen() {
        let b = breaker(1);
        let slow_success = b.try_acquire().unwrap();
        let slow_failure = b.try_acquire().unwrap();
        fail(&b);
        slow_success.record(Outcome::Success);
        assert_eq!(b.snapshot().state, BreakerState::Open);
        slow_failure.record(Outcome::Failure);
        assert_eq!(b.snapshot().opened_total, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn neutral_outcomes_neither_count_nor_reset() {
        let b = breaker(2);
        fail(&b);
        b.try_acquire().unwrap().record(Outcome::Neutral);
        assert_eq!(b.snapshot().consecutive_failures, 1);
        fail(&b);
        assert_eq!(b.snapshot().state, BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn a_disabled_breaker_lets_everything_through() {
        let b = Breaker::new(BreakerConfig {
            enabled: false,
            failure_threshold: 1,
            cooldown: Duration::from_secs(10),
        });
        for _ in 0..10 {
            fail(&b);
        }
        assert_eq!(b.snapshot().state, BreakerState::Closed);
        assert_eq!(b.snapshot().opened_total, 0);
    }

    #[test]
    fn states_have_labels_and_gauge_values() {
        assert_eq!(BreakerState::Closed.as_str(), "closed");
        assert_eq!(BreakerState::HalfOpen.as_str(), "half_open");
        let gauges = [
            BreakerState::Closed,
            BreakerState::HalfOpen,
            BreakerState::Open,
        ]
        .map(BreakerState::as_gauge);
        assert_eq!(gauges, [0, 1, 2]);
    }
}
