//! [`TaskGroup`], its [`Builder`], the [`Spawner`] children use to add siblings, and
//! [`ChildBuilder`] for per-child options; plus the state they share.
//!
//! Children are ordinary tokio tasks. The group keeps each child's `JoinHandle` (to abort it) and
//! its result slot (to build the report), a count of live children (to know when every child has
//! been dropped), and a once-set stop reason (so a child cut off can say why). The hot path of a
//! spawn is two short locks of the registry (one to register the child, one to record its
//! `JoinHandle` after handing it to tokio), two allocations (the task and the slot) and a handful
//! of relaxed counter updates; nothing is done per child at cancellation time except `abort`.
//!
//! No user code runs under the registry lock: a child's future, output, error or panic payload,
//! and anything tokio might drop on the spot (a future spawned on a runtime that has shut down),
//! is dropped after the lock is released, so a destructor may call back into the group.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fmt;
use std::marker::PhantomData;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::child::{ChildTask, Extras, Queued, Ready, Starter, WithContext};
use crate::context::ChildContext;
use crate::handle::{ErasedSlot, Slot, TaskHandle};
use crate::outcome::{CancelReason, Limit, Outcome, Timeout};
use crate::report::{ChildReport, GroupError, GroupErrorKind, Report};

/// What a child's failure does to its siblings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Policy {
    /// The first child to fail (return `Err`, panic, or hit its own timeout) cancels every
    /// sibling, and `join` returns the failure. Like `asyncio.TaskGroup`, Trio nurseries and
    /// Kotlin's `coroutineScope`.
    #[default]
    FailFast,
    /// Failures do not cancel siblings; `join` returns every outcome. Like
    /// `gather(return_exceptions=True)` and Kotlin's `supervisorScope`. A child spawned with
    /// [`ChildBuilder::essential`]`(true)` still cancels the group when it fails, and a panic
    /// always does.
    CollectAll,
}

/// Why a group could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// `build` was called outside a tokio runtime.
    #[error("a task group must be built inside a tokio runtime")]
    NoRuntime,
    /// The concurrency limit was zero, so no child could ever run.
    #[error("the concurrency limit must be at least 1")]
    ZeroLimit,
    /// A deadline or grace period was set, but the runtime has no time driver
    /// (build it with `enable_time()` or `enable_all()`). A child timeout on such a runtime is
    /// refused when the child is spawned, with [`CancelReason::TimerDisabled`].
    #[error("deadlines need a tokio runtime with the time driver enabled")]
    TimerDisabled,
}

/// Why a [`Spawner`] refused a child; it gives the child back.
pub struct SpawnError<F> {
    reason: CancelReason,
    child: F,
}

impl<F> SpawnError<F> {
    /// Why the group refused the child: it is stopping (for the given reason) or already closed.
    pub fn reason(&self) -> &CancelReason {
        &self.reason
    }

    /// The future or closure that was not spawned.
    pub fn into_inner(self) -> F {
        self.child
    }
}

impl<F> fmt::Debug for SpawnError<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpawnError")
            .field("reason", &self.reason)
            .finish_non_exhaustive()
    }
}

impl<F> fmt::Display for SpawnError<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reason {
            // Not the group's state but the child's options: say so rather than "shutting down".
            CancelReason::TimerDisabled => write!(f, "child not spawned: {}", self.reason),
            reason => write!(
                f,
                "task group is shutting down ({reason}); child not spawned"
            ),
        }
    }
}

impl<F> std::error::Error for SpawnError<F> {}

/// A snapshot of a group's child counts.
///
/// The counters are updated without a common lock, so a snapshot taken while children are
/// finishing can be off by one for a child in transit; after `join` they are exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Children spawned so far, including ones refused as cancelled.
    pub spawned: usize,
    /// Children waiting for a concurrency slot.
    pub queued: usize,
    /// Children running now.
    pub running: usize,
    /// Children that returned `Ok`.
    pub succeeded: usize,
    /// Children that returned `Err`.
    pub failed: usize,
    /// Children that panicked.
    pub panicked: usize,
    /// Children that were cancelled.
    pub cancelled: usize,
    /// Children cut off by a time limit (their own or the group's).
    pub timed_out: usize,
}

/// Shared counters. Successes, spawns and running children are not counted here (they are derived
/// in [`Shared::stats`]), so an ordinary child that succeeds touches none of them.
#[derive(Default)]
pub(crate) struct Counters {
    /// Children refused after the group closed, which are not in the registry.
    refused: AtomicUsize,
    pub(crate) failed: AtomicUsize,
    pub(crate) panicked: AtomicUsize,
    pub(crate) cancelled: AtomicUsize,
    pub(crate) timed_out: AtomicUsize,
    /// Children that finished on their own (any outcome but a cancellation or the group's
    /// deadline) after the group had started stopping: they were still running when it stopped,
    /// and wound down within the grace period.
    pub(crate) wound_down: AtomicUsize,
}

/// Why the group started cancelling its children. Set once: the first reason is the one reported.
enum Stop {
    /// Child `index` failed fatally; it is the cause `join` reports.
    Failed {
        name: Cow<'static, str>,
        index: usize,
    },
    Deadline,
    Requested,
    Parent,
    Dropped,
    /// A child was dropped unfinished without the group asking, which only a runtime shutting
    /// down does. Treated as a stop so the queue is discarded, not started child by child.
    RuntimeShutdown,
}

