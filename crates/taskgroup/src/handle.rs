//! The per-child slot where a finished child leaves its result, and [`TaskHandle`], the typed
//! handle that reads the output from it.
//!
//! A slot is shared by three parties: the child's task writes it exactly once (on completion, or
//! from its drop guard when it is cancelled), the handle takes the output, and the group takes the
//! outcome (error or panic payload) when it builds its report. Splitting output and outcome this
//! way lets children of different output types share one group, while every error is still
//! delivered by `join`.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use crate::group::Shared;
use crate::outcome::{CancelReason, ChildError, ChildErrorKind, Outcome};

/// Where a child's result waits to be read.
pub(crate) struct Slot<T, E> {
    /// The group. Held here rather than in the child's task to keep that task within one
    /// 128-byte tokio task cell. This makes a cycle (group registry -> slot -> group), which
    /// `join` and the group's `Drop` break by emptying the registry.
    shared: Arc<Shared<E>>,
    name: Cow<'static, str>,
    /// The child's position in spawn order.
    index: usize,
    /// Whether the child's error or own timeout stops the group.
    essential: bool,
    state: Mutex<State<T, E>>,
}

enum State<T, E> {
    /// The child has not finished; the waker belongs to a task awaiting the handle.
    Pending(Option<Waker>),
    /// The child succeeded; the output waits for the handle (`None` once taken).
    Ok(Option<T>),
    /// The child was cancelled (or cut off by the group's stop). Kept inline, without the
    /// allocation of `Failed`: cancelling ten thousand children is one group's common path.
    Cancelled(CancelReason),
    /// The child ended without output otherwise. Boxed: this is the rare path, and keeping it
    /// out of line keeps every slot small.
    Failed(Box<Failed<E>>),
}

struct Failed<E> {
    /// The outcome with its error or panic payload, until the group's report takes it.
    outcome: Option<Outcome<(), E>>,
    /// What the handle reports, which outlives the outcome.
    error: ChildErrorKind,
}

impl<T, E> Slot<T, E> {
    pub(crate) fn new(
        shared: Arc<Shared<E>>,
        name: Cow<'static, str>,
        index: usize,
        essential: bool,
    ) -> Self {
        Slot {
            shared,
            name,
            index,
            essential,
            state: Mutex::new(State::Pending(None)),
        }
    }

