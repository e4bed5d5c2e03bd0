//! Property tests of one group's verdict: random mixes of successes, errors, panics, sleeps,
//! per-child timeouts, limits, deadlines, policies and small nested groups, each run on a fresh
//! current-thread runtime with tokio's paused clock, so every generated case is deterministic and
//! takes no real time. (`trees.rs` checks containment over random trees of groups, on both
//! runtimes.)
//!
//! Every case checks the guarantees that must hold whatever the mix: the live-children gauge is
//! back at its start after `join`; no more than `limit` children ever run at once; each child's
//! outcome is one its script allows; the group's verdict follows from the outcomes (a fatal
//! failure wins, and it is the earliest one; else a deadline that cut a child off; else success);
//! children are cancelled only after the failure or deadline that explains it; and the ordered map
//! returns outputs in input order.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use taskgroup::{
    CancelReason, GroupErrorKind, Limit, Outcome, Policy, TaskGroup, Timeout, live_children,
};
use tokio::time::{Instant, sleep};

mod common;

use common::{SCRIPTED_PANIC, quiet_scripted_panics, serial};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Script {
    Ok,
    Err,
    Panic,
    /// Runs a nested group of this many children that sleep, then succeeds.
    Nested(usize),
}

#[derive(Debug, Clone)]
struct ChildSpec {
    delay: u64,
    script: Script,
    timeout: Option<u64>,
    essential: Option<bool>,
}

#[derive(Debug, Clone)]
struct Scenario {
    children: Vec<ChildSpec>,
    policy: Policy,
    limit: Option<usize>,
    deadline: Option<u64>,
}

fn child_spec() -> impl Strategy<Value = ChildSpec> {
    let script = prop_oneof![
        6 => Just(Script::Ok),
        3 => Just(Script::Err),
        1 => Just(Script::Panic),
        1 => (1usize..4).prop_map(Script::Nested),
    ];
    (
        0u64..200,
        script,
        proptest::option::of(1u64..200),
        proptest::option::of(any::<bool>()),
    )
        .prop_map(|(delay, script, timeout, essential)| ChildSpec {
            delay,
            script,
            timeout,
            essential,
        })
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        proptest::collection::vec(child_spec(), 0..12),
        prop_oneof![Just(Policy::FailFast), Just(Policy::CollectAll)],
        proptest::option::of(1usize..4),
        proptest::option::of(1u64..400),
    )
        .prop_map(|(children, policy, limit, deadline)| Scenario {
            children,
            policy,
            limit,
            deadline,
        })
}

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
}

/// What each child saw of itself, in virtual milliseconds since the case started.
#[derive(Debug, Default, Clone, Copy)]
struct Trace {
    started: Option<u64>,
    finished: Option<u64>,
}

