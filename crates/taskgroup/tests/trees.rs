//! Property tests over random trees of groups, on both runtimes: containment at every depth.
//!
//! A generated tree is a group whose children are leaves (finish, fail, panic or hang, after a
//! delay, with or without their own timeout and clean-up on cancellation) or groups of the same
//! kind, up to three levels deep and a thousand leaves. Each group has a random policy, limit,
//! deadline and grace period, may have siblings spawned into it through a spawner, may be
//! cancelled from inside, and is ended by its owner in one of three ways: joined, dropped at a
//! random point, or run as a scope. Nested groups are never told they are nested.
//!
//! On the current-thread runtime the clock is tokio's paused one, so deadlines, timeouts and
//! grace periods are exact and every case is deterministic. On the two-worker runtime the clock
//! cannot be paused, so those trees carry nothing that depends on time (delays are yields).
//!
//! After every case: no future of the tree, at any depth, is alive when the top group's `join`
//! (or scope) returns, or once a dropped top group has wound down; the live-children gauge is
//! back where it started; every joined group's verdict agrees with its report; and no group ran
//! more children at once than its limit.
#![allow(clippy::unwrap_used)] // Test support outside any #[test] uses unwrap too.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use taskgroup::{
    CancelReason, ChildContext, GroupError, GroupErrorKind, Limit, Outcome, Policy, Report,
    ScopeError, Spawner, TaskGroup, Timeout, live_children,
};

mod common;

use common::{SCRIPTED_PANIC, quiet_scripted_panics, serial};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Ok,
    Err,
    Panic,
    /// Sleeps an hour: only a cut-off ends it in time.
    Hang,
}

#[derive(Debug, Clone)]
struct Leaf {
    delay: u64,
    end: End,
    timeout: Option<u64>,
    essential: Option<bool>,
    /// When signalled, winds down for this long, then returns an error.
    cleanup: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    Join,
    /// The owner drops the group unjoined after this delay.
    DropAfter(u64),
    Scope,
}

#[derive(Debug, Clone)]
struct Group {
    policy: Policy,
    limit: Option<usize>,
    deadline: Option<u64>,
    grace: Option<u64>,
    children: Vec<Node>,
    /// Leaves spawned through a spawner by an extra child, after these delays.
    late: Vec<u64>,
    /// An extra child cancels the group after this delay.
    cancel_after: Option<u64>,
    exit: Exit,
}

#[derive(Debug, Clone)]
enum Node {
    Leaf(Leaf),
    Group(Box<Group>),
}

fn leaf(timed: bool) -> impl Strategy<Value = Leaf> {
    let end = if timed {
        prop_oneof![
            6 => Just(End::Ok),
            2 => Just(End::Err),
            1 => Just(End::Panic),
            1 => Just(End::Hang),
        ]
        .boxed()
    } else {
        prop_oneof![6 => Just(End::Ok), 2 => Just(End::Err), 1 => Just(End::Panic)].boxed()
    };
    let timed_options = if timed {
        (
            proptest::option::weighted(0.2, 1u64..150),
            proptest::option::weighted(0.2, 0u64..60),
        )
            .boxed()
    } else {
        Just((None, None)).boxed()
    };
    (
        0u64..100,
        end,
        timed_options,
        proptest::option::of(any::<bool>()),
    )
        .prop_map(|(delay, end, (timeout, cleanup), essential)| Leaf {
            delay,
            end,
            timeout,
            essential,
            cleanup,
        })
}

fn group_of(children: BoxedStrategy<Node>, timed: bool) -> impl Strategy<Value = Group> {
    let timed_options = if timed {
        (
            proptest::option::weighted(0.3, 1u64..300),
            proptest::option::weighted(0.3, 0u64..80),
        )
            .boxed()
    } else {
        Just((None, None)).boxed()
    };
    let exit = prop_oneof![
        6 => Just(Exit::Join),
        2 => (0u64..120).prop_map(Exit::DropAfter),
        2 => Just(Exit::Scope),
    ];
    (
        proptest::collection::vec(children, 0..12),
        prop_oneof![Just(Policy::FailFast), Just(Policy::CollectAll)],
        proptest::option::weighted(0.3, 1usize..5),
        timed_options,
        proptest::collection::vec(0u64..100, 0..3),
        proptest::option::weighted(0.15, 0u64..150),
        exit,
    )
        .prop_map(
            |(children, policy, limit, (deadline, grace), late, cancel_after, exit)| Group {
                policy,
                limit,
                deadline,
                grace,
                children,
                late,
                cancel_after,
                exit,
            },
        )
}

