//! RNADE's forward (log-density) and backward (gradient) passes over tiles of images, and the
//! naive f64 reference they are tested against.
//!
//! RNADE (Uria, Murray & Larochelle 2013) is NADE with real-valued inputs and a mixture of K
//! Gaussians as each conditional: a_d = c + Σ_{j<d} W_j (y_j − ½), h_d = max(a_d, 0) (rectified linear
//! units, as in the paper's experiments: an intensity that copies an earlier one — G = R — is
//! then exactly representable, which a sigmoid layer only approximates), and the 3K heads
//! z = b_d + V_d h_d give the mixture logits, the means and the log standard deviations.
//!
//! Layout (row-major f32; the hidden layer padded to `hp`, a multiple of [`LANES`], with the
//! padding of W, V and c held at zero): `w[d·hp..]` is W's column for ordering position d,
//! `v[(d·3K + j)·hp..]` is V's row for head j of position d (j < K: logits, K ≤ j < 2K: means,
//! 2K ≤ j: log-scales), `b[d·3K + j]` its bias, `c[..hp]` the hidden bias. Inputs are real values
//! y (dequantized intensities), already permuted into ordering space.
//!
//! Unlike binary NADE every input is non-zero, so a and h change at every position; what the
//! kernels share with NADE's is the rest of the discipline: a tile of [`TILE`] images reuses each
//! position's 3K weight rows while they are in L1; the backward pass needs no stored forward
//! state (a is walked back from its full sum, and ∂a is accumulated so that W's gradient is one
//! multiply-add per hidden unit); the hidden layer is processed as vectors with the target's dot
//! product, and the mixture's exponentials are the vectorized ones of [`math`](super::math).

use super::dispatch;
use super::math::{LANES, Target, exp, fmadd};

/// Images processed together, sharing each position's weight rows while they are in cache.
pub const TILE: usize = 4;

/// Log standard deviations are clamped to this range (on the [0, 1] intensity scale: from
/// 1e-4, a fortieth of an 8-bit level, to e⁴): a component cannot collapse to a spike and
/// overflow the density, and the gradient through a clamped value is zero.
pub const LOG_SCALE_RANGE: (f32, f32) = (-9.2, 4.0);

/// What an input is centred by before it feeds the hidden layer: a_d = c + Σ_{j<d} W_j (y_j −
/// ½). Uncentred intensities would add a position-dependent offset Σ_{j<d} W_j/2 to every
/// pre-activation, which slows training markedly (measured on the brick textures).
pub const INPUT_CENTRE: f32 = 0.5;

/// The most mixture components a kernel call accepts.
pub const MAX_COMPONENTS: usize = 64;

/// ½·log 2π.
const HALF_LN_2PI: f32 = 0.918_938_5;

/// RNADE parameters in kernel layout (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct Params<'a> {
    /// Ordering positions D.
    pub dims: usize,
    /// Hidden units H.
    pub hidden: usize,
    /// Padded hidden width: H rounded up to a multiple of [`LANES`].
    pub hp: usize,
    /// Mixture components K.
    pub components: usize,
    /// D × hp input weights.
    pub w: &'a [f32],
    /// D × 3K × hp output weights.
    pub v: &'a [f32],
    /// D × 3K output biases.
    pub b: &'a [f32],
    /// hp hidden biases.
    pub c: &'a [f32],
}

/// Gradients in the same layout as [`Params`].
#[derive(Debug)]
pub struct Grads<'a> {
    /// ∂/∂w.
    pub w: &'a mut [f32],
    /// ∂/∂v.
    pub v: &'a mut [f32],
    /// ∂/∂b.
    pub b: &'a mut [f32],
    /// ∂/∂c.
    pub c: &'a mut [f32],
}

impl Params<'_> {
    /// Heads per position, 3K.
    pub fn heads(&self) -> usize {
        3 * self.components
    }

    fn check(&self, values: &[f32]) {
        assert_eq!(self.hp % LANES, 0, "hidden width is padded to LANES");
        assert!(self.hidden <= self.hp && self.hp - self.hidden < LANES);
        assert!((1..=MAX_COMPONENTS).contains(&self.components));
        assert_eq!(self.w.len(), self.dims * self.hp);
        assert_eq!(self.v.len(), self.dims * self.heads() * self.hp);
        assert_eq!(self.b.len(), self.dims * self.heads());
        assert_eq!(self.c.len(), self.hp);
        assert_eq!(values.len() % self.dims.max(1), 0, "whole images");
    }
}

