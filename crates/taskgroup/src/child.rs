//! The tokio task that runs one child: it builds the child's future, polls it inside the spawner's
//! span with panics caught, enforces the child's own timeout, and records the result.
//!
//! Its drop first drops the child's future, then settles the child's bookkeeping: that ordering is
//! what makes "the live count reached zero" mean "every child has finished and released its
//! resources", whether the child completed or was aborted.

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tokio::time::{Instant, Sleep};

use crate::context::ChildContext;
use crate::group::Shared;
use crate::handle::Slot;
use crate::outcome::{Limit, Outcome, Panic, Timeout};

/// Something that produces a child's future when the child starts: either a ready-made future or a
/// closure that wants the child's [`ChildContext`].
pub(crate) trait Starter<E>: Send + 'static {
    type Output: Send + 'static;
    type Fut: Future<Output = Result<Self::Output, E>> + Send + 'static;

    fn start(self, context: impl FnOnce() -> ChildContext<E>) -> Self::Fut;
}

/// A child given as a future.
pub(crate) struct Ready<F>(pub(crate) F);

impl<F, T, E> Starter<E> for Ready<F>
where
    F: Future<Output = Result<T, E>> + Send + 'static,
    T: Send + 'static,
{
    type Output = T;
    type Fut = F;

    fn start(self, _context: impl FnOnce() -> ChildContext<E>) -> F {
        self.0
    }
}

/// A child given as a closure over its context; the closure runs when the child starts.
pub(crate) struct WithContext<C>(pub(crate) C);

impl<C, F, T, E> Starter<E> for WithContext<C>
where
    C: FnOnce(ChildContext<E>) -> F + Send + 'static,
    F: Future<Output = Result<T, E>> + Send + 'static,
    T: Send + 'static,
{
    type Output = T;
    type Fut = F;

    fn start(self, context: impl FnOnce() -> ChildContext<E>) -> F {
        (self.0)(context())
    }
}

/// What only some children need: their own timeout and a tracing span to run in. Kept out of
/// line so that an ordinary child's task stays within one 128-byte tokio task cell, which is what
/// keeps a task group's cost per child level with `JoinSet`'s.
pub(crate) struct Extras {
    pub(crate) timeout: Option<Duration>,
    pub(crate) sleep: Option<Pin<Box<Sleep>>>,
    pub(crate) span: tracing::Span,
}

/// A child waiting for a concurrency slot: its task, built but not yet handed to tokio, so a queued
/// child costs its future and nothing more.
pub(crate) trait Queued: Send {
    /// The child's index in the registry.
    fn index(&self) -> usize;
    /// Hands the child to tokio.
    fn spawn_on(self: Box<Self>, runtime: &Handle) -> JoinHandle<()>;
}

impl<S: Starter<E>, E: Send + 'static> Queued for ChildTask<S, E> {
    fn index(&self) -> usize {
        self.slot.index()
    }

    fn spawn_on(self: Box<Self>, runtime: &Handle) -> JoinHandle<()> {
        runtime.spawn(*self)
    }
}