struct Entry<E> {
    /// `None` for a child that was recorded as cancelled without ever being spawned.
    task: Option<JoinHandle<()>>,
    slot: Arc<dyn ErasedSlot<E>>,
}

struct Registry<E> {
    /// Set once `join` has seen the last child finish, or the group was dropped: no more spawns.
    closed: bool,
    children: Vec<Entry<E>>,
    /// How many children were ever registered; unlike `children.len()` it survives `join`.
    spawned: usize,
    /// The task that aborts what is left when a grace period ends.
    reaper: Option<JoinHandle<()>>,
    /// Children waiting for a concurrency slot, in spawn order (limited groups only).
    queue: VecDeque<Box<dyn Queued>>,
    /// Set once every registered child has been aborted, so that a child handed to tokio after
    /// that (outside the lock) is aborted too.
    aborted: bool,
}

/// The state shared by the group, its spawners and its children.
pub(crate) struct Shared<E> {
    pub(crate) name: Cow<'static, str>,
    policy: Policy,
    runtime: Handle,
    pub(crate) token: CancellationToken,
    pub(crate) deadline: Option<Instant>,
    /// The group's whole budget (creation to deadline), reported in group timeouts.
    budget: Duration,
    pub(crate) grace: Duration,
    limit: Option<usize>,
    /// Unique in the process, so a [`Report`] can tell its own group's handles from others'.
    pub(crate) id: u64,
    stop: OnceLock<Stop>,
    /// A child that panicked after the group had already stopped for another reason than a
    /// child's failure. A panic is a bug, so it is still reported as the cause.
    late_panic: OnceLock<usize>,
    /// Whether the runtime has a time driver, found out once, when first needed.
    timer: OnceLock<bool>,
    registry: Mutex<Registry<E>>,
    live: AtomicUsize,
    all_done: Notify,
    pub(crate) counters: Counters,
}

/// The process-wide count of live children, across all groups.
static LIVE_CHILDREN: AtomicUsize = AtomicUsize::new(0);

/// The source of group ids.
static NEXT_GROUP_ID: AtomicU64 = AtomicU64::new(0);

/// The number of children alive in this process right now, across all groups: spawned and not
/// yet dropped (queued, running, or aborted but not yet reached by the runtime).
///
/// Export it as a gauge; after every group has been joined or dropped and the runtime has run,
/// it returns to its earlier value, which is how tests prove nothing leaks.
pub fn live_children() -> usize {
    LIVE_CHILDREN.load(Ordering::Acquire)
}

