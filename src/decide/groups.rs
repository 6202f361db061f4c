//! Groups of anomalies: a run's flagged images clustered on their embeddings, so that an analyst
//! sees how many different kinds of anomaly the night produced and one example row per kind.
//!
//! The embeddings are centred on their mean and scaled to unit length (groups by direction from
//! what the anomalies share, as the nearest normal images are found by centred cosine) and
//! clustered by linfa's k-means for every k from 2 to [`MAX_GROUPS`];
//! the k with the best mean silhouette wins, and one group is kept when no k reaches
//! [`MIN_SILHOUETTE`] (no clear structure) or there are too few images to tell. Groups are
//! numbered by size, largest first. Clustering runs on at most [`MAX_CLUSTERED`] images
//! (evenly spaced over the run); the rest join their nearest centre, which bounds the
//! silhouette's quadratic cost.

use linfa::prelude::*;
use linfa_clustering::KMeans;
use ndarray_linfa::{Array1, Array2};

/// The most groups a run's anomalies are split into.
pub const MAX_GROUPS: usize = 8;

/// The least mean silhouette (in [−1, 1]) a split into groups must reach; below it the
/// anomalies form one group.
pub const MIN_SILHOUETTE: f64 = 0.1;

/// Each group of a split has on average at least this many images.
pub const MIN_PER_GROUP: usize = 3;

/// The most images clustered directly; the others join their nearest centre.
pub const MAX_CLUSTERED: usize = 1000;

/// A grouping of n images.
#[derive(Debug, Clone, PartialEq)]
pub struct Groups {
    /// Each image's group, 0 the largest.
    pub labels: Vec<u32>,
    /// Images per group, largest first.
    pub sizes: Vec<u64>,
    /// The mean silhouette of the chosen split (`None` for one group).
    pub silhouette: Option<f64>,
}

/// Groups the images whose embeddings are the rows of `embeddings` (`width` values each).
pub fn group(embeddings: &[f32], width: usize) -> Groups {
    let n = embeddings.len().checked_div(width).unwrap_or(0);
    let one = || Groups {
        labels: vec![0; n],
        sizes: if n > 0 { vec![n as u64] } else { Vec::new() },
        silhouette: None,
    };
    if n < 2 * MIN_PER_GROUP {
        return one();
    }
    let unit = Array2::from_shape_fn((n, width), |(i, j)| f64::from(embeddings[i * width + j]));
    let unit = normalized(unit);
    let step = n.div_ceil(MAX_CLUSTERED);
    let sample = unit.slice(ndarray_linfa::s![..;step, ..]).to_owned();
    let most = MAX_GROUPS.min(sample.nrows() / MIN_PER_GROUP);
    let mut best: Option<(f64, Array2<f64>)> = None;
    for k in 2..=most {
        let data = DatasetBase::from(sample.clone());
        let Ok(model) = KMeans::params(k)
            .n_runs(4)
            .max_n_iterations(200)
            .tolerance(1e-6)
            .fit(&data)
        else {
            continue;
        };
        let labels: Array1<usize> = model.predict(&sample);
        let Ok(silhouette) = DatasetBase::new(sample.clone(), labels).silhouette_score() else {
            continue;
        };
        if best.as_ref().is_none_or(|(s, _)| silhouette > *s) {
            best = Some((silhouette, model.centroids().clone()));
        }
    }
    let Some((silhouette, centres)) = best.filter(|(s, _)| *s >= MIN_SILHOUETTE) else {
        return one();
    };
    let nearest: Vec<usize> = unit
        .rows()
        .into_iter()
        .map(|row| {
            let distance = |c: usize| {
                let d = &row - &centres.row(c);
                d.dot(&d)
            };
            (0..centres.nrows())
                .min_by(|&a, &b| distance(a).total_cmp(&distance(b)))
                .expect("at least two centres")
        })
        .collect();
    by_size(&nearest, centres.nrows(), silhouette)
}

/// Rows centred on their mean and scaled to unit length (a zero row stays zero).
fn normalized(mut rows: Array2<f64>) -> Array2<f64> {
    if let Some(mean) = rows.mean_axis(ndarray_linfa::Axis(0)) {
        rows -= &mean;
    }
    for mut row in rows.rows_mut() {
        let norm = row.dot(&row).sqrt();
        if norm > 0.0 {
            row /= norm;
        }
    }
    rows
}

/// Renumbers `labels` (of `k` groups) by group size, largest first (ties: the lower label).
fn by_size(labels: &[usize], k: usize, silhouette: f64) -> Groups {
    let mut counts = vec![0u64; k];
    labels.iter().for_each(|&l| counts[l] += 1);
    let mut order: Vec<usize> = (0..k).filter(|&l| counts[l] > 0).collect();
    order.sort_by(|&a, &b| counts[b].cmp(&counts[a]).then(a.cmp(&b)));
    let mut rank = vec![0u32; k];
    for (r, &l) in order.iter().enumerate() {
        rank[l] = r as u32;
    }
    Groups {
        labels: labels.iter().map(|&l| rank[l]).collect(),
        sizes: order.iter().map(|&l| counts[l]).collect(),
        silhouette: Some(silhouette),
    }
}

