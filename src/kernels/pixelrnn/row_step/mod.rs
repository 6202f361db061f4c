//! A Row LSTM layer's forward pass fused for h = 16 on AVX-512 and on AVX2. Row by row, a tile
//! of a few pixels accumulates both products (input-to-state and state-to-state, K = 4h + 3h)
//! in registers; the gates' nonlinearities, the cell update, the output and the 1×1
//! convolution back to 2h (added to the layer's input) follow at once. The gate
//! pre-activations never reach memory, which the unfused path writes (a row of them is larger
//! than L1) and reads back twice; the next map is written once. A pass that keeps activations
//! for the backward pass (training) stores the gates after their nonlinearity, the cells,
//! their tanh and the outputs of every row, as the unfused path does; one that keeps none
//! (scoring, sampling) keeps the cells and outputs of two rows only.
//!
//! This file holds what both instruction sets share: which layers qualify, the weights' layout,
//! the rows' loop and its padding. Each instruction set's tile (registers, σ and tanh of its
//! own, with a reciprocal estimate and a Newton step instead of a division, tested against f64)
//! is in the file named after it: on AVX-512 each of a tile's pixels holds its four gates in
//! four 16-lane registers, while AVX2, with half the registers of half the width, runs the
//! tile gate by gate, and takes pixels in fours whose products share terms (minimal
//! filtering: 4h multiply-adds per gate and pixel instead of 7h).
//!
//! Other widths and instruction sets take the GEMMs and [`lstm_forward`](super::lstm_forward).
//! Only pixels are computed: the padding columns of everything written are set to zero, which
//! is what the next row's taps (and the next layer's, and the backward pass) must read.

use super::{
    Architecture, Geometry, LayerAt, Net, Recurrence, mat, row_and_above, row_slots, rows_of,
    taps_major,
};
use crate::kernels::Target;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

/// LSTM units this layer is written for.
const H: usize = 16;
/// Gate pre-activations per pixel (o, f, i, g).
const GATES: usize = 4 * H;
/// Features per map row, 2h.
const F: usize = 2 * H;

