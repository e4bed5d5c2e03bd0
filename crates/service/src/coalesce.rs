//! Coalesced reads: concurrent dashboards share statements, the way a DataLoader shares fetches.
//!
//! Per lane (worker thread) and per source (profile, orders, reviews) there is one queue. A read
//! joins its queue and waits for its rows. If no statement of that queue is in flight, the read
//! starts a driver task at once, so a lone read goes straight out: no timer, no added wait at low
//! load. While a statement is in flight, the reads that arrive gather; when it completes, the
//! driver sends all of them (up to [`MAX_BATCH`] distinct ids) as one statement, `= ANY($1)` for
//! profiles and a `LATERAL` join for orders and reviews, so each user keeps their own order and
//! limit. Duplicate ids share one read.
//!
//! Each read gets exactly the rows it would have got alone. A statement that fails fails each
//! of its reads with the same error. A read that stops waiting (its client left, its timeout or
//! the deadline passed) leaves the queue without disturbing the others, and a statement whose
//! every read has left is dropped, which cancels it on the server (see the repository's
//! abandoned-statement handling). The driver is a plain task of the lane's runtime, not a child
//! of any request's group: it serves many requests, and ends when its queue is empty.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use repository::{Conn, Order, Page, Profile, Review};
use tokio::sync::oneshot;

use crate::{Service, SourceError};

/// Most distinct ids in one statement.
pub(crate) const MAX_BATCH: usize = 256;

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
        let profiles = conn.profiles(ids).await?;
        Ok(profiles.into_iter().map(|p| (p.id, Some(p))).collect())
    }

    fn absent() -> Self {
        None
    }
}

impl Batched for Page<Order> {
    fn fetch(
        conn: &Conn,
        ids: &[i64],
    ) -> impl Future<Output = Result<Vec<(i64, Self)>, repository::Error>> + Send {
        conn.orders_of(ids)
    }

    fn absent() -> Self {
        Page::default()
    }
}

impl Batched for Page<Review> {
    fn fetch(
        conn: &Conn,
        ids: &[i64],
    ) -> impl Future<Output = Result<Vec<(i64, Self)>, repository::Error>> + Send {
        conn.reviews_of(ids)
    }

    fn absent() -> Self {
        Page::default()
    }
}

type Reply<T> = oneshot::Sender<Result<T, SourceError>>;

/// One source's queue in one lane.
struct Queue<T> {
    /// Whether a driver task is running.
    driving: bool,
    /// Ids in arrival order, and who waits for each.
    order: Vec<i64>,
    waiting: HashMap<i64, Vec<Reply<T>>>,
}

pub(crate) struct Batcher<T> {
    queue: Mutex<Queue<T>>,
    counts: Arc<Counts>,
}

/// Statements sent and reads answered by them, across every queue, for `/metrics`: their ratio
/// is the mean batch size.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    pub(crate) statements: AtomicU64,
    pub(crate) reads: AtomicU64,
}

impl<T: Batched> Batcher<T> {
    fn new(counts: Arc<Counts>) -> Self {
        Batcher {
            queue: Mutex::new(Queue {
                driving: false,
                order: Vec::new(),
                waiting: HashMap::new(),
            }),
            counts,
        }
    }

    /// Reads `id`'s rows through the queue.
    pub(crate) async fn read(
        self: &Arc<Self>,
        service: &Service,
        id: i64,
    ) -> Result<T, SourceError> {
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
            let queue = &mut *queue;
            let waiters = queue.waiting.entry(id).or_default();
            if waiters.is_empty() {
                queue.order.push(id);
            }
            waiters.push(reply);
            !std::mem::replace(&mut queue.driving, true)
        };
        if start {
            tokio::spawn(drive(Arc::clone(self), service.clone()));
        }
        // The driver answers every read it takes, whatever happens to its statement; a driver
        // that panicked drops the sender, which reads as the database being unavailable.
        answer.await.unwrap_or_else(|_| {
            Err(SourceError::Database(repository::Error::Unavailable(
                "the shared read ended without an answer".to_owned(),
            )))
        })
    }
}

/// Sends the queue's reads, a batch at a time, until it is empty.
async fn drive<T: Batched>(batcher: Arc<Batcher<T>>, service: Service) {
    loop {
        let mut batch: Vec<(i64, Vec<Reply<T>>)> = {
            let mut queue = batcher.queue.lock().unwrap_or_else(PoisonError::into_inner);
            if queue.order.is_empty() {
                queue.driving = false;
                return;
            }
            let take = queue.order.len().min(MAX_BATCH);
            let ids: Vec<i64> = queue.order.drain(..take).collect();
            ids.into_iter()
                .map(|id| {
                    let waiters = queue.waiting.remove(&id).unwrap_or_default();
                    (id, waiters)
                })
                .collect()
        };
        // Reads whose waiters all left before the statement went out are not asked for.
        batch.retain_mut(|(_, waiters)| {
            waiters.retain(|w| !w.is_closed());
            !waiters.is_empty()
        });
        if batch.is_empty() {
            continue;
        }
        let ids: Vec<i64> = batch.iter().map(|(id, _)| *id).collect();
        let reads: usize = batch.iter().map(|(_, waiters)| waiters.len()).sum();
        batcher.counts.statements.fetch_add(1, Ordering::Relaxed);
        batcher
            .counts
            .reads
            .fetch_add(reads as u64, Ordering::Relaxed);
        let fetched = async {
            let lease = service.inner.gate.lease(&service.inner.db, None).await?;
            Ok::<_, SourceError>(T::fetch(&lease.conn, &ids).await?)
        };
        let everyone_left = futures_util::future::join_all(
            batch
                .iter_mut()
                .flat_map(|(_, waiters)| waiters.iter_mut().map(oneshot::Sender::closed)),
        );
        // A statement nobody waits for any more is dropped, which cancels it on the server.
        let fetched = tokio::select! {
            fetched = fetched => fetched,
            _ = everyone_left => continue,
        };
        match fetched {
            Ok(rows) => {
                let mut rows: HashMap<i64, T> = rows.into_iter().collect();
                for (id, waiters) in batch {
                    let value = rows.remove(&id).unwrap_or_else(T::absent);
                    answer(waiters, |_| Ok(value.clone()));
                }
            }
            Err(error) => {
                for (_, waiters) in batch {
                    answer(waiters, |_| Err(error.shared()));
                }
            }
        }
    }
}

fn answer<T>(waiters: Vec<Reply<T>>, value: impl Fn(usize) -> Result<T, SourceError>) {
    for (i, waiter) in waiters.into_iter().enumerate() {
        // A waiter that left meanwhile no longer listens; nothing to do.
        let _ = waiter.send(value(i));
    }
}

/// The queues of one lane.
pub(crate) struct Lane {
    pub(crate) profiles: Arc<Batcher<Option<Profile>>>,
    pub(crate) orders: Arc<Batcher<Page<Order>>>,
    pub(crate) reviews: Arc<Batcher<Page<Review>>>,
}

/// Every lane's queues.
pub(crate) struct Coalescer {
    lanes: Box<[Lane]>,
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
                .map(|_| Lane {
                    profiles: Arc::new(Batcher::new(Arc::clone(&counts))),
                    orders: Arc::new(Batcher::new(Arc::clone(&counts))),
                    reviews: Arc::new(Batcher::new(Arc::clone(&counts))),
                })
                .collect(),
            counts,
        }
    }

    /// The calling thread's lane.
    pub(crate) fn lane(&self) -> &Lane {
        &self.lanes[lanes::current(self.lanes.len())]
    }
}