pin_project! {
    /// Where a child is in its life. One enum rather than separate fields, so a child's future is
    /// stored once, not twice, before it starts. `Done` means the result has been recorded.
    #[project = StageProj]
    #[project_replace = StageReplace]
    enum Stage<S, F> {
        Waiting { starter: S },
        Running { #[pin] fut: F },
        Done,
    }
}

pin_project! {
    /// The future tokio runs for one child.
    ///
    /// Its drop (below) first drops the child's future, then records a cancellation if the child
    /// had not finished, and only then tells the group the child is gone: that ordering is what
    /// makes "no live children" mean "every child's resources are released".
    pub(crate) struct ChildTask<S, E>
    where
        S: Starter<E>,
        E: Send,
        E: 'static,
    {
        #[pin]
        stage: Stage<S, S::Fut>,
        slot: Arc<Slot<S::Output, E>>,
        extras: Option<Box<Extras>>,
    }

    impl<S, E> PinnedDrop for ChildTask<S, E>
    where
        S: Starter<E>,
        E: Send,
        E: 'static,
    {
        fn drop(this: Pin<&mut Self>) {
            let mut this = this.project();
            let finished = matches!(this.stage.as_mut().project(), StageProj::Done);
            // The child's destructor is user code and may panic; the bookkeeping below must run
            // regardless, or `join` would wait for ever. (If dropping the old value unwinds, the
            // assignment still leaves `Done` in place.)
            let dropped = drop_stage(this.stage.as_mut());
            let shared = this.slot.shared();
            if !finished {
                // Unless the group is stopping, the runtime is shutting down: stop the group, so
                // that the queue is discarded rather than started child by child (each start
                // dropped on the spot by the closed runtime, recursively through this drop).
                shared.dropped_unfinished();
                let outcome = match dropped {
                    Ok(()) => shared.cancellation_outcome(),
                    Err(panic) => Outcome::Panicked(panic),
                };
                complete(this.slot, shared, outcome);
            }
            *this.extras = None;
            shared.child_gone();
            // A finished child frees a concurrency slot for the next queued one. (Never when the
            // group is stopping, so this drop does not recurse through a queued child's.)
            shared.start_queued();
        }
    }
}

impl<S: Starter<E>, E: Send + 'static> ChildTask<S, E> {
    pub(crate) fn new(
        starter: S,
        slot: Arc<Slot<S::Output, E>>,
        extras: Option<Box<Extras>>,
    ) -> Self {
        ChildTask {
            stage: Stage::Waiting { starter },
            slot,
            extras,
        }
    }
}

impl<S: Starter<E>, E: Send + 'static> Future for ChildTask<S, E> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let slot: &Arc<Slot<S::Output, E>> = this.slot;
        let shared: &Arc<Shared<E>> = slot.shared();

        match this.stage.as_mut().project() {
            StageProj::Done => return Poll::Ready(()),
            StageProj::Running { .. } => {}
            StageProj::Waiting { .. } => {
                // A child aborted or dropped before its first poll never starts.
                if shared.is_stopping() {
                    return Poll::Ready(());
                }
                let StageReplace::Waiting { starter } =
                    this.stage.as_mut().project_replace(Stage::Done)
                else {
                    return Poll::Ready(());
                };
                // From here until the future is in place the stage reads `Done`; every path out
                // of this block either installs the future or records the result.
                let timeout = this.extras.as_deref().and_then(|x| x.timeout);
                // Building the future and the timer runs user code (and tokio's timer, which
                // panics when the runtime has no time driver), so it is caught like any poll.
                let started = {
                    let _entered = this.extras.as_deref().map(|x| x.span.enter());
                    catch_unwind(AssertUnwindSafe(|| {
                        let child_deadline = timeout.and_then(|t| Instant::now().checked_add(t));
                        let sleep = child_deadline.map(|d| Box::pin(tokio::time::sleep_until(d)));
                        let fut = starter.start(|| context(slot, shared, child_deadline));
                        (fut, sleep)
                    }))
                };
                match started {
                    Ok((fut, sleep)) => {
                        this.stage.set(Stage::Running { fut });
                        if let Some(extras) = this.extras.as_deref_mut() {
                            extras.sleep = sleep;
                        }
                    }
                    Err(payload) => {
                        let outcome = Outcome::Panicked(Panic::new(payload));
                        complete(slot, shared, outcome);
                        return Poll::Ready(());
                    }
                }
            }
        }

        let StageProj::Running { fut } = this.stage.as_mut().project() else {
            return Poll::Ready(());
        };
        let polled = {
            let _entered = this.extras.as_deref().map(|x| x.span.enter());
            catch_unwind(AssertUnwindSafe(|| fut.poll(cx)))
        };
        let outcome = match polled {
            Ok(Poll::Ready(Ok(value))) => Outcome::Ok(value),
            Ok(Poll::Ready(Err(error))) => Outcome::Err(error),
            Err(payload) => Outcome::Panicked(Panic::new(payload)),
            Ok(Poll::Pending) => {
                // The future had its chance first, as with `tokio::time::timeout`: a child that
                // finishes exactly at its timeout counts as finished.
                let Some(extras) = this.extras.as_deref_mut() else {
                    return Poll::Pending;
                };
                let expired = extras
                    .sleep
                    .as_mut()
                    .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready());
                if !expired {
                    return Poll::Pending;
                }
                Outcome::TimedOut(Timeout {
                    limit: Limit::Child,
                    after: extras.timeout.unwrap_or_default(),
                })
            }
        };
        // Drop the child's future before recording the result, so that its destructors have run
        // by the time a waiting handle or `join` sees the child as finished. A destructor that
        // panics is the child's panic.
        let outcome = match drop_stage(this.stage.as_mut()) {
            Ok(()) => outcome,
            Err(panic) => Outcome::Panicked(panic),
        };
        if let Some(extras) = this.extras.as_deref_mut() {
            extras.sleep = None;
        }
        complete(slot, shared, outcome);
        Poll::Ready(())
    }
}

