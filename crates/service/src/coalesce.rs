//! Coalesced reads: concurrent dashboards share statements, the way a DataLoader shares fetches.
//!
//! Each lane (worker thread) has one queue per source (profile, orders, reviews) and at most
//! [`ROUNDS_IN_FLIGHT`] round of statements in flight. A dashboard that finds its lane idle
//! takes the round and reads exactly as in per-request mode, its three statements pipelined on
//! a lease of its own ([`Lane::alone`]): at low load nothing is added, no timer, no extra task.
//! A dashboard that finds a round in flight puts its three reads in the queues at once and waits
//! for their rows. When the round ends, a driver task sends everything that gathered (up to
//! [`MAX_BATCH`] distinct ids per source) as up to three statements pipelined on one
//! connection: `= ANY($1)` for profiles and a `LATERAL` join for orders and reviews, so each
//! user keeps their own order and limit; a statement for one id is the per-request statement
//! itself. Duplicate ids share one read. The driver goes on while reads gather, and ends when
//! its queues are empty.
//!
//! Each read gets exactly the rows it would have got alone. A statement that fails fails each
//! of its reads with the same error. A read that stops waiting (its client left, its timeout or
//! the deadline passed) leaves the queue without disturbing the others, and a statement whose
//! every read has left is dropped, which cancels it on the server (see the repository's
//! abandoned-statement handling). The driver is a plain task of the lane's runtime, not a child
//! of any request's group: it serves many requests, and ends when its queues are empty.
//!
//! Batches form per lane, not process-wide: the driver, its statements and the wake-ups of its
//! waiters stay on one thread (see the README's Performance section for the measurement).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use repository::{Conn, Order, Page, Profile, Review};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::{Service, SourceError};

/// Most distinct ids in one statement.
pub(crate) const MAX_BATCH: usize = 256;

/// Most rounds of statements in flight at once per lane. One, measured: with two, wrk at 64
/// connections saw p99 50 to 650 ms (p50 unchanged; cause not found), with one 5.4 ms, at about
/// 16 600 vs 18 600 dashboards/s. The price: a statement that hangs (a lock, a slow plan) holds
/// up its lane's other reads, which fail "busy" after `db_slot_wait` (see [`shed_stale`]), as
/// per-request dashboards do when every slot is taken.
pub(crate) const ROUNDS_IN_FLIGHT: usize = 1;

/// What one shared statement reads, per user.
pub(crate) trait Batched: Clone + Send + 'static {
    /// The rows of `ids` (distinct), paired with their ids; an id without rows may be absent.
    fn fetch(
        conn: &Conn,
        ids: &[i64],
    ) -> impl Future<Output = Result<Vec<(i64, Self)>, repository::Error>> + Send;

    /// What a user absent from the result has.
    fn absent() -> Self;
}

impl Batched for Option<Profile> {
    async fn fetch(conn: &Conn, ids: &[i64]) -> Result<Vec<(i64, Self)>, repository::Error> {
        if let [id] = ids {
            return Ok(vec![(*id, conn.profile(*id).await?)]);
        }
        let profiles = conn.profiles(ids).await?;
        Ok(profiles.into_iter().map(|p| (p.id, Some(p))).collect())
    }

    fn absent() -> Self {
        None
    }
}

impl Batched for Page<Order> {
    async fn fetch(conn: &Conn, ids: &[i64]) -> Result<Vec<(i64, Self)>, repository::Error> {
        if let [id] = ids {
            return Ok(vec![(*id, conn.orders(*id).await?)]);
        }
        conn.orders_of(ids).await
    }

    fn absent() -> Self {
        Page::default()
    }
}

impl Batched for Page<Review> {
    async fn fetch(conn: &Conn, ids: &[i64]) -> Result<Vec<(i64, Self)>, repository::Error> {
        if let [id] = ids {
            return Ok(vec![(*id, conn.reviews(*id).await?)]);
        }
        conn.reviews_of(ids).await
    }

    fn absent() -> Self {
        Page::default()
    }
}

type Reply<T> = oneshot::Sender<Result<T, SourceError>>;

