//! The parameters of a run, and parsers for the forms they take on the command line.
//!
//! Everything here is plain data: `cargo xtask loadtest` parses its flags into a [`Config`] with
//! the [`FromStr`] impls below, and [`crate::run()`] validates the whole before any connection opens.

use std::{fmt, str::FromStr, time::Duration};

use clap::ValueEnum;

use serde::{Deserialize, Serialize};

use crate::Error;

/// The service's default address, as `cargo xtask up` serves it.
pub const DEFAULT_SERVICE_URL: &str = "http://127.0.0.1:8000";

/// The stand-in recommendation service's default address, as `cargo xtask upstream` serves it.
pub const DEFAULT_UPSTREAM_URL: &str = "http://127.0.0.1:9100";

/// What a run requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// `GET {url}/api/users/{id}/dashboard`.
    Dashboard,
    /// `POST {url}/api/users/batch` with `batch_size` ids.
    Batch,
    /// A weighted mix of request kinds, see [`Mix`].
    Mixed,
    /// `GET {url}/users/{id}/recommendations`, the stand-in upstream's own endpoint; this is the
    /// scenario that compares the generator with `wrk`.
    Recommendations,
}

impl Scenario {
    /// The scenario's command-line name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dashboard => "dashboard",
            Self::Batch => "batch",
            Self::Mixed => "mixed",
            Self::Recommendations => "recommendations",
        }
    }

    /// The URL a run of this scenario targets when none is given.
    #[must_use]
    pub fn default_url(self) -> &'static str {
        match self {
            Self::Recommendations => DEFAULT_UPSTREAM_URL,
            _ => DEFAULT_SERVICE_URL,
        }
    }
}

/// One kind of request; a [`Mix`] weighs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestKind {
    /// A dashboard read.
    Dashboard,
    /// A batch read.
    Batch,
    /// A recommendations read from the stand-in upstream.
    Recommendations,
}

impl RequestKind {
    /// The kind's name in a mix expression.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dashboard => "dashboard",
            Self::Batch => "batch",
            Self::Recommendations => "recommendations",
        }
    }
}

/// The weights of request kinds in the `mixed` scenario, e.g. `dashboard=90,batch=10`.
///
/// ```
/// let mix: loadtest::Mix = "dashboard=90,batch=10".parse()?;
/// assert_eq!(mix.to_string(), "dashboard=90,batch=10");
/// # Ok::<(), loadtest::ParseError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mix {
    weights: Vec<(RequestKind, u32)>,
}

impl Mix {
    /// The kinds and their weights, in the order given; every weight is positive.
    #[must_use]
    pub fn weights(&self) -> &[(RequestKind, u32)] {
        &self.weights
    }
}

impl fmt::Display for Mix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (kind, weight)) in self.weights.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}={weight}", kind.as_str())?;
        }
        Ok(())
    }
}

impl FromStr for Mix {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |problem: String| ParseError::Mix {
            input: s.to_owned(),
            problem,
        };
        let mut weights: Vec<(RequestKind, u32)> = Vec::new();
        for part in s.split(',') {
            let part = part.trim();
            let Some((name, weight)) = part.split_once('=') else {
                return Err(bad(format!(
                    "`{part}` should be kind=weight, e.g. dashboard=90"
                )));
            };
            let kind = match name.trim() {
                "dashboard" => RequestKind::Dashboard,
                "batch" => RequestKind::Batch,
                "recommendations" => RequestKind::Recommendations,
                other => {
                    return Err(bad(format!(
                        "unknown kind `{other}`: expected dashboard, batch or recommendations"
                    )));
                }
            };
            let weight_text = weight.trim().trim_end_matches('%');
            let weight: u32 = weight_text.parse().map_err(|_| {
                bad(format!(
                    "the weight of {name} must be a whole number, not `{}`",
                    weight.trim()
                ))
            })?;
            if weights.iter().any(|(k, _)| *k == kind) {
                return Err(bad(format!("{name} is given twice")));
            }
            if weight > 0 {
                weights.push((kind, weight));
            }
        }
        if weights.is_empty() {
            return Err(bad("at least one weight must be positive".to_owned()));
        }
        Ok(Self { weights })
    }
}

/// How user ids are drawn from `1..=users`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Distribution {
    /// Every id equally likely.
    #[default]
    Uniform,
    /// Zipf's law: id `k` is drawn with probability proportional to `1 / k^exponent`, so id 1 is
    /// the hottest user.
    Zipf {
        /// The exponent, positive; 1.0 is classic Zipf, larger is more skewed.
        exponent: f64,
    },
}

