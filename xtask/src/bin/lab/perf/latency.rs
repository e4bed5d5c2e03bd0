//! `cargo xtask bench latency`: dashboard latency at a low open-loop rate with a slow stand-in,
//! which shows that a fan-out costs about as much as its slowest part.

use std::time::Duration;

use anyhow::Result;
use loadtest::Scenario;

use super::*;

/// The result of `latency`.
pub(super) struct LatencyFigures {
    pub(super) delay_ms: u64,
    pub(super) rate: f64,
    pub(super) achieved: f64,
    pub(super) p50_ms: f64,
    pub(super) p99_ms: f64,
    pub(super) errors: f64,
}

pub(super) async fn latency(bench: &Bench, delay_ms: u64, rate: f64) -> Result<LatencyFigures> {
    let api = bench.api(&[]).await?;
    let config = loadtest::Config {
        rate: Some(rate),
        ..bench.load(&api, Scenario::Dashboard)
    };
    let report = measure(&config, "latency-dashboard").await?;
    api.stop(Duration::from_secs(20)).await?;
    println!("{}", report.summary());
    Ok(LatencyFigures {
        delay_ms,
        rate,
        achieved: report.measured.attempts_rps,
        p50_ms: report.measured.latency.p50_ms,
        p99_ms: report.measured.latency.p99_ms,
        errors: report.measured.error_rate,
    })
}

/// `cargo xtask bench latency`.
pub async fn run_latency(args: PerfArgs, delay_ms: u64, rate: f64) -> Result<()> {
    let bench = Bench::start(&args, Duration::from_millis(delay_ms)).await?;
    let result = latency(&bench, delay_ms, rate).await;
    bench.stop().await;
    let figures = result?;
    println!(
        "\nupstream delay {delay_ms} ms, open loop {rate:.0} req/s: p50 {:.1} ms, p99 {:.1} ms \
         (target p50 <= {} ms)",
        figures.p50_ms,
        figures.p99_ms,
        delay_ms + 2
    );
    Ok(())
}
