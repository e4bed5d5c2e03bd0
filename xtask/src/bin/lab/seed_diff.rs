//! `cargo xtask bench seed-diff`: this service beside the seed article's own FastAPI service, on
//! the same database and the same recommendation stand-in, asked for the same dashboards; every
//! difference in status or body, field by field, counted and explained.
//!
//! A difference this service means is listed in [`INTENDED`] with the reason; anything else is
//! reported as unexplained and fails the command, so a change that drifts from the seed's
//! contract is seen.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::chaos::client;
use crate::perf::{Bench, PerfArgs};

/// How many users the comparison asks for: known ones spread over the id range, and a few that
/// do not exist.
const KNOWN: u64 = 190;
const UNKNOWN: u64 = 10;

/// The differences this service means, by field path and kind, with the reason.
const INTENDED: &[(&str, &str, &str)] = &[
    (
        "HTTP status",
        "404 vs 200",
        "an unknown user is a 404 `user_not_found` error; the seed answers 200 with `profile: null`",
    ),
    (
        "status",
        "value",
        "the unknown user's envelope says `\"error\"` (see the HTTP status row)",
    ),
    (
        "data",
        "only in the seed",
        "the unknown user's 404 has no `data` (see the status row)",
    ),
    (
        "error",
        "only in ours",
        "the unknown user's 404 carries the error body `{code, message}`",
    ),
    (
        "data.orders[].amount",
        "type",
        "money is an exact decimal string (`\"19.99\"`); the seed sends a float",
    ),
    (
        "data.orders[].created_at",
        "value",
        "timestamps are RFC 3339 in UTC with `Z`; the seed sends Python's isoformat with `+00:00`",
    ),
    (
        "data.orders",
        "order",
        "orders are newest first; the seed's query has no ORDER BY",
    ),
    (
        "data.orders",
        "length",
        "orders are capped at `database.orders_limit` (100) with `more_orders` saying more exist; the seed sends all",
    ),
    (
        "data.reviews",
        "order",
        "reviews are newest first; the seed's query has no ORDER BY",
    ),
    (
        "data.reviews",
        "length",
        "reviews are capped at `database.reviews_limit` (100) with `more_reviews`; the seed sends all",
    ),
    (
        "data.more_orders",
        "only in ours",
        "says whether the user has more orders than the capped list",
    ),
    (
        "data.more_reviews",
        "only in ours",
        "says whether the user has more reviews than the capped list",
    ),
    (
        "data.errors[].kind",
        "only in ours",
        "each error entry names its kind (`timeout`, `busy`, ...) for machines",
    ),
];

/// `cargo xtask bench seed-diff`.
pub async fn run(args: PerfArgs) -> Result<()> {
    let bench = Bench::start(&args, Duration::ZERO).await?;
    let result = compare(&bench).await;
    bench.stop().await;
    let differences = result?;
    println!("\n| field | difference | dashboards | why |\n|---|---|---|---|");
    let mut unexplained = 0;
    for ((path, kind), count) in &differences {
        let why = INTENDED
            .iter()
            .find(|(p, k, _)| p == path && k == kind)
            .map(|(_, _, why)| *why);
        if why.is_none() {
            unexplained += 1;
        }
        println!(
            "| `{path}` | {kind} | {count} | {} |",
            why.unwrap_or("**unexplained**")
        );
    }
    if unexplained > 0 {
        bail!("{unexplained} difference(s) with the seed's service are not explained");
    }
    Ok(())
}

type Differences = BTreeMap<(String, String), usize>;

