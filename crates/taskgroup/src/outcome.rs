//! What became of one child: [`Outcome`] and the reasons it carries ([`Panic`], [`CancelReason`],
//! [`Timeout`]), plus [`ChildError`], the error a [`TaskHandle`](crate::TaskHandle) gives when its
//! child produced no output.
//!
//! These types are the vocabulary shared by handles, reports and group errors, so a caller can
//! `match` on exactly why a child ended instead of parsing messages.

use std::any::Any;
use std::borrow::Cow;
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

/// How one child of a group ended. Every child ends in exactly one of these five ways.
///
/// In a [`Report`](crate::Report) the output is not included (`T = ()`), because outputs of
/// different types are delivered by each child's own [`TaskHandle`](crate::TaskHandle); the
/// ordered map ([`TaskGroup::map`](crate::TaskGroup::map)) returns the full `Outcome<T, E>`.
#[derive(Debug)]
pub enum Outcome<T, E> {
    /// The child's future returned `Ok`.
    Ok(T),
    /// The child's future returned `Err`.
    Err(E),
    /// The child's future panicked; the payload is kept so the caller can re-raise it.
    Panicked(Panic),
    /// The child was cancelled before it finished, for the reason given. A child cancelled while
    /// queued never started.
    Cancelled(CancelReason),
    /// A time limit cut the child off; [`Timeout::limit`] says which one.
    TimedOut(Timeout),
}

/// The kind of an [`Outcome`], without its data: handy for counting and for `match`es that do
/// not need the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutcomeKind {
    /// See [`Outcome::Ok`].
    Ok,
    /// See [`Outcome::Err`].
    Err,
    /// See [`Outcome::Panicked`].
    Panicked,
    /// See [`Outcome::Cancelled`].
    Cancelled,
    /// See [`Outcome::TimedOut`].
    TimedOut,
}

impl<T, E> Outcome<T, E> {
    /// The kind of this outcome.
    pub fn kind(&self) -> OutcomeKind {
        match self {
            Outcome::Ok(_) => OutcomeKind::Ok,
            Outcome::Err(_) => OutcomeKind::Err,
            Outcome::Panicked(_) => OutcomeKind::Panicked,
            Outcome::Cancelled(_) => OutcomeKind::Cancelled,
            Outcome::TimedOut(_) => OutcomeKind::TimedOut,
        }
    }

    /// Whether the child succeeded.
    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Ok(_))
    }

    /// Whether this outcome counts as a failure of the child itself: an error, a panic, or its
    /// own timeout. Being cancelled, or cut off by the group's deadline, is not the child's
    /// failure.
    pub fn is_failure(&self) -> bool {
        match self {
            Outcome::Err(_) | Outcome::Panicked(_) => true,
            Outcome::TimedOut(t) => t.limit == Limit::Child,
            Outcome::Ok(_) | Outcome::Cancelled(_) => false,
        }
    }

    /// The output, if the child succeeded.
    pub fn ok(self) -> Option<T> {
        match self {
            Outcome::Ok(value) => Some(value),
            _ => None,
        }
    }

    /// The error, if the child returned one.
    pub fn err(self) -> Option<E> {
        match self {
            Outcome::Err(error) => Some(error),
            _ => None,
        }
    }

    /// The error by reference, if the child returned one.
    pub fn as_err(&self) -> Option<&E> {
        match self {
            Outcome::Err(error) => Some(error),
            _ => None,
        }
    }

    /// Maps the output, leaving every other outcome unchanged.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Outcome<U, E> {
        match self {
            Outcome::Ok(value) => Outcome::Ok(f(value)),
            Outcome::Err(error) => Outcome::Err(error),
            Outcome::Panicked(panic) => Outcome::Panicked(panic),
            Outcome::Cancelled(reason) => Outcome::Cancelled(reason),
            Outcome::TimedOut(timeout) => Outcome::TimedOut(timeout),
        }
    }
}

impl<T, E: fmt::Display> fmt::Display for Outcome<T, E> {
    /// Writes a short, human-readable description such as `timed out after 250ms (child timeout)`,
    /// suitable for a per-source error message.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Ok(_) => f.write_str("ok"),
            Outcome::Err(error) => write!(f, "{error}"),
            Outcome::Panicked(panic) => write!(f, "panicked: {}", panic.message()),
            Outcome::Cancelled(reason) => write!(f, "cancelled: {reason}"),
            Outcome::TimedOut(timeout) => write!(f, "{timeout}"),
        }
    }
}

/// A caught panic: its message, for logs and reports, and its payload, for re-raising.
///
/// The payload is kept behind a lock only so that `Panic` (and so
/// [`GroupError`](crate::GroupError)) is `Sync` and can travel inside `anyhow::Error` or
/// `Box<dyn Error + Send + Sync>`; it is never contended.
pub struct Panic {
    // Boxed so that every `Outcome` stays small: panics are rare, outcomes are per child.
    inner: Box<PanicInner>,
}

struct PanicInner {
    message: String,
    payload: Mutex<Option<Box<dyn Any + Send + 'static>>>,
}

