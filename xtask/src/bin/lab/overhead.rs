//! `cargo xtask bench overhead`: what the service's features cost, against a bare handler and
//! PostgreSQL's own ceiling, in one run, measured with tools we did not write.
//!
//! The bare handler (`bench/baseline`) does what a dashboard needs and nothing else: the same
//! three SELECTs pipelined on one pooled connection, the same upstream call, `tokio::join!`, the
//! same JSON. The service and the baseline run in turn on the same database and stand-in
//! (upstream at 0 ms), each under wrk (Debian's, ids drawn uniformly from every user by a Lua
//! script, then once with Zipf-distributed ids) and under this project's load generator, for the
//! same time and connections; pgbench runs the same three statements with the same client count.
//! "CPU per dashboard" is the server's user+sys time over the measured window (`/proc`) divided
//! by the dashboards answered. With `--callgrind`, each server also runs under valgrind for an
//! instruction count per dashboard, repeatable on a noisy machine.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};

use crate::perf::{Bench, PerfArgs};
use xtask::stack;

/// A Lua script for wrk: ids drawn uniformly from 1 to `USERS`.
/// Each of wrk's threads gets its own seed: with one seed, both threads would ask for the same
/// ids at the same moments, which flatters coalescing.
pub(crate) const UNIFORM: &str = r#"local users = tonumber(os.getenv("USERS"))
local threads = 0
function setup(thread) threads = threads + 1; thread:set("tid", threads) end
function init(args) math.randomseed(tonumber(os.getenv("SEED") or "7") * 1000 + tid) end
request = function()
  return wrk.format("GET", "/api/users/" .. math.random(1, users) .. "/dashboard")
end
"#;

/// A Lua script for wrk: ids drawn from a Zipf distribution (s = 1.1) over 1 to `USERS`, by
/// inverting a precomputed cumulative table (a few hot users, a long tail).
const ZIPF: &str = r#"local users = tonumber(os.getenv("USERS"))
local threads = 0
function setup(thread) threads = threads + 1; thread:set("tid", threads) end
function init(args) math.randomseed(tonumber(os.getenv("SEED") or "7") * 1000 + tid) end
local n = math.min(users, 100000)
local cdf, total = {}, 0
for k = 1, n do total = total + 1 / k ^ 1.1; cdf[k] = total end
request = function()
  local u, lo, hi = math.random() * total, 1, n
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if cdf[mid] < u then lo = mid + 1 else hi = mid end
  end
  return wrk.format("GET", "/api/users/" .. lo .. "/dashboard")
end
"#;

/// Which server a run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Service,
    Coalesced,
    Baseline,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Service => "service",
            Target::Coalesced => "service-coalesced",
            Target::Baseline => "baseline",
        }
    }
}

/// One measured run of one server.
#[derive(Debug, Clone, Copy)]
struct Run {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us: f64,
    /// The server's peak resident memory so far (`VmHWM`), in MiB.
    rss_mib: f64,
}

/// `cargo xtask bench overhead`.
pub async fn run(args: PerfArgs, callgrind: bool) -> Result<()> {
    let bench = Bench::start(&args, Duration::ZERO).await?;
    let result = measure_all(&bench, &args, callgrind).await;
    bench.stop().await;
    result
}

const TARGETS: [Target; 3] = [Target::Service, Target::Coalesced, Target::Baseline];

