//! One or more tests per guarantee in the crate docs, on tokio's paused clock (current-thread
//! runtime), so every instant asserted is exact. Process-wide gauge checks live in `gauge.rs`,
//! where tests are serialised; here each test counts its own children with drop flags.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use taskgroup::{
    BuildError, CancelReason, CancellationToken, ChildContext, ChildErrorKind, GroupErrorKind,
    Limit, Outcome, OutcomeKind, Policy, Spawner, TaskGroup, Timeout,
};

/// The running child's context (these tests only call it inside children).
fn current() -> ChildContext {
    ChildContext::current().expect("called inside a child")
}
use tokio::time::{Instant, sleep};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Counts how many of the futures it was moved into have been dropped.
#[derive(Clone, Default)]
struct DropCounter(Arc<AtomicUsize>);

struct DropFlag(Arc<AtomicUsize>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl DropCounter {
    fn flag(&self) -> DropFlag {
        DropFlag(Arc::clone(&self.0))
    }
    fn dropped(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

async fn sleep_ok(delay: Duration) -> Result<Duration, String> {
    sleep(delay).await;
    Ok(delay)
}

async fn sleep_err(delay: Duration, message: &str) -> Result<Duration, String> {
    sleep(delay).await;
    Err(message.to_owned())
}

// 1. No child outlives the group.

#[tokio::test(start_paused = true)]
async fn join_returns_only_after_every_child_future_is_dropped() {
    let drops = DropCounter::default();
    let group = TaskGroup::<String>::new().unwrap();
    for i in 0..5u64 {
        let flag = drops.flag();
        group.spawn(format!("sleeper{i}"), async move {
            let _flag = flag;
            sleep(ms(1000 * (i + 1))).await;
            Ok(())
        });
    }
    let failing_flag = drops.flag();
    group.spawn("failing", async move {
        let _flag = failing_flag;
        sleep(ms(10)).await;
        Err::<(), _>("boom".to_owned())
    });
    group.join().await.unwrap_err();
    assert_eq!(drops.dropped(), 6);
}

#[tokio::test(start_paused = true)]
async fn dropping_an_unjoined_group_aborts_children_at_their_next_await() {
    let drops = DropCounter::default();
    let progressed = Arc::new(AtomicUsize::new(0));
    let group = TaskGroup::<String>::new().unwrap();
    for _ in 0..100 {
        let flag = drops.flag();
        let progressed = Arc::clone(&progressed);
        group.spawn("sleeper", async move {
            let _flag = flag;
            sleep(ms(100)).await;
            progressed.fetch_add(1, Ordering::SeqCst);
            Ok(())
        });
    }
    tokio::task::yield_now().await;
    drop(group);
    sleep(ms(1000)).await;
    assert_eq!(drops.dropped(), 100);
    assert_eq!(
        progressed.load(Ordering::SeqCst),
        0,
        "no child ran past its await"
    );
}

#[tokio::test(start_paused = true)]
async fn dropping_the_join_future_aborts_children() {
    // What actix does when a client disconnects mid-request: the handler future, and with it the
    // `join` future, is dropped.
    let drops = DropCounter::default();
    let group = TaskGroup::<String>::new().unwrap();
    let flag = drops.flag();
    let child = group.spawn("slow", async move {
        let _flag = flag;
        sleep(ms(10_000)).await;
        Ok(())
    });
    let joined = tokio::time::timeout(ms(50), group.join()).await;
    assert!(joined.is_err(), "join was cut off by the outer timeout");
    sleep(ms(1)).await;
    assert_eq!(drops.dropped(), 1);
    assert_eq!(
        child.await.unwrap_err().kind,
        ChildErrorKind::Cancelled(CancelReason::GroupDropped)
    );
}

// 2. Fail-fast by default; errors raised by siblings are kept.

#[tokio::test(start_paused = true)]
async fn first_failure_is_the_cause_and_later_failures_are_kept() {
    // With a grace period, a sibling that reacts to the cancellation by failing is still
    // reported, tagged with its name; the cause stays the first failure.
    let group = TaskGroup::builder().grace(ms(50)).build().unwrap();
    group.spawn("first", sleep_err(ms(10), "first broke"));
    group.spawn("second", async move {
        let ctx = current();
        ctx.cancelled().await;
        Err::<(), _>("second gave up".to_owned())
    });
    let quiet = group.spawn("quiet", sleep_ok(ms(5000)));
    let error = group.join().await.unwrap_err();
    assert_eq!(error.cause().unwrap().name, "first");
    let failures: Vec<(&str, String)> = error
        .failures()
        .map(|c| (&*c.name, c.outcome.to_string()))
        .collect();
    assert_eq!(
        failures,
        [
            ("first", "first broke".to_owned()),
            ("second", "second gave up".to_owned())
        ]
    );
    assert_eq!(
        quiet.await.unwrap_err().kind,
        ChildErrorKind::Cancelled(CancelReason::SiblingFailed {
            name: "first".into()
        })
    );
}

#[tokio::test(start_paused = true)]
async fn queued_children_never_start_after_a_failure() {
    let started = Arc::new(AtomicUsize::new(0));
    let group = TaskGroup::builder().limit(1).build().unwrap();
    group.spawn("fails", sleep_err(ms(10), "no"));
    for _ in 0..10 {
        let started = Arc::clone(&started);
        group.spawn("queued", async move {
            started.fetch_add(1, Ordering::SeqCst);
            Ok(ms(0))
        });
    }
    let error = group.join().await.unwrap_err();
    assert_eq!(started.load(Ordering::SeqCst), 0);
    assert_eq!(error.report().count(OutcomeKind::Cancelled), 10);
}

// 3. Panics are loud and safe.

#[tokio::test(start_paused = true)]
async fn a_panic_cancels_siblings_before_anyone_joins() {
    let group = TaskGroup::<String>::new().unwrap();
    let sibling = group.spawn("sibling", sleep_ok(ms(60_000)));
    group.spawn("panicker", async {
        sleep(ms(10)).await;
        panic!("invariant broken");
        #[allow(unreachable_code)]
        Ok(ms(0))
    });
    // The owner is busy elsewhere; the sibling is cancelled anyway.
    sleep(ms(20)).await;
    assert!(sibling.is_finished());
    assert!(group.is_stopping());

    let error = group.join().await.unwrap_err();
    let cause = error.cause().unwrap();
    assert_eq!(cause.name, "panicker");
    assert!(matches!(&cause.outcome, Outcome::Panicked(p) if p.message() == "invariant broken"));
    assert_eq!(
        error.to_string(),
        "task group `taskgroup`: child `panicker` panicked: invariant broken"
    );
    // The payload can be re-raised on the owner's side.
    let resumed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = error.resume_panic();
    }));
    let payload = resumed.unwrap_err();
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"invariant broken"));
}

