//! The fused Row LSTM tile on AVX2. Sixteen 8-lane registers cannot hold a tile's 4h gates,
//! so the tile runs gate by gate: the products of one gate (16 values, two registers a pixel)
//! for all its pixels, then that gate's nonlinearity, into a small buffer in L1 (or, when
//! the pass keeps activations, straight where the backward pass reads them); then the cells,
//! the outputs and the 1×1 back to 2h. Pixels go in pairs whose products share terms
//! ([`pair_tile`]), which takes 5h multiply-adds per gate and pixel instead of 7h; a row of
//! odd width ends with one pixel alone ([`pixel`]). Its σ and tanh build 2ˣ from integer
//! operations.

use std::arch::x86_64::*;

use super::{Args, EXP2_SERIES, F, GATES, H, tile_of};

/// Pixels, or pairs of pixels, per tile: 6 × 2 accumulators, 2 weight vectors and a broadcast
/// fill 15 of the 16 registers.
const TILE: usize = 6;

/// [`Tiles`](super::Tiles) for AVX2: up to [`TILE`] pairs of pixels (what is left of the row,
/// in near-equal blocks), or a last pixel of odd count alone.
///
/// # Safety
/// As [`Tiles`](super::Tiles); the CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn tiles(q: usize, pixels: usize, a: Args) -> usize {
    let pairs = pixels / 2;
    // SAFETY: the caller's.
    unsafe {
        if pairs == 0 {
            pixel(q, a);
            return 1;
        }
        let block = pairs.div_ceil(pairs.div_ceil(TILE));
        tile_of!(pair_tile, block, q, a);
        2 * block
    }
}

/// The pixel at map row q alone, each gate's products straight from the taps, then its cell,
/// output and next features: the last pixel of a row of odd width.
///
/// # Safety
/// The CPU has AVX2 and FMA; map rows q − 1 .. q + 2 lie within the row.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn pixel(q: usize, a: Args) {
    // SAFETY (all accesses): the caller's.
    unsafe {
        // The activated gates (o, f, i, g), 4h. The scratch is read only where the gates' pass
        // below has written it, so it needs no zeroing.
        let mut scratch = std::mem::MaybeUninit::<[f32; GATES]>::uninit();
        let act = if a.gates.is_null() {
            scratch.as_mut_ptr().cast::<f32>()
        } else {
            a.gates.add(q * GATES)
        };
        for gate in 0..4 {
            let column = gate * H;
            let bias = [0, 8].map(|v| _mm256_loadu_ps(a.bias.add(column + v)));
            let mut acc = [bias];
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
            activate(gate, &acc[0], act.add(column));
        }
        cells(q, 1, act, a);
        next_features::<1>(q, a);
    }
}

