//! The process-wide limit on database work.
//!
//! The seed creates `asyncio.Semaphore(10)` inside each request, which bounds nothing across
//! requests: a hundred concurrent dashboards make a thousand queries. Here one semaphore is shared
//! by every request of the process, sized no larger than the pool, so a slot always stands for a
//! pooled connection that is free or about to be. A caller that cannot get a slot within its wait
//! budget reports the database busy instead of queueing without bound.

use std::sync::Arc;
use std::time::Duration;

use repository::{Conn, Database};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::SourceError;

/// Database slots shared by every request of the process.
#[derive(Debug, Clone)]
pub(crate) struct DbGate {
    semaphore: Arc<Semaphore>,
    slots: usize,
    wait: Duration,
}

/// A pooled connection together with the slot it occupies. The connection holds the slot, so the
/// slot is released only when the connection is (after it settles, if a statement on it was
/// abandoned), and the next slot holder finds a connection free.
#[derive(Debug)]
pub(crate) struct Lease {
    pub(crate) conn: Conn,
}

impl DbGate {
    pub(crate) fn new(slots: usize, wait: Duration) -> Self {
        Self {
            semaphore: Arc::new(Semaphore::new(slots)),
            slots,
            wait,
        }
    }

    /// Waits for a slot (at most the configured wait, and never past `deadline`), then takes a
    /// pooled connection.
    pub(crate) async fn lease(
        &self,
        db: &Database,
        deadline: Option<Instant>,
    ) -> Result<Lease, SourceError> {
        let now = Instant::now();
        let budget = deadline.map_or(self.wait, |deadline| {
            self.wait.min(deadline.saturating_duration_since(now))
        });
        let permit =
            tokio::time::timeout_at(now + budget, Arc::clone(&self.semaphore).acquire_owned())
                .await
                .map_err(|_| SourceError::Busy(budget))?
                // The semaphore is never closed; a closed one means the service is shutting down.
                .map_err(|_| SourceError::Database(repository::Error::Closed))?;
        let mut conn = db.conn().await?;
        conn.hold(permit);
        Ok(Lease { conn })
    }

    /// Slots in use right now.
    pub(crate) fn in_use(&self) -> usize {
        self.slots - self.semaphore.available_permits()
    }

    /// The number of slots.
    pub(crate) fn slots(&self) -> usize {
        self.slots
    }
}
