//! Dashboard and batch orchestration: fan-out over the repository and the recommendation client
//! in task groups. This crate is the API's one dependency: it answers in its own types (no
//! repository or client error reaches a caller), and offers everything an HTTP layer needs:
//! readiness, a snapshot of its gauges, and typed results.
//!
//! [`Service`] holds what every request shares: the database pool, the recommendation client,
//! and the process-wide database gate. Its two operations are:
//!
//! - [`Service::dashboard`]: profile, orders, reviews and recommendations at once, each source
//!   with its own timeout under one deadline, partial on optional failures, cancelled as a whole
//!   when the profile shows the user does not exist. Its latency is that of its slowest source,
//!   not their sum.
//! - [`Service::summaries`]: profile and order summary for up to a thousand users, chunked into
//!   `= ANY($1)` statements run through the task group's ordered map with a concurrency limit.
//!
//! The three dashboard reads run either pipelined on one connection or on three pooled
//! connections ([`QueryMode`]); the gate bounds database work across all requests, not per
//! request.

mod batch;
mod coalesce;
mod config;
mod dashboard;
mod gate;
mod kind;
mod source;
mod user_id;

use std::sync::Arc;
use std::time::Duration;

use client::RecommendationClient;
use repository::Database;
use tokio::time::Instant;

pub use batch::{BatchError, BatchFailure, BatchSummary, UserSummaryEntry};
pub use client::{BreakerState, Recommendations};
pub use config::{BatchConfig, ConfigError, DashboardConfig, QueryMode, ServiceConfig};
pub use dashboard::{Dashboard, DashboardError};
pub use kind::{ErrorKind, Limit};
pub use repository::{DatabaseState, LeaseCount, Order, Profile, Reach, Review, Role};
pub use source::{Source, SourceFailure, SourceStatus, SourceTiming};
pub use user_id::{InvalidUserId, UserId};

/// The settings of the layers below, which the API's configuration holds: the `[database]` and
/// `[recommendations]` sections.
pub mod settings {
    pub use client::{BreakerConfig, ClientConfig, HedgeConfig};
    pub use repository::{DbConfig, Secret, mask_url};
}

/// Schema migrations of the database the service reads (`api migrate` runs them).
pub mod migrations {
    pub use repository::migrations::{
        MigrationError, MigrationInfo, MigrationStatus, apply_to, status_of,
    };
}

pub(crate) use source::SourceError;

use gate::DbGate;

/// The orchestration layer. Cheap to clone: clones share everything.
#[derive(Debug, Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    db: Database,
    client: RecommendationClient,
    gate: DbGate,
    /// The share of database slots batches may hold, across all batches.
    batch_slots: Arc<tokio::sync::Semaphore>,
    /// The shared-read queues of [`QueryMode::Coalesced`].
    coalescer: coalesce::Coalescer,
    config: ServiceConfig,
}

/// The service's gauges at one moment, for `/metrics` and for tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gauges {
    /// Most connections the pool opens.
    pub pool_max: usize,
    /// Connections open now.
    pub pool_size: usize,
    /// Idle pooled connections.
    pub pool_idle: usize,
    /// Callers waiting for a pooled connection.
    pub pool_waiting: usize,
    /// Lanes the pool (and the gate, and the client) is split into.
    pub lanes: usize,
    /// Whether the pool has been closed.
    pub pool_closed: bool,
    /// Database slots of the process-wide gate.
    pub slots: usize,
    /// Database slots in use now.
    pub slots_in_use: usize,
    /// Task-group children alive in the process, at every depth.
    pub live_children: usize,
    /// The recommendation client's circuit breaker.
    pub breaker: BreakerState,
    /// Consecutive failures the breaker has counted.
    pub breaker_failures: u32,
    /// Calls made to the recommendation service.
    pub recommendation_calls: u64,
    /// Failed calls by kind (every kind a call can fail with, zero or not).
    pub recommendation_errors: Vec<(ErrorKind, u64)>,
    /// Shared statements sent in coalesced mode, and the reads they answered: the ratio is the
    /// mean batch size.
    pub coalesced_statements: u64,
    /// See `coalesced_statements`.
    pub coalesced_reads: u64,
    /// Where the reads went: leases per database, and replica statements re-run on the primary.
    pub leases: Vec<LeaseCount>,
}

/// Why the service is not ready to serve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the database does not answer: {0}")]
pub struct NotReady(pub String);

