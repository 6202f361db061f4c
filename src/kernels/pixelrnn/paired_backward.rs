//! The Row LSTM backward's products (both weights' gradients and ∂ of the layer's input over
//! a whole map, ∂ of the row above row by row), two map rows at a time by minimal filtering,
//! the transposes of what the forward's AVX2 tile does: Toom–Cook F(2,2) for the two input
//! taps, Winograd F(2,3) for the three state taps. They take 3/4 and 2/3 of the direct
//! products' multiply-adds, for a few additions over the operands.
//!
//! With ∂z the gate pre-activations' gradient (n = 4h per map row) and a pair of map rows
//! (2q, 2q + 1), d₀ = ∂z[2q] and d₁ = ∂z[2q + 1]:
//! - the input weights' gradient, G_t = Σ_m x[m − 1 + t]⊗∂z[m] for t = 0, 1, is per pair
//!   G₀ = u⊗d₀ + v⊗d₁ and G₁ = v⊗d₀ + w⊗d₁ (u, v, w = x[2q − 1], x[2q], x[2q + 1]), that is
//!   P₁ + P₂ and P₂ + P₃ with P₁ = (u − v)⊗d₀, P₂ = v⊗(d₀ + d₁), P₃ = (w − v)⊗d₁;
//! - the state weights' gradient, G_t = Σ_m a[m + t]⊗∂z[m] for t = 0, 1, 2 (a[j] the hidden
//!   state j − block − 1), is per pair, with a₀…a₃ = a[2q…2q + 3], G₀ = Q₁ + Q₂ + Q₃,
//!   G₁ = Q₂ − Q₃ and G₂ = Q₂ + Q₃ + Q₄ with Q₁ = (a₀ − a₂)⊗d₀, Q₂ = ½(a₁ + a₂)⊗(d₀ + d₁),
//!   Q₃ = ½(a₂ − a₁)⊗(d₀ − d₁), Q₄ = (a₃ − a₁)⊗d₁;
//! - ∂ of the input, ∂x[m] = ∂z[m]·W₁ᵀ + ∂z[m + 1]·W₀ᵀ (tap 0 is dx = −1), is per pair
//!   ∂x[2q] = M₁ + M₂ and ∂x[2q + 1] = M₂ + M₃ with M₁ = (d₀ − d₁)·W₁ᵀ, M₂ = d₁·(W₀ + W₁)ᵀ,
//!   M₃ = (d₂ − d₁)·W₀ᵀ (d₂ = ∂z[2q + 2]).
//!
//! Each is a GEMM through [`gemm_rows`] over a block of pairs whose sums and differences are
//! made first (so they are read from L2, not memory); the P₂, Q₂, Q₃ and M₂ shared by two
//! outputs are added to both at the end. Rows past the map read as zero: ∂z carries one zero
//! row past it, and the inputs' differences are built with explicit bounds. ∂ of the row
//! above, which the recurrence needs before the next row's step, is [`row_above_gradient`].

use super::add_assign;
use crate::kernels::gemm::{Mat, gemm_rows, mat};
use crate::kernels::math::Target;
use crate::kernels::{Isa, dispatch};

/// Pairs of map rows a block takes: its sums and differences (about 80 KB at h = 16) stay in
/// L2 between being made and being read.
const PAIRS: usize = 64;

/// The input-to-state weights read as GEMM operands: tap t's W_tᵀ (4h × 2h) in rows.
pub(super) struct InputWeights<'a> {
    /// dx = −1.
    pub left: &'a [f32],
    /// dx = 0.
    pub centre: &'a [f32],
}

/// What [`backward_products`] writes.
pub(super) struct Gradients<'a> {
    /// The input weights' gradient, taps-major (2f × 4h: row t·f + u), overwritten.
    pub input_weights: &'a mut [f32],
    /// The state weights' gradient, taps-major (3h × 4h: row t·h + u), overwritten.
    pub state_weights: &'a mut [f32],
    /// ∂ of the layer's input, f per map row: added to, except the last row of a map of odd
    /// rows (a padding column, left as it is).
    pub input: &'a mut [f32],
}

