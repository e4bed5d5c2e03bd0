//! "No child outlives the group" through nesting, drop and races: one test per way the promise
//! used to leak, named after the behaviour it pins down.
//!
//! Leaks are counted two ways: drop flags in the leaves (a leaf whose future has not been dropped
//! is alive), and the process-wide live-children gauge. The gauge is shared by every test of
//! this binary, so the tests take a common lock.
#![allow(clippy::unwrap_used)] // Test support outside any #[test] uses unwrap too.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use taskgroup::{
    CancelReason, ChildContext, ChildErrorKind, GroupErrorKind, Outcome, Policy, TaskGroup,
    live_children,
};
use tokio::time::{Instant, sleep};

/// Every test here takes this lock (the gauge is process-wide, and any test's children count in
/// it): async-aware, so a `#[tokio::test]` can hold it across awaits.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.blocking_lock()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Counts leaves alive: incremented when a leaf's future is built, decremented when it is
/// dropped (completed or aborted).
#[derive(Clone, Default)]
struct Alive(Arc<AtomicUsize>);

struct Leaf(Arc<AtomicUsize>);

impl Drop for Leaf {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Alive {
    fn leaf(&self) -> Leaf {
        self.0.fetch_add(1, Ordering::SeqCst);
        Leaf(Arc::clone(&self.0))
    }
    fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// An outer group whose child "middle" builds a group (without being told it is nested) with
/// `leaves` children that sleep for an hour, while its sibling "fails" fails after 10 ms. Returns
/// how many leaves were alive, and the gauge's excess, when the outer `join` returned.
async fn sibling_fails_while_a_nested_group_runs(leaves: usize) -> (usize, usize, usize) {
    let before = live_children();
    let alive = Alive::default();
    let outer = TaskGroup::<String>::new().unwrap();
    let started = Arc::new(AtomicUsize::new(0));
    {
        let alive = alive.clone();
        let started = Arc::clone(&started);
        outer.spawn("middle", async move {
            let inner = TaskGroup::<String>::new().map_err(|e| e.to_string())?;
            for i in 0..leaves {
                let leaf = alive.leaf();
                let started = Arc::clone(&started);
                inner.spawn(format!("leaf{i}"), async move {
                    let _leaf = leaf;
                    started.fetch_add(1, Ordering::SeqCst);
                    sleep(Duration::from_secs(3600)).await;
                    Ok(())
                });
            }
            inner.join().await.map_err(|e| e.to_string())?;
            Ok(())
        });
    }
    outer.spawn("fails", async {
        sleep(ms(10)).await;
        Err::<(), _>("down".to_owned())
    });
    let error = outer.join().await.unwrap_err();
    assert_eq!(error.cause().unwrap().name, "fails");
    let excess = live_children() - before;
    (alive.count(), excess, started.load(Ordering::SeqCst))
}

#[test]
fn a_nested_groups_children_are_gone_when_the_outer_join_returns_current_thread() {
    let _serial = serial();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let (alive, excess, started) = runtime.block_on(sibling_fails_while_a_nested_group_runs(500));
    assert_eq!(
        started, 500,
        "the leaves were running when the sibling failed"
    );
    assert_eq!(alive, 0, "leaves alive after the outer join returned");
    assert_eq!(excess, 0, "the gauge counted live children after the join");
}

#[test]
fn a_nested_groups_children_are_gone_when_the_outer_join_returns_multi_thread() {
    let _serial = serial();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for _ in 0..5 {
        let (alive, excess, _) = runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(60), async {
                sibling_fails_while_a_nested_group_runs(5_000).await
            })
            .await
            .unwrap()
        });
        assert_eq!(alive, 0, "leaves alive after the outer join returned");
        assert_eq!(excess, 0, "the gauge counted live children after the join");
    }
}

#[tokio::test(start_paused = true)]
async fn a_dropped_groups_parent_waits_for_the_dropped_groups_children() {
    let _serial = SERIAL.lock().await;
    let alive = Alive::default();
    let outer = TaskGroup::<String>::builder()
        .grace(ms(200))
        .build()
        .unwrap();
    {
        let alive = alive.clone();
        outer.spawn("middle", async move {
            let inner = TaskGroup::<String>::builder()
                .grace(ms(40))
                .build()
                .map_err(|e| e.to_string())?;
            let leaf = alive.leaf();
            inner.spawn("leaf", async move {
                let _leaf = leaf;
                // Cleans up for 30 ms when signalled, within the inner grace period.
                ChildContext::current().unwrap().cancelled().await;
                sleep(ms(30)).await;
                Ok(())
            });
            // Let the leaf start, then return without joining: the inner group is dropped here,
            // its leaf still running.
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
            drop(inner);
            Ok(())
        });
    }
    let start = Instant::now();
    outer.join().await.unwrap();
    assert_eq!(
        alive.count(),
        0,
        "the outer join returned before the leaf was gone"
    );
    assert_eq!(start.elapsed(), ms(30), "the leaf got its clean-up time");
}

