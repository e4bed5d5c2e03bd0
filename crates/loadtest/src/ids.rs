//! User-id draws: uniform over `1..=n`, or Zipf-distributed so that a few users are hot.
//!
//! The Zipf sampler uses rejection-inversion (Hörmann and Derflinger, "Rejection-inversion to
//! generate variates from monotone discrete distributions", 1996): constant memory and a constant
//! expected number of draws per sample, whatever `n` is, so a million users cost no table. Every
//! draw comes from a caller-provided seeded generator, so a run is reproducible.

use rand::Rng;

use crate::Distribution;

/// Draws integers `1..=n` with `P(k)` proportional to `1 / k^s`.
///
/// ```
/// use rand::SeedableRng;
/// let zipf = loadtest::Zipf::new(1000, 1.1).expect("valid parameters");
/// let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(7);
/// let k = zipf.sample(&mut rng);
/// assert!((1..=1000).contains(&k));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Zipf {
    n: f64,
    s: f64,
    h_integral_x1: f64,
    h_integral_n: f64,
    squeeze: f64,
}

/// Parameters that do not describe a Zipf distribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a Zipf distribution needs n >= 1 and a positive, finite exponent")]
pub struct ZipfError;

impl Zipf {
    /// A sampler over `1..=n` with exponent `s`.
    ///
    /// # Errors
    ///
    /// [`ZipfError`] when `n` is zero or `s` is not a positive finite number.
    pub fn new(n: u64, s: f64) -> Result<Self, ZipfError> {
        if n == 0 || !(s.is_finite() && s > 0.0) {
            return Err(ZipfError);
        }
        let mut zipf = Self {
            // Precision loss above 2^53 users is irrelevant: no table has that many rows.
            #[allow(clippy::cast_precision_loss)]
            n: n as f64,
            s,
            h_integral_x1: 0.0,
            h_integral_n: 0.0,
            squeeze: 0.0,
        };
        zipf.h_integral_x1 = zipf.h_integral(1.5) - 1.0;
        zipf.h_integral_n = zipf.h_integral(zipf.n + 0.5);
        zipf.squeeze = 2.0 - zipf.h_integral_inverse(zipf.h_integral(2.5) - zipf.h(2.0));
        Ok(zipf)
    }

    /// Draws one value in `1..=n`.
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> u64 {
        loop {
            let u =
                self.h_integral_n + rng.random::<f64>() * (self.h_integral_x1 - self.h_integral_n);
            let x = self.h_integral_inverse(u);
            let k = (x + 0.5).floor().clamp(1.0, self.n);
            // Accept at once inside the squeeze, else test against the exact hat.
            if k - x <= self.squeeze || u >= self.h_integral(k + 0.5) - self.h(k) {
                // k is a whole number in 1..=n, so the cast is exact.
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                return k as u64;
            }
        }
    }

    /// The unnormalised probability mass, `x^-s`.
    fn h(&self, x: f64) -> f64 {
        (-self.s * x.ln()).exp()
    }

    /// `H(x) = (x^(1-s) - 1) / (1 - s)`, the integral of `h` from 1, written so that it stays
    /// accurate as `s` approaches 1 (where it becomes `ln x`).
    fn h_integral(&self, x: f64) -> f64 {
        let log_x = x.ln();
        expm1_over_x((1.0 - self.s) * log_x) * log_x
    }

    /// The inverse of [`Self::h_integral`].
    fn h_integral_inverse(&self, y: f64) -> f64 {
        // Rounding can push the argument just below the domain's edge; clamp it back.
        let t = (y * (1.0 - self.s)).max(-1.0);
        (log1p_over_x(t) * y).exp()
    }
}

/// `ln(1 + x) / x`, continuous at 0.
fn log1p_over_x(x: f64) -> f64 {
    if x.abs() > 1e-8 {
        x.ln_1p() / x
    } else {
        1.0 - x * (0.5 - x * (1.0 / 3.0 - 0.25 * x))
    }
}

/// `(e^x - 1) / x`, continuous at 0.
fn expm1_over_x(x: f64) -> f64 {
    if x.abs() > 1e-8 {
        x.exp_m1() / x
    } else {
        1.0 + x * 0.5 * (1.0 + x / 3.0 * (1.0 + 0.25 * x))
    }
}

