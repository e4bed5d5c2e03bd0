//! The tokio task that runs one child: it waits for a concurrency slot if the group has a limit,
//! builds the child's future, polls it inside the spawner's span with panics caught, enforces the
//! child's own timeout, and records the result.
//!
//! Its last field is a drop guard. Rust drops struct fields in declaration order, so the guard
//! runs only after the child's future (and everything it owns) has been dropped; that is what
//! makes "the live count reached zero" mean "every child has finished and released its
//! resources", whether the child completed or was aborted.

use std::borrow::Cow;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::sync::{AcquireError, OwnedSemaphorePermit};
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

/// A boxed wait for a concurrency slot. Boxed because `acquire_owned`'s future has no nameable
/// type; only groups with a limit pay for it.
pub(crate) type Acquire =
    Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

pin_project! {
    /// The future tokio runs for one child. Field order matters: see the module docs.
    pub(crate) struct ChildTask<S, E>
    where
        S: Starter<E>,
        E: Send,
        E: 'static,
    {
        #[pin]
        fut: Option<S::Fut>,
        #[pin]
        sleep: Option<Sleep>,
        starter: Option<S>,
        acquire: Option<Acquire>,
        permit: Option<OwnedSemaphorePermit>,
        guard: Guard<S::Output, E>,
    }
}

impl<S: Starter<E>, E: Send + 'static> ChildTask<S, E> {
    pub(crate) fn new(starter: S, acquire: Option<Acquire>, guard: Guard<S::Output, E>) -> Self {
        ChildTask {
            fut: None,
            sleep: None,
            starter: Some(starter),
            acquire,
            permit: None,
            guard,
        }
    }
}

impl<S: Starter<E>, E: Send + 'static> Future for ChildTask<S, E> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let guard = this.guard;
        if guard.finished {
            return Poll::Ready(());
        }

        if let Some(starter) = this.starter.take() {
            if let Some(acquire) = this.acquire.as_mut() {
                match acquire.as_mut().poll(cx) {
                    Poll::Pending => {
                        *this.starter = Some(starter);
                        return Poll::Pending;
                    }
                    Poll::Ready(Ok(permit)) => *this.permit = Some(permit),
                    // The semaphore is closed only when the group stops: the child never starts,
                    // and the guard records it as cancelled when the task ends.
                    Poll::Ready(Err(_)) => return Poll::Ready(()),
                }
            }
            *this.acquire = None;
            if guard.shared.is_stopping() {
                return Poll::Ready(());
            }
            guard.started = true;
            guard.shared.counters.running.fetch_add(1, Ordering::Relaxed);

            // Building the future and the timer runs user code (and tokio's timer, which panics
            // when the runtime has no time driver), so it is caught like any poll.
            let started = {
                let _entered = guard.span.enter();
                catch_unwind(AssertUnwindSafe(|| {
                    let child_deadline = guard.timeout.map(|t| Instant::now() + t);
                    let sleep = child_deadline.map(tokio::time::sleep_until);
                    let fut = starter.start(|| guard.context(child_deadline));
                    (fut, sleep)
                }))
            };
            match started {
                Ok((fut, sleep)) => {
                    this.fut.set(Some(fut));
                    this.sleep.set(sleep);
                }
                Err(payload) => {
                    guard.complete(Outcome::Panicked(Panic::new(payload)));
                    return Poll::Ready(());
                }
            }
        }

        let Some(fut) = this.fut.as_mut().as_pin_mut() else {
            // Unreachable in practice: `starter` is only ever taken together with setting `fut`
            // or returning Ready. Ending here is the safe answer either way.
            return Poll::Ready(());
        };
        let polled = {
            let _entered = guard.span.enter();
            catch_unwind(AssertUnwindSafe(|| fut.poll(cx)))
        };
        let outcome = match polled {
            Ok(Poll::Ready(Ok(value))) => Outcome::Ok(value),
            Ok(Poll::Ready(Err(error))) => Outcome::Err(error),
            Err(payload) => Outcome::Panicked(Panic::new(payload)),
            Ok(Poll::Pending) => {
                // The future had its chance first, as with `tokio::time::timeout`: a child that
                // finishes exactly at its timeout counts as finished.
                let expired = this
                    .sleep
                    .as_mut()
                    .as_pin_mut()
                    .is_some_and(|sleep| sleep.poll(cx).is_ready());
                if !expired {
                    return Poll::Pending;
                }
                Outcome::TimedOut(Timeout {
                    limit: Limit::Child,
                    after: guard.timeout.unwrap_or_default(),
                })
            }
        };
        // Drop the child's future before recording the result, so that its destructors have run
        // by the time a waiting handle or `join` sees the child as finished.
        this.fut.set(None);
        this.sleep.set(None);
        *this.permit = None;
        guard.complete(outcome);
        Poll::Ready(())
    }
}

/// Bookkeeping for one child, settled exactly once: by [`Guard::complete`] when the child ends on
/// its own, or by `Drop` when it is aborted or never started.
pub(crate) struct Guard<T, E: Send + 'static> {
    pub(crate) slot: Arc<Slot<T, E>>,
    pub(crate) shared: Arc<Shared<E>>,
    pub(crate) index: usize,
    /// Whether an error or own timeout of this child stops the group.
    pub(crate) essential: bool,
    pub(crate) timeout: Option<Duration>,
    pub(crate) span: tracing::Span,
    pub(crate) started: bool,
    pub(crate) finished: bool,
}

impl<T, E: Send + 'static> Guard<T, E> {
    fn context(&self, child_deadline: Option<Instant>) -> ChildContext<E> {
        let deadline = match (child_deadline, self.shared.deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        ChildContext::new(
            self.slot.name().clone(),
            Arc::clone(&self.shared),
            deadline,
        )
    }

    fn name(&self) -> &Cow<'static, str> {
        self.slot.name()
    }

    pub(crate) fn complete(&mut self, outcome: Outcome<T, E>) {
        self.finished = true;
        let counters = &self.shared.counters;
        if self.started {
            counters.running.fetch_sub(1, Ordering::Relaxed);
        }
        let fatal = match &outcome {
            Outcome::Ok(_) => {
                counters.succeeded.fetch_add(1, Ordering::Relaxed);
                false
            }
            Outcome::Err(_) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                self.essential
            }
            Outcome::Panicked(panic) => {
                counters.panicked.fetch_add(1, Ordering::Relaxed);
                // Logged here, at once, so the panic is seen even if nobody ever joins the group.
                // The panic hook already printed the message with the original location.
                tracing::error!(
                    group = %self.shared.name,
                    child = %self.name(),
                    panic = %panic.message(),
                    "task group child panicked; cancelling its siblings"
                );
                true
            }
            Outcome::TimedOut(timeout) => {
                counters.timed_out.fetch_add(1, Ordering::Relaxed);
                // Only the child's own timeout is its failure; the group's deadline is the
                // group's, and is reported as such by `join`.
                self.essential && timeout.limit == Limit::Child
            }
            Outcome::Cancelled(_) => {
                counters.cancelled.fetch_add(1, Ordering::Relaxed);
                false
            }
        };
        // Record our own result before cancelling the siblings, so that this child reads as
        // failed (not cancelled) however quickly the group reacts.
        self.slot.finish(outcome);
        if fatal {
            self.shared.fail(self.index, self.name());
        }
    }
}

impl<T, E: Send + 'static> Drop for Guard<T, E> {
    fn drop(&mut self) {
        if !self.finished {
            let outcome = self.shared.cancellation_outcome();
            self.complete(outcome);
        }
        self.shared.child_gone();
    }
}
