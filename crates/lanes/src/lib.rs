//! Lanes: one share of every per-process resource per worker thread, so a request's work stays on
//! the thread that serves it.
//!
//! Under a server with one single-threaded runtime per worker (actix-web's model), a connection is
//! driven by the runtime that opened it: a request on worker A that uses a connection opened on
//! worker B hands every round trip to B's thread and back, two cross-thread wake-ups each. So the
//! database pool, the recommendation client's connection pool and the database gate are each
//! split into lanes, one per worker, and a worker uses its own. This crate is the one place that
//! says which lane the calling thread is in and how a total is split; `repository`, `client` and
//! `service` all ask it, so a worker bound once is in the same lane everywhere.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

thread_local! {
    static BOUND: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Threads that were never bound spread over the lanes in turn.
static NEXT_UNBOUND: AtomicUsize = AtomicUsize::new(0);

/// Binds the calling thread to worker index `worker`: lane `worker % lanes` of everything split
/// into lanes. Call it once on each worker thread, with the worker's index (0, 1, 2, ...).
pub fn bind_thread(worker: usize) {
    BOUND.with(|bound| bound.set(Some(worker)));
}

/// The worker index the calling thread was bound to, if any.
pub fn bound() -> Option<usize> {
    BOUND.with(Cell::get)
}

/// The lane the calling thread uses, out of `lanes`: its worker index modulo `lanes` if it is
/// bound, else the next lane in turn.
///
/// ```
/// std::thread::spawn(|| {
///     lanes::bind_thread(3);
///     assert_eq!(lanes::current(2), 1);
///     assert_eq!(lanes::current(4), 3);
///     assert_eq!(lanes::current(1), 0);
/// })
/// .join()
/// .unwrap();
/// ```
pub fn current(lanes: usize) -> usize {
    if lanes <= 1 {
        return 0;
    }
    let index = bound().unwrap_or_else(|| NEXT_UNBOUND.fetch_add(1, Ordering::Relaxed));
    index % lanes
}

/// How many of `total` (connections, slots) lane `lane` of `lanes` gets: an even split, the
/// remainder going to the first lanes. Monotone in `total`: a smaller total never gives a lane
/// more.
///
/// ```
/// let shares: Vec<usize> = (0..3).map(|lane| lanes::share(20, 3, lane)).collect();
/// assert_eq!(shares, [7, 7, 6]);
/// ```
pub fn share(total: usize, lanes: usize, lane: usize) -> usize {
    total / lanes + usize::from(lane < total % lanes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_to_the_total_and_never_grow_when_it_shrinks() {
        for lanes in 1..6 {
            for total in 0..40 {
                let shares: Vec<usize> = (0..lanes).map(|lane| share(total, lanes, lane)).collect();
                assert_eq!(shares.iter().sum::<usize>(), total);
                if total > 0 {
                    for (lane, &now) in shares.iter().enumerate() {
                        assert!(share(total - 1, lanes, lane) <= now);
                    }
                }
            }
        }
    }

    #[test]
    fn unbound_threads_take_turns() {
        std::thread::spawn(|| {
            let first = current(2);
            let second = current(2);
            assert_ne!(first, second);
        })
        .join()
        .unwrap_or_else(|_| panic!("the test thread panicked"));
    }
}
