//! The `loadtest` binary (`cargo xtask loadtest`): load the service (or the stand-in upstream)
//! and report on it.
//!
//! The generator is this crate's library; the binary turns flags into its configuration, prints
//! the summary, writes the JSON and SVG reports, and applies `--check` and `--compare`.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use ::loadtest::{
    Checks, Config, Distribution, Engine, Mix, Progress, Report, RuntimeFlavor, Scenario,
};
use anyhow::{Context as _, Result, bail};

/// Load the dashboard service (or the stand-in upstream) and report latency, throughput and
/// errors.
#[derive(Debug, clap::Parser)]
#[command(name = "loadtest")]
struct Args {
    /// Base URL [default: http://127.0.0.1:8000, or http://127.0.0.1:9100 for --scenario
    /// recommendations].
    #[arg(long)]
    url: Option<String>,
    /// What to request: dashboard, batch, mixed (weighted by --mix), or recommendations (the
    /// stand-in upstream's own endpoint).
    #[arg(long, default_value = "dashboard")]
    scenario: Scenario,
    /// Request weights for --scenario mixed, e.g. dashboard=90,batch=10.
    #[arg(long, default_value = "dashboard=90,batch=10")]
    mix: Mix,
    /// How long to measure, after the warm-up (e.g. 30s, 2m).
    #[arg(long, default_value = "30s", value_parser = ::loadtest::parse_duration)]
    duration: Duration,
    /// Keep-alive connections; in closed loop also the number of requests in flight.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Open loop: total arrival rate in requests per second, with latency counted from each
    /// request's scheduled send. Without it the load is closed loop.
    #[arg(long)]
    rate: Option<f64>,
    /// User ids are drawn from 1..=USERS.
    #[arg(long, default_value_t = 100_000)]
    users: u64,
    /// Ids per batch request.
    #[arg(long, default_value_t = 50)]
    batch_size: usize,
    /// How ids are drawn: uniform, or zipf[:S] for hot users (id 1 is the hottest; S defaults
    /// to 1.0).
    #[arg(long, default_value = "uniform")]
    distribution: Distribution,
    /// Seed of the id and mix draws: the same seed sends the same ids on each connection.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Warm-up before measuring; its requests are reported apart and excluded from every figure.
    #[arg(long, default_value = "5s", value_parser = ::loadtest::parse_duration)]
    warmup: Duration,
    /// Per-request timeout, covering connect, send and the whole answer; it also bounds the
    /// drain at the end of the run.
    #[arg(long, default_value = "5s", value_parser = ::loadtest::parse_duration)]
    timeout: Duration,
    /// Worker threads [default: the number of cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Thread layout: current-thread (one runtime per worker thread) or multi-thread (one shared
    /// runtime).
    #[arg(long, default_value = "current-thread")]
    runtime: RuntimeFlavor,
    /// How requests travel: raw (HTTP/1.1 written on the socket, as wrk does) or hyper (hyper's
    /// client: more CPU per request, kept to cross-check the raw engine).
    #[arg(long, default_value = "raw")]
    engine: Engine,
    /// Directory for the JSON and SVG reports.
    #[arg(long, default_value = "target/loadtest")]
    out: PathBuf,
    /// File name of the reports, without extension [default: the scenario].
    #[arg(long)]
    name: Option<String>,
    /// Thresholds that must hold, e.g. 'p99<50ms,error_rate<0.1%'; with --rate the run must also
    /// have kept up with it (add allow_behind to waive that). The command exits non-zero when
    /// one is missed.
    #[arg(long)]
    check: Option<Checks>,
    /// A JSON report of an earlier run, printed side by side with this run; give two to compare
    /// them without running.
    #[arg(long)]
    compare: Vec<PathBuf>,
    /// Do not draw the live progress line.
    #[arg(long)]
    quiet: bool,
}

impl Args {
    fn config(&self) -> Config {
        let defaults = Config::default();
        Config {
            url: self
                .url
                .clone()
                .unwrap_or_else(|| self.scenario.default_url().to_owned()),
            scenario: self.scenario,
            mix: self.mix.clone(),
            duration: self.duration,
            warmup: self.warmup,
            connections: self.connections,
            rate: self.rate,
            users: self.users,
            batch_size: self.batch_size,
            distribution: self.distribution,
            seed: self.seed,
            timeout: self.timeout,
            threads: self.threads.unwrap_or(defaults.threads),
            runtime: self.runtime,
            engine: self.engine,
        }
    }
}

fn read(path: &Path) -> Result<(String, Report)> {
    let report = ::loadtest::read(path).context("cannot use the --compare report")?;
    Ok((path.display().to_string(), report))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = <Args as clap::Parser>::parse();
    if args.compare.len() > 2 {
        bail!("--compare takes one report (compared with this run) or two (with each other)");
    }
    // Read the reports to compare with first, so a wrong path fails before a long run.
    let baselines = args
        .compare
        .iter()
        .map(|path| read(path))
        .collect::<Result<Vec<_>>>()?;
    if let [(a_label, a), (b_label, b)] = baselines.as_slice() {
        if args.check.is_some() {
            bail!("--check needs a run, and two --compare reports mean no run");
        }
        print!("{}", ::loadtest::compare(a, a_label, b, b_label));
        return Ok(());
    }
    let config = args.config();
    let progress = if args.quiet {
        Progress::Off
    } else {
        Progress::Auto
    };
    let mut report = ::loadtest::run(&config, progress)
        .await
        .with_context(|| format!("the load test against {} could not run", config.url))?;
    if let Some(checks) = &args.check {
        report.checks = checks.evaluate(&report);
    }
    print!("{}", report.summary());
    let name = args.name.as_deref().unwrap_or(config.scenario.as_str());
    let written =
        ::loadtest::write(&report, &args.out, name).context("cannot write the reports")?;
    println!(
        "  reports    {} and {}",
        written.json.display(),
        written.svg.display()
    );
    if let Some((label, baseline)) = baselines.first() {
        println!();
        print!(
            "{}",
            ::loadtest::compare(baseline, label, &report, "this run")
        );
    }
    let failed: Vec<&str> = report
        .checks
        .iter()
        .filter(|c| !c.passed)
        .map(|c| c.expression.as_str())
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} checks failed: {}",
            failed.len(),
            report.checks.len(),
            failed.join(", ")
        );
    }
    Ok(())
}
