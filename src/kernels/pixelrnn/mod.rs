//! PixelRNN's fast f32 passes (log-likelihood, per-pixel logits and the gradient) over chunks
//! of images, and the naive f64 [`reference`] they are held to.
//!
//! Parameters are one flat f32 vector in the order of [`reference::Params::map`] (see
//! [`Shape`]), so a reference model flattens into a fast one and back without any reshaping.
//!
//! Why it is fast: every convolution that is not recurrent — the input-to-state of every layer,
//! the 1×1 back to 2h, the output layers — is one GEMM over all the pixels of a chunk of images
//! at once; only the state-to-state products run step by step, and each step is still one GEMM
//! over every image and column of a row (Row LSTM) or every image and row of a skewed column
//! (Diagonal BiLSTM). The GEMMs are [`gemm_rows`](super::gemm::gemm_rows)' register tiles on
//! strided views of the maps (a weight read across is copied into rows first); the gates' σ and
//! tanh are the vectorized ones of [`math`](super::math), compiled for each instruction set.
//! A Row LSTM's forward pass of h = 16 on AVX-512 or AVX2 skips the GEMMs: `row_step/` fuses
//! a layer's products, gates and 1×1 output per tile of pixels in registers.
//!
//! Layouts inside a chunk of n images of H × W:
//! - maps are `[row][image][column + 2][channels]`: one zero column either side of each image
//!   row, so a tap dx = ±1 is a shift by one row of the matrix and a whole image row of the
//!   chunk is one contiguous block (the padding columns are computed as junk by the shifted
//!   GEMMs and set back to zero, or ignored);
//! - the Diagonal BiLSTM's states live on the skewed grid `[column j][row r][image]`, pixel
//!   (r, c) at j = r + c (mirrored: j = r + W − 1 − c), so one skewed column's valid cells, and
//!   the row above them, are contiguous.
//!
//! The backward pass keeps every layer's activations from the forward pass in a workspace that
//! is allocated once per thread and geometry, and runs back through the rows or skewed columns.

mod paired_backward;
pub mod reference;
mod row_step;

use std::cell::RefCell;

use rayon::prelude::*;

pub use reference::{Architecture, INPUT_KERNEL, Shape};
use reference::{group, logits_per_channel, same_pixel_allows};

use super::Isa;
use super::dispatch;
use super::gemm::{Gathered, Mat, gemm_gathered_bias, gemm_rows, mat};
use super::math::{Target, exp, fmadd, log_sigmoid, sigmoid};

/// Images per chunk: each chunk runs the whole network on one thread, and chunks are summed in
/// order, so results do not depend on the thread count.
pub const CHUNK: usize = 8;

/// Taps of the mask-A input convolution (7 × 7).
const TAPS_A: usize = INPUT_KERNEL * INPUT_KERNEL;

/// The taps mask A reads: those before the centre in raster order, and the centre itself
/// (across colour groups); they are the first of the 7 × 7.
const LIVE_TAPS: usize = TAPS_A / 2 + 1;

/// Where one recurrent layer's tensors start in the flat vector.
#[derive(Debug, Clone, Copy)]
struct LayerAt {
    input: [usize; 2],
    input_bias: [usize; 2],
    state: [usize; 2],
    output: usize,
    output_bias: usize,
    /// The skip connection's 1×1 `[2h][2h]`, where the shape has them.
    skip: Option<usize>,
}

/// Where every tensor starts in the flat vector.
#[derive(Debug, Clone)]
struct Offsets {
    input: usize,
    input_bias: usize,
    layers: Vec<LayerAt>,
    head: usize,
    head_bias: usize,
    logit: usize,
    logit_bias: usize,
    len: usize,
}

impl Shape {
    /// Feature maps between layers, 2h.
    pub fn features(&self) -> usize {
        2 * self.hidden
    }

    /// Values of an image's embedding pooled over `grid` × `grid` regions: the 2h final
    /// features (after their ReLU, what the output layers read) of each region.
    pub fn embedding_width(&self, grid: usize) -> usize {
        grid * grid * self.features()
    }

    /// Logits per pixel: C · [`logits_per_channel`].
    pub fn outputs(&self) -> usize {
        self.channels * logits_per_channel(self.levels)
    }

    fn offsets(&self) -> Offsets {
        let (f, h, dirs) = (self.features(), self.hidden, self.architecture.directions());
        let mut at = 0;
        let mut take = |n: usize| {
            at += n;
            at - n
        };
        let input = take(f * self.channels * TAPS_A);
        let input_bias = take(f);
        let layers = (0..self.layers)
            .map(|_| {
                let mut l = LayerAt {
                    input: [0; 2],
                    input_bias: [0; 2],
                    state: [0; 2],
                    output: 0,
                    output_bias: 0,
                    skip: None,
                };
                for d in 0..dirs {
                    l.input[d] = take(4 * h * f * self.architecture.input_taps());
                }
                for d in 0..dirs {
                    l.input_bias[d] = take(4 * h);
                }
                for d in 0..dirs {
                    l.state[d] = take(4 * h * h * self.architecture.state_taps());
                }
                l.output = take(f * h);
                l.output_bias = take(f);
                l.skip = self.skip.then(|| take(f * f));
                l
            })
            .collect();
        let head = take(f * f);
        let head_bias = take(f);
        let logit = take(self.outputs() * f);
        let logit_bias = take(self.outputs());
        Offsets {
            input,
            input_bias,
            layers,
            head,
            head_bias,
            logit,
            logit_bias,
            len: at,
        }
    }

    /// Length of the flat parameter vector.
    pub fn param_len(&self) -> usize {
        self.offsets().len
    }

    /// Each tensor's name, range in the flat vector and dimensions, in order (for artifacts,
    /// and for initialization: a weight has two dimensions or more, a bias one).
    pub fn tensors(&self) -> Vec<(String, std::ops::Range<usize>, Vec<usize>)> {
        let o = self.offsets();
        let (f, h) = (self.features(), self.hidden);
        let k = INPUT_KERNEL;
        let mut out = Vec::new();
        let mut put = |name: String, at: usize, dims: Vec<usize>| {
            let len: usize = dims.iter().product();
            out.push((name, at..at + len, dims));
        };
        put("input".into(), o.input, vec![f, self.channels, k, k]);
        put("input_bias".into(), o.input_bias, vec![f]);
        for (n, l) in o.layers.iter().enumerate() {
            for d in 0..self.architecture.directions() {
                put(
                    format!("layer{n}.input{d}"),
                    l.input[d],
                    vec![4 * h, f, self.architecture.input_taps()],
                );
            }
            for d in 0..self.architecture.directions() {
                put(
                    format!("layer{n}.input_bias{d}"),
                    l.input_bias[d],
                    vec![4 * h],
                );
            }
            for d in 0..self.architecture.directions() {
                put(
                    format!("layer{n}.state{d}"),
                    l.state[d],
                    vec![4 * h, h, self.architecture.state_taps()],
                );
            }
            put(format!("layer{n}.output"), l.output, vec![f, h]);
            put(format!("layer{n}.output_bias"), l.output_bias, vec![f]);
            if let Some(skip) = l.skip {
                put(format!("layer{n}.skip"), skip, vec![f, f]);
            }
        }
        put("head".into(), o.head, vec![f, f]);
        put("head_bias".into(), o.head_bias, vec![f]);
        put("logit".into(), o.logit, vec![self.outputs(), f]);
        put("logit_bias".into(), o.logit_bias, vec![self.outputs()]);
        out
    }

    /// 1 for every parameter the network reads, 0 for those a mask removes (mask A's taps
    /// after the centre, and the connections within a pixel across colour groups), laid out as
    /// the parameters. The passes read only the weights the mask keeps or weights that are
    /// zero, so parameters must be [`masked`](Shape::apply_mask) before they run.
    pub fn mask(&self) -> Vec<f32> {
        let o = self.offsets();
        let (f, h, ch) = (self.features(), self.hidden, self.channels);
        let mut m = vec![1f32; o.len];
        let keep = |from: usize, to: usize| f32::from(u8::from(same_pixel_allows(false, from, to)));
        let centre = TAPS_A / 2;
        for j in 0..f {
            for from in 0..ch {
                let at = o.input + (j * ch + from) * TAPS_A;
                m[at + centre] =
                    f32::from(u8::from(same_pixel_allows(true, from, group(j, f, ch))));
                m[at + centre + 1..at + TAPS_A].fill(0.0);
            }
        }
        for l in &o.layers {
            let taps = self.architecture.input_taps();
            for q in 0..4 * h {
                let to = group(q % h, h, ch);
                for k in 0..f {
                    // The tap at the pixel itself: the Row LSTM's dx = 0, the Diagonal's only
                    // one, left to right (the mirrored LSTM's output goes to the next row).
                    m[l.input[0] + (q * f + k) * taps + taps - 1] = keep(group(k, f, ch), to);
                }
            }
            for j in 0..f {
                for u in 0..h {
                    m[l.output + j * h + u] = keep(group(u, h, ch), group(j, f, ch));
                }
            }
        }
        // Mask B on the 2h → 2h squares: the skip connections and the first output layer.
        for square in o.layers.iter().filter_map(|l| l.skip).chain([o.head]) {
            for j in 0..f {
                for k in 0..f {
                    m[square + j * f + k] = keep(group(k, f, ch), group(j, f, ch));
                }
            }
        }
        let per = logits_per_channel(self.levels);
        for out in 0..self.outputs() {
            for k in 0..f {
                m[o.logit + out * f + k] = keep(group(k, f, ch), out / per);
            }
        }
        m
    }

    /// Zeroes every parameter [`mask`](Shape::mask) removes.
    pub fn apply_mask(&self, params: &mut [f32]) {
        params
            .iter_mut()
            .zip(self.mask())
            .for_each(|(p, m)| *p *= m);
    }
}

/// The reference's parameters as one flat f32 vector.
pub fn flatten(p: &reference::Params) -> Vec<f32> {
    let mut flat = Vec::new();
    p.map(&mut |&v| flat.push(v as f32));
    flat
}

/// A flat vector as the reference's parameters (in f64).
pub fn unflatten(shape: Shape, flat: &[f32]) -> reference::Params {
    let mut at = 0;
    reference::Params::random(shape, 1.0, 0).map(&mut |_| {
        at += 1;
        f64::from(flat[at - 1])
    })
}

/// A network ready to run: its shape, flat parameters, image size and instruction set.
#[derive(Debug, Clone, Copy)]
pub struct Net<'a> {
    /// Architecture and size.
    pub shape: Shape,
    /// The flat parameters ([`Shape::param_len`] values).
    pub params: &'a [f32],
    /// Image rows H.
    pub height: usize,
    /// Image columns W.
    pub width: usize,
    /// The instruction set of the element-wise kernels.
    pub isa: Isa,
    /// Regions a side the embedding pools the final features over (rows and columns split as
    /// evenly as they go), at least 1: the embedding keeps roughly where in the image a
    /// feature is, which a mean over the whole image would not (a 3 and an E share strokes).
    pub pool_grid: usize,
}

