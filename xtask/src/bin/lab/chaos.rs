//! `cargo xtask chaos [--only SCENARIO] [--quick]`: faults, overload and hostile clients against
//! the real service, with proof that nothing is lost and nothing leaks.
//!
//! It runs on loopback only and cleans up after itself: a throwaway PostgreSQL cluster under
//! `target/pg/chaos` on a free port (seeded with 20 000 users), stand-in recommendation servers
//! in this process, and API processes built from `target/release/api` on free ports, each with
//! its log in `target/chaos/`. Each scenario drives load or hostile clients, injects its fault,
//! and checks the expectations from the clients' side (every request's status, latency
//! and fate), from `/metrics` (live task-group children, pool and database slots, breaker), from
//! `pg_stat_activity` and from `/proc`. The report gives, per scenario, requests sent, answers by
//! status, lost requests, recovery time and the state left behind, then PASS or FAIL per
//! expectation; any FAIL makes the command exit non-zero, and the report is also written to
//! `target/chaos/report.txt`. The scenarios that involve the database run under both query
//! modes (`pipelined`, `pooled`). A whole run takes about two minutes on a 2-core machine (one
//! with `--quick`, which keeps the default mode and shortens the phases); every wait in it is
//! bounded, and Ctrl-C or SIGTERM cleans up as a normal end does.
//!
//! The scenarios are in `chaos/`: `db_restart`, `pool`, `upstream_faults`, `abandoned`,
//! `shutdown` and `slow_clients`; `client` is the HTTP client that records every request, `rig`
//! the cluster, the API processes and the probes, `report` the report.

mod abandoned;
pub(crate) mod client;
mod db_restart;
mod pool;
pub(crate) mod report;
pub(crate) mod rig;
mod shutdown;
mod slow_clients;
mod upstream_faults;

use std::io::Write as _;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::{Args, ValueEnum};
use tokio::time::Instant;

use report::ScenarioReport;
use rig::Rig;

/// Arguments of `cargo xtask chaos`.
#[derive(Debug, Args)]
pub struct ChaosArgs {
    /// Run only this scenario (repeat the flag for several); all of them by default.
    #[arg(long, value_enum)]
    only: Vec<Scenario>,
    /// Shorter phases: the same checks in about half the time.
    #[arg(long)]
    quick: bool,
    /// Users seeded into the throwaway database.
    #[arg(long, default_value_t = 20_000)]
    users: u32,
    /// Run every API in `jwt` mode (the local HS256 secret) and send every request with a token
    /// that may read any dashboard and call the batch.
    #[arg(long)]
    auth: bool,
}

/// The scenarios, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// PostgreSQL stopped and started again under load.
    DbRestart,
    /// Many more concurrent requests than pooled connections, with a stalled database.
    PoolExhaustion,
    /// Every fault mode of the stand-in recommendation service, and the circuit breaker.
    UpstreamFaults,
    /// 1000 clients that disconnect mid-request.
    Abandoned,
    /// SIGTERM while a load runs.
    Shutdown,
    /// Slow and oversized clients, and the connection limit.
    SlowClients,
}

impl Scenario {
    const ALL: [Scenario; 6] = [
        Scenario::DbRestart,
        Scenario::PoolExhaustion,
        Scenario::UpstreamFaults,
        Scenario::Abandoned,
        Scenario::Shutdown,
        Scenario::SlowClients,
    ];

    fn name(self) -> &'static str {
        match self {
            Scenario::DbRestart => "db-restart",
            Scenario::PoolExhaustion => "pool-exhaustion",
            Scenario::UpstreamFaults => "upstream-faults",
            Scenario::Abandoned => "abandoned",
            Scenario::Shutdown => "shutdown",
            Scenario::SlowClients => "slow-clients",
        }
    }
}

/// The query modes (`service.query_mode`) the database scenarios run under, the default first:
/// concurrent dashboards sharing statements, the three reads pipelined on one connection, or on
/// three pooled connections.
const QUERY_MODES: [&str; 3] = ["coalesced", "pipelined", "pooled"];

/// What every scenario gets.
pub struct Ctx {
    /// The database and the API launcher.
    rig: Rig,
    /// The settings every API starts from (`config/`), so the checks use the same deadlines and
    /// limits as the servers instead of copies.
    defaults: api::settings::Settings,
    /// Shorter phases.
    quick: bool,
    /// The HS256 secret every API verifies tokens with (`--auth`).
    secret: Option<String>,
}

impl Ctx {
    /// `full` normally, `quick` with `--quick`.
    fn phase(&self, full: Duration, quick: Duration) -> Duration {
        if self.quick { quick } else { full }
    }

