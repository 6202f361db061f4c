//! Drift between nights: do tonight's scores still look like the calibration scores?
//!
//! Conformal p-values are uniform when the run's images are exchangeable with the model's
//! held-out (calibration) images. Testing the p-values against the uniform distribution as if
//! they were independent would be wrong: they all share one calibration set, so their empirical
//! distribution follows that set's own wobble (of order 1/√n) and a large run would "drift"
//! every night. The equivalent test that accounts for it is the two-sample Kolmogorov–Smirnov
//! test of the run's scores against the calibration scores (p-value uniform ⟺ same score
//! distribution), whose effective size is n·m/(n + m).
//!
//! A few true anomalies must not make a night drift: both samples are trimmed to the scores at
//! or below the calibration's (1 − [`TRIM`]) quantile before testing, so what the test sees is
//! the bulk of normal images, where a shift of the whole distribution shows.

use serde::{Deserialize, Serialize};

/// The share of the highest calibration scores (and of the run's scores above the same cut)
/// left out of the test: where anomalies live.
pub const TRIM: f64 = 0.05;

/// The significance level at which a run is said to drift (and a warning is logged).
pub const LEVEL: f64 = 0.01;

/// The two-sample test of one model's run scores against its calibration scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Drift {
    /// The Kolmogorov–Smirnov statistic: the largest gap between the two trimmed score
    /// distributions (0 = identical, 1 = disjoint).
    pub statistic: f64,
    /// Its p-value under "same distribution" (asymptotic Kolmogorov distribution).
    pub p_value: f64,
    /// Calibration scores tested (after trimming).
    pub calibration: u64,
    /// Run scores tested (after trimming).
    pub scored: u64,
    /// Whether `p_value` < [`LEVEL`].
    pub drifted: bool,
}

/// Tests `scores` (the run's, any order, finite) against `calibration` (the model's, any
/// order). `None` when either side has nothing to test.
pub fn test(calibration: &[f64], scores: &[f64]) -> Option<Drift> {
    let mut cal: Vec<f64> = calibration
        .iter()
        .copied()
        .filter(|s| s.is_finite())
        .collect();
    cal.sort_by(f64::total_cmp);
    if cal.is_empty() {
        return None;
    }
    let cut = super::quantile(&cal, 1.0 - TRIM);
    cal.retain(|&s| s <= cut);
    let mut run: Vec<f64> = scores
        .iter()
        .copied()
        .filter(|&s| s.is_finite() && s <= cut)
        .collect();
    run.sort_by(f64::total_cmp);
    if run.is_empty() {
        // Every image scored above the calibration's cut: as far from it as a run can be.
        return (!scores.is_empty()).then_some(Drift {
            statistic: 1.0,
            p_value: 0.0,
            calibration: cal.len() as u64,
            scored: 0,
            drifted: true,
        });
    }
    let statistic = ks_statistic(&cal, &run);
    let (n, m) = (cal.len() as f64, run.len() as f64);
    let p_value = kolmogorov_survival(statistic, n * m / (n + m));
    Some(Drift {
        statistic,
        p_value,
        calibration: cal.len() as u64,
        scored: run.len() as u64,
        drifted: p_value < LEVEL,
    })
}

/// sup |F_a − F_b| of two sorted, non-empty samples (ties counted on both sides at once).
pub fn ks_statistic(a: &[f64], b: &[f64]) -> f64 {
    let (mut i, mut j, mut d) = (0usize, 0usize, 0f64);
    while i < a.len() && j < b.len() {
        let x = a[i].min(b[j]);
        while i < a.len() && a[i] <= x {
            i += 1;
        }
        while j < b.len() && b[j] <= x {
            j += 1;
        }
        d = d.max((i as f64 / a.len() as f64 - j as f64 / b.len() as f64).abs());
    }
    d
}

