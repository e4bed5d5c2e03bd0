//! What the stand-in service answers: the latency model, the fault mix and the forced replies.
//!
//! A [`Config`] holds the rates and delays that apply to every request; a [`Reply`] forces the
//! outcome of one request (through the `x-upstream-fault` / `x-upstream-delay-ms` headers, a
//! script queued on the running server, or a per-user override).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use http::StatusCode;

use crate::Error;

/// The longest delay a request can ask for with `x-upstream-delay-ms`, and the longest configured
/// delay: a stand-in that makes callers wait longer than this is misconfigured, not slow.
pub const MAX_DELAY: Duration = Duration::from_secs(600);

/// The largest body the oversized faults may send (1 GiB): enough to exceed any sane client cap.
pub const MAX_OVERSIZED_BYTES: usize = 1 << 30;

/// The most items one answer may carry.
pub const MAX_ITEMS_PER_USER: usize = 1000;

/// How the stand-in recommendation service behaves.
///
/// Every rate is a probability in `[0, 1]`; the fault rates (`error_rate`, `hang_rate`,
/// `malformed_rate`, `oversized_rate`, `reset_rate`) are mutually exclusive outcomes of one draw, so
/// their sum must not exceed 1. Which requests get which fault is a pure function of `seed` and the
/// request's arrival number, so two runs with the same seed inject the same sequence of faults.
///
/// It is also the `upstream` binary's flags (delays in whole milliseconds); [`Config::default`]
/// is what no flags give.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct Config {
    /// Latency added to every answer, in milliseconds.
    #[arg(long = "delay-ms", value_parser = millis, default_value = "0")]
    pub delay: Duration,
    /// Extra latency, uniformly random between 0 and this many milliseconds, on top of the delay.
    #[arg(long = "jitter-ms", value_parser = millis, default_value = "0")]
    pub jitter: Duration,
    /// Fraction of requests (0-1) that are slow: they take --slow-delay-ms instead. This models
    /// the latency tail that hedged requests are meant to cut.
    #[arg(long, default_value_t = 0.0)]
    pub slow_rate: f64,
    /// Latency of the slow requests, in milliseconds.
    #[arg(long = "slow-delay-ms", value_parser = millis, default_value = "1000")]
    pub slow_delay: Duration,
    /// Fraction of requests (0-1) answered with --error-status and a small JSON error body.
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    /// Status code of the injected errors (4xx or 5xx).
    #[arg(long, value_parser = status_code, default_value = "503")]
    pub error_status: StatusCode,
    /// Fraction of requests (0-1) never answered: the connection stays open, silent, until the
    /// client gives up, the server shuts down, or --hang-limit-ms passes.
    #[arg(long, default_value_t = 0.0)]
    pub hang_rate: f64,
    /// How long a hanging request holds its connection before it is closed, in milliseconds.
    /// This bounds the resources a client that never times out can pin.
    #[arg(long = "hang-limit-ms", value_parser = millis, default_value = "300000")]
    pub hang_limit: Duration,
    /// Fraction of requests (0-1) answered 200 with truncated, invalid JSON.
    #[arg(long, default_value_t = 0.0)]
    pub malformed_rate: f64,
    /// Fraction of requests (0-1) answered 200 with a body of --oversized-bytes bytes (valid
    /// JSON, declared in Content-Length).
    #[arg(long, default_value_t = 0.0)]
    pub oversized_rate: f64,
    /// Size of the oversized bodies, in bytes; the default, 2 MiB, is twice the client's cap.
    #[arg(long, default_value_t = 2 << 20)]
    pub oversized_bytes: usize,
    /// Fraction of requests (0-1) whose connection is reset (TCP RST) instead of answered.
    #[arg(long, default_value_t = 0.0)]
    pub reset_rate: f64,
    /// Items per answer.
    #[arg(long = "items", default_value_t = 10)]
    pub items_per_user: usize,
    /// How items are written: `objects` ({"product_id","score","reason"}) or `ids` (plain
    /// product ids, as the seed article's service answers).
    #[arg(long, value_enum, default_value_t = Shape::Objects)]
    pub shape: Shape,
    /// Product ids are drawn from `1..=catalog_size` (20 000, the id range of the seeded
    /// reviews).
    #[arg(skip = 20_000u32)]
    pub catalog_size: u32,
    /// Seed of the latency and fault draws: the same seed injects the same faults in the same
    /// order of arrival.
    #[arg(long, default_value_t = 0x5eed)]
    pub seed: u64,
}

/// How the stand-in writes each recommended item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Shape {
    /// `{"product_id":…,"score":…,"reason":…}`.
    #[default]
    Objects,
    /// The product id alone: `{"items":[101,202,303]}`.
    Ids,
}

impl Default for Config {
    /// What the `upstream` binary runs with when given no flags.
    fn default() -> Self {
        #[derive(clap::Parser)]
        struct NoFlags {
            #[command(flatten)]
            config: Config,
        }
        <NoFlags as clap::Parser>::parse_from(["upstream"]).config
    }
}