impl<E: Send + 'static> Shared<E> {
    fn lock_registry(&self) -> MutexGuard<'_, Registry<E>> {
        // No user code runs under this lock, so a poisoned lock still holds consistent data.
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn is_stopping(&self) -> bool {
        self.stop.get().is_some()
    }

    /// What a child that ends without finishing on its own should report.
    pub(crate) fn cancellation_outcome<T>(&self) -> Outcome<T, E> {
        match self.stop.get() {
            Some(Stop::Deadline) => Outcome::TimedOut(Timeout {
                limit: Limit::Group,
                after: self.budget,
            }),
            Some(stop) => Outcome::Cancelled(stop_reason(stop)),
            None => Outcome::Cancelled(CancelReason::RuntimeShutdown),
        }
    }

    /// Records a fatal failure of child `index` and stops the group. A failure after the group
    /// has already stopped (an error returned while winding down, say) is not the cause: the
    /// first reason to stop stays the reported one.
    pub(crate) fn fail(self: &Arc<Self>, index: usize, name: Cow<'static, str>) {
        self.stop(Stop::Failed { name, index });
    }

    /// Records a panic of child `index` and stops the group. Unlike an error, a panic after the
    /// group has stopped for a deadline or a cancellation still becomes the cause: it is a bug,
    /// and must not hide behind the deadline.
    pub(crate) fn panicked(self: &Arc<Self>, index: usize, name: Cow<'static, str>) {
        if !self.stop(Stop::Failed { name, index }) {
            let _ = self.late_panic.set(index);
        }
    }

    /// Called when a child is dropped unfinished. Unless the group asked for it (it is stopping),
    /// only a runtime shutting down does that; stopping the group then discards the queue, rather
    /// than starting each queued child in turn on a runtime that drops it on the spot.
    pub(crate) fn dropped_unfinished(self: &Arc<Self>) {
        if !self.is_stopping() {
            self.stop(Stop::RuntimeShutdown);
        }
    }

    /// Starts cancelling: refuse queued children, signal the token, then abort what is running,
    /// at once or after the grace period. Only the first call does anything, and returns true.
    fn stop(self: &Arc<Self>, reason: Stop) -> bool {
        if self.stop.set(reason).is_err() {
            return false;
        }
        self.discard_queue();
        self.token.cancel();
        if self.grace.is_zero() {
            self.abort_all();
            return true;
        }
        let shared = Arc::downgrade(self);
        let grace = self.grace;
        let reaper = self.runtime.spawn(async move {
            tokio::time::sleep(grace).await;
            if let Some(shared) = shared.upgrade() {
                shared.abort_all();
            }
        });
        let mut registry = self.lock_registry();
        if registry.closed {
            reaper.abort();
        } else {
            registry.reaper = Some(reaper);
        }
        true
    }

    /// Drops the queued children unstarted. They are dropped after the lock is released, because
    /// a dropped child reports back to the group.
    fn discard_queue(&self) {
        let queued = std::mem::take(&mut self.lock_registry().queue);
        drop(queued);
    }

    fn abort_all(&self) {
        let mut registry = self.lock_registry();
        registry.aborted = true;
        for entry in &registry.children {
            if let Some(task) = &entry.task {
                task.abort();
            }
        }
    }

    /// Called by each child's guard after the child's future has been dropped.
    pub(crate) fn child_gone(&self) {
        LIVE_CHILDREN.fetch_sub(1, Ordering::AcqRel);
        if self.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.all_done.notify_waiters();
        }
    }

    /// Starts queued children while the limit allows. Called whenever a child's task is dropped.
    pub(crate) fn start_queued(&self) {
        let Some(limit) = self.limit else {
            return;
        };
        loop {
            let next = {
                let mut registry = self.lock_registry();
                // Queued children are live too, so the running ones are the difference.
                let running = self
                    .live
                    .load(Ordering::Acquire)
                    .saturating_sub(registry.queue.len());
                if self.is_stopping() || running >= limit {
                    return;
                }
                match registry.queue.pop_front() {
                    Some(next) => next,
                    None => return,
                }
            };
            let index = next.index();
            let task = next.spawn_on(&self.runtime);
            self.register_task(index, task);
        }
    }

    /// Records the `JoinHandle` of a child handed to tokio outside the registry lock, aborting it
    /// if the group aborted its children in the meantime.
    fn register_task(&self, index: usize, task: JoinHandle<()>) {
        let mut registry = self.lock_registry();
        if registry.aborted {
            task.abort();
        }
        if let Some(entry) = registry.children.get_mut(index) {
            entry.task = Some(task);
        }
        // Otherwise the group was dropped (and the task aborted above); the handle is dropped
        // here, after the lock.
    }

    /// Whether the group's runtime has a time driver, which a child timeout needs. tokio offers
    /// no way to ask but to try, and panics without one; the answer is kept for the group.
    fn timer_enabled(&self) -> bool {
        *self.timer.get_or_init(|| {
            let _runtime = self.runtime.enter();
            catch_unwind(|| drop(tokio::time::sleep(Duration::ZERO))).is_ok()
        })
    }

    fn stats(&self) -> Stats {
        let c = &self.counters;
        let (registered, queued) = {
            let registry = self.lock_registry();
            (registry.spawned, registry.queue.len())
        };
        let spawned = registered + c.refused.load(Ordering::Relaxed);
        let live = self.live.load(Ordering::Acquire);
        let running = live.saturating_sub(queued);
        let failed = c.failed.load(Ordering::Relaxed);
        let panicked = c.panicked.load(Ordering::Relaxed);
        let cancelled = c.cancelled.load(Ordering::Relaxed);
        let timed_out = c.timed_out.load(Ordering::Relaxed);
        let finished_otherwise = failed + panicked + cancelled + timed_out;
        Stats {
            spawned,
            queued,
            running,
            succeeded: spawned.saturating_sub(live + finished_otherwise),
            failed,
            panicked,
            cancelled,
            timed_out,
        }
    }

    /// Spawns a child. When the group is stopping or closed, `refuse` decides: it either gives the
    /// child back as an error (the `try_` spawns) or returns it, and then the child is recorded as
    /// cancelled and dropped without ever being started.
    fn spawn<S: Starter<E>, R>(
        self: &Arc<Self>,
        name: Cow<'static, str>,
        timeout: Option<Duration>,
        essential: Option<bool>,
        starter: S,
        refuse: impl FnOnce(S, CancelReason) -> Result<S, R>,
    ) -> Result<TaskHandle<S::Output>, R> {
        let essential = essential.unwrap_or(self.policy == Policy::FailFast);
        // Found out before taking the lock: the first check may run tokio's panic hook.
        let timer_missing = timeout.is_some() && !self.timer_enabled();
        let mut registry = self.lock_registry();
        let index = registry.children.len();
        let slot = Arc::new(Slot::<S::Output, E>::new(
            Arc::clone(self),
            name,
            index,
            essential,
        ));
        let refusal = if registry.closed {
            Some((
                CancelReason::GroupClosed,
                Outcome::Cancelled(CancelReason::GroupClosed),
            ))
        } else if let Some(stop) = self.stop.get() {
            Some((stop_reason(stop), self.cancellation_outcome()))
        } else if timer_missing {
            tracing::error!(
                group = %self.name,
                child = %slot.name(),
                "task group child not spawned: its timeout needs a runtime with the time driver"
            );
            Some((
                CancelReason::TimerDisabled,
                Outcome::Cancelled(CancelReason::TimerDisabled),
            ))
        } else {
            None
        };
        if let Some((reason, outcome)) = refusal {
            let starter = refuse(starter, reason)?;
            match &outcome {
                Outcome::TimedOut(_) => &self.counters.timed_out,
                _ => &self.counters.cancelled,
            }
            .fetch_add(1, Ordering::Relaxed);
            slot.finish(outcome);
            if registry.closed {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
            } else {
                registry.spawned += 1;
                registry.children.push(Entry {
                    task: None,
                    slot: Arc::clone(&slot) as Arc<dyn ErasedSlot<E>>,
                });
            }
            drop(registry);
            // The refused child's future is dropped unpolled, outside the lock: its destructor is
            // user code.
            drop(starter);
            return Ok(TaskHandle::new(slot, index));
        }

        // Counted before it exists as a task: `join` must not see zero live children while this
        // one is on its way.
        let queued_before = registry.queue.len();
        let running_before = self
            .live
            .fetch_add(1, Ordering::AcqRel)
            .saturating_sub(queued_before);
        LIVE_CHILDREN.fetch_add(1, Ordering::AcqRel);
        registry.spawned += 1;
        registry.children.push(Entry {
            task: None,
            slot: Arc::clone(&slot) as Arc<dyn ErasedSlot<E>>,
        });
        let span = tracing::Span::current();
        let extras = if timeout.is_some() || !span.is_none() {
            Some(Box::new(Extras {
                timeout,
                sleep: None,
                span,
            }))
        } else {
            None
        };
        let task = ChildTask::new(starter, Arc::clone(&slot), extras);
        if self
            .limit
            .is_some_and(|limit| running_before >= limit || queued_before > 0)
        {
            // Queued behind earlier children: not a tokio task yet, only its future.
            registry.queue.push_back(Box::new(task));
            return Ok(TaskHandle::new(slot, index));
        }
        // Handed to tokio outside the lock: on a runtime that has shut down, tokio drops the
        // child on the spot, running its destructor and the child's own bookkeeping, which takes
        // this lock. `register_task` then aborts it if the group aborted its children meanwhile.
        drop(registry);
        let task = self.runtime.spawn(task);
        self.register_task(index, task);
        Ok(TaskHandle::new(slot, index))
    }
}

