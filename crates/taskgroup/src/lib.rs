//! Structured concurrency for tokio (docs in progress).

mod child;
mod context;
mod group;
mod handle;
mod map;
mod outcome;
mod report;

pub use context::ChildContext;
pub use group::{
    BuildError, Builder, ChildBuilder, Policy, SpawnError, Spawner, Stats, TaskGroup,
    live_children,
};
pub use handle::TaskHandle;
pub use outcome::{
    CancelReason, ChildError, ChildErrorKind, Limit, Outcome, OutcomeKind, Panic, Timeout,
};
pub use report::{ChildReport, GroupError, GroupErrorKind, Report};
pub use tokio_util::sync::CancellationToken;

#[cfg(test)]
mod tests {
    /// tokio stores a task in one 128-byte cell when its future is at most 24 bytes (on 64-bit
    /// targets), and in two otherwise. A child's task wraps a small future in 24 bytes so that a
    /// task group's children take no more task memory than `JoinSet`'s; this keeps it that way.
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn a_small_childs_task_stays_within_one_tokio_cell() {
        type Small = std::future::Ready<Result<u8, std::convert::Infallible>>;
        type Task = crate::child::ChildTask<crate::child::Ready<Small>, std::convert::Infallible>;
        assert!(std::mem::size_of::<Task>() <= 24);
    }
}
