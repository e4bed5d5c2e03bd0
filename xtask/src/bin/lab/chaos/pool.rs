//! Scenario `pool-exhaustion`: 400 concurrent connections against a pool of 20, while the
//! database is stalled from outside (an `ACCESS EXCLUSIVE` lock on `users`, so every profile read
//! waits).
//!
//! The load is dashboards and 10% batch requests of 20 ids.
//!
//! Expected: dashboards that find no database slot wait at most `service.db_slot_wait` and answer
//! 503; dashboards that got a slot are cut by the profile timeout and answer 503; no request waits
//! forever (no dashboard beyond its 2 s deadline, no batch beyond its 10 s deadline); the API's
//! memory stays bounded (peak RSS, `VmHWM`, before and after the stall); once the lock goes,
//! every request is a complete 200 again and nothing is left running, in the API or in the
//! database.

use std::time::Duration;

use anyhow::{Context as _, Result};

use super::Ctx;
use super::client::{Load, Outcome};
use super::report::sample;
use super::report::{self, ScenarioReport, describe_latency, latencies, ms, percentiles};

/// Scheduling slack on a shared 2-core machine with 400 connections open.
const SLACK: Duration = Duration::from_millis(500);
/// Allowed growth of the peak RSS while the database is stalled.
const RSS_GROWTH_KIB: u64 = 64 * 1024;

