//! What `join` returns: a [`Report`] of every child's outcome in spawn order, or a
//! [`GroupError`] that says why the group failed and still carries that report.

use std::borrow::Cow;
use std::fmt;

use crate::handle::TaskHandle;
use crate::outcome::{CancelReason, Limit, Outcome, OutcomeKind, Timeout};

/// One child's entry in a [`Report`].
#[derive(Debug)]
pub struct ChildReport<E> {
    /// The child's position in spawn order (the same as [`TaskHandle::index`]).
    pub index: usize,
    /// The child's name.
    pub name: Cow<'static, str>,
    /// How it ended. The output, if any, is read from the child's [`TaskHandle`].
    pub outcome: Outcome<(), E>,
}

/// Every child's outcome, in spawn order: the per-source outcome map of a finished group.
#[derive(Debug)]
pub struct Report<E> {
    group: Cow<'static, str>,
    /// The group's id, to refuse handles of other groups.
    id: u64,
    children: Vec<ChildReport<E>>,
}

impl<E> Report<E> {
    pub(crate) fn new(group: Cow<'static, str>, id: u64, children: Vec<ChildReport<E>>) -> Self {
        Report {
            group,
            id,
            children,
        }
    }

    /// The group's name.
    pub fn group_name(&self) -> &str {
        &self.group
    }

    /// The number of children the group had.
    pub fn len(&self) -> usize {
        self.children.len()
    }

    /// Whether the group had no children.
    pub fn is_empty(&self) -> bool {
        self.children.is_empty()
    }

    /// The children, in spawn order.
    pub fn iter(&self) -> std::slice::Iter<'_, ChildReport<E>> {
        self.children.iter()
    }

    /// The entry of the child behind `handle`; `None` for a handle of another group, or of a
    /// child spawned after the group was joined (which never joined it).
    pub fn get<T>(&self, handle: &TaskHandle<T>) -> Option<&ChildReport<E>> {
        if handle.group_id() != self.id {
            return None;
        }
        self.children.get(handle.index()?)
    }

    /// The entry of the child at `index` in spawn order.
    pub fn get_index(&self, index: usize) -> Option<&ChildReport<E>> {
        self.children.get(index)
    }

    /// The first child with this name.
    pub fn by_name(&self, name: &str) -> Option<&ChildReport<E>> {
        self.children.iter().find(|child| child.name == name)
    }

    /// How many children ended with this kind of outcome.
    pub fn count(&self, kind: OutcomeKind) -> usize {
        self.children
            .iter()
            .filter(|child| child.outcome.kind() == kind)
            .count()
    }

    /// The children that failed themselves: returned an error, panicked, or hit their own
    /// timeout (see [`Outcome::is_failure`]).
    pub fn failures(&self) -> impl Iterator<Item = &ChildReport<E>> {
        self.children
            .iter()
            .filter(|child| child.outcome.is_failure())
    }

    /// Takes the entries, in spawn order.
    pub fn into_children(self) -> Vec<ChildReport<E>> {
        self.children
    }
}

impl<'a, E> IntoIterator for &'a Report<E> {
    type Item = &'a ChildReport<E>;
    type IntoIter = std::slice::Iter<'a, ChildReport<E>>;

    fn into_iter(self) -> Self::IntoIter {
        self.children.iter()
    }
}

/// Why a joined group failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GroupErrorKind {
    /// A child failed fatally (see [`Policy`](crate::Policy)); [`GroupError::cause`] is the
    /// first such failure.
    ChildFailed,
    /// The group's deadline passed while children were still running or queued. Those it
    /// aborted or refused report [`Outcome::TimedOut`] with [`Limit::Group`](crate::Limit::Group);
    /// those that wound down after the signal, within the grace period, report what they
    /// returned.
    DeadlineExceeded,
    /// The group was cancelled ([`CancelReason::Requested`] or [`CancelReason::ParentCancelled`]).
    Cancelled(CancelReason),
}

/// A failed group: why, the first failure if a child caused it, and the full [`Report`].
///
/// Every error and panic payload of every child is in the report, tagged with the child's name;
/// [`cause`](GroupError::cause) points at the one that stopped the group, and
/// [`failures`](GroupError::failures) lists them all. Siblings that were merely cancelled are
/// reported as cancelled, not as failures.
pub struct GroupError<E> {
    kind: GroupErrorKind,
    cause: Option<usize>,
    report: Report<E>,
    /// For a deadline: how many children it cut off, counting those that wound down after the
    /// signal (which the report shows with what they returned).
    cut_off: usize,
}

