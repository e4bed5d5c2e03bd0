//! `cargo xtask cluster chaos [--only SCENARIO] [--quick]`: faults against the scale-out topology
//! (three API instances behind nginx, a PgBouncer in front of the PostgreSQL primary and one in
//! front of its streaming replica), under a steady load of dashboards and 10% batches sent to
//! nginx's plain-HTTP listener, with proof that nothing is lost and nothing leaks.
//!
//! Each scenario starts a [`Topology`] of its own from `target/cluster-chaos` (the primary is
//! seeded once and kept, the replica copied afresh), so one scenario's damage cannot reach the
//! next. The load is the chaos runs' client, which records every request; a request is *lost*
//! when it gets no complete answer or a 5xx that is not the API's own JSON error (nginx's 502 or
//! 504). After each scenario, once the load has stopped, every instance must have no live
//! task-group children and nothing in flight, neither database a session left `active` or
//! `idle in transaction`, and neither PgBouncer a server still linked to a client or a client
//! waiting. The report has the form of `cargo xtask chaos` and is also written to
//! `target/chaos/cluster-report.txt`; any FAIL makes the command exit non-zero.
//!
//! "PgBouncer restarted" stops both PgBouncers, holds them down, and starts them again: with the
//! replica's still up, the reads would not depend on the primary's at all.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::{Args, ValueEnum};
use tokio::time::{Instant, sleep};
use xtask::pg::Cluster;
use xtask::topology::{DATABASE, Topology, TopologyOptions};

use crate::chaos::client::{self, Load, Outcome, Record};
use crate::chaos::report::{
    self, ScenarioReport, describe_latency, latencies, ms, percentiles, sample,
};
use crate::chaos::rig::{LOG_DIR, metrics_at};

/// Arguments of `cargo xtask cluster chaos`.
#[derive(Debug, Args)]
pub struct ClusterChaosArgs {
    /// Run only this scenario (repeat the flag for several); all of them by default.
    #[arg(long, value_enum)]
    only: Vec<Scenario>,
    /// Shorter phases: the same checks in less time.
    #[arg(long)]
    quick: bool,
    /// Show the API instances' logs on the terminal (to see why a scenario failed).
    #[arg(long)]
    logs: bool,
    /// Users seeded into the topology's primary when it has none (kept between runs).
    #[arg(long, default_value_t = 20_000)]
    users: u32,
    /// Everything on 127.0.0.1, even as root (no network namespaces).
    #[arg(long)]
    loopback: bool,
}

/// The scenarios, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// One API instance killed with SIGKILL, started again 4 s later.
    InstanceKill,
    /// SIGTERM to each instance in turn; the next once it is ready again and nginx's
    /// `fail_timeout` has passed (nginx leaves out an instance that failed for that long, so a
    /// faster pace can leave no instance to send to).
    RollingRestart,
    /// The replica stopped for 5 s: reads fall back to the primary and come back.
    ReplicaStop,
    /// Both PgBouncers stopped for 3 s, then started again: fast 503s, then recovery.
    PgbouncerRestart,
    /// The primary stopped for 4 s, the replica up: reads go on from the replica, readiness
    /// says the primary is down.
    PrimaryStop,
    /// The primary and the replica stopped together for 4 s: fast 503s, then recovery.
    DatabasesStop,
}

/// The bound on recovery once what failed is back (the issue's 2 s).
const RECOVERY_BOUND: Duration = Duration::from_secs(2);
/// What a request may take beyond the API's deadline: the answer's way back through nginx on a
/// busy machine.
const ANSWER_SLACK: Duration = Duration::from_millis(250);
/// How long what a scenario leaves behind may take to drain once its load has stopped.
const SETTLE: Duration = Duration::from_secs(5);

/// What every scenario gets.
struct Ctx {
    options: TopologyOptions,
    quick: bool,
    /// The dashboard's deadline (from `config/`): a 503 is fast under half of it.
    deadline: Duration,
}

impl Ctx {
    /// `full` normally, `quick` with `--quick`.
    fn phase(&self, full: u64, quick: u64) -> Duration {
        Duration::from_secs(if self.quick { quick } else { full })
    }

