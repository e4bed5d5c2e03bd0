//! `cargo xtask bench report`: every benchmark, then the README's Performance table.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::batch::{BatchFigures, batch};
use super::ceiling::{Ceiling, db_ceiling};
use super::latency::{LatencyFigures, latency};
use super::modes::{ModeFigures, modes};
use super::peer::{PeerFigures, peer};
use super::*;

/// `cargo xtask bench report`: every benchmark, then the Performance table.
pub async fn run_report(args: ReportArgs) -> Result<()> {
    let started = Instant::now();
    let bench = Bench::start(&args.perf, Duration::ZERO).await?;
    let result = async {
        let ceiling = db_ceiling(&bench).await?;
        let modes = modes(&bench).await?;
        let batch = batch(&bench, 1000, 10).await?;
        let peer = peer(&bench).await?;
        Ok::<_, anyhow::Error>((ceiling, modes, batch, peer))
    }
    .await;
    bench.stop().await;
    let (ceiling, modes, batch, peer) = result?;
    let slow = Bench::start(&args.perf, Duration::from_millis(50)).await?;
    let result = latency(&slow, 50, 200.0).await;
    slow.stop().await;
    let latency = result?;

    let table = render(&args.perf, &ceiling, &latency, &modes, &batch, &peer);
    std::fs::create_dir_all(OUT_DIR)?;
    let path = PathBuf::from(OUT_DIR).join("performance.md");
    std::fs::write(&path, &table)?;
    println!("\n{table}");
    println!(
        "written to {} (all runs took {:.0} s)",
        path.display(),
        started.elapsed().as_secs_f64()
    );
    if args.update_readme {
        update_readme(&table)?;
        println!("README.md's Performance section updated");
    }
    Ok(())
}

fn render(
    args: &PerfArgs,
    ceiling: &Ceiling,
    latency: &LatencyFigures,
    modes: &(Vec<ModeFigures>, Vec<f64>),
    batch: &[BatchFigures],
    peer: &PeerFigures,
) -> String {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or_else(
            || "?".to_owned(),
            |kib| format!("{:.0} GiB", kib / 1024.0 / 1024.0),
        );
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Measured by `cargo xtask bench report` on a {cores}-core machine with {memory} of RAM, \
         release build. PostgreSQL, the API (actix-web, {cores} workers), the stand-in \
         recommendation service and the load generator all share those cores, so absolute \
         numbers are low; the ratios measured in one run are what carry over. Closed-loop runs \
         use {} connections, {} s measured after a {} s warm-up, ids uniform over the seeded \
         users. JSON and SVG reports of every run are in `target/bench/`.\n",
        args.connections, args.duration, args.warmup
    );
    let _ = writeln!(out, "| what | figure | target | command |");
    let _ = writeln!(out, "| --- | --- | --- | --- |");
    let _ = writeln!(
        out,
        "| PostgreSQL ceiling: pgbench, the dashboard's 3 SELECTs, `-M prepared`, {} clients (median round) | {:.0} tx/s | | `cargo xtask bench db-ceiling` |",
        args.connections, ceiling.pgbench_tps
    );
    let _ = writeln!(
        out,
        "| Dashboard throughput, upstream 0 ms (median round) | {:.0} req/s, p99 {:.1} ms, errors {:.2}% | | `cargo xtask bench db-ceiling` |",
        ceiling.dashboard_rps,
        ceiling.dashboard_p99_ms,
        ceiling.error_rate * 100.0
    );
    let _ = writeln!(
        out,
        "| Dashboard / pgbench ceiling, median of {} alternating rounds (each round: {}) | **{:.2}** | ≥ 0.80 | `cargo xtask bench db-ceiling` |",
        ceiling.ratios.len(),
        ceiling.rounds(),
        ceiling.ratio()
    );
    let _ = writeln!(
        out,
        "| Dashboard latency, upstream {} ms, open loop {:.0} req/s (achieved {:.0}) | p50 **{:.1} ms**, p99 {:.1} ms, errors {:.2}% | p50 ≤ {} ms | `cargo xtask bench latency` |",
        latency.delay_ms,
        latency.rate,
        latency.achieved,
        latency.p50_ms,
        latency.p99_ms,
        latency.errors * 100.0,
        latency.delay_ms + 2
    );
    let (modes, ratios) = modes;
    for mode in modes {
        let _ = writeln!(
            out,
            "| Dashboard, `query_mode = \"{}\"` (median of {} rounds) | {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms | | `cargo xtask bench modes` |",
            mode.mode,
            ratios.len(),
            mode.rps,
            mode.p50_ms,
            mode.p99_ms
        );
    }
    let _ = writeln!(
        out,
        "| Pipelined / pooled throughput, median of alternating rounds (each round: {}) | **{:.2}** | | `cargo xtask bench modes` |",
        listed(ratios),
        median(ratios)
    );
    for b in batch {
        let how = if b.chunk_size == 1 {
            "one statement per id (the seed's way)".to_owned()
        } else {
            format!("{} ids per statement (`= ANY($1)`)", b.chunk_size)
        };
        let _ = writeln!(
            out,
            "| Batch of 1000 ids, concurrency 20, {how} | {:.1} ms per batch (min {:.1}, max {:.1}) | | `cargo xtask bench batch` |",
            b.mean_ms, b.min_ms, b.max_ms
        );
    }
    let _ = writeln!(
        out,
        "| The seed's FastAPI + asyncpg + httpx service (`bench/seed-fastapi`, uvicorn, {} workers), same load | {:.0} req/s, p99 {:.1} ms, errors {:.2}% | | `cargo xtask bench peer` |",
        peer.workers,
        peer.seed_rps,
        peer.seed_p99_ms,
        peer.seed_errors * 100.0
    );
    let _ = writeln!(
        out,
        "| This service, same run | {:.0} req/s, p99 {:.1} ms: **{:.1}x** the seed's throughput | many times | `cargo xtask bench peer` |",
        peer.ours_rps,
        peer.ours_p99_ms,
        peer.ours_rps / peer.seed_rps.max(1e-9)
    );
    if let Some(rss) = ceiling.peak_rss_mib {
        let _ = writeln!(
            out,
            "| Peak RSS of the API during the {}-connection run | {rss:.1} MiB | | `cargo xtask bench db-ceiling` |",
            args.connections
        );
    }
    out
}

const README_BEGIN: &str =
    "<!-- performance:begin (written by cargo xtask bench report --update-readme) -->";
const README_END: &str = "<!-- performance:end -->";

fn update_readme(table: &str) -> Result<()> {
    let readme = std::fs::read_to_string("README.md").context("cannot read README.md")?;
    let (Some(begin), Some(end)) = (readme.find(README_BEGIN), readme.find(README_END)) else {
        bail!("README.md has no {README_BEGIN} ... {README_END} markers");
    };
    let updated = format!(
        "{}{README_BEGIN}\n{table}{}",
        &readme[..begin],
        &readme[end..]
    );
    std::fs::write("README.md", updated).context("cannot write README.md")
}