/// Draws user ids for one connection.
#[derive(Debug, Clone)]
pub(crate) enum IdSampler {
    Uniform { users: u64 },
    Zipf(Zipf),
}

impl IdSampler {
    /// A sampler over `1..=users`; `users` is at least 1 (checked by config validation).
    pub(crate) fn new(distribution: Distribution, users: u64) -> Result<Self, ZipfError> {
        Ok(match distribution {
            Distribution::Uniform => Self::Uniform { users },
            Distribution::Zipf { exponent } => Self::Zipf(Zipf::new(users, exponent)?),
        })
    }

    pub(crate) fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> u64 {
        match self {
            Self::Uniform { users } => rng.random_range(1..=*users),
            Self::Zipf(zipf) => zipf.sample(rng),
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_pcg::Pcg64Mcg;

    use super::*;

    fn draws(zipf: &Zipf, seed: u64, count: usize) -> Vec<u64> {
        let mut rng = Pcg64Mcg::seed_from_u64(seed);
        (0..count).map(|_| zipf.sample(&mut rng)).collect()
    }

    #[test]
    fn same_seed_same_draws_other_seed_other_draws() {
        let zipf = Zipf::new(100_000, 1.0).unwrap();
        assert_eq!(draws(&zipf, 42, 1000), draws(&zipf, 42, 1000));
        assert_ne!(draws(&zipf, 42, 1000), draws(&zipf, 43, 1000));
    }

    /// The empirical distribution over a small support matches the exact probabilities: the
    /// total variation distance is small and every value's frequency is close to its mass.
    #[test]
    fn shape_matches_the_exact_probabilities() {
        for s in [0.5, 1.0, 1.2, 2.5] {
            let n = 10u64;
            let zipf = Zipf::new(n, s).unwrap();
            let count = 200_000;
            let mut seen = [0u64; 11];
            for k in draws(&zipf, 7, count) {
                assert!((1..=n).contains(&k));
                seen[usize::try_from(k).unwrap()] += 1;
            }
            let norm: f64 = (1..=n).map(|k| (k as f64).powf(-s)).sum();
            let mut total_variation = 0.0;
            for k in 1..=n {
                let expected = (k as f64).powf(-s) / norm;
                let observed = seen[usize::try_from(k).unwrap()] as f64 / count as f64;
                assert!(
                    (observed - expected).abs() < 0.005,
                    "s={s} k={k}: observed {observed}, expected {expected}"
                );
                total_variation += (observed - expected).abs() / 2.0;
            }
            assert!(total_variation < 0.01, "s={s}: distance {total_variation}");
        }
    }

    #[test]
    fn large_supports_have_hot_heads() {
        let zipf = Zipf::new(100_000, 1.0).unwrap();
        let sample = draws(&zipf, 3, 400_000);
        let ones = sample.iter().filter(|&&k| k == 1).count() as f64;
        let twos = sample.iter().filter(|&&k| k == 2).count() as f64;
        // With s = 1, P(1) / P(2) = 2 and P(1) = 1 / H(100000) ≈ 1 / 12.09.
        assert!((ones / twos - 2.0).abs() < 0.1, "ratio {}", ones / twos);
        let p1 = ones / sample.len() as f64;
        assert!((p1 - 1.0 / 12.09).abs() < 0.003, "P(1) = {p1}");
        assert!(sample.iter().all(|&k| (1..=100_000).contains(&k)));
        assert!(sample.iter().any(|&k| k > 50_000), "the tail is drawn too");
    }

    #[test]
    fn degenerate_and_invalid_parameters() {
        let one = Zipf::new(1, 1.5).unwrap();
        assert!(draws(&one, 1, 100).iter().all(|&k| k == 1));
        assert_eq!(Zipf::new(0, 1.0), Err(ZipfError));
        assert_eq!(Zipf::new(10, 0.0), Err(ZipfError));
        assert_eq!(Zipf::new(10, f64::INFINITY), Err(ZipfError));
    }

    #[test]
    fn uniform_ids_cover_the_range() {
        let sampler = IdSampler::new(Distribution::Uniform, 5).unwrap();
        let mut rng = Pcg64Mcg::seed_from_u64(1);
        let mut seen = [false; 6];
        for _ in 0..1000 {
            let id = sampler.sample(&mut rng);
            seen[usize::try_from(id).unwrap()] = true;
        }
        assert_eq!(seen, [false, true, true, true, true, true]);
    }
}