impl fmt::Display for Distribution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Uniform => f.write_str("uniform"),
            Self::Zipf { exponent } => write!(f, "zipf:{exponent}"),
        }
    }
}

impl FromStr for Distribution {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        let bad = |problem: &str| ParseError::Distribution {
            input: s.to_owned(),
            problem: problem.to_owned(),
        };
        if text == "uniform" {
            return Ok(Self::Uniform);
        }
        let Some(rest) = text.strip_prefix("zipf") else {
            return Err(bad(
                "expected uniform, zipf or zipf:EXPONENT (e.g. zipf:1.1)",
            ));
        };
        if rest.is_empty() {
            return Ok(Self::Zipf { exponent: 1.0 });
        }
        let Some(exponent) = rest.strip_prefix(':') else {
            return Err(bad("write the exponent after a colon, e.g. zipf:1.1"));
        };
        let exponent: f64 = exponent
            .trim()
            .parse()
            .map_err(|_| bad("the exponent must be a number, e.g. zipf:1.1"))?;
        if !(exponent.is_finite() && exponent > 0.0 && exponent <= 20.0) {
            return Err(bad("the exponent must be above 0 and at most 20"));
        }
        Ok(Self::Zipf { exponent })
    }
}

/// How the generator lays out its threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum RuntimeFlavor {
    /// One current-thread tokio runtime per worker thread, connections spread over them; no task
    /// ever moves between threads. The default: on the 2-core development machine the two layouts
    /// measured the same within noise, and this one keeps a worker's statistics on one thread.
    #[default]
    CurrentThread,
    /// One multi-thread tokio runtime with `threads` workers and work stealing.
    MultiThread,
}

impl RuntimeFlavor {
    /// The layout's command-line name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CurrentThread => "current-thread",
            Self::MultiThread => "multi-thread",
        }
    }
}

/// A command-line value that did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// A malformed mix expression.
    #[error("invalid mix `{input}`: {problem}")]
    Mix {
        /// The text given.
        input: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A malformed distribution.
    #[error("invalid distribution `{input}`: {problem}")]
    Distribution {
        /// The text given.
        input: String,
        /// What is wrong with it.
        problem: String,
    },
}

/// Everything a run needs to know: the flags of `cargo xtask loadtest`, whose defaults are
/// [`Config::default`].
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct Config {
    /// Base URL, `http://host[:port][/prefix]`; requests go to paths under it [default:
    /// http://127.0.0.1:8000, or http://127.0.0.1:9100 for --scenario recommendations].
    #[arg(long)]
    pub url: Option<String>,
    /// What to request: dashboard, batch, mixed (weighted by --mix), or recommendations (the
    /// stand-in upstream's own endpoint).
    #[arg(long, value_enum, default_value_t = Scenario::Dashboard)]
    pub scenario: Scenario,
    /// Request weights for --scenario mixed, e.g. dashboard=90,batch=10.
    #[arg(long, default_value = "dashboard=90,batch=10")]
    pub mix: Mix,
    /// How long to measure, after the warm-up (e.g. 30s, 2m).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Warm-up before measuring; its requests are reported apart and excluded from every figure.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Keep-alive connections, each with at most one request in flight; in closed loop also the
    /// number of requests in flight.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Open loop: total arrival rate in requests per second, with latency counted from each
    /// request's scheduled send. Without it the load is closed loop.
    #[arg(long)]
    pub rate: Option<f64>,
    /// User ids are drawn from 1..=USERS.
    #[arg(long, default_value_t = 100_000)]
    pub users: u64,
    /// Ids per batch request.
    #[arg(long, default_value_t = 50)]
    pub batch_size: usize,
    /// How ids are drawn: uniform, or zipf[:S] for hot users (id 1 is the hottest; S defaults
    /// to 1.0).
    #[arg(long, default_value = "uniform")]
    pub distribution: Distribution,
    /// Seed of the id and mix draws; each connection derives its own stream from it, so the same
    /// seed sends the same ids on each connection.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Per-request timeout, covering connect, send and the whole answer; it also bounds the
    /// drain at the end of the run.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Worker threads; at most one per connection is used [default: the number of cores].
    #[arg(long, default_value_t = std::thread::available_parallelism().map_or(1, usize::from), hide_default_value = true)]
    pub threads: usize,
    /// Thread layout: current-thread (one runtime per worker thread) or multi-thread (one shared
    /// runtime).
    #[arg(long, value_enum, default_value_t = RuntimeFlavor::CurrentThread)]
    pub runtime: RuntimeFlavor,
    /// A bearer token sent with every request (for a service in `auth.mode = "jwt"`).
    #[arg(long, conflicts_with = "token_secret_file")]
    pub token: Option<String>,
    /// A file holding the service's HS256 secret (the local stack's is target/auth/secret): each
    /// request then carries a token minted for it, as real clients would: a dashboard's for its
    /// user, a batch's with scope users:batch.
    #[arg(long)]
    pub token_secret_file: Option<std::path::PathBuf>,
}

