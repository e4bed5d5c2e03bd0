//! The group's books: who is alive, why the group stops, and when it closes with which verdict,
//! all under one lock so that each decision is made once.
//!
//! Registering a child, a child going away, the first reason to stop, a nested group held open
//! or released, and closing with a verdict are operations on [`Books`]. Each runs under one
//! mutex and returns what must happen next (futures to drop, a waker to wake, a token to cancel,
//! a queued child to start, nested groups to stop); the caller does that after the lock is
//! released, so no user code, waker or runtime call ever runs under it.
//!
//! The books know nothing of tokio: a child's task handle, a queued child and a nested group are
//! type parameters ([`Kinds`]), so the loom model (`cfg(taskgroup_loom)`) runs this very code
//! with stand-ins for them.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::PoisonError;
use std::sync::atomic::Ordering;
use std::task::{Poll, Waker};

use tokio_util::sync::CancellationToken;

use crate::outcome::{CancelReason, Outcome};
use crate::sync::{AtomicBool, AtomicUsize, Mutex, MutexGuard};

/// The types the books hold without knowing them.
pub(crate) trait Kinds: 'static {
    /// A running child's task, to abort it.
    type Task: Abort + Send;
    /// A child waiting for a concurrency slot.
    type Queued: Send;
    /// A nested group, to stop it when this one stops.
    type Nested: Clone + Send;
}

/// Something that can be told to stop at its next await.
pub(crate) trait Abort {
    fn abort(&self);
}

/// The group's view of a child's result slot: the outcome for the report, and the name.
pub(crate) trait ErasedSlot<E>: Send + Sync {
    /// Takes the outcome for the report. A slot that was never written (which the child's drop
    /// guard prevents) reads as cancelled by a runtime shutdown.
    fn take_outcome(&self) -> Outcome<(), E>;
    fn name(&self) -> &Cow<'static, str>;
}

/// Why the group started stopping. Set once, under the lock: the first reason is the verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Stop {
    /// Child `index` failed fatally.
    Failed {
        name: Cow<'static, str>,
        index: usize,
    },
    Deadline,
    Requested,
    Parent,
    Dropped,
    /// A child was dropped unfinished without the group asking, which only a runtime shutting
    /// down does.
    RuntimeShutdown,
}

impl Stop {
    /// What a child cancelled for this reason reports.
    pub(crate) fn reason(&self) -> CancelReason {
        match self {
            Stop::Failed { name, .. } => CancelReason::SiblingFailed { name: name.clone() },
            Stop::Deadline => CancelReason::DeadlineExceeded,
            Stop::Requested => CancelReason::Requested,
            Stop::Parent => CancelReason::ParentCancelled,
            Stop::Dropped => CancelReason::GroupDropped,
            Stop::RuntimeShutdown => CancelReason::RuntimeShutdown,
        }
    }
}

/// How a child went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// It finished on its own (any outcome but a cancellation or the group's deadline); `late`
    /// when the group was already stopping, so it wound down after the signal.
    Finished { late: bool },
    /// The group cut it off: aborted, discarded from the queue, or cut by the group's deadline.
    CutOff,
    /// Its own handle cancelled it.
    HandleCancelled,
}

/// A fatal end of a child, which stops the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fatal {
    /// An error or own timeout of an essential child.
    Failed,
    /// A panic, fatal under every policy and the cause even while the group winds down.
    Panicked,
}

/// Where a new child goes.
#[derive(Debug)]
pub(crate) enum Fate<'a> {
    /// Handed to the runtime at once.
    Run,
    /// Queued behind the concurrency limit.
    Queue,
    /// Recorded as ended without starting, because the group is stopping for this reason.
    Refused(&'a Stop),
}

/// What the caller builds for a child once its fate is known.
pub(crate) struct Made<E, Q, R> {
    pub(crate) slot: Arc<dyn ErasedSlot<E>>,
    /// The queued child, for [`Fate::Queue`] only.
    pub(crate) queued: Option<Q>,
    pub(crate) out: R,
}