/// A dashboard's three reads, waiting for their shared statements.
pub(crate) struct Waiting {
    pub(crate) profile: Answer<Option<Profile>>,
    pub(crate) orders: Answer<Page<Order>>,
    pub(crate) reviews: Answer<Page<Review>>,
}

/// One read's answer, to come.
pub(crate) struct Answer<T>(oneshot::Receiver<Result<T, SourceError>>);

impl<T> Answer<T> {
    /// Waits for the rows (bounded by the driver's lease wait and the statement's own limits;
    /// the caller's source timeout and the dashboard's deadline bound it as well).
    pub(crate) async fn get(self) -> Result<T, SourceError> {
        // The driver answers every read it takes, whatever happens to its statement; a driver
        // that panicked drops the sender, which reads as the database being unavailable.
        self.0.await.unwrap_or_else(|_| {
            Err(SourceError::Database(repository::Error::Unavailable(
                "the shared read ended without an answer".to_owned(),
            )))
        })
    }
}

/// One source's reads waiting in one lane.
struct Pending<T> {
    /// Ids in the order their first read arrived.
    order: Vec<i64>,
    /// Who waits for each id, in arrival order, and since when.
    waiting: HashMap<i64, Vec<(Instant, Reply<T>)>>,
}

impl<T> Default for Pending<T> {
    fn default() -> Self {
        Pending {
            order: Vec::new(),
            waiting: HashMap::new(),
        }
    }
}

impl<T> Pending<T> {
    fn push(&mut self, id: i64, now: Instant) -> Answer<T> {
        let (reply, answer) = oneshot::channel();
        let waiters = self.waiting.entry(id).or_default();
        if waiters.is_empty() {
            self.order.push(id);
        }
        waiters.push((now, reply));
        Answer(answer)
    }

    fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The next statement's ids (at most [`MAX_BATCH`], oldest first) and their waiters, without
    /// those that have left already.
    fn take(&mut self) -> Batch<T> {
        let take = self.order.len().min(MAX_BATCH);
        let mut batch: Vec<(i64, Vec<Reply<T>>)> = Vec::with_capacity(take);
        for id in self.order.drain(..take) {
            let waiters: Vec<Reply<T>> = self
                .waiting
                .remove(&id)
                .unwrap_or_default()
                .into_iter()
                .map(|(_, reply)| reply)
                .filter(|reply| !reply.is_closed())
                .collect();
            if !waiters.is_empty() {
                batch.push((id, waiters));
            }
        }
        Batch(batch)
    }

    /// Fails the reads queued at or before `cutoff` with `error`; returns when the oldest of
    /// those left was queued.
    fn shed(&mut self, cutoff: Instant, error: &SourceError) -> Option<Instant> {
        let waiting = &mut self.waiting;
        let mut oldest: Option<Instant> = None;
        self.order.retain(|id| {
            let Some(waiters) = waiting.get_mut(id) else {
                return false;
            };
            for (since, reply) in std::mem::take(waiters) {
                if since <= cutoff {
                    let _ = reply.send(Err(error.shared()));
                } else {
                    oldest = Some(oldest.map_or(since, |o| o.min(since)));
                    waiters.push((since, reply));
                }
            }
            if waiters.is_empty() {
                waiting.remove(id);
                false
            } else {
                true
            }
        });
        oldest
    }
}

/// The ids of one statement and who waits for each.
struct Batch<T>(Vec<(i64, Vec<Reply<T>>)>);

impl<T: Batched> Batch<T> {
    fn reads(&self) -> usize {
        self.0.iter().map(|(_, waiters)| waiters.len()).sum()
    }

    /// Runs the statement and answers every waiter; drops it (which cancels it on the server if
    /// it does not settle) as soon as every waiter has left.
    async fn serve(mut self, conn: &Conn) {
        if self.0.is_empty() {
            return;
        }
        let ids: Vec<i64> = self.0.iter().map(|(id, _)| *id).collect();
        let everyone_left = futures_util::future::join_all(
            self.0
                .iter_mut()
                .flat_map(|(_, waiters)| waiters.iter_mut().map(oneshot::Sender::closed)),
        );
        let fetched = tokio::select! {
            fetched = T::fetch(conn, &ids) => fetched,
            _ = everyone_left => return,
        };
        match fetched {
            Ok(rows) => {
                let mut rows: HashMap<i64, T> = rows.into_iter().collect();
                for (id, waiters) in self.0 {
                    let value = rows.remove(&id).unwrap_or_else(T::absent);
                    answer(waiters, || Ok(value.clone()));
                }
            }
            Err(error) => self.fail(&SourceError::Database(error)),
        }
    }