#[tokio::test(start_paused = true)]
async fn a_panic_stops_even_a_collect_all_group() {
    let group = TaskGroup::<String>::builder()
        .policy(Policy::CollectAll)
        .build()
        .unwrap();
    let sibling = group.spawn("sibling", sleep_ok(ms(60_000)));
    group.spawn("panicker", async {
        panic!("bug");
        #[allow(unreachable_code)]
        Ok(ms(0))
    });
    let error = group.join().await.unwrap_err();
    assert_eq!(error.kind(), &GroupErrorKind::ChildFailed);
    assert!(matches!(
        sibling.await.unwrap_err().kind,
        ChildErrorKind::Cancelled(_)
    ));
}

#[tokio::test(start_paused = true)]
async fn a_plain_cancellation_is_never_a_panic() {
    let group = TaskGroup::<String>::new().unwrap();
    let child = group.spawn("child", sleep_ok(ms(60_000)));
    group.cancel();
    let error = group.join().await.unwrap_err();
    assert_eq!(
        error.kind(),
        &GroupErrorKind::Cancelled(CancelReason::Requested)
    );
    assert_eq!(error.report().count(OutcomeKind::Panicked), 0);
    let error = error.resume_panic();
    assert_eq!(error.report().count(OutcomeKind::Cancelled), 1);
    assert!(matches!(
        child.await.unwrap_err().kind,
        ChildErrorKind::Cancelled(CancelReason::Requested)
    ));
}

// 4. Policies and per-child outcomes.

#[tokio::test(start_paused = true)]
async fn collect_all_keeps_going_and_reports_every_outcome() {
    let group = TaskGroup::builder()
        .policy(Policy::CollectAll)
        .build()
        .unwrap();
    let ok = group.spawn("ok", sleep_ok(ms(300)));
    group.spawn("err", sleep_err(ms(10), "orders table locked"));
    group
        .child("slow")
        .timeout(ms(250))
        .spawn(sleep_ok(ms(1000)));
    let report = group.join().await.unwrap();
    assert_eq!(ok.output().unwrap(), ms(300));
    let outcomes: Vec<String> = report.iter().map(|c| c.outcome.to_string()).collect();
    assert_eq!(
        outcomes,
        [
            "ok",
            "orders table locked",
            "timed out after 250ms (child timeout)"
        ]
    );
    assert_eq!(report.failures().count(), 2);
}

#[tokio::test(start_paused = true)]
async fn an_essential_child_stops_a_collect_all_group() {
    // The dashboard's shape: profile is essential; when it says "user not found" the other
    // sources are cancelled at once.
    let start = Instant::now();
    let group = TaskGroup::builder()
        .name("dashboard")
        .policy(Policy::CollectAll)
        .timeout(ms(2000))
        .build()
        .unwrap();
    group
        .child("profile")
        .essential(true)
        .spawn(sleep_err(ms(20), "user not found"));
    let orders = group
        .child("orders")
        .timeout(ms(250))
        .spawn(sleep_ok(ms(100)));
    let reviews = group
        .child("reviews")
        .timeout(ms(250))
        .spawn(sleep_ok(ms(5)));
    let error = group.join().await.unwrap_err();
    assert_eq!(start.elapsed(), ms(20));
    assert_eq!(
        error.cause().unwrap().outcome.as_err().unwrap(),
        "user not found"
    );
    assert_eq!(reviews.output().unwrap(), ms(5));
    assert_eq!(
        orders.output().unwrap_err().kind,
        ChildErrorKind::Cancelled(CancelReason::SiblingFailed {
            name: "profile".into()
        })
    );
}

#[tokio::test(start_paused = true)]
async fn a_non_essential_child_in_a_fail_fast_group_does_not_stop_it() {
    let group = TaskGroup::new().unwrap();
    group
        .child("optional")
        .essential(false)
        .spawn(sleep_err(ms(10), "meh"));
    let main = group.spawn("main", sleep_ok(ms(100)));
    let report = group.join().await.unwrap();
    assert_eq!(main.output().unwrap(), ms(100));
    assert_eq!(report.count(OutcomeKind::Err), 1);
}