/// Runs the scenario.
pub async fn run(ctx: &Ctx, report: &mut ScenarioReport, mode: &'static str) -> Result<()> {
    // The bounds the API runs with (config/default.toml).
    let service = &ctx.defaults.service;
    let (slot_wait, deadline) = (service.db_slot_wait, service.dashboard.deadline);
    let batch_deadline = service.batch.deadline;
    report.title =
        "400 connections (10% batches) against a pool of 20 while `users` is locked from outside";
    let (upstream, api) = ctx
        .stack(
            "pool-exhaustion",
            upstream::Config::default(),
            Some(mode),
            &[],
        )
        .await?;
    let warm = ctx.phase(Duration::from_secs(2), Duration::from_secs(1));
    let stall = ctx.phase(Duration::from_secs(6), Duration::from_secs(3));
    let after = ctx.phase(Duration::from_secs(3), Duration::from_secs(2));

    let load = Load {
        addr: api.addr,
        connections: 400,
        users: ctx.rig.users,
        timeout: batch_deadline + Duration::from_secs(5),
        seed: 2,
        batch_percent: 10,
    };
    let running = load.start();
    tokio::time::sleep(warm).await;
    let peak_before = api.memory_kib("VmHWM");
    let lock = ctx.rig.lock_table("users").await;
    let locked_at = running.elapsed();
    let mut during = None;
    if lock.is_ok() {
        tokio::time::sleep(stall / 2).await;
        during = api.metrics().await.ok();
        tokio::time::sleep(stall / 2).await;
    }
    let release_began = running.elapsed();
    let released = match lock {
        Ok(lock) => lock.release().await,
        Err(e) => Err(e),
    };
    let released_at = running.elapsed();
    tokio::time::sleep(after).await;
    let records = running.finish().await?;
    released.context("the stall could not be made")?;
    let peak_after = api.memory_kib("VmHWM");

    report.count(&records);
    report.lost = report::lost(&records);
    report.figure(format!(
        "users locked from {:.0} ms to {:.0} ms (from the load's start)",
        ms(locked_at),
        ms(release_began)
    ));
    if let Some(during) = &during {
        report.figure(format!("mid-stall: {}", during.state_line()));
    }

    // Dashboards sent and answered while the lock held (those answered after the release may
    // rightly be 200s: they were waiting within their bounds when the lock went). Batches wait
    // for the lock up to their own, longer deadline; their bound is checked below.
    let stalled: Vec<_> = records
        .iter()
        .filter(|r| !r.batch && r.sent >= locked_at && r.ended() < release_began)
        .collect();
    let stalled_batches: Vec<String> = records
        .iter()
        .filter(|r| r.batch && r.sent >= locked_at && r.sent < release_began)
        .map(|r| r.label())
        .collect();
    let is_busy = |o: &Outcome| matches!(o, Outcome::Answered { status: 503, message: Some(m), .. } if m.contains("busy"));
    // Busy answers to dashboards sent during the stall; outside it, busy answers are about the
    // pool filling up at the start, not about the stall.
    let in_stall = |r: &super::client::Record| r.sent >= locked_at && r.sent < release_began;
    let busy = latencies(&records, |r| !r.batch && in_stall(r) && is_busy(&r.outcome));
    if let Some(slowest) = records
        .iter()
        .filter(|r| !r.batch && in_stall(r) && is_busy(&r.outcome))
        .max_by_key(|r| r.latency)
    {
        report.figure(format!(
            "slowest busy 503: sent {:.0} ms after the lock was taken, answered after {:.0} ms",
            ms(slowest.sent) - ms(locked_at),
            ms(slowest.latency)
        ));
    }
    let timed_out = latencies(&records, |r| {
        !r.batch
            && in_stall(r)
            && (r.outcome.status() == Some(504)
                || (r.outcome.status() == Some(503) && !is_busy(&r.outcome)))
    });
    let stalled_labels: Vec<String> = stalled
        .iter()
        .map(|r| match &r.outcome {
            Outcome::Answered {
                status: 503,
                message: Some(m),
                ..
            } if m.contains("busy") => "503 busy (no slot)".to_owned(),
            Outcome::Answered { status: 503, .. } => "503 profile timed out".to_owned(),
            Outcome::Answered { status: 504, .. } => "504 deadline passed".to_owned(),
            _ => r.label(),
        })
        .collect();
    report.figure(format!(
        "dashboards during the stall: {}: {}",
        stalled.len(),
        sample(&stalled_labels)
    ));
    report.figure(format!(
        "batches sent during the stall: {}: {}",
        stalled_batches.len(),
        sample(&stalled_batches)
    ));
    report.figure(format!(
        "dashboards sent during the stall, 503 busy (waited for a slot): {}",
        describe_latency(busy.clone())
    ));
    report.figure(format!(
        "dashboards sent during the stall, 503/504 after a time limit (had a slot): {}",
        describe_latency(timed_out)
    ));
    let longest = |batch: bool| {
        percentiles(latencies(&records, |r| r.batch == batch))
            .map_or(Duration::ZERO, |(_, _, max)| max)
    };
    let (max_dashboard, max_batch) = (longest(false), longest(true));
    report.figure(format!(
        "latency of every dashboard: {}",
        describe_latency(latencies(&records, |r| !r.batch))
    ));
    report.figure(format!(
        "latency of every batch: {}",
        describe_latency(latencies(&records, |r| r.batch))
    ));
    let (recovery, clean_after) = report::recovery(&records, released_at);
    report.recovery = Some(recovery);
    let kib = |v: Option<u64>| {
        v.map_or("unknown".to_owned(), |v| {
            format!("{:.1} MiB", v as f64 / 1024.0)
        })
    };
    report.figure(format!(
        "API peak RSS (VmHWM): {} before the stall, {} after",
        kib(peak_before),
        kib(peak_after)
    ));

    let (metrics, settle, quiet) = api
        .metrics_when(Duration::from_secs(5), |m| m.is_quiet())
        .await?;
    report.after = metrics.state_line();
    let sessions = ctx.rig.sessions(&api.application_name).await?;
    let active = sessions.get("active").copied().unwrap_or(0);
    report.figure(format!(
        "API sessions in pg_stat_activity after: {sessions:?}"
    ));

    report.check(
        "no request lost",
        report.lost == 0,
        format!("{} lost", report.lost),
    );
    // 503 when no slot could be had; 504 when a slot was had but the profile's statement waited
    // on the lock until the dashboard's deadline.
    let not_503 = stalled
        .iter()
        .filter(|r| !matches!(r.outcome.status(), Some(503 | 504)))
        .count();
    report.check(
        "dashboards sent and answered during the stall answer 503 (no slot) or 504 (deadline)",
        !stalled.is_empty() && not_503 == 0,
        format!("{not_503} of {} were neither", stalled.len()),
    );
    let busy_max = percentiles(busy.clone()).map(|(_, _, max)| max);
    report.check(
        format!(
            "excess requests wait at most the slot wait ({} ms) then 503",
            slot_wait.as_millis()
        ),
        busy_max.is_some_and(|max| max <= slot_wait + SLACK),
        busy_max.map_or("no busy 503 at all".to_owned(), |max| {
            format!("{} busy 503s, longest {:.0} ms", busy.len(), ms(max))
        }),
    );
    report.check(
        format!(
            "no request waits forever (no dashboard beyond its {} s deadline, no batch beyond its {} s)",
            deadline.as_secs(),
            batch_deadline.as_secs()
        ),
        max_dashboard <= deadline + SLACK && max_batch <= batch_deadline + SLACK,
        format!(
            "longest dashboard {:.0} ms, longest batch {:.0} ms",
            ms(max_dashboard),
            ms(max_batch)
        ),
    );
    let growth = match (peak_before, peak_after) {
        (Some(before), Some(after)) => Some(after.saturating_sub(before)),
        _ => None,
    };
    report.check(
        format!(
            "memory bounded (peak RSS grows less than {} MiB during the stall)",
            RSS_GROWTH_KIB / 1024
        ),
        growth.is_some_and(|g| g < RSS_GROWTH_KIB),
        growth.map_or("VmHWM unreadable".to_owned(), |g| {
            format!("grew {:.1} MiB", g as f64 / 1024.0)
        }),
    );
    report.check(
        "complete 200s again within 2 s of the release",
        recovery <= Duration::from_secs(2) && clean_after > 0,
        format!(
            "last failure {:.0} ms after the release, {clean_after} complete 200s after it",
            ms(recovery)
        ),
    );
    report.check(
        "nothing left behind in the API",
        quiet,
        format!("settled after {:.0} ms", ms(settle)),
    );
    let open: i64 = sessions.values().sum();
    report.check(
        "no connection leaked (the API's sessions in pg_stat_activity = the pool's size)",
        open as f64 == metrics.get("db_pool_size"),
        format!("{open} sessions, pool size {}", metrics.get("db_pool_size")),
    );
    report.check(
        "no statement of the API still running in the database",
        active == 0,
        format!("{active} active"),
    );
    super::stop_api(api, report).await?;
    upstream.shutdown().await;
    Ok(())
}