#[tokio::test(start_paused = true)]
async fn dropping_a_group_with_grace_lets_children_clean_up_before_aborting() {
    let _serial = SERIAL.lock().await;
    let cleaned = Arc::new(AtomicUsize::new(0));
    let aborted = Alive::default();
    let group = TaskGroup::<String>::builder()
        .grace(ms(100))
        .build()
        .unwrap();
    {
        let cleaned = Arc::clone(&cleaned);
        group.spawn("cooperative", async move {
            ChildContext::current().unwrap().cancelled().await;
            sleep(ms(20)).await; // e.g. roll back a transaction
            cleaned.fetch_add(1, Ordering::SeqCst);
            Ok(())
        });
    }
    {
        let leaf = aborted.leaf();
        group.spawn("stubborn", async move {
            let _leaf = leaf;
            sleep(Duration::from_secs(3600)).await;
            Ok(())
        });
    }
    sleep(ms(1)).await;
    drop(group);
    sleep(ms(50)).await;
    assert_eq!(
        cleaned.load(Ordering::SeqCst),
        1,
        "clean-up ran within the grace"
    );
    assert_eq!(
        aborted.count(),
        1,
        "nothing is aborted before the grace period ends"
    );
    sleep(ms(60)).await;
    assert_eq!(aborted.count(), 0, "aborted once the grace period ended");
}

