//! `pipeline bench`: how fast NADE (or RNADE, `--model rnade`, or PixelRNN, `--model pixelrnn`)
//! trains and scores here, measured against baselines taken in the same run — the naive
//! reference kernels, the machine's own SGEMM rate for the fraction of peak, and for PixelRNN a
//! PyTorch implementation of the same network on the same threads
//! (`scripts/pixelrnn_torch.py`), whose passes alternate with ours so that both see the same
//! machine. Medians of `--repeats` timings (for the comparison, the median of the rounds'
//! ratios); nothing is asserted.

use std::io::Write;
use std::time::Instant;

use ndarray::{Array2, ArrayView2, Axis, linalg::general_mat_mul};
use rayon::prelude::*;
use serde_json::json;

use crate::cli::BenchArgs;
use crate::config::{Binarize, PreprocessConfig, SourceConfig};
use crate::data::ImageShape;
use crate::data::preprocess::Preprocessor;
use crate::error::{Error, Result, from_io};
use crate::io::source::Source;
use crate::kernels::Isa;
use crate::kernels::{nade as nade_kernel, rnade as rnade_kernel};
use crate::models::nade::Nade;
use crate::models::pixelrnn::PixelRnn;
use crate::models::rnade::{Hyperparameters, Rnade, RnadeParams};
use crate::models::shared::ordering::Order;
use crate::models::{DensityModel, Family};
use crate::pipeline::progress::Progress;
use crate::pipeline::{Context, read};
use crate::train::{GradientModel, GradientWorkspace, Optimizer};

/// Quoted in issue 3 for a vectorized PyTorch 2 NADE-500 on a 2-core AVX-512 machine; shown for
/// orientation only, never as a measurement of this run.
const PYTORCH_QUOTED: (f64, f64) = (400.0, 2000.0);

/// Training and scoring rates of one implementation, in images per second.
#[derive(Debug, Clone, Copy)]
struct Rates {
    train: f64,
    score: f64,
}

/// A model whose fast kernels can be timed on each instruction set.
trait Measured: GradientModel + DensityModel + Clone {
    /// The same model on `isa`.
    fn on(&self, isa: Isa) -> Self;
}

impl Measured for Nade {
    fn on(&self, isa: Isa) -> Self {
        self.clone().with_isa(isa)
    }
}

impl Measured for PixelRnn {
    fn on(&self, isa: Isa) -> Self {
        self.clone().with_isa(isa)
    }
}

impl Measured for Rnade {
    fn on(&self, isa: Isa) -> Self {
        self.clone().with_isa(isa)
    }
}

/// What is measured besides the fast kernels: the naive reference's rates, and the
/// dense-equivalent FLOPs of one image (train, score) for the fraction of SGEMM.
struct Baseline {
    naive: Rates,
    naive_images: usize,
    flops: (f64, f64),
}

mod pixelrnn;