impl Default for Config {
    /// The flags' defaults: parsing no flags at all.
    fn default() -> Self {
        #[derive(clap::Parser)]
        struct NoFlags {
            #[command(flatten)]
            config: Config,
        }
        <NoFlags as clap::Parser>::parse_from(["loadtest"]).config
    }
}

impl Config {
    /// The base URL: the one given, or the scenario's default.
    #[must_use]
    pub fn url(&self) -> &str {
        self.url
            .as_deref()
            .unwrap_or_else(|| self.scenario.default_url())
    }
}

/// Upper limit on connections: beyond this the run would exhaust file descriptors or ports long
/// before it measured anything useful.
const MAX_CONNECTIONS: usize = 50_000;

/// Upper limit on ids per batch request, to keep request bodies bounded.
const MAX_BATCH_SIZE: usize = 100_000;

/// Upper limit on the run length (duration plus warm-up), so the histograms' range covers it.
const MAX_RUN: Duration = Duration::from_secs(24 * 3600);

impl Config {
    /// Checks every parameter and parses the URL.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] naming the first parameter that is out of range or malformed.
    pub(crate) fn validate(&self) -> Result<Target, Error> {
        let bad = |field, problem: &str| Error::Config {
            field,
            problem: problem.to_owned(),
        };
        if self.connections == 0 || self.connections > MAX_CONNECTIONS {
            return Err(bad(
                "connections",
                &format!("must be between 1 and {MAX_CONNECTIONS}"),
            ));
        }
        if self.threads == 0 {
            return Err(bad("threads", "must be at least 1"));
        }
        if self.duration.is_zero() {
            return Err(bad("duration", "must be longer than zero"));
        }
        if self.duration + self.warmup > MAX_RUN {
            return Err(bad("duration", "duration plus warm-up must be at most 24h"));
        }
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(3600) {
            return Err(bad("timeout", "must be longer than zero and at most 1h"));
        }
        if let Some(rate) = self.rate
            && !(rate.is_finite() && rate > 0.0 && rate <= 10_000_000.0)
        {
            return Err(bad(
                "rate",
                "must be a positive number of requests per second, at most 10,000,000",
            ));
        }
        if self.users == 0 {
            return Err(bad("users", "must be at least 1"));
        }
        if self.batch_size == 0 || self.batch_size > MAX_BATCH_SIZE {
            return Err(bad(
                "batch-size",
                &format!("must be between 1 and {MAX_BATCH_SIZE}"),
            ));
        }
        let uses_batch = match self.scenario {
            Scenario::Batch => true,
            Scenario::Mixed => self
                .mix
                .weights()
                .iter()
                .any(|(k, _)| *k == RequestKind::Batch),
            _ => false,
        };
        if uses_batch && self.batch_size as u64 > self.users {
            return Err(bad(
                "batch-size",
                "cannot exceed --users: a batch holds distinct ids",
            ));
        }
        if let Distribution::Zipf { exponent } = self.distribution
            && !(exponent.is_finite() && exponent > 0.0)
        {
            return Err(bad("distribution", "the Zipf exponent must be positive"));
        }
        Target::parse(self.url())
    }
}

/// The parsed base URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    /// Host name or address to resolve, without IPv6 brackets.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// The `Host` header value.
    pub authority: String,
    /// Path prefix without a trailing slash, possibly empty.
    pub base_path: String,
}

