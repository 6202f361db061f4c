//! A Row LSTM layer's forward pass fused for h = 16 on AVX-512. Row by row, a tile of a few
//! pixels accumulates both products (input-to-state and state-to-state, K = 4h + 3h) into
//! registers that hold exactly those pixels' four gates; the cell update, the output and the
//! 1×1 convolution back to 2h (added to the layer's input) follow at once. The gate
//! pre-activations never reach memory, which the unfused path writes (a row of them is larger
//! than L1) and reads back twice; the next map is written once. A pass that keeps activations
//! for the backward pass (training) stores the gates after their nonlinearity, the cells,
//! their tanh and the outputs of every row, as the unfused path does; one that keeps none
//! (scoring, sampling) keeps the cells and outputs of two rows only. Its σ and tanh are
//! AVX-512 code of their own (2ˣ scaled in one instruction, a reciprocal estimate and a Newton
//! step instead of a division), tested against f64 here.
//!
//! Other widths and other instruction sets take the GEMMs and
//! [`lstm_forward`](super::lstm_forward). Only pixels are computed: the padding columns of
//! everything written are set to zero, which is what the next row's taps (and the next
//! layer's, and the backward pass) must read.

use super::{
    Architecture, Geometry, LayerAt, Net, Recurrence, mat, row_and_above, row_slots, rows_of,
    taps_major,
};
use crate::kernels::Target;

/// LSTM units this layer is written for.
const H: usize = 16;
/// Gate pre-activations per pixel (o, f, i, g): one AVX-512 register each.
const GATES: usize = 4 * H;
/// Features per map row, 2h.
const F: usize = 2 * H;

/// Whether [`layer`] can run a layer of `net`: a Row LSTM, AVX-512 and h = 16.
pub(super) fn applies(net: &Net<'_>) -> bool {
    net.shape.architecture == Architecture::RowLstm
        && net.shape.hidden == H
        && net.isa.target() == Target::Avx512
}

/// A Row LSTM layer (weights at `at`) over image rows `0..rows` of the chunk `g`: from its
/// `input` map to the `next` map, input + 1×1(LSTM output) + bias (2h per map row, padding
/// columns zero). With `keep`, `rec` receives every row's activations in the map's layout
/// (what [`row_lstm_backward`](super::row_lstm_backward) reads); without, it is scratch for
/// two rows of cells and outputs.
///
/// Panics unless [`applies`] holds and the maps (with `keep`, `rec` too) cover the chunk.
#[allow(clippy::too_many_arguments)]
pub(super) fn layer(
    net: &Net<'_>,
    g: &Geometry,
    at: &LayerAt,
    input: &[f32],
    next: &mut [f32],
    rec: &mut Recurrence,
    rows: usize,
    keep: bool,
) {
    assert!(applies(net), "the fused Row LSTM needs AVX-512 and h = 16");
    let w = net.params;
    let block = g.n * g.p;
    assert!(g.p == g.width + 2, "one padding column either side");
    assert!(input.len() >= g.rows_up_to(rows) * F && next.len() >= g.rows_up_to(rows) * F);
    let weights = Weights {
        input: taps_major(&w[at.input[0]..], GATES, F, 2),
        state: taps_major(&w[at.state[0]..], GATES, H, 3),
        bias: w[at.input_bias[0]..at.input_bias[0] + GATES].to_vec(),
        output: rows_of(mat(&w[at.output..], 1, H), H, F),
        output_bias: w[at.output_bias..at.output_bias + F].to_vec(),
    };
    let slots = if keep { rows } else { 2 };
    for buf in [&mut rec.cell, &mut rec.hidden] {
        if buf.len() < slots * block * H {
            buf.resize(slots * block * H, 0.0);
        }
    }
    if keep {
        assert!(rec.gates.len() >= rows * block * GATES && rec.tanh_cell.len() >= rows * block * H);
    }
    for r in 0..rows {
        let span = r * block..(r + 1) * block;
        let (slot, above) = row_slots(r, keep);
        let (cell, c_above) = row_and_above(&mut rec.cell, slot, above, block * H);
        let (hidden, h_above) = row_and_above(&mut rec.hidden, slot, above, block * H);
        let above = above.map(|_| (h_above, c_above));
        let kept = keep.then(|| {
            (
                &mut rec.gates[span.start * GATES..span.end * GATES],
                &mut rec.tanh_cell[span.start * H..span.end * H],
            )
        });
        let x = &input[span.start * F..span.end * F];
        let y = &mut next[span.start * F..span.end * F];
        // SAFETY: `applies` checked that the CPU runs AVX-512 (an `Isa`'s invariant); every
        // slice covers the row's `block` map rows, the weights their 4h or 2h columns.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            x86::row(g.n, g.p, x, above, &weights, cell, hidden, kept, y);
        }
    }
}