    pub(crate) fn name(&self) -> &Cow<'static, str> {
        &self.name
    }

    pub(crate) fn shared(&self) -> &Arc<Shared<E>> {
        &self.shared
    }

    pub(crate) fn index(&self) -> usize {
        self.index
    }

    pub(crate) fn essential(&self) -> bool {
        self.essential
    }

    fn lock(&self) -> MutexGuard<'_, State<T, E>> {
        // Nothing runs user code while holding this lock (wakers are cloned, woken and dropped
        // outside it), so poisoning cannot leave the state half-written; recovering the guard is
        // always sound here.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records the child's result, unless one is already recorded, and wakes a waiting handle.
    pub(crate) fn finish(&self, result: Outcome<T, E>) {
        let failed = |outcome: Outcome<(), E>, error| {
            State::Failed(Box::new(Failed {
                outcome: Some(outcome),
                error,
            }))
        };
        let done = match result {
            Outcome::Ok(value) => State::Ok(Some(value)),
            Outcome::Cancelled(reason) => State::Cancelled(reason),
            Outcome::Err(error) => failed(Outcome::Err(error), ChildErrorKind::Failed),
            Outcome::Panicked(panic) => {
                let message = panic.message().to_owned();
                failed(
                    Outcome::Panicked(panic),
                    ChildErrorKind::Panicked { message },
                )
            }
            Outcome::TimedOut(timeout) => failed(
                Outcome::TimedOut(timeout),
                ChildErrorKind::TimedOut(timeout),
            ),
        };
        let waker = {
            let mut state = self.lock();
            match &mut *state {
                State::Pending(waker) => {
                    let waker = waker.take();
                    *state = done;
                    waker
                }
                State::Ok(_) | State::Cancelled(_) | State::Failed(_) => None,
            }
        };
        // Wake outside the lock so the woken task never contends with us.
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    pub(crate) fn is_finished(&self) -> bool {
        !matches!(&*self.lock(), State::Pending(_))
    }

    fn poll_output(&self, cx: Option<&mut Context<'_>>) -> Poll<Result<T, ChildErrorKind>> {
        let mut state = self.lock();
        let ready = match &mut *state {
            State::Pending(waker) => match &cx {
                Some(cx) if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) => None,
                _ => return Poll::Pending,
            },
            State::Ok(output) => Some(output.take().ok_or(ChildErrorKind::Taken)),
            State::Cancelled(reason) => Some(Err(ChildErrorKind::Cancelled(reason.clone()))),
            State::Failed(failed) => Some(Err(failed.error.clone())),
        };
        drop(state);
        if let Some(result) = ready {
            return Poll::Ready(result);
        }
        // A new waker to store. A waker's `clone` and `drop` are the executor's code, so they run
        // outside the lock, and the state is checked again in case the child finished meanwhile.
        let Some(cx) = cx else {
            return Poll::Pending;
        };
        let mut new = Some(cx.waker().clone());
        let mut state = self.lock();
        let ready = match &mut *state {
            State::Pending(waker) => {
                // Swapped, so the old waker (if any) is dropped after the lock.
                std::mem::swap(waker, &mut new);
                None
            }
            State::Ok(output) => Some(output.take().ok_or(ChildErrorKind::Taken)),
            State::Cancelled(reason) => Some(Err(ChildErrorKind::Cancelled(reason.clone()))),
            State::Failed(failed) => Some(Err(failed.error.clone())),
        };
        drop(state);
        drop(new);
        ready.map_or(Poll::Pending, Poll::Ready)
    }
}

/// The group's type-erased view of a slot: it needs the outcome and name, not the output type.
pub(crate) trait ErasedSlot<E>: Send + Sync {
    /// Takes the outcome for the report. A slot that was somehow never written (which the drop
    /// guard prevents) reads as cancelled by a runtime shutdown rather than panicking.
    fn take_outcome(&self) -> Outcome<(), E>;
    fn name(&self) -> &Cow<'static, str>;
}

impl<T, E> Slot<T, E> {
    fn group_id(&self) -> u64 {
        self.shared.id
    }
}

impl<T: Send, E: Send> ErasedSlot<E> for Slot<T, E> {
    fn take_outcome(&self) -> Outcome<(), E> {
        let mut state = self.lock();
        match &mut *state {
            State::Ok(_) => Outcome::Ok(()),
            State::Cancelled(reason) => Outcome::Cancelled(reason.clone()),
            State::Failed(failed) => failed
                .outcome
                .take()
                .unwrap_or(Outcome::Cancelled(CancelReason::RuntimeShutdown)),
            State::Pending(_) => Outcome::Cancelled(CancelReason::RuntimeShutdown),
        }
    }

    fn name(&self) -> &Cow<'static, str> {
        &self.name
    }
}

/// A typed handle to one child of a [`TaskGroup`](crate::TaskGroup).
///
/// Await it (inside or outside the group, like `await task` in Python) to get the child's output,
/// or, once the group is joined, call [`output`](TaskHandle::output). Outputs of children that
/// finished before a failure or deadline stay readable. A child that produced no output gives a
/// [`ChildError`] saying why; the error value or panic payload itself is delivered by the group's
/// [`join`](crate::TaskGroup::join).
///
/// Dropping a handle does not cancel or detach the child: the child still belongs to its group.
pub struct TaskHandle<T> {
    slot: Arc<dyn OutputSlot<T>>,
    index: usize,
    _marker: PhantomData<fn() -> T>,
}

