//! The `upstream` binary (`cargo xtask upstream`): the stand-in recommendation service, on
//! 127.0.0.1, until Ctrl-C or SIGTERM.
//!
//! The server itself is this crate's library, where tests start it in-process; the binary only
//! turns flags into its configuration, serves, and prints a summary on the way out.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use upstream::{Config, Server, StatusCode};

/// The stand-in recommendation service: `GET /users/{id}/recommendations`, with optional latency
/// and faults.
#[derive(Debug, Parser)]
#[command(name = "upstream")]
struct UpstreamArgs {
    /// Port to listen on, on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 9100)]
    port: u16,
    /// Latency added to every answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Extra latency, uniformly random between 0 and this many milliseconds.
    #[arg(long, default_value_t = 0)]
    jitter_ms: u64,
    /// Fraction of requests (0-1) that are slow: they take --slow-delay-ms instead.
    #[arg(long, default_value_t = 0.0)]
    slow_rate: f64,
    /// Latency of the slow requests, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    slow_delay_ms: u64,
    /// Fraction of requests (0-1) answered with --error-status.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Status code of the injected errors (4xx or 5xx).
    #[arg(long, default_value_t = 503)]
    error_status: u16,
    /// Fraction of requests (0-1) never answered; their connection is held open.
    #[arg(long, default_value_t = 0.0)]
    hang_rate: f64,
    /// How long a hanging request holds its connection before it is closed, in milliseconds.
    #[arg(long, default_value_t = 300_000)]
    hang_limit_ms: u64,
    /// Fraction of requests (0-1) answered 200 with truncated JSON.
    #[arg(long, default_value_t = 0.0)]
    malformed_rate: f64,
    /// Fraction of requests (0-1) answered 200 with a body of --oversized-bytes bytes.
    #[arg(long, default_value_t = 0.0)]
    oversized_rate: f64,
    /// Size of the oversized bodies, in bytes; the default, 2 MiB, is twice the client's cap.
    #[arg(long, default_value_t = 2 << 20)]
    oversized_bytes: usize,
    /// Fraction of requests (0-1) whose connection is reset (TCP RST) instead of answered.
    #[arg(long, default_value_t = 0.0)]
    reset_rate: f64,
    /// Items per answer.
    #[arg(long, default_value_t = 10)]
    items: usize,
    /// How items are written: `objects` ({"product_id","score","reason"}) or `ids` (plain
    /// product ids, as the seed article's service answers).
    #[arg(long, default_value = "objects")]
    shape: upstream::Shape,
    /// Seed of the latency and fault draws: the same seed injects the same faults in the same
    /// order of arrival.
    #[arg(long, default_value_t = 0x5eed)]
    seed: u64,
}

impl UpstreamArgs {
    fn config(&self) -> Result<Config> {
        let error_status = StatusCode::from_u16(self.error_status).with_context(|| {
            format!("--error-status {} is not a status code", self.error_status)
        })?;
        Ok(Config {
            delay: Duration::from_millis(self.delay_ms),
            jitter: Duration::from_millis(self.jitter_ms),
            slow_rate: self.slow_rate,
            slow_delay: Duration::from_millis(self.slow_delay_ms),
            error_rate: self.error_rate,
            error_status,
            hang_rate: self.hang_rate,
            hang_limit: Duration::from_millis(self.hang_limit_ms),
            malformed_rate: self.malformed_rate,
            oversized_rate: self.oversized_rate,
            oversized_bytes: self.oversized_bytes,
            reset_rate: self.reset_rate,
            items_per_user: self.items,
            shape: self.shape,
            seed: self.seed,
            ..Config::default()
        })
    }
}

/// Serves until Ctrl-C (or SIGTERM), then shuts down gracefully.
#[tokio::main]
async fn main() -> Result<()> {
    let args = UpstreamArgs::parse();
    let config = args.config()?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, args.port));
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
