//! Branch-free f32 elementary functions that vectorize: exp, σ, log σ, and the multiply-add
//! that becomes one FMA instruction where the target has it.
//!
//! Accuracy: relative error below 3e-7 for `exp` over its whole range, so σ and log σ are good
//! to a few f32 ulps; the tests compare against f64 libm.

/// Vector width (in f32) the kernels' loops are written for; hidden layers are padded to it.
pub const LANES: usize = 16;

/// What a kernel body is compiled for: whether it may fuse multiply-adds, and the one
/// operation LLVM does not vectorize well by itself (a float sum reduction), written with the
/// target's intrinsics.
///
/// Only the `dispatch!` wrappers instantiate bodies with [`Avx2`] or [`Avx512`], inside
/// functions compiled for those features and called only when the CPU has them.
pub trait Target {
    /// Whether `a·b + c` may be one FMA instruction.
    const FMA: bool;

    /// Σ a_k b_k over two slices of equal length, a multiple of [`LANES`].
    fn dot(a: &[f32], b: &[f32]) -> f32;
}

/// Any CPU: what the baseline target vectorizes, without FMA.
pub struct Portable;

/// x86-64 with AVX2 and FMA.
pub struct Avx2;

/// x86-64 with AVX-512F.
pub struct Avx512;

impl Target for Portable {
    const FMA: bool = false;

    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        // Four independent partial sums per lane so the adds pipeline.
        let mut acc = [[0f32; 4]; 4];
        for (x, y) in a.chunks_exact(16).zip(b.chunks_exact(16)) {
            for (w, acc) in acc.iter_mut().enumerate() {
                for l in 0..4 {
                    acc[l] += x[4 * w + l] * y[4 * w + l];
                }
            }
        }
        acc.iter().flatten().sum()
    }
}

#[cfg(target_arch = "x86_64")]
impl Target for Avx2 {
    const FMA: bool = true;

    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: only reached from functions compiled for, and called on, AVX2 + FMA CPUs.
        unsafe { x86::dot_avx2(a, b) }
    }
}

#[cfg(target_arch = "x86_64")]
impl Target for Avx512 {
    const FMA: bool = true;

    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: only reached from functions compiled for, and called on, AVX-512F CPUs.
        unsafe { x86::dot_avx512(a, b) }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Dot product with four 8-lane accumulators; `a.len()` is a multiple of 16.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        assert!(a.len() == b.len() && a.len().is_multiple_of(16));
        let (pa, pb, n) = (a.as_ptr(), b.as_ptr(), a.len());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut k = 0;
        // SAFETY (all loads): k + 8·j + 8 ≤ n by the loop bounds.
        unsafe {
            while k + 32 <= n {
                for (j, acc) in acc.iter_mut().enumerate() {
                    let x = _mm256_loadu_ps(pa.add(k + 8 * j));
                    let y = _mm256_loadu_ps(pb.add(k + 8 * j));
                    *acc = _mm256_fmadd_ps(x, y, *acc);
                }
                k += 32;
            }
            if k < n {
                acc[0] = _mm256_fmadd_ps(
                    _mm256_loadu_ps(pa.add(k)),
                    _mm256_loadu_ps(pb.add(k)),
                    acc[0],
                );
                acc[1] = _mm256_fmadd_ps(
                    _mm256_loadu_ps(pa.add(k + 8)),
                    _mm256_loadu_ps(pb.add(k + 8)),
                    acc[1],
                );
            }
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let x = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
        let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
        let x = _mm_add_ss(x, _mm_shuffle_ps::<1>(x, x));
        _mm_cvtss_f32(x)
    }

    /// Dot product with four 16-lane accumulators; `a.len()` is a multiple of 16.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
        assert!(a.len() == b.len() && a.len().is_multiple_of(16));
        let (pa, pb, n) = (a.as_ptr(), b.as_ptr(), a.len());
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut k = 0;
        // SAFETY (all loads): k + 16·j + 16 ≤ n by the loop bounds.
        unsafe {
            while k + 64 <= n {
                for (j, acc) in acc.iter_mut().enumerate() {
                    let x = _mm512_loadu_ps(pa.add(k + 16 * j));
                    let y = _mm512_loadu_ps(pb.add(k + 16 * j));
                    *acc = _mm512_fmadd_ps(x, y, *acc);
                }
                k += 64;
            }
            let mut j = 0;
            while k < n {
                acc[j] = _mm512_fmadd_ps(
                    _mm512_loadu_ps(pa.add(k)),
                    _mm512_loadu_ps(pb.add(k)),
                    acc[j],
                );
                k += 16;
                j += 1;
            }
        }
        let s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        _mm512_reduce_add_ps(s)
    }
}

/// a·b + c, fused when the target has FMA, else two operations (a libm `fmaf` call would be far
/// slower than no fusion).
#[inline(always)]
pub fn fmadd<T: Target>(a: f32, b: f32, c: f32) -> f32 {
    if T::FMA { a.mul_add(b, c) } else { a * b + c }
}