/// P(D > `d`) for a Kolmogorov–Smirnov statistic of effective size `n`, with Stephens'
/// small-sample correction λ = (√n + 0.12 + 0.11/√n)·d and
/// Q(λ) = 2 Σ_{k≥1} (−1)^{k−1} exp(−2k²λ²).
pub fn kolmogorov_survival(d: f64, n: f64) -> f64 {
    let root = n.sqrt();
    let lambda = (root + 0.12 + 0.11 / root) * d;
    if lambda < 0.2 {
        // The series converges too slowly there; Q is 1 to many digits.
        return 1.0;
    }
    let mut sum = 0.0;
    let mut sign = 1.0;
    for k in 1..=100 {
        let term = (-2.0 * (k * k) as f64 * lambda * lambda).exp();
        sum += sign * term;
        if term < 1e-12 {
            break;
        }
        sign = -sign;
    }
    (2.0 * sum).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn normal(rng: &mut ChaCha8Rng, n: usize, shift: f64) -> Vec<f64> {
        (0..n)
            .map(|_| {
                // Box–Muller.
                let (u, v): (f64, f64) = (rng.random_range(1e-12..1.0), rng.random());
                shift + (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
            })
            .collect()
    }

    #[test]
    fn the_kolmogorov_distribution_matches_its_tabulated_values() {
        // Q(λ) for large n (the correction vanishes): tabulated values of the limit law.
        let n: f64 = 1e12;
        for (lambda, q) in [
            (0.5, 0.963945),
            (1.0, 0.269999),
            (1.36, 0.049414),
            (1.63, 0.0098),
        ] {
            let got = kolmogorov_survival(lambda / n.sqrt(), n);
            assert!((got - q).abs() < 2e-4, "Q({lambda}) = {got}, want {q}");
        }
    }

    #[test]
    fn the_statistic_is_the_largest_gap_between_the_two_distributions() {
        assert_eq!(ks_statistic(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]), 0.0);
        assert_eq!(ks_statistic(&[1.0, 2.0], &[3.0, 4.0]), 1.0);
        // F_a(1) = 1/2, F_b(1) = 0: gap 1/2 there, and nowhere larger.
        assert!((ks_statistic(&[1.0, 3.0], &[2.0, 4.0]) - 0.5).abs() < 1e-12);
        // Ties count on both sides: equal samples with repeats have no gap.
        assert_eq!(ks_statistic(&[1.0, 1.0, 2.0], &[1.0, 1.0, 2.0]), 0.0);
    }

    /// The calibration distribution itself, with 1% of planted anomalies far above it: over
    /// 400 seeds the test fires about as often as its level says (1% → 4 expected; more than
    /// 14 has probability below 1e-4 for a correct test), and no more.
    #[test]
    fn a_night_like_the_calibration_data_rarely_drifts() {
        let mut fired = 0;
        for seed in 0..400 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let cal = normal(&mut rng, 500, 0.0);
            let mut run = normal(&mut rng, 3000, 0.0);
            for s in run.iter_mut().take(30) {
                *s += 8.0;
            }
            let d = test(&cal, &run).unwrap();
            fired += usize::from(d.drifted);
        }
        eprintln!("fired on {fired} of 400 undrifted nights");
        assert!(fired <= 14, "fired on {fired} of 400 undrifted nights");
    }

    /// The same runs shifted by a quarter of a standard deviation: the test fires nearly always.
    #[test]
    fn a_shifted_night_drifts() {
        let mut fired = 0;
        for seed in 0..100 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let cal = normal(&mut rng, 500, 0.0);
            let run = normal(&mut rng, 3000, 0.25);
            fired += usize::from(test(&cal, &run).unwrap().drifted);
        }
        eprintln!("fired on {fired} of 100 shifted nights");
        assert!(fired >= 90, "fired on only {fired} of 100 shifted nights");
    }

    #[test]
    fn a_run_entirely_above_the_calibration_scores_drifts_and_an_empty_one_says_nothing() {
        let cal: Vec<f64> = (0..100).map(f64::from).collect();
        let d = test(&cal, &[500.0, 600.0]).unwrap();
        assert!(d.drifted && d.statistic == 1.0 && d.scored == 0);
        assert!(test(&cal, &[]).is_none());
        assert!(test(&[], &[1.0]).is_none());
    }
}