    /// What most scenarios start with: a stand-in recommendation service with `upstream`, and an
    /// API named `name` (suffixed with the query `mode`, when one is given) that calls it, runs in
    /// that mode and has `settings` on top of the defaults.
    ///
    /// # Errors
    ///
    /// When either cannot start.
    async fn stack(
        &self,
        name: &str,
        upstream: upstream::Config,
        mode: Option<&str>,
        settings: &[(&str, String)],
    ) -> Result<(upstream::Server, rig::Api)> {
        let upstream = upstream::Server::start(upstream).await?;
        let mut all = vec![("APP__RECOMMENDATIONS__BASE_URL", upstream.base_url())];
        if let Some(secret) = &self.secret {
            all.push(("APP__AUTH__MODE", "jwt".to_owned()));
            all.push(("APP__AUTH__SECRET", secret.clone()));
        }
        let name = match mode {
            Some(mode) => {
                all.push(("APP__SERVICE__QUERY_MODE", mode.to_owned()));
                format!("{name}-{mode}")
            }
            None => name.to_owned(),
        };
        all.extend(settings.iter().cloned());
        let api = self.rig.api(&name, &all).await?;
        Ok((upstream, api))
    }
}

/// Runs `cargo xtask chaos`.
pub async fn run(args: ChaosArgs) -> Result<()> {
    let started = Instant::now();
    let scenarios: Vec<Scenario> = if args.only.is_empty() {
        Scenario::ALL.to_vec()
    } else {
        Scenario::ALL
            .into_iter()
            .filter(|s| args.only.contains(s))
            .collect()
    };
    eprintln!("chaos: building the API (release)");
    xtask::stack::build_release(&["api"]).await?;
    let secret = if args.auth {
        let secret = xtask::stack::dev_secret()?;
        let token = xtask::stack::mint_token(
            xtask::stack::RELEASE_API,
            &secret,
            "chaos",
            &["dashboards:read", "users:batch"],
            "2h",
        )
        .await?;
        client::use_token(token);
        Some(secret)
    } else {
        None
    };
    // Ctrl-C or SIGTERM drops the run: its API processes are killed, its stand-ins stopped and
    // its cluster deleted on the way out, as when it ends by itself.
    let work = async {
        eprintln!(
            "chaos: starting a throwaway PostgreSQL cluster and seeding {} users",
            args.users
        );
        let rig = Rig::start(args.users).await?;
        eprintln!(
            "chaos: cluster on 127.0.0.1:{}; API logs in {}/",
            rig.port(),
            rig::LOG_DIR
        );
        let ctx = Ctx {
            rig,
            defaults: api::settings::Settings::load().context("cannot load the settings")?,
            quick: args.quick,
            secret: secret.clone(),
        };
        let mut runs = Vec::new();
        for scenario in scenarios {
            match scenario {
                // The database scenarios run under each query mode; --quick keeps the default.
                Scenario::DbRestart | Scenario::PoolExhaustion | Scenario::Abandoned => {
                    let modes = if ctx.quick {
                        &QUERY_MODES[..1]
                    } else {
                        &QUERY_MODES[..]
                    };
                    runs.extend(modes.iter().map(|&mode| (scenario, mode)));
                }
                _ => runs.push((scenario, "")),
            }
        }
        let mut reports = Vec::new();
        for (scenario, mode) in runs {
            let name = if mode.is_empty() {
                scenario.name().to_owned()
            } else {
                format!("{} ({mode})", scenario.name())
            };
            eprintln!("chaos: {name} ...");
            let began = Instant::now();
            let mut report = ScenarioReport::new(name, "");
            if let Err(error) = run_one(&ctx, scenario, mode, &mut report).await {
                // What was measured before the failure stays in the report.
                report.check("the scenario runs to the end", false, format!("{error:#}"));
            }
            report.elapsed = began.elapsed();
            println!("{}", report.render());
            let _ = std::io::stdout().flush();
            reports.push(report);
        }
        // The cluster goes before the summary, so the time includes the clean-up.
        drop(ctx);
        anyhow::Ok(reports)
    };
    let reports = tokio::select! {
        reports = work => reports?,
        signal = stop_signal() => bail!("{signal}: stopped; what this run started has been removed"),
    };
    report::finish(
        &reports,
        started.elapsed(),
        &std::path::Path::new(rig::LOG_DIR).join("report.txt"),
    )
}

/// Resolves on Ctrl-C or SIGTERM, saying which.
pub(crate) async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => tokio::select! {
            _ = tokio::signal::ctrl_c() => "interrupted",
            _ = terminate.recv() => "terminated",
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            "interrupted"
        }
    }
}

/// Stops a scenario's API with SIGTERM and checks that it exits cleanly.
async fn stop_api(api: rig::Api, report: &mut ScenarioReport) -> Result<()> {
    let status = api.stop().await?;
    report.check(
        "the API stops cleanly afterwards (SIGTERM, exit 0)",
        status.success(),
        status.to_string(),
    );
    Ok(())
}

async fn run_one(
    ctx: &Ctx,
    scenario: Scenario,
    mode: &'static str,
    report: &mut ScenarioReport,
) -> Result<()> {
    match scenario {
        Scenario::DbRestart => db_restart::run(ctx, report, mode).await,
        Scenario::PoolExhaustion => pool::run(ctx, report, mode).await,
        Scenario::UpstreamFaults => upstream_faults::run(ctx, report).await,
        Scenario::Abandoned => abandoned::run(ctx, report, mode).await,
        Scenario::Shutdown => shutdown::run(ctx, report).await,
        Scenario::SlowClients => slow_clients::run(ctx, report).await,
    }
}
