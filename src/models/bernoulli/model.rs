//! `bernoulli`: every binary pixel independent, p(x) = Π_d p_d^{x_d} (1 − p_d)^{1 − x_d}.
//!
//! D parameters, fitted in one pass by counting with Laplace (add-alpha) smoothing:
//! p_d = (n_d + α) / (n + 2α), where n_d counts the images with pixel d on. The baseline every
//! other model must beat.

use rand::RngCore;
use serde_json::json;

use crate::data::ImageShape;
use crate::models::shared::{tensor, uniform, value_counts};
use crate::models::{DensityModel, Family, ModelError, NamedTensor};
use crate::train::TrainingSet;

/// Independent Bernoulli pixels.
#[derive(Debug, Clone)]
pub struct Bernoulli {
    shape: ImageShape,
    alpha: f64,
    /// p_d = P(x_d = 1).
    p: Vec<f64>,
    /// log p_d and log(1 − p_d), precomputed for scoring.
    log_on: Vec<f64>,
    log_off: Vec<f64>,
}

impl Bernoulli {
    /// Fits by counting, in parallel over images; `data` holds binary pixels.
    pub fn fit(alpha: f64, data: &TrainingSet<'_>) -> Self {
        let n = data.pixels.nrows();
        let counts = value_counts(data);
        let p = counts
            .chunks_exact(2)
            .map(|c| (c[1] as f64 + alpha) / (n as f64 + 2.0 * alpha))
            .collect();
        Self::from_probabilities(data.shape, alpha, p)
    }

    /// A model with the given P(x_d = 1), each strictly between 0 and 1.
    pub fn from_probabilities(shape: ImageShape, alpha: f64, p: Vec<f64>) -> Self {
        let log_on = p.iter().map(|q| q.ln()).collect();
        let log_off = p.iter().map(|q| (-q).ln_1p()).collect();
        Self {
            shape,
            alpha,
            p,
            log_on,
            log_off,
        }
    }

    /// Rebuilds the model from model.safetensors.
    pub fn from_tensors(
        shape: ImageShape,
        hyperparameters: &serde_json::Value,
        tensors: &[NamedTensor],
    ) -> Result<Self, ModelError> {
        let p = tensor(tensors, "p", shape.dims())?;
        if let Some(bad) = p.iter().find(|q| !(**q > 0.0 && **q < 1.0)) {
            return Err(ModelError::invalid(format!(
                "tensor `p` holds {bad}, not a probability in (0, 1)"
            )));
        }
        let alpha = hyperparameters["alpha"].as_f64().unwrap_or(1.0);
        Ok(Self::from_probabilities(shape, alpha, p.to_vec()))
    }

    /// P(x_d = 1) for every pixel.
    pub fn probabilities(&self) -> &[f64] {
        &self.p
    }
}