    /// The steady load through nginx: 32 connections, 10% batches. Its timeout is above the
    /// batch's 10 s deadline, so a request that times out was not answered when it should have
    /// been.
    fn load(&self, topology: &Topology, users: u64) -> Load {
        Load {
            addr: SocketAddr::from(([127, 0, 0, 1], topology.ports().http)),
            connections: 32,
            users,
            timeout: Duration::from_secs(12),
            seed: 16,
            batch_percent: 10,
        }
    }
}

/// Runs `cargo xtask cluster chaos`.
pub async fn run(args: ClusterChaosArgs) -> Result<()> {
    let started = Instant::now();
    let scenarios: Vec<Scenario> = Scenario::value_variants()
        .iter()
        .copied()
        .filter(|s| args.only.is_empty() || args.only.contains(s))
        .collect();
    eprintln!("cluster chaos: building the API and the stand-in (release)");
    xtask::stack::build_release(&["api", "upstream"]).await?;
    let defaults = api::settings::Settings::load().context("cannot load the settings")?;
    let ctx = Ctx {
        options: TopologyOptions {
            dir: "target/cluster-chaos".into(),
            users: args.users,
            instance_output: args.logs,
            hosts: !args.loopback && xtask::netns::Network::available(),
            ..TopologyOptions::default()
        },
        quick: args.quick,
        deadline: defaults.service.dashboard.deadline,
    };
    std::fs::create_dir_all(LOG_DIR).with_context(|| format!("cannot create {LOG_DIR}"))?;
    let work = async {
        let mut reports = Vec::new();
        for scenario in scenarios {
            let name = scenario
                .to_possible_value()
                .map_or_else(String::new, |v| v.get_name().to_owned());
            eprintln!("cluster chaos: {name} ...");
            let began = Instant::now();
            let mut report = ScenarioReport::new(name, "");
            if let Err(error) = run_one(&ctx, scenario, &mut report).await {
                report.check("the scenario runs to the end", false, format!("{error:#}"));
            }
            report.elapsed = began.elapsed();
            println!("{}", report.render());
            reports.push(report);
        }
        anyhow::Ok(reports)
    };
    // Ctrl-C or SIGTERM drops the scenario's topology, which stops every part of it.
    let reports = tokio::select! {
        reports = work => reports?,
        signal = crate::chaos::stop_signal() => bail!("{signal}: stopped; what this run started has been stopped"),
    };
    report::finish(
        &reports,
        started.elapsed(),
        &std::path::Path::new(LOG_DIR).join("cluster-report.txt"),
    )
}

