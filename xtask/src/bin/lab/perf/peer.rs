//! `cargo xtask bench peer`: the seed article's own FastAPI service (bench/seed-fastapi) and
//! this one, under the same load.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use loadtest::Scenario;
use tokio::process::Command;
use xtask::stack::{self};

use super::*;

/// The seed's FastAPI service next to ours.
pub(super) struct PeerFigures {
    pub(super) ours_rps: f64,
    pub(super) ours_p99_ms: f64,
    pub(super) seed_rps: f64,
    pub(super) seed_p99_ms: f64,
    pub(super) seed_errors: f64,
    pub(super) workers: usize,
}

/// Where the seed's service and its Python environment live.
const PEER_DIR: &str = "bench/seed-fastapi";
const PEER_VENV: &str = "target/seed-fastapi-venv";

/// Creates the Python virtual environment for the seed's service, once.
pub(crate) async fn peer_venv() -> Result<PathBuf> {
    let venv = PathBuf::from(PEER_VENV);
    let uvicorn = venv.join("bin/uvicorn");
    if uvicorn.is_file() {
        return Ok(uvicorn);
    }
    println!("creating {PEER_VENV} with the seed's stack (FastAPI, uvicorn, asyncpg, httpx)");
    let created = Command::new("python3")
        .args(["-m", "venv", PEER_VENV])
        .status()
        .await
        .context("cannot run python3 (CPython 3.11+ with venv is needed)")?;
    if !created.success() {
        bail!("python3 -m venv {PEER_VENV} failed");
    }
    let installed = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "-r"])
        .arg(PathBuf::from(PEER_DIR).join("requirements.txt"))
        .status()
        .await
        .context("cannot run pip")?;
    if !installed.success() {
        let _ = std::fs::remove_dir_all(&venv);
        bail!("pip install failed (PyPI must be reachable)");
    }
    Ok(uvicorn)
}

/// The seed's FastAPI service, started on the bench's database and stand-in: the process, its
/// process group (uvicorn's workers go with it) and its address, once it answers.
pub(crate) async fn start_seed(
    bench: &Bench,
    uvicorn: &Path,
    workers: usize,
) -> Result<(tokio::process::Child, Option<stack::ProcessGroup>, String)> {
    let port = stack::free_port()?;
    let database_url = bench.database_url()?;
    // The article runs uvicorn with --workers 4; one per core is the fair match for this
    // service's one actix worker per core.
    let mut seed = Command::new(uvicorn)
        .args(["app:app", "--app-dir", PEER_DIR, "--host", "127.0.0.1"])
        .args([
            "--port",
            &port.to_string(),
            "--workers",
            &workers.to_string(),
        ])
        .args(["--no-access-log", "--log-level", "warning"])
        .env("DATABASE_URL", database_url)
        .env("RECOMMENDATIONS_URL", bench.upstream.base_url())
        // A group of its own: uvicorn's worker processes go with it on every path.
        .process_group(0)
        .spawn()
        .context("cannot start the seed's service with uvicorn")?;
    let group = stack::ProcessGroup::of(&seed);
    let address = format!("127.0.0.1:{port}");
    let mut ready = false;
    for _ in 0..300 {
        if let Some(status) = seed.try_wait()? {
            bail!("the seed's service exited during start-up ({status})");
        }
        if stack::answers_200(&address, "/api/users/1/dashboard").await {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !ready {
        bail!("the seed's service did not answer within 30 s");
    }
    Ok((seed, group, address))
}

pub(super) async fn peer(bench: &Bench) -> Result<PeerFigures> {
    let uvicorn = peer_venv().await?;
    let workers = std::thread::available_parallelism().map_or(1, usize::from);

    let api = bench.api(&[]).await?;
    let ours = measure(&bench.load(&api, Scenario::Dashboard), "peer-rust").await?;
    api.stop(Duration::from_secs(20)).await?;
    println!("this service:\n{}", ours.summary());

    let (mut seed, group, address) = start_seed(bench, &uvicorn, workers).await?;
    let config = bench.load_url(&format!("http://{address}"), Scenario::Dashboard);
    let theirs = measure(&config, "peer-seed-fastapi").await;
    if let Some(group) = group {
        group.stop(Duration::from_secs(10)).await;
    }
    let _ = seed.wait().await;
    let theirs = theirs?;
    println!("the seed's FastAPI service:\n{}", theirs.summary());
    Ok(PeerFigures {
        ours_rps: ours.measured.success_rps,
        ours_p99_ms: ours.measured.latency.p99_ms,
        seed_rps: theirs.measured.success_rps,
        seed_p99_ms: theirs.measured.latency.p99_ms,
        seed_errors: theirs.measured.error_rate,
        workers,
    })
}

/// `cargo xtask bench peer`.
pub async fn run_peer(args: PerfArgs) -> Result<()> {
    let bench = Bench::start(&args, Duration::ZERO).await?;
    let result = peer(&bench).await;
    bench.stop().await;
    let figures = result?;
    println!(
        "\nthis service: {:.0} req/s (p99 {:.1} ms); the seed's FastAPI service: {:.0} req/s \
         (p99 {:.1} ms, errors {:.2}%); {:.1}x",
        figures.ours_rps,
        figures.ours_p99_ms,
        figures.seed_rps,
        figures.seed_p99_ms,
        figures.seed_errors * 100.0,
        figures.ours_rps / figures.seed_rps.max(1e-9)
    );
    Ok(())
}