impl Net<'_> {
    /// Values of an image's embedding, [`Shape::embedding_width`] at [`Self::pool_grid`].
    pub fn embedding_width(&self) -> usize {
        self.shape.embedding_width(self.pool_grid)
    }

    /// Sub-pixels per image, H·W·C.
    fn dims(&self) -> usize {
        self.height * self.width * self.shape.channels
    }

    fn check(&self, images: &[u8]) -> usize {
        assert_eq!(self.params.len(), self.shape.param_len(), "parameter count");
        let d = self.dims();
        assert!(
            d > 0 && images.len().is_multiple_of(d),
            "images are H·W·C bytes each"
        );
        debug_assert!(
            images.iter().all(|&v| usize::from(v) < self.shape.levels),
            "sub-pixels below the levels"
        );
        images.len() / d
    }

    /// log p(x) in nats of every image (`images`: H·W·C bytes each, pixel by pixel, below
    /// `levels`) into `out`, and every sub-pixel's log-likelihood (images × H·W·C, in the
    /// images' order) into `sub_pixels` when given. In parallel over chunks of [`CHUNK`]
    /// images.
    pub fn log_likelihood(&self, images: &[u8], out: &mut [f64], sub_pixels: Option<&mut [f32]>) {
        self.score(images, out, sub_pixels, None);
    }

    /// [`Self::log_likelihood`] that also writes, from the same pass, each image's embedding
    /// (images × [`Self::embedding_width`]): for each of the `pool_grid`² regions (row-major), the
    /// mean of the final features ReLU(·) over its pixels; a region with no pixels (an image
    /// narrower than the grid) is zero.
    pub fn log_likelihood_and_embedding(
        &self,
        images: &[u8],
        out: &mut [f64],
        embeddings: &mut [f32],
    ) {
        self.score(images, out, None, Some(embeddings));
    }

    /// The scoring pass: log-likelihoods, and sub-pixel terms and embeddings where asked for.
    fn score(
        &self,
        images: &[u8],
        out: &mut [f64],
        sub_pixels: Option<&mut [f32]>,
        embeddings: Option<&mut [f32]>,
    ) {
        let n = self.check(images);
        assert_eq!(out.len(), n);
        let d = self.dims();
        let width = self.embedding_width();
        // What is not asked for still gets a buffer to write into, so one loop serves all.
        let (mut spare_terms, mut spare_embeddings) = (Vec::new(), Vec::new());
        let sub_pixels = sub_pixels.unwrap_or_else(|| {
            spare_terms.resize(n * d, 0.0);
            &mut spare_terms[..]
        });
        let embed = embeddings.is_some();
        let embeddings = embeddings.unwrap_or_else(|| {
            spare_embeddings.resize(n * width, 0.0);
            &mut spare_embeddings[..]
        });
        assert_eq!(sub_pixels.len(), n * d);
        assert_eq!(embeddings.len(), n * width);
        let pool = Pooling::new(self.height, self.width, self.pool_grid);
        images
            .par_chunks(CHUNK * d)
            .zip(out.par_chunks_mut(CHUNK))
            .zip(sub_pixels.par_chunks_mut(CHUNK * d))
            .zip(embeddings.par_chunks_mut(CHUNK * width))
            .for_each(|(((x, out), terms), emb)| {
                with_workspace(|ws| {
                    let g = ws.prepare(self, x.len() / d);
                    forward(self, &g, ws, x, self.height, false);
                    let per_image = read_terms(self, &g, &ws.logits, x, terms, None);
                    out.copy_from_slice(&per_image);
                    if embed {
                        pool.mean_features(&g, &ws.relu, self.shape.features(), emb);
                    }
                })
            });
    }

    /// The logits of the first `rows` image rows of each image (the rest are left as they
    /// are), images × H·W × [`Shape::outputs`]: what sampling row by row needs, at a fraction
    /// of a full pass.
    pub fn logits_up_to(&self, images: &[u8], rows: usize, logits: &mut [f32]) {
        let n = self.check(images);
        let (d, outs) = (self.dims(), self.shape.outputs());
        let per_image = self.height * self.width * outs;
        assert_eq!(logits.len(), n * per_image);
        let rows = rows.clamp(1, self.height);
        images
            .par_chunks(CHUNK * d)
            .zip(logits.par_chunks_mut(CHUNK * per_image))
            .for_each(|(x, logits)| {
                with_workspace(|ws| {
                    let g = ws.prepare(self, x.len() / d);
                    forward(self, &g, ws, x, rows, false);
                    for (i, r, c, m) in g.pixels(rows) {
                        let at = (i * g.height * g.width + r * g.width + c) * outs;
                        logits[at..at + outs].copy_from_slice(&ws.logits[m * outs..(m + 1) * outs]);
                    }
                })
            });
    }

    /// Adds ∂(Σ NLL)/∂θ over `images` into `grad` (flat, like the parameters; zero wherever
    /// [`Shape::mask`] is) and returns Σ NLL in nats. Chunks run in parallel; their gradients
    /// are summed in chunk order.
    pub fn gradient(&self, images: &[u8], grad: &mut [f32]) -> f64 {
        self.check(images);
        assert_eq!(grad.len(), self.params.len());
        let d = self.dims();
        let len = grad.len();
        let chunks = images.len().div_ceil(CHUNK * d);
        // Each chunk's gradient in a buffer of its own, kept by the calling thread between
        // calls (a fresh one per step cost page faults and zeroing); a nested call on the same
        // thread (rayon runs another shard's step while this one waits) gets a fresh one.
        let mut run = |parts: &mut [f32]| -> f64 {
            let nlls: Vec<f64> = images
                .par_chunks(CHUNK * d)
                .zip(parts.par_chunks_mut(len))
                .map(|(x, part)| {
                    part.fill(0.0);
                    with_workspace(|ws| {
                        let g = ws.prepare(self, x.len() / d);
                        forward(self, &g, ws, x, self.height, true);
                        backward(self, &g, ws, x, part)
                    })
                })
                .collect();
            for part in parts.chunks_exact(len) {
                grad.iter_mut().zip(part).for_each(|(a, b)| *a += b);
            }
            nlls.iter().sum()
        };
        let nll = PARTS.with(|kept| match kept.try_borrow_mut() {
            Ok(mut kept) => {
                if kept.len() < chunks * len {
                    kept.resize(chunks * len, 0.0);
                }
                run(&mut kept[..chunks * len])
            }
            Err(_) => run(&mut vec![0f32; chunks * len]),
        });
        // One channel: the passes write no masked weight. Colour: the GEMMs fill them all.
        if self.shape.channels > 1 {
            grad.iter_mut()
                .zip(self.shape.mask())
                .for_each(|(a, m)| *a *= m);
        }
        nll
    }
}

/// Every sub-pixel's log-likelihood from the chunk's logits (map layout) into `terms` (the
/// images' order), and with `d_logits` the NLL's gradient at every logit (map layout); returns
/// each image's log p(x), summed in f64 in the images' order.
fn read_terms(
    net: &Net<'_>,
    g: &Geometry,
    logits: &[f32],
    x: &[u8],
    terms: &mut [f32],
    mut d_logits: Option<&mut [f32]>,
) -> Vec<f64> {
    let (ch, outs, levels) = (net.shape.channels, net.shape.outputs(), net.shape.levels);
    let d = g.height * g.width;
    let mut per_image = vec![0f64; g.n];
    for (i, r, c, m) in g.pixels(g.height) {
        let at = (i * d + r * g.width + c) * ch;
        let z = &logits[m * outs..(m + 1) * outs];
        let dz = match d_logits.as_deref_mut() {
            Some(dl) => &mut dl[m * outs..(m + 1) * outs],
            None => &mut [][..],
        };
        sub_pixel_terms(
            net.isa,
            z,
            &x[at..at + ch],
            levels,
            &mut terms[at..at + ch],
            dz,
        );
        per_image[i] += terms[at..at + ch]
            .iter()
            .map(|&t| f64::from(t))
            .sum::<f64>();
    }
    per_image
}

dispatch! {
    /// One pixel's sub-pixel log-likelihoods (`ll`, C values) from its logits `z` at its values
    /// `x`: log σ(±z) for two levels, else the log-softmax over each channel's L logits; and
    /// when `d` is not empty, ∂(−log p)/∂z into it (σ(z) − x, or softmax − one-hot).
    fn sub_pixel_terms(z: &[f32], x: &[u8], levels: usize, ll: &mut [f32], d: &mut [f32]) -> ()
        => sub_pixel_terms_body
}

#[inline(always)]
fn sub_pixel_terms_body<T: Target>(
    z: &[f32],
    x: &[u8],
    levels: usize,
    ll: &mut [f32],
    d: &mut [f32],
) {
    if levels == 2 {
        for (k, (&z, &v)) in z.iter().zip(x).enumerate() {
            let on = v != 0;
            ll[k] = log_sigmoid::<T>(if on { z } else { -z });
            if !d.is_empty() {
                d[k] = sigmoid::<T>(z) - f32::from(u8::from(on));
            }
        }
        return;
    }
    for (k, (z, &v)) in z.chunks_exact(levels).zip(x).enumerate() {
        let top = lanes_max(z);
        let total = if d.is_empty() {
            lanes_sum(z, |v| exp::<T>(v - top))
        } else {
            let dk = &mut d[k * levels..(k + 1) * levels];
            dk.iter_mut()
                .zip(z)
                .for_each(|(e, &v)| *e = exp::<T>(v - top));
            let total = lanes_sum(dk, |e| e);
            let inv = 1.0 / total;
            dk.iter_mut().for_each(|e| *e *= inv);
            dk[usize::from(v)] -= 1.0;
            total
        };
        ll[k] = z[usize::from(v)] - top - total.ln();
    }
}

/// Lanes of the reductions below: eight independent partial results, so that they vectorize
/// (a float sum in order cannot).
const LANES: usize = 8;

/// The largest value of `v` (not empty).
#[inline(always)]
fn lanes_max(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = v.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &b) in acc.iter_mut().zip(c) {
            *a = a.max(b);
        }
    }
    rest.iter()
        .chain(&acc)
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

/// Σ f(v), in [`LANES`] partial sums.
#[inline(always)]
fn lanes_sum(v: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = v.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &b) in acc.iter_mut().zip(c) {
            *a += f(b);
        }
    }
    acc.iter().sum::<f32>() + rest.iter().map(|&b| f(b)).sum::<f32>()
}

/// The geometry of one chunk: n images of H × W, maps padded by a column either side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    n: usize,
    height: usize,
    width: usize,
    /// Padded row length W + 2.
    p: usize,
    /// Map rows H·n·p.
    rows: usize,
    /// Skewed columns W + H − 1.
    skewed: usize,
    /// Skewed-grid cells skewed·H·n.
    cells: usize,
}

impl Geometry {
    fn new(n: usize, height: usize, width: usize) -> Self {
        let p = width + 2;
        let skewed = width + height - 1;
        Self {
            n,
            height,
            width,
            p,
            rows: height * n * p,
            skewed,
            cells: skewed * height * n,
        }
    }

    /// Map row of pixel (r, c) of image i.
    #[inline]
    fn pix(&self, r: usize, i: usize, c: usize) -> usize {
        (r * self.n + i) * self.p + c + 1
    }

    /// Map rows of image rows `0..rows` (the chunk's first `rows` rows of every image).
    fn rows_up_to(&self, rows: usize) -> usize {
        rows * self.n * self.p
    }

    /// Skewed-grid cell of (column j, row r, image i).
    #[inline]
    fn cell(&self, j: usize, r: usize, i: usize) -> usize {
        (j * self.height + r) * self.n + i
    }

    /// The rows valid in skewed column j, among the first `rows`.
    fn valid(&self, j: usize, rows: usize) -> Option<(usize, usize)> {
        let lo = (j + 1).saturating_sub(self.width);
        let hi = j.min(rows - 1);
        (lo <= hi).then_some((lo, hi))
    }

    /// The image column of skewed column j at row r, for direction d (1: mirrored).
    #[inline]
    fn column(&self, j: usize, r: usize, d: usize) -> usize {
        let c = j - r;
        if d == 0 { c } else { self.width - 1 - c }
    }

