//! `cargo xtask bench db-ceiling`: pgbench running the dashboard's three statements, then the
//! dashboard itself under the same load, alternately: how close the service gets to PostgreSQL's
//! own ceiling.

use std::time::Duration;

use anyhow::Result;
use loadtest::{Report, Scenario};
use xtask::stack::ApiProcess;

use super::*;

/// The result of `db-ceiling`: the round whose ratio is the median, and every round's ratio.
pub(super) struct Ceiling {
    pub(super) pgbench_tps: f64,
    pub(super) dashboard_rps: f64,
    pub(super) dashboard_p99_ms: f64,
    pub(super) error_rate: f64,
    pub(super) peak_rss_mib: Option<f64>,
    pub(super) ratios: Vec<f64>,
}

impl Ceiling {
    pub(super) fn ratio(&self) -> f64 {
        self.dashboard_rps / self.pgbench_tps
    }

    pub(super) fn rounds(&self) -> String {
        listed(&self.ratios)
    }
}

pub(super) async fn db_ceiling(bench: &Bench) -> Result<Ceiling> {
    let api = bench.api(&[]).await?;
    let result = ceiling_rounds(bench, &api).await;
    let peak_rss_mib = api.peak_rss_kib().map(|kib| kib as f64 / 1024.0);
    api.stop(Duration::from_secs(20)).await?;
    let mut rounds = result?;
    let ratios: Vec<f64> = rounds
        .iter()
        .map(|(tps, report)| ratio(*tps, report))
        .collect();
    rounds.sort_by(|a, b| ratio(a.0, &a.1).total_cmp(&ratio(b.0, &b.1)));
    let (pgbench_tps, report) = rounds.swap_remove(rounds.len() / 2);
    Ok(Ceiling {
        pgbench_tps,
        dashboard_rps: report.measured.success_rps,
        dashboard_p99_ms: report.measured.latency.p99_ms,
        error_rate: report.measured.error_rate,
        peak_rss_mib,
        ratios,
    })
}

pub(super) fn ratio(pgbench_tps: f64, report: &Report) -> f64 {
    report.measured.success_rps / pgbench_tps.max(1e-9)
}

/// pgbench, then the dashboard, `rounds` times; the API stays up (idle while pgbench runs).
pub(super) async fn ceiling_rounds(bench: &Bench, api: &ApiProcess) -> Result<Vec<(f64, Report)>> {
    let mut rounds = Vec::new();
    for round in 1..=bench.args.rounds {
        let pgbench_tps = pgbench_tps(bench).await?;
        println!("pgbench: {pgbench_tps:.0} transactions/s");
        let mut config = bench.load(api, Scenario::Dashboard);
        if round > 1 {
            // The API's pool and caches are warm after the first round.
            config.warmup = config.warmup.min(Duration::from_secs(2));
        }
        let report = measure(&config, &format!("db-ceiling-dashboard-{round}")).await?;
        println!("{}", report.summary());
        println!(
            "round {round}/{}: pgbench {pgbench_tps:.0} tx/s, dashboard {:.0} req/s, ratio {:.2}\n",
            bench.args.rounds,
            report.measured.success_rps,
            ratio(pgbench_tps, &report)
        );
        rounds.push((pgbench_tps, report));
    }
    Ok(rounds)
}

/// `cargo xtask bench db-ceiling`.
pub async fn run_db_ceiling(args: PerfArgs) -> Result<()> {
    let bench = Bench::start(&args, Duration::ZERO).await?;
    let result = db_ceiling(&bench).await;
    bench.stop().await;
    let ceiling = result?;
    println!(
        "\nmedian round: pgbench ceiling {:.0} tx/s; dashboard {:.0} req/s; ratio {:.2} \
         (target >= 0.80); every round: {}",
        ceiling.pgbench_tps,
        ceiling.dashboard_rps,
        ceiling.ratio(),
        ceiling.rounds()
    );
    Ok(())
}
