//! The state a group shares with its spawners, handles, children and nested groups: the
//! [books](crate::books) plus what acting on them needs (the runtime, the deadline, the grace
//! period, the group it is nested in).
//!
//! Every operation follows one pattern: ask the books under their lock, then do what they say
//! (drop discarded futures, cancel the token, stop nested groups, start the grace period, start a
//! queued child, wake the joiner, release the parent) after the lock is released.

use std::borrow::Cow;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::Policy;
use crate::books::{
    Abort, Admission, Books, Closed, Ending, Fatal, Fate, Gone, Kinds, Made, Stop, Stopped,
};
use crate::child::{ChildTask, Extras, Queued};
use crate::handle::{Slot, TaskHandle};
use crate::outcome::{CancelReason, Limit, Outcome, Timeout};

/// The process-wide count of live children, across all groups and depths.
static LIVE_CHILDREN: AtomicUsize = AtomicUsize::new(0);

/// The source of group ids.
static NEXT_GROUP_ID: AtomicU64 = AtomicU64::new(0);

/// The number of children alive in this process right now, across all groups at every depth:
/// spawned and not yet dropped (queued, running, or aborted but not yet reached by the runtime).
///
/// Export it as a gauge; after every group has been joined or dropped and the runtime has run,
/// it returns to its earlier value, which is how tests prove nothing leaks.
pub fn live_children() -> usize {
    LIVE_CHILDREN.load(Ordering::Acquire)
}

/// The books' type parameters in a real group.
pub(crate) struct Tokio;

impl Kinds for Tokio {
    type Task = JoinHandle<()>;
    type Queued = Box<dyn Queued>;
    type Nested = Weak<dyn Node>;
}

impl Abort for JoinHandle<()> {
    fn abort(&self) {
        JoinHandle::abort(self);
    }
}

/// A group seen without its error type: what nesting and a child's context need.
pub(crate) trait Node: Send + Sync {
    fn name(&self) -> &str;
    fn grace(&self) -> Duration;
    /// `Some(true)` when stopping for the deadline, `Some(false)` for another reason.
    fn stopping(&self) -> Option<bool>;
    fn token(&self) -> CancellationToken;
    /// Holds this group open for a group nested in one of its children.
    fn adopt(&self, nested: Weak<dyn Node>) -> Option<(usize, Option<Stop>)>;
    /// The nested group adopted as `id` closed and every child of its is gone.
    fn release(self: Arc<Self>, id: usize);
    /// The group this one is nested in started stopping.
    fn parent_stopped(self: Arc<Self>, deadline: bool);
}

/// Shared counters, for [`Stats`](crate::Stats) only. Successes, spawns and running children are
/// derived, so an ordinary child that succeeds touches none of them.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) failed: AtomicUsize,
    pub(crate) panicked: AtomicUsize,
    pub(crate) cancelled: AtomicUsize,
    pub(crate) timed_out: AtomicUsize,
}

/// The state shared by a group, its spawners, its children and its nested groups.
pub(crate) struct Shared<E> {
    pub(crate) books: Books<E, Tokio>,
    pub(crate) name: Cow<'static, str>,
    /// Unique in the process, so a [`Report`](crate::Report) can tell its own group's handles.
    pub(crate) id: u64,
    pub(crate) policy: Policy,
    pub(crate) deadline: Option<Instant>,
    /// The group's whole budget (creation to deadline), reported in group timeouts.
    pub(crate) budget: Duration,
    pub(crate) grace: Duration,
    runtime: Handle,
    /// The group this one is nested in, and the id it was adopted under.
    parent: Option<(Arc<dyn Node>, usize)>,
    pub(crate) counters: Counters,
}

/// What [`Shared::new`] needs.
pub(crate) struct Config {
    pub(crate) name: Cow<'static, str>,
    pub(crate) policy: Policy,
    pub(crate) limit: Option<usize>,
    pub(crate) deadline: Option<Instant>,
    pub(crate) budget: Duration,
    pub(crate) grace: Duration,
    pub(crate) runtime: Handle,
}