/// `out[i]` = op(`a[i]`, `b[i]`), a row outside the map (`None`) reading as zeros.
#[inline(always)]
fn combine(
    out: &mut [f32],
    a: Option<&[f32]>,
    b: Option<&[f32]>,
    zeros: &[f32],
    op: impl Fn(f32, f32) -> f32,
) {
    let (a, b) = (a.unwrap_or(zeros), b.unwrap_or(zeros));
    for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
        *o = op(a, b);
    }
}

/// A layer's maps as the pairs read them.
#[derive(Debug, Clone, Copy)]
struct Maps<'a> {
    h: usize,
    /// Map rows an image row.
    block: usize,
    /// Map rows.
    rows: usize,
    /// ∂z, 4h per map row, and one zero row past the map.
    d_z: &'a [f32],
    /// The layer's input, 2h per map row.
    input: &'a [f32],
    /// Its hidden states, h per map row.
    hidden: &'a [f32],
    /// 2h zeros: what a row outside the map reads.
    zeros: &'a [f32],
}

impl<'a> Maps<'a> {
    /// x[m], none past the map.
    #[inline(always)]
    fn x(&self, m: usize) -> Option<&'a [f32]> {
        let f = 2 * self.h;
        (m < self.rows).then(|| &self.input[m * f..(m + 1) * f])
    }

    /// a[j] = hidden[j − block − 1], the state z[j]'s first state tap (dx = −1) reads; none
    /// outside the map.
    #[inline(always)]
    fn a(&self, j: usize) -> Option<&'a [f32]> {
        let h = self.h;
        j.checked_sub(self.block + 1)
            .filter(|&at| at < self.rows)
            .map(|at| &self.hidden[at * h..(at + 1) * h])
    }

    fn pairs(&self) -> usize {
        self.rows.div_ceil(2)
    }

    /// The first pair that reads a state (its last, a[2q + 3], is the first state): those of
    /// the first image row read none.
    fn stateful(&self) -> usize {
        (self.block.saturating_sub(1) / 2).min(self.pairs())
    }

    /// Pairs whose two map rows are both in the map, the ∂x written.
    fn whole(&self) -> usize {
        self.rows / 2
    }
}

/// The sums and differences a block of up to [`PAIRS`] pairs multiplies (see the module's
/// notes), pair-major.
#[derive(Debug)]
struct Operands {
    /// d₀ + d₁ (4h).
    sum: Vec<f32>,
    /// d₀ − d₁ (4h).
    diff: Vec<f32>,
    /// d₂ − d₁ (4h).
    next: Vec<f32>,
    /// u − v (2h).
    x_left: Vec<f32>,
    /// w − v (2h).
    x_right: Vec<f32>,
    /// a₀ − a₂, ½(a₁ + a₂), ½(a₂ − a₁), a₃ − a₁ (h each), from the block's first stateful pair.
    a: [Vec<f32>; 4],
}

impl Operands {
    fn new(h: usize) -> Self {
        let zeros = |len: usize| vec![0f32; PAIRS * len];
        Self {
            sum: zeros(4 * h),
            diff: zeros(4 * h),
            next: zeros(4 * h),
            x_left: zeros(2 * h),
            x_right: zeros(2 * h),
            a: [(); 4].map(|_| zeros(h)),
        }
    }
}