/// Decrements the running count however the child ends, including by abort.
struct Running(Arc<AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How long a child runs if nothing cuts it off: its sleep, plus its nested group's slowest leaf.
fn duration(spec: &ChildSpec) -> u64 {
    match spec.script {
        Script::Nested(n) => spec.delay + 10 * (n as u64 - 1),
        _ => spec.delay,
    }
}

fn is_fatal(spec: &ChildSpec, policy: Policy, outcome: &Outcome<(), String>) -> bool {
    let essential = spec.essential.unwrap_or(policy == Policy::FailFast);
    match outcome {
        Outcome::Panicked(_) => true,
        Outcome::Err(_) => essential,
        Outcome::TimedOut(t) => essential && t.limit == Limit::Child,
        Outcome::Ok(()) | Outcome::Cancelled(_) => false,
    }
}

fn run_scenario(scenario: &Scenario) -> Result<(), TestCaseError> {
    let runtime = paused_runtime();
    runtime.block_on(async {
        let before = live_children();
        let origin = Instant::now();
        let now_ms = move || u64::try_from(origin.elapsed().as_millis()).unwrap();
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let traces = Arc::new(Mutex::new(vec![Trace::default(); scenario.children.len()]));

        let mut builder = TaskGroup::<String>::builder()
            .name("prop")
            .policy(scenario.policy);
        if let Some(limit) = scenario.limit {
            builder = builder.limit(limit);
        }
        if let Some(deadline) = scenario.deadline {
            builder = builder.timeout(Duration::from_millis(deadline));
        }
        let group = builder.build().unwrap();

        for (index, spec) in scenario.children.iter().enumerate() {
            let spec = spec.clone();
            let running = Arc::clone(&running);
            let peak = Arc::clone(&peak);
            let traces = Arc::clone(&traces);
            let mut child = group.child(format!("c{index}"));
            if let Some(timeout) = spec.timeout {
                child = child.timeout(Duration::from_millis(timeout));
            }
            if let Some(essential) = spec.essential {
                child = child.essential(essential);
            }
            child.spawn(async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                let _running = Running(running);
                traces.lock().unwrap()[index].started = Some(now_ms());
                sleep(Duration::from_millis(spec.delay)).await;
                let result = match spec.script {
                    Script::Ok => Ok(()),
                    Script::Err => Err(format!("c{index} failed")),
                    Script::Panic => std::panic::panic_any(SCRIPTED_PANIC),
                    Script::Nested(n) => {
                        // Nested in this child without being told.
                        let inner = TaskGroup::<String>::new().map_err(|e| e.to_string())?;
                        for k in 0..n {
                            inner.spawn("leaf", async move {
                                sleep(Duration::from_millis(10 * k as u64)).await;
                                Ok(())
                            });
                        }
                        inner.join().await.map(|_| ()).map_err(|e| e.to_string())
                    }
                };
                traces.lock().unwrap()[index].finished = Some(now_ms());
                result
            });
        }

        let joined = group.join().await;
        let end = now_ms();

        // No child outlives the group: `join` returned only after every child was dropped,
        // nested ones included.
        prop_assert_eq!(live_children(), before);
        if let Some(limit) = scenario.limit {
            prop_assert!(peak.load(Ordering::SeqCst) <= limit);
        }

        let (report, kind, cause) = match joined {
            Ok(report) => (report, None, None),
            Err(error) => {
                let kind = error.kind().clone();
                let cause = error.cause().map(|c| c.index);
                (error.into_report(), Some(kind), cause)
            }
        };
        let traces = traces.lock().unwrap().clone();
        prop_assert_eq!(report.len(), scenario.children.len());

        // Each outcome is one its script allows.
        for (child, (spec, trace)) in report.iter().zip(scenario.children.iter().zip(&traces)) {
            let cut_by_own_timeout = spec.timeout.is_some_and(|t| t < duration(spec));
            // A nested group inherits the child's timeout as its deadline; when the two expire at
            // the same instant either may be the one reported.
            let may_be_cut = spec.timeout.is_some_and(|t| t <= duration(spec));
            match &child.outcome {
                Outcome::Ok(()) => {
                    prop_assert!(matches!(spec.script, Script::Ok | Script::Nested(_)));
                    prop_assert!(!cut_by_own_timeout);
                    prop_assert!(trace.finished.is_some());
                }
                Outcome::Err(_) => {
                    prop_assert!(matches!(spec.script, Script::Err | Script::Nested(_)));
                }
                Outcome::Panicked(panic) => {
                    prop_assert_eq!(spec.script, Script::Panic);
                    prop_assert_eq!(panic.message(), SCRIPTED_PANIC);
                }
                Outcome::TimedOut(Timeout {
                    limit: Limit::Child,
                    after,
                }) => {
                    prop_assert!(may_be_cut);
                    prop_assert_eq!(Some(after.as_millis() as u64), spec.timeout);
                }
                Outcome::TimedOut(Timeout {
                    limit: Limit::Group,
                    ..
                }) => {
                    let deadline = scenario.deadline.unwrap();
                    prop_assert!(
                        trace.started.is_none_or(|s| s + duration(spec) >= deadline),
                        "cut by the deadline but would have finished before it"
                    );
                }
                Outcome::Cancelled(reason) => {
                    // Only a fatal failure cancels children in these scenarios.
                    let CancelReason::SiblingFailed { name } = reason else {
                        return Err(TestCaseError::fail(format!("unexpected reason {reason}")));
                    };
                    let cause = cause.unwrap();
                    prop_assert_eq!(name, &report.get_index(cause).unwrap().name);
                    let failed_at = traces[cause].finished;
                    if let (Some(started), Some(failed_at)) = (trace.started, failed_at) {
                        prop_assert!(started + duration(spec) >= failed_at);
                    }
                }
            }
        }

        // The verdict follows from the outcomes.
        let fatal: Vec<usize> = report
            .iter()
            .zip(&scenario.children)
            .filter(|(child, spec)| is_fatal(spec, scenario.policy, &child.outcome))
            .map(|(child, _)| child.index)
            .collect();
        let cut_by_deadline = report.iter().any(|child| {
            matches!(
                child.outcome,
                Outcome::TimedOut(Timeout {
                    limit: Limit::Group,
                    ..
                })
            )
        });
        if !fatal.is_empty() {
            prop_assert_eq!(kind, Some(GroupErrorKind::ChildFailed));
            let cause = cause.unwrap();
            prop_assert!(fatal.contains(&cause));
            // The cause is the earliest fatal failure. A child cut off by its own timeout records
            // no finish time, so its failure instant is its start plus its timeout.
            let failed_at = |i: usize| {
                let spec = &scenario.children[i];
                match (&report.get_index(i).unwrap().outcome, traces[i].started) {
                    (Outcome::TimedOut(_), Some(started)) => started + spec.timeout.unwrap(),
                    _ => traces[i].finished.unwrap_or(end),
                }
            };
            let earliest = fatal.iter().map(|&i| failed_at(i)).min().unwrap();
            prop_assert_eq!(failed_at(cause), earliest);
        } else if cut_by_deadline {
            prop_assert_eq!(kind, Some(GroupErrorKind::DeadlineExceeded));
            prop_assert_eq!(Some(end), scenario.deadline);
        } else {
            prop_assert_eq!(kind, None);
        }

        // Under collect-all with no panics and no deadline, every child runs to its script.
        let has_panic = scenario.children.iter().any(|c| c.script == Script::Panic);
        if scenario.policy == Policy::CollectAll
            && !has_panic
            && scenario.deadline.is_none()
            && fatal.is_empty()
        {
            let plain = report
                .iter()
                .zip(&scenario.children)
                .filter(|(_, spec)| !matches!(spec.script, Script::Nested(_)));
            for (child, spec) in plain {
                let cut = spec.timeout.is_some_and(|t| t < spec.delay);
                let expected = match (cut, spec.script) {
                    (true, _) => "TimedOut",
                    (false, Script::Err) => "Err",
                    (false, _) => "Ok",
                };
                prop_assert_eq!(format!("{:?}", child.outcome.kind()), expected);
            }
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn every_guarantee_holds_for_random_groups(scenario in scenario()) {
        quiet_scripted_panics();
        let _serial = serial();
        run_scenario(&scenario)?;
    }

    #[test]
    fn the_ordered_map_returns_outputs_in_input_order(
        delays in proptest::collection::vec(0u64..100, 0..40),
        limit in 1usize..6,
    ) {
        let _serial = serial();
        let runtime = paused_runtime();
        let (values, peak) = runtime.block_on(async {
            let running = Arc::new(AtomicUsize::new(0));
            let peak = Arc::new(AtomicUsize::new(0));
            let group = TaskGroup::<String>::builder().limit(limit).build().unwrap();
            let outcomes = group
                .map(delays.clone().into_iter().enumerate(), |(i, delay)| {
                    let running = Arc::clone(&running);
                    let peak = Arc::clone(&peak);
                    async move {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(now, Ordering::SeqCst);
                        let _running = Running(running);
                        sleep(Duration::from_millis(delay)).await;
                        Ok(i)
                    }
                })
                .await
                .unwrap();
            let values: Vec<usize> = outcomes.into_iter().map(|o| o.ok().unwrap()).collect();
            (values, peak.load(Ordering::SeqCst))
        });
        prop_assert_eq!(values, (0..delays.len()).collect::<Vec<_>>());
        prop_assert!(peak <= limit);
    }
}