/// The handle's view of a slot: the output type, without the error type, so handles of every
/// child in a group are `TaskHandle<T>` whatever the group's error type.
trait OutputSlot<T>: Send + Sync {
    fn poll_output(&self, cx: Option<&mut Context<'_>>) -> Poll<Result<T, ChildErrorKind>>;
    fn is_finished(&self) -> bool;
    fn name(&self) -> &Cow<'static, str>;
    fn group_id(&self) -> u64;
}

impl<T: Send, E: Send> OutputSlot<T> for Slot<T, E> {
    fn poll_output(&self, cx: Option<&mut Context<'_>>) -> Poll<Result<T, ChildErrorKind>> {
        Slot::poll_output(self, cx)
    }

    fn is_finished(&self) -> bool {
        Slot::is_finished(self)
    }

    fn name(&self) -> &Cow<'static, str> {
        &self.name
    }

    fn group_id(&self) -> u64 {
        Slot::group_id(self)
    }
}

impl<T: Send + 'static> TaskHandle<T> {
    pub(crate) fn new<E: Send + 'static>(slot: Arc<Slot<T, E>>, index: usize) -> Self {
        TaskHandle {
            slot,
            index,
            _marker: PhantomData,
        }
    }
}

impl<T> TaskHandle<T> {
    /// The child's name.
    pub fn name(&self) -> &str {
        self.slot.name()
    }

    /// The child's position in its group, in spawn order; the same index as in the group's
    /// [`Report`](crate::Report).
    pub fn index(&self) -> usize {
        self.index
    }

    /// Whether the child has finished (in any way). Always true after the group is joined.
    pub fn is_finished(&self) -> bool {
        self.slot.is_finished()
    }

    /// The id of the group the child belongs to, unique in the process.
    pub(crate) fn group_id(&self) -> u64 {
        self.slot.group_id()
    }

    /// Takes the child's output without waiting, consuming the handle: the way to read outputs
    /// after `join`, when every child has finished.
    ///
    /// Called before the child has finished, it gives [`ChildErrorKind::NotFinished`] and the
    /// handle is gone, so the output can no longer be read (the child still runs, and `join`
    /// still reports it). To look before the child may have finished, use
    /// [`try_output`](TaskHandle::try_output), or await the handle.
    ///
    /// # Errors
    ///
    /// A [`ChildError`] saying why there is no output: the child failed, panicked, was cancelled
    /// or timed out, has not finished yet ([`ChildErrorKind::NotFinished`]), or the output was
    /// already taken.
    pub fn output(mut self) -> Result<T, ChildError> {
        self.try_output()
    }

    /// Takes the child's output without waiting, keeping the handle: if the child has not
    /// finished yet, the handle still reads (or awaits) the output later.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use taskgroup::{ChildErrorKind, TaskGroup};
    ///
    /// let group = TaskGroup::<std::io::Error>::new()?;
    /// let mut handle = group.spawn("slow", async {
    ///     tokio::time::sleep(Duration::from_millis(10)).await;
    ///     Ok(7)
    /// });
    /// assert_eq!(handle.try_output().unwrap_err().kind, ChildErrorKind::NotFinished);
    /// group.join().await?;
    /// assert_eq!(handle.try_output()?, 7);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`output`](TaskHandle::output): [`ChildErrorKind::NotFinished`] while the child runs
    /// (the output stays to be taken), otherwise why there is no output, or
    /// [`ChildErrorKind::Taken`] once it was taken.
    pub fn try_output(&mut self) -> Result<T, ChildError> {
        match self.slot.poll_output(None) {
            Poll::Ready(result) => result.map_err(|kind| self.error(kind)),
            Poll::Pending => Err(self.error(ChildErrorKind::NotFinished)),
        }
    }

    fn error(&self, kind: ChildErrorKind) -> ChildError {
        ChildError {
            name: self.slot.name().clone(),
            kind,
        }
    }
}

impl<T> Future for TaskHandle<T> {
    type Output = Result<T, ChildError>;

    /// Resolves when the child finishes: to its output, or to a [`ChildError`] saying why there
    /// is none.
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.slot
            .poll_output(Some(cx))
            .map(|result| result.map_err(|kind| self.error(kind)))
    }
}

impl<T> fmt::Debug for TaskHandle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskHandle")
            .field("name", &self.slot.name())
            .field("index", &self.index)
            .field("finished", &self.slot.is_finished())
            .finish()
    }
}