async fn measure_all(bench: &Bench, args: &PerfArgs, callgrind: bool) -> Result<()> {
    build_baseline().await?;
    let dir = PathBuf::from("target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("uniform.lua"), UNIFORM)?;
    std::fs::write(dir.join("zipf.lua"), ZIPF)?;
    let users = bench.users();
    let seconds = args.duration();
    let connections = args.connections();
    let upstream = bench.upstream_url();
    let load = |script: &'static str, connections: usize, seconds: u64| Load {
        script,
        users,
        connections,
        seconds,
    };
    let mut wrk_runs: Vec<(Target, Run)> = Vec::new();
    let mut ours: Vec<(Target, f64)> = Vec::new();
    let mut zipf: Vec<(Target, Run)> = Vec::new();
    for round in 1..=args.rounds() {
        for target in TARGETS {
            let (mut child, address) = start(bench, target, &upstream).await?;
            let pid = child.id().context("the server has no pid")?;
            load("uniform.lua", connections, 5).wrk(&address).await?;
            let run =
                measured(pid, load("uniform.lua", connections, seconds).wrk(&address)).await?;
            println!(
                "round {round} {}: wrk {:.0} req/s, p99 {:.1} ms, {:.1} µs CPU per dashboard, peak RSS {:.0} MiB",
                target.name(),
                run.rps,
                run.p99_ms,
                run.cpu_us,
                run.rss_mib
            );
            wrk_runs.push((target, run));
            let generated =
                bench.load_url(&format!("http://{address}"), loadtest::Scenario::Dashboard);
            let report = loadtest::run(&generated, loadtest::Progress::Off)
                .await
                .context("the load generator failed")?;
            ours.push((target, report.measured.success_rps));
            if round == 1 {
                let run =
                    measured(pid, load("zipf.lua", connections, seconds).wrk(&address)).await?;
                zipf.push((target, run));
            }
            stop(&mut child).await;
        }
    }
    let pgbench = crate::perf::pgbench_tps(bench).await?;
    let median = |target: Target, pick: fn(&Run) -> f64| {
        let mut values: Vec<f64> = wrk_runs
            .iter()
            .filter(|(t, _)| *t == target)
            .map(|(_, run)| pick(run))
            .collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let ours_median = |target: Target| {
        let mut values: Vec<f64> = ours
            .iter()
            .filter(|(t, _)| *t == target)
            .map(|(_, rps)| *rps)
            .collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };

    // Low load (one connection: any batching delay would show in p50) and a slow upstream.
    let mut alone: Vec<(Target, Run)> = Vec::new();
    let mut slow: Vec<(Target, Run)> = Vec::new();
    let slow_upstream = upstream::Server::start(upstream::Config {
        delay: SLOW_UPSTREAM,
        ..upstream::Config::default()
    })
    .await
    .context("cannot start the slow stand-in")?;
    for target in TARGETS {
        let (mut child, address) = start(bench, target, &upstream).await?;
        let pid = child.id().context("the server has no pid")?;
        load("uniform.lua", 1, 2).wrk(&address).await?;
        alone.push((
            target,
            measured(pid, load("uniform.lua", 1, seconds).wrk(&address)).await?,
        ));
        stop(&mut child).await;
        let (mut child, address) = start(bench, target, &slow_upstream.base_url()).await?;
        let pid = child.id().context("the server has no pid")?;
        load("uniform.lua", connections, 5).wrk(&address).await?;
        slow.push((
            target,
            measured(pid, load("uniform.lua", connections, seconds).wrk(&address)).await?,
        ));
        stop(&mut child).await;
    }
    slow_upstream.shutdown().await;
    let find = |runs: &[(Target, Run)], target: Target| {
        runs.iter()
            .find(|(t, _)| *t == target)
            .map(|(_, r)| *r)
            .context("a run is missing")
    };

    println!(
        "\n| c{connections}, upstream at 0 ms | wrk, uniform ids: dashboards/s | p99 | CPU per dashboard | peak RSS | wrk, Zipf ids | this project's generator |\n|---|---:|---:|---:|---:|---:|---:|"
    );
    for target in TARGETS {
        let z = find(&zipf, target)?;
        println!(
            "| {} | {:.0} | {:.1} ms | {:.1} µs | {:.0} MiB | {:.0} | {:.0} |",
            target.name(),
            median(target, |r| r.rps),
            median(target, |r| r.p99_ms),
            median(target, |r| r.cpu_us),
            median(target, |r| r.rss_mib),
            z.rps,
            ours_median(target)
        );
    }
    println!(
        "| pgbench, the same 3 SELECTs, `-M prepared -c{connections}` | {pgbench:.0} tx/s | | | | | |"
    );
    println!(
        "\n| | one connection: p50 | c{connections}, upstream at {} ms: p50 | p99 | dashboards/s |\n|---|---:|---:|---:|---:|",
        SLOW_UPSTREAM.as_millis()
    );
    for target in TARGETS {
        let (a, s) = (find(&alone, target)?, find(&slow, target)?);
        println!(
            "| {} | {:.2} ms | {:.1} ms | {:.1} ms | {:.0} |",
            target.name(),
            a.p50_ms,
            s.p50_ms,
            s.p99_ms,
            s.rps
        );
    }
    println!(
        "\nservice / baseline: throughput {:.2}x (target >= 0.90), CPU per dashboard {:.2}x (target <= 1.10); medians of {} rounds",
        median(Target::Service, |r| r.rps) / median(Target::Baseline, |r| r.rps),
        median(Target::Service, |r| r.cpu_us) / median(Target::Baseline, |r| r.cpu_us),
        args.rounds()
    );
    println!(
        "coalesced / per-request: throughput {:.2}x; coalesced / pgbench ceiling: {:.2}x (target >= 1.0); one connection p50 {:.2}x (target <= 1.05)",
        median(Target::Coalesced, |r| r.rps) / median(Target::Service, |r| r.rps),
        median(Target::Coalesced, |r| r.rps) / pgbench.max(1e-9),
        find(&alone, Target::Coalesced)?.p50_ms / find(&alone, Target::Service)?.p50_ms.max(1e-9)
    );
    if callgrind {
        for target in TARGETS {
            let per = instructions(bench, target, users).await?;
            println!(
                "{}: {per:.0} instructions per dashboard (callgrind)",
                target.name()
            );
        }
    }
    Ok(())
}

/// The upstream latency of the slow-upstream runs.
const SLOW_UPSTREAM: Duration = Duration::from_millis(50);

async fn build_baseline() -> Result<()> {
    let built = Command::new(xtask::stack::cargo())
        .args(["build", "--release", "--quiet", "--package", "baseline"])
        .status()
        .await
        .context("cannot run cargo build")?;
    if !built.success() {
        bail!("building the baseline failed");
    }
    Ok(())
}

/// The command that runs `target`, listening on `port`, under `wrapper` (a program and its
/// options) if one is given.
fn command(
    bench: &Bench,
    target: Target,
    upstream: &str,
    port: u16,
    wrapper: &[String],
) -> Result<Command> {
    let (binary, env): (&str, Vec<(&str, String)>) = match target {
        Target::Service | Target::Coalesced => (
            "target/release/api",
            vec![
                ("APP__SERVER__PORT", port.to_string()),
                ("APP__RECOMMENDATIONS__BASE_URL", upstream.to_owned()),
                ("APP__TELEMETRY__LEVEL", "warn".to_owned()),
                (
                    "APP__SERVICE__QUERY_MODE",
                    if target == Target::Coalesced {
                        "coalesced"
                    } else {
                        "pipelined"
                    }
                    .to_owned(),
                ),
            ],
        ),
        Target::Baseline => (
            "target/release/baseline",
            vec![
                ("PORT", port.to_string()),
                ("UPSTREAM_URL", upstream.to_owned()),
                ("DATABASE_URL", bench.database_url()?),
                (
                    "WORKERS",
                    std::thread::available_parallelism()
                        .map_or(1, usize::from)
                        .to_string(),
                ),
            ],
        ),
    };
    let mut command = match wrapper.split_first() {
        Some((program, options)) => {
            let mut command = Command::new(program);
            command.args(options).arg(binary);
            command
        }
        None => Command::new(binary),
    };
    let log = std::fs::File::create(format!("target/bench/{}.log", target.name()))?;
    command
        .envs(env)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true);
    Ok(command)
}

