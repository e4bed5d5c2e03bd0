//! The answers themselves: deterministic recommendations per user, and the seeded draw that picks
//! each request's latency and fault.
//!
//! Everything here is a pure function of the configuration, the user id and the request's arrival
//! number, so tests (here and in other crates) can compute what the server will say without asking
//! it, and two runs with the same seed inject the same faults in the same order.

use std::time::Duration;

use serde::Serialize;

use crate::config::{Config, Fault};

/// One recommended product, as the stand-in sends it.
///
/// `reason` is an extra field that real clients are expected to ignore; it keeps the client honest
/// about tolerating fields it does not know.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Item {
    /// The recommended product, in `1..=Config::catalog_size`.
    pub product_id: i64,
    /// Relevance in `(0, 1)`; items come in decreasing score order.
    pub score: f64,
    /// A human-readable explanation.
    pub reason: &'static str,
}

/// The JSON document answered for one user, with items of either shape.
#[derive(Debug, Serialize)]
pub(crate) struct Envelope<'a, T> {
    pub(crate) user_id: i64,
    pub(crate) items: &'a [T],
}

const REASONS: [&str; 4] = [
    "bought together with your recent orders",
    "similar to products you reviewed",
    "popular with customers like you",
    "trending this week",
];

/// A prime step between consecutive product ids: it spreads a user's items over the catalogue and
/// keeps them distinct whenever it is coprime with the catalogue size.
const STRIDE: u64 = 7919;

impl Config {
    /// The items the server answers for `user_id`: `items_per_user` distinct products (when the
    /// catalogue is large enough) with decreasing scores, always the same for the same id and
    /// configuration.
    ///
    /// ```
    /// let config = upstream::Config::default();
    /// let items = config.items_for(7);
    /// assert_eq!(items.len(), 10);
    /// assert_eq!(items, config.items_for(7));
    /// assert_ne!(items, config.items_for(8));
    /// ```
    pub fn items_for(&self, user_id: i64) -> Vec<Item> {
        let catalog = u64::from(self.catalog_size.max(1));
        let stride = if gcd(STRIDE, catalog) == 1 { STRIDE } else { 1 };
        // The id's bit pattern is what we hash; negative ids are as valid a key as positive ones.
        let hash = splitmix64(user_id as u64);
        let start = hash % catalog;
        let count = self.items_per_user;
        (0..count)
            .map(|i| {
                let i = i as u64;
                // start < catalog <= u32::MAX and i * STRIDE < 1000 * 7919, so no overflow.
                let product = (start + i * stride) % catalog + 1;
                let score_milli = 990 - i * 900 / count as u64;
                Item {
                    // product <= u32::MAX, so it always fits.
                    product_id: product as i64,
                    score: score_milli as f64 / 1000.0,
                    reason: REASONS[((hash >> 32) as usize + i as usize) % REASONS.len()],
                }
            })
            .collect()
    }

    /// What the random model decides for the `n`-th recommendation request: its latency and its
    /// fault, if any.
    pub(crate) fn draw(&self, n: u64) -> Drawn {
        let fault_draw = unit(mix(self.seed, n, 0));
        let fault = self.fault_for(fault_draw);
        let delay = if self.slow_rate > 0.0 && unit(mix(self.seed, n, 1)) < self.slow_rate {
            self.slow_delay
        } else if self.jitter.is_zero() {
            self.delay
        } else {
            self.delay + self.jitter.mul_f64(unit(mix(self.seed, n, 2)))
        };
        Drawn { delay, fault }
    }

    fn fault_for(&self, draw: f64) -> Option<Fault> {
        let candidates = [
            (self.error_rate, Fault::Status(self.error_status)),
            (self.hang_rate, Fault::Hang),
            (self.malformed_rate, Fault::Malformed),
            (self.oversized_rate, Fault::Oversized { declared: true }),
            (self.reset_rate, Fault::Reset),
        ];
        let mut threshold = 0.0;
        for (rate, fault) in candidates {
            threshold += rate;
            if draw < threshold {
                return Some(fault);
            }
        }
        None
    }
}

/// The outcome of the random model for one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Drawn {
    pub(crate) delay: Duration,
    pub(crate) fault: Option<Fault>,
}

/// splitmix64's finaliser: a fast, well-mixed 64-bit hash, good enough for simulation draws.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// An independent 64-bit draw for (seed, request number, purpose).
fn mix(seed: u64, n: u64, stream: u64) -> u64 {
    splitmix64(seed ^ splitmix64(n.wrapping_mul(3).wrapping_add(stream)))
}

