//! The tokio task that runs one child: it polls the child's future as the current child (so a
//! group built inside it nests), inside the spawner's span, with panics caught; enforces the
//! child's own timeout; and records the result.
//!
//! Its drop first drops the child's future, then settles the child's bookkeeping: that ordering is
//! what makes "the group has no live children" mean "every child has finished and released its
//! resources", whether the child completed or was aborted.

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tokio::time::{Instant, Sleep};

use crate::books::{Ending, Fatal, Stop};
use crate::context;
use crate::handle::Slot;
use crate::outcome::{CancelReason, Limit, Outcome, Panic, Timeout};
use crate::shared::Shared;

/// What only some children need: their own timeout and a tracing span to run in. Kept out of
/// line so that an ordinary child's task stays within one 128-byte tokio task cell, which is what
/// keeps a task group's cost per child level with `JoinSet`'s.
pub(crate) struct Extras {
    pub(crate) timeout: Option<Duration>,
    /// When the child's own timeout cuts it off, from its start.
    pub(crate) deadline: Option<Instant>,
    pub(crate) sleep: Option<Pin<Box<Sleep>>>,
    pub(crate) span: tracing::Span,
}

/// A child waiting for a concurrency slot: its task, built but not yet handed to tokio, so a queued
/// child costs its future and nothing more.
pub(crate) trait Queued: Send {
    /// The child's index in the books.
    fn index(&self) -> usize;
    /// Hands the child to tokio.
    fn spawn_on(self: Box<Self>, runtime: &Handle) -> JoinHandle<()>;
}

impl<F, T, E> Queued for ChildTask<F, T, E>
where
    F: Future<Output = Result<T, E>> + Send + 'static,
    T: Send + 'static,
    E: Send + 'static,
{
    fn index(&self) -> usize {
        self.slot.index()
    }

    fn spawn_on(self: Box<Self>, runtime: &Handle) -> JoinHandle<()> {
        runtime.spawn(*self)
    }
}

pin_project! {
    /// Where a child is in its life. One enum rather than separate fields, so a child's future is
    /// stored once, and in place from the start: starting it does not move it (a dashboard's
    /// read futures are large, and moving them was a measurable share of a group's cost).
    /// `Done` means the result has been recorded, and says how it ended.
    #[project = StageProj]
    enum Stage<F> {
        Live { #[pin] fut: F, started: bool },
        Done { ending: Ending, fatal: Option<Fatal> },
    }
}

pin_project! {
    /// The future tokio runs for one child.
    ///
    /// Its drop (below) first drops the child's future, then records a cancellation if the child
    /// had not finished, and only then tells the group the child is gone.
    pub(crate) struct ChildTask<F, T, E>
    where
        E: Send,
        E: 'static,
    {
        #[pin]
        stage: Stage<F>,
        slot: Arc<Slot<T, E>>,
        extras: Option<Box<Extras>>,
    }

    impl<F, T, E> PinnedDrop for ChildTask<F, T, E>
    where
        E: Send,
        E: 'static,
    {
        fn drop(this: Pin<&mut Self>) {
            let mut this = this.project();
            let done = match this.stage.as_mut().project() {
                StageProj::Done { ending, fatal } => Some((*ending, *fatal)),
                _ => None,
            };
            // The child's destructor is user code and may panic; the bookkeeping below must run
            // regardless, or `join` would wait for ever.
            let dropped = drop_stage(this.stage.as_mut());
            let slot: &Arc<Slot<T, E>> = this.slot;
            let shared = slot.shared();
            let (ending, fatal) = match done {
                Some(done) => done,
                None => {
                    let (outcome, ending) = if slot.cancel_requested() {
                        (
                            Outcome::Cancelled(CancelReason::HandleCancelled),
                            Ending::HandleCancelled,
                        )
                    } else {
                        // Unless the group is stopping, only a runtime shutting down drops an
                        // unfinished child: stop the group, so that the queue is discarded
                        // rather than started child by child on a runtime that drops each one.
                        if !shared.books.is_stopping() {
                            shared.stop(Stop::RuntimeShutdown);
                        }
                        let stop = shared.books.stop_reason();
                        (shared.cancellation_outcome(stop.as_ref()), Ending::CutOff)
                    };
                    let outcome = match dropped {
                        Ok(()) => outcome,
                        Err(panic) => Outcome::Panicked(panic),
                    };
                    (ending, record(slot, shared, outcome))
                }
            };
            *this.extras = None;
            let fatal = fatal.map(|fatal| (fatal, slot.name().clone()));
            shared.child_gone(slot.index(), ending, fatal);
        }
    }
}

impl<F, T, E: Send + 'static> ChildTask<F, T, E> {
    pub(crate) fn new(future: F, slot: Arc<Slot<T, E>>, extras: Option<Box<Extras>>) -> Self {
        ChildTask {
            stage: Stage::Live {
                fut: future,
                started: false,
            },
            slot,
            extras,
        }
    }
}