impl DensityModel for Bernoulli {
    fn kind(&self) -> &'static str {
        <super::Bernoulli as Family>::NAME
    }

    fn shape(&self) -> ImageShape {
        self.shape
    }

    fn levels(&self) -> u16 {
        2
    }

    fn pixel_log_likelihood(&self, image: &[u8], out: &mut [f32]) -> f64 {
        let mut total = 0.0;
        for (d, (&x, o)) in image.iter().zip(out.iter_mut()).enumerate() {
            let ll = if x != 0 {
                self.log_on[d]
            } else {
                self.log_off[d]
            };
            *o = ll as f32;
            total += ll;
        }
        total
    }

    fn log_likelihood(&self, image: &[u8]) -> f64 {
        image
            .iter()
            .zip(self.log_on.iter().zip(&self.log_off))
            .map(|(&x, (&on, &off))| if x != 0 { on } else { off })
            .sum()
    }

    fn sample(&self, rng: &mut dyn RngCore, out: &mut [u8]) {
        for (o, &p) in out.iter_mut().zip(&self.p) {
            *o = u8::from(uniform(rng) < p);
        }
    }

    fn hyperparameters(&self) -> serde_json::Value {
        json!({ "alpha": self.alpha })
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        vec![NamedTensor {
            name: "p".into(),
            shape: vec![self.shape.dims()],
            data: self.p.clone(),
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

    fn fitted(rows: &[[u8; 4]], alpha: f64) -> Bernoulli {
        let flat: Vec<u8> = rows.iter().flatten().copied().collect();
        let pixels = Array2::from_shape_vec((rows.len(), 4), flat).unwrap();
        let data = TrainingSet {
            shape: ImageShape::new(2, 2, 1),
            levels: 2,
            pixels: pixels.view(),
            validation: pixels.slice(ndarray::s![..0, ..]),
            redraw: None,
        };
        Bernoulli::fit(alpha, &data)
    }

    #[test]
    fn counts_with_laplace_smoothing() {
        let m = fitted(&[[1, 0, 1, 1], [1, 0, 0, 1], [1, 0, 0, 0]], 1.0);
        // (3+1)/(3+2), (0+1)/5, (1+1)/5, (2+1)/5
        let want = [0.8, 0.2, 0.4, 0.6];
        for (p, w) in m.probabilities().iter().zip(want) {
            assert!((p - w).abs() < 1e-15, "{p} vs {w}");
        }
    }

    #[test]
    fn probabilities_over_all_sixteen_images_sum_to_one() {
        let m = fitted(&[[1, 0, 1, 1], [0, 0, 0, 1], [1, 1, 0, 0]], 0.5);
        let total = total_probability(&m);
        assert!((total - 1.0).abs() < 1e-9, "Σ p(x) = {total}");
        assert_maps_sum_to_likelihood(&m, &all_images(4, 2));
    }

    /// Two RGB pixels (channels interleaved R, G, B per pixel), each value with a rate of its
    /// own: the samples put each rate back on its own channel and pixel.
    #[test]
    fn rgb_samples_keep_each_channel_its_rate() {
        let rates = [0.9, 0.5, 0.1, 0.2, 0.65, 0.97];
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let n = 4000;
        let flat: Vec<u8> = (0..n)
            .flat_map(|_| rates.map(|q| u8::from(rand::Rng::random_bool(&mut rng, q))))
            .collect();
        let pixels = Array2::from_shape_vec((n, 6), flat).unwrap();
        let data = TrainingSet {
            shape: ImageShape::new(1, 2, 3),
            levels: 2,
            pixels: pixels.view(),
            validation: pixels.slice(ndarray::s![..0, ..]),
            redraw: None,
        };
        let m = Bernoulli::fit(1.0, &data);
        let mut sums = [0u32; 6];
        let mut img = [0u8; 6];
        for _ in 0..n {
            m.sample(&mut rng, &mut img);
            for (s, &x) in sums.iter_mut().zip(&img) {
                *s += u32::from(x);
            }
        }
        for (k, (s, q)) in sums.iter().zip(rates).enumerate() {
            let mean = f64::from(*s) / n as f64;
            // Fitted and sampled from n draws each: both errors, four standard errors wide.
            let tol = 4.0 * (2.0 * q * (1.0 - q) / n as f64).sqrt();
            assert!((mean - q).abs() < tol, "value {k}: {mean} vs {q} (±{tol})");
        }
    }

    #[test]
    fn sample_means_match_the_marginals() {
        let p = vec![0.05, 0.3, 0.5, 0.9];
        let m = Bernoulli::from_probabilities(ImageShape::new(2, 2, 1), 1.0, p.clone());
        let mut rng = ChaCha8Rng::seed_from_u64(42);
        let n = 10_000;
        let mut sums = [0u32; 4];
        let mut img = [0u8; 4];
        for _ in 0..n {
            m.sample(&mut rng, &mut img);
            for (s, &x) in sums.iter_mut().zip(&img) {
                *s += u32::from(x);
            }
        }
        for (s, q) in sums.iter().zip(p) {
            let mean = f64::from(*s) / f64::from(n);
            // Four standard errors of a mean of 10,000 Bernoulli(q) draws.
            let tol = 4.0 * (q * (1.0 - q) / f64::from(n)).sqrt();
            assert!((mean - q).abs() < tol, "mean {mean} vs {q} (±{tol})");
        }
    }
}