async fn start(bench: &Bench, target: Target, upstream: &str) -> Result<(Child, String)> {
    let port = stack::free_port()?;
    let child = command(bench, target, upstream, port, &[])?
        .spawn()
        .with_context(|| format!("cannot start the {}", target.name()))?;
    let address = format!("127.0.0.1:{port}");
    ready(&address, Duration::from_secs(30)).await?;
    Ok((child, address))
}

async fn ready(address: &str, within: Duration) -> Result<()> {
    let until = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < until {
        if stack::answers_200(address, "/api/users/1/dashboard").await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{address} did not answer a dashboard within {within:?}")
}

async fn stop(child: &mut Child) {
    let _ = child.start_kill();
    let _ = child.wait().await;
}

/// The process's user+sys CPU time, from `/proc/PID/stat`.
fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are the 14th and 15th fields of the line, 12th and 13th after the name.
    let total = ticks(11) + ticks(12);
    Ok(Duration::from_secs_f64(total as f64 / clock_ticks() as f64))
}

fn clock_ticks() -> u64 {
    // The kernel's USER_HZ, which is 100 on every Linux this runs on; `getconf CLK_TCK` agrees.
    100
}

/// Runs `load` while measuring the server's CPU time.
async fn measured(pid: u32, load: impl Future<Output = Result<Wrk>>) -> Result<Run> {
    let before = cpu_time(pid)?;
    let wrk = load.await?;
    let after = cpu_time(pid)?;
    let cpu = after.saturating_sub(before);
    Ok(Run {
        rps: wrk.requests as f64 / wrk.seconds,
        p50_ms: wrk.p50_ms,
        p99_ms: wrk.p99_ms,
        cpu_us: cpu.as_secs_f64() * 1e6 / (wrk.requests.max(1) as f64),
        rss_mib: peak_rss_mib(pid)?,
    })
}

/// The process's peak resident set (`VmHWM` in `/proc/PID/status`), in MiB.
fn peak_rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmHWM in /proc/PID/status")?;
    Ok(kib / 1024.0)
}

/// One wrk run: which script (in `target/bench`), over how many users, with how many
/// connections, for how long.
pub(crate) struct Load {
    pub(crate) script: &'static str,
    pub(crate) users: u64,
    pub(crate) connections: usize,
    pub(crate) seconds: u64,
}