dispatch! {
    /// Makes the [`Operands`] of the `k` pairs from pair `q0` on (of the state products from
    /// pair `skip` of the block on, of ∂x for its first `kx`), compiled for each instruction
    /// set so the passes are as wide as its vectors.
    fn fill_operands(maps: &Maps<'_>, q0: usize, k: usize, skip: usize, kx: usize, ops: &mut Operands) -> ()
        => fill_operands_body
}

// `T` only names the copy `dispatch!` compiles: its target features vectorize the loops.
#[allow(clippy::extra_unused_type_parameters)]
#[inline(always)]
fn fill_operands_body<T: Target>(
    maps: &Maps<'_>,
    q0: usize,
    k: usize,
    skip: usize,
    kx: usize,
    ops: &mut Operands,
) {
    let (h, n) = (maps.h, 4 * maps.h);
    let f = 2 * h;
    let zeros = maps.zeros;
    let dz = &maps.d_z[2 * q0 * n..];
    for ((pair, s), d) in dz[..2 * k * n]
        .chunks_exact(2 * n)
        .zip(ops.sum.chunks_exact_mut(n))
        .zip(ops.diff.chunks_exact_mut(n))
    {
        let (d0, d1) = pair.split_at(n);
        combine(s, Some(d0), Some(d1), zeros, |a, b| a + b);
        combine(d, Some(d0), Some(d1), zeros, |a, b| a - b);
    }
    for (i, (l, r)) in ops
        .x_left
        .chunks_exact_mut(f)
        .zip(ops.x_right.chunks_exact_mut(f))
        .take(k)
        .enumerate()
    {
        let m = 2 * (q0 + i);
        let v = maps.x(m);
        let u = m.checked_sub(1).and_then(|m| maps.x(m));
        combine(l, u, v, zeros, |a, b| a - b);
        combine(r, maps.x(m + 1), v, zeros, |a, b| a - b);
    }
    let [a_left, a_sum, a_diff, a_right] = &mut ops.a;
    for i in 0..k - skip {
        let j = 2 * (q0 + skip + i);
        let [a0, a1, a2, a3] = [0, 1, 2, 3].map(|t| maps.a(j + t));
        let at = i * h..(i + 1) * h;
        combine(&mut a_left[at.clone()], a0, a2, zeros, |a, b| a - b);
        combine(&mut a_sum[at.clone()], a1, a2, zeros, |a, b| 0.5 * (a + b));
        combine(&mut a_diff[at.clone()], a2, a1, zeros, |a, b| 0.5 * (a - b));
        combine(&mut a_right[at], a3, a1, zeros, |a, b| a - b);
    }
    for (i, e) in ops.next.chunks_exact_mut(n).take(kx).enumerate() {
        let (d1, d2) = dz[(2 * i + 1) * n..(2 * i + 3) * n].split_at(n);
        combine(e, Some(d2), Some(d1), zeros, |a, b| a - b);
    }
}

/// A Row LSTM layer's weights' gradients and ∂ of its input from ∂z (`d_z`: the map's rows
/// of 4h, then one zero row), the layer's input map `input` (2h per map row) and its hidden
/// states `hidden` (h per map row), with `block` map rows an image row.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward_products(
    isa: Isa,
    h: usize,
    block: usize,
    d_z: &[f32],
    input: &[f32],
    hidden: &[f32],
    weights: InputWeights<'_>,
    out: Gradients<'_>,
) {
    let (f, n) = (2 * h, 4 * h);
    let rows = hidden.len() / h;
    assert_eq!(input.len(), rows * f);
    assert!(d_z.len() > rows * n, "∂z has a zero row past the map");
    debug_assert!(d_z[rows * n..(rows + 1) * n].iter().all(|&v| v == 0.0));
    assert_eq!(out.input.len(), rows * f);
    let zeros = vec![0f32; f];
    let maps = Maps {
        h,
        block,
        rows,
        d_z,
        input,
        hidden,
        zeros: &zeros,
    };
    let both: Vec<f32> = weights
        .centre
        .iter()
        .zip(weights.left)
        .map(|(a, b)| a + b)
        .collect();
    let mut ops = Operands::new(h);
    let mut shared_dx = vec![0f32; PAIRS * f];
    // The products two outputs share: P₂, Q₂, Q₃.
    let mut p2 = vec![0f32; f * n];
    let (mut q2, mut q3) = (vec![0f32; h * n], vec![0f32; h * n]);
    let (g_left, g_centre) = out.input_weights[..2 * f * n].split_at_mut(f * n);
    g_left.fill(0.0);
    g_centre.fill(0.0);
    let (s0, rest) = out.state_weights[..3 * h * n].split_at_mut(h * n);
    let (s1, s2) = rest.split_at_mut(h * n);
    s0.fill(0.0);
    s2.fill(0.0);
    // C += A·B over `k` pairs: A (`lhs`) holds a pair's values in a column, B (`rhs`) in a
    // row, its rows `ldb` apart.
    let outer =
        |rows_of_c: usize, k: usize, lhs: Mat<'_>, rhs: &[f32], ldb: usize, c: &mut [f32]| {
            gemm_rows(isa, rows_of_c, k, n, lhs, rhs, ldb, 1.0, None, c, n);
        };

    for q0 in (0..maps.pairs()).step_by(PAIRS) {
        let k = PAIRS.min(maps.pairs() - q0);
        let skip = maps.stateful().saturating_sub(q0).min(k);
        let kx = maps.whole().saturating_sub(q0).min(k);
        fill_operands(isa, &maps, q0, k, skip, kx, &mut ops);
        let dz = &d_z[2 * q0 * n..];

        // The input weights.
        outer(
            f,
            k,
            mat(&input[2 * q0 * f..], 1, 2 * f),
            &ops.sum,
            n,
            &mut p2,
        );
        outer(f, k, mat(&ops.x_left, 1, f), dz, 2 * n, g_left);
        outer(f, k, mat(&ops.x_right, 1, f), &dz[n..], 2 * n, g_centre);

        // The state weights, from the second image row's pairs on.
        let ks = k - skip;
        if ks > 0 {
            let [a_left, a_sum, a_diff, a_right] = &ops.a;
            let dz = &dz[2 * skip * n..];
            outer(h, ks, mat(a_left, 1, h), dz, 2 * n, s0);
            outer(h, ks, mat(a_sum, 1, h), &ops.sum[skip * n..], n, &mut q2);
            outer(h, ks, mat(a_diff, 1, h), &ops.diff[skip * n..], n, &mut q3);
            outer(h, ks, mat(a_right, 1, h), &dz[n..], 2 * n, s2);
        }

        // ∂ of the input, for the whole pairs.
        if kx > 0 {
            let shared_dx = &mut shared_dx[..kx * f];
            gemm_rows(
                isa,
                kx,
                n,
                f,
                mat(&dz[n..], 2 * n, 1),
                &both,
                f,
                0.0,
                None,
                shared_dx,
                f,
            );
            let d_x = &mut out.input[2 * q0 * f..2 * (q0 + kx) * f];
            for (pair, m2) in d_x.chunks_exact_mut(2 * f).zip(shared_dx.chunks_exact(f)) {
                let (even, odd) = pair.split_at_mut(f);
                add_assign(even, m2);
                add_assign(odd, m2);
            }
            let lhs = [&ops.diff, &ops.next];
            for (t, (lhs, w)) in lhs
                .into_iter()
                .zip([weights.centre, weights.left])
                .enumerate()
            {
                gemm_rows(
                    isa,
                    kx,
                    n,
                    f,
                    mat(lhs, n, 1),
                    w,
                    f,
                    1.0,
                    None,
                    &mut d_x[t * f..],
                    2 * f,
                );
            }
        }
    }

    for ((l, c), &p) in g_left.iter_mut().zip(g_centre.iter_mut()).zip(&p2) {
        *l += p;
        *c += p;
    }
    for (((s0, s1), s2), (&q2, &q3)) in s0
        .iter_mut()
        .zip(s1.iter_mut())
        .zip(s2.iter_mut())
        .zip(q2.iter().zip(&q3))
    {
        *s0 += q2 + q3;
        *s1 = q2 - q3;
        *s2 += q2 + q3;
    }
}