/// The adjusted Rand index of two labellings of the same items: 1 for the same partition, about
/// 0 for independent ones (Hubert & Arabie 1985).
pub fn adjusted_rand_index(a: &[u32], b: &[u32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let pairs = |n: u64| (n * n.saturating_sub(1) / 2) as f64;
    let mut table: std::collections::HashMap<(u32, u32), u64> = Default::default();
    let (mut rows, mut cols): (
        std::collections::HashMap<u32, u64>,
        std::collections::HashMap<u32, u64>,
    ) = Default::default();
    for (&x, &y) in a.iter().zip(b) {
        *table.entry((x, y)).or_default() += 1;
        *rows.entry(x).or_default() += 1;
        *cols.entry(y).or_default() += 1;
    }
    let index: f64 = table.values().map(|&n| pairs(n)).sum();
    let row_pairs: f64 = rows.values().map(|&n| pairs(n)).sum();
    let col_pairs: f64 = cols.values().map(|&n| pairs(n)).sum();
    let expected = row_pairs * col_pairs / pairs(a.len() as u64).max(1.0);
    let max = (row_pairs + col_pairs) / 2.0;
    if max == expected {
        return 1.0;
    }
    (index - expected) / (max - expected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// `sizes[c]` points around each of `sizes.len()` random directions in `width` dimensions,
    /// with noise `spread`; returns the points (shuffled) and their true cluster.
    fn blobs(sizes: &[usize], width: usize, spread: f32, seed: u64) -> (Vec<f32>, Vec<u32>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let centres: Vec<Vec<f32>> = sizes
            .iter()
            .map(|_| (0..width).map(|_| rng.random_range(0.0..1.0)).collect())
            .collect();
        let mut points: Vec<(u32, Vec<f32>)> = Vec::new();
        for (c, &n) in sizes.iter().enumerate() {
            for _ in 0..n {
                let p = centres[c]
                    .iter()
                    .map(|&v| (v + spread * rng.random_range(-1.0..1.0f32)).max(0.0))
                    .collect();
                points.push((c as u32, p));
            }
        }
        for i in (1..points.len()).rev() {
            points.swap(i, rng.random_range(0..=i));
        }
        let truth = points.iter().map(|p| p.0).collect();
        (points.into_iter().flat_map(|p| p.1).collect(), truth)
    }

    #[test]
    fn planted_groups_are_recovered_and_numbered_by_size() {
        for (sizes, seed) in [
            (vec![40, 25], 1),
            (vec![30, 20, 12], 2),
            (vec![50, 9, 30, 20], 3),
        ] {
            let (x, truth) = blobs(&sizes, 24, 0.15, seed);
            let g = group(&x, 24);
            assert_eq!(g.sizes.len(), sizes.len(), "{sizes:?}: {g:?}");
            let ari = adjusted_rand_index(&g.labels, &truth);
            assert!(ari > 0.95, "{sizes:?}: ARI {ari}");
            let mut want = sizes.clone();
            want.sort_unstable_by(|a, b| b.cmp(a));
            assert_eq!(g.sizes, want.iter().map(|&s| s as u64).collect::<Vec<_>>());
            assert_eq!(g.labels.iter().filter(|&&l| l == 0).count(), want[0]);
        }
    }

    #[test]
    fn structureless_or_few_anomalies_form_one_group() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        let noise: Vec<f32> = (0..200 * 32).map(|_| rng.random_range(-1.0..1.0)).collect();
        let g = group(&noise, 32);
        assert_eq!(g.sizes, vec![200], "{:?}", g.silhouette);
        let (x, _) = blobs(&[3, 2], 8, 0.05, 5);
        assert_eq!(group(&x, 8).sizes, vec![5]);
        assert_eq!(group(&[], 8).sizes, Vec::<u64>::new());
    }

    #[test]
    fn many_anomalies_are_clustered_on_a_sample_and_all_assigned() {
        let (x, truth) = blobs(&[1500, 900], 16, 0.15, 6);
        let g = group(&x, 16);
        assert_eq!(g.labels.len(), 2400);
        assert!(adjusted_rand_index(&g.labels, &truth) > 0.95);
    }

    #[test]
    fn the_adjusted_rand_index_is_one_for_the_same_partition_and_near_zero_for_chance() {
        assert_eq!(adjusted_rand_index(&[0, 0, 1, 1, 2], &[5, 5, 3, 3, 9]), 1.0);
        assert!(adjusted_rand_index(&[0, 0, 1, 1], &[0, 1, 0, 1]) < 0.0);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let a: Vec<u32> = (0..4000).map(|_| rng.random_range(0..4)).collect();
        let b: Vec<u32> = (0..4000).map(|_| rng.random_range(0..3)).collect();
        assert!(adjusted_rand_index(&a, &b).abs() < 0.02);
    }
}