    /// Every pixel (image, row, column), in image order, with its map row.
    fn pixels(&self, rows: usize) -> impl Iterator<Item = (usize, usize, usize, usize)> + '_ {
        (0..self.n).flat_map(move |i| {
            (0..rows).flat_map(move |r| (0..self.width).map(move |c| (i, r, c, self.pix(r, i, c))))
        })
    }

    /// Sets the padding columns of a map with `ch` channels to zero.
    fn zero_padding(&self, map: &mut [f32], ch: usize, rows: usize) {
        for block in map[..self.rows_up_to(rows) * ch].chunks_mut(self.p * ch) {
            block[..ch].fill(0.0);
            block[(self.p - 1) * ch..].fill(0.0);
        }
    }
}

/// The grid² regions of an H × W image that the embedding averages over.
struct Pooling {
    height: usize,
    width: usize,
    grid: usize,
    /// Pixels per region.
    count: Vec<f32>,
}

impl Pooling {
    fn new(height: usize, width: usize, grid: usize) -> Self {
        assert!(grid > 0, "an embedding grid of at least one region");
        let mut p = Self {
            height,
            width,
            grid,
            count: vec![0.0; grid * grid],
        };
        for r in 0..height {
            for c in 0..width {
                let k = p.region(r, c);
                p.count[k] += 1.0;
            }
        }
        p
    }

    /// The region of pixel (r, c), row-major.
    fn region(&self, r: usize, c: usize) -> usize {
        (r * self.grid / self.height) * self.grid + c * self.grid / self.width
    }

    /// Each image's mean of the map rows `relu` (`f` features per pixel) over each region, into
    /// `emb` (the chunk's images × regions × f); an empty region stays zero.
    fn mean_features(&self, g: &Geometry, relu: &[f32], f: usize, emb: &mut [f32]) {
        let width = self.grid * self.grid * f;
        emb.fill(0.0);
        for (i, r, c, m) in g.pixels(self.height) {
            let at = i * width + self.region(r, c) * f;
            emb[at..at + f]
                .iter_mut()
                .zip(&relu[m * f..(m + 1) * f])
                .for_each(|(e, v)| *e += v);
        }
        for image in emb.chunks_exact_mut(width) {
            for (part, &k) in image.chunks_exact_mut(f).zip(&self.count) {
                if k > 0.0 {
                    part.iter_mut().for_each(|e| *e /= k);
                }
            }
        }
    }
}

/// One LSTM direction's stored activations: gates after their nonlinearity (o, f, i, g per
/// cell), cell state, its tanh and output, on the map (Row LSTM) or the skewed grid (Diagonal BiLSTM).
#[derive(Debug, Default)]
struct Recurrence {
    gates: Vec<f32>,
    cell: Vec<f32>,
    tanh_cell: Vec<f32>,
    hidden: Vec<f32>,
}

/// One layer's stored activations.
#[derive(Debug, Default)]
struct LayerActs {
    /// The Diagonal BiLSTM's output map, its two directions summed: h per map row (empty for
    /// the Row LSTM, whose output is its hidden map).
    lstm: Vec<f32>,
    dirs: Vec<Recurrence>,
}

impl LayerActs {
    /// The map the 1×1 convolution back to 2h reads: h per map row.
    fn output(&self) -> &[f32] {
        match self.dirs.as_slice() {
            [one] => &one.hidden,
            _ => &self.lstm,
        }
    }
}

/// Every buffer a chunk's forward and backward pass use, allocated once per thread and
/// geometry (cells the passes never write stay zero, which the recurrences rely on).
#[derive(Debug, Default)]
struct Workspace {
    key: Option<(Shape, Geometry)>,
    /// Each layer's input features, and the last layer's output: (L + 1) · rows · 2h (a
    /// pass without `keep` uses the first two in turn).
    feats: Vec<f32>,
    /// With skip connections, the features the output layers read: the last layer's output
    /// plus every skip connection, rows · 2h (empty without).
    skipped: Vec<f32>,
    layers: Vec<LayerActs>,
    /// ReLU of the final features, and the first output layer after its ReLU: rows · 2h each.
    relu: Vec<f32>,
    head: Vec<f32>,
    /// 8-bit images: the mask-A inputs of every map row, [`LIVE_TAPS`] · C each (im2col).
    window: Vec<f32>,
    /// The logits, [`Shape::outputs`] per map row.
    logits: Vec<f32>,
    // Scratch of the passes.
    d_logits: Vec<f32>,
    d_feat: Vec<f32>,
    /// With skip connections, ∂ of the features the output layers read.
    d_final: Vec<f32>,
    d_tmp: Vec<f32>,
    d_h: Vec<f32>,
    d_z: Vec<f32>,
    d_c: Vec<f32>,
    d_block: Vec<f32>,
}

thread_local! {
    static WORKSPACE: RefCell<Workspace> = RefCell::new(Workspace::default());
    /// [`Net::gradient`]'s per-chunk gradients, on the thread that asks for a gradient.
    static PARTS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

fn with_workspace<R>(f: impl FnOnce(&mut Workspace) -> R) -> R {
    WORKSPACE.with(|ws| f(&mut ws.borrow_mut()))
}

impl Workspace {
    /// Sizes the buffers for `net` on a chunk of n images, zeroing them when the geometry
    /// changes.
    fn prepare(&mut self, net: &Net<'_>, n: usize) -> Geometry {
        let g = Geometry::new(n, net.height, net.width);
        let key = Some((net.shape, g));
        if self.key == key {
            return g;
        }
        let (f, h) = (net.shape.features(), net.shape.hidden);
        let zeros = |len: usize| vec![0f32; len];
        let grid = match net.shape.architecture {
            Architecture::RowLstm => g.rows,
            Architecture::DiagonalBiLstm => g.cells,
        };
        *self = Workspace {
            key,
            feats: zeros((net.shape.layers + 1) * g.rows * f),
            skipped: zeros(if net.shape.skip { g.rows * f } else { 0 }),
            layers: (0..net.shape.layers)
                .map(|_| LayerActs {
                    lstm: zeros(match net.shape.architecture {
                        Architecture::RowLstm => 0,
                        Architecture::DiagonalBiLstm => g.rows * h,
                    }),
                    dirs: (0..net.shape.architecture.directions())
                        .map(|_| Recurrence {
                            gates: zeros(grid * 4 * h),
                            cell: zeros(grid * h),
                            tanh_cell: zeros(grid * h),
                            hidden: zeros(grid * h),
                        })
                        .collect(),
                })
                .collect(),
            relu: zeros(g.rows * f),
            head: zeros(g.rows * f),
            window: zeros(if net.shape.levels > 2 {
                g.rows * LIVE_TAPS * net.shape.channels
            } else {
                0
            }),
            logits: zeros(g.rows * net.shape.outputs()),
            d_logits: zeros(g.rows * net.shape.outputs()),
            d_feat: zeros(g.rows * f),
            d_final: zeros(if net.shape.skip { g.rows * f } else { 0 }),
            d_tmp: zeros(g.rows * f),
            d_h: zeros(grid.max(g.rows) * h),
            // One zero row past the map, which the paired products read.
            d_z: zeros((g.rows + 1) * 4 * h),
            d_c: zeros(g.rows.max(g.height * n) * h),
            d_block: zeros(g.height * n * 4 * h),
        };
        g
    }
}

/// C (m × n, rows `ldc` apart) = A (m × k) · B (k × n) + β·C through [`gemm_rows`], whose B
/// has contiguous rows: a B laid out across (a weight read transposed, a few thousand values)
/// is copied into rows first.
#[allow(clippy::too_many_arguments)]
fn gemm(
    isa: Isa,
    m: usize,
    k: usize,
    n: usize,
    a: Mat<'_>,
    b: Mat<'_>,
    beta: f32,
    c: &mut [f32],
    ldc: usize,
) {
    gemm_bias(isa, m, k, n, a, b, beta, None, c, ldc);
}

/// [`gemm`] plus `bias` added to every row of C when given, in the same pass (no fill of C
/// first).
#[allow(clippy::too_many_arguments)]
fn gemm_bias(
    isa: Isa,
    m: usize,
    k: usize,
    n: usize,
    a: Mat<'_>,
    b: Mat<'_>,
    beta: f32,
    bias: Option<&[f32]>,
    c: &mut [f32],
    ldc: usize,
) {
    if b.cs == 1 {
        gemm_rows(isa, m, k, n, a, b.data, b.rs, beta, bias, c, ldc);
    } else {
        gemm_rows(isa, m, k, n, a, &rows_of(b, k, n), n, beta, bias, c, ldc);
    }
}

/// The k × n matrix `b` copied into contiguous rows (a weight read transposed, made once
/// before a loop that multiplies by it many times).
fn rows_of(b: Mat<'_>, k: usize, n: usize) -> Vec<f32> {
    let mut rows = Vec::with_capacity(k * n);
    for i in 0..k {
        rows.extend((0..n).map(|j| b.data[i * b.rs + j * b.cs]));
    }
    rows
}

/// A convolution's weights `[out][inner][taps]` (as stored) rearranged as the GEMM operand
/// `[taps · inner][out]`, row k = t·inner + u: what an im2col row `[x_{t=0}, x_{t=1}, …]` of
/// the input multiplies.
fn taps_major(w: &[f32], out: usize, inner: usize, taps: usize) -> Vec<f32> {
    let mut b = vec![0f32; taps * inner * out];
    for g in 0..out {
        for u in 0..inner {
            for t in 0..taps {
                b[(t * inner + u) * out + g] = w[(g * inner + u) * taps + t];
            }
        }
    }
    b
}

/// Adds a gradient in [`taps_major`] layout into the stored `[out][inner][taps]` layout.
fn add_taps_major(d: &[f32], grad: &mut [f32], out: usize, inner: usize, taps: usize) {
    for g in 0..out {
        for u in 0..inner {
            for t in 0..taps {
                grad[(g * inner + u) * taps + t] += d[(t * inner + u) * out + g];
            }
        }
    }
}

/// The mask-A inputs pixel (r, c) of `image` (`width` wide, `channels` per pixel) reads and
/// that are not zero, as (weight row t·C + channel, value): every channel of the window's rows
/// above and of its own row left of c, and the pixel's own channels but the last (which colour
/// groups after them see; the weights keep the mask).
fn input_taps(
    image: &[u8],
    width: usize,
    channels: usize,
    r: usize,
    c: usize,
) -> impl Iterator<Item = (usize, u8)> + '_ {
    let half = (INPUT_KERNEL / 2) as isize;
    (-half..=0).flat_map(move |dy| {
        let rr = r as isize + dy;
        let last = if dy == 0 { 0 } else { half };
        (-half..=last).flat_map(move |dx| {
            let cc = c as isize + dx;
            let inside = rr >= 0 && cc >= 0 && cc < width as isize;
            let t = ((dy + half) * INPUT_KERNEL as isize + dx + half) as usize;
            let pixel = if inside {
                (rr as usize * width + cc as usize) * channels
            } else {
                0
            };
            let seen = match (inside, dx == 0 && dy == 0) {
                (false, _) => 0,
                (true, true) => channels - 1,
                (true, false) => channels,
            };
            (0..seen).filter_map(move |k| {
                let v = image[pixel + k];
                (v != 0).then_some((t * channels + k, v))
            })
        })
    })
}

