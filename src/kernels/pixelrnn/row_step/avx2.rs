//! The fused Row LSTM tile on AVX2. Sixteen 8-lane registers cannot hold a tile's 4h gates,
//! so the tile runs gate by gate: the products of one gate (16 values, two registers a pixel)
//! for all its pixels, then that gate's nonlinearity, into a small buffer in L1 (or, when
//! the pass keeps activations, straight where the backward pass reads them); then the cells,
//! the outputs and the 1×1 back to 2h. Pixels go in fours whose products share terms
//! ([`quad_tile`]), which takes 4h multiply-adds per gate and pixel instead of 7h; the 1 to 3
//! a row of width not a multiple of 4 leaves over take the taps directly ([`leftover`]). Its σ
//! and tanh build 2ˣ from integer operations.

use std::arch::x86_64::*;

use super::{Args, EXP2_SERIES, F, GATES, H, QUAD_POINTS, tile_of};

/// Fours of pixels per tile: 6 × 2 accumulators, 2 weight vectors and a broadcast fill 15 of
/// the 16 registers.
const TILE: usize = 6;

/// [`Tiles`](super::Tiles) for AVX2: up to [`TILE`] fours of pixels (what is left of the row,
/// in near-equal blocks), or the 1 to 3 pixels left over at its end.
///
/// # Safety
/// As [`Tiles`](super::Tiles); the CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn tiles(q: usize, pixels: usize, a: Args) -> usize {
    // SAFETY: the caller's.
    unsafe {
        let quads = pixels / 4;
        if quads > 0 {
            let block = quads.div_ceil(quads.div_ceil(TILE));
            tile_of!(quad_tile, block, q, a);
            return 4 * block;
        }
        match pixels {
            1 => leftover::<1>(q, a),
            2 => leftover::<2>(q, a),
            _ => leftover::<3>(q, a),
        }
        pixels.min(3)
    }
}

/// The last R pixels of a row, from map row q, too few (1 to 3) to make a four: each gate's
/// products straight from the taps, then their cells, outputs and next features.
///
/// # Safety
/// The CPU has AVX2 and FMA; map rows q − 1 .. q + R + 1 lie within the row.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn leftover<const R: usize>(q: usize, a: Args) {
    // SAFETY (all accesses): the caller's.
    unsafe {
        // The activated gates (o, f, i, g), 4h a pixel. The scratch is read only where the
        // gates' pass below has written it, so it needs no zeroing.
        let mut scratch = std::mem::MaybeUninit::<[f32; 3 * GATES]>::uninit();
        let act = if a.gates.is_null() {
            scratch.as_mut_ptr().cast::<f32>()
        } else {
            a.gates.add(q * GATES)
        };
        for gate in 0..4 {
            let column = gate * H;
            let bias = [0, 8].map(|v| _mm256_loadu_ps(a.bias.add(column + v)));
            let mut acc = [bias; R];
            // Input-to-state: taps dx = −1, 0 are map rows q + r − 1 and q + r, 2·2h contiguous
            // values.
            let x = a.x.add((q - 1) * F);
            accumulate(&mut acc, x, F, a.w_in.add(column), GATES, 2 * F);
            // State-to-state: the row above at dx = −1, 0, +1, 3h contiguous values.
            if !a.h_above.is_null() {
                let h_above = a.h_above.add((q - 1) * H);
                accumulate(&mut acc, h_above, H, a.w_state.add(column), GATES, 3 * H);
            }
            for (r, acc) in acc.iter().enumerate() {
                activate(gate, acc, act.add(r * GATES + column));
            }
        }
        cells(q, R, act, a);
        next_features::<R>(q, a);
    }
}

