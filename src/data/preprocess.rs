//! Preprocessing: 8-bit intensities to model inputs (binary pixels or the 256 levels).

use ndarray::{ArrayView2, CowArray, Ix2};
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

    /// The step that keeps the 8-bit intensities as they are: for stages that binarize later,
    /// once per draw.
    pub fn raw() -> Self {
        Self::new(PreprocessConfig {
            binarize: Binarize::None,
            ..PreprocessConfig::default()
        })
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
        let dims = batch.shape.dims();
        let pixels = batch
            .pixels
            .as_slice_mut()
            .expect("image batches are contiguous");
        self.apply_draw_rows(0, &batch.ids, pixels, dims);
    }

    /// Splits the step between the reader and the scorer, as (what the reader applies, what
    /// is applied once per draw after it). With one draw the reader does it all, on its own
    /// thread ahead of scoring, and the per-draw step is the identity; with several, the reader
    /// keeps the 8-bit intensities, which each draw binarizes anew.
    pub fn split_for_draws(&self) -> (Preprocessor, Preprocessor) {
        if self.draws() > 1 {
            (Self::raw(), self.clone())
        } else {
            (self.clone(), Self::raw())
        }
    }

    /// How many binarizations of each image are scored: `preprocess.draws` for stochastic
    /// binarization; 1 for the others, which give the same pixels every time.
    pub fn draws(&self) -> usize {
        match self.config.binarize {
            Binarize::Stochastic => self.config.draws.max(1),
            Binarize::Threshold | Binarize::None => 1,
        }
    }

    /// Draw `draw` of every row of `raw` (8-bit intensities), row i being the image whose id
    /// is `ids[i]`: scoring averages draws 0 to [`Self::draws`] − 1, and `train.rebinarize`
    /// trains epoch e on draw e − 1. Draw 0 is what [`Self::apply`] gives; the identity step
    /// (`binarize = "none"`) borrows `raw` rather than copy it.
    pub fn draw<'a, S: AsRef<str> + Sync>(
        &self,
        draw: usize,
        ids: &[S],
        raw: ArrayView2<'a, u8>,
    ) -> CowArray<'a, u8, Ix2> {
        if self.config.binarize == Binarize::None {
            return CowArray::from(raw);
        }
        let mut out = raw.as_standard_layout().into_owned();
        let dims = out.ncols();
        let pixels = out.as_slice_mut().expect("standard layout");
        self.apply_draw_rows(draw, ids, pixels, dims);
        CowArray::from(out)
    }

    /// Applies draw `draw` to every image of `pixels` (`dims` values each, the i-th image's id
    /// being `ids[i]`), in parallel over images.
    fn apply_draw_rows<S: AsRef<str> + Sync>(
        &self,
        draw: usize,
        ids: &[S],
        pixels: &mut [u8],
        dims: usize,
    ) {
        if dims == 0 {
            return;
        }
        pixels
            .par_chunks_mut(dims)
            .zip(ids.par_iter())
            .for_each(|(image, id)| self.apply_draw(draw, id.as_ref(), image));
    }

    /// Transforms one image whose id is `id` (draw 0).
    pub fn apply_one(&self, id: &str, image: &mut [u8]) {
        self.apply_draw(0, id, image);
    }

    /// Draw `draw` of one image whose id is `id`: each draw of a stochastic binarization flips
    /// coins from a seed of its own, and draw 0's seed is `preprocess.seed` itself, so that one
    /// draw is what fitting trained on.
    pub fn apply_draw(&self, draw: usize, id: &str, image: &mut [u8]) {
        match self.config.binarize {
            Binarize::None => {}
            Binarize::Threshold => {
                let t = self.config.threshold;
                for p in image {
                    *p = u8::from(*p >= t);
                }
            }
            Binarize::Stochastic => {
                let seed = self.config.seed ^ (draw as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                let mut rng = ChaCha8Rng::seed_from_u64(id_hash(seed, id));
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
    use ndarray::Array2;

    fn pre(binarize: Binarize) -> Preprocessor {
        Preprocessor::new(PreprocessConfig {
            binarize,
            threshold: 128,
            seed: 3,
            draws: 4,
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
    fn draws_are_independent_binarizations_and_draw_zero_is_the_fitted_one() {
        let p = pre(Binarize::Stochastic);
        assert_eq!(p.draws(), 4);
        assert_eq!(pre(Binarize::Threshold).draws(), 1);
        let raw = Array2::from_shape_fn((3, 5_000), |(i, j)| ((i * 97 + j * 13) % 256) as u8);
        let ids = ["a", "b", "c"];
        let mut applied = raw.clone();
        for (row, id) in applied.outer_iter_mut().zip(ids) {
            p.apply_one(id, row.into_slice().unwrap());
        }
        assert_eq!(p.draw(0, &ids, raw.view()), applied);
        let draws: Vec<Array2<u8>> = (0..4)
            .map(|d| p.draw(d, &ids, raw.view()).into_owned())
            .collect();
        for d in 1..4 {
            assert_ne!(draws[d], draws[0], "draw {d} repeats draw 0");
            assert_eq!(
                draws[d],
                p.draw(d, &ids, raw.view()),
                "draw {d} is not reproducible"
            );
        }
        // Each draw is Bernoulli(intensity / 255): over 15,000 pixels of mean intensity ~127.5
        // the share of ones has standard error ~0.004; allow 4 of them.
        let expected = raw.iter().map(|&v| f64::from(v) / 255.0).sum::<f64>() / raw.len() as f64;
        for (d, x) in draws.iter().enumerate() {
            let ones = x.iter().map(|&v| f64::from(v)).sum::<f64>() / x.len() as f64;
            assert!(
                (ones - expected).abs() < 0.016,
                "draw {d}: {ones} vs {expected}"
            );
        }
        // Two draws agree on a pixel of probability q with chance q² + (1 − q)²; averaged over
        // these intensities that is ~0.67, far from the 1.0 of a repeated draw.
        let same = draws[1]
            .iter()
            .zip(&draws[2])
            .filter(|(a, b)| a == b)
            .count();
        assert!(
            (same as f64) < 0.75 * raw.len() as f64,
            "{same} of {} agree",
            raw.len()
        );
    }

    #[test]
    fn none_keeps_the_levels() {
        let mut img = [0, 17, 255];
        pre(Binarize::None).apply_one("a", &mut img);
        assert_eq!(img, [0, 17, 255]);
        assert_eq!(pre(Binarize::None).levels(), 256);
    }
}
