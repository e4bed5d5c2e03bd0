//! A whole run: resolve the target, start the workers, sample progress, merge, report.
//!
//! Connections are dealt round robin over the worker threads. With the current-thread layout
//! each thread runs its own single-threaded runtime and its connections never leave it; with the
//! multi-thread layout one runtime's workers share them. Either way a worker's connections record
//! into that worker's [`WorkerStats`], merged at the end.
//!
//! Every wait is bounded: a request by its timeout, the run by `end + timeout` (the drain), after
//! which whatever is still in flight is cut and counted as unfinished (and as a timeout). A
//! worker that fails, panics or never reports ends the run with an error: a report without one
//! worker's counts would look complete and be wrong.

use std::{
    any::Any,
    net::SocketAddr,
    ops::ControlFlow,
    panic::AssertUnwindSafe,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tokio::{
    sync::mpsc,
    time::{Instant, MissedTickBehavior, interval_at, sleep_until, timeout},
};

use crate::{
    Config, Error, Progress, Report, RuntimeFlavor,
    config::Target,
    driver::{Fleet, Plan, drive_all},
    progress::{Sampler, tick_for},
    raw::RawExchange,
    report::{self, Inputs},
    requests::RequestPlan,
    stats::WorkerStats,
};

/// Time between spawning the workers and the first send, so every thread is up when it starts.
const STARTUP: Duration = Duration::from_millis(25);

/// Slack after the drain deadline for workers to notice it and stop.
const DRAIN_GRACE: Duration = Duration::from_millis(500);

/// How long resolving the target's host name may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// What every worker shares.
struct Shared {
    fleet: Arc<Fleet>,
    addr: SocketAddr,
    requests: RequestPlan,
}

/// What a worker thread reports when it ends.
type Done = Result<(), Error>;

/// Runs a load test as configured and reports on it.
///
/// The run takes `warmup + duration`, plus at most the request timeout to drain the requests
/// still in flight. Transport failures of single requests are counted in the report, not
/// returned as errors.
///
/// # Errors
///
/// [`Error::Config`] for a bad parameter, [`Error::Resolve`], [`Error::ResolveTimeout`] or
/// [`Error::NoAddress`] when the host cannot be resolved, [`Error::Spawn`] when a worker cannot
/// start, [`Error::Worker`] when one fails.
pub async fn run(config: &Config, progress: Progress) -> Result<Report, Error> {
    let target = config.validate()?;
    let requests = RequestPlan::new(config, &target)?;
    let addr = resolve(&target).await?;
    let threads = config.threads.min(config.connections);
    let shards: Arc<[Mutex<WorkerStats>]> = (0..threads)
        .map(|_| Mutex::new(WorkerStats::new()))
        .collect();
    let started_unix_s = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let cpu_before = process_cpu_time();
    let start = Instant::now() + STARTUP;
    let plan = Plan {
        start,
        warmup_end: start + config.warmup,
        end: start + config.warmup + config.duration,
        timeout: config.timeout,
    };
    let drain_deadline = plan.end + config.timeout + DRAIN_GRACE;
    let shared = Arc::new(Shared {
        fleet: Arc::new(Fleet {
            plan,
            rate: config.rate,
            connections: config.connections,
            shards: Arc::clone(&shards),
            drain_deadline,
        }),
        addr,
        requests,
    });

    let layouts: Vec<(usize, Vec<usize>)> = match config.runtime {
        RuntimeFlavor::CurrentThread => (0..threads)
            .map(|t| (1, (t..config.connections).step_by(threads).collect()))
            .collect(),
        RuntimeFlavor::MultiThread => vec![(threads, (0..config.connections).collect())],
    };
    let (done_tx, mut done_rx) = mpsc::channel(layouts.len());
    let workers = layouts.len();
    for (index, (runtime_threads, connections)) in layouts.into_iter().enumerate() {
        let shared = Arc::clone(&shared);
        let flavor = config.runtime;
        spawn_worker(index, done_tx.clone(), move || {
            worker(flavor, runtime_threads, &connections, &shared)
        })?;
    }
    drop(done_tx);
    drop(shared);

    let mut sampler = Sampler::new(plan, progress);
    let tick = tick_for(plan.end - plan.start);
    let mut ticker = interval_at(start + tick, tick);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let give_up = sleep_until(drain_deadline + DRAIN_GRACE);
    tokio::pin!(give_up);
    let mut finished = 0;
    let mut failure = None;
    while finished < workers {
        tokio::select! {
            _ = ticker.tick() => sampler.sample(&shards),
            message = done_rx.recv() => {
                if note_done(message, &mut finished, &mut failure).is_break() {
                    break;
                }
            }
            () = &mut give_up => {
                failure.get_or_insert(Error::Worker(
                    "a worker did not stop by the drain deadline".to_owned(),
                ));
                break;
            }
        }
    }
    sampler.sample(&shards);
    let wall = start.elapsed();
    let timeline = sampler.finish();
    if let Some(e) = failure {
        return Err(e);
    }
    let generator_cpu = match (cpu_before, process_cpu_time()) {
        (Some(before), Some(after)) => after.checked_sub(before),
        _ => None,
    };
    let mut merged = WorkerStats::new();
    for shard in shards.iter() {
        merged.merge(
            &shard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
    }
    Ok(report::build(
        Inputs {
            config,
            threads,
            started_unix_s,
            generator_cpu,
            wall,
            timeline,
        },
        &merged,
    ))
}

async fn resolve(target: &Target) -> Result<SocketAddr, Error> {
    let lookup = tokio::net::lookup_host((target.host.as_str(), target.port));
    let mut addrs = timeout(RESOLVE_TIMEOUT, lookup)
        .await
        .map_err(|_| Error::ResolveTimeout {
            host: target.host.clone(),
            timeout: RESOLVE_TIMEOUT,
        })?
        .map_err(|source| Error::Resolve {
            host: target.host.clone(),
            source,
        })?;
    addrs.next().ok_or_else(|| Error::NoAddress {
        host: target.host.clone(),
    })
}

/// Starts worker thread `index` running `body`, which reports on `done` however it ends: with
/// its result, or with an error if it panicked.
fn spawn_worker<F>(index: usize, done: mpsc::Sender<Done>, body: F) -> Result<(), Error>
where
    F: FnOnce() -> Done + Send + 'static,
{
    std::thread::Builder::new()
        .name(format!("loadtest-{index}"))
        .spawn(move || {
            // The body's state is dropped with the thread either way, so nothing observes it
            // half-updated after a panic: unwind safety holds.
            let result = std::panic::catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|panic| {
                Err(Error::Worker(format!(
                    "worker thread {index} panicked: {}",
                    panic_message(panic.as_ref())
                )))
            });
            // The channel holds one message per worker, so this cannot be full.
            let _ = done.try_send(result);
        })
        .map_err(Error::Spawn)?;
    Ok(())
}

/// The text of a panic's payload, when it has one.
fn panic_message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Takes one message from the workers' channel: counts the worker as finished and keeps the
/// first failure. `None` means every sender is gone while some worker has not reported, which
/// [`spawn_worker`] never lets happen; should it happen anyway, it is a failure rather than a
/// report missing that worker's counts.
fn note_done(
    message: Option<Done>,
    finished: &mut usize,
    failure: &mut Option<Error>,
) -> ControlFlow<()> {
    match message {
        Some(Ok(())) => {
            *finished += 1;
            ControlFlow::Continue(())
        }
        Some(Err(e)) => {
            *finished += 1;
            failure.get_or_insert(e);
            ControlFlow::Continue(())
        }
        None => {
            failure.get_or_insert(Error::Worker(
                "a worker thread ended without reporting its counts".to_owned(),
            ));
            ControlFlow::Break(())
        }
    }
}

/// One worker thread: builds its runtime and runs its connections to the end.
fn worker(
    flavor: RuntimeFlavor,
    runtime_threads: usize,
    connections: &[usize],
    shared: &Shared,
) -> Result<(), Error> {
    let runtime = match flavor {
        RuntimeFlavor::CurrentThread => tokio::runtime::Builder::new_current_thread(),
        RuntimeFlavor::MultiThread => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(runtime_threads);
            builder
        }
    }
    .enable_all()
    .build()
    .map_err(Error::Spawn)?;
    runtime.block_on(run_connections(connections, shared))
}

