//! [`ChildContext`]: what a running child can know about itself and its group, found the way Trio
//! finds the enclosing nursery: through the task that is running.
//!
//! While a child's future is polled, the child is the thread's *current child* (a thread-local set
//! for the poll and restored after it). That is how a group built inside a child finds its parent
//! without being told (it nests: see [`Builder::build`](crate::Builder::build)), and how a child
//! reads its deadline, its remaining budget and its group's cancellation signal without having
//! them passed in.

use std::cell::Cell;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::shared::Node;

/// A child seen without its types: its name and its group.
pub(crate) trait ChildNode: Send + Sync {
    fn name(&self) -> &str;
    fn group(&self) -> &dyn Node;
    fn group_arc(&self) -> Arc<dyn Node>;
}

#[derive(Clone)]
struct Current {
    child: Arc<dyn ChildNode>,
    /// The child's deadline: the earlier of its own timeout and its group's deadline.
    deadline: Option<Instant>,
}

thread_local! {
    static CURRENT: Cell<Option<Current>> = const { Cell::new(None) };
}

/// Makes `child` the current child until the guard is dropped.
pub(crate) fn enter(child: Arc<dyn ChildNode>, deadline: Option<Instant>) -> Entered {
    let previous = CURRENT
        .try_with(|current| current.replace(Some(Current { child, deadline })))
        .ok()
        .flatten();
    Entered { previous }
}

/// Restores the previous current child when dropped.
pub(crate) struct Entered {
    previous: Option<Current>,
}

impl Drop for Entered {
    fn drop(&mut self) {
        let previous = self.previous.take();
        // The replaced value is dropped after the thread-local is released.
        let _mine = CURRENT.try_with(|current| current.replace(previous));
    }
}

fn current() -> Option<Current> {
    CURRENT
        .try_with(|current| {
            let value = current.take();
            let copy = value.clone();
            current.set(value);
            copy
        })
        .ok()
        .flatten()
}

/// The group a group built now nests in, and the deadline it inherits: the current child's.
pub(crate) fn parent() -> Option<(Arc<dyn Node>, Option<Instant>)> {
    current().map(|current| (current.child.group_arc(), current.deadline))
}

/// A running child's view of itself and its group.
///
/// ```
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use taskgroup::{ChildContext, TaskGroup};
///
/// let group = TaskGroup::<std::io::Error>::builder().timeout(Duration::from_secs(2)).build()?;
/// let budget = group.child("fetch").timeout(Duration::from_millis(250)).spawn(async {
///     // Size this child's own waits (an HTTP timeout, say) from what is left of its budget.
///     let context = ChildContext::current().expect("inside a child");
///     Ok(context.remaining())
/// });
/// group.join().await?;
/// assert_eq!(budget.output()?, Some(Duration::from_millis(250)));
/// assert!(ChildContext::current().is_none()); // not inside a child here
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct ChildContext {
    current: Current,
}

impl ChildContext {
    /// The context of the child running on this thread now, or `None` outside a child (or in a
    /// task a child spawned with plain `tokio::spawn`, which is not a child of any group).
    pub fn current() -> Option<ChildContext> {
        current().map(|current| ChildContext { current })
    }

    /// This child's name.
    pub fn name(&self) -> &str {
        self.current.child.name()
    }

    /// The name of the group this child belongs to.
    pub fn group_name(&self) -> &str {
        self.current.child.group().name()
    }

    /// The instant this child will be cut off: the earlier of its own timeout (counted from when
    /// it started) and its group's deadline. `None` when neither is set.
    pub fn deadline(&self) -> Option<Instant> {
        self.current.deadline
    }

    /// The time left before [`deadline`](ChildContext::deadline), zero once it has passed; `None`
    /// when there is no limit. Use it to bound the child's own waits.
    pub fn remaining(&self) -> Option<Duration> {
        self.current
            .deadline
            .map(|deadline| deadline.saturating_duration_since(Instant::now()))
    }

    /// The group's grace period between signalling cancellation and aborting.
    pub fn grace(&self) -> Duration {
        self.current.child.group().grace()
    }

    /// Whether the group has started stopping (a failure, its deadline, a cancellation).
    pub fn is_stopping(&self) -> bool {
        self.current.child.group().stopping().is_some()
    }

    /// Resolves when the group starts stopping: the signal to clean up (send a PostgreSQL cancel
    /// request, say) before the grace period ends and the child is aborted.
    pub fn cancelled(&self) -> WaitForCancellationFutureOwned {
        self.current.child.group().token().cancelled_owned()
    }

    /// A token that is cancelled when the group starts stopping, to hand to code that takes a
    /// `CancellationToken`. It is a child of the group's own token, so cancelling it affects only
    /// this copy.
    pub fn token(&self) -> CancellationToken {
        self.current.child.group().token().child_token()
    }
}

impl fmt::Debug for ChildContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChildContext")
            .field("name", &self.name())
            .field("group", &self.group_name())
            .field("deadline", &self.current.deadline)
            .finish()
    }
}
