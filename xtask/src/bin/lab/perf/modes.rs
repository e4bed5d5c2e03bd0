//! `cargo xtask bench modes`: dashboard throughput with the three reads pipelined on one
//! connection against three pooled connections.

use std::time::Duration;

use anyhow::Result;
use loadtest::{Report, Scenario};

use super::*;

/// Throughput and latency of one query mode.
pub(super) struct ModeFigures {
    pub(super) mode: &'static str,
    pub(super) rps: f64,
    pub(super) p50_ms: f64,
    pub(super) p99_ms: f64,
}

/// Both query modes, one API each, measured alternately `rounds` times; each mode's figures are
/// those of its median round, and `ratios` the pipelined/pooled throughput of every round.
pub(super) async fn modes(bench: &Bench) -> Result<(Vec<ModeFigures>, Vec<f64>)> {
    const MODES: [&str; 2] = ["pipelined", "pooled"];
    let mut apis = Vec::new();
    for mode in MODES {
        apis.push(
            bench
                .api(&[("APP__SERVICE__QUERY_MODE", mode.to_owned())])
                .await?,
        );
    }
    let runs = alternate(bench, apis, &MODES, |_, api| {
        bench.load(api, Scenario::Dashboard)
    })
    .await?;
    let [pipelined, pooled]: [Vec<Report>; 2] = runs
        .try_into()
        .map_err(|_| anyhow::anyhow!("expected one series per mode"))?;
    let ratios = pipelined
        .iter()
        .zip(&pooled)
        .map(|(a, b)| a.measured.success_rps / b.measured.success_rps.max(1e-9))
        .collect();
    let figures = MODES
        .iter()
        .zip([pipelined, pooled])
        .map(|(mode, reports)| {
            let median = median_round(reports)?.measured;
            Ok(ModeFigures {
                mode,
                rps: median.success_rps,
                p50_ms: median.latency.p50_ms,
                p99_ms: median.latency.p99_ms,
            })
        })
        .collect::<Result<_>>()?;
    Ok((figures, ratios))
}

/// `cargo xtask bench modes`.
pub async fn run_modes(args: PerfArgs) -> Result<()> {
    let bench = Bench::start(&args, Duration::ZERO).await?;
    let result = modes(&bench).await;
    bench.stop().await;
    let (figures, ratios) = result?;
    println!();
    for f in &figures {
        println!(
            "{:>9}: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms (median round)",
            f.mode, f.rps, f.p50_ms, f.p99_ms
        );
    }
    println!(
        "pipelined / pooled: {:.2} (median; every round: {})",
        median(&ratios),
        listed(&ratios)
    );
    Ok(())
}