#[tokio::test(start_paused = true)]
async fn a_cancel_that_cut_nothing_off_is_no_failure() {
    let _serial = SERIAL.lock().await;
    let group = TaskGroup::<String>::new().unwrap();
    let done = group.spawn("done", async { Ok(1) });
    sleep(ms(1)).await;
    assert!(done.is_finished());
    group.cancel();
    let report = group.join().await.unwrap();
    assert_eq!(report.len(), 1);
    assert_eq!(done.output().unwrap(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_cancel_that_cut_a_child_off_is_reported_with_how_many() {
    let _serial = SERIAL.lock().await;
    let group = TaskGroup::<String>::new().unwrap();
    group.spawn("done", async { Ok(()) });
    group.spawn("slow", async {
        sleep(ms(100)).await;
        Ok(())
    });
    sleep(ms(1)).await;
    group.cancel();
    let error = group.join().await.unwrap_err();
    assert_eq!(
        error.kind(),
        &GroupErrorKind::Cancelled(CancelReason::Requested)
    );
    assert_eq!(
        error.to_string(),
        "task group `taskgroup` was cancelled: cancellation requested"
    );
}

#[tokio::test(start_paused = true)]
async fn stopping_or_spawning_after_join_changes_nothing() {
    let _serial = SERIAL.lock().await;
    let group = TaskGroup::<String>::new().unwrap();
    let spawner = group.spawner();
    group.spawn("done", async { Ok(()) });
    let report = group.join().await.unwrap();
    // A cancel after close does nothing: no token is cancelled, nothing is counted.
    let token = spawner.token();
    spawner.cancel();
    assert!(!token.is_cancelled());
    assert!(spawner.is_stopping(), "a joined group takes no children");
    // A child spawned now never joins the group and aliases no entry of its report.
    let late = spawner.spawn("late", async { Ok(7) });
    assert_eq!(late.index(), None);
    assert!(report.get(&late).is_none());
    assert!(matches!(
        late.await.unwrap_err().kind,
        ChildErrorKind::Cancelled(CancelReason::GroupClosed)
    ));
    let refused = spawner
        .child("late")
        .try_spawn(async { Ok(8) })
        .unwrap_err();
    assert_eq!(refused.reason(), &CancelReason::GroupClosed);
}

#[tokio::test(start_paused = true)]
async fn a_nested_groups_report_reaches_its_parent_within_the_parents_grace() {
    let _serial = SERIAL.lock().await;
    let outer = TaskGroup::<String>::builder()
        .grace(ms(100))
        .build()
        .unwrap();
    let middle = outer.spawn("middle", async {
        // Inherits the grace period, halved: 50 ms.
        let inner = TaskGroup::<String>::new().map_err(|e| e.to_string())?;
        assert_eq!(ChildContext::current().unwrap().grace(), ms(100));
        inner.spawn("stubborn", async {
            sleep(Duration::from_secs(3600)).await;
            Ok(())
        });
        let error = inner.join().await.unwrap_err();
        // The inner group aborted its child at 50 ms and reported; this child returns its
        // finding before the outer group aborts it at 100 ms.
        Ok((error.kind().clone(), Instant::now()))
    });
    sleep(ms(10)).await;
    let cancelled_at = Instant::now();
    outer.cancel();
    let error = outer.join().await.unwrap_err();
    // The middle child wound down within the grace period: it reports what it returned.
    assert_eq!(
        error.kind(),
        &GroupErrorKind::Cancelled(CancelReason::Requested)
    );
    let (inner_kind, reported_at) = middle.output().unwrap();
    assert_eq!(
        inner_kind,
        GroupErrorKind::Cancelled(CancelReason::ParentCancelled)
    );
    assert_eq!(reported_at - cancelled_at, ms(50));
}

#[tokio::test(start_paused = true)]
async fn a_nested_group_stopped_by_its_parents_deadline_reports_the_deadline() {
    let _serial = SERIAL.lock().await;
    let outer = TaskGroup::<String>::builder()
        .timeout(ms(100))
        .grace(ms(40))
        .build()
        .unwrap();
    let middle = outer.spawn("middle", async {
        let inner = TaskGroup::<String>::new().map_err(|e| e.to_string())?;
        inner.spawn("slow", async {
            sleep(Duration::from_secs(3600)).await;
            Ok(())
        });
        let kind = inner.join().await.map(|_| ()).map_err(|e| e.kind().clone());
        Ok(kind)
    });
    let error = outer.join().await.unwrap_err();
    assert_eq!(error.kind(), &GroupErrorKind::DeadlineExceeded);
    assert_eq!(
        middle.output().unwrap(),
        Err(GroupErrorKind::DeadlineExceeded)
    );
}

#[tokio::test(start_paused = true)]
async fn a_group_built_after_its_parent_stopped_starts_stopped() {
    let _serial = SERIAL.lock().await;
    let outer = TaskGroup::<String>::builder()
        .grace(ms(100))
        .build()
        .unwrap();
    let middle = outer.spawn("middle", async {
        ChildContext::current().unwrap().cancelled().await;
        // Built while the parent winds down: it takes no new work.
        let inner = TaskGroup::<String>::new().map_err(|e| e.to_string())?;
        let leaf = inner.spawn("leaf", async { Ok(1) });
        let joined = inner.join().await.map(|_| ()).map_err(|e| e.kind().clone());
        Ok((joined, leaf.output().map_err(|e| e.kind)))
    });
    sleep(ms(1)).await;
    outer.cancel();
    outer.join().await.unwrap_err();
    let (joined, leaf) = middle.output().unwrap();
    assert_eq!(
        joined,
        Err(GroupErrorKind::Cancelled(CancelReason::ParentCancelled))
    );
    assert_eq!(
        leaf,
        Err(ChildErrorKind::Cancelled(CancelReason::ParentCancelled))
    );
}

#[tokio::test(start_paused = true)]
async fn a_child_cancelled_through_its_handle_ends_alone() {
    let _serial = SERIAL.lock().await;
    let group = TaskGroup::<String>::builder()
        .limit(1)
        .policy(Policy::FailFast)
        .build()
        .unwrap();
    let running = group.spawn("running", async {
        sleep(Duration::from_secs(3600)).await;
        Ok(1)
    });
    let queued = group.spawn("queued", async { Ok(2) });
    let sibling = group.spawn("sibling", async {
        sleep(ms(10)).await;
        Ok(3)
    });
    sleep(ms(1)).await;
    queued.cancel();
    running.cancel();
    let start = Instant::now();
    let report = group.join().await.unwrap();
    assert_eq!(start.elapsed(), ms(10), "the sibling ran to its end");
    for handle in [&running, &queued] {
        assert!(matches!(
            report.get(handle).unwrap().outcome,
            Outcome::Cancelled(CancelReason::HandleCancelled)
        ));
    }
    assert_eq!(sibling.output().unwrap(), 3);
    assert_eq!(
        running.output().unwrap_err().kind,
        ChildErrorKind::Cancelled(CancelReason::HandleCancelled)
    );
}

#[test]
fn a_nested_group_waits_for_its_children_on_a_multi_thread_runtime_under_every_drop() {
    let _serial = serial();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let before = live_children();
        for round in 0..50 {
            let alive = Alive::default();
            let outer = TaskGroup::<String>::new().unwrap();
            for m in 0..4 {
                let alive = alive.clone();
                outer.spawn(format!("middle{m}"), async move {
                    let inner = TaskGroup::<String>::new().map_err(|e| e.to_string())?;
                    for _ in 0..50 {
                        let leaf = alive.leaf();
                        inner.spawn("leaf", async move {
                            let _leaf = leaf;
                            tokio::task::yield_now().await;
                            sleep(Duration::from_secs(3600)).await;
                            Ok(())
                        });
                    }
                    // Half the middles drop their group, half join it.
                    if m % 2 == 0 {
                        drop(inner);
                        sleep(Duration::from_secs(3600)).await;
                    } else {
                        inner.join().await.map_err(|e| e.to_string())?;
                    }
                    Ok(())
                });
            }
            tokio::task::yield_now().await;
            if round % 2 == 0 {
                outer.cancel();
                outer.join().await.unwrap_err();
            } else {
                // Dropped: nothing waits, but the gauge must still come back.
                drop(outer);
            }
            if round % 2 == 0 {
                assert_eq!(alive.count(), 0, "round {round}: leaves outlived the join");
            }
        }
        // Dropped groups finish winding down in the background; bounded wait for the gauge.
        let deadline = Instant::now() + Duration::from_secs(30);
        while live_children() != before && Instant::now() < deadline {
            sleep(ms(1)).await;
        }
        assert_eq!(live_children(), before);
    });
}
