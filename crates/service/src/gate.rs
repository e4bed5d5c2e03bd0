//! The process-wide limit on database work.
//!
//! The seed creates `asyncio.Semaphore(10)` inside each request, which bounds nothing across
//! requests: a hundred concurrent dashboards make a thousand queries. Here one limit is shared by
//! every request of the process, sized no larger than the pool, so a slot always stands for a
//! pooled connection that is free or about to be. A caller that cannot get a slot within its wait
//! budget reports the database busy instead of queueing without bound.
//!
//! When the pool is split into lanes, one per worker thread (see the `lanes` crate), the slots
//! are split the same way: lane `i` has as many slots as connections or fewer, and a slot of lane
//! `i` is used with a connection of lane `i`. A caller takes a slot of its own lane if one is free
//! (no thread but its own is involved), else a free slot of another lane (that request's
//! statements then cross threads, but it does not wait while a slot is free), and only when
//! every slot is taken waits for its own lane. The total is still the configured limit, and an
//! unevenly loaded server can still use all of it.

use std::sync::Arc;
use std::time::Duration;

use repository::{Conn, Database};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::SourceError;

/// Database slots shared by every request of the process.
#[derive(Debug, Clone)]
pub(crate) struct DbGate {
    /// One semaphore per lane; together they hold `slots` permits.
    lanes: Arc<[Arc<Semaphore>]>,
    slots: usize,
    wait: Duration,
}

/// A pooled connection together with the slot it occupies. The connection holds the slot, so the
/// slot is released only when the connection is (after it settles, if a statement on it was
/// abandoned), and the next slot holder finds a connection free.
#[derive(Debug)]
pub(crate) struct Lease {
    pub(crate) conn: Conn,
    /// In coalesced mode, a lone dashboard's hold on its lane's round, given back after the
    /// connection (fields drop in order).
    pub(crate) round: Option<crate::coalesce::Solo>,
}

impl DbGate {
    /// `slots` slots split over `lanes` lanes (at most one lane per slot).
    pub(crate) fn new(slots: usize, wait: Duration, lanes: usize) -> Self {
        let count = lanes.clamp(1, slots.max(1));
        let lanes = (0..count)
            .map(|lane| Arc::new(Semaphore::new(lanes::share(slots, count, lane))))
            .collect();
        Self { lanes, slots, wait }
    }

    /// Waits for a slot (at most the configured wait, and never past `deadline`), then takes a
    /// pooled connection of the slot's lane.
    pub(crate) async fn lease(
        &self,
        db: &Database,
        deadline: Option<Instant>,
    ) -> Result<Lease, SourceError> {
        let now = Instant::now();
        let budget = deadline.map_or(self.wait, |deadline| {
            self.wait.min(deadline.saturating_duration_since(now))
        });
        let (lane, permit) = match self.try_any() {
            Some(taken) => taken,
            None => {
                let own = lanes::current(self.lanes.len());
                let semaphore = Arc::clone(&self.lanes[own]);
                let permit = tokio::time::timeout_at(now + budget, semaphore.acquire_owned())
                    .await
                    .map_err(|_| SourceError::Busy(budget))?
                    // The semaphores are never closed.
                    .map_err(|_| SourceError::Database(repository::Error::Closed))?;
                (own, permit)
            }
        };
        let mut conn = db.conn_in_lane(lane).await?;
        conn.hold(permit);
        Ok(Lease { conn, round: None })
    }

    /// A free slot without waiting: of the calling thread's own lane first, then of any other.
    /// (A lane's connections are opened on its own worker's runtime whoever asks, so borrowing
    /// another lane's slot never leaves a connection driven by the wrong thread.)
    fn try_any(&self) -> Option<(usize, OwnedSemaphorePermit)> {
        let count = self.lanes.len();
        let own = lanes::current(count);
        (0..count)
            .map(|offset| (own + offset) % count)
            .find_map(|lane| {
                Arc::clone(&self.lanes[lane])
                    .try_acquire_owned()
                    .ok()
                    .map(|permit| (lane, permit))
            })
    }

    /// Slots in use right now.
    pub(crate) fn in_use(&self) -> usize {
        let free: usize = self.lanes.iter().map(|s| s.available_permits()).sum();
        self.slots - free
    }

    /// The number of slots.
    pub(crate) fn slots(&self) -> usize {
        self.slots
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_hold_exactly_the_configured_slots() {
        for (slots, lanes, expected_lanes) in [(20, 2, 2), (5, 3, 3), (1, 4, 1), (3, 8, 3)] {
            let gate = DbGate::new(slots, Duration::from_secs(1), lanes);
            assert_eq!(gate.lanes.len(), expected_lanes);
            let total: usize = gate.lanes.iter().map(|s| s.available_permits()).sum();
            assert_eq!(total, slots);
            assert_eq!(gate.in_use(), 0);
        }
    }

    #[test]
    fn a_caller_takes_its_own_lane_first_then_any_free_slot() {
        let gate = DbGate::new(3, Duration::from_secs(1), 2);
        lanes::bind_thread(1);
        let taken: Vec<_> = (0..3).filter_map(|_| gate.try_any()).collect();
        let lanes: Vec<usize> = taken.iter().map(|(lane, _)| *lane).collect();
        // Lane 1 has one of the three slots, lane 0 two.
        assert_eq!(lanes, [1, 0, 0]);
        assert_eq!(gate.in_use(), 3);
        assert!(gate.try_any().is_none());
        drop(taken);
        assert_eq!(gate.in_use(), 0);
    }
}