/// For every sub-pixel of `image` (`width` wide, `channels` per pixel) that is not zero, and
/// every pixel (r, c) among the first `rows` rows whose mask-A window reads it,
/// `visit(r, c, t·C + k)` with the weight row of that tap: [`input_taps`] turned around, so a
/// binary image's off sub-pixels cost nothing.
fn on_readers(
    image: &[u8],
    width: usize,
    channels: usize,
    rows: usize,
    mut visit: impl FnMut(usize, usize, usize),
) {
    let half = INPUT_KERNEL / 2;
    for (at, _) in image[..rows * width * channels]
        .iter()
        .enumerate()
        .filter(|(_, v)| **v != 0)
    {
        let (pixel, k) = (at / channels, at % channels);
        let (r0, c0) = (pixel / width, pixel % width);
        for r in r0..(r0 + half + 1).min(rows) {
            // Its own row reads it from the right (and the pixel itself, for the colour groups
            // after k); the rows below from either side.
            let lo = if r == r0 { c0 } else { c0.saturating_sub(half) };
            for c in lo..(c0 + half + 1).min(width) {
                if r == r0 && c == c0 && k + 1 == channels {
                    continue;
                }
                let t = (half - (r - r0)) * INPUT_KERNEL + c0 + half - c;
                visit(r, c, t * channels + k);
            }
        }
    }
}

/// `dst` += `src`, element by element, sixteen at a time in arrays (a plain loop here stayed
/// scalar: the compiler could not tell the map from the weights).
#[inline(always)]
fn add_assign(dst: &mut [f32], src: &[f32]) {
    let (mut d, mut s) = (dst.chunks_exact_mut(16), src.chunks_exact(16));
    for (d, s) in (&mut d).zip(&mut s) {
        let (d, s) = (sixteen_mut(d), *sixteen(s));
        for (d, s) in d.iter_mut().zip(s) {
            *d += s;
        }
    }
    for (d, s) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *d += s;
    }
}

dispatch! {
    /// ∂ through a ReLU: `d` zeroed wherever the ReLU's output (or input) `v` is not positive.
    fn through_relu(d: &mut [f32], v: &[f32]) -> ()
        => through_relu_body
}

// `T` only names the copy `dispatch!` compiles: its target features vectorize the loops.
#[allow(clippy::extra_unused_type_parameters)]
#[inline(always)]
fn through_relu_body<T: Target>(d: &mut [f32], v: &[f32]) {
    // Branch-free, so it compiles to a compare and a mask per vector.
    for (d, &v) in d.iter_mut().zip(v) {
        *d = if v > 0.0 { *d } else { 0.0 };
    }
}

dispatch! {
    /// Adds the column sums of the first `rows` rows of `m` (width `out.len()`) into `out`: a
    /// bias's gradient, summed over every pixel of a chunk.
    fn add_column_sums(m: &[f32], rows: usize, out: &mut [f32]) -> ()
        => add_column_sums_body
}

/// [`add_column_sums`]: sixteen columns at a time summed down a block of rows in an array
/// (which stays in registers) before they are added to `out`, rather than `out` loaded and
/// stored once per row; the block's rows stay in L1 while each sixteen are summed.
// `T` only names the copy `dispatch!` compiles (the loop needs no call of its own): what
// vectorizes it is that copy's target features.
#[allow(clippy::extra_unused_type_parameters)]
#[inline(always)]
fn add_column_sums_body<T: Target>(m: &[f32], rows: usize, out: &mut [f32]) {
    const BLOCK: usize = 64;
    let width = out.len();
    let whole = width - width % 16;
    for block in m[..rows * width].chunks(BLOCK * width) {
        for j in (0..whole).step_by(16) {
            let mut sum = [0f32; 16];
            for row in block.chunks_exact(width) {
                for (s, v) in sum.iter_mut().zip(sixteen(&row[j..])) {
                    *s += v;
                }
            }
            for (o, s) in out[j..j + 16].iter_mut().zip(sum) {
                *o += s;
            }
        }
        for row in block.chunks_exact(width) {
            for (o, v) in out[whole..].iter_mut().zip(&row[whole..]) {
                *o += v;
            }
        }
    }
}

dispatch! {
    /// LSTM step over a block of cells: `gates` holds the pre-activations (o, f, i, g per cell)
    /// and is left holding the activations; `c_prev` is the previous cell state (empty: zero).
    /// Writes the cell state, its tanh (which the backward pass reads) and the output.
    fn lstm_forward(gates: &mut [f32], c_prev: &[f32], cell: &mut [f32], tanh_cell: &mut [f32], hidden: &mut [f32], h: usize) -> ()
        => lstm_forward_body
}

#[inline(always)]
fn lstm_forward_body<T: Target>(
    gates: &mut [f32],
    c_prev: &[f32],
    cell: &mut [f32],
    tanh_cell: &mut [f32],
    hidden: &mut [f32],
    h: usize,
) {
    if h.is_multiple_of(16) {
        return lstm_forward_cells::<T>(gates, c_prev, cell, tanh_cell, hidden, h);
    }
    // The nonlinearities run over the whole block at once, not cell by cell: long contiguous
    // loops let the σ of many cells overlap (one cell's few vectors wait on each division in
    // turn). tanh(x) = 2σ(2x) − 1, so σ covers all four gates.
    for g in gates.chunks_exact_mut(4 * h) {
        g[3 * h..].iter_mut().for_each(|v| *v *= 2.0);
    }
    gates.iter_mut().for_each(|v| *v = sigmoid::<T>(*v));
    for (k, ((g, c), twice)) in gates
        .chunks_exact_mut(4 * h)
        .zip(cell.chunks_exact_mut(h))
        .zip(tanh_cell.chunks_exact_mut(h))
        .enumerate()
    {
        let (sig, tg) = g.split_at_mut(3 * h);
        tg.iter_mut().for_each(|v| *v = fmadd::<T>(2.0, *v, -1.0));
        let (f, i) = sig[h..].split_at(h);
        if c_prev.is_empty() {
            for ((c, &i), &g) in c.iter_mut().zip(i).zip(&*tg) {
                *c = i * g;
            }
        } else {
            let prev = &c_prev[k * h..(k + 1) * h];
            for ((((c, &f), &i), &g), &p) in c.iter_mut().zip(f).zip(i).zip(&*tg).zip(prev) {
                *c = fmadd::<T>(f, p, i * g);
            }
        }
        twice.iter_mut().zip(&*c).for_each(|(t, &c)| *t = 2.0 * c);
    }
    tanh_cell
        .iter_mut()
        .for_each(|v| *v = fmadd::<T>(2.0, sigmoid::<T>(*v), -1.0));
    for ((g, tc), out) in gates
        .chunks_exact(4 * h)
        .zip(tanh_cell.chunks_exact(h))
        .zip(hidden.chunks_exact_mut(h))
    {
        for ((out, &o), &tc) in out.iter_mut().zip(&g[..h]).zip(tc) {
            *out = o * tc;
        }
    }
}

/// [`lstm_forward_body`] for h a multiple of 16: one cell at a time, sixteen units at a time
/// in fixed-size arrays (which vectorize whole), so a cell's gates go from pre-activation to
/// output in registers instead of in passes over a block of gates larger than L1.
#[inline(always)]
fn lstm_forward_cells<T: Target>(
    gates: &mut [f32],
    c_prev: &[f32],
    cell: &mut [f32],
    tanh_cell: &mut [f32],
    hidden: &mut [f32],
    h: usize,
) {
    // Groups of cells in two phases, so each phase's σ of different cells overlap (within a
    // cell, tanh(c) waits on c, which waits on the gates).
    const GROUP: usize = 8;
    for (group, (((g, c), tc), out)) in gates
        .chunks_mut(GROUP * 4 * h)
        .zip(cell.chunks_mut(GROUP * h))
        .zip(tanh_cell.chunks_mut(GROUP * h))
        .zip(hidden.chunks_mut(GROUP * h))
        .enumerate()
    {
        // The gates, the cell state and 2c, which the second phase turns into tanh(c).
        for (k, ((g, c), tc)) in g
            .chunks_exact_mut(4 * h)
            .zip(c.chunks_exact_mut(h))
            .zip(tc.chunks_exact_mut(h))
            .enumerate()
        {
            let (o, rest) = g.split_at_mut(h);
            let (f, rest) = rest.split_at_mut(h);
            let (i, t) = rest.split_at_mut(h);
            let at = (group * GROUP + k) * h;
            for (u, (((((o, f), i), t), c), tc)) in o
                .chunks_exact_mut(16)
                .zip(f.chunks_exact_mut(16))
                .zip(i.chunks_exact_mut(16))
                .zip(t.chunks_exact_mut(16))
                .zip(c.chunks_exact_mut(16))
                .zip(tc.chunks_exact_mut(16))
                .enumerate()
            {
                let p: &[f32; 16] = if c_prev.is_empty() {
                    &[0.0; 16]
                } else {
                    sixteen(&c_prev[at + 16 * u..])
                };
                let (o, f, i, t) = (
                    sixteen_mut(o),
                    sixteen_mut(f),
                    sixteen_mut(i),
                    sixteen_mut(t),
                );
                let (c, tc) = (sixteen_mut(c), sixteen_mut(tc));
                // tanh(x) = 2σ(2x) − 1.
                for q in 0..16 {
                    o[q] = sigmoid::<T>(o[q]);
                    f[q] = sigmoid::<T>(f[q]);
                    i[q] = sigmoid::<T>(i[q]);
                    t[q] = fmadd::<T>(2.0, sigmoid::<T>(2.0 * t[q]), -1.0);
                    c[q] = fmadd::<T>(f[q], p[q], i[q] * t[q]);
                    tc[q] = 2.0 * c[q];
                }
            }
        }
        for ((g, tc), out) in g
            .chunks_exact(4 * h)
            .zip(tc.chunks_exact_mut(h))
            .zip(out.chunks_exact_mut(h))
        {
            for ((o, tc), out) in g[..h]
                .chunks_exact(16)
                .zip(tc.chunks_exact_mut(16))
                .zip(out.chunks_exact_mut(16))
            {
                let (o, tc, out) = (sixteen(o), sixteen_mut(tc), sixteen_mut(out));
                for q in 0..16 {
                    tc[q] = fmadd::<T>(2.0, sigmoid::<T>(tc[q]), -1.0);
                    out[q] = o[q] * tc[q];
                }
            }
        }
    }
}

/// The Row LSTM's slot for image row `r`'s recurrent state, and the row above's (none for the
/// first row): with `keep` the map's own rows, without two slots in turn.
fn row_slots(r: usize, keep: bool) -> (usize, Option<usize>) {
    if keep {
        (r, r.checked_sub(1))
    } else {
        (r % 2, (r > 0).then_some((r + 1) % 2))
    }
}

/// Slot `slot` of `buf` (slots of `len` values), mutable, and slot `above` (none: empty): a
/// row's recurrent state and the row above's, which it reads.
fn row_and_above(
    buf: &mut [f32],
    slot: usize,
    above: Option<usize>,
    len: usize,
) -> (&mut [f32], &[f32]) {
    let at = slot * len;
    match above {
        None => (&mut buf[at..at + len], &[]),
        Some(a) if a < slot => {
            let (lo, hi) = buf.split_at_mut(at);
            (&mut hi[..len], &lo[a * len..(a + 1) * len])
        }
        Some(a) => {
            let (lo, hi) = buf.split_at_mut(a * len);
            (&mut lo[at..at + len], &hi[..len])
        }
    }
}

/// The first sixteen values of `v`, as an array (loops over it vectorize whole).
#[inline(always)]
fn sixteen(v: &[f32]) -> &[f32; 16] {
    v[..16].try_into().expect("16 values")
}

