//! PixelRNN (van den Oord, Kalchbrenner & Kavukcuoglu 2016): the naive f64 reference of its
//! forward pass, against which fast kernels are to be held.
//!
//! The network, for an H × W image x of C channels (sub-pixels ordered pixel by pixel, R then
//! G then B) taking L values, with `hidden` = h and 2h features:
//! - a 7×7 convolution with mask A (the pixel itself and everything after it in raster order
//!   excluded) from x, scaled to [0, 1], to 2h feature maps;
//! - `layers` residual recurrent layers: each turns its 2h input maps into h LSTM outputs,
//!   brings them back to 2h with a 1×1 convolution and adds them to the input;
//! - optionally (`skip`), learned skip connections: the output layers read the last layer's maps
//!   plus a 1×1 convolution of every layer's output maps, Σ_l S_l·x_l, so each layer also reaches
//!   the output directly;
//! - two ReLU + 1×1 layers, then per sub-pixel a sigmoid (L = 2: the logit of
//!   p(x = 1 | the past)) or a softmax over the L values.
//!
//! Colour, as in the paper: features and LSTM units are split into C groups (R, G, B; a unit's
//! group is ⌊k·C/n⌋ of n), and every connection within a pixel is masked — mask A at the input
//! (group g sees channels before g of the pixel), mask B after it (group g sees groups up to g).
//! The sub-pixel of channel c reads the features of groups up to c. Connections from other
//! pixels are not masked: those pixels are wholly in the past. One channel makes every mask but
//! mask A's centre tap a no-op.
//!
//! Row LSTM: row by row; the input-to-state is a 3×1 convolution along the row with mask B (the
//! pixel and its left neighbour, never its right), the state-to-state a 3×1 convolution over the
//! previous row's hidden state; gates o, f, i are sigmoids and g is tanh, c = f⊙c' + i⊙g,
//! h = o⊙tanh(c). Its receptive field is the triangle above a pixel (widened by mask A).
//!
//! Diagonal BiLSTM: the input map is skewed (row r shifted right by r), its input-to-state a 1×1
//! convolution (mask B), its state-to-state a 2×1 convolution down the previous column of the
//! skewed map (the same row and the row above), and the result unskewed: at (r, c) it has seen
//! the pixel to the left and the one above, recursively. A second LSTM runs on the mirrored map
//! (right to left); its output is shifted down one row before it is added, since at (r, c) it
//! has seen the rest of row r (so its input-to-state needs no mask). Its receptive field is the
//! whole past but one pixel: the last of the row above is held only by row r's features (mask A
//! reaches it from c ≥ W − 4), and the shifted right-to-left LSTM brings only row r − 1's, which
//! cannot hold it (the tests pin this down).
//!
//! The fast kernels beside it ([`super`]) are held to this reference on odd sizes.
//!
//! Every value is f64 (or a [`Var`], whose [`Tape`] differentiates the same code) and every sum
//! a plain loop over pixels, gates and taps: slow and obviously right, which is its job.

pub use crate::kernels::tape::{Scalar, Tape, Var};

/// The recurrent layer kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Row LSTM.
    RowLstm,
    /// Diagonal BiLSTM.
    DiagonalBiLstm,
}

/// Side of the mask-A input convolution.
pub const INPUT_KERNEL: usize = 7;

/// The colour group of unit `k` of `n` split into `channels` groups: 0 (R) for the first
/// third, and so on; always 0 for one channel.
pub fn group(k: usize, n: usize, channels: usize) -> usize {
    k * channels / n
}

/// Logits per sub-pixel: one (a sigmoid) for two levels, else one per level (a softmax).
pub fn logits_per_channel(levels: usize) -> usize {
    if levels == 2 { 1 } else { levels }
}

/// Whether a connection within one pixel, from a unit of group `from` to one of group `to`, is
/// kept: mask A (the input convolution, `from` a channel) keeps it when `from` < `to`, mask B
/// (every later layer) when `from` ≤ `to`.
pub fn same_pixel_allows(mask_a: bool, from: usize, to: usize) -> bool {
    if mask_a { from < to } else { from <= to }
}

/// One recurrent layer's parameters (row-major; `T` is f64, or a [`Var`] of a [`Tape`] to
/// differentiate). Weights a mask removes are never read.
#[derive(Debug, Clone)]
pub struct Layer<T = f64> {
    /// Input-to-state, per direction (one for Row LSTM, two for Diagonal BiLSTM):
    /// `[4h][2h][taps]`, gates in the order o, f, i, g (gate row q belongs to unit q mod h);
    /// taps dx = −1, 0 (Row LSTM) or one tap.
    pub input: Vec<Vec<T>>,
    /// Input-to-state biases, per direction: `[4h]`.
    pub input_bias: Vec<Vec<T>>,
    /// State-to-state, per direction: `[4h][h][taps]`; Row LSTM taps dx = −1, 0, +1 over the
    /// previous row, Diagonal taps (same row, row above) of the previous skewed column.
    pub state: Vec<Vec<T>>,
    /// The 1×1 convolution back to 2h features: `[2h][h]`.
    pub output: Vec<T>,
    /// Its bias: `[2h]`.
    pub output_bias: Vec<T>,
    /// The learned skip connection from the layer's output maps (its input plus the 1×1 above)
    /// to the output layers, a 1×1 convolution (mask B) `[2h][2h]`; empty without skip
    /// connections.
    pub skip: Vec<T>,
}

