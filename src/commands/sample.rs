//! `pipeline sample MODEL -n N --out grid.png`: images drawn from a fitted model.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::cli::SampleArgs;
use crate::error::{Error, Result, from_io};
use crate::io::png::grid_png;
use crate::pipeline::Context;
use crate::pipeline::artifact;

/// The most images one grid may hold.
const MAX_SAMPLES: usize = 10_000;

/// Draws `-n` images and writes them as one PNG grid.
pub fn sample(a: &SampleArgs, ctx: &Context) -> Result<()> {
    if a.count == 0 || a.count > MAX_SAMPLES {
        return Err(Error::Usage(format!(
            "-n must be between 1 and {MAX_SAMPLES}, got {}",
            a.count
        )));
    }
    let loaded = artifact::load(&a.model, &ctx.io)?;
    let model = loaded.model.as_ref();
    let dims = model.shape().dims();
    // One ChaCha stream per image: the same seed draws the same images on any thread count.
    let images: Vec<Vec<u8>> = (0..a.count)
        .into_par_iter()
        .map(|i| {
            let mut rng = ChaCha8Rng::seed_from_u64(a.seed);
            rng.set_stream(i as u64);
            let mut img = vec![0u8; dims];
            model.sample(&mut rng, &mut img);
            img
        })
        .collect();
    let png = grid_png(&images, model.shape(), model.levels(), a.scale)?;
    let tmp = format!("{}.tmp", a.out);
    std::fs::write(&tmp, png).map_err(|e| from_io(&tmp, e))?;
    std::fs::rename(&tmp, &a.out).map_err(|e| from_io(&a.out, e))?;
    println!(
        "drew {} image(s) from {} ({}) into {}",
        a.count, loaded.meta.model_id, loaded.uri, a.out
    );
    Ok(())
}