/// Starts a topology, runs the scenario on it, checks what is left behind, stops it.
async fn run_one(ctx: &Ctx, scenario: Scenario, report: &mut ScenarioReport) -> Result<()> {
    let mut topology = Topology::start(&ctx.options)
        .await
        .context("the topology did not start")?;
    report.figure(match (topology.hosts().split_first(), topology.gateway()) {
        (Some((upstream, instances)), Some(machine)) => format!(
            "hosts: instances {}, the stand-in {}, each a network namespace; nginx and \
             PgBouncer on this machine ({machine})",
            instances
                .iter()
                .map(|host| host.address.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            upstream.address
        ),
        _ => "hosts: none, everything on 127.0.0.1".to_owned(),
    });
    let users = xtask::stack::user_count(&topology.primary().url(DATABASE)?)?;
    let load = ctx.load(&topology, users);
    let t = &mut topology;
    let result = match scenario {
        Scenario::InstanceKill => instances(ctx, t, load, report, true).await,
        Scenario::RollingRestart => instances(ctx, t, load, report, false).await,
        part => outage(ctx, t, load, report, part).await,
    };
    if result.is_ok() {
        leftovers(&mut topology, report).await;
    }
    // Stopped whatever happened (dropping it would kill what runs).
    let stopped = topology.stop().await;
    result.and(stopped.context("the topology did not stop cleanly"))
}

/// An instance killed with SIGKILL and started again 4 s later, or every instance restarted in
/// turn (SIGTERM: it drains), each one ready and nginx's `fail_timeout` over before the next.
async fn instances(
    ctx: &Ctx,
    t: &mut Topology,
    load: Load,
    report: &mut ScenarioReport,
    kill: bool,
) -> Result<()> {
    report.title = if kill {
        "API instance 1 of 3 killed with SIGKILL under load, started again 4 s later"
    } else {
        "rolling restart under load: SIGTERM to each instance in turn, the next once it is ready and nginx's fail_timeout has passed"
    };
    let victims: Vec<usize> = if kill {
        vec![1]
    } else {
        (0..t.instance_count()).collect()
    };
    let running = load.start();
    let faults = async {
        sleep(ctx.phase(3, 2)).await;
        let mut steps = Vec::new();
        for i in victims {
            let began = running.elapsed();
            if kill {
                t.kill_instance(i).await?;
                sleep(ctx.phase(4, 2)).await;
            }
            t.restart_instance(i)
                .await
                .with_context(|| format!("instance {i} did not come back"))?;
            steps.push(format!(
                "instance {i} {:.0}-{:.0} ms",
                ms(began),
                ms(running.elapsed())
            ));
            // nginx left it out at its first failed attempt; it takes it back after this.
            sleep(xtask::nginx::FAIL_TIMEOUT).await;
        }
        sleep(ctx.phase(3, 2)).await;
        anyhow::Ok(steps)
    }
    .await;
    let records = running.finish().await?;
    let steps = faults?;
    report.count(&records);
    report.figure(format!(
        "{} to ready again, since the load's start: {}",
        if kill { "SIGKILL" } else { "SIGTERM" },
        steps.join(", ")
    ));
    report.figure(format!(
        "latency of all requests: {}",
        describe_latency(latencies(&records, |_| true))
    ));
    nothing_lost(report, &records);
    all_clean(
        report,
        &records,
        |_| true,
        "0 errors: every request, dashboards and batches, a complete 200",
    );
    Ok(())
}

/// The outage scenarios: one part of the topology taken down under load, held down, brought
/// back.
async fn outage(
    ctx: &Ctx,
    t: &mut Topology,
    load: Load,
    report: &mut ScenarioReport,
    part: Scenario,
) -> Result<()> {
    let (what, hold) = match part {
        Scenario::ReplicaStop => ("the replica", Duration::from_secs(5)),
        Scenario::PgbouncerRestart => ("both PgBouncers", ctx.phase(3, 2)),
        Scenario::PrimaryStop => ("the primary (the replica up)", ctx.phase(4, 3)),
        _ => ("the primary and the replica", ctx.phase(4, 3)),
    };
    report.title = match part {
        Scenario::ReplicaStop => "the replica stopped (pg_ctl stop -m fast) for 5 s under load",
        Scenario::PgbouncerRestart => {
            "both PgBouncers (primary's and replica's) stopped under load, then started again"
        }
        Scenario::PrimaryStop => {
            "the primary stopped under load, the replica up; then started again"
        }
        _ => "the primary and the replica stopped together under load, then started again",
    };
    let running = load.start();
    let faults = async {
        let start = leases(t).await?;
        sleep(ctx.phase(3, 2)).await;
        let before = leases(t).await?;
        let stopping = running.elapsed();
        set(t, part, false).await?;
        let down = running.elapsed();
        // Only the primary's outage is visible in readiness while reads go on.
        let seen_down = if part == Scenario::PrimaryStop {
            Some(primary_reach(t, "down", hold).await)
        } else {
            None
        };
        sleep(hold.saturating_sub(running.elapsed() - down)).await;
        let during = leases(t).await?;
        let repair = running.elapsed();
        set(t, part, true).await?;
        let back = running.elapsed();
        let seen_up = match seen_down {
            Some(_) => Some(primary_reach(t, "up", SETTLE).await),
            None => None,
        };
        // Health checks run each second: the second after it is back is not counted.
        sleep(Duration::from_secs(1)).await;
        let settled = leases(t).await?;
        sleep(ctx.phase(4, 3)).await;
        let after = leases(t).await?;
        let windows = [
            before.minus(&start),
            during.minus(&before),
            after.minus(&settled),
        ];
        let marks = [stopping, down, repair, back];
        anyhow::Ok((marks, windows, seen_down.zip(seen_up)))
    }
    .await;
    let records = running.finish().await?;
    let ([stopping, down, repair, back], [before, during, after], readiness) = faults?;
    report.count(&records);
    report.figure(format!(
        "{what}: stopping from {:.0} ms, down {:.0}-{:.0} ms, back (accepting connections) at {:.0} ms, since the load's start",
        ms(stopping),
        ms(down),
        ms(repair),
        ms(back)
    ));
    report.figure(format!(
        "db_leases_total of the instances: before {}; while down {}; from 1 s after it is back {}; db_replica_fallbacks_total {}",
        before.describe(),
        during.describe(),
        after.describe(),
        after.fallbacks + during.fallbacks + before.fallbacks,
    ));
    let while_down = |r: &Record| r.sent >= down && r.sent < repair;
    report.figure(format!(
        "latency of what was sent while down: {}",
        describe_latency(latencies(&records, while_down))
    ));
    nothing_lost(report, &records);
    match part {
        Scenario::ReplicaStop => {
            all_clean(
                report,
                &records,
                |_| true,
                "0 × 5xx: every request a complete 200",
            );
            report.check(
                "reads fall back to the primary while the replica is down (≥ 90% of leases)",
                during.primary > 0.0 && during.primary_share() >= 0.9,
                format!("{:.1}% on the primary", 100.0 * during.primary_share()),
            );
            report.check(
                "reads go back to the replica after (≥ 90% of leases from 1 s after its start)",
                after.replica > 0.0 && after.primary_share() <= 0.1,
                format!(
                    "{:.1}% on the replica",
                    100.0 * (1.0 - after.primary_share())
                ),
            );
        }
        Scenario::PrimaryStop => {
            all_clean(
                report,
                &records,
                while_down,
                "reads keep working from the replica: every request while the primary is down a complete 200",
            );
            all_clean(
                report,
                &records,
                |_| true,
                "every request of the run a complete 200",
            );
            if let Some((seen_down, seen_up)) = readiness {
                report.check(
                    "every instance's /readyz answers 200 and says the primary is down",
                    seen_down.is_ok(),
                    seen_down.unwrap_or_else(|e| e),
                );
                report.check(
                    "every instance's /readyz says the primary is up once it is back",
                    seen_up.is_ok(),
                    seen_up.unwrap_or_else(|e| e),
                );
            }
        }
        _ => {
            fast_503s(ctx, report, &records, down, repair);
            let slowest = records
                .iter()
                .filter(|r| r.sent >= stopping && r.sent < repair)
                .map(|r| r.latency)
                .max()
                .unwrap_or_default();
            report.check(
                format!(
                    "no hang: nothing sent from the stop on waits longer than the dashboard's deadline ({} ms) + {} ms for the way back",
                    ctx.deadline.as_millis(),
                    ANSWER_SLACK.as_millis()
                ),
                slowest <= ctx.deadline + ANSWER_SLACK,
                format!("slowest {:.0} ms", ms(slowest)),
            );
            recovered(report, &records, back, what);
        }
    }
    Ok(())
}

/// Takes down (`up: false`) or brings back the part of the topology an outage scenario is
/// about. PostgreSQL is stopped with `pg_ctl stop -m fast`, PgBouncer with SIGTERM.
async fn set(t: &mut Topology, part: Scenario, up: bool) -> Result<()> {
    let replica = t.replica().cloned();
    let replica = || replica.as_ref().context("no replica");
    match part {
        Scenario::ReplicaStop => pg_ctl(replica()?, up).await,
        Scenario::PrimaryStop => pg_ctl(t.primary(), up).await,
        Scenario::DatabasesStop => {
            let (p, r) = tokio::join!(pg_ctl(t.primary(), up), pg_ctl(replica()?, up));
            p.and(r)
        }
        _ => {
            if up {
                t.pgbouncer().restart().await?;
            } else {
                t.pgbouncer().stop().await?;
            }
            match t.replica_pgbouncer() {
                Some(bouncer) if up => bouncer.restart().await,
                Some(bouncer) => bouncer.stop().await,
                None => Ok(()),
            }
        }
    }
}

/// Lost: no complete answer, or a 5xx that is not the API's own JSON error (nginx's).
fn is_lost(record: &Record) -> bool {
    match &record.outcome {
        Outcome::Answered { status, code, .. } => *status >= 500 && code.is_none(),
        Outcome::NotConnected(_) | Outcome::Lost(_) => true,
    }
}

/// Counts the lost requests into the report and checks there are none.
fn nothing_lost(report: &mut ScenarioReport, records: &[Record]) {
    report.lost = records.iter().filter(|r| is_lost(r)).count() as u64;
    expect_all(
        report,
        records,
        |_| true,
        |r| !is_lost(r),
        "no request lost (no answer, or a 5xx from nginx), dashboards and batches alike",
    );
}

/// Checks that every record that `keep` picks is a complete 200.
fn all_clean(
    report: &mut ScenarioReport,
    records: &[Record],
    keep: impl Fn(&Record) -> bool,
    expectation: &str,
) {
    expect_all(report, records, keep, |r| r.outcome.is_clean(), expectation);
}

/// Checks that every record that `keep` picks is `ok` (and that there are some), listing the
/// first few that are not.
fn expect_all(
    report: &mut ScenarioReport,
    records: &[Record],
    keep: impl Fn(&Record) -> bool,
    ok: impl Fn(&Record) -> bool,
    expectation: &str,
) {
    let picked: Vec<&Record> = records.iter().filter(|r| keep(r)).collect();
    let failed: Vec<&Record> = picked.iter().copied().filter(|r| !ok(r)).collect();
    let labels: Vec<String> = failed.iter().map(|r| r.label()).collect();
    let mut evidence = format!("{} of {} were not", failed.len(), picked.len());
    if !failed.is_empty() {
        evidence = format!(
            "{evidence}: {}; first: {}",
            sample(&labels),
            first_few(&failed)
        );
    }
    report.check(
        expectation,
        !picked.is_empty() && failed.is_empty(),
        evidence,
    );
}

/// The first few of `records`: what each got, when it was sent and how long it took.
fn first_few(records: &[&Record]) -> String {
    let each: Vec<String> = records
        .iter()
        .take(3)
        .map(|r| {
            let message = match &r.outcome {
                Outcome::Answered {
                    code: Some(code),
                    message,
                    ..
                } => format!(" `{code}` {:?}", message.as_deref().unwrap_or("")),
                _ => String::new(),
            };
            format!(
                "{}{message} sent at {:.0} ms, after {:.0} ms",
                r.label(),
                ms(r.sent),
                ms(r.latency)
            )
        })
        .collect();
    each.join("; ")
}

/// Checks that what was sent while nothing could answer (`down` to `repair`) got the API's
/// `503 unavailable` with `Retry-After`, and quickly.
fn fast_503s(
    ctx: &Ctx,
    report: &mut ScenarioReport,
    records: &[Record],
    down: Duration,
    repair: Duration,
) {
    expect_all(
        report,
        records,
        |r| r.sent >= down && r.sent < repair,
        |r| {
            matches!(&r.outcome, Outcome::Answered { status: 503, code, retry_after: Some(_), .. }
                if code.as_deref() == Some("unavailable"))
        },
        "while down: every request answers 503 `unavailable` with Retry-After",
    );
    let all_503 = latencies(records, |r| r.outcome.status() == Some(503));
    report.figure(format!(
        "latency of the 503s: {}",
        describe_latency(all_503.clone())
    ));
    let quick = ctx.deadline / 2;
    let p99 = percentiles(all_503).map(|(_, p99, _)| p99);
    report.check(
        format!("the 503s come fast (p99 under {} ms)", quick.as_millis()),
        p99.is_some_and(|p99| p99 < quick),
        p99.map_or("no 503 at all".to_owned(), |p| {
            format!("p99 {:.1} ms", ms(p))
        }),
    );
}

/// Checks that every request is a complete 200 again within [`RECOVERY_BOUND`] of `back`.
fn recovered(report: &mut ScenarioReport, records: &[Record], back: Duration, what: &str) {
    let (recovery, clean_after) = report::recovery(records, back);
    report.recovery = Some(recovery);
    let late: Vec<&Record> = records
        .iter()
        .filter(|r| r.sent >= back && !r.outcome.is_clean())
        .collect();
    if !late.is_empty() {
        report.figure(format!("failures after it is back: {}", first_few(&late)));
    }
    report.check(
        format!(
            "full recovery within {} s after {what}",
            RECOVERY_BOUND.as_secs()
        ),
        recovery <= RECOVERY_BOUND && clean_after > 0,
        format!(
            "last failure ended {:.0} ms after, {clean_after} complete 200s after it",
            ms(recovery)
        ),
    );
}

/// Stops (`up: false`) or starts a cluster on a blocking thread (pg_ctl waits), so the load goes
/// on meanwhile.
async fn pg_ctl(cluster: &Cluster, up: bool) -> Result<()> {
    let cluster = cluster.clone();
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        if up {
            runtime.block_on(cluster.start())
        } else {
            cluster.stop().map(drop)
        }
    })
    .await
    .context("the pg_ctl thread failed")?
}

