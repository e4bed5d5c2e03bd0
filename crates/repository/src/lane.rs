//! Lanes: one pool per worker thread, so a request's statements never cross threads.
//!
//! A tokio-postgres connection is a client handle plus a driver task, and the driver task runs on
//! the runtime that opened the connection. Under a server with one single-threaded runtime per
//! worker (actix-web's model), a request on worker A that borrows a connection opened on worker
//! B hands every statement to B's thread and gets every answer back from it: two cross-thread
//! wake-ups (an `eventfd` write and a context switch each) per round trip. Measured on the
//! dashboard before lanes: 3.8 such wake-ups among about 12 system calls per request.
//!
//! A [`Database`](crate::Database) built with several lanes keeps one pool per lane, each
//! `max_size / lanes` connections. A worker thread that called
//! [`Database::adopt_thread`](crate::Database::adopt_thread) becomes its lane's home: it takes
//! connections from that lane, and (from its first request for one, or
//! [`Database::claim_home`](crate::Database::claim_home)) every connection of that lane is opened
//! on its runtime, even when another thread asked for it, so the driver task lives there.
//!
//! Which lane a caller takes from: [`Database::conn_in_lane`](crate::Database::conn_in_lane) is
//! for a caller that splits its own limit the same way (the service's database gate, which lends
//! a free slot of another lane rather than make a caller wait); [`Database::conn`](crate::Database::conn)
//! takes from the caller's lane when it has something free, else an idle connection of another
//! lane, else waits on its own lane.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::ThreadId;

use deadpool_postgres::Connect;
use futures::future::BoxFuture;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, Config, NoTls};

thread_local! {
    static BOUND: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Threads that never called [`bind_thread`] spread over the lanes in turn.
static NEXT_UNBOUND: AtomicUsize = AtomicUsize::new(0);

/// Binds the calling thread to lane `worker % lanes` of every [`Database`](crate::Database) it
/// uses, without making it any lane's home (see
/// [`Database::adopt_thread`](crate::Database::adopt_thread), which calls this).
pub fn bind_thread(worker: usize) {
    BOUND.with(|bound| bound.set(Some(worker)));
}

/// The worker index the calling thread was bound to, if any.
pub(crate) fn bound() -> Option<usize> {
    BOUND.with(Cell::get)
}

/// The lane the calling thread uses, out of `lanes`: its worker index modulo `lanes` if it is
/// bound, else the next lane in turn.
pub fn current(lanes: usize) -> usize {
    if lanes <= 1 {
        return 0;
    }
    let index = BOUND
        .with(Cell::get)
        .unwrap_or_else(|| NEXT_UNBOUND.fetch_add(1, Ordering::Relaxed));
    index % lanes
}

/// How many of `total` connections (or slots) lane `lane` of `lanes` gets: an even split, the
/// remainder going to the first lanes. Monotone in `total`: a smaller total never gives a lane
/// more.
pub fn share(total: usize, lanes: usize, lane: usize) -> usize {
    total / lanes + usize::from(lane < total % lanes)
}

/// The runtime (and thread) where a lane's connections are opened and driven.
#[derive(Debug)]
pub(crate) struct Home {
    handle: Handle,
    thread: ThreadId,
}

impl Home {
    pub(crate) fn of_current_thread() -> Option<Self> {
        Some(Self {
            handle: Handle::try_current().ok()?,
            thread: std::thread::current().id(),
        })
    }
}

/// Opens a lane's connections on the lane's home runtime once it has one, on the caller's
/// runtime before (start-up checks) or if the home runtime is gone.
#[derive(Debug, Default)]
pub(crate) struct HomeConnect {
    pub(crate) home: Arc<OnceLock<Home>>,
}

impl Connect for HomeConnect {
    fn connect(
        &self,
        pg_config: &Config,
    ) -> BoxFuture<'_, Result<(Client, JoinHandle<()>), tokio_postgres::Error>> {
        let config = pg_config.clone();
        let home = self
            .home
            .get()
            .filter(|home| home.thread != std::thread::current().id())
            .map(|home| home.handle.clone());
        Box::pin(async move {
            if let Some(handle) = home {
                // A task on the home runtime opens the socket there (registering it with that
                // runtime's reactor) and spawns the driver there.
                if let Ok(opened) = handle.spawn(open(config.clone())).await {
                    return opened;
                }
                // The home runtime shut down (the server is stopping): open it here.
            }
            open(config).await
        })
    }
}

/// Opens one connection and spawns its driver task on the current runtime.
async fn open(config: Config) -> Result<(Client, JoinHandle<()>), tokio_postgres::Error> {
    let (client, connection) = config.connect(NoTls).await?;
    let driver = tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "pooled database connection ended");
        }
    });
    Ok((client, driver))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_to_the_total() {
        for total in 1..40 {
            for lanes in 1..=total.min(8) {
                let shares: Vec<usize> = (0..lanes).map(|lane| share(total, lanes, lane)).collect();
                assert_eq!(shares.iter().sum::<usize>(), total, "{total} over {lanes}");
                assert!(shares.iter().all(|&s| s >= 1));
                let (min, max) = (shares.iter().min(), shares.iter().max());
                assert!(max.zip(min).is_some_and(|(max, min)| max - min <= 1));
            }
        }
    }

    #[test]
    fn a_bound_thread_keeps_its_lane() {
        std::thread::spawn(|| {
            bind_thread(5);
            assert_eq!(current(2), 1);
            assert_eq!(current(2), 1);
            assert_eq!(current(3), 2);
            assert_eq!(current(1), 0);
        })
        .join()
        .unwrap_or_else(|_| panic!("the test thread panicked"));
    }

    #[test]
    fn unbound_threads_take_the_lanes_in_turn() {
        // No other test of this binary takes unbound turns, so the counter moves only here.
        let lanes: Vec<usize> = (0..6).map(|_| current(3)).collect();
        for lane in 0..3 {
            assert_eq!(lanes.iter().filter(|&&l| l == lane).count(), 2, "{lanes:?}");
        }
    }
}