/// [`sixteen`], mutable.
#[inline(always)]
fn sixteen_mut(v: &mut [f32]) -> &mut [f32; 16] {
    (&mut v[..16]).try_into().expect("16 values")
}

dispatch! {
    /// Back through one LSTM step over a block of cells: from ∂h (`d_h`) and the cell
    /// gradient arriving from the next step (`d_c`, which is left holding what goes to the
    /// previous step, ∂c ⊙ f), the gate pre-activations' gradient into `d_z`.
    #[allow(clippy::too_many_arguments)]
    fn lstm_backward(gates: &[f32], c_prev: &[f32], tanh_cell: &[f32], d_h: &[f32], d_c: &mut [f32], d_z: &mut [f32], h: usize) -> ()
        => lstm_backward_body
}

#[inline(always)]
fn lstm_backward_body<T: Target>(
    gates: &[f32],
    c_prev: &[f32],
    tanh_cell: &[f32],
    d_h: &[f32],
    d_c: &mut [f32],
    d_z: &mut [f32],
    h: usize,
) {
    if h.is_multiple_of(16) {
        return lstm_backward_cells::<T>(gates, c_prev, tanh_cell, d_h, d_c, d_z, h);
    }
    for (k, (g, dz)) in gates
        .chunks_exact(4 * h)
        .zip(d_z.chunks_exact_mut(4 * h))
        .enumerate()
    {
        let (o, f, i, gg) = (&g[..h], &g[h..2 * h], &g[2 * h..3 * h], &g[3 * h..]);
        for u in 0..h {
            let at = k * h + u;
            let prev = if c_prev.is_empty() { 0.0 } else { c_prev[at] };
            let gates = [o[u], f[u], i[u], gg[u]];
            let (z, dc) = unit_backward::<T>(gates, tanh_cell[at], prev, d_h[at], d_c[at]);
            [dz[u], dz[h + u], dz[2 * h + u], dz[3 * h + u]] = z;
            d_c[at] = dc;
        }
    }
}

/// One LSTM unit back through a step: from its gates after their nonlinearity `[o, f, i, g]`,
/// tanh(c), the previous cell state, ∂h and the ∂c arriving from the next step, the gate
/// pre-activations' gradient and the ∂c passed to the previous step (∂c ⊙ f).
#[inline(always)]
fn unit_backward<T: Target>(
    [o, f, i, g]: [f32; 4],
    tanh_cell: f32,
    c_prev: f32,
    d_h: f32,
    d_c: f32,
) -> ([f32; 4], f32) {
    let dc = fmadd::<T>(d_h * o, 1.0 - tanh_cell * tanh_cell, d_c);
    let d_z = [
        d_h * tanh_cell * o * (1.0 - o),
        dc * c_prev * f * (1.0 - f),
        dc * g * i * (1.0 - i),
        dc * i * (1.0 - g * g),
    ];
    (d_z, dc * f)
}

/// [`lstm_backward_body`] for h a multiple of 16: sixteen units at a time in fixed-size
/// arrays, which vectorize whole (the general loop's indexing does not).
#[inline(always)]
fn lstm_backward_cells<T: Target>(
    gates: &[f32],
    c_prev: &[f32],
    tanh_cell: &[f32],
    d_h: &[f32],
    d_c: &mut [f32],
    d_z: &mut [f32],
    h: usize,
) {
    let zero = [0f32; 16];
    for (k, (g, dz)) in gates
        .chunks_exact(4 * h)
        .zip(d_z.chunks_exact_mut(4 * h))
        .enumerate()
    {
        let (dz_o, rest) = dz.split_at_mut(h);
        let (dz_f, rest) = rest.split_at_mut(h);
        let (dz_i, dz_g) = rest.split_at_mut(h);
        for u in (0..h).step_by(16) {
            let at = k * h + u;
            let (o, f) = (sixteen(&g[u..]), sixteen(&g[h + u..]));
            let (i, gg) = (sixteen(&g[2 * h + u..]), sixteen(&g[3 * h + u..]));
            let (tc, dh) = (sixteen(&tanh_cell[at..]), sixteen(&d_h[at..]));
            let prev = if c_prev.is_empty() {
                &zero
            } else {
                sixteen(&c_prev[at..])
            };
            let dc = sixteen_mut(&mut d_c[at..]);
            let (dz_o, dz_f) = (sixteen_mut(&mut dz_o[u..]), sixteen_mut(&mut dz_f[u..]));
            let (dz_i, dz_g) = (sixteen_mut(&mut dz_i[u..]), sixteen_mut(&mut dz_g[u..]));
            for q in 0..16 {
                let gates = [o[q], f[q], i[q], gg[q]];
                let (z, c) = unit_backward::<T>(gates, tc[q], prev[q], dh[q], dc[q]);
                [dz_o[q], dz_f[q], dz_i[q], dz_g[q]] = z;
                dc[q] = c;
            }
        }
    }
}

/// The forward pass over one chunk (`x`: n images) for image rows `0..rows`, leaving the
/// logits (map layout) and the final features' ReLU in `ws`, and with `keep` every activation
/// the backward pass reads (without it, only what the next step needs is kept, in less room).
fn forward(net: &Net<'_>, g: &Geometry, ws: &mut Workspace, x: &[u8], rows: usize, keep: bool) {
    let (f, h) = (net.shape.features(), net.shape.hidden);
    let o = net.shape.offsets();
    let w = net.params;
    let active = g.rows_up_to(rows);
    let plane = g.rows * f;

    // Mask A: at (r, c), the pixels above within the 7 × 7 window and those to its left, on
    // x / (L − 1).
    let ch = net.shape.channels;
    let taps = taps_major(&w[o.input..], f, ch, TAPS_A);
    let scale = 1.0 / (net.shape.levels - 1) as f32;
    let bias = &w[o.input_bias..o.input_bias + f];
    let feat0 = &mut ws.feats[..plane];
    feat0.fill(0.0);
    let d = net.dims();
    if net.shape.levels == 2 {
        // Binary pixels are mostly off: add the weights of the taps that are on, visiting
        // only the sub-pixels that are.
        for (_, _, _, m) in g.pixels(rows) {
            feat0[m * f..(m + 1) * f].copy_from_slice(bias);
        }
        for i in 0..g.n {
            on_readers(&x[i * d..(i + 1) * d], g.width, ch, rows, |r, c, t| {
                let m = g.pix(r, i, c);
                add_assign(&mut feat0[m * f..(m + 1) * f], &taps[t * f..(t + 1) * f]);
            });
        }
    } else {
        // 8-bit sub-pixels are mostly on: one GEMM over the window of every pixel.
        let k = LIVE_TAPS * ch;
        let window = &mut ws.window[..active * k];
        window.fill(0.0);
        for (i, r, c, m) in g.pixels(rows) {
            for (t, v) in input_taps(&x[i * d..(i + 1) * d], g.width, ch, r, c) {
                window[m * k + t] = f32::from(v) * scale;
            }
        }
        gemm_bias(
            net.isa,
            active,
            k,
            f,
            mat(window, k, 1),
            mat(&taps, f, 1),
            0.0,
            Some(bias),
            feat0,
            f,
        );
        g.zero_padding(feat0, f, rows);
    }

    // Without `keep`, layers take turns in two feature maps and share one set of activations,
    // which then stay in cache from layer to layer.
    let slot = |l: usize| if keep { l } else { l % 2 };
    for (l, at) in o.layers.iter().enumerate() {
        let (input, after) = if slot(l) < slot(l + 1) {
            let (before, after) = ws.feats.split_at_mut(slot(l + 1) * plane);
            (&before[slot(l) * plane..], after)
        } else {
            let (before, after) = ws.feats.split_at_mut(plane);
            (&after[..plane], before)
        };
        let acts = &mut ws.layers[if keep { l } else { 0 }];
        let next = &mut after[..plane];
        if row_step::applies(net) {
            row_step::layer(net, g, at, input, next, &mut acts.dirs[0], rows, keep);
        } else {
            match net.shape.architecture {
                Architecture::RowLstm => row_lstm_forward(net, g, at, input, acts, rows, keep),
                Architecture::DiagonalBiLstm => diagonal_forward(net, g, at, input, acts, rows),
            }
            // Back to 2h features, added to the layer's input.
            next[..active * f].copy_from_slice(&input[..active * f]);
            gemm_bias(
                net.isa,
                active,
                h,
                f,
                mat(acts.output(), h, 1),
                mat(&w[at.output..], 1, h),
                1.0,
                Some(&w[at.output_bias..at.output_bias + f]),
                next,
                f,
            );
            g.zero_padding(next, f, rows);
        }
        if let Some(skip) = at.skip {
            // Zero padding in, zero padding out: the skip has no bias.
            gemm(
                net.isa,
                active,
                f,
                f,
                mat(next, f, 1),
                mat(&w[skip..], 1, f),
                if l == 0 { 0.0 } else { 1.0 },
                &mut ws.skipped,
                f,
            );
        }
    }

    // Output: ReLU, 1×1 to 2h, ReLU, 1×1 to the logits.
    let last_slot = slot(net.shape.layers);
    let mut last = &ws.feats[last_slot * plane..(last_slot + 1) * plane];
    if net.shape.skip {
        ws.skipped[..active * f]
            .iter_mut()
            .zip(&last[..active * f])
            .for_each(|(s, v)| *s += v);
        last = &ws.skipped;
    }
    ws.relu[..active * f]
        .iter_mut()
        .zip(&last[..active * f])
        .for_each(|(y, v)| *y = v.max(0.0));
    gemm_bias(
        net.isa,
        active,
        f,
        f,
        mat(&ws.relu, f, 1),
        mat(&w[o.head..], 1, f),
        0.0,
        Some(&w[o.head_bias..o.head_bias + f]),
        &mut ws.head,
        f,
    );
    ws.head[..active * f]
        .iter_mut()
        .for_each(|v| *v = v.max(0.0));
    let outs = net.shape.outputs();
    gemm_bias(
        net.isa,
        active,
        f,
        outs,
        mat(&ws.head, f, 1),
        mat(&w[o.logit..], 1, f),
        0.0,
        Some(&w[o.logit_bias..o.logit_bias + outs]),
        &mut ws.logits,
        outs,
    );
}

