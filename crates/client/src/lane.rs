//! Lanes: one connection pool per worker thread, so a call never crosses threads.
//!
//! hyper-util's pooled client runs each connection's driver task on the runtime that opened it.
//! Under a server with one single-threaded runtime per worker (actix-web's model), a call from
//! worker A on a connection opened by worker B sends the request through B's thread and gets the
//! answer back from it: two cross-thread wake-ups per call. A client built with
//! [`RecommendationClient::in_lanes`](crate::RecommendationClient::in_lanes) keeps one pool per
//! lane, and a worker thread that called [`bind_thread`] uses its own. The breaker, the counters
//! and the in-flight limit stay shared by the whole process.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

thread_local! {
    static BOUND: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Threads that never called [`bind_thread`] spread over the lanes in turn.
static NEXT_UNBOUND: AtomicUsize = AtomicUsize::new(0);

/// Binds the calling thread to lane `worker % lanes` of every client it uses. Call it once on
/// each worker thread, with the worker's index (0, 1, 2, ...).
pub fn bind_thread(worker: usize) {
    BOUND.with(|bound| bound.set(Some(worker)));
}

/// The lane the calling thread uses, out of `lanes`.
pub(crate) fn current(lanes: usize) -> usize {
    if lanes <= 1 {
        return 0;
    }
    let index = BOUND
        .with(Cell::get)
        .unwrap_or_else(|| NEXT_UNBOUND.fetch_add(1, Ordering::Relaxed));
    index % lanes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_thread_keeps_its_lane() {
        std::thread::spawn(|| {
            bind_thread(3);
            assert_eq!(current(2), 1);
            assert_eq!(current(2), 1);
            assert_eq!(current(4), 3);
            assert_eq!(current(1), 0);
        })
        .join()
        .unwrap_or_else(|_| panic!("the test thread panicked"));
    }
}