/// The result of registering a child.
pub(crate) enum Admission<R> {
    /// Registered as entry `index`: `Run` to hand to the runtime now, `Queued` already queued,
    /// `Refused` recorded as ended.
    Run(usize, R),
    Queued(R),
    Refused(R),
    /// Not registered, because the group is stopping or closed and the caller wants the child
    /// back.
    GiveBack(CancelReason),
    /// Not registered: the group is closed.
    Closed,
}

pub(crate) struct Entry<E, X: Kinds> {
    /// `None` while queued, and for a child recorded as ended without starting.
    pub(crate) task: Option<X::Task>,
    pub(crate) slot: Arc<dyn ErasedSlot<E>>,
}

/// How the group ended, decided once, at close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Nothing stopped the group, or what stopped it cut nothing off.
    Ok,
    /// Child `index` failed fatally (or panicked while the group wound down).
    Failed(usize),
    /// The group stopped for `stop` and cut off `cut_off` children.
    Stopped { stop: Stop, cut_off: usize },
}

/// What a closed group hands over.
pub(crate) struct Closed<E, X: Kinds> {
    pub(crate) verdict: Verdict,
    pub(crate) entries: Vec<Entry<E, X>>,
    pub(crate) reaper: Option<X::Task>,
}

/// What the caller does after a group started stopping.
pub(crate) struct Stopped<X: Kinds> {
    /// Queued children, discarded unstarted; dropped outside the lock (a child's drop reports
    /// back to the books).
    pub(crate) queue: VecDeque<X::Queued>,
    /// The token children watch, if anyone asked for it.
    pub(crate) token: Option<CancellationToken>,
    /// Nested groups to stop.
    pub(crate) nested: Vec<X::Nested>,
    /// Whether to start the grace period (children were signalled, not aborted).
    pub(crate) grace: bool,
    /// Whether the stop is the deadline's, which nested groups inherit as their own.
    pub(crate) deadline: bool,
}

/// What the caller does after a child or a nested group went away.
pub(crate) struct Gone<E, X: Kinds> {
    /// The joiner to wake: nothing is left alive.
    pub(crate) wake: Option<Waker>,
    /// The next queued child, now counted as running: hand it to the runtime.
    pub(crate) start: Option<X::Queued>,
    /// The group stopped because of this child. (Boxed, as is `closed`: rare, and large to
    /// move on every child's way out.)
    pub(crate) stopped: Option<Box<Stopped<X>>>,
    /// The group was dropped and its last child is gone: release what it held.
    pub(crate) closed: Option<Box<Closed<E, X>>>,
}

impl<E, X: Kinds> Gone<E, X> {
    fn nothing() -> Self {
        Gone {
            wake: None,
            start: None,
            stopped: None,
            closed: None,
        }
    }
}

/// A group's owner went away without joining.
pub(crate) enum Dropped<E, X: Kinds> {
    /// Nothing was alive: the group closed on the spot.
    Closed(Closed<E, X>),
    /// Children are still winding down; the last one to go closes the group.
    Pending,
}

/// Counts read under the lock for [`Stats`](crate::Stats).
pub(crate) struct Counts {
    pub(crate) registered: usize,
    pub(crate) refused: usize,
    pub(crate) queued: usize,
    pub(crate) live: usize,
}

struct State<E, X: Kinds> {
    stop: Option<Stop>,
    /// A child that panicked after the group had stopped for something other than a failure.
    late_panic: Option<usize>,
    /// No more spawns, stops or verdicts: set by `join` (or a dropped group's last child).
    closed: bool,
    /// The group's owner dropped it without joining.
    dropped: bool,
    joiner: Option<Waker>,
    /// Nested groups built inside a child, not yet closed with every child of theirs gone.
    nested_live: usize,
    entries: Vec<Entry<E, X>>,
    /// Children ever registered; unlike `entries.len()` it survives close.
    registered: usize,
    /// Children refused after close, which have no entry.
    refused: usize,
    queue: VecDeque<X::Queued>,
    /// Every child was aborted; one attached after that is aborted too.
    aborted: bool,
    /// The task that aborts what is left when the grace period ends.
    reaper: Option<X::Task>,
    token: Option<CancellationToken>,
    /// Nested groups to stop with this one, by the id `adopt` gave them (`None` once released).
    nested: Vec<Option<X::Nested>>,
    /// Released ids, reused by `adopt`.
    free: Vec<usize>,
}