dispatch! {
    /// log p(y) (continuous, nats) of each image (rows of `values`, D each, ordering space)
    /// into `out`, writing log p(y_d | y_<d) for every position into `terms` (images × D) when
    /// given.
    pub fn log_density(p: &Params<'_>, values: &[f32], terms: Option<&mut [f32]>, out: &mut [f64]) -> ()
        => log_density_body
}

dispatch! {
    /// log p(y) of each image (rows of `values`, ordering space) into `out`, and from the same
    /// pass its hidden layer given the whole image, h(y) = max(0, c + W (y − ½)), into `hidden`
    /// (images × H, the unpadded units): the image's embedding.
    pub fn log_density_and_hidden(p: &Params<'_>, values: &[f32], hidden: &mut [f32], out: &mut [f64]) -> ()
        => with_hidden_body
}

dispatch! {
    /// Adds ∂(−Σ log p)/∂θ over the rows of `values` into `grads` and returns −Σ log p. The
    /// padding stays zero (padded units are max(0, 0) = 0).
    pub fn gradient(p: &Params<'_>, values: &[f32], grads: &mut Grads<'_>) -> f64 => gradient_body
}

/// log p(y) under the mixture whose 3K heads are `z`, and when `delta` is given, ∂(−log p)/∂z
/// written into it.
#[inline(always)]
fn mixture<T: Target>(z: &[f32], k: usize, y: f32, delta: Option<&mut [f32]>) -> f32 {
    let (logits, rest) = z.split_at(k);
    let (means, log_scales) = rest.split_at(k);
    let max_logit = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut e = [0f32; MAX_COMPONENTS];
    for (e, &l) in e.iter_mut().zip(logits) {
        *e = exp::<T>(l - max_logit);
    }
    let e_sum: f32 = e[..k].iter().sum();
    let log_norm = max_logit + e_sum.ln();
    let mut lp = [0f32; MAX_COMPONENTS];
    let mut t = [0f32; MAX_COMPONENTS];
    let mut inv_s = [0f32; MAX_COMPONENTS];
    let (lo, hi) = LOG_SCALE_RANGE;
    for m in 0..k {
        #[allow(clippy::manual_clamp)] // max/min: one instruction each
        let ls = log_scales[m].max(lo).min(hi);
        inv_s[m] = exp::<T>(-ls);
        t[m] = (y - means[m]) * inv_s[m];
        lp[m] = logits[m] - log_norm - 0.5 * t[m] * t[m] - ls - HALF_LN_2PI;
    }
    let max_lp = lp[..k].iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut r = [0f32; MAX_COMPONENTS];
    for (r, &l) in r.iter_mut().zip(&lp[..k]) {
        *r = exp::<T>(l - max_lp);
    }
    let sum: f32 = r[..k].iter().sum();
    let log_p = max_lp + sum.ln();
    if let Some(delta) = delta {
        for m in 0..k {
            let resp = r[m] / sum;
            let weight = e[m] / e_sum;
            let clamped = log_scales[m] < lo || log_scales[m] > hi;
            delta[m] = weight - resp;
            delta[k + m] = -resp * t[m] * inv_s[m];
            delta[2 * k + m] = if clamped {
                0.0
            } else {
                -resp * (t[m] * t[m] - 1.0)
            };
        }
    }
    log_p
}

/// h ← max(a, 0) over a padded hidden vector.
#[inline(always)]
fn relu_into(a: &[f32], h: &mut [f32]) {
    for (h, &a) in h.iter_mut().zip(a) {
        *h = a.max(0.0);
    }
}

/// a ← a + s·w over a padded hidden vector.
#[inline(always)]
fn axpy<T: Target>(s: f32, w: &[f32], a: &mut [f32]) {
    for (a, &w) in a.iter_mut().zip(w) {
        *a = fmadd::<T>(s, w, *a);
    }
}

/// The 3K heads of position d for hidden state h.
#[inline(always)]
fn heads<T: Target>(p: &Params<'_>, d: usize, h: &[f32], z: &mut [f32]) {
    let (hp, nh) = (p.hp, p.heads());
    let rows = &p.v[d * nh * hp..(d + 1) * nh * hp];
    for (j, z) in z[..nh].iter_mut().enumerate() {
        *z = p.b[d * nh + j] + T::dot(h, &rows[j * hp..(j + 1) * hp]);
    }
}

#[inline(always)]
fn log_density_body<T: Target>(
    p: &Params<'_>,
    values: &[f32],
    terms: Option<&mut [f32]>,
    out: &mut [f64],
) {
    forward_body::<T>(p, values, terms, None, out);
}

#[inline(always)]
fn with_hidden_body<T: Target>(
    p: &Params<'_>,
    values: &[f32],
    hidden: &mut [f32],
    out: &mut [f64],
) {
    forward_body::<T>(p, values, None, Some(hidden), out);
}

/// The forward pass: log-densities into `out`, per-position terms and the final hidden layer
/// when asked for.
#[inline(always)]
fn forward_body<T: Target>(
    p: &Params<'_>,
    values: &[f32],
    mut terms: Option<&mut [f32]>,
    mut hidden: Option<&mut [f32]>,
    out: &mut [f64],
) {
    p.check(values);
    let (dims, hp, k) = (p.dims, p.hp, p.components);
    let n = values.len() / dims.max(1);
    assert_eq!(out.len(), n);
    if let Some(t) = terms.as_deref() {
        assert_eq!(t.len(), n * dims);
    }
    if let Some(e) = hidden.as_deref() {
        assert_eq!(e.len(), n * p.hidden);
    }
    let mut a = vec![0f32; TILE * hp];
    let mut h = vec![0f32; hp];
    let mut z = [0f32; 3 * MAX_COMPONENTS];
    for start in (0..n).step_by(TILE) {
        let nb = TILE.min(n - start);
        let y = &values[start * dims..(start + nb) * dims];
        for i in 0..nb {
            a[i * hp..(i + 1) * hp].copy_from_slice(p.c);
        }
        let mut total = [0f64; TILE];
        for d in 0..dims {
            let wd = &p.w[d * hp..(d + 1) * hp];
            for i in 0..nb {
                let ai = &mut a[i * hp..(i + 1) * hp];
                relu_into(ai, &mut h);
                heads::<T>(p, d, &h, &mut z);
                let yd = y[i * dims + d];
                let ll = mixture::<T>(&z, k, yd, None);
                total[i] += f64::from(ll);
                if let Some(t) = terms.as_deref_mut() {
                    t[(start + i) * dims + d] = ll;
                }
                axpy::<T>(yd - INPUT_CENTRE, wd, ai);
            }
        }
        out[start..start + nb].copy_from_slice(&total[..nb]);
        if let Some(e) = hidden.as_deref_mut() {
            // After the last position, a = c + W (y − ½): the hidden layer of the whole image.
            let hu = p.hidden;
            for i in 0..nb {
                relu_into(
                    &a[i * hp..i * hp + hu],
                    &mut e[(start + i) * hu..(start + i + 1) * hu],
                );
            }
        }
    }
}

#[inline(always)]
fn gradient_body<T: Target>(p: &Params<'_>, values: &[f32], g: &mut Grads<'_>) -> f64 {
    p.check(values);
    let (dims, hp, k, nh) = (p.dims, p.hp, p.components, p.heads());
    let n = values.len() / dims.max(1);
    assert_eq!(g.w.len(), p.w.len());
    assert_eq!(g.v.len(), p.v.len());
    assert_eq!(g.b.len(), p.b.len());
    assert_eq!(g.c.len(), p.c.len());
    if dims == 0 {
        return 0.0;
    }
    let mut a = vec![0f32; TILE * hp];
    // ∂(−log p)/∂a summed over every position walked so far, per image.
    let mut acc = vec![0f32; TILE * hp];
    let mut h = vec![0f32; hp];
    let mut dh = vec![0f32; hp];
    let mut z = [0f32; 3 * MAX_COMPONENTS];
    let mut delta = [0f32; 3 * MAX_COMPONENTS];
    let mut nll = 0f64;
    for start in (0..n).step_by(TILE) {
        let nb = TILE.min(n - start);
        let y = &values[start * dims..(start + nb) * dims];
        // a at the last position: c + Σ_{j < D−1} W_j y_j.
        for i in 0..nb {
            let ai = &mut a[i * hp..(i + 1) * hp];
            ai.copy_from_slice(p.c);
            for j in 0..dims - 1 {
                axpy::<T>(
                    y[i * dims + j] - INPUT_CENTRE,
                    &p.w[j * hp..(j + 1) * hp],
                    ai,
                );
            }
            acc[i * hp..(i + 1) * hp].fill(0.0);
        }
        for d in (0..dims).rev() {
            let rows = &p.v[d * nh * hp..(d + 1) * nh * hp];
            for i in 0..nb {
                let ai = &mut a[i * hp..(i + 1) * hp];
                relu_into(ai, &mut h);
                heads::<T>(p, d, &h, &mut z);
                nll -= f64::from(mixture::<T>(&z, k, y[i * dims + d], Some(&mut delta)));
                dh.fill(0.0);
                let grows = &mut g.v[d * nh * hp..(d + 1) * nh * hp];
                for j in 0..nh {
                    let dj = delta[j];
                    g.b[d * nh + j] += dj;
                    axpy::<T>(dj, &h, &mut grows[j * hp..(j + 1) * hp]);
                    axpy::<T>(dj, &rows[j * hp..(j + 1) * hp], &mut dh);
                }
                let acci = &mut acc[i * hp..(i + 1) * hp];
                for ((acc, &dh), &h) in acci.iter_mut().zip(&dh).zip(&h) {
                    // ReLU's derivative: 1 where the unit is on.
                    *acc += if h > 0.0 { dh } else { 0.0 };
                }
                // Step back to position d − 1: y_{d−1} no longer feeds a, and every later
                // position's ∂a (acc) times y_{d−1} is W_{d−1}'s gradient.
                if d > 0 {
                    let yj = y[i * dims + d - 1] - INPUT_CENTRE;
                    let j = d - 1;
                    axpy::<T>(yj, acci, &mut g.w[j * hp..(j + 1) * hp]);
                    axpy::<T>(-yj, &p.w[j * hp..(j + 1) * hp], ai);
                }
            }
        }
        for i in 0..nb {
            g.c.iter_mut()
                .zip(&acc[i * hp..(i + 1) * hp])
                .for_each(|(g, &acc)| *g += acc);
        }
    }
    nll
}

/// The naive reference: RNADE's equations in f64 over the unpadded hidden layer, every
/// position's hidden state kept for backpropagation. Slow and obviously right.
#[allow(clippy::needless_range_loop)] // index loops read like the equations
pub mod reference {
    use super::{Grads, INPUT_CENTRE, LOG_SCALE_RANGE, Params};

    /// log of the mixture density at y for heads z (3K), and ∂(−log p)/∂z.
    pub fn mixture(z: &[f64], k: usize, y: f64) -> (f64, Vec<f64>) {
        let (lo, hi) = (f64::from(LOG_SCALE_RANGE.0), f64::from(LOG_SCALE_RANGE.1));
        let max = z[..k].iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let log_norm = max + z[..k].iter().map(|l| (l - max).exp()).sum::<f64>().ln();
        let mut density = 0.0;
        let mut parts = vec![0.0; k];
        for m in 0..k {
            let s = z[2 * k + m].clamp(lo, hi).exp();
            let t = (y - z[k + m]) / s;
            parts[m] = (z[m] - log_norm).exp() * (-0.5 * t * t).exp()
                / (s * (2.0 * std::f64::consts::PI).sqrt());
            density += parts[m];
        }
        let mut delta = vec![0.0; 3 * k];
        for m in 0..k {
            let s = z[2 * k + m].clamp(lo, hi).exp();
            let t = (y - z[k + m]) / s;
            let resp = parts[m] / density;
            delta[m] = (z[m] - log_norm).exp() - resp;
            delta[k + m] = -resp * t / s;
            delta[2 * k + m] = if (lo..=hi).contains(&z[2 * k + m]) {
                -resp * (t * t - 1.0)
            } else {
                0.0
            };
        }
        (density.ln(), delta)
    }

    /// The hidden layer given the whole image, max(0, c + W (y − ½)), over the unpadded units.
    pub fn hidden(p: &Params<'_>, y: &[f32]) -> Vec<f64> {
        (0..p.hidden)
            .map(|k| {
                let a = f64::from(p.c[k])
                    + (0..p.dims)
                        .map(|d| f64::from(p.w[d * p.hp + k]) * f64::from(y[d] - INPUT_CENTRE))
                        .sum::<f64>();
                a.max(0.0)
            })
            .collect()
    }

    /// Hidden states h_d (unpadded) at every position of one image.
    fn hidden_states(p: &Params<'_>, y: &[f32]) -> Vec<Vec<f64>> {
        let (hp, hidden) = (p.hp, p.hidden);
        let mut a: Vec<f64> = p.c[..hidden].iter().map(|&c| f64::from(c)).collect();
        let mut states = Vec::with_capacity(p.dims);
        for d in 0..p.dims {
            states.push(a.iter().map(|&a| a.max(0.0)).collect());
            for k in 0..hidden {
                a[k] += f64::from(p.w[d * hp + k]) * f64::from(y[d] - INPUT_CENTRE);
            }
        }
        states
    }

    fn heads(p: &Params<'_>, d: usize, h: &[f64]) -> Vec<f64> {
        let (hp, nh) = (p.hp, p.heads());
        (0..nh)
            .map(|j| {
                f64::from(p.b[d * nh + j])
                    + (0..p.hidden)
                        .map(|k| f64::from(p.v[(d * nh + j) * hp + k]) * h[k])
                        .sum::<f64>()
            })
            .collect()
    }

    /// log p(y) of one image and its per-position terms.
    pub fn log_density(p: &Params<'_>, y: &[f32]) -> (f64, Vec<f64>) {
        let terms: Vec<f64> = hidden_states(p, y)
            .iter()
            .enumerate()
            .map(|(d, h)| mixture(&heads(p, d, h), p.components, f64::from(y[d])).0)
            .collect();
        (terms.iter().sum(), terms)
    }

    /// Adds ∂(−log p)/∂θ of one image into `g`; returns −log p.
    pub fn gradient(p: &Params<'_>, y: &[f32], g: &mut Grads<'_>) -> f64 {
        let (hp, hidden, nh) = (p.hp, p.hidden, p.heads());
        let states = hidden_states(p, y);
        let mut da = vec![vec![0.0; hidden]; p.dims];
        let mut nll = 0.0;
        for d in 0..p.dims {
            let h = &states[d];
            let (ll, delta) = mixture(&heads(p, d, h), p.components, f64::from(y[d]));
            nll -= ll;
            for j in 0..nh {
                g.b[d * nh + j] += delta[j] as f32;
                for k in 0..hidden {
                    g.v[(d * nh + j) * hp + k] += (delta[j] * h[k]) as f32;
                    let on = if h[k] > 0.0 { 1.0 } else { 0.0 };
                    da[d][k] += delta[j] * f64::from(p.v[(d * nh + j) * hp + k]) * on;
                }
            }
        }
        for k in 0..hidden {
            g.c[k] += da.iter().map(|row| row[k]).sum::<f64>() as f32;
            for j in 0..p.dims {
                let later: f64 = da[j + 1..].iter().map(|row| row[k]).sum();
                g.w[j * hp + k] += (later * f64::from(y[j] - INPUT_CENTRE)) as f32;
            }
        }
        nll
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::Isa;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[derive(Clone)]
    struct Owned {
        dims: usize,
        hidden: usize,
        hp: usize,
        components: usize,
        w: Vec<f32>,
        v: Vec<f32>,
        b: Vec<f32>,
        c: Vec<f32>,
    }

    impl Owned {
        fn random(dims: usize, hidden: usize, components: usize, seed: u64) -> Self {
            let hp = hidden.div_ceil(LANES) * LANES;
            let nh = 3 * components;
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut padded = |rows: usize, scale: f32| -> Vec<f32> {
                let mut m = vec![0f32; rows * hp];
                for r in 0..rows {
                    for k in 0..hidden {
                        m[r * hp + k] = rng.random_range(-scale..scale);
                    }
                }
                m
            };
            let w = padded(dims, 1.0);
            let v = padded(dims * nh, 0.5);
            let mut b = vec![0f32; dims * nh];
            for d in 0..dims {
                for m in 0..components {
                    b[d * nh + m] = rng.random_range(-1.0..1.0);
                    b[d * nh + components + m] = rng.random_range(0.0..1.0);
                    b[d * nh + 2 * components + m] = rng.random_range(-2.5..-1.0);
                }
            }
            let mut c = vec![0f32; hp];
            c[..hidden]
                .iter_mut()
                .for_each(|c| *c = rng.random_range(-1.0..1.0));
            Self {
                dims,
                hidden,
                hp,
                components,
                w,
                v,
                b,
                c,
            }
        }

        fn params(&self) -> Params<'_> {
            Params {
                dims: self.dims,
                hidden: self.hidden,
                hp: self.hp,
                components: self.components,
                w: &self.w,
                v: &self.v,
                b: &self.b,
                c: &self.c,
            }
        }

        fn part_mut(&mut self, part: usize) -> &mut Vec<f32> {
            match part {
                0 => &mut self.w,
                1 => &mut self.v,
                2 => &mut self.b,
                _ => &mut self.c,
            }
        }

        fn zero_grads(&self) -> [Vec<f32>; 4] {
            [
                vec![0.0; self.w.len()],
                vec![0.0; self.v.len()],
                vec![0.0; self.b.len()],
                vec![0.0; self.c.len()],
            ]
        }
    }

    fn grads(g: &mut [Vec<f32>; 4]) -> Grads<'_> {
        let [w, v, b, c] = g;
        Grads { w, v, b, c }
    }

    fn values(n: usize, dims: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n * dims).map(|_| rng.random_range(0.0..1.0)).collect()
    }

    /// Odd sizes: D, H, K and the image count are not multiples of LANES or TILE.
    const CASES: [(usize, usize, usize, usize); 4] =
        [(1, 1, 1, 1), (7, 5, 2, 3), (13, 21, 3, 9), (37, 50, 10, 11)];

    #[test]
    fn fast_log_density_equals_the_reference_on_every_isa() {
        for isa in Isa::for_tests() {
            for (dims, hidden, k, n) in CASES {
                let m = Owned::random(dims, hidden, k, dims as u64);
                let y = values(n, dims, 1);
                let mut out = vec![0f64; n];
                let mut terms = vec![0f32; n * dims];
                log_density(isa, &m.params(), &y, Some(&mut terms), &mut out);
                for i in 0..n {
                    let (want, want_terms) =
                        reference::log_density(&m.params(), &y[i * dims..(i + 1) * dims]);
                    assert!(
                        (out[i] - want).abs() < 2e-5 * want.abs().max(1.0) * dims as f64,
                        "{isa:?} D={dims} H={hidden} K={k} image {i}: {} vs {want}",
                        out[i]
                    );
                    for d in 0..dims {
                        let got = f64::from(terms[i * dims + d]);
                        assert!(
                            (got - want_terms[d]).abs() < 1e-4 * want_terms[d].abs().max(1.0),
                            "{isa:?} term {d}: {got} vs {}",
                            want_terms[d]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_hidden_layer_comes_from_the_scoring_pass_and_equals_the_reference() {
        for isa in Isa::for_tests() {
            for (dims, hidden, k, n) in CASES {
                let m = Owned::random(dims, hidden, k, dims as u64 + 3);
                let y = values(n, dims, 4);
                let (mut out, mut plain) = (vec![0f64; n], vec![0f64; n]);
                let mut h = vec![f32::NAN; n * hidden];
                log_density_and_hidden(isa, &m.params(), &y, &mut h, &mut out);
                log_density(isa, &m.params(), &y, None, &mut plain);
                assert_eq!(out, plain, "{isa:?}: the same log-densities");
                let mut active = 0;
                for i in 0..n {
                    let want = reference::hidden(&m.params(), &y[i * dims..(i + 1) * dims]);
                    for u in 0..hidden {
                        let got = f64::from(h[i * hidden + u]);
                        active += usize::from(want[u] > 0.0);
                        assert!(
                            (got - want[u]).abs() < 1e-5 * (1.0 + want[u]),
                            "{isa:?} D={dims} H={hidden} image {i} unit {u}: {got} vs {}",
                            want[u]
                        );
                    }
                }
                assert!(n * hidden < 4 || active > 0, "some units are on");
            }
        }
    }

    #[test]
    fn fast_gradient_equals_the_reference_on_every_isa() {
        for isa in Isa::for_tests() {
            for (dims, hidden, k, n) in CASES {
                let m = Owned::random(dims, hidden, k, 10 + dims as u64);
                let y = values(n, dims, 2);
                let mut fast = m.zero_grads();
                let nll = gradient(isa, &m.params(), &y, &mut grads(&mut fast));
                let mut slow = m.zero_grads();
                let mut want = 0.0;
                for i in 0..n {
                    want += reference::gradient(
                        &m.params(),
                        &y[i * dims..(i + 1) * dims],
                        &mut grads(&mut slow),
                    );
                }
                assert!(
                    (nll - want).abs() < 1e-4 * want.abs().max(1.0),
                    "{isa:?}: {nll} vs {want}"
                );
                let scale = slow.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
                for (part, (f, s)) in ["w", "v", "b", "c"].iter().zip(fast.iter().zip(&slow)) {
                    for (j, (a, b)) in f.iter().zip(s).enumerate() {
                        assert!(
                            (a - b).abs() < 1e-3 * scale.max(1.0),
                            "{isa:?} D={dims} H={hidden} K={k}: ∂{part}[{j}] {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn reference_gradient_matches_finite_differences() {
        let m = Owned::random(4, 3, 2, 5);
        let y = values(2, 4, 3);
        let nll = |m: &Owned| -> f64 {
            (0..2)
                .map(|i| -reference::log_density(&m.params(), &y[i * 4..(i + 1) * 4]).0)
                .sum()
        };
        let mut g = m.zero_grads();
        for i in 0..2 {
            reference::gradient(&m.params(), &y[i * 4..(i + 1) * 4], &mut grads(&mut g));
        }
        let eps = 1e-3f32;
        let mut checked = 0;
        for (part, analytic_part) in g.iter().enumerate() {
            for (j, &analytic) in analytic_part.iter().enumerate() {
                let shifted = |by: f32| {
                    let mut m2 = m.clone();
                    m2.part_mut(part)[j] += by;
                    nll(&m2)
                };
                let (up, down) = (shifted(eps), shifted(-eps));
                let numeric = (up - down) / (2.0 * f64::from(eps));
                let analytic = f64::from(analytic);
                assert!(
                    (numeric - analytic).abs() < 2e-3 * numeric.abs().max(1.0),
                    "part {part} [{j}]: numeric {numeric} vs analytic {analytic}"
                );
                checked += usize::from(analytic != 0.0);
            }
        }
        assert!(checked > 50, "{checked} non-zero gradients checked");
    }

    #[test]
    fn mixture_gradient_handles_clamped_scales() {
        // A log-scale below the clamp has no gradient, in both implementations.
        let z = [0.3f32, -0.2, 0.5, 0.4, -12.0, -1.0];
        let mut delta = [0f32; 6];
        let fast = mixture::<crate::kernels::math::Portable>(&z, 2, 0.45, Some(&mut delta));
        let z64: Vec<f64> = z.iter().map(|&v| f64::from(v)).collect();
        let (slow, want) = reference::mixture(&z64, 2, 0.45);
        assert!((f64::from(fast) - slow).abs() < 1e-4 * slow.abs().max(1.0));
        assert_eq!(delta[4], 0.0);
        for (a, b) in delta.iter().zip(&want) {
            assert!((f64::from(*a) - b).abs() < 1e-5, "{delta:?} vs {want:?}");
        }
    }
}
