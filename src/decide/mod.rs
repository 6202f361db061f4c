//! The decide stage: from scores to anomaly flags.
//!
//! An image is an anomaly when its score is strictly above the threshold. A `quantile`
//! threshold is the ⌈q·n⌉-th smallest of the n held-out calibration scores, so that at most a
//! fraction 1 − q of those scores lie above it, and about that fraction of new normal images
//! will be flagged; a `fixed` threshold is given in the config.

use crate::config::{ThresholdConfig, ThresholdMethod};
use crate::error::{Error, Result};
use crate::models::artifact::StoredThreshold;

/// The ⌈q·n⌉-th smallest of `sorted` (ascending, non-empty), for q in (0, 1).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    debug_assert!(!sorted.is_empty());
    debug_assert!(sorted.windows(2).all(|w| w[0] <= w[1]));
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The threshold in force for `config`, given the model's stored calibration scores.
///
/// A quantile threshold is recomputed from the calibration scores, so a scoring run may ask
/// for a different quantile than the fit did.
pub fn threshold(config: &ThresholdConfig, calibration: &[f64]) -> Result<StoredThreshold> {
    match config.method {
        ThresholdMethod::Quantile => {
            if calibration.is_empty() {
                return Err(Error::config(
                    "threshold.method",
                    "`quantile` needs the model's calibration scores, and this model has none: refit with train.validation_fraction > 0, or use threshold.method = \"fixed\"",
                ));
            }
            if calibration.len() < (1.0 / (1.0 - config.quantile)).ceil() as usize {
                tracing::warn!(
                    calibration = calibration.len(),
                    quantile = config.quantile,
                    "Too few held-out images for this quantile; the threshold is the largest calibration score."
                );
            }
            Ok(StoredThreshold {
                method: ThresholdMethod::Quantile,
                quantile: Some(config.quantile),
                value: quantile(calibration, config.quantile),
            })
        }
        ThresholdMethod::Fixed => Ok(StoredThreshold {
            method: ThresholdMethod::Fixed,
            quantile: None,
            value: config
                .value
                .ok_or_else(|| Error::config("threshold.value", "`fixed` needs threshold.value"))?,
        }),
        ThresholdMethod::Conformal => Err(Error::config(
            "threshold.method",
            "`conformal` is not supported yet",
        )),
    }
}

/// Whether `score` is an anomaly under `threshold`.
pub fn is_anomaly(score: f64, threshold: f64) -> bool {
    score > threshold
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_takes_the_ceiling_rank() {
        let s: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(quantile(&s, 0.9), 9.0);
        assert_eq!(quantile(&s, 0.91), 10.0);
        assert_eq!(quantile(&s, 0.05), 1.0);
        assert_eq!(quantile(&[3.0], 0.99), 3.0);
    }

    #[test]
    fn at_most_one_minus_q_of_the_calibration_scores_are_flagged() {
        let s: Vec<f64> = (0..1000).map(|i| f64::from(i) * 0.5).collect();
        for q in [0.5, 0.9, 0.99, 0.999] {
            let t = quantile(&s, q);
            let flagged = s.iter().filter(|&&x| is_anomaly(x, t)).count();
            assert!(
                flagged as f64 <= (1.0 - q) * 1000.0 + 1e-9,
                "q {q}: {flagged}"
            );
            assert!(
                flagged as f64 >= (1.0 - q) * 1000.0 - 1.0,
                "q {q}: {flagged}"
            );
        }
    }

    #[test]
    fn fixed_uses_the_configured_value() {
        let cfg = ThresholdConfig {
            method: ThresholdMethod::Fixed,
            value: Some(12.5),
            ..ThresholdConfig::default()
        };
        assert_eq!(threshold(&cfg, &[]).unwrap().value, 12.5);
        let q = ThresholdConfig::default();
        assert_eq!(threshold(&q, &[]).unwrap_err().exit_code(), 78);
    }
}