/// Row LSTM forward, row by row (so a row's gates stay in cache from their products to the
/// nonlinearities): the input-to-state (taps dx = −1, 0 of the layer's input), the
/// state-to-state (dx = −1, 0, +1 over the row above) and the gates. The layer's output is the
/// LSTM's hidden map itself. Without `keep` (no backward pass follows), the gates, cell
/// states and their tanh of only two rows are kept, in the first two rows' places, so what a row
/// writes stays in cache instead of streaming the whole map's activations out to memory.
fn row_lstm_forward(
    net: &Net<'_>,
    g: &Geometry,
    at: &LayerAt,
    input: &[f32],
    acts: &mut LayerActs,
    rows: usize,
    keep: bool,
) {
    let (f, h, w) = (net.shape.features(), net.shape.hidden, net.params);
    let rec = &mut acts.dirs[0];
    let z = &mut rec.gates;
    let bias = &w[at.input_bias[0]..at.input_bias[0] + 4 * h];
    let w_in = taps_major(&w[at.input[0]..], 4 * h, f, 2);
    let w_state = taps_major(&w[at.state[0]..], 4 * h, h, 3);
    let block = g.n * g.p;
    for r in 0..rows {
        let (b0, b1) = (r * block, (r + 1) * block);
        // The slot of this row's gates, cells and tanh, and of the row above's cells.
        let (slot, above) = row_slots(r, keep);
        let (s0, s1) = (slot * block, (slot + 1) * block);
        let zr = &mut z[s0 * 4 * h..s1 * 4 * h];
        // Both input taps at once: map rows m − 1 and m are 2·2h contiguous values, so A is an
        // overlapping view and K = 4h. The block's first map row is padding, never a pixel:
        // its gates only need to be finite.
        zr[..4 * h].copy_from_slice(bias);
        gemm_bias(
            net.isa,
            block - 1,
            2 * f,
            4 * h,
            mat(&input[b0 * f..], f, 1),
            mat(&w_in, 4 * h, 1),
            0.0,
            Some(bias),
            &mut zr[4 * h..],
            4 * h,
        );
        if r > 0 {
            // The row above at c − 1, c, c + 1, all three taps in one product (K = 3h); the
            // block's first and last map rows are padding.
            let prev = &rec.hidden[(b0 - block) * h..b0 * h];
            gemm(
                net.isa,
                block - 2,
                3 * h,
                4 * h,
                mat(prev, h, 1),
                mat(&w_state, 4 * h, 1),
                1.0,
                &mut zr[4 * h..],
                4 * h,
            );
        }
        let (cell, c_prev) = row_and_above(&mut rec.cell, slot, above, block * h);
        lstm_forward(
            net.isa,
            zr,
            c_prev,
            cell,
            &mut rec.tanh_cell[s0 * h..s1 * h],
            &mut rec.hidden[b0 * h..b1 * h],
            h,
        );
        // The padding columns' states are junk; the next row's taps must read zeros there.
        for cells in rec.hidden[b0 * h..b1 * h]
            .chunks_mut(g.p * h)
            .chain(cell.chunks_mut(g.p * h))
        {
            cells[..h].fill(0.0);
            cells[(g.p - 1) * h..].fill(0.0);
        }
    }
}

/// Diagonal BiLSTM forward: per direction, the 1×1 input-to-state for all pixels at once, then
/// skewed column by column the state-to-state (same row and row above in the previous column)
/// and the gates; the output map is the left-to-right LSTM plus the mirrored one shifted down a
/// row.
fn diagonal_forward(
    net: &Net<'_>,
    g: &Geometry,
    at: &LayerAt,
    input: &[f32],
    acts: &mut LayerActs,
    rows: usize,
) {
    let (f, h, w) = (net.shape.features(), net.shape.hidden, net.params);
    let columns = g.width + rows - 1;
    let mut starts = Vec::with_capacity(g.height * g.n);
    for d in 0..2 {
        let bias = &w[at.input_bias[d]..at.input_bias[d] + 4 * h];
        let w_in = rows_of(mat(&w[at.input[d]..], 1, f), f, 4 * h);
        let rec = &mut acts.dirs[d];
        let w_state = taps_major(&w[at.state[d]..], 4 * h, h, 2);
        for j in 0..columns {
            let Some((lo, hi)) = g.valid(j, rows) else {
                continue;
            };
            let (c0, c1) = (g.cell(j, lo, 0), g.cell(j, hi + 1, 0));
            // The input-to-state of the column's cells, read from the map where their pixels
            // lie (skewing by gathering, not by copying).
            starts.clear();
            starts.extend(
                (lo..=hi).flat_map(|r| (0..g.n).map(move |i| g.pix(r, i, g.column(j, r, d)) * f)),
            );
            gemm_gathered_bias(
                net.isa,
                f,
                4 * h,
                Gathered {
                    data: input,
                    starts: &starts,
                },
                &w_in,
                4 * h,
                bias,
                &mut rec.gates[c0 * 4 * h..c1 * 4 * h],
                4 * h,
            );
            let cells = c1 - c0;
            if j > 0 {
                // The previous column's cells of the same rows, and of the rows above, lie
                // contiguous in the skewed grid (a cell never written is zero): one product per
                // tap, read in place. Row 0 has no row above.
                let (same, skip) = (g.cell(j - 1, lo, 0), usize::from(lo == 0) * g.n);
                let (tap0, tap1) = w_state.split_at(h * 4 * h);
                for (from, tap, first) in [(same, tap0, 0), (same + skip - g.n, tap1, skip)] {
                    gemm(
                        net.isa,
                        cells - first,
                        h,
                        4 * h,
                        mat(&rec.hidden[from * h..], h, 1),
                        mat(tap, 4 * h, 1),
                        1.0,
                        &mut rec.gates[(c0 + first) * 4 * h..c1 * 4 * h],
                        4 * h,
                    );
                }
            }
            let (done, rest) = rec.cell.split_at_mut(c0 * h);
            let c_prev = if j > 0 {
                let prev = g.cell(j - 1, lo, 0);
                &done[prev * h..(prev + cells) * h]
            } else {
                &[][..]
            };
            lstm_forward(
                net.isa,
                &mut rec.gates[c0 * 4 * h..c1 * 4 * h],
                c_prev,
                &mut rest[..cells * h],
                &mut rec.tanh_cell[c0 * h..c1 * h],
                &mut rec.hidden[c0 * h..c1 * h],
                h,
            );
        }
    }
    let (fwd, bwd) = (&acts.dirs[0].hidden, &acts.dirs[1].hidden);
    for (i, r, c, m) in g.pixels(rows) {
        let out = &mut acts.lstm[m * h..(m + 1) * h];
        let a = g.cell(r + c, r, i);
        out.copy_from_slice(&fwd[a * h..(a + 1) * h]);
        if r > 0 {
            let b = g.cell(r - 1 + g.width - 1 - c, r - 1, i);
            out.iter_mut()
                .zip(&bwd[b * h..(b + 1) * h])
                .for_each(|(o, v)| *o += v);
        }
    }
}

/// The backward pass over one chunk after [`forward`] over all its rows: adds ∂(Σ NLL)/∂θ into
/// `grad` and returns Σ NLL.
fn backward(net: &Net<'_>, g: &Geometry, ws: &mut Workspace, x: &[u8], grad: &mut [f32]) -> f64 {
    let (f, h) = (net.shape.features(), net.shape.hidden);
    let o = net.shape.offsets();
    let w = net.params;
    let rows = g.rows;
    let plane = rows * f;

    // ∂NLL/∂logit at every pixel (σ(z) − x, or softmax − one-hot), zero on the padding.
    let outs = net.shape.outputs();
    let mut terms = vec![0f32; x.len()];
    let d_logit = &mut ws.d_logits[..rows * outs];
    d_logit.fill(0.0);
    let nll = -read_terms(net, g, &ws.logits, x, &mut terms, Some(d_logit))
        .iter()
        .sum::<f64>();
    add_column_sums(
        net.isa,
        d_logit,
        rows,
        &mut grad[o.logit_bias..o.logit_bias + outs],
    );
    gemm(
        net.isa,
        outs,
        rows,
        f,
        mat(d_logit, 1, outs),
        mat(&ws.head, f, 1),
        1.0,
        &mut grad[o.logit..],
        f,
    );
    // Through the second ReLU: ∂head = ∂logits · W where the head is on.
    let d_head = &mut ws.d_tmp;
    gemm(
        net.isa,
        rows,
        outs,
        f,
        mat(d_logit, outs, 1),
        mat(&w[o.logit..], f, 1),
        0.0,
        d_head,
        f,
    );
    through_relu(net.isa, &mut d_head[..plane], &ws.head[..plane]);
    gemm(
        net.isa,
        f,
        rows,
        f,
        mat(d_head, 1, f),
        mat(&ws.relu, f, 1),
        1.0,
        &mut grad[o.head..],
        f,
    );
    add_column_sums(
        net.isa,
        d_head,
        rows,
        &mut grad[o.head_bias..o.head_bias + f],
    );
    gemm(
        net.isa,
        rows,
        f,
        f,
        mat(d_head, f, 1),
        mat(&w[o.head..], f, 1),
        0.0,
        &mut ws.d_feat,
        f,
    );
    let last = if net.shape.skip {
        &ws.skipped
    } else {
        &ws.feats[net.shape.layers * plane..]
    };
    through_relu(net.isa, &mut ws.d_feat[..plane], &last[..plane]);
    if net.shape.skip {
        ws.d_final[..plane].copy_from_slice(&ws.d_feat[..plane]);
    }

    for (l, at) in o.layers.iter().enumerate().rev() {
        let input = &ws.feats[l * plane..(l + 1) * plane];
        let acts = &ws.layers[l];
        if let Some(skip) = at.skip {
            // The skip connection reads this layer's output maps: its gradient, and its share
            // of ∂ of those maps (the rest came down the residual path from the layers above).
            let output = &ws.feats[(l + 1) * plane..(l + 2) * plane];
            gemm(
                net.isa,
                f,
                rows,
                f,
                mat(&ws.d_final, 1, f),
                mat(output, f, 1),
                1.0,
                &mut grad[skip..],
                f,
            );
            gemm(
                net.isa,
                rows,
                f,
                f,
                mat(&ws.d_final, f, 1),
                mat(&w[skip..], f, 1),
                1.0,
                &mut ws.d_feat,
                f,
            );
        }
        // The 1×1 back to 2h.
        gemm(
            net.isa,
            f,
            rows,
            h,
            mat(&ws.d_feat, 1, f),
            mat(acts.output(), h, 1),
            1.0,
            &mut grad[at.output..],
            h,
        );
        add_column_sums(
            net.isa,
            &ws.d_feat,
            rows,
            &mut grad[at.output_bias..at.output_bias + f],
        );
        let d_lstm = &mut ws.d_tmp[..rows * h];
        gemm(
            net.isa,
            rows,
            f,
            h,
            mat(&ws.d_feat, f, 1),
            mat(&w[at.output..], h, 1),
            0.0,
            d_lstm,
            h,
        );
        let scratch = Scratch {
            d_h: &mut ws.d_h,
            d_z: &mut ws.d_z,
            d_c: &mut ws.d_c,
            d_block: &mut ws.d_block,
        };
        match net.shape.architecture {
            Architecture::RowLstm => row_lstm_backward(
                net,
                g,
                at,
                input,
                acts,
                d_lstm,
                scratch,
                &mut ws.d_feat,
                grad,
            ),
            Architecture::DiagonalBiLstm => diagonal_backward(
                net,
                g,
                at,
                input,
                acts,
                d_lstm,
                scratch,
                &mut ws.d_feat,
                grad,
            ),
        }
        g.zero_padding(&mut ws.d_feat, f, g.height);
    }

    // Mask A, gathered in the taps-major layout of the forward pass.
    let (ch, d) = (net.shape.channels, net.dims());
    let mut d_taps = vec![0f32; TAPS_A * ch * f];
    let d_feat = &ws.d_feat;
    // The padding rows of ∂features are zero.
    add_column_sums(
        net.isa,
        d_feat,
        rows,
        &mut grad[o.input_bias..o.input_bias + f],
    );
    if net.shape.levels == 2 {
        for i in 0..g.n {
            on_readers(&x[i * d..(i + 1) * d], g.width, ch, g.height, |r, c, t| {
                let m = g.pix(r, i, c);
                add_assign(&mut d_taps[t * f..(t + 1) * f], &d_feat[m * f..(m + 1) * f]);
            });
        }
    } else {
        let k = LIVE_TAPS * ch;
        gemm(
            net.isa,
            k,
            rows,
            f,
            mat(&ws.window, 1, k),
            mat(d_feat, f, 1),
            0.0,
            &mut d_taps,
            f,
        );
    }
    add_taps_major(&d_taps, &mut grad[o.input..], f, ch, TAPS_A);
    nll
}

/// The backward pass's scratch buffers.
struct Scratch<'a> {
    d_h: &'a mut [f32],
    d_z: &'a mut [f32],
    d_c: &'a mut [f32],
    d_block: &'a mut [f32],
}

