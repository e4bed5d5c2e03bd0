//! The OpenAPI document checked against the real server by schemathesis, a tool we did not write:
//! every operation, every phase (examples, coverage, fuzzing, stateful), every check. Part of
//! `cargo xtask test`: the document must say exactly what the server enforces.
//!
//! The server is the debug `api` binary the test run has just built, on a database of the test
//! cluster seeded with a few hundred users, beside the debug stand-in recommendation service. Schemathesis
//! runs from a virtual environment under `target/`, created once from `requirements.txt` here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::process::Command;

use xtask::pg::Cluster;
use xtask::stack::{ApiProcess, Upstream, free_port};

const VENV: &str = "target/schemathesis-venv";
const REQUIREMENTS: &str = "xtask/schemathesis-requirements.txt";
/// The database the run uses on the test cluster (made from the migrated template).
const DATABASE: &str = "schemathesis";
/// Users seeded into it, so that generated ids hit real users as well as unknown ones.
const USERS: u32 = 300;

/// Creates the virtual environment with schemathesis, once; returns the CLI's path.
async fn venv() -> Result<PathBuf> {
    let cli = Path::new(VENV).join("bin/schemathesis");
    let marker = Path::new(VENV).join("requirements.txt");
    let wanted = std::fs::read_to_string(REQUIREMENTS)
        .with_context(|| format!("cannot read {REQUIREMENTS}"))?;
    if cli.is_file() && std::fs::read_to_string(&marker).ok().as_deref() == Some(&wanted) {
        return Ok(cli);
    }
    eprintln!("schemathesis: creating {VENV} (PyPI must be reachable)");
    let created = Command::new("python3")
        .args(["-m", "venv", VENV])
        .status()
        .await
        .context("cannot run python3 (CPython 3.9+ with venv is needed)")?;
    if !created.success() {
        bail!("python3 -m venv {VENV} failed");
    }
    let installed = Command::new(Path::new(VENV).join("bin/pip"))
        .args(["install", "--quiet", "-r", REQUIREMENTS])
        .status()
        .await
        .context("cannot run pip")?;
    if !installed.success() {
        bail!("pip install -r {REQUIREMENTS} failed");
    }
    std::fs::write(&marker, wanted).context("cannot record the installed requirements")?;
    Ok(cli)
}

/// Runs schemathesis against a real server on `cluster`; fails on any failure it reports.
///
/// # Errors
///
/// When anything cannot be set up, or schemathesis finds a failure.
pub async fn run(cluster: &Cluster, template: &str) -> Result<()> {
    let cli = venv().await?;
    cluster.create_database(DATABASE, Some(template))?;
    let database = cluster.url(DATABASE)?;
    xtask::seed::seed(&database, USERS, true)?;
    let upstream = Upstream::start("target/debug/upstream", free_port()?, &[])
        .await
        .context("cannot start the stand-in recommendation service")?;
    let mut failed = Vec::new();
    // Without authentication, then in jwt mode with a token that may read every dashboard and
    // call the batch (schemathesis also sends requests without it: they must be 401).
    for auth in [false, true] {
        let mut settings = vec![
            ("DATABASE_URL", database.clone()),
            ("APP__RECOMMENDATIONS__BASE_URL", upstream.base_url.clone()),
            ("APP__SERVER__WORKERS", "2".to_owned()),
            ("RUST_LOG", "error".to_owned()),
        ];
        let mut header = Vec::new();
        if auth {
            let secret = format!(
                "{}{}",
                xtask::pg::random_password()?,
                xtask::pg::random_password()?
            );
            let token = xtask::stack::mint_token(
                "target/debug/api",
                &secret,
                "schemathesis",
                &["dashboards:read", "users:batch"],
                "1h",
            )
            .await?;
            settings.push(("APP__AUTH__MODE", "jwt".to_owned()));
            settings.push(("APP__AUTH__SECRET", secret));
            header = vec![
                "--header".to_owned(),
                format!("Authorization: Bearer {token}"),
            ];
        }
        let api =
            ApiProcess::start_binary("target/debug/api", free_port()?, &settings, true).await?;
        let mode = if auth { "jwt" } else { "none" };
        eprintln!(
            "schemathesis: checking {}/openapi.json (auth.mode = {mode})",
            api.base
        );
        let status = Command::new(&cli)
            .args(["run", &format!("{}/openapi.json", api.base)])
            .args(["--checks", "all"])
            .args(["--phases", "examples,coverage,fuzzing,stateful"])
            // Deterministic: the same cases on every run, so a red run reproduces.
            .args(["--generation-deterministic", "--max-examples", "200"])
            .args(["--request-timeout", "10", "--workers", "2"])
            .args(&header)
            .env("NO_COLOR", "1")
            .status()
            .await
            .context("cannot run schemathesis")?;
        api.stop(Duration::from_secs(10)).await?;
        if !status.success() {
            failed.push(mode);
        }
    }
    upstream.stop().await;
    if !failed.is_empty() {
        bail!(
            "schemathesis found failures with auth.mode = {}; the report is above",
            failed.join(", ")
        );
    }
    Ok(())
}
