//! `cargo xtask bench scaleout`: what each hop of the scale-out topology costs, and what 1, 2
//! and 3 API instances behind nginx give on this machine, with the CPU split that explains it.
//!
//! Everything is measured in one run, under wrk (Debian's; keep-alive connections, ids drawn
//! uniformly from every user by `overhead`'s Lua script), in rounds: each round measures every
//! configuration in turn and the medians of the rounds are reported, so a slow spell of a shared
//! machine lands on all of them. A round starts a [`Topology`] with one instance and no replica
//! for the hops, plus two instances of its own straight to the primary: (a) prepared statements,
//! (b) unnamed statements, (c) the topology's instance through PgBouncer, (d) nginx in plain
//! HTTP in front of (c), (e) nginx in HTTPS in front of (c). Then a topology with the replica
//! and 1, 2 and 3 instances behind nginx (plain HTTP), each in turn.
//!
//! The CPU split is each process group's user+system time over the measured window, from
//! `/proc/PID/stat` with the children's (a PostgreSQL server is its postmaster and every backend
//! under it; nginx its master and workers), divided by the dashboards answered: the API
//! instances, nginx, the PgBouncers, the primary, the replica, the stand-in recommendation
//! service, wrk (this process's reaped children), and the rest of the machine (`/proc/stat`'s
//! busy time minus all of those: other tenants of a shared machine). Beside it, the instances'
//! reads per shared statement (`dashboard_coalesced_reads_total` over `…_statements_total`): how
//! many concurrent dashboards one statement serves in the coalesced read mode, which shrinks as
//! the same load is split over more instances. Every instance logs at `warn`. Medians go to a
//! markdown table on standard output, every round's figures to `target/bench/scaleout.json`.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::Args;
use serde_json::json;
use xtask::stack::{self, ApiProcess};
use xtask::topology::{DATABASE, Topology, TopologyOptions};

use crate::overhead::{Load, UNIFORM};

/// Arguments of `cargo xtask bench scaleout`.
#[derive(Debug, Args)]
pub struct ScaleoutArgs {
    /// wrk's keep-alive connections.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Measured seconds of each run.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Seconds of wrk before each measured run (not counted).
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    /// Rounds: each measures every configuration once, in turn; medians are reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: u32,
    /// Users seeded into the topology's primary when it has none (its data is kept in
    /// `target/bench/scaleout`).
    #[arg(long, default_value_t = 100_000)]
    users: u32,
}

/// The process groups of the CPU split, in table order.
const GROUPS: [&str; 8] = [
    "API",
    "nginx",
    "PgBouncer",
    "primary",
    "replica",
    "stand-in",
    "wrk",
    "other",
];

/// The hop configurations, in table order.
const HOPS: [&str; 5] = [
    "(a) instance → PostgreSQL, prepared",
    "(b) instance → PostgreSQL, unnamed",
    "(c) instance → PgBouncer → PostgreSQL",
    "(d) nginx HTTP → (c)",
    "(e) nginx HTTPS → (c)",
];

/// One measured run.
#[derive(Debug, Clone)]
struct Run {
    /// Dashboards answered 2xx per second.
    rps: f64,
    /// Answers that were not 2xx, and socket errors.
    errors: u64,
    p99_ms: f64,
    /// CPU µs per dashboard of each of [`GROUPS`].
    cpu_us: [f64; GROUPS.len()],
    /// Cores busy on the whole machine over the window.
    busy_cores: f64,
    /// Reads answered per shared statement in the instances' coalesced read mode (how many
    /// concurrent dashboards one statement serves).
    reads_per_statement: f64,
}