/// Row LSTM backward: back through the rows (gates and the input-to-state bias's gradient,
/// then the state-to-state into the row above), then both weights' gradients and ∂ of the input
/// for all rows at once. `d_lstm` is ∂ of the layer's LSTM output map; adds ∂ of the layer's
/// input into `d_feat`.
#[allow(clippy::too_many_arguments)]
fn row_lstm_backward(
    net: &Net<'_>,
    g: &Geometry,
    at: &LayerAt,
    input: &[f32],
    acts: &LayerActs,
    d_lstm: &[f32],
    s: Scratch<'_>,
    d_feat: &mut [f32],
    grad: &mut [f32],
) {
    let (f, h, w) = (net.shape.features(), net.shape.hidden, net.params);
    let rows = g.rows;
    let rec = &acts.dirs[0];
    let block = g.n * g.p;
    let d_h = &mut s.d_h[..rows * h];
    d_h.copy_from_slice(d_lstm);
    // With the zero row past the map, which the last row's ∂ of the row above reads.
    let d_z = &mut s.d_z[..(rows + 1) * 4 * h];
    let d_c = &mut s.d_c[..block * h];
    d_c.fill(0.0);
    let state = at.state[0];
    let taps = [0, 1, 2].map(|tap| rows_of(mat(&w[state + tap..], 3 * h, 3), 4 * h, h));
    let above = paired_backward::RowAboveWeights::new([&taps[0], &taps[1], &taps[2]]);
    let mut above_scratch = Vec::new();
    let bias_grad = &mut grad[at.input_bias[0]..at.input_bias[0] + 4 * h];
    for r in (0..g.height).rev() {
        let (b0, b1) = (r * block, (r + 1) * block);
        // The padding columns' states are not the model's; what reached them goes nowhere.
        for cells in d_h[b0 * h..b1 * h].chunks_mut(g.p * h) {
            cells[..h].fill(0.0);
            cells[(g.p - 1) * h..].fill(0.0);
        }
        let c_prev = if r > 0 {
            &rec.cell[(b0 - block) * h..b0 * h]
        } else {
            &[][..]
        };
        lstm_backward(
            net.isa,
            &rec.gates[b0 * 4 * h..b1 * 4 * h],
            c_prev,
            &rec.tanh_cell[b0 * h..b1 * h],
            &d_h[b0 * h..b1 * h],
            d_c,
            &mut d_z[b0 * 4 * h..b1 * 4 * h],
            h,
        );
        // The input-to-state bias's gradient, while the row's ∂z is in cache (the padding map
        // rows' ∂z is zero).
        add_column_sums(net.isa, &d_z[b0 * 4 * h..b1 * 4 * h], block, bias_grad);
        if r > 0 {
            // ∂ of the row above at its map rows 1..block − 1 (the first and last are padding),
            // each read by the map rows below it from a + block − 1 on: this row's (zero on
            // its padding columns, whose ∂h was zeroed above) and, past its end, the next
            // row's first (padding, zero) or ∂z's zero row past the map. A write past the
            // outputs lands on the last padding column, which the next step zeroes.
            paired_backward::row_above_gradient(
                net.isa,
                h,
                block - 2,
                &d_z[b0 * 4 * h..(b1 + 1) * 4 * h],
                &above,
                &mut above_scratch,
                &mut d_h[(b0 - block + 1) * h..b0 * h],
            );
        }
    }
    // Both weights' gradients and ∂ of the input, every row at once (the padding map rows
    // have ∂z = 0, so they add nothing).
    let input_w = at.input[0];
    let [left, centre] = [0, 1].map(|tap| rows_of(mat(&w[input_w + tap..], 2 * f, 2), 4 * h, f));
    let mut d_input = vec![0f32; 2 * f * 4 * h];
    let mut d_state = vec![0f32; 3 * h * 4 * h];
    paired_backward::backward_products(
        net.isa,
        h,
        block,
        &s.d_z[..(rows + 1) * 4 * h],
        input,
        &rec.hidden[..rows * h],
        paired_backward::InputWeights {
            left: &left,
            centre: &centre,
        },
        paired_backward::Gradients {
            input_weights: &mut d_input,
            state_weights: &mut d_state,
            input: &mut d_feat[..rows * f],
        },
    );
    add_taps_major(&d_state, &mut grad[state..], 4 * h, h, 3);
    add_taps_major(&d_input, &mut grad[input_w..], 4 * h, f, 2);
}