impl<F, T, E> Future for ChildTask<F, T, E>
where
    F: Future<Output = Result<T, E>> + Send + 'static,
    T: Send + 'static,
    E: Send + 'static,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let slot: &Arc<Slot<T, E>> = this.slot;
        let shared: &Arc<Shared<E>> = slot.shared();

        let StageProj::Live { fut, started } = this.stage.as_mut().project() else {
            return Poll::Ready(());
        };
        if !*started {
            // A child whose group stopped, or whose handle cancelled it, before its first poll
            // never starts; its drop records why.
            if shared.books.is_stopping() || slot.cancel_requested() {
                return Poll::Ready(());
            }
            *started = true;
            if let Some(extras) = this.extras.as_deref_mut()
                && let Some(timeout) = extras.timeout
            {
                // tokio's timer panics on a runtime without a time driver; that panic is this
                // child's, like any other in its code.
                let sleep = catch_unwind(|| {
                    let deadline = Instant::now().checked_add(timeout);
                    (
                        deadline,
                        deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
                    )
                });
                match sleep {
                    Ok((deadline, sleep)) => {
                        extras.deadline = deadline;
                        extras.sleep = sleep;
                    }
                    Err(payload) => {
                        return finish(
                            this.stage,
                            slot,
                            shared,
                            Outcome::Panicked(Panic::new(payload)),
                        );
                    }
                }
            }
        }
        let own_deadline = this.extras.as_deref().and_then(|x| x.deadline);
        let deadline = match (own_deadline, shared.deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let polled = {
            let _current = context::enter(Arc::clone(slot) as _, deadline);
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
        if let Some(extras) = this.extras.as_deref_mut() {
            extras.sleep = None;
        }
        finish(this.stage, slot, shared, outcome)
    }
}

/// Ends a child that finished on its own: drops its future first (so its destructors have run by
/// the time anyone sees it finished; a destructor that panics is the child's panic), then records
/// the outcome.
fn finish<F, T, E: Send + 'static>(
    mut stage: Pin<&mut Stage<F>>,
    slot: &Slot<T, E>,
    shared: &Arc<Shared<E>>,
    outcome: Outcome<T, E>,
) -> Poll<()> {
    let outcome = match drop_stage(stage.as_mut()) {
        Ok(()) => outcome,
        Err(panic) => Outcome::Panicked(panic),
    };
    // Still running when the group stopped, and finished on its own since: it wound down.
    let late = shared.books.is_stopping();
    let fatal = record(slot, shared, outcome);
    stage.set(Stage::Done {
        ending: Ending::Finished { late },
        fatal,
    });
    Poll::Ready(())
}

/// Drops whatever the stage holds, catching a panicking destructor. Leaves a placeholder `Done`.
fn drop_stage<F>(mut stage: Pin<&mut Stage<F>>) -> Result<(), Panic> {
    catch_unwind(AssertUnwindSafe(move || {
        stage.set(Stage::Done {
            ending: Ending::CutOff,
            fatal: None,
        });
    }))
    .map_err(Panic::new)
}

/// Records a child's result exactly once: counts it, logs a panic, fills the slot, and says
/// whether the failure stops the group.
fn record<T, E: Send + 'static>(
    slot: &Slot<T, E>,
    shared: &Shared<E>,
    outcome: Outcome<T, E>,
) -> Option<Fatal> {
    shared.count(&outcome);
    let fatal = match &outcome {
        Outcome::Ok(_) | Outcome::Cancelled(_) => None,
        Outcome::Err(_) => slot.essential().then_some(Fatal::Failed),
        Outcome::Panicked(panic) => {
            // Logged here, at once, so the panic is seen even if nobody ever joins the group.
            // The panic hook already printed the message with the original location.
            tracing::error!(
                group = %shared.name,
                child = %slot.name(),
                panic = %panic.message(),
                "task group child panicked; cancelling its siblings"
            );
            Some(Fatal::Panicked)
        }
        // Only the child's own timeout is its failure; the group's deadline is the group's.
        Outcome::TimedOut(timeout) => {
            (slot.essential() && timeout.limit == Limit::Child).then_some(Fatal::Failed)
        }
    };
    slot.finish(outcome);
    fatal
}
