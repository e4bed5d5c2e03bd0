//! `cargo xtask bench batch`: time per batch of ids, one statement per chunk against one per id.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::*;

/// Time per batch of `ids` ids, for one chunk size.
pub(super) struct BatchFigures {
    pub(super) chunk_size: usize,
    pub(super) mean_ms: f64,
    pub(super) min_ms: f64,
    pub(super) max_ms: f64,
}

pub(super) async fn batch(bench: &Bench, ids: usize, rounds: usize) -> Result<Vec<BatchFigures>> {
    let mut figures = Vec::new();
    for chunk_size in [50usize, 1] {
        let api = bench
            .api(&[
                ("APP__SERVICE__BATCH__CHUNK_SIZE", chunk_size.to_string()),
                ("APP__SERVICE__BATCH__CONCURRENCY", "20".to_owned()),
            ])
            .await?;
        let address = api.base.trim_start_matches("http://").to_owned();
        let mut times = Vec::with_capacity(rounds);
        for round in 0..rounds + 1 {
            // Spread the ids over the table, a different slice each round.
            let first = (round * ids) as u64 % bench.users.saturating_sub(ids as u64).max(1);
            let body = format!(
                "{{\"user_ids\":[{}]}}",
                (0..ids as u64)
                    .map(|i| (first + i + 1).to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            );
            let started = Instant::now();
            let status = post(&address, "/api/users/batch", &body).await?;
            let elapsed = started.elapsed();
            if status != 200 {
                bail!("a batch of {ids} ids answered {status}");
            }
            // The first round warms the pool and the statement caches.
            if round > 0 {
                times.push(elapsed.as_secs_f64() * 1000.0);
            }
        }
        api.stop(Duration::from_secs(20)).await?;
        let mean = times.iter().sum::<f64>() / times.len() as f64;
        let min = times.iter().copied().fold(f64::INFINITY, f64::min);
        let max = times.iter().copied().fold(0.0, f64::max);
        println!(
            "batch of {ids} ids, concurrency 20, {chunk_size} id(s) per statement: \
             mean {mean:.1} ms, min {min:.1} ms, max {max:.1} ms over {rounds} batches"
        );
        figures.push(BatchFigures {
            chunk_size,
            mean_ms: mean,
            min_ms: min,
            max_ms: max,
        });
    }
    Ok(figures)
}

/// One POST with a JSON body over a fresh connection; returns the status code.
pub(super) async fn post(address: &str, path: &str, body: &str) -> Result<u16> {
    let addr = address
        .parse()
        .with_context(|| format!("{address} is not host:port"))?;
    let request = client::post_json(path, body);
    let answer = client::fetch(addr, &request, Duration::from_secs(30))
        .await
        .map_err(|lost| anyhow::anyhow!("the batch got no answer ({})", lost.failure.as_str()))?;
    Ok(answer.status)
}

/// `cargo xtask bench batch`.
pub async fn run_batch(args: PerfArgs, ids: usize, rounds: usize) -> Result<()> {
    let bench = Bench::start(&args, Duration::ZERO).await?;
    let result = batch(&bench, ids, rounds).await;
    bench.stop().await;
    result.map(|_| ())
}
