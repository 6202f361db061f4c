//! `categorical`: every pixel independent with its own distribution over the K levels
//! (K = 256 for 8-bit pixels, 2 after binarization): p(x) = Π_d π_{d, x_d}.
//!
//! D·(K − 1) free parameters, fitted in one pass by counting with Laplace (add-alpha)
//! smoothing: π_{d,v} = (n_{d,v} + α) / (n + Kα). The 8-bit baseline.

use rand::RngCore;
use serde_json::json;

use crate::data::ImageShape;
use crate::models::shared::{inverse_cdf, tensor, uniform, value_counts};
use crate::models::{DensityModel, Family, ModelError, NamedTensor};
use crate::train::TrainingSet;

/// Independent categorical pixels.
#[derive(Debug, Clone)]
pub struct Categorical {
    shape: ImageShape,
    levels: u16,
    alpha: f64,
    /// log π_{d,v} at `d * levels + v`.
    log_prob: Vec<f64>,
}

impl Categorical {
    /// Fits by counting, in parallel over images.
    pub fn fit(alpha: f64, data: &TrainingSet<'_>) -> Self {
        let k = data.levels as usize;
        let n = data.pixels.nrows();
        let counts = value_counts(data);
        let denominator = (n as f64 + k as f64 * alpha).ln();
        let log_prob = counts
            .iter()
            .map(|&c| (c as f64 + alpha).ln() - denominator)
            .collect();
        Self {
            shape: data.shape,
            levels: data.levels,
            alpha,
            log_prob,
        }
    }

    /// Rebuilds the model from model.safetensors.
    pub fn from_tensors(
        shape: ImageShape,
        levels: u16,
        hyperparameters: &serde_json::Value,
        tensors: &[NamedTensor],
    ) -> Result<Self, ModelError> {
        if !matches!(levels, 2..=256) {
            return Err(ModelError::invalid(format!(
                "levels is {levels}, expected 2 to 256"
            )));
        }
        let k = levels as usize;
        let log_prob = tensor(tensors, "log_prob", shape.dims() * k)?;
        for (d, row) in log_prob.chunks(k).enumerate() {
            let total: f64 = row.iter().map(|l| l.exp()).sum();
            if !(total - 1.0).abs().lt(&1e-6) || row.iter().any(|l| l.is_nan()) {
                return Err(ModelError::invalid(format!(
                    "tensor `log_prob`: the distribution of pixel {d} sums to {total}, not 1"
                )));
            }
        }
        let alpha = hyperparameters["alpha"].as_f64().unwrap_or(1.0);
        Ok(Self {
            shape,
            levels,
            alpha,
            log_prob: log_prob.to_vec(),
        })
    }

    fn log_p(&self, d: usize, x: u8) -> f64 {
        let k = self.levels as usize;
        self.log_prob[d * k + usize::from(x).min(k - 1)]
    }
}

