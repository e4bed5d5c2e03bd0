//! The loom model of the books' protocol: every interleaving of spawning, finishing, stopping,
//! nesting and closing that loom can reach, run on the real [`Books`] with stand-ins for tokio's
//! task handles. Run with
//! `RUSTFLAGS="--cfg taskgroup_loom" cargo test -p taskgroup --release --lib loom_model`
//! (`cargo xtask test` does).
//!
//! The checks are the races the protocol exists to win: the verdict is fixed when the group
//! closes and says "cancelled" only if something was cut off; nothing stops, spawns into or
//! changes a closed group; the joiner is always woken (a lost wake-up is a loom deadlock); a
//! child handed to the runtime while the group aborts is aborted too; and a parent does not close
//! while a nested group still has a child.

use std::borrow::Cow;
use std::sync::Arc;

use loom::sync::atomic::{AtomicBool, Ordering};
use loom::thread;

use crate::books::{
    Abort, Admission, Books, Dropped, Ending, ErasedSlot, Fatal, Fate, Kinds, Made, Stop, Verdict,
};
use crate::outcome::Outcome;

struct Model;

#[derive(Clone)]
struct Task(Arc<AtomicBool>);

impl Abort for Task {
    fn abort(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl Kinds for Model {
    type Task = Task;
    type Queued = usize;
    type Nested = ();
}

struct Slot;

impl ErasedSlot<()> for Slot {
    fn take_outcome(&self) -> Outcome<(), ()> {
        Outcome::Ok(())
    }

    fn name(&self) -> &Cow<'static, str> {
        const NAME: &Cow<'static, str> = &Cow::Borrowed("child");
        NAME
    }
}

type ModelBooks = Books<(), Model>;

/// Registers a child the way `Shared::spawn` does; returns its index if it is to run.
fn register(books: &ModelBooks) -> Option<usize> {
    let admission = books.register(false, |index, fate| Made {
        slot: Arc::new(Slot),
        queued: matches!(fate, Fate::Queue).then_some(index),
        out: (),
    });
    match admission {
        Admission::Run(index, ()) => Some(index),
        _ => None,
    }
}

/// Joins the way `TaskGroup::join` does: polls until the books close.
fn join(books: &ModelBooks) -> crate::books::Closed<(), Model> {
    loom::future::block_on(std::future::poll_fn(|cx| books.poll_close(cx.waker())))
}

#[test]
fn the_verdict_is_cancelled_only_if_the_stop_cut_something_off() {
    loom::model(|| {
        let books = Arc::new(ModelBooks::new(None, false));
        let index = register(&books).expect("an open group runs its child");
        let child = {
            let books = Arc::clone(&books);
            thread::spawn(move || {
                // As a child's task does: it reads "late" when it finishes, then goes.
                let late = books.is_stopping();
                let gone = books.gone(index, Ending::Finished { late }, None);
                if let Some(waker) = gone.wake {
                    waker.wake();
                }
                late
            })
        };
        let stopper = {
            let books = Arc::clone(&books);
            thread::spawn(move || books.stop(Stop::Requested).is_some())
        };
        let closed = join(&books);
        let late = child.join().expect("child thread");
        let stopped = stopper.join().expect("stopper thread");
        let expected = if stopped && late {
            Verdict::Stopped {
                stop: Stop::Requested,
                cut_off: 1,
            }
        } else {
            Verdict::Ok
        };
        assert_eq!(closed.verdict, expected);
        // Closed is final: no stop, no spawn.
        assert!(books.stop(Stop::Requested).is_none());
        assert!(register(&books).is_none());
    });
}

#[test]
fn a_child_registered_before_close_is_waited_for_and_one_after_is_refused() {
    loom::model(|| {
        let books = Arc::new(ModelBooks::new(None, false));
        let spawner = {
            let books = Arc::clone(&books);
            thread::spawn(move || {
                let index = register(&books)?;
                let gone = books.gone(index, Ending::Finished { late: false }, None);
                if let Some(waker) = gone.wake {
                    waker.wake();
                }
                Some(index)
            })
        };
        let closed = join(&books);
        let ran = spawner.join().expect("spawner thread");
        assert_eq!(closed.entries.len(), usize::from(ran.is_some()));
        assert_eq!(closed.verdict, Verdict::Ok);
    });
}

#[test]
fn a_child_attached_while_the_group_aborts_is_aborted() {
    loom::model(|| {
        let books = Arc::new(ModelBooks::new(None, false));
        let task = Task(Arc::new(AtomicBool::new(false)));
        let spawner = {
            let books = Arc::clone(&books);
            let task = task.clone();
            thread::spawn(move || {
                let index = register(&books)?;
                // Handed to the runtime outside the lock, then attached.
                assert!(books.attach(index, task).is_none());
                Some(index)
            })
        };
        let stopped = books.stop(Stop::Requested).is_some();
        let index = spawner.join().expect("spawner thread");
        assert!(stopped);
        if index.is_some() {
            // Registered before or after the stop, it must not keep running.
            assert!(task.0.load(Ordering::SeqCst));
        }
    });
}

#[test]
fn every_finishing_child_is_counted_and_the_joiner_is_woken() {
    loom::model(|| {
        let books = Arc::new(ModelBooks::new(None, false));
        let first = register(&books).expect("runs");
        let second = register(&books).expect("runs");
        let finish = |index| {
            let books = Arc::clone(&books);
            thread::spawn(move || {
                let gone = books.gone(index, Ending::Finished { late: false }, None);
                if let Some(waker) = gone.wake {
                    waker.wake();
                }
            })
        };
        let a = finish(first);
        let b = finish(second);
        let closed = join(&books);
        a.join().expect("thread");
        b.join().expect("thread");
        assert_eq!(closed.entries.len(), 2);
        assert_eq!(closed.verdict, Verdict::Ok);
    });
}

#[test]
fn a_parent_does_not_close_while_a_dropped_nested_group_has_a_child() {
    loom::model(|| {
        let parent = Arc::new(ModelBooks::new(None, false));
        let nested = Arc::new(ModelBooks::new(None, false));
        let (id, stop) = parent.adopt(()).expect("the parent is open");
        assert!(stop.is_none());
        let child = register(&nested).expect("runs");
        let finished = Arc::new(AtomicBool::new(false));
        // The nested group's owner drops it (as an aborted middle child would) while its child
        // is still winding down on another thread.
        let grandchild = {
            let nested = Arc::clone(&nested);
            let parent = Arc::clone(&parent);
            let finished = Arc::clone(&finished);
            thread::spawn(move || {
                finished.store(true, Ordering::SeqCst);
                let gone = nested.gone(child, Ending::CutOff, None);
                if gone.closed.is_some() {
                    // The last child of a dropped group releases its parent, as
                    // `Shared::closed` does.
                    if let Some(waker) = parent.release(id).wake {
                        waker.wake();
                    }
                }
            })
        };
        nested.stop(Stop::Dropped);
        if let Dropped::Closed(_) = nested.owner_dropped() {
            if let Some(waker) = parent.release(id).wake {
                waker.wake();
            }
        }
        let closed = join(&parent);
        assert!(
            finished.load(Ordering::SeqCst),
            "the parent closed while a descendant was alive"
        );
        assert_eq!(closed.verdict, Verdict::Ok);
        grandchild.join().expect("thread");
    });
}

#[test]
fn a_failure_and_a_stop_racing_give_one_verdict() {
    loom::model(|| {
        let books = Arc::new(ModelBooks::new(None, false));
        let failing = register(&books).expect("runs");
        let child = {
            let books = Arc::clone(&books);
            thread::spawn(move || {
                let late = books.is_stopping();
                let gone = books.gone(
                    failing,
                    Ending::Finished { late },
                    Some((Fatal::Failed, Cow::Borrowed("child"))),
                );
                if let Some(waker) = gone.wake {
                    waker.wake();
                }
                late
            })
        };
        let stopped = books.stop(Stop::Deadline).is_some();
        let closed = join(&books);
        let late = child.join().expect("thread");
        if stopped && late {
            // The deadline came first; the error, returned after it, is not the cause.
            assert_eq!(
                closed.verdict,
                Verdict::Stopped {
                    stop: Stop::Deadline,
                    cut_off: 1
                }
            );
        } else {
            // The failure came first (even if it reported after the deadline): it is the cause.
            assert_eq!(closed.verdict, Verdict::Failed(failing));
        }
    });
}
