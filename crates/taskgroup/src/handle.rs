//! The per-child slot where a finished child leaves its result; [`TaskHandle`], the typed handle
//! that reads the output from it (or cancels the child); and [`AsCompleted`], outputs in the
//! order children finish.
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use futures_util::stream::{FuturesUnordered, StreamExt};

use crate::books::ErasedSlot;
use crate::context::ChildNode;
use crate::outcome::{CancelReason, ChildError, ChildErrorKind, Outcome};
use crate::shared::{Node, Shared};

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
    /// The handle asked for this child to be cancelled. An atomic rather than part of `state`,
    /// because the child's task reads it on its first poll, and a lock there costs every child.
    cancel: AtomicBool,
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
            cancel: AtomicBool::new(false),
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

    /// Whether the handle asked for this child to be cancelled.
    pub(crate) fn cancel_requested(&self) -> bool {
        self.cancel.load(Ordering::Acquire)
    }

    /// Marks an unfinished child as cancelled by its handle; false once it has finished. (A
    /// child finishing meanwhile keeps its result: its task looks at the flag only when it has
    /// not finished.)
    fn request_cancel(&self) -> bool {
        if self.is_finished() {
            return false;
        }
        self.cancel.store(true, Ordering::Release);
        true
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

impl<T: Send, E: Send + 'static> ChildNode for Slot<T, E> {
    fn name(&self) -> &str {
        &self.name
    }

    fn group(&self) -> &dyn Node {
        &*self.shared
    }

    fn group_arc(&self) -> Arc<dyn Node> {
        Arc::clone(&self.shared) as _
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
/// [`cancel`](TaskHandle::cancel) cancels this one child.
pub struct TaskHandle<T> {
    slot: Arc<dyn OutputSlot<T>>,
    /// `None` for a child spawned after the group closed, which is in no report.
    index: Option<usize>,
    _marker: PhantomData<fn() -> T>,
}

/// The handle's view of a slot: the output type, without the error type, so handles of every
/// child in a group are `TaskHandle<T>` whatever the group's error type.
trait OutputSlot<T>: Send + Sync {
    fn poll_output(&self, cx: Option<&mut Context<'_>>) -> Poll<Result<T, ChildErrorKind>>;
    fn is_finished(&self) -> bool;
    fn name(&self) -> &Cow<'static, str>;
    fn group_id(&self) -> u64;
    fn cancel(&self);
}

impl<T: Send, E: Send + 'static> OutputSlot<T> for Slot<T, E> {
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
        self.shared.id
    }

    fn cancel(&self) {
        if self.request_cancel() {
            // A running child is aborted now; a queued one never starts (it looks at the flag).
            self.shared.books.abort_one(self.index);
        }
    }
}

impl<T: Send + 'static> TaskHandle<T> {
    pub(crate) fn new<E: Send + 'static>(slot: Arc<Slot<T, E>>, index: Option<usize>) -> Self {
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

    /// The child's position in its group, in spawn order: the same index as in the group's
    /// [`Report`](crate::Report). `None` for a child spawned after the group was joined, which
    /// never joined it and is in no report.
    pub fn index(&self) -> Option<usize> {
        self.index
    }

    /// Whether the child has finished (in any way). Always true after the group is joined.
    pub fn is_finished(&self) -> bool {
        self.slot.is_finished()
    }

    /// Cancels this child alone, like `task.cancel()` in asyncio: a queued child never starts, a
    /// running one is aborted at its next await (without a grace period), and either reports
    /// [`CancelReason::HandleCancelled`]. Its siblings and the group's verdict are unaffected: a
    /// child cancelled this way is neither a failure nor cut off by the group. Does nothing once
    /// the child has finished.
    pub fn cancel(&self) {
        self.slot.cancel();
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

/// Outputs in the order children finish, like `asyncio.as_completed`: see [`as_completed`].
pub struct AsCompleted<T> {
    pending: FuturesUnordered<Positioned<T>>,
}

/// A handle with its position among those given to [`as_completed`].
struct Positioned<T> {
    position: usize,
    handle: TaskHandle<T>,
}

impl<T> Future for Positioned<T> {
    type Output = (usize, Result<T, ChildError>);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let position = self.position;
        Pin::new(&mut self.handle)
            .poll(cx)
            .map(|result| (position, result))
    }
}

/// Yields each child's result as it finishes, with the handle's position in `handles`, like
/// `asyncio.as_completed`. Waking costs nothing per pending child (the handles sit in a
/// `FuturesUnordered`), so it suits thousands of children.
///
/// ```
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use taskgroup::{TaskGroup, as_completed};
///
/// let group = TaskGroup::<std::io::Error>::new()?;
/// let handles: Vec<_> = [30u64, 10, 20]
///     .into_iter()
///     .map(|ms| {
///         group.spawn("sleeper", async move {
///             tokio::time::sleep(Duration::from_millis(ms)).await;
///             Ok(ms)
///         })
///     })
///     .collect();
/// let mut finished = as_completed(handles);
/// let mut order = Vec::new();
/// while let Some((position, result)) = finished.next().await {
///     order.push((position, result?));
/// }
/// assert_eq!(order, [(1, 10), (2, 20), (0, 30)]);
/// group.join().await?;
/// # Ok(())
/// # }
/// ```
pub fn as_completed<T>(handles: impl IntoIterator<Item = TaskHandle<T>>) -> AsCompleted<T> {
    AsCompleted {
        pending: handles
            .into_iter()
            .enumerate()
            .map(|(position, handle)| Positioned { position, handle })
            .collect(),
    }
}

impl<T> AsCompleted<T> {
    /// The next child to finish: its position in the handles given, and its output or why it
    /// has none. `None` once every child has been yielded.
    pub async fn next(&mut self) -> Option<(usize, Result<T, ChildError>)> {
        self.pending.next().await
    }

    /// How many children have not been yielded yet.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether every child has been yielded.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

impl<T> fmt::Debug for AsCompleted<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsCompleted")
            .field("pending", &self.pending.len())
            .finish()
    }
}