    fn fail(self, error: &SourceError) {
        for (_, waiters) in self.0 {
            answer(waiters, || Err(error.shared()));
        }
    }
}

fn answer<T>(waiters: Vec<Reply<T>>, value: impl Fn() -> Result<T, SourceError>) {
    for waiter in waiters {
        // A waiter that left meanwhile no longer listens; nothing to do.
        let _ = waiter.send(value());
    }
}

/// What waits in one lane.
#[derive(Default)]
struct Queues {
    /// How many of the lane's driver tasks run (at most [`ROUNDS_IN_FLIGHT`]).
    drivers: usize,
    /// Whether the lane's shedder task runs (see [`shed`]).
    shedding: bool,
    profiles: Pending<Option<Profile>>,
    orders: Pending<Page<Order>>,
    reviews: Pending<Page<Review>>,
}

/// The shared-read queues of one lane (worker thread).
pub(crate) struct Lane {
    queues: Mutex<Queues>,
    counts: Arc<Counts>,
}

/// Statements sent and reads answered by them, across every lane, for `/metrics`: their ratio
/// is the mean batch size.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    pub(crate) statements: AtomicU64,
    pub(crate) reads: AtomicU64,
}

impl Lane {
    /// Queues the three reads of `id`'s dashboard, all at once so that a lone dashboard's reads
    /// go out together, and starts a driver if fewer than [`ROUNDS_IN_FLIGHT`] run.
    pub(crate) fn read(self: &Arc<Self>, service: &Service, id: i64) -> Waiting {
        let now = Instant::now();
        let (waiting, start, shed) = {
            let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
            let waiting = Waiting {
                profile: queues.profiles.push(id, now),
                orders: queues.orders.push(id, now),
                reviews: queues.reviews.push(id, now),
            };
            let start = queues.drivers < ROUNDS_IN_FLIGHT;
            if start {
                queues.drivers += 1;
            }
            // Every driver busy: these reads wait for a round, at most `db_slot_wait`.
            let shed = !start && !std::mem::replace(&mut queues.shedding, true);
            (waiting, start, shed)
        };
        if start {
            tokio::spawn(drive(Arc::clone(self), service.clone()));
        }
        if shed {
            tokio::spawn(shed_stale(
                Arc::clone(self),
                now,
                service.inner.config.db_slot_wait,
            ));
        }
        waiting
    }
}

/// Fails the reads that waited for a round longer than `wait` with "busy", as a dashboard of
/// per-request mode fails when it waited that long for a slot: while the database stalls, every
/// round stays in flight, and without this the reads behind them would wait until their
/// timeouts. One timer per lane, armed only while reads wait behind busy drivers; it ends when
/// none are left.
async fn shed_stale(lane: Arc<Lane>, oldest: Instant, wait: Duration) {
    let busy = SourceError::Busy(wait);
    let mut next = oldest;
    loop {
        tokio::time::sleep_until(next + wait).await;
        let mut queues = lane.queues.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let cutoff = now.checked_sub(wait).unwrap_or(now);
        let left = [
            queues.reviews.shed(cutoff, &busy),
            queues.orders.shed(cutoff, &busy),
            queues.profiles.shed(cutoff, &busy),
        ]
        .into_iter()
        .flatten()
        .min();
        match left {
            Some(oldest) => next = oldest,
            None => {
                queues.shedding = false;
                return;
            }
        }
    }
}

/// A lone dashboard's hold on its lane's round: while it lasts, the lane's reads gather as
/// behind any round in flight; when it ends, a driver takes them (see [`Lane::alone`]).
pub(crate) struct Solo {
    lane: Arc<Lane>,
    service: Service,
}

impl std::fmt::Debug for Solo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Solo")
    }
}