/// The state-to-state weights read as the GEMM operands of ∂ of the row above, Winograd's
/// F(2,3) filter transform of the taps V₋₁, V₀, V₊₁ (each Vᵀ 4h × h, in rows):
/// V₊₁ᵀ, ½(V₋₁ + V₀ + V₊₁)ᵀ, ½(V₋₁ − V₀ + V₊₁)ᵀ, V₋₁ᵀ.
pub(super) struct RowAboveWeights([Vec<f32>; 4]);

impl RowAboveWeights {
    /// From the taps' transposes (dx = −1, 0, +1), each 4h × h in rows.
    pub fn new([left, centre, right]: [&[f32]; 3]) -> Self {
        let half = |sign: f32| -> Vec<f32> {
            left.iter()
                .zip(centre)
                .zip(right)
                .map(|((l, c), r)| 0.5 * (l + sign * c + r))
                .collect()
        };
        Self([right.to_vec(), half(1.0), half(-1.0), left.to_vec()])
    }
}

dispatch! {
    /// The operands of [`row_above_gradient`] for `pairs` pairs of outputs: from e = ∂z rows,
    /// pair-major into `t` (4 blocks of pairs · 4h), e₀ − e₂, e₁ + e₂, e₂ − e₁, e₃ − e₁.
    fn fill_row_above(d_z: &[f32], n: usize, pairs: usize, t: &mut [f32]) -> ()
        => fill_row_above_body
}