/// Maps 64 random bits to a uniform float in `[0, 1)` using the top 53 bits.
fn unit(bits: u64) -> f64 {
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use http::StatusCode;

    use super::*;

    #[test]
    fn items_are_distinct_in_range_and_sorted_by_score() {
        let config = Config::default();
        for user_id in [-3, 0, 1, 7, i64::MAX, i64::MIN] {
            let items = config.items_for(user_id);
            assert_eq!(items.len(), 10);
            let ids: HashSet<i64> = items.iter().map(|item| item.product_id).collect();
            assert_eq!(ids.len(), 10, "duplicates for user {user_id}: {items:?}");
            assert!(ids.iter().all(|id| (1..=20_000).contains(id)));
            assert!(items.windows(2).all(|w| w[0].score > w[1].score));
            assert!(items.iter().all(|i| i.score > 0.0 && i.score < 1.0));
        }
    }

    #[test]
    fn items_respect_small_catalogues_and_counts() {
        let config = Config {
            catalog_size: 7919 * 2,
            items_per_user: 3,
            ..Config::default()
        };
        let items = config.items_for(42);
        assert_eq!(items.len(), 3);
        let ids: HashSet<i64> = items.iter().map(|item| item.product_id).collect();
        assert_eq!(ids.len(), 3);

        let config = Config {
            catalog_size: 1,
            items_per_user: 0,
            ..Config::default()
        };
        assert!(config.items_for(42).is_empty());
    }

    #[test]
    fn draws_are_reproducible_and_depend_on_the_seed() {
        let config = Config {
            error_rate: 0.1,
            hang_rate: 0.1,
            jitter: Duration::from_millis(10),
            ..Config::default()
        };
        let first: Vec<Drawn> = (0..1000).map(|n| config.draw(n)).collect();
        let again: Vec<Drawn> = (0..1000).map(|n| config.draw(n)).collect();
        assert_eq!(first, again);

        let reseeded = Config {
            seed: config.seed + 1,
            ..config.clone()
        };
        let other: Vec<Drawn> = (0..1000).map(|n| reseeded.draw(n)).collect();
        assert_ne!(first, other);
    }

    #[test]
    fn draws_follow_the_configured_rates() {
        let config = Config {
            error_rate: 0.05,
            error_status: StatusCode::BAD_GATEWAY,
            hang_rate: 0.10,
            malformed_rate: 0.15,
            oversized_rate: 0.20,
            reset_rate: 0.25,
            slow_rate: 0.3,
            slow_delay: Duration::from_secs(2),
            delay: Duration::from_millis(5),
            jitter: Duration::from_millis(10),
            ..Config::default()
        };
        let n = 100_000;
        let mut counts = [0u32; 6];
        let mut slow = 0u32;
        for i in 0..n {
            let drawn = config.draw(i);
            let slot = match drawn.fault {
                Some(Fault::Status(status)) => {
                    assert_eq!(status, StatusCode::BAD_GATEWAY);
                    0
                }
                Some(Fault::Hang) => 1,
                Some(Fault::Malformed) => 2,
                Some(Fault::Oversized { declared: true }) => 3,
                Some(Fault::Reset) => 4,
                None => 5,
                Some(other) => panic!("the random model never picks {other:?}"),
            };
            counts[slot] += 1;
            if drawn.delay == Duration::from_secs(2) {
                slow += 1;
            } else {
                assert!(drawn.delay >= Duration::from_millis(5));
                assert!(drawn.delay <= Duration::from_millis(15));
            }
        }
        let expected = [0.05, 0.10, 0.15, 0.20, 0.25, 0.25];
        for (count, rate) in counts.iter().zip(expected) {
            let observed = f64::from(*count) / n as f64;
            // With 100 000 draws the standard error is below 0.0015; 0.01 is over six of them.
            assert!((observed - rate).abs() < 0.01, "{counts:?}");
        }
        assert!((f64::from(slow) / n as f64 - 0.3).abs() < 0.01);
    }

    #[test]
    fn no_faults_and_no_delay_by_default() {
        let config = Config::default();
        assert!((0..10_000).all(|n| config.draw(n)
            == Drawn {
                delay: Duration::ZERO,
                fault: None
            }));
    }
}
