//! The `upstream` binary (`cargo xtask upstream`): the stand-in recommendation service, on
//! 127.0.0.1 (or `--host`), until Ctrl-C or SIGTERM.
//!
//! The server itself is this crate's library, where tests start it in-process; the binary only
//! turns flags into its configuration, serves, and prints a summary on the way out.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{Context, Result};
use clap::Parser;
use upstream::{Config, Server};

/// The stand-in recommendation service: `GET /users/{id}/recommendations`, with optional latency
/// and faults.
#[derive(Debug, Parser)]
#[command(name = "upstream")]
struct UpstreamArgs {
    /// Address to listen on (a host of `cargo xtask cluster up` listens on its own).
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    host: IpAddr,
    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 9100)]
    port: u16,
    #[command(flatten)]
    config: Config,
}

/// Serves until Ctrl-C (or SIGTERM), then shuts down gracefully.
#[tokio::main]
async fn main() -> Result<()> {
    let args = UpstreamArgs::parse();
    let config = args.config;
    let addr = SocketAddr::from((args.host, args.port));
    let server = Server::bind(addr, config)
        .await
        .context("cannot start the stand-in recommendation service")?;
    println!(
        "recommendation stand-in listening on {}/users/{{id}}/recommendations; Ctrl-C to stop",
        server.base_url()
    );
    stop_signal().await?;
    let stats = server.stats();
    server.shutdown().await;
    println!(
        "stopped after {} requests on {} connections ({} with an injected fault)",
        stats.requests, stats.connections, stats.faults
    );
    Ok(())
}

/// Waits for Ctrl-C, or on Unix also SIGTERM, which is what a script or a load generator that
/// started the server sends it.
async fn stop_signal() -> Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result.context("cannot listen for Ctrl-C"),
            _ = terminate.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c()
            .await
            .context("cannot listen for Ctrl-C")
    }
}