impl Lane {
    /// If the lane is idle, the caller's dashboard takes its round and reads as in per-request
    /// mode, on a lease of its own: at low load a dashboard then costs what it costs without
    /// coalescing (no driver task, no hand-over of rows). Dashboards that arrive meanwhile
    /// gather, and go out together when the returned hold is dropped with the lease.
    pub(crate) fn alone(self: &Arc<Self>, service: &Service) -> Option<Solo> {
        let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        (queues.drivers == 0).then(|| {
            queues.drivers = 1;
            Solo {
                lane: Arc::clone(self),
                service: service.clone(),
            }
        })
    }
}

impl Drop for Solo {
    fn drop(&mut self) {
        let mut queues = self
            .lane
            .queues
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let idle =
            queues.profiles.is_empty() && queues.orders.is_empty() && queues.reviews.is_empty();
        match tokio::runtime::Handle::try_current() {
            // The round passes to a driver for what gathered.
            Ok(runtime) if !idle => {
                drop(queues);
                runtime.spawn(drive(Arc::clone(&self.lane), self.service.clone()));
            }
            _ => queues.drivers -= 1,
        }
    }
}

/// Sends the lane's reads until none wait: each round, everything that gathered (up to
/// [`MAX_BATCH`] ids per source) as up to three statements pipelined on one connection.
async fn drive(lane: Arc<Lane>, service: Service) {
    let mut running = Running {
        lane: &lane,
        ended: false,
    };
    loop {
        let (profiles, orders, reviews) = {
            let mut queues = lane.queues.lock().unwrap_or_else(PoisonError::into_inner);
            if queues.profiles.is_empty() && queues.orders.is_empty() && queues.reviews.is_empty() {
                // Under the same lock as the check: a read queued after it starts a new driver.
                queues.drivers -= 1;
                running.ended = true;
                return;
            }
            (
                queues.profiles.take(),
                queues.orders.take(),
                queues.reviews.take(),
            )
        };
        let statements = [profiles.0.len(), orders.0.len(), reviews.0.len()]
            .iter()
            .filter(|n| **n > 0)
            .count();
        if statements == 0 {
            continue;
        }
        let counts = &lane.counts;
        counts
            .statements
            .fetch_add(statements as u64, Ordering::Relaxed);
        counts.reads.fetch_add(
            (profiles.reads() + orders.reads() + reviews.reads()) as u64,
            Ordering::Relaxed,
        );
        // The profile is answered last: a failed profile cancels its dashboard's other sources,
        // which should have their own answers by then (so that a failure of all three reads
        // shows as three failures, as in per-request mode, not as one and two cancellations).
        match service.inner.gate.lease(&service.inner.db, None).await {
            Ok(lease) => {
                tokio::join!(
                    reviews.serve(&lease.conn),
                    orders.serve(&lease.conn),
                    profiles.serve(&lease.conn)
                );
            }
            Err(error) => {
                reviews.fail(&error);
                orders.fail(&error);
                profiles.fail(&error);
            }
        }
    }
}

/// A driver that ends any other way than by finding its queues empty (a panic, its runtime
/// shutting down) gives its place back, so the lane is not left without drivers.
struct Running<'a> {
    lane: &'a Lane,
    ended: bool,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if !self.ended {
            let mut queues = self
                .lane
                .queues
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            queues.drivers -= 1;
        }
    }
}

/// Every lane's queues.
pub(crate) struct Coalescer {
    lanes: Box<[Arc<Lane>]>,
    pub(crate) counts: Arc<Counts>,
}

impl std::fmt::Debug for Coalescer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescer")
            .field("lanes", &self.lanes.len())
            .finish()
    }
}

impl Coalescer {
    pub(crate) fn new(lanes: usize) -> Self {
        let counts = Arc::new(Counts::default());
        Coalescer {
            lanes: (0..lanes.max(1))
                .map(|_| {
                    Arc::new(Lane {
                        queues: Mutex::default(),
                        counts: Arc::clone(&counts),
                    })
                })
                .collect(),
            counts,
        }
    }

    /// The calling thread's lane.
    pub(crate) fn lane(&self) -> &Arc<Lane> {
        &self.lanes[lanes::current(self.lanes.len())]
    }
}
