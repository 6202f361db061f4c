//! C = A·B + β·C for the thin products of the recurrent kernels (K and N of a few dozen to a
//! few hundred, M anything), without packing: B's rows and C's rows are contiguous, A has any
//! strides (so an overlapping view of a map, or a transposed one, is an operand as it lies).
//!
//! Why not only matrixmultiply: it packs both operands on every call and its widest kernel is
//! AVX2's 8 × 8, which on the per-row products of PixelRNN (M ≈ 240, K = 48, N = 64, hundreds
//! of calls per image) left most of the machine idle. Here a register tile of rows × 64 columns
//! (AVX-512: 6 × 4 vectors of 16, up to 12 × 2 for narrow products; AVX2: 6 × 2 vectors of
//! 8) runs down K with B's rows streaming from L1, every tile of every panel through one block
//! of K before any starts the next (so a long K, a weight's gradient summed over a chunk's
//! pixels, is streamed from memory once, not once per tile or per panel); edges are the same
//! tile with fewer rows and a masked last vector. The portable build hands the product to
//! matrixmultiply (through ndarray), as before. On every instruction set, a product of one
//! column (A's columns adjacent, K a multiple of 16) is a dot product a row instead, which
//! fills whole vectors where a tile would use one lane.
//!
//! Every instruction set is held to a plain f64 triple loop on odd sizes (tests below).

use ndarray::{ArrayView2, ArrayViewMut2, ShapeBuilder, linalg::general_mat_mul};

use std::borrow::Cow;

use super::math::{self, LANES, fmadd};
use super::{Isa, Target, dispatch};

/// A strided matrix operand: element (i, j) at `data[i·rs + j·cs]`.
#[derive(Debug, Clone, Copy)]
pub struct Mat<'a> {
    /// The values; the matrix lies within them.
    pub data: &'a [f32],
    /// Distance between rows.
    pub rs: usize,
    /// Distance between columns.
    pub cs: usize,
}

/// The matrix at `data` with row stride `rs` and column stride `cs`.
pub fn mat(data: &[f32], rs: usize, cs: usize) -> Mat<'_> {
    Mat { data, rs, cs }
}

/// Elements a `rows` × `cols` matrix with these strides reaches, from its first.
fn span(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    (rows - 1) * rs + (cols - 1) * cs + 1
}

/// A matrix operand whose rows lie anywhere: row i is `data[starts[i]..]`, its columns
/// adjacent (the skewed columns of a map, gathered where they lie instead of copied out).
#[derive(Debug, Clone, Copy)]
pub struct Gathered<'a> {
    /// The values; every row lies within them.
    pub data: &'a [f32],
    /// Where each row starts; the matrix has `starts.len()` rows.
    pub starts: &'a [usize],
}

/// C (m × n, rows `ldc` apart, columns adjacent) = A (m × k) · B (k × n, rows `ldb` apart,
/// columns adjacent) + β·C, plus `bias` (n values) on every row when given, added in the
/// accumulators rather than by a pass over C first. With β = 0, C is only written (what it held
/// may be anything).
///
/// Panics if an operand does not lie within its slice.
#[allow(clippy::too_many_arguments)]
pub fn gemm_rows(
    isa: Isa,
    m: usize,
    k: usize,
    n: usize,
    a: Mat<'_>,
    b: &[f32],
    ldb: usize,
    beta: f32,
    bias: Option<&[f32]>,
    c: &mut [f32],
    ldc: usize,
) {
    product(
        isa,
        m,
        k,
        n,
        Operand::Strided(a),
        b,
        ldb,
        beta,
        bias,
        c,
        ldc,
    );
}

/// C (`a.starts.len()` × n, rows `ldc` apart) = A (gathered rows of k values) · B + 1·biasᵀ;
/// C is only written.
#[allow(clippy::too_many_arguments)]
pub fn gemm_gathered_bias(
    isa: Isa,
    k: usize,
    n: usize,
    a: Gathered<'_>,
    b: &[f32],
    ldb: usize,
    bias: &[f32],
    c: &mut [f32],
    ldc: usize,
) {
    let m = a.starts.len();
    product(
        isa,
        m,
        k,
        n,
        Operand::Gathered(a),
        b,
        ldb,
        0.0,
        Some(bias),
        c,
        ldc,
    );
}