impl Panic {
    pub(crate) fn new(payload: Box<dyn Any + Send + 'static>) -> Self {
        let message = if let Some(text) = payload.downcast_ref::<&'static str>() {
            (*text).to_owned()
        } else if let Some(text) = payload.downcast_ref::<String>() {
            text.clone()
        } else {
            "<non-string panic payload>".to_owned()
        };
        Panic {
            inner: Box::new(PanicInner {
                message,
                payload: Mutex::new(Some(payload)),
            }),
        }
    }

    /// The panic message, when the payload was a string (as with `panic!("...")`); otherwise a
    /// placeholder.
    pub fn message(&self) -> &str {
        &self.inner.message
    }

    /// The original payload, as `std::panic::catch_unwind` would have returned it.
    pub fn into_payload(self) -> Box<dyn Any + Send + 'static> {
        let PanicInner { message, payload } = *self.inner;
        let payload = match payload.into_inner() {
            Ok(payload) => payload,
            // A poisoned lock still holds the payload; nothing else ever locks it while panicking.
            Err(poisoned) => poisoned.into_inner(),
        };
        payload.unwrap_or_else(|| Box::new(message))
    }

    /// Re-raises the panic on the calling thread with its original payload.
    ///
    /// This uses [`std::panic::resume_unwind`], which does not run the panic hook again: the hook
    /// (and any crash reporter installed in it) already ran once, at the original panic site, with
    /// the original stack.
    pub fn resume(self) -> ! {
        std::panic::resume_unwind(self.into_payload())
    }
}

impl fmt::Debug for Panic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Panic")
            .field("message", &self.inner.message)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for Panic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "panicked: {}", self.inner.message)
    }
}

/// Why a child was cancelled.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CancelReason {
    /// Another child failed fatally (an error under fail-fast or from an essential child, a
    /// panic, or its own timeout under fail-fast), and this is its name.
    SiblingFailed {
        /// The name of the child whose failure cancelled the group.
        name: Cow<'static, str>,
    },
    /// Someone called [`TaskGroup::cancel`](crate::TaskGroup::cancel) or
    /// [`Spawner::cancel`](crate::Spawner::cancel).
    Requested,
    /// The group's deadline had already passed. Children cut off by a deadline report
    /// [`Outcome::TimedOut`] instead; this reason appears only on a refused spawn
    /// ([`SpawnError::reason`](crate::SpawnError::reason)) and on a nested group stopped by its
    /// parent's deadline before it cut anything off.
    DeadlineExceeded,
    /// The parent group, or the external token the group was linked to, was cancelled.
    ParentCancelled,
    /// The group was dropped without being joined, so its children were aborted.
    GroupDropped,
    /// The child was spawned after the group had finished joining, so it was never started.
    GroupClosed,
    /// The child was dropped without the group asking for it, which happens when the runtime
    /// shuts down. The group then stops: queued children are discarded with this reason too.
    RuntimeShutdown,
    /// The child alone was cancelled through its
    /// [`TaskHandle::cancel`](crate::TaskHandle::cancel); its group was not.
    HandleCancelled,
}

impl fmt::Display for CancelReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CancelReason::SiblingFailed { name } => write!(f, "sibling `{name}` failed"),
            CancelReason::Requested => f.write_str("cancellation requested"),
            CancelReason::DeadlineExceeded => f.write_str("group deadline exceeded"),
            CancelReason::ParentCancelled => f.write_str("parent cancelled"),
            CancelReason::GroupDropped => f.write_str("group dropped without being joined"),
            CancelReason::GroupClosed => f.write_str("group already closed"),
            CancelReason::RuntimeShutdown => f.write_str("runtime shut down"),
            CancelReason::HandleCancelled => f.write_str("cancelled through its handle"),
        }
    }
}

/// Which time limit cut a child off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    /// The child's own timeout, set with [`ChildBuilder::timeout`](crate::ChildBuilder::timeout).
    /// Its clock starts when the child starts running (after waiting for a concurrency slot).
    Child,
    /// The group's deadline, set with [`Builder::timeout`](crate::Builder::timeout) or
    /// [`Builder::deadline`](crate::Builder::deadline), or inherited from a parent group.
    Group,
}

/// A time limit that cut a child off, and how long that limit was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Timeout {
    /// Which limit fired.
    pub limit: Limit,
    /// The length of that limit: the child's timeout, or the group's whole budget from its
    /// creation to its deadline.
    pub after: Duration,
}

impl fmt::Display for Timeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let which = match self.limit {
            Limit::Child => "child timeout",
            Limit::Group => "group deadline",
        };
        write!(f, "timed out after {:?} ({which})", self.after)
    }
}

/// Why a [`TaskHandle`](crate::TaskHandle) has no output to give.
///
/// Handles deliver outputs; errors and panic payloads are delivered once, by
/// [`TaskGroup::join`](crate::TaskGroup::join), so this type says *what* happened and the
/// join result says *with what value*.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("child `{name}` {kind}")]
pub struct ChildError {
    /// The child's name.
    pub name: Cow<'static, str>,
    /// What happened to it.
    pub kind: ChildErrorKind,
}

/// What happened to a child that produced no output.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChildErrorKind {
    /// The child returned an error; the error value is in the group's join result.
    #[error("failed (the error is reported by the group's join)")]
    Failed,
    /// The child panicked; the payload is in the group's join result.
    #[error("panicked: {message}")]
    Panicked {
        /// The panic message.
        message: String,
    },
    /// The child was cancelled.
    #[error("was cancelled: {0}")]
    Cancelled(CancelReason),
    /// A time limit cut the child off.
    #[error("{0}")]
    TimedOut(Timeout),
    /// The child has not finished yet (only from [`TaskHandle::output`](crate::TaskHandle::output)
    /// or [`TaskHandle::try_output`](crate::TaskHandle::try_output) called before the group was
    /// joined).
    #[error("has not finished yet")]
    NotFinished,
    /// The output was already taken from this handle.
    #[error("output already taken")]
    Taken,
}