fn cut_by_deadline<E>(child: &ChildReport<E>) -> bool {
    matches!(
        child.outcome,
        Outcome::TimedOut(Timeout {
            limit: Limit::Group,
            ..
        })
    )
}

fn stop_reason(stop: &Stop) -> CancelReason {
    match stop {
        Stop::Failed { name, .. } => CancelReason::SiblingFailed { name: name.clone() },
        Stop::Deadline => CancelReason::DeadlineExceeded,
        Stop::Requested => CancelReason::Requested,
        Stop::Parent => CancelReason::ParentCancelled,
        Stop::Dropped => CancelReason::GroupDropped,
        Stop::RuntimeShutdown => CancelReason::RuntimeShutdown,
    }
}

/// Configures and builds a [`TaskGroup`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use taskgroup::{Policy, TaskGroup};
///
/// let group: TaskGroup<std::io::Error> = TaskGroup::builder()
///     .name("batch")
///     .policy(Policy::CollectAll)
///     .limit(20)
///     .timeout(Duration::from_secs(2))
///     .build()?;
/// # drop(group);
/// # Ok(())
/// # }
/// ```
pub struct Builder<E> {
    name: Cow<'static, str>,
    policy: Policy,
    limit: Option<usize>,
    timeout: Option<Duration>,
    deadline: Option<Instant>,
    grace: Option<Duration>,
    /// Every token that cancels the group: outside tokens and the groups it is nested in.
    parents: Vec<CancellationToken>,
    parent_deadline: Option<Instant>,
    _error: PhantomData<fn() -> E>,
}

impl<E> fmt::Debug for Builder<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("name", &self.name)
            .field("policy", &self.policy)
            .field("limit", &self.limit)
            .field("timeout", &self.timeout)
            .field("deadline", &self.deadline)
            .field("grace", &self.grace)
            .field("linked", &self.parents.len())
            .finish()
    }
}

