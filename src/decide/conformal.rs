//! Conformal p-values and the Benjamini–Hochberg procedure.
//!
//! A model keeps the scores of held-out images it was not fitted on (the calibration set). For
//! a new image with score s, p = (1 + #{calibration scores ≥ s}) / (n + 1) is a valid p-value
//! under the null "the image is exchangeable with the calibration images": P(p ≤ α) ≤ α
//! (Bates et al. 2023). Flagging a run's images by Benjamini–Hochberg at level α then keeps the
//! expected share of normal images among the flagged ones at or below α (conformal p-values
//! are positively dependent, which BH tolerates).

/// p = (1 + #{c ≥ score}) / (n + 1) against `sorted` (ascending) calibration scores.
pub fn p_value(sorted: &[f64], score: f64) -> f64 {
    let below = sorted.partition_point(|&c| c < score);
    (1 + sorted.len() - below) as f64 / (sorted.len() + 1) as f64
}

/// The Benjamini–Hochberg cutoff at level `alpha`: the largest p_(k) with p_(k) ≤ k·α/m over
/// the m p-values, or `None` when nothing is discovered. Reject (flag) every p ≤ the cutoff.
pub fn benjamini_hochberg(p_values: &[f64], alpha: f64) -> Option<f64> {
    let mut sorted = p_values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let m = sorted.len() as f64;
    sorted
        .iter()
        .enumerate()
        .rev()
        .find(|&(k, &p)| p <= (k + 1) as f64 * alpha / m)
        .map(|(_, &p)| p)
}

/// The score threshold equivalent to flagging p ≤ `cutoff`: an image is flagged exactly when
/// its score is strictly above the returned value (+∞ when `cutoff` is `None`: nothing is).
pub fn score_threshold(sorted: &[f64], cutoff: Option<f64>) -> f64 {
    let Some(cutoff) = cutoff else {
        return f64::INFINITY;
    };
    let n = sorted.len();
    // p(s) ≤ cutoff ⟺ #{c ≥ s} ≤ K, with K = ⌊(n + 1)·cutoff⌋ − 1 (a small tolerance absorbs
    // the rounding of cutoff, which is itself one of the values (j + 1)/(n + 1)).
    let k = ((n + 1) as f64 * cutoff + 1e-9).floor() as i64 - 1;
    if k < 0 {
        f64::INFINITY
    } else if k as usize >= n {
        f64::NEG_INFINITY
    } else {
        // #{c ≥ s} ≤ K ⟺ s > the (n − K)-th smallest calibration score.
        sorted[n - 1 - k as usize]
    }
}

/// The smallest level at which even a run made only of anomalies could flag anything: with n
/// calibration scores the smallest p-value is 1 / (n + 1).
pub fn smallest_p_value(calibration: usize) -> f64 {
    1.0 / (calibration + 1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn p_values_count_calibration_scores_at_or_above() {
        let cal = [1.0, 2.0, 2.0, 3.0];
        assert_eq!(p_value(&cal, 0.5), 1.0);
        assert_eq!(p_value(&cal, 2.0), 4.0 / 5.0);
        assert_eq!(p_value(&cal, 2.5), 2.0 / 5.0);
        assert_eq!(p_value(&cal, 9.0), 1.0 / 5.0);
    }

    #[test]
    fn p_values_of_exchangeable_scores_are_uniform() {
        // Kolmogorov–Smirnov against U(0, 1) on 4,000 test scores from the calibration law.
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut cal: Vec<f64> = (0..2000).map(|_| rng.random::<f64>().ln()).collect();
        cal.sort_by(f64::total_cmp);
        let mut p: Vec<f64> = (0..4000)
            .map(|_| p_value(&cal, rng.random::<f64>().ln()))
            .collect();
        p.sort_by(f64::total_cmp);
        let n = p.len() as f64;
        let d = p
            .iter()
            .enumerate()
            .map(|(i, &v)| (v - i as f64 / n).abs().max(((i + 1) as f64 / n - v).abs()))
            .fold(0.0, f64::max);
        // The 99.9% critical value 1.95/√n, plus the 1/(n_cal + 1) granularity of p.
        let critical = 1.95 / n.sqrt() + 1.0 / 2001.0;
        assert!(d < critical, "KS distance {d} ≥ {critical}");
    }

    #[test]
    fn benjamini_hochberg_takes_the_largest_passing_rank() {
        let p = [0.01, 0.04, 0.03, 0.5, 0.2];
        // Sorted: 0.01 ≤ 0.02, 0.03 ≤ 0.04, 0.04 ≤ 0.06, 0.2 > 0.08, 0.5 > 0.1.
        assert_eq!(benjamini_hochberg(&p, 0.1), Some(0.04));
        assert_eq!(benjamini_hochberg(&p, 0.001), None);
        assert_eq!(benjamini_hochberg(&[], 0.1), None);
    }

    #[test]
    fn the_score_threshold_flags_exactly_the_rejected_p_values() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let mut cal: Vec<f64> = (0..300)
            .map(|_| f64::from(rng.random_range(0..50u8)))
            .collect();
        cal.sort_by(f64::total_cmp);
        for cutoff in [None, Some(1.0 / 301.0), Some(0.05), Some(0.5), Some(1.0)] {
            let t = score_threshold(&cal, cutoff);
            for s in (-10..70).map(|i| f64::from(i) * 0.75) {
                let flagged_by_p = cutoff.is_some_and(|c| p_value(&cal, s) <= c + 1e-12);
                assert_eq!(
                    s > t,
                    flagged_by_p,
                    "score {s}, cutoff {cutoff:?}, threshold {t}"
                );
            }
        }
    }

    #[test]
    fn the_realised_false_discovery_rate_stays_at_the_level() {
        // 5% planted anomalies, scored higher on average; the false discovery proportion is
        // averaged over 200 runs, each with its own calibration set (the guarantee is over both).
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let normal = |rng: &mut ChaCha8Rng| -> f64 { -rng.random::<f64>().ln() };
        let alpha = 0.1;
        let (mut fdp_sum, mut power_sum) = (0.0, 0.0);
        let runs = 200;
        for _ in 0..runs {
            let mut cal: Vec<f64> = (0..1000).map(|_| normal(&mut rng)).collect();
            cal.sort_by(f64::total_cmp);
            let items: Vec<(f64, bool)> = (0..400)
                .map(|i| {
                    let anomaly = i % 20 == 0;
                    let s = normal(&mut rng) + if anomaly { 7.0 } else { 0.0 };
                    (p_value(&cal, s), anomaly)
                })
                .collect();
            let p: Vec<f64> = items.iter().map(|x| x.0).collect();
            let cutoff = benjamini_hochberg(&p, alpha);
            let flagged: Vec<bool> = items
                .iter()
                .map(|x| cutoff.is_some_and(|c| x.0 <= c))
                .collect();
            let false_flags = flagged
                .iter()
                .zip(&items)
                .filter(|(f, x)| **f && !x.1)
                .count();
            let true_flags = flagged
                .iter()
                .zip(&items)
                .filter(|(f, x)| **f && x.1)
                .count();
            let total = false_flags + true_flags;
            fdp_sum += if total == 0 {
                0.0
            } else {
                false_flags as f64 / total as f64
            };
            power_sum += true_flags as f64 / 20.0;
        }
        let fdr = fdp_sum / f64::from(runs);
        assert!(fdr <= alpha, "realised FDR {fdr} > {alpha}");
        let power = power_sum / f64::from(runs);
        assert!(
            power > 0.5,
            "BH found only {power} of the planted anomalies"
        );
    }
}