impl Service {
    /// Builds the service over a pool and a client (which tests build themselves).
    ///
    /// # Errors
    ///
    /// [`ConfigError`] when a setting is out of range or the database gate would be larger than
    /// the pool.
    pub fn new(
        db: Database,
        client: RecommendationClient,
        config: ServiceConfig,
    ) -> Result<Self, ConfigError> {
        config.validate(db.status().max_size)?;
        let gate = DbGate::new(config.db_concurrency, config.db_slot_wait, db.lanes());
        let batch_slots = Arc::new(tokio::sync::Semaphore::new(
            (config.db_concurrency / 2).max(1),
        ));
        let coalescer = coalesce::Coalescer::new(db.lanes());
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                client,
                gate,
                batch_slots,
                coalescer,
                config,
            }),
        })
    }

    /// Builds the pool, the recommendation client and the service from settings, split into
    /// `workers` lanes (one per worker thread of the server; see the `lanes` crate). Connects
    /// nothing yet: see [`Service::wait_until_ready`].
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the first unusable setting, of any of the three sections.
    pub fn connect(
        database: &settings::DbConfig,
        recommendations: settings::ClientConfig,
        config: ServiceConfig,
        workers: usize,
    ) -> Result<Self, ConfigError> {
        let db = Database::connect_lazy_in_lanes(database, workers)
            .map_err(|e| ConfigError(e.to_string()))?;
        let client = RecommendationClient::in_lanes(recommendations, workers)
            .map_err(|e| ConfigError(format!("invalid [recommendations] settings: {e}")))?;
        Self::new(db, client, config)
    }

    /// The settings the service runs with.
    pub fn config(&self) -> &ServiceConfig {
        &self.inner.config
    }

    /// Retries the database with exponential backoff (100 ms doubling to 2 s) until it answers or
    /// `within` passes; then lets go of the connection it used, which was opened on the calling
    /// thread rather than a worker's.
    ///
    /// # Errors
    ///
    /// [`NotReady`] with the last error, once `within` has passed.
    pub async fn wait_until_ready(&self, within: Duration) -> Result<(), NotReady> {
        let give_up = Instant::now() + within;
        let mut backoff = Duration::from_millis(100);
        loop {
            // Replicas checked first, so that the reads use them from the first request.
            self.inner.db.check_replicas().await;
            let ping = tokio::time::timeout_at(give_up, self.inner.db.ping()).await;
            let ping = ping.unwrap_or_else(|_| {
                Err(repository::Error::Unavailable(format!(
                    "no answer within {within:?}"
                )))
            });
            match ping {
                Ok(()) => {
                    self.inner.db.close_idle();
                    return Ok(());
                }
                Err(error) if Instant::now() + backoff < give_up => {
                    tracing::warn!(%error, retry_in = ?backoff, "database not answering yet");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(error) => return Err(NotReady(error.to_string())),
            }
        }
    }

    /// Whether the service can serve: a database that reads can use answers within `within`
    /// (the primary, or a replica recent enough), asked on a session of its own, apart from the
    /// pool, so that an instance whose connections are all busy serving is still ready (taking
    /// a loaded instance out of a load balancer would only push its load onto the others).
    /// Returns what each database looks like, for the readiness report.
    ///
    /// # Errors
    ///
    /// [`NotReady`] saying why (for the log; the message may quote the server).
    pub async fn readiness(&self, within: Duration) -> Result<Vec<DatabaseState>, NotReady> {
        let states = self.inner.db.states(within).await;
        if states.iter().any(|state| state.reach == Reach::Up) {
            return Ok(states);
        }
        let why: Vec<String> = states
            .iter()
            .map(|state| {
                let error = state.error.as_deref().unwrap_or("not usable");
                format!("{}: {error}", state.name)
            })
            .collect();
        Err(NotReady(why.join("; ")))
    }

    /// A snapshot of the gauges.
    pub fn gauges(&self) -> Gauges {
        let pool = self.inner.db.status();
        let stats = self.inner.client.stats();
        Gauges {
            pool_max: pool.max_size,
            pool_size: pool.size,
            pool_idle: pool.idle,
            pool_waiting: pool.waiting,
            lanes: self.inner.db.lanes(),
            pool_closed: self.inner.db.is_closed(),
            slots: self.inner.gate.slots(),
            slots_in_use: self.inner.gate.in_use(),
            live_children: taskgroup::live_children(),
            breaker: stats.breaker.state,
            breaker_failures: stats.breaker.consecutive_failures,
            recommendation_calls: stats.calls,
            recommendation_errors: stats
                .errors
                .iter()
                .map(|(kind, count)| (source::recommendation_kind(kind), count))
                .collect(),
            coalesced_statements: self
                .inner
                .coalescer
                .counts
                .statements
                .load(std::sync::atomic::Ordering::Relaxed),
            coalesced_reads: self
                .inner
                .coalescer
                .counts
                .reads
                .load(std::sync::atomic::Ordering::Relaxed),
            leases: self.inner.db.lease_counts(),
        }
    }

    /// Closes the pool: the server has stopped.
    pub fn close(&self) {
        self.inner.db.close();
    }

    /// Makes the calling thread the home of lane `worker` of the pool and of the recommendation
    /// client: a server with one single-threaded runtime per worker calls this once on each
    /// worker thread, so that a request's statements and calls are driven by its own thread,
    /// without cross-thread wake-ups. The database gate is split into the same lanes and still
    /// bounds the whole process (see the `gate` module).
    pub fn adopt_worker_thread(&self, worker: usize) {
        self.inner.db.adopt_thread(worker);
    }

    /// Tells the pool that the calling worker thread is now running on the runtime that serves
    /// its requests; cheap, meant for every accepted connection.
    pub fn worker_serving(&self) {
        self.inner.db.claim_home();
    }
}
