//! Scenario `abandoned`: 1000 clients ask for a dashboard and hang up after about 200 ms, while
//! the stand-in takes 2 s to answer and the database is stalled (`users` locked from outside), so
//! every request has work in flight in both places when its client leaves.
//!
//! Expected: live task-group children back to 0, every pooled connection returned (idle equals
//! size, no database slot in use; a connection whose statement was abandoned is closed rather
//! than reused, so the pool may be empty), no session of the API in `pg_stat_activity` beyond the
//! pool's, and the abandoned statements cancelled on the server: no row of the API is still
//! `active`, checked while the lock is still held (a statement that was not cancelled would still
//! be waiting on it).

use std::time::Duration;

use anyhow::Result;
use tokio::time::Instant;

use super::Ctx;
use super::client::{self, Conn, Failure};
use super::report::{ScenarioReport, ms};

/// Clients.
const CLIENTS: i64 = 1000;
/// How long each client waits before hanging up.
const PATIENCE: Duration = Duration::from_millis(200);
/// How long the service may take to clean up after the last client left.
const SETTLE: Duration = Duration::from_secs(5);

/// What one client saw.
enum Seen {
    /// It hung up as planned, with no answer.
    HungUp,
    /// An answer came before it hung up.
    Answered(u16),
    /// It could not connect.
    NotConnected(Failure),
    /// The connection failed before the client hung up.
    Failed(Failure),
}

impl Seen {
    fn label(&self) -> String {
        match self {
            Seen::HungUp => format!("hung up after {} ms", PATIENCE.as_millis()),
            Seen::Answered(status) => format!("{status} before hanging up"),
            Seen::NotConnected(f) => format!("not connected ({})", f.as_str()),
            Seen::Failed(f) => format!("lost ({})", f.as_str()),
        }
    }
}

/// Runs the scenario.
pub async fn run(ctx: &Ctx, report: &mut ScenarioReport, mode: &'static str) -> Result<()> {
    report.title = "1000 clients hang up after 200 ms; stand-in delayed 2 s, `users` locked";
    let delayed = upstream::Config {
        delay: Duration::from_secs(2),
        ..upstream::Config::default()
    };
    let (upstream, api) = ctx.stack("abandoned", delayed, Some(mode), &[]).await?;
    let lock = ctx.rig.lock_table("users").await?;

    let addr = api.addr;
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for user in 1..=CLIENTS {
        clients.spawn(async move {
            let mut conn = match Conn::connect(addr, Duration::from_secs(5)).await {
                Ok(conn) => conn,
                Err(failure) => return Seen::NotConnected(failure),
            };
            let request = client::get(&format!("/api/users/{user}/dashboard"), true);
            let deadline = Instant::now() + PATIENCE;
            let seen = match conn.exchange_until(&request, deadline).await {
                Ok(answer) => Seen::Answered(answer.status),
                Err(lost) if lost.failure == Failure::Timeout => Seen::HungUp,
                Err(lost) => Seen::Failed(lost.failure),
            };
            // Dropping the connection closes it: the client is gone.
            drop(conn);
            seen
        });
    }
    // While the clients wait: how much work is in flight.
    tokio::time::sleep(PATIENCE / 2).await;
    let peak_children = api
        .metrics()
        .await
        .map_or(f64::NAN, |m| m.get("taskgroup_live_children"));
    let peak_sessions = ctx.rig.sessions(&api.application_name).await?;
    let mut seen = Vec::new();
    while let Some(joined) = clients.join_next().await {
        if let Ok(client) = joined {
            seen.push(client);
        }
    }
    let all_gone = started.elapsed();
    for client in &seen {
        report.count_label(client.label());
    }
    report.lost = seen
        .iter()
        .filter(|s| matches!(s, Seen::Failed(_) | Seen::NotConnected(_)))
        .count() as u64;
    report.figure(format!(
        "all {CLIENTS} clients gone {:.0} ms after the first connected",
        ms(all_gone)
    ));
    report.figure(format!(
        "while they waited: {peak_children} live task-group children; API sessions {peak_sessions:?}"
    ));

    // Cleaned up, in the API and in the database, while the lock still holds.
    let (metrics, settle, quiet) = api.metrics_when(SETTLE, |m| m.is_quiet()).await?;
    let db_settled = Instant::now();
    let mut active = i64::MAX;
    let mut sessions = Default::default();
    while db_settled.elapsed() < SETTLE {
        sessions = ctx.rig.sessions(&api.application_name).await?;
        active = sessions.get("active").copied().unwrap_or(0);
        let open: i64 = sessions.values().sum();
        if active == 0 && open as f64 == metrics.get("db_pool_size") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let db_settle = db_settled.elapsed();
    lock.release().await?;
    report.recovery = Some(settle.max(db_settle));
    report.after = metrics.state_line();
    report.figure(format!(
        "API sessions in pg_stat_activity after, lock still held: {sessions:?}"
    ));

    let peak_active = peak_sessions.get("active").copied().unwrap_or(0);
    report.check(
        "the clients really abandoned work in flight (live children and active statements while they waited)",
        peak_children > 0.0 && peak_active > 0,
        format!("{peak_children} live children, {peak_active} active statements"),
    );
    report.check(
        "every client connected and hung up without a transport error",
        report.lost == 0,
        format!("{} failed", report.lost),
    );
    report.check(
        "live task-group children back to 0",
        metrics.get("taskgroup_live_children") == 0.0,
        format!(
            "{} after {:.0} ms",
            metrics.get("taskgroup_live_children"),
            ms(settle)
        ),
    );
    report.check(
        "every pooled connection returned or closed (idle = size, no slot in use, nobody waiting)",
        quiet,
        metrics.state_line(),
    );
    let open: i64 = sessions.values().sum();
    report.check(
        "no connection leaked (the API's sessions in pg_stat_activity = the pool's size)",
        open as f64 == metrics.get("db_pool_size"),
        format!("{open} sessions, pool size {}", metrics.get("db_pool_size")),
    );
    report.check(
        "abandoned statements stopped on the server (no `active` row in pg_stat_activity)",
        active == 0,
        format!("{active} active after {:.0} ms", ms(db_settle)),
    );
    let healthy = client::fetch(
        api.addr,
        &client::get("/api/users/1/dashboard", false),
        Duration::from_secs(5),
    )
    .await
    .map(|a| a.status);
    report.check(
        "the API serves normally afterwards",
        matches!(healthy, Ok(200)),
        format!("{healthy:?}"),
    );
    super::stop_api(api, report).await?;
    upstream.shutdown().await;
    Ok(())
}