/// R pairs of pixels from map row q on (pixels q + 2j and q + 2j + 1), by minimal filtering:
/// per pair, three products of the input (K = 2h) and four of the row above (K = h) where the
/// taps take four and six (K = 5h per pixel instead of 7h). With W₋₁, W₀ the input taps,
/// V₋₁, V₀, V₊₁ the state taps, x the layer's input and s the row above's outputs at columns
/// c − 1 … c + 2 (c = q + 2j):
///
/// - shared  = x_c·(W₋₁ + W₀) + (s_c + s_{c+1})·(V₋₁ + V₀ + V₊₁)/2
/// - odd     = (s_{c+1} − s_c)·(V₋₁ − V₀ + V₊₁)/2
/// - z_c     = bias + shared + odd + (x_{c−1} − x_c)·W₋₁ + (s_{c−1} − s_{c+1})·V₋₁
/// - z_{c+1} = bias + shared − odd + (x_{c+1} − x_c)·W₀ + (s_{c+2} − s_c)·V₊₁
///
/// which expand to the direct z_c = x_{c−1}·W₋₁ + x_c·W₀ + Σ_t s_{c+t}·V_t (the Toom–Cook
/// F(2, 2) and Winograd F(2, 3) algorithms sharing their middle products).
///
/// # Safety
/// The CPU has AVX2 and FMA; map rows q − 1 .. q + 2R + 1 lie within the row.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn pair_tile<const R: usize>(q: usize, a: Args) {
    // SAFETY (all accesses): the caller's.
    unsafe {
        let mut scratch = std::mem::MaybeUninit::<[f32; 2 * TILE * GATES]>::uninit();
        let act = if a.gates.is_null() {
            scratch.as_mut_ptr().cast::<f32>()
        } else {
            a.gates.add(q * GATES)
        };
        // The pairs' transformed inputs: x_{c−1} − x_c and x_{c+1} − x_c (2h each), and of the
        // row above s_{c−1} − s_{c+1}, s_c + s_{c+1}, s_{c+1} − s_c, s_{c+2} − s_c (h each). Read
        // only where written.
        let mut sides = std::mem::MaybeUninit::<[f32; 2 * TILE * F]>::uninit();
        let mut state = std::mem::MaybeUninit::<[f32; 4 * TILE * H]>::uninit();
        let [left, right] = [0, 1].map(|k| sides.as_mut_ptr().cast::<f32>().add(k * TILE * F));
        let s = [0, 1, 2, 3].map(|k| state.as_mut_ptr().cast::<f32>().add(k * TILE * H));
        let above = !a.h_above.is_null();
        for j in 0..R {
            let x = a.x.add((q + 2 * j) * F);
            for v in (0..F).step_by(8) {
                let [before, here, after] =
                    [x.sub(F), x, x.add(F)].map(|p| _mm256_loadu_ps(p.add(v)));
                _mm256_storeu_ps(left.add(j * F + v), _mm256_sub_ps(before, here));
                _mm256_storeu_ps(right.add(j * F + v), _mm256_sub_ps(after, here));
            }
            if above {
                let h = a.h_above.add((q + 2 * j - 1) * H);
                for v in (0..H).step_by(8) {
                    let [d0, d1, d2, d3] = [0, 1, 2, 3].map(|k| _mm256_loadu_ps(h.add(k * H + v)));
                    let at = j * H + v;
                    _mm256_storeu_ps(s[0].add(at), _mm256_sub_ps(d0, d2));
                    _mm256_storeu_ps(s[1].add(at), _mm256_add_ps(d1, d2));
                    _mm256_storeu_ps(s[2].add(at), _mm256_sub_ps(d2, d1));
                    _mm256_storeu_ps(s[3].add(at), _mm256_sub_ps(d3, d1));
                }
            }
        }
        // Each product's weights: 2h input rows, then h state rows.
        let state_rows = F * GATES;
        for gate in 0..4 {
            let column = gate * H;
            let zero = [_mm256_setzero_ps(); 2];
            let mut shared = [zero; R];
            let w = a.w_pair_shared.add(column);
            accumulate(&mut shared, a.x.add(q * F), 2 * F, w, GATES, F);
            let mut odd = [zero; R];
            if above {
                accumulate(&mut shared, s[1], H, w.add(state_rows), GATES, H);
                accumulate(&mut odd, s[2], H, a.w_pair_odd.add(column), GATES, H);
            }
            let bias = [0, 8].map(|v| _mm256_loadu_ps(a.bias.add(column + v)));
            for (side, inputs, state, w) in [
                (0, left, s[0], a.w_pair_left.add(column)),
                (1, right, s[3], a.w_pair_right.add(column)),
            ] {
                let mut acc = [bias; R];
                accumulate(&mut acc, inputs, F, w, GATES, F);
                if above {
                    accumulate(&mut acc, state, H, w.add(state_rows), GATES, H);
                }
                for (j, acc) in acc.iter().enumerate() {
                    let z = [0, 1].map(|v| {
                        let with_shared = _mm256_add_ps(acc[v], shared[j][v]);
                        if side == 0 {
                            _mm256_add_ps(with_shared, odd[j][v])
                        } else {
                            _mm256_sub_ps(with_shared, odd[j][v])
                        }
                    });
                    activate(gate, &z, act.add((2 * j + side) * GATES + column));
                }
            }
        }
        cells(q, 2 * R, act, a);
        next_features::<R>(q, a);
        next_features::<R>(q + R, a);
    }
}

/// Gate `gate`'s nonlinearity (σ, or tanh for g) of 16 pre-activations, stored at `out`.
///
/// # Safety
/// The CPU has AVX2 and FMA; `out` holds 16 values.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn activate(gate: usize, z: &[__m256; 2], out: *mut f32) {
    for (v, &z) in z.iter().enumerate() {
        let y = if gate == 3 { tanh(z) } else { sigmoid(z) };
        // SAFETY: the caller's.
        unsafe { _mm256_storeu_ps(out.add(8 * v), y) };
    }
}

/// The cells and outputs of the `pixels` pixels from map row q on, from their activated gates
/// `act` (4h apart).
///
/// # Safety
/// The CPU has AVX2 and FMA; `act` holds the pixels' gates, and their map rows lie in the row.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn cells(q: usize, pixels: usize, act: *const f32, a: Args) {
    // SAFETY (all accesses): the caller's.
    unsafe {
        for r in 0..pixels {
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
    }
}

/// next = input + 1×1(output) + bias of the R pixels from map row q on, in two halves of h
/// features.
///
/// # Safety
/// The CPU has AVX2 and FMA; the pixels' outputs are written and their map rows lie in the row.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn next_features<const R: usize>(q: usize, a: Args) {
    // SAFETY (all accesses): the caller's.
    unsafe {
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