/// A whole number of milliseconds, as the delay flags take them.
fn millis(text: &str) -> Result<Duration, std::num::ParseIntError> {
    text.parse().map(Duration::from_millis)
}

/// A status code, as `--error-status` takes it.
fn status_code(text: &str) -> Result<StatusCode, String> {
    text.parse::<u16>()
        .ok()
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or_else(|| format!("{text} is not a status code"))
}

impl Config {
    /// Checks that the rates are probabilities that sum to at most 1 and that every size and
    /// delay is within its bound.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the first offending field.
    pub fn validate(&self) -> Result<(), Error> {
        let rates = [
            ("slow_rate", self.slow_rate),
            ("error_rate", self.error_rate),
            ("hang_rate", self.hang_rate),
            ("malformed_rate", self.malformed_rate),
            ("oversized_rate", self.oversized_rate),
            ("reset_rate", self.reset_rate),
        ];
        for (name, rate) in rates {
            if !(0.0..=1.0).contains(&rate) {
                return Err(invalid(format!(
                    "{name} must be between 0 and 1, got {rate}"
                )));
            }
        }
        let faults = self.fault_rate_sum();
        // A little slack so that rates such as 0.1 + 0.2 + 0.7 are not refused for rounding.
        if faults > 1.0 + 1e-9 {
            return Err(invalid(format!(
                "the fault rates (error, hang, malformed, oversized, reset) sum to {faults}, more than 1"
            )));
        }
        let delays = [
            ("delay", self.delay),
            ("jitter", self.jitter),
            ("slow_delay", self.slow_delay),
            ("hang_limit", self.hang_limit),
        ];
        for (name, delay) in delays {
            if delay > MAX_DELAY {
                return Err(invalid(format!(
                    "{name} must be at most {}s, got {delay:?}",
                    MAX_DELAY.as_secs()
                )));
            }
        }
        if self.delay + self.jitter > MAX_DELAY {
            return Err(invalid(format!(
                "delay + jitter must be at most {}s",
                MAX_DELAY.as_secs()
            )));
        }
        if self.oversized_bytes > MAX_OVERSIZED_BYTES {
            return Err(invalid(format!(
                "oversized_bytes must be at most {MAX_OVERSIZED_BYTES}, got {}",
                self.oversized_bytes
            )));
        }
        if self.items_per_user > MAX_ITEMS_PER_USER {
            return Err(invalid(format!(
                "items_per_user must be at most {MAX_ITEMS_PER_USER}, got {}",
                self.items_per_user
            )));
        }
        if !(self.error_status.is_client_error() || self.error_status.is_server_error()) {
            return Err(invalid(format!(
                "error_status must be a 4xx or 5xx code, got {}",
                self.error_status.as_u16()
            )));
        }
        if self.catalog_size == 0 {
            return Err(invalid("catalog_size must be at least 1".to_owned()));
        }
        Ok(())
    }

    fn fault_rate_sum(&self) -> f64 {
        self.error_rate
            + self.hang_rate
            + self.malformed_rate
            + self.oversized_rate
            + self.reset_rate
    }
}

fn invalid(message: String) -> Error {
    Error::InvalidConfig(message)
}

/// A way for one request to go wrong.
///
/// The string forms (used by the `x-upstream-fault` header and [`FromStr`]) are `error`,
/// `error:<status>`, `hang`, `malformed`, `no-items`, `items-not-array`, `oversized`, `oversized-chunked` and `reset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status code and a small JSON error body.
    Status(StatusCode),
    /// Never answer; hold the connection open (see [`Config::hang_limit`]).
    Hang,
    /// Answer `200 OK` with truncated JSON.
    Malformed,
    /// Answer `200 OK` with valid JSON that lacks the `items` field.
    MissingItems,
    /// Answer `200 OK` with valid JSON whose `items` is an object, not an array.
    ItemsNotArray,
    /// Answer `200 OK` with a body of [`Config::oversized_bytes`] bytes. With `declared` the length
    /// is sent in `Content-Length` up front; without it the body is chunked, so a client can only
    /// find out by reading.
    Oversized {
        /// Whether the length is announced in `Content-Length`.
        declared: bool,
    },
    /// Reset the TCP connection (RST) instead of answering.
    Reset,
}

impl Fault {
    /// A short name for logs and counters: `status`, `hang`, `malformed`, `no-items`, `items-not-array`, `oversized`,
    /// `oversized-chunked` or `reset`.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Status(_) => "status",
            Fault::Hang => "hang",
            Fault::Malformed => "malformed",
            Fault::MissingItems => "no-items",
            Fault::ItemsNotArray => "items-not-array",
            Fault::Oversized { declared: true } => "oversized",
            Fault::Oversized { declared: false } => "oversized-chunked",
            Fault::Reset => "reset",
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Status(status) => write!(f, "error:{}", status.as_u16()),
            other => f.write_str(other.name()),
        }
    }
}

/// A fault name that [`Fault::from_str`] does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown fault {0:?}; expected error, error:<status>, hang, malformed, no-items, items-not-array, oversized, oversized-chunked or reset"
)]
pub struct ParseFaultError(String);