async fn compare(bench: &Bench) -> Result<Differences> {
    let uvicorn = crate::perf::peer_venv().await?;
    let api = bench.api(&[]).await?;
    let (mut seed, group, seed_address) = crate::perf::start_seed(bench, &uvicorn, 1).await?;
    let ours = api.base.trim_start_matches("http://").to_owned();
    let users = bench.users();
    let ids = (0..KNOWN)
        .map(|i| 1 + i * users.saturating_sub(1) / (KNOWN - 1).max(1))
        .chain((1..=UNKNOWN).map(|i| users + i * 1000));
    let mut differences = Differences::new();
    let mut compared = 0;
    let result: Result<()> = async {
        for id in ids {
            let path = format!("/api/users/{id}/dashboard");
            let (our_status, our_body) = get(&ours, &path).await?;
            let (seed_status, seed_body) = get(&seed_address, &path).await?;
            let mut found = Differences::new();
            if our_status != seed_status {
                found.insert(
                    (
                        "HTTP status".to_owned(),
                        format!("{our_status} vs {seed_status}"),
                    ),
                    1,
                );
            }
            diff("", &our_body, &seed_body, &mut found);
            for (key, _) in found {
                *differences.entry(key).or_default() += 1;
            }
            compared += 1;
        }
        Ok(())
    }
    .await;
    if let Some(group) = group {
        group.stop(Duration::from_secs(10)).await;
    }
    let _ = seed.wait().await;
    api.stop(Duration::from_secs(10)).await?;
    result?;
    println!("compared {compared} dashboards");
    Ok(differences)
}

/// Records how `ours` differs from `seed` under `path` (array elements as `[]`). Lists of objects
/// with an `id` are compared as sets by id, with their order and length reported apart.
fn diff(path: &str, ours: &Value, seed: &Value, found: &mut Differences) {
    let mut note = |path: &str, kind: &str| {
        found.insert((path.to_owned(), kind.to_owned()), 1);
    };
    match (ours, seed) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                let child = join(path, key);
                match b.get(key) {
                    Some(other) => diff(&child, value, other, found),
                    None => {
                        found.insert((child, "only in ours".to_owned()), 1);
                    }
                }
            }
            for key in b.keys().filter(|key| !a.contains_key(*key)) {
                found.insert((join(path, key), "only in the seed".to_owned()), 1);
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            let ids = |list: &[Value]| -> Option<Vec<Value>> {
                list.iter().map(|item| item.get("id").cloned()).collect()
            };
            let element = format!("{path}[]");
            match (ids(a), ids(b)) {
                (Some(our_ids), Some(seed_ids)) if !a.is_empty() || !b.is_empty() => {
                    if a.len() != b.len() {
                        note(path, "length");
                    }
                    let common: Vec<&Value> =
                        our_ids.iter().filter(|id| seed_ids.contains(id)).collect();
                    let seed_common: Vec<&Value> =
                        seed_ids.iter().filter(|id| our_ids.contains(id)).collect();
                    if common != seed_common {
                        note(path, "order");
                    }
                    for (item, id) in a.iter().zip(&our_ids) {
                        if let Some(other) = b.iter().find(|o| o.get("id") == Some(id)) {
                            diff(&element, item, other, found);
                        }
                    }
                }
                _ => {
                    if a.len() != b.len() {
                        note(path, "length");
                    }
                    for (x, y) in a.iter().zip(b) {
                        diff(&element, x, y, found);
                    }
                }
            }
        }
        (a, b) if std::mem::discriminant(a) != std::mem::discriminant(b) => note(path, "type"),
        (a, b) if a != b => note(path, "value"),
        _ => {}
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// One `GET` with `Connection: close`: the status and the body parsed as JSON.
async fn get(address: &str, path: &str) -> Result<(u16, Value)> {
    let addr = address
        .parse()
        .with_context(|| format!("{address} is not host:port"))?;
    let answer = client::fetch(addr, &client::get(path, false), Duration::from_secs(30))
        .await
        .map_err(|lost| {
            anyhow::anyhow!("{address}{path}: no answer ({})", lost.failure.as_str())
        })?;
    let body = serde_json::from_slice(&answer.body)
        .with_context(|| format!("{address}{path}: the body is not JSON"))?;
    Ok((answer.status, body))
}