/// The group's books: see the module docs.
///
/// Two counts live outside the lock, so that an ordinary child of a group without a limit goes
/// away with one atomic decrement instead of a lock (the lock is taken only by the last one, to
/// wake the joiner): `children` only grows under the lock (so a closer holding it sees a final
/// zero), and `cut_off` is added to before `children` is decremented (so a closer that saw zero
/// sees every addition).
pub(crate) struct Books<E, X: Kinds> {
    state: Mutex<State<E, X>>,
    /// Children not yet dropped: queued or running.
    children: AtomicUsize,
    /// Children cut off by the stop or winding down after it.
    cut_off: AtomicUsize,
    /// A copy of "stop is set", readable without the lock.
    stopping: AtomicBool,
    limit: Option<usize>,
    /// Without a grace period, a stop aborts every child at once.
    grace: bool,
}

impl<E, X: Kinds> Books<E, X> {
    pub(crate) fn new(limit: Option<usize>, grace: bool) -> Self {
        Books {
            state: Mutex::new(State {
                stop: None,
                late_panic: None,
                closed: false,
                dropped: false,
                joiner: None,
                nested_live: 0,
                entries: Vec::new(),
                registered: 0,
                refused: 0,
                queue: VecDeque::new(),
                aborted: false,
                reaper: None,
                token: None,
                nested: Vec::new(),
                free: Vec::new(),
            }),
            children: AtomicUsize::new(0),
            cut_off: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            limit,
            grace,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<E, X>> {
        // No user code runs under this lock, so a poisoned lock still holds consistent books.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the group has started stopping (or closed after stopping). Without the lock: a
    /// hint for fast paths; decisions are made under the lock.
    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Whether a spawn would be refused now.
    pub(crate) fn is_refusing(&self) -> bool {
        let state = self.lock();
        state.closed || state.stop.is_some()
    }

    /// The stop reason, if the group is stopping.
    pub(crate) fn stop_reason(&self) -> Option<Stop> {
        self.lock().stop.clone()
    }

    /// Registers a child. `make` builds its slot (and, when queued, the queued child) under the
    /// lock, so that the entry, the queue and the counts change together. With `give_back`, a
    /// group that is stopping or closed registers nothing and says why.
    pub(crate) fn register<R>(
        &self,
        give_back: bool,
        make: impl FnOnce(usize, Fate<'_>) -> Made<E, X::Queued, R>,
    ) -> Admission<R> {
        let mut state = self.lock();
        if state.closed {
            if give_back {
                return Admission::GiveBack(CancelReason::GroupClosed);
            }
            state.refused += 1;
            return Admission::Closed;
        }
        let index = state.entries.len();
        if let Some(stop) = &state.stop {
            if give_back {
                return Admission::GiveBack(stop.reason());
            }
            let made = make(index, Fate::Refused(stop));
            self.cut_off.fetch_add(1, Ordering::Relaxed);
            state.registered += 1;
            state.entries.push(Entry {
                task: None,
                slot: made.slot,
            });
            return Admission::Refused(made.out);
        }
        let children = self.children.load(Ordering::Relaxed);
        let running = children - state.queue.len();
        let queue = self
            .limit
            .is_some_and(|limit| running >= limit || !state.queue.is_empty());
        let made = make(index, if queue { Fate::Queue } else { Fate::Run });
        self.children.fetch_add(1, Ordering::Relaxed);
        state.registered += 1;
        state.entries.push(Entry {
            task: None,
            slot: made.slot,
        });
        match made.queued {
            Some(queued) if queue => {
                state.queue.push_back(queued);
                Admission::Queued(made.out)
            }
            _ => Admission::Run(index, made.out),
        }
    }

    /// Records the task of a child handed to the runtime outside the lock, aborting it if the
    /// group aborted its children meanwhile. Gives the task back when the group has closed
    /// (the child is already gone), to be dropped outside the lock.
    pub(crate) fn attach(&self, index: usize, task: X::Task) -> Option<X::Task> {
        let mut state = self.lock();
        if state.aborted {
            task.abort();
        }
        match state.entries.get_mut(index) {
            Some(entry) => {
                entry.task = Some(task);
                None
            }
            None => Some(task),
        }
    }

    /// A child went away: its future has been dropped. A `fatal` end (with the child's name)
    /// stops the group if it is the first reason; a panic while the group winds down for another
    /// reason is still the cause.
    pub(crate) fn gone(
        &self,
        index: usize,
        ending: Ending,
        fatal: Option<(Fatal, Cow<'static, str>)>,
    ) -> Gone<E, X> {
        match ending {
            Ending::Finished { late: true } | Ending::CutOff => {
                self.cut_off.fetch_add(1, Ordering::Relaxed);
            }
            Ending::Finished { late: false } | Ending::HandleCancelled => {}
        }
        if fatal.is_none() && self.limit.is_none() {
            // Nothing to decide and nothing queued: only the last child takes the lock.
            if self.children.fetch_sub(1, Ordering::AcqRel) != 1 {
                return Gone::nothing();
            }
            let mut state = self.lock();
            let (wake, closed) = self.settle(&mut state);
            return Gone {
                wake,
                start: None,
                stopped: None,
                closed,
            };
        }
        let mut state = self.lock();
        self.children.fetch_sub(1, Ordering::AcqRel);
        let mut stopped = None;
        if let Some((fatal, name)) = fatal {
            let stop = Stop::Failed { name, index };
            let late = !matches!(ending, Ending::Finished { late: false });
            match &state.stop {
                None => stopped = self.stop_locked(&mut state, stop).map(Box::new),
                Some(Stop::Failed { .. }) => {}
                // It failed before the group stopped (it read "not stopping" when it finished),
                // though it reports only now: the failure came first, so it is the cause. The
                // stop's effects have already happened; only the verdict changes, before close.
                Some(_) if !late => state.stop = Some(stop),
                Some(_) => {
                    if fatal == Fatal::Panicked && state.late_panic.is_none() {
                        state.late_panic = Some(index);
                    }
                }
            }
        }
        let start = match self.limit {
            Some(limit) if state.stop.is_none() => {
                let running = self.children.load(Ordering::Acquire) - state.queue.len();
                // Counted as running from here: it leaves the queue but stays a live child.
                if running < limit {
                    state.queue.pop_front()
                } else {
                    None
                }
            }
            _ => None,
        };
        let (wake, closed) = self.settle(&mut state);
        Gone {
            wake,
            start,
            stopped,
            closed,
        }
    }

    /// When nothing is left alive: takes the joiner's waker, or closes a dropped group.
    fn settle(&self, state: &mut State<E, X>) -> (Option<Waker>, Option<Box<Closed<E, X>>>) {
        if self.children.load(Ordering::Acquire) + state.nested_live > 0 {
            return (None, None);
        }
        let wake = state.joiner.take();
        let closed = (state.dropped && !state.closed).then(|| Box::new(self.close_locked(state)));
        (wake, closed)
    }

    /// Starts stopping for `stop`, unless the group is already stopping or closed.
    pub(crate) fn stop(&self, stop: Stop) -> Option<Stopped<X>> {
        let mut state = self.lock();
        self.stop_locked(&mut state, stop)
    }

    fn stop_locked(&self, state: &mut State<E, X>, stop: Stop) -> Option<Stopped<X>> {
        if state.closed || state.stop.is_some() {
            return None;
        }
        let deadline = stop == Stop::Deadline;
        state.stop = Some(stop);
        self.stopping.store(true, Ordering::Release);
        if !self.grace {
            Self::abort_locked(state);
        }
        Some(Stopped {
            queue: std::mem::take(&mut state.queue),
            token: state.token.clone(),
            nested: state.nested.iter().flatten().cloned().collect(),
            grace: self.grace,
            deadline,
        })
    }

    fn abort_locked(state: &mut State<E, X>) {
        state.aborted = true;
        for task in state.entries.iter().filter_map(|entry| entry.task.as_ref()) {
            task.abort();
        }
    }

    /// Aborts every child: the end of the grace period.
    pub(crate) fn abort_all(&self) {
        Self::abort_locked(&mut self.lock());
    }

    /// Aborts one child, cancelled through its handle.
    pub(crate) fn abort_one(&self, index: usize) {
        let state = self.lock();
        if let Some(task) = state.entries.get(index).and_then(|e| e.task.as_ref()) {
            task.abort();
        }
    }

    /// Keeps the grace period's reaper, to abort it at close; gives it back when the group has
    /// already closed, to be aborted by the caller.
    pub(crate) fn set_reaper(&self, reaper: X::Task) -> Option<X::Task> {
        let mut state = self.lock();
        if state.closed {
            return Some(reaper);
        }
        state.reaper = Some(reaper);
        None
    }

    /// The join: closes the group once nothing is alive, deciding the verdict in the same
    /// critical section that makes every later stop and spawn a no-op.
    pub(crate) fn poll_close(&self, waker: &Waker) -> Poll<Closed<E, X>> {
        let mut state = self.lock();
        if state.closed {
            // Joined twice cannot happen (join consumes the group); answer as closed anyway.
            return Poll::Ready(Closed {
                verdict: Verdict::Ok,
                entries: Vec::new(),
                reaper: None,
            });
        }
        if self.children.load(Ordering::Acquire) + state.nested_live > 0 {
            // Replaced only when it would wake another task; the old one is dropped outside the
            // lock.
            let old = match &state.joiner {
                Some(current) if current.will_wake(waker) => None,
                _ => state.joiner.replace(waker.clone()),
            };
            drop(state);
            drop(old);
            return Poll::Pending;
        }
        Poll::Ready(self.close_locked(&mut state))
    }

    fn close_locked(&self, state: &mut State<E, X>) -> Closed<E, X> {
        state.closed = true;
        let cut_off = self.cut_off.load(Ordering::Acquire);
        let verdict = match &state.stop {
            None => Verdict::Ok,
            Some(Stop::Failed { index, .. }) => Verdict::Failed(*index),
            Some(stop) => match state.late_panic {
                Some(index) => Verdict::Failed(index),
                None if cut_off == 0 => Verdict::Ok,
                None => Verdict::Stopped {
                    stop: stop.clone(),
                    cut_off,
                },
            },
        };
        Closed {
            verdict,
            entries: std::mem::take(&mut state.entries),
            reaper: state.reaper.take(),
        }
    }

    /// The owner dropped the group without joining it (after stopping it).
    pub(crate) fn owner_dropped(&self) -> Dropped<E, X> {
        let mut state = self.lock();
        state.dropped = true;
        if state.closed || self.children.load(Ordering::Acquire) + state.nested_live > 0 {
            return Dropped::Pending;
        }
        Dropped::Closed(self.close_locked(&mut state))
    }

    /// A group built inside one of this group's children asks to be held: this group does not
    /// close until it is released. Returns its id, and the reason this group is stopping, if it
    /// is, for the nested group to start stopped. `None` when this group has closed.
    pub(crate) fn adopt(&self, nested: X::Nested) -> Option<(usize, Option<Stop>)> {
        let mut state = self.lock();
        if state.closed {
            return None;
        }
        state.nested_live += 1;
        let id = match state.free.pop() {
            Some(id) => {
                state.nested[id] = Some(nested);
                id
            }
            None => {
                state.nested.push(Some(nested));
                state.nested.len() - 1
            }
        };
        Some((id, state.stop.clone()))
    }

    /// A nested group closed and every child of its is gone.
    pub(crate) fn release(&self, id: usize) -> Gone<E, X> {
        let mut state = self.lock();
        state.nested_live -= 1;
        let released = state.nested.get_mut(id).and_then(Option::take);
        if released.is_some() {
            state.free.push(id);
        }
        let (wake, closed) = self.settle(&mut state);
        drop(state);
        drop(released);
        Gone {
            wake,
            start: None,
            stopped: None,
            closed,
        }
    }

    /// The token children watch, made on first request (cancelled already if the group is
    /// stopping).
    pub(crate) fn token(&self) -> CancellationToken {
        let mut state = self.lock();
        let stopping = state.stop.is_some();
        state
            .token
            .get_or_insert_with(|| {
                let token = CancellationToken::new();
                if stopping {
                    token.cancel();
                }
                token
            })
            .clone()
    }

    pub(crate) fn counts(&self) -> Counts {
        let state = self.lock();
        Counts {
            registered: state.registered,
            refused: state.refused,
            queued: state.queue.len(),
            live: self.children.load(Ordering::Relaxed),
        }
    }
}
