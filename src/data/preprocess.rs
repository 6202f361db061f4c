//! Preprocessing: 8-bit intensities to model inputs (binary pixels or the 256 levels).

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::{ImageBatch, id_hash};
use crate::config::{Binarize, PreprocessConfig};

/// The preprocessing step, built from `[preprocess]`; the same one is stored in a model so that
/// scoring later transforms pixels exactly as fitting did.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocessor {
    config: PreprocessConfig,
}

impl Preprocessor {
    /// Builds the step from its config.
    pub fn new(config: PreprocessConfig) -> Self {
        Self { config }
    }

    /// The config it was built from.
    pub fn config(&self) -> &PreprocessConfig {
        &self.config
    }

    /// How many values a pixel takes after preprocessing: 2 or 256.
    pub fn levels(&self) -> u16 {
        match self.config.binarize {
            Binarize::None => 256,
            Binarize::Threshold | Binarize::Stochastic => 2,
        }
    }

    /// Transforms a batch's pixels in place, in parallel over images.
    pub fn apply(&self, batch: &mut ImageBatch) {
        let ids = &batch.ids;
        let dims = batch.shape.dims();
        let pixels = batch
            .pixels
            .as_slice_mut()
            .expect("image batches are contiguous");
        if dims == 0 {
            return;
        }
        pixels
            .par_chunks_mut(dims)
            .zip(ids.par_iter())
            .for_each(|(image, id)| self.apply_one(id, image));
    }

    /// Transforms one image whose id is `id`.
    pub fn apply_one(&self, id: &str, image: &mut [u8]) {
        match self.config.binarize {
            Binarize::None => {}
            Binarize::Threshold => {
                let t = self.config.threshold;
                for p in image {
                    *p = u8::from(*p >= t);
                }
            }
            Binarize::Stochastic => {
                let mut rng = ChaCha8Rng::seed_from_u64(id_hash(self.config.seed, id));
                for p in image {
                    // P(1) = p / 255 exactly: compare a uniform u32 against p/255 · 2^32.
                    let u = u64::from(rng.next_u32()) * 255;
                    *p = u8::from(u < u64::from(*p) << 32);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pre(binarize: Binarize) -> Preprocessor {
        Preprocessor::new(PreprocessConfig {
            binarize,
            threshold: 128,
            seed: 3,
        })
    }

    #[test]
    fn threshold_splits_at_the_threshold() {
        let mut img = [0, 127, 128, 255];
        pre(Binarize::Threshold).apply_one("a", &mut img);
        assert_eq!(img, [0, 0, 1, 1]);
    }

    #[test]
    fn stochastic_is_deterministic_per_id_and_has_the_right_mean() {
        let p = pre(Binarize::Stochastic);
        let mut a = vec![64u8; 100_000];
        let mut b = a.clone();
        p.apply_one("frame-1", &mut a);
        p.apply_one("frame-1", &mut b);
        assert_eq!(a, b);
        let mean = a.iter().map(|&x| f64::from(x)).sum::<f64>() / a.len() as f64;
        // Bernoulli(64/255) over 100,000 draws: standard error 0.0014; allow 4 of them.
        assert!((mean - 64.0 / 255.0).abs() < 0.0056, "mean {mean}");
        let mut c = vec![64u8; 100_000];
        p.apply_one("frame-2", &mut c);
        assert_ne!(a, c);
        let mut ends = [0u8, 255];
        p.apply_one("x", &mut ends);
        assert_eq!(ends, [0, 1]);
    }

    #[test]
    fn none_keeps_the_levels() {
        let mut img = [0, 17, 255];
        pre(Binarize::None).apply_one("a", &mut img);
        assert_eq!(img, [0, 17, 255]);
        assert_eq!(pre(Binarize::None).levels(), 256);
    }
}
