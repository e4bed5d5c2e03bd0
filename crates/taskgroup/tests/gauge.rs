//! Leak checks against the process-wide live-children gauge ([`taskgroup::live_children`]).
//!
//! The gauge counts every child in the process, so the tests in this binary take a common lock
//! and never overlap; each one checks that the gauge returns to where it started.
#![allow(clippy::unwrap_used)] // The runtime helper below is test support outside any #[test].

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use taskgroup::{TaskGroup, live_children};
use tokio::time::sleep;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs `test` alone (no other test of this binary runs meanwhile) on a fresh current-thread
/// runtime with the paused clock.
fn alone_on_paused_clock(test: impl Future<Output = ()>) {
    let _serial = serial();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
        .block_on(test);
}

/// Lets the runtime reach every aborted task: aborted children are dropped the next time the
/// scheduler gets to them, which a few yields and a short (paused-clock) sleep guarantee.
async fn settle() {
    for _ in 0..4 {
        tokio::task::yield_now().await;
    }
    sleep(Duration::from_millis(1)).await;
}

#[test]
fn dropping_a_group_of_10k_sleeping_children_leaves_none_alive() {
    alone_on_paused_clock(async {
        let before = live_children();
        let parked = Arc::new(AtomicUsize::new(0));
        let group = TaskGroup::<String>::new().unwrap();
        for i in 0..10_000u32 {
            let parked = Arc::clone(&parked);
            group.spawn(format!("sleeper{i}"), async move {
                parked.fetch_add(1, Ordering::SeqCst);
                sleep(Duration::from_secs(3600)).await;
                Ok(i)
            });
        }
        // Let every child reach its sleep, so they are parked, not merely queued. The scheduler polls
        // a bounded batch of tasks between the test's turns, hence the (bounded) loop.
        for _ in 0..10_000 {
            if parked.load(Ordering::SeqCst) == 10_000 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(parked.load(Ordering::SeqCst), 10_000);
        assert_eq!(live_children(), before + 10_000);
        drop(group);
        settle().await;
        assert_eq!(live_children(), before);
    });
}

#[test]
fn dropping_a_limited_group_discards_queued_children() {
    alone_on_paused_clock(async {
        let before = live_children();
        let group = TaskGroup::<String>::builder().limit(10).build().unwrap();
        for _ in 0..1_000 {
            group.spawn("queued", async {
                sleep(Duration::from_secs(3600)).await;
                Ok(())
            });
        }
        tokio::task::yield_now().await;
        assert_eq!(group.stats().queued, 990);
        drop(group);
        settle().await;
        assert_eq!(live_children(), before);
    });
}

#[test]
fn a_disconnected_request_returns_the_gauge_to_its_start() {
    alone_on_paused_clock(async {
        // The api's scenario: the handler future (here, `handler`) is dropped mid-`join` when the
        // client disconnects.
        let before = live_children();
        let handler = async {
            let group = TaskGroup::<String>::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .unwrap();
            for source in ["profile", "orders", "reviews", "recommendations"] {
                group.spawn(source, async {
                    sleep(Duration::from_secs(1)).await;
                    Ok(())
                });
            }
            group.join().await
        };
        let outcome = tokio::time::timeout(Duration::from_millis(100), handler).await;
        assert!(outcome.is_err());
        settle().await;
        assert_eq!(live_children(), before);
    });
}

#[test]
fn joined_groups_return_the_gauge_to_its_start() {
    alone_on_paused_clock(async {
        let before = live_children();
        let group = TaskGroup::<String>::new().unwrap();
        for i in 0..100u64 {
            group.spawn("child", async move {
                sleep(Duration::from_millis(i)).await;
                if i == 50 {
                    Err("half way".to_owned())
                } else {
                    Ok(())
                }
            });
        }
        group.join().await.unwrap_err();
        // `join` returns only after every child is dropped, so no settling is needed here.
        assert_eq!(live_children(), before);
    });
}

#[test]
fn a_multi_thread_runtime_returns_the_gauge_to_its_start() {
    let _serial = serial();
    let before = live_children();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let group = TaskGroup::<String>::new().unwrap();
        for _ in 0..10_000 {
            group.spawn("sleeper", async {
                sleep(Duration::from_secs(3600)).await;
                Ok(())
            });
        }
        drop(group);
        // Bounded wait for the workers to reach every aborted task.
        for _ in 0..1_000 {
            if live_children() == before {
                break;
            }
            sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(live_children(), before);
    });
}
