//! The `loadtest` binary (`cargo xtask loadtest`): load the service (or the stand-in upstream)
//! and report on it.
//!
//! The generator is this crate's library; the binary turns flags into its configuration, prints
//! the summary, writes the JSON and SVG reports, and applies `--check` and `--compare`.

use std::path::{Path, PathBuf};

use ::loadtest::{Checks, Config, Progress, Report};
use anyhow::{Context as _, Result, bail};

/// Load the dashboard service (or the stand-in upstream) and report latency, throughput and
/// errors.
#[derive(Debug, clap::Parser)]
#[command(name = "loadtest")]
struct Args {
    #[command(flatten)]
    config: Config,
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
    let config = &args.config;
    let progress = if args.quiet {
        Progress::Off
    } else {
        Progress::Auto
    };
    let mut report = ::loadtest::run(config, progress)
        .await
        .with_context(|| format!("the load test against {} could not run", config.url()))?;
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