impl<E: Send + 'static> Builder<E> {
    fn new() -> Self {
        Builder {
            name: Cow::Borrowed("taskgroup"),
            policy: Policy::FailFast,
            limit: None,
            timeout: None,
            deadline: None,
            grace: None,
            parents: Vec::new(),
            parent_deadline: None,
            _error: PhantomData,
        }
    }

    /// Names the group in logs, reports and errors (default `"taskgroup"`).
    pub fn name(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets what a failure does to the siblings (default [`Policy::FailFast`]).
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// Runs at most `limit` children at once. Children spawned beyond the limit are queued
    /// without starting: they are not tokio tasks yet, and their future or closure is neither
    /// polled nor called. They start in spawn order as running children finish, and cancelling
    /// the group discards them unstarted. Spawning never waits. A limit of zero is refused by
    /// [`build`](Builder::build).
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Gives the whole group `timeout`, counted from `build`: when it passes, whatever is still
    /// running or queued is cut off ([`Limit::Group`]) and `join` reports
    /// [`GroupErrorKind::DeadlineExceeded`]. Combined with [`deadline`](Builder::deadline) or an
    /// inherited deadline, the earliest wins.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Like [`timeout`](Builder::timeout), as an instant.
    pub fn deadline(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Makes cancellation two-phase: when the group stops, it cancels its token at once, waits
    /// `grace` for children to wind down cooperatively, and only then aborts what is still
    /// running. The default is zero: abort at once.
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = Some(grace);
        self
    }

    /// Links the group to an outside token (a server's shutdown token, say): cancelling that
    /// token cancels the group ([`CancelReason::ParentCancelled`]). Links add up: a group linked
    /// to several tokens, or both linked and [nested](Builder::nested_in), is cancelled by any of
    /// them.
    pub fn cancel_on(mut self, token: &CancellationToken) -> Self {
        self.parents.push(token.clone());
        self
    }

    /// Nests the group inside a running child: it inherits the child's deadline (the tighter of
    /// the child's timeout and its group's deadline), its group's grace period unless one is set,
    /// and is cancelled when the child's group is cancelled. This adds to any
    /// [`cancel_on`](Builder::cancel_on) link; nested in several children, the group is
    /// cancelled by any of their groups and keeps the tightest of their deadlines.
    pub fn nested_in<P>(mut self, context: &ChildContext<P>) -> Self {
        self.parents.push(context.token());
        self.parent_deadline = match (self.parent_deadline, context.deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if self.grace.is_none() {
            self.grace = Some(context.grace());
        }
        self
    }

    /// Builds the group.
    ///
    /// # Errors
    ///
    /// [`BuildError::NoRuntime`] outside a tokio runtime, [`BuildError::ZeroLimit`] for a limit of
    /// zero, [`BuildError::TimerDisabled`] when a deadline or grace period is set on a runtime
    /// without a time driver.
    pub fn build(self) -> Result<TaskGroup<E>, BuildError> {
        let runtime = Handle::try_current().map_err(|_| BuildError::NoRuntime)?;
        if self.limit == Some(0) {
            return Err(BuildError::ZeroLimit);
        }
        let now = Instant::now();
        // A timeout too long to represent as an instant is no limit at all.
        let deadline = [
            self.deadline,
            self.timeout.and_then(|t| now.checked_add(t)),
            self.parent_deadline,
        ]
        .into_iter()
        .flatten()
        .min();
        let grace = self.grace.unwrap_or_default();

        // tokio's timer panics when the runtime has no time driver; find out now, as a typed
        // error, rather than in the watchdog or reaper task later.
        let sleep = match deadline {
            Some(deadline) => Some(
                catch_unwind(AssertUnwindSafe(|| tokio::time::sleep_until(deadline)))
                    .map_err(|_| BuildError::TimerDisabled)?,
            ),
            None => None,
        };
        if !grace.is_zero() && sleep.is_none() {
            catch_unwind(|| drop(tokio::time::sleep(Duration::ZERO)))
                .map_err(|_| BuildError::TimerDisabled)?;
        }

        // A child of the first parent, so that its cancellation reaches the children's tokens at
        // once; the watchdog relays every parent's (the first's included) as the group's stop.
        let token = match self.parents.first() {
            Some(parent) => parent.child_token(),
            None => CancellationToken::new(),
        };
        let shared = Arc::new(Shared {
            name: self.name,
            policy: self.policy,
            runtime: runtime.clone(),
            token,
            deadline,
            budget: deadline.map_or(Duration::ZERO, |d| d.saturating_duration_since(now)),
            grace,
            limit: self.limit,
            id: NEXT_GROUP_ID.fetch_add(1, Ordering::Relaxed),
            stop: OnceLock::new(),
            late_panic: OnceLock::new(),
            // A timer was created above for a deadline or grace period, so the runtime has a
            // time driver.
            timer: if sleep.is_some() || !grace.is_zero() {
                OnceLock::from(true)
            } else {
                OnceLock::new()
            },
            registry: Mutex::new(Registry {
                closed: false,
                children: Vec::new(),
                spawned: 0,
                queue: VecDeque::new(),
                aborted: false,
                reaper: None,
            }),
            live: AtomicUsize::new(0),
            all_done: Notify::new(),
            counters: Counters::default(),
        });

        // A group born already cancelled or past its deadline stops now, so no child of it can
        // start before the watchdog gets to run.
        if self.parents.iter().any(CancellationToken::is_cancelled) {
            shared.stop(Stop::Parent);
        } else if deadline.is_some_and(|d| d <= now) {
            shared.stop(Stop::Deadline);
        }

        let watchdog = if sleep.is_some() || !self.parents.is_empty() {
            let weak = Arc::downgrade(&shared);
            Some(runtime.spawn(watchdog(weak, sleep, self.parents)))
        } else {
            None
        };
        Ok(TaskGroup {
            shared,
            watchdog,
            joined: false,
        })
    }
}

/// Waits for the deadline or a parent's cancellation, whichever comes first, and stops the
/// group. It holds only a weak reference, and the group aborts it when joined or dropped.
async fn watchdog<E: Send + 'static>(
    shared: Weak<Shared<E>>,
    sleep: Option<tokio::time::Sleep>,
    parents: Vec<CancellationToken>,
) {
    let parent_cancelled = AnyCancelled(
        parents
            .into_iter()
            .map(|token| Box::pin(token.cancelled_owned()))
            .collect(),
    );
    let expired = async {
        match sleep {
            Some(sleep) => sleep.await,
            None => std::future::pending().await,
        }
    };
    // Biased so that a parent cancellation that is already visible wins over an expiry at the
    // same instant: the parent's reason is the more useful one to report.
    let stop = tokio::select! {
        biased;
        () = parent_cancelled => Stop::Parent,
        () = expired => Stop::Deadline,
    };
    if let Some(shared) = shared.upgrade() {
        shared.stop(stop);
    }
}

/// Resolves when any of the tokens is cancelled; never, when there are none.
struct AnyCancelled(Vec<Pin<Box<WaitForCancellationFutureOwned>>>);