/// Runs the benchmark and prints (and optionally writes) the figures.
pub fn bench(a: &BenchArgs, ctx: &Context) -> Result<()> {
    if a.repeats == 0 || a.images == 0 || a.reference_images == 0 || a.batch == 0 {
        return Err(Error::Usage(
            "--repeats, --images, --reference-images and --batch must be at least 1".into(),
        ));
    }
    if a.model == "pixelrnn" {
        return pixelrnn::bench(a, ctx);
    }
    let hidden = a.hidden.unwrap_or(500);
    // The model's own check, so the bench takes exactly the sizes a pipeline would.
    <Rnade as Family>::check(&RnadeParams {
        hidden,
        components: a.components,
        order: Order::Raster,
    })
    .map_err(|problems| {
        let list: Vec<String> = problems
            .iter()
            .map(|p| format!("--{} {}", p.key, p.message))
            .collect();
        Error::Usage(list.join("; "))
    })?;
    let rnade = a.model == "rnade";
    let (shape, pixels) = load_images(a, ctx, !rnade)?;
    let (d, h) = (shape.dims(), hidden);
    let subset = pixels.slice(ndarray::s![..a.reference_images.min(pixels.nrows()), ..]);
    let reference_repeats = a.repeats.min(3);
    if rnade {
        let params = Hyperparameters {
            hidden: h,
            components: a.components,
            order: Order::Raster,
            seed: 0,
        };
        let model = Rnade::init(shape, 256, params);
        let p = model.kernel_params();
        let values = ordered_centres(subset);
        let baseline = Baseline {
            naive: Rates {
                train: median_rate(reference_repeats, subset.nrows(), || {
                    rnade_reference_train(&p, &values)
                }),
                score: median_rate(reference_repeats, subset.nrows(), || {
                    rnade_reference_score(&p, &values)
                }),
            },
            naive_images: subset.nrows(),
            // W·y, and 3K heads of H each, per position: 2·D·H·(1 + 3K) per image scored.
            flops: {
                let score = 2.0 * (d * h * (1 + 3 * a.components)) as f64;
                (3.0 * score, score)
            },
        };
        report(
            a,
            &format!("RNADE-{h} (K = {})", a.components),
            shape,
            &model,
            pixels.view(),
            &baseline,
            false,
        )
    } else {
        let model = Nade::init(shape, h, Order::Raster, 0, pixels.view());
        let ordered = model.ordered(subset);
        let p = model.kernel_params();
        let baseline = Baseline {
            naive: Rates {
                train: median_rate(reference_repeats, subset.nrows(), || {
                    nade_reference_train(&p, &ordered)
                }),
                score: median_rate(reference_repeats, subset.nrows(), || {
                    nade_reference_score(&p, &ordered)
                }),
            },
            naive_images: subset.nrows(),
            // W·x and V·h are 2·D·H each per image scored; a training step is taken as three
            // times a forward pass. σ evaluations are not counted as FLOPs.
            flops: (12.0 * (d * h) as f64, 4.0 * (d * h) as f64),
        };
        report(
            a,
            &format!("NADE-{h}"),
            shape,
            &model,
            pixels.view(),
            &baseline,
            true,
        )
    }
}

/// Times the fast kernels on every instruction set and prints them beside `baseline`.
fn report<M: Measured>(
    a: &BenchArgs,
    label: &str,
    shape: ImageShape,
    model: &M,
    pixels: ArrayView2<'_, u8>,
    baseline: &Baseline,
    quote_pytorch: bool,
) -> Result<()> {
    report_with(
        a,
        label,
        shape,
        model,
        pixels,
        baseline,
        quote_pytorch,
        None,
    )
    .and_then(|report| write_json(a, &report))
}

/// Another implementation of the same model, timed one pass at a time in turn with ours, so
/// that both see the same machine: a neighbour's load then moves both rates, not their ratio.
trait Rival {
    /// What it is, as printed ("PyTorch 2.15.0").
    fn name(&self) -> String;
    /// Images per second of one training pass.
    fn train_rate(&mut self) -> std::result::Result<f64, String>;
    /// Images per second of one scoring pass.
    fn score_rate(&mut self) -> std::result::Result<f64, String>;
}

/// One kind of pass (training or scoring) from `repeats` rounds of one pass each, ours first:
/// the median rates of both, and the median of the rounds' ratios (ours / theirs), which is
/// what is quoted.
#[derive(Debug, PartialEq)]
struct Paired {
    ours: f64,
    theirs: f64,
    ratio: f64,
}

/// Alternates our training passes with the rival's, then our scoring passes with its:
/// (training, scoring). The rival's first failure ends the comparison (with its reason).
fn paired<M: Measured>(
    repeats: usize,
    model: &M,
    pixels: ArrayView2<'_, u8>,
    batch: usize,
    rival: &mut dyn Rival,
) -> std::result::Result<(Paired, Paired), String> {
    let n = pixels.nrows();
    let train = alternate(
        repeats,
        || rate_of(n, || train_pass(model, pixels, batch)),
        || rival.train_rate(),
    )?;
    let score = alternate(
        repeats,
        || rate_of(n, || score_pass(model, pixels)),
        || rival.score_rate(),
    )?;
    Ok((train, score))
}

