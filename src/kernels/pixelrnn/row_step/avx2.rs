//! The fused Row LSTM tile on AVX2. Sixteen 8-lane registers cannot hold a tile's 4h gates,
//! so the tile runs gate by gate: the products of one gate (16 values, two registers a pixel)
//! for all its pixels, then that gate's nonlinearity, into a small buffer in L1 (or, when
//! the pass keeps activations, straight where the backward pass reads them); then the cells,
//! the outputs and the 1×1 back to 2h. Its σ and tanh build 2ˣ from integer operations.

use std::arch::x86_64::*;

use super::{Args, EXP2_SERIES, F, GATES, H, tile_of};

/// Pixels per tile: 6 × 2 accumulators, 2 weight vectors and a broadcast fill 15 of the 16
/// registers.
const TILE: usize = 6;

/// [`Tiles`](super::Tiles) for AVX2: up to [`TILE`] pixels.
///
/// # Safety
/// As [`Tiles`](super::Tiles); the CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn tiles(q: usize, pixels: usize, a: Args) -> usize {
    // SAFETY: the caller's.
    unsafe {
        tile_of!(tile, pixels.min(TILE), q, a);
    }
    pixels.clamp(1, TILE)
}

/// Pixels at map rows q .. q + R of the row: gate by gate, then their cells, outputs and next
/// features.
///
/// # Safety
/// The CPU has AVX2 and FMA; map rows q − 1 .. q + R + 1 lie within the row.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile<const R: usize>(q: usize, a: Args) {
    // SAFETY (all accesses): the caller's.
    unsafe {
        // The activated gates (o, f, i, g) of each pixel, 4h apart. The scratch is read only
        // where the gates' pass below has written it, so it needs no zeroing.
        let mut scratch = std::mem::MaybeUninit::<[f32; TILE * GATES]>::uninit();
        let act = if a.gates.is_null() {
            scratch.as_mut_ptr().cast::<f32>()
        } else {
            a.gates.add(q * GATES)
        };
        for gate in 0..4 {
            let column = gate * H;
            let bias = [0, 8].map(|v| _mm256_loadu_ps(a.bias.add(column + v)));
            let mut acc = [bias; R];
            // Input-to-state: taps dx = −1, 0 are map rows q − 1 and q, 2·2h contiguous values.
            accumulate(
                &mut acc,
                a.x.add((q - 1) * F),
                F,
                a.w_in.add(column),
                GATES,
                2 * F,
            );
            // State-to-state: the row above at dx = −1, 0, +1, 3h contiguous values.
            if !a.h_above.is_null() {
                let h_above = a.h_above.add((q - 1) * H);
                accumulate(&mut acc, h_above, H, a.w_state.add(column), GATES, 3 * H);
            }
            for (r, acc) in acc.iter().enumerate() {
                for (v, &z) in acc.iter().enumerate() {
                    let y = if gate == 3 { tanh(z) } else { sigmoid(z) };
                    _mm256_storeu_ps(act.add(r * GATES + column + 8 * v), y);
                }
            }
        }
        for r in 0..R {
            let (gates, m) = (act.add(r * GATES), (q + r) * H);
            for v in [0, 8] {
                let [o, f, i, g] = [0, 1, 2, 3].map(|k| _mm256_loadu_ps(gates.add(k * H + v)));
                let c_prev = if a.c_above.is_null() {
                    _mm256_setzero_ps()
                } else {
                    _mm256_loadu_ps(a.c_above.add(m + v))
                };
                let c = _mm256_fmadd_ps(f, c_prev, _mm256_mul_ps(i, g));
                let tc = tanh(c);
                _mm256_storeu_ps(a.cell.add(m + v), c);
                _mm256_storeu_ps(a.hidden.add(m + v), _mm256_mul_ps(o, tc));
                if !a.tanh_cell.is_null() {
                    _mm256_storeu_ps(a.tanh_cell.add(m + v), tc);
                }
            }
        }
        // next = input + 1×1(output) + bias, in two halves of h features.
        for half in [0, H] {
            let bias = [0, 8].map(|v| _mm256_loadu_ps(a.out_bias.add(half + v)));
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = a.x.add((q + r) * F + half);
                *acc = [0, 1].map(|v| _mm256_add_ps(_mm256_loadu_ps(x.add(8 * v)), bias[v]));
            }
            accumulate(&mut acc, a.hidden.add(q * H), H, a.w_out.add(half), F, H);
            for (r, acc) in acc.iter().enumerate() {
                for (v, acc) in acc.iter().enumerate() {
                    _mm256_storeu_ps(a.next.add((q + r) * F + half + 8 * v), *acc);
                }
            }
        }
    }
}

/// 2^t for t in [−126, 126]: 2^(t − n) by its degree-6 series around 0 (|t − n| ≤ ½, error
/// below 2⁻²³ relative), times 2^n built in the exponent field.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn exp2(t: __m256) -> __m256 {
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
    let r = _mm256_sub_ps(t, n);
    let mut p = _mm256_set1_ps(EXP2_SERIES[6]);
    for &c in EXP2_SERIES[..6].iter().rev() {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let scale = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_mul_ps(p, _mm256_castsi256_ps(scale))
}

/// 1 / (1 + 2^t): the reciprocal's 12-bit estimate and one Newton step (about 2⁻²² relative),
/// in place of a division. t is clamped to ±120, where the result is already 0 or 1 to f32
/// precision.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn logistic_of_exp2(t: __m256) -> __m256 {
    let t = _mm256_min_ps(
        _mm256_max_ps(t, _mm256_set1_ps(-120.0)),
        _mm256_set1_ps(120.0),
    );
    let d = _mm256_add_ps(_mm256_set1_ps(1.0), exp2(t));
    let y = _mm256_rcp_ps(d);
    let e = _mm256_fnmadd_ps(d, y, _mm256_set1_ps(1.0));
    _mm256_fmadd_ps(y, e, y)
}

/// σ(x) = 1 / (1 + 2^(−x·log₂e)).
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(super) fn sigmoid(x: __m256) -> __m256 {
    logistic_of_exp2(_mm256_mul_ps(x, _mm256_set1_ps(-std::f32::consts::LOG2_E)))
}

/// tanh(x) = 2σ(2x) − 1.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(super) fn tanh(x: __m256) -> __m256 {
    let s = logistic_of_exp2(_mm256_mul_ps(
        x,
        _mm256_set1_ps(-2.0 * std::f32::consts::LOG2_E),
    ));
    _mm256_fmsub_ps(_mm256_set1_ps(2.0), s, _mm256_set1_ps(1.0))
}

/// acc[r] += Σ_j x[r·stride + j] · w[j·w_stride ..][..16] over j < `k`.
///
/// # Safety
/// The CPU has AVX2 and FMA; `x` holds R rows `stride` apart of `k` values, `w` k rows
/// `w_stride` apart of 16.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn accumulate<const R: usize>(
    acc: &mut [[__m256; 2]; R],
    x: *const f32,
    stride: usize,
    w: *const f32,
    w_stride: usize,
    k: usize,
) {
    // SAFETY: the caller's.
    unsafe {
        for j in 0..k {
            let row = w.add(j * w_stride);
            let wv = [_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(8))];
            for (r, acc) in acc.iter_mut().enumerate() {
                let xv = _mm256_set1_ps(*x.add(r * stride + j));
                acc[0] = _mm256_fmadd_ps(xv, wv[0], acc[0]);
                acc[1] = _mm256_fmadd_ps(xv, wv[1], acc[1]);
            }
        }
    }
}