/// All the parameters.
#[derive(Debug, Clone)]
pub struct Params<T = f64> {
    /// The recurrent layers' kind.
    pub architecture: Architecture,
    /// LSTM units h per layer (and direction); the feature maps are 2h.
    pub hidden: usize,
    /// Image channels C (1 or 3), at most h.
    pub channels: usize,
    /// Values L a sub-pixel takes (2: binary).
    pub levels: usize,
    /// Mask-A convolution `[2h][C][7][7]` (taps after the centre are never read, the centre's
    /// only across colour groups).
    pub input: Vec<T>,
    /// Its bias `[2h]`.
    pub input_bias: Vec<T>,
    /// The recurrent layers.
    pub layers: Vec<Layer<T>>,
    /// First output 1×1 layer `[2h][2h]` and bias `[2h]`.
    pub head: Vec<T>,
    /// Its bias.
    pub head_bias: Vec<T>,
    /// The last 1×1 layer to the logits: `[C · logits_per_channel(L)][2h]`, channel-major.
    pub logit: Vec<T>,
    /// Its bias.
    pub logit_bias: Vec<T>,
}

impl<T> Params<T> {
    /// Every parameter mapped through `f`, in the order of the fields.
    pub fn map<U>(&self, f: &mut impl FnMut(&T) -> U) -> Params<U> {
        let mut all = |v: &[T]| v.iter().map(&mut *f).collect::<Vec<U>>();
        let input = all(&self.input);
        let input_bias = all(&self.input_bias);
        let layers = self
            .layers
            .iter()
            .map(|l| Layer {
                input: l.input.iter().map(|v| all(v)).collect(),
                input_bias: l.input_bias.iter().map(|v| all(v)).collect(),
                state: l.state.iter().map(|v| all(v)).collect(),
                output: all(&l.output),
                output_bias: all(&l.output_bias),
                skip: all(&l.skip),
            })
            .collect();
        let head = all(&self.head);
        let head_bias = all(&self.head_bias);
        let logit = all(&self.logit);
        let logit_bias = all(&self.logit_bias);
        Params {
            architecture: self.architecture,
            hidden: self.hidden,
            channels: self.channels,
            levels: self.levels,
            input,
            input_bias,
            layers,
            head,
            head_bias,
            logit,
            logit_bias,
        }
    }
}

impl Architecture {
    /// Input-to-state taps per direction: dx = −1, 0 (Row LSTM), or the pixel itself.
    pub fn input_taps(self) -> usize {
        match self {
            Architecture::RowLstm => 2,
            Architecture::DiagonalBiLstm => 1,
        }
    }

    /// State-to-state taps: dx = −1, 0, +1 over the row above (Row LSTM), or the same row and
    /// the row above in the previous skewed column.
    pub fn state_taps(self) -> usize {
        match self {
            Architecture::RowLstm => 3,
            Architecture::DiagonalBiLstm => 2,
        }
    }

    /// LSTM directions per layer.
    pub fn directions(self) -> usize {
        match self {
            Architecture::RowLstm => 1,
            Architecture::DiagonalBiLstm => 2,
        }
    }
}

impl<T> Params<T> {
    /// Logits per pixel: C · [`logits_per_channel`].
    pub fn outputs(&self) -> usize {
        self.channels * logits_per_channel(self.levels)
    }

    /// The network's size.
    pub fn shape(&self) -> Shape {
        Shape {
            architecture: self.architecture,
            hidden: self.hidden,
            layers: self.layers.len(),
            channels: self.channels,
            levels: self.levels,
            skip: self.layers.first().is_some_and(|l| !l.skip.is_empty()),
        }
    }
}

/// A network's size: what fixes its parameter layout (here and in the fast kernels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// The recurrent layers' kind.
    pub architecture: Architecture,
    /// LSTM units h per layer and direction; feature maps are 2h.
    pub hidden: usize,
    /// Recurrent layers.
    pub layers: usize,
    /// Image channels C (1 to h).
    pub channels: usize,
    /// Values L a sub-pixel takes (2 to 256; 2 is binary).
    pub levels: usize,
    /// Learned skip connections from every layer to the output layers.
    pub skip: bool,
}

