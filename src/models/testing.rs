//! Test helpers shared by every model's tests.
use ndarray::ArrayView2;

use super::DensityModel;

/// Every image of D pixels with `levels` values, in lexicographic order.
pub fn all_images(dims: usize, levels: u16) -> Vec<Vec<u8>> {
    let total = (levels as usize).pow(dims as u32);
    (0..total)
        .map(|mut k| {
            (0..dims)
                .map(|_| {
                    let v = (k % levels as usize) as u8;
                    k /= levels as usize;
                    v
                })
                .collect()
        })
        .collect()
}

/// Σ over all images of p(x), summed in f64.
pub fn total_probability(model: &dyn DensityModel) -> f64 {
    all_images(model.shape().dims(), model.levels())
        .iter()
        .map(|x| model.log_likelihood(x).exp())
        .sum()
}

/// Draws `n` images and checks their histogram against the exact p(x) of every image with a
/// chi-square test at the 99.9th percentile (Wilson–Hilferty), so a sampler that disagrees
/// with the likelihood fails. For small D only: every image is a category.
pub fn assert_samples_follow_the_model(model: &dyn DensityModel, n: u32, seed: u64) {
    use rand::SeedableRng;
    let (dims, levels) = (model.shape().dims(), usize::from(model.levels()));
    let index = |x: &[u8]| x.iter().rev().fold(0, |k, &v| k * levels + usize::from(v));
    let images = all_images(dims, model.levels());
    let mut counts = vec![0u32; images.len()];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut img = vec![0u8; dims];
    for _ in 0..n {
        model.sample(&mut rng, &mut img);
        counts[index(&img)] += 1;
    }
    let chi2: f64 = images
        .iter()
        .map(|x| {
            let expected = f64::from(n) * model.log_likelihood(x).exp();
            (f64::from(counts[index(x)]) - expected).powi(2) / expected
        })
        .sum();
    let dof = (images.len() - 1) as f64;
    let q = 2.0 / (9.0 * dof);
    let critical = dof * (1.0 - q + 3.09 * q.sqrt()).powi(3);
    assert!(
        chi2 < critical,
        "chi-square {chi2} ≥ {critical} ({dof} degrees of freedom)"
    );
}

/// `n` binary images of `d` pixels in which each pixel copies its predecessor with
/// probability 0.9: far more likely under a chain rule than under independent pixels.
pub fn sticky_chains(n: usize, d: usize, seed: u64) -> ndarray::Array2<u8> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut x = ndarray::Array2::<u8>::zeros((n, d));
    for mut row in x.rows_mut() {
        let mut prev = rng.random_bool(0.5);
        for v in row.iter_mut() {
            prev = if rng.random_bool(0.9) { prev } else { !prev };
            *v = u8::from(prev);
        }
    }
    x
}

/// `n` one-pixel RGB images in a chain R → G → B: R uniform on 20..236, G = R plus noise
/// uniform on −[`CHAIN_NOISE`]..=[`CHAIN_NOISE`], and B = 255 − G. In R, G, B order, G is
/// uncertain given R (about ln(2·CHAIN_NOISE + 1) nats) and B certain given G; a model that
/// took the channels in another order (R, B, G: B uncertain, G certain) or that let B see R
/// but not G (B as uncertain as G) shows it in the per-channel NLL.
pub fn chained_channels(n: usize, seed: u64) -> ndarray::Array2<u8> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut v = Vec::with_capacity(n * 3);
    for _ in 0..n {
        let r: i32 = rng.random_range(20..236);
        let g = (r + rng.random_range(-CHAIN_NOISE..=CHAIN_NOISE)).clamp(0, 255) as u8;
        v.extend([r as u8, g, 255 - g]);
    }
    ndarray::Array2::from_shape_vec((n, 3), v).unwrap()
}

/// `n` one-pixel binary RGB images in a chain R → G → B: R a fair coin, G = R flipped with
/// probability 1/4, B = G flipped with probability 1/32, as training data (levels 2).
pub fn binary_chained_channels(n: usize, seed: u64) -> ndarray::Array2<u8> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut v = Vec::with_capacity(n * 3);
    for _ in 0..n {
        let r = rng.random_bool(0.5);
        let g = r ^ rng.random_bool(0.25);
        let b = g ^ rng.random_bool(1.0 / 32.0);
        v.extend([u8::from(r), u8::from(g), u8::from(b)]);
    }
    ndarray::Array2::from_shape_vec((n, 3), v).unwrap()
}