/// eˣ by Cody–Waite range reduction and a degree-6 polynomial; inputs are clamped to
/// [−87.3, 88], where the result is a normal f32.
#[inline(always)]
pub fn exp<T: Target>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer without a branch.
    const ROUND: f32 = 12_582_912.0;
    // max/min, not clamp: one vector instruction each, and NaN comes out as a bound.
    #[allow(clippy::manual_clamp)]
    let x = x.max(-87.3).min(88.0);
    let biased = x * LOG2E + ROUND;
    let n = biased - ROUND;
    let r = fmadd::<T>(n, -LN2_HI, x);
    let r = fmadd::<T>(n, -LN2_LO, r);
    let mut p = 1.0 / 720.0;
    p = fmadd::<T>(p, r, 1.0 / 120.0);
    p = fmadd::<T>(p, r, 1.0 / 24.0);
    p = fmadd::<T>(p, r, 1.0 / 6.0);
    p = fmadd::<T>(p, r, 0.5);
    p = fmadd::<T>(p, r, 1.0);
    p = fmadd::<T>(p, r, 1.0);
    // The low mantissa bits of `biased` hold n in two's complement; shifting (n + 127) into the
    // exponent field builds 2ⁿ with integer vector ops (an `as i32` cast would not vectorize).
    let scale = f32::from_bits(biased.to_bits().wrapping_add(127) << 23);
    p * scale
}

/// σ(x) = 1 / (1 + e⁻ˣ).
#[inline(always)]
pub fn sigmoid<T: Target>(x: f32) -> f32 {
    1.0 / (1.0 + exp::<T>(-x))
}

/// log(1 + e⁻|ˣ|) ∈ (0, ln 2], through log(1 + e) = 2·atanh(e / (2 + e)) and its odd series.
#[inline(always)]
fn log1p_exp_neg_abs<T: Target>(x: f32) -> f32 {
    let e = exp::<T>(-x.abs());
    let s = e / (2.0 + e);
    let s2 = s * s;
    let mut p = 2.0 / 13.0;
    p = fmadd::<T>(p, s2, 2.0 / 11.0);
    p = fmadd::<T>(p, s2, 2.0 / 9.0);
    p = fmadd::<T>(p, s2, 2.0 / 7.0);
    p = fmadd::<T>(p, s2, 2.0 / 5.0);
    p = fmadd::<T>(p, s2, 2.0 / 3.0);
    p = fmadd::<T>(p, s2, 2.0);
    p * s
}

/// log σ(x) = min(x, 0) − log(1 + e⁻|ˣ|), never above 0 and exact in the tails.
#[inline(always)]
pub fn log_sigmoid<T: Target>(x: f32) -> f32 {
    x.min(0.0) - log1p_exp_neg_abs::<T>(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid() -> impl Iterator<Item = f32> {
        (-20_000..=20_000).map(|i| i as f32 * 0.005)
    }

    #[test]
    fn exp_is_accurate_over_its_range() {
        for x in grid().filter(|x| x.abs() <= 87.0).chain([-87.2, 87.9]) {
            for got in [exp::<Portable>(x), exp::<Avx2>(x)] {
                let want = f64::from(x).exp();
                let rel = ((f64::from(got) - want) / want).abs();
                assert!(
                    rel < 3e-7,
                    "exp({x}) = {got}, want {want} (relative {rel:e})"
                );
            }
        }
        assert!(exp::<Portable>(-1000.0) > 0.0 && exp::<Portable>(1000.0).is_finite());
    }

    #[test]
    fn sigmoid_and_log_sigmoid_match_f64() {
        for x in grid() {
            let xd = f64::from(x);
            let s = 1.0 / (1.0 + (-xd).exp());
            let ls = -((-xd).max(0.0) + (-xd.abs()).exp().ln_1p());
            for (got_s, got_ls) in [
                (sigmoid::<Portable>(x), log_sigmoid::<Portable>(x)),
                (sigmoid::<Avx2>(x), log_sigmoid::<Avx2>(x)),
            ] {
                assert!(
                    (f64::from(got_s) - s).abs() < 1e-6 * s.max(1e-30) + 1e-30,
                    "σ({x}) = {got_s}, want {s}"
                );
                assert!(
                    (f64::from(got_ls) - ls).abs() < 2e-7 * (1.0 + ls.abs()),
                    "log σ({x}) = {got_ls}, want {ls}"
                );
            }
        }
    }

    #[test]
    fn dot_matches_a_sequential_sum_on_every_chunking() {
        for n in [16, 32, 48, 80, 112, 512] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| f64::from(x * y)).sum();
            let mut got = vec![Portable::dot(&a, &b)];
            if super::super::Isa::named("avx2").is_ok() {
                got.push(Avx2::dot(&a, &b));
            }
            if super::super::Isa::named("avx512").is_ok() {
                got.push(Avx512::dot(&a, &b));
            }
            for got in got {
                assert!(
                    (f64::from(got) - want).abs() < 1e-4,
                    "n = {n}: {got} vs {want}"
                );
            }
        }
    }
}
