//! `cargo xtask up`: everything a newcomer needs, in one command.
//!
//! Builds the API and the stand-in recommendation service in release mode (cargo's progress on
//! the terminal), starts the local PostgreSQL cluster, applies migrations (`api migrate`), seeds
//! 100 000 users if the database has none, serves the stand-in, runs the API in the foreground,
//! then prints what to try. Ctrl-C (or SIGTERM) stops the API gracefully, then the stand-in, then
//! the cluster if this command started it.

use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use xtask::pg::State;
use xtask::settings::Settings;
use xtask::stack;

/// Arguments of `cargo xtask up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Users to seed when the database is empty.
    #[arg(long, default_value_t = 100_000)]
    users: u32,
    /// Latency the stand-in recommendation service adds to each answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    upstream_delay_ms: u64,
    /// Run the API in `jwt` mode with the local HS256 secret (target/auth/secret) and print a
    /// token to try it with.
    #[arg(long)]
    auth: bool,
}

/// How long the API gets to finish in-flight requests after the signal, beyond its own grace.
const STOP_SLACK: Duration = Duration::from_secs(5);

/// Runs `cargo xtask up`.
pub async fn run(args: UpArgs) -> Result<()> {
    let settings = Settings::load()?;
    let (cluster, database) = xtask::pg::dev_cluster(&settings)?;
    let started_cluster = cluster.state()? != State::Running;
    // The cluster starts while cargo builds: the end of a release build keeps one core busy.
    step("building the API and the stand-in recommendation service (release); starting PostgreSQL");
    let prepared = tokio::select! {
        both = async {
            tokio::try_join!(
                stack::build_release(&["api", "upstream"]),
                xtask::pg::start(&cluster, &database),
            )
        } => both.map(|_| ()),
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    if let Err(e) = prepared {
        if started_cluster {
            let _ = cluster.stop();
        }
        return Err(e);
    }
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
    // Until the API runs, Ctrl-C stops the preparation; `run` then stops the cluster.
    step("migrating and seeding");
    let url = settings.database.url_with_password()?;
    tokio::select! {
        prepared = stack::prepare_database(Path::new(stack::RELEASE_API), &url, args.users) => prepared?,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
    }

    // The stand-in recommendation service, where the settings expect it.
    let upstream_address = upstream_address(&settings.recommendations.base_url)?;
    step("starting the stand-in recommendation service");
    let flags = vec!["--delay-ms".to_owned(), args.upstream_delay_ms.to_string()];
    let upstream = stack::Upstream::start(RELEASE_UPSTREAM, upstream_address.port(), &flags)
        .await
        .with_context(|| {
            format!("cannot serve the stand-in recommendation service on {upstream_address}")
        })?;
    println!("recommendations stand-in: {}", upstream.base_url);

    // The API, built in release mode above, in the foreground.
    step("starting the API");
    let secret = if args.auth {
        Some(stack::dev_secret()?)
    } else {
        None
    };
    let auth = match &secret {
        Some(secret) => vec![
            ("APP__AUTH__MODE", "jwt".to_owned()),
            ("APP__AUTH__SECRET", secret.clone()),
        ],
        None => Vec::new(),
    };
    let api = match stack::ApiProcess::start(settings.server.port, &auth, false).await {
        Ok(api) => api,
        Err(e) => {
            upstream.stop().await;
            return Err(e);
        }
    };
    let base = &api.base;
    if let Some(secret) = &secret {
        let api_binary = stack::RELEASE_API;
        let user = stack::mint_token(api_binary, secret, "42", &[], "24h").await?;
        let batch =
            stack::mint_token(api_binary, secret, "batch-client", &["users:batch"], "24h").await?;
        println!(
            "\nThe dashboard API is up, in jwt mode (HS256, secret in {}). Try:\n\
             \x20 curl -H 'authorization: Bearer {user}' {base}/api/users/42/dashboard\n\
             \x20 curl {base}/api/users/42/dashboard     # 401: no token\n\
             \x20 curl -H 'authorization: Bearer {user}' {base}/api/users/43/dashboard     # 403: not user 43\n\
             \x20 curl -X POST -H 'authorization: Bearer {batch}' -H 'content-type: application/json' -d '{{\"user_ids\":[1,2,3]}}' {base}/api/users/batch\n\
             More tokens: cargo xtask token --sub 7 [--scope dashboards:read] [--ttl 1h]\n\
             Ctrl-C stops everything this command started.\n",
            stack::DEV_SECRET
        );
    } else {
        println!(
            "\nThe dashboard API is up. Try:\n\
         \x20 curl {base}/api/users/42/dashboard\n\
         \x20 curl -X POST -H 'content-type: application/json' -d '{{\"user_ids\":[1,2,3]}}' {base}/api/users/batch\n\
         \x20 curl {base}/metrics\n\
         \x20 curl {base}/openapi.json\n\
         Ctrl-C stops everything this command started.\n"
        );
    }

    let status = wait_for_stop(api, settings).await;
    upstream.stop().await;
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

/// Waits for the API to exit; on Ctrl-C or SIGTERM, asks it to stop gracefully, and kills it if
/// it takes longer than its grace period plus some slack.
async fn wait_for_stop(
    mut api: stack::ApiProcess,
    settings: &Settings,
) -> Result<std::process::ExitStatus> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    tokio::select! {
        status = api.child_mut().wait() => return Ok(status?),
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    // From a terminal, the API got the same Ctrl-C; from a script, it did not. Either way a
    // SIGTERM asks it to finish in-flight requests and stop.
    api.stop(settings.server.shutdown_grace + STOP_SLACK).await
}

/// The stand-in built in release mode.
const RELEASE_UPSTREAM: &str = "target/release/upstream";

/// One line per step, so a newcomer sees where the time goes.
fn step(what: &str) {
    println!("==> {what}");
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
