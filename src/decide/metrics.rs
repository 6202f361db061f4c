//! How well scores and flags separate labelled anomalies from normal images: AUROC, average
//! precision (AUPRC), and the confusion counts of the flags.

use serde::Serialize;

/// Evaluation of one group of images. `anomaly` labels are the positives.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Evaluation {
    /// Images in the group.
    pub images: u64,
    /// Images labelled anomalous.
    pub anomalies: u64,
    /// Images flagged.
    pub flagged: u64,
    /// Flagged and anomalous.
    pub true_positives: u64,
    /// Flagged but normal.
    pub false_positives: u64,
    /// Area under the ROC curve of the score (ties count one half); `None` without both
    /// classes.
    pub auroc: Option<f64>,
    /// Average precision of the score over its distinct thresholds; `None` without anomalies.
    pub auprc: Option<f64>,
    /// TP / flagged (`None` when nothing is flagged).
    pub precision: Option<f64>,
    /// TP / anomalies (`None` without anomalies).
    pub recall: Option<f64>,
    /// Harmonic mean of precision and recall.
    pub f1: Option<f64>,
    /// The realised false discovery proportion FP / flagged (0 when nothing is flagged).
    pub fdr: f64,
}

/// Evaluates `(score, flagged, is anomaly)` triples.
pub fn evaluate(rows: &[(f64, bool, bool)]) -> Evaluation {
    let images = rows.len() as u64;
    let anomalies = rows.iter().filter(|r| r.2).count() as u64;
    let flagged = rows.iter().filter(|r| r.1).count() as u64;
    let true_positives = rows.iter().filter(|r| r.1 && r.2).count() as u64;
    let false_positives = flagged - true_positives;
    let ratio = |a: u64, b: u64| (b > 0).then(|| a as f64 / b as f64);
    let precision = ratio(true_positives, flagged);
    let recall = ratio(true_positives, anomalies);
    let f1 = match (precision, recall) {
        (Some(p), Some(r)) if p + r > 0.0 => Some(2.0 * p * r / (p + r)),
        (Some(_), Some(_)) => Some(0.0),
        _ => None,
    };
    Evaluation {
        images,
        anomalies,
        flagged,
        true_positives,
        false_positives,
        auroc: auroc(rows),
        auprc: average_precision(rows),
        precision,
        recall,
        f1,
        fdr: ratio(false_positives, flagged).unwrap_or(0.0),
    }
}

/// Rows sorted by descending score, split into runs of equal scores, as (anomalies, normals)
/// per run.
fn tied_groups(rows: &[(f64, bool, bool)]) -> Vec<(u64, u64)> {
    let mut sorted: Vec<(f64, bool)> = rows.iter().map(|r| (r.0, r.2)).collect();
    sorted.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut groups: Vec<(u64, u64)> = Vec::new();
    let mut last = None;
    for (score, anomaly) in sorted {
        if last != Some(score) {
            groups.push((0, 0));
            last = Some(score);
        }
        let g = groups.last_mut().expect("pushed");
        if anomaly {
            g.0 += 1;
        } else {
            g.1 += 1;
        }
    }
    groups
}

/// P(score of a random anomaly > score of a random normal image) + ½ P(equal).
pub fn auroc(rows: &[(f64, bool, bool)]) -> Option<f64> {
    let groups = tied_groups(rows);
    let (pos, neg): (u64, u64) = groups.iter().fold((0, 0), |a, g| (a.0 + g.0, a.1 + g.1));
    if pos == 0 || neg == 0 {
        return None;
    }
    // Walking down the scores: each anomaly beats every normal image below it.
    let mut normals_above = 0u64;
    let mut wins = 0.0;
    for &(a, n) in &groups {
        wins += a as f64 * (neg - normals_above - n) as f64 + 0.5 * (a * n) as f64;
        normals_above += n;
    }
    Some(wins / (pos * neg) as f64)
}

/// Σ over distinct score thresholds (descending) of (R_k − R_{k−1})·P_k.
pub fn average_precision(rows: &[(f64, bool, bool)]) -> Option<f64> {
    let groups = tied_groups(rows);
    let pos: u64 = groups.iter().map(|g| g.0).sum();
    if pos == 0 {
        return None;
    }
    let (mut tp, mut seen, mut ap) = (0u64, 0u64, 0.0);
    for &(a, n) in &groups {
        tp += a;
        seen += a + n;
        ap += (a as f64 / pos as f64) * (tp as f64 / seen as f64);
    }
    Some(ap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_hand_computed_example() {
        // Scores 0.1, 0.4 (normal) and 0.35, 0.8 (anomalous): of the four anomaly–normal pairs
        // three are ordered right, so AUROC = 3/4. Descending: 0.8 (a) P=1, 0.4 (n), 0.35 (a)
        // P=2/3, 0.1 (n): AP = ½·1 + ½·⅔ = 5/6.
        let rows = [
            (0.1, false, false),
            (0.4, true, false),
            (0.35, false, true),
            (0.8, true, true),
        ];
        let e = evaluate(&rows);
        assert_eq!(e.auroc, Some(0.75));
        assert!((e.auprc.unwrap() - 5.0 / 6.0).abs() < 1e-12);
        assert_eq!((e.flagged, e.true_positives, e.false_positives), (2, 1, 1));
        assert_eq!(e.precision, Some(0.5));
        assert_eq!(e.recall, Some(0.5));
        assert_eq!(e.f1, Some(0.5));
        assert_eq!(e.fdr, 0.5);
    }

    #[test]
    fn ties_count_one_half_and_degenerate_groups_have_no_auroc() {
        let rows = [(1.0, false, true), (1.0, false, false)];
        assert_eq!(auroc(&rows), Some(0.5));
        assert_eq!(auroc(&[(1.0, false, false)]), None);
        let e = evaluate(&[(1.0, false, false)]);
        assert_eq!(
            (e.auprc, e.recall, e.precision, e.fdr),
            (None, None, None, 0.0)
        );
    }

    #[test]
    fn auroc_agrees_with_counting_every_pair() {
        let rows: Vec<(f64, bool, bool)> = (0..200)
            .map(|i| (f64::from((i * 37) % 23), false, (i * 13) % 7 < 2))
            .collect();
        let (mut wins, mut pairs) = (0.0, 0.0);
        for a in rows.iter().filter(|r| r.2) {
            for n in rows.iter().filter(|r| !r.2) {
                pairs += 1.0;
                wins += if a.0 > n.0 {
                    1.0
                } else if a.0 == n.0 {
                    0.5
                } else {
                    0.0
                };
            }
        }
        assert!((auroc(&rows).unwrap() - wins / pairs).abs() < 1e-12);
    }
}
