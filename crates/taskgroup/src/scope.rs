//! The scoped form: a group that lives exactly as long as a body of code, like Python's
//! `async with asyncio.TaskGroup()`, a Trio nursery block or Kotlin's `coroutineScope`.
//!
//! A group on its own cannot await anything when it is dropped (Rust has no async drop), so an
//! early return with `?` leaves its children winding down in the background, still contained by
//! any parent but unawaited. [`TaskGroup::scope`] closes that gap: whatever way the body ends,
//! the children are cancelled if need be and awaited before `scope` returns.

use std::fmt;

use crate::books::Stop;
use crate::builder::{BuildError, Builder};
use crate::group::TaskGroup;
use crate::report::{GroupError, GroupErrorKind, Report};
use crate::spawner::Spawner;

/// Why a [scope](TaskGroup::scope) produced no value.
#[non_exhaustive]
pub enum ScopeError<E> {
    /// The group could not be built.
    Build(BuildError),
    /// The body returned this error; its children were cancelled and awaited, and the report
    /// says how each ended.
    Body {
        /// The body's error.
        error: E,
        /// Every child's outcome.
        report: Report<E>,
    },
    /// The group failed (a child failed, the deadline passed, it was cancelled); if that
    /// happened while the body was running, the body was cancelled with the children.
    Group(GroupError<E>),
}

impl<E: fmt::Debug> fmt::Debug for ScopeError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScopeError::Build(error) => f.debug_tuple("Build").field(error).finish(),
            ScopeError::Body { error, report } => f
                .debug_struct("Body")
                .field("error", error)
                .field("report", report)
                .finish(),
            ScopeError::Group(error) => f.debug_tuple("Group").field(error).finish(),
        }
    }
}

impl<E: fmt::Display> fmt::Display for ScopeError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScopeError::Build(error) => write!(f, "{error}"),
            ScopeError::Body { error, report } => write!(
                f,
                "task group `{}`: the scope's body failed: {error}",
                report.group_name()
            ),
            ScopeError::Group(error) => write!(f, "{error}"),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for ScopeError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ScopeError::Build(error) => Some(error),
            ScopeError::Body { error, .. } => Some(error),
            ScopeError::Group(error) => error.source(),
        }
    }
}

impl<E: Send + 'static> TaskGroup<E> {
    /// Runs `body` with a spawner for a new default group, then awaits every child:
    /// `TaskGroup::builder().scope(body)`. See [`Builder::scope`].
    ///
    /// # Errors
    ///
    /// As [`Builder::scope`].
    pub async fn scope<R, F, Fut>(body: F) -> Result<R, ScopeError<E>>
    where
        F: FnOnce(Spawner<E>) -> Fut,
        Fut: Future<Output = Result<R, E>>,
    {
        Builder::new().scope(body).await
    }
}

impl<E: Send + 'static> Builder<E> {
    /// Builds the group, runs `body` with its [`Spawner`], and returns only once every child has
    /// finished and been dropped, however the body ended:
    ///
    /// * the body returns `Ok(value)`: the group is joined (its children run to the end) and
    ///   `scope` returns the value, or the group's failure;
    /// * the body returns `Err` (an early return with `?`, say): the group is cancelled, its
    ///   children awaited, and the error returned with their report;
    /// * the group stops while the body runs (a child failed, the deadline passed): the body is
    ///   cancelled (dropped at its current await) along with the children, as in a Trio nursery.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use taskgroup::{ScopeError, TaskGroup};
    ///
    /// #[derive(Debug, thiserror::Error)]
    /// #[error("no such user")]
    /// struct NotFound;
    ///
    /// let result = TaskGroup::<NotFound>::scope(|group| async move {
    ///     let slow = group.spawn("slow", async {
    ///         tokio::time::sleep(Duration::from_secs(60)).await;
    ///         Ok(1)
    ///     });
    ///     group.spawn("profile", async { Err::<u32, _>(NotFound) });
    ///     let _ = slow.await; // the failure cancels `slow`, and the body with it
    ///     Ok("unreachable")
    /// })
    /// .await;
    /// let Err(ScopeError::Group(error)) = result else { panic!("{result:?}") };
    /// assert_eq!(error.cause().map(|c| &*c.name), Some("profile"));
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// [`ScopeError::Build`] when the group cannot be built, [`ScopeError::Body`] when the body
    /// returned an error, [`ScopeError::Group`] when the group failed.
    pub async fn scope<R, F, Fut>(self, body: F) -> Result<R, ScopeError<E>>
    where
        F: FnOnce(Spawner<E>) -> Fut,
        Fut: Future<Output = Result<R, E>>,
    {
        let group = self.build().map_err(ScopeError::Build)?;
        let stopped = group.token().cancelled_owned();
        let body = body(group.spawner());
        let ended = tokio::select! {
            biased;
            ended = body => Some(ended),
            () = stopped => None,
        };
        match ended {
            Some(Ok(value)) => group.join().await.map(|_| value).map_err(ScopeError::Group),
            Some(Err(error)) => {
                group.cancel();
                let report = match group.join().await {
                    Ok(report) => report,
                    Err(failed) => failed.into_report(),
                };
                Err(ScopeError::Body { error, report })
            }
            None => {
                let stop = group.spawner().shared.books.stop_reason();
                match group.join().await {
                    Err(failed) => Err(ScopeError::Group(failed)),
                    // Nothing but the body was cut off; it was, so the group did not succeed.
                    Ok(report) => {
                        let kind = match stop {
                            Some(Stop::Deadline) => GroupErrorKind::DeadlineExceeded,
                            Some(stop) => GroupErrorKind::Cancelled(stop.reason()),
                            None => GroupErrorKind::Cancelled(crate::CancelReason::Requested),
                        };
                        Err(ScopeError::Group(
                            GroupError::new(kind, None, report).with_cut_off(1),
                        ))
                    }
                }
            }
        }
    }
}
