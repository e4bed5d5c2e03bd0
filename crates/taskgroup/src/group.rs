//! [`TaskGroup`]: the owner's handle. Spawning and cancelling go through its [`Spawner`]; what is
//! the owner's alone is here: [`join`](TaskGroup::join), the scoped form
//! ([`scope`](TaskGroup::scope)), and what dropping an unjoined group does.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::books::{Dropped, Stop, Verdict};
use crate::builder::{BuildError, Builder};
use crate::handle::TaskHandle;
use crate::report::{ChildReport, GroupError, GroupErrorKind, Report};
use crate::shared::Shared;
use crate::spawner::{ChildBuilder, Spawner, Stats};

/// A group of child tasks that cannot outlive it.
///
/// See the [crate documentation](crate) for the guarantees. In short: spawn children (each gets a
/// typed [`TaskHandle`]), then [`join`](TaskGroup::join) the group, which returns only once every
/// child, and every child of a group nested in one, has finished and been dropped. Dropping the
/// group without joining it stops every child (after the grace period, if one is set).
pub struct TaskGroup<E: Send + 'static> {
    spawner: Spawner<E>,
    watchdog: Option<JoinHandle<()>>,
    joined: bool,
}

impl<E: Send + 'static> fmt::Debug for TaskGroup<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskGroup")
            .field("name", &self.shared().name)
            .field("policy", &self.shared().policy)
            .field("deadline", &self.shared().deadline)
            .field("stats", &self.stats())
            .finish()
    }
}

impl<E: Send + 'static> TaskGroup<E> {
    pub(crate) fn from_parts(shared: Arc<Shared<E>>, watchdog: Option<JoinHandle<()>>) -> Self {
        TaskGroup {
            spawner: Spawner { shared },
            watchdog,
            joined: false,
        }
    }

    fn shared(&self) -> &Arc<Shared<E>> {
        &self.spawner.shared
    }

    /// Starts configuring a group.
    pub fn builder() -> Builder<E> {
        Builder::new()
    }

    /// A fail-fast group with no limit and no deadline (nested, if built inside a child).
    ///
    /// # Errors
    ///
    /// [`BuildError::NoRuntime`] when called outside a tokio runtime.
    pub fn new() -> Result<Self, BuildError> {
        Builder::new().build()
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        &self.shared().name
    }

    /// Spawns a child: `group.child(name).spawn(future)`. See [`ChildBuilder::spawn`].
    pub fn spawn<F, T>(&self, name: impl Into<Cow<'static, str>>, future: F) -> TaskHandle<T>
    where
        F: Future<Output = Result<T, E>> + Send + 'static,
        T: Send + 'static,
    {
        self.spawner.child(name).spawn(future)
    }

    /// Starts building a child with options. See [`ChildBuilder`].
    pub fn child(&self, name: impl Into<Cow<'static, str>>) -> ChildBuilder<'_, E> {
        self.spawner.child(name)
    }

    /// A cloneable handle that spawns children into this group from anywhere, including from
    /// inside its children, and cancels it.
    pub fn spawner(&self) -> Spawner<E> {
        self.spawner.clone()
    }

    /// Cancels the group. See [`Spawner::cancel`].
    pub fn cancel(&self) {
        self.spawner.cancel();
    }

    /// Whether the group has started stopping (a failure, its deadline, a cancellation).
    pub fn is_stopping(&self) -> bool {
        self.spawner.is_stopping()
    }

    /// A token that is cancelled when the group starts stopping. See [`Spawner::token`].
    pub fn token(&self) -> CancellationToken {
        self.spawner.token()
    }

    /// The group's deadline, if it has one (its own or inherited).
    pub fn deadline(&self) -> Option<Instant> {
        self.shared().deadline
    }

    /// A snapshot of the group's child counts.
    pub fn stats(&self) -> Stats {
        self.spawner.stats()
    }

    /// Waits until every child has finished and been dropped, and every group nested in a child
    /// has closed with all of its own children gone; then reports.
    ///
    /// Children may spawn siblings (through a [`Spawner`]) while the group is being joined; `join`
    /// waits for those too. It closes the group once nothing is left, in the same step that fixes
    /// the verdict: from then on spawns are refused and cancelling does nothing.
    ///
    /// Cancel-safe in the structured sense: if the `join` future is dropped before it completes,
    /// the group is dropped with it (see the `Drop` impl).
    ///
    /// # Errors
    ///
    /// A [`GroupError`] whose [`kind`](GroupError::kind) says why, the first reason to stop being
    /// the verdict: a child failed fatally ([`GroupErrorKind::ChildFailed`], with that first
    /// failure as the cause; a panic while winding down is the cause too), the deadline cut off
    /// at least one child ([`GroupErrorKind::DeadlineExceeded`]), or a cancellation cut off at
    /// least one ([`GroupErrorKind::Cancelled`]). A deadline or cancellation that came when
    /// nothing was left to cut off is no failure. Every variant carries the full [`Report`].
    pub async fn join(mut self) -> Result<Report<E>, GroupError<E>> {
        let shared = Arc::clone(self.shared());
        let closed = std::future::poll_fn(|cx| shared.books.poll_close(cx.waker())).await;
        self.joined = true;
        if let Some(watchdog) = self.watchdog.take() {
            watchdog.abort();
        }
        if let Some(reaper) = &closed.reaper {
            reaper.abort();
        }
        // Nothing of this group is alive any more: its parent need not wait for it.
        shared.release_parent();
        let children = closed
            .entries
            .into_iter()
            .enumerate()
            .map(|(index, entry)| ChildReport {
                index,
                name: entry.slot.name().clone(),
                outcome: entry.slot.take_outcome(),
            })
            .collect();
        let report = Report::new(shared.name.clone(), shared.id, children);
        match closed.verdict {
            Verdict::Ok => Ok(report),
            Verdict::Failed(index) => Err(GroupError::new(
                GroupErrorKind::ChildFailed,
                Some(index),
                report,
            )),
            Verdict::Stopped { stop, cut_off } => Err(GroupError::new(
                match stop {
                    Stop::Deadline => GroupErrorKind::DeadlineExceeded,
                    stop => GroupErrorKind::Cancelled(stop.reason()),
                },
                None,
                report,
            )
            .with_cut_off(cut_off)),
        }
    }
}

impl<E: Send + 'static> Drop for TaskGroup<E> {
    /// Stops a group that was not joined, as cancelling it would (reason
    /// [`CancelReason::GroupDropped`](crate::CancelReason::GroupDropped)): children are
    /// signalled, given the grace period if one is set, then aborted; aborted children are
    /// dropped the next time the runtime reaches them. Nothing waits here (there is no one left
    /// to wait), but a parent group still does: it does not close until the last of these
    /// children is gone.
    fn drop(&mut self) {
        if let Some(watchdog) = self.watchdog.take() {
            watchdog.abort();
        }
        if self.joined {
            return;
        }
        let shared = self.shared();
        shared.stop(Stop::Dropped);
        if let Dropped::Closed(closed) = shared.books.owner_dropped() {
            shared.closed(closed);
        }
    }
}
