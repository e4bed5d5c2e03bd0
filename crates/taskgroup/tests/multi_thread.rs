//! The same guarantees on tokio's multi-thread runtime, where children really run in parallel
//! with the owner and with each other.
//!
//! These use the real clock, so they never assert how long anything took; children that must be
//! cancelled wait forever (`pending`), so a test that passes proves the cancellation happened, and
//! an outer timeout keeps every wait bounded if it did not.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use taskgroup::{CancelReason, ChildErrorKind, GroupErrorKind, OutcomeKind, Policy, TaskGroup};

/// A bound on every wait in this file; far longer than any test needs.
const BOUND: Duration = Duration::from_secs(30);

async fn forever() -> Result<(), String> {
    std::future::pending::<()>().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_cancels_siblings_that_would_never_finish() {
    let group = TaskGroup::<String>::new().unwrap();
    let siblings: Vec<_> = (0..1_000)
        .map(|_| group.spawn("forever", forever()))
        .collect();
    group.spawn("fails", async { Err::<(), _>("boom".to_owned()) });
    let error = tokio::time::timeout(BOUND, group.join())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(error.cause().unwrap().name, "fails");
    assert_eq!(error.report().count(OutcomeKind::Cancelled), 1_000);
    for sibling in siblings {
        assert_eq!(
            sibling.output().unwrap_err().kind,
            ChildErrorKind::Cancelled(CancelReason::SiblingFailed {
                name: "fails".into()
            })
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_on_another_worker_stops_the_group() {
    let group = TaskGroup::<String>::builder()
        .policy(Policy::CollectAll)
        .build()
        .unwrap();
    for _ in 0..100 {
        group.spawn("forever", forever());
    }
    group.spawn("panicker", async {
        tokio::task::yield_now().await;
        panic!("on a worker thread");
        #[allow(unreachable_code)]
        Ok(())
    });
    let error = tokio::time::timeout(BOUND, group.join())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(error.kind(), &GroupErrorKind::ChildFailed);
    assert_eq!(error.report().count(OutcomeKind::Panicked), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_keeps_input_order_and_the_limit_across_workers() {
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let group = TaskGroup::<String>::builder().limit(4).build().unwrap();
    let outcomes = tokio::time::timeout(
        BOUND,
        group.map(0..500u64, |i| {
            let running = Arc::clone(&running);
            let peak = Arc::clone(&peak);
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                for _ in 0..(i % 3) {
                    tokio::task::yield_now().await;
                }
                running.fetch_sub(1, Ordering::SeqCst);
                Ok(i)
            }
        }),
    )
    .await
    .unwrap()
    .unwrap();
    let values: Vec<u64> = outcomes.into_iter().map(|o| o.ok().unwrap()).collect();
    assert_eq!(values, (0..500).collect::<Vec<_>>());
    assert!(peak.load(Ordering::SeqCst) <= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn siblings_spawned_from_workers_are_all_joined() {
    let group = TaskGroup::<String>::new().unwrap();
    let total = Arc::new(AtomicUsize::new(0));
    for _ in 0..20 {
        let spawner = group.spawner();
        let total = Arc::clone(&total);
        group.spawn("parent", async move {
            for _ in 0..20 {
                let total = Arc::clone(&total);
                spawner
                    .child("leaf")
                    .try_spawn(async move {
                        tokio::task::yield_now().await;
                        total.fetch_add(1, Ordering::SeqCst);
                        Ok(())
                    })
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        });
    }
    let report = tokio::time::timeout(BOUND, group.join())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.len(), 420);
    assert_eq!(total.load(Ordering::SeqCst), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_from_another_task_reaches_every_child() {
    let group = TaskGroup::<String>::new().unwrap();
    for _ in 0..500 {
        group.spawn("forever", forever());
    }
    let spawner = group.spawner();
    tokio::spawn(async move { spawner.cancel() });
    let error = tokio::time::timeout(BOUND, group.join())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(
        error.kind(),
        &GroupErrorKind::Cancelled(CancelReason::Requested)
    );
    assert_eq!(error.report().count(OutcomeKind::Cancelled), 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_in_a_limited_group_discards_the_queue_across_workers() {
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let group = TaskGroup::<String>::builder().limit(8).build().unwrap();
    for i in 0..2_000u32 {
        let running = Arc::clone(&running);
        let peak = Arc::clone(&peak);
        group.spawn(format!("c{i}"), async move {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            tokio::task::yield_now().await;
            running.fetch_sub(1, Ordering::SeqCst);
            if i == 500 {
                return Err(format!("c{i} failed"));
            }
            Ok(())
        });
    }
    let error = tokio::time::timeout(BOUND, group.join())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(error.cause().unwrap().name, "c500");
    let report = error.report();
    assert_eq!(report.len(), 2_000);
    assert_eq!(report.count(OutcomeKind::Err), 1);
    assert_eq!(
        report.count(OutcomeKind::Ok) + report.count(OutcomeKind::Cancelled),
        1_999
    );
    // Children after the failure's slot never ran (at most the 8 in flight did).
    assert!(report.count(OutcomeKind::Cancelled) >= 2_000 - 501 - 8);
    assert!(peak.load(Ordering::SeqCst) <= 8);
}