/// Connection leases handed out by every instance together, by database.
#[derive(Debug, Clone, Copy)]
struct Leases {
    primary: f64,
    replica: f64,
    fallbacks: f64,
}

impl Leases {
    fn minus(&self, earlier: &Self) -> Self {
        Self {
            primary: self.primary - earlier.primary,
            replica: self.replica - earlier.replica,
            fallbacks: self.fallbacks - earlier.fallbacks,
        }
    }

    fn primary_share(&self) -> f64 {
        self.primary / (self.primary + self.replica).max(1.0)
    }

    fn describe(&self) -> String {
        format!("primary {:.0}, replica-1 {:.0}", self.primary, self.replica)
    }
}

/// The instances' `db_leases_total` and `db_replica_fallbacks_total`, summed.
async fn leases(t: &Topology) -> Result<Leases> {
    let mut sum = Leases {
        primary: 0.0,
        replica: 0.0,
        fallbacks: 0.0,
    };
    for i in 0..t.instance_count() {
        let m = metrics_at(instance_addr(t, i)).await?;
        let get = |name: &str| {
            let value = m.get(name);
            if value.is_nan() { 0.0 } else { value }
        };
        sum.primary += get(r#"db_leases_total{database="primary"}"#);
        sum.replica += get(r#"db_leases_total{database="replica-1"}"#);
        sum.fallbacks += get(r#"db_replica_fallbacks_total{database="replica-1"}"#);
    }
    Ok(sum)
}

fn instance_addr(t: &Topology, i: usize) -> SocketAddr {
    t.instance_address(i)
}

/// Polls every instance's `/readyz` at once until each answers 200 with the primary's `reach` as
/// `expected`, for at most `within`. `Ok` says how long each took, `Err` what the last answers
/// were.
async fn primary_reach(
    t: &Topology,
    expected: &str,
    within: Duration,
) -> std::result::Result<String, String> {
    let started = Instant::now();
    let poll = |i: usize| async move {
        let mut last = String::new();
        while started.elapsed() < within {
            let request = client::get("/readyz", false);
            last = match client::fetch(instance_addr(t, i), &request, Duration::from_secs(2)).await
            {
                Ok(answer) => {
                    let reach = serde_json::from_slice::<serde_json::Value>(&answer.body)
                        .ok()
                        .and_then(|v| {
                            let databases = v["databases"].as_array()?.clone();
                            databases.into_iter().find(|d| d["name"] == "primary")
                        })
                        .and_then(|d| d["reach"].as_str().map(str::to_owned))
                        .unwrap_or_else(|| "?".to_owned());
                    if answer.status == 200 && reach == expected {
                        return Ok(format!(
                            "instance {i} after {:.0} ms",
                            ms(started.elapsed())
                        ));
                    }
                    format!("{} primary {reach}", answer.status)
                }
                Err(lost) => lost.failure.as_str().to_owned(),
            };
            sleep(Duration::from_millis(100)).await;
        }
        Err(format!("instance {i} still {last}"))
    };
    let each = futures::future::join_all((0..t.instance_count()).map(poll)).await;
    let text: Vec<&str> = each
        .iter()
        .map(|r| r.as_deref().unwrap_or_else(|e| e))
        .collect();
    if each.iter().all(std::result::Result::is_ok) {
        Ok(text.join(", "))
    } else {
        Err(text.join(", "))
    }
}

/// Checks, once the load has stopped, that nothing is left behind within [`SETTLE`]: no live
/// task-group children nor requests in flight in any instance; no session `active` or `idle in
/// transaction` in either database; no PgBouncer server linked to a client, no client waiting.
/// A part that does not answer fails the check, with what it said last.
async fn leftovers(t: &mut Topology, report: &mut ScenarioReport) {
    let started = Instant::now();
    let mut states = Vec::new();
    let mut quiet = true;
    for i in 0..t.instance_count() {
        loop {
            let (done, state) = match metrics_at(instance_addr(t, i)).await {
                Ok(m) => (
                    m.get("taskgroup_live_children") == 0.0
                        && m.get("http_requests_in_flight") <= 1.0,
                    m.state_line(),
                ),
                Err(e) => (false, format!("{e:#}")),
            };
            if done || started.elapsed() >= SETTLE {
                quiet &= done;
                states.push(format!("instance {i}: {state}"));
                break;
            }
            sleep(Duration::from_millis(50)).await;
        }
    }
    report.after = states.join("; ");
    report.check(
        "every instance: no live task-group children, no request in flight",
        quiet,
        format!("settled after {:.0} ms", ms(started.elapsed())),
    );
    let started = Instant::now();
    let (clean, sessions) = loop {
        let (clean, sessions) = sessions(t);
        if clean || started.elapsed() >= SETTLE {
            break (clean, sessions);
        }
        sleep(Duration::from_millis(100)).await;
    };
    report.check(
        "no leaked server session (none active or idle in transaction; no PgBouncer server linked, no client waiting)",
        clean,
        sessions,
    );
}

/// The API's sessions in both databases by state, and PgBouncer's servers and clients by state;
/// and whether none is busy and every part answered.
fn sessions(t: &mut Topology) -> (bool, String) {
    const SQL: &str = "SELECT coalesce(state, '?'), count(*) FROM pg_stat_activity \
        WHERE datname = current_database() AND backend_type = 'client backend' \
        AND pid <> pg_backend_pid() GROUP BY 1 ORDER BY 1";
    let mut clean = true;
    let mut parts = Vec::new();
    for (name, cluster) in [("primary", Some(t.primary())), ("replica", t.replica())] {
        let Some(cluster) = cluster else { continue };
        match cluster.psql(DATABASE, SQL) {
            Ok(rows) => {
                clean &= !rows
                    .lines()
                    .any(|l| l.starts_with("active|") || l.starts_with("idle in transaction"));
                let rows: Vec<&str> = rows.lines().collect();
                parts.push(format!("{name} sessions {}", rows.join(" ")));
            }
            Err(e) => {
                clean = false;
                parts.push(format!("{name} does not answer: {e:#}"));
            }
        }
    }
    for (name, replica) in [("primary", false), ("replica", true)] {
        if replica && t.replica().is_none() {
            continue;
        }
        let by_state = |command: &str| -> Result<String> {
            let rows = t.pgbouncer_admin(replica, command)?;
            let states: Vec<String> = rows
                .lines()
                .filter_map(|l| {
                    let columns: Vec<&str> = l.split('|').collect();
                    (columns.get(2) == Some(&DATABASE)).then(|| columns[3].to_owned())
                })
                .collect();
            Ok(sample(&states))
        };
        match (by_state("SHOW SERVERS"), by_state("SHOW CLIENTS")) {
            (Ok(servers), Ok(clients)) => {
                clean &= !servers.contains("active") && !clients.contains("waiting");
                parts.push(format!(
                    "PgBouncer→{name} servers [{servers}] clients [{clients}]"
                ));
            }
            (Err(e), _) | (_, Err(e)) => {
                clean = false;
                let bouncer = if replica {
                    t.replica_pgbouncer().map(|b| b.log_file())
                } else {
                    Some(t.pgbouncer().log_file())
                };
                let log = bouncer.map_or_else(String::new, |file| {
                    xtask::topology::tail(&file, 2).replace('\n', " / ")
                });
                parts.push(format!(
                    "PgBouncer→{name} does not answer ({e:#}); its log ends: {log}"
                ));
            }
        }
    }
    (clean, parts.join("; "))
}
