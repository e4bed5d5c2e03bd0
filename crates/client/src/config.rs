//! Settings of the recommendation client, read from the `[recommendations]` section of the API's
//! configuration.
//!
//! Every field has a default, so an empty section is valid; durations are humantime strings such
//! as `"5s"` or `"250ms"`. The full section with its defaults:
//!
//! ```toml
//! [recommendations]
//! base_url = "http://127.0.0.1:9100"
//! timeout = "5s"
//! connect_timeout = "1s"
//! max_in_flight = 256
//! max_idle_per_host = 256
//! idle_timeout = "60s"
//! body_limit = 1048576
//! connect_retries = 0
//! connect_retry_backoff = "50ms"
//!
//! [recommendations.breaker]
//! enabled = true
//! failure_threshold = 5
//! cooldown = "10s"
//!
//! [recommendations.hedge]
//! enabled = false
//! delay = "100ms"
//! ```

use std::time::Duration;

use serde::Deserialize;

/// Settings of [`RecommendationClient`](crate::RecommendationClient).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientConfig {
    /// Where the recommendation service lives, `http://host[:port][/prefix]`. Requests go to
    /// `{base_url}/users/{id}/recommendations`. Only plain HTTP is supported (the service is
    /// expected on the local network or behind a sidecar); a trailing `/` is ignored.
    pub base_url: String,
    /// How long one call may take in total: connecting, waiting, reading the body, retries and
    /// hedges included. A caller can shorten it per call by passing a deadline.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// How long establishing one TCP connection may take.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// The most requests (and therefore HTTP/1 connections) in flight at once. Callers beyond it
    /// wait for a free slot within their own deadline; one whose deadline passes while it waits
    /// fails as `saturated` without sending anything, and does not count against the service in
    /// the breaker. Hedges are only sent when a slot is free.
    pub max_in_flight: usize,
    /// The most idle keep-alive connections kept for reuse. Set it near `max_in_flight` so that a
    /// steady load does not keep closing and reopening connections.
    pub max_idle_per_host: usize,
    /// How long an idle keep-alive connection is kept before it is closed. Keep it below the
    /// service's own keep-alive timeout, so that the client closes idle connections rather than
    /// racing the server's close with a new request.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// The largest response body accepted, in bytes (default 1 MiB). A response announcing more
    /// is refused before its body is read; a chunked one is cut off once it passes the limit.
    pub body_limit: usize,
    /// How many times to retry a request whose connection could not be established (the request
    /// was never sent, so a retry is always safe). 0 disables retries.
    pub connect_retries: u32,
    /// Pause before the first connect retry; the n-th retry waits n times as long.
    #[serde(with = "humantime_serde")]
    pub connect_retry_backoff: Duration,
    /// Circuit breaker settings.
    pub breaker: BreakerConfig,
    /// Hedged-request settings.
    pub hedge: HedgeConfig,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            base_url: "http://127.0.0.1:9100".to_owned(),
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
            max_in_flight: 256,
            max_idle_per_host: 256,
            idle_timeout: Duration::from_secs(60),
            body_limit: 1024 * 1024,
            connect_retries: 0,
            connect_retry_backoff: Duration::from_millis(50),
            breaker: BreakerConfig::default(),
            hedge: HedgeConfig::default(),
        }
    }
}

/// The circuit breaker: after `failure_threshold` consecutive failed calls the client stops
/// calling the service and fails fast for `cooldown`, then lets a single probe call through; the
/// probe's success closes the circuit, its failure opens it for another `cooldown`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Whether the breaker is used at all.
    pub enabled: bool,
    /// Consecutive failures that open the circuit (at least 1).
    pub failure_threshold: u32,
    /// How long the circuit stays open before a probe is allowed.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            failure_threshold: 5,
            cooldown: Duration::from_secs(10),
        }
    }
}

/// Hedged requests: when no answer has arrived `delay` after a call started, send the same
/// request a second time on another connection and take the first good answer, cancelling the
/// other. This trades a little extra load for a shorter latency tail. Off by default.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HedgeConfig {
    /// Whether hedged requests are sent.
    pub enabled: bool,
    /// How long to wait for the first answer before sending the hedge; a value near the
    /// service's 95th-percentile latency hedges about one call in twenty.
    #[serde(with = "humantime_serde")]
    pub delay: Duration,
}

impl Default for HedgeConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            delay: Duration::from_millis(100),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_section_gives_the_documented_defaults() {
        let config: ClientConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(config, ClientConfig::default());
        assert_eq!(config.base_url, "http://127.0.0.1:9100");
        assert_eq!(config.timeout, Duration::from_secs(5));
        assert_eq!(config.body_limit, 1 << 20);
        assert!(config.breaker.enabled);
        assert!(!config.hedge.enabled);
    }

    #[test]
    fn durations_are_humantime_strings_and_sections_merge_with_defaults() {
        let config: ClientConfig = serde_json::from_str(
            r#"{
                "timeout": "250ms",
                "connect_retries": 2,
                "breaker": { "cooldown": "1m" },
                "hedge": { "enabled": true }
            }"#,
        )
        .unwrap();
        assert_eq!(config.timeout, Duration::from_millis(250));
        assert_eq!(config.connect_retries, 2);
        assert_eq!(config.breaker.cooldown, Duration::from_secs(60));
        assert_eq!(config.breaker.failure_threshold, 5);
        assert!(config.hedge.enabled);
        assert_eq!(config.hedge.delay, Duration::from_millis(100));
    }

    #[test]
    fn unknown_fields_and_bad_durations_are_refused() {
        let error = serde_json::from_str::<ClientConfig>(r#"{ "timout": "1s" }"#).unwrap_err();
        assert!(error.to_string().contains("timout"), "{error}");
        let error = serde_json::from_str::<ClientConfig>(r#"{ "hedge": { "delay": "soon" } }"#)
            .unwrap_err();
        assert!(
            error.to_string().contains("soon") || error.to_string().contains("unit"),
            "{error}"
        );
    }
}
