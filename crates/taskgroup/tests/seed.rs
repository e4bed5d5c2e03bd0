//! The seed article's own examples (sections 三 and 八), translated to task groups and checked on
//! tokio's paused clock, so every instant asserted here is exact and the tests are deterministic.
//!
//! One correction to the article is made on purpose: section 三 claims tasks 1 and 2 (0.5 s and
//! 0.8 s) "finished before task 3 failed" (at 0.3 s). They cannot have; with the article's delays
//! they are still sleeping and are cancelled. `section_3_with_the_seeds_delays` shows what really
//! happens, and `section_3_outputs_of_finished_children_stay_readable` shows the behaviour the
//! article meant, with delays where tasks 1 and 2 do finish first.

use std::time::Duration;

use taskgroup::{
    CancelReason, ChildErrorKind, GroupErrorKind, Outcome, OutcomeKind, Policy, TaskGroup,
};
use tokio::time::{Instant, sleep};

#[derive(Debug, PartialEq, Eq)]
struct User {
    id: u32,
    name: String,
}

/// Section 三's `fetch_user`: sleeps, then fails for id 0.
async fn fetch_user(user_id: u32, delay: Duration) -> Result<User, String> {
    sleep(delay).await;
    if user_id == 0 {
        return Err(format!("无效的用户ID: {user_id}"));
    }
    Ok(User {
        id: user_id,
        name: format!("用户{user_id}"),
    })
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[tokio::test(start_paused = true)]
async fn section_3_with_the_seeds_delays() {
    let start = Instant::now();
    let group = TaskGroup::new().unwrap();
    let task1 = group.spawn("task1", fetch_user(1, ms(500)));
    let task2 = group.spawn("task2", fetch_user(2, ms(800)));
    let task3 = group.spawn("task3", fetch_user(0, ms(300)));

    let error = group.join().await.unwrap_err();

    // The group ends when task 3 fails, not when the slowest sibling would have finished.
    assert_eq!(start.elapsed(), ms(300));
    assert_eq!(error.kind(), &GroupErrorKind::ChildFailed);
    let cause = error.cause().unwrap();
    assert_eq!(cause.name, "task3");
    assert_eq!(cause.outcome.as_err().unwrap(), "无效的用户ID: 0");
    assert_eq!(
        error.to_string(),
        "task group `taskgroup`: child `task3` failed: 无效的用户ID: 0"
    );
    // Tasks 1 and 2 were still sleeping: they are reported as cancelled, not as failures.
    assert_eq!(error.failures().count(), 1);
    let sibling_failed = CancelReason::SiblingFailed {
        name: "task3".into(),
    };
    for handle in [task1, task2] {
        let err = handle.await.unwrap_err();
        assert_eq!(err.kind, ChildErrorKind::Cancelled(sibling_failed.clone()));
    }
    assert_eq!(task3.await.unwrap_err().kind, ChildErrorKind::Failed);
}

#[tokio::test(start_paused = true)]
async fn section_3_outputs_of_finished_children_stay_readable() {
    let group = TaskGroup::new().unwrap();
    let task1 = group.spawn("task1", fetch_user(1, ms(100)));
    let task2 = group.spawn("task2", fetch_user(2, ms(200)));
    let task3 = group.spawn("task3", fetch_user(0, ms(300)));

    let error = group.join().await.unwrap_err();

    assert_eq!(error.cause().unwrap().name, "task3");
    assert_eq!(error.report().count(OutcomeKind::Ok), 2);
    assert_eq!(task1.output().unwrap().name, "用户1");
    assert_eq!(task2.output().unwrap().id, 2);
    assert!(task3.output().is_err());
}

#[tokio::test(start_paused = true)]
async fn section_3_awaiting_handles_inside_the_group() {
    // Like `results[1] = await task1` inside the `async with` block: the owner awaits handles
    // while the group runs, and sees task 3's failure as an error on that handle.
    let group = TaskGroup::new().unwrap();
    let task1 = group.spawn("task1", fetch_user(1, ms(100)));
    let task3 = group.spawn("task3", fetch_user(0, ms(300)));

    let first = task1.await.unwrap();
    assert_eq!(first.id, 1);
    let third = task3.await.unwrap_err();
    assert_eq!(third.kind, ChildErrorKind::Failed);
    assert_eq!(third.name, "task3");

    let error = group.join().await.unwrap_err();
    assert_eq!(
        error.into_cause().unwrap().outcome.err().unwrap(),
        "无效的用户ID: 0"
    );
}

/// Section 八's `risky_task`.
async fn risky_task(name: &'static str, fail: bool) -> Result<String, String> {
    sleep(ms(100)).await;
    if fail {
        return Err(format!("{name} 失败"));
    }
    Ok(format!("{name} 成功"))
}

#[tokio::test(start_paused = true)]
async fn section_8_collect_all_is_gather_with_return_exceptions() {
    let group = TaskGroup::builder()
        .policy(Policy::CollectAll)
        .build()
        .unwrap();
    let outcomes = group
        .map([("A", false), ("B", true), ("C", false)], |(name, fail)| {
            risky_task(name, fail)
        })
        .await
        .unwrap();

    let shown: Vec<String> = outcomes.iter().map(ToString::to_string).collect();
    assert_eq!(shown, ["ok", "B 失败", "ok"]);
    assert!(matches!(&outcomes[0], Outcome::Ok(s) if s == "A 成功"));
    assert!(matches!(&outcomes[1], Outcome::Err(e) if e == "B 失败"));
    assert!(matches!(&outcomes[2], Outcome::Ok(s) if s == "C 成功"));
}

#[tokio::test(start_paused = true)]
async fn section_8_catching_inside_each_child_keeps_every_result() {
    // The seed's second variant: each child handles its own error, so nothing fails the group and
    // results come back in spawn order.
    let group = TaskGroup::<String>::new().unwrap();
    let handles: Vec<_> = [("A", false), ("B", true), ("C", false)]
        .into_iter()
        .map(|(name, fail)| {
            group.spawn(name, async move {
                Ok(match risky_task(name, fail).await {
                    Ok(value) => value,
                    Err(error) => format!("{name} 错误: {error}"),
                })
            })
        })
        .collect();
    group.join().await.unwrap();
    let collected: Vec<String> = handles.into_iter().map(|h| h.output().unwrap()).collect();
    assert_eq!(collected, ["A 成功", "B 错误: B 失败", "C 成功"]);
}

#[tokio::test(start_paused = true)]
async fn section_8_fail_fast_raises_the_failure() {
    let start = Instant::now();
    let group = TaskGroup::new().unwrap();
    for (name, fail) in [("A", false), ("B", true), ("C", false)] {
        group.spawn(name, risky_task(name, fail));
    }
    let error = group.join().await.unwrap_err();
    assert_eq!(start.elapsed(), ms(100));
    assert_eq!(error.cause().unwrap().name, "B");
    // A and C were due at the same instant as B; each either finished first or was cancelled,
    // and neither is reported as a failure.
    assert_eq!(error.failures().count(), 1);
    for child in error.report().iter().filter(|c| c.name != "B") {
        assert!(matches!(
            child.outcome.kind(),
            OutcomeKind::Ok | OutcomeKind::Cancelled
        ));
    }
}