impl<E: Send + 'static> Shared<E> {
    /// Makes the shared state, held open by `parent` if there is one. Returns the reason the
    /// parent is stopping, if it is, for the new group to start stopped.
    pub(crate) fn new(config: Config, parent: Option<Arc<dyn Node>>) -> (Arc<Self>, Option<Stop>) {
        let mut born = None;
        let shared = Arc::new_cyclic(|weak: &Weak<Self>| {
            let nested: Weak<dyn Node> = weak.clone();
            let parent = parent.and_then(|parent| {
                let (id, stop) = parent.adopt(nested)?;
                born = stop.map(|stop| inherit(&stop));
                Some((parent, id))
            });
            Shared {
                books: Books::new(config.limit, !config.grace.is_zero()),
                name: config.name,
                id: NEXT_GROUP_ID.fetch_add(1, Ordering::Relaxed),
                policy: config.policy,
                deadline: config.deadline,
                budget: config.budget,
                grace: config.grace,
                runtime: config.runtime,
                parent,
                counters: Counters::default(),
            }
        });
        // The parent may have started stopping after adopting this group but before it could be
        // reached (it was still being built): ask again now that it can be.
        if born.is_none()
            && let Some(deadline) = shared.parent.as_ref().and_then(|(p, _)| p.stopping())
        {
            born = Some(if deadline {
                Stop::Deadline
            } else {
                Stop::Parent
            });
        }
        (shared, born)
    }

    /// Starts stopping for `stop`; only the first reason counts. Returns whether this call did.
    pub(crate) fn stop(self: &Arc<Self>, stop: Stop) -> bool {
        match self.books.stop(stop) {
            Some(stopped) => {
                self.stopped(stopped);
                true
            }
            None => false,
        }
    }

    /// Acts on a stop: discard the queue, signal, stop nested groups, start the grace period.
    fn stopped(self: &Arc<Self>, stopped: Stopped<Tokio>) {
        let Stopped {
            queue,
            token,
            nested,
            grace,
            deadline,
        } = stopped;
        drop(queue);
        if let Some(token) = token {
            token.cancel();
        }
        for nested in nested.iter().filter_map(Weak::upgrade) {
            nested.parent_stopped(deadline);
        }
        if grace {
            let shared = Arc::clone(self);
            let grace = self.grace;
            let reaper = self.runtime.spawn(async move {
                tokio::time::sleep(grace).await;
                shared.books.abort_all();
            });
            if let Some(reaper) = self.books.set_reaper(reaper) {
                reaper.abort();
            }
        }
    }

    /// Acts on a child or nested group going away.
    fn gone(self: &Arc<Self>, gone: Gone<E, Tokio>) {
        let Gone {
            wake,
            start,
            stopped,
            closed,
        } = gone;
        if let Some(stopped) = stopped {
            self.stopped(*stopped);
        }
        if let Some(next) = start {
            self.start(next);
        }
        if let Some(closed) = closed {
            self.closed(*closed);
        }
        if let Some(waker) = wake {
            waker.wake();
        }
    }

    /// Hands a child to the runtime, outside the lock: on a runtime that has shut down, tokio
    /// drops it on the spot, and its drop reports back to the books.
    fn start(&self, child: Box<dyn Queued>) {
        let index = child.index();
        let task = child.spawn_on(&self.runtime);
        drop(self.books.attach(index, task));
    }

    /// Releases what a closed group held: the grace period's reaper, the entries (and whatever
    /// children left in their slots), and the parent's hold.
    pub(crate) fn closed(&self, closed: Closed<E, Tokio>) {
        if let Some(reaper) = closed.reaper {
            reaper.abort();
        }
        drop(closed.entries);
        self.release_parent();
    }

    pub(crate) fn release_parent(&self) {
        if let Some((parent, id)) = &self.parent {
            Arc::clone(parent).release(*id);
        }
    }

    /// Called by a child's task once its future has been dropped.
    pub(crate) fn child_gone(
        self: &Arc<Self>,
        index: usize,
        ending: Ending,
        fatal: Option<(Fatal, Cow<'static, str>)>,
    ) {
        // Before the books: a joiner woken by them must see the gauge already down.
        LIVE_CHILDREN.fetch_sub(1, Ordering::AcqRel);
        let gone = self.books.gone(index, ending, fatal);
        self.gone(gone);
    }

    /// What a child that the group ends before it finishes reports.
    pub(crate) fn cancellation_outcome<T>(&self, stop: Option<&Stop>) -> Outcome<T, E> {
        match stop {
            Some(Stop::Deadline) => Outcome::TimedOut(Timeout {
                limit: Limit::Group,
                after: self.budget,
            }),
            Some(stop) => Outcome::Cancelled(stop.reason()),
            None => Outcome::Cancelled(CancelReason::RuntimeShutdown),
        }
    }

    /// Spawns a child. When the group is stopping or closed, `give_back` decides: the future
    /// comes back with the reason, or it is dropped unpolled and its handle reports why.
    pub(crate) fn spawn<F, T>(
        self: &Arc<Self>,
        name: Cow<'static, str>,
        timeout: Option<Duration>,
        essential: Option<bool>,
        future: F,
        give_back: bool,
    ) -> Result<TaskHandle<T>, (CancelReason, F)>
    where
        F: Future<Output = Result<T, E>> + Send + 'static,
        T: Send + 'static,
    {
        let essential = essential.unwrap_or(self.policy == Policy::FailFast);
        let span = tracing::Span::current();
        let mut extras = (timeout.is_some() || !span.is_none()).then(|| {
            Box::new(Extras {
                timeout,
                deadline: None,
                sleep: None,
                span,
            })
        });
        let mut future = Some(future);
        let mut name = Some(name);
        let admission = self.books.register(give_back, |index, fate| {
            let name = name.take().unwrap_or_default();
            if let Fate::Refused(stop) = fate {
                let slot = Arc::new(Slot::new(Arc::clone(self), name, index, essential));
                self.count(&self.cancellation_outcome::<T>(Some(stop)));
                slot.finish(self.cancellation_outcome(Some(stop)));
                return Made {
                    slot: Arc::clone(&slot) as _,
                    queued: None,
                    out: (slot, None),
                };
            }
            LIVE_CHILDREN.fetch_add(1, Ordering::AcqRel);
            let slot = Arc::new(Slot::new(Arc::clone(self), name, index, essential));
            let task = future
                .take()
                .map(|future| ChildTask::new(future, Arc::clone(&slot), extras.take()));
            let (queued, run) = match fate {
                Fate::Queue => (task.map(|t| Box::new(t) as Box<dyn Queued>), None),
                _ => (None, task),
            };
            Made {
                slot: Arc::clone(&slot) as _,
                queued,
                out: (slot, run),
            }
        });
        match admission {
            Admission::Run(index, (slot, task)) => {
                if let Some(task) = task {
                    let task = self.runtime.spawn(task);
                    drop(self.books.attach(index, task));
                }
                Ok(TaskHandle::new(slot, Some(index)))
            }
            Admission::Queued((slot, _)) => {
                let index = slot.index();
                Ok(TaskHandle::new(slot, Some(index)))
            }
            Admission::Refused((slot, _)) => {
                // Dropped unpolled, outside the lock: its destructor is user code.
                drop(future);
                let index = slot.index();
                Ok(TaskHandle::new(slot, Some(index)))
            }
            Admission::GiveBack(reason) => match future.take() {
                Some(future) => Err((reason, future)),
                None => Ok(self.detached(name, reason)),
            },
            Admission::Closed => {
                drop(future);
                Ok(self.detached(name, CancelReason::GroupClosed))
            }
        }
    }

    /// The handle of a child that never joined the group: it reports `reason` and belongs to no
    /// report.
    pub(crate) fn detached<T: Send + 'static>(
        self: &Arc<Self>,
        name: Option<Cow<'static, str>>,
        reason: CancelReason,
    ) -> TaskHandle<T> {
        let slot = Arc::new(Slot::new(
            Arc::clone(self),
            name.unwrap_or_default(),
            usize::MAX,
            false,
        ));
        self.counters.cancelled.fetch_add(1, Ordering::Relaxed);
        slot.finish(Outcome::Cancelled(reason));
        TaskHandle::new(slot, None)
    }

    /// Counts an outcome for [`Stats`](crate::Stats) (successes are derived).
    pub(crate) fn count<T>(&self, outcome: &Outcome<T, E>) {
        let counter = match outcome {
            Outcome::Ok(_) => return,
            Outcome::Err(_) => &self.counters.failed,
            Outcome::Panicked(_) => &self.counters.panicked,
            Outcome::Cancelled(_) => &self.counters.cancelled,
            Outcome::TimedOut(_) => &self.counters.timed_out,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A nested group's stop when its parent stops: the deadline is inherited as the nested group's
/// own (its deadline is never later than the parent's), anything else is the parent's cancellation.
fn inherit(stop: &Stop) -> Stop {
    match stop {
        Stop::Deadline => Stop::Deadline,
        _ => Stop::Parent,
    }
}

impl<E: Send + 'static> Node for Shared<E> {
    fn name(&self) -> &str {
        &self.name
    }

    fn grace(&self) -> Duration {
        self.grace
    }

    fn stopping(&self) -> Option<bool> {
        if !self.books.is_stopping() {
            return None;
        }
        self.books.stop_reason().map(|stop| stop == Stop::Deadline)
    }

    fn token(&self) -> CancellationToken {
        self.books.token()
    }

    fn adopt(&self, nested: Weak<dyn Node>) -> Option<(usize, Option<Stop>)> {
        self.books.adopt(nested)
    }

    fn release(self: Arc<Self>, id: usize) {
        let gone = self.books.release(id);
        self.gone(gone);
    }

    fn parent_stopped(self: Arc<Self>, deadline: bool) {
        self.stop(if deadline {
            Stop::Deadline
        } else {
            Stop::Parent
        });
    }
}

/// Waits for the group's own deadline or an outside token's cancellation, whichever comes first,
/// and stops the group. It holds only a weak reference, and the group aborts it when joined or
/// dropped.
pub(crate) async fn watchdog<E: Send + 'static>(
    shared: Weak<Shared<E>>,
    sleep: Option<tokio::time::Sleep>,
    tokens: Vec<CancellationToken>,
) {
    let cancelled = AnyCancelled(
        tokens
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
    // Biased so that a cancellation already visible wins over an expiry at the same instant: its
    // reason is the more useful one to report.
    let stop = tokio::select! {
        biased;
        () = cancelled => Stop::Parent,
        () = expired => Stop::Deadline,
    };
    if let Some(shared) = shared.upgrade() {
        shared.stop(stop);
    }
}

/// Resolves when any of the tokens is cancelled; never, when there are none.
struct AnyCancelled(Vec<Pin<Box<WaitForCancellationFutureOwned>>>);

impl Future for AnyCancelled {
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