// `T` only names the copy `dispatch!` compiles: its target features vectorize the loops.
#[allow(clippy::extra_unused_type_parameters)]
#[inline(always)]
fn fill_row_above_body<T: Target>(d_z: &[f32], n: usize, pairs: usize, t: &mut [f32]) {
    let (t1, rest) = t[..4 * pairs * n].split_at_mut(pairs * n);
    let (t2, rest) = rest.split_at_mut(pairs * n);
    let (t3, t4) = rest.split_at_mut(pairs * n);
    let ((t1, t2), (t3, t4)) = (
        (t1.chunks_exact_mut(n), t2.chunks_exact_mut(n)),
        (t3.chunks_exact_mut(n), t4.chunks_exact_mut(n)),
    );
    for (s, (((t1, t2), t3), t4)) in t1.zip(t2).zip(t3).zip(t4).enumerate() {
        let e = |i: usize| Some(&d_z[(2 * s + i) * n..(2 * s + i + 1) * n]);
        combine(t1, e(0), e(2), &[], |a, b| a - b);
        combine(t2, e(1), e(2), &[], |a, b| a + b);
        combine(t3, e(2), e(1), &[], |a, b| a - b);
        combine(t4, e(3), e(1), &[], |a, b| a - b);
    }
}

/// Adds ∂ of the row above into `d_above` (h per map row) for `outputs` map rows: with e[i]
/// the i-th row of `d_z` (4h each), ∂s[a] = e[a]·V₊₁ᵀ + e[a + 1]·V₀ᵀ + e[a + 2]·V₋₁ᵀ (the
/// output at a is read by the taps dx = +1, 0, −1 of the rows below it at a, a + 1, a + 2).
/// `d_z` holds the rows the outputs read plus one; with an odd number of outputs, the row of
/// `d_above` after the last is written too (so it must lie there).
///
/// Per pair of outputs (a, a + 1), with e₀…e₃ = e[a…a + 3], Winograd's F(2,3): ∂s[a] =
/// M₁ + M₂ + M₃ and ∂s[a + 1] = M₂ − M₃ + M₄ with M₁ = (e₀ − e₂)·V₊₁ᵀ,
/// M₂ = (e₁ + e₂)·½(V₋₁ + V₀ + V₊₁)ᵀ, M₃ = (e₂ − e₁)·½(V₋₁ − V₀ + V₊₁)ᵀ, M₄ = (e₃ − e₁)·V₋₁ᵀ.
pub(super) fn row_above_gradient(
    isa: Isa,
    h: usize,
    outputs: usize,
    d_z: &[f32],
    weights: &RowAboveWeights,
    scratch: &mut Vec<f32>,
    d_above: &mut [f32],
) {
    let n = 4 * h;
    let pairs = outputs.div_ceil(2);
    if pairs == 0 {
        return;
    }
    assert!(d_above.len() >= 2 * pairs * h, "the outputs lie in d_above");
    assert!(
        d_z.len() >= (2 * pairs + 2) * n,
        "the rows the outputs read lie in d_z"
    );
    scratch.resize(4 * pairs * n + 2 * pairs * h, 0.0);
    let (t, m) = scratch.split_at_mut(4 * pairs * n);
    fill_row_above(isa, d_z, n, pairs, t);
    let [g1, g2, g3, g4] = &weights.0;
    let (m2, m3) = m.split_at_mut(pairs * h);
    let lhs = |i: usize| mat(&t[i * pairs * n..(i + 1) * pairs * n], n, 1);
    gemm_rows(isa, pairs, n, h, lhs(1), g2, h, 0.0, None, m2, h);
    gemm_rows(isa, pairs, n, h, lhs(2), g3, h, 0.0, None, m3, h);
    for ((pair, m2), m3) in d_above[..2 * pairs * h]
        .chunks_exact_mut(2 * h)
        .zip(m2.chunks_exact(h))
        .zip(m3.chunks_exact(h))
    {
        let (y0, y1) = pair.split_at_mut(h);
        add_sum_and_difference(isa, y0, y1, m2, m3);
    }
    gemm_rows(isa, pairs, n, h, lhs(0), g1, h, 1.0, None, d_above, 2 * h);
    gemm_rows(
        isa,
        pairs,
        n,
        h,
        lhs(3),
        g4,
        h,
        1.0,
        None,
        &mut d_above[h..],
        2 * h,
    );
}

