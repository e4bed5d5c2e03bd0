//! The ordered map with a concurrency limit: [`TaskGroup::map`], a batch processor as one call.

use std::future::Future;

use crate::group::TaskGroup;
use crate::handle::TaskHandle;
use crate::outcome::{CancelReason, Outcome};
use crate::report::GroupError;

impl<E: Send + 'static> TaskGroup<E> {
    /// Maps `inputs` through `f`, one child per input, with at most the group's
    /// [`limit`](crate::Builder::limit) running at once, and returns the outcomes in input order.
    ///
    /// `f` is called for every input up front, but it only builds futures: a queued child costs
    /// its future and nothing more, is never polled until a slot frees up, and is discarded
    /// unstarted if the group stops. Children are named `<group>[<index>]`. Every child is
    /// spawned before `map` waits, so the group is never joined early: no child is refused.
    ///
    /// Under [`Policy::FailFast`](crate::Policy::FailFast) a successful result holds only `Ok`
    /// outcomes; under [`Policy::CollectAll`](crate::Policy::CollectAll) it holds every outcome,
    /// failures included.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::io;
    /// use taskgroup::{Outcome, Policy, TaskGroup};
    ///
    /// let group: TaskGroup<io::Error> =
    ///     TaskGroup::builder().name("batch").policy(Policy::CollectAll).limit(2).build()?;
    /// let outcomes = group
    ///     .map(1..=4, |id: u32| async move {
    ///         if id == 3 {
    ///             Err(io::Error::other(format!("user {id} is broken")))
    ///         } else {
    ///             Ok(id * 10)
    ///         }
    ///     })
    ///     .await?;
    /// let shown: Vec<String> = outcomes.iter().map(|o| o.to_string()).collect();
    /// assert!(outcomes[0].as_err().is_none());
    /// assert!(matches!(outcomes[1], Outcome::Ok(20)));
    /// assert_eq!(shown[2], "user 3 is broken");
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// The group's [`GroupError`], as from [`join`](TaskGroup::join): a fatal failure under
    /// fail-fast, a passed deadline, or a cancellation. Its report still holds every outcome
    /// except the outputs.
    pub async fn map<I, F, Fut, T>(
        self,
        inputs: I,
        mut f: F,
    ) -> Result<Vec<Outcome<T, E>>, GroupError<E>>
    where
        I: IntoIterator,
        F: FnMut(I::Item) -> Fut,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
        T: Send + 'static,
    {
        let handles: Vec<TaskHandle<T>> = inputs
            .into_iter()
            .enumerate()
            .map(|(index, input)| {
                let name = format!("{}[{index}]", self.name());
                self.spawn(name, f(input))
            })
            .collect();
        let report = self.join().await?;
        let mut outcomes: Vec<Option<Outcome<(), E>>> = report
            .into_children()
            .into_iter()
            .map(|child| Some(child.outcome))
            .collect();
        Ok(handles
            .into_iter()
            .map(|handle| {
                let outcome = outcomes
                    .get_mut(handle.index().unwrap_or(usize::MAX))
                    .and_then(Option::take)
                    // Every handle has an entry; a missing one would mean the child never ran.
                    .unwrap_or(Outcome::Cancelled(CancelReason::RuntimeShutdown));
                merge(outcome, handle)
            })
            .collect())
    }
}

/// Puts a child's output (from its handle) back into its outcome (from the report).
fn merge<T, E>(outcome: Outcome<(), E>, handle: TaskHandle<T>) -> Outcome<T, E> {
    match outcome {
        Outcome::Ok(()) => match handle.output() {
            Ok(value) => Outcome::Ok(value),
            // The handle was never given out, so its output cannot have been taken.
            Err(_) => Outcome::Cancelled(CancelReason::RuntimeShutdown),
        },
        Outcome::Err(error) => Outcome::Err(error),
        Outcome::Panicked(panic) => Outcome::Panicked(panic),
        Outcome::Cancelled(reason) => Outcome::Cancelled(reason),
        Outcome::TimedOut(timeout) => Outcome::TimedOut(timeout),
    }
}