/// Drops whatever the stage holds (the child's starter or future), catching a panicking
/// destructor.
fn drop_stage<S, F>(mut stage: Pin<&mut Stage<S, F>>) -> Result<(), Panic> {
    catch_unwind(AssertUnwindSafe(move || stage.set(Stage::Done))).map_err(Panic::new)
}

fn context<T, E: Send + 'static>(
    slot: &Slot<T, E>,
    shared: &Arc<Shared<E>>,
    child_deadline: Option<Instant>,
) -> ChildContext<E> {
    let deadline = match (child_deadline, shared.deadline) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    ChildContext::new(slot.name().clone(), Arc::clone(shared), deadline)
}

/// Records a child's result exactly once: counts it, logs a panic, fills the slot, and stops the
/// group if the failure is fatal.
fn complete<T, E: Send + 'static>(
    slot: &Slot<T, E>,
    shared: &Arc<Shared<E>>,
    outcome: Outcome<T, E>,
) {
    let counters = &shared.counters;
    // Still running when the group stopped, and finished on its own since: it wound down.
    let late = shared.is_stopping();
    let mut panicked = false;
    // Successes are not counted here: `Stats` derives them, so that the common path touches no
    // shared counter.
    let fatal = match &outcome {
        Outcome::Ok(_) => false,
        Outcome::Err(_) => {
            counters.failed.fetch_add(1, Ordering::Relaxed);
            slot.essential()
        }
        Outcome::Panicked(panic) => {
            counters.panicked.fetch_add(1, Ordering::Relaxed);
            // Logged here, at once, so the panic is seen even if nobody ever joins the group.
            // The panic hook already printed the message with the original location.
            tracing::error!(
                group = %shared.name,
                child = %slot.name(),
                panic = %panic.message(),
                "task group child panicked; cancelling its siblings"
            );
            panicked = true;
            true
        }
        Outcome::TimedOut(timeout) => {
            counters.timed_out.fetch_add(1, Ordering::Relaxed);
            // Only the child's own timeout is its failure; the group's deadline is the group's,
            // and is reported as such by `join`.
            slot.essential() && timeout.limit == Limit::Child
        }
        Outcome::Cancelled(_) => {
            counters.cancelled.fetch_add(1, Ordering::Relaxed);
            false
        }
    };
    let stopped_by_group = matches!(
        outcome,
        Outcome::Cancelled(_)
            | Outcome::TimedOut(Timeout {
                limit: Limit::Group,
                ..
            })
    );
    if late && !stopped_by_group {
        counters.wound_down.fetch_add(1, Ordering::Relaxed);
    }
    // Record our own result before cancelling the siblings, so that this child reads as failed
    // (not cancelled) however quickly the group reacts.
    slot.finish(outcome);
    if panicked {
        shared.panicked(slot.index(), slot.name().clone());
    } else if fatal {
        // Does nothing if the group is already stopping: the first reason stays the cause.
        shared.fail(slot.index(), slot.name().clone());
    }
}
