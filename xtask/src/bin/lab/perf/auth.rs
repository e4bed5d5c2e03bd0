//! `cargo xtask bench auth`: what verifying a bearer token costs per dashboard. Four APIs on the
//! same database and stand-in, measured alternately under the same closed-loop load: no
//! authentication, HS256 with one token, ES256 (a P-256 key from a JWKS) with one token, and
//! HS256 with a token minted per request for its user (as real clients send them).
//!
//! The ES256 key pair is the API's test pair (`crates/api/tests/keys`): a benchmark needs a key,
//! not a secret one.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use loadtest::Scenario;

use super::*;

const KEYS: &str = "crates/api/tests/keys";
const SECRET: &str = "a-benchmark-secret-of-at-least-32-bytes";

/// One authentication setting: its label, the API's settings, the token every request carries,
/// and whether a token is minted per request instead.
struct Setup {
    label: &'static str,
    settings: Vec<(&'static str, String)>,
    token: Option<String>,
    mint: bool,
}

/// One authentication setting's figures (median round).
pub(super) struct AuthFigures {
    pub(super) label: &'static str,
    pub(super) rps: f64,
    pub(super) p99_ms: f64,
}

fn token(algorithm: Algorithm) -> Result<String> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let claims = serde_json::json!({
        "sub": "bench", "exp": now + 3600, "scope": "dashboards:read users:batch"
    });
    let (key, kid) = match algorithm {
        Algorithm::ES256 => {
            let der = std::fs::read(format!("{KEYS}/ec.der")).context("cannot read the EC key")?;
            (EncodingKey::from_ec_der(&der), Some("ec-1".to_owned()))
        }
        _ => (EncodingKey::from_secret(SECRET.as_bytes()), None),
    };
    let mut header = Header::new(algorithm);
    header.kid = kid;
    Ok(jsonwebtoken::encode(&header, &claims, &key)?)
}

/// Every setting, one API each, measured alternately `rounds` times.
pub(super) async fn auth(bench: &Bench) -> Result<Vec<AuthFigures>> {
    let secret_file = std::path::PathBuf::from(OUT_DIR).join("auth-secret");
    std::fs::create_dir_all(OUT_DIR)?;
    std::fs::write(&secret_file, SECRET)?;
    let jwt = |jwks: bool| -> Vec<(&'static str, String)> {
        let mut settings = vec![
            ("APP__AUTH__MODE", "jwt".to_owned()),
            ("APP__AUTH__SECRET", SECRET.to_owned()),
        ];
        if jwks {
            settings.push(("APP__AUTH__JWKS_PATH", format!("{KEYS}/jwks.json")));
        }
        settings
    };
    let (hs, es) = (token(Algorithm::HS256)?, token(Algorithm::ES256)?);
    let setup = |label, settings, token, mint| Setup {
        label,
        settings,
        token,
        mint,
    };
    let setups = [
        setup("none", Vec::new(), None, false),
        setup("HS256, one token", jwt(false), Some(hs), false),
        setup("ES256, one token", jwt(true), Some(es), false),
        setup("HS256, a token per request", jwt(false), None, true),
    ];
    let mut apis = Vec::new();
    for setup in &setups {
        apis.push(bench.api(&setup.settings).await?);
    }
    let labels: Vec<&str> = setups.iter().map(|setup| setup.label).collect();
    let runs = alternate(bench, apis, &labels, |i, api| {
        let mut config = bench.load(api, Scenario::Dashboard);
        config.token = setups[i].token.clone();
        config.token_secret_file = setups[i].mint.then(|| secret_file.clone());
        config
    })
    .await?;
    setups
        .iter()
        .zip(runs)
        .map(|(setup, reports)| {
            let median = median_round(reports)?.measured;
            Ok(AuthFigures {
                label: setup.label,
                rps: median.success_rps,
                p99_ms: median.latency.p99_ms,
            })
        })
        .collect()
}

/// `cargo xtask bench auth`.
pub async fn run_auth(args: PerfArgs) -> Result<()> {
    let bench = Bench::start(&args, Duration::ZERO).await?;
    let result = auth(&bench).await;
    bench.stop().await;
    let figures = result?;
    println!();
    let base = figures.first().map_or(1.0, |f| f.rps.max(1e-9));
    for f in &figures {
        println!(
            "{:>28}: {:.0} dashboards/s ({:.2}x none), p99 {:.2} ms (median round)",
            f.label,
            f.rps,
            f.rps / base,
            f.p99_ms
        );
    }
    Ok(())
}