/// What one wrk run reports.
pub(crate) struct Wrk {
    pub(crate) requests: u64,
    pub(crate) seconds: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    /// Answers that were not 2xx or 3xx, and socket errors (timeouts included).
    pub(crate) errors: u64,
}

impl Load {
    /// Runs wrk against `http://address`; an answer that is not 2xx is an error.
    async fn wrk(&self, address: &str) -> Result<Wrk> {
        let wrk = self.wrk_url(&format!("http://{address}")).await?;
        if wrk.errors > 0 {
            bail!("wrk saw {} non-2xx answers or socket errors", wrk.errors);
        }
        Ok(wrk)
    }

    /// Runs wrk against `url` (`http://…` or `https://…`, whose certificate wrk does not check).
    ///
    /// # Errors
    ///
    /// When wrk cannot run or fails.
    pub(crate) async fn wrk_url(&self, url: &str) -> Result<Wrk> {
        let threads = self.connections.clamp(1, 2);
        let output = Command::new("wrk")
            .args([
                &format!("-t{threads}"),
                &format!("-c{}", self.connections),
                &format!("-d{}s", self.seconds),
                "--latency",
            ])
            .args([
                "-s",
                &Path::new("target/bench")
                    .join(self.script)
                    .display()
                    .to_string(),
            ])
            .arg(url)
            .env("USERS", self.users.to_string())
            .output()
            .await
            .context("cannot run wrk (Debian package wrk)")?;
        let text = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            bail!(
                "wrk failed: {text}{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        // "Non-2xx or 3xx responses: N" and "Socket errors: connect N, read N, write N, timeout N".
        let errors = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
            .chain(
                text.lines()
                    .filter_map(|l| l.trim().strip_prefix("Socket errors:")),
            )
            .flat_map(|rest| {
                rest.split(',')
                    .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
            })
            .sum();
        let requests = text
            .lines()
            .find(|l| l.contains("requests in"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("no request count in wrk's output:\n{text}"))?;
        let percentile = |p: &str| {
            text.lines()
                .find(|l| l.trim_start().starts_with(p))
                .and_then(|l| l.split_whitespace().nth(1))
                .map_or(0.0, parse_wrk_duration)
        };
        Ok(Wrk {
            requests,
            seconds: self.seconds as f64,
            p50_ms: percentile("50%"),
            p99_ms: percentile("99%"),
            errors,
        })
    }
}

fn parse_wrk_duration(text: &str) -> f64 {
    let (number, unit) = text.split_at(
        text.find(|c: char| c.is_ascii_alphabetic())
            .unwrap_or(text.len()),
    );
    let value: f64 = number.parse().unwrap_or(0.0);
    match unit {
        "us" => value / 1000.0,
        "s" => value * 1000.0,
        _ => value,
    }
}

/// Instructions per dashboard under callgrind: counters zeroed after a warm-up, dumped after a
/// measured wrk window, divided by the dashboards answered in it.
async fn instructions(bench: &Bench, target: Target, users: u64) -> Result<f64> {
    let port = stack::free_port()?;
    let out = PathBuf::from(format!("target/bench/callgrind.{}", target.name()));
    let _ = std::fs::remove_file(&out);
    let wrapper = [
        "valgrind".to_owned(),
        "--tool=callgrind".to_owned(),
        format!("--callgrind-out-file={}", out.display()),
    ];
    let mut child = command(bench, target, &bench.upstream_url(), port, &wrapper)?
        .spawn()
        .context("cannot run valgrind")?;
    let pid = child.id().context("valgrind has no pid")?.to_string();
    let address = format!("127.0.0.1:{port}");
    ready(&address, Duration::from_secs(120)).await?;
    let load = |seconds| Load {
        script: "uniform.lua",
        users,
        connections: 4,
        seconds,
    };
    load(10).wrk(&address).await?;
    control(&["-z", &pid]).await?;
    let window = load(20).wrk(&address).await?;
    control(&["-d", &pid]).await?;
    stop(&mut child).await;
    let dump = std::fs::read_dir("target/bench")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("callgrind.{}.", target.name())))
        })
        .context("callgrind wrote no dump")?;
    let text = std::fs::read_to_string(&dump)?;
    let total: u64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("summary: ")
                .or_else(|| l.strip_prefix("totals: "))
        })
        .and_then(|n| n.trim().parse().ok())
        .context("no totals in the callgrind dump")?;
    Ok(total as f64 / window.requests.max(1) as f64)
}

async fn control(args: &[&str]) -> Result<()> {
    let status = Command::new("callgrind_control")
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .await
        .context("cannot run callgrind_control")?;
    if !status.success() {
        bail!("callgrind_control {} failed", args.join(" "));
    }
    Ok(())
}
