//! Pixel orderings and conditioning contexts for autoregressive models.
//!
//! An autoregressive model factorizes p(x) = Π_i p(x_{o(i)} | x_{o(<i)}) over an ordering o of
//! the sub-pixels. Pixels are ordered as a whole (raster, or a seeded random permutation), and
//! within a pixel the channels come in R, G, B order, so G sees R and B sees R and G. A context
//! is the set of earlier sub-pixels a conditional may look at; it never holds a later one, which
//! is what makes every such model normalize.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::data::ImageShape;

/// How pixels are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// Row by row, left to right.
    #[default]
    Raster,
    /// A random permutation of the pixels, fixed by `train.seed`.
    Random,
}

/// Which earlier sub-pixels a conditional sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Context {
    /// The k sub-pixels just before it in the ordering (k = 1: a first-order Markov chain).
    #[default]
    Previous,
    /// The k nearest already-seen sub-pixels in the image plane (a causal window); earlier
    /// channels of the same pixel come first.
    Neighbourhood,
}

/// The ordering: position i holds the index (row-major, channel-last) of the i-th sub-pixel.
pub fn ordering(shape: ImageShape, order: Order, seed: u64) -> Vec<usize> {
    let mut pixels: Vec<usize> = (0..shape.height * shape.width).collect();
    if order == Order::Random {
        pixels.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    }
    pixels
        .iter()
        .flat_map(|&p| (0..shape.channels).map(move |c| p * shape.channels + c))
        .collect()
}

/// The context of every position: up to `k` sub-pixel indices, each earlier in `order`.
pub fn contexts(shape: ImageShape, order: &[usize], context: Context, k: usize) -> Vec<Vec<usize>> {
    match context {
        Context::Previous => (0..order.len())
            .map(|i| {
                order[i.saturating_sub(k)..i]
                    .iter()
                    .rev()
                    .copied()
                    .collect()
            })
            .collect(),
        Context::Neighbourhood => {
            let c = shape.channels;
            let place = |index: usize| {
                let pixel = index / c;
                ((pixel / shape.width) as i64, (pixel % shape.width) as i64)
            };
            (0..order.len())
                .map(|i| {
                    let (r, col) = place(order[i]);
                    let mut seen: Vec<(i64, usize, usize)> = order[..i]
                        .iter()
                        .enumerate()
                        .map(|(j, &idx)| {
                            let (r2, c2) = place(idx);
                            let d2 = (r - r2).pow(2) + (col - c2).pow(2);
                            // Nearest first; among equals, the most recently seen first.
                            (d2, i - j, idx)
                        })
                        .collect();
                    seen.sort_unstable();
                    seen.into_iter().take(k).map(|(_, _, idx)| idx).collect()
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orderings_are_permutations_with_channels_in_rgb_order() {
        let shape = ImageShape::new(3, 4, 3);
        for order in [Order::Raster, Order::Random] {
            let o = ordering(shape, order, 7);
            let mut sorted = o.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..36).collect::<Vec<_>>());
            for triple in o.chunks(3) {
                assert_eq!(triple[0] % 3, 0, "R first");
                assert_eq!((triple[1], triple[2]), (triple[0] + 1, triple[0] + 2));
            }
        }
        assert_eq!(ordering(shape, Order::Raster, 0)[..4], [0, 1, 2, 3]);
        assert_ne!(
            ordering(shape, Order::Random, 1),
            ordering(shape, Order::Random, 2)
        );
    }

    #[test]
    fn contexts_hold_only_earlier_sub_pixels() {
        let shape = ImageShape::new(5, 6, 1);
        for order in [Order::Raster, Order::Random] {
            let o = ordering(shape, order, 3);
            let pos: Vec<usize> = {
                let mut p = vec![0; o.len()];
                o.iter().enumerate().for_each(|(i, &x)| p[x] = i);
                p
            };
            for context in [Context::Previous, Context::Neighbourhood] {
                for (i, ctx) in contexts(shape, &o, context, 4).iter().enumerate() {
                    assert_eq!(ctx.len(), i.min(4));
                    assert!(
                        ctx.iter().all(|&x| pos[x] < i),
                        "{context:?} at {i}: {ctx:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_raster_neighbourhood_is_the_causal_window() {
        let shape = ImageShape::new(4, 5, 1);
        let o = ordering(shape, Order::Raster, 0);
        let ctx = contexts(shape, &o, Context::Neighbourhood, 4);
        // Pixel (2, 2) = 12: left (11) and up (7) at distance 1, then the diagonals 6 and 8.
        let mut c = ctx[12].clone();
        assert_eq!(&c[..2], &[11, 7]);
        c.sort_unstable();
        assert_eq!(c, vec![6, 7, 8, 11]);
        let rgb = ImageShape::new(2, 2, 3);
        let o = ordering(rgb, Order::Raster, 0);
        let ctx = contexts(rgb, &o, Context::Neighbourhood, 2);
        assert_eq!(
            ctx[5],
            vec![4, 3],
            "B of pixel 1 sees its own G and R first"
        );
    }
}