impl Params {
    /// Parameters drawn uniformly from ±`scale` (seeded), for tests.
    pub fn random(shape: Shape, scale: f64, seed: u64) -> Self {
        let Shape {
            architecture,
            hidden,
            layers,
            channels,
            levels,
            skip,
        } = shape;
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut draw =
            |n: usize| -> Vec<f64> { (0..n).map(|_| rng.random_range(-scale..scale)).collect() };
        let f = 2 * hidden;
        let k = INPUT_KERNEL;
        let (it, st, dirs) = (
            architecture.input_taps(),
            architecture.state_taps(),
            architecture.directions(),
        );
        let outputs = channels * logits_per_channel(levels);
        Params {
            architecture,
            hidden,
            channels,
            levels,
            input: draw(f * channels * k * k),
            input_bias: draw(f),
            layers: (0..layers)
                .map(|_| Layer {
                    input: (0..dirs).map(|_| draw(4 * hidden * f * it)).collect(),
                    input_bias: (0..dirs).map(|_| draw(4 * hidden)).collect(),
                    state: (0..dirs).map(|_| draw(4 * hidden * hidden * st)).collect(),
                    output: draw(f * hidden),
                    output_bias: draw(f),
                    skip: draw(if skip { f * f } else { 0 }),
                })
                .collect(),
            head: draw(f * f),
            head_bias: draw(f),
            logit: draw(outputs * f),
            logit_bias: draw(outputs),
        }
    }
}

/// Feature maps: `[rows][cols][channels]`, flattened.
#[derive(Debug, Clone)]
struct Maps<T> {
    rows: usize,
    cols: usize,
    channels: usize,
    v: Vec<T>,
}

impl<T: Scalar> Maps<T> {
    fn zeros(rows: usize, cols: usize, channels: usize) -> Self {
        Self {
            rows,
            cols,
            channels,
            v: vec![T::from(0.0); rows * cols * channels],
        }
    }

    fn at(&self, r: usize, c: usize) -> &[T] {
        let i = (r * self.cols + c) * self.channels;
        &self.v[i..i + self.channels]
    }

    fn at_mut(&mut self, r: usize, c: usize) -> &mut [T] {
        let i = (r * self.cols + c) * self.channels;
        &mut self.v[i..i + self.channels]
    }
}

/// One LSTM step: gate pre-activations `z` ([4h]: o, f, i, g) and the previous cell state give
/// the new cell state and hidden output.
fn lstm_step<T: Scalar>(z: &[T], c_prev: &[T], c: &mut [T], h: &mut [T]) {
    let n = h.len();
    for u in 0..n {
        let (o, f, i, g) = (
            z[u].sigmoid(),
            z[n + u].sigmoid(),
            z[2 * n + u].sigmoid(),
            z[3 * n + u].tanh(),
        );
        c[u] = f * c_prev[u] + i * g;
        h[u] = o * c[u].tanh();
    }
}

/// Every pixel's logits, row-major, `p.outputs()` per pixel: channel by channel, the logit of
/// p(x = 1 | the past) (two levels) or the L logits of its softmax. `x`: `height` × `width` ×
/// C bytes below L.
pub fn logits<T: Scalar>(p: &Params<T>, x: &[u8], height: usize, width: usize) -> Vec<T> {
    let features = features(p, x, height, width);
    let (f, ch) = (2 * p.hidden, p.channels);
    let per = logits_per_channel(p.levels);
    let mut out = Vec::with_capacity(height * width * p.outputs());
    for r in 0..height {
        for c in 0..width {
            let y: Vec<T> = features.at(r, c).iter().map(|v| v.relu()).collect();
            let z: Vec<T> = (0..f)
                .map(|j| {
                    let to = group(j, f, ch);
                    let terms = (0..f)
                        .filter(|&k| same_pixel_allows(false, group(k, f, ch), to))
                        .map(|k| p.head[j * f + k] * y[k]);
                    (p.head_bias[j] + sum(terms)).relu()
                })
                .collect();
            for o in 0..p.outputs() {
                let channel = o / per;
                let terms = (0..f)
                    .filter(|&k| same_pixel_allows(false, group(k, f, ch), channel))
                    .map(|k| p.logit[o * f + k] * z[k]);
                out.push(p.logit_bias[o] + sum(terms));
            }
        }
    }
    out
}

/// The image's embedding: for each of `grid`² regions (row-major; region of (r, c) is
/// (⌊r·grid/H⌋, ⌊c·grid/W⌋)), the mean over its pixels of the ReLU of the final 2h features.
pub fn embedding(p: &Params, x: &[u8], height: usize, width: usize, grid: usize) -> Vec<f64> {
    let features = features(p, x, height, width);
    let f = 2 * p.hidden;
    let mut sums = vec![0.0; grid * grid * f];
    let mut counts = vec![0usize; grid * grid];
    for r in 0..height {
        for c in 0..width {
            let region = (r * grid / height) * grid + c * grid / width;
            counts[region] += 1;
            for (k, v) in features.at(r, c).iter().enumerate() {
                sums[region * f + k] += v.max(0.0);
            }
        }
    }
    for (region, &n) in counts.iter().enumerate() {
        if n > 0 {
            sums[region * f..(region + 1) * f]
                .iter_mut()
                .for_each(|s| *s /= n as f64);
        }
    }
    sums
}

