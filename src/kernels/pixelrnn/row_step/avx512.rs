//! The fused Row LSTM tile on AVX-512: a tile's pixels hold their four gates in one register
//! each, so the gates go from the products to the cells without leaving registers. Its σ and
//! tanh scale 2ˣ in one instruction (`vscalefps`).

use std::arch::x86_64::*;

use super::{Args, EXP2_SERIES, F, H, tile_of};

/// Pixels per tile: 6 × 4 accumulators and the 4 weight vectors fill 28 of the 32
/// registers.
const TILE: usize = 6;

/// [`Tiles`](super::Tiles) for AVX-512: up to [`TILE`] pixels.
///
/// # Safety
/// As [`Tiles`](super::Tiles); the CPU has AVX-512F.
#[target_feature(enable = "avx512f,fma")]
pub(super) unsafe fn tiles(q: usize, pixels: usize, a: Args) -> usize {
    // SAFETY: the caller's.
    unsafe {
        tile_of!(tile, pixels.min(TILE), q, a);
    }
    pixels.clamp(1, TILE)
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
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
    let r = _mm512_sub_ps(t, n);
    let mut p = _mm512_set1_ps(EXP2_SERIES[6]);
    for &c in EXP2_SERIES[..6].iter().rev() {
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
