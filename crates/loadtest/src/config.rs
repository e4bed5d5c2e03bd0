//! The parameters of a run, and parsers for the forms they take on the command line.
//!
//! Everything here is plain data: `cargo xtask loadtest` parses its flags into a [`Config`] with
//! the [`FromStr`] impls below, and [`crate::run()`] validates the whole before any connection opens.

use std::{fmt, str::FromStr, time::Duration};

use serde::{Deserialize, Serialize};

use crate::Error;

/// The service's default address, as `cargo xtask up` serves it.
pub const DEFAULT_SERVICE_URL: &str = "http://127.0.0.1:8000";

/// The stand-in recommendation service's default address, as `cargo xtask upstream` serves it.
pub const DEFAULT_UPSTREAM_URL: &str = "http://127.0.0.1:9100";

/// What a run requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scenario {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "dashboard" => Ok(Self::Dashboard),
            "batch" => Ok(Self::Batch),
            "mixed" => Ok(Self::Mixed),
            "recommendations" => Ok(Self::Recommendations),
            other => Err(ParseError::Scenario(other.to_owned())),
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

impl Default for Mix {
    fn default() -> Self {
        Self {
            weights: vec![(RequestKind::Dashboard, 90), (RequestKind::Batch, 10)],
        }
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RuntimeFlavor {
    /// One current-thread tokio runtime per worker thread, connections spread over them; no task
    /// ever moves between threads. The default: on the 2-core development machine the two layouts
    /// measured the same within noise with the raw engine, and this one was faster with hyper's
    /// client; it also keeps a worker's statistics on one thread.
    #[default]
    CurrentThread,
    /// One multi-thread tokio runtime with `threads` workers and work stealing.
    MultiThread,
}

impl fmt::Display for RuntimeFlavor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::CurrentThread => "current-thread",
            Self::MultiThread => "multi-thread",
        })
    }
}

impl FromStr for RuntimeFlavor {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "current-thread" => Ok(Self::CurrentThread),
            "multi-thread" => Ok(Self::MultiThread),
            other => Err(ParseError::Runtime(other.to_owned())),
        }
    }
}

/// How requests travel over the connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Engine {
    /// HTTP/1.1 written and read directly on the socket, as wrk does: the default, and the one
    /// that keeps up with wrk (see the crate docs).
    #[default]
    Raw,
    /// hyper's low-level HTTP/1.1 client: about 1.8µs more CPU per request; kept as an
    /// independent implementation to cross-check the raw engine's counts.
    Hyper,
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Raw => "raw",
            Self::Hyper => "hyper",
        })
    }
}

impl FromStr for Engine {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "raw" => Ok(Self::Raw),
            "hyper" => Ok(Self::Hyper),
            other => Err(ParseError::Engine(other.to_owned())),
        }
    }
}

/// A command-line value that did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// A duration without a unit, with an unknown unit, or not a number.
    #[error("invalid duration `{input}`: {problem}")]
    Duration {
        /// The text given.
        input: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// An unknown scenario name.
    #[error("unknown scenario `{0}`: expected dashboard, batch, mixed or recommendations")]
    Scenario(String),
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
    /// An unknown runtime layout.
    #[error("unknown runtime `{0}`: expected current-thread or multi-thread")]
    Runtime(String),
    /// An unknown engine.
    #[error("unknown engine `{0}`: expected raw or hyper")]
    Engine(String),
}

/// Parses a duration written as a number and a unit: `250ms`, `1.5s`, `2m`, `1h`, `500us`.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(loadtest::parse_duration("250ms")?, Duration::from_millis(250));
/// assert_eq!(loadtest::parse_duration("1.5s")?, Duration::from_millis(1500));
/// assert!(loadtest::parse_duration("30").is_err());
/// # Ok::<(), loadtest::ParseError>(())
/// ```
///
/// # Errors
///
/// [`ParseError::Duration`] when the unit is missing or unknown, or the number is not a
/// non-negative finite number.
pub fn parse_duration(text: &str) -> Result<Duration, ParseError> {
    let input = text.trim();
    let bad = |problem| ParseError::Duration {
        input: text.to_owned(),
        problem,
    };
    let split = input
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| bad("add a unit, e.g. 30s or 250ms"))?;
    let (number, unit) = input.split_at(split);
    if number.is_empty() {
        return Err(bad("expected a number followed by a unit, e.g. 30s"));
    }
    let value: f64 = number
        .parse()
        .map_err(|_| bad("expected a number followed by a unit, e.g. 30s"))?;
    let seconds_per_unit = match unit.trim() {
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(bad("unknown unit: use ns, us, ms, s, m or h")),
    };
    Duration::try_from_secs_f64(value * seconds_per_unit).map_err(|_| bad("out of range"))
}

/// Everything a run needs to know.
///
/// [`Config::default`] holds the documented defaults of `cargo xtask loadtest`.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Base URL, `http://host[:port][/prefix]`; requests go to paths under it.
    pub url: String,
    /// What to request.
    pub scenario: Scenario,
    /// Request kind weights, used by [`Scenario::Mixed`] only.
    pub mix: Mix,
    /// How long to measure, after the warm-up.
    pub duration: Duration,
    /// How long to run before measuring; those requests are counted apart and excluded.
    pub warmup: Duration,
    /// Open connections, each with at most one request in flight (HTTP/1.1 keep-alive).
    pub connections: usize,
    /// Open loop: the total arrival rate in requests per second. `None` is closed loop.
    pub rate: Option<f64>,
    /// User ids are drawn from `1..=users`.
    pub users: u64,
    /// Ids per batch request.
    pub batch_size: usize,
    /// How user ids are drawn.
    pub distribution: Distribution,
    /// Seed of every random draw; each connection derives its own stream from it.
    pub seed: u64,
    /// Limit on one request: connect (when needed), send, and the whole response body.
    pub timeout: Duration,
    /// Worker threads; at most one per connection is used.
    pub threads: usize,
    /// How the worker threads run their tasks.
    pub runtime: RuntimeFlavor,
    /// How requests travel.
    pub engine: Engine,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            url: DEFAULT_SERVICE_URL.to_owned(),
            scenario: Scenario::Dashboard,
            mix: Mix::default(),
            duration: Duration::from_secs(30),
            warmup: Duration::from_secs(5),
            connections: 64,
            rate: None,
            users: 100_000,
            batch_size: 50,
            distribution: Distribution::Uniform,
            seed: 1,
            timeout: Duration::from_secs(5),
            threads: std::thread::available_parallelism().map_or(1, usize::from),
            runtime: RuntimeFlavor::CurrentThread,
            engine: Engine::Raw,
        }
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
        Target::parse(&self.url)
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

    #[test]
    fn durations_need_a_unit() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("500us"), Ok(Duration::from_micros(500)));
        assert_eq!(parse_duration(" 0.25s "), Ok(Duration::from_millis(250)));
        for bad in ["30", "", "ms", "3x", "1.2.3s", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad} parsed");
        }
        let message = parse_duration("30").unwrap_err().to_string();
        assert_eq!(
            message,
            "invalid duration `30`: add a unit, e.g. 30s or 250ms"
        );
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