impl DensityModel for Categorical {
    fn kind(&self) -> &'static str {
        <super::Categorical as Family>::NAME
    }

    fn shape(&self) -> ImageShape {
        self.shape
    }

    fn levels(&self) -> u16 {
        self.levels
    }

    fn pixel_log_likelihood(&self, image: &[u8], out: &mut [f32]) -> f64 {
        let mut total = 0.0;
        for (d, (&x, o)) in image.iter().zip(out.iter_mut()).enumerate() {
            let ll = self.log_p(d, x);
            *o = ll as f32;
            total += ll;
        }
        total
    }

    fn log_likelihood(&self, image: &[u8]) -> f64 {
        image
            .iter()
            .enumerate()
            .map(|(d, &x)| self.log_p(d, x))
            .sum()
    }

    fn sample(&self, rng: &mut dyn RngCore, out: &mut [u8]) {
        let k = self.levels as usize;
        for (d, o) in out.iter_mut().enumerate() {
            let log_prob = &self.log_prob[d * k..(d + 1) * k];
            *o = inverse_cdf(log_prob.iter().map(|l| l.exp()), uniform(rng));
        }
    }

    fn hyperparameters(&self) -> serde_json::Value {
        json!({ "alpha": self.alpha })
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        vec![NamedTensor {
            name: "log_prob".into(),
            shape: vec![self.shape.dims(), self.levels as usize],
            data: self.log_prob.clone(),
        }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::testing::*;
    use ndarray::Array2;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn fitted_1x2(levels: u16) -> Categorical {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let flat: Vec<u8> = (0..200)
            .map(|_| (rng.next_u32() % u32::from(levels)) as u8 / 3)
            .collect();
        let pixels = Array2::from_shape_vec((100, 2), flat).unwrap();
        let data = TrainingSet {
            shape: ImageShape::new(1, 2, 1),
            levels,
            pixels: pixels.view(),
            validation: pixels.slice(ndarray::s![..0, ..]),
            redraw: None,
        };
        Categorical::fit(0.7, &data)
    }

    #[test]
    fn all_65536_images_of_1x2_with_256_levels_sum_to_one() {
        let m = fitted_1x2(256);
        let total = total_probability(&m);
        assert!((total - 1.0).abs() < 1e-9, "Σ p(x) = {total}");
        assert_maps_sum_to_likelihood(&m, &all_images(2, 256)[..500]);
    }

    #[test]
    fn binary_levels_normalize_too() {
        let m = fitted_1x2(2);
        assert!((total_probability(&m) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn smoothing_follows_the_formula() {
        let pixels = Array2::from_shape_vec((3, 1), vec![0u8, 0, 255]).unwrap();
        let data = TrainingSet {
            shape: ImageShape::new(1, 1, 1),
            levels: 256,
            pixels: pixels.view(),
            validation: pixels.slice(ndarray::s![..0, ..]),
            redraw: None,
        };
        let m = Categorical::fit(1.0, &data);
        let p = |v: u8| m.log_likelihood(&[v]).exp();
        assert!((p(0) - 3.0 / 259.0).abs() < 1e-15);
        assert!((p(255) - 2.0 / 259.0).abs() < 1e-15);
        assert!((p(7) - 1.0 / 259.0).abs() < 1e-15);
    }

    /// Two RGB pixels of 8 levels, each value with a most likely level of its own (held 70%
    /// of the time): the samples put each mode back on its own channel and pixel.
    #[test]
    fn rgb_samples_keep_each_channel_its_mode() {
        let modes = [1u8, 4, 6, 7, 0, 3];
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let n = 4000;
        let flat: Vec<u8> = (0..n)
            .flat_map(|_| {
                modes.map(|mode| {
                    if rand::Rng::random_bool(&mut rng, 0.7) {
                        mode
                    } else {
                        rand::Rng::random_range(&mut rng, 0..8)
                    }
                })
            })
            .collect();
        let pixels = Array2::from_shape_vec((n, 6), flat).unwrap();
        let data = TrainingSet {
            shape: ImageShape::new(1, 2, 3),
            levels: 8,
            pixels: pixels.view(),
            validation: pixels.slice(ndarray::s![..0, ..]),
            redraw: None,
        };
        let m = Categorical::fit(1.0, &data);
        let mut held = [0u32; 6];
        let mut img = [0u8; 6];
        for _ in 0..n {
            m.sample(&mut rng, &mut img);
            for ((h, &x), &mode) in held.iter_mut().zip(&img).zip(&modes) {
                *h += u32::from(x == mode);
            }
        }
        let q = 0.7 + 0.3 / 8.0;
        let tol = 4.0 * (2.0 * q * (1.0 - q) / n as f64).sqrt();
        for (k, h) in held.iter().enumerate() {
            let share = f64::from(*h) / n as f64;
            assert!(
                (share - q).abs() < tol,
                "value {k}: mode held {share} vs {q} (±{tol})"
            );
        }
    }

    #[test]
    fn sample_frequencies_match_the_distribution() {
        let m = fitted_1x2(4);
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let n = 20_000;
        let mut counts = [[0u32; 4]; 2];
        let mut img = [0u8; 2];
        for _ in 0..n {
            m.sample(&mut rng, &mut img);
            counts[0][img[0] as usize] += 1;
            counts[1][img[1] as usize] += 1;
        }
        for (d, pixel_counts) in counts.iter().enumerate() {
            for v in 0..4u8 {
                let q = m.log_p(d, v).exp();
                let freq = f64::from(pixel_counts[v as usize]) / f64::from(n);
                let tol = 4.0 * (q * (1.0 - q) / f64::from(n)).sqrt() + 1e-12;
                assert!((freq - q).abs() < tol, "pixel {d} value {v}: {freq} vs {q}");
            }
        }
    }
}
