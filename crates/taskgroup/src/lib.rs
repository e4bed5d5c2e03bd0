//! Structured concurrency for tokio: task groups whose children cannot outlive them, at any depth.
//!
//! A [`TaskGroup`] is tokio's answer to Python's `asyncio.TaskGroup`, Trio's nurseries and
//! Kotlin's `coroutineScope`: children spawned into a group belong to it; when one fails, the
//! others are cancelled; and the group is done only when every child is, including the children
//! of groups built inside its children. It is built from plain tokio tasks and knows nothing of
//! HTTP or SQL.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use taskgroup::{ChildContext, Policy, TaskGroup};
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
//!     .spawn(async {
//!         // The child sizes its own waits from its remaining budget.
//!         let budget = ChildContext::current().and_then(|c| c.remaining()).unwrap_or(Duration::MAX);
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
//! Each of these is tested (`tests/`), most also as properties over random trees of groups on
//! both runtimes (`tests/properties.rs`), and the locking protocol behind 1 and 11 under loom
//! (`cargo xtask test` runs it with `--cfg taskgroup_loom`).
//!
//! 1. **No child outlives the group, at any depth.** [`TaskGroup::join`] returns only after
//!    every child has finished (completed, failed, or been cancelled) *and its future has been
//!    dropped*, so its resources are released; and only after every group built inside a child
//!    has been joined or dropped and every child of it, at any depth, is gone. A group built
//!    while a child's future is being polled is nested in that child's group without being told
//!    (the running child is found through a thread-local set for each poll, as Trio finds the
//!    enclosing nursery); see [`Builder::build`]. A group dropped without being joined stops its
//!    children (after its grace period, if any) without waiting, since a destructor cannot wait;
//!    but its parent does wait for them, as for any descendant. [`TaskGroup::scope`] is the form
//!    that always waits.
//!
//!    *What is not contained:* a task a child starts itself with `tokio::spawn`,
//!    `spawn_blocking` or a thread is not a child of any group, and no library can stop or await
//!    it. To spot one: inside it, [`ChildContext::current`] is `None`; and tokio's
//!    `Handle::current().metrics().num_alive_tasks()` exceeds [`live_children`] plus the tasks
//!    you run on purpose (a group's deadline watchdog and grace-period timer count as tasks
//!    there). Spawn such work into the group (a [`Spawner`]) instead.
//! 2. **Fail-fast by default.** The first failure cancels every sibling (queued children never
//!    start), and `join` returns it as the cause ([`GroupError::cause`]); every other failure
//!    stays in the report with the child's name, and siblings that were merely cancelled are
//!    reported as cancelled, not as failures.
//! 3. **Panics are loud and safe.** A panic in a child is caught in the child's task, cancels
//!    the siblings at that instant, is logged at once with the child's name, and is returned by
//!    `join` with a payload the caller can re-raise ([`Panic::resume`]), as the cause even when
//!    it happens while the group winds down for a deadline or cancellation. A plain cancellation
//!    never becomes a panic, and the group itself never panics but as tokio does for a timer on
//!    a runtime without a time driver (see [`Builder::build`]).
//! 4. **Policies.** [`Policy::FailFast`] (`asyncio.TaskGroup`, `coroutineScope`) and
//!    [`Policy::CollectAll`] (`gather(return_exceptions=True)`, `supervisorScope`): failures do not
//!    cancel siblings and `join` returns every outcome. [`ChildBuilder::essential`] overrides the
//!    policy for one child. Every child ends in exactly one [`Outcome`]: `Ok`, `Err`, `Panicked`,
//!    `Cancelled` (with a [`CancelReason`]) or `TimedOut` (with the [`Limit`] that fired: the
//!    child's own timeout or the group's deadline).
//! 5. **Typed handles.** Each spawn returns a [`TaskHandle<T>`](TaskHandle) typed by that child's
//!    output, so children of different output types share one group. Await a handle while the
//!    group runs, or read it after `join`; outputs of children that finished before a failure or
//!    deadline stay readable. [`TaskHandle::cancel`] cancels one child alone; [`as_completed`]
//!    yields outputs in the order children finish. Errors and panic payloads are delivered once,
//!    by `join`; a handle says why it has no output with a [`ChildError`].
//! 6. **Ordered map with a limit.** [`TaskGroup::map`] runs one child per input with at most the
//!    group's limit in flight and returns the outcomes in input order, under the group's policy.
//! 7. **Concurrency limit with backpressure.** With [`Builder::limit`]`(n)` at most `n` children
//!    run at once. Spawning beyond the limit queues the child without starting it: it is not a
//!    tokio task yet, and its future is not polled until a slot frees up, in spawn order. A
//!    queued child costs its future and its result slot, nothing more. Stopping the group
//!    discards queued children without running them. Spawning never waits, so a child that
//!    spawns siblings and awaits them while holding the group's last slot waits for a slot that it
//!    holds: bound such groups with a deadline.
//! 8. **Deadlines that nest.** [`Builder::timeout`] or [`Builder::deadline`] bound the whole
//!    group: when the deadline passes, what is left is cut off ([`Limit::Group`]), `join` reports
//!    [`GroupErrorKind::DeadlineExceeded`], and finished outputs stay readable. With a grace
//!    period, a child still running at the deadline may wind down and return `Ok` or `Err`; it
//!    reports what it returned, and still counts as cut off. A nested group inherits the tighter
//!    of its parent's deadline and the parent child's own timeout, and a child reads its
//!    remaining budget with [`ChildContext::remaining`].
//! 9. **Cooperative and forced cancellation.** Children can watch
//!    [`ChildContext::cancelled`] to clean up (send a PostgreSQL cancel request, say). With
//!    [`Builder::grace`], stopping is two-phase: signal, wait the grace period, abort what is
//!    still running, drain. A dropped group does the same. What a child returns after the signal
//!    is its outcome in the report, but does not change why the group stopped. Stopping a group
//!    stops the groups nested in it, and a nested group's grace period is at most half its
//!    parent's, so its report reaches the child that awaits it before the parent aborts that
//!    child. [`Builder::cancel_on`] links a group to outside tokens such as a server's shutdown
//!    signal; links add up with each other and with the parent.
//! 10. **A spawner children can use.** [`Spawner`] is a cloneable handle for adding siblings from
//!     anywhere; `join` waits for them too. A group that is stopping records a new child as
//!     cancelled without starting it; a joined group takes no child at all (its handle is in no
//!     report). [`ChildBuilder::try_spawn`] refuses instead, with a [`SpawnError`] that gives the
//!     future back (Swift's `addTaskUnlessCancelled`, Python's "TaskGroup is shutting down").
//! 11. **One verdict, decided once.** The first reason to stop is the verdict: a child's failure
//!     before the deadline or a cancellation wins over them, as in asyncio, while an error a
//!     child returns after the signal, as it winds down, does not (asyncio lets such an error
//!     replace the cancellation; here a deadline stays a deadline). A panic is reported as the
//!     cause either way (guarantee 3). The verdict is fixed in the same step that closes the
//!     group, so nothing (a watchdog, another thread's `cancel`) can change it after; and a
//!     deadline or cancellation that cut nothing off is no failure.
//! 12. **A scoped form.** [`TaskGroup::scope`] runs a body with a spawner and, however the body
//!     ends (a value, an early return with `?`, the group failing under it), cancels what must be
//!     cancelled and awaits every child before it returns.
//! 13. **Visible.** Children run inside the spawner's `tracing` span; [`TaskGroup::stats`] gives
//!     spawned, queued, running, succeeded, failed, panicked, cancelled and timed-out counts; and
//!     [`live_children`] is a process-wide gauge of children not yet dropped at every depth, for
//!     `/metrics` and for tests that prove nothing leaks.
//!
//! Every group needs a tokio runtime (current-thread or multi-thread); deadlines, grace periods and
//! child timeouts need its time driver. Children must be `Send + 'static`, like any tokio task. A
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
//! future is dropped as soon as it finishes), its result slot (about 100 bytes) and registry entry,
//! and whatever the child left in the slot: its output until the handle takes it (for ever, if the
//! handle was dropped), and every error value `E` and panic payload, which only `join` hands out.
//! A long-lived group that keeps spawning (one child per connection of a server, say) therefore
//! grows without bound: give each unit of work its own group.
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
//!
//! # Compared with
//!
//! | | `TaskGroup` | `JoinSet` | `TaskTracker` | `asyncio.TaskGroup` | Trio nursery |
//! |---|---|---|---|---|---|
//! | Children end with the scope | join waits, at every depth; drop stops | drop aborts, does not wait | waits, never aborts | yes | yes |
//! | Nested scopes contained | yes, found implicitly | no | no | no (explicit only) | yes |
//! | Fail-fast | default, or per child | by hand | by hand (token) | yes | yes |
//! | Keeps every error | yes, first is the cause | one at a time | no results | `ExceptionGroup` | `ExceptionGroup` |
//! | Collect-all policy | yes | by hand | no | no (`gather`) | no |
//! | Typed per-child results | handles, any mix of types | one type, completion order | handles | tasks | no |
//! | Concurrency limit | built in, queued unstarted | no | no | no (semaphore) | no (`CapacityLimiter`) |
//! | Deadline, nested | yes, per child and per group | no | no | `asyncio.timeout` | cancel scopes |
//! | Panics | caught, siblings cancelled at once | `JoinError` at join | lost | exceptions | exceptions |
//!
//! What it costs: per child, the same two allocations as `JoinSet` (the task, plus a result slot
//! where `JoinSet` has a 56-byte list entry), two short locks, and a thread-local swap per poll
//! (the current child). A child with a small future fits one 128-byte tokio task cell, as a
//! `JoinSet` child does; options that only some children use (a timeout, an active tracing span)
//! live in a separate box. The crate's README has the benchmark numbers.

mod books;
mod builder;
mod child;
mod context;
mod group;
mod handle;
mod map;
mod outcome;
mod report;
mod scope;
mod shared;
mod spawner;
mod sync;

#[cfg(all(test, taskgroup_loom))]
mod loom_model;

pub use builder::{BuildError, Builder, Policy};
pub use context::ChildContext;
pub use group::TaskGroup;
pub use handle::{AsCompleted, TaskHandle, as_completed};
pub use outcome::{
    CancelReason, ChildError, ChildErrorKind, Limit, Outcome, OutcomeKind, Panic, Timeout,
};
pub use report::{ChildReport, GroupError, GroupErrorKind, Report};
pub use scope::ScopeError;
pub use shared::live_children;
pub use spawner::{ChildBuilder, SpawnError, Spawner, Stats};
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
        type Task = crate::child::ChildTask<Small, u8, std::convert::Infallible>;
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
        send_sync_static::<crate::ChildContext>();
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