/// The 2h feature maps the output layers read (which see one pixel's features each, so these
/// hold the whole receptive field): the last layer's output maps, plus the skip connections'
/// sum where there are some.
fn features<T: Scalar>(p: &Params<T>, x: &[u8], height: usize, width: usize) -> Maps<T> {
    assert_eq!(x.len(), height * width * p.channels);
    let mut features = mask_a(p, x, height, width);
    let (f, n, ch) = (2 * p.hidden, p.hidden, p.channels);
    let mut skipped = Maps::zeros(height, width, f);
    for layer in &p.layers {
        let lstm = match p.architecture {
            Architecture::RowLstm => row_lstm(p, layer, &features),
            Architecture::DiagonalBiLstm => diagonal_bilstm(p, layer, &features),
        };
        // Back to 2h features with a 1×1 convolution (mask B), added to the layer's input.
        for r in 0..height {
            for c in 0..width {
                let h = lstm.at(r, c).to_vec();
                let out = features.at_mut(r, c);
                for (j, o) in out.iter_mut().enumerate() {
                    let to = group(j, f, ch);
                    let terms = (0..n)
                        .filter(|&u| same_pixel_allows(false, group(u, n, ch), to))
                        .map(|u| layer.output[j * n + u] * h[u]);
                    *o += layer.output_bias[j] + sum(terms);
                }
            }
        }
        if layer.skip.is_empty() {
            continue;
        }
        for r in 0..height {
            for c in 0..width {
                let x = features.at(r, c);
                for (j, s) in skipped.at_mut(r, c).iter_mut().enumerate() {
                    let to = group(j, f, ch);
                    let terms = (0..f)
                        .filter(|&k| same_pixel_allows(false, group(k, f, ch), to))
                        .map(|k| layer.skip[j * f + k] * x[k]);
                    *s += sum(terms);
                }
            }
        }
    }
    if p.shape().skip {
        for (v, s) in features.v.iter_mut().zip(&skipped.v) {
            *v += *s;
        }
    }
    features
}

/// log p(x) in nats: Σ over sub-pixels of log σ(±logit) (two levels) or the log-softmax at the
/// sub-pixel's value.
pub fn log_likelihood<T: Scalar>(p: &Params<T>, x: &[u8], height: usize, width: usize) -> T {
    let z = logits(p, x, height, width);
    let per = logits_per_channel(p.levels);
    sum(x.iter().enumerate().map(|(s, &v)| {
        let z = &z[s * per..(s + 1) * per];
        if p.levels == 2 {
            if v != 0 { z[0] } else { -z[0] }.log_sigmoid()
        } else {
            // The largest logit's value taken out is a constant: the gradient is unchanged.
            let top = z
                .iter()
                .map(|v| v.value())
                .fold(f64::NEG_INFINITY, f64::max);
            let shifted = |v: T| v - T::from(top);
            shifted(z[usize::from(v)]) - sum(z.iter().map(|&v| shifted(v).exp())).ln()
        }
    }))
}

/// log p(x) and its gradient with respect to every parameter (laid out as `p`), by running the
/// same reference on a [`Tape`]: the gradient a fast backward pass is held to. Weights a mask
/// removes get zero.
pub fn gradient(p: &Params, x: &[u8], height: usize, width: usize) -> (f64, Params) {
    let tape = Tape::new();
    let vars = p.map(&mut |&v| tape.var(v));
    let ll = log_likelihood(&vars, x, height, width);
    let grad = tape.gradient(ll);
    (
        ll.value(),
        vars.map(&mut |v| v.index().map_or(0.0, |i| grad[i])),
    )
}

/// Σ of `terms`, in order, from zero.
fn sum<T: Scalar>(terms: impl Iterator<Item = T>) -> T {
    terms.fold(T::from(0.0), |a, b| a + b)
}