impl Target {
    fn parse(url: &str) -> Result<Self, Error> {
        let bad = |problem: &str| Error::Config {
            field: "url",
            problem: format!("`{url}`: {problem}"),
        };
        let uri: http::Uri = url.parse().map_err(|e| bad(&format!("not a URL ({e})")))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(bad(
                    "https is not supported: the generator speaks plain HTTP/1.1",
                ));
            }
            _ => return Err(bad("must start with http://")),
        }
        let authority = uri
            .authority()
            .ok_or_else(|| bad("has no host"))?
            .as_str()
            .to_owned();
        if authority.contains('@') {
            return Err(bad("user information in the URL is not supported"));
        }
        let host = uri
            .host()
            .ok_or_else(|| bad("has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if uri.query().is_some() {
            return Err(bad("must not have a query string"));
        }
        let base_path = uri.path().trim_end_matches('/').to_owned();
        Ok(Self {
            host,
            port: uri.port_u16().unwrap_or(80),
            authority,
            base_path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Flags {
        #[command(flatten)]
        config: Config,
    }

    fn flags(args: &[&str]) -> Result<Config, clap::Error> {
        <Flags as clap::Parser>::try_parse_from(
            std::iter::once("loadtest").chain(args.iter().copied()),
        )
        .map(|f| f.config)
    }

    #[test]
    fn the_defaults_are_the_flags_defaults() {
        let config = Config::default();
        assert_eq!(config, flags(&[]).unwrap());
        assert_eq!(
            (config.duration, config.warmup),
            (Duration::from_secs(30), Duration::from_secs(5))
        );
        assert_eq!(
            (config.connections, config.scenario),
            (64, Scenario::Dashboard)
        );
        assert_eq!(config.mix.to_string(), "dashboard=90,batch=10");
        assert_eq!(config.url(), DEFAULT_SERVICE_URL);
        let upstream = Config {
            scenario: Scenario::Recommendations,
            ..Config::default()
        };
        assert_eq!(upstream.url(), DEFAULT_UPSTREAM_URL);
    }

    #[test]
    fn duration_flags_need_a_unit() {
        let config = flags(&[
            "--duration",
            "2m",
            "--timeout",
            "250ms",
            "--runtime",
            "multi-thread",
        ])
        .unwrap();
        assert_eq!(config.duration, Duration::from_secs(120));
        assert_eq!(config.timeout, Duration::from_millis(250));
        assert_eq!(config.runtime, RuntimeFlavor::MultiThread);
        for bad in ["30", "", "3x", "-1s"] {
            assert!(flags(&["--duration", bad]).is_err(), "{bad} parsed");
        }
        assert!(flags(&["--scenario", "orders"]).is_err());
    }

    #[test]
    fn mixes_parse_and_reject_nonsense() {
        let mix: Mix = "dashboard=90, batch=10".parse().unwrap();
        assert_eq!(
            mix.weights(),
            &[(RequestKind::Dashboard, 90), (RequestKind::Batch, 10)]
        );
        let mix: Mix = "batch=1,recommendations=0".parse().unwrap();
        assert_eq!(mix.weights(), &[(RequestKind::Batch, 1)]);
        for bad in [
            "",
            "dashboard",
            "dashboard=x",
            "orders=5",
            "batch=0",
            "batch=1,batch=2",
        ] {
            assert!(bad.parse::<Mix>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn distributions_parse() {
        assert_eq!("uniform".parse(), Ok(Distribution::Uniform));
        assert_eq!("zipf".parse(), Ok(Distribution::Zipf { exponent: 1.0 }));
        assert_eq!("zipf:1.2".parse(), Ok(Distribution::Zipf { exponent: 1.2 }));
        for bad in ["zipf:0", "zipf:-1", "zipf1", "zipf:x", "normal"] {
            assert!(bad.parse::<Distribution>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn urls_are_checked() {
        let target = Target::parse("http://localhost:8000/prefix/").unwrap();
        assert_eq!(target.host, "localhost");
        assert_eq!(target.port, 8000);
        assert_eq!(target.authority, "localhost:8000");
        assert_eq!(target.base_path, "/prefix");
        let target = Target::parse("http://[::1]:9100").unwrap();
        assert_eq!(target.host, "::1");
        assert_eq!(target.base_path, "");
        assert_eq!(Target::parse("http://example.com").unwrap().port, 80);
        for bad in ["https://x", "x:80", "http://", "http://h/?q=1", "ftp://h"] {
            assert!(Target::parse(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn config_validation_names_the_field() {
        let config = Config {
            connections: 0,
            ..Config::default()
        };
        let err = config.validate().unwrap_err();
        assert!(
            matches!(
                err,
                Error::Config {
                    field: "connections",
                    ..
                }
            ),
            "{err}"
        );
        let config = Config {
            scenario: Scenario::Batch,
            users: 10,
            batch_size: 11,
            ..Config::default()
        };
        let err = config.validate().unwrap_err();
        assert!(
            matches!(
                err,
                Error::Config {
                    field: "batch-size",
                    ..
                }
            ),
            "{err}"
        );
        let config = Config {
            rate: Some(f64::NAN),
            ..Config::default()
        };
        assert!(config.validate().is_err());
        assert!(Config::default().validate().is_ok());
    }
}