/// A tree of groups up to three levels below the top one, up to about a thousand leaves.
fn tree(timed: bool) -> impl Strategy<Value = Group> {
    let leaves = leaf(timed).prop_map(Node::Leaf).boxed();
    let nodes = leaves.prop_recursive(3, 1000, 12, move |inner| {
        group_of(inner, timed)
            .prop_map(|group| Node::Group(Box::new(group)))
            .boxed()
    });
    group_of(nodes.boxed(), timed)
}

/// What every node of a running tree shares.
#[derive(Clone)]
struct Env {
    /// Futures of the tree built and not yet dropped.
    alive: Arc<AtomicUsize>,
    timed: bool,
    /// Broken promises found inside the tree, where a panic would only become a child's panic.
    violations: Arc<Mutex<Vec<String>>>,
}

struct Alive(Arc<AtomicUsize>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts a running child of a group against its limit.
struct Running(Arc<AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Env {
    fn alive(&self) -> Alive {
        self.alive.fetch_add(1, Ordering::SeqCst);
        Alive(Arc::clone(&self.alive))
    }

    fn violation(&self, message: String) {
        self.violations.lock().unwrap().push(message);
    }

    /// Waits `delay` virtual milliseconds, or yields a few times on a real clock.
    async fn pause(&self, delay: u64) {
        if self.timed {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        } else {
            for _ in 0..delay % 4 {
                tokio::task::yield_now().await;
            }
        }
    }
}

type Child = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// A node's future: counted alive from now until it is dropped.
fn node(node: Node, env: Env, path: String, depth: usize, deadline_above: bool) -> Child {
    let alive = env.alive();
    Box::pin(async move {
        let _alive = alive;
        match node {
            Node::Leaf(leaf) => run_leaf(leaf, env).await,
            Node::Group(group) => run_group(*group, env, path, depth, deadline_above).await,
        }
    })
}

async fn run_leaf(leaf: Leaf, env: Env) -> Result<(), String> {
    let body = async {
        env.pause(leaf.delay).await;
        match leaf.end {
            End::Ok => Ok(()),
            End::Err => Err("scripted error".to_owned()),
            End::Panic => std::panic::panic_any(SCRIPTED_PANIC),
            End::Hang => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(())
            }
        }
    };
    let Some(cleanup) = leaf.cleanup else {
        return body.await;
    };
    let context = ChildContext::current().ok_or("a leaf runs as a child")?;
    tokio::select! {
        result = body => result,
        () = context.cancelled() => {
            env.pause(cleanup).await;
            Err("cleaned up".to_owned())
        }
    }
}

fn is_fatal(leaf_essential: Option<bool>, policy: Policy, outcome: &Outcome<(), String>) -> bool {
    let essential = leaf_essential.unwrap_or(policy == Policy::FailFast);
    match outcome {
        Outcome::Panicked(_) => true,
        Outcome::Err(_) => essential,
        Outcome::TimedOut(t) => essential && t.limit == Limit::Child,
        Outcome::Ok(()) | Outcome::Cancelled(_) => false,
    }
}

/// Spawns the group's children, the spawner child and the canceller; returns the peak counter.
fn spawn_children(
    group: &Group,
    spawner: &Spawner<String>,
    env: &Env,
    path: &str,
    depth: usize,
    deadline_above: bool,
) -> Arc<AtomicUsize> {
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let counted = |future: Child| -> Child {
        let running = Arc::clone(&running);
        let peak = Arc::clone(&peak);
        Box::pin(async move {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            let _running = Running(running);
            future.await
        })
    };
    let deadline_here = deadline_above || group.deadline.is_some();
    for (i, child) in group.children.iter().enumerate() {
        let name = format!("{path}/{i}");
        let mut builder = spawner.child(name.clone());
        if let Node::Leaf(leaf) = child {
            if let Some(timeout) = leaf.timeout {
                builder = builder.timeout(Duration::from_millis(timeout));
            }
            if let Some(essential) = leaf.essential {
                builder = builder.essential(essential);
            }
        }
        builder.spawn(counted(node(
            child.clone(),
            env.clone(),
            name,
            depth + 1,
            deadline_here,
        )));
    }
    if !group.late.is_empty() {
        let late = group.late.clone();
        let inner = spawner.clone();
        let env_inner = env.clone();
        let alive = env.alive();
        let path = path.to_owned();
        spawner.spawn(
            format!("{path}/spawner"),
            counted(Box::pin(async move {
                let _alive = alive;
                for (k, delay) in late.into_iter().enumerate() {
                    env_inner.pause(delay).await;
                    let leaf = Leaf {
                        delay,
                        end: End::Ok,
                        timeout: None,
                        essential: None,
                        cleanup: None,
                    };
                    let name = format!("{path}/late{k}");
                    inner.spawn(
                        name.clone(),
                        node(Node::Leaf(leaf), env_inner.clone(), name, depth + 1, false),
                    );
                }
                Ok(())
            })),
        );
    }
    if let Some(after) = group.cancel_after {
        let canceller = spawner.clone();
        let env_inner = env.clone();
        let alive = env.alive();
        spawner.spawn(
            format!("{path}/canceller"),
            counted(Box::pin(async move {
                let _alive = alive;
                env_inner.pause(after).await;
                canceller.cancel();
                Ok(())
            })),
        );
    }
    peak
}

/// Checks a joined group's verdict against its report.
fn check_verdict(
    group: &Group,
    env: &Env,
    path: &str,
    depth: usize,
    deadline_above: bool,
    joined: &Result<Report<String>, GroupError<String>>,
) {
    let report = match joined {
        Ok(report) => report,
        Err(error) => error.report(),
    };
    let essential_of = |index: usize| match group.children.get(index) {
        Some(Node::Leaf(leaf)) => leaf.essential,
        _ => None,
    };
    let fatal = report
        .iter()
        .any(|child| is_fatal(essential_of(child.index), group.policy, &child.outcome));
    match joined {
        Ok(_) if fatal => env.violation(format!("{path}: Ok with a fatal failure in the report")),
        Ok(_) => {}
        Err(error) => match error.kind() {
            GroupErrorKind::ChildFailed => {
                let cause = error.cause();
                if !cause.is_some_and(|c| c.outcome.is_failure()) {
                    env.violation(format!("{path}: failed with no failing cause"));
                }
            }
            GroupErrorKind::DeadlineExceeded => {
                if !(deadline_above || group.deadline.is_some()) {
                    env.violation(format!("{path}: a deadline without a deadline"));
                }
            }
            GroupErrorKind::Cancelled(CancelReason::Requested) => {
                if group.cancel_after.is_none() {
                    env.violation(format!("{path}: cancelled but nobody cancelled it"));
                }
            }
            GroupErrorKind::Cancelled(CancelReason::ParentCancelled) => {
                if depth == 0 {
                    env.violation(format!("{path}: parent-cancelled without a parent"));
                }
            }
            other => env.violation(format!("{path}: unexpected verdict {other:?}")),
        },
    }
    for child in report {
        if let Outcome::TimedOut(Timeout {
            limit: Limit::Group,
            ..
        }) = child.outcome
            && !(deadline_above || group.deadline.is_some())
        {
            env.violation(format!(
                "{path}: {} cut by a deadline it has not",
                child.name
            ));
        }
    }
}

async fn run_group(
    group: Group,
    env: Env,
    path: String,
    depth: usize,
    deadline_above: bool,
) -> Result<(), String> {
    let mut builder = TaskGroup::<String>::builder()
        .name(path.clone())
        .policy(group.policy);
    if let Some(limit) = group.limit {
        builder = builder.limit(limit);
    }
    if let Some(deadline) = group.deadline {
        builder = builder.timeout(Duration::from_millis(deadline));
    }
    if let Some(grace) = group.grace {
        builder = builder.grace(Duration::from_millis(grace));
    }
    let peak;
    let result = match group.exit {
        Exit::Scope => {
            let (env2, path2, group2) = (env.clone(), path.clone(), group.clone());
            let peak_slot = Arc::new(Mutex::new(None));
            let slot = Arc::clone(&peak_slot);
            let scoped = builder
                .scope(move |spawner| async move {
                    let peak =
                        spawn_children(&group2, &spawner, &env2, &path2, depth, deadline_above);
                    *slot.lock().unwrap() = Some(peak);
                    Ok(())
                })
                .await;
            peak = peak_slot.lock().unwrap().take();
            match scoped {
                Ok(()) => Ok(()),
                Err(ScopeError::Group(error)) => {
                    check_verdict(&group, &env, &path, depth, deadline_above, &Err(error));
                    Err("scope failed".to_owned())
                }
                Err(other) => Err(other.to_string()),
            }
        }
        Exit::Join | Exit::DropAfter(_) => {
            let built = builder.build().map_err(|e| e.to_string())?;
            let spawner = built.spawner();
            peak = Some(spawn_children(
                &group,
                &spawner,
                &env,
                &path,
                depth,
                deadline_above,
            ));
            if let Exit::DropAfter(delay) = group.exit {
                env.pause(delay).await;
                drop(built);
                Ok(())
            } else {
                let joined = built.join().await;
                check_verdict(&group, &env, &path, depth, deadline_above, &joined);
                joined.map(|_| ()).map_err(|e| e.to_string())
            }
        }
    };
    if let (Some(limit), Some(peak)) = (group.limit, peak) {
        let peak = peak.load(Ordering::SeqCst);
        if peak > limit {
            env.violation(format!(
                "{path}: {peak} children ran at once, limit {limit}"
            ));
        }
    }
    result
}

/// Runs a tree on `runtime`; `settle` waits (boundedly) for a dropped top group to wind down.
fn run_tree(
    runtime: &tokio::runtime::Runtime,
    tree: Group,
    timed: bool,
) -> Result<(), TestCaseError> {
    let env = Env {
        alive: Arc::new(AtomicUsize::new(0)),
        timed,
        violations: Arc::new(Mutex::new(Vec::new())),
    };
    let before = live_children();
    let dropped = matches!(tree.exit, Exit::DropAfter(_));
    let (alive_at_return, alive_settled, gauge) = runtime.block_on(async {
        let top = tokio::time::timeout(
            Duration::from_secs(if timed { 100_000 } else { 60 }),
            run_group(tree, env.clone(), "top".to_owned(), 0, false),
        );
        let returned = top.await;
        let alive_at_return = env.alive.load(Ordering::SeqCst);
        // A dropped top group winds down with nobody waiting: give it (bounded) time.
        for _ in 0..10_000 {
            if env.alive.load(Ordering::SeqCst) == 0 && live_children() == before {
                break;
            }
            if timed {
                tokio::time::sleep(Duration::from_secs(1)).await;
            } else {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        assert!(returned.is_ok(), "the top group never returned");
        (
            alive_at_return,
            env.alive.load(Ordering::SeqCst),
            live_children(),
        )
    });
    let violations = env.violations.lock().unwrap().clone();
    prop_assert!(violations.is_empty(), "{violations:?}");
    if !dropped {
        prop_assert_eq!(
            alive_at_return,
            0,
            "futures alive when the top group returned"
        );
    }
    prop_assert_eq!(alive_settled, 0, "futures never dropped");
    prop_assert_eq!(gauge, before, "the gauge did not come back");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn trees_are_contained_at_every_depth_current_thread_paused_clock(tree in tree(true)) {
        quiet_scripted_panics();
        let _serial = serial();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        run_tree(&runtime, tree, true)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn trees_are_contained_at_every_depth_multi_thread(tree in tree(false)) {
        quiet_scripted_panics();
        let _serial = serial();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        run_tree(&runtime, tree, false)?;
    }
}