/// The mask-A 7×7 convolution over x / (L − 1): at (r, c) every channel of the pixels strictly
/// before it in raster order (rows above, and the same row to the left), and, for a feature of
/// colour group g, the channels before g of the pixel itself.
fn mask_a<T: Scalar>(p: &Params<T>, x: &[u8], height: usize, width: usize) -> Maps<T> {
    let (f, ch) = (2 * p.hidden, p.channels);
    let k = INPUT_KERNEL as isize;
    let half = k / 2;
    let taps = (k * k) as usize;
    let scale = 1.0 / (p.levels - 1) as f64;
    let mut out = Maps::zeros(height, width, f);
    for r in 0..height {
        for c in 0..width {
            let cell = out.at_mut(r, c);
            cell.copy_from_slice(&p.input_bias);
            for dy in -half..=0 {
                for dx in -half..=half {
                    if dy == 0 && dx > 0 {
                        continue;
                    }
                    let (rr, cc) = (r as isize + dy, c as isize + dx);
                    if rr < 0 || cc < 0 || cc >= width as isize {
                        continue;
                    }
                    let tap = ((dy + half) * k + (dx + half)) as usize;
                    let pixel = (rr as usize * width + cc as usize) * ch;
                    for from in 0..ch {
                        let v = T::from(f64::from(x[pixel + from]) * scale);
                        for (j, out) in cell.iter_mut().enumerate() {
                            let centre = dy == 0 && dx == 0;
                            if centre && !same_pixel_allows(true, from, group(j, f, ch)) {
                                continue;
                            }
                            *out += p.input[(j * ch + from) * taps + tap] * v;
                        }
                    }
                }
            }
        }
    }
    out
}

/// Row LSTM over `features` (2h maps): h outputs per pixel.
fn row_lstm<T: Scalar>(p: &Params<T>, layer: &Layer<T>, features: &Maps<T>) -> Maps<T> {
    let (height, width, f, n) = (features.rows, features.cols, features.channels, p.hidden);
    let ch = p.channels;
    let (w_in, b_in, w_state) = (&layer.input[0], &layer.input_bias[0], &layer.state[0]);
    let mut h_out = Maps::zeros(height, width, n);
    let mut cell = Maps::zeros(height, width, n);
    let zeros = vec![T::from(0.0); n];
    for r in 0..height {
        for c in 0..width {
            let mut z = b_in.clone();
            // Input-to-state, mask B: the pixel's own features and its left neighbour's.
            for (t, dx) in [-1isize, 0].into_iter().enumerate() {
                let cc = c as isize + dx;
                if cc < 0 {
                    continue;
                }
                let x = features.at(r, cc as usize);
                for (g, zg) in z.iter_mut().enumerate() {
                    let to = group(g % n, n, ch);
                    let terms = (0..f)
                        .filter(|&k| dx < 0 || same_pixel_allows(false, group(k, f, ch), to))
                        .map(|k| w_in[(g * f + k) * 2 + t] * x[k]);
                    *zg += sum(terms);
                }
            }
            // State-to-state: the previous row's hidden state at c − 1, c, c + 1.
            if r > 0 {
                for (t, dx) in [-1isize, 0, 1].into_iter().enumerate() {
                    let cc = c as isize + dx;
                    if cc < 0 || cc >= width as isize {
                        continue;
                    }
                    let h = h_out.at(r - 1, cc as usize).to_vec();
                    for (g, zg) in z.iter_mut().enumerate() {
                        *zg += sum((0..n).map(|u| w_state[(g * n + u) * 3 + t] * h[u]));
                    }
                }
            }
            let c_prev = if r > 0 {
                cell.at(r - 1, c).to_vec()
            } else {
                zeros.clone()
            };
            let (mut cn, mut hn) = (vec![T::from(0.0); n], vec![T::from(0.0); n]);
            lstm_step(&z, &c_prev, &mut cn, &mut hn);
            cell.at_mut(r, c).copy_from_slice(&cn);
            h_out.at_mut(r, c).copy_from_slice(&hn);
        }
    }
    h_out
}

/// Diagonal BiLSTM over `features`: the left-to-right LSTM plus the right-to-left one shifted
/// down a row.
fn diagonal_bilstm<T: Scalar>(p: &Params<T>, layer: &Layer<T>, features: &Maps<T>) -> Maps<T> {
    let (height, width) = (features.rows, features.cols);
    let forward = diagonal_lstm(p, layer, 0, features);
    let mirrored = mirror(features);
    let backward = mirror(&diagonal_lstm(p, layer, 1, &mirrored));
    let mut out = forward;
    for r in 1..height {
        for c in 0..width {
            let b = backward.at(r - 1, c).to_vec();
            out.at_mut(r, c)
                .iter_mut()
                .zip(b)
                .for_each(|(o, v)| *o += v);
        }
    }
    out
}

/// The maps flipped left to right.
fn mirror<T: Scalar>(m: &Maps<T>) -> Maps<T> {
    let mut out = Maps::zeros(m.rows, m.cols, m.channels);
    for r in 0..m.rows {
        for c in 0..m.cols {
            out.at_mut(r, m.cols - 1 - c).copy_from_slice(m.at(r, c));
        }
    }
    out
}