/// Runs `cargo xtask bench scaleout`.
pub async fn run(args: ScaleoutArgs) -> Result<()> {
    stack::build_release(&["api", "upstream"]).await?;
    std::fs::create_dir_all("target/bench").context("cannot create target/bench")?;
    std::fs::write("target/bench/uniform.lua", UNIFORM).context("cannot write the wrk script")?;
    let options = TopologyOptions {
        dir: "target/bench/scaleout".into(),
        users: args.users,
        api_settings: vec![("APP__TELEMETRY__LEVEL".to_owned(), "warn".to_owned())],
        ..TopologyOptions::default()
    };
    let labels: Vec<String> = HOPS
        .iter()
        .map(|&h| h.to_owned())
        .chain(
            (1..=3).map(|n| format!("{n} instance{} behind nginx", if n > 1 { "s" } else { "" })),
        )
        .collect();
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); labels.len()];
    for round in 1..=args.rounds {
        let hops = hop_round(&args, &options)
            .await
            .with_context(|| format!("round {round}: the hops"))?;
        let mut scale = Vec::new();
        for n in 1..=3 {
            let topology = Topology::start(&TopologyOptions {
                instances: n,
                ..options.clone()
            })
            .await?;
            let measured = measure(&args, &topology, None, &topology.http_url()).await;
            topology.stop().await?;
            scale.push(measured.with_context(|| format!("round {round}: {n} instances"))?);
        }
        for (i, run) in hops.into_iter().chain(scale).enumerate() {
            println!(
                "round {round}/{}: {}: {}",
                args.rounds,
                labels[i],
                describe(&run)
            );
            runs[i].push(run);
        }
    }
    let medians: Vec<Run> = runs.iter().map(|r| median_run(r)).collect();
    print_tables(&args, &labels, &medians);
    let json = json!({
        "command": format!(
            "cargo xtask bench scaleout --connections {} --duration {} --warmup {} --rounds {} --users {}",
            args.connections, args.duration, args.warmup, args.rounds, args.users
        ),
        "groups": GROUPS,
        "configurations": labels.iter().zip(&runs).zip(&medians).map(|((label, rounds), median)| json!({
            "name": label,
            "median": run_json(median),
            "rounds": rounds.iter().map(run_json).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    let path = "target/bench/scaleout.json";
    std::fs::write(path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("cannot write {path}"))?;
    println!("\nevery round in {path}");
    Ok(())
}

/// One round of the hops: a topology with one instance and no replica, and two instances
/// straight to its primary.
async fn hop_round(args: &ScaleoutArgs, options: &TopologyOptions) -> Result<Vec<Run>> {
    let topology = Topology::start(&TopologyOptions {
        instances: 1,
        replica: false,
        ..options.clone()
    })
    .await?;
    let result = async {
        let primary = topology.primary();
        let url = format!(
            "postgres://{}@127.0.0.1:{}/{DATABASE}",
            primary.user, primary.port
        );
        let mut direct = Vec::new();
        for statements in ["prepared", "unnamed"] {
            let settings = [
                ("APP__DATABASE__URL", url.clone()),
                (
                    "APP__DATABASE__PASSWORD_FILE",
                    primary.password_file().to_string_lossy().into_owned(),
                ),
                ("APP__DATABASE__STATEMENTS", statements.to_owned()),
                (
                    "APP__RECOMMENDATIONS__BASE_URL",
                    format!("http://127.0.0.1:{}", topology.ports().upstream),
                ),
                ("APP__TELEMETRY__LEVEL", "warn".to_owned()),
            ];
            direct.push(ApiProcess::start(stack::free_port()?, &settings, true).await?);
        }
        let mut runs = Vec::new();
        for api in &direct {
            runs.push(measure(args, &topology, Some(api), &api.base).await?);
        }
        for url in [
            topology.instance_url(0),
            topology.http_url(),
            topology.https_url(),
        ] {
            runs.push(measure(args, &topology, None, &url).await?);
        }
        for api in direct {
            api.stop(Duration::from_secs(15)).await?;
        }
        anyhow::Ok(runs)
    }
    .await;
    topology.stop().await?;
    result
}

/// Warms up, then runs wrk against `url` and splits the CPU time of the window by process group.
/// The API group is `direct` when given, else the topology's instances.
async fn measure(
    args: &ScaleoutArgs,
    t: &Topology,
    direct: Option<&ApiProcess>,
    url: &str,
) -> Result<Run> {
    let users = stack::user_count(&t.primary().url(DATABASE)?)?;
    let load = |seconds| Load {
        script: "uniform.lua",
        users,
        connections: args.connections,
        seconds,
    };
    load(args.warmup).wrk_url(url).await?;
    let mut groups: Vec<Vec<u32>> = vec![Vec::new(); GROUPS.len()];
    let (pids, addresses): (Vec<Option<u32>>, Vec<String>) = match direct {
        Some(api) => (vec![api.pid()], vec![api.base.clone()]),
        None => (0..t.instance_count())
            .map(|i| (t.instance_pid(i), t.instance_url(i)))
            .unzip(),
    };
    groups[0] = pids.into_iter().flatten().collect();
    groups[1].extend(t.nginx_pid());
    groups[2].extend(t.pgbouncer_pids());
    groups[3].extend(postmaster(t.primary().data_dir()));
    groups[4].extend(t.replica().and_then(|r| postmaster(r.data_dir())));
    groups[5].extend(t.upstream_pid());
    let coalescing = || async {
        let mut sums = [0.0; 2];
        for address in &addresses {
            let address = address.trim_start_matches("http://").parse()?;
            let m = crate::chaos::rig::metrics_at(address).await?;
            sums[0] += m.get("dashboard_coalesced_reads_total");
            sums[1] += m.get("dashboard_coalesced_statements_total");
        }
        anyhow::Ok(sums)
    };
    let shared_before = coalescing().await?;
    let before = Snapshot::take()?;
    let wrk = load(args.duration).wrk_url(url).await?;
    let after = Snapshot::take()?;
    let shared_after = coalescing().await?;
    let answered = wrk.requests.saturating_sub(wrk.errors);
    let dashboards = answered.max(1) as f64;
    let per_dashboard = |ticks: u64| ticks as f64 / TICKS_PER_SECOND * 1e6 / dashboards;
    let mut cpu_us = [0.0; GROUPS.len()];
    let mut ours = 0;
    for (i, pids) in groups.iter().enumerate() {
        let ticks = after.tree(pids).saturating_sub(before.tree(pids));
        ours += ticks;
        cpu_us[i] = per_dashboard(ticks);
    }
    // wrk has exited and been reaped by this process: its time is in our children's.
    let wrk_ticks = after.reaped.saturating_sub(before.reaped);
    cpu_us[6] = per_dashboard(wrk_ticks);
    let busy = after.busy.saturating_sub(before.busy);
    cpu_us[7] = per_dashboard(busy.saturating_sub(ours + wrk_ticks));
    Ok(Run {
        rps: answered as f64 / wrk.seconds,
        errors: wrk.errors,
        p99_ms: wrk.p99_ms,
        cpu_us,
        busy_cores: busy as f64 / TICKS_PER_SECOND / wrk.seconds,
        reads_per_statement: (shared_after[0] - shared_before[0])
            / (shared_after[1] - shared_before[1]),
    })
}

/// The kernel's USER_HZ, the unit of `/proc`'s CPU times (100 on every Linux this runs on).
const TICKS_PER_SECOND: f64 = 100.0;

/// The postmaster's process id, from the first line of `postmaster.pid`.
fn postmaster(data_dir: std::path::PathBuf) -> Option<u32> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

/// Every process's parent and CPU ticks (its own and its reaped children's), this process's
/// reaped children's ticks, and the machine's busy ticks, at one moment.
struct Snapshot {
    parent: HashMap<u32, u32>,
    ticks: HashMap<u32, u64>,
    reaped: u64,
    busy: u64,
}

impl Snapshot {
    fn take() -> Result<Self> {
        let mut parent = HashMap::new();
        let mut ticks = HashMap::new();
        for entry in std::fs::read_dir("/proc")
            .context("cannot read /proc")?
            .flatten()
        {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            // A process that exits meanwhile is simply absent.
            if let Some((ppid, own, children)) = stat(&format!("/proc/{pid}/stat")) {
                parent.insert(pid, ppid);
                ticks.insert(pid, own + children);
            }
        }
        let (_, _, reaped) = stat("/proc/self/stat").context("cannot read /proc/self/stat")?;
        let line = std::fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
        let fields: Vec<u64> = line
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|f| f.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal: all but idle and iowait are busy.
        let busy = fields
            .iter()
            .take(8)
            .enumerate()
            .filter(|(i, _)| *i != 3 && *i != 4)
            .map(|(_, v)| v)
            .sum();
        Ok(Self {
            parent,
            ticks,
            reaped,
            busy,
        })
    }

    /// The ticks of `roots` and every process under them.
    fn tree(&self, roots: &[u32]) -> u64 {
        self.ticks
            .iter()
            .filter(|(pid, _)| {
                let mut at = **pid;
                // Up the parent chain to a root, or to init.
                loop {
                    if roots.contains(&at) {
                        return true;
                    }
                    match self.parent.get(&at) {
                        Some(&up) if up > 1 && up != at => at = up,
                        _ => return false,
                    }
                }
            })
            .map(|(_, ticks)| ticks)
            .sum()
    }
}

/// The parent, own user+system ticks, and reaped children's ticks in a `/proc/PID/stat` file.
fn stat(path: &str) -> Option<(u32, u64, u64)> {
    parse_stat(&std::fs::read_to_string(path).ok()?)
}

fn parse_stat(text: &str) -> Option<(u32, u64, u64)> {
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
    let number = |i: usize| fields.get(i)?.parse::<u64>().ok();
    // ppid, utime, stime, cutime, cstime: the 4th, 14th to 17th fields of the line.
    let ppid = u32::try_from(number(1)?).ok()?;
    Some((ppid, number(11)? + number(12)?, number(13)? + number(14)?))
}

/// Each figure's median over the rounds, taken separately.
fn median_run(runs: &[Run]) -> Run {
    let median = |pick: &dyn Fn(&Run) -> f64| {
        let mut values: Vec<f64> = runs.iter().map(pick).collect();
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
    };
    Run {
        rps: median(&|r| r.rps),
        errors: runs.iter().map(|r| r.errors).sum(),
        p99_ms: median(&|r| r.p99_ms),
        cpu_us: std::array::from_fn(|g| median(&|r| r.cpu_us[g])),
        busy_cores: median(&|r| r.busy_cores),
        reads_per_statement: median(&|r| r.reads_per_statement),
    }
}

fn run_json(run: &Run) -> serde_json::Value {
    json!({
        "dashboards_per_second": run.rps,
        "p99_ms": run.p99_ms,
        "errors": run.errors,
        "busy_cores": run.busy_cores,
        "reads_per_shared_statement": run.reads_per_statement,
        "cpu_us_per_dashboard": GROUPS.iter().zip(run.cpu_us).map(|(g, us)| (g.to_string(), json!(us))).collect::<serde_json::Map<_, _>>(),
    })
}

fn describe(run: &Run) -> String {
    let split: Vec<String> = GROUPS
        .iter()
        .zip(run.cpu_us)
        .map(|(g, us)| format!("{g} {us:.0}"))
        .collect();
    format!(
        "{:.0} dashboards/s, {} errors, p99 {:.1} ms, {:.2} cores busy, {:.2} reads per shared statement; CPU µs per dashboard: {}",
        run.rps,
        run.errors,
        run.p99_ms,
        run.busy_cores,
        run.reads_per_statement,
        split.join(", ")
    )
}

fn print_tables(args: &ScaleoutArgs, labels: &[String], medians: &[Run]) {
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let columns: Vec<String> = GROUPS.iter().map(|g| format!("{g} µs")).collect();
    println!(
        "\nwrk -c{} -t2, {} s × {} rounds (medians), uniform ids, {cores} cores; CPU µs per dashboard by process group\n",
        args.connections, args.duration, args.rounds
    );
    println!(
        "| configuration | dashboards/s | vs (a) | p99 | errors | {} | sum µs | cores busy | reads per shared statement |",
        columns.join(" | ")
    );
    println!(
        "|---|---:|---:|---:|---:|{}---:|---:|---:|",
        "---:|".repeat(GROUPS.len())
    );
    let base = medians[0].rps;
    for (i, (label, run)) in labels.iter().zip(medians).enumerate() {
        if i == HOPS.len() {
            println!(
                "| **behind nginx (HTTP), PgBouncer, replica** | | | | | {}| | | |",
                "| ".repeat(GROUPS.len())
            );
        }
        let cells: Vec<String> = run.cpu_us.iter().map(|us| format!("{us:.0}")).collect();
        // The rest of the machine is not this topology's cost.
        let sum: f64 = run.cpu_us[..GROUPS.len() - 1].iter().sum();
        println!(
            "| {label} | {:.0} | {:.2}× | {:.1} ms | {} | {} | {sum:.0} | {:.2} | {:.2} |",
            run.rps,
            run.rps / base,
            run.p99_ms,
            run.errors,
            cells.join(" | "),
            run.busy_cores,
            run.reads_per_statement
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_gives_the_parent_the_own_cpu_and_the_reaped_childrens() {
        let line = "4242 (nginx: worker (x)) S 4200 4200 4200 0 -1 4194624 900 0 0 0 \
                    150 50 7 3 20 0 1 0 123 456 789";
        assert_eq!(parse_stat(line), Some((4200, 200, 10)));
        assert_eq!(parse_stat("4242 (cut short) S 1"), None);
    }

    #[test]
    fn a_tree_holds_the_roots_and_everything_under_them() {
        let snapshot = Snapshot {
            parent: HashMap::from([(10, 1), (11, 10), (12, 11), (20, 1)]),
            ticks: HashMap::from([(10, 1), (11, 10), (12, 100), (20, 1000)]),
            reaped: 0,
            busy: 0,
        };
        assert_eq!(snapshot.tree(&[10]), 111);
        assert_eq!(snapshot.tree(&[11, 20]), 1110);
        assert_eq!(snapshot.tree(&[]), 0);
    }
}