/// Diagonal BiLSTM backward: the output map's gradient scattered onto both skewed grids, back
/// through the skewed columns, then the 1×1 input-to-state for all pixels at once.
#[allow(clippy::too_many_arguments)]
fn diagonal_backward(
    net: &Net<'_>,
    g: &Geometry,
    at: &LayerAt,
    input: &[f32],
    acts: &LayerActs,
    d_lstm: &[f32],
    s: Scratch<'_>,
    d_feat: &mut [f32],
    grad: &mut [f32],
) {
    let (f, h, w) = (net.shape.features(), net.shape.hidden, net.params);
    let rows = g.rows;
    for d in 0..2 {
        let rec = &acts.dirs[d];
        let d_h = &mut s.d_h[..g.cells * h];
        d_h.fill(0.0);
        for (i, r, c, m) in g.pixels(g.height) {
            let cell = if d == 0 {
                g.cell(r + c, r, i)
            } else if r + 1 < g.height {
                // The mirrored LSTM's (r, c) feeds the output at (r + 1, c).
                let m = g.pix(r + 1, i, c);
                let cell = g.cell(r + g.width - 1 - c, r, i);
                d_h[cell * h..(cell + 1) * h]
                    .iter_mut()
                    .zip(&d_lstm[m * h..(m + 1) * h])
                    .for_each(|(a, b)| *a += b);
                continue;
            } else {
                continue;
            };
            d_h[cell * h..(cell + 1) * h]
                .iter_mut()
                .zip(&d_lstm[m * h..(m + 1) * h])
                .for_each(|(a, b)| *a += b);
        }
        let d_c = &mut s.d_c[..g.height * g.n * h];
        d_c.fill(0.0);
        let d_z = &mut s.d_z[..rows * 4 * h];
        d_z.fill(0.0);
        let state = at.state[d];
        let w_state = taps_major(&w[state..], 4 * h, h, 2);
        let (tap0, tap1) = w_state.split_at(h * 4 * h);
        let taps_t = [tap0, tap1].map(|tap| rows_of(mat(tap, 1, 4 * h), 4 * h, h));
        let mut d_state = vec![0f32; 2 * h * 4 * h];
        for j in (0..g.skewed).rev() {
            let Some((lo, hi)) = g.valid(j, g.height) else {
                continue;
            };
            let (c0, c1) = (g.cell(j, lo, 0), g.cell(j, hi + 1, 0));
            let cells = c1 - c0;
            let dz = &mut s.d_block[..cells * 4 * h];
            let c_prev = if j > 0 {
                let prev = g.cell(j - 1, lo, 0);
                &rec.cell[prev * h..(prev + cells) * h]
            } else {
                &[][..]
            };
            lstm_backward(
                net.isa,
                &rec.gates[c0 * 4 * h..c1 * 4 * h],
                c_prev,
                &rec.tanh_cell[c0 * h..c1 * h],
                &d_h[c0 * h..c1 * h],
                &mut d_c[lo * g.n * h..(hi + 1) * g.n * h],
                dz,
                h,
            );
            if j > 0 {
                // As in the forward pass, each tap in place: the state weights' gradient, and
                // what reaches the previous column's hidden states.
                let (same, skip) = (g.cell(j - 1, lo, 0), usize::from(lo == 0) * g.n);
                let (d0, d1) = d_state.split_at_mut(h * 4 * h);
                for (from, tap_t, d_tap, first) in [
                    (same, &taps_t[0], d0, 0),
                    (same + skip - g.n, &taps_t[1], d1, skip),
                ] {
                    let dz = &dz[first * 4 * h..];
                    gemm(
                        net.isa,
                        h,
                        cells - first,
                        4 * h,
                        mat(&rec.hidden[from * h..], 1, h),
                        mat(dz, 4 * h, 1),
                        1.0,
                        d_tap,
                        4 * h,
                    );
                    gemm(
                        net.isa,
                        cells - first,
                        4 * h,
                        h,
                        mat(dz, 4 * h, 1),
                        mat(tap_t, h, 1),
                        1.0,
                        &mut d_h[from * h..],
                        h,
                    );
                }
            }
            for r in lo..=hi {
                let c = g.column(j, r, d);
                for i in 0..g.n {
                    let (cell, m) = (g.cell(j, r, i) - c0, g.pix(r, i, c));
                    d_z[m * 4 * h..(m + 1) * 4 * h]
                        .copy_from_slice(&dz[cell * 4 * h..(cell + 1) * 4 * h]);
                }
            }
        }
        add_taps_major(&d_state, &mut grad[state..], 4 * h, h, 2);
        gemm(
            net.isa,
            4 * h,
            rows,
            f,
            mat(d_z, 1, 4 * h),
            mat(input, f, 1),
            1.0,
            &mut grad[at.input[d]..],
            f,
        );
        add_column_sums(
            net.isa,
            d_z,
            rows,
            &mut grad[at.input_bias[d]..at.input_bias[d] + 4 * h],
        );
        gemm(
            net.isa,
            rows,
            4 * h,
            f,
            mat(d_z, 4 * h, 1),
            mat(&w[at.input[d]..], f, 1),
            1.0,
            d_feat,
            f,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    const ARCHITECTURES: [Architecture; 2] = [Architecture::RowLstm, Architecture::DiagonalBiLstm];

    /// `n` images of `shape`'s channels and levels (binary: on with probability 0.4).
    fn images(shape: Shape, n: usize, seed: u64) -> Vec<u8> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n * H * W * shape.channels)
            .map(|_| match shape.levels {
                2 => u8::from(rng.random_bool(0.4)),
                l => rng.random_range(0..l as u8),
            })
            .collect()
    }

    /// Odd sizes everywhere: 11 images (a full chunk and a partial one), 5 × 7 pixels, h = 3.
    const N: usize = 11;
    const H: usize = 5;
    const W: usize = 7;

    /// Binary grey (the MNIST case), 5-level grey (the softmax) and 5-level RGB (the masks).
    fn shapes(architecture: Architecture, hidden: usize, layers: usize) -> [Shape; 4] {
        [(1, 2, false), (1, 5, false), (3, 5, false), (3, 5, true)].map(
            |(channels, levels, skip)| Shape {
                architecture,
                hidden,
                layers,
                channels,
                levels,
                skip,
            },
        )
    }

    /// Random parameters of `shape`, flat, masked (for the fast passes), and the same
    /// unmasked as the reference (which must not read what the mask removed).
    fn random(shape: Shape, seed: u64) -> (Vec<f32>, reference::Params) {
        let flat = flatten(&reference::Params::random(shape, 0.5, seed));
        let p = unflatten(shape, &flat);
        let mut masked = flat;
        shape.apply_mask(&mut masked);
        (masked, p)
    }

    fn net(shape: Shape, params: &[f32], isa: Isa) -> Net<'_> {
        Net {
            shape,
            params,
            height: H,
            width: W,
            isa,
            pool_grid: 2,
        }
    }

    #[test]
    fn the_layout_is_the_references() {
        for arch in ARCHITECTURES {
            for shape in shapes(arch, 3, 2) {
                let p = reference::Params::random(shape, 0.5, 1);
                let flat = flatten(&p);
                assert_eq!(flat.len(), shape.param_len());
                let tensors = shape.tensors();
                assert_eq!(tensors.last().unwrap().1.end, flat.len());
                assert!(tensors.windows(2).all(|w| w[0].1.end == w[1].1.start));
                let back = flatten(&unflatten(shape, &flat));
                assert_eq!(back, flat);
            }
        }
    }

    /// The scatter form of mask A visits exactly the (pixel, tap) pairs the gather form reads,
    /// grey and colour, whole images and their first rows.
    #[test]
    fn on_readers_visits_what_input_taps_reads() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for channels in [1, 3] {
            for rows in [1, 3, H] {
                let x: Vec<u8> = (0..H * W * channels)
                    .map(|_| u8::from(rng.random_bool(0.4)))
                    .collect();
                let mut gathered: Vec<(usize, usize, usize)> = Vec::new();
                for r in 0..rows {
                    for c in 0..W {
                        gathered.extend(input_taps(&x, W, channels, r, c).map(|(t, _)| (r, c, t)));
                    }
                }
                let mut scattered = Vec::new();
                on_readers(&x, W, channels, rows, |r, c, t| scattered.push((r, c, t)));
                gathered.sort_unstable();
                scattered.sort_unstable();
                assert!(!gathered.is_empty());
                assert_eq!(scattered, gathered, "{channels} channels, {rows} rows");
            }
        }
    }

    /// The mask removes only what the reference never reads (and the comparisons below run the
    /// reference on the unmasked weights, so a mask that removed more would fail them).
    #[test]
    fn the_mask_removes_only_what_the_reference_never_reads() {
        let (height, width) = (2, 3);
        for arch in ARCHITECTURES {
            let shape = shapes(arch, 3, 1)[2];
            let p = reference::Params::random(shape, 0.5, 8);
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
            let x: Vec<u8> = (0..height * width * 3)
                .map(|_| rng.random_range(1..5))
                .collect();
            let (_, grad) = reference::gradient(&p, &x, height, width);
            let mut flat = Vec::new();
            grad.map(&mut |&g| flat.push(g));
            let mask = shape.mask();
            for (k, (&g, &m)) in flat.iter().zip(&mask).enumerate() {
                if m == 0.0 {
                    assert_eq!(g, 0.0, "{arch:?}: masked parameter {k} is read");
                }
            }
            let removed = mask.iter().filter(|&&m| m == 0.0).count();
            assert!(removed > 0 && removed < mask.len() / 2, "{removed} removed");
        }
    }

    /// The fast logits, sub-pixel terms and log-likelihoods equal the f64 reference's, on every
    /// instruction set.
    #[test]
    fn log_likelihoods_match_the_reference() {
        for arch in ARCHITECTURES {
            for layers in [1, 3] {
                for shape in shapes(arch, 3, layers) {
                    let (flat, p) = random(shape, 7 + layers as u64);
                    let x = images(shape, N, 3);
                    let (d, outs) = (H * W * shape.channels, shape.outputs());
                    for isa in Isa::for_tests() {
                        let mut ll = vec![0.0; N];
                        let mut terms = vec![0f32; N * d];
                        let mut logits = vec![0f32; N * H * W * outs];
                        let fast = net(shape, &flat, isa);
                        fast.log_likelihood(&x, &mut ll, Some(&mut terms));
                        fast.logits_up_to(&x, H, &mut logits);
                        for i in 0..N {
                            let image = &x[i * d..(i + 1) * d];
                            let want = reference::logits(&p, image, H, W);
                            let got = &logits[i * H * W * outs..(i + 1) * H * W * outs];
                            for (k, (&got, want)) in got.iter().zip(&want).enumerate() {
                                assert!(
                                    (f64::from(got) - want).abs() < 1e-4 * (1.0 + want.abs()),
                                    "{shape:?} {} image {i} logit {k}: {got} vs {want}",
                                    isa.name()
                                );
                            }
                            let want = reference::log_likelihood(&p, image, H, W);
                            assert!(
                                (ll[i] - want).abs() < 1e-4 * (1.0 + want.abs()),
                                "{shape:?}: {} vs {want}",
                                ll[i]
                            );
                            let summed: f64 = terms[i * d..(i + 1) * d]
                                .iter()
                                .map(|&t| f64::from(t))
                                .sum();
                            assert!((summed - ll[i]).abs() < 1e-9 * (1.0 + want.abs()));
                        }
                    }
                }
            }
        }
    }

    /// The embedding comes from the scoring pass (the same log-likelihoods beside it) and
    /// equals the reference's pooled features, on every instruction set, for grids that split
    /// the image evenly, unevenly and into more regions than it has rows (some left empty).
    #[test]
    fn embeddings_match_the_reference() {
        for arch in ARCHITECTURES {
            for shape in shapes(arch, 3, 2) {
                let (flat, p) = random(shape, 21);
                let x = images(shape, N, 5);
                for grid in [1, 2, 3, H + 1] {
                    let d = H * W * shape.channels;
                    let width = shape.embedding_width(grid);
                    assert_eq!(width, grid * grid * 6);
                    for isa in Isa::for_tests() {
                        let fast = Net {
                            pool_grid: grid,
                            ..net(shape, &flat, isa)
                        };
                        let (mut ll, mut plain) = (vec![0.0; N], vec![0.0; N]);
                        let mut emb = vec![f32::NAN; N * width];
                        fast.log_likelihood_and_embedding(&x, &mut ll, &mut emb);
                        fast.log_likelihood(&x, &mut plain, None);
                        assert_eq!(ll, plain, "{shape:?} {}", isa.name());
                        for i in 0..N {
                            let want = reference::embedding(&p, &x[i * d..(i + 1) * d], H, W, grid);
                            assert_eq!(want.len(), width);
                            for (k, (&got, want)) in emb[i * width..].iter().zip(&want).enumerate()
                            {
                                assert!(
                                    (f64::from(got) - want).abs() < 1e-4 * (1.0 + want.abs()),
                                    "{shape:?} {} grid {grid} image {i} value {k}: {got} vs {want}",
                                    isa.name()
                                );
                            }
                        }
                        assert!(emb.iter().any(|&e| e > 0.0), "some features are on");
                    }
                }
            }
        }
    }

    /// The reference's log p of each of the `n` images `x` (height × width), and the exact
    /// gradient of their Σ NLL, flat (`len` values).
    pub(super) fn reference_nll_gradient(
        p: &reference::Params,
        x: &[u8],
        n: usize,
        (height, width): (usize, usize),
        len: usize,
    ) -> (Vec<f64>, Vec<f64>) {
        let d = x.len() / n;
        let mut grad = vec![0f64; len];
        let lls = (0..n)
            .map(|i| {
                let (ll, g) = reference::gradient(p, &x[i * d..(i + 1) * d], height, width);
                let mut k = 0;
                g.map(&mut |v| {
                    grad[k] -= v;
                    k += 1;
                });
                ll
            })
            .collect();
        (lls, grad)
    }

    /// Asserts that `fast`'s Σ NLL over the images `x` and its gradient, every parameter, are
    /// the reference's (`want_ll` per image and `want`, from [`reference_nll_gradient`]),
    /// within 1e-4 of the NLL and of the largest gradient; `case` names the case on failure.
    pub(super) fn assert_gradient_is_the_references(
        fast: &Net<'_>,
        x: &[u8],
        (want_ll, want): (&[f64], &[f64]),
        case: &str,
    ) {
        let mut grad = vec![0f32; fast.params.len()];
        let nll = fast.gradient(x, &mut grad);
        let want_nll = -want_ll.iter().sum::<f64>();
        assert!(
            (nll - want_nll).abs() < 1e-4 * want_nll.abs(),
            "{case} {}: NLL {nll} vs {want_nll}",
            fast.isa.name()
        );
        let scale = want.iter().fold(0f64, |a, v| a.max(v.abs()));
        for (name, range, _) in fast.shape.tensors() {
            for k in range {
                assert!(
                    (f64::from(grad[k]) - want[k]).abs() < 1e-4 * scale,
                    "{case} {} {name} [{k}]: {} vs {}",
                    fast.isa.name(),
                    grad[k],
                    want[k]
                );
            }
        }
    }

    /// The fast gradient of Σ NLL equals minus the reference's exact gradient of Σ log p, every
    /// parameter, on every instruction set.
    #[test]
    fn gradients_match_the_reference() {
        for arch in ARCHITECTURES {
            for shape in shapes(arch, 3, 2) {
                let (flat, p) = random(shape, 5);
                let n = 10;
                let x = images(shape, n, 9);
                let (want_ll, want) = reference_nll_gradient(&p, &x, n, (H, W), flat.len());
                for isa in Isa::for_tests() {
                    assert_gradient_is_the_references(
                        &net(shape, &flat, isa),
                        &x,
                        (&want_ll, &want),
                        &format!("{shape:?}"),
                    );
                }
            }
        }
    }

    /// At the paper's width (h = 16: the gates fill whole vectors, the LSTM step runs cell by
    /// cell, every GEMM runs full register tiles) and over three layers (scoring alternates
    /// two feature maps and shares one set of activations) the fast log-likelihoods and
    /// gradient still equal the reference's.
    #[test]
    fn full_width_tiles_match_the_reference() {
        for arch in ARCHITECTURES {
            let shape = shapes(arch, 16, 3)[0];
            let (flat, p) = random(shape, 12);
            let n = 9;
            let x = images(shape, n, 4);
            let (want_ll, want) = reference_nll_gradient(&p, &x, n, (H, W), flat.len());
            for isa in Isa::for_tests() {
                let fast = net(shape, &flat, isa);
                let mut ll = vec![0.0; n];
                fast.log_likelihood(&x, &mut ll, None);
                for (got, want) in ll.iter().zip(&want_ll) {
                    assert!(
                        (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "{arch:?} {}: {got} vs {want}",
                        isa.name()
                    );
                }
                assert_gradient_is_the_references(
                    &fast,
                    &x,
                    (&want_ll, &want),
                    &format!("{arch:?}"),
                );
            }
        }
    }

    /// Sampling's partial passes give the full pass's logits on the rows they cover.
    #[test]
    fn partial_passes_agree_with_the_full_one() {
        for arch in ARCHITECTURES {
            for shape in shapes(arch, 4, 2) {
                let (flat, _) = random(shape, 2);
                let x = images(shape, N, 1);
                let per_image = H * W * shape.outputs();
                let mut full = vec![0f32; N * per_image];
                let fast = net(shape, &flat, Isa::detect());
                fast.logits_up_to(&x, H, &mut full);
                for rows in 1..H {
                    let mut part = vec![f32::NAN; N * per_image];
                    fast.logits_up_to(&x, rows, &mut part);
                    for i in 0..N {
                        let at = i * per_image;
                        let covered = at..at + rows * W * shape.outputs();
                        assert_eq!(
                            part[covered.clone()],
                            full[covered],
                            "{shape:?} rows {rows}"
                        );
                    }
                }
            }
        }
    }

    /// A gradient is bit-identical on 1 and 3 threads.
    #[test]
    fn the_gradient_does_not_depend_on_the_thread_count() {
        for arch in ARCHITECTURES {
            for shape in shapes(arch, 5, 2) {
                let (flat, _) = random(shape, 4);
                let x = images(shape, 3 * CHUNK + 1, 6);
                let run = |threads: usize| {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    pool.install(|| {
                        let mut grad = vec![0f32; flat.len()];
                        let nll = net(shape, &flat, Isa::detect()).gradient(&x, &mut grad);
                        (nll, grad)
                    })
                };
                assert_eq!(run(1), run(3), "{shape:?}");
            }
        }
    }
}