/// Whether [`layer`] can run a layer of `net`: a Row LSTM of h = 16 on AVX-512 or AVX2.
pub(super) fn applies(net: &Net<'_>) -> bool {
    net.shape.architecture == Architecture::RowLstm
        && net.shape.hidden == H
        && matches!(net.isa.target(), Target::Avx512 | Target::Avx2)
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
    assert!(
        applies(net),
        "the fused Row LSTM needs AVX-512 or AVX2 and h = 16"
    );
    let w = net.params;
    let block = g.n * g.p;
    assert!(g.p == g.width + 2, "one padding column either side");
    assert!(input.len() >= g.rows_up_to(rows) * F && next.len() >= g.rows_up_to(rows) * F);
    let input_taps = taps_major(&w[at.input[0]..], GATES, F, 2);
    let state_taps = taps_major(&w[at.state[0]..], GATES, H, 3);
    // Only AVX2's tiles filter minimally: AVX-512's hold all four gates of a pixel at once.
    let quads = (net.isa.target() == Target::Avx2).then(|| Quads::new(&input_taps, &state_taps));
    let weights = Weights {
        input: input_taps,
        state: state_taps,
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
    let tiles: Tiles = match net.isa.target() {
        #[cfg(target_arch = "x86_64")]
        Target::Avx512 => avx512::tiles,
        #[cfg(target_arch = "x86_64")]
        Target::Avx2 => avx2::tiles,
        _ => unreachable!("`applies` holds for AVX-512 and AVX2 only"),
    };
    for r in 0..rows {
        let span = r * block..(r + 1) * block;
        let (slot, above) = row_slots(r, keep);
        let (cell, c_above) = row_and_above(&mut rec.cell, slot, above, block * H);
        let (hidden, h_above) = row_and_above(&mut rec.hidden, slot, above, block * H);
        let above = above.map(|_| (h_above, c_above));
        let mut kept = keep.then(|| {
            (
                &mut rec.gates[span.start * GATES..span.end * GATES],
                &mut rec.tanh_cell[span.start * H..span.end * H],
            )
        });
        let x = &input[span.start * F..span.end * F];
        let y = &mut next[span.start * F..span.end * F];
        zero_padding(g, cell, hidden, y, &mut kept);
        let (gates, tanh_cell) = match &mut kept {
            Some((g, t)) => (g.as_mut_ptr(), t.as_mut_ptr()),
            None => (std::ptr::null_mut(), std::ptr::null_mut()),
        };
        let args = Args {
            x: x.as_ptr(),
            h_above: above.map_or(std::ptr::null(), |(h, _)| h.as_ptr()),
            c_above: above.map_or(std::ptr::null(), |(_, c)| c.as_ptr()),
            w_in: weights.input.as_ptr(),
            w_state: weights.state.as_ptr(),
            w_quads: quads.as_ref().map_or(std::ptr::null(), |q| q.0.as_ptr()),
            bias: weights.bias.as_ptr(),
            w_out: weights.output.as_ptr(),
            out_bias: weights.output_bias.as_ptr(),
            cell: cell.as_mut_ptr(),
            hidden: hidden.as_mut_ptr(),
            gates,
            tanh_cell,
            next: y.as_mut_ptr(),
        };
        for i in 0..g.n {
            let end = (i + 1) * g.p - 1;
            let mut q = i * g.p + 1;
            while q < end {
                // SAFETY: `applies` checked that the CPU runs the tile's instruction set (an
                // `Isa`'s invariant); every pointer covers the row's `block` map rows (the
                // weights their shapes), and pixels q .. end of image i, with the one map row
                // either side their taps reach, lie within its map rows i·p .. (i + 1)·p.
                q += unsafe { tiles(q, end - q, args) };
            }
        }
    }
}

/// Zeroes one image row's padding columns (one map row either side of each image) in
/// everything the row writes: what the next row's taps, the next layer and the backward pass
/// read there.
fn zero_padding(
    g: &Geometry,
    cell: &mut [f32],
    hidden: &mut [f32],
    next: &mut [f32],
    kept: &mut Option<(&mut [f32], &mut [f32])>,
) {
    for i in 0..g.n {
        for q in [i * g.p, (i + 1) * g.p - 1] {
            cell[q * H..(q + 1) * H].fill(0.0);
            hidden[q * H..(q + 1) * H].fill(0.0);
            next[q * F..(q + 1) * F].fill(0.0);
            if let Some((gates, tanh_cell)) = kept {
                gates[q * GATES..(q + 1) * GATES].fill(0.0);
                tanh_cell[q * H..(q + 1) * H].fill(0.0);
            }
        }
    }
}

/// Runs the pixels at map rows q, q + 1, … (at most the given count, at least one) as one tile
/// and returns how many it ran.
///
/// # Safety
/// The CPU runs the tile's instruction set; the pointers of [`Args`] are as [`layer`] builds
/// them, and the pixels' map rows with one either side lie within one image's row.
type Tiles = unsafe fn(usize, usize, Args) -> usize;

/// 2^r for |r| ≤ ½: the coefficients of its degree-6 series, lowest first (error below 2⁻²³
/// relative), for both instruction sets' σ and tanh.
const EXP2_SERIES: [f32; 7] = [
    1.0,
    std::f32::consts::LN_2,
    0.240_226_5,
    0.055_504_11,
    0.009_618_129,
    0.001_333_355_8,
    0.000_154_035_3,
];

/// Runs `$tile::<R>(q, args)` for the runtime tile size R, 1 to 6.
macro_rules! tile_of {
    ($tile:ident, $pixels:expr, $q:expr, $args:expr) => {
        match $pixels {
            6 => $tile::<6>($q, $args),
            5 => $tile::<5>($q, $args),
            4 => $tile::<4>($q, $args),
            3 => $tile::<3>($q, $args),
            2 => $tile::<2>($q, $args),
            _ => $tile::<1>($q, $args),
        }
    };
}
use tile_of;

/// A matrix of rows of 4h gate pre-activations rearranged gate by gate (every row's 16 values
/// of gate o, then of f, i and g) from a cache line's start: a tile running one gate reads one
/// contiguous stretch of whole lines, where the rows' layout would have it read a quarter of
/// each row, split across two lines wherever the allocation is not aligned.
struct GateMajor(Vec<Line>);

/// One gate's values of one row, a cache line.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([f32; H]);

impl GateMajor {
    /// From rows of 4h (o, f, i, g).
    fn new(rows_of_gates: &[f32]) -> Self {
        let rows = rows_of_gates.len() / GATES;
        let mut lines = vec![Line([0.0; H]); 4 * rows];
        for (gate, lines) in lines.chunks_exact_mut(rows).enumerate() {
            for (line, row) in lines.iter_mut().zip(rows_of_gates.chunks_exact(GATES)) {
                line.0.copy_from_slice(&row[gate * H..][..H]);
            }
        }
        Self(lines)
    }

    fn as_ptr(&self) -> *const f32 {
        self.0.as_ptr().cast()
    }
}

/// Σ_t k_t · tap_t over the taps of `taps` (consecutive matrices of `len` values) that have a
/// coefficient in `k`.
fn combine(taps: &[f32], len: usize, k: &[f32]) -> Vec<f32> {
    let mut sum = vec![0f32; len];
    for (tap, &k) in taps.chunks_exact(len).zip(k) {
        sum.iter_mut().zip(tap).for_each(|(s, &w)| *s += k * w);
    }
    sum
}

/// The filter transform of Winograd's F(4, 3) (Lavin and Gray's points 0, ±1, ±2, ∞): row k
/// gives the coefficients of taps dx = −1, 0, +1 in the weights of point k. The input's two
/// taps take the first two of each row; its third tap is zero, so it has no product at ∞.
const QUAD_FILTER: [[f32; 3]; QUAD_POINTS] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// Points of [`QUAD_FILTER`].
const QUAD_POINTS: usize = 6;

/// A layer's weights as the AVX2 tile's fours of pixels read them (its `quad_tile` says why):
/// per point k of [`QUAD_FILTER`], 2h rows of the input's transformed taps then h of the
/// state's (3h rows; at ∞ the input's 2h are zero and never read), [`GateMajor`].
struct Quads(GateMajor);

impl Quads {
    /// From the input taps W₋₁, W₀ and the state taps V₋₁, V₀, V₊₁ ([`taps_major`] layout).
    fn new(input: &[f32], state: &[f32]) -> Self {
        let (w, v) = (F * GATES, H * GATES);
        let mut rows = Vec::with_capacity(QUAD_POINTS * (w + v));
        for k in &QUAD_FILTER {
            rows.extend(combine(input, w, &k[..2]));
            rows.extend(combine(state, v, k));
        }
        Self(GateMajor::new(&rows))
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

/// One image row's operands, for the tiles: the layer's input `x` (2h per map row), the row
/// above's outputs and cells `h_above` and `c_above` (h each; null for the first row), the
/// weights (on AVX2 also as [`Quads`]; null elsewhere), and where this row's cells, outputs
/// (h each) and next map (2h) go; `gates` (4h, after their nonlinearity) and `tanh_cell` (h)
/// are null when nothing is kept.
#[derive(Clone, Copy)]
struct Args {
    x: *const f32,
    h_above: *const f32,
    c_above: *const f32,
    w_in: *const f32,
    w_state: *const f32,
    w_quads: *const f32,
    bias: *const f32,
    w_out: *const f32,
    out_bias: *const f32,
    cell: *mut f32,
    hidden: *mut f32,
    gates: *mut f32,
    tanh_cell: *mut f32,
    next: *mut f32,
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::super::reference::{self, Params, Shape};
    use super::super::tests::{assert_gradient_is_the_references, reference_nll_gradient};
    use super::super::{flatten, unflatten};
    use super::*;
    use crate::kernels::Isa;

    /// σ and tanh (computed by `vector`, 16 values at a time, on the instruction set named
    /// `isa`) against f64 over the range the gates take and past both ends; `vector` is called
    /// only if this CPU runs `isa`.
    fn assert_sigmoid_and_tanh_match_f64(
        isa: &str,
        vector: impl Fn(&[f32]) -> (Vec<f32>, Vec<f32>),
    ) {
        if Isa::named(isa).is_err() {
            eprintln!("skipping the {isa} σ and tanh: this CPU lacks {isa}");
            return;
        }
        let grid: Vec<f32> = (-4000..=4000).map(|k| k as f32 * 0.025).collect();
        for xs in grid.chunks_exact(16) {
            let (s, t) = vector(xs);
            for ((&x, s), t) in xs.iter().zip(s).zip(t) {
                let x = f64::from(x);
                let (want_s, want_t) = (1.0 / (1.0 + (-x).exp()), x.tanh());
                // Relative to σ, growing with |x| as the f32 product x·log₂e rounds (absolute,
                // which is what the gates feel, it stays below 2⁻²³).
                assert!(
                    (f64::from(s) - want_s).abs() <= 2e-7 * (1.0 + x.abs()) * want_s + 1e-30,
                    "{isa}: σ({x}) = {s} vs {want_s}"
                );
                assert!(
                    (f64::from(t) - want_t).abs() <= 2.5e-7,
                    "{isa}: tanh({x}) = {t} vs {want_t}"
                );
            }
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx512_sigmoid_and_tanh_match_f64() {
        assert_sigmoid_and_tanh_match_f64("avx512", |xs| {
            // SAFETY: called only on a CPU that runs the `avx512` Isa, so has AVX-512F; `xs`
            // holds 16 values.
            unsafe {
                use std::arch::x86_64::*;
                let x = _mm512_loadu_ps(xs.as_ptr());
                let (mut s, mut t) = (vec![0f32; 16], vec![0f32; 16]);
                _mm512_storeu_ps(s.as_mut_ptr(), avx512::sigmoid(x));
                _mm512_storeu_ps(t.as_mut_ptr(), avx512::tanh(x));
                (s, t)
            }
        });
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_sigmoid_and_tanh_match_f64() {
        assert_sigmoid_and_tanh_match_f64("avx2", |xs| {
            // SAFETY: called only on a CPU that runs the `avx2` Isa, so has AVX2 and FMA; `xs`
            // holds 16 values.
            unsafe {
                use std::arch::x86_64::*;
                let (mut s, mut t) = (vec![0f32; 16], vec![0f32; 16]);
                for v in [0, 8] {
                    let x = _mm256_loadu_ps(xs.as_ptr().add(v));
                    _mm256_storeu_ps(s.as_mut_ptr().add(v), avx2::sigmoid(x));
                    _mm256_storeu_ps(t.as_mut_ptr().add(v), avx2::tanh(x));
                }
                (s, t)
            }
        });
    }

    /// Widths 1 to 13 give every AVX-512 tile size (1 to 6 pixels) and every remainder after
    /// full tiles, and on AVX2 tiles of 1 to 3 fours of pixels with 0 to 3 pixels left over;
    /// 17, 22 and 26 AVX2 tiles of 4, 5 and 6 fours, 28 (MNIST's) a row of two (4 and 3
    /// fours); 10 images are a full chunk and a partial one; skip connections on and off (off
    /// only at the wider widths). The fused layers' log-likelihoods, the logits of a pass over
    /// the first rows only (sampling's), and the gradient (whose forward pass keeps the fused
    /// layers' activations) are the f64 reference's.
    #[test]
    fn fused_rows_match_the_reference_at_every_width() {
        let isas: Vec<Isa> = Isa::for_tests()
            .into_iter()
            .filter(|i| matches!(i.target(), Target::Avx512 | Target::Avx2))
            .collect();
        if isas.is_empty() {
            eprintln!("skipping the fused Row LSTM: this CPU has neither AVX-512 nor AVX2");
            return;
        }
        for isa in isas {
            let (n, height) = (10, 3);
            for width in (1..=13).chain([17, 22, 26, 28]) {
                // Skip connections do not reach the tiles: on and off at the narrow widths only.
                let skips: &[bool] = if width <= 13 {
                    &[false, true]
                } else {
                    &[false]
                };
                for &skip in skips {
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
                            "{}: width {width}, skip {skip}, image {i}: {got} vs {want}",
                            isa.name()
                        );
                        let want = reference::logits(&p, image, height, width);
                        for (k, want) in want[..2 * width].iter().enumerate() {
                            let got = f64::from(logits[i * d + k]);
                            assert!(
                                (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                                "{}: width {width}, skip {skip}, image {i}, logit {k}: {got} vs {want}",
                                isa.name()
                            );
                        }
                    }
                    let (want_ll, want) =
                        reference_nll_gradient(&p, &x, n, (height, width), flat.len());
                    assert_gradient_is_the_references(
                        &net,
                        &x,
                        (&want_ll, &want),
                        &format!("{}: width {width}, skip {skip}", isa.name()),
                    );
                }
            }
        }
    }
}