/// R fours of pixels from map row q on (pixels c … c + 3 for c = q + 4j), by Winograd's
/// F(4, 3) over the points of [`QUAD_FILTER`](super::QUAD_FILTER): per four, five products of
/// K = 3h (the input and the row above at the same point) and one of K = h (the row above at
/// ∞, which the input's two taps do not reach), 16h multiply-adds per gate where the taps take
/// 4 · 7h. With d₀ … d₅ the input's (and the row above's) values at columns c − 1 … c + 4, each
/// point's transformed values are
///
/// - t₀ = 4d₀ − 5d₂ + d₄,  t₁ = d₃ + d₄ − 4(d₁ + d₂),  t₂ = d₄ − d₃ + 4(d₁ − d₂),
/// - t₃ = d₄ − d₂ + 2(d₃ − d₁),  t₄ = d₄ − d₂ − 2(d₃ − d₁),  t₅ = 4d₁ − 5d₃ + d₅ (row above only),
///
/// the products are m_k = t_k · U_k against the transformed weights U_k of [`Quads`](super::Quads),
/// and the four pixels' pre-activations (bias added through m₁, which all four take once)
///
/// - z_c = m₀ + m₁ + m₂ + m₃ + m₄,  z_{c+1} = m₁ − m₂ + 2(m₃ − m₄),
/// - z_{c+2} = m₁ + m₂ + 4(m₃ + m₄),  z_{c+3} = m₁ − m₂ + 8(m₃ − m₄) + m₅,
///
/// which expand to the direct z = x_{−1}·W₋₁ + x₀·W₀ + Σ_t s_t·V_t at each pixel.
///
/// # Safety
/// The CPU has AVX2 and FMA; map rows q − 1 .. q + 4R + 1 lie within the row.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn quad_tile<const R: usize>(q: usize, a: Args) {
    /// K of a point's product: the input's 2h values, then the row above's h.
    const K: usize = 3 * H;
    // SAFETY (all accesses): the caller's.
    unsafe {
        let mut scratch = std::mem::MaybeUninit::<[f32; 4 * TILE * GATES]>::uninit();
        let act = if a.gates.is_null() {
            scratch.as_mut_ptr().cast::<f32>()
        } else {
            a.gates.add(q * GATES)
        };
        // Transformed values, point by point, four by four: K each. Read only where written
        // (the input's part at ∞ never is).
        let mut transformed = std::mem::MaybeUninit::<[f32; QUAD_POINTS * TILE * K]>::uninit();
        let t = transformed.as_mut_ptr().cast::<f32>();
        let at = |k: usize, j: usize| t.add((k * TILE + j) * K);
        let above = !a.h_above.is_null();
        for j in 0..R {
            let c = q + 4 * j;
            let x = a.x.add((c - 1) * F);
            for v in (0..F).step_by(8) {
                let d: [__m256; 5] = std::array::from_fn(|i| _mm256_loadu_ps(x.add(i * F + v)));
                for (k, t) in transform(&d).into_iter().enumerate() {
                    _mm256_storeu_ps(at(k, j).add(v), t);
                }
            }
            if above {
                let s = a.h_above.add((c - 1) * H);
                for v in (0..H).step_by(8) {
                    let d: [__m256; 6] = std::array::from_fn(|i| _mm256_loadu_ps(s.add(i * H + v)));
                    let finite = transform(&[d[0], d[1], d[2], d[3], d[4]]);
                    for (k, t) in finite.into_iter().enumerate() {
                        _mm256_storeu_ps(at(k, j).add(F + v), t);
                    }
                    let infinity = _mm256_fmadd_ps(
                        _mm256_set1_ps(4.0),
                        d[1],
                        _mm256_fmadd_ps(_mm256_set1_ps(-5.0), d[3], d[5]),
                    );
                    _mm256_storeu_ps(at(5, j).add(F + v), infinity);
                }
            }
        }
        let mut products = std::mem::MaybeUninit::<[f32; QUAD_POINTS * TILE * H]>::uninit();
        let m = products.as_mut_ptr().cast::<f32>();
        for gate in 0..4 {
            let column = gate * H;
            let bias = [0, 8].map(|v| _mm256_loadu_ps(a.bias.add(column + v)));
            let w = a.w_quads.add(gate * QUAD_POINTS * K * H);
            for k in 0..QUAD_POINTS {
                let mut acc = [if k == 1 {
                    bias
                } else {
                    [_mm256_setzero_ps(); 2]
                }; R];
                let w = w.add(k * K * H);
                // At ∞ only the row above has a product (its h rows after the input's 2h); the
                // first row has no row above.
                let state = if above { H } else { 0 };
                if k == QUAD_POINTS - 1 {
                    accumulate(&mut acc, at(k, 0).add(F), K, w.add(F * H), H, state);
                } else {
                    accumulate(&mut acc, at(k, 0), K, w, H, F + state);
                }
                for (j, acc) in acc.iter().enumerate() {
                    for (v, &acc) in acc.iter().enumerate() {
                        _mm256_storeu_ps(m.add((k * TILE + j) * H + 8 * v), acc);
                    }
                }
            }
            for j in 0..R {
                // The four pixels' pre-activations, for each half of the gate's 16 values.
                let [low, high] = [0, 8].map(|v| {
                    let [m0, m1, m2, m3, m4, m5] =
                        std::array::from_fn(|k| _mm256_loadu_ps(m.add((k * TILE + j) * H + v)));
                    let (sum12, diff12) = (_mm256_add_ps(m1, m2), _mm256_sub_ps(m1, m2));
                    let (sum34, diff34) = (_mm256_add_ps(m3, m4), _mm256_sub_ps(m3, m4));
                    let [two, four, eight] = [2.0, 4.0, 8.0].map(|c| _mm256_set1_ps(c));
                    [
                        _mm256_add_ps(_mm256_add_ps(m0, sum12), sum34),
                        _mm256_fmadd_ps(two, diff34, diff12),
                        _mm256_fmadd_ps(four, sum34, sum12),
                        _mm256_add_ps(_mm256_fmadd_ps(eight, diff34, diff12), m5),
                    ]
                });
                for (i, (&low, &high)) in low.iter().zip(&high).enumerate() {
                    activate(gate, &[low, high], act.add((4 * j + i) * GATES + column));
                }
            }
        }
        cells(q, 4 * R, act, a);
        for i in 0..4 {
            next_features::<R>(q + i * R, a);
        }
    }
}