dispatch! {
    /// `y0` += a + b and `y1` += a − b, value by value, compiled for each instruction set so the
    /// loop is as wide as its vectors (its caller is compiled for none in particular).
    fn add_sum_and_difference(y0: &mut [f32], y1: &mut [f32], a: &[f32], b: &[f32]) -> ()
        => add_sum_and_difference_body
}

// `T` only names the copy `dispatch!` compiles: its target features vectorize the loop.
#[allow(clippy::extra_unused_type_parameters)]
#[inline(always)]
fn add_sum_and_difference_body<T: Target>(y0: &mut [f32], y1: &mut [f32], a: &[f32], b: &[f32]) {
    let len = y0.len();
    let (y1, a, b) = (&mut y1[..len], &a[..len], &b[..len]);
    for (((y0, y1), &a), &b) in y0.iter_mut().zip(y1).zip(a).zip(b) {
        *y0 += a + b;
        *y1 += a - b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The products by their definitions, in f64: (input weights, state weights, ∂ input).
    fn direct(
        h: usize,
        block: usize,
        d_z: &[f32],
        input: &[f32],
        hidden: &[f32],
        left: &[f32],
        centre: &[f32],
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (f, n) = (2 * h, 4 * h);
        let rows = hidden.len() / h;
        let dz = |m: usize, g: usize| {
            if m < rows {
                f64::from(d_z[m * n + g])
            } else {
                0.0
            }
        };
        let mut input_w = vec![0f64; 2 * f * n];
        let mut state_w = vec![0f64; 3 * h * n];
        let mut d_x = vec![0f64; rows * f];
        for m in 0..rows {
            for g in 0..n {
                for t in 0..2 {
                    if let Some(src) = (m + t).checked_sub(1) {
                        for u in 0..f {
                            input_w[(t * f + u) * n + g] +=
                                f64::from(input[src * f + u]) * dz(m, g);
                        }
                    }
                }
                for t in 0..3 {
                    if let Some(src) = (m + t).checked_sub(block + 1).filter(|&s| s < rows) {
                        for u in 0..h {
                            state_w[(t * h + u) * n + g] +=
                                f64::from(hidden[src * h + u]) * dz(m, g);
                        }
                    }
                }
            }
            for u in 0..f {
                d_x[m * f + u] = (0..n)
                    .map(|g| {
                        dz(m, g) * f64::from(centre[g * f + u])
                            + dz(m + 1, g) * f64::from(left[g * f + u])
                    })
                    .sum();
            }
        }
        (input_w, state_w, d_x)
    }

    #[test]
    fn the_row_above_equals_its_taps() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for (h, outputs) in [(3, 25), (3, 70), (16, 238), (1, 1), (2, 0usize)] {
            let n = 4 * h;
            let pairs = outputs.div_ceil(2);
            let mut draw = |len: usize| -> Vec<f32> {
                (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
            };
            // Exactly the rows read, plus the one after them.
            let d_z = draw((2 * pairs + 2) * n);
            let taps = [draw(n * h), draw(n * h), draw(n * h)];
            let weights = RowAboveWeights::new([&taps[0], &taps[1], &taps[2]]);
            let start = draw((2 * pairs).max(outputs + 1) * h);
            for isa in Isa::available() {
                let mut got = start.clone();
                let mut scratch = Vec::new();
                row_above_gradient(isa, h, outputs, &d_z, &weights, &mut scratch, &mut got);
                for a in 0..outputs {
                    for u in 0..h {
                        // Tap t (dx = t − 1) of the row below at a + 2 − t reads a.
                        let want: f64 = f64::from(start[a * h + u])
                            + (0..3)
                                .flat_map(|t| {
                                    let (d_z, taps) = (&d_z, &taps);
                                    (0..n).map(move |g| {
                                        f64::from(d_z[(a + 2 - t) * n + g])
                                            * f64::from(taps[t][g * h + u])
                                    })
                                })
                                .sum::<f64>();
                        let g = f64::from(got[a * h + u]);
                        assert!(
                            (g - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{} h {h} outputs {outputs} ∂s[{a}][{u}]: {g} vs {want}",
                            isa.name()
                        );
                    }
                }
                // Nothing past the outputs' pairs is touched.
                assert_eq!(got[2 * pairs * h..], start[2 * pairs * h..]);
            }
        }
    }

    #[test]
    fn paired_products_equal_the_direct_ones() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let isas = Isa::available();
        // Odd and even maps and image rows; several blocks of pairs and a partial one.
        for (h, rows, block) in [
            (3, 135, 27),
            (3, 360, 72),
            (16, 301, 43),
            (1, 2, 2),
            (2, 1, 1),
        ] {
            let (f, n) = (2 * h, 4 * h);
            let mut draw = |len: usize| -> Vec<f32> {
                (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
            };
            let mut d_z = draw(rows * n);
            d_z.extend(vec![0.0; n]);
            let (input, hidden) = (draw(rows * f), draw(rows * h));
            let (left, centre) = (draw(n * f), draw(n * f));
            let start = draw(rows * f);
            let (input_w, state_w, d_x) = direct(h, block, &d_z, &input, &hidden, &left, &centre);
            for &isa in &isas {
                let (mut got_input_w, mut got_state_w) = (draw(2 * f * n), draw(3 * h * n));
                let mut got_d_x = start.clone();
                backward_products(
                    isa,
                    h,
                    block,
                    &d_z,
                    &input,
                    &hidden,
                    InputWeights {
                        left: &left,
                        centre: &centre,
                    },
                    Gradients {
                        input_weights: &mut got_input_w,
                        state_weights: &mut got_state_w,
                        input: &mut got_d_x,
                    },
                );
                let close = |what: &str, got: &[f32], want: &[f64], base: &[f32]| {
                    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
                        let w = w + base.get(i).map_or(0.0, |&b| f64::from(b));
                        assert!(
                            (f64::from(g) - w).abs() <= 1e-4 * (1.0 + w.abs()),
                            "{} {what}[{i}] h {h} rows {rows} block {block}: {g} vs {w}",
                            isa.name()
                        );
                    }
                };
                close("input weights", &got_input_w, &input_w, &[]);
                close("state weights", &got_state_w, &state_w, &[]);
                // A map of odd rows leaves its last row (a padding column) as it was.
                let whole = rows / 2 * 2;
                close("∂ input", &got_d_x[..whole * f], &d_x[..whole * f], &start);
                assert_eq!(got_d_x[whole * f..], start[whole * f..]);
            }
        }
    }
}
