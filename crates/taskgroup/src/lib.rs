//! Structured concurrency for tokio: task groups whose children cannot outlive them.
//!
//! A [`TaskGroup`] is tokio's answer to Python's `asyncio.TaskGroup`, Trio's nurseries and
//! Kotlin's `coroutineScope`: children spawned into a group belong to it; when one fails, the
//! others are cancelled; and the group is done only when every child is. It is built from plain
//! tokio tasks and a `tokio_util` [`CancellationToken`], and knows nothing of HTTP or SQL.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use taskgroup::{Outcome, Policy, TaskGroup};
//!
//! #[derive(Debug, thiserror::Error)]
//! enum SourceError {
//!     #[error("user not found")]
//!     NotFound,
//! }
//!
//! // A dashboard: one essential source and optional ones, each with its own timeout, under an
//! // overall deadline.
//! let group = TaskGroup::<SourceError>::builder()
//!     .name("dashboard")
//!     .policy(Policy::CollectAll)
//!     .timeout(Duration::from_secs(2))
//!     .build()?;
//! let profile = group.child("profile").essential(true).spawn(async { Ok("alice") });
//! let orders = group
//!     .child("orders")
//!     .timeout(Duration::from_millis(250))
//!     .spawn(async { Ok(vec![101, 102]) });
//! let recommendations = group
//!     .child("recommendations")
//!     .timeout(Duration::from_millis(250))
//!     .spawn_with(|ctx| async move {
//!         // The child sizes its own HTTP timeout from its remaining budget.
//!         let budget = ctx.remaining().unwrap_or(Duration::MAX);
//!         tokio::time::sleep(Duration::from_secs(1).min(budget * 2)).await;
//!         Ok(vec!["book"])
//!     });
//!
//! let report = group.join().await?; // only an essential failure, a panic or the deadline fail it
//! assert_eq!(profile.output()?, "alice");
//! assert_eq!(orders.output()?, [101, 102]);
//! assert!(recommendations.output().is_err());
//! let errors: Vec<String> = report
//!     .iter()
//!     .filter(|child| !child.outcome.is_ok())
//!     .map(|child| format!("{}: {}", child.name, child.outcome))
//!     .collect();
//! assert_eq!(errors, ["recommendations: timed out after 250ms (child timeout)"]);
//! # Ok(())
//! # }
//! ```
//!
//! # Guarantees
//!
//! Each of these is tested, most of them also as properties over random groups
//! (`tests/properties.rs`).
//!
//! 1. **No child outlives the group.** [`TaskGroup::join`] returns only after every child has
//!    finished (completed, failed, or been cancelled) *and its future has been dropped*, so its
//!    resources are released. A group dropped without being joined (say, because actix dropped a
//!    handler whose client went away, taking the `join` future with it) aborts every child at
//!    once; an aborted child is never polled again and is dropped the next time the runtime
//!    reaches it. There is no way to detach a child.
//! 2. **Fail-fast by default.** Under [`Policy::FailFast`] the first child to return `Err`, panic
//!    or hit its own timeout cancels every sibling (queued children never start), then `join`
//!    drains them and returns a [`GroupError`] of kind [`GroupErrorKind::ChildFailed`]. Its
//!    [`cause`](GroupError::cause) is that first failure; every other failure (for instance an
//!    error a sibling raised while winding down) is kept in the [`Report`], tagged with the
//!    child's name. Siblings that were merely cancelled are reported as
//!    [`Outcome::Cancelled`], not as failures. The first reason to stop is the verdict: an error
//!    or a child timeout that comes after the group has started stopping (for a sibling's
//!    failure, its deadline or a cancellation) is that child's outcome in the report, listed by
//!    [`GroupError::failures`], but it is never the cause and never changes the error's kind.
//! 3. **Panics are loud and safe.** A child's panic is caught in the child's own task, cancels
//!    the siblings at that moment (not when the owner gets round to `join`), and is logged at
//!    once with the group's and child's names at `ERROR` level. `join` returns it as
//!    [`Outcome::Panicked`] whose [`Panic`] payload can be re-raised with [`Panic::resume`] or
//!    [`GroupError::resume_panic`]. A panic stops the group under every policy, and it is the one
//!    failure that is reported as the cause even when it comes after the group started stopping
//!    for its deadline or a cancellation (a bug in a child's clean-up does not hide behind the
//!    deadline); only a child's failure that came before it takes precedence. A plain
//!    cancellation never becomes a panic, and the group itself never panics: misuse gets a typed
//!    error ([`BuildError`], [`SpawnError`], [`ChildError`], [`CancelReason::TimerDisabled`]).
//! 4. **Policies.** [`Policy::FailFast`] (`asyncio.TaskGroup`, `coroutineScope`) and
//!    [`Policy::CollectAll`] (`gather(return_exceptions=True)`, `supervisorScope`): failures do not
//!    cancel siblings and `join` returns every outcome. [`ChildBuilder::essential`] overrides the
//!    policy for one child. Every child ends in exactly one [`Outcome`]: `Ok`, `Err`, `Panicked`,
//!    `Cancelled` (with a [`CancelReason`]) or `TimedOut` (with the [`Limit`] that fired: the
//!    child's own timeout or the group's deadline).
//! 5. **Typed handles.** Each spawn returns a [`TaskHandle<T>`](TaskHandle) typed by that child's
//!    output, so children of different output types share one group. Await a handle while the
//!    group runs, or read it after `join`; outputs of children that finished before a failure or
//!    deadline stay readable. Errors and panic payloads are delivered once, by `join`; a handle
//!    says why it has no output with a [`ChildError`].
//! 6. **Ordered map with a limit.** [`TaskGroup::map`] runs one child per input with at most the
//!    group's limit in flight and returns the outcomes in input order, under the group's policy.
//! 7. **Concurrency limit with backpressure.** With [`Builder::limit`]`(n)` at most `n` children
//!    run at once. Spawning beyond the limit queues the child without starting it: it is not a
//!    tokio task yet, and its future (or `spawn_with` closure) is neither polled nor called until
//!    a slot frees up, in spawn order. A queued child costs its future and its result slot, nothing
//!    more. Cancelling the group discards queued children without running them. Spawning never
//!    waits, so a child that spawns siblings and awaits them while holding the group's last slot
//!    waits for a slot that it holds: bound such groups with a deadline.
//! 8. **Deadlines that nest.** [`Builder::timeout`] or [`Builder::deadline`] bound the whole
//!    group: when the deadline passes, what is left is cut off ([`Limit::Group`]), `join` reports
//!    [`GroupErrorKind::DeadlineExceeded`], and finished outputs stay readable. With a grace
//!    period, a child still running at the deadline may wind down and return `Ok` or `Err`; it
//!    reports what it returned, and still counts as cut off. A group built with
//!    [`Builder::nested_in`] inherits the tighter of its parent's deadline and the parent child's
//!    own timeout, and a child reads its remaining budget with [`ChildContext::remaining`]. This
//!    replaces the advice (the seed's section 十) to avoid nesting `asyncio.timeout` in a group.
//! 9. **Cooperative and forced cancellation.** Children can watch [`ChildContext::token`] to clean
//!    up (send a PostgreSQL cancel request, say). With [`Builder::grace`], cancellation is
//!    two-phase: signal the token, wait the grace period, abort what is still running, drain.
//!    What a child returns after the signal (the server's "canceling statement due to user
//!    request" error, say) is its outcome in the report, but does not change why the group
//!    stopped: `join` still reports the deadline or the cancellation (guarantee 2).
//!    Cancelling a group cancels the groups nested in it, and [`Builder::cancel_on`] links a group
//!    to an outside token such as a server's shutdown signal. Links add up: a group can be nested
//!    in a child and linked to outside tokens at once, and any of them cancels it.
//! 10. **A spawner children can use.** [`Spawner`] is a cloneable handle for adding siblings from
//!     anywhere; `join` waits for them too. Once the group is stopping or joined,
//!     [`Spawner::try_spawn`] refuses with a [`SpawnError`] that gives the future back (Swift's
//!     `addTaskUnlessCancelled`, Python's "TaskGroup is shutting down").
//! 11. **Outcomes say why.** [`GroupErrorKind`] tells apart a child's failure, the deadline and a
//!     cancellation from outside, and the first of them to happen is the one reported: a child's
//!     failure before the deadline or a cancellation wins over them, as in asyncio, while an
//!     error a child returns after the signal, as it winds down, does not (asyncio lets such an
//!     error replace the cancellation; here a deadline stays a deadline). A panic is reported as
//!     the cause either way (guarantee 3).
//! 12. **Visible.** Children run inside the spawner's `tracing` span; [`TaskGroup::stats`] gives
//!     spawned, queued, running, succeeded, failed, panicked, cancelled and timed-out counts; and
//!     [`live_children`] is a process-wide gauge of children not yet dropped, for `/metrics` and for
//!     tests that prove nothing leaks.
//!
//! Every group needs a tokio runtime (current-thread or multi-thread); deadlines, grace periods and
//! child timeouts need its time driver (without one, [`Builder::build`] refuses a deadline or grace
//! period with [`BuildError::TimerDisabled`], and a child with a timeout is refused at spawn with
//! [`CancelReason::TimerDisabled`]). Children must be `Send + 'static`, like any tokio task. A
//! group without a deadline waits as long as its children do, so bound it with a deadline where a
//! wait must be bounded. If the runtime shuts down under a group, the group stops: running
//! children are dropped by tokio and queued ones discarded, all reported as cancelled with
//! [`CancelReason::RuntimeShutdown`].
//!
//! # What a group keeps until `join`
//!
//! A group is meant for one unit of work (a request, a batch): it releases nothing per child
//! until it is joined or dropped. For every child ever spawned into it, it keeps the child's
//! `JoinHandle` (which keeps tokio's task cell of 128 bytes or more allocated, though the child's
//! future is dropped as soon as it finishes), its result slot (about 96 bytes) and registry entry,
//! and whatever the child left in the slot: its output until the handle takes it (for ever, if the
//! handle was dropped), and every error value `E` and panic payload, which only `join` hands out.
//! A long-lived group that keeps spawning (one child per connection of a server, say) therefore
//! grows without bound: give each unit of work its own group, or join and replace the group from
//! time to time.
//!
//! # The seed's examples
//!
//! Section 三: three fetches; the one that fails cancels the others, and outputs of children that
//! had already finished stay readable. (The article's own delays, 0.5 s and 0.8 s against a
//! failure at 0.3 s, would leave nothing finished; `tests/seed.rs` runs both versions.)
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), taskgroup::BuildError> {
//! use std::time::Duration;
//! use taskgroup::{ChildErrorKind, TaskGroup};
//!
//! async fn fetch_user(user_id: u32, delay_ms: u64) -> Result<String, std::io::Error> {
//!     tokio::time::sleep(Duration::from_millis(delay_ms)).await;
//!     if user_id == 0 {
//!         return Err(std::io::Error::other(format!("无效的用户ID: {user_id}")));
//!     }
//!     Ok(format!("用户{user_id}"))
//! }
//!
//! let group = TaskGroup::new()?;
//! let task1 = group.spawn("task1", fetch_user(1, 100));
//! let task2 = group.spawn("task2", fetch_user(2, 800));
//! let task3 = group.spawn("task3", fetch_user(0, 300));
//! let error = group.join().await.unwrap_err();
//! assert_eq!(error.to_string(), "task group `taskgroup`: child `task3` failed: 无效的用户ID: 0");
//! assert_eq!(task1.output().unwrap(), "用户1"); // finished before the failure: kept
//! assert!(matches!(task2.output().unwrap_err().kind, ChildErrorKind::Cancelled(_)));
//! assert_eq!(task3.output().unwrap_err().kind, ChildErrorKind::Failed);
//! # Ok(())
//! # }
//! ```
//!
//! Section 八: `gather(return_exceptions=True)` is a collect-all group; a fail-fast group raises
//! the failure instead.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use taskgroup::{GroupErrorKind, Policy, TaskGroup};
//!
//! async fn risky_task(name: &str, fail: bool) -> Result<String, std::io::Error> {
//!     tokio::time::sleep(Duration::from_millis(100)).await;
//!     if fail {
//!         return Err(std::io::Error::other(format!("{name} 失败")));
//!     }
//!     Ok(format!("{name} 成功"))
//! }
//! let tasks = [("A", false), ("B", true), ("C", false)];
//!
//! let gather = TaskGroup::builder().policy(Policy::CollectAll).build()?;
//! let outcomes = gather.map(tasks, |(name, fail)| risky_task(name, fail)).await?;
//! let shown: Vec<String> = outcomes.iter().map(ToString::to_string).collect();
//! assert_eq!(shown, ["ok", "B 失败", "ok"]);
//! assert_eq!(outcomes.into_iter().next().and_then(|o| o.ok()).as_deref(), Some("A 成功"));
//!
//! let fail_fast = TaskGroup::new()?;
//! let error = fail_fast.map(tasks, |(name, fail)| risky_task(name, fail)).await.unwrap_err();
//! assert_eq!(error.kind(), &GroupErrorKind::ChildFailed);
//! assert_eq!(error.cause().map(|c| &*c.name), Some("taskgroup[1]"));
//! # Ok(())
//! # }
//! ```
//!
//! # Panics, and Go's errgroup
//!
//! Go's `x/sync/errgroup` added panic propagation (a panic in a goroutine recovered and re-raised
//! from `Wait`) and reverted it in 2025. The objections, and how this crate answers each:
//!
//! * *The panic is delayed until `Wait`, possibly for ever, and the program keeps running in the
//!   meantime.* Here nothing waits for `join`: the child's own task catches the panic, cancels the
//!   siblings at that instant, and logs it at once with the child's name. If nobody ever joins,
//!   the panic has still been acted on and reported.
//! * *Re-panicking from another goroutine hides the original stack from crash tooling.* In Rust
//!   the panic hook runs at the panic site, before unwinding, so the standard message, a
//!   `RUST_BACKTRACE` backtrace and any crash reporter installed in the hook see the original
//!   location and stack. Re-raising with [`Panic::resume`] uses `std::panic::resume_unwind`, which
//!   does not run the hook again: no second, misleading report from the joining task.
//! * *Recovering hides crashes that should take the process down.* A panic is never swallowed: it
//!   fails the group under every policy, `join` returns it as the cause with its payload, and the
//!   owner decides to re-raise or to answer with an error. A program that wants every panic to be
//!   fatal builds with `panic = "abort"`, and then nothing is caught at all.
//!
//! # Compared with
//!
//! | | `TaskGroup` | `JoinSet` | `TaskTracker` | `asyncio.TaskGroup` | Trio nursery |
//! |---|---|---|---|---|---|
//! | Children end with the scope | join waits; drop aborts | drop aborts, does not wait | waits, never aborts | yes | yes |
//! | Fail-fast | default, or per child | by hand | by hand (token) | yes | yes |
//! | Keeps every error | yes, first is the cause | one at a time | no results | `ExceptionGroup` | `ExceptionGroup` |
//! | Collect-all policy | yes | by hand | no | no (`gather`) | no |
//! | Typed per-child results | handles, any mix of types | one type, completion order | handles | tasks | no |
//! | Concurrency limit | built in, queued unstarted | no | no | no (semaphore) | no (`CapacityLimiter`) |
//! | Deadline, nested | yes, per child and per group | no | no | `asyncio.timeout` | cancel scopes |
//! | Panics | caught, siblings cancelled at once | `JoinError` at join | lost | exceptions | exceptions |
//!
//! What it costs: per child, the same two allocations as `JoinSet` (the task, plus a result slot
//! of about 96 bytes where `JoinSet` has a 56-byte list entry), a few relaxed atomic updates, and
//! the process-wide gauge. A child with a small future fits one 128-byte tokio task cell, as a
//! `JoinSet` child does; options that only some children use (a timeout, an active tracing span)
//! live in a separate box. A queued child is not a task until it starts. The crate's README has
//! the benchmark numbers: per child about level with `JoinSet`, cancellation faster than
//! `JoinSet::shutdown()`.

mod child;
mod context;
mod group;
mod handle;
mod map;
mod outcome;
mod report;

pub use context::ChildContext;
pub use group::{
    BuildError, Builder, ChildBuilder, Policy, SpawnError, Spawner, Stats, TaskGroup, live_children,
};
pub use handle::TaskHandle;
pub use outcome::{
    CancelReason, ChildError, ChildErrorKind, Limit, Outcome, OutcomeKind, Panic, Timeout,
};
pub use report::{ChildReport, GroupError, GroupErrorKind, Report};
pub use tokio_util::sync::CancellationToken;

#[cfg(test)]
mod tests {
    /// tokio stores a task in one 128-byte cell when its future is at most 24 bytes (on 64-bit
    /// targets), and in two otherwise. A child's task wraps a small future in 24 bytes so that a
    /// task group's children take no more task memory than `JoinSet`'s; this keeps it that way.
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn a_small_childs_task_stays_within_one_tokio_cell() {
        type Small = std::future::Ready<Result<u8, std::convert::Infallible>>;
        type Task = crate::child::ChildTask<crate::child::Ready<Small>, std::convert::Infallible>;
        assert!(std::mem::size_of::<Task>() <= 24);
    }

    /// The types a service passes around must cross threads: a group and its `join` future can
    /// live in a spawned task, and a `GroupError` can go into `anyhow::Error` or
    /// `Box<dyn Error + Send + Sync>`.
    #[test]
    fn public_types_are_send_and_sync_where_services_need_them() {
        fn send<T: Send>(_: &T) {}
        fn send_sync_static<T: Send + Sync + 'static>() {}
        type E = std::io::Error;
        send_sync_static::<crate::TaskGroup<E>>();
        send_sync_static::<crate::Spawner<E>>();
        send_sync_static::<crate::TaskHandle<Vec<u8>>>();
        send_sync_static::<crate::GroupError<E>>();
        send_sync_static::<crate::Report<E>>();
        send_sync_static::<crate::ChildError>();
        send_sync_static::<crate::BuildError>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _guard = runtime.enter();
        let group = crate::TaskGroup::<E>::new().unwrap();
        let join = group.join();
        send(&join);
        let boxed: Box<dyn std::error::Error + Send + Sync> =
            Box::new(crate::GroupError::<E>::new(
                crate::GroupErrorKind::DeadlineExceeded,
                None,
                crate::Report::new("g".into(), 0, Vec::new()),
            ));
        assert_eq!(
            boxed.to_string(),
            "task group `g` exceeded its deadline; 0 child(ren) cut off"
        );
    }
}
