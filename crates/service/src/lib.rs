//! Dashboard and batch orchestration: the seed's service layer (服务层), in task groups.
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
//! request as the seed's semaphore did.

mod batch;
mod config;
mod dashboard;
mod gate;
mod source;

use std::sync::Arc;

use client::RecommendationClient;
use repository::Database;

pub use batch::{BatchError, BatchFailure, BatchSummary, UserSummaryEntry};
pub use config::{BatchConfig, ConfigError, DashboardConfig, QueryMode, ServiceConfig};
pub use dashboard::{Dashboard, DashboardError};
pub use source::{Source, SourceError, SourceFailure, SourceStatus, SourceTiming};

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
    config: ServiceConfig,
}

/// Database slot usage, for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateStats {
    /// Slots in use now.
    pub in_use: usize,
    /// Slots in all.
    pub slots: usize,
}

impl Service {
    /// Builds the service over a pool and a client.
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
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                client,
                gate,
                batch_slots,
                config,
            }),
        })
    }

    /// The database pool.
    pub fn database(&self) -> &Database {
        &self.inner.db
    }

    /// The recommendation client.
    pub fn recommendations_client(&self) -> &RecommendationClient {
        &self.inner.client
    }

    /// The settings the service runs with.
    pub fn config(&self) -> &ServiceConfig {
        &self.inner.config
    }

    /// Makes the calling thread the home of lane `worker` of the pool and of the recommendation
    /// client (see [`repository::lane`] and [`client::lane`]): a server with one single-threaded
    /// runtime per worker calls this once on each worker thread, so that a request's statements
    /// and calls are driven by its own thread, without cross-thread wake-ups. The database gate is
    /// split into the same lanes and still bounds the whole process (see the `gate` module).
    pub fn adopt_worker_thread(&self, worker: usize) {
        self.inner.db.adopt_thread(worker);
        client::lane::bind_thread(worker);
    }

    /// Tells the pool that the calling worker thread is now running on the runtime that serves
    /// its requests (see [`Database::claim_home`]); cheap, meant for every accepted connection.
    pub fn worker_serving(&self) {
        self.inner.db.claim_home();
    }

    /// Database slots in use.
    pub fn gate_stats(&self) -> GateStats {
        GateStats {
            in_use: self.inner.gate.in_use(),
            slots: self.inner.gate.slots(),
        }
    }
}
