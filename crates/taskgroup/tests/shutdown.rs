//! Groups whose tokio runtime shuts down under them: tokio drops every task without the group
//! asking, and drops a future spawned afterwards on the spot.
//!
//! Each test keeps the group outside the runtime, so that the runtime's shutdown (not the group's
//! `Drop`) is what drops the children, whatever order tokio drops its tasks in. The tests share
//! the process-wide live-children gauge, so they take a common lock and never overlap.
#![allow(clippy::unwrap_used)] // The helpers below are test support outside any #[test].

use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::FutureExt;
use taskgroup::{CancelReason, GroupErrorKind, Outcome, Spawner, Stats, TaskGroup, live_children};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Enough queued children that starting each from the previous one's drop, recursively, overflows
/// a test thread's stack, as it did before the group treated a runtime shutdown as a stop.
const QUEUED: usize = 20_000;

async fn sleep_an_hour() -> Result<(), String> {
    tokio::time::sleep(Duration::from_secs(3600)).await;
    Ok(())
}

/// Builds a limited group on `runtime` holding `QUEUED` children that would sleep for an hour,
/// lets the first ones start, shuts the runtime down, and checks that every child was dropped
/// and reported as cancelled by the shutdown.
fn shut_down_under_a_long_queue(runtime: tokio::runtime::Runtime, limit: usize) {
    let before = live_children();
    let group = runtime.block_on(async {
        let group = TaskGroup::<String>::builder().limit(limit).build().unwrap();
        for i in 0..QUEUED {
            group.spawn(format!("c{i}"), sleep_an_hour());
        }
        tokio::task::yield_now().await;
        assert_eq!(group.stats().queued, QUEUED - limit);
        group
    });
    drop(runtime);

    // Every child is gone, so `join` is ready at once, without a runtime.
    let error = group
        .join()
        .now_or_never()
        .expect("join is ready once every child is gone")
        .unwrap_err();
    assert_eq!(
        error.kind(),
        &GroupErrorKind::Cancelled(CancelReason::RuntimeShutdown)
    );
    assert_eq!(error.report().len(), QUEUED);
    assert!(error.report().iter().all(|child| matches!(
        child.outcome,
        Outcome::Cancelled(CancelReason::RuntimeShutdown)
    )));
    assert_eq!(live_children(), before);
}

#[test]
fn a_runtime_shutdown_discards_a_long_queue_without_recursing_current_thread() {
    let _serial = serial();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    shut_down_under_a_long_queue(runtime, 1);
}

#[test]
fn a_runtime_shutdown_discards_a_long_queue_without_recursing_multi_thread() {
    let _serial = serial();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    shut_down_under_a_long_queue(runtime, 20);
}

/// Calls back into its group when dropped, as a child's future or output may: a destructor that
/// ran under one of the group's locks would deadlock here.
struct CallsBack {
    spawner: Spawner<String>,
    seen: Arc<Mutex<Option<Stats>>>,
}

impl Drop for CallsBack {
    fn drop(&mut self) {
        *self.seen.lock().unwrap() = Some(self.spawner.stats());
    }
}

/// Runs `test` on its own thread and fails if it has not returned within a bound far above what it
/// needs, so that a deadlock fails the test instead of hanging it.
fn without_deadlock(test: impl FnOnce() + Send + 'static) {
    let (done, finished) = mpsc::channel();
    let thread = std::thread::spawn(move || {
        test();
        let _ = done.send(());
    });
    match finished.recv_timeout(Duration::from_secs(30)) {
        Ok(()) => thread.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            // The test panicked: report its panic.
            if let Err(panic) = thread.join() {
                std::panic::resume_unwind(panic);
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("deadlocked: a destructor ran under a lock"),
    }
}

#[test]
fn a_child_spawned_after_the_runtime_shut_down_is_dropped_outside_the_groups_lock() {
    let _serial = serial();
    let before = live_children();
    without_deadlock(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let group = runtime.block_on(async { TaskGroup::<String>::new().unwrap() });
        drop(runtime);

        // tokio drops a future spawned on a shut-down runtime on the spot, inside the spawn.
        let seen = Arc::new(Mutex::new(None));
        let calls_back = CallsBack {
            spawner: group.spawner(),
            seen: Arc::clone(&seen),
        };
        let late = group.spawn("late", async move {
            let _calls_back = calls_back;
            Ok(())
        });
        assert_eq!(seen.lock().unwrap().map(|stats| stats.spawned), Some(1));
        assert_eq!(
            late.output().unwrap_err().kind,
            taskgroup::ChildErrorKind::Cancelled(CancelReason::RuntimeShutdown)
        );
        let error = group.join().now_or_never().unwrap().unwrap_err();
        assert_eq!(
            error.kind(),
            &GroupErrorKind::Cancelled(CancelReason::RuntimeShutdown)
        );
    });
    assert_eq!(live_children(), before);
}
