//! `cargo xtask up`: everything a newcomer needs, in one command.
//!
//! Starts the local PostgreSQL cluster, applies migrations, seeds 100 000 users if the database
//! has none, serves the stand-in recommendation service, builds the API in release mode and runs
//! it in the foreground, then prints what to try. Ctrl-C (or SIGTERM) stops the API gracefully,
//! then the stand-in, then the cluster if this command started it.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use api::settings::Settings;
use clap::Args;
use tokio::process::{Child, Command};

use crate::pg::State;

/// Arguments of `cargo xtask up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Users to seed when the database is empty.
    #[arg(long, default_value_t = 100_000)]
    users: u32,
    /// Latency the stand-in recommendation service adds to each answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    upstream_delay_ms: u64,
}

/// How long the API gets to finish in-flight requests after the signal, beyond its own grace.
const STOP_SLACK: Duration = Duration::from_secs(5);

/// Runs `cargo xtask up`.
pub async fn run(args: UpArgs) -> Result<()> {
    let settings = Settings::load().context("cannot load the settings")?;

    // 1. The database: start, migrate, seed when empty.
    let (cluster, database) = crate::db::dev_cluster(&settings)?;
    let started_cluster = cluster.state()? != State::Running;
    crate::db::start(&cluster, &database).await?;
    println!(
        "PostgreSQL: 127.0.0.1:{} (database {database})",
        cluster.port
    );
    let stop_cluster = || {
        if started_cluster {
            match cluster.stop() {
                Ok(_) => println!("PostgreSQL stopped"),
                Err(e) => eprintln!("warning: could not stop PostgreSQL: {e:#}"),
            }
        }
    };
    let result = serve(&settings, &args).await;
    stop_cluster();
    result
}

async fn serve(settings: &Settings, args: &UpArgs) -> Result<()> {
    {
        let mut client = repository::connect(&settings.database).await?;
        let applied =
            crate::migrate::apply(&mut client, Path::new(crate::migrate::MIGRATIONS_DIR)).await?;
        println!("migrations: {} applied", applied.len());
        let users: i64 = client
            .query_one("SELECT count(*) FROM (SELECT 1 FROM users LIMIT 1) s", &[])
            .await?
            .get(0);
        if users == 0 {
            println!(
                "seeding {} users (once; the data stays for next time)",
                args.users
            );
            let report = crate::seed::seed(&settings.database, args.users, false, true).await?;
            println!(
                "seeded {} rows ({:.0} rows/s)",
                report.rows(),
                report.rows() as f64 / report.load_time.as_secs_f64().max(1e-9)
            );
        }
    }

    // 2. The stand-in recommendation service, where the settings expect it.
    let upstream_address = upstream_address(&settings.recommendations.base_url)?;
    let upstream = upstream::Server::bind(
        upstream_address,
        upstream::Config {
            delay: Duration::from_millis(args.upstream_delay_ms),
            ..upstream::Config::default()
        },
    )
    .await
    .with_context(|| {
        format!("cannot serve the stand-in recommendation service on {upstream_address}")
    })?;
    println!("recommendations stand-in: {}", upstream.base_url());

    // 3. The API, built in release mode, in the foreground.
    let built = Command::new(cargo())
        .args(["build", "--release", "--quiet", "--package", "api"])
        .status()
        .await
        .context("cannot run cargo build")?;
    if !built.success() {
        bail!("building the API failed");
    }
    let mut api = Command::new("target/release/api")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start target/release/api")?;
    let base = format!("http://{}:{}", settings.server.host, settings.server.port);
    let ready = wait_until_ready(&base, &mut api).await;
    if let Err(e) = ready {
        upstream.shutdown().await;
        return Err(e);
    }
    println!(
        "\nThe dashboard API is up. Try:\n\
         \x20 curl {base}/api/users/42/dashboard\n\
         \x20 curl -X POST -H 'content-type: application/json' -d '{{\"user_ids\":[1,2,3]}}' {base}/api/users/batch\n\
         \x20 curl {base}/metrics\n\
         \x20 curl {base}/openapi.json\n\
         Ctrl-C stops everything this command started.\n"
    );

    let status = wait_for_stop(&mut api, settings).await;
    upstream.shutdown().await;
    println!("recommendations stand-in stopped");
    let status = status?;
    if !status.success() {
        bail!("the API exited with {status}");
    }
    Ok(())
}

/// The `host:port` of an `http://host:port/...` base URL.
fn upstream_address(base_url: &str) -> Result<SocketAddr> {
    let rest = base_url
        .strip_prefix("http://")
        .context("recommendations.base_url must start with http://")?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let address = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let address = address.replace("localhost", "127.0.0.1");
    SocketAddr::from_str(&address).with_context(|| {
        format!(
            "recommendations.base_url ({base_url}) is not a local address this command can serve"
        )
    })
}

/// Polls `/healthz` until the API answers, or fails if it exits first.
async fn wait_until_ready(base: &str, api: &mut Child) -> Result<()> {
    let address = base.trim_start_matches("http://").to_owned();
    for _ in 0..600 {
        if let Some(status) = api.try_wait()? {
            bail!("the API exited during start-up ({status}); its log is above");
        }
        if healthz(&address).await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the API did not answer on {base}/healthz within 60 s")
}

/// One `GET /healthz` over a raw connection (xtask needs no HTTP client for this).
async fn healthz(address: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut tcp = tokio::net::TcpStream::connect(address).await.ok()?;
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: local\r\nconnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut head = [0u8; 12];
        tcp.read_exact(&mut head).await.ok()?;
        Some(head.starts_with(b"HTTP/1.1 200"))
    };
    tokio::time::timeout(Duration::from_secs(1), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// Waits for the API to exit; on Ctrl-C or SIGTERM, asks it to stop gracefully, and kills it if
/// it takes longer than its grace period plus some slack.
async fn wait_for_stop(api: &mut Child, settings: &Settings) -> Result<std::process::ExitStatus> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    tokio::select! {
        status = api.wait() => return Ok(status?),
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    // From a terminal, the API got the same Ctrl-C; from a script, it did not. Either way a
    // SIGTERM asks it to finish in-flight requests and stop.
    if let Some(pid) = api.id() {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
    }
    let patience = settings.server.shutdown_grace + STOP_SLACK;
    match tokio::time::timeout(patience, api.wait()).await {
        Ok(status) => Ok(status?),
        Err(_) => {
            eprintln!("the API did not stop within {patience:?}; killing it");
            api.kill().await?;
            Ok(api.wait().await?)
        }
    }
}

/// The cargo that runs this command (`CARGO` is set by `cargo run`).
pub fn cargo() -> std::ffi::OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upstream_address_comes_from_the_base_url() {
        assert_eq!(
            upstream_address("http://127.0.0.1:9100").unwrap(),
            "127.0.0.1:9100".parse().unwrap()
        );
        assert_eq!(
            upstream_address("http://localhost:9200/prefix").unwrap(),
            "127.0.0.1:9200".parse().unwrap()
        );
        assert!(upstream_address("https://example.com").is_err());
        assert!(upstream_address("http://example.com:80").is_err());
    }
}