#[tokio::test(start_paused = true)]
async fn a_child_timeout_fails_a_fail_fast_group() {
    let group = TaskGroup::new().unwrap();
    group
        .child("slow")
        .timeout(ms(250))
        .spawn(sleep_ok(ms(1000)));
    let error = group.join().await.unwrap_err();
    let cause = error.cause().unwrap();
    assert!(matches!(
        cause.outcome,
        Outcome::TimedOut(Timeout {
            limit: Limit::Child,
            after
        }) if after == ms(250)
    ));
    assert_eq!(
        error.to_string(),
        "task group `taskgroup`: child `slow` timed out after 250ms (child timeout)"
    );
}

// 5. Typed handles.

#[tokio::test(start_paused = true)]
async fn children_of_different_output_types_share_a_group() {
    let group = TaskGroup::<String>::new().unwrap();
    let profile = group.spawn("profile", async { Ok(("alice".to_owned(), 42u32)) });
    let orders = group.spawn("orders", async { Ok(vec![1u64, 2, 3]) });
    let flag = group.spawn("flag", async { Ok(true) });
    // Awaited while the group runs, like `await task`.
    assert!(flag.await.unwrap());
    group.join().await.unwrap();
    assert_eq!(profile.output().unwrap().1, 42);
    assert_eq!(orders.output().unwrap().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn handle_output_before_finish_and_twice_is_an_error_not_a_panic() {
    let group = TaskGroup::<String>::new().unwrap();
    let mut handle = group.spawn("later", sleep_ok(ms(10)));
    assert!(!handle.is_finished());
    let early = group.spawn("early", sleep_ok(ms(50)));
    assert_eq!(
        early.output().unwrap_err().kind,
        ChildErrorKind::NotFinished
    );
    assert_eq!((&mut handle).await.unwrap(), ms(10));
    assert_eq!((&mut handle).await.unwrap_err().kind, ChildErrorKind::Taken);
    group.join().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn try_output_before_the_child_finishes_keeps_the_handle() {
    let group = TaskGroup::<String>::new().unwrap();
    let mut handle = group.spawn("slow", sleep_ok(ms(10)));
    assert_eq!(
        handle.try_output().unwrap_err().kind,
        ChildErrorKind::NotFinished
    );
    group.join().await.unwrap();
    assert_eq!(handle.try_output().unwrap(), ms(10));
    assert_eq!(handle.try_output().unwrap_err().kind, ChildErrorKind::Taken);
}

#[tokio::test(start_paused = true)]
async fn a_report_does_not_answer_for_another_groups_handle() {
    let first = TaskGroup::<String>::new().unwrap();
    let second = TaskGroup::<String>::new().unwrap();
    let own = first.spawn("own", sleep_ok(ms(1)));
    let foreign = second.spawn("foreign", sleep_err(ms(1), "elsewhere"));
    let report = first.join().await.unwrap();
    second.join().await.unwrap_err();
    assert_eq!(report.get(&own).unwrap().name, "own");
    assert!(report.get(&foreign).is_none());
}

// 6. Ordered map with a limit.

#[tokio::test(start_paused = true)]
async fn map_returns_outputs_in_input_order_with_bounded_concurrency() {
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let group = TaskGroup::<String>::builder().limit(3).build().unwrap();
    // Later inputs finish sooner, so completion order is the reverse of input order.
    let outcomes = group
        .map(0..12u64, |i| {
            let running = Arc::clone(&running);
            let peak = Arc::clone(&peak);
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                sleep(ms(100 - i * 5)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                Ok(i * 2)
            }
        })
        .await
        .unwrap();
    let values: Vec<u64> = outcomes.into_iter().map(|o| o.ok().unwrap()).collect();
    assert_eq!(values, (0..12).map(|i| i * 2).collect::<Vec<_>>());
    assert_eq!(peak.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn map_under_fail_fast_stops_at_the_first_failure() {
    let started = Arc::new(AtomicUsize::new(0));
    let group = TaskGroup::<String>::builder().limit(2).build().unwrap();
    let started2 = Arc::clone(&started);
    let error = group
        .map(0..1000u32, move |id| {
            let started = Arc::clone(&started2);
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                sleep(ms(10)).await;
                if id == 3 {
                    return Err(format!("id {id} failed"));
                }
                Ok(id)
            }
        })
        .await
        .unwrap_err();
    assert_eq!(error.cause().unwrap().name, "taskgroup[3]");
    assert!(started.load(Ordering::SeqCst) <= 6);
    assert!(error.report().count(OutcomeKind::Cancelled) >= 994);
}

// 7. Concurrency limit with backpressure.

#[tokio::test(start_paused = true)]
async fn a_limited_group_queues_children_in_spawn_order() {
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let group = TaskGroup::<String>::builder().limit(2).build().unwrap();
    for i in 0..6 {
        let order = Arc::clone(&order);
        group.spawn(format!("c{i}"), async move {
            order.lock().unwrap().push(i);
            sleep(ms(10)).await;
            Ok(())
        });
    }
    let stats = group.stats();
    assert_eq!(stats.spawned, 6);
    let start = Instant::now();
    group.join().await.unwrap();
    assert_eq!(start.elapsed(), ms(30));
    assert_eq!(*order.lock().unwrap(), [0, 1, 2, 3, 4, 5]);
}

#[tokio::test(start_paused = true)]
async fn queued_children_are_not_tokio_tasks_until_they_start() {
    let metrics = tokio::runtime::Handle::current().metrics();
    let before = metrics.num_alive_tasks();
    let group = TaskGroup::<String>::builder().limit(2).build().unwrap();
    for _ in 0..1_000 {
        group.spawn("queued", sleep_ok(ms(10)));
    }
    tokio::task::yield_now().await;
    // A queued child is only its future, held by the group: two tasks run, none wait.
    assert_eq!(metrics.num_alive_tasks() - before, 2);
    assert_eq!((group.stats().running, group.stats().queued), (2, 998));
    let start = Instant::now();
    group.join().await.unwrap();
    assert_eq!(start.elapsed(), ms(5_000));
}

#[tokio::test(start_paused = true)]
async fn stats_track_running_queued_and_finished_children() {
    let group = TaskGroup::<String>::builder()
        .policy(Policy::CollectAll)
        .limit(2)
        .build()
        .unwrap();
    group.spawn("a", sleep_ok(ms(10)));
    group.spawn("b", sleep_err(ms(20), "b"));
    group.spawn("c", sleep_ok(ms(100)));
    tokio::task::yield_now().await;
    let stats = group.stats();
    assert_eq!((stats.spawned, stats.running, stats.queued), (3, 2, 1));
    sleep(ms(25)).await;
    let stats = group.stats();
    assert_eq!(
        (stats.running, stats.queued, stats.succeeded, stats.failed),
        (1, 0, 1, 1)
    );
    group.join().await.unwrap();
}

// 8. Deadlines that nest.

#[tokio::test(start_paused = true)]
async fn the_deadline_cuts_off_what_is_left_and_keeps_finished_outputs() {
    let start = Instant::now();
    let group = TaskGroup::builder().timeout(ms(1000)).build().unwrap();
    let fast = group.spawn("fast", sleep_ok(ms(500)));
    let slow = group.spawn("slow", sleep_ok(ms(3000)));
    let error = group.join().await.unwrap_err();
    assert_eq!(start.elapsed(), ms(1000));
    assert_eq!(error.kind(), &GroupErrorKind::DeadlineExceeded);
    assert_eq!(fast.output().unwrap(), ms(500));
    let cut = Timeout {
        limit: Limit::Group,
        after: ms(1000),
    };
    assert_eq!(
        slow.output().unwrap_err().kind,
        ChildErrorKind::TimedOut(cut)
    );
    assert_eq!(
        error.report().by_name("slow").unwrap().outcome.to_string(),
        "timed out after 1s (group deadline)"
    );
}

#[tokio::test(start_paused = true)]
async fn a_child_reads_its_remaining_budget() {
    let group = TaskGroup::<String>::builder()
        .timeout(ms(2000))
        .build()
        .unwrap();
    sleep(ms(100)).await;
    let own = group.child("own").timeout(ms(250)).spawn(async move {
        let ctx = current();
        Ok(ctx.remaining())
    });
    let inherited = group.spawn("inherited", async move {
        let ctx = current();
        Ok(ctx.remaining())
    });
    group.join().await.unwrap();
    assert_eq!(own.output().unwrap(), Some(ms(250)));
    assert_eq!(inherited.output().unwrap(), Some(ms(1900)));
}

#[tokio::test(start_paused = true)]
async fn a_nested_group_inherits_the_tighter_deadline() {
    let start = Instant::now();
    let outer = TaskGroup::<String>::builder()
        .timeout(ms(1000))
        .build()
        .unwrap();
    let inner_result = outer.child("middle").essential(false).spawn(async move {
        let inner = TaskGroup::<String>::builder()
            .timeout(ms(5000))
            .build()
            .map_err(|e| e.to_string())?;
        let deadline = inner.deadline();
        inner.spawn("leaf", sleep_ok(ms(4000)));
        let kind = inner.join().await.map(|_| ()).map_err(|e| e.kind().clone());
        Ok((deadline, kind))
    });
    let error = outer.join().await.unwrap_err();
    assert_eq!(error.kind(), &GroupErrorKind::DeadlineExceeded);
    assert_eq!(start.elapsed(), ms(1000));
    // The middle child was cut off by the outer deadline before its nested group could report.
    assert!(matches!(
        inner_result.output().unwrap_err().kind,
        ChildErrorKind::TimedOut(Timeout {
            limit: Limit::Group,
            ..
        })
    ));
}

#[tokio::test(start_paused = true)]
async fn a_nested_group_reports_its_own_deadline_when_it_is_tighter() {
    let outer = TaskGroup::<String>::builder()
        .timeout(ms(1000))
        .build()
        .unwrap();
    let middle = outer.spawn("middle", async move {
        let inner = TaskGroup::<String>::builder()
            .timeout(ms(200))
            .build()
            .map_err(|e| e.to_string())?;
        inner.spawn("leaf", sleep_ok(ms(4000)));
        let kind = inner.join().await.map(|_| ()).map_err(|e| e.kind().clone());
        Ok(kind)
    });
    outer.join().await.unwrap();
    assert_eq!(
        middle.output().unwrap(),
        Err(GroupErrorKind::DeadlineExceeded)
    );
}

// 9. Cooperative and forced cancellation.

#[tokio::test(start_paused = true)]
async fn two_phase_cancellation_signals_waits_then_aborts() {
    let start = Instant::now();
    let cleaned_up = Arc::new(AtomicUsize::new(0));
    let group = TaskGroup::<String>::builder()
        .grace(ms(100))
        .build()
        .unwrap();
    let cleaned = Arc::clone(&cleaned_up);
    let cooperative = group.spawn("cooperative", async move {
        let ctx = current();
        tokio::select! {
            () = sleep(ms(60_000)) => Ok("finished"),
            () = ctx.cancelled() => {
                // E.g. send a PostgreSQL cancel request, then stop.
                sleep(ms(30)).await;
                cleaned.fetch_add(1, Ordering::SeqCst);
                Ok("cleaned up")
            }
        }
    });
    let stubborn = group.spawn("stubborn", async {
        sleep(ms(60_000)).await;
        Ok("ignored the signal")
    });
    sleep(ms(10)).await;
    group.cancel();
    let error = group.join().await.unwrap_err();
    assert_eq!(start.elapsed(), ms(110));
    assert_eq!(
        error.kind(),
        &GroupErrorKind::Cancelled(CancelReason::Requested)
    );
    assert_eq!(cooperative.output().unwrap(), "cleaned up");
    assert_eq!(cleaned_up.load(Ordering::SeqCst), 1);
    assert!(stubborn.output().is_err());
}

#[tokio::test(start_paused = true)]
async fn cancelling_a_parent_cancels_its_nested_groups() {
    let leaf_drops = DropCounter::default();
    let outer = TaskGroup::<String>::new().unwrap();
    let flag = leaf_drops.flag();
    let middle = outer.spawn("middle", async move {
        let inner = TaskGroup::<String>::builder()
            .build()
            .map_err(|e| e.to_string())?;
        inner.spawn("leaf", async move {
            let _flag = flag;
            sleep(ms(60_000)).await;
            Ok(())
        });
        inner.join().await.map_err(|e| e.to_string())?;
        Ok(())
    });
    sleep(ms(10)).await;
    outer.cancel();
    outer.join().await.unwrap_err();
    assert_eq!(leaf_drops.dropped(), 1);
    assert!(middle.output().is_err());
}

#[tokio::test(start_paused = true)]
async fn an_external_token_cancels_a_linked_group() {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let group = TaskGroup::<String>::builder()
        .cancel_on(&shutdown)
        .build()
        .unwrap();
    group.spawn("server", sleep_ok(ms(60_000)));
    sleep(ms(10)).await;
    shutdown.cancel();
    let error = group.join().await.unwrap_err();
    assert_eq!(
        error.kind(),
        &GroupErrorKind::Cancelled(CancelReason::ParentCancelled)
    );
}

/// Builds a group (nested in the running child) linked to `shutdown`, runs a leaf that would
/// sleep for a minute, and returns the group's deadline and how its join ended.
async fn nested_and_linked(
    shutdown: CancellationToken,
) -> Result<(Option<Instant>, Result<(), GroupErrorKind>), String> {
    // No grace of its own (rather than its parent's), so it stops at once when cancelled.
    let inner = TaskGroup::<String>::builder()
        .grace(Duration::ZERO)
        .cancel_on(&shutdown)
        .build()
        .map_err(|e| e.to_string())?;
    let deadline = inner.deadline();
    inner.spawn("leaf", sleep_ok(ms(60_000)));
    let joined = inner.join().await.map(|_| ()).map_err(|e| e.kind().clone());
    Ok((deadline, joined))
}

#[tokio::test(start_paused = true)]
async fn a_group_both_nested_and_linked_obeys_the_outside_token() {
    let start = Instant::now();
    let shutdown = CancellationToken::new();
    let outer = TaskGroup::<String>::builder()
        .timeout(ms(1000))
        .build()
        .unwrap();
    let handles: Vec<_> = (0..2)
        .map(|i| outer.spawn(format!("nested-{i}"), nested_and_linked(shutdown.clone())))
        .collect();
    sleep(ms(10)).await;
    shutdown.cancel();
    outer.join().await.unwrap();
    assert_eq!(start.elapsed(), ms(10));
    for handle in handles {
        let (deadline, joined) = handle.output().unwrap();
        // The parent's deadline is inherited along with the outside link.
        assert_eq!(deadline, Some(start + ms(1000)));
        assert_eq!(
            joined,
            Err(GroupErrorKind::Cancelled(CancelReason::ParentCancelled))
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_group_both_nested_and_linked_obeys_its_parent_group() {
    let shutdown = CancellationToken::new();
    let outer = TaskGroup::<String>::builder()
        .grace(ms(100))
        .build()
        .unwrap();
    let handles: Vec<_> = (0..2)
        .map(|i| outer.spawn(format!("nested-{i}"), nested_and_linked(shutdown.clone())))
        .collect();
    sleep(ms(10)).await;
    // The nested groups stop within the outer grace period and report it to their parents.
    outer.cancel();
    outer.join().await.unwrap_err();
    for handle in handles {
        let (_, joined) = handle.output().unwrap();
        assert_eq!(
            joined,
            Err(GroupErrorKind::Cancelled(CancelReason::ParentCancelled))
        );
    }
    assert!(!shutdown.is_cancelled());
}

#[tokio::test(start_paused = true)]
async fn every_linked_token_cancels_the_group_and_the_tightest_deadline_wins() {
    let first = CancellationToken::new();
    let second = CancellationToken::new();
    let group = TaskGroup::<String>::builder()
        .cancel_on(&first)
        .cancel_on(&second)
        .build()
        .unwrap();
    group.spawn("server", sleep_ok(ms(60_000)));
    sleep(ms(10)).await;
    // The first link, which a later `cancel_on` must not have replaced.
    first.cancel();
    let error = group.join().await.unwrap_err();
    assert_eq!(
        error.kind(),
        &GroupErrorKind::Cancelled(CancelReason::ParentCancelled)
    );

    // Nested two deep: the innermost group keeps the tightest deadline on its path (the middle
    // child's own timeout, not the outer group's deadline).
    let start = Instant::now();
    let outer = TaskGroup::<String>::builder()
        .timeout(ms(300))
        .build()
        .unwrap();
    let deadline = outer.spawn("outer-child", async move {
        let middle = TaskGroup::<String>::builder()
            .build()
            .map_err(|e| e.to_string())?;
        let deadline = middle
            .child("middle-child")
            .timeout(ms(100))
            .spawn(async move {
                let inner = TaskGroup::<String>::builder()
                    .build()
                    .map_err(|e| e.to_string())?;
                Ok(inner.deadline())
            });
        middle.join().await.map_err(|e| e.to_string())?;
        deadline.output().map_err(|e| e.to_string())
    });
    outer.join().await.unwrap();
    assert_eq!(deadline.output().unwrap(), Some(start + ms(100)));
}

// 10. A spawner children can use.

#[tokio::test(start_paused = true)]
async fn children_spawn_siblings_and_join_waits_for_them() {
    let group = TaskGroup::<String>::new().unwrap();
    let spawner = group.spawner();
    let grandchild_output = Arc::new(AtomicUsize::new(0));
    let out = Arc::clone(&grandchild_output);
    group.spawn("parent", async move {
        sleep(ms(10)).await;
        let sibling = spawner
            .child("late")
            .try_spawn(async {
                sleep(ms(500)).await;
                Ok(7usize)
            })
            .map_err(|e| e.to_string())?;
        out.store(sibling.await.map_err(|e| e.to_string())?, Ordering::SeqCst);
        Ok(())
    });
    let start = Instant::now();
    let report = group.join().await.unwrap();
    assert_eq!(start.elapsed(), ms(510));
    assert_eq!(report.len(), 2);
    assert_eq!(report.get_index(1).unwrap().name, "late");
    assert_eq!(grandchild_output.load(Ordering::SeqCst), 7);
}

#[tokio::test(start_paused = true)]
async fn spawning_into_a_closing_group_is_refused_and_gives_the_future_back() {
    let group = TaskGroup::<String>::new().unwrap();
    let spawner = group.spawner();
    group.spawn("fails", sleep_err(ms(1), "down"));
    sleep(ms(5)).await;
    assert!(spawner.is_stopping());
    let refused = spawner
        .child("late")
        .try_spawn(async { Ok(41u8) })
        .unwrap_err();
    assert_eq!(
        refused.reason(),
        &CancelReason::SiblingFailed {
            name: "fails".into()
        }
    );
    assert_eq!(
        refused.to_string(),
        "task group is not taking children (sibling `fails` failed); child not spawned"
    );
    // The future comes back intact and can still be run elsewhere.
    assert_eq!(refused.into_inner().await.unwrap(), 41);
    // The owner's infallible spawn records the child as cancelled without starting it.
    let never = group.spawn("never", async { Ok(0u8) });
    assert!(matches!(
        never.await.unwrap_err().kind,
        ChildErrorKind::Cancelled(_)
    ));
    group.join().await.unwrap_err();
    let closed = spawner
        .child("after")
        .try_spawn(async { Ok(0u8) })
        .unwrap_err();
    assert_eq!(closed.reason(), &CancelReason::GroupClosed);
}

// 11. Outcomes say why.

#[tokio::test(start_paused = true)]
async fn a_failure_before_a_cancellation_wins_over_it() {
    let group = TaskGroup::<String>::builder()
        .grace(ms(50))
        .build()
        .unwrap();
    group.spawn("fails", sleep_err(ms(1), "down"));
    group.spawn("cooperative", async move {
        let ctx = current();
        ctx.cancelled().await;
        Ok(())
    });
    sleep(ms(5)).await;
    group.cancel();
    let error = group.join().await.unwrap_err();
    assert_eq!(error.kind(), &GroupErrorKind::ChildFailed);
    assert_eq!(error.cause().unwrap().name, "fails");
}

#[tokio::test(start_paused = true)]
async fn an_error_raised_while_winding_down_after_a_cancel_is_kept_but_is_not_the_cause() {
    let group = TaskGroup::<String>::builder()
        .grace(ms(50))
        .build()
        .unwrap();
    group.spawn("rolls-back", async move {
        let ctx = current();
        ctx.cancelled().await;
        Err::<(), _>("rollback failed".to_owned())
    });
    sleep(ms(1)).await;
    group.cancel();
    let error = group.join().await.unwrap_err();
    assert_eq!(
        error.kind(),
        &GroupErrorKind::Cancelled(CancelReason::Requested)
    );
    assert!(error.cause().is_none());
    let rolled_back = error.report().by_name("rolls-back").unwrap();
    assert_eq!(
        rolled_back.outcome.as_err().map(String::as_str),
        Some("rollback failed")
    );
    assert_eq!(error.failures().count(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_error_raised_while_winding_down_after_the_deadline_is_kept_but_is_not_the_cause() {
    let start = Instant::now();
    let group = TaskGroup::<String>::builder()
        .timeout(ms(100))
        .grace(ms(50))
        .build()
        .unwrap();
    group.spawn("quick", sleep_ok(ms(10)));
    group.spawn("query", async move {
        let ctx = current();
        tokio::select! {
            () = sleep(ms(10_000)) => Ok(ms(10_000)),
            // The PostgreSQL pattern: on the signal, send a cancel request; the statement then
            // fails with the server's error.
            () = ctx.cancelled() => Err("canceling statement due to user request".to_owned()),
        }
    });
    let error = group.join().await.unwrap_err();
    assert_eq!(start.elapsed(), ms(100));
    assert_eq!(error.kind(), &GroupErrorKind::DeadlineExceeded);
    assert!(error.cause().is_none());
    let query = error.report().by_name("query").unwrap();
    assert_eq!(
        query.outcome.as_err().map(String::as_str),
        Some("canceling statement due to user request")
    );
    assert_eq!(error.failures().count(), 1);
    assert_eq!(
        error.to_string(),
        "task group `taskgroup` exceeded its deadline; 1 child(ren) cut off"
    );
}

#[tokio::test(start_paused = true)]
async fn a_child_timeout_during_the_grace_period_is_not_the_cause() {
    let start = Instant::now();
    let group = TaskGroup::<String>::builder()
        .timeout(ms(50))
        .grace(ms(100))
        .build()
        .unwrap();
    // Ignores the signal at 50 ms; its own timeout cuts it off at 80 ms, inside the grace period.
    group
        .child("stubborn")
        .timeout(ms(80))
        .spawn(sleep_ok(ms(10_000)));
    let error = group.join().await.unwrap_err();
    assert_eq!(start.elapsed(), ms(80));
    assert_eq!(error.kind(), &GroupErrorKind::DeadlineExceeded);
    assert!(error.cause().is_none());
    assert!(matches!(
        error.report().get_index(0).unwrap().outcome,
        Outcome::TimedOut(Timeout {
            limit: Limit::Child,
            ..
        })
    ));
}

#[tokio::test(start_paused = true)]
async fn a_child_still_running_at_the_deadline_is_cut_off_even_if_it_winds_down_cleanly() {
    let group = TaskGroup::<String>::builder()
        .policy(Policy::CollectAll)
        .timeout(ms(100))
        .grace(ms(50))
        .build()
        .unwrap();
    let partial = group.spawn("partial", async move {
        let ctx = current();
        ctx.cancelled().await;
        Ok("what was ready")
    });
    let error = group.join().await.unwrap_err();
    assert_eq!(error.kind(), &GroupErrorKind::DeadlineExceeded);
    assert_eq!(partial.output().unwrap(), "what was ready");
}

#[tokio::test(start_paused = true)]
async fn a_panic_while_winding_down_is_still_reported_as_the_cause() {
    let group = TaskGroup::<String>::builder()
        .grace(ms(50))
        .build()
        .unwrap();
    group.spawn("buggy-cleanup", async move {
        let ctx = current();
        ctx.cancelled().await;
        if ctx.is_stopping() {
            panic!("cleanup bug");
        }
        Ok(())
    });
    sleep(ms(1)).await;
    group.cancel();
    let error = group.join().await.unwrap_err();
    assert_eq!(error.kind(), &GroupErrorKind::ChildFailed);
    let cause = error.cause().unwrap();
    assert_eq!(cause.name, "buggy-cleanup");
    assert!(matches!(cause.outcome, Outcome::Panicked(_)));
}

#[tokio::test(start_paused = true)]
async fn a_deadline_that_passes_after_everything_finished_is_not_an_error() {
    let group = TaskGroup::<String>::builder()
        .timeout(ms(100))
        .build()
        .unwrap();
    group.spawn("quick", sleep_ok(ms(10)));
    sleep(ms(500)).await;
    let report = group.join().await.unwrap();
    assert_eq!(report.count(OutcomeKind::Ok), 1);
}

#[tokio::test(start_paused = true)]
async fn an_empty_group_joins_at_once() {
    let group = TaskGroup::<String>::new().unwrap();
    let report = group.join().await.unwrap();
    assert!(report.is_empty());
}

// Bad input gets a typed error, never a panic.

#[test]
fn building_outside_a_runtime_is_an_error() {
    assert_eq!(
        TaskGroup::<String>::new().unwrap_err(),
        BuildError::NoRuntime
    );
}

#[tokio::test]
async fn a_zero_limit_is_an_error() {
    let error = TaskGroup::<String>::builder().limit(0).build().unwrap_err();
    assert_eq!(error, BuildError::ZeroLimit);
    assert_eq!(
        error.to_string(),
        "the concurrency limit must be at least 1"
    );
}

#[tokio::test(start_paused = true)]
async fn timeouts_too_long_to_represent_mean_no_limit() {
    let group = TaskGroup::<String>::builder()
        .timeout(Duration::MAX)
        .build()
        .unwrap();
    assert_eq!(group.deadline(), None);
    let child = group
        .child("patient")
        .timeout(Duration::MAX)
        .spawn(async move {
            let ctx = current();
            Ok(ctx.remaining())
        });
    group.join().await.unwrap();
    assert_eq!(child.output().unwrap(), None);
}

/// Runs `f` on a current-thread runtime without a time driver, returning its panic message.
fn panic_without_timer(f: impl FnOnce() + std::panic::UnwindSafe) -> String {
    let payload = std::panic::catch_unwind(f).expect_err("it panics");
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default()
}

#[test]
fn a_deadline_or_grace_without_a_time_driver_panics_at_build_as_tokio_does() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let _entered = runtime.enter();
    for builder in [
        TaskGroup::<String>::builder().timeout(ms(10)),
        TaskGroup::<String>::builder().grace(ms(10)),
    ] {
        let message = panic_without_timer(move || drop(builder.build()));
        assert!(message.contains("timers are disabled"), "{message}");
    }
    // Without a deadline the same runtime is fine.
    runtime.block_on(async {
        let group = TaskGroup::<String>::new().unwrap();
        let handle = group.spawn("plain", async { Ok(1) });
        group.join().await.unwrap();
        assert_eq!(handle.output().unwrap(), 1);
    });
}

#[test]
fn a_child_timeout_without_a_time_driver_is_that_childs_panic() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let group = TaskGroup::<String>::builder()
            .policy(Policy::CollectAll)
            .build()
            .unwrap();
        let plain = group.spawn("plain", async { Ok(1) });
        let timed = group.child("timed").timeout(ms(10)).spawn(async { Ok(2) });
        let error = group.join().await.unwrap_err();
        assert_eq!(error.cause().unwrap().name, "timed");
        let Outcome::Panicked(panic) = &error.report().get(&timed).unwrap().outcome else {
            panic!("not a panic: {error:?}");
        };
        assert!(panic.message().contains("timers are disabled"));
        assert_eq!(plain.output().unwrap(), 1);
    });
}

/// A child output that calls back into its group when dropped: a destructor run under the group's
/// lock would deadlock on it.
struct CallsBack(Spawner<String>, Arc<AtomicUsize>);

impl Drop for CallsBack {
    fn drop(&mut self) {
        self.1.store(self.0.stats().spawned, Ordering::SeqCst);
    }
}

#[test]
fn dropping_a_group_drops_untaken_outputs_outside_its_lock() {
    let seen = Arc::new(AtomicUsize::new(0));
    let seen_in_thread = Arc::clone(&seen);
    let (done, finished) = std::sync::mpsc::channel();
    // On its own thread, so that a deadlock fails the test instead of hanging it.
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(async move {
            let group = TaskGroup::<String>::new().unwrap();
            let spawner = group.spawner();
            // The handle is dropped, so only the group holds the output once the child is done.
            drop(group.spawn(
                "output",
                async move { Ok(CallsBack(spawner, seen_in_thread)) },
            ));
            sleep(ms(1)).await;
            drop(group);
        });
        let _ = done.send(());
    });
    finished
        .recv_timeout(Duration::from_secs(30))
        .expect("dropping the group deadlocked");
    assert_eq!(seen.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_handed_out_token_cannot_cancel_the_group() {
    let group = TaskGroup::<String>::new().unwrap();
    let outside = group.token();
    let child = group.spawn("child", async move {
        let ctx = current();
        let token = ctx.token();
        token.cancel();
        sleep(ms(10)).await;
        Ok(ctx.is_stopping())
    });
    outside.cancel();
    let report = group.join().await.unwrap();
    assert_eq!(report.count(OutcomeKind::Ok), 1);
    assert!(
        !child.output().unwrap(),
        "the group's own token was not cancelled"
    );
}

#[tokio::test(start_paused = true)]
async fn handed_out_tokens_are_cancelled_when_the_group_stops() {
    let group = TaskGroup::<String>::new().unwrap();
    let outside = group.token();
    group.spawn("fails", sleep_err(ms(5), "x"));
    group.join().await.unwrap_err();
    assert!(outside.is_cancelled());
}

/// A future whose destructor panics, to check the group survives user code that misbehaves.
struct PanicsOnDrop(Duration);

impl Drop for PanicsOnDrop {
    fn drop(&mut self) {
        panic!("destructor panicked");
    }
}

#[tokio::test(start_paused = true)]
async fn a_panicking_destructor_is_reported_and_does_not_hang_join() {
    let group = TaskGroup::<String>::builder()
        .policy(Policy::CollectAll)
        .build()
        .unwrap();
    // Completes, then panics while its future is dropped.
    group.spawn("completes", async {
        let guard = PanicsOnDrop(ms(1));
        sleep(guard.0).await;
        Ok(())
    });
    // Aborted by the first one's panic, and panics again while being dropped.
    group.spawn("aborted", async {
        let _guard = PanicsOnDrop(ms(0));
        sleep(ms(60_000)).await;
        Ok(())
    });
    let error = tokio::time::timeout(ms(1_000), group.join())
        .await
        .expect("join returned")
        .unwrap_err();
    assert_eq!(error.cause().unwrap().name, "completes");
    assert_eq!(error.report().count(OutcomeKind::Panicked), 2);
}

// 12. A scoped form.

#[tokio::test(start_paused = true)]
async fn a_scope_returns_the_bodys_value_once_every_child_is_done() {
    let finished = DropCounter::default();
    let start = Instant::now();
    let value = TaskGroup::<String>::scope(|group| {
        let flag = finished.flag();
        async move {
            group.spawn("background", async move {
                let _flag = flag;
                sleep(ms(100)).await;
                Ok(())
            });
            Ok(42)
        }
    })
    .await
    .unwrap();
    assert_eq!(value, 42);
    assert_eq!(start.elapsed(), ms(100), "the scope waited for its child");
    assert_eq!(finished.dropped(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_early_return_from_a_scope_cancels_and_awaits_its_children() {
    let dropped = DropCounter::default();
    let start = Instant::now();
    let result: Result<(), _> = TaskGroup::<String>::builder()
        .grace(ms(20))
        .scope(|group| {
            let flag = dropped.flag();
            async move {
                group.spawn("cleans-up", async move {
                    let _flag = flag;
                    current().cancelled().await;
                    sleep(ms(10)).await;
                    Ok(())
                });
                sleep(ms(5)).await;
                Err("validation failed".to_owned())?;
                Ok(())
            }
        })
        .await;
    let Err(taskgroup::ScopeError::Body { error, report }) = result else {
        panic!("expected the body's error");
    };
    assert_eq!(error, "validation failed");
    // Cancelled at 5 ms, cleaned up for 10 ms, and awaited before the scope returned.
    assert_eq!(start.elapsed(), ms(15));
    assert_eq!(dropped.dropped(), 1);
    assert_eq!(report.len(), 1);
}