/// `repeats` rounds of `ours` then `theirs`, each returning a rate.
fn alternate(
    repeats: usize,
    mut ours: impl FnMut() -> f64,
    mut theirs: impl FnMut() -> std::result::Result<f64, String>,
) -> std::result::Result<Paired, String> {
    let (mut a, mut b, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..repeats {
        let (x, y) = (ours(), theirs()?);
        a.push(x);
        b.push(y);
        ratio.push(x / y);
    }
    Ok(Paired {
        ours: median(a),
        theirs: median(b),
        ratio: median(ratio),
    })
}

/// [`report`], with a rival implementation timed in turn with our kernels on the chosen
/// instruction set (or why it could not be), printed as ratios; returns the figures as JSON.
#[allow(clippy::too_many_arguments)]
fn report_with<M: Measured>(
    a: &BenchArgs,
    label: &str,
    shape: ImageShape,
    model: &M,
    pixels: ArrayView2<'_, u8>,
    baseline: &Baseline,
    quote_pytorch: bool,
    mut rival: Option<std::result::Result<Box<dyn Rival>, String>>,
) -> Result<serde_json::Value> {
    let n = pixels.nrows();
    let threads = rayon::current_num_threads();
    let chosen = Isa::detect();
    say(format_args!(
        "{label} on {n} images of {shape} from {} ({threads} threads); kernels use {} (available: {})\n",
        a.data,
        chosen.name(),
        Isa::available()
            .iter()
            .map(|i| i.name())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let mut fast = Vec::new();
    let mut compared = None;
    for isa in Isa::available() {
        let m = model.on(isa);
        let rates = match &mut rival {
            Some(Ok(r)) if isa == chosen => {
                let name = r.name();
                match paired(a.repeats, &m, pixels, a.batch, r.as_mut()) {
                    Ok((train, score)) => {
                        let ours = Rates {
                            train: train.ours,
                            score: score.ours,
                        };
                        compared = Some(Ok((name, train, score)));
                        ours
                    }
                    Err(why) => {
                        compared = Some(Err(why));
                        measure(a, &m, pixels)
                    }
                }
            }
            _ => measure(a, &m, pixels),
        };
        say(format_args!(
            "  fast kernels ({:<8})  train {:>9.0} img/s   score {:>9.0} img/s\n",
            isa.name(),
            rates.train,
            rates.score
        ));
        fast.push((isa, rates));
    }
    let naive = baseline.naive;
    say(format_args!(
        "  naive reference (f64)   train {:>9} img/s   score {:>9} img/s   ({} images)\n",
        rate(naive.train),
        rate(naive.score),
        baseline.naive_images
    ));
    let best = fast
        .iter()
        .find(|(isa, _)| *isa == chosen)
        .map(|(_, r)| *r)
        .expect("the chosen ISA was measured");
    say(format_args!(
        "  speed-up over naive     train {:>9}×        score {:>9}×\n",
        rate(best.train / naive.train),
        rate(best.score / naive.score)
    ));
    // What `sink.embeddings` costs: scoring that also writes each image's embedding.
    let embedded = model.on(chosen);
    let with_embeddings = embedded.embedder().map(|e| {
        let rate = median_rate(a.repeats, n, || {
            let mut out = vec![0f64; n];
            let mut emb = vec![0f32; n * e.embedding_width()];
            e.log_likelihood_and_embedding(pixels, &mut out, &mut emb);
            std::hint::black_box(emb[0]);
        });
        say(format_args!(
            "  score with embeddings   {:>9.0} img/s ({} values each; {:+.1}% time per image against scoring alone, same run)\n",
            rate,
            e.embedding_width(),
            100.0 * (best.score / rate - 1.0)
        ));
        rate
    });
    let sgemm = sgemm_rate(3);
    let (train_flops, score_flops) = baseline.flops;
    let (train_gf, score_gf) = (
        best.train * train_flops / 1e9,
        best.score * score_flops / 1e9,
    );
    say(format_args!(
        "  SGEMM on every thread (1024³ each): {:.1} GFLOP/s; dense-equivalent: train {:.1} GFLOP/s ({:.1}% of it), score {:.1} GFLOP/s ({:.1}%)\n",
        sgemm / 1e9,
        train_gf,
        100.0 * train_gf * 1e9 / sgemm,
        score_gf,
        100.0 * score_gf * 1e9 / sgemm
    ));
    if quote_pytorch {
        say(format_args!(
            "  against PyTorch 2 CPU as quoted in issue 3 ({:.0} train / {:.0} score img/s on another machine, not measured here): {:.1}× / {:.1}×\n",
            PYTORCH_QUOTED.0,
            PYTORCH_QUOTED.1,
            best.train / PYTORCH_QUOTED.0,
            best.score / PYTORCH_QUOTED.1
        ));
    }
    if let Some(Err(why)) = rival {
        compared = Some(Err(why));
    }
    let compared_json = match &compared {
        Some(Ok((name, train, score))) => {
            say(format_args!(
                "  {name:<24}train {:>9.1} img/s   score {:>9.1} img/s   (same threads, its passes alternating with ours)\n",
                train.theirs, score.theirs
            ));
            say(format_args!(
                "  speed-up over it        train {:>9.1}×        score {:>9.1}×   (median of {} paired passes)\n",
                train.ratio, score.ratio, a.repeats
            ));
            json!({
                "name": name,
                "train_images_per_s": train.theirs,
                "score_images_per_s": score.theirs,
                "train_speedup": train.ratio,
                "score_speedup": score.ratio,
            })
        }
        Some(Err(why)) => {
            say(format_args!("  comparison skipped: {why}\n"));
            json!({ "skipped": why })
        }
        None => serde_json::Value::Null,
    };
    let report = json!({
            "comparison": compared_json,
            "batch": a.batch,
            "model": label,
            "images": n,
            "shape": shape.to_string(),
            "data": a.data,
            "threads": threads,
            "isa": chosen.name(),
            "repeats": a.repeats,
            "fast": fast.iter().map(|(isa, r)| json!({
                "isa": isa.name(), "train_images_per_s": r.train, "score_images_per_s": r.score
            })).collect::<Vec<_>>(),
            "naive": { "images": baseline.naive_images, "train_images_per_s": naive.train, "score_images_per_s": naive.score },
            "score_with_embeddings_images_per_s": with_embeddings,
            "sgemm_flops_per_s": sgemm,
            "dense_equivalent_flops_per_image": { "train": train_flops, "score": score_flops },
    });
    Ok(report)
}

/// Writes `report` to `--json`, when given.
fn write_json(a: &BenchArgs, report: &serde_json::Value) -> Result<()> {
    if let Some(path) = &a.json {
        let text = serde_json::to_string_pretty(report).expect("plain JSON") + "\n";
        std::fs::write(path, text).map_err(|e| from_io(path, e))?;
        say(format_args!("figures written to {path}\n"));
    }
    Ok(())
}

/// The first `--images` images of `--data`, binarized stochastically with seed 0 when `binary`.
fn load_images(a: &BenchArgs, ctx: &Context, binary: bool) -> Result<(ImageShape, Array2<u8>)> {
    let source = Source::open(&a.data, &ctx.io)?;
    let config = SourceConfig {
        uri: a.data.clone(),
        image_column: a.image_column.clone(),
        id_column: if source.files()[0].schema().field_with_name("id").is_ok() {
            "id".into()
        } else {
            String::new()
        },
        shape: a.shape.clone(),
        ..SourceConfig::default()
    };
    let preprocess = Preprocessor::new(PreprocessConfig {
        binarize: if binary {
            Binarize::Stochastic
        } else {
            Binarize::None
        },
        seed: 0,
        ..PreprocessConfig::default()
    });
    let mut shape = None;
    let mut pixels = Vec::new();
    read::for_each_batch(
        &source,
        &config,
        &preprocess,
        None,
        &Progress::hidden(),
        |batch, _| {
            if !batch.is_empty() && pixels.len() < a.images * batch.shape.dims() {
                shape = Some(batch.shape);
                pixels.extend_from_slice(batch.pixels.as_slice().expect("contiguous"));
            }
            Ok(())
        },
    )?;
    let shape = shape.ok_or_else(|| Error::data(&a.data, "no usable images to measure on"))?;
    let dims = shape.dims();
    pixels.truncate(a.images * dims);
    let pixels = Array2::from_shape_vec((pixels.len() / dims, dims), pixels)
        .map_err(|e| Error::internal(e, "shaping the images to measure"))?;
    Ok((shape, pixels))
}

/// The median of `count / t` over `repeats` runs of `pass` taking t each.
fn median_rate(repeats: usize, count: usize, mut pass: impl FnMut()) -> f64 {
    median((0..repeats).map(|_| rate_of(count, &mut pass)).collect())
}

/// `count / t` for the time t of one run of `pass`.
fn rate_of(count: usize, pass: impl FnOnce()) -> f64 {
    let start = Instant::now();
    pass();
    count as f64 / start.elapsed().as_secs_f64().max(1e-12)
}

/// The middle value (the upper of the two middle ones for an even count); `values` is not
/// empty.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Training and scoring rates of `m`, medians of `--repeats` passes each.
fn measure<M: Measured>(a: &BenchArgs, m: &M, pixels: ArrayView2<'_, u8>) -> Rates {
    let n = pixels.nrows();
    Rates {
        train: median_rate(a.repeats, n, || train_pass(m, pixels, a.batch)),
        score: median_rate(a.repeats, n, || score_pass(m, pixels)),
    }
}

/// One epoch of real training steps (sharded gradient, reduction, Adam) over `pixels`.
fn train_pass<M: Measured>(model: &M, pixels: ArrayView2<'_, u8>, batch: usize) {
    let mut m = model.clone();
    let mut adam = Optimizer::adam(m.params().len(), 1e-3);
    let mut workspace = GradientWorkspace::default();
    for batch in pixels.axis_chunks_iter(Axis(0), batch) {
        let (_, grad) = workspace.mean_gradient(&m, batch);
        adam.step(m.params_mut(), grad);
    }
    std::hint::black_box(m.params()[0]);
}

/// Scores every image, as `pipeline score` does.
fn score_pass<M: Measured>(model: &M, pixels: ArrayView2<'_, u8>) {
    let mut out = vec![0f64; pixels.nrows()];
    model.log_likelihood_batch(pixels, &mut out);
    std::hint::black_box(out[0]);
}

/// The naive NADE reference's log-likelihood of every image, in parallel over images.
fn nade_reference_score(p: &nade_kernel::Params<'_>, ordered: &[u8]) {
    let total: f64 = ordered
        .par_chunks(p.dims)
        .map(|x| nade_kernel::reference::log_likelihood(p, x).0)
        .sum();
    std::hint::black_box(total);
}

/// Rows of `images` at their bins' centres, in the raster order the benchmark's RNADE uses
/// (the identity permutation).
fn ordered_centres(images: ArrayView2<'_, u8>) -> Vec<f32> {
    images
        .iter()
        .map(|&x| (f32::from(x) + 0.5) / 256.0)
        .collect()
}

/// The naive RNADE reference's log-density of every image, in parallel over images.
fn rnade_reference_score(p: &rnade_kernel::Params<'_>, values: &[f32]) {
    let total: f64 = values
        .par_chunks(p.dims)
        .map(|y| rnade_kernel::reference::log_density(p, y).0)
        .sum();
    std::hint::black_box(total);
}

/// The naive RNADE reference's gradient of every image, in parallel over 8-image shards.
fn rnade_reference_train(p: &rnade_kernel::Params<'_>, values: &[f32]) {
    let lens = [p.w.len(), p.v.len(), p.b.len(), p.c.len()];
    reference_train_shards(values, p.dims, lens, |y, [w, v, b, c]| {
        rnade_kernel::reference::gradient(p, y, &mut rnade_kernel::Grads { w, v, b, c })
    });
}
/// The naive NADE reference's gradient of every image, in parallel over 8-image shards.
fn nade_reference_train(p: &nade_kernel::Params<'_>, ordered: &[u8]) {
    let lens = [p.w.len(), p.v.len(), p.b.len(), p.c.len()];
    reference_train_shards(ordered, p.dims, lens, |x, [w, v, b, c]| {
        nade_kernel::reference::gradient(p, x, &mut nade_kernel::Grads { w, v, b, c })
    });
}

/// Runs a reference `gradient(image, [∂w, ∂v, ∂b, ∂c])` over every image of `inputs` (`dims`
/// values each), in parallel over 8-image shards that each own zeroed gradient buffers of
/// `lens`, as the fast kernels' training step does.
fn reference_train_shards<V: Sync>(
    inputs: &[V],
    dims: usize,
    lens: [usize; 4],
    gradient: impl Fn(&[V], [&mut [f32]; 4]) -> f64 + Sync,
) {
    let total: f64 = inputs
        .par_chunks(8 * dims)
        .map(|shard| {
            let mut buffers = lens.map(|n| vec![0f32; n]);
            shard
                .chunks(dims)
                .map(|x| {
                    let [w, v, b, c] = &mut buffers;
                    gradient(x, [w, v, b, c])
                })
                .sum::<f64>()
        })
        .sum();
    std::hint::black_box(total);
}
/// Side of the SGEMM that stands for the machine's attainable FP32 rate.
const SGEMM_N: usize = 1024;

/// Times one 1024³ SGEMM (ndarray → matrixmultiply) on every rayon thread at once, with the
/// matrices built outside the timing; returns the machine's aggregate FLOP/s.
fn sgemm_rate(repeats: usize) -> f64 {
    let threads = rayon::current_num_threads();
    let mut work: Vec<_> = (0..threads)
        .map(|t| {
            let a = Array2::from_shape_fn((SGEMM_N, SGEMM_N), |(i, j)| ((i + j + t) % 7) as f32);
            let b = Array2::from_shape_fn((SGEMM_N, SGEMM_N), |(i, j)| ((i * j) % 5) as f32);
            (a, b, Array2::<f32>::zeros((SGEMM_N, SGEMM_N)))
        })
        .collect();
    let flops = 2.0 * (SGEMM_N as f64).powi(3) * threads as f64;
    median_rate(repeats, 1, || {
        work.par_iter_mut().for_each(|(a, b, c)| {
            general_mat_mul(1.0, &*a, &*b, 0.0, c);
        });
    }) * flops
}

fn say(args: std::fmt::Arguments<'_>) {
    let _ = std::io::stdout().lock().write_fmt(args);
}

/// A rate or ratio to three significant figures (at least one decimal), so that the f64
/// reference's fraction of an image per second does not print as 0.0.
fn rate(v: f64) -> String {
    let decimals = if v >= 100.0 {
        0
    } else if v == 0.0 || !v.is_finite() {
        1
    } else {
        (2 - v.abs().log10().floor() as i32).clamp(1, 6) as usize
    };
    format!("{v:.decimals$}")
}

#[cfg(test)]
mod tests {
    use super::{Paired, alternate, rate};

    /// The quoted ratio is the median of the rounds' ratios, which one round where only the
    /// rival was slowed does not move, and not the ratio of the medians.
    #[test]
    fn alternating_rounds_quote_the_median_of_their_ratios() {
        // Ours 10, 30, 20 and theirs 5, 15, 5 (its third pass slowed): ratios 2, 2, 4, while
        // the ratio of the medians is 20 / 5 = 4.
        let mut ours = [10.0, 30.0, 20.0].into_iter();
        let mut theirs = [5.0, 15.0, 5.0].into_iter();
        let paired = alternate(3, || ours.next().unwrap(), || Ok(theirs.next().unwrap())).unwrap();
        let want = Paired {
            ours: 20.0,
            theirs: 5.0,
            ratio: 2.0,
        };
        assert_eq!(paired, want);
        // The rival's failure ends the comparison with its reason.
        let mut calls = 0;
        let failed = alternate(
            3,
            || 1.0,
            || {
                calls += 1;
                if calls < 2 {
                    Ok(1.0)
                } else {
                    Err("it stopped".to_string())
                }
            },
        );
        assert_eq!(failed, Err("it stopped".to_string()));
    }

    #[test]
    fn rates_keep_three_significant_figures() {
        let shown: Vec<String> = [12088.9, 57.64, 1.5, 0.03456, 0.0, f64::INFINITY]
            .map(rate)
            .into();
        assert_eq!(shown, ["12089", "57.6", "1.50", "0.0346", "0.0", "inf"]);
    }
}
