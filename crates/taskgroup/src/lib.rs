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