/// Fits a binary model with `fit` (given the data and the training settings) on 2,000 images of
/// [`binary_chained_channels`] and checks it on 1,000 more with
/// [`assert_binary_chain_in_rgb_order`].
pub fn check_binary_chain<M: DensityModel>(
    fit: impl FnOnce(&crate::train::TrainingSet<'_>, &crate::train::TrainSettings) -> M,
) {
    let x = binary_chained_channels(3000, 5);
    let (train, valid) = x.view().split_at(ndarray::Axis(0), 2000);
    let data = crate::train::TrainingSet {
        shape: crate::data::ImageShape::new(1, 1, 3),
        levels: 2,
        pixels: train,
        validation: valid,
        redraw: None,
    };
    let settings = crate::train::TrainSettings {
        epochs: 60,
        batch_size: 50,
        learning_rate: 0.05,
        patience: 10,
        anneal: 0,
        weight_decay: 0.0,
        seed: 1,
        ..crate::train::TrainSettings::default()
    };
    let model = fit(&data, &settings);
    assert_binary_chain_in_rgb_order(&model, valid);
    assert_samples_follow_the_binary_chain(&model);
}

/// The share of `n` images drawn from `model` (one pixel, three channels) for which each
/// `test` holds.
pub fn sampled_share<const T: usize>(
    model: &dyn DensityModel,
    n: usize,
    tests: [&dyn Fn([u8; 3]) -> bool; T],
) -> [f64; T] {
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let mut img = [0u8; 3];
    let mut held = [0usize; T];
    for _ in 0..n {
        model.sample(&mut rng, &mut img);
        for (count, test) in held.iter_mut().zip(&tests) {
            *count += usize::from(test(img));
        }
    }
    let shares = held.map(|h| h as f64 / n as f64);
    eprintln!("sampled shares {shares:?}");
    shares
}

/// Checks that images drawn from a binary model fitted on [`binary_chained_channels`] follow
/// the chain channel by channel: R a fair coin, G unlike R a quarter of the time, B unlike G
/// 1/32 of it. A sampler that drew the channels in another order than the likelihood uses, or
/// independently, puts G unlike R half of the time or B unlike G far more often.
pub fn assert_samples_follow_the_binary_chain(model: &dyn DensityModel) {
    let shares = sampled_share(
        model,
        4000,
        [&|x| x[0] == 1, &|x| x[1] != x[0], &|x| x[2] != x[1]],
    );
    let [r_on, g_flipped, b_flipped] = shares;
    assert!((r_on - 0.5).abs() < 0.04, "R on: {shares:?}");
    assert!((g_flipped - 0.25).abs() < 0.04, "G unlike R: {shares:?}");
    assert!(b_flipped < 0.07, "B unlike G: {shares:?}");
}

/// Checks that images drawn from an 8-bit model fitted on [`chained_channels`] follow the
/// chain: G within the noise of R and B = 255 − G, give or take `b_slack` levels, in at least
/// 85% of them (independent channels would put G near R in about 15% of images).
pub fn assert_samples_follow_the_chain(model: &dyn DensityModel, b_slack: i32) {
    let near = |a: u8, b: i32, within: i32| (i32::from(a) - b).abs() <= within;
    let shares = sampled_share(
        model,
        2000,
        [
            &|x| (16..240).contains(&x[0]),
            &|x| near(x[1], i32::from(x[0]), CHAIN_NOISE + 2),
            &|x| near(x[2], 255 - i32::from(x[1]), b_slack),
        ],
    );
    assert!(
        shares.iter().all(|&s| s >= 0.85),
        "R in range, G near R, B = 255 − G: {shares:?}"
    );
}

/// Checks a binary model fitted on [`binary_chained_channels`] took the channels in R, G, B
/// order with B seeing G: R costs ln 2, G given R the entropy of its 1/4 flip (0.562 nats), B
/// given G that of its 1/32 flip (0.139). In R, B, G order, or with B blind to G, B would cost
/// about 0.58 nats (R predicts it through G's flip and B's).
pub fn assert_binary_chain_in_rgb_order(model: &dyn DensityModel, pixels: ArrayView2<'_, u8>) {
    let entropy = |p: f64| -(p * p.ln() + (1.0 - p) * (1.0 - p).ln());
    let [r, g, b] = per_channel_nll(model, pixels);
    let nll = [r, g, b];
    assert!((r - std::f64::consts::LN_2).abs() < 0.05, "R: {nll:?}");
    assert!((g - entropy(0.25)).abs() < 0.06, "G given R: {nll:?}");
    assert!(b < entropy(1.0 / 32.0) + 0.12, "B given G: {nll:?}");
}

/// The half-width of G's noise around R in [`chained_channels`].
pub const CHAIN_NOISE: i32 = 16;

/// Mean −log p(x_c | x_<c) of each channel over one-pixel RGB images.
pub fn per_channel_nll(model: &dyn DensityModel, pixels: ArrayView2<'_, u8>) -> [f64; 3] {
    let mut per_channel = [0f64; 3];
    let mut map = [0f32; 3];
    for row in pixels.rows() {
        model.pixel_log_likelihood(row.as_slice().unwrap(), &mut map);
        for (total, &m) in per_channel.iter_mut().zip(&map) {
            *total -= f64::from(m) / pixels.nrows() as f64;
        }
    }
    per_channel
}

/// Checks that the per-pixel map sums to the log-likelihood on a few images.
pub fn assert_maps_sum_to_likelihood(model: &dyn DensityModel, images: &[Vec<u8>]) {
    for x in images {
        let mut map = vec![0f32; x.len()];
        let total = model.pixel_log_likelihood(x, &mut map);
        let ll = model.log_likelihood(x);
        assert!(
            (total - ll).abs() < 1e-9 * ll.abs().max(1.0),
            "{total} vs {ll}"
        );
        let summed: f64 = map.iter().map(|&v| f64::from(v)).sum();
        assert!(
            (summed - ll).abs() < 1e-4 * ll.abs().max(1.0),
            "{summed} vs {ll}"
        );
    }
}
