//! Scenario `shutdown`: SIGTERM while a 64-connection load runs (dashboards, 10% batches; the
//! stand-in answers in 100 ms, so requests are in flight at the signal), and the load keeps going
//! until the API has exited.
//!
//! Expected: every request sent before the signal gets a complete answer; after the signal,
//! requests are either answered in full or not accepted at all (connection refused, or closed
//! before any byte of an answer), never cut off half-way; the process exits with code 0 within its
//! grace period, and its log says the pool was closed.

use std::time::Duration;

use anyhow::Result;

use super::Ctx;
use super::client::{Load, Outcome};
use super::report::sample;
use super::report::{ScenarioReport, ms};

/// The line the API logs once the server has stopped and the pool is closed.
const POOL_CLOSED: &str = "shut down: pool closed";
/// The warning the API logs when the grace period ends with requests still unfinished (they are
/// cut off; a client may see that as a connection closed before any byte of the answer).
const GRACE_OVER: &str = "grace period over";

/// Runs the scenario.
pub async fn run(ctx: &Ctx, report: &mut ScenarioReport) -> Result<()> {
    let grace = ctx.defaults.server.shutdown_grace;
    report.title = "SIGTERM during a 64-connection load, 10% batches (stand-in answers in 100 ms)";
    let delayed = upstream::Config {
        delay: Duration::from_millis(100),
        ..upstream::Config::default()
    };
    let (upstream, mut api) = ctx.stack("shutdown", delayed, None, &[]).await?;
    let warm = ctx.phase(Duration::from_secs(3), Duration::from_secs(2));
    let load = Load {
        addr: api.addr,
        connections: 64,
        users: ctx.rig.users,
        timeout: grace + Duration::from_secs(5),
        seed: 5,
        batch_percent: 10,
    };
    let running = load.start();
    tokio::time::sleep(warm).await;
    let in_flight = api
        .metrics()
        .await
        .map_or(f64::NAN, |m| m.get("http_requests_in_flight"));
    // The boundary is taken before the signal is sent, so "before the signal" is conservative.
    let signal_at = running.elapsed();
    let signalled = api.terminate().await;
    let exit = api.wait_exit(grace + Duration::from_secs(5)).await;
    let exited_at = running.elapsed();
    // Clients keep trying a little after the exit: those attempts must be refused, not hang.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let records = running.finish().await?;
    signalled?;
    let (status, graceful) = exit?;

    for record in &records {
        let label = match record.outcome {
            Outcome::NotConnected(failure) if record.sent >= signal_at => {
                format!("refused after the signal ({})", failure.as_str())
            }
            Outcome::Lost(lost) if record.sent >= signal_at && !lost.answer_started => format!(
                "not accepted after the signal ({} before any byte)",
                lost.failure.as_str()
            ),
            _ => record.label(),
        };
        report.count_label(label);
    }
    let before: Vec<_> = records.iter().filter(|r| r.sent < signal_at).collect();
    let after: Vec<_> = records.iter().filter(|r| r.sent >= signal_at).collect();
    let in_flight_at_signal = before.iter().filter(|r| r.ended() > signal_at).count();
    let unanswered_before: Vec<String> = before
        .iter()
        .filter(|r| !matches!(r.outcome, Outcome::Answered { .. }))
        .map(|r| r.label())
        .collect();
    let cut_after: Vec<String> = after
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Lost(lost) if lost.answer_started))
        .map(|r| r.label())
        .collect();
    let not_accepted_after = after
        .iter()
        .filter(|r| match r.outcome {
            Outcome::NotConnected(_) => true,
            Outcome::Lost(lost) => !lost.answer_started,
            Outcome::Answered { .. } => false,
        })
        .count();
    let answered_after = after
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Answered { .. }))
        .count();
    let not_ok_before = before
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Answered { status, .. } if status != 200))
        .count();
    report.lost = (unanswered_before.len() + cut_after.len()) as u64;
    report.recovery = None;
    report.figure(format!(
        "sent before the signal: {} (in flight at the signal: {in_flight_at_signal}; /metrics said {in_flight} just before), answered in full: {}, of which not 200: {not_ok_before}",
        before.len(),
        before.len() - unanswered_before.len()
    ));
    report.figure(format!(
        "sent after the signal: {}: answered in full {answered_after}, not accepted (refused or closed before any byte) {not_accepted_after}, cut off mid-answer {}",
        after.len(),
        cut_after.len()
    ));
    let drain = exited_at.saturating_sub(signal_at);
    report.figure(format!(
        "{status} {:.0} ms after the signal{}",
        ms(drain),
        if graceful {
            ""
        } else {
            " (killed: it did not exit in time)"
        }
    ));
    let log = api.log_text();
    let pool_closed = log.lines().any(|line| line.contains(POOL_CLOSED));
    report.after = if pool_closed {
        format!("process exited; log: \"{POOL_CLOSED}\"")
    } else {
        "process exited; no pool-closed line in the log".to_owned()
    };

    report.check(
        "every request sent before the signal got a complete answer",
        unanswered_before.is_empty() && !before.is_empty(),
        if unanswered_before.is_empty() {
            format!("{} of {}", before.len(), before.len())
        } else {
            format!(
                "{} without one: {}",
                unanswered_before.len(),
                sample(&unanswered_before)
            )
        },
    );
    report.check(
        "no answer cut off after the signal (refusals counted apart)",
        cut_after.is_empty(),
        format!("{} cut off", cut_after.len()),
    );
    report.check(
        "exit code 0, within the grace period",
        graceful && status.success() && drain <= grace,
        format!("{status} after {:.0} ms", ms(drain)),
    );
    let grace_over = log.lines().any(|line| line.contains(GRACE_OVER));
    report.check(
        "the drain finished every request (the grace period did not run out)",
        !grace_over,
        if grace_over {
            format!("{GRACE_OVER:?} in {}", api.log.display())
        } else {
            "no unfinished request at the stop".to_owned()
        },
    );
    report.check(
        "the pool was closed",
        pool_closed,
        format!("{POOL_CLOSED:?} in {}", api.log.display()),
    );
    upstream.shutdown().await;
    Ok(())
}
