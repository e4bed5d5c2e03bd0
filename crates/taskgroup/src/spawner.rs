//! Spawning: [`ChildBuilder`] (the one way a child is spawned, with its options), [`Spawner`] (a
//! cloneable handle that spawns into a group from anywhere), and [`SpawnError`] (a refusal that
//! gives the future back).

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::books::Stop;
use crate::handle::TaskHandle;
use crate::outcome::CancelReason;
use crate::shared::Shared;

/// Why a group refused a child; it gives the child back.
pub struct SpawnError<F> {
    reason: CancelReason,
    child: F,
}

impl<F> SpawnError<F> {
    /// Why the group refused the child: it is stopping (for the given reason) or already closed
    /// ([`CancelReason::GroupClosed`]).
    pub fn reason(&self) -> &CancelReason {
        &self.reason
    }

    /// The future that was not spawned.
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
        write!(
            f,
            "task group is not taking children ({}); child not spawned",
            self.reason
        )
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

/// A cloneable handle that spawns children into a group from anywhere, including from inside its
/// children, and cancels it. It does not keep the group open: once the group is stopping or
/// joined, spawns are refused.
pub struct Spawner<E> {
    pub(crate) shared: Arc<Shared<E>>,
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
    /// Spawns a child: `self.child(name).spawn(future)`. See [`ChildBuilder::spawn`].
    pub fn spawn<F, T>(&self, name: impl Into<Cow<'static, str>>, future: F) -> TaskHandle<T>
    where
        F: Future<Output = Result<T, E>> + Send + 'static,
        T: Send + 'static,
    {
        self.child(name).spawn(future)
    }

    /// Starts building a child with options: its own timeout, whether its failure stops the
    /// group, and whether a refusal gives the future back.
    pub fn child(&self, name: impl Into<Cow<'static, str>>) -> ChildBuilder<'_, E> {
        ChildBuilder {
            shared: &self.shared,
            name: name.into(),
            timeout: None,
            essential: None,
        }
    }

    /// Cancels the group: queued children never start, running ones are signalled and aborted
    /// (after the grace period, if any), and `join` reports
    /// [`GroupErrorKind::Cancelled`](crate::GroupErrorKind::Cancelled) if that cut anything off
    /// (unless a child failed first). Does nothing once the group is stopping or joined.
    pub fn cancel(&self) {
        self.shared.stop(Stop::Requested);
    }

    /// Whether the group has stopped taking children: it is stopping (a failure, its deadline,
    /// a cancellation) or has been joined.
    pub fn is_stopping(&self) -> bool {
        self.shared.books.is_refusing()
    }

    /// A token that is cancelled when the group starts stopping, for code outside the group that
    /// wants to notice. It is a child of the group's own token: cancelling it affects only this
    /// copy (use [`cancel`](Spawner::cancel) to stop the group).
    pub fn token(&self) -> CancellationToken {
        self.shared.books.token().child_token()
    }

    /// A snapshot of the group's child counts.
    pub fn stats(&self) -> Stats {
        let counts = self.shared.books.counts();
        let c = &self.shared.counters;
        let load = |counter: &std::sync::atomic::AtomicUsize| {
            counter.load(std::sync::atomic::Ordering::Relaxed)
        };
        let spawned = counts.registered + counts.refused;
        let (failed, panicked, cancelled, timed_out) = (
            load(&c.failed),
            load(&c.panicked),
            load(&c.cancelled),
            load(&c.timed_out),
        );
        Stats {
            spawned,
            queued: counts.queued,
            running: counts.live.saturating_sub(counts.queued),
            succeeded: spawned
                .saturating_sub(counts.live + failed + panicked + cancelled + timed_out),
            failed,
            panicked,
            cancelled,
            timed_out,
        }
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

impl<E: Send + 'static> ChildBuilder<'_, E> {
    /// Cuts the child off after `timeout` of running (not counting time queued for a
    /// concurrency slot); it then reports [`Outcome::TimedOut`](crate::Outcome::TimedOut) with
    /// [`Limit::Child`](crate::Limit::Child). The group's deadline still applies on top. Needs the
    /// runtime's time driver: without one, the child panics when it starts (tokio's own message)
    /// and is reported as panicked.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Whether this child's error (or own timeout) stops the group. Defaults to the group's
    /// policy: `true` under [`Policy::FailFast`](crate::Policy::FailFast), `false` under
    /// [`Policy::CollectAll`](crate::Policy::CollectAll). A panic always stops the group.
    pub fn essential(mut self, essential: bool) -> Self {
        self.essential = Some(essential);
        self
    }

    /// Spawns the child. It starts at once, or when a concurrency slot frees up.
    ///
    /// A group that is stopping (a child failed, the deadline passed, it was cancelled) does not
    /// start the child: its future is dropped unpolled, it appears in the report as cancelled
    /// (or timed out, for a passed deadline), and its handle says so. A group that has been
    /// joined does not take it at all: its handle reports [`CancelReason::GroupClosed`], its
    /// [`index`](TaskHandle::index) is `None` and no report has an entry for it. To get the
    /// future back instead, use [`try_spawn`](ChildBuilder::try_spawn).
    ///
    /// The future runs as this group's child: [`ChildContext::current`](crate::ChildContext)
    /// inside it describes it, and a group built inside it is nested in this one.
    pub fn spawn<F, T>(self, future: F) -> TaskHandle<T>
    where
        F: Future<Output = Result<T, E>> + Send + 'static,
        T: Send + 'static,
    {
        match (self.shared).spawn(self.name, self.timeout, self.essential, future, false) {
            Ok(handle) => handle,
            // Only `try_spawn` is ever refused; were this one, it would be as a refused child.
            Err((reason, future)) => {
                drop(future);
                self.shared.detached(None, reason)
            }
        }
    }

    /// Spawns the child unless the group is stopping or joined (Swift's `addTaskUnlessCancelled`,
    /// Python's "TaskGroup is shutting down").
    ///
    /// # Errors
    ///
    /// A [`SpawnError`] holding the future, when the group is stopping or already joined.
    pub fn try_spawn<F, T>(self, future: F) -> Result<TaskHandle<T>, SpawnError<F>>
    where
        F: Future<Output = Result<T, E>> + Send + 'static,
        T: Send + 'static,
    {
        self.shared
            .spawn(self.name, self.timeout, self.essential, future, true)
            .map_err(|(reason, child)| SpawnError { reason, child })
    }
}