/// A layer's weights as the tiles read them: rows of 4h gates or 2h features.
struct Weights {
    /// Input-to-state, taps dx = −1, 0: 2 · 2h rows.
    input: Vec<f32>,
    /// State-to-state, taps dx = −1, 0, +1 of the row above: 3 · h rows.
    state: Vec<f32>,
    bias: Vec<f32>,
    /// The 1×1 back to 2h: h rows.
    output: Vec<f32>,
    output_bias: Vec<f32>,
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{F, H, Weights};

    /// Pixels per tile: 6 × 4 accumulators and the 4 weight vectors fill 28 of the 32
    /// registers.
    const TILE: usize = 6;

    /// One image row of n images (`p` map rows each): `x` the layer's input (2h per map row),
    /// `above` the row above's outputs and cells (h each; none for the first row), into this
    /// row's `cell`, `hidden` and `next` map, and if `kept` is given its activated gates (4h)
    /// and tanh of the cells (h).
    ///
    /// # Safety
    /// The CPU has AVX-512F; every slice holds n·p map rows and the weights their shapes
    /// (as [`super::layer`] builds them).
    #[target_feature(enable = "avx512f,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn row(
        n: usize,
        p: usize,
        x: &[f32],
        above: Option<(&[f32], &[f32])>,
        w: &Weights,
        cell: &mut [f32],
        hidden: &mut [f32],
        mut kept: Option<(&mut [f32], &mut [f32])>,
        next: &mut [f32],
    ) {
        let (gates, tanh_cell) = match &mut kept {
            Some((g, t)) => (g.as_mut_ptr(), t.as_mut_ptr()),
            None => (std::ptr::null_mut(), std::ptr::null_mut()),
        };
        let args = Args {
            x: x.as_ptr(),
            h_above: above.map_or(std::ptr::null(), |(h, _)| h.as_ptr()),
            c_above: above.map_or(std::ptr::null(), |(_, c)| c.as_ptr()),
            w_in: w.input.as_ptr(),
            w_state: w.state.as_ptr(),
            bias: w.bias.as_ptr(),
            w_out: w.output.as_ptr(),
            out_bias: w.output_bias.as_ptr(),
            cell: cell.as_mut_ptr(),
            hidden: hidden.as_mut_ptr(),
            gates,
            tanh_cell,
            next: next.as_mut_ptr(),
        };
        for i in 0..n {
            for q in [i * p, (i + 1) * p - 1] {
                cell[q * H..(q + 1) * H].fill(0.0);
                hidden[q * H..(q + 1) * H].fill(0.0);
                next[q * F..(q + 1) * F].fill(0.0);
                if let Some((g, t)) = &mut kept {
                    g[q * 4 * H..(q + 1) * 4 * H].fill(0.0);
                    t[q * H..(q + 1) * H].fill(0.0);
                }
            }
            let end = (i + 1) * p - 1;
            let mut q = i * p + 1;
            // SAFETY: map rows i·p .. (i + 1)·p of image i lie within the row, and a pixel's
            // taps reach one map row either side of it, never past its padding.
            unsafe {
                while q < end {
                    let pixels = (end - q).min(TILE);
                    match pixels {
                        6 => tile::<6>(q, args),
                        5 => tile::<5>(q, args),
                        4 => tile::<4>(q, args),
                        3 => tile::<3>(q, args),
                        2 => tile::<2>(q, args),
                        _ => tile::<1>(q, args),
                    }
                    q += pixels;
                }
            }
        }
    }

    /// The operands of [`row`]; `h_above` and `c_above` null for the first row, `gates` and
    /// `tanh_cell` null when nothing is kept.
    #[derive(Clone, Copy)]
    struct Args {
        x: *const f32,
        h_above: *const f32,
        c_above: *const f32,
        w_in: *const f32,
        w_state: *const f32,
        bias: *const f32,
        w_out: *const f32,
        out_bias: *const f32,
        cell: *mut f32,
        hidden: *mut f32,
        gates: *mut f32,
        tanh_cell: *mut f32,
        next: *mut f32,
    }

    /// Pixels at map rows q .. q + R of the row: their gates in registers, then their cells,
    /// outputs and next features.
    ///
    /// # Safety
    /// The CPU has AVX-512F; map rows q − 1 .. q + R + 1 lie within the row.
    #[target_feature(enable = "avx512f,fma")]
    #[inline]
    unsafe fn tile<const R: usize>(q: usize, a: Args) {
        // SAFETY (all accesses): the caller's.
        unsafe {
            let bias = [0, 1, 2, 3].map(|v| _mm512_loadu_ps(a.bias.add(16 * v)));
            let mut acc = [bias; R];
            // Input-to-state: taps dx = −1, 0 are map rows q − 1 and q, 2·2h contiguous values.
            accumulate::<R, 4>(&mut acc, a.x.add((q - 1) * F), F, a.w_in, 2 * F);
            // State-to-state: the row above at dx = −1, 0, +1, 3h contiguous values.
            if !a.h_above.is_null() {
                accumulate::<R, 4>(&mut acc, a.h_above.add((q - 1) * H), H, a.w_state, 3 * H);
            }
            // The cells in two passes over the tile (gates to c, then c to the output), so the σ
            // of different pixels overlap instead of each pixel's chain running alone.
            let zero = _mm512_setzero_ps();
            let mut cells = [zero; R];
            for (r, ([_, f, i, g], c)) in acc.iter().zip(&mut cells).enumerate() {
                let c_prev = if a.c_above.is_null() {
                    zero
                } else {
                    _mm512_loadu_ps(a.c_above.add((q + r) * H))
                };
                let (f, i, g) = (sigmoid(*f), sigmoid(*i), tanh(*g));
                *c = _mm512_fmadd_ps(f, c_prev, _mm512_mul_ps(i, g));
                _mm512_storeu_ps(a.cell.add((q + r) * H), *c);
                if !a.gates.is_null() {
                    let kept = a.gates.add((q + r) * 4 * H);
                    _mm512_storeu_ps(kept.add(H), f);
                    _mm512_storeu_ps(kept.add(2 * H), i);
                    _mm512_storeu_ps(kept.add(3 * H), g);
                }
            }
            for (r, (gates, c)) in acc.iter().zip(&cells).enumerate() {
                let (o, tc) = (sigmoid(gates[0]), tanh(*c));
                _mm512_storeu_ps(a.hidden.add((q + r) * H), _mm512_mul_ps(o, tc));
                if !a.gates.is_null() {
                    _mm512_storeu_ps(a.gates.add((q + r) * 4 * H), o);
                    _mm512_storeu_ps(a.tanh_cell.add((q + r) * H), tc);
                }
            }
            // next = input + 1×1(output) + bias.
            let out_bias = [0, 1].map(|v| _mm512_loadu_ps(a.out_bias.add(16 * v)));
            let mut acc = [[_mm512_setzero_ps(); 2]; R];
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = a.x.add((q + r) * F);
                *acc = [0, 1].map(|v| _mm512_add_ps(_mm512_loadu_ps(x.add(16 * v)), out_bias[v]));
            }
            accumulate::<R, 2>(&mut acc, a.hidden.add(q * H), H, a.w_out, H);
            for (r, acc) in acc.iter().enumerate() {
                for (v, acc) in acc.iter().enumerate() {
                    _mm512_storeu_ps(a.next.add((q + r) * F + 16 * v), *acc);
                }
            }
        }
    }

    /// 2^t for t in [−126, 126]: 2^(t − n) by its degree-6 series around 0 (|t − n| ≤ ½, error
    /// below 2⁻²³ relative), scaled by 2^n in one instruction.
    #[target_feature(enable = "avx512f,fma")]
    #[inline]
    fn exp2(t: __m512) -> __m512 {
        const C: [f32; 7] = [
            1.0,
            std::f32::consts::LN_2,
            0.240_226_5,
            0.055_504_11,
            0.009_618_129,
            0.001_333_355_8,
            0.000_154_035_3,
        ];
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
        let r = _mm512_sub_ps(t, n);
        let mut p = _mm512_set1_ps(C[6]);
        for &c in C[..6].iter().rev() {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_scalef_ps(p, n)
    }

    /// 1 / (1 + 2^t): the reciprocal's 14-bit estimate and one Newton step (about 2⁻²³ relative),
    /// in place of a division whose latency the cells' chain of σ would wait on. t is clamped
    /// to ±120, where the result is already 0 or 1 to f32 precision.
    #[target_feature(enable = "avx512f,fma")]
    #[inline]
    fn logistic_of_exp2(t: __m512) -> __m512 {
        let t = _mm512_min_ps(
            _mm512_max_ps(t, _mm512_set1_ps(-120.0)),
            _mm512_set1_ps(120.0),
        );
        let d = _mm512_add_ps(_mm512_set1_ps(1.0), exp2(t));
        let y = _mm512_rcp14_ps(d);
        let e = _mm512_fnmadd_ps(d, y, _mm512_set1_ps(1.0));
        _mm512_fmadd_ps(y, e, y)
    }

    /// σ(x) = 1 / (1 + 2^(−x·log₂e)).
    #[target_feature(enable = "avx512f,fma")]
    #[inline]
    pub(super) fn sigmoid(x: __m512) -> __m512 {
        logistic_of_exp2(_mm512_mul_ps(x, _mm512_set1_ps(-std::f32::consts::LOG2_E)))
    }

    /// tanh(x) = 2σ(2x) − 1.
    #[target_feature(enable = "avx512f,fma")]
    #[inline]
    pub(super) fn tanh(x: __m512) -> __m512 {
        let s = logistic_of_exp2(_mm512_mul_ps(
            x,
            _mm512_set1_ps(-2.0 * std::f32::consts::LOG2_E),
        ));
        _mm512_fmsub_ps(_mm512_set1_ps(2.0), s, _mm512_set1_ps(1.0))
    }

    /// acc[r] += Σ_j x[r·stride + j] · w[j] over j < `k`, w's rows being V vectors wide.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `x` holds R rows `stride` apart of `k` values, `w` k rows of V·16.
    #[target_feature(enable = "avx512f,fma")]
    #[inline]
    unsafe fn accumulate<const R: usize, const V: usize>(
        acc: &mut [[__m512; V]; R],
        x: *const f32,
        stride: usize,
        w: *const f32,
        k: usize,
    ) {
        // SAFETY: the caller's.
        unsafe {
            for j in 0..k {
                let row = w.add(j * V * 16);
                let wv: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(row.add(16 * v)));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let xv = _mm512_set1_ps(*x.add(r * stride + j));
                    for (acc, &wv) in acc.iter_mut().zip(&wv) {
                        *acc = _mm512_fmadd_ps(xv, wv, *acc);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::super::reference::{self, Params, Shape};
    use super::super::tests::{assert_gradient_is_the_references, reference_nll_gradient};
    use super::super::{flatten, unflatten};
    use super::*;
    use crate::kernels::Isa;

    /// The vector σ and tanh against f64 over the range the gates take and past both ends.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn sigmoid_and_tanh_match_f64() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            eprintln!("skipping the AVX-512 σ: this CPU lacks AVX-512");
            return;
        }
        let grid: Vec<f32> = (-4000..=4000).map(|k| k as f32 * 0.025).collect();
        for xs in grid.chunks_exact(16) {
            // SAFETY: the CPU has AVX-512F (checked above).
            let (s, t) = unsafe {
                use std::arch::x86_64::*;
                let x = _mm512_loadu_ps(xs.as_ptr());
                let (mut s, mut t) = ([0f32; 16], [0f32; 16]);
                _mm512_storeu_ps(s.as_mut_ptr(), x86::sigmoid(x));
                _mm512_storeu_ps(t.as_mut_ptr(), x86::tanh(x));
                (s, t)
            };
            for ((&x, s), t) in xs.iter().zip(s).zip(t) {
                let x = f64::from(x);
                let (want_s, want_t) = (1.0 / (1.0 + (-x).exp()), x.tanh());
                // Relative to σ, growing with |x| as the f32 product x·log₂e rounds (absolute,
                // which is what the gates feel, it stays below 2⁻²³).
                assert!(
                    (f64::from(s) - want_s).abs() <= 2e-7 * (1.0 + x.abs()) * want_s + 1e-30,
                    "σ({x}) = {s} vs {want_s}"
                );
                assert!(
                    (f64::from(t) - want_t).abs() <= 2.5e-7,
                    "tanh({x}) = {t} vs {want_t}"
                );
            }
        }
    }

    /// Widths 1 to 13 give every tile size (1 to 6 pixels) and every remainder after full
    /// tiles; 10 images are a full chunk and a partial one; skip connections on and off. The
    /// fused layers' log-likelihoods, the logits of a pass over the first rows only
    /// (sampling's), and the gradient (whose forward pass keeps the fused layers' activations)
    /// are the f64 reference's.
    #[test]
    fn fused_rows_match_the_reference_at_every_width() {
        let Some(isa) = Isa::available()
            .into_iter()
            .find(|i| i.target() == Target::Avx512)
        else {
            eprintln!("skipping the fused Row LSTM: this CPU lacks AVX-512");
            return;
        };
        let (n, height) = (10, 3);
        for width in 1..=13 {
            for skip in [false, true] {
                let shape = Shape {
                    architecture: Architecture::RowLstm,
                    hidden: H,
                    layers: 2,
                    channels: 1,
                    levels: 2,
                    skip,
                };
                let mut flat = flatten(&Params::random(shape, 0.5, width as u64));
                shape.apply_mask(&mut flat);
                let p = unflatten(shape, &flat);
                let net = Net {
                    shape,
                    params: &flat,
                    height,
                    width,
                    isa,
                    pool_grid: 1,
                };
                assert!(applies(&net));
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(width as u64);
                let d = height * width;
                let x: Vec<u8> = (0..n * d).map(|_| u8::from(rng.random_bool(0.4))).collect();
                let mut ll = vec![0.0; n];
                net.log_likelihood(&x, &mut ll, None);
                let mut logits = vec![f32::NAN; n * d];
                net.logits_up_to(&x, 2, &mut logits);
                for (i, (image, got)) in x.chunks_exact(d).zip(&ll).enumerate() {
                    let want = reference::log_likelihood(&p, image, height, width);
                    assert!(
                        (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "width {width}, skip {skip}, image {i}: {got} vs {want}"
                    );
                    let want = reference::logits(&p, image, height, width);
                    for (k, want) in want[..2 * width].iter().enumerate() {
                        let got = f64::from(logits[i * d + k]);
                        assert!(
                            (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "width {width}, skip {skip}, image {i}, logit {k}: {got} vs {want}"
                        );
                    }
                }
                let (want_ll, want) =
                    reference_nll_gradient(&p, &x, n, (height, width), flat.len());
                assert_gradient_is_the_references(
                    &net,
                    &x,
                    (&want_ll, &want),
                    &format!("width {width}, skip {skip}"),
                );
            }
        }
    }
}