/// One diagonal LSTM (direction `d`'s weights) over `features`, computed on the skewed map
/// (pixel (r, c) at column r + c) column by column, and returned unskewed.
fn diagonal_lstm<T: Scalar>(
    p: &Params<T>,
    layer: &Layer<T>,
    d: usize,
    features: &Maps<T>,
) -> Maps<T> {
    let (height, width, f, n) = (features.rows, features.cols, features.channels, p.hidden);
    let ch = p.channels;
    let (w_in, b_in, w_state) = (&layer.input[d], &layer.input_bias[d], &layer.state[d]);
    let skewed_cols = width + height - 1;
    // Hidden and cell state on the skewed grid; positions outside the image stay zero.
    let mut h = Maps::zeros(height, skewed_cols, n);
    let mut cell = Maps::zeros(height, skewed_cols, n);
    for j in 0..skewed_cols {
        for r in 0..height {
            let inside = j >= r && j - r < width;
            let mut z = b_in.clone();
            if inside {
                let x = features.at(r, j - r);
                for (g, zg) in z.iter_mut().enumerate() {
                    // Mask B for the left-to-right LSTM; the mirrored one's output reaches
                    // only the next row.
                    let to = group(g % n, n, ch);
                    let terms = (0..f)
                        .filter(|&k| d == 1 || same_pixel_allows(false, group(k, f, ch), to))
                        .map(|k| w_in[g * f + k] * x[k]);
                    *zg += sum(terms);
                }
            } else {
                continue;
            }
            let (mut c_prev, mut s_same, mut s_above) = (
                vec![T::from(0.0); n],
                vec![T::from(0.0); n],
                vec![T::from(0.0); n],
            );
            if j > 0 {
                s_same = h.at(r, j - 1).to_vec();
                c_prev = cell.at(r, j - 1).to_vec();
                if r > 0 {
                    s_above = h.at(r - 1, j - 1).to_vec();
                }
            }
            for (g, zg) in z.iter_mut().enumerate() {
                *zg += sum((0..n).map(|u| {
                    w_state[(g * n + u) * 2] * s_same[u] + w_state[(g * n + u) * 2 + 1] * s_above[u]
                }));
            }
            let (mut cn, mut hn) = (vec![T::from(0.0); n], vec![T::from(0.0); n]);
            lstm_step(&z, &c_prev, &mut cn, &mut hn);
            cell.at_mut(r, j).copy_from_slice(&cn);
            h.at_mut(r, j).copy_from_slice(&hn);
        }
    }
    let mut out = Maps::zeros(height, width, n);
    for r in 0..height {
        for c in 0..width {
            out.at_mut(r, c).copy_from_slice(h.at(r, r + c));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::testing::all_images;
    use rand::{Rng, SeedableRng};

    const ARCHITECTURES: [Architecture; 2] = [Architecture::RowLstm, Architecture::DiagonalBiLstm];

    /// A network's shape with `channels` and `levels`.
    fn shape(
        architecture: Architecture,
        hidden: usize,
        layers: usize,
        channels: usize,
        levels: usize,
    ) -> Shape {
        Shape {
            architecture,
            hidden,
            layers,
            channels,
            levels,
            skip: false,
        }
    }

    /// The same shape with skip connections.
    fn with_skip(shape: Shape) -> Shape {
        Shape {
            skip: true,
            ..shape
        }
    }

    /// A binary one-channel network's shape.
    fn grey(architecture: Architecture, hidden: usize, layers: usize) -> Shape {
        shape(architecture, hidden, layers, 1, 2)
    }

    /// Which earlier pixels a conditional may see: the Diagonal BiLSTM all of them; the Row
    /// LSTM the rows above within its widening triangle and the same row to the left, as far
    /// as mask A (3 pixels) and one more per layer reach.
    fn may_see(arch: Architecture, layers: usize, p: (usize, usize), q: (usize, usize)) -> bool {
        let before = q.0 < p.0 || (q.0 == p.0 && q.1 < p.1);
        if !before {
            return false;
        }
        match arch {
            Architecture::DiagonalBiLstm => true,
            Architecture::RowLstm => {
                let (dr, dc) = (p.0 - q.0, q.1 as isize - p.1 as isize);
                let reach = 3 + layers as isize;
                if dr == 0 {
                    -dc <= reach
                } else {
                    // Rows above: mask A reaches ±3 over 3 rows; each layer's state-to-state
                    // widens the triangle by one column per row, its mask B one to the left.
                    dc.abs() <= 3 + layers as isize * (dr as isize + 1)
                }
            }
        }
    }

    /// The one earlier pixel a Diagonal BiLSTM cannot see from (r, c): the last of the row
    /// above, which only row r's features hold (mask A reaches it from c ≥ W − 4), while the
    /// right-to-left LSTM, shifted down a row, brings only row r − 1's features.
    fn is_blind_spot(width: usize, p: (usize, usize), q: (usize, usize)) -> bool {
        q == (p.0.wrapping_sub(1), width - 1) && p.1 + INPUT_KERNEL / 2 < width - 1
    }

    /// Every conditional is unchanged when any pixel at or after it changes, and changes for
    /// some earlier pixel; no earlier pixel outside the receptive field changes it. Exhaustive
    /// over the pixels of a 5×6 image, from several random images, both architectures, 1 to 3
    /// layers, with and without skip connections.
    #[test]
    fn conditionals_see_only_the_past_and_the_diagonal_sees_all_of_it() {
        let (height, width) = (5, 6);
        let d = height * width;
        for arch in ARCHITECTURES {
            for (layers, skip) in [(1, false), (2, false), (2, true), (3, false), (3, true)] {
                let shape = Shape {
                    skip,
                    ..grey(arch, 3, layers)
                };
                let p = Params::random(shape, 0.7, 11 + layers as u64);
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(layers as u64);
                // seen[i][q]: flipping pixel q moved the features conditional i reads, from some
                // base image (the output layers see one pixel's features, so these carry the
                // receptive field; a logit behind a ReLU that is off may not move).
                let mut seen = vec![vec![false; d]; d];
                for _ in 0..4 {
                    let x: Vec<u8> = (0..d).map(|_| u8::from(rng.random_bool(0.5))).collect();
                    let (base, base_features) = (
                        logits(&p, &x, height, width),
                        features(&p, &x, height, width),
                    );
                    for q in 0..d {
                        let mut y = x.clone();
                        y[q] ^= 1;
                        let (moved, moved_features) = (
                            logits(&p, &y, height, width),
                            features(&p, &y, height, width),
                        );
                        for i in 0..d {
                            let at = (i / width, i % width);
                            let changed =
                                moved_features.at(at.0, at.1) != base_features.at(at.0, at.1);
                            // A logit moves only where the features it reads do.
                            assert!(changed || moved[i] == base[i], "{arch:?} {at:?}");
                            seen[i][q] |= changed;
                        }
                    }
                }
                for i in 0..d {
                    let pi = (i / width, i % width);
                    for (q, _) in seen[i].iter().enumerate().filter(|(_, s)| **s) {
                        let pq = (q / width, q % width);
                        assert!(
                            may_see(arch, layers, pi, pq),
                            "{arch:?} L={layers}: pixel {pi:?} sees {pq:?}"
                        );
                    }
                    if i > 0 {
                        assert!(
                            seen[i][..i].iter().any(|&s| s),
                            "{arch:?} L={layers}: pixel {pi:?} sees no earlier pixel"
                        );
                    }
                    if arch == Architecture::DiagonalBiLstm {
                        let missed: Vec<(usize, usize)> = (0..i)
                            .filter(|&q| !seen[i][q])
                            .map(|q| (q / width, q % width))
                            .collect();
                        assert!(
                            missed.iter().all(|&q| is_blind_spot(width, pi, q)),
                            "{arch:?} L={layers}: pixel {pi:?} misses {missed:?} of its past"
                        );
                    }
                }
            }
        }
    }

    /// A Row LSTM does not see the whole past: far to the left in its own row, and outside its
    /// triangle above, pixels are invisible (which the Diagonal BiLSTM sees, above).
    #[test]
    fn the_row_lstm_misses_what_lies_outside_its_triangle() {
        let (height, width) = (3, 12);
        let p = Params::random(grey(Architecture::RowLstm, 3, 1), 0.7, 5);
        let x = vec![0u8; height * width];
        let base = logits(&p, &x, height, width);
        let mut y = x.clone();
        y[0] = 1; // (0, 0)
        let moved = logits(&p, &y, height, width);
        // (0, 11) is 11 to the right of (0, 0) in its row: beyond mask A's 3 and one layer's 1.
        assert_eq!(moved[11], base[11]);
        assert_ne!(moved[1], base[1]);
    }

    /// The reference gradient agrees with central differences for every 5th parameter (every
    /// tensor included), both architectures, two layers, odd sizes, grey and colour, with and
    /// without skip connections.
    #[test]
    fn the_gradient_matches_finite_differences() {
        // Binary grey, and 3-level colour (every mask and the softmax).
        let cases = ARCHITECTURES.into_iter().flat_map(|arch| {
            [
                (grey(arch, 3, 2), 3, 5),
                (shape(arch, 3, 2, 3, 3), 2, 3),
                (with_skip(grey(arch, 3, 2)), 3, 5),
                (with_skip(shape(arch, 3, 2, 3, 3)), 2, 3),
            ]
        });
        for (shape, height, width) in cases {
            let arch = shape.architecture;
            let p = Params::random(shape, 0.6, 21);
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
            let x: Vec<u8> = (0..height * width * shape.channels)
                .map(|_| rng.random_range(0..shape.levels as u8))
                .collect();
            let (ll, grad) = gradient(&p, &x, height, width);
            assert_eq!(ll, log_likelihood(&p, &x, height, width));
            let mut flat = Vec::new();
            grad.map(&mut |&g| flat.push(g));
            let shifted = |k: usize, d: f64| {
                let mut i = 0;
                let q = p.map(&mut |&v| {
                    i += 1;
                    if i - 1 == k { v + d } else { v }
                });
                log_likelihood(&q, &x, height, width)
            };
            for k in (0..flat.len()).step_by(5) {
                let numeric = (shifted(k, 1e-6) - shifted(k, -1e-6)) / 2e-6;
                assert!(
                    (numeric - flat[k]).abs() < 1e-6 * (1.0 + numeric.abs()),
                    "{arch:?} parameter {k}: {numeric} vs {}",
                    flat[k]
                );
            }
        }
    }

    /// Σ over every image of p(x) is 1: binary 3×4 grey (2^12 images), binary 2×2 colour
    /// (2^12), 3-level 2×2 grey (3^4) and 3-level 1×2 colour (3^6, the softmax through every
    /// mask); both architectures; the grey and the colour binary ones also with skip
    /// connections.
    #[test]
    fn probabilities_sum_to_one_over_every_image() {
        for arch in ARCHITECTURES {
            let cases = [
                (grey(arch, 2, 2), 3, 4),
                (shape(arch, 3, 2, 3, 2), 2, 2),
                (shape(arch, 2, 2, 1, 3), 2, 2),
                (shape(arch, 3, 2, 3, 3), 1, 2),
                (with_skip(grey(arch, 2, 2)), 3, 4),
                (with_skip(shape(arch, 3, 2, 3, 2)), 2, 2),
            ];
            for (shape, height, width) in cases {
                let p = Params::random(shape, 0.8, 3);
                let d = height * width * shape.channels;
                let total: f64 = all_images(d, shape.levels as u16)
                    .iter()
                    .map(|x| log_likelihood(&p, x, height, width).exp())
                    .sum();
                assert!((total - 1.0).abs() < 1e-9, "{shape:?}: Σ p(x) = {total}");
            }
        }
    }

    /// On a colour image, each sub-pixel's logits see only sub-pixels before it (pixel by
    /// pixel, R, G, B): R of a pixel none of the pixel, G only its R, B its R and G; and G and
    /// B do see them. Exhaustive over every sub-pixel of a 3×4 RGB image of 4 levels, both
    /// architectures, 1 and 2 layers.
    #[test]
    fn colour_sub_pixels_see_only_earlier_sub_pixels() {
        let (height, width, ch) = (3, 4, 3);
        let d = height * width * ch;
        for arch in ARCHITECTURES {
            for (layers, skip) in [(1, false), (2, false), (2, true)] {
                let shape = Shape {
                    skip,
                    ..shape(arch, 4, layers, ch, 4)
                };
                let p = Params::random(shape, 0.7, 30 + layers as u64);
                let f = 2 * p.hidden;
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(layers as u64);
                // seen[s][q]: changing sub-pixel q moved the features sub-pixel s reads (its
                // pixel's groups up to its channel).
                let mut seen = vec![vec![false; d]; d];
                for _ in 0..3 {
                    let x: Vec<u8> = (0..d).map(|_| rng.random_range(0..4)).collect();
                    let (base, base_features) = (
                        logits(&p, &x, height, width),
                        features(&p, &x, height, width),
                    );
                    for q in 0..d {
                        let mut y = x.clone();
                        y[q] = (y[q] + 1 + rng.random_range(0..3)) % 4;
                        let (moved, moved_features) = (
                            logits(&p, &y, height, width),
                            features(&p, &y, height, width),
                        );
                        for s in 0..d {
                            let (pixel, channel) = (s / ch, s % ch);
                            let (r, c) = (pixel / width, pixel % width);
                            let read = |m: &Maps<f64>| -> Vec<f64> {
                                m.at(r, c)
                                    .iter()
                                    .enumerate()
                                    .filter(|(k, _)| group(*k, f, ch) <= channel)
                                    .map(|(_, v)| *v)
                                    .collect()
                            };
                            let changed = read(&moved_features) != read(&base_features);
                            let z = |l: &[f64]| l[s * 4..(s + 1) * 4].to_vec();
                            assert!(
                                changed || z(&moved) == z(&base),
                                "{arch:?}: sub-pixel {s}'s logits moved without its features"
                            );
                            seen[s][q] |= changed;
                        }
                    }
                }
                for (s, sees) in seen.iter().enumerate() {
                    if let Some(q) = (s..d).find(|&q| sees[q]) {
                        panic!("{arch:?} L={layers} skip={skip}: {s} sees {q}");
                    }
                    if let Some(q) = (s - s % ch..s).find(|&q| !sees[q]) {
                        panic!("{arch:?} L={layers} skip={skip}: {s} misses {q} of its own pixel");
                    }
                }
            }
        }
    }
}