/// The transformed values t₀ … t₄ of [`quad_tile`] from d₀ … d₄.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn transform(d: &[__m256; 5]) -> [__m256; 5] {
    let [d0, d1, d2, d3, d4] = *d;
    let [two, four, minus_five] = [2.0, 4.0, -5.0].map(|c| _mm256_set1_ps(c));
    let (sum12, diff12) = (_mm256_add_ps(d1, d2), _mm256_sub_ps(d1, d2));
    let (d4_minus_d2, diff31) = (_mm256_sub_ps(d4, d2), _mm256_sub_ps(d3, d1));
    [
        _mm256_fmadd_ps(four, d0, _mm256_fmadd_ps(minus_five, d2, d4)),
        _mm256_fnmadd_ps(four, sum12, _mm256_add_ps(d3, d4)),
        _mm256_fmadd_ps(four, diff12, _mm256_sub_ps(d4, d3)),
        _mm256_fmadd_ps(two, diff31, d4_minus_d2),
        _mm256_fnmadd_ps(two, diff31, d4_minus_d2),
    ]
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

/// acc[r] += Σ_j x[r·stride + j] · w[j·w_stride ..][..16] over j < `k`. For R ≤ 3 the 2R
/// running sums alone would leave the FMA units waiting on each other's latency, so even and
/// odd j go to separate sums, added at the end (at R ≥ 4 that many sums spill registers).
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
    // SAFETY (all accesses): the caller's.
    unsafe {
        let term = |sums: &mut [[__m256; 2]; R], j: usize| {
            let row = w.add(j * w_stride);
            let wv = [_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(8))];
            for (r, sum) in sums.iter_mut().enumerate() {
                let xv = _mm256_set1_ps(*x.add(r * stride + j));
                sum[0] = _mm256_fmadd_ps(xv, wv[0], sum[0]);
                sum[1] = _mm256_fmadd_ps(xv, wv[1], sum[1]);
            }
        };
        if R > 3 {
            (0..k).for_each(|j| term(acc, j));
            return;
        }
        let mut odd = [[_mm256_setzero_ps(); 2]; R];
        for j in (0..k - k % 2).step_by(2) {
            term(acc, j);
            term(&mut odd, j + 1);
        }
        if k % 2 == 1 {
            term(acc, k - 1);
        }
        for (sum, odd) in acc.iter_mut().zip(&odd) {
            sum[0] = _mm256_add_ps(sum[0], odd[0]);
            sum[1] = _mm256_add_ps(sum[1], odd[1]);
        }
    }
}