impl<E> GroupError<E> {
    pub(crate) fn new(kind: GroupErrorKind, cause: Option<usize>, report: Report<E>) -> Self {
        let cut_off = report
            .iter()
            .filter(|child| {
                matches!(
                    child.outcome,
                    Outcome::TimedOut(Timeout {
                        limit: Limit::Group,
                        ..
                    })
                )
            })
            .count();
        GroupError {
            kind,
            cause,
            report,
            cut_off,
        }
    }

    pub(crate) fn with_cut_off(mut self, cut_off: usize) -> Self {
        self.cut_off = cut_off;
        self
    }

    /// Why the group failed.
    pub fn kind(&self) -> &GroupErrorKind {
        &self.kind
    }

    /// The failure that stopped the group, when a child caused it: the first fatal failure, or a
    /// panic raised while the group was stopping for a deadline or a cancellation. An error
    /// returned after the group had started stopping is not a cause; it is in the
    /// [`report`](GroupError::report) and in [`failures`](GroupError::failures).
    pub fn cause(&self) -> Option<&ChildReport<E>> {
        self.cause.and_then(|index| self.report.get_index(index))
    }

    /// Every child that failed itself, the cause included, in spawn order.
    pub fn failures(&self) -> impl Iterator<Item = &ChildReport<E>> {
        self.report.failures()
    }

    /// The outcome of every child.
    pub fn report(&self) -> &Report<E> {
        &self.report
    }

    /// Takes the report, to read every child's outcome.
    pub fn into_report(self) -> Report<E> {
        self.report
    }

    /// Takes the cause's entry, to get the error value or panic payload by value.
    pub fn into_cause(self) -> Option<ChildReport<E>> {
        let index = self.cause?;
        self.report.into_children().into_iter().nth(index)
    }

    /// If the group failed because a child panicked, re-raises that panic here with its original
    /// payload (without running the panic hook again, which already ran at the panic site);
    /// otherwise returns the error unchanged.
    #[must_use = "the error is returned unchanged when the cause was not a panic"]
    pub fn resume_panic(mut self) -> Self {
        let Some(entry) = self
            .cause
            .and_then(|index| self.report.children.get_mut(index))
        else {
            return self;
        };
        if matches!(entry.outcome, Outcome::Panicked(_)) {
            // The placeholder is never observed: `resume` does not return.
            let outcome = std::mem::replace(
                &mut entry.outcome,
                Outcome::Cancelled(CancelReason::RuntimeShutdown),
            );
            if let Outcome::Panicked(panic) = outcome {
                panic.resume();
            }
        }
        self
    }
}

impl<E: fmt::Debug> fmt::Debug for GroupError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupError")
            .field("kind", &self.kind)
            .field("cause", &self.cause())
            .field("report", &self.report)
            .finish()
    }
}

impl<E: fmt::Display> fmt::Display for GroupError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let group = self.report.group_name();
        match (&self.kind, self.cause()) {
            (GroupErrorKind::ChildFailed, Some(cause)) => match &cause.outcome {
                Outcome::Err(error) => {
                    write!(
                        f,
                        "task group `{group}`: child `{}` failed: {error}",
                        cause.name
                    )
                }
                other => write!(f, "task group `{group}`: child `{}` {other}", cause.name),
            },
            (GroupErrorKind::ChildFailed, None) => {
                write!(f, "task group `{group}`: a child failed")
            }
            (GroupErrorKind::DeadlineExceeded, _) => write!(
                f,
                "task group `{group}` exceeded its deadline; {} child(ren) cut off",
                self.cut_off
            ),
            (GroupErrorKind::Cancelled(reason), _) => {
                write!(f, "task group `{group}` was cancelled: {reason}")
            }
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for GroupError<E> {
    /// The cause's error value, when the group failed because a child returned an error.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self.cause().map(|cause| &cause.outcome) {
            Some(Outcome::Err(error)) => Some(error),
            _ => None,
        }
    }
}