async fn run_connections(connections: &[usize], shared: &Shared) -> Result<(), Error> {
    let exchanges = connections
        .iter()
        .map(|&index| {
            let requests = shared.requests.for_connection(index);
            (index, RawExchange::new(shared.addr, requests))
        })
        .collect();
    drive_all(&shared.fleet, exchanges)
        .await
        .map_err(|message| Error::Worker(format!("a connection task failed: {message}")))
}

/// CPU time this process has used so far (user plus system), from `/proc/self/stat` on Linux.
fn process_cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces): state is the
    // first, utime the 12th and stime the 13th, in clock ticks.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // The kernel reports /proc times in USER_HZ, fixed at 100 on Linux's user ABI.
    Some(Duration::from_millis((utime + stime) * 10))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            let before = process_cpu_time().unwrap();
            let mut x = 0u64;
            for i in 0..50_000_000u64 {
                x = x.wrapping_add(i * i);
            }
            std::hint::black_box(x);
            assert!(process_cpu_time().unwrap() >= before);
        }
    }

    #[tokio::test]
    async fn a_worker_thread_that_panics_reports_an_error() {
        let (done, mut reports) = mpsc::channel(1);
        spawn_worker(7, done, || panic!("boom")).unwrap();
        let report = timeout(Duration::from_secs(10), reports.recv())
            .await
            .unwrap();
        let mut finished = 0;
        let mut failure = None;
        assert!(note_done(report, &mut finished, &mut failure).is_continue());
        assert_eq!(finished, 1);
        let message = failure.unwrap().to_string();
        assert!(
            message.contains("worker thread 7 panicked: boom"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn a_worker_that_never_reports_is_an_error() {
        // A thread that ends holding its sender without sending, as one that panicked past
        // `spawn_worker`'s guard would.
        let (done, mut reports) = mpsc::channel::<Done>(2);
        spawn_worker(0, done.clone(), || Ok(())).unwrap();
        std::thread::spawn(move || drop(done)).join().unwrap();
        let mut finished = 0;
        let mut failure = None;
        let mut flow = ControlFlow::Continue(());
        while flow.is_continue() && finished < 2 {
            let message = timeout(Duration::from_secs(10), reports.recv())
                .await
                .unwrap();
            flow = note_done(message, &mut finished, &mut failure);
        }
        assert!(flow.is_break());
        assert_eq!(finished, 1);
        let message = failure.unwrap().to_string();
        assert!(message.contains("without reporting"), "{message}");
    }

    #[tokio::test]
    async fn unresolvable_hosts_are_errors() {
        let target = Target {
            host: "no-such-host.invalid".to_owned(),
            port: 80,
            authority: "no-such-host.invalid".to_owned(),
            base_path: String::new(),
        };
        let err = resolve(&target).await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::Resolve { .. } | Error::NoAddress { .. } | Error::ResolveTimeout { .. }
            ),
            "{err}"
        );
    }
}
