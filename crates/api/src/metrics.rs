//! Prometheus metrics: what `/metrics` shows.
//!
//! Request latencies by route pattern, method and status; each dashboard source's latency and
//! outcome, and errors by source and kind; and, read at scrape time, the pool (size, idle,
//! waiting), the database gate, the process-wide count of live task-group children and the
//! recommendation client's breaker and counters. The registry belongs to the application, not to
//! the process, so tests can run several applications side by side.

use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use service::{Service, Source, SourceFailure, SourceStatus, SourceTiming};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    route: &'static str,
    method: &'static str,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: &'static str,
    status: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    source: &'static str,
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DatabaseLabels {
    database: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

type Buckets = fn() -> Histogram;

fn latency_buckets() -> Histogram {
    // 0.25 ms to about 16 s, doubling.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 17))
}

/// The application's metrics.
pub struct Metrics {
    registry: Registry,
    http: Family<HttpLabels, Histogram, Buckets>,
    source_errors: Family<ErrorLabels, Counter>,
    pool_max: Gauge,
    pool_size: Gauge,
    pool_idle: Gauge,
    pool_waiting: Gauge,
    gate_in_use: Gauge,
    gate_slots: Gauge,
    live_children: Gauge,
    in_flight: Gauge,
    breaker_state: Gauge,
    breaker_failures: Gauge,
    recommendation_calls: Counter<u64, AtomicU64>,
    recommendation_errors: Family<KindLabels, Counter<u64, AtomicU64>>,
    coalesced_statements: Counter<u64, AtomicU64>,
    db_leases: Family<DatabaseLabels, Counter<u64, AtomicU64>>,
    db_fallbacks: Family<DatabaseLabels, Counter<u64, AtomicU64>>,
    coalesced_reads: Counter<u64, AtomicU64>,
    sync: std::sync::Mutex<()>,
    /// Handles resolved once for the hot labels, so a request observes without hashing labels
    /// and taking the family's lock: each source by how it ended, and `GET` answered 200 per
    /// route. Other label sets go through the families.
    source_handles: [[Histogram; 4]; 4],
    ok_gets: Vec<(&'static str, Histogram)>,
}

/// Where a status sits in [`Metrics::source_handles`].
fn status_index(status: SourceStatus) -> usize {
    match status {
        SourceStatus::Ok => 0,
        SourceStatus::Error => 1,
        SourceStatus::Timeout => 2,
        SourceStatus::Cancelled => 3,
    }
}

/// Where a source sits in [`Metrics::source_handles`].
fn source_index(source: Source) -> usize {
    match source {
        Source::Profile => 0,
        Source::Orders => 1,
        Source::Reviews => 2,
        Source::Recommendations => 3,
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let http = Family::<HttpLabels, Histogram, Buckets>::new_with_constructor(
            latency_buckets as Buckets,
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by route pattern, method and status",
            http.clone(),
        );
        let sources = Family::<SourceLabels, Histogram, Buckets>::new_with_constructor(
            latency_buckets as Buckets,
        );
        registry.register(
            "dashboard_source_duration_seconds",
            "Latency of each dashboard source by how it ended (ok, error, timeout, cancelled)",
            sources.clone(),
        );
        let source_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "dashboard_source_errors",
            "Dashboard source failures by source and kind",
            source_errors.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let gauge = Gauge::default();
            registry.register(name, help, gauge.clone());
            gauge
        };
        let pool_max = gauge(
            &mut registry,
            "db_pool_max_size",
            "Most connections the pool opens",
        );
        let pool_size = gauge(&mut registry, "db_pool_size", "Connections open now");
        let pool_idle = gauge(&mut registry, "db_pool_idle", "Idle pooled connections");
        let pool_waiting = gauge(
            &mut registry,
            "db_pool_waiting",
            "Callers waiting for a pooled connection",
        );
        let gate_in_use = gauge(
            &mut registry,
            "db_slots_in_use",
            "Process-wide database slots in use",
        );
        let gate_slots = gauge(&mut registry, "db_slots", "Process-wide database slots");
        let live_children = gauge(
            &mut registry,
            "taskgroup_live_children",
            "Task-group children alive in this process (spawned and not yet dropped)",
        );
        let in_flight = gauge(
            &mut registry,
            "http_requests_in_flight",
            "Requests accepted and not yet fully answered",
        );
        let breaker_state = gauge(
            &mut registry,
            "recommendations_breaker_state",
            "Circuit breaker of the recommendation client: 0 closed, 1 half-open, 2 open",
        );
        let breaker_failures = gauge(
            &mut registry,
            "recommendations_breaker_consecutive_failures",
            "Consecutive failures counted by the breaker",
        );
        let recommendation_calls = Counter::<u64, AtomicU64>::default();
        registry.register(
            "recommendations_calls",
            "Calls to the recommendation service",
            recommendation_calls.clone(),
        );
        let recommendation_errors = Family::<KindLabels, Counter<u64, AtomicU64>>::default();
        registry.register(
            "recommendations_errors",
            "Failed calls to the recommendation service by kind",
            recommendation_errors.clone(),
        );
        let coalesced_statements = Counter::<u64, AtomicU64>::default();
        registry.register(
            "dashboard_coalesced_statements",
            "Shared statements sent in coalesced read mode (reads / statements is the mean batch size)",
            coalesced_statements.clone(),
        );
        let coalesced_reads = Counter::<u64, AtomicU64>::default();
        registry.register(
            "dashboard_coalesced_reads",
            "Source reads answered by shared statements in coalesced read mode",
            coalesced_reads.clone(),
        );
        let db_leases = Family::<DatabaseLabels, Counter<u64, AtomicU64>>::default();
        registry.register(
            "db_leases",
            "Connection leases handed out, by database (primary, replica-N)",
            db_leases.clone(),
        );
        let db_fallbacks = Family::<DatabaseLabels, Counter<u64, AtomicU64>>::default();
        registry.register(
            "db_replica_fallbacks",
            "Statements that failed on a replica (gone, or no answer within replica_timeout) and went to the primary",
            db_fallbacks.clone(),
        );
        let source_handles = Source::ALL.map(|source| {
            [
                SourceStatus::Ok,
                SourceStatus::Error,
                SourceStatus::Timeout,
                SourceStatus::Cancelled,
            ]
            .map(|status| {
                sources
                    .get_or_create(&SourceLabels {
                        source: source.as_str(),
                        status: status.as_str(),
                    })
                    .clone()
            })
        });
        let ok_gets = crate::ROUTES
            .iter()
            .map(|&route| {
                let labels = HttpLabels {
                    route,
                    method: "GET",
                    status: 200,
                };
                (route, http.get_or_create(&labels).clone())
            })
            .collect();
        Self {
            registry,
            http,
            source_errors,
            pool_max,
            pool_size,
            pool_idle,
            pool_waiting,
            gate_in_use,
            gate_slots,
            live_children,
            in_flight,
            breaker_state,
            breaker_failures,
            recommendation_calls,
            recommendation_errors,
            coalesced_statements,
            coalesced_reads,
            db_leases,
            db_fallbacks,
            sync: std::sync::Mutex::new(()),
            source_handles,
            ok_gets,
        }
    }

    /// Records one HTTP request.
    pub fn observe_request(
        &self,
        route: &'static str,
        method: &'static str,
        status: u16,
        elapsed: Duration,
    ) {
        if method == "GET"
            && status == 200
            && let Some((_, histogram)) = self.ok_gets.iter().find(|(r, _)| *r == route)
        {
            histogram.observe(elapsed.as_secs_f64());
            return;
        }
        self.http
            .get_or_create(&HttpLabels {
                route,
                method,
                status,
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Records one dashboard's per-source timings and errors.
    pub fn observe_dashboard(&self, timings: &[SourceTiming], errors: &[SourceFailure]) {
        for timing in timings {
            self.source_handles[source_index(timing.source)][status_index(timing.status)]
                .observe(timing.elapsed.as_secs_f64());
        }
        for error in errors {
            self.source_errors
                .get_or_create(&ErrorLabels {
                    source: error.source.as_str(),
                    kind: error.kind.as_str(),
                })
                .inc();
        }
    }

    /// Reads the gauges from the live objects and renders everything in the text format.
    pub fn render(&self, service: &Service, in_flight: usize) -> String {
        let gauges = service.gauges();
        let to_i64 = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.pool_max.set(to_i64(gauges.pool_max));
        self.pool_size.set(to_i64(gauges.pool_size));
        self.pool_idle.set(to_i64(gauges.pool_idle));
        self.pool_waiting.set(to_i64(gauges.pool_waiting));
        self.gate_in_use.set(to_i64(gauges.slots_in_use));
        self.gate_slots.set(to_i64(gauges.slots));
        self.live_children.set(to_i64(gauges.live_children));
        self.in_flight.set(to_i64(in_flight));
        self.breaker_state.set(i64::from(gauges.breaker.as_gauge()));
        self.breaker_failures
            .set(i64::from(gauges.breaker_failures));
        // Counters only go up: bring ours level with the client's own totals, one scrape at a
        // time (two concurrent scrapes would both add the same difference).
        let _sync = self
            .sync
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (counter, total) in [
            (&self.coalesced_statements, gauges.coalesced_statements),
            (&self.coalesced_reads, gauges.coalesced_reads),
        ] {
            counter.inc_by(total.saturating_sub(counter.get()));
        }
        for count in &gauges.leases {
            let labels = DatabaseLabels {
                database: count.database.clone(),
            };
            let leases = self.db_leases.get_or_create(&labels);
            leases.inc_by(count.leases.saturating_sub(leases.get()));
            if count.database != "primary" {
                let fallbacks = self.db_fallbacks.get_or_create(&labels);
                fallbacks.inc_by(count.fallbacks.saturating_sub(fallbacks.get()));
            }
        }
        let calls = self.recommendation_calls.get();
        self.recommendation_calls
            .inc_by(gauges.recommendation_calls.saturating_sub(calls));
        for &(kind, count) in &gauges.recommendation_errors {
            let counter = self.recommendation_errors.get_or_create(&KindLabels {
                kind: kind.as_str(),
            });
            counter.inc_by(count.saturating_sub(counter.get()));
        }
        let mut text = String::with_capacity(16 * 1024);
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            // Writing to a String cannot fail; keep the output well-formed regardless.
            text.clear();
            let _ = writeln!(text, "# EOF");
        }
        text
    }
}
