//! The decide stage: from scores to anomaly flags.
//!
//! An image is an anomaly when its score is strictly above the threshold. A `quantile`
//! threshold is the ⌈q·n⌉-th smallest of the n held-out calibration scores, so that at most a
//! fraction 1 − q of those scores lie above it, and about that fraction of new normal images
//! will be flagged; a `fixed` threshold is given in the config. A `conformal` threshold is
//! decided per run: every image gets a conformal p-value against the calibration scores, and
//! Benjamini–Hochberg at `fdr` over the run's p-values picks which are flagged
//! ([`conformal`]), bounding the expected share of normal images among the flagged.

pub mod conformal;
pub mod drift;
pub mod groups;
pub mod metrics;

use crate::config::{ThresholdConfig, ThresholdMethod};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// The threshold stored with a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredThreshold {
    /// How it was chosen.
    pub method: ThresholdMethod,
    /// The quantile, for `quantile`.
    pub quantile: Option<f64>,
    /// The score above which an image is an anomaly. For `conformal` it is decided per run
    /// (Benjamini–Hochberg over the run's p-values); a model stores the threshold that would
    /// hold for a run of one image.
    pub value: f64,
    /// The false discovery rate, for `conformal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fdr: Option<f64>,
}

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
                return Err(Error::setting(
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
                fdr: None,
            })
        }
        ThresholdMethod::Fixed => Ok(StoredThreshold {
            method: ThresholdMethod::Fixed,
            quantile: None,
            value: config.value.ok_or_else(|| {
                Error::setting("threshold.value", "`fixed` needs threshold.value")
            })?,
            fdr: None,
        }),
        ThresholdMethod::Conformal => {
            if calibration.is_empty() {
                return Err(Error::setting(
                    "threshold.method",
                    "`conformal` needs the model's calibration scores, and this model has none: refit with train.validation_fraction > 0",
                ));
            }
            if conformal::smallest_p_value(calibration.len()) > config.fdr {
                tracing::warn!(
                    calibration = calibration.len(),
                    fdr = config.fdr,
                    "Too few held-out images for this false discovery rate: no p-value can be small enough, so nothing will be flagged. Hold out at least 1/fdr images."
                );
            }
            Ok(StoredThreshold {
                method: ThresholdMethod::Conformal,
                quantile: None,
                value: conformal::score_threshold(calibration, Some(config.fdr)),
                fdr: Some(config.fdr),
            })
        }
    }
}

/// The threshold of one run under `conformal`: Benjamini–Hochberg at the stored `fdr` over the
/// run's `scores`; other methods keep their threshold.
pub fn run_threshold(
    stored: &StoredThreshold,
    calibration: &[f64],
    scores: &[f64],
) -> StoredThreshold {
    match (stored.method, stored.fdr) {
        (ThresholdMethod::Conformal, Some(fdr)) => {
            // BH needs k of the m p-values at or below k·fdr/m, and none is below 1/(n + 1).
            let fewest =
                (scores.len() as f64 * conformal::smallest_p_value(calibration.len()) / fdr).ceil();
            if fewest > 1.0 {
                tracing::warn!(
                    calibration = calibration.len(),
                    images = scores.len(),
                    fdr,
                    fewest_flaggable = fewest,
                    "With this few calibration scores, a run of this size flags nothing unless it holds at least `fewest_flaggable` clear anomalies; hold out more images (train.validation_fraction) or raise threshold.fdr."
                );
            }
            let p: Vec<f64> = scores
                .iter()
                .map(|&s| conformal::p_value(calibration, s))
                .collect();
            StoredThreshold {
                value: conformal::score_threshold(
                    calibration,
                    conformal::benjamini_hochberg(&p, fdr),
                ),
                ..stored.clone()
            }
        }
        _ => stored.clone(),
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
