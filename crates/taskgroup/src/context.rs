//! [`ChildContext`]: what a child spawned with `spawn_with` gets to know about its group.
//!
//! A child uses it to size its own waits (an HTTP or statement timeout from
//! [`remaining`](ChildContext::remaining)), to clean up when the group is cancelled (watch
//! [`token`](ChildContext::token), e.g. to send a PostgreSQL cancel request), to spawn siblings,
//! and to nest a group that inherits its deadline and cancellation.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use crate::group::{Shared, Spawner};

/// A running child's view of its group.
pub struct ChildContext<E> {
    name: Cow<'static, str>,
    shared: Arc<Shared<E>>,
    deadline: Option<Instant>,
}

impl<E: Send + 'static> ChildContext<E> {
    pub(crate) fn new(
        name: Cow<'static, str>,
        shared: Arc<Shared<E>>,
        deadline: Option<Instant>,
    ) -> Self {
        ChildContext {
            name,
            shared,
            deadline,
        }
    }

    /// A spawner for adding siblings to this child's group.
    pub fn spawner(&self) -> Spawner<E> {
        Spawner::new(Arc::clone(&self.shared))
    }

    /// Cancels the whole group, as [`TaskGroup::cancel`](crate::TaskGroup::cancel) does.
    pub fn cancel_group(&self) {
        self.spawner().cancel();
    }
}

impl<E> ChildContext<E> {
    /// This child's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A token that is cancelled as soon as the group starts stopping (a sibling failed, the
    /// deadline passed, the group or its parent was cancelled); with a grace period, the child has
    /// that long to finish before it is aborted. Hand it to code that takes a
    /// `CancellationToken`.
    ///
    /// It is a child of the group's own token, so cancelling it affects only this copy; to stop
    /// the group, call [`cancel_group`](ChildContext::cancel_group).
    pub fn token(&self) -> CancellationToken {
        self.shared.token.child_token()
    }

    /// Whether the group has started stopping.
    pub fn is_cancelled(&self) -> bool {
        self.shared.token.is_cancelled()
    }

    /// Resolves when the group starts stopping.
    pub fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.shared.token.cancelled()
    }

    /// The instant this child will be cut off: the earlier of its own timeout (counted from when
    /// it started) and its group's deadline. `None` when neither is set.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The time left before [`deadline`](ChildContext::deadline), zero once it has passed; `None`
    /// when there is no limit. Use it to bound the child's own waits.
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline
            .map(|deadline| deadline.saturating_duration_since(Instant::now()))
    }

    /// The group's grace period between signalling cancellation and aborting.
    pub fn grace(&self) -> Duration {
        self.shared.grace
    }

    /// The name of the group this child belongs to.
    pub fn group_name(&self) -> &str {
        &self.shared.name
    }
}

impl<E> fmt::Debug for ChildContext<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChildContext")
            .field("name", &self.name)
            .field("group", &self.shared.name)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}
