//! Scenario `db-restart`: PostgreSQL stops (`pg_ctl stop -m fast`) for a few seconds while a
//! closed-loop load runs (dashboards, and 10% batch requests), then starts again.
//!
//! Expected: the API does not crash; requests during the outage answer 503 quickly (well inside
//! the 2 s dashboard deadline); within 2 s of the restart every request is a complete 200 again;
//! the pool has replaced every connection the restart broke; nothing is lost or left behind.

use std::time::Duration;

use anyhow::{Context as _, Result};

use super::Ctx;
use super::client::{Load, Outcome};
use super::report::{self, ScenarioReport, describe_latency, latencies, ms, percentiles, sample};

/// The bound on recovery after the restart.
const RECOVERY_BOUND: Duration = Duration::from_secs(2);

/// Runs the scenario.
pub async fn run(ctx: &Ctx, report: &mut ScenarioReport, mode: &'static str) -> Result<()> {
    // "Quickly": within half the dashboard deadline.
    let quick_503 = ctx.defaults.service.dashboard.deadline / 2;
    report.title = "PostgreSQL stopped (pg_ctl stop -m fast) and restarted under a 32-connection load (10% batches)";
    let (upstream, mut api) = ctx
        .stack("db-restart", upstream::Config::default(), Some(mode), &[])
        .await?;
    let warm = ctx.phase(Duration::from_secs(4), Duration::from_secs(2));
    let outage = ctx.phase(Duration::from_secs(4), Duration::from_secs(2));
    let after = ctx.phase(Duration::from_secs(5), Duration::from_secs(3));

    let load = Load {
        addr: api.addr,
        connections: 32,
        users: ctx.rig.users,
        timeout: Duration::from_secs(5),
        seed: 1,
        batch_percent: 10,
    };
    let running = load.start();
    tokio::time::sleep(warm).await;
    let backends_before = backend_pids(ctx, &api.application_name).await?;
    let stop_began = running.elapsed();
    let stopped = ctx.rig.stop_database().await;
    let stopped_at = running.elapsed();
    if stopped.is_ok() {
        tokio::time::sleep(outage).await;
    }
    let restart_began = running.elapsed();
    // Started again even when stopping failed half-way, so later scenarios have a database.
    let restarted = ctx.rig.start_database().await;
    let restarted_at = running.elapsed();
    tokio::time::sleep(after).await;
    let records = running.finish().await?;
    stopped.context("cannot stop PostgreSQL")?;
    restarted.context("cannot start PostgreSQL again")?;

    report.count(&records);
    report.lost = report::lost(&records);
    report.figure(format!(
        "PostgreSQL stopping {:.0} ms, down {:.0}-{:.0} ms, starting {:.0} ms (times from the load's start)",
        ms(stopped_at - stop_began),
        ms(stopped_at),
        ms(restart_began),
        ms(restarted_at - restart_began),
    ));

    // The outage: from the moment the server was down until its restart began.
    let during: Vec<_> = records
        .iter()
        .filter(|r| r.sent >= stopped_at && r.sent < restart_began)
        .collect();
    let during_503 = during
        .iter()
        .filter(|r| r.outcome.status() == Some(503))
        .count();
    let during_other: Vec<String> = during
        .iter()
        .filter(|r| r.outcome.status() != Some(503))
        .map(|r| r.label())
        .collect();
    let all_503 = latencies(&records, |r| r.outcome.status() == Some(503));
    let p99_503 = percentiles(all_503.clone()).map(|(_, p99, _)| p99);
    report.figure(format!(
        "during the outage: {} requests, {during_503} answered 503",
        during.len()
    ));
    report.figure(format!(
        "latency of all 503s: {}",
        describe_latency(all_503)
    ));
    let unavailable_json = records.iter().all(|r| match &r.outcome {
        Outcome::Answered {
            status: 503, code, ..
        } => code.as_deref() == Some("unavailable"),
        _ => true,
    });

    let first_clean = records
        .iter()
        .filter(|r| r.sent >= restart_began && r.outcome.is_clean())
        .map(|r| r.ended())
        .min();
    let last_failure = records
        .iter()
        .filter(|r| r.sent >= stopped_at && !r.outcome.is_clean())
        .map(|r| r.ended())
        .max();
    report.figure(format!(
        "from `pg_ctl start`: first complete 200 after {}, last failure ended {}",
        first_clean.map_or("never".to_owned(), |t| format!(
            "{:.0} ms",
            ms(t.saturating_sub(restart_began))
        )),
        last_failure.map_or("-".to_owned(), |t| format!(
            "{:.0} ms {}",
            ms(t.abs_diff(restart_began)),
            if t >= restart_began {
                "after"
            } else {
                "before"
            }
        )),
    ));
    let (recovery, clean_after) = report::recovery(&records, restarted_at);
    report.recovery = Some(recovery);
    report.figure(format!(
        "after the restart: {clean_after} complete 200s once recovered; latency of 200s after recovery: {}",
        describe_latency(latencies(&records, |r| r.sent >= restarted_at + recovery
            && r.outcome.is_clean()))
    ));

    // The state left behind, once the load has stopped.
    let (metrics, settle, quiet) = api
        .metrics_when(Duration::from_secs(5), |m| m.is_quiet())
        .await?;
    let backends_after = backend_pids(ctx, &api.application_name).await?;
    let reused: Vec<i32> = backends_after
        .iter()
        .filter(|pid| backends_before.contains(pid))
        .copied()
        .collect();
    report.after = metrics.state_line();
    report.figure(format!(
        "API sessions in pg_stat_activity: {} before the stop, {} after the restart, {} of them from before",
        backends_before.len(),
        backends_after.len(),
        reused.len()
    ));
    let running_after = api.is_running() && xtask::stack::healthz(&api.addr.to_string()).await;

    report.check(
        "no crash: the API still runs and answers /healthz",
        running_after,
        if running_after {
            "running"
        } else {
            "not running"
        },
    );
    report.check(
        "no request lost (every request got a complete answer)",
        report.lost == 0,
        format!("{} lost", report.lost),
    );
    report.check(
        "requests during the outage answer 503",
        !during.is_empty() && during_other.is_empty(),
        if during_other.is_empty() {
            format!("{during_503} of {} were 503", during.len())
        } else {
            format!(
                "{} were not 503: {}",
                during_other.len(),
                sample(&during_other)
            )
        },
    );
    report.check(
        format!(
            "the 503s come quickly (p99 under {} ms)",
            quick_503.as_millis()
        ),
        p99_503.is_some_and(|p99| p99 < quick_503),
        p99_503.map_or("no 503 at all".to_owned(), |p99| {
            format!("p99 {:.1} ms", ms(p99))
        }),
    );
    report.check(
        "the 503s are JSON `unavailable` errors",
        unavailable_json,
        if unavailable_json {
            "all"
        } else {
            "some were not"
        },
    );
    report.check(
        format!(
            "success back to 100% within {} s of the restart",
            RECOVERY_BOUND.as_secs()
        ),
        recovery <= RECOVERY_BOUND && clean_after > 0,
        format!(
            "last failure {:.0} ms after the restart, {clean_after} complete 200s after it",
            ms(recovery)
        ),
    );
    report.check(
        "the pool replaced its broken connections",
        !backends_after.is_empty() && reused.is_empty(),
        format!(
            "{} sessions now, none from before the restart: {}",
            backends_after.len(),
            reused.is_empty()
        ),
    );
    report.check(
        "nothing left behind (no live children, no slot in use, every connection idle)",
        quiet,
        format!("settled after {:.0} ms", ms(settle)),
    );
    super::stop_api(api, report).await?;
    upstream.shutdown().await;
    Ok(())
}

/// The backend process ids of the API's sessions.
async fn backend_pids(ctx: &Ctx, application_name: &str) -> Result<Vec<i32>> {
    let client = ctx.rig.monitor().await?;
    let rows = client
        .query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
            &[&application_name],
        )
        .await
        .context("cannot read pg_stat_activity")?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}
