//! [`Builder`]: a group's name, policy, concurrency limit, deadline, grace period and outside
//! cancellation, and where a new group finds its parent.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::books::Stop;
use crate::context;
use crate::group::TaskGroup;
use crate::shared::{Config, Shared, watchdog};

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
    /// [`ChildBuilder::essential`](crate::ChildBuilder::essential)`(true)` still cancels the
    /// group when it fails, and a panic always does.
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
    /// Outside tokens that cancel the group.
    tokens: Vec<CancellationToken>,
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
            .field("linked", &self.tokens.len())
            .finish()
    }
}

impl<E: Send + 'static> Builder<E> {
    pub(crate) fn new() -> Self {
        Builder {
            name: Cow::Borrowed("taskgroup"),
            policy: Policy::FailFast,
            limit: None,
            timeout: None,
            deadline: None,
            grace: None,
            tokens: Vec::new(),
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
    /// without starting: they are not tokio tasks yet, and their future is not polled. They start
    /// in spawn order as running children finish, and stopping the group discards them
    /// unstarted. Spawning never waits. A limit of zero is refused by [`build`](Builder::build).
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Gives the whole group `timeout`, counted from `build`: when it passes, whatever is still
    /// running or queued is cut off ([`Limit::Group`](crate::Limit::Group)) and `join` reports
    /// [`GroupErrorKind::DeadlineExceeded`](crate::GroupErrorKind::DeadlineExceeded). Combined
    /// with [`deadline`](Builder::deadline) or an inherited deadline, the earliest wins. A
    /// timeout too long to represent is no limit.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Like [`timeout`](Builder::timeout), as an instant.
    pub fn deadline(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Makes stopping two-phase: when the group stops (or is dropped unjoined), it signals its
    /// children at once, lets them run for `grace` to wind down, and only then aborts what is
    /// still running. The default is zero: abort at once. A nested group's grace period is at
    /// most half its parent's (see [`build`](Builder::build)).
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = Some(grace);
        self
    }

    /// Links the group to an outside token (a server's shutdown token, say): cancelling that
    /// token cancels the group ([`CancelReason::ParentCancelled`](crate::CancelReason)). Links
    /// add up, with each other and with the group's parent: any of them cancels it.
    pub fn cancel_on(mut self, token: &CancellationToken) -> Self {
        self.tokens.push(token.clone());
        self
    }

    /// Builds the group.
    ///
    /// **Nesting.** A group built while a child of another group is running (inside that child's
    /// future) is nested in that child's group, whether or not it is handed anything: the
    /// parent does not close (its `join` does not return, a dropped parent does not let go)
    /// until the nested group has been joined or dropped and every child of it, at any depth,
    /// is gone. The nested group inherits the child's deadline (the earlier of the child's own
    /// timeout and its group's deadline), is stopped when the parent stops (reporting the
    /// deadline as its own deadline, anything else as
    /// [`CancelReason::ParentCancelled`](crate::CancelReason::ParentCancelled)), and its grace
    /// period is at most half the parent's, so it aborts, reports and lets the child finish
    /// before the parent's own grace period ends.
    ///
    /// # Errors
    ///
    /// [`BuildError::NoRuntime`] outside a tokio runtime, [`BuildError::ZeroLimit`] for a limit
    /// of zero.
    ///
    /// # Panics
    ///
    /// Like tokio's own timers, when a deadline or grace period is set on a runtime without the
    /// time driver (build it with `enable_time()` or `enable_all()`). A child timeout on such a
    /// runtime panics in the child, and is reported as that child's panic.
    pub fn build(self) -> Result<TaskGroup<E>, BuildError> {
        let runtime = Handle::try_current().map_err(|_| BuildError::NoRuntime)?;
        if self.limit == Some(0) {
            return Err(BuildError::ZeroLimit);
        }
        let parent = context::parent();
        let inherited = parent.as_ref().and_then(|(_, deadline)| *deadline);
        // Read only when needed: on most machines a clock read is the dearest part of a build.
        let now = (self.timeout.is_some() || self.deadline.is_some() || inherited.is_some())
            .then(Instant::now);
        // A timeout too long to represent as an instant is no limit at all.
        let own = [
            self.deadline,
            self.timeout
                .and_then(|t| now.and_then(|now| now.checked_add(t))),
        ]
        .into_iter()
        .flatten()
        .min();
        let deadline = [own, inherited].into_iter().flatten().min();
        let grace = match &parent {
            Some((parent, _)) => {
                let most = parent.grace() / 2;
                self.grace.unwrap_or(most).min(most)
            }
            None => self.grace.unwrap_or_default(),
        };
        // An inherited deadline is enforced by the parent: by the child's own timeout, which drops
        // the child and with it this group, or by the parent group's deadline, which stops this
        // group with it. Only a tighter deadline of this group's own needs a timer of its own.
        let watch_deadline = own.filter(|own| inherited.is_none_or(|inherited| *own < inherited));
        // tokio's timer panics without a time driver: create it here, on the caller's thread.
        let sleep = watch_deadline.map(tokio::time::sleep_until);
        if sleep.is_none() && !grace.is_zero() {
            drop(tokio::time::sleep(Duration::ZERO));
        }

        let (shared, born) = Shared::<E>::new(
            Config {
                name: self.name,
                policy: self.policy,
                limit: self.limit,
                deadline,
                budget: match (deadline, now) {
                    (Some(deadline), Some(now)) => deadline.saturating_duration_since(now),
                    _ => Duration::ZERO,
                },
                grace,
                runtime: runtime.clone(),
            },
            parent.map(|(parent, _)| parent),
        );
        // A group born cancelled or past its deadline stops now, so no child of it can start.
        let born = born.or_else(|| {
            if self.tokens.iter().any(CancellationToken::is_cancelled) {
                Some(Stop::Parent)
            } else if deadline.is_some_and(|d| now.is_some_and(|now| d <= now)) {
                Some(Stop::Deadline)
            } else {
                None
            }
        });
        if let Some(stop) = born {
            shared.stop(stop);
        }
        let watchdog = (sleep.is_some() || !self.tokens.is_empty()).then(|| {
            runtime.spawn(watchdog(
                std::sync::Arc::downgrade(&shared),
                sleep,
                self.tokens,
            ))
        });
        Ok(TaskGroup::from_parts(shared, watchdog))
    }
}
