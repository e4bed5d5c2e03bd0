//! Criterion benchmarks: what a task group costs next to tokio's own tools, side by side in one
//! run.
//!
//! * `spawn_join_{multi,current}_thread/N`: spawn N trivial children and wait for all of them, through a task group,
//!   a `JoinSet`, a `Vec<JoinHandle>`, and a `TaskTracker` plus handles, on a two-worker and on a
//!   current-thread runtime. The target is a task group's cost per child within 1.15x of
//!   `JoinSet`'s.
//! * `cancel_10k`: with 10 000 children parked, the time from one child's failure until the
//!   waiting side returns: a fail-fast task group's `join`, a hand-rolled `JoinSet` (see the
//!   error, then `shutdown()`), and a `CancellationToken` plus `TaskTracker::wait()`. The target is
//!   a task group no slower than `JoinSet::shutdown()`.
//!
//! Run with `cargo bench -p taskgroup`. Numbers from a shared machine are noisy; compare the
//! variants within one run, not across runs.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use taskgroup::TaskGroup;
use tokio::runtime::Runtime;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("benchmark runtime")
}

fn current_thread_runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("benchmark runtime")
}

async fn trivial() -> Result<u64, Infallible> {
    Ok(1)
}

fn spawn_join(c: &mut Criterion) {
    // The multi-thread runtime is what services run; the current-thread one isolates the cost per
    // child from the latency of waking the waiting thread, which dominates small N.
    spawn_join_on(c, "spawn_join_multi_thread", &runtime());
    spawn_join_on(c, "spawn_join_current_thread", &current_thread_runtime());
}

fn spawn_join_on(c: &mut Criterion, name: &str, rt: &Runtime) {
    let mut group = c.benchmark_group(name);
    for n in [4usize, 10, 1_000, 100_000] {
        group.throughput(Throughput::Elements(n as u64));
        if n >= 100_000 {
            group.sample_size(10);
        } else {
            group.sample_size(50);
        }
        group.bench_with_input(BenchmarkId::new("taskgroup", n), &n, |b, &n| {
            b.to_async(rt).iter(|| async move {
                let tg = TaskGroup::<Infallible>::new().expect("runtime");
                for _ in 0..n {
                    tg.spawn("child", trivial());
                }
                tg.join().await.expect("no child fails").len()
            });
        });
        group.bench_with_input(BenchmarkId::new("joinset", n), &n, |b, &n| {
            b.to_async(rt).iter(|| async move {
                let mut set = JoinSet::new();
                for _ in 0..n {
                    set.spawn(trivial());
                }
                let mut done = 0;
                while let Some(result) = set.join_next().await {
                    let _ = result.expect("no child panics");
                    done += 1;
                }
                done
            });
        });
        group.bench_with_input(BenchmarkId::new("vec_joinhandle", n), &n, |b, &n| {
            b.to_async(rt).iter(|| async move {
                let handles: Vec<_> = (0..n).map(|_| tokio::spawn(trivial())).collect();
                let mut done = 0;
                for handle in handles {
                    let _ = handle.await.expect("no child panics");
                    done += 1;
                }
                done
            });
        });
        group.bench_with_input(BenchmarkId::new("tasktracker", n), &n, |b, &n| {
            b.to_async(rt).iter(|| async move {
                let tracker = TaskTracker::new();
                let handles: Vec<_> = (0..n).map(|_| tracker.spawn(trivial())).collect();
                tracker.close();
                tracker.wait().await;
                let mut done = 0;
                for handle in handles {
                    let _ = handle.await.expect("no child panics");
                    done += 1;
                }
                done
            });
        });
    }
    group.finish();
}

const PARKED: usize = 10_000;

/// Waits until the runtime has had time to park every child: a bounded number of yields.
async fn let_children_park() {
    for _ in 0..64 {
        tokio::task::yield_now().await;
    }
}

fn cancel_10k(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("cancel_10k");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(10));

    group.bench_function("taskgroup", |b| {
        b.to_async(&rt).iter_custom(|iters| async move {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let tg = TaskGroup::<&'static str>::new().expect("runtime");
                for _ in 0..PARKED {
                    tg.spawn("parked", async {
                        std::future::pending::<()>().await;
                        Ok(())
                    });
                }
                let (fail, failed) = oneshot::channel::<()>();
                tg.spawn("fails", async move {
                    let _ = failed.await;
                    Err::<(), _>("failure")
                });
                let_children_park().await;
                let start = Instant::now();
                let _ = fail.send(());
                let _ = tg.join().await;
                total += start.elapsed();
            }
            total
        });
    });

    group.bench_function("joinset_shutdown", |b| {
        b.to_async(&rt).iter_custom(|iters| async move {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut set = JoinSet::new();
                for _ in 0..PARKED {
                    set.spawn(async {
                        std::future::pending::<()>().await;
                        Ok(())
                    });
                }
                let (fail, failed) = oneshot::channel::<()>();
                set.spawn(async move {
                    let _ = failed.await;
                    Err("failure")
                });
                let_children_park().await;
                let start = Instant::now();
                let _ = fail.send(());
                while let Some(result) = set.join_next().await {
                    if matches!(result, Ok(Err(_)) | Err(_)) {
                        break;
                    }
                }
                set.shutdown().await;
                total += start.elapsed();
            }
            total
        });
    });

    group.bench_function("token_tasktracker", |b| {
        b.to_async(&rt).iter_custom(|iters| async move {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let tracker = TaskTracker::new();
                let token = CancellationToken::new();
                for _ in 0..PARKED {
                    let token = token.clone();
                    tracker.spawn(async move {
                        tokio::select! {
                            () = token.cancelled() => {}
                            () = std::future::pending::<()>() => {}
                        }
                    });
                }
                let (fail, failed) = oneshot::channel::<()>();
                let on_failure = token.clone();
                tracker.spawn(async move {
                    let _ = failed.await;
                    on_failure.cancel();
                });
                tracker.close();
                let_children_park().await;
                let start = Instant::now();
                let _ = fail.send(());
                tracker.wait().await;
                total += start.elapsed();
            }
            total
        });
    });
    group.finish();
}

/// Runs both benchmark groups with criterion's command-line options (written out rather than with
/// `criterion_main!`, whose generated function has no docs).
fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    spawn_join(&mut criterion);
    cancel_10k(&mut criterion);
    criterion.final_summary();
}