impl std::future::Future for AnyCancelled {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        for cancelled in &mut self.0 {
            if cancelled.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
        }
        Poll::Pending
    }
}

/// A group of child tasks that cannot outlive it.
///
/// See the [crate documentation](crate) for the guarantees. In short: spawn children (each gets a
/// typed [`TaskHandle`]), then [`join`](TaskGroup::join) the group, which returns only once every
/// child has finished and been dropped. Dropping the group without joining it aborts every child.
pub struct TaskGroup<E: Send + 'static> {
    shared: Arc<Shared<E>>,
    watchdog: Option<JoinHandle<()>>,
    joined: bool,
}

impl<E: Send + 'static> fmt::Debug for TaskGroup<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskGroup")
            .field("name", &self.shared.name)
            .field("policy", &self.shared.policy)
            .field("deadline", &self.shared.deadline)
            .field("stats", &self.shared.stats())
            .finish()
    }
}

impl<E: Send + 'static> TaskGroup<E> {
    /// Starts configuring a group.
    pub fn builder() -> Builder<E> {
        Builder::new()
    }

    /// A fail-fast group with no limit and no deadline.
    ///
    /// # Errors
    ///
    /// [`BuildError::NoRuntime`] when called outside a tokio runtime.
    pub fn new() -> Result<Self, BuildError> {
        Builder::new().build()
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Spawns a child. It starts at once, or when a concurrency slot frees up.
    ///
    /// If the group is already stopping (a child failed, the deadline passed, or it was
    /// cancelled), the child is not started: its future is dropped unpolled and its handle
    /// reports it as cancelled (or timed out, for a passed deadline).
    pub fn spawn<F, T>(&self, name: impl Into<Cow<'static, str>>, future: F) -> TaskHandle<T>
    where
        F: std::future::Future<Output = Result<T, E>> + Send + 'static,
        T: Send + 'static,
    {
        self.child(name).spawn(future)
    }

    /// Spawns a child built from its [`ChildContext`]: its cancellation token, remaining
    /// budget and a spawner. The closure runs when the child starts.
    pub fn spawn_with<C, F, T>(&self, name: impl Into<Cow<'static, str>>, make: C) -> TaskHandle<T>
    where
        C: FnOnce(ChildContext<E>) -> F + Send + 'static,
        F: std::future::Future<Output = Result<T, E>> + Send + 'static,
        T: Send + 'static,
    {
        self.child(name).spawn_with(make)
    }

    /// Starts building a child with options: its own timeout, or whether its failure stops the
    /// group.
    pub fn child(&self, name: impl Into<Cow<'static, str>>) -> ChildBuilder<'_, E> {
        ChildBuilder::new(&self.shared, name.into())
    }

    /// A cloneable handle that can spawn children into this group from anywhere, including from
    /// inside its children.
    pub fn spawner(&self) -> Spawner<E> {
        Spawner {
            shared: Arc::clone(&self.shared),
        }
    }

    /// A token that is cancelled when the group starts stopping, for code outside the group that
    /// wants to notice. It is a child of the group's own token: cancelling it affects only this
    /// copy (use [`cancel`](TaskGroup::cancel) to stop the group).
    pub fn token(&self) -> CancellationToken {
        self.shared.token.child_token()
    }

    /// Cancels the group: queued children never start, running ones are signalled and aborted
    /// (after the grace period, if any), and `join` reports [`GroupErrorKind::Cancelled`] unless a
    /// child failed.
    pub fn cancel(&self) {
        self.shared.stop(Stop::Requested);
    }

    /// Whether the group has started cancelling its children.
    pub fn is_stopping(&self) -> bool {
        self.shared.is_stopping()
    }

    /// The group's deadline, if it has one.
    pub fn deadline(&self) -> Option<Instant> {
        self.shared.deadline
    }

    /// A snapshot of the group's child counts.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// Waits until every child has finished and been dropped, then reports.
    ///
    /// Children may spawn siblings (through a [`Spawner`]) while the group is being joined; `join`
    /// waits for those too, and closes the group once the last child is gone, so nothing can be
    /// spawned into it afterwards.
    ///
    /// Cancel-safe in the structured sense: if the `join` future is dropped before it completes,
    /// the group is dropped with it and every child is aborted.
    ///
    /// # Errors
    ///
    /// A [`GroupError`] whose [`kind`](GroupError::kind) says why, in this order of precedence:
    /// a child failed fatally ([`GroupErrorKind::ChildFailed`], with that first failure as the
    /// cause; errors win over deadlines and outside cancellation, as in asyncio), the deadline
    /// cut off at least one child ([`GroupErrorKind::DeadlineExceeded`]), or the
    /// group was cancelled ([`GroupErrorKind::Cancelled`]). Every variant carries the full
    /// [`Report`], so outcomes stay readable.
    pub async fn join(mut self) -> Result<Report<E>, GroupError<E>> {
        let children = loop {
            // Take the notification before checking the count, so a wake-up between the check and
            // the wait is not lost.
            let notified = self.shared.all_done.notified();
            if self.shared.live.load(Ordering::Acquire) == 0 {
                let mut registry = self.shared.lock_registry();
                // Spawns increment `live` under this lock, so a zero seen here is final.
                if self.shared.live.load(Ordering::Acquire) == 0 {
                    registry.closed = true;
                    if let Some(reaper) = registry.reaper.take() {
                        reaper.abort();
                    }
                    break std::mem::take(&mut registry.children);
                }
            }
            notified.await;
        };
        self.joined = true;
        if let Some(watchdog) = self.watchdog.take() {
            watchdog.abort();
        }

        let children = children
            .into_iter()
            .enumerate()
            .map(|(index, entry)| ChildReport {
                index,
                name: entry.slot.name().clone(),
                outcome: entry.slot.take_outcome(),
            })
            .collect();
        let report = Report::new(self.shared.name.clone(), self.shared.id, children);

        // The first reason to stop is the verdict. An error or a child timeout that came after
        // it (a child winding down after the signal) is in the report, but is not the cause; a
        // panic is, unless a child's failure came first.
        let stop = match self.shared.stop.get() {
            None => return Ok(report),
            Some(Stop::Failed { index, .. }) => {
                return Err(GroupError::new(
                    GroupErrorKind::ChildFailed,
                    Some(*index),
                    report,
                ));
            }
            Some(stop) => stop,
        };
        if let Some(&panicked) = self.shared.late_panic.get() {
            return Err(GroupError::new(
                GroupErrorKind::ChildFailed,
                Some(panicked),
                report,
            ));
        }
        let kind = match stop {
            Stop::Deadline => {
                // Cut off: aborted or refused by the deadline, or still running when it passed
                // and winding down after the signal, whatever it then returned.
                let cut_off = report.iter().filter(|child| cut_by_deadline(child)).count()
                    + self.shared.counters.wound_down.load(Ordering::Relaxed);
                // A deadline that passed when nothing was left to cut off is no failure.
                if cut_off == 0 {
                    return Ok(report);
                }
                return Err(
                    GroupError::new(GroupErrorKind::DeadlineExceeded, None, report)
                        .with_cut_off(cut_off),
                );
            }
            stop => GroupErrorKind::Cancelled(stop_reason(stop)),
        };
        Err(GroupError::new(kind, None, report))
    }
}

impl<E: Send + 'static> Drop for TaskGroup<E> {
    /// Aborts every child of a group that was not joined, at once and without waiting (there is
    /// no one left to wait): an aborted child is not polled again, and is dropped the next time
    /// the runtime reaches it.
    fn drop(&mut self) {
        if let Some(watchdog) = self.watchdog.take() {
            watchdog.abort();
        }
        if self.joined {
            return;
        }
        let _ = self.shared.stop.set(Stop::Dropped);
        self.shared.discard_queue();
        self.shared.token.cancel();
        // Take the entries out and let go of the lock before aborting and dropping them: dropping
        // a slot drops what the child left in it (an output nobody took, an error, a panic
        // payload), and their destructors may call back into the group.
        let (children, reaper) = {
            let mut registry = self.shared.lock_registry();
            registry.closed = true;
            registry.aborted = true;
            (
                std::mem::take(&mut registry.children),
                registry.reaper.take(),
            )
        };
        if let Some(reaper) = reaper {
            reaper.abort();
        }
        for entry in &children {
            if let Some(task) = &entry.task {
                task.abort();
            }
        }
        drop(children);
    }
}

/// A cloneable handle for spawning children into a group from anywhere, such as from inside one
/// of its children. It does not keep the group open: once the group is stopping or has been
/// joined, spawns are refused.
pub struct Spawner<E> {
    shared: Arc<Shared<E>>,
}

impl<E> Clone for Spawner<E> {
    fn clone(&self) -> Self {
        Spawner {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<E: Send + 'static> fmt::Debug for Spawner<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Spawner")
            .field("group", &self.shared.name)
            .finish_non_exhaustive()
    }
}

impl<E: Send + 'static> Spawner<E> {
    pub(crate) fn new(shared: Arc<Shared<E>>) -> Self {
        Spawner { shared }
    }

    /// Spawns a sibling unless the group is stopping or closed (Swift's
    /// `addTaskUnlessCancelled`, Python's "TaskGroup is shutting down").
    ///
    /// # Errors
    ///
    /// A [`SpawnError`] holding the future, when the group is stopping or already joined.
    pub fn try_spawn<F, T>(
        &self,
        name: impl Into<Cow<'static, str>>,
        future: F,
    ) -> Result<TaskHandle<T>, SpawnError<F>>
    where
        F: std::future::Future<Output = Result<T, E>> + Send + 'static,
        T: Send + 'static,
    {
        self.child(name).try_spawn(future)
    }

    /// Spawns a sibling; if the group is stopping or closed, the child is never started and its
    /// handle reports it as cancelled.
    pub fn spawn<F, T>(&self, name: impl Into<Cow<'static, str>>, future: F) -> TaskHandle<T>
    where
        F: std::future::Future<Output = Result<T, E>> + Send + 'static,
        T: Send + 'static,
    {
        self.child(name).spawn(future)
    }

    /// Starts building a sibling with options.
    pub fn child(&self, name: impl Into<Cow<'static, str>>) -> ChildBuilder<'_, E> {
        ChildBuilder::new(&self.shared, name.into())
    }

    /// Cancels the group, as [`TaskGroup::cancel`] does.
    pub fn cancel(&self) {
        self.shared.stop(Stop::Requested);
    }

    /// Whether the group is stopping or closed, so that spawns would be refused.
    pub fn is_closing(&self) -> bool {
        self.shared.is_stopping() || self.shared.lock_registry().closed
    }

    /// A token that is cancelled when the group starts stopping; cancelling it affects only this
    /// copy (use [`cancel`](Spawner::cancel) to stop the group).
    pub fn token(&self) -> CancellationToken {
        self.shared.token.child_token()
    }

    /// A snapshot of the group's child counts.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }
}

/// Options for one child: a name, its own timeout, and whether its failure stops the group.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use taskgroup::{Policy, TaskGroup};
///
/// let group: TaskGroup<std::io::Error> =
///     TaskGroup::builder().policy(Policy::CollectAll).build()?;
/// let profile = group
///     .child("profile")
///     .essential(true)
///     .timeout(Duration::from_millis(250))
///     .spawn(async { Ok("alice") });
/// let report = group.join().await?;
/// assert!(report.iter().all(|child| child.outcome.is_ok()));
/// assert_eq!(profile.output()?, "alice");
/// # Ok(())
/// # }
/// ```
pub struct ChildBuilder<'g, E> {
    shared: &'g Arc<Shared<E>>,
    name: Cow<'static, str>,
    timeout: Option<Duration>,
    essential: Option<bool>,
}

impl<E: Send + 'static> fmt::Debug for ChildBuilder<'_, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChildBuilder")
            .field("name", &self.name)
            .field("timeout", &self.timeout)
            .field("essential", &self.essential)
            .finish_non_exhaustive()
    }
}

impl<'g, E: Send + 'static> ChildBuilder<'g, E> {
    fn new(shared: &'g Arc<Shared<E>>, name: Cow<'static, str>) -> Self {
        ChildBuilder {
            shared,
            name,
            timeout: None,
            essential: None,
        }
    }

    /// Cuts the child off after `timeout` of running (not counting time queued for a
    /// concurrency slot); it then reports [`Outcome::TimedOut`] with [`Limit::Child`]. The group's
    /// deadline still applies on top.
    ///
    /// A timeout needs the runtime's time driver. Without one the child is refused when spawned:
    /// it never starts and reports [`Outcome::Cancelled`] with [`CancelReason::TimerDisabled`]
    /// (the `try_` spawns give it back with that reason), and an error is logged.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Whether this child's error (or own timeout) stops the group. Defaults to the group's
    /// policy: `true` under [`Policy::FailFast`], `false` under [`Policy::CollectAll`]. A panic
    /// always stops the group.
    pub fn essential(mut self, essential: bool) -> Self {
        self.essential = Some(essential);
        self
    }

    /// Spawns the child. See [`TaskGroup::spawn`].
    pub fn spawn<F, T>(self, future: F) -> TaskHandle<T>
    where
        F: std::future::Future<Output = Result<T, E>> + Send + 'static,
        T: Send + 'static,
    {
        let spawned = self.shared.spawn(
            self.name,
            self.timeout,
            self.essential,
            Ready(future),
            accept_refusal,
        );
        match spawned {
            Ok(handle) => handle,
            Err(never) => match never {},
        }
    }

    /// Spawns the child from a closure over its [`ChildContext`]. See [`TaskGroup::spawn_with`].
    pub fn spawn_with<C, F, T>(self, make: C) -> TaskHandle<T>
    where
        C: FnOnce(ChildContext<E>) -> F + Send + 'static,
        F: std::future::Future<Output = Result<T, E>> + Send + 'static,
        T: Send + 'static,
    {
        let spawned = self.shared.spawn(
            self.name,
            self.timeout,
            self.essential,
            WithContext(make),
            accept_refusal,
        );
        match spawned {
            Ok(handle) => handle,
            Err(never) => match never {},
        }
    }

    /// Spawns the child unless the group is stopping or closed.
    ///
    /// # Errors
    ///
    /// A [`SpawnError`] holding the future, when the group is stopping or already joined.
    pub fn try_spawn<F, T>(self, future: F) -> Result<TaskHandle<T>, SpawnError<F>>
    where
        F: std::future::Future<Output = Result<T, E>> + Send + 'static,
        T: Send + 'static,
    {
        self.shared.spawn(
            self.name,
            self.timeout,
            self.essential,
            Ready(future),
            |starter: Ready<F>, reason| {
                Err(SpawnError {
                    reason,
                    child: starter.0,
                })
            },
        )
    }

    /// Spawns the child from a closure over its context unless the group is stopping or closed.
    ///
    /// # Errors
    ///
    /// A [`SpawnError`] holding the closure, when the group is stopping or already joined.
    pub fn try_spawn_with<C, F, T>(self, make: C) -> Result<TaskHandle<T>, SpawnError<C>>
    where
        C: FnOnce(ChildContext<E>) -> F + Send + 'static,
        F: std::future::Future<Output = Result<T, E>> + Send + 'static,
        T: Send + 'static,
    {
        self.shared.spawn(
            self.name,
            self.timeout,
            self.essential,
            WithContext(make),
            |starter: WithContext<C>, reason| {
                Err(SpawnError {
                    reason,
                    child: starter.0,
                })
            },
        )
    }
}

/// The refusal policy of the infallible spawns: hand the child back to `Shared::spawn`, which
/// records it as cancelled and drops it unstarted.
fn accept_refusal<S>(starter: S, _reason: CancelReason) -> Result<S, std::convert::Infallible> {
    Ok(starter)
}