impl FromStr for Fault {
    type Err = ParseFaultError;

    /// Parses `error` (503), `error:<status>`, `hang`, `malformed`, `no-items`, `items-not-array`, `oversized`,
    /// `oversized-chunked` or `reset`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fault = match s {
            "error" => Fault::Status(StatusCode::SERVICE_UNAVAILABLE),
            "hang" => Fault::Hang,
            "malformed" => Fault::Malformed,
            "no-items" => Fault::MissingItems,
            "items-not-array" => Fault::ItemsNotArray,
            "oversized" => Fault::Oversized { declared: true },
            "oversized-chunked" => Fault::Oversized { declared: false },
            "reset" => Fault::Reset,
            other => {
                let status = other
                    .strip_prefix("error:")
                    .and_then(|code| code.parse::<u16>().ok())
                    .and_then(|code| StatusCode::from_u16(code).ok());
                match status {
                    Some(status) => Fault::Status(status),
                    None => return Err(ParseFaultError(s.to_owned())),
                }
            }
        };
        Ok(fault)
    }
}

/// The forced outcome of one request: an exact delay and/or a fault.
///
/// Fields left `None` fall back to the configured random draw for that request, so
/// `Reply::default()` means "behave as configured" and `Reply::ok()` means "answer normally,
/// with the configured latency".
///
/// ```
/// use std::time::Duration;
/// use upstream::{Fault, Reply};
///
/// let slow_failure = Reply::fault(Fault::Hang).after(Duration::from_millis(20));
/// assert_eq!(slow_failure.delay, Some(Duration::from_millis(20)));
/// assert_eq!(Reply::ok().fault, Some(None));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reply {
    /// Wait exactly this long before answering; `None` uses the configured latency model.
    pub delay: Option<Duration>,
    /// `Some(Some(fault))` forces the fault, `Some(None)` forces a normal answer, `None` uses the
    /// configured fault rates.
    pub fault: Option<Option<Fault>>,
}

impl Reply {
    /// A normal answer (no fault), with the configured latency.
    pub fn ok() -> Self {
        Self {
            delay: None,
            fault: Some(None),
        }
    }

    /// The given fault, with the configured latency.
    pub fn fault(fault: Fault) -> Self {
        Self {
            delay: None,
            fault: Some(Some(fault)),
        }
    }

    /// The same reply, sent after exactly `delay`.
    #[must_use]
    pub fn after(self, delay: Duration) -> Self {
        Self {
            delay: Some(delay),
            ..self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn rates_out_of_range_are_refused_with_the_field_name() {
        let config = Config {
            hang_rate: 1.5,
            ..Config::default()
        };
        let message = config.validate().unwrap_err().to_string();
        assert!(message.contains("hang_rate"), "{message}");

        let config = Config {
            error_rate: f64::NAN,
            ..Config::default()
        };
        let message = config.validate().unwrap_err().to_string();
        assert!(message.contains("error_rate"), "{message}");
    }

    #[test]
    fn fault_rates_must_not_sum_above_one() {
        let config = Config {
            error_rate: 0.6,
            reset_rate: 0.6,
            ..Config::default()
        };
        assert!(config.validate().unwrap_err().to_string().contains("sum"));

        let config = Config {
            error_rate: 0.1,
            hang_rate: 0.2,
            reset_rate: 0.7,
            // The slow tail is latency, not a fault, so it does not count towards the sum.
            slow_rate: 0.9,
            ..Config::default()
        };
        config.validate().unwrap();
    }

    #[test]
    fn sizes_and_delays_are_bounded() {
        for config in [
            Config {
                delay: MAX_DELAY + Duration::from_secs(1),
                ..Config::default()
            },
            Config {
                oversized_bytes: MAX_OVERSIZED_BYTES + 1,
                ..Config::default()
            },
            Config {
                items_per_user: MAX_ITEMS_PER_USER + 1,
                ..Config::default()
            },
            Config {
                catalog_size: 0,
                ..Config::default()
            },
            Config {
                error_status: StatusCode::OK,
                ..Config::default()
            },
        ] {
            assert!(config.validate().is_err(), "{config:?}");
        }
    }

    #[test]
    fn faults_round_trip_through_their_string_form() {
        for fault in [
            Fault::Status(StatusCode::BAD_GATEWAY),
            Fault::Hang,
            Fault::Malformed,
            Fault::MissingItems,
            Fault::ItemsNotArray,
            Fault::Oversized { declared: true },
            Fault::Oversized { declared: false },
            Fault::Reset,
        ] {
            assert_eq!(fault.to_string().parse::<Fault>(), Ok(fault));
        }
        assert_eq!(
            "error".parse::<Fault>(),
            Ok(Fault::Status(StatusCode::SERVICE_UNAVAILABLE))
        );
        for bad in ["", "explode", "error:", "error:99", "error:abc", "HANG"] {
            let err = bad.parse::<Fault>().unwrap_err();
            assert!(err.to_string().contains("unknown fault"), "{bad}: {err}");
        }
    }
}