/// A's rows, strided or gathered.
#[derive(Debug, Clone, Copy)]
enum Operand<'a> {
    Strided(Mat<'a>),
    Gathered(Gathered<'a>),
}

dispatch! {
    /// C's one column (m values `ldc` apart) = A (m × k, rows `rs` apart, columns adjacent)
    /// · `b` (k values) + β·C + `bias`, a dot product a row ([`math::Target::dot`], so k is
    /// a multiple of [`LANES`]): a register tile would run it in one lane of its eight or
    /// sixteen (the binary model's logits, one output per pixel).
    #[allow(clippy::too_many_arguments)]
    fn column(m: usize, k: usize, a: &[f32], rs: usize, b: &[f32], beta: f32, bias: f32, c: &mut [f32], ldc: usize) -> ()
        => column_body
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn column_body<T: math::Target>(
    m: usize,
    k: usize,
    a: &[f32],
    rs: usize,
    b: &[f32],
    beta: f32,
    bias: f32,
    c: &mut [f32],
    ldc: usize,
) {
    for i in 0..m {
        let dot = T::dot(&a[i * rs..i * rs + k], b) + bias;
        let out = &mut c[i * ldc];
        *out = if beta == 0.0 {
            dot
        } else {
            fmadd::<T>(beta, *out, dot)
        };
    }
}

/// C = A·B + β·C (+ bias on every row): checks the operands and runs the widest tiles, or
/// for one column with A's columns adjacent, [`column`].
#[allow(clippy::too_many_arguments)]
fn product(
    isa: Isa,
    m: usize,
    k: usize,
    n: usize,
    a: Operand<'_>,
    b: &[f32],
    ldb: usize,
    beta: f32,
    bias: Option<&[f32]>,
    c: &mut [f32],
    ldc: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(c.len() >= span(m, n, ldc, 1), "C lies in its buffer");
    if let Some(bias) = bias {
        assert!(bias.len() >= n, "a bias for every column");
    }
    if k == 0 {
        for row in 0..m {
            for (j, v) in c[row * ldc..row * ldc + n].iter_mut().enumerate() {
                let kept = if beta == 0.0 { 0.0 } else { *v * beta };
                *v = kept + bias.map_or(0.0, |b| b[j]);
            }
        }
        return;
    }
    match a {
        Operand::Strided(a) => assert!(
            a.data.len() >= span(m, k, a.rs, a.cs),
            "A lies in its buffer"
        ),
        Operand::Gathered(a) => assert!(
            a.starts.iter().all(|&s| s + k <= a.data.len()),
            "A's rows lie in their buffer"
        ),
    }
    assert!(b.len() >= span(k, n, ldb, 1), "B lies in its buffer");
    if let Operand::Strided(a) = a
        && n == 1
        && a.cs == 1
        && k.is_multiple_of(LANES)
    {
        let b: Cow<'_, [f32]> = if ldb == 1 {
            Cow::Borrowed(&b[..k])
        } else {
            Cow::Owned((0..k).map(|p| b[p * ldb]).collect())
        };
        let bias = bias.map_or(0.0, |bias| bias[0]);
        return column(isa, m, k, a.data, a.rs, &b, beta, bias, c, ldc);
    }
    #[cfg(target_arch = "x86_64")]
    if let target @ (Target::Avx512 | Target::Avx2) = isa.target() {
        let bias = bias.map_or(std::ptr::null(), <[f32]>::as_ptr);
        let (b, c) = (b.as_ptr(), c.as_mut_ptr());
        // SAFETY (both arms): an `Isa` exists only for an instruction set the CPU runs, and
        // every operand was checked to lie within its slice above.
        unsafe {
            match a {
                Operand::Strided(a) => {
                    let rows = x86::Strided::of(a);
                    x86::gemm(target, m, k, n, rows, a.cs, b, ldb, beta, bias, c, ldc);
                }
                Operand::Gathered(a) => {
                    let rows = x86::Listed::of(a);
                    x86::gemm(target, m, k, n, rows, 1, b, ldb, beta, bias, c, ldc);
                }
            }
        }
        return;
    }
    // matrixmultiply: the bias goes into C first, gathered rows into a copy.
    let mut beta = beta;
    if let Some(bias) = bias {
        for row in c[..span(m, n, ldc, 1)].chunks_mut(ldc) {
            for (v, &b) in row[..n].iter_mut().zip(bias) {
                *v = if beta == 0.0 { b } else { *v * beta + b };
            }
        }
        beta = 1.0;
    }
    match a {
        Operand::Strided(a) => gemm(m, k, n, a, mat(b, ldb, 1), beta, c, ldc, 1),
        Operand::Gathered(g) => {
            let rows: Vec<f32> = g
                .starts
                .iter()
                .flat_map(|&s| g.data[s..s + k].iter().copied())
                .collect();
            gemm(m, k, n, mat(&rows, k, 1), mat(b, ldb, 1), beta, c, ldc, 1);
        }
    }
}

/// C (m × n, at `c` with strides `rsc`, `csc`) = A (m × k) · B (k × n) + β·C, any strides, by
/// matrixmultiply (through ndarray): for the products whose shapes the register tiles of
/// [`gemm_rows`] do not fit (a single output column, operands laid out across).
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    m: usize,
    k: usize,
    n: usize,
    a: Mat<'_>,
    b: Mat<'_>,
    beta: f32,
    c: &mut [f32],
    rsc: usize,
    csc: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    let mut c =
        ArrayViewMut2::from_shape((m, n).strides((rsc, csc)), &mut c[..span(m, n, rsc, csc)])
            .expect("C lies in its buffer");
    if k == 0 {
        c.map_inplace(|v| *v *= beta);
        return;
    }
    let a = ArrayView2::from_shape(
        (m, k).strides((a.rs, a.cs)),
        &a.data[..span(m, k, a.rs, a.cs)],
    )
    .expect("A lies in its buffer");
    let b = ArrayView2::from_shape(
        (k, n).strides((b.rs, b.cs)),
        &b.data[..span(k, n, b.rs, b.cs)],
    )
    .expect("B lies in its buffer");
    general_mat_mul(1.0, &a, &b, beta, &mut c);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Where a tile finds A's rows.
    pub trait Source: Copy {
        /// The same rows from row `i` on.
        ///
        /// # Safety
        /// Row `i` is one of the operand's.
        unsafe fn rows_from(self, i: usize) -> Self;
        /// Row `r`'s first value.
        ///
        /// # Safety
        /// Row `r` is one of the operand's.
        unsafe fn row(self, r: usize) -> *const f32;
    }

    /// Rows `rs` values apart.
    #[derive(Clone, Copy)]
    pub struct Strided {
        a: *const f32,
        rs: usize,
    }

    impl Strided {
        /// The rows of `m` (its column stride goes to the tiles apart).
        pub fn of(m: super::Mat<'_>) -> Self {
            Self {
                a: m.data.as_ptr(),
                rs: m.rs,
            }
        }
    }

    impl Source for Strided {
        #[inline(always)]
        unsafe fn rows_from(self, i: usize) -> Self {
            // SAFETY: the caller's row lies within A.
            Self {
                a: unsafe { self.a.add(i * self.rs) },
                rs: self.rs,
            }
        }
        #[inline(always)]
        unsafe fn row(self, r: usize) -> *const f32 {
            // SAFETY: as above.
            unsafe { self.a.add(r * self.rs) }
        }
    }

    /// Rows at listed offsets.
    #[derive(Clone, Copy)]
    pub struct Listed {
        a: *const f32,
        starts: *const usize,
    }

    impl Listed {
        /// The rows of `g`.
        pub fn of(g: super::Gathered<'_>) -> Self {
            Self {
                a: g.data.as_ptr(),
                starts: g.starts.as_ptr(),
            }
        }
    }

    impl Source for Listed {
        #[inline(always)]
        unsafe fn rows_from(self, i: usize) -> Self {
            // SAFETY: the caller's row is listed.
            Self {
                a: self.a,
                starts: unsafe { self.starts.add(i) },
            }
        }
        #[inline(always)]
        unsafe fn row(self, r: usize) -> *const f32 {
            // SAFETY: as above; the listed start lies within A (checked by the caller).
            unsafe { self.a.add(*self.starts.add(r)) }
        }
    }

    /// Runs the tiles of `target` (AVX-512 or AVX2) over A's rows `a` with column stride `cs`.
    ///
    /// # Safety
    /// The CPU has `target`'s instruction set, and every operand lies within its allocation.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm<S: Source>(
        target: super::Target,
        m: usize,
        k: usize,
        n: usize,
        a: S,
        cs: usize,
        b: *const f32,
        ldb: usize,
        beta: f32,
        bias: *const f32,
        c: *mut f32,
        ldc: usize,
    ) {
        // SAFETY: the caller's guarantees.
        unsafe {
            if matches!(target, super::Target::Avx512) {
                gemm_avx512(m, k, n, a, cs, b, ldb, beta, bias, c, ldc);
            } else {
                gemm_avx2(m, k, n, a, cs, b, ldb, beta, bias, c, ldc);
            }
        }
    }

    /// Rows of an AVX-512 tile of `vecs` vectors: 24 accumulators of the 32 registers, at
    /// most 12 rows (a narrow product, N ≤ 32, gets a tall tile rather than few accumulators).
    fn rows_512(vecs: usize) -> usize {
        match vecs {
            4 => 6,
            3 => 8,
            _ => 12,
        }
    }

    /// Rows of an AVX2 tile: 12 accumulators of the 16 registers.
    const ROWS_256: usize = 6;

    /// Depth of a block of K on AVX-512: every tile of every panel runs one block before any
    /// runs the next, so the block's rows of B (at most 64 columns, 32 KiB) and its columns of
    /// A are read from L1 by all but the first tile. A product with a long K (a weight's
    /// gradient, summed over every pixel of a chunk) otherwise streams all of B from memory
    /// once per tile, and all of A once per panel.
    const KC_512: usize = 128;

    /// [`KC_512`] for AVX2, half as deep. Each depth is the faster one on the machine it was
    /// measured on: 128 on an Intel Xeon with AVX-512 and 48 KiB of L1 data, 64 on an AMD
    /// EPYC with AVX2 only and 32 KiB, where a weight's gradient with A read across (48
    /// rows, 24 KiB over 128 values of K) and its panel of B no longer fit L1 together. The
    /// instruction set stands in for the L1 size, which it does not fix (an AVX-512 CPU with
    /// 32 KiB would want 64 too).
    const KC_256: usize = 64;

    /// The K blocks `(k0, k1, β, bias)` of a product over `k` values, `kc` deep: the first
    /// with the caller's β and bias, every later one adding to C.
    fn k_blocks(
        k: usize,
        kc: usize,
        beta: f32,
        bias: *const f32,
    ) -> impl Iterator<Item = (usize, usize, f32, *const f32)> {
        (0..k.div_ceil(kc)).map(move |b| {
            let (k0, k1) = (b * kc, ((b + 1) * kc).min(k));
            if b == 0 {
                (k0, k1, beta, bias)
            } else {
                (k0, k1, 1.0, std::ptr::null())
            }
        })
    }

    /// Runs `$tile::<R, V>(args…)` for the runtime rows and vectors of an AVX-512 tile.
    macro_rules! tiles_512 {
        ($tile:ident, $rows:expr, $vecs:expr, $($arg:expr),*) => {
            match ($rows, $vecs) {
                (6, 4) => $tile::<6, 4, _>($($arg),*),
                (5, 4) => $tile::<5, 4, _>($($arg),*),
                (4, 4) => $tile::<4, 4, _>($($arg),*),
                (3, 4) => $tile::<3, 4, _>($($arg),*),
                (2, 4) => $tile::<2, 4, _>($($arg),*),
                (1, 4) => $tile::<1, 4, _>($($arg),*),
                (8, 3) => $tile::<8, 3, _>($($arg),*),
                (7, 3) => $tile::<7, 3, _>($($arg),*),
                (6, 3) => $tile::<6, 3, _>($($arg),*),
                (5, 3) => $tile::<5, 3, _>($($arg),*),
                (4, 3) => $tile::<4, 3, _>($($arg),*),
                (3, 3) => $tile::<3, 3, _>($($arg),*),
                (2, 3) => $tile::<2, 3, _>($($arg),*),
                (1, 3) => $tile::<1, 3, _>($($arg),*),
                (12, 2) => $tile::<12, 2, _>($($arg),*),
                (11, 2) => $tile::<11, 2, _>($($arg),*),
                (10, 2) => $tile::<10, 2, _>($($arg),*),
                (9, 2) => $tile::<9, 2, _>($($arg),*),
                (8, 2) => $tile::<8, 2, _>($($arg),*),
                (7, 2) => $tile::<7, 2, _>($($arg),*),
                (6, 2) => $tile::<6, 2, _>($($arg),*),
                (5, 2) => $tile::<5, 2, _>($($arg),*),
                (4, 2) => $tile::<4, 2, _>($($arg),*),
                (3, 2) => $tile::<3, 2, _>($($arg),*),
                (2, 2) => $tile::<2, 2, _>($($arg),*),
                (1, 2) => $tile::<1, 2, _>($($arg),*),
                (12, 1) => $tile::<12, 1, _>($($arg),*),
                (11, 1) => $tile::<11, 1, _>($($arg),*),
                (10, 1) => $tile::<10, 1, _>($($arg),*),
                (9, 1) => $tile::<9, 1, _>($($arg),*),
                (8, 1) => $tile::<8, 1, _>($($arg),*),
                (7, 1) => $tile::<7, 1, _>($($arg),*),
                (6, 1) => $tile::<6, 1, _>($($arg),*),
                (5, 1) => $tile::<5, 1, _>($($arg),*),
                (4, 1) => $tile::<4, 1, _>($($arg),*),
                (3, 1) => $tile::<3, 1, _>($($arg),*),
                (2, 1) => $tile::<2, 1, _>($($arg),*),
                _ => $tile::<1, 1, _>($($arg),*),
            }
        };
    }

    /// Runs `$tile::<R, V>(args…)` for the runtime rows and vectors of an AVX2 tile.
    macro_rules! tiles_256 {
        ($tile:ident, $rows:expr, $vecs:expr, $($arg:expr),*) => {
            match ($rows, $vecs) {
                (6, 2) => $tile::<6, 2, _>($($arg),*),
                (5, 2) => $tile::<5, 2, _>($($arg),*),
                (4, 2) => $tile::<4, 2, _>($($arg),*),
                (3, 2) => $tile::<3, 2, _>($($arg),*),
                (2, 2) => $tile::<2, 2, _>($($arg),*),
                (1, 2) => $tile::<1, 2, _>($($arg),*),
                (6, 1) => $tile::<6, 1, _>($($arg),*),
                (5, 1) => $tile::<5, 1, _>($($arg),*),
                (4, 1) => $tile::<4, 1, _>($($arg),*),
                (3, 1) => $tile::<3, 1, _>($($arg),*),
                (2, 1) => $tile::<2, 1, _>($($arg),*),
                _ => $tile::<1, 1, _>($($arg),*),
            }
        };
    }

    /// AVX-512 [`super::gemm_rows`]: panels of 64 columns (4 vectors of 16), tiles of 6 to 12
    /// rows; `bias` null or n values added to every row.
    ///
    /// # Safety
    /// The CPU has AVX-512F, and every operand lies within its allocation.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm_avx512<S: Source>(
        m: usize,
        k: usize,
        n: usize,
        a: S,
        cs: usize,
        b: *const f32,
        ldb: usize,
        beta: f32,
        bias: *const f32,
        c: *mut f32,
        ldc: usize,
    ) {
        for (k0, k1, beta, bias) in k_blocks(k, KC_512, beta, bias) {
            for j0 in (0..n).step_by(64) {
                let width = (n - j0).min(64);
                let vecs = width.div_ceil(16);
                let rest = width - 16 * (vecs - 1);
                let tail: __mmask16 = if rest == 16 {
                    0xffff
                } else {
                    (1u16 << rest) - 1
                };
                let mut i0 = 0;
                while i0 < m {
                    let rows = (m - i0).min(rows_512(vecs));
                    // SAFETY: the tile's rows i0.. and columns j0.. lie within the operands.
                    unsafe {
                        let (a, b, c) = (a.rows_from(i0), b.add(j0), c.add(i0 * ldc + j0));
                        let bias = if bias.is_null() { bias } else { bias.add(j0) };
                        tiles_512!(
                            tile512, rows, vecs, k0, k1, a, cs, b, ldb, beta, bias, c, ldc, tail
                        );
                    }
                    i0 += rows;
                }
            }
        }
    }

    /// One R × V·16 tile of C (the last vector masked by `tail`), down K from `k0` to `k1`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile512<const R: usize, const V: usize, S: Source>(
        k0: usize,
        k1: usize,
        a: S,
        cs: usize,
        b: *const f32,
        ldb: usize,
        beta: f32,
        bias: *const f32,
        c: *mut f32,
        ldc: usize,
        tail: __mmask16,
    ) {
        let mask = |v: usize| if v + 1 == V { tail } else { 0xffff };
        // SAFETY (all accesses): within the tile's rows, columns and K, which the caller
        // guarantees lie within the operands; masked lanes are not touched.
        unsafe {
            let mut start = [_mm512_setzero_ps(); V];
            if !bias.is_null() {
                for (v, s) in start.iter_mut().enumerate() {
                    *s = _mm512_maskz_loadu_ps(mask(v), bias.add(16 * v));
                }
            }
            let mut acc = [start; R];
            for p in k0..k1 {
                let row = b.add(p * ldb);
                let mut bv = [_mm512_setzero_ps(); V];
                for (v, bv) in bv.iter_mut().enumerate() {
                    *bv = _mm512_maskz_loadu_ps(mask(v), row.add(16 * v));
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*a.row(r).add(p * cs));
                    for (acc, &bv) in acc.iter_mut().zip(&bv) {
                        *acc = _mm512_fmadd_ps(av, bv, *acc);
                    }
                }
            }
            let beta_v = _mm512_set1_ps(beta);
            for (r, acc) in acc.iter().enumerate() {
                for (v, &acc) in acc.iter().enumerate() {
                    let at = c.add(r * ldc + 16 * v);
                    let out = if beta == 0.0 {
                        acc
                    } else {
                        _mm512_fmadd_ps(beta_v, _mm512_maskz_loadu_ps(mask(v), at), acc)
                    };
                    _mm512_mask_storeu_ps(at, mask(v), out);
                }
            }
        }
    }

    /// AVX2 [`super::gemm_rows`]: panels of 16 columns (2 vectors of 8), tiles of 6 rows
    /// (12 accumulators of the 16 registers).
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA, and every operand lies within its allocation.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm_avx2<S: Source>(
        m: usize,
        k: usize,
        n: usize,
        a: S,
        cs: usize,
        b: *const f32,
        ldb: usize,
        beta: f32,
        bias: *const f32,
        c: *mut f32,
        ldc: usize,
    ) {
        for (k0, k1, beta, bias) in k_blocks(k, KC_256, beta, bias) {
            for j0 in (0..n).step_by(16) {
                let width = (n - j0).min(16);
                let vecs = width.div_ceil(8);
                let rest = (width - 8 * (vecs - 1)) as i32;
                let full = rest == 8;
                let lanes: [i32; 8] =
                    std::array::from_fn(|l| if (l as i32) < rest { -1 } else { 0 });
                // SAFETY: reads eight i32 from an array of eight.
                let tail = unsafe { _mm256_loadu_si256(lanes.as_ptr().cast()) };
                let mut i0 = 0;
                while i0 < m {
                    let rows = (m - i0).min(ROWS_256);
                    // SAFETY: the tile's rows i0.. and columns j0.. lie within the operands.
                    unsafe {
                        let (a, b, c) = (a.rows_from(i0), b.add(j0), c.add(i0 * ldc + j0));
                        let bias = if bias.is_null() { bias } else { bias.add(j0) };
                        tiles_256!(
                            tile256, rows, vecs, k0, k1, a, cs, b, ldb, beta, bias, c, ldc, tail,
                            full
                        );
                    }
                    i0 += rows;
                }
            }
        }
    }

    /// One R × V·8 tile of C (the last vector masked by `tail` unless `full`), down K from
    /// `k0` to `k1`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile256<const R: usize, const V: usize, S: Source>(
        k0: usize,
        k1: usize,
        a: S,
        cs: usize,
        b: *const f32,
        ldb: usize,
        beta: f32,
        bias: *const f32,
        c: *mut f32,
        ldc: usize,
        tail: __m256i,
        full: bool,
    ) {
        // SAFETY (all accesses): within the tile's rows, columns and K, which the caller
        // guarantees lie within the operands; masked lanes are not touched.
        unsafe {
            let mut start = [_mm256_setzero_ps(); V];
            if !bias.is_null() {
                for (v, s) in start.iter_mut().enumerate() {
                    *s = if full || v + 1 < V {
                        _mm256_loadu_ps(bias.add(8 * v))
                    } else {
                        _mm256_maskload_ps(bias.add(8 * v), tail)
                    };
                }
            }
            let mut acc = [start; R];
            for p in k0..k1 {
                let row = b.add(p * ldb);
                let mut bv = [_mm256_setzero_ps(); V];
                for (v, bv) in bv.iter_mut().enumerate() {
                    *bv = if full || v + 1 < V {
                        _mm256_loadu_ps(row.add(8 * v))
                    } else {
                        _mm256_maskload_ps(row.add(8 * v), tail)
                    };
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    let av = _mm256_broadcast_ss(&*a.row(r).add(p * cs));
                    for (acc, &bv) in acc.iter_mut().zip(&bv) {
                        *acc = _mm256_fmadd_ps(av, bv, *acc);
                    }
                }
            }
            let beta_v = _mm256_set1_ps(beta);
            for (r, acc) in acc.iter().enumerate() {
                for (v, &acc) in acc.iter().enumerate() {
                    let at = c.add(r * ldc + 8 * v);
                    if full || v + 1 < V {
                        let out = if beta == 0.0 {
                            acc
                        } else {
                            _mm256_fmadd_ps(beta_v, _mm256_loadu_ps(at), acc)
                        };
                        _mm256_storeu_ps(at, out);
                    } else {
                        let out = if beta == 0.0 {
                            acc
                        } else {
                            _mm256_fmadd_ps(beta_v, _mm256_maskload_ps(at, tail), acc)
                        };
                        // A masked store is slow on some CPUs (AMD's), so only the edge has one.
                        _mm256_maskstore_ps(at, tail, out);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// C = A·B + β·C in f64, the plain triple loop.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        m: usize,
        k: usize,
        n: usize,
        a: Mat<'_>,
        b: &[f32],
        ldb: usize,
        beta: f32,
        c: &[f32],
        ldc: usize,
    ) -> Vec<f64> {
        let mut out = Vec::new();
        for i in 0..m {
            for j in 0..n {
                let mut s = if beta == 0.0 {
                    0.0
                } else {
                    f64::from(beta) * f64::from(c[i * ldc + j])
                };
                for p in 0..k {
                    s += f64::from(a.data[i * a.rs + p * a.cs]) * f64::from(b[p * ldb + j]);
                }
                out.push(s);
            }
        }
        out
    }

    /// Every instruction set equals the f64 loop on odd sizes (edges of every tile shape),
    /// strided, overlapping and transposed A, padded rows of B and C, β of 0 (C holding NaN,
    /// which must not leak through) and 1, and leaves C's padding alone.
    #[test]
    fn every_instruction_set_equals_the_naive_product() {
        let value = |i: usize| ((i * 7919 % 1000) as f32 / 500.0) - 1.0;
        for &(m, k, n) in &[
            (1, 1, 1),
            (7, 5, 3),
            (13, 48, 64),
            // One column: a dot product a row where A's columns are adjacent and K is a
            // multiple of 16.
            (37, 32, 1),
            (3, 16, 1),
            (8, 64, 1),
            (6, 3, 65),
            (11, 17, 16),
            (238, 48, 64),
            (5, 64, 129),
            (19, 2, 70),
            (29, 9, 32),
            (25, 7, 20),
            (17, 5, 40),
            // K past one block (and one element past), as a weight's gradient over a chunk.
            (64, 300, 64),
            (9, 129, 20),
        ] {
            // A as: a padded row-major matrix, an overlapping view (rows one element apart as
            // the Row LSTM's taps are), and a transposed view; B's rows padded or adjacent.
            let lays = [(k + 3, 1), (1, m + 2), (2, 1)];
            for ((rs, cs), ldb) in lays.into_iter().flat_map(|l| [(l, n + 5), (l, n)]) {
                let a_data: Vec<f32> = (0..span(m, k, rs, cs)).map(value).collect();
                let a = mat(&a_data, rs, cs);
                let ldc = n + 2;
                let b: Vec<f32> = (0..span(k, n, ldb, 1)).map(|i| value(i + 11)).collect();
                for beta in [0.0f32, 1.0] {
                    let fill = if beta == 0.0 { f32::NAN } else { 0.25 };
                    let start: Vec<f32> = (0..m * ldc + 3)
                        .map(|i| {
                            if i < m * ldc && i % ldc < n {
                                fill * value(i + 5)
                            } else {
                                -7.0
                            }
                        })
                        .collect();
                    let bias: Vec<f32> = (0..n).map(|j| value(j + 3)).collect();
                    for with_bias in [false, true] {
                        let mut want = naive(m, k, n, a, &b, ldb, beta, &start, ldc);
                        if with_bias {
                            for (at, w) in want.iter_mut().enumerate() {
                                *w += f64::from(bias[at % n]);
                            }
                        }
                        for isa in Isa::for_tests() {
                            let mut c = start.clone();
                            let bias = with_bias.then_some(&bias[..]);
                            gemm_rows(isa, m, k, n, a, &b, ldb, beta, bias, &mut c, ldc);
                            for i in 0..m {
                                for j in 0..n {
                                    let (got, want) = (c[i * ldc + j], want[i * n + j]);
                                    assert!(
                                        (f64::from(got) - want).abs() < 1e-5 * (1.0 + k as f64),
                                        "{} {m}x{k}x{n} A({rs},{cs}) ldb {ldb} β {beta} [{i},{j}]: {got} vs {want}",
                                        isa.name()
                                    );
                                }
                            }
                            for (i, &v) in c.iter().enumerate() {
                                if i % ldc >= n || i >= m * ldc {
                                    assert_eq!(v, -7.0, "{} padding at {i} written", isa.name());
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Gathered rows (out of order, repeated, unaligned) with a bias equal the f64 loop over
    /// the same rows copied out, on every instruction set; C is only written.
    #[test]
    fn gathered_rows_with_a_bias_equal_the_naive_product() {
        let value = |i: usize| ((i * 7919 % 1000) as f32 / 500.0) - 1.0;
        for &(m, k, n) in &[
            (1, 1, 1),
            (7, 5, 3),
            (13, 32, 64),
            (29, 9, 70),
            (224, 32, 64),
        ] {
            let data: Vec<f32> = (0..(m + 4) * (k + 3)).map(value).collect();
            // Row i starts at (m − 1 − i)·(k + 3) + i % 3: reversed, and not aligned.
            let starts: Vec<usize> = (0..m).map(|i| (m - 1 - i) * (k + 3) + i % 3).collect();
            let copied: Vec<f32> = starts
                .iter()
                .flat_map(|&s| data[s..s + k].iter().copied())
                .collect();
            let (ldb, ldc) = (n + 5, n + 2);
            let b: Vec<f32> = (0..span(k, n, ldb, 1)).map(|i| value(i + 11)).collect();
            let bias: Vec<f32> = (0..n).map(|j| value(j + 3)).collect();
            let start = vec![f32::NAN; m * ldc];
            let want = naive(m, k, n, mat(&copied, k, 1), &b, ldb, 0.0, &start, ldc);
            for isa in Isa::for_tests() {
                let mut c = start.clone();
                let a = Gathered {
                    data: &data,
                    starts: &starts,
                };
                gemm_gathered_bias(isa, k, n, a, &b, ldb, &bias, &mut c, ldc);
                for i in 0..m {
                    for j in 0..n {
                        let (got, want) = (c[i * ldc + j], want[i * n + j] + f64::from(bias[j]));
                        assert!(
                            (f64::from(got) - want).abs() < 1e-5 * (1.0 + k as f64),
                            "{} {m}x{k}x{n} [{i},{j}]: {got} vs {want}",
                            isa.name()
                        );
                    }
                }
            }
        }
    }
}
